//! MLP activations as one elementwise kernel each way. As composites, GELU's backward alone is
//! about ten kernels over the MLP's hidden activations, the widest of a layer.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values};

/// Which activation (the numbering is the CUDA kernels').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// x Phi(x) with the exact normal CDF, as PyTorch's default GELU.
    GeluErf = 0,
    /// max(x, 0)^2 (Primer; the Goedel stack).
    Relu2 = 1,
}

impl Kind {
    fn f(self, x: f32) -> f32 {
        match self {
            Kind::GeluErf => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Kind::Relu2 => x.max(0.0).powi(2),
        }
    }

    fn df(self, x: f32) -> f32 {
        match self {
            Kind::GeluErf => {
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
                0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)) + x * pdf
            }
            Kind::Relu2 => 2.0 * x.max(0.0),
        }
    }
}

/// The error function candle's own `gelu_erf` uses on the CPU, so both paths agree.
fn erf(x: f32) -> f32 {
    candle_core::cpu::erf::erf_f64(x as f64) as f32
}

/// The activation forward.
#[derive(Clone, Copy, Debug)]
pub struct Activation(pub Kind);

/// (x, dy) -> dx of [`Activation`].
#[derive(Clone, Copy, Debug)]
pub struct ActivationBwd(pub Kind);

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        "activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dtype) = cpu_values(s, l, self.name())?;
        let y = x.iter().map(|&v| self.0.f(v)).collect();
        Ok((cpu_storage(y, dtype), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::activation(s, l, None, self.0 as i32)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = x.apply_op2_no_bwd(&grad.contiguous()?, &ActivationBwd(self.0))?;
        Ok(Some(dx))
    }
}

impl CustomOp2 for ActivationBwd {
    fn name(&self) -> &'static str {
        "activation-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dtype) = cpu_values(s1, l1, self.name())?;
        let (dy, _) = cpu_values(s2, l2, self.name())?;
        let dx = x.iter().zip(&dy).map(|(&v, &d)| d * self.0.df(v)).collect();
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
        let out = super::cuda::activation(s1, l1, Some((s2, l2)), self.0 as i32)?;
        Ok((out, l1.shape().clone()))
    }
}
