//! The multi-stream schemes' per-token coefficients from their normed projection's logits z,
//! as two ops, one kernel each way: the read-out weights pre (N, n), and the write-back with
//! the carried mixing side by side as the post-mix takes them, coef = [res | post]
//! (N, n, n + 1). For mHC (residual/mhc.rs), from rows of w >= 2n + n^2 logits a token:
//!   pre = sigmoid(a_pre z_pre + b_pre), post = 2 sigmoid(a_post z_post + b_post),
//!   res = Sinkhorn(a_res z_res + b_res);
//! for dynamic HC (residual/hc.rs), from n stream rows of w >= n + 2 logits a token (z as
//! (N, n w)), with u = tanh(z):
//!   pre_i = s_alpha u_i0 + a_m_i, post_j = s_beta u_j1 + b_j,
//!   res_ji = A_r[i][j] = s_alpha u_i(2+j) + a_r[i][j].
//! As composites these are some twenty small launches forward and a hundred backward a
//! sublayer (scales, biases, tanh, narrows, the cat of res and post, and their gradients,
//! each zero-filled and added by candle's gradient store), which at the widths most sweeps
//! run at cost more host time than the sublayer's products.
//!
//! z is read as its rows are (the projection's z_ext, whose last column r is not a logit) and
//! the parameters as one packed vector, p = [a (3) | b_pre (n) | b_post (n) | b_res (n^2)]
//! (mHC) or [s_alpha | s_beta | a_m (n) | b (n) | a_r (n^2)] (HC), so that each op has two
//! inputs. The backward ops write a row of W + P per token, z's gradient (zero past the op's
//! columns) then the token's part of p's, which the caller sums over tokens.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::cpu_values;
use super::sinkhorn::{sinkhorn_backward, sinkhorn_forward, SINKHORN_MAX_ITERS};

/// Most streams the kernels take: mHC's Sinkhorn (a thread or 16 a token) and HC's
/// (a thread a token, the mixing kernels' limit).
pub const MHC_COEF_MAX_STREAMS: usize = super::SINKHORN_MAX_STREAMS;
pub const HC_COEF_MAX_STREAMS: usize = super::MAX_STREAMS;

/// Which scheme's coefficients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Mhc { iters: usize },
    Hc,
}

/// Which coefficients: the read-out `pre`, or `[res | post]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoefPart {
    Pre,
    Res,
}

/// (z (N, W) f32, p (P,) f32) -> pre (N, n) or coef (N, n, n + 1).
#[derive(Clone, Copy, Debug)]
pub struct StreamCoef {
    pub scheme: Scheme,
    pub part: CoefPart,
    pub n: usize,
}

/// (z, p, dout) -> (N, W + P): z's gradient, then each token's part of p's.
#[derive(Clone, Copy, Debug)]
pub struct StreamCoefBwd(pub StreamCoef);

impl Scheme {
    /// Packed parameters' length for n streams.
    pub fn packed_len(self, n: usize) -> usize {
        match self {
            Scheme::Mhc { .. } => 3 + 2 * n + n * n,
            Scheme::Hc => 2 + 2 * n + n * n,
        }
    }

    /// The logits a token's row must hold at least.
    fn min_width(self, n: usize) -> usize {
        match self {
            Scheme::Mhc { .. } => 2 * n + n * n,
            Scheme::Hc => n * (n + 2),
        }
    }
}

fn sigmoid(v: f32) -> f32 {
    0.5 * ((0.5 * v).tanh() + 1.0)
}

impl StreamCoef {
    /// (N, W) of z, checked against n, the rounds and p.
    fn dims(&self, lz: &Layout, lp: &Layout) -> Result<(usize, usize)> {
        let n = self.n;
        let (rows, w) = match lz.dims() {
            &[rows, w] => (rows, w),
            d => bail!("stream coefficients: z must be (N, W), got {d:?}"),
        };
        let most = match self.scheme {
            Scheme::Mhc { .. } => MHC_COEF_MAX_STREAMS,
            Scheme::Hc => HC_COEF_MAX_STREAMS,
        };
        let whole = self.scheme == Scheme::Hc && n > 0 && w % n != 0;
        if n == 0 || n > most || w < self.scheme.min_width(n) || whole {
            bail!("stream coefficients: {n} streams (at most {most}) from rows of {w}");
        }
        if let Scheme::Mhc { iters } = self.scheme {
            if iters == 0 || iters > SINKHORN_MAX_ITERS {
                bail!("stream coefficients: 1 to {SINKHORN_MAX_ITERS} rounds, got {iters}");
            }
        }
        if lp.dims() != [self.scheme.packed_len(n)] {
            bail!("stream coefficients: p {:?} for {n} streams", lp.dims());
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
        match (self.scheme, self.part) {
            (Scheme::Mhc { .. }, CoefPart::Pre) => {
                (0..n).map(|i| sigmoid(p[0] * z[i] + p[3 + i])).collect()
            }
            (Scheme::Mhc { iters }, CoefPart::Res) => {
                let res = sinkhorn_forward(&self.res_logits(z, p), n, iters);
                let mut c = vec![0f32; n * (n + 1)];
                for i in 0..n {
                    c[i * (n + 1)..][..n].copy_from_slice(&res[i * n..][..n]);
                    c[i * (n + 1) + n] = 2.0 * sigmoid(p[1] * z[n + i] + p[3 + n + i]);
                }
                c
            }
            (Scheme::Hc, CoefPart::Pre) => {
                let w = z.len() / n;
                (0..n).map(|i| p[0] * z[i * w].tanh() + p[2 + i]).collect()
            }
            (Scheme::Hc, CoefPart::Res) => {
                let w = z.len() / n;
                let mut c = vec![0f32; n * (n + 1)];
                for j in 0..n {
                    for i in 0..n {
                        c[j * (n + 1) + i] =
                            p[0] * z[i * w + 2 + j].tanh() + p[2 + 2 * n + i * n + j];
                    }
                    c[j * (n + 1) + n] = p[1] * z[j * w + 1].tanh() + p[2 + n + j];
                }
                c
            }
        }
    }

    /// mHC's Sinkhorn logits of one token.
    fn res_logits(&self, z: &[f32], p: &[f32]) -> Vec<f32> {
        let n = self.n;
        (0..n * n)
            .map(|q| p[2] * z[2 * n + q] + p[3 + 2 * n + q])
            .collect()
    }

    /// One token's row of W + P: dz, then its part of dp.
    fn token_bwd(&self, z: &[f32], p: &[f32], dout: &[f32]) -> Vec<f32> {
        let (n, w) = (self.n, z.len());
        let mut o = vec![0f32; w + self.scheme.packed_len(n)];
        match (self.scheme, self.part) {
            (Scheme::Mhc { .. }, CoefPart::Pre) => {
                for i in 0..n {
                    let s = sigmoid(p[0] * z[i] + p[3 + i]);
                    let dl = dout[i] * s * (1.0 - s);
                    o[i] = p[0] * dl;
                    o[w] += dl * z[i];
                    o[w + 3 + i] = dl;
                }
            }
            (Scheme::Mhc { iters }, CoefPart::Res) => {
                let dres: Vec<f32> = (0..n * n)
                    .map(|q| dout[(q / n) * (n + 1) + q % n])
                    .collect();
                let dl = sinkhorn_backward(&self.res_logits(z, p), &dres, n, iters);
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
            (Scheme::Hc, CoefPart::Pre) => {
                let r = w / n;
                for i in 0..n {
                    let u = z[i * r].tanh();
                    o[i * r] = p[0] * dout[i] * (1.0 - u * u);
                    o[w] += dout[i] * u;
                    o[w + 2 + i] = dout[i];
                }
            }
            (Scheme::Hc, CoefPart::Res) => {
                let r = w / n;
                for j in 0..n {
                    for i in 0..n {
                        let g = dout[j * (n + 1) + i];
                        let u = z[i * r + 2 + j].tanh();
                        o[i * r + 2 + j] = p[0] * g * (1.0 - u * u);
                        o[w] += g * u;
                        o[w + 2 + 2 * n + i * n + j] = g;
                    }
                    let g = dout[j * (n + 1) + n];
                    let u = z[j * r + 1].tanh();
                    o[j * r + 1] = p[1] * g * (1.0 - u * u);
                    o[w + 1] += g * u;
                    o[w + 2 + n + j] = g;
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

impl CustomOp2 for StreamCoef {
    fn name(&self) -> &'static str {
        "stream-coef"
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
        let out = super::cuda::stream_coef(self, (s1, l1), (s2, l2), None, rows, w)?;
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
        let both = z.apply_op3_no_bwd(p, &grad.contiguous()?, &StreamCoefBwd(*self))?;
        let dp = both.narrow(1, w, self.scheme.packed_len(self.n))?.sum(0)?;
        Ok((Some(both.narrow(1, 0, w)?), Some(dp)))
    }
}

impl CustomOp3 for StreamCoefBwd {
    fn name(&self) -> &'static str {
        "stream-coef-bwd"
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
            Shape::from((rows, w + op.scheme.packed_len(op.n))),
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
        let out = super::cuda::stream_coef(&op, (s1, l1), (s2, l2), Some((s3, l3)), rows, w)?;
        Ok((out, Shape::from((rows, w + op.scheme.packed_len(op.n)))))
    }
}

/// The output gradient must hold the op's output for every row.
fn check_dout(op: &StreamCoef, rows: usize, l: &Layout) -> Result<()> {
    if l.shape().elem_count() != rows * op.width() {
        bail!(
            "stream coefficients backward: a gradient {:?} for {rows} rows of {}",
            l.dims(),
            op.width()
        );
    }
    Ok(())
}

/// [pre (B, T, n), coef (B, T, n, n + 1)] from the logits z (B T, W) and the packed
/// parameters, on the ops' path (see the module's text).
pub fn stream_coefficients(
    z: &Tensor,
    p: &Tensor,
    (b, t, n): (usize, usize, usize),
    scheme: Scheme,
) -> Result<(Tensor, Tensor)> {
    let op = |part| StreamCoef { scheme, part, n };
    let pre = z.apply_op2(p, op(CoefPart::Pre))?.reshape((b, t, n))?;
    let coef = z
        .apply_op2(p, op(CoefPart::Res))?
        .reshape((b, t, n, n + 1))?;
    Ok((pre, coef))
}

/// The packed parameters: the tensors flattened, end to end.
pub fn pack_params(parts: &[&Tensor]) -> Result<Tensor> {
    let flat = parts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&flat, D::Minus1)
}
