//! The report: a sweep's trials read back from the store, seeds collapsed into
//! configurations (polars groups and aggregates them), compared with a baseline, printed as a
//! table, CSV, JSON or Markdown, and drawn as PNG and SVG charts (plotters).
//!
//! The store does not parse sweep files, so the caller hands each trial's resolved
//! configuration over already flattened into `key -> value` factors (`residual` -> `Mhc`,
//! `residual.streams` -> `4`, `train.steps` -> `300`).

mod baseline;
mod format;
pub mod frontier;
pub mod html;
mod load;
pub mod plot;
pub mod stats;
mod summary;
#[cfg(test)]
mod tests;

pub use baseline::Selector;
pub use format::Format;
pub use load::{load, Curves};
pub use stats::{Comparison, Summary};
pub use summary::summarize;

use crate::TrialRow;

/// One trial as the report reads it.
#[derive(Clone, Debug)]
pub struct TrialData {
    pub row: TrialRow,
    /// The resolved configuration without the seed, flattened, in a fixed order.
    pub factors: Vec<(String, String)>,
    /// val/bpb at the last evaluation.
    pub final_bpb: Option<f64>,
    /// The lowest val/loss over the evaluations.
    pub best_val_loss: Option<f64>,
    /// Composite forward and backward Amax gain over the whole depth, last evaluation.
    pub amax_fwd: Option<f64>,
    pub amax_bwd: Option<f64>,
    /// Median of the logged training throughputs.
    pub tokens_per_s: Option<f64>,
    /// What happened to the trial besides its metrics (checkpoint fallbacks, ...).
    pub events: Vec<crate::EventRow>,
    /// eval/<name>/bpb at the last evaluation, by held-out set name.
    pub evals_bpb: std::collections::BTreeMap<String, f64>,
    /// The last value of every metric a row can be compared by (`val/bpb`, `val/loss`,
    /// `eval/<set>/bpb`, `bench/<task>/acc`, ...), by name.
    pub finals: std::collections::BTreeMap<String, f64>,
}

/// The rule `train/spikes` counts by (runner/src/spikes.rs applies it; the report's notes
/// state it): a step whose training loss is more than SPIKE_MARGIN above the median of the
/// previous SPIKE_WINDOW steps' losses.
pub const SPIKE_WINDOW: usize = 64;
pub const SPIKE_MARGIN: f64 = 0.1;

/// Whether a larger value of metric `name` is better (accuracies) rather than a smaller one
/// (losses, bits per byte, perplexities).
pub fn higher_is_better(name: &str) -> bool {
    name.ends_with("/acc") || name.ends_with("/acc_norm")
}

/// The metrics a report can sort and compare rows by: the last evaluation's, and the
/// benchmarks' accuracies and perplexities (not their item counts or chance levels).
pub fn comparable(name: &str) -> bool {
    matches!(name, "val/bpb" | "val/loss" | "train/spikes")
        || (name.starts_with("eval/") && (name.ends_with("/bpb") || name.ends_with("/loss")))
        || (name.starts_with("bench/") && (higher_is_better(name) || name.ends_with("/ppl")))
}

/// How many seeds of a configuration are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub done: usize,
    pub diverged: usize,
    pub failed: usize,
    pub running: usize,
    pub queued: usize,
    /// Trial events (a checkpoint that failed verification, one that could not be written).
    pub events: usize,
}

impl Counts {
    /// Each state with its count, in the order trials move through them.
    pub fn entries(&self) -> [(&'static str, usize); 5] {
        [
            ("done", self.done),
            ("diverged", self.diverged),
            ("failed", self.failed),
            ("running", self.running),
            ("queued", self.queued),
        ]
    }

    /// `2 done, 1 running`: the states that occur, and `1 event` when a trial had any.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .entries()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        match self.events {
            0 => {}
            1 => parts.push("1 event".into()),
            n => parts.push(format!("{n} events")),
        }
        parts.join(", ")
    }
}

/// A configuration compared with its baseline.
#[derive(Clone, Debug, PartialEq)]
pub enum VsBaseline {
    /// This row is (one of) the baseline configuration(s).
    IsBaseline,
    /// No configuration matches the selector with this row's other components, or either
    /// side has no finished seed.
    NoMatch,
    /// Difference of the means of the report's metric (this minus the baseline); the test
    /// needs at least two seeds with some spread on each side.
    Diff {
        baseline: usize,
        diff: f64,
        test: Option<Comparison>,
    },
}

/// One configuration: the seeds of one cell.
#[derive(Clone, Debug)]
pub struct Row {
    /// The values of the report's varying columns, `-` where the configuration has no such
    /// key.
    pub values: Vec<String>,
    /// Every factor of the configuration.
    pub factors: Vec<(String, String)>,
    /// Short name for legends: the varying values, `param=value` for parameters.
    pub name: String,
    pub counts: Counts,
    /// Final val/bpb over the done seeds.
    pub bpb: Option<Summary>,
    /// (seed, final val/bpb) of each done seed.
    pub bpb_seeds: Vec<(u64, f64)>,
    /// Every comparable final metric over the done seeds that recorded it, by name.
    pub metrics: std::collections::BTreeMap<String, Summary>,
    /// Means over the seeds that recorded them.
    pub best_val_loss: Option<f64>,
    pub amax_fwd: Option<f64>,
    pub amax_bwd: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub n_params: Option<i64>,
    pub vs_baseline: Option<VsBaseline>,
    /// The trials, in the sweep's order.
    pub trials: Vec<TrialData>,
}

impl Row {
    /// The summary over seeds of a final metric.
    pub fn summary(&self, metric: &str) -> Option<Summary> {
        match metric {
            "val/bpb" => self.bpb,
            m => self.metrics.get(m).copied(),
        }
    }

    /// The value of one factor, if the configuration has it.
    pub fn factor(&self, key: &str) -> Option<&str> {
        factor(&self.factors, key)
    }

    /// The mean final BPB on held-out set `name` over the done seeds that recorded it.
    pub fn eval_bpb(&self, name: &str) -> Option<f64> {
        let v: Vec<f64> = self
            .trials
            .iter()
            .filter(|t| t.row.status == crate::Status::Done)
            .filter_map(|t| t.evals_bpb.get(name).copied())
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

fn factor<'a>(factors: &'a [(String, String)], key: &str) -> Option<&'a str> {
    factors
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A sweep's configurations, best val/bpb first.
#[derive(Clone, Debug)]
pub struct Report {
    pub sweep: String,
    /// The factor keys whose value differs between configurations.
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    /// The `--baseline` selector as given.
    pub baseline: Option<String>,
    /// The metric rows are sorted and compared by (`val/bpb` unless `--metric` says).
    pub metric: String,
    /// Chance accuracy of each benchmark by its metric name (`hellaswag` -> 0.25), for the
    /// charts; the caller knows the tasks.
    pub chance: std::collections::BTreeMap<String, f64>,
}

impl Report {
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for r in &self.rows {
            c.done += r.counts.done;
            c.diverged += r.counts.diverged;
            c.failed += r.counts.failed;
            c.running += r.counts.running;
            c.queued += r.counts.queued;
            c.events += r.counts.events;
        }
        c
    }

    /// The held-out sets any trial was evaluated on, by name.
    pub fn eval_names(&self) -> Vec<String> {
        let names: std::collections::BTreeSet<&String> = self
            .rows
            .iter()
            .flat_map(|r| &r.trials)
            .flat_map(|t| t.evals_bpb.keys())
            .collect();
        names.into_iter().cloned().collect()
    }

    /// The benchmark metrics any trial recorded (`bench/<task>/acc`, ...), by name.
    pub fn bench_metrics(&self) -> Vec<String> {
        let names: std::collections::BTreeSet<&String> = self
            .rows
            .iter()
            .flat_map(|r| r.metrics.keys())
            .filter(|k| k.starts_with("bench/"))
            .collect();
        names.into_iter().cloned().collect()
    }

    /// The benchmarks' headline metrics, one per task: acc_norm where the task has it
    /// (multiple choice), acc otherwise (WinoGrande, LAMBADA).
    pub fn bench_headlines(&self) -> Vec<String> {
        let all = self.bench_metrics();
        let mut out: Vec<String> = Vec::new();
        for m in &all {
            let Some(task) = m.strip_prefix("bench/").and_then(|r| r.split('/').next()) else {
                continue;
            };
            let norm = format!("bench/{task}/acc_norm");
            let pick = if all.contains(&norm) {
                norm
            } else {
                format!("bench/{task}/acc")
            };
            if all.contains(&pick) && !out.contains(&pick) {
                out.push(pick);
            }
        }
        out
    }

    /// Every comparable metric any row has.
    pub fn metric_names(&self) -> Vec<String> {
        let mut names: std::collections::BTreeSet<String> = self
            .rows
            .iter()
            .flat_map(|r| r.metrics.keys().cloned())
            .collect();
        names.insert("val/bpb".into());
        names.into_iter().collect()
    }

    pub fn has_amplification(&self) -> bool {
        self.rows.iter().any(|r| r.amax_fwd.is_some())
    }

    /// Whether any configuration's trials counted a loss spike (`train/spikes`).
    pub fn has_spikes(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.summary("train/spikes").is_some_and(|s| s.mean > 0.0))
    }
}
