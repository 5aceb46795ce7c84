//! A trained trial as a Hugging Face model directory: config.json, model.safetensors,
//! generation_config.json, the tokenizer, and a model card.
//!
//! Where a stock `transformers` architecture computes exactly the trial's model, the export
//! uses it, with its `model_type` and weight names, so no remote code is needed:
//! - PreNorm + Mha/Gqa (RoPE on, no QK-norm) + SwiGlu is Llama: RMSNorm with a gain before
//!   each sublayer and at the end, rotate-half RoPE, GQA, SiLU-gated MLP, no biases, tied
//!   embeddings;
//! - the same with QK-norm is Qwen3 (whose q_norm / k_norm gains are then ones: sweep's
//!   QK-norm has none).
//!
//! Every other trial ships `modeling_sweep.py` (this folder's PyTorch implementation of every
//! component) with `auto_map` in config.json, and keeps sweep's own weight names.

mod card;
pub mod tokenizer;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::data::{Tokenizer, GPT2_EOT};

pub use card::{card, Record};

/// The PyTorch implementation shipped with exports that need remote code.
pub const MODELING_PY: &str = include_str!("modeling_sweep.py");

/// How the exported directory names its architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Llama,
    Qwen3,
    /// `modeling_sweep.py`, loaded with `trust_remote_code=True`.
    Sweep,
}

impl Layout {
    pub fn describe(self) -> &'static str {
        match self {
            Layout::Llama => "Llama (stock transformers architecture)",
            Layout::Qwen3 => "Qwen3 (stock transformers architecture)",
            Layout::Sweep => "sweep's own (modeling_sweep.py, trust_remote_code=True)",
        }
    }
}

/// The weights' dtype in model.safetensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            Precision::F32 => "float32",
            Precision::Bf16 => "bfloat16",
        }
    }
}

/// One component of a trial's configuration: its registered name and its parameters, each
/// as JSON (numbers, booleans, enum variants as strings).
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub kind: String,
    pub params: serde_json::Map<String, Value>,
}

impl Part {
    fn get(&self, key: &str) -> Option<&Value> {
        self.params.get(key)
    }

    fn flag(&self, key: &str) -> bool {
        self.get(key).and_then(Value::as_bool).unwrap_or(false)
    }

    fn uint(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(Value::as_u64).map(|v| v as usize)
    }

    fn json(&self) -> Value {
        let mut m = self.params.clone();
        m.insert("kind".into(), json!(self.kind));
        Value::Object(m)
    }
}

/// What an export needs to know of a trial's model, read from its resolved configuration
/// and its weights.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub attention: Part,
    pub ffn: Part,
    pub residual: Part,
    pub d_model: usize,
    pub n_layers: usize,
    pub seq_len: usize,
    /// The embedding's rows (the tokenizer's vocabulary, padded).
    pub vocab: usize,
    /// The FFN's hidden width.
    pub hidden: usize,
    pub tokenizer: Tokenizer,
}

/// A RON value of a config factor as JSON: integers, floats, booleans, else the text (an
/// enum variant like `Elementwise`).
fn value_of(text: &str) -> Value {
    if let Ok(i) = text.parse::<i64>() {
        return json!(i);
    }
    if let Ok(f) = text.parse::<f64>() {
        return json!(f);
    }
    match text {
        "true" => json!(true),
        "false" => json!(false),
        _ => json!(text.trim_matches('"')),
    }
}

impl ModelInfo {
    /// From a trial's resolved configuration and its weights (by sweep's names).
    pub fn new(config: &str, weights: &BTreeMap<String, Tensor>) -> Result<Self, String> {
        let factors = crate::spec::factors(config);
        let find = |key: &str| -> Result<&str, String> {
            factors
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| format!("the trial's configuration has no {key}"))
        };
        let part = |slot: &str| -> Result<Part, String> {
            let prefix = format!("{slot}.");
            Ok(Part {
                kind: find(slot)?.to_string(),
                params: factors
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), value_of(v))))
                    .collect(),
            })
        };
        let size = |key: &str| -> Result<usize, String> {
            find(key)?
                .parse()
                .map_err(|_| format!("{key} is not a number"))
        };
        let dims = |name: &str| -> Result<Vec<usize>, String> {
            weights
                .get(name)
                .map(|t| t.dims().to_vec())
                .ok_or_else(|| format!("the weights have no tensor {name}"))
        };
        let tokenizer = match find("data.tokenizer") {
            Ok("Gpt2") => Tokenizer::Gpt2,
            Ok("Bytes") | Err(_) => Tokenizer::Bytes,
            Ok(other) => return Err(format!("unknown tokenizer {other}")),
        };
        Ok(Self {
            attention: part("attention")?,
            ffn: part("ffn")?,
            residual: part("residual")?,
            d_model: size("model.d_model")?,
            n_layers: size("model.n_layers")?,
            seq_len: size("train.seq_len")?,
            vocab: dims("wte")?[0],
            hidden: dims("blocks.0.ffn.up.weight")?[0],
            tokenizer,
        })
    }

    pub fn heads(&self) -> usize {
        self.attention.uint("heads").unwrap_or(1)
    }

    pub fn kv_heads(&self) -> usize {
        match self.attention.kind.as_str() {
            "Mha" => self.heads(),
            _ => self.attention.uint("kv_heads").unwrap_or(self.heads()),
        }
    }

    fn rope_theta(&self) -> f64 {
        self.attention
            .get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0)
    }

    /// The stock architecture that is exactly this model, if there is one.
    pub fn layout(&self) -> Layout {
        let plain_attention =
            matches!(self.attention.kind.as_str(), "Mha" | "Gqa") && self.attention.flag("rope");
        match (
            self.residual.kind.as_str(),
            plain_attention,
            self.ffn.kind.as_str(),
        ) {
            ("PreNorm", true, "SwiGlu") if self.attention.flag("qk_norm") => Layout::Qwen3,
            ("PreNorm", true, "SwiGlu") => Layout::Llama,
            _ => Layout::Sweep,
        }
    }

    /// The special token ids of the tokenizer: end-of-text for GPT-2; none for bytes.
    fn eot(&self) -> Value {
        match self.tokenizer {
            Tokenizer::Gpt2 => json!(GPT2_EOT),
            Tokenizer::Bytes => Value::Null,
        }
    }
}

/// config.json for `m` in `layout`, with the trial's provenance under `sweep`.
pub fn config_json(
    m: &ModelInfo,
    layout: Layout,
    precision: Precision,
    provenance: Value,
) -> Value {
    let mut cfg = match layout {
        Layout::Llama | Layout::Qwen3 => {
            let (arch, model_type) = match layout {
                Layout::Llama => ("LlamaForCausalLM", "llama"),
                _ => ("Qwen3ForCausalLM", "qwen3"),
            };
            let theta = m.rope_theta();
            let mut c = json!({
                "architectures": [arch],
                "model_type": model_type,
                "vocab_size": m.vocab,
                "hidden_size": m.d_model,
                "intermediate_size": m.hidden,
                "num_hidden_layers": m.n_layers,
                "num_attention_heads": m.heads(),
                "num_key_value_heads": m.kv_heads(),
                "head_dim": m.d_model / m.heads(),
                "hidden_act": "silu",
                "max_position_embeddings": m.seq_len,
                "rms_norm_eps": crate::export::NORM_EPS,
                "rope_theta": theta,
                "rope_scaling": null,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta},
                "attention_bias": false,
                "attention_dropout": 0.0,
                "mlp_bias": false,
                "initializer_range": 0.02,
                "tie_word_embeddings": true,
                "use_cache": true,
            });
            if layout == Layout::Qwen3 {
                c["use_sliding_window"] = json!(false);
                c["sliding_window"] = Value::Null;
                c["max_window_layers"] = json!(m.n_layers);
                c["layer_types"] = json!(vec!["full_attention"; m.n_layers]);
            }
            c
        }
        Layout::Sweep => {
            let mut ffn = m.ffn.json();
            ffn["hidden"] = json!(m.hidden);
            json!({
                "architectures": ["SweepForCausalLM"],
                "model_type": "sweep",
                "auto_map": {
                    "AutoConfig": "modeling_sweep.SweepConfig",
                    "AutoModelForCausalLM": "modeling_sweep.SweepForCausalLM",
                },
                "vocab_size": m.vocab,
                "d_model": m.d_model,
                "n_layers": m.n_layers,
                "seq_len": m.seq_len,
                "attention": m.attention.json(),
                "ffn": ffn,
                "residual": m.residual.json(),
                "tie_word_embeddings": false,
                "use_cache": false,
            })
        }
    };
    cfg["torch_dtype"] = json!(precision.torch_name());
    cfg["bos_token_id"] = m.eot();
    cfg["eos_token_id"] = m.eot();
    cfg["sweep"] = provenance;
    cfg
}

/// generation_config.json: greedy decoding, stopping at end-of-text where there is one.
pub fn generation_config(m: &ModelInfo, layout: Layout) -> Value {
    json!({
        "bos_token_id": m.eot(),
        "eos_token_id": m.eot(),
        "pad_token_id": m.eot(),
        "do_sample": false,
        "max_length": m.seq_len,
        "use_cache": layout != Layout::Sweep,
    })
}

/// RMSNorm's epsilon in every norm of the model (components/src/nn.rs).
pub const NORM_EPS: f64 = components::nn::NORM_EPS;

/// sweep's weight name in `layout`'s naming; `None` for the Llama layouts' tied head, which
/// is the embedding.
pub fn weight_name(name: &str, layout: Layout) -> String {
    if layout == Layout::Sweep {
        return name.to_string();
    }
    if name == "wte" {
        return "model.embed_tokens.weight".into();
    }
    if name == "norm_f.gain" {
        return "model.norm.weight".into();
    }
    let Some(rest) = name.strip_prefix("blocks.") else {
        return name.to_string();
    };
    let (layer, inner) = rest.split_once('.').unwrap_or((rest, ""));
    let mapped = match inner {
        "attn_norm.gain" => "input_layernorm.weight".to_string(),
        "ffn_norm.gain" => "post_attention_layernorm.weight".to_string(),
        _ => match inner.split_once('.') {
            Some(("attn", w)) => format!("self_attn.{}_proj.weight", w.trim_end_matches(".weight")),
            Some(("ffn", w)) => format!("mlp.{}_proj.weight", w.trim_end_matches(".weight")),
            _ => inner.to_string(),
        },
    };
    format!("model.layers.{layer}.{mapped}")
}

/// The trial's weights as `layout` names them, in `precision`; Qwen3's q_norm and k_norm
/// gains are added as ones.
pub fn weights(
    m: &ModelInfo,
    layout: Layout,
    precision: Precision,
    tensors: &BTreeMap<String, Tensor>,
) -> candle_core::Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        out.insert(weight_name(name, layout), t.to_dtype(precision.dtype())?);
    }
    if layout == Layout::Qwen3 {
        let head_dim = m.d_model / m.heads();
        let device = candle_core::Device::Cpu;
        for l in 0..m.n_layers {
            for which in ["q_norm", "k_norm"] {
                out.insert(
                    format!("model.layers.{l}.self_attn.{which}.weight"),
                    Tensor::ones(head_dim, precision.dtype(), &device)?,
                );
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
