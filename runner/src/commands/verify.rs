//! `sweep verify --db DB`: checks every done trial's final weights (and every checkpoint
//! still on disk) against the SHA-256 its results DB recorded, before anyone exports,
//! evaluates or shares them. The loader the export and evaluation commands use is the same
//! (`Checkpoints::final_weights`): weights that do not match their record are never used.

use std::path::PathBuf;

use anyhow::Context;
use results::{Status, Store};

use crate::checkpoint::Checkpoints;
use crate::error::{exit, InputError};

/// Check trained weights and checkpoints against the checksums in their results DB.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The results DB.
    #[arg(long, default_value = "sweep.db")]
    pub db: PathBuf,
    /// Only this trial (its id).
    #[arg(long)]
    pub trial: Option<String>,
}

pub fn exec(args: Args) -> anyhow::Result<u8> {
    let store = Store::open_existing(&args.db).map_err(|e| InputError::new(e.to_string()))?;
    let rows = store
        .weights(args.trial.as_deref())
        .context("reading the trials")?;
    if let (Some(id), true) = (&args.trial, rows.is_empty()) {
        return Err(InputError::new(format!(
            "--trial {id}: no such trial in {}",
            args.db.display()
        ))
        .into());
    }
    let (mut good, mut bad) = (0, 0);
    for (id, status, sha) in rows {
        let ckpt = Checkpoints::new(&args.db, &id, 0, 1);
        if status == Status::Done {
            match sha {
                Some(sha) => match ckpt.final_weights(&sha) {
                    Ok(path) => {
                        good += 1;
                        println!("ok       {id}  {}", path.display());
                    }
                    Err(why) => {
                        bad += 1;
                        println!("DAMAGED  {id}  {why}");
                    }
                },
                None => println!(
                    "unknown  {id}  no checksum recorded (trained before weights carried one)"
                ),
            }
        }
        let point = ckpt.resume_point(&id, &store.checkpoints(&id)?);
        for r in &point.rejected {
            bad += 1;
            println!("DAMAGED  {id}  checkpoint {} {}", r.name, r.why);
        }
        if let Some(m) = point.from {
            good += 1;
            println!("ok       {id}  checkpoint step-{}", m.step);
        }
    }
    println!("{good} verified, {bad} damaged");
    Ok(if bad > 0 { exit::INPUT } else { exit::OK })
}
