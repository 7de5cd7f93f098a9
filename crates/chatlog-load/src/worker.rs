//! One worker process: owns a slice of the connections, runs them through the phases the parent
//! commands, and prints its [`Stats`] as one JSON line.
//!
//! # Parent ↔ worker protocol
//!
//! Over the worker's stdin and stdout, one JSON object or word per line:
//!
//! 1. parent → worker: a [`WorkerPlan`] (run id, the server's chat ids);
//! 2. worker → parent: [`WorkerLine::Ready`] once every connection is set up or has failed;
//! 3. parent → worker: `start` (send mode only): send for `--warmup-secs`, then measure;
//! 4. parent → worker: `stop`: the measured window ends; the worker waits up to `--drain-ms` for
//!    outstanding acknowledgements, closes its connections and answers [`WorkerLine::Result`].
//!
//! Anything a worker has to say to people goes to stderr.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::cli::{Args, Target};
use crate::stats::{Recorder, Stats};
use crate::workload::{self, Layout};

/// Command that starts sending.
pub const COMMAND_START: &str = "start";
/// Command that ends the measured window.
pub const COMMAND_STOP: &str = "stop";
/// Longest wait for connection tasks to finish once told to, before they are aborted.
const TASKS_JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the drain loop looks at the number of outstanding sends.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Longest run id; keeps client message ids within the protocol's 64 characters.
pub const RUN_ID_CHARS_MAX: usize = 16;

/// Where every connection task of a worker is. Only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Connecting and authenticating.
    Setup,
    /// Sending, not yet measuring.
    Warmup,
    /// Sending and measuring.
    Measure,
    /// Window over: no new sends; waiting for acknowledgements.
    Drain,
    /// Close everything.
    Done,
}

impl Phase {
    /// Whether connections send in this phase.
    pub fn sending(self) -> bool {
        matches!(self, Phase::Warmup | Phase::Measure)
    }
}

/// The parent's first line to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerPlan {
    /// Identifies this run in device ids, chat titles and client message ids.
    pub run_id: String,
    /// For each chat index, its id at the target, as JSON text (`17`, `"c17"`) for chatlog or the
    /// stream key for Redis.
    pub chat_ids: Vec<String>,
}

/// A line a worker prints on stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerLine {
    /// Every connection is set up or has failed.
    Ready {
        /// Connections set up.
        ready: u64,
        /// Connections that failed.
        failed: u64,
    },
    /// The worker's measurements.
    Result(Box<Stats>),
}

/// State every connection task of one worker shares.
#[derive(Debug)]
pub struct Shared {
    /// The command line.
    pub args: Args,
    /// Users, devices and chats.
    pub layout: Layout,
    /// Run id and chat ids.
    pub plan: WorkerPlan,
    /// For every user, its chats.
    pub chats_by_user: Vec<Vec<usize>>,
    /// The servers (one, or the nodes of a cluster); connection `i` uses server `i % n`.
    pub servers: Vec<Server>,
    /// Time between two sends of one connection at `--rate`; `None` = as fast as possible.
    pub send_period: Option<Duration>,
    /// Measurements merged from the connections' recorders.
    pub stats: Mutex<Stats>,
    /// Sends not yet acknowledged, over the worker's connections. Moved only through
    /// [`Shared::begin_send`] and [`Shared::end_sends`].
    pub inflight: AtomicU64,
    /// Whether new sends may start: set before [`Phase::Warmup`] is published, cleared before
    /// [`Phase::Drain`] is. Tasks see phase changes late; this flag is what the drain relies on.
    pub sends_open: AtomicBool,
    /// Bounds the connections being set up at once.
    pub connect_permits: Semaphore,
    /// The current phase.
    pub phase: watch::Receiver<Phase>,
}

/// One server the connections are spread over.
#[derive(Debug, Clone)]
pub struct Server {
    /// The URL connections use (chatlog: `ws://…`; NATS: `nats://…`; Redis: `host:port`).
    pub url: String,
    /// Its socket address.
    pub addr: SocketAddr,
    /// Local address to bind client sockets to, if any.
    pub source_ip: Option<IpAddr>,
}

impl Shared {
    /// The server connection `connection` uses: `connection % n` of the `n` servers, so that
    /// the members of a chat (consecutive connections) are spread over a cluster's nodes.
    pub fn server_of(&self, connection: usize) -> &Server {
        &self.servers[connection % self.servers.len()]
    }

    /// Claims one outstanding send, or returns `false` when sends are closed (the window is
    /// over). The count is raised before the flag is read, and the worker clears the flag before
    /// it reads the count (both sequentially consistent), so the drain never misses a send that
    /// started: either the task sees the flag cleared, or the worker sees the count raised.
    pub fn begin_send(&self) -> bool {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.sends_open.load(Ordering::SeqCst) {
            true
        } else {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            false
        }
    }

    /// Releases `count` outstanding sends (acknowledged, failed or abandoned).
    pub fn end_sends(&self, count: u64) {
        self.inflight.fetch_sub(count, Ordering::SeqCst);
    }

    /// The chats connection `connection` sends to and receives from.
    pub fn chats_of_connection(&self, connection: usize) -> &[usize] {
        &self.chats_by_user[self.layout.user_of_connection(connection)]
    }

    /// The target's ids of connection `connection`'s chats (see [`WorkerPlan::chat_ids`]), in
    /// send order.
    pub fn chat_ids_of_connection(&self, connection: usize) -> Vec<String> {
        self.chats_of_connection(connection)
            .iter()
            .map(|&chat| self.plan.chat_ids[chat].clone())
            .collect()
    }

    /// The user id of connection `connection`.
    pub fn user_name_of_connection(&self, connection: usize) -> String {
        workload::user_name(
            &self.args.user_prefix,
            self.layout.user_of_connection(connection),
        )
    }

    /// Sets up one connection with `set_up` while holding a connect permit, and reports to the
    /// worker whether it could. A failure is counted under its kind (the error of `set_up`).
    pub async fn set_up_connection<T>(
        &self,
        ready: &mut ReadyReport,
        set_up: impl Future<Output = Result<T, String>>,
    ) -> Option<T> {
        let opened = match self.connect_permits.acquire().await {
            Ok(_permit) => set_up.await,
            Err(_) => Err("setup:cancelled".to_owned()),
        };
        match opened {
            Ok(opened) => {
                ready.report(true);
                Some(opened)
            }
            Err(kind) => {
                let mut recorder = Recorder::default();
                recorder.error(&kind);
                recorder.flush(&self.stats);
                ready.report(false);
                None
            }
        }
    }

    /// The send ticker of connection `connection` at `--rate`, first tick spread over one period
    /// so that connections do not send together; `None` when sending as fast as possible.
    pub fn send_ticker(&self, connection: usize) -> Option<Interval> {
        let period = self.send_period?;
        let offset = workload::first_send_offset(period, connection, self.layout.connections());
        let mut ticker = tokio::time::interval_at(Instant::now() + offset, period);
        // Catch up after a stall, so that the offered rate stays the target; sends that find
        // `--inflight` outstanding are skipped and counted.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        Some(ticker)
    }
}

/// A TCP connection to `addr`, bound to local address `source` (any port) if given, with
/// Nagle's algorithm off.
pub async fn open_socket(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Tells the worker whether one connection could be set up; reports a failure if dropped
/// unreported (a task that ends early or panics), so that the worker never waits for it.
#[derive(Debug)]
pub struct ReadyReport {
    sender: Option<mpsc::UnboundedSender<bool>>,
}

impl ReadyReport {
    /// Reports `ok` (the first report only counts).
    pub fn report(&mut self, ok: bool) {
        if let Some(sender) = self.sender.take() {
            // The worker stops listening only once every connection reported.
            let _ = sender.send(ok);
        }
    }
}

impl Drop for ReadyReport {
    fn drop(&mut self) {
        self.report(false);
    }
}

/// Waits until the worker is done (or gone).
pub async fn until_done(phase: &mut watch::Receiver<Phase>) {
    let _ = phase.wait_for(|&p| p == Phase::Done).await;
}

/// The source address of worker `worker` when the server is on IPv4 loopback: 127.0.0.(k+1), so
/// that the workers' connections come from different addresses (each gets its own range of
/// ephemeral ports).
pub fn source_ip(server_addr: SocketAddr, worker: usize, disabled: bool) -> Option<IpAddr> {
    match server_addr {
        SocketAddr::V4(v4) if v4.ip().is_loopback() && !disabled => {
            let last = u8::try_from(worker + 1).ok()?;
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        }
        _ => None,
    }
}

/// Resolves `host:port`, preferring IPv4.
pub async fn resolve(host_port: &str) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .with_context(|| format!("{host_port} resolves to no address"))
}

/// Prints one protocol line on stdout.
fn print_line(line: &WorkerLine) -> anyhow::Result<()> {
    let text = serde_json::to_string(line)?;
    println!("{text}");
    Ok(())
}

/// Runs worker `index` of `workers` to completion.
pub async fn run(args: Args, index: usize, workers: usize) -> anyhow::Result<()> {
    let layout = args.validate().map_err(anyhow::Error::msg)?;
    if workers == 0 || index >= workers {
        bail!("worker {index} of {workers}");
    }
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let plan_line = stdin
        .next_line()
        .await?
        .context("the parent sent no plan")?;
    let plan: WorkerPlan = serde_json::from_str(&plan_line).context("parsing the plan")?;
    if plan.chat_ids.len() != layout.chats() {
        bail!(
            "plan has {} chats, expected {}",
            plan.chat_ids.len(),
            layout.chats()
        );
    }
    if plan.run_id.is_empty() || plan.run_id.len() > RUN_ID_CHARS_MAX {
        bail!(
            "run id {:?} is not 1..={RUN_ID_CHARS_MAX} chars",
            plan.run_id
        );
    }

    let urls: Vec<String> = match args.target {
        Target::Chatlog => args.urls().into_iter().map(str::to_owned).collect(),
        Target::Redis => vec![args.redis_addr.clone()],
        Target::Nats => args.nats_urls().into_iter().map(str::to_owned).collect(),
    };
    let mut servers = Vec::with_capacity(urls.len());
    for url in urls {
        let addr = match args.target {
            Target::Chatlog => {
                crate::chatlog_target::Endpoint::parse(&url)?
                    .resolve()
                    .await?
            }
            Target::Redis => resolve(&url).await?,
            Target::Nats => resolve(crate::nats_target::host_port(&url)?).await?,
        };
        servers.push(Server {
            source_ip: source_ip(addr, index, args.no_source_bind),
            addr,
            url,
        });
    }
    let chats_by_user = layout.chats_by_user();
    let sending_connections = (0..layout.connections())
        .filter(|&c| !chats_by_user[layout.user_of_connection(c)].is_empty())
        .count();
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let shared = Arc::new(Shared {
        send_period: workload::send_period(args.rate, sending_connections),
        connect_permits: Semaphore::new(args.connect_concurrency),
        stats: Mutex::new(Stats::default()),
        inflight: AtomicU64::new(0),
        sends_open: AtomicBool::new(false),
        phase: phase_rx,
        servers,
        chats_by_user,
        plan,
        layout,
        args,
    });

    let range = shared.layout.connection_range(index, workers);
    let connections = range.len() as u64;
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<bool>();
    let mut tasks = JoinSet::new();
    for connection in range {
        let shared = Arc::clone(&shared);
        let ready_tx = ReadyReport {
            sender: Some(ready_tx.clone()),
        };
        match shared.args.target {
            Target::Chatlog => tasks.spawn(crate::chatlog_target::run_connection(
                shared, connection, ready_tx,
            )),
            Target::Redis => tasks.spawn(crate::redis_target::run_connection(
                shared, connection, ready_tx,
            )),
            Target::Nats => tasks.spawn(crate::nats_target::run_connection(
                shared, connection, ready_tx,
            )),
        };
    }
    drop(ready_tx);
    let (mut ready, mut failed) = (0u64, 0u64);
    while ready + failed < connections {
        match ready_rx.recv().await {
            Some(true) => ready += 1,
            Some(false) => failed += 1,
            None => break,
        }
    }
    print_line(&WorkerLine::Ready { ready, failed })?;

    let warmup = Duration::from_secs(shared.args.warmup_secs);
    let mut measure_at: Option<Instant> = None;
    let mut measure_started: Option<Instant> = None;
    loop {
        tokio::select! {
            line = stdin.next_line() => match line?.as_deref().map(str::trim) {
                Some(COMMAND_START) => {
                    shared.sends_open.store(true, Ordering::SeqCst);
                    phase_tx.send_replace(Phase::Warmup);
                    measure_at = Some(Instant::now() + warmup);
                }
                Some(COMMAND_STOP) | None => break,
                Some(other) => eprintln!("chatlog-load worker {index}: unknown command {other:?}"),
            },
            () = sleep_until_opt(measure_at) => {
                phase_tx.send_replace(Phase::Measure);
                measure_started = Some(Instant::now());
                measure_at = None;
            }
        }
    }
    let window = measure_started.map_or(Duration::ZERO, |start| start.elapsed());
    shared.sends_open.store(false, Ordering::SeqCst);
    phase_tx.send_replace(Phase::Drain);
    let drain_deadline = Instant::now() + Duration::from_millis(shared.args.drain_ms);
    while shared.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
    }
    phase_tx.send_replace(Phase::Done);
    let joined = tokio::time::timeout(TASKS_JOIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let mut stats = {
        let mut guard = shared
            .stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::take(&mut *guard)
    };
    if joined.is_err() {
        stats.counts.count_error("worker:tasks_aborted");
        tasks.abort_all();
    }
    stats.counts.connections_ready = ready;
    stats.counts.connections_failed = failed;
    stats.window_secs = window.as_secs_f64();
    print_line(&WorkerLine::Result(Box::new(stats)))?;
    Ok(())
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
impl Shared {
    /// A worker's shared state for unit tests: the default flags plus `extra_args`, three
    /// servers on ports 1 to 3 (never connected to), sends closed, and the phase from `phase`.
    pub fn for_tests(extra_args: &[&str], phase: watch::Receiver<Phase>) -> Self {
        use clap::Parser as _;
        let args = Args::parse_from(["chatlog-load", "--secret", "s"].iter().chain(extra_args));
        let layout = args.validate().unwrap();
        Shared {
            send_period: workload::send_period(args.rate, layout.connections()),
            chats_by_user: layout.chats_by_user(),
            plan: WorkerPlan {
                run_id: "r".into(),
                chat_ids: vec!["1".into(); layout.chats()],
            },
            servers: (1..=3)
                .map(|port| Server {
                    url: format!("ws://127.0.0.1:{port}/v1/ws"),
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    source_ip: None,
                })
                .collect(),
            stats: Mutex::new(Stats::default()),
            inflight: AtomicU64::new(0),
            sends_open: AtomicBool::new(false),
            connect_permits: Semaphore::new(1),
            phase,
            layout,
            args,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_distinct_loopback_sources() {
        let server: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            source_ip(server, 0, false),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)))
        );
        assert_eq!(
            source_ip(server, 3, false),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)))
        );
        assert_eq!(source_ip(server, 3, true), None);
        assert_eq!(source_ip(server, 255, false), None);
        let remote: SocketAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(source_ip(remote, 0, false), None);
    }

    fn test_shared() -> Shared {
        let (_phase_tx, phase) = watch::channel(Phase::Setup);
        Shared::for_tests(&[], phase)
    }

    #[test]
    fn connections_round_robin_over_the_servers() {
        let shared = test_shared();
        let ports: Vec<u16> = (0..7).map(|c| shared.server_of(c).addr.port()).collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn sends_start_only_while_open_and_are_counted_until_released() {
        let shared = test_shared();
        assert!(!shared.begin_send());
        assert_eq!(shared.inflight.load(Ordering::SeqCst), 0);
        shared.sends_open.store(true, Ordering::SeqCst);
        assert!(shared.begin_send());
        assert!(shared.begin_send());
        assert_eq!(shared.inflight.load(Ordering::SeqCst), 2);
        shared.sends_open.store(false, Ordering::SeqCst);
        assert!(!shared.begin_send());
        shared.end_sends(2);
        assert_eq!(shared.inflight.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn worker_lines_round_trip() {
        let line = WorkerLine::Ready {
            ready: 3,
            failed: 1,
        };
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(text, r#"{"ready":{"ready":3,"failed":1}}"#);
        let back: WorkerLine = serde_json::from_str(&text).unwrap();
        assert!(matches!(
            back,
            WorkerLine::Ready {
                ready: 3,
                failed: 1
            }
        ));
    }
}
