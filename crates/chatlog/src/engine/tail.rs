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
use std::sync::{Arc, RwLock, RwLockReadGuard};

use super::store::split_history_key;

/// Hash maps keyed by RocksDB keys.
pub(crate) type Map = HashMap<Vec<u8>, Vec<u8>, foldhash::fast::RandomState>;

/// Which tail column family a write belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TailCf {
    /// `history`: `chat \0 seq(be)` → history entry.
    History,
    /// `dedup`: `chat \0 sender \0 cmid` → (seq, ts).
    Dedup,
}

/// A write to the tail, in log order.
#[derive(Debug)]
pub(crate) enum TailWrite {
    /// Sets `key` to `value`.
    Put {
        cf: TailCf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Retention removed a chat's history below `seq`.
    Horizon { chat: String, seq: u64 },
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

    fn apply(&mut self, write: TailWrite) {
        match write {
            TailWrite::Put {
                cf: TailCf::History,
                key,
                value,
            } => {
                let (chat, seq) = split_history_key(&key);
                match self.last_seq.get_mut(chat) {
                    Some(last) => *last = (*last).max(seq),
                    None => {
                        self.last_seq.insert(chat.to_vec(), seq);
                    }
                }
                self.history.insert(key, value);
            }
            TailWrite::Put {
                cf: TailCf::Dedup,
                key,
                value,
            } => {
                self.dedup.insert(key, value);
            }
            TailWrite::Horizon { chat, seq } => {
                let Some(&last) = self.last_seq.get(chat.as_bytes()) else {
                    return;
                };
                self.history.retain(|k, _| {
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
            .map(Vec::as_slice)
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
            .flat_map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())))
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
    pub fn apply(&self, writes: Vec<TailWrite>, last_index: u64) -> (usize, bool) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let horizons = writes
            .iter()
            .any(|w| matches!(w, TailWrite::Horizon { .. }));
        assert!(
            !horizons || state.frozen.is_none(),
            "a horizon is applied to the tail only once the frozen generation is ingested"
        );
        for w in writes {
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
        let last_index = state.live.last_index;
        let frozen = Arc::new(std::mem::take(&mut state.live));
        state.live.last_index = last_index;
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
mod tests {
    use super::*;

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
            vec![
                put(TailCf::History, hkey("g1", 1), b"a"),
                put(TailCf::History, hkey("g1", 2), b"b"),
            ],
            2,
        );
        assert!(!empty);
        assert!(tail.full(n));
        let frozen = tail.freeze().expect("two entries");
        assert_eq!(frozen.last_index, 2);
        let (n, empty) = tail.apply(vec![put(TailCf::History, hkey("g1", 1), b"edited")], 3);
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
        tail.apply(writes, 11);
        tail.apply(
            vec![TailWrite::Horizon {
                chat: "g1".into(),
                seq: 4,
            }],
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
            vec![TailWrite::Horizon {
                chat: "g1".into(),
                seq: 9,
            }],
            13,
        );
        assert_eq!(tail.view().last_seq("g1"), None);
        assert_eq!(tail.view().last_seq("g10"), Some(5));
    }

    #[test]
    fn freezing_an_empty_tail_gives_nothing_and_keeps_the_index() {
        let tail = Tail::new(1);
        assert!(tail.freeze().is_none());
        tail.apply(vec![put(TailCf::Dedup, b"k".to_vec(), b"v")], 7);
        let frozen = tail.freeze().expect("one entry");
        assert_eq!(frozen.last_index, 7);
        tail.drop_frozen();
        assert!(tail.freeze().is_none());
        assert_eq!(tail.apply(Vec::new(), 8), (0, true));
        assert!(tail.freeze().is_none());
    }
}
