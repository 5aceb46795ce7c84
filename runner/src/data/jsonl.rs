//! JSON-lines corpora (exports of The Pile, C4, FineWeb: one JSON object a line, the text in
//! one field), compressed or not. Documents are joined by the tokenizer's separator
//! (`<|endoftext|>` for GPT-2, a newline for bytes); GPT-2 tokens go through the token cache,
//! keyed by the file's bytes and the field.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::cache::{self, Got};
use super::{read_text, TokenData, Tokenizer};

/// The documents (the `field` of every non-empty line) of a JSON-lines text.
fn documents(file: &Path, text: &str, field: &str) -> Result<Vec<String>, String> {
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", file.display(), i + 1);
        let mut value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}: not a JSON object ({e})", at()))?;
        // Taken, not copied: a corpus's documents are most of its bytes.
        match value.get_mut(field).map(serde_json::Value::take) {
            Some(serde_json::Value::String(s)) => docs.push(s),
            Some(_) => return Err(format!("{}: `{field}` is not a string", at())),
            None => {
                return Err(format!(
                    "{}: no field `{field}` (set `field:` to the one holding the text)",
                    at()
                ))
            }
        }
    }
    if docs.is_empty() {
        return Err(format!("{}: no documents", file.display()));
    }
    Ok(docs)
}

/// The tokens of a JSON-lines file's `field`, documents joined by the separator, and how the
/// token cache provided them (BPE only).
pub fn tokens(
    file: &Path,
    field: &str,
    tok: Tokenizer,
) -> Result<(TokenData, Option<Got>), String> {
    let raw = read_text(file)?;
    let text = std::str::from_utf8(raw.bytes()).map_err(|e| {
        format!(
            "{} is not UTF-8 (offset {})",
            file.display(),
            e.valid_up_to()
        )
    })?;
    let docs = documents(file, text, field)?;
    let sep = tok.separator();
    match tok {
        Tokenizer::Bytes => {
            let mut ids = Vec::with_capacity(text.len());
            for (i, d) in docs.iter().enumerate() {
                if i > 0 {
                    ids.push(sep);
                }
                ids.extend(d.bytes().map(u32::from));
            }
            Ok((TokenData::Owned(ids), None))
        }
        Tokenizer::Gpt2 => {
            let mut source = Sha256::new();
            source.update(raw.bytes());
            source.update(field.as_bytes());
            let build = || {
                let parts: Vec<&str> = docs.iter().map(String::as_str).collect();
                let each = cache::encode_parts(&parts, tok, &file.display().to_string());
                let mut ids =
                    Vec::with_capacity(each.iter().map(Vec::len).sum::<usize>() + docs.len());
                for (i, d) in each.into_iter().enumerate() {
                    if i > 0 {
                        ids.push(sep as u16);
                    }
                    ids.extend(d);
                }
                ids
            };
            let (data, got) = cache::cached(
                &cache::dir(),
                file,
                &source.finalize(),
                tok,
                &format!("jsonl {field}"),
                build,
            )?;
            Ok((data, Some(got)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_the_field_of_each_line_joined_by_the_separator() {
        let dir = std::env::temp_dir().join(format!("sweep-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c4.jsonl");
        std::fs::write(
            &f,
            "{\"text\": \"Hello world\", \"url\": \"a\"}\n\n{\"text\": \"ab\\nc\", \"id\": 2}\n",
        )
        .unwrap();
        let all = |d: &TokenData| {
            let mut out = Vec::new();
            d.extend(0..d.len(), &mut out);
            out
        };
        let (bytes, _) = tokens(&f, "text", Tokenizer::Bytes).unwrap();
        assert_eq!(
            all(&bytes),
            "Hello world\nab\nc"
                .bytes()
                .map(u32::from)
                .collect::<Vec<_>>()
        );
        let (gpt2, _) = tokens(&f, "text", Tokenizer::Gpt2).unwrap();
        // "Hello" " world" <|endoftext|> "ab" "\n" "c"
        let mut want = Tokenizer::Gpt2.encode("Hello world");
        want.push(crate::data::GPT2_EOT);
        want.extend(Tokenizer::Gpt2.encode("ab\nc"));
        assert_eq!(all(&gpt2), want);
        assert_eq!(&want[..2], &[15496, 995]);

        let Err(e) = tokens(&f, "content", Tokenizer::Bytes) else {
            panic!("no such field")
        };
        assert!(
            e.ends_with(
                "c4.jsonl:1: no field `content` (set `field:` to the one holding the text)"
            ),
            "{e}"
        );
        std::fs::write(&f, "{\"text\": \"fine\"}\n{\"text\": 3}\n").unwrap();
        let Err(e) = tokens(&f, "text", Tokenizer::Bytes) else {
            panic!("not a string")
        };
        assert!(e.ends_with("c4.jsonl:2: `text` is not a string"), "{e}");
        std::fs::write(&f, "{\"text\": \"fine\"}\nnot json\n").unwrap();
        let Err(e) = tokens(&f, "text", Tokenizer::Bytes) else {
            panic!("not json")
        };
        assert!(e.contains("c4.jsonl:2: not a JSON object"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
