//! Opening a log directory: find segments, trust sealed ones through their index files, scan
//! only the last (active) segment, and cut or report bad bytes per [`RecoveryMode`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::io::{FileHandle, FileSystem, OpenMode};
use crate::log::writer::prepare_spare;
use crate::log::{INDEX_MAX, LogConfig, RecoveryMode, View};
use crate::segment::format::{self, HEADER_BYTES, SparseIndex};
use crate::segment::recovery::{self, Tail};
use crate::segment::{Active, ActiveFrames, Sealed, name, sparse_offsets};

/// What recovery found and did on open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments found.
    pub segments: usize,
    /// Bytes scanned (the active segment, and sealed segments whose index file was missing).
    pub scanned_bytes: u64,
    /// A torn, unacknowledged tail that was cut: (segment, offset, bytes zeroed).
    pub torn_tail: Option<(PathBuf, u64, u64)>,
    /// In [`RecoveryMode::Repair`]: where the log was cut because of corruption.
    pub repaired_at: Option<(PathBuf, u64)>,
    /// In [`RecoveryMode::Repair`]: bytes dropped by the cut (including removed segments).
    pub dropped_bytes: u64,
    /// In [`RecoveryMode::Repair`]: valid entries known to have been dropped by the cut (at
    /// least this many; entries inside damaged bytes cannot be counted).
    pub dropped_entries: u64,
    /// In [`RecoveryMode::Repair`]: segment files removed entirely.
    pub removed_segments: Vec<PathBuf>,
}

pub(crate) struct Recovered {
    pub(crate) view: View,
    pub(crate) next_index: u64,
    /// Offset just past the last frame of the active segment.
    pub(crate) active_end: u64,
    pub(crate) report: RecoveryReport,
}

/// Drops everything from byte `at` on, durably: shrinks the file to `at`, grows it back to its
/// length (the hole reads as zeros, keeping the segment's size) and syncs. A length change is a
/// single metadata operation, so a crash leaves either the old bytes or none of them, never
/// zeros followed by old frames (which recovery would rightly read as corruption).
pub(crate) fn cut_file(file: &dyn FileHandle, path: &Path, at: u64) -> Result<()> {
    let len = file.len().map_err(|e| Error::io("stat", path, e))?;
    file.set_len(at)
        .map_err(|e| Error::io("set_len", path, e))?;
    file.set_len(len.max(at))
        .map_err(|e| Error::io("set_len", path, e))?;
    file.sync_data()
        .map_err(|e| Error::io("fdatasync", path, e))
}

/// Writes `bytes` to `path` atomically: temp file, sync, rename, sync directory.
pub(crate) fn write_atomic(
    fs: &dyn FileSystem,
    dir: &Path,
    path: &Path,
    bytes: &[u8],
) -> Result<()> {
    let tmp = name::temporary(path);
    let file = fs
        .open(&tmp, OpenMode::CreateTruncate)
        .map_err(|e| Error::io("create", &tmp, e))?;
    file.write_at(bytes, 0)
        .map_err(|e| Error::io("write", &tmp, e))?;
    file.sync_data()
        .map_err(|e| Error::io("fdatasync", &tmp, e))?;
    fs.rename(&tmp, path)
        .map_err(|e| Error::io("rename", &tmp, e))?;
    fs.sync_dir(dir)
        .map_err(|e| Error::io("fsync directory", dir, e))
}

fn corruption(path: &Path, offset: u64, reason: impl Into<String>) -> Error {
    Error::Corruption {
        segment: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

struct Found {
    first: u64,
    path: PathBuf,
    file: Arc<dyn FileHandle>,
    len: u64,
}

pub(crate) fn recover(fs: &dyn FileSystem, dir: &Path, config: &LogConfig) -> Result<Recovered> {
    let mut report = RecoveryReport::default();
    let mut removed_any = false;
    let mut firsts = Vec::new();
    let names = fs
        .list_dir(dir)
        .map_err(|e| Error::io("list directory", dir, e))?;
    for n in &names {
        match name::parse(n) {
            name::Entry::Segment(first) => firsts.push(first),
            name::Entry::Leftover => {
                let path = dir.join(n);
                fs.remove_file(&path)
                    .map_err(|e| Error::io("remove", &path, e))?;
                removed_any = true;
            }
            name::Entry::Index(_) | name::Entry::Other => {}
        }
    }
    firsts.sort_unstable();
    if firsts.is_empty() {
        // A new log: its first (empty) segment, preallocated like every other.
        let spare = dir.join(name::SPARE);
        let path = name::segment(dir, config.first_index);
        let file = prepare_spare(fs, dir, config.segment_size_bytes, config.preallocate)?;
        file.write_at(&format::encode_header(config.first_index), 0)
            .map_err(|e| Error::io("write", &spare, e))?;
        file.sync_data()
            .map_err(|e| Error::io("fdatasync", &spare, e))?;
        fs.rename(&spare, &path)
            .map_err(|e| Error::io("rename", &spare, e))?;
        fs.sync_dir(dir)
            .map_err(|e| Error::io("fsync directory", dir, e))?;
        firsts.push(config.first_index);
    } else if removed_any {
        fs.sync_dir(dir)
            .map_err(|e| Error::io("fsync directory", dir, e))?;
    }

    let mut found = Vec::with_capacity(firsts.len());
    for &first in &firsts {
        let path = name::segment(dir, first);
        let file = fs
            .open(&path, OpenMode::ReadWrite)
            .map_err(|e| Error::io("open", &path, e))?;
        let len = file.len().map_err(|e| Error::io("stat", &path, e))?;
        let mut head = [0u8; HEADER_BYTES];
        if len < HEADER_BYTES as u64 {
            return Err(corruption(&path, 0, "segment shorter than its header"));
        }
        file.read_at(&mut head, 0)
            .map_err(|e| Error::io("read", &path, e))?;
        let header =
            format::decode_header(&head).map_err(|e| corruption(&path, 0, format!("{e:?}")))?;
        if first > INDEX_MAX {
            return Err(corruption(
                &path,
                16,
                format!("first index {first} is above the log's index limit {INDEX_MAX}"),
            ));
        }
        if header.first_index != first {
            return Err(corruption(
                &path,
                16,
                format!(
                    "header says first index {} but the name says {first}",
                    header.first_index
                ),
            ));
        }
        found.push(Found {
            first,
            path,
            file,
            len,
        });
    }
    report.segments = found.len();

    let mut sealed = Vec::new();
    let mut i = 0;
    // Sealed segments: trust a valid index file; otherwise scan (and write the index).
    while i + 1 < found.len() {
        let seg = &found[i];
        let next_first = found[i + 1].first;
        match load_sealed(fs, dir, seg, next_first, config, &mut report)? {
            Ok(s) => {
                sealed.push(Arc::new(s));
                i += 1;
            }
            Err(Cut { offset, reason }) => {
                if config.recovery != RecoveryMode::Repair {
                    return Err(corruption(&seg.path, offset, reason));
                }
                // Cut here: this segment becomes the last one.
                // The scan of the (now last) segment below zeroes and counts what follows.
                report.repaired_at = Some((seg.path.clone(), offset));
                for later in found.drain(i + 1..).rev() {
                    report.dropped_bytes += later.len;
                    fs.remove_file(&later.path)
                        .map_err(|e| Error::io("remove", &later.path, e))?;
                    let _ = fs.remove_file(&name::index(dir, later.first));
                    report.removed_segments.push(later.path);
                }
                fs.sync_dir(dir)
                    .map_err(|e| Error::io("fsync directory", dir, e))?;
            }
        }
    }

    // The last segment: always scanned; its index file, if any, is stale.
    let last = found.pop().expect("at least one segment");
    let stale_index = name::index(dir, last.first);
    if names.iter().any(|n| dir.join(n) == stale_index) {
        fs.remove_file(&stale_index)
            .map_err(|e| Error::io("remove", &stale_index, e))?;
        fs.sync_dir(dir)
            .map_err(|e| Error::io("fsync directory", dir, e))?;
    }
    let bytes = last
        .file
        .map(last.len)
        .map_err(|e| Error::io("map", &last.path, e))?;
    report.scanned_bytes += last.len;
    let scan = recovery::scan(&bytes, last.first);
    drop(bytes);
    match &scan.tail {
        Tail::Clean => {}
        Tail::Torn { offset, reason } => {
            if config.recovery == RecoveryMode::Strict {
                return Err(corruption(
                    &last.path,
                    *offset as u64,
                    format!("torn tail: {reason}"),
                ));
            }
            cut_file(last.file.as_ref(), &last.path, *offset as u64)?;
            report.torn_tail = Some((
                last.path.clone(),
                *offset as u64,
                (scan.nonzero_end - offset) as u64,
            ));
        }
        Tail::Corrupt {
            offset,
            reason,
            later_frames,
        } => {
            if config.recovery != RecoveryMode::Repair {
                return Err(corruption(&last.path, *offset as u64, reason.clone()));
            }
            cut_file(last.file.as_ref(), &last.path, *offset as u64)?;
            report.repaired_at = Some((last.path.clone(), *offset as u64));
            report.dropped_bytes += (scan.nonzero_end - offset) as u64;
            report.dropped_entries += later_frames;
        }
    }
    let entry_count = scan.offsets.len() as u64;
    let active_end = scan.data_end as u64;
    let active = Active {
        path: last.path,
        first_index: last.first,
        file: last.file,
        frames: RwLock::new(ActiveFrames {
            offsets: scan.offsets,
            data_end: scan.data_end as u32,
        }),
    };
    let next_index = last.first + entry_count;
    Ok(Recovered {
        view: View {
            sealed,
            active: Arc::new(active),
        },
        next_index,
        active_end,
        report,
    })
}

/// Why a sealed segment cannot be used as is: the log must be cut at `offset`.
struct Cut {
    offset: u64,
    reason: String,
}

fn load_sealed(
    fs: &dyn FileSystem,
    dir: &Path,
    seg: &Found,
    next_first: u64,
    config: &LogConfig,
    report: &mut RecoveryReport,
) -> Result<Result<Sealed, Cut>> {
    // Repair trusts nothing: it scans every sealed segment so damage is found and cut.
    let trusted_index = match config.recovery {
        RecoveryMode::Repair => None,
        _ => read_index(fs, dir, seg.first),
    };
    if let Some(index) = trusted_index {
        let consistent = index.first_index == seg.first
            && index.data_end <= seg.len
            && seg.first + index.entry_count == next_first;
        if consistent {
            let map = seg
                .file
                .map(index.data_end)
                .map_err(|e| Error::io("map", &seg.path, e))?;
            let points = seg
                .file
                .map_random(index.data_end)
                .map_err(|e| Error::io("map", &seg.path, e))?;
            return Ok(Ok(Sealed {
                path: seg.path.clone(),
                first_index: seg.first,
                entry_count: index.entry_count,
                map,
                points,
                stride: index.stride,
                offsets: index.offsets,
            }));
        }
    }
    // No usable index: scan the whole segment. Everything in a sealed segment was durable
    // before the next segment was created, so anything but a clean end is corruption.
    let whole = seg
        .file
        .map(seg.len)
        .map_err(|e| Error::io("map", &seg.path, e))?;
    report.scanned_bytes += seg.len;
    let scan = recovery::scan(&whole, seg.first);
    let end_index = seg.first + scan.offsets.len() as u64;
    let cut = match scan.tail {
        Tail::Clean if end_index == next_first => None,
        Tail::Clean => Some(Cut {
            offset: scan.data_end as u64,
            reason: format!(
                "sealed segment ends at index {end_index} but the next segment starts at {next_first}"
            ),
        }),
        Tail::Torn { offset, reason } | Tail::Corrupt { offset, reason, .. } => Some(Cut {
            offset: offset as u64,
            reason,
        }),
    };
    if let Some(cut) = cut {
        return Ok(Err(cut));
    }
    let points = seg
        .file
        .map_random(scan.data_end as u64)
        .map_err(|e| Error::io("map", &seg.path, e))?;
    let sealed = Sealed {
        path: seg.path.clone(),
        first_index: seg.first,
        entry_count: scan.offsets.len() as u64,
        map: whole.slice(..scan.data_end),
        points,
        stride: config.index_stride,
        offsets: sparse_offsets(&scan.offsets, config.index_stride),
    };
    let index_path = name::index(dir, seg.first);
    write_atomic(
        fs,
        dir,
        &index_path,
        &format::encode_index(&sealed.sparse_index()),
    )?;
    Ok(Ok(sealed))
}

fn read_index(fs: &dyn FileSystem, dir: &Path, first: u64) -> Option<SparseIndex> {
    let path = name::index(dir, first);
    let file = fs.open(&path, OpenMode::ReadWrite).ok()?;
    let len = usize::try_from(file.len().ok()?).ok()?;
    let mut buf = vec![0u8; len];
    file.read_at(&mut buf, 0).ok()?;
    format::decode_index(&buf).ok()
}
