//! The results store of `sweep`: one SQLite file (WAL mode, so readers such as `sweep report`,
//! `sqlite3` or pandas can look while a sweep writes) with three tables: `sweeps`, `trials`
//! and `metrics`, plus `sweep_trials` (which trials a sweep consists of) and `meta` (the
//! schema version). The schema is documented in the README; [`SCHEMA`] is its source.

mod events;
mod merge;
pub mod report;
mod status;
mod store;

pub use events::EventRow;
pub use merge::{check_input, Merged};
pub use status::Status;
pub use store::{Claim, MetricRow, NewTrial, ParamCount, Store, TrialRow, SCHEMA, SCHEMA_VERSION};

/// What the store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error(
        "{path} has results schema version {found}, this build reads version {expected}; \
         use a new --db file or a matching sweep build"
    )]
    SchemaVersion {
        path: String,
        found: String,
        expected: u32,
    },
    #[error("results database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("unknown trial status `{0}` in the results database")]
    BadStatus(String),
    /// The DB to read does not exist.
    #[error("{path}: no such results database; `sweep run FILE` writes sweep.db beside FILE, or give --db PATH")]
    Missing { path: String },
    /// A file that is not a results database (no `meta` table).
    #[error("{path} is not a sweep results database (it has no meta table); give the --db that `sweep run` wrote")]
    NotResults { path: String },
    /// A request the data cannot answer: unknown sweep, bad baseline, nothing to plot.
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Report(String),
    #[error("drawing {0}")]
    Plot(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
