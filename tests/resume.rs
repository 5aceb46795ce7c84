//! Sweeps that survive: killed and resumed runs, Ctrl-C, two runners on one DB, reruns of an
//! edited file. Real processes, real signals.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// 2 FFNs x 2 seeds, 200 steps each with a checkpoint every 20 (about 3 s in all on the
/// 2-core machine): long enough to be killed in the middle of a trial many times.
fn long_sweep() -> String {
    sweep_text(GRID)
        .replace("seeds: [0],", "seeds: [0, 1],")
        .replace(
            "train: (steps: 6, batch: 2, seq_len: 16, eval_every: 3, eval_batches: 2, log_every: 3)",
            "train: (steps: 200, batch: 2, seq_len: 16, eval_every: 50, eval_batches: 2, \
             log_every: 25, checkpoint_every: 20)",
        )
        .replace("model: (d_model: 16, n_layers: 1)", "model: (d_model: 32, n_layers: 2)")
}

/// Waits for the sweep's first checkpoint, sends Ctrl-C (SIGINT) and collects the output.
fn interrupt_after_first_checkpoint(dir: &Path, child: Child) -> std::process::Output {
    let first = dir.join("sweep.checkpoints");
    let started = Instant::now();
    while !first.exists() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait_with_output().unwrap()
}

fn spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sweep"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the sweep binary starts")
}

fn open(dir: &Path, db: &str) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join(db)).unwrap()
}

/// (trial label, seed) -> final val/bpb, over the done trials of a DB.
fn finals(db: &rusqlite::Connection) -> Vec<(String, i64, f64)> {
    let mut stmt = db
        .prepare(
            "SELECT t.label, t.seed, m.value FROM trials t JOIN metrics m ON m.trial_id = t.id
             WHERE t.status = 'done' AND m.name = 'val/bpb' AND m.step = 200
             ORDER BY t.label, t.seed",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Every trial done once with exactly the metric rows an uninterrupted trial writes.
fn assert_complete(db: &rusqlite::Connection) {
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    assert_eq!(
        count(db, "SELECT COUNT(*) FROM trials WHERE status = 'done'"),
        4
    );
    assert_eq!(count(db, "SELECT COUNT(*) FROM trials"), 4);
    // Per trial: 5 values (train/loss, lr, grad_norm, tokens_per_s, train/spikes) at 8 log
    // steps, val/loss and val/bpb at 4 evaluations, and 3 + 5 per sublayer (4) amplification
    // values at each (amax/fwd, amax/bwd, stream_rms/max; four gains and stream_rms).
    let per_trial = 5 * 8 + 2 * 4 + (3 + 5 * 4) * 4;
    let mut stmt = db
        .prepare("SELECT COUNT(*) FROM metrics GROUP BY trial_id")
        .unwrap();
    let counts: Vec<i64> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(counts, vec![per_trial; 4]);
    let steps = count(
        db,
        "SELECT COUNT(*) FROM (SELECT DISTINCT trial_id, step FROM metrics WHERE name = 'train/loss')",
    );
    assert_eq!(steps, 4 * 8);
}

#[test]
fn a_sweep_killed_at_random_moments_resumes_to_the_uninterrupted_result() {
    let dir = workdir("killed");
    std::fs::write(dir.join("s.ron"), long_sweep()).unwrap();
    let reference = sweep(&dir, &["run", "s.ron", "--db", "whole.db"]);
    assert_eq!(reference.status.code(), Some(0), "{}", stderr(&reference));

    // A fixed pseudo-random sequence of kill times (xorshift), spread over 50 to 300 ms: a
    // dozen of them add up to less than the sweep, so most land in the middle of a trial.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut kills = 0;
    let mut resumed = 0;
    for _ in 0..12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let wait = Duration::from_millis(50 + x % 250);
        let mut child = spawn(&dir, &["run", "s.ron", "--db", "killed.db"]);
        let started = Instant::now();
        while started.elapsed() < wait {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        let out = child.wait_with_output().unwrap();
        resumed += String::from_utf8_lossy(&out.stderr)
            .matches("resuming")
            .count();
    }
    let last = sweep(&dir, &["run", "s.ron", "--db", "killed.db"]);
    assert_eq!(last.status.code(), Some(0), "{}", stderr(&last));
    resumed += stderr(&last).matches("resuming").count();
    assert!(kills >= 10, "only {kills} runs were killed mid-way");
    assert!(resumed >= 1, "no run resumed from a checkpoint");

    let (killed, whole) = (open(&dir, "killed.db"), open(&dir, "whole.db"));
    assert_complete(&killed);
    let (a, b) = (finals(&killed), finals(&whole));
    assert_eq!(a.len(), 4);
    for ((l1, s1, v1), (l2, s2, v2)) in a.iter().zip(&b) {
        assert_eq!((l1, s1), (l2, s2));
        assert!(
            (v1 - v2).abs() < 1e-6,
            "{l1} seed {s1}: {v1} after kills, {v2} whole"
        );
    }
    // Every done trial keeps its final weights; no intermediate checkpoint is left.
    for id in ids(&killed) {
        let folder = dir.join("killed.checkpoints").join(&id);
        assert!(folder.join("final.safetensors").is_file(), "{id}");
        assert!(manifests(&folder).is_empty(), "{id}");
    }
}

fn ids(db: &rusqlite::Connection) -> Vec<String> {
    let mut stmt = db.prepare("SELECT id FROM trials ORDER BY id").unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn two_runners_on_one_db_finish_the_grid_without_running_a_trial_twice() {
    let dir = workdir("two-runners");
    std::fs::write(dir.join("s.ron"), long_sweep()).unwrap();
    let a = spawn(&dir, &["run", "s.ron"]);
    let b = spawn(&dir, &["run", "s.ron"]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    assert_eq!(b.status.code(), Some(0), "{}", stderr(&b));
    // Each trial was trained by one of them: the finished lines add up to the grid.
    let trained = |o: &std::process::Output| stderr(o).matches("] done").count();
    assert_eq!(
        trained(&a) + trained(&b),
        4,
        "{}\n{}",
        stderr(&a),
        stderr(&b)
    );
    assert_complete(&open(&dir, "sweep.db"));
}

#[test]
fn ctrl_c_exits_130_and_leaves_the_trial_to_resume() {
    let dir = workdir("ctrl-c");
    std::fs::write(dir.join("s.ron"), long_sweep()).unwrap();
    let out = interrupt_after_first_checkpoint(&dir, spawn(&dir, &["run", "s.ron"]));
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    let db = open(&dir, "sweep.db");
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials WHERE status = 'running'"),
        0
    );

    let again = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_complete(&db);
}

#[test]
fn failed_trials_wait_for_retry_and_fresh_starts_a_new_record() {
    let dir = workdir("retry-fresh");
    std::fs::write(dir.join("s.ron"), sweep_text(GRID)).unwrap();
    assert_eq!(sweep(&dir, &["run", "s.ron"]).status.code(), Some(0));
    let db = open(&dir, "sweep.db");
    db.execute_batch(
        "UPDATE trials SET status = 'failed', error = 'boom' WHERE label = 'ffn=Gelu'",
    )
    .unwrap();

    let skip = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(
        skip.status.code(),
        Some(1),
        "a failed trial remains: {}",
        stderr(&skip)
    );
    assert!(
        stderr(&skip).contains(
            "0 to run (1 finished before, 1 failed before: rerun them with --retry failed)"
        ),
        "{}",
        stderr(&skip)
    );
    let retry = sweep(&dir, &["run", "s.ron", "--retry", "failed"]);
    assert_eq!(retry.status.code(), Some(0), "{}", stderr(&retry));
    assert!(stderr(&retry).contains("1 to run"), "{}", stderr(&retry));
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials WHERE status = 'done'"),
        2
    );

    let fresh = sweep(&dir, &["run", "s.ron", "--fresh"]);
    assert_eq!(fresh.status.code(), Some(0), "{}", stderr(&fresh));
    assert!(
        stderr(&fresh).contains("2 to run (0 finished before)"),
        "{}",
        stderr(&fresh)
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials WHERE status = 'done'"),
        4
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM sweeps WHERE name IN ('tiny', 'tiny@0')"
        ),
        2
    );
    let old = sweep(&dir, &["report", "--sweep", "tiny@0"]);
    assert_eq!(old.status.code(), Some(0), "{}", stderr(&old));
    assert!(String::from_utf8_lossy(&old.stdout).contains("2 trials in 2 configurations"));
}

#[test]
fn an_edited_sweep_reuses_unchanged_cells_and_drops_removed_ones_from_its_report() {
    let dir = workdir("edited");
    std::fs::write(dir.join("s.ron"), sweep_text(GRID)).unwrap();
    assert_eq!(sweep(&dir, &["run", "s.ron"]).status.code(), Some(0));
    let edited = sweep_text("(attention: [Mha(heads: 2)], ffn: [Gelu, Relu2])");
    std::fs::write(dir.join("s.ron"), edited).unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("2 trials, 1 to run (1 finished before)"),
        "{err}"
    );
    assert!(
        err.contains("1 trial(s) of an earlier version of s.ron are no longer in it"),
        "{err}"
    );
    let db = open(&dir, "sweep.db");
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials"),
        3,
        "the SwiGlu trial stays"
    );
    let report = sweep(&dir, &["report", "--format", "csv"]);
    let csv = String::from_utf8_lossy(&report.stdout);
    let configs: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    let mut configs = configs;
    configs.sort();
    assert_eq!(configs, ["Gelu", "Relu2"]);
}

#[test]
fn an_allocation_failure_fails_its_trial_and_the_sweep_goes_on() {
    let dir = workdir("alloc");
    // 16 heads of 2048 x 2048 scores take 512 MiB per tensor, beyond a 1.5 GB address space;
    // one head takes 32 MiB. The memory estimate (against the machine's RAM) lets both pass.
    let text = sweep_text("(attention: [Mha(heads: [16, 1])], ffn: [Gelu])")
        .replace("batch: 2, seq_len: 16", "batch: 2, seq_len: 2048")
        .replace("d_model: 16", "d_model: 32")
        .replace("steps: 6,", "steps: 2,")
        .replace("eval_every: 3", "eval_every: 2")
        .replace("log_every: 3", "log_every: 1");
    std::fs::write(dir.join("s.ron"), text).unwrap();
    // With a backtrace after the allocation failure's message, dozens of lines that the
    // recorded reason must look past.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 1500000 && exec {} run s.ron",
            env!("CARGO_BIN_EXE_sweep")
        ))
        .env("RUST_BACKTRACE", "1")
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a trial failed: {}",
        stderr(&out)
    );
    let db = open(&dir, "sweep.db");
    let error: String = db
        .query_row(
            "SELECT error FROM trials WHERE label = 'attention.heads=16' AND status = 'failed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        error.contains("SIGABRT") && error.contains("memory allocation of"),
        "{error}"
    );
    assert!(!error.contains("stack backtrace"), "{error}");
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM trials WHERE label = 'attention.heads=1' AND status = 'done'"
        ),
        1
    );
}

/// Whether a complete checkpoint exists under a checkpoints folder.
fn has_manifest(folder: &Path) -> bool {
    std::fs::read_dir(folder)
        .map(|entries| entries.flatten().any(|e| !manifests(&e.path()).is_empty()))
        .unwrap_or(false)
}

/// The steps of the checkpoint manifests (`step-<N>.json`) in a trial's folder, ascending.
fn manifests(trial_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(trial_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("step-")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort();
    steps
}

/// The pid of the worker process training in `dir`, once one runs.
fn worker_in(dir: &Path) -> Option<i32> {
    let needle = dir.display().to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "worker") && args.iter().any(|a| a.contains(&needle)) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_worker_killed_by_the_oom_killer_fails_its_trial_and_the_sweep_goes_on() {
    let dir = workdir("oom-killed");
    std::fs::write(dir.join("s.ron"), long_sweep()).unwrap();
    let db_path = dir.join("sweep.db").display().to_string();
    let child = spawn(&dir, &["run", "s.ron", "--db", &db_path]);
    // SIGKILL the first worker after its first checkpoint, as the kernel's OOM killer would.
    let started = Instant::now();
    let pid = loop {
        if let (Some(pid), true) = (
            worker_in(&dir),
            has_manifest(&dir.join("sweep.checkpoints")),
        ) {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no worker started"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let db = open(&dir, "sweep.db");
    let error: String = db
        .query_row(
            "SELECT error FROM trials WHERE status = 'failed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(error.contains("SIGKILL"), "{error}");
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials WHERE status = 'done'"),
        3
    );

    // Retried, it continues from its checkpoint and the grid completes as if never killed.
    let retry = sweep(&dir, &["run", "s.ron", "--retry", "failed"]);
    assert_eq!(retry.status.code(), Some(0), "{}", stderr(&retry));
    assert!(stderr(&retry).contains("resuming"), "{}", stderr(&retry));
    assert_complete(&db);
}

#[test]
fn a_data_parallel_trial_stopped_by_ctrl_c_resumes_on_every_rank_to_the_uninterrupted_result() {
    let dir = workdir("dp-ctrl-c");
    std::fs::write(dir.join("s.ron"), long_sweep()).unwrap();
    let ranks = ["--device", "cpu,cpu", "--gpus-per-trial", "2"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut a = vec!["run", "s.ron"];
        a.extend_from_slice(&ranks);
        a.extend_from_slice(extra);
        a
    };
    let reference = sweep(&dir, &with(&["--db", "whole.db"]));
    assert_eq!(reference.status.code(), Some(0), "{}", stderr(&reference));

    let out = interrupt_after_first_checkpoint(&dir, spawn(&dir, &with(&[])));
    // Both ranks stop after the same step (they agree on it inside the step's all-reduce).
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let db = open(&dir, "sweep.db");
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials WHERE status = 'running'"),
        0
    );
    let again = sweep(&dir, &with(&[]));
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(stderr(&again).contains("resuming"), "{}", stderr(&again));
    assert_complete(&db);
    let (a, b) = (finals(&db), finals(&open(&dir, "whole.db")));
    assert_eq!(a.len(), 4);
    for ((l1, s1, v1), (l2, s2, v2)) in a.iter().zip(&b) {
        assert_eq!((l1, s1), (l2, s2));
        assert!(
            (v1 - v2).abs() < 1e-6,
            "{l1} seed {s1}: {v1} resumed, {v2} whole"
        );
    }
}

/// One trial, 400 steps, a checkpoint every 20.
fn one_trial_sweep() -> String {
    long_sweep()
        .replace("seeds: [0, 1],", "seeds: [0],")
        .replace("ffn: [SwiGlu, Gelu]", "ffn: [SwiGlu]")
        .replace("steps: 200,", "steps: 400,")
        .replace("eval_every: 50,", "eval_every: 100,")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The final val/bpb and val/loss of the one trial of a DB, and its status.
fn outcome(db: &rusqlite::Connection) -> (String, f64, f64) {
    db.query_row(
        "SELECT t.status, b.value, l.value FROM trials t
         JOIN metrics b ON b.trial_id = t.id AND b.name = 'val/bpb' AND b.step = 400
         JOIN metrics l ON l.trial_id = t.id AND l.name = 'val/loss' AND l.step = 400",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .unwrap()
}

#[test]
fn a_damaged_checkpoint_falls_back_to_the_one_before_and_the_trial_ends_as_if_never_stopped() {
    let dir = workdir("damaged");
    std::fs::write(dir.join("s.ron"), one_trial_sweep()).unwrap();
    let whole = sweep(&dir, &["run", "s.ron", "--db", "whole.db"]);
    assert_eq!(whole.status.code(), Some(0), "{}", stderr(&whole));
    let (_, want_bpb, want_loss) = outcome(&open(&dir, "whole.db"));

    // Killed (SIGKILL, parent and worker) once two checkpoints are on disk.
    let mut child = spawn(&dir, &["run", "s.ron", "--db", "killed.db"]);
    let folder = dir.join("killed.checkpoints");
    let started = Instant::now();
    let trial_dir = loop {
        let found = std::fs::read_dir(&folder)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| manifests(p).len() >= 2);
        if let Some(p) = found {
            break p;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no checkpoints"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200)); // the worker follows its parent
    let trial = trial_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (status,): (String,) = open(&dir, "killed.db")
        .query_row("SELECT status FROM trials", [], |r| Ok((r.get(0)?,)))
        .unwrap();
    assert_eq!(status, "running", "the trial finished before it was killed");
    let steps = manifests(&trial_dir);
    let (prev, last) = (steps[steps.len() - 2], steps[steps.len() - 1]);

    type Damage = fn(&Path, u64, u64);
    // (name, damage, what the event says, where the trial goes on)
    let cases: Vec<(&str, Damage, &str, String)> = vec![
        (
            "tensor-bytes",
            |d, _, s| {
                let p = d.join(format!("step-{s}.safetensors"));
                let mut b = std::fs::read(&p).unwrap();
                let mid = b.len() / 2;
                for (i, x) in b[mid - 2048..mid + 2048].iter_mut().enumerate() {
                    *x = (i as u8).wrapping_mul(37) ^ 0x5a;
                }
                std::fs::write(&p, b).unwrap();
            },
            "failed verification (sha256 mismatch)",
            format!("resumed from step-{prev}"),
        ),
        (
            "header-bit",
            |d, _, s| {
                let p = d.join(format!("step-{s}.safetensors"));
                let mut b = std::fs::read(&p).unwrap();
                b[20] ^= 0x01;
                std::fs::write(&p, b).unwrap();
            },
            "failed verification (sha256 mismatch)",
            format!("resumed from step-{prev}"),
        ),
        (
            "truncated",
            |d, _, s| {
                let p = d.join(format!("step-{s}.safetensors"));
                let len = std::fs::metadata(&p).unwrap().len();
                std::fs::File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
            },
            "bytes, its manifest says",
            format!("resumed from step-{prev}"),
        ),
        (
            "empty",
            |d, _, s| std::fs::write(d.join(format!("step-{s}.safetensors")), b"").unwrap(),
            "is 0 bytes, its manifest says",
            format!("resumed from step-{prev}"),
        ),
        (
            "broken-manifest",
            |d, _, s| {
                std::fs::write(d.join(format!("step-{s}.json")), b"{\"format\": 2, \"tr").unwrap()
            },
            "has a manifest that is not valid",
            format!("resumed from step-{prev}"),
        ),
        (
            "missing-file",
            |d, _, s| {
                let p = d.join(format!("step-{s}.json"));
                let text = std::fs::read_to_string(&p).unwrap();
                let text =
                    text.replace(&format!("step-{s}.safetensors"), "step-999999.safetensors");
                std::fs::write(&p, text).unwrap();
            },
            "names a tensor file that cannot be read (step-999999.safetensors",
            format!("resumed from step-{prev}"),
        ),
        (
            "step-disagrees",
            |d, _, s| {
                let p = d.join(format!("step-{s}.json"));
                let text = std::fs::read_to_string(&p).unwrap();
                let text = text.replace(
                    &format!("\"step\": {s},"),
                    &format!("\"step\": {},", s + 20),
                );
                std::fs::write(&p, text).unwrap();
            },
            "has a manifest that says step",
            format!("resumed from step-{prev}"),
        ),
        (
            // A whole, self-consistent checkpoint the results DB never recorded (ahead of
            // its metrics): not trained on.
            "unrecorded",
            |d, _, s| {
                let t = s + 1000;
                std::fs::copy(
                    d.join(format!("step-{s}.safetensors")),
                    d.join(format!("step-{t}.safetensors")),
                )
                .unwrap();
                let text = std::fs::read_to_string(d.join(format!("step-{s}.json"))).unwrap();
                let text = text
                    .replace(
                        &format!("step-{s}.safetensors"),
                        &format!("step-{t}.safetensors"),
                    )
                    .replace(&format!("\"step\": {s},"), &format!("\"step\": {t},"));
                std::fs::write(d.join(format!("step-{t}.json")), text).unwrap();
            },
            "is not in the results database's record of this trial",
            format!("resumed from step-{last}"),
        ),
        (
            "both",
            |d, p, s| {
                for step in [p, s] {
                    std::fs::write(d.join(format!("step-{step}.safetensors")), b"").unwrap();
                }
            },
            "failed verification",
            "started again from step 0".to_string(),
        ),
    ];
    for (name, damage, says, then) in cases {
        let db = format!("{name}.db");
        for ext in ["", "-wal", "-shm"] {
            let from = dir.join(format!("killed.db{ext}"));
            if from.exists() {
                std::fs::copy(from, dir.join(format!("{db}{ext}"))).unwrap();
            }
        }
        copy_dir(&folder, &dir.join(format!("{name}.checkpoints")));
        let trial_copy = dir.join(format!("{name}.checkpoints")).join(&trial);
        damage(&trial_copy, prev, last);

        let out = sweep(&dir, &["run", "s.ron", "--db", &db]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{name}: {err}");
        assert!(err.contains(says) && err.contains(&then), "{name}: {err}");
        let conn = open(&dir, &db);
        let (status, bpb, loss) = outcome(&conn);
        assert_eq!(status, "done", "{name}");
        assert!(
            (bpb - want_bpb).abs() < 1e-6 && (loss - want_loss).abs() < 1e-6,
            "{name}: val/bpb {bpb} val/loss {loss}, uninterrupted {want_bpb} {want_loss}"
        );
        let events: Vec<(String, String)> = {
            let mut stmt = conn
                .prepare("SELECT kind, message FROM events ORDER BY id")
                .unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let expected = if name == "both" { 2 } else { 1 };
        assert_eq!(events.len(), expected, "{name}: {events:?}");
        assert!(
            events
                .iter()
                .all(|(k, m)| k == "checkpoint_rejected" && m.ends_with(&then)),
            "{name}: {events:?}"
        );
        assert!(events[0].1.contains(says), "{name}: {events:?}");
        let report = sweep(&dir, &["report", "--db", &db, "--sweep", "tiny"]);
        let text = String::from_utf8_lossy(&report.stdout).into_owned();
        let count = if expected == 1 {
            "1 event".to_string()
        } else {
            format!("{expected} events")
        };
        assert!(
            text.contains(&format!("1 done, {count}")) && text.contains(&events[0].1),
            "{name}: {text}"
        );
    }

    // The final weights: verified against the trial's record, refused once damaged.
    let ok = sweep(&dir, &["verify", "--db", "both.db"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let weights = dir
        .join("both.checkpoints")
        .join(&trial)
        .join("final.safetensors");
    let mut b = std::fs::read(&weights).unwrap();
    let at = b.len() - 100;
    b[at] ^= 0x10;
    std::fs::write(&weights, b).unwrap();
    let bad = sweep(&dir, &["verify", "--db", "both.db"]);
    let text = String::from_utf8_lossy(&bad.stdout).into_owned();
    assert_eq!(bad.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "both.checkpoints/{trial}/final.safetensors failed verification"
        )),
        "{text}"
    );
}
