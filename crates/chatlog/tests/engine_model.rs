//! Property test: random sequences of chat operations (create, add/remove members, sends with
//! repeated cmids, edits, deletes, cursor moves, device registration and resume, history and
//! receipt queries, clock ticks, bursts of pipelined writes, reopen, index rebuild from the log
//! and replay from a stale index) against an in-memory model of the chat rules.
//!
//! The model is written from `PROTOCOL.md`, not from the sequencer: every write's result
//! (chat ids, seqs, timestamps, error codes) and every query (history pages, `list_chats`,
//! receipts, cursors, resume) must agree with it, after every operation. Every reopen must give
//! back identical indexes, and at the end of a case seqs are gapless, no sender used a cmid
//! twice in a chat, and a full rebuild of the indexes from the log agrees with everything.
//! Where the protocol leaves a choice open (which error wins when several apply, direct chats'
//! fixed membership, ...) the model follows the engine and says so in a comment.
//!
//! The regression tests at the end pin, as literal scripts, the disagreements the model found.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chatlog::LogConfig;
use chatlog::engine::{
    Answer, ChatError, ChatSummary, Cursor, Engine, EngineConfig, Event, EventKind, HistoryEvent,
    Receipt, ResumePoint, Sent, Ticket,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];
/// Not a valid user id (a space is outside `A-Za-z0-9_.@-`).
const INVALID_USER: &str = "u 5";
const DEVICES: [&str; 2] = ["d0", "d1"];
const CMIDS: [&str; 6] = ["c0", "c1", "c2", "c3", "c4", "c5"];
/// Members per chat, creator included: smaller than `USERS` so the limit is reachable.
const MEMBERS_MAX: usize = 4;
const BODY_BYTES_MAX: usize = 32;
const TITLE_BYTES_MAX: usize = 16;
/// PROTOCOL.md: user ids are 1–64 chars, cmids 1–64 chars.
const ID_BYTES_MAX: usize = 64;
/// PROTOCOL.md: history `limit` defaults to 50 and is capped at 500.
const HISTORY_LIMIT_DEFAULT: usize = 50;
const HISTORY_LIMIT_MAX: usize = 500;
/// What full-history checks ask for: more than the cap, so they check the cap too.
const HISTORY_LIMIT_ASKED: usize = 2 * HISTORY_LIMIT_MAX;
const CLOCK_START_MS: u64 = 1_000;
/// Small segments so the log rolls over several times per case.
const SEGMENT_SIZE_BYTES: u64 = 2048;
const ENTRY_SIZE_BYTES_MAX: usize = 512;

const _: () = assert!(MEMBERS_MAX < USERS.len());
const _: () = assert!(MEMBERS_MAX >= 2, "a direct chat has two members");

type Code = &'static str;
type Expected = Result<Answer, Code>;

// ---------------------------------------------------------------------------------------------
// Generated operations. Chats, users and targets are small numbers resolved against the model
// when the operation runs, so most operations hit existing chats and members while some still
// miss (unknown chat, non-member, seq out of range).
// ---------------------------------------------------------------------------------------------

/// A body: `len` times one character; `wide` uses a 2-byte character so byte and char counts
/// differ.
#[derive(Debug, Clone, Copy)]
struct Text {
    len: u8,
    letter: u8,
    wide: bool,
}

#[derive(Debug, Clone)]
enum Write {
    Create {
        creator: u8,
        members: Vec<u8>,
        title: u8,
        direct: bool,
    },
    Add {
        chat: u8,
        actor: u8,
        users: Vec<u8>,
    },
    Remove {
        chat: u8,
        actor: u8,
        users: Vec<u8>,
    },
    Send {
        chat: u8,
        actor: u8,
        cmid: u8,
        body: Option<Text>,
    },
    Edit {
        chat: u8,
        actor: u8,
        target: u8,
        body: Text,
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
    Register {
        user: u8,
        device: u8,
    },
}

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

/// 0–4: a user; 5: an invalid id; 6: the acting user itself; 7: someone the operation makes
/// interesting (see [`Model::other_ref`]), `other_weight` times in 16.
fn user_ref(other_weight: u32) -> impl Strategy<Value = u8> {
    prop_oneof![
        13 - other_weight => 0u8..5,
        1 => Just(5u8),
        2 => Just(6u8),
        other_weight => Just(7u8),
    ]
}

/// 0–5: a cmid of `CMIDS`; 6: empty; 7: too long.
fn cmid_ref() -> impl Strategy<Value = u8> {
    prop_oneof![12 => 0u8..6, 1 => 6u8..8]
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
            Just(Op::RebuildIndex),
            Just(Op::StaleIndex),
        ],
    ]
}

fn body_of(t: Text) -> String {
    let c = if t.wide {
        'é'
    } else {
        char::from(b'a' + t.letter % 26)
    };
    std::iter::repeat_n(c, usize::from(t.len)).collect()
}

fn title_of(v: u8) -> Option<String> {
    match v % 8 {
        0..3 => None,
        3..5 => Some("lunch".into()),
        5 => Some(String::new()),
        6 => Some("t".repeat(TITLE_BYTES_MAX)),
        _ => Some("t".repeat(TITLE_BYTES_MAX + 1)),
    }
}

fn cmid_of(v: u8) -> String {
    match v {
        0..6 => CMIDS[usize::from(v)].into(),
        6 => String::new(),
        _ => "x".repeat(ID_BYTES_MAX + 1),
    }
}

fn user_of(v: u8, me: &str, other: &str) -> String {
    match v {
        0..5 => USERS[usize::from(v)].into(),
        5 => INVALID_USER.into(),
        6 => me.into(),
        _ => other.into(),
    }
}

/// A write with every reference resolved.
#[derive(Debug, Clone)]
enum Call {
    Create {
        creator: String,
        members: Vec<String>,
        title: Option<String>,
        direct: bool,
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
        body: Option<String>,
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
    Register {
        user: String,
        device: String,
    },
}

// ---------------------------------------------------------------------------------------------
// The model.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Message {
        cmid: String,
        /// The current text: the latest edit's, `None` once deleted.
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
        title: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct ModelEvent {
    seq: u64,
    ts: u64,
    sender: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
struct ModelChat {
    creator: String,
    direct: bool,
    title: Option<String>,
    members: BTreeSet<String>,
    /// Seq of the members event that (last) added each user.
    joined: HashMap<String, u64>,
    /// `events[k]` has seq `k + 1`.
    events: Vec<ModelEvent>,
}

impl ModelChat {
    fn last_seq(&self) -> u64 {
        self.events.len() as u64
    }
}

/// A device's position in a chat. `start` is where the device began when it was first seen;
/// `delivered` and `read` are what it acknowledged. None of them ever moves back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DeviceCursor {
    start: u64,
    delivered: u64,
    read: u64,
}

#[derive(Debug)]
struct Model {
    now_ms: u64,
    /// Group chats created so far; the next is `g{groups + 1}`.
    groups: u64,
    chats: BTreeMap<String, ModelChat>,
    /// (chat, sender, cmid) → (seq, ts) of the message.
    dedup: HashMap<(String, String, String), (u64, u64)>,
    /// (user, device, chat) → cursor.
    cursors: BTreeMap<(String, String, String), DeviceCursor>,
    /// Devices seen (registered) so far.
    devices: BTreeSet<(String, String)>,
}

/// PROTOCOL.md: 1–64 chars of `A-Za-z0-9_.@-`.
fn valid_id(id: &str) -> bool {
    (1..=ID_BYTES_MAX).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c))
}

impl Model {
    fn new() -> Model {
        Model {
            now_ms: CLOCK_START_MS,
            groups: 0,
            chats: BTreeMap::new(),
            dedup: HashMap::new(),
            cursors: BTreeMap::new(),
            devices: BTreeSet::new(),
        }
    }

    // --- resolving generated references ---

    /// An existing chat, or (one time in 8, or when there is none) the next group id, which
    /// does not exist yet.
    fn chat_ref(&self, v: u8) -> String {
        if v.is_multiple_of(8) || self.chats.is_empty() {
            return format!("g{}", self.groups + 1);
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
            _ => USERS[usize::from(v) % USERS.len()].into(),
        }
    }

    /// For adding: a former member of `chat` (re-adding), for removing: another current
    /// member; else `me`.
    fn other_ref(&self, chat: &str, me: &str, former: bool) -> String {
        let Some(c) = self.chats.get(chat) else {
            return me.into();
        };
        let found = if former {
            c.joined.keys().filter(|u| !c.members.contains(*u)).min()
        } else {
            c.members.iter().find(|u| *u != me)
        };
        found.map_or_else(|| me.into(), Clone::clone)
    }

    /// A seq in `0..=last_seq + 1`.
    fn seq_ref(&self, chat: &str, v: u8) -> u64 {
        let last = self.chats.get(chat).map_or(2, ModelChat::last_seq);
        u64::from(v) % (last + 2)
    }

    /// Half the time a message of `chat`; else the chat's latest event (in a burst, often one
    /// the indexes have not applied yet) or any seq in `0..=last_seq + 1`.
    fn target_ref(&self, chat: &str, v: u8) -> u64 {
        let Some(c) = self.chats.get(chat) else {
            return self.seq_ref(chat, v);
        };
        let messages: Vec<u64> = c
            .events
            .iter()
            .filter(|e| matches!(e.kind, Kind::Message { .. }))
            .map(|e| e.seq)
            .collect();
        match v % 4 {
            0 => self.seq_ref(chat, v / 4),
            1 => c.last_seq(),
            _ if messages.is_empty() => c.last_seq(),
            _ => messages[usize::from(v / 4) % messages.len()],
        }
    }

    /// Half the time a (user, device) the model already knows (registered, or with a
    /// cursor), else any.
    fn device_ref(&self, v: u8) -> (String, String) {
        let known: BTreeSet<(String, String)> = self
            .devices
            .iter()
            .cloned()
            .chain(self.cursors.keys().map(|(u, d, _)| (u.clone(), d.clone())))
            .collect();
        if v.is_multiple_of(2) && !known.is_empty() {
            let k = usize::from(v / 2) % known.len();
            return known.into_iter().nth(k).expect("index below len");
        }
        let k = usize::from(v / 2);
        (
            USERS[k % USERS.len()].into(),
            DEVICES[(k / USERS.len()) % DEVICES.len()].into(),
        )
    }

    fn resolve(&self, w: &Write) -> Call {
        match *w {
            Write::Create {
                creator,
                ref members,
                title,
                direct,
            } => {
                let creator = USERS[usize::from(creator) % USERS.len()].to_owned();
                Call::Create {
                    members: members
                        .iter()
                        .map(|&m| user_of(m, &creator, &creator))
                        .collect(),
                    title: title_of(title),
                    direct,
                    creator,
                }
            }
            Write::Add {
                chat,
                actor,
                ref users,
            } => {
                let chat = self.chat_ref(chat);
                let user = self.actor_ref(&chat, actor);
                let other = self.other_ref(&chat, &user, true);
                Call::Add {
                    users: users.iter().map(|&u| user_of(u, &user, &other)).collect(),
                    user,
                    chat,
                }
            }
            Write::Remove {
                chat,
                actor,
                ref users,
            } => {
                let chat = self.chat_ref(chat);
                let user = self.actor_ref(&chat, actor);
                let other = self.other_ref(&chat, &user, false);
                Call::Remove {
                    users: users.iter().map(|&u| user_of(u, &user, &other)).collect(),
                    user,
                    chat,
                }
            }
            Write::Send {
                chat,
                actor,
                cmid,
                body,
            } => {
                let chat = self.chat_ref(chat);
                Call::Send {
                    user: self.actor_ref(&chat, actor),
                    cmid: cmid_of(cmid),
                    body: body.map(body_of),
                    chat,
                }
            }
            Write::Edit {
                chat,
                actor,
                target,
                body,
            } => {
                let chat = self.chat_ref(chat);
                Call::Edit {
                    user: self.actor_ref(&chat, actor),
                    target: self.target_ref(&chat, target),
                    body: body_of(body),
                    chat,
                }
            }
            Write::Delete {
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
            Write::Mark {
                chat,
                actor,
                device,
                seq,
                read,
            } => {
                let chat = self.chat_ref(chat);
                Call::Mark {
                    user: self.actor_ref(&chat, actor),
                    device: DEVICES[usize::from(device) % DEVICES.len()].into(),
                    seq: self.seq_ref(&chat, seq),
                    read,
                    chat,
                }
            }
            Write::Register { user, device } => Call::Register {
                user: USERS[usize::from(user) % USERS.len()].into(),
                device: DEVICES[usize::from(device) % DEVICES.len()].into(),
            },
        }
    }

    // --- the rules ---

    /// The chat, if `user` is a member: `not_found` for an unknown chat, `forbidden` for a
    /// non-member (PROTOCOL.md `send`; "removed users get `forbidden` afterwards").
    fn member_chat(&self, user: &str, chat: &str) -> Result<&ModelChat, Code> {
        let c = self.chats.get(chat).ok_or("not_found")?;
        if !c.members.contains(user) {
            return Err("forbidden");
        }
        Ok(c)
    }

    fn append(&mut self, chat: &str, sender: &str, kind: Kind) -> u64 {
        let now_ms = self.now_ms;
        let c = self.chats.get_mut(chat).expect("appending to a known chat");
        let seq = c.last_seq() + 1;
        if let Kind::Members { added, .. } = &kind {
            for u in added {
                c.joined.insert(u.clone(), seq);
            }
        }
        c.events.push(ModelEvent {
            seq,
            ts: now_ms,
            sender: sender.into(),
            kind,
        });
        seq
    }

    fn apply(&mut self, call: &Call) -> Expected {
        match call {
            Call::Create {
                creator,
                members,
                title,
                direct,
            } => self.create(creator, members, title, *direct),
            Call::Add { user, chat, users } => self.add_members(user, chat, users),
            Call::Remove { user, chat, users } => self.remove_members(user, chat, users),
            Call::Send {
                user,
                chat,
                cmid,
                body,
            } => self.send(user, chat, cmid, body),
            Call::Edit {
                user,
                chat,
                target,
                body,
            } => self.edit(user, chat, *target, body),
            Call::Delete { user, chat, target } => self.delete(user, chat, *target),
            Call::Mark {
                user,
                device,
                chat,
                seq,
                read,
            } => self.mark(user, device, chat, *seq, *read),
            Call::Register { user, device } => {
                self.register(user, device);
                Ok(Answer::Done)
            }
        }
    }

    fn create(
        &mut self,
        creator: &str,
        members: &[String],
        title: &Option<String>,
        direct: bool,
    ) -> Expected {
        // Which error wins when several apply is not in PROTOCOL.md; the engine's order is
        // ids, title, then membership.
        if !valid_id(creator) || !members.iter().all(|m| valid_id(m)) {
            return Err("bad_request");
        }
        if title.as_ref().is_some_and(|t| t.len() > TITLE_BYTES_MAX) {
            return Err("too_large");
        }
        let mut all: BTreeSet<String> = members.iter().cloned().collect();
        all.insert(creator.into());
        let id = if direct {
            // "`direct` with one other user returns the same chat for the same pair every
            // time"; anything but exactly one other user is a bad request (engine's choice).
            let others: Vec<&String> = all.iter().filter(|m| *m != creator).collect();
            let [other] = others[..] else {
                return Err("bad_request");
            };
            let (lo, hi) = if creator <= other.as_str() {
                (creator, other.as_str())
            } else {
                (other.as_str(), creator)
            };
            let id = format!("d:{lo}:{hi}");
            if self.chats.contains_key(&id) {
                return Ok(Answer::Chat(id));
            }
            id
        } else {
            if all.len() > MEMBERS_MAX {
                return Err("too_many_members");
            }
            self.groups += 1;
            format!("g{}", self.groups)
        };
        self.chats.insert(
            id.clone(),
            ModelChat {
                creator: creator.into(),
                direct,
                title: title.clone(),
                members: all.clone(),
                joined: HashMap::new(),
                events: Vec::new(),
            },
        );
        self.append(
            &id,
            creator,
            Kind::Members {
                added: all,
                removed: BTreeSet::new(),
                title: title.clone(),
            },
        );
        Ok(Answer::Chat(id))
    }

    fn add_members(&mut self, user: &str, chat: &str, users: &[String]) -> Expected {
        if !users.iter().all(|u| valid_id(u)) {
            return Err("bad_request");
        }
        let c = self.member_chat(user, chat)?;
        // PROTOCOL.md says "any member may add" and does not mention direct chats; the engine
        // keeps a direct chat's pair fixed (`forbidden`). Followed here.
        if c.direct {
            return Err("forbidden");
        }
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
        let seq = self.append(
            chat,
            user,
            Kind::Members {
                added: new,
                removed: BTreeSet::new(),
                title: None,
            },
        );
        Ok(Answer::Seq(seq))
    }

    fn remove_members(&mut self, user: &str, chat: &str, users: &[String]) -> Expected {
        if !users.iter().all(|u| valid_id(u)) {
            return Err("bad_request");
        }
        let c = self.member_chat(user, chat)?;
        let gone: BTreeSet<String> = users
            .iter()
            .filter(|u| c.members.contains(*u))
            .cloned()
            .collect();
        if c.creator != user && gone.iter().any(|u| u != user) {
            return Err("forbidden");
        }
        if gone.is_empty() {
            return Ok(Answer::Seq(c.last_seq()));
        }
        // As for adding: a direct chat's pair cannot change (engine's choice, not in
        // PROTOCOL.md, which says "a member may remove itself").
        if c.direct {
            return Err("forbidden");
        }
        let c = self.chats.get_mut(chat).expect("checked above");
        c.members.retain(|m| !gone.contains(m));
        let seq = self.append(
            chat,
            user,
            Kind::Members {
                added: BTreeSet::new(),
                removed: gone,
                title: None,
            },
        );
        Ok(Answer::Seq(seq))
    }

    fn send(&mut self, user: &str, chat: &str, cmid: &str, body: &Option<String>) -> Expected {
        // Order of checks: request shape (cmid, body present, body size), then chat and
        // membership, then dedup (engine's order; PROTOCOL.md does not rank errors, and a
        // retry is expected to repeat the same request).
        if cmid.is_empty() || cmid.len() > ID_BYTES_MAX {
            return Err("bad_request");
        }
        let Some(body) = body else {
            return Err("bad_request");
        };
        if body.len() > BODY_BYTES_MAX {
            return Err("too_large");
        }
        self.member_chat(user, chat)?;
        let key = (chat.to_owned(), user.to_owned(), cmid.to_owned());
        if let Some(&(seq, ts)) = self.dedup.get(&key) {
            return Ok(Answer::Sent(Sent { seq, ts }));
        }
        let seq = self.append(
            chat,
            user,
            Kind::Message {
                cmid: cmid.into(),
                body: Some(body.clone()),
                edited: false,
                deleted: false,
            },
        );
        let ts = self.now_ms;
        self.dedup.insert(key, (seq, ts));
        Ok(Answer::Sent(Sent { seq, ts }))
    }

    /// The message at `target`: its sender and the chat's creator. An unknown seq is
    /// `not_found`; an event that is not a message, or a deleted one, is `bad_request` (not
    /// in PROTOCOL.md; the engine's choice).
    fn target(&self, user: &str, chat: &str, target: u64) -> Result<(String, String), Code> {
        let c = self.member_chat(user, chat)?;
        if target == 0 || target > c.last_seq() {
            return Err("not_found");
        }
        let event = &c.events[(target - 1) as usize];
        match &event.kind {
            Kind::Message { deleted: false, .. } => Ok((event.sender.clone(), c.creator.clone())),
            _ => Err("bad_request"),
        }
    }

    fn message_mut(&mut self, chat: &str, target: u64) -> &mut Kind {
        &mut self.chats.get_mut(chat).expect("known chat").events[(target - 1) as usize].kind
    }

    fn edit(&mut self, user: &str, chat: &str, target: u64, body: &str) -> Expected {
        if body.len() > BODY_BYTES_MAX {
            return Err("too_large");
        }
        let (sender, _) = self.target(user, chat, target)?;
        // "only the original sender".
        if sender != user {
            return Err("forbidden");
        }
        let seq = self.append(
            chat,
            user,
            Kind::Edit {
                target,
                body: body.into(),
            },
        );
        if let Kind::Message {
            body: current,
            edited,
            ..
        } = self.message_mut(chat, target)
        {
            *current = Some(body.into());
            *edited = true;
        }
        Ok(Answer::Seq(seq))
    }

    fn delete(&mut self, user: &str, chat: &str, target: u64) -> Expected {
        let (sender, creator) = self.target(user, chat, target)?;
        // "only the original sender or the chat's creator".
        if sender != user && creator != user {
            return Err("forbidden");
        }
        let seq = self.append(chat, user, Kind::Delete { target });
        if let Kind::Message { body, deleted, .. } = self.message_mut(chat, target) {
            *body = None;
            *deleted = true;
        }
        Ok(Answer::Seq(seq))
    }

    fn mark(&mut self, user: &str, device: &str, chat: &str, seq: u64, read: bool) -> Expected {
        let c = self.member_chat(user, chat)?;
        // Acknowledging beyond the chat's end is a bad request (engine's choice).
        if seq > c.last_seq() {
            return Err("bad_request");
        }
        // "cursors only move forward (a lower value is ignored)"; read implies delivered.
        let cursor = self
            .cursors
            .entry((user.into(), device.into(), chat.into()))
            .or_default();
        cursor.delivered = cursor.delivered.max(seq);
        if read {
            cursor.read = cursor.read.max(seq);
        }
        Ok(Answer::Done)
    }

    /// "A device seen for the first time starts at each chat's current `last_seq`": it starts
    /// there in every chat its user is in. What it already acknowledged stays (cursors only
    /// move forward).
    fn register(&mut self, user: &str, device: &str) {
        if !self.devices.insert((user.into(), device.into())) {
            return;
        }
        for (id, c) in &self.chats {
            if c.members.contains(user) {
                self.cursors
                    .entry((user.into(), device.into(), id.clone()))
                    .or_default()
                    .start = c.last_seq();
            }
        }
    }

    // --- queries ---

    fn cursor(&self, user: &str, device: &str, chat: &str) -> DeviceCursor {
        self.cursors
            .get(&(user.into(), device.into(), chat.into()))
            .copied()
            .unwrap_or_default()
    }

    /// "a user's value is the max over its devices of what they acknowledged".
    fn receipt(&self, chat: &str, user: &str) -> (u64, u64) {
        DEVICES.iter().fold((0, 0), |(d, r), device| {
            let c = self.cursor(user, device, chat);
            (d.max(c.delivered), r.max(c.read))
        })
    }

    fn event(&self, chat: &str, e: &ModelEvent) -> HistoryEvent {
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
            Kind::Members {
                added,
                removed,
                title,
            } => (
                EventKind::Members {
                    added: added.iter().cloned().collect(),
                    removed: removed.iter().cloned().collect(),
                    title: title.clone(),
                },
                false,
                false,
            ),
        };
        HistoryEvent {
            event: Event {
                chat: chat.into(),
                seq: e.seq,
                ts: e.ts,
                sender: e.sender.clone(),
                kind,
            },
            edited,
            deleted,
        }
    }

    /// PROTOCOL.md `history`: "no cursor: the latest `limit` events; `before`: the latest
    /// `limit` events with seq < before; `after`: the earliest `limit` events with seq >
    /// after; both: the earliest `limit` events strictly between".
    fn history(
        &self,
        user: &str,
        chat: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<usize>,
    ) -> Result<(Vec<HistoryEvent>, u64), Code> {
        let c = self.member_chat(user, chat)?;
        let limit = limit
            .unwrap_or(HISTORY_LIMIT_DEFAULT)
            .min(HISTORY_LIMIT_MAX);
        let between: Vec<&ModelEvent> = c
            .events
            .iter()
            .filter(|e| before.is_none_or(|b| e.seq < b) && after.is_none_or(|a| e.seq > a))
            .collect();
        let n = limit.min(between.len());
        let page = if after.is_some() {
            &between[..n]
        } else {
            &between[between.len() - n..]
        };
        Ok((
            page.iter().map(|e| self.event(chat, e)).collect(),
            c.last_seq(),
        ))
    }

    fn list_chats(&self, user: &str) -> Vec<ChatSummary> {
        self.chats
            .iter()
            .filter(|(_, c)| c.members.contains(user))
            .map(|(id, c)| {
                let (delivered, read) = self.receipt(id, user);
                ChatSummary {
                    chat: id.clone(),
                    title: c.title.clone(),
                    members: c.members.iter().cloned().collect(),
                    last_seq: c.last_seq(),
                    delivered,
                    read,
                }
            })
            .collect()
    }

    fn receipts(&self, user: &str, chat: &str) -> Result<Vec<Receipt>, Code> {
        let c = self.member_chat(user, chat)?;
        Ok(c.members
            .iter()
            .map(|m| {
                let (delivered, read) = self.receipt(chat, m);
                Receipt {
                    user: m.clone(),
                    delivered,
                    read,
                }
            })
            .collect())
    }

    /// PROTOCOL.md "Resume and offline delivery": for every chat of the user, the events
    /// after the device's position. The position is `since[chat]` when given; otherwise the
    /// furthest of: the members event that added the user ("a user added to a chat starts at
    /// the members event that added it"), where the device started when first seen, and what
    /// it acknowledged — cursors only move forward, so an acknowledgement below the point
    /// where the device started is ignored.
    fn resume_points(
        &mut self,
        user: &str,
        device: &str,
        since: &HashMap<String, u64>,
    ) -> Vec<ResumePoint> {
        self.register(user, device);
        self.chats
            .iter()
            .filter(|(_, c)| c.members.contains(user))
            .map(|(id, c)| {
                let after = match since.get(id) {
                    Some(&s) => s,
                    None => {
                        let cursor = self.cursor(user, device, id);
                        (c.joined[user] - 1).max(cursor.start).max(cursor.delivered)
                    }
                };
                ResumePoint {
                    chat: id.clone(),
                    after: after.min(c.last_seq()),
                    last_seq: c.last_seq(),
                }
            })
            .collect()
    }

    /// The events a resume sends, by chat. A resumed message carries its current body, as
    /// history shows it (PROTOCOL.md does not say which; the engine sends the current one).
    fn resume_events(&self, points: &[ResumePoint]) -> BTreeMap<String, Vec<Event>> {
        points
            .iter()
            .map(|p| {
                let events = self.chats[&p.chat].events[p.after as usize..]
                    .iter()
                    .map(|e| self.event(&p.chat, e).event)
                    .collect();
                (p.chat.clone(), events)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The engine side.
// ---------------------------------------------------------------------------------------------

fn code<T>(r: Result<T, ChatError>) -> Result<T, Code> {
    r.map_err(|e| e.code())
}

fn call(e: &Engine, c: &Call) -> Result<Answer, ChatError> {
    match c {
        Call::Create {
            creator,
            members,
            title,
            direct,
        } => e
            .create_chat(creator, members, title.clone(), *direct)
            .map(Answer::Chat),
        Call::Add { user, chat, users } => e.add_members(user, chat, users).map(Answer::Seq),
        Call::Remove { user, chat, users } => e.remove_members(user, chat, users).map(Answer::Seq),
        Call::Send {
            user,
            chat,
            cmid,
            body,
        } => e
            .send(user, chat, cmid, body.clone(), None)
            .map(Answer::Sent),
        Call::Edit {
            user,
            chat,
            target,
            body,
        } => e.edit(user, chat, *target, body.clone()).map(Answer::Seq),
        Call::Delete { user, chat, target } => e.delete(user, chat, *target).map(Answer::Seq),
        Call::Mark {
            user,
            device,
            chat,
            seq,
            read,
        } => e
            .mark(user, device, chat, *seq, *read)
            .map(|()| Answer::Done),
        Call::Register { user, device } => e.register_device(user, device).map(|()| Answer::Done),
    }
}

fn submit(e: &Engine, c: &Call) -> Ticket {
    match c {
        Call::Create {
            creator,
            members,
            title,
            direct,
        } => e.create_chat_ticket(creator, members, title.clone(), *direct),
        Call::Add { user, chat, users } => e.add_members_ticket(user, chat, users),
        Call::Remove { user, chat, users } => e.remove_members_ticket(user, chat, users),
        Call::Send {
            user,
            chat,
            cmid,
            body,
        } => e.send_ticket(user, chat, cmid, body.clone(), None),
        Call::Edit {
            user,
            chat,
            target,
            body,
        } => e.edit_ticket(user, chat, *target, body.clone()),
        Call::Delete { user, chat, target } => e.delete_ticket(user, chat, *target),
        Call::Mark {
            user,
            device,
            chat,
            seq,
            read,
        } => e.mark_ticket(user, device, chat, *seq, *read),
        Call::Register { user, device } => e.register_device_ticket(user, device),
    }
}

/// Membership lists in an event in sorted order (PROTOCOL.md gives them no order).
fn normalize(kind: &mut EventKind) {
    if let EventKind::Members { added, removed, .. } = kind {
        added.sort();
        removed.sort();
    }
}

type Digest = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

/// Everything the indexes derive from the log.
fn digest(e: &Engine) -> Digest {
    chatlog::engine::store::DERIVED_CFS
        .iter()
        .map(|cf| (cf.to_string(), e.store().dump(cf).unwrap()))
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
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
        let before = digest(self.engine());
        self.engine = None;
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

fn check_history_page(
    e: &Engine,
    model: &Model,
    user: &str,
    chat: &str,
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<usize>,
) -> Result<(), TestCaseError> {
    let got = code(e.history(user, chat, before, after, limit)).map(|h| {
        let mut events = h.events;
        for x in &mut events {
            normalize(&mut x.event.kind);
        }
        (events, h.last_seq)
    });
    let want = model.history(user, chat, before, after, limit);
    let call =
        format!("history({user}, {chat}, before {before:?}, after {after:?}, limit {limit:?})");
    match (got, want) {
        (Ok((got, got_last)), Ok((want, want_last))) => {
            prop_assert_eq!(got_last, want_last, "last_seq of {}", call);
            // Report the first difference, not two whole pages.
            let first = got.iter().zip(&want).position(|(g, w)| g != w);
            if let Some(k) = first {
                prop_assert_eq!(&got[k], &want[k], "event {} of {}", k, call);
            }
            let bounds = |page: &[HistoryEvent]| {
                let seq = |x: &HistoryEvent| x.event.seq;
                (page.len(), page.first().map(seq), page.last().map(seq))
            };
            prop_assert_eq!(
                bounds(&got),
                bounds(&want),
                "(events, first seq, last seq) of {}",
                call
            );
        }
        (got, want) => prop_assert_eq!(got.map(|_| ()), want.map(|_| ()), "{}", call),
    }
    Ok(())
}

fn check_receipts(e: &Engine, model: &Model, user: &str, chat: &str) -> Result<(), TestCaseError> {
    let got = code(e.receipts(user, chat)).map(|mut r| {
        r.sort_by(|a, b| a.user.cmp(&b.user));
        r
    });
    prop_assert_eq!(
        got,
        model.receipts(user, chat),
        "receipts({}, {})",
        user,
        chat
    );
    Ok(())
}

/// Every query against the model: `list_chats` of every user, each chat's whole history (as a
/// member; `forbidden` for a non-member), receipts, every device's cursor.
fn check_state(e: &Engine, model: &Model) -> Result<(), TestCaseError> {
    for user in USERS {
        let mut got = e.list_chats(user).unwrap();
        got.sort_by(|a, b| a.chat.cmp(&b.chat));
        for c in &mut got {
            c.members.sort();
        }
        prop_assert_eq!(got, model.list_chats(user), "list_chats({})", user);
    }
    for (id, c) in &model.chats {
        if let Some(member) = c.members.first() {
            // The whole history, page by page.
            for after in (0..c.last_seq()).step_by(HISTORY_LIMIT_MAX) {
                let limit = Some(HISTORY_LIMIT_ASKED);
                check_history_page(e, model, member, id, None, Some(after), limit)?;
            }
            check_receipts(e, model, member, id)?;
        }
        if let Some(outsider) = USERS.iter().find(|u| !c.members.contains(**u)) {
            check_history_page(e, model, outsider, id, None, None, None)?;
        }
        for user in USERS {
            for device in DEVICES {
                let got = e.cursor(user, device, id).unwrap();
                let want = model.cursor(user, device, id);
                prop_assert_eq!(
                    got,
                    Cursor {
                        start: want.start,
                        delivered: want.delivered,
                        read: want.read,
                    },
                    "cursor({}, {}, {})",
                    user,
                    device,
                    id
                );
            }
        }
    }
    let unknown = format!("g{}", model.groups + 1);
    check_history_page(e, model, USERS[0], &unknown, None, None, None)?;
    Ok(())
}

/// Seqs are exactly `1..=last_seq`, and no sender used a cmid twice in a chat.
fn check_gapless_and_deduplicated(e: &Engine, model: &Model) -> Result<(), TestCaseError> {
    for (id, c) in &model.chats {
        let Some(member) = c.members.first() else {
            continue;
        };
        let mut events = Vec::new();
        let last_seq = loop {
            let after = events.len() as u64;
            let page = e
                .history(member, id, None, Some(after), Some(HISTORY_LIMIT_ASKED))
                .unwrap();
            if page.events.is_empty() {
                break page.last_seq;
            }
            events.extend(page.events);
        };
        let seqs: Vec<u64> = events.iter().map(|x| x.event.seq).collect();
        prop_assert_eq!(seqs, (1..=last_seq).collect::<Vec<_>>(), "gaps in {}", id);
        let mut seen = BTreeSet::new();
        for x in &events {
            if let EventKind::Message { cmid, .. } = &x.event.kind {
                prop_assert!(
                    seen.insert((x.event.sender.clone(), cmid.clone())),
                    "{} has cmid {} of {} twice",
                    id,
                    cmid,
                    x.event.sender
                );
            }
        }
    }
    Ok(())
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
        prop_assert_eq!(code(call(self.h.engine(), c)), want, "{:?}", c);
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
        let want = self.model.resume_points(user, device, since);
        let e = self.h.engine();
        if points {
            let mut got = e.resume_points(user, device, since).unwrap();
            got.sort_by(|a, b| a.chat.cmp(&b.chat));
            prop_assert_eq!(
                got,
                want,
                "resume_points({}, {}, {:?})",
                user,
                device,
                since
            );
            return Ok(());
        }
        let mut got: BTreeMap<String, Vec<Event>> =
            want.iter().map(|p| (p.chat.clone(), Vec::new())).collect();
        for mut event in e.resume(user, device, since).unwrap() {
            normalize(&mut event.kind);
            got.entry(event.chat.clone()).or_default().push(event);
        }
        prop_assert_eq!(
            got,
            self.model.resume_events(&want),
            "resume({}, {}, {:?})",
            user,
            device,
            since
        );
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        check_state(self.h.engine(), &self.model)
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
                let before = before.map(|b| model.seq_ref(&chat, b));
                let after = after.map(|a| model.seq_ref(&chat, a));
                let limit = limit.map(usize::from);
                check_history_page(self.h.engine(), model, &user, &chat, before, after, limit)?;
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
                    copy_dir(&h.index_dir(), &snapshot);
                })?;
                self.h.has_snapshot = true;
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
                        copy_dir(&h.snapshot_dir(), &h.index_dir());
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
        check_gapless_and_deduplicated(self.h.engine(), &self.model)
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
