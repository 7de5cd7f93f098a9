//! Pure recovery decisions over the bytes of a segment: where valid data ends and whether what
//! follows is a torn, unacknowledged write or damage to acknowledged data.
//!
//! The writer issues one `write` per batch and writes the next batch only after the previous
//! one is durable (in the default durability mode). Each frame records its offset from the
//! first entry of its batch. So if a bad frame for index `E` is followed by a valid frame whose
//! batch started *after* `E`, the batch holding `E` had completed before: `E` was acknowledged
//! and the bad frame is corruption. If every valid frame after it belongs to the same batch as
//! `E` (or there is none), the batch never completed: it is a torn tail and is cut.

use super::format::{self, HEADER_BYTES, Invalid};

/// What follows the last valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Only zeros.
    Clean,
    /// A partial, unacknowledged write starting at `offset`; safe to cut.
    Torn {
        /// Byte offset of the first bad frame.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Damage to acknowledged data at `offset`: later, separately written frames are valid.
    Corrupt {
        /// Byte offset of the first bad frame.
        offset: usize,
        /// What is wrong with it.
        reason: String,
        /// How many valid frames were found after the damage.
        later_frames: u64,
    },
}

/// The result of scanning a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Byte offset of every valid frame, in order (entry `first_index + k` at `offsets[k]`).
    pub offsets: Vec<u32>,
    /// Offset just past the last valid frame.
    pub data_end: usize,
    /// Offset just past the last non-zero byte of the segment (`data_end` if clean).
    pub nonzero_end: usize,
    /// What follows the valid frames.
    pub tail: Tail,
}

/// Scans the frames of a segment whose header (already checked) says it starts at
/// `first_index`. `buf` is the whole segment file.
pub fn scan(buf: &[u8], first_index: u64) -> Scan {
    let mut offsets = Vec::new();
    let mut at = HEADER_BYTES.min(buf.len());
    let mut expected = first_index;
    let bad = loop {
        match format::check_frame(buf, at) {
            Ok(frame) if frame.index == expected => {
                offsets.push(u32::try_from(at).expect("segment offsets fit in u32"));
                at = frame.end;
                expected += 1;
            }
            Ok(frame) => {
                break Invalid::Corrupt(format!(
                    "frame holds index {} where {expected} was expected",
                    frame.index
                ));
            }
            Err(invalid) => break invalid,
        }
    };
    let data_end = at;
    let nonzero_end = buf
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |p| p + 1)
        .max(data_end);
    if nonzero_end == data_end {
        return Scan {
            offsets,
            data_end,
            nonzero_end,
            tail: Tail::Clean,
        };
    }
    let reason = match bad {
        Invalid::Incomplete => "frame is cut short".to_owned(),
        Invalid::Zero => "zero frame header followed by data".to_owned(),
        Invalid::Corrupt(reason) => reason,
    };
    // Look for valid frames after the bad one, skipping over each one found.
    let mut later_frames = 0;
    let mut later_batch = false;
    let mut q = data_end + 1;
    while q < nonzero_end {
        match format::check_frame(buf, q) {
            Ok(frame) if frame.index > expected => {
                later_frames += 1;
                if frame.index - u64::from(frame.batch_offset) > expected {
                    later_batch = true;
                }
                q = frame.end;
            }
            _ => q += 1,
        }
    }
    let tail = if later_batch {
        Tail::Corrupt {
            offset: data_end,
            reason,
            later_frames,
        }
    } else {
        Tail::Torn {
            offset: data_end,
            reason,
        }
    };
    Scan {
        offsets,
        data_end,
        nonzero_end,
        tail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::format::{FrameBody, encode_frame, encode_header};

    /// A segment with `batches` written back to back, then `zeros` bytes of preallocation.
    fn segment(first: u64, batches: &[usize], zeros: usize) -> (Vec<u8>, Vec<usize>) {
        let mut buf = encode_header(first).to_vec();
        let mut starts = Vec::new();
        let mut index = first;
        for &n in batches {
            let batch_first = index;
            for _ in 0..n {
                starts.push(buf.len());
                let data = vec![index as u8; 10 + (index % 7) as usize];
                encode_frame(
                    &mut buf,
                    &FrameBody {
                        index,
                        batch_offset: (index - batch_first) as u32,
                        data: &data,
                    },
                );
                index += 1;
            }
        }
        buf.resize(buf.len() + zeros, 0);
        (buf, starts)
    }

    #[test]
    fn clean_segment() {
        let (buf, starts) = segment(5, &[3, 2], 100);
        let scan = scan(&buf, 5);
        assert_eq!(scan.tail, Tail::Clean);
        assert_eq!(scan.offsets.len(), 5);
        assert_eq!(scan.offsets[4] as usize, starts[4]);
    }

    #[test]
    fn every_cut_of_the_last_batch_is_torn_and_keeps_earlier_batches() {
        let (full, starts) = segment(1, &[2, 3], 0);
        let last_batch_start = starts[2];
        for cut in last_batch_start + 1..full.len() {
            let mut buf = full[..cut].to_vec();
            buf.resize(full.len() + 64, 0);
            let s = scan(&buf, 1);
            assert!(s.offsets.len() >= 2, "cut {cut} lost acknowledged frames");
            match s.tail {
                Tail::Clean => assert!(starts.contains(&cut) || cut == full.len()),
                Tail::Torn { .. } => {}
                Tail::Corrupt { .. } => panic!("cut {cut} misread as corruption"),
            }
        }
    }

    #[test]
    fn damage_to_a_frame_of_an_earlier_batch_is_corruption() {
        let (mut buf, starts) = segment(1, &[2, 2], 50);
        buf[starts[1] + 9] ^= 0x40;
        let s = scan(&buf, 1);
        assert_eq!(s.offsets.len(), 1);
        assert!(matches!(
            s.tail,
            Tail::Corrupt {
                later_frames: 2,
                ..
            }
        ));
    }

    #[test]
    fn torn_page_inside_the_last_batch_is_torn() {
        // Power loss: a later frame of the last batch landed, an earlier one did not.
        let (mut buf, starts) = segment(1, &[2, 3], 50);
        for b in &mut buf[starts[3]..starts[4]] {
            *b = 0;
        }
        let s = scan(&buf, 1);
        assert_eq!(s.offsets.len(), 3);
        assert!(matches!(s.tail, Tail::Torn { .. }));
    }
}
