//! `wake-cost`: two physical limits of the machine the cluster benchmarks run on, measured in
//! the same run as them (`docs/benchmarks.md`, "What a thread wake-up and an `fdatasync`
//! cost on this VM").
//!
//! 1. **Thread wake-ups.** Two threads pass a token back and forth through a pair of
//!    channels (each hand-off parks one thread and wakes the other, as a Raft node's tasks
//!    and log writers do). Reported per round trip (two wake-ups): wall time, and CPU time
//!    of the whole process (the sum of its threads' `/proc/self/task/*/schedstat` run time,
//!    in ns), with plain waits and with waits that have a timeout. Run it as is (the threads
//!    may sit on different CPUs; waking an idle CPU takes an inter-processor interrupt) and
//!    under `taskset -c 0` (one CPU: no interrupt).
//! 2. **`fdatasync` after a small overwrite.** In a zero-filled, synced 64 MiB file, writes
//!    200 bytes at the next offset and `fdatasync`s, `--syncs` times back to back, then again
//!    with 5 ms between syncs. Reported: latency p50 / p99 and the device's completed write
//!    and flush requests per sync (from `/sys/dev/block/MAJ:MIN/stat`, so other processes'
//!    I/O on the same device counts too: run it on a quiet disk). A sync writes the data page
//!    and, when the file's mtime changed since the last sync (the kernel moves it at most once
//!    per timer tick), the inode too, on ext4 without a journal: one more write per sync.
//!
//! Usage: `wake-cost [--dir DIR] [--round-trips N] [--syncs N]` (defaults: the current
//! directory, 100,000, 2,000). `DIR` must be on the disk under test, never a tmpfs.

use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

const FILE_BYTES: u64 = 64 << 20;
const WRITE_BYTES: usize = 200;
const SPACED_BY: Duration = Duration::from_millis(5);

/// Two physical limits of this machine: thread wake-ups and small `fdatasync`s.
#[derive(clap::Parser, Debug)]
#[command(name = "wake-cost")]
struct Args {
    /// A directory on the disk under test (never a tmpfs); the probe file is made and removed
    /// there.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Token round trips between the two threads, per ping-pong.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    round_trips: u64,
    /// Back-to-back syncs (a quarter as many are made 5 ms apart).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(4..=335_544))]
    syncs: u64,
}

/// CPU time (ns) the live threads of this process have run so far: the sum of their
/// `schedstat`. An ended thread no longer counts, so the probe reads it while both of its
/// threads are alive.
fn process_cpu_ns() -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").context("reading /proc/self/task")? {
        let path = task?.path().join("schedstat");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // The thread ended between the listing and the read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let ns = text.split_whitespace().next().unwrap_or("0");
        total += ns
            .parse::<u64>()
            .with_context(|| format!("{}: {text:?}", path.display()))?;
    }
    Ok(total)
}

/// Waits for the next token; with `timed`, as a thread that also has a timer to serve does
/// (tokio's workers park with the next timer's deadline), which arms a timer at every wait.
fn next_token(rx: &mpsc::Receiver<u64>, timed: bool) -> Option<u64> {
    if timed {
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(token) => return Some(token),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    } else {
        rx.recv().ok()
    }
}

fn ping_pong(round_trips: u64, timed: bool) -> anyhow::Result<()> {
    let (to_partner, partner_in) = mpsc::sync_channel::<u64>(0);
    let (to_main, main_in) = mpsc::sync_channel::<u64>(0);
    let partner = std::thread::spawn(move || {
        while let Some(token) = next_token(&partner_in, timed) {
            if to_main.send(token).is_err() {
                break;
            }
        }
    });
    let cpu_before = process_cpu_ns()?;
    let started = Instant::now();
    for i in 0..round_trips {
        to_partner.send(i).context("partner thread ended")?;
        let back = next_token(&main_in, timed).context("partner thread ended")?;
        assert_eq!(back, i, "the token came back changed");
    }
    let wall = started.elapsed();
    let cpu_ns = process_cpu_ns()? - cpu_before;
    drop(to_partner);
    partner
        .join()
        .map_err(|_| anyhow::anyhow!("partner thread panicked"))?;
    let n = round_trips as f64;
    println!(
        "thread ping-pong{}: {round_trips} round trips (2 wake-ups each): wall {:.2} µs, CPU {:.2} µs per round trip",
        if timed { ", waits with a timeout" } else { "" },
        wall.as_secs_f64() * 1e6 / n,
        cpu_ns as f64 / 1e3 / n
    );
    Ok(())
}

/// The `stat` file of the block device that holds `path`.
fn device_stat(path: &Path) -> anyhow::Result<PathBuf> {
    let dev = std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stat = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/stat"));
    if !stat.exists() {
        bail!(
            "{} is not on a block device ({major}:{minor} has no {}); use a disk, not a tmpfs",
            path.display(),
            stat.display()
        );
    }
    Ok(stat)
}

/// Completed write and flush requests of the device (the 5th and 16th fields of its `stat`;
/// 0 flushes on kernels before 5.5, which have no such field).
fn device_requests(stat: &Path) -> anyhow::Result<(u64, u64)> {
    let text =
        std::fs::read_to_string(stat).with_context(|| format!("reading {}", stat.display()))?;
    let fields: Vec<&str> = text.split_whitespace().collect();
    let writes = fields
        .get(4)
        .with_context(|| format!("{}: no write count in {text:?}", stat.display()))?;
    let flushes = fields.get(15).unwrap_or(&"0");
    Ok((writes.parse()?, flushes.parse()?))
}

fn sync_run(file: &File, stat: &Path, syncs: usize, spaced: bool) -> anyhow::Result<()> {
    let data = [b'x'; WRITE_BYTES];
    let mut latencies = Vec::with_capacity(syncs);
    let before = device_requests(stat)?;
    for i in 0..syncs {
        let started = Instant::now();
        file.write_all_at(&data, (i * WRITE_BYTES) as u64)?;
        file.sync_data()?;
        latencies.push(started.elapsed());
        if spaced {
            std::thread::sleep(SPACED_BY);
        }
    }
    let after = device_requests(stat)?;
    let per_sync = |a: u64, b: u64| (a - b) as f64 / syncs as f64;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    println!(
        "write {WRITE_BYTES} B + fdatasync, {}: {syncs} syncs, p50 {:.0} µs, p99 {:.0} µs, per sync {:.2} device writes and {:.2} flushes",
        if spaced { "5 ms apart" } else { "back to back" },
        at(0.5),
        at(0.99),
        per_sync(after.0, before.0),
        per_sync(after.1, before.1)
    );
    Ok(())
}

fn fdatasync_probe(dir: &Path, stat: &Path, syncs: usize) -> anyhow::Result<()> {
    let path = dir.join("wake-cost.probe");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    for chunk in 0..FILE_BYTES / zeros.len() as u64 {
        file.write_all_at(&zeros, chunk * zeros.len() as u64)?;
    }
    file.sync_all()?;
    let result =
        sync_run(&file, stat, syncs, false).and_then(|()| sync_run(&file, stat, syncs / 4, true));
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    result
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    // Refuse a directory off any disk before spending time on the first probe.
    let stat = device_stat(&args.dir)?;
    ping_pong(args.round_trips, false)?;
    ping_pong(args.round_trips, true)?;
    fdatasync_probe(&args.dir, &stat, args.syncs as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_out_of_range_are_refused_by_name() {
        let parse = |args: &[&str]| {
            <Args as clap::Parser>::try_parse_from(
                std::iter::once("wake-cost").chain(args.iter().copied()),
            )
        };
        let args = parse(&["--syncs", "400", "--round-trips", "7"]).unwrap();
        assert_eq!((args.syncs, args.round_trips), (400, 7));
        for bad in [
            &["--syncs", "0"][..],
            &["--syncs", "3"],
            &["--syncs", "335545"],
            &["--syncs", "many"],
            &["--round-trips", "0"],
            &["--round-trips=-3"],
        ] {
            let error = parse(bad).unwrap_err().to_string();
            let flag = bad[0].split('=').next().unwrap();
            assert!(error.contains(flag), "{bad:?}: {error}");
        }
    }

    #[test]
    fn a_directory_without_a_block_device_is_refused_by_name() {
        // /proc is never on a block device.
        let error = device_stat(Path::new("/proc")).unwrap_err().to_string();
        assert!(error.contains("/proc is not on a block device"), "{error}");
    }

    #[test]
    fn the_process_cpu_time_grows_while_it_runs() {
        let before = process_cpu_ns().unwrap();
        let spin_until = Instant::now() + Duration::from_millis(20);
        let mut x = 0u64;
        while Instant::now() < spin_until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(process_cpu_ns().unwrap() > before);
    }
}
