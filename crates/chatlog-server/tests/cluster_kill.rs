//! A 3-node cluster of the real binary on 127.0.0.1 ports: a random node is SIGKILLed every
//! few seconds (and restarted) while clients send through every node, for `CYCLES` cycles.
//! Afterwards every node has converged to the same state (digest of every chat's events and
//! indexes), and on every node every acknowledged message is in history at the seq it was
//! acknowledged with, seqs are gapless and no cmid is stored twice.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{SECRET, token};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Kill cycles (the issue asks for at least 10).
const CYCLES: usize = 10;
/// Concurrent sending clients.
const SENDERS: usize = 6;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    id: u64,
    client_port: u16,
    peer_port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

fn peers_flag(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}=127.0.0.1:{}", n.id, n.peer_port))
        .collect::<Vec<_>>()
        .join(",")
}

/// Each node's stderr, appended across restarts (kept if `CHATLOG_TEST_LOGS` names a dir).
fn log_file(node: &Node) -> Stdio {
    let dir = std::env::var_os("CHATLOG_TEST_LOGS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| node.dir.parent().unwrap().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("node{}.log", node.id)))
        .unwrap();
    Stdio::from(file)
}

fn start(node: &mut Node, peers: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatlog-server"))
        .args(["serve", "--rate-limit", "0"])
        .args(["--listen", &format!("127.0.0.1:{}", node.client_port)])
        .args(["--node-id", &node.id.to_string(), "--peers", peers])
        .args(["--auth-secret", SECRET, "--write-timeout-ms", "2000"])
        .args(["--snapshot-every", "300"])
        .arg("--data-dir")
        .arg(&node.dir)
        .stdout(Stdio::piped())
        .stderr(log_file(node))
        .spawn()
        .expect("server binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(
        line.contains("ws://"),
        "node {} did not start: {line:?}",
        node.id
    );
    node.child = Some(child);
}

fn kill(node: &mut Node) {
    if let Some(mut child) = node.child.take() {
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
}

async fn get_json(port: u16, path: &str) -> Option<Value> {
    let resp = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    serde_json::from_str(&resp.text().await.ok()?).ok()
}

async fn healthy(port: u16) -> bool {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects and says hello; `None` if the node is down.
async fn connect(port: u16, user: &str) -> Option<Ws> {
    let url = format!("ws://127.0.0.1:{port}/v1/ws");
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(3),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .ok()?
    .ok()?;
    let hello = json!({"op":"hello","token":token(user),"device":"d"});
    ws.send(Message::text(hello.to_string())).await.ok()?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).ok()?;
            if v["ev"] == "synced" {
                return Some(ws);
            }
        }
    }
}

/// Sends a request; the reply frame, or `None` if the connection died.
async fn call(ws: &mut Ws, id: u64, mut request: Value) -> Option<Value> {
    request["id"] = json!(id);
    ws.send(Message::text(request.to_string())).await.ok()?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).ok()?;
            if v.get("id") == Some(&json!(id)) {
                return Some(v);
            }
        }
    }
}

/// Every event of `chat` as `user` sees it on the node at `port`.
async fn all_events(port: u16, user: &str, chat: &str) -> Vec<Value> {
    let mut ws = connect(port, user).await.expect("node is up");
    let mut out = Vec::new();
    let mut after = 0;
    for id in 1.. {
        let reply = call(
            &mut ws,
            id,
            json!({"op":"history","chat":chat,"after":after,"limit":500}),
        )
        .await
        .expect("history answered");
        let events = reply["result"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if events.is_empty() {
            break;
        }
        after = events.last().unwrap()["seq"].as_u64().unwrap();
        out.extend(events);
    }
    out
}

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
    for cycle in 0..CYCLES {
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
            "nodes did not converge: {digests:?}"
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
        "{CYCLES} SIGKILL cycles: {} acknowledged sends present on all 3 nodes",
        acked.len()
    );
    for n in nodes.iter_mut() {
        kill(n);
    }
}
