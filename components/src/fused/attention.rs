//! Causal attention softmax(scale Q K^T + mask) V as one op. Inside it the scores and the
//! probabilities (B, H, T, T) are temporaries: the backward pass recomputes them (one more
//! matmul and softmax) instead of keeping them per layer, and their gradients never pass
//! through candle's gradient store, which allocates and adds every gradient anew, at the size
//! of the largest tensors of the step.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::{CausalSoftmax, CausalSoftmaxBwd};

/// (Q (B, H, Tq, hd), K, V (B, H, Tk, hd)) -> (B, H, Tq, hd).
#[derive(Clone, Copy, Debug)]
pub struct CausalAttention {
    pub scale: f64,
}

/// S = Q K^T, P = softmax(S) by `softmax`, P V; on either backend's storage.
fn attend<S: BackendStorage>(
    (q, lq): (&S, &Layout),
    (k, lk): (&S, &Layout),
    (v, lv): (&S, &Layout),
    softmax: impl Fn(&S, &Layout) -> Result<S>,
) -> Result<(S, Shape)> {
    let (b, h, tq, hd) = lq.shape().dims4()?;
    let tk = lk.dims()[2];
    let scores = q.matmul(k, (b * h, tq, tk, hd), lq, &lk.transpose(2, 3)?)?;
    let ls = Layout::contiguous((b, h, tq, tk));
    let p = softmax(&scores, &ls)?;
    Ok((
        p.matmul(v, (b * h, tq, hd, tk), &ls, lv)?,
        lq.shape().clone(),
    ))
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
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
        let op = CausalSoftmax { scale: self.scale };
        attend((s1, l1), (s2, l2), (s3, l3), |s, l| Ok(op.cpu_fwd(s, l)?.0))
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
        let scale = self.scale as f32;
        attend((s1, l1), (s2, l2), (s3, l3), |s, l| {
            let dims = l.dims();
            let (tq, tk) = (dims[2], dims[3]);
            let rows = l.shape().elem_count() / tk;
            super::cuda::causal_softmax_fwd(s, l, rows, tq, tk, scale)
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: nothing computed here joins the autograd graph.
        let (q, k, v, dy) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let scores = q.matmul(&k.t()?)?;
        let p = scores.apply_op1_no_bwd(&CausalSoftmax { scale: self.scale })?;
        let dv = p.t()?.matmul(&dy)?;
        let dp = dy.matmul(&v.t()?)?;
        let ds = p.apply_op2_no_bwd(&dp, &CausalSoftmaxBwd { scale: self.scale })?;
        let dq = ds.matmul(&k)?;
        let dk = ds.t()?.matmul(&q)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
