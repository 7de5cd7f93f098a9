//! The index tail: the newest `history` and `dedup` writes, held in memory and handed to
//! RocksDB in sorted bulk.
//!
//! These two column families get one key per message, at scattered places in the key space
//! (many chats, random client message ids). Put into RocksDB's memtable one by one, every key
//! is a skiplist walk that misses the cache: about 60 % of the applier's time in the append
//! benchmark. Here they go into hash maps instead. Once the live tail holds
//! `threshold` entries it is frozen, and a background thread sorts it, writes one SST file per
//! column family and ingests the files (see `Store`). Reads look at the live tail, then the
//! frozen one, then RocksDB.
//!
//! The tail is pure in-memory state: no I/O here. Losing it (a crash) loses nothing, because,
//! like every index, it is derived from the log: the store records up to which log index the
//! ingested files hold every tail write, and the engine replays the log from there on open.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use hashbrown::HashTable;

use super::store::split_history_key;

/// One column family's entries of one generation, keyed by RocksDB keys.
///
/// Every key and value is copied into one byte buffer (`len(key) u32, len(value) u32, key,
/// value`), and a hash table holds each entry's offset and hash. A generation is two
/// allocations per column family instead of two per entry: the applier allocates nothing per
/// write once the buffer has grown, and dropping an ingested generation frees two buffers
/// instead of hundreds of thousands of keys and values (other threads' allocations, which was
/// 2–3 % of the append benchmark's CPU). A value set again (an edit's history entry) is
/// appended anew and the slot moved to it; the old bytes stay until the generation is dropped.
#[derive(Default)]
pub(crate) struct Map {
    bytes: Vec<u8>,
    slots: HashTable<Slot>,
    hasher: foldhash::fast::RandomState,
    /// Entries in `bytes` no slot points at any more (overwritten or removed).
    stale: usize,
}

/// Where an entry starts in [`Map::bytes`], with its key's hash.
#[derive(Clone, Copy)]
struct Slot {
    hash: u64,
    at: usize,
}

/// Bytes before an entry's key: the lengths of its key and value.
const ENTRY_HEADER: usize = 8;

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map")
            .field("entries", &self.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl Map {
    /// An empty map with room for `entries` entries of `bytes` bytes in all.
    pub fn with_capacity(entries: usize, bytes: usize) -> Map {
        Map {
            bytes: Vec::with_capacity(bytes),
            slots: HashTable::with_capacity(entries),
            hasher: foldhash::fast::RandomState::default(),
            stale: 0,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Key and value of the entry at `at`.
    fn entry(bytes: &[u8], at: usize) -> (&[u8], &[u8]) {
        let len =
            |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes")) as usize;
        let (k, v) = (len(at), len(at + 4));
        let key = at + ENTRY_HEADER;
        (&bytes[key..key + k], &bytes[key + k..key + k + v])
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let hash = self.hasher.hash_one(key);
        let bytes = &self.bytes;
        self.slots
            .find(hash, |s| s.hash == hash && Map::entry(bytes, s.at).0 == key)
            .map(|s| Map::entry(bytes, s.at).1)
    }

    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: &[u8], value: &[u8]) {
        let len = |n: usize| u32::try_from(n).expect("index keys and values are short");
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&len(key.len()).to_le_bytes());
        self.bytes
            .extend_from_slice(&len(value.len()).to_le_bytes());
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(value);
        let hash = self.hasher.hash_one(key);
        let bytes = &self.bytes;
        match self
            .slots
            .find_mut(hash, |s| s.hash == hash && Map::entry(bytes, s.at).0 == key)
        {
            Some(slot) => {
                slot.at = at;
                self.stale += 1;
            }
            None => {
                self.slots
                    .insert_unique(hash, Slot { hash, at }, |s| s.hash);
            }
        }
    }

    /// Keeps only the entries whose key `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        let bytes = &self.bytes;
        let before = self.slots.len();
        self.slots.retain(|s| keep(Map::entry(bytes, s.at).0));
        self.stale += before - self.slots.len();
    }

    /// Every entry, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.slots.iter().map(|s| Map::entry(&self.bytes, s.at))
    }

    /// Every entry, in the order its bytes lie in memory (the order entries were last set).
    ///
    /// [`Map::iter`] goes in hash order, which jumps across the whole arena: once it outgrows
    /// the CPU caches, every entry is a cache miss (an ingestion reads 200,000 of them). Front
    /// to back, the CPU's prefetcher keeps ahead. While no entry is stale, this walks the
    /// arena itself; otherwise it visits the slots' offsets in ascending order.
    pub fn iter_by_address(&self) -> ByAddress<'_> {
        let offsets = (self.stale > 0).then(|| {
            let mut at: Vec<usize> = self.slots.iter().map(|s| s.at).collect();
            at.sort_unstable();
            at.into_iter()
        });
        ByAddress {
            bytes: &self.bytes,
            next: 0,
            offsets,
            remaining: self.len(),
        }
    }

    /// An empty map sized like this one.
    fn empty_like(&self) -> Map {
        Map::with_capacity(self.len(), self.bytes.len())
    }
}

/// The iterator of [`Map::iter_by_address`].
pub(crate) struct ByAddress<'a> {
    bytes: &'a [u8],
    /// Where the next entry starts, when walking the whole arena.
    next: usize,
    /// The live entries' offsets, ascending, when some of the arena is stale.
    offsets: Option<std::vec::IntoIter<usize>>,
    /// Live entries not yet returned: what is collected from this iterator is allocated once,
    /// not grown by doubling (which was 2 % of the append benchmark's samples, with the page
    /// faults of each new copy).
    remaining: usize,
}

impl<'a> Iterator for ByAddress<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let at = match &mut self.offsets {
            Some(offsets) => offsets.next()?,
            None if self.next < self.bytes.len() => self.next,
            None => return None,
        };
        let (k, v) = Map::entry(self.bytes, at);
        self.next = at + ENTRY_HEADER + k.len() + v.len();
        self.remaining -= 1;
        Some((k, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for ByAddress<'_> {}

/// Which tail column family a write belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TailCf {
    /// `history`: `chat \0 seq(be)` → history entry.
    History,
    /// `dedup`: `chat \0 sender \0 cmid` → (seq, ts).
    Dedup,
}

/// A batch's writes to the tail, in log order, with their keys and values back to back in one
/// buffer: no allocation per key or value (four per message, and their frees, in the applier).
#[derive(Debug, Default)]
pub(crate) struct TailWrites {
    bytes: Vec<u8>,
    writes: Vec<Written>,
}

#[derive(Debug)]
enum Written {
    /// Key in `bytes[start..key_end]`, value in `bytes[key_end..end]`.
    Put {
        cf: TailCf,
        start: usize,
        key_end: usize,
        end: usize,
    },
    Horizon {
        chat: String,
        seq: u64,
    },
}

/// A write of [`TailWrites`], borrowed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WriteRef<'a> {
    Put {
        cf: TailCf,
        key: &'a [u8],
        value: &'a [u8],
    },
    Horizon {
        chat: &'a str,
        seq: u64,
    },
}

impl TailWrites {
    /// Adds a put whose key and value the closures append to the buffer they are given.
    pub fn put_with(
        &mut self,
        cf: TailCf,
        key: impl FnOnce(&mut Vec<u8>),
        value: impl FnOnce(&mut Vec<u8>),
    ) {
        let start = self.bytes.len();
        key(&mut self.bytes);
        let key_end = self.bytes.len();
        value(&mut self.bytes);
        self.writes.push(Written::Put {
            cf,
            start,
            key_end,
            end: self.bytes.len(),
        });
    }

    /// Adds a retention horizon: `chat`'s history below `seq` is gone.
    pub fn horizon(&mut self, chat: String, seq: u64) {
        self.writes.push(Written::Horizon { chat, seq });
    }

    /// The writes, in order.
    pub fn iter(&self) -> impl Iterator<Item = WriteRef<'_>> {
        self.writes.iter().map(|w| self.borrow(w))
    }

    /// The newest write.
    pub fn last(&self) -> Option<WriteRef<'_>> {
        self.writes.last().map(|w| self.borrow(w))
    }

    fn borrow<'a>(&'a self, w: &'a Written) -> WriteRef<'a> {
        match w {
            &Written::Put {
                cf,
                start,
                key_end,
                end,
            } => WriteRef::Put {
                cf,
                key: &self.bytes[start..key_end],
                value: &self.bytes[key_end..end],
            },
            Written::Horizon { chat, seq } => WriteRef::Horizon { chat, seq: *seq },
        }
    }

    /// Whether a horizon is among the writes.
    pub fn has_horizon(&self) -> bool {
        self.writes
            .iter()
            .any(|w| matches!(w, Written::Horizon { .. }))
    }
}

/// One generation of tail writes.
#[derive(Debug, Default)]
pub(crate) struct Maps {
    pub history: Map,
    pub dedup: Map,
    /// chat → highest seq with an entry in `history`.
    last_seq: HashMap<Vec<u8>, u64, foldhash::fast::RandomState>,
    /// The last log index whose writes these maps hold (0: none).
    pub last_index: u64,
}

impl Maps {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.history.len() + self.dedup.len()
    }

    fn map(&self, cf: TailCf) -> &Map {
        match cf {
            TailCf::History => &self.history,
            TailCf::Dedup => &self.dedup,
        }
    }

    fn apply(&mut self, write: WriteRef<'_>) {
        match write {
            WriteRef::Put {
                cf: TailCf::History,
                key,
                value,
            } => {
                let (chat, seq) = split_history_key(key);
                match self.last_seq.get_mut(chat) {
                    Some(last) => *last = (*last).max(seq),
                    None => {
                        self.last_seq.insert(chat.to_vec(), seq);
                    }
                }
                self.history.insert(key, value);
            }
            WriteRef::Put {
                cf: TailCf::Dedup,
                key,
                value,
            } => {
                self.dedup.insert(key, value);
            }
            WriteRef::Horizon { chat, seq } => {
                let Some(&last) = self.last_seq.get(chat.as_bytes()) else {
                    return;
                };
                self.history.retain(|k| {
                    let (c, s) = split_history_key(k);
                    c != chat.as_bytes() || s >= seq
                });
                if last < seq {
                    self.last_seq.remove(chat.as_bytes());
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    live: Maps,
    frozen: Option<Arc<Maps>>,
}

/// The live and frozen tail generations.
#[derive(Debug)]
pub(crate) struct Tail {
    state: RwLock<State>,
    threshold: usize,
}

/// A read view of the tail (holds its read lock: keep it short).
pub(crate) struct View<'a>(RwLockReadGuard<'a, State>);

impl View<'_> {
    /// The newest value of `key`, if the tail has one.
    pub fn get(&self, cf: TailCf, key: &[u8]) -> Option<&[u8]> {
        let state = &*self.0;
        state
            .live
            .map(cf)
            .get(key)
            .or_else(|| state.frozen.as_ref().and_then(|f| f.map(cf).get(key)))
    }

    /// The highest seq of `chat` with a history entry in the tail.
    pub fn last_seq(&self, chat: &str) -> Option<u64> {
        let state = &*self.0;
        let live = state.live.last_seq.get(chat.as_bytes()).copied();
        let frozen = state
            .frozen
            .as_ref()
            .and_then(|f| f.last_seq.get(chat.as_bytes()).copied());
        live.max(frozen)
    }

    /// Every entry of `cf`, oldest generation first (a later one overrides an earlier one).
    pub fn entries(&self, cf: TailCf) -> Vec<(Vec<u8>, Vec<u8>)> {
        let state = &*self.0;
        let frozen = state.frozen.as_ref().map(|f| f.map(cf));
        frozen
            .into_iter()
            .chain([state.live.map(cf)])
            .flat_map(|m| m.iter().map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect()
    }
}

impl Tail {
    /// An empty tail that asks to be frozen at `threshold` entries.
    pub fn new(threshold: usize) -> Tail {
        assert!(
            threshold > 0,
            "a tail threshold of 0 would freeze on every write"
        );
        Tail {
            state: RwLock::default(),
            threshold,
        }
    }

    /// A read view.
    pub fn view(&self) -> View<'_> {
        View(self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Applies one batch's writes, the last of them from log index `last_index`. Returns the
    /// number of live entries afterwards, and whether the tail holds nothing at all (no live
    /// entry, no frozen generation).
    pub fn apply(&self, writes: &TailWrites, last_index: u64) -> (usize, bool) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        assert!(
            !writes.has_horizon() || state.frozen.is_none(),
            "a horizon is applied to the tail only once the frozen generation is ingested"
        );
        for w in writes.iter() {
            state.live.apply(w);
        }
        assert!(
            last_index >= state.live.last_index,
            "tail writes are applied in log order"
        );
        state.live.last_index = last_index;
        let live = state.live.len();
        (live, live == 0 && state.frozen.is_none())
    }

    /// Whether `live_entries` calls for a freeze.
    pub fn full(&self, live_entries: usize) -> bool {
        live_entries >= self.threshold
    }

    /// Whether `live_entries` is so far past the threshold that the writer should wait for
    /// the frozen generation to be ingested rather than grow the live one further.
    pub fn overfull(&self, live_entries: usize) -> bool {
        live_entries >= self.threshold.saturating_mul(TAIL_OVERFULL_FACTOR)
    }

    /// Freezes the live generation (the caller ingests it, then calls [`Tail::drop_frozen`]).
    /// Returns `None` when the live generation is empty, or when a frozen one is still there
    /// (its ingestion failed: it stays readable, and the log replays it on the next open).
    pub fn freeze(&self) -> Option<Arc<Maps>> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.live.len() == 0 || state.frozen.is_some() {
            return None;
        }
        // The next generation starts with room for as much as this one took, so the applier
        // does not regrow (and rehash) it step by step.
        let next = Maps {
            history: state.live.history.empty_like(),
            dedup: state.live.dedup.empty_like(),
            last_seq: HashMap::default(),
            last_index: state.live.last_index,
        };
        let frozen = Arc::new(std::mem::replace(&mut state.live, next));
        state.frozen = Some(frozen.clone());
        Some(frozen)
    }

    /// The frozen generation, if there is one (its ingestion is running, or failed).
    pub fn frozen(&self) -> Option<Arc<Maps>> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .frozen
            .clone()
    }

    /// Forgets the frozen generation once RocksDB holds it.
    pub fn drop_frozen(&self) {
        self.state.write().unwrap_or_else(|e| e.into_inner()).frozen = None;
    }
}

/// How far past its threshold the live tail may grow while the frozen one is being ingested.
const TAIL_OVERFULL_FACTOR: usize = 4;

#[cfg(test)]
impl TailWrites {
    /// Adds a put of `key` and `value` (copied).
    pub(crate) fn put(&mut self, cf: TailCf, key: &[u8], value: &[u8]) {
        self.put_with(
            cf,
            |b| b.extend_from_slice(key),
            |b| b.extend_from_slice(value),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A write to the tail, owned: what the tests list their writes as.
    #[derive(Debug)]
    enum TailWrite {
        /// Sets `key` to `value`.
        Put {
            cf: TailCf,
            key: Vec<u8>,
            value: Vec<u8>,
        },
        /// Retention removed a chat's history below `seq`.
        Horizon { chat: String, seq: u64 },
    }

    impl FromIterator<TailWrite> for TailWrites {
        fn from_iter<I: IntoIterator<Item = TailWrite>>(writes: I) -> Self {
            let mut all = TailWrites::default();
            for w in writes {
                match w {
                    TailWrite::Put { cf, key, value } => all.put(cf, &key, &value),
                    TailWrite::Horizon { chat, seq } => all.horizon(chat, seq),
                }
            }
            all
        }
    }

    #[derive(Debug, Clone)]
    enum MapOp {
        Insert(Vec<u8>, Vec<u8>),
        /// Keeps the keys not starting with this byte.
        RetainNot(u8),
        /// Replaces the map with an empty one sized like it.
        Renew,
    }

    fn map_op() -> impl Strategy<Value = MapOp> {
        // Few distinct short keys, so inserts overwrite and retains hit.
        let bytes = |n| proptest::collection::vec(0u8..4, 0..n);
        prop_oneof![
            8 => (bytes(4), bytes(6)).prop_map(|(k, v)| MapOp::Insert(k, v)),
            1 => (0u8..4).prop_map(MapOp::RetainNot),
            1 => Just(MapOp::Renew),
        ]
    }

    proptest! {
        /// The arena map answers `get`, `len` and `iter` as a `HashMap` of owned keys and
        /// values does, through overwrites, retains and renewals.
        #[test]
        fn arena_map_agrees_with_a_hash_map(ops in proptest::collection::vec(map_op(), 0..200)) {
            let mut map = Map::default();
            let mut model: std::collections::HashMap<Vec<u8>, Vec<u8>> = Default::default();
            for op in ops {
                match op {
                    MapOp::Insert(k, v) => {
                        map.insert(&k, &v);
                        model.insert(k, v);
                    }
                    MapOp::RetainNot(b) => {
                        map.retain(|k| k.first() != Some(&b));
                        model.retain(|k, _| k.first() != Some(&b));
                    }
                    MapOp::Renew => {
                        map = map.empty_like();
                        model.clear();
                    }
                }
                prop_assert_eq!(map.len(), model.len());
                prop_assert_eq!(map.is_empty(), model.is_empty());
                for (k, v) in &model {
                    prop_assert_eq!(map.get(k), Some(v.as_slice()));
                }
                prop_assert_eq!(map.get(&[9, 9]), None);
                let mut listed: Vec<(Vec<u8>, Vec<u8>)> =
                    map.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
                listed.sort();
                let mut expected: Vec<(Vec<u8>, Vec<u8>)> = model.clone().into_iter().collect();
                expected.sort();
                prop_assert_eq!(&listed, &expected);
                // In memory order: the same entries, each once, with its newest value.
                let mut by_address: Vec<(Vec<u8>, Vec<u8>)> = map
                    .iter_by_address()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect();
                by_address.sort();
                prop_assert_eq!(by_address, expected);
                prop_assert_eq!(map.iter_by_address().len(), model.len());
            }
        }
    }

    fn hkey(chat: &str, seq: u64) -> Vec<u8> {
        let mut k = chat.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    fn put(cf: TailCf, key: Vec<u8>, value: &[u8]) -> TailWrite {
        TailWrite::Put {
            cf,
            key,
            value: value.to_vec(),
        }
    }

    #[test]
    fn live_overrides_frozen_and_last_seq_spans_both() {
        let tail = Tail::new(2);
        let (n, empty) = tail.apply(
            &TailWrites::from_iter([
                put(TailCf::History, hkey("g1", 1), b"a"),
                put(TailCf::History, hkey("g1", 2), b"b"),
            ]),
            2,
        );
        assert!(!empty);
        assert!(tail.full(n));
        let frozen = tail.freeze().expect("two entries");
        assert_eq!(frozen.last_index, 2);
        let (n, empty) = tail.apply(
            &TailWrites::from_iter([put(TailCf::History, hkey("g1", 1), b"edited")]),
            3,
        );
        assert_eq!(n, 1);
        assert!(!empty);
        let view = tail.view();
        assert_eq!(
            view.get(TailCf::History, &hkey("g1", 1)),
            Some(&b"edited"[..])
        );
        assert_eq!(view.get(TailCf::History, &hkey("g1", 2)), Some(&b"b"[..]));
        assert_eq!(view.get(TailCf::Dedup, &hkey("g1", 2)), None);
        assert_eq!(view.last_seq("g1"), Some(2));
        assert_eq!(view.last_seq("g2"), None);
        drop(view);
        tail.drop_frozen();
        let view = tail.view();
        assert_eq!(view.get(TailCf::History, &hkey("g1", 2)), None);
        assert_eq!(view.last_seq("g1"), Some(1));
    }

    #[test]
    fn a_horizon_removes_the_chats_history_below_it_only() {
        let tail = Tail::new(100);
        let writes = (1..=5)
            .flat_map(|s| {
                [
                    put(TailCf::History, hkey("g1", s), b"x"),
                    put(TailCf::History, hkey("g10", s), b"y"),
                ]
            })
            .chain([put(TailCf::Dedup, b"g1\0u\0c".to_vec(), b"d")])
            .collect();
        tail.apply(&writes, 11);
        tail.apply(
            &TailWrites::from_iter([TailWrite::Horizon {
                chat: "g1".into(),
                seq: 4,
            }]),
            12,
        );
        let view = tail.view();
        assert_eq!(view.get(TailCf::History, &hkey("g1", 3)), None);
        assert_eq!(view.get(TailCf::History, &hkey("g1", 4)), Some(&b"x"[..]));
        assert_eq!(view.get(TailCf::History, &hkey("g10", 1)), Some(&b"y"[..]));
        assert_eq!(view.get(TailCf::Dedup, b"g1\0u\0c"), Some(&b"d"[..]));
        assert_eq!(view.last_seq("g1"), Some(5));
        drop(view);
        tail.apply(
            &TailWrites::from_iter([TailWrite::Horizon {
                chat: "g1".into(),
                seq: 9,
            }]),
            13,
        );
        assert_eq!(tail.view().last_seq("g1"), None);
        assert_eq!(tail.view().last_seq("g10"), Some(5));
    }

    /// Puts of every length (empty keys and values too) and horizons, mixed: each comes back
    /// in order with its own key and value.
    #[test]
    fn tail_writes_keep_order_keys_and_values() {
        let mut writes = TailWrites::default();
        let mut expected = Vec::new();
        for i in 0..40usize {
            let key = vec![b'k'; i % 7];
            let value = vec![i as u8; i % 5];
            if i % 9 == 4 {
                writes.horizon(format!("g{i}"), i as u64);
                expected.push(format!("horizon g{i} {i}"));
            } else if i % 2 == 0 {
                writes.put(TailCf::Dedup, &key, &value);
                expected.push(format!("dedup {key:?} {value:?}"));
            } else {
                writes.put_with(
                    TailCf::History,
                    |b| b.extend_from_slice(&key),
                    |b| b.extend_from_slice(&value),
                );
                expected.push(format!("history {key:?} {value:?}"));
            }
        }
        let listed: Vec<String> = writes
            .iter()
            .map(|w| match w {
                WriteRef::Put {
                    cf: TailCf::Dedup,
                    key,
                    value,
                } => format!("dedup {key:?} {value:?}"),
                WriteRef::Put { key, value, .. } => format!("history {key:?} {value:?}"),
                WriteRef::Horizon { chat, seq } => format!("horizon {chat} {seq}"),
            })
            .collect();
        assert_eq!(listed, expected);
        assert!(writes.has_horizon());
        assert!(matches!(
            writes.last(),
            Some(WriteRef::Put {
                cf: TailCf::History,
                ..
            })
        ));
    }

    #[test]
    fn freezing_an_empty_tail_gives_nothing_and_keeps_the_index() {
        let tail = Tail::new(1);
        assert!(tail.freeze().is_none());
        tail.apply(
            &TailWrites::from_iter([put(TailCf::Dedup, b"k".to_vec(), b"v")]),
            7,
        );
        let frozen = tail.freeze().expect("one entry");
        assert_eq!(frozen.last_index, 7);
        tail.drop_frozen();
        assert!(tail.freeze().is_none());
        assert_eq!(tail.apply(&TailWrites::default(), 8), (0, true));
        assert!(tail.freeze().is_none());
    }
}
