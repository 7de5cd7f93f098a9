//! Server configuration: every limit and timeout is named here with its default.

use std::path::PathBuf;
use std::time::Duration;

/// Default largest WebSocket message parsed (PROTOCOL.md: 64 KiB).
pub const MAX_FRAME_BYTES_DEFAULT: usize = 64 * 1024;
/// Default sends per user per minute (`0` = off).
pub const RATE_LIMIT_PER_MINUTE_DEFAULT: u32 = 600;
/// Default ping interval.
pub const PING_INTERVAL_MS_DEFAULT: u64 = 30_000;
/// Default idle timeout.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 60_000;
/// A connection must send `hello` within this long.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// An HTTP request's head (request line and headers, including a WebSocket upgrade request)
/// must arrive within this long from the moment the server starts waiting for it; an idle
/// keep-alive connection is closed after it too (slowloris).
pub const HEADER_READ_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default file size limit.
pub const MAX_FILE_BYTES_DEFAULT: u64 = 25 * 1024 * 1024;
/// Default push webhook interval per user.
pub const PUSH_INTERVAL_MS_DEFAULT: u64 = 30_000;
/// Frames queued for one connection before it is closed as too slow (4001).
pub const OUTBOUND_QUEUE_DEFAULT: usize = 4096;
/// Requests of one connection in flight (awaiting durability) before the server stops
/// reading from it.
pub const INFLIGHT_PER_CONNECTION_MAX: usize = 256;
/// Committed records the fanout handles before waking the connections it queued frames for.
pub const FANOUT_BATCH_MAX_DEFAULT: usize = 1024;
/// Default connection cap of the whole server.
pub const MAX_CONNECTIONS_DEFAULT: usize = 100_000;
/// Default connection cap per client IP address (`0` = off).
pub const MAX_CONNECTIONS_PER_IP_DEFAULT: usize = 0;
/// Users one connection may watch with `subscribe_presence`.
pub const PRESENCE_WATCHES_PER_CONNECTION_MAX: usize = 1024;
/// Frames written to one connection are buffered up to this many bytes before a write (the
/// connection flushes after each batch of ready frames anyway).
pub const WS_WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// WebSocket read buffer per connection. Small on purpose: idle connections dominate memory,
/// and tungstenite grows the buffer for a larger message when it arrives.
pub const WS_READ_BUFFER_BYTES: usize = 256;

/// Everything `chatlog-server serve` can be told. Its `Debug` output never shows the secret.
#[derive(Clone)]
pub struct ServerConfig {
    /// Data directory (engine log, indexes, files, generated secret).
    pub data_dir: PathBuf,
    /// The HS256 secret.
    pub auth_secret: String,
    /// Sends per user per minute; `0` turns the limit off.
    pub rate_limit_per_minute: u32,
    /// Largest WebSocket message parsed.
    pub max_frame_bytes: usize,
    /// Push webhook URL (`http://` only).
    pub push_webhook: Option<String>,
    /// At most one webhook post per user per this interval.
    pub push_interval_ms: u64,
    /// Close connections silent for this long (4000).
    pub idle_timeout_ms: u64,
    /// Ping interval.
    pub ping_interval_ms: u64,
    /// Time allowed for `hello`.
    pub handshake_timeout_ms: u64,
    /// Time allowed for an HTTP request's head; an idle HTTP connection is closed after it.
    pub header_read_timeout_ms: u64,
    /// Largest uploaded file.
    pub max_file_bytes: u64,
    /// Frames queued per connection before 4001.
    pub outbound_queue: usize,
    /// Connection cap.
    pub max_connections: usize,
    /// Connection cap per client IP; `0` = off.
    pub max_connections_per_ip: usize,
    /// Presence TTL of a connection without inbound traffic.
    pub presence_ttl_ms: u64,
    /// Records per fanout batch (each connection is woken once per batch).
    pub fanout_batch_max: usize,
    /// Engine settings (limits, durability).
    pub engine: chatlog::engine::EngineConfig,
    /// Cluster mode (`--node-id`, `--peers`, `--peer-listen`); `None` = single node.
    pub cluster: Option<ClusterSettings>,
    /// Serve `POST /v1/dev/token`, which mints a token for any user without credentials.
    /// Off by default; the binary turns it on only for its no-argument dev run.
    pub dev_tokens: bool,
}

/// Default time a write may wait for a quorum before it answers `unavailable`.
pub const WRITE_TIMEOUT_MS_DEFAULT: u64 = 3_000;

/// A cluster node's settings.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node's id.
    pub node_id: u64,
    /// Every voter's id and replication address, this node included.
    pub peers: std::collections::BTreeMap<u64, String>,
    /// Where this node listens for its peers.
    pub peer_listen: std::net::SocketAddr,
    /// Writes without quorum answer `unavailable` after this long.
    pub write_timeout_ms: u64,
    /// Snapshot every this many applied entries.
    pub snapshot_every: u64,
    /// Join an existing cluster (wait to be added with `cluster add-learner`) instead of
    /// forming one from `peers`.
    pub join: bool,
}

/// Parses `--peers 1=HOST:PORT,2=HOST:PORT,...`.
pub fn parse_peers(s: &str) -> Result<std::collections::BTreeMap<u64, String>, String> {
    let mut peers = std::collections::BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("--peers: {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("--peers: node id {id:?} in {part:?} is not a number"))?;
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(format!("--peers: {addr:?} for node {id} is not HOST:PORT"));
        }
        if peers.insert(id, addr.to_owned()).is_some() {
            return Err(format!("--peers: node id {id} is listed twice"));
        }
    }
    if peers.is_empty() {
        return Err("--peers: no peers given".into());
    }
    Ok(peers)
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("data_dir", &self.data_dir)
            .field("auth_secret", &"<redacted>")
            .field("rate_limit_per_minute", &self.rate_limit_per_minute)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("push_webhook", &self.push_webhook)
            .field("push_interval_ms", &self.push_interval_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("ping_interval_ms", &self.ping_interval_ms)
            .field("handshake_timeout_ms", &self.handshake_timeout_ms)
            .field("header_read_timeout_ms", &self.header_read_timeout_ms)
            .field("max_file_bytes", &self.max_file_bytes)
            .field("outbound_queue", &self.outbound_queue)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("presence_ttl_ms", &self.presence_ttl_ms)
            .field("fanout_batch_max", &self.fanout_batch_max)
            .field("engine", &self.engine)
            .field("dev_tokens", &self.dev_tokens)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl ServerConfig {
    /// Defaults for a data directory and secret.
    pub fn new(data_dir: impl Into<PathBuf>, auth_secret: impl Into<String>) -> ServerConfig {
        ServerConfig {
            data_dir: data_dir.into(),
            auth_secret: auth_secret.into(),
            rate_limit_per_minute: RATE_LIMIT_PER_MINUTE_DEFAULT,
            max_frame_bytes: MAX_FRAME_BYTES_DEFAULT,
            push_webhook: None,
            push_interval_ms: PUSH_INTERVAL_MS_DEFAULT,
            idle_timeout_ms: IDLE_TIMEOUT_MS_DEFAULT,
            ping_interval_ms: PING_INTERVAL_MS_DEFAULT,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS_DEFAULT,
            max_file_bytes: MAX_FILE_BYTES_DEFAULT,
            outbound_queue: OUTBOUND_QUEUE_DEFAULT,
            max_connections: MAX_CONNECTIONS_DEFAULT,
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP_DEFAULT,
            presence_ttl_ms: chatlog::presence::TTL_MS_DEFAULT,
            fanout_batch_max: FANOUT_BATCH_MAX_DEFAULT,
            engine: chatlog::engine::EngineConfig::default(),
            dev_tokens: false,
            cluster: None,
        }
    }

    /// Checks relations between settings; the message names the offending flag.
    pub fn validate(&self) -> Result<(), String> {
        crate::auth::check_secret(&self.auth_secret).map_err(|e| format!("--auth-secret: {e}"))?;
        if self.max_frame_bytes < 1024 {
            return Err("--max-frame-bytes: must be at least 1024".into());
        }
        if self.idle_timeout_ms == 0 || self.ping_interval_ms == 0 {
            return Err("--idle-timeout-ms and --ping-interval-ms must be positive".into());
        }
        if self.ping_interval_ms >= self.idle_timeout_ms {
            return Err(format!(
                "--ping-interval-ms ({}) must be below --idle-timeout-ms ({})",
                self.ping_interval_ms, self.idle_timeout_ms
            ));
        }
        if self.header_read_timeout_ms == 0 {
            return Err("--header-read-timeout-ms: must be positive".into());
        }
        if self.engine.members_max == 0 {
            return Err("--max-members: must be at least 1 (the creator counts)".into());
        }
        if self.outbound_queue == 0 {
            return Err("--outbound-queue: must be positive".into());
        }
        if self.push_interval_ms == 0 {
            return Err("--push-interval-ms: must be positive".into());
        }
        if let Some(url) = &self.push_webhook {
            if !url.starts_with("http://") {
                return Err(format!(
                    "--push-webhook: {url:?} must be an http:// URL (terminate TLS in a local proxy)"
                ));
            }
            url.parse::<reqwest::Url>()
                .map_err(|e| format!("--push-webhook: {url:?} is not a URL: {e}"))?;
        }
        if self.presence_ttl_ms == 0 || self.presence_ttl_ms > chatlog::presence::TTL_MS_MAX {
            return Err("--presence-ttl-ms: out of range".into());
        }
        Ok(())
    }

    pub(crate) fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
}

const _: () = assert!(WS_READ_BUFFER_BYTES >= 14, "a frame header must fit");

#[cfg(test)]
mod tests {
    #[test]
    fn debug_output_never_shows_the_secret() {
        let config = super::ServerConfig::new("/tmp/x", "very-secret-value-123");
        let shown = format!("{config:?}");
        assert!(!shown.contains("very-secret-value-123"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
