//! The model card (README.md) of an exported trial: where it came from and what it scored.

use super::{Layout, ModelInfo};

/// What the results DB holds about the trial.
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub trial: String,
    pub sweep: String,
    pub sweep_file: String,
    pub label: String,
    pub seed: u64,
    /// The fully resolved configuration (RON), as the DB stores it.
    pub config: String,
    pub code_version: Option<String>,
    pub device: Option<String>,
    pub params: Option<i64>,
    pub params_embedding: Option<i64>,
    pub tokens: Option<i64>,
    pub wall_s: Option<f64>,
    /// The last recorded value of every metric, by name.
    pub metrics: Vec<(String, f64)>,
}

/// The metrics a card shows, in this order: the final losses, held-out sets, benchmarks.
fn shown(name: &str) -> bool {
    name == "train/loss"
        || name.starts_with("val/")
        || name.starts_with("eval/")
        || (name.starts_with("bench/") && !name.ends_with("/items"))
}

fn count(v: Option<i64>) -> String {
    match v {
        Some(n) if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        Some(n) => n.to_string(),
        None => "not recorded".into(),
    }
}

/// README.md for the export directory.
pub fn card(r: &Record, m: &ModelInfo, layout: Layout, dtype: &str) -> String {
    let tags = [
        "sweep".to_string(),
        m.attention.kind.to_lowercase(),
        m.ffn.kind.to_lowercase(),
        m.residual.kind.to_lowercase(),
    ];
    let mut s = String::new();
    s += "---\n";
    s += "library_name: transformers\n";
    s += "pipeline_tag: text-generation\n";
    s += "# The licence is yours to choose (the weights' and the training data's terms):\n";
    s += "# https://huggingface.co/docs/hub/repositories-licenses\n";
    s += "license: unknown\n";
    s += &format!("tags: [{}]\n", tags.join(", "));
    s += "---\n\n";
    s += &format!("# {} ({})\n\n", r.sweep, shown_label(&r.label));
    s += &format!(
        "A {}-layer, d_model {} decoder trained with `sweep` as trial `{}` (seed {}) of \
         the sweep `{}` ({}).\n\n",
        m.n_layers, m.d_model, r.trial, r.seed, r.sweep, r.sweep_file
    );
    s += "| | |\n|---|---|\n";
    s += &format!("| attention | {} |\n", describe(&m.attention));
    s += &format!("| FFN | {} (hidden {}) |\n", describe(&m.ffn), m.hidden);
    s += &format!("| residual | {} |\n", describe(&m.residual));
    s += &format!(
        "| parameters | {} ({} in the tied embedding) |\n",
        count(r.params),
        count(r.params_embedding)
    );
    s += &format!(
        "| tokenizer | {:?}, vocabulary {} (embedding rows {}) |\n",
        m.tokenizer,
        m.tokenizer.vocab(),
        m.vocab
    );
    s += &format!("| context | {} tokens |\n", m.seq_len);
    s += &format!("| tokens seen | {} |\n", count(r.tokens));
    if let Some(w) = r.wall_s {
        s += &format!(
            "| training time | {w:.0} s on {} |\n",
            r.device.as_deref().unwrap_or("?")
        );
    }
    s += &format!("| architecture | {} |\n", layout.describe());
    s += &format!("| weights | {dtype} |\n");
    if let Some(v) = &r.code_version {
        s += &format!("| sweep version | {v} |\n");
    }
    s += "\n## Results\n\nThe last value the trial recorded of each metric (losses in nats per \
          token, bpb in bits per UTF-8 byte, benchmark accuracies zero-shot):\n\n";
    s += "| metric | value |\n|---|---|\n";
    let mut any = false;
    for (name, v) in r.metrics.iter().filter(|(n, _)| shown(n)) {
        s += &format!("| {name} | {v:.4} |\n");
        any = true;
    }
    if !any {
        s += "| (none recorded) | |\n";
    }
    s += "\n## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n";
    let remote = match layout {
        Layout::Sweep => ", trust_remote_code=True",
        _ => "",
    };
    s += &format!(
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\"{remote})\n\
         tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\"{remote})\n\
         ids = tokenizer(\"The\", return_tensors=\"pt\").input_ids\n\
         print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))\n```\n\n"
    );
    if layout == Layout::Sweep {
        s += "`modeling_sweep.py` implements the model in PyTorch with sweep's equations; it \
              keeps no key/value cache, so `generate` recomputes the sequence at every token, \
              and it ignores attention masks (no padded batches).\n\n";
    }
    s += "## Training configuration\n\nThe trial's fully resolved configuration, as sweep \
          recorded it:\n\n```ron\n";
    s += r.config.trim_end();
    s += "\n```\n";
    s
}

fn shown_label(label: &str) -> &str {
    if label.is_empty() {
        "its only configuration"
    } else {
        label
    }
}

fn describe(p: &super::Part) -> String {
    let params: Vec<String> = p
        .params
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}: {s}"),
            v => format!("{k}: {v}"),
        })
        .collect();
    match params.is_empty() {
        true => p.kind.clone(),
        false => format!("{}({})", p.kind, params.join(", ")),
    }
}
