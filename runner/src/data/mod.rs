//! Training data: where the tokens come from (the `data:` section of a sweep file), how they
//! are split, and the batches and fixed validation subset the trainer draws.

pub mod cache;
pub mod evals;
pub mod jsonl;
mod parquet;
mod shards;
mod tokenizer;
mod tokens;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

pub use evals::EvalSpec;
pub use shards::{write_shard, SHARD_MAGIC};
pub use tokenizer::{Tokenizer, GPT2_EOT};
pub use tokens::{Split, TokenData};

use crate::error::InputError;
use crate::spec::Source;

/// The `data:` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum DataSpec {
    /// UTF-8 text files; each file's last `val_fraction` of tokens is validation.
    Text {
        path: Paths,
        #[serde(default)]
        tokenizer: Tokenizer,
        #[serde(default = "default_val_fraction")]
        val_fraction: f64,
    },
    /// Parquet files with a text column (Hugging Face datasets: FineWeb-Edu, WikiText...);
    /// documents are joined with the tokenizer's separator.
    Parquet {
        path: Paths,
        #[serde(default = "default_column")]
        column: String,
        #[serde(default = "gpt2")]
        tokenizer: Tokenizer,
        #[serde(default = "default_val_fraction")]
        val_fraction: f64,
    },
    /// JSON-lines files (one object a line, compressed or not): the text is each line's
    /// `field`, documents joined with the tokenizer's separator.
    Jsonl {
        path: Paths,
        #[serde(default = "default_column")]
        field: String,
        #[serde(default = "gpt2")]
        tokenizer: Tokenizer,
        #[serde(default = "default_val_fraction")]
        val_fraction: f64,
    },
    /// llm.c / modded-nanogpt `.bin` shards of GPT-2 tokens. Without `val`, each train shard's
    /// last `val_fraction` is validation.
    Shards {
        train: Paths,
        #[serde(default)]
        val: Option<Paths>,
        #[serde(default = "default_val_fraction")]
        val_fraction: f64,
    },
}

fn default_val_fraction() -> f64 {
    0.1
}
fn default_column() -> String {
    "text".into()
}
fn gpt2() -> Tokenizer {
    Tokenizer::Gpt2
}

/// One path or glob, or a list of them, relative to the sweep file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Paths(pub Vec<String>);

impl<'de> Deserialize<'de> for Paths {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Paths;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a path or glob string, or a list of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Paths, E> {
                Ok(Paths(vec![s.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Paths, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(Paths(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl DataSpec {
    pub fn tokenizer(&self) -> Tokenizer {
        match self {
            DataSpec::Text { tokenizer, .. }
            | DataSpec::Parquet { tokenizer, .. }
            | DataSpec::Jsonl { tokenizer, .. } => *tokenizer,
            DataSpec::Shards { .. } => Tokenizer::Gpt2,
        }
    }

    fn val_fraction(&self) -> f64 {
        match self {
            DataSpec::Text { val_fraction, .. }
            | DataSpec::Parquet { val_fraction, .. }
            | DataSpec::Jsonl { val_fraction, .. }
            | DataSpec::Shards { val_fraction, .. } => *val_fraction,
        }
    }

    /// Cheap checks at read time: the fraction, and that every path resolves to files.
    pub fn check(&self, source: &Source) -> Result<(), InputError> {
        let f = self.val_fraction();
        let needs_split = !matches!(self, DataSpec::Shards { val: Some(_), .. });
        if needs_split && !(f > 0.0 && f < 1.0) {
            return Err(source.field_error(
                "data.val_fraction",
                format!("must be between 0 and 1 (exclusive), got {f}"),
            ));
        }
        let base = source.base_dir();
        for (field, paths) in self.path_fields() {
            resolve(&base, paths).map_err(|e| source.field_error(&format!("data.{field}"), e))?;
        }
        Ok(())
    }

    /// The files of a `Text` or `Jsonl` section (the ones the token cache serves), each
    /// with the JSON field to read (`None`: plain text).
    pub fn text_files(&self, source: &Source) -> Result<Vec<(PathBuf, Option<&str>)>, InputError> {
        let files = |path| {
            resolve(&source.base_dir(), path).map_err(|e| source.field_error("data.path", e))
        };
        Ok(match self {
            DataSpec::Text { path, .. } => files(path)?.into_iter().map(|f| (f, None)).collect(),
            DataSpec::Jsonl { path, field, .. } => files(path)?
                .into_iter()
                .map(|f| (f, Some(field.as_str())))
                .collect(),
            _ => Vec::new(),
        })
    }

    fn path_fields(&self) -> Vec<(&'static str, &Paths)> {
        match self {
            DataSpec::Text { path, .. }
            | DataSpec::Parquet { path, .. }
            | DataSpec::Jsonl { path, .. } => vec![("path", path)],
            DataSpec::Shards { train, val, .. } => {
                let mut v = vec![("train", train)];
                if let Some(val) = val {
                    v.push(("val", val));
                }
                v
            }
        }
    }
}

/// Expands globs relative to `base`; every entry must match at least one file.
pub fn resolve(base: &Path, paths: &Paths) -> Result<Vec<PathBuf>, String> {
    if paths.0.is_empty() {
        return Err("no paths given: name at least one file".into());
    }
    let mut out = Vec::new();
    for p in &paths.0 {
        let full = std::path::absolute(base.join(p)).unwrap_or_else(|_| base.join(p));
        let shown = full.display().to_string();
        if p.contains(['*', '?', '[']) {
            let matches: Vec<PathBuf> = glob::glob(&shown)
                .map_err(|e| format!("`{p}` is not a valid glob: {e}"))?
                .filter_map(Result::ok)
                .filter(|m| m.is_file())
                .collect();
            if matches.is_empty() {
                return Err(format!("`{p}` matches no file (looked for {shown})"));
            }
            out.extend(matches);
        } else if full.is_file() {
            out.push(full);
        } else {
            return Err(format!("`{p}`: no such file {shown}"));
        }
    }
    Ok(out)
}

/// The loaded data of a sweep.
pub struct Dataset {
    pub tokenizer: Tokenizer,
    pub train: Split,
    pub val: Split,
    /// One line for the log: files, token counts.
    pub summary: String,
}

impl Dataset {
    /// Loads (maps or tokenizes) every file and splits it. Errors are input errors: they name
    /// the file and the field to change.
    pub fn load(spec: &DataSpec, source: &Source, seq_len: usize) -> Result<Self, InputError> {
        let base = source.base_dir();
        let tok = spec.tokenizer();
        let frac = spec.val_fraction();
        let (mut train, mut val) = (Split::default(), Split::default());
        let field_err = |field: &str, e: String| source.field_error(&format!("data.{field}"), e);
        let mut files = 0;
        let split_each = |data: Arc<TokenData>, train: &mut Split, val: &mut Split| {
            let n = data.len();
            let cut = n - ((n as f64 * frac).round() as usize).min(n);
            train.push(data.clone(), 0..cut);
            val.push(data, cut..n);
        };
        match spec {
            DataSpec::Text { path, .. } => {
                for file in resolve(&base, path).map_err(|e| field_err("path", e))? {
                    let data = load_text(&file, tok).map_err(|e| field_err("path", e))?;
                    split_each(Arc::new(data), &mut train, &mut val);
                    files += 1;
                }
            }
            DataSpec::Jsonl { path, field, .. } => {
                for file in resolve(&base, path).map_err(|e| field_err("path", e))? {
                    let (data, _) =
                        jsonl::tokens(&file, field, tok).map_err(|e| field_err("path", e))?;
                    split_each(Arc::new(data), &mut train, &mut val);
                    files += 1;
                }
            }
            DataSpec::Parquet { path, column, .. } => {
                for file in resolve(&base, path).map_err(|e| field_err("path", e))? {
                    let data =
                        parquet::load(&file, column, tok).map_err(|e| field_err("path", e))?;
                    split_each(Arc::new(data), &mut train, &mut val);
                    files += 1;
                }
            }
            DataSpec::Shards {
                train: t, val: v, ..
            } => {
                for file in resolve(&base, t).map_err(|e| field_err("train", e))? {
                    let data = Arc::new(shards::map(&file).map_err(|e| field_err("train", e))?);
                    if v.is_some() {
                        train.push(data.clone(), 0..data.len());
                    } else {
                        split_each(data, &mut train, &mut val);
                    }
                    files += 1;
                }
                if let Some(v) = v {
                    for file in resolve(&base, v).map_err(|e| field_err("val", e))? {
                        let data = shards::map(&file).map_err(|e| field_err("val", e))?;
                        let n = data.len();
                        val.push(Arc::new(data), 0..n);
                        files += 1;
                    }
                }
            }
        }
        for (name, split) in [("train", &train), ("val", &val)] {
            if split.windows(seq_len + 1) == 0 {
                return Err(source.field_error(
                    "data",
                    format!(
                        "the {name} split has no stretch of seq_len + 1 = {} tokens within one \
                         file ({} tokens in all); use more data, a larger val_fraction or a \
                         smaller train.seq_len",
                        seq_len + 1,
                        split.tokens()
                    ),
                ));
            }
        }
        let summary = format!(
            "{files} file(s), {:?} tokens: {} train / {} val",
            tok,
            train.tokens(),
            val.tokens()
        );
        Ok(Self {
            tokenizer: tok,
            train,
            val,
            summary,
        })
    }
}

/// Bytes tokens are the file itself, mapped; BPE tokens come from the token cache (computed
/// once per file content, see `cache`).
fn load_text(file: &Path, tok: Tokenizer) -> Result<TokenData, String> {
    Ok(text_tokens(file, tok)?.0)
}

/// The tokens of a text file and, for a BPE tokenizer, how the token cache provided them.
/// A file ending in `.gz`, `.zst` or `.xz` is decompressed as a stream first.
pub fn text_tokens(file: &Path, tok: Tokenizer) -> Result<(TokenData, Option<cache::Got>), String> {
    let shown = file.display();
    let text = read_text(file)?;
    if let Err(e) = std::str::from_utf8(text.bytes()) {
        return Err(format!(
            "{shown} is not UTF-8 text (invalid byte at offset {}{})",
            e.valid_up_to(),
            if text.is_decompressed() {
                " after decompressing"
            } else {
                ""
            }
        ));
    }
    if text.bytes().is_empty() {
        return Err(format!("{shown} is empty"));
    }
    Ok(match (tok, text) {
        (Tokenizer::Bytes, Text::Mapped(map)) => (TokenData::MappedBytes(map), None),
        (Tokenizer::Bytes, Text::Decompressed(bytes)) => (
            TokenData::Owned(bytes.into_iter().map(u32::from).collect()),
            None,
        ),
        (Tokenizer::Gpt2, text) => {
            let utf8 = std::str::from_utf8(text.bytes()).expect("checked above");
            let (data, got) = cache::tokens(file, utf8, tok)?;
            (data, Some(got))
        }
    })
}

/// A whole UTF-8 text file, decompressed by its extension as [`read_text`] does.
pub fn read_utf8(file: &Path) -> Result<String, String> {
    let text = read_text(file)?;
    match std::str::from_utf8(text.bytes()) {
        Ok(s) => Ok(s.to_string()),
        Err(e) => Err(format!(
            "{} is not UTF-8 (offset {})",
            file.display(),
            e.valid_up_to()
        )),
    }
}

/// A text file's bytes: mapped, or decompressed into memory.
enum Text {
    Mapped(memmap2::Mmap),
    Decompressed(Vec<u8>),
}

impl Text {
    fn bytes(&self) -> &[u8] {
        match self {
            Text::Mapped(m) => m,
            Text::Decompressed(v) => v,
        }
    }

    fn is_decompressed(&self) -> bool {
        matches!(self, Text::Decompressed(_))
    }
}

/// Reads a text file, decompressing `.gz` (gzip, also multi-member), `.zst` and `.xz` files
/// by their extension; anything else is mapped as it is.
fn read_text(file: &Path) -> Result<Text, String> {
    use std::io::Read;
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    let open = || std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()));
    let mut reader: Box<dyn Read> = match ext {
        "gz" => Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
            open()?,
        ))),
        "zst" => Box::new(
            zstd::stream::read::Decoder::new(open()?)
                .map_err(|e| format!("{}: {e}", file.display()))?,
        ),
        "xz" => Box::new(xz2::read::XzDecoder::new_multi_decoder(
            std::io::BufReader::new(open()?),
        )),
        _ => return Ok(Text::Mapped(map_file(file)?)),
    };
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).map_err(|e| {
        format!(
            "{}: not a valid .{ext} file, or cut short ({e})",
            file.display()
        )
    })?;
    Ok(Text::Decompressed(bytes))
}

/// Maps a file read-only.
#[allow(unsafe_code)]
pub(crate) fn map_file(file: &Path) -> Result<memmap2::Mmap, String> {
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    // SAFETY: the mapping is read-only; a dataset changed by another process while a sweep
    // reads it is outside what sweep supports (as for any reader of a mapped file).
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| format!("{}: {e}", file.display()))
}

/// Bits per byte from a sum of cross-entropies in nats over targets totalling `bytes` UTF-8
/// bytes: nats / (ln 2 * bytes).
pub fn bits_per_byte(nats: f64, bytes: u64) -> f64 {
    nats / (std::f64::consts::LN_2 * bytes as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpb_of_a_hand_worked_case() {
        // Four byte-tokens each predicted with p = 1/2: 4 ln 2 nats over 4 bytes = 1 bit/byte.
        assert!((bits_per_byte(4.0 * std::f64::consts::LN_2, 4) - 1.0).abs() < 1e-12);
        // A uniform model over 256 bytes: ln 256 nats per byte = 8 bits per byte.
        assert!((bits_per_byte(10.0 * 256f64.ln(), 10) - 8.0).abs() < 1e-12);
        // Two GPT-2 tokens "Hello" + " world" (11 bytes) at 3 nats each: 6 / (ln 2 * 11).
        let b = Tokenizer::Gpt2.byte_len(15496) + Tokenizer::Gpt2.byte_len(995);
        assert!((bits_per_byte(6.0, b) - 0.786_924_6).abs() < 1e-6);
    }

    #[test]
    fn compressed_text_reads_as_the_text_itself() {
        use std::io::Write;
        let original = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/tinyshakespeare/input.txt");
        let text = std::fs::read(&original).unwrap();
        let dir = std::env::temp_dir().join(format!("sweep-compressed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gz = dir.join("input.txt.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&text).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let zst = dir.join("input.txt.zst");
        std::fs::write(&zst, zstd::encode_all(&text[..], 3).unwrap()).unwrap();
        let xz = dir.join("input.txt.xz");
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(&text).unwrap();
        std::fs::write(&xz, e.finish().unwrap()).unwrap();

        let all = |d: &TokenData| {
            let mut out = Vec::new();
            d.extend(0..d.len(), &mut out);
            out
        };
        let want = all(&text_tokens(&original, Tokenizer::Bytes).unwrap().0);
        assert_eq!(want.len(), text.len());
        for f in [&gz, &zst, &xz] {
            let got = all(&text_tokens(f, Tokenizer::Bytes).unwrap().0);
            assert!(got == want, "{}", f.display());
        }
        // GPT-2 tokens of the decompressed text, through the token cache.
        let gpt2 = all(&text_tokens(&gz, Tokenizer::Gpt2).unwrap().0);
        assert_eq!(
            gpt2,
            Tokenizer::Gpt2.encode(std::str::from_utf8(&text).unwrap())
        );

        // A file cut short is refused with its name, not read as a shorter text.
        let bytes = std::fs::read(&gz).unwrap();
        let cut = dir.join("cut.txt.gz");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let Err(e) = text_tokens(&cut, Tokenizer::Bytes) else {
            panic!("a truncated .gz was read")
        };
        assert!(
            e.contains("cut.txt.gz: not a valid .gz file, or cut short"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
