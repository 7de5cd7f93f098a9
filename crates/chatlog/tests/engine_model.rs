//! Property test: random sequences of chat operations (create, add/remove members, sends with
//! repeated cmids, edits, deletes, cursor moves, device registration and resume, history and
//! receipt queries, clock ticks, bursts of pipelined writes, reopen, index rebuild from the log
//! and replay from a stale index) against an in-memory model of the chat rules.
//!
//! The model, and the comparison of the engine's answers with it, is `support/engine_model.rs`
//! (shared with the fuzz target `fuzz/fuzz_targets/engine_model.rs`); this file has the proptest
//! strategies and what happens to the engine between operations. Every write's result and
//! every query must agree with the model after every operation. Every reopen must give back
//! identical indexes, and at the end of a case seqs are gapless, no sender used a cmid twice in
//! a chat, and a full rebuild of the indexes from the log agrees with everything.
//!
//! The regression tests at the end pin, as literal scripts, the disagreements the model found.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chatlog::LogConfig;
use chatlog::engine::{Engine, EngineConfig, Ticket};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

mod common;
#[path = "support/engine_model.rs"]
mod model;

use model::{
    BODY_BYTES_MAX, CLOCK_START_MS, CMID_REF_EMPTY, CMID_REF_TOO_LONG, Call, Expected,
    HistoryQuery, MEMBERS_MAX, Model, TITLE_BYTES_MAX, Text, USER_REF_INVALID, USER_REF_OTHER,
    USER_REF_SELF, Write, check_gapless_and_deduplicated, check_history_page, check_receipts,
    check_resume, check_state, code, submit,
};

/// Small segments so the log rolls over several times per case.
const SEGMENT_SIZE_BYTES: u64 = 2048;
const ENTRY_SIZE_BYTES_MAX: usize = 512;
/// A small index tail, frozen and ingested many times per case.
const INDEX_TAIL_ENTRIES: usize = 24;

// ---------------------------------------------------------------------------------------------
// Generated operations: the writes of `model::Write`, and what else happens between them.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// One write, waited for.
    Write(Write),
    /// Several writes submitted at once and then waited for: the sequencer decides them in
    /// submission order, in one or more batches, before the earlier ones are applied.
    Burst(Vec<Write>),
    /// A history page with random bounds and limit.
    History {
        chat: u8,
        actor: u8,
        before: Option<u8>,
        after: Option<u8>,
        limit: Option<u16>,
    },
    Receipts {
        chat: u8,
        actor: u8,
    },
    /// A device connects: `resume` (the events it is sent) or `resume_points`; registers the
    /// device if it is new.
    Resume {
        device: u8,
        since: Option<(u8, u8)>,
        points: bool,
    },
    /// Many sends from one member to one chat at once, with cmids `f0`, `f1`, … (a second
    /// flood from the same sender repeats them): long chats for history's page limits, many
    /// records per batch and per segment.
    Flood {
        chat: u8,
        actor: u8,
        count: u16,
    },
    /// The injected clock moves forward by this many ms.
    Tick(u16),
    /// Close and open again (every acknowledged op is durable, so a plain drop is a crash as
    /// far as chat state goes). Also snapshots the index directory for [`Op::StaleIndex`].
    Reopen,
    /// Close without ingesting the index tail (as a crash leaves it) and reopen: the log
    /// records after the last ingestion are applied again over the other indexes.
    Crash,
    /// Remove the index directory and reopen: a full rebuild from the log.
    RebuildIndex,
    /// Put back the index directory of the last [`Op::Reopen`] and reopen: the log holds
    /// records the indexes never applied (a crash between log append and index apply).
    StaleIndex,
}

fn text() -> impl Strategy<Value = Text> {
    (0u8..36, 0u8..26, prop::bool::weighted(0.1)).prop_map(|(len, letter, wide)| Text {
        len,
        letter,
        wide,
    })
}

/// A user, an invalid id, the acting user itself, or (`other_weight` times in 16) someone the
/// operation makes interesting (see `Model::other_ref`).
fn user_ref(other_weight: u32) -> impl Strategy<Value = u8> {
    prop_oneof![
        13 - other_weight => 0..USER_REF_INVALID,
        1 => Just(USER_REF_INVALID),
        2 => Just(USER_REF_SELF),
        other_weight => Just(USER_REF_OTHER),
    ]
}

/// A cmid of `CMIDS`, sometimes an empty or too long one.
fn cmid_ref() -> impl Strategy<Value = u8> {
    prop_oneof![12 => 0..CMID_REF_EMPTY, 1 => CMID_REF_EMPTY..CMID_REF_TOO_LONG + 1]
}

fn create() -> impl Strategy<Value = Write> {
    (
        0u8..5,
        prop::collection::vec(user_ref(0), 0..3),
        0u8..8,
        prop::bool::weighted(0.2),
    )
        .prop_map(|(creator, members, title, direct)| Write::Create {
            creator,
            members,
            title,
            direct,
        })
}

fn write() -> impl Strategy<Value = Write> {
    let chat = any::<u8>;
    let actor = any::<u8>;
    prop_oneof![
        3 => create(),
        4 => (chat(), actor(), prop::collection::vec(user_ref(6), 0..4))
            .prop_map(|(chat, actor, users)| Write::Add { chat, actor, users }),
        3 => (chat(), actor(), prop::collection::vec(user_ref(3), 0..3))
            .prop_map(|(chat, actor, users)| Write::Remove { chat, actor, users }),
        10 => (chat(), actor(), cmid_ref(), prop::option::weighted(0.9, text()))
            .prop_map(|(chat, actor, cmid, body)| Write::Send { chat, actor, cmid, body }),
        3 => (chat(), actor(), any::<u8>(), text())
            .prop_map(|(chat, actor, target, body)| Write::Edit { chat, actor, target, body }),
        2 => (chat(), actor(), any::<u8>())
            .prop_map(|(chat, actor, target)| Write::Delete { chat, actor, target }),
        4 => (chat(), actor(), 0u8..2, any::<u8>(), any::<bool>())
            .prop_map(|(chat, actor, device, seq, read)| Write::Mark {
                chat,
                actor,
                device,
                seq,
                read,
            }),
        3 => (0u8..5, 0u8..2).prop_map(|(user, device)| Write::Register { user, device }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => write().prop_map(Op::Write),
        4 => prop::collection::vec(write(), 2..6).prop_map(Op::Burst),
        3 => (
            any::<u8>(),
            any::<u8>(),
            prop::option::of(any::<u8>()),
            prop::option::of(any::<u8>()),
            prop::option::of(prop::sample::select(vec![0u16, 1, 2, 3, 7, 50, 600])),
        )
            .prop_map(|(chat, actor, before, after, limit)| Op::History {
                chat,
                actor,
                before,
                after,
                limit,
            }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(chat, actor)| Op::Receipts { chat, actor }),
        5 => (any::<u8>(), prop::option::weighted(0.2, (any::<u8>(), any::<u8>())), any::<bool>())
            .prop_map(|(device, since, points)| Op::Resume {
                device,
                since,
                points,
            }),
        1 => (any::<u8>(), any::<u8>(), prop_oneof![9 => 1u16..60, 1 => 500u16..520])
            .prop_map(|(chat, actor, count)| Op::Flood { chat, actor, count }),
        2 => (1u16..1000).prop_map(Op::Tick),
        // Opening RocksDB takes most of a case's time: about one restart in 25 ops.
        2 => prop_oneof![
            Just(Op::Reopen),
            Just(Op::Crash),
            Just(Op::RebuildIndex),
            Just(Op::StaleIndex),
        ],
    ]
}

// ---------------------------------------------------------------------------------------------
// The engine side.
// ---------------------------------------------------------------------------------------------

type Digest = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

/// Everything the indexes derive from the log.
fn digest(e: &Engine) -> Digest {
    chatlog::engine::store::DERIVED_CFS
        .iter()
        .map(|cf| (cf.to_string(), e.store().dump(cf).unwrap()))
        .collect()
}

struct Harness {
    dir: tempfile::TempDir,
    now_ms: Arc<AtomicU64>,
    engine: Option<Engine>,
    has_snapshot: bool,
}

impl Harness {
    fn new() -> Harness {
        let mut h = Harness {
            dir: tempfile::tempdir().unwrap(),
            now_ms: Arc::new(AtomicU64::new(CLOCK_START_MS)),
            engine: None,
            has_snapshot: false,
        };
        h.open();
        h
    }

    fn config(&self) -> EngineConfig {
        let now_ms = self.now_ms.clone();
        EngineConfig {
            log: LogConfig {
                segment_size_bytes: SEGMENT_SIZE_BYTES,
                entry_size_bytes_max: ENTRY_SIZE_BYTES_MAX,
                ..LogConfig::default()
            },
            members_max: MEMBERS_MAX,
            body_bytes_max: BODY_BYTES_MAX,
            title_bytes_max: TITLE_BYTES_MAX,
            clock: Arc::new(move || now_ms.load(Ordering::SeqCst)),
            // Small, so that cases freeze and ingest the index tail many times.
            index_tail_entries: INDEX_TAIL_ENTRIES,
            ..EngineConfig::default()
        }
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("engine is open")
    }

    fn index_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("index")
    }

    fn snapshot_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("index-snapshot")
    }

    fn open(&mut self) {
        self.engine = Some(Engine::open(self.dir.path(), self.config()).unwrap());
    }

    /// Closes the engine, lets `between` change the directory, opens it again, and checks
    /// the indexes came back identical.
    fn reopen_with(&mut self, between: impl FnOnce(&Harness)) -> Result<(), TestCaseError> {
        self.reopen_after(Engine::close, between)
    }

    /// [`Harness::reopen_with`], closing the engine with `close`.
    fn reopen_after(
        &mut self,
        close: impl FnOnce(Engine),
        between: impl FnOnce(&Harness),
    ) -> Result<(), TestCaseError> {
        let before = digest(self.engine());
        close(self.engine.take().expect("engine is open"));
        between(self);
        self.open();
        for ((cf, was), (_, now)) in before.iter().zip(&digest(self.engine())) {
            prop_assert!(
                now == was,
                "column family {} differs after reopen: {} entries, {} before",
                cf,
                now.len(),
                was.len()
            );
        }
        Ok(())
    }
}

/// An engine and the model side by side; every step compares them.
struct Script {
    h: Harness,
    model: Model,
}

impl Script {
    fn new() -> Script {
        Script {
            h: Harness::new(),
            model: Model::new(),
        }
    }

    /// One write, waited for.
    fn write(&mut self, c: &Call) -> Result<(), TestCaseError> {
        let want = self.model.apply(c);
        prop_assert_eq!(code(submit(self.h.engine(), c).wait()), want, "{:?}", c);
        Ok(())
    }

    /// Submits a write without waiting; the model applies it now (the sequencer decides in
    /// submission order).
    fn submit(&mut self, c: Call) -> (Ticket, Call, Expected) {
        let want = self.model.apply(&c);
        (submit(self.h.engine(), &c), c, want)
    }

    fn wait(pending: Vec<(Ticket, Call, Expected)>) -> Result<(), TestCaseError> {
        for (ticket, c, want) in pending {
            prop_assert_eq!(code(ticket.wait()), want, "in a burst: {:?}", c);
        }
        Ok(())
    }

    fn burst(&mut self, calls: Vec<Call>) -> Result<(), TestCaseError> {
        let pending = calls.into_iter().map(|c| self.submit(c)).collect();
        Script::wait(pending)
    }

    /// `resume_points` (with `points`) or `resume`: the device's starting points, or the
    /// events it is sent, per chat.
    fn resume(
        &mut self,
        user: &str,
        device: &str,
        since: &HashMap<String, u64>,
        points: bool,
    ) -> Result<(), TestCaseError> {
        check_resume(
            self.h.engine(),
            &mut self.model,
            user,
            device,
            since,
            points,
        )?;
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        check_state(self.h.engine(), &self.model)?;
        Ok(())
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        let model = &self.model;
        match op {
            Op::Write(w) => {
                let c = model.resolve(&w);
                self.write(&c)?;
            }
            Op::Burst(ws) => {
                // Each write is resolved against the model after the previous one.
                let mut pending = Vec::new();
                for w in &ws {
                    let c = self.model.resolve(w);
                    pending.push(self.submit(c));
                }
                Script::wait(pending)?;
            }
            Op::History {
                chat,
                actor,
                before,
                after,
                limit,
            } => {
                let chat = model.chat_ref(chat);
                let user = model.actor_ref(&chat, actor);
                let q = HistoryQuery {
                    user: &user,
                    chat: &chat,
                    before: before.map(|b| model.seq_ref(&chat, b)),
                    after: after.map(|a| model.seq_ref(&chat, a)),
                    limit: limit.map(usize::from),
                };
                check_history_page(self.h.engine(), model, &q)?;
            }
            Op::Receipts { chat, actor } => {
                let chat = model.chat_ref(chat);
                let user = model.actor_ref(&chat, actor);
                check_receipts(self.h.engine(), model, &user, &chat)?;
            }
            Op::Resume {
                device,
                since,
                points,
            } => {
                let (user, device) = model.device_ref(device);
                let since: HashMap<String, u64> = since
                    .map(|(chat, seq)| {
                        let chat = model.chat_ref(chat);
                        let seq = model.seq_ref(&chat, seq);
                        (chat, seq)
                    })
                    .into_iter()
                    .collect();
                self.resume(&user, &device, &since, points)?;
            }
            Op::Flood { chat, actor, count } => {
                let chat = model.chat_ref(chat);
                let user = model.actor_ref(&chat, actor);
                let calls = (0..count)
                    .map(|k| Call::Send {
                        user: user.clone(),
                        chat: chat.clone(),
                        cmid: format!("f{k}"),
                        body: Some(format!("flood {k}")),
                    })
                    .collect();
                self.burst(calls)?;
            }
            Op::Tick(ms) => {
                self.model.now_ms += u64::from(ms);
                self.h.now_ms.store(self.model.now_ms, Ordering::SeqCst);
            }
            Op::Reopen => {
                self.h.reopen_with(|h| {
                    let snapshot = h.snapshot_dir();
                    if snapshot.exists() {
                        std::fs::remove_dir_all(&snapshot).unwrap();
                    }
                    common::fs::copy_dir(&h.index_dir(), &snapshot);
                })?;
                self.h.has_snapshot = true;
            }
            Op::Crash => {
                self.h.reopen_after(Engine::close_leaving_tail, |_| {})?;
            }
            Op::RebuildIndex => {
                self.h
                    .reopen_with(|h| std::fs::remove_dir_all(h.index_dir()).unwrap())?;
            }
            Op::StaleIndex => {
                let stale = self.h.has_snapshot;
                self.h.reopen_with(|h| {
                    if stale {
                        std::fs::remove_dir_all(h.index_dir()).unwrap();
                        common::fs::copy_dir(&h.snapshot_dir(), &h.index_dir());
                    }
                })?;
            }
        }
        self.check()
    }

    /// The end of a case: seqs gapless, no duplicate cmids; then a full rebuild of the
    /// indexes from the log comes back identical and still agrees with the model.
    fn finish(mut self) -> Result<(), TestCaseError> {
        check_gapless_and_deduplicated(self.h.engine(), &self.model)?;
        self.h
            .reopen_with(|h| std::fs::remove_dir_all(h.index_dir()).unwrap())?;
        self.check()?;
        check_gapless_and_deduplicated(self.h.engine(), &self.model)?;
        Ok(())
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut script = Script::new();
    for op in ops {
        script.step(op)?;
    }
    script.finish()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_chat_model(
        chats in prop::collection::vec(create(), 1..4),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        run(chats.into_iter().map(Op::Write).chain(ops).collect())?;
    }
}

// ---------------------------------------------------------------------------------------------
// Regression tests: disagreements the model found, as literal scripts.
// ---------------------------------------------------------------------------------------------

fn s(v: &str) -> String {
    v.to_owned()
}

fn create_group(creator: &str, members: &[&str]) -> Call {
    Call::Create {
        creator: s(creator),
        members: members.iter().map(|m| s(m)).collect(),
        title: None,
        direct: false,
    }
}

fn send(user: &str, chat: &str, cmid: &str) -> Call {
    Call::Send {
        user: s(user),
        chat: s(chat),
        cmid: s(cmid),
        body: Some(s("hi")),
    }
}

fn mark(user: &str, device: &str, chat: &str, seq: u64) -> Call {
    Call::Mark {
        user: s(user),
        device: s(device),
        chat: s(chat),
        seq,
        read: false,
    }
}

fn register(user: &str, device: &str) -> Call {
    Call::Register {
        user: s(user),
        device: s(device),
    }
}

/// "cursors only move forward": a device that acknowledged seq 1 before it was first
/// registered still has delivered 1 afterwards, and the user's receipt (the max over its
/// devices) agrees with its devices' cursors.
#[test]
fn registering_a_device_keeps_what_it_acknowledged() {
    let mut t = Script::new();
    t.write(&create_group("u0", &[])).unwrap();
    t.write(&mark("u0", "d0", "g1", 1)).unwrap();
    t.write(&register("u0", "d0")).unwrap();
    t.check().unwrap();
}

/// "A device seen for the first time starts at each chat's current `last_seq`", also for a
/// chat created just before in the same burst (decided before the creation is applied).
#[test]
fn a_device_registered_right_after_a_chat_is_created_starts_at_its_end() {
    let mut t = Script::new();
    t.burst(vec![create_group("u0", &["u1"]), register("u0", "d0")])
        .unwrap();
    t.resume("u0", "d0", &HashMap::new(), false).unwrap();
    t.check().unwrap();
}

/// Editing or deleting an event that is not a message is a bad request whether or not that
/// event has been applied yet: the answer must not depend on batching.
#[test]
fn editing_a_members_event_is_refused_the_same_way_before_it_is_applied() {
    let mut t = Script::new();
    t.burst(vec![
        create_group("u0", &[]),
        Call::Edit {
            user: s("u0"),
            chat: s("g1"),
            target: 1,
            body: s("x"),
        },
        Call::Delete {
            user: s("u0"),
            chat: s("g1"),
            target: 1,
        },
    ])
    .unwrap();
}

/// "a user added to a chat starts at the members event that added it", and "cursors only
/// move forward": acknowledging an older seq after joining must not make resume send events
/// from before the join.
#[test]
fn resume_starts_at_the_join_after_a_low_acknowledgement() {
    let mut t = Script::new();
    t.write(&register("u1", "d0")).unwrap();
    t.write(&create_group("u0", &[])).unwrap();
    t.write(&send("u0", "g1", "c0")).unwrap();
    t.write(&Call::Add {
        user: s("u0"),
        chat: s("g1"),
        users: vec![s("u1")],
    })
    .unwrap();
    t.write(&mark("u1", "d0", "g1", 1)).unwrap();
    t.resume("u1", "d0", &HashMap::new(), true).unwrap();
}

/// The same for a user removed and added again: its device resumes at the members event that
/// added it back, not at where it was before the removal.
#[test]
fn resume_starts_at_the_join_after_being_added_again() {
    let mut t = Script::new();
    t.write(&create_group("u0", &["u1"])).unwrap();
    t.write(&register("u1", "d0")).unwrap();
    t.write(&Call::Remove {
        user: s("u1"),
        chat: s("g1"),
        users: vec![s("u1")],
    })
    .unwrap();
    t.write(&send("u0", "g1", "c0")).unwrap();
    t.write(&Call::Add {
        user: s("u0"),
        chat: s("g1"),
        users: vec![s("u1")],
    })
    .unwrap();
    t.resume("u1", "d0", &HashMap::new(), true).unwrap();
}
