//! Checkpoints: everything a trial needs to continue exactly where it stopped, and its final
//! weights.
//!
//! A trial's folder (`<db stem>.checkpoints/<trial id>/` beside the results DB) holds
//! `step-<N>.safetensors` (the model's parameters under `model.<name>`, the optimizer's state
//! under `optim.<name>`) and `manifest.json` (the step, the data sampler's position and the
//! loop's running sums). Each file is written beside its final name, synced, and renamed over
//! it; the manifest is renamed last and names the tensor file, so a crash at any moment leaves
//! either the old checkpoint or the new one, never half of one. A finished trial keeps
//! `final.safetensors`: its parameters under their own names, f32, as the README documents.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use registry::Stepper;
use serde::{Deserialize, Serialize};

use crate::model::Gpt;

/// Bumped when the layout changes; other versions are not resumed from.
const FORMAT: u32 = 1;

/// What `manifest.json` says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub trial: String,
    /// Steps completed; training continues with step `step` (0-based).
    pub step: usize,
    /// The tensor file, relative to the manifest.
    pub tensors: String,
    /// The data sampler's ChaCha12 stream: its seed and word position.
    pub rng_seed: [u8; 32],
    pub rng_word_pos: u128,
    /// The running sums of the current logging window.
    pub loss_sum: f64,
    pub loss_n: usize,
    pub train_time: f64,
}

/// The checkpoint folder of one trial.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    dir: PathBuf,
    /// Steps between checkpoints; 0: only the final weights.
    pub every: usize,
}

impl Checkpoints {
    /// The folder of `trial` for results DB `db`.
    pub fn new(db: &Path, trial: &str, every: usize) -> Self {
        let stem = db.file_stem().and_then(|s| s.to_str()).unwrap_or("sweep");
        let base = db
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Self {
            dir: base.join(format!("{stem}.checkpoints")).join(trial),
            every,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest of the last complete checkpoint, if there is one of this format.
    fn manifest(&self) -> Option<Manifest> {
        let text = std::fs::read_to_string(self.dir.join("manifest.json")).ok()?;
        let m: Manifest = serde_json::from_str(&text).ok()?;
        (m.format == FORMAT).then_some(m)
    }

    /// The step of the last complete checkpoint of `trial`, from its manifest alone.
    pub fn latest_step(&self, trial: &str) -> Option<usize> {
        let m = self.manifest()?;
        (m.trial == trial && self.dir.join(&m.tensors).is_file()).then_some(m.step)
    }

    /// The last complete checkpoint, if any.
    pub fn latest(
        &self,
        device: &Device,
    ) -> candle_core::Result<Option<(Manifest, HashMap<String, Tensor>)>> {
        let Some(manifest) = self.manifest() else {
            return Ok(None);
        };
        let tensors = candle_core::safetensors::load(self.dir.join(&manifest.tensors), device)?;
        Ok(Some((manifest, tensors)))
    }

    /// Saves the model, the optimizer state and `manifest` (whose `tensors` is filled in).
    pub fn save(
        &self,
        model: &Gpt,
        opt: &dyn Stepper,
        mut manifest: Manifest,
    ) -> candle_core::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for p in model.params() {
            tensors.insert(format!("model.{}", p.name), p.var.as_tensor().clone());
        }
        for (name, t) in opt.state()? {
            tensors.insert(format!("optim.{name}"), t);
        }
        let file = format!("step-{}.safetensors", manifest.step);
        let tmp = self.dir.join(format!("{file}.tmp"));
        candle_core::safetensors::save(&tensors, &tmp)?;
        sync_and_rename(&tmp, &self.dir.join(&file))?;

        let previous = self.manifest().map(|m| m.tensors);
        manifest.format = FORMAT;
        manifest.tensors = file.clone();
        let json = serde_json::to_vec_pretty(&manifest).map_err(candle_core::Error::wrap)?;
        write_atomic(&self.dir.join("manifest.json"), &json)?;
        if let Some(old) = previous.filter(|old| *old != file) {
            let _ = std::fs::remove_file(self.dir.join(old));
        }
        Ok(())
    }

    /// Writes the final weights and drops the intermediate checkpoint.
    pub fn finish(&self, model: &Gpt) -> candle_core::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tensors: HashMap<String, Tensor> = model
            .params()
            .iter()
            .map(|p| {
                Ok((
                    p.name.clone(),
                    p.var.as_tensor().to_dtype(candle_core::DType::F32)?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        let tmp = self.dir.join("final.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        sync_and_rename(&tmp, &self.dir.join("final.safetensors"))?;
        self.discard()
    }

    /// Removes the intermediate checkpoint (not the final weights).
    pub fn discard(&self) -> candle_core::Result<()> {
        if let Some(file) = self.manifest().map(|m| m.tensors) {
            let _ = std::fs::remove_file(self.dir.join("manifest.json"));
            let _ = std::fs::remove_file(self.dir.join(file));
        }
        Ok(())
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn sync_and_rename(tmp: &Path, path: &Path) -> std::io::Result<()> {
    File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path)?;
    sync_dir(path)
}

/// Makes a rename durable: the directory entry is flushed too.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}
