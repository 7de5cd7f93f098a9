//! Crash test with a real child process: the child appends from several threads as fast as it
//! can and prints every acknowledged index; the parent SIGKILLs it at random moments, reopens
//! the log and checks that every acknowledged entry is present and intact and that every entry
//! in the log is one that was really submitted (no garbage).
//!
//! Cycles: `CHATLOG_CRASH_CYCLES` (default 24); `scripts/crash-loop` runs many more.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use chatlog::{Log, LogConfig};
use rand::Rng;

mod common;

const CHILD_ENV: &str = "CHATLOG_CRASH_CHILD_DIR";
const CYCLE_ENV: &str = "CHATLOG_CRASH_CHILD_CYCLE";
const THREADS: u64 = 8;

fn config() -> LogConfig {
    LogConfig {
        // Small segments so kills also land during rollover and preallocation.
        segment_size_bytes: 256 * 1024,
        entry_size_bytes_max: 4096,
        ..LogConfig::default()
    }
}

/// The entry thread `t` submits as its `k`-th append in `cycle`.
fn entry(cycle: u64, t: u64, k: u64) -> Vec<u8> {
    let mut e = format!("c{cycle}-t{t}-k{k}-").into_bytes();
    let fill = b'a' + ((cycle * 7 + t * 3 + k) % 26) as u8;
    let len = 40 + ((cycle * 131 + t * 17 + k * 29) % 400) as usize;
    e.resize(len, fill);
    e
}

/// Parses an entry back to (cycle, t, k) and checks every byte.
fn parse(data: &[u8]) -> Option<(u64, u64, u64)> {
    let text = std::str::from_utf8(data).ok()?;
    let mut parts = text.splitn(4, '-');
    let cycle = parts.next()?.strip_prefix('c')?.parse().ok()?;
    let t = parts.next()?.strip_prefix('t')?.parse().ok()?;
    let k = parts.next()?.strip_prefix('k')?.parse().ok()?;
    (entry(cycle, t, k) == data).then_some((cycle, t, k))
}

/// Entry point of the child process; a no-op when run as a normal test.
#[test]
fn child_process_entry_point() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cycle: u64 = std::env::var(CYCLE_ENV).unwrap().parse().unwrap();
    let log = Arc::new(Log::open(&dir, config()).unwrap());
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    println!("ready");
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = log.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                for k in 0.. {
                    let index = log.append(entry(cycle, t, k)).unwrap();
                    let mut out = out.lock().unwrap();
                    writeln!(out, "ack {index} {t} {k}").unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn kill_9_never_loses_an_acknowledged_entry() {
    let cycles: u64 = std::env::var("CHATLOG_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rng();
    // Every acknowledged entry of every cycle: index -> (cycle, thread, k).
    let mut acked: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    let mut total_acked_this_run = 0u64;
    for cycle in 0..cycles {
        let lines = common::run_and_kill(
            "child_process_entry_point",
            &[
                (CHILD_ENV, dir.path().display().to_string()),
                (CYCLE_ENV, cycle.to_string()),
            ],
            rng.random_range(5..200),
            &format!("cycle {cycle}"),
        );
        for line in lines.iter().filter_map(|l| l.strip_prefix("ack ")) {
            let v: Vec<u64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
            let previous = acked.insert(v[0], (cycle, v[1], v[2]));
            assert!(previous.is_none(), "index {} acknowledged twice", v[0]);
            total_acked_this_run += 1;
        }

        let log = Log::open(dir.path(), config()).unwrap();
        for (&index, &(c, t, k)) in &acked {
            let data = log
                .read(index)
                .unwrap_or_else(|e| panic!("cycle {cycle}: acknowledged index {index} lost: {e}"));
            assert_eq!(
                data.as_ref(),
                entry(c, t, k),
                "cycle {cycle}: index {index} changed"
            );
        }
        // Nothing unacknowledged is garbage: every entry is one some thread submitted, and
        // each thread's entries appear in submission order.
        let mut last_k: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        for item in log.iter_from(log.first_index()) {
            let (index, data) = item.unwrap();
            let (c, t, k) = parse(&data)
                .unwrap_or_else(|| panic!("cycle {cycle}: index {index} holds garbage"));
            if let Some(prev) = last_k.insert((c, t), k) {
                assert!(k > prev, "cycle {cycle}: thread {t} entries out of order");
            }
        }
        if let Some((&last, _)) = acked.last_key_value() {
            assert!(log.next_index() > last);
        }
        // Unacknowledged survivors are now part of the log: record them so later cycles
        // also check they stay.
        for item in log.iter_from(log.first_index()) {
            let (index, data) = item.unwrap();
            acked.entry(index).or_insert_with(|| parse(&data).unwrap());
        }
    }
    assert!(
        total_acked_this_run > cycles * 10,
        "the child acknowledged too little to prove anything: {total_acked_this_run}"
    );
    eprintln!(
        "{cycles} kill -9 cycles, {total_acked_this_run} acknowledged appends, {} entries checked",
        acked.len()
    );
}
