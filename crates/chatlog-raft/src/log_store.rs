//! Raft log storage on chatlog's segment [`Log`]: entries are postcard-encoded
//! `openraft::Entry` values at segment index = Raft index + 1; appends are group-committed and
//! reported to openraft through its flush callback only once `fdatasync`ed. The vote and the
//! last purged log id live in a small `meta` file replaced atomically (write, fsync, rename,
//! fsync of the directory).
//!
//! The most recent entries are also kept decoded in memory ([`Recent`]), so openraft's reads of
//! what it has just appended (the core's reads to apply committed entries, the replication
//! streams' reads to send them) neither wait on a positional read nor decode and check a frame
//! again on the async worker that asks. Older entries are read from the log.
//!
//! When openraft purges past the end of the log (a snapshot installed on a node whose log is
//! behind), the log is replaced by a new, empty one starting after the purged id, in a new
//! directory `log.<generation>`; older generations are removed on open.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io::ErrorKind;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use chatlog::log::{Log, LogConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, StorageIOError};
use serde::{Deserialize, Serialize};

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote, any};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote>,
    last_purged: Option<LogId>,
    generation: u64,
}

/// The most entries [`Recent`] keeps.
const RECENT_MAX_ENTRIES: usize = 8192;
/// The most encoded bytes [`Recent`] keeps.
const RECENT_MAX_BYTES: usize = 32 << 20;

/// The log's last entries, decoded, in order: `entries[k]` is the entry at segment index
/// `first + k`, and the last one is the log's last entry (every change to the log's end is
/// made here too, under the same `&mut` call). Bounded by a number of entries and of encoded
/// bytes ([`RECENT_MAX_ENTRIES`], [`RECENT_MAX_BYTES`]); the oldest are dropped first.
#[derive(Debug)]
struct Recent {
    first: u64,
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl Recent {
    fn new(max_entries: usize, max_bytes: usize) -> Recent {
        Recent {
            first: 0,
            entries: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Adds entries that start at segment index `at`; forgets everything before if they do not
    /// continue what it holds.
    fn extend(&mut self, at: u64, entries: impl IntoIterator<Item = (Entry, usize)>) {
        if self.entries.is_empty() || self.end() != at {
            self.clear();
            self.first = at;
        }
        for (entry, size) in entries {
            self.bytes += size;
            self.entries.push_back((entry, size));
        }
        while self.entries.len() > self.max_entries
            || (self.bytes > self.max_bytes && self.entries.len() > 1)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
            self.first += 1;
        }
    }

    /// Forgets entries at segment indexes `from` and after.
    fn truncate_from(&mut self, from: u64) {
        while self.end() > from.max(self.first) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Forgets entries below segment index `before`.
    fn purge_before(&mut self, before: u64) {
        while !self.entries.is_empty() && self.first < before {
            self.pop_front();
        }
    }

    /// Clones the entries it holds of `start..end`: returns where they start and them.
    fn get(&self, start: u64, end: u64) -> (u64, Vec<Entry>) {
        let from = start.max(self.first);
        let to = end.min(self.end());
        if from >= to {
            return (end, Vec::new());
        }
        let out = (from..to)
            .map(|i| self.entries[(i - self.first) as usize].0.clone())
            .collect();
        (from, out)
    }
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    config: LogConfig,
    log: RwLock<Arc<Log>>,
    meta: Mutex<Meta>,
    recent: RwLock<Recent>,
}

/// The Raft log store (and, cloned, its reader).
#[derive(Debug, Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

fn storage_io(e: impl std::error::Error + 'static) -> StorageError {
    StorageError::IO {
        source: StorageIOError::write_logs(any(&e)),
    }
}

fn read_io(e: impl std::error::Error + 'static) -> StorageError {
    StorageError::IO {
        source: StorageIOError::read_logs(any(&e)),
    }
}

fn log_dir(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("log.{generation}"))
}

/// Writes `bytes` to `path` atomically and durably.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

impl LogStore {
    /// Opens (or creates) the Raft log under `dir`.
    pub fn open(dir: &Path, config: LogConfig) -> Result<LogStore, StorageError> {
        Self::open_with(dir, config, RECENT_MAX_ENTRIES, RECENT_MAX_BYTES)
    }

    /// [`LogStore::open`], keeping at most `recent_entries` entries and `recent_bytes` encoded
    /// bytes in memory.
    fn open_with(
        dir: &Path,
        config: LogConfig,
        recent_entries: usize,
        recent_bytes: usize,
    ) -> Result<LogStore, StorageError> {
        std::fs::create_dir_all(dir).map_err(storage_io)?;
        let meta: Meta = match std::fs::read(dir.join("meta")) {
            Ok(bytes) => postcard::from_bytes(&bytes).map_err(|e| {
                read_io(std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("{}: {e}", dir.join("meta").display()),
                ))
            })?,
            Err(e) if e.kind() == ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(read_io(e)),
        };
        // Remove generations other than the current one (left by a crash during a reset).
        for entry in std::fs::read_dir(dir).map_err(read_io)? {
            let entry = entry.map_err(read_io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(g) = name
                .strip_prefix("log.")
                .and_then(|g| g.parse::<u64>().ok())
                && g != meta.generation
            {
                std::fs::remove_dir_all(entry.path()).map_err(storage_io)?;
            }
        }
        let first = meta.last_purged.map_or(1, |l| l.index + 2);
        let log = Log::open(
            log_dir(dir, meta.generation),
            LogConfig {
                first_index: first,
                ..config.clone()
            },
        )
        .map_err(read_io)?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                config,
                log: RwLock::new(Arc::new(log)),
                meta: Mutex::new(meta),
                recent: RwLock::new(Recent::new(recent_entries, recent_bytes)),
            }),
        })
    }

    fn log(&self) -> Arc<Log> {
        self.inner
            .log
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn recent(&self) -> std::sync::RwLockWriteGuard<'_, Recent> {
        self.inner.recent.write().unwrap_or_else(|e| e.into_inner())
    }

    fn save_meta(&self, meta: &Meta) -> Result<(), StorageError> {
        let bytes = postcard::to_allocvec(meta).map_err(storage_io)?;
        write_atomic(&self.inner.dir.join("meta"), &bytes).map_err(storage_io)
    }

    /// Replaces the log by a new, empty one whose first segment index is `first`, in the next
    /// generation directory; saves `meta` (with the new generation) before switching.
    fn reset(&self, meta: &mut Meta, first: u64) -> Result<(), StorageError> {
        let old = log_dir(&self.inner.dir, meta.generation);
        meta.generation += 1;
        let fresh = Log::open(
            log_dir(&self.inner.dir, meta.generation),
            LogConfig {
                first_index: first,
                ..self.inner.config.clone()
            },
        )
        .map_err(storage_io)?;
        self.save_meta(meta)?;
        self.recent().clear();
        *self.inner.log.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        let _ = std::fs::remove_dir_all(old);
        Ok(())
    }

    fn decode(bytes: &[u8]) -> Result<Entry, StorageError> {
        postcard::from_bytes(bytes).map_err(read_io)
    }

    /// The last entry's log id, if the log holds any.
    fn last_in_log(&self) -> Result<Option<LogId>, StorageError> {
        let log = self.log();
        let next = log.next_index();
        if next <= log.first_index() {
            return Ok(None);
        }
        let bytes = log.read(next - 1).map_err(read_io)?;
        Ok(Some(Self::decode(&bytes)?.log_id))
    }

    /// Appends `entries` (which must continue the log, or start an empty one anywhere) and
    /// remembers them; returns what resolves once they are durable (`None` for no entries).
    async fn append_entries<I>(
        &mut self,
        entries: I,
    ) -> Result<Option<chatlog::log::PendingAppend>, StorageError>
    where
        I: IntoIterator<Item = Entry>,
    {
        let log = self.log();
        let mut encoded = Vec::new();
        let mut decoded = Vec::new();
        let mut first = None;
        for entry in entries {
            first.get_or_insert(entry.log_id.index);
            let bytes = postcard::to_allocvec(&entry).map_err(storage_io)?;
            decoded.push((entry, bytes.len()));
            encoded.push(Bytes::from(bytes));
        }
        let Some(first) = first else {
            return Ok(None);
        };
        let log = if first + 1 != log.next_index() && log.next_index() == log.first_index() {
            // An empty log continues wherever the leader starts it (after a snapshot).
            let this = self.clone();
            tokio::task::spawn_blocking(move || {
                let mut meta = this.inner.meta.lock().unwrap_or_else(|e| e.into_inner());
                let mut next = meta.clone();
                this.reset(&mut next, first + 1)?;
                *meta = next;
                Ok::<_, StorageError>(())
            })
            .await
            .map_err(storage_io)??;
            self.log()
        } else {
            log
        };
        if first + 1 != log.next_index() {
            return Err(storage_io(std::io::Error::other(format!(
                "raft log: append at index {first} but the log ends before {}",
                log.next_index().saturating_sub(1)
            ))));
        }
        let pending = log.append_batch_deferred(encoded).map_err(storage_io)?;
        self.recent().extend(first + 1, decoded);
        Ok(Some(pending))
    }

    /// Reads the entries at segment indexes `start..end` from the log; fewer if the log was
    /// truncated or purged meanwhile.
    fn read_log(log: &Log, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
        if start >= end {
            return Ok(out);
        }
        for item in log.iter_from(start) {
            let (index, bytes) = match item {
                Ok(item) => item,
                // Truncated (or purged) since the bounds were read: the entries up to here
                // are what the log held. openraft takes fewer entries than asked for; an
                // error would be fatal to the node.
                Err(chatlog::Error::OutOfRange { index, .. })
                    if index >= log.next_index() || index < log.first_index() =>
                {
                    break;
                }
                Err(e) => return Err(read_io(e)),
            };
            if index >= end {
                break;
            }
            out.push(Self::decode(&bytes)?);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let log = self.log();
        // Purged entries may linger in a partly purged segment: never return them.
        let purged_end = self
            .inner
            .meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_purged
            .map_or(0, |l| l.index + 2);
        let start = match range.start_bound() {
            Bound::Included(&i) => i + 1,
            Bound::Excluded(&i) => i + 2,
            Bound::Unbounded => log.first_index(),
        }
        .max(log.first_index())
        .max(purged_end);
        let end = match range.end_bound() {
            Bound::Included(&i) => i + 2,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => log.next_index(),
        }
        .min(log.next_index());
        if start >= end {
            return Ok(Vec::new());
        }
        // The part held in memory, then what lies before it from the log.
        let (held_from, held) = self
            .inner
            .recent
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(start, end);
        let mut out = Self::read_log(&log, start, held_from)?;
        if out.len() as u64 != held_from - start {
            // Truncated or purged while reading: what was read is what the log held.
            return Ok(out);
        }
        let held_to = held_from + held.len() as u64;
        out.extend(held);
        if held_to < end {
            // Appended to the log but not yet remembered (a reader racing an append).
            out.extend(Self::read_log(&log, held_to, end)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged = self
            .inner
            .meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_purged;
        let last = self.last_in_log()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let this = self.clone();
        let vote = *vote;
        tokio::task::spawn_blocking(move || {
            let mut meta = this.inner.meta.lock().unwrap_or_else(|e| e.into_inner());
            let mut next = meta.clone();
            next.vote = Some(vote);
            this.save_meta(&next)?;
            *meta = next;
            Ok(())
        })
        .await
        .map_err(storage_io)?
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self
            .inner
            .meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let Some(pending) = self.append_entries(entries).await? else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        // The flush callback fires once the group commit that holds these entries is synced.
        // Awaited on the runtime, not on a blocking thread: a blocking thread per append cost
        // two more thread wake-ups per Raft entry.
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let result = pending.await.map(|_| ()).map_err(std::io::Error::other);
            metrics::histogram!(crate::stages::LOG_FLUSH).record(started.elapsed().as_secs_f64());
            callback.log_io_completed(result);
        });
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let log = self.log();
        self.recent().truncate_from(log_id.index + 1);
        tokio::task::spawn_blocking(move || log.truncate_from(log_id.index + 1))
            .await
            .map_err(storage_io)?
            .map_err(storage_io)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut meta = this.inner.meta.lock().unwrap_or_else(|e| e.into_inner());
            if meta.last_purged.is_some_and(|p| p.index >= log_id.index) {
                return Ok(());
            }
            let mut next = meta.clone();
            next.last_purged = Some(log_id);
            let log = this.log();
            if log_id.index + 1 >= log.next_index() {
                // Purged past our end (a snapshot overtook the log): start a new, empty log
                // after the purged id.
                drop(log);
                this.reset(&mut next, log_id.index + 2)?;
            } else {
                this.save_meta(&next)?;
                this.recent().purge_before(log_id.index + 2);
                log.purge_before(log_id.index + 2).map_err(storage_io)?;
            }
            *meta = next;
            Ok(())
        })
        .await
        .map_err(storage_io)?
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chatlog::log::Preallocate;
    use openraft::{CommittedLeaderId, EntryPayload};
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        /// Append this many entries at the model's next index.
        Append(u8),
        /// A new term from here on.
        NewTerm,
        /// Truncate from the k-th of the entries held (counted from the first unpurged).
        Truncate(u8),
        /// Purge up to the k-th entry held; past the end purges beyond the log.
        Purge(u8),
        /// Read `a..b` (offsets from the first unpurged index).
        Read(u8, u8),
        /// Close and reopen the store: nothing held in memory any more.
        Reopen,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u8..12).prop_map(Step::Append),
            1 => Just(Step::NewTerm),
            1 => (0u8..16).prop_map(Step::Truncate),
            1 => (0u8..20).prop_map(Step::Purge),
            4 => (0u8..24, 0u8..24).prop_map(|(a, b)| Step::Read(a, b)),
            1 => Just(Step::Reopen),
        ]
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(crate::types::Request {
                ops: vec![(
                    chatlog::engine::Op::Send {
                        user: format!("u{index}"),
                        chat: "c".into(),
                        cmid: format!("m{term}.{index}"),
                        body: Some("x".repeat((index % 7) as usize * 20)),
                        file: None,
                    },
                    term * 1_000 + index,
                )],
            }),
        }
    }

    fn config() -> LogConfig {
        LogConfig {
            segment_size_bytes: 4096,
            entry_size_bytes_max: 1024,
            batch_size_bytes_max: 1024,
            preallocate: Preallocate::Sparse,
            ..LogConfig::default()
        }
    }

    /// The Raft log with entries held in memory (few, so they are dropped often) answers every
    /// read as a model of the log does, across appends, truncations, purges (also past the end)
    /// and reopens.
    #[test]
    fn reads_agree_with_a_model_across_changes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        proptest!(ProptestConfig::with_cases(64), |(steps in prop::collection::vec(step(), 1..60))| {
            rt.block_on(async {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("raft");
                let open = || LogStore::open_with(&path, config(), 5, 600).expect("open");
                let mut store = open();
                // Raft index → entry; everything at or below `purged` is gone.
                let mut model: BTreeMap<u64, Entry> = BTreeMap::new();
                let mut purged: Option<u64> = None;
                let mut term = 1;
                let first_live = |purged: Option<u64>| purged.map_or(0, |p| p + 1);
                for step in steps {
                    let next = model
                        .keys()
                        .next_back()
                        .map_or(first_live(purged), |last| last + 1);
                    match step {
                        Step::Append(n) => {
                            let batch: Vec<Entry> =
                                (next..next + u64::from(n)).map(|i| entry(term, i)).collect();
                            for e in &batch {
                                model.insert(e.log_id.index, e.clone());
                            }
                            let pending = store.append_entries(batch).await.expect("append");
                            pending.expect("entries").await.expect("durable");
                        }
                        Step::NewTerm => term += 1,
                        Step::Truncate(k) => {
                            let at = first_live(purged) + u64::from(k);
                            if let Some(e) = model.get(&at) {
                                let log_id = e.log_id;
                                model.split_off(&at);
                                store.truncate(log_id).await.expect("truncate");
                            }
                        }
                        Step::Purge(k) => {
                            let at = first_live(purged) + u64::from(k);
                            let log_id = model
                                .get(&at)
                                .map_or(LogId::new(CommittedLeaderId::new(term, 1), at), |e| {
                                    e.log_id
                                });
                            model = model.split_off(&(at + 1));
                            purged = Some(at);
                            store.purge(log_id).await.expect("purge");
                        }
                        Step::Read(a, b) => {
                            let lo = first_live(purged).saturating_sub(2) + u64::from(a);
                            let hi = first_live(purged).saturating_sub(2) + u64::from(b);
                            let got = store.try_get_log_entries(lo..hi).await.expect("read");
                            let want: Vec<Entry> =
                                model.range(lo..hi.max(lo)).map(|(_, e)| e.clone()).collect();
                            prop_assert_eq!(got, want, "read {}..{}", lo, hi);
                        }
                        Step::Reopen => {
                            drop(store);
                            store = open();
                        }
                    }
                    let state = store.get_log_state().await.expect("state");
                    let want_last = model.values().next_back().map(|e| e.log_id);
                    prop_assert_eq!(state.last_log_id.map(|l| l.index), want_last.map(|l| l.index).or(purged));
                }
                Ok(())
            })?;
        });
    }
}
