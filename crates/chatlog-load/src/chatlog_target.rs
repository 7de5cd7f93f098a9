//! chatlog-server through its public WebSocket protocol (`shared/PROTOCOL.md`).
//!
//! The parent creates the chats ([`create_chats`]): one connection per creating user, device
//! `<run>-setup`, `create_chat` with the other members and the title `load-<run>-<chat>`. Each
//! worker then runs one task per connection ([`run_connection`]): `hello` with a token minted from
//! `--secret`, wait for `synced`, then send and receive until told to stop. The pacing is the
//! shared [`crate::send_loop`]; this module's [`Transport`] sends `send` requests and reads the
//! replies and pushed events from the same socket.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::cli::Args;
use crate::send_loop::{self, ConnectionLost, Context, Transport};
use crate::stats::Recorder;
use crate::worker::{Phase, ReadyReport, Shared};
use crate::workload::{self, Layout};

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// Lifetime of the tokens minted for the run.
const TOKEN_TTL_SECS: u64 = 24 * 60 * 60;
/// Attempts to open one connection (TCP connect and WebSocket handshake) before giving up.
const CONNECT_ATTEMPTS_MAX: u32 = 5;
/// Pause after the first failed attempt; doubled after each further one.
const CONNECT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait for a handshake, or for `synced` after `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for any reply during chat creation.
const SETUP_REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Creating users connected at once while the parent creates chats.
const SETUP_CONNECTIONS_MAX: usize = 32;
/// `create_chat` requests one setup connection has outstanding.
const CREATE_PIPELINE_MAX: usize = 32;
/// Longest wait for the server to answer our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Client read buffer per connection (tungstenite allocates it eagerly; its default of 128 KiB
/// would cost 2 GiB at 15,000 connections in one process).
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// Where chatlog-server listens, from `--url`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    url: String,
    host_port: String,
}

impl Endpoint {
    /// Parses a `ws://host[:port]/path` URL (no TLS: the server is local).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("parsing --url {url}"))?;
        if uri.scheme_str() != Some("ws") {
            bail!("--url must be ws://HOST[:PORT]/PATH, got {url}");
        }
        let host = uri.host().context("--url has no host")?;
        let port = uri.port_u16().unwrap_or(80);
        Ok(Self {
            url: url.to_owned(),
            host_port: format!("{host}:{port}"),
        })
    }

    /// The server's socket address.
    pub async fn resolve(&self) -> anyhow::Result<SocketAddr> {
        crate::worker::resolve(&self.host_port).await
    }
}

/// JWT claims the server reads.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

/// An HS256 token for `user`, valid for [`TOKEN_TTL_SECS`].
pub fn mint_token(secret: &str, user: &str) -> anyhow::Result<String> {
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let claims = Claims {
        sub: user,
        exp: now_secs + TOKEN_TTL_SECS,
    };
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).context("HS256 key")?;
    jsonwebtoken::encode(&header, &claims, &key).context("signing a token")
}

/// Opens a WebSocket to `url` at `addr`, from local address `source` if given, retrying transient failures.
/// The error is a short kind for the error counters.
pub async fn open(url: &str, addr: SocketAddr, source: Option<IpAddr>) -> Result<Ws, String> {
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let mut backoff = CONNECT_RETRY_BACKOFF;
    let mut last_error = String::new();
    for attempt in 1..=CONNECT_ATTEMPTS_MAX {
        let result = async {
            let stream = crate::worker::open_socket(addr, source)
                .await
                .map_err(|e| format!("connect:{:?}", e.kind()))?;
            let handshake = tokio_tungstenite::client_async_with_config(url, stream, Some(config));
            match tokio::time::timeout(HELLO_TIMEOUT, handshake).await {
                Ok(Ok((ws, _response))) => Ok(ws),
                Ok(Err(_)) => Err("handshake".to_owned()),
                Err(_) => Err("handshake:timeout".to_owned()),
            }
        }
        .await;
        match result {
            Ok(ws) => return Ok(ws),
            Err(kind) => last_error = kind,
        }
        if attempt < CONNECT_ATTEMPTS_MAX {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    Err(last_error)
}

/// A frame from the server, borrowing from its text. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct Incoming<'a> {
    #[serde(borrow, default)]
    ev: Option<Cow<'a, str>>,
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(borrow, default)]
    event: Option<EventIn<'a>>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub error: Option<ErrorIn<'a>>,
}

/// The fields of a pushed event the load generator needs.
#[derive(Debug, Deserialize)]
struct EventIn<'a> {
    #[serde(borrow)]
    chat: &'a RawValue,
    seq: u64,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    sender: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    body: Option<Cow<'a, str>>,
}

/// An error object.
#[derive(Debug, Deserialize)]
pub struct ErrorIn<'a> {
    #[serde(borrow)]
    pub code: Cow<'a, str>,
}

/// The result of `create_chat`.
#[derive(Debug, Deserialize)]
struct CreatedChat<'a> {
    #[serde(borrow)]
    chat: &'a RawValue,
}

/// The error kind of a close frame, for the counters.
fn close_kind(frame: Option<&tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(frame) => format!("close:{}", u16::from(frame.code)),
        None => "close:none".to_owned(),
    }
}

/// Sends `hello` and waits for `synced`. Events replayed before `synced` are ignored (devices are
/// new in every run, so there are none).
pub async fn hello(ws: &mut Ws, token: &str, device: &str) -> Result<(), String> {
    let frame = serde_json::json!({"op": "hello", "token": token, "device": device});
    ws.send(Message::text(frame.to_string()))
        .await
        .map_err(|_| "hello:send".to_owned())?;
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| "hello:timeout".to_owned())?;
        match frame {
            Some(Ok(Message::Text(text))) => {
                let incoming: Incoming<'_> = serde_json::from_str(text.as_str())
                    .map_err(|_| "hello:bad_frame".to_owned())?;
                if let Some(error) = incoming.error {
                    return Err(format!("hello:error:{}", error.code));
                }
                if incoming.ev.as_deref() == Some("synced") {
                    return Ok(());
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("hello:{}", close_kind(frame.as_ref())));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) => return Err("hello:websocket_error".to_owned()),
            None => return Err("hello:disconnected".to_owned()),
        }
    }
}

/// Creates every chat of the layout through the protocol and returns, per chat index, its id as
/// JSON text. Chats are grouped by creator: one connection per creating user.
pub async fn create_chats(
    args: &Args,
    layout: &Layout,
    run_id: &str,
) -> anyhow::Result<Vec<String>> {
    let mut endpoints = Vec::new();
    for url in args.urls() {
        let endpoint = Endpoint::parse(url)?;
        let addr = endpoint.resolve().await?;
        endpoints.push((endpoint, addr));
    }
    if endpoints.is_empty() {
        bail!("--url names no server");
    }
    let mut by_creator: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for chat in 0..layout.chats() {
        by_creator
            .entry(layout.creator(chat))
            .or_default()
            .push(chat);
    }
    let permits = Arc::new(Semaphore::new(SETUP_CONNECTIONS_MAX));
    let mut tasks = JoinSet::new();
    for (creator, chats) in by_creator {
        let permits = Arc::clone(&permits);
        // The creator's own connection goes to the server its workers use (`i % n`).
        let (endpoint, addr) = endpoints[creator % endpoints.len()].clone();
        let members: Vec<Vec<String>> = chats
            .iter()
            .map(|&chat| {
                layout
                    .members(chat)
                    .filter(|&user| user != creator)
                    .map(|user| workload::user_name(&args.user_prefix, user))
                    .collect()
            })
            .collect();
        let titles: Vec<String> = chats
            .iter()
            .map(|&c| workload::chat_title(run_id, c))
            .collect();
        let user = workload::user_name(&args.user_prefix, creator);
        let token = mint_token(&args.secret, &user)?;
        let device = format!("{run_id}-setup");
        tasks.spawn(async move {
            let _permit = permits.acquire().await?;
            let mut ws = open(&endpoint.url, addr, None)
                .await
                .map_err(|kind| anyhow::anyhow!("setup connection for {user}: {kind}"))?;
            hello(&mut ws, &token, &device)
                .await
                .map_err(|kind| anyhow::anyhow!("setup hello for {user}: {kind}"))?;
            let ids = create_pipelined(&mut ws, &members, &titles)
                .await
                .with_context(|| format!("creating the chats of {user}"))?;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
            anyhow::Ok(chats.into_iter().zip(ids).collect::<Vec<_>>())
        });
    }
    let mut chat_ids: Vec<Option<String>> = vec![None; layout.chats()];
    while let Some(joined) = tasks.join_next().await {
        for (chat, id) in joined.context("setup task panicked")?? {
            chat_ids[chat] = Some(id);
        }
    }
    chat_ids
        .into_iter()
        .enumerate()
        .map(|(chat, id)| id.with_context(|| format!("chat {chat} was not created")))
        .collect()
}

/// Sends one `create_chat` per entry of `members`/`titles` with at most
/// [`CREATE_PIPELINE_MAX`] outstanding, and returns the chat ids in order.
async fn create_pipelined(
    ws: &mut Ws,
    members: &[Vec<String>],
    titles: &[String],
) -> anyhow::Result<Vec<String>> {
    assert_eq!(members.len(), titles.len());
    let mut ids: Vec<Option<String>> = vec![None; members.len()];
    let (mut next, mut done, mut outstanding) = (0usize, 0usize, 0usize);
    while done < members.len() {
        while outstanding < CREATE_PIPELINE_MAX && next < members.len() {
            let frame = serde_json::json!({
                "op": "create_chat",
                "id": next,
                "members": members[next],
                "title": titles[next],
            });
            ws.send(Message::text(frame.to_string())).await?;
            next += 1;
            outstanding += 1;
        }
        let frame = tokio::time::timeout(SETUP_REPLY_TIMEOUT, ws.next())
            .await
            .context("no reply to create_chat")?;
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                bail!("server closed: {}", close_kind(frame.as_ref()))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("server disconnected"),
        };
        let incoming: Incoming<'_> = serde_json::from_str(text.as_str())
            .with_context(|| format!("parsing {}", text.as_str()))?;
        let Some(id) = incoming.id else { continue };
        let index = usize::try_from(id)
            .ok()
            .filter(|&i| i < next && ids[i].is_none());
        let Some(index) = index else {
            bail!("reply to an unknown request: {}", text.as_str())
        };
        if let Some(error) = incoming.error {
            bail!("create_chat failed: {}", error.code);
        }
        let result = incoming.result.context("create_chat reply has no result")?;
        let created: CreatedChat<'_> = serde_json::from_str(result.get())?;
        ids[index] = Some(created.chat.get().to_owned());
        done += 1;
        outstanding -= 1;
    }
    Ok(ids.into_iter().flatten().collect())
}

/// Whether `seq` may follow `last` on one connection: the protocol promises increasing seqs with
/// no gaps from the point the connection started.
fn follows(last: Option<u64>, seq: u64) -> bool {
    last.is_none_or(|last| seq == last + 1)
}

/// One worker connection: its socket, its user, its chats and what is in flight.
struct Connection {
    ws: Ws,
    index: usize,
    user: String,
    /// Server chat ids (JSON text) of the connection's chats, in send order.
    chat_ids: Vec<String>,
    /// Server chat id → position in `chat_ids`.
    slot_by_chat_id: HashMap<String, usize>,
    /// Last seq seen per chat slot.
    last_seq: Vec<Option<u64>>,
    next_request: u64,
    /// Request id → when it was sent.
    inflight: HashMap<u64, Instant>,
}

/// Runs connection `index` of the layout until the worker reaches [`Phase::Done`].
pub async fn run_connection(shared: Arc<Shared>, index: usize, mut ready: ReadyReport) {
    let Some(ws) = shared
        .set_up_connection(&mut ready, set_up(&shared, index))
        .await
    else {
        return;
    };
    let chat_ids = shared.chat_ids_of_connection(index);
    let slot_by_chat_id = chat_ids
        .iter()
        .enumerate()
        .map(|(slot, id)| (id.clone(), slot))
        .collect();
    let chats = chat_ids.len();
    let mut connection = Connection {
        ws,
        index,
        user: shared.user_name_of_connection(index),
        last_seq: vec![None; chats],
        chat_ids,
        slot_by_chat_id,
        next_request: 0,
        inflight: HashMap::new(),
    };
    let mut recorder = Recorder::default();
    let phase = send_loop::run(&mut connection, &shared, index, chats, &mut recorder).await;
    if phase == Phase::Done {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.ws.close(None)).await;
    }
    recorder.flush(&shared.stats);
}

/// Opens, authenticates and waits for `synced`.
async fn set_up(shared: &Shared, index: usize) -> Result<Ws, String> {
    let user = shared.user_name_of_connection(index);
    let device = workload::device_name(
        &shared.plan.run_id,
        shared.layout.device_of_connection(index),
    );
    let token = mint_token(&shared.args.secret, &user).map_err(|_| "token".to_owned())?;
    let server = shared.server_of(index);
    let mut ws = open(&server.url, server.addr, server.source_ip).await?;
    hello(&mut ws, &token, &device).await?;
    Ok(ws)
}

impl Transport for Connection {
    type Event = Option<Result<Message, WsError>>;

    fn outstanding(&self) -> usize {
        self.inflight.len()
    }

    async fn next_event(&mut self) -> Self::Event {
        self.ws.next().await
    }

    fn on_event(
        &mut self,
        frame: Self::Event,
        context: &mut Context<'_>,
    ) -> Result<(), ConnectionLost> {
        let lost = match frame {
            Some(Ok(Message::Text(text))) => {
                self.on_text(text.as_str(), context);
                return Ok(());
            }
            Some(Ok(Message::Close(frame))) => close_kind(frame.as_ref()),
            Some(Ok(_)) => return Ok(()),
            Some(Err(_)) => "websocket_error".to_owned(),
            None => "disconnected".to_owned(),
        };
        context.recorder.error(&lost);
        Err(ConnectionLost)
    }

    async fn send(&mut self, slot: usize, context: &mut Context<'_>) -> Result<(), ConnectionLost> {
        let id = self.next_request;
        self.next_request += 1;
        let cmid = workload::cmid(&context.shared.plan.run_id, self.index, id);
        let body = workload::encode_body(workload::now_us(), context.shared.args.body_bytes);
        // The chat id is JSON text from the server; cmid and body are ASCII that needs no
        // escaping (see `workload`).
        let frame = format!(
            r#"{{"op":"send","id":{id},"chat":{},"cmid":"{cmid}","body":"{body}"}}"#,
            self.chat_ids[slot]
        );
        self.inflight.insert(id, Instant::now());
        self.ws.send(Message::text(frame)).await.map_err(|_| {
            context.recorder.error("send_failed");
            ConnectionLost
        })
    }
}

impl Connection {
    /// Handles one text frame: a reply to a send, a pushed event, or anything else.
    fn on_text(&mut self, text: &str, context: &mut Context<'_>) {
        let recorder = &mut *context.recorder;
        let Ok(incoming) = serde_json::from_str::<Incoming<'_>>(text) else {
            recorder.error("bad_frame");
            return;
        };
        if let Some(id) = incoming.id {
            let Some(sent_at) = self.inflight.remove(&id) else {
                recorder.error("reply_to_unknown_request");
                return;
            };
            let outcome = match incoming.error {
                Some(error) => Err(format!("error:{}", error.code)),
                None => Ok(()),
            };
            context.end_send(sent_at, outcome);
            return;
        }
        if let Some(error) = incoming.error {
            recorder.error(&format!("error:{}", error.code));
            return;
        }
        if incoming.ev.as_deref() != Some("event") {
            return;
        }
        let Some(event) = incoming.event else {
            recorder.error("event_without_body");
            return;
        };
        let Some(&slot) = self.slot_by_chat_id.get(event.chat.get()) else {
            recorder.error("event_of_unknown_chat");
            return;
        };
        if !follows(self.last_seq[slot], event.seq) {
            recorder.counts().order_violations += 1;
        }
        self.last_seq[slot] = Some(event.seq);
        if event.kind != "message" || context.phase != Phase::Measure {
            return;
        }
        let Some(sent_us) = event.body.as_deref().and_then(workload::decode_body) else {
            recorder.error("message_without_timestamp");
            return;
        };
        let latency_us = workload::now_us().saturating_sub(sent_us);
        let to_other_user = event.sender.as_deref() != Some(self.user.as_str());
        recorder.delivery(latency_us, to_other_user, &context.shared.stats);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_event_push() {
        let text = r#"{"ev":"event","event":{"chat":17,"seq":4,"kind":"message","sender":"u3","ts":1,"cmid":"a","body":"ts=5;xx","file":null}}"#;
        let incoming: Incoming<'_> = serde_json::from_str(text).unwrap();
        assert_eq!(incoming.ev.as_deref(), Some("event"));
        let event = incoming.event.unwrap();
        assert_eq!(event.chat.get(), "17");
        assert_eq!(event.seq, 4);
        assert_eq!(event.kind, "message");
        assert_eq!(event.sender.as_deref(), Some("u3"));
        assert_eq!(
            event.body.as_deref().and_then(workload::decode_body),
            Some(5)
        );
    }

    #[test]
    fn parses_replies_and_errors() {
        let ok: Incoming<'_> =
            serde_json::from_str(r#"{"id":7,"result":{"chat":"c1","seq":2,"ts":3}}"#).unwrap();
        assert_eq!(ok.id, Some(7));
        assert!(ok.error.is_none());
        let created: CreatedChat<'_> = serde_json::from_str(ok.result.unwrap().get()).unwrap();
        assert_eq!(created.chat.get(), r#""c1""#);
        let err: Incoming<'_> = serde_json::from_str(
            r#"{"id":8,"error":{"code":"rate_limited","message":"m","retry_after_ms":5}}"#,
        )
        .unwrap();
        assert_eq!(err.error.unwrap().code, "rate_limited");
        let deleted: Incoming<'_> = serde_json::from_str(
            r#"{"ev":"event","event":{"chat":1,"seq":9,"kind":"message","sender":"u","ts":1,"body":null}}"#,
        )
        .unwrap();
        assert!(deleted.event.unwrap().body.is_none());
    }

    #[test]
    fn seqs_must_follow_without_gaps() {
        assert!(follows(None, 5));
        assert!(follows(Some(5), 6));
        assert!(!follows(Some(5), 5));
        assert!(!follows(Some(5), 7));
        assert!(!follows(Some(5), 4));
    }

    #[test]
    fn urls_name_a_host_and_port() {
        let endpoint = Endpoint::parse("ws://127.0.0.1:9000/v1/ws").unwrap();
        assert_eq!(endpoint.host_port, "127.0.0.1:9000");
        assert_eq!(
            Endpoint::parse("ws://localhost/v1/ws").unwrap().host_port,
            "localhost:80"
        );
        assert!(Endpoint::parse("wss://example.invalid/v1/ws").is_err());
        assert!(Endpoint::parse("not a url").is_err());
    }

    #[test]
    fn tokens_carry_the_user_and_an_expiry() {
        let token = mint_token("secret", "u7").unwrap();
        let key = jsonwebtoken::DecodingKey::from_secret(b"secret").unwrap();
        let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        let data = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).unwrap();
        assert_eq!(data.claims["sub"], "u7");
        assert!(data.claims["exp"].as_u64().unwrap() > workload::now_us() / 1_000_000);
    }
}
