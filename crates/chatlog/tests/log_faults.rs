//! Fault injection through the I/O trait: torn and short writes, bit flips, fsync failure,
//! ENOSPC, read errors and an I/O countdown across segment rollover. Nothing acknowledged is
//! ever lost; failures poison the log; corruption before the tail is reported, never skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatlog::io::fault::{Crash, FaultFs, Faults};
use chatlog::{Durability, Error, Log, LogConfig, Preallocate, RecoveryMode};

const DIR: &str = "/log";

fn config() -> LogConfig {
    LogConfig {
        segment_size_bytes: 4096,
        entry_size_bytes_max: 1024,
        preallocate: Preallocate::Sparse,
        ..LogConfig::default()
    }
}

/// [`config`] with `Durability::Interval` of 1 ms.
fn interval_config() -> LogConfig {
    LogConfig {
        durability: Durability::Interval(Duration::from_millis(1)),
        ..config()
    }
}

fn open(fs: &FaultFs) -> chatlog::Result<Log> {
    Log::open_with(Arc::new(fs.clone()), DIR, config())
}

fn entry(i: u64) -> Vec<u8> {
    format!("entry-{i}-{}", "x".repeat((i % 50) as usize)).into_bytes()
}

/// Asserts the log holds exactly `acked` (from index 1) plus, possibly, a prefix of `maybe`.
fn assert_holds(log: &Log, acked: &[Vec<u8>], maybe: &[Vec<u8>]) {
    let got: Vec<Vec<u8>> = log.iter_from(1).map(|r| r.unwrap().1.to_vec()).collect();
    assert!(
        got.len() >= acked.len(),
        "lost acknowledged entries: {} < {}",
        got.len(),
        acked.len()
    );
    assert_eq!(&got[..acked.len()], acked, "acknowledged entries changed");
    let extra = &got[acked.len()..];
    assert!(
        extra.len() <= maybe.len(),
        "entries appeared that were never submitted"
    );
    assert_eq!(
        extra,
        &maybe[..extra.len()],
        "unacknowledged entries are garbage"
    );
}

fn active_segment(fs: &FaultFs) -> PathBuf {
    fs.files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .max()
        .unwrap()
}

#[test]
fn torn_write_at_every_byte_of_a_frame_loses_nothing_acknowledged() {
    let acked: Vec<Vec<u8>> = (1..=5).map(entry).collect();
    let victim = b"the entry whose write is torn".to_vec();
    let frame_len = victim.len() + 8 + 3;
    for keep in 0..=frame_len {
        let fs = FaultFs::new();
        let log = open(&fs).unwrap();
        for e in &acked {
            log.append(e.clone()).unwrap();
        }
        fs.set_faults(Faults {
            short_write_bytes: Some(keep),
            ..Faults::default()
        });
        let err = log.append(victim.clone()).unwrap_err();
        assert!(matches!(err, Error::Io { op: "write", .. }), "{err}");
        assert!(log.is_poisoned());
        assert!(matches!(
            log.append(b"later".to_vec()),
            Err(Error::Poisoned)
        ));
        // Reads of acknowledged entries keep working on a poisoned log.
        assert_eq!(&log.read(5).unwrap()[..], &acked[4][..]);
        for crash in [Crash::Process, Crash::PowerLoss] {
            let after = fs.crash(crash);
            let reopened = open(&after).unwrap();
            assert_holds(&reopened, &acked, std::slice::from_ref(&victim));
            // And the log is writable again, continuing right after what survived.
            let next = reopened.next_index();
            assert_eq!(reopened.append(b"new".to_vec()).unwrap(), next);
            drop(reopened);
            let again = open(&after.crash(Crash::PowerLoss)).unwrap();
            assert_eq!(&again.read(next).unwrap()[..], b"new");
        }
    }
}

#[test]
fn bit_flip_in_an_earlier_batch_is_reported_with_segment_and_offset() {
    let fs = FaultFs::new();
    let log = open(&fs).unwrap();
    for i in 1..=6 {
        log.append(entry(i)).unwrap();
    }
    drop(log);
    let seg = active_segment(&fs);
    let data_end = 32 + (1..=6).map(|i| entry(i).len() + 8 + 3).sum::<usize>();
    let last_frame_start = data_end - (entry(6).len() + 8 + 3);
    // Every byte of every frame but the last batch's (a single append here).
    for offset in 32..last_frame_start {
        for mask in [0x01u8, 0x80] {
            let hit = fs.crash(Crash::PowerLoss);
            hit.flip(&seg, offset as u64, mask);
            let err = open(&hit).unwrap_err();
            match &err {
                Error::Corruption {
                    segment,
                    offset: at,
                    ..
                } => {
                    assert_eq!(segment, &seg);
                    assert!(*at as usize <= offset, "reported at {at}, flipped {offset}");
                }
                other => panic!("flip at {offset}: expected corruption, got {other}"),
            }
            // Same answer on every attempt; nothing was changed on disk.
            assert_eq!(open(&hit).unwrap_err().to_string(), err.to_string());
            // Repair cuts at the damage and keeps everything before it.
            let repaired = Log::open_with(
                Arc::new(hit.clone()),
                DIR,
                LogConfig {
                    recovery: RecoveryMode::Repair,
                    ..config()
                },
            )
            .unwrap();
            let report = repaired.recovery_report();
            assert!(report.repaired_at.is_some());
            assert!(report.dropped_bytes > 0);
            let kept = repaired.next_index() - 1;
            assert!(kept < 6);
            for i in 1..=kept {
                assert_eq!(&repaired.read(i).unwrap()[..], &entry(i)[..]);
            }
        }
    }
}

#[test]
fn strict_mode_refuses_a_torn_tail_and_changes_nothing() {
    let fs = FaultFs::new();
    let log = open(&fs).unwrap();
    log.append(entry(1)).unwrap();
    fs.set_faults(Faults {
        short_write_bytes: Some(5),
        ..Faults::default()
    });
    log.append(entry(2)).unwrap_err();
    let crashed = fs.crash(Crash::Process);
    let seg = active_segment(&crashed);
    let before = crashed.contents(&seg).unwrap();
    let strict = LogConfig {
        recovery: RecoveryMode::Strict,
        ..config()
    };
    let err = Log::open_with(Arc::new(crashed.clone()), DIR, strict).unwrap_err();
    assert!(matches!(err, Error::Corruption { .. }), "{err}");
    assert_eq!(crashed.contents(&seg).unwrap(), before);
    // The default mode cuts it, and says so.
    let log = open(&crashed).unwrap();
    let (path, offset, bytes) = log.recovery_report().torn_tail.clone().unwrap();
    assert_eq!(path, seg);
    assert_eq!(offset as usize, 32 + entry(1).len() + 11);
    assert_eq!(bytes, 5);
}

#[test]
fn failed_fsync_poisons_and_is_never_retried() {
    let fs = FaultFs::new();
    let log = open(&fs).unwrap();
    let acked: Vec<Vec<u8>> = (1..=3).map(entry).collect();
    for e in &acked {
        log.append(e.clone()).unwrap();
    }
    fs.set_faults(Faults {
        fail_next_sync: true,
        ..Faults::default()
    });
    let err = log.append(entry(4)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Io {
                op: "fdatasync",
                ..
            }
        ),
        "{err}"
    );
    let ios = fs.io_count();
    assert!(matches!(log.append(entry(5)), Err(Error::Poisoned)));
    assert!(matches!(log.sync(), Err(Error::Poisoned)));
    assert!(matches!(log.truncate_from(2), Err(Error::Poisoned)));
    assert_eq!(
        fs.io_count(),
        ios,
        "a poisoned log must not touch the disk again"
    );
    assert_eq!(log.next_index(), 4);
    let reopened = open(&fs.crash(Crash::PowerLoss)).unwrap();
    assert_holds(&reopened, &acked, &[entry(4)]);
}

/// `Durability::Interval`: the interval's sync and explicit syncs run off the writer thread, so
/// appends go on (acknowledged, as the mode says) while a sync hangs on the disk, and become
/// durable once it returns. With the syncs on the writer thread these appends would wait for
/// the disk.
#[test]
fn interval_appends_go_on_while_a_sync_hangs() {
    let fs = FaultFs::new();
    let log = Arc::new(Log::open_with(Arc::new(fs.clone()), DIR, interval_config()).unwrap());
    fs.hold_syncs(true);
    log.append(entry(1)).unwrap();
    // Liveness bounds below, not timing checks: the interval is 1 ms.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs.syncs_waiting() == 0 {
        assert!(Instant::now() < deadline, "the interval sync never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    // An explicit sync waits for the disk too, and holds no one else up either.
    let sync = {
        let log = log.clone();
        std::thread::spawn(move || log.sync())
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let appender = {
        let log = log.clone();
        std::thread::spawn(move || {
            for i in 2..=20 {
                log.append(entry(i)).unwrap();
            }
            done_tx.send(()).unwrap();
        })
    };
    let appended = done_rx.recv_timeout(Duration::from_secs(30));
    let durable_while_held = log.durable_next_index();
    // Release the disk either way, so a failure ends instead of hanging.
    fs.hold_syncs(false);
    appended.expect("appends waited for the hung sync");
    appender.join().unwrap();
    sync.join().unwrap().unwrap();
    assert_eq!(
        durable_while_held, 1,
        "nothing is durable while the sync hangs"
    );
    log.sync().unwrap();
    assert_eq!(log.durable_next_index(), 21);
    drop(log);
    let acked: Vec<Vec<u8>> = (1..=20).map(entry).collect();
    let reopened = open(&fs.crash(Crash::PowerLoss)).unwrap();
    assert_holds(&reopened, &acked, &[]);
}

/// Truncating an `Interval` log with writes still unsynced on the sync thread: the cut holds,
/// the durable index never points past the log's end, and what follows is durable after a sync.
#[test]
fn an_interval_log_truncates_past_unsynced_writes() {
    let fs = FaultFs::new();
    let log = Log::open_with(Arc::new(fs.clone()), DIR, interval_config()).unwrap();
    for i in 1..=10 {
        log.append(entry(i)).unwrap();
    }
    log.truncate_from(6).unwrap();
    assert_eq!(log.next_index(), 6);
    assert!(
        log.durable_next_index() <= 6,
        "{}",
        log.durable_next_index()
    );
    for i in 11..=13 {
        log.append(entry(i)).unwrap();
    }
    log.sync().unwrap();
    assert_eq!(log.durable_next_index(), 9);
    drop(log);
    let kept: Vec<Vec<u8>> = (1..=5).chain(11..=13).map(entry).collect();
    let reopened = open(&fs.crash(Crash::PowerLoss)).unwrap();
    assert_holds(&reopened, &kept, &[]);
}

/// A failed interval sync (on the sync thread) poisons the log like any failed sync.
#[test]
fn a_failed_interval_sync_poisons() {
    let fs = FaultFs::new();
    let log = Log::open_with(Arc::new(fs.clone()), DIR, interval_config()).unwrap();
    log.append(entry(1)).unwrap();
    log.sync().unwrap();
    fs.set_faults(Faults {
        fail_next_sync: true,
        ..Faults::default()
    });
    log.append(entry(2)).unwrap();
    let err = log.sync().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Io {
                op: "fdatasync",
                ..
            } | Error::Poisoned
        ),
        "{err}"
    );
    assert!(matches!(log.append(entry(3)), Err(Error::Poisoned)));
    assert!(matches!(log.sync(), Err(Error::Poisoned)));
    assert_eq!(log.durable_next_index(), 2);
    let reopened = open(&fs.crash(Crash::PowerLoss)).unwrap();
    assert_holds(&reopened, &[entry(1)], &[entry(2)]);
}

#[test]
fn disk_full_is_a_clear_error_and_loses_nothing() {
    for space in [0u64, 7, 40, 200, 1000, 3000, 5000] {
        let fs = FaultFs::new();
        let log = open(&fs).unwrap();
        fs.set_faults(Faults {
            space_left_bytes: Some(space),
            ..Faults::default()
        });
        let mut acked = Vec::new();
        let mut failed = None;
        for i in 1..=200 {
            match log.append(entry(i)) {
                Ok(index) => {
                    assert_eq!(index, i);
                    acked.push(entry(i));
                }
                Err(err) => {
                    assert!(matches!(err, Error::NoSpace { .. }), "space {space}: {err}");
                    assert!(err.to_string().contains("no space left"));
                    failed = Some(entry(i));
                    break;
                }
            }
        }
        let failed = failed.expect("the disk must fill up");
        assert!(matches!(log.append(entry(999)), Err(Error::Poisoned)));
        for crash in [Crash::Process, Crash::PowerLoss] {
            let reopened = open(&fs.crash(crash)).unwrap();
            assert_holds(&reopened, &acked, std::slice::from_ref(&failed));
        }
    }
}

#[test]
fn read_errors_are_reported_without_poisoning() {
    let fs = FaultFs::new();
    let log = open(&fs).unwrap();
    log.append(entry(1)).unwrap();
    fs.set_faults(Faults {
        fail_reads: true,
        ..Faults::default()
    });
    assert!(matches!(log.read(1), Err(Error::Io { op: "read", .. })));
    assert!(!log.is_poisoned());
    fs.set_faults(Faults::default());
    assert_eq!(&log.read(1).unwrap()[..], &entry(1)[..]);
    assert_eq!(log.append(entry(2)).unwrap(), 2);
}

#[test]
fn io_failure_at_every_step_of_appends_and_rollovers_loses_nothing() {
    // Count the I/Os of a run that rolls over several segments, then fail each one in turn.
    let probe = FaultFs::new();
    let log = open(&probe).unwrap();
    let start = probe.io_count();
    for i in 1..=300 {
        log.append(entry(i)).unwrap();
    }
    let total = probe.io_count() - start;
    drop(log);
    assert!(
        total > 300,
        "expected at least one I/O per append, got {total}"
    );
    for fail_at in 0..total {
        let fs = FaultFs::new();
        let log = open(&fs).unwrap();
        fs.set_faults(Faults {
            ios_left: Some(fail_at),
            ..Faults::default()
        });
        let mut acked = Vec::new();
        let mut failed = Vec::new();
        for i in 1..=300 {
            match log.append(entry(i)) {
                Ok(_) => acked.push(entry(i)),
                Err(err) => {
                    assert!(matches!(err, Error::Io { .. }), "{err}");
                    failed.push(entry(i));
                    break;
                }
            }
        }
        for crash in [Crash::Process, Crash::PowerLoss] {
            let after = fs.crash(crash);
            let reopened = open(&after)
                .unwrap_or_else(|e| panic!("fail_at {fail_at} {crash:?}: reopen failed: {e}"));
            assert_holds(&reopened, &acked, &failed);
            let next = reopened.next_index();
            assert_eq!(reopened.append(b"more".to_vec()).unwrap(), next);
        }
    }
}

#[test]
fn segment_files_are_named_by_first_index_and_checked_against_their_header() {
    let fs = FaultFs::new();
    let log = open(&fs).unwrap();
    for i in 1..=300 {
        log.append(entry(i)).unwrap();
    }
    drop(log);
    let segs: Vec<PathBuf> = fs
        .files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert!(segs.len() >= 3);
    assert_eq!(segs[0], Path::new(DIR).join("00000000000000000001.seg"));
    // A segment whose header disagrees with its name is corruption, not silently accepted.
    let second = segs[1].clone();
    let crashed = fs.crash(Crash::PowerLoss);
    crashed.flip(&second, 16, 0x01);
    let err = open(&crashed).unwrap_err();
    assert!(
        matches!(&err, Error::Corruption { segment, offset: 0, .. } if *segment == second),
        "{err}"
    );
}

/// Regression (found twice by the `log_model` fuzz target): a truncation interrupted part-way
/// (an I/O error, or a short write when the disk fills) used to leave zeros followed by intact
/// later frames, which the next open read as corruption.
#[test]
fn interrupted_truncation_of_several_chunks_still_reopens() {
    let config = LogConfig {
        segment_size_bytes: 8 << 20,
        entry_size_bytes_max: 2 << 20,
        preallocate: Preallocate::Sparse,
        ..LogConfig::default()
    };
    let faults = (0..8).map(|n| Faults {
        ios_left: Some(n),
        ..Faults::default()
    });
    // A disk that fills up in the middle of a write (a short write, then ENOSPC).
    let full = [0u64, 1, 4096, (1 << 20) + 17].map(|n| Faults {
        space_left_bytes: Some(n),
        ..Faults::default()
    });
    for (fail_after, fault) in faults.chain(full).enumerate() {
        let fs = FaultFs::new();
        let log = Log::open_with(Arc::new(fs.clone()), DIR, config.clone()).unwrap();
        let entries: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 1 << 20]).collect();
        for e in &entries {
            log.append(e.clone()).unwrap();
        }
        fs.set_faults(fault);
        let truncated = log.truncate_from(2).is_ok();
        for crash in [Crash::Process, Crash::PowerLoss] {
            let reopened = Log::open_with(Arc::new(fs.crash(crash)), DIR, config.clone())
                .unwrap_or_else(|e| panic!("fail_after {fail_after} {crash:?}: {e}"));
            if truncated {
                assert_eq!(reopened.next_index(), 2);
            }
            // Either the truncation happened or the entries are intact: never garbage.
            assert_holds(&reopened, &entries[..1], &entries[1..]);
        }
    }
}

/// Regression (found by the `segment_recovery` fuzz target): Repair used to trust a sealed
/// segment's index file and keep a damaged frame.
#[test]
fn repair_scans_sealed_segments_even_with_an_index_file() {
    let fs = FaultFs::new();
    let log = open(&fs).unwrap();
    for i in 1..=300 {
        log.append(entry(i)).unwrap();
    }
    drop(log);
    let first = Path::new(DIR).join("00000000000000000001.seg");
    assert!(
        fs.contents(&Path::new(DIR).join("00000000000000000001.idx"))
            .is_some()
    );
    let damaged = fs.crash(Crash::PowerLoss);
    damaged.flip(&first, 100, 0x04);
    let repaired = Log::open_with(
        Arc::new(damaged.clone()),
        DIR,
        LogConfig {
            recovery: RecoveryMode::Repair,
            ..config()
        },
    )
    .unwrap();
    assert_eq!(
        repaired.recovery_report().repaired_at.as_ref().unwrap().0,
        first
    );
    let kept = repaired.verify().unwrap();
    assert_eq!(kept, repaired.next_index() - 1);
}

#[test]
fn the_index_space_is_bounded_without_panics_or_hangs() {
    let bad = LogConfig {
        first_index: chatlog::log::INDEX_MAX + 1,
        ..config()
    };
    assert!(matches!(
        Log::open_with(Arc::new(FaultFs::new()), DIR, bad),
        Err(Error::InvalidConfig(_))
    ));
    let near_end = LogConfig {
        first_index: chatlog::log::INDEX_MAX - 1,
        ..config()
    };
    let log = Log::open_with(Arc::new(FaultFs::new()), DIR, near_end).unwrap();
    assert_eq!(log.append(entry(1)).unwrap(), chatlog::log::INDEX_MAX - 1);
    let err = log
        .append_batch(vec![entry(2).into(), entry(3).into()])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                what: "log index",
                ..
            }
        ),
        "{err}"
    );
    assert!(!log.is_poisoned());
    assert_eq!(log.append(entry(4)).unwrap(), chatlog::log::INDEX_MAX);
}

/// `cached_sealed_segments`: each roll drops from the page cache the one sealed segment that
/// fell out of the newest `n` (in the writer with sparse segments, in the spare's thread
/// with zero-filled ones), never the newest sealed ones or the active segment; by default
/// nothing is dropped. The entries stay readable.
#[test]
fn sealed_segments_past_the_cached_count_are_dropped_from_the_page_cache() {
    for preallocate in [Preallocate::Sparse, Preallocate::Zeroed] {
        for cached in [None, Some(0), Some(1), Some(2)] {
            let fs = FaultFs::new();
            let config = LogConfig {
                preallocate,
                cached_sealed_segments: cached,
                ..config()
            };
            let log = Log::open_with(Arc::new(fs.clone()), DIR, config.clone()).unwrap();
            let entries: Vec<Vec<u8>> = (1..=600).map(entry).collect();
            for e in &entries {
                log.append(e.clone()).unwrap();
            }
            // Closing joins the thread that prepares the spare (and drops the cache).
            log.close().unwrap();
            let mut segments: Vec<PathBuf> = fs
                .files()
                .into_iter()
                .filter(|p| {
                    p.extension().is_some_and(|e| e == "seg")
                        && p.file_name().is_some_and(|n| n != "spare.seg")
                })
                .collect();
            segments.sort();
            assert!(segments.len() >= 6, "expected rollovers: {segments:?}");
            let sealed = segments.len() - 1;
            for (i, path) in segments.iter().enumerate() {
                let expected = match cached {
                    Some(n) if i + n < sealed => 1,
                    _ => 0,
                };
                assert_eq!(
                    fs.cache_drops(path),
                    expected,
                    "{preallocate:?}, cached {cached:?}: segment {i} of {} ({})",
                    segments.len(),
                    path.display()
                );
            }
            let log = Log::open_with(Arc::new(fs.clone()), DIR, config).unwrap();
            assert_holds(&log, &entries, &[]);
        }
    }
}
