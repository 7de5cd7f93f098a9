//! Shared helpers of the integration tests: the kill -9 crash harness, and copying a
//! directory tree. Each test binary uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Starts this test binary again running only `entry_point` (a test that acts as the child
/// when `child_env` is set), waits until it prints a line ending in "ready", lets it run for
/// `run_ms` more, SIGKILLs it and returns every line it printed. Panics, with the child's
/// stderr, if it never got ready.
pub fn run_and_kill(
    entry_point: &str,
    env: &[(&str, String)],
    run_ms: u64,
    what: &str,
) -> Vec<String> {
    let stderr_dir = tempfile::tempdir().unwrap();
    let stderr_path = stderr_dir.path().join("child-stderr.txt");
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", entry_point, "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.ends_with("ready") {
                let _ = ready_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    // Kill at a random moment after the child is up and writing.
    let _ = ready_rx.recv_timeout(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(run_ms));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let lines = reader.join().unwrap();
    assert!(
        lines.iter().any(|l| l.ends_with("ready")),
        "{what}: child never got ready ({} lines of output); stderr:\n{}",
        lines.len(),
        read(&stderr_path)
    );
    lines
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[path = "../support/fs.rs"]
pub mod fs;
