//! The binary peer transport: postcard messages in length-prefixed frames over one persistent
//! TCP connection per peer, multiplexed by request id.
//!
//! A connection opens with [`MAGIC`] (its first byte is 0, which no HTTP request starts with,
//! so the peer listener tells the two apart by peeking one byte and keeps serving HTTP — the
//! admin endpoints and the `/raft/*` routes — on the same port). Then both sides exchange
//! frames: `len: u32 LE` (of what follows), `id: u64 LE`, `code: u8`, payload. A request's code
//! is its [`Route`]; an answer echoes the request's id with code 0 (payload: the postcard
//! answer) or 1 (payload: why it failed, UTF-8). The server answers requests concurrently, in
//! any order.
//!
//! Compared with an HTTP request per message, a frame costs no request line, headers, URL
//! parsing or connection-pool bookkeeping on either side, and a burst of frames to one peer
//! goes out in one `write`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// What a peer connection starts with.
pub const MAGIC: &[u8; 8] = b"\0chlgrpc";
/// Largest frame accepted (a snapshot chunk, or an AppendEntries batch, fits well within it).
pub const FRAME_BYTES_MAX: usize = 256 << 20;
/// Frame bytes before the payload, after the length.
const HEAD_BYTES: usize = 9;
/// Answer code: success, the payload is the postcard answer.
pub const OK: u8 = 0;
/// Answer code: failure, the payload is the reason.
pub const FAILED: u8 = 1;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Route {
    /// openraft AppendEntries.
    Append = 1,
    /// openraft Vote.
    Vote = 2,
    /// openraft InstallSnapshot.
    Snapshot = 3,
    /// A follower's forwarded write batch.
    Write = 4,
    /// Presence gossip.
    Gossip = 5,
    /// A file's bytes, copied to a peer ([`crate::blobs::BlobPut`]).
    BlobPut = 6,
    /// A file's bytes, asked of a peer (by SHA-256; [`crate::blobs::BlobGot`]).
    BlobGet = 7,
    /// The leader's commit point for a read barrier
    /// ([`crate::node::ClusterNode::read_barrier`]).
    ReadIndex = 8,
    /// The leader asks this node to start an election at once
    /// ([`crate::node::ClusterNode::hand_off_leadership`]).
    TakeLeadership = 9,
    /// Do you hear a leader? Answered with a `bool` (the election guard's pre-vote,
    /// `node.rs::guard_elections`).
    Ping = 10,
}

impl Route {
    /// The route with code `code`.
    pub fn from_code(code: u8) -> Option<Route> {
        Some(match code {
            1 => Route::Append,
            2 => Route::Vote,
            3 => Route::Snapshot,
            4 => Route::Write,
            5 => Route::Gossip,
            6 => Route::BlobPut,
            7 => Route::BlobGet,
            8 => Route::ReadIndex,
            9 => Route::TakeLeadership,
            10 => Route::Ping,
            _ => return None,
        })
    }
}

/// Sets the socket options of a peer connection: no Nagle delay, and a connection whose peer
/// vanished without closing it (a partition, a frozen host) is found dead within seconds, not
/// TCP's default quarter of an hour: keepalive probes after 5 s of silence, 1 s apart, 3 of
/// them; and sent data unacknowledged for 10 s closes it. Calls on it then fail at once and
/// the next one connects again.
pub fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(5))
            .with_interval(Duration::from_secs(1))
            .with_retries(3),
    )?;
    sock.set_tcp_user_timeout(Some(Duration::from_secs(10)))
}

/// Encodes one frame.
pub fn frame(id: u64, code: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + HEAD_BYTES + payload.len());
    b.put_u32_le((HEAD_BYTES + payload.len()) as u32);
    b.put_u64_le(id);
    b.put_u8(code);
    b.put_slice(payload);
    b.freeze()
}

/// Reads one frame: `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<(u64, u8, Bytes)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if !(HEAD_BYTES..=FRAME_BYTES_MAX + HEAD_BYTES).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer frame of {len} bytes (allowed {HEAD_BYTES}..={FRAME_BYTES_MAX})"),
        ));
    }
    // Read into uninitialised capacity: zeroing a large AppendEntries first costs as much
    // as copying it.
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        if (&mut *r).take(want).read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    let mut buf = buf.freeze();
    let head = buf.split_to(HEAD_BYTES);
    let id = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    Ok(Some((id, head[8], buf)))
}

/// Writes every frame `rx` yields, each burst with one flush, until `rx` closes or a write
/// fails.
pub async fn write_frames<W: AsyncWriteExt + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(64 << 10, w);
    while let Some(first) = rx.recv().await {
        w.write_all(&first).await?;
        while let Ok(next) = rx.try_recv() {
            w.write_all(&next).await?;
        }
        w.flush().await?;
    }
    Ok(())
}

/// Why a request over a connection got no answer.
#[derive(Debug)]
pub enum CallError {
    /// The connection was closed before the request was queued: it was never sent.
    Closed,
    /// The connection failed after the request was queued: it may have been received.
    Lost(String),
    /// No answer within the timeout.
    TimedOut,
}

type Waiters = std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<(u8, Bytes), String>>>>;

/// One multiplexed connection to a peer.
#[derive(Debug)]
pub struct Conn {
    tx: mpsc::UnboundedSender<Bytes>,
    waiters: Arc<Waiters>,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
}

impl Conn {
    /// Connects to `addr` (within `connect_timeout`) and starts the connection's reader and
    /// writer tasks.
    pub async fn connect(addr: &str, connect_timeout: Duration) -> std::io::Result<Arc<Conn>> {
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        tune(&stream)?;
        let (read, mut write) = stream.into_split();
        let mut read = tokio::io::BufReader::with_capacity(64 << 10, read);
        write.write_all(MAGIC).await?;
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let waiters: Arc<Waiters> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let fail_all = {
            let waiters = waiters.clone();
            let closed = closed.clone();
            move |why: String| {
                closed.store(true, Ordering::Release);
                let all: Vec<_> = waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain()
                    .collect();
                for (_, w) in all {
                    let _ = w.send(Err(why.clone()));
                }
            }
        };
        {
            let fail_all = fail_all.clone();
            tokio::spawn(async move {
                let why = match write_frames(write, rx).await {
                    Ok(()) => "connection closed".to_owned(),
                    Err(e) => format!("write: {e}"),
                };
                fail_all(why);
            });
        }
        {
            let waiters = waiters.clone();
            tokio::spawn(async move {
                let why = loop {
                    match read_frame(&mut read).await {
                        Ok(Some((id, code, payload))) => {
                            let waiter = waiters
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&id);
                            // Unknown ids: answers to unawaited duplicates, or to calls that
                            // timed out.
                            if let Some(w) = waiter {
                                let _ = w.send(Ok((code, payload)));
                            }
                        }
                        Ok(None) => break "the peer closed the connection".to_owned(),
                        Err(e) => break format!("read: {e}"),
                    }
                };
                fail_all(why);
            });
        }
        Ok(Arc::new(Conn {
            tx,
            waiters,
            next_id: AtomicU64::new(1),
            closed,
        }))
    }

    /// Whether the connection failed (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Sends a request without waiting for its answer.
    pub fn send_only(&self, route: Route, payload: &[u8]) -> Result<(), CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(frame(id, route as u8, payload))
            .map_err(|_| CallError::Closed)
    }

    /// Sends a request and waits (up to `timeout`) for its answer: `(code, payload)`.
    pub async fn call(
        &self,
        route: Route,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(u8, Bytes), CallError> {
        if self.is_closed() {
            return Err(CallError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        if self.tx.send(frame(id, route as u8, payload)).is_err() {
            self.forget(id);
            return Err(CallError::Closed);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(answer))) => Ok(answer),
            Ok(Ok(Err(why))) => Err(CallError::Lost(why)),
            Ok(Err(_)) => Err(CallError::Lost("connection dropped".into())),
            Err(_) => {
                self.forget(id);
                Err(CallError::TimedOut)
            }
        }
    }

    fn forget(&self, id: u64) {
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_lengths_are_refused() {
        let f = frame(42, 3, b"hello");
        let mut r = &f[..];
        let (id, code, payload) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((id, code, &payload[..]), (42, 3, &b"hello"[..]));
        assert!(read_frame(&mut r).await.unwrap().is_none(), "clean end");

        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0u8; 16]);
        let err = read_frame(&mut &huge[..]).await.unwrap_err();
        assert!(err.to_string().contains("peer frame of"), "{err}");

        let mut short = Vec::new();
        short.extend_from_slice(&3u32.to_le_bytes());
        short.extend_from_slice(&[0u8; 3]);
        assert!(read_frame(&mut &short[..]).await.is_err());
    }

    /// A peer that answers the requests it read in reverse order, then closes the connection.
    async fn reversing_peer(listener: tokio::net::TcpListener, answer: usize) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut magic = [0u8; 8];
        s.read_exact(&mut magic).await.unwrap();
        assert_eq!(&magic, MAGIC);
        let mut got = Vec::new();
        for _ in 0..answer {
            got.push(read_frame(&mut s).await.unwrap().unwrap());
        }
        for (id, code, payload) in got.into_iter().rev() {
            let mut reply = vec![code];
            reply.extend_from_slice(&payload);
            s.write_all(&frame(id, OK, &reply)).await.unwrap();
        }
        // One more request is read and never answered: the connection closes under it.
        let _ = read_frame(&mut s).await;
    }

    #[tokio::test]
    async fn answers_are_matched_by_id_and_a_dropped_connection_fails_its_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let peer = tokio::spawn(reversing_peer(listener, 3));
        let conn = Conn::connect(&addr, Duration::from_secs(1)).await.unwrap();
        let t = Duration::from_secs(5);
        let (a, b, c) = tokio::join!(
            conn.call(Route::Append, b"one", t),
            conn.call(Route::Vote, b"two", t),
            conn.call(Route::Write, b"three", t),
        );
        for (answer, route, body) in [
            (a, Route::Append, &b"one"[..]),
            (b, Route::Vote, b"two"),
            (c, Route::Write, b"three"),
        ] {
            let (code, payload) = answer.expect("answered");
            assert_eq!(code, OK);
            assert_eq!(payload[0], route as u8);
            assert_eq!(&payload[1..], body);
        }
        let lost = conn.call(Route::Gossip, b"four", t).await;
        assert!(matches!(lost, Err(CallError::Lost(_))), "{lost:?}");
        peer.await.unwrap();
        assert!(conn.is_closed());
        assert!(matches!(
            conn.call(Route::Gossip, b"five", t).await,
            Err(CallError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_call_without_an_answer_times_out_and_the_connection_stays_usable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut magic = [0u8; 8];
            s.read_exact(&mut magic).await.unwrap();
            let (first, ..) = read_frame(&mut s).await.unwrap().unwrap();
            let (second, ..) = read_frame(&mut s).await.unwrap().unwrap();
            // The first is answered late (after its caller gave up), the second at once.
            s.write_all(&frame(second, OK, b"2")).await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            s.write_all(&frame(first, OK, b"1")).await.unwrap();
            let _ = read_frame(&mut s).await;
        });
        let conn = Conn::connect(&addr, Duration::from_secs(1)).await.unwrap();
        let slow = conn.call(Route::Append, b"a", Duration::from_millis(100));
        let fast = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            conn.call(Route::Append, b"b", Duration::from_secs(5)).await
        };
        let (slow, fast) = tokio::join!(slow, fast);
        assert!(matches!(slow, Err(CallError::TimedOut)), "{slow:?}");
        assert_eq!(&fast.unwrap().1[..], b"2");
        // The late answer is dropped; the connection still works.
        tokio::time::sleep(Duration::from_millis(2_200)).await;
        assert!(!conn.is_closed());
        drop(conn);
        peer.await.unwrap();
    }

    #[test]
    fn magic_starts_with_a_byte_no_http_request_starts_with() {
        assert_eq!(MAGIC[0], 0);
        for r in [
            Route::Append,
            Route::Vote,
            Route::Snapshot,
            Route::Write,
            Route::Gossip,
            Route::BlobPut,
            Route::BlobGet,
            Route::ReadIndex,
            Route::TakeLeadership,
            Route::Ping,
        ] {
            assert_eq!(Route::from_code(r as u8), Some(r));
        }
        assert_eq!(Route::from_code(0), None);
        assert_eq!(Route::from_code(Route::Ping as u8 + 1), None);
    }
}
