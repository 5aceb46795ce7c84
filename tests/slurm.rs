//! Sweeps beyond one machine: shards, merging their DBs, and the Slurm scripts, run by bash
//! as Slurm would and, where `.ci/run` started a real one-node cluster
//! (SWEEP_SLURM_TEST=1), submitted to it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// 2 FFNs x 3 seeds = 6 tiny trials.
fn six_trials(dir: &Path) {
    let text = sweep_text(GRID).replace("seeds: [0],", "seeds: [0, 1, 2],");
    std::fs::write(dir.join("s.ron"), text).unwrap();
}

fn open(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

/// (trial id, status, metric rows) of every trial, in id order.
fn contents(db: &rusqlite::Connection) -> Vec<(String, String, i64)> {
    let mut stmt = db
        .prepare(
            "SELECT t.id, t.status, (SELECT COUNT(*) FROM metrics m WHERE m.trial_id = t.id)
             FROM trials t ORDER BY t.id",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn shards_partition_the_sweep_and_merge_into_the_unsharded_result() {
    let dir = workdir("shards-merge");
    six_trials(&dir);
    let whole = sweep(&dir, &["run", "s.ron", "--db", "whole.db"]);
    assert_eq!(whole.status.code(), Some(0), "{}", stderr(&whole));
    let mut shard_dbs = Vec::new();
    let mut ran = 0;
    for k in 0..3 {
        let db = format!("shard-{k}.db");
        let out = sweep(
            &dir,
            &["run", "s.ron", "--db", &db, "--shard", &format!("{k}/3")],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        ran += count(&open(&dir.join(&db)), "SELECT COUNT(*) FROM trials");
        shard_dbs.push(db);
    }
    assert_eq!(ran, 6, "the shards hold every trial once between them");

    let mut args = vec!["merge", "all.db"];
    args.extend(shard_dbs.iter().map(String::as_str));
    let out = sweep(&dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let merged = open(&dir.join("all.db"));
    let reference = contents(&open(&dir.join("whole.db")));
    assert_eq!(contents(&merged), reference);
    assert_eq!(
        count(&merged, "SELECT COUNT(*) FROM sweep_trials"),
        6,
        "one sweep with all six trials"
    );
    // The same final numbers as the unsharded run.
    let bpb = |db: &rusqlite::Connection| -> f64 {
        db.query_row(
            "SELECT sum(value) FROM metrics WHERE name = 'val/bpb' AND step = 6",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert!((bpb(&merged) - bpb(&open(&dir.join("whole.db")))).abs() < 1e-9);
    // Final weights came along.
    let weights = std::fs::read_dir(dir.join("all.checkpoints"))
        .unwrap()
        .count();
    assert_eq!(weights, 6);

    // Merging again changes nothing.
    let again = sweep(&dir, &args);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("0 trials added, 0 replaced"),
        "{}",
        stderr(&again)
    );
    assert_eq!(contents(&merged), reference);
    let report = sweep(&dir, &["report", "--db", "all.db"]);
    let table = String::from_utf8_lossy(&report.stdout);
    assert!(
        table.contains("6 trials in 2 configurations (6 done)"),
        "{table}"
    );
}

#[test]
fn merge_refuses_other_schema_versions_and_non_dbs_before_writing() {
    let dir = workdir("merge-refuse");
    six_trials(&dir);
    assert_eq!(
        sweep(&dir, &["run", "s.ron", "--db", "a.db", "--shard", "0/2"])
            .status
            .code(),
        Some(0)
    );
    std::fs::copy(dir.join("a.db"), dir.join("old.db")).unwrap();
    open(&dir.join("old.db"))
        .execute(
            "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    std::fs::write(dir.join("notes.txt"), "not a db").unwrap();
    for (input, needle) in [
        (
            "old.db",
            "old.db has results schema version 2, this build merges version 5 only",
        ),
        ("notes.txt", "notes.txt is not a sweep results database"),
        ("none.db", "none.db: no such results database"),
    ] {
        let out = sweep(&dir, &["merge", "out.db", "a.db", input]);
        assert_eq!(out.status.code(), Some(2), "{input}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{input}: {}", stderr(&out));
        assert!(!dir.join("out.db").exists(), "{input}: out.db was written");
    }
}

/// Runs a Slurm batch script with bash, as one array task would.
fn bash(script: &Path, task: Option<u64>) -> std::process::Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script);
    if let Some(k) = task {
        cmd.env("SLURM_ARRAY_TASK_ID", k.to_string());
    }
    cmd.output().unwrap()
}

/// Runs the array's `tasks` tasks and then the merge job with bash; returns the number of
/// trials the tasks trained.
fn run_jobs(folder: &Path, tasks: u64) -> usize {
    let mut trained = 0;
    for k in 0..tasks {
        let o = bash(&folder.join("array.sbatch"), Some(k));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "task {k}: {err}");
        trained += err.matches("] done").count();
    }
    let o = bash(&folder.join("merge.sbatch"), None);
    assert!(
        o.status.success(),
        "merge: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    trained
}

#[test]
fn the_slurm_scripts_run_every_shard_and_merge_them() {
    let dir = workdir("slurm-scripts");
    six_trials(&dir);
    let out = sweep(
        &dir,
        &[
            "slurm",
            "s.ron",
            "--shards",
            "3",
            "--partition",
            "debug",
            "--time",
            "0:10:00",
            "--sbatch-arg=--mem=1G",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let folder = dir.join("tiny.slurm");
    let array = std::fs::read_to_string(folder.join("array.sbatch")).unwrap();
    for line in [
        "#SBATCH --array=0-2",
        "#SBATCH --partition=debug",
        "#SBATCH --time=0:10:00",
        "#SBATCH --mem=1G",
        "--shard \"$SLURM_ARRAY_TASK_ID/3\" --retry failed",
    ] {
        assert!(array.contains(line), "`{line}` not in:\n{array}");
    }
    assert!(!array.contains("--device cuda"));
    let merge = std::fs::read_to_string(folder.join("merge.sbatch")).unwrap();
    assert!(
        merge.contains(" merge ") && merge.contains("shard-*.db"),
        "{merge}"
    );

    // Each task as Slurm would start it, then the merge job.
    assert_eq!(run_jobs(&folder, 3), 6);
    let db = open(&dir.join("sweep.db"));
    let done = "SELECT COUNT(*) FROM trials WHERE status = 'done'";
    assert_eq!(count(&db, done), 6);

    // A partial failure: one trial of one shard failed. Submitting again reruns only it.
    // Trial ids hash the resolved config (data path included), so which shard holds trials
    // depends on where the test runs: fail a trial of the first shard that has one.
    let shard = (0..3)
        .map(|k| folder.join(format!("shards/shard-{k}.db")))
        .find(|p| count(&open(p), "SELECT COUNT(*) FROM trials") > 0)
        .unwrap();
    open(&shard)
        .execute_batch(
            "UPDATE trials SET status = 'failed', error = 'node lost'
             WHERE id = (SELECT min(id) FROM trials)",
        )
        .unwrap();
    assert_eq!(run_jobs(&folder, 3), 1, "only the failed trial runs again");
    assert_eq!(count(&db, done), 6);

    let gpus = sweep(&dir, &["slurm", "s.ron", "--gpus-per-task", "4"]);
    assert_eq!(gpus.status.code(), Some(0));
    let array = std::fs::read_to_string(folder.join("array.sbatch")).unwrap();
    assert!(array.contains("#SBATCH --gpus-per-task=4") && array.contains("--device cuda:0,1,2,3"));
}

/// Against a real Slurm: `.ci/run` starts a one-node cluster and sets SWEEP_SLURM_TEST=1.
#[test]
fn a_sweep_runs_as_a_slurm_job_array_and_its_merge_job() {
    if std::env::var("SWEEP_SLURM_TEST").as_deref() != Ok("1") {
        eprintln!("skipped: no Slurm cluster (.ci/run starts one and sets SWEEP_SLURM_TEST=1)");
        return;
    }
    let dir = workdir("slurm-real");
    let text = sweep_text(GRID).replace("seeds: [0],", "seeds: [0, 1, 2, 3],");
    std::fs::write(dir.join("s.ron"), text).unwrap();
    let out = sweep(&dir, &["slurm", "s.ron", "--shards", "4", "--submit"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let ids: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with("submitted array job"))
        .map(|l| {
            // "submitted array job 2 (4 tasks) and merge job 3": the words after "job".
            let words: Vec<&str> = l.split_whitespace().collect();
            words
                .windows(2)
                .filter(|w| w[0] == "job")
                .map(|w| w[1])
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ids.len(), 2, "{stdout}");
    let started = Instant::now();
    loop {
        let q = Command::new("squeue")
            .args(["-h", "-j", &ids.join(",")])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the jobs did not finish"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let logs: Vec<_> = std::fs::read_dir(dir.join("tiny.slurm/logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(logs.len(), 5, "a log per task and the merge's: {logs:?}");
    let db = open(&dir.join("sweep.db"));
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials WHERE status = 'done'"),
        8
    );
    assert_eq!(count(&db, "SELECT COUNT(DISTINCT id) FROM trials"), 8);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM metrics WHERE name = 'val/bpb' AND step = 6"
        ),
        8
    );
}
