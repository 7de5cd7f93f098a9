//! The checks run after every restart, against the [`Model`] of what was acknowledged.
//!
//! 1. Retries: every send left unacknowledged by the kill, and a sample of acknowledged ones,
//!    are sent again with the same cmid. An acknowledged one must come back with its original
//!    seq and ts; an unacknowledged one is acknowledged now and joins the model.
//! 2. History, per chat, read whole by the creator: seqs 1..=last_seq with no gap, no
//!    (sender, cmid) twice, every acknowledged send/edit/delete/membership change at its seq
//!    with its content, and every message's `edited`/`deleted`/`body` consistent with the
//!    edit and delete events in the log.
//! 3. Receipts and cursors: for every load user, `receipts` (asked by the creator) and
//!    `list_chats` (asked by the user) agree, are at least every value acknowledged to
//!    `delivered`/`read` and at least what the previous check saw, with read ≤ delivered ≤
//!    last_seq.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use crate::client::Client;
use crate::model::{Model, OpAck, SendAck, SendKey};

/// What one check looked at.
#[derive(Debug, Default, Clone, Copy)]
pub struct Checked {
    pub events: u64,
    pub acked_sends: u64,
    pub acked_ops: u64,
    pub cursors: u64,
    pub retries: u64,
}

/// Acknowledged sends retried per check (besides every pending one).
const RETRY_SAMPLE: usize = 24;

/// Connection details for the checks.
#[derive(Debug)]
pub struct Target<'a> {
    pub url: &'a str,
    pub creator: &'a str,
    pub users: &'a [String],
    pub chats: &'a [String],
    pub token: fn(&str) -> String,
}

/// No backlog on the checking connections.
fn no_backlog(chats: &[String]) -> BTreeMap<String, u64> {
    chats.iter().map(|c| (c.clone(), u64::MAX)).collect()
}

/// Runs every check; returns the violations found (empty: all good) and the counts. `Err` is
/// an operating failure (the restarted server is unreachable), itself a failure of the run.
pub async fn check(
    target: &Target<'_>,
    model: &mut Model,
    rng: &mut StdRng,
) -> anyhow::Result<(Vec<String>, Checked)> {
    let mut violations = Vec::new();
    let mut checked = Checked::default();
    retry(target, model, rng, &mut violations, &mut checked).await?;
    let mut creator = Client::connect(
        target.url,
        &(target.token)(target.creator),
        "verify",
        &no_backlog(target.chats),
    )
    .await?;
    for chat in target.chats {
        let events = read_all(&mut creator, chat).await?;
        check_chat(chat, &events, model, &mut violations, &mut checked);
        model.last_seqs.insert(chat.clone(), events.len() as u64);
    }
    check_cursors(target, &mut creator, model, &mut violations, &mut checked).await?;
    Ok((violations, checked))
}

async fn retry(
    target: &Target<'_>,
    model: &mut Model,
    rng: &mut StdRng,
    violations: &mut Vec<String>,
    checked: &mut Checked,
) -> anyhow::Result<()> {
    // (key, body, what was acknowledged if anything), grouped by sender.
    let mut work: BTreeMap<String, Vec<(SendKey, String, Option<SendAck>)>> = BTreeMap::new();
    for (key, body) in std::mem::take(&mut model.pending) {
        work.entry(key.1.clone())
            .or_default()
            .push((key, body, None));
    }
    let acked: Vec<(&SendKey, &SendAck)> = model.sends.iter().collect();
    for _ in 0..RETRY_SAMPLE.min(acked.len()) {
        let (key, ack) = acked[rng.random_range(0..acked.len())];
        work.entry(key.1.clone()).or_default().push((
            key.clone(),
            ack.body.clone(),
            Some(ack.clone()),
        ));
    }
    for (sender, items) in work {
        let mut c = Client::connect(
            target.url,
            &(target.token)(&sender),
            "verify",
            &no_backlog(target.chats),
        )
        .await?;
        for (key, body, ack) in items {
            let (chat, _, cmid) = &key;
            let request = json!({"op": "send", "chat": chat, "cmid": cmid, "body": body});
            let r = match c.call(request).await? {
                Ok(r) => r,
                Err(e) => {
                    violations.push(format!("retry of {key:?} refused: {e}"));
                    continue;
                }
            };
            checked.retries += 1;
            let got = (r["seq"].as_u64(), r["ts"].as_u64());
            match ack {
                Some(ack) => {
                    if got != (Some(ack.seq), Some(ack.ts)) {
                        violations.push(format!(
                            "retry of acknowledged {key:?} answered {r}, was seq {} ts {}",
                            ack.seq, ack.ts
                        ));
                    }
                }
                None => {
                    let (Some(seq), Some(ts)) = got else {
                        violations.push(format!("retry of {key:?}: bad reply {r}"));
                        continue;
                    };
                    model.sends.insert(key, SendAck { body, seq, ts });
                    model.cycle.sends += 1;
                }
            }
        }
    }
    Ok(())
}

async fn read_all(c: &mut Client, chat: &str) -> anyhow::Result<Vec<Value>> {
    let mut events: Vec<Value> = Vec::new();
    let mut after = 0u64;
    loop {
        let page = c
            .ok(json!({"op": "history", "chat": chat, "after": after, "limit": 500}))
            .await?;
        let batch = page["events"].as_array().cloned().unwrap_or_default();
        let Some(last) = batch.last() else {
            let last_seq = page["last_seq"].as_u64();
            anyhow::ensure!(
                last_seq == Some(after),
                "{chat}: history ended at {after} but last_seq is {last_seq:?}"
            );
            return Ok(events);
        };
        after = last["seq"].as_u64().unwrap_or(0);
        events.extend(batch);
    }
}

fn check_chat(
    chat: &str,
    events: &[Value],
    model: &Model,
    violations: &mut Vec<String>,
    checked: &mut Checked,
) {
    let mut bad = |m: String| violations.push(format!("{chat}: {m}"));
    checked.events += events.len() as u64;
    for (i, e) in events.iter().enumerate() {
        if e["seq"].as_u64() != Some(i as u64 + 1) {
            bad(format!(
                "seq {} at position {} (gap or repeat)",
                e["seq"],
                i + 1
            ));
            return;
        }
    }
    let at = |seq: u64| events.get((seq as usize).wrapping_sub(1));
    // The log's own consistency: edits and deletes target earlier messages of their sender
    // (deletes: or the creator), nothing follows a delete, and every message shows them.
    let mut cmids = BTreeSet::new();
    let mut last_edit: BTreeMap<u64, &Value> = BTreeMap::new();
    let mut deleted_at: BTreeMap<u64, u64> = BTreeMap::new();
    for e in events {
        let seq = e["seq"].as_u64().unwrap_or(0);
        match e["kind"].as_str() {
            Some("message") => {
                if !cmids.insert((e["sender"].to_string(), e["cmid"].to_string())) {
                    bad(format!(
                        "cmid {} of {} twice (seq {seq})",
                        e["cmid"], e["sender"]
                    ));
                }
            }
            Some(kind @ ("edit" | "delete")) => {
                let target = e["target"].as_u64().unwrap_or(0);
                let t = at(target).filter(|t| target < seq && t["kind"] == "message");
                if t.is_none() {
                    bad(format!(
                        "{kind} at {seq} targets {target}, not an earlier message"
                    ));
                }
                if let Some(d) = deleted_at.get(&target) {
                    bad(format!(
                        "{kind} at {seq} of {target} already deleted at {d}"
                    ));
                }
                if kind == "edit" {
                    if t.is_some_and(|t| t["sender"] != e["sender"]) {
                        bad(format!("edit at {seq} by someone else than the sender"));
                    }
                    last_edit.insert(target, e);
                } else {
                    deleted_at.insert(target, seq);
                }
            }
            Some("members") => {}
            other => bad(format!("unknown kind {other:?} at {seq}")),
        }
    }
    for e in events.iter().filter(|e| e["kind"] == "message") {
        let seq = e["seq"].as_u64().unwrap_or(0);
        let deleted = deleted_at.contains_key(&seq);
        let edit = last_edit.get(&seq);
        if e["deleted"] != json!(deleted) || e["edited"] != json!(edit.is_some()) {
            bad(format!(
                "message {seq}: edited={} deleted={} but the log has {} edits, delete {deleted}",
                e["edited"],
                e["deleted"],
                if edit.is_some() { "some" } else { "no" }
            ));
        }
        if deleted && !e["body"].is_null() {
            bad(format!("message {seq} deleted but body {}", e["body"]));
        }
        if let (false, Some(edit)) = (deleted, edit)
            && e["body"] != edit["body"]
        {
            bad(format!(
                "message {seq}: body {} is not its last edit's {}",
                e["body"], edit["body"]
            ));
        }
    }
    // Every acknowledgement.
    for ((c, sender, cmid), ack) in model
        .sends
        .range((chat.to_owned(), String::new(), String::new())..)
    {
        if c != chat {
            break;
        }
        checked.acked_sends += 1;
        let Some(e) = at(ack.seq) else {
            bad(format!(
                "acknowledged {sender}/{cmid} at seq {} lost",
                ack.seq
            ));
            continue;
        };
        let same = e["kind"] == "message"
            && e["sender"] == json!(sender)
            && e["cmid"] == json!(cmid)
            && e["ts"] == json!(ack.ts);
        let body_ok = e["edited"] == true || e["deleted"] == true || e["body"] == json!(ack.body);
        if !same || !body_ok {
            bad(format!(
                "acknowledged {sender}/{cmid} {ack:?}, history has {e}"
            ));
        }
    }
    for ((c, seq), op) in model.ops.range((chat.to_owned(), 0)..) {
        if c != chat {
            break;
        }
        checked.acked_ops += 1;
        let Some(e) = at(*seq) else {
            bad(format!("acknowledged {op:?} at seq {seq} lost"));
            continue;
        };
        let ok = match op {
            OpAck::Edit {
                sender,
                target,
                body,
            } => {
                e["kind"] == "edit"
                    && e["sender"] == json!(sender)
                    && e["target"] == json!(target)
                    && e["body"] == json!(body)
            }
            OpAck::Delete { sender, target } => {
                e["kind"] == "delete"
                    && e["sender"] == json!(sender)
                    && e["target"] == json!(target)
            }
            OpAck::Members {
                sender,
                added,
                removed,
            } => {
                e["kind"] == "members"
                    && e["sender"] == json!(sender)
                    && e["added"] == json!(added)
                    && e["removed"] == json!(removed)
            }
        };
        if !ok {
            bad(format!("acknowledged {op:?} at seq {seq}, history has {e}"));
        }
    }
}

async fn check_cursors(
    target: &Target<'_>,
    creator: &mut Client,
    model: &mut Model,
    violations: &mut Vec<String>,
    checked: &mut Checked,
) -> anyhow::Result<()> {
    // (chat, user) → (delivered, read) as `receipts` reports it.
    let mut receipts = BTreeMap::new();
    for chat in target.chats {
        let r = creator.ok(json!({"op": "receipts", "chat": chat})).await?;
        for entry in r["receipts"].as_array().into_iter().flatten() {
            let user = entry["user"].as_str().unwrap_or_default().to_owned();
            let pair = (
                entry["delivered"].as_u64().unwrap_or(0),
                entry["read"].as_u64().unwrap_or(0),
            );
            receipts.insert((chat.clone(), user), pair);
        }
    }
    for user in target.users {
        let mut c = Client::connect(
            target.url,
            &(target.token)(user),
            "verify",
            &no_backlog(target.chats),
        )
        .await?;
        let listed = c.ok(json!({"op": "list_chats"})).await?;
        let mut seen = BTreeSet::new();
        for entry in listed["chats"].as_array().into_iter().flatten() {
            let chat = entry["chat"].as_str().unwrap_or_default().to_owned();
            if !target.chats.contains(&chat) {
                continue;
            }
            seen.insert(chat.clone());
            checked.cursors += 1;
            let key = (chat.clone(), user.clone());
            let listed = (
                entry["delivered"].as_u64().unwrap_or(0),
                entry["read"].as_u64().unwrap_or(0),
            );
            let last_seq = model.last_seqs.get(&chat).copied().unwrap_or(0);
            let mut bad = |m: String| violations.push(format!("{chat} {user}: {m}"));
            if entry["last_seq"].as_u64() != Some(last_seq) {
                bad(format!(
                    "list_chats last_seq {} ≠ history's {last_seq}",
                    entry["last_seq"]
                ));
            }
            match receipts.get(&key) {
                Some(r) if *r == listed => {}
                other => bad(format!("receipts {other:?} ≠ list_chats {listed:?}")),
            }
            let acked = model.cursors.get(&key).copied().unwrap_or_default();
            let before = model.observed.get(&key).copied().unwrap_or_default();
            if listed.0 < acked.0 || listed.1 < acked.1 {
                bad(format!(
                    "(delivered, read) {listed:?} below acknowledged {acked:?}"
                ));
            }
            if listed.0 < before.0 || listed.1 < before.1 {
                bad(format!(
                    "(delivered, read) {listed:?} went back from {before:?}"
                ));
            }
            if listed.1 > listed.0 || listed.0 > last_seq {
                bad(format!(
                    "(delivered, read) {listed:?} with last_seq {last_seq}"
                ));
            }
            model.observed.insert(key, listed);
        }
        for chat in target.chats {
            if !seen.contains(chat) {
                violations.push(format!("{user}: {chat} missing from list_chats"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The checker must see what it is there to see: each test breaks one thing in a small,
    //! otherwise consistent history.

    use super::*;

    fn message(seq: u64, sender: &str, cmid: &str, body: Option<&str>) -> Value {
        json!({"seq": seq, "kind": "message", "sender": sender, "ts": 1000 + seq,
               "cmid": cmid, "body": body, "file": null, "edited": false, "deleted": false})
    }

    /// members, message 2, edit of 2 at 3, message 4, delete of 4 at 5.
    fn history() -> (Vec<Value>, Model) {
        let mut edited = message(2, "u1", "a", Some("new"));
        edited["edited"] = json!(true);
        let mut deleted = message(4, "u1", "b", None);
        deleted["deleted"] = json!(true);
        let events = vec![
            json!({"seq": 1, "kind": "members", "sender": "u0", "ts": 1001,
                   "added": ["u0", "u1"], "removed": [], "title": "t"}),
            edited,
            json!({"seq": 3, "kind": "edit", "sender": "u1", "ts": 1003, "target": 2, "body": "new"}),
            deleted,
            json!({"seq": 5, "kind": "delete", "sender": "u1", "ts": 1005, "target": 4}),
        ];
        let mut model = Model::default();
        for (cmid, seq) in [("a", 2), ("b", 4)] {
            let ack = SendAck {
                body: format!("body {cmid}"),
                seq,
                ts: 1000 + seq,
            };
            model
                .sends
                .insert(("c".into(), "u1".into(), cmid.into()), ack);
        }
        let edit = OpAck::Edit {
            sender: "u1".into(),
            target: 2,
            body: "new".into(),
        };
        model.op_acked("c", 3, edit).unwrap();
        let delete = OpAck::Delete {
            sender: "u1".into(),
            target: 4,
        };
        model.op_acked("c", 5, delete).unwrap();
        (events, model)
    }

    fn violations(events: &[Value], model: &Model) -> Vec<String> {
        let mut v = Vec::new();
        check_chat("c", events, model, &mut v, &mut Checked::default());
        v
    }

    #[test]
    fn a_consistent_history_passes() {
        let (events, model) = history();
        assert_eq!(violations(&events, &model), Vec::<String>::new());
    }

    #[test]
    fn a_lost_acknowledged_send_is_seen() {
        let (mut events, model) = history();
        events.truncate(3);
        let v = violations(&events, &model);
        assert!(v.iter().any(|v| v.contains("lost")), "{v:?}");
    }

    #[test]
    fn a_gap_is_seen() {
        let (mut events, model) = history();
        events.remove(2);
        let v = violations(&events, &model);
        assert!(v.iter().any(|v| v.contains("gap")), "{v:?}");
    }

    #[test]
    fn a_changed_ts_or_a_duplicate_cmid_is_seen() {
        let (mut events, model) = history();
        events[1]["ts"] = json!(7);
        let v = violations(&events, &model);
        assert!(v.iter().any(|v| v.contains("acknowledged u1/a")), "{v:?}");
        let (mut events, model) = history();
        events.push(message(6, "u1", "a", Some("again")));
        let v = violations(&events, &model);
        assert!(v.iter().any(|v| v.contains("twice")), "{v:?}");
    }

    #[test]
    fn an_edit_not_shown_in_the_message_is_seen() {
        let (mut events, model) = history();
        events[1]["body"] = json!("body a");
        let v = violations(&events, &model);
        assert!(v.iter().any(|v| v.contains("last edit")), "{v:?}");
        let (mut events, model) = history();
        events[3]["deleted"] = json!(false);
        let v = violations(&events, &model);
        assert!(v.iter().any(|v| v.contains("deleted=false")), "{v:?}");
    }
}
