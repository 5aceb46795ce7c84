//! Multi-head causal self-attention (Vaswani et al. 2017, arXiv 1706.03762) with rotary
//! position embeddings (Su et al. 2021, arXiv 2104.09864).

use candle_core::Result;
use registry::{Attention, Dims, Entry, ParamBuilder, ParamDoc, Spec, Sublayer};
use serde::{Deserialize, Serialize};

use super::{AttentionShape, CausalSelfAttention};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mha {
    pub heads: usize,
    pub rope: bool,
    pub rope_theta: f64,
    pub qk_norm: bool,
}

impl Default for Mha {
    fn default() -> Self {
        Self {
            heads: 4,
            rope: true,
            rope_theta: 10_000.0,
            qk_norm: false,
        }
    }
}

impl Mha {
    fn shape(&self) -> AttentionShape {
        AttentionShape {
            heads: self.heads,
            kv_heads: self.heads,
            rope_theta: self.rope.then_some(self.rope_theta),
            qk_norm: self.qk_norm,
        }
    }
}

impl Spec for Mha {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.heads == 0 {
            return Err("heads must be at least 1".into());
        }
        if self.rope_theta <= 0.0 {
            return Err(format!(
                "rope_theta must be positive, got {}",
                self.rope_theta
            ));
        }
        Ok(())
    }

    fn check(&self, dims: &Dims) -> std::result::Result<(), String> {
        self.shape().check(dims)
    }
}

impl Attention for Mha {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Sublayer>> {
        Ok(Box::new(CausalSelfAttention::new(self.shape(), dims, p)?))
    }
}

inventory::submit! {
    Entry::attention::<Mha>(
        "Mha",
        "causal multi-head self-attention with RoPE",
        &[
            ParamDoc { name: "heads", doc: "attention heads; must divide d_model" },
            ParamDoc { name: "rope", doc: "rotary position embeddings on queries and keys" },
            ParamDoc { name: "rope_theta", doc: "RoPE base frequency" },
            ParamDoc { name: "qk_norm", doc: "RMSNorm each query and key head" },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp, Tensor};

    fn dims() -> Dims {
        Dims {
            d_model: 16,
            n_layers: 2,
            vocab: 32,
            seq_len: 8,
        }
    }

    #[test]
    fn changing_a_later_token_leaves_earlier_outputs_unchanged() -> Result<()> {
        let p = ParamBuilder::new(3, &Device::Cpu);
        let attn = Mha::default().build(&dims(), &p)?;
        let x = Tensor::randn(0f32, 1.0, (1, 8, 16), &Device::Cpu)?;
        let noise = Tensor::randn(0f32, 1.0, (1, 3, 16), &Device::Cpu)?;
        let x2 = Tensor::cat(&[&x.i((.., ..5, ..))?, &(x.i((.., 5.., ..))? + noise)?], 1)?;
        let (y, y2) = (attn.forward(&x)?, attn.forward(&x2)?);
        let early = (y.i((.., ..5, ..))? - y2.i((.., ..5, ..))?)?
            .abs()?
            .max_all()?;
        let late = (y.i((.., 5.., ..))? - y2.i((.., 5.., ..))?)?
            .abs()?
            .max_all()?;
        assert_eq!(early.to_scalar::<f32>()?, 0.0);
        assert!(late.to_scalar::<f32>()? > 1e-6);
        Ok(())
    }

    #[test]
    fn first_position_attends_only_to_itself() -> Result<()> {
        // With one visible key, attention returns that key's value: y_0 = o(v(x_0)).
        let p = ParamBuilder::new(5, &Device::Cpu);
        let attn = CausalSelfAttention::new(Mha::default().shape(), &dims(), &p)?;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 16), &Device::Cpu)?;
        let y0 = attn.forward(&x)?.i((0, 0))?;
        let ps = p.params();
        let wv = ps
            .iter()
            .find(|q| q.name == "v.weight")
            .unwrap()
            .var
            .as_tensor();
        let wo = ps
            .iter()
            .find(|q| q.name == "o.weight")
            .unwrap()
            .var
            .as_tensor();
        let x0 = x.i((0, 0))?.unsqueeze(0)?;
        let expect = x0.matmul(&wv.t()?)?.matmul(&wo.t()?)?.squeeze(0)?;
        let diff = (y0 - expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    #[test]
    fn heads_must_divide_d_model() {
        let err = Mha {
            heads: 3,
            ..Mha::default()
        }
        .check(&dims())
        .unwrap_err();
        assert_eq!(err, "heads = 3 does not divide d_model = 16");
    }
}
