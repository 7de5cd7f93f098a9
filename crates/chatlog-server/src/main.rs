//! `chatlog-server`: the command line of PROTOCOL.md "Running".
//!
//! With no arguments it serves one node on 127.0.0.1:8080 with data under `./chatlog-data`,
//! creating a secret there if none is configured and printing a ready demo token.

use std::path::PathBuf;
use std::process::ExitCode;

use chatlog_server::auth::{self, Auth};
use chatlog_server::config::{self, ServerConfig};
use clap::{Args, Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the server allocates and frees small buffers per
/// message on several threads (frames, records, index keys), where glibc's arenas showed up at
/// 5–8 % of the cluster's CPU (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DATA_DIR_DEFAULT: &str = "./chatlog-data";
const LISTEN_DEFAULT: &str = "127.0.0.1:8080";

#[derive(Parser)]
#[command(
    name = "chatlog-server",
    version,
    about = "chatlog: a chat backend that owns its log",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand the serve flags apply.
    #[command(flatten)]
    serve: Box<ServeArgs>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve clients (the default).
    Serve(Box<ServeArgs>),
    /// Print a token signed with the configured secret.
    Token(TokenArgs),
    /// Cluster administration through a node's replication address.
    Cluster(ClusterArgs),
    /// Restore a cluster snapshot (`snapshot.data`, see `cluster snapshot`) as the data of a
    /// single-node server.
    Restore(RestoreArgs),
}

#[derive(Args)]
struct RestoreArgs {
    /// The snapshot bundle (`<data-dir>/cluster/sm/snapshot.data` of a node).
    #[arg(long)]
    snapshot: PathBuf,
    /// The snapshot's meta (`snapshot.meta`); default: next to `--snapshot`. Needed with
    /// `--node-id` only.
    #[arg(long)]
    meta: Option<PathBuf>,
    /// The new server's data directory (its `engine/` must not exist yet).
    #[arg(long, env = "CHATLOG_DATA_DIR", default_value = DATA_DIR_DEFAULT)]
    data_dir: PathBuf,
    /// Restore as node ID of the backup's cluster (same ids and replication addresses)
    /// instead of as a single server.
    #[arg(long)]
    node_id: Option<u64>,
}

#[derive(Args)]
struct ClusterArgs {
    /// Replication address (`--peer-listen`) of any node; requests that need the leader are
    /// sent on to it.
    #[arg(long, env = "CHATLOG_ADMIN_NODE", default_value = "127.0.0.1:7001")]
    node: String,
    #[command(subcommand)]
    action: ClusterAction,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Print the node's Raft metrics (JSON).
    Status,
    /// Print the node's applied index and a digest of its chat state (JSON).
    Digest,
    /// Build a snapshot now and write it as `snapshot.data` and `snapshot.meta` in the node's
    /// `<data-dir>/cluster/sm/` (a consistent backup: copy those two files).
    Snapshot,
    /// Add a node as a learner (it receives the log but does not vote yet).
    AddLearner {
        /// New node's id.
        #[arg(long)]
        id: u64,
        /// Its replication address.
        #[arg(long)]
        addr: String,
        /// Fail if the learner received nothing for this many seconds (it stays a learner).
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
    },
    /// Set the voters: learners listed here are promoted (once they have caught up), voters
    /// not listed leave the cluster.
    SetVoters {
        /// Comma-separated node ids.
        #[arg(long, value_delimiter = ',', required = true)]
        voters: Vec<u64>,
    },
    /// Remove nodes from the cluster.
    Remove {
        /// Comma-separated node ids.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u64>,
    },
}

// No `Debug`: it would print the secret.
#[derive(Args, Default)]
struct ServeArgs {
    /// Data directory (log, indexes, files, generated secret).
    #[arg(long, env = "CHATLOG_DATA_DIR", default_value = DATA_DIR_DEFAULT)]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "CHATLOG_LISTEN", default_value = LISTEN_DEFAULT)]
    listen: String,
    /// HS256 secret for tokens (default: <data-dir>/auth-secret, created if absent).
    #[arg(long, env = "CHATLOG_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Option<String>,
    /// Sends per user per minute; 0 turns the limit off.
    #[arg(long, env = "CHATLOG_RATE_LIMIT", default_value_t = config::RATE_LIMIT_PER_MINUTE_DEFAULT, allow_negative_numbers = true)]
    rate_limit: u32,
    /// Largest WebSocket message parsed, in bytes.
    #[arg(long, env = "CHATLOG_MAX_FRAME_BYTES", default_value_t = config::MAX_FRAME_BYTES_DEFAULT)]
    max_frame_bytes: usize,
    /// URL posted to when a member with no connected device gets a message (http:// only).
    #[arg(long, env = "CHATLOG_PUSH_WEBHOOK")]
    push_webhook: Option<String>,
    /// At most one webhook post per user per this many ms.
    #[arg(long, env = "CHATLOG_PUSH_INTERVAL_MS", default_value_t = config::PUSH_INTERVAL_MS_DEFAULT)]
    push_interval_ms: u64,
    /// Close connections with no inbound frame or pong for this long.
    #[arg(long, env = "CHATLOG_IDLE_TIMEOUT_MS", default_value_t = config::IDLE_TIMEOUT_MS_DEFAULT)]
    idle_timeout_ms: u64,
    /// Ping interval.
    #[arg(long, env = "CHATLOG_PING_INTERVAL_MS", default_value_t = config::PING_INTERVAL_MS_DEFAULT)]
    ping_interval_ms: u64,
    /// Close an HTTP connection whose request headers have not all arrived within this long.
    #[arg(long, env = "CHATLOG_HEADER_READ_TIMEOUT_MS", default_value_t = config::HEADER_READ_TIMEOUT_MS_DEFAULT)]
    header_read_timeout_ms: u64,
    /// Largest uploaded file, in bytes.
    #[arg(long, env = "CHATLOG_MAX_FILE_BYTES", default_value_t = config::MAX_FILE_BYTES_DEFAULT)]
    max_file_bytes: u64,
    /// Frames queued per connection before it is closed as too slow (4001).
    #[arg(long, env = "CHATLOG_OUTBOUND_QUEUE", default_value_t = config::OUTBOUND_QUEUE_DEFAULT)]
    outbound_queue: usize,
    /// Connection cap of the server.
    #[arg(long, env = "CHATLOG_MAX_CONNECTIONS", default_value_t = config::MAX_CONNECTIONS_DEFAULT)]
    max_connections: usize,
    /// Connection cap per client IP address; 0 = off.
    #[arg(long, env = "CHATLOG_MAX_CONNECTIONS_PER_IP", default_value_t = config::MAX_CONNECTIONS_PER_IP_DEFAULT)]
    max_connections_per_ip: usize,
    /// Presence TTL of a connection without inbound traffic, in ms.
    #[arg(long, env = "CHATLOG_PRESENCE_TTL_MS", default_value_t = chatlog::presence::TTL_MS_DEFAULT)]
    presence_ttl_ms: u64,
    /// Members per chat, creator included.
    #[arg(long, env = "CHATLOG_MAX_MEMBERS", default_value_t = 256)]
    max_members: usize,
    /// Largest message body in bytes of UTF-8.
    #[arg(long, env = "CHATLOG_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    max_body_bytes: usize,
    /// This node's id in a cluster.
    #[arg(long, env = "CHATLOG_NODE_ID")]
    node_id: Option<u64>,
    /// Cluster voters `1=HOST:PORT,2=HOST:PORT,...` (their replication addresses, this node
    /// included).
    #[arg(long, env = "CHATLOG_PEERS")]
    peers: Option<String>,
    /// Replication listen address of this node (default: its address in --peers).
    #[arg(long, env = "CHATLOG_PEER_LISTEN")]
    peer_listen: Option<String>,
    /// Cluster: a write not committed by a quorum within this many ms answers `unavailable`.
    #[arg(long, env = "CHATLOG_WRITE_TIMEOUT_MS", default_value_t = config::WRITE_TIMEOUT_MS_DEFAULT)]
    write_timeout_ms: u64,
    /// Cluster: this node joins a running cluster (add it with `cluster add-learner`, then
    /// `cluster set-voters`) instead of forming one from --peers.
    #[arg(long, env = "CHATLOG_JOIN")]
    join: bool,
    /// Cluster: build a snapshot (and purge the Raft log) every this many applied entries.
    #[arg(long, env = "CHATLOG_SNAPSHOT_EVERY", default_value_t = 100_000)]
    snapshot_every: u64,
}

#[derive(Args)]
struct TokenArgs {
    /// User id (`sub`).
    #[arg(long)]
    user: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = auth::TOKEN_TTL_SECS_DEFAULT)]
    ttl: u64,
    /// Secret (default: the one in --data-dir).
    #[arg(long, env = "CHATLOG_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Option<String>,
    /// Data directory holding the generated secret.
    #[arg(long, env = "CHATLOG_DATA_DIR", default_value = DATA_DIR_DEFAULT)]
    data_dir: PathBuf,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(args)) => token(args),
        Some(Command::Cluster(args)) => cluster_admin(args),
        Some(Command::Restore(args)) => restore(args),
        Some(Command::Serve(args)) => serve(*args),
        None => serve(*cli.serve),
    }
}

fn token(args: TokenArgs) -> ExitCode {
    if let Err(e) = chatlog::engine::types::check_user(&args.user) {
        eprintln!("error: --user: {e}");
        return ExitCode::from(2);
    }
    let secret = match args.auth_secret {
        Some(s) => s,
        None => match std::fs::read_to_string(args.data_dir.join(auth::SECRET_FILE)) {
            Ok(s) => s.trim().to_owned(),
            Err(e) => {
                eprintln!(
                    "error: no --auth-secret given and cannot read {}: {e}\n\
                     (start the server once to create it, or pass --auth-secret)",
                    args.data_dir.join(auth::SECRET_FILE).display()
                );
                return ExitCode::from(2);
            }
        },
    };
    if let Err(e) = auth::check_secret(&secret) {
        eprintln!("error: --auth-secret: {e}");
        return ExitCode::from(2);
    }
    match Auth::new(secret.as_bytes()) {
        Ok(auth) => {
            println!("{}", auth.sign(&args.user, now_secs() + args.ttl));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: --auth-secret: {e}");
            ExitCode::from(2)
        }
    }
}

/// Cluster settings from the flags; `None` for a single node.
fn cluster_settings(args: &ServeArgs) -> Result<Option<config::ClusterSettings>, String> {
    let (node_id, peers) = match (args.node_id, &args.peers) {
        (None, None) if args.peer_listen.is_none() && !args.join => return Ok(None),
        (Some(id), Some(peers)) => (id, config::parse_peers(peers)?),
        _ if args.join => {
            return Err(
                "--join adds this node to a running cluster: it needs --node-id and --peers too"
                    .into(),
            );
        }
        _ => return Err("cluster mode needs both --node-id and --peers".into()),
    };
    let own = peers
        .get(&node_id)
        .ok_or_else(|| format!("--peers does not list this node's id {node_id}"))?;
    let (flag, listen) = match &args.peer_listen {
        Some(listen) => ("--peer-listen".to_owned(), listen.clone()),
        None => (format!("--peers (node {node_id}'s entry)"), own.clone()),
    };
    let peer_listen = std::net::ToSocketAddrs::to_socket_addrs(&listen)
        .map_err(|e| format!("{flag} {listen:?}: {e} (use HOST:PORT)"))?
        .next()
        .ok_or_else(|| format!("{flag} {listen:?}: the host has no address"))?;
    if args.auth_secret.is_none() {
        return Err(
            "cluster mode needs --auth-secret (or CHATLOG_AUTH_SECRET), the same on every \
             node, so a token works on any node"
                .into(),
        );
    }
    if args.write_timeout_ms == 0 {
        return Err("--write-timeout-ms: must be positive".into());
    }
    if args.snapshot_every == 0 {
        return Err("--snapshot-every: must be positive".into());
    }
    Ok(Some(config::ClusterSettings {
        node_id,
        peers,
        peer_listen,
        write_timeout_ms: args.write_timeout_ms,
        snapshot_every: args.snapshot_every,
        join: args.join,
    }))
}

/// Builds a runtime with I/O and timers; says why on stderr if it cannot.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .map_err(|e| eprintln!("error: cannot start the runtime: {e}"))
        .ok()
}

fn restore(args: RestoreArgs) -> ExitCode {
    if let Some(node_id) = args.node_id {
        return restore_node(&args, node_id);
    }
    if args.data_dir.join("cluster").exists() {
        eprintln!(
            "error: restore: {} holds a cluster node's data (cluster/); restore into a new, \
             empty data directory",
            args.data_dir.display()
        );
        return ExitCode::from(2);
    }
    let dir = args.data_dir.join("engine");
    match chatlog_raft::state_machine::restore_bundle(&args.snapshot, &dir) {
        Ok(()) => {
            println!(
                "restored {} into {}; start it with: chatlog-server serve --data-dir {}",
                args.snapshot.display(),
                dir.display(),
                args.data_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: restore {}: {e}", args.snapshot.display());
            ExitCode::from(2)
        }
    }
}

/// `restore --node-id`: the backup as one node of its cluster.
fn restore_node(args: &RestoreArgs, node_id: u64) -> ExitCode {
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    let meta = args
        .meta
        .clone()
        .unwrap_or_else(|| args.snapshot.with_file_name("snapshot.meta"));
    let config = chatlog_raft::ClusterConfig::new(
        node_id,
        Default::default(),
        args.data_dir.join("cluster"),
    );
    match runtime.block_on(chatlog_raft::node::restore_node(
        &config,
        &args.snapshot,
        &meta,
    )) {
        Ok((index, members)) => {
            let peers = members
                .iter()
                .map(|(id, addr)| format!("{id}={addr}"))
                .collect::<Vec<_>>()
                .join(",");
            println!(
                "restored {} (up to log index {index}) as node {node_id} into {}; restore the \
                 same backup for every node of {peers} (or start the others on empty \
                 directories with --join), then start each with: chatlog-server serve \
                 --node-id {node_id} --peers {peers} --data-dir {}",
                args.snapshot.display(),
                args.data_dir.display(),
                args.data_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: restore {}: {e}", args.snapshot.display());
            ExitCode::from(2)
        }
    }
}

/// `chatlog-server cluster ...`: admin requests to a node's replication address; a request
/// answered "not leader" is sent on to the leader once.
fn cluster_admin(args: ClusterArgs) -> ExitCode {
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    let (method_post, path, body) = match &args.action {
        ClusterAction::Status => (false, "/admin/metrics", serde_json::Value::Null),
        ClusterAction::Digest => (false, "/admin/digest", serde_json::Value::Null),
        ClusterAction::Snapshot => (true, "/admin/snapshot", serde_json::Value::Null),
        ClusterAction::AddLearner {
            id,
            addr,
            wait_secs,
        } => (
            true,
            "/admin/add-learner",
            serde_json::json!({"id": id, "addr": addr, "wait_secs": wait_secs}),
        ),
        ClusterAction::SetVoters { voters } => (
            true,
            "/admin/change-membership",
            serde_json::json!({"voters": voters}),
        ),
        ClusterAction::Remove { ids } => (
            true,
            "/admin/change-membership",
            serde_json::json!({"voters": [], "remove": ids}),
        ),
    };
    runtime.block_on(async move {
        let client = reqwest::Client::new();
        let mut node = args.node.clone();
        for _ in 0..2 {
            let url = format!("http://{node}{path}");
            let request = if method_post {
                client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
            } else {
                client.get(&url)
            };
            let resp = match request.send().await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: --node {node}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::MISDIRECTED_REQUEST {
                let leader = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["leader_addr"].as_str().map(str::to_owned));
                if let Some(leader) = leader {
                    node = leader;
                    continue;
                }
            }
            println!("{text}");
            return if status.is_success() {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: {status}");
                ExitCode::FAILURE
            };
        }
        eprintln!("error: the leader moved while the request was sent; try again");
        ExitCode::FAILURE
    })
}

fn serve(args: ServeArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not as escape codes in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cluster = match cluster_settings(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (secret, created) = match &args.auth_secret {
        Some(s) => (s.clone(), false),
        None => match auth::load_or_create_secret(&args.data_dir) {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("error: --data-dir {}: {e}", args.data_dir.display());
                return ExitCode::from(2);
            }
        },
    };
    let mut config = ServerConfig::new(&args.data_dir, secret.clone());
    config.rate_limit_per_minute = args.rate_limit;
    config.max_frame_bytes = args.max_frame_bytes;
    config.push_webhook = args.push_webhook.clone();
    config.push_interval_ms = args.push_interval_ms;
    config.idle_timeout_ms = args.idle_timeout_ms;
    config.ping_interval_ms = args.ping_interval_ms;
    config.header_read_timeout_ms = args.header_read_timeout_ms;
    config.max_file_bytes = args.max_file_bytes;
    config.outbound_queue = args.outbound_queue;
    config.max_connections = args.max_connections;
    config.max_connections_per_ip = args.max_connections_per_ip;
    config.presence_ttl_ms = args.presence_ttl_ms;
    config.engine.members_max = args.max_members;
    config.engine.body_bytes_max = args.max_body_bytes;
    config.cluster = cluster;
    // The web page's demo token endpoint, only for the no-argument dev run on this machine.
    config.dev_tokens = std::env::args_os().len() <= 1
        && args.auth_secret.is_none()
        && args
            .listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: --listen {}: {e}", args.listen);
                return ExitCode::from(2);
            }
        };
        let addr = listener
            .local_addr()
            .map_or(args.listen.clone(), |a| a.to_string());
        // Announced once the server is ready (in a cluster, once the node and its
        // replication port are up): a clash found on the way is reported without a
        // "listening" line before it.
        let announcement = if args.auth_secret.is_none() {
            let token = match Auth::new(secret.as_bytes()) {
                Ok(auth) => auth.sign("demo", now_secs() + 24 * 3600),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let origin = if created { "created" } else { "from" };
            format!(
                "chatlog-server listening on ws://{addr}/v1/ws (data in {}, secret {origin} {})\n\
                 demo token (user \"demo\", valid 24 h):\n{token}\n\
                 try: cargo run -p chat-cli -- --url ws://{addr}/v1/ws --token {token}\n\
                 more users: cargo run --release -p chatlog-server -- token --user bob --data-dir {}\n\
                 web client: http://{addr}/",
                args.data_dir.display(),
                args.data_dir.join(auth::SECRET_FILE).display(),
                args.data_dir.display()
            )
        } else {
            format!("chatlog-server listening on ws://{addr}/v1/ws")
        };
        let ready = move || {
            use std::io::Write;
            println!("{announcement}");
            let _ = std::io::stdout().flush();
        };
        match chatlog_server::serve_ready(listener, config, shutdown_signal(), ready).await {
            Ok(()) => {
                eprintln!("chatlog-server: stopped cleanly");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                // Bad settings (an address in use, a data directory of the other mode) exit
                // 2, as flags that fail to parse do.
                if matches!(e, chatlog_server::ServerError::Config(_)) {
                    ExitCode::from(2)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
