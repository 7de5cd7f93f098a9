//! The offline push webhook (PROTOCOL.md "Resume and offline delivery"), against a tiny HTTP
//! server run by the test.

mod common;

use std::time::Duration;

use common::hook::{Answer, Hook};
use common::{Client, TestServer, metric_value, metrics_text, token};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_members_get_one_post_per_interval_counting_only_messages() {
    let mut hook = Hook::start(Answer::Status(200)).await;
    let url = hook.url();
    let server = TestServer::start_with(|c| {
        c.push_webhook = Some(url);
        c.push_interval_ms = 1000;
    })
    .await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut dave = server.connect("dave").await;
    dave.synced().await;
    // bob never connects; dave stays connected.
    let chat = alice.create(&["bob", "dave"], "t").await;
    let mut others = Vec::new();

    let m1 = alice.send_msg(&chat, "m1", "one").await;
    let post = hook.next().await;
    assert_eq!(post.method, "POST");
    assert_eq!(post.path, "/push");
    assert!(
        post.content_type.starts_with("application/json"),
        "{post:?}"
    );
    assert_eq!(
        post.body,
        json!({"user": "bob", "chat": chat, "seq": m1["seq"], "sender": "alice", "count": 1}),
        "the members event of creation is not a message; m1 is"
    );

    // Within the next interval: three messages, an edit, a delete and a membership change.
    alice.send_msg(&chat, "m2", "two").await;
    alice
        .ok(json!({"op": "edit", "chat": chat, "target": 3, "body": "two!"}))
        .await;
    alice
        .ok(json!({"op": "delete", "chat": chat, "target": 3}))
        .await;
    alice
        .ok(json!({"op": "add_members", "chat": chat, "users": ["carol"]}))
        .await;
    let m3 = dave.send_msg(&chat, "m3", "three").await;
    let m4 = alice.send_msg(&chat, "m4", "four").await;
    let post = hook.next_for("bob", &mut others).await;
    assert_eq!(
        post,
        json!({"user": "bob", "chat": chat, "seq": m4["seq"], "sender": "alice", "count": 3}),
        "one post for the interval, counting the messages since the previous post"
    );
    // carol, added offline, counts from when she was added: m3 at once, then m4.
    let carol_first = match others.iter().position(|p| p["user"] == "carol") {
        Some(i) => others.remove(i),
        None => hook.next_for("carol", &mut others).await,
    };
    assert_eq!(
        carol_first,
        json!({"user": "carol", "chat": chat, "seq": m3["seq"], "sender": "dave", "count": 1})
    );
    let carol_second = match others.iter().position(|p| p["user"] == "carol") {
        Some(i) => others.remove(i),
        None => hook.next_for("carol", &mut others).await,
    };
    assert_eq!(
        carol_second,
        json!({"user": "carol", "chat": chat, "seq": m4["seq"], "sender": "alice", "count": 1})
    );
    // Nothing else: the connected members (dave, and alice the sender) got no post, and
    // nobody got a second post for the same messages.
    others.extend(hook.drain(Duration::from_millis(1100)).await);
    assert!(others.is_empty(), "unexpected posts: {others:?}");

    // Once bob is connected he gets no post either; carol (still offline) does.
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let m5 = alice.send_msg(&chat, "m5", "five").await;
    let mut rest = Vec::new();
    let post = hook.next_for("carol", &mut rest).await;
    assert_eq!(post["seq"], m5["seq"]);
    assert_eq!(post["count"], 1);
    rest.extend(hook.drain(Duration::from_millis(500)).await);
    assert!(rest.is_empty(), "a connected member got a post: {rest:?}");

    // bob leaves; his next post counts m5, which he got while connected, and m6
    // (PROTOCOL.md: the messages since the previous post).
    drop(bob);
    loop {
        let states = alice.ok(json!({"op": "presence", "users": ["bob"]})).await;
        if states["presence"][0]["online"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m6 = alice.send_msg(&chat, "m6", "six").await;
    let post = hook.next_for("bob", &mut rest).await;
    assert_eq!(
        post,
        json!({"user": "bob", "chat": chat, "seq": m6["seq"], "sender": "alice", "count": 2}),
        "messages received while connected count towards the next post"
    );
    server.stop().await;
}

/// Sends `n` messages one after another to a chat with offline members; each must be
/// answered (the harness waits at most `WAIT` for each).
async fn sends_complete(server: &TestServer, n: usize) {
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let offline: Vec<String> = (0..20).map(|i| format!("offline{i}")).collect();
    let offline: Vec<&str> = offline.iter().map(String::as_str).collect();
    let chat = alice.create(&offline, "t").await;
    for i in 0..n {
        let sent = alice.send_msg(&chat, &format!("m{i}"), "x").await;
        assert_eq!(sent["seq"], 2 + i as u64);
    }
    // And the offline members find everything when they come.
    let mut late = Client::connect(&server.url(), &token("offline0"), "d", None).await;
    late.synced().await;
    assert_eq!(late.all_events(&chat).await.len(), n + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_answering_500_never_delays_sends_and_failures_are_counted() {
    let mut hook = Hook::start(Answer::Status(500)).await;
    let url = hook.url();
    let server = TestServer::start_with(|c| {
        c.push_webhook = Some(url);
        c.push_interval_ms = 100;
    })
    .await;
    sends_complete(&server, 30).await;
    // The server did try, and once a post has failed for good it is counted.
    let first = hook.next().await;
    assert_eq!(first.body["chat"], "g1", "{first:?}");
    common::eventually("webhook failures counted", || async {
        let text = metrics_text(server.addr).await;
        metric_value(&text, "chatlog_webhook_failures_total").filter(|v| *v >= 1.0)
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_never_answers_never_delays_sends() {
    let mut hook = Hook::start(Answer::Hang).await;
    let url = hook.url();
    let server = TestServer::start_with(|c| {
        c.push_webhook = Some(url);
        c.push_interval_ms = 100;
    })
    .await;
    sends_complete(&server, 30).await;
    hook.next().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_is_down_never_delays_sends() {
    // A port that was free a moment ago: connections are refused.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let server = TestServer::start_with(|c| {
        c.push_webhook = Some(format!("http://{addr}/push"));
        c.push_interval_ms = 100;
    })
    .await;
    sends_complete(&server, 30).await;
    server.stop().await;
}
