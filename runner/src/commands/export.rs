//! `sweep export --trial ID --out DIR` (or `--best`): a done trial's verified final weights
//! as a Hugging Face model directory that `transformers` loads offline (runner/src/export).
//! The directory is written beside DIR under a temporary name and renamed into place when
//! complete: an export that fails leaves nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use results::{Status, Store, TrialRow};
use serde_json::{json, Value};

use super::recorded;
use crate::data::Dataset;
use crate::error::{exit, InputError};
use crate::export::{self, tokenizer, Layout, ModelInfo, Precision, Record};
use crate::spec;
use crate::train::ValSet;

/// Export a trained trial for Hugging Face transformers.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The results DB.
    #[arg(long, default_value = "sweep.db")]
    pub db: PathBuf,
    /// The trial to export (its id).
    #[arg(long, conflicts_with = "best", required_unless_present = "best")]
    pub trial: Option<String>,
    /// Export the done trial of the sweep with the best final --metric instead.
    #[arg(long)]
    pub best: bool,
    /// The sweep --best chooses from [default: the one run most recently].
    #[arg(long, requires = "best")]
    pub sweep: Option<String>,
    /// The metric --best ranks by: lowest first, accuracies (`.../acc`, `.../acc_norm`)
    /// highest first.
    #[arg(long, default_value = "val/bpb", requires = "best")]
    pub metric: String,
    /// The directory to write; it must not exist yet (or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// The weights' dtype in model.safetensors.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
    /// Also write the trial's validation windows (inputs and targets, u32) and its recorded
    /// final val/loss to this safetensors file, for checking the export elsewhere
    /// (benches/export_check.py).
    #[arg(long, value_name = "FILE")]
    pub val_windows: Option<PathBuf>,
}

pub fn exec(args: Args) -> anyhow::Result<u8> {
    let store = Store::open_existing(&args.db).map_err(|e| InputError::new(e.to_string()))?;
    let (row, sweep_name) = match &args.trial {
        Some(id) => trial_row(&store, &args.db, id)?,
        None => best_row(&store, &args, args.sweep.as_deref())?,
    };
    if row.status != Status::Done {
        return Err(InputError::new(format!(
            "trial {} is {}: only a done trial has final weights to export",
            row.id,
            row.status.as_str()
        ))
        .into());
    }
    let sha = store.weights_sha256(&row.id)?;
    let path = recorded::final_weights(&args.db, &row.id, sha.as_deref()).map_err(|why| {
        InputError::new(format!("trial {} has no weights to export: {why}", row.id))
    })?;
    let tensors: BTreeMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .collect();
    let info = ModelInfo::new(&row.config, &tensors)
        .map_err(|why| InputError::new(format!("trial {}: {why}", row.id)))?;
    let layout = info.layout();
    let record = record_of(&store, &row, &sweep_name)?;
    // Read before anything is written: a failure here leaves no export behind.
    let windows = match &args.val_windows {
        Some(_) => Some(val_windows(&store, &args.db, &row, &record)?),
        None => None,
    };
    let staging = stage(&args.out)?;
    let written = write_export(&staging, &info, layout, args.dtype, &record, &tensors);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if args.out.exists() {
        std::fs::remove_dir(&args.out)
            .with_context(|| format!("replacing the empty {}", args.out.display()))?;
    }
    std::fs::rename(&staging, &args.out)
        .with_context(|| format!("moving the export to {}", args.out.display()))?;
    println!(
        "exported trial {} ({}) to {} as {}",
        row.id,
        if row.label.is_empty() {
            "the only cell"
        } else {
            &row.label
        },
        args.out.display(),
        layout.describe()
    );
    if let (Some(file), Some((tensors, metadata))) = (&args.val_windows, windows) {
        crate::tensor_file::write_with(file, &tensors, &metadata)
            .with_context(|| format!("writing {}", file.display()))?;
        println!("wrote the validation windows to {}", file.display());
    }
    Ok(exit::OK)
}

/// The trial's row and the name of the sweep it was last run in.
fn trial_row(store: &Store, db: &Path, id: &str) -> anyhow::Result<(TrialRow, String)> {
    let missing = || InputError::new(format!("--trial {id}: no such trial in {}", db.display()));
    let (name, ..) = store.recorded_sweep(None, Some(id))?.ok_or_else(missing)?;
    let sweep_id = store.sweep_id(&name)?.ok_or_else(missing)?;
    let row = store
        .trials(sweep_id)?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(missing)?;
    Ok((row, name))
}

/// The done trial with the best last value of `args.metric`.
fn best_row(store: &Store, args: &Args, sweep: Option<&str>) -> anyhow::Result<(TrialRow, String)> {
    let (sweep_id, name) = recorded::pick_sweep(store, &args.db, sweep)?;
    let higher_is_better = args.metric.ends_with("/acc") || args.metric.ends_with("/acc_norm");
    let mut best: Option<(f64, TrialRow)> = None;
    for row in store.trials(sweep_id)? {
        if row.status != Status::Done {
            continue;
        }
        let Some(v) = store
            .metric(&row.id, &args.metric)?
            .last()
            .and_then(|(_, v)| *v)
        else {
            continue;
        };
        let better = match &best {
            None => true,
            Some((b, _)) if higher_is_better => v > *b,
            Some((b, _)) => v < *b,
        };
        if better {
            best = Some((v, row));
        }
    }
    let (v, row) = best.ok_or_else(|| {
        InputError::new(format!(
            "--best: sweep {name} has no done trial that recorded {} (choose another --metric)",
            args.metric
        ))
    })?;
    println!("best by {}: trial {} ({:.4})", args.metric, row.id, v);
    Ok((row, name))
}

/// What the model card shows, from the DB.
fn record_of(store: &Store, row: &TrialRow, sweep: &str) -> anyhow::Result<Record> {
    let mut metrics = Vec::new();
    for name in store.metric_names(&row.id, "")? {
        if let Some(v) = store.metric(&row.id, &name)?.last().and_then(|(_, v)| *v) {
            metrics.push((name, v));
        }
    }
    let (file, code_version) = store
        .conn()
        .query_row(
            "SELECT s.file, t.code_version FROM sweeps s, trials t
             WHERE s.name = ?1 AND t.id = ?2",
            [sweep, row.id.as_str()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
        )
        .context("reading the trial's sweep record")?;
    Ok(Record {
        trial: row.id.clone(),
        sweep: sweep.to_string(),
        sweep_file: file,
        label: row.label.clone(),
        seed: row.seed,
        config: row.config.clone(),
        code_version,
        device: row.device.clone(),
        params: row.n_params,
        params_embedding: row.n_params_embedding,
        tokens: row.tokens,
        wall_s: row.wall_s,
        metrics,
    })
}

/// A fresh temporary directory beside `out`; refuses an `out` that holds anything.
fn stage(out: &Path) -> anyhow::Result<PathBuf> {
    if out.is_file() {
        return Err(InputError::new(format!(
            "--out {}: is a file; name a directory to create",
            out.display()
        ))
        .into());
    }
    if out.is_dir() && std::fs::read_dir(out)?.next().is_some() {
        return Err(InputError::new(format!(
            "--out {}: already exists and is not empty; remove it or choose another directory",
            out.display()
        ))
        .into());
    }
    let name = out
        .file_name()
        .ok_or_else(|| InputError::new(format!("--out {}: not a directory name", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    Ok(staging)
}

fn write_json(dir: &Path, name: &str, v: &Value) -> anyhow::Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(v)? + "\n";
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

fn write_export(
    dir: &Path,
    info: &ModelInfo,
    layout: Layout,
    precision: Precision,
    record: &Record,
    tensors: &BTreeMap<String, Tensor>,
) -> anyhow::Result<()> {
    let provenance = json!({
        "trial": record.trial,
        "sweep": record.sweep,
        "label": record.label,
        "seed": record.seed,
        "code_version": record.code_version,
        "config": record.config,
    });
    write_json(
        dir,
        "config.json",
        &export::config_json(info, layout, precision, provenance),
    )?;
    write_json(
        dir,
        "generation_config.json",
        &export::generation_config(info, layout),
    )?;
    write_json(
        dir,
        "tokenizer.json",
        &tokenizer::tokenizer_json(info.tokenizer),
    )?;
    write_json(
        dir,
        "tokenizer_config.json",
        &tokenizer::tokenizer_config(info.tokenizer, info.seq_len),
    )?;
    let weights = export::weights(info, layout, precision, tensors)?;
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let path = dir.join("model.safetensors");
    crate::tensor_file::write_with(&path, &weights, &metadata)
        .with_context(|| format!("writing {}", path.display()))?;
    if layout == Layout::Sweep {
        std::fs::write(dir.join("modeling_sweep.py"), export::MODELING_PY)
            .context("writing modeling_sweep.py")?;
    }
    let dtype = match precision {
        Precision::F32 => "float32",
        Precision::Bf16 => "bfloat16",
    };
    std::fs::write(
        dir.join("README.md"),
        export::card(record, info, layout, dtype),
    )
    .context("writing README.md")?;
    Ok(())
}

/// The trial's validation subset (the windows its val/loss averages over) and the recorded
/// final val/loss, for a safetensors file: `inputs` and `targets` (N, seq_len) u32.
/// With `sample_text` (metadata) and `sample_ids`: the first SAMPLE_BYTES of the first text
/// file and the trial's tokenizer's ids for it.
type Windows = (BTreeMap<String, Tensor>, BTreeMap<String, String>);

const SAMPLE_BYTES: usize = 64 * 1024;

fn val_windows(
    store: &Store,
    db: &Path,
    row: &TrialRow,
    record: &Record,
) -> anyhow::Result<Windows> {
    let (sweep, generation) = recorded::sweep(store, db, Some(&record.sweep), None)?;
    let trials = spec::salted(sweep.trials.clone(), generation);
    if !trials.iter().any(|t| t.id == row.id) {
        return Err(InputError::new(format!(
            "trial {}: its sweep's recorded file no longer expands to it",
            row.id
        ))
        .into());
    }
    let data = Dataset::load(&sweep.data, &sweep.source, sweep.train.seq_len)?;
    let val = ValSet::new(&data.val, data.tokenizer, &sweep.train, &Device::Cpu)?;
    let (xs, ys): (Vec<Tensor>, Vec<Tensor>) = val.batches().iter().cloned().unzip();
    let mut tensors = BTreeMap::from([
        ("inputs".to_string(), Tensor::cat(&xs, 0)?),
        ("targets".to_string(), Tensor::cat(&ys, 0)?),
    ]);
    let mut metadata = BTreeMap::new();
    // The start of the first text file and the ids the trial's tokenizer gives it: the
    // exported tokenizer must give the same.
    if let Some((file, None)) = sweep.data.text_files(&sweep.source)?.into_iter().next() {
        let text = crate::data::read_utf8(&file).map_err(InputError::new)?;
        let mut end = SAMPLE_BYTES.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let ids = data.tokenizer.encode(&text[..end]);
        let n = ids.len();
        tensors.insert("sample_ids".into(), Tensor::from_vec(ids, n, &Device::Cpu)?);
        metadata.insert("sample_text".to_string(), text[..end].to_string());
    }
    let loss = record
        .metrics
        .iter()
        .find(|(n, _)| n == "val/loss")
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    metadata.insert("trial".to_string(), row.id.clone());
    metadata.insert("val_loss".to_string(), loss);
    Ok((tensors, metadata))
}
