//! The two coefficient ops' backward rows (stream_coef.rs) turned into the gradients of the
//! logits and of the packed parameters in one op: dz = a[:, :w] + b[:, :w] and dp = the
//! column sums of a[:, w:] + b[:, w:] over the tokens. As candle's ops that was two strided
//! sums over the tokens (10 us each at d_model 384's 8192 tokens, one block a column) and two
//! adds, four launches a sublayer; here one kernel writes dz and a partial sum of dp per
//! block of tokens, and a second adds the partials in a fixed order, so the sums come out
//! the same at every run.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::cpu_values;
use super::stream_coef::{CoefPart, Scheme, StreamCoef, StreamCoefBwd};

/// (a, b), both (rows, w + P) f32 -> [dp (P) | dz (rows w)] as one vector, f32: dp first,
/// so that the parameters' gradients cut from it start where their storage does, as the
/// step's multi-tensor kernels take them (runner's `Gpt::gradients` copies any other).
#[derive(Clone, Copy, Debug)]
pub struct CoefGrads {
    /// The logits' columns w; the rest of a row are the parameters'.
    pub w: usize,
}

impl CoefGrads {
    fn dims(&self, la: &Layout, lb: &Layout) -> Result<(usize, usize)> {
        let (rows, width) = la.shape().dims2()?;
        if la.shape() != lb.shape() || width <= self.w {
            bail!(
                "coefficient gradients: rows {:?} and {:?} for {} logit columns",
                la.dims(),
                lb.dims(),
                self.w
            );
        }
        Ok((rows, width - self.w))
    }
}

impl CustomOp2 for CoefGrads {
    fn name(&self) -> &'static str {
        "coef-grads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, np) = self.dims(l1, l2)?;
        let (a, _) = cpu_values(s1, l1, self.name())?;
        let (b, _) = cpu_values(s2, l2, self.name())?;
        let w = self.w;
        let mut out = vec![0f32; np + rows * w];
        let (dp, dz) = out.split_at_mut(np);
        for ((ra, rb), dzr) in a.chunks(w + np).zip(b.chunks(w + np)).zip(dz.chunks_mut(w)) {
            for (c, d) in dzr.iter_mut().enumerate() {
                *d = ra[c] + rb[c];
            }
            for (c, d) in dp.iter_mut().enumerate() {
                *d += ra[w + c] + rb[w + c];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(rows * w + np)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, np) = self.dims(l1, l2)?;
        let out = super::cuda::coef_grads((s1, l1), Some((s2, l2)), rows, self.w, np)?;
        Ok((out, Shape::from(rows * self.w + np)))
    }
}

/// (rows, P) f32 -> its column sums (P): static HC's coefficient gradients summed over the
/// tokens, on the GPU by [`CoefGrads`]'s kernels, where candle's sum took a block a column.
#[derive(Clone, Copy, Debug)]
pub struct TokenSums;

impl CustomOp1 for TokenSums {
    fn name(&self) -> &'static str {
        "token-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, np) = l.shape().dims2()?;
        let (a, _) = cpu_values(s, l, self.name())?;
        let mut out = vec![0f32; np];
        for row in a.chunks(np) {
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(np)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, np) = l.shape().dims2()?;
        let out = super::cuda::coef_grads((s, l), None, rows, 0, np)?;
        Ok((out, Shape::from(np)))
    }
}

/// The gradients of the logits z (rows, w) and of the packed parameters p from those of both
/// coefficient ops' outputs, dpre (rows n) and dcoef (rows n (n + 1)): their backward rows,
/// then [`CoefGrads`]. Outside the graph.
pub fn stream_coef_backward(
    z: &Tensor,
    p: &Tensor,
    (scheme, n): (Scheme, usize),
    dpre: &Tensor,
    dcoef: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (rows, w) = z.dims2()?;
    let rows_of = |part, d: &Tensor| -> Result<Tensor> {
        let op = StreamCoefBwd(StreamCoef { scheme, part, n });
        z.apply_op3_no_bwd(p, &d.contiguous()?, &op)
    };
    let a = rows_of(CoefPart::Pre, dpre)?;
    let b = rows_of(CoefPart::Res, dcoef)?;
    let both = a.apply_op2_no_bwd(&b, &CoefGrads { w })?;
    let np = scheme.packed_len(n);
    let dp = both.narrow(0, 0, np)?;
    let dz = both.narrow(0, np, rows * w)?.reshape((rows, w))?;
    Ok((dz, dp))
}
