//! safetensors files: memory-mapped reading with dtype conversion to float32, and atomic
//! writing (temp file, fsync, rename) so a file is either complete or absent.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, IoContext, Result};

/// A memory-mapped safetensors file; the header is parsed once, when it is opened.
pub struct TensorFile {
    path: PathBuf,
    mmap: Bytes,
    /// Where the tensor data starts (after the 8-byte length and the JSON header).
    data_start: usize,
    header: Metadata,
}

/// A file's bytes: mapped (large, long-lived files) or read (files that may change under a
/// running job, where a mapping would turn a truncation into SIGBUS).
enum Bytes {
    Mapped(Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Read(v) => v,
        }
    }
}

/// One tensor's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorFile {
    /// Maps a regular file (a directory, FIFO or device is refused before it is opened,
    /// so a FIFO cannot block the process).
    pub fn open(path: &Path) -> Result<Self> {
        check_regular(path)?;
        let file = File::open(path).at(path)?;
        // SAFETY: the file is only read; flowstep never maps a file it writes concurrently.
        let mmap = unsafe { Mmap::map(&file) }.at(path)?;
        Self::parse(path, Bytes::Mapped(mmap))
    }

    /// Reads a regular file of `len` bytes into memory: a file of another length (it
    /// changed since `len` was taken) is an error.
    pub fn read(path: &Path, len: u64) -> Result<Self> {
        use std::io::Read;
        check_regular(path)?;
        let mut bytes = Vec::new();
        File::open(path).at(path)?.take(len.saturating_add(1)).read_to_end(&mut bytes).at(path)?;
        if bytes.len() as u64 != len {
            return Err(Error::Tensor { path: path.to_path_buf(), reason: format!("changed while the job runs ({len} bytes when it started, {} now)", bytes.len()) });
        }
        Self::parse(path, Bytes::Read(bytes))
    }

    fn parse(path: &Path, bytes: Bytes) -> Result<Self> {
        let (header_len, header) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::Tensor {
            path: path.to_path_buf(),
            reason: format!("not a valid safetensors file: {e}"),
        })?;
        Ok(Self { path: path.to_path_buf(), mmap: bytes, data_start: 8 + header_len, header })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        self.header.offset_keys()
    }

    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        self.header.info(name).map(|t| TensorInfo { dtype: t.dtype, shape: t.shape.clone() })
    }

    /// A tensor's dtype, shape and raw little-endian bytes (borrowed from the map).
    fn raw(&self, name: &str) -> Result<(Dtype, &[usize], &[u8])> {
        let info = self.header.info(name).ok_or_else(|| Error::Tensor {
            path: self.path.clone(),
            reason: format!("has no tensor `{name}`"),
        })?;
        // read_metadata checked that every tensor's offsets lie inside the file.
        let (begin, end) = info.data_offsets;
        Ok((info.dtype, &info.shape, &self.mmap[self.data_start + begin..self.data_start + end]))
    }

    /// A tensor as bfloat16: BF16 bits as stored (no float32 copy), F32 and F16 rounded to
    /// nearest even.
    pub fn read_bf16(&self, name: &str) -> Result<(Vec<usize>, Vec<bf16>)> {
        let (dtype, shape, data) = self.raw(name)?;
        let values = match dtype {
            Dtype::BF16 => data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect(),
            _ => self.read_f32(name)?.1.into_iter().map(bf16::from_f32).collect(),
        };
        Ok((shape.to_vec(), values))
    }

    /// A float8_e4m3fn tensor's bytes as stored (any other dtype is an error naming it).
    pub fn read_fp8(&self, name: &str) -> Result<(Vec<usize>, &[u8])> {
        let (dtype, shape, data) = self.raw(name)?;
        if dtype != Dtype::F8_E4M3 {
            return Err(Error::Tensor { path: self.path.clone(), reason: format!("tensor `{name}` has dtype {dtype:?}; expected F8_E4M3") });
        }
        Ok((shape.to_vec(), data))
    }

    /// The file's `__metadata__` strings, if it has any.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.header.metadata().as_ref()
    }

    /// A one-element tensor of any float or integer dtype (a LoRA's `.alpha`: trainers
    /// write it as float, bf16 or int64).
    pub fn read_scalar(&self, name: &str) -> Result<f64> {
        let (dtype, shape, data) = self.raw(name)?;
        let value = match (dtype, data) {
            (Dtype::F64, &[a, b, c, d, e, f, g, h]) => f64::from_le_bytes([a, b, c, d, e, f, g, h]),
            (Dtype::F32, &[a, b, c, d]) => f32::from_le_bytes([a, b, c, d]) as f64,
            (Dtype::BF16, &[a, b]) => bf16::from_le_bytes([a, b]).to_f64(),
            (Dtype::F16, &[a, b]) => f16::from_le_bytes([a, b]).to_f64(),
            (Dtype::I64, &[a, b, c, d, e, f, g, h]) => i64::from_le_bytes([a, b, c, d, e, f, g, h]) as f64,
            (Dtype::I32, &[a, b, c, d]) => i32::from_le_bytes([a, b, c, d]) as f64,
            _ => {
                return Err(Error::Tensor {
                    path: self.path.clone(),
                    reason: format!("tensor `{name}` ({dtype:?}, shape {shape:?}) is not a single float or integer"),
                });
            }
        };
        Ok(value)
    }

    /// A tensor as float32 (from F32, BF16 or F16), with its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (dtype, shape, data) = self.raw(name)?;
        let values = match dtype {
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(Error::Tensor {
                    path: self.path.clone(),
                    reason: format!("tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16"),
                });
            }
        };
        Ok((shape.to_vec(), values))
    }
}

/// A path that must be a regular file: anything else is an error saying what it is.
pub fn check_regular(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).at(path)?;
    if !meta.is_file() {
        return Err(Error::Tensor { path: path.to_path_buf(), reason: format!("is {}, expected a .safetensors file", crate::artifacts::kind_of(&meta)) });
    }
    Ok(())
}

/// Output precision of a written tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveDtype {
    F32,
    Bf16,
}

/// A tensor to write.
pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Serialises tensors to safetensors bytes in the given dtype. The header is written with
/// sorted keys, so the same tensors always give the same bytes (the safetensors crate's
/// metadata map has a random iteration order).
pub fn encode(tensors: &[OutTensor], dtype: SaveDtype, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    encode_with(tensors, |_| dtype, metadata)
}

/// `encode` with a dtype chosen per tensor (a bf16 LoRA file keeps its scalar alphas in f32).
pub fn encode_with(tensors: &[OutTensor], dtype_of: impl Fn(&OutTensor) -> SaveDtype, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        let sorted: std::collections::BTreeMap<String, String> = meta.into_iter().collect();
        header.insert("__metadata__".into(), serde_json::json!(sorted));
    }
    let mut offset = 0usize;
    for t in tensors {
        if t.values.len() != t.shape.iter().product::<usize>() {
            return Err(Error::Shape { name: t.name.clone(), expected: t.shape.clone(), got: vec![t.values.len()] });
        }
        let (name, width) = match dtype_of(t) {
            SaveDtype::F32 => ("F32", 4),
            SaveDtype::Bf16 => ("BF16", 2),
        };
        let end = offset + t.values.len() * width;
        header.insert(t.name.clone(), serde_json::json!({"dtype": name, "shape": t.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    // serde_json's Map is a BTreeMap here (no preserve_order feature): keys come out sorted.
    let mut json = serde_json::to_vec(&header).map_err(|e| Error::Config(e.to_string()))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + json.len() + offset);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    for t in tensors {
        match dtype_of(t) {
            SaveDtype::F32 => t.values.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
            SaveDtype::Bf16 => t.values.iter().for_each(|v| bytes.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename,
/// fsync of the directory. A crash leaves the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        std::fs::rename(&tmp, path).at(path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the temp files `write_atomic` and the directories [`Staging`] leave in `dir` when a
/// process is killed mid-write (`.NAME.tmp-PID`). Only call it while holding the directory's lock.
pub fn clean_temp(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let is_temp = name.starts_with('.') && name.rsplit_once(".tmp-").is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        let meta = std::fs::symlink_metadata(&path).at(&path)?;
        if is_temp && meta.is_file() {
            std::fs::remove_file(&path).at(&path)?;
            removed += 1;
        } else if is_temp && meta.is_dir() {
            std::fs::remove_dir_all(&path).at(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A directory of outputs that appear under their final names only when all are written:
/// they go into a hidden sibling (`.NAME.tmp-PID`), and [`Staging::commit`] moves them into
/// `NAME` (created if needed; entries of the same name are replaced, others kept). Dropped
/// without a commit (an error on the way), the sibling and everything in it is removed.
pub struct Staging {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn new(target: &Path) -> Result<Self> {
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).at(parent)?;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if std::fs::symlink_metadata(&tmp).is_ok() {
            std::fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        std::fs::create_dir(&tmp).at(&tmp)?;
        Ok(Self { tmp, target: target.to_path_buf(), committed: false })
    }

    /// Where to write the outputs.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves every output to its final name.
    pub fn commit(mut self) -> Result<()> {
        if std::fs::symlink_metadata(&self.target).is_err() {
            std::fs::rename(&self.tmp, &self.target).at(&self.target)?;
        } else {
            let entries = std::fs::read_dir(&self.tmp).at(&self.tmp)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<Vec<_>>>().at(&self.tmp)?;
            // Every name is checked before anything moves: an output only replaces one of its
            // own kind (a file a file; a directory, such as a step sampled again, a directory).
            let mut replaced_dirs = Vec::new();
            for staged in &entries {
                let dest = self.target.join(staged.file_name().unwrap_or_default());
                let (Ok(have), Ok(want)) = (std::fs::symlink_metadata(&dest), std::fs::symlink_metadata(staged)) else { continue };
                if have.is_dir() != want.is_dir() || have.file_type().is_symlink() {
                    return Err(Error::Data { path: dest, reason: format!("is {}, where an output goes; move it away", crate::artifacts::kind_of(&have)) });
                }
                if have.is_dir() {
                    replaced_dirs.push(dest);
                }
            }
            for dest in replaced_dirs {
                std::fs::remove_dir_all(&dest).at(&dest)?;
            }
            for staged in entries {
                let dest = self.target.join(staged.file_name().unwrap_or_default());
                std::fs::rename(&staged, &dest).at(&dest)?;
            }
            std::fs::remove_dir(&self.tmp).at(&self.tmp)?;
        }
        self.committed = true;
        let parent = self.target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        sync_dir(parent)
    }

    /// Puts the outputs in place of the target directory as a whole (`flowstep sample
    /// --overwrite`): the old one is moved aside, the outputs renamed into place, and only
    /// then the old one removed, so no file of it is left among the new ones.
    pub fn commit_replacing(self) -> Result<()> {
        let Ok(meta) = std::fs::symlink_metadata(&self.target) else { return self.commit() };
        if !meta.is_dir() {
            return Err(Error::Data { path: self.target.clone(), reason: format!("is {}, expected a directory", crate::artifacts::kind_of(&meta)) });
        }
        let old = self.tmp.with_extension(format!("old-{}", std::process::id()));
        std::fs::rename(&self.target, &old).at(&self.target)?;
        self.commit()?;
        std::fs::remove_dir_all(&old).at(&old)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// fsync a directory so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_f32_and_bf16() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let t = OutTensor { name: "a.weight".into(), shape: vec![2, 3], values: vec![1.0, -2.5, 3.25, 0.1, 1e-3, 7.0] };
        for dtype in [SaveDtype::F32, SaveDtype::Bf16] {
            let path = dir.path().join(format!("{dtype:?}.safetensors"));
            write_atomic(&path, &encode(std::slice::from_ref(&t), dtype, None)?)?;
            let (shape, values) = TensorFile::open(&path)?.read_f32("a.weight")?;
            assert_eq!(shape, vec![2, 3]);
            for (a, b) in values.iter().zip(&t.values) {
                let tol = if dtype == SaveDtype::F32 { 0.0 } else { b.abs() / 128.0 };
                assert!((a - b).abs() <= tol, "{dtype:?}: {a} vs {b}");
            }
        }
        let missing = TensorFile::open(&dir.path().join("F32.safetensors"))?.read_f32("nope");
        assert!(matches!(missing, Err(Error::Tensor { .. })));
        Ok(())
    }
}
