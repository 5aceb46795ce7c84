//! mHC's per-token coefficients (residual/mhc.rs) from the normed projection's logits z, as
//! two ops, one kernel each way: the read-out weights
//!   pre = sigmoid(a_pre z_pre + b_pre)                                  (N, n)
//! and the write-back with the carried mixing, side by side as the post-mix takes them,
//!   coef = [res | post] (N, n, n + 1), post = 2 sigmoid(a_post z_post + b_post),
//!   res = Sinkhorn(a_res z_res + b_res).
//! As a composite these are some twenty small launches forward and a hundred backward a
//! sublayer (scales, biases, the sigmoids' tanh, narrows, the cat of res and post, and their
//! gradients, each zero-filled and added by candle's gradient store), which at the widths most
//! sweeps run at cost more host time than the sublayer's products.
//!
//! z is read as rows of w >= 2n + n^2 values (the projection's z_ext, whose last column r is
//! not a logit, as it is) and the parameters as one packed vector
//! p = [a (3) | b_pre (n) | b_post (n) | b_res (n^2)], so that each op has two inputs. The
//! backward ops write a row of w + P per token, z's gradient (zero past the op's columns) then
//! the token's part of p's, which the caller sums over tokens.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::cpu_values;
use super::sinkhorn::{sinkhorn_backward, sinkhorn_forward, SINKHORN_MAX_ITERS};

/// Most streams the kernels take (Sinkhorn's, one thread a token).
pub const MHC_COEF_MAX_STREAMS: usize = super::SINKHORN_MAX_STREAMS;

/// Which coefficients: the read-out `pre`, or `[res | post]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoefPart {
    Pre,
    Res,
}

/// (z (N, w) f32, p (P,) f32) -> pre (N, n) or coef (N, n, n + 1).
#[derive(Clone, Copy, Debug)]
pub struct MhcCoef {
    pub part: CoefPart,
    pub n: usize,
    pub iters: usize,
}

/// (z, p, dout) -> (N, w + P): z's gradient, then each token's part of p's.
#[derive(Clone, Copy, Debug)]
pub struct MhcCoefBwd(pub MhcCoef);

/// Packed parameters' length for n streams.
pub fn packed_len(n: usize) -> usize {
    3 + 2 * n + n * n
}

fn sigmoid(v: f32) -> f32 {
    0.5 * ((0.5 * v).tanh() + 1.0)
}

impl MhcCoef {
    /// (N, w) of z, checked against n, the rounds and p.
    fn dims(&self, lz: &Layout, lp: &Layout) -> Result<(usize, usize)> {
        let n = self.n;
        let (rows, w) = match lz.dims() {
            &[rows, w] => (rows, w),
            d => bail!("mhc coefficients: z must be (N, w), got {d:?}"),
        };
        if n == 0 || n > MHC_COEF_MAX_STREAMS || w < 2 * n + n * n {
            bail!(
                "mhc coefficients: {n} streams (at most {MHC_COEF_MAX_STREAMS}) from rows of {w}"
            );
        }
        if self.iters == 0 || self.iters > SINKHORN_MAX_ITERS {
            bail!(
                "mhc coefficients: 1 to {SINKHORN_MAX_ITERS} rounds, got {}",
                self.iters
            );
        }
        if lp.dims() != [packed_len(n)] {
            bail!("mhc coefficients: p {:?} for {n} streams", lp.dims());
        }
        Ok((rows, w))
    }

    fn out_shape(&self, rows: usize) -> Shape {
        match self.part {
            CoefPart::Pre => Shape::from((rows, self.n)),
            CoefPart::Res => Shape::from((rows, self.n, self.n + 1)),
        }
    }

    /// One token's output from its logits row z.
    fn token(&self, z: &[f32], p: &[f32]) -> Vec<f32> {
        let n = self.n;
        match self.part {
            CoefPart::Pre => (0..n).map(|i| sigmoid(p[0] * z[i] + p[3 + i])).collect(),
            CoefPart::Res => {
                let res = sinkhorn_forward(&self.res_logits(z, p), n, self.iters);
                let mut c = vec![0f32; n * (n + 1)];
                for i in 0..n {
                    c[i * (n + 1)..][..n].copy_from_slice(&res[i * n..][..n]);
                    c[i * (n + 1) + n] = 2.0 * sigmoid(p[1] * z[n + i] + p[3 + n + i]);
                }
                c
            }
        }
    }

    fn res_logits(&self, z: &[f32], p: &[f32]) -> Vec<f32> {
        let n = self.n;
        (0..n * n)
            .map(|q| p[2] * z[2 * n + q] + p[3 + 2 * n + q])
            .collect()
    }

    /// One token's row of w + P: dz, then its part of dp.
    fn token_bwd(&self, z: &[f32], p: &[f32], dout: &[f32]) -> Vec<f32> {
        let (n, w) = (self.n, z.len());
        let mut o = vec![0f32; w + packed_len(n)];
        match self.part {
            CoefPart::Pre => {
                for i in 0..n {
                    let s = sigmoid(p[0] * z[i] + p[3 + i]);
                    let dl = dout[i] * s * (1.0 - s);
                    o[i] = p[0] * dl;
                    o[w] += dl * z[i];
                    o[w + 3 + i] = dl;
                }
            }
            CoefPart::Res => {
                let dres: Vec<f32> = (0..n * n)
                    .map(|q| dout[(q / n) * (n + 1) + q % n])
                    .collect();
                let dl = sinkhorn_backward(&self.res_logits(z, p), &dres, n, self.iters);
                for i in 0..n {
                    let s = sigmoid(p[1] * z[n + i] + p[3 + n + i]);
                    let d = dout[i * (n + 1) + n] * 2.0 * s * (1.0 - s);
                    o[n + i] = p[1] * d;
                    o[w + 1] += d * z[n + i];
                    o[w + 3 + n + i] = d;
                }
                for (q, &d) in dl.iter().enumerate() {
                    o[2 * n + q] = p[2] * d;
                    o[w + 2] += d * z[2 * n + q];
                    o[w + 3 + 2 * n + q] = d;
                }
            }
        }
        o
    }

    /// The output's width per token.
    fn width(&self) -> usize {
        match self.part {
            CoefPart::Pre => self.n,
            CoefPart::Res => self.n * (self.n + 1),
        }
    }
}

impl CustomOp2 for MhcCoef {
    fn name(&self) -> &'static str {
        "mhc-coef"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, w) = self.dims(l1, l2)?;
        let (z, _) = cpu_values(s1, l1, self.name())?;
        let (p, _) = cpu_values(s2, l2, self.name())?;
        let out = z.chunks(w).flat_map(|zr| self.token(zr, &p)).collect();
        Ok((CpuStorage::F32(out), self.out_shape(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, w) = self.dims(l1, l2)?;
        let out = super::cuda::mhc_coef(self, (s1, l1), (s2, l2), None, rows, w)?;
        Ok((out, self.out_shape(rows)))
    }

    fn bwd(
        &self,
        z: &Tensor,
        p: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let w = z.dim(1)?;
        let both = z.apply_op3_no_bwd(p, &grad.contiguous()?, &MhcCoefBwd(*self))?;
        let dp = both.narrow(1, w, packed_len(self.n))?.sum(0)?;
        Ok((Some(both.narrow(1, 0, w)?), Some(dp)))
    }
}

impl CustomOp3 for MhcCoefBwd {
    fn name(&self) -> &'static str {
        "mhc-coef-bwd"
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
        let op = self.0;
        let (rows, w) = op.dims(l1, l2)?;
        check_dout(&op, rows, l3)?;
        let (z, _) = cpu_values(s1, l1, self.name())?;
        let (p, _) = cpu_values(s2, l2, self.name())?;
        let (d, _) = cpu_values(s3, l3, self.name())?;
        let out = z
            .chunks(w)
            .zip(d.chunks(op.width()))
            .flat_map(|(zr, dr)| op.token_bwd(zr, &p, dr))
            .collect();
        Ok((
            CpuStorage::F32(out),
            Shape::from((rows, w + packed_len(op.n))),
        ))
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
        let op = self.0;
        let (rows, w) = op.dims(l1, l2)?;
        check_dout(&op, rows, l3)?;
        let out = super::cuda::mhc_coef(&op, (s1, l1), (s2, l2), Some((s3, l3)), rows, w)?;
        Ok((out, Shape::from((rows, w + packed_len(op.n)))))
    }
}

/// The output gradient must hold the op's output for every row.
fn check_dout(op: &MhcCoef, rows: usize, l: &Layout) -> Result<()> {
    if l.shape().elem_count() != rows * op.width() {
        bail!(
            "mhc coefficients backward: a gradient {:?} for {rows} rows of {}",
            l.dims(),
            op.width()
        );
    }
    Ok(())
}

/// [pre (B, T, n), coef (B, T, n, n + 1)] from the logits z (B T, w) and the parameters, on
/// the op's path (see the module's text).
pub fn mhc_coefficients(
    z: &Tensor,
    p: &Tensor,
    (b, t, n): (usize, usize, usize),
    iters: usize,
) -> Result<(Tensor, Tensor)> {
    let op = |part| MhcCoef { part, n, iters };
    let pre = z.apply_op2(p, op(CoefPart::Pre))?.reshape((b, t, n))?;
    let coef = z
        .apply_op2(p, op(CoefPart::Res))?
        .reshape((b, t, n, n + 1))?;
    Ok((pre, coef))
}

/// p = [a (3) | b_pre (n) | b_post (n) | b_res (n^2)].
pub fn pack_params(a: &Tensor, b_pre: &Tensor, b_post: &Tensor, b_res: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[a, b_pre, b_post, &b_res.flatten_all()?], D::Minus1)
}
