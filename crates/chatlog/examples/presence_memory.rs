//! Memory and expiry cost of presence for many tracked users.
//!
//! ```text
//! cargo run --release -p chatlog --no-default-features --example presence_memory [USERS] [online|offline]
//! ```
//!
//! - `online` (default): `USERS` users connect, one session each (ids `user-000000` …), then
//!   heartbeat once, are all looked up, and all lapse in one `expire` call.
//! - `offline`: `USERS` users are only seeded with a `last_seen` (as after a restart).
//!
//! Memory is the growth of the process's resident set (VmRSS from `/proc/self/status`) divided
//! by `USERS`. Each mode runs in its own process: memory freed by one phase stays with malloc
//! and would be reused by the next, hiding its cost. Times are wall-clock and on-CPU time of
//! this thread (`/proc/thread-self/schedstat`), the latter being less disturbed by other
//! processes on a busy machine. Time is read here, never inside the module.

use std::error::Error;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use chatlog::presence::{Presence, PresenceConfig};

const USERS_DEFAULT: u64 = 1_000_000;

/// The resident set size of this process, in bytes (Linux only).
fn rss_bytes() -> Result<u64, Box<dyn Error>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .ok_or("no VmRSS line in /proc/self/status")?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// Nanoseconds this thread has spent on a CPU (Linux only).
fn cpu_ns() -> Result<u64, Box<dyn Error>> {
    let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let on_cpu = schedstat
        .split_whitespace()
        .next()
        .ok_or("empty /proc/thread-self/schedstat")?;
    Ok(on_cpu.parse()?)
}

/// Wall-clock and on-CPU time since it was started.
struct Stopwatch {
    wall: Instant,
    cpu_ns: u64,
}

impl Stopwatch {
    fn start() -> Result<Self, Box<dyn Error>> {
        Ok(Self {
            wall: Instant::now(),
            cpu_ns: cpu_ns()?,
        })
    }

    fn stop(&self) -> Result<(Duration, Duration), Box<dyn Error>> {
        let wall = self.wall.elapsed();
        let cpu = Duration::from_nanos(cpu_ns()?.saturating_sub(self.cpu_ns));
        Ok((wall, cpu))
    }
}

fn user_name(buffer: &mut String, index: u64) -> &str {
    buffer.clear();
    write!(buffer, "user-{index:06}").expect("writing to a String cannot fail");
    buffer
}

struct Report {
    users: u64,
    rss_before: u64,
}

impl Report {
    fn memory(&self, label: &str, rss: u64) {
        println!(
            "  {label:<28} RSS {:>7.1} MiB  +{:.0} bytes/user",
            rss as f64 / (1024.0 * 1024.0),
            rss.saturating_sub(self.rss_before) as f64 / self.users as f64
        );
    }

    fn time(&self, label: &str, (wall, cpu): (Duration, Duration)) {
        println!(
            "  {label:<28} wall {:>7.1} ms {:>5.0} ns/user   cpu {:>7.1} ms {:>5.0} ns/user",
            wall.as_secs_f64() * 1e3,
            wall.as_nanos() as f64 / self.users as f64,
            cpu.as_secs_f64() * 1e3,
            cpu.as_nanos() as f64 / self.users as f64
        );
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let users: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => USERS_DEFAULT,
    };
    let mode = std::env::args().nth(2).unwrap_or_else(|| "online".into());
    let config = PresenceConfig::default();
    let mut presence = Presence::new(config);
    let mut name = String::with_capacity(32);
    let report = Report {
        users,
        rss_before: rss_bytes()?,
    };
    println!(
        "presence, {mode}: {users} users, ttl {} ms, RSS before {:.1} MiB",
        config.ttl_ms,
        report.rss_before as f64 / (1024.0 * 1024.0)
    );

    match mode.as_str() {
        "offline" => {
            let started = Stopwatch::start()?;
            for index in 0..users {
                presence.load_last_seen([(user_name(&mut name, index), index)]);
            }
            let elapsed = started.stop()?;
            report.memory("after load_last_seen", rss_bytes()?);
            report.time("load_last_seen", elapsed);
            assert_eq!(presence.tracked_users() as u64, users);
            assert!(presence.take_dirty_last_seen().is_empty());
        }
        "online" => {
            // Connects spread over the first second (1,000 per ms for 1 M users).
            let started = Stopwatch::start()?;
            let mut online = 0u64;
            for index in 0..users {
                let now_ms = index / 1_000;
                let changes = presence.connect(user_name(&mut name, index), index, now_ms)?;
                online += changes.len() as u64;
            }
            let connect_elapsed = started.stop()?;
            report.memory("after connect", rss_bytes()?);
            assert_eq!(online, users);
            assert_eq!(presence.online_users() as u64, users);

            // One heartbeat per session, 30 s later, in the same order.
            let started = Stopwatch::start()?;
            for index in 0..users {
                let now_ms = 30_000 + index / 1_000;
                let changes = presence.heartbeat(user_name(&mut name, index), index, now_ms)?;
                assert!(changes.is_empty());
            }
            let heartbeat_elapsed = started.stop()?;
            report.memory("after one heartbeat round", rss_bytes()?);

            // Lookups of every user, as the `presence` op would do.
            let started = Stopwatch::start()?;
            let mut seen_online = 0u64;
            for index in 0..users {
                let state = presence.get(user_name(&mut name, index), 31_000);
                seen_online += u64::from(state.online);
            }
            let get_elapsed = started.stop()?;
            assert_eq!(seen_online, users);

            // Every session lapses: one call drops them all.
            let deadline_last_ms = 30_000 + users.saturating_sub(1) / 1_000 + config.ttl_ms;
            let started = Stopwatch::start()?;
            let changes = presence.expire(deadline_last_ms);
            let expire_elapsed = started.stop()?;
            assert_eq!(changes.len() as u64, users);
            assert!(changes.iter().all(|change| !change.online));
            assert_eq!(presence.online_users(), 0);
            assert_eq!(presence.sessions(), 0);
            drop(changes);
            let started = Stopwatch::start()?;
            let dirty = presence.take_dirty_last_seen();
            let drain_elapsed = started.stop()?;
            assert_eq!(dirty.len() as u64, users);
            drop(dirty);

            report.time("connect", connect_elapsed);
            report.time("heartbeat", heartbeat_elapsed);
            report.time("get", get_elapsed);
            report.time("expire (one call, all)", expire_elapsed);
            report.time("take_dirty_last_seen", drain_elapsed);
        }
        other => return Err(format!("unknown mode {other:?}: online or offline").into()),
    }
    Ok(())
}
