//! # The chat engine
//!
//! [`Engine`] is a complete embeddable chat store on top of the segment [`Log`]: chats and
//! membership, gapless per-chat seqs, idempotent sends, edits and deletes as tombstones,
//! history, per-device cursors, receipts, resume, file metadata, and in-process subscriptions
//! to committed events.
//!
//! Data path of a write: the caller's operation goes to the **sequencer** thread, which checks
//! it against the chat state, assigns the seq and turns it into log records; the records of a
//! whole batch of operations are submitted to the log (one group commit, one `fdatasync`); the
//! **applier** thread waits for durability, writes the RocksDB indexes of the batch in one
//! `WriteBatch`, replies to the callers and publishes the events to subscribers. The log is the
//! source of truth: on open, records after the indexes' last applied log index are replayed.
//!
//! ```no_run
//! use chatlog::engine::{Engine, EngineConfig};
//! let engine = Engine::open("/tmp/chatlog-engine", EngineConfig::default())?;
//! let chat = engine.create_chat("alice", &["bob".into()], Some("lunch".into()), false)?;
//! let sent = engine.send("alice", &chat, "m1", Some("hi".into()), None)?;
//! let page = engine.history("bob", &chat, None, None, None)?;
//! assert_eq!(page.events.last().unwrap().event.seq, sent.seq);
//! # Ok::<(), chatlog::engine::ChatError>(())
//! ```

mod dedup_filter;
mod error;
mod sequencer;
pub mod store;
mod tail;
pub mod types;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::broadcast;

pub use error::{ChatError, Refusal};
pub use sequencer::{Op, Outcome};
use sequencer::{Reply, Sequencer};
pub use store::HistoryEntry;
use store::{CF_CURSORS, CF_FILE_REFS, CF_FILES, CF_LAST_SEEN, CF_RECEIPTS, CF_USER_CHATS, Store};
pub use types::{ChatSummary, Cursor, Event, EventKind, FileMeta, HistoryEvent, Receipt, Record};

use crate::log::{Log, LogConfig, PendingAppend};

/// Operations the sequencer takes in one batch at most.
const OPS_PER_BATCH_MAX: usize = 8192;
/// Batches between the sequencer and the applier.
const APPLY_QUEUE_DEPTH: usize = 64;
/// History pages are capped at this many events (PROTOCOL.md).
pub const HISTORY_LIMIT_MAX: usize = 500;
/// Default history page size.
pub const HISTORY_LIMIT_DEFAULT: usize = 50;
/// Default [`EngineConfig::index_tail_entries`]: about as many keys as a 16 MiB memtable holds.
pub const INDEX_TAIL_ENTRIES_DEFAULT: usize = 200_000;

/// A source of "now" in ms since the epoch. Injected so tests control time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// A checkpoint begun by [`Engine::checkpoint_begin`], completed by
/// [`Engine::checkpoint_finish`].
#[derive(Debug)]
#[must_use = "the checkpoint is incomplete until `Engine::checkpoint_finish` runs"]
pub struct PendingCheckpoint {
    log: crate::log::LogCopy,
}

/// Engine configuration.
#[derive(Clone)]
pub struct EngineConfig {
    /// The segment log's configuration.
    pub log: LogConfig,
    /// Members per chat, creator included. Default 256.
    pub members_max: usize,
    /// Largest message body in bytes of UTF-8. Default 16 KiB.
    pub body_bytes_max: usize,
    /// Largest title in bytes. Default 256.
    pub title_bytes_max: usize,
    /// Operations waiting for the sequencer before new ones are refused as busy. Default 65,536.
    pub queue_depth_max: usize,
    /// Committed events buffered per subscriber before it lags (and resumes from the log).
    /// Default 65,536.
    pub subscriber_buffer: usize,
    /// Retention limits applied by [`Engine::enforce_retention`]. Default: keep everything.
    pub retention: Retention,
    /// Time source.
    pub clock: Clock,
    /// The engine is a replica's state machine: writes arrive through
    /// [`Engine::apply_replicated`] (and are proposed through the [`Proposer`] set with
    /// [`Engine::set_proposer`]); on open the log is cut after the last
    /// [`Record::Applied`], so a replicated group is wholly applied or not at all. Default off.
    pub replicated: bool,
    /// Entries (`history` and `dedup` keys, about two per message) the index tail holds in
    /// memory before they are sorted and ingested into RocksDB as SST files. After a crash, up
    /// to about twice this many log records are replayed on open.
    pub index_tail_entries: usize,
}

/// Retention limits. Events beyond them leave history (seqs stay gapless: history reports the
/// horizon), and whole sealed log segments are removed once no kept event lives in them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Drop events older than this.
    pub max_age_ms: Option<u64>,
    /// Keep at most this many of the latest events per chat.
    pub max_events_per_chat: Option<u64>,
}

/// What [`Engine::enforce_retention`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    /// Chats whose horizon moved.
    pub chats_trimmed: u64,
    /// The log's first index after removing segments.
    pub log_first_index: u64,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("log", &self.log)
            .field("members_max", &self.members_max)
            .field("body_bytes_max", &self.body_bytes_max)
            .field("title_bytes_max", &self.title_bytes_max)
            .field("queue_depth_max", &self.queue_depth_max)
            .field("subscriber_buffer", &self.subscriber_buffer)
            .field("retention", &self.retention)
            .field("replicated", &self.replicated)
            .field("index_tail_entries", &self.index_tail_entries)
            .finish_non_exhaustive()
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            log: LogConfig::default(),
            members_max: 256,
            body_bytes_max: 16 * 1024,
            title_bytes_max: 256,
            queue_depth_max: 1 << 16,
            subscriber_buffer: 1 << 16,
            retention: Retention::default(),
            clock: system_clock(),
            replicated: false,
            index_tail_entries: INDEX_TAIL_ENTRIES_DEFAULT,
        }
    }
}

/// A committed log record, as published to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The record's log index.
    pub log_index: u64,
    /// The record.
    pub record: Record,
}

/// The reply to a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// The message's seq.
    pub seq: u64,
    /// Its timestamp (ms).
    pub ts: u64,
}

/// A page of history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// Events in ascending seq.
    pub events: Vec<HistoryEvent>,
    /// The chat's last seq.
    pub last_seq: u64,
    /// The first seq retention still keeps (1 if nothing was dropped); earlier events are
    /// gone.
    pub horizon: u64,
}

/// Where a device resumes in one chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// Chat.
    pub chat: String,
    /// The device has everything up to here; send what follows.
    pub after: u64,
    /// The chat's last seq when the plan was made.
    pub last_seq: u64,
}

#[derive(Debug)]
struct Shared {
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Last batch the applier finished.
    applied_batch: AtomicU64,
    /// Last log index applied to the indexes.
    applied_index: AtomicU64,
}

impl Shared {
    fn fail(&self, error: &dyn std::fmt::Display) {
        tracing::error!(%error, "chat engine stops accepting writes");
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(error.to_string());
        }
        self.failed.store(true, Ordering::Release);
    }

    fn unavailable(&self) -> ChatError {
        let why = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "engine stopped".into());
        ChatError::Unavailable(crate::Error::Io {
            op: "earlier failure",
            path: PathBuf::from("engine"),
            source: std::io::Error::other(why),
        })
    }
}

struct ApplyBatch {
    id: u64,
    first_index: u64,
    records: Vec<Record>,
    pending: Option<PendingAppend>,
    replies: Vec<(Reply, Outcome)>,
}

/// The deciding state: the sequencer plus the batch and log index counters. Whoever decides a
/// batch (the sequencer thread, or [`Engine::apply_replicated`] on its caller's task) holds it
/// from deciding until the batch's records are queued on the log, so log order is decision
/// order.
struct Decider {
    seq: Sequencer,
    batch_id: u64,
    next_index: u64,
}

impl Decider {
    /// Decides `ops` as batch `batch_id + 1` and queues their records on the log. Returns the
    /// batch to apply once durable (refused operations are already answered), or `None` when
    /// the log refused the append (the engine failed and every operation is answered).
    fn decide_and_append(
        &mut self,
        ops: Vec<(Op, Reply)>,
        now: u64,
        log: &Log,
        shared: &Shared,
    ) -> Option<ApplyBatch> {
        self.batch_id += 1;
        self.seq
            .begin(self.batch_id, shared.applied_batch.load(Ordering::Acquire));
        self.seq.prefetch_dedup(ops.iter().map(|(op, _)| op));
        let mut records = Vec::with_capacity(ops.len());
        let mut replies = Vec::with_capacity(ops.len());
        for (op, reply) in ops {
            match self.seq.decide(op, now, &mut records) {
                Ok(outcome) => replies.push((reply, outcome)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        let pending = if records.is_empty() {
            None
        } else {
            let entries = encode_records(&records);
            match log.append_batch_deferred(entries) {
                Ok(p) => Some(p),
                Err(e) => {
                    shared.fail(&e);
                    for (reply, _) in replies {
                        let _ = reply.send(Err(shared.unavailable()));
                    }
                    return None;
                }
            }
        };
        let first_index = self.next_index;
        self.next_index += records.len() as u64;
        Some(ApplyBatch {
            id: self.batch_id,
            first_index,
            records,
            pending,
            replies,
        })
    }
}

/// The chat engine. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Engine {
    log: Arc<Log>,
    store: Arc<Store>,
    config: EngineConfig,
    shared: Arc<Shared>,
    ops: Option<flume::Sender<(Op, Reply)>>,
    events: broadcast::Sender<Arc<Committed>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    dir: PathBuf,
    proposer: std::sync::OnceLock<Arc<dyn Proposer>>,
    decider: Arc<Mutex<Decider>>,
    /// Replicated groups are applied one at a time, in the order `apply_replicated` was called.
    replicated_turn: Arc<tokio::sync::Mutex<()>>,
    /// Whether closing ingests the index tail (see [`Engine::close_leaving_tail`]).
    ingest_on_close: bool,
}

/// Where a replicated engine sends the write operations its callers submit: the replication
/// layer orders them (through consensus) and answers through the [`Responder`], normally
/// after applying them with [`Engine::apply_replicated`] on this node.
pub trait Proposer: Send + Sync + 'static {
    /// Orders `op`, decided at time `ts_ms`, and answers `reply` with its outcome.
    fn propose(&self, op: Op, ts_ms: u64, reply: Responder);
}

/// The answer channel of one proposed operation.
#[derive(Debug)]
pub struct Responder(Reply);

impl Responder {
    /// Answers the caller. A caller that stopped waiting is ignored.
    pub fn send(self, result: Result<Outcome, ChatError>) {
        let _ = self.0.send(result);
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dir", &self.dir)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// The log entries of `records`: encoded one after another into one buffer, each entry a slice
/// of it. `to_allocvec` per record grew a fresh `Vec` by doubling from 8 bytes, about six
/// reallocations and copies for a 200-byte message.
fn encode_records(records: &[Record]) -> Vec<Bytes> {
    const GUESS_BYTES_PER_RECORD: usize = 320;
    let mut buf = Vec::with_capacity(records.len() * GUESS_BYTES_PER_RECORD);
    let mut ends = Vec::with_capacity(records.len());
    for record in records {
        buf = postcard::to_extend(record, buf).expect("postcard encoding into a Vec");
        ends.push(buf.len());
    }
    let all = Bytes::from(buf);
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let entry = all.slice(start..end);
            start = end;
            entry
        })
        .collect()
}

/// Reads and decodes the record at `index`.
pub(crate) fn read_record(log: &Log, index: u64) -> Result<Record, ChatError> {
    decode_record(log, index, &log.read(index)?)
}

/// Decodes the log entry at `index` as a record.
fn decode_record(log: &Log, index: u64, bytes: &[u8]) -> Result<Record, ChatError> {
    postcard::from_bytes(bytes).map_err(|e| {
        ChatError::Unavailable(crate::Error::Corruption {
            segment: log.dir().to_path_buf(),
            offset: index,
            reason: format!("log entry {index} is not a record: {e}"),
        })
    })
}

impl Engine {
    /// Opens (or creates) an engine in `dir`: the log in `dir/log`, the indexes in
    /// `dir/index`. Replays log records the indexes have not seen.
    pub fn open(dir: impl AsRef<Path>, config: EngineConfig) -> Result<Engine, ChatError> {
        let dir = dir.as_ref().to_path_buf();
        let log = Arc::new(Log::open(dir.join("log"), config.log.clone())?);
        let open_store = |dir: &Path| {
            Store::open(dir, config.index_tail_entries.max(1), Some(log.clone())).map(Arc::new)
        };
        let mut store = open_store(&dir.join("index"))?;
        let mut applied = store.applied_index()?;
        if config.replicated {
            if applied >= log.next_index() && log.first_index() == 1 {
                // A replica's log is not synced per group (the Raft log is the durable copy,
                // see `chatlog_raft::StateMachine`): after a power loss the indexes may have
                // kept records the log lost. Rebuild them from what the log kept; the
                // replication layer applies the rest again from the Raft log.
                tracing::warn!(
                    applied,
                    log_next = log.next_index(),
                    "replica: the indexes are ahead of the log (unsynced tail lost); \
                     rebuilding them from the log"
                );
                drop(store);
                let index_dir = dir.join("index");
                std::fs::remove_dir_all(&index_dir)
                    .map_err(|e| crate::Error::io("remove_dir_all", &index_dir, e))?;
                store = open_store(&index_dir)?;
                applied = 0;
            }
            cut_after_last_group(&log, applied)?;
        }
        let next = log.next_index();
        if applied >= next {
            let fix = if config.replicated {
                // Only reached when the log no longer starts at 1 (retention removed its
                // first segments), so the indexes cannot be rebuilt from it.
                "this replica cannot rebuild them from its log: remove the node's data \
                 directory to resynchronise it from a snapshot"
            } else {
                "acknowledged entries are missing from the log (it was damaged or restored \
                 from an older copy): restore the data directory from a backup; removing the \
                 index directory instead rebuilds the indexes from the log as it is and \
                 drops those entries for good"
            };
            return Err(ChatError::Unavailable(crate::Error::Corruption {
                segment: dir.join("index"),
                offset: applied,
                reason: format!(
                    "indexes have applied log index {applied} but the log ends before {next}; \
                     {fix}"
                ),
            }));
        }
        let indexed = store.indexed_through()?;
        if indexed + 1 < log.first_index() {
            return Err(ChatError::Unavailable(crate::Error::Corruption {
                segment: dir.join("index"),
                offset: applied,
                reason: format!(
                    "the log starts at index {} (older segments were removed by retention) but \
                     the indexes have only applied up to {indexed}: they cannot be rebuilt from \
                     the log alone; restore the index directory from its backup",
                    log.first_index()
                ),
            }));
        }
        replay(&log, &store, indexed + 1, next)?;
        let shared = Arc::new(Shared {
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            applied_batch: AtomicU64::new(0),
            applied_index: AtomicU64::new(next - 1),
        });
        let (events, _) = broadcast::channel(config.subscriber_buffer);
        let (ops_tx, ops_rx) = flume::bounded::<(Op, Reply)>(config.queue_depth_max);
        let (apply_tx, apply_rx) = flume::bounded::<ApplyBatch>(APPLY_QUEUE_DEPTH);
        let decider = Arc::new(Mutex::new(Decider {
            seq: Sequencer::new(store.clone(), log.clone(), config.clone())?,
            batch_id: 0,
            next_index: next,
        }));
        let mut threads = Vec::new();
        {
            let log = log.clone();
            let shared = shared.clone();
            let clock = config.clock.clone();
            let decider = decider.clone();
            threads.push(spawn("chatlog-sequencer", move || {
                store::quiet_perf_counters();
                run_sequencer(&decider, ops_rx, apply_tx, log, shared, clock);
            })?);
        }
        {
            let store = store.clone();
            let shared = shared.clone();
            let events = events.clone();
            threads.push(spawn("chatlog-applier", move || {
                store::quiet_perf_counters();
                run_applier(apply_rx, store, shared, events);
            })?);
        }
        Ok(Engine {
            log,
            store,
            config,
            shared,
            ops: Some(ops_tx),
            events,
            threads: Mutex::new(threads),
            dir,
            proposer: std::sync::OnceLock::new(),
            decider,
            replicated_turn: Arc::new(tokio::sync::Mutex::new(())),
            ingest_on_close: true,
        })
    }

    /// The configuration the engine was opened with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The directory the engine was opened in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The underlying log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The underlying index store (read access for tools and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Why the engine refuses writes, if it does (storage failure).
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes this engine a replica: from now on every write operation submitted by its
    /// callers goes to `proposer` instead of the local sequencer. Set once; later calls are
    /// ignored.
    pub fn set_proposer(&self, proposer: Arc<dyn Proposer>) {
        let _ = self.proposer.set(proposer);
    }

    /// The current time of the engine's clock (ms).
    pub fn now(&self) -> u64 {
        (self.config.clock)()
    }

    /// Applies replicated operations, each with the timestamp its proposer gave it, as one
    /// group followed by a [`Record::Applied`] carrying `marker`; resolves once the group is
    /// durable and indexed, to one answer per operation. Every replica that applies the same
    /// groups from the same state decides the same seqs, ids and refusals. An `Err` is a
    /// storage failure: the engine stops accepting writes.
    ///
    /// On a replicated engine ([`EngineConfig::replicated`]) the group is decided and indexed
    /// on the calling task (the indexes' RocksDB write runs there, blocking it briefly) and
    /// only the log's group commit runs on another thread: a replica applies one group at a
    /// time, so handing it to the sequencer and applier threads bought no batching, only two
    /// more thread switches per group. Groups are applied in the order of the calls.
    pub fn apply_replicated(
        &self,
        ops: Vec<(Op, u64)>,
        marker: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Vec<Result<Outcome, Refusal>>, ChatError>>
    + Send
    + 'static {
        let (reply, rx) = oneshot::channel();
        let ops_tx = self.ops.clone();
        let shared = self.shared.clone();
        let inline = self.config.replicated.then(|| {
            (
                self.decider.clone(),
                self.replicated_turn.clone(),
                self.log.clone(),
                self.store.clone(),
                self.events.clone(),
            )
        });
        async move {
            if shared.failed.load(Ordering::Acquire) {
                return Err(shared.unavailable());
            }
            let group = (Op::Group { ops, marker }, reply);
            if let Some((decider, turn, log, store, events)) = inline {
                let _turn = turn.lock_owned().await;
                let decided = decider
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .decide_and_append(vec![group], 0, &log, &shared);
                if let Some(mut batch) = decided {
                    let durable = match batch.pending.take() {
                        None => Ok(batch.first_index),
                        Some(pending) => pending.await.map_err(|e| e.to_string()),
                    };
                    if durable_as_counted(&shared, batch.first_index, durable) {
                        apply_group(vec![batch], &store, &shared, &events);
                    }
                }
            } else {
                let tx = ops_tx.ok_or(ChatError::Unavailable(crate::Error::Closed))?;
                // Replicated groups are never refused as busy: every replica must apply them.
                tx.send_async(group)
                    .await
                    .map_err(|_| ChatError::Unavailable(crate::Error::Closed))?;
            }
            match rx.await {
                Ok(Ok(Outcome::Group(answers))) => Ok(answers),
                Ok(Ok(other)) => unreachable!("a group answered {other:?}"),
                Ok(Err(e)) => Err(e),
                // Dropped unanswered: the engine failed (or closed) on the way.
                Err(_) => Err(shared.unavailable()),
            }
        }
    }

    /// Streams a canonical encoding of the engine's chat state to `sink`: every index column
    /// family except those holding positions in this engine's own log (`history`, `meta`),
    /// then every chat's events from its horizon on as history shows them. Two replicas that
    /// applied the same replicated operations stream identical bytes (their own logs may
    /// group records differently), so a hash of it compares replicas.
    pub fn state_bytes(&self, sink: &mut dyn FnMut(&[u8])) -> Result<(), ChatError> {
        for cf in store::DERIVED_CFS {
            if cf == store::CF_HISTORY || cf == store::CF_META {
                continue;
            }
            sink(cf.as_bytes());
            for (k, v) in self.store.dump(cf)? {
                sink(&(k.len() as u64).to_le_bytes());
                sink(&k);
                sink(&(v.len() as u64).to_le_bytes());
                sink(&v);
            }
        }
        for (chat, last) in self.store.all_last_seqs()? {
            let mut seq = self.store.horizon(&chat)?.max(1);
            while seq <= last {
                let n = (last - seq + 1).min(HISTORY_LIMIT_MAX as u64) as usize;
                for e in self.events_range(&chat, seq, n)? {
                    let bytes = postcard::to_allocvec(&(&e.event, e.edited, e.deleted))
                        .expect("postcard encoding");
                    sink(&bytes);
                }
                seq += n as u64;
            }
        }
        Ok(())
    }

    /// The marker of the last replicated group this engine applied, if any.
    pub fn replicated_marker(&self) -> Result<Option<Vec<u8>>, ChatError> {
        Ok(self.store.replicated_marker()?)
    }

    /// Writes a consistent copy of the engine to `dest` (which must not exist): a RocksDB
    /// checkpoint of the indexes in `dest/index` and the log's entries in `dest/log`.
    /// [`Engine::open`] on a copy of `dest` gives an engine with the same state. Call it
    /// while no write is in flight (a replica calls it between applied groups).
    ///
    /// The same as [`Engine::checkpoint_begin`] followed at once by
    /// [`Engine::checkpoint_finish`].
    pub fn checkpoint(&self, dest: &Path) -> Result<(), ChatError> {
        let pending = self.checkpoint_begin(dest)?;
        self.checkpoint_finish(pending)
    }

    /// The part of a checkpoint that must see no write in flight, and costs little: a
    /// RocksDB checkpoint (SST files hard-linked, memtables flushed) and the log's sealed
    /// segments hard-linked ([`Log::copy_through`]). The index tail is not ingested first:
    /// the copy holds what a crash at this moment would leave, and opening it replays the
    /// log's entries after the tail's durable point as every open does. Nothing in it grows
    /// with the history, which a copy of the log entry by entry did (it paused a replica's
    /// applies for as long as the whole log took to copy).
    ///
    /// `dest` is complete once [`Engine::checkpoint_finish`] returns, which may run while
    /// writes go on. Its sealed segments and SST files share storage with this engine's: copy
    /// it elsewhere before opening it.
    pub fn checkpoint_begin(&self, dest: &Path) -> Result<PendingCheckpoint, ChatError> {
        std::fs::create_dir_all(dest).map_err(|e| crate::Error::io("create_dir_all", dest, e))?;
        let applied = self.store.applied_index()?;
        // The log first: the segments linked now stay, whatever retention purges meanwhile
        // (`enforce_retention` runs on its own thread). The RocksDB checkpoint taken next
        // replays from a tail durable point no earlier than the live one now, which the log
        // keeps, so the copy holds every entry it needs.
        let log = self
            .log
            .copy_through(&dest.join("log"), applied.max(self.log.first_index() - 1))?;
        self.store.checkpoint(&dest.join("index"))?;
        if self.store.applied_index()? != applied {
            return Err(ChatError::BadRequest(
                "a write was applied while the checkpoint began: its indexes are ahead of its \
                 log; begin a checkpoint only while no write is in flight"
                    .into(),
            ));
        }
        Ok(PendingCheckpoint { log })
    }

    /// Completes a checkpoint begun by [`Engine::checkpoint_begin`]: copies the log segment
    /// that holds the last applied entry up to it, and syncs this engine's log (a replica's
    /// log is synced only every so often; its Raft log is purged up to a snapshot, so the
    /// entries a snapshot covers must be durable here first).
    pub fn checkpoint_finish(&self, pending: PendingCheckpoint) -> Result<(), ChatError> {
        pending.log.finish()?;
        self.log.sync()?;
        Ok(())
    }

    fn submit(&self, op: Op) -> Ticket {
        let (reply, rx) = oneshot::channel();
        if let Some(proposer) = self.proposer.get() {
            if self.shared.failed.load(Ordering::Acquire) {
                return Ticket {
                    state: TicketState::Failed(Some(self.shared.unavailable())),
                };
            }
            proposer.propose(op, self.now(), Responder(reply));
            return Ticket {
                state: TicketState::Waiting(rx),
            };
        }
        let result = match &self.ops {
            _ if self.shared.failed.load(Ordering::Acquire) => Err(self.shared.unavailable()),
            // A replica writes only what replication ordered (`apply_replicated`); a local
            // write now would diverge from the other replicas.
            _ if self.config.replicated => Err(ChatError::Unavailable(crate::Error::Closed)),
            None => Err(ChatError::Unavailable(crate::Error::Closed)),
            Some(tx) => tx.try_send((op, reply)).map_err(|e| match e {
                flume::TrySendError::Full(_) => ChatError::Busy,
                flume::TrySendError::Disconnected(_) => {
                    ChatError::Unavailable(crate::Error::Closed)
                }
            }),
        };
        Ticket {
            state: match result {
                Ok(()) => TicketState::Waiting(rx),
                Err(e) => TicketState::Failed(Some(e)),
            },
        }
    }

    /// Creates a chat. The creator is a member; `members` are added with it (at most
    /// [`EngineConfig::members_max`] in all). With `direct`, `members` names the one other
    /// user and the same chat is returned for the pair every time.
    pub fn create_chat(
        &self,
        creator: &str,
        members: &[String],
        title: Option<String>,
        direct: bool,
    ) -> Result<String, ChatError> {
        self.create_chat_ticket(creator, members, title, direct)
            .chat()
    }

    /// [`Engine::create_chat`] without waiting: wait on the ticket (blocking or `.await`).
    pub fn create_chat_ticket(
        &self,
        creator: &str,
        members: &[String],
        title: Option<String>,
        direct: bool,
    ) -> Ticket {
        self.submit(Op::Create {
            creator: creator.to_owned(),
            members: members.to_vec(),
            title,
            direct,
        })
    }

    /// Adds members (any member may); returns the seq of the `members` event, or the chat's
    /// last seq if nobody was added.
    pub fn add_members(&self, user: &str, chat: &str, users: &[String]) -> Result<u64, ChatError> {
        self.add_members_ticket(user, chat, users).seq()
    }

    /// [`Engine::add_members`] without waiting.
    pub fn add_members_ticket(&self, user: &str, chat: &str, users: &[String]) -> Ticket {
        self.submit(Op::AddMembers {
            user: user.to_owned(),
            chat: chat.to_owned(),
            users: users.to_vec(),
        })
    }

    /// Removes members (a member may remove itself; the creator anyone).
    pub fn remove_members(
        &self,
        user: &str,
        chat: &str,
        users: &[String],
    ) -> Result<u64, ChatError> {
        self.remove_members_ticket(user, chat, users).seq()
    }

    /// [`Engine::remove_members`] without waiting.
    pub fn remove_members_ticket(&self, user: &str, chat: &str, users: &[String]) -> Ticket {
        self.submit(Op::RemoveMembers {
            user: user.to_owned(),
            chat: chat.to_owned(),
            users: users.to_vec(),
        })
    }

    /// Appends a message; idempotent on `(chat, user, cmid)` for ever. Returns once durable.
    pub fn send(
        &self,
        user: &str,
        chat: &str,
        cmid: &str,
        body: Option<String>,
        file: Option<String>,
    ) -> Result<Sent, ChatError> {
        self.send_ticket(user, chat, cmid, body, file).sent()
    }

    /// [`Engine::send`] without waiting.
    pub fn send_ticket(
        &self,
        user: &str,
        chat: &str,
        cmid: &str,
        body: Option<String>,
        file: Option<String>,
    ) -> Ticket {
        self.submit(Op::Send {
            user: user.to_owned(),
            chat: chat.to_owned(),
            cmid: cmid.to_owned(),
            body,
            file,
        })
    }

    /// Edits a message (only its sender); returns the seq of the `edit` event.
    pub fn edit(
        &self,
        user: &str,
        chat: &str,
        target: u64,
        body: String,
    ) -> Result<u64, ChatError> {
        self.edit_ticket(user, chat, target, body).seq()
    }

    /// [`Engine::edit`] without waiting.
    pub fn edit_ticket(&self, user: &str, chat: &str, target: u64, body: String) -> Ticket {
        self.submit(Op::Edit {
            user: user.to_owned(),
            chat: chat.to_owned(),
            target,
            body,
        })
    }

    /// Deletes a message (its sender or the chat's creator); returns the `delete` event's seq.
    pub fn delete(&self, user: &str, chat: &str, target: u64) -> Result<u64, ChatError> {
        self.delete_ticket(user, chat, target).seq()
    }

    /// [`Engine::delete`] without waiting.
    pub fn delete_ticket(&self, user: &str, chat: &str, target: u64) -> Ticket {
        self.submit(Op::Delete {
            user: user.to_owned(),
            chat: chat.to_owned(),
            target,
        })
    }

    /// Moves a device's `delivered` cursor (or `read`, which implies delivered) forward to
    /// `seq`; lower values are ignored. Returns once durable.
    pub fn mark(
        &self,
        user: &str,
        device: &str,
        chat: &str,
        seq: u64,
        read: bool,
    ) -> Result<(), ChatError> {
        self.mark_ticket(user, device, chat, seq, read).done()
    }

    /// [`Engine::mark`] without waiting.
    pub fn mark_ticket(
        &self,
        user: &str,
        device: &str,
        chat: &str,
        seq: u64,
        read: bool,
    ) -> Ticket {
        self.submit(Op::Cursor {
            user: user.to_owned(),
            device: device.to_owned(),
            chat: chat.to_owned(),
            seq,
            read,
        })
    }

    /// Records file metadata (the server stores the bytes). Returns once durable.
    pub fn register_file(&self, meta: FileMeta) -> Result<(), ChatError> {
        self.register_file_ticket(meta).done()
    }

    /// [`Engine::register_file`] without waiting.
    pub fn register_file_ticket(&self, meta: FileMeta) -> Ticket {
        self.submit(Op::File(meta))
    }

    /// Registers a device the first time it is seen (it starts at every chat's current end).
    pub fn register_device(&self, user: &str, device: &str) -> Result<(), ChatError> {
        self.register_device_ticket(user, device).done()
    }

    /// [`Engine::register_device`] without waiting. A device already registered answers at
    /// once without a write (so a replica without quorum still lets known devices resume).
    pub fn register_device_ticket(&self, user: &str, device: &str) -> Ticket {
        if types::check_user(user).is_ok()
            && types::check_device(device).is_ok()
            && self
                .store
                .contains(store::CF_DEVICES, &store::key(&[user, device]))
                .unwrap_or(false)
        {
            let (reply, rx) = oneshot::channel();
            let _ = reply.send(Ok(Outcome::Done));
            return Ticket {
                state: TicketState::Waiting(rx),
            };
        }
        self.submit(Op::Device {
            user: user.to_owned(),
            device: device.to_owned(),
        })
    }

    fn member_meta(&self, user: &str, chat: &str) -> Result<store::ChatMeta, ChatError> {
        let meta = self
            .store
            .chat(chat)?
            .ok_or_else(|| ChatError::NotFound(format!("chat {chat}")))?;
        if meta
            .members
            .binary_search_by(|m| m.as_str().cmp(user))
            .is_err()
        {
            return Err(ChatError::Forbidden(format!(
                "{user} is not a member of {chat}"
            )));
        }
        Ok(meta)
    }

    /// Current members of a chat (no permission check: for the server's fanout).
    pub fn members(&self, chat: &str) -> Result<Vec<String>, ChatError> {
        Ok(self
            .store
            .chat(chat)?
            .ok_or_else(|| ChatError::NotFound(format!("chat {chat}")))?
            .members)
    }

    /// A page of history, ascending: no bound → the latest `limit`; `before` → the latest
    /// `limit` below it; `after` → the earliest `limit` above it; both → the earliest `limit`
    /// strictly between. `limit` defaults to 50 and is capped at 500.
    pub fn history(
        &self,
        user: &str,
        chat: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<usize>,
    ) -> Result<History, ChatError> {
        self.member_meta(user, chat)?;
        let last_seq = self.store.last_seq(chat)?;
        let horizon = self.store.horizon(chat)?;
        let limit = limit
            .unwrap_or(HISTORY_LIMIT_DEFAULT)
            .min(HISTORY_LIMIT_MAX) as u64;
        let top = before.map_or(last_seq, |b| b.saturating_sub(1).min(last_seq));
        let (lo, hi) = match after {
            Some(a) => {
                let lo = a.saturating_add(1).max(horizon);
                (lo, top.min(lo.saturating_add(limit).saturating_sub(1)))
            }
            None => ((top + 1).saturating_sub(limit).max(horizon).max(1), top),
        };
        let events = if lo > hi || limit == 0 {
            Vec::new()
        } else {
            self.events_range(chat, lo, (hi - lo + 1) as usize)?
        };
        Ok(History {
            events,
            last_seq,
            horizon,
        })
    }

    fn events_range(
        &self,
        chat: &str,
        from: u64,
        count: usize,
    ) -> Result<Vec<HistoryEvent>, ChatError> {
        let entries = self.store.history_range(chat, from, count)?;
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let Record::Event { mut event, .. } = read_record(&self.log, entry.log_index)? else {
                return Err(index_points_wrong(entry.log_index));
            };
            if let EventKind::Message { body, .. } = &mut event.kind {
                if entry.deleted {
                    *body = None;
                } else if let Some(edit_index) = entry.edit_log_index {
                    match read_record(&self.log, edit_index)? {
                        Record::Event {
                            event:
                                Event {
                                    kind: EventKind::Edit { body: new, .. },
                                    ..
                                },
                            ..
                        } => *body = Some(new),
                        _ => return Err(index_points_wrong(edit_index)),
                    }
                }
            }
            out.push(HistoryEvent {
                event,
                edited: entry.edit_log_index.is_some(),
                deleted: entry.deleted,
            });
        }
        Ok(out)
    }

    /// The user's chats with last seq and the user's receipt values.
    pub fn list_chats(&self, user: &str) -> Result<Vec<ChatSummary>, ChatError> {
        let mut out = Vec::new();
        for (chat, _joined) in self.store.scan_prefix::<u64>(CF_USER_CHATS, user)? {
            let Some(meta) = self.store.chat(&chat)? else {
                continue;
            };
            let (delivered, read) = self
                .store
                .get::<(u64, u64)>(CF_RECEIPTS, &store::key(&[&chat, user]))?
                .unwrap_or((0, 0));
            out.push(ChatSummary {
                last_seq: self.store.last_seq(&chat)?,
                chat,
                title: meta.title,
                members: meta.members,
                delivered,
                read,
            });
        }
        Ok(out)
    }

    /// Per member: the max over its devices of `delivered` and `read`.
    pub fn receipts(&self, user: &str, chat: &str) -> Result<Vec<Receipt>, ChatError> {
        let meta = self.member_meta(user, chat)?;
        let values: HashMap<String, (u64, u64)> = self
            .store
            .scan_prefix::<(u64, u64)>(CF_RECEIPTS, chat)?
            .into_iter()
            .collect();
        Ok(meta
            .members
            .into_iter()
            .map(|m| {
                let (delivered, read) = values.get(&m).copied().unwrap_or((0, 0));
                Receipt {
                    user: m,
                    delivered,
                    read,
                }
            })
            .collect())
    }

    /// Where a device resumes in each of its user's chats: after `since[chat]` if given, else
    /// after its cursor; a device seen for the first time starts at every chat's current end
    /// (registered durably now); a chat joined later starts at the `members` event that added
    /// the user.
    pub fn resume_points(
        &self,
        user: &str,
        device: &str,
        since: &HashMap<String, u64>,
    ) -> Result<Vec<ResumePoint>, ChatError> {
        self.register_device(user, device)?;
        self.resume_points_registered(user, device, since)
    }

    /// [`Engine::resume_points`] for a device already registered (with
    /// [`Engine::register_device_ticket`], awaited): reads only, never waits for the log.
    pub fn resume_points_registered(
        &self,
        user: &str,
        device: &str,
        since: &HashMap<String, u64>,
    ) -> Result<Vec<ResumePoint>, ChatError> {
        let mut out = Vec::new();
        for (chat, joined) in self.store.scan_prefix::<u64>(CF_USER_CHATS, user)? {
            let last_seq = self.store.last_seq(&chat)?;
            // Never before the members event that (last) added the user: events from before
            // a re-join were not theirs to receive.
            let after = match since.get(&chat) {
                Some(s) => *s,
                None => self
                    .store
                    .get::<Cursor>(CF_CURSORS, &store::key(&[user, device, &chat]))?
                    .map_or(0, |c| c.resume_after())
                    .max(joined.saturating_sub(1)),
            };
            out.push(ResumePoint {
                chat,
                after: after.min(last_seq),
                last_seq,
            });
        }
        Ok(out)
    }

    /// Everything a device has not seen, chat by chat in seq order (the resume stream).
    pub fn resume(
        &self,
        user: &str,
        device: &str,
        since: &HashMap<String, u64>,
    ) -> Result<Vec<Event>, ChatError> {
        let mut out = Vec::new();
        for point in self.resume_points(user, device, since)? {
            let horizon = self.store.horizon(&point.chat)?;
            let mut after = point.after.max(horizon - 1);
            while after < point.last_seq {
                let count = ((point.last_seq - after) as usize).min(HISTORY_LIMIT_MAX);
                let page = self.events_range(&point.chat, after + 1, count)?;
                after += page.len() as u64;
                out.extend(page.into_iter().map(|h| h.event));
            }
        }
        Ok(out)
    }

    /// A device's cursor in a chat.
    pub fn cursor(&self, user: &str, device: &str, chat: &str) -> Result<Cursor, ChatError> {
        Ok(self
            .store
            .get::<Cursor>(CF_CURSORS, &store::key(&[user, device, chat]))?
            .unwrap_or_default())
    }

    /// File metadata, if the user may see the file: its uploader, or a member of a chat with
    /// a message referencing it. Anyone else gets `NotFound` (no existence leak).
    pub fn file(&self, user: &str, id: &str) -> Result<FileMeta, ChatError> {
        let not_found = || ChatError::NotFound(format!("file {id}"));
        let meta: FileMeta = self
            .store
            .get(CF_FILES, id.as_bytes())?
            .ok_or_else(not_found)?;
        if meta.uploader == user {
            return Ok(meta);
        }
        for (chat, ()) in self.store.scan_prefix::<()>(CF_FILE_REFS, id)? {
            if self.member_meta(user, &chat).is_ok() {
                return Ok(meta);
            }
        }
        Err(not_found())
    }

    /// Up to `limit` files' metadata in id order, after id `after` (from the first if
    /// `None`): pages through every file, whoever uploaded it (for a server that checks its
    /// copies of the files' bytes; no access rule applies).
    pub fn files_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FileMeta>, ChatError> {
        Ok(self
            .store
            .page::<FileMeta>(CF_FILES, after.map(str::as_bytes), limit)?
            .into_iter()
            .map(|(_, meta)| meta)
            .collect())
    }

    /// Persists last-seen times (soft state, written lazily by the presence layer).
    pub fn save_last_seen(&self, values: &[(String, u64)]) -> Result<(), ChatError> {
        Ok(self.store.put_last_seen(values)?)
    }

    /// A persisted last-seen time.
    pub fn last_seen(&self, user: &str) -> Result<Option<u64>, ChatError> {
        Ok(self.store.get::<u64>(CF_LAST_SEEN, user.as_bytes())?)
    }

    /// Subscribes to committed records from now on, in log order.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        Subscription {
            rx: self.events.subscribe(),
            engine: self.clone(),
            next: self.shared.applied_index.load(Ordering::Acquire) + 1,
            catch_up_to: 0,
        }
    }

    /// Applies [`EngineConfig::retention`]: advances each chat's horizon (durably, through the
    /// log), then removes whole sealed log segments that hold nothing still kept. The index
    /// WAL is synced first, so recovery never needs a removed record for replay.
    pub fn enforce_retention(&self) -> Result<RetentionReport, ChatError> {
        let chats_trimmed = self.submit(Op::Retention).seq()?;
        let mut min_live = u64::MAX;
        for (chat, last) in self.store.all_last_seqs()? {
            let horizon = self.store.horizon(&chat)?;
            if horizon > last {
                continue;
            }
            let entry: store::HistoryEntry = self
                .store
                .get(store::CF_HISTORY, &store::history_key(&chat, horizon))?
                .ok_or_else(|| index_points_wrong(horizon))?;
            min_live = min_live.min(entry.log_index);
        }
        // Replay after a crash starts at the first record not yet in RocksDB (tail included).
        self.store.flush_tail()?;
        let replay_from = self.store.indexed_through()? + 1;
        let log_first_index = self.log.purge_before(min_live.min(replay_from))?;
        Ok(RetentionReport {
            chats_trimmed,
            log_first_index,
        })
    }

    /// Stops the engine's threads after queued work is done.
    pub fn close(mut self) {
        self.shutdown();
    }

    /// Stops like [`Engine::close`] but leaves the index tail unwritten, as a crash of the
    /// process would (an ingestion already running completes): the next open replays those
    /// records from the log. For crash tests.
    #[doc(hidden)]
    pub fn close_leaving_tail(mut self) {
        self.ingest_on_close = false;
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.ops = None;
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        // A clean close leaves nothing to replay.
        if !self.ingest_on_close {
            return;
        }
        if let Err(e) = self.store.flush_tail() {
            tracing::warn!(error = %e, "could not ingest the index tail while closing");
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn index_points_wrong(index: u64) -> ChatError {
    ChatError::Unavailable(crate::Error::Corruption {
        segment: "history index".into(),
        offset: index,
        reason: "history entry points at the wrong kind of record".into(),
    })
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, ChatError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| ChatError::Unavailable(crate::Error::io("spawn thread", name, e)))
}

/// Cuts a replicated engine's log after its last [`Record::Applied`]: records after it are
/// the start of a group a crash tore, never indexed (the applier indexes whole batches, and
/// every batch of a replica ends with an `Applied`). Replication applies the group again.
fn cut_after_last_group(log: &Log, applied: u64) -> Result<(), ChatError> {
    let next = log.next_index();
    let mut index = next;
    while index > log.first_index() && index > applied + 1 {
        let record = read_record(log, index - 1)?;
        if matches!(record, Record::Applied { .. }) {
            break;
        }
        index -= 1;
    }
    if index < next {
        tracing::warn!(
            from = index,
            to = next,
            "replica: cutting the records of a torn replicated group"
        );
        log.truncate_from(index)?;
    }
    Ok(())
}

/// Applies log records `from..to` to the indexes, in batches.
fn replay(log: &Log, store: &Store, from: u64, to: u64) -> Result<(), ChatError> {
    const REPLAY_BATCH_RECORDS: usize = 10_000;
    let mut batch = store.batch();
    let mut n = 0;
    for item in log.iter_from(from.max(log.first_index())) {
        let (index, bytes) = item?;
        if index >= to {
            break;
        }
        let record = decode_record(log, index, &bytes)?;
        batch.apply(&record, index)?;
        n += 1;
        if n == REPLAY_BATCH_RECORDS {
            batch.commit()?;
            batch = store.batch();
            n = 0;
        }
    }
    batch.commit()?;
    Ok(())
}

fn run_sequencer(
    decider: &Mutex<Decider>,
    ops: flume::Receiver<(Op, Reply)>,
    apply: flume::Sender<ApplyBatch>,
    log: Arc<Log>,
    shared: Arc<Shared>,
    clock: Clock,
) {
    while let Ok(first) = ops.recv() {
        let mut batch = vec![first];
        while batch.len() < OPS_PER_BATCH_MAX {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if shared.failed.load(Ordering::Acquire) {
            for (_, reply) in batch {
                let _ = reply.send(Err(shared.unavailable()));
            }
            continue;
        }
        let decided = decider
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .decide_and_append(batch, clock(), &log, &shared);
        if let Some(batch) = decided
            && apply.send(batch).is_err()
        {
            break;
        }
    }
}

fn run_applier(
    batches: flume::Receiver<ApplyBatch>,
    store: Arc<Store>,
    shared: Arc<Shared>,
    events: broadcast::Sender<Arc<Committed>>,
) {
    let fail_all = |group: Vec<ApplyBatch>| {
        for b in group {
            for (reply, _) in b.replies {
                let _ = reply.send(Err(shared.unavailable()));
            }
        }
    };
    while let Ok(first) = batches.recv() {
        // Every sequencer batch queued behind this one was most likely made durable by the
        // same group commit: apply them all with one RocksDB write.
        let mut group = vec![first];
        while group.len() < APPLY_QUEUE_DEPTH {
            match batches.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        if shared.failed.load(Ordering::Acquire) {
            fail_all(group);
            continue;
        }
        // The index writes are prepared while the log syncs (they read only what earlier
        // groups committed), and committed once every batch of the group is durable.
        let mut wb = store.batch();
        let prepared = prepare_group(&group, &mut wb);
        let count = group.len();
        // Wait for durability in order; a failure ends the durable prefix.
        let mut durable = Vec::with_capacity(group.len());
        let mut rest = group.into_iter();
        for mut b in rest.by_ref() {
            let result = match b.pending.take() {
                None => Ok(b.first_index),
                Some(pending) => pending.wait().map_err(|e| e.to_string()),
            };
            if durable_as_counted(&shared, b.first_index, result) {
                durable.push(b);
            } else {
                fail_all(vec![b]);
                break;
            }
        }
        if durable.len() == count && prepared.is_ok() {
            finish_group(durable, wb.commit(), &shared, &events);
        } else {
            // Only a prefix is durable (or preparing failed): index exactly what is.
            drop(wb);
            apply_group(durable, &store, &shared, &events);
        }
        fail_all(rest.collect());
    }
}

/// Whether a batch's log append came back durable at the first index the decider counted on;
/// otherwise the engine fails (and the caller answers the batch's operations).
fn durable_as_counted(shared: &Shared, counted: u64, result: Result<u64, String>) -> bool {
    match result {
        Ok(first) if first == counted => true,
        Ok(first) => {
            shared.fail(&format!(
                "log assigned index {first} where {counted} was expected"
            ));
            false
        }
        Err(e) => {
            shared.fail(&e);
            false
        }
    }
}

/// Adds the index writes of every record of `group` to `wb`.
fn prepare_group(group: &[ApplyBatch], wb: &mut store::Batch<'_>) -> crate::Result<()> {
    group
        .iter()
        .flat_map(|b| {
            b.records
                .iter()
                .enumerate()
                .map(move |(k, r)| (b.first_index + k as u64, r))
        })
        .try_for_each(|(index, r)| wb.apply(r, index))
}

fn apply_group(
    group: Vec<ApplyBatch>,
    store: &Store,
    shared: &Shared,
    events: &broadcast::Sender<Arc<Committed>>,
) {
    let mut wb = store.batch();
    let applied = prepare_group(&group, &mut wb).and_then(|()| wb.commit());
    finish_group(group, applied, shared, events);
}

/// Answers and publishes a durable group once its index writes are committed (`applied`).
fn finish_group(
    group: Vec<ApplyBatch>,
    applied: crate::Result<()>,
    shared: &Shared,
    events: &broadcast::Sender<Arc<Committed>>,
) {
    let Some(last) = group.last() else {
        return;
    };
    let last_id = last.id;
    if let Err(e) = applied {
        shared.fail(&e);
        for b in group {
            for (reply, _) in b.replies {
                let _ = reply.send(Err(shared.unavailable()));
            }
        }
        return;
    }
    if let Some(b) = group.iter().rev().find(|b| !b.records.is_empty()) {
        shared.applied_index.store(
            b.first_index + b.records.len() as u64 - 1,
            Ordering::Release,
        );
    }
    shared.applied_batch.store(last_id, Ordering::Release);
    // With no subscriber there is nobody to publish to: no event is built. No subscriber
    // misses this group for it: `Engine::subscribe` registers its receiver before it reads
    // `applied_index`, this thread stored `applied_index` above before it counts receivers,
    // and both go through the channel's lock. So either the receiver is counted here, or the
    // subscriber starts after this group.
    let publish = events.receiver_count() > 0;
    for b in group {
        for (reply, outcome) in b.replies {
            let _ = reply.send(Ok(outcome));
        }
        if !publish {
            continue;
        }
        for (k, record) in b.records.into_iter().enumerate() {
            let _ = events.send(Arc::new(Committed {
                log_index: b.first_index + k as u64,
                record,
            }));
        }
    }
}

enum TicketState {
    Waiting(oneshot::Receiver<Result<Outcome, ChatError>>),
    Failed(Option<ChatError>),
}

/// A submitted write operation. Wait for it with the typed methods (blocking) or `.await` it.
pub struct Ticket {
    state: TicketState,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticket")
    }
}

/// The reply to an awaited [`Ticket`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A chat id (create).
    Chat(String),
    /// A seq (membership, edit, delete).
    Seq(u64),
    /// A sent message.
    Sent(Sent),
    /// Done (cursors, devices, files).
    Done,
}

impl From<Outcome> for Answer {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Chat(c) => Answer::Chat(c),
            Outcome::Seq(s) => Answer::Seq(s),
            Outcome::Sent { seq, ts } => Answer::Sent(Sent { seq, ts }),
            Outcome::Done => Answer::Done,
            Outcome::Group(_) => unreachable!("a group answers apply_replicated, not a ticket"),
        }
    }
}

impl Ticket {
    /// Blocks until the operation is durable (or refused).
    pub fn wait(self) -> Result<Answer, ChatError> {
        match self.state {
            TicketState::Failed(e) => Err(e.expect("ticket waited once")),
            TicketState::Waiting(rx) => rx
                .recv()
                .map_err(|_| ChatError::Unavailable(crate::Error::Closed))?
                .map(Answer::from),
        }
    }

    fn chat(self) -> Result<String, ChatError> {
        match self.wait()? {
            Answer::Chat(c) => Ok(c),
            other => unreachable!("create answered {other:?}"),
        }
    }

    fn seq(self) -> Result<u64, ChatError> {
        match self.wait()? {
            Answer::Seq(s) => Ok(s),
            other => unreachable!("expected a seq, got {other:?}"),
        }
    }

    fn sent(self) -> Result<Sent, ChatError> {
        match self.wait()? {
            Answer::Sent(s) => Ok(s),
            other => unreachable!("send answered {other:?}"),
        }
    }

    fn done(self) -> Result<(), ChatError> {
        self.wait().map(|_| ())
    }
}

impl std::future::Future for Ticket {
    type Output = Result<Answer, ChatError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.state {
            TicketState::Failed(e) => {
                std::task::Poll::Ready(Err(e.take().expect("polled after completion")))
            }
            TicketState::Waiting(rx) => std::pin::Pin::new(rx).poll(cx).map(|r| match r {
                Ok(result) => result.map(Answer::from),
                Err(_) => Err(ChatError::Unavailable(crate::Error::Closed)),
            }),
        }
    }
}

/// Why [`Subscription::recv`] did not return a record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriptionError {
    /// The subscriber fell behind the in-memory buffer. Nothing is lost: the next calls
    /// return the records from `resume_from` on, read back from the log.
    #[error("subscriber lagged; resuming from log index {resume_from}")]
    Lagged {
        /// The first log index the subscriber had not received.
        resume_from: u64,
    },
    /// The engine is gone.
    #[error("engine closed")]
    Closed,
    /// Reading back from the log failed.
    #[error(transparent)]
    Read(#[from] ChatError),
}

/// A subscription to committed records, in log order, with no gaps.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Committed>>,
    engine: Arc<Engine>,
    /// Log index of the next record to hand out.
    next: u64,
    /// While > `next`: catching up from the log up to (excluding) this index.
    catch_up_to: u64,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("next", &self.next)
            .finish()
    }
}

impl Subscription {
    fn next_from_log(&mut self) -> Option<Result<Arc<Committed>, SubscriptionError>> {
        if self.next >= self.catch_up_to {
            return None;
        }
        let index = self.next;
        self.next += 1;
        Some(
            read_record(&self.engine.log, index)
                .map(|record| {
                    Arc::new(Committed {
                        log_index: index,
                        record,
                    })
                })
                .map_err(SubscriptionError::from),
        )
    }

    fn accept(
        &mut self,
        item: Result<Arc<Committed>, broadcast::error::RecvError>,
    ) -> Option<Result<Arc<Committed>, SubscriptionError>> {
        match item {
            Ok(c) if c.log_index < self.next => None,
            Ok(c) if c.log_index == self.next => {
                self.next += 1;
                Some(Ok(c))
            }
            Ok(c) => {
                // A gap (the subscriber was created between apply and publish): fill it
                // from the log.
                self.catch_up_to = c.log_index + 1;
                self.next_from_log()
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                self.catch_up_to = self.engine.shared.applied_index.load(Ordering::Acquire) + 1;
                Some(Err(SubscriptionError::Lagged {
                    resume_from: self.next,
                }))
            }
            Err(broadcast::error::RecvError::Closed) => Some(Err(SubscriptionError::Closed)),
        }
    }

    /// The next committed record (blocking).
    pub fn recv_blocking(&mut self) -> Result<Arc<Committed>, SubscriptionError> {
        loop {
            if let Some(r) = self.next_from_log() {
                return r;
            }
            let item = self.rx.blocking_recv();
            if let Some(r) = self.accept(item) {
                return r;
            }
        }
    }

    /// The next committed record if one is available now (never waits).
    pub fn try_recv(&mut self) -> Option<Result<Arc<Committed>, SubscriptionError>> {
        loop {
            if let Some(r) = self.next_from_log() {
                return Some(r);
            }
            let item = match self.rx.try_recv() {
                Ok(c) => Ok(c),
                Err(broadcast::error::TryRecvError::Empty) => return None,
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(broadcast::error::RecvError::Lagged(n))
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    Err(broadcast::error::RecvError::Closed)
                }
            };
            if let Some(r) = self.accept(item) {
                return Some(r);
            }
        }
    }

    /// The next committed record.
    pub async fn recv(&mut self) -> Result<Arc<Committed>, SubscriptionError> {
        loop {
            if let Some(r) = self.next_from_log() {
                return r;
            }
            let item = self.rx.recv().await;
            if let Some(r) = self.accept(item) {
                return r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::types::FileMeta;
    use super::*;

    #[test]
    fn encoded_records_decode_one_by_one() {
        let records = vec![
            Record::Horizon {
                chat: "g1".into(),
                seq: 7,
            },
            Record::File(FileMeta {
                id: "f1".into(),
                uploader: "u1".into(),
                size: 3,
                sha256: "ab".repeat(32),
                content_type: "text/plain".into(),
            }),
            // Longer than the buffer's guess per record.
            Record::Horizon {
                chat: "g".repeat(1_000),
                seq: u64::MAX,
            },
        ];
        let entries = encode_records(&records);
        assert_eq!(entries.len(), records.len());
        for (entry, record) in entries.iter().zip(&records) {
            let back: Record = postcard::from_bytes(entry).expect("decode");
            assert_eq!(&back, record);
        }
        assert!(encode_records(&[]).is_empty());
    }
}
