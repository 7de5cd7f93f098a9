//! Prometheus metrics: names, and the text rendered at `/metrics`.
//!
//! Counters and histograms go through the `metrics` facade into one process-wide
//! `metrics-exporter-prometheus` recorder. The log's group-commit statistics are read from
//! the engine at scrape time and rendered as a histogram of entries per `fdatasync`.

use std::fmt::Write as _;
use std::sync::OnceLock;

use chatlog::engine::Engine;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Messages appended (committed `message` events).
pub const MESSAGES_APPENDED: &str = "chatlog_messages_appended_total";
/// Event pushes queued to connections (one per recipient connection).
pub const EVENTS_DELIVERED: &str = "chatlog_events_delivered_total";
/// Open authenticated WebSocket connections.
pub const CONNECTIONS: &str = "chatlog_connections";
/// Time from receiving a `send` to replying (durable), seconds.
pub const SEND_LATENCY: &str = "chatlog_send_latency_seconds";
/// Connections closed because their outbound queue overflowed (4001).
pub const OUTBOUND_DROPS: &str = "chatlog_outbound_queue_drops_total";
/// Webhook posts that failed after all retries.
pub const WEBHOOK_FAILURES: &str = "chatlog_webhook_failures_total";
/// Webhook posts delivered.
pub const WEBHOOK_POSTS: &str = "chatlog_webhook_posts_total";
/// Requests refused, by error code.
pub const ERRORS: &str = "chatlog_request_errors_total";
/// Sends refused by the rate limit.
pub const RATE_LIMITED: &str = "chatlog_rate_limited_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(SEND_LATENCY.into()),
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                        1.0,
                    ],
                )
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed by an embedding program; then our
            // metrics go there and this handle renders only what it saw.
            let _ = metrics::set_global_recorder(recorder);
            metrics::describe_counter!(MESSAGES_APPENDED, "Messages appended (durable).");
            metrics::describe_counter!(EVENTS_DELIVERED, "Event pushes queued to connections.");
            metrics::describe_gauge!(CONNECTIONS, "Open authenticated WebSocket connections.");
            metrics::describe_histogram!(SEND_LATENCY, "send: receipt to durable reply.");
            metrics::describe_counter!(OUTBOUND_DROPS, "Connections closed as too slow (4001).");
            metrics::describe_counter!(WEBHOOK_FAILURES, "Webhook posts failed after retries.");
            handle
        })
        .clone()
}

/// The `/metrics` body: the recorder's metrics plus the log's group-commit histogram.
pub fn render(handle: &PrometheusHandle, engine: &Engine) -> String {
    let mut out = handle.render();
    let stats = engine.log().stats();
    let name = "chatlog_fsync_batch_entries";
    let _ = writeln!(
        out,
        "# HELP {name} Entries made durable by one fdatasync (group commit batch size)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, count) in stats.batch_entries_buckets.iter().enumerate() {
        cumulative += count;
        if i + 1 < stats.batch_entries_buckets.len() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", 1u64 << i);
        }
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {}", stats.entries_synced);
    let _ = writeln!(out, "{name}_count {}", stats.syncs);
    out
}
