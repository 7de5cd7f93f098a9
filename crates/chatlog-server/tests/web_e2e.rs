//! The web client end to end, in real headless Chromium against the real server binary.
//!
//! `scripts/setup-web` installs Debian's `chromium` and playwright-core (once; quiet after);
//! then node runs the client's state unit tests (`web/e2e/model.test.mjs`) and the browser
//! scenario (`web/e2e/run.mjs`), which starts this binary on a free port with a temporary data
//! directory, drives two users in two browser contexts (messages, ticks to read, typing,
//! edits, deletes, an image, presence, a reload, dropped frames), kills the server with
//! SIGKILL mid-conversation and restarts it on the same port and data directory, and checks
//! that both pages end with every message exactly once. Screenshots go to
//! `<target>/web-e2e/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// Runs a command to completion; panics with its output if it fails.
fn run(command: &mut Command, what: &str) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!(
        "--- {what}: stdout\n{}\n--- {what}: stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{what} failed ({})\n{text}",
        output.status
    );
    // Captured by the test harness; shown with --nocapture.
    println!("{text}");
    output
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[test]
fn web_client_in_headless_chromium() {
    let root = workspace();
    run(
        Command::new(root.join("scripts/setup-web")).current_dir(&root),
        "scripts/setup-web",
    );
    run(
        Command::new("node")
            .arg("--test")
            .arg("web/e2e/model.test.mjs")
            .current_dir(&root),
        "web client state tests",
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target directory")
        .join("web-e2e");
    let started = Instant::now();
    let output = run(
        Command::new("node")
            .arg("web/e2e/run.mjs")
            .current_dir(&root)
            .env("CHATLOG_BIN", env!("CARGO_BIN_EXE_chatlog-server"))
            .env("CHATLOG_E2E_PORT", free_port().to_string())
            .env("CHATLOG_E2E_DIR", dir.path())
            .env("CHATLOG_E2E_ARTIFACTS", &artifacts),
        "web/e2e/run.mjs",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The scenario ran to its end (a script that stopped early must not pass).
    assert!(
        stdout.lines().any(|l| l.ends_with(" passed, 0 failed")) && !stdout.contains("FAIL"),
        "{stdout}"
    );
    eprintln!(
        "web e2e: {:.1} s, screenshots in {}",
        started.elapsed().as_secs_f64(),
        artifacts.display()
    );
}
