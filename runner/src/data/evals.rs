//! Held-out evaluation sets (the `evals:` section of a sweep file): text no trial trains on,
//! tokenized with the trial's tokenizer and evaluated at every evaluation, as the Goedel
//! results table reports BPB on WikiText-2 beside the training corpus's own held-out text.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{load_text, resolve, Paths, Split, Tokenizer};
use crate::error::InputError;
use crate::spec::Source;

/// One evaluation set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum EvalSpec {
    /// UTF-8 text files, all of them evaluated. `name` makes the metric names
    /// (`eval/<name>/loss`, `eval/<name>/bpb`); `tokenizer`, if given, must be the trial's.
    Text {
        name: String,
        path: Paths,
        #[serde(default, skip_serializing)]
        tokenizer: Option<Tokenizer>,
    },
}

impl EvalSpec {
    pub fn name(&self) -> &str {
        match self {
            EvalSpec::Text { name, .. } => name,
        }
    }
}

/// Checks every evaluation set at read time: names usable in metric names and unique, the
/// trial's tokenizer, files that exist.
pub fn check(evals: &[EvalSpec], tok: Tokenizer, source: &Source) -> Result<(), InputError> {
    let base = source.base_dir();
    for (i, e) in evals.iter().enumerate() {
        let EvalSpec::Text {
            name,
            path,
            tokenizer,
        } = e;
        let err = |msg: String| source.field_error("evals", format!("`{name}`: {msg}"));
        let usable = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !usable {
            return Err(err(
                "a name is lower-case letters, digits, `_` and `-` (it makes the metric names \
                 eval/<name>/loss and eval/<name>/bpb)"
                    .into(),
            ));
        }
        if evals[..i].iter().any(|o| o.name() == name) {
            return Err(err("is named twice".into()));
        }
        if let Some(t) = tokenizer.filter(|t| *t != tok) {
            return Err(err(format!(
                "tokenizer {t:?}: an evaluation set is read with the trial's tokenizer \
                 ({tok:?}, from data); leave it out"
            )));
        }
        resolve(&base, path).map_err(|e| err(format!("path: {e}")))?;
    }
    Ok(())
}

/// The files of an evaluation set.
pub fn files(e: &EvalSpec, source: &Source) -> Result<Vec<std::path::PathBuf>, InputError> {
    let EvalSpec::Text { name, path, .. } = e;
    resolve(&source.base_dir(), path)
        .map_err(|msg| source.field_error("evals", format!("`{name}`: path: {msg}")))
}

/// Tokenizes every evaluation set; each must hold at least one full evaluation batch of
/// `batch` windows of `seq_len + 1` tokens.
pub fn load(
    evals: &[EvalSpec],
    tok: Tokenizer,
    source: &Source,
    batch: usize,
    seq_len: usize,
) -> Result<Vec<(String, Split)>, InputError> {
    let mut out = Vec::new();
    for e in evals {
        let name = e.name();
        let err = |msg: String| source.field_error("evals", format!("`{name}`: {msg}"));
        let mut split = Split::default();
        for file in files(e, source)? {
            let data = load_text(&file, tok).map_err(|e| err(format!("path: {e}")))?;
            let n = data.len();
            split.push(Arc::new(data), 0..n);
        }
        if split.tokens() / (seq_len + 1) < batch {
            return Err(err(format!(
                "{} tokens: fewer than one evaluation batch ({batch} windows of seq_len + 1 = \
                 {} tokens)",
                split.tokens(),
                seq_len + 1
            )));
        }
        out.push((name.to_string(), split));
    }
    Ok(out)
}
