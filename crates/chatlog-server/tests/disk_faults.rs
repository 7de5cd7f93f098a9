//! Disk faults under the whole server: the engine's log runs on the fault-injecting
//! [`FaultFs`] (the RocksDB indexes stay on the real disk). For a failing fsync, a short write,
//! a full disk and failing reads: the client gets `unavailable`, the connection and the
//! server stay up (other requests, `/healthz` answer), `/healthz` says 503 and why, and after
//! a restart on what the disk kept through a power loss every acknowledged message is there,
//! at its seq, with its ts and body.

mod common;

use std::sync::Arc;

use chatlog::io::fault::{Crash, FaultFs, Faults};
use chatlog_server::config::ClusterSettings;
use chatlog_server::{ServerConfig, ServerError};
use common::{Client, TestServer};
use serde_json::{Value, json};

/// Messages acknowledged before the fault.
const ACKED: usize = 20;

/// The server's engine log on `fs`, with small segments (the fault file system keeps files in
/// memory) so that a few rollovers happen too.
fn on(fs: &FaultFs) -> impl FnOnce(&mut ServerConfig) + use<> {
    let fs = fs.clone();
    move |c| {
        c.engine.log.file_system = Some(Arc::new(fs));
        c.engine.log.segment_size_bytes = 64 * 1024;
        c.engine.log.entry_size_bytes_max = 16 * 1024;
    }
}

async fn healthz(server: &TestServer) -> (u16, String) {
    let (status, body, _) = common::http(server.addr, "GET", "/healthz", None, &[])
        .await
        .expect("/healthz answers");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An acknowledged send.
#[derive(Debug)]
struct Acked {
    cmid: String,
    body: String,
    seq: u64,
    ts: u64,
}

async fn send_acked(c: &mut Client, chat: &str, cmid: &str) -> Acked {
    let body = format!("body of {cmid} {}", "x".repeat(300));
    let r = c.send_msg(chat, cmid, &body).await;
    Acked {
        cmid: cmid.to_owned(),
        body,
        seq: r["seq"].as_u64().unwrap(),
        ts: r["ts"].as_u64().unwrap(),
    }
}

/// alice, a chat of hers with bob, and [`ACKED`] sends acknowledged in it.
async fn acked_before_the_fault(server: &TestServer) -> (Client, String, Vec<Acked>) {
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&["bob"], "disk").await;
    let mut acked = Vec::new();
    for i in 0..ACKED {
        acked.push(send_acked(&mut alice, &chat, &format!("a{i}")).await);
    }
    (alice, chat, acked)
}

/// Every acknowledged message is in history at its seq with its ts and body; seqs are gapless
/// and no cmid appears twice.
fn check_history(events: &[Value], acked: &[Acked]) {
    let seqs = common::seqs(events);
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "gapless");
    let mut cmids: Vec<&str> = events.iter().filter_map(|e| e["cmid"].as_str()).collect();
    let all = cmids.len();
    cmids.sort();
    cmids.dedup();
    assert_eq!(cmids.len(), all, "a cmid appears twice");
    for a in acked {
        let e = &events[a.seq as usize - 1];
        assert_eq!(e["cmid"], a.cmid.as_str(), "{a:?} vs {e}");
        assert_eq!(e["ts"], a.ts, "{a:?} vs {e}");
        assert_eq!(e["body"], a.body.as_str(), "{a:?} vs {e}");
    }
}

/// Starts a server on a fresh `FaultFs`, acknowledges [`ACKED`] sends, arms `faults`, and
/// checks everything the module doc promises. `reason` must appear in `/healthz`'s body.
async fn write_fault(faults: Faults, reason: &str) {
    let fs = FaultFs::new();
    let server = TestServer::start_with(on(&fs)).await;
    let (mut alice, chat, mut acked) = acked_before_the_fault(&server).await;
    assert_eq!(healthz(&server).await.0, 200);

    fs.set_faults(faults);
    let doomed = alice
        .call(json!({"op": "send", "chat": chat, "cmid": "doomed", "body": "lost?"}))
        .await;
    assert_eq!(doomed["error"]["code"], "unavailable", "{doomed}");
    // Never retried: later writes fail too, while the disk works again.
    fs.set_faults(Faults::default());
    for op in [
        json!({"op": "send", "chat": chat, "cmid": "later", "body": "x"}),
        json!({"op": "read", "chat": chat, "seq": 1}),
        json!({"op": "create_chat", "members": ["bob"]}),
    ] {
        let reply = alice.call(op.clone()).await;
        assert_eq!(reply["error"]["code"], "unavailable", "{op}: {reply}");
    }
    // The connection and the server stay up: reads, pings, other HTTP routes.
    alice.ok(json!({"op": "ping"})).await;
    let h = alice
        .ok(json!({"op": "history", "chat": chat, "limit": 500}))
        .await;
    check_history(h["events"].as_array().unwrap(), &acked);
    let (status, body) = healthz(&server).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("writes are refused") && body.contains(reason),
        "/healthz does not say why: {body:?} (expected {reason:?})"
    );
    let metrics = common::metrics_text(server.addr).await;
    assert!(metrics.contains("chatlog_"), "{metrics}");
    drop(alice);
    let dir = server.stop().await;

    // What a power loss leaves of the log; the indexes are on the real disk.
    let server = TestServer::start_in(dir, on(&fs.crash(Crash::PowerLoss))).await;
    assert_eq!(healthz(&server).await, (200, "ok\n".to_owned()));
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    check_history(&alice.all_events(&chat).await, &acked);
    // The refused send is safe to retry with the same cmid: one event, whatever the disk kept.
    let retried = send_acked(&mut alice, &chat, "doomed").await;
    let again = send_acked(&mut alice, &chat, "doomed").await;
    assert_eq!((retried.seq, retried.ts), (again.seq, again.ts));
    let events = alice.all_events(&chat).await;
    assert_eq!(
        events.iter().filter(|e| e["cmid"] == "doomed").count(),
        1,
        "{events:?}"
    );
    acked.push(send_acked(&mut alice, &chat, "after").await);
    check_history(&alice.all_events(&chat).await, &acked);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_answers_unavailable_and_loses_nothing_acknowledged() {
    let faults = Faults {
        fail_next_sync: true,
        ..Faults::default()
    };
    write_fault(faults, "injected EIO on fdatasync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_write_answers_unavailable_and_loses_nothing_acknowledged() {
    let faults = Faults {
        short_write_bytes: Some(7),
        ..Faults::default()
    };
    write_fault(faults, "injected EIO on write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_unavailable_and_loses_nothing_acknowledged() {
    let faults = Faults {
        // Less than the doomed send's record needs.
        space_left_bytes: Some(10),
        ..Faults::default()
    };
    write_fault(faults, "no space left on device").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_reads_answer_unavailable_and_healthz_says_so_until_they_work_again() {
    let fs = FaultFs::new();
    let server = TestServer::start_with(on(&fs)).await;
    let (mut alice, chat, mut acked) = acked_before_the_fault(&server).await;

    fs.set_faults(Faults {
        fail_reads: true,
        ..Faults::default()
    });
    let h = alice
        .call(json!({"op": "history", "chat": chat, "after": 0}))
        .await;
    assert_eq!(h["error"]["code"], "unavailable", "{h}");
    alice.ok(json!({"op": "ping"})).await;
    let (status, body) = healthz(&server).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("reads fail") && body.contains("injected EIO on read"),
        "{body:?}"
    );
    // Writes do not read the log: they are still acknowledged, durably.
    acked.push(send_acked(&mut alice, &chat, "during").await);

    fs.set_faults(Faults::default());
    assert_eq!(healthz(&server).await, (200, "ok\n".to_owned()));
    check_history(&alice.all_events(&chat).await, &acked);
    drop(alice);
    let dir = server.stop().await;

    let server = TestServer::start_in(dir, on(&fs.crash(Crash::PowerLoss))).await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    check_history(&alice.all_events(&chat).await, &acked);
    server.stop().await;
}

/// A cluster node (one voter here) whose engine fails under it: applying the next entry fails,
/// which stops its Raft core for good. The node then neither writes nor learns of writes, yet
/// would serve stale reads, so the server stops (clients closed with 1001) and `serve` returns
/// an error naming the fault: the binary exits 1 and a supervisor restarts it. Restarted on
/// what the process left on disk, it holds every acknowledged message, the refused one at
/// most once. Without the server's watch on the Raft core it kept running and this test
/// timed out waiting for it to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_whose_raft_core_stops_exits_and_restarts_from_its_disk() {
    let fs = FaultFs::new();
    let peer = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let settings = ClusterSettings {
        node_id: 1,
        peers: [(1, peer.to_string())].into(),
        peer_listen: peer,
        write_timeout_ms: 3000,
        snapshot_every: 100_000,
        join: false,
    };
    let cluster_on = |fs: &FaultFs| {
        let (on, settings) = (on(fs), settings.clone());
        move |c: &mut ServerConfig| {
            on(c);
            c.cluster = Some(settings);
        }
    };
    let server = TestServer::start_with(cluster_on(&fs)).await;
    let (mut alice, chat, mut acked) = acked_before_the_fault(&server).await;

    fs.set_faults(Faults {
        short_write_bytes: Some(7),
        ..Faults::default()
    });
    // Answered `unavailable`, unless the server closes the connection first.
    if let Some(reply) = alice
        .try_call(json!({"op": "send", "chat": chat, "cmid": "doomed", "body": "lost?"}))
        .await
    {
        assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    }
    fs.set_faults(Faults::default());
    let (result, dir) = server.ended().await;
    match result {
        Err(ServerError::Raft(why)) => {
            assert!(why.contains("injected EIO on write"), "{why}")
        }
        other => panic!("the server should stop on the Raft core's failure: {other:?}"),
    }

    let server = TestServer::start_in(dir, cluster_on(&fs.crash(Crash::Process))).await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    check_history(&alice.all_events(&chat).await, &acked);
    // The refused send is safe to retry with its cmid: one event, whether the restart
    // applied it (it was in the Raft log) or the retry wrote it.
    let retried = send_acked(&mut alice, &chat, "doomed").await;
    let events = alice.all_events(&chat).await;
    let doomed: Vec<&Value> = events.iter().filter(|e| e["cmid"] == "doomed").collect();
    assert_eq!(doomed.len(), 1, "{events:?}");
    assert_eq!(doomed[0]["seq"], retried.seq, "{events:?}");
    acked.push(send_acked(&mut alice, &chat, "after").await);
    check_history(&alice.all_events(&chat).await, &acked);
    server.stop().await;
}
