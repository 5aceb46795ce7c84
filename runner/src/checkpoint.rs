//! Checkpoints: everything a trial needs to continue exactly where it stopped, and its final
//! weights, each verified before it is used.
//!
//! A trial's folder (`<db stem>.checkpoints/<trial id>/` beside the results DB) holds the
//! last `keep` checkpoints, each a pair: `step-<N>.safetensors` (the model's parameters under
//! `model.<name>`, the optimizer's state under `optim.<name>`) and `step-<N>.json`, its
//! manifest (the step, the data sampler's position, the loop's running sums, and the tensor
//! file's length and SHA-256). Each file is written beside its final name, synced, and
//! renamed over it; the tensor file's digest is taken from the bytes on disk and recorded in
//! the results DB before the manifest is written, so a crash at any moment leaves complete
//! checkpoints only, and every manifest names a checkpoint the DB knows.
//!
//! A resume takes the newest checkpoint that passes every check (manifest readable, of this
//! format and trial, its step that of its name, the tensor file of the recorded length and
//! digest, the step and digest recorded in the DB) and says why each newer one was passed
//! over; with none left the trial starts again. A finished trial keeps `final.safetensors`:
//! its parameters under their own names, f32, with its SHA-256 in the trial's record.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use registry::Stepper;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::Gpt;
use crate::tensor_file::{self, hex};

/// Bumped when the layout changes; other versions are not resumed from. 1: one
/// `manifest.json` without checksums.
const FORMAT: u32 = 2;

/// Checkpoints kept by default: a damaged latest one falls back to the one before.
pub const DEFAULT_KEEP: usize = 2;

/// What a checkpoint's manifest says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub trial: String,
    /// Steps completed; training continues with step `step` (0-based).
    pub step: usize,
    /// The tensor file, relative to the manifest.
    pub tensors: String,
    /// The tensor file's length and SHA-256 (lower-case hex).
    pub bytes: u64,
    pub sha256: String,
    /// The data sampler's ChaCha12 stream: its seed and word position.
    pub rng_seed: [u8; 32],
    pub rng_word_pos: u128,
    /// The running sums of the current logging window.
    pub loss_sum: f64,
    pub loss_n: usize,
    pub train_time: f64,
    /// The loss-spike counter's window and count (absent in older manifests: counting then
    /// starts afresh).
    #[serde(default)]
    pub spikes: crate::spikes::Spikes,
}

/// A checkpoint passed over on resume, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    /// `step-300`, or `manifest.json` for a checkpoint of the first format.
    pub name: String,
    pub step: Option<usize>,
    pub why: String,
}

/// Where a trial resumes: the newest good checkpoint (none: from step 0), and the newer ones
/// that were passed over.
#[derive(Clone, Debug, Default)]
pub struct ResumePoint {
    pub from: Option<Manifest>,
    pub rejected: Vec<Rejected>,
}

impl ResumePoint {
    /// One line per rejected checkpoint, saying where the trial goes on:
    /// `checkpoint step-300 failed verification (sha256 mismatch); resumed from step-250`.
    pub fn messages(&self) -> Vec<(Option<usize>, String)> {
        let then = match &self.from {
            Some(m) => format!("resumed from step-{}", m.step),
            None => "started again from step 0".to_string(),
        };
        self.rejected
            .iter()
            .map(|r| (r.step, format!("checkpoint {} {}; {then}", r.name, r.why)))
            .collect()
    }
}

/// The checkpoint folder of one trial.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    dir: PathBuf,
    /// Steps between checkpoints; 0: only the final weights.
    pub every: usize,
    /// Checkpoints kept (at least 1).
    pub keep: usize,
}

/// An I/O error that names the operation and the file: `writing <path>: <error>`.
fn io_error(op: &str, path: &Path, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op} {}: {e}", path.display()))
}

/// The SHA-256 of a file (lower-case hex) and its length, read in 1 MiB pieces.
pub fn file_sha256(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex(&hasher.finalize()), len))
}

/// Whether `name` is one of the two files of a complete checkpoint.
fn is_part(name: &str) -> bool {
    name.ends_with(".json") || name.ends_with(".safetensors")
}

/// The step of a `step-<N>.json` manifest name.
fn manifest_step(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

impl Checkpoints {
    /// The folder of `trial` for results DB `db`.
    pub fn new(db: &Path, trial: &str, every: usize, keep: usize) -> Self {
        let stem = db.file_stem().and_then(|s| s.to_str()).unwrap_or("sweep");
        let base = db
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Self {
            dir: base.join(format!("{stem}.checkpoints")).join(trial),
            every,
            keep: keep.max(1),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifests in the folder, newest step first.
    fn manifests(&self) -> Vec<(usize, PathBuf)> {
        let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                Some((manifest_step(name.to_str()?)?, e.path()))
            })
            .collect();
        found.sort_by_key(|b| std::cmp::Reverse(b.0));
        found
    }

    /// Finds where `trial` resumes: the newest checkpoint that verifies and that the results
    /// DB recorded (`recorded`: its (step, sha256) list for the trial's current attempt).
    pub fn resume_point(&self, trial: &str, recorded: &[(u64, String)]) -> ResumePoint {
        let mut point = ResumePoint::default();
        if self.dir.join("manifest.json").is_file() {
            point.rejected.push(Rejected {
                name: "manifest.json".into(),
                step: None,
                why: "is of the first checkpoint format (no checksum) and is not resumed from"
                    .into(),
            });
        }
        for (step, path) in self.manifests() {
            match self.verify(trial, step, &path, recorded) {
                Ok(m) => {
                    point.from = Some(m);
                    break;
                }
                Err(why) => point.rejected.push(Rejected {
                    name: format!("step-{step}"),
                    step: Some(step),
                    why,
                }),
            }
        }
        point
    }

    /// Every check a checkpoint must pass before it is trained on; the error says which
    /// failed, in words for the trial's events.
    fn verify(
        &self,
        trial: &str,
        step: usize,
        path: &Path,
        recorded: &[(u64, String)],
    ) -> std::result::Result<Manifest, String> {
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let text = std::fs::read(path).map_err(|e| format!("has an unreadable manifest ({e})"))?;
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| format!("has a manifest that is not valid ({name}: {e})"))?;
        if m.format != FORMAT {
            return Err(format!(
                "is of checkpoint format {}, this build reads {FORMAT}",
                m.format
            ));
        }
        if m.trial != trial {
            return Err(format!("belongs to trial {}, not {trial}", m.trial));
        }
        if m.step != step {
            return Err(format!("has a manifest that says step {}", m.step));
        }
        let tensors = self.dir.join(&m.tensors);
        let (sha, len) = file_sha256(&tensors).map_err(|e| {
            format!(
                "names a tensor file that cannot be read ({}: {e})",
                m.tensors
            )
        })?;
        if len != m.bytes {
            return Err(format!(
                "failed verification ({} is {len} bytes, its manifest says {})",
                m.tensors, m.bytes
            ));
        }
        if sha != m.sha256 {
            return Err("failed verification (sha256 mismatch)".into());
        }
        match recorded.iter().find(|(s, _)| *s == step as u64) {
            Some((_, digest)) if *digest == sha => Ok(m),
            Some(_) => Err(
                "does not match the checkpoint the results database recorded \
                            at that step (sha256 differs)"
                    .into(),
            ),
            None => Err(format!(
                "is not in the results database's record of this trial ({})",
                match recorded.last() {
                    Some((s, _)) => format!("its last recorded checkpoint is step-{s}"),
                    None => "it recorded no checkpoint".into(),
                }
            )),
        }
    }

    /// The tensors of a checkpoint `resume_point` chose, read once and checked against its
    /// digest again as they are loaded.
    pub fn load(
        &self,
        m: &Manifest,
        device: &Device,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        let path = self.dir.join(&m.tensors);
        let bytes = std::fs::read(&path).map_err(|e| io_error("reading", &path, e))?;
        if hex(&Sha256::digest(&bytes)) != m.sha256 {
            candle_core::bail!("{}: changed after it was verified", path.display());
        }
        candle_core::safetensors::load_buffer(&bytes, device)
    }

    /// Saves the model, the optimizer state and `manifest` (whose `tensors`, `bytes` and
    /// `sha256` are filled in). `written` is told the complete manifest once the tensor file
    /// is durable and before the manifest is, to record it in the results DB; its error is
    /// returned as is. Then checkpoints beyond the newest `keep` are removed. An I/O error
    /// names the operation and the file, and leaves the older checkpoints as they were.
    pub fn save(
        &self,
        model: &Gpt,
        opt: &dyn Stepper,
        mut manifest: Manifest,
        written: &mut dyn FnMut(&Manifest) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_error("creating", &self.dir, e))?;
        let mut tensors = BTreeMap::new();
        for p in model.params() {
            tensors.insert(format!("model.{}", p.name), p.var.as_tensor().clone());
        }
        for (name, t) in opt.state()? {
            tensors.insert(format!("optim.{name}"), t);
        }
        let file = format!("step-{}.safetensors", manifest.step);
        let (sha, bytes) = self.write_tensors(&tensors, &file)?;
        manifest.format = FORMAT;
        manifest.tensors = file;
        manifest.bytes = bytes;
        manifest.sha256 = sha;
        written(&manifest)?;
        let json = serde_json::to_vec_pretty(&manifest).map_err(candle_core::Error::wrap)?;
        let path = self.dir.join(format!("step-{}.json", manifest.step));
        write_atomic(&path, &json)?;
        self.prune(manifest.step);
        Ok(())
    }

    /// Writes `tensors` to `file` in the folder through a synced temporary file and returns
    /// the SHA-256 and length of the bytes on disk. A failed write leaves no temporary file.
    fn write_tensors(
        &self,
        tensors: &BTreeMap<String, Tensor>,
        file: &str,
    ) -> candle_core::Result<(String, u64)> {
        let tmp = self.dir.join(format!("{file}.tmp"));
        let written = tensor_file::write(&tmp, tensors).map_err(|e| io_error("writing", &tmp, e));
        let digest = match written {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let path = self.dir.join(file);
        std::fs::rename(&tmp, &path).map_err(|e| io_error("renaming", &tmp, e))?;
        sync_dir(&path).map_err(|e| io_error("syncing the folder of", &path, e))?;
        Ok(digest)
    }

    /// Removes the checkpoints of steps up to `newest` (the one just saved) but the newest
    /// `keep`, with leftovers of interrupted writes and rejected manifests among them, and the
    /// first format's manifest. Files of later steps belong to the attempt a resume abandoned
    /// (rejected, or a write a crash cut short): training rewrites them when it gets there.
    fn prune(&self, newest: usize) {
        let kept: Vec<usize> = self
            .manifests()
            .into_iter()
            .map(|(s, _)| s)
            .filter(|&s| s <= newest)
            .take(self.keep)
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name
                .strip_prefix("step-")
                .and_then(|r| r.split('.').next())
                .and_then(|s| s.parse::<usize>().ok());
            let stale = match step {
                Some(s) => s <= newest && (!kept.contains(&s) || !is_part(&name)),
                None => name.starts_with("manifest.json"),
            };
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Renames the manifests of rejected checkpoints to `step-<N>.json.rejected`: they are
    /// not looked at again, and stay for inspection until a later save prunes them.
    pub fn set_aside(&self, rejected: &[Rejected]) {
        for r in rejected {
            let name = match r.step {
                Some(s) => format!("step-{s}.json"),
                None => r.name.clone(),
            };
            let path = self.dir.join(&name);
            let _ = std::fs::rename(&path, self.dir.join(format!("{name}.rejected")));
        }
    }

    /// Writes the final weights and drops the intermediate checkpoints; returns the SHA-256
    /// of `final.safetensors`.
    pub fn finish(&self, model: &Gpt) -> candle_core::Result<String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_error("creating", &self.dir, e))?;
        let tensors: BTreeMap<String, Tensor> = model
            .params()
            .iter()
            .map(|p| {
                Ok((
                    p.name.clone(),
                    p.var.as_tensor().to_dtype(candle_core::DType::F32)?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        let (sha, _) = self.write_tensors(&tensors, "final.safetensors")?;
        self.discard();
        Ok(sha)
    }

    /// The final weights, refused unless their SHA-256 is `expected` (the trial's record).
    pub fn final_weights(&self, expected: &str) -> std::result::Result<PathBuf, String> {
        let path = self.dir.join("final.safetensors");
        let (sha, _) =
            file_sha256(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        if sha != expected {
            return Err(format!(
                "{} failed verification (sha256 {sha}, the trial's record says {expected})",
                path.display()
            ));
        }
        Ok(path)
    }

    /// Removes the intermediate checkpoints (not the final weights).
    pub fn discard(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("step-") || name == "manifest.json" {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> candle_core::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let written = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| io_error("writing", &tmp, e));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| io_error("renaming", &tmp, e))?;
    sync_dir(path).map_err(|e| io_error("syncing the folder of", path, e))
}

/// Makes a rename durable: the directory entry is flushed too.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}
