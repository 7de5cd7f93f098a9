//! In-process 3-node clusters over real loopback sockets (real openraft, real segment logs,
//! real RocksDB), with faults injected in the transport: leader kill under load, minority
//! partition, heal and convergence, restart, wipe and catch-up from a snapshot, and lossy,
//! slow, duplicating links.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatlog::engine::{Answer, ChatError, Engine};
use chatlog::log::{LogConfig, Preallocate};
use chatlog_raft::node::digest;
use chatlog_raft::{ClusterConfig, ClusterNode, NetFaults, NodeId};

struct Cluster {
    dir: tempfile::TempDir,
    faults: Arc<NetFaults>,
    peers: BTreeMap<NodeId, String>,
    nodes: BTreeMap<NodeId, Option<Arc<ClusterNode>>>,
    snapshot_every: u64,
    /// Each node's election timeout range (ms); `None`: the default.
    election_timeout_ms: Option<(u64, u64)>,
}

fn small_log() -> LogConfig {
    LogConfig {
        segment_size_bytes: 4 << 20,
        entry_size_bytes_max: 1 << 20,
        batch_size_bytes_max: 1 << 20,
        preallocate: Preallocate::Sparse,
        ..LogConfig::default()
    }
}

impl Cluster {
    async fn start(n: u64, snapshot_every: u64) -> Cluster {
        Cluster::start_with(n, snapshot_every, None).await
    }

    async fn start_with(
        n: u64,
        snapshot_every: u64,
        election_timeout_ms: Option<(u64, u64)>,
    ) -> Cluster {
        // RUST_LOG=openraft=debug,chatlog_raft=debug shows what the nodes did.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
            )
            .with_test_writer()
            .try_init();
        let mut listeners = Vec::new();
        let mut peers = BTreeMap::new();
        for id in 1..=n {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            peers.insert(id, l.local_addr().unwrap().to_string());
            listeners.push((id, l));
        }
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            faults: NetFaults::new(),
            peers,
            nodes: BTreeMap::new(),
            snapshot_every,
            election_timeout_ms,
        };
        for (id, l) in listeners {
            let node = ClusterNode::start(c.config(id), l).await.unwrap();
            c.nodes.insert(id, Some(node));
        }
        c
    }

    fn node_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("n{id}"))
    }

    fn config(&self, id: NodeId) -> ClusterConfig {
        let mut config = ClusterConfig::new(id, self.peers.clone(), self.node_dir(id));
        config.engine.log = small_log();
        // Small index tails, so replicas ingest them many times and the digests still agree.
        config.engine.index_tail_entries = 64;
        config.raft_log = small_log();
        config.faults = self.faults.clone();
        config.snapshot_every = self.snapshot_every;
        config.keep_after_snapshot = 10;
        config.write_timeout = Duration::from_secs(2);
        if let Some(range) = self.election_timeout_ms {
            config.election_timeout_ms = range;
        }
        config
    }

    fn node(&self, id: NodeId) -> Arc<ClusterNode> {
        self.nodes[&id].clone().expect("node is running")
    }

    fn running(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    async fn kill(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap().take().expect("running");
        node.shutdown().await;
        let engine = node.engine();
        drop(node);
        // The stopped node's tasks let go of its engine; the last holder closes it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&engine) > 1 {
            assert!(
                Instant::now() < deadline,
                "node {id}: its engine is still held after shutdown"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::task::spawn_blocking(move || drop(engine))
            .await
            .unwrap();
    }

    async fn restart(&mut self, id: NodeId) {
        self.restart_with(id, true).await;
    }

    /// Restarts `id`; without `initialize` it waits for the leader (as `--join` does: a node
    /// whose disk was wiped must not propose a membership of its own).
    async fn restart_with(&mut self, id: NodeId, initialize: bool) {
        let addr = self.peers[&id].clone();
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("rebinding {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding {addr}: {e}"),
            }
        };
        let mut config = self.config(id);
        config.initialize = initialize;
        let node = ClusterNode::start(config, listener).await.unwrap();
        self.nodes.insert(id, Some(node));
    }

    /// Waits until the running nodes agree on a leader among them.
    async fn leader(&self) -> NodeId {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let running = self.running();
            let leaders: Vec<Option<NodeId>> =
                running.iter().map(|id| self.node(*id).leader()).collect();
            if let Some(Some(l)) = leaders.first()
                && running.contains(l)
                && leaders.iter().all(|x| *x == Some(*l))
            {
                return *l;
            }
            assert!(Instant::now() < deadline, "no leader agreed: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The agreed leader, and a new chat of alice and bob created through it.
    async fn leader_and_chat(&self) -> (NodeId, String) {
        let leader = self.leader().await;
        let chat = create_group(&self.node(leader).engine(), &["bob"]).await;
        (leader, chat)
    }

    /// Checks `acked` against the history of every running node.
    fn check_all(&self, chat: &str, acked: &HashMap<String, u64>) {
        for id in self.running() {
            check_history(&self.node(id).engine(), chat, acked);
        }
    }

    /// Stops every running node.
    async fn stop_all(&mut self) {
        for id in self.running() {
            self.kill(id).await;
        }
    }

    /// Waits until every running node has applied the same entries, then returns their
    /// digests (which must all be equal).
    async fn converged(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let running = self.running();
            let applied: Vec<u64> = running.iter().map(|id| self.node(*id).applied()).collect();
            let max_log = running
                .iter()
                .filter_map(|id| self.node(*id).metrics().last_log_index)
                .max()
                .unwrap_or(0);
            if applied.iter().all(|a| *a == max_log + 1) {
                let digests: Vec<String> = running
                    .iter()
                    .map(|id| digest(&self.node(*id).engine()).unwrap())
                    .collect();
                if digests.iter().all(|d| *d == digests[0]) {
                    return digests[0].clone();
                }
                assert!(
                    Instant::now() < deadline,
                    "replicas applied the same entries but differ: {digests:?}"
                );
            }
            assert!(
                Instant::now() < deadline,
                "replicas did not converge: applied {applied:?}, last log {max_log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sends `count` messages from `sender` into `chat` through the nodes in turn, each retried
/// with the same cmid until acknowledged (or `give_up`); returns cmid → seq of the acked ones.
async fn send_all(
    cluster: &Cluster,
    chat: &str,
    sender: &str,
    prefix: &str,
    count: usize,
    give_up: Duration,
) -> HashMap<String, u64> {
    let mut acked = HashMap::new();
    for i in 0..count {
        let cmid = format!("{prefix}-{i}");
        let deadline = Instant::now() + give_up;
        let mut k = i;
        loop {
            let running = cluster.running();
            let node = cluster.node(running[k % running.len()]);
            let ticket =
                node.engine()
                    .send_ticket(sender, chat, &cmid, Some(format!("body {cmid}")), None);
            match ticket.await {
                Ok(Answer::Sent(s)) => {
                    acked.insert(cmid.clone(), s.seq);
                    break;
                }
                Ok(other) => panic!("send answered {other:?}"),
                Err(ChatError::Unavailable(_)) if Instant::now() < deadline => {
                    k += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    let states: Vec<String> = cluster
                        .running()
                        .into_iter()
                        .map(|id| {
                            let m = cluster.node(id).metrics();
                            format!(
                                "node {id}: {:?} term {} leader {:?} applied {:?} last log {:?}",
                                m.state,
                                m.current_term,
                                m.current_leader,
                                m.last_applied,
                                m.last_log_index
                            )
                        })
                        .collect();
                    panic!("send {cmid} failed: {e}; nodes: {}", states.join("; "))
                }
            }
        }
    }
    acked
}

async fn create_group(engine: &Engine, members: &[&str]) -> String {
    let members: Vec<String> = members.iter().map(|m| m.to_string()).collect();
    match engine
        .create_chat_ticket("alice", &members, Some("ops".into()), false)
        .await
        .unwrap()
    {
        Answer::Chat(c) => c,
        other => panic!("create answered {other:?}"),
    }
}

/// Every acked message is in `engine`'s history at its seq; the chat's seqs are gapless and
/// no cmid appears twice.
fn check_history(engine: &Engine, chat: &str, acked: &HashMap<String, u64>) {
    let mut seen = HashMap::new();
    let mut expected = 1;
    let mut after = 0;
    loop {
        let page = engine
            .history("alice", chat, None, Some(after), Some(500))
            .unwrap();
        if page.events.is_empty() {
            break;
        }
        for e in &page.events {
            assert_eq!(e.event.seq, expected, "seqs are gapless");
            expected += 1;
            after = e.event.seq;
            if let chatlog::engine::EventKind::Message { cmid, .. } = &e.event.kind {
                assert!(
                    seen.insert(cmid.clone(), e.event.seq).is_none(),
                    "cmid {cmid} stored twice"
                );
            }
        }
    }
    for (cmid, seq) in acked {
        assert_eq!(seen.get(cmid), Some(seq), "acked {cmid} at seq {seq}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_under_load_loses_nothing_and_restarted_node_catches_up() {
    let c = Cluster::start(3, 100_000).await;
    let (leader, chat) = c.leader_and_chat().await;
    let before = send_all(&c, &chat, "alice", "a", 50, Duration::from_secs(10)).await;

    // Concurrent senders through every node while the leader dies.
    let c = Arc::new(tokio::sync::Mutex::new(c));
    let mut senders = Vec::new();
    for s in 0..4 {
        let c = c.clone();
        let chat = chat.clone();
        senders.push(tokio::spawn(async move {
            let guard = c.lock().await;
            let running = guard.running();
            drop(guard);
            let mut acked = HashMap::new();
            for i in 0..60 {
                let cmid = format!("s{s}-{i}");
                let deadline = Instant::now() + Duration::from_secs(15);
                let mut k = i + s;
                loop {
                    let node = {
                        let g = c.lock().await;
                        let running_now = g.running();
                        let id = running[k % running.len()];
                        let id = if running_now.contains(&id) {
                            id
                        } else {
                            running_now[0]
                        };
                        g.node(id)
                    };
                    match node
                        .engine()
                        .send_ticket("alice", &chat, &cmid, Some("x".into()), None)
                        .await
                    {
                        Ok(Answer::Sent(sent)) => {
                            acked.insert(cmid.clone(), sent.seq);
                            break;
                        }
                        Ok(other) => panic!("{other:?}"),
                        Err(ChatError::Unavailable(_)) if Instant::now() < deadline => {
                            k += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("send {cmid}: {e}"),
                    }
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    c.lock().await.kill(leader).await;
    // Failover time: first write acknowledged through a survivor after the kill.
    let failover = {
        let g = c.lock().await;
        let survivor = g.running()[0];
        let engine = g.node(survivor).engine();
        drop(g);
        loop {
            match engine
                .send_ticket(
                    "bob",
                    &chat,
                    &format!("probe-{}", killed_at.elapsed().as_micros()),
                    Some("p".into()),
                    None,
                )
                .await
            {
                Ok(_) => break killed_at.elapsed(),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    eprintln!("failover: first write acknowledged {failover:?} after the leader was killed");
    let mut acked = before;
    for s in senders {
        acked.extend(s.await.unwrap());
    }
    let mut c = Arc::try_unwrap(c).ok().unwrap().into_inner();
    // An acknowledgement means applied on the node that answered; the other survivor may
    // still be applying the last entries.
    c.converged().await;
    c.check_all(&chat, &acked);
    c.restart(leader).await;
    let d = c.converged().await;
    check_history(&c.node(leader).engine(), &chat, &acked);
    eprintln!(
        "converged: {d}, {} acked messages checked on 3 nodes",
        acked.len()
    );
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_partition_refuses_writes_and_heals() {
    let mut c = Cluster::start(3, 100_000).await;
    let (leader, chat) = c.leader_and_chat().await;
    let mut acked = send_all(&c, &chat, "alice", "a", 20, Duration::from_secs(10)).await;

    // Cut the leader off: it is the minority.
    let others: Vec<NodeId> = c.running().into_iter().filter(|id| *id != leader).collect();
    c.faults.isolate(leader, &others);
    let started = Instant::now();
    let refused = c
        .node(leader)
        .engine()
        .send_ticket("alice", &chat, "minority-1", Some("lost?".into()), None)
        .await;
    assert!(
        matches!(refused, Err(ChatError::Unavailable(_))),
        "a minority node must refuse writes: {refused:?}"
    );
    eprintln!("minority refused a write after {:?}", started.elapsed());

    // The majority elects a leader among itself and goes on.
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_leader = loop {
        let l = c.node(others[0]).leader();
        if let Some(l) = l.filter(|l| others.contains(l))
            && c.node(others[1]).leader() == Some(l)
        {
            break l;
        }
        assert!(Instant::now() < deadline, "majority elected no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for i in 0..20 {
        let cmid = format!("m-{i}");
        let sent = c
            .node(others[i % 2])
            .engine()
            .send_ticket("alice", &chat, &cmid, Some("y".into()), None)
            .await
            .unwrap();
        if let Answer::Sent(s) = sent {
            acked.insert(cmid, s.seq);
        }
    }
    assert_ne!(new_leader, leader);

    // Heal: everyone converges; the write the minority refused may or may not have been
    // kept, but if it was, exactly once.
    c.faults.heal();
    c.converged().await;
    c.check_all(&chat, &acked);
    // A retry of the refused write through any node lands exactly once.
    let retried = c
        .node(others[0])
        .engine()
        .send_ticket("alice", &chat, "minority-1", Some("lost?".into()), None)
        .await
        .unwrap();
    if let Answer::Sent(s) = retried {
        acked.insert("minority-1".into(), s.seq);
    }
    c.converged().await;
    c.check_all(&chat, &acked);
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wiped_node_catches_up_from_a_snapshot() {
    let mut c = Cluster::start(3, 50).await;
    let (leader, chat) = c.leader_and_chat().await;
    let victim = c.running().into_iter().find(|id| *id != leader).unwrap();
    c.kill(victim).await;
    let acked = send_all(&c, &chat, "alice", "w", 300, Duration::from_secs(10)).await;
    // The survivors snapshot and purge their logs past what the victim has.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c
        .node(leader)
        .metrics()
        .snapshot
        .is_none_or(|s| s.index < 200)
    {
        assert!(Instant::now() < deadline, "no snapshot was built");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_dir_all(c.node_dir(victim)).unwrap();
    c.restart_with(victim, false).await;
    let d = c.converged().await;
    check_history(&c.node(victim).engine(), &chat, &acked);
    let m = c.node(victim).metrics();
    assert!(
        m.snapshot.is_some(),
        "the wiped node caught up through a snapshot: {m:?}"
    );
    eprintln!("wiped node converged ({d}) from snapshot {:?}", m.snapshot);
    // It takes part in writes again.
    let more = send_all(&c, &chat, "alice", "after", 10, Duration::from_secs(10)).await;
    c.converged().await;
    check_history(&c.node(victim).engine(), &chat, &more);
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lossy_slow_duplicating_links_lose_nothing() {
    let c = Cluster::start(3, 100_000).await;
    let (_, chat) = c.leader_and_chat().await;
    c.faults.set_delay_ms_max(15);
    c.faults.set_drop_per_mille(50);
    c.faults.set_duplicate_per_mille(50);
    let acked = send_all(&c, &chat, "alice", "f", 150, Duration::from_secs(30)).await;
    c.faults.set_delay_ms_max(0);
    c.faults.set_drop_per_mille(0);
    c.faults.set_duplicate_per_mille(0);
    c.converged().await;
    c.check_all(&chat, &acked);
    let mut c = c;
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asymmetric_partitions_lose_nothing() {
    let mut c = Cluster::start(3, 100_000).await;
    let (leader, chat) = c.leader_and_chat().await;
    let mut acked = send_all(&c, &chat, "alice", "a", 20, Duration::from_secs(10)).await;
    let others: Vec<NodeId> = c.running().into_iter().filter(|id| *id != leader).collect();

    // The leader can hear the others but not reach them: its heartbeats are lost, a follower
    // takes over, and the old leader learns of the new term from the vote requests it hears.
    for &o in &others {
        c.faults.block(leader, o);
    }
    acked.extend(send_all(&c, &chat, "alice", "b", 10, Duration::from_secs(20)).await);
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_leader = loop {
        let l = c.node(others[0]).leader();
        if let Some(l) = l.filter(|l| others.contains(l)) {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader behind a one-way cut"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    c.faults.heal();

    // One follower cannot reach the new leader (but hears it); another write burst.
    let follower = others.iter().copied().find(|id| *id != new_leader).unwrap();
    c.faults.block(follower, new_leader);
    acked.extend(send_all(&c, &chat, "alice", "c", 10, Duration::from_secs(20)).await);
    c.faults.heal();
    c.converged().await;
    c.check_all(&chat, &acked);
    c.stop_all().await;
}

/// Submits `count` sends from alice (cmids `{prefix}{i}`) through `engine` all at once, as
/// one connection's pipelined sends are, then awaits them in order: each must be sent at a seq
/// above the one before (and above `last`, which ends at the last seq). Returns cmid → seq.
async fn send_pipelined(
    engine: &Engine,
    chat: &str,
    prefix: &str,
    count: usize,
    last: &mut u64,
) -> HashMap<String, u64> {
    let tickets: Vec<_> = (0..count)
        .map(|i| {
            let cmid = format!("{prefix}{i}");
            let ticket = engine.send_ticket("alice", chat, &cmid, Some("x".into()), None);
            (cmid, ticket)
        })
        .collect();
    let mut acked = HashMap::new();
    for (cmid, t) in tickets {
        match t.await.unwrap() {
            Answer::Sent(s) => {
                assert!(s.seq > *last, "{cmid} got seq {} after {last}", s.seq);
                *last = s.seq;
                acked.insert(cmid, s.seq);
            }
            other => panic!("{other:?}"),
        }
    }
    acked
}

/// Writes submitted one after the other through one node (as one connection's pipelined sends
/// are) commit in that order: seqs increase in submission order, through the leader and
/// through a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_writes_through_one_node_commit_in_order() {
    let mut c = Cluster::start(3, 100_000).await;
    let (leader, chat) = c.leader_and_chat().await;
    let follower = c.running().into_iter().find(|id| *id != leader).unwrap();
    for (node, prefix) in [(leader, "l"), (follower, "f")] {
        send_pipelined(&c.node(node).engine(), &chat, prefix, 300, &mut 0).await;
    }
    c.stop_all().await;
}

/// The same through a follower on a network that delays messages at random (so forwarded
/// batches overtake each other) and duplicates some: the leader still proposes them in the
/// follower's order, and a duplicated batch is not written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_writes_through_a_follower_keep_their_order_on_a_reordering_network() {
    let mut c = Cluster::start(3, 100_000).await;
    let (leader, chat) = c.leader_and_chat().await;
    let follower = c.running().into_iter().find(|id| *id != leader).unwrap();
    c.faults.set_delay_ms_max(8);
    c.faults.set_duplicate_per_mille(100);
    let engine = c.node(follower).engine();
    let mut last = 0;
    let mut acked = HashMap::new();
    for round in 0..4 {
        acked.extend(send_pipelined(&engine, &chat, &format!("r{round}-"), 150, &mut last).await);
    }
    c.faults.set_delay_ms_max(0);
    c.faults.set_duplicate_per_mille(0);
    c.converged().await;
    // Gapless, every acknowledged send at its seq, no cmid twice, on every node.
    assert_eq!(acked.len(), 600);
    c.check_all(&chat, &acked);
    drop(engine);
    c.stop_all().await;
}

/// A 3-node cluster with a group chat of 20 messages, then 20 more that one follower missed:
/// the leader's messages to it are lost (its answers to the follower too) until
/// `faults.heal()`. Returns the cluster, the leader, that follower, the chat and its last seq.
async fn a_follower_cut_off_from_the_last_writes() -> (Cluster, NodeId, NodeId, String, u64) {
    let c = Cluster::start(3, 100_000).await;
    let (leader, chat) = c.leader_and_chat().await;
    send_all(&c, &chat, "alice", "a", 20, Duration::from_secs(10)).await;
    let lagging = c
        .running()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    c.faults.block(leader, lagging);
    let mut last = 0;
    for i in 0..20 {
        let sent = c
            .node(leader)
            .engine()
            .send_ticket("alice", &chat, &format!("b-{i}"), Some("x".into()), None)
            .await
            .unwrap();
        if let Answer::Sent(s) = sent {
            last = s.seq;
        }
    }
    (c, leader, lagging, chat, last)
}

/// The last seq of `chat` on `node`.
fn last_seq(node: &ClusterNode, chat: &str) -> u64 {
    node.engine()
        .history("alice", chat, None, None, Some(1))
        .unwrap()
        .last_seq
}

/// A read barrier asked while the leader has just died waits for the next leader instead of
/// giving up at once: the follower, which missed the dead leader's last entries, passes it
/// only holding them (what a client moving there during a failover must find).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_barrier_during_a_failover_waits_for_the_next_leader() {
    let (mut c, leader, lagging, chat, last) = a_follower_cut_off_from_the_last_writes().await;
    c.kill(leader).await;
    c.faults.heal();
    let node = c.node(lagging);
    node.read_barrier(Duration::from_secs(20))
        .await
        .expect("the barrier passes once the next leader answers");
    assert_eq!(
        last_seq(&node, &chat),
        last,
        "the follower passed the barrier without entries the dead leader had committed"
    );
    drop(node);
    c.stop_all().await;
}

/// A read barrier on a follower the leader cannot reach does not pass while the follower
/// lacks committed entries; once the link heals it passes, and the follower then holds every
/// entry committed before the call (what a client moving to that node must find there).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_barrier_waits_until_the_node_holds_everything_committed_before_it() {
    let (mut c, _, lagging, chat, last) = a_follower_cut_off_from_the_last_writes().await;
    let node = c.node(lagging);
    let refused = node.read_barrier(Duration::from_millis(500)).await;
    assert!(
        refused.is_err(),
        "a barrier passed on a node cut off from the leader"
    );
    c.faults.heal();
    node.read_barrier(Duration::from_secs(10))
        .await
        .expect("the barrier passes once the link heals");
    assert_eq!(
        last_seq(&node, &chat),
        last,
        "the follower lacks entries committed before the barrier"
    );
    drop(node);
    c.stop_all().await;
}

/// A leader about to stop hands its role to the follower whose log holds all of its own (not
/// to the one cut off from its last entries), in the next term; writes proposed on it meanwhile
/// wait and then commit through the new leader, none refused, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_leader_hands_its_role_to_the_caught_up_follower() {
    let (mut c, leader, lagging, chat, _) = a_follower_cut_off_from_the_last_writes().await;
    let successor = c
        .running()
        .into_iter()
        .find(|id| *id != leader && *id != lagging)
        .expect("a caught-up follower");
    let old = c.node(leader);
    let term = old.metrics().current_term;
    let engine = old.engine();
    let handing = tokio::spawn({
        let old = old.clone();
        async move { old.hand_off_leadership(Duration::from_secs(5)).await }
    });
    let mut writes = Vec::new();
    for i in 0..30 {
        let cmid = format!("h-{i}");
        let ticket = engine.send_ticket("alice", &chat, &cmid, Some("x".into()), None);
        writes.push((cmid, ticket));
    }
    assert_eq!(handed_to(handing.await.unwrap()), successor);
    let mut acked = HashMap::new();
    for (cmid, ticket) in writes {
        match ticket.await {
            Ok(Answer::Sent(s)) => acked.insert(cmid, s.seq),
            other => panic!("{cmid}, sent during the hand-off, answered {other:?}"),
        };
    }
    assert_eq!(c.leader().await, successor);
    assert_eq!(c.node(successor).metrics().current_term, term + 1);
    drop((old, engine));
    c.faults.heal();
    c.kill(leader).await;
    acked.extend(send_all(&c, &chat, "alice", "after", 20, Duration::from_secs(10)).await);
    c.converged().await;
    c.check_all(&chat, &acked);
    c.stop_all().await;
}

/// In a cluster of five the leader's vote and the successor's are not a majority: the hand-off
/// stops heartbeats until the other followers' leases lapse, then still lands on the successor.
/// The election timeout is long here (a 2.5 s lease, then 2–2.5 s more before a follower would
/// campaign by itself), so a leader found within the hand-off's 3.5 s is the hand-off's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_of_five_hands_its_role_over_once_the_followers_leases_lapse() {
    let mut c = Cluster::start_with(5, 100_000, Some((2_000, 2_500))).await;
    let (leader, chat) = c.leader_and_chat().await;
    let mut acked = send_all(&c, &chat, "alice", "a", 20, Duration::from_secs(10)).await;
    let term = c.node(leader).metrics().current_term;
    let handed = c
        .node(leader)
        .hand_off_leadership(Duration::from_millis(3_500))
        .await;
    let successor = handed_to(handed);
    assert_ne!(successor, leader);
    assert_eq!(c.leader().await, successor);
    assert_eq!(c.node(successor).metrics().current_term, term + 1);
    c.kill(leader).await;
    acked.extend(send_all(&c, &chat, "alice", "b", 20, Duration::from_secs(10)).await);
    c.converged().await;
    c.check_all(&chat, &acked);
    c.stop_all().await;
}

/// The new leader a hand-off reports, or the test fails with why there was none.
fn handed_to(result: Result<NodeId, String>) -> NodeId {
    result.unwrap_or_else(|why| panic!("no hand-off: {why}"))
}

/// A follower cut off from both other nodes does not campaign (openraft 0.9 has no pre-vote;
/// the node's election guard stands in): its term stays while the others go on writing, it
/// says it has no quorum, and when the link heals it rejoins without an election (the leader
/// and the term stay) and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_follower_does_not_campaign_and_rejoins_without_an_election() {
    let mut c = Cluster::start(3, 100_000).await;
    let (leader, chat) = c.leader_and_chat().await;
    let mut acked = send_all(&c, &chat, "alice", "a", 10, Duration::from_secs(10)).await;
    let term = c.node(leader).metrics().current_term;
    let others: Vec<NodeId> = c.running().into_iter().filter(|id| *id != leader).collect();
    let cut = others[0];
    c.faults.isolate(cut, &[leader, others[1]]);
    // Several election timeouts (0.3–0.5 s after a 0.5 s lease), with writes going on.
    let engine = c.node(leader).engine();
    let until = Instant::now() + Duration::from_secs(3);
    let mut i = 0;
    while Instant::now() < until {
        let cmid = format!("b-{i}");
        match engine
            .send_ticket("alice", &chat, &cmid, Some("x".into()), None)
            .await
        {
            Ok(Answer::Sent(s)) => acked.insert(cmid, s.seq),
            other => panic!("a write through the majority answered {other:?}"),
        };
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(engine);
    let cut_node = c.node(cut);
    assert_eq!(
        cut_node.metrics().current_term,
        term,
        "the cut-off follower campaigned"
    );
    assert!(
        !cut_node.quorum_ok(Duration::from_millis(100)).await,
        "a follower cut off from everyone claims a quorum"
    );
    drop(cut_node);
    c.faults.heal();
    c.converged().await;
    assert_eq!(c.leader().await, leader);
    for id in c.running() {
        assert_eq!(
            c.node(id).metrics().current_term,
            term,
            "node {id}: an election after the heal"
        );
    }
    c.check_all(&chat, &acked);
    c.stop_all().await;
}
