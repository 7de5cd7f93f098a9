//! Command-line flags and their validation.
//!
//! The same [`Args`] are parsed by the parent process and by every worker process: the parent
//! re-executes its own binary with the user's arguments plus the hidden `--worker-index` and
//! `--workers` flags, so both sides always agree on the workload.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::workload::{BODY_BYTES_MIN, Layout};

/// Largest `--body-bytes`: the server's default body limit (16 KiB of UTF-8).
pub const BODY_BYTES_MAX: usize = 16 * 1024;
/// Largest `--group`: the server's member limit per chat.
pub const GROUP_MAX: usize = 256;
/// Largest `--inflight` (unacknowledged sends per connection).
pub const INFLIGHT_MAX: usize = 1024;
/// Largest `--procs`: worker `k` binds its sockets to 127.0.0.(k+1), and 127.0.0.255 is the
/// loopback broadcast address.
pub const PROCS_MAX: usize = 254;
/// Largest `--worker-threads`.
pub const WORKER_THREADS_MAX: usize = 64;
/// Largest `--connections`.
pub const CONNECTIONS_MAX: usize = 1_000_000;
/// Most servers one run may spread its connections over (`--url`, `--nats-url`).
pub const SERVERS_MAX: usize = 64;
/// Outstanding sends one probe connection may have (`--mode probe`); a send slot that finds
/// this many is skipped.
pub const PROBE_INFLIGHT_MAX: usize = 4096;

/// What the load generator does once its connections are up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Send messages at `--rate` (or as fast as possible) and measure latency and throughput.
    Send,
    /// Only authenticate and hold the connections, to measure server memory per connection.
    Idle,
    /// Failover probe (chatlog only): one connection per `--url`, each sending one message every
    /// `--probe-interval-ms` (pipelined, up to [`PROBE_INFLIGHT_MAX`] outstanding) and
    /// reconnecting when its server goes away, for `--duration-secs`. Prints one line per
    /// outcome on stdout (`ack URL_INDEX SEND_US ACK_US`, `err URL_INDEX CODE SEND_US AT_US`,
    /// `down URL_INDEX AT_US`, `up URL_INDEX AT_US`); `scripts/bench-cluster` reads them to time
    /// a leader kill to the first acknowledged write.
    Probe,
}

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// chatlog-server over its WebSocket protocol.
    Chatlog,
    /// Redis Streams: `XADD` to send, `XREAD BLOCK` to receive.
    Redis,
    /// NATS JetStream: publish with an acknowledgement to `chat.<c>` subjects of one replicated
    /// stream, one ordered push consumer per recipient and chat.
    Nats,
}

/// Load generator for chatlog-server, and the same workload on Redis Streams.
///
/// Connection `i` is device `i % D` of user `<prefix><i / D>` (`D` = `--devices-per-user`).
/// Chat `c` has the `G` users `(c*G + j) mod U` for `j` in `0..G` (`U` = number of users); its
/// first member creates it. Every connection sends to the chats of its user, round robin.
#[derive(Debug, Clone, Parser)]
#[command(name = "chatlog-load", version, args_override_self = true)]
pub struct Args {
    /// WebSocket URL of chatlog-server, or a comma-separated list of them (the nodes of a
    /// cluster): connection `i` uses URL `i % n`.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/ws")]
    pub url: String,
    /// The server's HS256 secret; tokens are minted from it.
    #[arg(
        long,
        env = "CHATLOG_AUTH_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    pub secret: String,
    /// Number of connections (devices) in all.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Number of chats.
    #[arg(long, default_value_t = 125)]
    pub chats: usize,
    /// Members per chat.
    #[arg(long, default_value_t = 8)]
    pub group: usize,
    /// Connections (devices) per user.
    #[arg(long, default_value_t = 1)]
    pub devices_per_user: usize,
    /// Messages per second sent in all; 0 = as fast as `--inflight` allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Unacknowledged sends allowed per connection.
    #[arg(long, default_value_t = 1)]
    pub inflight: usize,
    /// Measured seconds (send mode), or seconds the connections are held (idle mode).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Seconds of sending before measuring starts.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Bytes per message body (the send timestamp, padded).
    #[arg(long, default_value_t = 200)]
    pub body_bytes: usize,
    /// Worker processes; 0 = enough to stay under the open-files limit.
    #[arg(long, default_value_t = 0)]
    pub procs: usize,
    /// Runtime threads per worker process; 0 = the machine's cores divided among the workers.
    /// On a machine shared with the server, fewer threads leave it more CPU.
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,
    /// Server process whose VmRSS is reported before and after.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// What to do once connected.
    #[arg(long, value_enum, default_value_t = Mode::Send)]
    pub mode: Mode,
    /// System under test.
    #[arg(long, value_enum, default_value_t = Target::Chatlog)]
    pub target: Target,
    /// Redis address (with `--target redis`).
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub redis_addr: String,
    /// NATS server URL, or a comma-separated list (the nodes of a cluster): connection `i`
    /// uses URL `i % n` (with `--target nats`).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// JetStream stream the run creates (replacing one of that name) and publishes to.
    #[arg(long, default_value = "CHATLOAD")]
    pub nats_stream: String,
    /// Replicas of that stream (3 for a 3-node cluster).
    #[arg(long, default_value_t = 1)]
    pub nats_replicas: usize,
    /// Milliseconds between two sends of one probe connection (`--mode probe`).
    #[arg(long, default_value_t = 1)]
    pub probe_interval_ms: u64,
    /// Print the summary as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON summary to this file.
    #[arg(long)]
    pub json_file: Option<PathBuf>,
    /// A JSON summary of an earlier run (e.g. chatlog): print this run's figures against it.
    #[arg(long)]
    pub compare_with: Option<PathBuf>,
    /// User ids are this prefix followed by a number.
    #[arg(long, default_value = "u")]
    pub user_prefix: String,
    /// Connections being set up at once, per worker process.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Longest wait, after the measured window, for outstanding sends to be acknowledged.
    #[arg(long, default_value_t = 5000)]
    pub drain_ms: u64,
    /// Do not bind client sockets to 127.0.0.(k+1) in worker k.
    #[arg(long)]
    pub no_source_bind: bool,
    /// Internal: this process is worker number K (set by the parent).
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,
    /// Internal: number of worker processes (set by the parent).
    #[arg(long, hide = true)]
    pub workers: Option<usize>,
}

impl Args {
    /// Checks the flags against each other and against the named bounds; returns the layout of
    /// users, devices and chats they describe.
    pub fn validate(&self) -> Result<Layout, String> {
        if self.connections == 0 || self.connections > CONNECTIONS_MAX {
            return Err(format!("--connections must be in 1..={CONNECTIONS_MAX}"));
        }
        if self.group == 0 || self.group > GROUP_MAX {
            return Err(format!("--group must be in 1..={GROUP_MAX}"));
        }
        if !(BODY_BYTES_MIN..=BODY_BYTES_MAX).contains(&self.body_bytes) {
            return Err(format!(
                "--body-bytes must be in {BODY_BYTES_MIN}..={BODY_BYTES_MAX}"
            ));
        }
        if self.inflight == 0 || self.inflight > INFLIGHT_MAX {
            return Err(format!("--inflight must be in 1..={INFLIGHT_MAX}"));
        }
        if self.procs > PROCS_MAX {
            return Err(format!("--procs must be at most {PROCS_MAX}"));
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            return Err("--rate must be a finite number >= 0".into());
        }
        if self.mode == Mode::Send && self.chats == 0 {
            return Err("--chats must be at least 1 in send mode".into());
        }
        if self.mode == Mode::Send && self.duration_secs == 0 {
            return Err("--duration-secs must be at least 1 in send mode".into());
        }
        if self.worker_threads > WORKER_THREADS_MAX {
            return Err(format!(
                "--worker-threads must be at most {WORKER_THREADS_MAX}"
            ));
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        if self.target == Target::Chatlog && self.secret.is_empty() {
            return Err(
                "--secret (or CHATLOG_AUTH_SECRET) is required for --target chatlog".into(),
            );
        }
        if self.target != Target::Chatlog && self.mode != Mode::Send {
            return Err("idle and probe modes measure chatlog-server only".into());
        }
        let servers = match self.target {
            Target::Chatlog => self.urls().len(),
            Target::Redis => 1,
            Target::Nats => self.nats_urls().len(),
        };
        if servers == 0 || servers > SERVERS_MAX {
            return Err(format!(
                "give 1..={SERVERS_MAX} comma-separated server URLs"
            ));
        }
        if self.target == Target::Nats && !(1..=5).contains(&self.nats_replicas) {
            return Err("--nats-replicas must be in 1..=5".into());
        }
        if self.mode == Mode::Probe && self.probe_interval_ms == 0 {
            return Err("--probe-interval-ms must be at least 1".into());
        }
        let valid_prefix = self
            .user_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c));
        if self.user_prefix.is_empty() || self.user_prefix.len() > 32 || !valid_prefix {
            return Err("--user-prefix must be 1-32 chars of A-Za-z0-9_.@-".into());
        }
        Layout::new(
            self.connections,
            self.devices_per_user,
            self.chats,
            self.group,
        )
    }

    /// The chatlog-server URLs of `--url`, in order.
    pub fn urls(&self) -> Vec<&str> {
        split_list(&self.url)
    }

    /// The NATS URLs of `--nats-url`, in order.
    pub fn nats_urls(&self) -> Vec<&str> {
        split_list(&self.nats_url)
    }

    /// Number of worker processes to run: `--procs`, or when it is 0 enough processes that
    /// none holds more than [`crate::workload::SOCKETS_PER_PROCESS_MAX`] sockets.
    pub fn effective_procs(&self) -> usize {
        if self.procs > 0 {
            return self.procs;
        }
        let sockets_per_connection = match self.target {
            Target::Chatlog => 1,
            // One socket blocks in XREAD, the other sends.
            Target::Redis => 2,
            Target::Nats => 1,
        };
        let sockets = self.connections * sockets_per_connection;
        sockets
            .div_ceil(crate::workload::SOCKETS_PER_PROCESS_MAX)
            .clamp(1, PROCS_MAX)
    }
}

/// The non-empty, trimmed items of a comma-separated list.
fn split_list(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["chatlog-load", "--secret", "s"];
        argv.extend_from_slice(extra);
        Args::parse_from(argv)
    }

    #[test]
    fn defaults_are_valid() {
        let args = parse(&[]);
        assert!(args.validate().is_ok());
        assert_eq!(args.effective_procs(), 1);
    }

    #[test]
    fn auto_procs_stay_under_the_socket_bound() {
        let args = parse(&["--connections", "40000", "--mode", "idle"]);
        assert_eq!(args.effective_procs(), 3);
        let args = parse(&["--connections", "10000", "--target", "redis"]);
        assert_eq!(args.effective_procs(), 2);
    }

    #[test]
    fn rejects_out_of_bound_flags() {
        assert!(parse(&["--group", "300"]).validate().is_err());
        assert!(parse(&["--body-bytes", "3"]).validate().is_err());
        assert!(parse(&["--inflight", "0"]).validate().is_err());
        assert!(
            parse(&["--connections", "4", "--group", "8"])
                .validate()
                .is_err()
        );
        assert!(parse(&["--user-prefix", "a b"]).validate().is_err());
        assert!(parse(&["--url", " , "]).validate().is_err());
        assert!(
            parse(&["--target", "nats", "--mode", "idle"])
                .validate()
                .is_err()
        );
    }

    #[test]
    fn url_lists_keep_their_order() {
        let args = parse(&[]);
        assert_eq!(args.urls(), vec!["ws://127.0.0.1:8080/v1/ws"]);
        let args = parse(&["--url", "ws://a:1/v1/ws, ws://b:2/v1/ws,ws://c:3/v1/ws,"]);
        assert_eq!(
            args.urls(),
            vec!["ws://a:1/v1/ws", "ws://b:2/v1/ws", "ws://c:3/v1/ws"]
        );
        assert!(args.validate().is_ok());
        let args = parse(&["--target", "nats", "--nats-url", "nats://a:1,nats://b:2"]);
        assert_eq!(args.nats_urls().len(), 2);
        assert!(args.validate().is_ok());
    }
}
