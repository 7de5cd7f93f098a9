//! Messages between nodes: postcard bodies in binary frames over one TCP connection per peer
//! ([`crate::wire`]) to each node's replication address (`--peer-listen`).
//!
//! Client side: [`Network`] implements openraft's `RaftNetworkFactory`; every request has the
//! timeout openraft gives it; an unreachable peer is retried with a short constant backoff.
//! Every message first passes the node's [`NetFaults`], which tests use to drop, delay,
//! duplicate (and, through random delays, reorder) messages and to cut links one way.
//!
//! Server side: `node.rs` answers the same requests on frames and, for the admin API and
//! older peers, as HTTP routes (`/raft/{append,vote,snapshot,write}`, `/cluster/gossip`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use rand::Rng;
use serde::{Serialize, de::DeserializeOwned};
use std::sync::Arc;

use crate::types::{NodeId, TypeConfig};
use crate::wire::{self, CallError, Conn, Route};

/// Injected network faults, shared by every node of an in-process test cluster (or private to
/// one node). All off by default.
#[derive(Debug, Default)]
pub struct NetFaults {
    blocked: Mutex<HashSet<(NodeId, NodeId)>>,
    delay_ms_max: AtomicU64,
    drop_per_mille: AtomicU32,
    duplicate_per_mille: AtomicU32,
}

impl NetFaults {
    /// No faults.
    pub fn new() -> Arc<NetFaults> {
        Arc::new(NetFaults::default())
    }

    /// Cuts the link `from → to` (one way).
    pub fn block(&self, from: NodeId, to: NodeId) {
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((from, to));
    }

    /// Cuts every link between `node` and `others`, both ways.
    pub fn isolate(&self, node: NodeId, others: &[NodeId]) {
        for &o in others {
            self.block(node, o);
            self.block(o, node);
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Delays each message by a random 0..=`ms` (which also reorders them).
    pub fn set_delay_ms_max(&self, ms: u64) {
        self.delay_ms_max.store(ms, Ordering::Relaxed);
    }

    /// Drops this many messages per thousand.
    pub fn set_drop_per_mille(&self, n: u32) {
        self.drop_per_mille.store(n, Ordering::Relaxed);
    }

    /// Sends this many messages per thousand twice.
    pub fn set_duplicate_per_mille(&self, n: u32) {
        self.duplicate_per_mille.store(n, Ordering::Relaxed);
    }

    fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(from, to))
    }

    /// What to do with one message: `None` = drop it, else (delay, send twice).
    fn fate(&self, from: NodeId, to: NodeId) -> Option<(Duration, bool)> {
        if self.is_blocked(from, to) {
            return None;
        }
        let mut rng = rand::rng();
        let drop = self.drop_per_mille.load(Ordering::Relaxed);
        if drop > 0 && rng.random_range(0..1000) < drop {
            return None;
        }
        let max = self.delay_ms_max.load(Ordering::Relaxed);
        let delay = if max > 0 {
            rng.random_range(0..=max)
        } else {
            0
        };
        let dup = self.duplicate_per_mille.load(Ordering::Relaxed);
        let twice = dup > 0 && rng.random_range(0..1000) < dup;
        Some((Duration::from_millis(delay), twice))
    }
}

/// Why a message to a peer got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The link is cut or the message was dropped before it was sent (fault injection).
    #[error("message to node {0} dropped")]
    Dropped(NodeId),
    /// The message was delivered but its answer was lost (a link cut one way back).
    #[error("answer from node {0} lost")]
    AnswerLost(NodeId),
    /// Could not connect, or the connection failed.
    #[error("node {node} at {addr}: {why}")]
    Transport {
        /// Target.
        node: NodeId,
        /// Its address.
        addr: String,
        /// Why.
        why: String,
        /// The message certainly did not leave this node (no connection, or it was closed
        /// before the message was queued).
        never_sent: bool,
    },
    /// No answer came in time over a working connection: the peer is slow (a long
    /// `fdatasync`) or hung. Its answer may still come and is then dropped.
    #[error("node {node} at {addr}: no answer within {after:?}")]
    TimedOut {
        /// Target.
        node: NodeId,
        /// Its address.
        addr: String,
        /// The timeout.
        after: Duration,
    },
    /// The peer answered with an error or an undecodable body.
    #[error("node {node}: {why}")]
    Protocol {
        /// Target.
        node: NodeId,
        /// Why.
        why: String,
    },
}

impl SendError {
    /// Whether the peer certainly never received the message (so a retry cannot duplicate it).
    pub fn never_sent(&self) -> bool {
        match self {
            SendError::Dropped(_) => true,
            SendError::Transport { never_sent, .. } => *never_sent,
            _ => false,
        }
    }
}

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The connection to one peer address, if open. Its own lock: a slow connect to one peer
/// (a host that drops SYNs takes the whole connect timeout) never holds up calls to others.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

/// Which of a peer's connections a call uses.
#[derive(Debug, Clone, Copy)]
enum Lane {
    /// Raft's messages, forwarded writes, gossip.
    Raft,
    /// Large transfers.
    Bulk,
}

/// A node's connections to its peers ([`crate::wire`]: one multiplexed TCP connection per
/// peer address, opened on first use and again after it fails).
#[derive(Debug, Clone)]
pub struct PeerClient {
    from: NodeId,
    conns: Arc<Mutex<HashMap<String, Slot>>>,
    faults: Arc<NetFaults>,
}

impl PeerClient {
    /// A client for node `from`.
    pub fn new(from: NodeId, faults: Arc<NetFaults>) -> PeerClient {
        PeerClient {
            from,
            conns: Arc::default(),
            faults,
        }
    }

    /// The open connection to `addr` (Raft's, or the one for bulk transfers), or a new one.
    async fn conn(&self, addr: &str, lane: Lane) -> std::io::Result<Arc<Conn>> {
        let key = match lane {
            Lane::Raft => addr.to_owned(),
            Lane::Bulk => format!("{addr} bulk"),
        };
        let slot = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Conn::connect(addr, CONNECT_TIMEOUT).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Sends `body` (postcard) as a `route` request to node `to` at `addr`; decodes a
    /// postcard answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        to: NodeId,
        addr: &str,
        route: Route,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, SendError> {
        self.call_on(Lane::Raft, to, addr, route, body, timeout)
            .await
    }

    /// [`PeerClient::call`] on a connection of its own (one per peer), so that large
    /// transfers (file blobs) never hold Raft's messages up behind them.
    pub async fn call_bulk<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        to: NodeId,
        addr: &str,
        route: Route,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, SendError> {
        self.call_on(Lane::Bulk, to, addr, route, body, timeout)
            .await
    }

    async fn call_on<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        lane: Lane,
        to: NodeId,
        addr: &str,
        route: Route,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, SendError> {
        let (delay, twice) = self
            .faults
            .fate(self.from, to)
            .ok_or(SendError::Dropped(to))?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let bytes = postcard::to_allocvec(body).map_err(|e| SendError::Protocol {
            node: to,
            why: format!("encode: {e}"),
        })?;
        let transport = |why: String, never_sent: bool| SendError::Transport {
            node: to,
            addr: addr.to_owned(),
            why,
            never_sent,
        };
        let conn = self
            .conn(addr, lane)
            .await
            .map_err(|e| transport(format!("connect: {e}"), true))?;
        if twice {
            // The duplicate goes first, unanswered; the receiver must cope with both.
            let _ = conn.send_only(route, &bytes);
        }
        let (code, body) = conn
            .call(route, &bytes, timeout)
            .await
            .map_err(|e| match e {
                CallError::Closed => transport("connection closed".into(), true),
                CallError::Lost(why) => transport(why, false),
                CallError::TimedOut => SendError::TimedOut {
                    node: to,
                    addr: addr.to_owned(),
                    after: timeout,
                },
            })?;
        if code != wire::OK {
            return Err(SendError::Protocol {
                node: to,
                why: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        // A cut link drops answers too (an asymmetric cut `to → from` loses the reply).
        if self.faults.is_blocked(to, self.from) {
            return Err(SendError::AnswerLost(to));
        }
        postcard::from_bytes(&body).map_err(|e| SendError::Protocol {
            node: to,
            why: format!("decode: {e}"),
        })
    }
}

/// openraft's network factory for a node.
#[derive(Debug, Clone)]
pub struct Network {
    client: PeerClient,
}

impl Network {
    /// The network of a node.
    pub fn new(client: PeerClient) -> Network {
        Network { client }
    }
}

/// A connection to one peer.
#[derive(Debug)]
pub struct PeerConnection {
    client: PeerClient,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection {
        PeerConnection {
            client: self.client.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

/// openraft backs off (100 ms here, [`RaftNetworkFactory::backoff`]) after `Unreachable`,
/// not after other errors. A timeout counts as `Unreachable` too, although the peer is often
/// only slow (a long `fdatasync`): sending again at once, without the backoff, shortened the
/// longest stalls at 1,000 msg/s (max 86–109 against 134–226 ms) but at 10,000 msg/s, where
/// the two cores are saturated, the repeated AppendEntries added work and p99 rose (127, 199,
/// 151 against 76, 67, 148 ms; docs/benchmarks.md).
fn rpc_error<E: std::error::Error>(e: SendError) -> RPCError<NodeId, BasicNode, E> {
    match e {
        SendError::Dropped(_)
        | SendError::AnswerLost(_)
        | SendError::Transport { .. }
        | SendError::TimedOut { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        SendError::Protocol { .. } => RPCError::Network(NetworkError::new(&e)),
    }
}

impl PeerConnection {
    async fn rpc<
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    >(
        &self,
        route: Route,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>> {
        let answer: Result<Resp, E> = self
            .client
            .call(self.target, &self.addr, route, req, option.hard_ttl())
            .await
            .map_err(rpc_error)?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(Route::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(Route::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(Route::Vote, &rpc, &option).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Transport failures, timeouts included, make openraft back off; a peer's error answer
    /// does not.
    #[test]
    fn transport_failures_and_timeouts_back_off_but_error_answers_do_not() {
        type E = RPCError<NodeId, BasicNode, RaftError<NodeId>>;
        let timed_out: E = rpc_error(SendError::TimedOut {
            node: 2,
            addr: "127.0.0.1:1".into(),
            after: Duration::from_millis(100),
        });
        assert!(
            matches!(timed_out, RPCError::Unreachable(_)),
            "{timed_out:?}"
        );
        assert!(timed_out.to_string().contains("no answer within 100ms"));
        let protocol: E = rpc_error(SendError::Protocol {
            node: 2,
            why: "decode: bad".into(),
        });
        assert!(matches!(protocol, RPCError::Network(_)), "{protocol:?}");
        let refused: E = rpc_error(SendError::Transport {
            node: 2,
            addr: "127.0.0.1:1".into(),
            why: "connect: connection refused".into(),
            never_sent: true,
        });
        assert!(matches!(refused, RPCError::Unreachable(_)), "{refused:?}");
        let dropped: E = rpc_error(SendError::Dropped(2));
        assert!(matches!(dropped, RPCError::Unreachable(_)), "{dropped:?}");
    }

    /// An address whose connects hang: a listener with a full accept queue that never
    /// accepts (further SYNs are dropped).
    fn blackhole() -> (std::net::TcpListener, Vec<std::net::TcpStream>, String) {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .expect("bind");
        sock.listen(0).expect("listen");
        let listener: std::net::TcpListener = sock.into();
        let addr = listener.local_addr().unwrap();
        let mut fill = Vec::new();
        // Fill the accept queue; connects beyond it hang (non-blocking tries so this never
        // waits itself).
        for _ in 0..4 {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            fill.push(s.into());
        }
        std::thread::sleep(Duration::from_millis(50));
        (listener, fill, addr.to_string())
    }

    /// A peer that answers every frame with an empty postcard `()`.
    async fn healthy_peer() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut magic = [0u8; 8];
                    if s.read_exact(&mut magic).await.is_err() {
                        return;
                    }
                    while let Ok(Some((id, _, _))) = wire::read_frame(&mut s).await {
                        if s.write_all(&wire::frame(id, wire::OK, &[])).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_connect_to_one_peer_does_not_hold_up_calls_to_another() {
        let (_listener, _fill, dead) = blackhole();
        let alive = healthy_peer().await;
        let client = PeerClient::new(1, NetFaults::new());
        let t = Duration::from_secs(5);
        let hanging = {
            let client = client.clone();
            tokio::spawn(
                async move { client.call::<(), ()>(2, &dead, Route::Gossip, &(), t).await },
            )
        };
        // Let it get into its connect.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let quick = client.call::<(), ()>(3, &alive, Route::Gossip, &(), t);
        tokio::pin!(hanging);
        tokio::select! {
            biased;
            answer = quick => answer.expect("the healthy peer answers"),
            _ = &mut hanging => panic!("the call to the healthy peer waited for the hanging connect"),
        }
        let failed = hanging.await.unwrap();
        assert!(
            matches!(&failed, Err(e) if e.never_sent()),
            "the hanging connect times out as never sent: {failed:?}"
        );
    }
}
