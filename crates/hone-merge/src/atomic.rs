//! Writing an output directory all or nothing: files go to a hidden temporary sibling
//! (`.NAME.tmp-PID`), which is renamed onto the output once complete. On an error, or a panic,
//! the temporary directory is removed, so a failed run leaves nothing behind; an existing output
//! (replaced with `force`) is only moved aside once the new one is complete.

use std::path::{Path, PathBuf};

use crate::error::{MergeError, Result};

/// A temporary directory that becomes `target` on [`StagedDir::commit`] and disappears when
/// dropped uncommitted.
pub struct StagedDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Checks `target` (it must not exist unless `force`) and creates the temporary directory
    /// beside it (creating missing parents).
    pub fn create(target: &Path, force: bool) -> Result<Self> {
        if target.exists() && !force {
            return Err(MergeError::OutputExists {
                path: target.to_path_buf(),
            });
        }
        let name = target
            .file_name()
            .ok_or_else(|| {
                hone_model::ModelError::Input(format!("{}: not a directory name", target.display()))
            })?
            .to_string_lossy()
            .to_string();
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| MergeError::io(parent, e))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| MergeError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| MergeError::io(&tmp, e))?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// The directory to fill.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes every file to disk and renames the directory onto the target, replacing an
    /// existing target only after the new directory is complete.
    pub fn commit(mut self) -> Result<()> {
        for entry in std::fs::read_dir(&self.tmp).map_err(|e| MergeError::io(&self.tmp, e))? {
            let path = entry.map_err(|e| MergeError::io(&self.tmp, e))?.path();
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| MergeError::io(&path, e))?;
        }
        let old = self.tmp.with_file_name(
            self.tmp
                .file_name()
                .map(|n| n.to_string_lossy().replace(".tmp-", ".old-"))
                .unwrap_or_default(),
        );
        let had_old = self.target.exists();
        if had_old {
            std::fs::rename(&self.target, &old).map_err(|e| MergeError::io(&self.target, e))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
            if had_old {
                let _ = std::fs::rename(&old, &self.target);
            }
            return Err(MergeError::io(&self.target, e));
        }
        self.committed = true;
        if had_old {
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            if let Err(e) = removed {
                tracing::warn!(
                    "could not remove the replaced output {}: {e}",
                    old.display()
                );
            }
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
