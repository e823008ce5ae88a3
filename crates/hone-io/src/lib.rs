//! The chores every hone crate shares, done once (house rule 19): writing a file or a directory
//! all or nothing ([`write_file`], [`StagedFile`], [`StagedDir`]), the text of a caught panic
//! ([`panic_message`]) and the Unix time ([`unix_now`]).
//!
//! The crate has no burn dependency, so that `hone-data` can use it too; it sits under every
//! other hone crate. Errors are an [`Error`] naming the path that failed; callers wrap it in
//! their own error type.

mod atomic;
mod error;
mod panic;
mod time;

pub use atomic::{write_file, StagedDir, StagedFile};
pub use error::{Error, Result};
pub use panic::panic_message;
pub use time::unix_now;
