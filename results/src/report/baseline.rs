//! `--baseline residual=PreNorm`: which configuration each row is compared with.
//!
//! The selector names values of factors (`residual=PreNorm`, `optimizer.lr=0.003`,
//! `train.steps=300`, several joined by commas or spaces). A row's baseline is the
//! configuration that matches the selector and agrees with the row on every other varying
//! column; parameters of a selected component (`residual.streams` under `residual`) do not
//! have to agree, nor, between two rows that both name a `model.scale`, the shape's solved
//! fields (`model.d_model`, `model.n_layers`): under `match` each stack solves its own width
//! at a scale, so two stacks at one scale differ in width by design. When only one configuration
//! matches the selector it is everyone's baseline, whatever else differs (two stacks compared
//! as a whole).

use super::stats::welch;
use super::{Row, VsBaseline};
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Selector {
    /// As written.
    pub text: String,
    pub pairs: Vec<(String, String)>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self> {
        let mut pairs = Vec::new();
        for part in split_top_level(text) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(Error::Input(format!(
                    "--baseline {text:?}: `{part}` is not KEY=VALUE; write e.g. \
                     --baseline residual=PreNorm"
                )));
            };
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || v.is_empty() {
                return Err(Error::Input(format!(
                    "--baseline {text:?}: `{part}` needs both a key and a value, e.g. \
                     residual=PreNorm"
                )));
            }
            pairs.push((k.to_string(), v.to_string()));
        }
        if pairs.is_empty() {
            return Err(Error::Input(
                "--baseline is empty; write e.g. --baseline residual=PreNorm".into(),
            ));
        }
        Ok(Self {
            text: text.to_string(),
            pairs,
        })
    }

    fn matches(&self, row: &Row) -> bool {
        self.pairs
            .iter()
            .all(|(k, v)| row.factor(k).is_some_and(|have| same_value(have, v)))
    }

    /// Whether a column is set by the selector, or is a parameter of a component it sets.
    fn covers(&self, column: &str) -> bool {
        self.pairs.iter().any(|(k, _)| {
            column == k
                || column
                    .strip_prefix(k.as_str())
                    .is_some_and(|r| r.starts_with('.'))
        })
    }

    /// Fills every row's `vs_baseline`, comparing `metric`.
    pub(crate) fn compare(&self, columns: &[String], rows: &mut [Row], metric: &str) -> Result<()> {
        for (k, v) in &self.pairs {
            let mut values: Vec<&str> = rows.iter().filter_map(|r| r.factor(k)).collect();
            values.dedup();
            if values.is_empty() {
                return Err(Error::Input(format!(
                    "--baseline {}: the sweep's configurations have no `{k}`; keys that vary: {}",
                    self.text,
                    listed(columns)
                )));
            }
            if !values.iter().any(|have| same_value(have, v)) {
                values.sort();
                values.dedup();
                return Err(Error::Input(format!(
                    "--baseline {}: no configuration has {k}={v}; {k} takes: {}",
                    self.text,
                    values.join(", ")
                )));
            }
        }
        let candidates: Vec<usize> = (0..rows.len())
            .filter(|&j| self.matches(&rows[j]))
            .collect();
        let others: Vec<&String> = columns.iter().filter(|c| !self.covers(c)).collect();
        // Two rows that both name a scale (and agree on it) need not agree on its solved fields.
        let scaled = |a: &Row, b: &Row| {
            a.factor("model.scale").is_some() && b.factor("model.scale").is_some()
        };
        let agree = |a: &Row, b: &Row| {
            others.iter().all(|c| {
                let shape = c.as_str() == "model.d_model" || c.as_str() == "model.n_layers";
                (shape && scaled(a, b)) || a.factor(c) == b.factor(c)
            })
        };
        for (n, &a) in candidates.iter().enumerate() {
            if let Some(&b) = candidates[n + 1..]
                .iter()
                .find(|&&b| agree(&rows[a], &rows[b]))
            {
                let differ: Vec<&str> = columns
                    .iter()
                    .filter(|c| rows[a].factor(c) != rows[b].factor(c))
                    .map(String::as_str)
                    .collect();
                return Err(Error::Input(format!(
                    "--baseline {}: matches two configurations ({} and {}) that differ only in \
                     {}; name the one to compare with, e.g. --baseline \"{}, {}={}\"",
                    self.text,
                    rows[a].name,
                    rows[b].name,
                    differ.join(", "),
                    self.text,
                    differ[0],
                    rows[a].factor(differ[0]).unwrap_or("-")
                )));
            }
        }
        for i in 0..rows.len() {
            let vs = if candidates.contains(&i) {
                VsBaseline::IsBaseline
            } else {
                let found = candidates
                    .iter()
                    .copied()
                    .find(|&j| agree(&rows[i], &rows[j]))
                    .or_else(|| (candidates.len() == 1).then(|| candidates[0]));
                let pair = |j: usize| Some((j, rows[i].summary(metric)?, rows[j].summary(metric)?));
                match found.and_then(pair) {
                    Some((j, a, b)) => VsBaseline::Diff {
                        baseline: j,
                        diff: a.mean - b.mean,
                        test: welch(&a, &b),
                    },
                    None => VsBaseline::NoMatch,
                }
            };
            rows[i].vs_baseline = Some(vs);
        }
        Ok(())
    }
}

fn listed(columns: &[String]) -> String {
    if columns.is_empty() {
        "none (the sweep has one configuration)".into()
    } else {
        columns.join(", ")
    }
}

/// Equal as written, or as numbers (`3e-3` and `0.003`).
fn same_value(a: &str, b: &str) -> bool {
    a == b || matches!((a.parse::<f64>(), b.parse::<f64>()), (Ok(x), Ok(y)) if x == y)
}

/// Splits at commas and spaces outside brackets, so `betas=(0.9, 0.95)` stays whole.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | ' ' | '\t' if depth == 0 => {
                if i > start {
                    out.push(&s[start..i]);
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}
