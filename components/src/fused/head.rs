//! Attention head preparation as one op: a query or key projection (B, T, n hd) becomes heads
//! (B, n, T, hd), RMS-normalized (QK-norm) and rotated (RoPE). As a composite that is a
//! reshape, a transpose and copy, eight kernels of norm and seven of rotation, each over a
//! tensor the size of the layer's activations, forward and backward.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values};

/// (y (B, T, n hd) or rows (B T, n hd), rot (2, T, hd) f32 = cos and sin) -> heads
/// (B, n, T, hd).
#[derive(Clone, Copy, Debug)]
pub struct HeadPrep {
    /// T, the sequence length.
    pub seq: usize,
    pub heads: usize,
    pub norm: bool,
    pub eps: f32,
}

/// (y, rot, dL/dheads) -> dL/dy of [`HeadPrep`].
#[derive(Clone, Copy, Debug)]
pub struct HeadPrepBwd(pub HeadPrep);

/// (b, t, n, hd), checked against the tables.
fn dims(op: &HeadPrep, ly: &Layout, lrot: &Layout) -> Result<(usize, usize, usize, usize)> {
    let width = *ly.dims().last().unwrap_or(&0);
    let (t, n) = (op.seq, op.heads);
    let tokens = ly.shape().elem_count() / width.max(1);
    if t == 0 || !tokens.is_multiple_of(t) {
        bail!("head prep: {tokens} tokens are not sequences of {t}");
    }
    let b = tokens / t;
    if n == 0 || !width.is_multiple_of(n) || !(width / n).is_multiple_of(2) {
        bail!("head prep: width {width} is not {n} heads of an even size");
    }
    let hd = width / n;
    if lrot.dims() != [2, t, hd] {
        bail!(
            "head prep: tables {:?}, expected [2, {t}, {hd}]",
            lrot.dims()
        );
    }
    Ok((b, t, n, hd))
}

impl HeadPrep {
    /// Per (b, tok, h): the row of y, its scale r and the tables at tok.
    fn cpu(
        &self,
        y: &[f32],
        rot: &[f32],
        (b, t, n, hd): (usize, usize, usize, usize),
        mut f: impl FnMut(usize, usize, &[f32], f32, &[f32], &[f32]),
    ) {
        for bi in 0..b {
            for tok in 0..t {
                for h in 0..n {
                    let row = (bi * t + tok) * n + h;
                    let x = &y[row * hd..][..hd];
                    let r = if self.norm {
                        let ms = x.iter().map(|v| v * v).sum::<f32>() / hd as f32;
                        1.0 / (ms + self.eps).sqrt()
                    } else {
                        1.0
                    };
                    let cs = &rot[tok * hd..][..hd];
                    let sn = &rot[(t + tok) * hd..][..hd];
                    f(row, ((bi * n + h) * t + tok) * hd, x, r, cs, sn);
                }
            }
        }
    }
}

impl CustomOp2 for HeadPrep {
    fn name(&self) -> &'static str {
        "head-prep"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d @ (b, t, n, hd) = dims(self, l1, l2)?;
        let (y, dtype) = cpu_values(s1, l1, self.name())?;
        let (rot, _) = cpu_values(s2, l2, self.name())?;
        let mut out = vec![0f32; y.len()];
        let half = hd / 2;
        self.cpu(&y, &rot, d, |_, o, x, r, cs, sn| {
            for i in 0..half {
                let (a, c) = (x[i] * r, x[i + half] * r);
                out[o + i] = a * cs[i] - c * sn[i];
                out[o + i + half] = c * cs[i + half] + a * sn[i + half];
            }
        });
        Ok((cpu_storage(out, dtype), Shape::from((b, n, t, hd))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d @ (b, t, n, hd) = dims(self, l1, l2)?;
        let out = super::cuda::head_prep(s1, l1, s2, l2, None, d, self.norm, self.eps)?;
        Ok((out, Shape::from((b, n, t, hd))))
    }

    fn bwd(
        &self,
        y: &Tensor,
        rot: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = y.apply_op3_no_bwd(rot, &grad.contiguous()?, &HeadPrepBwd(*self))?;
        Ok((Some(dy), None))
    }
}

impl CustomOp3 for HeadPrepBwd {
    fn name(&self) -> &'static str {
        "head-prep-bwd"
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
        let op = &self.0;
        let d @ (_, _, _, hd) = dims(op, l1, l2)?;
        let (y, dtype) = cpu_values(s1, l1, self.name())?;
        let (rot, _) = cpu_values(s2, l2, self.name())?;
        let (g, _) = cpu_values(s3, l3, self.name())?;
        let mut dy = vec![0f32; y.len()];
        let half = hd / 2;
        op.cpu(&y, &rot, d, |row, o, x, r, cs, sn| {
            // The rotation's transpose: dL/d(normalized x).
            let mut dn = vec![0f32; hd];
            for i in 0..half {
                let (g1, g2) = (g[o + i], g[o + i + half]);
                dn[i] = g1 * cs[i] + g2 * sn[i + half];
                dn[i + half] = -g1 * sn[i] + g2 * cs[i + half];
            }
            let dot = (0..hd).map(|i| dn[i] * x[i] * r).sum::<f32>() / hd as f32;
            for i in 0..hd {
                dy[row * hd + i] = if op.norm {
                    r * (dn[i] - x[i] * r * dot)
                } else {
                    dn[i]
                };
            }
        });
        Ok((cpu_storage(dy, dtype), l1.shape().clone()))
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
        let op = &self.0;
        let d = dims(op, l1, l2)?;
        let out = super::cuda::head_prep(s1, l1, s2, l2, Some((s3, l3)), d, op.norm, op.eps)?;
        Ok((out, l1.shape().clone()))
    }
}
