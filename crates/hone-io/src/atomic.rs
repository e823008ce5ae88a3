//! Writing a file or a directory all or nothing, so that a reader (or a process that restarts
//! after a kill) sees the old version or the new one, never a half-written one.
//!
//! The new version is written to a hidden sibling of the target, `.NAME.tmp-PID-N` (same
//! directory, so same file system; a file's keeps its extension), flushed to disk, and renamed onto the target. A directory
//! that replaces an existing one moves the old one aside first (`.NAME.old-PID-N`), puts it back
//! if the rename fails, and removes it once the new one is in place. An uncommitted staging file
//! or directory is removed when dropped, so an error or a panic leaves nothing behind; what a
//! killed process leaves carries `.tmp-` or `.old-` in its name, for callers that sweep such
//! leftovers.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Numbers the staging names of this process, so that two writers in one process never share one.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` through a [`StagedFile`]: parents are created, the old file (if any)
/// is replaced only once the new one is on disk.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let staged = StagedFile::new(path)?;
    staged
        .file()
        .write_all(bytes)
        .map_err(|e| Error::new(staged.path(), e))?;
    staged.commit()
}

/// A temporary file beside `target` that becomes `target` on [`StagedFile::commit`] and is
/// removed when dropped uncommitted. Write through [`StagedFile::file`], or let a library write
/// to [`StagedFile::path`] (it exists, empty, with the permissions of a newly created file).
pub struct StagedFile {
    tmp: PathBuf,
    target: PathBuf,
    file: File,
    committed: bool,
}

impl StagedFile {
    /// Creates the temporary file (and any missing parent directory of `target`).
    pub fn new(target: &Path) -> Result<Self> {
        let (parent, name) = split(target)?;
        std::fs::create_dir_all(&parent).map_err(|e| Error::new(&parent, e))?;
        // The extension is kept, for libraries that choose a format by it (plotters).
        let ext = target
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()));
        let (tmp, file) = create_unique(&parent, &name, ext.as_deref().unwrap_or(""), |p| {
            OpenOptions::new().write(true).create_new(true).open(p)
        })?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            file,
            committed: false,
        })
    }

    /// The temporary file's path.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The temporary file, open for writing.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Flushes the file to disk and renames it onto the target.
    pub fn commit(mut self) -> Result<()> {
        // Reopened, so that what a library wrote through the path is flushed too.
        File::open(&self.tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::new(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::new(&self.target, e))?;
        self.committed = true;
        sync_parent(&self.target);
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A temporary directory beside `target` that becomes `target` on [`StagedDir::commit`],
/// replacing an existing directory only once the new one is complete, and is removed when
/// dropped uncommitted.
pub struct StagedDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Creates the temporary directory (and any missing parent directory of `target`).
    pub fn new(target: &Path) -> Result<Self> {
        let (parent, name) = split(target)?;
        std::fs::create_dir_all(&parent).map_err(|e| Error::new(&parent, e))?;
        let (tmp, ()) = create_unique(&parent, &name, "", |p| std::fs::create_dir(p))?;
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

    /// Flushes every file to disk and renames the directory onto the target. An existing target
    /// is renamed aside first, put back if the rename fails, and removed afterwards (a failure
    /// to remove it is logged, not returned: the new directory is in place).
    pub fn commit(mut self) -> Result<()> {
        sync_tree(&self.tmp)?;
        let aside = if self.target.exists() {
            let (parent, name) = split(&self.target)?;
            let aside = parent.join(format!(".{name}.old-{}", suffix()));
            std::fs::rename(&self.target, &aside).map_err(|e| Error::new(&self.target, e))?;
            Some(aside)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
            if let Some(aside) = &aside {
                let _ = std::fs::rename(aside, &self.target);
            }
            return Err(Error::new(&self.target, e));
        }
        self.committed = true;
        sync_parent(&self.target);
        if let Some(aside) = aside {
            let removed = if aside.is_dir() {
                std::fs::remove_dir_all(&aside)
            } else {
                std::fs::remove_file(&aside)
            };
            if let Err(e) = removed {
                tracing::warn!("could not remove the replaced {}: {e}", aside.display());
            }
        }
        Ok(())
    }
}

impl StagedDir {
    /// As [`StagedDir::commit`], but never replaces: when `target` already exists (another
    /// writer finished the same directory first), the staged copy is removed and `false` is
    /// returned; `true` when this one is now in place.
    pub fn commit_if_absent(mut self) -> Result<bool> {
        sync_tree(&self.tmp)?;
        // A directory is renamed onto an existing one only if that one is empty: a complete
        // directory written by another process makes the rename fail, and theirs is kept.
        if self.target.exists() && !is_empty_dir(&self.target) {
            return Ok(false);
        }
        match std::fs::rename(&self.tmp, &self.target) {
            Ok(()) => {
                self.committed = true;
                sync_parent(&self.target);
                Ok(true)
            }
            Err(_) if self.target.exists() && !is_empty_dir(&self.target) => Ok(false),
            Err(e) => Err(Error::new(&self.target, e)),
        }
    }
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// `target`'s directory (`.` for a bare name) and file name.
fn split(target: &Path) -> Result<(PathBuf, String)> {
    let name = target.file_name().ok_or_else(|| {
        Error::new(
            target,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "has no file name"),
        )
    })?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_string_lossy().into_owned()))
}

/// `PID-N`, unique within this process.
fn suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates `.NAME.tmp-PID-N` (then `ext`) in `parent` with `create`, which must fail with
/// `AlreadyExists` on a taken name. A taken name is a leftover of a killed process that had the same id: it is
/// removed and the creation tried once more.
fn create_unique<T>(
    parent: &Path,
    name: &str,
    ext: &str,
    create: impl Fn(&Path) -> std::io::Result<T>,
) -> Result<(PathBuf, T)> {
    let tmp = parent.join(format!(".{name}.tmp-{}{ext}", suffix()));
    match create(&tmp) {
        Ok(made) => Ok((tmp, made)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = if tmp.is_dir() {
                std::fs::remove_dir_all(&tmp)
            } else {
                std::fs::remove_file(&tmp)
            };
            let made = create(&tmp).map_err(|e| Error::new(&tmp, e))?;
            Ok((tmp, made))
        }
        Err(e) => Err(Error::new(&tmp, e)),
    }
}

/// Flushes every file under `dir` to disk.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::new(dir, e))? {
        let entry = entry.map_err(|e| Error::new(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::new(&path, e))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::new(&path, e))?;
        }
    }
    Ok(())
}

/// Flushes the directory entry of a rename (best effort: not every platform can open a
/// directory).
fn sync_parent(target: &Path) {
    if let Ok((parent, _)) = split(target) {
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn commit_if_absent_keeps_the_first_complete_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("entry");
        let first = StagedDir::new(&target).unwrap();
        let second = StagedDir::new(&target).unwrap();
        std::fs::write(first.path().join("f"), b"first").unwrap();
        std::fs::write(second.path().join("f"), b"second").unwrap();
        assert!(first.commit_if_absent().unwrap());
        assert!(!second.commit_if_absent().unwrap());
        assert_eq!(std::fs::read(target.join("f")).unwrap(), b"first");
        // An empty directory in the way (made by hand) is replaced.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let third = StagedDir::new(&empty).unwrap();
        std::fs::write(third.path().join("f"), b"third").unwrap();
        assert!(third.commit_if_absent().unwrap());
        assert_eq!(names(tmp.path()), ["empty", "entry"]);
    }

    #[test]
    fn write_file_replaces_and_leaves_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("sub/out.json");
        write_file(&path, b"one").unwrap();
        write_file(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(names(&dir.join("sub")), ["out.json"]);
    }

    #[test]
    fn staged_file_dropped_uncommitted_leaves_the_old_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("out.txt");
        write_file(&path, b"old").unwrap();
        let staged = StagedFile::new(&path).unwrap();
        std::fs::write(staged.path(), b"half").unwrap();
        drop(staged);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir), ["out.txt"]);
    }

    #[test]
    fn staged_dir_replaces_an_existing_directory_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let target = dir.join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("stale.txt"), b"old").unwrap();
        let staged = StagedDir::new(&target).unwrap();
        std::fs::create_dir(staged.path().join("nested")).unwrap();
        std::fs::write(staged.path().join("nested/new.txt"), b"new").unwrap();
        assert!(staged
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".out.tmp-"));
        staged.commit().unwrap();
        assert_eq!(names(&target), ["nested"]);
        assert_eq!(
            std::fs::read(target.join("nested/new.txt")).unwrap(),
            b"new"
        );
        assert_eq!(names(dir), ["out"]);
    }

    #[test]
    fn staged_dir_dropped_uncommitted_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let staged = StagedDir::new(&dir.join("out")).unwrap();
        std::fs::write(staged.path().join("a"), b"a").unwrap();
        drop(staged);
        assert!(names(dir).is_empty());
    }
}
