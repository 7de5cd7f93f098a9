//! Counters and latency histograms: recorded per connection, merged per worker process, sent to
//! the parent as JSON and merged again, then summarised.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest latency recorded (µs); larger values are recorded as this.
pub const LATENCY_US_MAX: u64 = 60_000_000;
/// Significant decimal digits the histograms keep (0.1 % relative error).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// Latency samples a connection buffers before it merges them into its worker's histograms.
pub const SAMPLES_BUFFERED_MAX: usize = 512;

/// A latency histogram in µs. Serialised as its recorded `(value, count)` pairs, which
/// deserialise into the same buckets.
#[derive(Debug, Clone)]
pub struct LatencyHistogram(Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        // The bounds are constants that hdrhistogram accepts; failure is a programmer error.
        let histogram =
            Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS).unwrap();
        Self(histogram)
    }
}

impl LatencyHistogram {
    /// Records one latency, clamped to `1..=LATENCY_US_MAX`.
    pub fn record(&mut self, latency_us: u64) {
        self.0
            .saturating_record(latency_us.clamp(1, LATENCY_US_MAX));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Both histograms have the same bounds, so adding cannot fail.
        self.0.add(&other.0).unwrap();
    }

    /// The percentiles the summary reports.
    pub fn percentiles(&self) -> Percentiles {
        let at = |q: f64| {
            if self.0.is_empty() {
                0
            } else {
                self.0.value_at_quantile(q)
            }
        };
        Percentiles {
            count: self.0.len(),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: if self.0.is_empty() { 0 } else { self.0.max() },
            mean: if self.0.is_empty() {
                0.0
            } else {
                self.0.mean()
            },
        }
    }
}

impl Serialize for LatencyHistogram {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(u64, u64)> = self
            .0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        pairs.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for LatencyHistogram {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let pairs = Vec::<(u64, u64)>::deserialize(deserializer)?;
        let mut histogram = LatencyHistogram::default();
        for (value, count) in pairs {
            histogram
                .0
                .record_n(value.clamp(1, LATENCY_US_MAX), count)
                .map_err(serde::de::Error::custom)?;
        }
        Ok(histogram)
    }
}

/// Percentiles of one histogram, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// Counters one connection or one worker keeps. Counts of messages are those that happened inside
/// the measured window; errors are counted whenever they happen.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Connections that authenticated and got `synced` (or, for Redis, connected).
    pub connections_ready: u64,
    /// Connections that could not be set up.
    pub connections_failed: u64,
    /// Sends issued.
    pub sent: u64,
    /// Sends acknowledged (durable).
    pub acked: u64,
    /// Message events received, over all recipient connections (the sender's own included).
    pub delivered: u64,
    /// Message events received by connections of users other than the sender.
    pub delivered_to_others: u64,
    /// Send times (at `--rate`) skipped because the connection had `--inflight` unacknowledged
    /// sends: non-zero means the target rate was not offered.
    pub send_slots_skipped: u64,
    /// Events whose seq (chatlog) or stream id (Redis) did not follow the previous one of the
    /// same chat on the same connection. Must be 0.
    pub order_violations: u64,
    /// Sends never acknowledged before the connection ended or the drain time ran out.
    pub unacked_at_end: u64,
    /// Errors and abnormal closes by kind (`error:<code>`, `close:<code>`, ...).
    pub errors: BTreeMap<String, u64>,
}

impl Counters {
    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Counters) {
        self.connections_ready += other.connections_ready;
        self.connections_failed += other.connections_failed;
        self.sent += other.sent;
        self.acked += other.acked;
        self.delivered += other.delivered;
        self.delivered_to_others += other.delivered_to_others;
        self.send_slots_skipped += other.send_slots_skipped;
        self.order_violations += other.order_violations;
        self.unacked_at_end += other.unacked_at_end;
        for (kind, count) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += count;
        }
    }

    /// Counts one error of kind `kind`.
    pub fn count_error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
    }
}

/// Everything one worker process (or, merged, the whole run) measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Counters.
    pub counts: Counters,
    /// Length of the measured window (s).
    pub window_secs: f64,
    /// Send → durable acknowledgement (µs).
    pub ack_latency_us: LatencyHistogram,
    /// Send → receipt of the event by each recipient connection (µs).
    pub delivery_latency_us: LatencyHistogram,
}

impl Stats {
    /// Adds `other` into `self`. The window is the longer of the two (workers measure the same
    /// wall-clock window, a few milliseconds apart).
    pub fn merge(&mut self, other: &Stats) {
        self.counts.merge(&other.counts);
        self.window_secs = self.window_secs.max(other.window_secs);
        self.ack_latency_us.merge(&other.ack_latency_us);
        self.delivery_latency_us.merge(&other.delivery_latency_us);
    }
}

/// What one connection (task) records, merged into its worker's [`Stats`] now and then so that
/// tasks rarely take the lock and no connection owns a histogram (one is ~130 KiB).
#[derive(Debug, Default)]
pub struct Recorder {
    counts: Counters,
    ack_samples_us: Vec<u64>,
    delivery_samples_us: Vec<u64>,
}

impl Recorder {
    /// The counters.
    pub fn counts(&mut self) -> &mut Counters {
        &mut self.counts
    }

    /// Counts one error of kind `kind`.
    pub fn error(&mut self, kind: &str) {
        self.counts.count_error(kind);
    }

    /// Records one acknowledgement latency; merges into `shared` when the buffer is full.
    pub fn ack(&mut self, latency_us: u64, shared: &Mutex<Stats>) {
        self.counts.acked += 1;
        self.ack_samples_us.push(latency_us);
        if self.ack_samples_us.len() >= SAMPLES_BUFFERED_MAX {
            self.flush(shared);
        }
    }

    /// Records one delivered message event; merges into `shared` when the buffer is full.
    pub fn delivery(&mut self, latency_us: u64, to_other_user: bool, shared: &Mutex<Stats>) {
        self.counts.delivered += 1;
        self.counts.delivered_to_others += u64::from(to_other_user);
        self.delivery_samples_us.push(latency_us);
        if self.delivery_samples_us.len() >= SAMPLES_BUFFERED_MAX {
            self.flush(shared);
        }
    }

    /// Merges everything recorded so far into `shared` and starts again from zero.
    pub fn flush(&mut self, shared: &Mutex<Stats>) {
        let counts = std::mem::take(&mut self.counts);
        // A poisoned lock means another task panicked; its partial counts are still usable.
        let mut stats = shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        stats.counts.merge(&counts);
        for &sample in &self.ack_samples_us {
            stats.ack_latency_us.record(sample);
        }
        for &sample in &self.delivery_samples_us {
            stats.delivery_latency_us.record(sample);
        }
        drop(stats);
        self.ack_samples_us.clear();
        self.delivery_samples_us.clear();
    }
}

/// The run's result as printed: configuration, rates, percentiles, server memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// `chatlog` or `redis`.
    pub target: crate::cli::Target,
    /// `send` or `idle`.
    pub mode: crate::cli::Mode,
    /// Connections asked for.
    pub connections: usize,
    /// Chats.
    pub chats: usize,
    /// Members per chat.
    pub group: usize,
    /// Devices (connections) per user.
    pub devices_per_user: usize,
    /// Target send rate (msg/s); 0 = as fast as possible.
    pub rate_target: f64,
    /// Unacknowledged sends per connection.
    pub inflight: usize,
    /// Bytes per body.
    pub body_bytes: usize,
    /// Worker processes.
    pub procs: usize,
    /// Connections set up.
    pub connections_ready: u64,
    /// Connections that failed to set up.
    pub connections_failed: u64,
    /// Measured window (s).
    pub window_secs: f64,
    /// Sends per second.
    pub sent_per_sec: f64,
    /// Durable acknowledgements per second.
    pub acked_per_sec: f64,
    /// Message events received per second over all recipient connections, sender's included.
    pub delivered_per_sec: f64,
    /// The same, excluding the sender's own connections.
    pub delivered_to_others_per_sec: f64,
    /// Send → durable acknowledgement (µs).
    pub ack_latency_us: Percentiles,
    /// Send → receipt by each recipient connection (µs).
    pub delivery_latency_us: Percentiles,
    /// Order or gap violations; must be 0.
    pub order_violations: u64,
    /// Send slots skipped because `--inflight` sends were outstanding.
    pub send_slots_skipped: u64,
    /// Sends never acknowledged.
    pub unacked_at_end: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Server VmRSS before the measured connections were opened (bytes).
    pub server_rss_before_bytes: Option<u64>,
    /// Server VmRSS at the end of the window (bytes).
    pub server_rss_after_bytes: Option<u64>,
    /// Idle mode only: (after − before) / connections set up (bytes), the server's memory per
    /// idle authenticated connection.
    pub server_rss_bytes_per_connection: Option<f64>,
}

impl Summary {
    /// Builds the summary of merged `stats` for the run described by `args`.
    pub fn new(
        args: &crate::cli::Args,
        procs: usize,
        stats: &Stats,
        rss_before_bytes: Option<u64>,
        rss_after_bytes: Option<u64>,
    ) -> Self {
        let per_sec = |count: u64| {
            if stats.window_secs > 0.0 {
                count as f64 / stats.window_secs
            } else {
                0.0
            }
        };
        // Only idle connections make the difference a per-connection cost: in send mode it
        // also holds the messages, queues and caches the traffic grew.
        let per_connection = match (rss_before_bytes, rss_after_bytes) {
            (Some(before), Some(after))
                if args.mode == crate::cli::Mode::Idle && stats.counts.connections_ready > 0 =>
            {
                Some((after as f64 - before as f64) / stats.counts.connections_ready as f64)
            }
            _ => None,
        };
        Self {
            target: args.target,
            mode: args.mode,
            connections: args.connections,
            chats: args.chats,
            group: args.group,
            devices_per_user: args.devices_per_user,
            rate_target: args.rate,
            inflight: args.inflight,
            body_bytes: args.body_bytes,
            procs,
            connections_ready: stats.counts.connections_ready,
            connections_failed: stats.counts.connections_failed,
            window_secs: stats.window_secs,
            sent_per_sec: per_sec(stats.counts.sent),
            acked_per_sec: per_sec(stats.counts.acked),
            delivered_per_sec: per_sec(stats.counts.delivered),
            delivered_to_others_per_sec: per_sec(stats.counts.delivered_to_others),
            ack_latency_us: stats.ack_latency_us.percentiles(),
            delivery_latency_us: stats.delivery_latency_us.percentiles(),
            order_violations: stats.counts.order_violations,
            send_slots_skipped: stats.counts.send_slots_skipped,
            unacked_at_end: stats.counts.unacked_at_end,
            errors: stats.counts.errors.clone(),
            server_rss_before_bytes: rss_before_bytes,
            server_rss_after_bytes: rss_after_bytes,
            server_rss_bytes_per_connection: per_connection,
        }
    }

    /// The summary as text for people.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let target = match self.target {
            crate::cli::Target::Chatlog => "chatlog",
            crate::cli::Target::Redis => "redis",
            crate::cli::Target::Nats => "nats",
        };
        let mode = match self.mode {
            crate::cli::Mode::Send => "send",
            crate::cli::Mode::Idle => "idle",
            crate::cli::Mode::Probe => "probe",
        };
        let _ = write!(
            out,
            "target {target}, mode {mode}: {} connections ({} ready, {} failed) in {} processes; \
             {} chats of {}, {} device(s) per user",
            self.connections,
            self.connections_ready,
            self.connections_failed,
            self.procs,
            self.chats,
            self.group,
            self.devices_per_user,
        );
        if self.mode == crate::cli::Mode::Send {
            let rate = if self.rate_target > 0.0 {
                format!("{} msg/s", self.rate_target)
            } else {
                "as fast as possible".to_owned()
            };
            let _ = write!(
                out,
                "; rate {rate}, inflight {}, body {} B",
                self.inflight, self.body_bytes
            );
        }
        out.push('\n');
        if self.mode == crate::cli::Mode::Send {
            let _ = writeln!(
                out,
                "window {:.2} s: sent {:.0} msg/s, acked {:.0} msg/s, delivered {:.0} events/s \
                 ({:.0}/s to other users)",
                self.window_secs,
                self.sent_per_sec,
                self.acked_per_sec,
                self.delivered_per_sec,
                self.delivered_to_others_per_sec,
            );
            for (name, p) in [
                ("ack latency     ", &self.ack_latency_us),
                ("delivery latency", &self.delivery_latency_us),
            ] {
                let _ = writeln!(
                    out,
                    "{name}  p50 {}  p99 {}  p999 {}  max {}  mean {}  (n = {})",
                    format_us(p.p50),
                    format_us(p.p99),
                    format_us(p.p999),
                    format_us(p.max),
                    format_us(p.mean.round() as u64),
                    p.count,
                );
            }
            let _ = writeln!(
                out,
                "order/gap violations {}, unacked at end {}, send slots skipped {}",
                self.order_violations, self.unacked_at_end, self.send_slots_skipped
            );
        }
        if self.errors.is_empty() {
            let _ = writeln!(out, "errors: none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(kind, count)| format!("{kind} {count}"))
                .collect();
            let _ = writeln!(out, "errors: {}", list.join(", "));
        }
        if let (Some(before), Some(after)) =
            (self.server_rss_before_bytes, self.server_rss_after_bytes)
        {
            let _ = write!(
                out,
                "server RSS: before {:.1} MiB, after {:.1} MiB",
                before as f64 / MIB,
                after as f64 / MIB
            );
            if let Some(per_connection) = self.server_rss_bytes_per_connection {
                let _ = write!(out, " ({per_connection:.0} B per connection)");
            }
            out.push('\n');
        }
        out
    }

    /// This run's figures against `baseline`'s, as text: each line gives both values and
    /// `baseline / this` (for rates: how many times faster the baseline is).
    pub fn compare_text(&self, baseline: &Summary) -> String {
        use std::fmt::Write as _;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let mut out = String::new();
        let _ = writeln!(out, "baseline vs this run (ratio = baseline / this run):");
        let rates = [
            ("acked msg/s", baseline.acked_per_sec, self.acked_per_sec),
            (
                "delivered events/s",
                baseline.delivered_per_sec,
                self.delivered_per_sec,
            ),
        ];
        for (name, a, b) in rates {
            let _ = writeln!(
                out,
                "  {name:<24} {a:>12.0} {b:>12.0}   ratio {:.2}",
                ratio(a, b)
            );
        }
        let latencies = [
            (
                "ack p50 (µs)",
                baseline.ack_latency_us.p50,
                self.ack_latency_us.p50,
            ),
            (
                "ack p99 (µs)",
                baseline.ack_latency_us.p99,
                self.ack_latency_us.p99,
            ),
            (
                "delivery p50 (µs)",
                baseline.delivery_latency_us.p50,
                self.delivery_latency_us.p50,
            ),
            (
                "delivery p99 (µs)",
                baseline.delivery_latency_us.p99,
                self.delivery_latency_us.p99,
            ),
            (
                "delivery p999 (µs)",
                baseline.delivery_latency_us.p999,
                self.delivery_latency_us.p999,
            ),
        ];
        for (name, a, b) in latencies {
            let _ = writeln!(
                out,
                "  {name:<24} {a:>12} {b:>12}   ratio {:.2}",
                ratio(a as f64, b as f64)
            );
        }
        out
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// A latency in µs as text with a unit that keeps it short.
fn format_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1_000.0)
    } else {
        format!("{:.2} s", us as f64 / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(samples: &[u64]) -> LatencyHistogram {
        let mut h = LatencyHistogram::default();
        for &s in samples {
            h.record(s);
        }
        h
    }

    #[test]
    fn histogram_survives_json() {
        let h = histogram(&[1, 5, 5, 999, 12_345, 1_000_000, LATENCY_US_MAX * 2]);
        let json = serde_json::to_string(&h).unwrap();
        let back: LatencyHistogram = serde_json::from_str(&json).unwrap();
        assert_eq!(back.percentiles().count, 7);
        assert_eq!(back.percentiles(), h.percentiles());
    }

    #[test]
    fn merge_adds_counts_errors_and_samples() {
        let mut a = Stats {
            counts: Counters {
                sent: 3,
                delivered: 10,
                ..Counters::default()
            },
            window_secs: 10.0,
            ack_latency_us: histogram(&[100, 200]),
            ..Stats::default()
        };
        a.counts.count_error("error:forbidden");
        let mut b = Stats {
            counts: Counters {
                sent: 4,
                delivered_to_others: 2,
                order_violations: 1,
                ..Counters::default()
            },
            window_secs: 10.01,
            ack_latency_us: histogram(&[300]),
            delivery_latency_us: histogram(&[7]),
        };
        b.counts.count_error("error:forbidden");
        b.counts.count_error("close:4001");
        a.merge(&b);
        assert_eq!(a.counts.sent, 7);
        assert_eq!(a.counts.delivered, 10);
        assert_eq!(a.counts.delivered_to_others, 2);
        assert_eq!(a.counts.order_violations, 1);
        assert_eq!(a.window_secs, 10.01);
        assert_eq!(a.counts.errors["error:forbidden"], 2);
        assert_eq!(a.counts.errors["close:4001"], 1);
        assert_eq!(a.ack_latency_us.percentiles().count, 3);
        assert_eq!(a.delivery_latency_us.percentiles().count, 1);
    }

    #[test]
    fn recorder_flushes_everything_into_shared_stats() {
        let shared = Mutex::new(Stats::default());
        let mut recorder = Recorder::default();
        for i in 0..(SAMPLES_BUFFERED_MAX as u64 + 10) {
            recorder.delivery(i + 1, i % 2 == 0, &shared);
        }
        recorder.ack(50, &shared);
        recorder.counts().sent += 1;
        recorder.error("error:internal");
        // The full buffer was merged on its own; the rest waits for flush.
        assert_eq!(
            shared
                .lock()
                .unwrap()
                .delivery_latency_us
                .percentiles()
                .count,
            SAMPLES_BUFFERED_MAX as u64
        );
        recorder.flush(&shared);
        let stats = shared.lock().unwrap();
        assert_eq!(stats.counts.delivered, SAMPLES_BUFFERED_MAX as u64 + 10);
        assert_eq!(
            stats.counts.delivered_to_others,
            (SAMPLES_BUFFERED_MAX as u64 + 10) / 2
        );
        assert_eq!(
            stats.delivery_latency_us.percentiles().count,
            SAMPLES_BUFFERED_MAX as u64 + 10
        );
        assert_eq!(stats.counts.acked, 1);
        assert_eq!(stats.ack_latency_us.percentiles().count, 1);
        assert_eq!(stats.counts.sent, 1);
        assert_eq!(stats.counts.errors["error:internal"], 1);
    }

    fn args(extra: &[&str]) -> crate::cli::Args {
        use clap::Parser as _;
        let mut argv = vec!["chatlog-load", "--secret", "s"];
        argv.extend_from_slice(extra);
        crate::cli::Args::parse_from(argv)
    }

    #[test]
    fn idle_summary_reports_memory_per_connection() {
        let stats = Stats {
            counts: Counters {
                connections_ready: 1000,
                ..Counters::default()
            },
            ..Stats::default()
        };
        let idle = Summary::new(
            &args(&["--mode", "idle"]),
            1,
            &stats,
            Some(1 << 20),
            Some(5 << 20),
        );
        assert_eq!(idle.server_rss_bytes_per_connection, Some(4194.304));
        assert!(
            idle.to_text().contains("(4194 B per connection)"),
            "{}",
            idle.to_text()
        );
        // In send mode the growth is not a per-connection cost.
        let send = Summary::new(&args(&[]), 1, &stats, Some(1 << 20), Some(5 << 20));
        assert_eq!(send.server_rss_bytes_per_connection, None);
    }

    #[test]
    fn summary_rates_and_comparison() {
        let mut stats = Stats {
            counts: Counters {
                acked: 1000,
                delivered: 8000,
                ..Counters::default()
            },
            window_secs: 10.0,
            ..Stats::default()
        };
        stats.ack_latency_us.record(2000);
        let summary = Summary::new(&args(&[]), 1, &stats, None, None);
        assert_eq!(summary.acked_per_sec, 100.0);
        assert_eq!(summary.delivered_per_sec, 800.0);
        let json = serde_json::to_string(&summary).unwrap();
        let mut baseline: Summary = serde_json::from_str(&json).unwrap();
        baseline.delivered_per_sec = 1600.0;
        let text = summary.compare_text(&baseline);
        assert!(text.contains("delivered events/s"), "{text}");
        assert!(text.contains("ratio 2.00"), "{text}");
    }

    #[test]
    fn percentiles_of_known_samples() {
        let samples: Vec<u64> = (1..=1000).collect();
        let p = histogram(&samples).percentiles();
        assert_eq!(p.count, 1000);
        assert_eq!(p.p50, 500);
        assert_eq!(p.p99, 990);
        assert_eq!(p.p999, 999);
        assert_eq!(p.max, 1000);
        assert_eq!(
            LatencyHistogram::default().percentiles(),
            Percentiles::default()
        );
    }
}
