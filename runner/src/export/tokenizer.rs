//! A trial's tokenizer as Hugging Face `tokenizers` reads it (tokenizer.json), built from the
//! tokenizer the project trains with, so that `AutoTokenizer.from_pretrained(dir)` gives
//! the ids the model was trained on.
//!
//! Both are byte-level BPE models: the ByteLevel pre-tokenizer maps every byte to one
//! printable character (GPT-2's table) and the BPE model merges them.
//! - Bytes: the 256 byte characters, id = byte value, no merges (with `use_regex: false`,
//!   the text is not split into pieces either: there is nothing to merge).
//! - Gpt2: r50k_base's 50,256 tokens, ids = tiktoken's ranks, and the merges that rebuild
//!   each token: a token of rank r is the pair that byte-pair encoding of its bytes with the
//!   ranks below r leaves (tiktoken merges by rank, `tokenizers` by merge order; listing the
//!   merges by the rank of their result makes the two orders one). <|endoftext|> is the
//!   added special token 50256.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::data::{Tokenizer, GPT2_EOT};

/// GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the rest
/// are moved to 256 and up, so that no token holds whitespace or control characters.
pub fn byte_chars() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut out = ['\0'; 256];
    let mut moved = 0;
    for b in 0..256u32 {
        let code = if printable(b) {
            b
        } else {
            moved += 1;
            255 + moved
        };
        out[b as usize] = char::from_u32(code).expect("below the surrogates");
    }
    out
}

/// The byte-level text of a token's bytes.
pub fn byte_text(bytes: &[u8], chars: &[char; 256]) -> String {
    bytes.iter().map(|&b| chars[b as usize]).collect()
}

/// r50k_base's tokens by rank (id): the bytes each stands for, <|endoftext|> left out.
fn gpt2_tokens() -> Vec<Vec<u8>> {
    let bpe = tiktoken_rs::r50k_base().expect("tiktoken-rs embeds r50k_base");
    (0..GPT2_EOT)
        .map(|id| {
            bpe.decode_bytes(&[id])
                .expect("every rank below 50256 is a token")
        })
        .collect()
}

/// The two parts byte-pair encoding leaves of `token` when only the ranks below its own
/// may merge: the merge that makes it.
fn last_merge<'a>(
    token: &'a [u8],
    rank: u32,
    ranks: &HashMap<&[u8], u32>,
) -> Option<(&'a [u8], &'a [u8])> {
    // Part boundaries; merge the adjacent pair of lowest rank below `rank` until none is left.
    let mut cuts: Vec<usize> = (0..=token.len()).collect();
    loop {
        let best = (0..cuts.len().saturating_sub(2))
            .filter_map(|i| {
                let r = *ranks.get(&token[cuts[i]..cuts[i + 2]])?;
                (r < rank).then_some((r, i))
            })
            .min();
        match best {
            Some((_, i)) => {
                cuts.remove(i + 1);
            }
            None => break,
        }
    }
    match cuts[..] {
        [0, mid, end] if end == token.len() => Some((&token[..mid], &token[mid..])),
        _ => None,
    }
}

/// GPT-2's merges in `tokenizers`' order: `"left right"` in the byte-level text, one per
/// token longer than a byte, by the token's rank.
pub fn gpt2_merges() -> Vec<(String, String)> {
    let tokens = gpt2_tokens();
    let ranks: HashMap<&[u8], u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_slice(), i as u32))
        .collect();
    let chars = byte_chars();
    tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| t.len() > 1)
        .map(|(rank, t)| {
            let (a, b) = last_merge(t, rank as u32, &ranks).unwrap_or_else(|| {
                panic!("r50k_base token {rank} is not one merge of lower ranks")
            });
            (byte_text(a, &chars), byte_text(b, &chars))
        })
        .collect()
}

/// tokenizer.json for `tok`.
pub fn tokenizer_json(tok: Tokenizer) -> Value {
    let chars = byte_chars();
    let (vocab, merges, added, use_regex): (
        serde_json::Map<String, Value>,
        Vec<String>,
        Value,
        bool,
    ) = match tok {
        Tokenizer::Bytes => (
            (0..256).map(|b| (chars[b].to_string(), json!(b))).collect(),
            Vec::new(),
            json!([]),
            false,
        ),
        Tokenizer::Gpt2 => (
            gpt2_tokens()
                .iter()
                .enumerate()
                .map(|(id, t)| (byte_text(t, &chars), json!(id)))
                .collect(),
            gpt2_merges()
                .into_iter()
                .map(|(a, b)| format!("{a} {b}"))
                .collect(),
            json!([{
                "id": GPT2_EOT,
                "content": "<|endoftext|>",
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": true
            }]),
            true,
        ),
    };
    let byte_level = |add_prefix_space: bool, trim_offsets: bool| {
        json!({
            "type": "ByteLevel",
            "add_prefix_space": add_prefix_space,
            "trim_offsets": trim_offsets,
            "use_regex": use_regex
        })
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level(false, true),
        "post_processor": byte_level(false, false),
        "decoder": byte_level(false, true),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "vocab": vocab,
            "merges": merges
        }
    })
}

/// tokenizer_config.json: the fast tokenizer class and its special tokens.
pub fn tokenizer_config(tok: Tokenizer, seq_len: usize) -> Value {
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": false,
        "add_prefix_space": false,
    });
    if tok == Tokenizer::Gpt2 {
        for key in ["bos_token", "eos_token", "unk_token"] {
            cfg[key] = json!("<|endoftext|>");
        }
    }
    cfg
}

#[cfg(test)]
mod tests;
