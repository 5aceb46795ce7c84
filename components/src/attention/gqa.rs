//! Grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245): `kv_heads` key/value
//! heads, each shared by heads / kv_heads query heads; kv_heads = heads is multi-head
//! attention, kv_heads = 1 multi-query attention. RoPE and QK-norm are options.

use candle_core::Result;
use registry::{Attention, Dims, Entry, ParamBuilder, ParamDoc, Spec, Sublayer};
use serde::{Deserialize, Serialize};

use super::{AttentionShape, CausalSelfAttention};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gqa {
    pub heads: usize,
    pub kv_heads: usize,
    pub rope: bool,
    pub rope_theta: f64,
    pub qk_norm: bool,
}

impl Default for Gqa {
    fn default() -> Self {
        Self {
            heads: 4,
            kv_heads: 2,
            rope: true,
            rope_theta: 10_000.0,
            qk_norm: false,
        }
    }
}

impl Gqa {
    pub fn shape(&self) -> AttentionShape {
        AttentionShape::new(
            self.heads,
            self.kv_heads,
            self.rope,
            self.rope_theta,
            self.qk_norm,
        )
    }
}

impl Spec for Gqa {
    fn validate(&self) -> std::result::Result<(), String> {
        self.shape().validate()
    }

    fn check(&self, dims: &Dims) -> std::result::Result<(), String> {
        self.shape().check(dims)
    }
}

impl Attention for Gqa {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Sublayer>> {
        Ok(Box::new(CausalSelfAttention::new(self.shape(), dims, p)?))
    }

    fn flops(&self, dims: &Dims) -> f64 {
        self.shape().flops(dims)
    }

    fn params(&self, dims: &Dims) -> usize {
        self.shape().params(dims)
    }
}

inventory::submit! {
    Entry::attention::<Gqa>(
        "Gqa",
        "grouped-query causal self-attention (kv_heads key/value heads) with RoPE",
        &[
            ParamDoc { name: "heads", doc: "query heads; must divide d_model" },
            ParamDoc { name: "kv_heads", doc: "key/value heads; must divide heads" },
            ParamDoc { name: "rope", doc: "rotary position embeddings on queries and keys" },
            ParamDoc { name: "rope_theta", doc: "RoPE base frequency" },
            ParamDoc { name: "qk_norm", doc: "RMSNorm each query and key head" },
        ],
    )
}
