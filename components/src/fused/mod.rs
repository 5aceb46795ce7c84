//! Fused operations with their own backward pass, for the two places where a composite of
//! candle ops streams the largest tensors of a step through memory several times:
//!
//! - the causal softmax of attention scores, (B, H, T, T): scale, mask, max, exp, sum and
//!   divide are one kernel forward and one backward, in place of about ten passes each way;
//! - the cross-entropy over the vocabulary, (B T, V): one kernel each way instead of casting
//!   the logits to f32 and taking max, exp, sum, log and gather over them; in training, with
//!   the output head, one autograd node that frees the logits in the forward pass
//!   (head_loss.rs);
//! - RMSNorm (norm.rs), four a layer, each eight kernels forward as a composite;
//! - the embedding's backward (embedding.rs), which candle runs in a single thread block;
//! - the MLP activations (activation.rs), GELU's backward ten kernels as a composite, and
//!   the whole MLP, two-matrix or SwiGLU (mlp.rs), its hidden activations recomputed in
//!   backward;
//! - gated attention's gate y sigmoid(g) (gate.rs), some twenty kernels as a composite;
//! - linear layers (linear.rs), whose f32 weights' casts and transposes would otherwise be
//!   nodes whose gradients are zero-filled and added, one of them through a strided view;
//! - attention heads' layout, QK-norm and RoPE (head.rs), some twenty kernels as composites;
//! - the attention core (attention.rs), whose (B, H, T, T) temporaries it keeps out of the
//!   gradient store and out of memory between the passes; in bf16 with heads of 64 or 128, flash
//!   attention (flash.rs), whose score tiles never leave the chip, and there the whole
//!   attention sublayer as one node (attention_sublayer.rs: projections, heads, flash
//!   attention, gate, output projection; node.rs lets one node take any number of weights);
//! - mHC's stream mixing (mix.rs) and Sinkhorn rounds (sinkhorn.rs), tiny per-token matrix
//!   work that composites spread over hundreds of launches a layer, its coefficients'
//!   RMSNorm and projection (norm_proj.rs), which read the n-stream state once in its dtype
//!   (on the tensor cores in bf16), the coefficients from the projection's logits
//!   (stream_coef.rs: mHC's sigmoids, biases and Sinkhorn, dynamic HC's tanh, one kernel
//!   each way), and the streams' mean and copy (streams.rs);
//! - AdamW's update (adam.rs), in place, and Muon's element-wise work around Newton-Schulz
//!   (muon_step.rs): its momentum, the rounds' normalized input, NorMuon's row sums, the
//!   weight update in place; and Newton-Schulz's rounds as cuBLAS products, in blocks on
//!   the Gram matrix (newton_schulz.rs).
//!
//! Each is a candle CustomOp with `bwd`, so autograd runs through it. The CUDA kernels
//! (fused.cu, compiled to PTX by build.rs under the `cuda` feature) do the work on the GPU;
//! `cpu_fwd` implements the same arithmetic, which the tests hold against the composite ops.
//! Models call the dispatching functions here ([`rms_norm`], [`cross_entropy_rows`], ...) or
//! apply an op on CUDA tensors only; the CPU keeps candle's composites, whose results the
//! README's measurements come from.

mod activation;
mod adam;
mod add;
mod attention;
mod attention_sublayer;
mod coef_grads;
#[cfg(feature = "cuda")]
mod cuda;
mod embedding;
mod flash;
mod gate;
mod head;
mod head_loss;
mod linear;
mod mix;
mod mlp;
mod muon_step;
mod newton_schulz;
mod node;
mod norm;
mod norm_proj;
mod sinkhorn;
mod stack;
mod stream_coef;
mod streams;

pub use activation::{Activation, ActivationBwd, Kind};
pub use adam::{adam_step, AdamPart, AdamSlot, AdamStep, AdamUpdate};
pub use add::{add_outside, Add};
pub use attention::CausalAttention;
pub use attention_sublayer::{
    attention_sublayer, attention_sublayer_detached, sublayer_fits, AttentionPlan, AttentionWeights,
};
pub use coef_grads::{stream_coef_backward, CoefGrads, TokenSums};
pub use embedding::{Embedding, EmbeddingAdd, EmbeddingBwd};
pub use flash::{FlashAttention, FlashKernels, FLASH_HEAD_DIMS};
pub use gate::{SigmoidGate, SigmoidGateBwd};
pub use head::{HeadPrep, HeadPrepBwd};
pub use head_loss::{linear_cross_entropy_outside, linear_cross_entropy_sum};
pub use linear::{AddProduct, FusedLinear, ScaleBy, WeightGrad};
pub use mix::{MixBwd, PostMix, PreMix, StateGrad, MAX_STREAMS};
pub use mlp::{mlp_outside, swiglu_mlp, swiglu_outside, FusedMlp};
pub use muon_step::{
    muon_apply, muon_prepare, row_sum_squares, MuonApply, MuonMomentum, MuonScale, RowSumSq,
};
pub use newton_schulz::{gram_pays, newton_schulz_block};
#[cfg(feature = "cuda")]
pub use node::scalar_zero_cuda;
pub use node::{node, scalar_zero_cpu, HandOver};
pub use norm::{
    rms_norm_outside, RmsNormBwdG, RmsNormBwdX, RmsNormBwdXInto, RmsNormGain, RmsNormPlain,
};
pub use norm_proj::{
    norm_proj, norm_proj_backward, norm_proj_ext, NormProj, NormProjBwdPhi, NormProjBwdX,
    NORM_PROJ_MAX_COLS,
};
pub use sinkhorn::{Sinkhorn, SinkhornBwd, SINKHORN_MAX_ITERS, SINKHORN_MAX_STREAMS};
pub use stack::{stack_as, StackCast};
pub use stream_coef::{
    pack_params, stream_coefficients, CoefPart, Scheme, StreamCoef, StreamCoefBwd,
    HC_COEF_MAX_STREAMS, MHC_COEF_MAX_STREAMS,
};
pub use streams::Streams;

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout,
    Result, Shape, Tensor, WithDType, D,
};

use crate::nn::{causal_mask, softmax};

/// RMSNorm over the last axis with an optional f32 gain: x / sqrt(mean(x^2) + eps) * g, the
/// statistics in f32 whatever x's dtype, the result in x's dtype.
pub fn rms_norm(x: &Tensor, gain: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if x.device().is_cuda() {
        let x = x.contiguous()?;
        let eps = eps as f32;
        return match gain {
            Some(g) => x.apply_op2(&g.to_dtype(DType::F32)?, RmsNormGain { eps }),
            None => x.apply_op1(RmsNormPlain { eps }),
        };
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x32.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?;
    match gain {
        Some(g) => y.broadcast_mul(&g.to_dtype(dtype)?),
        None => Ok(y),
    }
}

/// The sum of the squares of every element of `tensors`, an f32 scalar on their device (the
/// gradient norm's reduction). On CUDA with f32 tensors, two kernels for all of them
/// (cuda.rs, `sum_squares`); otherwise per tensor, rows first so that large matrices are
/// reduced in parallel (a whole-tensor sum runs in one thread block), then summed.
pub fn sum_squares(tensors: &[&Tensor]) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(first) = tensors.first() {
        let on_gpu = |t: &&Tensor| t.device().is_cuda() && t.dtype() == DType::F32;
        if tensors.iter().all(on_gpu)
            && tensors
                .iter()
                .all(|t| t.device().same_device(first.device()))
        {
            let contiguous: Vec<Tensor> = tensors
                .iter()
                .map(|t| t.contiguous())
                .collect::<Result<_>>()?;
            let guards: Vec<_> = contiguous.iter().map(|t| t.storage_and_layout()).collect();
            let mut parts = Vec::with_capacity(guards.len());
            for (storage, layout) in &guards {
                let candle_core::Storage::Cuda(s) = &**storage else {
                    bail!("sum of squares: a tensor on a GPU without GPU storage");
                };
                parts.push((s, *layout));
            }
            return Ok(cuda_tensor(cuda::sum_squares(&parts)?, ()));
        }
    }
    let mut sums = Vec::with_capacity(tensors.len());
    for t in tensors {
        let sq = t.to_dtype(DType::F32)?.sqr()?;
        sums.push(match sq.rank() {
            0 | 1 => sq.sum_all()?,
            _ => sq.sum(D::Minus1)?.sum_all()?,
        });
    }
    match sums.is_empty() {
        true => Ok(Tensor::new(0f32, &candle_core::Device::Cpu)?),
        false => Tensor::stack(&sums, 0)?.sum_all(),
    }
}

/// A tensor outside the autograd graph over storage a kernel wrote.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_tensor(s: candle_core::CudaStorage, shape: impl Into<Shape>) -> Tensor {
    use candle_core::{op::BackpropOp, Storage};
    Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
}

/// An MLP activation: one kernel each way on CUDA, candle's ops on the CPU. SwiGLU takes
/// hidden rows [g | u] and returns silu(g) u, half as wide.
pub fn activation(x: &Tensor, kind: Kind) -> Result<Tensor> {
    if x.device().is_cuda() {
        return x.contiguous()?.apply_op1(Activation(kind));
    }
    match kind {
        Kind::GeluErf => x.gelu_erf(),
        Kind::Relu2 => x.relu()?.sqr(),
        Kind::SwiGlu => {
            let hidden = x.dim(D::Minus1)? / 2;
            x.narrow(D::Minus1, 0, hidden)?.silu()? * x.narrow(D::Minus1, hidden, hidden)?
        }
    }
}

/// Rows `ids` (N,) u32 of the f32 table `w` (V, C): (N, C) f32.
pub fn embedding(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if w.device().is_cuda() {
        return w.contiguous()?.apply_op2(&ids.contiguous()?, Embedding);
    }
    w.embedding(ids)
}

/// softmax(scale * scores) over the last axis with the causal mask, for scores (.., Tq, Tk)
/// whose row i may see keys 0 ..= i + Tk - Tq. Computed in f32, returned in the input dtype.
/// The composite: on CUDA, attention runs [`CausalAttention`], whose kernels are
/// [`CausalSoftmax`] and its backward; this is the CPU's path and the ops' reference.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = scores.dims();
    let (tq, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let mask = causal_mask(tk, scores.device())?
        .narrow(0, tk - tq, tq)?
        .to_dtype(scores.dtype())?;
    softmax(&(scores * scale)?.broadcast_add(&mask)?)
}

/// -log softmax(logits)[target] per row, in f32: logits (N, V) in any float dtype, targets
/// (N,) u32.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cuda() {
        return logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy);
    }
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (log_z - picked)?.squeeze(1)
}

/// The fused causal softmax (forward); its backward is [`CausalSoftmaxBwd`].
#[derive(Clone, Copy, Debug)]
pub struct CausalSoftmax {
    pub scale: f64,
}

/// (P, dL/dP) -> dL/dscores for [`CausalSoftmax`].
#[derive(Clone, Copy, Debug)]
pub struct CausalSoftmaxBwd {
    pub scale: f64,
}

/// The fused cross-entropy per row (forward); its backward is [`CrossEntropyBwd`].
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy;

/// (logits, targets, dL/dloss per row) -> dL/dlogits for [`CrossEntropy`].
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropyBwd;

/// The contiguous data of a CPU tensor as f32 values (the arithmetic is done in f32, as on the
/// GPU), with its element type to write results back in.
pub(crate) fn cpu_values(s: &CpuStorage, l: &Layout, op: &str) -> Result<(Vec<f32>, DType)> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: the input must be contiguous");
    };
    fn conv<T: WithDType>(v: &[T]) -> Vec<f32> {
        v.iter().map(|x| x.to_f64() as f32).collect()
    }
    Ok(match s {
        CpuStorage::F32(v) => (v[start..end].to_vec(), DType::F32),
        CpuStorage::BF16(v) => (conv(&v[start..end]), DType::BF16),
        other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
    })
}

/// The contiguous f32 values of an f32 CPU tensor, borrowed (optimizer state and masters).
pub(crate) fn cpu_f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("{op}: contiguous f32 tensors only"),
    }
}

/// [`cpu_f32s`], for a tensor updated in place.
pub(crate) fn cpu_f32s_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!("{op}: contiguous f32 tensors only"),
    }
}

pub(crate) fn cpu_storage(values: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
        _ => CpuStorage::F32(values),
    }
}

/// (rows, tq, tk) of a (.., Tq, Tk) layout.
fn rows_of(l: &Layout) -> Result<(usize, usize, usize)> {
    let dims = l.dims();
    if dims.len() < 2 {
        bail!("causal softmax: scores need at least 2 dimensions, got {dims:?}");
    }
    let (tq, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if tq > tk {
        bail!("causal softmax: more queries ({tq}) than keys ({tk})");
    }
    Ok((l.shape().elem_count() / tk.max(1), tq, tk))
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dtype) = cpu_values(s, l, self.name())?;
        let (rows, tq, tk) = rows_of(l)?;
        let scale = self.scale as f32;
        let mut y = vec![0f32; x.len()];
        for r in 0..rows {
            let last = r % tq + tk - tq;
            let (xr, yr) = (&x[r * tk..][..=last], &mut y[r * tk..][..=last]);
            let m = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(scale * v));
            let sum: f32 = xr.iter().map(|&v| (scale * v - m).exp()).sum();
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = (scale * v - m).exp() / sum;
            }
        }
        Ok((cpu_storage(y, dtype), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, tq, tk) = rows_of(l)?;
        let out = cuda::causal_softmax_fwd(s, l, rows, tq, tk, self.scale as f32)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = res.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &CausalSoftmaxBwd { scale: self.scale },
        )?;
        Ok(Some(grad))
    }
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p, dtype) = cpu_values(s1, l1, self.name())?;
        let (dp, _) = cpu_values(s2, l2, self.name())?;
        let (rows, tq, tk) = rows_of(l1)?;
        let scale = self.scale as f32;
        let mut ds = vec![0f32; p.len()];
        for r in 0..rows {
            let last = r % tq + tk - tq;
            let (pr, dpr) = (&p[r * tk..][..=last], &dp[r * tk..][..=last]);
            let dot: f32 = pr.iter().zip(dpr).map(|(a, b)| a * b).sum();
            for ((o, &a), &b) in ds[r * tk..][..=last].iter_mut().zip(pr).zip(dpr) {
                *o = scale * a * (b - dot);
            }
        }
        Ok((cpu_storage(ds, dtype), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, tq, tk) = rows_of(l1)?;
        let out = cuda::causal_softmax_bwd(s1, l1, s2, l2, rows, tq, tk, self.scale as f32)?;
        Ok((out, l1.shape().clone()))
    }
}

/// (rows, v) of the logits and a check of the targets.
fn logits_rows(l1: &Layout, l2: &Layout) -> Result<(usize, usize)> {
    let (rows, v) = l1.shape().dims2()?;
    if l2.dims() != [rows] {
        bail!(
            "cross-entropy: {rows} rows of logits but targets of shape {:?}",
            l2.dims()
        );
    }
    Ok((rows, v))
}

pub(crate) fn cpu_targets(s: &CpuStorage, l: &Layout) -> Result<Vec<u32>> {
    let (CpuStorage::U32(t), Some((start, end))) = (s, l.contiguous_offsets()) else {
        bail!("token ids and targets must be contiguous u32");
    };
    Ok(t[start..end].to_vec())
}

/// The max and the sum of exp(x - max) of a row.
fn log_sum_exp_parts(x: &[f32]) -> (f32, f32) {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    (m, x.iter().map(|&v| (v - m).exp()).sum())
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, v) = logits_rows(l1, l2)?;
        let (x, _) = cpu_values(s1, l1, self.name())?;
        let t = cpu_targets(s2, l2)?;
        let loss = (0..rows)
            .map(|r| {
                let row = &x[r * v..][..v];
                let (m, sum) = log_sum_exp_parts(row);
                sum.ln() + m - row[t[r] as usize]
            })
            .collect();
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, v) = logits_rows(l1, l2)?;
        Ok((
            cuda::cross_entropy_fwd(s1, l1, s2, l2, rows, v)?,
            Shape::from(rows),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.to_dtype(DType::F32)?.contiguous()?;
        let grad = logits.apply_op3_no_bwd(targets, &g, &CrossEntropyBwd)?;
        Ok((Some(grad), None))
    }
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, v) = logits_rows(l1, l2)?;
        let (x, dtype) = cpu_values(s1, l1, self.name())?;
        let t = cpu_targets(s2, l2)?;
        let (g, _) = cpu_values(s3, l3, self.name())?;
        let mut out = vec![0f32; x.len()];
        for r in 0..rows {
            let row = &x[r * v..][..v];
            let (m, sum) = log_sum_exp_parts(row);
            for (j, (o, &xv)) in out[r * v..][..v].iter_mut().zip(row).enumerate() {
                let hit = if j == t[r] as usize { 1.0 } else { 0.0 };
                *o = g[r] * ((xv - m).exp() / sum - hit);
            }
        }
        Ok((cpu_storage(out, dtype), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, v) = logits_rows(l1, l2)?;
        Ok((
            cuda::cross_entropy_bwd(s1, l1, s2, l2, s3, l3, rows, v)?,
            l1.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests;
