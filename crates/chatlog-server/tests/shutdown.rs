//! Graceful shutdown (PROTOCOL.md "Running": stop accepting, finish in-flight writes, close
//! clients with 1001) and durability of every acknowledged send across a restart.

mod common;

use std::collections::{HashMap, HashSet};

use common::{Client, TestServer, token};
use serde_json::{Value, json};

/// Sends per connection, pipelined without waiting for replies.
const SENDS: usize = 200;
const SENDERS: [(&str, &str); 3] = [("alice", "a1"), ("alice", "a2"), ("carol", "c1")];

/// What one sending connection saw: cmid → (seq, ts) of every acknowledged send, and the
/// close code.
struct Outcome {
    acked: HashMap<String, (u64, u64)>,
    close: Option<u16>,
}

/// Pipelines `SENDS` sends and then a `typing` op (whose push to the other members shows
/// that the server has read every frame before it), then reads until the server closes.
async fn sender(mut c: Client, chat: String, name: String) -> Outcome {
    for i in 0..SENDS {
        let cmid = format!("{name}-{i}");
        c.send_raw(
            &json!({"op": "send", "id": cmid, "chat": chat, "cmid": cmid, "body": "x"}).to_string(),
        )
        .await;
    }
    c.send_raw(&json!({"op": "typing", "id": "typing", "chat": chat}).to_string())
        .await;
    let mut acked = HashMap::new();
    let close = loop {
        match c.recv_or_close().await {
            Ok(v) if v["id"] == "typing" => assert!(v.get("result").is_some(), "{v}"),
            Ok(v) if v.get("result").is_some() => {
                let id = v["id"].as_str().unwrap().to_owned();
                let r = &v["result"];
                acked.insert(id, (r["seq"].as_u64().unwrap(), r["ts"].as_u64().unwrap()));
            }
            Ok(v) => assert!(v.get("error").is_none(), "{name}: {v}"),
            Err(code) => break code,
        }
    };
    Outcome { acked, close }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_finishes_in_flight_sends_closes_with_1001_and_keeps_every_acknowledged_send() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&["bob", "carol"], "t").await;
    // A member that only listens.
    let mut bob = Client::connect(&url, &token("bob"), "listener", None).await;
    bob.synced().await;

    let mut tasks = Vec::new();
    for (user, device) in SENDERS {
        let c = Client::connect(&url, &token(user), device, None).await;
        let name = format!("{user}.{device}");
        tasks.push(tokio::spawn(sender(c, chat.clone(), name)));
    }
    // Once the server has read every sender's frames, stop it, with sends still in flight.
    for _ in SENDERS {
        bob.push("typing").await;
    }
    let dir = server.stop().await;

    let mut acked: HashMap<String, (u64, u64)> = HashMap::new();
    for t in tasks {
        let outcome = t.await.unwrap();
        assert_eq!(outcome.close, Some(1001), "a sender is closed with 1001");
        assert_eq!(
            outcome.acked.len(),
            SENDS,
            "every send the server read was finished and answered"
        );
        acked.extend(outcome.acked);
    }
    // The listening member is closed with 1001 too.
    let code = loop {
        match bob.recv_or_close().await {
            Ok(_) => {}
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(1001));
    drop(alice);

    // Restart on the same data: every acknowledged send is there, with its seq and ts.
    let server = TestServer::start_in(dir, |c| c.rate_limit_per_minute = 0).await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let events = alice.all_events(&chat).await;
    let expected: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(common::seqs(&events), expected, "gapless after the restart");
    let stored: HashMap<String, (u64, u64)> = events
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| {
            let cmid = e["cmid"].as_str().unwrap().to_owned();
            (
                cmid,
                (e["seq"].as_u64().unwrap(), e["ts"].as_u64().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        stored.len(),
        events.len() - 1,
        "each cmid is stored at most once"
    );
    for (cmid, at) in &acked {
        assert_eq!(stored.get(cmid), Some(at), "acknowledged {cmid} survives");
    }

    // Retrying every cmid: the acknowledged (and any stored) ones return their original seq
    // and ts; the rest are appended once.
    let mut by_sender: HashMap<(&str, &str), Client> = HashMap::new();
    for (user, device) in SENDERS {
        // Starting at the end: the resume stream is not what this part is about.
        let since = json!({ chat.clone(): u64::MAX });
        let mut c = Client::connect(&server.url(), &token(user), device, Some(since)).await;
        c.synced().await;
        by_sender.insert((user, device), c);
    }
    let mut retried: HashMap<String, (u64, u64)> = HashMap::new();
    for ((user, device), c) in by_sender.iter_mut() {
        for chunk in (0..SENDS).collect::<Vec<_>>().chunks(200) {
            for i in chunk {
                let cmid = format!("{user}.{device}-{i}");
                c.send_raw(
                    &json!({"op": "send", "id": cmid, "chat": chat, "cmid": cmid, "body": "x"})
                        .to_string(),
                )
                .await;
            }
            let mut replies = 0;
            while replies < chunk.len() {
                let v: Value = c.recv().await.expect("reply");
                if v.get("id").is_none() {
                    continue;
                }
                let r = &v["result"];
                assert!(r.is_object(), "{v}");
                retried.insert(
                    v["id"].as_str().unwrap().to_owned(),
                    (r["seq"].as_u64().unwrap(), r["ts"].as_u64().unwrap()),
                );
                replies += 1;
            }
        }
    }
    for (cmid, at) in &stored {
        assert_eq!(retried.get(cmid), Some(at), "retry of stored {cmid}");
    }
    let events = alice.all_events(&chat).await;
    let cmids: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| e["cmid"].as_str().unwrap())
        .collect();
    let unique: HashSet<&str> = cmids.iter().copied().collect();
    assert_eq!(cmids.len(), 3 * SENDS);
    assert_eq!(unique.len(), 3 * SENDS, "no cmid twice");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_stop_and_restart_devices_resume_from_their_cursors() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let (mut bob, _) = Client::connect_resume(&server.url(), &token("bob"), "phone", None).await;
    let chat = alice.create(&["bob"], "t").await;
    for i in 0..5 {
        alice.send_msg(&chat, &format!("m{i}"), "x").await;
    }
    bob.until_event(&chat, 6).await;
    bob.ok(json!({"op": "delivered", "chat": chat, "seq": 3}))
        .await;
    let dir = server.stop().await;
    let code = loop {
        match bob.recv_or_close().await {
            Ok(_) => {}
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(1001));
    let server = TestServer::start_in(dir, |c| c.rate_limit_per_minute = 0).await;
    let (_bob, events) = Client::connect_resume(&server.url(), &token("bob"), "phone", None).await;
    assert_eq!(common::seqs(&events), [4, 5, 6]);
    server.stop().await;
}
