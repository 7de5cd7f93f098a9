//! Bad `serve` flags exit with status 2 and a message naming the flag, before anything
//! listens (PROTOCOL.md: bad input anywhere gets a clear error).

mod common;

use std::process::Command;

#[test]
fn bad_serve_flags_exit_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--max-members", "0"], "--max-members"),
        (&["--rate-limit", "-1"], "--rate-limit"),
        (&["--max-frame-bytes", "0"], "--max-frame-bytes"),
        (&["--push-interval-ms", "0"], "--push-interval-ms"),
        (&["--outbound-queue", "0"], "--outbound-queue"),
        (&["--join"], "--join"),
        (&["--node-id", "1"], "--peers"),
        (
            &["--node-id", "1", "--peers", "1=127.0.0.1:1;2=127.0.0.1:2"],
            "--peers",
        ),
    ];
    for (args, flag) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_chatlog-server"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--auth-secret", common::SECRET])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(*args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} should name {flag}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
    }
}

/// A replication port already in use is reported with exit status 2, and no "listening" line
/// comes before it (the server is announced only once it is ready).
#[test]
fn a_replication_port_in_use_exits_2_without_announcing_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peers = format!("1={}", taken.local_addr().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_chatlog-server"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--auth-secret", common::SECRET])
        .args(["--node-id", "1", "--peers", &peers])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--peer-listen"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "announced before failing: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}
