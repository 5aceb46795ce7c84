//! What `sweep eval` and `sweep export` read back of a finished sweep: the sweep rebuilt from
//! the file text its DB recorded, a trial's verified final weights, the model loaded with them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use results::Store;

use crate::checkpoint::Checkpoints;
use crate::error::InputError;
use crate::spec::{self, Source, Sweep};
use crate::train;

/// The sweep named `sweep`, or holding `trial`, or else the one run most recently, rebuilt
/// from its recorded file text, and its record's generation (which salts its trial ids).
pub fn sweep(
    store: &Store,
    db: &Path,
    sweep: Option<&str>,
    trial: Option<&str>,
) -> anyhow::Result<(Sweep, u32)> {
    let Some((name, file, text, generation)) = store.recorded_sweep(sweep, trial)? else {
        let what = match (sweep, trial) {
            (Some(s), _) => format!("no sweep {s}"),
            (_, Some(t)) => format!("no trial {t}"),
            _ => "no sweeps yet".into(),
        };
        return Err(InputError::new(format!("{}: {what}", db.display())).into());
    };
    let source = Source::from_text(Path::new(&file), text);
    let sweep = Sweep::from_source(source).map_err(|e| {
        InputError::new(format!(
            "sweep {name}: its recorded file text no longer reads ({e}); run this where \
             the sweep ran (its paths are relative to {file}), with the sweep version that \
             ran it"
        ))
    })?;
    Ok((sweep, generation))
}

/// The named sweep, or the most recently run one (with a note when the DB holds several).
pub fn pick_sweep(store: &Store, db: &Path, name: Option<&str>) -> anyhow::Result<(i64, String)> {
    let mut stmt = store
        .conn()
        .prepare("SELECT id, name FROM sweeps ORDER BY updated_at DESC, id DESC")?;
    let sweeps: Vec<(i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let names: Vec<&str> = sweeps.iter().map(|(_, n)| n.as_str()).collect();
    if sweeps.is_empty() {
        return Err(InputError::new(format!(
            "{}: the results database holds no sweeps yet; run `sweep run FILE --db {}` first",
            db.display(),
            db.display()
        ))
        .into());
    }
    match name {
        Some(want) => sweeps
            .iter()
            .find(|(_, n)| n == want)
            .cloned()
            .ok_or_else(|| {
                let hint = registry::nearest(want, &names)
                    .map(|s| format!(" Did you mean `{s}`?"))
                    .unwrap_or_default();
                InputError::new(format!(
                    "--sweep {want}: {} holds no such sweep; its sweeps: {}.{hint}",
                    db.display(),
                    names.join(", ")
                ))
                .into()
            }),
        None => {
            if sweeps.len() > 1 {
                eprintln!(
                    "{} holds {} sweeps ({}); using {}, the latest run (choose with --sweep)",
                    db.display(),
                    sweeps.len(),
                    names.join(", "),
                    names[0]
                );
            }
            Ok(sweeps[0].clone())
        }
    }
}

/// The path of `trial`'s final weights, once their SHA-256 matches `sha` (the DB's record);
/// the reason otherwise.
pub fn final_weights(db: &Path, trial: &str, sha: Option<&str>) -> Result<PathBuf, String> {
    let sha = sha.ok_or_else(|| "no checksum recorded for its final weights".to_string())?;
    Checkpoints::new(db, trial, 0, 1).final_weights(sha)
}

/// `trial`'s model with the weights of `path`.
pub fn load_model(
    sweep: &Sweep,
    trial: &spec::Trial,
    path: &Path,
    device: &candle_core::Device,
) -> anyhow::Result<crate::model::Gpt> {
    let spec = &sweep.train;
    let model = train::build(trial, &trial.dims, spec.precision, device)?;
    let tensors = candle_core::safetensors::load(path, device)?;
    for p in model.params() {
        let t = tensors
            .get(&p.name)
            .with_context(|| format!("{} has no tensor {}", path.display(), p.name))?;
        p.var.set(&t.to_dtype(p.var.dtype())?)?;
    }
    Ok(model)
}
