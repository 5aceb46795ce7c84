//! `sweep run FILE`: validate and expand the sweep, train every trial not yet finished, and
//! record everything in the results store.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use results::{Claim, Status, Store};

use crate::data::Dataset;
use crate::devices::{device_groups, parse_devices};
use crate::error::exit;
use crate::memory;
use crate::owner;
use crate::plan::{self, shown};
use crate::progress::Progress;
use crate::spec::{self, Sweep};
use crate::supervise::{
    forward_interrupt, on_ctrl_c, supervise, Ended, Job, INTERRUPTED, INTERRUPTED_EXIT,
};
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

pub fn exec(mut args: Args) -> anyhow::Result<u8> {
    if let Some(n) = args.gpus_per_trial {
        // After the file's own --set overrides, and passed on to the workers with them.
        args.sets.push(format!("train.gpus_per_trial={n}"));
    }
    let sweep = Sweep::load(&args.file, &args.sets)?;
    let devices = parse_devices(&args.device)?;
    let slots = device_groups(&devices, sweep.train.gpus_per_trial, &args.device)?;
    if args.dry_run {
        print!("{}", plan::dry_run(&sweep));
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
    let plan::Registered {
        todo,
        finished,
        failed_before,
        dropped,
    } = plan::register(&store, sweep_id, &trials, args.shard, retry_failed)?;
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
    let job = Job {
        file: &args.file,
        sets: &args.sets,
        db: &db,
    };
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
                let (job, device, progress, done) = (&job, &slots[slot], &progress, done.clone());
                scope.spawn(move || {
                    let started = Instant::now();
                    let ended = supervise(job, trial, device, progress, slot);
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
