//! An in-memory [`FileSystem`] for crash and fault tests.
//!
//! Every file keeps two images: `written` (what a reader sees now, i.e. the page cache) and
//! `synced` (what survived the last `sync_data`). The directory namespace is likewise kept
//! twice: the live one and the one as of the last `sync_dir`. [`FaultFs::crash`] produces the
//! file system a restarted process would find:
//!
//! - [`Crash::Process`] (kill -9): the page cache survives, so the written images and the
//!   live namespace are kept.
//! - [`Crash::PowerLoss`]: only synced images and the synced namespace survive.
//!
//! Faults are armed with [`FaultFs::set_faults`]: short writes, failing fsync, ENOSPC after a
//! byte budget, EIO on reads, or a countdown after which every I/O fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;

use super::{FileHandle, FileSystem, OpenMode};

/// What a crash keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// The process died; the kernel's page cache survives.
    Process,
    /// The machine lost power; only synced data and directory entries survive.
    PowerLoss,
}

/// Faults to inject. Each `Option` fires once it is reached; see the field docs.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The next write stores only this many bytes of its buffer, then fails with EIO.
    pub short_write_bytes: Option<usize>,
    /// The next `sync_data` fails with EIO (and syncs nothing).
    pub fail_next_sync: bool,
    /// Writes fail with ENOSPC once this many more bytes have been written in total; the write
    /// that crosses the budget stores the part that fits.
    pub space_left_bytes: Option<u64>,
    /// Reads fail with EIO.
    pub fail_reads: bool,
    /// After this many more I/O operations (of any kind), every operation fails with EIO.
    pub ios_left: Option<u64>,
}

#[derive(Debug, Default, Clone)]
struct Image {
    written: Vec<u8>,
    synced: Vec<u8>,
}

type Node = Arc<Mutex<Image>>;

#[derive(Debug, Default)]
struct State {
    live: BTreeMap<PathBuf, Node>,
    durable: BTreeMap<PathBuf, Node>,
    dirs: BTreeSet<PathBuf>,
    locks: BTreeSet<PathBuf>,
    faults: Faults,
    io_count: u64,
    /// [`FileSystem::drop_cache`] calls per path.
    cache_drops: BTreeMap<PathBuf, u64>,
    /// `sync_data` calls wait while this is set ([`FaultFs::hold_syncs`]).
    syncs_held: bool,
    /// `sync_data` calls waiting now.
    syncs_waiting: u64,
}

/// The in-memory fault-injecting file system. Clones share the same state.
#[derive(Debug, Clone, Default)]
pub struct FaultFs {
    state: Arc<Mutex<State>>,
    /// Wakes `sync_data` calls held by [`FaultFs::hold_syncs`].
    syncs_released: Arc<Condvar>,
}

#[derive(Debug)]
struct FaultFile {
    node: Node,
    fs: FaultFs,
}

#[derive(Debug)]
struct FaultLock {
    path: PathBuf,
    fs: FaultFs,
}

impl Drop for FaultLock {
    fn drop(&mut self) {
        self.fs.lock_state().locks.remove(&self.path);
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected EIO on {what}"))
}

fn lock_image(node: &Node) -> MutexGuard<'_, Image> {
    node.lock().unwrap_or_else(|e| e.into_inner())
}

impl FaultFs {
    /// An empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the armed faults.
    pub fn set_faults(&self, faults: Faults) {
        self.lock_state().faults = faults;
    }

    /// Makes every `sync_data` wait (`true`) until released (`false`): a disk whose flushes
    /// hang, to see who waits for them.
    pub fn hold_syncs(&self, hold: bool) {
        self.lock_state().syncs_held = hold;
        self.syncs_released.notify_all();
    }

    /// How many `sync_data` calls are waiting in [`FaultFs::hold_syncs`] now.
    pub fn syncs_waiting(&self) -> u64 {
        self.lock_state().syncs_waiting
    }

    /// Number of I/O operations performed so far.
    pub fn io_count(&self) -> u64 {
        self.lock_state().io_count
    }

    /// How many times [`FileSystem::drop_cache`] was called on `path` (this file system keeps
    /// no page cache: the call only counts).
    pub fn cache_drops(&self, path: &Path) -> u64 {
        self.lock_state()
            .cache_drops
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// The file system a restarted process finds after `crash`. Locks are released and
    /// faults cleared. `self` is left untouched (its handles keep working on the old state).
    pub fn crash(&self, crash: Crash) -> FaultFs {
        let state = self.lock_state();
        let names = match crash {
            Crash::Process => &state.live,
            Crash::PowerLoss => &state.durable,
        };
        let mut fresh = State {
            dirs: state.dirs.clone(),
            ..State::default()
        };
        for (path, node) in names {
            let image = lock_image(node);
            let bytes = match crash {
                Crash::Process => image.written.clone(),
                Crash::PowerLoss => image.synced.clone(),
            };
            let node = Arc::new(Mutex::new(Image {
                written: bytes.clone(),
                synced: bytes,
            }));
            fresh.live.insert(path.clone(), node.clone());
            fresh.durable.insert(path.clone(), node);
        }
        FaultFs {
            state: Arc::new(Mutex::new(fresh)),
            syncs_released: Arc::default(),
        }
    }

    /// XORs `mask` into the byte at `offset` of `path`, in both images (media corruption).
    pub fn flip(&self, path: &Path, offset: u64, mask: u8) {
        let state = self.lock_state();
        let node = state.live.get(path).expect("flip: no such file");
        let mut guard = lock_image(node);
        let image = &mut *guard;
        let at = usize::try_from(offset).unwrap();
        for bytes in [&mut image.written, &mut image.synced] {
            if at < bytes.len() {
                bytes[at] ^= mask;
            }
        }
    }

    /// The current (written) contents of a file, if it exists.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock_state();
        state
            .live
            .get(path)
            .map(|node| lock_image(node).written.clone())
    }

    /// Replaces a file's contents in both images (as if the disk held these bytes).
    pub fn put(&self, path: &Path, bytes: Vec<u8>) {
        let mut state = self.lock_state();
        let node = Arc::new(Mutex::new(Image {
            written: bytes.clone(),
            synced: bytes,
        }));
        state.live.insert(path.to_path_buf(), node.clone());
        state.durable.insert(path.to_path_buf(), node);
    }

    /// Names of the files currently in the live namespace.
    pub fn files(&self) -> Vec<PathBuf> {
        self.lock_state().live.keys().cloned().collect()
    }

    /// Counts one I/O and fails it if the countdown has run out.
    fn tick(&self, what: &str) -> io::Result<()> {
        let mut state = self.lock_state();
        state.io_count += 1;
        if let Some(left) = state.faults.ios_left.as_mut() {
            if *left == 0 {
                return Err(eio(what));
            }
            *left -= 1;
        }
        Ok(())
    }
}

impl FileSystem for FaultFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.tick("mkdir")?;
        let mut state = self.lock_state();
        for ancestor in path.ancestors() {
            state.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.tick("readdir")?;
        let state = self.lock_state();
        if !state.dirs.contains(path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(state
            .live
            .keys()
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FileHandle>> {
        self.tick("open")?;
        let mut state = self.lock_state();
        let node = match (state.live.get(path).cloned(), mode) {
            (Some(node), OpenMode::ReadWrite) => node,
            (None, OpenMode::ReadWrite) => return Err(io::ErrorKind::NotFound.into()),
            (_, OpenMode::CreateTruncate) => {
                let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
                if !state.dirs.contains(&parent) {
                    return Err(io::ErrorKind::NotFound.into());
                }
                // A new inode: the durable namespace still points at the old one, if any.
                let node: Node = Arc::default();
                state.live.insert(path.to_path_buf(), node.clone());
                node
            }
        };
        Ok(Arc::new(FaultFile {
            node,
            fs: self.clone(),
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.tick("unlink")?;
        let mut state = self.lock_state();
        state
            .live
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.tick("rename")?;
        let mut state = self.lock_state();
        let node = state
            .live
            .remove(from)
            .ok_or(io::Error::from(io::ErrorKind::NotFound))?;
        state.live.insert(to.to_path_buf(), node);
        Ok(())
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.tick("link")?;
        let mut state = self.lock_state();
        if state.live.contains_key(to) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let node = state
            .live
            .get(from)
            .cloned()
            .ok_or(io::Error::from(io::ErrorKind::NotFound))?;
        state.live.insert(to.to_path_buf(), node);
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.tick("sync_dir")?;
        let mut state = self.lock_state();
        let state = &mut *state;
        state.durable.retain(|p, _| p.parent() != Some(path));
        for (p, node) in &state.live {
            if p.parent() == Some(path) {
                state.durable.insert(p.clone(), node.clone());
            }
        }
        Ok(())
    }

    fn drop_cache(&self, path: &Path) -> io::Result<()> {
        self.tick("fadvise")?;
        let mut state = self.lock_state();
        if !state.live.contains_key(path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        *state.cache_drops.entry(path.to_path_buf()).or_default() += 1;
        Ok(())
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn Debug + Send + Sync>> {
        let mut state = self.lock_state();
        if !state.locks.insert(path.to_path_buf()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        state.live.entry(path.to_path_buf()).or_default();
        Ok(Box::new(FaultLock {
            path: path.to_path_buf(),
            fs: self.clone(),
        }))
    }
}

impl FileHandle for FaultFile {
    fn len(&self) -> io::Result<u64> {
        Ok(lock_image(&self.node).written.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.fs.tick("read")?;
        if self.fs.lock_state().faults.fail_reads {
            return Err(eio("read"));
        }
        let image = lock_image(&self.node);
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > image.written.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&image.written[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.fs.tick("write")?;
        let (keep, error) = {
            let mut state = self.fs.lock_state();
            let faults = &mut state.faults;
            let mut keep = buf.len();
            let mut error = None;
            if let Some(short) = faults.short_write_bytes.take() {
                keep = keep.min(short);
                error = Some(eio("write"));
            }
            if let Some(left) = faults.space_left_bytes.as_mut() {
                if (keep as u64) > *left {
                    keep = usize::try_from(*left).unwrap();
                    error = Some(io::Error::from(io::ErrorKind::StorageFull));
                }
                *left -= keep as u64;
            }
            (keep, error)
        };
        let mut image = lock_image(&self.node);
        let start = usize::try_from(offset).unwrap();
        let end = start + keep;
        if image.written.len() < end {
            image.written.resize(end, 0);
        }
        image.written[start..end].copy_from_slice(&buf[..keep]);
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fs.tick("set_len")?;
        let mut image = lock_image(&self.node);
        image.written.resize(usize::try_from(len).unwrap(), 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fs.tick("fdatasync")?;
        {
            let mut state = self.fs.lock_state();
            state.syncs_waiting += 1;
            while state.syncs_held {
                state = self
                    .fs
                    .syncs_released
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            state.syncs_waiting -= 1;
            if std::mem::take(&mut state.faults.fail_next_sync) {
                return Err(eio("fdatasync"));
            }
        }
        let mut image = lock_image(&self.node);
        image.synced = image.written.clone();
        Ok(())
    }

    fn map(&self, len: u64) -> io::Result<Bytes> {
        self.fs.tick("mmap")?;
        let image = lock_image(&self.node);
        let len = usize::try_from(len).unwrap();
        if len > image.written.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(Bytes::copy_from_slice(&image.written[..len]))
    }
}
