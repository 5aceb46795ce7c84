//! The slots and the traits a component implements to fill one.

use std::collections::HashMap;
use std::fmt;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};

use crate::detached::Detached;
use crate::params::{Param, ParamBuilder};

/// Where a component plugs into a model. A closed set: a new component fills one of these;
/// a new slot is a change to the runner's model assembly, not to the registry alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    Attention,
    Ffn,
    Residual,
    Optimizer,
    Schedule,
}

impl Slot {
    pub const ALL: [Slot; 5] = [
        Slot::Attention,
        Slot::Ffn,
        Slot::Residual,
        Slot::Optimizer,
        Slot::Schedule,
    ];

    /// The lower-case name used for the grid axis in a sweep file and on the command line.
    pub fn key(self) -> &'static str {
        match self {
            Slot::Attention => "attention",
            Slot::Ffn => "ffn",
            Slot::Residual => "residual",
            Slot::Optimizer => "optimizer",
            Slot::Schedule => "schedule",
        }
    }

    /// Parses a slot key, case-insensitively (`sweep list Attention` works too).
    pub fn from_key(key: &str) -> Option<Slot> {
        Slot::ALL
            .into_iter()
            .find(|s| s.key().eq_ignore_ascii_case(key))
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// The model's shape, fixed per trial; what a component may check itself against and size
/// its parameters by.
#[derive(Clone, Debug, PartialEq)]
pub struct Dims {
    /// Width of the residual stream (C).
    pub d_model: usize,
    /// Number of blocks; each block has two sublayers (attention, then FFN).
    pub n_layers: usize,
    /// Vocabulary size of the embedding and the tied output head.
    pub vocab: usize,
    /// Longest sequence the model sees (T).
    pub seq_len: usize,
}

impl Dims {
    /// Sublayers in depth order: attention of block 0, FFN of block 0, attention of block 1...
    pub fn n_sublayers(&self) -> usize {
        2 * self.n_layers
    }
}

/// What every component config implements: checks of its own values (run when the sweep file
/// is read, so the error points at the component) and of its fit with the model's shape (run
/// for every cell before any training).
pub trait Spec: fmt::Debug + Send + Sync + 'static {
    /// Rejects values that are wrong on their own, e.g. a non-positive learning rate.
    fn validate(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Rejects a combination with the model's shape, e.g. heads not dividing d_model.
    fn check(&self, _dims: &Dims) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// A sublayer body: maps the normed input (B, T, C) to an update (B, T, C).
pub trait Sublayer: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// The same output computed outside the autograd graph, with its backward pass, where
    /// the sublayer has one of its own (its fused paths); None where it has not, and the
    /// trunk then takes its gradients from a graph of its own (runner/src/trunk.rs).
    fn detached(&self, _x: &Tensor) -> Result<Option<Detached>> {
        Ok(None)
    }
}

/// A token mixer (causal self-attention and its variants).
pub trait Attention: Spec {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Sublayer>>;

    /// Forward FLOPs per token of one such sublayer at context `dims.seq_len`: its matrix
    /// products, 2 per multiply-add (projections, and the scores and weighted values over
    /// the causal average of (T + 1) / 2 keys). Element-wise work is not counted.
    fn flops(&self, dims: &Dims) -> f64;

    /// Trainable parameters of one such sublayer.
    fn params(&self, dims: &Dims) -> usize;
}

/// A channel mixer (the feed-forward network).
pub trait Ffn: Spec {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Sublayer>>;

    /// Forward FLOPs per token of one such sublayer: its matrix products, 2 per
    /// multiply-add.
    fn flops(&self, dims: &Dims) -> f64;

    /// Trainable parameters of one such sublayer.
    fn params(&self, dims: &Dims) -> usize;
}

/// A residual connection scheme. It owns the stream state between the embedding and the
/// final norm: a single stream for the plain residual, n streams for Hyper-Connections.
pub trait Residual: Spec {
    fn build(&self, dims: &Dims, p: &ParamBuilder) -> Result<Box<dyn Stream>>;

    /// Forward FLOPs per token of the scheme's own work around one sublayer: its projections
    /// and its mixing of the streams (matrix products, 2 per multiply-add); 0 for the plain
    /// residual.
    fn flops(&self, dims: &Dims) -> f64;

    /// Trainable parameters of the scheme around one sublayer.
    fn params(&self, dims: &Dims) -> usize;
}

/// The built residual scheme of one model.
pub trait Stream: Send + Sync {
    /// Turns the embedding (B, T, C) into the stream state.
    fn expand(&self, x: &Tensor) -> Result<Tensor>;

    /// Applies sublayer `k` (0-based, in depth order) to the state. `f` is the sublayer with
    /// its own pre-norm: it takes a (B, T, C) input and returns a (B, T, C) update.
    fn sublayer(
        &self,
        k: usize,
        state: &Tensor,
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor>;

    /// Turns the state back into one (B, T, C) stream for the final norm and the head.
    fn reduce(&self, state: &Tensor) -> Result<Tensor>;

    /// [`Stream::expand`] outside the autograd graph, with its backward pass; None where the
    /// scheme has no such form (the trunk then runs `expand` under a graph of its own).
    fn expand_detached(&self, _x: &Tensor) -> Result<Option<Detached>> {
        Ok(None)
    }

    /// [`Stream::reduce`] outside the autograd graph, likewise.
    fn reduce_detached(&self, _state: &Tensor) -> Result<Option<Detached>> {
        Ok(None)
    }

    /// [`Stream::sublayer`] outside the autograd graph: the next state and the backward
    /// pass to the state's gradient and the scheme's and the sublayer's weights'. `f` is the
    /// sublayer with its pre-norm, detached in turn. None where the scheme has no such form
    /// on this input; the trunk then runs `sublayer` under a graph of its own. The backward
    /// pass may write into the storage of the gradient it is given (the trunk hands each
    /// one over once), so that the residual's gradient and the sublayer's add in place.
    fn sublayer_detached(
        &self,
        _k: usize,
        _state: &Tensor,
        _f: &dyn Fn(&Tensor) -> Result<Detached>,
    ) -> Result<Option<Detached>> {
        Ok(None)
    }

    /// What sublayer `k` does to the stream state, for the amplification metrics; `state` is
    /// the state it is applied to. The default is the plain residual's identity.
    fn probe(&self, _k: usize, _state: &Tensor) -> Result<Probe> {
        Ok(Probe::default())
    }
}

/// A residual scheme's report on one sublayer (see [`Stream::probe`]).
#[derive(Debug, Default)]
pub struct Probe {
    /// The linear map M of the residual path, averaged over the tokens: the state after the
    /// sublayer is M applied to the state before it, plus the sublayer's own term. Square,
    /// applied from the left to the stream axis (n x n for n streams; C x C where the scheme
    /// maps channels, as LAuReL does). `None` when the path is the identity.
    pub mixing: Option<Tensor>,
    /// Scheme-specific diagnostics, by metric name; the runner records the largest value over
    /// the sublayers.
    pub extra: Vec<(&'static str, f64)>,
}

/// An optimizer: how the parameters move given their gradients.
pub trait Optimizer: Spec {
    /// The peak learning rate of the main parameter group (the one recorded as `lr`); the
    /// schedule scales it and every other group's rate alike.
    fn lr(&self) -> f64;

    /// Builds the optimizer state for a model's parameters. `compute` is the dtype of the
    /// model's matmuls (the trial's precision): an optimizer may do its own matrix work in it,
    /// as Muon's Newton-Schulz runs in bf16 when the model does.
    fn build(&self, params: &[Param], compute: DType) -> Result<Box<dyn Stepper>>;
}

/// The ranks of a data-parallel trial, as an optimizer sees them: every rank holds the same
/// averaged gradients and takes the same step, and may share the step's work out.
pub trait Ranks {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Rank `root`'s `t` (f32) on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
}

/// The optimizer state of one trial.
pub trait Stepper: Send {
    /// One update from the gradients `grads` times `grad_scale` (gradient clipping's factor,
    /// 1 without it), each parameter group at its peak rate times `factor` (the schedule's
    /// value at this step). The gradients carry no autograd graph. An optimizer applies the
    /// scale as it reads each gradient, which spares the step a pass over all of them.
    ///
    /// With `ranks`, every rank of a data-parallel trial takes the step at once, the same
    /// update everywhere: an optimizer whose step is expensive (Muon's orthogonalization)
    /// shares it out; the others take their step as it is.
    fn step_scaled(
        &mut self,
        grads: &GradStore,
        factor: f64,
        grad_scale: f64,
        ranks: Option<&dyn Ranks>,
    ) -> Result<()>;

    /// [`Stepper::step_scaled`] on the gradients as they are, on one rank.
    fn step(&mut self, grads: &GradStore, factor: f64) -> Result<()> {
        self.step_scaled(grads, factor, 1.0, None)
    }

    /// [`Stepper::step_scaled`] on the gradients as they are, on every rank of `ranks`.
    fn step_shared(&mut self, grads: &GradStore, factor: f64, ranks: &dyn Ranks) -> Result<()> {
        self.step_scaled(grads, factor, 1.0, Some(ranks))
    }

    /// Everything a checkpoint needs to continue exactly as if never stopped: per-parameter
    /// tensors named `<parameter>.<what>` (`blocks.0.ffn.up.m`) and counters as one-element
    /// tensors (`adamw.t`).
    fn state(&self) -> Result<Vec<(String, Tensor)>>;

    /// Restores what [`Stepper::state`] returned; a missing name or a wrong shape is an error.
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
}

/// The tensor `name` of a saved optimizer state, checked against the shape it replaces and
/// moved to its device and dtype.
pub fn restored(state: &HashMap<String, Tensor>, name: &str, like: &Tensor) -> Result<Tensor> {
    let t = state.get(name).ok_or_else(|| {
        candle_core::Error::Msg(format!("checkpoint has no optimizer tensor `{name}`"))
    })?;
    if t.dims() != like.dims() {
        candle_core::bail!(
            "checkpoint tensor `{name}` has shape {:?}, the optimizer expects {:?}",
            t.dims(),
            like.dims()
        );
    }
    t.to_device(like.device())?.to_dtype(like.dtype())
}

/// A learning-rate schedule: a factor in [0, 1] applied to the optimizer's peak rate.
pub trait Schedule: Spec {
    /// The factor at `step` (0-based) of a run of `total` steps.
    fn factor(&self, step: usize, total: usize) -> f64;
}
