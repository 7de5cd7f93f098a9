//! A 3-node cluster of the real binary on 127.0.0.1: presence is cluster-wide (a watcher on
//! one node sees a user connect to, leave, and die with another node), a minority node
//! answers writes with `unavailable` and `/healthz` 503, and membership changes through the
//! `cluster` subcommand (add a learner, promote it, remove a node) keep every node serving.

mod cluster_common;
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use cluster_common::*;
use common::hook::{Answer, Hook};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn nodes(dir: &std::path::Path, n: u64) -> Vec<Node> {
    (1..=n)
        .map(|id| Node {
            id,
            client_port: free_port(),
            peer_port: free_port(),
            dir: dir.join(format!("n{id}")),
            child: None,
        })
        .collect()
}

async fn wait_healthy(nodes: &[Node]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in nodes {
        while !healthy(n.client_port).await {
            assert!(
                Instant::now() < deadline,
                "node {} never became healthy",
                n.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Held by each test for its whole run: the tests of this file run one at a time. Each
/// starts three server processes, and six clusters at once on a 2-core machine starve
/// elections and heartbeats.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[path = "../../chatlog/tests/support/fs.rs"]
mod fs;
use fs::copy_dir;

/// A 3-node cluster under `dir`, started and healthy; its nodes and `--peers` flag.
async fn start_cluster(dir: &std::path::Path) -> (Vec<Node>, String) {
    let mut nodes = nodes(dir, 3);
    let peers = peers_flag(&nodes);
    for n in nodes.iter_mut() {
        start(n, &peers);
    }
    wait_healthy(&nodes).await;
    (nodes, peers)
}

/// The next `presence` push for `user`, within `within`.
async fn presence_push(ws: &mut Ws, user: &str, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).ok()?;
            if v["ev"] == "presence" && v["user"] == user {
                return Some(v);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_cluster_wide() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, _) = start_cluster(dir.path()).await;
    let mut bob = connect(nodes[1].client_port, "bob").await.unwrap();
    let reply = call(
        &mut bob,
        1,
        json!({"op":"subscribe_presence","users":["alice"]}),
    )
    .await
    .unwrap();
    assert!(reply.get("result").is_some(), "{reply}");

    // alice connects to node 1: bob, on node 2, sees her online.
    let started = Instant::now();
    let alice = connect(nodes[0].client_port, "alice").await.unwrap();
    let online = presence_push(&mut bob, "alice", Duration::from_secs(5))
        .await
        .expect("online push across nodes");
    assert_eq!(online["online"], true, "{online}");
    eprintln!("online seen on another node after {:?}", started.elapsed());
    // A query on node 3 agrees.
    let mut carol = connect(nodes[2].client_port, "carol").await.unwrap();
    let states = call(&mut carol, 1, json!({"op":"presence","users":["alice"]}))
        .await
        .unwrap();
    assert_eq!(states["result"]["presence"][0]["online"], true, "{states}");

    // alice leaves: offline across nodes.
    let started = Instant::now();
    drop(alice);
    let offline = presence_push(&mut bob, "alice", Duration::from_secs(5))
        .await
        .expect("offline push across nodes");
    assert_eq!(offline["online"], false, "{offline}");
    assert!(offline["last_seen"].as_u64().is_some(), "{offline}");
    eprintln!("offline seen on another node after {:?}", started.elapsed());

    // alice's node dies with her connected: she goes offline everywhere when its reports stop.
    let _alice = connect(nodes[0].client_port, "alice").await.unwrap();
    let online = presence_push(&mut bob, "alice", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(online["online"], true);
    let started = Instant::now();
    kill(&mut nodes[0]);
    let offline = presence_push(&mut bob, "alice", Duration::from_secs(5))
        .await
        .expect("offline after her node died");
    assert_eq!(offline["online"], false, "{offline}");
    eprintln!(
        "offline after node death seen after {:?}",
        started.elapsed()
    );
    for n in nodes.iter_mut() {
        kill(n);
    }
}

/// A single-node server on `node.dir`.
fn start_single(node: &mut Node) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatlog-server"))
        .args([
            "serve",
            "--rate-limit",
            "0",
            "--auth-secret",
            common::SECRET,
        ])
        .args(["--listen", &format!("127.0.0.1:{}", node.client_port)])
        .arg("--data-dir")
        .arg(&node.dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("ws://"), "{line}");
    node.child = Some(child);
}

fn admin(node_peer_port: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog-server"))
        .args(["cluster", "--node", &format!("127.0.0.1:{node_peer_port}")])
        .args(args)
        .output()
        .expect("cluster subcommand runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Sends through the node at `port`; the reply, or `{"error":{"code":"disconnected"}}` if
/// the connection failed (node down or restarting).
async fn send(port: u16, chat: &str, cmid: &str) -> Value {
    let disconnected = json!({"error": {"code": "disconnected"}});
    let Some(mut ws) = connect(port, "owner").await else {
        return disconnected;
    };
    call(
        &mut ws,
        1,
        json!({"op":"send","chat":chat,"cmid":cmid,"body":cmid}),
    )
    .await
    .unwrap_or(disconnected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_refuses_and_membership_changes_through_the_cli() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut all = nodes(dir.path(), 4);
    let first3 = peers_flag(&all[..3]);
    for n in all[..3].iter_mut() {
        start(n, &first3);
    }
    wait_healthy(&all[..3]).await;
    let chat = {
        let mut ws = connect(all[0].client_port, "owner").await.unwrap();
        let r = call(&mut ws, 1, json!({"op":"create_chat","members":["bob"]}))
            .await
            .unwrap();
        r["result"]["chat"].as_str().unwrap().to_owned()
    };
    for (k, node) in all[..3].iter().enumerate() {
        let reply = send(node.client_port, &chat, &format!("m0-{k}")).await;
        assert!(reply.get("result").is_some(), "{reply}");
    }
    // Every replicated-write stage docs/protocol.md lists is at /metrics, on some node (a
    // write went through each, so through the leader and through followers; a snapshot on
    // node 1 records the snapshot stages).
    let (ok, out) = admin(all[0].peer_port, &["snapshot"]);
    assert!(ok, "snapshot: {out}");
    let documented: Vec<String> = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md"),
    )
    .unwrap()
    .lines()
    .filter_map(|l| l.strip_prefix("| `chatlog_raft_"))
    .filter_map(|rest| rest.split(['`', '{']).next())
    .map(|name| format!("chatlog_raft_{name}"))
    .collect();
    assert!(documented.len() >= 14, "{documented:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut text = String::new();
        for node in &all[..3] {
            text += &common::metrics_text(([127, 0, 0, 1], node.client_port).into()).await;
        }
        let missing: Vec<&String> = documented
            .iter()
            .filter(|name| !text.lines().any(|l| l.starts_with(name.as_str())))
            .collect();
        // The state gauges agree: one leader, known to all three, and the leader reports
        // its two followers' lag.
        let leaders = text
            .lines()
            .filter(|l| *l == "chatlog_raft_is_leader 1")
            .count();
        let lags = text
            .lines()
            .filter(|l| l.starts_with("chatlog_raft_replication_lag_entries{peer="))
            .count();
        if missing.is_empty() && leaders == 1 && lags == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "documented but not at /metrics: {missing:?}; {leaders} leaders, {lags} lags"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        send(all[1].client_port, &chat, "m1")
            .await
            .get("result")
            .is_some()
    );

    // Node 4 joins: started with --join, added as a learner, then promoted.
    let with4 = peers_flag(&all);
    {
        let n4 = &mut all[3];
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatlog-server"));
        child
            .args(["serve", "--rate-limit", "0", "--join"])
            .args(["--listen", &format!("127.0.0.1:{}", n4.client_port)])
            .args(["--node-id", "4", "--peers", &with4])
            .args(["--auth-secret", common::SECRET])
            .arg("--data-dir")
            .arg(&n4.dir)
            .stdout(std::process::Stdio::null())
            .stderr(log_file(n4));
        n4.child = Some(child.spawn().unwrap());
    }
    let addr4 = format!("127.0.0.1:{}", all[3].peer_port);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Through node 2: the CLI follows "not leader" to the leader.
        let (ok, out) = admin(
            all[1].peer_port,
            &["add-learner", "--id", "4", "--addr", &addr4],
        );
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "add-learner failed: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out) = admin(all[0].peer_port, &["set-voters", "--voters", "1,2,3,4"]);
    assert!(ok, "set-voters: {out}");
    let (ok, status) = admin(all[3].peer_port, &["status"]);
    assert!(ok, "{status}");
    // Node 4 serves the chat's history (caught up from the leader).
    let deadline = Instant::now() + Duration::from_secs(20);
    while all_events(all[3].client_port, "owner", &chat).await.len() < 2 {
        assert!(Instant::now() < deadline, "node 4 did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        send(all[3].client_port, &chat, "m2")
            .await
            .get("result")
            .is_some()
    );

    // Backup: a snapshot on node 2, restored as the data of a single-node server.
    let (ok, out) = admin(all[1].peer_port, &["snapshot"]);
    assert!(ok, "snapshot: {out}");
    let restored = dir.path().join("restored");
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog-server"))
        .args(["restore", "--snapshot"])
        .arg(all[1].dir.join("cluster/sm/snapshot.data"))
        .arg("--data-dir")
        .arg(&restored)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut single = Node {
        id: 9,
        client_port: free_port(),
        peer_port: 0,
        dir: restored,
        child: None,
    };
    start_single(&mut single);
    let events = all_events(single.client_port, "owner", &chat).await;
    let cmids: Vec<&str> = events.iter().filter_map(|e| e["cmid"].as_str()).collect();
    assert_eq!(
        cmids,
        ["m0-0", "m0-1", "m0-2", "m1", "m2"],
        "restored history"
    );
    kill(&mut single);

    // Remove node 1, then stop it: the other three go on.
    let (ok, out) = admin(all[1].peer_port, &["remove", "--ids", "1"]);
    assert!(ok, "remove: {out}");
    kill(&mut all[0]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = send(all[2].client_port, &chat, "m3").await;
        if r.get("result").is_some() {
            break;
        }
        assert_eq!(r["error"]["code"], "unavailable", "{r}");
        assert!(
            Instant::now() < deadline,
            "no writes after removing node 1: {r}"
        );
    }

    // Stop two of the three voters: the last one is a minority and refuses writes in bounded
    // time, and says so on /healthz once it has no leader.
    kill(&mut all[1]);
    kill(&mut all[3]);
    let started = Instant::now();
    let r = send(all[2].client_port, &chat, "m4").await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    eprintln!(
        "minority answered unavailable after {:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while healthy(all[2].client_port).await {
        assert!(
            Instant::now() < deadline,
            "a lone node still reports healthy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Reads are local: history still answers.
    let events = all_events(all[2].client_port, "owner", &chat).await;
    assert!(events.len() >= 4, "{events:?}");
    for n in all.iter_mut() {
        kill(n);
    }
}

/// `POST /v1/files` on the node at `port` as `user`: (status, JSON body or null).
async fn upload(port: u16, user: &str, bytes: &[u8]) -> (u16, Value) {
    let bearer = format!("Bearer {}", common::token(user));
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/octet-stream"),
    ];
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (status, body, _) = common::http_with(
        addr,
        "POST",
        "/v1/files",
        &headers,
        common::Body::Sized(bytes),
    )
    .await
    .expect("upload answered");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// `GET /v1/files/{id}` on the node at `port` as `user`: (status, bytes).
async fn download(port: u16, user: &str, id: &str) -> (u16, Vec<u8>) {
    let bearer = format!("Bearer {}", common::token(user));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (status, body, _) = common::http_with(
        addr,
        "GET",
        &format!("/v1/files/{id}"),
        &[("Authorization", bearer.as_str())],
        common::Body::Sized(&[]),
    )
    .await
    .expect("download answered");
    (status, body)
}

/// A file uploaded through one node is downloadable through every node, also once the node
/// it was uploaded to is dead, and on a node that was down during the upload (it copies the
/// bytes from a peer when it applies the upload); an upload that cannot reach a majority is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_served_by_every_node_and_outlive_the_node_they_were_uploaded_to() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, peers) = start_cluster(dir.path()).await;
    // Node 3 misses the upload.
    kill(&mut nodes[2]);
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (status, up) = upload(nodes[0].client_port, "alice", &bytes).await;
    assert_eq!(status, 201, "{up}");
    let id = up["file"].as_str().unwrap().to_owned();
    let mut alice = connect(nodes[0].client_port, "alice").await.unwrap();
    let chat = call(&mut alice, 1, json!({"op":"create_chat","members":["bob"]}))
        .await
        .unwrap()["result"]["chat"]
        .as_str()
        .unwrap()
        .to_owned();
    let sent = call(
        &mut alice,
        2,
        json!({"op":"send","chat":chat,"cmid":"f1","file":id}),
    )
    .await
    .unwrap();
    assert!(sent.get("result").is_some(), "{sent}");
    drop(alice);

    // The uploader's node dies; node 3 comes back, and copies the file from node 2 by itself
    // as it applies the upload (nobody downloads it there).
    kill(&mut nodes[0]);
    start(&mut nodes[2], &peers);
    wait_healthy(&nodes[1..]).await;
    let sha = up["sha256"].as_str().unwrap();
    let copy = nodes[2].dir.join("files").join(&sha[..2]).join(sha);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !copy.exists() {
        assert!(Instant::now() < deadline, "node 3 never copied the file");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in &nodes[1..] {
        // Reads are local: node 3 answers 404 until it has applied the upload's entries.
        let deadline = Instant::now() + Duration::from_secs(20);
        let (status, got) = loop {
            let (status, got) = download(n.client_port, "bob", &id).await;
            if status != 404 || Instant::now() > deadline {
                break (status, got);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            status,
            200,
            "node {}: {}",
            n.id,
            String::from_utf8_lossy(&got)
        );
        assert!(got == bytes, "node {}: the bytes differ", n.id);
    }

    // Node 3 alone holds no majority: it still serves the file from its own copy, and an
    // upload there is refused, not acknowledged.
    kill(&mut nodes[1]);
    let (status, got) = download(nodes[2].client_port, "bob", &id).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    assert!(got == bytes, "node 3 alone: the bytes differ");
    let (status, refused) = upload(nodes[2].client_port, "alice", b"lonely").await;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    for n in nodes.iter_mut() {
        kill(n);
    }
}

/// Operator mistakes are refused and named: re-adding a voter's id, promoting or removing a
/// node that is not in the cluster, a learner at an address where nothing listens (it is
/// reported, and cannot be promoted), `--join` without the cluster flags, and a cluster node
/// started on a single server's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_and_start_up_mistakes_are_refused_and_named() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, _) = start_cluster(dir.path()).await;
    let port = nodes[0].peer_port;
    let spare = format!("127.0.0.1:{}", free_port());

    let (ok, out) = admin(port, &["add-learner", "--id", "2", "--addr", &spare]);
    assert!(!ok && out.contains("node 2 is already a voter"), "{out}");
    let (ok, out) = admin(port, &["set-voters", "--voters", "1,2,3,9"]);
    assert!(!ok && out.contains("not in the cluster: node 9"), "{out}");
    let (ok, out) = admin(port, &["remove", "--ids", "7"]);
    assert!(!ok && out.contains("not in the cluster: node 7"), "{out}");
    let (ok, out) = admin(port, &["remove"]);
    assert!(!ok && out.contains("--ids"), "{out}");

    // Nothing listens at the learner's address: reported, and it cannot be promoted.
    let (ok, out) = admin(
        port,
        &[
            "add-learner",
            "--id",
            "6",
            "--addr",
            &spare,
            "--wait-secs",
            "2",
        ],
    );
    assert!(!ok && out.contains("received nothing for 2 s"), "{out}");
    let (ok, out) = admin(port, &["set-voters", "--voters", "1,2,3,6"]);
    assert!(!ok && out.contains("node 6 has not caught up"), "{out}");
    let (ok, out) = admin(port, &["remove", "--ids", "6"]);
    assert!(ok, "{out}");
    let reply = send(nodes[1].client_port, "nochat", "m").await;
    assert_eq!(
        reply["error"]["code"], "not_found",
        "the cluster still serves: {reply}"
    );

    let serve = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_chatlog-server"))
            .arg("serve")
            .args(["--auth-secret", common::SECRET])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let join_dir = dir.path().join("join");
    let (code, err) = serve(&["--join", "--data-dir", join_dir.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--join") && err.contains("--node-id"), "{err}");

    for n in nodes.iter_mut() {
        kill(n);
    }
    // A node's data directory is that node's: under another id it is refused.
    let swapped = format!("1=127.0.0.1:{},2=127.0.0.1:{}", free_port(), free_port());
    let (code, err) = serve(&[
        "--node-id",
        "2",
        "--peers",
        &swapped,
        "--data-dir",
        nodes[0].dir.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("holds node 1's data, not node 2's"), "{err}");

    // A single server's data directory is not silently ignored by a cluster node.
    let single = dir.path().join("single");
    std::fs::create_dir_all(single.join("engine")).unwrap();
    std::fs::write(single.join("engine").join("x"), b"x").unwrap();
    let lone_peers = format!("1=127.0.0.1:{}", free_port());
    let (code, err) = serve(&[
        "--node-id",
        "1",
        "--peers",
        &lone_peers,
        "--data-dir",
        single.to_str().unwrap(),
    ]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("holds a single server's chats"), "{err}");
}

/// A whole cluster restored from a backup (`cluster snapshot`, then `restore --node-id` on
/// new data directories, with the backup's ids and addresses, for two nodes; the third starts
/// empty with `--join`): every node
/// serves the backup's chats and nothing written after it, dedup still knows the backup's
/// cmids, and the cluster takes writes again, with the same state on every node; a file whose
/// bytes were restored on one node only is copied to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_restored_from_a_backup_serves_it_and_takes_writes() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, peers) = start_cluster(dir.path()).await;
    // A later term than the first: the backup's entries carry it (the restored nodes start
    // with no vote of their own, and must still elect a leader after it).
    for n in nodes.iter_mut() {
        kill(n);
    }
    for n in nodes.iter_mut() {
        start(n, &peers);
    }
    wait_healthy(&nodes).await;
    let chat = {
        let mut ws = connect(nodes[0].client_port, "owner").await.unwrap();
        let r = call(&mut ws, 1, json!({"op":"create_chat","members":["bob"]}))
            .await
            .unwrap();
        r["result"]["chat"].as_str().unwrap().to_owned()
    };
    for k in 0..6 {
        let reply = send(nodes[k % 3].client_port, &chat, &format!("m{k}")).await;
        assert!(reply.get("result").is_some(), "{reply}");
    }
    let (status, up) = upload(nodes[0].client_port, "owner", b"an attachment").await;
    assert_eq!(status, 201, "{up}");
    let sha = up["sha256"].as_str().unwrap().to_owned();
    let files = dir.path().join("files-backup");
    copy_dir(&nodes[0].dir.join("files"), &files);
    let (ok, out) = admin(nodes[1].peer_port, &["snapshot"]);
    assert!(ok, "snapshot: {out}");
    let backup = dir.path().join("backup");
    std::fs::create_dir_all(&backup).unwrap();
    for file in ["snapshot.data", "snapshot.meta"] {
        std::fs::copy(
            nodes[1].dir.join("cluster/sm").join(file),
            backup.join(file),
        )
        .unwrap();
    }
    let reply = send(nodes[2].client_port, &chat, "after-backup").await;
    assert!(reply.get("result").is_some(), "{reply}");
    for n in nodes.iter_mut() {
        kill(n);
    }

    // A node id outside the backup's cluster is refused, naming its members.
    let restore = |id: u64, data: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_chatlog-server"))
            .args(["restore", "--node-id", &id.to_string(), "--snapshot"])
            .arg(backup.join("snapshot.data"))
            .arg("--data-dir")
            .arg(data)
            .output()
            .unwrap()
    };
    let out = restore(7, &dir.path().join("r7"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("node 7 is not in the backup's cluster"),
        "{err}"
    );
    assert!(!dir.path().join("r7/cluster").exists());

    // Nodes 1 and 2 restored; node 3 starts empty with --join and gets the backup from the
    // leader as a snapshot (its Raft log starts after the backup). The files' backup goes to
    // node 1 only: the others copy the file from it (neither applies its upload).
    for n in nodes.iter_mut() {
        n.dir = dir.path().join(format!("restored{}", n.id));
        if n.id == 3 {
            start_with(n, &peers, &["--join"]);
            continue;
        }
        let out = restore(n.id, &n.dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if n.id == 1 {
            copy_dir(&files, &n.dir.join("files"));
        }
        start(n, &peers);
    }
    wait_healthy(&nodes).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &nodes {
        let copy = n.dir.join("files").join(&sha[..2]).join(&sha);
        while !copy.exists() {
            assert!(
                Instant::now() < deadline,
                "node {} never copied the file",
                n.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for n in &nodes {
        let events = all_events(n.client_port, "owner", &chat).await;
        let cmids: Vec<&str> = events.iter().filter_map(|e| e["cmid"].as_str()).collect();
        assert_eq!(cmids, ["m0", "m1", "m2", "m3", "m4", "m5"], "node {}", n.id);
    }
    // Dedup came along; new writes follow without a gap, on every node.
    let again = send(nodes[2].client_port, &chat, "m3").await;
    assert_eq!(again["result"]["seq"], 5, "{again}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let next = loop {
        let r = send(nodes[0].client_port, &chat, "after-restore").await;
        if r.get("result").is_some() || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(next["result"]["seq"], 8, "{next}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let digests: Vec<String> = nodes
            .iter()
            .map(|n| admin(n.peer_port, &["digest"]).1)
            .collect();
        if digests.iter().all(|d| *d == digests[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "replicas differ: {digests:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for n in nodes.iter_mut() {
        kill(n);
    }
}

/// A device that acknowledged events through one node and reconnects to a node that has just
/// restarted (and has not applied them yet) resumes exactly after its cursor there: nothing
/// it acknowledged comes again, nothing after it is missing (the lagging node does not take
/// it for a new device), and its chat is there at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moving_to_a_restarted_node_resumes_exactly_after_its_cursor() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, peers) = start_cluster(dir.path()).await;
    kill(&mut nodes[2]);
    let mut owner = connect(nodes[0].client_port, "owner").await.unwrap();
    let chat = create_chat_retrying(&mut owner).await;
    // bob's device is known from the start: it starts at the chat's beginning.
    let mut bob = connect(nodes[0].client_port, "bob").await.unwrap();
    let mut last = 0;
    for k in 0..300u64 {
        let r = call(
            &mut owner,
            10 + k,
            json!({"op":"send","chat":chat,"cmid":format!("m{k}"),"body":"x"}),
        )
        .await
        .unwrap();
        last = r["result"]["seq"].as_u64().unwrap_or_else(|| panic!("{r}"));
    }
    // bob acknowledged half of them.
    let acked = last / 2;
    let r = call(
        &mut bob,
        1,
        json!({"op":"delivered","chat":chat,"seq":acked}),
    )
    .await
    .unwrap();
    assert!(r.get("result").is_some(), "{r}");
    drop(bob);

    // Node 3 comes back, behind by 301 events: bob's device moves there as soon as it
    // reports healthy (it knows the leader; the leader may not have sent it the log yet).
    start(&mut nodes[2], &peers);
    while !healthy(nodes[2].client_port).await {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let url = format!("ws://127.0.0.1:{}/v1/ws", nodes[2].client_port);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = json!({"op":"hello","token":common::token("bob"),"device":"d"});
    futures_util::SinkExt::send(&mut ws, Message::text(hello.to_string()))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut synced = false;
    let quiet = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(quiet);
    // Until `synced`, and one second after it: exactly the events after bob's cursor.
    let mut after_synced = None;
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            () = &mut quiet => break,
            () = async {
                match after_synced {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => break,
        };
        let Some(Ok(Message::Text(t))) = msg else {
            break;
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        if v["ev"] == "event" && v["event"]["chat"] == chat.as_str() {
            got.push(v["event"]["seq"].as_u64().unwrap());
        }
        if v["ev"] == "synced" {
            synced = true;
            after_synced = Some(tokio::time::Instant::now() + Duration::from_secs(1));
        }
    }
    assert!(synced, "no synced");
    let expected: Vec<u64> = (acked + 1..=last).collect();
    assert!(
        got == expected,
        "after cursor {acked} of {last}: got {} events, from {:?} to {:?}",
        got.len(),
        got.first(),
        got.last()
    );
    let r = call(&mut ws, 2, json!({"op":"history","chat":chat,"limit":1}))
        .await
        .unwrap();
    assert_eq!(r["result"]["last_seq"], last, "{r}");
    for n in nodes.iter_mut() {
        kill(n);
    }
}

/// Waits until every node sees `user` online (or offline).
async fn presence_everywhere(watchers: &mut [Ws], user: &str, online: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for ws in watchers.iter_mut() {
        loop {
            let states = call(ws, 99, json!({"op":"presence","users":[user]}))
                .await
                .unwrap();
            if states["result"]["presence"][0]["online"] == online {
                break;
            }
            assert!(Instant::now() < deadline, "{user} never online={online}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// In a cluster one node (the leader) posts to the push webhook, once per message for an
/// offline member, and `count` includes the messages the member got while connected to
/// another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_posts_the_push_webhook_counting_messages_received_on_any_node() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut hook = Hook::start(Answer::Status(200)).await;
    let url = hook.url();
    let mut nodes = nodes(dir.path(), 3);
    let peers = peers_flag(&nodes);
    for n in nodes.iter_mut() {
        start_with(
            n,
            &peers,
            &["--push-webhook", &url, "--push-interval-ms", "500"],
        );
    }
    wait_healthy(&nodes).await;

    let mut alice = connect(nodes[0].client_port, "alice").await.unwrap();
    let created = call(
        &mut alice,
        1,
        json!({"op":"create_chat","members":["bob"],"title":"t"}),
    )
    .await
    .unwrap();
    let chat = created["result"]["chat"].as_str().unwrap().to_owned();
    let say = async |alice: &mut Ws, cmid: &str| {
        let reply = call(
            alice,
            2,
            json!({"op":"send","chat":chat,"cmid":cmid,"body":cmid}),
        )
        .await
        .unwrap();
        reply["result"]["seq"].as_u64().expect("sent")
    };
    let m1 = say(&mut alice, "m1").await;
    assert_eq!(
        hook.next().await.body,
        json!({"user":"bob","chat":chat,"seq":m1,"sender":"alice","count":1})
    );

    // Past the interval, so that a message counted as offline would be posted at once.
    tokio::time::sleep(Duration::from_millis(700)).await;
    // bob connects and gets m2 and m3.
    let mut watchers = Vec::new();
    for n in &nodes {
        watchers.push(connect(n.client_port, "watcher").await.unwrap());
    }
    // bob connects to a follower: the leader, which posts, sees him only through presence.
    let leader = leader_seen_by(nodes[0].client_port)
        .await
        .unwrap_or_else(|health| panic!("no leader in {health:?}"));
    let follower = nodes.iter().find(|n| n.id != leader).unwrap();
    let mut bob = connect(follower.client_port, "bob").await.unwrap();
    // Another device of alice's on the leader: once it has m3, the leader's fanout (which
    // counts for the webhook before it wakes any connection) has handled m2 and m3.
    let on_leader = nodes.iter().find(|n| n.id == leader).unwrap().client_port;
    let mut alice_on_leader = connect(on_leader, "alice").await.unwrap();
    presence_everywhere(&mut watchers, "bob", true).await;
    say(&mut alice, "m2").await;
    let m3 = say(&mut alice, "m3").await;
    let is_m3 = |v: &Value| v["ev"] == "event" && v["event"]["seq"] == m3;
    for ws in [&mut alice_on_leader, &mut bob] {
        next_frame(ws, is_m3).await.expect("m3 pushed");
    }

    // bob leaves; once every node knows, m4 makes a post counting m2, m3 and m4.
    drop(bob);
    presence_everywhere(&mut watchers, "bob", false).await;
    let m4 = say(&mut alice, "m4").await;
    assert_eq!(
        hook.next().await.body,
        json!({"user":"bob","chat":chat,"seq":m4,"sender":"alice","count":3})
    );
    // No other node posted, for either message.
    let more = hook.drain(Duration::from_millis(1500)).await;
    assert!(more.is_empty(), "more posts: {more:?}");
    for n in nodes.iter_mut() {
        kill(n);
    }
}

/// A chat of `owner`'s connection and bob, asked again until the cluster takes it (it may
/// still be electing, or missing a node).
async fn create_chat_retrying(owner: &mut Ws) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = call(owner, 1, json!({"op":"create_chat","members":["bob"]}))
            .await
            .unwrap();
        if let Some(chat) = r["result"]["chat"].as_str() {
            return chat.to_owned();
        }
        assert!(Instant::now() < deadline, "{r}");
    }
}

/// The leader node `port`'s `/healthz` names, or the whole answer if it names none.
async fn leader_seen_by(port: u16) -> Result<u64, String> {
    let addr = ([127, 0, 0, 1], port).into();
    let (_, health, _) = common::http(addr, "GET", "/healthz", None, &[])
        .await
        .ok_or_else(|| format!("no answer from /healthz on port {port}"))?;
    let health = String::from_utf8_lossy(&health).into_owned();
    health
        .split_whitespace()
        .skip_while(|w| *w != "leader")
        .nth(1)
        .and_then(|l| l.parse().ok())
        .ok_or(health)
}

/// SIGTERM to the leader (a rolling restart): before it stops it hands its role to another
/// node (its log names which), that node leads, the stopped node exits 0, and writes through
/// the other nodes go on; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_its_role_over_first() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, _) = start_cluster(dir.path()).await;
    let mut owner = connect(nodes[0].client_port, "owner").await.unwrap();
    let chat = create_chat_retrying(&mut owner).await;
    drop(owner);
    let mut acked = Vec::new();
    for k in 0..20 {
        let r = send(nodes[k % 3].client_port, &chat, &format!("m{k}")).await;
        acked.push(r["result"]["seq"].as_u64().unwrap_or_else(|| panic!("{r}")));
    }
    let leader = leader_seen_by(nodes[0].client_port).await.unwrap();
    let stopping = nodes.iter_mut().find(|n| n.id == leader).unwrap();
    let mut child = stopping.child.take().unwrap();
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "node {leader} exited with {status}");
    let log = log_text(stopping);
    let handed: u64 = log
        .lines()
        .find_map(|l| l.split("leadership handed off before stopping to=").nth(1))
        .and_then(|to| to.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "node {leader} stopped without a hand-off{}",
                log_tails(&nodes)
            )
        });
    assert_ne!(handed, leader);
    let survivor = nodes.iter().find(|n| n.id != leader).unwrap().client_port;
    assert_eq!(leader_seen_by(survivor).await, Ok(handed));
    for k in 20..30 {
        let r = send(nodes[k % 3].client_port, &chat, &format!("m{k}")).await;
        if nodes[k % 3].id == leader {
            assert_eq!(r["error"]["code"], "disconnected", "{r}");
        } else {
            acked.push(r["result"]["seq"].as_u64().unwrap_or_else(|| panic!("{r}")));
        }
    }
    let events = all_events(survivor, "owner", &chat).await;
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    for seq in &acked {
        assert!(
            seqs.contains(seq),
            "acknowledged seq {seq} missing from {seqs:?}"
        );
    }
    for n in nodes.iter_mut() {
        kill(n);
    }
}
