//! Inbound WebSocket messages above the size limit are skipped without being buffered, and the
//! connection stays open (PROTOCOL.md: such a message is answered `too_large` and nothing is
//! stored).
//!
//! [`Limited`] sits between the TCP stream and tungstenite and reads the client's frame
//! headers. A message whose payload is above the limit never reaches tungstenite: its payload
//! bytes are dropped as they arrive, and in its place tungstenite reads one small binary frame
//! that carries this process's secret [`marker`] and the message's size ([`skipped`] reads it
//! back). A fragmented message is held until its last fragment (at most the limit), so that one
//! that grows past the limit can still be dropped whole. Everything else passes unchanged;
//! malformed frames pass too, for tungstenite to refuse. Writes go straight through.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes of frame headers a held fragmented message may carry beyond the limit (many empty
/// fragments must not grow the hold without bound either).
const HEADER_SLACK: usize = 64 * 1024;
/// Bytes read from the stream at once.
const READ_CHUNK: usize = 8 * 1024;

/// The random bytes that mark a skipped message's stand-in frame, secret to this process (a
/// client cannot forge a stand-in).
fn marker() -> &'static [u8; 16] {
    static MARKER: OnceLock<[u8; 16]> = OnceLock::new();
    MARKER.get_or_init(rand::random)
}

/// The size of the skipped message a binary message stands in for, if it is such a stand-in.
pub fn skipped(payload: &[u8]) -> Option<u64> {
    let (mark, size) = payload.split_first_chunk::<16>()?;
    let size: [u8; 8] = size.try_into().ok()?;
    (mark == marker()).then(|| u64::from_be_bytes(size))
}

/// The stand-in frame: binary, final, masked with a zero key (so the payload reads as is).
fn stand_in(size: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x82, 0x80 | 24, 0, 0, 0, 0]);
    out.extend_from_slice(marker());
    out.extend_from_slice(&size.to_be_bytes());
}

/// What happens to a frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// To tungstenite now.
    Pass,
    /// Into the held fragmented message.
    Hold,
    /// Dropped.
    Skip,
}

/// What happens once a frame's payload has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Nothing,
    /// The held message is complete: release it to tungstenite.
    Release,
    /// A skipped message is complete: hand tungstenite its stand-in.
    StandIn(u64),
}

#[derive(Debug)]
enum State {
    /// Reading a frame header (the bytes so far in `header`).
    Header,
    Payload {
        left: u64,
        route: Route,
        end: End,
    },
}

/// A fragmented message in progress.
#[derive(Debug)]
struct Fragmented {
    /// Payload bytes so far.
    size: u64,
    /// Past the limit: its fragments are dropped.
    skipping: bool,
}

/// A stream whose inbound WebSocket messages above `limit` bytes are replaced by stand-ins.
#[derive(Debug)]
pub struct Limited<S> {
    inner: S,
    limit: u64,
    state: State,
    header: [u8; 14],
    header_len: usize,
    message: Option<Fragmented>,
    held: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    eof: bool,
}

impl<S> Limited<S> {
    /// Wraps `inner`; messages whose payload is above `limit` bytes are skipped.
    pub fn new(inner: S, limit: usize) -> Limited<S> {
        Limited {
            inner,
            limit: limit as u64,
            state: State::Header,
            header: [0; 14],
            header_len: 0,
            message: None,
            held: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            eof: false,
        }
    }

    /// Routes `data`, just read from the stream.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Header => {
                    let need = self.header_needed();
                    let take = (need - self.header_len).min(data.len());
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&data[..take]);
                    self.header_len += take;
                    data = &data[take..];
                    if self.header_len == self.header_needed() {
                        self.frame_started();
                    }
                }
                State::Payload { left, route, end } => {
                    let n = left.min(data.len() as u64) as usize;
                    match route {
                        Route::Pass => self.out.extend_from_slice(&data[..n]),
                        Route::Hold => self.held.extend_from_slice(&data[..n]),
                        Route::Skip => {}
                    }
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = State::Payload { left, route, end };
                    if left == 0 {
                        self.frame_ended(end);
                    }
                }
            }
        }
    }

    /// Header bytes this frame needs, as far as the bytes so far tell.
    fn header_needed(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    /// A complete header is in `header`: decide where the frame goes.
    fn frame_started(&mut self) {
        let header = &self.header[..self.header_len];
        let fin = header[0] & 0x80 != 0;
        let opcode = header[0] & 0x0f;
        let len = match header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
            127 => u64::from_be_bytes(header[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        };
        let (route, end) = match (opcode, self.message.as_mut()) {
            // A new message, in one frame.
            (1 | 2, None) if fin => {
                if len > self.limit {
                    (Route::Skip, End::StandIn(len))
                } else {
                    (Route::Pass, End::Nothing)
                }
            }
            // The first fragment of a message.
            (1 | 2, None) => {
                let skipping = len > self.limit;
                self.message = Some(Fragmented {
                    size: len,
                    skipping,
                });
                if skipping {
                    (Route::Skip, End::Nothing)
                } else {
                    (Route::Hold, End::Nothing)
                }
            }
            // A later fragment.
            (0, Some(message)) => {
                message.size = message.size.saturating_add(len);
                let held = (self.held.len() + header.len()) as u64;
                let held = held.saturating_add(len);
                if !message.skipping
                    && (message.size > self.limit
                        || held > self.limit.saturating_add(HEADER_SLACK as u64))
                {
                    message.skipping = true;
                    self.held = Vec::new();
                }
                let end = match (fin, message.skipping) {
                    (false, _) => End::Nothing,
                    (true, false) => End::Release,
                    (true, true) => End::StandIn(message.size),
                };
                let route = if message.skipping {
                    Route::Skip
                } else {
                    Route::Hold
                };
                (route, end)
            }
            // Control frames (allowed between fragments), and frames that break the protocol
            // (a continuation without a message, a new message inside one, reserved opcodes):
            // passed as they are, for tungstenite to answer or refuse.
            _ => (Route::Pass, End::Nothing),
        };
        match route {
            Route::Pass => self.out.extend_from_slice(header),
            Route::Hold => self.held.extend_from_slice(header),
            Route::Skip => {}
        }
        self.header_len = 0;
        self.state = State::Payload {
            left: len,
            route,
            end,
        };
        if len == 0 {
            self.frame_ended(end);
        }
    }

    fn frame_ended(&mut self, end: End) {
        self.state = State::Header;
        match end {
            End::Nothing => {}
            End::Release => {
                self.message = None;
                let held = std::mem::take(&mut self.held);
                if self.out.is_empty() {
                    self.out = held;
                    self.out_pos = 0;
                } else {
                    self.out.extend_from_slice(&held);
                }
            }
            End::StandIn(size) => {
                self.message = None;
                stand_in(size, &mut self.out);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    // Freed, not kept: idle connections must cost no buffer.
                    this.out = Vec::new();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Not zeroed: `ReadBuf` tracks what the read filled.
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // End of stream: a header cut short is passed on, for tungstenite to report.
                this.eof = true;
                this.out.extend_from_slice(&this.header[..this.header_len]);
                this.header_len = 0;
                continue;
            }
            this.feed(read.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client frame, masked with `key` (tungstenite's encoder, so the tests do not share
    /// the reader's reading of the format).
    fn frame(fin: bool, opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        use tungstenite::protocol::frame::{Frame, FrameHeader, coding::OpCode};
        let header = FrameHeader {
            is_final: fin,
            opcode: OpCode::from(opcode),
            mask: Some(key),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        Frame::from_payload(header, bytes::Bytes::copy_from_slice(payload))
            .format(&mut out)
            .expect("a Vec takes any frame");
        out
    }

    /// Everything `Limited` passes on when `input` arrives in pieces of `piece` bytes.
    fn through(limit: usize, input: &[u8], piece: usize) -> Vec<u8> {
        let mut l = Limited::new((), limit);
        for part in input.chunks(piece.max(1)) {
            l.feed(part);
        }
        l.out[l.out_pos..].to_vec()
    }

    #[test]
    fn small_messages_and_control_frames_pass_unchanged() {
        let text = frame(true, 1, b"{\"op\":\"ping\"}", [1, 2, 3, 4]);
        let ping = frame(true, 9, b"p", [5, 6, 7, 8]);
        let first = frame(false, 1, b"ab", [1, 1, 1, 1]);
        let pong = frame(true, 10, b"", [0, 0, 0, 0]);
        let last = frame(true, 0, b"cd", [2, 2, 2, 2]);
        let binary = frame(true, 2, &[7u8; 300], [9, 9, 9, 9]);
        let long = frame(true, 1, &vec![b'x'; 70_000], [3, 1, 4, 1]);
        let input = [&text, &ping, &first, &pong, &last, &binary, &long].map(|f| &f[..]);
        // The held fragments come out after the pong that arrived among them.
        let expected = [&text, &ping, &pong, &first, &last, &binary, &long].map(|f| &f[..]);
        for piece in [1, 2, 3, 7, 100, 100_000] {
            let out = through(100_000, &input.concat(), piece);
            assert_eq!(out, expected.concat(), "pieces of {piece}");
        }
    }

    #[test]
    fn a_message_above_the_limit_becomes_a_stand_in_with_its_size() {
        let mut input = frame(true, 1, &[b'x'; 101], [1, 2, 3, 4]);
        input.extend(frame(true, 1, &[b'y'; 100], [1, 2, 3, 4]));
        // Fragmented: past the limit in its third fragment.
        input.extend(frame(false, 1, &[b'a'; 40], [1, 2, 3, 4]));
        input.extend(frame(false, 0, &[b'b'; 40], [1, 2, 3, 4]));
        input.extend(frame(false, 0, &[b'c'; 40], [1, 2, 3, 4]));
        input.extend(frame(true, 0, &[b'd'; 5], [1, 2, 3, 4]));
        // Fragmented, past the limit in its first fragment.
        input.extend(frame(false, 2, &[0u8; 500], [1, 2, 3, 4]));
        input.extend(frame(true, 0, &[0u8; 1], [1, 2, 3, 4]));
        input.extend(frame(true, 1, b"after", [1, 2, 3, 4]));
        for piece in [1, 5, 64, 10_000] {
            let out = through(100, &input, piece);
            let mut expected = Vec::new();
            stand_in(101, &mut expected);
            expected.extend(frame(true, 1, &[b'y'; 100], [1, 2, 3, 4]));
            stand_in(125, &mut expected);
            stand_in(501, &mut expected);
            expected.extend(frame(true, 1, b"after", [1, 2, 3, 4]));
            assert_eq!(out, expected, "pieces of {piece}");
        }
        let mut stand = Vec::new();
        stand_in(125, &mut stand);
        assert_eq!(skipped(&stand[6..]), Some(125));
        assert_eq!(
            skipped(&[0u8; 24]),
            None,
            "a client's binary frame is no stand-in"
        );
        assert_eq!(skipped(b"short"), None);
    }

    #[test]
    fn many_empty_fragments_cannot_grow_the_hold_past_its_bound() {
        let mut l = Limited::new((), 100);
        l.feed(&frame(false, 1, b"a", [0; 4]));
        for _ in 0..20_000 {
            l.feed(&frame(false, 0, b"", [0; 4]));
            assert!(l.held.len() <= 100 + HEADER_SLACK + 14);
        }
        l.feed(&frame(true, 0, b"", [0; 4]));
        let mut expected = Vec::new();
        stand_in(1, &mut expected);
        assert_eq!(&l.out[l.out_pos..], &expected[..]);
    }

    #[test]
    fn lengths_up_to_the_largest_a_header_can_state_are_skipped_without_overflow() {
        // 127 announces a 64-bit length; the RFC's top bit rule is tungstenite's to check.
        let huge = |fin: bool, opcode: u8| {
            let mut f = vec![(u8::from(fin) << 7) | opcode, 0x80 | 127];
            f.extend_from_slice(&u64::MAX.to_be_bytes());
            f.extend_from_slice(&[0; 4]);
            f.extend_from_slice(b"some of it");
            f
        };
        for input in [
            huge(true, 1),
            huge(false, 2),
            [frame(false, 1, b"a", [0; 4]), huge(false, 0)].concat(),
            [frame(false, 1, b"a", [0; 4]), huge(true, 0)].concat(),
        ] {
            let mut l = Limited::new((), 100);
            l.feed(&input);
            assert!(l.out.is_empty() && l.held.is_empty(), "{:?}", l.out);
            assert!(matches!(
                l.state,
                State::Payload {
                    route: Route::Skip,
                    ..
                }
            ));
        }
    }

    proptest! {
        /// Against a model: messages at or below the limit come out as sent (control frames
        /// first when they arrived between fragments), larger ones as stand-ins.
        #[test]
        fn any_mix_of_messages_comes_out_as_the_model_says(
            messages in proptest::collection::vec(
                (proptest::collection::vec(0usize..150, 1..4), any::<bool>(), any::<bool>()),
                0..12,
            ),
            piece in 1usize..64,
        ) {
            let limit = 120u64;
            let mut input = Vec::new();
            let mut expected = Vec::new();
            for (i, (sizes, binary, ping)) in messages.iter().enumerate() {
                let opcode = if *binary { 2 } else { 1 };
                let key = [i as u8, 1, 2, 3];
                let total: usize = sizes.iter().sum();
                let mut frames = Vec::new();
                for (j, size) in sizes.iter().enumerate() {
                    let fin = j + 1 == sizes.len();
                    let op = if j == 0 { opcode } else { 0 };
                    frames.extend(frame(fin, op, &vec![b'z'; *size], key));
                }
                // One ping between the first two fragments, if asked and fragmented.
                let ping_frame = frame(true, 9, b"!", key);
                if *ping && sizes.len() > 1 {
                    let first_len = frame(false, opcode, &vec![b'z'; sizes[0]], key).len();
                    input.extend(&frames[..first_len]);
                    input.extend(&ping_frame);
                    input.extend(&frames[first_len..]);
                    expected.extend(&ping_frame);
                } else {
                    input.extend(&frames);
                }
                if total as u64 > limit {
                    stand_in(total as u64, &mut expected);
                } else {
                    expected.extend(&frames);
                }
            }
            prop_assert_eq!(through(limit as usize, &input, piece), expected);
        }
    }
}
