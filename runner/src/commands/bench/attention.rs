//! `sweep bench --attention B,H,KV,T,HD`: the causal attention kernels alone, forward and
//! backward, at one shape in bf16 on a GPU: flash attention (components' flash.cu) and the
//! op it replaces (cuBLAS products and a fused softmax over grouped heads widened to H).
//! TFLOP/s count the causal half of the products, as FlashAttention's papers do: forward
//! 4 B H T^2 HD / 2, backward 2.5 times that.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{CustomOp3, DType, Device, Tensor};
use components::fused::{CausalAttention, FlashAttention};

use crate::devices::{device_of, parse_devices};
use crate::error::{exit, InputError};
use crate::gpu;

/// (b, h, kv, t, hd) of a `--attention` value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub b: usize,
    pub h: usize,
    pub kv: usize,
    pub t: usize,
    pub hd: usize,
}

impl Shape {
    /// `B,H,KV,T,HD`, every field at least 1 and KV dividing H.
    pub fn parse(s: &str) -> Result<Self, InputError> {
        let bad = |why: &str| {
            InputError::new(format!(
                "--attention {s}: {why}; give B,H,KV,T,HD (batch, query heads, key/value heads, \
                 tokens, head dimension), e.g. --attention 8,16,4,1024,128"
            ))
        };
        let n: Vec<usize> = s
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad("not five whole numbers"))?;
        let [b, h, kv, t, hd] = n[..] else {
            return Err(bad(&format!("{} numbers, not five", n.len())));
        };
        if n.contains(&0) {
            return Err(bad("every size must be at least 1"));
        }
        if !h.is_multiple_of(kv) {
            return Err(bad("KV must divide H"));
        }
        Ok(Self { b, h, kv, t, hd })
    }

    /// The causal forward pass's FLOPs (two products, half of them masked).
    fn fwd_flops(&self) -> f64 {
        2.0 * (self.b * self.h * self.hd) as f64 * (self.t * self.t) as f64
    }
}

/// Median wall times of one pass, synchronized.
struct Passes {
    fwd_s: f64,
    bwd_s: f64,
}

pub fn exec(shape: &str, device: &str, steps: usize, warmup: usize) -> anyhow::Result<u8> {
    let s = Shape::parse(shape)?;
    let [name] = &parse_devices(device)?[..] else {
        return Err(InputError::new(format!(
            "--attention times one device; --device {device} lists several"
        ))
        .into());
    };
    let dev = device_of(name)?;
    // The memory pool keeps what it has, as in training: without it, every pass would take
    // the backward pass's dS^T buffer (268 MB at the 1B shape) back from the driver.
    gpu::prepare(&dev)?;
    let bf16 = |dims: (usize, usize, usize, usize)| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1.0, dims, &dev)?.to_dtype(DType::BF16)
    };
    let q = bf16((s.b, s.h, s.t, s.hd))?;
    if !FlashAttention::fits(&q) {
        return Err(InputError::new(format!(
            "--attention times flash attention, which runs in a `cuda` build on a GPU with heads \
             of {:?}; got --device {device} and HD {}",
            components::fused::FLASH_HEAD_DIMS,
            s.hd
        ))
        .into());
    }
    let k = bf16((s.b, s.kv, s.t, s.hd))?;
    let v = bf16((1, 1, s.b * s.t, s.kv * s.hd))?
        .squeeze(0)?
        .squeeze(0)?;
    let dout = bf16((1, 1, s.b * s.t, s.h * s.hd))?
        .squeeze(0)?
        .squeeze(0)?;
    let scale = 1.0 / (s.hd as f64).sqrt();
    let flash = time(
        &dev,
        steps,
        warmup,
        || {
            let op: Arc<Box<dyn CustomOp3 + Send + Sync>> =
                Arc::new(Box::new(FlashAttention::new(scale)));
            Ok((q.apply_op3_arc(&k, &v, op.clone())?, op))
        },
        |op, y| op.bwd(&q, &k, &v, y, &dout).map(|_| ()),
    )?;

    // The op flash attention replaces, on K and V widened to every query head.
    let widen = |x: &Tensor| -> candle_core::Result<Tensor> {
        x.unsqueeze(2)?
            .broadcast_as((s.b, s.kv, s.h / s.kv, s.t, s.hd))?
            .reshape((s.b, s.h, s.t, s.hd))
    };
    let kw = widen(&k)?;
    let vw = widen(
        &v.reshape((s.b, s.t, s.kv, s.hd))?
            .transpose(1, 2)?
            .contiguous()?,
    )?;
    let dy = dout
        .reshape((s.b, s.t, s.h, s.hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let cublas = time(
        &dev,
        steps,
        warmup,
        || {
            let op: Arc<Box<dyn CustomOp3 + Send + Sync>> =
                Arc::new(Box::new(CausalAttention { scale, rows: false }));
            Ok((q.apply_op3_arc(&kw, &vw, op.clone())?, op))
        },
        |op, y| op.bwd(&q, &kw, &vw, y, &dy).map(|_| ()),
    )?;

    println!(
        "attention (B, H, KV, T, HD) = ({}, {}, {}, {}, {}), bf16, causal, {}; median of {steps} \
         after {warmup}",
        s.b,
        s.h,
        s.kv,
        s.t,
        s.hd,
        gpu::describe(&dev)
    );
    println!("| kernels | forward | TFLOP/s | backward | TFLOP/s |");
    println!("|---|---|---|---|---|");
    for (name, p) in [
        ("flash attention", &flash),
        ("cuBLAS + softmax, K/V widened", &cublas),
    ] {
        let fwd = s.fwd_flops();
        println!(
            "| {name} | {:.3} ms | {:.1} | {:.3} ms | {:.1} |",
            p.fwd_s * 1e3,
            fwd / p.fwd_s / 1e12,
            p.bwd_s * 1e3,
            2.5 * fwd / p.bwd_s / 1e12
        );
    }
    Ok(exit::OK)
}

type Op = Arc<Box<dyn CustomOp3 + Send + Sync>>;

/// Runs forward then backward `warmup + steps` times, each pass synchronized and timed.
fn time(
    dev: &Device,
    steps: usize,
    warmup: usize,
    fwd: impl Fn() -> candle_core::Result<(Tensor, Op)>,
    bwd: impl Fn(&Op, &Tensor) -> candle_core::Result<()>,
) -> anyhow::Result<Passes> {
    let (mut f, mut b) = (Vec::new(), Vec::new());
    for i in 0..warmup + steps {
        dev.synchronize()?;
        let started = Instant::now();
        let (y, op) = fwd()?;
        dev.synchronize()?;
        let mid = Instant::now();
        bwd(&op, &y)?;
        dev.synchronize()?;
        if i >= warmup {
            f.push((mid - started).as_secs_f64());
            b.push(mid.elapsed().as_secs_f64());
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Passes {
        fwd_s: median(f),
        bwd_s: median(b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_bad_ones_say_what_to_give() {
        let s = Shape::parse("8, 16,4,1024,128").unwrap();
        assert_eq!((s.b, s.h, s.kv, s.t, s.hd), (8, 16, 4, 1024, 128));
        // 2 x 8 x 16 x 1024^2 x 128 = 34.36 GFLOP.
        assert!((s.fwd_flops() / 1e9 - 34.359738368).abs() < 1e-9);
        for bad in [
            "8,16,4,1024",
            "8,16,3,1024,128",
            "8,x,4,1024,128",
            "0,16,4,1024,128",
        ] {
            let err = Shape::parse(bad).unwrap_err().to_string();
            assert!(err.contains("B,H,KV,T,HD"), "{bad}: {err}");
        }
    }
}
