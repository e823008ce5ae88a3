//! The run directory's lock: `<run>/.lock`, an exclusive advisory `flock(2)` held for the run's
//! whole life, so that two `hone train` on one output directory cannot interleave their
//! checkpoints, metrics and adapter.
//!
//! The file holds the pid of the process that holds the lock. The kernel releases a `flock`
//! when its holder exits, however it exits (a SIGKILL included), so a lock is never left held
//! by a dead process; what a dead process leaves is its pid in the file. [`RunLock::acquire`]
//! reports that as [`RunLock::stale_holder`], and a run that ends normally clears the pid when
//! it releases the lock. `flock` locks belong to an open file description: two opens in one
//! process exclude each other too, which is how the tests check it in one process.
//!
//! Unix only: elsewhere no lock is taken.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// The lock file's name inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a run directory, released (and its pid cleared) when dropped.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    file: File,
    stale: Option<u32>,
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this `File` owns; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(not(unix))]
fn try_lock(_: &File) -> std::io::Result<bool> {
    Ok(true)
}

impl RunLock {
    /// Takes the lock of `run_dir` (which must exist) without waiting: another live holder is a
    /// [`TrainError::RunLocked`] naming its pid.
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        if !try_lock(&file).map_err(|e| TrainError::io(&path, e))? {
            let holder = match read_pid(&mut file) {
                Some(pid) => format!("pid {pid}"),
                None => "pid unknown".into(),
            };
            return Err(TrainError::RunLocked {
                path: run_dir.to_path_buf(),
                lock: path,
                holder,
            });
        }
        // Locked: a pid still in the file is a holder that died without releasing.
        let stale = read_pid(&mut file).filter(|&pid| pid != std::process::id());
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())?;
            file.sync_data()
        };
        write(&mut file).map_err(|e| TrainError::io(&path, e))?;
        Ok(Self { path, file, stale })
    }

    /// The pid of a previous holder that died while holding the lock (a killed run).
    pub fn stale_holder(&self) -> Option<u32> {
        self.stale
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Clear the pid before the lock goes (with the descriptor): a pid left in the file
        // then always means a holder that did not end normally.
        let _ = self.file.set_len(0);
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_run_directory_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(first.stale_holder(), None);
        let err = RunLock::acquire(dir.path()).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, TrainError::RunLocked { .. })
                && message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        // Released normally: the next holder sees no stale pid.
        let second = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(second.stale_holder(), None);
    }

    #[test]
    fn a_lock_left_by_a_dead_process_is_taken_over_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        // What a killed holder leaves: its pid in the file, no flock (the kernel released it).
        std::fs::write(dir.path().join(LOCK_FILE), "4194999\n").unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.stale_holder(), Some(4194999));
        let text = std::fs::read_to_string(lock.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        drop(lock);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(),
            ""
        );
    }
}
