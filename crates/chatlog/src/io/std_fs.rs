//! The real file system: `std::fs`, positional I/O, `fdatasync`, `memmap2` for sealed data.

#![allow(unsafe_code)]

use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::{FileHandle, FileSystem, OpenMode};

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

#[derive(Debug)]
struct StdFile {
    file: File,
}

#[derive(Debug)]
struct LockGuard {
    // Holding the open file holds the lock; closing it releases it.
    _file: File,
}

impl FileSystem for StdFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FileHandle>> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if mode == OpenMode::CreateTruncate {
            options.create(true).truncate(true);
        }
        Ok(Arc::new(StdFile {
            file: options.open(path)?,
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::hard_link(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn drop_cache(&self, path: &Path) -> io::Result<()> {
        let file = File::open(path)?;
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).map_err(io::Error::from)
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn Debug + Send + Sync>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(LockGuard { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

impl FileHandle for StdFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn map(&self, len: u64) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let len = usize::try_from(len).map_err(|_| io::Error::other("mapping too large"))?;
        // SAFETY: the engine maps only sealed segment bytes `[0, len)`, which nobody writes to
        // or truncates while a mapping is alive: the single writer appends past the data end
        // of the active segment only, and sealed segments are never written again. Removal of
        // a mapped file (purge, truncation) unlinks it, which keeps the mapped pages valid
        // until the last `Bytes` referring to them is dropped. Another process modifying the
        // files is excluded by the directory's LOCK file.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(&self.file)? };
        Ok(Bytes::from_owner(map))
    }

    fn map_random(&self, len: u64) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let len = usize::try_from(len).map_err(|_| io::Error::other("mapping too large"))?;
        // SAFETY: as in `map` above: only sealed bytes are mapped, never written again.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(&self.file)? };
        map.advise(memmap2::Advice::Random)?;
        Ok(Bytes::from_owner(map))
    }
}
