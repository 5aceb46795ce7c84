//! One trial's training loop: batches, forward, backward, clipping, the optimizer and its
//! schedule, periodic evaluation on the fixed validation subset, and the metrics.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use registry::{restored, Dims, Param, ParamBuilder, Stepper};

use crate::benchmarks::Benchmark;
use crate::checkpoint::{Checkpoints, Manifest};

use crate::data::{bits_per_byte, Dataset, Split, Tokenizer};
use crate::graph::Replay;
use crate::model::{cross_entropy_sum, Gpt};
use crate::parallel::{self, Group};
use crate::spec::{Graph, Precision, TrainSpec, Trial};

/// Where a trial's metrics and progress go (the results store and the progress bar).
pub trait Observer {
    fn record(&mut self, step: usize, name: &str, value: f64) -> Result<()>;
    /// Called after every step with the step's training loss.
    fn step(&mut self, _step: usize, _loss: f64) -> Result<()> {
        Ok(())
    }
    /// Whether training should stop after the step under way (Ctrl-C). The ranks of a trial
    /// agree on it within the step, so that all stop after the same one.
    fn interrupted(&self) -> bool {
        false
    }
    /// Called after every evaluation.
    fn eval(&mut self, _step: usize, _val_loss: f64, _val_bpb: f64) {}
    /// Called before a checkpoint at `step` is saved: everything recorded up to it must be
    /// durable first, or a resume from the checkpoint would miss it.
    fn checkpoint(&mut self, _step: usize) -> Result<()> {
        Ok(())
    }
    /// Called once the checkpoint of `step` is on disk with tensor digest `sha256`, before
    /// its manifest is: the results DB records it, or the checkpoint is never resumed from.
    fn checkpoint_saved(&mut self, _step: usize, _sha256: &str) -> Result<()> {
        Ok(())
    }
    /// Something the user should see about the trial (a checkpoint that could not be
    /// written): recorded as an event of the trial and shown.
    fn event(&mut self, _step: usize, _kind: &str, _message: &str) -> Result<()> {
        Ok(())
    }
}

/// How a trial ended, when it ended without an error.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done {
        val_loss: f64,
        val_bpb: f64,
    },
    /// A loss or the gradient norm became NaN or infinite at `step`.
    Diverged {
        step: usize,
        what: String,
    },
}

/// The fixed validation subset: the same windows for every trial and evaluation.
pub struct ValSet {
    batches: Vec<(Tensor, Tensor)>,
    targets: usize,
    bytes: u64,
}

impl ValSet {
    pub fn new(val: &Split, tok: Tokenizer, train: &TrainSpec, device: &Device) -> Result<Self> {
        // `eval_batches` global batches, in batches of `batch` that the ranks share: the
        // same windows however a trial's batch is split over ranks and micro-batches.
        Self::of_windows(
            val,
            tok,
            train,
            device,
            train.eval_batches * train.global_batch(),
        )
    }

    /// A held-out evaluation set: the validation subset's number of windows, or, where the
    /// set is smaller, as many as it holds without overlap (in whole batches): all of it.
    pub fn held_out(
        set: &Split,
        tok: Tokenizer,
        train: &TrainSpec,
        device: &Device,
    ) -> Result<Self> {
        let b = train.batch;
        let whole = set.tokens() / (train.seq_len + 1) / b * b;
        let count = (train.eval_batches * train.global_batch()).min(whole);
        Self::of_windows(set, tok, train, device, count)
    }

    fn of_windows(
        val: &Split,
        tok: Tokenizer,
        train: &TrainSpec,
        device: &Device,
        count: usize,
    ) -> Result<Self> {
        let (b, t) = (train.batch, train.seq_len);
        let windows = val.spread(count, t + 1);
        let mut batches = Vec::new();
        let mut bytes = 0;
        for chunk in windows.chunks(b * (t + 1)) {
            let (x, y) = split_xy(chunk, b, t);
            bytes += y.iter().map(|&tok_id| tok.byte_len(tok_id)).sum::<u64>();
            batches.push((
                Tensor::from_vec(x, (b, t), device)?,
                Tensor::from_vec(y, (b, t), device)?,
            ));
        }
        Ok(Self {
            targets: batches.len() * b * t,
            batches,
            bytes,
        })
    }

    /// Mean loss in nats per token and bits per byte of the subset. The ranks of a trial
    /// share the batches (rank r takes every world-th from r) and add up their losses.
    pub fn evaluate(&self, model: &Gpt, group: &dyn Group) -> Result<(f64, f64)> {
        let mine = self
            .batches
            .iter()
            .skip(group.rank())
            .step_by(group.world());
        let mut nats = 0.0;
        for (x, y) in mine {
            let s = cross_entropy_sum(&model.logits(x)?, &y.flatten_all()?)?;
            nats += s.to_scalar::<f32>()? as f64;
        }
        if group.world() > 1 {
            let all = Tensor::new(&[nats as f32], self.batches[0].0.device())?;
            nats = group.sum(&all)?.to_vec1::<f32>()?[0] as f64;
        }
        Ok((nats / self.targets as f64, bits_per_byte(nats, self.bytes)))
    }

    /// The subset's batches of inputs and next-token targets, (batch, seq_len) u32 each.
    pub fn batches(&self) -> &[(Tensor, Tensor)] {
        &self.batches
    }

    /// The batch the amplification metrics are measured on: always the first.
    pub fn probe_batch(&self) -> &Tensor {
        &self.batches[0].0
    }
}

/// Splits `batch` windows of t + 1 tokens into inputs and next-token targets.
fn split_xy(windows: &[u32], batch: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
    let mut x = Vec::with_capacity(batch * t);
    let mut y = Vec::with_capacity(batch * t);
    for w in windows.chunks(t + 1) {
        x.extend_from_slice(&w[..t]);
        y.extend_from_slice(&w[1..]);
    }
    (x, y)
}

/// The data sampler of a trial of `seed`. The data order depends on the seed only, not on
/// the cell: cells of one seed see the same batches, so their differences are the
/// components'. ChaCha12 is what rand's StdRng is, with a position a checkpoint can save.
pub fn sampler(seed: u64) -> ChaCha12Rng {
    ChaCha12Rng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xda7a)
}

/// This rank's part of the next global batch: `spec.grad_accum` micro-batches of `spec.batch`
/// windows, inputs and next-token targets, (batch, seq_len) each. Every rank draws the whole
/// global batch, so that the ranks' samplers stay at one position, and micro-batch k of rank
/// r is its (k world + r)-th slice: one rank of batch B, two of B/2, and one of B/2 with two
/// micro-batches all train on the same windows.
pub fn micro_batches(
    data: &Dataset,
    rng: &mut ChaCha12Rng,
    spec: &TrainSpec,
    group: &dyn Group,
    device: &Device,
) -> Result<Vec<(Tensor, Tensor)>> {
    let (b, t, world) = (spec.batch, spec.seq_len, group.world());
    let windows = data.train.sample(rng, b * world * spec.grad_accum, t + 1);
    let slice = b * (t + 1);
    (0..spec.grad_accum)
        .map(|k| {
            let at = (k * world + group.rank()) * slice;
            let (x, y) = split_xy(&windows[at..at + slice], b, t);
            Ok((
                Tensor::from_vec(x, (b, t), device)?,
                Tensor::from_vec(y, (b, t), device)?,
            ))
        })
        .collect()
}

/// A trial's model, built from its cell with its seed, computing in `precision`.
pub fn build(trial: &Trial, dims: &Dims, precision: Precision, device: &Device) -> Result<Gpt> {
    Ok(
        Gpt::new(&trial.cell, dims, &ParamBuilder::new(trial.seed, device))?
            .computing_in(precision.dtype()),
    )
}

/// The model a trial trains: [`build`], recomputing what `spec` says.
pub fn build_for_training(
    trial: &Trial,
    dims: &Dims,
    spec: &TrainSpec,
    device: &Device,
) -> Result<Gpt> {
    let recompute = spec.recompute == crate::spec::Recompute::Blocks;
    Ok(build(trial, dims, spec.precision, device)?.recomputing(recompute))
}

/// The gradients of `loss` for `params`, cut from the autograd graph. candle detaches the
/// gradients of intermediate nodes but not those of variables: theirs still reference the
/// step's forward graph, and optimizer state computed from them (m = b m + (1 - b) g) would
/// chain every step's graph to the next, growing memory by the graph's size per step.
pub fn backward(loss: &Tensor, params: &[Param]) -> Result<GradStore> {
    let mut grads = loss.backward()?;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let g = g.detach();
            grads.insert(p.var.as_tensor(), g);
        }
    }
    Ok(grads)
}

/// The L2 norm of all gradients together.
pub fn grad_norm(grads: &GradStore, params: &[Param]) -> Result<f64> {
    // Summed on the device and read once: a read per parameter would wait for the device
    // as many times.
    let present: Vec<&Tensor> = params
        .iter()
        .filter_map(|p| grads.get(p.var.as_tensor()))
        .collect();
    let sq = components::fused::sum_squares(&present)?.to_scalar::<f32>()? as f64;
    Ok(sq.sqrt())
}

/// Multiplies every gradient of `params` by `factor`.
pub(crate) fn scale_grads(grads: &mut GradStore, params: &[Param], factor: f64) -> Result<()> {
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let scaled = (g * factor)?;
            grads.insert(p.var.as_tensor(), scaled);
        }
    }
    Ok(())
}

/// A trial's captured step (`train.graph: Step`): captured at its first step of one
/// micro-batch; a capture that fails leaves the trial's steps eager.
pub struct Captured {
    wanted: bool,
    replay: Option<Replay>,
}

impl Captured {
    pub fn new(spec: &TrainSpec) -> Self {
        Self {
            wanted: spec.graph == Graph::Step,
            replay: None,
        }
    }

    /// Captures the step on `micro`'s batch shapes, once; what a failed capture said, for
    /// the trial's events (the steps then run eagerly).
    pub fn prepare(&mut self, model: &Gpt, micro: &[(Tensor, Tensor)]) -> Option<String> {
        if !self.wanted || self.replay.is_some() {
            return None;
        }
        self.wanted = false;
        let [(x, y)] = micro else {
            return Some(format!(
                "train.graph: Step captures a step of one micro-batch, not {} \
                 (grad_accum); the steps run without a graph",
                micro.len()
            ));
        };
        match Replay::capture(model, x, y) {
            Ok(replay) => {
                self.replay = Some(replay);
                None
            }
            Err(e) => Some(format!(
                "train.graph: Step: the step could not be captured ({e}); the steps run \
                 without a graph"
            )),
        }
    }

    pub fn replay(&self) -> Option<&Replay> {
        self.replay.as_ref()
    }
}

/// One optimizer step: what it trains on and how.
pub struct Step<'a> {
    /// This rank's micro-batches (x, y) of the global batch ([`micro_batches`]).
    pub micro: &'a [(Tensor, Tensor)],
    /// Clip the gradient norm to this (0: no clipping).
    pub clip: f64,
    /// The schedule's factor of the peak learning rate.
    pub factor: f64,
    /// Whether this rank wants to stop after the step (see [`Observer::interrupted`]); asked
    /// as late in the step as the ranks can still agree on it.
    pub stop: &'a dyn Fn() -> bool,
    /// The forward and backward passes as a captured graph (`train.graph: Step`), for a
    /// step of one micro-batch.
    pub replay: Option<&'a Replay>,
}

/// What a step measured, the same on every rank.
#[derive(Debug)]
pub struct Stepped {
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Norm of the mean gradient, before clipping.
    pub grad_norm: f64,
    /// A rank asked to stop after this step.
    pub stop: bool,
}

/// One optimizer step: forward and backward on each micro-batch with their gradients summed,
/// the mean gradient over micro-batches and ranks, its norm, clipping and the update at
/// `factor` times the peak learning rate. Returns what was measured or, when the loss or the
/// gradient norm is not finite, what was not (and the weights are left as they were). Every
/// rank of `group` takes the same step.
pub fn step_on(
    model: &Gpt,
    opt: &mut dyn Stepper,
    group: &dyn Group,
    step: Step,
    mut phases: Option<&mut Phases>,
) -> Result<std::result::Result<Stepped, String>> {
    let mut mark = |name: &'static str| match phases.as_deref_mut() {
        Some(p) => p.mark(name),
        None => Ok(()),
    };
    let params = model.params();
    let mut sum: Option<(Tensor, GradStore)> = None;
    for (x, y) in step.micro {
        let (l, g) = match step.replay {
            Some(replay) if step.micro.len() == 1 => replay.run(x, y)?,
            _ => {
                let l = model.loss(x, y)?;
                mark("forward and loss")?;
                let g = model.gradients(&l)?;
                (l, g)
            }
        };
        sum = Some(match sum {
            None => (l, g),
            Some((total, mut grads)) => {
                for p in params {
                    if let (Some(a), Some(b)) =
                        (grads.get(p.var.as_tensor()), g.get(p.var.as_tensor()))
                    {
                        let added = (a + b)?;
                        grads.insert(p.var.as_tensor(), added);
                    }
                }
                ((total + l)?, grads)
            }
        });
        mark("backward")?;
    }
    let (loss, mut grads) = sum.expect("at least one micro-batch");
    let n = (step.micro.len() * group.world()) as f64;
    parallel::average_gradients(&mut grads, params, group, 1.0 / n, parallel::BUCKET_ELEMS)?;
    // The loss and the wish to stop travel together; reading them is the step's one wait
    // for the device before the gradient norm.
    let status = Tensor::cat(
        &[
            loss.to_dtype(DType::F32)?.reshape(1)?,
            Tensor::new(&[f32::from(u8::from((step.stop)()))], loss.device())?,
        ],
        0,
    )?;
    let status = match group.world() {
        1 => status,
        _ => group.sum(&status)?,
    }
    .to_vec1::<f32>()?;
    mark("all-reduce")?;
    let (lv, stop) = (status[0] as f64 / n, status[1] > 0.0);
    if !lv.is_finite() {
        return Ok(Err(format!("train/loss is {lv}")));
    }
    let (clip, factor) = (step.clip, step.factor);
    let gn = grad_norm(&grads, params)?;
    if !gn.is_finite() {
        return Ok(Err(format!("grad_norm is {gn}")));
    }
    // Clipping's factor is applied by the optimizer as it reads each gradient (one pass over
    // them fewer than scaling them here).
    let grad_scale = match clip > 0.0 && gn > clip {
        true => clip / gn,
        false => 1.0,
    };
    mark("grad norm and clip")?;
    let ranks = parallel::AsRanks(group);
    let ranks = (group.world() > 1).then_some(&ranks as &dyn registry::Ranks);
    opt.step_scaled(&grads, factor, grad_scale, ranks)?;
    mark("optimizer")?;
    Ok(Ok(Stepped {
        loss: lv,
        grad_norm: gn,
        stop,
    }))
}

/// Where a step's time goes, for `sweep bench --phases`: the device is synchronized at every
/// mark, so each phase is charged with its own kernels (which costs the step a little).
pub struct Phases<'a> {
    device: &'a Device,
    last: Instant,
    /// Seconds per phase, summed over the steps timed, in the order first seen.
    pub spent: Vec<(&'static str, f64)>,
}

impl<'a> Phases<'a> {
    pub fn new(device: &'a Device) -> Self {
        Self {
            device,
            last: Instant::now(),
            spent: Vec::new(),
        }
    }

    /// Starts timing a step (after anything done since the last mark that is not its own).
    pub fn start(&mut self) -> Result<()> {
        self.device.synchronize()?;
        self.last = Instant::now();
        Ok(())
    }

    fn mark(&mut self, name: &'static str) -> Result<()> {
        self.device.synchronize()?;
        let now = Instant::now();
        let dt = (now - self.last).as_secs_f64();
        self.last = now;
        match self.spent.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += dt,
            None => self.spent.push((name, dt)),
        }
        Ok(())
    }
}

/// What every trial of a sweep trains with.
#[derive(Clone, Copy)]
pub struct Setting<'a> {
    pub spec: &'a TrainSpec,
    pub data: &'a Dataset,
    pub val: &'a ValSet,
    /// The held-out evaluation sets (`evals:`), by name.
    pub evals: &'a [(String, ValSet)],
    /// The zero-shot benchmarks (`benchmarks:`), scored at the end and every
    /// `spec.benchmark_every` steps.
    pub benchmarks: &'a [Benchmark],
    pub device: &'a Device,
    /// The trial's ranks; metrics, evaluations' side metrics and checkpoints come from rank 0.
    pub group: &'a dyn Group,
}

/// Trains `model` for `spec.steps` steps, from checkpoint `from` of `ckpt` if given (one
/// that `Checkpoints::resume_point` chose), saving a new one every `ckpt.every` steps.
pub fn train(
    trial: &Trial,
    model: &Gpt,
    setting: Setting,
    obs: &mut dyn Observer,
    ckpt: Option<&Checkpoints>,
    from: Option<&Manifest>,
) -> Result<Outcome> {
    let Setting {
        spec,
        data,
        val,
        evals,
        benchmarks,
        device,
        group,
    } = setting;
    let lead = group.rank() == 0;
    let tokens_per_step = spec.global_batch() * spec.seq_len;
    let mut rng = sampler(trial.seed);
    let params = model.params();
    parallel::share_weights(params, group)?;
    let mut opt = trial.cell.optimizer.build(params, spec.precision.dtype())?;
    let peak = trial.cell.optimizer.lr();
    let eval_every = spec.eval_every();

    let (mut loss_sum, mut loss_n, mut train_time) = (0.0, 0usize, 0.0);
    let mut spikes = crate::spikes::Spikes::default();
    let mut start = 0;
    let resume = match (ckpt, from) {
        (Some(c), Some(m)) => Some((m, c.load(m, device)?)),
        _ => None,
    };
    if let Some((m, tensors)) = resume {
        if m.trial == trial.id && m.step < spec.steps {
            for p in params {
                let name = format!("model.{}", p.name);
                p.var.set(&restored(&tensors, &name, p.var.as_tensor())?)?;
            }
            let optim: HashMap<String, Tensor> = tensors
                .into_iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("optim.")?.to_string(), v)))
                .collect();
            opt.load_state(&optim)?;
            rng = ChaCha12Rng::from_seed(m.rng_seed);
            rng.set_word_pos(m.rng_word_pos);
            (loss_sum, loss_n, train_time) = (m.loss_sum, m.loss_n, m.train_time);
            spikes = m.spikes.clone();
            start = m.step;
        }
    }
    let mut graph = Captured::new(spec);
    for step in start..spec.steps {
        let started = Instant::now();
        let factor = trial.cell.schedule.factor(step, spec.steps);
        let lr = peak * factor;
        inject_fault(model, group.rank(), step + 1)?;
        let micro = micro_batches(data, &mut rng, spec, group, device)?;
        if let Some(failed) = graph.prepare(model, &micro) {
            obs.event(step + 1, "graph_not_captured", &failed)?;
        }
        let this = Step {
            micro: &micro,
            clip: spec.grad_clip,
            factor,
            stop: &|| obs.interrupted(),
            replay: graph.replay(),
        };
        let done = match step_on(model, opt.as_mut(), group, this, None)? {
            Ok(done) => done,
            Err(what) => {
                return Ok(Outcome::Diverged {
                    step: step + 1,
                    what,
                })
            }
        };
        let (lv, gn) = (done.loss, done.grad_norm);
        train_time += started.elapsed().as_secs_f64();
        loss_sum += lv;
        loss_n += 1;
        spikes.push(lv);
        obs.step(step + 1, lv)?;
        if done.stop {
            candle_core::bail!("interrupted at step {}", step + 1);
        }

        let last = step + 1 == spec.steps;
        let scoring = last || spec.benchmark_every.is_some_and(|n| (step + 1) % n == 0);
        if scoring && !benchmarks.is_empty() {
            let tokens = spec.batch * spec.seq_len;
            for (name, v) in crate::benchmarks::run(model, benchmarks, spec.seq_len, tokens, group)?
            {
                obs.record(step + 1, &name, v)?;
            }
        }
        if (step + 1) % spec.log_every == 0 || last {
            let s = step + 1;
            obs.record(s, "train/loss", loss_sum / loss_n as f64)?;
            obs.record(s, "train/spikes", spikes.count as f64)?;
            obs.record(s, "lr", lr)?;
            obs.record(s, "grad_norm", gn)?;
            obs.record(
                s,
                "tokens_per_s",
                (loss_n * tokens_per_step) as f64 / train_time.max(1e-9),
            )?;
            (loss_sum, loss_n, train_time) = (0.0, 0, 0.0);
        }
        if (step + 1) % eval_every == 0 || last {
            let (vl, bpb) = val.evaluate(model, group)?;
            obs.record(step + 1, "val/loss", vl)?;
            obs.record(step + 1, "val/bpb", bpb)?;
            for (name, set) in evals {
                let (loss, bpb) = set.evaluate(model, group)?;
                obs.record(step + 1, &format!("eval/{name}/loss"), loss)?;
                obs.record(step + 1, &format!("eval/{name}/bpb"), bpb)?;
            }
            if lead {
                for (name, v) in model.amplification(val.probe_batch())?.metrics() {
                    obs.record(step + 1, &name, v)?;
                }
            }
            obs.eval(step + 1, vl, bpb);
            if !vl.is_finite() {
                return Ok(Outcome::Diverged {
                    step: step + 1,
                    what: format!("val/loss is {vl}"),
                });
            }
            if last {
                return Ok(Outcome::Done {
                    val_loss: vl,
                    val_bpb: bpb,
                });
            }
        }
        let saving = |c: &&Checkpoints| lead && c.every > 0 && (step + 1) % c.every == 0 && !last;
        if let Some(c) = ckpt.filter(saving) {
            obs.checkpoint(step + 1)?;
            let manifest = Manifest {
                format: 0,
                trial: trial.id.clone(),
                step: step + 1,
                tensors: String::new(),
                bytes: 0,
                sha256: String::new(),
                rng_seed: rng.get_seed(),
                rng_word_pos: rng.get_word_pos(),
                loss_sum,
                loss_n,
                train_time,
                spikes: spikes.clone(),
            };
            // Recording it is the DB's part: its failure ends the trial, as any lost record
            // does. A checkpoint that cannot be written does not: the older ones stay, and the
            // next checkpoint tries again.
            let mut db_error = None;
            let mut written = |m: &Manifest| {
                obs.checkpoint_saved(m.step, &m.sha256).inspect_err(|e| {
                    db_error = Some(e.to_string());
                })
            };
            if let Err(e) = c.save(model, opt.as_ref(), manifest, &mut written) {
                if let Some(db) = db_error {
                    candle_core::bail!("{db}");
                }
                let message = format!(
                    "checkpoint step-{} could not be written ({e}); training goes on, the \
                     next checkpoint tries again",
                    step + 1
                );
                obs.event(step + 1, "checkpoint_unwritten", &message)?;
            }
        }
    }
    unreachable!("the last step always evaluates")
}

/// A fault asked for by SWEEP_INJECT_FAULT (tests of failing ranks), at the start of `step`.
fn inject_fault(model: &Gpt, rank: usize, step: usize) -> Result<()> {
    match parallel::injected_fault(rank, step) {
        None => Ok(()),
        Some("error") => candle_core::bail!("injected fault at step {step}"),
        Some("panic") => panic!("injected panic at step {step}"),
        Some("hang") => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        Some("nan") => {
            // A weight of this rank only goes bad, as a corrupted update would leave it.
            let p = &model.params()[0];
            let bad = (p.var.as_tensor().ones_like()? * f64::NAN)?;
            p.var.set(&bad)
        }
        Some(other) => candle_core::bail!("SWEEP_INJECT_FAULT: unknown kind `{other}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Source, Sweep};
    use candle_core::Var;
    use registry::Role;
    use std::path::Path;

    /// Records every metric, the checkpoints saved and the events; fails at `crash_at` as a
    /// killed process would stop there.
    #[derive(Default)]
    struct Log {
        rows: Vec<(usize, String, f64)>,
        saved: Vec<(u64, String)>,
        events: Vec<(usize, String, String)>,
        crash_at: Option<usize>,
    }

    impl Observer for Log {
        fn record(&mut self, step: usize, name: &str, value: f64) -> Result<()> {
            if self.crash_at.is_some_and(|c| step >= c) {
                candle_core::bail!("stopped at step {step}");
            }
            self.rows.push((step, name.to_string(), value));
            Ok(())
        }

        fn checkpoint_saved(&mut self, step: usize, sha256: &str) -> Result<()> {
            self.saved.push((step as u64, sha256.to_string()));
            Ok(())
        }

        fn event(&mut self, step: usize, kind: &str, message: &str) -> Result<()> {
            self.events
                .push((step, kind.to_string(), message.to_string()));
            Ok(())
        }
    }

    /// A 12-step trial (checkpoints every 4) and a way to train it, stopped at a step or not,
    /// from a checkpoint or not.
    struct Bench {
        sweep: Sweep,
        data: crate::data::Dataset,
        val: ValSet,
        dir: std::path::PathBuf,
    }

    impl Bench {
        fn new(name: &str) -> Result<Self> {
            let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/data/tinyshakespeare/input.txt");
            let text = format!(
                "Sweep(name: \"ckpt\", seeds: [3], data: Text(path: {:?}),\n\
                 train: (steps: 12, batch: 2, seq_len: 16, eval_every: 4, eval_batches: 1, \
                 log_every: 2, checkpoint_every: 4),\n\
                 model: (d_model: 16, n_layers: 1),\n\
                 grid: (attention: [GatedGqa(heads: 2, kv_heads: 1)], ffn: [Relu2], \
                 residual: [Mhc(streams: 2)], optimizer: [NorMuon], schedule: [Trapezoid]))",
                corpus.display().to_string()
            );
            let sweep = Sweep::from_source(Source::from_text(Path::new("c.ron"), text)).unwrap();
            let data = crate::data::Dataset::load(&sweep.data, &sweep.source, 16).unwrap();
            let val = ValSet::new(&data.val, data.tokenizer, &sweep.train, &Device::Cpu)?;
            let dir = std::env::temp_dir().join(format!("sweep-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Ok(Self {
                sweep,
                data,
                val,
                dir,
            })
        }

        fn trial(&self) -> &Trial {
            &self.sweep.trials[0]
        }

        fn checkpoints(&self) -> Checkpoints {
            Checkpoints::new(&self.dir.join("r.db"), &self.trial().id, 4, 2)
        }

        fn run(
            &self,
            crash_at: Option<usize>,
            ckpt: Option<&Checkpoints>,
            from: Option<&Manifest>,
        ) -> (Result<Outcome>, Log) {
            let trial = self.trial();
            let model =
                build(trial, &trial.dims, self.sweep.train.precision, &Device::Cpu).unwrap();
            let mut log = Log {
                crash_at,
                ..Log::default()
            };
            let setting = Setting {
                spec: &self.sweep.train,
                data: &self.data,
                val: &self.val,
                evals: &[],
                benchmarks: &[],
                device: &Device::Cpu,
                group: &parallel::Solo,
            };
            let out = train(trial, &model, setting, &mut log, ckpt, from);
            (out, log)
        }
    }

    /// Throughput aside (it is a clock), the rows of two runs agree to 1e-6.
    fn assert_same_curve(a: &[(usize, String, f64)], b: &[(usize, String, f64)]) {
        let timeless = |rows: &[(usize, String, f64)]| -> Vec<(usize, String, f64)> {
            rows.iter()
                .filter(|(_, n, _)| n != "tokens_per_s")
                .cloned()
                .collect()
        };
        let (a, b) = (timeless(a), timeless(b));
        assert_eq!(a.len(), b.len());
        for ((s1, n1, v1), (s2, n2, v2)) in a.iter().zip(&b) {
            assert_eq!((s1, n1), (s2, n2));
            assert!(
                (v1 - v2).abs() <= 1e-6 * v2.abs().max(1.0),
                "{n1} at {s1}: {v1} vs {v2}"
            );
        }
    }

    #[test]
    fn a_resumed_trial_continues_the_uninterrupted_loss_curve_exactly() -> Result<()> {
        let bench = Bench::new("ckpt")?;
        let ckpt = bench.checkpoints();
        let (whole, reference) = bench.run(None, None, None);
        assert!(matches!(whole?, Outcome::Done { .. }));
        // Stopped at step 10: the checkpoints of steps 4 and 8 were written, 8 is the last.
        let (stopped, first) = bench.run(Some(10), Some(&ckpt), None);
        assert!(stopped.is_err());
        let saved: Vec<u64> = first.saved.iter().map(|s| s.0).collect();
        assert_eq!(saved, vec![4, 8]);
        let point = ckpt.resume_point(&bench.trial().id, &first.saved);
        assert!(point.rejected.is_empty(), "{:?}", point.rejected);
        assert_eq!(point.from.as_ref().map(|m| m.step), Some(8));
        let (resumed, second) = bench.run(None, Some(&ckpt), point.from.as_ref());
        assert!(matches!(resumed?, Outcome::Done { .. }));
        assert!(
            second.rows.iter().all(|(s, _, _)| *s > 8),
            "the resume recorded steps before 8"
        );

        // Steps up to 8 from the first attempt, the rest from the resumed one, equal the
        // uninterrupted run.
        let mut joined: Vec<_> = first.rows.into_iter().filter(|(s, _, _)| *s <= 8).collect();
        joined.extend(second.rows);
        assert_same_curve(&joined, &reference.rows);
        assert!(reference
            .rows
            .iter()
            .any(|(s, n, _)| *s == 12 && n == "val/bpb"));
        let _ = std::fs::remove_dir_all(&bench.dir);
        Ok(())
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_checkpoint_the_disk_refuses_is_an_event_and_training_goes_on() -> Result<()> {
        // The step-8 tensor file's temporary name leads to /dev/full, whose every write fails
        // with ENOSPC: a disk that filled up, for real.
        let bench = Bench::new("ckpt-full")?;
        let ckpt = bench.checkpoints();
        std::fs::create_dir_all(ckpt.dir())?;
        let tmp = ckpt.dir().join("step-8.safetensors.tmp");
        std::os::unix::fs::symlink("/dev/full", &tmp)?;
        let (whole, reference) = bench.run(None, None, None);
        assert!(matches!(whole?, Outcome::Done { .. }));
        let (stopped, first) = bench.run(Some(10), Some(&ckpt), None);
        assert!(stopped.is_err());
        assert_eq!(first.saved.iter().map(|s| s.0).collect::<Vec<_>>(), vec![4]);
        assert_eq!(first.events.len(), 1, "{:?}", first.events);
        let (step, kind, message) = &first.events[0];
        assert_eq!((*step, kind.as_str()), (8, "checkpoint_unwritten"));
        let named = format!("writing {}", tmp.display());
        assert!(
            message.contains(&named) && message.contains("No space left on device"),
            "{message}"
        );
        assert!(!tmp.exists(), "the failed write left its temporary file");
        // The older checkpoint is intact and the trial goes on from it to the same end.
        let point = ckpt.resume_point(&bench.trial().id, &first.saved);
        assert_eq!(point.from.as_ref().map(|m| m.step), Some(4));
        let (resumed, second) = bench.run(None, Some(&ckpt), point.from.as_ref());
        assert!(matches!(resumed?, Outcome::Done { .. }));
        let mut joined: Vec<_> = first.rows.into_iter().filter(|(s, _, _)| *s <= 4).collect();
        joined.extend(second.rows);
        assert_same_curve(&joined, &reference.rows);
        let _ = std::fs::remove_dir_all(&bench.dir);
        Ok(())
    }

    #[test]
    fn a_graph_that_cannot_be_captured_is_an_event_and_the_steps_run_eagerly() -> Result<()> {
        // The CPU has no CUDA graphs: the trial says so once and trains as without the option.
        let mut bench = Bench::new("graph")?;
        let (eager, reference) = bench.run(None, None, None);
        assert!(matches!(eager?, Outcome::Done { .. }));
        bench.sweep.train.graph = Graph::Step;
        let (replayed, log) = bench.run(None, None, None);
        assert!(matches!(replayed?, Outcome::Done { .. }));
        let kinds: Vec<_> = log
            .events
            .iter()
            .map(|(s, k, _)| (*s, k.as_str()))
            .collect();
        assert_eq!(kinds, vec![(1, "graph_not_captured")]);
        assert!(
            log.events[0].2.contains("train.graph: Off"),
            "{}",
            log.events[0].2
        );
        assert_same_curve(&log.rows, &reference.rows);
        Ok(())
    }

    #[test]
    fn the_data_sampler_is_rands_std_rng() {
        // The README's measured numbers were trained with StdRng; ChaCha12Rng must draw the
        // same stream for the same seed.
        use rand::{rngs::StdRng, RngCore};
        let mut a = StdRng::seed_from_u64(42);
        let mut b = ChaCha12Rng::seed_from_u64(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn gradients_handed_to_the_optimizer_carry_no_graph() -> Result<()> {
        // w * x with x derived from w: d/dw = x + w, built from tracked tensors.
        let var = Var::new(&[1f32, 2.0], &Device::Cpu)?;
        let x = (var.as_tensor() * 3.0)?;
        let loss = (var.as_tensor() * &x)?.sum_all()?;
        let raw = loss.backward()?;
        assert!(
            raw.get(var.as_tensor()).unwrap().track_op(),
            "candle now detaches variable gradients itself; backward() can go"
        );
        let p = Param {
            name: "w".into(),
            var: var.clone(),
            role: Role::Hidden,
        };
        let g = backward(&loss, &[p])?;
        let g = g.get(var.as_tensor()).unwrap();
        assert!(!g.track_op());
        assert_eq!(g.to_vec1::<f32>()?, vec![6.0, 12.0]);
        Ok(())
    }
}
