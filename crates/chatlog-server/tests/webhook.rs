//! The offline push webhook (PROTOCOL.md "Resume and offline delivery"), against a tiny HTTP
//! server run by the test.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Client, TestServer, WAIT, metric_value, metrics_text, token};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How the test's webhook answers.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// Reads the request and never answers.
    Hang,
}

/// One request the webhook received.
#[derive(Debug)]
struct Post {
    method: String,
    path: String,
    content_type: String,
    body: Value,
}

struct Hook {
    addr: SocketAddr,
    posts: mpsc::UnboundedReceiver<Post>,
}

impl Hook {
    async fn start(answer: Answer) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, posts) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_hook(stream, answer, tx.clone()));
            }
        });
        Hook { addr, posts }
    }

    fn url(&self) -> String {
        format!("http://{}/push", self.addr)
    }

    async fn next(&mut self) -> Post {
        tokio::time::timeout(WAIT, self.posts.recv())
            .await
            .expect("a webhook post in time")
            .expect("hook running")
    }

    /// The next post for `user`; posts for other users are returned in `others`.
    async fn next_for(&mut self, user: &str, others: &mut Vec<Value>) -> Value {
        loop {
            let post = self.next().await;
            if post.body["user"] == user {
                return post.body;
            }
            others.push(post.body);
        }
    }

    /// Every post that arrives within `wait`.
    async fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(post)) = tokio::time::timeout_at(deadline, self.posts.recv()).await {
            out.push(post.body);
        }
        out
    }
}

/// Reads HTTP/1.1 requests (keep-alive) and reports each.
async fn serve_hook(mut stream: TcpStream, answer: Answer, tx: mpsc::UnboundedSender<Post>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + 4 + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end + 4..head_end + 4 + length].to_vec();
        buf.drain(..head_end + 4 + length);
        let mut first = head.lines().next().unwrap_or("").split(' ');
        let post = Post {
            method: first.next().unwrap_or("").to_owned(),
            path: first.next().unwrap_or("").to_owned(),
            content_type: header("content-type").unwrap_or_default(),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        };
        let _ = tx.send(post);
        match answer {
            Answer::Status(code) => {
                let response = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
            Answer::Hang => {
                // Hold the connection open without answering.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
        }
    }
}

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
