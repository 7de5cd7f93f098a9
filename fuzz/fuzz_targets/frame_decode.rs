//! The pure segment codecs on arbitrary bytes: `check_frame` at every offset, `decode_header`,
//! `decode_index` and `recovery::scan`. None may panic, and what they accept must be
//! self-consistent (see the asserts). Inputs whose first byte is odd are instead read as a
//! description of a valid segment plus one kind of damage, so `scan` meets real frames and its
//! torn-versus-corrupt decision can be checked against what the damage was.

#![no_main]

use arbitrary::Unstructured;
use chatlog::segment::format::{self, FrameBody, HEADER_BYTES};
use chatlog::segment::recovery;
use chatlog_fuzz::{
    Damage, build_segment, check_scan_invariants, check_scan_oracle, pick_first_index,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => built(rest),
        _ => raw(data),
    }
});

/// Arbitrary bytes through every decoder.
fn raw(buf: &[u8]) {
    for at in (0..=buf.len()).chain([buf.len() + 1, usize::MAX - 3, usize::MAX]) {
        check_frame_consistent(buf, at);
    }
    if let Ok(header) = format::decode_header(buf) {
        let again = format::encode_header(header.first_index);
        assert_eq!(
            format::decode_header(&again).map(|h| h.first_index),
            Ok(header.first_index)
        );
    }
    if let Ok(index) = format::decode_index(buf) {
        // Every byte of an index file is a field or the CRC, so re-encoding is exact.
        assert_eq!(
            format::encode_index(&index),
            buf,
            "index does not round-trip"
        );
        assert_eq!(
            index.offsets.len() as u64,
            index.entry_count.div_ceil(u64::from(index.stride))
        );
    }
    // Scan as a segment: with the header's first index if it has one, else an arbitrary one.
    let first_index = match format::decode_header(buf) {
        Ok(header) => header.first_index,
        Err(_) => buf
            .get(16..24)
            .map_or(1, |b| u64::from_le_bytes(b.try_into().unwrap())),
    };
    let scan = recovery::scan(buf, first_index);
    check_scan_invariants(buf, first_index, &scan);
}

/// A valid segment, damaged one known way.
fn built(input: &[u8]) {
    let mut u = Unstructured::new(input);
    let Ok(first_index) = pick_first_index(&mut u) else {
        return;
    };
    let Ok(mut segment) = build_segment(&mut u, first_index) else {
        return;
    };
    let Ok(damage) = u.arbitrary::<Damage>() else {
        return;
    };
    let applied = segment.damage(&damage);
    let buf = &segment.bytes;
    for &start in &segment.frame_starts {
        check_frame_consistent(buf, start);
    }
    if buf.len() >= HEADER_BYTES {
        let _ = format::decode_header(buf);
    }
    let scan = recovery::scan(buf, first_index);
    check_scan_invariants(buf, first_index, &scan);
    check_scan_oracle(&segment, &applied, &scan);
}

/// `check_frame` must not panic, and a frame it accepts must lie inside the buffer and
/// survive a re-encode.
fn check_frame_consistent(buf: &[u8], at: usize) {
    let Ok(frame) = format::check_frame(buf, at) else {
        return;
    };
    assert!(at + format::FRAME_HEADER_BYTES <= frame.data.start);
    assert!(frame.data.start <= frame.data.end);
    assert_eq!(
        frame.data.end, frame.end,
        "data must be the payload's suffix"
    );
    assert!(frame.end <= buf.len());
    assert!(u64::from(frame.batch_offset) <= frame.index);
    let data = &buf[frame.data.clone()];
    let mut again = Vec::new();
    let len = format::encode_frame(
        &mut again,
        &FrameBody {
            index: frame.index,
            batch_offset: frame.batch_offset,
            data,
        },
    );
    assert_eq!(
        len,
        format::frame_len(frame.index, frame.batch_offset, data.len())
    );
    let decoded = format::check_frame(&again, 0).expect("a re-encoded frame decodes");
    assert_eq!(
        (
            decoded.index,
            decoded.batch_offset,
            &again[decoded.data.clone()]
        ),
        (frame.index, frame.batch_offset, data)
    );
}
