//! The report as text: an aligned table for the terminal, Markdown for notes and pull
//! requests, CSV and JSON with full precision for other tools.

use serde_json::{json, Value};

use super::stats::{welch, Comparison, Summary};
use super::{Report, Row, VsBaseline, SPIKE_MARGIN, SPIKE_WINDOW};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
    Markdown,
    /// Markdown in the layout of the Goedel-mHC-1B results table: metrics as rows,
    /// configurations as columns.
    Goedel,
}

impl Report {
    pub fn render(&self, format: Format, source: &str) -> String {
        match format {
            Format::Table => self.aligned(source, false),
            Format::Markdown => self.aligned(source, true),
            Format::Csv => self.csv(),
            Format::Goedel => self.goedel(source),
            Format::Json => {
                serde_json::to_string_pretty(&self.json()).expect("JSON values serialize") + "\n"
            }
        }
    }

    /// One line about the whole sweep.
    pub fn headline(&self, source: &str) -> String {
        let n: usize = self.rows.iter().map(|r| r.trials.len()).sum();
        format!(
            "sweep {}: {n} trials in {} configurations ({}); {source}",
            self.sweep,
            self.rows.len(),
            self.counts().describe()
        )
    }

    /// The table every text format shows: its header, each row's cells, and how many of the
    /// leading columns are configuration values (text; the rest are numbers).
    pub fn table(&self) -> (Vec<String>, Vec<Vec<String>>, usize) {
        let rows = self.rows.iter().map(|r| self.cells(r)).collect();
        (self.header(), rows, self.columns.len())
    }

    fn header(&self) -> Vec<String> {
        let mut h: Vec<String> = self.columns.clone();
        h.extend(["val/bpb", "std", "95% CI"].map(String::from));
        if self.metric != "val/bpb" {
            h.extend([self.metric.clone(), "95% CI".into()]);
        }
        if self.baseline.is_some() {
            let m = short(&self.metric);
            h.extend([format!("Δ {m}"), "Δ 95% CI".into(), "p".into()]);
        }
        h.push("best val/loss".into());
        h.extend(self.eval_names().iter().map(|n| format!("{n} bpb")));
        for m in self.bench_headlines() {
            h.push(short(&m));
            if self.baseline.is_some() {
                h.push("p".into());
            }
        }
        if self.has_amplification() {
            h.extend(["amax fwd", "amax bwd"].map(String::from));
        }
        if self.has_spikes() {
            h.push("spikes".into());
        }
        h.extend(["params", "tok/s", "seeds"].map(String::from));
        h
    }

    fn cells(&self, r: &Row) -> Vec<String> {
        let mut c = r.values.clone();
        let bpb = r.bpb.as_ref();
        c.push(opt(bpb.map(|s| s.mean), |v| format!("{v:.4}")));
        c.push(opt(bpb.and_then(|s| s.std), |v| format!("{v:.4}")));
        c.push(opt(bpb.and_then(|s| s.ci95), interval));
        if self.metric != "val/bpb" {
            let s = r.summary(&self.metric);
            c.push(opt(s.map(|s| s.mean), |v| format!("{v:.4}")));
            c.push(opt(s.and_then(|s| s.ci95), interval));
        }
        if self.baseline.is_some() {
            match &r.vs_baseline {
                Some(VsBaseline::IsBaseline) => {
                    c.extend(["baseline", "", ""].map(String::from));
                }
                Some(VsBaseline::Diff { diff, test, .. }) => {
                    c.push(format!("{diff:+.4}"));
                    c.push(opt(test.map(|t| t.ci95), interval));
                    c.push(opt(test.map(|t| t.p), p_value));
                }
                _ => c.extend(["-", "-", "-"].map(String::from)),
            }
        }
        c.push(opt(r.best_val_loss, |v| format!("{v:.4}")));
        for n in self.eval_names() {
            c.push(opt(r.eval_bpb(&n), |v| format!("{v:.4}")));
        }
        for m in self.bench_headlines() {
            c.push(opt(r.summary(&m), with_ci));
            if self.baseline.is_some() {
                c.push(self.p_against_baseline(r, &m));
            }
        }
        if self.has_amplification() {
            c.push(opt(r.amax_fwd, gain));
            c.push(opt(r.amax_bwd, gain));
        }
        if self.has_spikes() {
            c.push(opt(r.summary("train/spikes").map(|s| s.mean), |v| {
                format!("{v:.1}")
            }));
        }
        c.push(opt(r.n_params, |n| thousands(n as f64)));
        c.push(opt(r.tokens_per_s, thousands));
        c.push(r.counts.describe());
        c
    }

    fn aligned(&self, source: &str, markdown: bool) -> String {
        let header = self.header();
        let rows: Vec<Vec<String>> = self.rows.iter().map(|r| self.cells(r)).collect();
        let text_cols = self.columns.len();
        let width = |i: usize| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..header.len()).map(width).collect();
        // Configuration values and the seed states read left to right; numbers line up right.
        let left = |i: usize| i < text_cols || i + 1 == header.len();
        let line = |cells: &[String]| -> String {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if left(i) {
                        format!("{s:<w$}", w = widths[i])
                    } else {
                        format!("{s:>w$}", w = widths[i])
                    }
                })
                .collect();
            if markdown {
                format!("| {} |", parts.join(" | "))
            } else {
                parts.join("  ").trim_end().to_string()
            }
        };
        let mut out = if markdown {
            format!("**{}**\n\n", self.headline(source))
        } else {
            format!("{}\n\n", self.headline(source))
        };
        out += &line(&header);
        out.push('\n');
        if markdown {
            let rule: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(i, &w)| {
                    let dashes = "-".repeat(w.max(3));
                    if left(i) {
                        dashes
                    } else {
                        format!("{}:", &dashes[1..])
                    }
                })
                .collect();
            out += &format!("| {} |\n", rule.join(" | "));
        } else {
            let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out += &"-".repeat(total);
            out.push('\n');
        }
        for r in &rows {
            out += &line(r);
            out.push('\n');
        }
        out.push('\n');
        out += &self.notes();
        out
    }

    /// The lines under the table that say what its columns mean.
    pub fn notes(&self) -> String {
        let mut s = String::from(
            "val/bpb: last evaluation, mean over done seeds; std and 95% CI (Student t) over \
             seeds.\n",
        );
        if self.metric != "val/bpb" {
            s += &format!(
                "Rows sorted by {}: its last value, mean over done seeds ({} is better).\n",
                self.metric,
                if super::higher_is_better(&self.metric) {
                    "higher"
                } else {
                    "lower"
                }
            );
        }
        if let Some(b) = &self.baseline {
            s += &format!(
                "Δ {}: minus the matching {b} configuration ({} is better); 95% CI and \
                 two-sided p from Welch's t-test over seeds.\n",
                short(&self.metric),
                if super::higher_is_better(&self.metric) {
                    "positive"
                } else {
                    "negative"
                }
            );
        }
        for e in super::frontier::at_equal_compute(self) {
            s += &format!(
                "At equal training FLOPs, {} minus {} (the baseline's line interpolated on log \
                 FLOPs, over {} size(s) in its range): Δ {} {:+.4}, 95% CI {}.\n",
                e.family,
                e.baseline,
                e.sizes,
                short(&self.metric),
                e.diff,
                opt(e.ci95, interval)
            );
        }
        if !self.bench_headlines().is_empty() {
            s += "<task> acc_norm / acc: zero-shot benchmark accuracy at the end of training, \
                  mean ±95% CI half-width over done seeds (acc_norm: log-likelihood per byte of \
                  each choice; WinoGrande and LAMBADA: acc); p: Welch's test against the \
                  baseline. All metrics: --format csv or json.\n";
        }
        if !self.eval_names().is_empty() {
            s += "<set> bpb: bits per byte on the held-out set of that name (evals), last \
                  evaluation, mean over done seeds.\n";
        }
        if self.has_spikes() {
            s += &format!(
                "spikes: training steps whose loss exceeded the median of the previous {} \
                 by more than {:.0}% (train/spikes), mean over done seeds.\n",
                SPIKE_WINDOW,
                100.0 * SPIKE_MARGIN
            );
        }
        if self.has_amplification() {
            s += "amax fwd / bwd: composite Amax gain over the whole depth at the last \
                  evaluation (1 = plain residual).\n";
        }
        if self.counts().running > 0 {
            s += "Running seeds are counted under seeds; their results join the statistics \
                  once they finish.\n";
        }
        let events: Vec<_> = self
            .rows
            .iter()
            .flat_map(|r| &r.trials)
            .flat_map(|t| t.events.iter().map(move |e| (t, e)))
            .collect();
        if !events.is_empty() {
            s += "Events (counted under seeds):\n";
            for (t, e) in events {
                s += &format!(
                    "  {} seed {} (trial {}): {}\n",
                    t.row.label, t.row.seed, t.row.id, e.message
                );
            }
        }
        s
    }

    fn csv(&self) -> String {
        let mut header: Vec<String> = self.columns.clone();
        header.extend(
            [
                "name",
                "val_bpb_mean",
                "val_bpb_std",
                "val_bpb_ci95_lo",
                "val_bpb_ci95_hi",
            ]
            .map(String::from),
        );
        if self.baseline.is_some() {
            header.extend(
                [
                    "is_baseline",
                    "diff_bpb",
                    "diff_ci95_lo",
                    "diff_ci95_hi",
                    "p_welch",
                ]
                .map(String::from),
            );
        }
        header.push("best_val_loss".into());
        let evals = self.eval_names();
        header.extend(evals.iter().map(|n| format!("eval_{n}_bpb")));
        let bench = self.bench_metrics();
        for m in &bench {
            let k = m.replace('/', "_");
            header.extend([
                format!("{k}_mean"),
                format!("{k}_ci95_lo"),
                format!("{k}_ci95_hi"),
            ]);
            if self.baseline.is_some() {
                header.push(format!("{k}_p_welch"));
            }
        }
        header.extend(
            [
                "amax_fwd",
                "amax_bwd",
                "n_params",
                "tokens_per_s",
                "done",
                "diverged",
                "failed",
                "running",
                "queued",
            ]
            .map(String::from),
        );
        let mut out = csv_line(&header);
        for r in &self.rows {
            let bpb = r.bpb.as_ref();
            let mut c = r.values.clone();
            c.push(r.name.clone());
            c.push(num(bpb.map(|s| s.mean)));
            c.push(num(bpb.and_then(|s| s.std)));
            c.push(num(bpb.and_then(|s| s.ci95).map(|c| c.0)));
            c.push(num(bpb.and_then(|s| s.ci95).map(|c| c.1)));
            if self.baseline.is_some() {
                let (is, diff, test) = match &r.vs_baseline {
                    Some(VsBaseline::IsBaseline) => (true, None, None),
                    Some(VsBaseline::Diff { diff, test, .. }) => (false, Some(*diff), *test),
                    _ => (false, None, None),
                };
                c.push(is.to_string());
                c.push(num(diff));
                c.push(num(test.map(|t| t.ci95.0)));
                c.push(num(test.map(|t| t.ci95.1)));
                c.push(num(test.map(|t| t.p)));
            }
            c.push(num(r.best_val_loss));
            for n in &evals {
                c.push(num(r.eval_bpb(n)));
            }
            for m in &bench {
                let s = r.summary(m);
                c.push(num(s.map(|s| s.mean)));
                c.push(num(s.and_then(|s| s.ci95).map(|c| c.0)));
                c.push(num(s.and_then(|s| s.ci95).map(|c| c.1)));
                if self.baseline.is_some() {
                    c.push(num(self.vs_baseline(r, m).map(|t| t.p)));
                }
            }
            c.push(num(r.amax_fwd));
            c.push(num(r.amax_bwd));
            c.push(r.n_params.map_or(String::new(), |n| n.to_string()));
            c.push(num(r.tokens_per_s));
            for (_, n) in r.counts.entries() {
                c.push(n.to_string());
            }
            out += &csv_line(&c);
        }
        out
    }

    fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let config: serde_json::Map<String, Value> = self
                    .columns
                    .iter()
                    .zip(&r.values)
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                let vs = match &r.vs_baseline {
                    None => Value::Null,
                    Some(VsBaseline::IsBaseline) => json!("baseline"),
                    Some(VsBaseline::NoMatch) => json!("no match"),
                    Some(VsBaseline::Diff {
                        baseline,
                        diff,
                        test,
                    }) => json!({
                        "baseline": self.rows[*baseline].name,
                        "diff": diff,
                        "ci95": test.map(|t| [t.ci95.0, t.ci95.1]),
                        "p": test.map(|t| t.p),
                        "df": test.map(|t| t.df),
                    }),
                };
                let seeds: serde_json::Map<String, Value> = r
                    .counts
                    .entries()
                    .iter()
                    .map(|(s, n)| (s.to_string(), json!(n)))
                    .collect();
                json!({
                    "name": r.name,
                    "config": config,
                    "factors": r.factors.iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect::<serde_json::Map<_, _>>(),
                    "val_bpb": r.bpb.map(|s| json!({
                        "mean": s.mean,
                        "std": s.std,
                        "ci95": s.ci95.map(|c| [c.0, c.1]),
                        "n": s.n,
                    })),
                    "val_bpb_seeds": r.bpb_seeds.iter()
                        .map(|(seed, v)| json!({"seed": seed, "value": v})).collect::<Vec<_>>(),
                    "vs_baseline": vs,
                    "best_val_loss": r.best_val_loss,
                    "evals_bpb": self.eval_names().iter()
                        .map(|n| (n.clone(), json!(r.eval_bpb(n))))
                        .collect::<serde_json::Map<_, _>>(),
                    "metrics": r.metrics.iter()
                        .map(|(n, s)| (n.clone(), json!({
                            "mean": s.mean,
                            "std": s.std,
                            "ci95": s.ci95.map(|c| [c.0, c.1]),
                            "n": s.n,
                            "p_vs_baseline": self.vs_baseline(r, n).map(|t| t.p),
                        })))
                        .collect::<serde_json::Map<_, _>>(),
                    "amax_fwd": r.amax_fwd,
                    "amax_bwd": r.amax_bwd,
                    "n_params": r.n_params,
                    "tokens_per_s": r.tokens_per_s,
                    "seeds": seeds,
                    "trials": r.trials.iter().map(|t| json!({
                        "id": t.row.id, "seed": t.row.seed, "status": t.row.status.as_str(),
                        "val_bpb": t.final_bpb, "error": t.row.error,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "sweep": self.sweep,
            "columns": self.columns,
            "baseline": self.baseline,
            "metric": self.metric,
            "at_equal_compute": super::frontier::at_equal_compute(self).iter().map(|e| json!({
                "family": e.family,
                "baseline": e.baseline,
                "diff": e.diff,
                "ci95": e.ci95.map(|c| [c.0, c.1]),
                "sizes": e.sizes,
            })).collect::<Vec<_>>(),
            "rows": rows,
        })
    }

    /// Welch's test of a row's `metric` against its baseline's (see `vs_baseline`).
    fn vs_baseline(&self, r: &Row, metric: &str) -> Option<Comparison> {
        let Some(VsBaseline::Diff { baseline, .. }) = &r.vs_baseline else {
            return None;
        };
        welch(&r.summary(metric)?, &self.rows[*baseline].summary(metric)?)
    }

    fn p_against_baseline(&self, r: &Row, metric: &str) -> String {
        match &r.vs_baseline {
            Some(VsBaseline::IsBaseline) => "baseline".into(),
            _ => opt(self.vs_baseline(r, metric).map(|t| t.p), p_value),
        }
    }

    /// Metrics as rows, configurations as columns, as the Goedel-mHC-1B table lays them out:
    /// val/bpb, each held-out set's BPB, each benchmark's metrics; mean ±95% CI half-width
    /// over done seeds, and with a baseline, Welch's p against it.
    fn goedel(&self, source: &str) -> String {
        let mut metrics = vec!["val/bpb".to_string()];
        metrics.extend(self.eval_names().iter().map(|n| format!("eval/{n}/bpb")));
        metrics.extend(self.bench_metrics());
        let mut out = format!("**{}**\n\n", self.headline(source));
        let names: Vec<String> = self.rows.iter().map(|r| r.name.replace('|', "/")).collect();
        out += &format!("| metric | {} |\n", names.join(" | "));
        out += &format!("|---|{}\n", "---:|".repeat(names.len()));
        for m in &metrics {
            let cells: Vec<String> = self
                .rows
                .iter()
                .map(|r| {
                    let v = match m.strip_prefix("eval/").and_then(|n| n.strip_suffix("/bpb")) {
                        Some(set) if r.summary(m).is_none() => {
                            r.eval_bpb(set).and_then(|v| Summary::of(&[v]))
                        }
                        _ => r.summary(m),
                    };
                    let mut cell = opt(v, with_ci);
                    if self.baseline.is_some() && v.is_some() {
                        if let Some(t) = self.vs_baseline(r, m) {
                            cell += &format!(" (p {})", p_value(t.p));
                        }
                    }
                    cell
                })
                .collect();
            out += &format!("| {} | {} |\n", label(m), cells.join(" | "));
        }
        out.push('\n');
        out += "Mean ±95% CI half-width over the done seeds; p: Welch's t-test against the \
                baseline configuration. BPB is per UTF-8 byte of the evaluated text. \
                Benchmarks: zero-shot accuracy (acc_norm per byte of each choice), at the \
                end of training.\n";
        if let Some(b) = &self.baseline {
            out += &format!("Baseline: {b}.\n");
        }
        out
    }
}

/// A metric's name without its `bench/` or `eval/` prefix: `hellaswag acc_norm`.
fn short(metric: &str) -> String {
    match metric
        .strip_prefix("bench/")
        .or_else(|| metric.strip_prefix("eval/"))
    {
        Some(rest) => rest.replace('/', " "),
        None => metric.to_string(),
    }
}

/// A row label of the Goedel layout: `HellaSwag`-style names are the task's metric names.
fn label(metric: &str) -> String {
    match metric.strip_prefix("eval/") {
        Some(rest) => format!("{} BPB", rest.trim_end_matches("/bpb")),
        None => short(metric),
    }
}

/// `0.2810 ±0.0120`, or the mean alone for one seed.
fn with_ci(s: Summary) -> String {
    match s.ci95 {
        Some((lo, hi)) => format!("{:.4} ±{:.4}", s.mean, (hi - lo) / 2.0),
        None => format!("{:.4}", s.mean),
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

fn interval((lo, hi): (f64, f64)) -> String {
    format!("[{lo:.4}, {hi:.4}]")
}

fn p_value(p: f64) -> String {
    if p < 0.001 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

/// Three significant digits: gains run from 1.000 to the thousands.
fn gain(g: f64) -> String {
    if g < 10.0 {
        format!("{g:.3}")
    } else if g < 100.0 {
        format!("{g:.1}")
    } else {
        format!("{g:.0}")
    }
}

fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.round().abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 {
        out.insert(0, '-');
    }
    out
}

/// Full precision (Rust's shortest round-trip form); empty when missing.
fn num(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

/// RFC 4180: fields with commas, quotes or line breaks are quoted, quotes doubled.
fn csv_line(fields: &[String]) -> String {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.clone()
            }
        })
        .collect();
    quoted.join(",") + "\n"
}
