//! The files an artifacts directory lists: each must resolve to a regular file inside the
//! directory (no `..`, absolute paths or symlinks leading out, no devices or FIFOs) and
//! match its sha256, read no further than the size the file had when it was opened.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Artifacts;
use crate::error::{Error, IoContext, Result};

/// What kind of thing is at a path, for messages ("is a directory", "is a FIFO").
pub fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// `name`, as a manifest (`manifest`, in `dir`, which messages call `place`) lists it, as a
/// path inside `dir` (canonical: symlinks resolved) naming a regular file. Absolute names, `..` and symlinks that lead out
/// of `dir` are refused: a manifest from a stranger reads nothing the user did not give.
pub fn resolve_inside(dir: &Path, place: &str, manifest: &Path, name: &str) -> Result<PathBuf> {
    let bad = |reason: String| Error::Manifest { path: manifest.to_path_buf(), reason };
    let relative = Path::new(name);
    if name.is_empty() || !relative.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(bad(format!("file `{name}` is not a plain name inside {place} (absolute paths and `..` are refused)")));
    }
    let joined = dir.join(relative);
    let real = std::fs::canonicalize(&joined).at(&joined)?;
    let root = std::fs::canonicalize(dir).at(dir)?;
    if !real.starts_with(&root) {
        return Err(bad(format!("file `{name}` resolves to {}, outside {place}", real.display())));
    }
    let meta = std::fs::metadata(&real).at(&real)?;
    if !meta.is_file() {
        return Err(bad(format!("file `{name}` is {}, not a regular file", kind_of(&meta))));
    }
    Ok(real)
}

/// Resolves and hashes every file in `files`; returns name -> resolved path.
pub(super) fn check_files(a: &Artifacts) -> Result<BTreeMap<String, PathBuf>> {
    let mut resolved = BTreeMap::new();
    for (name, want) in &a.manifest.files {
        let path = resolve_inside(&a.dir, "the artifacts directory", &a.dir.join("manifest.json"), name)?;
        let got = sha256_file(&path)?;
        if &got != want {
            return Err(Error::Manifest {
                path,
                reason: format!("sha256 {got} does not match the manifest ({want}); the file was changed or truncated after export"),
            });
        }
        resolved.insert(name.clone(), path);
    }
    Ok(resolved)
}

/// sha256 of a regular file, reading exactly the length its metadata gave at open; a file
/// that grows or shrinks meanwhile is an error.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).at(path)?;
    let meta = file.metadata().at(path)?;
    if !meta.is_file() {
        return Err(Error::Tensor { path: path.to_path_buf(), reason: format!("is {}, not a regular file", kind_of(&meta)) });
    }
    let len = meta.len();
    let mut reader = file.take(len + 1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = reader.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        read += n as u64;
        hasher.update(&buf[..n]);
    }
    if read != len {
        return Err(Error::Tensor { path: path.to_path_buf(), reason: format!("changed while it was read ({len} bytes at open, {read} read)") });
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
