//! `sweep report`: a sweep's results as a table (seeds collapsed into configurations), a
//! comparison with a baseline, and charts. Reads the DB while a sweep may still write it.

use std::path::{Path, PathBuf};

use results::report::{self, plot, Format, Selector};
use results::Store;

use crate::benchmarks::Task;
use crate::error::{exit, InputError};
use crate::spec;

/// Summarize a sweep: one row per configuration with val/bpb mean, std and 95% CI over
/// seeds; optionally compared with a baseline and drawn as PNG and SVG charts.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Results database (`sweep run FILE` writes sweep.db beside FILE).
    #[arg(long, default_value = "sweep.db")]
    pub db: PathBuf,
    /// The sweep to report [default: the one run most recently].
    #[arg(long)]
    pub sweep: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: FormatArg,
    /// Compare each configuration with the one that has these values instead, e.g.
    /// `residual=PreNorm` or `"residual=Hc, residual.dynamic=false"` (any slot, parameter or
    /// train/model setting): difference in val/bpb, its 95% CI and Welch's p over seeds.
    #[arg(long, value_name = "KEY=VALUE")]
    pub baseline: Option<String>,
    /// The metric rows are sorted by and compared with the baseline on: val/bpb, val/loss,
    /// eval/<set>/bpb, bench/<task>/acc or acc_norm, bench/lambada/ppl (its last value;
    /// accuracies sort highest first).
    #[arg(long, value_name = "NAME", default_value = "val/bpb")]
    pub metric: String,
    /// Draw charts as PNG and SVG: bpb, loss, amplification, benchmarks (one panel per
    /// zero-shot task, chance marked), frontier (the metric against --budget, a line per
    /// family across sizes) or all (repeatable, or comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub plot: Vec<PlotArg>,
    /// Folder for the charts [default: the DB's folder].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The x axis of the loss chart.
    #[arg(long = "x", value_enum, default_value = "step")]
    pub x_axis: XArg,
    /// The x axis of the frontier chart: training FLOPs, parameters or GPU hours.
    #[arg(long, value_enum, default_value = "flops")]
    pub budget: BudgetArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    Table,
    Csv,
    Json,
    Markdown,
    /// Markdown with metrics as rows and configurations as columns (the Goedel-mHC-1B
    /// results table's layout).
    Goedel,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum PlotArg {
    Bpb,
    Loss,
    Amplification,
    Benchmarks,
    Frontier,
    All,
}

/// The x axis of `--plot frontier`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum BudgetArg {
    Flops,
    Params,
    GpuHours,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum XArg {
    Step,
    Tokens,
}

pub fn exec(args: Args) -> anyhow::Result<u8> {
    let baseline = args
        .baseline
        .as_deref()
        .map(Selector::parse)
        .transpose()
        .map_err(input)?;
    let store = Store::open_existing(&args.db).map_err(input)?;
    let (sweep_id, name) = super::recorded::pick_sweep(&store, &args.db, args.sweep.as_deref())?;
    let trials = report::load(&store, sweep_id, &spec::factors)?;
    if trials.is_empty() {
        return Err(InputError::new(format!(
            "{}: sweep {name} has no trials yet; `sweep run` registers them when it starts",
            args.db.display()
        ))
        .into());
    }
    let mut summary =
        report::summarize(&name, trials, baseline.as_ref(), Some(&args.metric)).map_err(input)?;
    summary.chance = Task::ALL
        .iter()
        .map(|t| (t.metric().to_string(), t.chance()))
        .collect();

    // Every chart's data is read before anything is printed or written.
    let x = match args.x_axis {
        XArg::Step => plot::XAxis::Step,
        XArg::Tokens => plot::XAxis::Tokens,
    };
    let budget = match args.budget {
        BudgetArg::Flops => plot::Budget::Flops,
        BudgetArg::Params => plot::Budget::Params,
        BudgetArg::GpuHours => plot::Budget::GpuHours,
    };
    let charts = kinds(&args.plot, !summary.bench_headlines().is_empty(), budget)
        .into_iter()
        .map(|k| plot::prepare(k, &summary, &store, x))
        .collect::<Result<Vec<_>, _>>()
        .map_err(input)?;

    let format = match args.format {
        FormatArg::Table => Format::Table,
        FormatArg::Csv => Format::Csv,
        FormatArg::Json => Format::Json,
        FormatArg::Markdown => Format::Markdown,
        FormatArg::Goedel => Format::Goedel,
    };
    print!("{}", summary.render(format, &args.db.display().to_string()));

    let dir = args.out.clone().unwrap_or_else(|| db_dir(&args.db));
    for chart in &charts {
        let w = chart.save(&dir)?;
        eprintln!("wrote {} and {}", w.png.display(), w.svg.display());
    }
    Ok(exit::OK)
}

/// Bad requests to the store (no such DB, unknown sweep, nothing to plot) are input errors.
fn input(e: results::Error) -> anyhow::Error {
    match e {
        results::Error::Missing { .. }
        | results::Error::NotResults { .. }
        | results::Error::SchemaVersion { .. }
        | results::Error::Input(_) => InputError::new(e.to_string()).into(),
        other => other.into(),
    }
}

/// The charts asked for; `all` takes the benchmarks' chart when the sweep has benchmark
/// results.
fn kinds(args: &[PlotArg], benchmarks: bool, budget: plot::Budget) -> Vec<plot::Kind> {
    use plot::Kind::{Amplification, Benchmarks, Bpb, Frontier, Loss};
    let frontier = [Frontier(budget)];
    let mut out = Vec::new();
    for a in args {
        let add: &[plot::Kind] = match a {
            PlotArg::Bpb => &[Bpb],
            PlotArg::Loss => &[Loss],
            PlotArg::Amplification => &[Amplification],
            PlotArg::Benchmarks => &[Benchmarks],
            PlotArg::Frontier => &frontier,
            PlotArg::All if benchmarks => &[Bpb, Loss, Amplification, Benchmarks],
            PlotArg::All => &[Bpb, Loss, Amplification],
        };
        for k in add {
            if !out.contains(k) {
                out.push(*k);
            }
        }
    }
    out
}

fn db_dir(db: &Path) -> PathBuf {
    match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
