//! Causal attention softmax(scale Q K^T + mask) V as one op. Inside it the scores and the
//! probabilities (B, H, T, T) are temporaries: the backward pass recomputes them (one more
//! matmul and softmax) instead of keeping them per layer, and their gradients never pass
//! through candle's gradient store, which allocates and adds every gradient anew, at the size
//! of the largest tensors of the step.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::{CausalSoftmax, CausalSoftmaxBwd};

/// (Q (B, H, Tq, hd), K, V (B, H, Tk, hd)) -> (B, H, Tq, hd); with `rows`, V is given and
/// the result returned as rows (B T, H hd), the layout of the projections around attention,
/// so that no transpose or reshape of them enters the autograd graph (each would cost the
/// backward pass a zero-filled gradient and an add, at the size of the layer's activations).
#[derive(Clone, Copy, Debug)]
pub struct CausalAttention {
    pub scale: f64,
    pub rows: bool,
}

/// S = Q K^T, P = softmax(S) by `softmax`, P V; on either backend's storage. With `rows`,
/// V comes as rows and the result goes back as rows, through one strided copy each.
fn attend<S: BackendStorage>(
    (q, lq): (&S, &Layout),
    (k, lk): (&S, &Layout),
    (v, lv): (&S, &Layout),
    rows: bool,
    softmax: impl Fn(&S, &Layout) -> Result<S>,
) -> Result<(S, Shape)>
where
    S::Device: BackendDevice<Storage = S>,
{
    let (b, h, tq, hd) = lq.shape().dims4()?;
    let tk = lk.dims()[2];
    let scores = q.matmul(k, (b * h, tq, tk, hd), lq, &lk.transpose(2, 3)?)?;
    let ls = Layout::contiguous((b, h, tq, tk));
    let p = softmax(&scores, &ls)?;
    if !rows {
        return Ok((
            p.matmul(v, (b * h, tq, hd, tk), &ls, lv)?,
            lq.shape().clone(),
        ));
    }
    // Rows (B Tk, H hd) seen as (B, H, Tk, hd), copied contiguous for the batched GEMM.
    let heads =
        Layout::contiguous_with_offset((b, tk, h, hd), lv.start_offset()).transpose(1, 2)?;
    let mut vc = v
        .device()
        .zeros_impl(&Shape::from((b, h, tk, hd)), v.dtype())?;
    v.copy_strided_src(&mut vc, 0, &heads)?;
    let y = p.matmul(
        &vc,
        (b * h, tq, hd, tk),
        &ls,
        &Layout::contiguous((b, h, tk, hd)),
    )?;
    let back = Layout::contiguous((b, h, tq, hd)).transpose(1, 2)?;
    let mut out = y
        .device()
        .zeros_impl(&Shape::from((b, tq, h, hd)), y.dtype())?;
    y.copy_strided_src(&mut out, 0, &back)?;
    Ok((out, Shape::from((b * tq, h * hd))))
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
        attend((s1, l1), (s2, l2), (s3, l3), self.rows, |s, l| {
            Ok(op.cpu_fwd(s, l)?.0)
        })
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
        attend((s1, l1), (s2, l2), (s3, l3), self.rows, |s, l| {
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
        let (q, k, mut v, mut dy) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let (b, h, tq, hd) = q.dims4()?;
        let tk = k.dim(2)?;
        let heads = |r: &Tensor, t: usize| -> Result<Tensor> {
            r.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()
        };
        if self.rows {
            (v, dy) = (heads(&v, tk)?, heads(&dy, tq)?);
        }
        let scores = q.matmul(&k.t()?)?;
        let p = scores.apply_op1_no_bwd(&CausalSoftmax { scale: self.scale })?;
        let mut dv = p.t()?.matmul(&dy)?;
        let dp = dy.matmul(&v.t()?)?;
        let ds = p.apply_op2_no_bwd(&dp, &CausalSoftmaxBwd { scale: self.scale })?;
        let dq = ds.matmul(&k)?;
        let dk = ds.t()?.matmul(&q)?;
        if self.rows {
            dv = dv
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * tk, h * hd))?;
        }
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
