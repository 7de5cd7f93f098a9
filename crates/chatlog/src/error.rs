//! The engine's error type.

use std::io;
use std::path::PathBuf;

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the engine.
///
/// Operating errors (I/O, corruption, limits) are returned; programmer errors panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed. `op` names the operation, `path` the file or directory.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation that failed, e.g. `"write"`, `"fdatasync"`.
        op: &'static str,
        /// The file or directory it was applied to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The disk is full. The write that hit it was not acknowledged and the log is poisoned:
    /// reopen after freeing space; everything acknowledged before is intact.
    #[error("no space left on device writing {path}")]
    NoSpace {
        /// The file being written.
        path: PathBuf,
    },

    /// Bytes on disk do not form a valid log. Never skipped silently.
    #[error("corruption in {segment} at byte offset {offset}: {reason}")]
    Corruption {
        /// The segment (or index) file holding the bad bytes.
        segment: PathBuf,
        /// Byte offset of the bad frame or header inside that file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// An earlier write or fsync failed. The log refuses further writes until it is reopened;
    /// a failed fsync is never retried (the kernel may already have dropped the dirty pages).
    #[error("log is poisoned by an earlier I/O failure; reopen it to recover")]
    Poisoned,

    /// Another process (or another `Log` in this process) holds the directory's `LOCK` file.
    #[error("log directory {path} is locked by another process")]
    Locked {
        /// The directory.
        path: PathBuf,
    },

    /// The requested log index is not in the log.
    #[error("log index {index} is out of range (log holds {first}..{next})")]
    OutOfRange {
        /// Requested index.
        index: u64,
        /// First index still held.
        first: u64,
        /// One past the last index.
        next: u64,
    },

    /// An input exceeded a configured bound.
    #[error("{what} is {actual}, above the limit of {limit}")]
    LimitExceeded {
        /// What was too large.
        what: &'static str,
        /// The configured limit.
        limit: u64,
        /// The offending value.
        actual: u64,
    },

    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The log has been closed (or its writer thread stopped).
    #[error("log is closed")]
    Closed,
}

impl Error {
    /// Wraps an `io::Error` for `op` on `path`, turning ENOSPC into [`Error::NoSpace`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.kind() == io::ErrorKind::StorageFull {
            Error::NoSpace { path }
        } else {
            Error::Io { op, path, source }
        }
    }

    /// A copy of this error suitable for handing to every caller of a failed batch.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Error::Io { op, path, source } => Error::Io {
                op,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::NoSpace { path } => Error::NoSpace { path: path.clone() },
            Error::Corruption {
                segment,
                offset,
                reason,
            } => Error::Corruption {
                segment: segment.clone(),
                offset: *offset,
                reason: reason.clone(),
            },
            Error::Poisoned => Error::Poisoned,
            Error::Locked { path } => Error::Locked { path: path.clone() },
            Error::OutOfRange { index, first, next } => Error::OutOfRange {
                index: *index,
                first: *first,
                next: *next,
            },
            Error::LimitExceeded {
                what,
                limit,
                actual,
            } => Error::LimitExceeded {
                what,
                limit: *limit,
                actual: *actual,
            },
            Error::InvalidConfig(s) => Error::InvalidConfig(s.clone()),
            Error::Closed => Error::Closed,
        }
    }
}
