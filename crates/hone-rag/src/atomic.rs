//! Writing files and directories so that a reader sees the old version or the new one, never a
//! half-written one: write beside the target, then rename over it.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{RagError, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_of(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(&dir)
        .map_err(|e| RagError::io(&dir, e))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| RagError::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| RagError::io(path, e.error))?;
    Ok(())
}

/// A fresh temporary directory next to `target` (same file system, so it can be renamed onto
/// it); removed on drop unless [`replace_dir`] moved it into place.
pub(crate) fn staging_dir(target: &Path) -> Result<tempfile::TempDir> {
    let parent = parent_of(target);
    std::fs::create_dir_all(&parent).map_err(|e| RagError::io(&parent, e))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "index".into());
    tempfile::Builder::new()
        .prefix(&format!(".{name}.building-"))
        .tempdir_in(&parent)
        .map_err(|e| RagError::io(&parent, e))
}

/// Moves the finished `staged` directory to `target`, replacing what is there: the old
/// directory is renamed aside first and removed after the new one is in place (and put back if
/// that rename fails).
pub(crate) fn replace_dir(staged: tempfile::TempDir, target: &Path) -> Result<()> {
    let staged = staged.keep();
    let aside = target.exists().then(|| {
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned());
        parent_of(target).join(format!(
            ".{}.old-{}",
            name.unwrap_or_default(),
            std::process::id()
        ))
    });
    if let Some(aside) = &aside {
        std::fs::rename(target, aside).map_err(|e| RagError::io(target, e))?;
    }
    if let Err(e) = std::fs::rename(&staged, target) {
        if let Some(aside) = &aside {
            let _ = std::fs::rename(aside, target);
        }
        let _ = std::fs::remove_dir_all(&staged);
        return Err(RagError::io(target, e));
    }
    if let Some(aside) = aside {
        if let Err(e) = std::fs::remove_dir_all(&aside) {
            tracing::warn!(
                "could not remove the replaced index {}: {e}",
                aside.display()
            );
        }
    }
    Ok(())
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
