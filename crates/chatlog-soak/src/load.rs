//! One load client: a user doing a random mix of sends, edits, deletes, cursor moves and (the
//! creator only) membership changes, one request at a time, recording every acknowledgement
//! in the shared [`Model`] until the server dies under it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::client::Client;
use crate::model::{Model, OpAck, SendAck};

/// A reply slower than this while the server is alive is a violation (the kill comes within
/// at most a few seconds, and a killed server's sockets fail at once).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Guests the creator adds to and removes from each chat (never load clients, so the load
/// clients stay members and their receipts stay visible).
pub const GUESTS: [&str; 2] = ["guest0", "guest1"];

/// How a load client ended.
#[derive(Debug)]
pub enum End {
    /// The connection failed (the server was killed): expected.
    Disconnected,
    /// The server answered something it must not have.
    Violation(String),
}

/// What one client needs.
#[derive(Debug, Clone)]
pub struct Spec {
    pub url: String,
    pub token: String,
    pub user: String,
    pub is_creator: bool,
    pub chats: Vec<String>,
    pub cycle: usize,
    pub seed: u64,
}

/// A message this client sent in this session and has not deleted.
#[derive(Debug, Clone)]
struct Live {
    chat: String,
    seq: u64,
    cmid: String,
    edits: u32,
}

pub async fn run(spec: Spec, model: Arc<Mutex<Model>>) -> End {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let since = model.lock().unwrap().last_seqs.clone();
    let Ok(mut client) = Client::connect(&spec.url, &spec.token, "load", &since).await else {
        return End::Disconnected;
    };
    // The highest seq known to exist per chat (cursors may not go beyond last_seq).
    let mut top: BTreeMap<String, u64> = since;
    let mut live: Vec<Live> = Vec::new();
    // The creator's view of guest membership, exact within a session (only it changes it).
    let mut guests: BTreeMap<(String, String), bool> = BTreeMap::new();
    if spec.is_creator {
        let listed = match call(&mut client, json!({"op": "list_chats"})).await {
            Ok(v) => v,
            Err(end) => return end,
        };
        for chat in listed["chats"].as_array().into_iter().flatten() {
            let id = chat["chat"].as_str().unwrap_or_default().to_owned();
            let members: Vec<&str> = chat["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for g in GUESTS {
                guests.insert((id.clone(), g.to_owned()), members.contains(&g));
            }
        }
    }
    for n in 0u64.. {
        let chat = spec.chats[rng.random_range(0..spec.chats.len())].clone();
        let roll = rng.random_range(0..100);
        let end = if roll < 55 || (roll < 75 && live.is_empty()) {
            send(&mut client, &spec, &model, &chat, n, &mut top, &mut live).await
        } else if roll < 67 {
            edit(&mut client, &spec, &model, &mut rng, &mut live).await
        } else if roll < 75 {
            delete(&mut client, &spec, &model, &mut rng, &mut live).await
        } else if roll < 93 || !spec.is_creator {
            cursor(&mut client, &spec, &model, &mut rng, &chat, &mut top).await
        } else {
            members(
                &mut client,
                &spec,
                &model,
                &mut rng,
                &chat,
                &mut guests,
                &mut top,
            )
            .await
        };
        if let Err(end) = end {
            return end;
        }
    }
    End::Disconnected
}

/// Calls and insists on success.
async fn call(client: &mut Client, request: Value) -> Result<Value, End> {
    let shown = request.to_string();
    match tokio::time::timeout(REPLY_TIMEOUT, client.call(request)).await {
        Err(_) => Err(End::Violation(format!(
            "no reply to {shown} within {REPLY_TIMEOUT:?}"
        ))),
        Ok(Err(_)) => Err(End::Disconnected),
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(End::Violation(format!("{shown} refused: {e}"))),
    }
}

fn seq_of(v: &Value, what: &str) -> Result<u64, End> {
    v["seq"]
        .as_u64()
        .ok_or_else(|| End::Violation(format!("{what}: reply without seq: {v}")))
}

async fn send(
    client: &mut Client,
    spec: &Spec,
    model: &Mutex<Model>,
    chat: &str,
    n: u64,
    top: &mut BTreeMap<String, u64>,
    live: &mut Vec<Live>,
) -> Result<(), End> {
    let cmid = format!("{}-c{}-{n}", spec.user, spec.cycle);
    let body = format!("body of {cmid}");
    let key = (chat.to_owned(), spec.user.clone(), cmid.clone());
    model
        .lock()
        .unwrap()
        .pending
        .insert(key.clone(), body.clone());
    let r = call(
        client,
        json!({"op": "send", "chat": chat, "cmid": cmid, "body": body}),
    )
    .await?;
    let seq = seq_of(&r, "send")?;
    let ts = r["ts"]
        .as_u64()
        .ok_or_else(|| End::Violation(format!("send: reply without ts: {r}")))?;
    {
        let mut m = model.lock().unwrap();
        m.pending.remove(&key);
        if let Some(old) = m.sends.insert(key, SendAck { body, seq, ts }) {
            return Err(End::Violation(format!(
                "fresh cmid {cmid} was already acknowledged: {old:?}"
            )));
        }
        m.cycle.sends += 1;
    }
    let t = top.entry(chat.to_owned()).or_default();
    *t = (*t).max(seq);
    live.push(Live {
        chat: chat.to_owned(),
        seq,
        cmid,
        edits: 0,
    });
    Ok(())
}

async fn edit(
    client: &mut Client,
    spec: &Spec,
    model: &Mutex<Model>,
    rng: &mut StdRng,
    live: &mut [Live],
) -> Result<(), End> {
    let i = rng.random_range(0..live.len());
    live[i].edits += 1;
    let m = &live[i];
    let body = format!("edit {} of {}", m.edits, m.cmid);
    let r = call(
        client,
        json!({"op": "edit", "chat": m.chat, "target": m.seq, "body": body}),
    )
    .await?;
    let seq = seq_of(&r, "edit")?;
    let op = OpAck::Edit {
        sender: spec.user.clone(),
        target: m.seq,
        body,
    };
    model
        .lock()
        .unwrap()
        .op_acked(&m.chat, seq, op)
        .map_err(End::Violation)
}

async fn delete(
    client: &mut Client,
    spec: &Spec,
    model: &Mutex<Model>,
    rng: &mut StdRng,
    live: &mut Vec<Live>,
) -> Result<(), End> {
    let i = rng.random_range(0..live.len());
    let m = live.swap_remove(i);
    let r = call(
        client,
        json!({"op": "delete", "chat": m.chat, "target": m.seq}),
    )
    .await?;
    let seq = seq_of(&r, "delete")?;
    let op = OpAck::Delete {
        sender: spec.user.clone(),
        target: m.seq,
    };
    model
        .lock()
        .unwrap()
        .op_acked(&m.chat, seq, op)
        .map_err(End::Violation)
}

async fn cursor(
    client: &mut Client,
    spec: &Spec,
    model: &Mutex<Model>,
    rng: &mut StdRng,
    chat: &str,
    top: &mut BTreeMap<String, u64>,
) -> Result<(), End> {
    let t = top.get(chat).copied().unwrap_or(0);
    if t == 0 {
        return Ok(());
    }
    // Mostly near the top, sometimes behind it (a lower value must be ignored, not applied).
    let seq = t - rng.random_range(0..t.min(12));
    let read = rng.random_bool(0.4);
    let op = if read { "read" } else { "delivered" };
    call(client, json!({"op": op, "chat": chat, "seq": seq})).await?;
    model
        .lock()
        .unwrap()
        .cursor_acked(chat, &spec.user, seq, read);
    Ok(())
}

async fn members(
    client: &mut Client,
    spec: &Spec,
    model: &Mutex<Model>,
    rng: &mut StdRng,
    chat: &str,
    guests: &mut BTreeMap<(String, String), bool>,
    top: &mut BTreeMap<String, u64>,
) -> Result<(), End> {
    let guest = GUESTS[rng.random_range(0..GUESTS.len())].to_owned();
    let present = guests
        .get(&(chat.to_owned(), guest.clone()))
        .copied()
        .unwrap_or(false);
    let (op, users) = if present {
        ("remove_members", vec![guest.clone()])
    } else {
        ("add_members", vec![guest.clone()])
    };
    let r = call(client, json!({"op": op, "chat": chat, "users": users})).await?;
    let seq = seq_of(&r, op)?;
    guests.insert((chat.to_owned(), guest.clone()), !present);
    let t = top.entry(chat.to_owned()).or_default();
    *t = (*t).max(seq);
    let (added, removed) = if present {
        (vec![], vec![guest])
    } else {
        (vec![guest], vec![])
    };
    let op = OpAck::Members {
        sender: spec.user.clone(),
        added,
        removed,
    };
    model
        .lock()
        .unwrap()
        .op_acked(chat, seq, op)
        .map_err(End::Violation)
}
