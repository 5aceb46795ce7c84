//! The SQLite schema, writes and the queries the runner needs.

use std::path::Path;
use std::time::Duration;

use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};

use crate::{Error, Result, Status};

/// Bumped whenever a table changes shape. An older DB is migrated in place when opened (see
/// [`MIGRATIONS`]); a newer one is refused.
pub const SCHEMA_VERSION: u32 = 5;

/// The statements that take a DB from version i + 1 to i + 2, in order.
const MIGRATIONS: &[&str] = &[
    // 1 -> 2: the parameter count split into embedding and the rest.
    "ALTER TABLE trials ADD COLUMN n_params_embedding INTEGER;",
    // 2 -> 3: which process runs a trial, so that two runners never run one trial; sweep
    // generations for `--fresh`.
    "ALTER TABLE trials ADD COLUMN owner TEXT;
     ALTER TABLE trials ADD COLUMN heartbeat_at TEXT;
     ALTER TABLE sweeps ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;",
    // 3 -> 4: the final weights' checksum (the checkpoints and events tables are new, and
    // made by SCHEMA itself).
    "ALTER TABLE trials ADD COLUMN weights_sha256 TEXT;",
    // 4 -> 5: the trial's compute (training FLOPs per token, tokens, training FLOPs).
    "ALTER TABLE trials ADD COLUMN flops_per_token REAL;
     ALTER TABLE trials ADD COLUMN tokens INTEGER;
     ALTER TABLE trials ADD COLUMN train_flops REAL;",
];

/// Metric rows are buffered and written in one transaction once this many are pending.
const FLUSH_ROWS: usize = 512;

pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sweeps (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    file         TEXT NOT NULL,
    spec         TEXT NOT NULL,
    code_version TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    generation   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS trials (
    id           TEXT PRIMARY KEY,
    sweep_id     INTEGER NOT NULL REFERENCES sweeps(id),
    seed         INTEGER NOT NULL,
    label        TEXT NOT NULL,
    config       TEXT NOT NULL,
    status       TEXT NOT NULL
                 CHECK (status IN ('queued', 'running', 'done', 'diverged', 'failed')),
    error        TEXT,
    device       TEXT,
    code_version TEXT,
    n_params     INTEGER,
    n_params_embedding INTEGER,
    created_at   TEXT NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    wall_s       REAL,
    owner        TEXT,
    heartbeat_at TEXT,
    weights_sha256 TEXT,
    flops_per_token REAL,
    tokens       INTEGER,
    train_flops  REAL
);
CREATE TABLE IF NOT EXISTS sweep_trials (
    sweep_id INTEGER NOT NULL REFERENCES sweeps(id),
    trial_id TEXT NOT NULL REFERENCES trials(id),
    position INTEGER NOT NULL,
    PRIMARY KEY (sweep_id, trial_id)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    trial_id TEXT NOT NULL REFERENCES trials(id),
    step     INTEGER NOT NULL,
    sha256   TEXT NOT NULL,
    saved_at TEXT NOT NULL,
    PRIMARY KEY (trial_id, step)
);
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY,
    trial_id TEXT NOT NULL REFERENCES trials(id),
    at       TEXT NOT NULL,
    step     INTEGER,
    kind     TEXT NOT NULL,
    message  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    trial_id TEXT NOT NULL REFERENCES trials(id),
    step     INTEGER NOT NULL,
    name     TEXT NOT NULL,
    value    REAL,
    PRIMARY KEY (trial_id, name, step)
) WITHOUT ROWID;
"#;

/// SQLite's clock, as RFC 3339 UTC with milliseconds.
pub(crate) const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// What [`Store::claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The trial is now this process's; it was in this state.
    Claimed(Status),
    /// Finished (or failed, without a retry): nothing to do.
    Skipped(Status),
    /// Running under this live owner.
    Busy(String),
}

/// A trial as the runner registers it.
#[derive(Clone, Debug)]
pub struct NewTrial<'a> {
    pub id: &'a str,
    pub seed: u64,
    pub label: &'a str,
    pub config: &'a str,
}

/// A trial as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialRow {
    pub id: String,
    pub sweep_id: i64,
    pub seed: u64,
    pub label: String,
    pub config: String,
    pub status: Status,
    pub error: Option<String>,
    pub device: Option<String>,
    pub n_params: Option<i64>,
    /// Of `n_params`, those of the token embedding (tied with the output head).
    pub n_params_embedding: Option<i64>,
    pub wall_s: Option<f64>,
    /// Training FLOPs per token and in all, as the trial recorded them (schema 5).
    pub flops_per_token: Option<f64>,
    pub train_flops: Option<f64>,
    /// The tokens it trains on (schema 5).
    pub tokens: Option<i64>,
}

/// A model's parameter count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCount {
    pub total: u64,
    /// Of `total`, those of the token embedding (tied with the output head).
    pub embedding: u64,
}

/// One metric value; `None` stands for NaN (SQLite stores NaN as NULL).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricRow {
    pub step: u64,
    pub name: String,
    pub value: Option<f64>,
}

pub struct Store {
    conn: Connection,
    pending: Vec<(String, u64, String, f64)>,
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, OpenFlags::default())
    }

    /// Opens a store that must already exist, for reading while a sweep may be writing it
    /// (WAL: readers and the one writer do not block each other). Nothing is created.
    pub fn open_existing(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(Error::Missing { path: shown });
        }
        if stored_version(path)?.is_none() {
            return Err(Error::NotResults { path: shown });
        }
        // Read-write without CREATE, so that an older schema is migrated like any opening.
        Self::open_with(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<Self> {
        let shown = path.display().to_string();
        let open_err = |source| Error::Open {
            path: shown.clone(),
            source,
        };
        let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(open_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Switching needs the file alone for a moment, and SQLite does not wait for
            // that through the busy handler: two processes creating one DB retry here.
            let started = std::time::Instant::now();
            while let Err(e) = conn.pragma_update(None, "journal_mode", "WAL") {
                if !is_busy(&e) || started.elapsed() > Duration::from_secs(30) {
                    return Err(open_err(e));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        // A DB of this version needs no write to open, so a reader (`sweep report`) never
        // waits for a running sweep's transaction.
        if schema_version(&conn)?.as_deref() != Some(SCHEMA_VERSION.to_string().as_str()) {
            init(&conn, &shown)?;
        }
        Ok(Self {
            conn,
            pending: Vec::new(),
        })
    }

    /// The most recently run sweep record (named `name`, and holding trial `trial`, where
    /// given): its name, file path and file text as run, and its generation.
    pub fn recorded_sweep(
        &self,
        name: Option<&str>,
        trial: Option<&str>,
    ) -> Result<Option<(String, String, String, u32)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT s.name, s.file, s.spec, s.generation FROM sweeps s
                 WHERE (?1 IS NULL OR s.name = ?1)
                   AND (?2 IS NULL OR EXISTS (SELECT 1 FROM sweep_trials st
                                              WHERE st.sweep_id = s.id AND st.trial_id = ?2))
                 ORDER BY s.updated_at DESC, s.id DESC LIMIT 1",
                params![name, trial],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?)
    }

    /// The sweep record named `name`, created or updated with the spec as run now.
    pub fn begin_sweep(
        &self,
        name: &str,
        file: &str,
        spec: &str,
        code_version: &str,
    ) -> Result<i64> {
        self.conn.execute(
            &format!(
                "INSERT INTO sweeps (name, file, spec, code_version, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, {NOW}, {NOW})
                 ON CONFLICT (name) DO UPDATE SET
                   file = excluded.file, spec = excluded.spec,
                   code_version = excluded.code_version, updated_at = excluded.updated_at"
            ),
            params![name, file, spec, code_version],
        )?;
        Ok(self
            .conn
            .query_row("SELECT id FROM sweeps WHERE name = ?1", [name], |r| {
                r.get(0)
            })?)
    }

    /// The id of the sweep record named `name`, if there is one.
    pub fn sweep_id(&self, name: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row("SELECT id FROM sweeps WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// The generation of the sweep record named `name`, if there is one.
    pub fn sweep_generation(&self, name: &str) -> Result<Option<u32>> {
        Ok(self
            .conn
            .query_row(
                "SELECT generation FROM sweeps WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// A trial's current status.
    pub fn status(&self, id: &str) -> Result<Status> {
        let s: String =
            self.conn
                .query_row("SELECT status FROM trials WHERE id = ?1", [id], |r| {
                    r.get(0)
                })?;
        s.parse()
    }

    /// The generation of the sweep record (0 for the first; `--fresh` starts the next).
    pub fn generation(&self, sweep_id: i64) -> Result<u32> {
        Ok(self.conn.query_row(
            "SELECT generation FROM sweeps WHERE id = ?1",
            [sweep_id],
            |r| r.get(0),
        )?)
    }

    /// Moves the sweep record `name` aside as `name@<generation>` (its trials and metrics stay
    /// with it) and returns the generation the next record of that name gets; 0 when there is
    /// none.
    pub fn archive_sweep(&self, name: &str) -> Result<u32> {
        let tx = self.write_tx()?;
        let found: Option<(i64, u32)> = tx
            .query_row(
                "SELECT id, generation FROM sweeps WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let next = match found {
            None => 0,
            Some((id, generation)) => {
                tx.execute(
                    "UPDATE sweeps SET name = ?2 WHERE id = ?1",
                    params![id, format!("{name}@{generation}")],
                )?;
                tx.execute(
                    &format!(
                        "INSERT INTO sweeps (name, file, spec, code_version, created_at,
                                             updated_at, generation)
                         SELECT ?1, file, spec, code_version, {NOW}, {NOW}, ?2
                         FROM sweeps WHERE id = ?3"
                    ),
                    params![name, generation + 1, id],
                )?;
                generation + 1
            }
        };
        tx.commit()?;
        Ok(next)
    }

    /// Makes `ids` the sweep's trials among those `in_scope` (a shard's, or all): a trial of
    /// an earlier version of the sweep file that is no longer in it stays in the DB but leaves
    /// the sweep (and its report).
    pub fn keep_only(
        &self,
        sweep_id: i64,
        ids: &[&str],
        in_scope: &dyn Fn(&str) -> bool,
    ) -> Result<usize> {
        let tx = self.write_tx()?;
        let linked: Vec<String> = {
            let mut stmt = tx.prepare("SELECT trial_id FROM sweep_trials WHERE sweep_id = ?1")?;
            let rows = stmt.query_map([sweep_id], |r| r.get(0))?;
            rows.collect::<std::result::Result<_, _>>()?
        };
        let mut removed = 0;
        for id in linked
            .iter()
            .filter(|l| in_scope(l) && !ids.contains(&l.as_str()))
        {
            removed += tx.execute(
                "DELETE FROM sweep_trials WHERE sweep_id = ?1 AND trial_id = ?2",
                params![sweep_id, id],
            )?;
        }
        tx.commit()?;
        Ok(removed)
    }

    /// Takes trial `id` for process `owner` if it is free: queued, failed (with
    /// `retry_failed`), or running under an owner that `dead` says has died (given the owner
    /// and the age of its last heartbeat in seconds). The check and the
    /// take are one write transaction, so two processes never take the same trial.
    pub fn claim(
        &self,
        id: &str,
        owner: &str,
        retry_failed: bool,
        dead: &dyn Fn(&str, Option<f64>) -> bool,
    ) -> Result<Claim> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = (|| -> Result<Claim> {
            let (status, current, heartbeat): (String, Option<String>, Option<f64>) =
                self.conn.query_row(
                    "SELECT status, owner,
                            (julianday('now') - julianday(heartbeat_at)) * 86400.0
                     FROM trials WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
            let status: Status = status.parse()?;
            let free = match status {
                Status::Queued => true,
                Status::Failed => retry_failed,
                Status::Running => current.as_deref().is_none_or(|o| dead(o, heartbeat)),
                Status::Done | Status::Diverged => false,
            };
            if !free {
                return Ok(match (status, current) {
                    (Status::Running, Some(o)) => Claim::Busy(o),
                    _ => Claim::Skipped(status),
                });
            }
            self.conn.execute(
                &format!(
                    "UPDATE trials SET status = 'running', owner = ?2, heartbeat_at = {NOW}
                     WHERE id = ?1"
                ),
                params![id, owner],
            )?;
            Ok(Claim::Claimed(status))
        })();
        match &result {
            Ok(_) => self.conn.execute_batch("COMMIT")?,
            Err(_) => {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        }
        result
    }

    /// Notes that the owner of a running trial is alive.
    pub fn heartbeat(&self, id: &str) -> Result<()> {
        self.conn.execute(
            &format!("UPDATE trials SET heartbeat_at = {NOW} WHERE id = ?1"),
            [id],
        )?;
        Ok(())
    }

    /// Gives an unfinished trial back (an interrupted run): queued again, its checkpoint and
    /// the metrics up to it kept for whoever takes it next.
    pub fn release(&mut self, id: &str) -> Result<()> {
        self.flush()?;
        self.conn.execute(
            "UPDATE trials SET status = 'queued', owner = NULL WHERE id = ?1 AND status = 'running'",
            [id],
        )?;
        Ok(())
    }

    /// Adds a trial to a sweep (as `queued` if it is new) and returns its current status.
    pub fn register_trial(&self, sweep_id: i64, position: usize, t: &NewTrial) -> Result<Status> {
        let tx = self.write_tx()?;
        tx.execute(
            &format!(
                "INSERT INTO trials (id, sweep_id, seed, label, config, status, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'queued', {NOW})
                 ON CONFLICT (id) DO NOTHING"
            ),
            params![t.id, sweep_id, t.seed as i64, t.label, t.config],
        )?;
        tx.execute(
            "INSERT INTO sweep_trials (sweep_id, trial_id, position) VALUES (?1, ?2, ?3)
             ON CONFLICT (sweep_id, trial_id) DO UPDATE SET position = excluded.position",
            params![sweep_id, t.id, position as i64],
        )?;
        let status: String =
            tx.query_row("SELECT status FROM trials WHERE id = ?1", [t.id], |r| {
                r.get(0)
            })?;
        tx.commit()?;
        status.parse()
    }

    /// Marks a trial running and clears metrics left by an earlier, unfinished attempt, so
    /// that no metric of this attempt is mixed with an older one.
    /// `params` is `None` when the model could not be built.
    pub fn start_trial(
        &self,
        id: &str,
        device: &str,
        code_version: &str,
        params: Option<ParamCount>,
    ) -> Result<()> {
        self.attempt(id, None, device, code_version, params)
    }

    /// Records a trial's compute: training FLOPs per token (forward and backward), the
    /// tokens it trains on, and their product.
    pub fn set_compute(
        &self,
        id: &str,
        flops_per_token: f64,
        tokens: u64,
        train_flops: f64,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE trials SET flops_per_token = ?2, tokens = ?3, train_flops = ?4 WHERE id = ?1",
            params![id, flops_per_token, tokens as i64, train_flops],
        )?;
        Ok(())
    }

    /// Marks a trial running again from a checkpoint after `step`: the metrics it recorded
    /// up to that step stay, later ones (from the attempt that died) go.
    pub fn resume_trial(
        &self,
        id: &str,
        step: u64,
        device: &str,
        code_version: &str,
        params: Option<ParamCount>,
    ) -> Result<()> {
        self.attempt(id, Some(step), device, code_version, params)
    }

    /// A new attempt at a trial that keeps the metrics through step `keep` (none: none).
    fn attempt(
        &self,
        id: &str,
        keep: Option<u64>,
        device: &str,
        code_version: &str,
        params: Option<ParamCount>,
    ) -> Result<()> {
        let tx = self.write_tx()?;
        // The lost steps' metrics go, and so do the records of checkpoints taken in them.
        for table in ["metrics", "checkpoints"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE trial_id = ?1 AND step > ?2"),
                params![id, keep.map_or(-1, |s| s as i64)],
            )?;
        }
        // A resumed trial started when its first attempt did.
        let started = if keep.is_some() {
            format!("coalesce(started_at, {NOW})")
        } else {
            NOW.to_string()
        };
        tx.execute(
            &format!(
                "UPDATE trials SET status = 'running', error = NULL, device = ?2,
                   code_version = ?3, n_params = ?4, n_params_embedding = ?5,
                   started_at = {started}, finished_at = NULL, wall_s = NULL
                 WHERE id = ?1"
            ),
            params![
                id,
                device,
                code_version,
                params.map(|p| p.total as i64),
                params.map(|p| p.embedding as i64)
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Buffers one metric value; written at the next flush.
    pub fn record(&mut self, trial_id: &str, step: u64, name: &str, value: f64) -> Result<()> {
        self.pending
            .push((trial_id.to_string(), step, name.to_string(), value));
        if self.pending.len() >= FLUSH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes every buffered metric in one transaction.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let tx = self.write_tx()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO metrics (trial_id, step, name, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (trial_id, name, step) DO UPDATE SET value = excluded.value",
            )?;
            for (trial, step, name, value) in &self.pending {
                stmt.execute(params![trial, *step as i64, name, value])?;
            }
        }
        tx.commit()?;
        self.pending.clear();
        Ok(())
    }

    /// Flushes the trial's metrics and records how it ended.
    pub fn finish_trial(
        &mut self,
        id: &str,
        status: Status,
        error: Option<&str>,
        wall_s: f64,
    ) -> Result<()> {
        self.flush()?;
        self.conn.execute(
            &format!(
                "UPDATE trials SET status = ?2, error = ?3, finished_at = {NOW}, wall_s = ?4,
                   owner = NULL
                 WHERE id = ?1"
            ),
            params![id, status.as_str(), error, wall_s],
        )?;
        Ok(())
    }

    /// The trials of a sweep in expansion order.
    pub fn trials(&self, sweep_id: i64) -> Result<Vec<TrialRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT t.id, t.sweep_id, t.seed, t.label, t.config, t.status, t.error, t.device,
                    t.n_params, t.wall_s, t.n_params_embedding, t.flops_per_token, t.train_flops,
                    t.tokens
             FROM sweep_trials s JOIN trials t ON t.id = s.trial_id
             WHERE s.sweep_id = ?1 ORDER BY s.position",
        )?;
        let rows = stmt.query_map([sweep_id], |r| {
            Ok((
                TrialRow {
                    id: r.get(0)?,
                    sweep_id: r.get(1)?,
                    seed: r.get::<_, i64>(2)? as u64,
                    label: r.get(3)?,
                    config: r.get(4)?,
                    status: Status::Queued,
                    error: r.get(6)?,
                    device: r.get(7)?,
                    n_params: r.get(8)?,
                    n_params_embedding: r.get(10)?,
                    wall_s: r.get(9)?,
                    flops_per_token: r.get(11)?,
                    train_flops: r.get(12)?,
                    tokens: r.get(13)?,
                },
                r.get::<_, String>(5)?,
            ))
        })?;
        rows.map(|row| {
            let (mut t, status) = row?;
            t.status = status.parse()?;
            Ok(t)
        })
        .collect()
    }

    /// One metric of one trial, by step.
    pub fn metric(&self, trial_id: &str, name: &str) -> Result<Vec<(u64, Option<f64>)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT step, value FROM metrics WHERE trial_id = ?1 AND name = ?2 ORDER BY step",
        )?;
        let rows = stmt.query_map(params![trial_id, name], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// The names of the metrics a trial recorded that start with `prefix`, sorted.
    pub fn metric_names(&self, trial_id: &str, prefix: &str) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT name FROM metrics WHERE trial_id = ?1 AND substr(name, 1, ?3) = ?2
             ORDER BY name",
        )?;
        let rows = stmt.query_map(params![trial_id, prefix, prefix.len() as i64], |r| r.get(0))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// A transaction that takes the write lock at once (waiting for another writer through the
    /// busy timeout): one that read first and wrote later could fail outright when another
    /// process wrote in between.
    pub(crate) fn write_tx(&self) -> Result<Transaction<'_>> {
        Ok(Transaction::new_unchecked(
            &self.conn,
            TransactionBehavior::Immediate,
        )?)
    }

    /// The underlying connection, for ad-hoc queries.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// The schema version recorded in the file at `path`, read without writing or creating
/// anything; `None` for an SQLite file that is not a results DB, an error for a file that is
/// not SQLite at all.
pub(crate) fn stored_version(path: &Path) -> Result<Option<String>> {
    let shown = path.display().to_string();
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|source| {
            Error::Open {
                path: shown.clone(),
                source,
            }
        })?;
    schema_version(&conn).map_err(|_| Error::NotResults { path: shown })
}

/// The recorded schema version; `None` for a DB without one (new, or not ours).
fn schema_version(conn: &Connection) -> Result<Option<String>> {
    let has_meta: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
        [],
        |r| r.get(0),
    )?;
    if !has_meta {
        return Ok(None);
    }
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()?)
}

/// Creates the tables, or migrates an older DB, in one immediate transaction: a second
/// process opening the same DB waits for it rather than seeing half a schema.
fn init(conn: &Connection, shown: &str) -> Result<()> {
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    let version = match schema_version(&tx)? {
        None => {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                [SCHEMA_VERSION.to_string()],
            )?;
            SCHEMA_VERSION
        }
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=SCHEMA_VERSION).contains(&n) => n,
            _ => {
                return Err(Error::SchemaVersion {
                    path: shown.to_string(),
                    found: v,
                    expected: SCHEMA_VERSION,
                })
            }
        },
    };
    if version < SCHEMA_VERSION {
        for step in &MIGRATIONS[version as usize - 1..] {
            tx.execute_batch(step)?;
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
            [SCHEMA_VERSION.to_string()],
        )?;
    }
    tx.commit()?;
    Ok(())
}

impl Drop for Store {
    /// Buffered metrics are written even when the caller returns early with an error.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sweep-results-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.db");
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_trial_goes_through_its_life_and_keeps_its_metrics() -> Result<()> {
        let path = temp_db("life");
        let mut s = Store::open(&path)?;
        let sweep = s.begin_sweep("q", "q.ron", "Sweep()", "v1")?;
        let t = NewTrial {
            id: "abc",
            seed: 3,
            label: "ffn=Gelu",
            config: "(seed: 3)",
        };
        assert_eq!(s.register_trial(sweep, 0, &t)?, Status::Queued);
        s.start_trial(
            "abc",
            "cpu",
            "v1",
            Some(ParamCount {
                total: 1234,
                embedding: 234,
            }),
        )?;
        s.record("abc", 10, "train/loss", 2.5)?;
        s.record("abc", 20, "train/loss", 2.0)?;
        s.record("abc", 20, "val/bpb", f64::NAN)?;
        s.finish_trial("abc", Status::Done, None, 1.5)?;
        assert_eq!(s.register_trial(sweep, 0, &t)?, Status::Done);
        assert_eq!(
            s.metric("abc", "train/loss")?,
            vec![(10, Some(2.5)), (20, Some(2.0))]
        );
        assert_eq!(s.metric("abc", "val/bpb")?, vec![(20, None)]);
        let rows = s.trials(sweep)?;
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].status, rows[0].n_params, rows[0].n_params_embedding),
            (Status::Done, Some(1234), Some(234))
        );
        let mode: String = s
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        assert_eq!(mode, "wal");
        Ok(())
    }

    #[test]
    fn restarting_a_trial_clears_its_old_metrics() -> Result<()> {
        let path = temp_db("restart");
        let mut s = Store::open(&path)?;
        let sweep = s.begin_sweep("q", "q.ron", "", "v1")?;
        let t = NewTrial {
            id: "t",
            seed: 0,
            label: "",
            config: "",
        };
        s.register_trial(sweep, 0, &t)?;
        s.start_trial("t", "cpu", "v1", None)?;
        s.record("t", 5, "train/loss", 9.0)?;
        s.finish_trial("t", Status::Failed, Some("boom"), 0.1)?;
        s.start_trial("t", "cpu", "v1", None)?;
        assert!(s.metric("t", "train/loss")?.is_empty());
        assert_eq!(s.trials(sweep)?[0].error, None);
        Ok(())
    }

    #[test]
    fn a_version_1_db_is_migrated_and_keeps_its_rows() -> Result<()> {
        let path = temp_db("migrate");
        {
            // The version 1 layout: trials without n_params_embedding.
            let conn = Connection::open(&path)?;
            let v1 = SCHEMA
                .replace("    n_params_embedding INTEGER,\n", "")
                .replace(
                    ",\n    owner        TEXT,\n    heartbeat_at TEXT,\n    weights_sha256 TEXT,\n    \
                     flops_per_token REAL,\n    tokens       INTEGER,\n    train_flops  REAL\n",
                    "\n",
                )
                .replace(",\n    generation   INTEGER NOT NULL DEFAULT 0\n", "\n");
            assert!(!v1.contains("owner") && !v1.contains("generation") && !v1.contains("weights"));
            assert!(!v1.contains("flops_per_token") && !v1.contains("train_flops"));
            conn.execute_batch(&v1)?;
            conn.execute_batch(
                "INSERT INTO meta VALUES ('schema_version', '1');
                 INSERT INTO sweeps VALUES (1, 's', 'f', 'spec', 'v', 'now', 'now');
                 INSERT INTO trials (id, sweep_id, seed, label, config, status, n_params,
                                     created_at)
                 VALUES ('t', 1, 0, '', 'cfg', 'done', 77, 'now');
                 INSERT INTO sweep_trials VALUES (1, 't', 0);",
            )?;
        }
        let s = Store::open(&path)?;
        let t = &s.trials(1)?[0];
        assert_eq!((t.n_params, t.n_params_embedding), (Some(77), None));
        assert_eq!(s.weights_sha256("t")?, None);
        let v: String = s.conn().query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )?;
        assert_eq!(v, SCHEMA_VERSION.to_string());
        drop(s);
        Store::open(&path)?; // and opens again as the current version
        Ok(())
    }

    #[test]
    fn claims_take_free_trials_only() -> Result<()> {
        let path = temp_db("claims");
        let mut s = Store::open(&path)?;
        let sweep = s.begin_sweep("q", "q.ron", "", "v1")?;
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let t = NewTrial {
                id,
                seed: 0,
                label: "",
                config: "",
            };
            s.register_trial(sweep, i, &t)?;
        }
        let alive = |_: &str, age: Option<f64>| {
            // The heartbeat written by the claim is seconds old, as SQLite computes it.
            assert!(age.is_some_and(|a| (0.0..60.0).contains(&a)) || age.is_none());
            false
        };
        let gone = |_: &str, _: Option<f64>| true;
        assert_eq!(
            s.claim("a", "me", false, &alive)?,
            Claim::Claimed(Status::Queued)
        );
        // Running under a live owner: busy; under a dead one: taken over.
        assert_eq!(
            s.claim("a", "other", false, &alive)?,
            Claim::Busy("me".into())
        );
        // An old heartbeat reaches `dead` as its age in seconds.
        s.conn().execute(
            "UPDATE trials SET heartbeat_at = '2000-01-01T00:00:00.000Z' WHERE id = 'a'",
            [],
        )?;
        let seen = std::cell::Cell::new(None);
        let record = |_: &str, age: Option<f64>| {
            seen.set(age);
            false
        };
        s.claim("a", "other", false, &record)?;
        let age = seen.get();
        assert!(age.is_some_and(|a| a > 20.0 * 365.0 * 86400.0), "{age:?}");
        assert_eq!(
            s.claim("a", "other", false, &gone)?,
            Claim::Claimed(Status::Running)
        );
        s.finish_trial("a", Status::Failed, Some("boom"), 1.0)?;
        assert_eq!(
            s.claim("a", "me", false, &gone)?,
            Claim::Skipped(Status::Failed)
        );
        assert_eq!(
            s.claim("a", "me", true, &gone)?,
            Claim::Claimed(Status::Failed)
        );
        s.finish_trial("a", Status::Done, None, 1.0)?;
        assert_eq!(
            s.claim("a", "me", true, &gone)?,
            Claim::Skipped(Status::Done)
        );
        // Released trials are queued again, with no owner.
        s.claim("b", "me", false, &alive)?;
        s.release("b")?;
        assert_eq!(s.status("b")?, Status::Queued);
        // A sweep keeps only the trials it lists.
        assert_eq!(s.keep_only(sweep, &["a"], &|id| id != "b")?, 1);
        assert_eq!(s.trials(sweep)?.len(), 2);
        // --fresh: the old record moves aside with its trials, a new one takes the name.
        assert_eq!(s.archive_sweep("q")?, 1);
        let fresh = s.begin_sweep("q", "q.ron", "", "v1")?;
        assert_ne!(fresh, sweep);
        assert_eq!(s.generation(fresh)?, 1);
        assert_eq!(s.sweep_generation("q@0")?, Some(0));
        assert_eq!(s.trials(sweep)?.len(), 2);
        assert_eq!(s.archive_sweep("none")?, 0);
        Ok(())
    }

    #[test]
    fn another_schema_version_is_refused() -> Result<()> {
        let path = temp_db("version");
        drop(Store::open(&path)?);
        let conn = Connection::open(&path)?;
        conn.execute(
            "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
            [],
        )?;
        drop(conn);
        let err = Store::open(&path).err().expect("refused");
        assert!(matches!(err, Error::SchemaVersion { .. }), "{err}");
        Ok(())
    }
}
