//! The GPT-2 MLP (Radford et al. 2019): down(gelu(up(x))), exact erf GELU (PyTorch's default).

use candle_core::Result;
use registry::{Dims, Entry, Ffn, ParamBuilder, ParamDoc, Spec, Sublayer};
use serde::{Deserialize, Serialize};

use super::{check_mult, Mlp};
use crate::fused::Kind;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gelu {
    pub mult: f64,
}

impl Default for Gelu {
    fn default() -> Self {
        Self { mult: 4.0 }
    }
}

impl Spec for Gelu {
    fn validate(&self) -> std::result::Result<(), String> {
        check_mult(self.mult)
    }
}

impl Ffn for Gelu {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Sublayer>> {
        Ok(Box::new(Mlp::new(self.mult, Kind::GeluErf, dims, p)?))
    }

    fn flops(&self, dims: &Dims) -> f64 {
        super::two_matrix_flops(self.mult, dims)
    }

    fn params(&self, dims: &Dims) -> usize {
        2 * dims.d_model * super::hidden_width(self.mult, dims.d_model)
    }
}

inventory::submit! {
    Entry::ffn::<Gelu>(
        "Gelu",
        "GPT-2 MLP: down(gelu(up x))",
        &[ParamDoc { name: "mult", doc: "hidden width as a multiple of d_model (rounded to 8)" }],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn gelu_values_match_the_erf_definition() -> Result<()> {
        // gelu(x) = x * Phi(x); Phi(1) = 0.841345, Phi(-0.5) = 0.308538 (normal tables).
        let x = Tensor::new(&[1f32, -0.5, 0.0], &Device::Cpu)?;
        let y = x.gelu_erf()?.to_vec1::<f32>()?;
        assert!((y[0] - 0.841_345).abs() < 1e-5);
        assert!((y[1] + 0.5 * 0.308_538).abs() < 1e-5);
        assert_eq!(y[2], 0.0);
        Ok(())
    }
}
