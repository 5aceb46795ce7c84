//! What happened to a trial besides its metrics: the checkpoints it saved (step and SHA-256
//! of the tensor file, so that a checkpoint the DB never heard of is not resumed from), the
//! checksum of its final weights, and events a user should see (a checkpoint that failed
//! verification and what the trial fell back to, a checkpoint that could not be written).
//! Events are history: a new attempt at a trial keeps them.

use rusqlite::{params, OptionalExtension};

use crate::store::NOW;
use crate::{Result, Status, Store};

/// One recorded event of a trial.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    pub trial_id: String,
    /// RFC 3339 UTC.
    pub at: String,
    /// The training step it concerns, if any.
    pub step: Option<u64>,
    /// `checkpoint_rejected`, `checkpoint_unwritten`, ...
    pub kind: String,
    pub message: String,
}

impl Store {
    /// Records that the checkpoint of `step` was written with tensor file digest `sha256`.
    /// Written before the checkpoint's manifest, so a manifest never names a step the DB
    /// does not know.
    pub fn record_checkpoint(&self, trial_id: &str, step: u64, sha256: &str) -> Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO checkpoints (trial_id, step, sha256, saved_at)
                 VALUES (?1, ?2, ?3, {NOW})
                 ON CONFLICT (trial_id, step) DO UPDATE SET
                     sha256 = excluded.sha256, saved_at = excluded.saved_at"
            ),
            params![trial_id, step as i64, sha256],
        )?;
        Ok(())
    }

    /// The checkpoints recorded for the trial's current attempt: (step, sha256), by step.
    pub fn checkpoints(&self, trial_id: &str) -> Result<Vec<(u64, String)>> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT step, sha256 FROM checkpoints WHERE trial_id = ?1 ORDER BY step",
        )?;
        let rows = stmt.query_map([trial_id], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Records the SHA-256 of the trial's `final.safetensors`.
    pub fn record_weights(&self, trial_id: &str, sha256: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE trials SET weights_sha256 = ?2 WHERE id = ?1",
            params![trial_id, sha256],
        )?;
        Ok(())
    }

    /// The SHA-256 of the trial's final weights, if they were recorded.
    pub fn weights_sha256(&self, trial_id: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT weights_sha256 FROM trials WHERE id = ?1",
                [trial_id],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    /// Every trial (or the one named) with its status and final weights' SHA-256, by id.
    pub fn weights(&self, trial: Option<&str>) -> Result<Vec<(String, Status, Option<String>)>> {
        let mut stmt = self.conn().prepare(
            "SELECT id, status, weights_sha256 FROM trials WHERE ?1 IS NULL OR id = ?1
             ORDER BY id",
        )?;
        let rows = stmt.query_map([trial], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })?;
        rows.map(|row| {
            let (id, status, sha) = row?;
            Ok((id, status.parse()?, sha))
        })
        .collect()
    }

    /// Records an event of the trial.
    pub fn event(
        &self,
        trial_id: &str,
        step: Option<u64>,
        kind: &str,
        message: &str,
    ) -> Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO events (trial_id, at, step, kind, message)
                 VALUES (?1, {NOW}, ?2, ?3, ?4)"
            ),
            params![trial_id, step.map(|s| s as i64), kind, message],
        )?;
        Ok(())
    }

    /// The trial's events, oldest first.
    pub fn events(&self, trial_id: &str) -> Result<Vec<EventRow>> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT trial_id, at, step, kind, message FROM events WHERE trial_id = ?1
             ORDER BY id",
        )?;
        let rows = stmt.query_map([trial_id], |r| {
            Ok(EventRow {
                trial_id: r.get(0)?,
                at: r.get(1)?,
                step: r.get::<_, Option<i64>>(2)?.map(|s| s as u64),
                kind: r.get(3)?,
                message: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewTrial;
    use crate::ParamCount;

    fn store_with_trial(name: &str) -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("sweep-events-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.db");
        let store = Store::open(&path).unwrap();
        let sweep = store.begin_sweep("s", "s.ron", "spec", "v0").unwrap();
        let t = NewTrial {
            id: "t1",
            seed: 0,
            label: "x",
            config: "c",
        };
        store.register_trial(sweep, 0, &t).unwrap();
        (store, dir)
    }

    #[test]
    fn a_resume_forgets_the_checkpoints_of_the_lost_steps_and_keeps_the_events() {
        let (store, dir) = store_with_trial("resume");
        let count = Some(ParamCount {
            total: 10,
            embedding: 2,
        });
        store.start_trial("t1", "cpu", "v0", count).unwrap();
        for step in [10, 20, 30] {
            store
                .record_checkpoint("t1", step, &format!("{step:064x}"))
                .unwrap();
        }
        store
            .event(
                "t1",
                Some(30),
                "checkpoint_rejected",
                "checkpoint step-30 ...",
            )
            .unwrap();
        store.resume_trial("t1", 20, "cpu", "v0", count).unwrap();
        let steps: Vec<u64> = store
            .checkpoints("t1")
            .unwrap()
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(steps, vec![10, 20]);
        store.start_trial("t1", "cpu", "v0", count).unwrap();
        assert!(store.checkpoints("t1").unwrap().is_empty());
        let events = store.events("t1").unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].step, Some(30));
        assert_eq!(events[0].kind, "checkpoint_rejected");
        store.record_weights("t1", "ab").unwrap();
        assert_eq!(store.weights_sha256("t1").unwrap().as_deref(), Some("ab"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
