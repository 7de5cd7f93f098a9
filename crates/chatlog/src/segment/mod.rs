//! Segment files: format, names, recovery, and the in-memory handles readers use.

pub mod format;
pub mod name;
pub mod recovery;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::io::FileHandle;
use format::{FRAME_HEADER_BYTES, Frame, SparseIndex};

/// A sealed segment: immutable, memory-mapped, with a sparse offset index.
#[derive(Debug)]
pub struct Sealed {
    pub(crate) path: PathBuf,
    pub(crate) first_index: u64,
    pub(crate) entry_count: u64,
    /// The mapped bytes `[0, data_end)`, read with the kernel's read-ahead: iterators.
    pub(crate) map: Bytes,
    /// The same bytes mapped for single-entry reads ([`FileHandle::map_random`]): `read`.
    pub(crate) points: Bytes,
    pub(crate) stride: u32,
    pub(crate) offsets: Vec<u32>,
}

impl Sealed {
    pub(crate) fn end_index(&self) -> u64 {
        self.first_index + self.entry_count
    }

    pub(crate) fn sparse_index(&self) -> SparseIndex {
        SparseIndex {
            first_index: self.first_index,
            entry_count: self.entry_count,
            data_end: self.map.len() as u64,
            stride: self.stride,
            offsets: self.offsets.clone(),
        }
    }

    /// Byte offset of entry `index`: one sparse lookup, then at most `stride - 1` frame
    /// headers skipped inside the mapping.
    pub(crate) fn offset_of(&self, index: u64) -> Result<usize> {
        self.offset_in(&self.map, index)
    }

    fn offset_in(&self, map: &[u8], index: u64) -> Result<usize> {
        debug_assert!(index >= self.first_index && index < self.end_index());
        let k = index - self.first_index;
        let stride = u64::from(self.stride);
        let mut at = self.offsets[(k / stride) as usize] as usize;
        for _ in 0..k % stride {
            let len = map
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
                .ok_or_else(|| self.corrupt(at, "frame header beyond data end".into()))?;
            at += FRAME_HEADER_BYTES + len;
        }
        Ok(at)
    }

    /// Checks and decodes the frame at `at`, which must hold `index`.
    pub(crate) fn frame_at(&self, at: usize, index: u64) -> Result<Frame> {
        self.frame_in(&self.map, at, index)
    }

    fn frame_in(&self, map: &[u8], at: usize, index: u64) -> Result<Frame> {
        let frame = format::check_frame(map, at).map_err(|e| self.corrupt(at, format!("{e:?}")))?;
        if frame.index != index {
            return Err(self.corrupt(
                at,
                format!(
                    "frame holds index {} where {index} was expected",
                    frame.index
                ),
            ));
        }
        Ok(frame)
    }

    /// Reads entry `index` through the mapping for single-entry reads.
    pub(crate) fn read(&self, index: u64) -> Result<Bytes> {
        let at = self.offset_in(&self.points, index)?;
        let frame = self.frame_in(&self.points, at, index)?;
        Ok(self.points.slice(frame.data))
    }

    fn corrupt(&self, offset: usize, reason: String) -> Error {
        Error::Corruption {
            segment: self.path.clone(),
            offset: offset as u64,
            reason,
        }
    }
}

/// Offsets of the visible frames of the active segment.
#[derive(Debug, Default)]
pub(crate) struct ActiveFrames {
    /// Offset of each visible entry.
    pub(crate) offsets: Vec<u32>,
    /// Offset just past the last visible entry.
    pub(crate) data_end: u32,
}

/// The segment being appended to; read with positional reads.
#[derive(Debug)]
pub struct Active {
    pub(crate) path: PathBuf,
    pub(crate) first_index: u64,
    pub(crate) file: Arc<dyn FileHandle>,
    pub(crate) frames: RwLock<ActiveFrames>,
}

impl Active {
    /// Reads entry `index`, or `None` if it is not (or no longer) in this segment.
    ///
    /// A truncate may cut the entry while it is being read (the writer drops it from
    /// `frames` before it cuts the file). A read that fails is therefore checked against
    /// `frames` again: if the entry is gone it is `None`, if its place changed (truncated and
    /// written again) it is read again, and only a failure at an unchanged place is an error.
    pub(crate) fn read(&self, index: u64) -> Result<Option<Bytes>> {
        let Some(k) = index.checked_sub(self.first_index) else {
            return Ok(None);
        };
        let Some(mut place) = self.place(k) else {
            return Ok(None);
        };
        let mut attempts = 0;
        loop {
            let result = self.read_place(index, place);
            attempts += 1;
            if result.is_ok() || attempts == 8 {
                return result.map(Some);
            }
            match self.place(k) {
                None => return Ok(None),
                Some(now) if now == place => return result.map(Some),
                Some(now) => place = now,
            }
        }
    }

    /// Byte range `[start, end)` of the `k`-th visible frame.
    pub(crate) fn place(&self, k: u64) -> Option<(usize, usize)> {
        let frames = self.frames.read().unwrap_or_else(|e| e.into_inner());
        let k = usize::try_from(k).ok()?;
        let start = *frames.offsets.get(k)?;
        let end = frames
            .offsets
            .get(k + 1)
            .copied()
            .unwrap_or(frames.data_end);
        Some((start as usize, end as usize))
    }

    fn read_place(&self, index: u64, (start, end): (usize, usize)) -> Result<Bytes> {
        let mut buf = vec![0u8; end - start];
        self.file
            .read_at(&mut buf, start as u64)
            .map_err(|e| Error::io("read", &self.path, e))?;
        let frame = format::check_frame(&buf, 0).map_err(|e| Error::Corruption {
            segment: self.path.clone(),
            offset: start as u64,
            reason: format!("{e:?}"),
        })?;
        if frame.index != index || frame.end != buf.len() {
            return Err(Error::Corruption {
                segment: self.path.clone(),
                offset: start as u64,
                reason: format!(
                    "frame holds index {} where {index} was expected",
                    frame.index
                ),
            });
        }
        Ok(Bytes::from(buf).slice(frame.data))
    }
}

/// Builds the sparse offsets (every `stride`-th) from dense ones.
pub(crate) fn sparse_offsets(dense: &[u32], stride: u32) -> Vec<u32> {
    dense.iter().step_by(stride as usize).copied().collect()
}
