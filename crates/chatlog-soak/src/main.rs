//! `chatlog-soak`: kills the single-node `chatlog-server` binary with SIGKILL N times during a
//! mixed load, restarts it on the same data directory each time and checks every acknowledged
//! message, edit, delete, membership change and receipt (see `verify.rs` for the list).
//! Exits 1 on any violation, printing them; the data directory is kept for inspection.
//!
//! `scripts/soak-server N` builds the release binaries and runs this.

mod client;
mod load;
mod model;
mod verify;

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chatlog_server::auth::Auth;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use model::{Counts, Model};

const SECRET: &str = "soak-secret-0123456789abcdef";
/// The creator of every chat (also a load client).
const CREATOR: &str = "u0";

#[derive(Parser, Debug)]
#[command(name = "chatlog-soak", about = "kill -9 soak test of chatlog-server")]
struct Args {
    /// Kill/restart cycles.
    #[arg(long, default_value_t = 100)]
    cycles: usize,
    /// The server binary.
    #[arg(long, default_value = "target/release/chatlog-server")]
    server: PathBuf,
    /// Concurrent load clients (one user each; the first is the chats' creator).
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Group chats the clients share.
    #[arg(long, default_value_t = 3)]
    chats: usize,
    /// Shortest time from "listening" to SIGKILL, in ms.
    #[arg(long, default_value_t = 100)]
    kill_min_ms: u64,
    /// Longest time from "listening" to SIGKILL, in ms.
    #[arg(long, default_value_t = 1500)]
    kill_max_ms: u64,
    /// Random seed (default: from the clock; printed so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Data directory (default: a new temporary one, removed on success).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

struct Server {
    child: Child,
    url: String,
}

async fn start(args: &Args, dir: &std::path::Path) -> anyhow::Result<Server> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("server.log"))?;
    let mut child = Command::new(&args.server)
        .args(["serve", "--listen", "127.0.0.1:0", "--rate-limit", "0"])
        .arg("--data-dir")
        .arg(dir)
        .args(["--auth-secret", SECRET])
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", args.server.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    let read = reader.read_line(&mut line);
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .context("server did not print its address within 30 s")??;
    // "chatlog-server listening on ws://127.0.0.1:PORT/v1/ws"
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("ws://"))
        .with_context(|| format!("no address in {line:?} (see the server log)"))?
        .to_owned();
    Ok(Server { child, url })
}

fn token(user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 24 * 3600;
    Auth::new(SECRET.as_bytes())
        .expect("the soak secret is valid")
        .sign(user, exp)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (temp, dir) = match &args.data_dir {
        Some(d) => (None, d.clone()),
        None => match tempfile::Builder::new().prefix("chatlog-soak-").tempdir() {
            Ok(t) => {
                let d = t.path().join("data");
                (Some(t), d)
            }
            Err(e) => {
                eprintln!("error: temporary directory: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match soak(&args, &dir).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            if let Some(t) = temp {
                let kept = t.keep();
                eprintln!("data directory kept: {}", kept.display());
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(t) = temp {
                let kept = t.keep();
                eprintln!("data directory kept: {}", kept.display());
            }
            ExitCode::FAILURE
        }
    }
}

/// `Ok(false)`: violations were found (already printed).
async fn soak(args: &Args, dir: &std::path::Path) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.clients >= 2 && args.chats >= 1,
        "need ≥ 2 clients, ≥ 1 chat"
    );
    anyhow::ensure!(args.kill_min_ms <= args.kill_max_ms, "kill window is empty");
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    std::fs::create_dir_all(dir)?;
    println!(
        "chatlog-soak: {} cycles, {} clients, {} chats, kill after {}-{} ms, seed {seed}, data {}",
        args.cycles,
        args.clients,
        args.chats,
        args.kill_min_ms,
        args.kill_max_ms,
        dir.display()
    );
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let users: Vec<String> = (0..args.clients).map(|i| format!("u{i}")).collect();
    let mut server = start(args, dir).await?;
    // The chats: created once, by u0, with every load client as a member.
    let mut chats = Vec::new();
    {
        let mut c =
            client::Client::connect(&server.url, &token(CREATOR), "setup", &Default::default())
                .await?;
        let members: Vec<&String> = users.iter().skip(1).collect();
        for i in 0..args.chats {
            let r = c
                .ok(json!({"op": "create_chat", "members": members, "title": format!("soak {i}")}))
                .await?;
            chats.push(r["chat"].as_str().context("no chat id")?.to_owned());
        }
    }
    let model = Arc::new(Mutex::new(Model::default()));
    let mut total = Counts::default();
    let mut total_checks = 0u64;
    let mut events_last = 0u64;
    for cycle in 1..=args.cycles {
        let cycle_started = Instant::now();
        let mut tasks = Vec::new();
        for (i, user) in users.iter().enumerate() {
            let spec = load::Spec {
                url: server.url.clone(),
                token: token(user),
                user: user.clone(),
                is_creator: user == CREATOR,
                chats: chats.clone(),
                cycle,
                seed: seed ^ ((cycle as u64) << 20) ^ i as u64,
            };
            tasks.push(tokio::spawn(load::run(spec, model.clone())));
        }
        let kill_after = rng.random_range(args.kill_min_ms..=args.kill_max_ms);
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        server.child.start_kill()?; // SIGKILL
        server.child.wait().await?;
        let mut violations = Vec::new();
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(30), t).await {
                Ok(Ok(load::End::Disconnected)) => {}
                Ok(Ok(load::End::Violation(v))) => violations.push(v),
                Ok(Err(e)) => violations.push(format!("load client panicked: {e}")),
                Err(_) => violations.push("a load client did not stop after the kill".into()),
            }
        }
        let restart = Instant::now();
        server = start(args, dir).await?;
        let restart_ms = restart.elapsed().as_millis();
        let check_started = Instant::now();
        let users_ref = &users;
        let target = verify::Target {
            url: &server.url,
            creator: CREATOR,
            users: users_ref,
            chats: &chats,
            token,
        };
        let mut m = std::mem::take(&mut *model.lock().unwrap());
        let result = verify::check(&target, &mut m, &mut rng).await;
        let cycle_counts = std::mem::take(&mut m.cycle);
        let (found, checked) = match result {
            Ok(r) => r,
            Err(e) => {
                *model.lock().unwrap() = m;
                return Err(e.context(format!("cycle {cycle}: checking after the restart")));
            }
        };
        violations.extend(found);
        total.add(&cycle_counts);
        let checks = checked.acked_sends + checked.acked_ops + checked.cursors + checked.retries;
        total_checks += checks;
        events_last = checked.events;
        println!(
            "cycle {cycle}/{}: killed after {kill_after} ms; acknowledged {} ops ({} sends, {} edits, \
             {} deletes, {} cursor moves, {} member changes); checked {} events, {} acked sends, \
             {} acked ops, {} cursors, {} retries; restart {restart_ms} ms, check {} ms, cycle {} ms",
            args.cycles,
            cycle_counts.total(),
            cycle_counts.sends,
            cycle_counts.edits,
            cycle_counts.deletes,
            cycle_counts.cursor_moves,
            cycle_counts.member_changes,
            checked.events,
            checked.acked_sends,
            checked.acked_ops,
            checked.cursors,
            checked.retries,
            check_started.elapsed().as_millis(),
            cycle_started.elapsed().as_millis(),
        );
        *model.lock().unwrap() = m;
        if !violations.is_empty() {
            eprintln!("VIOLATIONS in cycle {cycle} ({}):", violations.len());
            for v in violations.iter().take(50) {
                eprintln!("  {v}");
            }
            eprintln!(
                "seed {seed}; server log: {}",
                dir.with_extension("server.log").display()
            );
            let _ = server.child.start_kill();
            let _ = server.child.wait().await;
            return Ok(false);
        }
    }
    let _ = server.child.start_kill();
    let _ = server.child.wait().await;
    let m = model.lock().unwrap();
    println!(
        "chatlog-soak: OK: {} cycles survived (kill -9 each), {} ops acknowledged ({} sends, {} edits, \
         {} deletes, {} cursor moves, {} member changes), {} acknowledgement checks in all, \
         {} events in history at the end, {} distinct acked sends, {:.1} s",
        args.cycles,
        total.total(),
        total.sends,
        total.edits,
        total.deletes,
        total.cursor_moves,
        total.member_changes,
        total_checks,
        events_last,
        m.sends.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(true)
}
