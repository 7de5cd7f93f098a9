//! Every error code one node can produce (PROTOCOL.md "Requests, replies, events" and the op
//! table), each followed by proof that the connection still works and nothing was stored.

mod common;

use common::{Client, SECRET, TestServer, now_secs, refused, token, token_signed};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Sends a raw text frame and returns the next frame that is not an event push.
async fn answer(c: &mut Client, text: &str) -> Value {
    c.send_raw(text).await;
    loop {
        let v = c.recv().await.expect("an answer before close");
        if v.get("ev").is_none() {
            return v;
        }
        c.pushes.push_back(v);
    }
}

/// The connection still answers and the chat still ends at `last_seq`.
async fn still_usable_and_unchanged(c: &mut Client, chat: &str, last_seq: u64) {
    let pong = c.ok(json!({"op": "ping"})).await;
    assert!(pong["ts"].as_u64().unwrap() > 0, "{pong}");
    assert_eq!(c.last_seq(chat).await, last_seq, "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_bad_request_and_the_connection_stays_open() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&["bob"], "t").await;

    // Unparseable: no id can be echoed.
    for text in [
        "{not json",
        "[1,2]",
        "42",
        "\"hello\"",
        "",
        "{\"op\":\"ping\",\"id\":[1]}",
    ] {
        let v = answer(&mut alice, text).await;
        assert_eq!(v["error"]["code"], "bad_request", "{text:?}: {v}");
        assert!(v.get("id").is_none(), "{text:?}: {v}");
        assert!(v["error"]["message"].as_str().is_some(), "{v}");
        still_usable_and_unchanged(&mut alice, &chat, 1).await;
    }

    // Readable id: echoed verbatim (integer or string).
    let cases = [
        // Unknown op.
        json!({"op": "frobnicate", "id": 7}),
        json!({"op": "frobnicate", "id": "seven"}),
        // No op, or an op that is not a string.
        json!({"id": 8}),
        json!({"op": 5, "id": 9}),
        // Wrong field types.
        json!({"op": "send", "id": 10, "chat": 5, "cmid": "m", "body": "x"}),
        json!({"op": "send", "id": 11, "chat": chat, "cmid": "m", "body": 42}),
        json!({"op": "send", "id": 12, "chat": chat, "cmid": ["m"], "body": "x"}),
        json!({"op": "history", "id": 13, "chat": chat, "limit": -1}),
        json!({"op": "history", "id": 14, "chat": chat, "before": "5"}),
        json!({"op": "add_members", "id": 15, "chat": chat, "users": "carol"}),
        json!({"op": "delivered", "id": 16, "chat": chat, "seq": "1"}),
        json!({"op": "edit", "id": 17, "chat": chat, "target": 1.5, "body": "x"}),
        json!({"op": "create_chat", "id": 18, "members": [1, 2]}),
        json!({"op": "create_chat", "id": 19, "members": ["bob"], "direct": "yes"}),
        json!({"op": "presence", "id": 20, "users": [true]}),
        // Missing fields.
        json!({"op": "send", "id": 21, "chat": chat, "body": "x"}),
        json!({"op": "send", "id": 22, "cmid": "m", "body": "x"}),
        json!({"op": "edit", "id": 23, "chat": chat, "target": 1}),
        json!({"op": "delete", "id": 24, "chat": chat}),
        json!({"op": "history", "id": 25}),
        json!({"op": "read", "id": 26, "chat": chat}),
        json!({"op": "remove_members", "id": 27, "chat": chat}),
        json!({"op": "typing", "id": 28}),
        json!({"op": "subscribe_presence", "id": 29}),
        // Semantically invalid.
        json!({"op": "send", "id": 30, "chat": chat, "cmid": "m"}),
        json!({"op": "send", "id": 31, "chat": chat, "cmid": "", "body": "x"}),
        json!({"op": "send", "id": 32, "chat": chat, "cmid": "c".repeat(65), "body": "x"}),
        json!({"op": "send", "id": 34, "chat": chat, "cmid": "é".repeat(65), "body": "x"}),
        json!({"op": "add_members", "id": 33, "chat": chat, "users": ["not a user!"]}),
        // A second hello on an authenticated connection.
        json!({"op": "hello", "id": 37, "token": token("alice"), "device": "default"}),
    ];
    for request in cases {
        let v = answer(&mut alice, &request.to_string()).await;
        assert_eq!(v["error"]["code"], "bad_request", "{request}: {v}");
        assert_eq!(v["id"], request["id"], "the id is echoed: {request}: {v}");
        assert!(v.get("result").is_none(), "{v}");
        still_usable_and_unchanged(&mut alice, &chat, 1).await;
    }
    // A cmid of exactly 64 characters is fine, and the next seq follows without a gap; 64
    // two-byte characters are too (PROTOCOL.md counts characters).
    let sent = alice.send_msg(&chat, &"c".repeat(64), "ok").await;
    assert_eq!(sent["seq"], 2);
    let sent = alice.send_msg(&chat, &"é".repeat(64), "ok").await;
    assert_eq!(sent["seq"], 3);
    // Still the welcome user after the refused second hello.
    assert_eq!(alice.welcome["user"], "alice");
    let list = alice.ok(json!({"op": "list_chats"})).await;
    assert_eq!(list["chats"].as_array().unwrap().len(), 1, "{list}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anything_but_hello_first_is_unauthorized_and_closes_with_1008() {
    let server = TestServer::start().await;
    let firsts = [
        json!({"op": "ping", "id": 1}).to_string(),
        json!({"op": "send", "id": 2, "chat": "g1", "cmid": "m", "body": "x"}).to_string(),
        json!({"op": "create_chat", "id": 3, "members": ["bob"]}).to_string(),
        "{not json".to_owned(),
        json!({"op": "hello", "id": 4}).to_string(),
        json!({"op": "hello", "id": 5, "token": 17}).to_string(),
    ];
    for first in &firsts {
        let (frames, code) = refused(&server.url(), first).await;
        assert_eq!(code, Some(1008), "{first}: {frames:?}");
        assert_eq!(frames.len(), 1, "{first}: {frames:?}");
        assert_eq!(
            frames[0]["error"]["code"], "unauthorized",
            "{first}: {frames:?}"
        );
    }
    // A binary first frame too.
    let mut ws = Client::raw(&server.url()).await;
    ws.send(Message::binary(b"{\"op\":\"hello\"}".to_vec()))
        .await
        .unwrap();
    let (frames, code) = common::frames_until_close(&mut ws).await;
    assert_eq!(code, Some(1008), "{frames:?}");
    assert_eq!(frames[0]["error"]["code"], "unauthorized", "{frames:?}");
    // Nothing the refused connections sent was acted on.
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let list = alice.ok(json!({"op": "list_chats"})).await;
    assert_eq!(list["chats"], json!([]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_expired_or_wrongly_signed_tokens_are_unauthorized_and_close_with_1008() {
    let server = TestServer::start().await;
    let expired = token_signed("alice", now_secs() - 10, SECRET);
    let wrong_secret = token_signed("alice", now_secs() + 3600, "another-secret-0123456789");
    let bad_subject = token_signed("not a user!", now_secs() + 3600, SECRET);
    let valid = token("alice");
    let tampered = {
        // Same header and signature, different claims.
        let parts: Vec<&str> = valid.split('.').collect();
        let other = token("mallory");
        let other_claims = other.split('.').nth(1).unwrap();
        format!("{}.{}.{}", parts[0], other_claims, parts[2])
    };
    let hellos = [
        json!({"op": "hello", "id": 1, "device": "d"}),
        json!({"op": "hello", "id": 2, "token": "", "device": "d"}),
        json!({"op": "hello", "id": 3, "token": "abc.def.ghi", "device": "d"}),
        json!({"op": "hello", "id": 4, "token": expired, "device": "d"}),
        json!({"op": "hello", "id": 5, "token": wrong_secret, "device": "d"}),
        json!({"op": "hello", "id": 6, "token": bad_subject, "device": "d"}),
        json!({"op": "hello", "id": 7, "token": tampered, "device": "d"}),
    ];
    for hello in &hellos {
        let (frames, code) = refused(&server.url(), &hello.to_string()).await;
        assert_eq!(code, Some(1008), "{hello}: {frames:?}");
        assert_eq!(frames.len(), 1, "{hello}: {frames:?}");
        assert_eq!(
            frames[0]["error"]["code"], "unauthorized",
            "{hello}: {frames:?}"
        );
        assert!(
            frames.iter().all(|f| f["ev"] != "welcome"),
            "{hello}: {frames:?}"
        );
    }
    // The valid token works, with the default device when none is named.
    let mut ws = Client::raw(&server.url()).await;
    ws.send(Message::text(
        json!({"op": "hello", "token": valid}).to_string(),
    ))
    .await
    .unwrap();
    let welcome = loop {
        let msg = tokio::time::timeout(common::WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            break serde_json::from_str::<Value>(t.as_str()).unwrap();
        }
    };
    assert_eq!(
        welcome,
        json!({"ev": "welcome", "user": "alice", "device": "default"})
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_during_the_connection_closes_it_with_1008() {
    let server = TestServer::start().await;
    let short = token_signed("alice", now_secs() + 2, SECRET);
    let mut c = Client::connect(&server.url(), &short, "d", None).await;
    c.synced().await;
    c.ok(json!({"op": "ping"})).await;
    let mut frames = Vec::new();
    let code = loop {
        match c.recv_or_close().await {
            Ok(v) => frames.push(v),
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(1008), "{frames:?}");
    assert!(
        frames.iter().any(|f| f["error"]["code"] == "unauthorized"),
        "{frames:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_above_max_frame_bytes_is_too_large_without_id_and_stores_nothing() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 2048).await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let chat = alice.create(&["bob"], "t").await;
    bob.until_event(&chat, 1).await;

    // A valid send, just too big: not parsed, so no id and no event.
    let big =
        json!({"op": "send", "id": 99, "chat": chat, "cmid": "big", "body": "x".repeat(3000)});
    let v = answer(&mut alice, &big.to_string()).await;
    assert_eq!(v["error"]["code"], "too_large", "{v}");
    assert!(v.get("id").is_none(), "{v}");
    still_usable_and_unchanged(&mut alice, &chat, 1).await;
    // The same as a binary message.
    alice
        .ws
        .send(Message::binary(big.to_string().into_bytes()))
        .await
        .unwrap();
    // Replies keep request order: the binary message's answer comes before the next one's.
    let v = answer(&mut alice, "").await;
    assert_eq!(v["error"]["code"], "too_large", "{v}");
    assert!(v.get("id").is_none(), "{v}");
    let v = alice.recv().await.unwrap();
    assert_eq!(v["error"]["code"], "bad_request", "the empty frame: {v}");
    still_usable_and_unchanged(&mut alice, &chat, 1).await;
    // The cmid was never used: sending it now, small, makes seq 2.
    let sent = alice.send_msg(&chat, "big", "small").await;
    assert_eq!(sent["seq"], 2);
    // bob saw seq 2 and nothing before it since seq 1.
    let frames = bob.until_event(&chat, 2).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    // A message right at the limit is parsed.
    let mut at_limit = json!({"op": "send", "id": 1000, "chat": chat, "cmid": "edge", "body": ""});
    let pad = 2048 - at_limit.to_string().len();
    at_limit["body"] = json!("y".repeat(pad));
    assert_eq!(at_limit.to_string().len(), 2048);
    let v = answer(&mut alice, &at_limit.to_string()).await;
    assert_eq!(v["id"], 1000, "{v}");
    assert_eq!(v["result"]["seq"], 3, "{v}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_above_16_kib_is_too_large_and_stores_nothing() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&[], "solo").await;
    // Exactly 16 KiB of UTF-8 is accepted.
    let sent = alice.send_msg(&chat, "edge", &"a".repeat(16 * 1024)).await;
    assert_eq!(sent["seq"], 2);
    // One byte more is not.
    let too_big =
        json!({"op": "send", "chat": chat, "cmid": "m1", "body": "a".repeat(16 * 1024 + 1)});
    let reply = alice.call(too_big).await;
    assert_eq!(reply["error"]["code"], "too_large", "{reply}");
    assert!(reply["id"].is_number(), "{reply}");
    still_usable_and_unchanged(&mut alice, &chat, 2).await;
    // Bytes of UTF-8, not characters: 8,193 two-byte characters are 16,386 bytes.
    let wide = "é".repeat(8 * 1024 + 1);
    assert_eq!(wide.chars().count(), 8193);
    let code = alice
        .err(json!({"op": "send", "chat": chat, "cmid": "m2", "body": wide}))
        .await;
    assert_eq!(code, "too_large");
    still_usable_and_unchanged(&mut alice, &chat, 2).await;
    // Edits have the same limit.
    let code = alice
        .err(json!({"op": "edit", "chat": chat, "target": 2, "body": "b".repeat(16 * 1024 + 1)}))
        .await;
    assert_eq!(code, "too_large");
    still_usable_and_unchanged(&mut alice, &chat, 2).await;
    let h = alice.ok(json!({"op": "history", "chat": chat})).await;
    assert_eq!(h["events"][1]["edited"], false, "{}", h["events"][1]);
    // The refused cmids were never used.
    let sent = alice.send_msg(&chat, "m1", "fits").await;
    assert_eq!(sent["seq"], 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_256_members_is_too_many_members() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let others: Vec<String> = (0..256).map(|i| format!("user{i}")).collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    // alice + 256 others = 257.
    let code = alice
        .err(json!({"op": "create_chat", "members": others, "title": "big"}))
        .await;
    assert_eq!(code, "too_many_members");
    let list = alice.ok(json!({"op": "list_chats"})).await;
    assert_eq!(list["chats"], json!([]), "nothing was created");
    // alice + 255 others = 256: allowed.
    let chat = alice.create(&others[..255], "full").await;
    let list = alice.ok(json!({"op": "list_chats"})).await;
    assert_eq!(list["chats"][0]["members"].as_array().unwrap().len(), 256);
    // Adding one more is refused; adding existing members is not a change.
    let code = alice
        .err(json!({"op": "add_members", "chat": chat, "users": ["newcomer"]}))
        .await;
    assert_eq!(code, "too_many_members");
    let code = alice
        .err(json!({"op": "add_members", "chat": chat, "users": [others[0], "newcomer"]}))
        .await;
    assert_eq!(code, "too_many_members");
    still_usable_and_unchanged(&mut alice, &chat, 1).await;
    let same = alice
        .ok(json!({"op": "add_members", "chat": chat, "users": [others[3]]}))
        .await;
    assert_eq!(same["seq"], 1);
    // After one leaves, one may join.
    let mut leaver = server.connect(others[7]).await;
    leaver.synced().await;
    let r = leaver
        .ok(json!({"op": "remove_members", "chat": chat, "users": [others[7]]}))
        .await;
    assert_eq!(r["seq"], 2);
    let r = alice
        .ok(json!({"op": "add_members", "chat": chat, "users": ["newcomer"]}))
        .await;
    assert_eq!(r["seq"], 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_beyond_the_rate_limit_are_rate_limited_with_retry_after_and_store_nothing() {
    let server = TestServer::start_with(|c| c.rate_limit_per_minute = 3).await;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let chat = alice.create(&["bob"], "t").await;
    for i in 0..3 {
        alice.send_msg(&chat, &format!("m{i}"), "x").await;
    }
    let reply = alice
        .call(json!({"op": "send", "chat": chat, "cmid": "m3", "body": "x"}))
        .await;
    assert_eq!(reply["error"]["code"], "rate_limited", "{reply}");
    assert!(reply["id"].is_number(), "{reply}");
    let retry = reply["error"]["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("retry_after_ms is an integer: {reply}"));
    assert!(retry > 0 && retry <= 20_000, "{reply}");
    still_usable_and_unchanged(&mut alice, &chat, 4).await;
    // Other ops are not limited.
    let e = alice
        .ok(json!({"op": "edit", "chat": chat, "target": 2, "body": "y"}))
        .await;
    assert_eq!(e["seq"], 5);
    // The limit is per user.
    let sent = bob.send_msg(&chat, "b0", "from bob").await;
    assert_eq!(sent["seq"], 6);
    // The refused cmid was not stored: history has no m3.
    let events = alice.all_events(&chat).await;
    assert!(events.iter().all(|e| e["cmid"] != "m3"), "{events:?}");
    assert_eq!(events.len(), 6);
    server.stop().await;
}
