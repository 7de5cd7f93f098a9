//! Limits under attack: per-IP connection caps, slowloris HTTP clients (silent, trickling,
//! endless headers), and floods of WebSocket connections that never send `hello`. Each test
//! checks that the abusive connections are refused or closed, and that a normal client is
//! served meanwhile.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{RawFrame, RawWs, TestServer, WAIT};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP connection to `addr` from `source` (any 127.x.y.z address works on loopback).
async fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends a WebSocket upgrade request from `source`; returns the response status and the
/// socket (kept open by the caller to hold the connection).
async fn upgrade_from(source: IpAddr, addr: SocketAddr) -> (u16, TcpStream) {
    let mut stream = connect_from(source, addr).await;
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing after the head (a WebSocket frame) may be consumed here.
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("upgrade answered in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed during the upgrade: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, stream)
}

/// Reads until the server closes the connection; `true` if it did within [`WAIT`] (EOF or a
/// reset), whatever it sent first.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A client of one chat that must keep working while the attack goes on.
async fn normal_client_works(server: &TestServer, cmid: &str) {
    let mut alice = server.connect("alice").await;
    alice.synced().await;
    let chat = alice.create(&["bob"], "during the attack").await;
    let sent = alice.send_msg(&chat, cmid, "still here").await;
    assert_eq!(sent["seq"], 2, "{sent}");
    let h = alice.ok(json!({"op": "history", "chat": chat})).await;
    assert_eq!(h["events"][1]["body"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_ip_cap_refuses_the_extra_upgrade_from_that_address_only() {
    let server = TestServer::start_with(|c| c.max_connections_per_ip = 3).await;
    let home = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut held = Vec::new();
    for _ in 0..3 {
        let (status, stream) = upgrade_from(home, server.addr).await;
        assert_eq!(status, 101);
        held.push(stream);
    }
    // The fourth from the same address is refused before any WebSocket exists, however
    // often it is tried.
    for _ in 0..5 {
        let (status, _) = upgrade_from(home, server.addr).await;
        assert_eq!(status, 503, "a fourth connection from {home} got in");
    }
    // Another address is not affected, and plain HTTP routes are not capped.
    let (status, _other_stream) = upgrade_from(other, server.addr).await;
    assert_eq!(status, 101, "the cap of {home} refused {other}");
    let health = common::http(server.addr, "GET", "/healthz", None, &[]).await;
    assert_eq!(health.map(|r| r.0), Some(200));
    // A closed connection gives its slot back.
    drop(held.pop());
    let _again = common::eventually("a slot is released", || async {
        let (status, stream) = upgrade_from(home, server.addr).await;
        (status == 101).then_some(stream)
    })
    .await;
    let (status, _) = upgrade_from(home, server.addr).await;
    assert_eq!(status, 503, "the released slot was taken again");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_http_clients_are_closed_after_the_header_timeout() {
    let server = TestServer::start_with(|c| c.header_read_timeout_ms = 300).await;
    let addr = server.addr;
    const SILENT: usize = 50;
    const TRICKLING: usize = 50;
    let mut attackers = tokio::task::JoinSet::new();
    for _ in 0..SILENT {
        attackers.spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            closed_by_server(&mut stream).await
        });
    }
    for i in 0..TRICKLING {
        attackers.spawn(async move {
            // An upgrade request (or a plain GET) whose headers never end: one byte every
            // 20 ms for as long as the server keeps the connection.
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut read, mut write) = stream.into_split();
            let path = if i % 2 == 0 { "/v1/ws" } else { "/healthz" };
            let trickle = async move {
                let start = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ");
                let _ = write.write_all(start.as_bytes()).await;
                loop {
                    if write.write_all(b"a").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            let closed = async move {
                let mut buf = [0u8; 4096];
                loop {
                    match read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            };
            tokio::select! {
                () = closed => true,
                () = trickle => true,
                () = tokio::time::sleep(WAIT) => false,
            }
        });
    }
    // Served meanwhile.
    normal_client_works(&server, "n1").await;
    let mut closed = 0;
    while let Some(done) = attackers.join_next().await {
        assert!(
            done.unwrap(),
            "a slowloris connection stayed open for {WAIT:?}"
        );
        closed += 1;
    }
    assert_eq!(closed, SILENT + TRICKLING);
    // And afterwards.
    normal_client_works(&server, "n2").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_request_head_is_cut_off_at_a_bounded_size() {
    let server = TestServer::start().await;
    const ATTEMPTED_BYTES: usize = 64 << 20;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut written = 0usize;
        let _ = write.write_all(b"GET /v1/ws HTTP/1.1\r\nX-Big: ").await;
        let chunk = vec![b'a'; 64 * 1024];
        while written < ATTEMPTED_BYTES {
            if write.write_all(&chunk).await.is_err() {
                break;
            }
            written += chunk.len();
        }
        written
    });
    // The server answers (431) or closes long before 64 MiB: it buffers a bounded head.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, read.read(&mut buf)).await {
            Err(_) => panic!("the server neither answered nor closed within {WAIT:?}"),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    let written = tokio::time::timeout(WAIT, writer)
        .await
        .expect("the writer stopped: the server closed the connection")
        .unwrap();
    assert!(
        written < ATTEMPTED_BYTES,
        "the server read all {written} bytes of one request head"
    );
    normal_client_works(&server, "n1").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_that_never_send_hello_is_closed_and_others_are_served() {
    let server = TestServer::start_with(|c| c.handshake_timeout_ms = 500).await;
    const FLOOD: usize = 200;
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        // Upgraded (101), then silent.
        flood.push(RawWs::connect(server.addr).await);
    }
    normal_client_works(&server, "n1").await;
    let mut closers = tokio::task::JoinSet::new();
    for mut ws in flood {
        closers.spawn(async move { ws.until_eof().await });
    }
    while let Some(frames) = closers.join_next().await {
        let frames = frames.unwrap();
        // `unauthorized`, then close 1008 (the server's close frame may be lost to a reset
        // if the socket is torn down first: then no frames at all).
        assert!(
            frames.iter().all(|f| match f {
                RawFrame::Text(v) => v["error"]["code"] == "unauthorized",
                RawFrame::Close(code) => *code == Some(1008),
                RawFrame::Ping | RawFrame::Pong => true,
                RawFrame::Other(_) => false,
            }),
            "{frames:?}"
        );
    }
    normal_client_works(&server, "n2").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_hello_hold_capped_slots_until_the_handshake_timeout() {
    const CAP: usize = 20;
    let server = TestServer::start_with(|c| {
        c.handshake_timeout_ms = 500;
        c.max_connections = CAP;
    })
    .await;
    let home = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    let mut flood = Vec::new();
    for _ in 0..CAP {
        let (status, stream) = upgrade_from(home, server.addr).await;
        assert_eq!(status, 101);
        flood.push(stream);
    }
    // The cap counts connections before `hello`: the server is full.
    let (status, _) = upgrade_from(home, server.addr).await;
    assert_eq!(status, 503);
    // The handshake timeout frees every slot (the flood's sockets are still open on this
    // side: the server closed them), and a normal client gets in.
    for stream in &mut flood {
        assert!(
            closed_by_server(stream).await,
            "a silent connection stayed open"
        );
    }
    common::eventually("the slots are released", || async {
        let (status, _) = upgrade_from(home, server.addr).await;
        (status == 101).then_some(())
    })
    .await;
    normal_client_works(&server, "n1").await;
    server.stop().await;
}
