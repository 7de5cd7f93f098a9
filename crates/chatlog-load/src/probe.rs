//! `--mode probe`: a write probe for failover measurements (`scripts/bench-cluster`).
//!
//! One connection per `--url` (user `<prefix>k` for URL `k`, alone in chat `k`, so that a
//! probe's messages are pushed to nobody else) sends one message every `--probe-interval-ms`
//! without waiting for the replies (at most [`PROBE_INFLIGHT_MAX`] outstanding; a slot that finds
//! that many is skipped), and reconnects when its server goes away, until `--duration-secs` have
//! passed. Every outcome is one line on stdout, times in µs since the Unix epoch (the clock
//! `date +%s%6N` reads, so a script can relate them to the moment it killed a node):
//!
//! - `ack K SEND_US ACK_US` — a send through URL `K` was acknowledged (committed by a quorum and
//!   applied on that node);
//! - `err K CODE SEND_US AT_US` — it was refused with error `CODE` (e.g. `unavailable`);
//! - `down K AT_US` / `up K AT_US` — the connection to URL `K` was lost / (re)established.
//!
//! A server answers a connection's requests in the order sent, so a reply can wait behind
//! earlier ones; the failover time read from these lines is therefore the time until every
//! earlier send on that connection was answered too, which is what a pipelining client sees.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use crate::chatlog_target::{self, Endpoint, Incoming};
use crate::cli::{Args, PROBE_INFLIGHT_MAX};
use crate::workload::{self, Layout};

/// Pause before reconnecting after a lost connection or a failed attempt.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);

/// Creates one chat per URL and runs one probe connection per URL until `--duration-secs` have
/// passed.
pub async fn run(args: &Args, run_id: &str) -> anyhow::Result<()> {
    let urls: Vec<String> = args.urls().into_iter().map(str::to_owned).collect();
    // Connection k is user k, the only member and creator of chat k, created through URL k.
    let layout = Layout::new(urls.len(), 1, urls.len(), 1).map_err(anyhow::Error::msg)?;
    let chat_ids = chatlog_target::create_chats(args, &layout, run_id).await?;
    eprintln!(
        "chatlog-load: probe {run_id}: {} connections, one every {} ms each, for {} s",
        urls.len(),
        args.probe_interval_ms,
        args.duration_secs
    );
    let deadline = Instant::now() + Duration::from_secs(args.duration_secs);
    let mut tasks = JoinSet::new();
    for (k, (url, chat)) in urls.into_iter().zip(chat_ids).enumerate() {
        let user = workload::user_name(&args.user_prefix, k);
        let token = chatlog_target::mint_token(&args.secret, &user)?;
        let probe = Probe {
            k,
            url,
            chat,
            token,
            device: format!("{run_id}-probe"),
            cmid_prefix: format!("{run_id}-p{k}"),
            interval: Duration::from_millis(args.probe_interval_ms),
            body_bytes: args.body_bytes,
            deadline,
        };
        tasks.spawn(probe.run());
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("probe task panicked")??;
    }
    Ok(())
}

/// One probe connection's settings.
struct Probe {
    k: usize,
    url: String,
    /// The chat id as JSON text.
    chat: String,
    token: String,
    device: String,
    cmid_prefix: String,
    interval: Duration,
    body_bytes: usize,
    deadline: Instant,
}

impl Probe {
    /// Connects, sends and reconnects until the deadline.
    async fn run(self) -> anyhow::Result<()> {
        let endpoint = Endpoint::parse(&self.url)?;
        let mut number = 0u64;
        while Instant::now() < self.deadline {
            let session = async {
                let addr = endpoint.resolve().await.map_err(|e| e.to_string())?;
                let mut ws = chatlog_target::open(&self.url, addr, None).await?;
                chatlog_target::hello(&mut ws, &self.token, &self.device).await?;
                Ok::<_, String>(ws)
            };
            let ws = match tokio::time::timeout_at(self.deadline, session).await {
                Ok(Ok(ws)) => ws,
                Ok(Err(_)) => {
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
                Err(_) => break,
            };
            println!("up {} {}", self.k, workload::now_us());
            self.session(ws, &mut number).await;
            if Instant::now() < self.deadline {
                println!("down {} {}", self.k, workload::now_us());
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
        Ok(())
    }

    /// Sends and reads on one connection until it is lost or the deadline passes.
    async fn session(&self, mut ws: chatlog_target::Ws, number: &mut u64) {
        let mut ticker = tokio::time::interval(self.interval);
        // After a stall, go on at the interval instead of sending the missed slots at once.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        // Request id → send time (µs since the epoch).
        let mut inflight: HashMap<u64, u64> = HashMap::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(self.deadline) => {
                    let _ = ws.close(None).await;
                    return;
                }
                _ = ticker.tick() => {
                    if inflight.len() >= PROBE_INFLIGHT_MAX {
                        continue;
                    }
                    let id = *number;
                    *number += 1;
                    let sent_us = workload::now_us();
                    let body = workload::encode_body(sent_us, self.body_bytes);
                    let frame = format!(
                        r#"{{"op":"send","id":{id},"chat":{},"cmid":"{}-{id}","body":"{body}"}}"#,
                        self.chat, self.cmid_prefix
                    );
                    inflight.insert(id, sent_us);
                    if ws.send(Message::text(frame)).await.is_err() {
                        return;
                    }
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => self.on_text(text.as_str(), &mut inflight),
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Prints the outcome of a reply; ignores pushes.
    fn on_text(&self, text: &str, inflight: &mut HashMap<u64, u64>) {
        let Ok(incoming) = serde_json::from_str::<Incoming<'_>>(text) else {
            return;
        };
        let Some(sent_us) = incoming.id.and_then(|id| inflight.remove(&id)) else {
            return;
        };
        let now_us = workload::now_us();
        match incoming.error {
            None => println!("ack {} {sent_us} {now_us}", self.k),
            Some(error) => println!("err {} {} {sent_us} {now_us}", self.k, error.code),
        }
    }
}
