//! The sweep file: its format, `--set` overrides, validation, and expansion into trials.
//!
//! ```ron
//! Sweep(
//!     name: "quickstart",
//!     seeds: [0, 1],
//!     data: Text(path: "../../shared/data/tinyshakespeare/input.txt", tokenizer: Bytes),
//!     train: (steps: 300, batch: 16, seq_len: 128, eval_every: 50),
//!     model: (d_model: 64, n_layers: 2),
//!     grid: (attention: [Mha(heads: 4)], ffn: [SwiGlu, Gelu]),
//! )
//! ```

mod benchmarks;
mod expand;
mod factors;
pub mod matching;
pub mod raw;
mod shapes;
mod source;

use std::path::Path;

use ron::value::RawValue;
use serde::{Deserialize, Serialize};

pub use benchmarks::parse as parse_benchmarks;
pub use expand::{trial_id, Cell, Trial, Variant};
pub use factors::factors;
pub use shapes::ModelSpec;
pub use source::Source;

use crate::benchmarks::BenchmarkSpec;
use crate::data::{DataSpec, EvalSpec};
use crate::error::InputError;

/// The training budget and loop settings shared by every trial of a sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Optimizer steps per trial (resolved from `tokens` when the file gives those).
    #[serde(default)]
    pub steps: usize,
    /// Training tokens per trial instead of `steps`: the steps are these tokens over a
    /// step's (global batch x seq_len), rounded up, so stacks with different batches compare
    /// at equal data. Kept in the config beside the resolved steps; absent, the config and
    /// the trial ids are what they were without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence (the model's context length).
    pub seq_len: usize,
    /// Steps between evaluations; default: a tenth of the run. The last step always evaluates.
    #[serde(default)]
    pub eval_every: Option<usize>,
    /// Steps between benchmark scorings during training; the end of a trial always scores
    /// them. Left out of the config when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub benchmark_every: Option<usize>,
    /// Batches in the fixed validation subset.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Global gradient-norm clip; 0 disables clipping.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// Steps between train/loss, lr, grad_norm and tokens_per_s records (each the mean over
    /// the steps since the last record, except lr and grad_norm: their last value).
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Steps between checkpoints (model, optimizer, data position); default: every
    /// evaluation; 0: none (the final weights are kept either way). How often a trial is
    /// saved does not change what it computes, so it is left out of the trial's config and id.
    #[serde(default, skip_serializing)]
    pub checkpoint_every: Option<usize>,
    /// Checkpoints kept per trial, newest first (default 2): a damaged newest one falls back
    /// to the one before. Like `checkpoint_every`, not part of the trial's config or id.
    #[serde(default, skip_serializing)]
    pub keep_checkpoints: Option<usize>,
    /// The dtype of matmuls and activations. Left out of the stored config (and so of the
    /// trial id) when it is the default, so that sweeps recorded before it existed resume.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// Micro-batches of `batch` sequences whose gradients are summed into each step, for
    /// global batches larger than memory allows. Left out of the config when 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub grad_accum: usize,
    /// GPUs (ranks) one trial trains on, data-parallel: each takes its own `batch` sequences
    /// of every micro-batch, so a step sees `batch * gpus_per_trial * grad_accum` sequences.
    /// It changes the global batch, so it is part of the config (when not 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub gpus_per_trial: usize,
    /// Activations rebuilt in the backward pass instead of kept: `Blocks` reruns each block's
    /// forward pass there, for less memory and one more forward pass a step. How a trial
    /// computes, not what: left out of its config and id, like the checkpoints' settings.
    #[serde(default, skip_serializing)]
    pub recompute: Recompute,
    /// `Step`: on CUDA, each step's forward and backward passes replay one CUDA graph,
    /// captured at the first step (runner/src/graph.rs), instead of launching their kernels
    /// one by one from the host; for small models, whose steps the host's launches bound.
    /// The same kernels in the same order: how a trial computes, not what, so it is left out
    /// of its config and id.
    #[serde(default, skip_serializing)]
    pub graph: Graph,
}

/// Whether a step's passes run as a captured CUDA graph (`train.graph`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Graph {
    /// Every kernel launched from the host.
    #[default]
    Off,
    /// The forward and backward passes captured once and replayed each step.
    Step,
}

/// What the backward pass rebuilds instead of the forward pass keeping it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recompute {
    /// Nothing: every activation the backward pass needs is kept.
    #[default]
    None,
    /// Each block's activations: the graph keeps the blocks' inputs and outputs.
    Blocks,
}

/// `Bf16`: bf16 matmuls and activations over f32 master weights; the optimizer state, norm
/// statistics, softmax, the loss and the mHC coefficients and Sinkhorn stay f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

fn one() -> usize {
    1
}
fn is_one(n: &usize) -> bool {
    *n == 1
}
fn default_eval_batches() -> usize {
    8
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_log_every() -> usize {
    10
}

impl TrainSpec {
    pub fn eval_every(&self) -> usize {
        self.eval_every.unwrap_or((self.steps / 10).max(1))
    }

    pub fn checkpoint_every(&self) -> usize {
        self.checkpoint_every.unwrap_or_else(|| self.eval_every())
    }

    pub fn keep_checkpoints(&self) -> usize {
        self.keep_checkpoints
            .unwrap_or(crate::checkpoint::DEFAULT_KEEP)
    }

    /// Sequences per optimizer step over all ranks and micro-batches.
    pub fn global_batch(&self) -> usize {
        self.batch * self.gpus_per_trial * self.grad_accum
    }
}

/// The sweep file as written; component lists stay raw text until the registry parses them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "Sweep")]
struct SweepFile<'a> {
    name: String,
    seeds: Vec<u64>,
    data: DataSpec,
    /// Held-out evaluation sets, evaluated at every evaluation.
    #[serde(default)]
    evals: Vec<EvalSpec>,
    /// The folder of the benchmark files (the tasks' own file names in it).
    #[serde(default)]
    benchmark_dir: Option<String>,
    /// Zero-shot benchmarks, scored at the end of every trial (spec/benchmarks.rs).
    #[serde(borrow, default)]
    benchmarks: Option<&'a RawValue>,
    /// Every cell solves for its d_model to meet this budget (spec/matching.rs).
    #[serde(default, rename = "match")]
    matching: Option<matching::MatchSpec>,
    train: TrainSpec,
    model: shapes::ModelAxes,
    /// One grid `( attention: [...], ... )`, or a list of grids whose cells are joined.
    #[serde(borrow)]
    grid: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile<'a> {
    #[serde(borrow, default)]
    attention: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ffn: Option<&'a RawValue>,
    #[serde(borrow, default)]
    residual: Option<&'a RawValue>,
    #[serde(borrow, default)]
    optimizer: Option<&'a RawValue>,
    #[serde(borrow, default)]
    schedule: Option<&'a RawValue>,
}

/// A validated, expanded sweep.
#[derive(Debug)]
pub struct Sweep {
    pub name: String,
    pub source: Source,
    pub seeds: Vec<u64>,
    pub data: DataSpec,
    pub evals: Vec<EvalSpec>,
    /// Zero-shot benchmarks, each with its file resolved.
    pub benchmarks: Vec<BenchmarkSpec>,
    /// The folder of the benchmark files, as written.
    pub benchmark_dir: Option<String>,
    pub train: TrainSpec,
    /// The model shapes: one, or every combination of the size axes, d_model-major (d_model
    /// 0 where `matching` solves it per cell).
    pub shapes: Vec<ModelSpec>,
    /// Per shape, the budget its cells solve their width for: the shape's own `match`, else
    /// the sweep's.
    pub targets: Vec<Option<matching::MatchSpec>>,
    /// The sweep's `match`, if any.
    pub matching: Option<matching::MatchSpec>,
    /// The variants of each slot, in `registry::Slot::ALL` order.
    pub axes: Vec<Vec<Variant>>,
    /// Every trial, seed-major: all cells for the first seed, then the next seed.
    pub trials: Vec<Trial>,
}

/// The shard (of `n`) a trial belongs to: its id (hex of a SHA-256 prefix) modulo `n`, so the
/// partition is fixed by the trials themselves, whatever their order or the file's edits.
pub fn shard_of(id: &str, n: u64) -> u64 {
    u64::from_str_radix(id.get(..16).unwrap_or(id), 16).unwrap_or(0) % n
}

/// The trials of a sweep record of generation `generation`: the first (0) keeps the ids as
/// expanded; each `--fresh` record salts them, so its trials are new rows.
pub fn salted(mut trials: Vec<Trial>, generation: u32) -> Vec<Trial> {
    if generation > 0 {
        for t in &mut trials {
            t.id = trial_id(&format!("{}\n// generation {generation}", t.config));
        }
    }
    trials
}

impl Sweep {
    /// Reads, overrides, validates and expands a sweep file. Nothing is written.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, InputError> {
        let mut source = Source::read(path)?;
        for s in sets {
            source.apply_set(s)?;
        }
        Self::from_source(source)
    }

    pub fn from_source(source: Source) -> Result<Self, InputError> {
        // `eval_every: 50` rather than `eval_every: Some(50)`.
        let options = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
        let file: SweepFile = options
            .from_str(&source.text)
            .map_err(|e| source.ron_error(&e))?;
        let name = file.name.clone();
        if name.trim().is_empty() {
            return Err(source.field_error("name", "must not be empty"));
        }
        if file.seeds.is_empty() {
            return Err(source.field_error("seeds", "is empty: list at least one seed"));
        }
        if let Some(d) = file
            .seeds
            .iter()
            .enumerate()
            .find_map(|(i, s)| file.seeds[..i].contains(s).then_some(s))
        {
            return Err(source.field_error("seeds", format!("lists seed {d} twice")));
        }
        let mut train = file.train.clone();
        resolve_steps(&source, &mut train)?;
        check_train(&source, &train)?;
        train.eval_every = Some(train.eval_every());
        if let Some(m) = &file.matching {
            m.check().map_err(|e| source.field_error("match", e))?;
        }
        let (shapes, targets): (Vec<ModelSpec>, Vec<Option<matching::MatchSpec>>) =
            shapes::model_shapes(&source, &file.model, file.matching.as_ref())?
                .into_iter()
                .unzip();
        file.data.check(&source)?;
        crate::data::evals::check(&file.evals, file.data.tokenizer(), &source)?;
        let benchmarks = match file.benchmarks {
            Some(raw) => {
                benchmarks::parse(&source, raw.trim().get_ron(), file.benchmark_dir.as_deref())?
            }
            None => Vec::new(),
        };
        if train.benchmark_every.is_some() && benchmarks.is_empty() {
            return Err(source.field_error(
                "train.benchmark_every",
                "there are no benchmarks to score: list them in `benchmarks: [...]`",
            ));
        }

        let (axes, cells) = parse_grids(&source, file.grid.trim().get_ron(), &options)?;
        let dims: Vec<registry::Dims> = shapes
            .iter()
            .map(|m| dims_of(m, &file.data, &train))
            .collect();
        let trials = expand::trials(
            &source,
            &axes,
            &cells,
            &file.seeds,
            &expand::Shapes {
                models: &shapes,
                dims: &dims,
                targets: &targets,
            },
            &expand::Shared {
                data: &file.data,
                evals: &file.evals,
                benchmarks: &benchmarks,
                train: &train,
            },
        )?;
        Ok(Self {
            name,
            seeds: file.seeds,
            data: file.data,
            evals: file.evals,
            benchmarks,
            benchmark_dir: file.benchmark_dir,
            train,
            shapes,
            targets,
            matching: file.matching.clone(),
            axes,
            trials,
            source,
        })
    }

    /// The held-out evaluation sets, tokenized with the trial's tokenizer, by name.
    pub fn held_out_sets(&self) -> Result<Vec<(String, crate::data::Split)>, InputError> {
        crate::data::evals::load(
            &self.evals,
            self.data.tokenizer(),
            &self.source,
            self.train.batch,
            self.train.seq_len,
        )
    }

    /// The benchmarks, read and tokenized with the trial's tokenizer.
    pub fn benchmark_sets(&self) -> Result<Vec<crate::benchmarks::Benchmark>, InputError> {
        let base = self.source.base_dir();
        self.benchmarks
            .iter()
            .map(|b| {
                let file = b.file(None, &base).map_err(InputError::new)?;
                crate::benchmarks::Benchmark::load(b, &file, self.data.tokenizer())
            })
            .collect()
    }

    /// The model's vocabulary (the tokenizer's, padded): every trial shares it, while each
    /// carries its own shape in `Trial::dims`.
    pub fn vocab(&self) -> usize {
        self.data.tokenizer().model_vocab()
    }
}

/// A grid cell as the index of its variant in each slot's axis.
type CellIndex = Vec<usize>;

/// The grid section: one grid, or a list of grids whose cells are joined in order (a cell
/// that an earlier grid already holds is not repeated). Returns the variants of each slot
/// over all grids and the cells as indices into them.
fn parse_grids(
    source: &Source,
    text: &str,
    options: &ron::Options,
) -> Result<(Vec<Vec<Variant>>, Vec<CellIndex>), InputError> {
    let grids = if text.starts_with('[') {
        let base = raw::offset_in(&source.text, text);
        let items = raw::items(text).map_err(|e| source.ron_error_in(base, &e))?;
        if items.is_empty() {
            return Err(source.error_at(text, "grid is an empty list: give at least one grid"));
        }
        items
    } else {
        vec![text]
    };
    let mut axes: Vec<Vec<Variant>> = vec![Vec::new(); registry::Slot::ALL.len()];
    let mut cells: Vec<CellIndex> = Vec::new();
    for text in grids {
        let base = raw::offset_in(&source.text, text);
        let g: GridFile = options
            .from_str(text)
            .map_err(|e| source.ron_error_in(base, &e))?;
        let local = expand::parse_axes(
            source,
            [g.attention, g.ffn, g.residual, g.optimizer, g.schedule],
        )?;
        // Where each of this grid's variants sits among all grids' variants of its slot.
        let index: Vec<Vec<usize>> = local
            .into_iter()
            .zip(axes.iter_mut())
            .map(|(variants, all)| {
                variants
                    .into_iter()
                    .map(
                        |v| match all.iter().position(|a| a.canonical == v.canonical) {
                            Some(i) => i,
                            None => {
                                all.push(v);
                                all.len() - 1
                            }
                        },
                    )
                    .collect()
            })
            .collect();
        let lens: Vec<usize> = index.iter().map(Vec::len).collect();
        for combo in expand::product(&lens) {
            let cell: Vec<usize> = combo.iter().zip(&index).map(|(&i, ix)| ix[i]).collect();
            if !cells.contains(&cell) {
                cells.push(cell);
            }
        }
    }
    Ok((axes, cells))
}

fn dims_of(model: &ModelSpec, data: &DataSpec, train: &TrainSpec) -> registry::Dims {
    registry::Dims {
        d_model: model.d_model,
        n_layers: model.n_layers,
        vocab: data.tokenizer().model_vocab(),
        seq_len: train.seq_len,
    }
}

/// `train.tokens` into steps; exactly one of the two must be given.
fn resolve_steps(source: &Source, t: &mut TrainSpec) -> Result<(), InputError> {
    let per_step = (t.global_batch() * t.seq_len) as u64;
    match t.tokens {
        None if source.field("train.steps").is_none() => Err(source.field_error(
            "train",
            "needs `steps` (optimizer steps per trial) or `tokens` (training tokens per trial)",
        )),
        None => Ok(()),
        Some(_) if t.steps > 0 => Err(source.field_error(
            "train.tokens",
            "give steps or tokens, not both (with --set train.tokens=N on a file that gives \
             steps, add --set train.steps=0)",
        )),
        Some(0) => Err(source.field_error("train.tokens", "must be at least 1, got 0")),
        // A zero batch or sequence length is check_train's to report.
        Some(_) if per_step == 0 => Ok(()),
        Some(n) => {
            t.steps = n.div_ceil(per_step) as usize;
            Ok(())
        }
    }
}

fn check_train(source: &Source, t: &TrainSpec) -> Result<(), InputError> {
    let positive = [
        ("train.steps", t.steps),
        ("train.batch", t.batch),
        ("train.seq_len", t.seq_len),
        ("train.eval_batches", t.eval_batches),
        ("train.log_every", t.log_every),
        ("train.grad_accum", t.grad_accum),
        ("train.gpus_per_trial", t.gpus_per_trial),
    ];
    for (path, v) in positive {
        if v == 0 {
            return Err(source.field_error(path, "must be at least 1, got 0"));
        }
    }
    if t.keep_checkpoints == Some(0) {
        return Err(source.field_error(
            "train.keep_checkpoints",
            "must be at least 1, got 0 (set checkpoint_every: 0 to keep none)",
        ));
    }
    if t.eval_every == Some(0) {
        return Err(source.field_error(
            "train.eval_every",
            "must be at least 1, got 0 (leave it out for a tenth of the run)",
        ));
    }
    if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
        return Err(source.field_error(
            "train.grad_clip",
            format!("must be >= 0 (0 disables clipping), got {}", t.grad_clip),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
