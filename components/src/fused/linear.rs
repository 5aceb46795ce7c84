//! A linear layer y = x W^T as one op taking the f32 master weight. As a composite
//! (`x.matmul(&w.to_dtype(bf16)?.t()?)`) the weight's cast and its transpose are two autograd
//! nodes: the backward pass zero-fills and adds the weight's gradient once for each of them,
//! the second time through a transposed view (a strided add four times slower than a
//! contiguous one), then casts it to f32 and zero-fills and adds it once more. Here the cast
//! happens inside the op, and the weight's gradient comes back contiguous and in the weight's
//! dtype, added once.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, DType, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor,
};

use super::{cpu_f32s, cpu_storage, cpu_values};

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
        let dw = weight_grad(&dy, &x2, w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// A weight's gradient dy^T x in the weight's `dtype`, from rows dy (N, out) and x (N, in):
/// (out, in). On CUDA from bf16 rows for an f32 weight, one product writing f32
/// ([`WeightGrad`]), where a bf16 product would be cast up in a pass of its own over the
/// weight (half a millisecond a layer at the 1B shape); otherwise the product in the rows'
/// dtype, then cast.
pub(super) fn weight_grad(dy: &Tensor, x: &Tensor, dtype: DType) -> Result<Tensor> {
    let fused = dy.device().is_cuda()
        && dy.dtype() == DType::BF16
        && x.dtype() == DType::BF16
        && dtype == DType::F32;
    match fused {
        true => dy
            .contiguous()?
            .apply_op2_no_bwd(&x.contiguous()?, &WeightGrad),
        false => dy.t()?.matmul(x)?.to_dtype(dtype),
    }
}

/// (dy (N, out), x (N, in)), both bf16 or both f32 -> dy^T x (out, in) in f32, the sums in
/// f32 (see [`weight_grad`]).
#[derive(Clone, Copy, Debug)]
pub struct WeightGrad;

/// (rows, out, in) of a weight gradient's operands, checked.
fn grad_dims(ldy: &Layout, lx: &Layout) -> Result<(usize, usize, usize)> {
    let ((n, d_out), (nx, d_in)) = (ldy.shape().dims2()?, lx.shape().dims2()?);
    if n != nx || !ldy.is_contiguous() || !lx.is_contiguous() {
        bail!(
            "weight gradient: dy {:?} and x {:?} are not contiguous rows of one count",
            ldy.dims(),
            lx.dims()
        );
    }
    Ok((n, d_out, d_in))
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d_out, d_in) = grad_dims(l1, l2)?;
        let ((dy, _), (x, _)) = (
            cpu_values(s1, l1, self.name())?,
            cpu_values(s2, l2, self.name())?,
        );
        let mut dw = vec![0f32; d_out * d_in];
        for r in 0..n {
            for o in 0..d_out {
                let g = dy[r * d_out + o];
                let row = &mut dw[o * d_in..(o + 1) * d_in];
                for (w, xv) in row.iter_mut().zip(&x[r * d_in..(r + 1) * d_in]) {
                    *w += g * xv;
                }
            }
        }
        Ok((cpu_storage(dw, DType::F32), Shape::from((d_out, d_in))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = grad_dims(l1, l2)?;
        if s1.dtype() != DType::BF16 || s2.dtype() != DType::BF16 {
            bail!("weight gradient: the CUDA kernel takes bf16 rows");
        }
        let dw = super::cuda::weight_grad((s1, l1), (s2, l2), dims)?;
        Ok((dw, Shape::from((dims.1, dims.2))))
    }
}

/// In place, x *= s with s one f32 value in the same device's memory: a kept gradient scaled
/// by the incoming one without reading it to the host (head_loss.rs).
#[derive(Clone, Copy, Debug)]
pub struct ScaleBy;

impl InplaceOp2 for ScaleBy {
    fn name(&self) -> &'static str {
        "scale-by"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let s = cpu_f32s(s2, l2, self.name())?;
        let [f] = s else {
            bail!("scale in place: the factor has {} values, not one", s.len());
        };
        let Some((start, end)) = l1.contiguous_offsets() else {
            bail!("scale in place: the tensor scaled must be contiguous");
        };
        if *f == 1.0 {
            return Ok(()); // as the CUDA kernel: nothing to do
        }
        match s1 {
            CpuStorage::F32(v) => v[start..end].iter_mut().for_each(|x| *x *= f),
            CpuStorage::BF16(v) => v[start..end]
                .iter_mut()
                .for_each(|x| *x = half::bf16::from_f32(x.to_f32() * f)),
            _ => bail!("scale in place: f32 or bf16 only"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        super::cuda::scale_by((s1, l1), (s2, l2))
    }
}

/// In place, dst (N, C) += a (N, K) b (K, C), all in one dtype: the gradient of a layer's
/// input summed over the projections that read it (the attention's q, k and v) by products
/// that add into it, instead of one new tensor a projection and adds between them. On CUDA
/// bf16 (cuBLAS with beta = 1); the CPU's loops are its reference.
#[derive(Clone, Copy, Debug)]
pub struct AddProduct;

/// (n, k, c) of [`AddProduct`]'s operands, checked.
fn product_dims(ld: &Layout, la: &Layout, lb: &Layout) -> Result<(usize, usize, usize)> {
    let ((n, c), (na, k), (kb, cb)) = (
        ld.shape().dims2()?,
        la.shape().dims2()?,
        lb.shape().dims2()?,
    );
    let contiguous = ld.is_contiguous() && la.is_contiguous() && lb.is_contiguous();
    if na != n || kb != k || cb != c || !contiguous {
        bail!(
            "add product: dst {:?} += a {:?} b {:?} do not fit (or are not contiguous)",
            ld.dims(),
            la.dims(),
            lb.dims()
        );
    }
    Ok((n, k, c))
}

impl InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "add-product"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (n, k, c) = product_dims(l1, l2, l3)?;
        let ((a, _), (b, _)) = (
            cpu_values(s2, l2, self.name())?,
            cpu_values(s3, l3, self.name())?,
        );
        let start = l1.start_offset();
        let add =
            |row: usize, col: usize| (0..k).map(|j| a[row * k + j] * b[j * c + col]).sum::<f32>();
        match s1 {
            CpuStorage::F32(d) => {
                for (i, v) in d[start..start + n * c].iter_mut().enumerate() {
                    *v += add(i / c, i % c);
                }
            }
            CpuStorage::BF16(d) => {
                for (i, v) in d[start..start + n * c].iter_mut().enumerate() {
                    *v = half::bf16::from_f32(v.to_f32() + add(i / c, i % c));
                }
            }
            _ => bail!("add product: f32 or bf16 only"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let dims = product_dims(l1, l2, l3)?;
        super::cuda::add_product((s1, l1), (s2, l2), (s3, l3), dims)
    }
}
