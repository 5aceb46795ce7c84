//! `sweep slurm FILE`: the sweep as a Slurm job array (one shard per task, each into its own
//! DB) and a merge job that runs after the array however it ended (`afterany`) and joins the
//! shards into the sweep's DB. `--submit` submits both.
//!
//! Everything lives in `<sweep>.slurm/` beside the DB: `array.sbatch`, `merge.sbatch`,
//! `shards/shard-K.db` and `logs/`. Submitting again continues: each shard skips its finished
//! trials, retries failed ones and resumes interrupted ones from their checkpoints.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::error::{exit, InputError};
use crate::spec::Sweep;

/// Write (and with --submit, submit) Slurm batch scripts that run the sweep as a job array.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sweep file (RON).
    pub file: PathBuf,
    /// Array tasks: the sweep's trials are split into this many shards.
    #[arg(long, default_value_t = 4)]
    pub shards: u64,
    /// Slurm partition (default: the cluster's).
    #[arg(long)]
    pub partition: Option<String>,
    /// GPUs per array task; the shards then train with --device cuda:0,..,G-1 on the GPUs
    /// Slurm gives (trials side by side, or data-parallel with train.gpus_per_trial).
    #[arg(long)]
    pub gpus_per_task: Option<u32>,
    /// Time limit per task, in Slurm's format (e.g. 4:00:00).
    #[arg(long)]
    pub time: Option<String>,
    /// Any other sbatch option for the array, e.g. --sbatch-arg=--mem=16G (repeatable).
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// The merged results DB [default: sweep.db beside the sweep file].
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Overrides, as for `sweep run` (repeatable).
    #[arg(long = "set", value_name = "PATH=RON")]
    pub sets: Vec<String>,
    /// Submit the array and the merge job with sbatch and print their job ids.
    #[arg(long)]
    pub submit: bool,
}

pub fn exec(args: Args) -> anyhow::Result<u8> {
    if args.shards == 0 {
        return Err(InputError::new("--shards 0: give at least one shard").into());
    }
    // The file is checked here, so that a job does not start only to find it broken.
    let sweep = Sweep::load(&args.file, &args.sets)?;
    let file = absolute(&args.file)?;
    let db = absolute(
        &args
            .db
            .clone()
            .unwrap_or_else(|| sweep.source.base_dir().join("sweep.db")),
    )?;
    let dir = db
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!("{}.slurm", sweep.name));
    std::fs::create_dir_all(dir.join("shards"))?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let exe = std::env::current_exe().context("locating the sweep binary")?;
    let scripts = Scripts {
        name: &sweep.name,
        exe: &exe,
        file: &file,
        db: &db,
        dir: &dir,
        args: &args,
    };
    let array = dir.join("array.sbatch");
    let merge = dir.join("merge.sbatch");
    std::fs::write(&array, scripts.array())?;
    std::fs::write(&merge, scripts.merge())?;
    let trials = sweep.trials.len();
    println!(
        "wrote {} ({} tasks for {trials} trials) and {}",
        array.display(),
        args.shards,
        merge.display()
    );
    if !args.submit {
        println!(
            "submit with:\n  jid=$(sbatch --parsable {})\n  sbatch --dependency=afterany:$jid {}",
            array.display(),
            merge.display()
        );
        return Ok(exit::OK);
    }
    let array_id = sbatch(&[array.as_os_str().to_str().unwrap_or_default()])?;
    let merge_id = sbatch(&[
        &format!("--dependency=afterany:{array_id}"),
        merge.as_os_str().to_str().unwrap_or_default(),
    ])?;
    println!(
        "submitted array job {array_id} ({} tasks) and merge job {merge_id}",
        args.shards
    );
    println!(
        "follow with `squeue -j {array_id},{merge_id}`; logs in {}; then `sweep report --db {}`",
        dir.join("logs").display(),
        db.display()
    );
    Ok(exit::OK)
}

struct Scripts<'a> {
    name: &'a str,
    exe: &'a Path,
    file: &'a Path,
    db: &'a Path,
    dir: &'a Path,
    args: &'a Args,
}

impl Scripts<'_> {
    fn header(&self, job: &str, log: &str) -> String {
        let mut s = format!(
            "#!/bin/bash\n#SBATCH --job-name={job}\n#SBATCH --output={}\n",
            self.dir.join("logs").join(log).display()
        );
        if let Some(p) = &self.args.partition {
            let _ = writeln!(s, "#SBATCH --partition={p}");
        }
        if let Some(t) = &self.args.time {
            let _ = writeln!(s, "#SBATCH --time={t}");
        }
        s
    }

    fn array(&self) -> String {
        let a = self.args;
        let mut s = self.header(
            &format!("sweep-{}", self.name),
            &format!("{}-%A_%a.log", self.name),
        );
        let _ = writeln!(s, "#SBATCH --array=0-{}", a.shards - 1);
        if let Some(g) = a.gpus_per_task {
            let _ = writeln!(s, "#SBATCH --gpus-per-task={g}");
        }
        for extra in &a.sbatch_args {
            let _ = writeln!(s, "#SBATCH {extra}");
        }
        let mut cmd = format!(
            "exec {} run {} --db \"$SHARDS/shard-$SLURM_ARRAY_TASK_ID.db\" \\\n    \
             --shard \"$SLURM_ARRAY_TASK_ID/{}\" --retry failed",
            quote(&self.exe.display().to_string()),
            quote(&self.file.display().to_string()),
            a.shards
        );
        if let Some(g) = a.gpus_per_task {
            // Slurm sets CUDA_VISIBLE_DEVICES to the task's GPUs, numbered from 0 here: a
            // trial on each at a time, or data-parallel trials with train.gpus_per_trial.
            let gpus: Vec<String> = (0..g.max(1)).map(|i| i.to_string()).collect();
            cmd += &format!(" --device cuda:{}", gpus.join(","));
        }
        for set in &a.sets {
            cmd += &format!(" --set {}", quote(set));
        }
        let _ = write!(
            s,
            "set -euo pipefail\n\
             # Shard $SLURM_ARRAY_TASK_ID of {n} into its own DB. Submitted again, a shard skips\n\
             # its finished trials, retries failed ones and resumes interrupted ones.\n\
             SHARDS={shards}\n{cmd}\n",
            n = a.shards,
            shards = quote(&self.dir.join("shards").display().to_string()),
        );
        s
    }

    fn merge(&self) -> String {
        let mut s = self.header(
            &format!("sweep-{}-merge", self.name),
            &format!("{}-merge-%j.log", self.name),
        );
        let _ = write!(
            s,
            "set -euo pipefail\nshopt -s nullglob\n\
             # Runs after the array, however its tasks ended (afterany): whatever the shards\n\
             # finished is merged; merging again after a resubmission changes only what changed.\n\
             dbs=({shards}/shard-*.db)\n\
             exec {exe} merge {db} \"${{dbs[@]}}\"\n",
            shards = quote(&self.dir.join("shards").display().to_string()),
            exe = quote(&self.exe.display().to_string()),
            db = quote(&self.db.display().to_string()),
        );
        s
    }
}

/// Single-quoted for bash.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Absolute, without `.` components: the jobs start in another directory.
fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(std::path::absolute(p)?)
}

/// Submits with `sbatch --parsable` and returns the job id.
fn sbatch(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .output()
        .context("running sbatch (is this a Slurm login node?); the scripts are written")?;
    if !out.status.success() {
        anyhow::bail!(
            "sbatch {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // --parsable prints `jobid` or `jobid;cluster`.
    Ok(text
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string())
}
