//! Raft log storage on chatlog's segment [`Log`]: entries are postcard-encoded
//! `openraft::Entry` values at segment index = Raft index + 1; appends are group-committed and
//! reported to openraft through its flush callback only once `fdatasync`ed. The vote and the
//! last purged log id live in a small `meta` file replaced atomically (write, fsync, rename,
//! fsync of the directory).
//!
//! When openraft purges past the end of the log (a snapshot installed on a node whose log is
//! behind), the log is replaced by a new, empty one starting after the purged id, in a new
//! directory `log.<generation>`; older generations are removed on open.

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

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    config: LogConfig,
    log: RwLock<Arc<Log>>,
    meta: Mutex<Meta>,
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
        let log = self.log();
        let mut encoded = Vec::new();
        let mut first = None;
        for entry in entries {
            first.get_or_insert(entry.log_id.index);
            encoded.push(Bytes::from(
                postcard::to_allocvec(&entry).map_err(storage_io)?,
            ));
        }
        let Some(first) = first else {
            callback.log_io_completed(Ok(()));
            return Ok(());
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
                log.purge_before(log_id.index + 2).map_err(storage_io)?;
            }
            *meta = next;
            Ok(())
        })
        .await
        .map_err(storage_io)?
    }
}
