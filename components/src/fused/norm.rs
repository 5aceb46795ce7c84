//! RMSNorm as one fused op forward and two backward (dx, and the gain's gradient), in place
//! of the composite's eight kernels forward and, through candle's autograd, about twenty
//! backward on every activation-sized tensor; a model has four of them a layer.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Result, Shape,
    Tensor,
};
use registry::{add_into, Detached, Grads};

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

/// In place on a gradient acc of x's shape: acc += dL/dx of [`RmsNormGain`] with `gain`,
/// from (x, dy). The residual's gradient and the norm's meet in one pass, where an add
/// after the norm's backward would be a pass of its own.
#[derive(Clone, Debug)]
pub struct RmsNormBwdXInto {
    pub eps: f32,
    pub gain: Tensor,
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

impl InplaceOp3 for RmsNormBwdXInto {
    fn name(&self) -> &'static str {
        "rms-norm-bwd-x-into"
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
        let name = self.name();
        let (x, _) = cpu_values(s2, l2, name)?;
        let (dy, _) = cpu_values(s3, l3, name)?;
        let g = self
            .gain
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (_, c) = rows_cols(l2)?;
        if !l1.is_contiguous() || l1.shape() != l2.shape() {
            bail!("{name}: the gradient to add into does not fit the input");
        }
        let dx = cpu_bwd_x(&x, Some(&g), &dy, c, self.eps);
        let start = l1.start_offset();
        match s1 {
            CpuStorage::F32(a) => a[start..start + dx.len()]
                .iter_mut()
                .zip(&dx)
                .for_each(|(a, d)| *a += d),
            CpuStorage::BF16(a) => a[start..start + dx.len()]
                .iter_mut()
                .zip(&dx)
                .for_each(|(a, d)| *a = half::bf16::from_f32(a.to_f32() + d)),
            _ => bail!("{name}: f32 or bf16 only"),
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
        let gain = self.gain.to_dtype(DType::F32)?.contiguous()?;
        let (storage, lg) = gain.storage_and_layout();
        let candle_core::Storage::Cuda(g) = &*storage else {
            bail!("rms norm: the gain is not on the GPU");
        };
        super::cuda::rms_norm_bwd_x_into((s1, l1), (s2, l2), Some((g, lg)), (s3, l3), self.eps)
    }
}

/// RMSNorm with a gain on `x` outside the autograd graph: y and the backward pass to x (added
/// in place into the gradient handed over, where it fits) and to the gain.
pub fn rms_norm_outside(x: &Tensor, gain: &Tensor, eps: f32) -> Result<Detached> {
    let x = x.detach().contiguous()?;
    let g32 = gain.detach().to_dtype(DType::F32)?;
    let y = x.apply_op2_no_bwd(&g32, &RmsNormGain { eps })?;
    let backward = move |dy: &Tensor, into: Option<Tensor>| -> Result<Grads> {
        let dy = dy.contiguous()?;
        let dx = match into {
            Some(acc) if acc.dtype() == x.dtype() && acc.dims() == x.dims() => {
                let acc = acc.contiguous()?;
                let op = RmsNormBwdXInto {
                    eps,
                    gain: g32.clone(),
                };
                acc.inplace_op3(&x, &dy, &op)?;
                acc
            }
            other => add_into(x.apply_op3_no_bwd(&g32, &dy, &RmsNormBwdX { eps })?, other)?,
        };
        let dg = x.apply_op2_no_bwd(&dy, &RmsNormBwdG { eps })?;
        Ok(Grads {
            input: Some(dx),
            weights: vec![Some(dg)],
        })
    };
    Ok(Detached {
        y,
        weights: vec![gain.clone()],
        backward: Box::new(backward),
    })
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
