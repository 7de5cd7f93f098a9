//! Harness for tests of a cluster of the real binary on 127.0.0.1 ports.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{SECRET, token};

/// A port that is free now, below the kernel's ephemeral range (32768–60999 on Linux).
///
/// Binding port 0 and dropping the listener would hand out an ephemeral port, and another
/// process's outgoing connection may take that port before the node binds it (a node of a
/// cluster test once failed to start that way). Ports below the range are only ever taken by
/// an explicit bind; this process walks them from a start derived from its pid, so test
/// binaries do not reuse each other's ports either.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

pub struct Node {
    pub id: u64,
    pub client_port: u16,
    pub peer_port: u16,
    pub dir: std::path::PathBuf,
    pub child: Option<Child>,
}

/// A panicking test must not leave servers running.
impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn peers_flag(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}=127.0.0.1:{}", n.id, n.peer_port))
        .collect::<Vec<_>>()
        .join(",")
}

fn log_path(node: &Node) -> std::path::PathBuf {
    let dir = std::env::var_os("CHATLOG_TEST_LOGS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| node.dir.parent().unwrap().to_path_buf());
    dir.join(format!("node{}.log", node.id))
}

/// What node `node` has logged so far (all its runs).
pub fn log_text(node: &Node) -> String {
    std::fs::read_to_string(log_path(node)).unwrap_or_default()
}

/// Each node's stderr, appended across restarts (kept if `CHATLOG_TEST_LOGS` names a dir).
pub fn log_file(node: &Node) -> Stdio {
    let path = log_path(node);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    Stdio::from(file)
}

/// For a failing test's message: each node's last warnings and errors and its last lines
/// (the logs themselves go with the test's temp directory).
pub fn log_tails(nodes: &[Node]) -> String {
    let mut out = String::new();
    for node in nodes {
        let text = log_text(node);
        let lines: Vec<&str> = text.lines().collect();
        let warnings: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
            .collect();
        out += &format!("\n==== node {}: last warnings and errors ====\n", node.id);
        for l in &warnings[warnings.len().saturating_sub(30)..] {
            out += &format!("{}\n", truncate(l));
        }
        out += &format!("==== node {}: last lines ====\n", node.id);
        for l in &lines[lines.len().saturating_sub(15)..] {
            out += &format!("{}\n", truncate(l));
        }
    }
    out
}

fn truncate(line: &str) -> &str {
    match line.char_indices().nth(600) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

pub fn start(node: &mut Node, peers: &str) {
    start_with(node, peers, &[]);
}

/// [`start`] with more `serve` flags (e.g. `--join`).
pub fn start_with(node: &mut Node, peers: &str, more: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatlog-server"))
        .args(["serve", "--rate-limit", "0"])
        .args(more)
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
    if !line.contains("ws://") {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "node {} did not start: {line:?}{}",
            node.id,
            log_tails(std::slice::from_ref(node))
        );
    }
    node.child = Some(child);
}

pub fn kill(node: &mut Node) {
    if let Some(mut child) = node.child.take() {
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
}

pub async fn get_json(port: u16, path: &str) -> Option<Value> {
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

pub async fn healthy(port: u16) -> bool {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects and says hello; `None` if the node is down.
pub async fn connect(port: u16, user: &str) -> Option<Ws> {
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
    next_frame(&mut ws, |v| v["ev"] == "synced").await?;
    Some(ws)
}

/// The next JSON frame matching `wanted` (others are skipped), or `None` if the connection
/// died or stayed silent for 5 s.
pub async fn next_frame(ws: &mut Ws, wanted: impl Fn(&Value) -> bool) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).ok()?;
            if wanted(&v) {
                return Some(v);
            }
        }
    }
}

/// Sends a request; the reply frame, or `None` if the connection died.
pub async fn call(ws: &mut Ws, id: u64, mut request: Value) -> Option<Value> {
    request["id"] = json!(id);
    ws.send(Message::text(request.to_string())).await.ok()?;
    next_frame(ws, |v| v.get("id") == Some(&json!(id))).await
}

/// Every event of `chat` as `user` sees it on the node at `port`.
pub async fn all_events(port: u16, user: &str, chat: &str) -> Vec<Value> {
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
