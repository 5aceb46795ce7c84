//! `sweep run FILE`: validate and expand the sweep, train every trial not yet finished, and
//! record everything in the results store.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use results::{Claim, NewTrial, Status, Store};

use crate::data::Dataset;
use crate::devices::{device_groups, parse_devices};
use crate::error::exit;
use crate::memory;
use crate::owner;
use crate::spec::{self, Sweep, Trial};
use crate::train::ValSet;
use crate::CODE_VERSION;

/// Train every trial of a sweep file and record the results in SQLite.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sweep file (RON).
    pub file: PathBuf,
    /// Results database [default: sweep.db beside the sweep file].
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Where to train: cpu, or cuda / cuda:N in a build with the `cuda` feature. A list
    /// (cuda:0,1,2,3) runs one trial on each listed device at a time, each in its own worker;
    /// `cpu,cpu` runs two at once on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Train each trial data-parallel on N devices of the --device list (sets
    /// train.gpus_per_trial): `--device cuda:0,1,2,3 --gpus-per-trial 2` runs two trials at
    /// once on two GPUs each.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub gpus_per_trial: Option<u16>,
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
    /// Run only shard K of N (K from 0): a fixed partition of the trial ids, so that N jobs
    /// (a Slurm array) run the whole sweep between them, each into its own --db; `sweep merge`
    /// joins their DBs.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    pub shard: Option<(u64, u64)>,
}

/// `K/N` with 0 <= K < N.
fn parse_shard(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("`{s}` is not K/N with 0 <= K < N, e.g. --shard 0/4");
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n): (u64, u64) = (
        k.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || k >= n {
        return Err(bad());
    }
    Ok((k, n))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Retry {
    Failed,
}

/// Set by Ctrl-C: the current step finishes, its writes complete, the trial goes back to
/// the queue (its checkpoint kept) and the run exits 130.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The exit status after Ctrl-C (128 + SIGINT), as shells report it.
pub(crate) const INTERRUPTED_EXIT: u8 = 130;

/// The running workers' pids, for forwarding Ctrl-C to them.
static WORKERS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn workers() -> std::sync::MutexGuard<'static, Vec<u32>> {
    // A panic while holding the list cannot leave it inconsistent: recover it.
    WORKERS.lock().unwrap_or_else(|e| e.into_inner())
}

fn on_ctrl_c() {
    // A second Ctrl-C does not wait for the step: SQLite's transactions keep the DB whole,
    // and the worker dies with this process; the next run resumes its trial.
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        std::process::exit(i32::from(INTERRUPTED_EXIT));
    }
    eprintln!("\ninterrupted: finishing the current step (Ctrl-C again to stop at once)");
    forward_interrupt();
}

/// A signal sent to `sweep run` alone (`kill -INT`, a scheduler) reaches its worker too.
fn forward_interrupt() {
    #[cfg(unix)]
    for &pid in workers().iter() {
        use nix::sys::signal::{kill, Signal};
        let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGINT);
    }
}

/// How a worker ended.
enum Ended {
    /// It recorded the trial's outcome; the summary line it sent.
    Finished(String),
    /// Stopped by Ctrl-C or SIGTERM, its trial given back.
    Interrupted,
    /// Killed or crashed before recording an outcome: why, for the trial's error.
    Died(String),
}

/// Runs one claimed trial on `device` in a `sweep worker` process, turning its progress lines
/// into the bar of `slot` and its death into a cause.
/// This process's binary, to start workers with. On Linux `/proc/self/exe`, which stays
/// this very binary even when the file was rebuilt or removed since the sweep started (a
/// path would then name the new binary, or nothing).
fn own_binary() -> anyhow::Result<std::path::PathBuf> {
    let proc = std::path::Path::new("/proc/self/exe");
    if cfg!(target_os = "linux") && proc.exists() {
        return Ok(proc.to_path_buf());
    }
    std::env::current_exe().context("locating the sweep binary for its worker")
}

fn supervise(
    args: &Args,
    db: &std::path::Path,
    trial: &Trial,
    device: &str,
    progress: &Progress,
    slot: usize,
) -> anyhow::Result<Ended> {
    let mut cmd = Command::new(own_binary()?);
    cmd.arg("worker")
        .arg(&args.file)
        .arg("--db")
        .arg(db)
        .args(["--device", device, "--trial", &trial.id])
        .args(["--parent", &std::process::id().to_string()]);
    for set in &args.sets {
        cmd.args(["--set", set]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a worker process")?;
    let pid = child.id();
    workers().push(pid);
    if INTERRUPTED.load(Ordering::SeqCst) {
        forward_interrupt();
    }
    // The worker's stderr is shown as it comes and its last messages kept for a crash report.
    // A backtrace (RUST_BACKTRACE) is shown but not kept: dozens of lines long, it would push
    // out the message it follows ("memory allocation of N bytes failed").
    let stderr = child.stderr.take().expect("piped");
    let tail = std::thread::spawn(move || {
        let mut tail: Vec<String> = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if is_message(&line) {
                tail.push(line);
                if tail.len() > 3 {
                    tail.remove(0);
                }
            }
        }
        tail
    });
    let mut summary = String::new();
    let mut failure = None;
    let mut last_bpb = None;
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        let (kind, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let nums: Vec<f64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
        match (kind, nums.as_slice()) {
            ("step", [step, loss]) => progress.step(slot, *step as usize, *loss, last_bpb),
            ("eval", [step, loss, bpb]) => {
                last_bpb = Some(*bpb);
                progress.note(format!("step {step}: val/loss {loss:.4} val/bpb {bpb:.4}"));
            }
            ("line", _) => progress.println(rest.to_string()),
            ("result", _) => summary = rest.to_string(),
            ("fail", _) => failure = Some(rest.to_string()),
            _ => progress.println(line.clone()),
        }
    }
    let status = child.wait().context("waiting for the worker")?;
    workers().retain(|&p| p != pid);
    let tail = tail.join().unwrap_or_default();
    Ok(match status.code() {
        Some(0) => Ended::Finished(summary),
        Some(c) if c == i32::from(INTERRUPTED_EXIT) => Ended::Interrupted,
        _ if INTERRUPTED.load(Ordering::SeqCst) => Ended::Interrupted,
        _ if failure.is_some() => Ended::Died(failure.expect("matched")),
        code => Ended::Died(death(code, &status, &tail)),
    })
}

/// Why a worker died, from its exit status and the last messages it wrote (at most 3).
fn death(code: Option<i32>, status: &std::process::ExitStatus, tail: &[String]) -> String {
    let how = match code {
        Some(c) => format!("exited with status {c}"),
        None => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                match status.signal() {
                    Some(6) => "was aborted (SIGABRT; a failed memory allocation aborts so)".into(),
                    Some(9) => {
                        "was killed (SIGKILL; the kernel's out-of-memory killer sends it)".into()
                    }
                    Some(11) => "crashed (SIGSEGV)".into(),
                    Some(s) => format!("was killed by signal {s}"),
                    None => "ended without a status".into(),
                }
            }
            #[cfg(not(unix))]
            {
                let _ = status;
                "ended without a status".to_string()
            }
        }
    };
    if tail.is_empty() {
        format!("the worker process training this trial {how}")
    } else {
        format!(
            "the worker process training this trial {how}: {}",
            tail.join(" | ")
        )
    }
}

/// Whether a line of a worker's stderr is a message rather than part of a backtrace (frames
/// and their locations are indented) or its notes.
fn is_message(line: &str) -> bool {
    !(line.is_empty()
        || line.starts_with(char::is_whitespace)
        || line.starts_with("stack backtrace")
        || line.starts_with("note: "))
}

pub fn exec(mut args: Args) -> anyhow::Result<u8> {
    if let Some(n) = args.gpus_per_trial {
        // After the file's own --set overrides, and passed on to the workers with them.
        args.sets.push(format!("train.gpus_per_trial={n}"));
    }
    let sweep = Sweep::load(&args.file, &args.sets)?;
    let devices = parse_devices(&args.device)?;
    let slots = device_groups(&devices, sweep.train.gpus_per_trial, &args.device)?;
    if args.dry_run {
        print!("{}", plan(&sweep));
        return Ok(exit::OK);
    }
    let on_cpu = devices.iter().filter(|d| *d == "cpu").count() as f64;
    if let (true, Some(limit)) = (on_cpu > 0.0, memory::available()) {
        // Trials side by side on the CPU share its memory.
        memory::check(&sweep, limit / on_cpu, "this machine")?;
    }
    // The parent reads the data once to refuse a bad corpus before anything is written;
    // each worker loads its own copy (and is the only process to touch a GPU).
    let data = Dataset::load(&sweep.data, &sweep.source, sweep.train.seq_len)?;
    ValSet::new(&data.val, data.tokenizer, &sweep.train, &Device::Cpu)?;
    sweep.held_out_sets()?;
    sweep.benchmark_sets()?;
    let data_summary = data.summary.clone();
    drop(data);
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
    let trials = spec::salted(sweep.trials.clone(), generation);
    let in_shard = |id: &str| args.shard.is_none_or(|(k, n)| spec::shard_of(id, n) == k);
    let retry_failed = args.retry == Some(Retry::Failed);
    let (mut todo, mut finished, mut failed_before) = (Vec::new(), 0, 0);
    // Positions are the trial's place in the whole sweep, so that merged shards keep order.
    for (i, t) in trials.iter().enumerate().filter(|(_, t)| in_shard(&t.id)) {
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
    let dropped = store.keep_only(sweep_id, &ids, &in_shard)?;
    let failed_note = if failed_before > 0 {
        format!(", {failed_before} failed before: rerun them with --retry failed")
    } else {
        String::new()
    };
    let scope = match args.shard {
        Some((k, n)) => format!(
            "shard {k}/{n}: {} of {} trials",
            trials.iter().filter(|t| in_shard(&t.id)).count(),
            trials.len()
        ),
        None => format!("{} trials", trials.len()),
    };
    eprintln!(
        "sweep {}: {scope}, {} to run ({finished} finished before{failed_note}); data: {}; \
         results: {}",
        sweep.name,
        todo.len(),
        data_summary,
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
    let progress = Progress::new(todo.len() * sweep.train.steps, sweep.train.steps, &slots);
    let mut busy = 0;
    // One worker per device at a time: a device takes the next trial it can claim as soon
    // as its last one ends. Only this thread touches the store; workers report over `done`.
    let (done, ended) = mpsc::channel();
    let mut free: Vec<usize> = (0..slots.len()).rev().collect();
    let mut queue = todo.iter().enumerate();
    let mut running = 0;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        loop {
            while !INTERRUPTED.load(Ordering::SeqCst) && !free.is_empty() {
                let Some((k, &i)) = queue.next() else { break };
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
                let slot = free.pop().expect("a free device");
                let name = format!(
                    "{} {}/{} {} seed={}",
                    if slots.len() > 1 {
                        &slots[slot]
                    } else {
                        "trial"
                    },
                    k + 1,
                    todo.len(),
                    shown(&trial.label),
                    trial.seed
                );
                progress.start(slot, &name);
                let (args, db, device, progress, done) =
                    (&args, &db, &slots[slot], &progress, done.clone());
                scope.spawn(move || {
                    let started = Instant::now();
                    let ended = supervise(args, db, trial, device, progress, slot);
                    let _ = done.send((slot, k, i, ended, started.elapsed().as_secs_f64()));
                });
                running += 1;
            }
            if running == 0 {
                return Ok(());
            }
            let (slot, k, i, ended, wall) = ended.recv().expect("a worker thread reports");
            running -= 1;
            free.push(slot);
            let trial = &trials[i];
            let (status, summary) = match ended? {
                Ended::Finished(summary) => (store.status(&trial.id)?, summary),
                Ended::Interrupted => {
                    // The worker gives its trial back; if it could not, do it here. A worker
                    // stopped by a signal of its own stops the run as Ctrl-C does.
                    store.release(&trial.id)?;
                    if !INTERRUPTED.swap(true, Ordering::SeqCst) {
                        forward_interrupt();
                    }
                    progress.println(format!(
                        "[{}/{}] stopped  {} seed={}: back in the queue, resumes from its \
                         last checkpoint",
                        k + 1,
                        todo.len(),
                        shown(&trial.label),
                        trial.seed
                    ));
                    continue;
                }
                Ended::Died(cause) => {
                    store.finish_trial(&trial.id, Status::Failed, Some(&cause), wall)?;
                    (Status::Failed, cause)
                }
            };
            let on = if slots.len() > 1 {
                format!(" on {}", slots[slot])
            } else {
                String::new()
            };
            progress.println(format!(
                "[{}/{}] {status:<8} {} seed={} {summary} ({wall:.1} s{on})",
                k + 1,
                todo.len(),
                shown(&trial.label),
                trial.seed
            ));
        }
    })?;
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

/// A trial's label for tables: `-` when nothing varies.
fn shown(label: &str) -> &str {
    if label.is_empty() {
        "-"
    } else {
        label
    }
}

/// Bars on a terminal (the sweep's steps with ETA, one per device for its current trial);
/// plain lines otherwise, for logs.
struct Progress {
    multi: MultiProgress,
    total: ProgressBar,
    trials: Vec<ProgressBar>,
    tty: bool,
}

impl Progress {
    fn new(total_steps: usize, steps: usize, devices: &[String]) -> Self {
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
        let trials = devices
            .iter()
            .map(|_| {
                let bar = multi.add(ProgressBar::new(steps as u64));
                bar.set_style(
                    ProgressStyle::with_template("{prefix} step {pos}/{len} {msg}")
                        .expect("valid template"),
                );
                bar
            })
            .collect();
        Self {
            multi,
            total,
            trials,
            tty,
        }
    }

    fn start(&self, slot: usize, prefix: &str) {
        let bar = &self.trials[slot];
        bar.reset();
        bar.set_prefix(prefix.to_string());
        bar.set_message("");
        if !self.tty {
            eprintln!("{prefix}");
        }
    }

    fn step(&self, slot: usize, step: usize, loss: f64, bpb: Option<f64>) {
        let bar = &self.trials[slot];
        bar.set_position(step as u64);
        self.total.inc(1);
        let bpb = bpb
            .map(|b| format!(" | val/bpb {b:.3}"))
            .unwrap_or_default();
        bar.set_message(format!("| loss {loss:.4}{bpb}"));
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
        self.trials.iter().for_each(ProgressBar::finish_and_clear);
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
    let train = &sweep.train;
    let mut batch = train.batch.to_string();
    if train.gpus_per_trial > 1 {
        batch += &format!(" x {} ranks", train.gpus_per_trial);
    }
    if train.grad_accum > 1 {
        batch += &format!(" x {} micro-batches", train.grad_accum);
    }
    s += &format!(
        "model: d_model {}, n_layers {}, vocab {}; train: {} steps of {batch} x {} tokens, \
         eval every {}\n\n",
        dims.d_model,
        dims.n_layers,
        dims.vocab,
        train.steps,
        train.seq_len,
        train.eval_every()
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
