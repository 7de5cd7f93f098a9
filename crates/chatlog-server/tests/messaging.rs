//! Chats, sends, fanout, history, idempotency and resume over real loopback WebSockets.

mod common;

use std::time::Duration;

use common::{Client, TestServer, token};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_send_fanout_and_history() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;

    let chat = alice.create(&["bob"], "lunch").await;
    // Seq 1 is the members event adding everyone, with the title, pushed to both.
    for c in [&mut alice, &mut bob] {
        let ev = c.push("event").await;
        assert_eq!(ev["event"]["seq"], 1);
        assert_eq!(ev["event"]["kind"], "members");
        assert_eq!(ev["event"]["title"], "lunch");
        let mut added: Vec<String> = serde_json::from_value(ev["event"]["added"].clone()).unwrap();
        added.sort();
        assert_eq!(added, ["alice", "bob"]);
    }
    let sent = alice.send_msg(&chat, "m1", "hello").await;
    assert_eq!(sent["chat"], chat.as_str());
    assert_eq!(sent["seq"], 2);
    assert!(sent["ts"].as_u64().unwrap() > 0);
    for c in [&mut alice, &mut bob] {
        let ev = c.push("event").await["event"].clone();
        assert_eq!(
            (ev["seq"].clone(), ev["kind"].clone(), ev["sender"].clone()),
            (json!(2), json!("message"), json!("alice"))
        );
        assert_eq!(ev["body"], "hello");
        assert_eq!(ev["cmid"], "m1");
        assert_eq!(ev["file"], json!(null));
        assert_eq!(ev["ts"], sent["ts"]);
    }
    // Retry with the same cmid: same seq and ts, no second event.
    let again = alice.send_msg(&chat, "m1", "hello").await;
    assert_eq!(again, sent);
    let edit = bob
        .call(json!({"op":"edit","chat":chat,"target":2,"body":"x"}))
        .await;
    assert_eq!(edit["error"]["code"], "forbidden", "{edit}");
    let e = alice
        .ok(json!({"op":"edit","chat":chat,"target":2,"body":"hello!"}))
        .await;
    assert_eq!(e["seq"], 3);
    let d = alice
        .ok(json!({"op":"delete","chat":chat,"target":2}))
        .await;
    assert_eq!(d["seq"], 4);
    let h = bob.ok(json!({"op":"history","chat":chat})).await;
    assert_eq!(h["last_seq"], 4);
    let events = h["events"].as_array().unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(events[1]["deleted"], true);
    assert_eq!(events[1]["edited"], true);
    assert_eq!(events[1]["body"], json!(null));
    assert_eq!(events[2]["kind"], "edit");
    assert_eq!(events[2]["target"], 2);
    assert_eq!(events[3]["kind"], "delete");
    // Paging.
    let h = bob
        .ok(json!({"op":"history","chat":chat,"before":4,"limit":2}))
        .await;
    let seqs: Vec<u64> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3]);
    let h = bob
        .ok(json!({"op":"history","chat":chat,"after":1,"limit":1}))
        .await;
    assert_eq!(h["events"][0]["seq"], 2);
    let list = bob.ok(json!({"op":"list_chats"})).await;
    assert_eq!(list["chats"][0]["chat"], chat.as_str());
    assert_eq!(list["chats"][0]["last_seq"], 4);
    assert_eq!(list["chats"][0]["title"], "lunch");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_get_gapless_ordered_seqs_on_every_connection() {
    let server = TestServer::start().await;
    let users: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    let mut owner = server.connect("u0").await;
    owner.synced().await;
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    let chat = owner.create(&others, "busy").await;
    let per_sender = 40u64;
    // Everyone is connected before anyone sends, so every connection must see every message.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(users.len()));
    let mut tasks = Vec::new();
    for user in users.clone() {
        let url = server.url();
        let chat = chat.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url, &token(&user), "d", None).await;
            c.synced().await;
            barrier.wait().await;
            let mut seqs = Vec::new();
            for i in 0..per_sender {
                // Pipelined: send without waiting, then collect replies.
                c.send_raw(
                    &json!({"op":"send","id":i,"chat":chat,"cmid":format!("{user}-{i}"),"body":"x"})
                        .to_string(),
                )
                .await;
            }
            let mut replies = 0;
            let mut pushed = Vec::new();
            while replies < per_sender || pushed.len() < (per_sender as usize * 6) {
                let v = c.recv().await.unwrap();
                if v.get("result").is_some() {
                    seqs.push(v["result"]["seq"].as_u64().unwrap());
                    replies += 1;
                } else if v["ev"] == "event" && v["event"]["kind"] == "message" {
                    pushed.push(v["event"]["seq"].as_u64().unwrap());
                }
            }
            (seqs, pushed)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let (seqs, pushed) = t.await.unwrap();
        // Replies come in request order, so one sender's seqs increase.
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        // Every connection saw increasing seqs with no gap from where it started.
        assert!(pushed.windows(2).all(|w| w[1] == w[0] + 1), "{pushed:?}");
        all.extend(seqs);
    }
    all.sort_unstable();
    let expected: Vec<u64> = (2..2 + 6 * per_sender).collect();
    assert_eq!(
        all, expected,
        "seqs are exactly 2..=last with no gap or repeat"
    );
    let h = owner
        .ok(json!({"op":"history","chat":chat,"limit":1}))
        .await;
    assert_eq!(h["last_seq"], 1 + 6 * per_sender);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_resumes_from_its_cursor_and_new_devices_start_at_the_end() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    // bob's phone exists before the chat.
    let (bob, resumed) = Client::connect_resume(&server.url(), &token("bob"), "phone", None).await;
    assert!(resumed.is_empty());
    drop(bob);
    let chat = alice.create(&["bob"], "t").await;
    for i in 0..5 {
        alice
            .send_msg(&chat, &format!("m{i}"), &format!("hi {i}"))
            .await;
    }
    // The phone resumes from the members event that added bob.
    let (mut phone, events) =
        Client::connect_resume(&server.url(), &token("bob"), "phone", None).await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    phone
        .ok(json!({"op":"delivered","chat":chat,"seq":4}))
        .await;
    drop(phone);
    alice.send_msg(&chat, "m5", "later").await;
    let (mut phone, events) =
        Client::connect_resume(&server.url(), &token("bob"), "phone", None).await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [5, 6, 7], "everything after the cursor, in order");
    // A lower cursor is ignored.
    phone
        .ok(json!({"op":"delivered","chat":chat,"seq":2}))
        .await;
    // `since` overrides where this connection starts without moving the cursor.
    let (_c, events) = Client::connect_resume(
        &server.url(),
        &token("bob"),
        "phone",
        Some(json!({ chat.clone(): 6 })),
    )
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["seq"], 7);
    // A new device starts at the current end.
    let (_laptop, events) =
        Client::connect_resume(&server.url(), &token("bob"), "laptop", None).await;
    assert!(events.is_empty(), "{events:?}");
    // Receipts: bob's user-level delivered is the max over devices.
    let r = alice.ok(json!({"op":"receipts","chat":chat})).await;
    let bob_r = r["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["user"] == "bob")
        .unwrap()
        .clone();
    assert_eq!(bob_r, json!({"user":"bob","delivered":4,"read":0}));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_are_pushed_to_members() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let chat = alice.create(&["bob"], "t").await;
    alice.send_msg(&chat, "m", "x").await;
    bob.ok(json!({"op":"read","chat":chat,"seq":2})).await;
    loop {
        let r = alice.push("receipt").await;
        assert_eq!(r["chat"], chat.as_str());
        if r["user"] == "bob" {
            assert_eq!(
                (r["delivered"].clone(), r["read"].clone()),
                (json!(2), json!(2))
            );
            break;
        }
    }
    let list = bob.ok(json!({"op":"list_chats"})).await;
    assert_eq!(list["chats"][0]["read"], 2);
    assert_eq!(list["chats"][0]["delivered"], 2);
    alice.no_push("typing", Duration::from_millis(50)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_cmid_get_one_seq() {
    const CMIDS: u64 = 50;
    const DEVICES: usize = 4;
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&["bob"], "dups").await;
    // The same sender on four devices sends the same 50 cmids at once, pipelined.
    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        let (url, chat) = (server.url(), chat.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url, &token("alice"), &format!("dev{d}"), None).await;
            for i in 0..CMIDS {
                c.send_raw(
                    &json!({"op":"send","id":i,"chat":chat,"cmid":format!("same-{i}"),"body":format!("b{i}")})
                        .to_string(),
                )
                .await;
            }
            let mut got = std::collections::BTreeMap::new();
            while got.len() < CMIDS as usize {
                let v = c.recv().await.unwrap();
                if let Some(id) = v.get("id").and_then(|i| i.as_u64()) {
                    let r = &v["result"];
                    assert!(r.is_object(), "send failed: {v}");
                    got.insert(id, (r["seq"].as_u64().unwrap(), r["ts"].as_u64().unwrap()));
                }
            }
            got
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    for other in &answers[1..] {
        assert_eq!(
            other, &answers[0],
            "every retry of a cmid gets the same seq and ts"
        );
    }
    let h = alice
        .ok(json!({"op":"history","chat":chat,"limit":500}))
        .await;
    assert_eq!(h["last_seq"], 1 + CMIDS, "one event per cmid");
    let seqs: std::collections::BTreeSet<u64> = answers[0].values().map(|(s, _)| *s).collect();
    assert_eq!(seqs.len(), CMIDS as usize);
    server.stop().await;
}
