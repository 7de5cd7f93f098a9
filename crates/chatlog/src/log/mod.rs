//! The durable segment log: one writer thread with group commit, many concurrent readers.
//! (With [`Durability::Interval`] a second thread does the syncs: `log/syncer.rs`.)
//!
//! ```no_run
//! use chatlog::log::{Log, LogConfig};
//! let log = Log::open("/tmp/chatlog-example", LogConfig::default())?;
//! let index = log.append(b"hello".to_vec())?; // returns once durable (fdatasync)
//! assert_eq!(&log.read(index)?[..], b"hello");
//! # Ok::<(), chatlog::Error>(())
//! ```

mod copy;
mod open;
mod syncer;
mod writer;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::io::{FileSystem, StdFs};
use crate::segment::format::{
    self, FRAME_PAYLOAD_BYTES_MAX, HEADER_BYTES, PAYLOAD_OVERHEAD_BYTES_MAX,
};
use crate::segment::{Active, Sealed};

pub use copy::LogCopy;
pub use open::RecoveryReport;

/// The largest log index the log hands out; appends beyond it fail with `LimitExceeded`.
pub const INDEX_MAX: u64 = 1 << 62;

/// When appended entries are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Default. Every batch is `fdatasync`ed before any of its entries is acknowledged:
    /// an acknowledged entry survives process crashes, kernel crashes and power loss.
    Batch,
    /// Entries are acknowledged once written to the OS; a second thread `fdatasync`s at most
    /// this long after the oldest unsynced write (so appends never wait behind that sync). Acknowledged entries survive a process crash
    /// (kill -9); a kernel crash or power loss may lose up to the interval's worth.
    Interval(Duration),
    /// Entries are acknowledged once written to the OS and synced only when a segment is
    /// sealed or [`Log::sync`] is called. Survives a process crash, not a power loss.
    None,
}

/// How new segment files are preallocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocate {
    /// Default. The next segment is written full of zeros and synced by a background thread
    /// ahead of time, so appends overwrite allocated blocks and `fdatasync` has no metadata to
    /// flush.
    Zeroed,
    /// The next segment is created sparse (`set_len`) when needed. Cheaper on space, slower
    /// `fdatasync`.
    Sparse,
}

/// What to do with bad bytes found on open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Default. A torn, unacknowledged tail of the last segment is cut (and the cut synced);
    /// any other bad bytes are an [`Error::Corruption`] naming the segment and offset.
    TolerateTornTail,
    /// Like `TolerateTornTail`, but a torn tail is an error too (nothing is changed on disk).
    Strict,
    /// Cut the log at the first bad frame, wherever it is, dropping everything after it; the
    /// [`RecoveryReport`] says what was dropped.
    Repair,
}

/// Configuration of a [`Log`]. Every bound is named and checked at open.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Size at which a segment is sealed and a new one started. Default 64 MiB.
    pub segment_size_bytes: u64,
    /// Largest entry accepted. Default 16 MiB.
    pub entry_size_bytes_max: usize,
    /// Largest group-commit batch written with one `write`. Default 4 MiB.
    pub batch_size_bytes_max: usize,
    /// Appends waiting for the writer before submitters block. Default 65,536.
    pub queue_depth_max: usize,
    /// Every how many entries a sealed segment's index records an offset. Default 16.
    pub index_stride: u32,
    /// Durability mode.
    pub durability: Durability,
    /// Preallocation mode.
    pub preallocate: Preallocate,
    /// Recovery mode used by [`Log::open`].
    pub recovery: RecoveryMode,
    /// Index of the first entry of a new, empty log. Default 1.
    pub first_index: u64,
    /// How many of the newest sealed segments keep their pages in the OS page cache. `None`
    /// (the default) leaves it to the kernel. `Some(n)`: each time a segment is sealed, the
    /// one that just fell out of the newest `n` is dropped from the page cache
    /// ([`FileSystem::drop_cache`]); reading it later costs disk reads. For logs whose old
    /// entries are rarely read again (a Raft log): the cache is left to data that is read,
    /// and the pages are freed just before the next spare segment is zero-filled, so it
    /// reuses them (on a VM that backs guest memory lazily, writing into new pages costs
    /// about ten times more: docs/benchmarks.md, "Where the waves in p99 come from").
    pub cached_sealed_segments: Option<usize>,
    /// The file system [`Log::open`] uses; `None` (the default) is the real one, [`StdFs`].
    /// Tests set a [`crate::io::fault::FaultFs`] here to run a whole engine (or server) on a
    /// failing disk. [`Log::open_with`] ignores it: its argument wins.
    pub file_system: Option<Arc<dyn FileSystem>>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_size_bytes: 64 << 20,
            entry_size_bytes_max: 16 << 20,
            batch_size_bytes_max: 4 << 20,
            queue_depth_max: 1 << 16,
            index_stride: 16,
            durability: Durability::Batch,
            preallocate: Preallocate::Zeroed,
            recovery: RecoveryMode::TolerateTornTail,
            first_index: 1,
            cached_sealed_segments: None,
            file_system: None,
        }
    }
}

impl LogConfig {
    fn validate(&self) -> Result<()> {
        let frame_max = (self.entry_size_bytes_max
            + PAYLOAD_OVERHEAD_BYTES_MAX
            + format::FRAME_HEADER_BYTES) as u64;
        let problems = [
            (
                self.segment_size_bytes > u64::from(u32::MAX),
                "segment_size_bytes must be below 4 GiB",
            ),
            (
                self.segment_size_bytes < HEADER_BYTES as u64 + frame_max,
                "segment_size_bytes must hold the header and one largest entry",
            ),
            (
                self.entry_size_bytes_max > FRAME_PAYLOAD_BYTES_MAX - PAYLOAD_OVERHEAD_BYTES_MAX,
                "entry_size_bytes_max is above the format's frame limit",
            ),
            (
                self.batch_size_bytes_max == 0,
                "batch_size_bytes_max must be positive",
            ),
            (
                self.queue_depth_max == 0,
                "queue_depth_max must be positive",
            ),
            (self.index_stride == 0, "index_stride must be positive"),
            (self.first_index == 0, "first_index must be at least 1"),
            (
                self.first_index > INDEX_MAX,
                "first_index must be at most 2^62",
            ),
        ];
        match problems.iter().find(|(bad, _)| *bad) {
            Some((_, msg)) => Err(Error::InvalidConfig((*msg).to_owned())),
            None => Ok(()),
        }
    }
}

/// The segments readers see. Replaced as a whole when segments are created or removed.
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) sealed: Vec<Arc<Sealed>>,
    pub(crate) active: Arc<Active>,
}

impl View {
    fn first_index(&self) -> u64 {
        self.sealed
            .first()
            .map_or(self.active.first_index, |s| s.first_index)
    }
}

/// State shared by the writer thread and readers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) view: RwLock<Arc<View>>,
    /// One past the last entry visible to readers (= acknowledged).
    pub(crate) next_index: AtomicU64,
    /// One past the last entry known durable.
    pub(crate) durable_next: AtomicU64,
    pub(crate) poisoned: AtomicBool,
    pub(crate) stats: StatsCounters,
}

/// Buckets of [`LogStats::batch_entries_buckets`]: bucket `i` counts synced batches of at most
/// `2^i` entries (the last bucket takes everything larger).
pub const STATS_BUCKETS: usize = 20;

#[derive(Debug, Default)]
pub(crate) struct StatsCounters {
    syncs: AtomicU64,
    entries: AtomicU64,
    buckets: [AtomicU64; STATS_BUCKETS],
}

impl StatsCounters {
    /// Records one `fdatasync` that made `entries` entries durable.
    pub(crate) fn record_sync(&self, entries: u64) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.entries.fetch_add(entries, Ordering::Relaxed);
        let bucket = (u64::BITS - entries.saturating_sub(1).leading_zeros()) as usize;
        self.buckets[bucket.min(STATS_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }
}

/// Group-commit statistics since the log was opened (for metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStats {
    /// `fdatasync` calls that made appended entries durable.
    pub syncs: u64,
    /// Entries made durable by them.
    pub entries_synced: u64,
    /// Histogram of entries per sync: bucket `i` counts syncs of at most `2^i` entries.
    pub batch_entries_buckets: [u64; STATS_BUCKETS],
}

impl Shared {
    pub(crate) fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_view(&self, view: View) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }
}

/// Entries of one append request.
#[derive(Debug)]
pub(crate) enum Entries {
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Entries {
    pub(crate) fn as_slice(&self) -> &[Bytes] {
        match self {
            Entries::One(b) => std::slice::from_ref(b),
            Entries::Many(v) => v,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// Work for the writer thread.
#[derive(Debug)]
pub(crate) enum Command {
    /// Append entries; replies with the index of the first.
    Append { entries: Entries, reply: Reply<u64> },
    /// Remove entries `from..`; replies when durable.
    Truncate { from: u64, reply: Reply<()> },
    /// Remove whole sealed segments below `before`; replies with the new first index.
    Purge { before: u64, reply: Reply<u64> },
    /// `fdatasync` now; replies when done.
    Sync { reply: Reply<()> },
}

/// A durable, append-only log of opaque entries, indexed from [`LogConfig::first_index`].
///
/// Any number of threads (and async tasks) may append and read concurrently. Appends are
/// group-committed by one writer thread: each batch is written with one `write` and made
/// durable with one `fdatasync` before any entry of it is acknowledged.
pub struct Log {
    shared: Arc<Shared>,
    tx: Option<flume::Sender<Command>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    fs: Arc<dyn FileSystem>,
    config: LogConfig,
    dir: PathBuf,
    report: RecoveryReport,
    _lock: Box<dyn fmt::Debug + Send + Sync>,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.dir)
            .field("first_index", &self.first_index())
            .field("next_index", &self.next_index())
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Group-commit statistics since open.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.stats;
        LogStats {
            syncs: c.syncs.load(Ordering::Relaxed),
            entries_synced: c.entries.load(Ordering::Relaxed),
            batch_entries_buckets: std::array::from_fn(|i| c.buckets[i].load(Ordering::Relaxed)),
        }
    }

    /// Opens (or creates) the log in `dir` on [`LogConfig::file_system`] (by default the real
    /// file system).
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log> {
        let fs = config
            .file_system
            .clone()
            .unwrap_or_else(|| Arc::new(StdFs));
        Self::open_with(fs, dir, config)
    }

    /// Opens (or creates) the log in `dir` on the given file system, recovering as
    /// [`LogConfig::recovery`] says.
    pub fn open_with(
        fs: Arc<dyn FileSystem>,
        dir: impl AsRef<Path>,
        config: LogConfig,
    ) -> Result<Log> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs.create_dir_all(&dir)
            .map_err(|e| Error::io("create directory", &dir, e))?;
        let lock_path = dir.join(crate::segment::name::LOCK);
        let lock = fs.lock(&lock_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => Error::Locked { path: dir.clone() },
            _ => Error::io("lock", &lock_path, e),
        })?;
        let recovered = open::recover(fs.as_ref(), &dir, &config)?;
        let next = recovered.next_index;
        let shared = Arc::new(Shared {
            view: RwLock::new(Arc::new(recovered.view)),
            next_index: AtomicU64::new(next),
            durable_next: AtomicU64::new(next),
            poisoned: AtomicBool::new(false),
            stats: StatsCounters::default(),
        });
        let (tx, rx) = flume::bounded(config.queue_depth_max);
        let writer = writer::Writer::new(
            fs.clone(),
            dir.clone(),
            config.clone(),
            shared.clone(),
            recovered.active_end,
        );
        let handle = std::thread::Builder::new()
            .name("chatlog-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io("spawn writer thread", &dir, e))?;
        // An operator should hear of both: a torn tail is what a crash mid-write leaves (never
        // an acknowledged entry), but damage to the last frames looks the same.
        let report = &recovered.report;
        if let Some((segment, offset, bytes)) = &report.torn_tail {
            tracing::warn!(
                segment = %segment.display(),
                offset,
                bytes,
                "log recovery cut a torn tail (an unfinished write; or damage to the last entry)"
            );
        }
        if let Some((segment, offset)) = &report.repaired_at {
            tracing::warn!(
                segment = %segment.display(),
                offset,
                dropped_bytes = report.dropped_bytes,
                dropped_entries = report.dropped_entries,
                "log recovery cut the log at damaged data"
            );
        }
        Ok(Log {
            shared,
            tx: Some(tx),
            writer: Mutex::new(Some(handle)),
            fs,
            config,
            dir,
            report: recovered.report,
            _lock: lock,
        })
    }

    /// What recovery found and did when this log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The directory holding the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Index of the first entry still held.
    pub fn first_index(&self) -> u64 {
        self.shared.view().first_index()
    }

    /// One past the last acknowledged entry (the index the next append will get).
    pub fn next_index(&self) -> u64 {
        self.shared.next_index.load(Ordering::Acquire)
    }

    /// One past the last entry known to be on stable storage (equals [`Log::next_index`] in
    /// [`Durability::Batch`] mode).
    pub fn durable_next_index(&self) -> u64 {
        self.shared.durable_next.load(Ordering::Acquire)
    }

    /// Whether an I/O failure has poisoned the log.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    fn check_entry(&self, data: &[u8]) -> Result<()> {
        if data.len() > self.config.entry_size_bytes_max {
            return Err(Error::LimitExceeded {
                what: "entry size in bytes",
                limit: self.config.entry_size_bytes_max as u64,
                actual: data.len() as u64,
            });
        }
        Ok(())
    }

    fn submit(&self, cmd: Command) -> Result<()> {
        if self.is_poisoned() {
            return Err(Error::Poisoned);
        }
        let tx = self.tx.as_ref().ok_or(Error::Closed)?;
        tx.send(cmd).map_err(|_| Error::Closed)
    }

    fn wait<T>(rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// Appends one entry; returns its index once it is durable (per [`Durability`]).
    pub fn append(&self, data: impl Into<Bytes>) -> Result<u64> {
        let data = data.into();
        self.check_entry(&data)?;
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Append {
            entries: Entries::One(data),
            reply,
        })?;
        Self::wait(rx)
    }

    /// Appends entries as one contiguous run; returns the index of the first once all are
    /// durable. An empty batch returns [`Log::next_index`] without writing.
    pub fn append_batch(&self, entries: Vec<Bytes>) -> Result<u64> {
        if entries.is_empty() {
            return Ok(self.next_index());
        }
        self.append_batch_deferred(entries)?.wait()
    }

    /// Submits entries as one contiguous run without waiting: the returned [`PendingAppend`]
    /// resolves (blocking with [`PendingAppend::wait`], or as a future) to the index of the
    /// first once all are durable. Submissions from one thread are written in submission order.
    pub fn append_batch_deferred(&self, entries: Vec<Bytes>) -> Result<PendingAppend> {
        for entry in &entries {
            self.check_entry(entry)?;
        }
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Append {
            entries: Entries::Many(entries),
            reply,
        })?;
        Ok(PendingAppend { rx })
    }

    /// Async form of [`Log::append`]: the future resolves once the entry is durable. The
    /// future is `'static`: it does not borrow the log.
    pub fn append_async(
        &self,
        data: impl Into<Bytes>,
    ) -> impl Future<Output = Result<u64>> + Send + 'static {
        let data = data.into();
        let checked = self.check_entry(&data).and_then(|()| {
            if self.is_poisoned() {
                return Err(Error::Poisoned);
            }
            self.tx.clone().ok_or(Error::Closed)
        });
        async move {
            let tx = checked?;
            let (reply, rx) = oneshot::channel();
            tx.send_async(Command::Append {
                entries: Entries::One(data),
                reply,
            })
            .await
            .map_err(|_| Error::Closed)?;
            rx.await.map_err(|_| Error::Closed)?
        }
    }

    /// Removes entries `from..next_index`, durably. `from` must be within
    /// `first_index..=next_index`. Used by replication to drop conflicting entries.
    pub fn truncate_from(&self, from: u64) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Truncate { from, reply })?;
        Self::wait(rx)
    }

    /// Removes whole sealed segments that hold only entries below `before`; returns the new
    /// first index. The active segment is never removed.
    pub fn purge_before(&self, before: u64) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Purge { before, reply })?;
        Self::wait(rx)
    }

    /// Makes every acknowledged entry durable now (useful with the weaker [`Durability`] modes).
    pub fn sync(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Sync { reply })?;
        Self::wait(rx)
    }

    /// Reads entry `index`. Sealed segments are served zero-copy from the memory map; the
    /// active one with a positional read. The frame's CRC is checked on every read.
    pub fn read(&self, index: u64) -> Result<Bytes> {
        // Load the bound before the view: the writer publishes a new view before it makes
        // entries in it visible, so this view covers every index below `next`.
        let next = self.next_index();
        let view = self.shared.view();
        let first = view.first_index();
        let out_of_range = || Error::OutOfRange { index, first, next };
        if index < first || index >= next {
            return Err(out_of_range());
        }
        if index >= view.active.first_index {
            return view.active.read(index)?.ok_or_else(out_of_range);
        }
        let seg = segment_for(&view.sealed, index).ok_or_else(out_of_range)?;
        seg.read(index)
    }

    /// Iterates over entries from `from` up to the last entry acknowledged when the iterator
    /// was created. Sealed segments are walked sequentially through their maps.
    pub fn iter_from(&self, from: u64) -> LogIter {
        let end = self.next_index();
        LogIter {
            view: self.shared.view(),
            index: from,
            end,
            cursor: None,
        }
    }

    /// Reads and checks every frame of every segment (CRC, index continuity).
    pub fn verify(&self) -> Result<u64> {
        let mut count = 0;
        for item in self.iter_from(self.first_index()) {
            item?;
            count += 1;
        }
        Ok(count)
    }

    /// Stops the writer after it has finished queued work and synced; later calls fail with
    /// [`Error::Closed`]. Dropping the log does the same.
    pub fn close(mut self) -> Result<()> {
        self.shutdown();
        if self.is_poisoned() {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        self.tx = None;
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An append submitted with [`Log::append_batch_deferred`].
#[derive(Debug)]
pub struct PendingAppend {
    rx: oneshot::Receiver<Result<u64>>,
}

impl PendingAppend {
    /// Blocks until the entries are durable; returns the index of the first.
    pub fn wait(self) -> Result<u64> {
        self.rx.recv().map_err(|_| Error::Closed)?
    }
}

impl Future for PendingAppend {
    type Output = Result<u64>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.map_err(|_| Error::Closed)?)
    }
}

fn segment_for(sealed: &[Arc<Sealed>], index: u64) -> Option<&Arc<Sealed>> {
    let pos = sealed.partition_point(|s| s.first_index <= index);
    let seg = sealed.get(pos.checked_sub(1)?)?;
    (index < seg.end_index()).then_some(seg)
}

/// Iterator returned by [`Log::iter_from`]; yields `(index, entry)`.
#[derive(Debug)]
pub struct LogIter {
    view: Arc<View>,
    index: u64,
    end: u64,
    /// Position in a sealed segment: (segment, byte offset of the frame for `index`).
    cursor: Option<(Arc<Sealed>, usize)>,
}

impl LogIter {
    fn step(&mut self) -> Result<Bytes> {
        let index = self.index;
        if let Some((seg, at)) = &mut self.cursor {
            if index < seg.end_index() {
                let frame = seg.frame_at(*at, index)?;
                *at = frame.end;
                return Ok(seg.map.slice(frame.data));
            }
            self.cursor = None;
        }
        let first = self.view.first_index();
        let out_of_range = || Error::OutOfRange {
            index,
            first,
            next: self.end,
        };
        if index < first {
            return Err(out_of_range());
        }
        if index >= self.view.active.first_index {
            return self.view.active.read(index)?.ok_or_else(out_of_range);
        }
        let seg = segment_for(&self.view.sealed, index)
            .ok_or_else(out_of_range)?
            .clone();
        let at = seg.offset_of(index)?;
        let frame = seg.frame_at(at, index)?;
        let data = seg.map.slice(frame.data);
        self.cursor = Some((seg, frame.end));
        Ok(data)
    }
}

impl Iterator for LogIter {
    type Item = Result<(u64, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.end {
            return None;
        }
        let item = self.step().map(|data| (self.index, data));
        // Stop after an error rather than skipping past bad data.
        self.index = if item.is_ok() {
            self.index + 1
        } else {
            self.end
        };
        Some(item)
    }
}
