//! `sweep eval --db DB`: scores the zero-shot benchmarks on the saved final weights of done
//! trials, recorded as `bench/<task>/...` at each trial's last step, the metrics a trial
//! records when its sweep lists them: a finished sweep gains the benchmark table without
//! retraining. The sweep is rebuilt from the file text its DB recorded; weights are used
//! only when their SHA-256 matches the trial's record.

use std::path::{Path, PathBuf};

use anyhow::Context;
use results::{Status, Store};

use crate::benchmarks::{self, Benchmark};
use crate::devices::{device_of, parse_devices};
use crate::error::{exit, InputError};
use crate::parallel::Solo;
use crate::spec::{self, Source};

use super::recorded;

/// Score zero-shot benchmarks on the final weights of finished trials.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The results DB.
    #[arg(long, default_value = "sweep.db")]
    pub db: PathBuf,
    /// Only this trial (its id).
    #[arg(long, conflicts_with = "sweep")]
    pub trial: Option<String>,
    /// The sweep whose done trials to score [default: the one run most recently].
    #[arg(long)]
    pub sweep: Option<String>,
    /// The benchmarks, as a sweep file lists them, e.g. `[HellaSwag(limit: 500), ArcEasy]`
    /// [default: the sweep file's `benchmarks`].
    #[arg(long, value_name = "RON")]
    pub benchmarks: Option<String>,
    /// The folder of the benchmark files for --benchmarks [default: the sweep file's
    /// benchmark_dir].
    #[arg(long, value_name = "DIR")]
    pub benchmark_dir: Option<PathBuf>,
    /// Where to score: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write every scored item as a JSON line to this file (with --trial): its prompts,
    /// tokens, each choice's log-likelihood and the choices picked, for a second
    /// implementation to check (benches/score_check.py).
    #[arg(long, value_name = "FILE", requires = "trial")]
    pub dump: Option<PathBuf>,
}

pub fn exec(args: Args) -> anyhow::Result<u8> {
    let mut store = Store::open_existing(&args.db).map_err(|e| InputError::new(e.to_string()))?;
    let (sweep, generation) = recorded::sweep(
        &store,
        &args.db,
        args.sweep.as_deref(),
        args.trial.as_deref(),
    )?;
    let specs = match &args.benchmarks {
        Some(text) => {
            let flag = Source::from_text(Path::new("--benchmarks"), text.clone());
            let dir = args
                .benchmark_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .or_else(|| sweep.benchmark_dir.clone());
            spec::parse_benchmarks(&flag, flag.text.trim(), dir.as_deref())?
        }
        None => sweep.benchmarks.clone(),
    };
    if specs.is_empty() {
        return Err(InputError::new(format!(
            "sweep {} lists no benchmarks: name them, e.g. --benchmarks \"[HellaSwag, ArcEasy]\" \
             --benchmark-dir ../shared/data/eval",
            sweep.name
        ))
        .into());
    }
    let sets = specs
        .iter()
        .map(|b| {
            let file = b
                .file(
                    args.benchmark_dir.as_ref().and_then(|d| d.to_str()),
                    Path::new("."),
                )
                .map_err(InputError::new)?;
            Benchmark::load(b, &file, sweep.data.tokenizer())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let [name] = &parse_devices(&args.device)?[..] else {
        return Err(InputError::new(format!(
            "--device {}: sweep eval scores on one device",
            args.device
        ))
        .into());
    };
    let device = device_of(name)?;

    let trials = spec::salted(sweep.trials.clone(), generation);
    let statuses = store
        .weights(args.trial.as_deref())
        .context("reading the trials")?;
    if let (Some(id), true) = (&args.trial, statuses.is_empty()) {
        return Err(InputError::new(format!(
            "--trial {id}: no such trial in {}",
            args.db.display()
        ))
        .into());
    }
    let (mut scored, mut failed) = (0, 0);
    for trial in &trials {
        let Some((_, status, sha)) = statuses.iter().find(|(id, ..)| *id == trial.id) else {
            continue;
        };
        if *status != Status::Done {
            println!(
                "skipped  {}  {} ({})",
                trial.id,
                trial.label,
                status.as_str()
            );
            continue;
        }
        let path = match recorded::final_weights(&args.db, &trial.id, sha.as_deref()) {
            Ok(p) => p,
            Err(why) => {
                failed += 1;
                println!("FAILED   {}  {}: {why}", trial.id, trial.label);
                continue;
            }
        };
        let model = recorded::load_model(&sweep, trial, &path, &device)
            .with_context(|| format!("loading trial {}", trial.id))?;
        let spec = &sweep.train;
        let tokens = spec.batch * spec.seq_len;
        let metrics = benchmarks::run(&model, &sets, spec.seq_len, tokens, &Solo)
            .with_context(|| format!("scoring trial {}", trial.id))?;
        if let Some(file) = &args.dump {
            dump(file, &model, &sets, spec.seq_len, tokens)?;
            println!("wrote    {}", file.display());
        }
        let step = sweep.train.steps as u64;
        for (n, v) in &metrics {
            store.record(&trial.id, step, n, *v)?;
        }
        store.flush()?;
        scored += 1;
        let shown: Vec<String> = metrics
            .iter()
            .filter(|(n, _)| n.ends_with("/acc") || n.ends_with("/acc_norm"))
            .map(|(n, v)| format!("{} {v:.4}", n.trim_start_matches("bench/")))
            .collect();
        println!(
            "scored   {}  {}: {}",
            trial.id,
            trial.label,
            shown.join(", ")
        );
    }
    println!("{scored} trial(s) scored, {failed} failed");
    Ok(if failed > 0 { exit::FAILED } else { exit::OK })
}

/// Every item of every benchmark as one JSON line: task, line, gold, prompts, tokens,
/// continuation lengths, each request's log-likelihood and greedy match, and the choices
/// picked by acc and acc_norm.
fn dump(
    file: &Path,
    model: &crate::model::Gpt,
    sets: &[Benchmark],
    seq_len: usize,
    tokens: usize,
) -> anyhow::Result<()> {
    use std::io::Write;
    let device = model.params()[0].var.device().clone();
    let mut scorer = benchmarks::ModelScorer {
        model,
        device: &device,
        seq_len,
        tokens,
    };
    let mut out = String::new();
    for b in sets {
        let requests: Vec<&benchmarks::Request> =
            b.items.iter().flat_map(|it| &it.requests).collect();
        let scores = benchmarks::score::Scorer::score(&mut scorer, &requests)?;
        let mut at = 0;
        for it in &b.items {
            let s = &scores[at..at + it.requests.len()];
            at += it.requests.len();
            let (acc, norm) = benchmarks::score::choices(b.task, it, s);
            let line = serde_json::json!({
                "task": b.task.metric(),
                "line": it.line,
                "gold": it.gold,
                "prompts": it.prompts,
                "tokens": it.requests.iter().map(|r| &r.tokens).collect::<Vec<_>>(),
                "cont": it.requests.iter().map(|r| r.cont).collect::<Vec<_>>(),
                "choice_bytes": it.choice_bytes,
                "logprob": s.iter().map(|x| x.logprob).collect::<Vec<_>>(),
                "greedy": s.iter().map(|x| x.greedy).collect::<Vec<_>>(),
                "acc_choice": acc,
                "norm_choice": norm,
            });
            out += &line.to_string();
            out.push('\n');
        }
    }
    let tmp = file.with_extension("tmp");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(out.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, file))
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}
