//! Benchmarks of the segment log, each next to the raw disk measured in the same run.
//!
//! Sections, in the order they run (each can be selected with a filter, as criterion's are):
//! - `latency`: single-writer durable append latency percentiles. Criterion reports means only,
//!   so this is a custom measurement: engine appends and raw `pwrite + fdatasync` loops on the
//!   same disk run interleaved round by round, so that load from other processes hits both.
//! - `raw_throughput`: what the disk itself does with one `pwrite + fdatasync` per batch of k
//!   entries (the bound of a perfect group commit) and with N threads each syncing its own
//!   file (no group commit at all).
//! - `append/...` (criterion): durable append throughput with 1, 8 and 64 blocking writers,
//!   64 tokio tasks each pipelining 16 `append_async` futures, and 64 threads each calling
//!   `append_batch` with 16 entries (plus, at 200 B, with 64 entries, and the two pipelined
//!   shapes with `Preallocate::Sparse`); followed by a summary with the ratio to the raw bound
//!   and the mean group-commit batch size.
//! - `roll`: latency of append batches that cross a segment roll, right after open.
//! - `read/...`: sequential `iter_from` over sealed (memory-mapped) segments and random
//!   `read(index)` (criterion means plus custom percentiles), against plain buffered reads and
//!   `pread`s of the same files; random reads are also split by their distance from a
//!   sparse-index entry.
//! - `drift` (only without a filter): the raw disk again at the end, to see whether conditions
//!   changed during the run.
//!
//! Run with `cargo bench -p chatlog --bench segment_log [-- FILTER]`; results and how to read
//! them are in `docs/benchmarks.md`. Without `--bench` (`cargo test --all-targets`) every
//! section runs once at a tiny scale, as a smoke test. Data lives under `CHATLOG_BENCH_DIR`,
//! by default the target directory's `tmp/`: it must be on the disk being measured, never a
//! tmpfs, where `fdatasync` costs nothing.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::hint::black_box;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatlog::segment::{format, name};
use chatlog::{Durability, Log, LogConfig, Preallocate};
use criterion::{BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

/// The entry size the targets are stated in.
const PAYLOAD_SMALL_BYTES: usize = 200;
/// The second entry size measured.
const PAYLOAD_LARGE_BYTES: usize = 1024;
/// A raw-baseline write size independent of entry size (the page size).
const PAGE_BYTES: usize = 4096;
/// Chunk used to zero-fill baseline files and for raw sequential reads.
const CHUNK_BYTES: usize = 1 << 20;
/// Appends each async task keeps in flight.
const ASYNC_DEPTH: usize = 16;
/// Entries per `append_batch` call in the batch-caller case.
const BATCH_ENTRIES: usize = 16;
/// Entries per `append_batch` call in the larger batch-caller comparison.
const BATCH_ENTRIES_LARGE: usize = 64;
/// Entries per `append_batch` call when filling read fixtures (outside any timed region).
const FILL_BATCH_ENTRIES: usize = 4096;
/// Entries per `append_batch` call in the roll section.
const ROLL_BATCH_ENTRIES: usize = 64;

const _: () = assert!(BATCH_ENTRIES < BATCH_ENTRIES_LARGE);
const _: () = assert!(PAYLOAD_SMALL_BYTES < PAYLOAD_LARGE_BYTES);

/// How much work each section does: the full run, or a smoke test under `cargo test`.
#[derive(Debug, Clone, Copy)]
struct Scale {
    segment_size_bytes: u64,
    latency_rounds: usize,
    latency_ops_per_round: usize,
    latency_warmup_ops: usize,
    raw_duration: Duration,
    read_fixture_sealed_segments: usize,
    sequential_passes: usize,
    random_reads: usize,
    roll_count: usize,
    /// Batches after a roll whose latency is reported with it (the spare segment is being
    /// zero-filled in the background meanwhile).
    roll_aftermath_batches: usize,
}

const FULL: Scale = Scale {
    segment_size_bytes: 64 << 20,
    latency_rounds: 500,
    latency_ops_per_round: 10,
    latency_warmup_ops: 200,
    raw_duration: Duration::from_millis(500),
    read_fixture_sealed_segments: 4,
    sequential_passes: 5,
    random_reads: 200_000,
    roll_count: 3,
    roll_aftermath_batches: 200,
};

const SMOKE: Scale = Scale {
    segment_size_bytes: 1 << 20,
    latency_rounds: 2,
    latency_ops_per_round: 10,
    latency_warmup_ops: 5,
    raw_duration: Duration::from_millis(20),
    read_fixture_sealed_segments: 2,
    sequential_passes: 1,
    random_reads: 1_000,
    roll_count: 2,
    roll_aftermath_batches: 4,
};

/// What the command line asked for. Criterion parses the same arguments for its own groups.
#[derive(Debug)]
struct Options {
    scale: Scale,
    /// Criterion's FILTER, matched here as a substring of section names.
    filter: Option<String>,
    list_only: bool,
}

impl Options {
    fn from_args() -> Self {
        // Criterion options that take a value: their value is not the filter.
        const VALUE_FLAGS: &[&str] = &[
            "--color",
            "--save-baseline",
            "--baseline",
            "--baseline-lenient",
            "--format",
            "--profile-time",
            "--load-baseline",
            "--sample-size",
            "--warm-up-time",
            "--measurement-time",
            "--nresamples",
            "--noise-threshold",
            "--confidence-level",
            "--significance-level",
            "--plotting-backend",
            "--output-format",
        ];
        let args: Vec<String> = std::env::args().skip(1).collect();
        let bench = args.iter().any(|a| a == "--bench");
        let test = args.iter().any(|a| a == "--test");
        let list_only = args.iter().any(|a| a == "--list");
        let mut filter = None;
        let mut value_next = false;
        for arg in &args {
            if value_next {
                value_next = false;
            } else if arg.starts_with('-') {
                value_next = VALUE_FLAGS.contains(&arg.as_str());
            } else {
                filter = Some(arg.clone());
            }
        }
        Options {
            scale: if bench && !test { FULL } else { SMOKE },
            filter,
            list_only,
        }
    }

    fn full(&self) -> bool {
        self.scale.segment_size_bytes == FULL.segment_size_bytes
    }

    /// Whether any of the named sections or benchmarks passes the filter.
    fn wants(&self, names: &[&str]) -> bool {
        if self.list_only {
            return false;
        }
        match &self.filter {
            None => true,
            Some(f) => names.iter().any(|n| n.contains(f.as_str())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Environment and helpers
// ---------------------------------------------------------------------------------------------

fn bench_root() -> PathBuf {
    let root = std::env::var_os("CHATLOG_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&root).expect("create the benchmark data directory");
    root
}

fn temp_dir(root: &Path) -> TempDir {
    tempfile::Builder::new()
        .prefix("segment_log-")
        .tempdir_in(root)
        .expect("create a temporary directory")
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("({program} failed: {e})"))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn section(title: &str) {
    println!();
    println!("=== {title}  (load average {})", load_average());
}

fn print_machine(root: &Path, options: &Options) {
    section("machine");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("nproc: {cores}");
    println!("kernel: {}", command_output("uname", &["-r"]));
    println!("data dir: {}", root.display());
    println!("{}", command_output("df", &["-T", &root.to_string_lossy()]));
    println!(
        "scale: {}",
        if options.full() {
            "full"
        } else {
            "smoke test (run with `cargo bench` for real figures)"
        }
    );
}

/// Write system calls made by this process so far (all threads), from `/proc/self/io`.
/// The writer thread issues one `pwrite` per group-commit batch, so the difference over a
/// run (minus the known writes of segment rolls) counts batches.
fn write_syscalls() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("syscw:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn payload(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ 0x5a) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn size_name(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{}KiB", bytes / 1024)
    } else {
        format!("{bytes}B")
    }
}

fn log_config(scale: Scale, preallocate: Preallocate, durability: Durability) -> LogConfig {
    let default = LogConfig::default();
    LogConfig {
        segment_size_bytes: scale.segment_size_bytes,
        // Only the smoke scale's small segments need a smaller entry bound.
        entry_size_bytes_max: default
            .entry_size_bytes_max
            .min((scale.segment_size_bytes / 2) as usize),
        preallocate,
        durability,
        ..default
    }
}

/// Opens a fresh log; for `Preallocate::Zeroed` this zero-fills and syncs the first segment,
/// which is why every caller does it outside timed regions.
fn open_log(dir: &Path, config: LogConfig) -> Log {
    Log::open(dir, config).expect("open log")
}

/// First indexes of the segment files in `dir`, ascending (the last one is active).
fn segment_firsts(dir: &Path) -> Vec<u64> {
    let mut firsts: Vec<u64> = std::fs::read_dir(dir)
        .expect("list log directory")
        .filter_map(|e| {
            let entry = e.ok()?;
            match name::parse(&entry.file_name().to_string_lossy()) {
                name::Entry::Segment(first) => Some(first),
                _ => None,
            }
        })
        .collect();
    firsts.sort_unstable();
    firsts
}

/// Encoded frame size of an entry of `payload_bytes` at a typical index of these runs.
fn frame_bytes(payload_bytes: usize) -> usize {
    format::frame_len(100_000, 0, payload_bytes)
}

/// Latency summary of a set of samples, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Stats {
    count: usize,
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

impl Stats {
    fn of(samples: &[u64]) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        // Nearest-rank percentile.
        let rank = |p: f64| {
            let r = (p / 100.0 * sorted.len() as f64).ceil() as usize;
            sorted[r.clamp(1, sorted.len()) - 1]
        };
        Stats {
            count: sorted.len(),
            p50: rank(50.0),
            p99: rank(99.0),
            p999: rank(99.9),
            max: sorted[sorted.len() - 1],
            mean: sorted.iter().sum::<u64>() as f64 / sorted.len() as f64,
        }
    }

    fn print_us(&self, label: &str) {
        let us = |ns: u64| ns as f64 / 1000.0;
        println!(
            "{label:<34} n={:<6} p50 {:>8.1} µs  p99 {:>8.1} µs  p99.9 {:>8.1} µs  max {:>9.1} µs  mean {:>8.1} µs",
            self.count,
            us(self.p50),
            us(self.p99),
            us(self.p999),
            us(self.max),
            self.mean / 1000.0
        );
    }

    fn print_ns(&self, label: &str) {
        println!(
            "{label:<34} n={:<7} p50 {:>7} ns  p99 {:>7} ns  p99.9 {:>7} ns  max {:>9} ns  mean {:>7.0} ns",
            self.count, self.p50, self.p99, self.p999, self.max, self.mean
        );
    }
}

fn print_ratio(label: &str, engine: &Stats, raw: &Stats) {
    println!(
        "{label:<58} p50 {:>5.2}x  p99 {:>5.2}x",
        engine.p50 as f64 / raw.p50 as f64,
        engine.p99 as f64 / raw.p99 as f64
    );
}

/// Per-operation cost of the timer itself (two `Instant::now` calls), so read latencies in
/// the tens of nanoseconds can be judged.
fn timer_overhead(samples: usize) -> Stats {
    let mut ns = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        ns.push(start.elapsed().as_nanos() as u64);
    }
    Stats::of(&ns)
}

// ---------------------------------------------------------------------------------------------
// Raw disk baselines
// ---------------------------------------------------------------------------------------------

/// Creates `path` of `size_bytes`, written full of zeros and synced (data and metadata), like
/// the engine's preallocated segments.
fn zero_filled(path: &Path, size_bytes: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; CHUNK_BYTES];
    let mut at = 0;
    while at < size_bytes {
        let n = (size_bytes - at).min(CHUNK_BYTES as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

/// A raw `pwrite + fdatasync` loop at sequential offsets of one file.
#[derive(Debug)]
struct RawWriter {
    file: File,
    buf: Vec<u8>,
    offset: u64,
    /// Preallocated files are overwritten in place, wrapping at their size; growing files
    /// are extended by every write.
    wrap_at_bytes: Option<u64>,
}

impl RawWriter {
    fn preallocated(path: &Path, write_bytes: usize, size_bytes: u64) -> io::Result<Self> {
        Ok(RawWriter {
            file: zero_filled(path, size_bytes)?,
            buf: payload(write_bytes).to_vec(),
            offset: 0,
            wrap_at_bytes: Some(size_bytes),
        })
    }

    fn growing(path: &Path, write_bytes: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.sync_all()?;
        Ok(RawWriter {
            file,
            buf: payload(write_bytes).to_vec(),
            offset: 0,
            wrap_at_bytes: None,
        })
    }

    fn write_sync(&mut self) -> io::Result<()> {
        let len = self.buf.len() as u64;
        if self
            .wrap_at_bytes
            .is_some_and(|wrap| self.offset + len > wrap)
        {
            self.offset = 0;
        }
        self.file.write_all_at(&self.buf, self.offset)?;
        self.file.sync_data()?;
        self.offset += len;
        Ok(())
    }
}

/// A measured rate: `ops` write+sync operations carrying `entries` entries in `elapsed`.
#[derive(Debug, Clone, Copy)]
struct Rate {
    ops: u64,
    entries: u64,
    elapsed: Duration,
}

impl Rate {
    fn ops_per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn entries_per_second(&self) -> f64 {
        self.entries as f64 / self.elapsed.as_secs_f64()
    }
}

/// One thread writing `entries_per_sync` frames with one `pwrite` and one `fdatasync`, in a
/// preallocated file: the bound of a perfect group commit with that batch size.
fn raw_group_commit(
    dir: &Path,
    frame_bytes: usize,
    entries_per_sync: usize,
    duration: Duration,
    size_bytes: u64,
) -> Rate {
    let path = dir.join(format!("raw_gc_{frame_bytes}_{entries_per_sync}"));
    let mut writer = RawWriter::preallocated(&path, frame_bytes * entries_per_sync, size_bytes)
        .expect("raw baseline file");
    let start = Instant::now();
    let mut ops = 0;
    while start.elapsed() < duration {
        writer.write_sync().expect("raw write + fdatasync");
        ops += 1;
    }
    let rate = Rate {
        ops,
        entries: ops * entries_per_sync as u64,
        elapsed: start.elapsed(),
    };
    drop(writer);
    std::fs::remove_file(&path).expect("remove raw baseline file");
    rate
}

/// `threads` threads, each doing `pwrite(frame) + fdatasync` on its own preallocated file:
/// what the disk gives many writers without group commit.
fn raw_parallel(dir: &Path, frame_bytes: usize, threads: usize, duration: Duration) -> Rate {
    const FILE_BYTES: u64 = 1 << 20;
    let mut writers: Vec<RawWriter> = (0..threads)
        .map(|t| {
            RawWriter::preallocated(&dir.join(format!("raw_par_{t}")), frame_bytes, FILE_BYTES)
                .expect("raw baseline file")
        })
        .collect();
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(threads + 1);
    let (ops, elapsed) = std::thread::scope(|s| {
        let handles: Vec<_> = writers
            .iter_mut()
            .map(|w| {
                let (stop, barrier) = (&stop, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let mut ops = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        w.write_sync().expect("raw write + fdatasync");
                        ops += 1;
                    }
                    ops
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        let ops: u64 = handles
            .into_iter()
            .map(|h| h.join().expect("raw writer thread panicked"))
            .sum();
        (ops, start.elapsed())
    });
    drop(writers);
    for t in 0..threads {
        std::fs::remove_file(dir.join(format!("raw_par_{t}"))).expect("remove raw file");
    }
    Rate {
        ops,
        entries: ops,
        elapsed,
    }
}

// ---------------------------------------------------------------------------------------------
// Section `latency`: single-writer durable append latency vs raw pwrite + fdatasync
// ---------------------------------------------------------------------------------------------

enum LatencyOp {
    Raw(RawWriter),
    Engine { log: Box<Log>, payload: Bytes },
}

impl LatencyOp {
    fn run(&mut self) {
        match self {
            LatencyOp::Raw(writer) => writer.write_sync().expect("raw write + fdatasync"),
            LatencyOp::Engine { log, payload } => {
                log.append(payload.clone()).expect("durable append");
            }
        }
    }
}

struct Variant {
    label: String,
    op: LatencyOp,
    samples_ns: Vec<u64>,
}

fn latency_section(root: &Path, scale: Scale) {
    section(
        "latency: single writer, durable (Batch) appends vs raw pwrite + fdatasync, interleaved",
    );
    let dir = temp_dir(root);
    let small = frame_bytes(PAYLOAD_SMALL_BYTES);
    let large = frame_bytes(PAYLOAD_LARGE_BYTES);
    let size = scale.segment_size_bytes;
    let raw_pre = |bytes: usize| {
        let path = dir.path().join(format!("raw_prealloc_{bytes}"));
        Variant {
            label: format!("raw prealloc {bytes} B"),
            op: LatencyOp::Raw(RawWriter::preallocated(&path, bytes, size).expect("raw file")),
            samples_ns: Vec::new(),
        }
    };
    let raw_grow = |bytes: usize| {
        let path = dir.path().join(format!("raw_growing_{bytes}"));
        Variant {
            label: format!("raw growing {bytes} B"),
            op: LatencyOp::Raw(RawWriter::growing(&path, bytes).expect("raw file")),
            samples_ns: Vec::new(),
        }
    };
    let engine = |payload_bytes: usize, preallocate: Preallocate| {
        let tag = match preallocate {
            Preallocate::Zeroed => "zeroed",
            Preallocate::Sparse => "sparse",
        };
        let log_dir = dir.path().join(format!("engine_{payload_bytes}_{tag}"));
        let start = Instant::now();
        let log = open_log(&log_dir, log_config(scale, preallocate, Durability::Batch));
        println!(
            "Log::open of a new log ({tag} first segment of {} MiB): {:.1} ms (untimed below)",
            scale.segment_size_bytes >> 20,
            start.elapsed().as_secs_f64() * 1e3
        );
        Variant {
            label: format!("engine {} ({tag})", size_name(payload_bytes)),
            op: LatencyOp::Engine {
                log: Box::new(log),
                payload: payload(payload_bytes),
            },
            samples_ns: Vec::new(),
        }
    };
    let mut variants = vec![
        raw_pre(small),
        engine(PAYLOAD_SMALL_BYTES, Preallocate::Zeroed),
        raw_pre(large),
        engine(PAYLOAD_LARGE_BYTES, Preallocate::Zeroed),
        raw_pre(PAGE_BYTES),
        raw_grow(small),
        engine(PAYLOAD_SMALL_BYTES, Preallocate::Sparse),
        raw_grow(large),
        raw_grow(PAGE_BYTES),
    ];
    for v in &mut variants {
        for _ in 0..scale.latency_warmup_ops {
            v.op.run();
        }
    }
    let total_ops = scale.latency_rounds * scale.latency_ops_per_round;
    println!(
        "{} rounds x {} ops per variant; variant order rotates every round; raw writes are the \
         engine's frame size ({small} B for 200 B, {large} B for 1 KiB) or a 4 KiB page",
        scale.latency_rounds, scale.latency_ops_per_round
    );
    for round in 0..scale.latency_rounds {
        let count = variants.len();
        for k in 0..count {
            let v = &mut variants[(k + round) % count];
            v.samples_ns.reserve(total_ops);
            for _ in 0..scale.latency_ops_per_round {
                let start = Instant::now();
                v.op.run();
                v.samples_ns.push(start.elapsed().as_nanos() as u64);
            }
        }
    }
    let stats: Vec<(String, Stats)> = variants
        .iter()
        .map(|v| (v.label.clone(), Stats::of(&v.samples_ns)))
        .collect();
    for (label, s) in &stats {
        s.print_us(label);
    }
    let find = |label: &str| {
        stats
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, s)| *s)
            .expect("variant measured")
    };
    println!("ratios (engine / raw, same run; target <= 1.5x the raw fdatasync):");
    let e200 = find("engine 200B (zeroed)");
    let e1k = find("engine 1KiB (zeroed)");
    let e200s = find("engine 200B (sparse)");
    print_ratio(
        &format!("  engine 200B (zeroed) / raw prealloc {small} B"),
        &e200,
        &find(&format!("raw prealloc {small} B")),
    );
    print_ratio(
        "  engine 200B (zeroed) / raw prealloc 4096 B",
        &e200,
        &find("raw prealloc 4096 B"),
    );
    print_ratio(
        &format!("  engine 200B (zeroed) / raw growing {small} B"),
        &e200,
        &find(&format!("raw growing {small} B")),
    );
    print_ratio(
        "  engine 200B (zeroed) / raw growing 4096 B",
        &e200,
        &find("raw growing 4096 B"),
    );
    print_ratio(
        &format!("  engine 1KiB (zeroed) / raw prealloc {large} B"),
        &e1k,
        &find(&format!("raw prealloc {large} B")),
    );
    print_ratio(
        &format!("  engine 1KiB (zeroed) / raw growing {large} B"),
        &e1k,
        &find(&format!("raw growing {large} B")),
    );
    print_ratio(
        &format!("  engine 200B (sparse) / raw growing {small} B"),
        &e200s,
        &find(&format!("raw growing {small} B")),
    );
    println!(
        "  peer reference (DESIGN.md, not this run): Redis appendfsync always p50 151 µs, p99 271 µs"
    );
}

// ---------------------------------------------------------------------------------------------
// Section `raw_throughput`
// ---------------------------------------------------------------------------------------------

/// Raw-disk rates the append throughput figures are compared with.
#[derive(Debug, Default)]
struct RawRates {
    /// (frame bytes, entries per sync) → rate.
    group_commit: Vec<((usize, usize), Rate)>,
    /// (frame bytes, threads) → rate.
    parallel: Vec<((usize, usize), Rate)>,
}

impl RawRates {
    fn group_commit(&self, frame: usize, per_sync: usize) -> Option<Rate> {
        self.group_commit
            .iter()
            .find(|(k, _)| *k == (frame, per_sync))
            .map(|(_, r)| *r)
    }

    fn parallel(&self, frame: usize, threads: usize) -> Option<Rate> {
        self.parallel
            .iter()
            .find(|(k, _)| *k == (frame, threads))
            .map(|(_, r)| *r)
    }
}

fn raw_throughput_section(root: &Path, scale: Scale) -> RawRates {
    section("raw_throughput: the disk's own limits (pwrite + fdatasync)");
    let dir = temp_dir(root);
    let mut rates = RawRates::default();
    // Every batch size an append case can form at most (its entries in flight).
    let mut per_sync_sizes: Vec<(usize, usize)> = append_cases()
        .iter()
        .map(|c| (c.payload_bytes, c.shape.in_flight_max()))
        .collect();
    per_sync_sizes.sort_unstable();
    per_sync_sizes.dedup();
    for (payload_bytes, per_sync) in per_sync_sizes {
        let frame = frame_bytes(payload_bytes);
        let rate = raw_group_commit(
            dir.path(),
            frame,
            per_sync,
            scale.raw_duration,
            scale.segment_size_bytes,
        );
        println!(
            "raw group commit {frame:>4} B x {per_sync:<4} per sync: {:>8.0} syncs/s  {:>10.0} entries/s  {:>7.1} MB/s",
            rate.ops_per_second(),
            rate.entries_per_second(),
            rate.entries_per_second() * frame as f64 / 1e6
        );
        rates.group_commit.push(((frame, per_sync), rate));
    }
    let frame = frame_bytes(PAYLOAD_SMALL_BYTES);
    for threads in [8, 64] {
        let rate = raw_parallel(dir.path(), frame, threads, scale.raw_duration * 2);
        println!(
            "raw parallel {threads:>2} threads x (pwrite {frame} B + fdatasync, own file): {:>8.0} syncs/s in total",
            rate.ops_per_second()
        );
        rates.parallel.push(((frame, threads), rate));
    }
    rates
}

// ---------------------------------------------------------------------------------------------
// Criterion group `append`: durable append throughput
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Shape {
    /// `n` threads, each with one blocking `append` in flight.
    Threads(usize),
    /// `tasks` tokio tasks, each keeping `depth` `append_async` futures in flight.
    Async { tasks: usize, depth: usize },
    /// `threads` threads, each calling `append_batch` with `entries` entries.
    Batch { threads: usize, entries: usize },
}

impl Shape {
    fn id(&self) -> String {
        match *self {
            Shape::Threads(n) => format!("threads_{n}"),
            Shape::Async { tasks, depth } => format!("async_{tasks}x{depth}"),
            Shape::Batch { threads, entries } => format!("batch_{threads}x{entries}"),
        }
    }

    /// Largest number of entries that can be queued at once: the best possible batch.
    fn in_flight_max(&self) -> usize {
        match *self {
            Shape::Threads(n) => n,
            Shape::Async { tasks, depth } => tasks * depth,
            Shape::Batch { threads, entries } => threads * entries,
        }
    }
}

/// Splits `total` as evenly as possible over `parts`.
fn share_of(total: u64, parts: usize, part: usize) -> u64 {
    let parts = parts as u64;
    total / parts + u64::from((part as u64) < total % parts)
}

/// Runs `work(share)` on `threads` threads at once; times from the common start to the last
/// finish (thread creation is outside the timed region).
fn run_threads(threads: usize, total: u64, work: impl Fn(u64) + Sync) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, work) = (&barrier, &work);
                let share = share_of(total, threads, t);
                s.spawn(move || {
                    barrier.wait();
                    work(share);
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for h in handles {
            h.join().expect("writer thread panicked");
        }
        start.elapsed()
    })
}

/// Polls all `futures` concurrently until every one has completed (a minimal `join_all`).
async fn join_all<F>(futures: Vec<F>)
where
    F: Future<Output = chatlog::Result<u64>>,
{
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(move |cx| {
        pending.retain_mut(|f| match f.as_mut().poll(cx) {
            Poll::Ready(result) => {
                result.expect("durable append");
                false
            }
            Poll::Pending => true,
        });
        if pending.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// Appends `entries` entries, `depth` futures at a time: each window of `depth` appends is
/// submitted together and awaited together.
async fn pipelined_appends(log: Arc<Log>, payload: Bytes, entries: u64, depth: usize) {
    let mut left = entries;
    while left > 0 {
        let n = left.min(depth as u64);
        join_all((0..n).map(|_| log.append_async(payload.clone())).collect()).await;
        left -= n;
    }
}

/// Appends `total` entries in the given shape; returns the time it took.
fn append_run(
    shape: Shape,
    log: &Arc<Log>,
    runtime: &tokio::runtime::Runtime,
    payload: &Bytes,
    total: u64,
) -> Duration {
    match shape {
        Shape::Threads(n) => run_threads(n, total, |share| {
            for _ in 0..share {
                log.append(payload.clone()).expect("durable append");
            }
        }),
        Shape::Batch { threads, entries } => run_threads(threads, total, |share| {
            let mut left = share;
            while left > 0 {
                let n = left.min(entries as u64) as usize;
                log.append_batch(vec![payload.clone(); n])
                    .expect("durable append_batch");
                left -= n as u64;
            }
        }),
        Shape::Async { tasks, depth } => runtime.block_on(async {
            let start = Instant::now();
            let handles: Vec<_> = (0..tasks)
                .map(|t| {
                    let share = share_of(total, tasks, t);
                    tokio::spawn(pipelined_appends(
                        log.clone(),
                        payload.clone(),
                        share,
                        depth,
                    ))
                })
                .collect();
            for h in handles {
                h.await.expect("append task panicked");
            }
            start.elapsed()
        }),
    }
}

/// Everything timed for one append case, over all criterion iterations (warm-up included).
#[derive(Debug)]
struct Tally {
    id: String,
    shape: Shape,
    frame_bytes: usize,
    entries: u64,
    elapsed: Duration,
    write_syscalls: u64,
    rolls: u64,
}

/// One append throughput case.
#[derive(Debug, Clone, Copy)]
struct AppendCase {
    payload_bytes: usize,
    shape: Shape,
    preallocate: Preallocate,
}

impl AppendCase {
    fn id(&self) -> String {
        let suffix = match self.preallocate {
            Preallocate::Zeroed => "",
            Preallocate::Sparse => "_sparse",
        };
        format!("{}{suffix}", self.shape.id())
    }
}

/// The issue's matrix (1, 8, 64 blocking writers; 64 async tasks x 16; 64 batch callers x 16;
/// 200 B and 1 KiB, default config), plus three comparisons at 200 B: more entries in flight
/// per caller (64 x 64), and sparse preallocation for the two pipelined shapes.
fn append_cases() -> Vec<AppendCase> {
    let pipelined = [
        Shape::Async {
            tasks: 64,
            depth: ASYNC_DEPTH,
        },
        Shape::Batch {
            threads: 64,
            entries: BATCH_ENTRIES,
        },
    ];
    let mut cases = Vec::new();
    for payload_bytes in [PAYLOAD_SMALL_BYTES, PAYLOAD_LARGE_BYTES] {
        let shapes = [Shape::Threads(1), Shape::Threads(8), Shape::Threads(64)];
        for shape in shapes.into_iter().chain(pipelined) {
            cases.push(AppendCase {
                payload_bytes,
                shape,
                preallocate: Preallocate::Zeroed,
            });
        }
    }
    cases.push(AppendCase {
        payload_bytes: PAYLOAD_SMALL_BYTES,
        shape: Shape::Batch {
            threads: 64,
            entries: BATCH_ENTRIES_LARGE,
        },
        preallocate: Preallocate::Zeroed,
    });
    for shape in pipelined {
        cases.push(AppendCase {
            payload_bytes: PAYLOAD_SMALL_BYTES,
            shape,
            preallocate: Preallocate::Sparse,
        });
    }
    cases
}

fn append_group(c: &mut Criterion, root: &Path, options: &Options) -> Vec<Tally> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .build()
        .expect("tokio runtime");
    let mut tallies = Vec::new();
    let mut group = c.benchmark_group("append");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for case in append_cases() {
        let size = size_name(case.payload_bytes);
        let full_id = format!("append/{size}/{}", case.id());
        if !options.wants(&[&full_id]) {
            continue;
        }
        // A fresh log per case, opened (and its first segment zero-filled) untimed.
        let dir = temp_dir(root);
        let log = Arc::new(open_log(
            dir.path(),
            log_config(options.scale, case.preallocate, Durability::Batch),
        ));
        let data = payload(case.payload_bytes);
        let mut tally = Tally {
            id: full_id,
            shape: case.shape,
            frame_bytes: frame_bytes(case.payload_bytes),
            entries: 0,
            elapsed: Duration::ZERO,
            write_syscalls: 0,
            rolls: 0,
        };
        group.bench_function(BenchmarkId::new(size, case.id()), |b| {
            b.iter_custom(|iters| {
                let writes_before = write_syscalls();
                let elapsed = append_run(case.shape, &log, &runtime, &data, iters);
                tally.write_syscalls += write_syscalls() - writes_before;
                tally.entries += iters;
                tally.elapsed += elapsed;
                elapsed
            });
        });
        tally.rolls = segment_firsts(dir.path()).len().saturating_sub(1) as u64;
        drop(log);
        tallies.push(tally);
    }
    group.finish();
    tallies
}

fn append_summary(tallies: &[Tally], raw: &RawRates, scale: Scale) {
    if tallies.is_empty() {
        return;
    }
    section("append summary: engine rate vs the raw disk, same run");
    println!(
        "entries/s here is the mean over every timed criterion iteration (warm-up included); \
         criterion's own estimate above is the headline figure."
    );
    println!(
        "batch = entries / (write syscalls - {} per segment roll): the mean group-commit size \
         (one pwrite + one fdatasync each).",
        scale.segment_size_bytes / CHUNK_BYTES as u64 + 2
    );
    println!(
        "{:<28} {:>11} {:>8} {:>6} {:>17} {:>7} {:>16} {:>7}",
        "case", "entries/s", "batch", "rolls", "raw same batch/s", "ratio", "raw no-gc /s", "ratio"
    );
    for t in tallies {
        let rate = t.entries as f64 / t.elapsed.as_secs_f64();
        let roll_writes = t.rolls * (scale.segment_size_bytes / CHUNK_BYTES as u64 + 2);
        let batches = t.write_syscalls.saturating_sub(roll_writes).max(1);
        let batch = t.entries as f64 / batches as f64;
        // The raw bound with the largest batch this shape can ever form.
        let ideal = raw.group_commit(t.frame_bytes, t.shape.in_flight_max());
        let parallel = match t.shape {
            Shape::Threads(n) => raw.parallel(frame_bytes(PAYLOAD_SMALL_BYTES), n),
            _ => None,
        };
        let fmt_rate = |r: Option<Rate>| {
            r.map_or(("-".to_owned(), "-".to_owned()), |r| {
                let bound = r.entries_per_second();
                (format!("{bound:.0}"), format!("{:.2}", rate / bound))
            })
        };
        let (ideal_rate, ideal_ratio) = fmt_rate(ideal);
        let (par_rate, par_ratio) = fmt_rate(parallel);
        println!(
            "{:<28} {:>11.0} {:>8.1} {:>6} {:>17} {:>7} {:>16} {:>7}",
            t.id, rate, batch, t.rolls, ideal_rate, ideal_ratio, par_rate, par_ratio
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Section `roll`: batches that cross a segment roll
// ---------------------------------------------------------------------------------------------

fn roll_section(root: &Path, scale: Scale) {
    section("roll: append_batch latency across segment rolls of a freshly opened log");
    let dir = temp_dir(root);
    let log = open_log(
        dir.path(),
        log_config(scale, Preallocate::Zeroed, Durability::Batch),
    );
    let data = payload(PAYLOAD_LARGE_BYTES);
    let mut batches: Vec<(u64, u64)> = Vec::new(); // (first index, latency ns)
    let mut last_roll_at = None;
    while last_roll_at.is_none_or(|at| batches.len() <= at + scale.roll_aftermath_batches) {
        let start = Instant::now();
        let first = log
            .append_batch(vec![data.clone(); ROLL_BATCH_ENTRIES])
            .expect("durable append_batch");
        batches.push((first, start.elapsed().as_nanos() as u64));
        if last_roll_at.is_none() && segment_firsts(dir.path()).len() > scale.roll_count {
            last_roll_at = Some(batches.len());
        }
    }
    let firsts = segment_firsts(dir.path());
    let crossing: Vec<usize> = firsts[1..]
        .iter()
        .filter_map(|&boundary| {
            batches.iter().position(|&(first, _)| {
                first <= boundary && boundary < first + ROLL_BATCH_ENTRIES as u64
            })
        })
        .collect();
    let steady: Vec<u64> = batches
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            !crossing
                .iter()
                .any(|&c| *i >= c && *i <= c + scale.roll_aftermath_batches)
        })
        .map(|(_, &(_, ns))| ns)
        .collect();
    println!(
        "{} batches of {ROLL_BATCH_ENTRIES} x 1 KiB; segment {} MiB; Preallocate::Zeroed",
        batches.len(),
        scale.segment_size_bytes >> 20
    );
    if !steady.is_empty() {
        Stats::of(&steady).print_us("batches away from rolls");
    }
    for (n, &c) in crossing.iter().enumerate() {
        let note = if n == 0 {
            "first roll after open: no spare prepared yet"
        } else {
            "spare prepared in the background"
        };
        println!(
            "roll {} at index {:>8}: crossing batch {:>9.1} µs  ({note})",
            n + 1,
            batches[c].0,
            batches[c].1 as f64 / 1000.0
        );
        let after: Vec<u64> = batches[c + 1..]
            .iter()
            .take(scale.roll_aftermath_batches)
            .map(|&(_, ns)| ns)
            .collect();
        if !after.is_empty() {
            Stats::of(&after).print_us(&format!("  next {} batches", after.len()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reads: sequential through the maps, random by index
// ---------------------------------------------------------------------------------------------

/// A log holding at least `read_fixture_sealed_segments` sealed segments of one entry size.
struct ReadFixture {
    _dir: TempDir,
    log: Log,
    payload_bytes: usize,
    sealed: Range<u64>,
    active: Range<u64>,
    sealed_paths: Vec<PathBuf>,
    /// First index of every segment, the active one last.
    segment_firsts: Vec<u64>,
}

impl ReadFixture {
    /// Fills a log quickly (`Durability::None`, large batches, then one sync): the frames are
    /// the same as in any mode, and this is never timed.
    fn build(root: &Path, scale: Scale, payload_bytes: usize) -> ReadFixture {
        let dir = temp_dir(root);
        let log = open_log(
            dir.path(),
            log_config(scale, Preallocate::Zeroed, Durability::None),
        );
        let data = payload(payload_bytes);
        let mut rolled = false;
        loop {
            log.append_batch(vec![data.clone(); FILL_BATCH_ENTRIES])
                .expect("fill append_batch");
            if rolled {
                break;
            }
            // One more batch after the last roll, so the active segment is not empty.
            rolled = segment_firsts(dir.path()).len() > scale.read_fixture_sealed_segments;
        }
        log.sync().expect("sync read fixture");
        let firsts = segment_firsts(dir.path());
        let active_first = *firsts.last().expect("at least one segment");
        let sealed_paths = firsts[..firsts.len() - 1]
            .iter()
            .map(|&f| name::segment(dir.path(), f))
            .collect();
        ReadFixture {
            segment_firsts: firsts.clone(),
            sealed: log.first_index()..active_first,
            active: active_first..log.next_index(),
            sealed_paths,
            payload_bytes,
            log,
            _dir: dir,
        }
    }

    fn label(&self) -> String {
        size_name(self.payload_bytes)
    }

    fn sealed_file_bytes(&self) -> u64 {
        self.sealed_paths
            .iter()
            .map(|p| std::fs::metadata(p).expect("stat segment").len())
            .sum()
    }

    /// One pass of `iter_from` over every sealed entry; returns payload bytes seen.
    fn sequential_pass(&self) -> u64 {
        let count = self.sealed.end - self.sealed.start;
        let mut bytes = 0u64;
        for item in self.log.iter_from(self.sealed.start).take(count as usize) {
            let (_, data) = item.expect("sequential read");
            bytes += black_box(data).len() as u64;
        }
        assert_eq!(bytes, count * self.payload_bytes as u64, "read every entry");
        bytes
    }

    /// Random sealed indexes exactly `past` entries after a sparse-index entry (every
    /// `index_stride`-th entry of a segment has one), so a read walks `past` frame headers.
    fn strided_indexes(&self, past: u64, count: usize, seed: u64) -> Vec<u64> {
        let stride = u64::from(LogConfig::default().index_stride);
        assert!(past < stride, "stay within one stride");
        let mut rng = StdRng::seed_from_u64(seed);
        (0..count)
            .map(|_| {
                let s = rng.random_range(0..self.segment_firsts.len() - 1);
                let (first, end) = (self.segment_firsts[s], self.segment_firsts[s + 1]);
                let strides = (end - first - past).div_ceil(stride);
                first + rng.random_range(0..strides) * stride + past
            })
            .collect()
    }

    fn random_indexes(&self, range: &Range<u64>, count: usize, seed: u64) -> Vec<u64> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..count)
            .map(|_| rng.random_range(range.clone()))
            .collect()
    }
}

/// Reads the sealed segment files with plain `read`s into a 1 MiB buffer (from the page
/// cache, like the maps), optionally computing a CRC32 over everything read.
fn raw_sequential_read(paths: &[PathBuf], with_crc: bool) -> (u64, Duration) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    let start = Instant::now();
    let mut total = 0u64;
    for path in paths {
        let mut file = File::open(path).expect("open segment");
        loop {
            let n = file.read(&mut buf).expect("read segment");
            if n == 0 {
                break;
            }
            if with_crc {
                black_box(crc32fast::hash(&buf[..n]));
            }
            total += n as u64;
        }
    }
    (total, start.elapsed())
}

fn read_section(fixtures: &[ReadFixture], scale: Scale) {
    section("read: sequential iter_from over sealed segments (page cache hot) vs raw reads");
    for f in fixtures {
        let entries = f.sealed.end - f.sealed.start;
        let file_bytes = f.sealed_file_bytes();
        let mut best = Duration::MAX;
        let mut payload_bytes = 0;
        for _ in 0..scale.sequential_passes {
            let start = Instant::now();
            payload_bytes = f.sequential_pass();
            best = best.min(start.elapsed());
        }
        let secs = best.as_secs_f64();
        let engine_file_gbps = file_bytes as f64 / secs / 1e9;
        println!(
            "engine iter_from {:<5} {} sealed segments, {entries} entries: {:>6.1} M entries/s  {:>5.2} GB/s payload  {:>5.2} GB/s segment bytes (best of {})",
            f.label(),
            f.sealed_paths.len(),
            entries as f64 / secs / 1e6,
            payload_bytes as f64 / secs / 1e9,
            engine_file_gbps,
            scale.sequential_passes
        );
        for with_crc in [false, true] {
            let mut best_raw = Duration::MAX;
            let mut raw_bytes = 0;
            for _ in 0..scale.sequential_passes {
                let (bytes, took) = raw_sequential_read(&f.sealed_paths, with_crc);
                raw_bytes = bytes;
                best_raw = best_raw.min(took);
            }
            let raw_gbps = raw_bytes as f64 / best_raw.as_secs_f64() / 1e9;
            println!(
                "  raw read(1 MiB){} same files: {raw_gbps:>5.2} GB/s  → engine / raw = {:.2}",
                if with_crc { " + crc32" } else { "          " },
                engine_file_gbps / raw_gbps
            );
        }
    }

    section("read: random read(index) latency (page cache hot)");
    timer_overhead(scale.random_reads).print_ns("timer overhead (Instant pair)");
    for f in fixtures {
        let label = f.label();
        let measure = |indexes: &[u64]| {
            let samples: Vec<u64> = indexes
                .iter()
                .map(|&i| {
                    let start = Instant::now();
                    black_box(f.log.read(i).expect("random read"));
                    start.elapsed().as_nanos() as u64
                })
                .collect();
            Stats::of(&samples)
        };
        let sealed = measure(&f.random_indexes(&f.sealed, scale.random_reads, 1));
        sealed.print_ns(&format!("engine read {label} sealed (mmap)"));
        let active = measure(&f.random_indexes(&f.active, scale.random_reads, 2));
        active.print_ns(&format!("engine read {label} active (pread)"));
        // Where a sealed read's time goes: the walk from the sparse index entry.
        let stride = u64::from(LogConfig::default().index_stride);
        for past in [0, stride - 1] {
            measure(&f.strided_indexes(past, scale.random_reads, 5 + past))
                .print_ns(&format!("  sealed {label}, {past} frames past index"));
        }
        // Baseline: a pread of one frame's bytes at a random offset of the same files.
        let frame = frame_bytes(f.payload_bytes);
        let files: Vec<File> = f
            .sealed_paths
            .iter()
            .map(|p| File::open(p).expect("open segment"))
            .collect();
        let file_len = std::fs::metadata(&f.sealed_paths[0])
            .expect("stat segment")
            .len();
        let mut rng = StdRng::seed_from_u64(3);
        let targets: Vec<(usize, u64)> = (0..scale.random_reads)
            .map(|_| {
                (
                    rng.random_range(0..files.len()),
                    rng.random_range(0..file_len - frame as u64),
                )
            })
            .collect();
        let mut buf = vec![0u8; frame];
        let raw_samples: Vec<u64> = targets
            .iter()
            .map(|&(file, offset)| {
                let start = Instant::now();
                files[file]
                    .read_exact_at(&mut buf, offset)
                    .expect("raw pread");
                black_box(&buf);
                start.elapsed().as_nanos() as u64
            })
            .collect();
        let raw = Stats::of(&raw_samples);
        raw.print_ns(&format!("raw pread {frame} B same files"));
        print_ratio(
            &format!("  engine sealed {label} / raw pread"),
            &sealed,
            &raw,
        );
        print_ratio(
            &format!("  engine active {label} / raw pread"),
            &active,
            &raw,
        );
    }
}

fn read_group(c: &mut Criterion, fixtures: &[ReadFixture], options: &Options) {
    let mut group = c.benchmark_group("read");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for f in fixtures {
        let label = f.label();
        if options.wants(&[&format!("read/iter_from_sealed/{label}")]) {
            group.throughput(Throughput::Elements(f.sealed.end - f.sealed.start));
            group.bench_function(BenchmarkId::new("iter_from_sealed", &label), |b| {
                b.iter(|| f.sequential_pass());
            });
        }
        if options.wants(&[&format!("read/random_sealed/{label}")]) {
            let indexes = f.random_indexes(&f.sealed, 1 << 16, 4);
            let mut next = 0;
            group.throughput(Throughput::Elements(1));
            group.bench_function(BenchmarkId::new("random_sealed", &label), |b| {
                b.iter(|| {
                    next = (next + 1) % indexes.len();
                    f.log.read(indexes[next]).expect("random read")
                });
            });
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------

fn drift_check(root: &Path, scale: Scale) {
    section("drift check: raw disk again after the engine runs");
    let dir = temp_dir(root);
    let frame = frame_bytes(PAYLOAD_SMALL_BYTES);
    let mut writer = RawWriter::preallocated(
        &dir.path().join("raw_drift"),
        frame,
        scale.segment_size_bytes,
    )
    .expect("raw file");
    let ops = scale.latency_rounds * scale.latency_ops_per_round / 5;
    let samples: Vec<u64> = (0..ops.max(1))
        .map(|_| {
            let start = Instant::now();
            writer.write_sync().expect("raw write + fdatasync");
            start.elapsed().as_nanos() as u64
        })
        .collect();
    Stats::of(&samples).print_us(&format!("raw prealloc {frame} B"));
    let rate = raw_group_commit(
        dir.path(),
        frame,
        64,
        scale.raw_duration,
        scale.segment_size_bytes,
    );
    println!(
        "raw group commit {frame} B x 64 per sync: {:.0} syncs/s, {:.0} entries/s",
        rate.ops_per_second(),
        rate.entries_per_second()
    );
}

fn main() {
    let options = Options::from_args();
    let scale = options.scale;
    let root = bench_root();
    let mut criterion = Criterion::default().configure_from_args();
    if options.list_only {
        list();
        return;
    }
    print_machine(&root, &options);

    if options.wants(&["latency"]) {
        latency_section(&root, scale);
    }
    let append_wanted = options.wants(&["append/200B/", "append/1KiB/", "raw_throughput"]);
    let raw = if append_wanted {
        raw_throughput_section(&root, scale)
    } else {
        RawRates::default()
    };
    let tallies = append_group(&mut criterion, &root, &options);
    append_summary(&tallies, &raw, scale);

    if options.wants(&["roll"]) {
        roll_section(&root, scale);
    }

    let read_names = [
        "read/iter_from_sealed/200B",
        "read/iter_from_sealed/1KiB",
        "read/random_sealed/200B",
        "read/random_sealed/1KiB",
    ];
    if options.wants(&read_names) {
        section("read fixtures: filling logs (untimed)");
        let fixtures: Vec<ReadFixture> = [PAYLOAD_SMALL_BYTES, PAYLOAD_LARGE_BYTES]
            .into_iter()
            .map(|bytes| {
                let f = ReadFixture::build(&root, scale, bytes);
                println!(
                    "{}: {} sealed entries in {} segments, {} in the active segment",
                    f.label(),
                    f.sealed.end - f.sealed.start,
                    f.sealed_paths.len(),
                    f.active.end - f.active.start
                );
                f
            })
            .collect();
        read_section(&fixtures, scale);
        read_group(&mut criterion, &fixtures, &options);
    }

    if options.wants(&["drift"]) && options.filter.is_none() {
        drift_check(&root, scale);
    }
    criterion.final_summary();
    section("done");
}

/// `--list`: every section and benchmark name a filter can select, in libtest's format.
fn list() {
    let mut names = vec!["latency".to_owned(), "raw_throughput".to_owned()];
    for case in append_cases() {
        names.push(format!(
            "append/{}/{}",
            size_name(case.payload_bytes),
            case.id()
        ));
    }
    names.push("roll".to_owned());
    for size in [PAYLOAD_SMALL_BYTES, PAYLOAD_LARGE_BYTES].map(size_name) {
        names.push(format!("read/iter_from_sealed/{size}"));
        names.push(format!("read/random_sealed/{size}"));
    }
    names.push("drift".to_owned());
    for n in names {
        println!("{n}: benchmark");
    }
}
