//! llm.c / modded-nanogpt token shards: a header of 256 little-endian int32 (magic 20240520,
//! version 1, token count), then the tokens as little-endian uint16. FineWeb shards made by
//! those projects' scripts load as they are, memory-mapped.

use std::io::Write;
use std::path::Path;

use super::tokens::TokenData;

pub const SHARD_MAGIC: i32 = 20240520;
const HEADER_BYTES: usize = 256 * 4;

/// Maps a shard after checking its header against its size.
pub fn map(file: &Path) -> Result<TokenData, String> {
    let shown = file.display();
    let map = super::map_file(file)?;
    if map.len() < HEADER_BYTES {
        return Err(format!(
            "{shown} is {} bytes, shorter than the 1024-byte header of a .bin token shard",
            map.len()
        ));
    }
    let word = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if word(0) != SHARD_MAGIC {
        return Err(format!(
            "{shown} is not an llm.c token shard: magic {} instead of {SHARD_MAGIC}",
            word(0)
        ));
    }
    if word(1) != 1 {
        return Err(format!(
            "{shown}: shard version {} is not supported (version 1: uint16 tokens)",
            word(1)
        ));
    }
    let len = usize::try_from(word(2)).map_err(|_| format!("{shown}: negative token count"))?;
    let expected = HEADER_BYTES + 2 * len;
    if map.len() != expected {
        return Err(format!(
            "{shown}: header says {len} tokens ({expected} bytes) but the file has {} bytes; \
             it may be truncated",
            map.len()
        ));
    }
    Ok(TokenData::MappedU16 {
        map,
        offset: HEADER_BYTES,
        len,
    })
}

/// Writes tokens as a version-1 shard (for tests and for converting corpora).
pub fn write_shard(file: &Path, tokens: &[u16]) -> std::io::Result<()> {
    let mut header = [0i32; 256];
    header[0] = SHARD_MAGIC;
    header[1] = 1;
    header[2] = i32::try_from(tokens.len()).map_err(std::io::Error::other)?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
    for w in header {
        out.write_all(&w.to_le_bytes())?;
    }
    for t in tokens {
        out.write_all(&t.to_le_bytes())?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sweep-shards-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_written_shard_reads_back_byte_for_byte() {
        let f = dir().join("a.bin");
        write_shard(&f, &[50256, 15496, 995, 0, 65535]).unwrap();
        // Independent check of the layout: 1024-byte header, then little-endian u16.
        let raw = std::fs::read(&f).unwrap();
        assert_eq!(raw.len(), 1024 + 10);
        assert_eq!(&raw[0..4], &20240520i32.to_le_bytes());
        assert_eq!(&raw[8..12], &5i32.to_le_bytes());
        assert_eq!(&raw[1024..1026], &[0x50, 0xc4]); // 50256 = 0xc450
        let data = map(&f).unwrap();
        let mut out = Vec::new();
        data.extend(0..5, &mut out);
        assert_eq!(out, vec![50256, 15496, 995, 0, 65535]);
    }

    #[test]
    fn truncated_and_foreign_files_are_refused() {
        let f = dir().join("b.bin");
        write_shard(&f, &[1, 2, 3]).unwrap();
        let raw = std::fs::read(&f).unwrap();
        std::fs::write(&f, &raw[..raw.len() - 1]).unwrap();
        assert!(map(&f).err().unwrap().contains("truncated"));
        std::fs::write(&f, vec![0u8; 2048]).unwrap();
        assert!(map(&f).err().unwrap().contains("not an llm.c token shard"));
    }
}
