//! Embedding the chatlog engine in a Rust service: create a chat, subscribe, send, page history.
//!
//! Run: `cargo run --release -p chatlog --example embedded`

use std::sync::Arc;

use chatlog::engine::{Engine, EngineConfig, EventKind, Record};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("chatlog-embedded-{}", std::process::id()));
    // Everything lives under one directory: the segment log (source of truth) and its indexes.
    let engine = Arc::new(Engine::open(&dir, EngineConfig::default())?);

    // A group chat: the creator is a member; the chat's first event (seq 1) adds everyone.
    let chat = engine.create_chat(
        "alice",
        &["bob".into(), "carol".into()],
        Some("launch".into()),
        false,
    )?;

    // Subscribers see every committed record in log order (this is how a server fans out).
    let mut subscription = engine.subscribe();

    // Sends return once the message is durable (fdatasync'd). The cmid makes retries safe.
    let first = engine.send(
        "alice",
        &chat,
        "cmid-1",
        Some("we ship friday".into()),
        None,
    )?;
    let retry = engine.send(
        "alice",
        &chat,
        "cmid-1",
        Some("we ship friday".into()),
        None,
    )?;
    assert_eq!(first, retry, "same cmid, same seq, no second event");
    engine.send("bob", &chat, "cmid-2", Some("🚀".into()), None)?;
    engine.edit("alice", &chat, first.seq, "we ship thursday".into())?;

    for _ in 0..3 {
        let committed = subscription.recv_blocking()?;
        if let Record::Event { event, .. } = &committed.record {
            println!(
                "pushed: {} #{} {} by {}",
                event.chat,
                event.seq,
                event.kind.name(),
                event.sender
            );
        }
    }

    // Cursors and receipts: bob's phone has read up to the edit.
    engine.mark("bob", "phone", &chat, 4, true)?;

    // History: the latest 50 events, ascending, with current bodies and edit/delete flags.
    let page = engine.history("carol", &chat, None, None, None)?;
    for h in &page.events {
        let text = match &h.event.kind {
            EventKind::Message { body, .. } => body.clone().unwrap_or_default(),
            other => other.name().to_owned(),
        };
        println!(
            "#{} {:>6}: {text}{}",
            h.event.seq,
            h.event.sender,
            if h.edited { " (edited)" } else { "" }
        );
    }
    for r in engine.receipts("alice", &chat)? {
        println!(
            "receipt: {} delivered {} read {}",
            r.user, r.delivered, r.read
        );
    }
    drop(subscription);
    drop(engine);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
