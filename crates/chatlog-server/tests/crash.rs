//! kill -9 of the real server binary during concurrent sends: every acknowledged message is in
//! history after restart at the seq it was acknowledged with, seqs are gapless, and retrying
//! an acknowledged cmid returns the original seq and ts.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Client, SECRET, token};
use serde_json::json;

/// Kill cycles in one run.
const CYCLES: usize = 4;
/// Concurrent sending connections.
const SENDERS: usize = 6;
/// Acknowledged sends to wait for (across senders) before killing.
const ACKS_BEFORE_KILL: usize = 150;

struct Server {
    child: Child,
    url: String,
}

fn start(dir: &std::path::Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatlog-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--rate-limit", "0"])
        .arg("--data-dir")
        .arg(dir)
        .args(["--auth-secret", SECRET])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("server binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    // "chatlog-server listening on ws://127.0.0.1:PORT/v1/ws"
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("ws://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    Server { child, url }
}

#[derive(Debug, Clone, PartialEq)]
struct Ack {
    seq: u64,
    ts: u64,
    body: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sends_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let mut owner = Client::connect(&server.url, &token("owner"), "d", None).await;
    owner.synced().await;
    let users: Vec<String> = (0..SENDERS).map(|i| format!("s{i}")).collect();
    let members: Vec<&str> = users.iter().map(String::as_str).collect();
    let chat = owner.create(&members, "crash").await;
    drop(owner);
    // cmid → what the server acknowledged, across all cycles.
    let acked: Arc<Mutex<BTreeMap<String, Ack>>> = Arc::default();
    for cycle in 0..CYCLES {
        let mut tasks = Vec::new();
        for user in &users {
            let (url, chat, user, acked) = (
                server.url.clone(),
                chat.clone(),
                user.clone(),
                acked.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(&url, &token(&user), "d", None).await;
                for i in 0.. {
                    let cmid = format!("{user}-c{cycle}-{i}");
                    let body = format!("body of {cmid}");
                    let request = json!({"op":"send","chat":chat,"cmid":cmid,"body":body});
                    let reply = match tokio::time::timeout(
                        Duration::from_secs(5),
                        call_raw(&mut c, request),
                    )
                    .await
                    {
                        Ok(Some(r)) => r,
                        _ => return, // killed
                    };
                    let r = &reply["result"];
                    acked.lock().unwrap().insert(
                        cmid,
                        Ack {
                            seq: r["seq"].as_u64().unwrap(),
                            ts: r["ts"].as_u64().unwrap(),
                            body,
                        },
                    );
                }
            }));
        }
        // Let the senders get going, then kill without warning.
        let target = acked.lock().unwrap().len() + ACKS_BEFORE_KILL;
        while acked.lock().unwrap().len() < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        server = start(dir.path());
        let snapshot = acked.lock().unwrap().clone();
        verify(&server.url, &chat, &snapshot).await;
        eprintln!(
            "cycle {cycle}: {} acknowledged sends verified",
            acked.lock().unwrap().len()
        );
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}

/// Sends a request on a connection that may die; `None` if it did.
async fn call_raw(c: &mut Client, mut request: serde_json::Value) -> Option<serde_json::Value> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    request["id"] = json!(1);
    c.ws.send(Message::text(request.to_string())).await.ok()?;
    loop {
        match c.ws.next().await? {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).ok()?;
                if v.get("id") == Some(&json!(1)) {
                    assert!(v.get("result").is_some(), "send failed: {v}");
                    return Some(v);
                }
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

async fn verify(url: &str, chat: &str, acked: &BTreeMap<String, Ack>) {
    let mut c = Client::connect(url, &token("owner"), "verify", None).await;
    c.synced().await;
    // Read the whole chat.
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = c
            .ok(json!({"op":"history","chat":chat,"after":after,"limit":500}))
            .await;
        let batch = page["events"].as_array().unwrap().clone();
        if batch.is_empty() {
            assert_eq!(after, page["last_seq"].as_u64().unwrap());
            break;
        }
        after = batch.last().unwrap()["seq"].as_u64().unwrap();
        events.extend(batch);
    }
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "seqs are gapless");
    let mut by_cmid = BTreeMap::new();
    for e in &events[1..] {
        let cmid = e["cmid"].as_str().unwrap().to_owned();
        assert!(
            by_cmid.insert(cmid.clone(), e.clone()).is_none(),
            "cmid {cmid} appears twice"
        );
    }
    for (cmid, ack) in acked {
        let e = by_cmid
            .get(cmid)
            .unwrap_or_else(|| panic!("acknowledged {cmid} lost"));
        assert_eq!(e["seq"].as_u64().unwrap(), ack.seq, "{cmid}");
        assert_eq!(e["ts"].as_u64().unwrap(), ack.ts, "{cmid}");
        assert_eq!(e["body"].as_str().unwrap(), ack.body, "{cmid}");
    }
    // Retrying acknowledged cmids returns the original seq and ts (a sample per sender).
    let mut retried = 0;
    for (cmid, ack) in acked.iter().rev().take(30) {
        let sender = cmid.split('-').next().unwrap();
        let mut s = Client::connect(url, &token(sender), "retry", None).await;
        let r = s.send_msg(chat, cmid, &ack.body).await;
        assert_eq!(
            (r["seq"].as_u64(), r["ts"].as_u64()),
            (Some(ack.seq), Some(ack.ts))
        );
        retried += 1;
    }
    assert!(retried > 0);
    let h = c.ok(json!({"op":"history","chat":chat,"limit":1})).await;
    assert_eq!(
        h["last_seq"].as_u64().unwrap(),
        seqs.len() as u64,
        "retries appended nothing"
    );
}

/// SIGTERM: the binary closes clients with 1001, answers what it accepted, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let mut c = Client::connect(&server.url, &token("alice"), "d", None).await;
    c.synced().await;
    let chat = c.create(&["bob"], "t").await;
    let sent = c.send_msg(&chat, "m1", "before stop").await;
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = loop {
        match c.recv_or_close().await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(1001));
    let exit = tokio::task::spawn_blocking(move || server.child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    let mut server = start(dir.path());
    let mut c = Client::connect(&server.url, &token("alice"), "d2", None).await;
    let again = c.send_msg(&chat, "m1", "before stop").await;
    assert_eq!(
        again, sent,
        "acknowledged before SIGTERM, still there after"
    );
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}
