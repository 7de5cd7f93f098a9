//! Property test: random sequences of appends, batch appends, truncations, purges, reopens
//! and crashes (process kill and power loss) against a `Vec` model. Reads always equal the
//! model; every acknowledged entry survives every crash.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use chatlog::io::fault::{Crash, FaultFs};
use chatlog::{Log, LogConfig, Preallocate};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append(u16, u8),
    Batch(Vec<(u16, u8)>),
    Truncate(u16),
    Purge(u16),
    Reopen,
    Crash(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u16..300, any::<u8>()).prop_map(|(l, s)| Op::Append(l, s)),
        3 => prop::collection::vec((0u16..200, any::<u8>()), 0..12).prop_map(Op::Batch),
        1 => any::<u16>().prop_map(Op::Truncate),
        1 => any::<u16>().prop_map(Op::Purge),
        1 => Just(Op::Reopen),
        1 => any::<bool>().prop_map(Op::Crash),
    ]
}

fn data(len: u16, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

fn config() -> LogConfig {
    LogConfig {
        segment_size_bytes: 2048,
        entry_size_bytes_max: 512,
        index_stride: 3,
        preallocate: Preallocate::Sparse,
        ..LogConfig::default()
    }
}

struct Model {
    first: u64,
    entries: Vec<Vec<u8>>,
}

impl Model {
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }
}

fn open(fs: &FaultFs) -> Log {
    Log::open_with(Arc::new(fs.clone()), Path::new("/log"), config()).unwrap()
}

fn check(log: &Log, model: &Model, full: bool) {
    assert_eq!(log.first_index(), model.first);
    assert_eq!(log.next_index(), model.next());
    if full {
        let got: Vec<_> = log
            .iter_from(model.first)
            .map(|r| r.unwrap().1.to_vec())
            .collect();
        assert_eq!(got, model.entries);
    }
    for (k, want) in model.entries.iter().enumerate().rev().take(3) {
        assert_eq!(&log.read(model.first + k as u64).unwrap()[..], &want[..]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_vec_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut fs = FaultFs::new();
        let mut log = open(&fs);
        let mut model = Model { first: 1, entries: Vec::new() };
        for op in ops {
            match op {
                Op::Append(len, seed) => {
                    let d = data(len, seed);
                    prop_assert_eq!(log.append(d.clone()).unwrap(), model.next());
                    model.entries.push(d);
                }
                Op::Batch(items) => {
                    let ds: Vec<Vec<u8>> = items.iter().map(|&(l, s)| data(l, s)).collect();
                    let first = log
                        .append_batch(ds.iter().cloned().map(Bytes::from).collect())
                        .unwrap();
                    prop_assert_eq!(first, model.next());
                    model.entries.extend(ds);
                }
                Op::Truncate(x) => {
                    let span = model.entries.len() as u64 + 1;
                    let from = model.first + u64::from(x) % span;
                    log.truncate_from(from).unwrap();
                    model.entries.truncate((from - model.first) as usize);
                }
                Op::Purge(x) => {
                    let span = model.entries.len() as u64 + 1;
                    let before = model.first + u64::from(x) % span;
                    let first = log.purge_before(before).unwrap();
                    prop_assert!(first >= model.first && first <= before);
                    model.entries.drain(..(first - model.first) as usize);
                    model.first = first;
                }
                Op::Reopen => {
                    drop(log);
                    log = open(&fs);
                }
                Op::Crash(power) => {
                    // The old log's writer keeps its handles on the old state; the restarted
                    // process sees only what the crash kept.
                    let crashed = fs.crash(if power { Crash::PowerLoss } else { Crash::Process });
                    drop(log);
                    fs = crashed;
                    log = open(&fs);
                }
            }
            check(&log, &model, false);
        }
        check(&log, &model, true);
        drop(log);
        let log = open(&fs.crash(Crash::PowerLoss));
        check(&log, &model, true);
    }
}
