//! Files over HTTP (PROTOCOL.md "Files"): upload, size limit, authentication, who may
//! download, malformed ids, and `send` with a file.

mod common;

use std::net::SocketAddr;

use common::{Body, SECRET, TestServer, http_with, now_secs, token, token_signed};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// `POST /v1/files`: (status, JSON body or null).
async fn upload(
    addr: SocketAddr,
    authorization: Option<&str>,
    content_type: &str,
    body: Body<'_>,
) -> (u16, Value) {
    let mut headers = vec![("Content-Type", content_type)];
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    let (status, body, _) = http_with(addr, "POST", "/v1/files", &headers, body)
        .await
        .expect("upload answered");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn upload_as(addr: SocketAddr, user: &str, content_type: &str, bytes: &[u8]) -> Value {
    let bearer = format!("Bearer {}", token(user));
    let (status, body) = upload(addr, Some(&bearer), content_type, Body::Sized(bytes)).await;
    assert_eq!(status, 201, "{body}");
    body
}

/// `GET /v1/files/{path}` as `user` (or without a token): (status, bytes, content type).
async fn download(addr: SocketAddr, user: Option<&str>, path: &str) -> (u16, Vec<u8>, String) {
    let bearer = user.map(|u| format!("Bearer {}", token(u)));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    let (status, body, head) = http_with(
        addr,
        "GET",
        &format!("/v1/files/{path}"),
        &headers,
        Body::Sized(&[]),
    )
    .await
    .expect("download answered");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, body, content_type)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_downloadable_by_the_uploader_and_members_of_chats_that_reference_them() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let bytes: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let up = upload_as(addr, "alice", "image/png", &bytes).await;
    let id = up["file"].as_str().unwrap().to_owned();
    assert_eq!(up["size"], 10_000);
    assert_eq!(up["sha256"], hex::encode(Sha256::digest(&bytes)));
    assert_eq!(up["content_type"], "image/png");

    // The uploader.
    let (status, body, content_type) = download(addr, Some("alice"), &id).await;
    assert_eq!(status, 200);
    assert_eq!(body, bytes);
    assert_eq!(content_type, "image/png");
    // Nobody else yet.
    assert_eq!(download(addr, Some("bob"), &id).await.0, 404);

    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let chat = alice.create(&["bob"], "pics").await;
    let sent = alice
        .ok(json!({"op": "send", "chat": chat, "cmid": "f1", "file": id}))
        .await;
    let ev = bob
        .until_event(&chat, sent["seq"].as_u64().unwrap())
        .await
        .pop()
        .unwrap();
    assert_eq!(ev["event"]["file"], id.as_str());
    assert_eq!(ev["event"]["body"], Value::Null);
    // A member of a chat with a message referencing the file.
    let (status, body, content_type) = download(addr, Some("bob"), &id).await;
    assert_eq!(status, 200);
    assert_eq!(body, bytes);
    assert_eq!(content_type, "image/png");
    // Anyone else: 404, as for a file that does not exist.
    assert_eq!(download(addr, Some("carol"), &id).await.0, 404);
    // A removed member is anyone else.
    alice
        .ok(json!({"op": "remove_members", "chat": chat, "users": ["bob"]}))
        .await;
    assert_eq!(download(addr, Some("bob"), &id).await.0, 404);
    assert_eq!(download(addr, Some("alice"), &id).await.0, 200);

    // Other content types are kept as given.
    let text = upload_as(addr, "alice", "text/plain; charset=utf-8", b"hello").await;
    let (status, body, content_type) =
        download(addr, Some("alice"), text["file"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body, b"hello");
    assert_eq!(content_type, "text/plain; charset=utf-8");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_file_ids_are_404_and_downloads_need_a_token() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let up = upload_as(addr, "alice", "image/png", b"content").await;
    let id = up["file"].as_str().unwrap().to_owned();
    let sha = up["sha256"].as_str().unwrap().to_owned();
    let unknown = format!("f{}", "0".repeat(id.len() - 1));
    let paths = [
        unknown.as_str(),
        "nope",
        "",
        &sha,
        &id.to_uppercase(),
        &format!("{id}0"),
        &id[..id.len() - 1],
        "..%2F..%2Fetc",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "..",
        "../../etc/passwd",
        "..%5C..%5Cetc",
        &format!("{id}%2F..%2F{id}"),
        &format!("..%2Ffiles%2F{}%2F{sha}", &sha[..2]),
    ];
    for path in paths {
        let (status, body, _) = download(addr, Some("alice"), path).await;
        assert_eq!(status, 404, "{path}: {}", String::from_utf8_lossy(&body));
        assert_ne!(body, b"content", "{path}");
    }
    // No token, or a bad one: 401, for a file that exists too.
    assert_eq!(download(addr, None, &id).await.0, 401);
    for authorization in [
        format!(
            "Bearer {}",
            token_signed("alice", now_secs() + 3600, "wrong-secret-0123456789")
        ),
        format!("Bearer {}", token_signed("alice", now_secs() - 10, SECRET)),
        format!("Basic {}", token("alice")),
        token("alice"),
    ] {
        let (status, body, _) = http_with(
            addr,
            "GET",
            &format!("/v1/files/{id}"),
            &[("Authorization", authorization.as_str())],
            Body::Sized(&[]),
        )
        .await
        .unwrap();
        assert_eq!(status, 401, "{authorization}");
        assert_ne!(body, b"content");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_above_the_limit_are_413_and_uploads_need_a_valid_token() {
    let server = TestServer::start_with(|c| c.max_file_bytes = 4096).await;
    let addr = server.addr;
    let bearer = format!("Bearer {}", token("alice"));
    let exact = vec![7u8; 4096];
    let (status, body) = upload(addr, Some(&bearer), "image/png", Body::Sized(&exact)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["size"], 4096);
    let over = vec![8u8; 4097];
    let (status, _) = upload(addr, Some(&bearer), "image/png", Body::Sized(&over)).await;
    assert_eq!(status, 413, "Content-Length above the limit");
    // Without a length: the stream is cut at the limit.
    let (status, _) = upload(addr, Some(&bearer), "image/png", Body::Chunked(&over, 1000)).await;
    assert_eq!(status, 413, "a chunked body above the limit");
    let big = vec![9u8; 64 * 1024];
    let (status, _) = upload(addr, Some(&bearer), "image/png", Body::Chunked(&big, 8192)).await;
    assert_eq!(status, 413, "a larger chunked body");
    // A chunked body within the limit is fine.
    let (status, body) = upload(
        addr,
        Some(&bearer),
        "image/png",
        Body::Chunked(&exact[..3000], 1000),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["size"], 3000);
    // No token or a bad one: 401.
    let small = b"tiny".as_slice();
    for authorization in [
        None,
        Some("Bearer ".to_owned()),
        Some("Bearer not.a.token".to_owned()),
        Some(format!(
            "Bearer {}",
            token_signed("alice", now_secs() + 3600, "wrong-secret-0123456789")
        )),
        Some(format!(
            "Bearer {}",
            token_signed("alice", now_secs() - 10, SECRET)
        )),
        Some(format!("Basic {}", token("alice"))),
    ] {
        let (status, body) = upload(
            addr,
            authorization.as_deref(),
            "image/png",
            Body::Sized(small),
        )
        .await;
        assert_eq!(status, 401, "{authorization:?}: {body}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_with_a_file_needs_one_the_sender_uploaded() {
    let server = TestServer::start().await;
    let addr = server.addr;
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let mut bob = server.connect("bob").await;
    bob.synced().await;
    let chat = alice.create(&["bob"], "t").await;
    let alices = upload_as(addr, "alice", "image/png", b"alice's picture").await;
    let alices = alices["file"].as_str().unwrap().to_owned();
    let unknown = format!("f{}", "1".repeat(alices.len() - 1));
    for file in [alices.as_str(), unknown.as_str(), "garbage", ""] {
        let reply = bob
            .call(json!({"op": "send", "chat": chat, "cmid": "b1", "file": file}))
            .await;
        assert_eq!(reply["error"]["code"], "bad_request", "{file}: {reply}");
        assert_eq!(bob.last_seq(&chat).await, 1, "nothing stored");
    }
    // Once alice shared it, bob may download it, but still not send it as his.
    let sent = alice
        .ok(json!({"op": "send", "chat": chat, "cmid": "a1", "file": alices, "body": "look"}))
        .await;
    assert_eq!(sent["seq"], 2);
    assert_eq!(download(addr, Some("bob"), &alices).await.0, 200);
    let reply = bob
        .call(json!({"op": "send", "chat": chat, "cmid": "b1", "file": alices}))
        .await;
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    // His own upload of the same bytes is his to send.
    let bobs = upload_as(addr, "bob", "image/png", b"alice's picture").await;
    let bobs = bobs["file"].as_str().unwrap().to_owned();
    let sent = bob
        .ok(json!({"op": "send", "chat": chat, "cmid": "b1", "file": bobs}))
        .await;
    assert_eq!(sent["seq"], 3);
    let h = alice.ok(json!({"op": "history", "chat": chat})).await;
    let events = h["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[1]["file"], alices.as_str());
    assert_eq!(events[1]["body"], "look");
    assert_eq!(events[2]["file"], bobs.as_str());
    assert_eq!(events[2]["body"], Value::Null);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_several_mib_within_the_default_limit_round_trips() {
    let server = TestServer::start().await;
    let bytes: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let up = upload_as(server.addr, "alice", "application/octet-stream", &bytes).await;
    assert_eq!(up["size"], bytes.len());
    assert_eq!(up["sha256"], hex::encode(Sha256::digest(&bytes)));
    let (status, body, content_type) =
        download(server.addr, Some("alice"), up["file"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/octet-stream");
    assert!(body == bytes, "the downloaded bytes differ");
    server.stop().await;
}
