//! Helpers shared by the end-to-end tests: scratch folders, a small valid sweep file, and
//! running the real `sweep` binary.
#![allow(dead_code)] // each test binary uses a part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn shakespeare() -> String {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/tinyshakespeare/input.txt");
    p.canonicalize()
        .expect("../shared/data is beside the repository")
        .display()
        .to_string()
}

/// A fresh directory per test.
pub fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sweep-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small valid sweep file; `edit` rewrites parts of it for the bad-input cases.
pub fn sweep_text(grid: &str) -> String {
    format!(
        "Sweep(\n    name: \"tiny\",\n    seeds: [0],\n    data: Text(path: {:?}, val_fraction: 0.05),\n    \
         train: (steps: 6, batch: 2, seq_len: 16, eval_every: 3, eval_batches: 2, log_every: 3),\n    \
         model: (d_model: 16, n_layers: 1),\n    grid: {grid},\n)\n",
        shakespeare()
    )
}

pub const GRID: &str = "(attention: [Mha(heads: 2)], ffn: [SwiGlu, Gelu])";

pub fn sweep(dir: &Path, args: &[&str]) -> Output {
    sweep_env(dir, args, &[])
}

/// `sweep` with environment variables set (faults, timeouts).
pub fn sweep_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sweep"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .expect("the sweep binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn count(db: &rusqlite::Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}
