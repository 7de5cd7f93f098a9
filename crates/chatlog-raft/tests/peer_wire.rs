#![allow(clippy::result_large_err)] // openraft's StorageError
//! Bad input on a node's peer port: frames that lie about their length, unknown routes and
//! undecodable bodies get a clear answer or a closed connection, never a stopped node; HTTP
//! keeps working on the same port.

use std::time::Duration;

use chatlog::engine::EngineConfig;
use chatlog::log::{LogConfig, Preallocate};
use chatlog_raft::wire::{self, Conn, Route};
use chatlog_raft::{ClusterConfig, ClusterNode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn small_log() -> LogConfig {
    LogConfig {
        segment_size_bytes: 32 << 20,
        preallocate: Preallocate::Sparse,
        ..LogConfig::default()
    }
}

async fn http_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_refused_and_the_node_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut cc = ClusterConfig::new(1, [(1, addr.clone())].into(), tmp.path().join("n1"));
    cc.engine = EngineConfig {
        log: small_log(),
        ..EngineConfig::default()
    };
    cc.raft_log = small_log();
    let node = ClusterNode::start(cc, listener).await.unwrap();

    // A frame claiming 4 GiB: the connection is closed without reading it.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(wire::MAGIC).await.unwrap();
    s.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    s.write_all(&[0u8; 32]).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection is closed"
    );

    // A wrong magic after the 0 byte: closed too.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"\0notmagic").await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))));

    // Undecodable bodies and unknown routes get an answer naming the problem.
    let conn = Conn::connect(&addr, Duration::from_secs(1)).await.unwrap();
    let (code, why) = conn
        .call(Route::Append, b"\xff\xff\xff", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(code, wire::FAILED);
    assert!(
        String::from_utf8_lossy(&why).contains("undecodable request"),
        "{why:?}"
    );
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(wire::MAGIC).await.unwrap();
    s.write_all(&wire::frame(7, 99, b"x")).await.unwrap();
    let (id, code, why) = wire::read_frame(&mut s).await.unwrap().unwrap();
    assert_eq!((id, code), (7, wire::FAILED));
    assert!(String::from_utf8_lossy(&why).contains("unknown peer route code 99"));

    // The node still answers frames and HTTP on the same port.
    let vote = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(0, 9), None);
    let (code, _) = conn
        .call(
            Route::Vote,
            &postcard::to_allocvec(&vote).unwrap(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(code, wire::OK);
    let metrics = http_get(&addr, "/admin/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    node.shutdown().await;
}
