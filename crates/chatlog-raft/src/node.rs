//! A cluster node: openraft over the [`LogStore`] and [`StateMachine`], the peer HTTP server,
//! and the [`Proposer`] that routes the engine's writes through Raft (forwarding them to the
//! leader when this node is not it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use chatlog::engine::{ChatError, Engine, EngineConfig, Op, Outcome, Proposer, Refusal, Responder};
use chatlog::log::LogConfig;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::AppendEntriesResponse;
use openraft::{BasicNode, ChangeMembers, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::blobs::{BlobGot, BlobPut, BlobStore};
use crate::cell::EngineCell;
use crate::forward::{Forwarded, Order, Stamps, Turn, WriteReply};
use crate::log_store::LogStore;
use crate::network::{NetFaults, Network, PeerClient};
use crate::state_machine::StateMachine;
use crate::types::{NodeId, Raft, Request, Response};
use crate::wire::{self, Route};

/// Configuration of a cluster node.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id (`--node-id`).
    pub node_id: NodeId,
    /// Every voter's id and replication address (`--peers`), this node included.
    pub peers: BTreeMap<NodeId, String>,
    /// Where the node keeps its Raft log (`raft/`) and its engine (`sm/`).
    pub data_dir: PathBuf,
    /// The engine's configuration (made a replica).
    pub engine: EngineConfig,
    /// The Raft log's segment configuration. Default: [`LogConfig::default`], keeping one
    /// sealed segment in the page cache.
    pub raft_log: LogConfig,
    /// A write not committed within this time answers `unavailable`. Default 3 s.
    pub write_timeout: Duration,
    /// Leader heartbeat interval; also the time openraft allows one AppendEntries round trip
    /// (including the follower's fsync), so not too short on a busy disk. Default 100 ms.
    pub heartbeat_ms: u64,
    /// Election timeout range: a leader silent this long is replaced. Default 300–500 ms.
    /// openraft adds a leader lease of the range's maximum after the last heartbeat, and a node
    /// that saw a longer log waits twice the maximum more, so leader loss costs about
    /// 0.6–1.0 s plus the election (measured: `docs/benchmarks.md`, "Failover").
    pub election_timeout_ms: (u64, u64),
    /// Build a snapshot every this many applied entries. Default 100,000.
    pub snapshot_every: u64,
    /// Entries kept in the Raft log behind the last snapshot. Default 10,000.
    pub keep_after_snapshot: u64,
    /// Form the cluster from `peers` when this node's log is empty. Default true.
    pub initialize: bool,
    /// Injected network faults (tests).
    pub faults: Arc<NetFaults>,
    /// Where file attachments' bytes are kept ([`crate::blobs`]). Default: `data_dir/files`;
    /// the server gives its own files directory.
    pub blob_dir: PathBuf,
}

impl ClusterConfig {
    /// A configuration with defaults for node `node_id` of `peers`, data under `data_dir`.
    pub fn new(node_id: NodeId, peers: BTreeMap<NodeId, String>, data_dir: PathBuf) -> Self {
        ClusterConfig {
            node_id,
            peers,
            data_dir: data_dir.clone(),
            engine: EngineConfig::default(),
            raft_log: LogConfig {
                cached_sealed_segments: Some(RAFT_LOG_CACHED_SEALED_SEGMENTS),
                ..LogConfig::default()
            },
            write_timeout: Duration::from_secs(3),
            heartbeat_ms: 100,
            election_timeout_ms: (300, 500),
            snapshot_every: 100_000,
            keep_after_snapshot: 10_000,
            initialize: true,
            faults: NetFaults::new(),
            blob_dir: data_dir.join("files"),
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Storage could not open.
    #[error("storage: {0}")]
    Storage(#[from] crate::types::StorageError),
    /// openraft refused the configuration.
    #[error("raft: {0}")]
    Raft(String),
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
}

/// Gossip between nodes: opaque bytes for the embedding server (presence).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gossip {
    /// The sender.
    pub from: NodeId,
    /// The payload.
    pub bytes: Vec<u8>,
}

struct Inner {
    id: NodeId,
    cell: Arc<EngineCell>,
    /// For exporting snapshots (openraft owns the one it applies through).
    state_machine: StateMachine,
    raft: Raft,
    client: PeerClient,
    applied: watch::Receiver<u64>,
    gossip: broadcast::Sender<Gossip>,
    peers: BTreeMap<NodeId, String>,
    /// Followers' forwarded batches, proposed in each follower's order (on the leader).
    order: Order,
    write_timeout: Duration,
    /// The batcher's queue (forwarded operations join the leader's entries through it).
    queue: tokio::sync::mpsc::UnboundedSender<Pending>,
    /// File attachments' bytes.
    blobs: BlobStore,
    /// Read barriers waiting for the next round ([`run_barriers`]).
    barriers: tokio::sync::mpsc::UnboundedSender<BarrierWaiter>,
    /// Held by the batcher while it turns a batch into an entry or a forward, and by
    /// [`ClusterNode::hand_off_leadership`] for the whole hand-off: no entry is proposed
    /// meanwhile, so the successor can hold all of the leader's log.
    proposals: Arc<tokio::sync::Mutex<()>>,
    /// When this node last accepted an AppendEntries (ms since `epoch`; 0: never).
    heard_from_leader_ms: AtomicU64,
    /// The origin of `heard_from_leader_ms`.
    epoch: Instant,
    /// [`election_guard_window`].
    guard_window: Duration,
}

impl Inner {
    /// Whether this node accepted an AppendEntries (from a leader) within `window`.
    fn heard_from_leader_within(&self, window: Duration) -> bool {
        let at = self.heard_from_leader_ms.load(Ordering::Relaxed);
        at > 0 && self.epoch.elapsed().as_millis() as u64 <= at + window.as_millis() as u64
    }

    /// Whether this node leads or follows a live leader: its answer to a [`Route::Ping`]
    /// (a peer that does refuses to help another node campaign, as a Raft pre-vote would).
    fn hears_a_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
            || self.heard_from_leader_within(self.guard_window)
    }
}

/// The leader's request to a follower to campaign at once ([`Route::TakeLeadership`]).
#[derive(Debug, Serialize, Deserialize)]
struct TakeLeadership {
    /// The leader asking.
    from: NodeId,
    /// Its term: a follower that has seen a later one (or another leader) refuses.
    term: u64,
}

/// A caller of [`ClusterNode::read_barrier`]: told the leader's read index, or why not.
type BarrierWaiter = tokio::sync::oneshot::Sender<Result<Option<u64>, String>>;

/// A running cluster node.
pub struct ClusterNode {
    inner: Arc<Inner>,
    cell: Arc<EngineCell>,
    /// When this node last became the leader (set by [`track_leadership`]).
    led_since: Arc<std::sync::Mutex<Option<Instant>>>,
    /// openraft's leader lease: a voter that heard from a leader within it refuses to vote.
    lease: Duration,
    stop: CancellationToken,
    server: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

fn unavailable(why: String) -> ChatError {
    ChatError::Unavailable(chatlog::Error::Io {
        op: "replicated write",
        path: PathBuf::from("cluster"),
        source: std::io::Error::other(why),
    })
}

/// Sealed Raft log segments kept in the page cache. Committed entries are read again only by
/// a lagging follower's replication and by the engine's replay after a crash (from its last
/// marker: the newest entries), so older segments only crowded out the engine's history. And
/// on this project's VMs, writing new segments into fresh pages is ten times dearer than into
/// reused ones: the threads zero-filling them took a quarter of the servers' CPU in case C
/// (docs/benchmarks.md, "Where the waves in p99 come from").
const RAFT_LOG_CACHED_SEALED_SEGMENTS: usize = 1;

/// How long one copy of a file blob to or from a peer may take (25 MiB at the default limit).
pub const BLOB_TIMEOUT: Duration = Duration::from_secs(30);

/// Operations one Raft entry carries at most.
const BATCH_OPS_MAX: usize = 4096;
/// Entries the leader has handed to openraft and not yet seen committed; while this many are
/// in flight, new operations accumulate into the next entry. Fewer, larger entries cost less
/// per operation: at 10,000 msg/s with all clients on the leader, 1–3 in flight measured p99
/// 19–38 ms against 27–73 ms with 8, at the same throughput (docs/benchmarks.md).
const BATCHES_IN_FLIGHT: usize = 2;
/// Batches a follower has forwarded to the leader and not yet seen answered; while this many
/// are in flight, new operations accumulate into the next batch. The leader proposes them in
/// the follower's order ([`crate::forward`]).
const FORWARDS_IN_FLIGHT: usize = 2;

/// An operation waiting to be ordered.
struct Pending {
    op: Op,
    ts: u64,
    deadline: Instant,
    reply: Reply,
}

/// Who waits for an operation's answer.
enum Reply {
    /// A client of this node: answered once this node has applied the entry
    /// (read-your-writes on this node).
    Local(Responder),
    /// On the leader, an operation a follower forwarded: it joins the leader's next entry
    /// like the leader's own operations (one entry, one fsync per node for all of them) and
    /// is answered with the entry's index once committed; the follower waits for its own
    /// apply.
    Forwarded(tokio::sync::oneshot::Sender<ForwardAnswer>),
}

/// The leader's answer to one forwarded operation: the Raft index of its entry and what
/// applying it answered.
type ForwardAnswer = Result<(u64, Result<Outcome, Refusal>), ForwardFail>;

/// Why a forwarded operation was not written.
enum ForwardFail {
    /// This node is not (or no longer) the leader; nothing was written.
    NotLeader,
    /// It failed (timed out, Raft stopped): it may or may not have been written.
    Failed(String),
}

impl Pending {
    fn fail(self, error: ChatError) {
        match self.reply {
            Reply::Local(r) => r.send(Err(error)),
            Reply::Forwarded(r) => {
                let _ = r.send(Err(ForwardFail::Failed(error.to_string())));
            }
        }
    }

    fn is_forwarded(&self) -> bool {
        matches!(self.reply, Reply::Forwarded(_))
    }
}

fn timed_out(timeout: Duration) -> ChatError {
    unavailable(format!(
        "no quorum: the write was not committed within {} ms; it may still commit, and a \
         retry is safe (a send retried with the same cmid is not duplicated)",
        timeout.as_millis()
    ))
}

/// What the batcher needs (not the node itself: the node owns the batcher's queue).
#[derive(Clone)]
struct BatcherCtx {
    id: NodeId,
    raft: Raft,
    client: PeerClient,
    applied: watch::Receiver<u64>,
    write_timeout: Duration,
    requeue: tokio::sync::mpsc::UnboundedSender<Pending>,
    stamps: Arc<std::sync::Mutex<Stamps>>,
    /// [`Inner::proposals`].
    proposals: Arc<tokio::sync::Mutex<()>>,
}

impl BatcherCtx {
    /// No leader (or not reachable yet): try again shortly, behind what is queued.
    async fn wait_and_requeue(&self, batch: Vec<Pending>) {
        tokio::time::sleep(Duration::from_millis(25)).await;
        self.requeue(batch);
    }

    /// Orders the operations again, behind what is queued.
    fn requeue(&self, batch: Vec<Pending>) {
        for p in batch {
            if let Err(e) = self.requeue.send(p) {
                e.0.fail(unavailable("node stopping".into()));
            }
        }
    }

    /// Waits (until `deadline`) for this node to apply Raft index `index`.
    async fn wait_applied(&self, index: u64, deadline: Instant) {
        let mut applied = self.applied.clone();
        let _ = tokio::time::timeout_at(deadline.into(), applied.wait_for(|&n| n > index)).await;
    }

    /// Forwards a batch to the leader and answers its operations.
    async fn forward(&self, batch: Vec<Pending>, leader: NodeId, addr: String, fwd: Forwarded) {
        let deadline = batch
            .iter()
            .map(|p| p.deadline)
            .max()
            .unwrap_or_else(Instant::now);
        let epoch = fwd.epoch;
        let started = Instant::now();
        let answer = self
            .client
            .call::<Forwarded, WriteReply>(
                leader,
                &addr,
                Route::Write,
                &fwd,
                deadline.saturating_duration_since(Instant::now()),
            )
            .await;
        metrics::histogram!(crate::stages::FORWARD).record(started.elapsed().as_secs_f64());
        if !matches!(answer, Ok(WriteReply::Done { .. })) {
            // Later batches start a new epoch: the leader must not wait for this one.
            self.stamps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .failed(epoch);
        }
        match answer {
            Ok(WriteReply::Done { index, response }) => self.answer(batch, index, response).await,
            Ok(WriteReply::Failed(why)) => Self::fail_all(batch, || unavailable(why.clone())),
            Ok(WriteReply::Retry) => self.requeue(batch),
            // Deposed: if this node already knows the next leader (a hand-off tells it within
            // a round trip), send there at once; otherwise wait for the election.
            Ok(WriteReply::NotLeader)
                if self
                    .raft
                    .metrics()
                    .borrow()
                    .current_leader
                    .is_some_and(|l| l != leader) =>
            {
                self.requeue(batch)
            }
            Ok(WriteReply::NotLeader) => self.wait_and_requeue(batch).await,
            Err(e) if e.never_sent() => self.wait_and_requeue(batch).await,
            // The leader may have committed them: the callers decide whether to retry
            // (sends are idempotent on their cmid).
            Err(e) => {
                let why = e.to_string();
                Self::fail_all(batch, || unavailable(why.clone()))
            }
        }
    }

    fn fail_all(batch: Vec<Pending>, error: impl Fn() -> ChatError) {
        for p in batch {
            p.fail(error());
        }
    }

    /// Answers each operation of a committed entry (applied at `index`): forwarded ones at
    /// once, this node's clients once this node has applied it (read-your-writes).
    async fn answer(&self, batch: Vec<Pending>, index: u64, response: Response) {
        let mut answers = response.0.into_iter();
        let mut local = Vec::with_capacity(batch.len());
        for p in batch {
            let answer = answers
                .next()
                .unwrap_or_else(|| Err(Refusal::Unavailable("missing answer".into())));
            match p.reply {
                Reply::Forwarded(r) => {
                    let _ = r.send(Ok((index, answer)));
                }
                Reply::Local(r) => local.push((p.deadline, r, answer)),
            }
        }
        let deadline = local.iter().map(|(d, _, _)| *d).max();
        if let Some(deadline) = deadline {
            let started = Instant::now();
            self.wait_applied(index, deadline).await;
            metrics::histogram!(crate::stages::APPLIED_WAIT)
                .record(started.elapsed().as_secs_f64());
        }
        for (_, r, answer) in local {
            r.send(answer.map_err(ChatError::from));
        }
    }
}

/// Orders proposed operations through Raft, in the order proposed: operations that arrive
/// while earlier entries are in flight are batched into one entry (one fsync for all of them
/// on every node). On the leader, entries are handed to openraft in order with up to
/// [`BATCHES_IN_FLIGHT`] awaiting commit; on a follower, batches are forwarded to the leader
/// with up to [`FORWARDS_IN_FLIGHT`] awaiting an answer, and the leader proposes them in the
/// follower's order ([`crate::forward`]). Without a known leader operations wait (an election is running) until
/// their deadline, then answer `unavailable`.
async fn run_batcher(
    ctx: BatcherCtx,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Pending>,
    stop: CancellationToken,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let forwards = Arc::new(tokio::sync::Semaphore::new(FORWARDS_IN_FLIGHT));
    loop {
        let first = tokio::select! {
            p = queue.recv() => match p { Some(p) => p, None => return },
            () = stop.cancelled() => return,
        };
        // Held until this batch is proposed or forwarded (a leadership hand-off holds it).
        let _proposing = ctx.proposals.lock().await;
        let leader = ctx.raft.metrics().borrow().current_leader;
        // Wait for room before draining: what queues meanwhile joins this batch.
        let room = match leader {
            Some(l) if l == ctx.id => Some(&in_flight),
            Some(_) => Some(&forwards),
            None => None,
        };
        let permit = match room {
            Some(room) => match room.clone().acquire_owned().await {
                Ok(p) => Some(p),
                Err(_) => return,
            },
            None => None,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_OPS_MAX {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let (expired, batch): (Vec<Pending>, Vec<Pending>) =
            batch.into_iter().partition(|p| p.deadline <= now);
        BatcherCtx::fail_all(expired, || timed_out(ctx.write_timeout));
        // Operations forwarded to this node while it led, and it no longer does: their
        // follower sends them to the new leader.
        let batch = if leader == Some(ctx.id) {
            batch
        } else {
            let (forwarded, batch): (Vec<Pending>, Vec<Pending>) =
                batch.into_iter().partition(Pending::is_forwarded);
            for p in forwarded {
                if let Reply::Forwarded(r) = p.reply {
                    let _ = r.send(Err(ForwardFail::NotLeader));
                }
            }
            batch
        };
        if batch.is_empty() {
            continue;
        }
        let ops: Vec<(Op, u64)> = batch.iter().map(|p| (p.op.clone(), p.ts)).collect();
        if let Some(oldest) = batch.iter().map(|p| p.deadline).min() {
            let queued = ctx
                .write_timeout
                .saturating_sub(oldest.saturating_duration_since(now));
            metrics::histogram!(crate::stages::QUEUE).record(queued.as_secs_f64());
        }
        match (leader, permit) {
            (Some(leader), Some(permit)) if leader == ctx.id => {
                metrics::histogram!(crate::stages::ENTRY_OPS).record(ops.len() as f64);
                let proposed = Instant::now();
                let receiver = ctx.raft.client_write_ff(Request { ops }).await;
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let Ok(receiver) = receiver else {
                        return BatcherCtx::fail_all(batch, || unavailable("raft stopped".into()));
                    };
                    let deadline = batch.iter().map(|p| p.deadline).max().unwrap_or(now);
                    let answered = tokio::time::timeout_at(deadline.into(), receiver).await;
                    metrics::histogram!(crate::stages::ENTRY)
                        .record(proposed.elapsed().as_secs_f64());
                    match answered {
                        Err(_) => BatcherCtx::fail_all(batch, || timed_out(ctx.write_timeout)),
                        Ok(Err(_)) => {
                            BatcherCtx::fail_all(batch, || unavailable("raft stopped".into()))
                        }
                        Ok(Ok(Ok(resp))) => ctx.answer(batch, resp.log_id.index, resp.data).await,
                        // Leadership moved before the entry was appended: nothing was
                        // written; order the operations again (they go to the new leader).
                        Ok(Ok(Err(ClientWriteError::ForwardToLeader(_)))) => ctx.requeue(batch),
                        Ok(Ok(Err(e))) => {
                            let why = e.to_string();
                            BatcherCtx::fail_all(batch, || unavailable(why.clone()))
                        }
                    }
                });
            }
            (Some(leader), Some(permit)) => {
                let Some(addr) = address_of(&ctx.raft.metrics().borrow(), leader) else {
                    drop(permit);
                    ctx.wait_and_requeue(batch).await;
                    continue;
                };
                // Stamped here, in batch order; sent concurrently.
                let (epoch, seq) = ctx
                    .stamps
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .stamp(leader);
                let forwarded = Forwarded {
                    from: ctx.id,
                    epoch,
                    seq,
                    request: Request { ops },
                };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    ctx.forward(batch, leader, addr, forwarded).await
                });
            }
            _ => ctx.wait_and_requeue(batch).await,
        }
    }
}

/// A hash (hex SHA-256) of an engine's chat state ([`Engine::state_bytes`]): equal on
/// replicas that applied the same operations.
pub fn digest(engine: &Engine) -> Result<String, ChatError> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    engine.state_bytes(&mut |b| h.update(b))?;
    Ok(hex::encode(h.finalize()))
}

/// Routes an engine's writes through Raft.
/// Queues operations for the batcher, in the order proposed (no task per operation, so one
/// connection's writes are ordered as it sent them).
struct RaftProposer {
    queue: tokio::sync::mpsc::UnboundedSender<Pending>,
    write_timeout: Duration,
}

impl Proposer for RaftProposer {
    fn propose(&self, op: Op, ts_ms: u64, reply: Responder) {
        let pending = Pending {
            op,
            ts: ts_ms,
            deadline: Instant::now() + self.write_timeout,
            reply: Reply::Local(reply),
        };
        if let Err(e) = self.queue.send(pending) {
            e.0.fail(unavailable("this node has stopped".into()));
        }
    }
}

/// Name of the file that records which node a data directory belongs to.
const NODE_ID_FILE: &str = "node-id";

/// Ties `dir` to node `id` on its first start, and refuses it to any other id afterwards: a
/// node's Raft state (its vote, its log) is that node's, and run under another id it would
/// vote and acknowledge for a node it is not. A directory from before this check (state but
/// no record) is claimed as it is.
fn claim_data_dir(dir: &std::path::Path, id: NodeId) -> Result<(), StartError> {
    let path = dir.join(NODE_ID_FILE);
    let io = |e: std::io::Error| StartError::Config(format!("{}: {e}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<NodeId>() {
            Ok(owner) if owner == id => Ok(()),
            Ok(owner) => Err(StartError::Config(format!(
                "{} holds node {owner}'s data, not node {id}'s: start it with --node-id \
                 {owner}, or give node {id} its own data directory",
                dir.display()
            ))),
            Err(_) => Err(StartError::Config(format!(
                "{} does not hold a node id ({text:?})",
                path.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            crate::log_store::write_atomic(&path, id.to_string().as_bytes()).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

/// `amount` for node `id`: 1, 7/6 or 8/6 times it, by the id. Used for the index tail size.
///
/// Replicas apply the same entries, so with one tail size every replica would freeze and
/// ingest its tail at the same entry: the ingestions' sorting and SST writing would land on
/// the machine, and the disk, on all nodes at once, and show as one wave in every node's
/// latency. With three sizes they drift apart and meet only now and then. (Snapshots are not
/// staggered: spreading their pauses over three moments did not lower the p99;
/// docs/benchmarks.md.)
fn staggered(amount: u64, id: NodeId) -> u64 {
    amount.saturating_add(amount / 6 * (id % 3))
}

/// Opens a node's Raft log (`data_dir/raft`) and state machine (`data_dir/sm`), off the
/// async threads.
async fn open_storage(config: &ClusterConfig) -> Result<(LogStore, StateMachine), StartError> {
    claim_data_dir(&config.data_dir, config.node_id)?;
    let log_dir = config.data_dir.join("raft");
    let sm_dir = config.data_dir.join("sm");
    let raft_log = config.raft_log.clone();
    let mut engine_config = config.engine.clone();
    engine_config.index_tail_entries = usize::try_from(staggered(
        engine_config.index_tail_entries as u64,
        config.node_id,
    ))
    .unwrap_or(usize::MAX);
    tokio::task::spawn_blocking(move || {
        Ok::<_, crate::types::StorageError>((
            LogStore::open(&log_dir, raft_log)?,
            StateMachine::open(&sm_dir, engine_config)?,
        ))
    })
    .await
    .map_err(|e| StartError::Config(e.to_string()))?
    .map_err(StartError::from)
}

/// Restores a backup (`snapshot.data` and `snapshot.meta`, written by `/admin/snapshot`) as
/// the state of node `config.node_id` under `config.data_dir`, which must hold no cluster
/// state yet: the snapshot is installed as if the leader had sent it, and the Raft log starts
/// empty after the snapshot's last entry. The node keeps the backup's membership (node ids
/// and replication addresses); it must be one of its voters or learners. Returns the
/// snapshot's last log index and the membership.
pub async fn restore_node(
    config: &ClusterConfig,
    bundle: &std::path::Path,
    meta: &std::path::Path,
) -> Result<(u64, BTreeMap<NodeId, String>), String> {
    use openraft::storage::{RaftLogStorage, RaftStateMachine};
    if config.data_dir.exists()
        && std::fs::read_dir(&config.data_dir)
            .map_err(|e| format!("{}: {e}", config.data_dir.display()))?
            .next()
            .is_some()
    {
        return Err(format!(
            "{} exists and is not empty: restore a node into a new directory",
            config.data_dir.display()
        ));
    }
    let meta_bytes = std::fs::read(meta).map_err(|e| format!("{}: {e}", meta.display()))?;
    let meta: openraft::SnapshotMeta<NodeId, BasicNode> = postcard::from_bytes(&meta_bytes)
        .map_err(|e| format!("{}: not a snapshot meta ({e})", meta.display()))?;
    let last = meta
        .last_log_id
        .ok_or_else(|| "the backup holds no entries".to_owned())?;
    let members: BTreeMap<NodeId, String> = meta
        .last_membership
        .membership()
        .nodes()
        .map(|(id, node)| (*id, node.addr.clone()))
        .collect();
    if !members.contains_key(&config.node_id) {
        return Err(format!(
            "node {} is not in the backup's cluster ({}): restore it as one of those ids",
            config.node_id,
            members
                .iter()
                .map(|(id, addr)| format!("{id}={addr}"))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    let file = tokio::fs::File::open(bundle)
        .await
        .map_err(|e| format!("{}: {e}", bundle.display()))?;
    let restored = async {
        let (mut log_store, mut sm) = open_storage(config).await.map_err(|e| e.to_string())?;
        sm.install_snapshot(
            &meta,
            Box::new(crate::snapshot_data::SnapshotData::file(file)),
        )
        .await
        .map_err(|e| format!("installing the backup: {e}"))?;
        log_store
            .purge(last)
            .await
            .map_err(|e| format!("starting the Raft log after the backup: {e}"))?;
        // A node's term is never below its last entry's: as if it had voted for itself in the
        // backup's last term and lost. The restored cluster elects a leader in a later term,
        // whose first entry then follows the backup's in log order.
        log_store
            .save_vote(&openraft::Vote::new(last.leader_id.term, config.node_id))
            .await
            .map_err(|e| format!("recording the backup's term: {e}"))?;
        // Closing (dropping) the engine and the log off the async threads.
        tokio::task::spawn_blocking(move || drop((sm, log_store)))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    }
    .await;
    if let Err(why) = restored {
        let _ = std::fs::remove_dir_all(&config.data_dir);
        return Err(why);
    }
    Ok((last.index, members))
}

impl ClusterNode {
    /// Starts a node: opens its storage, serves its peers on `peer_listener`, and (when its
    /// log is empty and `config.initialize`) proposes the initial membership of `peers`; the
    /// cluster forms once a majority is up. Must run inside a tokio runtime.
    pub async fn start(
        config: ClusterConfig,
        peer_listener: tokio::net::TcpListener,
    ) -> Result<Arc<ClusterNode>, StartError> {
        if !config.peers.contains_key(&config.node_id) {
            return Err(StartError::Config(format!(
                "--peers must list this node's id {} with its replication address",
                config.node_id
            )));
        }
        let (mut log_store, mut sm) = open_storage(&config).await?;
        // The engine must hold every entry the Raft log no longer does (it is synced before
        // each snapshot, and entries are purged only up to a snapshot). If it does not, its
        // synced data was lost or damaged: applying the Raft log onto it would diverge.
        {
            use openraft::storage::{RaftLogStorage, RaftStateMachine};
            let purged = log_store.get_log_state().await?.last_purged_log_id;
            let (applied, _) = sm.applied_state().await?;
            if purged.map(|p| p.index) > applied.map(|a| a.index) {
                return Err(StartError::Config(format!(
                    "the state machine in {} has applied up to {:?} but the Raft log in {} \
                     starts after {:?}: its data was lost or damaged; remove this node's data \
                     directory to resynchronise it from a snapshot",
                    config.data_dir.join("sm").display(),
                    applied.map(|a| a.index),
                    config.data_dir.join("raft").display(),
                    purged.map(|p| p.index),
                )));
            }
        }
        let cell = sm.cell();
        let applied = sm.applied();
        let state_machine = sm.clone();
        let raft_config = openraft::Config {
            cluster_name: "chatlog".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_ms.0,
            election_timeout_max: config.election_timeout_ms.1,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.keep_after_snapshot,
            max_payload_entries: 1024,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let client = PeerClient::new(config.node_id, config.faults.clone());
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            Network::new(client.clone()),
            log_store,
            sm,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let (queue, queued) = tokio::sync::mpsc::unbounded_channel();
        let (barriers, barrier_rx) = tokio::sync::mpsc::unbounded_channel();
        let proposals = Arc::new(tokio::sync::Mutex::new(()));
        let inner = Arc::new(Inner {
            id: config.node_id,
            cell: cell.clone(),
            state_machine,
            raft: raft.clone(),
            client,
            applied,
            gossip: broadcast::channel(4096).0,
            peers: config.peers.clone(),
            order: Order::default(),
            write_timeout: config.write_timeout,
            queue: queue.clone(),
            blobs: BlobStore::new(config.blob_dir.clone()),
            barriers,
            proposals: proposals.clone(),
            heard_from_leader_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            guard_window: election_guard_window(config.election_timeout_ms),
        });
        let stop = CancellationToken::new();
        tokio::spawn(run_batcher(
            BatcherCtx {
                id: config.node_id,
                raft: raft.clone(),
                client: inner.client.clone(),
                applied: inner.applied.clone(),
                write_timeout: config.write_timeout,
                requeue: queue.clone(),
                stamps: Arc::new(std::sync::Mutex::new(Stamps::new())),
                proposals,
            },
            queued,
            stop.clone(),
        ));
        cell.set_proposer(Arc::new(RaftProposer {
            queue,
            write_timeout: config.write_timeout,
        }));
        let app = router(inner.clone());
        let server = tokio::spawn(serve_peers(inner.clone(), peer_listener, app, stop.clone()));
        tokio::spawn(publish_gauges(raft.clone(), stop.clone()));
        let led_since = Arc::new(std::sync::Mutex::new(None));
        tokio::spawn(track_leadership(
            raft.clone(),
            config.node_id,
            led_since.clone(),
            stop.clone(),
        ));
        tokio::spawn(run_barriers(
            Arc::downgrade(&inner),
            barrier_rx,
            stop.clone(),
        ));
        tokio::spawn(guard_elections(Arc::downgrade(&inner), stop.clone()));
        let fresh = !raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if config.initialize && fresh {
            let members: BTreeMap<NodeId, BasicNode> = config
                .peers
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            // Every node proposes the same initial membership; openraft refuses it on a node
            // that already has state, which is expected after the first start.
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(error = %e, "cluster already initialized");
            }
        }
        Ok(Arc::new(ClusterNode {
            inner,
            cell,
            led_since,
            lease: Duration::from_millis(config.election_timeout_ms.1),
            stop,
            server: tokio::sync::Mutex::new(Some(server)),
        }))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The node's current engine.
    pub fn engine(&self) -> Arc<Engine> {
        self.cell.get()
    }

    /// The engine cell (replaced when a snapshot is installed).
    pub fn cell(&self) -> Arc<EngineCell> {
        self.cell.clone()
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Whether this node is the leader (as far as it knows).
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.inner.id)
    }

    /// The current leader, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// Whether this node can get writes committed now: a follower knows a leader and heard
    /// from it within the leader lease (a follower cut off from everyone keeps the last leader
    /// it knew, since it does not campaign: [`guard_elections`]); a leader confirms within
    /// `within` that a quorum still follows it (a leader cut off from the others stays leader
    /// in its own view until then).
    pub async fn quorum_ok(&self, within: Duration) -> bool {
        match self.leader() {
            None => false,
            Some(l) if l != self.inner.id => self.inner.heard_from_leader_within(self.lease),
            Some(_) => matches!(
                tokio::time::timeout(within, self.inner.raft.ensure_linearizable()).await,
                Ok(Ok(_))
            ),
        }
    }

    /// Raft metrics (term, leader, last applied, membership, …).
    pub fn metrics(&self) -> openraft::RaftMetrics<NodeId, BasicNode> {
        self.inner.raft.metrics().borrow().clone()
    }

    /// Entries applied to this node's engine (last applied index + 1).
    pub fn applied(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// Sends `bytes` to every other node of the current membership (voters and learners), or
    /// of `--peers` before the membership is known (best effort, fire and forget).
    pub fn gossip(&self, bytes: Vec<u8>) {
        let msg = Gossip {
            from: self.inner.id,
            bytes,
        };
        let mut targets: BTreeMap<NodeId, String> = self
            .inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect();
        if targets.is_empty() {
            targets = self.inner.peers.clone();
        }
        for (id, addr) in targets {
            if id == self.inner.id {
                continue;
            }
            let client = self.inner.client.clone();
            let msg = msg.clone();
            tokio::spawn(async move {
                let _: Result<(), _> = client
                    .call(id, &addr, Route::Gossip, &msg, Duration::from_secs(1))
                    .await;
            });
        }
    }

    /// The other nodes of the current membership (voters and learners), with whether each
    /// votes, and the number of votes that make a majority.
    fn others(&self) -> (Vec<(NodeId, String, bool)>, usize, bool) {
        let metrics = self.inner.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let others = membership
            .nodes()
            .filter(|(id, _)| **id != self.inner.id)
            .map(|(id, node)| (*id, node.addr.clone(), voters.contains(id)))
            .collect();
        (
            others,
            voters.len() / 2 + 1,
            voters.contains(&self.inner.id),
        )
    }

    /// Copies blob `bytes` (named by its SHA-256 `sha`, already stored on this node) to the
    /// other nodes; returns once a majority of the voters holds it, this node included (the
    /// copies to the rest go on). Fails, naming how many hold it, if no majority can be
    /// reached within [`BLOB_TIMEOUT`].
    pub async fn replicate_blob(&self, sha: &str, bytes: Bytes) -> Result<(), String> {
        let (others, majority, votes) = self.others();
        let mut holders = usize::from(votes);
        let mut copies: FuturesUnordered<_> = others
            .into_iter()
            .map(|(id, addr, voter)| {
                let client = self.inner.client.clone();
                let sha = sha.to_owned();
                let bytes = bytes.clone();
                async move {
                    let put = BlobPut {
                        sha: &sha,
                        bytes: &bytes,
                    };
                    let result: Result<(), _> = client
                        .call_bulk(id, &addr, Route::BlobPut, &put, BLOB_TIMEOUT)
                        .await;
                    if let Err(e) = &result {
                        tracing::warn!(node = id, error = %e, sha, "copying a file to a peer failed");
                    }
                    (voter, result.is_ok())
                }
            })
            .collect();
        while holders < majority {
            match copies.next().await {
                Some((voter, ok)) => holders += usize::from(voter && ok),
                None => {
                    return Err(format!(
                        "the file reached {holders} of the cluster's voters; a majority \
                         ({majority}) must hold it before it is acknowledged"
                    ));
                }
            }
        }
        // The rest (learners, slower voters) finish on their own.
        tokio::spawn(async move { while copies.next().await.is_some() {} });
        Ok(())
    }

    /// Blob `sha` fetched from another node (checked against its hash), or `None` if no
    /// reachable node holds it.
    pub async fn fetch_blob(&self, sha: &str) -> Option<Vec<u8>> {
        let (others, _, _) = self.others();
        for (id, addr, _) in others {
            let got: Result<BlobGot, _> = self
                .inner
                .client
                .call_bulk(id, &addr, Route::BlobGet, &sha, BLOB_TIMEOUT)
                .await;
            match got {
                Ok(BlobGot(Some(bytes))) if crate::blobs::sha256_hex(&bytes) == sha => {
                    return Some(bytes);
                }
                Ok(BlobGot(Some(_))) => {
                    tracing::error!(
                        node = id,
                        sha,
                        "a peer's copy of a file does not match its hash"
                    );
                }
                Ok(BlobGot(None)) => {}
                Err(e) => {
                    tracing::warn!(node = id, error = %e, sha, "fetching a file from a peer failed")
                }
            }
        }
        None
    }

    /// Waits until this node has applied every entry committed before the call: a read
    /// barrier (the leader confirms it still leads and names its commit point; this node
    /// waits to apply up to it). A client that moves to this node then reads at least what
    /// it wrote or acknowledged elsewhere: its cursors, its chats. Concurrent callers share
    /// one round trip to the leader. During a failover it waits for the next leader. Fails
    /// after `timeout` (no leader reachable, or this node far behind); reads then see this
    /// node's applied state as it is.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), String> {
        let work = async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.inner
                .barriers
                .send(tx)
                .map_err(|_| "the node is stopping".to_owned())?;
            let Some(index) = rx.await.map_err(|_| "the node is stopping".to_owned())?? else {
                return Ok(());
            };
            let mut applied = self.inner.applied.clone();
            applied
                .wait_for(|a| *a > index)
                .await
                .map_err(|_| "the node is stopping".to_owned())?;
            Ok(())
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("no read barrier within {} ms", timeout.as_millis()))?
    }

    /// Gossip received from other nodes.
    pub fn gossip_received(&self) -> broadcast::Receiver<Gossip> {
        self.inner.gossip.subscribe()
    }

    /// Hands the leadership to another voter, for a node about to stop (a rolling restart):
    /// writes then pause for a few round trips instead of the 0.6–1.0 s a lost leader costs.
    /// Returns the new leader, or why there is none (this node is not the leader, it is the
    /// only voter, or no other node took over `within`: the caller stops anyway and the
    /// cluster elects as after a crash).
    ///
    /// openraft 0.9 has no leadership transfer. This is the way its vote rules allow:
    /// 1. No entry is proposed meanwhile: the batcher waits on [`Inner::proposals`], and
    ///    operations queue behind it (after a hand-off they go to the new leader).
    /// 2. A voter whose log matches all of this leader's is chosen.
    /// 3. With more than three voters the followers' leases must lapse first (a voter that
    ///    heard from the leader within its lease refuses any vote): heartbeats stop for the
    ///    lease. With three, the leader's vote and the successor's own are a majority.
    /// 4. The leader's own vote is granted only once it has led for longer than the lease
    ///    (openraft keeps the time a vote was last changed); a node that became leader just
    ///    before waits for that.
    /// 5. The successor is asked to campaign ([`Route::TakeLeadership`]): it wins with a log
    ///    as long as any voter's, and this node steps down on its vote request.
    pub async fn hand_off_leadership(&self, within: Duration) -> Result<NodeId, String> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + within;
        let _paused = inner.proposals.lock().await;
        let mut metrics = inner.raft.metrics();
        let first = metrics.borrow_and_update().clone();
        if first.current_leader != Some(inner.id) {
            return Err(format!("node {} is not the leader", inner.id));
        }
        let voters: Vec<NodeId> = first.membership_config.membership().voter_ids().collect();
        if voters.len() < 2 {
            return Err("no other voter to hand the leadership to".into());
        }
        // A voter whose log holds every entry of this leader's (none is proposed now).
        let successor = loop {
            let m = metrics.borrow_and_update().clone();
            if m.current_leader != Some(inner.id) {
                return Err(format!(
                    "node {} stopped leading during the hand-off",
                    inner.id
                ));
            }
            let caught_up = m.replication.iter().flatten().find(|(peer, matched)| {
                **peer != inner.id
                    && voters.contains(peer)
                    && matched.map(|l| l.index) == m.last_log_index
            });
            if let Some((peer, _)) = caught_up {
                break *peer;
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .is_err()
            {
                return Err(format!(
                    "no voter caught up with the leader's log within {} ms",
                    within.as_millis()
                ));
            }
        };
        let quiet = voters.len() > 3;
        if quiet {
            inner.raft.runtime_config().heartbeat(false);
        }
        let handed = async {
            let margin = Duration::from_millis(50);
            let mut ready = Instant::now();
            if quiet {
                ready += self.lease + margin;
            }
            if let Some(since) = *self.led_since.lock().unwrap_or_else(|e| e.into_inner()) {
                ready = ready.max(since + self.lease + margin);
            }
            tokio::time::sleep_until(ready.into()).await;
            let m = inner.raft.metrics().borrow().clone();
            let addr = address_of(&m, successor)
                .ok_or_else(|| format!("node {successor} has no address"))?;
            let ask = TakeLeadership {
                from: inner.id,
                term: m.current_term,
            };
            inner
                .client
                .call::<TakeLeadership, ()>(
                    successor,
                    &addr,
                    Route::TakeLeadership,
                    &ask,
                    deadline.saturating_duration_since(tokio::time::Instant::now()),
                )
                .await
                .map_err(|e| format!("asking node {successor} to take over: {e}"))?;
            let taken = metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != inner.id));
            match tokio::time::timeout_at(deadline, taken).await {
                Ok(Ok(m)) => Ok(m.current_leader.unwrap_or(successor)),
                Ok(Err(_)) => Err("raft stopped during the hand-off".to_owned()),
                Err(_) => Err(format!(
                    "node {successor} did not take the leadership over within {} ms",
                    within.as_millis()
                )),
            }
        };
        let handed = match tokio::time::timeout_at(deadline, handed).await {
            Ok(result) => result,
            Err(_) => Err(format!("no hand-off within {} ms", within.as_millis())),
        };
        if quiet {
            inner.raft.runtime_config().heartbeat(true);
        }
        handed
    }

    /// Resolves when this node's Raft core has quit on its own, with why: a storage error
    /// (the disk failed under the Raft log or the engine, or a snapshot could not be read)
    /// or a panic. Stays pending while it runs, and after a [`ClusterNode::shutdown`].
    /// Such a node can no longer write, vote or learn of writes, while it would still serve
    /// reads of its applied state: the server stops on it, so that a supervisor restarts
    /// the node from its disk.
    ///
    /// Checked every [`FAILURE_CHECK`]: openraft's metrics change at every commit and
    /// apply, and a task woken by each change would cost a thread wake-up each time.
    pub async fn failed(&self) -> String {
        let metrics = self.inner.raft.metrics();
        let mut tick = tokio::time::interval(FAILURE_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let state = metrics.borrow().running_state.clone();
            match state {
                Ok(()) => {}
                // Stopped on request.
                Err(openraft::error::Fatal::Stopped) => return std::future::pending().await,
                Err(fatal) => return fatal.to_string(),
            }
            if metrics.has_changed().is_err() {
                return "the Raft core ended without reporting why (it panicked)".into();
            }
        }
    }

    /// Stops Raft and the peer server.
    pub async fn shutdown(&self) {
        let _ = self.inner.raft.shutdown().await;
        self.stop.cancel();
        if let Some(server) = self.server.lock().await.take() {
            let _ = server.await;
        }
    }
}

/// How often [`ClusterNode::failed`] looks at the Raft core's state.
const FAILURE_CHECK: Duration = Duration::from_millis(250);

/// The replication address of node `id` in the membership `metrics` show.
fn address_of(metrics: &openraft::RaftMetrics<NodeId, BasicNode>, id: NodeId) -> Option<String> {
    metrics
        .membership_config
        .membership()
        .get_node(&id)
        .map(|n| n.addr.clone())
}

/// Pause between two tries of a read barrier's round while no leader answers.
const BARRIER_RETRY: Duration = Duration::from_millis(50);

/// Answers read barriers in rounds: every caller queued when a round starts gets that round's
/// read index (a round started after a caller arrived covers every write committed before
/// it). On the leader the index comes from openraft (`get_read_log_id`: a heartbeat round
/// confirms the leadership); on a follower from the leader, over [`Route::ReadIndex`]. A
/// round without an answer (no leader, or a dead one) is tried again every
/// [`BARRIER_RETRY`] until a leader answers or every caller of the round has given up.
async fn run_barriers(
    inner: std::sync::Weak<Inner>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<BarrierWaiter>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            w = rx.recv() => match w {
                Some(w) => w,
                None => return,
            },
            () = stop.cancelled() => return,
        };
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        // No leader known, or the one known is dead or deposed (a failover): ask again until
        // a leader answers, while anyone still waits (callers give up by their own timeout).
        let result = loop {
            let Some(node) = inner.upgrade() else {
                return;
            };
            let result = read_index(&node).await;
            drop(node);
            if result.is_ok() || waiters.iter().all(|w| w.is_closed()) {
                break result;
            }
            tokio::select! {
                () = tokio::time::sleep(BARRIER_RETRY) => {}
                () = stop.cancelled() => return,
            }
        };
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// The leader's read index (the last log index a read must see; `None` before any entry),
/// asked of the leader.
async fn read_index(inner: &Inner) -> Result<Option<u64>, String> {
    let metrics = inner.raft.metrics().borrow().clone();
    let leader = metrics
        .current_leader
        .ok_or_else(|| "no leader known".to_owned())?;
    let read = if leader == inner.id {
        inner
            .raft
            .get_read_log_id()
            .await
            .map_err(|e| format!("read index: {e}"))?
            .0
            .map(|l| l.index)
    } else {
        let addr = address_of(&metrics, leader)
            .ok_or_else(|| format!("leader {leader} has no address"))?;
        inner
            .client
            .call::<(), Option<u64>>(leader, &addr, Route::ReadIndex, &(), inner.write_timeout)
            .await
            .map_err(|e| e.to_string())?
    };
    Ok(read)
}

/// How recently a node must have accepted an AppendEntries to count as hearing a leader
/// ([`guard_elections`]): half of the shortest time after which openraft would start an
/// election (the leader lease, which is the election timeout's maximum, plus the timeout's
/// minimum): 400 ms by default.
fn election_guard_window(election_timeout_ms: (u64, u64)) -> Duration {
    Duration::from_millis((election_timeout_ms.0 + election_timeout_ms.1) / 2)
}

/// Lets this node campaign only while a majority of the voters (itself included) is
/// reachable and hears no leader: the effect of Raft's pre-vote, which openraft 0.9 lacks. A
/// voter cut off from the others would otherwise start election after election, each in a
/// higher term, and when the link healed its term would depose the working leader (a pause
/// of writes for a new election). Safety is openraft's: this only switches its elections off
/// and on (`elect(false)`); votes are still granted, and a leadership hand-off's election is
/// still started.
///
/// While this node leads, or heard from a leader within the window
/// ([`election_guard_window`]), it may campaign (its timer fires only once it hears from no
/// one). Otherwise it asks every other voter ([`Route::Ping`]) whether it hears a leader,
/// and campaigns only if enough answer "no" within half the window to make a majority with
/// itself. A node of an older build refuses the route: it counts as a "no", as before this
/// guard. With the defaults a cut-off node has stopped campaigning about 0.7 s after the last
/// AppendEntries, before its first election (0.8 s at the earliest); a node whose leader died
/// campaigns with the other survivors; and a node whose link heals waits for the leader's
/// next AppendEntries instead of campaigning.
async fn guard_elections(inner: std::sync::Weak<Inner>, stop: CancellationToken) {
    let Some(window) = inner.upgrade().map(|i| i.guard_window) else {
        return;
    };
    let mut tick = tokio::time::interval(window / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut allowed = true;
    // Since when campaigning is off, and whether that was logged as a warning. Off for a
    // moment is normal (a node just restarted, or the leader just died and a survivor still
    // heard it); off for longer than `STUCK` means this node is cut off.
    const STUCK: Duration = Duration::from_secs(2);
    let mut off_since: Option<(Instant, bool)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // The same rule this node answers a `Ping` with: a node that leads or follows a live
        // leader may campaign (its timer fires only once it hears from no one).
        let allow = inner.hears_a_leader() || majority_hears_no_leader(&inner).await;
        if allow != allowed {
            allowed = allow;
            inner.raft.runtime_config().elect(allow);
            if allow {
                match off_since.take() {
                    Some((since, true)) => tracing::info!(
                        after = ?since.elapsed(),
                        "campaigning allowed again"
                    ),
                    _ => tracing::debug!("campaigning allowed again"),
                }
            } else {
                off_since = Some((Instant::now(), false));
                tracing::debug!("not campaigning: no majority that hears no leader");
            }
        }
        // Looked up each time: the embedding server installs its recorder after the node
        // starts.
        metrics::gauge!(crate::gauges::CAMPAIGNING_ALLOWED).set(f64::from(u8::from(allowed)));
        if let Some((since, warned @ false)) = &mut off_since
            && since.elapsed() >= STUCK
        {
            *warned = true;
            tracing::warn!(
                "not campaigning for {:?}: no leader heard, and a majority of the voters is \
                 unreachable or still hears one (a node cut off from the cluster)",
                since.elapsed()
            );
        }
    }
}

/// Whether enough other voters answer a [`Route::Ping`] within half the guard's window that
/// they hear no leader to make a majority with this node (a Raft pre-vote's question). True
/// with a single voter, and on a node that is not a voter (it never campaigns).
async fn majority_hears_no_leader(inner: &Inner) -> bool {
    let m = inner.raft.metrics().borrow().clone();
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    if voters.len() < 2 || !voters.contains(&inner.id) {
        return true;
    }
    let asks = voters.iter().filter(|v| **v != inner.id).map(|&v| {
        let addr = address_of(&m, v);
        async move {
            let Some(addr) = addr else { return false };
            match inner
                .client
                .call::<(), bool>(v, &addr, Route::Ping, &(), inner.guard_window / 2)
                .await
            {
                Ok(hears_a_leader) => !hears_a_leader,
                // An older build refuses the route.
                Err(crate::network::SendError::Protocol { .. }) => true,
                Err(_) => false,
            }
        }
    });
    let would_vote = 1 + futures_util::future::join_all(asks)
        .await
        .into_iter()
        .filter(|yes| *yes)
        .count();
    would_vote > voters.len() / 2
}

/// Records when node `id` becomes the leader (openraft's server metrics change only with the
/// vote, the role or the membership, so this wakes rarely).
async fn track_leadership(
    raft: Raft,
    id: NodeId,
    led_since: Arc<std::sync::Mutex<Option<Instant>>>,
    stop: CancellationToken,
) {
    let mut server = raft.server_metrics();
    let mut term = None;
    loop {
        let m = server.borrow_and_update().clone();
        let leading = (m.current_leader == Some(id)).then_some(m.vote.leader_id().term);
        if leading != term {
            term = leading;
            *led_since.lock().unwrap_or_else(|e| e.into_inner()) = leading.map(|_| Instant::now());
        }
        tokio::select! {
            changed = server.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
    }
}

/// Sets the [`crate::gauges`] from openraft's metrics once a second until `stop`.
async fn publish_gauges(raft: Raft, stop: CancellationToken) {
    use crate::gauges;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut lagging: BTreeSet<NodeId> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let m = raft.metrics().borrow().clone();
        metrics::gauge!(gauges::TERM).set(m.current_term as f64);
        metrics::gauge!(gauges::LEADER).set(m.current_leader.unwrap_or(0) as f64);
        metrics::gauge!(gauges::IS_LEADER).set(f64::from(u8::from(m.current_leader == Some(m.id))));
        let last = m.last_log_index.unwrap_or(0);
        metrics::gauge!(gauges::LAST_LOG_INDEX).set(last as f64);
        metrics::gauge!(gauges::LAST_APPLIED_INDEX)
            .set(m.last_applied.map_or(0, |l| l.index) as f64);
        metrics::gauge!(gauges::VOTERS)
            .set(m.membership_config.membership().voter_ids().count() as f64);
        let replication = m.replication.clone().unwrap_or_default();
        for (peer, matched) in &replication {
            if *peer == m.id {
                continue;
            }
            let behind = last.saturating_sub(matched.map_or(0, |l| l.index));
            metrics::gauge!(gauges::REPLICATION_LAG, "peer" => peer.to_string()).set(behind as f64);
        }
        // A node that stopped leading (or a removed peer) reports no lag rather than a stale one.
        for peer in std::mem::take(&mut lagging) {
            if !replication.contains_key(&peer) {
                metrics::gauge!(gauges::REPLICATION_LAG, "peer" => peer.to_string()).set(0.0);
            }
        }
        lagging = replication.keys().copied().filter(|p| *p != m.id).collect();
    }
}

type Shared = State<Arc<Inner>>;

async fn peer_http(State(inner): Shared, body: Bytes, route: Route) -> HttpResponse {
    http_rpc(&inner, route, body).await
}

/// The peer HTTP API of a node.
fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/raft/append", post(|s, b| peer_http(s, b, Route::Append)))
        .route("/raft/vote", post(|s, b| peer_http(s, b, Route::Vote)))
        .route(
            "/raft/snapshot",
            post(|s, b| peer_http(s, b, Route::Snapshot)),
        )
        .route("/raft/write", post(|s, b| peer_http(s, b, Route::Write)))
        .route(
            "/cluster/gossip",
            post(|s, b| peer_http(s, b, Route::Gossip)),
        )
        .route("/admin/metrics", get(admin_metrics))
        .route("/admin/digest", get(admin_digest))
        .route("/admin/snapshot", post(admin_snapshot))
        .route("/admin/add-learner", post(admin_add_learner))
        .route("/admin/change-membership", post(admin_change_membership))
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20))
        .with_state(inner)
}

/// Answers one peer request (the same for HTTP and for [`crate::wire`] frames): the postcard
/// answer, or why the request was refused.
async fn peer_rpc(inner: &Arc<Inner>, route: Route, body: Bytes) -> Result<Vec<u8>, String> {
    fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
        postcard::from_bytes(body).map_err(|e| format!("undecodable request: {e}"))
    }
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
        postcard::to_allocvec(value).map_err(|e| format!("encode answer: {e}"))
    }
    match route {
        Route::Append => {
            let started = Instant::now();
            let req: openraft::raft::AppendEntriesRequest<crate::types::TypeConfig> =
                decode(&body)?;
            let n = req.entries.len();
            let answer = inner.raft.append_entries(req).await;
            if matches!(&answer, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                // From the leader of this node's term (a stale one gets `HigherVote`).
                let now = inner.epoch.elapsed().as_millis() as u64;
                inner
                    .heard_from_leader_ms
                    .store(now.max(1), Ordering::Relaxed);
            }
            let reply = encode(&answer);
            let took = started.elapsed();
            if took > Duration::from_millis(100) {
                tracing::warn!(entries = n, bytes = body.len(), ?took, "slow AppendEntries");
            }
            reply
        }
        Route::Vote => encode(&inner.raft.vote(decode(&body)?).await),
        Route::Snapshot => encode(&inner.raft.install_snapshot(decode(&body)?).await),
        Route::Write => encode(&forwarded_write(inner, decode(&body)?).await),
        Route::Gossip => {
            let msg: Gossip = decode(&body)?;
            let _ = inner.gossip.send(msg);
            encode(&())
        }
        Route::Ping => encode(&inner.hears_a_leader()),
        Route::TakeLeadership => {
            let ask: TakeLeadership = decode(&body)?;
            let m = inner.raft.metrics().borrow().clone();
            if m.current_leader != Some(ask.from) || m.current_term != ask.term {
                return Err(format!(
                    "node {} (term {}) asked node {} to take the leadership, but it follows \
                     {:?} in term {}",
                    ask.from, ask.term, inner.id, m.current_leader, m.current_term
                ));
            }
            tracing::info!(
                from = ask.from,
                term = ask.term,
                "taking the leadership over"
            );
            inner
                .raft
                .trigger()
                .elect()
                .await
                .map_err(|e| format!("elect: {e}"))?;
            encode(&())
        }
        Route::ReadIndex => {
            let (read, _) = inner
                .raft
                .get_read_log_id()
                .await
                .map_err(|e| format!("read index: {e}"))?;
            encode(&read.map(|l| l.index))
        }
        Route::BlobPut => {
            let put: BlobPut<'_> =
                postcard::from_bytes(&body).map_err(|e| format!("undecodable request: {e}"))?;
            inner
                .blobs
                .put(put.sha, put.bytes)
                .await
                .map_err(|e| format!("storing blob {}: {e}", put.sha))?;
            encode(&())
        }
        Route::BlobGet => {
            let sha: String = decode(&body)?;
            let bytes = inner
                .blobs
                .read(&sha)
                .await
                .map_err(|e| format!("reading blob {sha}: {e}"))?;
            encode(&BlobGot(bytes))
        }
    }
}

/// The HTTP form of a peer request.
async fn http_rpc(inner: &Arc<Inner>, route: Route, body: Bytes) -> HttpResponse {
    match peer_rpc(inner, route, body).await {
        Ok(bytes) => bytes.into_response(),
        Err(why) => (StatusCode::BAD_REQUEST, why).into_response(),
    }
}

/// Serves [`crate::wire`] frames on one peer connection (its magic already read) until it
/// closes or the node stops. Requests are answered concurrently.
async fn serve_frames(
    inner: Arc<Inner>,
    stream: tokio::net::TcpStream,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let _ = wire::tune(&stream);
    let (read, write) = stream.into_split();
    let mut read = tokio::io::BufReader::with_capacity(64 << 10, read);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let writer = tokio::spawn(wire::write_frames(write, rx));
    loop {
        let frame = tokio::select! {
            f = wire::read_frame(&mut read) => f,
            () = stop.cancelled() => break,
        };
        let (id, code, payload) = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "peer connection: bad frame; closing it");
                break;
            }
        };
        let inner = inner.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let answer = match wire::Route::from_code(code) {
                Some(route) => peer_rpc(&inner, route, payload).await,
                None => Err(format!("unknown peer route code {code}")),
            };
            let frame = match answer {
                Ok(bytes) => wire::frame(id, wire::OK, &bytes),
                Err(why) => wire::frame(id, wire::FAILED, why.as_bytes()),
            };
            let _ = tx.send(frame);
        });
    }
    drop(tx);
    // Answers still being computed hold senders; the writer ends once they are sent.
    let _ = writer.await;
}

/// Feeds the HTTP connections of the peer port to axum.
struct HttpConns {
    rx: tokio::sync::mpsc::Receiver<(tokio::net::TcpStream, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for HttpConns {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop ended (the node is stopping): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves the peer port: connections that start with [`wire::MAGIC`] speak frames, all
/// others HTTP (the admin endpoints and the `/raft/*` routes).
async fn serve_peers(
    inner: Arc<Inner>,
    listener: tokio::net::TcpListener,
    app: Router,
    stop: CancellationToken,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "peer listener has no address");
            return;
        }
    };
    let (http_tx, http_rx) = tokio::sync::mpsc::channel(64);
    let accept_stop = stop.clone();
    // Every task serving a peer connection or request: on shutdown they end (or are given a
    // moment to) before the node's storage is released.
    let tasks = TaskTracker::new();
    let conn_tasks = tasks.clone();
    let accept = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = accept_stop.cancelled() => return,
            };
            let (stream, addr) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "peer listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (inner, http_tx, stop) = (inner.clone(), http_tx.clone(), accept_stop.clone());
            let tasks = conn_tasks.clone();
            conn_tasks.spawn(async move {
                let mut first = [0u8; 1];
                let peeked =
                    tokio::time::timeout(Duration::from_secs(10), stream.peek(&mut first)).await;
                match peeked {
                    Ok(Ok(1)) if first[0] == wire::MAGIC[0] => {
                        let mut stream = stream;
                        let mut magic = [0u8; 8];
                        use tokio::io::AsyncReadExt;
                        if stream.read_exact(&mut magic).await.is_ok() && &magic == wire::MAGIC {
                            serve_frames(inner, stream, stop, tasks).await;
                        } else {
                            tracing::warn!(%addr, "peer connection: bad magic; closed");
                        }
                    }
                    Ok(Ok(n)) if n > 0 => {
                        let _ = http_tx.send((stream, addr)).await;
                    }
                    // Closed, failed or silent: nothing to serve.
                    _ => {}
                }
            });
        }
    });
    let _ = axum::serve(HttpConns { rx: http_rx, local }, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    accept.abort();
    let _ = accept.await;
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("peer connections still busy 5 s after shutdown; leaving them");
    }
}

async fn forwarded_write(inner: &Arc<Inner>, fwd: Forwarded) -> WriteReply {
    let deadline = Instant::now() + inner.write_timeout;
    match inner
        .order
        .turn(fwd.from, fwd.epoch, fwd.seq, deadline)
        .await
    {
        Turn::Retry => WriteReply::Retry,
        Turn::Duplicate(mut answer) => match answer.wait_for(Option::is_some).await {
            Ok(a) => a.clone().expect("waited for an answer"),
            Err(_) => WriteReply::Failed("the original of this duplicate was not answered".into()),
        },
        Turn::Go(mut ticket) => {
            // Into the leader's own queue, in the follower's order: the operations join the
            // next entry the leader proposes.
            let n = fwd.request.ops.len();
            let mut answers = Vec::with_capacity(n);
            for (op, ts) in fwd.request.ops {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let pending = Pending {
                    op,
                    ts,
                    deadline,
                    reply: Reply::Forwarded(tx),
                };
                if inner.queue.send(pending).is_err() {
                    break;
                }
                answers.push(rx);
            }
            ticket.proposed();
            let mut index = 0;
            let mut not_leader = 0;
            let mut response = Vec::with_capacity(n);
            for rx in answers {
                response.push(match rx.await {
                    Ok(Ok((i, answer))) => {
                        index = index.max(i);
                        answer
                    }
                    Ok(Err(ForwardFail::NotLeader)) => {
                        not_leader += 1;
                        Err(Refusal::Unavailable("the leader changed".into()))
                    }
                    Ok(Err(ForwardFail::Failed(why))) => Err(Refusal::Unavailable(why)),
                    Err(_) => Err(Refusal::Unavailable("the leader is stopping".into())),
                });
            }
            let reply = if response.len() < n {
                WriteReply::Failed("the leader is stopping".into())
            } else if not_leader == n {
                WriteReply::NotLeader
            } else {
                WriteReply::Done {
                    index,
                    response: Response(response),
                }
            };
            ticket.answer(&reply);
            reply
        }
    }
}

async fn admin_metrics(State(inner): Shared) -> HttpResponse {
    let metrics = inner.raft.metrics().borrow().clone();
    axum::Json(metrics).into_response()
}

async fn admin_digest(State(inner): Shared) -> HttpResponse {
    // The last applied index, as `cluster status` (openraft's `last_applied`) counts it.
    let applied = inner.applied.borrow().checked_sub(1);
    let engine = inner.cell.get();
    match tokio::task::spawn_blocking(move || digest(&engine)).await {
        Ok(Ok(d)) => {
            axum::Json(serde_json::json!({"applied": applied, "digest": d})).into_response()
        }
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Builds a snapshot now and answers once it exists and is exported: its last log index,
/// and where its files are (`snapshot.data`, `snapshot.meta` under the node's
/// `cluster/sm/`).
async fn admin_snapshot(State(inner): Shared) -> HttpResponse {
    let applied = inner
        .raft
        .metrics()
        .borrow()
        .last_applied
        .map_or(0, |l| l.index);
    if let Err(e) = inner.raft.trigger().snapshot().await {
        return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
    }
    let mut metrics = inner.raft.metrics();
    let waited = tokio::time::timeout(
        Duration::from_secs(60),
        metrics.wait_for(|m| m.snapshot.is_some_and(|s| s.index >= applied)),
    )
    .await
    .is_ok_and(|m| m.is_ok());
    if !waited {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the snapshot was not built within 60 s",
        )
            .into_response();
    }
    let sm = inner.state_machine.clone();
    match tokio::task::spawn_blocking(move || sm.export_snapshot()).await {
        Ok(Ok(index)) => axum::Json(serde_json::json!({
            "snapshot_last_index": index,
            "files": ["snapshot.data", "snapshot.meta"],
        }))
        .into_response(),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("exporting the snapshot: {e}"),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `POST /admin/add-learner` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddLearner {
    /// The new node's id.
    pub id: NodeId,
    /// Its replication address.
    pub addr: String,
    /// Give up waiting for it to catch up once it received nothing for this long (seconds;
    /// default 30). It stays a learner.
    #[serde(default = "learner_stall_secs")]
    pub wait_secs: u64,
}

fn learner_stall_secs() -> u64 {
    LEARNER_STALL.as_secs()
}

/// `POST /admin/change-membership` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChangeMembership {
    /// The voters after the change (learners not listed stay learners; use `remove` to drop
    /// nodes entirely).
    pub voters: BTreeSet<NodeId>,
    /// Nodes to remove from the cluster altogether (voters or learners).
    #[serde(default)]
    pub remove: BTreeSet<NodeId>,
}

fn admin_answer<T: Serialize>(
    result: Result<T, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>,
) -> HttpResponse {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => (
            StatusCode::MISDIRECTED_REQUEST,
            axum::Json(serde_json::json!({
                "error": "not_leader",
                "leader_id": f.leader_id,
                "leader_addr": f.leader_node.map(|n| n.addr),
            })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::CONFLICT,
            axum::Json(serde_json::json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

/// A membership request refused before it reaches Raft.
fn refused(why: String) -> HttpResponse {
    (
        StatusCode::CONFLICT,
        axum::Json(serde_json::json!({ "error": why })),
    )
        .into_response()
}

/// How long a learner may go without receiving any entry before `add-learner` gives up
/// waiting for it to catch up (it stays a learner).
const LEARNER_STALL: Duration = Duration::from_secs(30);

/// A learner within this many entries of the leader's log may be promoted.
const PROMOTE_LAG_MAX: u64 = 1_000;

/// How far node `id` has caught up, as the leader sees it: (its last replicated index, the
/// leader's last log index); `None` on a node that is not the leader.
fn replication_of(inner: &Inner, id: NodeId) -> Option<(Option<u64>, u64)> {
    let metrics = inner.raft.metrics().borrow().clone();
    let replication = metrics.replication.as_ref()?;
    let matched = replication.get(&id).cloned().flatten().map(|l| l.index);
    Some((matched, metrics.last_log_index.unwrap_or(0)))
}

/// The membership this node knows now.
fn current_membership(inner: &Inner) -> openraft::Membership<NodeId, BasicNode> {
    inner
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone()
}

async fn admin_add_learner(
    State(inner): Shared,
    axum::Json(req): axum::Json<AddLearner>,
) -> HttpResponse {
    let membership = current_membership(&inner);
    if let Some(node) = membership.get_node(&req.id) {
        let voter = membership.voter_ids().any(|v| v == req.id);
        if voter || node.addr != req.addr {
            let role = if voter { "a voter" } else { "a learner" };
            return refused(format!(
                "node {} is already {role} at {}: pick an unused id, or remove node {} first \
                 (`remove --ids {}`) to change its address",
                req.id, node.addr, req.id, req.id
            ));
        }
    }
    let log_id = match inner
        .raft
        .add_learner(req.id, BasicNode::new(req.addr.clone()), true)
        .await
    {
        Ok(r) => r.log_id,
        Err(e) => return admin_answer::<()>(Err(e)),
    };
    // openraft's blocking `add_learner` returns before an unreachable learner received
    // anything; wait until it holds the log up to its addition.
    let target = log_id.index;
    let mut best = None;
    let mut since = Instant::now();
    loop {
        let Some((matched, _)) = replication_of(&inner, req.id) else {
            return refused(format!(
                "node {} was added as a learner, but this node stopped being the leader before \
                 it caught up: check `cluster status` before promoting it",
                req.id
            ));
        };
        if matched.is_some_and(|m| m >= target) {
            return axum::Json(log_id).into_response();
        }
        if matched > best {
            best = matched;
            since = Instant::now();
        }
        if since.elapsed() > Duration::from_secs(req.wait_secs) {
            return (
                StatusCode::GATEWAY_TIMEOUT,
                axum::Json(serde_json::json!({
                    "error": format!(
                        "node {} at {} is a learner now, but received nothing for {} s (holds \
                         entries up to {}, needs {target}): is it running, and is the address \
                         right? Fix it, or remove it with `remove --ids {}`",
                        req.id,
                        req.addr,
                        req.wait_secs,
                        best.map_or("none".to_owned(), |b| b.to_string()),
                        req.id
                    ),
                    "log_id": log_id,
                })),
            )
                .into_response();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn admin_change_membership(
    State(inner): Shared,
    axum::Json(req): axum::Json<ChangeMembership>,
) -> HttpResponse {
    let membership = current_membership(&inner);
    let members: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
    let list = |ids: &BTreeSet<NodeId>| {
        ids.iter()
            .map(|id| id.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let unknown: BTreeSet<NodeId> = req
        .remove
        .iter()
        .chain(&req.voters)
        .filter(|id| !members.contains(id))
        .copied()
        .collect();
    if !unknown.is_empty() {
        return refused(format!(
            "not in the cluster: node {} (members: {}); add a node with `add-learner` first",
            list(&unknown),
            list(&members)
        ));
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    for id in req.voters.difference(&voters) {
        // On a follower this is skipped: Raft answers "not leader" below and the CLI retries
        // on the leader, which checks.
        if let Some((matched, last)) = replication_of(&inner, *id)
            && matched.is_none_or(|m| m + PROMOTE_LAG_MAX < last)
        {
            return refused(format!(
                "node {id} has not caught up (it holds entries up to {}, the leader {last}): \
                 promote it once it has; `cluster status` shows its progress",
                matched.map_or("none".to_owned(), |m| m.to_string())
            ));
        }
    }
    let result = async {
        if !req.remove.is_empty() {
            inner
                .raft
                .change_membership(ChangeMembers::RemoveVoters(req.remove.clone()), true)
                .await?;
            inner
                .raft
                .change_membership(ChangeMembers::RemoveNodes(req.remove.clone()), false)
                .await?;
        }
        if req.voters.is_empty() {
            return Ok(None);
        }
        inner
            .raft
            .change_membership(req.voters.clone(), false)
            .await
            .map(|r| Some(r.log_id))
    }
    .await;
    admin_answer(result)
}

#[cfg(test)]
mod tests {
    use super::staggered;

    /// Any three consecutive node ids (a cluster of three, or three of five) get three
    /// different amounts (index tail sizes), none below the configured one.
    #[test]
    fn consecutive_nodes_get_different_amounts() {
        for amount in [50, 100_000, 200_000] {
            for first in 0..10u64 {
                let got: Vec<u64> = (first..first + 3).map(|id| staggered(amount, id)).collect();
                assert!(got.iter().all(|&s| s >= amount), "{got:?}");
                let mut distinct = got.clone();
                distinct.sort_unstable();
                distinct.dedup();
                assert_eq!(distinct.len(), 3, "{got:?}");
            }
        }
        assert_eq!(staggered(u64::MAX, 2), u64::MAX);
        assert_eq!(staggered(1, 2), 1);
    }
}
