//! The same workload on NATS JetStream, for comparison (`scripts/bench-nats`).
//!
//! The parent replaces the stream `--nats-stream` with one capturing `chat.>` (file storage,
//! `--nats-replicas` replicas): like chatlog, all chats share one replicated log. Chat `c` is the
//! subject `chat.<c>`. A send is a JetStream publish of `<sender>|<body>` to that subject,
//! acknowledged once the stream has stored it (with replicas, once a quorum has). Each simulated
//! client is one NATS connection (to server `i % n` of `--nats-url`) that publishes and, for each
//! of its chats, reads an ordered push consumer filtered to the chat's subject, delivering only
//! messages published after it was created (`DeliverPolicy::New`): the counterpart of chatlog's
//! pushes, which are also sent only once a message is committed. Stream sequences must grow on
//! each consumer, as seqs must on a chatlog connection. The publishes are paced by the shared
//! [`crate::send_loop`] (this module issues one publish).
//!
//! Client sockets are opened by the NATS client itself, so `--no-source-bind` is implied (runs
//! here stay far below one source address's ephemeral ports).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::stream::SelectAll;
use futures_util::{FutureExt as _, StreamExt as _};
use tokio::time::Instant;

use crate::cli::Args;
use crate::send_loop::{self, AckFutures, PendingAck};
use crate::stats::Recorder;
use crate::worker::{Phase, ReadyReport, Shared, until_done};
use crate::workload;

/// Longest wait for a TCP connection and the NATS handshake.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a JetStream API reply or a publish acknowledgement.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Separates the sender from the body in a message payload.
const SENDER_SEPARATOR: u8 = b'|';

/// `host:port` of a `nats://host:port` URL (the scheme is optional, as for the NATS client).
pub fn host_port(url: &str) -> anyhow::Result<&str> {
    let rest = url.strip_prefix("nats://").unwrap_or(url);
    let host_port = rest.split('/').next().unwrap_or_default();
    if host_port.is_empty() || !host_port.contains(':') {
        bail!("NATS URL {url:?} must be nats://HOST:PORT");
    }
    Ok(host_port)
}

/// The subject of every chat.
pub fn chat_subjects(chats: usize) -> Vec<String> {
    (0..chats).map(|chat| format!("chat.{chat}")).collect()
}

/// Connects to `url`.
async fn connect(url: &str) -> Result<async_nats::Client, String> {
    async_nats::ConnectOptions::new()
        .connection_timeout(CONNECTION_TIMEOUT)
        .request_timeout(Some(RESPONSE_TIMEOUT))
        .connect(url)
        .await
        .map_err(|e| format!("connect:{:?}", e.kind()))
}

/// Replaces the stream `--nats-stream` with an empty one for `chat.>` (file storage,
/// `--nats-replicas` replicas) and returns the subject of every chat.
pub async fn create_stream(args: &Args, chats: usize) -> anyhow::Result<Vec<String>> {
    let url = *args
        .nats_urls()
        .first()
        .context("--nats-url names no server")?;
    let client = connect(url).await.map_err(anyhow::Error::msg)?;
    let context = jetstream::new(client);
    // A stream left by an earlier run would replay nothing (consumers start at new messages)
    // but would keep its disk; start empty.
    if context.get_stream(&args.nats_stream).await.is_ok() {
        context
            .delete_stream(&args.nats_stream)
            .await
            .with_context(|| format!("deleting stream {}", args.nats_stream))?;
    }
    let config = stream::Config {
        name: args.nats_stream.clone(),
        subjects: vec!["chat.>".to_owned()],
        storage: stream::StorageType::File,
        num_replicas: args.nats_replicas,
        ..Default::default()
    };
    context
        .create_stream(config)
        .await
        .with_context(|| format!("creating stream {}", args.nats_stream))?;
    Ok(chat_subjects(chats))
}

/// A message of one consumer: the chat slot it belongs to, or the consumer's error.
type Delivery = (
    usize,
    Result<jetstream::Message, async_nats::jetstream::consumer::push::OrderedError>,
);

/// The connection, its JetStream context and the merged messages of its consumers.
struct Opened {
    context: jetstream::Context,
    messages: SelectAll<futures_util::stream::BoxStream<'static, Delivery>>,
}

/// Connects to this connection's server and creates one ordered consumer per chat.
async fn set_up(shared: &Shared, index: usize, subjects: &[String]) -> Result<Opened, String> {
    let client = connect(&shared.server_of(index).url).await?;
    let context = jetstream::new(client);
    let mut messages = SelectAll::new();
    for (slot, subject) in subjects.iter().enumerate() {
        let config = OrderedConfig {
            deliver_subject: format!("_INBOX.{}.{index}.{slot}", shared.plan.run_id),
            filter_subject: subject.clone(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        };
        let consumer = context
            .create_consumer_on_stream(config, &shared.args.nats_stream)
            .await
            .map_err(|e| format!("consumer:{:?}", e.kind()))?;
        let stream = consumer
            .messages()
            .await
            .map_err(|e| format!("consumer_messages:{:?}", e.kind()))?;
        messages.push(stream.map(move |message| (slot, message)).boxed());
    }
    Ok(Opened { context, messages })
}

/// Runs connection `index` of the layout until the worker reaches [`Phase::Done`].
pub async fn run_connection(shared: Arc<Shared>, index: usize, mut ready: ReadyReport) {
    let subjects = shared.chat_ids_of_connection(index);
    let Some(opened) = shared
        .set_up_connection(&mut ready, set_up(&shared, index, &subjects))
        .await
    else {
        return;
    };
    let user = shared.user_name_of_connection(index);
    let reader = read_loop(
        Arc::clone(&shared),
        opened.messages,
        subjects.len(),
        user.clone(),
    );
    let (context, subjects, user) = (&opened.context, &subjects, &user);
    let body_bytes = shared.args.body_bytes;
    let transport = AckFutures::new(|slot| publish(context, &subjects[slot], user, body_bytes));
    send_loop::run_beside_reader(transport, &shared, index, subjects.len(), reader).await;
}

/// Splits a payload into sender and body.
fn split_payload(payload: &[u8]) -> Option<(&[u8], &str)> {
    let at = payload.iter().position(|&b| b == SENDER_SEPARATOR)?;
    let body = std::str::from_utf8(&payload[at + 1..]).ok()?;
    Some((&payload[..at], body))
}

/// Reads the connection's consumers until the worker is done, recording deliveries.
async fn read_loop(
    shared: Arc<Shared>,
    mut messages: SelectAll<futures_util::stream::BoxStream<'static, Delivery>>,
    slots: usize,
    user: String,
) {
    let mut recorder = Recorder::default();
    let mut phase_rx = shared.phase.clone();
    let mut last_sequence: Vec<u64> = vec![0; slots];
    if slots == 0 {
        until_done(&mut phase_rx).await;
    }
    while !last_sequence.is_empty() {
        let next = tokio::select! {
            next = messages.next() => next,
            () = until_done(&mut phase_rx) => break,
        };
        let Some((slot, message)) = next else {
            recorder.error("consumer:ended");
            break;
        };
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                recorder.error(&format!("consumer:{:?}", e.kind()));
                continue;
            }
        };
        match message.info() {
            Ok(info) => {
                if info.stream_sequence <= last_sequence[slot] {
                    recorder.counts().order_violations += 1;
                }
                last_sequence[slot] = last_sequence[slot].max(info.stream_sequence);
            }
            Err(_) => recorder.error("consumer:no_info"),
        }
        if *phase_rx.borrow() != Phase::Measure {
            continue;
        }
        match split_payload(&message.payload) {
            Some((sender, body)) => match workload::decode_body(body) {
                Some(sent_us) => {
                    let latency_us = workload::now_us().saturating_sub(sent_us);
                    let to_other_user = sender != user.as_bytes();
                    recorder.delivery(latency_us, to_other_user, &shared.stats);
                }
                None => recorder.error("message_without_timestamp"),
            },
            None => recorder.error("message_without_sender"),
        }
    }
    recorder.flush(&shared.stats);
}

/// Publishes `<user>|<body>` to `subject` through `context`: one send of the workload. The
/// future both hands the message to the client and awaits its acknowledgement; the send loop
/// polls it first right away.
fn publish(
    context: &jetstream::Context,
    subject: &str,
    user: &str,
    body_bytes: usize,
) -> PendingAck {
    let subject = subject.to_owned();
    let body = workload::encode_body(workload::now_us(), body_bytes);
    let mut payload = Vec::with_capacity(user.len() + 1 + body.len());
    payload.extend_from_slice(user.as_bytes());
    payload.push(SENDER_SEPARATOR);
    payload.extend_from_slice(body.as_bytes());
    let context = context.clone();
    let sent_at = Instant::now();
    async move {
        let acked = match context.publish(subject, Bytes::from(payload)).await {
            Ok(ack) => ack.await.map(drop),
            Err(e) => Err(e),
        };
        (
            sent_at,
            acked.map_err(|e| format!("publish:{:?}", e.kind())),
        )
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_host_and_port() {
        assert_eq!(
            host_port("nats://127.0.0.1:4222").unwrap(),
            "127.0.0.1:4222"
        );
        assert_eq!(host_port("127.0.0.1:4223").unwrap(), "127.0.0.1:4223");
        assert!(host_port("nats://localhost").is_err());
        assert!(host_port("").is_err());
    }

    #[test]
    fn payload_carries_sender_and_body() {
        let body = workload::encode_body(42, 40);
        let payload = format!("u7|{body}");
        let (sender, parsed) = split_payload(payload.as_bytes()).unwrap();
        assert_eq!(sender, b"u7");
        assert_eq!(workload::decode_body(parsed), Some(42));
        assert!(split_payload(b"no separator").is_none());
    }

    #[test]
    fn chats_are_subjects() {
        assert_eq!(chat_subjects(2), vec!["chat.0", "chat.1"]);
    }
}
