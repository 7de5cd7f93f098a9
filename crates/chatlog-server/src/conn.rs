//! One WebSocket connection: handshake, resume, then a single task that reads requests,
//! writes replies in request order, drains the connection's [`Outbox`], pings, and enforces
//! the idle timeout and token expiry.
//!
//! Writes are pipelined: a request's engine ticket is submitted as soon as the frame is read
//! (so a connection's sends are sequenced in the order it sent them), and its reply is
//! written once durable. At most [`INFLIGHT_PER_CONNECTION_MAX`] requests wait at once; past
//! that the connection is not read, which pushes back on the client through TCP.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatlog::engine::{Answer, ChatError, HISTORY_LIMIT_MAX, Ticket};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};

use crate::App;
use crate::config::{INFLIGHT_PER_CONNECTION_MAX, PRESENCE_WATCHES_PER_CONNECTION_MAX};
use crate::hub::{Outbox, Push};
use crate::metrics as m;
use crate::oversize::{self, Limited};
use crate::protocol::{self, Code, Failure, Request, RequestId};

/// Close codes of PROTOCOL.md, plus 1013 (see docs/protocol.md) and 1009 (a safety net).
pub mod close {
    /// Server shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Authentication failed (or the token expired).
    pub const POLICY: u16 = 1008;
    /// A message tungstenite refused as too large (`oversize::Limited` drops those before
    /// tungstenite reads them, so this is not expected).
    pub const TOO_BIG: u16 = 1009;
    /// The user has too many live connections.
    pub const TRY_LATER: u16 = 1013;
    /// No inbound frame or pong for the idle timeout.
    pub const IDLE: u16 = 4000;
    /// The outbound queue overflowed.
    pub const TOO_SLOW: u16 = 4001;
}

/// The upgraded connection.
type WebSocket = WebSocketStream<Limited<TokioIo<Upgraded>>>;

type ReplyFuture = Pin<Box<dyn Future<Output = String> + Send>>;

/// Inbound traffic refreshes presence at most this often per connection (and at least four
/// times per presence TTL, so a busy connection never expires).
const PRESENCE_REFRESH_MS_MAX: u64 = 5_000;
/// After sending a Close frame, read (and discard) until the peer's Close, end of stream or
/// this long, so the close frame and the replies before it are not lost to a TCP reset caused
/// by unread client data.
const CLOSE_LINGER_MS: u64 = 2_000;

struct Session {
    user: Arc<str>,
    device: String,
    outbox: Arc<Outbox>,
    /// Per chat, the last seq written to this connection (drops duplicates between resume and
    /// live pushes).
    last_sent: LastSent,
    watching: Vec<String>,
    token_expires: Instant,
}

/// Completes the WebSocket upgrade and serves the connection until it closes. The socket is
/// built here, inside the connection's own task, so the task holds the one copy of it.
pub async fn serve(app: Arc<App>, on_upgrade: OnUpgrade, config: WebSocketConfig) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket upgrade failed");
            return;
        }
    };
    // Messages above the limit are dropped below tungstenite, never buffered (`oversize`).
    let stream = Limited::new(TokioIo::new(upgraded), app.config.max_frame_bytes);
    let mut socket = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
    let socket = &mut socket;
    // Boxed: the handshake's state is large and needed only once; the connection's task keeps
    // only the main loop's state for its lifetime (idle memory per connection).
    let Some(session) = Box::pin(handshake(&app, socket)).await else {
        return;
    };
    metrics::gauge!(m::CONNECTIONS).increment(1.0);
    // Not boxed and not moved: one copy of the socket lives in this task for its lifetime.
    let session = run(&app, socket, session).await;
    app.hub.unregister(&session.outbox);
    app.presence.unwatch(&session.outbox, &session.watching);
    app.presence.disconnect(&session.user, session.outbox.id);
    metrics::gauge!(m::CONNECTIONS).decrement(1.0);
}

async fn close_with(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from(reason.to_owned()),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let linger = tokio::time::sleep(Duration::from_millis(CLOSE_LINGER_MS));
    tokio::pin!(linger);
    loop {
        tokio::select! {
            () = &mut linger => return,
            next = socket.next() => match next {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// The first frame that is not a WebSocket ping or pong.
async fn first_data_frame(socket: &mut WebSocket) -> Option<Result<Message, tungstenite::Error>> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => return other,
        }
    }
}

async fn send_text(socket: &mut WebSocket, text: String) -> bool {
    socket
        .send(Message::Text(Utf8Bytes::from(text)))
        .await
        .is_ok()
}

/// Refuses a connection during `hello`: `unauthorized` with `message`, then close 1008.
async fn refuse_hello(socket: &mut WebSocket, id: Option<&RequestId>, message: String) {
    let f = Failure::new(Code::Unauthorized, message);
    close_after(
        socket,
        protocol::error(id, &f),
        close::POLICY,
        "authentication failed",
    )
    .await;
}

/// How long a cluster node waits, at `hello`, to apply what the leader has committed. Longer
/// than a failover (a leader's death to the next leader's first answer: 0.9–2.1 s measured),
/// so a client moving during one resumes after its cursors; short enough that a client
/// arriving at a node without a majority hears `welcome` before a 5 s timeout of its own.
const READ_BARRIER_TIMEOUT: Duration = Duration::from_secs(3);

/// Waits for `hello`, authenticates, registers the connection, resumes. `None` if the
/// connection ended.
async fn handshake(app: &Arc<App>, socket: &mut WebSocket) -> Option<Session> {
    let timeout = Duration::from_millis(app.config.handshake_timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    let first = tokio::select! {
        r = tokio::time::timeout_at(deadline, first_data_frame(socket)) => r,
        () = app.cancel.cancelled() => {
            close_with(socket, close::GOING_AWAY, "server shutting down").await;
            return None;
        }
    };
    let text = match first {
        Err(_) => {
            let f = Failure::new(Code::Unauthorized, "no hello within the handshake timeout");
            close_after(
                socket,
                protocol::error(None, &f),
                close::POLICY,
                "handshake timeout",
            )
            .await;
            return None;
        }
        Ok(None | Some(Err(_))) => return None,
        Ok(Some(Ok(Message::Text(t)))) if t.len() <= app.config.max_frame_bytes => t,
        Ok(Some(Ok(other))) => {
            let skipped = match &other {
                Message::Binary(b) => oversize::skipped(b),
                _ => None,
            };
            let message = match skipped {
                Some(size) => format!(
                    "hello of {size} bytes is above the limit of {}",
                    app.config.max_frame_bytes
                ),
                None => "the first frame must be a hello text frame".into(),
            };
            refuse_hello(socket, None, message).await;
            return None;
        }
    };
    let (id, token, device, since) = match protocol::parse(text.as_str()) {
        Ok((
            id,
            Request::Hello {
                token,
                device,
                since,
            },
        )) => (id, token, device, since),
        Ok((id, _)) => {
            refuse_hello(socket, Some(&id), "the first frame must be hello".into()).await;
            return None;
        }
        Err((id, f)) => {
            refuse_hello(socket, id.as_ref(), format!("bad hello: {}", f.message)).await;
            return None;
        }
    };
    let now_ms = app.now_ms();
    let claims = match app.auth.verify(&token, crate::auth::secs(now_ms)) {
        Ok(c) => c,
        Err(e) => {
            refuse_hello(socket, Some(&id), e.to_string()).await;
            return None;
        }
    };
    let device = device.unwrap_or_else(|| "default".to_owned());
    if let Err(e) = chatlog::engine::types::check_device(&device) {
        refuse_hello(socket, Some(&id), format!("bad hello: {e}")).await;
        return None;
    }
    if let Some(node) = &app.cluster {
        // A client that moves to this node (its node died, or it reconnected elsewhere) must
        // find here at least what it wrote and acknowledged before: wait until this node
        // has applied everything committed so far. Without a reachable leader it resumes
        // from this node's state as it is.
        if let Err(why) = node.read_barrier(READ_BARRIER_TIMEOUT).await {
            tracing::debug!(%why, "resuming without a read barrier");
        }
    }
    let user: Arc<str> = Arc::from(claims.sub.as_str());
    let outbox = Arc::new(Outbox::new(
        app.hub.next_id(),
        user.clone(),
        app.config.outbound_queue,
    ));
    if app.presence.connect(&user, outbox.id).is_err() {
        let f = Failure {
            code: Code::RateLimited,
            message: format!("{user} has too many live connections"),
            retry_after_ms: Some(1000),
        };
        let _ = send_text(socket, protocol::error(Some(&id), &f)).await;
        close_with(
            socket,
            close::TRY_LATER,
            "too many connections for this user",
        )
        .await;
        return None;
    }
    // Registered before the resume scan: every event committed after the scan reaches the
    // outbox, and duplicates of scanned events are dropped by `last_sent`.
    app.hub.register(outbox.clone());
    let expires_in_ms = (claims.exp.saturating_mul(1000)).saturating_sub(now_ms);
    let mut session = Session {
        user,
        device,
        outbox,
        last_sent: LastSent::default(),
        watching: Vec::new(),
        token_expires: Instant::now() + Duration::from_millis(expires_in_ms),
    };
    let ok = send_text(socket, protocol::welcome(&session.user, &session.device)).await
        && resume(app, socket, &mut session, since).await;
    if !ok {
        app.hub.unregister(&session.outbox);
        app.presence.disconnect(&session.user, session.outbox.id);
        return None;
    }
    Some(session)
}

/// Pushes every event after the device's cursors (or `since`), chat by chat, then `synced`.
async fn resume(
    app: &Arc<App>,
    socket: &mut WebSocket,
    session: &mut Session,
    since: HashMap<String, u64>,
) -> bool {
    // Registering a new device is a durable write: await it without holding a thread.
    let registered = app
        .engine()
        .register_device_ticket(&session.user, &session.device)
        .await;
    let points = registered.and_then(|_| {
        app.engine()
            .resume_points_registered(&session.user, &session.device, &since)
    });
    let points = match points {
        Ok(p) => p,
        Err(e) => {
            let _ = send_text(socket, protocol::error(None, &Failure::from(e))).await;
            close_with(socket, close::GOING_AWAY, "storage unavailable").await;
            return false;
        }
    };
    for point in points {
        let chat: Arc<str> = Arc::from(point.chat.as_str());
        let mut after = point.after;
        while after < point.last_seq {
            let limit = ((point.last_seq - after) as usize).min(HISTORY_LIMIT_MAX);
            // Index + mmap reads: microseconds per page, done inline.
            let page =
                app.engine()
                    .history(&session.user, &point.chat, None, Some(after), Some(limit));
            let page = match page {
                Ok(page) => page,
                // Removed while resuming: nothing more of this chat is theirs.
                Err(ChatError::Forbidden(_) | ChatError::NotFound(_)) => break,
                Err(e) => {
                    let _ = send_text(socket, protocol::error(None, &Failure::from(e))).await;
                    close_with(socket, close::GOING_AWAY, "storage unavailable").await;
                    return false;
                }
            };
            let Some(last) = page.events.last() else {
                break;
            };
            after = last.event.seq;
            for event in page.events.iter().filter(|e| e.event.seq <= point.last_seq) {
                let frame = Utf8Bytes::from(protocol::resume_push(event));
                if socket.feed(Message::Text(frame)).await.is_err() {
                    return false;
                }
            }
        }
        session.last_sent.accept(chat, point.last_seq);
    }
    socket
        .feed(Message::Text(Utf8Bytes::from_static(protocol::SYNCED)))
        .await
        .is_ok()
        && socket.flush().await.is_ok()
}

/// The main loop; returns the session for cleanup.
async fn run(app: &Arc<App>, socket: &mut WebSocket, mut session: Session) -> Session {
    let mut inflight: FuturesOrdered<ReplyFuture> = FuturesOrdered::new();
    let idle = Duration::from_millis(app.config.idle_timeout_ms);
    let ping_every = app.config.ping_interval();
    let mut last_inbound = Instant::now();
    let mut last_presence = Instant::now();
    let presence_refresh_ms = (app.config.presence_ttl_ms / 4).min(PRESENCE_REFRESH_MS_MAX);
    // One timer for pings, the idle timeout and token expiry, moved only when it fires (it
    // may fire early because traffic moved the idle deadline; it then re-arms).
    let mut next_ping = last_inbound + ping_every;
    let timer = tokio::time::sleep_until(next_ping.min(session.token_expires).into());
    tokio::pin!(timer);
    loop {
        if app.cancel.is_cancelled() {
            Box::pin(shut_down(socket, &mut session, &mut inflight)).await;
            break;
        }
        if session.outbox.overflowed() {
            let reason = "too slow: reconnect and resume";
            Box::pin(close_with(socket, close::TOO_SLOW, reason)).await;
            break;
        }
        // The select only decides what happens next; the work is done below, with the rarely
        // taken, larger futures boxed so that they do not grow every connection's task.
        let step = tokio::select! {
            biased;
            Some(reply) = inflight.next(), if !inflight.is_empty() => Step::Reply(reply),
            () = session.outbox.notify.notified() => Step::Outbox,
            message = socket.next(), if inflight.len() < INFLIGHT_PER_CONNECTION_MAX => {
                Step::Inbound(message)
            }
            () = &mut timer => Step::Timer,
        };
        match step {
            Step::Reply(reply) => {
                let write = write_ready(socket, &mut session, &mut inflight, Some(reply));
                if !Box::pin(bounded(write, idle)).await {
                    break;
                }
            }
            Step::Outbox => {
                let write = write_ready(socket, &mut session, &mut inflight, None);
                if !Box::pin(bounded(write, idle)).await {
                    break;
                }
            }
            Step::Inbound(message) => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => {
                        Box::pin(read_failed(socket, e)).await;
                        break;
                    }
                    None => break,
                };
                last_inbound = Instant::now();
                // Checked per frame as well as by the timer: the select is biased towards
                // inbound frames, so a client that never lets its socket run dry starved the
                // timer and kept being served after its token expired.
                if last_inbound >= session.token_expires {
                    let f = Failure::new(Code::Unauthorized, "token expired");
                    let text = protocol::error(None, &f);
                    Box::pin(close_after(socket, text, close::POLICY, "token expired")).await;
                    break;
                }
                if last_inbound.duration_since(last_presence).as_millis() as u64
                    >= presence_refresh_ms
                {
                    last_presence = last_inbound;
                    app.presence.heartbeat(&session.user, session.outbox.id);
                }
                match message {
                    Message::Text(text) => {
                        if text.len() > app.config.max_frame_bytes {
                            inflight.push_back(ready(too_large(text.len(), app)));
                        } else {
                            inflight.push_back(handle(app, &mut session, text.as_str()));
                        }
                    }
                    Message::Binary(bytes) => {
                        let text = if let Some(size) = oversize::skipped(&bytes) {
                            too_large(size as usize, app)
                        } else if bytes.len() > app.config.max_frame_bytes {
                            too_large(bytes.len(), app)
                        } else {
                            protocol::error(
                                None,
                                &Failure::bad_request(
                                    "binary frames are not supported: send JSON text frames",
                                ),
                            )
                        };
                        inflight.push_back(ready(text));
                    }
                    Message::Close(_) => {
                        // tungstenite queued the close reply; send it.
                        let _ = socket.flush().await;
                        break;
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            Step::Timer => {
                let now = Instant::now();
                if now >= session.token_expires {
                    let f = Failure::new(Code::Unauthorized, "token expired");
                    let text = protocol::error(None, &f);
                    Box::pin(close_after(socket, text, close::POLICY, "token expired")).await;
                    break;
                }
                if now >= last_inbound + idle {
                    Box::pin(close_with(socket, close::IDLE, "idle timeout")).await;
                    break;
                }
                if now >= next_ping {
                    next_ping = now + ping_every;
                    if socket
                        .send(Message::Ping(bytes::Bytes::new()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                let deadline = next_ping
                    .min(last_inbound + idle)
                    .min(session.token_expires);
                timer.as_mut().reset(deadline.into());
            }
        }
    }
    session
}

/// A write that does not finish within the idle timeout ends the connection: a client that
/// stops reading cannot hold a connection (and its task) open for ever.
async fn bounded(write: impl Future<Output = bool>, limit: Duration) -> bool {
    tokio::time::timeout(limit, write).await.unwrap_or(false)
}

/// Per chat, the last seq written to a connection: a vector sorted by chat id (smaller than a
/// hash map for the few chats most users have; idle memory per connection).
#[derive(Debug, Default)]
struct LastSent(Vec<(Arc<str>, u64)>);

impl LastSent {
    /// Records that `seq` of `chat` is being written; `false` if it (or a later seq) already
    /// was, so the frame must be dropped.
    fn accept(&mut self, chat: Arc<str>, seq: u64) -> bool {
        match self.0.binary_search_by(|(c, _)| (**c).cmp(&*chat)) {
            Ok(i) if self.0[i].1 >= seq => false,
            Ok(i) => {
                self.0[i].1 = seq;
                true
            }
            Err(i) => {
                // Most users are in a few chats: grow one entry at a time while small.
                if self.0.len() < 4 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, (chat, seq));
                true
            }
        }
    }
}

/// What the main loop does next.
enum Step {
    Reply(String),
    Outbox,
    Inbound(Option<Result<Message, tungstenite::Error>>),
    Timer,
}

fn too_large(len: usize, app: &App) -> String {
    let f = Failure::new(
        Code::TooLarge,
        format!(
            "message of {len} bytes is above the limit of {}",
            app.config.max_frame_bytes
        ),
    );
    protocol::error(None, &f)
}

/// Finishes what was accepted, then says goodbye with 1001.
async fn shut_down(
    socket: &mut WebSocket,
    session: &mut Session,
    inflight: &mut FuturesOrdered<ReplyFuture>,
) {
    while let Some(reply) = inflight.next().await {
        if !send_text(socket, reply).await {
            return;
        }
    }
    // Every reply is written above; what is left is the outbox.
    write_ready(socket, session, inflight, None).await;
    close_with(socket, close::GOING_AWAY, "server shutting down").await;
}

async fn close_after(socket: &mut WebSocket, text: String, code: u16, reason: &str) {
    let _ = send_text(socket, text).await;
    close_with(socket, code, reason).await;
}

/// Reading failed: a message tungstenite found too large (`oversize::Limited` drops those
/// first, so this is a safety net) gets 1009; anything else just ends.
async fn read_failed(socket: &mut WebSocket, error: tungstenite::Error) {
    if matches!(error, tungstenite::Error::Capacity(_)) {
        close_with(socket, close::TOO_BIG, "message too big").await;
    }
}

/// Writes everything queued in the outbox; `false` if the socket failed.
/// Writes `first`, every reply already complete and everything queued in the outbox, then
/// flushes once: under load one `write` carries many frames. `false` if the socket failed.
async fn write_ready(
    socket: &mut WebSocket,
    session: &mut Session,
    inflight: &mut FuturesOrdered<ReplyFuture>,
    first: Option<String>,
) -> bool {
    if let Some(text) = first
        && socket
            .feed(Message::Text(Utf8Bytes::from(text)))
            .await
            .is_err()
    {
        return false;
    }
    // Replies that are already complete (polled without waiting: the main loop's select
    // registers the real waker again right after).
    while let Some(Some(text)) = inflight.next().now_or_never() {
        if socket
            .feed(Message::Text(Utf8Bytes::from(text)))
            .await
            .is_err()
        {
            return false;
        }
    }
    feed_outbox(socket, session).await && socket.flush().await.is_ok()
}

/// Feeds (without flushing) everything queued in the outbox.
async fn feed_outbox(socket: &mut WebSocket, session: &mut Session) -> bool {
    let queued = session.outbox.take();
    for push in queued {
        let frame = match push {
            Push::Event { chat, seq, frame } => {
                if !session.last_sent.accept(chat, seq) {
                    continue;
                }
                frame
            }
            Push::Frame(frame) => frame,
        };
        if socket.feed(Message::Text(frame)).await.is_err() {
            return false;
        }
    }
    true
}

fn ready(text: String) -> ReplyFuture {
    Box::pin(std::future::ready(text))
}

fn reply(id: &RequestId, result: Result<Value, Failure>) -> String {
    match result {
        Ok(v) => protocol::reply(id, &v),
        Err(f) => {
            metrics::counter!(m::ERRORS, "code" => f.code.as_str()).increment(1);
            protocol::error(Some(id), &f)
        }
    }
}

/// Awaits an engine ticket and shapes its answer.
fn after_ticket(
    id: RequestId,
    ticket: Ticket,
    shape: impl FnOnce(Answer) -> Value + Send + 'static,
    started: Option<(Instant, metrics::Histogram)>,
) -> ReplyFuture {
    Box::pin(async move {
        let result = ticket.await.map(shape).map_err(Failure::from);
        if let Some((started, histogram)) = started
            && result.is_ok()
        {
            histogram.record(started.elapsed().as_secs_f64());
        }
        reply(&id, result)
    })
}

fn seq_answer(answer: Answer) -> Value {
    match answer {
        Answer::Seq(seq) => json!({ "seq": seq }),
        other => json!({ "unexpected": format!("{other:?}") }),
    }
}

fn empty_answer(_: Answer) -> Value {
    json!({})
}

/// Turns one text frame into its reply future.
fn handle(app: &Arc<App>, session: &mut Session, text: &str) -> ReplyFuture {
    let (id, request) = match protocol::parse(text) {
        Ok(parsed) => parsed,
        Err((id, f)) => {
            metrics::counter!(m::ERRORS, "code" => f.code.as_str()).increment(1);
            return ready(protocol::error(id.as_ref(), &f));
        }
    };
    let engine = &app.engine();
    let user = &*session.user;
    match request {
        Request::Hello { .. } => ready(reply(
            &id,
            Err(Failure::bad_request(
                "already authenticated on this connection",
            )),
        )),
        Request::CreateChat {
            members,
            title,
            direct,
        } => after_ticket(
            id,
            engine.create_chat_ticket(user, &members, title, direct),
            |a| match a {
                Answer::Chat(chat) => json!({ "chat": chat }),
                other => json!({ "unexpected": format!("{other:?}") }),
            },
            None,
        ),
        Request::AddMembers { chat, users } => after_ticket(
            id,
            engine.add_members_ticket(user, &chat, &users),
            seq_answer,
            None,
        ),
        Request::RemoveMembers { chat, users } => after_ticket(
            id,
            engine.remove_members_ticket(user, &chat, &users),
            seq_answer,
            None,
        ),
        Request::Send {
            chat,
            cmid,
            body,
            file,
        } => {
            if let Some(limiter) = &app.limiter
                && let Err(not_until) = limiter.check_key(&session.user)
            {
                metrics::counter!(m::RATE_LIMITED).increment(1);
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::QuantaClock::default(),
                ));
                let f = Failure {
                    code: Code::RateLimited,
                    message: format!(
                        "more than {} sends per minute",
                        app.config.rate_limit_per_minute
                    ),
                    retry_after_ms: Some((wait.as_millis() as u64).max(1)),
                };
                return ready(reply(&id, Err(f)));
            }
            after_ticket(
                id,
                engine.send_ticket(user, &chat, &cmid, body, file),
                move |a| match a {
                    Answer::Sent(s) => json!({ "chat": chat, "seq": s.seq, "ts": s.ts }),
                    other => json!({ "unexpected": format!("{other:?}") }),
                },
                Some((Instant::now(), app.send_latency.clone())),
            )
        }
        Request::Edit { chat, target, body } => after_ticket(
            id,
            engine.edit_ticket(user, &chat, target, body),
            seq_answer,
            None,
        ),
        Request::Delete { chat, target } => after_ticket(
            id,
            engine.delete_ticket(user, &chat, target),
            seq_answer,
            None,
        ),
        Request::Mark { chat, seq, read } => after_ticket(
            id,
            engine.mark_ticket(user, &session.device, &chat, seq, read),
            empty_answer,
            None,
        ),
        Request::History {
            chat,
            before,
            after,
            limit,
        } => {
            let limit = limit.map(|l| l.min(HISTORY_LIMIT_MAX as u64) as usize);
            let result = engine
                .history(user, &chat, before, after, limit)
                .map(|h| {
                    serde_json::to_value(protocol::history_result(&h.events, h.last_seq, h.horizon))
                        .expect("history serializes")
                })
                .map_err(Failure::from);
            ready(reply(&id, result))
        }
        Request::ListChats => {
            let result = engine
                .list_chats(user)
                .map(|c| protocol::chats_result(&c))
                .map_err(Failure::from);
            ready(reply(&id, result))
        }
        Request::Receipts { chat } => {
            let result = engine
                .receipts(user, &chat)
                .map(|r| protocol::receipts_result(&r))
                .map_err(Failure::from);
            ready(reply(&id, result))
        }
        Request::Presence { users } => {
            let result = check_users(&users).map(|()| {
                let list: Vec<Value> = users
                    .iter()
                    .map(|u| {
                        let s = app.presence.get(u);
                        json!({"user": u, "online": s.online, "last_seen": s.last_seen_ms})
                    })
                    .collect();
                json!({ "presence": list })
            });
            ready(reply(&id, result))
        }
        Request::SubscribePresence { users } => {
            let result = check_users(&users).and_then(|()| {
                let mut added: Vec<String> = users
                    .into_iter()
                    .filter(|u| !session.watching.contains(u))
                    .collect();
                added.sort();
                added.dedup();
                if session.watching.len() + added.len() > PRESENCE_WATCHES_PER_CONNECTION_MAX {
                    return Err(Failure::bad_request(format!(
                        "a connection may watch at most {PRESENCE_WATCHES_PER_CONNECTION_MAX} users"
                    )));
                }
                app.presence.watch(&session.outbox, &added);
                session.watching.extend(added);
                Ok(json!({}))
            });
            ready(reply(&id, result))
        }
        Request::UnsubscribePresence { users } => {
            app.presence.unwatch(&session.outbox, &users);
            session.watching.retain(|u| !users.contains(u));
            ready(reply(&id, Ok(json!({}))))
        }
        Request::Typing { chat } => {
            let result = match engine.members(&chat) {
                Ok(members) if members.iter().any(|m| m == user) => {
                    let push = Push::Frame(Utf8Bytes::from(protocol::typing_push(&chat, user)));
                    app.hub
                        .send_to(members.iter().map(String::as_str), Some(user), &push);
                    Ok(json!({}))
                }
                Ok(_) => Err(Failure::new(
                    Code::Forbidden,
                    format!("{user} is not a member of {chat}"),
                )),
                Err(e) => Err(Failure::from(e)),
            };
            ready(reply(&id, result))
        }
        Request::Ping => ready(reply(&id, Ok(json!({ "ts": app.now_ms() })))),
    }
}

fn check_users(users: &[String]) -> Result<(), Failure> {
    for u in users {
        chatlog::engine::types::check_user(u).map_err(Failure::from)?;
    }
    Ok(())
}
