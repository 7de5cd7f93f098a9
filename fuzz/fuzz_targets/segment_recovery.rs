//! Opening a log whose directory holds one or two segment files with fuzzed contents, in each
//! recovery mode, on the in-memory `FaultFs`.
//!
//! Input: a flags byte, then either raw file contents (optionally behind a valid header) or a
//! description of valid segments, each damaged one known way (see `chatlog_fuzz::Damage`).
//!
//! Checked for every mode: open never panics and fails only with `Error::Corruption` (there
//! are no I/O faults here); an opened log verifies (unless the input supplied an index file,
//! which the engine trusts without scanning; the `repair-verifies` feature drops that
//! exception for Repair mode), accepts an append, and opens again after a process crash or a
//! power loss with the same contents and nothing left to repair.
//! Across modes: what `Strict` opens, `TolerateTornTail` opens identically, and what
//! `TolerateTornTail` opens, `Repair` opens identically. An undamaged built log must open in
//! `Strict` mode with exactly the entries written.

#![no_main]

use std::path::PathBuf;
use std::sync::Arc;

use arbitrary::Unstructured;
use bytes::Bytes;
use chatlog::io::fault::{Crash, FaultFs};
use chatlog::segment::format;
use chatlog::{Durability, Error, Log, LogConfig, Preallocate, RecoveryMode};
use chatlog_fuzz::{
    Applied, Damage, all_entries, build_segment, dir, index_path, pick_first_index, segment_path,
};
use libfuzzer_sys::fuzz_target;

const SEGMENT_SIZE_BYTES: u64 = 4096;
const ENTRY_SIZE_BYTES_MAX: usize = 1024;

/// Files to place in the log directory, and what is known about them.
struct Layout {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// An index file is among `files`: the engine trusts it without scanning the segment.
    index_placed: bool,
    /// The log is undamaged and consistent: these are exactly its entries.
    expected: Option<(u64, Vec<Vec<u8>>)>,
    stride: u32,
}

fuzz_target!(|data: &[u8]| {
    let Some(layout) = layout(data) else {
        return;
    };
    let outcomes: Vec<Option<Opened>> = [
        RecoveryMode::Strict,
        RecoveryMode::TolerateTornTail,
        RecoveryMode::Repair,
    ]
    .into_iter()
    .map(|mode| open_and_check(&layout, mode))
    .collect();
    let [strict, tolerate, repair] = &outcomes[..] else {
        unreachable!()
    };
    if let Some(s) = strict {
        let t = tolerate
            .as_ref()
            .expect("Strict opened but TolerateTornTail did not");
        assert_same(s, t, "Strict vs TolerateTornTail");
    }
    if let Some(t) = tolerate {
        let r = repair
            .as_ref()
            .expect("TolerateTornTail opened but Repair did not");
        if layout.index_placed {
            // TolerateTornTail trusts a sealed segment's index file; Repair scans it and may
            // cut damage the other mode only finds on read: Repair keeps a prefix.
            assert_eq!(
                r.first, t.first,
                "TolerateTornTail vs Repair: different first index"
            );
            assert!(r.next <= t.next, "Repair kept more than TolerateTornTail");
            if let (Some(x), Some(y)) = (&t.entries, &r.entries) {
                assert_eq!(
                    &x[..y.len().min(x.len())],
                    &y[..],
                    "Repair changed kept entries"
                );
            }
        } else {
            assert_same(t, r, "TolerateTornTail vs Repair");
        }
    }
    if let Some((first, entries)) = &layout.expected {
        let s = strict
            .as_ref()
            .expect("an undamaged log must open in Strict mode");
        assert_eq!(s.first, *first);
        let got = s.entries.as_ref().expect("an undamaged log must verify");
        assert_eq!(
            got.len(),
            entries.len(),
            "undamaged log lost or gained entries"
        );
        for (a, b) in got.iter().zip(entries) {
            assert_eq!(&a[..], &b[..]);
        }
    }
});

fn layout(data: &[u8]) -> Option<Layout> {
    let (&flags, rest) = data.split_first()?;
    let mut u = Unstructured::new(rest);
    let stride = u32::from(flags >> 6) + 1;
    let two = flags & 0b10 != 0;
    if flags & 0b100 == 0 {
        // Raw contents, optionally behind a valid header.
        let with_header = flags & 0b1 != 0;
        let first2: u64 = u.int_in_range(2..=64).ok()?;
        let split: u8 = u.arbitrary().ok()?;
        let contents = u.take_rest();
        let (a, b) = if two {
            contents.split_at(contents.len() * usize::from(split) / 256)
        } else {
            (contents, &[][..])
        };
        let file = |first: u64, body: &[u8]| {
            let mut bytes = Vec::new();
            if with_header {
                bytes.extend_from_slice(&format::encode_header(first));
            }
            bytes.extend_from_slice(body);
            (segment_path(first), bytes)
        };
        let mut files = vec![file(1, a)];
        if two {
            files.push(file(first2, b));
        }
        return Some(Layout {
            files,
            index_placed: false,
            expected: None,
            stride,
        });
    }

    // Built segments with known damage.
    let first1 = pick_first_index(&mut u).ok()?;
    let mut seg1 = build_segment(&mut u, first1).ok()?;
    let damage1: Damage = u.arbitrary().ok()?;
    let index1 = seg1.index_file(stride);
    let mut intact = seg1.damage(&damage1) == Applied::Intact;
    let mut entries = seg1.entries.clone();
    let mut files = vec![(segment_path(first1), seg1.bytes)];
    let mut index_placed = false;
    if two {
        // Mostly where the first segment ends; sometimes a little off (a gap or an overlap).
        let skew: i8 = if u.ratio(1, 4).ok()? {
            u.int_in_range(-2..=2).ok()?
        } else {
            0
        };
        let first2 = (first1 + seg1.entries.len() as u64).checked_add_signed(i64::from(skew));
        if let Some(first2) = first2.filter(|&f| f > first1) {
            let mut seg2 = build_segment(&mut u, first2).ok()?;
            let damage2: Damage = u.arbitrary().ok()?;
            intact &= seg2.damage(&damage2) == Applied::Intact && skew == 0;
            entries.extend(seg2.entries.iter().cloned());
            files.push((segment_path(first2), seg2.bytes));
            if flags & 0b1000 != 0 {
                // The index a writer would have written when sealing segment 1, maybe damaged.
                let mut index = index1;
                if flags & 0b1 != 0 {
                    let at: u16 = u.arbitrary().ok()?;
                    let mask: u8 = u.arbitrary().ok()?;
                    let at = usize::from(at) % index.len();
                    index[at] ^= mask.max(1);
                }
                files.push((index_path(first1), index));
                index_placed = true;
            }
        }
    }
    if flags & 0b1_0000 != 0 {
        // Leftovers of an interrupted roll or atomic write: removed on open.
        files.push((dir().join("spare.seg"), u.arbitrary::<Vec<u8>>().ok()?));
        files.push((dir().join("00000000000000000001.idx.tmp"), vec![1, 2, 3]));
    }
    // Indexes past the log's limit are refused on open (as corruption), like any bad bytes.
    let in_range = first1.saturating_add(entries.len() as u64) <= chatlog::log::INDEX_MAX + 1;
    let expected = (intact && in_range).then_some((first1, entries));
    Some(Layout {
        files,
        index_placed,
        expected,
        stride,
    })
}

fn config(mode: RecoveryMode, stride: u32) -> LogConfig {
    LogConfig {
        segment_size_bytes: SEGMENT_SIZE_BYTES,
        entry_size_bytes_max: ENTRY_SIZE_BYTES_MAX,
        // Small: the channel's capacity is allocated on every open.
        queue_depth_max: 64,
        index_stride: stride,
        durability: Durability::Batch,
        preallocate: Preallocate::Sparse,
        recovery: mode,
        ..LogConfig::default()
    }
}

/// What an opened log held.
#[derive(Debug)]
struct Opened {
    first: u64,
    next: u64,
    /// `None` if reading failed (only allowed when an index file was supplied).
    entries: Option<Vec<Bytes>>,
}

fn assert_same(a: &Opened, b: &Opened, what: &str) {
    assert_eq!(
        (a.first, a.next),
        (b.first, b.next),
        "{what}: different bounds"
    );
    if let (Some(x), Some(y)) = (&a.entries, &b.entries) {
        assert_eq!(x, y, "{what}: different entries");
    }
}

fn open_and_check(layout: &Layout, mode: RecoveryMode) -> Option<Opened> {
    let fs = FaultFs::new();
    for (path, bytes) in &layout.files {
        fs.put(path, bytes.clone());
    }
    let config = config(mode, layout.stride);
    let log = match Log::open_with(Arc::new(fs.clone()), dir(), config.clone()) {
        Ok(log) => log,
        Err(error) => {
            assert!(
                matches!(error, Error::Corruption { .. }),
                "{mode:?}: open without I/O faults failed with a non-corruption error: {error}"
            );
            return None;
        }
    };
    let first = log.first_index();
    let next = log.next_index();
    assert!(first <= next);
    let entries = match all_entries(&log) {
        Ok(entries) => Some(entries),
        Err(error) => {
            // A sealed segment with a valid index file is trusted without a scan, so its
            // damaged frames surface only on read. The `repair-verifies` feature asserts that
            // Repair mode catches them anyway (it does not yet: see README.md).
            let trusted = layout.index_placed
                && !(cfg!(feature = "repair-verifies") && mode == RecoveryMode::Repair);
            assert!(trusted, "{mode:?}: opened log does not verify: {error}");
            None
        }
    };
    assert!(
        entries
            .as_ref()
            .is_none_or(|e| e.len() as u64 == next - first)
    );
    let opened = Opened {
        first,
        next,
        entries,
    };

    // Recovery is idempotent and durable: a second open, after either kind of crash, finds
    // the same log and nothing left to cut.
    for crash in [Crash::Process, Crash::PowerLoss] {
        let again = Log::open_with(Arc::new(fs.crash(crash)), dir(), config.clone())
            .unwrap_or_else(|e| panic!("{mode:?}: reopen after {crash:?} failed: {e}"));
        let report = again.recovery_report();
        assert!(
            report.torn_tail.is_none() && report.repaired_at.is_none(),
            "{mode:?}: second open after {crash:?} still had work to do: {report:?}"
        );
        let second = Opened {
            first: again.first_index(),
            next: again.next_index(),
            entries: all_entries(&again).ok(),
        };
        assert_same(
            &opened,
            &second,
            &format!("{mode:?}: reopen after {crash:?}"),
        );
    }

    // The recovered log accepts appends, and they survive a reopen.
    if next == u64::MAX {
        return Some(opened);
    }
    let appended = log
        .append(Bytes::from_static(b"after recovery"))
        .unwrap_or_else(|e| panic!("{mode:?}: append after recovery failed: {e}"));
    assert_eq!(appended, next);
    assert_eq!(
        &log.read(appended).expect("read back")[..],
        b"after recovery"
    );
    let after = fs.crash(Crash::PowerLoss);
    drop(log);
    let again = Log::open_with(Arc::new(after), dir(), config)
        .unwrap_or_else(|e| panic!("{mode:?}: reopen after append failed: {e}"));
    assert_eq!(again.next_index(), next + 1);
    assert_eq!(
        &again.read(appended).expect("read after reopen")[..],
        b"after recovery"
    );
    Some(opened)
}
