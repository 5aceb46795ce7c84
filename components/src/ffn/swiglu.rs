//! SwiGLU feed-forward network (Shazeer 2020, arXiv 2002.05202): down(silu(gate(x)) * up(x)).

use candle_core::{Result, Tensor};
use registry::{Detached, Dims, Entry, Ffn, ParamBuilder, ParamDoc, Role, Spec, Sublayer};
use serde::{Deserialize, Serialize};

use super::{check_mult, hidden_width};
use crate::fused::{swiglu_mlp, swiglu_outside};
use crate::nn::{out_proj_std, rows, unrows, Linear, INIT_STD};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwiGlu {
    pub mult: f64,
}

impl Default for SwiGlu {
    /// 8/3 keeps the parameter count of a 4x GELU MLP with three matrices instead of two.
    fn default() -> Self {
        Self { mult: 8.0 / 3.0 }
    }
}

impl Spec for SwiGlu {
    fn validate(&self) -> std::result::Result<(), String> {
        check_mult(self.mult)
    }
}

struct Layer {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Sublayer for Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cuda() {
            // One node (fused/mlp.rs): the gate's and the up projection's weights stacked, so
            // that both are one GEMM and the gate one kernel each way.
            let (gate, up, down) = (self.gate.weight(), self.up.weight(), self.down.weight());
            return swiglu_mlp(x, gate, up, down);
        }
        let r = rows(x)?;
        let h = (self.gate.forward(&r)?.silu()? * self.up.forward(&r)?)?;
        unrows(&self.down.forward(&h)?, x)
    }

    fn detached(&self, x: &Tensor) -> Result<Option<Detached>> {
        if !x.device().is_cuda() {
            return Ok(None);
        }
        let (gate, up, down) = (self.gate.weight(), self.up.weight(), self.down.weight());
        swiglu_outside(x, gate, up, down).map(Some)
    }
}

impl Ffn for SwiGlu {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Sublayer>> {
        let (c, h) = (dims.d_model, hidden_width(self.mult, dims.d_model));
        Ok(Box::new(Layer {
            gate: Linear::new(c, h, INIT_STD, Role::Hidden, &p.pp("gate"))?,
            up: Linear::new(c, h, INIT_STD, Role::Hidden, &p.pp("up"))?,
            down: Linear::new(
                h,
                c,
                out_proj_std(dims.n_layers),
                Role::Hidden,
                &p.pp("down"),
            )?,
        }))
    }

    /// gate, up (C -> H) and down (H -> C).
    fn flops(&self, dims: &Dims) -> f64 {
        2.0 * 3.0 * (dims.d_model * hidden_width(self.mult, dims.d_model)) as f64
    }

    fn params(&self, dims: &Dims) -> usize {
        3 * dims.d_model * hidden_width(self.mult, dims.d_model)
    }
}

inventory::submit! {
    Entry::ffn::<SwiGlu>(
        "SwiGlu",
        "gated feed-forward: down(silu(gate x) * up x)",
        &[ParamDoc { name: "mult", doc: "hidden width as a multiple of d_model (rounded to 8)" }],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_a_hand_computed_forward() -> Result<()> {
        let dims = Dims {
            d_model: 8,
            n_layers: 1,
            vocab: 4,
            seq_len: 4,
        };
        let p = ParamBuilder::new(11, &Device::Cpu);
        let ffn = SwiGlu { mult: 1.0 }.build(&dims, &p)?;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 8), &Device::Cpu)?;
        let w = |n: &str| p.params().into_iter().find(|q| q.name == n).unwrap().var;
        let xs = x.reshape((2, 8))?.to_vec2::<f32>()?;
        let (g, u, d) = (
            w("gate.weight").as_tensor().to_vec2::<f32>()?,
            w("up.weight").as_tensor().to_vec2::<f32>()?,
            w("down.weight").as_tensor().to_vec2::<f32>()?,
        );
        let y = ffn.forward(&x)?.reshape((2, 8))?.to_vec2::<f32>()?;
        for (row, out) in xs.iter().zip(&y) {
            let dot = |m: &Vec<f32>| m.iter().zip(row).map(|(a, b)| a * b).sum::<f32>();
            let h: Vec<f32> = (0..8)
                .map(|j| {
                    let a = dot(&g[j]);
                    a / (1.0 + (-a).exp()) * dot(&u[j])
                })
                .collect();
            for i in 0..8 {
                let expect: f32 = d[i].iter().zip(&h).map(|(a, b)| a * b).sum();
                assert!((out[i] - expect).abs() < 1e-5, "{} vs {expect}", out[i]);
            }
        }
        Ok(())
    }
}
