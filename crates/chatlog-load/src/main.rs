//! `chatlog-load`: a load generator for chatlog-server, and the same workload on Redis Streams.
//!
//! It opens N authenticated connections across M chats of G members, sends at a target rate (or
//! as fast as a bounded number of outstanding sends per connection allows), and reports
//! throughput, send → durable-ack latency and sender → recipient latency (the send timestamp
//! travels in the message body), order/gap violations, errors, and the server's RSS.
//!
//! # Processes
//!
//! The process the user starts is the parent. It creates the chats, then re-executes its own
//! binary as `--procs` worker processes (by default as many as keep each under
//! [`workload::SOCKETS_PER_PROCESS_MAX`] sockets: one process may open at most 20,000 files
//! here). Worker `k` owns a contiguous slice of the connections and binds them to source address
//! 127.0.0.(k+1). The parent starts and stops every worker's measured window together, reads the
//! server's RSS, and merges the workers' counters and histograms (see [`worker`] for the
//! protocol between them).
//!
//! # Modes
//!
//! - `send`: warm up for `--warmup-secs`, measure for `--duration-secs`.
//! - `probe` (chatlog only): one connection per `--url` writes steadily and prints every outcome,
//!   for failover timing (see [`probe`]); no workers, no summary.
//! - `idle` (chatlog only): authenticate every connection, wait for `synced`, hold them for
//!   `--duration-secs`, then report (RSS after − RSS before) / connections: the server's memory
//!   per idle authenticated connection.

mod chatlog_target;
mod cli;
mod nats_target;
mod probe;
mod redis_target;
mod send_loop;
mod stats;
mod worker;
mod workload;

use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::cli::{Args, Mode, Target};
use crate::stats::{Stats, Summary};
use crate::worker::{COMMAND_START, COMMAND_STOP, WorkerLine, WorkerPlan};

/// Longest wait for a worker to set up all its connections.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Extra time a worker gets to report, beyond its drain time and task join timeout.
const RESULT_GRACE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match (args.worker_index, args.workers) {
        (Some(index), Some(workers)) => run_worker(args, index, workers),
        (None, None) => run_parent(args),
        _ => Err(anyhow::anyhow!("--worker-index and --workers go together")),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("chatlog-load: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Worker process: a multi-threaded runtime sized to its share of the cores.
fn run_worker(args: Args, index: usize, workers: usize) -> anyhow::Result<ExitCode> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = match args.worker_threads {
        0 => (cores / workers).max(1),
        threads => threads,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(worker::run(args, index, workers))?;
    Ok(ExitCode::SUCCESS)
}

/// Parent process: set up, run the workers, summarise.
fn run_parent(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.mode == Mode::Probe {
        args.validate().map_err(anyhow::Error::msg)?;
        runtime.block_on(probe::run(&args, &make_run_id()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let summary = runtime.block_on(orchestrate(&args))?;
    let json = serde_json::to_string_pretty(&summary)?;
    if args.json {
        println!("{json}");
    } else {
        print!("{}", summary.to_text());
    }
    if let Some(path) = &args.json_file {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.compare_with {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let baseline: Summary =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let comparison = summary.compare_text(&baseline);
        if args.json {
            eprint!("{comparison}");
        } else {
            print!("{comparison}");
        }
    }
    if summary.order_violations > 0 {
        eprintln!(
            "chatlog-load: {} order/gap violations: events arrived out of order or with gaps",
            summary.order_violations
        );
        return Ok(ExitCode::FAILURE);
    }
    if summary.connections_ready == 0 {
        eprintln!("chatlog-load: no connection could be set up");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// A run id: the low 40 bits of the Unix time in ms, in hex (10 characters), so that devices,
/// titles and client message ids never collide with an earlier run's.
fn make_run_id() -> String {
    format!("{:x}", (workload::now_us() / 1_000) & ((1 << 40) - 1))
}

/// The VmRSS of process `pid`, in bytes.
fn read_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss_bytes(&status).with_context(|| format!("no VmRSS in {path}"))
}

/// The `VmRSS:` line of a `/proc/PID/status` text, in bytes.
fn parse_vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next()? {
        "kB" => Some(value * 1024),
        _ => None,
    }
}

/// One running worker process and its pipes.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    /// Sends one line.
    async fn send_line(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Reads the worker's next protocol line.
    async fn read_line(&mut self) -> anyhow::Result<WorkerLine> {
        let line = self
            .stdout
            .next_line()
            .await?
            .context("worker exited without reporting")?;
        serde_json::from_str(&line).with_context(|| format!("parsing worker line {line:?}"))
    }
}

/// Creates the chats, runs the workers through the window, and merges their results.
async fn orchestrate(args: &Args) -> anyhow::Result<Summary> {
    let layout = args.validate().map_err(anyhow::Error::msg)?;
    let procs = args.effective_procs();
    let run_id = make_run_id();
    let started = tokio::time::Instant::now();
    let chat_ids = match (args.target, args.chats) {
        (_, 0) => Vec::new(),
        (Target::Chatlog, _) => chatlog_target::create_chats(args, &layout, &run_id).await?,
        (Target::Redis, _) => redis_target::chat_keys(layout.chats()),
        (Target::Nats, _) => nats_target::create_stream(args, layout.chats()).await?,
    };
    eprintln!(
        "chatlog-load: run {run_id}: {} users, {} chats ready in {:.1} s; starting {procs} worker(s)",
        layout.users(),
        chat_ids.len(),
        started.elapsed().as_secs_f64()
    );
    let rss_before = args.server_pid.map(read_rss_bytes).transpose()?;
    let plan = serde_json::to_string(&WorkerPlan { run_id, chat_ids })?;

    let exe = std::env::current_exe().context("locating this binary")?;
    let mut workers = Vec::with_capacity(procs);
    for index in 0..procs {
        let mut child = tokio::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .arg("--worker-index")
            .arg(index.to_string())
            .arg("--workers")
            .arg(procs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        let mut worker = Worker {
            child,
            stdin,
            stdout,
        };
        worker.send_line(&plan).await?;
        workers.push(worker);
    }

    let connecting = tokio::time::Instant::now();
    let (mut ready, mut failed) = (0u64, 0u64);
    for worker in &mut workers {
        let line = tokio::time::timeout(READY_TIMEOUT, worker.read_line())
            .await
            .context("a worker did not get ready in time")??;
        match line {
            WorkerLine::Ready {
                ready: r,
                failed: f,
            } => {
                ready += r;
                failed += f;
            }
            WorkerLine::Result(_) => bail!("worker reported a result before it was ready"),
        }
    }
    eprintln!(
        "chatlog-load: {ready} connections ready, {failed} failed, in {:.1} s",
        connecting.elapsed().as_secs_f64()
    );

    let hold = Duration::from_secs(args.duration_secs);
    if args.mode == Mode::Send {
        for worker in &mut workers {
            worker.send_line(COMMAND_START).await?;
        }
        tokio::time::sleep(Duration::from_secs(args.warmup_secs) + hold).await;
    } else {
        tokio::time::sleep(hold).await;
    }
    let rss_after = args.server_pid.map(read_rss_bytes).transpose()?;
    for worker in &mut workers {
        worker.send_line(COMMAND_STOP).await?;
    }

    let result_timeout = Duration::from_millis(args.drain_ms) + RESULT_GRACE;
    let mut merged = Stats::default();
    for worker in &mut workers {
        let line = tokio::time::timeout(result_timeout, worker.read_line())
            .await
            .context("a worker did not report in time")??;
        match line {
            WorkerLine::Result(stats) => merged.merge(&stats),
            WorkerLine::Ready { .. } => bail!("worker reported ready twice"),
        }
    }
    for mut worker in workers {
        drop(worker.stdin);
        let status = worker.child.wait().await?;
        if !status.success() {
            bail!("a worker exited with {status}");
        }
    }
    Ok(Summary::new(args, procs, &merged, rss_before, rss_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_from_proc_status() {
        let status = "Name:\tchatlog-server\nVmPeak:\t  999 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss_bytes(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss_bytes("Name:\tx\n"), None);
        assert!(read_rss_bytes(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn run_ids_are_short_enough_for_cmids() {
        let id = make_run_id();
        assert!(
            !id.is_empty() && id.len() <= worker::RUN_ID_CHARS_MAX,
            "{id}"
        );
    }
}
