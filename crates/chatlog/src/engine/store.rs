//! The RocksDB indexes: column families, key encoding, and applying log records to them.
//!
//! Every column family but `last_seen` is derived from the log: [`Batch::apply`] is a
//! deterministic, idempotent function of (record, log index), so replaying the log from the
//! last applied index (or from the start, into an empty directory) rebuilds identical indexes.
//! Index batches go through RocksDB's WAL without `fsync` (the segment log is what is synced):
//! after a process crash RocksDB recovers them from its WAL in the page cache; after a power
//! loss it recovers a consistent prefix (one WAL for all column families), and the engine
//! replays the log records after the recovered applied index.
//!
//! `history` and `dedup` writes (one key each per message) skip the memtable: they collect in
//! the index tail (`engine/tail.rs`) and reach RocksDB as ingested SST files.
//! `meta/tail_durable` is the log index up to which the ingested files hold every such write;
//! the engine replays from the lower of it and the applied index ([`Store::indexed_through`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompactionStyle,
    DBCompressionType, Direction, IngestExternalFileOptions, IteratorMode, Options, ReadOptions,
    SstFileWriter, WriteBatch,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::dedup_filter::{self, DedupFilter};
use super::tail::{Maps, Tail, TailCf, TailWrites, WriteRef};
use super::types::{Cursor, Event, EventKind, Record};
use crate::error::{Error, Result};
use crate::log::Log;

/// (chat, seq) → [`HistoryEntry`].
pub const CF_HISTORY: &str = "history";
/// chat → [`ChatMeta`].
pub const CF_CHATS: &str = "chats";
/// A column family of earlier versions (chat → last seq, written per batch and chat): a chat's
/// last seq is now read from the end of its history. Dropped when found at open.
const CF_SEQS_RETIRED: &str = "seqs";
/// (chat, sender, cmid) → (seq, ts).
pub const CF_DEDUP: &str = "dedup";
/// (user, device, chat) → [`Cursor`].
pub const CF_CURSORS: &str = "cursors";
/// (chat, user) → (delivered, read), the max over the user's devices.
pub const CF_RECEIPTS: &str = "receipts";
/// (user, chat) → seq of the members event that added the user.
pub const CF_USER_CHATS: &str = "user_chats";
/// (user, device) → ().
pub const CF_DEVICES: &str = "devices";
/// file id → [`super::types::FileMeta`].
pub const CF_FILES: &str = "files";
/// (file, chat) → () for every chat with a message referencing the file.
pub const CF_FILE_REFS: &str = "file_refs";
/// chat → first seq kept by retention (absent: 1).
pub const CF_HORIZONS: &str = "horizons";
/// Engine bookkeeping: applied log index, chat counter.
pub const CF_META: &str = "meta";
/// user → last seen ms (soft state, not derived from the log).
pub const CF_LAST_SEEN: &str = "last_seen";

/// Column families derived from the log (all but `last_seen`).
pub const DERIVED_CFS: [&str; 11] = [
    CF_HORIZONS,
    CF_HISTORY,
    CF_CHATS,
    CF_DEDUP,
    CF_CURSORS,
    CF_RECEIPTS,
    CF_USER_CHATS,
    CF_DEVICES,
    CF_FILES,
    CF_FILE_REFS,
    CF_META,
];

const KEY_APPLIED: &[u8] = b"applied";
/// Key in [`CF_META`]: the log index up to which ingested files hold every tail write.
const KEY_TAIL_DURABLE: &[u8] = b"tail_durable";
/// Directory (inside the index directory) where tail SST files are written before ingestion.
const INGEST_DIR: &str = "ingest";
/// RocksDB WAL kept before memtables are flushed (bounds crash recovery time).
const INDEX_WAL_BYTES_MAX: u64 = 16 << 20;
/// SST files of flushes and compactions are handed to the disk every this many bytes while
/// they are written, not all at once when they are synced. One compaction output of 31 MB
/// synced at its end took 42–48 ms, and the engine log's `fdatasync`s queued behind it for up
/// to 44 ms; written out 1 MiB at a time, that sync takes 6–8 ms (docs/benchmarks.md, "The
/// writer's remaining stalls, attributed").
const SST_BYTES_PER_SYNC: u64 = 1 << 20;
/// Memtable size per column family.
const INDEX_MEMTABLE_BYTES: usize = 16 << 20;
const KEY_CHAT_COUNTER: &[u8] = b"chat_counter";
/// Key in [`CF_META`] of the marker of the last applied replicated group.
const KEY_REPLICATED: &[u8] = b"replicated";

/// Where a chat event lives and what happened to it since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Log index of the event.
    pub log_index: u64,
    /// Log index of the latest edit, for messages.
    pub edit_log_index: Option<u64>,
    /// Deleted (messages only).
    pub deleted: bool,
}

/// A chat's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMeta {
    /// Title given at creation.
    pub title: Option<String>,
    /// Creator.
    pub creator: String,
    /// Direct chat.
    pub direct: bool,
    /// Current members, sorted.
    pub members: Vec<String>,
}

/// Waits for an ingestion thread and returns its result.
fn join_ingest(handle: Option<JoinHandle<Result<()>>>) -> Result<()> {
    match handle.map(JoinHandle::join) {
        None => Ok(()),
        Some(Ok(result)) => result,
        Some(Err(_)) => Err(index_error(
            CF_META,
            "the index tail ingestion thread panicked".into(),
        )),
    }
}

/// Writes a frozen tail generation to RocksDB: the log is synced (so no ingested entry points
/// past the durable log), each column family's entries are sorted into one SST file and
/// ingested, then `meta/tail_durable` records the generation's last log index.
fn ingest_tail(db: &DB, ingest: &Ingest, maps: &Maps) -> Result<()> {
    if let Some(log) = &ingest.log {
        log.sync()?;
    }
    for (cf, map) in [(CF_HISTORY, &maps.history), (CF_DEDUP, &maps.dedup)] {
        if map.is_empty() {
            continue;
        }
        let entries = sorted_by_key(map.iter_by_address());
        let n = ingest.files.fetch_add(1, Ordering::Relaxed);
        let path = ingest.dir.join(format!("{cf}-{n}.sst"));
        // The column family's own options: its SST files carry the filter it reads with.
        // (Not `bytes_per_sync`: the C API's SST writer takes RocksDB's default file options,
        // so this file goes to the disk at its final sync.)
        let options = cf_options_for(cf);
        let mut writer = SstFileWriter::create(&options);
        writer.open(&path).map_err(rocks)?;
        for (k, v) in entries.iter() {
            writer.put(k, v).map_err(rocks)?;
        }
        writer.finish().map_err(rocks)?;
        let mut options = IngestExternalFileOptions::default();
        options.set_move_files(true);
        // RocksDB's SstFileWriter drops the file's pages from the page cache once it is
        // synced (`invalidate_page_cache`, not settable through the C API), so the newest
        // history, the most read, would come from the disk. Ingestion moves the file (a hard
        // link, then `path` is removed): keep it open across, and ask the kernel to read it
        // back in (asynchronous readahead).
        let file = std::fs::File::open(&path).map_err(|e| Error::io("open", &path, e))?;
        db.ingest_external_file_cf_opts(column_family(db, cf), &options, vec![&path])
            .map_err(rocks)?;
        if cf == CF_DEDUP {
            // In RocksDB now, and still in the tail until the caller drops the generation
            // (which it does not do if anything below fails).
            ingest
                .dedup_filter
                .insert_ingested(map.iter_by_address().map(|(k, _)| k));
        }
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::WillNeed)
            .map_err(|e| Error::io("posix_fadvise", &path, e.into()))?;
        drop(file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove_file", &path, e)),
        }
    }
    db.put_cf(
        column_family(db, CF_META),
        KEY_TAIL_DURABLE,
        encode(&maps.last_index),
    )
    .map_err(rocks)
}

/// The first 16 bytes of `key`, big-endian, zero-padded: comparing two of these orders the keys
/// as their bytes do, except that equal prefixes must be told apart by the whole keys.
fn key_prefix(key: &[u8]) -> u128 {
    let mut bytes = [0u8; 16];
    let n = key.len().min(16);
    bytes[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(bytes)
}

/// `entries` in the byte order of their keys (as an SST file needs them). Index keys are short
/// (`g123\0u7\0cmid`), so most comparisons end within the 16-byte prefix compared as one
/// integer; a `memcmp` call per comparison was half the ingestion thread's time.
///
/// The sorted entries are copied into one buffer in that order. Read where they lie (the
/// tail's arena, in the order they were written), every entry in key order is a cache miss,
/// and the SST writer took each miss in turn (in its key-order check, 4 % of the append
/// benchmark's CPU); the copying loop has nothing else to do, so the CPU overlaps the misses.
fn sorted_by_key<'a>(entries: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Sorted {
    let mut keyed: Vec<(u128, &[u8], &[u8])> =
        entries.map(|(k, v)| (key_prefix(k), k, v)).collect();
    keyed.sort_unstable_by(|a, b| prefix_then_bytes((a.0, a.1), (b.0, b.1)));
    let mut bytes = Vec::with_capacity(keyed.iter().map(|(_, k, v)| k.len() + v.len()).sum());
    let mut ends = Vec::with_capacity(keyed.len());
    for (_, k, v) in keyed {
        bytes.extend_from_slice(k);
        let key_end = bytes.len();
        bytes.extend_from_slice(v);
        ends.push((key_end, bytes.len()));
    }
    Sorted { bytes, ends }
}

/// Entries sorted by [`sorted_by_key`]: keys and values back to back, in key order.
struct Sorted {
    bytes: Vec<u8>,
    /// Where each entry's key and value end in `bytes`.
    ends: Vec<(usize, usize)>,
}

impl Sorted {
    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(key_end, end)| {
            let entry = (&self.bytes[start..key_end], &self.bytes[key_end..end]);
            start = end;
            entry
        })
    }
}

/// Byte order of two keys given with their [`key_prefix`]es: the prefixes first, the whole
/// keys only when those are equal.
fn prefix_then_bytes(a: (u128, &[u8]), b: (u128, &[u8])) -> std::cmp::Ordering {
    a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1))
}

/// The handle of a column family of the index database.
fn column_family<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    db.cf_handle(name)
        .expect("every column family is created on open")
}

/// Joins key parts with a 0 byte (ids never contain one).
pub fn key(parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    key_into(&mut k, parts);
    k
}

/// Whether `k` is [`key`]`(parts)`.
pub fn key_is(k: &[u8], parts: &[&str]) -> bool {
    let mut rest = k;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            let Some(tail) = rest.strip_prefix(&[0u8][..]) else {
                return false;
            };
            rest = tail;
        }
        let Some(tail) = rest.strip_prefix(p.as_bytes()) else {
            return false;
        };
        rest = tail;
    }
    rest.is_empty()
}

/// Appends [`key`]`(parts)` to `buf`.
fn key_into(buf: &mut Vec<u8>, parts: &[&str]) {
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            buf.push(0);
        }
        buf.extend_from_slice(p.as_bytes());
    }
}

/// `chat \0 seq(be)`.
pub fn history_key(chat: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(chat.len() + 9);
    history_key_into(&mut k, chat, seq);
    k
}

/// Appends [`history_key`]`(chat, seq)` to `buf`.
fn history_key_into(buf: &mut Vec<u8>, chat: &str, seq: u64) {
    buf.extend_from_slice(chat.as_bytes());
    buf.push(0);
    buf.extend_from_slice(&seq.to_be_bytes());
}

/// The tail column family `cf` names, if it is one.
fn tail_cf(cf: &str) -> Option<TailCf> {
    match cf {
        CF_HISTORY => Some(TailCf::History),
        CF_DEDUP => Some(TailCf::Dedup),
        _ => None,
    }
}

/// Splits a history key ([`history_key`]) into chat and seq.
pub(crate) fn split_history_key(key: &[u8]) -> (&[u8], u64) {
    assert!(key.len() >= 9, "history keys end with \\0 and a u64");
    let (chat, rest) = key.split_at(key.len() - 9);
    let seq: [u8; 8] = rest[1..].try_into().expect("8 bytes");
    (chat, u64::from_be_bytes(seq))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("postcard encoding into a Vec")
}

fn decode<T: DeserializeOwned>(cf: &str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| index_error(cf, format!("undecodable value: {e}")))
}

fn index_error(cf: &str, reason: String) -> Error {
    Error::Corruption {
        segment: format!("rocksdb column family {cf}").into(),
        offset: 0,
        reason,
    }
}

fn rocks(e: rocksdb::Error) -> Error {
    Error::Io {
        op: "rocksdb",
        path: "indexes".into(),
        source: std::io::Error::other(e.into_string()),
    }
}

/// Turns off RocksDB's per-thread perf counters for the calling thread. They are on by
/// default and cost two thread-local lookups per key comparison (through `__tls_get_addr`,
/// since RocksDB is a shared library here): a fifth of the applier's time in a profile of
/// the append benchmark.
pub fn quiet_perf_counters() {
    rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
}

/// Sorted runs at which universal compaction merges `history`.
const TAIL_CF_SORTED_RUNS: i32 = 16;

/// Sorted runs at which universal compaction merges `dedup`. Its lookups mostly stop at the
/// in-memory filter (`dedup_filter.rs`), so more runs cost little there, and fewer merges
/// save compaction: 16 → 64, 4 alternated pairs of the append benchmark, compaction 0.6–1.1 →
/// 0.2–0.3 µs per message (threads) and 0.9–1.8 → 0.5–0.7 (tokio), throughput 1.04× and
/// 1.04×. `history` stays at 16: a page of history merges every run.
const DEDUP_SORTED_RUNS: i32 = 64;

/// Options of column family `name`: [`cf_options`], and for the two the index tail fills
/// (`history`, `dedup`) universal compaction.
///
/// Their keys arrive in no order across chats, so every ingested file spans the whole key
/// range. Leveled compaction then merges each few ingested files into all of level 1, and
/// rewrites it again and again: in the append benchmark's second 10 s (on the first's 1.4 M
/// messages) compaction took 5 µs of CPU per message, a third of the engine's. Universal
/// (size-tiered) compaction merges runs of similar size, so an entry is rewritten about
/// log(n) times. The entries are never overwritten, so what leveled buys (little space
/// amplification under updates) is not needed; reads see a few more sorted runs, behind bloom
/// filters for the dedup lookups. A database written with leveled compaction opens as is: each
/// level is one sorted run (test `leveled_indexes_open_with_universal_compaction`).
fn cf_options_for(name: &str) -> Options {
    let mut cf = cf_options(match name {
        CF_DEDUP => Some(DEDUP_BLOOM_BITS),
        CF_HISTORY => None,
        _ => Some(BLOOM_BITS),
    });
    if tail_cf(name).is_some() {
        cf.set_compaction_style(DBCompactionStyle::Universal);
        // Merge once 16 sorted runs are there (64 for `dedup`): fewer, wider merges (an entry
        // is rewritten about log16(n) times, not log8(n) or log4(n)). 4 → 8: in the append
        // benchmark's second 10 s compaction fell from 3.1–3.2 to 2.0–2.3 µs of CPU per
        // message. 8 → 16, with dedup's 20-bit filters: compaction 0.9–1.6 → 0.5–1.0 µs,
        // the sequencer's lookups 1.7–1.9 → 1.9–2.0 µs, 3 alternated pairs; a page of 50 at
        // 10 M events stayed at p99 ~200 µs. 16 → 64 for `dedup`: see
        // [`DEDUP_SORTED_RUNS`].
        let runs = if name == CF_DEDUP {
            DEDUP_SORTED_RUNS
        } else {
            TAIL_CF_SORTED_RUNS
        };
        cf.set_level_zero_file_num_compaction_trigger(runs);
        // Ingested files count as level-0 files: RocksDB slows writes down at 20 of them and
        // stops them at 36 by default, 2.5 and 4.5 times the trigger of 8 used before. Keep
        // those ratios, so slowing down still means compaction fell behind.
        cf.set_level_zero_slowdown_writes_trigger(runs * 5 / 2);
        cf.set_level_zero_stop_writes_trigger(runs * 9 / 2);
    }
    if name == CF_META {
        // A handful of keys (the applied index, a replica's apply marker) rewritten by every
        // batch: updated in place in the memtable instead of a new skiplist node each time.
        // A replica applies about one batch per Raft entry, and inserting into a memtable
        // full of versions of the same two keys took ~13 µs of CPU per batch there.
        cf.set_inplace_update_support(true);
    }
    cf
}

/// Bloom filter bits per key of the column families other than `dedup` and `history` (about
/// 1 % false positives per file).
const BLOOM_BITS: f64 = 10.0;

/// Bloom filter bits per key of `dedup` (about 0.01 % false positives per file). Every send
/// looks its `(chat, sender, cmid)` up there, nearly always a miss, in each of up to
/// [`TAIL_CF_SORTED_RUNS`] sorted runs; a false positive costs an index seek and a data block
/// read. In the append benchmark this cut the sequencer's CPU from 2.3–2.5 to 1.9–2.0 µs per
/// message (2 alternated pairs of runs). The cost is memory: 2.5 bytes per message held, not
/// 1.25.
const DEDUP_BLOOM_BITS: f64 = 20.0;

/// Column family options shared by every column family and the tail's SST files, with bloom
/// filters of `bloom_bits` per key, or none.
///
/// `history` has none. Its reads are pages (iterators, which whole-key filters do not serve)
/// and, now and then, one entry that exists (an edit's or delete's target, a horizon): a
/// filter would only spare that lookup a seek in each newer sorted run. Building one costs a
/// hash and a filter insert per key in every ingestion and compaction (`FullFilterBlockBuilder`:
/// 7 % of the ingestion thread's samples, both column families together), and the background
/// work shares the two cores with the write path (docs/benchmarks.md, "History without bloom
/// filters").
fn cf_options(bloom_bits: Option<f64>) -> Options {
    let mut cf = Options::default();
    let mut table = BlockBasedOptions::default();
    if let Some(bits) = bloom_bits {
        // Point lookups that usually miss (dedup on every send, devices) are answered by
        // bloom filters, in the memtable and in SST files, instead of walking the skiplist or
        // blocks.
        table.set_bloom_filter(bits, false);
        cf.set_memtable_whole_key_filtering(true);
        cf.set_memtable_prefix_bloom_ratio(0.1);
    }
    cf.set_block_based_table_factory(&table);
    cf.set_write_buffer_size(INDEX_MEMTABLE_BYTES);
    // Index keys and values are short ids and integers: snappy saved little on them and cost
    // CPU on every ingestion, compaction and block read.
    cf.set_compression_type(DBCompressionType::None);
    cf
}

/// What a tail ingestion needs besides the database.
struct Ingest {
    dir: PathBuf,
    /// Synced before files are ingested, so they never point past the durable log.
    log: Option<Arc<Log>>,
    files: AtomicU64,
    /// The in-memory filter over `dedup`'s keys in RocksDB: an ingestion adds its keys.
    dedup_filter: Arc<DedupFilter>,
}

/// The index database.
pub struct Store {
    db: Arc<DB>,
    tail: Arc<Tail>,
    ingest: Arc<Ingest>,
    /// The ingestion in flight, if any.
    ingesting: Mutex<Option<JoinHandle<Result<()>>>>,
    /// Highest applied index written (so a replay of older records never lowers it).
    applied: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.ingest.dir)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.wait_ingest() {
            tracing::warn!(error = %e, "index tail ingestion failed while closing");
        }
        self.ingest.dedup_filter.shut_down();
    }
}

impl Store {
    /// Opens (or creates) the indexes in `dir`, with an index tail frozen at `tail_entries`
    /// entries. `log` (if given) is synced before every tail ingestion.
    pub fn open(dir: &Path, tail_entries: usize, log: Option<Arc<Log>>) -> Result<Store> {
        Store::open_with(dir, tail_entries, log, dedup_filter::CAPACITY_MIN)
    }

    /// [`Store::open`] with the in-memory dedup filter sized for at least `dedup_filter_min`
    /// keys (tests make it small, so that it grows).
    fn open_with(
        dir: &Path,
        tail_entries: usize,
        log: Option<Arc<Log>>,
        dedup_filter_min: u64,
    ) -> Result<Store> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Compactions are background work (see `crate::priority`): RocksDB runs its
        // low-priority pool at the lowest CPU priority.
        let mut env = rocksdb::Env::new().map_err(rocks)?;
        env.lower_thread_pool_cpu_priority();
        opts.set_env(&env);
        opts.set_keep_log_file_num(4);
        // `meta`'s in-place updates need it; batches come from one applier anyway.
        opts.set_allow_concurrent_memtable_write(false);
        // Bound what RocksDB replays from its WAL when reopening after a crash: past this size
        // it flushes the column families that pin old WAL files.
        opts.set_max_total_wal_size(INDEX_WAL_BYTES_MAX);
        opts.set_bytes_per_sync(SST_BYTES_PER_SYNC);
        let retired = DB::list_cf(&opts, dir)
            .unwrap_or_default()
            .iter()
            .any(|name| name == CF_SEQS_RETIRED);
        let cfs = DERIVED_CFS
            .iter()
            .chain([CF_LAST_SEEN].iter())
            .chain(retired.then_some(&CF_SEQS_RETIRED))
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options_for(name)));
        let mut db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(rocks)?;
        if retired {
            db.drop_cf(CF_SEQS_RETIRED).map_err(rocks)?;
        }
        let ingest_dir = dir.join(INGEST_DIR);
        // Files of an ingestion a crash interrupted: their writes are replayed from the log.
        if ingest_dir.exists() {
            std::fs::remove_dir_all(&ingest_dir)
                .map_err(|e| Error::io("remove_dir_all", &ingest_dir, e))?;
        }
        std::fs::create_dir_all(&ingest_dir)
            .map_err(|e| Error::io("create_dir_all", &ingest_dir, e))?;
        let db = Arc::new(db);
        let store = Store {
            tail: Arc::new(Tail::new(tail_entries)),
            ingest: Arc::new(Ingest {
                dir: ingest_dir,
                log,
                files: AtomicU64::new(0),
                dedup_filter: DedupFilter::open(db.clone(), CF_DEDUP, dedup_filter_min),
            }),
            db,
            ingesting: Mutex::new(None),
            applied: AtomicU64::new(0),
        };
        let applied = store.applied_index()?;
        store.applied.store(applied, Ordering::Release);
        if store.get::<u64>(CF_META, KEY_TAIL_DURABLE)?.is_none() {
            // A new directory, or one of a version without the tail: everything applied so
            // far is in RocksDB.
            store
                .db
                .put_cf(store.cf(CF_META), KEY_TAIL_DURABLE, encode(&applied))
                .map_err(rocks)?;
        }
        Ok(store)
    }

    /// The log index up to which every index write is in RocksDB (the tail's included): the
    /// engine replays the log after it on open.
    pub fn indexed_through(&self) -> Result<u64> {
        let tail = self.get::<u64>(CF_META, KEY_TAIL_DURABLE)?.unwrap_or(0);
        Ok(tail.min(self.applied_index()?))
    }

    /// Waits for the tail ingestion in flight, if any.
    fn wait_ingest(&self) -> Result<()> {
        let handle = self
            .ingesting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        join_ingest(handle)
    }

    /// Ingests the whole tail now, on the calling thread, and makes the index WAL durable:
    /// afterwards [`Store::indexed_through`] covers everything applied.
    pub fn flush_tail(&self) -> Result<()> {
        let mut ingesting = self.ingesting.lock().unwrap_or_else(|e| e.into_inner());
        join_ingest(ingesting.take())?;
        // A frozen generation whose ingestion failed first (it is older), then the live one.
        while let Some(generation) = self.tail.frozen().or_else(|| self.tail.freeze()) {
            ingest_tail(&self.db, &self.ingest, &generation)?;
            self.tail.drop_frozen();
        }
        drop(ingesting);
        self.sync()
    }

    /// Ingests, on the calling thread, a frozen generation an earlier ingestion failed to
    /// write (the caller holds the ingestion lock and joined the thread in flight).
    fn retry_frozen(&self) -> Result<()> {
        if let Some(frozen) = self.tail.frozen() {
            ingest_tail(&self.db, &self.ingest, &frozen)?;
            self.tail.drop_frozen();
        }
        Ok(())
    }

    /// After a batch added `live` entries to the tail: freezes it and starts ingesting it on
    /// a background thread when it is full (waiting for the previous ingestion only when the
    /// live tail is far past full).
    fn after_tail_apply(&self, live: usize) -> Result<()> {
        if !self.tail.full(live) {
            return Ok(());
        }
        let mut ingesting = self.ingesting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = ingesting.as_ref()
            && !handle.is_finished()
            && !self.tail.overfull(live)
        {
            return Ok(());
        }
        join_ingest(ingesting.take())?;
        self.retry_frozen()?;
        let Some(frozen) = self.tail.freeze() else {
            return Ok(());
        };
        let (db, tail, ingest) = (self.db.clone(), self.tail.clone(), self.ingest.clone());
        let handle = std::thread::Builder::new()
            .name("chatlog-ingest".into())
            .spawn(move || {
                quiet_perf_counters();
                crate::priority::lower_this_thread();
                let result = ingest_tail(&db, &ingest, &frozen);
                if result.is_ok() {
                    tail.drop_frozen();
                }
                result
            })
            .map_err(|e| Error::io("spawn thread", "chatlog-ingest", e))?;
        *ingesting = Some(handle);
        Ok(())
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        column_family(&self.db, name)
    }

    /// Whether the in-memory `dedup` filter says `key` (not found in the tail) is not in
    /// RocksDB either, so no RocksDB read is needed. Always false for other column families.
    fn screened_out(&self, cf: &str, key: &[u8]) -> bool {
        cf == CF_DEDUP && !self.ingest.dedup_filter.screen().may_contain(key)
    }

    /// Reads and decodes one value.
    pub fn get<T: DeserializeOwned>(&self, cf: &str, key: &[u8]) -> Result<Option<T>> {
        if let Some(tail_cf) = tail_cf(cf)
            && let Some(bytes) = self.tail.view().get(tail_cf, key)
        {
            return Ok(Some(decode(cf, bytes)?));
        }
        if self.screened_out(cf, key) {
            return Ok(None);
        }
        match self.db.get_pinned_cf(self.cf(cf), key).map_err(rocks)? {
            Some(bytes) => Ok(Some(decode(cf, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Reads and decodes several values of one column family (a batched RocksDB `MultiGet`
    /// for the keys the index tail does not hold).
    pub fn get_many<T: DeserializeOwned>(
        &self,
        cf: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<T>>> {
        let mut out: Vec<Option<T>> = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        {
            // The tail before RocksDB, key by key: an entry leaves the tail only once it is
            // ingested (and, for `dedup`, added to its filter), so it is found in one or the
            // other.
            let view = self.tail.view();
            // Taken after the view: a key that left the tail before it was added to the
            // filters then in place, which this screen includes.
            let screen = (cf == CF_DEDUP).then(|| self.ingest.dedup_filter.screen());
            let mut not_in_tail = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                match tail_cf(cf).and_then(|t| view.get(t, key)) {
                    Some(bytes) => out.push(Some(decode(cf, bytes)?)),
                    None => {
                        out.push(None);
                        not_in_tail.push(i);
                    }
                }
            }
            // The filters in a loop of their own: it does little else, so the CPU overlaps
            // their cache misses across keys (inside the loop above it took them one by one:
            // 3 % of the append benchmark's CPU).
            missing.extend(
                not_in_tail
                    .into_iter()
                    .filter(|&i| screen.as_ref().is_none_or(|s| s.may_contain(&keys[i])))
                    .map(|i| (key_prefix(&keys[i]), i)),
            );
        }
        // Sorted here (cheaply, see `sorted_by_key`), RocksDB need not sort them itself.
        missing.sort_unstable_by(|a, b| prefix_then_bytes((a.0, &keys[a.1]), (b.0, &keys[b.1])));
        let found = self.db.batched_multi_get_cf(
            self.cf(cf),
            missing.iter().map(|&(_, i)| keys[i].as_slice()),
            true,
        );
        for ((_, i), result) in missing.into_iter().zip(found) {
            if let Some(bytes) = result.map_err(rocks)? {
                out[i] = Some(decode(cf, &bytes)?);
            }
        }
        Ok(out)
    }

    /// Whether a key exists.
    pub fn contains(&self, cf: &str, key: &[u8]) -> Result<bool> {
        if let Some(tail_cf) = tail_cf(cf)
            && self.tail.view().get(tail_cf, key).is_some()
        {
            return Ok(true);
        }
        if self.screened_out(cf, key) {
            return Ok(false);
        }
        Ok(self
            .db
            .get_pinned_cf(self.cf(cf), key)
            .map_err(rocks)?
            .is_some())
    }

    /// Last applied log index (0 if none).
    pub fn applied_index(&self) -> Result<u64> {
        Ok(self.get::<u64>(CF_META, KEY_APPLIED)?.unwrap_or(0))
    }

    /// The marker of the last replicated group applied to the indexes, if any
    /// ([`Record::Applied`]).
    pub fn replicated_marker(&self) -> Result<Option<Vec<u8>>> {
        self.get::<Vec<u8>>(CF_META, KEY_REPLICATED)
    }

    /// Writes a consistent copy of the indexes to `dir` (a RocksDB checkpoint: hard links of
    /// the SST files where the file system allows).
    pub fn checkpoint(&self, dir: &Path) -> Result<()> {
        let cp = rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(rocks)?;
        cp.create_checkpoint(dir).map_err(rocks)
    }

    /// Number of group chats ever created.
    pub fn chat_counter(&self) -> Result<u64> {
        Ok(self.get::<u64>(CF_META, KEY_CHAT_COUNTER)?.unwrap_or(0))
    }

    /// Last seq of a chat (0 if none): the key of its last history entry, or, when retention
    /// dropped every entry, the seq before its horizon.
    pub fn last_seq(&self, chat: &str) -> Result<u64> {
        // The tail before RocksDB (as in every read here): an entry leaves the tail only once
        // it is ingested, so read in this order it is seen in one or the other.
        let tail = self.tail.view().last_seq(chat).unwrap_or(0);
        let mut read = ReadOptions::default();
        read.set_iterate_lower_bound(history_key(chat, 0));
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_HISTORY), read);
        iter.seek_for_prev(history_key(chat, u64::MAX));
        let last = match iter.key() {
            Some(k) => split_history_key(k).1,
            None => {
                iter.status().map_err(rocks)?;
                0
            }
        };
        Ok(last.max(tail).max(self.horizon(chat)?.saturating_sub(1)))
    }

    /// First seq retention keeps in a chat (1 if nothing was dropped).
    pub fn horizon(&self, chat: &str) -> Result<u64> {
        Ok(self.get::<u64>(CF_HORIZONS, chat.as_bytes())?.unwrap_or(1))
    }

    /// Every chat with its last seq, in chat id order.
    pub fn all_last_seqs(&self) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_CHATS), IteratorMode::Start) {
            let (k, _) = item.map_err(rocks)?;
            let chat = String::from_utf8_lossy(&k).into_owned();
            let last = self.last_seq(&chat)?;
            out.push((chat, last));
        }
        Ok(out)
    }

    /// A chat's metadata.
    pub fn chat(&self, chat: &str) -> Result<Option<ChatMeta>> {
        self.get(CF_CHATS, chat.as_bytes())
    }

    /// History entries for seqs `from..from+count` of a chat (seqs are gapless).
    pub fn history_range(&self, chat: &str, from: u64, count: usize) -> Result<Vec<HistoryEntry>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        // The tail first: the newest entries (and recent edits) are there.
        let mut found: Vec<Option<HistoryEntry>> = Vec::with_capacity(count);
        {
            let view = self.tail.view();
            let mut k = history_key(chat, from);
            let seq_at = k.len() - 8;
            for seq in from..from + count as u64 {
                k[seq_at..].copy_from_slice(&seq.to_be_bytes());
                found.push(match view.get(TailCf::History, &k) {
                    Some(bytes) => Some(decode(CF_HISTORY, bytes)?),
                    None => None,
                });
            }
        }
        if found.iter().any(Option::is_none) {
            let mut read = ReadOptions::default();
            read.set_iterate_upper_bound(history_key(chat, from + count as u64));
            let start = history_key(chat, from);
            let iter = self.db.iterator_cf_opt(
                self.cf(CF_HISTORY),
                read,
                IteratorMode::From(&start, Direction::Forward),
            );
            for item in iter {
                let (key, value) = item.map_err(rocks)?;
                let (_, seq) = split_history_key(&key);
                let slot = &mut found[(seq - from) as usize];
                if slot.is_none() {
                    *slot = Some(decode(CF_HISTORY, &value)?);
                }
            }
        }
        let out: Vec<HistoryEntry> = found.into_iter().flatten().collect();
        if out.len() != count {
            return Err(index_error(
                CF_HISTORY,
                format!(
                    "chat {chat}: expected {count} entries from seq {from}, found {}",
                    out.len()
                ),
            ));
        }
        Ok(out)
    }

    /// All `(key suffix after prefix, value)` pairs whose key starts with `prefix \0`.
    pub fn scan_prefix<T: DeserializeOwned>(
        &self,
        cf: &str,
        prefix: &str,
    ) -> Result<Vec<(String, T)>> {
        let mut start = prefix.as_bytes().to_vec();
        start.push(0);
        let mut end = prefix.as_bytes().to_vec();
        end.push(1);
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(end);
        let iter = self.db.iterator_cf_opt(
            self.cf(cf),
            read,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(rocks)?;
            let suffix = String::from_utf8_lossy(&k[start.len()..]).into_owned();
            out.push((suffix, decode(cf, &v)?));
        }
        Ok(out)
    }

    /// Up to `limit` values of column family `cf` (not a tail one), in key order, after key
    /// `after` (from the start if `None`), with their keys: a page of a scan.
    pub fn page<T: DeserializeOwned>(
        &self,
        cf: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, T)>> {
        debug_assert!(
            tail_cf(cf).is_none(),
            "{cf} keeps its newest keys in the tail"
        );
        let mode = match after {
            Some(key) => IteratorMode::From(key, Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf), mode) {
            let (k, v) = item.map_err(rocks)?;
            if Some(&*k) == after {
                continue;
            }
            if out.len() == limit {
                break;
            }
            out.push((k.to_vec(), decode(cf, &v)?));
        }
        Ok(out)
    }

    /// Every key and value of a column family, in order (for digests and tests). The tail's
    /// entries are included, and `meta` shows the bookkeeping as it will be once the tail is
    /// ingested (so a dump does not depend on when ingestion ran).
    pub fn dump(&self, cf: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        // The tail is read first: a generation ingested while RocksDB is read is then seen in
        // one or the other (read the other way round, it could be missed in both).
        let tail = tail_cf(cf).map(|t| self.tail.view().entries(t));
        let mut out = BTreeMap::new();
        for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
            let (k, v) = item.map_err(rocks)?;
            out.insert(k.to_vec(), v.to_vec());
        }
        out.extend(tail.into_iter().flatten());
        if cf == CF_META {
            out.remove(KEY_TAIL_DURABLE);
        }
        Ok(out.into_iter().collect())
    }

    /// Writes last-seen times (soft state; with RocksDB's WAL).
    pub fn put_last_seen(&self, values: &[(String, u64)]) -> Result<()> {
        let mut batch = WriteBatch::default();
        for (user, ms) in values {
            batch.put_cf(self.cf(CF_LAST_SEEN), user.as_bytes(), encode(ms));
        }
        self.db.write(batch).map_err(rocks)
    }

    /// Makes every applied index write durable (syncs RocksDB's WAL).
    pub fn sync(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(rocks)
    }

    /// A batch for applying records; see [`Batch::apply`].
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            wb: WriteBatch::default(),
            overlay: HashMap::default(),
            history_in_overlay: false,
            tail: TailWrites::default(),
            last_index: None,
        }
    }
}

/// Column families [`Batch::apply`] reads (and so must see the batch's own writes in).
const READ_BACK_CFS: [&str; 4] = [CF_HISTORY, CF_CHATS, CF_CURSORS, CF_HORIZONS];

/// Applies records into one RocksDB write batch. Reads inside the batch see its own writes.
pub struct Batch<'a> {
    store: &'a Store,
    wb: WriteBatch,
    overlay: HashMap<(&'static str, Vec<u8>), Option<Vec<u8>>, foldhash::fast::RandomState>,
    /// Whether the overlay holds this batch's `history` writes. Only edits and deletes read
    /// `history` back, so the overlay gets them on the first such read (from `tail`), not a
    /// copy of every message's entry (a map insert and two allocations per message).
    history_in_overlay: bool,
    /// Writes for the index tail, in order.
    tail: TailWrites,
    last_index: Option<u64>,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("writes", &self.overlay.len())
            .field("last_index", &self.last_index)
            .finish()
    }
}

impl Batch<'_> {
    fn put<T: Serialize>(&mut self, cf: &'static str, key: Vec<u8>, value: &T) {
        if let Some(tail_cf) = tail_cf(cf) {
            return self.put_tail(tail_cf, |buf| buf.extend_from_slice(&key), value);
        }
        let bytes = encode(value);
        // Only column families that `apply` reads back need the overlay; skipping the others
        // saves two allocations and a hash insert per write on the hot path.
        if READ_BACK_CFS.contains(&cf) {
            self.overlay.insert((cf, key.clone()), Some(bytes.clone()));
        }
        self.wb.put_cf(self.store.cf(cf), &key, &bytes);
    }

    /// Puts a `history` or `dedup` entry: key and value are written straight into the tail's
    /// buffer (the overlay gets a copy only once an edit or delete read `history`).
    fn put_tail<T: Serialize>(&mut self, cf: TailCf, key: impl FnOnce(&mut Vec<u8>), value: &T) {
        self.tail.put_with(cf, key, |buf| {
            let bytes = postcard::to_extend(value, std::mem::take(buf));
            *buf = bytes.expect("postcard encoding into a Vec");
        });
        if cf == TailCf::History
            && self.history_in_overlay
            && let Some(WriteRef::Put { key, value, .. }) = self.tail.last()
        {
            self.overlay
                .insert((CF_HISTORY, key.to_vec()), Some(value.to_vec()));
        }
    }

    fn delete(&mut self, cf: &'static str, key: Vec<u8>) {
        self.wb.delete_cf(self.store.cf(cf), &key);
        self.overlay.insert((cf, key), None);
    }

    fn get<T: DeserializeOwned>(&mut self, cf: &'static str, key: &[u8]) -> Result<Option<T>> {
        debug_assert!(
            READ_BACK_CFS.contains(&cf),
            "{cf} writes are not kept in the overlay"
        );
        if cf == CF_HISTORY && !self.history_in_overlay {
            self.history_in_overlay = true;
            for write in self.tail.iter() {
                if let WriteRef::Put {
                    cf: TailCf::History,
                    key,
                    value,
                } = write
                {
                    self.overlay
                        .insert((CF_HISTORY, key.to_vec()), Some(value.to_vec()));
                }
            }
        }
        match self.overlay.get(&(cf, key.to_vec())) {
            Some(Some(bytes)) => Ok(Some(decode(cf, bytes)?)),
            Some(None) => Ok(None),
            None => self.store.get(cf, key),
        }
    }

    /// Applies one record found at `log_index`.
    pub fn apply(&mut self, record: &Record, log_index: u64) -> Result<()> {
        if let Some(last) = self.last_index {
            assert!(log_index > last, "records are applied in log order");
        }
        self.last_index = Some(log_index);
        match record {
            Record::Event { event, created } => {
                self.apply_event(event, created.as_ref(), log_index)?
            }
            Record::Cursor(m) => {
                self.put(CF_CURSORS, key(&[&m.user, &m.device, &m.chat]), &m.cursor);
                self.put(
                    CF_RECEIPTS,
                    key(&[&m.chat, &m.user]),
                    &(m.user_delivered, m.user_read),
                );
            }
            Record::DeviceSeen {
                user,
                device,
                starts,
            } => {
                self.put(CF_DEVICES, key(&[user, device]), &());
                for (chat, seq) in starts {
                    // Keep what the device acknowledged before it was registered.
                    let k = key(&[user, device, chat]);
                    let current: Cursor = self.get(CF_CURSORS, &k)?.unwrap_or_default();
                    let cursor = Cursor {
                        start: *seq,
                        ..current
                    };
                    self.put(CF_CURSORS, k, &cursor);
                }
            }
            Record::File(meta) => self.put(CF_FILES, meta.id.as_bytes().to_vec(), meta),
            Record::Applied { marker } => {
                self.put(CF_META, KEY_REPLICATED.to_vec(), marker);
            }
            Record::Horizon { chat, seq } => {
                let old: u64 = self.get(CF_HORIZONS, chat.as_bytes())?.unwrap_or(1);
                if *seq > old {
                    self.wb.delete_range_cf(
                        self.store.cf(CF_HISTORY),
                        history_key(chat, old),
                        history_key(chat, *seq),
                    );
                    self.tail.horizon(chat.clone(), *seq);
                    self.put(CF_HORIZONS, chat.as_bytes().to_vec(), seq);
                }
            }
        }
        Ok(())
    }

    fn apply_event(
        &mut self,
        event: &Event,
        created: Option<&super::types::Creation>,
        log_index: u64,
    ) -> Result<()> {
        let chat = event.chat.as_str();
        self.put_tail(
            TailCf::History,
            |buf| history_key_into(buf, chat, event.seq),
            &HistoryEntry {
                log_index,
                edit_log_index: None,
                deleted: false,
            },
        );
        match &event.kind {
            EventKind::Message { cmid, file, .. } => {
                self.put_tail(
                    TailCf::Dedup,
                    |buf| key_into(buf, &[chat, &event.sender, cmid]),
                    &(event.seq, event.ts),
                );
                if let Some(file) = file {
                    self.put(CF_FILE_REFS, key(&[file, chat]), &());
                }
            }
            EventKind::Edit { target, .. } | EventKind::Delete { target } => {
                let k = history_key(chat, *target);
                let mut entry: HistoryEntry = self.get(CF_HISTORY, &k)?.ok_or_else(|| {
                    index_error(CF_HISTORY, format!("{chat}: target {target} missing"))
                })?;
                if matches!(event.kind, EventKind::Edit { .. }) {
                    entry.edit_log_index = Some(log_index);
                } else {
                    entry.deleted = true;
                }
                self.put(CF_HISTORY, k, &entry);
            }
            EventKind::Members {
                added,
                removed,
                title,
            } => {
                let mut meta = match created {
                    Some(c) => {
                        let group_number =
                            chat.strip_prefix('g').and_then(|n| n.parse::<u64>().ok());
                        if let Some(n) = group_number.filter(|_| !c.direct) {
                            self.put(CF_META, KEY_CHAT_COUNTER.to_vec(), &n);
                        }
                        ChatMeta {
                            title: title.clone(),
                            creator: c.creator.clone(),
                            direct: c.direct,
                            members: Vec::new(),
                        }
                    }
                    None => self.get(CF_CHATS, chat.as_bytes())?.ok_or_else(|| {
                        index_error(CF_CHATS, format!("members event for unknown chat {chat}"))
                    })?,
                };
                for user in added {
                    if let Err(pos) = meta.members.binary_search(user) {
                        meta.members.insert(pos, user.clone());
                    }
                    self.put(CF_USER_CHATS, key(&[user, chat]), &event.seq);
                }
                for user in removed {
                    if let Ok(pos) = meta.members.binary_search(user) {
                        meta.members.remove(pos);
                    }
                    self.delete(CF_USER_CHATS, key(&[user, chat]));
                }
                self.put(CF_CHATS, chat.as_bytes().to_vec(), &meta);
            }
        }
        Ok(())
    }

    /// Writes the batch, with the last applied log index, atomically (WAL, no fsync); the
    /// tail's share goes to the index tail (see `engine/tail.rs`).
    pub fn commit(mut self) -> Result<()> {
        let store = self.store;
        let Some(last) = self.last_index else {
            return store.db.write(self.wb).map_err(rocks);
        };
        let horizons = self.tail.has_horizon();
        // The frozen generation must be in RocksDB before the horizon's range delete (ingested
        // later, its files would bring back entries below the horizon), and none may be frozen
        // until the horizon is in the tail: hold the ingestion lock across both.
        let ingesting = if horizons {
            let mut ingesting = store.ingesting.lock().unwrap_or_else(|e| e.into_inner());
            join_ingest(ingesting.take())?;
            store.retry_frozen()?;
            Some(ingesting)
        } else {
            None
        };
        // Replaying records the indexes already hold (see `Store::indexed_through`) must not
        // lower the applied index.
        if store.applied.fetch_max(last, Ordering::AcqRel) < last {
            self.put(CF_META, KEY_APPLIED.to_vec(), &last);
        }
        let (live, empty) = store.tail.apply(&self.tail, last);
        drop(ingesting);
        if empty {
            // Nothing waits for ingestion: the log need not be replayed before `last`.
            self.put(CF_META, KEY_TAIL_DURABLE.to_vec(), &last);
        }
        store.db.write(self.wb).map_err(rocks)?;
        store.after_tail_apply(live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_is_compares_with_the_built_key() {
        let parts = ["g1", "u1", "c1"];
        assert!(key_is(&key(&parts), &parts));
        for other in [
            key(&["g1", "u1", "c"]),
            key(&["g1", "u1", "c12"]),
            key(&["g1", "u", "1c1"]),
            key(&["g1", "u1"]),
            b"g1\0u1\0c1\0".to_vec(),
            Vec::new(),
        ] {
            assert!(!key_is(&other, &parts), "{other:?}");
        }
        assert!(key_is(b"", &[""]));
    }

    proptest! {
        /// The prefix-first sort orders keys exactly as comparing their bytes does, with keys
        /// that are prefixes of others, zero bytes, and lengths around 16; each value stays
        /// with its key.
        #[test]
        fn prefix_sort_is_byte_order(
            keys in proptest::collection::hash_set(
                proptest::collection::vec(
                    prop_oneof![Just(0u8), Just(1u8), Just(b'g'), any::<u8>()],
                    0..24,
                ),
                0..200,
            )
        ) {
            // Each key's value is the key reversed, so a value that strays from its key shows.
            let entries: Vec<(Vec<u8>, Vec<u8>)> = keys
                .into_iter()
                .map(|k| {
                    let v = k.iter().rev().copied().collect();
                    (k, v)
                })
                .collect();
            let sorted = sorted_by_key(entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
            let sorted: Vec<(&[u8], &[u8])> = sorted.iter().collect();
            let mut expected: Vec<(&[u8], &[u8])> =
                entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
            expected.sort();
            prop_assert_eq!(sorted, expected);
        }
    }

    const LEVELS: u32 = 7;

    fn files_at(db: &DB, cf: &str, level: u32) -> u64 {
        db.property_int_value_cf(
            column_family(db, cf),
            &format!("rocksdb.num-files-at-level{level}"),
        )
        .expect("property")
        .expect("a level's file count")
    }

    fn compaction_style_in_options_file(dir: &Path, cf: &str) -> String {
        option_in_options_file(dir, cf, "compaction_style")
    }

    /// `history` merges at [`TAIL_CF_SORTED_RUNS`] sorted runs and `dedup` at
    /// [`DEDUP_SORTED_RUNS`], with RocksDB's write slowdown and stop well above that; the
    /// others keep RocksDB's defaults.
    #[test]
    fn tail_cfs_merge_at_their_sorted_run_count_and_stall_far_above_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path(), 64, None).expect("open"));
        let option = |cf, name| {
            option_in_options_file(dir.path(), cf, name)
                .parse::<i32>()
                .expect("a number")
        };
        for (cf, runs) in [
            (CF_HISTORY, TAIL_CF_SORTED_RUNS),
            (CF_DEDUP, DEDUP_SORTED_RUNS),
        ] {
            let trigger = option(cf, "level0_file_num_compaction_trigger");
            assert_eq!(trigger, runs, "{cf}");
            assert_eq!(
                option(cf, "level0_stop_writes_trigger"),
                runs * 9 / 2,
                "{cf}"
            );
            assert!(
                option(cf, "level0_slowdown_writes_trigger") >= 2 * trigger,
                "{cf}"
            );
            assert!(
                option(cf, "level0_stop_writes_trigger")
                    > option(cf, "level0_slowdown_writes_trigger"),
                "{cf}"
            );
        }
        assert_eq!(option(CF_CHATS, "level0_file_num_compaction_trigger"), 4);
        assert_eq!(option(CF_CHATS, "level0_slowdown_writes_trigger"), 20);
    }

    fn option_in_options_file(dir: &Path, cf: &str, name: &str) -> String {
        let newest = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("OPTIONS-"))
            .max_by_key(|name| name["OPTIONS-".len()..].parse::<u64>().unwrap_or(0))
            .expect("an OPTIONS file");
        let text = std::fs::read_to_string(dir.join(newest)).expect("read OPTIONS");
        let section = text
            .split("[CFOptions ")
            .find(|s| s.starts_with(&format!("\"{cf}\"")))
            .expect("the column family's section");
        let prefix = format!("{name}=");
        section
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("{name} in the {cf} section"))
            .to_owned()
    }

    /// Until universal compaction, `history` and `dedup` were leveled: a database from then
    /// has their files in level 0 and deeper levels. It must open with universal compaction,
    /// read every entry, compact, and reopen.
    #[test]
    fn leveled_indexes_open_with_universal_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = 3_000u64;
        let cfs = [CF_HISTORY, CF_DEDUP];
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let names = DERIVED_CFS.iter().chain([CF_LAST_SEEN].iter());
            let db = DB::open_cf(&opts, dir.path(), names).expect("open leveled");
            for cf in cfs {
                let handle = column_family(&db, cf);
                for i in 0..keys {
                    db.put_cf(handle, history_key("c1", i), encode(&(i, i)))
                        .expect("put");
                    if i % 1_000 == 999 {
                        db.flush_cf(handle).expect("flush");
                    }
                    if i == keys / 2 {
                        db.compact_range_cf(handle, None::<&[u8]>, None::<&[u8]>);
                    }
                }
                db.flush_cf(handle).expect("flush");
                assert!(files_at(&db, cf, 0) > 0, "{cf}: no files in level 0");
                assert!(
                    (1..LEVELS).any(|l| files_at(&db, cf, l) > 0),
                    "{cf}: no files below level 0"
                );
            }
            assert_eq!(
                compaction_style_in_options_file(dir.path(), CF_HISTORY),
                "kCompactionStyleLevel"
            );
        }
        let check = |store: &Store| {
            for cf in cfs {
                for i in 0..keys {
                    let found = store.get::<(u64, u64)>(cf, &history_key("c1", i));
                    assert_eq!(found.expect("get"), Some((i, i)), "{cf} key {i}");
                }
            }
        };
        let store = Store::open(dir.path(), 64, None).expect("open with universal compaction");
        for cf in cfs {
            assert_eq!(
                compaction_style_in_options_file(dir.path(), cf),
                "kCompactionStyleUniversal",
                "{cf}"
            );
        }
        check(&store);
        for cf in cfs {
            store
                .db
                .compact_range_cf(store.cf(cf), None::<&[u8]>, None::<&[u8]>);
        }
        check(&store);
        drop(store);
        let store = Store::open(dir.path(), 64, None).expect("reopen");
        check(&store);
        assert_eq!(
            compaction_style_in_options_file(dir.path(), CF_CHATS),
            "kCompactionStyleLevel",
            "only the tail's column families change"
        );
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    /// Bytes of filter blocks per entry in the SST files of `cf`.
    fn filter_bytes_per_entry(store: &Store, cf: &str) -> f64 {
        let props = store
            .db
            .property_value_cf(store.cf(cf), "rocksdb.aggregated-table-properties")
            .expect("property")
            .expect("table properties");
        let field = |name: &str| -> f64 {
            props
                .split(';')
                .find_map(|p| {
                    p.trim()
                        .strip_prefix(name)?
                        .trim()
                        .strip_prefix('=')?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or_else(|| panic!("{name} in {props}"))
        };
        field("filter block size") / field("# entries")
    }

    /// The ingested files of `dedup` carry its larger bloom filter, those of `history` none.
    #[test]
    fn ingested_dedup_files_carry_the_larger_bloom_filter_and_history_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, None).expect("open");
        let n = 20_000u64;
        let mut writes = TailWrites::default();
        for i in 0..n {
            writes.put(TailCf::History, &history_key("c1", i), &encode(&i));
            writes.put(
                TailCf::Dedup,
                &key(&["c1", "u1", &format!("cmid-{i}")]),
                &encode(&(i, i)),
            );
        }
        store.tail.apply(&writes, n);
        store.flush_tail().expect("ingest");
        let history = filter_bytes_per_entry(&store, CF_HISTORY);
        let dedup = filter_bytes_per_entry(&store, CF_DEDUP);
        assert_eq!(history, 0.0, "history: {history} B/entry");
        assert!(
            (dedup * 8.0 - DEDUP_BLOOM_BITS).abs() < 2.5,
            "dedup: {dedup} B/entry"
        );
    }
}

#[cfg(test)]
mod batch_tests {
    use super::super::types::{Creation, Event, EventKind, Record};
    use super::*;

    fn event(seq: u64, kind: EventKind) -> Record {
        Record::Event {
            event: Event {
                chat: "g1".into(),
                seq,
                ts: seq,
                sender: "ann".into(),
                kind,
            },
            created: (seq == 1).then(|| Creation {
                creator: "ann".into(),
                direct: false,
            }),
        }
    }

    fn entry(store: &Store, seq: u64) -> HistoryEntry {
        store
            .history_range("g1", seq, 1)
            .expect("history")
            .pop()
            .expect("one entry")
    }

    /// Edits and deletes read their target's history entry back: from the same batch (the
    /// message was not committed yet), and from the index once committed.
    #[test]
    fn edits_and_deletes_find_their_target_in_the_same_batch_and_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20, None).expect("open");
        let message = |cmid: &str| EventKind::Message {
            cmid: cmid.into(),
            body: Some("hi".into()),
            file: None,
        };
        let edit = |target| EventKind::Edit {
            target,
            body: "edited".into(),
        };
        let mut batch = store.batch();
        let records = [
            event(
                1,
                EventKind::Members {
                    added: vec!["ann".into()],
                    removed: Vec::new(),
                    title: None,
                },
            ),
            event(2, message("a")),
            event(3, message("b")),
            event(4, edit(2)),
            event(5, EventKind::Delete { target: 2 }),
            event(6, edit(3)),
            event(7, edit(3)),
        ];
        for (i, r) in records.iter().enumerate() {
            batch.apply(r, 10 + i as u64).expect("apply");
        }
        batch.commit().expect("commit");
        let two = entry(&store, 2);
        assert_eq!(
            (two.log_index, two.edit_log_index, two.deleted),
            (11, Some(13), true)
        );
        let three = entry(&store, 3);
        assert_eq!(
            (three.log_index, three.edit_log_index, three.deleted),
            (12, Some(16), false)
        );
        let mut batch = store.batch();
        batch.apply(&event(8, edit(2)), 17).expect("apply");
        batch.apply(&event(9, message("c")), 18).expect("apply");
        batch.commit().expect("commit");
        let two = entry(&store, 2);
        assert_eq!(
            (two.log_index, two.edit_log_index, two.deleted),
            (11, Some(17), true)
        );
        assert_eq!(entry(&store, 9).log_index, 18);
        store.flush_tail().expect("ingest");
        let mut batch = store.batch();
        batch
            .apply(&event(10, EventKind::Delete { target: 9 }), 19)
            .expect("apply");
        batch.commit().expect("commit");
        let nine = entry(&store, 9);
        assert_eq!(
            (nine.log_index, nine.edit_log_index, nine.deleted),
            (18, None, true)
        );
    }
}

#[cfg(test)]
mod dedup_filter_tests {
    use super::*;

    fn dedup_key(i: u64) -> Vec<u8> {
        key(&["c1", "u1", &format!("cmid-{i}")])
    }

    /// Puts keys `from..to` through the index tail, as a batch's commit does (ingesting in the
    /// background whenever the tail fills).
    fn put(store: &Store, from: u64, to: u64) {
        let mut writes = TailWrites::default();
        for i in from..to {
            writes.put(TailCf::Dedup, &dedup_key(i), &encode(&(i, i)));
        }
        let (live, _) = store.tail.apply(&writes, to);
        store.after_tail_apply(live).expect("ingest");
    }

    fn assert_all_found(store: &Store, to: u64) {
        let keys: Vec<Vec<u8>> = (0..to).map(dedup_key).collect();
        let found = store
            .get_many::<(u64, u64)>(CF_DEDUP, &keys)
            .expect("get_many");
        for (i, value) in (0..to).zip(found) {
            assert_eq!(value, Some((i, i)), "key {i} of {to}, by get_many");
        }
        for i in (0..to).step_by(97) {
            let value = store.get::<(u64, u64)>(CF_DEDUP, &dedup_key(i));
            assert_eq!(value.expect("get"), Some((i, i)), "key {i} of {to}, by get");
            assert!(
                store.contains(CF_DEDUP, &dedup_key(i)).expect("contains"),
                "key {i} of {to}, by contains"
            );
        }
    }

    /// The in-memory filter in front of `dedup` never hides a key: not while it is scanned
    /// in at open, not while ingestions race the scan, not after it grew filter by filter.
    /// And it does screen: most absent keys never reach RocksDB.
    #[test]
    fn the_dedup_filter_never_hides_a_key_and_screens_absent_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut to = 0;
        {
            // Keys in RocksDB before the next open, for its scan to find; a filter of 64
            // keys at first, which grows on every few ingestions.
            let store = Store::open_with(dir.path(), 500, None, 64).expect("open");
            while to < 3_000 {
                put(&store, to, to + 250);
                to += 250;
                assert_all_found(&store, to);
            }
            store.flush_tail().expect("flush");
            store.ingest.dedup_filter.wait_built();
            assert!(
                store.ingest.dedup_filter.ready_filters() > Some(2),
                "grown: {:?}",
                store.ingest.dedup_filter
            );
        }
        // The scan runs in the background while the tail fills and is ingested.
        let store = Store::open_with(dir.path(), 500, None, 64).expect("reopen");
        while to < 20_000 {
            put(&store, to, to + 250);
            to += 250;
            assert_all_found(&store, to);
        }
        store.ingest.dedup_filter.wait_built();
        assert!(
            store.ingest.dedup_filter.ready_filters() > Some(1),
            "grown after the scan: {:?}",
            store.ingest.dedup_filter
        );
        assert_all_found(&store, to);
        let screen = store.ingest.dedup_filter.screen();
        let absent = 20_000;
        let passed = (0..absent)
            .filter(|i| screen.may_contain(&dedup_key(1_000_000 + i)))
            .count();
        assert!(passed < 1_000, "{passed} of {absent} absent keys passed");
    }
}
