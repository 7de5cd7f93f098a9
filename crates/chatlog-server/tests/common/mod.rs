//! Test harness: an in-process server on 127.0.0.1:0 and a WebSocket client that speaks the
//! protocol from PROTOCOL.md only.
#![allow(dead_code)]

pub mod hook;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use chatlog_server::ServerConfig;
use chatlog_server::auth::Auth;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789";
/// How long a test waits for something that must happen.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn token(user: &str) -> String {
    Auth::new(SECRET.as_bytes())
        .unwrap()
        .sign(user, now_secs() + 3600)
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), chatlog_server::ServerError>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, tweak).await
    }

    pub async fn start_in(
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> TestServer {
        let mut config = ServerConfig::new(dir.path(), SECRET);
        config.rate_limit_per_minute = 0;
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(chatlog_server::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        // Ready once /healthz answers.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if http(addr, "GET", "/healthz", None, &[]).await.map(|r| r.0) == Some(200) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TestServer {
            addr,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Waits (up to [`WAIT`]) for the server to stop (by itself, or after [`TestServer::stop`]
    /// asked it to); its result and the data directory.
    pub async fn ended(mut self) -> (Result<(), chatlog_server::ServerError>, tempfile::TempDir) {
        let result = tokio::time::timeout(WAIT, self.task.take().unwrap())
            .await
            .expect("the server stops in time")
            .unwrap();
        let TestServer { dir, .. } = self;
        (result, dir)
    }

    /// Graceful stop; returns the data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        let (result, dir) = self.ended().await;
        result.unwrap();
        dir
    }

    pub async fn connect(&self, user: &str) -> Client {
        Client::connect(&self.url(), &token(user), "default", None).await
    }

    pub async fn connect_device(&self, user: &str, device: &str) -> Client {
        Client::connect(&self.url(), &token(user), device, None).await
    }
}

/// A minimal HTTP/1.1 request over a raw socket: (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &[u8],
) -> Option<(u16, Vec<u8>, String)> {
    let mut headers = Vec::new();
    let authorization;
    if let Some(t) = bearer {
        authorization = format!("Bearer {t}");
        headers.push(("Authorization", authorization.as_str()));
    }
    headers.push(("Content-Type", "image/png"));
    http_with(addr, method, path, &headers, Body::Sized(body)).await
}

/// How [`http_with`] sends a request body.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// With `Content-Length`.
    Sized(&'a [u8]),
    /// With `Transfer-Encoding: chunked`, in chunks of at most this many bytes.
    Chunked(&'a [u8], usize),
}

/// A minimal HTTP/1.1 request with arbitrary headers: (status, body, head).
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> Option<(u16, Vec<u8>, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    match body {
        Body::Sized(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
        Body::Chunked(..) => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    // A server may answer (and close) before reading the whole body: write errors are not
    // failures of the request, the answer is what counts.
    match body {
        Body::Sized(b) => {
            let _ = stream.write_all(b).await;
        }
        Body::Chunked(b, size) => {
            for chunk in b.chunks(size.max(1)) {
                let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                framed.extend_from_slice(chunk);
                framed.extend_from_slice(b"\r\n");
                if stream.write_all(&framed).await.is_err() {
                    break;
                }
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
    }
    let mut out = Vec::new();
    // Keep what arrived even if the connection is reset afterwards (a server that answers
    // before reading the whole body may reset it).
    let mut buf = [0u8; 16 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let split = out.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let mut body = out[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Some((status, body, head))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16)
                .unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 2 + size + 2..];
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Pushes received while waiting for replies.
    pub pushes: VecDeque<Value>,
    pub welcome: Value,
}

impl Client {
    pub async fn raw(url: &str) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws
    }

    pub async fn connect(url: &str, token: &str, device: &str, since: Option<Value>) -> Client {
        Self::hello_on(Self::raw(url).await, token, device, since).await
    }

    /// Sends `hello` on an open socket and waits for `welcome`.
    async fn hello_on(
        mut ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
        token: &str,
        device: &str,
        since: Option<Value>,
    ) -> Client {
        let mut hello = json!({"op": "hello", "token": token, "device": device});
        if let Some(since) = since {
            hello["since"] = since;
        }
        ws.send(Message::text(hello.to_string())).await.unwrap();
        let mut client = Client {
            ws,
            next_id: 0,
            pushes: VecDeque::new(),
            welcome: Value::Null,
        };
        let welcome = client.recv().await.expect("welcome");
        assert_eq!(welcome["ev"], "welcome", "{welcome}");
        client.welcome = welcome;
        client
    }

    /// Connects and collects the resume stream up to `synced`.
    pub async fn connect_resume(
        url: &str,
        token: &str,
        device: &str,
        since: Option<Value>,
    ) -> (Client, Vec<Value>) {
        let mut c = Self::connect(url, token, device, since).await;
        let mut events = Vec::new();
        loop {
            let v = c.recv().await.expect("resume stream");
            if v["ev"] == "synced" {
                break;
            }
            assert_eq!(v["ev"], "event", "{v}");
            events.push(v["event"].clone());
        }
        (c, events)
    }

    /// Next JSON frame from the socket (skipping pings), or `None` at close.
    pub async fn recv(&mut self) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("server answered in time")?;
            match msg.ok()? {
                Message::Text(t) => return Some(serde_json::from_str(t.as_str()).unwrap()),
                Message::Close(_) => return None,
                _ => {}
            }
        }
    }

    /// Next frame, or the close frame's code.
    pub async fn recv_or_close(&mut self) -> Result<Value, Option<u16>> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("server answered in time");
            match msg {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| f.code.into())),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_owned())).await.unwrap();
    }

    /// Sends a request and returns the whole reply frame (`result` or `error`).
    pub async fn call(&mut self, request: Value) -> Value {
        self.try_call(request).await.expect("reply before close")
    }

    /// `call`; `None` if the connection closes before the reply.
    pub async fn try_call(&mut self, mut request: Value) -> Option<Value> {
        self.next_id += 1;
        let id = self.next_id;
        request["id"] = json!(id);
        self.send_raw(&request.to_string()).await;
        loop {
            let v = self.recv().await?;
            if v.get("id") == Some(&json!(id)) {
                return Some(v);
            }
            self.pushes.push_back(v);
        }
    }

    /// `call` expecting success; returns `result`.
    pub async fn ok(&mut self, request: Value) -> Value {
        let reply = self.call(request.clone()).await;
        assert!(reply.get("result").is_some(), "{request} failed: {reply}");
        reply["result"].clone()
    }

    /// `call` expecting an error; returns its code.
    pub async fn err(&mut self, request: Value) -> String {
        let reply = self.call(request.clone()).await;
        reply["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{request} should fail: {reply}"))
            .to_owned()
    }

    /// The next push with `ev == kind` (earlier other pushes are kept).
    pub async fn push(&mut self, kind: &str) -> Value {
        if let Some(i) = self.pushes.iter().position(|p| p["ev"] == kind) {
            return self.pushes.remove(i).unwrap();
        }
        loop {
            let v = self.recv().await.expect("push before close");
            if v["ev"] == kind {
                return v;
            }
            self.pushes.push_back(v);
        }
    }

    /// Waits for `synced`.
    pub async fn synced(&mut self) {
        self.push("synced").await;
    }

    /// Asserts that no push of `kind` arrives within `wait`.
    pub async fn no_push(&mut self, kind: &str, wait: Duration) {
        assert!(
            !self.pushes.iter().any(|p| p["ev"] == kind),
            "unexpected {kind} push: {:?}",
            self.pushes
        );
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(msg) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    assert_ne!(v["ev"], kind, "unexpected push {v}");
                    self.pushes.push_back(v);
                }
                Some(Ok(_)) => {}
                _ => return,
            }
        }
    }

    pub async fn send_msg(&mut self, chat: &str, cmid: &str, body: &str) -> Value {
        self.ok(json!({"op": "send", "chat": chat, "cmid": cmid, "body": body}))
            .await
    }

    pub async fn create(&mut self, members: &[&str], title: &str) -> String {
        let r = self
            .ok(json!({"op": "create_chat", "members": members, "title": title}))
            .await;
        r["chat"].as_str().unwrap().to_owned()
    }
}

/// A token for `user` expiring at `exp` (seconds since the epoch), signed with `secret`.
pub fn token_signed(user: &str, exp: u64, secret: &str) -> String {
    Auth::new(secret.as_bytes()).unwrap().sign(user, exp)
}

/// Opens a WebSocket, sends `first` as its first text frame, and returns the frames received
/// until the server closed, with the close code (`None` if the socket ended without one).
pub async fn refused(url: &str, first: &str) -> (Vec<Value>, Option<u16>) {
    let mut ws = Client::raw(url).await;
    ws.send(Message::text(first.to_owned())).await.unwrap();
    frames_until_close(&mut ws).await
}

/// Reads a raw socket until the server closes it: (text frames, close code).
pub async fn frames_until_close(
    ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>,
) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("server closed in time");
        match msg {
            Some(Ok(Message::Text(t))) => frames.push(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(frame))) => return (frames, frame.map(|f| f.code.into())),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (frames, None),
        }
    }
}

/// `GET /metrics` as text.
pub async fn metrics_text(addr: SocketAddr) -> String {
    let (status, body, _) = http(addr, "GET", "/metrics", None, &[])
        .await
        .expect("metrics answer");
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap()
}

/// The sum of every sample of metric `name` (any labels) in a Prometheus text body; `None`
/// if the metric has no sample.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// Polls `check` until it returns `Some`, for at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

impl Client {
    /// The chat's `last_seq` as `history` reports it.
    pub async fn last_seq(&mut self, chat: &str) -> u64 {
        let h = self
            .ok(json!({"op": "history", "chat": chat, "limit": 1}))
            .await;
        h["last_seq"].as_u64().unwrap()
    }

    /// Every event of the chat, through `history` pages.
    pub async fn all_events(&mut self, chat: &str) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        loop {
            let after = out.last().map_or(0, |e| e["seq"].as_u64().unwrap());
            let h = self
                .ok(json!({"op": "history", "chat": chat, "after": after, "limit": 500}))
                .await;
            let page = h["events"].as_array().unwrap().clone();
            if page.is_empty() {
                return out;
            }
            out.extend(page);
        }
    }

    /// Every frame (stashed pushes first) up to and including the first one matching
    /// `until`.
    pub async fn frames_until(&mut self, until: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = self.pushes.pop_front() {
            let done = until(&v);
            out.push(v);
            if done {
                return out;
            }
        }
        loop {
            let v = self.recv().await.expect("frame before close");
            let done = until(&v);
            out.push(v);
            if done {
                return out;
            }
        }
    }

    /// The pushed event of `chat` with `seq`, with every frame before it.
    pub async fn until_event(&mut self, chat: &str, seq: u64) -> Vec<Value> {
        self.frames_until(|v| {
            v["ev"] == "event" && v["event"]["chat"] == chat && v["event"]["seq"] == seq
        })
        .await
    }
}

impl Client {
    /// Like [`Client::connect`], over a socket whose kernel receive buffer is asked to be
    /// `recv_buffer_bytes` (so a client that stops reading backs up sooner).
    pub async fn connect_small_buffer(
        url: &str,
        token: &str,
        device: &str,
        recv_buffer_bytes: u32,
    ) -> Client {
        let addr: SocketAddr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(recv_buffer_bytes).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
        Self::hello_on(ws, token, device, None).await
    }
}

impl Client {
    /// Turns off Nagle's algorithm on this client's socket.
    pub fn set_nodelay(&self) {
        if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            s.set_nodelay(true).unwrap();
        }
    }
}

/// A WebSocket client written by hand over TCP: it does only what the test tells it (in
/// particular it never answers pings, unlike tungstenite, which answers them while reading).
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One frame as received by [`RawWs`].
#[derive(Debug, Clone, PartialEq)]
pub enum RawFrame {
    Text(Value),
    Ping,
    Pong,
    Close(Option<u16>),
    Other(u8),
}

impl RawWs {
    /// TCP connect and the upgrade handshake.
    pub async fn connect(addr: SocketAddr) -> RawWs {
        use tokio::io::AsyncWriteExt;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut ws = RawWs {
            stream,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(ws.fill().await, "connection closed during the handshake");
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        ws.buf.drain(..end + 4);
        ws
    }

    async fn fill(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("server sent something in time")
        {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Sends one masked text frame.
    pub async fn send_text(&mut self, text: &str) {
        assert!(self.try_send_text(text).await, "sending a frame failed");
    }

    /// Sends one masked text frame; `false` if the connection failed.
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        self.try_send_frame(true, 0x1, text.as_bytes()).await
    }

    /// Sends one masked frame with `opcode` (`fin` unset: a fragment that more follow).
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        assert!(
            self.try_send_frame(fin, opcode, payload).await,
            "sending a frame failed"
        );
    }

    /// Sends one masked frame; `false` if the connection failed.
    pub async fn try_send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> bool {
        use tokio::io::AsyncWriteExt;
        let mut frame = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= u16::MAX as usize => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.is_ok()
    }

    /// The next frame, or `None` once the server closed the TCP connection.
    pub async fn frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = Self::parse(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// One frame from the front of `buf` and the bytes it used, if it holds a whole one.
    pub fn parse(buf: &[u8]) -> Option<(RawFrame, usize)> {
        if buf.len() < 2 {
            return None;
        }
        let opcode = buf[0] & 0x0f;
        let masked = buf[1] & 0x80 != 0;
        let (len, mut at) = match buf[1] & 0x7f {
            126 => (
                u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
                4,
            ),
            127 => (
                u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let mask = if masked {
            let m: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
            at += 4;
            Some(m)
        } else {
            None
        };
        let mut payload = buf.get(at..at + len)?.to_vec();
        if let Some(m) = mask {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b ^= m[i % 4]);
        }
        let frame = match opcode {
            0x1 => RawFrame::Text(serde_json::from_slice(&payload).unwrap()),
            0x8 => RawFrame::Close(
                (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
            ),
            0x9 => RawFrame::Ping,
            0xa => RawFrame::Pong,
            other => RawFrame::Other(other),
        };
        Some((frame, at + len))
    }

    /// Sends `hello` and reads up to `synced`.
    pub async fn hello(&mut self, user: &str, device: &str) {
        self.hello_token(&token(user), device).await;
    }

    /// Sends `hello` with `token` and reads up to `synced`.
    pub async fn hello_token(&mut self, token: &str, device: &str) {
        let hello = json!({"op": "hello", "token": token, "device": device});
        self.send_text(&hello.to_string()).await;
        loop {
            match self.frame().await.expect("hello answered") {
                RawFrame::Text(v) if v["ev"] == "synced" => return,
                RawFrame::Text(v) => assert!(v.get("error").is_none(), "{v}"),
                _ => {}
            }
        }
    }

    /// The TCP stream, for tests that write frames by hand.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Every frame until the server ends the TCP connection.
    pub async fn until_eof(&mut self) -> Vec<RawFrame> {
        let mut frames = Vec::new();
        while let Some(f) = self.frame().await {
            frames.push(f);
        }
        frames
    }
}
