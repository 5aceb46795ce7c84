//! Token streams: memory-mapped where the file already holds the tokens (bytes of a text
//! file, uint16 of an llm.c shard), in memory where they had to be computed (BPE of text).

use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;
use rand::Rng;

/// The tokens of one file.
pub enum TokenData {
    /// A memory-mapped file whose bytes are the tokens.
    MappedBytes(Mmap),
    /// A memory-mapped llm.c shard: uint16 little-endian tokens after a header.
    MappedU16 {
        map: Mmap,
        offset: usize,
        len: usize,
    },
    /// Tokens computed at load time.
    Owned(Vec<u32>),
}

impl TokenData {
    pub fn len(&self) -> usize {
        match self {
            TokenData::MappedBytes(m) => m.len(),
            TokenData::MappedU16 { len, .. } => *len,
            TokenData::Owned(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies tokens `range` into `out`.
    pub fn extend(&self, range: Range<usize>, out: &mut Vec<u32>) {
        match self {
            TokenData::MappedBytes(m) => out.extend(m[range].iter().map(|&b| u32::from(b))),
            TokenData::MappedU16 { map, offset, .. } => {
                let bytes = &map[offset + 2 * range.start..offset + 2 * range.end];
                out.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
                );
            }
            TokenData::Owned(v) => out.extend_from_slice(&v[range]),
        }
    }
}

/// A split (train or val): ranges of token files. Windows never cross a file boundary.
#[derive(Clone, Default)]
pub struct Split {
    parts: Vec<(Arc<TokenData>, Range<usize>)>,
}

impl Split {
    pub fn push(&mut self, data: Arc<TokenData>, range: Range<usize>) {
        if !range.is_empty() {
            self.parts.push((data, range));
        }
    }

    pub fn tokens(&self) -> usize {
        self.parts.iter().map(|(_, r)| r.len()).sum()
    }

    /// Window start positions available for windows of `len` tokens.
    pub fn windows(&self, len: usize) -> usize {
        self.parts
            .iter()
            .map(|(_, r)| (r.len() + 1).saturating_sub(len))
            .sum()
    }

    /// The tokens of window number `w` (0..windows(len)) of `len` tokens.
    pub fn window(&self, w: usize, len: usize, out: &mut Vec<u32>) {
        let mut w = w;
        for (data, r) in &self.parts {
            let n = (r.len() + 1).saturating_sub(len);
            if w < n {
                data.extend(r.start + w..r.start + w + len, out);
                return;
            }
            w -= n;
        }
        panic!("window {w} out of range");
    }

    /// `batch` windows of `len` tokens at uniformly random positions, concatenated.
    pub fn sample(&self, rng: &mut impl Rng, batch: usize, len: usize) -> Vec<u32> {
        let n = self.windows(len);
        let mut out = Vec::with_capacity(batch * len);
        for _ in 0..batch {
            self.window(rng.random_range(0..n), len, &mut out);
        }
        out
    }

    /// `count` windows of `len` tokens spread evenly over the split: the fixed subset every
    /// evaluation of every trial sees.
    pub fn spread(&self, count: usize, len: usize) -> Vec<u32> {
        let n = self.windows(len);
        let mut out = Vec::with_capacity(count * len);
        for i in 0..count {
            self.window(i * n / count, len, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn split() -> Split {
        let mut s = Split::default();
        s.push(Arc::new(TokenData::Owned((0..10).collect())), 0..10);
        s.push(Arc::new(TokenData::Owned((100..104).collect())), 1..4);
        s
    }

    #[test]
    fn windows_stay_inside_one_file() {
        let s = split();
        // 10 tokens give 7 windows of 4; the second part (3 tokens) gives none.
        assert_eq!(s.windows(4), 7);
        assert_eq!(s.windows(3), 8 + 1);
        let mut out = Vec::new();
        s.window(8, 3, &mut out);
        assert_eq!(out, vec![101, 102, 103]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let b = s.sample(&mut rng, 50, 4);
        for w in b.chunks(4) {
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1), "{w:?}");
        }
    }

    #[test]
    fn spread_is_even_and_fixed() {
        let s = split();
        assert_eq!(s.spread(2, 4), vec![0, 1, 2, 3, 3, 4, 5, 6]);
        assert_eq!(s.tokens(), 13);
    }
}
