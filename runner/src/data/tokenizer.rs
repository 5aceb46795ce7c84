//! Tokenizers: raw bytes, or GPT-2's BPE (tiktoken's r50k_base, embedded in tiktoken-rs).

use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tokenizer {
    /// One token per UTF-8 byte; vocabulary 256.
    #[default]
    Bytes,
    /// GPT-2 byte-level BPE (r50k_base); vocabulary 50257, <|endoftext|> = 50256.
    Gpt2,
}

/// GPT-2's end-of-text token, placed between documents.
pub const GPT2_EOT: u32 = 50256;

struct Gpt2 {
    bpe: tiktoken_rs::CoreBPE,
    /// UTF-8 bytes each token stands for (0 for <|endoftext|>, which is not text).
    byte_len: Vec<u8>,
}

fn gpt2() -> &'static Gpt2 {
    static GPT2: OnceLock<Gpt2> = OnceLock::new();
    GPT2.get_or_init(|| {
        let bpe = tiktoken_rs::r50k_base().expect("tiktoken-rs embeds r50k_base");
        let byte_len = (0..GPT2_EOT)
            .map(|t| bpe.decode_bytes(&[t]).map_or(0, |b| b.len() as u8))
            .chain(std::iter::once(0))
            .collect();
        Gpt2 { bpe, byte_len }
    })
}

impl Tokenizer {
    /// Number of distinct token ids.
    pub fn vocab(self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Gpt2 => 50257,
        }
    }

    /// The model's embedding rows: GPT-2's vocabulary padded to a multiple of 64 (50304, as
    /// in nanoGPT) so matmuls tile evenly; the padding rows are never targets.
    pub fn model_vocab(self) -> usize {
        self.vocab().div_ceil(64) * 64
    }

    pub fn encode(self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Bytes => text.bytes().map(u32::from).collect(),
            Tokenizer::Gpt2 => gpt2().bpe.encode_ordinary(text),
        }
    }

    /// Separator between documents: GPT-2's <|endoftext|>; a newline for bytes.
    pub fn separator(self) -> u32 {
        match self {
            Tokenizer::Bytes => u32::from(b'\n'),
            Tokenizer::Gpt2 => GPT2_EOT,
        }
    }

    /// UTF-8 bytes of text a token stands for: the denominator of bits per byte.
    pub fn byte_len(self, token: u32) -> u64 {
        match self {
            Tokenizer::Bytes => 1,
            Tokenizer::Gpt2 => gpt2().byte_len.get(token as usize).copied().unwrap_or(0) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_matches_known_encodings_and_byte_lengths() {
        // "Hello world" is [15496, 995] in GPT-2 (the tokenizer's well-known example).
        let t = Tokenizer::Gpt2.encode("Hello world");
        assert_eq!(t, vec![15496, 995]);
        assert_eq!(Tokenizer::Gpt2.byte_len(15496), 5); // "Hello"
        assert_eq!(Tokenizer::Gpt2.byte_len(995), 6); // " world"
        assert_eq!(Tokenizer::Gpt2.byte_len(GPT2_EOT), 0);
        assert_eq!(Tokenizer::Gpt2.model_vocab(), 50304);
    }

    #[test]
    fn bytes_are_utf8_bytes() {
        assert_eq!(Tokenizer::Bytes.encode("é!"), vec![0xc3, 0xa9, 0x21]);
        assert_eq!(Tokenizer::Bytes.model_vocab(), 256);
    }
}
