//! Benchmarks of the chat engine (`chatlog::engine`), the figures of DESIGN.md's chat targets.
//!
//! All sections are custom measurement loops (criterion reports means only; these need
//! percentiles, fixed-duration throughput with many callers, and a process killed with
//! SIGKILL). In the order they run:
//! - `append`: durable `send` throughput, 200-byte bodies, 1,000 chats, with 64 threads each
//!   calling `send` (one in flight), and 64 threads each keeping 16 `send_ticket`s in flight
//!   (waited in order); then 64 tasks on one current-thread tokio runtime doing the same
//!   (tickets awaited as futures), on the database the thread cases filled; then single-caller
//!   `send` latency percentiles.
//! - `resume`: a device of a user in 1,000 chats is registered, 10 messages are sent into each
//!   chat, then `resume(user, device, {})` is timed.
//! - `reopen`: a child process (this binary, started again with `CHATLOG_ENGINE_BENCH_CHILD`)
//!   fills ONE chat with `HISTORY_EVENTS` messages, prints "done" and is killed with SIGKILL;
//!   the parent times `Engine::open` on that directory.
//! - `history`: pages of 50 from that chat: the latest page and pages `before` a random seq.
//!
//! Run with `cargo bench -p chatlog --bench engine`. Without `--bench` (as `cargo test
//! --all-targets` runs it) every section runs once at a tiny scale, as a smoke test. Data lives
//! under `CHATLOG_BENCH_DIR`, by default the target directory's `tmp/`: it must be on the disk
//! being measured, never a tmpfs. Each figure is printed with the 1-minute load average at the
//! time it was taken; before each section the bench waits (up to `LOAD_WAIT_MAX`) for the load
//! to fall to `LOAD_MAX`.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use chatlog::engine::{Engine, EngineConfig};

/// The allocator `chatlog-server` uses (an embedding service picks its own).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Message body size the targets are stated in.
const BODY_BYTES: usize = 200;
/// Concurrent callers of the throughput cases.
const CALLERS: usize = 64;
/// Tickets each caller keeps in flight in the pipelined case.
const TICKETS_IN_FLIGHT: usize = 16;
/// Chats the append workload spreads over.
const CHATS: usize = 1_000;
/// Messages per chat sent after the device registers, for `resume`.
const RESUME_PENDING_PER_CHAT: usize = 10;
/// Page size of the history figures.
const PAGE: usize = 50;
/// Environment variable that turns this binary into the populating child of `reopen`.
const CHILD_ENV: &str = "CHATLOG_ENGINE_BENCH_CHILD";
/// Environment variable carrying the child's event count.
const CHILD_EVENTS_ENV: &str = "CHATLOG_ENGINE_BENCH_EVENTS";
/// The 1-minute load average above which a section waits before it starts.
const LOAD_MAX: f64 = 1.5;
/// The longest a section waits for the load to fall.
const LOAD_WAIT_MAX: Duration = Duration::from_secs(90);

/// Scale of one run.
struct Scale {
    /// Duration of each throughput case.
    throughput_for: Duration,
    /// Sends timed for the single-caller latency.
    latency_sends: usize,
    /// Events in the history chat.
    history_events: usize,
    /// History pages timed per shape.
    history_pages: usize,
    /// Resume repetitions.
    resume_runs: usize,
    /// Whether to wait for a quiet machine.
    wait_for_load: bool,
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let events = std::env::var(CHILD_EVENTS_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .expect("child needs an event count");
        child_populate(Path::new(&dir), events);
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let filter = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .cloned()
        .unwrap_or_default();
    let scale = if bench {
        Scale {
            throughput_for: Duration::from_secs(10),
            latency_sends: 3_000,
            // CHATLOG_BENCH_HISTORY_EVENTS overrides (e.g. 10000000 for the 10 M).
            history_events: std::env::var("CHATLOG_BENCH_HISTORY_EVENTS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000),
            history_pages: 20_000,
            resume_runs: 5,
            wait_for_load: true,
        }
    } else {
        Scale {
            throughput_for: Duration::from_millis(200),
            latency_sends: 20,
            history_events: 2_000,
            history_pages: 100,
            resume_runs: 1,
            wait_for_load: false,
        }
    };
    let root = std::env::var_os("CHATLOG_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
        .join("engine-bench");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("bench dir");
    println!("engine bench: data under {}", root.display());

    if filter.is_empty() || "append".contains(&filter) || "resume".contains(&filter) {
        append_and_resume(&root.join("append"), &scale, &filter);
    }
    if filter.is_empty() || "reopen".contains(&filter) || "history".contains(&filter) {
        reopen_and_history(&root.join("history"), &scale);
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// The 1-minute load average.
fn load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Waits (bounded) for the machine to be quiet; returns the load the section starts at.
fn settle(scale: &Scale) -> f64 {
    if scale.wait_for_load {
        let start = Instant::now();
        while load() > LOAD_MAX && start.elapsed() < LOAD_WAIT_MAX {
            std::thread::sleep(Duration::from_secs(5));
        }
    }
    load()
}

/// CPU time (ns) the benchmark's caller threads used, each added as the thread ends (read
/// from `/proc/thread-self/schedstat`, exact, where the 10 ms ticks of `stat` would lose up
/// to a tick per thread).
static CALLERS_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// Adds the calling thread's CPU time so far to [`CALLERS_CPU_NS`]; call as a caller thread
/// ends.
fn count_caller_cpu() {
    let ns = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    CALLERS_CPU_NS.fetch_add(ns, Ordering::Relaxed);
}

/// CPU time (clock ticks of 10 ms) used so far by this process, per engine thread name
/// (`chatlog-*`, `rocksdb*`, alive when read); "callers" (the benchmark's caller threads,
/// which have ended by the time a case is read: [`count_caller_cpu`]); and "ended/main",
/// the rest: engine threads that ended (each segment's `chatlog-prealloc`, each ingestion's
/// `chatlog-ingest`) and the main thread.
fn cpu_by_thread() -> HashMap<String, u64> {
    /// `utime + stime` of a `stat` line: `pid (comm) state ...`, where comm may hold spaces.
    fn ticks(stat: &str) -> Option<(String, u64)> {
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
        let t = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((stat[open + 1..close].to_owned(), t))
    }
    const TICK_NS: u64 = 10_000_000;
    let mut out = HashMap::new();
    let total = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(0, |(_, t)| t);
    let mut named = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some((comm, t)) = std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|s| ticks(&s))
        else {
            continue;
        };
        if comm.starts_with("chatlog-") || comm.starts_with("rocksdb") {
            let group = comm.trim_end_matches(|c: char| c.is_ascii_digit() || c == ':');
            *out.entry(group.to_owned()).or_default() += t;
            named += t;
        }
    }
    let callers = CALLERS_CPU_NS.load(Ordering::Relaxed) / TICK_NS;
    out.insert("callers".to_owned(), callers);
    out.insert(
        "ended/main".to_owned(),
        total.saturating_sub(named + callers),
    );
    out
}

/// CPU µs per message between two [`cpu_by_thread`] samples: the total and each thread group
/// using at least 2 % of it. (An engine thread that ended between the samples counts under
/// "ended/main".)
fn cpu_per_msg(before: &HashMap<String, u64>, after: &HashMap<String, u64>, msgs: u64) -> String {
    const TICK_US: f64 = 10_000.0;
    let mut used: Vec<(String, u64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .collect();
    used.sort_by_key(|b| std::cmp::Reverse(b.1));
    let total: u64 = used.iter().map(|(_, v)| v).sum();
    let per = |t: u64| t as f64 * TICK_US / msgs.max(1) as f64;
    let parts: Vec<String> = used
        .iter()
        .filter(|(_, v)| *v * 50 >= total)
        .map(|(k, v)| format!("{k} {:.1}", per(*v)))
        .collect();
    format!("{:.1} µs CPU/msg ({})", per(total), parts.join(", "))
}

fn body() -> String {
    "x".repeat(BODY_BYTES)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn report_latency(name: &str, mut samples: Vec<Duration>, load_at_start: f64) {
    samples.sort_unstable();
    println!(
        "{name}: n={} p50={:.1}µs p99={:.1}µs p99.9={:.1}µs max={:.1}µs (load {:.2} → {:.2})",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        percentile(&samples, 0.999).as_secs_f64() * 1e6,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
        load_at_start,
        load(),
    );
}

fn append_and_resume(dir: &Path, scale: &Scale, filter: &str) {
    let engine = Arc::new(Engine::open(dir, EngineConfig::default()).expect("open"));
    let start = Instant::now();
    let tickets: Vec<_> = (0..CHATS)
        .map(|_| engine.create_chat_ticket("u0", &["u1".to_owned()], None, false))
        .collect();
    let chats: Arc<Vec<String>> = Arc::new(
        tickets
            .into_iter()
            .map(|t| match t.wait().expect("create") {
                chatlog::engine::Answer::Chat(c) => c,
                other => panic!("create answered {other:?}"),
            })
            .collect(),
    );
    println!("setup: {CHATS} chats created in {:.2?}", start.elapsed());

    if filter.is_empty() || "append".contains(filter) {
        // Warm-up (not reported): fills caches and the first segment.
        throughput(
            &engine,
            &chats,
            "warmup",
            1,
            Duration::from_secs(1).min(scale.throughput_for),
        );
        // CHATLOG_BENCH_APPEND_DEPTHS (e.g. "16") runs only the listed depths, for profiling.
        let depths: Vec<usize> = std::env::var("CHATLOG_BENCH_APPEND_DEPTHS")
            .ok()
            .map(|v| v.split(',').filter_map(|d| d.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1, TICKETS_IN_FLIGHT]);
        // Then the same load from 64 tasks on one tokio thread, as a server embeds the engine:
        // a ticket is a future, so a finished batch wakes the runtime, not 64 threads.
        // CHATLOG_BENCH_APPEND_TOKIO=0 skips it, =only runs it alone (on a fresh database).
        let tokio_case = std::env::var("CHATLOG_BENCH_APPEND_TOKIO").unwrap_or_default();
        let mut cases: Vec<(bool, usize)> = match tokio_case.as_str() {
            "only" => Vec::new(),
            _ => depths.into_iter().map(|depth| (false, depth)).collect(),
        };
        if tokio_case != "0" {
            cases.push((true, TICKETS_IN_FLIGHT));
        }
        for (tokio, depth) in cases {
            let l = settle(scale);
            let cpu_before = cpu_by_thread();
            let (run, tag, callers) = if tokio {
                (
                    throughput_async as Throughput,
                    "a",
                    "tasks on one tokio thread",
                )
            } else {
                (throughput as Throughput, "d", "callers")
            };
            let (n, el) = run(
                &engine,
                &chats,
                &format!("{tag}{depth}"),
                depth,
                scale.throughput_for,
            );
            let cpu = cpu_per_msg(&cpu_before, &cpu_by_thread(), n);
            println!(
                "append {CALLERS} {callers} x {depth} in flight: {n} msgs in {el:.2?} = {:.0} \
                 msg/s (load {l:.2} → {:.2}); {cpu}",
                n as f64 / el.as_secs_f64(),
                load()
            );
        }
        let l = settle(scale);
        let b = body();
        let mut samples = Vec::with_capacity(scale.latency_sends);
        for k in 0..scale.latency_sends {
            let chat = &chats[k % CHATS];
            let t = Instant::now();
            engine
                .send("u0", chat, &format!("lat{k}"), Some(b.clone()), None)
                .expect("send");
            samples.push(t.elapsed());
        }
        report_latency("append single caller send latency", samples, l);
    }

    if filter.is_empty() || "resume".contains(filter) {
        let l = settle(scale);
        engine.register_device("u1", "d1").expect("register");
        let b = body();
        let tickets: Vec<_> = (0..RESUME_PENDING_PER_CHAT)
            .flat_map(|k| {
                chats
                    .iter()
                    .map(|chat| {
                        engine.send_ticket("u0", chat, &format!("res{k}"), Some(b.clone()), None)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        for t in tickets {
            t.wait().expect("send");
        }
        let mut times = Vec::new();
        for _ in 0..scale.resume_runs {
            let t = Instant::now();
            let events = engine.resume("u1", "d1", &HashMap::new()).expect("resume");
            times.push(t.elapsed());
            assert_eq!(
                events.len(),
                CHATS * RESUME_PENDING_PER_CHAT,
                "resume events"
            );
        }
        let first = times[0];
        times.sort_unstable();
        println!(
            "resume {CHATS} chats x {RESUME_PENDING_PER_CHAT} pending: first {first:.2?}, \
             median of {} {:.2?}, min {:.2?} (load {l:.2} → {:.2})",
            times.len(),
            times[times.len() / 2],
            times[0],
            load()
        );
    }
    match Arc::try_unwrap(engine) {
        Ok(e) => e.close(),
        Err(_) => panic!("engine still shared"),
    }
}

/// [`throughput`] or [`throughput_async`].
type Throughput = fn(&Arc<Engine>, &Arc<Vec<String>>, &str, usize, Duration) -> (u64, Duration);

/// Runs `CALLERS` threads, each keeping `depth` sends in flight, for `run_for`; returns the
/// messages acknowledged durable and the elapsed time.
fn throughput(
    engine: &Arc<Engine>,
    chats: &Arc<Vec<String>>,
    tag: &str,
    depth: usize,
    run_for: Duration,
) -> (u64, Duration) {
    let barrier = Arc::new(Barrier::new(CALLERS + 1));
    let handles: Vec<_> = (0..CALLERS)
        .map(|t| {
            let engine = engine.clone();
            let chats = chats.clone();
            let barrier = barrier.clone();
            let tag = tag.to_owned();
            std::thread::spawn(move || {
                let b = body();
                let mut rng = StdRng::seed_from_u64(t as u64);
                let mut q = VecDeque::with_capacity(depth);
                let mut done = 0u64;
                barrier.wait();
                let start = Instant::now();
                let mut k = 0u64;
                while start.elapsed() < run_for {
                    let chat = &chats[rng.random_range(0..chats.len())];
                    let cmid = format!("{tag}t{t}k{k}");
                    k += 1;
                    q.push_back(engine.send_ticket("u0", chat, &cmid, Some(b.clone()), None));
                    if q.len() >= depth {
                        q.pop_front().expect("ticket").wait().expect("send");
                        done += 1;
                    }
                }
                for ticket in q {
                    ticket.wait().expect("send");
                    done += 1;
                }
                count_caller_cpu();
                done
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let n: u64 = handles.into_iter().map(|h| h.join().expect("caller")).sum();
    (n, start.elapsed())
}

/// [`throughput`] with the callers as tasks of a current-thread tokio runtime (named
/// `bench-tokio`, so its CPU is reported apart from the engine's threads): each of the
/// `CALLERS` tasks keeps `depth` tickets in flight and awaits them in order.
fn throughput_async(
    engine: &Arc<Engine>,
    chats: &Arc<Vec<String>>,
    tag: &str,
    depth: usize,
    run_for: Duration,
) -> (u64, Duration) {
    let engine = engine.clone();
    let chats = chats.clone();
    let tag = tag.to_owned();
    std::thread::Builder::new()
        .name("bench-tokio".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async move {
                let start = Instant::now();
                let tasks: Vec<_> = (0..CALLERS)
                    .map(|t| {
                        let engine = engine.clone();
                        let chats = chats.clone();
                        let tag = tag.clone();
                        tokio::spawn(async move {
                            let b = body();
                            let mut rng = StdRng::seed_from_u64(t as u64);
                            let mut q = VecDeque::with_capacity(depth);
                            let mut done = 0u64;
                            let mut k = 0u64;
                            while start.elapsed() < run_for {
                                let chat = &chats[rng.random_range(0..chats.len())];
                                let cmid = format!("{tag}t{t}k{k}");
                                k += 1;
                                q.push_back(engine.send_ticket(
                                    "u0",
                                    chat,
                                    &cmid,
                                    Some(b.clone()),
                                    None,
                                ));
                                if q.len() >= depth {
                                    q.pop_front().expect("ticket").await.expect("send");
                                    done += 1;
                                }
                            }
                            for ticket in q {
                                ticket.await.expect("send");
                                done += 1;
                            }
                            done
                        })
                    })
                    .collect();
                let mut n = 0;
                for task in tasks {
                    n += task.await.expect("caller task");
                }
                let answer = (n, start.elapsed());
                count_caller_cpu();
                answer
            })
        })
        .expect("spawn bench-tokio")
        .join()
        .expect("bench-tokio thread")
}

/// The child of `reopen`: fills one chat, says "done" once everything is durable, then waits
/// to be killed.
fn child_populate(dir: &Path, events: usize) {
    let engine = Arc::new(Engine::open(dir, EngineConfig::default()).expect("child open"));
    let chat = engine
        .create_chat("u0", &["u1".to_owned()], None, false)
        .expect("create");
    let start = Instant::now();
    let per = events.div_ceil(CALLERS);
    let handles: Vec<_> = (0..CALLERS)
        .map(|t| {
            let engine = engine.clone();
            let chat = chat.clone();
            std::thread::spawn(move || {
                let b = body();
                let mut q = VecDeque::with_capacity(TICKETS_IN_FLIGHT * 4);
                for k in 0..per {
                    let cmid = format!("t{t}k{k}");
                    q.push_back(engine.send_ticket("u0", &chat, &cmid, Some(b.clone()), None));
                    if q.len() >= TICKETS_IN_FLIGHT * 4 {
                        q.pop_front().expect("ticket").wait().expect("send");
                    }
                }
                for ticket in q {
                    ticket.wait().expect("send");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("populate");
    }
    let el = start.elapsed();
    println!(
        "populated {chat} {} {:.0}",
        per * CALLERS,
        (per * CALLERS) as f64 / el.as_secs_f64()
    );
    println!("done");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn reopen_and_history(dir: &Path, scale: &Scale) {
    let l = settle(scale);
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .env(CHILD_ENV, dir)
        .env(CHILD_EVENTS_ENV, scale.history_events.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().expect("child stdout")).lines();
    let (chat, events) = loop {
        let line = lines
            .next()
            .expect("child ended before populating")
            .expect("child stdout");
        if let Some(rest) = line.strip_prefix("populated ") {
            let mut parts = rest.split_whitespace();
            let chat = parts.next().expect("chat").to_owned();
            let events: u64 = parts.next().expect("count").parse().expect("count");
            let rate = parts.next().unwrap_or("?");
            println!(
                "history setup: {events} events in one chat by 64 callers x 64 tickets: \
                 {rate} msg/s (load {l:.2} → {:.2})",
                load()
            );
            assert_eq!(lines.next().expect("done line").expect("stdout"), "done");
            break (chat, events);
        }
    };
    child.kill().expect("SIGKILL child"); // `Child::kill` sends SIGKILL on Unix.
    let status = child.wait().expect("reap child");
    println!("child killed: {status}");

    let l = settle(scale);
    let t = Instant::now();
    let engine = Engine::open(dir, EngineConfig::default()).expect("reopen");
    let reopen = t.elapsed();
    println!(
        "reopen after kill -9 with {events} events: Engine::open took {reopen:.2?} \
         (load {l:.2} → {:.2})",
        load()
    );
    let latest = engine
        .history("u1", &chat, None, None, Some(PAGE))
        .expect("history");
    assert_eq!(
        latest.last_seq,
        events + 1,
        "all acknowledged events survived"
    );
    drop(engine);
    let t = Instant::now();
    let engine = Engine::open(dir, EngineConfig::default()).expect("reopen clean");
    println!("reopen after a clean close: {:.2?}", t.elapsed());

    let l = settle(scale);
    let mut samples = Vec::with_capacity(scale.history_pages);
    for _ in 0..scale.history_pages {
        let t = Instant::now();
        let page = engine
            .history("u1", &chat, None, None, Some(PAGE))
            .expect("history");
        samples.push(t.elapsed());
        assert_eq!(page.events.len(), PAGE);
    }
    report_latency(
        &format!("history latest page of {PAGE} ({events} events)"),
        samples,
        l,
    );

    let l = settle(scale);
    let mut rng = StdRng::seed_from_u64(7);
    let last = events + 1;
    let mut samples = Vec::with_capacity(scale.history_pages);
    for _ in 0..scale.history_pages {
        let before = rng.random_range(PAGE as u64 + 2..=last + 1);
        let t = Instant::now();
        let page = engine
            .history("u1", &chat, Some(before), None, Some(PAGE))
            .expect("history");
        samples.push(t.elapsed());
        assert_eq!(page.events.len(), PAGE);
    }
    report_latency(
        &format!("history page of {PAGE} before a random seq ({events} events)"),
        samples,
        l,
    );
    engine.close();
}
