//! The server's inbound WebSocket filter, `chatlog_server::oversize::Limited`, on untrusted
//! bytes read in pieces of any size (with `Pending` between them) and drained into read
//! buffers of any size.
//!
//! Inputs whose first byte is `0xFF` describe a conversation instead: up to 8 messages, each
//! in 1–4 fragments of 0–300 bytes, text or binary, sometimes with a ping between two
//! fragments, under a limit of 0–400 bytes. The oracle: every message at or below the limit
//! comes out byte for byte as sent, after the pings sent between its fragments; every message
//! above it comes out as one stand-in frame whose payload `skipped` reads as the message's
//! size. Any other input is raw bytes: the filter must never panic, must reach the end of the
//! stream, and its output is bounded by its input (a stand-in replaces at least a frame).

#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use arbitrary::{Result, Unstructured};
use chatlog_fuzz::server_oversize::{Limited, skipped};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// Hands out `data` in pieces of the given sizes (0: `Pending` once), then the rest, then EOF.
struct Pieces {
    data: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl AsyncRead for Pieces {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let size = match this.sizes.get(this.next) {
            Some(0) => {
                this.next += 1;
                return Poll::Pending;
            }
            Some(n) => *n,
            None => usize::MAX,
        };
        this.next += 1;
        let n = size.min(buf.remaining()).min(this.data.len() - this.at);
        buf.put_slice(&this.data[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

/// Everything `Limited` passes on for `data` under `limit`, read in `pieces` and drained in
/// reads of `reads` bytes.
fn run(limit: usize, data: Vec<u8>, pieces: Vec<usize>, reads: &[usize]) -> Vec<u8> {
    let bound = 16 * data.len() + pieces.len() + 64;
    let mut l = Limited::new(
        Pieces {
            data,
            at: 0,
            sizes: pieces,
            next: 0,
        },
        limit,
    );
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    for poll in 0.. {
        assert!(poll < bound, "no end of stream after {poll} polls");
        let mut buf = vec![
            0u8;
            reads
                .get(poll % reads.len().max(1))
                .copied()
                .unwrap_or(64)
                .max(1)
        ];
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut l).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => return out,
            Poll::Ready(Ok(())) => out.extend_from_slice(read.filled()),
            Poll::Ready(Err(e)) => panic!("read failed: {e}"),
            Poll::Pending => {}
        }
    }
    unreachable!()
}

/// A client frame, masked with `key`.
fn frame(fin: bool, opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | opcode];
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// What the output must hold, in order.
enum Expect {
    Bytes(Vec<u8>),
    StandIn(u64),
}

/// Up to `max` sizes of 0–40.
fn sizes(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<usize>> {
    let n = u.int_in_range(0..=max)?;
    (0..n).map(|_| u.int_in_range(0..=40)).collect()
}

fn conversation(u: &mut Unstructured<'_>) -> Result<()> {
    let limit = u.int_in_range(0..=400usize)?;
    let mut input = Vec::new();
    let mut expected = Vec::new();
    for i in 0..u.int_in_range(0..=8u8)? {
        let fragments = u.int_in_range(1..=4usize)?;
        let opcode = if u.arbitrary()? { 2 } else { 1 };
        let ping = fragments > 1 && u.arbitrary::<bool>()?;
        let key: [u8; 4] = u.arbitrary()?;
        let mut frames = Vec::new();
        let mut total = 0u64;
        for j in 0..fragments {
            let size = u.int_in_range(0..=300usize)?;
            total += size as u64;
            let payload: Vec<u8> = (0..size).map(|k| (k as u8) ^ i).collect();
            let op = if j == 0 { opcode } else { 0 };
            let f = frame(j + 1 == fragments, op, &payload, key);
            input.extend_from_slice(&f);
            if ping && j == 0 {
                let p = frame(true, 9, b"ping", key);
                input.extend_from_slice(&p);
                expected.push(Expect::Bytes(p));
            }
            frames.extend(f);
        }
        expected.push(if total > limit as u64 {
            Expect::StandIn(total)
        } else {
            Expect::Bytes(frames)
        });
    }
    let pieces = sizes(u, 16)?;
    let reads = sizes(u, 8)?;
    let out = run(limit, input, pieces, &reads);
    let mut rest = &out[..];
    for e in expected {
        match e {
            Expect::Bytes(b) => {
                assert!(
                    rest.starts_with(&b),
                    "expected a frame of {} bytes as sent",
                    b.len()
                );
                rest = &rest[b.len()..];
            }
            Expect::StandIn(size) => {
                assert!(rest.len() >= 30, "expected a stand-in for {size} bytes");
                assert_eq!(&rest[..6], &[0x82, 0x80 | 24, 0, 0, 0, 0]);
                assert_eq!(skipped(&rest[6..30]), Some(size));
                rest = &rest[30..];
            }
        }
    }
    assert!(rest.is_empty(), "{} bytes more than expected", rest.len());
    Ok(())
}

fn raw(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let limit = u.int_in_range(0..=300usize)?;
    let pieces = sizes(&mut u, 8)?;
    let reads = sizes(&mut u, 4)?;
    let bytes = u.take_rest().to_vec();
    let len = bytes.len();
    let out = run(limit, bytes, pieces, &reads);
    assert!(
        out.len() <= 15 * len + 30,
        "{} bytes out of {len}",
        out.len()
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    if let Some((&0xFF, rest)) = data.split_first() {
        let _ = conversation(&mut Unstructured::new(rest));
    } else {
        let _ = raw(data);
    }
});
