//! RMSNorm as one fused op forward and two backward (dx, and the gain's gradient), in place
//! of the composite's eight kernels forward and, through candle's autograd, about twenty
//! backward on every activation-sized tensor; a model has four of them a layer.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};

use super::{cpu_storage, cpu_values};

/// y = x / sqrt(mean(x^2) + eps) over the last axis (no gain).
#[derive(Clone, Copy, Debug)]
pub struct RmsNormPlain {
    pub eps: f32,
}

/// y = x / sqrt(mean(x^2) + eps) * g, g (C,) f32.
#[derive(Clone, Copy, Debug)]
pub struct RmsNormGain {
    pub eps: f32,
}

/// dL/dx of either norm: inputs (x, dy), or (x, g, dy) with a gain.
#[derive(Clone, Copy, Debug)]
pub struct RmsNormBwdX {
    pub eps: f32,
}

/// dL/dg of [`RmsNormGain`] from (x, dy): (C,) f32.
#[derive(Clone, Copy, Debug)]
pub struct RmsNormBwdG {
    pub eps: f32,
}

/// (rows, c) of a tensor normalized over its last axis.
pub(super) fn rows_cols(l: &Layout) -> Result<(usize, usize)> {
    let c = *l.dims().last().unwrap_or(&0);
    if c == 0 {
        bail!("rms norm: empty last dimension");
    }
    Ok((l.shape().elem_count() / c, c))
}

fn rstd(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

fn cpu_norm(x: &[f32], g: Option<&[f32]>, c: usize, eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks(c).zip(y.chunks_mut(c)) {
        let r = rstd(xr, eps);
        for (j, (o, v)) in yr.iter_mut().zip(xr).enumerate() {
            *o = v * r * g.map_or(1.0, |g| g[j]);
        }
    }
    y
}

fn cpu_bwd_x(x: &[f32], g: Option<&[f32]>, dy: &[f32], c: usize, eps: f32) -> Vec<f32> {
    let gain = |j: usize| g.map_or(1.0, |g| g[j]);
    let mut dx = vec![0f32; x.len()];
    for ((xr, dyr), dxr) in x.chunks(c).zip(dy.chunks(c)).zip(dx.chunks_mut(c)) {
        let r = rstd(xr, eps);
        let dot = (0..c).map(|j| dyr[j] * gain(j) * xr[j] * r).sum::<f32>() / c as f32;
        for j in 0..c {
            dxr[j] = r * (dyr[j] * gain(j) - xr[j] * r * dot);
        }
    }
    dx
}

impl CustomOp1 for RmsNormPlain {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dtype) = cpu_values(s, l, self.name())?;
        let (_, c) = rows_cols(l)?;
        Ok((
            cpu_storage(cpu_norm(&x, None, c, self.eps), dtype),
            l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::rms_norm(s, l, None, None, self.eps)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = arg.apply_op2_no_bwd(&grad.contiguous()?, &RmsNormBwdX { eps: self.eps })?;
        Ok(Some(dx))
    }
}

impl CustomOp2 for RmsNormGain {
    fn name(&self) -> &'static str {
        "rms-norm-gain"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dtype) = cpu_values(s1, l1, self.name())?;
        let (g, _) = cpu_values(s2, l2, self.name())?;
        let (_, c) = rows_cols(l1)?;
        let y = cpu_norm(&x, Some(&g), c, self.eps);
        Ok((cpu_storage(y, dtype), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::rms_norm(s1, l1, Some((s2, l2)), None, self.eps)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(g, &grad, &RmsNormBwdX { eps: self.eps })?;
        let dg = x.apply_op2_no_bwd(&grad, &RmsNormBwdG { eps: self.eps })?;
        Ok((Some(dx), Some(dg)))
    }
}

impl CustomOp2 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "rms-norm-bwd-x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp2::name(self);
        let (x, dtype) = cpu_values(s1, l1, name)?;
        let (dy, _) = cpu_values(s2, l2, name)?;
        let (_, c) = rows_cols(l1)?;
        let dx = cpu_bwd_x(&x, None, &dy, c, self.eps);
        Ok((cpu_storage(dx, dtype), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::rms_norm(s1, l1, None, Some((s2, l2)), self.eps)?;
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp3 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "rms-norm-gain-bwd-x"
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
        let name = CustomOp3::name(self);
        let (x, dtype) = cpu_values(s1, l1, name)?;
        let (g, _) = cpu_values(s2, l2, name)?;
        let (dy, _) = cpu_values(s3, l3, name)?;
        let (_, c) = rows_cols(l1)?;
        let dx = cpu_bwd_x(&x, Some(&g), &dy, c, self.eps);
        Ok((cpu_storage(dx, dtype), l1.shape().clone()))
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
        let out = super::cuda::rms_norm(s1, l1, Some((s2, l2)), Some((s3, l3)), self.eps)?;
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp2 for RmsNormBwdG {
    fn name(&self) -> &'static str {
        "rms-norm-bwd-gain"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, _) = cpu_values(s1, l1, self.name())?;
        let (dy, _) = cpu_values(s2, l2, self.name())?;
        let (_, c) = rows_cols(l1)?;
        let mut dg = vec![0f32; c];
        for (xr, dyr) in x.chunks(c).zip(dy.chunks(c)) {
            let r = rstd(xr, self.eps);
            for j in 0..c {
                dg[j] += dyr[j] * xr[j] * r;
            }
        }
        Ok((CpuStorage::F32(dg), Shape::from(c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, c) = rows_cols(l1)?;
        Ok((
            super::cuda::rms_norm_bwd_g(s1, l1, s2, l2, self.eps)?,
            Shape::from(c),
        ))
    }
}
