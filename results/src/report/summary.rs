//! Seeds collapsed into configurations: polars partitions the trials by their configuration
//! and aggregates each group; the columns that vary are found; rows sorted by val/bpb.

use polars::prelude::*;

use super::baseline::Selector;
use super::stats::Summary;
use super::{Counts, Report, Row, TrialData};
use crate::{Error, Result, Status};

/// The report of `trials` (one sweep's), sorted by `metric` (best first; `val/bpb` when
/// `None`) and compared with `baseline` on it if given.
pub fn summarize(
    sweep: &str,
    trials: Vec<TrialData>,
    baseline: Option<&Selector>,
    metric: Option<&str>,
) -> Result<Report> {
    // One key per configuration: every factor, the seed excluded.
    let keys: Vec<String> = trials
        .iter()
        .map(|t| {
            t.factors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let col = |f: fn(&TrialData) -> Option<f64>| trials.iter().map(f).collect::<Vec<_>>();
    let frame = df!(
        "config" => &keys,
        "trial" => (0..trials.len() as u32).collect::<Vec<_>>(),
        "status" => trials.iter().map(|t| t.row.status.as_str()).collect::<Vec<_>>(),
        "bpb" => col(|t| t.final_bpb),
        "best_val_loss" => col(|t| t.best_val_loss),
        "amax_fwd" => col(|t| t.amax_fwd),
        "amax_bwd" => col(|t| t.amax_bwd),
        "tokens_per_s" => col(|t| t.tokens_per_s),
        "n_params" => trials.iter().map(|t| t.row.n_params).collect::<Vec<_>>(),
    )
    .map_err(polars_err)?;

    let mut rows = Vec::new();
    for group in frame
        .partition_by_stable(["config"], true)
        .map_err(polars_err)?
    {
        rows.push(aggregate(&group, &trials).map_err(polars_err)?);
    }

    let columns = varying(&rows);
    for row in &mut rows {
        row.values = columns
            .iter()
            .map(|c| row.factor(c).unwrap_or("-").to_string())
            .collect();
        row.name = short_name(&columns, &row.values);
    }
    let metric = metric.unwrap_or("val/bpb").to_string();
    let known: std::collections::BTreeSet<&String> =
        rows.iter().flat_map(|r| r.metrics.keys()).collect();
    if metric != "val/bpb" && !known.contains(&metric) {
        let mut names: Vec<&str> = known.iter().map(|s| s.as_str()).collect();
        names.push("val/bpb");
        names.sort();
        names.dedup();
        return Err(Error::Input(format!(
            "--metric {metric}: no trial of sweep {sweep} recorded it; its metrics: {}",
            names.join(", ")
        )));
    }
    // Best first; configurations without a finished seed last, in sweep order.
    let higher = super::higher_is_better(&metric);
    rows.sort_by(|a, b| match (a.summary(&metric), b.summary(&metric)) {
        (Some(x), Some(y)) if higher => y.mean.total_cmp(&x.mean),
        (Some(x), Some(y)) => x.mean.total_cmp(&y.mean),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    if let Some(sel) = baseline {
        sel.compare(&columns, &mut rows, &metric)?;
    }
    Ok(Report {
        sweep: sweep.to_string(),
        columns,
        rows,
        baseline: baseline.map(|s| s.text.clone()),
        metric,
        chance: Default::default(),
    })
}

fn polars_err(e: PolarsError) -> Error {
    Error::Report(format!("aggregating the trials: {e}"))
}

/// One configuration's statistics from its group of trials. Statistics of the outcome use
/// the done seeds only: a running seed's BPB is not final, a diverged one has none.
fn aggregate(group: &DataFrame, trials: &[TrialData]) -> PolarsResult<Row> {
    let members: Vec<&TrialData> = group
        .column("trial")?
        .u32()?
        .into_no_null_iter()
        .map(|i| &trials[i as usize])
        .collect();
    let mut counts = Counts::default();
    for t in &members {
        counts.events += t.events.len();
        match t.row.status {
            Status::Done => counts.done += 1,
            Status::Diverged => counts.diverged += 1,
            Status::Failed => counts.failed += 1,
            Status::Running => counts.running += 1,
            Status::Queued => counts.queued += 1,
        }
    }
    let done = group.filter(&group.column("status")?.str()?.equal("done"))?;
    let bpb = done.column("bpb")?.f64()?.drop_nulls();
    let mean = |frame: &DataFrame, name: &str| -> PolarsResult<Option<f64>> {
        Ok(frame.column(name)?.f64()?.mean())
    };
    // Every comparable final metric over the done seeds that have it.
    let mut metrics = std::collections::BTreeMap::new();
    let names: std::collections::BTreeSet<&String> =
        members.iter().flat_map(|t| t.finals.keys()).collect();
    for name in names {
        let v: Vec<f64> = members
            .iter()
            .filter(|t| t.row.status == Status::Done)
            .filter_map(|t| t.finals.get(name).copied())
            .collect();
        if let Some(s) = Summary::of(&v) {
            metrics.insert(name.clone(), s);
        }
    }
    let bpb_seeds = members
        .iter()
        .filter(|t| t.row.status == Status::Done)
        .filter_map(|t| t.final_bpb.map(|b| (t.row.seed, b)))
        .collect();
    Ok(Row {
        values: Vec::new(),
        factors: members[0].factors.clone(),
        name: String::new(),
        counts,
        bpb: Summary::from_moments(bpb.len(), bpb.mean(), bpb.std(1)),
        bpb_seeds,
        metrics,
        best_val_loss: mean(&done, "best_val_loss")?,
        amax_fwd: mean(&done, "amax_fwd")?,
        amax_bwd: mean(&done, "amax_bwd")?,
        // Throughput and size are known for unfinished seeds too.
        tokens_per_s: mean(group, "tokens_per_s")?,
        n_params: group.column("n_params")?.i64()?.max(),
        vs_baseline: None,
        trials: members.into_iter().cloned().collect(),
    })
}

/// The factor keys worth a column, in the order the configuration lists them: a key varies when two configurations that agree on its
/// parent (`residual` for `residual.streams`) disagree on it. So a residual's parameters get
/// a column only when they differ among the configurations of one residual kind, as the
/// trial labels of a sweep do, and `train.steps` (no parent value) whenever it differs.
fn varying(rows: &[Row]) -> Vec<String> {
    // Each configuration's keys in its order; a key first seen in a later one goes right
    // after the key that precedes it there (`residual.dynamic` after `residual`).
    let mut keys: Vec<&str> = Vec::new();
    for r in rows {
        let mut at = 0;
        for (k, _) in &r.factors {
            match keys.iter().position(|have| have == k) {
                Some(i) => at = i + 1,
                None => {
                    keys.insert(at, k);
                    at += 1;
                }
            }
        }
    }
    keys.into_iter()
        .filter(|k| {
            let parent = k.rsplit_once('.').map(|(p, _)| p);
            rows.iter().enumerate().any(|(i, a)| {
                rows[i + 1..].iter().any(|b| {
                    parent.is_none_or(|p| a.factor(p) == b.factor(p)) && a.factor(k) != b.factor(k)
                })
            })
        })
        .map(String::from)
        .collect()
}

/// `Hc dynamic=true`: slot values as they are, parameters as `param=value`.
pub(crate) fn short_name(columns: &[String], values: &[String]) -> String {
    let parts: Vec<String> = columns
        .iter()
        .zip(values)
        .filter(|(_, v)| v.as_str() != "-")
        .map(|(c, v)| match c.split_once('.') {
            None => v.clone(),
            Some((_, param)) => format!("{param}={v}"),
        })
        .collect();
    if parts.is_empty() {
        "all trials".into()
    } else {
        parts.join(" ")
    }
}
