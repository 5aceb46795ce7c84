//! `sweep prepare FILE`: tokenizes the sweep's text corpora and evaluation sets into the
//! token cache ahead of a run (before a Slurm array, say), so that no trial waits for it.
//! A `sweep run` does the same on its first read of the data; every worker and rank after it
//! maps the cached tokens.

use std::path::PathBuf;

use crate::data::cache::{self, Got};
use crate::data::{evals, jsonl, text_tokens, Tokenizer};
use crate::error::{exit, InputError};
use crate::spec::Sweep;

/// Tokenize a sweep's corpora into the token cache.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The sweep file.
    pub file: PathBuf,
    /// Override a field of the sweep file, as `sweep run --set`. Repeatable.
    #[arg(long = "set", value_name = "PATH=RON")]
    pub sets: Vec<String>,
}

pub fn exec(args: Args) -> anyhow::Result<u8> {
    let sweep = Sweep::load(&args.file, &args.sets)?;
    let tok = sweep.data.tokenizer();
    let mut files = sweep.data.text_files(&sweep.source)?;
    for e in &sweep.evals {
        files.extend(
            evals::files(e, &sweep.source)?
                .into_iter()
                .map(|f| (f, None)),
        );
    }
    if tok == Tokenizer::Bytes || files.is_empty() {
        println!(
            "nothing to prepare: {}",
            if tok == Tokenizer::Bytes {
                "byte tokens are the files themselves, memory-mapped"
            } else {
                "the data is not text files (shards are mapped, Parquet is read per run)"
            }
        );
        return Ok(exit::OK);
    }
    println!("token cache: {}", cache::dir().display());
    let mut total = 0;
    for (file, field) in files {
        let (data, got) = match field {
            None => text_tokens(&file, tok),
            Some(field) => jsonl::tokens(&file, field, tok),
        }
        .map_err(InputError::new)?;
        total += data.len();
        let how = match got {
            Some(Got::Cached) => "cached already".to_string(),
            Some(Got::Built { seconds, replaced }) => match replaced {
                None => format!("tokenized in {seconds:.1} s"),
                Some(why) => {
                    format!("tokenized in {seconds:.1} s (the cached copy was not valid: {why})")
                }
            },
            None => unreachable!("a BPE tokenizer goes through the cache"),
        };
        println!("{}: {} {tok:?} tokens, {how}", file.display(), data.len());
    }
    println!("{total} tokens in all");
    Ok(exit::OK)
}
