//! `sweep run FILE`: validate and expand the sweep, train every trial not yet finished, and
//! record everything in the results store.

use std::io::IsTerminal;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use results::{Claim, NewTrial, Status, Store};

use crate::checkpoint::Checkpoints;
use crate::data::Dataset;
use crate::error::{exit, InputError};
use crate::memory;
use crate::owner;
use crate::spec::{self, Sweep, Trial};
use crate::train::{self, Observer, Outcome, ValSet};
use crate::CODE_VERSION;

/// Train every trial of a sweep file and record the results in SQLite.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sweep file (RON).
    pub file: PathBuf,
    /// Results database [default: sweep.db beside the sweep file].
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Where to train: cpu.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the trial table and exit: nothing is trained or written.
    #[arg(long)]
    pub dry_run: bool,
    /// Override a field of the sweep file before expansion, e.g. `--set train.steps=50`,
    /// `--set seeds=[0]`, `--set 'grid.ffn=[Gelu]'`. Repeatable.
    #[arg(long = "set", value_name = "PATH=RON")]
    pub sets: Vec<String>,
    /// Run failed trials again (a rerun skips them otherwise, as it skips done and diverged
    /// ones).
    #[arg(long, value_enum, value_name = "STATUS")]
    pub retry: Option<Retry>,
    /// Start a new record of this sweep and train every trial again; the old record stays in
    /// the DB as NAME@N (`sweep report --sweep NAME@N`).
    #[arg(long)]
    pub fresh: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Retry {
    Failed,
}

/// Set by Ctrl-C: the current step finishes, its writes complete, the trial goes back to
/// the queue (its checkpoint kept) and the run exits 130.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The exit status after Ctrl-C (128 + SIGINT), as shells report it.
const INTERRUPTED_EXIT: u8 = 130;

fn on_ctrl_c() {
    // A second Ctrl-C does not wait for the step: SQLite's transactions keep the DB whole.
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        std::process::exit(i32::from(INTERRUPTED_EXIT));
    }
    eprintln!("\ninterrupted: finishing the current step (Ctrl-C again to stop at once)");
}

pub fn exec(args: Args) -> anyhow::Result<u8> {
    let sweep = Sweep::load(&args.file, &args.sets)?;
    let device = parse_device(&args.device)?;
    if args.dry_run {
        print!("{}", plan(&sweep));
        return Ok(exit::OK);
    }
    if let (Device::Cpu, Some(limit)) = (&device, memory::available()) {
        memory::check(&sweep, limit, "this machine")?;
    }
    let data = Dataset::load(&sweep.data, &sweep.source, sweep.train.seq_len)?;
    let val = ValSet::new(&data.val, data.tokenizer, &sweep.train, &device)?;
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| sweep.source.base_dir().join("sweep.db"));

    let mut store = Store::open(&db)?;
    if args.fresh {
        store.archive_sweep(&sweep.name)?;
    }
    let sweep_id = store.begin_sweep(
        &sweep.name,
        &args.file.display().to_string(),
        &sweep.source.text,
        CODE_VERSION,
    )?;
    // A fresh record's trials are new trials: their ids are salted with its generation.
    let generation = store.generation(sweep_id)?;
    let mut trials = sweep.trials.clone();
    if generation > 0 {
        for t in &mut trials {
            t.id = spec::trial_id(&format!("{}\n// generation {generation}", t.config));
        }
    }
    let retry_failed = args.retry == Some(Retry::Failed);
    let (mut todo, mut finished, mut failed_before) = (Vec::new(), 0, 0);
    for (i, t) in trials.iter().enumerate() {
        let status = store.register_trial(
            sweep_id,
            i,
            &NewTrial {
                id: &t.id,
                seed: t.seed,
                label: &t.label,
                config: &t.config,
            },
        )?;
        match status {
            Status::Done | Status::Diverged => finished += 1,
            Status::Failed if !retry_failed => failed_before += 1,
            _ => todo.push(i),
        }
    }
    let ids: Vec<&str> = trials.iter().map(|t| t.id.as_str()).collect();
    let dropped = store.keep_only(sweep_id, &ids)?;
    let failed_note = if failed_before > 0 {
        format!(", {failed_before} failed before: rerun them with --retry failed")
    } else {
        String::new()
    };
    eprintln!(
        "sweep {}: {} trials, {} to run ({finished} finished before{failed_note}); data: {}; \
         results: {}",
        sweep.name,
        trials.len(),
        todo.len(),
        data.summary,
        db.display()
    );
    if dropped > 0 {
        eprintln!(
            "{dropped} trial(s) of an earlier version of {} are no longer in it: kept in the \
             DB, left out of this sweep and its report",
            args.file.display()
        );
    }

    ctrlc::set_handler(on_ctrl_c).context("installing the Ctrl-C handler")?;
    let me = owner::me();
    let progress = Progress::new(todo.len() * sweep.train.steps, sweep.train.steps);
    let dims = sweep.dims();
    let mut busy = 0;
    for (k, &i) in todo.iter().enumerate() {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        let trial = &trials[i];
        // Another `sweep run` on this DB may have taken or finished it meanwhile.
        match store.claim(&trial.id, &me, retry_failed, &owner::dead)? {
            Claim::Claimed(_) => {}
            Claim::Busy(_) => {
                busy += 1;
                continue;
            }
            Claim::Skipped(_) => continue,
        }
        progress.start(&format!(
            "trial {}/{} {} seed={}",
            k + 1,
            todo.len(),
            shown(&trial.label),
            trial.seed
        ));
        let started = Instant::now();
        let ckpt = Checkpoints::new(&db, &trial.id, sweep.train.checkpoint_every());
        let (status, error, summary) = run_trial(
            &mut store, trial, &sweep, &data, &val, &device, &dims, &progress, &ckpt,
        )?;
        if INTERRUPTED.load(Ordering::SeqCst) && status != Status::Done {
            store.release(&trial.id)?;
            progress.println(format!(
                "[{}/{}] stopped  {} seed={}: back in the queue, resumes from its last \
                 checkpoint",
                k + 1,
                todo.len(),
                shown(&trial.label),
                trial.seed
            ));
            break;
        }
        let wall = started.elapsed().as_secs_f64();
        store.finish_trial(&trial.id, status, error.as_deref(), wall)?;
        progress.println(format!(
            "[{}/{}] {status:<8} {} seed={} {summary} ({wall:.1} s)",
            k + 1,
            todo.len(),
            shown(&trial.label),
            trial.seed
        ));
    }
    progress.finish();

    let rows = store.trials(sweep_id)?;
    print!("{}", summary_table(&store, &rows)?);
    eprintln!(
        "seeds collapsed, against a baseline, with charts: sweep report --db {} --sweep {} \
         [--baseline KEY=VALUE] [--plot all]",
        db.display(),
        sweep.name
    );
    if busy > 0 {
        eprintln!("{busy} trial(s) were running in another `sweep run` on this DB");
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!(
            "interrupted; `sweep run {}` continues the sweep",
            args.file.display()
        );
        return Ok(INTERRUPTED_EXIT);
    }
    let failed = rows.iter().filter(|r| r.status == Status::Failed).count();
    Ok(if failed > 0 { exit::FAILED } else { exit::OK })
}

/// Builds and trains one trial, turning errors and panics into a `failed` status.
#[allow(clippy::too_many_arguments)]
fn run_trial(
    store: &mut Store,
    trial: &Trial,
    sweep: &Sweep,
    data: &Dataset,
    val: &ValSet,
    device: &Device,
    dims: &registry::Dims,
    progress: &Progress,
    ckpt: &Checkpoints,
) -> anyhow::Result<(Status, Option<String>, String)> {
    let built = catch_unwind(AssertUnwindSafe(|| train::build(trial, dims, device)));
    let model = match built {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            store.start_trial(&trial.id, &device_name(device), CODE_VERSION, None)?;
            let msg = format!("building the model: {e}");
            return Ok((Status::Failed, Some(msg.clone()), msg));
        }
        Err(p) => {
            store.start_trial(&trial.id, &device_name(device), CODE_VERSION, None)?;
            let msg = format!("panic while building the model: {}", panic_message(&p));
            return Ok((Status::Failed, Some(msg.clone()), msg));
        }
    };
    // A trial with a checkpoint (left by a run that died) continues from it, keeping the
    // metrics recorded up to it.
    match ckpt.latest_step(&trial.id) {
        Some(step) => {
            progress.println(format!(
                "resuming {} from its checkpoint at step {step}",
                trial.id
            ));
            store.resume_trial(
                &trial.id,
                step as u64,
                &device_name(device),
                CODE_VERSION,
                Some(model.param_count()),
            )?
        }
        None => store.start_trial(
            &trial.id,
            &device_name(device),
            CODE_VERSION,
            Some(model.param_count()),
        )?,
    }
    let mut obs = Recorder {
        store,
        trial: &trial.id,
        progress,
        last_bpb: None,
        db_error: None,
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let setting = train::Setting {
            spec: &sweep.train,
            data,
            val,
            device,
        };
        train::train(trial, &model, setting, &mut obs, Some(ckpt))
    }));
    if let Some(e) = obs.db_error.take() {
        return Err(e).context("writing metrics to the results database");
    }
    // Done: keep the final weights. Diverged: nothing to continue from. Failed: the
    // checkpoint stays for a retry.
    let kept = match &result {
        Ok(Ok(Outcome::Done { .. })) => ckpt.finish(&model),
        Ok(Ok(Outcome::Diverged { .. })) => ckpt.discard(),
        _ => Ok(()),
    };
    if let Err(e) = kept {
        let msg = format!("saving the final weights in {}: {e}", ckpt.dir().display());
        return Ok((Status::Failed, Some(msg.clone()), msg));
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

/// A trial's label for tables: `-` when nothing varies.
fn shown(label: &str) -> &str {
    if label.is_empty() {
        "-"
    } else {
        label
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

pub fn parse_device(spec: &str) -> Result<Device, InputError> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => Err(InputError::new(format!(
            "--device {s}: this build of sweep has no CUDA support; use --device cpu"
        ))),
        s => Err(InputError::new(format!(
            "--device {s}: unknown device; use --device cpu"
        ))),
    }
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}"),
    }
}

/// Sends metrics to the store and progress to the bars.
struct Recorder<'a> {
    store: &'a mut Store,
    trial: &'a str,
    progress: &'a Progress,
    last_bpb: Option<f64>,
    db_error: Option<results::Error>,
}

impl Observer for Recorder<'_> {
    fn record(&mut self, step: usize, name: &str, value: f64) -> candle_core::Result<()> {
        if let Err(e) = self.store.record(self.trial, step as u64, name, value) {
            let msg = e.to_string();
            self.db_error = Some(e);
            candle_core::bail!("results database: {msg}");
        }
        Ok(())
    }

    fn step(&mut self, step: usize, loss: f64) -> candle_core::Result<()> {
        self.progress.step(step, loss, self.last_bpb);
        if INTERRUPTED.load(Ordering::SeqCst) {
            candle_core::bail!("interrupted at step {step}");
        }
        Ok(())
    }

    fn checkpoint(&mut self, _step: usize) -> candle_core::Result<()> {
        if let Err(e) = self.store.flush() {
            let msg = e.to_string();
            self.db_error = Some(e);
            candle_core::bail!("results database: {msg}");
        }
        Ok(())
    }

    fn eval(&mut self, step: usize, val_loss: f64, val_bpb: f64) {
        self.last_bpb = Some(val_bpb);
        // Liveness for runners on other hosts; a failure here shows at the next flush.
        let _ = self.store.heartbeat(self.trial);
        self.progress.note(format!(
            "step {step}: val/loss {val_loss:.4} val/bpb {val_bpb:.4}"
        ));
    }
}

/// Two bars on a terminal (the sweep's steps with ETA, the current trial); plain lines
/// otherwise, for logs.
struct Progress {
    multi: MultiProgress,
    total: ProgressBar,
    trial: ProgressBar,
    tty: bool,
}

impl Progress {
    fn new(total_steps: usize, steps: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        let target = if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let total = multi.add(ProgressBar::new(total_steps as u64));
        total.set_style(
            ProgressStyle::with_template(
                "sweep  [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} steps, ETA {eta}",
            )
            .expect("valid template"),
        );
        let trial = multi.add(ProgressBar::new(steps as u64));
        trial.set_style(
            ProgressStyle::with_template("{prefix} step {pos}/{len} {msg}")
                .expect("valid template"),
        );
        Self {
            multi,
            total,
            trial,
            tty,
        }
    }

    fn start(&self, prefix: &str) {
        self.trial.reset();
        self.trial.set_prefix(prefix.to_string());
        self.trial.set_message("");
        if !self.tty {
            eprintln!("{prefix}");
        }
    }

    fn step(&self, step: usize, loss: f64, bpb: Option<f64>) {
        self.trial.set_position(step as u64);
        self.total.inc(1);
        let bpb = bpb
            .map(|b| format!(" | val/bpb {b:.3}"))
            .unwrap_or_default();
        self.trial.set_message(format!("| loss {loss:.4}{bpb}"));
    }

    fn note(&self, line: String) {
        if !self.tty {
            eprintln!("  {line}");
        }
    }

    fn println(&self, line: String) {
        if self.tty {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        self.trial.finish_and_clear();
        self.total.finish_and_clear();
    }
}

/// The dry-run table: every trial and the full components of every cell.
pub fn plan(sweep: &Sweep) -> String {
    let dims = sweep.dims();
    let cells = sweep.trials.len() / sweep.seeds.len();
    let mut s = format!(
        "sweep {}: {} trials = {cells} cells x {} seeds ({})\n",
        sweep.name,
        sweep.trials.len(),
        sweep.seeds.len(),
        sweep.source.path.display()
    );
    s += &format!(
        "model: d_model {}, n_layers {}, vocab {}; train: {} steps of {} x {} tokens, \
         eval every {}\n\n",
        dims.d_model,
        dims.n_layers,
        dims.vocab,
        sweep.train.steps,
        sweep.train.batch,
        sweep.train.seq_len,
        sweep.train.eval_every()
    );
    s += &format!(
        "{:>4}  {:<16}  {:>4}  {:>4}  label\n",
        "#", "id", "seed", "cell"
    );
    for (i, t) in sweep.trials.iter().enumerate() {
        s += &format!(
            "{i:>4}  {:<16}  {:>4}  {:>4}  {}\n",
            t.id,
            t.seed,
            t.cell_index,
            shown(&t.label)
        );
    }
    s += "\ncells:\n";
    for t in sweep.trials.iter().take(cells) {
        let parts: Vec<&str> = t
            .config
            .lines()
            .filter_map(|l| {
                let l = l.trim().trim_end_matches(',');
                registry::Slot::ALL
                    .iter()
                    .any(|s| l.starts_with(&format!("{}: ", s.key())))
                    .then_some(l)
            })
            .collect();
        s += &format!("{:>4}  {}\n", t.cell_index, parts.join("  "));
    }
    s
}

/// The end-of-run table of every trial of the sweep, from the store.
fn summary_table(store: &Store, rows: &[results::TrialRow]) -> anyhow::Result<String> {
    let mut s = format!(
        "\n{:<16}  {:>4}  {:<8}  {:>8}  {:>8}  {:>9}  {:>8}  label\n",
        "id", "seed", "status", "val/bpb", "val/loss", "params", "time"
    );
    let mut best: Option<(f64, &results::TrialRow)> = None;
    for r in rows {
        let last = |name| -> anyhow::Result<Option<f64>> {
            Ok(store.metric(&r.id, name)?.last().and_then(|(_, v)| *v))
        };
        let (bpb, loss) = (last("val/bpb")?, last("val/loss")?);
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
        s += &format!(
            "{:<16}  {:>4}  {:<8}  {:>8}  {:>8}  {:>9}  {:>8}  {}\n",
            r.id,
            r.seed,
            r.status.as_str(),
            fmt(bpb),
            fmt(loss),
            r.n_params.map_or("-".into(), |n| n.to_string()),
            r.wall_s.map_or("-".into(), |w| format!("{w:.1}s")),
            shown(&r.label)
        );
        if let (Some(b), Status::Done) = (bpb, r.status) {
            if best.is_none_or(|(bb, _)| b < bb) {
                best = Some((b, r));
            }
        }
        if let Some(e) = &r.error {
            s += &format!("{:<16}  {e}\n", "");
        }
    }
    if let Some((b, r)) = best {
        s += &format!(
            "\nbest val/bpb {b:.4}: {} seed={} ({})\n",
            shown(&r.label),
            r.seed,
            r.id
        );
    }
    Ok(s)
}
