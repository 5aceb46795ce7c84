//! One quintic Newton-Schulz round X <- a X + (b A + c A^2) X on a bf16 stack of matrices
//! (optim/muon.rs), as three cuBLAS products and one small kernel: A = X X^T (or X^T X for a
//! tall X, the smaller Gram matrix), P = a I + b A + c A A (the kernel writes a I + b A, the
//! second product adds c A A into it), X' = P X (or X P). The a X term is folded into P, so
//! the round makes no element-wise pass over X: as candle ops it is three products and four
//! element-wise passes, two of them over the whole stack (a X, and the sum).

use candle_core::{Result, Tensor};

/// One round on `x` (.., R, C): through cuBLAS on CUDA in bf16, candle's ops otherwise (the
/// reference). The Gram matrix is taken on the smaller side either way.
pub fn newton_schulz_round(x: &Tensor, (a, b, c): (f64, f64, f64)) -> Result<Tensor> {
    let r = x.rank();
    let tall = x.dim(r - 2)? > x.dim(r - 1)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == candle_core::DType::BF16 && r == 3 {
        let (k, rows, cols) = x.dims3()?;
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else {
            candle_core::bail!("newton-schulz: a GPU tensor without GPU storage");
        };
        let coeffs = (a as f32, b as f32, c as f32);
        let out = super::cuda::ns_round(s, layout, (k, rows, cols), coeffs)?;
        return Ok(super::cuda_tensor(out, (k, rows, cols)));
    }
    let gram = match tall {
        true => x.t()?.matmul(x)?,
        false => x.matmul(&x.t()?)?,
    };
    let poly = ((&gram * b)? + (gram.matmul(&gram)? * c)?)?;
    let mixed = match tall {
        true => x.matmul(&poly)?,
        false => poly.matmul(x)?,
    };
    (x * a)? + mixed
}
