//! mHC's Sinkhorn-Knopp projection (residual/mod.rs `sinkhorn`) as one op: as a composite it is
//! four small kernels a round, twenty rounds, forward and again backward, for each of the
//! model's 2 L connections; here one thread per token does all rounds. The backward pass
//! recomputes the rounds and runs them in reverse (sk_forward and sinkhorn_bwd in fused.cu,
//! and the same arithmetic below for the CPU).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::cpu_values;

/// The fused kernels' limits: streams and rounds.
pub const SINKHORN_MAX_STREAMS: usize = 4;
pub const SINKHORN_MAX_ITERS: usize = 32;

/// Logits (.., n, n) f32 -> doubly stochastic (.., n, n).
#[derive(Clone, Copy, Debug)]
pub struct Sinkhorn {
    pub iters: usize,
}

/// (logits, dL/dout) -> dL/dlogits of [`Sinkhorn`].
#[derive(Clone, Copy, Debug)]
pub struct SinkhornBwd {
    pub iters: usize,
}

/// (tokens, n) of a logits layout, within the kernels' limits.
fn dims(l: &Layout, iters: usize) -> Result<(usize, usize)> {
    let d = l.dims();
    let n = *d.last().unwrap_or(&0);
    if d.len() < 2 || d[d.len() - 2] != n || n == 0 || n > SINKHORN_MAX_STREAMS {
        bail!("sinkhorn: logits (.., n, n) with n <= {SINKHORN_MAX_STREAMS}, got {d:?}");
    }
    if iters == 0 || iters > SINKHORN_MAX_ITERS {
        bail!("sinkhorn: 1 to {SINKHORN_MAX_ITERS} rounds, got {iters}");
    }
    Ok((l.shape().elem_count() / (n * n), n))
}

/// One round's matrices and sums, kept for the backward pass.
struct Round {
    c: Vec<f32>,
    colsum: Vec<f32>,
    m: Vec<f32>,
    rowsum: Vec<f32>,
}

/// The forward of one token: (exp(a), m0, rounds, result).
fn forward(l: &[f32], n: usize, iters: usize) -> (Vec<f32>, Vec<f32>, Vec<Round>, Vec<f32>) {
    let lse = |v: &mut dyn Iterator<Item = f32>| -> f32 {
        let v: Vec<f32> = v.collect();
        let mx = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        mx + v.iter().map(|x| (x - mx).exp()).sum::<f32>().ln()
    };
    let mut a = vec![0f32; n * n];
    for j in 0..n {
        let s = lse(&mut (0..n).map(|i| l[i * n + j]));
        for i in 0..n {
            a[i * n + j] = l[i * n + j] - s;
        }
    }
    let a_exp: Vec<f32> = a.iter().map(|x| x.exp()).collect();
    let mut m0 = vec![0f32; n * n];
    for i in 0..n {
        let s = lse(&mut (0..n).map(|j| a[i * n + j]));
        for j in 0..n {
            m0[i * n + j] = (a[i * n + j] - s).exp();
        }
    }
    let mut rounds: Vec<Round> = Vec::with_capacity(iters.saturating_sub(1));
    let mut prev = m0.clone();
    for _ in 1..iters {
        let colsum: Vec<f32> = (0..n)
            .map(|j| (0..n).map(|i| prev[i * n + j]).sum())
            .collect();
        let c: Vec<f32> = (0..n * n).map(|q| prev[q] / colsum[q % n]).collect();
        let rowsum: Vec<f32> = (0..n).map(|i| c[i * n..][..n].iter().sum()).collect();
        let m: Vec<f32> = (0..n * n).map(|q| c[q] / rowsum[q / n]).collect();
        prev = m.clone();
        rounds.push(Round {
            c,
            colsum,
            m,
            rowsum,
        });
    }
    (a_exp, m0, rounds, prev)
}

/// One token's doubly stochastic matrix from its logits (the CPU's arithmetic of the kernels).
pub(super) fn sinkhorn_forward(l: &[f32], n: usize, iters: usize) -> Vec<f32> {
    forward(l, n, iters).3
}

/// One token's logits' gradient from the result's, the rounds recomputed and run in reverse.
pub(super) fn sinkhorn_backward(l: &[f32], dout: &[f32], n: usize, iters: usize) -> Vec<f32> {
    let (a_exp, m0, rounds, _) = forward(l, n, iters);
    let mut g = dout.to_vec();
    for r in rounds.iter().rev() {
        for i in 0..n {
            let d: f32 = (0..n).map(|j| g[i * n + j] * r.m[i * n + j]).sum();
            for j in 0..n {
                g[i * n + j] = (g[i * n + j] - d) / r.rowsum[i];
            }
        }
        for j in 0..n {
            let d: f32 = (0..n).map(|i| g[i * n + j] * r.c[i * n + j]).sum();
            for i in 0..n {
                g[i * n + j] = (g[i * n + j] - d) / r.colsum[j];
            }
        }
    }
    for i in 0..n {
        let mut s = 0.0;
        for j in 0..n {
            g[i * n + j] *= m0[i * n + j];
            s += g[i * n + j];
        }
        for j in 0..n {
            g[i * n + j] -= m0[i * n + j] * s;
        }
    }
    let mut dl = vec![0f32; n * n];
    for j in 0..n {
        let s: f32 = (0..n).map(|i| g[i * n + j]).sum();
        for i in 0..n {
            dl[i * n + j] = g[i * n + j] - a_exp[i * n + j] * s;
        }
    }
    dl
}

impl CustomOp1 for Sinkhorn {
    fn name(&self) -> &'static str {
        "sinkhorn"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, n) = dims(l, self.iters)?;
        let (x, _) = cpu_values(s, l, self.name())?;
        let out = x
            .chunks(n * n)
            .flat_map(|t| sinkhorn_forward(t, n, self.iters))
            .collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (tokens, n) = dims(l, self.iters)?;
        let out = super::cuda::sinkhorn(s, l, None, tokens, n, self.iters)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = SinkhornBwd { iters: self.iters };
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

impl CustomOp2 for SinkhornBwd {
    fn name(&self) -> &'static str {
        "sinkhorn-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, n) = dims(l1, self.iters)?;
        let (x, _) = cpu_values(s1, l1, self.name())?;
        let (g, _) = cpu_values(s2, l2, self.name())?;
        let out = x
            .chunks(n * n)
            .zip(g.chunks(n * n))
            .flat_map(|(t, d)| sinkhorn_backward(t, d, n, self.iters))
            .collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (tokens, n) = dims(l1, self.iters)?;
        let out = super::cuda::sinkhorn(s1, l1, Some((s2, l2)), tokens, n, self.iters)?;
        Ok((out, l1.shape().clone()))
    }
}
