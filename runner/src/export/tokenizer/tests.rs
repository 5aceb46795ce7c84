use std::path::Path;

use super::*;

#[test]
fn the_byte_table_is_gpt2s() {
    let chars = byte_chars();
    // GPT-2's encoder.py: printable bytes stand for themselves, space is U+0120 'Ġ', newline
    // U+010A 'Ċ', NUL U+0100 'Ā', the soft hyphen 0xAD U+0143 'Ń'.
    assert_eq!(chars[b'!' as usize], '!');
    assert_eq!(chars[b'a' as usize], 'a');
    assert_eq!(chars[b' ' as usize], 'Ġ');
    assert_eq!(chars[b'\n' as usize], 'Ċ');
    assert_eq!(chars[0], 'Ā');
    assert_eq!(chars[0xad], 'Ń');
    let mut all: Vec<char> = chars.to_vec();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 256, "one character per byte");
}

#[test]
fn gpt2s_merges_are_the_published_ones() {
    let merges = gpt2_merges();
    // 50,257 tokens: 256 bytes, 50,000 merges, <|endoftext|>.
    assert_eq!(merges.len(), 50_000);
    // The first lines of GPT-2's merges.txt.
    let first: Vec<String> = merges[..12]
        .iter()
        .map(|(a, b)| format!("{a} {b}"))
        .collect();
    assert_eq!(
        first,
        [
            "Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t", "Ġ w", "Ġ o"
        ]
    );
}

/// `tokenizers`' BPE, written from its definition as a second implementation: split the
/// text with GPT-2's own pattern (encoder.py's, not tiktoken's), map bytes to characters,
/// merge the adjacent pair listed first among the merges until none is listed, look the
/// symbols up in the vocabulary.
fn merge_bpe(text: &str, json: &Value) -> Vec<u32> {
    let model = &json["model"];
    let vocab: HashMap<&str, u32> = model["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_u64().unwrap() as u32))
        .collect();
    let merges: HashMap<(String, String), usize> = model["merges"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (a, b) = m.as_str().unwrap().split_once(' ').unwrap();
            ((a.to_string(), b.to_string()), i)
        })
        .collect();
    let pattern = fancy_regex::Regex::new(
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    )
    .unwrap();
    let chars = byte_chars();
    let mut ids = Vec::new();
    for piece in pattern.find_iter(text) {
        let piece = piece.unwrap().as_str();
        let mut symbols: Vec<String> = piece
            .bytes()
            .map(|b| chars[b as usize].to_string())
            .collect();
        loop {
            let best = (0..symbols.len().saturating_sub(1))
                .filter_map(|i| {
                    let key = (symbols[i].clone(), symbols[i + 1].clone());
                    merges.get(&key).map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let right = symbols.remove(i + 1);
            symbols[i].push_str(&right);
        }
        ids.extend(symbols.iter().map(|s| vocab[s.as_str()]));
    }
    ids
}

fn corpus(path: &str, bytes: usize) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[test]
fn the_exported_gpt2_tokenizer_gives_the_training_ids_on_the_shared_corpora() {
    let json = tokenizer_json(Tokenizer::Gpt2);
    assert_eq!(json["added_tokens"][0]["id"], 50256);
    for (path, bytes) in [
        ("tinyshakespeare/input.txt", 200_000),
        ("gutenberg/val.txt", 200_000),
        ("wikitext-2/test.txt", 200_000),
    ] {
        let text = corpus(path, bytes);
        let want = Tokenizer::Gpt2.encode(&text);
        let got = merge_bpe(&text, &json);
        assert_eq!(got.len(), want.len(), "{path}: token counts");
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            panic!("{path}: token {i} differs: {} vs {}", got[i], want[i]);
        }
    }
}

#[test]
fn the_exported_byte_tokenizer_gives_byte_values() {
    let json = tokenizer_json(Tokenizer::Bytes);
    assert_eq!(json["model"]["merges"].as_array().unwrap().len(), 0);
    assert_eq!(json["pre_tokenizer"]["use_regex"], false);
    let text = "Été, naïve  café\n\t~!";
    assert_eq!(merge_bpe(text, &json), Tokenizer::Bytes.encode(text));
    let vocab = json["model"]["vocab"].as_object().unwrap();
    assert_eq!(vocab.len(), 256);
}
