//! `sweep merge OUT.db IN.db...`: shard DBs into one (see results' merge for the rules), with
//! the checkpoints and final weights of the trials taken from each.

use std::path::{Path, PathBuf};

use results::Store;

use crate::checkpoint::Checkpoints;
use crate::error::{exit, InputError};

/// Merge results DBs (the shards of a sweep, or runs on several machines) into one.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The merged DB (created if missing; merging into an existing one adds to it).
    pub out: PathBuf,
    /// The DBs to merge in.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

pub fn exec(args: Args) -> anyhow::Result<u8> {
    // Every input is checked before anything is written.
    for input in &args.inputs {
        results::check_input(input).map_err(|e| InputError::new(e.to_string()))?;
        if same_file(input, &args.out) {
            return Err(InputError::new(format!(
                "{}: an input is the output; merge into another file",
                input.display()
            ))
            .into());
        }
    }
    if args.out.exists() {
        results::check_input(&args.out).map_err(|e| InputError::new(format!("the output {e}")))?;
    }
    let store = Store::open(&args.out)?;
    for input in &args.inputs {
        let m = store.merge_from(input)?;
        let mut moved = 0;
        for id in &m.taken {
            moved += carry_checkpoints(input, &args.out, id)?;
        }
        eprintln!(
            "{}: {} trials added, {} replaced by a further record, {} already there; {} \
             metric rows; {moved} checkpoint files",
            input.display(),
            m.added,
            m.replaced,
            m.kept,
            m.metrics
        );
    }
    eprintln!("merged into {}", args.out.display());
    Ok(exit::OK)
}

/// Links (or copies, across file systems) a trial's checkpoint folder from beside `from` to
/// beside `to`, replacing what was there. Returns the number of files.
fn carry_checkpoints(from: &Path, to: &Path, id: &str) -> anyhow::Result<usize> {
    let src = Checkpoints::new(from, id, 0, 1);
    let dst = Checkpoints::new(to, id, 0, 1);
    let Ok(entries) = std::fs::read_dir(src.dir()) else {
        return Ok(0);
    };
    let _ = std::fs::remove_dir_all(dst.dir());
    std::fs::create_dir_all(dst.dir())?;
    let mut n = 0;
    for entry in entries {
        let entry = entry?;
        let target = dst.dir().join(entry.file_name());
        if std::fs::hard_link(entry.path(), &target).is_err() {
            std::fs::copy(entry.path(), &target)?;
        }
        n += 1;
    }
    Ok(n)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
