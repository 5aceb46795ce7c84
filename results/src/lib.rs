//! The results store of `sweep`: one SQLite file (WAL mode, so readers such as `sweep report`,
//! `sqlite3` or pandas can look while a sweep writes) with three tables: `sweeps`, `trials`
//! and `metrics`, plus `sweep_trials` (which trials a sweep consists of) and `meta` (the
//! schema version). The schema is documented in the README; [`SCHEMA`] is its source.

mod status;
mod store;

pub use status::Status;
pub use store::{MetricRow, NewTrial, ParamCount, Store, TrialRow, SCHEMA, SCHEMA_VERSION};

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
}

pub type Result<T> = std::result::Result<T, Error>;
