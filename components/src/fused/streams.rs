//! mHC's and HC's stream axis collapsed and grown (residual/mod.rs `merge` and `replicate`):
//! the mean of a state's n streams (B, T, n, C) -> (B, T, C), and the embedding copied to n
//! streams. Each is the other's backward (the mean's gradient spread at 1 / n, the copy's
//! summed). On the GPU candle's reduction over a size-n axis and its strided broadcast copy
//! take several times a pass over the state (0.5 and 0.7 ms a step at the Goedel-1B shape,
//! and their gradients more); here each is one pass (fused.cu `streams_sum`, `streams_spread`).

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values};

/// Sum the streams of (.., n, C) into (.., C), or spread (.., C) over n streams (.., n, C);
/// then times `scale`.
#[derive(Clone, Copy, Debug)]
pub struct Streams {
    pub spread: bool,
    pub n: usize,
    pub scale: f32,
}

impl Streams {
    /// (tokens, C) of the input, and the output's shape.
    fn dims(&self, l: &Layout) -> Result<(usize, usize, Shape)> {
        let d = l.dims();
        let n = self.n;
        let ok = n > 0
            && match self.spread {
                true => !d.is_empty(),
                false => d.len() >= 2 && d[d.len() - 2] == n,
            };
        if !ok {
            bail!("streams: {d:?} for {n} streams (summed from (.., n, C) or spread from (.., C))");
        }
        let c = d[d.len() - 1];
        let mut out = d.to_vec();
        match self.spread {
            true => out.insert(d.len() - 1, n),
            false => {
                out.remove(d.len() - 2);
            }
        }
        let tokens = match self.spread {
            true => l.shape().elem_count() / c.max(1),
            false => l.shape().elem_count() / (n * c).max(1),
        };
        Ok((tokens, c, Shape::from(out)))
    }
}

impl CustomOp1 for Streams {
    fn name(&self) -> &'static str {
        "streams"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (tokens, c, shape) = self.dims(l)?;
        let (x, dtype) = cpu_values(s, l, self.name())?;
        let n = self.n;
        let mut y = vec![
            0f32;
            if self.spread {
                tokens * n * c
            } else {
                tokens * c
            }
        ];
        for t in 0..tokens {
            for i in 0..n {
                for q in 0..c {
                    match self.spread {
                        true => y[(t * n + i) * c + q] = x[t * c + q] * self.scale,
                        false => y[t * c + q] += x[(t * n + i) * c + q],
                    }
                }
            }
        }
        if !self.spread {
            y.iter_mut().for_each(|v| *v *= self.scale);
        }
        Ok((cpu_storage(y, dtype), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (tokens, c, shape) = self.dims(l)?;
        let y = super::cuda::streams(s, l, self.spread, (tokens, self.n, c), self.scale)?;
        Ok((y, shape))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Streams {
            spread: !self.spread,
            ..*self
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}
