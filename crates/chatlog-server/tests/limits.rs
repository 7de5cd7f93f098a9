//! Connection limits (PROTOCOL.md "Transport"): a slow consumer is closed with 4001 and
//! resumes without gaps while others are unaffected; a connection that does not answer pings
//! is closed with 4000; a connection without `hello` is closed.

mod common;

use common::{Client, RawFrame, RawWs, TestServer, metric_value, metrics_text, token};
use serde_json::{Value, json};

const BODY_BYTES: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_4001_and_resumes_without_gaps() {
    let server = TestServer::start_with(|c| {
        c.outbound_queue = 8;
    })
    .await;
    let url = server.url();
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    alice.set_nodelay();
    // carol's socket has a small receive buffer, so that a few hundred KiB back up.
    let mut carol = Client::connect_small_buffer(&url, &token("carol"), "slow", 4096).await;
    carol.synced().await;
    let chat = alice.create(&["bob", "carol"], "t").await;
    // carol reads the first few events and acknowledges them, then stops reading.
    for i in 0..3 {
        alice.send_msg(&chat, &format!("early{i}"), "x").await;
    }
    let early = carol.until_event(&chat, 4).await;
    let early_seqs: Vec<u64> = early
        .iter()
        .filter(|f| f["ev"] == "event")
        .map(|f| f["event"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(early_seqs, [1, 2, 3, 4]);
    carol
        .ok(json!({"op": "delivered", "chat": chat, "seq": 4}))
        .await;

    // bob reads everything, in its own task, reporting how far he got.
    let (mut bob, _) = Client::connect_resume(&url, &token("bob"), "fast", None).await;
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let (last_tx, mut last_rx) = tokio::sync::oneshot::channel::<u64>();
    let bob_task = tokio::spawn(async move {
        let mut seqs: Vec<u64> = Vec::new();
        let mut last = None;
        loop {
            if last.is_some() && seqs.last() == last.as_ref() {
                return seqs;
            }
            tokio::select! {
                frame = bob.recv_or_close() => {
                    let v = frame.unwrap_or_else(|code| panic!("bob was closed: {code:?}"));
                    if v["ev"] == "event" {
                        let seq = v["event"]["seq"].as_u64().unwrap();
                        seqs.push(seq);
                        progress_tx.send_replace(seq);
                    }
                }
                l = &mut last_rx, if last.is_none() => last = Some(l.unwrap()),
            }
        }
    });

    // alice sends large messages until carol's connection has overflowed (the kernel's
    // socket buffers absorb the first few megabytes). She sends WINDOW at a time and waits
    // until both readers have the window's events, so a reading connection never has more
    // than WINDOW (< 8) events queued, whatever the scheduling.
    const WINDOW: usize = 6;
    let drops =
        |text: &str| metric_value(text, "chatlog_outbound_queue_drops_total").unwrap_or(0.0);
    let drops_before = drops(&metrics_text(server.addr).await);
    let body = "z".repeat(BODY_BYTES);
    let mut next = 0;
    let mut last_seq = 4;
    let mut alice_seen = 4;
    let mut overflowed = false;
    while next < 2400 && !overflowed {
        for _ in 0..4 {
            for k in next..next + WINDOW {
                let send = json!({"op": "send", "id": format!("s{k}"), "chat": chat,
                    "cmid": format!("bulk{k}"), "body": body});
                alice.send_raw(&send.to_string()).await;
            }
            let mut replies = 0;
            while replies < WINDOW || alice_seen < last_seq {
                let v = alice.recv().await.expect("alice stays connected");
                if let Some(result) = v.get("result") {
                    last_seq = last_seq.max(result["seq"].as_u64().unwrap());
                    replies += 1;
                } else if v["ev"] == "event" {
                    alice_seen = v["event"]["seq"].as_u64().unwrap();
                } else {
                    assert!(v.get("error").is_none(), "{v}");
                }
            }
            tokio::time::timeout(common::WAIT, progress.wait_for(|s| *s >= last_seq))
                .await
                .expect("bob keeps up")
                .unwrap();
            next += WINDOW;
        }
        overflowed = drops(&metrics_text(server.addr).await) > drops_before;
    }
    assert!(
        overflowed,
        "carol's queue never overflowed after {next} sends"
    );
    // A few more after the overflow.
    for i in 0..5 {
        last_seq = alice.send_msg(&chat, &format!("late{i}"), "after").await["seq"]
            .as_u64()
            .unwrap();
    }
    last_tx.send(last_seq).unwrap();
    let bob_seqs = bob_task.await.unwrap();
    let expected: Vec<u64> = (bob_seqs[0]..=last_seq).collect();
    assert_eq!(bob_seqs, expected, "bob, reading, got everything in order");
    assert!(bob_seqs[0] <= 5, "bob connected before the bulk sends");

    // Now carol reads: what was queued before the overflow, in order, then 4001.
    let mut live = Vec::new();
    let code = loop {
        match carol.recv_or_close().await {
            Ok(v) if v["ev"] == "event" => live.push(v["event"]["seq"].as_u64().unwrap()),
            Ok(_) => {}
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(4001), "too slow");
    assert!(
        live.windows(2).all(|w| w[1] == w[0] + 1),
        "no gaps before the close: {live:?}"
    );
    assert!(live.first().is_none_or(|s| *s == 5), "{live:?}");
    assert!(live.last().is_none_or(|s| *s < last_seq), "{live:?}");

    // Reconnecting the same device resumes everything after its cursor (4), in order.
    let (mut carol, resumed) = Client::connect_resume(&url, &token("carol"), "slow", None).await;
    let resumed: Vec<Value> = resumed
        .into_iter()
        .filter(|e| e["chat"] == chat.as_str())
        .collect();
    let expected: Vec<u64> = (5..=last_seq).collect();
    assert_eq!(common::seqs(&resumed), expected);
    assert_eq!(resumed.last().unwrap()["cmid"], "late4");
    // And live pushes continue after the resume.
    let sent = alice.send_msg(&chat, "after-resume", "x").await;
    let ev = carol
        .until_event(&chat, sent["seq"].as_u64().unwrap())
        .await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_answer_pings_is_closed_with_4000() {
    let server = TestServer::start_with(|c| {
        c.ping_interval_ms = 100;
        c.idle_timeout_ms = 500;
    })
    .await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    alice
        .ok(json!({"op": "subscribe_presence", "users": ["bob"]}))
        .await;
    // bob's hand-written client never answers the server's pings.
    let mut bob = RawWs::connect(server.addr).await;
    bob.hello("bob", "d").await;
    let on = alice.push("presence").await;
    assert_eq!(on["online"], true);
    // The idle close makes bob gone for presence.
    let off = alice.push("presence").await;
    assert_eq!(
        (off["user"].clone(), off["online"].clone()),
        (json!("bob"), json!(false))
    );
    let frames = bob.until_eof().await;
    assert!(
        frames.contains(&RawFrame::Ping),
        "the server pinged: {frames:?}"
    );
    assert_eq!(
        frames.last(),
        Some(&RawFrame::Close(Some(4000))),
        "closed for idleness: {frames:?}"
    );
    // alice, whose client answers pings while it reads, outlived several idle timeouts.
    alice.ok(json!({"op": "ping"})).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_requests_keep_a_connection_alive_without_pongs() {
    let server = TestServer::start_with(|c| {
        c.ping_interval_ms = 100;
        c.idle_timeout_ms = 400;
    })
    .await;
    let mut carol = RawWs::connect(server.addr).await;
    carol.hello("carol", "d").await;
    // Three idle timeouts' worth of requests, never answering a WebSocket ping.
    let mut pinged = false;
    for i in 0..12 {
        carol
            .send_text(&json!({"op": "ping", "id": i}).to_string())
            .await;
        loop {
            match carol.frame().await {
                Some(RawFrame::Text(v)) if v["id"] == i => break,
                Some(RawFrame::Ping) => pinged = true,
                Some(RawFrame::Text(_)) => {}
                other => panic!("the connection ended while in use: {other:?}"),
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(pinged, "the server sent pings meanwhile");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_hello_is_closed_after_the_handshake_timeout() {
    let server = TestServer::start_with(|c| c.handshake_timeout_ms = 200).await;
    let mut ws = Client::raw(&server.url()).await;
    let (frames, code) = common::frames_until_close(&mut ws).await;
    assert!(frames.iter().all(|f| f["ev"] != "welcome"), "{frames:?}");
    assert!(
        frames.iter().all(|f| f["error"]["code"] == "unauthorized"),
        "{frames:?}"
    );
    assert_eq!(code, Some(1008), "{frames:?}");
    // A hello in time still works.
    let mut c = server.connect("alice").await;
    c.synced().await;
    server.stop().await;
}

/// A client that stops reading while the server is writing to it cannot pin its connection:
/// a write that does not finish within the idle timeout ends the connection (before, the task
/// waited in the write for ever and the user stayed online).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_blocked_by_a_client_that_stopped_reading_ends_the_connection() {
    let server = TestServer::start_with(|c| {
        c.idle_timeout_ms = 1_000;
        c.ping_interval_ms = 300;
        c.presence_ttl_ms = 600_000;
        c.outbound_queue = 1_000_000;
    })
    .await;
    let url = server.url();
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut carol = Client::connect_small_buffer(&url, &token("carol"), "stuck", 4096).await;
    carol.synced().await;
    let chat = alice.create(&["carol"], "t").await;
    alice
        .ok(json!({"op":"subscribe_presence","users":["carol"]}))
        .await;
    // Enough large messages to fill carol's socket buffers; she never reads again.
    let body = "x".repeat(15_000);
    for i in 0..600 {
        alice.send_msg(&chat, &format!("m{i}"), &body).await;
    }
    // carol goes offline only when the server ends her connection.
    loop {
        let p = alice.push("presence").await;
        if p["user"] == "carol" && p["online"] == false {
            break;
        }
    }
    drop(carol);
    server.stop().await;
}
