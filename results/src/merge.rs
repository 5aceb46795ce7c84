//! `sweep merge`: shard DBs (one per Slurm array task, or per machine) into one.
//!
//! A trial id is a trial: when two inputs hold the same trial, the record that got furthest
//! wins (done, then diverged, failed, running, queued), and its metrics come with it, never
//! mixed with another attempt's. Sweeps with one name are one sweep: the union of their
//! trials. Merging the same inputs again changes nothing.

use std::path::Path;

use rusqlite::{params, OptionalExtension};

use crate::{Error, Result, Status, Store, SCHEMA_VERSION};

/// What one input brought.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Trials new to the output.
    pub added: usize,
    /// Trials whose record in the output was replaced by one that got further.
    pub replaced: usize,
    /// Trials the output already held as far or further.
    pub kept: usize,
    pub metrics: usize,
    /// The ids of the added and replaced trials (whose checkpoints go with them).
    pub taken: Vec<String>,
}

/// How far a trial got; the further record wins a merge.
fn rank(s: Status) -> u8 {
    match s {
        Status::Done => 5,
        Status::Diverged => 4,
        Status::Failed => 3,
        Status::Running => 2,
        Status::Queued => 1,
    }
}

/// Refuses an input that is not a results DB of this schema version, without changing it.
pub fn check_input(path: &Path) -> Result<()> {
    let shown = path.display().to_string();
    if !path.is_file() {
        return Err(Error::Missing { path: shown });
    }
    let version = crate::store::stored_version(path)?;
    match version {
        Some(v) if v == SCHEMA_VERSION.to_string() => Ok(()),
        Some(v) => Err(Error::Input(format!(
            "{shown} has results schema version {v}, this build merges version \
             {SCHEMA_VERSION} only; open it once with this build's `sweep report --db {shown}` \
             to migrate an older one, or merge with the sweep build that wrote it"
        ))),
        None => Err(Error::NotResults { path: shown }),
    }
}

impl Store {
    /// Merges the results DB at `input` into this one, in one transaction.
    pub fn merge_from(&self, input: &Path) -> Result<Merged> {
        check_input(input)?;
        let conn = self.conn();
        conn.execute("ATTACH DATABASE ?1 AS src", [input.display().to_string()])?;
        let result = self.merge_attached();
        let _ = conn.execute("DETACH DATABASE src", []);
        result
    }

    fn merge_attached(&self) -> Result<Merged> {
        let tx = self.write_tx()?;
        // Sweeps by name; the latest run's file and spec describe the merged sweep.
        tx.execute_batch(
            "INSERT INTO main.sweeps (name, file, spec, code_version, created_at, updated_at,
                                      generation)
             SELECT name, file, spec, code_version, created_at, updated_at, generation
             FROM src.sweeps WHERE true
             ON CONFLICT (name) DO UPDATE SET
               file = CASE WHEN excluded.updated_at > updated_at THEN excluded.file ELSE file END,
               spec = CASE WHEN excluded.updated_at > updated_at THEN excluded.spec ELSE spec END,
               code_version = CASE WHEN excluded.updated_at > updated_at
                                   THEN excluded.code_version ELSE code_version END,
               created_at = min(created_at, excluded.created_at),
               updated_at = max(updated_at, excluded.updated_at),
               generation = max(generation, excluded.generation);",
        )?;
        let sweep_of = |src_sweep: i64| -> rusqlite::Result<i64> {
            tx.query_row(
                "SELECT m.id FROM main.sweeps m JOIN src.sweeps s ON s.name = m.name
                 WHERE s.id = ?1",
                [src_sweep],
                |r| r.get(0),
            )
        };

        let incoming: Vec<(String, i64, String)> = {
            let mut stmt = tx.prepare("SELECT id, sweep_id, status FROM src.trials")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut m = Merged::default();
        for (id, src_sweep, status) in incoming {
            let theirs: Status = status.parse()?;
            let ours: Option<String> = tx
                .query_row("SELECT status FROM main.trials WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })
                .optional()?;
            let take = match &ours {
                None => true,
                Some(s) => rank(theirs) > rank(s.parse()?),
            };
            if !take {
                m.kept += 1;
                continue;
            }
            // The row is updated in place (other sweeps may link to it), its metrics replaced.
            tx.execute(
                "INSERT INTO main.trials (id, sweep_id, seed, label, config, status, error,
                     device, code_version, n_params, n_params_embedding, created_at,
                     started_at, finished_at, wall_s, owner, heartbeat_at, weights_sha256)
                 SELECT id, ?2, seed, label, config, status, error, device, code_version,
                     n_params, n_params_embedding, created_at, started_at, finished_at,
                     wall_s, owner, heartbeat_at, weights_sha256
                 FROM src.trials WHERE id = ?1
                 ON CONFLICT (id) DO UPDATE SET
                     status = excluded.status, error = excluded.error,
                     device = excluded.device, code_version = excluded.code_version,
                     n_params = excluded.n_params,
                     n_params_embedding = excluded.n_params_embedding,
                     started_at = excluded.started_at, finished_at = excluded.finished_at,
                     wall_s = excluded.wall_s, owner = excluded.owner,
                     heartbeat_at = excluded.heartbeat_at,
                     weights_sha256 = excluded.weights_sha256",
                params![id, sweep_of(src_sweep)?],
            )?;
            if ours.is_some() {
                for table in ["metrics", "checkpoints", "events"] {
                    tx.execute(
                        &format!("DELETE FROM main.{table} WHERE trial_id = ?1"),
                        [&id],
                    )?;
                }
                m.replaced += 1;
            } else {
                m.added += 1;
            }
            m.taken.push(id.clone());
            m.metrics += tx.execute(
                "INSERT INTO main.metrics (trial_id, step, name, value)
                 SELECT trial_id, step, name, value FROM src.metrics WHERE trial_id = ?1",
                [&id],
            )?;
            // Its checkpoint records and events travel with it (its checkpoint folder does too).
            tx.execute(
                "INSERT INTO main.checkpoints (trial_id, step, sha256, saved_at)
                 SELECT trial_id, step, sha256, saved_at FROM src.checkpoints WHERE trial_id = ?1",
                [&id],
            )?;
            tx.execute(
                "INSERT INTO main.events (trial_id, at, step, kind, message)
                 SELECT trial_id, at, step, kind, message FROM src.events WHERE trial_id = ?1
                 ORDER BY id",
                [&id],
            )?;
        }
        // Every sweep's trials, wherever they were run.
        tx.execute_batch(
            "INSERT INTO main.sweep_trials (sweep_id, trial_id, position)
             SELECT m.id, st.trial_id, st.position
             FROM src.sweep_trials st
             JOIN src.sweeps s ON s.id = st.sweep_id
             JOIN main.sweeps m ON m.name = s.name
             WHERE true
             ON CONFLICT (sweep_id, trial_id) DO NOTHING;",
        )?;
        tx.commit()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NewTrial;

    fn db(dir: &Path, name: &str, trials: &[(&str, Status, &[f64])]) -> std::path::PathBuf {
        let path = dir.join(name);
        let mut s = Store::open(&path).unwrap();
        let sweep = s.begin_sweep("res", "res.ron", name, "test").unwrap();
        for (i, (id, status, values)) in trials.iter().enumerate() {
            let t = NewTrial {
                id,
                seed: 0,
                label: "",
                config: "",
            };
            s.register_trial(sweep, i, &t).unwrap();
            if *status == Status::Queued {
                continue;
            }
            s.start_trial(id, name, "test", None).unwrap();
            for (k, v) in values.iter().enumerate() {
                s.record(id, k as u64 + 1, "val/bpb", *v).unwrap();
            }
            if *status == Status::Running {
                s.flush().unwrap();
            } else {
                s.finish_trial(id, *status, None, 1.0).unwrap();
            }
        }
        path
    }

    /// (id, status, device (which input it came from), values) of every trial.
    fn dump(s: &Store) -> Vec<(String, String, String, Vec<f64>)> {
        let mut stmt = s
            .conn()
            .prepare("SELECT id, status, coalesce(device, '') FROM trials ORDER BY id")
            .unwrap();
        let rows: Vec<(String, String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        rows.into_iter()
            .map(|(id, st, dev)| {
                let v = s
                    .metric(&id, "val/bpb")
                    .unwrap()
                    .into_iter()
                    .filter_map(|(_, v)| v)
                    .collect();
                (id, st, dev, v)
            })
            .collect()
    }

    #[test]
    fn the_record_that_got_furthest_wins_with_its_own_metrics() {
        let dir = std::env::temp_dir().join(format!("sweep-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // t1: done in a, failed in b. t2: running (2 of 3 values) in a, done in b. t3: only
        // queued in b. t4: diverged in a, running in b.
        let a = db(
            &dir,
            "a.db",
            &[
                ("t1", Status::Done, &[3.0, 2.5]),
                ("t2", Status::Running, &[3.1, 2.9]),
                ("t4", Status::Diverged, &[3.3]),
            ],
        );
        let b = db(
            &dir,
            "b.db",
            &[
                ("t1", Status::Failed, &[3.0]),
                ("t2", Status::Done, &[3.1, 2.9, 2.7]),
                ("t3", Status::Queued, &[]),
                ("t4", Status::Running, &[3.3, 3.2]),
            ],
        );
        let expected = vec![
            (
                "t1".to_string(),
                "done".to_string(),
                "a.db".to_string(),
                vec![3.0, 2.5],
            ),
            (
                "t2".into(),
                "done".into(),
                "b.db".into(),
                vec![3.1, 2.9, 2.7],
            ),
            ("t3".into(), "queued".into(), "".into(), vec![]),
            ("t4".into(), "diverged".into(), "a.db".into(), vec![3.3]),
        ];
        for (name, order) in [("ab.db", [&a, &b]), ("ba.db", [&b, &a])] {
            let out = Store::open(&dir.join(name)).unwrap();
            for input in order {
                out.merge_from(input).unwrap();
            }
            assert_eq!(dump(&out), expected, "{name}");
            let sweeps: i64 = out
                .conn()
                .query_row("SELECT COUNT(*) FROM sweeps", [], |r| r.get(0))
                .unwrap();
            assert_eq!(sweeps, 1);
            assert_eq!(out.trials(1).unwrap().len(), 4);
            // Again: nothing changes.
            for input in order {
                let m = out.merge_from(input).unwrap();
                assert_eq!((m.added, m.replaced, m.metrics), (0, 0, 0));
            }
            assert_eq!(dump(&out), expected, "{name} twice");
        }
    }
}
