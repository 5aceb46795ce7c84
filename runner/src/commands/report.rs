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
    /// Draw charts as PNG and SVG: bpb, loss, amplification, streams (the streams' cosine
    /// and effective rank over depth), benchmarks (one panel per zero-shot task, chance
    /// marked), frontier (the metric against --budget, a line per
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
    /// Also write the report as one self-contained HTML file: the table (sortable), every
    /// chart with data inline as SVG, each trial's status and resolved configuration, the
    /// sweep file as run and the code version.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Rewrite the report (the terminal table, and --html) every SECONDS while the sweep has
    /// trials queued or running; stops once none is left.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub watch: Option<u64>,
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
    Streams,
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
    loop {
        let live = once(&args, &store, sweep_id, &name, baseline.as_ref())?;
        match args.watch {
            Some(secs) if live => std::thread::sleep(std::time::Duration::from_secs(secs)),
            _ => return Ok(exit::OK),
        }
    }
}

/// One report: printed, its charts and page written. Returns whether the sweep still has
/// trials queued or running.
fn once(
    args: &Args,
    store: &Store,
    sweep_id: i64,
    name: &str,
    baseline: Option<&Selector>,
) -> anyhow::Result<bool> {
    let trials = report::load(store, sweep_id, &spec::factors)?;
    if trials.is_empty() {
        return Err(InputError::new(format!(
            "{}: sweep {name} has no trials yet; `sweep run` registers them when it starts",
            args.db.display()
        ))
        .into());
    }
    let mut summary =
        report::summarize(name, trials, baseline, Some(&args.metric)).map_err(input)?;
    summary.chance = Task::ALL
        .iter()
        .map(|t| (t.metric().to_string(), t.chance()))
        .collect();
    let counts = summary.counts();
    let live = counts.running + counts.queued > 0;

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
    // Only multi-stream residuals record stream diagnostics: `--plot all` draws them where any
    // trial has some.
    let mut streams = false;
    for t in summary.rows.iter().flat_map(|r| &r.trials) {
        streams |= !store.metric_names(&t.row.id, "streams/")?.is_empty();
    }
    let charts = kinds(
        &args.plot,
        !summary.bench_headlines().is_empty(),
        streams,
        budget,
    )
    .into_iter()
    .map(|k| plot::prepare(k, &summary, store, x))
    .collect::<Result<Vec<_>, _>>()
    .map_err(input)?;
    let page = match &args.html {
        Some(_) => Some(html_page(args, store, sweep_id, &summary, x, budget, live)?),
        None => None,
    };

    let format = match args.format {
        FormatArg::Table => Format::Table,
        FormatArg::Csv => Format::Csv,
        FormatArg::Json => Format::Json,
        FormatArg::Markdown => Format::Markdown,
        FormatArg::Goedel => Format::Goedel,
    };
    if args.watch.is_some() && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        print!("\x1b[2J\x1b[H"); // each rewrite replaces the last on a terminal
    }
    print!("{}", summary.render(format, &args.db.display().to_string()));

    let dir = args.out.clone().unwrap_or_else(|| db_dir(&args.db));
    for chart in &charts {
        let w = chart.save(&dir)?;
        eprintln!("wrote {} and {}", w.png.display(), w.svg.display());
    }
    if let (Some(file), Some(page)) = (&args.html, page) {
        plot::write_file(file, page.as_bytes()).map_err(input)?;
        eprintln!("wrote {}", file.display());
    }
    Ok(live)
}

/// The report as one HTML page, with every chart the sweep has data for.
fn html_page(
    args: &Args,
    store: &Store,
    sweep_id: i64,
    summary: &report::Report,
    x: plot::XAxis,
    budget: plot::Budget,
    live: bool,
) -> anyhow::Result<String> {
    use plot::Kind;
    let mut charts = Vec::new();
    let mut all = vec![
        Kind::Bpb,
        Kind::Loss,
        Kind::Amplification,
        Kind::Streams,
        Kind::Benchmarks,
    ];
    all.push(Kind::Frontier(budget));
    for kind in all {
        // A chart without data (no amplification metrics, one size only) is left out.
        if let Ok(chart) = plot::prepare(kind, summary, store, x) {
            charts.push((chart_title(kind).to_string(), chart.svg()?));
        }
    }
    let (file, text, version): (String, String, String) = store.conn().query_row(
        "SELECT file, spec, code_version FROM sweeps WHERE id = ?1",
        [sweep_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let generated: String =
        store
            .conn()
            .query_row("SELECT strftime('%Y-%m-%d %H:%M:%S UTC', 'now')", [], |r| {
                r.get(0)
            })?;
    let source = args.db.display().to_string();
    Ok(report::html::render(&report::html::Page {
        report: summary,
        source: &source,
        sweep_file: &file,
        sweep_text: &text,
        code_version: &version,
        generated: &generated,
        charts: &charts,
        refresh: live.then_some(args.watch).flatten(),
    }))
}

fn chart_title(kind: plot::Kind) -> &'static str {
    match kind {
        plot::Kind::Bpb => "Final val/bpb per configuration, each seed a dot",
        plot::Kind::Loss => "Training and validation loss",
        plot::Kind::Amplification => "Stream amplification: composite Amax gain over depth",
        plot::Kind::Benchmarks => "Zero-shot benchmarks (chance dashed)",
        plot::Kind::Streams => {
            "The residual streams: mean pairwise cosine and effective rank over depth"
        }
        plot::Kind::Frontier(_) => "The metric against the budget, one line per family",
    }
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

/// The charts asked for; `all` takes the streams' and the benchmarks' charts when the sweep
/// has their metrics.
fn kinds(
    args: &[PlotArg],
    benchmarks: bool,
    streams: bool,
    budget: plot::Budget,
) -> Vec<plot::Kind> {
    use plot::Kind::{Amplification, Benchmarks, Bpb, Frontier, Loss, Streams};
    let frontier = [Frontier(budget)];
    let mut all = vec![Bpb, Loss, Amplification];
    if streams {
        all.push(Streams);
    }
    if benchmarks {
        all.push(Benchmarks);
    }
    let mut out = Vec::new();
    for a in args {
        let add: &[plot::Kind] = match a {
            PlotArg::Bpb => &[Bpb],
            PlotArg::Loss => &[Loss],
            PlotArg::Amplification => &[Amplification],
            PlotArg::Benchmarks => &[Benchmarks],
            PlotArg::Streams => &[Streams],
            PlotArg::Frontier => &frontier,
            PlotArg::All => &all,
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
