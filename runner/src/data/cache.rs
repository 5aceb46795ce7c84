//! The token cache: a text file's GPT-2 tokens are computed once per file content and
//! tokenizer, on all cores, and kept as an llm.c `.bin` shard that every later trial, worker
//! process and rank maps instead of tokenizing again.
//!
//! A cache file is named by the SHA-256 of the source's bytes and the tokenizer, so an
//! edited corpus gets a new one. Its header is the llm.c shard header (magic, version 1,
//! token count, so other tools read it too), with two more fields in the words llm.c leaves
//! unused: the source's SHA-256 (words 3..11) and the SHA-256 of the token bytes (words
//! 11..19). A cache whose header, length or token checksum disagrees is not used: it is
//! rebuilt, and the rebuild is said on stderr.
//!
//! The cache folder is `$SWEEP_CACHE`, else `$XDG_CACHE_HOME/sweep/tokens`, else
//! `~/.cache/sweep/tokens`. Writes go to a temporary file renamed into place, so processes
//! building the same cache at once each leave a whole one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::shards::{self, SHARD_MAGIC};
use super::{TokenData, Tokenizer};

/// Bumped when a tokenizer's output or the layout changes: older caches are then not found.
const CACHE_VERSION: &str = "sweep-token-cache-1";
const HEADER_WORDS: usize = 256;
/// Text per tokenizing task: small enough to spread over the cores and show progress.
const CHUNK_BYTES: usize = 1 << 20;

/// The cache folder.
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SWEEP_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("sweep").join("tokens")
}

/// How a file's tokens were had.
#[derive(Clone, Debug, PartialEq)]
pub enum Got {
    /// Mapped from a valid cache.
    Cached,
    /// Tokenized now and cached (the reason, when a cache was there but not valid).
    Built {
        seconds: f64,
        replaced: Option<String>,
    },
}

/// The GPT-2 tokens of `text` (the bytes of `file`), from the cache or tokenized and cached.
pub fn tokens(file: &Path, text: &str, tok: Tokenizer) -> Result<(TokenData, Got), String> {
    tokens_in(&dir(), file, text, tok)
}

/// [`tokens`] with the cache in folder `dir`.
pub fn tokens_in(
    dir: &Path,
    file: &Path,
    text: &str,
    tok: Tokenizer,
) -> Result<(TokenData, Got), String> {
    let source = Sha256::digest(text.as_bytes());
    cached(dir, file, &source, tok, "text", || {
        encode_parallel(text, tok, &file.display().to_string())
    })
}

/// The tokens `build` makes from the input whose digest is `source`, read as `how` (text,
/// a JSON-lines field): from the cache when a valid one is there, else built and cached.
pub fn cached(
    dir: &Path,
    file: &Path,
    source: &[u8],
    tok: Tokenizer,
    how: &str,
    build: impl FnOnce() -> Vec<u16>,
) -> Result<(TokenData, Got), String> {
    let mut key = Sha256::new();
    key.update(CACHE_VERSION);
    key.update(format!("{tok:?} {how}"));
    key.update(source);
    let name = crate::tensor_file::hex(&key.finalize()[..16]);
    let path = dir.join(format!("{name}.bin"));
    let replaced = match path.exists() {
        false => None,
        true => match check(&path, source) {
            Ok(data) => return Ok((data, Got::Cached)),
            Err(why) => {
                eprintln!(
                    "token cache {} for {} is not valid ({why}); rebuilding it",
                    path.display(),
                    file.display()
                );
                Some(why)
            }
        },
    };
    let started = Instant::now();
    let ids = build();
    let seconds = started.elapsed().as_secs_f64();
    let kept = std::fs::create_dir_all(dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))
        .and_then(|()| {
            write(&path, &ids, source).map_err(|e| format!("writing {}: {e}", path.display()))
        })
        .and_then(|()| check(&path, source).map_err(|e| format!("{}: {e}", path.display())));
    let data = match kept {
        Ok(data) => data,
        Err(why) => {
            // A cache that cannot be kept (a read-only home, a full disk) costs the next run
            // the tokenizing again, not this one its data.
            eprintln!("token cache not kept ({why}); set SWEEP_CACHE to a writable folder");
            TokenData::Owned(ids.into_iter().map(u32::from).collect())
        }
    };
    Ok((data, Got::Built { seconds, replaced }))
}

/// Maps a cache file after checking every field of its header and its tokens' checksum.
fn check(path: &Path, source: &[u8]) -> Result<TokenData, String> {
    let data = shards::map(path)?;
    let TokenData::MappedU16 { map, offset, len } = &data else {
        unreachable!("shards map u16 tokens")
    };
    let words = |range: std::ops::Range<usize>| &map[4 * range.start..4 * range.end];
    if words(3..11) != source {
        return Err("it was made from other text".into());
    }
    let digest = Sha256::digest(&map[*offset..*offset + 2 * len]);
    if words(11..19) != digest.as_slice() {
        return Err("its tokens do not match their checksum".into());
    }
    Ok(data)
}

fn write(path: &Path, ids: &[u16], source: &[u8]) -> std::io::Result<()> {
    let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    let mut header = vec![0u8; 4 * HEADER_WORDS];
    header[0..4].copy_from_slice(&SHARD_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&1i32.to_le_bytes());
    let count = i32::try_from(ids.len()).map_err(std::io::Error::other)?;
    header[8..12].copy_from_slice(&count.to_le_bytes());
    header[12..44].copy_from_slice(source);
    header[44..76].copy_from_slice(&Sha256::digest(&bytes));
    // Unique to this process and call: builders of one cache in several threads or
    // processes each write their own file, and the last rename wins with a whole one.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{call}", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&header)?;
        f.write_all(&bytes)?;
        f.sync_all()
    });
    match written {
        Ok(()) => std::fs::rename(&tmp, path),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Splits text where BPE gives the same tokens to the parts as to the whole. GPT-2's
/// pre-tokenizer starts a new piece at every run of whitespace, and of a run followed by a
/// word it gives all but the last character to `\s+(?!\S)` and the last to the word (a
/// space) or to a piece of its own (a newline). So two cuts are safe, both before an ASCII
/// letter, digit or mark:
/// - after a lone newline that follows one (`x\ny`): the newline is its own piece either way;
/// - before the last character of a run of two or more whitespace characters (`x \n|\ny`,
///   `x.\n|\ny`): the part before ends in the run's head, which `\s+(?!\S)` takes whole at
///   the end of a text as it does in the whole, and the part after starts as the whole does.
fn chunks(text: &str, target: usize) -> Vec<&str> {
    let b = text.as_bytes();
    let ws = |i: usize| b[i].is_ascii_whitespace();
    let mark = |i: usize| b[i].is_ascii_graphic();
    let safe = |p: usize| {
        p >= 2
            && p + 1 < b.len()
            && ((b[p - 1] == b'\n' && mark(p - 2) && mark(p))
                || (ws(p - 1) && ws(p) && mark(p + 1)))
    };
    let mut out = Vec::new();
    let mut start = 0;
    while b.len() - start > target {
        match (start + target..b.len()).find(|&p| safe(p)) {
            Some(p) => {
                out.push(&text[start..p]);
                start = p;
            }
            None => break,
        }
    }
    out.push(&text[start..]);
    out
}

/// GPT-2 tokens of `text`, tokenized in parts on every core, with a progress bar.
pub fn encode_parallel(text: &str, tok: Tokenizer, what: &str) -> Vec<u16> {
    encode_parts(&chunks(text, CHUNK_BYTES), tok, what).concat()
}

/// The tokens of each of `parts` (pieces of one text, or documents), on every core, with a
/// progress bar on stderr.
pub fn encode_parts(parts: &[&str], tok: Tokenizer, what: &str) -> Vec<Vec<u16>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(parts.len().max(1));
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "tokenizing {msg} {bar:30} {bytes}/{total_bytes} ({eta})",
        )
        .expect("a valid template"),
    );
    bar.set_message(what.to_string());
    // Documents are claimed in runs, so that millions of short ones cost few atomics.
    let run = (parts.len() / (64 * threads)).clamp(1, 1024);
    let next = AtomicUsize::new(0);
    let done: Vec<Mutex<Vec<u16>>> = parts.iter().map(|_| Mutex::new(Vec::new())).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let first = next.fetch_add(run, Ordering::Relaxed);
                if first >= parts.len() {
                    break;
                }
                let mut bytes = 0;
                for i in first..(first + run).min(parts.len()) {
                    // GPT-2 ids are below 50257, so they fit in 16 bits.
                    let ids: Vec<u16> =
                        tok.encode(parts[i]).into_iter().map(|t| t as u16).collect();
                    *done[i].lock().unwrap_or_else(|e| e.into_inner()) = ids;
                    bytes += parts[i].len();
                }
                bar.inc(bytes as u64);
            });
        }
    });
    bar.finish_and_clear();
    done.into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(rel: &str) -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data")
            .join(rel);
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn parts_tokenize_as_the_whole() {
        // Real text with every kind of line break: Shakespeare's verse, WikiText's
        // paragraphs (" \n \n = Title = \n") and Gutenberg's prose (CRLF-free, blank lines
        // between paragraphs), cut into parts of 4 KB.
        for rel in [
            "tinyshakespeare/input.txt",
            "wikitext-2/valid.txt",
            "gutenberg/val.txt",
        ] {
            let text = corpus(rel);
            let mut end = text.len().min(400_000);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let text = &text[..end];
            let parts = chunks(text, 4096);
            assert!(parts.len() > 50, "{rel}: {} parts", parts.len());
            assert_eq!(parts.concat(), text);
            let whole: Vec<u16> = Tokenizer::Gpt2
                .encode(text)
                .into_iter()
                .map(|t| t as u16)
                .collect();
            let joined: Vec<u16> = parts
                .iter()
                .flat_map(|p| Tokenizer::Gpt2.encode(p))
                .map(|t| t as u16)
                .collect();
            assert_eq!(joined, whole, "{rel}");
        }
    }

    #[test]
    fn a_cache_is_reused_and_a_damaged_one_rebuilt() {
        let dir = std::env::temp_dir().join(format!("sweep-token-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = &corpus("tinyshakespeare/input.txt")[..200_000];
        let file = Path::new("input.txt");
        let (first, got) = tokens_in(&dir, file, text, Tokenizer::Gpt2).unwrap();
        assert!(matches!(got, Got::Built { replaced: None, .. }), "{got:?}");
        let want: Vec<u32> = Tokenizer::Gpt2.encode(text);
        let ids = |d: &TokenData| -> Vec<u32> {
            let mut out = Vec::new();
            d.extend(0..d.len(), &mut out);
            out
        };
        assert_eq!(ids(&first), want);
        let (_, got) = tokens_in(&dir, file, text, Tokenizer::Gpt2).unwrap();
        assert_eq!(got, Got::Cached);

        // One token changed on disk: the checksum catches it and the cache is rebuilt.
        let cached: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(cached.len(), 1);
        let mut bytes = std::fs::read(&cached[0]).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 1;
        std::fs::write(&cached[0], bytes).unwrap();
        let (again, got) = tokens_in(&dir, file, text, Tokenizer::Gpt2).unwrap();
        assert!(
            matches!(&got, Got::Built { replaced: Some(why), .. } if why.contains("checksum")),
            "{got:?}"
        );
        assert_eq!(ids(&again), want);
        // Truncated: the shard header no longer matches the size.
        let len = std::fs::metadata(&cached[0]).unwrap().len();
        std::fs::File::options()
            .write(true)
            .open(&cached[0])
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        let (_, got) = tokens_in(&dir, file, text, Tokenizer::Gpt2).unwrap();
        assert!(
            matches!(
                got,
                Got::Built {
                    replaced: Some(_),
                    ..
                }
            ),
            "{got:?}"
        );
        let (_, got) = tokens_in(&dir, file, text, Tokenizer::Gpt2).unwrap();
        assert_eq!(got, Got::Cached);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cache_folder_that_cannot_be_made_costs_the_cache_not_the_tokens() {
        // A folder under a regular file cannot be created, whoever runs the test.
        let base = std::env::temp_dir().join(format!("sweep-token-nocache-{}", std::process::id()));
        std::fs::write(&base, b"a file").unwrap();
        let text = &corpus("tinyshakespeare/input.txt")[..20_000];
        let (data, got) = tokens_in(
            &base.join("cache"),
            Path::new("input.txt"),
            text,
            Tokenizer::Gpt2,
        )
        .unwrap();
        assert!(matches!(got, Got::Built { .. }), "{got:?}");
        let mut ids = Vec::new();
        data.extend(0..data.len(), &mut ids);
        assert_eq!(ids, Tokenizer::Gpt2.encode(text));
        let _ = std::fs::remove_file(&base);
    }

    #[test]
    fn builders_of_one_cache_at_once_leave_one_whole_file() {
        let dir = std::env::temp_dir().join(format!("sweep-token-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = &corpus("tinyshakespeare/input.txt")[..100_000];
        let want = Tokenizer::Gpt2.encode(text);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let (data, _) =
                        tokens_in(&dir, Path::new("input.txt"), text, Tokenizer::Gpt2).unwrap();
                    let mut ids = Vec::new();
                    data.extend(0..data.len(), &mut ids);
                    assert_eq!(ids, want);
                });
            }
        });
        let files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(files[0].ends_with(".bin"), "{files:?}");
        let (_, got) = tokens_in(&dir, Path::new("input.txt"), text, Tokenizer::Gpt2).unwrap();
        assert_eq!(got, Got::Cached);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
