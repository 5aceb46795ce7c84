//! Reading a sweep's trials and the metrics the report needs out of the store.

use std::collections::BTreeMap;

use rusqlite::params_from_iter;

use super::TrialData;
use crate::{Result, Store};

/// Every trial of the sweep with its final metrics; `flatten` turns a trial's resolved
/// configuration into factors.
pub fn load(
    store: &Store,
    sweep_id: i64,
    flatten: &dyn Fn(&str) -> Vec<(String, String)>,
) -> Result<Vec<TrialData>> {
    let mut out = Vec::new();
    for row in store.trials(sweep_id)? {
        let values = |name: &str| -> Result<Vec<f64>> {
            Ok(store
                .metric(&row.id, name)?
                .into_iter()
                .filter_map(|(_, v)| v)
                .collect())
        };
        // The last evaluation counts even when it is NaN (a diverged trial has no final BPB).
        let last = |name: &str| -> Result<Option<f64>> {
            Ok(store.metric(&row.id, name)?.last().and_then(|(_, v)| *v))
        };
        let mut evals_bpb = std::collections::BTreeMap::new();
        for name in store.metric_names(&row.id, "eval/")? {
            let set = name
                .strip_prefix("eval/")
                .and_then(|n| n.strip_suffix("/bpb"));
            if let (Some(set), Some(v)) = (set, last(&name)?) {
                evals_bpb.insert(set.to_string(), v);
            }
        }
        let mut finals = BTreeMap::new();
        let names = [
            store.metric_names(&row.id, "eval/")?,
            store.metric_names(&row.id, "bench/")?,
        ];
        for name in names.into_iter().flatten().chain([
            "val/bpb".into(),
            "val/loss".into(),
            "train/spikes".into(),
        ]) {
            if super::comparable(&name) {
                if let Some(v) = last(&name)? {
                    finals.insert(name, v);
                }
            }
        }
        let mut tps = values("tokens_per_s")?;
        tps.sort_by(f64::total_cmp);
        out.push(TrialData {
            factors: flatten(&row.config),
            final_bpb: last("val/bpb")?,
            best_val_loss: values("val/loss")?.into_iter().reduce(f64::min),
            amax_fwd: last("amax/fwd")?,
            amax_bwd: last("amax/bwd")?,
            tokens_per_s: (!tps.is_empty()).then(|| tps[tps.len() / 2]),
            events: store.events(&row.id)?,
            evals_bpb,
            finals,
            row,
        });
    }
    Ok(out)
}

/// Metric curves of one trial, for plots.
#[derive(Clone, Debug, Default)]
pub struct Curves {
    /// (step, value) of each named metric, NaN steps left out.
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
}

impl Curves {
    /// The curves of `names` (exact names) and of every metric whose name starts with one of
    /// `prefixes`; only those rows are read.
    pub fn read(store: &Store, trial_id: &str, names: &[&str], prefixes: &[&str]) -> Result<Self> {
        let wanted: Vec<String> = names
            .iter()
            .map(|_| "name = ?".to_string())
            .chain(
                prefixes
                    .iter()
                    .map(|_| "substr(name, 1, length(?)) = ?".into()),
            )
            .collect();
        if wanted.is_empty() {
            return Ok(Self::default());
        }
        let sql = format!(
            "SELECT name, step, value FROM metrics
             WHERE trial_id = ? AND value IS NOT NULL AND ({})
             ORDER BY name, step",
            wanted.join(" OR ")
        );
        let mut args: Vec<&str> = vec![trial_id];
        args.extend(names);
        for p in prefixes {
            args.extend([p, p]);
        }
        let mut stmt = store.conn().prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, f64>(2)?,
            ))
        })?;
        let mut series: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
        for row in rows {
            let (name, step, value) = row?;
            series.entry(name).or_default().push((step as u64, value));
        }
        Ok(Self { series })
    }

    pub fn get(&self, name: &str) -> &[(u64, f64)] {
        self.series.get(name).map_or(&[], Vec::as_slice)
    }
}
