//! Diagnostics of a multi-stream residual's state (Hc, Mhc): whether its n streams still
//! carry different things. The mHC repositories' reported failure is streams homogenizing
//! until the extra ones carry nothing, and the loss does not show it.
//!
//! For the state (B, T, n, C) after a sublayer, per token:
//! - the mean pairwise cosine similarity of the n streams (1: all the same direction;
//!   independent random streams: about 0);
//! - the effective rank of the n x C matrix (Roy and Vetterli 2007): exp of the entropy of
//!   its normalized singular values, from 1 (every stream a multiple of one) to n (equal
//!   singular values, orthogonal streams of equal size).
//!
//! Both averaged over the tokens of the probe batch (at most [`MAX_TOKENS`] of them, evenly
//! spaced: an n x n eigenproblem a token on the host, for every sublayer of every
//! evaluation); recorded as `streams/cos/l{i}` and `streams/rank/l{i}`.

use candle_core::{DType, Result, Tensor};
use components::linalg::symmetric_eigenvalues;

/// The tokens of the probe batch the statistics average over, at most.
pub const MAX_TOKENS: usize = 1024;

/// (mean pairwise cosine, effective rank) of a state (B, T, n, C), averaged over the tokens;
/// `None` for one stream.
pub fn stream_stats(state: &Tensor) -> Result<Option<(f64, f64)>> {
    let (b, t, n, c) = state.dims4()?;
    if n < 2 {
        return Ok(None);
    }
    // Gram matrices per token (B T, n, n): the streams' dot products, in f64 (the smallest
    // singular values are square roots of eigenvalues: f32 rounding would show as rank).
    let mut s = state.reshape((b * t, n, c))?;
    if b * t > MAX_TOKENS {
        let stride = (b * t).div_ceil(MAX_TOKENS);
        let picked: Vec<u32> = (0..b * t).step_by(stride).map(|i| i as u32).collect();
        let ids = Tensor::new(picked.as_slice(), state.device())?;
        s = s.index_select(&ids, 0)?;
    }
    let s = s.to_dtype(DType::F64)?;
    let gram = s.matmul(&s.t()?.contiguous()?)?;
    let grams: Vec<Vec<Vec<f64>>> = gram.to_vec3()?;
    let (mut cos_sum, mut rank_sum) = (0.0, 0.0);
    for g in &grams {
        let norms: Vec<f64> = (0..n).map(|i| g[i][i].max(0.0).sqrt()).collect();
        let mut pair = 0.0;
        for i in 0..n {
            for j in i + 1..n {
                pair += g[i][j] / (norms[i] * norms[j]).max(1e-30);
            }
        }
        cos_sum += pair / (n * (n - 1) / 2) as f64;
        rank_sum += effective_rank(g.clone());
    }
    let tokens = grams.len() as f64;
    Ok(Some((cos_sum / tokens, rank_sum / tokens)))
}

/// exp(-sum p ln p) of the singular values p (normalized to sum 1) of a matrix whose Gram
/// matrix is `gram`; 0 for the zero matrix.
pub fn effective_rank(gram: Vec<Vec<f64>>) -> f64 {
    let sv: Vec<f64> = symmetric_eigenvalues(gram)
        .into_iter()
        .map(|e| e.max(0.0).sqrt())
        .collect();
    let total: f64 = sv.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = sv
        .iter()
        .map(|s| s / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    h.exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Seeded normal values (candle's CPU RNG cannot be seeded).
    fn randn(seed: u64, shape: impl Into<candle_core::Shape>, std: f64) -> Result<Tensor> {
        let p = registry::ParamBuilder::new(seed, &Device::Cpu);
        p.tensor(
            "x",
            shape,
            registry::Init::Normal { std },
            registry::Role::Hidden,
        )
        .map(|t| t.detach())
    }

    #[test]
    fn identical_streams_give_cosine_one_and_rank_one() -> Result<()> {
        // Each token's 4 streams are one random vector, scaled: cosine 1, one singular value.
        let one = randn(1, (2, 3, 1, 64), 1.0)?;
        let scales = Tensor::new(&[1f32, 2.0, 0.5, 3.0], &Device::Cpu)?.reshape((1, 1, 4, 1))?;
        let state = one.broadcast_mul(&scales)?;
        let (cos, rank) = stream_stats(&state)?.unwrap();
        assert!((cos - 1.0).abs() < 1e-6, "{cos}");
        assert!((rank - 1.0).abs() < 1e-4, "{rank}");
        Ok(())
    }

    #[test]
    fn independent_random_streams_give_cosine_near_zero_and_rank_near_n() -> Result<()> {
        // 4 independent Gaussian streams of 4096 channels: cosines ~ N(0, 1/4096), so their
        // mean is within a few hundredths of 0; singular values nearly equal, rank ~ 4.
        let state = randn(2, (2, 8, 4, 4096), 1.0)?;
        let (cos, rank) = stream_stats(&state)?.unwrap();
        assert!(cos.abs() < 0.02, "{cos}");
        assert!(rank > 3.95 && rank <= 4.0 + 1e-9, "{rank}");
        Ok(())
    }

    #[test]
    fn a_large_batch_is_sampled_evenly() -> Result<()> {
        // 2 x 1500 tokens: every third is taken (0, 3, 6, ...: 1000 of them), alternately at
        // even positions, whose two streams are identical (cosine 1, rank 1), and odd ones,
        // whose streams are orthogonal (cosine 0, rank 2): means 0.5 and 1.5.
        let mut v = Vec::new();
        for tok in 0..3000 {
            let (a, b) = if tok % 2 == 0 {
                ([1f32, 0.0], [1f32, 0.0])
            } else {
                ([1f32, 0.0], [0f32, 1.0])
            };
            v.extend(a);
            v.extend(b);
        }
        let state = Tensor::from_vec(v, (2, 1500, 2, 2), &Device::Cpu)?;
        let (cos, rank) = stream_stats(&state)?.unwrap();
        assert!((cos - 0.5).abs() < 1e-9, "{cos}");
        assert!((rank - 1.5).abs() < 1e-6, "{rank}");
        Ok(())
    }

    #[test]
    fn effective_rank_by_hand() {
        // Singular values (3, 1): p = (0.75, 0.25), H = 0.5623, exp(H) = 1.7548.
        let r = effective_rank(vec![vec![9.0, 0.0], vec![0.0, 1.0]]);
        assert!((r - 1.754765).abs() < 1e-5, "{r}");
        assert_eq!(effective_rank(vec![vec![0.0, 0.0], vec![0.0, 0.0]]), 0.0);
        // One stream: nothing to compare.
        let single = randn(3, (1, 2, 1, 8), 1.0).unwrap();
        assert!(stream_stats(&single).unwrap().is_none());
    }
}
