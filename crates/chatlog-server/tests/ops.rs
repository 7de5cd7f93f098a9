//! Operations endpoints (PROTOCOL.md "Operations endpoints"): `/healthz` and `/metrics`,
//! with the metrics named in the issue exercised first. `chatlog_outbound_queue_drops_total`
//! is checked where a slow consumer is made (tests/limits.rs), since overflowing a queue
//! takes megabytes of pushes to a client that stops reading.
//!
//! Metrics are process-wide, so this binary holds a single test.

mod common;

use common::{TestServer, http, metric_value, metrics_text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_and_metrics_name_every_counter_after_it_moved() {
    // A webhook nobody listens on: its posts fail.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let server = TestServer::start_with(|c| {
        c.push_webhook = Some(format!("http://{dead}/push"));
        c.push_interval_ms = 100;
    })
    .await;
    let (status, body, _) = http(server.addr, "GET", "/healthz", None, &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let mut alice = server.connect("alice").await;
    alice.synced().await;
    // carol never connects: each message is a webhook notice for her.
    let chat = alice.create(&["carol"], "t").await;
    for i in 0..5 {
        alice.send_msg(&chat, &format!("m{i}"), "x").await;
    }
    // The connections gauge follows connects and disconnects.
    let bob = server.connect("bob").await;
    common::eventually("two connections", || async {
        let text = metrics_text(server.addr).await;
        (metric_value(&text, "chatlog_connections") == Some(2.0)).then_some(())
    })
    .await;
    drop(bob);
    let text = common::eventually("every metric has moved", || async {
        let text = metrics_text(server.addr).await;
        let at_least = |name: &str, min: f64| metric_value(&text, name).is_some_and(|v| v >= min);
        let ready = at_least("chatlog_messages_appended_total", 5.0)
            && at_least("chatlog_events_delivered_total", 5.0)
            && at_least("chatlog_send_latency_seconds_count", 5.0)
            && at_least("chatlog_fsync_batch_entries_count", 1.0)
            && at_least("chatlog_webhook_failures_total", 1.0)
            // alice is the only connection.
            && metric_value(&text, "chatlog_connections") == Some(1.0);
        ready.then_some(text)
    })
    .await;
    for name in [
        "chatlog_messages_appended_total",
        "chatlog_events_delivered_total",
        "chatlog_connections",
        "chatlog_send_latency_seconds_bucket",
        "chatlog_send_latency_seconds_sum",
        "chatlog_fsync_batch_entries_bucket",
        "chatlog_fsync_batch_entries_sum",
        "chatlog_webhook_failures_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics:\n{text}"
        );
    }
    // Each appended message was counted once.
    // The fanout counts after the reply: compare once settled.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let last_seq = alice.last_seq(&chat).await as f64;
        let appended = metric_value(
            &metrics_text(server.addr).await,
            "chatlog_messages_appended_total",
        )
        .unwrap();
        if appended == last_seq - 1.0 && alice.last_seq(&chat).await as f64 == last_seq {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages appended {appended} != message events {}",
            last_seq - 1.0
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Histogram buckets are cumulative and end with +Inf equal to the count.
    for name in [
        "chatlog_send_latency_seconds",
        "chatlog_fsync_batch_entries",
    ] {
        let buckets: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket")))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{name}: {buckets:?}"
        );
        let count = metric_value(&text, &format!("{name}_count")).unwrap();
        assert_eq!(buckets.last().copied(), Some(count), "{name}");
    }
    let (_, _, head) = http(server.addr, "GET", "/metrics", None, &[])
        .await
        .unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    server.stop().await;
}
