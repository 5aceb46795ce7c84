//! Comparisons across model sizes: configuration families (the configurations that differ
//! only in `model.*`), a budget to put them on (training FLOPs, parameters, GPU hours), and
//! the difference between two families at equal budget, interpolated on the log-budget axis
//! (the frontier chart draws the same lines).

use super::stats::t_quantile_975;
use super::{Report, Row, VsBaseline};
use crate::Status;

/// The x axis of the frontier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// Training FLOPs of the trial (3 x forward FLOPs per token x tokens).
    Flops,
    /// All parameters.
    Params,
    /// Wall-clock hours of the trial times its devices.
    GpuHours,
}

impl Budget {
    pub fn describe(self) -> &'static str {
        match self {
            Budget::Flops => "training FLOPs (log scale)",
            Budget::Params => "parameters (log scale)",
            Budget::GpuHours => "GPU hours: wall-clock x devices (log scale)",
        }
    }

    /// A configuration's x: the mean over its done seeds.
    pub fn of(self, r: &Row) -> Option<f64> {
        let done: Vec<f64> = r
            .trials
            .iter()
            .filter(|t| t.row.status == Status::Done)
            .filter_map(|t| match self {
                Budget::Flops => t.row.train_flops,
                Budget::Params => t.row.n_params.map(|n| n as f64),
                Budget::GpuHours => t.row.wall_s.map(|w| w * devices(&t.factors) / 3600.0),
            })
            .collect();
        (!done.is_empty()).then(|| done.iter().sum::<f64>() / done.len() as f64)
    }
}

/// Devices a trial trained on (train.gpus_per_trial, 1 when not written).
fn devices(factors: &[(String, String)]) -> f64 {
    factors
        .iter()
        .find(|(k, _)| k == "train.gpus_per_trial")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(1.0)
}

/// The name of a configuration's family: its name without its size (`model.*`).
pub fn family(report: &Report, r: &Row) -> String {
    let (columns, values): (Vec<String>, Vec<String>) = report
        .columns
        .iter()
        .zip(&r.values)
        .filter(|(c, _)| !c.starts_with("model."))
        .map(|(c, v)| (c.clone(), v.clone()))
        .unzip();
    super::summary::short_name(&columns, &values)
}

/// One family's point: its budget and the report metric's mean and variance of the mean
/// (sample variance over n seeds, / n; `None` with one seed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub x: f64,
    pub mean: f64,
    pub var: Option<f64>,
    pub n: usize,
}

/// The family's points on `budget`, sorted by x.
pub fn points(report: &Report, name: &str, budget: Budget) -> Vec<Point> {
    let mut out: Vec<Point> = report
        .rows
        .iter()
        .filter(|r| family(report, r) == name)
        .filter_map(|r| {
            let s = r.summary(&report.metric)?;
            Some(Point {
                x: budget.of(r)?,
                mean: s.mean,
                var: s.std.map(|sd| sd * sd / s.n as f64),
                n: s.n,
            })
        })
        .collect();
    out.sort_by(|a, b| a.x.total_cmp(&b.x));
    out
}

/// `base` interpolated at `x` linearly in log x, with the variance of the interpolated mean;
/// `None` outside its range.
pub fn interpolate(base: &[Point], x: f64) -> Option<(f64, Option<f64>)> {
    let lx = x.ln();
    if let Some(p) = base.iter().find(|p| p.x == x) {
        return Some((p.mean, p.var));
    }
    let i = base.windows(2).position(|w| w[0].x < x && x < w[1].x)?;
    let (a, b) = (&base[i], &base[i + 1]);
    let w = (lx - a.x.ln()) / (b.x.ln() - a.x.ln());
    let var = match (a.var, b.var) {
        (Some(va), Some(vb)) => Some((1.0 - w) * (1.0 - w) * va + w * w * vb),
        _ => None,
    };
    Some(((1.0 - w) * a.mean + w * b.mean, var))
}

/// A family against the baseline's family at equal budget.
#[derive(Clone, Debug, PartialEq)]
pub struct AtEqualBudget {
    pub family: String,
    pub baseline: String,
    /// The mean over the family's sizes inside the baseline's budget range of (its mean
    /// minus the baseline's line there).
    pub diff: f64,
    /// 95% interval (Student t, df from the fewest seeds of a point, minus 1).
    pub ci95: Option<(f64, f64)>,
    /// How many of the family's sizes fall inside the baseline's range.
    pub sizes: usize,
}

/// A difference, its 95% interval, and the number of sizes it averages.
pub type Difference = (f64, Option<(f64, f64)>, usize);

/// `family` minus the `base` line at each of its points inside `base`'s range, averaged.
pub fn difference(family: &[Point], base: &[Point]) -> Option<Difference> {
    let mut diffs = Vec::new();
    for p in family {
        if let Some((m, v)) = interpolate(base, p.x) {
            diffs.push((p.mean - m, p.var.zip(v).map(|(a, b)| a + b), p.n));
        }
    }
    let k = diffs.len();
    if k == 0 {
        return None;
    }
    let diff = diffs.iter().map(|d| d.0).sum::<f64>() / k as f64;
    let var: Option<f64> = diffs
        .iter()
        .map(|d| d.1)
        .sum::<Option<f64>>()
        .map(|v| v / (k * k) as f64);
    let fewest = base
        .iter()
        .map(|p| p.n)
        .chain(diffs.iter().map(|d| d.2))
        .min()
        .unwrap_or(1);
    let ci = var.filter(|_| fewest > 1).map(|v| {
        let half = t_quantile_975((fewest - 1) as f64) * v.sqrt();
        (diff - half, diff + half)
    });
    Some((diff, ci, k))
}

/// Every family against the baseline's family on training FLOPs, when the report has one
/// baseline family and families of several sizes.
pub fn at_equal_compute(report: &Report) -> Vec<AtEqualBudget> {
    let baselines: Vec<String> = report
        .rows
        .iter()
        .filter(|r| r.vs_baseline == Some(VsBaseline::IsBaseline))
        .map(|r| family(report, r))
        .collect();
    let Some(base_name) = baselines
        .first()
        .filter(|b| baselines.iter().all(|o| o == *b))
    else {
        return Vec::new();
    };
    let base = points(report, base_name, Budget::Flops);
    if base.len() < 2 {
        return Vec::new();
    }
    let mut names: Vec<String> = Vec::new();
    for r in &report.rows {
        let f = family(report, r);
        if &f != base_name && !names.contains(&f) {
            names.push(f);
        }
    }
    names
        .into_iter()
        .filter_map(|name| {
            let (diff, ci95, sizes) = difference(&points(report, &name, Budget::Flops), &base)?;
            Some(AtEqualBudget {
                family: name,
                baseline: base_name.clone(),
                diff,
                ci95,
                sizes,
            })
        })
        .collect()
}
