//! The chat engine's rules, one by one, on a real engine (real log, real RocksDB).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chatlog::engine::{
    Answer, ChatError, Engine, EngineConfig, EventKind, FileMeta, Record, SubscriptionError,
};

fn s(v: &str) -> String {
    v.to_owned()
}

fn config() -> (EngineConfig, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(1_000));
    let clock_now = now.clone();
    let config = EngineConfig {
        members_max: 4,
        body_bytes_max: 100,
        clock: Arc::new(move || clock_now.load(Ordering::SeqCst)),
        ..EngineConfig::default()
    };
    (config, now)
}

fn open() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), config().0).unwrap();
    (dir, engine)
}

#[test]
fn create_send_history_with_gapless_seqs() {
    let (_dir, e) = open();
    let chat = e
        .create_chat("alice", &[s("bob")], Some(s("lunch")), false)
        .unwrap();
    let h = e.history("bob", &chat, None, None, None).unwrap();
    assert_eq!(h.last_seq, 1);
    match &h.events[0].event.kind {
        EventKind::Members { added, title, .. } => {
            assert_eq!(added, &vec![s("alice"), s("bob")]);
            assert_eq!(title.as_deref(), Some("lunch"));
        }
        other => panic!("first event must be members, got {other:?}"),
    }
    for i in 0..20 {
        let sent = e
            .send(
                "alice",
                &chat,
                &format!("m{i}"),
                Some(format!("hi {i}")),
                None,
            )
            .unwrap();
        assert_eq!(sent.seq, i + 2);
        assert_eq!(sent.ts, 1_000);
    }
    let h = e.history("bob", &chat, None, None, Some(5)).unwrap();
    assert_eq!(
        h.events.iter().map(|x| x.event.seq).collect::<Vec<_>>(),
        vec![17, 18, 19, 20, 21]
    );
    let h = e.history("bob", &chat, Some(10), None, Some(3)).unwrap();
    assert_eq!(
        h.events.iter().map(|x| x.event.seq).collect::<Vec<_>>(),
        vec![7, 8, 9]
    );
    let h = e.history("bob", &chat, None, Some(10), Some(3)).unwrap();
    assert_eq!(
        h.events.iter().map(|x| x.event.seq).collect::<Vec<_>>(),
        vec![11, 12, 13]
    );
    let h = e
        .history("bob", &chat, Some(14), Some(10), Some(50))
        .unwrap();
    assert_eq!(
        h.events.iter().map(|x| x.event.seq).collect::<Vec<_>>(),
        vec![11, 12, 13]
    );
    let h = e.history("bob", &chat, None, Some(21), None).unwrap();
    assert!(h.events.is_empty());
    let h = e.history("bob", &chat, None, None, Some(10_000)).unwrap();
    assert_eq!(
        h.events.len(),
        21,
        "capped page still returns everything there is"
    );
}

#[test]
fn sends_are_idempotent_sequentially_and_concurrently() {
    let (_dir, e) = open();
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    let a = e.send("alice", &chat, "x", Some(s("one")), None).unwrap();
    let b = e
        .send("alice", &chat, "x", Some(s("different body")), None)
        .unwrap();
    assert_eq!(a, b);
    // The same cmid from another sender is another message.
    let c = e.send("bob", &chat, "x", Some(s("bob's")), None).unwrap();
    assert_eq!(c.seq, a.seq + 1);
    // Concurrent duplicates: many tickets in flight at once, one event.
    let tickets: Vec<_> = (0..50)
        .map(|_| e.send_ticket("alice", &chat, "dup", Some(s("d")), None))
        .collect();
    let seqs: Vec<_> = tickets.into_iter().map(|t| t.wait().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] == w[1]));
    let h = e.history("alice", &chat, None, None, None).unwrap();
    assert_eq!(h.last_seq, 4);
}

/// Sends in flight together are decided in batches, their dedup entries looked up together
/// beforehand: refused sends, repeats of applied messages and new ones, interleaved, each get
/// their own answer.
#[test]
fn a_burst_of_refused_repeated_and_new_sends_answers_each_right() {
    let (_dir, e) = open();
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    let earlier: Vec<u64> = (0..5)
        .map(|k| {
            e.send("alice", &chat, &format!("old{k}"), Some(s("x")), None)
                .unwrap()
                .seq
        })
        .collect();
    let mut tickets = Vec::new();
    for k in 0..5 {
        let old = format!("old{k}");
        tickets.push((
            k,
            "refused",
            e.send_ticket("carol", &chat, &old, Some(s("x")), None),
        ));
        tickets.push((
            k,
            "repeat",
            e.send_ticket("alice", &chat, &old, Some(s("x")), None),
        ));
        let new = format!("new{k}");
        tickets.push((
            k,
            "new",
            e.send_ticket("alice", &chat, &new, Some(s("y")), None),
        ));
    }
    let mut new_seqs = Vec::new();
    for (k, kind, ticket) in tickets {
        match (kind, ticket.wait()) {
            ("refused", Err(ChatError::Forbidden(_))) => {}
            ("repeat", Ok(Answer::Sent(sent))) => assert_eq!(sent.seq, earlier[k], "old{k}"),
            ("new", Ok(Answer::Sent(sent))) => new_seqs.push(sent.seq),
            (kind, other) => panic!("{kind} send {k} answered {other:?}"),
        }
    }
    let last = earlier[4];
    assert_eq!(new_seqs, ((last + 1)..=(last + 5)).collect::<Vec<_>>());
}

/// Edits and deletes decided in the same burst as their targets (so before those are
/// applied) follow the same rules as later ones: only the sender edits, the sender or the
/// creator deletes, a deleted message takes neither, a non-message takes neither.
#[test]
fn edits_and_deletes_of_targets_still_in_flight_follow_the_rules() {
    let (_dir, e) = open();
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    let base = e.send("bob", &chat, "m0", Some(s("x")), None).unwrap().seq;
    let (m1, m2, m3, members) = (base + 1, base + 2, base + 3, base + 4);
    let burst = vec![
        (
            "send m1",
            e.send_ticket("bob", &chat, "m1", Some(s("one")), None),
        ),
        (
            "send m2",
            e.send_ticket("bob", &chat, "m2", Some(s("two")), None),
        ),
        (
            "send m3",
            e.send_ticket("bob", &chat, "m3", Some(s("three")), None),
        ),
        (
            "members",
            e.add_members_ticket("alice", &chat, &[s("carol")]),
        ),
        ("alice edits m1", e.edit_ticket("alice", &chat, m1, s("no"))),
        ("bob edits m1", e.edit_ticket("bob", &chat, m1, s("uno"))),
        ("alice deletes m2", e.delete_ticket("alice", &chat, m2)),
        ("bob edits m2", e.edit_ticket("bob", &chat, m2, s("no"))),
        ("bob deletes m2", e.delete_ticket("bob", &chat, m2)),
        ("bob deletes m3", e.delete_ticket("bob", &chat, m3)),
        ("alice deletes m3", e.delete_ticket("alice", &chat, m3)),
        (
            "bob edits members",
            e.edit_ticket("bob", &chat, members, s("no")),
        ),
        ("carol deletes m1", e.delete_ticket("carol", &chat, m1)),
    ];
    let answers: Vec<(&str, String)> = burst
        .into_iter()
        .map(|(what, t)| {
            let answer = match t.wait() {
                Ok(Answer::Sent(sent)) => format!("seq {}", sent.seq),
                Ok(Answer::Seq(seq)) => format!("seq {seq}"),
                Ok(other) => format!("{other:?}"),
                Err(e) => e.code().to_owned(),
            };
            (what, answer)
        })
        .collect();
    let next = |k: u64| format!("seq {}", members + k);
    let expected = vec![
        ("send m1", format!("seq {m1}")),
        ("send m2", format!("seq {m2}")),
        ("send m3", format!("seq {m3}")),
        ("members", format!("seq {members}")),
        ("alice edits m1", s("forbidden")),
        ("bob edits m1", next(1)),
        ("alice deletes m2", next(2)),
        ("bob edits m2", s("bad_request")),
        ("bob deletes m2", s("bad_request")),
        ("bob deletes m3", next(3)),
        ("alice deletes m3", s("bad_request")),
        ("bob edits members", s("bad_request")),
        ("carol deletes m1", s("forbidden")),
    ];
    assert_eq!(answers, expected);
    // Once everything is applied, the indexes rule the same.
    let err = e.edit("bob", &chat, m2, s("no")).unwrap_err();
    assert!(matches!(err, ChatError::BadRequest(_)), "{err}");
    let err = e.delete("alice", &chat, m3).unwrap_err();
    assert!(matches!(err, ChatError::BadRequest(_)), "{err}");
    let page = e.history("bob", &chat, None, Some(base), None).unwrap();
    let flags: Vec<(u64, bool, bool)> = page
        .events
        .iter()
        .filter(|h| [m1, m2, m3].contains(&h.event.seq))
        .map(|h| (h.event.seq, h.edited, h.deleted))
        .collect();
    assert_eq!(
        flags,
        vec![(m1, true, false), (m2, false, true), (m3, false, true)]
    );
}

#[test]
fn rule_violations_are_typed_errors() {
    let (_dir, e) = open();
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    let err = e.send("carol", &chat, "m", Some(s("x")), None).unwrap_err();
    assert!(matches!(err, ChatError::Forbidden(_)), "{err}");
    assert_eq!(err.code(), "forbidden");
    let err = e
        .send("alice", "g999", "m", Some(s("x")), None)
        .unwrap_err();
    assert!(matches!(err, ChatError::NotFound(_)), "{err}");
    let err = e
        .send("alice", &chat, "m", Some("x".repeat(101)), None)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ChatError::TooLarge {
                limit: 100,
                actual: 101,
                ..
            }
        ),
        "{err}"
    );
    let err = e.send("alice", &chat, "m", None, None).unwrap_err();
    assert!(matches!(err, ChatError::BadRequest(_)), "{err}");
    let err = e.send("alice", &chat, "", Some(s("x")), None).unwrap_err();
    assert!(matches!(err, ChatError::BadRequest(_)), "{err}");
    let err = e
        .create_chat("alice", &[s("b"), s("c"), s("d"), s("e")], None, false)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ChatError::TooManyMembers {
                limit: 4,
                actual: 5
            }
        ),
        "{err}"
    );
    let err = e
        .add_members("alice", &chat, &[s("c"), s("d"), s("e")])
        .unwrap_err();
    assert!(matches!(err, ChatError::TooManyMembers { .. }), "{err}");
    let err = e.mark("bob", "phone", &chat, 99, false).unwrap_err();
    assert!(matches!(err, ChatError::BadRequest(_)), "bad cursor: {err}");
    let err = e.history("carol", &chat, None, None, None).unwrap_err();
    assert!(matches!(err, ChatError::Forbidden(_)), "{err}");
    let err = e.create_chat("bad user!", &[], None, false).unwrap_err();
    assert!(matches!(err, ChatError::BadRequest(_)), "{err}");
    let err = e
        .send("alice", &chat, "f", None, Some(s("nofile")))
        .unwrap_err();
    assert!(matches!(err, ChatError::BadRequest(_)), "{err}");
    // Nothing of the above was stored.
    assert_eq!(
        e.history("alice", &chat, None, None, None)
            .unwrap()
            .last_seq,
        1
    );
}

#[test]
fn membership_rules() {
    let (_dir, e) = open();
    let chat = e
        .create_chat("alice", &[s("bob"), s("carol")], None, false)
        .unwrap();
    // Any member may add; already-members are skipped; nobody new → no event.
    assert_eq!(e.add_members("bob", &chat, &[s("dave")]).unwrap(), 2);
    assert_eq!(
        e.add_members("bob", &chat, &[s("dave"), s("alice")])
            .unwrap(),
        2
    );
    // A member may remove itself; only the creator may remove others.
    let err = e.remove_members("bob", &chat, &[s("carol")]).unwrap_err();
    assert!(matches!(err, ChatError::Forbidden(_)), "{err}");
    assert_eq!(e.remove_members("bob", &chat, &[s("bob")]).unwrap(), 3);
    assert_eq!(e.remove_members("alice", &chat, &[s("carol")]).unwrap(), 4);
    // Removed users are refused everything.
    for err in [
        e.send("carol", &chat, "m", Some(s("x")), None).unwrap_err(),
        e.history("carol", &chat, None, None, None)
            .map(|_| ())
            .unwrap_err(),
        e.receipts("carol", &chat).map(|_| ()).unwrap_err(),
        e.mark("carol", "d", &chat, 1, true).unwrap_err(),
        e.add_members("carol", &chat, &[s("x")])
            .map(|_| ())
            .unwrap_err(),
    ] {
        assert!(matches!(err, ChatError::Forbidden(_)), "{err}");
    }
    let listed: Vec<String> = e
        .list_chats("carol")
        .unwrap()
        .into_iter()
        .map(|c| c.chat)
        .collect();
    assert!(listed.is_empty());
    let listed = e.list_chats("dave").unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].members, vec![s("alice"), s("dave")]);
    assert_eq!(listed[0].last_seq, 4);
    // A chat may have the creator as its only member.
    let solo = e.create_chat("zed", &[], None, false).unwrap();
    assert_eq!(
        e.history("zed", &solo, None, None, None).unwrap().last_seq,
        1
    );
}

#[test]
fn direct_chats_are_stable_per_pair() {
    let (_dir, e) = open();
    let a = e.create_chat("alice", &[s("bob")], None, true).unwrap();
    let b = e.create_chat("bob", &[s("alice")], None, true).unwrap();
    assert_eq!(a, b);
    assert_eq!(e.history("bob", &a, None, None, None).unwrap().last_seq, 1);
    let err = e
        .create_chat("alice", &[s("bob"), s("carol")], None, true)
        .unwrap_err();
    assert!(matches!(err, ChatError::BadRequest(_)), "{err}");
    let err = e.add_members("alice", &a, &[s("carol")]).unwrap_err();
    assert!(matches!(err, ChatError::Forbidden(_)), "{err}");
}

#[test]
fn edits_and_deletes_are_tombstones_with_rules() {
    let (_dir, e) = open();
    let chat = e
        .create_chat("alice", &[s("bob"), s("carol")], None, false)
        .unwrap();
    let m = e
        .send("bob", &chat, "1", Some(s("helo")), None)
        .unwrap()
        .seq;
    let err = e.edit("carol", &chat, m, s("hacked")).unwrap_err();
    assert!(matches!(err, ChatError::Forbidden(_)), "{err}");
    let err = e
        .edit("alice", &chat, m, s("creator cannot edit"))
        .unwrap_err();
    assert!(matches!(err, ChatError::Forbidden(_)), "{err}");
    let edit_seq = e.edit("bob", &chat, m, s("hello")).unwrap();
    assert_eq!(edit_seq, m + 1);
    let err = e.edit("bob", &chat, edit_seq, s("x")).unwrap_err();
    assert!(
        matches!(err, ChatError::BadRequest(_)),
        "edit of an edit: {err}"
    );
    let err = e.edit("bob", &chat, 99, s("x")).unwrap_err();
    assert!(matches!(err, ChatError::NotFound(_)), "{err}");
    let h = e.history("carol", &chat, None, None, None).unwrap();
    let msg = h.events.iter().find(|x| x.event.seq == m).unwrap();
    assert!(msg.edited && !msg.deleted);
    assert!(matches!(&msg.event.kind, EventKind::Message { body: Some(b), .. } if b == "hello"));
    let err = e.delete("carol", &chat, m).unwrap_err();
    assert!(matches!(err, ChatError::Forbidden(_)), "{err}");
    // The creator may delete anyone's message.
    let del = e.delete("alice", &chat, m).unwrap();
    let err = e.delete("bob", &chat, m).unwrap_err();
    assert!(matches!(err, ChatError::BadRequest(_)), "{err}");
    let h = e.history("carol", &chat, None, None, None).unwrap();
    let msg = h.events.iter().find(|x| x.event.seq == m).unwrap();
    assert!(msg.deleted);
    assert!(matches!(
        &msg.event.kind,
        EventKind::Message { body: None, .. }
    ));
    assert!(
        matches!(h.events.last().unwrap().event.kind, EventKind::Delete { target } if target == m)
    );
    assert_eq!(h.last_seq, del);
}

#[test]
fn cursors_receipts_and_resume() {
    let (_dir, e) = open();
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    // bob's phone is seen now: it starts at the chat's current end.
    assert!(
        e.resume("bob", "phone", &HashMap::new())
            .unwrap()
            .is_empty()
    );
    for i in 0..5 {
        e.send("alice", &chat, &format!("m{i}"), Some(s("x")), None)
            .unwrap();
    }
    let pending = e.resume("bob", "phone", &HashMap::new()).unwrap();
    assert_eq!(
        pending.iter().map(|x| x.seq).collect::<Vec<_>>(),
        vec![2, 3, 4, 5, 6]
    );
    e.mark("bob", "phone", &chat, 4, false).unwrap();
    e.mark("bob", "phone", &chat, 2, false).unwrap(); // lower: ignored
    assert_eq!(e.cursor("bob", "phone", &chat).unwrap().delivered, 4);
    let pending = e.resume("bob", "phone", &HashMap::new()).unwrap();
    assert_eq!(
        pending.iter().map(|x| x.seq).collect::<Vec<_>>(),
        vec![5, 6]
    );
    // since overrides without moving the stored cursor.
    let since = HashMap::from([(chat.clone(), 1)]);
    assert_eq!(e.resume("bob", "phone", &since).unwrap().len(), 5);
    assert_eq!(e.cursor("bob", "phone", &chat).unwrap().delivered, 4);
    // Receipts: the max over devices; read implies delivered.
    e.mark("bob", "laptop", &chat, 3, true).unwrap();
    let r = e.receipts("alice", &chat).unwrap();
    let bob = r.iter().find(|x| x.user == "bob").unwrap();
    assert_eq!((bob.delivered, bob.read), (4, 3));
    let alice = r.iter().find(|x| x.user == "alice").unwrap();
    assert_eq!((alice.delivered, alice.read), (0, 0));
    let listed = e.list_chats("bob").unwrap();
    assert_eq!((listed[0].delivered, listed[0].read), (4, 3));
    // A device seen for the first time starts at the current end...
    assert!(
        e.resume("dave", "tablet", &HashMap::new())
            .unwrap()
            .is_empty()
    );
    // ...and when its user is added to a chat later, it starts at the members event that
    // added the user.
    e.register_device("carol", "web").unwrap();
    let seq = e.add_members("alice", &chat, &[s("carol")]).unwrap();
    let pending = e.resume("carol", "web", &HashMap::new()).unwrap();
    assert_eq!(pending.first().map(|x| x.seq), Some(seq));
    assert!(matches!(pending[0].kind, EventKind::Members { .. }));
}

#[test]
fn files_are_visible_to_uploader_and_members_of_referencing_chats() {
    let (_dir, e) = open();
    let meta = FileMeta {
        id: s("f1"),
        uploader: s("alice"),
        size: 3,
        sha256: s("00"),
        content_type: s("text/plain"),
    };
    e.register_file(meta.clone()).unwrap();
    assert_eq!(e.file("alice", "f1").unwrap(), meta);
    assert!(matches!(e.file("bob", "f1"), Err(ChatError::NotFound(_))));
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    let err = e.send("bob", &chat, "m", None, Some(s("f1"))).unwrap_err();
    assert!(
        matches!(err, ChatError::BadRequest(_)),
        "only the uploader may send it: {err}"
    );
    e.send("alice", &chat, "m", None, Some(s("f1"))).unwrap();
    assert_eq!(e.file("bob", "f1").unwrap(), meta);
    assert!(matches!(e.file("carol", "f1"), Err(ChatError::NotFound(_))));
}

#[test]
fn subscribers_get_every_committed_record_in_log_order_even_after_lagging() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        subscriber_buffer: 4,
        ..config().0
    };
    let e = Arc::new(Engine::open(dir.path(), config).unwrap());
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    let mut sub = e.subscribe();
    for i in 0..40 {
        e.send("alice", &chat, &format!("m{i}"), Some(s("x")), None)
            .unwrap();
    }
    let mut seqs = Vec::new();
    let mut lagged = 0;
    let mut last_index = 0;
    while seqs.len() < 40 {
        match sub.recv_blocking() {
            Ok(c) => {
                assert!(c.log_index > last_index);
                last_index = c.log_index;
                if let Record::Event { event, .. } = &c.record {
                    seqs.push(event.seq);
                }
            }
            Err(SubscriptionError::Lagged { resume_from }) => {
                // The subscription started after the chat's creation record (log index 1).
                assert_eq!(resume_from, last_index.max(1) + 1);
                lagged += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(lagged > 0, "a buffer of 4 must lag behind 40 events");
    assert_eq!(seqs, (2..=41).collect::<Vec<_>>());
}

/// Subscribers that come and go while sends commit (with none at times, when the engine builds
/// no events) each get every record from where they started, with no gap, up to the end.
#[test]
fn subscribers_joining_while_sends_commit_miss_nothing_after_their_start() {
    let dir = tempfile::tempdir().unwrap();
    let e = Arc::new(Engine::open(dir.path(), config().0).unwrap());
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    const SENDS: u64 = 600;
    let sender = {
        let (e, chat) = (e.clone(), chat.clone());
        std::thread::spawn(move || {
            let tickets: Vec<_> = (0..SENDS)
                .map(|i| e.send_ticket("alice", &chat, &format!("m{i}"), Some(s("x")), None))
                .collect();
            tickets.into_iter().for_each(|t| {
                t.wait().unwrap();
            });
        })
    };
    let mut checked = 0;
    while !sender.is_finished() {
        let mut sub = e.subscribe();
        let mut indexes = Vec::new();
        // Read a few records, then drop the subscription (possibly leaving none).
        while indexes.len() < 5 {
            match sub.try_recv() {
                Some(Ok(c)) => indexes.push(c.log_index),
                Some(Err(SubscriptionError::Lagged { .. })) => {}
                Some(Err(other)) => panic!("{other}"),
                None if sender.is_finished() => break,
                None => std::thread::sleep(std::time::Duration::from_micros(200)),
            }
        }
        if let Some(&first) = indexes.first() {
            let expected: Vec<u64> = (first..first + indexes.len() as u64).collect();
            assert_eq!(indexes, expected, "a subscription from {first} has a gap");
            checked += 1;
        }
    }
    sender.join().unwrap();
    assert!(
        checked > 0,
        "no subscription saw a record while the sends committed"
    );
    let mut sub = e.subscribe();
    let more = e.send("alice", &chat, "after", Some(s("x")), None).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let c = loop {
        match sub.try_recv() {
            Some(c) => break c.unwrap(),
            None if std::time::Instant::now() > deadline => {
                panic!("the last send was not published")
            }
            None => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    };
    let Record::Event { event, .. } = &c.record else {
        panic!("{:?}", c.record)
    };
    assert_eq!(event.seq, more.seq);
}

#[test]
fn reopen_replays_and_rebuilds_identical_indexes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = Engine::open(dir.path(), config().0).unwrap();
        let chat = e
            .create_chat("alice", &[s("bob")], Some(s("t")), false)
            .unwrap();
        for i in 0..30 {
            e.send("alice", &chat, &format!("m{i}"), Some(format!("{i}")), None)
                .unwrap();
        }
        e.edit("alice", &chat, 3, s("edited")).unwrap();
        e.delete("alice", &chat, 4).unwrap();
        e.mark("bob", "d", &chat, 10, true).unwrap();
        e.create_chat("bob", &[s("alice")], None, true).unwrap();
    }
    let digest = |e: &Engine| {
        chatlog::engine::store::DERIVED_CFS
            .iter()
            .map(|cf| (cf.to_string(), e.store().dump(cf).unwrap()))
            .collect::<Vec<_>>()
    };
    let before = digest(&Engine::open(dir.path(), config().0).unwrap());
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let rebuilt = Engine::open(dir.path(), config().0).unwrap();
    assert_eq!(digest(&rebuilt), before);
    // And the engine keeps going with the same numbering.
    let chat2 = rebuilt.create_chat("carol", &[], None, false).unwrap();
    assert_eq!(chat2, "g2");
    let again = rebuilt
        .send("alice", "g1", "m5", Some(s("retry")), None)
        .unwrap();
    assert_eq!(again.seq, 7, "dedup survives the rebuild");
}

/// [`config`] with small log segments (8 KiB, so a few hundred messages fill several) and
/// retention of the latest 30 events per chat, and of `max_age_ms` if given.
fn retention_config(max_age_ms: Option<u64>) -> (EngineConfig, Arc<AtomicU64>) {
    let (mut config, now) = config();
    config.log.segment_size_bytes = 8 * 1024;
    config.log.entry_size_bytes_max = 1024;
    config.retention = chatlog::engine::Retention {
        max_age_ms,
        max_events_per_chat: Some(30),
    };
    (config, now)
}

#[test]
fn retention_by_count_and_age_keeps_seqs_gapless_and_removes_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (config, now) = retention_config(Some(60_000));
    let e = Engine::open(dir.path(), config.clone()).unwrap();
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    for i in 0..200 {
        e.send(
            "alice",
            &chat,
            &format!("m{i}"),
            Some(format!("message number {i}")),
            None,
        )
        .unwrap();
    }
    let first_before = e.log().first_index();
    let report = e.enforce_retention().unwrap();
    assert_eq!(report.chats_trimmed, 1);
    assert!(
        report.log_first_index > first_before,
        "whole segments must be removed"
    );
    let h = e.history("bob", &chat, None, None, Some(500)).unwrap();
    assert_eq!(h.last_seq, 201);
    assert_eq!(h.horizon, 172);
    assert_eq!(h.events.len(), 30);
    assert_eq!(h.events[0].event.seq, 172);
    // Below the horizon there is nothing, and it says so.
    let below = e.history("bob", &chat, Some(100), None, None).unwrap();
    assert!(below.events.is_empty());
    assert_eq!(below.horizon, 172);
    let err = e.edit("alice", &chat, 5, s("too late")).unwrap_err();
    assert!(matches!(err, ChatError::NotFound(_)), "{err}");
    // Seqs continue without gaps.
    assert_eq!(
        e.send("alice", &chat, "next", Some(s("x")), None)
            .unwrap()
            .seq,
        202
    );
    // Age: everything older than a minute goes.
    now.fetch_add(120_000, Ordering::SeqCst);
    e.send("alice", &chat, "fresh", Some(s("new")), None)
        .unwrap();
    e.enforce_retention().unwrap();
    let h = e.history("bob", &chat, None, None, None).unwrap();
    assert_eq!(h.horizon, 203);
    assert_eq!(
        h.events.iter().map(|x| x.event.seq).collect::<Vec<_>>(),
        vec![203]
    );
    drop(e);
    // Reopen works from the remaining segments and the indexes.
    let e = Engine::open(dir.path(), config.clone()).unwrap();
    assert_eq!(
        e.history("bob", &chat, None, None, None)
            .unwrap()
            .events
            .len(),
        1
    );
    // Everything too old: no event is left, and the chat still knows its last seq.
    now.fetch_add(120_000, Ordering::SeqCst);
    e.enforce_retention().unwrap();
    let h = e.history("bob", &chat, None, None, None).unwrap();
    assert_eq!((h.horizon, h.last_seq), (204, 203));
    assert!(h.events.is_empty());
    drop(e);
    let e = Engine::open(dir.path(), config.clone()).unwrap();
    assert_eq!(e.list_chats("bob").unwrap()[0].last_seq, 203);
    assert_eq!(
        e.send("alice", &chat, "after", Some(s("y")), None)
            .unwrap()
            .seq,
        204,
        "seqs continue after a reopen with an empty history"
    );
    drop(e);
    // Without the indexes, the purged log cannot rebuild them: a clear error, not wrong data.
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let err = Engine::open(dir.path(), config).unwrap_err();
    assert!(err.to_string().contains("cannot be rebuilt"), "{err}");
}

#[test]
fn indexes_of_an_earlier_version_with_a_seqs_column_family_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = config();
    let e = Engine::open(dir.path(), config.clone()).unwrap();
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    e.send("alice", &chat, "m1", Some(s("hi")), None).unwrap();
    drop(e);
    // Earlier versions kept chat → last seq in a "seqs" column family.
    let index = dir.path().join("index");
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &index).unwrap();
    let mut db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &index, &cfs).unwrap();
    db.create_cf("seqs", &rocksdb::Options::default()).unwrap();
    let seqs = db.cf_handle("seqs").unwrap();
    db.put_cf(seqs, chat.as_bytes(), 1u64.to_le_bytes())
        .unwrap();
    drop(db);
    let e = Engine::open(dir.path(), config).unwrap();
    assert_eq!(
        e.send("alice", &chat, "m2", Some(s("again")), None)
            .unwrap()
            .seq,
        3
    );
    drop(e);
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &index).unwrap();
    assert!(!cfs.iter().any(|c| c == "seqs"), "dropped at open: {cfs:?}");
}

/// An index tail ingestion that fails (here: its directory is gone) reports the path, keeps
/// the tail's entries readable, and is retried by the next ingestion; nothing is lost.
#[test]
fn a_failed_index_tail_ingestion_keeps_the_tail_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, _) = config();
    // Large enough that only `enforce_retention` ingests the tail.
    config.index_tail_entries = 1_000_000;
    let e = Engine::open(dir.path(), config.clone()).unwrap();
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    for i in 0..20 {
        e.send("alice", &chat, &format!("m{i}"), Some(format!("{i}")), None)
            .unwrap();
    }
    let ingest_dir = dir.path().join("index").join("ingest");
    std::fs::remove_dir_all(&ingest_dir).unwrap();
    let err = e.enforce_retention().unwrap_err().to_string();
    assert!(
        err.contains("ingest"),
        "the error names the ingestion: {err}"
    );
    let h = e.history("bob", &chat, None, None, Some(50)).unwrap();
    assert_eq!(h.events.len(), 21, "the tail's entries stay readable");
    let again = e
        .send("alice", &chat, "m3", Some(s("retry")), None)
        .unwrap();
    assert_eq!(again.seq, 5, "dedup still sees the tail");

    std::fs::create_dir_all(&ingest_dir).unwrap();
    e.enforce_retention().unwrap();
    let h = e.history("bob", &chat, None, None, Some(50)).unwrap();
    assert_eq!(h.events.len(), 21);
    e.close_leaving_tail();
    let e = Engine::open(dir.path(), config).unwrap();
    assert_eq!(
        e.history("bob", &chat, None, None, Some(50))
            .unwrap()
            .events
            .len(),
        21
    );
    let again = e
        .send("alice", &chat, "m19", Some(s("retry")), None)
        .unwrap();
    assert_eq!(
        again.seq, 21,
        "dedup after the retried ingestion and a reopen"
    );
}

/// A body long enough that 200 messages fill several 8 KiB segments.
fn body(i: u64) -> String {
    format!("body {i}: {}", "x".repeat(60))
}

/// A checkpoint holds the state at its begin even when retention removes log segments
/// (and ingests the index tail) before it finishes: the sealed segments it linked stay, and
/// the copy, opened elsewhere, replays the tail it did not ingest.
#[test]
fn a_checkpoint_holds_its_state_when_retention_purges_the_log_before_it_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, _) = retention_config(None);
    let e = Engine::open(dir.path().join("engine"), config.clone()).unwrap();
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    for i in 0..200 {
        e.send("alice", &chat, &format!("m{i}"), Some(body(i)), None)
            .unwrap();
    }
    let dest = dir.path().join("checkpoint");
    let pending = e.checkpoint_begin(&dest).unwrap();
    let first_before = e.log().first_index();
    let report = e.enforce_retention().unwrap();
    assert!(
        report.log_first_index > first_before,
        "segments were removed: {report:?}, first before {first_before}"
    );
    e.send("alice", &chat, "after", Some(s("later")), None)
        .unwrap();
    e.checkpoint_finish(pending).unwrap();

    let own = dir.path().join("own");
    common::fs::copy_dir(&dest, &own);
    config.retention = chatlog::engine::Retention::default();
    let copy = Engine::open(&own, config).unwrap();
    let h = copy.history("bob", &chat, None, None, Some(500)).unwrap();
    assert_eq!((h.horizon, h.last_seq), (1, 201), "the state at the begin");
    assert_eq!(h.events.len(), 201);
    for (i, ev) in h.events[1..].iter().enumerate() {
        let EventKind::Message { body, .. } = &ev.event.kind else {
            panic!("event {} is not a message", ev.event.seq)
        };
        assert_eq!(body.as_deref(), Some(self::body(i as u64).as_str()));
    }
    // Dedup came along: a retry of a message from before is answered with its seq.
    let again = copy
        .send("alice", &chat, "m7", Some(body(7)), None)
        .unwrap();
    assert_eq!(again.seq, 9);
}

/// A log that lost acknowledged entries (damaged after they were synced, or restored from an
/// older copy) under indexes that hold them is refused at open, and the error says what
/// removing the indexes would cost instead of only advising it.
#[test]
fn a_log_missing_acknowledged_entries_is_refused_and_the_cost_of_rebuilding_named() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = config();
    let e = Engine::open(dir.path(), config.clone()).unwrap();
    let chat = e.create_chat("alice", &[s("bob")], None, false).unwrap();
    for i in 0..10 {
        e.send("alice", &chat, &format!("m{i}"), Some(s("hello")), None)
            .unwrap();
    }
    e.close();
    // Tear the last frame of the active segment (the newest `.seg`; the spare is empty).
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "seg")
                && !p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("spare")
        })
        .collect();
    segments.sort();
    let active = segments.last().unwrap();
    let mut bytes = std::fs::read(active).unwrap();
    let end = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
    for b in &mut bytes[end - 8..end] {
        *b = 0;
    }
    std::fs::write(active, &bytes).unwrap();

    let err = Engine::open(dir.path(), config).unwrap_err().to_string();
    assert!(
        err.contains("acknowledged entries are missing from the log")
            && err.contains("drops those entries for good"),
        "{err}"
    );
}

/// `files_page` pages through every file's metadata in id order, whoever uploaded it, each
/// file once, across a reopen.
#[test]
fn files_page_lists_every_file_once_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = config();
    let e = Engine::open(dir.path(), config.clone()).unwrap();
    let meta = |i: u32| FileMeta {
        id: format!("f{i:02}"),
        uploader: if i.is_multiple_of(2) {
            s("alice")
        } else {
            s("bob")
        },
        size: u64::from(i),
        sha256: format!("{i:064}"),
        content_type: s("text/plain"),
    };
    for i in [7, 3, 11, 0, 5, 9, 1] {
        e.register_file(meta(i)).unwrap();
    }
    let all_pages = |e: &Engine| {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = e.files_page(after.as_deref(), 3).unwrap();
            assert!(page.len() <= 3);
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            out.extend(page);
        }
        out
    };
    let expected: Vec<FileMeta> = [0, 1, 3, 5, 7, 9, 11].into_iter().map(meta).collect();
    assert_eq!(all_pages(&e), expected);
    e.close();
    let e = Engine::open(dir.path(), config).unwrap();
    assert_eq!(all_pages(&e), expected);
    assert_eq!(e.files_page(Some("f11"), 3).unwrap(), []);
}
