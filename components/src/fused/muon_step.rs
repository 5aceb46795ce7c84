//! Muon's and NorMuon's element-wise work on a stack of same-shape matrices, in four kernels
//! around the Newton-Schulz products: the momentum (with its Nesterov look-ahead and the
//! Frobenius norms of the update, in one pass), the normalized bf16 input of the rounds, the
//! row sums of squares NorMuon's factors come from, and the weight update in place. As
//! composites these are some fifteen passes over the stack in f32, several of them candle's
//! broadcasting kernels (a per-row or per-matrix factor), which run at a fifth of the memory's
//! speed; on the 1B model they were most of the optimizer's time beside the products.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Result, Shape,
    Tensor,
};

use super::{cpu_f32s, cpu_f32s_mut, cpu_storage, cpu_values};

/// (momentum (k, R, C), g (k, R, C)), f32 -> flat [m' (k R C) | ss (k)]: m' = beta m + s g,
/// and ss the sum of squares of each matrix's update u = s g + beta m' (Nesterov) or m', with
/// s = `grad_scale` (gradient clipping's factor, applied as g is read).
#[derive(Clone, Copy, Debug)]
pub struct MuonMomentum {
    pub beta: f32,
    pub nesterov: bool,
    pub grad_scale: f32,
}

/// (m', g, ss) -> u / (|u|_F + 1e-7) (k, R, C) in `dtype`: Newton-Schulz's input, u as in
/// [`MuonMomentum`].
#[derive(Clone, Copy, Debug)]
pub struct MuonScale {
    pub beta: f32,
    pub nesterov: bool,
    pub grad_scale: f32,
    pub dtype: DType,
}

/// o (.., C) -> the sum of squares of each row (.., 1), f32.
#[derive(Clone, Copy, Debug)]
pub struct RowSumSq;

/// In place on a weight w (R, C) f32, given o (R, C) and per-row factors f (R, 1) f32:
/// w = decay w - f o.
#[derive(Clone, Copy, Debug)]
pub struct MuonApply {
    pub decay: f32,
}

/// The front half of a Muon step on a stack: the new momentum and Newton-Schulz's normalized
/// input in `dtype` (two kernels on CUDA; the same arithmetic on the CPU), from the gradients
/// `g` times `grad_scale`.
pub fn muon_prepare(
    momentum: &Tensor,
    g: &Tensor,
    (beta, nesterov): (f64, bool),
    grad_scale: f64,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let (k, rows, cols) = g.dims3()?;
    let n = k * rows * cols;
    let grad_scale = grad_scale as f32;
    let op = MuonMomentum {
        beta: beta as f32,
        nesterov,
        grad_scale,
    };
    let out = momentum
        .contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &op)?;
    let m = out.narrow(0, 0, n)?.reshape((k, rows, cols))?;
    let ss = out.narrow(0, n, k)?;
    let scale = MuonScale {
        beta: beta as f32,
        nesterov,
        grad_scale,
        dtype,
    };
    let x = m.apply_op3_no_bwd(g, &ss, &scale)?;
    Ok((m, x))
}

/// Row sums of squares of o (.., C): (.., 1) f32.
pub fn row_sum_squares(o: &Tensor) -> Result<Tensor> {
    o.contiguous()?.apply_op1_no_bwd(&RowSumSq)
}

/// w <- decay w - f o in place (w f32 (R, C), f (R, 1) f32).
pub fn muon_apply(w: &Tensor, o: &Tensor, f: &Tensor, decay: f64) -> Result<()> {
    let op = MuonApply {
        decay: decay as f32,
    };
    w.inplace_op3(&o.contiguous()?, &f.contiguous()?, &op)
}

/// (k, values per matrix) of a stack, checked against a second operand.
fn stack_dims(l1: &Layout, l2: &Layout, op: &str) -> Result<(usize, usize)> {
    let (k, rows, cols) = l1.shape().dims3()?;
    if l2.dims() != l1.dims() {
        bail!("{op}: stacks {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    Ok((k, rows * cols))
}

fn update(m: f32, g: f32, beta: f32, nesterov: bool) -> f32 {
    if nesterov {
        g + beta * m
    } else {
        m
    }
}

impl CustomOp2 for MuonMomentum {
    fn name(&self) -> &'static str {
        "muon-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (k, per) = stack_dims(l1, l2, self.name())?;
        let (m, g) = (
            cpu_f32s(s1, l1, self.name())?,
            cpu_f32s(s2, l2, self.name())?,
        );
        let mut out = vec![0f32; k * per + k];
        for i in 0..k * per {
            let gv = g[i] * self.grad_scale;
            let mv = self.beta * m[i] + gv;
            out[i] = mv;
            let u = update(mv, gv, self.beta, self.nesterov);
            out[k * per + i / per] += u * u;
        }
        Ok((CpuStorage::F32(out), Shape::from(k * per + k)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (k, per) = stack_dims(l1, l2, self.name())?;
        let out = super::cuda::muon_momentum(
            (s1, l1),
            (s2, l2),
            (k, per),
            (self.beta, self.nesterov),
            self.grad_scale,
        )?;
        Ok((out, Shape::from(k * per + k)))
    }
}

impl CustomOp3 for MuonScale {
    fn name(&self) -> &'static str {
        "muon-scale"
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
        let (k, per) = stack_dims(l1, l2, self.name())?;
        let (m, g) = (
            cpu_f32s(s1, l1, self.name())?,
            cpu_f32s(s2, l2, self.name())?,
        );
        let ss = cpu_f32s(s3, l3, self.name())?;
        if ss.len() != k {
            bail!("{}: {} norms for {k} matrices", self.name(), ss.len());
        }
        let x = (0..k * per)
            .map(|i| {
                let gv = g[i] * self.grad_scale;
                update(m[i], gv, self.beta, self.nesterov) / (ss[i / per].sqrt() + 1e-7)
            })
            .collect();
        Ok((cpu_storage(x, self.dtype), l1.shape().clone()))
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
        let (k, per) = stack_dims(l1, l2, self.name())?;
        if l3.shape().elem_count() != k {
            bail!("{}: {:?} norms for {k} matrices", self.name(), l3.dims());
        }
        let (beta, nesterov) = (self.beta, self.nesterov);
        let x = super::cuda::muon_scale(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            (k, per),
            (beta, nesterov),
            self.grad_scale,
            self.dtype,
        )?;
        Ok((x, l1.shape().clone()))
    }
}

impl CustomOp1 for RowSumSq {
    fn name(&self) -> &'static str {
        "row-sum-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (o, _) = cpu_values(s, l, self.name())?;
        let cols = *l.dims().last().unwrap_or(&1);
        let rs = o
            .chunks_exact(cols.max(1))
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        Ok((CpuStorage::F32(rs), row_shape(l)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let cols = *l.dims().last().unwrap_or(&1);
        let rows = l.shape().elem_count() / cols.max(1);
        Ok((super::cuda::row_sumsq(s, l, rows, cols)?, row_shape(l)))
    }
}

/// (.., C) -> (.., 1).
fn row_shape(l: &Layout) -> Shape {
    let mut dims = l.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = 1;
    }
    Shape::from(dims)
}

/// (rows, cols) of the weight, with o and f checked against it.
fn apply_dims(lw: &Layout, lo: &Layout, lf: &Layout) -> Result<(usize, usize)> {
    let (rows, cols) = lw.shape().dims2()?;
    if lo.dims() != [rows, cols] || lf.shape().elem_count() != rows {
        bail!(
            "muon update: weight {:?}, update {:?}, factors {:?} do not fit",
            lw.dims(),
            lo.dims(),
            lf.dims()
        );
    }
    Ok((rows, cols))
}

impl InplaceOp3 for MuonApply {
    fn name(&self) -> &'static str {
        "muon-apply"
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
        let (_, cols) = apply_dims(l1, l2, l3)?;
        let (o, _) = cpu_values(s2, l2, self.name())?;
        let f = cpu_f32s(s3, l3, self.name())?.to_vec();
        for (i, w) in cpu_f32s_mut(s1, l1, self.name())?.iter_mut().enumerate() {
            *w = self.decay * *w - f[i / cols] * o[i];
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
        let (_, cols) = apply_dims(l1, l2, l3)?;
        super::cuda::muon_apply(s1, l1, (s2, l2), (s3, l3), cols, self.decay)
    }
}
