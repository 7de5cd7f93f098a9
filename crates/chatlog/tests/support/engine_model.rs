//! The in-memory model of the chat engine, and the comparison of the engine's answers with it.
//! One file for both places that check the engine against the chat rules, each of which
//! includes it as a module: the proptest model test (`crates/chatlog/tests/engine_model.rs`)
//! and the cargo-fuzz target (`fuzz/fuzz_targets/engine_model.rs`, with
//! `#[path = "../../crates/chatlog/tests/support/engine_model.rs"]`). It uses nothing but `std`
//! and `chatlog`, which both have. What generates the operations (proptest strategies,
//! `arbitrary` decoding) and what happens to the engine between them (reopens, index rebuilds,
//! crashes, I/O faults) stays in each of them.
//!
//! The model is written from `PROTOCOL.md`, not from the sequencer: every write's result (chat
//! ids, seqs, timestamps, error codes) and every query (history pages, `list_chats`, receipts,
//! cursors, resume) must agree with it. Where the protocol leaves a choice open (which error
//! wins when several apply, direct chats' fixed membership, ...) the model follows the engine
//! and says so in a comment.
//!
//! Generated operations name chats, users and targets by small numbers ([`Write`]), resolved
//! against the model when the operation runs ([`Model::resolve`]), so most operations hit
//! existing chats and members while some still miss (unknown chat, non-member, seq out of
//! range).
//!
//! The checks return a [`Mismatch`] rather than panic: the test's `?` turns it into a failed
//! case (proptest's `TestCaseError` converts from any `std::error::Error`), the fuzz target
//! panics with it.

// Each includer uses a part: the fuzz target registers no devices and resumes none.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use chatlog::engine::{
    Answer, ChatError, ChatSummary, Cursor, Engine, Event, EventKind, History, HistoryEvent,
    Receipt, ResumePoint, Sent, Ticket,
};

pub const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];
/// Not a valid user id (a space is outside `A-Za-z0-9_.@-`).
pub const INVALID_USER: &str = "u 5";
pub const DEVICES: [&str; 2] = ["d0", "d1"];
pub const CMIDS: [&str; 6] = ["c0", "c1", "c2", "c3", "c4", "c5"];
/// Members per chat, creator included: smaller than `USERS` so the limit is reachable.
pub const MEMBERS_MAX: usize = 4;
pub const BODY_BYTES_MAX: usize = 32;
pub const TITLE_BYTES_MAX: usize = 16;
/// PROTOCOL.md: user ids are 1–64 chars, cmids 1–64 chars.
pub const ID_BYTES_MAX: usize = 64;
/// PROTOCOL.md: history `limit` defaults to 50 and is capped at 500.
pub const HISTORY_LIMIT_DEFAULT: usize = 50;
pub const HISTORY_LIMIT_MAX: usize = 500;
/// What full-history checks ask for: more than the cap, so they check the cap too.
pub const HISTORY_LIMIT_ASKED: usize = 2 * HISTORY_LIMIT_MAX;
/// The engine's clock when a case starts (the fuzz target's clock never moves).
pub const CLOCK_START_MS: u64 = 1_000;

/// User references ([`user_of`]): `0..USER_REF_INVALID` are `USERS`, then an invalid id, the
/// acting user itself, and someone the operation makes interesting (see [`Model::other_ref`]).
pub const USER_REF_INVALID: u8 = 5;
pub const USER_REF_SELF: u8 = 6;
pub const USER_REF_OTHER: u8 = 7;
/// Cmid references ([`cmid_of`]): `0..CMID_REF_EMPTY` are `CMIDS`, then an empty cmid and one
/// over the length limit.
pub const CMID_REF_EMPTY: u8 = 6;
pub const CMID_REF_TOO_LONG: u8 = 7;

const _: () = assert!(MEMBERS_MAX < USERS.len());
const _: () = assert!(MEMBERS_MAX >= 2, "a direct chat has two members");
const _: () = assert!(USER_REF_INVALID as usize == USERS.len());
const _: () = assert!(CMID_REF_EMPTY as usize == CMIDS.len());

pub type Code = &'static str;
pub type Expected = Result<Answer, Code>;

// ---------------------------------------------------------------------------------------------
// Generated writes, and their resolution into calls.
// ---------------------------------------------------------------------------------------------

/// A body: `len` times one character; `wide` uses a 2-byte character so byte and char counts
/// differ.
#[derive(Debug, Clone, Copy)]
pub struct Text {
    pub len: u8,
    pub letter: u8,
    pub wide: bool,
}

/// A write as generated: chats, actors and targets are references that [`Model::resolve`]
/// turns into ids and seqs.
#[derive(Debug, Clone)]
pub enum Write {
    Create {
        creator: u8,
        /// User references.
        members: Vec<u8>,
        /// See [`title_of`].
        title: u8,
        direct: bool,
    },
    Add {
        chat: u8,
        actor: u8,
        /// User references.
        users: Vec<u8>,
    },
    Remove {
        chat: u8,
        actor: u8,
        /// User references.
        users: Vec<u8>,
    },
    Send {
        chat: u8,
        actor: u8,
        /// A cmid reference.
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

pub fn body_of(t: Text) -> String {
    let c = if t.wide {
        'é'
    } else {
        char::from(b'a' + t.letter % 26)
    };
    std::iter::repeat_n(c, usize::from(t.len)).collect()
}

/// No title (0–2), a title, an empty one, one at the limit, one over it.
pub fn title_of(v: u8) -> Option<String> {
    match v % 8 {
        0..3 => None,
        3..5 => Some("lunch".into()),
        5 => Some(String::new()),
        6 => Some("t".repeat(TITLE_BYTES_MAX)),
        _ => Some("t".repeat(TITLE_BYTES_MAX + 1)),
    }
}

pub fn cmid_of(v: u8) -> String {
    match v {
        0..CMID_REF_EMPTY => CMIDS[usize::from(v)].into(),
        CMID_REF_EMPTY => String::new(),
        _ => "x".repeat(ID_BYTES_MAX + 1),
    }
}

pub fn user_of(v: u8, me: &str, other: &str) -> String {
    match v {
        0..USER_REF_INVALID => USERS[usize::from(v)].into(),
        USER_REF_INVALID => INVALID_USER.into(),
        USER_REF_SELF => me.into(),
        _ => other.into(),
    }
}

/// A write with every reference resolved.
#[derive(Debug, Clone)]
pub enum Call {
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
pub enum Kind {
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
pub struct ModelEvent {
    pub seq: u64,
    pub ts: u64,
    pub sender: String,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub struct ModelChat {
    pub creator: String,
    pub direct: bool,
    pub title: Option<String>,
    pub members: BTreeSet<String>,
    /// Seq of the members event that (last) added each user.
    pub joined: HashMap<String, u64>,
    /// `events[k]` has seq `k + 1`.
    pub events: Vec<ModelEvent>,
}

impl ModelChat {
    pub fn last_seq(&self) -> u64 {
        self.events.len() as u64
    }
}

/// A device's position in a chat. `start` is where the device began when it was first seen;
/// `delivered` and `read` are what it acknowledged. None of them ever moves back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCursor {
    pub start: u64,
    pub delivered: u64,
    pub read: u64,
}

impl DeviceCursor {
    /// What `Engine::cursor` answers for this position.
    pub fn as_cursor(self) -> Cursor {
        Cursor {
            start: self.start,
            delivered: self.delivered,
            read: self.read,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    /// The engine's clock: the timestamp of every event appended now.
    pub now_ms: u64,
    /// Group chats created so far; the next is `g{groups + 1}`.
    pub groups: u64,
    pub chats: BTreeMap<String, ModelChat>,
    /// (chat, sender, cmid) → (seq, ts) of the message.
    pub dedup: HashMap<(String, String, String), (u64, u64)>,
    /// (user, device, chat) → cursor.
    pub cursors: BTreeMap<(String, String, String), DeviceCursor>,
    /// Devices seen (registered) so far.
    pub devices: BTreeSet<(String, String)>,
}

/// PROTOCOL.md: 1–64 chars of `A-Za-z0-9_.@-`.
fn valid_id(id: &str) -> bool {
    (1..=ID_BYTES_MAX).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c))
}

/// A history request, as both the engine and the model take it.
#[derive(Debug, Clone, Copy)]
pub struct HistoryQuery<'a> {
    pub user: &'a str,
    pub chat: &'a str,
    pub before: Option<u64>,
    pub after: Option<u64>,
    pub limit: Option<usize>,
}

impl HistoryQuery<'_> {
    pub fn ask(&self, e: &Engine) -> Result<History, ChatError> {
        e.history(self.user, self.chat, self.before, self.after, self.limit)
    }
}

impl fmt::Display for HistoryQuery<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let HistoryQuery {
            user,
            chat,
            before,
            after,
            limit,
        } = self;
        write!(
            f,
            "history({user}, {chat}, before {before:?}, after {after:?}, limit {limit:?})"
        )
    }
}

impl Model {
    pub fn new() -> Model {
        Model {
            now_ms: CLOCK_START_MS,
            groups: 0,
            chats: BTreeMap::new(),
            dedup: HashMap::new(),
            cursors: BTreeMap::new(),
            devices: BTreeSet::new(),
        }
    }

    /// The id the next group chat gets; no chat has it yet.
    pub fn next_group(&self) -> String {
        format!("g{}", self.groups + 1)
    }

    // --- resolving generated references ---

    /// An existing chat, or (one time in 8, or when there is none) the next group id, which
    /// does not exist yet.
    pub fn chat_ref(&self, v: u8) -> String {
        if v.is_multiple_of(8) || self.chats.is_empty() {
            return self.next_group();
        }
        let k = usize::from(v / 8) % self.chats.len();
        self.chats.keys().nth(k).expect("index below len").clone()
    }

    /// Mostly a current member of `chat`, sometimes any user.
    pub fn actor_ref(&self, chat: &str, v: u8) -> String {
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
    pub fn other_ref(&self, chat: &str, me: &str, former: bool) -> String {
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
    pub fn seq_ref(&self, chat: &str, v: u8) -> u64 {
        let last = self.chats.get(chat).map_or(2, ModelChat::last_seq);
        u64::from(v) % (last + 2)
    }

    /// Half the time a message of `chat`; else the chat's latest event (in a burst, often one
    /// the indexes have not applied yet) or any seq in `0..=last_seq + 1`.
    pub fn target_ref(&self, chat: &str, v: u8) -> u64 {
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
    pub fn device_ref(&self, v: u8) -> (String, String) {
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

    /// The actor, chat and users of a membership change, where the "other" user is a former
    /// member when adding and another current member when removing (see `other_ref`).
    fn membership_refs(
        &self,
        chat: u8,
        actor: u8,
        users: &[u8],
        former: bool,
    ) -> (String, String, Vec<String>) {
        let chat = self.chat_ref(chat);
        let user = self.actor_ref(&chat, actor);
        let other = self.other_ref(&chat, &user, former);
        let users = users.iter().map(|&u| user_of(u, &user, &other)).collect();
        (user, chat, users)
    }

    pub fn resolve(&self, w: &Write) -> Call {
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
                let (user, chat, users) = self.membership_refs(chat, actor, users, true);
                Call::Add { user, chat, users }
            }
            Write::Remove {
                chat,
                actor,
                ref users,
            } => {
                let (user, chat, users) = self.membership_refs(chat, actor, users, false);
                Call::Remove { user, chat, users }
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
    pub fn member_chat(&self, user: &str, chat: &str) -> Result<&ModelChat, Code> {
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

    /// Applies `call` if the rules accept it, and returns what the engine must answer; a
    /// refusal changes nothing.
    pub fn apply(&mut self, call: &Call) -> Expected {
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

    pub fn cursor(&self, user: &str, device: &str, chat: &str) -> DeviceCursor {
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

    /// What history shows for `e`, an event of `chat`.
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
    pub fn history(&self, q: &HistoryQuery<'_>) -> Result<(Vec<HistoryEvent>, u64), Code> {
        let c = self.member_chat(q.user, q.chat)?;
        let limit = q
            .limit
            .unwrap_or(HISTORY_LIMIT_DEFAULT)
            .min(HISTORY_LIMIT_MAX);
        let between: Vec<&ModelEvent> = c
            .events
            .iter()
            .filter(|e| q.before.is_none_or(|b| e.seq < b) && q.after.is_none_or(|a| e.seq > a))
            .collect();
        let n = limit.min(between.len());
        let page = if q.after.is_some() {
            &between[..n]
        } else {
            &between[between.len() - n..]
        };
        Ok((
            page.iter().map(|e| self.event(q.chat, e)).collect(),
            c.last_seq(),
        ))
    }

    pub fn list_chats(&self, user: &str) -> Vec<ChatSummary> {
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

    pub fn receipts(&self, user: &str, chat: &str) -> Result<Vec<Receipt>, Code> {
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
    pub fn resume_points(
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
    pub fn resume_events(&self, points: &[ResumePoint]) -> BTreeMap<String, Vec<Event>> {
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

impl Default for Model {
    fn default() -> Model {
        Model::new()
    }
}

// ---------------------------------------------------------------------------------------------
// The engine side: calls, and its answers against the model's.
// ---------------------------------------------------------------------------------------------

/// An engine answer that differs from the model's (or an engine error where the model has an
/// answer): what was asked, and both answers.
#[derive(Debug)]
pub struct Mismatch(pub String);

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Mismatch {}

/// Returns a [`Mismatch`] from the enclosing function unless `got == want`; the rest of the
/// arguments say what was asked, as in `format!`.
macro_rules! ensure_eq {
    ($got:expr, $want:expr, $($what:tt)+) => {
        match (&$got, &$want) {
            (got, want) => {
                if got != want {
                    return Err(Mismatch(format!(
                        "{}\n engine: {:?}\n  model: {:?}",
                        format_args!($($what)+),
                        got,
                        want
                    )));
                }
            }
        }
    };
}

/// Returns a [`Mismatch`] from the enclosing function unless `condition` holds.
macro_rules! ensure {
    ($condition:expr, $($what:tt)+) => {
        if !$condition {
            return Err(Mismatch(format!($($what)+)));
        }
    };
}

/// The engine's answer to a query the model answers (so it must not fail).
fn answered<T, E: fmt::Display>(got: Result<T, E>, what: impl fmt::Display) -> Result<T, Mismatch> {
    got.map_err(|e| Mismatch(format!("{what}: engine failed: {e}")))
}

pub fn code<T>(r: Result<T, ChatError>) -> Result<T, Code> {
    r.map_err(|e| e.code())
}

/// Submits `c` to the engine without waiting.
pub fn submit(e: &Engine, c: &Call) -> Ticket {
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
pub fn normalize(kind: &mut EventKind) {
    if let EventKind::Members { added, removed, .. } = kind {
        added.sort();
        removed.sort();
    }
}

/// The engine's answer `got` to the history query `q` against the model's.
pub fn compare_history_page(
    model: &Model,
    q: &HistoryQuery<'_>,
    got: Result<History, ChatError>,
) -> Result<(), Mismatch> {
    let got = code(got).map(|h| {
        let mut events = h.events;
        for x in &mut events {
            normalize(&mut x.event.kind);
        }
        (events, h.last_seq)
    });
    match (got, model.history(q)) {
        (Ok((got, got_last)), Ok((want, want_last))) => {
            ensure_eq!(got_last, want_last, "last_seq of {q}");
            // Report the first difference, not two whole pages.
            let first = got.iter().zip(&want).position(|(g, w)| g != w);
            if let Some(k) = first {
                ensure_eq!(got[k], want[k], "event {k} of {q}");
            }
            let bounds = |page: &[HistoryEvent]| {
                let seq = |x: &HistoryEvent| x.event.seq;
                (page.len(), page.first().map(seq), page.last().map(seq))
            };
            ensure_eq!(
                bounds(&got),
                bounds(&want),
                "(events, first seq, last seq) of {q}"
            );
        }
        (got, want) => ensure_eq!(got.map(|_| ()), want.map(|_| ()), "{q}"),
    }
    Ok(())
}

pub fn check_history_page(e: &Engine, model: &Model, q: &HistoryQuery<'_>) -> Result<(), Mismatch> {
    compare_history_page(model, q, q.ask(e))
}

pub fn check_receipts(e: &Engine, model: &Model, user: &str, chat: &str) -> Result<(), Mismatch> {
    let got = code(e.receipts(user, chat)).map(|mut r| {
        r.sort_by(|a, b| a.user.cmp(&b.user));
        r
    });
    ensure_eq!(got, model.receipts(user, chat), "receipts({user}, {chat})");
    Ok(())
}

/// Every query against the model: `list_chats` of every user; each chat's last seq, members,
/// whole history (as a member; `forbidden` for a non-member) and receipts; every device's
/// cursor; and the next group id is unknown.
pub fn check_state(e: &Engine, model: &Model) -> Result<(), Mismatch> {
    for user in USERS {
        let what = format!("list_chats({user})");
        let mut got = answered(e.list_chats(user), &what)?;
        got.sort_by(|a, b| a.chat.cmp(&b.chat));
        for c in &mut got {
            c.members.sort();
        }
        ensure_eq!(got, model.list_chats(user), "{what}");
    }
    for (id, c) in &model.chats {
        let last_seq = answered(e.store().last_seq(id), format!("last seq of {id}"))?;
        ensure_eq!(last_seq, c.last_seq(), "the indexes' last seq of {id}");
        let members = answered(e.members(id), format!("members({id})"))?;
        let want: Vec<String> = c.members.iter().cloned().collect();
        ensure_eq!(members, want, "members({id})");
        if let Some(member) = c.members.first() {
            // The whole history, page by page.
            for after in (0..c.last_seq()).step_by(HISTORY_LIMIT_MAX) {
                let q = HistoryQuery {
                    user: member,
                    chat: id,
                    before: None,
                    after: Some(after),
                    limit: Some(HISTORY_LIMIT_ASKED),
                };
                check_history_page(e, model, &q)?;
            }
            check_receipts(e, model, member, id)?;
        }
        if let Some(outsider) = USERS.iter().find(|u| !c.members.contains(**u)) {
            let q = HistoryQuery {
                user: outsider,
                chat: id,
                before: None,
                after: None,
                limit: None,
            };
            check_history_page(e, model, &q)?;
        }
        for user in USERS {
            for device in DEVICES {
                let what = format!("cursor({user}, {device}, {id})");
                let got = answered(e.cursor(user, device, id), &what)?;
                ensure_eq!(got, model.cursor(user, device, id).as_cursor(), "{what}");
            }
        }
    }
    let unknown = model.next_group();
    let q = HistoryQuery {
        user: USERS[0],
        chat: &unknown,
        before: None,
        after: None,
        limit: None,
    };
    check_history_page(e, model, &q)?;
    let members = code(e.members(&unknown));
    ensure_eq!(
        members,
        Err("not_found"),
        "members({unknown}), not created yet"
    );
    Ok(())
}

/// Seqs are exactly `1..=last_seq`, and no sender used a cmid twice in a chat: read from the
/// engine alone, so this holds even where the model might be wrong.
pub fn check_gapless_and_deduplicated(e: &Engine, model: &Model) -> Result<(), Mismatch> {
    for (id, c) in &model.chats {
        let Some(member) = c.members.first() else {
            continue;
        };
        let mut events = Vec::new();
        let last_seq = loop {
            let after = events.len() as u64;
            let q = HistoryQuery {
                user: member,
                chat: id,
                before: None,
                after: Some(after),
                limit: Some(HISTORY_LIMIT_ASKED),
            };
            let page = answered(q.ask(e), q)?;
            if page.events.is_empty() {
                break page.last_seq;
            }
            events.extend(page.events);
        };
        let seqs: Vec<u64> = events.iter().map(|x| x.event.seq).collect();
        ensure_eq!(
            seqs,
            (1..=last_seq).collect::<Vec<_>>(),
            "seqs of {id}: gaps"
        );
        let mut seen = BTreeSet::new();
        for x in &events {
            if let EventKind::Message { cmid, .. } = &x.event.kind {
                ensure!(
                    seen.insert((x.event.sender.clone(), cmid.clone())),
                    "{id} has cmid {cmid} of {} twice",
                    x.event.sender
                );
            }
        }
    }
    Ok(())
}

/// `resume_points` (with `points`) or `resume` for a device connecting: the device's starting
/// points, or the events it is sent, per chat. The model registers the device if it is new,
/// as the engine does.
pub fn check_resume(
    e: &Engine,
    model: &mut Model,
    user: &str,
    device: &str,
    since: &HashMap<String, u64>,
    points: bool,
) -> Result<(), Mismatch> {
    let want = model.resume_points(user, device, since);
    if points {
        let what = format!("resume_points({user}, {device}, {since:?})");
        let mut got = answered(e.resume_points(user, device, since), &what)?;
        got.sort_by(|a, b| a.chat.cmp(&b.chat));
        ensure_eq!(got, want, "{what}");
        return Ok(());
    }
    let what = format!("resume({user}, {device}, {since:?})");
    let mut got: BTreeMap<String, Vec<Event>> =
        want.iter().map(|p| (p.chat.clone(), Vec::new())).collect();
    for mut event in answered(e.resume(user, device, since), &what)? {
        normalize(&mut event.kind);
        got.entry(event.chat.clone()).or_default().push(event);
    }
    ensure_eq!(got, model.resume_events(&want), "{what}");
    Ok(())
}
