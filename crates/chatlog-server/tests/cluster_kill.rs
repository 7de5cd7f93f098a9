//! A 3-node cluster of the real binary on 127.0.0.1 ports: a random node is SIGKILLed every
//! few seconds (and restarted) while clients send through every node, for `CYCLES` cycles.
//! Afterwards every node has converged to the same state (digest of every chat's events and
//! indexes), and on every node every acknowledged message is in history at the seq it was
//! acknowledged with, seqs are gapless and no cmid is stored twice.

mod cluster_common;
mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_common::*;
use serde_json::json;

/// Kill cycles (the issue asks for at least 10); `CHATLOG_CLUSTER_CYCLES` overrides it for
/// longer soaks.
fn cycles() -> usize {
    std::env::var("CHATLOG_CLUSTER_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}
/// Concurrent sending clients.
const SENDERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_node_sigkill_cycles_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node {
            id,
            client_port: free_port(),
            peer_port: free_port(),
            dir: dir.path().join(format!("n{id}")),
            child: None,
        })
        .collect();
    let peers = peers_flag(&nodes);
    for n in nodes.iter_mut() {
        start(n, &peers);
    }
    let ports: Vec<u16> = nodes.iter().map(|n| n.client_port).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for &p in &ports {
        while !healthy(p).await {
            assert!(Instant::now() < deadline, "cluster did not form");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let users: Vec<String> = (0..SENDERS).map(|i| format!("s{i}")).collect();
    let chat = {
        let mut ws = connect(ports[0], "owner").await.unwrap();
        let reply = call(
            &mut ws,
            1,
            json!({"op":"create_chat","members":users,"title":"kill"}),
        )
        .await
        .unwrap();
        reply["result"]["chat"].as_str().unwrap().to_owned()
    };

    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (k, user) in users.iter().enumerate() {
        let (chat, user, acked, stop, ports) = (
            chat.clone(),
            user.clone(),
            acked.clone(),
            stop.clone(),
            ports.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut node = k;
            let mut ws: Option<Ws> = None;
            let mut id = 0;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let cmid = format!("{user}-{i}");
                if ws.is_none() {
                    node += 1;
                    ws = connect(ports[node % ports.len()], &user).await;
                    if ws.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
                id += 1;
                let request =
                    json!({"op":"send","chat":chat,"cmid":cmid,"body":format!("b {cmid}")});
                match call(ws.as_mut().unwrap(), id, request).await {
                    Some(reply) if reply.get("result").is_some() => {
                        let seq = reply["result"]["seq"].as_u64().unwrap();
                        acked.lock().unwrap().insert(cmid, seq);
                        i += 1;
                    }
                    // `unavailable` (no quorum yet): retry the same cmid, elsewhere.
                    Some(reply) => {
                        assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
                        ws = None;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    None => ws = None,
                }
            }
        }));
    }

    let mut rng_state = 0x9e3779b97f4a7c15u64;
    for cycle in 0..cycles() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let victim = (rng_state % 3) as usize;
        let before = acked.lock().unwrap().len();
        kill(&mut nodes[victim]);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        start(&mut nodes[victim], &peers);
        eprintln!(
            "cycle {cycle}: killed node {} with {before} acked so far",
            nodes[victim].id
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "too few sends acknowledged: {}",
        acked.len()
    );

    // Converged: same applied index and digest on every node.
    let deadline = Instant::now() + Duration::from_secs(60);
    let digests = loop {
        let mut digests = BTreeMap::new();
        for n in &nodes {
            if let Some(d) = get_json(n.peer_port, "/admin/digest").await {
                digests.insert(n.id, (d["applied"].clone(), d["digest"].clone()));
            }
        }
        let values: Vec<_> = digests.values().collect();
        if values.len() == 3 && values.iter().all(|v| *v == values[0]) {
            break digests;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not converge: {digests:?}{}",
            log_tails(&nodes)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("converged: {digests:?}");

    for &port in &ports {
        let events = all_events(port, "owner", &chat).await;
        let mut seen = HashMap::new();
        for (k, e) in events.iter().enumerate() {
            assert_eq!(
                e["seq"].as_u64(),
                Some(k as u64 + 1),
                "gapless seqs on {port}"
            );
            if let Some(cmid) = e["cmid"].as_str() {
                assert!(
                    seen.insert(cmid.to_owned(), k as u64 + 1).is_none(),
                    "cmid {cmid} stored twice on {port}"
                );
            }
        }
        for (cmid, seq) in &acked {
            assert_eq!(
                seen.get(cmid),
                Some(seq),
                "acked {cmid} at {seq} on port {port}"
            );
        }
    }
    eprintln!(
        "{} SIGKILL cycles: {} acknowledged sends present on all 3 nodes",
        cycles(),
        acked.len()
    );
    for n in nodes.iter_mut() {
        kill(n);
    }
}
