//! The on-disk byte format of segments and their sealed-segment index files. Pure functions
//! over `&[u8]`: no I/O here. See `docs/storage-format.md` for the diagrams.
//!
//! Segment file:
//! ```text
//! header (32 B): magic "CHLGSEG\0" | version u32 | reserved u32 | first_index u64
//!                | header_crc u32 | reserved u32          (all little-endian)
//! frames:        length u32 | crc u32 | payload[length]   (crc32 over length bytes + payload)
//! payload:       postcard(FrameBody { index, batch_offset, data })
//! rest:          zeros (preallocated space)
//! ```

use serde::{Deserialize, Serialize};

/// Segment file magic.
pub const SEGMENT_MAGIC: [u8; 8] = *b"CHLGSEG\0";
/// Sealed-segment index file magic.
pub const INDEX_MAGIC: [u8; 8] = *b"CHLGIDX\0";
/// Current format version of both file kinds.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the segment header.
pub const HEADER_BYTES: usize = 32;
/// Size of a frame header (length + crc).
pub const FRAME_HEADER_BYTES: usize = 8;
/// Upper bound of the postcard overhead of a payload beyond its data: index (≤ 10 B varint),
/// batch offset (≤ 5 B varint) and data length (≤ 5 B varint).
pub const PAYLOAD_OVERHEAD_BYTES_MAX: usize = 20;
/// Largest frame payload the format allows (frame lengths are u32 and offsets in a segment are
/// u32, so a frame must fit in 4 GiB with room to spare).
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 1 << 30;

const _: () = assert!(HEADER_BYTES >= 28);
const _: () = assert!(FRAME_PAYLOAD_BYTES_MAX <= u32::MAX as usize);

/// The payload of one frame: one log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameBody<'a> {
    /// The entry's log index.
    pub index: u64,
    /// `index` minus the index of the first entry written by the same `write` call. Recovery
    /// uses it to tell a torn unacknowledged batch from corruption of acknowledged data.
    pub batch_offset: u32,
    /// The entry's bytes.
    #[serde(borrow, with = "serde_bytes")]
    pub data: &'a [u8],
}

/// The decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Index of the first entry stored in the segment.
    pub first_index: u64,
}

/// Why bytes are not a valid header or frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Not enough bytes.
    Incomplete,
    /// The frame header is all zeros: the end of written data in a preallocated segment.
    Zero,
    /// Bytes are present but wrong; the string says how.
    Corrupt(String),
}

/// Encodes a segment header.
pub fn encode_header(first_index: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_index.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes and checks a segment header.
pub fn decode_header(bytes: &[u8]) -> Result<SegmentHeader, Invalid> {
    let Some(h) = bytes.get(..HEADER_BYTES) else {
        return Err(Invalid::Incomplete);
    };
    if h[0..8] != SEGMENT_MAGIC {
        return Err(Invalid::Corrupt("bad segment magic".into()));
    }
    let crc = u32_at(h, 24);
    if crc != crc32fast::hash(&h[0..24]) {
        return Err(Invalid::Corrupt("segment header checksum mismatch".into()));
    }
    let version = u32_at(h, 8);
    if version != FORMAT_VERSION {
        return Err(Invalid::Corrupt(format!(
            "unsupported segment format version {version} (this build reads {FORMAT_VERSION})"
        )));
    }
    Ok(SegmentHeader {
        first_index: u64_at(h, 16),
    })
}

/// Appends one encoded frame for `body` to `out`; returns the frame's length in bytes.
pub fn encode_frame(out: &mut Vec<u8>, body: &FrameBody<'_>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    // Serialising into a Vec cannot fail: all fields are plain integers and bytes.
    let mut out_vec = std::mem::take(out);
    out_vec = postcard::to_extend(body, out_vec).expect("postcard encoding into a Vec");
    *out = out_vec;
    let payload_len = out.len() - start - FRAME_HEADER_BYTES;
    assert!(payload_len <= FRAME_PAYLOAD_BYTES_MAX, "frame too large");
    let len_bytes = (payload_len as u32).to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    hasher.update(&out[start + FRAME_HEADER_BYTES..]);
    let crc = hasher.finalize();
    out[start..start + 4].copy_from_slice(&len_bytes);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// The exact encoded size of a frame holding `data` at `index`.
pub fn frame_len(index: u64, batch_offset: u32, data_len: usize) -> usize {
    FRAME_HEADER_BYTES
        + varint_len(index)
        + varint_len(u64::from(batch_offset))
        + varint_len(data_len as u64)
        + data_len
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// A frame that passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The entry's log index.
    pub index: u64,
    /// See [`FrameBody::batch_offset`].
    pub batch_offset: u32,
    /// Byte range of the entry's data within the buffer given to [`check_frame`].
    pub data: std::ops::Range<usize>,
    /// Offset just past the frame.
    pub end: usize,
}

/// Checks the frame starting at `at` in `buf` (CRC, length, postcard shape) and decodes it.
pub fn check_frame(buf: &[u8], at: usize) -> Result<Frame, Invalid> {
    let Some(head) = buf.get(at..at.saturating_add(FRAME_HEADER_BYTES)) else {
        return Err(if buf.len() <= at || buf[at..].iter().all(|b| *b == 0) {
            Invalid::Zero
        } else {
            Invalid::Incomplete
        });
    };
    let len = u32_at(head, 0) as usize;
    let crc = u32_at(head, 4);
    if len == 0 && crc == 0 {
        return Err(Invalid::Zero);
    }
    if len > FRAME_PAYLOAD_BYTES_MAX {
        return Err(Invalid::Corrupt(format!(
            "frame length {len} is implausible"
        )));
    }
    let payload_start = at + FRAME_HEADER_BYTES;
    let Some(payload) = buf.get(payload_start..payload_start + len) else {
        return Err(Invalid::Incomplete);
    };
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[0..4]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Err(Invalid::Corrupt("frame checksum mismatch".into()));
    }
    let (body, rest): (FrameBody<'_>, &[u8]) = postcard::take_from_bytes(payload)
        .map_err(|e| Invalid::Corrupt(format!("frame payload does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(Invalid::Corrupt("trailing bytes in frame payload".into()));
    }
    if u64::from(body.batch_offset) > body.index {
        return Err(Invalid::Corrupt("batch offset beyond index".into()));
    }
    // The data is the payload's suffix (postcard puts the byte string last).
    let end = payload_start + len;
    Ok(Frame {
        index: body.index,
        batch_offset: body.batch_offset,
        data: end - body.data.len()..end,
        end,
    })
}

/// The sealed-segment index: the byte offset of every `stride`-th frame of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseIndex {
    /// First log index of the segment.
    pub first_index: u64,
    /// Number of entries in the segment.
    pub entry_count: u64,
    /// Offset just past the last frame.
    pub data_end: u64,
    /// One offset per `stride` entries: `offsets[k]` is the offset of entry `first + k*stride`.
    pub stride: u32,
    /// The offsets.
    pub offsets: Vec<u32>,
}

/// Encodes an index file:
/// `magic | version u32 | stride u32 | first_index u64 | entry_count u64 | data_end u64 |
/// offsets u32[] | crc u32` (crc32 over everything before it).
pub fn encode_index(index: &SparseIndex) -> Vec<u8> {
    let mut out = Vec::with_capacity(44 + index.offsets.len() * 4);
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&index.stride.to_le_bytes());
    out.extend_from_slice(&index.first_index.to_le_bytes());
    out.extend_from_slice(&index.entry_count.to_le_bytes());
    out.extend_from_slice(&index.data_end.to_le_bytes());
    for offset in &index.offsets {
        out.extend_from_slice(&offset.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes and checks an index file.
pub fn decode_index(bytes: &[u8]) -> Result<SparseIndex, Invalid> {
    const FIXED: usize = 8 + 4 + 4 + 8 + 8 + 8;
    if bytes.len() < FIXED + 4 {
        return Err(Invalid::Incomplete);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32_at(crc, 0) {
        return Err(Invalid::Corrupt("index checksum mismatch".into()));
    }
    if body[0..8] != INDEX_MAGIC || u32_at(body, 8) != FORMAT_VERSION {
        return Err(Invalid::Corrupt("bad index magic or version".into()));
    }
    let stride = u32_at(body, 12);
    let entry_count = u64_at(body, 24);
    if stride == 0 || !(body.len() - FIXED).is_multiple_of(4) {
        return Err(Invalid::Corrupt("bad index shape".into()));
    }
    let offsets: Vec<u32> = body[FIXED..]
        .chunks_exact(4)
        .map(|c| u32_at(c, 0))
        .collect();
    if offsets.len() as u64 != entry_count.div_ceil(u64::from(stride)) {
        return Err(Invalid::Corrupt(
            "index offset count does not match entry count".into(),
        ));
    }
    Ok(SparseIndex {
        first_index: u64_at(body, 16),
        entry_count,
        data_end: u64_at(body, 32),
        stride,
        offsets,
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip_and_exact_length() {
        for (index, off, len) in [(1u64, 0u32, 0usize), (127, 3, 200), (1 << 40, 70000, 5000)] {
            let data = vec![0xAB; len];
            let mut out = vec![1, 2, 3];
            let n = encode_frame(
                &mut out,
                &FrameBody {
                    index,
                    batch_offset: off,
                    data: &data,
                },
            );
            assert_eq!(n, frame_len(index, off, len));
            let frame = check_frame(&out, 3).unwrap();
            assert_eq!(frame.index, index);
            assert_eq!(frame.batch_offset, off);
            assert_eq!(&out[frame.data.clone()], &data[..]);
            assert_eq!(frame.end, out.len());
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut out = Vec::new();
        encode_frame(
            &mut out,
            &FrameBody {
                index: 9,
                batch_offset: 1,
                data: b"hello world",
            },
        );
        for bit in 0..out.len() * 8 {
            let mut bad = out.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                check_frame(&bad, 0).is_err(),
                "flip of bit {bit} not detected"
            );
        }
    }

    #[test]
    fn zero_and_short_buffers() {
        assert!(matches!(check_frame(&[0u8; 64], 0), Err(Invalid::Zero)));
        assert!(matches!(check_frame(&[], 0), Err(Invalid::Zero)));
        assert!(matches!(
            check_frame(&[5, 0, 0], 0),
            Err(Invalid::Incomplete)
        ));
    }

    #[test]
    fn header_roundtrip_and_checks() {
        let h = encode_header(42);
        assert_eq!(decode_header(&h).unwrap().first_index, 42);
        let mut bad = h;
        bad[17] ^= 1;
        assert!(matches!(decode_header(&bad), Err(Invalid::Corrupt(_))));
        assert!(matches!(decode_header(&h[..10]), Err(Invalid::Incomplete)));
    }

    #[test]
    fn index_roundtrip_and_checks() {
        let idx = SparseIndex {
            first_index: 7,
            entry_count: 33,
            data_end: 9000,
            stride: 16,
            offsets: vec![32, 400, 800],
        };
        let bytes = encode_index(&idx);
        assert_eq!(decode_index(&bytes).unwrap(), idx);
        let mut bad = bytes.clone();
        bad[20] ^= 4;
        assert!(matches!(decode_index(&bad), Err(Invalid::Corrupt(_))));
    }
}
