//! kill -9 of a child process doing mixed chat operations (sends from several threads, cursor
//! moves, edits): every acknowledged operation survives, seqs stay gapless, dedup still holds.
//!
//! Cycles: `CHATLOG_CRASH_CYCLES` (default 20).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Arc;

use chatlog::LogConfig;
use chatlog::engine::{Engine, EngineConfig, EventKind};
use rand::Rng;

mod common;

const CHILD_ENV: &str = "CHATLOG_ENGINE_CHILD_DIR";
const CYCLE_ENV: &str = "CHATLOG_ENGINE_CHILD_CYCLE";
const THREADS: usize = 6;
const CHATS: [&str; 3] = ["g1", "g2", "g3"];

fn config() -> EngineConfig {
    EngineConfig {
        log: LogConfig {
            segment_size_bytes: 512 * 1024,
            entry_size_bytes_max: 64 * 1024,
            ..LogConfig::default()
        },
        // A small index tail: kills land before, during and after its ingestions.
        index_tail_entries: 1_000,
        ..EngineConfig::default()
    }
}

fn body(cmid: &str) -> String {
    format!("body of {cmid} {}", "z".repeat(cmid.len() % 30))
}

#[test]
fn child_process_entry_point() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cycle: u64 = std::env::var(CYCLE_ENV).unwrap().parse().unwrap();
    let engine = Arc::new(Engine::open(&dir, config()).unwrap());
    if cycle == 0 {
        for _ in CHATS {
            engine
                .create_chat("alice", &["bob".into(), "carol".into()], None, false)
                .unwrap();
        }
    }
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    println!("ready");
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let engine = engine.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                let users = ["alice", "bob", "carol"];
                for k in 0u64.. {
                    let chat = CHATS[(k as usize + t) % CHATS.len()];
                    let user = users[t % users.len()];
                    let cmid = format!("c{cycle}-t{t}-k{k}");
                    let sent = engine
                        .send(user, chat, &cmid, Some(body(&cmid)), None)
                        .unwrap();
                    let mut line = format!("send {chat} {user} {cmid} {}", sent.seq);
                    if k % 7 == 3 {
                        let device = format!("dev{t}");
                        engine
                            .mark(user, &device, chat, sent.seq, k % 2 == 0)
                            .unwrap();
                        line = format!("{line}\nmark {chat} {user} {device} {}", sent.seq);
                    }
                    let mut out = out.lock().unwrap();
                    writeln!(out, "{line}").unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn kill_9_loses_no_acknowledged_chat_operation() {
    let cycles: u64 = std::env::var("CHATLOG_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rng();
    // (chat, user, cmid) -> seq, and the highest acknowledged cursor per (chat, user, device).
    let mut sends: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut marks: HashMap<(String, String, String), u64> = HashMap::new();
    for cycle in 0..cycles {
        let lines = common::run_and_kill(
            "child_process_entry_point",
            &[
                (CHILD_ENV, dir.path().display().to_string()),
                (CYCLE_ENV, cycle.to_string()),
            ],
            rng.random_range(20..300),
            &format!("cycle {cycle}"),
        );
        for line in lines {
            let f: Vec<&str> = line.split(' ').collect();
            match f.first() {
                Some(&"send") => {
                    let key = (f[1].to_owned(), f[2].to_owned(), f[3].to_owned());
                    let seq: u64 = f[4].parse().unwrap();
                    assert!(sends.insert(key, seq).is_none(), "cmid acknowledged twice");
                }
                Some(&"mark") => {
                    let key = (f[1].to_owned(), f[2].to_owned(), f[3].to_owned());
                    let seq: u64 = f[4].parse().unwrap();
                    let e = marks.entry(key).or_default();
                    *e = (*e).max(seq);
                }
                _ => {}
            }
        }

        let engine = Engine::open(dir.path(), config()).unwrap();
        let mut by_seq: HashMap<(String, u64), (String, String)> = HashMap::new();
        for chat in CHATS {
            let mut after = 0;
            loop {
                let page = engine
                    .history("alice", chat, None, Some(after), Some(500))
                    .unwrap();
                for h in &page.events {
                    assert_eq!(h.event.seq, after + 1, "cycle {cycle}: gap in {chat}");
                    after = h.event.seq;
                    if let EventKind::Message {
                        cmid,
                        body: Some(b),
                        ..
                    } = &h.event.kind
                    {
                        assert_eq!(b, &body(cmid), "cycle {cycle}: body changed");
                        let prev = by_seq.insert(
                            (chat.to_owned(), h.event.seq),
                            (h.event.sender.clone(), cmid.clone()),
                        );
                        assert!(prev.is_none());
                    }
                }
                if page.events.is_empty() || after == page.last_seq {
                    break;
                }
            }
        }
        // Every cmid appears at most once.
        let mut seen = std::collections::HashSet::new();
        for (chat, (sender, cmid)) in by_seq.iter().map(|((c, _), v)| (c, v)) {
            assert!(
                seen.insert((chat.clone(), sender.clone(), cmid.clone())),
                "duplicate {cmid}"
            );
        }
        for ((chat, user, cmid), seq) in &sends {
            let got = by_seq.get(&(chat.clone(), *seq));
            assert_eq!(
                got,
                Some(&(user.clone(), cmid.clone())),
                "cycle {cycle}: acknowledged {cmid} missing at {chat}#{seq}"
            );
        }
        for ((chat, user, device), seq) in &marks {
            let c = engine.cursor(user, device, chat).unwrap();
            assert!(c.delivered >= *seq, "cycle {cycle}: cursor went back");
        }
        // Retrying acknowledged sends returns the original seq (dedup survives the crash).
        for ((chat, user, cmid), seq) in sends.iter().rev().take(20) {
            let again = engine
                .send(user, chat, cmid, Some(body(cmid)), None)
                .unwrap();
            assert_eq!(
                again.seq, *seq,
                "cycle {cycle}: retry of {cmid} got a new seq"
            );
        }
    }
    assert!(
        sends.len() as u64 > cycles * 20,
        "too few operations to prove anything"
    );
    eprintln!(
        "{cycles} kill -9 cycles, {} acknowledged sends, {} cursors checked",
        sends.len(),
        marks.len()
    );
}
