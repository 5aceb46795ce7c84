//! End-to-end tests of the `sweep` binary: real processes, real files, real SQLite.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Runs `text` as a sweep file and expects exit 2, an error containing every `needles`,
/// and no database.
fn refused(name: &str, text: &str, extra: &[&str], needles: &[&str]) {
    let dir = workdir(name);
    std::fs::write(dir.join("s.ron"), text).unwrap();
    let mut args = vec!["run", "s.ron"];
    args.extend_from_slice(extra);
    let out = sweep(&dir, &args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{name}: {err}");
    assert!(err.starts_with("error: "), "{name}: {err}");
    for n in needles {
        assert!(err.contains(n), "{name}: `{n}` not in: {err}");
    }
    assert!(
        !dir.join("sweep.db").exists(),
        "{name}: a database was written"
    );
}

#[test]
fn malformed_ron_names_file_line_and_column() {
    let text = sweep_text(GRID).replace("seeds: [0],", "seeds: [0,,");
    refused("syntax", &text, &[], &["s.ron:3:15: Expected integer"]);
}

#[test]
fn unknown_component_lists_the_slot_and_the_nearest() {
    let text = sweep_text("(attention: [Mha(heads: 2)], ffn: [SwiGLU])");
    refused(
        "unknown-component",
        &text,
        &[],
        &["s.ron:7:46: unknown ffn component `SwiGLU`; registered: Gelu, Relu2, SwiGlu. Did you mean `SwiGlu`?"],
    );
}

#[test]
fn unknown_parameter_is_named_with_its_place() {
    let text = sweep_text("(attention: [Mha(heads: 2, head: 3)], ffn: [Gelu])");
    refused(
        "unknown-param",
        &text,
        &[],
        &[
            "s.ron:7:38: Mha has no parameter `head`",
            "Did you mean `heads`?",
        ],
    );
}

#[test]
fn ill_typed_parameter_is_named_with_its_place() {
    let text = sweep_text("(attention: [Mha(heads: \"two\")], ffn: [Gelu])");
    refused(
        "ill-typed",
        &text,
        &[],
        &["s.ron:7:35: Mha.heads: Expected integer"],
    );
}

#[test]
fn invalid_combination_names_the_cell() {
    let text = sweep_text("(attention: [Mha(heads: [2, 3])], ffn: [Gelu])");
    refused(
        "combination",
        &text,
        &[],
        &[
            "cell 1 (attention.heads=3)",
            "heads = 3 does not divide d_model = 16",
        ],
    );
}

#[test]
fn missing_data_file_names_the_resolved_path() {
    let text = sweep_text(GRID).replace(&shakespeare(), "no/such.txt");
    let out_dir = std::env::temp_dir().join(format!("sweep-cli-{}-missing", std::process::id()));
    refused(
        "missing",
        &text,
        &[],
        &[
            "data.path: `no/such.txt`: no such file",
            &format!("{}", out_dir.join("no/such.txt").display()),
        ],
    );
}

#[test]
fn empty_axis_says_so() {
    let text = sweep_text("(attention: [Mha(heads: 2)], ffn: [])");
    refused("empty-axis", &text, &[], &["s.ron:7:45: grid.ffn is empty"]);
}

#[test]
fn zero_steps_says_so() {
    let text = sweep_text(GRID).replace("steps: 6,", "steps: 0,");
    refused(
        "zero-steps",
        &text,
        &[],
        &["s.ron:5:20: train.steps: must be at least 1, got 0"],
    );
}

#[test]
fn non_positive_lr_says_so() {
    let text = sweep_text(
        "(attention: [Mha(heads: 2)], ffn: [Gelu], optimizer: [AdamW(lr: [1e-3, -1e-3])])",
    );
    refused(
        "lr",
        &text,
        &[],
        &["AdamW.lr: lr must be positive, got -0.001"],
    );
}

#[test]
fn bad_overrides_name_the_flag() {
    let text = sweep_text(GRID);
    refused(
        "set-zero",
        &text,
        &["--set", "train.steps=0"],
        &["--set train.steps=0: train.steps: must be at least 1"],
    );
    refused(
        "set-syntax",
        &text,
        &["--set", "seeds=[0"],
        &["--set seeds=[0: `[0` is not a RON value"],
    );
    refused(
        "set-type",
        &text,
        &["--set", "train.batch=\"x\""],
        &["--set train.batch=\"x\": "],
    );
}

#[test]
fn non_utf8_and_empty_files_are_refused() {
    refused(
        "empty-file",
        "  \n",
        &[],
        &["s.ron: the sweep file is empty"],
    );
    let dir = workdir("non-utf8");
    std::fs::write(dir.join("s.ron"), b"Sweep(\n  name: \"\xff\"").unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("s.ron:2:10: the sweep file is not valid UTF-8"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn dry_run_prints_the_trials_and_writes_nothing() {
    let dir = workdir("dry");
    std::fs::write(dir.join("s.ron"), sweep_text(GRID)).unwrap();
    let out = sweep(
        &dir,
        &["run", "s.ron", "--dry-run", "--set", "seeds=[3, 4]"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4 trials = 2 cells x 2 seeds"), "{stdout}");
    assert_eq!(stdout.matches("ffn=Gelu").count(), 2, "{stdout}");
    assert!(!dir.join("sweep.db").exists());
}

#[test]
fn list_shows_components_with_their_defaults() {
    let out = sweep(Path::new("."), &["list", "optimizer"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("AdamW"), "{stdout}");
    assert!(stdout.contains("lr: 0.001"), "{stdout}");
    assert!(!stdout.contains("Mha"), "only the optimizer slot: {stdout}");
    let out = sweep(Path::new("."), &["list", "attn"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A (val/loss, val/bpb) pair of one evaluation; `filter` narrows it (e.g. `AND l.step = 6`).
fn val_loss_and_bpb(db: &rusqlite::Connection, filter: &str) -> (f64, f64) {
    db.query_row(
        &format!(
            "SELECT l.value, b.value FROM metrics l JOIN metrics b
             ON b.trial_id = l.trial_id AND b.step = l.step
             WHERE l.name = 'val/loss' AND b.name = 'val/bpb' {filter} LIMIT 1"
        ),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

#[test]
fn a_tiny_sweep_writes_the_expected_rows_and_a_rerun_skips_them() {
    let dir = workdir("tiny");
    std::fs::write(dir.join("s.ron"), sweep_text(GRID)).unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("best val/bpb"), "{stdout}");

    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM sweeps WHERE name = 'tiny'"),
        1
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials WHERE status = 'done'"),
        2
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM trials WHERE n_params > 0 AND device = 'cpu'"
        ),
        2
    );
    // Per trial: train/loss, lr, grad_norm, tokens_per_s and train/spikes at steps 3 and 6
    // (log_every 3), val/loss and val/bpb at steps 3 and 6 (eval_every 3): 14 rows. With
    // every evaluation, the amplification metrics of the one block (two sublayers):
    // amax/fwd, amax/bwd, stream_rms/max, and per sublayer four gains and stream_rms:
    // 2 x 13 rows more. The plain residual has one stream: no streams/* metrics.
    assert_eq!(count(&db, "SELECT COUNT(*) FROM metrics"), 2 * (14 + 26));
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM metrics WHERE name = 'train/spikes' AND value = 0"
        ),
        2 * 2,
        "six falling steps are no spikes"
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM metrics WHERE name LIKE 'amax/%' AND value = 1.0"
        ),
        2 * 2 * 10,
        "the plain residual's gains are 1"
    );
    for name in [
        "train/loss",
        "val/loss",
        "val/bpb",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ] {
        let n = count(
            &db,
            &format!("SELECT COUNT(*) FROM metrics WHERE name = '{name}' AND step IN (3, 6)"),
        );
        assert_eq!(n, 4, "{name}");
    }
    // Bytes tokenizer: bits per byte = loss / ln 2, exactly.
    let (loss, bpb) = val_loss_and_bpb(&db, "");
    assert!((bpb - loss / std::f64::consts::LN_2).abs() < 1e-9);
    assert!(bpb > 0.0 && bpb < 9.0, "{bpb}");
    let config: String = db
        .query_row("SELECT config FROM trials LIMIT 1", [], |r| r.get(0))
        .unwrap();
    assert!(config.contains("ffn: "), "{config}");

    let again = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(again.status.code(), Some(0));
    assert!(
        stderr(&again).contains("0 to run (2 finished before)"),
        "{}",
        stderr(&again)
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM metrics"), 2 * (14 + 26));
}

#[test]
fn a_diverging_trial_is_recorded_and_the_sweep_goes_on() {
    let dir = workdir("diverge");
    let grid = "(attention: [Mha(heads: 2)], ffn: [Gelu], \
                optimizer: [AdamW(lr: [1e-3, 1e30], weight_decay: 0.0)])";
    std::fs::write(dir.join("s.ron"), sweep_text(grid)).unwrap();
    let out = sweep(&dir, &["run", "s.ron", "--db", "out.db"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "diverged is not failed: {}",
        stderr(&out)
    );
    let db = rusqlite::Connection::open(dir.join("out.db")).unwrap();
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials WHERE status = 'done'"),
        1
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials WHERE status = 'diverged' AND error LIKE 'diverged at step%'"),
        1
    );
}

#[test]
fn gpt2_token_shards_train_and_bpb_counts_bytes_not_tokens() {
    let dir = workdir("shards");
    let text = std::fs::read_to_string(shakespeare()).unwrap();
    let tokens = runner::data::Tokenizer::Gpt2.encode(&text[..40_000]);
    let tokens: Vec<u16> = tokens.into_iter().map(|t| t as u16).collect();
    let (train, val) = tokens.split_at(tokens.len() * 9 / 10);
    runner::data::write_shard(&dir.join("tiny_train_000.bin"), train).unwrap();
    runner::data::write_shard(&dir.join("tiny_val_000.bin"), val).unwrap();
    let sweep_file = sweep_text("(attention: [Mha(heads: 2)], ffn: [Gelu])").replace(
        &format!("Text(path: {:?}, val_fraction: 0.05)", shakespeare()),
        "Shards(train: \"tiny_train_*.bin\", val: \"tiny_val_000.bin\")",
    );
    std::fs::write(dir.join("s.ron"), sweep_file).unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    let (loss, bpb) = val_loss_and_bpb(&db, "AND l.step = 6");
    // An untrained model over 50304 rows scores about ln(50304) = 10.8 nats per token; a GPT-2
    // token of this text is several bytes, so bits per byte is well below loss / ln 2.
    assert!(loss > 9.0 && loss < 11.5, "{loss}");
    let bytes_per_token = loss / std::f64::consts::LN_2 / bpb;
    assert!(
        bytes_per_token > 2.5 && bytes_per_token < 6.0,
        "{bytes_per_token}"
    );
}

#[test]
fn report_collapses_seeds_compares_with_a_baseline_and_draws_every_chart() {
    let dir = workdir("report");
    let text = sweep_text(GRID).replace("seeds: [0],", "seeds: [0, 1],");
    std::fs::write(dir.join("s.ron"), text).unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = sweep(
        &dir,
        &[
            "report",
            "--db",
            "sweep.db",
            "--format",
            "json",
            "--baseline",
            "ffn=Gelu",
            "--plot",
            "all",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["sweep"], "tiny");
    assert_eq!(json["columns"], serde_json::json!(["ffn"]));
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    // Each row's mean is the mean of its seeds' last val/bpb, read here with SQL.
    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    for row in rows {
        let ffn = row["config"]["ffn"].as_str().unwrap();
        let mean: f64 = db
            .query_row(
                "SELECT avg(m.value) FROM metrics m JOIN trials t ON t.id = m.trial_id
                 WHERE m.name = 'val/bpb' AND m.step = 6 AND t.config LIKE ?1",
                [format!("%ffn: {ffn}%")],
                |r| r.get(0),
            )
            .unwrap();
        let got = row["val_bpb"]["mean"].as_f64().unwrap();
        assert!((got - mean).abs() < 1e-12, "{ffn}: {got} vs {mean}");
        assert_eq!(row["val_bpb"]["n"], 2);
        assert_eq!(row["seeds"]["done"], 2);
        if ffn == "Gelu" {
            assert_eq!(row["vs_baseline"], "baseline");
        } else {
            assert!(row["vs_baseline"]["p"].as_f64().is_some(), "{row}");
        }
    }
    let err = stderr(&out);
    for kind in ["bpb", "loss", "amplification"] {
        for ext in ["png", "svg"] {
            // Beside the DB, printed as the DB path was given (relative here).
            let name = format!("tiny-{kind}.{ext}");
            assert!(err.contains(&format!("./{name}")), "{err}");
            let path = dir.join(name);
            let bytes = std::fs::read(&path).unwrap();
            let magic: &[u8] = if ext == "png" {
                b"\x89PNG\r\n\x1a\n"
            } else {
                b"<svg"
            };
            assert!(bytes.starts_with(magic), "{}", path.display());
        }
    }

    // The default table names the varying column and both configurations.
    let out = sweep(&dir, &["report", "--db", "sweep.db"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("sweep tiny: 4 trials in 2 configurations (4 done)"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("SwiGlu"))
            && table.lines().any(|l| l.starts_with("Gelu"))
    );
}

/// A results DB made by hand: one done and one running trial of sweep `res`.
fn hand_made_db(dir: &Path, metrics: bool) -> PathBuf {
    let path = dir.join("r.db");
    let mut s = results::Store::open(&path).unwrap();
    let sweep = s.begin_sweep("res", "res.ron", "Sweep()", "test").unwrap();
    for (i, (id, ffn)) in [("a", "Gelu"), ("b", "SwiGlu")].iter().enumerate() {
        let config = format!("(seed: 0, attention: Mha(heads:2), ffn: {ffn}, residual: PreNorm)");
        let t = results::NewTrial {
            id,
            seed: 0,
            label: "",
            config: &config,
        };
        s.register_trial(sweep, i, &t).unwrap();
        s.start_trial(id, "cpu", "test", None).unwrap();
        if metrics {
            s.record(id, 10, "val/bpb", 3.0 + i as f64).unwrap();
            s.record(id, 10, "val/loss", 2.0).unwrap();
        }
    }
    s.finish_trial("a", results::Status::Done, None, 1.0)
        .unwrap();
    s.flush().unwrap();
    path
}

#[test]
fn report_reads_while_a_sweep_holds_the_write_lock() {
    let dir = workdir("report-live");
    let path = hand_made_db(&dir, true);
    // A writer in the middle of a transaction, as `sweep run` is while it flushes metrics.
    let writer = rusqlite::Connection::open(&path).unwrap();
    writer
        .execute_batch("BEGIN IMMEDIATE; INSERT INTO metrics VALUES ('b', 20, 'val/bpb', 1.0);")
        .unwrap();
    let out = sweep(&dir, &["report", "--db", "r.db"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("(1 done, 1 running)"), "{table}");
    let swiglu = table.lines().find(|l| l.starts_with("SwiGlu")).unwrap();
    assert!(
        swiglu.contains("1 running") && swiglu.contains(" - "),
        "{swiglu}"
    );
    assert!(table.contains("Running seeds are counted"), "{table}");
    writer.execute_batch("COMMIT").unwrap();
}

#[test]
fn report_refuses_what_it_cannot_answer_with_exit_2() {
    let dir = workdir("report-errors");
    let report = |args: &[&str], needles: &[&str]| {
        let mut all = vec!["report"];
        all.extend_from_slice(args);
        let out = sweep(&dir, &all);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed a report");
        for n in needles {
            assert!(err.contains(n), "{args:?}: `{n}` not in: {err}");
        }
    };
    report(&["--db", "none.db"], &["none.db: no such results database"]);
    assert!(!dir.join("none.db").exists(), "a database was created");
    std::fs::write(dir.join("notes.txt"), "not a database").unwrap();
    report(
        &["--db", "notes.txt"],
        &["notes.txt is not a sweep results database"],
    );
    drop(results::Store::open(&dir.join("empty.db")).unwrap());
    report(&["--db", "empty.db"], &["holds no sweeps yet"]);

    hand_made_db(&dir, false);
    report(
        &["--db", "r.db", "--sweep", "ress"],
        &["--sweep ress", "its sweeps: res", "Did you mean `res`?"],
    );
    report(
        &["--db", "r.db", "--baseline", "ffn=Relu2"],
        &["no configuration has ffn=Relu2; ffn takes: Gelu, SwiGlu"],
    );
    report(
        &["--db", "r.db", "--baseline", "ffn"],
        &["`ffn` is not KEY=VALUE"],
    );
    report(&["--db", "r.db", "--format", "xml"], &["xml"]);
    for kind in ["bpb", "loss", "amplification"] {
        report(
            &["--db", "r.db", "--plot", kind],
            &[&format!("--plot {kind}: no ")],
        );
    }
    let written: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".png") || n.ends_with(".svg"))
        .collect();
    assert!(written.is_empty(), "{written:?}");
}

#[test]
fn a_device_list_runs_one_trial_per_device_at_a_time() {
    let dir = workdir("two-devices");
    let text = sweep_text(GRID).replace("seeds: [0],", "seeds: [0, 1],");
    std::fs::write(dir.join("s.ron"), text).unwrap();
    let out = sweep(&dir, &["run", "s.ron", "--device", "cpu,cpu"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM trials WHERE status = 'done' AND device = 'cpu'"
        ),
        4
    );
    // Both devices take a trial before the first one ends: the second trial's start line
    // comes before any result line.
    let second = err.find("cpu 2/4").expect("the second trial starts");
    let first_result = err.find("] done").expect("a trial ends");
    assert!(second < first_result, "{err}");
    assert_eq!(err.matches("] done").count(), 4, "{err}");
}

/// `sweep run` of `grid` on two CPU ranks per trial with `env` set: its output, and the DB.
fn on_two_ranks(
    name: &str,
    grid: &str,
    env: &[(&str, &str)],
) -> (std::process::Output, rusqlite::Connection) {
    let dir = workdir(name);
    std::fs::write(dir.join("s.ron"), sweep_text(grid)).unwrap();
    let args = [
        "run",
        "s.ron",
        "--device",
        "cpu,cpu",
        "--gpus-per-trial",
        "2",
    ];
    let out = sweep_env(&dir, &args, env);
    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    (out, db)
}

const ONE_CELL: &str = "(attention: [Mha(heads: 2)], ffn: [Gelu])";

fn errors(db: &rusqlite::Connection) -> Vec<(String, Option<String>)> {
    let mut q = db
        .prepare("SELECT status, error FROM trials ORDER BY id")
        .unwrap();
    q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn data_parallel_trials_run_two_at_once_on_two_ranks_each_and_rank_0_records() {
    let dir = workdir("dp-two-by-two");
    std::fs::write(dir.join("s.ron"), sweep_text(GRID)).unwrap();
    let args = [
        "run",
        "s.ron",
        "--device",
        "cpu,cpu,cpu,cpu",
        "--gpus-per-trial",
        "2",
    ];
    let out = sweep(&dir, &args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    let sql = "SELECT COUNT(*) FROM trials WHERE status = 'done' \
               AND device = 'cpu (2 ranks: cpu,cpu)' AND config LIKE '%gpus_per_trial:2%'";
    assert_eq!(count(&db, sql), 2, "{err}");
    // 6 steps logged every 3: two train/loss rows per trial, not one per rank.
    let sql = "SELECT COUNT(*) FROM metrics WHERE name = 'train/loss'";
    assert_eq!(count(&db, sql), 4);
    // Both slots took a trial before the first ended.
    let second = err.find("cpu,cpu 2/2").expect("the second trial starts");
    assert!(second < err.find("] done").expect("a trial ends"), "{err}");
}

#[test]
fn a_failing_rank_fails_its_trial_with_the_reason_and_the_sweep_goes_on() {
    let fault = [("SWEEP_INJECT_FAULT", "1:2:panic")];
    let (out, db) = on_two_ranks("dp-rank-panics", GRID, &fault);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let rows = errors(&db);
    assert_eq!(rows.len(), 2, "{err}");
    for (status, error) in rows {
        assert_eq!(status, "failed");
        let error = error.unwrap();
        assert!(
            error.contains("rank 1 (cpu): panic: injected panic at step 2"),
            "{error}"
        );
    }
}

#[test]
fn a_hung_rank_times_out_instead_of_hanging_the_sweep() {
    let env = [
        ("SWEEP_INJECT_FAULT", "1:2:hang"),
        ("SWEEP_COLLECTIVE_TIMEOUT_S", "1"),
    ];
    let started = std::time::Instant::now();
    let (out, db) = on_two_ranks("dp-rank-hangs", ONE_CELL, &env);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(started.elapsed().as_secs() < 60, "{err}");
    let (status, error) = errors(&db).remove(0);
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(
        error.contains("rank 0 waited 1 s at a collective") && error.contains("were stopped"),
        "{error}"
    );
}

#[test]
fn a_nan_on_one_rank_diverges_the_whole_trial() {
    let fault = [("SWEEP_INJECT_FAULT", "1:2:nan")];
    let (out, db) = on_two_ranks("dp-rank-nan", ONE_CELL, &fault);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        errors(&db),
        vec![(
            "diverged".to_string(),
            Some("diverged at step 2: train/loss is NaN".to_string())
        )]
    );
}

#[test]
fn ranks_that_do_not_fit_the_device_list_are_refused() {
    refused(
        "dp-one-device",
        &sweep_text(GRID),
        &["--gpus-per-trial", "2"],
        &["--device cpu: 1 device(s) do not split into groups of train.gpus_per_trial = 2"],
    );
    refused(
        "dp-zero",
        &sweep_text(GRID).replace("log_every: 3)", "log_every: 3, grad_accum: 0)"),
        &[],
        &["s.ron:5:", "train.grad_accum: must be at least 1, got 0"],
    );
}

fn wikitext(split: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../shared/data/wikitext-2/{split}.txt"))
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn held_out_sets_are_evaluated_at_every_evaluation_in_bits_per_byte() {
    let dir = workdir("evals");
    let text = sweep_text("(attention: [Mha(heads: 2)], ffn: [Gelu])").replace(
        "    train:",
        &format!(
            "    evals: [Text(name: \"wikitext2\", path: {:?}), Text(name: \"wiki-valid\", \
             path: [{:?}], tokenizer: Bytes)],\n    train:",
            wikitext("test"),
            wikitext("valid")
        ),
    );
    std::fs::write(dir.join("s.ron"), &text).unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    let config: String = db
        .query_row("SELECT config FROM trials", [], |r| r.get(0))
        .unwrap();
    assert!(
        config.contains("evals: [Text(name:\"wikitext2\""),
        "{config}"
    );
    for name in ["wikitext2", "wiki-valid"] {
        let rows = |metric: &str| -> Vec<(i64, f64)> {
            let mut stmt = db
                .prepare("SELECT step, value FROM metrics WHERE name = ?1 ORDER BY step")
                .unwrap();
            stmt.query_map([format!("eval/{name}/{metric}")], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        };
        let (loss, bpb) = (rows("loss"), rows("bpb"));
        // Every evaluation (steps 3 and 6); with byte tokens BPB is the loss over ln 2.
        assert_eq!(
            loss.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![3, 6],
            "{name}"
        );
        for ((s, l), (_, b)) in loss.iter().zip(&bpb) {
            assert!(l.is_finite() && *l > 0.0, "{name} at {s}: {l}");
            assert!(
                (b - l / std::f64::consts::LN_2).abs() < 1e-9,
                "{name} at {s}: {b} vs {l}"
            );
        }
    }
    // The report carries each set's final BPB (one seed: its value) in the table and CSV.
    let report = sweep(&dir, &["report", "--sweep", "tiny"]);
    let table = String::from_utf8_lossy(&report.stdout).into_owned();
    assert!(
        table.contains("wiki-valid bpb") && table.contains("wikitext2 bpb"),
        "{table}"
    );
    let csv = sweep(&dir, &["report", "--sweep", "tiny", "--format", "csv"]);
    let csv = String::from_utf8_lossy(&csv.stdout).into_owned();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header
        .iter()
        .position(|h| *h == "eval_wikitext2_bpb")
        .expect("the column");
    let value: f64 = lines
        .next()
        .unwrap()
        .split(',')
        .nth(col)
        .unwrap()
        .parse()
        .unwrap();
    let last: f64 = db
        .query_row(
            "SELECT value FROM metrics WHERE name = 'eval/wikitext2/bpb' AND step = 6",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!((value - last).abs() < 1e-9, "{value} vs {last}");

    // Without evals the same cell keeps the id it always had.
    std::fs::write(
        dir.join("plain.ron"),
        sweep_text("(attention: [Mha(heads: 2)], ffn: [Gelu])"),
    )
    .unwrap();
    let plain = sweep(&dir, &["run", "plain.ron", "--dry-run"]);
    let with = sweep(&dir, &["run", "s.ron", "--dry-run"]);
    let id = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .filter(|w| w.len() == 16)
                    .map(String::from)
            })
            .unwrap()
    };
    assert_ne!(id(&plain), id(&with));
}

#[test]
fn bad_evaluation_sets_are_refused_with_their_place() {
    let with = |evals: &str| {
        sweep_text(GRID).replace("    train:", &format!("    evals: [{evals}],\n    train:"))
    };
    let wt = wikitext("test");
    for (name, evals, needle) in [
        (
            "eval-name",
            format!("Text(name: \"Wiki Text\", path: {wt:?})"),
            "evals: `Wiki Text`: a name is lower-case letters",
        ),
        (
            "eval-twice",
            format!("Text(name: \"w\", path: {wt:?}), Text(name: \"w\", path: {wt:?})"),
            "evals: `w`: is named twice",
        ),
        (
            "eval-tokenizer",
            format!("Text(name: \"w\", path: {wt:?}, tokenizer: Gpt2)"),
            "evals: `w`: tokenizer Gpt2: an evaluation set is read with the trial's tokenizer (Bytes",
        ),
        (
            "eval-missing",
            "Text(name: \"w\", path: \"no-such.txt\")".to_string(),
            "evals: `w`: path: `no-such.txt`: no such file",
        ),
    ] {
        refused(name, &with(&evals), &[], &["s.ron:", needle]);
    }
}

#[test]
fn prepare_tokenizes_once_and_every_later_run_maps_the_cache() {
    let dir = workdir("prepare");
    let cache = dir.join("cache");
    let cache_env = cache.display().to_string();
    let env = [("SWEEP_CACHE", cache_env.as_str())];
    let text = sweep_text(GRID).replace(
        "val_fraction: 0.05)",
        "val_fraction: 0.05, tokenizer: Gpt2)",
    );
    std::fs::write(dir.join("s.ron"), text).unwrap();
    let first = sweep_env(&dir, &["prepare", "s.ron"], &env);
    let out = String::from_utf8_lossy(&first.stdout).into_owned();
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert!(
        out.contains("input.txt: 338025 Gpt2 tokens, tokenized in"),
        "{out}"
    );
    let again = sweep_env(&dir, &["prepare", "s.ron"], &env);
    let out = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(
        out.contains("input.txt: 338025 Gpt2 tokens, cached already"),
        "{out}"
    );
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().collect();
    assert_eq!(files.len(), 1);

    // A run trains from the cache; a damaged cache is rebuilt, not trusted.
    let run = sweep_env(&dir, &["run", "s.ron"], &env);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert!(!stderr(&run).contains("token cache"), "{}", stderr(&run));
    let path = files[0].path();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[2000] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let rebuilt = sweep_env(&dir, &["prepare", "s.ron"], &env);
    let out = String::from_utf8_lossy(&rebuilt.stdout).into_owned();
    assert!(
        out.contains("the cached copy was not valid: its tokens do not match their checksum"),
        "{out}"
    );
    let again = sweep_env(&dir, &["prepare", "s.ron"], &env);
    assert!(String::from_utf8_lossy(&again.stdout).contains("cached already"));
}

#[test]
fn a_json_lines_corpus_trains_from_its_text_field() {
    let dir = workdir("jsonl");
    // Shakespeare's speeches as documents of a JSON-lines export, with another field beside.
    let text = std::fs::read_to_string(shakespeare()).unwrap();
    let lines: String = text
        .split("\n\n")
        .enumerate()
        .map(|(i, doc)| format!("{}\n", serde_json::json!({"id": i, "content": doc})))
        .collect();
    std::fs::write(dir.join("plays.jsonl"), lines).unwrap();
    let spec = sweep_text(GRID).replace(
        &format!("data: Text(path: {:?}, val_fraction: 0.05)", shakespeare()),
        "data: Jsonl(path: \"plays.jsonl\", field: \"content\", tokenizer: Bytes, val_fraction: 0.05)",
    );
    assert!(spec.contains("Jsonl("), "{spec}");
    std::fs::write(dir.join("s.ron"), &spec).unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM trials WHERE status = 'done'"),
        2
    );

    // The wrong field is refused before anything is trained, naming the file and line.
    std::fs::write(
        dir.join("bad.ron"),
        spec.replace("field: \"content\"", "field: \"text\""),
    )
    .unwrap();
    let bad = sweep(&dir, &["run", "bad.ron", "--db", "bad.db"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("plays.jsonl:1: no field `text`"),
        "{}",
        stderr(&bad)
    );
    assert!(!dir.join("bad.db").exists());
}

/// Benchmark files in `dir` under the tasks' own names (ArcEasy, WinoGrande) and one named
/// in the sweep file (LAMBADA).
fn benchmark_files(dir: &Path) {
    std::fs::write(
        dir.join("arc_easy.jsonl"),
        "{\"query\": \"Question: What do bees make?\", \"choices\": [\"honey\", \"iron\"], \"gold\": 0}\n\
         {\"query\": \"Question: What is cold?\", \"choices\": [\"fire\", \"ice\", \"sun\"], \"gold\": 1}\n\
         \n\
         {\"query\": \"Question: Who rules?\", \"choices\": [\"the king\", \"a fish\"], \"gold\": 0}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("winogrande.jsonl"),
        "{\"context_options\": [\"The lord thanked the page so the lord\", \"The lord thanked the page so the page\"], \"continuation\": \"smiled.\", \"gold\": 1}\n\
         {\"context_options\": [\"Romeo loved Juliet so Romeo\", \"Romeo loved Juliet so Juliet\"], \"continuation\": \"sighed.\", \"gold\": 0}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("lam.jsonl"),
        "{\"context\": \"To be or not to\", \"continuation\": \"be\"}\n\
         {\"context\": \"My kingdom for a\", \"continuation\": \"horse\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("copa.jsonl"),
        "{\"query\": \"The night fell, therefore\", \"choices\": [\"the sky grew dark.\", \"the sun rose.\"], \"gold\": 0}\n",
    )
    .unwrap();
}

fn metric_rows(db: &rusqlite::Connection, name: &str) -> Vec<(String, i64, f64)> {
    let mut stmt = db
        .prepare("SELECT trial_id, step, value FROM metrics WHERE name = ?1 ORDER BY trial_id")
        .unwrap();
    stmt.query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn benchmarks_are_scored_at_the_end_and_sweep_eval_scores_saved_weights_alike() {
    let dir = workdir("benchmarks");
    benchmark_files(&dir);
    let text = sweep_text(GRID).replace(
        "    train:",
        "    benchmark_dir: \".\",\n    benchmarks: [ArcEasy, WinoGrande(limit: 2), Lambada(path: \"lam.jsonl\")],\n    train:",
    );
    std::fs::write(dir.join("s.ron"), &text).unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    let config: String = db
        .query_row("SELECT config FROM trials LIMIT 1", [], |r| r.get(0))
        .unwrap();
    assert!(config.contains("benchmarks: [(task:ArcEasy"), "{config}");
    // Two trials, each scored once, at its last step (6), on every item.
    let items = |task: &str| metric_rows(&db, &format!("bench/{task}/items"));
    for (task, n) in [("arc_easy", 3.0), ("winogrande", 2.0), ("lambada", 2.0)] {
        let rows = items(task);
        assert_eq!(rows.len(), 2, "{task}");
        assert!(
            rows.iter().all(|r| r.1 == 6 && r.2 == n),
            "{task}: {rows:?}"
        );
    }
    // An accuracy over 3 items is a multiple of 1/3; WinoGrande has no acc_norm.
    for (_, _, v) in metric_rows(&db, "bench/arc_easy/acc_norm") {
        assert!(((v * 3.0) - (v * 3.0).round()).abs() < 1e-9, "{v}");
    }
    assert!(metric_rows(&db, "bench/winogrande/acc_norm").is_empty());
    assert!(metric_rows(&db, "bench/lambada/ppl")
        .iter()
        .all(|r| r.2 > 1.0));

    // Scored again from final.safetensors, the numbers are the same: the saved weights are
    // the trained ones, and scoring is deterministic.
    let before = metric_rows(&db, "bench/arc_easy/acc");
    let eval = sweep(
        &dir,
        &[
            "eval",
            "--benchmarks",
            "[ArcEasy, Copa(path: \"copa.jsonl\")]",
            "--benchmark-dir",
            ".",
        ],
    );
    let printed = String::from_utf8_lossy(&eval.stdout).into_owned();
    assert_eq!(eval.status.code(), Some(0), "{}{printed}", stderr(&eval));
    assert!(printed.contains("2 trial(s) scored, 0 failed"), "{printed}");
    assert_eq!(metric_rows(&db, "bench/arc_easy/acc"), before);
    let copa = metric_rows(&db, "bench/copa/acc");
    assert_eq!(copa.len(), 2);
    assert!(
        copa.iter().all(|r| r.1 == 6 && (r.2 == 0.0 || r.2 == 1.0)),
        "{copa:?}"
    );

    // The report: benchmark columns, sorting by one, the Goedel layout, the chart.
    let table = sweep(&dir, &["report", "--metric", "bench/arc_easy/acc_norm"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("arc_easy acc_norm") && table.contains("winogrande acc"),
        "{table}"
    );
    assert!(
        table.contains("Rows sorted by bench/arc_easy/acc_norm"),
        "{table}"
    );
    let goedel = sweep(
        &dir,
        &["report", "--format", "goedel", "--baseline", "ffn=Gelu"],
    );
    let goedel = String::from_utf8_lossy(&goedel.stdout).into_owned();
    assert!(
        goedel.contains("| metric | ") && goedel.contains("| copa acc | "),
        "{goedel}"
    );
    let plot = sweep(&dir, &["report", "--plot", "benchmarks"]);
    assert_eq!(plot.status.code(), Some(0), "{}", stderr(&plot));
    assert!(dir.join("tiny-benchmarks.png").exists());
    let bad = sweep(&dir, &["report", "--metric", "bench/hellaswag/acc"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("bench/arc_easy/acc_norm"),
        "{}",
        stderr(&bad)
    );

    // Damaged weights are not scored.
    let ckpt = std::fs::read_dir(dir.join("sweep.checkpoints"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    std::fs::write(ckpt.path().join("final.safetensors"), b"not weights").unwrap();
    let eval = sweep(
        &dir,
        &["eval", "--benchmarks", "[Copa(path: \"copa.jsonl\")]"],
    );
    let printed = String::from_utf8_lossy(&eval.stdout).into_owned();
    assert_eq!(eval.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains("FAILED") && printed.contains("failed verification"),
        "{printed}"
    );
}

#[test]
fn bad_benchmarks_are_refused_with_their_place() {
    let dir = workdir("benchmark-files");
    benchmark_files(&dir);
    let d = dir.display().to_string();
    let with = |list: &str| {
        sweep_text(GRID).replace(
            "    train:",
            &format!("    benchmark_dir: {d:?},\n    benchmarks: [{list}],\n    train:"),
        )
    };
    std::fs::write(dir.join("broken.jsonl"), "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\n{\"query\": \"q\", \"gold\": 0}\n").unwrap();
    let broken = dir.join("broken.jsonl").display().to_string();
    for (name, text, needle) in [
        (
            "bench-unknown",
            with("Hellaswag"),
            "unknown benchmark `Hellaswag`; benchmarks: HellaSwag, ArcEasy".to_string(),
        ),
        (
            "bench-nearest",
            with("ArcEasy, Winogrande"),
            "Did you mean `WinoGrande`?".into(),
        ),
        (
            "bench-missing",
            with("Piqa"),
            format!("Piqa: {d}/piqa.jsonl does not exist"),
        ),
        (
            "bench-limit",
            with("ArcEasy(limit: 0)"),
            "ArcEasy.limit must be a whole number of items, at least 1".into(),
        ),
        (
            "bench-param",
            with("ArcEasy(shots: 5)"),
            "ArcEasy has no parameter `shots`; its parameters: path, limit".into(),
        ),
        (
            "bench-twice",
            with("ArcEasy, ArcEasy(limit: 1)"),
            "benchmarks lists ArcEasy twice".into(),
        ),
        (
            "bench-item",
            with(&format!("HellaSwag(path: {broken:?})")),
            format!("{broken}:2: no field `choices`"),
        ),
        (
            "bench-every",
            sweep_text(GRID).replace("log_every: 3)", "log_every: 3, benchmark_every: 2)"),
            "train.benchmark_every: there are no benchmarks to score".into(),
        ),
    ] {
        refused(name, &text, &[], &[needle.as_str()]);
    }
}

/// The names and shapes in a safetensors file's header, and its metadata.
fn safetensors_header(path: &Path) -> (Vec<(String, Vec<u64>)>, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut names: Vec<(String, Vec<u64>)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"].as_array().unwrap();
            (
                k.clone(),
                shape.iter().map(|d| d.as_u64().unwrap()).collect(),
            )
        })
        .collect();
    names.sort();
    (names, header["__metadata__"].clone())
}

#[test]
fn export_writes_a_transformers_directory_and_refuses_what_it_cannot_export() {
    let dir = workdir("export");
    let grid = "[(attention: [Gqa(heads: 2, kv_heads: 1)], ffn: [SwiGlu]), \
                (attention: [GatedGqa(heads: 2, kv_heads: 1)], ffn: [Relu2], \
                 residual: [Mhc(streams: 2)])]";
    std::fs::write(dir.join("s.ron"), sweep_text(grid)).unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    let id_of = |residual: &str| -> String {
        db.query_row(
            "SELECT id FROM trials WHERE config LIKE ?1",
            [format!("%residual: {residual}%")],
            |r| r.get(0),
        )
        .unwrap()
    };
    let (plain, mhc) = (id_of("PreNorm"), id_of("Mhc"));
    let export = |args: &[&str]| {
        let mut all = vec!["export"];
        all.extend_from_slice(args);
        sweep(&dir, &all)
    };

    // PreNorm + Gqa + SwiGlu is Llama: transformers' names and shapes, nothing else.
    let out = export(&["--trial", &plain, "--out", "llama"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let llama = dir.join("llama");
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ] {
        assert!(llama.join(f).exists(), "{f}");
    }
    assert!(!llama.join("modeling_sweep.py").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(llama.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(cfg["head_dim"], 8);
    // SwiGlu's hidden width at d_model 16: round(8/3 x 16 / 8) x 8 = 40.
    assert_eq!(cfg["intermediate_size"], 40);
    assert_eq!(cfg["sweep"]["trial"], plain.as_str());
    let (names, meta) = safetensors_header(&llama.join("model.safetensors"));
    assert_eq!(meta["format"], "pt");
    let l = "model.layers.0";
    let mut want: Vec<(String, Vec<u64>)> = vec![
        ("model.embed_tokens.weight".into(), vec![256, 16]),
        ("model.norm.weight".into(), vec![16]),
        (format!("{l}.input_layernorm.weight"), vec![16]),
        (format!("{l}.post_attention_layernorm.weight"), vec![16]),
        (format!("{l}.self_attn.q_proj.weight"), vec![16, 16]),
        (format!("{l}.self_attn.k_proj.weight"), vec![8, 16]),
        (format!("{l}.self_attn.v_proj.weight"), vec![8, 16]),
        (format!("{l}.self_attn.o_proj.weight"), vec![16, 16]),
        (format!("{l}.mlp.gate_proj.weight"), vec![40, 16]),
        (format!("{l}.mlp.up_proj.weight"), vec![40, 16]),
        (format!("{l}.mlp.down_proj.weight"), vec![16, 40]),
    ];
    want.sort();
    assert_eq!(names, want);
    let card = std::fs::read_to_string(llama.join("README.md")).unwrap();
    assert!(
        card.contains("license: unknown") && card.contains("| val/bpb |"),
        "{card}"
    );

    // The Goedel-style cell ships modeling_sweep.py and keeps sweep's names.
    let out = export(&["--trial", &mhc, "--out", "goedel", "--dtype", "bf16"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let goedel = dir.join("goedel");
    assert!(goedel.join("modeling_sweep.py").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(goedel.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "sweep");
    assert_eq!(cfg["residual"]["kind"], "Mhc");
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let (names, _) = safetensors_header(&goedel.join("model.safetensors"));
    // phi maps the n C = 32 normed state to 2n + n^2 = 8 coefficients.
    assert!(
        names.contains(&("residual.0.phi".into(), vec![32, 8])),
        "{names:?}"
    );
    assert!(names.contains(&("blocks.0.attn.gate.weight".into(), vec![16, 16])));

    // --best picks the lowest final val/bpb.
    let best: String = db
        .query_row(
            "SELECT trial_id FROM metrics WHERE name = 'val/bpb' AND step = 6
             ORDER BY value LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let out = export(&["--best", "--out", "best"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let cfg = std::fs::read_to_string(dir.join("best/config.json")).unwrap();
    assert!(cfg.contains(&best), "{cfg}");

    // Refusals: exit 2, the reason, nothing written.
    let refused = |args: &[&str], needle: &str, out_dir: &str| {
        let out = export(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(!dir.join(out_dir).exists(), "{args:?} wrote {out_dir}");
    };
    refused(
        &["--trial", "0123456789abcdef", "--out", "x"],
        "no such trial",
        "x",
    );
    let out = export(&["--trial", &plain, "--out", "llama"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    db.execute("UPDATE trials SET status = 'failed' WHERE id = ?1", [&mhc])
        .unwrap();
    refused(&["--trial", &mhc, "--out", "y"], "is failed", "y");
    let ckpt = dir.join("sweep.checkpoints").join(&plain);
    std::fs::write(ckpt.join("final.safetensors"), b"not weights").unwrap();
    refused(
        &["--trial", &plain, "--out", "z"],
        "failed verification",
        "z",
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn report_html_is_one_self_contained_page_with_every_chart_and_trial() {
    let dir = workdir("html");
    std::fs::write(dir.join("s.ron"), sweep_text(GRID)).unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // --watch on a finished sweep writes once and returns.
    let out = sweep(
        &dir,
        &[
            "report",
            "--html",
            "out/r.html",
            "--baseline",
            "ffn=SwiGlu",
            "--watch",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let page = std::fs::read_to_string(dir.join("out/r.html")).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    // Nothing is fetched: no external scripts, styles, images or fonts.
    for needle in ["src=", "href=", "@import", "url("] {
        assert!(!page.contains(needle), "the page references {needle}");
    }
    assert!(
        !page.contains("http-equiv=\"refresh\""),
        "a finished sweep's page reloads"
    );
    // The bpb and loss charts inline (no amplification metrics for PreNorm).
    assert!(page.matches("<svg").count() >= 2, "charts inline");
    // The table with its baseline column, every trial with its resolved configuration, the
    // sweep file as run, the code version.
    assert!(page.contains("<table class=\"sortable\">") && page.contains("Δ val/bpb"));
    let db = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    let mut stmt = db.prepare("SELECT id, config FROM trials").unwrap();
    let trials: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(trials.len(), 2);
    for (id, config) in &trials {
        assert!(page.contains(id.as_str()), "{id}");
        let shown = config.trim_end().replace('"', "&quot;");
        assert!(page.contains(&shown), "{id}'s config");
    }
    assert!(page.contains("name: &quot;tiny&quot;"), "the sweep file");
    assert!(page.contains(&format!("by sweep {}", env!("CARGO_PKG_VERSION"))));
}

#[test]
fn memory_searches_are_refused_off_the_gpu_and_on_several_devices() {
    // A CPU does not report running out of memory (the process would be killed), and the
    // search measures one device.
    let dir = workdir("bench-memory-flags");
    std::fs::write(dir.join("s.ron"), sweep_text(GRID)).unwrap();
    for (args, needle) in [
        (
            vec!["bench", "s.ron", "--largest-batch"],
            "--largest-batch measures a GPU's memory: give --device cuda",
        ),
        (
            vec!["bench", "s.ron", "--memory-gib", "79", "--device", "cpu"],
            "--memory-gib measures a GPU's memory",
        ),
        (
            vec!["bench", "s.ron", "--largest-batch", "--device", "cpu,cpu"],
            "--device cpu,cpu: lists 2 device(s) for train.gpus_per_trial = 1",
        ),
    ] {
        let out = sweep(&dir, &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: `{needle}` not in: {err}");
    }
}
