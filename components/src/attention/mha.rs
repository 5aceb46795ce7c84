//! Multi-head causal self-attention (Vaswani et al. 2017, arXiv 1706.03762) with rotary
//! position embeddings (Su et al. 2021, arXiv 2104.09864): grouped-query attention with one
//! key/value head per query head, so it is [`Gqa`] with kv_heads = heads.

use candle_core::Result;
use registry::{Attention, Dims, Entry, ParamBuilder, ParamDoc, Spec, Sublayer};
use serde::{Deserialize, Serialize};

use super::gqa::Gqa;

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
        let g = Gqa::default();
        Self {
            heads: g.heads,
            rope: g.rope,
            rope_theta: g.rope_theta,
            qk_norm: g.qk_norm,
        }
    }
}

impl Mha {
    /// The equivalent grouped-query attention.
    pub fn as_gqa(&self) -> Gqa {
        Gqa {
            heads: self.heads,
            kv_heads: self.heads,
            rope: self.rope,
            rope_theta: self.rope_theta,
            qk_norm: self.qk_norm,
        }
    }
}

impl Spec for Mha {
    fn validate(&self) -> std::result::Result<(), String> {
        self.as_gqa().validate()
    }

    fn check(&self, dims: &Dims) -> std::result::Result<(), String> {
        self.as_gqa().check(dims)
    }
}

impl Attention for Mha {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Sublayer>> {
        self.as_gqa().build(dims, p)
    }

    fn flops(&self, dims: &Dims) -> f64 {
        self.as_gqa().flops(dims)
    }

    fn params(&self, dims: &Dims) -> usize {
        self.as_gqa().params(dims)
    }
}

inventory::submit! {
    Entry::attention::<Mha>(
        "Mha",
        "causal multi-head self-attention with RoPE (Gqa with kv_heads = heads)",
        &[
            ParamDoc { name: "heads", doc: "attention heads; must divide d_model" },
            ParamDoc { name: "rope", doc: "rotary position embeddings on queries and keys" },
            ParamDoc { name: "rope_theta", doc: "RoPE base frequency" },
            ParamDoc { name: "qk_norm", doc: "RMSNorm each query and key head" },
        ],
    )
}
