//! Basic behaviour of the segment log on the real file system.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use chatlog::{Durability, Error, Log, LogConfig, Preallocate, RecoveryMode};
use common::fs::copy_dir;

fn small_config() -> LogConfig {
    LogConfig {
        segment_size_bytes: 16 * 1024,
        entry_size_bytes_max: 2048,
        preallocate: Preallocate::Zeroed,
        ..LogConfig::default()
    }
}

fn entry(i: u64) -> Vec<u8> {
    let len = (i * 37 % 700) as usize;
    (0..len).map(|k| (i as usize * 31 + k) as u8).collect()
}

#[test]
fn append_read_iterate_across_rollover_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.next_index(), 1);
    for i in 1..=300u64 {
        assert_eq!(log.append(entry(i)).unwrap(), i);
    }
    let segments = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg")
        })
        .count();
    assert!(segments > 3, "expected rollover, found {segments} segments");
    for i in 1..=300u64 {
        assert_eq!(&log.read(i).unwrap()[..], &entry(i)[..], "entry {i}");
    }
    let all: Vec<_> = log.iter_from(57).map(|r| r.unwrap()).collect();
    assert_eq!(all.len(), 244);
    for (i, data) in all {
        assert_eq!(&data[..], &entry(i)[..]);
    }
    drop(log);

    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.next_index(), 301);
    assert_eq!(log.verify().unwrap(), 300);
    assert!(log.recovery_report().torn_tail.is_none());
    // Sealed segments are trusted through their index files: only the last one is scanned.
    assert!(log.recovery_report().scanned_bytes <= 16 * 1024);
    assert_eq!(log.append(b"after".to_vec()).unwrap(), 301);
    assert_eq!(&log.read(301).unwrap()[..], b"after");
    assert!(matches!(
        log.read(302),
        Err(Error::OutOfRange {
            index: 302,
            first: 1,
            next: 302
        })
    ));
    assert!(matches!(log.read(0), Err(Error::OutOfRange { .. })));
}

#[test]
fn batch_append_is_contiguous_and_empty_batch_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    log.append(b"a".to_vec()).unwrap();
    let batch: Vec<Bytes> = (0..100u64).map(|i| Bytes::from(entry(i))).collect();
    assert_eq!(log.append_batch(batch).unwrap(), 2);
    assert_eq!(log.next_index(), 102);
    assert_eq!(log.append_batch(Vec::new()).unwrap(), 102);
    for i in 0..100u64 {
        assert_eq!(&log.read(i + 2).unwrap()[..], &entry(i)[..]);
    }
}

#[test]
fn concurrent_writers_get_distinct_gapless_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), small_config()).unwrap());
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..100u64)
                    .map(|k| {
                        let data = format!("{t}:{k}");
                        (log.append(data.clone().into_bytes()).unwrap(), data)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen: Vec<(u64, String)> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 1600);
    for (k, (index, data)) in seen.iter().enumerate() {
        assert_eq!(*index, k as u64 + 1);
        assert_eq!(&log.read(*index).unwrap()[..], data.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_appends_resolve_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let futures: Vec<_> = (0..200u64).map(|i| log.append_async(entry(i))).collect();
    let mut indexes = Vec::new();
    for f in futures {
        indexes.push(f.await.unwrap());
    }
    // Submitted in order from one task: indexes follow submission order.
    assert_eq!(indexes, (1..=200).collect::<Vec<_>>());
    assert_eq!(log.durable_next_index(), 201);
    for i in 0..200u64 {
        assert_eq!(&log.read(i + 1).unwrap()[..], &entry(i)[..]);
    }
}

#[test]
fn truncate_into_sealed_segment_then_append_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    for i in 1..=200u64 {
        log.append(entry(i)).unwrap();
    }
    log.truncate_from(40).unwrap();
    assert_eq!(log.next_index(), 40);
    assert!(matches!(log.read(40), Err(Error::OutOfRange { .. })));
    for i in 40..=120u64 {
        assert_eq!(log.append(entry(i + 1000)).unwrap(), i);
    }
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.next_index(), 121);
    for i in 1..40u64 {
        assert_eq!(&log.read(i).unwrap()[..], &entry(i)[..]);
    }
    for i in 40..=120u64 {
        assert_eq!(&log.read(i).unwrap()[..], &entry(i + 1000)[..]);
    }
    // Truncating everything leaves an empty log that continues at the same index.
    log.truncate_from(1).unwrap();
    assert_eq!(log.next_index(), 1);
    assert_eq!(log.append(b"x".to_vec()).unwrap(), 1);
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.next_index(), 2);
    assert_eq!(log.verify().unwrap(), 1);
}

#[test]
fn purge_removes_whole_sealed_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    for i in 1..=300u64 {
        log.append(entry(i)).unwrap();
    }
    let first = log.purge_before(150).unwrap();
    assert!(first > 1 && first <= 150, "first = {first}");
    assert_eq!(log.first_index(), first);
    assert!(matches!(log.read(first - 1), Err(Error::OutOfRange { .. })));
    assert_eq!(&log.read(first).unwrap()[..], &entry(first)[..]);
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.first_index(), first);
    assert_eq!(log.verify().unwrap(), 301 - first);
}

#[test]
fn second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _log = Log::open(dir.path(), small_config()).unwrap();
    let err = Log::open(dir.path(), small_config()).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
}

#[test]
fn oversize_entries_and_bad_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let err = log.append(vec![0u8; 2049]).unwrap_err();
    assert!(matches!(
        err,
        Error::LimitExceeded {
            limit: 2048,
            actual: 2049,
            ..
        }
    ));
    assert_eq!(log.next_index(), 1);
    drop(log);
    let bad = LogConfig {
        segment_size_bytes: 1024,
        entry_size_bytes_max: 4096,
        ..LogConfig::default()
    };
    let err = Log::open(dir.path(), bad).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
}

#[test]
fn weaker_durability_modes_ack_and_sync_later() {
    for durability in [
        Durability::None,
        Durability::Interval(std::time::Duration::from_millis(5)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            durability,
            ..small_config()
        };
        let log = Log::open(dir.path(), config.clone()).unwrap();
        for i in 1..=50u64 {
            log.append(entry(i)).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.durable_next_index(), 51);
        drop(log);
        let log = Log::open(dir.path(), config).unwrap();
        assert_eq!(log.verify().unwrap(), 50);
    }
}

#[test]
fn corruption_in_a_sealed_segment_is_reported_on_read_and_repair_cuts_there() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    for i in 1..=300u64 {
        log.append(entry(i)).unwrap();
    }
    drop(log);
    let first_seg = dir.path().join("00000000000000000001.seg");
    let mut bytes = std::fs::read(&first_seg).unwrap();
    bytes[200] ^= 0x10;
    std::fs::write(&first_seg, &bytes).unwrap();
    // Sealed segments are trusted through their index on open; reads check every CRC.
    let log = Log::open(dir.path(), small_config()).unwrap();
    let err = log.verify().unwrap_err();
    match &err {
        Error::Corruption { segment, .. } => assert_eq!(segment, &first_seg),
        other => panic!("expected corruption, got {other}"),
    }
    drop(log);
    // Without the index file the segment is scanned and the damage reported on open.
    std::fs::remove_file(dir.path().join("00000000000000000001.idx")).unwrap();
    let err = Log::open(dir.path(), small_config()).unwrap_err();
    assert!(
        matches!(&err, Error::Corruption { segment, offset, .. } if segment == &first_seg && *offset <= 200),
        "{err}"
    );
    // Same answer every time.
    let again = Log::open(dir.path(), small_config()).unwrap_err();
    assert_eq!(err.to_string(), again.to_string());
    let repair = LogConfig {
        recovery: RecoveryMode::Repair,
        ..small_config()
    };
    let log = Log::open(dir.path(), repair).unwrap();
    let report = log.recovery_report().clone();
    assert_eq!(report.repaired_at.as_ref().unwrap().0, first_seg);
    assert!(!report.removed_segments.is_empty());
    assert!(report.dropped_bytes > 0);
    let kept = log.next_index() - 1;
    assert!(kept < 300);
    assert_eq!(log.verify().unwrap(), kept);
    for i in 1..=kept {
        assert_eq!(&log.read(i).unwrap()[..], &entry(i)[..]);
    }
}

#[test]
fn stats_count_syncs_and_batch_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    log.append_batch((0..10).map(|i| Bytes::from(vec![i as u8; 8])).collect())
        .unwrap();
    log.append(b"one".to_vec()).unwrap();
    let stats = log.stats();
    assert_eq!(stats.entries_synced, 11);
    assert_eq!(stats.syncs, 2);
    // One batch of 10 entries (bucket 4: 9..=16) and one of 1 entry (bucket 0).
    assert_eq!(stats.batch_entries_buckets[0], 1);
    assert_eq!(stats.batch_entries_buckets[4], 1);
    assert_eq!(stats.batch_entries_buckets.iter().sum::<u64>(), 2);
}

/// Readers racing a truncate of the entries they read get either an entry that was at that
/// index (the old one or its replacement) or `OutOfRange`, never an I/O or corruption error.
/// (A Raft leader that steps down still has replication tasks reading its log while the new
/// leader's entries make it truncate; openraft treats any read error as fatal.)
#[test]
fn reads_racing_a_truncate_see_an_entry_or_out_of_range() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogConfig::default()).unwrap());
    let base = 50u64;
    for i in 1..=base {
        log.append(entry(i)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in base + 1..base + 40 {
                        let result = if r == 0 {
                            log.read(i)
                        } else {
                            log.iter_from(i)
                                .next()
                                .unwrap_or_else(|| {
                                    Err(Error::OutOfRange {
                                        index: i,
                                        first: 1,
                                        next: i,
                                    })
                                })
                                .map(|(_, b)| b)
                        };
                        match result {
                            Ok(bytes) => {
                                // Some generation of entry i.
                                let text = String::from_utf8(bytes.to_vec()).unwrap();
                                assert!(text.starts_with(&format!("entry {i} ")), "{text}");
                                reads += 1;
                            }
                            Err(Error::OutOfRange { .. }) => {}
                            Err(e) => panic!("read of {i} racing a truncate: {e}"),
                        }
                    }
                }
                reads
            })
        })
        .collect();
    for round in 0..3000u64 {
        log.truncate_from(base + 1).unwrap();
        let batch: Vec<Bytes> = (base + 1..base + 40)
            .map(|i| {
                Bytes::from(format!(
                    "entry {i} round {round} {}",
                    "x".repeat(i as usize % 7 * 5)
                ))
            })
            .collect();
        log.append_batch(batch).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
}

/// With `cached_sealed_segments: Some(0)` every sealed segment is dropped from the real page
/// cache (`POSIX_FADV_DONTNEED`) as it is sealed; reads (from the memory map and the files)
/// and a reopen still return every entry.
#[test]
fn sealed_segments_dropped_from_the_page_cache_read_back_intact() {
    use chatlog::io::{FileSystem, StdFs};
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        cached_sealed_segments: Some(0),
        ..small_config()
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    for i in 1..=300u64 {
        assert_eq!(log.append(entry(i)).unwrap(), i);
    }
    for i in 1..=300u64 {
        assert_eq!(&log.read(i).unwrap()[..], &entry(i)[..], "entry {i}");
    }
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.verify().unwrap(), 300);
    for (i, data) in log.iter_from(1).map(|r| r.unwrap()) {
        assert_eq!(&data[..], &entry(i)[..], "entry {i} after reopen");
    }
    let missing = dir.path().join("no-such.seg");
    assert_eq!(
        StdFs.drop_cache(&missing).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
}

/// `Durability::Interval` syncs by itself: with nothing but appends, the durable index reaches
/// the end (a replica's engine log relies on it to keep the sync before each index tail
/// ingestion short). With `Durability::None` it stays where it was until a sync or a seal.
#[test]
fn interval_durability_syncs_without_being_asked() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        durability: Durability::Interval(std::time::Duration::from_millis(20)),
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    for i in 1..=20u64 {
        log.append(entry(i)).unwrap();
    }
    // A liveness bound, not a timing check: the interval is 20 ms.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while log.durable_next_index() < 21 {
        assert!(
            std::time::Instant::now() < deadline,
            "the interval sync never came: durable up to {}",
            log.durable_next_index()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        durability: Durability::None,
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    let before = log.durable_next_index();
    for i in 1..=20u64 {
        log.append(entry(i)).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(log.durable_next_index(), before, "None synced unasked");
}

/// A log of entries 1..=300 (several sealed segments) in `dir/log`.
fn log_of_300(dir: &std::path::Path) -> Log {
    let log = Log::open(dir.join("log"), small_config()).unwrap();
    for i in 1..=300u64 {
        log.append(entry(i)).unwrap();
    }
    log
}

/// `copy_through` makes a directory holding exactly the entries up to the index it was
/// given, wherever that index falls (before the first entry, inside or at the end of a
/// sealed segment, in the active one), while appends and a purge go on between its begin
/// and its finish; the original log is unchanged and a log opened on the copy continues
/// after it.
#[test]
fn a_copy_through_an_index_holds_exactly_the_entries_up_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_of_300(dir.path());
    log.purge_before(100).unwrap();
    let first = log.first_index();
    assert!(first > 1, "the purge removed a segment");
    // Every index from first - 1 to the last: segments hold about 45 entries, so this
    // crosses several segment ends.
    for (n, through) in (first - 1..=300).enumerate() {
        let dest = dir.path().join(format!("copy-{n}"));
        let pending = log.copy_through(&dest, through).unwrap();
        // Writes and a purge between begin and finish change nothing in the copy.
        log.append(b"meanwhile".to_vec()).unwrap();
        pending.finish().unwrap();
        let own = dir.path().join(format!("own-{n}"));
        copy_dir(&dest, &own);
        let copy = Log::open(&own, small_config()).unwrap();
        assert_eq!(copy.first_index(), first, "through {through}");
        assert_eq!(copy.next_index(), through + 1, "through {through}");
        for (i, data) in copy.iter_from(first).map(|r| r.unwrap()) {
            assert_eq!(&data[..], &entry(i)[..], "through {through}, entry {i}");
        }
        assert_eq!(copy.append(b"next".to_vec()).unwrap(), through + 1);
        drop(copy);
        std::fs::remove_dir_all(&dest).unwrap();
    }
    // Out of range: past the last entry, and before first - 1.
    let next = log.next_index();
    assert!(matches!(
        log.copy_through(&dir.path().join("bad"), next),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        log.copy_through(&dir.path().join("bad2"), first - 2),
        Err(Error::OutOfRange { .. })
    ));
    // The original still holds every entry, intact.
    drop(log);
    let log = Log::open(dir.path().join("log"), small_config()).unwrap();
    for i in first..=300 {
        assert_eq!(&log.read(i).unwrap()[..], &entry(i)[..], "entry {i}");
    }
}

/// Sealed segments are linked when the copy begins, so a purge of the original before the
/// copy finishes leaves the copy whole.
#[test]
fn a_copy_survives_a_purge_of_the_original_before_it_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_of_300(dir.path());
    let dest = dir.path().join("copy");
    let pending = log.copy_through(&dest, 290).unwrap();
    let first = log.purge_before(280).unwrap();
    assert!(
        first > 200,
        "the purge removed most segments (first {first})"
    );
    pending.finish().unwrap();
    let own = dir.path().join("own");
    copy_dir(&dest, &own);
    let copy = Log::open(&own, small_config()).unwrap();
    assert_eq!((copy.first_index(), copy.next_index()), (1, 291));
    assert_eq!(copy.verify().unwrap(), 290);
    for (i, data) in copy.iter_from(1).map(|r| r.unwrap()) {
        assert_eq!(&data[..], &entry(i)[..], "entry {i}");
    }
}

/// A truncate below the copied index between begin and finish is caught by `finish`, not
/// shipped as a short copy.
#[test]
fn a_copy_whose_entries_were_truncated_meanwhile_fails() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_of_300(dir.path());
    let pending = log.copy_through(&dir.path().join("copy"), 298).unwrap();
    log.truncate_from(295).unwrap();
    let err = pending.finish().unwrap_err();
    assert!(matches!(err, Error::Corruption { .. }), "{err}");
}

/// The real file system without hard links (the trait's default `hard_link`).
#[derive(Debug)]
struct NoLinks(chatlog::io::StdFs);

impl chatlog::io::FileSystem for NoLinks {
    fn create_dir_all(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.0.create_dir_all(path)
    }
    fn list_dir(&self, path: &std::path::Path) -> std::io::Result<Vec<String>> {
        self.0.list_dir(path)
    }
    fn open(
        &self,
        path: &std::path::Path,
        mode: chatlog::io::OpenMode,
    ) -> std::io::Result<Arc<dyn chatlog::io::FileHandle>> {
        self.0.open(path, mode)
    }
    fn remove_file(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.0.remove_file(path)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        self.0.rename(from, to)
    }
    fn sync_dir(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.0.sync_dir(path)
    }
    fn drop_cache(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.0.drop_cache(path)
    }
    fn lock(
        &self,
        path: &std::path::Path,
    ) -> std::io::Result<Box<dyn std::fmt::Debug + Send + Sync>> {
        self.0.lock(path)
    }
}

/// Where the file system has no hard links, sealed segments are copied instead: the copy is
/// the same, and shares no file with the original (its segments have one link each).
#[test]
fn a_copy_without_hard_links_copies_the_sealed_segments() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn chatlog::io::FileSystem> = Arc::new(NoLinks(chatlog::io::StdFs));
    let log = Log::open_with(fs, dir.path().join("log"), small_config()).unwrap();
    for i in 1..=300u64 {
        log.append(entry(i)).unwrap();
    }
    let dest = dir.path().join("copy");
    log.copy_through(&dest, 250).unwrap().finish().unwrap();
    let mut segments = 0;
    for e in std::fs::read_dir(&dest).unwrap() {
        let e = e.unwrap();
        if e.path().extension().is_some_and(|x| x == "seg") {
            assert_eq!(e.metadata().unwrap().nlink(), 1, "{:?} is a copy", e.path());
            segments += 1;
        }
    }
    assert!(segments > 3, "the copy has {segments} segments");
    let own = dir.path().join("own");
    copy_dir(&dest, &own);
    let copy = Log::open(&own, small_config()).unwrap();
    assert_eq!((copy.first_index(), copy.next_index()), (1, 251));
    for (i, data) in copy.iter_from(1).map(|r| r.unwrap()) {
        assert_eq!(&data[..], &entry(i)[..], "entry {i}");
    }

    // With links (the real file system), the same copy links them: two names per sealed one.
    let linked = log_of_300(&dir.path().join("linked-log"));
    let dest = dir.path().join("linked");
    linked.copy_through(&dest, 250).unwrap().finish().unwrap();
    let shared = std::fs::read_dir(&dest)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().metadata().unwrap().nlink() == 2)
        .count();
    assert!(shared > 3, "{shared} files of the copy are links");
}
