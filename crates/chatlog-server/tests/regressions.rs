//! Regression tests for server bugs found while writing the integration tests (each failed
//! before its fix): presence refresh with a short TTL, close frames and final replies lost to a
//! TCP reset when the client had unread pipelined data, and resume/live handoff gaps.
mod common;

use std::time::Duration;

use common::{Client, RawFrame, RawWs, TestServer, token};
use serde_json::json;

/// Bug: with presence_ttl_ms below conn.rs's PRESENCE_REFRESH_MS (5 s), a connection that is
/// actively sending requests goes offline after the TTL (inbound traffic refreshes presence
/// only every 5 s), and `validate()` accepts such a TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_connection_stays_online_with_a_short_presence_ttl() {
    let server = TestServer::start_with(|c| {
        c.presence_ttl_ms = 1000;
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
    assert_eq!(alice.push("presence").await["online"], true);
    // bob sends a request every 100 ms for 2.5 TTLs.
    for _ in 0..25 {
        bob.ok(json!({"op": "ping"})).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = alice.ok(json!({"op": "presence", "users": ["bob"]})).await;
    assert_eq!(
        p["presence"][0]["online"], true,
        "bob is active but reported offline: {p}"
    );
    alice.no_push("presence", Duration::from_millis(10)).await;
    server.stop().await;
}

/// Bug: when the server closes a connection whose client has pipelined requests the server
/// has not read yet, it drops the TCP socket right after sending the Close frame; the kernel
/// then resets the connection (unread data) and discards what was still in the send buffer:
/// the client sees "connection reset" instead of the replies the server wrote and the 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_unread_pipelined_requests_still_delivers_replies_and_1001() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&[], "t").await;
    let mut raw = RawWs::connect(server.addr).await;
    raw.hello("alice", "raw").await;
    for i in 0..2000 {
        raw.send_text(
            &json!({"op":"send","id":i,"chat":chat,"cmid":format!("c{i}"),"body":"x"}).to_string(),
        )
        .await;
    }
    let mut replies = 0;
    while replies < 5 {
        if let Some(RawFrame::Text(v)) = raw.frame().await
            && v.get("result").is_some()
        {
            replies += 1;
        }
    }
    let dir = server.stop().await;
    let mut last_reply_seq = 0;
    let mut last = None;
    while let Some(f) = raw.frame().await {
        if let RawFrame::Text(v) = &f
            && let Some(seq) = v["result"]["seq"].as_u64()
        {
            last_reply_seq = seq;
        }
        last = Some(f);
    }
    let server = TestServer::start_in(dir, |_| {}).await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let stored = alice.last_seq(&chat).await;
    assert_eq!(
        last,
        Some(RawFrame::Close(Some(1001))),
        "the stream ended without 1001"
    );
    assert_eq!(
        last_reply_seq, stored,
        "the server committed and answered sends whose replies never arrived"
    );
    server.stop().await;
}

/// Same bug for 4001: a pipelining client whose queue overflows gets a reset, not 4001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_client_that_overflows_sees_4001() {
    let server = TestServer::start_with(|c| c.outbound_queue = 8).await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&[], "t").await;
    let mut seen = None;
    for attempt in 0..20 {
        let mut raw = RawWs::connect(server.addr).await;
        raw.hello("alice", &format!("burst{attempt}")).await;
        for i in 0..2000 {
            if !raw.try_send_text(&json!({"op":"send","id":i,"chat":chat,"cmid":format!("b{attempt}-{i}"),"body":"x"}).to_string()).await {
                break;
            }
        }
        let mut replies = 0;
        let mut end = None;
        while let Some(f) = raw.frame().await {
            if let RawFrame::Text(v) = &f
                && v.get("result").is_some()
            {
                replies += 1;
            }
            if replies == 2000 {
                break;
            }
            end = Some(f);
        }
        if replies < 2000 {
            seen = Some(end);
            break;
        }
    }
    let end = seen.expect("some burst overflowed the queue");
    assert_eq!(
        end,
        Some(RawFrame::Close(Some(4001))),
        "closed without 4001"
    );
    server.stop().await;
}

/// Bug (latency): accepted sockets keep Nagle's algorithm on. A `send` produces two writes on
/// the sender's socket (the event push and the reply); the second waits for the client's
/// delayed ACK (~40 ms on Linux). Prints per-send latencies of a sequential sender; expect
/// a 1 ms / 42 ms alternation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_while_others_send_never_leaves_a_gap() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&["bob"], "t").await;
    let url = server.url();
    let chat2 = chat.clone();
    let sender = tokio::spawn(async move {
        let mut c = Client::connect(&url, &token("alice"), "sender", None).await;
        c.synced().await;
        for i in 0..3000 {
            c.send_raw(
                &json!({"op":"send","id":i,"chat":chat2,"cmid":format!("s{i}"),"body":"x"})
                    .to_string(),
            )
            .await;
            if i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut n = 0;
        while n < 3000 {
            let v = c.recv().await.unwrap();
            if v.get("result").is_some() {
                n += 1;
            }
        }
    });
    for round in 0..40 {
        let since = if round % 2 == 0 {
            None
        } else {
            Some(json!({chat.clone(): 1}))
        };
        let (mut c, resumed) =
            Client::connect_resume(&server.url(), &token("bob"), "phone", since).await;
        let mut seqs = common::seqs(&resumed);
        for _ in 0..30 {
            match tokio::time::timeout(Duration::from_millis(100), c.push("event")).await {
                Ok(ev) => seqs.push(ev["event"]["seq"].as_u64().unwrap()),
                Err(_) => break,
            }
        }
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "round {round}: gap or repeat: {seqs:?}"
        );
        if let Some(last) = seqs.last() {
            c.ok(json!({"op":"delivered","chat":chat,"seq":last})).await;
        }
    }
    sender.await.unwrap();
    server.stop().await;
}

/// A message of any size above the limit is answered `too_large` (without `id`) and the
/// connection stays open (PROTOCOL.md), also when it comes in fragments, and also when it is
/// far larger than the server would buffer: it is dropped as it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_far_above_the_limit_are_too_large_and_the_connection_stays_open() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 1024).await;
    let mut c = RawWs::connect(server.addr).await;
    c.hello("alice", "d").await;
    let too_large = |frame: RawFrame, size: usize| match frame {
        RawFrame::Text(v) => {
            assert_eq!(v["error"]["code"], "too_large", "{v}");
            assert!(v.get("id").is_none(), "{v}");
            let message = v["error"]["message"].as_str().unwrap().to_owned();
            assert!(message.contains(&format!("{size} bytes")), "{message}");
        }
        other => panic!("expected too_large, got {other:?}"),
    };
    let ping = |id: u64| json!({"op": "ping", "id": id}).to_string();
    let answered = |frame: RawFrame, id: u64| match frame {
        RawFrame::Text(v) => assert_eq!(v["id"], id, "{v}"),
        other => panic!("expected the answer to {id}, got {other:?}"),
    };

    // 16 MiB in one frame: more than 16 times the limit (the old hard limit closed with 1009).
    let big = "x".repeat(16 * 1024 * 1024);
    c.send_text(&big).await;
    too_large(c.frame().await.unwrap(), big.len());
    c.send_text(&ping(1)).await;
    answered(c.frame().await.unwrap(), 1);

    // In fragments that pass the limit only together, with a ping among them.
    c.send_frame(false, 0x1, &[b'a'; 600]).await;
    c.send_frame(true, 0x9, b"hi").await;
    c.send_frame(false, 0x0, &[b'b'; 600]).await;
    c.send_frame(true, 0x0, &[b'c'; 600]).await;
    assert_eq!(c.frame().await.unwrap(), RawFrame::Pong);
    too_large(c.frame().await.unwrap(), 1800);

    // A first fragment already past the limit, as binary.
    c.send_frame(false, 0x2, &vec![0u8; 2 * 1024 * 1024]).await;
    c.send_frame(true, 0x0, b"z").await;
    too_large(c.frame().await.unwrap(), 2 * 1024 * 1024 + 1);

    // A request in fragments within the limit is served.
    let request = ping(2);
    let (head, tail) = request.as_bytes().split_at(5);
    c.send_frame(false, 0x1, head).await;
    c.send_frame(true, 0x0, tail).await;
    answered(c.frame().await.unwrap(), 2);

    // Exactly at the limit: parsed (a bad request, not too large).
    c.send_text(&" ".repeat(1024)).await;
    match c.frame().await.unwrap() {
        RawFrame::Text(v) => assert_eq!(v["error"]["code"], "bad_request", "{v}"),
        other => panic!("{other:?}"),
    }
    c.send_text(&ping(3)).await;
    answered(c.frame().await.unwrap(), 3);

    // An oversized hello fails authentication and says why.
    let mut d = RawWs::connect(server.addr).await;
    d.send_text(&"h".repeat(5000)).await;
    let frames = d.until_eof().await;
    match &frames[..] {
        [RawFrame::Text(v), RawFrame::Close(Some(1008))] => {
            assert_eq!(v["error"]["code"], "unauthorized", "{v}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains("5000 bytes"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

/// A client-initiated close is answered with a close frame (a clean close, not 1006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered() {
    use futures_util::StreamExt;
    let server = TestServer::start().await;
    let mut c = server.connect("alice").await;
    c.synced().await;
    c.ws.close(None).await.unwrap();
    let mut answered = false;
    while let Some(frame) = c.ws.next().await {
        match frame {
            Ok(tokio_tungstenite::tungstenite::Message::Close(_)) => answered = true,
            Ok(_) => {}
            Err(e) => panic!("connection ended abnormally: {e}"),
        }
    }
    assert!(answered, "the server did not answer the close frame");
    server.stop().await;
}

/// The server does the WebSocket upgrade itself: a plain GET is refused with 400 naming what
/// is missing, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_is_not_an_upgrade_gets_400() {
    let server = TestServer::start().await;
    let (status, body, _) = common::http(server.addr, "GET", "/v1/ws", None, &[])
        .await
        .unwrap();
    assert_eq!(status, 400);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("Connection: upgrade"), "{body}");
    let mut c = server.connect("alice").await;
    c.synced().await;
    server.stop().await;
}

/// The fanout hands out committed records in batches; a record taken at a batch boundary was
/// once dropped (a gap on every connection). Thousands of pipelined sends cross many batch
/// boundaries; a listener must see every seq exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_batches_never_drop_a_record() {
    const SENDS: u64 = 3000;
    // Tiny batches: every few records is a boundary.
    let server = TestServer::start_with(|c| c.fanout_batch_max = 3).await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let chat = alice.create(&["bob"], "burst").await;
    for i in 0..SENDS {
        alice
            .send_raw(
                &json!({"op":"send","id":i,"chat":chat,"cmid":format!("m{i}"),"body":"x"})
                    .to_string(),
            )
            .await;
    }
    let mut next = 1;
    while next <= SENDS + 1 {
        let ev = bob.push("event").await;
        assert_eq!(
            ev["event"]["seq"], next,
            "bob's stream skipped or repeated a seq"
        );
        next += 1;
    }
    server.stop().await;
}

/// A history page of 500 messages at the body limit is one frame of about 8 MiB: it is
/// answered (the socket's write buffer was bounded at 4 MiB, and the connection died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_page_of_500_messages_at_the_body_limit_is_answered() {
    let server = TestServer::start_with(|c| c.rate_limit_per_minute = 0).await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&["bob"], "t").await;
    let body = "x".repeat(16 * 1024);
    for i in 0..500 {
        alice.send_msg(&chat, &format!("m{i}"), &body).await;
    }
    let page = alice
        .ok(json!({"op": "history", "chat": chat, "limit": 500}))
        .await;
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 500);
    assert!(events.iter().all(|e| e["body"] == body.as_str()));
    // The connection still serves.
    alice.send_msg(&chat, "after", "small").await;
    server.stop().await;
}
