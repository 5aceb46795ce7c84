//! Squared-ReLU MLP (So et al. 2021, "Primer", arXiv 2109.08668; modded-nanogpt and
//! Goedel-mHC-1B): down(relu(up x)^2). Sparse like ReLU, smooth at the origin's right side,
//! and cheaper than a gated unit at equal width.

use candle_core::Result;
use registry::{Dims, Entry, Ffn, ParamBuilder, ParamDoc, Spec, Sublayer};
use serde::{Deserialize, Serialize};

use super::{check_mult, Mlp};
use crate::fused::Kind;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Relu2 {
    pub mult: f64,
}

impl Default for Relu2 {
    fn default() -> Self {
        Self { mult: 4.0 }
    }
}

impl Spec for Relu2 {
    fn validate(&self) -> std::result::Result<(), String> {
        check_mult(self.mult)
    }
}

impl Ffn for Relu2 {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Sublayer>> {
        Ok(Box::new(Mlp::new(self.mult, Kind::Relu2, dims, p)?))
    }

    fn flops(&self, dims: &Dims) -> f64 {
        super::two_matrix_flops(self.mult, dims)
    }

    fn params(&self, dims: &Dims) -> usize {
        2 * dims.d_model * super::hidden_width(self.mult, dims.d_model)
    }
}

inventory::submit! {
    Entry::ffn::<Relu2>(
        "Relu2",
        "squared-ReLU MLP: down(relu(up x)^2)",
        &[ParamDoc { name: "mult", doc: "hidden width as a multiple of d_model (rounded to 8)" }],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::activation;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradient_by_hand() -> Result<()> {
        // relu(x)^2 at (-2, 0.5, 3) = (0, 0.25, 9); derivative 2 relu(x) = (0, 1, 6).
        let x = Var::new(&[-2f32, 0.5, 3.0], &Device::Cpu)?;
        let y = activation(x.as_tensor(), Kind::Relu2)?;
        assert_eq!(y.to_vec1::<f32>()?, vec![0.0, 0.25, 9.0]);
        let g = y.sum_all()?.backward()?;
        assert_eq!(
            g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?,
            vec![0.0, 1.0, 6.0]
        );
        Ok(())
    }
}
