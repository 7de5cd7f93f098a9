//! An in-memory Bloom filter over every key of the `dedup` column family in RocksDB.
//!
//! Every send looks its `(chat, sender, cmid)` up, and the answer is nearly always "not
//! there". Past the index tail, RocksDB answers a miss by probing the filter of each of up to
//! 16 sorted runs, behind its `MultiGet` machinery: in the append benchmark that was more than
//! half of the sequencer's CPU (skipping it, as an experiment, took the sequencer from 2.3–2.5
//! to 1.0–1.1 µs per message). This filter answers most misses with one or two memory
//! accesses per filter, and sends only its false positives (under 1 % per filter) on to
//! RocksDB.
//!
//! It holds no state of its own on disk. [`DedupFilter::open`] builds it on a background
//! thread from a scan of the column family, and until the scan ends every lookup goes to
//! RocksDB as before. Keys reach RocksDB's `dedup` only through the index tail's ingestion,
//! which calls [`DedupFilter::insert_ingested`] once its file is in and before the tail
//! forgets the generation: a key is always in the tail or (if the filter is ready) in the
//! filter, so the filter never hides a key.
//!
//! When an ingestion's keys do not fit in the newest filter, another one is added first, sized
//! for twice as many keys as all before it, and new keys go there: a lookup probes one filter
//! per tripling of the keys (3 filters at 10 M keys on a new database). Rebuilding one larger
//! filter instead meant scanning RocksDB again, which cost about as much CPU per key as the
//! filter saved (tried).
//!
//! The scan racing an ingestion: the chain the scan fills is registered (as `building`) before
//! the scan's iterator is opened; an ingestion inserts its keys (under the read lock) after its
//! file is in. Either the ingestion saw the registered chain, or its file was in before the
//! iterator was opened, so the scan finds its keys. The first filter is sized from RocksDB's
//! estimate of the keys, which is exact here (`dedup` keys are never overwritten or deleted).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use fastbloom::AtomicBloomFilter;
use rocksdb::DB;

/// Bits per key a filter has at its capacity, and bits set per key: about 0.6 % false
/// positives at capacity. Fewer hashes than the optimum for 12 bits (8) keep an insert at 4
/// random memory accesses, and a lookup of an absent key (the usual one) at about 1.4: it
/// stops at the first unset bit, and at most 28 % of the bits are set.
const BITS_PER_KEY: u64 = 12;
const HASHES: u32 = 4;

/// Fewest keys a filter is sized for (3 MB).
pub(crate) const CAPACITY_MIN: u64 = 2 << 20;

/// Most keys the first filter is sized for from RocksDB's estimate.
const ESTIMATE_MAX: u64 = 1 << 30;

/// Keys the builder scans between checks of the cancel flag.
const CANCEL_CHECK_KEYS: u64 = 4096;

/// One Bloom filter and what it was sized for.
struct Filter {
    bloom: AtomicBloomFilter<foldhash::fast::FixedState>,
    capacity: u64,
    /// Keys inserted (a key inserted twice counts twice: only used to decide when to grow).
    count: AtomicU64,
}

impl Filter {
    fn new(capacity: u64) -> Filter {
        let bits = usize::try_from(capacity.saturating_mul(BITS_PER_KEY)).unwrap_or(usize::MAX);
        Filter {
            // Keys are hashed once per lookup ([`DedupFilter::hash`]), not by each filter.
            bloom: AtomicBloomFilter::with_num_bits(bits)
                .hasher(foldhash::fast::FixedState::default())
                .hashes(HASHES),
            capacity,
            count: AtomicU64::new(0),
        }
    }
}

/// Filters that together hold every key inserted; only the newest takes new keys.
#[derive(Clone)]
struct Chain(Vec<Arc<Filter>>);

impl Chain {
    fn new(capacity: u64) -> Chain {
        Chain(vec![Arc::new(Filter::new(capacity))])
    }

    fn may_contain(&self, hash: u64) -> bool {
        self.0.iter().any(|f| f.bloom.contains_hash(hash))
    }

    /// The chain with one more filter, with room for `adding` keys and twice as many as all
    /// the filters before it hold (so a lookup probes one filter per tripling of the keys).
    fn grown(&self, adding: u64, capacity_min: u64) -> Chain {
        let held: u64 = self.0.iter().map(|f| f.count.load(Ordering::Relaxed)).sum();
        let mut filters = self.0.clone();
        filters.push(Arc::new(Filter::new(
            held.saturating_add(adding)
                .saturating_mul(2)
                .max(capacity_min),
        )));
        Chain(filters)
    }
}

#[derive(Default)]
struct State {
    /// What lookups use, once the scan completed.
    ready: Option<Arc<Chain>>,
    /// What the scan is filling.
    building: Option<Arc<Chain>>,
}

/// The filter in front of RocksDB's `dedup` column family (see the module's documentation).
pub(crate) struct DedupFilter {
    hasher: foldhash::fast::RandomState,
    capacity_min: u64,
    state: RwLock<State>,
    builder: Mutex<Option<JoinHandle<()>>>,
    cancel: AtomicBool,
}

impl std::fmt::Debug for DedupFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("DedupFilter")
            .field("ready", &state.ready.as_ref().map(|c| c.0.len()))
            .field("building", &state.building.is_some())
            .finish_non_exhaustive()
    }
}

/// What a lookup screens its keys with: the ready filters, or nothing (every key may be
/// there).
pub(crate) struct Screen<'a> {
    hasher: &'a foldhash::fast::RandomState,
    chain: Option<Arc<Chain>>,
}

impl Screen<'_> {
    /// Whether `key` may be in RocksDB's `dedup` (false: it is not).
    pub(crate) fn may_contain(&self, key: &[u8]) -> bool {
        self.chain
            .as_ref()
            .is_none_or(|c| c.may_contain(self.hasher.hash_one(key)))
    }
}

impl DedupFilter {
    /// A filter over column family `cf` of `db`, filled by a scan on a background thread; the
    /// first filter is sized for at least `capacity_min` keys.
    pub(crate) fn open(db: Arc<DB>, cf: &'static str, capacity_min: u64) -> Arc<DedupFilter> {
        let estimate = db
            .cf_handle(cf)
            .and_then(|h| {
                db.property_int_value_cf(h, "rocksdb.estimate-num-keys")
                    .ok()
                    .flatten()
            })
            .unwrap_or(0);
        // RocksDB's estimate is exact for `dedup` (no overwrites, no deletes), but bounded
        // anyway: a billion keys is 1.5 GB of filter.
        let estimate = estimate.min(ESTIMATE_MAX);
        let chain = Arc::new(Chain::new((2 * estimate).max(capacity_min)));
        let filter = Arc::new(DedupFilter {
            hasher: foldhash::fast::RandomState::default(),
            capacity_min,
            // Registered before the scan's iterator is opened (module docs).
            state: RwLock::new(State {
                ready: None,
                building: Some(chain.clone()),
            }),
            builder: Mutex::new(None),
            cancel: AtomicBool::new(false),
        });
        let this = filter.clone();
        let spawned = std::thread::Builder::new()
            .name("chatlog-dedupfl".into())
            .spawn(move || this.build(&db, cf, &chain));
        match spawned {
            Ok(handle) => *filter.builder.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle),
            // Without the filter every lookup goes to RocksDB: slower, still right.
            Err(e) => {
                tracing::warn!(error = %e, "dedup filter: cannot spawn its builder");
                filter
                    .state
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .building = None;
            }
        }
        filter
    }

    /// The filters lookups screen their keys with now.
    pub(crate) fn screen(&self) -> Screen<'_> {
        Screen {
            hasher: &self.hasher,
            chain: self
                .state
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .ready
                .clone(),
        }
    }

    /// Adds keys an ingestion just put into RocksDB (called before the index tail forgets
    /// them). A chain whose newest filter has no room for them all gets another filter first:
    /// an overfull filter passes nearly every key.
    pub(crate) fn insert_ingested<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) {
        let hashes: Vec<u64> = keys.map(|k| self.hasher.hash_one(k)).collect();
        let n = hashes.len() as u64;
        let full = |chain: &Chain| {
            let newest = chain.0.last().expect("a chain has a filter");
            newest.count.load(Ordering::Relaxed) + n > newest.capacity
        };
        let grow = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            [&state.ready, &state.building]
                .into_iter()
                .flatten()
                .any(|c| full(c))
        };
        if grow {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            let state = &mut *state;
            for chain in [&mut state.ready, &mut state.building]
                .into_iter()
                .flatten()
            {
                if full(chain) {
                    *chain = Arc::new(chain.grown(n, self.capacity_min));
                }
            }
        }
        // Under the read lock: a scan that registered its chain before this finds it (module
        // docs), and lookups go on meanwhile.
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        for chain in [&state.ready, &state.building].into_iter().flatten() {
            let newest = chain.0.last().expect("a chain has a filter");
            for &hash in &hashes {
                newest.bloom.insert_hash(hash);
            }
            newest.count.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Scans the column family into `chain`'s filter and makes the chain the ready one.
    fn build(&self, db: &DB, cf: &str, chain: &Chain) {
        super::store::quiet_perf_counters();
        let newest = chain.0.last().expect("a chain has a filter").clone();
        let scanned = self.scan(db, cf, &newest);
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        // The chain as ingestions left it (they may have grown it).
        let built = state.building.take();
        match scanned {
            Ok(true) => state.ready = built,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "dedup filter: scan failed; lookups use RocksDB"),
        }
    }

    /// Inserts every key of the column family into `into`; `Ok(false)` if cancelled.
    fn scan(&self, db: &DB, cf: &str, into: &Filter) -> Result<bool, rocksdb::Error> {
        let Some(cf) = db.cf_handle(cf) else {
            return Ok(false);
        };
        let mut options = rocksdb::ReadOptions::default();
        // A one-off pass over everything: keep the block cache for the hot blocks.
        options.fill_cache(false);
        let mut iter = db.raw_iterator_cf_opt(cf, options);
        iter.seek_to_first();
        let mut n = 0u64;
        while let Some(key) = iter.key() {
            into.bloom.insert_hash(self.hasher.hash_one(key));
            n += 1;
            if n.is_multiple_of(CANCEL_CHECK_KEYS) && self.cancel.load(Ordering::Relaxed) {
                return Ok(false);
            }
            iter.next();
        }
        into.count.fetch_add(n, Ordering::Relaxed);
        iter.status().map(|()| true)
    }

    /// The scan's thread, if it was not joined yet.
    fn take_builder(&self) -> Option<JoinHandle<()>> {
        self.builder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Stops the scan in progress, if any, and waits for its thread.
    pub(crate) fn shut_down(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(handle) = self.take_builder() {
            let _ = handle.join();
        }
    }

    /// Waits for the scan, if it is still running (tests).
    #[cfg(test)]
    pub(crate) fn wait_built(&self) {
        if let Some(handle) = self.take_builder() {
            handle.join().expect("dedup filter builder");
        }
    }

    /// How many filters the ready chain has (tests).
    #[cfg(test)]
    pub(crate) fn ready_filters(&self) -> Option<usize> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .ready
            .as_ref()
            .map(|c| c.0.len())
    }
}
