//! Model-based target for the chat engine: random chat operations on an [`Engine`] whose
//! segment log runs on the fault-injecting `FaultFs` with an I/O countdown (every I/O fails
//! after N), checked against a model of what was acknowledged after every reopen.
//!
//! The model (a simpler form of `crates/chatlog/tests/engine_model.rs`: group chats, valid ids,
//! no titles, a fixed clock) holds per chat the acknowledged events (`events[k]` has seq
//! `k + 1`), the current members, the `(chat, sender, cmid) → seq` of acknowledged sends and the
//! acknowledged cursors. Every write's result must be the model's (the seq, or the refusal's
//! error code) unless a fault is armed, and then it may also be `ChatError::Unavailable`.
//!
//! A write that fails when the log fails stops the engine (`Engine::failure` is set): every
//! later write must answer `Unavailable` until the engine is reopened, and the failed write may
//! or may not have happened (its record may have reached the page cache before the fsync
//! failed). The model keeps it as `pending` and, after the next open, asks the indexes whether
//! it happened: a created chat exists, the chat's last seq moved by exactly one, the cursor
//! moved. A pending send is then retried with its cmid: it must get its original seq if it
//! happened. A write that fails on a *read* inside the sequencer (an edit's target, a dedup's
//! timestamp) does not stop the engine and did not happen.
//!
//! After every fault-free open, and at the end: every chat's last seq, members, and whole
//! history (seqs gapless `1..=last_seq`, each acknowledged message at its acknowledged seq with
//! its body, its latest acknowledged edit's body, or none once deleted), every cursor, and
//! that the next group id is still free.
//!
//! Crashes are process crashes only (`Crash::Process`: the page cache survives). The indexes
//! are RocksDB on a real temporary directory, which no simulated crash touches; a simulated
//! power loss would drop the log's unsynced writes but keep every write RocksDB made (its WAL
//! is not synced per write either), leaving the indexes ahead of the log: a state no real
//! machine reaches, since a real power loss would cut RocksDB's unsynced tail as well.
//! Engines are dropped without `close` for a crash, after the log's file system was
//! snapshotted, so nothing the old engine does afterwards reaches the reopened one.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use chatlog::engine::{
    Answer, ChatError, Cursor, Engine, EngineConfig, Event, EventKind, HISTORY_LIMIT_MAX,
    HistoryEvent, Sent,
};
use chatlog::io::fault::{Crash, FaultFs, Faults};
use chatlog::{Durability, LogConfig, Preallocate, RecoveryMode};
use chatlog_fuzz::{ScratchDir, trace};
use libfuzzer_sys::fuzz_target;

const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];
const DEVICES: [&str; 2] = ["d0", "d1"];
/// Few cmids, so a sender often repeats one (dedup) in a chat.
const CMIDS: [&str; 3] = ["c0", "c1", "c2"];
/// Members per chat, creator included: below `USERS.len()` so the limit is reachable.
const MEMBERS_MAX: usize = 3;
const BODY_BYTES_MAX: usize = 12;
/// Bodies are drawn up to this length, so some are over the limit.
const BODY_BYTES_DRAWN_MAX: usize = BODY_BYTES_MAX + 2;
/// Operations per input: each reopen opens RocksDB, which is most of an input's time.
const OPS_MAX: usize = 32;
/// Largest I/O countdown: an operation does a handful of I/Os, an open a few dozen.
const COUNTDOWN_MAX: u64 = 64;
/// The engine's clock: every event's timestamp.
const CLOCK_MS: u64 = 1_000;
/// Small segments so the log rolls over within an input (records are 40–90 bytes).
const SEGMENT_SIZE_BYTES: u64 = 1024;
const ENTRY_SIZE_BYTES_MAX: usize = 256;

const _: () = assert!(MEMBERS_MAX < USERS.len());
const _: () = assert!(
    OPS_MAX < HISTORY_LIMIT_MAX,
    "one history page holds a whole chat"
);

type Code = &'static str;
type Expected = Result<Answer, Code>;

#[derive(Debug, Clone, Copy, Arbitrary)]
struct Body {
    len: u8,
    letter: u8,
}

impl Body {
    fn text(self) -> String {
        let letter = char::from(b'a' + self.letter % 26);
        std::iter::repeat_n(letter, usize::from(self.len) % (BODY_BYTES_DRAWN_MAX + 1)).collect()
    }
}

/// Operations. Chats, users and seqs are small numbers resolved against the model when the
/// operation runs, so most hit existing chats and members while some miss.
#[derive(Debug, Clone, Arbitrary)]
enum Op {
    /// Create a group chat with up to three other members.
    Create {
        creator: u8,
        members: [u8; 3],
        count: u8,
    },
    Send {
        chat: u8,
        actor: u8,
        cmid: u8,
        body: Body,
    },
    Edit {
        chat: u8,
        actor: u8,
        target: u8,
        body: Body,
    },
    Delete {
        chat: u8,
        actor: u8,
        target: u8,
    },
    Mark {
        chat: u8,
        actor: u8,
        device: u8,
        seq: u8,
        read: bool,
    },
    Add {
        chat: u8,
        actor: u8,
        user: u8,
    },
    Remove {
        chat: u8,
        actor: u8,
        user: u8,
    },
    /// A history page of a chat, compared with the model (no reopen).
    Read {
        chat: u8,
        actor: u8,
    },
    /// Close the engine, clear the faults, open it again on the same files.
    Reopen,
    /// Process crash: snapshot the log's files, drop the engine, open on the snapshot.
    Crash,
    /// Process crash, then open with a countdown armed; if that open fails, crash and open
    /// again without faults.
    CrashWithFault {
        countdown: u8,
    },
    /// Arm the I/O countdown on the running engine's log.
    Arm {
        countdown: u8,
    },
}

/// An operation resolved to concrete ids.
#[derive(Debug, Clone)]
enum Call {
    Create {
        creator: String,
        members: Vec<String>,
    },
    Add {
        user: String,
        chat: String,
        users: Vec<String>,
    },
    Remove {
        user: String,
        chat: String,
        users: Vec<String>,
    },
    Send {
        user: String,
        chat: String,
        cmid: String,
        body: String,
    },
    Edit {
        user: String,
        chat: String,
        target: u64,
        body: String,
    },
    Delete {
        user: String,
        chat: String,
        target: u64,
    },
    Mark {
        user: String,
        device: String,
        chat: String,
        seq: u64,
        read: bool,
    },
}

#[derive(Debug, Clone)]
enum Kind {
    Message {
        cmid: String,
        body: Option<String>,
        edited: bool,
        deleted: bool,
    },
    Edit {
        target: u64,
        body: String,
    },
    Delete {
        target: u64,
    },
    Members {
        added: BTreeSet<String>,
        removed: BTreeSet<String>,
    },
}

#[derive(Debug, Clone)]
struct ModelEvent {
    sender: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
struct ModelChat {
    creator: String,
    members: BTreeSet<String>,
    /// `events[k]` has seq `k + 1`.
    events: Vec<ModelEvent>,
}

impl ModelChat {
    fn last_seq(&self) -> u64 {
        self.events.len() as u64
    }
}

#[derive(Debug, Clone, Default)]
struct Model {
    /// Group chats created; the next is `g{groups + 1}`.
    groups: u64,
    chats: BTreeMap<String, ModelChat>,
    /// (chat, sender, cmid) → seq of the acknowledged message.
    dedup: BTreeMap<(String, String, String), u64>,
    /// (user, device, chat) → (delivered, read).
    cursors: BTreeMap<(String, String, String), (u64, u64)>,
}

fn user(v: u8) -> String {
    USERS[usize::from(v) % USERS.len()].to_owned()
}

impl Model {
    fn next_group(&self) -> String {
        format!("g{}", self.groups + 1)
    }

    /// An existing chat, or (one time in 8, or when there is none) the next group id.
    fn chat_ref(&self, v: u8) -> String {
        if v.is_multiple_of(8) || self.chats.is_empty() {
            return self.next_group();
        }
        let k = usize::from(v / 8) % self.chats.len();
        self.chats.keys().nth(k).expect("index below len").clone()
    }

    /// Mostly a current member of `chat`, sometimes any user.
    fn actor_ref(&self, chat: &str, v: u8) -> String {
        match self.chats.get(chat) {
            Some(c) if !v.is_multiple_of(4) && !c.members.is_empty() => c
                .members
                .iter()
                .nth(usize::from(v / 4) % c.members.len())
                .expect("index below len")
                .clone(),
            _ => user(v),
        }
    }

    /// A seq in `0..=last_seq + 1`.
    fn seq_ref(&self, chat: &str, v: u8) -> u64 {
        let last = self.chats.get(chat).map_or(1, ModelChat::last_seq);
        u64::from(v) % (last + 2)
    }

    /// Mostly a message of `chat`, else its last event or any seq.
    fn target_ref(&self, chat: &str, v: u8) -> u64 {
        let Some(c) = self.chats.get(chat) else {
            return self.seq_ref(chat, v);
        };
        let messages: Vec<u64> = (1..=c.last_seq())
            .filter(|&s| matches!(c.events[(s - 1) as usize].kind, Kind::Message { .. }))
            .collect();
        match v % 4 {
            0 => self.seq_ref(chat, v / 4),
            1 => c.last_seq(),
            _ if messages.is_empty() => c.last_seq(),
            _ => messages[usize::from(v / 4) % messages.len()],
        }
    }

    /// The call `op` makes, or `None` for operations that are not writes.
    fn resolve(&self, op: &Op) -> Option<Call> {
        Some(match *op {
            Op::Create {
                creator,
                members,
                count,
            } => Call::Create {
                creator: user(creator),
                members: members[..usize::from(count % 4)]
                    .iter()
                    .map(|&m| user(m))
                    .collect(),
            },
            Op::Send {
                chat,
                actor,
                cmid,
                body,
            } => {
                let chat = self.chat_ref(chat);
                Call::Send {
                    user: self.actor_ref(&chat, actor),
                    cmid: CMIDS[usize::from(cmid) % CMIDS.len()].to_owned(),
                    body: body.text(),
                    chat,
                }
            }
            Op::Edit {
                chat,
                actor,
                target,
                body,
            } => {
                let chat = self.chat_ref(chat);
                Call::Edit {
                    user: self.actor_ref(&chat, actor),
                    target: self.target_ref(&chat, target),
                    body: body.text(),
                    chat,
                }
            }
            Op::Delete {
                chat,
                actor,
                target,
            } => {
                let chat = self.chat_ref(chat);
                Call::Delete {
                    user: self.actor_ref(&chat, actor),
                    target: self.target_ref(&chat, target),
                    chat,
                }
            }
            Op::Mark {
                chat,
                actor,
                device,
                seq,
                read,
            } => {
                let chat = self.chat_ref(chat);
                Call::Mark {
                    user: self.actor_ref(&chat, actor),
                    device: DEVICES[usize::from(device) % DEVICES.len()].to_owned(),
                    seq: self.seq_ref(&chat, seq),
                    read,
                    chat,
                }
            }
            Op::Add {
                chat,
                actor,
                user: added,
            } => {
                let chat = self.chat_ref(chat);
                Call::Add {
                    user: self.actor_ref(&chat, actor),
                    users: vec![user(added)],
                    chat,
                }
            }
            Op::Remove {
                chat,
                actor,
                user: removed,
            } => {
                let chat = self.chat_ref(chat);
                let actor = self.actor_ref(&chat, actor);
                // Half the time the actor leaves; else someone else is removed.
                let removed = if removed.is_multiple_of(2) {
                    actor.clone()
                } else {
                    user(removed / 2)
                };
                Call::Remove {
                    user: actor,
                    users: vec![removed],
                    chat,
                }
            }
            _ => return None,
        })
    }

    // --- the rules (PROTOCOL.md, as in crates/chatlog/tests/engine_model.rs) ---

    /// `not_found` for an unknown chat, `forbidden` for a non-member.
    fn member_chat(&self, user: &str, chat: &str) -> Result<&ModelChat, Code> {
        let c = self.chats.get(chat).ok_or("not_found")?;
        if !c.members.contains(user) {
            return Err("forbidden");
        }
        Ok(c)
    }

    fn append(&mut self, chat: &str, sender: &str, kind: Kind) -> u64 {
        let c = self.chats.get_mut(chat).expect("appending to a known chat");
        c.events.push(ModelEvent {
            sender: sender.to_owned(),
            kind,
        });
        c.last_seq()
    }

    /// Applies `call` if the rules accept it; a refusal changes nothing.
    fn apply(&mut self, call: &Call) -> Expected {
        match call {
            Call::Create { creator, members } => {
                let mut all: BTreeSet<String> = members.iter().cloned().collect();
                all.insert(creator.clone());
                if all.len() > MEMBERS_MAX {
                    return Err("too_many_members");
                }
                self.groups += 1;
                let id = format!("g{}", self.groups);
                self.chats.insert(
                    id.clone(),
                    ModelChat {
                        creator: creator.clone(),
                        members: all.clone(),
                        events: Vec::new(),
                    },
                );
                let kind = Kind::Members {
                    added: all,
                    removed: BTreeSet::new(),
                };
                self.append(&id, creator, kind);
                Ok(Answer::Chat(id))
            }
            Call::Add { user, chat, users } => {
                let c = self.member_chat(user, chat)?;
                let new: BTreeSet<String> = users
                    .iter()
                    .filter(|u| !c.members.contains(*u))
                    .cloned()
                    .collect();
                if new.is_empty() {
                    return Ok(Answer::Seq(c.last_seq()));
                }
                if c.members.len() + new.len() > MEMBERS_MAX {
                    return Err("too_many_members");
                }
                let c = self.chats.get_mut(chat).expect("checked above");
                c.members.extend(new.iter().cloned());
                let kind = Kind::Members {
                    added: new,
                    removed: BTreeSet::new(),
                };
                Ok(Answer::Seq(self.append(chat, user, kind)))
            }
            Call::Remove { user, chat, users } => {
                let c = self.member_chat(user, chat)?;
                let gone: BTreeSet<String> = users
                    .iter()
                    .filter(|u| c.members.contains(*u))
                    .cloned()
                    .collect();
                if c.creator != *user && gone.iter().any(|u| u != user) {
                    return Err("forbidden");
                }
                if gone.is_empty() {
                    return Ok(Answer::Seq(c.last_seq()));
                }
                let c = self.chats.get_mut(chat).expect("checked above");
                c.members.retain(|m| !gone.contains(m));
                let kind = Kind::Members {
                    added: BTreeSet::new(),
                    removed: gone,
                };
                Ok(Answer::Seq(self.append(chat, user, kind)))
            }
            Call::Send {
                user,
                chat,
                cmid,
                body,
            } => {
                if body.len() > BODY_BYTES_MAX {
                    return Err("too_large");
                }
                self.member_chat(user, chat)?;
                let key = (chat.clone(), user.clone(), cmid.clone());
                if let Some(&seq) = self.dedup.get(&key) {
                    return Ok(Answer::Sent(Sent { seq, ts: CLOCK_MS }));
                }
                let kind = Kind::Message {
                    cmid: cmid.clone(),
                    body: Some(body.clone()),
                    edited: false,
                    deleted: false,
                };
                let seq = self.append(chat, user, kind);
                self.dedup.insert(key, seq);
                Ok(Answer::Sent(Sent { seq, ts: CLOCK_MS }))
            }
            Call::Edit {
                user,
                chat,
                target,
                body,
            } => {
                if body.len() > BODY_BYTES_MAX {
                    return Err("too_large");
                }
                let (sender, _) = self.target(user, chat, *target)?;
                if sender != *user {
                    return Err("forbidden");
                }
                let kind = Kind::Edit {
                    target: *target,
                    body: body.clone(),
                };
                let seq = self.append(chat, user, kind);
                if let Kind::Message {
                    body: current,
                    edited,
                    ..
                } = self.message_mut(chat, *target)
                {
                    *current = Some(body.clone());
                    *edited = true;
                }
                Ok(Answer::Seq(seq))
            }
            Call::Delete { user, chat, target } => {
                let (sender, creator) = self.target(user, chat, *target)?;
                if sender != *user && creator != *user {
                    return Err("forbidden");
                }
                let seq = self.append(chat, user, Kind::Delete { target: *target });
                if let Kind::Message { body, deleted, .. } = self.message_mut(chat, *target) {
                    *body = None;
                    *deleted = true;
                }
                Ok(Answer::Seq(seq))
            }
            Call::Mark {
                user,
                device,
                chat,
                seq,
                read,
            } => {
                let c = self.member_chat(user, chat)?;
                if *seq > c.last_seq() {
                    return Err("bad_request");
                }
                let cursor = self
                    .cursors
                    .entry((user.clone(), device.clone(), chat.clone()))
                    .or_default();
                cursor.0 = cursor.0.max(*seq);
                if *read {
                    cursor.1 = cursor.1.max(*seq);
                }
                Ok(Answer::Done)
            }
        }
    }

    /// The sender of the message at `target` and the chat's creator: `not_found` for a seq
    /// outside the chat, `bad_request` for an event that is not a message or a deleted one.
    fn target(&self, user: &str, chat: &str, target: u64) -> Result<(String, String), Code> {
        let c = self.member_chat(user, chat)?;
        if target == 0 || target > c.last_seq() {
            return Err("not_found");
        }
        let event = &c.events[(target - 1) as usize];
        match event.kind {
            Kind::Message { deleted: false, .. } => Ok((event.sender.clone(), c.creator.clone())),
            _ => Err("bad_request"),
        }
    }

    fn message_mut(&mut self, chat: &str, target: u64) -> &mut Kind {
        &mut self.chats.get_mut(chat).expect("known chat").events[(target - 1) as usize].kind
    }

    /// What history shows for the event at `seq` of `chat`.
    fn history_event(&self, chat: &str, seq: u64) -> HistoryEvent {
        let e = &self.chats[chat].events[(seq - 1) as usize];
        let (kind, edited, deleted) = match &e.kind {
            Kind::Message {
                cmid,
                body,
                edited,
                deleted,
            } => (
                EventKind::Message {
                    cmid: cmid.clone(),
                    body: body.clone(),
                    file: None,
                },
                *edited,
                *deleted,
            ),
            Kind::Edit { target, body } => (
                EventKind::Edit {
                    target: *target,
                    body: body.clone(),
                },
                false,
                false,
            ),
            Kind::Delete { target } => (EventKind::Delete { target: *target }, false, false),
            Kind::Members { added, removed } => (
                EventKind::Members {
                    added: added.iter().cloned().collect(),
                    removed: removed.iter().cloned().collect(),
                    title: None,
                },
                false,
                false,
            ),
        };
        HistoryEvent {
            event: Event {
                chat: chat.to_owned(),
                seq,
                ts: CLOCK_MS,
                sender: e.sender.clone(),
                kind,
            },
            edited,
            deleted,
        }
    }
}

/// Runs `call` on the engine and waits for it.
fn call_engine(engine: &Engine, call: &Call) -> Result<Answer, ChatError> {
    let ticket = match call {
        Call::Create { creator, members } => {
            engine.create_chat_ticket(creator, members, None, false)
        }
        Call::Add { user, chat, users } => engine.add_members_ticket(user, chat, users),
        Call::Remove { user, chat, users } => engine.remove_members_ticket(user, chat, users),
        Call::Send {
            user,
            chat,
            cmid,
            body,
        } => engine.send_ticket(user, chat, cmid, Some(body.clone()), None),
        Call::Edit {
            user,
            chat,
            target,
            body,
        } => engine.edit_ticket(user, chat, *target, body.clone()),
        Call::Delete { user, chat, target } => engine.delete_ticket(user, chat, *target),
        Call::Mark {
            user,
            device,
            chat,
            seq,
            read,
        } => engine.mark_ticket(user, device, chat, *seq, *read),
    };
    ticket.wait()
}

fn countdown(n: u8) -> Faults {
    Faults {
        ios_left: Some(u64::from(n) % (COUNTDOWN_MAX + 1)),
        ..Faults::default()
    }
}

/// Fields drop in order: the engine before the directory it works in.
/// The directory of a new, empty engine (its indexes in `index/`), made once per process. Every input starts
/// from a copy of it: opening RocksDB is most of an input's time, and creating its column
/// families (what a first open does) is a third of that.
fn template_dir() -> &'static Path {
    static TEMPLATE: OnceLock<ScratchDir> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let dir = ScratchDir::new("engine_model-template");
            let fs = FaultFs::new();
            Engine::open(dir.path(), config(&fs))
                .expect("a new engine opens")
                .close();
            dir
        })
        .path()
}

/// Copies the index files of the engine directory `from` (RocksDB keeps no subdirectories)
/// into a new `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the index directory");
    for entry in std::fs::read_dir(from.join("index")).expect("read the template") {
        let entry = entry.expect("template entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy the template");
    }
}

fn config(fs: &FaultFs) -> EngineConfig {
    EngineConfig {
        log: LogConfig {
            segment_size_bytes: SEGMENT_SIZE_BYTES,
            entry_size_bytes_max: ENTRY_SIZE_BYTES_MAX,
            queue_depth_max: 64,
            index_stride: 2,
            durability: Durability::Batch,
            preallocate: Preallocate::Sparse,
            recovery: RecoveryMode::TolerateTornTail,
            file_system: Some(Arc::new(fs.clone())),
            ..LogConfig::default()
        },
        members_max: MEMBERS_MAX,
        body_bytes_max: BODY_BYTES_MAX,
        queue_depth_max: 64,
        subscriber_buffer: 16,
        clock: Arc::new(|| CLOCK_MS),
        ..EngineConfig::default()
    }
}

struct Harness {
    engine: Option<Engine>,
    /// Real directory of the indexes (RocksDB); the log lives at `<dir>/log` inside `fs`.
    dir: ScratchDir,
    fs: FaultFs,
    model: Model,
    /// The write that failed when the engine stopped: it may or may not have happened.
    pending: Option<Call>,
    /// A countdown is armed on `fs` (so operations may fail).
    armed: bool,
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(first_countdown) = u.arbitrary::<Option<u8>>() else {
        return;
    };
    let dir = ScratchDir::new("engine_model");
    copy_dir(template_dir(), &dir.path().join("index"));
    let mut h = Harness {
        engine: None,
        dir,
        fs: FaultFs::new(),
        model: Model::default(),
        pending: None,
        armed: false,
    };
    h.open_clean("first open");
    if let Some(n) = first_countdown {
        h.arm(n);
    }
    for op in u.arbitrary_iter::<Op>().expect("iterator").take(OPS_MAX) {
        let Ok(op) = op else { break };
        if trace() {
            eprintln!("op: {op:?}");
        }
        h.step(op);
    }
    // Whatever happened, a process crash now must give back everything acknowledged.
    h.crash_and_reopen();
    h.engine.take().expect("engine is open").close();
});

impl Harness {
    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("engine is open")
    }

    fn open(&self, fs: &FaultFs) -> Result<Engine, ChatError> {
        Engine::open(self.dir.path(), config(fs))
    }

    fn arm(&mut self, n: u8) {
        self.fs.set_faults(countdown(n));
        self.armed = true;
    }

    fn step(&mut self, op: Op) {
        if let Some(call) = self.model.resolve(&op) {
            self.write(call);
            return;
        }
        match op {
            Op::Read { chat, actor } => {
                let chat = self.model.chat_ref(chat);
                let actor = self.model.actor_ref(&chat, actor);
                self.check_history(&actor, &chat);
            }
            Op::Reopen => {
                self.engine.take().expect("engine is open").close();
                self.fs.set_faults(Faults::default());
                self.open_clean("reopen");
            }
            Op::Crash => self.crash_and_reopen(),
            Op::CrashWithFault { countdown: n } => {
                let crashed = self.fs.crash(Crash::Process);
                drop(self.engine.take());
                crashed.set_faults(countdown(n));
                self.fs = crashed;
                match self.open(&self.fs) {
                    Ok(engine) => {
                        // Opened (replay done); its reads may now fail, so only the indexes
                        // are consulted. The history is checked at the next fault-free open.
                        self.engine = Some(engine);
                        self.armed = true;
                        self.settle();
                    }
                    Err(error) => {
                        assert!(
                            matches!(error, ChatError::Unavailable(_)),
                            "open under an I/O countdown failed with: {error}"
                        );
                        self.crash_and_reopen();
                    }
                }
            }
            Op::Arm { countdown: n } => self.arm(n),
            _ => unreachable!("writes are resolved above"),
        }
    }

    /// Crash (process): the log's files as they are now, the engine dropped, then a
    /// fault-free open and a full check.
    fn crash_and_reopen(&mut self) {
        let crashed = self.fs.crash(Crash::Process);
        drop(self.engine.take());
        self.fs = crashed;
        self.open_clean("reopen after a process crash");
    }

    fn open_clean(&mut self, what: &str) {
        let engine = self
            .open(&self.fs)
            .unwrap_or_else(|e| panic!("{what} failed: {e} (pending {:?})", self.pending));
        self.engine = Some(engine);
        self.armed = false;
        self.settle();
    }

    /// After an open: decides from the indexes whether the pending write happened, retries
    /// a pending send, and (when no fault is armed) checks everything against the model.
    fn settle(&mut self) {
        assert!(self.engine().failure().is_none(), "a new engine has failed");
        if let Some(call) = self.pending.take() {
            let happened = self.happened(&call);
            if trace() {
                eprintln!("pending {call:?} happened: {happened}");
            }
            if happened {
                assert!(self.model.apply(&call).is_ok(), "pending {call:?} refused");
            }
            if matches!(call, Call::Send { .. }) {
                // The client retries with the same cmid: it gets the original seq if the
                // send happened, else (the same) next seq.
                self.write(call);
            }
        }
        if !self.armed {
            self.check_all();
        }
    }

    /// Whether the pending write `call` (which the model accepts) is in the indexes.
    fn happened(&self, call: &Call) -> bool {
        let engine = self.engine();
        match call {
            Call::Create { .. } => {
                let id = self.model.next_group();
                match engine.members(&id) {
                    Ok(_) => true,
                    Err(ChatError::NotFound(_)) => false,
                    Err(e) => panic!("members of {id}: {e}"),
                }
            }
            Call::Add { chat, .. }
            | Call::Remove { chat, .. }
            | Call::Send { chat, .. }
            | Call::Edit { chat, .. }
            | Call::Delete { chat, .. } => {
                let want = self.model.chats[chat].last_seq();
                let got = engine.store().last_seq(chat).expect("indexes read");
                assert!(
                    got == want || got == want + 1,
                    "{chat}: last seq {got} after a failed {call:?}, model has {want}"
                );
                got == want + 1
            }
            Call::Mark {
                user, device, chat, ..
            } => {
                let key = (user.clone(), device.clone(), chat.clone());
                let old = self.model.cursors.get(&key).copied().unwrap_or_default();
                let mut next = self.model.clone();
                next.apply(call).expect("pending call is accepted");
                let new = next.cursors[&key];
                let got = engine.cursor(user, device, chat).expect("cursor read");
                let got = (got.delivered, got.read);
                assert!(
                    got == old || got == new,
                    "cursor {key:?} is {got:?} after a failed mark, model has {old:?} or {new:?}"
                );
                got == new && new != old
            }
        }
    }

    /// Runs one write and checks its result against the model.
    fn write(&mut self, call: Call) {
        let mut next = self.model.clone();
        let expected = next.apply(&call);
        let failed_before = self.engine().failure().is_some();
        let got = call_engine(self.engine(), &call);
        if trace() {
            eprintln!("  {call:?} -> {got:?} (model: {expected:?})");
        }
        match got {
            Err(ChatError::Unavailable(error)) => {
                assert!(
                    self.armed,
                    "{call:?} failed with no fault armed: unavailable: {error}"
                );
                assert!(
                    !matches!(error, chatlog::Error::Closed),
                    "{call:?}: engine closed"
                );
                let failed_now = self.engine().failure().is_some();
                if !failed_before && failed_now && expected.is_ok() {
                    // The log failed under this write: it may or may not have happened.
                    assert!(self.pending.is_none(), "two writes failed the engine");
                    self.pending = Some(call);
                }
                // Otherwise a read inside the sequencer failed (nothing was written), or the
                // engine had already stopped (refused before deciding anything).
            }
            Err(ChatError::Busy) => panic!("{call:?}: busy with one operation in flight"),
            got => {
                assert!(
                    !failed_before,
                    "{call:?} answered {got:?} after the engine failed (must be unavailable)"
                );
                let got = got.map_err(|e| e.code());
                assert_eq!(got, expected, "{call:?}: engine and model disagree");
                self.model = next;
            }
        }
    }

    /// A history page of `chat` read by `user`, against the model.
    fn check_history(&self, user: &str, chat: &str) {
        let got = self
            .engine()
            .history(user, chat, None, Some(0), Some(HISTORY_LIMIT_MAX));
        let page = match got {
            Ok(page) => page,
            Err(ChatError::Unavailable(error)) => {
                assert!(self.armed, "history of {chat} failed unarmed: {error}");
                return;
            }
            Err(error) => {
                assert_eq!(
                    Err(error.code()),
                    self.model.member_chat(user, chat).map(|_| ()),
                    "history of {chat} for {user}"
                );
                return;
            }
        };
        let c = self
            .model
            .member_chat(user, chat)
            .unwrap_or_else(|e| panic!("history of {chat} for {user} succeeded; model: {e}"));
        assert_eq!(page.last_seq, c.last_seq(), "{chat}: last seq");
        let seqs: Vec<u64> = page.events.iter().map(|e| e.event.seq).collect();
        assert_eq!(
            seqs,
            (1..=c.last_seq()).collect::<Vec<_>>(),
            "{chat}: seqs are not gapless 1..=last_seq"
        );
        for got in &page.events {
            let want = self.model.history_event(chat, got.event.seq);
            assert_eq!(got, &want, "{chat}: event {} differs", got.event.seq);
        }
    }

    /// Every chat, cursor and the next group id against the model (no fault armed).
    fn check_all(&self) {
        let engine = self.engine();
        for (id, c) in &self.model.chats {
            let last = engine.store().last_seq(id).expect("indexes read");
            assert_eq!(last, c.last_seq(), "{id}: last seq");
            let members = engine.members(id).expect("members of a known chat");
            assert_eq!(
                members,
                c.members.iter().cloned().collect::<Vec<_>>(),
                "{id}: members"
            );
            if let Some(member) = c.members.first() {
                self.check_history(member, id);
            }
        }
        for ((user, device, chat), &(delivered, read)) in &self.model.cursors {
            let got = engine.cursor(user, device, chat).expect("cursor read");
            let want = Cursor {
                start: 0,
                delivered,
                read,
            };
            assert_eq!(got, want, "cursor of {user}/{device} in {chat}");
        }
        let next = self.model.next_group();
        assert!(
            matches!(engine.members(&next), Err(ChatError::NotFound(_))),
            "{next} exists before it was created"
        );
    }
}
