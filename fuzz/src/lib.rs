//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! Random bytes almost never hold a frame with a valid CRC, so the targets that exercise
//! recovery also build *valid* segments from the fuzz input ([`build_segment`]) and then damage
//! them in one known way ([`Damage`]). Knowing the damage gives an oracle: a torn last batch
//! must never be reported as corruption, and damage to an earlier batch must never be cut
//! silently as a torn tail.

use std::ops::Range;
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Result, Unstructured};
use bytes::Bytes;
use chatlog::segment::format::{self, FrameBody, HEADER_BYTES};
use chatlog::segment::recovery::{Scan, Tail};

/// Largest entry the segment builder writes (keeps frames small so a few fit in a segment).
pub const BUILT_ENTRY_BYTES_MAX: usize = 200;
/// Most batches in one built segment.
pub const BUILT_BATCHES_MAX: usize = 8;
/// Most entries in one built batch.
pub const BUILT_BATCH_ENTRIES_MAX: usize = 6;
/// Most zero bytes of "preallocated space" after the frames of a built segment.
pub const BUILT_PADDING_BYTES_MAX: usize = 1024;

/// A segment built from valid batches, before any damage was applied.
#[derive(Debug, Clone)]
pub struct Built {
    /// The file contents (after damage, once [`Built::damage`] ran).
    pub bytes: Vec<u8>,
    /// Index in the header and in the file name.
    pub first_index: u64,
    /// Byte offset of every frame, in order.
    pub frame_starts: Vec<usize>,
    /// The data of every frame, in order.
    pub entries: Vec<Vec<u8>>,
    /// Frame numbers (positions in `frame_starts`) of each batch.
    pub batches: Vec<Range<usize>>,
    /// Offset just past the last frame.
    pub data_end: usize,
}

/// Deterministic entry contents: distinct per (seed, position), cheap to describe in the input.
pub fn entry_bytes(seed: u8, salt: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (seed as u64)
                .wrapping_mul(0x9E37_79B9)
                .wrapping_add(salt.wrapping_mul(131))
                .wrapping_add(i as u64 * 7) as u8
        })
        .collect()
}

/// A first log index: mostly small, sometimes any value, sometimes right below `u64::MAX`.
pub fn pick_first_index(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 => u.arbitrary::<u64>()?.max(1),
        1 => u64::MAX - u.int_in_range(0..=16)?,
        _ => u.int_in_range(1..=300)?,
    })
}

/// Builds a valid segment starting at `first_index` from batches described by `u`.
pub fn build_segment(u: &mut Unstructured<'_>, first_index: u64) -> Result<Built> {
    let mut bytes = format::encode_header(first_index).to_vec();
    let mut frame_starts = Vec::new();
    let mut entries = Vec::new();
    let mut batches = Vec::new();
    let batch_count = u.int_in_range(0..=BUILT_BATCHES_MAX)?;
    let mut index = first_index;
    for _ in 0..batch_count {
        let n = u.int_in_range(1..=BUILT_BATCH_ENTRIES_MAX)?;
        let batch_first = index;
        let start = frame_starts.len();
        for _ in 0..n {
            // Stop before the index would overflow: the builder only writes what a writer could.
            if index == u64::MAX {
                break;
            }
            let len = u.int_in_range(0..=BUILT_ENTRY_BYTES_MAX)?;
            let seed: u8 = u.arbitrary()?;
            let data = entry_bytes(seed, index, len);
            frame_starts.push(bytes.len());
            format::encode_frame(
                &mut bytes,
                &FrameBody {
                    index,
                    batch_offset: (index - batch_first) as u32,
                    data: &data,
                },
            );
            entries.push(data);
            index += 1;
        }
        if frame_starts.len() > start {
            batches.push(start..frame_starts.len());
        }
    }
    let data_end = bytes.len();
    let padding = u.int_in_range(0..=BUILT_PADDING_BYTES_MAX)?;
    bytes.resize(data_end + padding, 0);
    Ok(Built {
        bytes,
        first_index,
        frame_starts,
        entries,
        batches,
        data_end,
    })
}

/// One kind of damage applied to a built segment.
#[derive(Debug, Clone, Arbitrary)]
pub enum Damage {
    /// Left as written.
    None,
    /// XOR `mask` (made non-zero) into byte `byte` of frame `frame` (media corruption).
    Flip { frame: u16, byte: u16, mask: u8 },
    /// Zero everything from a point inside the last batch on (a write that stopped part-way).
    TearLastBatch { at: u16 },
    /// Zero a range inside the last batch (a page of an unsynced write that never landed).
    HoleInLastBatch { at: u16, len: u16 },
    /// Overwrite bytes anywhere in the file.
    Scribble { at: u16, bytes: Vec<u8> },
    /// Cut the file short.
    Shorten { at: u16 },
}

/// What damage was actually applied, in terms the oracle can check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Nothing changed.
    Intact,
    /// Frame `frame` of batch `batch` is damaged; nothing else changed.
    FrameDamaged { frame: usize, batch: usize },
    /// Only bytes of the last batch were zeroed.
    LastBatchZeroed,
    /// Anything else: no oracle.
    Unknown,
}

impl Built {
    /// Number of entries written.
    pub fn entry_count(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Applies `damage`; returns what it amounts to.
    pub fn damage(&mut self, damage: &Damage) -> Applied {
        let last_batch = self
            .batches
            .last()
            .map(|b| self.frame_starts[b.start]..self.data_end);
        match *damage {
            Damage::None => Applied::Intact,
            Damage::Flip { frame, byte, mask } => {
                if self.frame_starts.is_empty() {
                    return Applied::Intact;
                }
                let frame = frame as usize % self.frame_starts.len();
                let start = self.frame_starts[frame];
                let end = self
                    .frame_starts
                    .get(frame + 1)
                    .copied()
                    .unwrap_or(self.data_end);
                let at = start + byte as usize % (end - start);
                self.bytes[at] ^= mask.max(1);
                let batch = self
                    .batches
                    .iter()
                    .position(|b| b.contains(&frame))
                    .expect("every frame is in a batch");
                Applied::FrameDamaged { frame, batch }
            }
            Damage::TearLastBatch { at } => {
                let Some(range) = last_batch else {
                    return Applied::Intact;
                };
                let from = range.start + 1 + at as usize % range.len().max(1);
                let from = from.min(range.end);
                self.bytes[from..range.end].fill(0);
                Applied::LastBatchZeroed
            }
            Damage::HoleInLastBatch { at, len } => {
                let Some(range) = last_batch else {
                    return Applied::Intact;
                };
                let from = range.start + at as usize % range.len();
                let to = (from + 1 + len as usize).min(range.end);
                self.bytes[from..to].fill(0);
                Applied::LastBatchZeroed
            }
            Damage::Scribble { at, ref bytes } => {
                if self.bytes.is_empty() || bytes.is_empty() {
                    return Applied::Intact;
                }
                let from = at as usize % self.bytes.len();
                let to = (from + bytes.len()).min(self.bytes.len());
                self.bytes[from..to].copy_from_slice(&bytes[..to - from]);
                Applied::Unknown
            }
            Damage::Shorten { at } => {
                let keep = at as usize % (self.bytes.len() + 1);
                self.bytes.truncate(keep);
                Applied::Unknown
            }
        }
    }

    /// The sparse index file a writer would have written for this (undamaged) segment.
    pub fn index_file(&self, stride: u32) -> Vec<u8> {
        let offsets = self
            .frame_starts
            .iter()
            .step_by(stride as usize)
            .map(|&o| o as u32)
            .collect();
        format::encode_index(&format::SparseIndex {
            first_index: self.first_index,
            entry_count: self.entry_count(),
            data_end: self.data_end as u64,
            stride,
            offsets,
        })
    }
}

/// Checks what the oracle knows about scanning a built segment after `applied` damage.
pub fn check_scan_oracle(built: &Built, applied: &Applied, scan: &Scan) {
    let last_batch = built.batches.len().checked_sub(1);
    match *applied {
        Applied::Intact => {
            assert_eq!(scan.tail, Tail::Clean, "intact segment not clean");
            assert_eq!(scan.data_end, built.data_end);
            let starts: Vec<usize> = scan.offsets.iter().map(|&o| o as usize).collect();
            assert_eq!(starts, built.frame_starts, "intact segment lost frames");
        }
        Applied::FrameDamaged { frame, batch } => {
            assert_eq!(
                scan.offsets.len(),
                frame,
                "scan must stop exactly at the damaged frame"
            );
            assert_eq!(scan.data_end, built.frame_starts[frame]);
            if Some(batch) == last_batch {
                assert!(
                    matches!(scan.tail, Tail::Torn { .. }),
                    "damage in the last batch must read as torn, got {:?}",
                    scan.tail
                );
            } else {
                assert!(
                    matches!(scan.tail, Tail::Corrupt { .. }),
                    "damage before the last batch must read as corruption, got {:?}",
                    scan.tail
                );
            }
        }
        Applied::LastBatchZeroed => {
            assert!(
                !matches!(scan.tail, Tail::Corrupt { .. }),
                "a torn last batch was read as corruption: {:?}",
                scan.tail
            );
            let before_last = built.batches.last().map_or(0, |b| b.start);
            assert!(
                scan.offsets.len() >= before_last,
                "a torn last batch cost earlier batches"
            );
        }
        Applied::Unknown => {}
    }
}

/// Invariants of any scan result, whatever the bytes.
pub fn check_scan_invariants(buf: &[u8], first_index: u64, scan: &Scan) {
    assert!(
        scan.data_end <= scan.nonzero_end,
        "data_end past nonzero_end"
    );
    assert!(scan.nonzero_end <= buf.len().max(HEADER_BYTES));
    let mut expected_at = HEADER_BYTES.min(buf.len());
    for (k, &offset) in scan.offsets.iter().enumerate() {
        let offset = offset as usize;
        assert_eq!(offset, expected_at, "frames are not back to back");
        let frame = format::check_frame(buf, offset)
            .unwrap_or_else(|e| panic!("scan offset {offset} does not decode: {e:?}"));
        assert_eq!(
            frame.index,
            first_index.wrapping_add(k as u64),
            "frame index out of order"
        );
        assert!(frame.end > offset, "offsets must increase");
        expected_at = frame.end;
    }
    assert_eq!(
        scan.data_end, expected_at,
        "data_end is not the end of the last frame"
    );
    match &scan.tail {
        Tail::Clean => {
            assert_eq!(scan.nonzero_end, scan.data_end);
            assert!(
                buf.get(scan.data_end..)
                    .unwrap_or(&[])
                    .iter()
                    .all(|b| *b == 0),
                "clean tail holds non-zero bytes"
            );
        }
        Tail::Torn { offset, .. } => {
            assert_eq!(*offset, scan.data_end);
            assert!(scan.nonzero_end > scan.data_end);
        }
        Tail::Corrupt {
            offset,
            later_frames,
            ..
        } => {
            assert_eq!(*offset, scan.data_end);
            assert!(scan.nonzero_end > scan.data_end);
            assert!(
                *later_frames >= 1,
                "corruption claimed without a later frame"
            );
        }
    }
}

/// Every entry of an open log, in order, or the first error met.
pub fn all_entries(log: &chatlog::Log) -> chatlog::Result<Vec<Bytes>> {
    log.iter_from(log.first_index())
        .map(|item| item.map(|(_, data)| data))
        .collect()
}

/// Path of the segment file starting at `first` in the fuzz log directory.
pub fn segment_path(first: u64) -> PathBuf {
    chatlog::segment::name::segment(dir(), first)
}

/// Path of the index file of the segment starting at `first` in the fuzz log directory.
pub fn index_path(first: u64) -> PathBuf {
    chatlog::segment::name::index(dir(), first)
}

/// Directory all fuzz targets put their log in (inside a `FaultFs`, never on disk).
pub fn dir() -> &'static Path {
    Path::new("/fuzz/log")
}

/// The server's token verification (`chatlog-server/src/auth.rs`), compiled here from its
/// source file instead of through a dependency on `chatlog-server`: that crate brings some 170
/// crates (axum, hyper, reqwest, tokio's runtime, clap, metrics, tracing-subscriber, ...) that
/// no target runs, and they were most of the fuzz build's time (see `scripts/fuzz-smoke`).
/// This module and [`server_protocol`] are pure: they use only `chatlog`'s engine types,
/// serde, `jsonwebtoken`, `rand` and `hex`, never `crate::`. If one of them starts to, this
/// stops compiling; depend on `chatlog-server` again then.
#[path = "../../crates/chatlog-server/src/auth.rs"]
pub mod server_auth;
/// The server's client-frame parser and encoders (`chatlog-server/src/protocol.rs`); see
/// [`server_auth`].
#[path = "../../crates/chatlog-server/src/protocol.rs"]
pub mod server_protocol;
/// The server's inbound WebSocket filter (`chatlog-server/src/oversize.rs`: messages above the
/// size limit dropped as they arrive); it uses only `tokio`'s I/O traits and `rand`.
#[path = "../../crates/chatlog-server/src/oversize.rs"]
pub mod server_oversize;

/// `CHATLOG_FUZZ_TRACE=1` makes a target print what it does (to read a crash's input).
pub fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("CHATLOG_FUZZ_TRACE").is_some())
}

/// A fresh directory on a real file system for one input (RocksDB, which does not run on
/// `FaultFs`), removed when dropped. Unique per process and input, so parallel fuzzing jobs
/// (`-jobs`, `-fork`) do not share one. In `/dev/shm` when there is one: RocksDB fsyncs its
/// manifest and directory on every open, and on tmpfs that costs nothing (`engine_model` ran
/// twice as fast there as on the development machine's disk).
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `</dev/shm or the temp dir>/chatlog-fuzz-<name>-<pid>-<n>` (empty).
    pub fn new(name: &str) -> ScratchDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = base.join(format!("chatlog-fuzz-{name}-{}-{n}", std::process::id()));
        if n == 0 {
            remove_stale_scratch_dirs(&base);
        }
        // Left over by an earlier process with the same pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the scratch directory");
        ScratchDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// Removes the scratch directories of processes that are gone: a crashed input's, and those a
/// target keeps for the whole process (statics are never dropped).
fn remove_stale_scratch_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("chatlog-fuzz-")) else {
            continue;
        };
        // `<name>-<pid>-<n>`: the pid is the second field from the end.
        let pid = rest.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
