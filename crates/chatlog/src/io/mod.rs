//! All file I/O of the engine goes through [`FileSystem`] and [`FileHandle`].
//!
//! [`StdFs`] is the real implementation (positional I/O, `fdatasync`, `memmap2`);
//! [`fault::FaultFs`] is an in-memory implementation that keeps a "written" and a "synced"
//! image of every file and injects failures, used by the crash and fault tests.

use std::fmt::Debug;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

pub mod fault;
mod std_fs;

pub use std_fs::StdFs;

/// How [`FileSystem::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Open an existing file for reading and writing.
    ReadWrite,
    /// Create the file (truncating any existing one) for reading and writing.
    CreateTruncate,
}

/// A directory tree of files.
///
/// Correctness contract: a file created or renamed is only guaranteed to exist after a crash
/// once [`FileSystem::sync_dir`] of its directory has returned `Ok`.
pub trait FileSystem: Send + Sync + Debug + 'static {
    /// Creates `path` and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names (not paths) of the entries of a directory.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FileHandle>>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes `to` a second name of the file `from` (a hard link: the same contents, whoever
    /// writes them). Fails if `to` exists. The default is `Unsupported`: callers copy instead.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let _ = (from, to);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Tells the OS that `path`'s cached pages will not be read soon, so clean ones can be
    /// dropped from the page cache (`POSIX_FADV_DONTNEED`). The file's contents are unchanged:
    /// later reads go to the disk.
    fn drop_cache(&self, path: &Path) -> io::Result<()>;
    /// Takes an exclusive advisory lock on `path` (created if missing) for the life of the
    /// returned guard. Fails with `WouldBlock` if another holder has it.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Debug + Send + Sync>>;
}

/// An open file.
///
/// Correctness contract: bytes written with [`FileHandle::write_at`] are only guaranteed to
/// survive a power loss once [`FileHandle::sync_data`] has returned `Ok`. A failed
/// `sync_data` leaves the file in an unknown state: callers must not retry it.
pub trait FileHandle: Send + Sync + Debug {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Fills `buf` from `offset`; fails with `UnexpectedEof` past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Sets the file length (holes read as zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// `fdatasync`: makes written data (and the size) durable.
    fn sync_data(&self) -> io::Result<()>;
    /// A read-only view of bytes `[0, len)`. The real implementation memory-maps the file;
    /// the view must only be used for ranges nobody writes to any more.
    fn map(&self, len: u64) -> io::Result<Bytes>;
    /// The same view, for reads of single entries at scattered places (history pages). The
    /// real implementation maps the file again with `MADV_RANDOM`, so that a page fault on
    /// bytes no longer in the page cache reads that page and not the device's whole read-ahead
    /// window (8 MiB on the benchmark VM: a page of 50 from an evicted part of a 10 M-event
    /// history took up to 34 ms, docs/benchmarks.md, "History pages and read-ahead").
    fn map_random(&self, len: u64) -> io::Result<Bytes> {
        self.map(len)
    }
}
