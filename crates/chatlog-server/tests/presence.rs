//! Several devices per user, typing, and presence (PROTOCOL.md "Chats and their event log",
//! the `presence`, `subscribe_presence` and `typing` ops).

mod common;

use std::time::Duration;

use common::{Client, TestServer, token};
use serde_json::{Value, json};

fn presence_of<'a>(reply: &'a Value, user: &str) -> &'a Value {
    reply["presence"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["user"] == user)
        .unwrap_or_else(|| panic!("{user} missing from {reply}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_of_every_member_gets_pushes_and_typing_skips_the_typists_devices() {
    let server = TestServer::start().await;
    let mut alice_phone = server.connect_device("alice", "phone").await;
    alice_phone.synced().await;
    let mut alice_laptop = server.connect_device("alice", "laptop").await;
    alice_laptop.synced().await;
    let mut bob_phone = server.connect_device("bob", "phone").await;
    bob_phone.synced().await;
    let mut bob_laptop = server.connect_device("bob", "laptop").await;
    bob_laptop.synced().await;
    let mut carol = server.connect("carol").await;
    carol.synced().await;

    let chat = alice_phone.create(&["bob"], "t").await;
    let sent = alice_phone.send_msg(&chat, "m1", "hi").await;
    assert_eq!(sent["seq"], 2);
    for c in [
        &mut alice_phone,
        &mut alice_laptop,
        &mut bob_phone,
        &mut bob_laptop,
    ] {
        let frames = c.until_event(&chat, 2).await;
        let events: Vec<Value> = frames
            .iter()
            .filter(|f| f["ev"] == "event")
            .map(|f| f["event"].clone())
            .collect();
        assert_eq!(common::seqs(&events), [1, 2], "{frames:?}");
        assert_eq!(events[1]["sender"], "alice");
        assert_eq!(events[1]["body"], "hi");
    }

    // Typing reaches the other members' devices, and none of the typist's.
    alice_phone.ok(json!({"op": "typing", "chat": chat})).await;
    for c in [&mut bob_phone, &mut bob_laptop] {
        let t = c.push("typing").await;
        assert_eq!(t, json!({"ev": "typing", "chat": chat, "user": "alice"}));
    }
    // The next event of the chat reaches alice's devices after anything queued before it.
    alice_laptop.send_msg(&chat, "m2", "from the laptop").await;
    for c in [&mut alice_phone, &mut alice_laptop] {
        let frames = c.until_event(&chat, 3).await;
        assert!(
            frames.iter().all(|f| f["ev"] != "typing"),
            "the typist's own device got typing: {frames:?}"
        );
    }
    for c in [&mut bob_phone, &mut bob_laptop] {
        let ev = c.until_event(&chat, 3).await.pop().unwrap();
        assert_eq!(ev["event"]["cmid"], "m2");
    }
    // Not stored: history has no typing.
    assert_eq!(bob_phone.last_seq(&chat).await, 3);

    // A receipt moved by one device is pushed to every device of every member.
    bob_phone
        .ok(json!({"op": "read", "chat": chat, "seq": 3}))
        .await;
    for c in [
        &mut alice_phone,
        &mut alice_laptop,
        &mut bob_phone,
        &mut bob_laptop,
    ] {
        let r = loop {
            let r = c.push("receipt").await;
            if r["user"] == "bob" {
                break r;
            }
        };
        assert_eq!(
            r,
            json!({"ev": "receipt", "chat": chat, "user": "bob", "delivered": 3, "read": 3})
        );
    }
    // carol, not a member, saw none of it: her next frame after subscribing to a chat of her
    // own is that chat's first event.
    let own = carol.create(&[], "carol's").await;
    let frames = carol.until_event(&own, 1).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reports_online_and_last_seen_and_subscriptions_push_changes() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let before = common::now_secs() * 1000;

    let p = alice
        .ok(json!({"op": "presence", "users": ["bob", "alice"]}))
        .await;
    assert_eq!(
        presence_of(&p, "bob"),
        &json!({"user": "bob", "online": false, "last_seen": null}),
        "never seen"
    );
    assert_eq!(presence_of(&p, "alice")["online"], true);
    assert!(presence_of(&p, "alice")["last_seen"].as_u64().unwrap() >= before);

    alice
        .ok(json!({"op": "subscribe_presence", "users": ["bob"]}))
        .await;
    // bob comes online on two devices: one push.
    let bob_phone = server.connect_device("bob", "phone").await;
    let on = alice.push("presence").await;
    assert_eq!(on["user"], "bob");
    assert_eq!(on["online"], true);
    assert!(on["last_seen"].as_u64().unwrap() >= before, "{on}");
    let bob_laptop = server.connect_device("bob", "laptop").await;
    let p = alice.ok(json!({"op": "presence", "users": ["bob"]})).await;
    assert_eq!(presence_of(&p, "bob")["online"], true);

    // Online while any device is connected.
    drop(bob_phone);
    alice.no_push("presence", Duration::from_millis(300)).await;
    let p = alice.ok(json!({"op": "presence", "users": ["bob"]})).await;
    assert_eq!(presence_of(&p, "bob")["online"], true, "{p}");
    drop(bob_laptop);
    let off = alice.push("presence").await;
    assert_eq!(off["user"], "bob");
    assert_eq!(off["online"], false);
    let last_seen = off["last_seen"].as_u64().unwrap();
    assert!(last_seen >= on["last_seen"].as_u64().unwrap(), "{off} {on}");
    let p = alice.ok(json!({"op": "presence", "users": ["bob"]})).await;
    assert_eq!(
        presence_of(&p, "bob"),
        &json!({"user": "bob", "online": false, "last_seen": last_seen})
    );
    // And back.
    let _bob = server.connect("bob").await;
    let again = alice.push("presence").await;
    assert_eq!(
        (again["user"].clone(), again["online"].clone()),
        (json!("bob"), json!(true))
    );
    // Other users' changes are not pushed to a watcher of bob only.
    let carol = server.connect("carol").await;
    drop(carol);
    alice.no_push("presence", Duration::from_millis(300)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_survives_a_restart() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    alice
        .ok(json!({"op": "subscribe_presence", "users": ["bob"]}))
        .await;
    let bob = server.connect("bob").await;
    alice.push("presence").await;
    drop(bob);
    let off = alice.push("presence").await;
    assert_eq!(off["online"], false);
    drop(alice);
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |c| c.rate_limit_per_minute = 0).await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let p = alice
        .ok(json!({"op": "presence", "users": ["bob", "zed"]}))
        .await;
    assert_eq!(
        presence_of(&p, "bob"),
        &json!({"user": "bob", "online": false, "last_seen": off["last_seen"]})
    );
    assert_eq!(presence_of(&p, "zed")["last_seen"], json!(null));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_expires_from_presence_after_the_ttl() {
    // Pings far away, so only the TTL can make bob offline while his socket stays open.
    let server = TestServer::start_with(|c| {
        c.presence_ttl_ms = 300;
        c.ping_interval_ms = 60_000;
        c.idle_timeout_ms = 120_000;
    })
    .await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    alice
        .ok(json!({"op": "subscribe_presence", "users": ["bob"]}))
        .await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let on = alice.push("presence").await;
    assert_eq!(
        (on["user"].clone(), on["online"].clone()),
        (json!("bob"), json!(true))
    );
    let off = alice.push("presence").await;
    assert_eq!(off["user"], "bob");
    assert_eq!(off["online"], false, "{off}");
    let seen = off["last_seen"].as_u64().unwrap();
    assert!(seen >= on["last_seen"].as_u64().unwrap(), "{on} {off}");
    let p = alice.ok(json!({"op": "presence", "users": ["bob"]})).await;
    assert_eq!(presence_of(&p, "bob")["online"], false, "{p}");
    // The TTL expired presence, not the connection.
    bob.ok(json!({"op": "ping"})).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_more_than_256_users_is_bad_request() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let users: Vec<String> = (0..257).map(|i| format!("u{i}")).collect();
    for op in ["presence", "subscribe_presence"] {
        let reply = alice.call(json!({"op": op, "users": users})).await;
        assert_eq!(reply["error"]["code"], "bad_request", "{op}: {reply}");
        let ok = alice.call(json!({"op": op, "users": users[..256]})).await;
        assert!(ok.get("result").is_some(), "{op} of 256: {ok}");
    }
    let p = alice
        .ok(json!({"op": "presence", "users": users[..256]}))
        .await;
    assert_eq!(p["presence"].as_array().unwrap().len(), 256);
    // The refused subscription did not watch u256; the accepted one watches u0.
    let u256 = Client::connect(&server.url(), &token("u256"), "d", None).await;
    let u0 = server.connect("u0").await;
    let pushed = alice.push("presence").await;
    assert_eq!(pushed["user"], "u0", "{pushed}");
    drop((u256, u0));
    server.stop().await;
}
