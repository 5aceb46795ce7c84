//! Causal self-attention with grouped key/value heads, RoPE and optional QK-norm: the one
//! implementation behind every attention component (Mha is the case kv_heads = heads).

use candle_core::{DType, Result, Tensor};
use registry::{Detached, Dims, ParamBuilder, Role, Sublayer};

use crate::fused::{
    attention_sublayer_detached, causal_softmax, node, sublayer_fits, AttentionPlan,
    AttentionWeights, CausalAttention, HeadPrep, FLASH_HEAD_DIMS,
};
use crate::nn::{out_proj_std, rms_norm, rows, unrows, Linear, Rope, INIT_STD, NORM_EPS};

/// The head layout and position options an attention component resolves to.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    /// RoPE base; `None` disables rotary embeddings (the model then has no position signal
    /// besides causality).
    pub rope_theta: Option<f64>,
    /// RMSNorm on each query and key head before the dot product (no gain).
    pub qk_norm: bool,
}

impl AttentionShape {
    /// The shape from a component's RON fields (`rope: false` drops `rope_theta`).
    pub fn new(heads: usize, kv_heads: usize, rope: bool, rope_theta: f64, qk_norm: bool) -> Self {
        Self {
            heads,
            kv_heads,
            rope_theta: rope.then_some(rope_theta),
            qk_norm,
        }
    }

    /// The value checks every attention shares (run when the sweep file is read).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.heads == 0 || self.kv_heads == 0 {
            return Err("heads and kv_heads must be at least 1".into());
        }
        if let Some(theta) = self.rope_theta {
            if !(theta.is_finite() && theta > 0.0) {
                return Err(format!("rope_theta must be positive, got {theta}"));
            }
        }
        Ok(())
    }

    /// Forward FLOPs per token: the q, k, v and output projections, and QK^T and the weighted
    /// values over the causal average of (T + 1) / 2 keys, 2 per multiply-add.
    pub fn flops(&self, dims: &Dims) -> f64 {
        let c = dims.d_model as f64;
        let kv = (self.kv_heads * (dims.d_model / self.heads)) as f64;
        let projections = 2.0 * (c * c + 2.0 * c * kv + c * c);
        let keys = (dims.seq_len as f64 + 1.0) / 2.0;
        projections + 2.0 * 2.0 * c * keys
    }

    /// Parameters: q and o (C x C), k and v (C x kv heads x head dim); no biases, QK-norm
    /// has no gain.
    pub fn params(&self, dims: &Dims) -> usize {
        let c = dims.d_model;
        let kv = self.kv_heads * (c / self.heads);
        2 * c * c + 2 * c * kv
    }

    /// The checks every attention shares against the model's width.
    pub fn check(&self, dims: &Dims) -> std::result::Result<(), String> {
        if self.heads == 0 || self.kv_heads == 0 {
            return Err("heads and kv_heads must be at least 1".into());
        }
        if !dims.d_model.is_multiple_of(self.heads) {
            return Err(format!(
                "heads = {} does not divide d_model = {}",
                self.heads, dims.d_model
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!(
                "kv_heads = {} does not divide heads = {}",
                self.kv_heads, self.heads
            ));
        }
        let head_dim = dims.d_model / self.heads;
        if self.rope_theta.is_some() && !head_dim.is_multiple_of(2) {
            return Err(format!(
                "RoPE needs an even head dimension; d_model / heads = {head_dim}"
            ));
        }
        Ok(())
    }
}

/// The built layer.
#[derive(Debug)]
pub struct CausalSelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    shape: AttentionShape,
    head_dim: usize,
    rope: Option<Rope>,
    /// cos and sin of every position (2, seq_len, head_dim), the fused head op's table;
    /// cos 1 and sin 0 without RoPE. Built once: the op reads it for q and k of every layer.
    table: Tensor,
}

impl CausalSelfAttention {
    pub fn new(shape: AttentionShape, dims: &Dims, p: &ParamBuilder) -> Result<Self> {
        let c = dims.d_model;
        let head_dim = c / shape.heads;
        let kv_dim = shape.kv_heads * head_dim;
        let rope = match shape.rope_theta {
            Some(theta) => Some(Rope::new(head_dim, dims.seq_len, theta, p.device())?),
            None => None,
        };
        let table = match &rope {
            Some(rope) => rope.table(dims.seq_len)?,
            None => {
                let (t, hd) = (dims.seq_len, head_dim);
                let ones = Tensor::ones((1, t, hd), DType::F32, p.device())?;
                Tensor::cat(&[ones.clone(), ones.zeros_like()?], 0)?
            }
        };
        Ok(Self {
            q: Linear::new(c, c, INIT_STD, Role::Hidden, &p.pp("q"))?,
            k: Linear::new(c, kv_dim, INIT_STD, Role::Hidden, &p.pp("k"))?,
            v: Linear::new(c, kv_dim, INIT_STD, Role::Hidden, &p.pp("v"))?,
            o: Linear::new(c, c, out_proj_std(dims.n_layers), Role::Hidden, &p.pp("o"))?,
            shape,
            head_dim,
            rope,
            table,
        })
    }

    /// (B, T, C) -> per-head outputs before the output projection, (B, T, C). Gated variants
    /// multiply this by their gate before calling [`Self::project`]. Where flash attention
    /// applies the sublayers train as one node instead ([`Self::fused_sublayer`]).
    pub fn attend(&self, x: &Tensor) -> Result<Tensor> {
        unrows(&self.attend_rows(x)?, x)
    }

    /// (B, T, C) -> per-head outputs as rows (B T, C), through the cuBLAS attention op on CUDA
    /// and the composites on the CPU.
    fn attend_rows(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, kv, hd) = (self.shape.heads, self.shape.kv_heads, self.head_dim);
        // The projections act on rows (B T, C), flattened once (see `rows`).
        let r = rows(x)?;
        let q = self.heads(&self.q.forward(&r)?, b, t, h)?;
        let mut k = self.heads(&self.k.forward(&r)?, b, t, kv)?;
        let v = self.v.forward(&r)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // The fused op's softmax keeps a row of scores in registers: up to 8192 keys.
        let fused = x.device().is_cuda() && t <= 8192;
        if fused && kv == h {
            return q.apply_op3(&k, &v, CausalAttention { scale, rows: true });
        }
        let mut v = v.reshape((b, t, kv, hd))?.transpose(1, 2)?.contiguous()?; // (B, kv, T, hd)
        if kv != h {
            // Each key/value head serves heads / kv_heads consecutive query heads.
            let rep = h / kv;
            let widen = |y: Tensor| -> Result<Tensor> {
                y.unsqueeze(2)?
                    .broadcast_as((b, kv, rep, t, hd))?
                    .reshape((b, h, t, hd))
            };
            k = widen(k)?;
            v = widen(v)?;
        }
        let y = if fused {
            q.apply_op3(&k, &v, CausalAttention { scale, rows: false })?
        } else {
            let scores = q.matmul(&k.t()?.contiguous()?)?; // (B, H, T, T)
            causal_softmax(&scores, scale)?.matmul(&v)?
        }; // (B, H, T, hd)
        y.transpose(1, 2)?.reshape((b * t, c))
    }

    /// The whole sublayer on `x` outside the graph (fused/attention_sublayer.rs) where flash
    /// attention applies, gated by `gate`'s projection when given; None elsewhere.
    pub(crate) fn fused_sublayer(
        &self,
        x: &Tensor,
        gate: Option<&Tensor>,
    ) -> Result<Option<Detached>> {
        if !(sublayer_fits(x) && FLASH_HEAD_DIMS.contains(&self.head_dim)) {
            return Ok(None);
        }
        let t = x.dim(1)?;
        let plan = AttentionPlan {
            q: self.head_prep(t, self.shape.heads),
            k: self.head_prep(t, self.shape.kv_heads),
            table: self.table_for(t)?,
            scale: 1.0 / (self.head_dim as f64).sqrt(),
        };
        let weights = AttentionWeights {
            q: self.q.weight(),
            k: self.k.weight(),
            v: self.v.weight(),
            o: self.o.weight(),
            gate,
        };
        attention_sublayer_detached(x, &weights, &plan).map(Some)
    }

    /// The RoPE table (2, t, hd) of the first t positions.
    fn table_for(&self, t: usize) -> Result<Tensor> {
        match self.table.dim(1)? {
            full if full == t => Ok(self.table.clone()),
            _ => self.table.narrow(1, 0, t)?.contiguous(),
        }
    }

    /// The fused head op for n heads of sequences of t.
    fn head_prep(&self, t: usize, n: usize) -> HeadPrep {
        HeadPrep {
            seq: t,
            heads: n,
            norm: self.shape.qk_norm,
            eps: NORM_EPS as f32,
        }
    }

    /// A query or key projection, rows (B T, n hd), as n heads (B, n, T, hd), QK-normed and
    /// rotated as the shape says: one fused op on CUDA (fused/head.rs), composites on the CPU.
    fn heads(&self, y: &Tensor, b: usize, t: usize, n: usize) -> Result<Tensor> {
        let hd = self.head_dim;
        if y.device().is_cuda() {
            let table = self.table_for(t)?;
            return y.contiguous()?.apply_op2(&table, self.head_prep(t, n));
        }
        let mut heads = y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?;
        if self.shape.qk_norm {
            heads = rms_norm(&heads)?;
        }
        match &self.rope {
            Some(rope) => rope.apply(&heads),
            None => Ok(heads),
        }
    }

    /// The output projection, (B, T, C) -> (B, T, C).
    pub fn project(&self, y: &Tensor) -> Result<Tensor> {
        self.o.forward(y)
    }
}

impl Sublayer for CausalSelfAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Where flash attention applies, the whole sublayer is one node of the graph.
        if let Some(d) = self.fused_sublayer(x, None)? {
            return node(x, d);
        }
        unrows(&self.o.forward(&self.attend_rows(x)?)?, x)
    }

    fn detached(&self, x: &Tensor) -> Result<Option<Detached>> {
        self.fused_sublayer(x, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::randn;
    use candle_core::{Device, IndexOp};

    #[test]
    fn the_first_position_attends_only_to_itself() -> Result<()> {
        // With one visible key, attention returns that key's value: y_0 = o(v(x_0)).
        let dims = Dims {
            d_model: 16,
            n_layers: 2,
            vocab: 32,
            seq_len: 8,
        };
        let p = ParamBuilder::new(5, &Device::Cpu);
        let attn = CausalSelfAttention::new(AttentionShape::new(4, 2, true, 1e4, true), &dims, &p)?;
        let x = randn(1, (1, 4, 16), 1.0)?;
        let y0 = attn.forward(&x)?.i((0, 0))?;
        let weight = |name: &str| {
            let ps = p.params();
            ps.iter()
                .find(|q| q.name == name)
                .unwrap()
                .var
                .as_tensor()
                .clone()
        };
        let (wv, wo) = (weight("v.weight"), weight("o.weight"));
        // kv_heads = 2: value head j serves query heads 2j and 2j + 1.
        let v = x
            .i((0, 0))?
            .unsqueeze(0)?
            .matmul(&wv.t()?)?
            .reshape((2, 1, 4))?;
        let v = v.repeat((1, 2, 1))?.reshape((1, 16))?;
        let expect = v.matmul(&wo.t()?)?.squeeze(0)?;
        let diff = (y0 - expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    /// On a GPU: the sublayer in bf16 (flash attention on (B, T, C), no rows) against the same
    /// weights in f32 on the CPU (the composites): the output, the input's gradient and a
    /// weight's, within bf16's rounding. Grouped heads of 128 and of 64.
    #[cfg(feature = "cuda")]
    #[test]
    fn the_flash_path_matches_the_cpu_composite() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("skipped: no CUDA device");
            return Ok(());
        };
        for (c, heads, kv) in [(256, 2, 1), (256, 4, 2)] {
            let dims = Dims {
                d_model: c,
                n_layers: 2,
                vocab: 32,
                seq_len: 96,
            };
            let x = randn(7, (2, 96, c), 1.0)?;
            let w = randn(8, (2, 96, c), 1.0)?;
            let run = |d: &Device, dtype: DType| -> Result<Vec<Tensor>> {
                let p = ParamBuilder::new(3, d);
                let attn = CausalSelfAttention::new(
                    AttentionShape::new(heads, kv, true, 1e4, true),
                    &dims,
                    &p,
                )?;
                let xv = candle_core::Var::from_tensor(&x.to_device(d)?.to_dtype(dtype)?)?;
                let y = attn.forward(xv.as_tensor())?;
                let grads = (y.to_dtype(DType::F32)? * w.to_device(d)?)?
                    .sum_all()?
                    .backward()?;
                let q = p
                    .params()
                    .into_iter()
                    .find(|q| q.name == "q.weight")
                    .unwrap()
                    .var;
                let out = [
                    &y,
                    grads.get(xv.as_tensor()).unwrap(),
                    grads.get(q.as_tensor()).unwrap(),
                ];
                out.iter()
                    .map(|t| t.to_dtype(DType::F32)?.to_device(&Device::Cpu))
                    .collect()
            };
            let (cpu, cuda) = (run(&Device::Cpu, DType::F32)?, run(&gpu, DType::BF16)?);
            for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
                let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
                let d = ((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?) / scale;
                assert!(d < 3e-2, "heads {heads}/{kv} #{i}: {d}");
            }
        }
        Ok(())
    }
}
