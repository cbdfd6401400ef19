//! Small text files flowstep reads whole (manifests, side files, prompt lists, checkpoint
//! records): a regular file only, so a FIFO cannot block the process, and read no further than
//! a size limit, so a device or a huge file cannot eat memory.

use std::io::Read;
use std::path::Path;

use crate::artifacts::kind_of;
use crate::error::{Error, IoContext, Result};

/// Reads `path` (`what` names it in errors: "VAE decoder manifest") as UTF-8 text of at most
/// `limit` bytes.
pub fn read_text(path: &Path, what: &str, limit: u64) -> Result<String> {
    let bad = |reason: String| Error::Data { path: path.to_path_buf(), reason };
    // Checked before opening: opening a FIFO for reading blocks until a writer comes.
    let meta = std::fs::metadata(path).at(path)?;
    if !meta.is_file() {
        return Err(bad(format!("is {}, expected the {what} (a regular file)", kind_of(&meta))));
    }
    let file = std::fs::File::open(path).at(path)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).at(path)?;
    if bytes.len() as u64 > limit {
        return Err(bad(format!("is larger than {limit} bytes, too large for the {what}")));
    }
    String::from_utf8(bytes).map_err(|e| bad(format!("the {what} is not UTF-8 text (byte {})", e.utf8_error().valid_up_to())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_directories_and_large_files() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; 11]).at(&big)?;
        assert!(read_text(&big, "x", 11).is_ok());
        let message = |p: &Path, limit| read_text(p, "test file", limit).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message(&big, 10).contains("larger than 10 bytes"));
        assert!(message(Path::new("/dev/zero"), 10).contains("is a device"));
        assert!(message(dir.path(), 10).contains("is a directory"));
        Ok(())
    }
}
