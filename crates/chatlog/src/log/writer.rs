//! The single writer thread: group commit, segment rollover, truncation, purge.
//!
//! Each loop takes every queued append (up to `batch_size_bytes_max`), encodes them into one
//! buffer, writes it with one `write` and makes it durable with one `fdatasync` before any of
//! the batch's callers hears back. Readers see an entry only once it is acknowledged.
//! Any failed write or sync poisons the log: it is never retried.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::io::{FileHandle, FileSystem, OpenMode};
use crate::log::open::{cut_file, write_atomic};
use crate::log::syncer::{Job, Syncer};
use crate::log::{
    Command, Durability, Entries, INDEX_MAX, LogConfig, Preallocate, Reply, Shared, View,
};
use crate::segment::format::{self, FrameBody, HEADER_BYTES};
use crate::segment::{Active, ActiveFrames, Sealed, name, sparse_offsets};

/// Bytes of zeros written, and synced, at a time while preparing a spare segment.
///
/// Each chunk is synced on its own: the disk then has at most one chunk of the spare queued
/// ahead of the writer's next `fdatasync`. With one sync at the end, the whole 64 MiB went to
/// the disk at once, just after a roll, and the writer's syncs waited behind it: 27–60 ms
/// stalls once per segment in the append benchmark (`perf trace` of the writer thread,
/// docs/benchmarks.md).
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Creates `spare.seg` of `size_bytes`: zero-filled and synced chunk by chunk, or sparse.
pub(crate) fn prepare_spare(
    fs: &dyn FileSystem,
    dir: &Path,
    size_bytes: u64,
    preallocate: Preallocate,
) -> Result<Arc<dyn FileHandle>> {
    let path = dir.join(name::SPARE);
    let file = fs
        .open(&path, OpenMode::CreateTruncate)
        .map_err(|e| Error::io("create", &path, e))?;
    match preallocate {
        Preallocate::Sparse => file
            .set_len(size_bytes)
            .map_err(|e| Error::io("set_len", &path, e))?,
        Preallocate::Zeroed => {
            let zeros = vec![0u8; ZERO_CHUNK_BYTES];
            let mut at = 0;
            while at < size_bytes {
                let n = (size_bytes - at).min(ZERO_CHUNK_BYTES as u64) as usize;
                file.write_at(&zeros[..n], at)
                    .map_err(|e| Error::io("write", &path, e))?;
                file.sync_data()
                    .map_err(|e| Error::io("fdatasync", &path, e))?;
                at += n as u64;
            }
        }
    }
    Ok(file)
}

/// Drops a sealed segment's pages from the page cache. Best effort: the segment may have been
/// purged meanwhile, and a failure changes nothing but what stays cached.
fn drop_cache(fs: &dyn FileSystem, path: &Path) {
    match fs.drop_cache(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            path = %path.display(),
            error = %e,
            "dropping a sealed segment from the page cache failed"
        ),
    }
}

enum Spare {
    None,
    Pending(JoinHandle<Result<Arc<dyn FileHandle>>>),
}

pub(crate) struct Writer {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    config: LogConfig,
    shared: Arc<Shared>,
    /// The active segment (also in the published view).
    active: Arc<Active>,
    /// Offset just past the last frame written to the active segment.
    write_offset: u64,
    /// Index the next appended entry gets.
    next_index: u64,
    /// The active segment is still named `spare.seg` and must be renamed once durable.
    pending_rename: bool,
    buf: Vec<u8>,
    spare: Spare,
    /// A sealed segment that fell out of [`LogConfig::cached_sealed_segments`]: its pages are
    /// dropped from the page cache when the next spare is prepared.
    uncache: Option<PathBuf>,
    /// When the oldest write not yet synced happened (weaker durability modes only, without
    /// a sync thread).
    dirty_since: Option<Instant>,
    poisoned: bool,
    /// The sync thread of [`Durability::Interval`] (`None`: this thread syncs).
    syncer: Option<Syncer>,
}

struct Pending {
    entries: Entries,
    reply: Reply<u64>,
}

impl Writer {
    pub(crate) fn new(
        fs: Arc<dyn FileSystem>,
        dir: PathBuf,
        config: LogConfig,
        shared: Arc<Shared>,
        active_end: u64,
    ) -> Self {
        let active = shared.view().active.clone();
        let next_index = shared.next_index.load(Ordering::Acquire);
        Writer {
            fs,
            dir,
            config,
            shared,
            active,
            write_offset: active_end,
            next_index,
            pending_rename: false,
            buf: Vec::new(),
            spare: Spare::None,
            uncache: None,
            dirty_since: None,
            poisoned: false,
            syncer: None,
        }
    }

    pub(crate) fn run(mut self, rx: flume::Receiver<Command>) {
        // Prepare the first spare now, not at the first roll (where zero-filling a whole
        // segment would stall every append).
        self.start_spare();
        if let Durability::Interval(every) = self.config.durability {
            self.syncer = Syncer::start(self.shared.clone(), every);
        }
        // If this thread dies (a panic is a bug, but callers must not hang on it), poison the
        // log and drop every queued command so its caller sees `Closed`.
        let _guard = DrainOnExit {
            rx: rx.clone(),
            shared: self.shared.clone(),
        };
        loop {
            let first = match self.sync_deadline() {
                Some(deadline) => match rx.recv_deadline(deadline) {
                    Ok(cmd) => cmd,
                    Err(flume::RecvTimeoutError::Timeout) => {
                        let _ = self.sync_now();
                        continue;
                    }
                    Err(flume::RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => break,
                },
            };
            let mut batch = Vec::new();
            let mut control = None;
            match first {
                Command::Append { entries, reply } => batch.push(Pending { entries, reply }),
                other => control = Some(other),
            }
            if !batch.is_empty() {
                let mut bytes: usize = batch_bytes(&batch[0].entries);
                while bytes < self.config.batch_size_bytes_max {
                    match rx.try_recv() {
                        Ok(Command::Append { entries, reply }) => {
                            bytes += batch_bytes(&entries);
                            batch.push(Pending { entries, reply });
                        }
                        Ok(other) => {
                            control = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                self.append(batch);
            }
            if let Some(cmd) = control {
                self.control(cmd);
            }
        }
        if (self.dirty_since.is_some() || self.syncer.is_some()) && !self.poisoned {
            let _ = self.sync_now();
        }
        // Joins the sync thread.
        drop(self.syncer.take());
        if let Spare::Pending(handle) = std::mem::replace(&mut self.spare, Spare::None) {
            let _ = handle.join();
        }
    }

    fn sync_deadline(&self) -> Option<Instant> {
        // With a sync thread `dirty_since` stays `None`: no deadline here.
        match (self.config.durability, self.dirty_since) {
            (Durability::Interval(every), Some(since)) => Some(since + every),
            _ => None,
        }
    }

    fn poison(&mut self, error: &Error) {
        tracing::error!(%error, dir = %self.dir.display(), "log poisoned");
        self.poisoned = true;
        self.shared.poisoned.store(true, Ordering::Release);
    }

    fn append(&mut self, mut batch: Vec<Pending>) {
        if self.shared.poisoned.load(Ordering::Acquire) {
            // The sync thread failed a sync.
            self.poisoned = true;
        }
        if self.poisoned {
            for p in batch {
                let _ = p.reply.send(Err(Error::Poisoned));
            }
            return;
        }
        // Refuse (without poisoning) requests that would run past the index space.
        let mut next = self.next_index;
        batch.retain_mut(|p| {
            let n = p.entries.as_slice().len() as u64;
            if next + n > INDEX_MAX + 1 {
                let reply = std::mem::replace(&mut p.reply, oneshot::channel().0);
                let _ = reply.send(Err(Error::LimitExceeded {
                    what: "log index",
                    limit: INDEX_MAX,
                    actual: next + n - 1,
                }));
                return false;
            }
            next += n;
            true
        });
        if batch.is_empty() {
            return;
        }
        match self.write_batch(&batch) {
            Ok(firsts) => {
                for (p, first) in batch.into_iter().zip(firsts) {
                    let _ = p.reply.send(Ok(first));
                }
                // (After a segment's first or last commit, synced here, this only costs the
                // sync thread a spare `fdatasync`.)
                if let Some(syncer) = &self.syncer {
                    syncer.written(Job::Written {
                        file: self.active.file.clone(),
                        path: self.active.path.clone(),
                        next: self.next_index,
                    });
                }
            }
            Err(error) => {
                self.poison(&error);
                for p in batch {
                    let _ = p.reply.send(Err(error.duplicate()));
                }
            }
        }
    }

    /// Encodes, writes and syncs a batch; returns the first index of each request.
    fn write_batch(&mut self, batch: &[Pending]) -> Result<Vec<u64>> {
        let segment_size = self.config.segment_size_bytes;
        let mut firsts = Vec::with_capacity(batch.len());
        let mut offsets: Vec<u32> = Vec::new();
        let mut base = self.write_offset;
        let mut index = self.next_index;
        let mut batch_first = index;
        self.buf.clear();
        for pending in batch {
            firsts.push(index);
            for data in pending.entries.as_slice() {
                let mut len = format::frame_len(index, (index - batch_first) as u32, data.len());
                let segment_has_entries = index > self.active.first_index;
                if base + (self.buf.len() + len) as u64 > segment_size && segment_has_entries {
                    self.commit(base, &mut offsets, index, true)?;
                    self.roll(index)?;
                    base = 0;
                    batch_first = index;
                    self.buf.extend_from_slice(&format::encode_header(index));
                    len = format::frame_len(index, 0, data.len());
                }
                let at = base + self.buf.len() as u64;
                offsets.push(u32::try_from(at).expect("segment offsets fit in u32"));
                let written = format::encode_frame(
                    &mut self.buf,
                    &FrameBody {
                        index,
                        batch_offset: (index - batch_first) as u32,
                        data,
                    },
                );
                debug_assert_eq!(written, len);
                index += 1;
            }
        }
        self.commit(base, &mut offsets, index, false)?;
        Ok(firsts)
    }

    /// Writes `self.buf` at `base` of the active segment with one write, syncs it as the
    /// durability mode (or `force_sync`) says, renames a new segment into place, and makes
    /// the entries visible. `next` is the index after the last entry in the buffer.
    fn commit(
        &mut self,
        base: u64,
        offsets: &mut Vec<u32>,
        next: u64,
        force_sync: bool,
    ) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // With a sync thread, only a segment's first and last commits are synced here (they
        // must be: a roll and a rename follow), after everything handed to the sync thread.
        let handed_off = self.syncer.is_some() && !force_sync && !self.pending_rename;
        if let Some(syncer) = self.syncer.as_ref().filter(|_| !handed_off) {
            syncer.flush()?;
        }
        let path = &self.active.path;
        let write_path = if self.pending_rename {
            self.dir.join(name::SPARE)
        } else {
            path.clone()
        };
        self.active
            .file
            .write_at(&self.buf, base)
            .map_err(|e| Error::io("write", &write_path, e))?;
        let end = base + self.buf.len() as u64;
        self.buf.clear();
        let sync = !handed_off
            && (force_sync || self.pending_rename || self.config.durability == Durability::Batch);
        if sync {
            self.active
                .file
                .sync_data()
                .map_err(|e| Error::io("fdatasync", &write_path, e))?;
            self.shared.stats.record_sync(next - self.next_index);
        } else if !handed_off && self.dirty_since.is_none() {
            self.dirty_since = Some(Instant::now());
        }
        if self.pending_rename {
            self.fs
                .rename(&write_path, path)
                .map_err(|e| Error::io("rename", &write_path, e))?;
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| Error::io("fsync directory", &self.dir, e))?;
            self.pending_rename = false;
            self.start_spare();
        }
        {
            let mut frames = self
                .active
                .frames
                .write()
                .unwrap_or_else(|e| e.into_inner());
            frames.offsets.append(offsets);
            frames.data_end = u32::try_from(end).expect("segment offsets fit in u32");
        }
        assert!(next >= self.next_index, "log indexes only grow");
        self.write_offset = end;
        self.next_index = next;
        self.shared.next_index.store(next, Ordering::Release);
        if sync {
            // Earlier unsynced writes are all in this file: a roll syncs the old segment.
            self.dirty_since = None;
            self.shared.durable_next.store(next, Ordering::Release);
        }
        Ok(())
    }

    /// Seals the active segment (already synced by `commit(.., true)`) and makes a new,
    /// empty active segment starting at `first` from the spare file.
    fn roll(&mut self, first: u64) -> Result<()> {
        let old = self.active.clone();
        let dense = old
            .frames
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .offsets
            .clone();
        let map = old
            .file
            .map(self.write_offset)
            .map_err(|e| Error::io("map", &old.path, e))?;
        let points = old
            .file
            .map_random(self.write_offset)
            .map_err(|e| Error::io("map", &old.path, e))?;
        let sealed = Sealed {
            path: old.path.clone(),
            first_index: old.first_index,
            entry_count: dense.len() as u64,
            map,
            points,
            stride: self.config.index_stride,
            offsets: sparse_offsets(&dense, self.config.index_stride),
        };
        assert_eq!(
            sealed.end_index(),
            first,
            "sealed segment must end where the next starts"
        );
        write_atomic(
            self.fs.as_ref(),
            &self.dir,
            &name::index(&self.dir, old.first_index),
            &format::encode_index(&sealed.sparse_index()),
        )?;
        let file = self.take_spare()?;
        let active = Arc::new(Active {
            path: name::segment(&self.dir, first),
            first_index: first,
            file,
            frames: std::sync::RwLock::new(ActiveFrames {
                offsets: Vec::new(),
                data_end: HEADER_BYTES as u32,
            }),
        });
        let view = self.shared.view();
        let mut sealed_list = view.sealed.clone();
        sealed_list.push(Arc::new(sealed));
        if let Some(keep) = self.config.cached_sealed_segments
            && let Some(old) = sealed_list.len().checked_sub(keep + 1)
        {
            self.uncache = Some(sealed_list[old].path.clone());
        }
        self.shared.set_view(View {
            sealed: sealed_list,
            active: active.clone(),
        });
        self.active = active;
        self.write_offset = 0;
        self.pending_rename = true;
        Ok(())
    }

    fn take_spare(&mut self) -> Result<Arc<dyn FileHandle>> {
        match std::mem::replace(&mut self.spare, Spare::None) {
            Spare::Pending(handle) => handle.join().map_err(|_| {
                Error::io(
                    "prepare spare segment",
                    &self.dir,
                    std::io::Error::other("preallocation thread panicked"),
                )
            })?,
            Spare::None => prepare_spare(
                self.fs.as_ref(),
                &self.dir,
                self.config.segment_size_bytes,
                self.config.preallocate,
            ),
        }
    }

    /// Starts preparing the next spare segment in the background (zero-filling is slow),
    /// after dropping the pages of the sealed segment in [`Writer::uncache`], if any, so the
    /// zero-filling reuses them.
    fn start_spare(&mut self) {
        let uncache = self.uncache.take();
        if self.config.preallocate != Preallocate::Zeroed {
            if let Some(path) = uncache {
                drop_cache(self.fs.as_ref(), &path);
            }
            return;
        }
        let fs = self.fs.clone();
        let dir = self.dir.clone();
        let size = self.config.segment_size_bytes;
        let spawned = std::thread::Builder::new()
            .name("chatlog-prealloc".into())
            .spawn(move || {
                crate::priority::lower_this_thread();
                if let Some(path) = uncache {
                    drop_cache(fs.as_ref(), &path);
                }
                prepare_spare(fs.as_ref(), &dir, size, Preallocate::Zeroed)
            });
        // If no thread can be spawned, the next roll prepares the spare itself.
        if let Ok(handle) = spawned {
            self.spare = Spare::Pending(handle);
        }
    }

    fn sync_now(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        if let Some(syncer) = &self.syncer {
            let result = syncer.flush();
            if result.is_err() {
                self.poisoned = true;
            }
            return result;
        }
        if self.dirty_since.is_none() {
            return Ok(());
        }
        match self.active.file.sync_data() {
            Ok(()) => {
                self.dirty_since = None;
                let durable = self.shared.durable_next.load(Ordering::Acquire);
                self.shared
                    .stats
                    .record_sync(self.next_index.saturating_sub(durable));
                self.shared
                    .durable_next
                    .store(self.next_index, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                let error = Error::io("fdatasync", &self.active.path, e);
                self.poison(&error);
                Err(error)
            }
        }
    }

    fn control(&mut self, cmd: Command) {
        match cmd {
            Command::Append { .. } => unreachable!("appends are batched"),
            Command::Sync { reply } => match &self.syncer {
                // Answered by the sync thread; appends go on meanwhile.
                Some(syncer) if !self.poisoned => syncer.flush_then(reply),
                _ => {
                    let _ = reply.send(self.sync_now());
                }
            },
            Command::Truncate { from, reply } => {
                let result = self.guarded(|w| w.truncate(from));
                let _ = reply.send(result);
            }
            Command::Purge { before, reply } => {
                let result = self.guarded(|w| w.purge(before));
                let _ = reply.send(result);
            }
        }
    }

    /// Runs a mutating operation; an I/O failure inside it poisons the log.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let result = op(self);
        if let Err(error @ (Error::Io { .. } | Error::NoSpace { .. })) = &result {
            self.poison(error);
        }
        result
    }

    fn truncate(&mut self, from: u64) -> Result<()> {
        let view = self.shared.view();
        let first = view.first_index();
        if from < first || from > self.next_index {
            return Err(Error::OutOfRange {
                index: from,
                first,
                next: self.next_index,
            });
        }
        if from == self.next_index {
            return Ok(());
        }
        // Make the removed entries invisible first.
        self.shared.next_index.store(from, Ordering::Release);
        self.sync_now()?;
        // Remove whole segments past the one that keeps `from` as its end, newest first, so a
        // crash part-way leaves a contiguous prefix.
        let keep = view.sealed.partition_point(|s| s.first_index <= from);
        let mut removed = false;
        if view.active.first_index > from {
            self.remove_segment(view.active.first_index, self.pending_rename)?;
            self.pending_rename = false;
            removed = true;
        }
        for seg in view.sealed[keep..].iter().rev() {
            self.remove_segment(seg.first_index, false)?;
            removed = true;
        }
        let (active, cut) = if view.active.first_index <= from {
            let frames = view.active.frames.read().unwrap_or_else(|e| e.into_inner());
            let k = (from - view.active.first_index) as usize;
            (view.active.clone(), u64::from(frames.offsets[k]))
        } else {
            // The cut falls in a sealed segment, which becomes the active one again. Readers may
            // still map it, so it is not cut in place (shrinking a mapped file would fault their
            // reads): its kept prefix is copied to a new file that atomically replaces it.
            let seg = view.sealed[keep - 1].clone();
            let index_path = name::index(&self.dir, seg.first_index);
            self.fs
                .remove_file(&index_path)
                .map_err(|e| Error::io("remove", &index_path, e))?;
            removed = true;
            let mut dense = Vec::new();
            let mut at = HEADER_BYTES;
            for index in seg.first_index..from {
                dense.push(at as u32);
                at = seg.frame_at(at, index)?.end;
            }
            let tmp = name::temporary(&seg.path);
            let file = self
                .fs
                .open(&tmp, OpenMode::CreateTruncate)
                .map_err(|e| Error::io("create", &tmp, e))?;
            file.write_at(&seg.map[..at], 0)
                .map_err(|e| Error::io("write", &tmp, e))?;
            file.set_len(self.config.segment_size_bytes)
                .map_err(|e| Error::io("set_len", &tmp, e))?;
            file.sync_data()
                .map_err(|e| Error::io("fdatasync", &tmp, e))?;
            self.fs
                .rename(&tmp, &seg.path)
                .map_err(|e| Error::io("rename", &tmp, e))?;
            let active = Arc::new(Active {
                path: seg.path.clone(),
                first_index: seg.first_index,
                file,
                frames: std::sync::RwLock::new(ActiveFrames {
                    offsets: dense,
                    data_end: at as u32,
                }),
            });
            (active, at as u64)
        };
        if removed {
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| Error::io("fsync directory", &self.dir, e))?;
        }
        // Drop the removed frames before cutting the file: a reader whose read fails then
        // finds its entry gone (see `Active::read`).
        {
            let mut frames = active.frames.write().unwrap_or_else(|e| e.into_inner());
            frames
                .offsets
                .truncate((from - active.first_index) as usize);
            frames.data_end = cut as u32;
        }
        // The active segment is read with positional reads only, so it is cut in place.
        if Arc::ptr_eq(&active, &view.active) {
            cut_file(active.file.as_ref(), &active.path, cut)?;
        }
        self.shared.set_view(View {
            sealed: view.sealed[..keep.min(view.sealed.len())]
                .iter()
                .filter(|s| s.first_index < active.first_index)
                .cloned()
                .collect(),
            active: active.clone(),
        });
        self.active = active;
        self.write_offset = cut;
        self.next_index = from;
        self.shared.durable_next.fetch_min(from, Ordering::AcqRel);
        Ok(())
    }

    fn remove_segment(&self, first: u64, still_spare: bool) -> Result<()> {
        let path = if still_spare {
            self.dir.join(name::SPARE)
        } else {
            name::segment(&self.dir, first)
        };
        self.fs
            .remove_file(&path)
            .map_err(|e| Error::io("remove", &path, e))?;
        let index_path = name::index(&self.dir, first);
        match self.fs.remove_file(&index_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &index_path, e)),
        }
    }

    fn purge(&mut self, before: u64) -> Result<u64> {
        let view = self.shared.view();
        let drop_count = view
            .sealed
            .iter()
            .take_while(|s| s.end_index() <= before)
            .count();
        if drop_count == 0 {
            return Ok(view.first_index());
        }
        let new_view = View {
            sealed: view.sealed[drop_count..].to_vec(),
            active: view.active.clone(),
        };
        let first = new_view.first_index();
        self.shared.set_view(new_view);
        // Oldest first, so a crash part-way leaves a contiguous suffix.
        for seg in &view.sealed[..drop_count] {
            self.remove_segment(seg.first_index, false)?;
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("fsync directory", &self.dir, e))?;
        Ok(first)
    }
}

struct DrainOnExit {
    rx: flume::Receiver<Command>,
    shared: Arc<Shared>,
}

impl Drop for DrainOnExit {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.poisoned.store(true, Ordering::Release);
        }
        while self.rx.try_recv().is_ok() {}
    }
}

fn batch_bytes(entries: &Entries) -> usize {
    entries.as_slice().iter().map(|e| e.len() + 16).sum()
}
