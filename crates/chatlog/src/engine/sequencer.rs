//! The sequencer: the one place that decides. It takes operations in arrival order, checks
//! them against the chat state (its own authoritative in-memory copy, read through from the
//! indexes on first use), assigns seqs and timestamps, and turns each accepted operation into
//! log records. Replies are sent only after the applier has made the batch durable and indexed.
//!
//! Records decided but not yet applied are remembered in small overlays (dedup keys, message
//! targets, cursors, receipts, devices, files), tagged with their batch, so later decisions see
//! them; an overlay entry is dropped once the applier reports its batch applied.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use hashbrown::hash_map::EntryRef;

use super::EngineConfig;
use super::error::{ChatError, Refusal};
use super::store::{
    self, CF_CURSORS, CF_DEDUP, CF_DEVICES, CF_FILES, CF_RECEIPTS, CF_USER_CHATS, ChatMeta,
    HistoryEntry, Store,
};
use super::types::{
    Creation, Cursor, CursorMove, Event, EventKind, FileMeta, Record, check_cmid, check_device,
    check_user, direct_chat_id,
};
use crate::log::Log;
use serde::{Deserialize, Serialize};

/// The hasher of the sequencer's maps: foldhash, seeded randomly per process (the default of
/// `hashbrown`). std's SipHash was a tenth of the sequencer's time in the append benchmark.
type FastHash = foldhash::fast::RandomState;

/// The overlay size below which it is never pruned.
const OVERLAY_PRUNE_MIN: usize = 4096;
/// Fewest sends in a batch for which [`Sequencer::prefetch_dedup`] looks them up together.
const DEDUP_PREFETCH_MIN: usize = 4;

/// A send's `dedup` index key and the index's entry for it, looked up before the batch.
type Prefetched = (Vec<u8>, Option<(u64, u64)>);

/// A reply channel for an operation.
pub(crate) type Reply = oneshot::Sender<Result<Outcome, ChatError>>;

/// What an accepted operation answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A chat id (create).
    Chat(String),
    /// A seq (membership, edit, delete).
    Seq(u64),
    /// A sent message.
    Sent {
        /// Its seq.
        seq: u64,
        /// Its timestamp (ms).
        ts: u64,
    },
    /// Done (cursors, devices, files, retention).
    Done,
    /// The answers of a replicated group, one per operation, in order.
    Group(Vec<Result<Outcome, Refusal>>),
}

/// A write operation, as the sequencer decides it. Replication ships these between nodes
/// (with the timestamp the proposing node gave them) and applies them with
/// [`super::Engine::apply_replicated`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Op {
    Create {
        creator: String,
        members: Vec<String>,
        title: Option<String>,
        direct: bool,
    },
    AddMembers {
        user: String,
        chat: String,
        users: Vec<String>,
    },
    RemoveMembers {
        user: String,
        chat: String,
        users: Vec<String>,
    },
    Send {
        user: String,
        chat: String,
        cmid: String,
        body: Option<String>,
        file: Option<String>,
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
    Cursor {
        user: String,
        device: String,
        chat: String,
        seq: u64,
        read: bool,
    },
    Device {
        user: String,
        device: String,
    },
    File(FileMeta),
    /// Advance every chat's retention horizon as the configured limits say.
    Retention,
    /// Replicated operations with their timestamps, decided together in one batch and
    /// followed by an [`Record::Applied`] record carrying `marker`. Never sent between
    /// nodes itself.
    #[serde(skip)]
    Group {
        ops: Vec<(Op, u64)>,
        marker: Vec<u8>,
    },
}

#[derive(Debug, Clone)]
struct ChatState {
    last_seq: u64,
    meta: ChatMeta,
    /// What edits and deletes need to know about this chat's newest events, up to
    /// `last_seq`, while they may not be applied yet (older ones are in the indexes). Entries
    /// of applied batches are dropped from the front when the chat is next touched or swept.
    recent: VecDeque<Recent>,
}

/// A decided event, as [`ChatState::recent`] keeps it.
#[derive(Debug, Clone)]
struct Recent {
    /// The batch that decided it.
    batch: u64,
    sender: String,
    is_message: bool,
    deleted: bool,
}

impl ChatState {
    fn new(last_seq: u64, meta: ChatMeta) -> ChatState {
        ChatState {
            last_seq,
            meta,
            recent: VecDeque::new(),
        }
    }

    /// The kept event at `seq`, if it is still kept.
    fn recent_mut(&mut self, seq: u64) -> Option<&mut Recent> {
        let first = self.last_seq + 1 - self.recent.len() as u64;
        let at = seq.checked_sub(first)?;
        self.recent.get_mut(usize::try_from(at).ok()?)
    }

    /// Drops the kept events of batches up to `applied`; returns how many.
    fn forget_applied(&mut self, applied: u64) -> usize {
        let before = self.recent.len();
        while self.recent.front().is_some_and(|r| r.batch <= applied) {
            self.recent.pop_front();
        }
        before - self.recent.len()
    }

    fn is_member(&self, user: &str) -> bool {
        self.meta
            .members
            .binary_search_by(|m| m.as_str().cmp(user))
            .is_ok()
    }
}

/// What the sequencer needs to know about a message to rule on edits and deletes.
#[derive(Debug, Clone)]
struct MessageInfo {
    sender: String,
    is_message: bool,
    deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum OverlayKey {
    /// A deleted message (the newest events of a chat are in [`ChatState::recent`]).
    Message(String, u64),
    Cursor(String, String, String),
    Receipt(String, String),
    Device(String, String),
    File(String),
    Horizon(String),
}

#[derive(Debug, Clone)]
enum OverlayValue {
    Message(MessageInfo),
    Cursor(Cursor),
    Receipt(u64, u64),
    Device,
    /// Boxed: every overlay slot is as large as the largest variant, and this one is four
    /// strings (uploads are rare, sends are not).
    File(Box<FileMeta>),
    Horizon(u64),
}

/// The sequencer's state.
pub(crate) struct Sequencer {
    store: Arc<Store>,
    log: Arc<Log>,
    config: EngineConfig,
    chats: hashbrown::HashMap<String, ChatState, FastHash>,
    chat_counter: u64,
    /// Decided but maybe not yet applied: value and the batch that wrote it.
    overlay: HashMap<OverlayKey, (OverlayValue, u64), FastHash>,
    /// Sends decided but maybe not yet applied, by `dedup` index key (`chat \0 sender \0
    /// cmid`): seq, ts and the batch that decided them. Kept apart from `overlay` so the key
    /// built for the batch's index lookup is moved in, not built again or copied.
    sent: HashMap<Vec<u8>, (u64, u64, u64), FastHash>,
    /// `sent`'s size at which [`Sequencer::prune`] runs next.
    sent_prune_at: usize,
    /// Entries in every chat's [`ChatState::recent`].
    recent: usize,
    /// `recent` at which every chat's applied entries are dropped.
    recent_sweep_at: usize,
    /// Batches up to this one are applied.
    applied: u64,
    /// Overlay size at which [`Sequencer::prune`] runs next.
    prune_at: usize,
    batch: u64,
    /// The `dedup` index key and entry of each of this batch's sends, in order, looked up
    /// together by [`Sequencer::prefetch_dedup`] (empty: not prefetched). Each send takes the
    /// next one, whether it is accepted or not.
    prefetched: std::vec::IntoIter<Prefetched>,
}

impl std::fmt::Debug for Sequencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer")
            .field("chats_cached", &self.chats.len())
            .field("overlay", &self.overlay.len())
            .field("batch", &self.batch)
            .finish()
    }
}

fn limit_members(config: &EngineConfig, count: usize) -> Result<(), ChatError> {
    if count > config.members_max {
        return Err(ChatError::TooManyMembers {
            limit: config.members_max,
            actual: count,
        });
    }
    Ok(())
}

fn limit_body(config: &EngineConfig, body: &str) -> Result<(), ChatError> {
    if body.len() > config.body_bytes_max {
        return Err(ChatError::TooLarge {
            what: "body",
            limit: config.body_bytes_max,
            actual: body.len(),
        });
    }
    Ok(())
}

impl Sequencer {
    pub(crate) fn new(
        store: Arc<Store>,
        log: Arc<Log>,
        config: EngineConfig,
    ) -> crate::Result<Self> {
        let chat_counter = store.chat_counter()?;
        Ok(Sequencer {
            store,
            log,
            config,
            chats: hashbrown::HashMap::default(),
            chat_counter,
            overlay: HashMap::default(),
            sent: HashMap::default(),
            sent_prune_at: OVERLAY_PRUNE_MIN,
            recent: 0,
            recent_sweep_at: OVERLAY_PRUNE_MIN,
            applied: 0,
            prune_at: OVERLAY_PRUNE_MIN,
            batch: 0,
            prefetched: Vec::new().into_iter(),
        })
    }

    /// Starts deciding batch `batch`; batches up to `applied` are applied.
    pub(crate) fn begin(&mut self, batch: u64, applied: u64) {
        self.applied = applied;
        if self.overlay.len() >= self.prune_at || self.sent.len() >= self.sent_prune_at {
            self.prune();
        }
        if self.recent >= self.recent_sweep_at {
            self.sweep_recent();
        }
        self.batch = batch;
    }

    /// Looks up the `dedup` index entries of every send in `ops` at once (one RocksDB
    /// `MultiGet`, which rules out each index file for the whole batch in one pass, instead of
    /// a `Get` per send). Call after [`Sequencer::begin`]: a key missing from the overlay then
    /// is either new or applied, so the index answers for it until the batch is decided.
    pub(crate) fn prefetch_dedup<'a>(&mut self, ops: impl Iterator<Item = &'a Op>) {
        self.prefetched = Vec::new().into_iter();
        let mut keys = Vec::new();
        let mut add = |op: &Op| {
            if let Op::Send {
                user, chat, cmid, ..
            } = op
            {
                keys.push(store::key(&[chat, user, cmid]));
            }
        };
        for op in ops {
            match op {
                Op::Group { ops, .. } => ops.iter().for_each(|(op, _)| add(op)),
                op => add(op),
            }
        }
        if keys.len() < DEDUP_PREFETCH_MIN {
            return;
        }
        // A failed lookup is not remembered: `send` asks the index again and reports it.
        if let Ok(found) = self.store.get_many::<(u64, u64)>(CF_DEDUP, &keys) {
            self.prefetched = keys.into_iter().zip(found).collect::<Vec<_>>().into_iter();
        }
    }

    /// Forgets the overlay entries of applied batches (the indexes hold them now). One pass
    /// over the overlay, run when it doubled since the last: amortized O(1) per entry, where
    /// a pass per batch cost O(in flight) per batch, and tiny batches made that dear.
    /// Entries of applied batches that linger until then are still right: every write goes
    /// through the sequencer, so the overlay's value is the latest decided one.
    fn prune(&mut self) {
        let applied = self.applied;
        self.overlay.retain(|_, (_, b)| *b > applied);
        self.prune_at = (2 * self.overlay.len()).max(OVERLAY_PRUNE_MIN);
        self.sent.retain(|_, (_, _, b)| *b > applied);
        self.sent_prune_at = (2 * self.sent.len()).max(OVERLAY_PRUNE_MIN);
    }

    /// Drops every chat's kept events of applied batches. Run when the kept events doubled
    /// and outnumber the chats, so its pass over the chats is amortized O(1) per event.
    fn sweep_recent(&mut self) {
        let applied = self.applied;
        for state in self.chats.values_mut() {
            self.recent -= state.forget_applied(applied);
        }
        self.recent_sweep_at = (2 * self.recent)
            .max(self.chats.len())
            .max(OVERLAY_PRUNE_MIN);
    }

    fn remember(&mut self, key: OverlayKey, value: OverlayValue) {
        self.overlay.insert(key, (value, self.batch));
    }

    fn recall(&self, key: &OverlayKey) -> Option<&OverlayValue> {
        self.overlay.get(key).map(|(v, _)| v)
    }

    fn chat(&mut self, chat: &str) -> Result<&mut ChatState, ChatError> {
        // One hash and probe for a loaded chat (every send asks).
        match self.chats.entry_ref(chat) {
            EntryRef::Occupied(loaded) => Ok(loaded.into_mut()),
            EntryRef::Vacant(slot) => {
                let meta = self
                    .store
                    .chat(chat)?
                    .ok_or_else(|| ChatError::NotFound(format!("chat {chat}")))?;
                let last_seq = self.store.last_seq(chat)?;
                Ok(slot.insert(ChatState::new(last_seq, meta)))
            }
        }
    }

    fn member_chat(&mut self, user: &str, chat: &str) -> Result<&mut ChatState, ChatError> {
        let state = self.chat(chat)?;
        if !state.is_member(user) {
            return Err(ChatError::Forbidden(format!(
                "{user} is not a member of {chat}"
            )));
        }
        Ok(state)
    }

    /// The next event of `chat` (loaded), remembered for edits and deletes until applied.
    /// Takes the strings it keeps: a send moves its operation's in (no copy to make, and none
    /// of the caller's to free here).
    fn event(&mut self, chat: String, sender: String, ts: u64, kind: EventKind) -> Event {
        let state = self
            .chats
            .get_mut(&chat)
            .expect("chat loaded before an event");
        state.last_seq += 1;
        let seq = state.last_seq;
        // Until applied, later decisions about this event (edit/delete targets) come from here.
        self.recent -= state.forget_applied(self.applied);
        state.recent.push_back(Recent {
            batch: self.batch,
            sender: sender.clone(),
            is_message: matches!(kind, EventKind::Message { .. }),
            deleted: false,
        });
        self.recent += 1;
        Event {
            chat,
            seq,
            ts,
            sender,
            kind,
        }
    }

    /// Decides one operation at time `now_ms`, appending its records to `out`.
    pub(crate) fn decide(
        &mut self,
        op: Op,
        now_ms: u64,
        out: &mut Vec<Record>,
    ) -> Result<Outcome, ChatError> {
        match op {
            Op::Create {
                creator,
                members,
                title,
                direct,
            } => self.create(creator, members, title, direct, now_ms, out),
            Op::AddMembers { user, chat, users } => {
                self.add_members(&user, &chat, users, now_ms, out)
            }
            Op::RemoveMembers { user, chat, users } => {
                self.remove_members(&user, &chat, users, now_ms, out)
            }
            Op::Send {
                user,
                chat,
                cmid,
                body,
                file,
            } => {
                let prefetched = self.prefetched.next();
                self.send(user, chat, cmid, body, file, prefetched, now_ms, out)
            }
            Op::Edit {
                user,
                chat,
                target,
                body,
            } => self.edit(&user, &chat, target, body, now_ms, out),
            Op::Delete { user, chat, target } => self.delete(&user, &chat, target, now_ms, out),
            Op::Cursor {
                user,
                device,
                chat,
                seq,
                read,
            } => self.cursor(&user, &device, &chat, seq, read, out),
            Op::Device { user, device } => self.device(&user, &device, out),
            Op::Retention => self.retention(now_ms, out),
            Op::Group { ops, marker } => {
                let start = out.len();
                let mut answers = Vec::with_capacity(ops.len());
                for (op, ts) in ops {
                    match self.decide(op, ts, out) {
                        Ok(outcome) => answers.push(Ok(outcome)),
                        // A storage failure is not a decision: every replica must decide the
                        // same, so the whole group fails and the engine stops.
                        Err(e @ (ChatError::Unavailable(_) | ChatError::Busy)) => {
                            out.truncate(start);
                            return Err(e);
                        }
                        Err(e) => answers.push(Err(Refusal::from(&e))),
                    }
                }
                out.push(Record::Applied { marker });
                Ok(Outcome::Group(answers))
            }
            Op::File(meta) => {
                check_user(&meta.uploader)?;
                self.remember(
                    OverlayKey::File(meta.id.clone()),
                    OverlayValue::File(Box::new(meta.clone())),
                );
                out.push(Record::File(meta));
                Ok(Outcome::Done)
            }
        }
    }

    fn create(
        &mut self,
        creator: String,
        members: Vec<String>,
        title: Option<String>,
        direct: bool,
        now_ms: u64,
        out: &mut Vec<Record>,
    ) -> Result<Outcome, ChatError> {
        check_user(&creator)?;
        for m in &members {
            check_user(m)?;
        }
        if let Some(t) = title
            .as_ref()
            .filter(|t| t.len() > self.config.title_bytes_max)
        {
            return Err(ChatError::TooLarge {
                what: "title",
                limit: self.config.title_bytes_max,
                actual: t.len(),
            });
        }
        let mut all: BTreeSet<String> = members.into_iter().collect();
        all.insert(creator.clone());
        let chat = if direct {
            let others: Vec<&String> = all.iter().filter(|m| **m != creator).collect();
            if others.len() != 1 {
                return Err(ChatError::BadRequest(
                    "a direct chat needs exactly one other member".into(),
                ));
            }
            let id = direct_chat_id(&creator, others[0]);
            match self.chat(&id) {
                Ok(_) => return Ok(Outcome::Chat(id)),
                Err(ChatError::NotFound(_)) => id,
                Err(e) => return Err(e),
            }
        } else {
            limit_members(&self.config, all.len())?;
            self.chat_counter += 1;
            format!("g{}", self.chat_counter)
        };
        let added: Vec<String> = all.into_iter().collect();
        self.chats.insert(
            chat.clone(),
            ChatState::new(
                0,
                ChatMeta {
                    title: title.clone(),
                    creator: creator.clone(),
                    direct,
                    members: added.clone(),
                },
            ),
        );
        let event = self.event(
            chat.clone(),
            creator.clone(),
            now_ms,
            EventKind::Members {
                added,
                removed: Vec::new(),
                title,
            },
        );
        out.push(Record::Event {
            event,
            created: Some(Creation { creator, direct }),
        });
        Ok(Outcome::Chat(chat))
    }

    fn add_members(
        &mut self,
        user: &str,
        chat: &str,
        users: Vec<String>,
        now_ms: u64,
        out: &mut Vec<Record>,
    ) -> Result<Outcome, ChatError> {
        for u in &users {
            check_user(u)?;
        }
        let members_max = self.config.members_max;
        let state = self.member_chat(user, chat)?;
        if state.meta.direct {
            return Err(ChatError::Forbidden(
                "members of a direct chat cannot change".into(),
            ));
        }
        let new: BTreeSet<String> = users.into_iter().filter(|u| !state.is_member(u)).collect();
        if new.is_empty() {
            return Ok(Outcome::Seq(state.last_seq));
        }
        let total = state.meta.members.len() + new.len();
        if total > members_max {
            return Err(ChatError::TooManyMembers {
                limit: members_max,
                actual: total,
            });
        }
        for u in &new {
            let pos = state.meta.members.binary_search(u).unwrap_err();
            state.meta.members.insert(pos, u.clone());
        }
        let event = self.event(
            chat.to_owned(),
            user.to_owned(),
            now_ms,
            EventKind::Members {
                added: new.into_iter().collect(),
                removed: Vec::new(),
                title: None,
            },
        );
        Ok(Outcome::Seq(push_event(event, out)))
    }

    fn remove_members(
        &mut self,
        user: &str,
        chat: &str,
        users: Vec<String>,
        now_ms: u64,
        out: &mut Vec<Record>,
    ) -> Result<Outcome, ChatError> {
        for u in &users {
            check_user(u)?;
        }
        let state = self.member_chat(user, chat)?;
        let gone: BTreeSet<String> = users.into_iter().filter(|u| state.is_member(u)).collect();
        let is_creator = state.meta.creator == user;
        if !is_creator && gone.iter().any(|u| u != user) {
            return Err(ChatError::Forbidden(
                "only the creator may remove other members".into(),
            ));
        }
        if gone.is_empty() {
            return Ok(Outcome::Seq(state.last_seq));
        }
        if state.meta.direct {
            return Err(ChatError::Forbidden(
                "members of a direct chat cannot change".into(),
            ));
        }
        state.meta.members.retain(|m| !gone.contains(m));
        let event = self.event(
            chat.to_owned(),
            user.to_owned(),
            now_ms,
            EventKind::Members {
                added: Vec::new(),
                removed: gone.into_iter().collect(),
                title: None,
            },
        );
        Ok(Outcome::Seq(push_event(event, out)))
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        user: String,
        chat: String,
        cmid: String,
        body: Option<String>,
        file: Option<String>,
        prefetched: Option<Prefetched>,
        now_ms: u64,
        out: &mut Vec<Record>,
    ) -> Result<Outcome, ChatError> {
        check_cmid(&cmid)?;
        if body.is_none() && file.is_none() {
            return Err(ChatError::BadRequest("send needs a body or a file".into()));
        }
        if let Some(b) = &body {
            limit_body(&self.config, b)?;
        }
        self.member_chat(&user, &chat)?;
        let parts = [chat.as_str(), user.as_str(), cmid.as_str()];
        let (key, prefetched) = match prefetched {
            // Prefetched in the batch's order; checked anyway (a comparison, no allocation).
            Some((key, found)) if store::key_is(&key, &parts) => (key, Some(found)),
            other => {
                debug_assert!(other.is_none(), "a send took another send's prefetched key");
                (store::key(&parts), None)
            }
        };
        if let Some(&(seq, ts, _)) = self.sent.get(&key) {
            return Ok(Outcome::Sent { seq, ts });
        }
        let indexed = match prefetched {
            Some(found) => found,
            None => self.store.get::<(u64, u64)>(CF_DEDUP, &key)?,
        };
        if let Some((seq, ts)) = indexed {
            return Ok(Outcome::Sent { seq, ts });
        }
        if let Some(id) = &file {
            let meta = match self.recall(&OverlayKey::File(id.clone())) {
                Some(OverlayValue::File(m)) => Some((**m).clone()),
                _ => self.store.get::<FileMeta>(CF_FILES, id.as_bytes())?,
            };
            if meta.is_none_or(|m| m.uploader != user) {
                return Err(ChatError::BadRequest(format!(
                    "file {id} was not uploaded by {user}"
                )));
            }
        }
        let event = self.event(chat, user, now_ms, EventKind::Message { cmid, body, file });
        let (seq, ts) = (event.seq, event.ts);
        self.sent.insert(key, (seq, ts, self.batch));
        out.push(Record::Event {
            event,
            created: None,
        });
        Ok(Outcome::Sent { seq, ts })
    }

    /// What is known about the event at `target`: from the overlay, else from the indexes and
    /// the log.
    fn message_info(&mut self, chat: &str, target: u64) -> Result<MessageInfo, ChatError> {
        if let Some(OverlayValue::Message(info)) =
            self.recall(&OverlayKey::Message(chat.to_owned(), target))
        {
            return Ok(info.clone());
        }
        if let Some(recent) = self
            .chats
            .get_mut(chat)
            .and_then(|state| state.recent_mut(target))
        {
            return Ok(MessageInfo {
                sender: recent.sender.clone(),
                is_message: recent.is_message,
                deleted: recent.deleted,
            });
        }
        let entry: HistoryEntry = self
            .store
            .get(store::CF_HISTORY, &store::history_key(chat, target))?
            .ok_or_else(|| ChatError::NotFound(format!("{chat} has no event {target}")))?;
        let record = super::read_record(&self.log, entry.log_index)?;
        let Record::Event { event, .. } = record else {
            return Err(ChatError::Unavailable(crate::Error::Corruption {
                segment: "history index".into(),
                offset: entry.log_index,
                reason: "history entry points at a non-event record".into(),
            }));
        };
        Ok(MessageInfo {
            sender: event.sender,
            is_message: matches!(event.kind, EventKind::Message { .. }),
            deleted: entry.deleted,
        })
    }

    fn target(
        &mut self,
        user: &str,
        chat: &str,
        target: u64,
    ) -> Result<(MessageInfo, String), ChatError> {
        let state = self.member_chat(user, chat)?;
        if target == 0 || target > state.last_seq {
            return Err(ChatError::NotFound(format!("{chat} has no event {target}")));
        }
        let creator = state.meta.creator.clone();
        let info = self.message_info(chat, target)?;
        if !info.is_message {
            return Err(ChatError::BadRequest(format!(
                "event {target} is not a message"
            )));
        }
        if info.deleted {
            return Err(ChatError::BadRequest(format!(
                "message {target} is deleted"
            )));
        }
        Ok((info, creator))
    }

    fn edit(
        &mut self,
        user: &str,
        chat: &str,
        target: u64,
        body: String,
        now_ms: u64,
        out: &mut Vec<Record>,
    ) -> Result<Outcome, ChatError> {
        limit_body(&self.config, &body)?;
        let (info, _) = self.target(user, chat, target)?;
        if info.sender != user {
            return Err(ChatError::Forbidden(
                "only the sender may edit a message".into(),
            ));
        }
        let event = self.event(
            chat.to_owned(),
            user.to_owned(),
            now_ms,
            EventKind::Edit { target, body },
        );
        Ok(Outcome::Seq(push_event(event, out)))
    }

    fn delete(
        &mut self,
        user: &str,
        chat: &str,
        target: u64,
        now_ms: u64,
        out: &mut Vec<Record>,
    ) -> Result<Outcome, ChatError> {
        let (mut info, creator) = self.target(user, chat, target)?;
        if info.sender != user && creator != user {
            return Err(ChatError::Forbidden(
                "only the sender or the chat's creator may delete a message".into(),
            ));
        }
        let event = self.event(
            chat.to_owned(),
            user.to_owned(),
            now_ms,
            EventKind::Delete { target },
        );
        let seq = event.seq;
        info.deleted = true;
        // Both: the kept event may be dropped (its batch applied) before the delete is.
        if let Some(recent) = self
            .chats
            .get_mut(chat)
            .and_then(|state| state.recent_mut(target))
        {
            recent.deleted = true;
        }
        self.remember(
            OverlayKey::Message(chat.to_owned(), target),
            OverlayValue::Message(info),
        );
        out.push(Record::Event {
            event,
            created: None,
        });
        Ok(Outcome::Seq(seq))
    }

    fn cursor(
        &mut self,
        user: &str,
        device: &str,
        chat: &str,
        seq: u64,
        read: bool,
        out: &mut Vec<Record>,
    ) -> Result<Outcome, ChatError> {
        check_device(device)?;
        let state = self.member_chat(user, chat)?;
        if seq > state.last_seq {
            return Err(ChatError::BadRequest(format!(
                "cursor {seq} is beyond the last seq {} of {chat}",
                state.last_seq
            )));
        }
        let ckey = OverlayKey::Cursor(user.to_owned(), device.to_owned(), chat.to_owned());
        let current = match self.recall(&ckey) {
            Some(OverlayValue::Cursor(c)) => *c,
            _ => self
                .store
                .get::<Cursor>(CF_CURSORS, &store::key(&[user, device, chat]))?
                .unwrap_or_default(),
        };
        let mut next = current;
        next.delivered = next.delivered.max(seq);
        if read {
            next.read = next.read.max(seq);
        }
        if next == current {
            return Ok(Outcome::Done);
        }
        let rkey = OverlayKey::Receipt(chat.to_owned(), user.to_owned());
        let (d, r) = match self.recall(&rkey) {
            Some(OverlayValue::Receipt(d, r)) => (*d, *r),
            _ => self
                .store
                .get::<(u64, u64)>(CF_RECEIPTS, &store::key(&[chat, user]))?
                .unwrap_or((0, 0)),
        };
        let (d, r) = (d.max(next.delivered), r.max(next.read));
        self.remember(ckey, OverlayValue::Cursor(next));
        self.remember(rkey, OverlayValue::Receipt(d, r));
        out.push(Record::Cursor(CursorMove {
            chat: chat.to_owned(),
            user: user.to_owned(),
            device: device.to_owned(),
            cursor: next,
            user_delivered: d,
            user_read: r,
        }));
        Ok(Outcome::Done)
    }

    /// The ts of the applied event at `seq`.
    fn event_ts(&self, chat: &str, seq: u64) -> Result<u64, ChatError> {
        let entry: HistoryEntry = self
            .store
            .get(store::CF_HISTORY, &store::history_key(chat, seq))?
            .ok_or_else(|| ChatError::NotFound(format!("{chat} has no event {seq}")))?;
        match super::read_record(&self.log, entry.log_index)? {
            Record::Event { event, .. } => Ok(event.ts),
            _ => Err(ChatError::NotFound(format!("{chat} has no event {seq}"))),
        }
    }

    /// Decides new retention horizons: at most `max_events_per_chat` events kept per chat, none
    /// older than `max_age_ms`. Only applied events are considered; the horizon never moves back.
    fn retention(&mut self, now_ms: u64, out: &mut Vec<Record>) -> Result<Outcome, ChatError> {
        let limits = self.config.retention;
        if limits.max_age_ms.is_none() && limits.max_events_per_chat.is_none() {
            return Ok(Outcome::Seq(0));
        }
        // Retention drops events: no message entry of an applied batch may outlive its event
        // (an edit would then be decided against an event the indexes no longer have).
        self.prune();
        self.sweep_recent();
        let mut changed = 0;
        for (chat, last) in self.store.all_last_seqs()? {
            let hkey = OverlayKey::Horizon(chat.clone());
            let old = match self.recall(&hkey) {
                Some(OverlayValue::Horizon(h)) => *h,
                _ => self.store.horizon(&chat)?,
            };
            let mut horizon = old;
            if let Some(keep) = limits.max_events_per_chat {
                horizon = horizon.max((last + 1).saturating_sub(keep));
            }
            if let Some(age) = limits.max_age_ms {
                let cutoff = now_ms.saturating_sub(age);
                // The first seq in [horizon, last] with ts >= cutoff (ts grow with seq).
                let (mut lo, mut hi) = (horizon, last + 1);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    if self.event_ts(&chat, mid)? >= cutoff {
                        hi = mid;
                    } else {
                        lo = mid + 1;
                    }
                }
                horizon = horizon.max(lo);
            }
            if horizon > old {
                self.remember(hkey, OverlayValue::Horizon(horizon));
                out.push(Record::Horizon { chat, seq: horizon });
                changed += 1;
            }
        }
        Ok(Outcome::Seq(changed))
    }

    fn device(
        &mut self,
        user: &str,
        device: &str,
        out: &mut Vec<Record>,
    ) -> Result<Outcome, ChatError> {
        check_user(user)?;
        check_device(device)?;
        let dkey = OverlayKey::Device(user.to_owned(), device.to_owned());
        if self.recall(&dkey).is_some()
            || self
                .store
                .contains(CF_DEVICES, &store::key(&[user, device]))?
        {
            return Ok(Outcome::Done);
        }
        // The user's chats: applied membership, corrected and completed by the chats this
        // sequencer holds (which include decisions not yet applied).
        let mut chats: BTreeSet<String> = self
            .store
            .scan_prefix::<u64>(CF_USER_CHATS, user)?
            .into_iter()
            .map(|(chat, _)| chat)
            .filter(|chat| self.chats.get(chat).is_none_or(|s| s.is_member(user)))
            .collect();
        chats.extend(
            self.chats
                .iter()
                .filter(|(_, s)| s.is_member(user))
                .map(|(chat, _)| chat.clone()),
        );
        let mut starts = Vec::with_capacity(chats.len());
        for chat in chats {
            let last = match self.chats.get(&chat) {
                Some(s) => s.last_seq,
                None => self.store.last_seq(&chat)?,
            };
            // What the device acknowledged before it was registered is kept; only its start
            // moves to the chat's current end.
            let ckey = OverlayKey::Cursor(user.to_owned(), device.to_owned(), chat.clone());
            let current = match self.recall(&ckey) {
                Some(OverlayValue::Cursor(c)) => *c,
                _ => self
                    .store
                    .get::<Cursor>(CF_CURSORS, &store::key(&[user, device, &chat]))?
                    .unwrap_or_default(),
            };
            self.remember(
                ckey,
                OverlayValue::Cursor(Cursor {
                    start: last,
                    ..current
                }),
            );
            starts.push((chat, last));
        }
        self.remember(dkey, OverlayValue::Device);
        out.push(Record::DeviceSeen {
            user: user.to_owned(),
            device: device.to_owned(),
            starts,
        });
        Ok(Outcome::Done)
    }
}

/// Appends the record of a (non-creation) event; returns the event's seq.
fn push_event(event: Event, out: &mut Vec<Record>) -> u64 {
    let seq = event.seq;
    out.push(Record::Event {
        event,
        created: None,
    });
    seq
}
