//! A corpus of malformed sweep files and flags: each is refused with exit 2 and a message that
//! names the file (with line and column where the text has one), and the results DB beside it
//! is left exactly as it was.

mod common;

use common::*;

/// (case, text to replace in the valid file, replacement, what the message must say).
const EDITS: &[(&str, &str, &str, &str)] = &[
    (
        "missing comma",
        "seeds: [0],",
        "seeds: [0]",
        "s.ron:4:5: Expected comma",
    ),
    (
        "unclosed grid",
        "ffn: [SwiGlu, Gelu]),",
        "ffn: [SwiGlu, Gelu],",
        "s.ron:8:2: Expected comma",
    ),
    (
        "unknown field",
        "seeds: [0],",
        "sedes: [0],",
        "s.ron:3:5: Unexpected field named `sedes`",
    ),
    (
        "missing name",
        "    name: \"tiny\",\n",
        "",
        "s.ron:7:1: Unexpected missing field named `name`",
    ),
    (
        "empty name",
        "name: \"tiny\"",
        "name: \"\"",
        "s.ron:2:11: name: must not be empty",
    ),
    (
        "no seeds",
        "seeds: [0]",
        "seeds: []",
        "s.ron:3:12: seeds: is empty",
    ),
    (
        "seeds not a list",
        "seeds: [0]",
        "seeds: 0",
        "s.ron:3:11: Expected opening `[`",
    ),
    (
        "negative seed",
        "seeds: [0]",
        "seeds: [-1]",
        "s.ron:3:14: Integer is out of bounds",
    ),
    (
        "zero steps",
        "steps: 6",
        "steps: 0",
        "s.ron:5:20: train.steps: must be at least 1",
    ),
    (
        "zero batch",
        "batch: 2",
        "batch: 0",
        "s.ron:5:30: train.batch: must be at least 1",
    ),
    (
        "zero seq_len",
        "seq_len: 16",
        "seq_len: 0",
        "s.ron:5:42: train.seq_len: must be at least 1",
    ),
    (
        "unknown train field",
        "steps: 6",
        "stepz: 6",
        "s.ron:5:13: Unexpected field named `stepz` in `TrainSpec`",
    ),
    (
        "steps as text",
        "steps: 6",
        "steps: \"6\"",
        "s.ron:5:19: Expected integer",
    ),
    (
        "zero eval_every",
        "eval_every: 3",
        "eval_every: 0",
        "s.ron:5:58: train.eval_every: must be at least 1",
    ),
    (
        "zero eval_batches",
        "eval_batches: 2",
        "eval_batches: 0",
        "s.ron:5:75: train.eval_batches: must be at least 1",
    ),
    (
        "zero log_every",
        "log_every: 3",
        "log_every: 0",
        "s.ron:5:89: train.log_every: must be at least 1",
    ),
    (
        "unknown precision",
        "log_every: 3",
        "log_every: 3, precision: Fp16",
        "s.ron:5:",
    ),
    (
        "negative grad_clip",
        "log_every: 3",
        "log_every: 3, grad_clip: -1.0",
        "s.ron:5:103: train.grad_clip: must be >= 0",
    ),
    (
        "zero d_model",
        "d_model: 16",
        "d_model: 0",
        "s.ron:6:22: model.d_model: must be at least 1",
    ),
    (
        "zero layers",
        "n_layers: 1",
        "n_layers: 0",
        "s.ron:6:36: model.n_layers: must be at least 1",
    ),
    (
        "unknown model field",
        "n_layers: 1",
        "n_layer: 1",
        "s.ron:6:26: Unexpected field named `n_layer` in `ModelSpec`",
    ),
    (
        "missing corpus",
        "input.txt",
        "nothere.txt",
        "s.ron:4:22: data.path:",
    ),
    (
        "unknown tokenizer",
        "val_fraction: 0.05",
        "val_fraction: 0.05, tokenizer: Bpe",
        "Unexpected variant named `Bpe` in enum `Tokenizer`",
    ),
    (
        "val_fraction above 1",
        "val_fraction: 0.05",
        "val_fraction: 1.5",
        "data.val_fraction: must be between 0 and 1",
    ),
    (
        "unknown data kind",
        "data: Text(",
        "data: Csv(",
        "s.ron:4:11: Unexpected variant named `Csv` in enum `DataSpec`",
    ),
    (
        "train split shorter than a window",
        "val_fraction: 0.05",
        "val_fraction: 0.99999",
        "s.ron:4:11: data: the train split has no stretch of seq_len + 1 = 17 tokens",
    ),
    (
        "attention scores beyond memory",
        "seq_len: 16",
        "seq_len: 100000000",
        "s.ron: a trial (ffn=SwiGlu) needs about",
    ),
    (
        "no attention axis",
        "attention: [Mha(heads: 2)], ",
        "",
        "s.ron: grid.attention is missing",
    ),
    (
        "empty ffn axis",
        "ffn: [SwiGlu, Gelu]",
        "ffn: []",
        "s.ron:7:45: grid.ffn is empty",
    ),
    (
        "unknown component",
        "SwiGlu, Gelu",
        "SwiGLU, Gelu",
        "s.ron:7:46: unknown ffn component `SwiGLU`",
    ),
    (
        "unknown parameter",
        "Mha(heads: 2)",
        "Mha(head: 2)",
        "s.ron:7:28: Mha has no parameter `head`",
    ),
    (
        "ill-typed parameter",
        "Mha(heads: 2)",
        "Mha(heads: \"two\")",
        "s.ron:7:35: Mha.heads: Expected integer",
    ),
    (
        "duplicate variant",
        "SwiGlu, Gelu",
        "SwiGlu, SwiGlu",
        "s.ron:7:54: grid.ffn lists",
    ),
    (
        "heads do not divide d_model",
        "Mha(heads: 2)",
        "Mha(heads: 3)",
        "s.ron:7:24: cell 0 (ffn=SwiGlu): attention Mha: heads = 3 does not divide d_model = 16",
    ),
    (
        "negative lr",
        "ffn: [SwiGlu, Gelu]",
        "ffn: [SwiGlu, Gelu], optimizer: [AdamW(lr: -1.0)]",
        "s.ron:7:83: AdamW.lr: lr must be positive",
    ),
    (
        "empty lr list",
        "ffn: [SwiGlu, Gelu]",
        "ffn: [SwiGlu, Gelu], optimizer: [AdamW(lr: [])]",
        "s.ron:7:83: AdamW.lr is an empty list",
    ),
    (
        "empty grid list",
        "grid: (attention: [Mha(heads: 2)], ffn: [SwiGlu, Gelu]),",
        "grid: [],",
        "s.ron:7:11: grid is an empty list",
    ),
    (
        "warmup and cooldown over 1",
        "ffn: [SwiGlu, Gelu]",
        "ffn: [SwiGlu, Gelu], schedule: [Trapezoid(warmup: 0.9, cooldown: 0.5)]",
        "s.ron:7:90: Trapezoid.warmup: warmup + cooldown = 1.4 leaves no room",
    ),
    (
        "zero mHC streams",
        "ffn: [SwiGlu, Gelu]",
        "ffn: [SwiGlu, Gelu], residual: [Mhc(streams: 0)]",
        "s.ron:7:85: Mhc.streams: streams must be at least 1",
    ),
    (
        "trailing text",
        ")\n",
        ") extra\n",
        "s.ron:8:2: Non-whitespace trailing characters",
    ),
    (
        "wrong struct name",
        "Sweep(",
        "Sweeps(",
        "s.ron:1:1: Expected struct `Sweep` but found `Sweeps`",
    ),
    (
        "more memory than the machine",
        "d_model: 16, n_layers: 1",
        "d_model: 65536, n_layers: 64",
        "s.ron: a trial (ffn=SwiGlu) needs about",
    ),
];

/// Whole files that are not sweep files at all.
const FILES: &[(&str, &[u8], &str)] = &[
    ("empty file", b"", "s.ron: the sweep file is empty"),
    (
        "whitespace only",
        b"  \n\t\n",
        "s.ron: the sweep file is empty",
    ),
    (
        "comment only",
        b"// nothing here\n",
        "s.ron:1:16: Expected opening `(` for struct `Sweep`",
    ),
    (
        "not UTF-8",
        b"Sweep(name: \"\xff\xfe\")",
        "s.ron:1:14: the sweep file is not valid UTF-8",
    ),
];

/// Flags that are wrong, with a valid file.
const FLAGS: &[(&str, &[&str], &str)] = &[
    (
        "bad --set path",
        &["--set", "trian.steps=5"],
        "--set trian.steps=5: the sweep file has no `trian`",
    ),
    (
        "bad --set value",
        &["--set", "train.steps=[1,"],
        "--set train.steps=[1,: `[1,` is not a RON value",
    ),
    (
        "unknown device",
        &["--device", "tpu"],
        "--device tpu: unknown device",
    ),
    (
        "GPU listed twice",
        &["--device", "cuda:0,1,0"],
        "--device cuda:0,1,0: cuda:0 is listed twice",
    ),
    (
        "bad device list",
        &["--device", "cpu,gpu"],
        "--device cpu,gpu: unknown device `gpu`",
    ),
    (
        "missing file",
        &["--db", "sweep.db", "nothere.ron"],
        "nothere.ron: cannot read the sweep file",
    ),
];

/// The bytes of a valid DB (a finished tiny sweep) that every case starts from.
fn pristine() -> Vec<u8> {
    let dir = workdir("malformed-pristine");
    std::fs::write(dir.join("s.ron"), sweep_text(GRID)).unwrap();
    let out = sweep(&dir, &["run", "s.ron"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    std::fs::read(dir.join("sweep.db")).unwrap()
}

/// Runs `sweep run` on `file` in a fresh folder holding a copy of the valid DB; expects exit
/// 2, `needle` and the file's name in the message, and the folder unchanged but for `s.ron`.
fn refused(case: &str, file: &[u8], args: &[&str], needle: &str, db: &[u8]) {
    let dir = workdir(&format!("malformed-{}", case.replace(' ', "-")));
    std::fs::write(dir.join("s.ron"), file).unwrap();
    std::fs::write(dir.join("sweep.db"), db).unwrap();
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    if !args.iter().any(|a| a.ends_with(".ron")) {
        all.push("s.ron");
    }
    let out = sweep(&dir, &all);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{case}: {err}");
    assert!(err.starts_with("error: "), "{case}: {err}");
    assert!(err.contains(needle), "{case}: `{needle}` not in: {err}");
    assert_eq!(
        std::fs::read(dir.join("sweep.db")).unwrap(),
        db,
        "{case}: the DB changed"
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["s.ron", "sweep.db"],
        "{case}: something was written"
    );
}

#[test]
fn every_malformed_sweep_exits_2_names_its_place_and_leaves_the_db_alone() {
    let db = pristine();
    let valid = sweep_text(GRID);
    let mut cases = 0;
    for (case, from, to, needle) in EDITS {
        assert!(
            valid.contains(from),
            "{case}: the valid file has no `{from}`"
        );
        let text = valid.replacen(from, to, 1);
        refused(case, text.as_bytes(), &[], needle, &db);
        cases += 1;
    }
    for (case, bytes, needle) in FILES {
        refused(case, bytes, &[], needle, &db);
        cases += 1;
    }
    for (case, args, needle) in FLAGS {
        refused(case, valid.as_bytes(), args, needle, &db);
        cases += 1;
    }
    assert!(cases >= 30, "{cases} cases");
}
