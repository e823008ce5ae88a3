//! The adapters directory (`--adapters-dir`): the only place adapters are loaded from while the
//! server runs, by name (`model: NAME` loads `DIR/NAME`) or by `lora_path` in
//! `/v1/load_lora_adapter`.
//!
//! A path resolves to an adapter only when, after following symlinks (`canonicalize`), it lies
//! strictly inside the directory, holds an `adapter_config.json`, and neither that file nor the
//! weights file leads outside. Everything else (outside, missing, not a directory, not an
//! adapter) is the same `None`, so that a request learns nothing about the rest of the file
//! system; detailed load errors only ever concern files inside the directory.

use std::path::{Path, PathBuf};

use hone_model::adapter::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};

use crate::config::validate_adapter_name;
use crate::error::{Result, ServeError};

/// The canonical adapters directory.
#[derive(Debug, Clone)]
pub(crate) struct AdaptersDir {
    root: PathBuf,
}

impl AdaptersDir {
    /// Resolves `dir` (which must exist) to its canonical form.
    pub fn open(dir: &Path) -> Result<Self> {
        let root = dir.canonicalize().map_err(|source| ServeError::Io {
            context: format!("resolving the adapters directory {}", dir.display()),
            source,
        })?;
        Ok(Self { root })
    }

    /// The canonical directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The canonical adapter folder `path` names: relative paths are taken inside the directory,
    /// absolute ones must point into it. `None` for anything that is not an adapter folder
    /// inside it.
    pub fn resolve(&self, path: &Path) -> Option<PathBuf> {
        let folder = self.inside(&self.root.join(path))?;
        if folder == self.root || !folder.is_dir() {
            return None;
        }
        self.inside(&folder.join(ADAPTER_CONFIG))
            .filter(|config| config.is_file())?;
        let weights = folder.join(ADAPTER_WEIGHTS);
        if weights.symlink_metadata().is_ok() && self.inside(&weights).is_none() {
            return None;
        }
        Some(folder)
    }

    /// The adapter folder of adapter `name` (a valid adapter name, one folder deep).
    pub fn by_name(&self, name: &str) -> Option<PathBuf> {
        validate_adapter_name(name).ok()?;
        self.resolve(Path::new(name))
    }

    /// `path` with symlinks resolved, when it exists inside the directory.
    fn inside(&self, path: &Path) -> Option<PathBuf> {
        let canonical = path.canonicalize().ok()?;
        canonical.starts_with(&self.root).then_some(canonical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(ADAPTER_CONFIG), "{}").unwrap();
    }

    #[test]
    fn only_adapter_folders_inside_the_directory_resolve() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("adapters");
        adapter(&root.join("math"));
        adapter(&root.join("team/code"));
        adapter(&tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("empty")).unwrap();
        let dir = AdaptersDir::open(&root).unwrap();
        let canonical = root.canonicalize().unwrap();
        assert_eq!(dir.resolve(Path::new("math")), Some(canonical.join("math")));
        assert_eq!(
            dir.resolve(Path::new("team/code")),
            Some(canonical.join("team/code"))
        );
        assert_eq!(
            dir.resolve(&canonical.join("math")),
            Some(canonical.join("math")),
            "an absolute path inside the directory"
        );
        for refused in [
            "../outside",
            "math/../../outside",
            "empty",
            "missing",
            ".",
            "",
            "/etc",
            "/etc/passwd",
            "/",
        ] {
            assert_eq!(dir.resolve(Path::new(refused)), None, "{refused}");
        }
        let outside = tmp.path().join("outside").canonicalize().unwrap();
        assert_eq!(dir.resolve(&outside), None);
        assert_eq!(dir.by_name("math"), Some(canonical.join("math")));
        assert_eq!(dir.by_name("team/code"), None, "names are one folder deep");
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_leading_out_of_the_directory_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("adapters");
        std::fs::create_dir_all(&root).unwrap();
        adapter(&tmp.path().join("outside"));
        std::os::unix::fs::symlink(tmp.path().join("outside"), root.join("link")).unwrap();
        // A folder inside whose config file points out.
        std::fs::create_dir_all(root.join("sneaky")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("sneaky").join(ADAPTER_CONFIG))
            .unwrap();
        // A symlink that stays inside is fine.
        adapter(&root.join("real"));
        std::os::unix::fs::symlink(root.join("real"), root.join("alias")).unwrap();
        let dir = AdaptersDir::open(&root).unwrap();
        assert_eq!(dir.resolve(Path::new("link")), None);
        assert_eq!(dir.by_name("link"), None);
        assert_eq!(dir.resolve(Path::new("sneaky")), None);
        assert_eq!(
            dir.by_name("alias"),
            Some(root.canonicalize().unwrap().join("real"))
        );
    }
}
