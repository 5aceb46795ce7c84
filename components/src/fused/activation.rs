//! MLP activations as one elementwise kernel each way. As composites, GELU's backward alone is
//! about ten kernels over the MLP's hidden activations, the widest of a layer, and SwiGLU's
//! gate (silu, the product and their backward) a dozen more passes.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{cpu_storage, cpu_values};

/// Which activation (the numbering is the CUDA kernels').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// x Phi(x) with the exact normal CDF, as PyTorch's default GELU.
    GeluErf = 0,
    /// max(x, 0)^2 (Primer; the Goedel stack).
    Relu2 = 1,
    /// SwiGLU's gate (Shazeer 2020, arXiv 2002.05202): hidden rows [g | u] of width 2 H become
    /// silu(g) u of width H. Not elementwise: the op halves the last axis.
    SwiGlu = 2,
}

impl Kind {
    /// Whether the activation gates one half of its input with the other.
    pub fn gated(self) -> bool {
        self == Kind::SwiGlu
    }

    /// The elementwise activation; the gated kind goes through [`glu`] instead.
    fn f(self, x: f32) -> f32 {
        match self {
            Kind::GeluErf => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Kind::Relu2 => x.max(0.0).powi(2),
            Kind::SwiGlu => unreachable!("SwiGLU is not elementwise"),
        }
    }

    fn df(self, x: f32) -> f32 {
        match self {
            Kind::GeluErf => {
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
                0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)) + x * pdf
            }
            Kind::Relu2 => 2.0 * x.max(0.0),
            Kind::SwiGlu => unreachable!("SwiGLU is not elementwise"),
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// silu(g) u for each row [g | u] of `h` (rows of width 2 `hidden`).
fn glu(h: &[f32], hidden: usize) -> Vec<f32> {
    h.chunks_exact(2 * hidden)
        .flat_map(|row| {
            let (g, u) = row.split_at(hidden);
            g.iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u)
        })
        .collect()
}

/// [dg | du] for each row of `h` and of `dy` (rows of width `hidden`): dg = dy u silu'(g),
/// du = dy silu(g), with silu'(g) = s (1 + g (1 - s)) and s = sigmoid(g).
fn glu_bwd(h: &[f32], dy: &[f32], hidden: usize) -> Vec<f32> {
    let mut dh = vec![0.0; h.len()];
    for ((row, d), out) in h
        .chunks_exact(2 * hidden)
        .zip(dy.chunks_exact(hidden))
        .zip(dh.chunks_exact_mut(2 * hidden))
    {
        let (g, u) = row.split_at(hidden);
        let (dg, du) = out.split_at_mut(hidden);
        for j in 0..hidden {
            let s = sigmoid(g[j]);
            dg[j] = d[j] * u[j] * s * (1.0 + g[j] * (1.0 - s));
            du[j] = d[j] * g[j] * s;
        }
    }
    dh
}

/// The gated kind's widths: (hidden rows' width 2 H, H), checked.
fn gated_width(l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&w) if w > 0 && w % 2 == 0 => Ok(w / 2),
        _ => candle_core::bail!("SwiGLU: hidden rows {:?} must have an even width", l.dims()),
    }
}

/// `shape` with its last axis halved (forward of the gated kind).
fn halved(shape: &Shape) -> Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last /= 2;
    }
    Shape::from(dims)
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
        if self.0.gated() {
            let y = glu(&x, gated_width(l)?);
            return Ok((cpu_storage(y, dtype), halved(l.shape())));
        }
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
        let shape = match self.0.gated() {
            true => halved(l.shape()),
            false => l.shape().clone(),
        };
        Ok((out, shape))
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
        if self.0.gated() {
            let dh = glu_bwd(&x, &dy, gated_width(l1)?);
            return Ok((cpu_storage(dh, dtype), l1.shape().clone()));
        }
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
