//! `sweep worker` (hidden): trains one trial of a sweep in a process of its own, so that
//! whatever kills it (an allocation failure aborts, the kernel's OOM killer sends SIGKILL, a
//! CUDA fault) takes down that trial only. `sweep run` claims the trial, starts the worker,
//! and reads its progress from the worker's stdout, one line per event:
//! `step N LOSS`, `eval N VAL_LOSS VAL_BPB`, `line TEXT` (to show), `result TEXT` (the summary),
//! `fail TEXT` (why the trial failed, when the worker must die for it).
//! The worker records metrics and the trial's outcome in the DB itself; if it dies first,
//! `sweep run` marks the trial failed with the cause.
//!
//! A trial of `gpus_per_trial` N trains on the N devices of `--device`, one rank (thread) each
//! (see `parallel`); rank 0 writes the metrics, checkpoints and outcome.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use results::{Status, Store};

use crate::checkpoint::{Checkpoints, Manifest};
use crate::data::Dataset;
use crate::devices::parse_devices;
use crate::error::{exit, InputError};
use crate::gpu;
use crate::parallel::{self, Rank};
use crate::spec::{Sweep, Trial};
use crate::supervise::INTERRUPTED_EXIT;
use crate::train::{self, Observer, Outcome, ValSet};
use crate::CODE_VERSION;

/// Train one claimed trial (started by `sweep run`; not for direct use).
#[derive(clap::Args, Debug)]
pub struct Args {
    pub file: PathBuf,
    #[arg(long)]
    pub db: PathBuf,
    #[arg(long)]
    pub device: String,
    #[arg(long = "set")]
    pub sets: Vec<String>,
    /// The trial's id (after any `--fresh` salting).
    #[arg(long)]
    pub trial: String,
    /// The `sweep run` process; the worker ends when it does.
    #[arg(long)]
    pub parent: u32,
}

/// Set by SIGINT/SIGTERM (from the terminal, or forwarded by `sweep run`): training stops at
/// the end of the step and the trial goes back to the queue.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn exec(args: Args) -> anyhow::Result<u8> {
    die_with_parent(args.parent);
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("installing the signal handler")?;
    let sweep = Sweep::load(&args.file, &args.sets)?;
    let devices = parse_devices(&args.device)?;
    if devices.len() != sweep.train.gpus_per_trial {
        return Err(InputError::new(format!(
            "--device {}: {} device(s) for a trial of train.gpus_per_trial = {}",
            args.device,
            devices.len(),
            sweep.train.gpus_per_trial
        ))
        .into());
    }
    let timeout = parallel::collective_timeout()?;
    let mut store = Store::open(&args.db)?;
    let generation = store.sweep_generation(&sweep.name)?.ok_or_else(|| {
        InputError::new(format!("{}: no sweep {}", args.db.display(), sweep.name))
    })?;
    let trials = crate::spec::salted(sweep.trials.clone(), generation);
    let trial = trials.iter().find(|t| t.id == args.trial).ok_or_else(|| {
        InputError::new(format!("{}: no trial {}", args.file.display(), args.trial))
    })?;
    let data = Dataset::load(&sweep.data, &sweep.source, sweep.train.seq_len)?;
    let held_out = sweep.held_out_sets()?;
    let benchmarks = sweep.benchmark_sets()?;
    let ckpt = Checkpoints::new(
        &args.db,
        &trial.id,
        sweep.train.checkpoint_every(),
        sweep.train.keep_checkpoints(),
    );
    let pipe = Pipe;
    // The checkpoint to go on from, verified once for every rank; what was passed over is
    // the trial's event, where the report shows it, and never a reason to fail the trial.
    let point = ckpt.resume_point(&trial.id, &store.checkpoints(&trial.id)?);
    for (step, message) in point.messages() {
        store.event(
            &trial.id,
            step.map(|s| s as u64),
            "checkpoint_rejected",
            &message,
        )?;
        pipe.line(&format!("{}: {message}", trial.id));
    }
    ckpt.set_aside(&point.rejected);
    let from = point.from.as_ref();

    let started = Instant::now();
    let world = devices.len();
    let lead_store = Mutex::new(Some(&mut store));
    let rank_body = |rank: Rank| -> anyhow::Result<(Status, Option<String>, String)> {
        let val = ValSet::new(&data.val, data.tokenizer, &sweep.train, &rank.device)?;
        let evals = held_out
            .iter()
            .map(|(name, set)| {
                let v = ValSet::held_out(set, data.tokenizer, &sweep.train, &rank.device)?;
                Ok((name.clone(), v))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let setting = train::Setting {
            spec: &sweep.train,
            data: &data,
            val: &val,
            evals: &evals,
            benchmarks: &benchmarks,
            device: &rank.device,
            group: rank.group.as_ref(),
        };
        let store = match rank.group.rank() {
            0 => lead_store.lock().unwrap_or_else(|e| e.into_inner()).take(),
            _ => None,
        };
        let on = match world {
            1 => gpu::describe(&rank.device),
            n => format!(
                "{} ({n} ranks: {})",
                gpu::describe(&rank.device),
                devices.join(",")
            ),
        };
        let ended = run_trial(
            store,
            trial,
            setting,
            &trial.dims,
            &pipe,
            (&ckpt, from),
            &on,
        )?;
        // A rank that failed must end the others' wait for it: as an error.
        match ended {
            (Status::Failed, Some(e), _) if world > 1 => Err(anyhow::anyhow!(e)),
            ended => Ok(ended),
        }
    };
    let abandon = |why: &str| -> std::convert::Infallible {
        // Ranks stuck in a collective cannot be stopped; the process ends with them, at once
        // (no exit handlers that would wait on their GPUs), and `sweep run` records why.
        pipe.send(&format!("fail {}", why.replace('\n', " | ")));
        let me = nix::unistd::Pid::this();
        let _ = nix::sys::signal::kill(me, nix::sys::signal::Signal::SIGKILL);
        unreachable!("killed")
    };
    let (status, error, summary) =
        match parallel::run_ranks(&devices, timeout, &rank_body, &abandon)? {
            Ok(mut by_rank) => by_rank.swap_remove(0),
            Err(why) => (Status::Failed, Some(why.clone()), format!("error: {why}")),
        };
    if INTERRUPTED.load(Ordering::SeqCst) && status != Status::Done {
        store.release(&trial.id)?;
        return Ok(INTERRUPTED_EXIT);
    }
    store.finish_trial(
        &trial.id,
        status,
        error.as_deref(),
        started.elapsed().as_secs_f64(),
    )?;
    pipe.send(&format!("result {summary}"));
    Ok(exit::OK)
}

/// A worker whose `sweep run` is gone (killed) stops too: its trial is then free for the
/// next run, which resumes it from its checkpoint.
fn die_with_parent(parent: u32) {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::signal::Signal;
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
        // The parent may have died before the line above.
        if nix::unistd::getppid().as_raw() as u32 != parent {
            std::process::exit(1);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = parent;
}

/// The worker's stdout, line by line, to `sweep run`.
struct Pipe;

impl Pipe {
    fn send(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn line(&self, text: &str) {
        self.send(&format!("line {text}"));
    }
}

/// Builds and trains one rank of a trial, turning errors and panics into a `failed` status.
/// Rank 0 has the store (`Some`) and records the trial's start, metrics and final weights;
/// the trial goes on from checkpoint `from` of `ckpt` if there is one; `on` names its
/// device(s) for the record.
fn run_trial(
    store: Option<&mut Store>,
    trial: &Trial,
    setting: train::Setting,
    dims: &registry::Dims,
    pipe: &Pipe,
    (ckpt, from): (&Checkpoints, Option<&Manifest>),
    on: &str,
) -> anyhow::Result<(Status, Option<String>, String)> {
    let device = setting.device;
    let built = catch_unwind(AssertUnwindSafe(|| {
        train::build_for_training(trial, dims, setting.spec, device)
    }));
    let mut store = store;
    let model = match built {
        Ok(Ok(m)) => m,
        failed => {
            let msg = match failed {
                Ok(Err(e)) => format!("building the model: {e}"),
                Err(p) => format!("panic while building the model: {}", panic_message(&p)),
                Ok(Ok(_)) => unreachable!("matched above"),
            };
            if let Some(store) = store {
                store.start_trial(&trial.id, on, CODE_VERSION, None)?;
            }
            return Ok((Status::Failed, Some(msg.clone()), msg));
        }
    };
    // A trial with a checkpoint (left by a run that died) continues from it, keeping the
    // metrics recorded up to it.
    if let Some(store) = store.as_deref_mut() {
        let count = Some(model.param_count());
        match from.map(|m| m.step) {
            Some(step) => {
                pipe.line(&format!(
                    "resuming {} from its checkpoint at step {step}",
                    trial.id
                ));
                store.resume_trial(&trial.id, step as u64, on, CODE_VERSION, count)?
            }
            None => store.start_trial(&trial.id, on, CODE_VERSION, count)?,
        }
        let b = crate::flops::budget(&trial.cell, dims, setting.spec);
        store.set_compute(&trial.id, b.train_per_token, b.tokens, b.train_flops)?;
    }
    let lead = store.is_some();
    let mut recorder = store.map(|store| Recorder {
        store,
        trial: &trial.id,
        pipe,
        db_error: None,
    });
    let result = catch_unwind(AssertUnwindSafe(|| {
        let obs: &mut dyn Observer = match recorder.as_mut() {
            Some(r) => r,
            None => &mut Quiet,
        };
        train::train(trial, &model, setting, obs, Some(ckpt), from)
    }));
    if let Some(e) = recorder.as_mut().and_then(|r| r.db_error.take()) {
        return Err(e).context("writing metrics to the results database");
    }
    // Done: keep the final weights. Diverged: nothing to continue from. Failed: the
    // checkpoint stays for a retry.
    let kept = match &result {
        _ if !lead => Ok(None),
        Ok(Ok(Outcome::Done { .. })) => ckpt.finish(&model).map(Some),
        Ok(Ok(Outcome::Diverged { .. })) => {
            ckpt.discard();
            Ok(None)
        }
        _ => Ok(None),
    };
    match (kept, recorder.as_mut()) {
        (Err(e), _) => {
            let msg = format!("saving the final weights: {e}");
            return Ok((Status::Failed, Some(msg.clone()), msg));
        }
        (Ok(Some(sha)), Some(r)) => r
            .store
            .record_weights(&trial.id, &sha)
            .context("recording the final weights' checksum")?,
        _ => {}
    }
    Ok(match result {
        Ok(Ok(Outcome::Done { val_loss, val_bpb })) => (
            Status::Done,
            None,
            format!("val/loss {val_loss:.4} val/bpb {val_bpb:.4}"),
        ),
        Ok(Ok(Outcome::Diverged { step, what })) => {
            let msg = format!("diverged at step {step}: {what}");
            (Status::Diverged, Some(msg.clone()), msg)
        }
        Ok(Err(e)) => (Status::Failed, Some(e.to_string()), format!("error: {e}")),
        Err(p) => {
            let msg = format!("panic: {}", panic_message(&p));
            (Status::Failed, Some(msg.clone()), msg)
        }
    })
}

use parallel::panic_text as panic_message;

/// Sends metrics to the store and progress to the parent.
struct Recorder<'a> {
    store: &'a mut Store,
    trial: &'a str,
    pipe: &'a Pipe,
    db_error: Option<results::Error>,
}

impl Recorder<'_> {
    /// A DB write's outcome: its error is kept (the trial fails on it) and ends training.
    fn db(&mut self, written: results::Result<()>) -> candle_core::Result<()> {
        written.or_else(|e| {
            let msg = e.to_string();
            self.db_error = Some(e);
            candle_core::bail!("results database: {msg}")
        })
    }
}

impl Observer for Recorder<'_> {
    fn record(&mut self, step: usize, name: &str, value: f64) -> candle_core::Result<()> {
        let written = self.store.record(self.trial, step as u64, name, value);
        self.db(written)
    }

    fn step(&mut self, step: usize, loss: f64) -> candle_core::Result<()> {
        self.pipe.send(&format!("step {step} {loss}"));
        Ok(())
    }

    fn interrupted(&self) -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }

    fn checkpoint(&mut self, _step: usize) -> candle_core::Result<()> {
        let written = self.store.flush();
        self.db(written)
    }

    fn checkpoint_saved(&mut self, step: usize, sha256: &str) -> candle_core::Result<()> {
        let written = self
            .store
            .record_checkpoint(self.trial, step as u64, sha256);
        self.db(written)
    }

    fn event(&mut self, step: usize, kind: &str, message: &str) -> candle_core::Result<()> {
        self.pipe.line(&format!("{}: {message}", self.trial));
        let written = self
            .store
            .event(self.trial, Some(step as u64), kind, message);
        self.db(written)
    }

    fn eval(&mut self, step: usize, val_loss: f64, val_bpb: f64) {
        // Liveness for runners on other hosts; a failure here shows at the next flush.
        let _ = self.store.heartbeat(self.trial);
        self.pipe.send(&format!("eval {step} {val_loss} {val_bpb}"));
    }
}

/// What ranks other than 0 report: nothing; they only hear Ctrl-C.
struct Quiet;

impl Observer for Quiet {
    fn record(&mut self, _step: usize, _name: &str, _value: f64) -> candle_core::Result<()> {
        Ok(())
    }

    fn interrupted(&self) -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }
}
