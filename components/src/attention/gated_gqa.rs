//! Gated grouped-query attention (Qiu et al. 2025, arXiv 2505.06708, "Gated Attention for
//! Large Language Models"; used by Qwen3-Next and Goedel-mHC-1B): the attention output Y is
//! multiplied by sigmoid(X W_g) before the output projection, X being the sublayer's normed
//! input. Elementwise: one gate per channel; headwise: one per head. The gate adds a
//! non-linearity between the value and output projections and lets a head output nothing,
//! which removes the attention sink.

use candle_core::{Result, Tensor};
use registry::{Attention, Detached, Dims, Entry, ParamBuilder, ParamDoc, Role, Spec, Sublayer};
use serde::{Deserialize, Serialize};

use super::{gqa::Gqa, CausalSelfAttention};
use crate::fused::{node, SigmoidGate};
use crate::nn::{sigmoid, Linear, INIT_STD};

/// Which values share one gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gate {
    /// One gate per channel of every head (W_g: C x C).
    Elementwise,
    /// One gate per head (W_g: C x heads).
    Headwise,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatedGqa {
    pub heads: usize,
    pub kv_heads: usize,
    pub gate: Gate,
    pub rope: bool,
    pub rope_theta: f64,
    pub qk_norm: bool,
}

impl Default for GatedGqa {
    fn default() -> Self {
        let g = Gqa::default();
        Self {
            heads: g.heads,
            kv_heads: g.kv_heads,
            gate: Gate::Elementwise,
            rope: g.rope,
            rope_theta: g.rope_theta,
            qk_norm: g.qk_norm,
        }
    }
}

impl Spec for GatedGqa {
    fn validate(&self) -> std::result::Result<(), String> {
        self.ungated().validate()
    }

    fn check(&self, dims: &Dims) -> std::result::Result<(), String> {
        self.ungated().check(dims)
    }
}

pub(crate) struct GatedAttention {
    attn: CausalSelfAttention,
    gate: Linear,
    heads: usize,
}

impl GatedAttention {
    /// The attention with a given gate (B, T, C) or (B, T, heads) in place of sigmoid(X W_g).
    pub(crate) fn forward_with_gate(&self, x: &Tensor, gate: &Tensor) -> Result<Tensor> {
        let y = self.attn.attend(x)?;
        let gated = if gate.dims() == y.dims() {
            (y * gate)?
        } else {
            let (b, t, c) = y.dims3()?;
            y.reshape((b, t, self.heads, c / self.heads))?
                .broadcast_mul(&gate.unsqueeze(3)?)?
                .reshape((b, t, c))?
        };
        self.attn.project(&gated)
    }
}

impl Sublayer for GatedAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Where flash attention applies, the whole sublayer with its gate is one node.
        if let Some(d) = self.attn.fused_sublayer(x, Some(self.gate.weight()))? {
            return node(x, d);
        }
        let logits = self.gate.forward(x)?;
        if x.device().is_cuda() {
            // The gate as one op each way (fused/gate.rs).
            let y = self.attn.attend(x)?;
            return self.attn.project(
                &y.contiguous()?
                    .apply_op2(&logits.contiguous()?, SigmoidGate)?,
            );
        }
        self.forward_with_gate(x, &sigmoid(&logits)?)
    }

    fn detached(&self, x: &Tensor) -> Result<Option<Detached>> {
        self.attn.fused_sublayer(x, Some(self.gate.weight()))
    }
}

impl Attention for GatedGqa {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Sublayer>> {
        Ok(Box::new(self.build_gated(dims, p)?))
    }

    /// The attention's, and the gate's projection (C -> C or C -> heads).
    fn flops(&self, dims: &Dims) -> f64 {
        let width = match self.gate {
            Gate::Elementwise => dims.d_model,
            Gate::Headwise => self.heads,
        };
        self.ungated().shape().flops(dims) + 2.0 * (dims.d_model * width) as f64
    }

    fn params(&self, dims: &Dims) -> usize {
        let width = match self.gate {
            Gate::Elementwise => dims.d_model,
            Gate::Headwise => self.heads,
        };
        self.ungated().shape().params(dims) + dims.d_model * width
    }
}

impl GatedGqa {
    fn ungated(&self) -> Gqa {
        Gqa {
            heads: self.heads,
            kv_heads: self.kv_heads,
            rope: self.rope,
            rope_theta: self.rope_theta,
            qk_norm: self.qk_norm,
        }
    }

    /// The built layer as its own type, so tests can set its gate.
    pub(crate) fn build_gated(&self, dims: &Dims, p: &ParamBuilder) -> Result<GatedAttention> {
        let width = match self.gate {
            Gate::Elementwise => dims.d_model,
            Gate::Headwise => self.heads,
        };
        Ok(GatedAttention {
            attn: CausalSelfAttention::new(self.ungated().shape(), dims, p)?,
            gate: Linear::new(dims.d_model, width, INIT_STD, Role::Gate, &p.pp("gate"))?,
            heads: self.heads,
        })
    }
}

inventory::submit! {
    Entry::attention::<GatedGqa>(
        "GatedGqa",
        "grouped-query attention with a sigmoid output gate from the normed input",
        &[
            ParamDoc { name: "heads", doc: "query heads; must divide d_model" },
            ParamDoc { name: "kv_heads", doc: "key/value heads; must divide heads" },
            ParamDoc { name: "gate", doc: "Elementwise (per channel) or Headwise (per head)" },
            ParamDoc { name: "rope", doc: "rotary position embeddings on queries and keys" },
            ParamDoc { name: "rope_theta", doc: "RoPE base frequency" },
            ParamDoc { name: "qk_norm", doc: "RMSNorm each query and key head" },
        ],
    )
}
