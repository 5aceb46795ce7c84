//! Quintic Newton-Schulz rounds X <- a X + (b A + c A^2) X on a bf16 stack of matrices
//! (optim/muon.rs), a block of them at a time, on the Gram matrix (the Gram form of
//! Zhang, Amsel, Chen and Dao's Gram Newton-Schulz, written here from its equations).
//!
//! Every round's polynomial is a polynomial in R = X X^T (X^T X for a tall X: the smaller
//! side either way), so the rounds of a block can run on R alone: with P = a I + b R + c R^2,
//! X' = P X and R' = X' X'^T = P R P. A block of n rounds is R = X X^T, then n polynomials,
//! their product Q and n - 1 updates R <- P (R P) on the small side, and one product Q X at
//! the end. For X (m, k m) a round costs (2 k + 1) m^3 multiply-adds; a block of two
//! (2 k + 5) m^3 where two rounds cost 2 (2 k + 1) m^3: at the 1B model's FFN matrices
//! (k = 4) 13 m^3 against 18. Square matrices gain nothing (the choice is muon.rs's).
//!
//! In bf16, R's smallest eigenvalues sit under its rounding, and rounding can make one
//! negative; the quintic then grows it by about a^2 = 12 a round where it grows a small
//! singular value of X by a. Blocks of two rounds, each starting again from X, keep that
//! growth from reaching the band the singular values end in (measured: on matrices whose
//! singular values decay exponentially, blocks of two land as close to the f32 rounds as the
//! plain bf16 rounds do, while one block of five leaves the band). On CUDA in bf16 the block
//! is cuBLAS products plus one small kernel per round (P = a I + b R, then P += c R R); a
//! block of one round is the plain round with the a X term folded into P.

use candle_core::{Result, Tensor};

/// `rounds` rounds on `x` (.., R, C) as one block: through cuBLAS on CUDA in bf16, candle's
/// ops otherwise (the reference). The Gram matrix is taken on the smaller side either way.
pub fn newton_schulz_block(
    x: &Tensor,
    rounds: usize,
    (a, b, c): (f64, f64, f64),
) -> Result<Tensor> {
    if rounds == 0 {
        return Ok(x.clone());
    }
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
        let out = super::cuda::ns_block(s, layout, (k, rows, cols), rounds, coeffs)?;
        return Ok(super::cuda_tensor(out, (k, rows, cols)));
    }
    let mut g = match tall {
        true => x.t()?.matmul(x)?,
        false => x.matmul(&x.t()?)?,
    };
    let side = g.dim(r - 1)?;
    let eye = Tensor::eye(side, x.dtype(), x.device())?;
    let mut q: Option<Tensor> = None;
    for t in 0..rounds {
        let p = ((&g * b)? + (g.matmul(&g)? * c)?)?.broadcast_add(&(&eye * a)?)?;
        if t + 1 < rounds {
            g = p.matmul(&g.matmul(&p)?)?;
        }
        q = Some(match q {
            None => p,
            Some(q) => q.matmul(&p)?,
        });
    }
    let q = q.expect("at least one round");
    match tall {
        true => x.matmul(&q),
        false => q.matmul(x),
    }
}

/// Whether a (rows, cols) matrix's rounds gain from blocks of two on the Gram matrix: where
/// the long side is at least twice the short ((2 k + 5) m^3 against 2 (2 k + 1) m^3 pays
/// from k = 1.5).
pub fn gram_pays(rows: usize, cols: usize) -> bool {
    rows.max(cols) >= 2 * rows.min(cols)
}
