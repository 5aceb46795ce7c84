//! Zero-shot benchmarks (the `benchmarks:` section of a sweep file): the multiple-choice and
//! cloze tasks of the Goedel-mHC-1B results table and a few more, scored as
//! lm-evaluation-harness scores them, at the end of every trial (and every
//! `train.benchmark_every` steps) and later by `sweep eval` from saved weights.
//!
//! - tasks.rs names the tasks: their files, prompts and chance levels;
//! - items.rs reads a task's JSONL file into requests (context, continuation) and tokenizes
//!   them as the harness does;
//! - score.rs turns each request's log-likelihood into the task's metrics (acc, acc_norm,
//!   LAMBADA's greedy accuracy), whatever computed the log-likelihoods;
//! - scorer.rs computes them with a trial's model, batched on its device.

pub mod items;
pub mod score;
pub mod scorer;
pub mod tasks;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use items::{Item, Request};
pub use score::{Scored, Tally};
pub use scorer::ModelScorer;
pub use tasks::Task;

use crate::data::Tokenizer;
use crate::error::InputError;
use crate::model::Gpt;
use crate::parallel::Group;

/// One benchmark of a sweep file: `HellaSwag`, `ArcEasy(limit: 200)`,
/// `WinoGrande(path: "data/wino.jsonl")`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchmarkSpec {
    pub task: Task,
    /// The task's JSONL file; by default the task's file in `benchmark_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Score only the first `limit` items (quick runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl BenchmarkSpec {
    /// The file this benchmark reads: its own path, or the task's file in `dir`, both
    /// relative to `base` (the sweep file's folder).
    pub fn file(&self, dir: Option<&str>, base: &Path) -> Result<PathBuf, String> {
        let path = match (&self.path, dir) {
            (Some(p), _) => PathBuf::from(p),
            (None, Some(d)) => Path::new(d).join(self.task.file()),
            (None, None) => {
                return Err(format!(
                    "{} has no path: give {}(path: \".../{}\") or set benchmark_dir to the \
                     folder of the benchmark files (e.g. ../shared/data/eval)",
                    self.task.name(),
                    self.task.name(),
                    self.task.file()
                ))
            }
        };
        let path = if path.is_absolute() {
            path
        } else {
            base.join(path)
        };
        if !path.is_file() {
            return Err(format!(
                "{}: {} does not exist",
                self.task.name(),
                path.display()
            ));
        }
        Ok(path)
    }
}

/// A benchmark ready to score: its task and its items, tokenized.
pub struct Benchmark {
    pub task: Task,
    pub items: Vec<Item>,
}

impl Benchmark {
    /// Reads and tokenizes a benchmark's file (its first `limit` items).
    pub fn load(spec: &BenchmarkSpec, file: &Path, tok: Tokenizer) -> Result<Self, InputError> {
        let items = items::read(spec.task, file, spec.limit, tok)?;
        Ok(Self {
            task: spec.task,
            items,
        })
    }

    /// The metrics of a tally of this benchmark: (name, value), names `bench/<task>/...`.
    pub fn metrics(&self, tally: &Tally) -> Vec<(String, f64)> {
        tally
            .metrics(self.task)
            .into_iter()
            .map(|(m, v)| (format!("bench/{}/{m}", self.task.metric()), v))
            .collect()
    }
}

/// Scores every benchmark with `model`: rank r of the trial's ranks takes every world-th
/// item from r, and the tallies are summed over the ranks. Batches hold about `tokens`
/// tokens. Returns the metrics of all of them.
pub fn run(
    model: &Gpt,
    benchmarks: &[Benchmark],
    seq_len: usize,
    tokens: usize,
    group: &dyn Group,
) -> candle_core::Result<Vec<(String, f64)>> {
    let Some(device) = model.params().first().map(|p| p.var.device().clone()) else {
        candle_core::bail!("a model without parameters")
    };
    let mut scorer = ModelScorer {
        model,
        device: &device,
        seq_len,
        tokens,
    };
    let (rank, world) = (group.rank(), group.world());
    let mut out = Vec::new();
    for b in benchmarks {
        let mine = score::tally(b.task, &b.items, &mut scorer, |i| i % world == rank)?;
        let all = if world > 1 {
            let t = candle_core::Tensor::new(mine.to_vec(), &device)?;
            Tally::from_slice(&group.sum(&t)?.to_vec1::<f32>()?)
        } else {
            mine
        };
        out.extend(b.metrics(&all));
    }
    Ok(out)
}
