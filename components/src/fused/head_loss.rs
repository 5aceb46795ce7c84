//! The output head and the cross-entropy as one autograd node, its gradients computed in the
//! forward pass.
//!
//! The logits, (B T, V), are the largest tensor of a step (1.6 GB in bf16 for GPT-2 small at
//! 16 x 1024 tokens). As separate nodes, autograd keeps them from the forward pass to the
//! backward pass, and their gradient goes through candle's gradient store, which fills a
//! zero tensor of that size and adds the gradient into it: three more passes over 1.6 GB.
//! Here the logits live only inside the forward call: the loss per row and the gradient of
//! the logits (softmax - one-hot) are computed from them, the gradients of the head's input
//! and weight follow from two matmuls, and the logits are freed. The backward pass scales
//! the kept gradients by the incoming one. Outside the graph the loss comes already scaled
//! (the mean's 1 / tokens applied to the logits' gradient as it is written), so the incoming
//! gradient is one and that scaling costs no pass over the head's 100M-value weight gradient.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use registry::{add_into, Detached, Grads};

use super::linear::{weight_grad, ScaleBy};
use super::{CrossEntropy, CrossEntropyBwd};

/// The summed cross-entropy of `x w^T` (rows of `x`: (N, d); `w`: (V, d), one row per token,
/// in any float dtype: cast to x's inside, so the cast is no node of the graph) against
/// `targets` (N, u32), as a scalar f32 with gradients for `x` and for `w` in w's dtype.
pub fn linear_cross_entropy_sum(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (sum, dx, dw) = loss_and_grads(x, w, targets, 1.0)?;
    let op = Attach {
        grads: Mutex::new(Some((dx, dw))),
    };
    sum.apply_op3(x, w, op)
}

/// The summed loss times `scale` and the gradients of x and w for an incoming gradient of 1,
/// computed outside the graph. The scale enters as every row's incoming gradient, in f32,
/// so the logits' gradient is rounded to bf16 once, already scaled.
fn loss_and_grads(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xd, wd) = (x.detach(), w.detach().to_dtype(x.dtype())?);
    let targets = targets.contiguous()?;
    let logits = xd.matmul(&wd.t()?)?;
    let rows = logits.apply_op2_no_bwd(&targets, &CrossEntropy)?;
    let each = Tensor::full(scale as f32, rows.shape(), rows.device())?;
    let dlogits = logits.apply_op3_no_bwd(&targets, &each, &CrossEntropyBwd)?;
    drop(logits);
    let dx = dlogits.matmul(&wd)?;
    let dw = weight_grad(&dlogits, &xd, w.dtype())?;
    let sum = rows.sum_all()?;
    let loss = if scale == 1.0 {
        sum
    } else {
        sum.affine(scale, 0.0)?
    };
    Ok((loss, dx, dw))
}

/// [`linear_cross_entropy_sum`] times `scale` outside the graph (registry's `Detached`): the
/// mean for a scale of 1 / tokens, and a backward pass that scales the gradients it computed
/// beside it by the incoming one (one, for the mean seeded as the step's loss: then the
/// scaling is a launch that returns at once).
pub fn linear_cross_entropy_outside(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    scale: f64,
) -> Result<Detached> {
    let (sum, dx, dw) = loss_and_grads(x, w, targets, scale)?;
    let backward = move |g: &Tensor, into: Option<Tensor>| -> Result<Grads> {
        scale_in_place(&[&dx, &dw], g)?;
        Ok(Grads {
            input: Some(add_into(dx, into)?),
            weights: vec![Some(dw)],
        })
    };
    Ok(Detached {
        y: sum,
        weights: vec![w.clone()],
        backward: Box::new(backward),
    })
}

/// Scales the gradients in place by the scalar `g`, in f32 (the incoming gradient is
/// 1 / tokens, which bf16 would round by up to 0.4%, the same for every gradient of the
/// step), the factor read on the device.
fn scale_in_place(grads: &[&Tensor], g: &Tensor) -> Result<()> {
    let g = g.to_dtype(DType::F32)?.reshape(1)?.contiguous()?;
    for d in grads {
        d.inplace_op2(&g, &ScaleBy)?;
    }
    Ok(())
}

/// Passes the loss through unchanged, with the gradients of `x` and `w` computed beside it.
struct Attach {
    grads: Mutex<Option<(Tensor, Tensor)>>,
}

impl CustomOp3 for Attach {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(v) => {
                Ok((CpuStorage::F32(vec![v[l1.start_offset()]]), Shape::from(())))
            }
            _ => bail!("linear-cross-entropy: the loss is f32"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((s1.try_clone(l1)?, Shape::from(())))
    }

    fn bwd(
        &self,
        _loss: &Tensor,
        _x: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let taken = self.grads.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((dx, dw)) = taken else {
            bail!("linear-cross-entropy: its backward pass ran twice");
        };
        // In place: the two gradients are this op's own.
        scale_in_place(&[&dx, &dw], grad_res)?;
        Ok((None, Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_fused_head_loss_and_its_gradients_match_the_composite() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (6, 4), &dev)?))?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (5, 4), &dev)?))?;
        let t = Tensor::new(&[0u32, 4, 2, 2, 1, 3], &dev)?;
        // The composite: logits, cross-entropy per row by log-softmax, a mean as the model
        // takes it (so that the incoming gradient is not 1).
        let composite = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
            let logits = x.matmul(&w.t()?)?;
            let logp = logits
                .log_sum_exp(1)?
                .unsqueeze(1)?
                .broadcast_sub(&logits)?;
            let picked = logp.gather(&t.unsqueeze(1)?, 1)?;
            picked.sum_all()? / 6.0
        };
        let want = composite(x.as_tensor(), w.as_tensor())?;
        let got = (linear_cross_entropy_sum(x.as_tensor(), w.as_tensor(), &t)? / 6.0)?;
        let (a, b) = (got.to_scalar::<f32>()?, want.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let (gw, gg) = (want.backward()?, got.backward()?);
        for v in [&x, &w] {
            let e = gw.get(v.as_tensor()).unwrap();
            let f = gg.get(v.as_tensor()).expect("a gradient for every input");
            let gap = (e - f)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let size = e.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(gap < 1e-5 * size.max(1.0), "gap {gap}");
            assert!(size > 1e-3, "a vanishing gradient proves nothing");
        }
        Ok(())
    }

    /// Outside the graph the mean's scale is applied as the logits' gradient is written: the
    /// loss and both gradients equal the composite mean's, for an incoming gradient of one
    /// (the step's seed, where the scaling returns at once) and of three (where it does not).
    #[test]
    fn the_head_loss_outside_the_graph_takes_the_mean_inside() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (6, 4), &dev)?))?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (5, 4), &dev)?))?;
        let t = Tensor::new(&[1u32, 4, 0, 2, 3, 3], &dev)?;
        for incoming in [1.0f32, 3.0] {
            let logits = x.as_tensor().matmul(&w.as_tensor().t()?)?;
            let logp = logits
                .log_sum_exp(1)?
                .unsqueeze(1)?
                .broadcast_sub(&logits)?;
            let mean = (logp.gather(&t.unsqueeze(1)?, 1)?.sum_all()? / 6.0)?;
            let want = (mean.clone() * incoming as f64)?.backward()?;
            let got = linear_cross_entropy_outside(x.as_tensor(), w.as_tensor(), &t, 1.0 / 6.0)?;
            let (a, b) = (got.y.to_scalar::<f32>()?, mean.to_scalar::<f32>()?);
            assert!((a - b).abs() < 1e-6, "loss {a} vs {b}");
            let g = Tensor::new(incoming, &dev)?;
            let grads = (got.backward)(&g, None)?;
            let dw = grads.weights[0]
                .clone()
                .expect("the head's weight has a gradient");
            let dx = grads.input.expect("the head's input has a gradient");
            for (v, f) in [(&x, dx), (&w, dw)] {
                let e = want.get(v.as_tensor()).unwrap();
                let gap = (e - f)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = e.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    gap < 1e-6 * size.max(1.0),
                    "gap {gap} at incoming {incoming}"
                );
                assert!(size > 1e-3, "a vanishing gradient proves nothing");
            }
        }
        Ok(())
    }
}
