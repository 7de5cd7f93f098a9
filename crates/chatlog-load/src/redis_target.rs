//! The same workload on Redis Streams, for comparison.
//!
//! Chat `c` is the stream `chat:{c}`. A send is
//! `XADD chat:{c} * ts <µs> sender <user> body <body>`, acknowledged once Redis replies (with
//! `appendfsync always`, after the AOF fsync). Each connection is two TCP connections: one sends,
//! the other loops on `XREAD COUNT n BLOCK 0 STREAMS <its chats> <last ids>`, the counterpart of
//! chatlog's pushes. Stream ids must grow on each reader, as seqs must on a chatlog connection.
//! The sends are paced by the shared [`crate::send_loop`] (this module issues one `XADD`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use redis::{AsyncCommands as _, AsyncConnectionConfig, RedisConnectionInfo, Value};
use tokio::time::Instant;

use crate::send_loop::{self, AckFutures, PendingAck};
use crate::stats::Recorder;
use crate::worker::{Phase, ReadyReport, Shared, until_done};
use crate::workload;

/// Entries one `XREAD` returns at most per stream.
const XREAD_COUNT_MAX: usize = 1024;
/// Longest wait for a reply to anything but `XREAD BLOCK`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a TCP connection.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The stream key of every chat.
pub fn chat_keys(chats: usize) -> Vec<String> {
    (0..chats).map(|chat| format!("chat:{chat}")).collect()
}

/// A stream entry id `<ms>-<seq>` as a pair that orders like Redis orders ids.
fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Opens one Redis connection from this worker's source address. `response_timeout` is `None`
/// for the reader, whose `XREAD BLOCK 0` waits as long as it takes.
async fn connect(
    shared: &Shared,
    response_timeout: Option<Duration>,
) -> Result<MultiplexedConnection, String> {
    // `--redis-addr` names one server.
    let server = shared.server_of(0);
    let stream = tokio::time::timeout(
        CONNECTION_TIMEOUT,
        crate::worker::open_socket(server.addr, server.source_ip),
    )
    .await
    .map_err(|_| "connect:timeout".to_owned())?
    .map_err(|e| format!("connect:{:?}", e.kind()))?;
    let config = AsyncConnectionConfig::new().set_response_timeout(response_timeout);
    let (connection, driver) =
        MultiplexedConnection::new_with_config(&RedisConnectionInfo::default(), stream, config)
            .await
            .map_err(|e| format!("redis_connect:{:?}", e.kind()))?;
    // The driver ends when every handle to the connection is dropped.
    tokio::spawn(driver);
    Ok(connection)
}

/// Both connections of one simulated client, and where its reader starts.
struct Opened {
    writer: MultiplexedConnection,
    reader: MultiplexedConnection,
    last_ids: Vec<String>,
}

/// Opens both connections and reads the current last id of each chat stream, so that the reader
/// starts exactly after what exists now (`$` would race with sends issued before its first
/// `XREAD` is registered).
async fn set_up(shared: &Shared, keys: &[String]) -> Result<Opened, String> {
    let mut writer = connect(shared, Some(RESPONSE_TIMEOUT)).await?;
    let reader = connect(shared, None).await?;
    let mut last_ids = Vec::with_capacity(keys.len());
    for key in keys {
        let newest: StreamRangeReply = writer
            .xrevrange_count(key, "+", "-", 1)
            .await
            .map_err(|e| format!("setup:{:?}", e.kind()))?;
        let last = newest
            .ids
            .first()
            .map_or_else(|| "0-0".to_owned(), |entry| entry.id.clone());
        last_ids.push(last);
    }
    Ok(Opened {
        writer,
        reader,
        last_ids,
    })
}

/// Runs connection `index` of the layout until the worker reaches [`Phase::Done`].
pub async fn run_connection(shared: Arc<Shared>, index: usize, mut ready: ReadyReport) {
    let keys = shared.chat_ids_of_connection(index);
    let Some(opened) = shared
        .set_up_connection(&mut ready, set_up(&shared, &keys))
        .await
    else {
        return;
    };
    let user = shared.user_name_of_connection(index);
    let reader = read_loop(
        Arc::clone(&shared),
        opened.reader,
        keys.clone(),
        opened.last_ids,
        user.clone(),
    );
    let (writer, keys, user) = (opened.writer, &keys, &user);
    let body_bytes = shared.args.body_bytes;
    let transport = AckFutures::new(move |slot| xadd(&writer, &keys[slot], user, body_bytes));
    send_loop::run_beside_reader(transport, &shared, index, keys.len(), reader).await;
}

/// One stream entry as the reader needs it, borrowed from the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntryRef<'a> {
    /// The entry id, `<ms>-<seq>`.
    id: &'a str,
    /// The `ts` field: send time in µs, if present and numeric.
    sent_us: Option<u64>,
    /// The `sender` field, if present.
    sender: Option<&'a [u8]>,
}

/// The bytes of a string reply.
fn value_bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

/// The elements of an array reply (`XREAD`'s RESP2 shape).
fn value_array(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

/// Calls `on_entry(stream key, entry)` for every entry of an `XREAD` reply, in order, without
/// building the `HashMap` per entry that the crate's typed `StreamReadReply` builds (the reader
/// handles one entry per delivered event, so this is the load generator's hot path). `Nil` (a
/// timeout) has no entries. The error names the first part of the reply that has the wrong shape.
fn for_each_xread_entry<'a>(
    reply: &'a Value,
    mut on_entry: impl FnMut(&'a str, EntryRef<'a>),
) -> Result<(), &'static str> {
    let streams = match reply {
        Value::Nil => return Ok(()),
        Value::Array(streams) => streams,
        _ => return Err("reply"),
    };
    for stream in streams {
        let [key, entries] = value_array(stream).ok_or("stream")? else {
            return Err("stream");
        };
        let key = value_bytes(key)
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or("key")?;
        for entry in value_array(entries).ok_or("entries")? {
            let [id, fields] = value_array(entry).ok_or("entry")? else {
                return Err("entry");
            };
            let id = value_bytes(id)
                .and_then(|i| std::str::from_utf8(i).ok())
                .ok_or("id")?;
            let fields = value_array(fields).ok_or("fields")?;
            let mut parsed = EntryRef {
                id,
                sent_us: None,
                sender: None,
            };
            for pair in fields.chunks_exact(2) {
                match value_bytes(&pair[0]) {
                    Some(b"ts") => {
                        parsed.sent_us = value_bytes(&pair[1])
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(|v| v.parse().ok());
                    }
                    Some(b"sender") => parsed.sender = value_bytes(&pair[1]),
                    _ => {}
                }
            }
            on_entry(key, parsed);
        }
    }
    Ok(())
}

/// Reads the connection's chat streams until the worker is done, recording deliveries.
async fn read_loop(
    shared: Arc<Shared>,
    mut reader: MultiplexedConnection,
    keys: Vec<String>,
    mut last_ids: Vec<String>,
    user: String,
) {
    let mut recorder = Recorder::default();
    let mut phase_rx = shared.phase.clone();
    let slot_by_key: HashMap<String, usize> = keys
        .iter()
        .enumerate()
        .map(|(slot, key)| (key.clone(), slot))
        .collect();
    let mut last_parsed: Vec<Option<(u64, u64)>> =
        last_ids.iter().map(|id| parse_stream_id(id)).collect();
    while !keys.is_empty() {
        let mut command = redis::cmd("XREAD");
        command
            .arg("COUNT")
            .arg(XREAD_COUNT_MAX)
            .arg("BLOCK")
            .arg(0)
            .arg("STREAMS")
            .arg(&keys)
            .arg(&last_ids);
        let read = command.query_async::<Value>(&mut reader);
        let reply = tokio::select! {
            reply = read => reply,
            () = until_done(&mut phase_rx) => break,
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                recorder.error(&format!("xread:{:?}", e.kind()));
                break;
            }
        };
        let measuring = *phase_rx.borrow() == Phase::Measure;
        let walked = for_each_xread_entry(&reply, |key, entry| {
            let Some(&slot) = slot_by_key.get(key) else {
                recorder.error("xread:unknown_stream");
                return;
            };
            let id = parse_stream_id(entry.id);
            if id.is_none() || id <= last_parsed[slot] {
                recorder.counts().order_violations += 1;
            }
            if id > last_parsed[slot] {
                last_parsed[slot] = id;
                entry.id.clone_into(&mut last_ids[slot]);
            }
            if !measuring {
                return;
            }
            match entry.sent_us {
                Some(sent_us) => {
                    let latency_us = workload::now_us().saturating_sub(sent_us);
                    let to_other_user = entry.sender != Some(user.as_bytes());
                    recorder.delivery(latency_us, to_other_user, &shared.stats);
                }
                None => recorder.error("message_without_timestamp"),
            }
        });
        if let Err(part) = walked {
            recorder.error(&format!("xread:bad_{part}"));
            break;
        }
    }
    if keys.is_empty() {
        until_done(&mut phase_rx).await;
    }
    recorder.flush(&shared.stats);
}

/// Issues `XADD key * ts <now> sender <user> body <body>` on `writer`: one send of the workload.
fn xadd(writer: &MultiplexedConnection, key: &str, user: &str, body_bytes: usize) -> PendingAck {
    let sent_us = workload::now_us();
    let body = workload::encode_body(sent_us, body_bytes);
    let mut command = redis::cmd("XADD");
    command
        .arg(key)
        .arg("*")
        .arg("ts")
        .arg(sent_us)
        .arg("sender")
        .arg(user)
        .arg("body")
        .arg(body);
    let mut writer = writer.clone();
    let sent_at = Instant::now();
    Box::pin(async move {
        let reply = command.query_async::<String>(&mut writer).await;
        let acked = reply.map(drop).map_err(|e| format!("xadd:{:?}", e.kind()));
        (sent_at, acked)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_like_redis() {
        assert_eq!(parse_stream_id("0-0"), Some((0, 0)));
        assert_eq!(
            parse_stream_id("1712345678901-3"),
            Some((1_712_345_678_901, 3))
        );
        assert!(parse_stream_id("5-10") > parse_stream_id("5-9"));
        assert!(parse_stream_id("6-0") > parse_stream_id("5-99"));
        assert_eq!(parse_stream_id("5"), None);
        assert_eq!(parse_stream_id("a-1"), None);
    }

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(fields.iter().map(|f| bulk(f)).collect()),
        ])
    }

    #[test]
    fn walks_an_xread_reply() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("chat:1"),
                Value::Array(vec![
                    entry("5-0", &["ts", "123", "sender", "u1", "body", "x"]),
                    entry("5-1", &["body", "no timestamp"]),
                ]),
            ]),
            Value::Array(vec![
                bulk("chat:2"),
                Value::Array(vec![entry("6-0", &["ts", "7", "sender", "u2"])]),
            ]),
        ]);
        let mut seen = Vec::new();
        for_each_xread_entry(&reply, |key, entry| seen.push((key, entry))).unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].0, "chat:1");
        assert_eq!(
            seen[0].1,
            EntryRef {
                id: "5-0",
                sent_us: Some(123),
                sender: Some(b"u1"),
            }
        );
        assert_eq!(seen[1].1.sent_us, None);
        assert_eq!(seen[2].0, "chat:2");
        assert_eq!(seen[2].1.sender, Some(&b"u2"[..]));
    }

    #[test]
    fn nil_xread_reply_has_no_entries_and_bad_shapes_are_errors() {
        assert_eq!(for_each_xread_entry(&Value::Nil, |_, _| panic!()), Ok(()));
        assert_eq!(
            for_each_xread_entry(&Value::Int(1), |_, _| {}),
            Err("reply")
        );
        let no_entries = Value::Array(vec![Value::Array(vec![bulk("chat:1")])]);
        assert_eq!(for_each_xread_entry(&no_entries, |_, _| {}), Err("stream"));
        let bad_entry = Value::Array(vec![Value::Array(vec![
            bulk("chat:1"),
            Value::Array(vec![Value::Int(3)]),
        ])]);
        assert_eq!(for_each_xread_entry(&bad_entry, |_, _| {}), Err("entry"));
    }

    #[test]
    fn chats_are_streams() {
        assert_eq!(chat_keys(2), vec!["chat:0", "chat:1"]);
    }
}
