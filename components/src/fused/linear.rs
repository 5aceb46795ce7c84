//! A linear layer y = x W^T as one op taking the f32 master weight. As a composite
//! (`x.matmul(&w.to_dtype(bf16)?.t()?)`) the weight's cast and its transpose are two autograd
//! nodes: the backward pass zero-fills and adds the weight's gradient once for each of them,
//! the second time through a transposed view (a strided add four times slower than a
//! contiguous one), then casts it to f32 and zero-fills and adds it once more. Here the cast
//! happens inside the op, and the weight's gradient comes back contiguous and in the weight's
//! dtype, added once.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// (x (.., in) in the compute dtype, w (out, in) in any float dtype) -> (.., out) in x's.
#[derive(Clone, Copy, Debug)]
pub struct FusedLinear;

/// `w` in `dtype` with its layout: itself, or a contiguous cast that `slot` keeps.
pub(super) fn as_dtype<'a, S: BackendStorage>(
    w: &'a S,
    lw: &Layout,
    dtype: DType,
    slot: &'a mut Option<S>,
) -> Result<(&'a S, Layout)> {
    if w.dtype() == dtype {
        return Ok((w, lw.clone()));
    }
    let cast = slot.insert(w.to_dtype(lw, dtype)?);
    Ok((cast, Layout::contiguous(lw.shape())))
}

/// The weight `w` detached and in the dtype of the activations `x`, for a backward pass.
pub(super) fn like(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    w.detach().to_dtype(x.dtype())
}

/// (rows, in, out), checked.
fn dims(lx: &Layout, lw: &Layout) -> Result<(usize, usize, usize)> {
    let d_in = *lx.dims().last().unwrap_or(&0);
    let (d_out, w_in) = lw.shape().dims2()?;
    if d_in == 0 || w_in != d_in || lx.contiguous_offsets().is_none() {
        bail!(
            "fused linear: x {:?} (contiguous: {}) and weight {:?} do not fit",
            lx.dims(),
            lx.is_contiguous(),
            lw.dims()
        );
    }
    Ok((lx.shape().elem_count() / d_in, d_in, d_out))
}

/// x W^T on either backend's storage, and the output's shape.
fn forward<S: BackendStorage>(x: &S, lx: &Layout, w: &S, lw: &Layout) -> Result<(S, Shape)> {
    let (rows, d_in, d_out) = dims(lx, lw)?;
    let mut cast = None;
    let (w, lw) = as_dtype(w, lw, x.dtype(), &mut cast)?;
    let lx2 = Layout::contiguous_with_offset((rows, d_in), lx.start_offset());
    let y = x.matmul(w, (1, rows, d_out, d_in), &lx2, &lw.transpose(0, 1)?)?;
    let mut out = lx.dims().to_vec();
    *out.last_mut().expect("checked non-empty") = d_out;
    Ok((y, Shape::from(out)))
}

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        forward(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_out, d_in) = w.dims2()?;
        let w16 = like(w, x)?;
        let x2 = x.detach().reshape(((), d_in))?;
        let dy = grad.detach().reshape(((), d_out))?;
        let dx = dy.matmul(&w16)?.reshape(x.shape())?;
        let dw = dy.t()?.matmul(&x2)?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}
