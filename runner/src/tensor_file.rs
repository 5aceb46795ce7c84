//! Writing a safetensors file as a stream: the header, then each tensor's bytes as they come
//! off the device, hashed (SHA-256) on the way, into a file the caller names and syncs.
//! The safetensors crate's own writer goes through a temporary file of its choosing and
//! returns no digest; this one writes where it is told (so a full disk is reported against
//! that path), never holds more than one tensor's bytes, and needs no second read for the
//! checksum. The format: an 8-byte little-endian header length, a JSON header (name ->
//! dtype, shape, byte range), padded with spaces to 8 bytes, then the data.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::Tensor;
use safetensors::tensor::TensorInfo;
use safetensors::View;
use sha2::{Digest, Sha256};

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `tensors` (in name order) to `path`, synced to disk; returns the file's SHA-256
/// (lower-case hex) and length. The error is the I/O error as the OS gave it.
pub fn write(path: &Path, tensors: &BTreeMap<String, Tensor>) -> std::io::Result<(String, u64)> {
    write_with(path, tensors, &BTreeMap::new())
}

/// [`write`] with the header's `__metadata__` (string to string; left out when empty):
/// `transformers` reads `format: pt` there.
pub fn write_with(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<(String, u64)> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(std::io::Error::other)?,
        );
    }
    let mut offset = 0;
    for (name, t) in tensors {
        let len = View::data_len(t);
        let info = TensorInfo {
            dtype: View::dtype(t),
            shape: t.dims().to_vec(),
            data_offsets: (offset, offset + len),
        };
        header.insert(
            name.clone(),
            serde_json::to_value(info).map_err(std::io::Error::other)?,
        );
        offset += len;
    }
    let mut json = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    json.resize(json.len().next_multiple_of(8), b' ');

    let file = File::create(path)?;
    let mut out = Hashing {
        inner: BufWriter::with_capacity(1 << 20, &file),
        hasher: Sha256::new(),
        len: 0,
    };
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    for t in tensors.values() {
        out.write_all(&View::data(t))?;
    }
    out.flush()?;
    let (hasher, len) = (out.hasher, out.len);
    file.sync_all()?;
    Ok((hex(&hasher.finalize()), len))
}

/// Lower-case hex of a digest, as checksums are written in manifests and the results DB.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn candle_reads_back_what_was_written_and_the_digest_is_the_files() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "model.w".to_string(),
            Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 7.0, -1.0]], &dev)?,
        );
        tensors.insert(
            "optim.m".to_string(),
            Tensor::new(&[0.5f32, 0.25], &dev)?.to_dtype(DType::BF16)?,
        );
        tensors.insert("adamw.t".to_string(), Tensor::new(&[42i64], &dev)?);
        let dir = std::env::temp_dir().join(format!("sweep-tensor-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("t.safetensors");
        let (sha, len) = write(&path, &tensors)?;

        let bytes = std::fs::read(&path)?;
        assert_eq!(bytes.len() as u64, len);
        let want = hex(&Sha256::digest(&bytes));
        assert_eq!(sha, want);
        // 8 + header + 6 f32 + 2 bf16 + 1 i64, the header padded to 8 bytes.
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(header % 8, 0);
        assert_eq!(bytes.len(), 8 + header + 24 + 4 + 8);

        let back = candle_core::safetensors::load(&path, &dev)?;
        assert_eq!(back.len(), 3);
        for (name, t) in &tensors {
            let b = &back[name];
            assert_eq!((b.dtype(), b.dims()), (t.dtype(), t.dims()), "{name}");
            let (b, t) = (b.to_dtype(DType::F64)?, t.to_dtype(DType::F64)?);
            assert_eq!(
                b.flatten_all()?.to_vec1::<f64>()?,
                t.flatten_all()?.to_vec1::<f64>()?
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
