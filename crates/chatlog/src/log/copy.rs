//! Copies of a log's prefix for checkpoints ([`Log::copy_through`]).
//!
//! A copy of entries `first..=through` costs the log almost nothing while it is taken:
//! sealed segments are immutable, so those wholly below `through` get a second name (a hard
//! link, or a copy where the file system has none); only the segment holding `through` is
//! copied, up to that entry's end, and that happens in [`LogCopy::finish`], which may run
//! while the log takes more appends. Entries at or below `through` are never rewritten in
//! place (the log appends; a purge only removes a sealed segment's name), so what `finish`
//! reads is what was there when the copy began.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Log, LogConfig, Preallocate};
use crate::error::{Error, Result};
use crate::io::{FileSystem, OpenMode};
use crate::segment::{Active, Sealed, name, recovery};

/// Where the bytes of the copy's last segment come from.
#[derive(Debug)]
enum Source {
    Sealed(Arc<Sealed>),
    Active(Arc<Active>),
}

/// The segment holding `through`, to be copied up to `end` by [`LogCopy::finish`].
#[derive(Debug)]
struct Partial {
    source: Source,
    first_index: u64,
    /// Byte offset just past entry `through`.
    end: u64,
}

/// A copy of a log's entries through some index, begun by [`Log::copy_through`]; the
/// directory is complete once [`LogCopy::finish`] returns.
///
/// The sealed segments of the copy may share their storage with the original log (hard
/// links): the directory is meant to be read and copied elsewhere (a snapshot packs it), not
/// opened and written in place.
#[derive(Debug)]
#[must_use = "the copy is incomplete until `finish` runs"]
pub struct LogCopy {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    through: u64,
    segment_size_bytes: u64,
    partial: Option<Partial>,
}

/// Bytes copied per read and write when a file is copied rather than linked.
const COPY_CHUNK_BYTES: usize = 1 << 20;

impl Log {
    /// Begins a copy of entries `first_index()..=through` into `dest` (created; it must not
    /// hold a log already). `through` must be an acknowledged entry, or `first_index() - 1`
    /// for an empty copy starting where this log starts.
    ///
    /// Cheap while it runs: whole sealed segments below `through` are hard-linked (copied on
    /// a file system without links, or when a purge removed the name meanwhile); the
    /// segment holding `through` is copied by [`LogCopy::finish`], which needs no pause in
    /// appends. Entries at or below `through` must not be truncated before `finish` returns
    /// ([`Log::truncate_from`]); `finish` checks every copied frame and fails if they were.
    pub fn copy_through(&self, dest: &Path, through: u64) -> Result<LogCopy> {
        // The bound before the view (as in `read`): this view covers every index below it.
        let next = self.next_index();
        let view = self.shared.view();
        let first = view.first_index();
        if through
            .checked_add(1)
            .is_none_or(|end| end < first || end > next)
        {
            return Err(Error::OutOfRange {
                index: through,
                first,
                next,
            });
        }
        self.fs
            .create_dir_all(dest)
            .map_err(|e| Error::io("create directory", dest, e))?;
        let mut copy = LogCopy {
            fs: self.fs.clone(),
            dir: dest.to_path_buf(),
            through,
            segment_size_bytes: self.config.segment_size_bytes,
            partial: None,
        };
        if through < first {
            // Nothing to copy: an empty log that starts where this one does.
            let config = LogConfig {
                first_index: first,
                preallocate: Preallocate::Sparse,
                ..self.config.clone()
            };
            Log::open_with(self.fs.clone(), dest, config)?.close()?;
            return Ok(copy);
        }
        for seg in &view.sealed {
            if seg.first_index > through {
                break;
            }
            if through < seg.end_index() {
                // The segment holding `through` is always copied, never linked, so the
                // copy's last segment (the one a log opened on it would append to) is its own.
                let end = if through + 1 < seg.end_index() {
                    seg.offset_of(through + 1)? as u64
                } else {
                    seg.map.len() as u64
                };
                copy.partial = Some(Partial {
                    source: Source::Sealed(seg.clone()),
                    first_index: seg.first_index,
                    end,
                });
                return Ok(copy);
            }
            copy.link_sealed(&self.dir, seg)?;
        }
        let active = view.active.clone();
        let k = through - active.first_index;
        let (_, end) = active.place(k).ok_or_else(|| Error::Corruption {
            segment: active.path.clone(),
            offset: 0,
            reason: format!("entry {through} is acknowledged but not in the active segment"),
        })?;
        copy.partial = Some(Partial {
            first_index: active.first_index,
            source: Source::Active(active),
            end: end as u64,
        });
        Ok(copy)
    }
}

impl LogCopy {
    /// Gives a sealed segment (and its index file) a name in the copy.
    fn link_sealed(&self, src_dir: &Path, seg: &Arc<Sealed>) -> Result<()> {
        let to = name::segment(&self.dir, seg.first_index);
        if self.fs.hard_link(&seg.path, &to).is_err() {
            // No links here, or the name was purged meanwhile: the mapping still holds the
            // bytes.
            let source = Source::Sealed(seg.clone());
            return self.write_file(&to, &source, seg.map.len() as u64);
        }
        let index_to = name::index(&self.dir, seg.first_index);
        // Without its index file the copy's open scans the segment and writes one.
        let _ = self
            .fs
            .hard_link(&name::index(src_dir, seg.first_index), &index_to);
        Ok(())
    }

    /// Creates `path` holding bytes `[0, end)` of `source`, pads it sparsely to the segment
    /// size and syncs it.
    fn write_file(&self, path: &Path, source: &Source, end: u64) -> Result<()> {
        let file = self
            .fs
            .open(path, OpenMode::CreateTruncate)
            .map_err(|e| Error::io("create", path, e))?;
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        let mut at = 0u64;
        while at < end {
            let n = (end - at).min(COPY_CHUNK_BYTES as u64) as usize;
            let chunk = match source {
                Source::Sealed(seg) => &seg.map[at as usize..at as usize + n],
                Source::Active(active) => {
                    active
                        .file
                        .read_at(&mut buf[..n], at)
                        .map_err(|e| Error::io("read", &active.path, e))?;
                    &buf[..n]
                }
            };
            file.write_at(chunk, at)
                .map_err(|e| Error::io("write", path, e))?;
            at += n as u64;
        }
        file.set_len(end.max(self.segment_size_bytes))
            .map_err(|e| Error::io("set_len", path, e))?;
        file.sync_data()
            .map_err(|e| Error::io("fdatasync", path, e))
    }

    /// Copies the segment holding `through` up to that entry, checks every copied frame,
    /// and makes the copy durable.
    pub fn finish(mut self) -> Result<()> {
        if let Some(partial) = self.partial.take() {
            let path = name::segment(&self.dir, partial.first_index);
            self.write_file(&path, &partial.source, partial.end)?;
            self.check(&path, partial.first_index, partial.end)?;
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("fsync directory", &self.dir, e))
    }

    /// The copied segment must hold exactly the entries `first_index..=through`, intact.
    fn check(&self, path: &Path, first_index: u64, end: u64) -> Result<()> {
        let file = self
            .fs
            .open(path, OpenMode::ReadWrite)
            .map_err(|e| Error::io("open", path, e))?;
        let bytes = file.map(end).map_err(|e| Error::io("map", path, e))?;
        let scan = recovery::scan(&bytes, first_index);
        let entries = scan.offsets.len() as u64;
        if scan.data_end as u64 != end || first_index + entries != self.through + 1 {
            return Err(Error::Corruption {
                segment: path.to_path_buf(),
                offset: scan.data_end as u64,
                reason: format!(
                    "copy of entries {first_index}..={} holds {entries} intact entries and \
                     ends at byte {} instead of {end} (truncated while copied?)",
                    self.through, scan.data_end
                ),
            });
        }
        Ok(())
    }
}
