//! # chatlog-server
//!
//! A thin tokio/axum front for the [`chatlog`] engine speaking the protocol of PROTOCOL.md
//! (documented in full in `docs/protocol.md`): WebSocket at `/v1/ws`, files at `/v1/files`,
//! `/healthz` and `/metrics`. No storage rules live here: every write is an engine ticket,
//! every read an engine query; the server adds authentication, fanout, presence, typing,
//! rate limits and the push webhook.
//!
//! - [`protocol`]: pure parsing and encoding of frames.
//! - [`auth`]: HS256 tokens.
//! - [`conn`]: one connection's task (handshake, resume, pipelined requests, pushes).
//! - [`hub`]: connected devices and the fanout of committed records.
//! - [`presence`]: presence tracking, subscriptions and lazy `last_seen`.
//! - [`files`]: uploads and downloads.
//! - [`webhook`]: the offline push webhook.
//! - [`metrics`]: Prometheus names and rendering.
//!
//! The entry point is [`serve`]: give it a bound listener (port 0 in tests), a configuration
//! and a shutdown future; it returns once every connection has been closed and the engine has
//! finished its queued work.

pub mod auth;
pub mod config;
pub mod conn;
pub mod files;
pub mod hub;
pub mod metrics;
pub mod oversize;
pub mod presence;
pub mod protocol;
mod web;
pub mod webhook;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chatlog::engine::Engine;
use chatlog_raft::{ClusterConfig, ClusterNode, EngineCell};
use governor::{Quota, RateLimiter};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::ServerConfig;

/// Per-user send limiter.
pub type Limiter = RateLimiter<
    Arc<str>,
    governor::state::keyed::HashMapStateStore<Arc<str>>,
    governor::clock::QuantaClock,
    governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>,
>;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The engine could not open.
    #[error("cannot open the data directory: {0}")]
    Engine(#[from] chatlog::engine::ChatError),
    /// Serving failed.
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The cluster node's Raft core quit on its own (a storage error, a panic); the server
    /// stopped so that the node restarts from its disk.
    #[error("the Raft core stopped: {0}")]
    Raft(String),
}

/// State shared by every handler and connection.
pub struct App {
    /// Configuration.
    pub config: ServerConfig,
    /// The node's engine (replaced when a cluster node installs a snapshot).
    pub cell: Arc<EngineCell>,
    /// The cluster node, in cluster mode.
    pub cluster: Option<Arc<ClusterNode>>,
    /// Token checks.
    pub auth: auth::Auth,
    /// Connected devices.
    pub hub: Arc<hub::Hub>,
    /// Presence.
    pub presence: Arc<presence::PresenceHub>,
    /// Send limiter (`None` = off).
    pub limiter: Option<Limiter>,
    /// Metrics handle.
    pub metrics: PrometheusHandle,
    /// The send latency histogram (a handle: no registry lookup per send).
    pub send_latency: ::metrics::Histogram,
    /// Cancelled when the server shuts down.
    pub cancel: CancellationToken,
    /// Why the cluster node's Raft core quit on its own, once it has (the server then stops).
    raft_failure: Arc<std::sync::OnceLock<String>>,
    connections: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    tracker: TaskTracker,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Now, from the engine's clock (ms since the epoch).
    pub fn now_ms(&self) -> u64 {
        (self.engine().config().clock)()
    }

    /// The current engine.
    pub fn engine(&self) -> Arc<Engine> {
        self.cell.get()
    }
}

/// Counts a connection against the caps until dropped.
struct ConnectionSlot {
    app: Arc<App>,
    ip: IpAddr,
}

impl ConnectionSlot {
    fn acquire(app: &Arc<App>, ip: IpAddr) -> Option<ConnectionSlot> {
        let total = app.connections.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = ConnectionSlot {
            app: app.clone(),
            ip,
        };
        if total > app.config.max_connections {
            return None;
        }
        if app.config.max_connections_per_ip > 0 {
            let mut per_ip = app.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = per_ip.entry(ip).or_default();
            *n += 1;
            if *n > app.config.max_connections_per_ip {
                return None;
            }
        }
        Some(slot)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.app.connections.fetch_sub(1, Ordering::AcqRel);
        if self.app.config.max_connections_per_ip > 0 {
            let mut per_ip = self.app.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

/// Checks the WebSocket upgrade request (RFC 6455 §4.2.1); returns the client's key.
fn upgrade_key(headers: &HeaderMap) -> Result<&HeaderValue, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err("expected `Connection: upgrade`");
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err("expected `Upgrade: websocket`");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err("expected `Sec-WebSocket-Version: 13`");
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("missing `Sec-WebSocket-Key`")
}

async fn ws_handler(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    if app.cancel.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let accept = match upgrade_key(request.headers()) {
        Ok(key) => tungstenite::handshake::derive_accept_key(key.as_bytes()),
        Err(why) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("not a WebSocket upgrade: {why}"),
            )
                .into_response();
        }
    };
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return (
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded",
        )
            .into_response();
    };
    let Some(slot) = ConnectionSlot::acquire(&app, peer.ip()) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached; retry later",
        )
            .into_response();
    };
    let ws_config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(config::WS_READ_BUFFER_BYTES)
        // Frames fed between flushes are written together (one syscall for many frames);
        // flushes happen after every batch of ready work, so nothing waits in the buffer.
        .write_buffer_size(config::WS_WRITE_BUFFER_BYTES)
        // No bound on one frame written: a history page of 500 large messages is one frame
        // of many MiB. tungstenite writes its buffer out once it passes the size above, and a
        // client that stops reading is cut off by its outbox (4001), so buffering stays bounded.
        .max_write_buffer_size(usize::MAX)
        // `conn::serve` drops larger messages before tungstenite reads them (`oversize`).
        .max_message_size(Some(app.config.max_frame_bytes))
        .max_frame_size(Some(app.config.max_frame_bytes));
    // The connection's whole life is this one task: its future holds the socket, so there is
    // no second copy in an upgrade wrapper (idle memory per connection).
    app.tracker.spawn(async move {
        let app = slot.app.clone();
        conn::serve(app, on_upgrade, ws_config).await;
        drop(slot);
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    if let Some(why) = app.engine().failure() {
        return unavailable(format!("storage failed; writes are refused: {why}\n"));
    }
    if let Some(why) = app.raft_failure.get() {
        return unavailable(format!(
            "the Raft core stopped, the node is stopping (restart it): {why}\n"
        ));
    }
    if app.cancel.is_cancelled() {
        return unavailable("shutting down\n".into());
    }
    let mut status = String::from("ok\n");
    if let Some(node) = &app.cluster {
        let m = node.metrics();
        if m.membership_config.membership().get_node(&m.id).is_none() {
            return unavailable(format!(
                "node {} is not a member of the cluster (removed, or waiting to be added with \
                 `cluster add-learner`)\n",
                m.id
            ));
        }
        let leader = match m.current_leader {
            Some(l) if node.quorum_ok(Duration::from_secs(1)).await => l,
            _ => {
                return unavailable(format!(
                    "no quorum (node {}, term {}, leader {}): writes are refused until a \
                     majority is reachable\n",
                    m.id,
                    m.current_term,
                    m.current_leader
                        .map_or_else(|| "unknown".to_owned(), |l| l.to_string())
                ));
            }
        };
        status = format!(
            "ok\nnode {} term {} leader {} applied {}\n",
            m.id,
            m.current_term,
            leader,
            // The last applied index, as `cluster status` counts it.
            node.applied()
                .checked_sub(1)
                .map_or_else(|| "none".to_owned(), |i| i.to_string())
        );
    }
    // Writes report their own failures (above); reads do not poison anything, so read the
    // newest log entry (from the active segment: a real read of the disk) to see that the
    // node can still serve history.
    let engine = app.engine();
    let log = engine.log();
    let newest = log.next_index().saturating_sub(1);
    if newest >= log.first_index()
        && let Err(why) = log.read(newest)
    {
        return unavailable(format!("storage reads fail: {why}\n"));
    }
    (StatusCode::OK, status).into_response()
}

async fn metrics_handler(State(app): State<Arc<App>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&app.metrics, &app.engine()),
    )
        .into_response()
}

/// The HTTP routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/ws", get(ws_handler))
        .route("/", get(web::index))
        .route("/web/{name}", get(web::asset))
        .route("/v1/dev/token", post(web::dev_token))
        .route("/v1/files", post(files::upload))
        .route("/v1/files/{id}", get(files::download))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_handler))
        .with_state(app)
}

/// How long a stopping cluster leader tries to hand its role to another node
/// ([`ClusterNode::hand_off_leadership`]): a few round trips in a cluster of three, the
/// leader lease (0.5 s by default) more in a larger one.
const LEADERSHIP_HAND_OFF: Duration = Duration::from_secs(2);

/// Opens the engine under `config.data_dir` and serves on `listener` until `shutdown`
/// completes; then (a cluster leader hands its role over first) stops accepting, lets
/// in-flight writes finish, closes clients with 1001 and closes the engine.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve_ready(listener, config, shutdown, || {}).await
}

/// [`serve`], calling `ready` once everything is open (the engine, in a cluster the node and
/// its replication port) and connections are about to be served: the moment to announce the
/// server. Settings that fail before that return their error without calling it.
pub async fn serve_ready(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(),
) -> Result<(), ServerError> {
    config.validate().map_err(ServerError::Config)?;
    std::fs::create_dir_all(&config.data_dir)?;
    check_data_dir_mode(&config.data_dir, config.cluster.is_some())?;
    let (cell, cluster) = match &config.cluster {
        None => {
            let engine_dir = config.data_dir.join("engine");
            let engine_config = config.engine.clone();
            let engine =
                tokio::task::spawn_blocking(move || Engine::open(engine_dir, engine_config))
                    .await
                    .map_err(std::io::Error::other)??;
            (EngineCell::new(Arc::new(engine)), None)
        }
        Some(settings) => {
            let peer_listener = TcpListener::bind(settings.peer_listen).await.map_err(|e| {
                ServerError::Config(format!("--peer-listen {}: {e}", settings.peer_listen))
            })?;
            let mut cc = ClusterConfig::new(
                settings.node_id,
                settings.peers.clone(),
                config.data_dir.join("cluster"),
            );
            cc.engine = config.engine.clone();
            cc.write_timeout = Duration::from_millis(settings.write_timeout_ms);
            cc.snapshot_every = settings.snapshot_every;
            cc.initialize = !settings.join;
            cc.blob_dir = files::files_dir(&config.data_dir);
            let node = ClusterNode::start(cc, peer_listener)
                .await
                .map_err(|e| ServerError::Config(format!("cluster: {e}")))?;
            (node.cell(), Some(node))
        }
    };
    let engine = cell.get();
    let hub = Arc::new(hub::Hub::default());
    let presence = Arc::new(presence::PresenceHub::new(
        cell.clone(),
        config.presence_ttl_ms,
    ));
    let limiter = NonZeroU32::new(config.rate_limit_per_minute)
        .map(|n| RateLimiter::hashmap_with_clock(Quota::per_minute(n), Default::default()));
    let webhook = config.push_webhook.clone().map(|url| {
        webhook::Webhook::start(url, config.push_interval_ms, engine.config().clock.clone())
    });
    let cancel = CancellationToken::new();
    let raft_failure = Arc::new(std::sync::OnceLock::new());
    let auth = auth::Auth::new(config.auth_secret.as_bytes()).map_err(ServerError::Config)?;
    let app = Arc::new(App {
        auth,
        config,
        cell: cell.clone(),
        cluster: cluster.clone(),
        hub: hub.clone(),
        presence: presence.clone(),
        limiter,
        metrics: metrics::install(),
        send_latency: ::metrics::histogram!(metrics::SEND_LATENCY),
        cancel: cancel.clone(),
        raft_failure: raft_failure.clone(),
        connections: AtomicUsize::new(0),
        per_ip: Mutex::new(HashMap::new()),
        tracker: TaskTracker::new(),
    });
    drop(engine);
    let push_filter: Option<hub::PushFilter> = cluster.clone().map(|node| {
        let presence = presence.clone();
        hub::PushFilter {
            posts_here: Arc::new(move || node.is_leader()),
            online_elsewhere: Arc::new(move |user: &str| presence.is_online(user)),
        }
    });
    let fanout = tokio::spawn(hub::run_fanout_cell(
        cell.clone(),
        hub,
        webhook,
        push_filter,
        app.config.fanout_batch_max.max(1),
    ));
    let presence_task = tokio::spawn(presence.clone().run());
    let gossip_task = cluster
        .clone()
        .map(|node| tokio::spawn(presence_gossip(node, presence.clone())));
    let repair_task = cluster.clone().map(|node| {
        tokio::spawn(files::repair_missing(
            cell.clone(),
            node,
            app.config.data_dir.clone(),
        ))
    });
    let limiter_app = app.clone();
    let limiter_task = tokio::spawn(async move {
        // Forget users whose buckets are full again (bounded memory).
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            if let Some(l) = &limiter_app.limiter {
                l.retain_recent();
            }
        }
    });
    tracing::info!(addr = %tokio::net::TcpListener::local_addr(&listener)?, "serving");
    ready();
    let stop = cancel.clone();
    let departing = cluster.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => {}
            // Serving ended for another reason: let go of the node.
            () = stop.cancelled() => return,
        }
        // A leader first hands its role to a caught-up node, while its own clients are still
        // served (their writes forward to the new leader): writes pause for a few round trips
        // rather than an election timeout.
        if let Some(node) = departing.filter(|n| n.is_leader()) {
            match node.hand_off_leadership(LEADERSHIP_HAND_OFF).await {
                Ok(to) => tracing::info!(to, "leadership handed off before stopping"),
                Err(why) => tracing::warn!(%why, "stopping without a leadership hand-off"),
            }
        }
        stop.cancel();
    });
    // A node whose Raft core quit (a storage error, a panic) can neither write nor learn of
    // writes, yet would serve stale reads: stop, closing clients with 1001 so that they
    // reconnect to another node, and exit with an error so that a supervisor restarts the
    // node from its disk (a transient fault heals; a failed disk keeps it down, visibly).
    let failure_task = cluster.clone().map(|node| {
        let (stop, failure) = (cancel.clone(), raft_failure.clone());
        tokio::spawn(async move {
            tokio::select! {
                why = node.failed() => {
                    tracing::error!(%why, "the Raft core stopped; stopping the server");
                    let _ = failure.set(why);
                    stop.cancel();
                }
                () = stop.cancelled() => {}
            }
        })
    });
    let header_read_timeout = Duration::from_millis(app.config.header_read_timeout_ms);
    serve_http(listener, router(app.clone()), header_read_timeout, &cancel).await;
    // Stop accepting happened above; now every connection finishes its in-flight requests
    // and closes with 1001 (connections notice the flag when woken).
    cancel.cancel();
    app.hub.wake_all();
    app.tracker.close();
    app.tracker.wait().await;
    limiter_task.abort();
    presence_task.abort();
    for t in [gossip_task, repair_task, failure_task]
        .into_iter()
        .flatten()
    {
        t.abort();
    }
    let _ = presence_task.await;
    presence.flush_last_seen().await;
    fanout.abort();
    let _ = fanout.await;
    drop(presence);
    drop(app);
    if let Some(node) = cluster {
        node.shutdown().await;
    }
    let engine = cell.get();
    drop(cell);
    // Whoever holds the engine last closes it (joining its threads after queued work).
    tokio::task::spawn_blocking(move || match Arc::try_unwrap(engine) {
        Ok(engine) => engine.close(),
        Err(shared) => drop(shared),
    })
    .await
    .map_err(std::io::Error::other)?;
    match raft_failure.get() {
        Some(why) => Err(ServerError::Raft(why.clone())),
        None => Ok(()),
    }
}

/// Cluster presence: sends this node's presence changes at once and its full online list
/// every [`presence::GOSSIP_FULL_MS`] to the other nodes, and applies theirs.
/// Refuses a data directory that holds the other mode's state: a cluster node keeps its
/// chats under `cluster/` and would ignore a single server's `engine/` (from `restore`, or an
/// earlier single-server run), and a single server would ignore a cluster node's state.
fn check_data_dir_mode(dir: &std::path::Path, cluster: bool) -> Result<(), ServerError> {
    let holds = |name: &str| {
        std::fs::read_dir(dir.join(name)).is_ok_and(|mut entries| entries.next().is_some())
    };
    if cluster && holds("engine") && !holds("cluster") {
        return Err(ServerError::Config(format!(
            "--data-dir {} holds a single server's chats (engine/), which a cluster node does \
             not read: it would start empty. Start cluster nodes on new data directories \
             (docs/operations.md, \"Back up and restore\")",
            dir.display()
        )));
    }
    if !cluster && holds("cluster") && !holds("engine") {
        return Err(ServerError::Config(format!(
            "--data-dir {} holds a cluster node's data (cluster/): start it with its \
             --node-id and --peers, or restore a backup into a new directory to run it alone",
            dir.display()
        )));
    }
    Ok(())
}

async fn presence_gossip(node: Arc<ClusterNode>, presence: Arc<presence::PresenceHub>) {
    let mut received = node.gossip_received();
    let mut full = tokio::time::interval(Duration::from_millis(presence::GOSSIP_FULL_MS));
    let send = |g: Option<presence::PresenceGossip>| {
        if let Some(bytes) = g.and_then(|g| postcard::to_allocvec(&g).ok()) {
            node.gossip(bytes);
        }
    };
    loop {
        tokio::select! {
            _ = full.tick() => send(presence.gossip_out(true)),
            () = presence.gossip_wake.notified() => send(presence.gossip_out(false)),
            msg = received.recv() => match msg {
                Ok(msg) => match postcard::from_bytes(&msg.bytes) {
                    Ok(g) => presence.gossip_in(msg.from, g),
                    Err(e) => tracing::warn!(from = msg.from, error = %e, "bad presence gossip"),
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "presence gossip lagged; the next full lists repair it");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Accepts TCP connections until `cancel` and serves each with hyper's HTTP/1.1 connection,
/// whose request head must arrive within `header_read_timeout` (a client that trickles its
/// headers, or connects and sends nothing, is dropped then; `axum::serve` sets no timer, so
/// hyper's header timeout never applied). Once cancelled, idle connections are closed and
/// requests in progress finish; returns when every HTTP connection has ended (upgraded
/// WebSocket connections live on in their own tasks).
async fn serve_http(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    cancel: &CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        // TCP_NODELAY: a send produces two small writes on the sender's socket (its own event
        // push, then the reply); with Nagle the second waits for the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let cancel = cancel.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                hyper::service::Service::call(&TowerToHyperService::new(router.clone()), request)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                () = cancel.cancelled() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// A failed `accept`: a connection that went away is skipped; anything else (such as running
/// out of file descriptors) is logged and retried after a second, as hyper's server did.
async fn accept_failed(error: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
