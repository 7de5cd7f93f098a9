//! The client's state and decisions, without I/O.
//!
//! [`Session`] is fed what happens (a typed line, a frame from the server, the connection
//! opening or dropping) and answers with [`Effect`]s: lines to print and frames to send. The
//! driver in `connection.rs` does the I/O. Keeping the decisions here lets the tests run whole
//! conversations (resume, reconnect, receipts) without a server.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::command::{self, Command, PAGE_EVENTS_DEFAULT};
use crate::format;
use crate::request::{self, AfterDrop, ChatId, PRESENCE_USERS_MAX, Request};

/// Most requests awaiting a reply at once; beyond it commands are refused until replies come.
pub const PENDING_REQUESTS_MAX: usize = 1024;

/// Most users whose presence one client follows; they are subscribed again, in requests of
/// at most [`PRESENCE_USERS_MAX`], on every new connection.
pub const WATCHED_USERS_MAX: usize = 4 * PRESENCE_USERS_MAX;

/// Longest cmid prefix, in bytes. With `-` and a decimal `u64` counter a cmid stays within the
/// protocol's 64 bytes.
pub const CMID_PREFIX_BYTES_MAX: usize = 40;

const _: () = assert!(CMID_PREFIX_BYTES_MAX + 1 + 20 <= 64);

/// Largest frame the client sends, in bytes: the server's default message limit. The server
/// answers a larger message with a `too_large` error that carries no request id (it does not
/// parse it), so the client could not tell which request failed; it refuses to send it instead.
pub const FRAME_BYTES_MAX: usize = 64 * 1024;

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Show this text (one or more lines) to the user.
    Print(String),
    /// Send this frame on the current connection.
    Frame(Value),
    /// Stop: the client cannot go on (the token was refused).
    Fail(String),
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No connection and no attempt under way (waiting to reconnect).
    Down,
    /// A connection is being opened.
    Connecting,
    /// Open; `hello` sent, `welcome` not yet received.
    Greeting,
    /// `welcome` received: requests may be sent.
    Ready,
}

/// A request awaiting its reply.
#[derive(Debug)]
struct Pending {
    request: Request,
    /// Whether it went out on the current connection (else it goes out after `welcome`).
    sent: bool,
    /// Whether its success is worth no line (a re-subscription after a reconnect).
    quiet: bool,
}

/// What the client knows of one chat.
#[derive(Debug, Default)]
struct ChatView {
    /// Highest seq known to exist.
    last_seq: u64,
    /// Highest seq printed, from pushes or history; pushes at or below it are repeats (a
    /// resume re-sends what this device has not acknowledged) and are not printed again.
    seen_seq: u64,
    /// Lowest seq of the last history page printed: where `/older` continues.
    oldest_shown_seq: Option<u64>,
    /// Highest seq this client has sent `delivered` (or `read`) for.
    delivered_sent_seq: u64,
}

/// The client's state: connection phase, requests awaiting replies, the current chat and what
/// is known of each chat.
#[derive(Debug)]
pub struct Session {
    token: String,
    device: String,
    /// The user the server said we are, from `welcome`.
    user: Option<String>,
    link: Link,
    /// Whether `synced` arrived on the current connection.
    synced: bool,
    /// Events printed on the current connection before `synced`.
    resumed_events: u64,
    next_request_id: u64,
    pending: BTreeMap<u64, Pending>,
    current: Option<ChatId>,
    chats: BTreeMap<ChatId, ChatView>,
    /// Users whose presence we subscribed to; subscribed again on every new connection.
    watched: BTreeSet<String>,
    cmid_prefix: String,
    next_cmid: u64,
    /// `/quit` (or the end of input) count: 1 waits for replies, 2 leaves at once.
    quit_requests: u8,
}

impl Session {
    /// A session for `token` on `device`. `cmid_prefix` must make this process's message ids
    /// unique (the driver uses its start time and process id).
    ///
    /// # Panics
    /// If `cmid_prefix` is longer than [`CMID_PREFIX_BYTES_MAX`] (a programmer error).
    pub fn new(token: String, device: String, cmid_prefix: String) -> Session {
        assert!(cmid_prefix.len() <= CMID_PREFIX_BYTES_MAX);
        Session {
            token,
            device,
            user: None,
            link: Link::Down,
            synced: false,
            resumed_events: 0,
            next_request_id: 1,
            pending: BTreeMap::new(),
            current: None,
            chats: BTreeMap::new(),
            watched: BTreeSet::new(),
            cmid_prefix,
            next_cmid: 1,
            quit_requests: 0,
        }
    }

    /// Whether the user asked to quit.
    pub fn quitting(&self) -> bool {
        self.quit_requests > 0
    }

    /// Whether the client should exit now: quit was asked twice, or once and nothing is left
    /// to wait for (no reply outstanding, and no resume half-way through).
    pub fn finished(&self) -> bool {
        match self.quit_requests {
            0 => false,
            1 => {
                self.pending.is_empty()
                    && match self.link {
                        Link::Down => true,
                        Link::Connecting | Link::Greeting => false,
                        Link::Ready => self.synced,
                    }
            }
            _ => true,
        }
    }

    /// How many requests still await a reply.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Whether `welcome` arrived on the current connection.
    pub fn ready(&self) -> bool {
        self.link == Link::Ready
    }

    /// A connection attempt starts.
    pub fn on_connecting(&mut self) {
        self.link = Link::Connecting;
    }

    /// The WebSocket is open: say hello.
    pub fn on_connected(&mut self) -> Vec<Effect> {
        self.link = Link::Greeting;
        self.synced = false;
        self.resumed_events = 0;
        vec![Effect::Frame(request::hello(&self.token, &self.device))]
    }

    /// The connection dropped, or could not be opened. Requests that are safe to repeat stay
    /// and go out again after the next `welcome`; the others are reported and forgotten.
    pub fn on_disconnected(&mut self, reason: &str) -> Vec<Effect> {
        let was_open = matches!(self.link, Link::Greeting | Link::Ready);
        self.link = Link::Down;
        self.synced = false;
        let mut effects = Vec::new();
        if was_open {
            effects.push(Effect::Print(format!("disconnected: {reason}")));
        } else {
            effects.push(Effect::Print(format!("could not connect: {reason}")));
        }
        let mut lost = Vec::new();
        self.pending.retain(|id, pending| {
            if !pending.sent {
                return true;
            }
            match pending.request.after_drop() {
                AfterDrop::Resend => {
                    pending.sent = false;
                    true
                }
                AfterDrop::Forget => false,
                AfterDrop::Unknown => {
                    lost.push((*id, pending.request.op()));
                    false
                }
            }
        });
        for (id, op) in lost {
            effects.push(Effect::Print(format!(
                "request {id} ({op}) got no reply before the connection dropped: it may or may \
                 not have been applied (check /history or /chats)"
            )));
        }
        effects
    }

    /// Standard input ended: quit once the replies still awaited have come.
    pub fn on_input_closed(&mut self) -> Vec<Effect> {
        self.quit_requests = self.quit_requests.max(1);
        Vec::new()
    }

    /// The user typed `line`.
    pub fn on_line(&mut self, line: &str) -> Vec<Effect> {
        match command::parse(line) {
            Ok(command) => self.on_command(command),
            Err(usage) => vec![Effect::Print(usage)],
        }
    }

    /// The server sent the text frame `text`.
    pub fn on_text(&mut self, text: &str) -> Vec<Effect> {
        match serde_json::from_str::<Value>(text) {
            Ok(frame) => self.on_frame(&frame),
            Err(e) => vec![Effect::Print(format!(
                "server sent a frame that is not JSON ({e}): {}",
                format::raw(&Value::String(text.to_owned()))
            ))],
        }
    }

    /// Registers `request` and sends it now if the connection is ready; otherwise it goes out
    /// after the next `welcome`.
    fn issue(&mut self, request: Request, quiet: bool) -> Vec<Effect> {
        if self.pending.len() >= PENDING_REQUESTS_MAX {
            return vec![Effect::Print(format!(
                "{PENDING_REQUESTS_MAX} requests are awaiting replies: try again in a moment"
            ))];
        }
        let id = self.next_request_id;
        let frame = request.to_frame(id);
        let frame_bytes = frame.to_string().len();
        if frame_bytes > FRAME_BYTES_MAX {
            return vec![Effect::Print(format!(
                "not sent: the {} request would be {frame_bytes} bytes, above the server's \
                 default limit of {FRAME_BYTES_MAX}",
                request.op()
            ))];
        }
        self.next_request_id += 1;
        let ready = self.ready();
        let mut effects = Vec::new();
        if ready {
            effects.push(Effect::Frame(frame));
        } else if !quiet {
            effects.push(Effect::Print(format!(
                "(not connected yet: {} will be sent once connected)",
                request.op()
            )));
        }
        let previous = self.pending.insert(
            id,
            Pending {
                request,
                sent: ready,
                quiet,
            },
        );
        assert!(previous.is_none(), "request ids only grow");
        effects
    }

    /// The current chat, or the hint to open one.
    fn current_chat(&self) -> Result<ChatId, Vec<Effect>> {
        self.current.clone().ok_or_else(|| {
            vec![Effect::Print(
                "no chat is open: /open <chat> (see /chats), /create or /direct".to_owned(),
            )]
        })
    }

    /// The chat id the user typed: a known chat whose id reads the same, else a number if it
    /// is all digits, else the text itself.
    fn resolve_chat(&self, typed: &str) -> ChatId {
        if let Some(known) = self.chats.keys().find(|c| c.to_string() == typed) {
            return known.clone();
        }
        match typed.parse::<u64>() {
            Ok(n) => ChatId::Number(n),
            Err(_) => ChatId::Text(typed.to_owned()),
        }
    }

    fn on_command(&mut self, command: Command) -> Vec<Effect> {
        match self.command_effects(command) {
            Ok(effects) | Err(effects) => effects,
        }
    }

    /// The effects of one command; `Err` carries the hint when the command cannot be run.
    fn command_effects(&mut self, command: Command) -> Result<Vec<Effect>, Vec<Effect>> {
        let effects = match command {
            Command::Nothing => Vec::new(),
            Command::Help => vec![Effect::Print(command::HELP.to_owned())],
            Command::Quit => {
                self.quit_requests = self.quit_requests.saturating_add(1);
                if self.finished() || self.pending.is_empty() {
                    Vec::new()
                } else {
                    vec![Effect::Print(format!(
                        "waiting for {} (/quit again to leave now)",
                        format::count(self.pending.len(), "reply", "replies")
                    ))]
                }
            }
            Command::Chats => self.issue(Request::ListChats, false),
            Command::Create { title, users } => self.issue(
                Request::CreateChat {
                    title: Some(title),
                    members: users,
                    direct: false,
                },
                false,
            ),
            Command::Direct { user } => self.issue(
                Request::CreateChat {
                    title: None,
                    members: vec![user],
                    direct: true,
                },
                false,
            ),
            Command::Open { chat } => {
                let chat = self.resolve_chat(&chat);
                self.issue(
                    Request::History {
                        chat,
                        before: None,
                        limit: PAGE_EVENTS_DEFAULT,
                        open: true,
                    },
                    false,
                )
            }
            Command::Say { body } => {
                let chat = self.current_chat()?;
                let cmid = format!("{}-{}", self.cmid_prefix, self.next_cmid);
                self.next_cmid += 1;
                self.issue(Request::Send { chat, cmid, body }, false)
            }
            Command::History { limit } => {
                let chat = self.current_chat()?;
                self.issue(
                    Request::History {
                        chat,
                        before: None,
                        limit,
                        open: false,
                    },
                    false,
                )
            }
            Command::Older => {
                let chat = self.current_chat()?;
                let oldest = self.chats.get(&chat).and_then(|v| v.oldest_shown_seq);
                match oldest {
                    None => {
                        return Err(vec![Effect::Print(
                            "no history shown yet: /history first".to_owned(),
                        )]);
                    }
                    Some(oldest) if oldest <= 1 => {
                        return Err(vec![Effect::Print(
                            "already at the beginning of the chat".to_owned(),
                        )]);
                    }
                    Some(oldest) => self.issue(
                        Request::History {
                            chat,
                            before: Some(oldest),
                            limit: PAGE_EVENTS_DEFAULT,
                            open: false,
                        },
                        false,
                    ),
                }
            }
            Command::Edit { target, body } => {
                let chat = self.current_chat()?;
                self.issue(Request::Edit { chat, target, body }, false)
            }
            Command::Delete { target } => {
                let chat = self.current_chat()?;
                self.issue(Request::Delete { chat, target }, false)
            }
            Command::Read => {
                let chat = self.current_chat()?;
                let view = self.chats.entry(chat.clone()).or_default();
                if view.last_seq == 0 {
                    return Err(vec![Effect::Print(
                        "nothing known in this chat yet: /history first".to_owned(),
                    )]);
                }
                let seq = view.last_seq;
                view.delivered_sent_seq = view.delivered_sent_seq.max(seq);
                self.issue(Request::Read { chat, seq }, false)
            }
            Command::Receipts => {
                let chat = self.current_chat()?;
                self.issue(Request::Receipts { chat }, false)
            }
            Command::Add { users } => {
                let chat = self.current_chat()?;
                self.issue(Request::AddMembers { chat, users }, false)
            }
            Command::Remove { users } => {
                let chat = self.current_chat()?;
                self.issue(Request::RemoveMembers { chat, users }, false)
            }
            Command::Presence { users } => {
                check_user_count(&users)?;
                self.issue(Request::Presence { users }, false)
            }
            Command::Watch { users } => {
                check_user_count(&users)?;
                let new = users.iter().filter(|u| !self.watched.contains(*u)).count();
                if self.watched.len() + new > WATCHED_USERS_MAX {
                    return Err(vec![Effect::Print(format!(
                        "at most {WATCHED_USERS_MAX} watched users in all"
                    ))]);
                }
                self.issue(Request::SubscribePresence { users }, false)
            }
            Command::Typing => {
                let chat = self.current_chat()?;
                self.issue(Request::Typing { chat }, true)
            }
        };
        Ok(effects)
    }

    fn on_frame(&mut self, frame: &Value) -> Vec<Effect> {
        if let Some(ev) = frame.get("ev") {
            return self.on_push(ev.as_str().unwrap_or(""), frame);
        }
        let id = frame.get("id").filter(|id| !id.is_null());
        let pending = id
            .and_then(Value::as_u64)
            .and_then(|id| self.pending.remove(&id));
        if let Some(pending) = pending {
            return self.on_reply(pending, frame);
        }
        if let Some(error) = frame.get("error") {
            let code = error.get("code").and_then(Value::as_str);
            if code == Some("unauthorized") && self.link != Link::Ready {
                return vec![Effect::Fail(format::error(Some("hello"), error))];
            }
            return vec![Effect::Print(format::error(None, error))];
        }
        match id {
            Some(id) => vec![Effect::Print(format!(
                "reply to unknown request {}: {}",
                format::raw(id),
                format::raw(frame)
            ))],
            None => vec![Effect::Print(format!(
                "unexpected frame: {}",
                format::raw(frame)
            ))],
        }
    }

    fn on_push(&mut self, ev: &str, frame: &Value) -> Vec<Effect> {
        match ev {
            "welcome" => self.on_welcome(frame),
            "event" => match frame.get("event") {
                Some(event) => self.on_event(event),
                None => vec![Effect::Print(format!(
                    "event push without an event: {}",
                    format::raw(frame)
                ))],
            },
            "synced" => {
                self.synced = true;
                let mut effects = vec![Effect::Print(format::synced(self.resumed_events))];
                if let Some(chat) = self.current.clone() {
                    effects.extend(self.acknowledge(&chat));
                }
                effects
            }
            "receipt" => {
                // Our own receipts echo what this client (or another of our devices) just
                // acknowledged: one line per message would drown the conversation.
                let mine = self.user.is_some()
                    && frame.get("user").and_then(Value::as_str) == self.user.as_deref();
                if mine {
                    Vec::new()
                } else {
                    vec![Effect::Print(format::receipt(frame))]
                }
            }
            "presence" => vec![Effect::Print(format::presence_change(frame))],
            "typing" => vec![Effect::Print(format::typing(frame))],
            _ => vec![Effect::Print(format!(
                "unknown push {}: {}",
                format::clean(ev),
                format::raw(frame)
            ))],
        }
    }

    fn on_welcome(&mut self, frame: &Value) -> Vec<Effect> {
        self.link = Link::Ready;
        self.user = frame.get("user").and_then(Value::as_str).map(str::to_owned);
        let mut effects = vec![Effect::Print(format::welcome(frame))];
        // Requests typed while disconnected, and those safe to repeat that lost their reply.
        for (id, pending) in self.pending.iter_mut().filter(|(_, p)| !p.sent) {
            pending.sent = true;
            effects.push(Effect::Frame(pending.request.to_frame(*id)));
        }
        // Presence subscriptions belong to a connection: renew them.
        let watched: Vec<String> = self.watched.iter().cloned().collect();
        for users in watched.chunks(PRESENCE_USERS_MAX) {
            effects.extend(self.issue(
                Request::SubscribePresence {
                    users: users.to_vec(),
                },
                true,
            ));
        }
        effects
    }

    /// An event pushed by the server (live or resumed).
    fn on_event(&mut self, event: &Value) -> Vec<Effect> {
        let chat = ChatId::from_json(event.get("chat"));
        let seq = event.get("seq").and_then(Value::as_u64);
        let (Some(chat), Some(seq)) = (chat, seq) else {
            return vec![Effect::Print(format!(
                "malformed event: {}",
                format::raw(event)
            ))];
        };
        let view = self.chats.entry(chat.clone()).or_default();
        view.last_seq = view.last_seq.max(seq);
        if seq <= view.seen_seq {
            // Already shown (a resume repeats what this device had not acknowledged).
            return Vec::new();
        }
        view.seen_seq = seq;
        if !self.synced {
            self.resumed_events += 1;
        }
        let mut effects = vec![Effect::Print(format::event(event))];
        if self.current.as_ref() == Some(&chat) {
            effects.extend(self.on_membership(&chat, event));
            effects.extend(self.acknowledge(&chat));
        }
        effects
    }

    /// If `event` removed us from the open chat, close it.
    fn on_membership(&mut self, chat: &ChatId, event: &Value) -> Vec<Effect> {
        let Some(user) = self.user.as_deref() else {
            return Vec::new();
        };
        let removed_us = event
            .get("removed")
            .and_then(Value::as_array)
            .is_some_and(|removed| removed.iter().any(|u| u.as_str() == Some(user)));
        if removed_us {
            self.current = None;
            return vec![Effect::Print(format!(
                "you are no longer a member of {chat}; no chat is open"
            ))];
        }
        Vec::new()
    }

    /// Tells the server this device has everything shown so far in `chat`, once the resume is
    /// over (so a burst of resumed events costs one `delivered`) and only for the open chat.
    fn acknowledge(&mut self, chat: &ChatId) -> Vec<Effect> {
        if !self.synced || self.current.as_ref() != Some(chat) {
            return Vec::new();
        }
        let Some(view) = self.chats.get_mut(chat) else {
            return Vec::new();
        };
        if view.seen_seq <= view.delivered_sent_seq {
            return Vec::new();
        }
        let seq = view.seen_seq;
        view.delivered_sent_seq = seq;
        self.issue(
            Request::Delivered {
                chat: chat.clone(),
                seq,
            },
            true,
        )
    }

    fn on_reply(&mut self, pending: Pending, frame: &Value) -> Vec<Effect> {
        let request = pending.request;
        if let Some(error) = frame.get("error") {
            let mut text = format::error(Some(request.op()), error);
            if let Request::History { open: true, .. } = request {
                text.push_str(" (chat not opened)");
            }
            return vec![Effect::Print(text)];
        }
        let Some(result) = frame.get("result") else {
            return vec![Effect::Print(format!(
                "reply to {} with neither result nor error: {}",
                request.op(),
                format::raw(frame)
            ))];
        };
        let say = |text: String| vec![Effect::Print(text)];
        match request {
            Request::ListChats => {
                for chat in result
                    .get("chats")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(id) = ChatId::from_json(chat.get("chat")) {
                        let view = self.chats.entry(id).or_default();
                        let last_seq = chat.get("last_seq").and_then(Value::as_u64);
                        view.last_seq = view.last_seq.max(last_seq.unwrap_or(0));
                    }
                }
                say(format::chats(result))
            }
            Request::CreateChat { direct, .. } => {
                let Some(chat) = ChatId::from_json(result.get("chat")) else {
                    return say(format!(
                        "unexpected create_chat result: {}",
                        format::raw(result)
                    ));
                };
                self.chats.entry(chat.clone()).or_default();
                let what = if direct {
                    "direct chat"
                } else {
                    "created chat"
                };
                let mut effects = say(format!("{what} {chat}; opening it"));
                effects.extend(self.issue(
                    Request::History {
                        chat,
                        before: None,
                        limit: PAGE_EVENTS_DEFAULT,
                        open: true,
                    },
                    false,
                ));
                effects
            }
            Request::AddMembers { .. } | Request::RemoveMembers { .. } => say(format!(
                "members updated (#{})",
                format::scalar(result.get("seq"))
            )),
            Request::Send { .. } => say(format!("sent as #{}", format::scalar(result.get("seq")))),
            Request::Edit { target, .. } => say(format!(
                "edited #{target} (#{})",
                format::scalar(result.get("seq"))
            )),
            Request::Delete { target, .. } => say(format!(
                "deleted #{target} (#{})",
                format::scalar(result.get("seq"))
            )),
            Request::History {
                chat, before, open, ..
            } => self.on_history(chat, before, open, result),
            Request::Read { chat, seq } => say(format!("{chat} read up to #{seq}")),
            Request::Receipts { chat } => say(format::receipts(&chat.to_string(), result)),
            Request::Presence { .. } => say(format::presence_list(result)),
            Request::SubscribePresence { users } => {
                let text = format!("watching {}", users.join(", "));
                self.watched.extend(users);
                if pending.quiet { Vec::new() } else { say(text) }
            }
            Request::Delivered { .. } | Request::Typing { .. } => Vec::new(),
        }
    }

    fn on_history(
        &mut self,
        chat: ChatId,
        before: Option<u64>,
        open: bool,
        result: &Value,
    ) -> Vec<Effect> {
        let Some(events) = result.get("events").and_then(Value::as_array) else {
            return vec![Effect::Print(format!(
                "unexpected history result: {}",
                format::raw(result)
            ))];
        };
        let last_seq = result.get("last_seq").and_then(Value::as_u64).unwrap_or(0);
        let mut effects = Vec::new();
        if open {
            self.current = Some(chat.clone());
            effects.push(Effect::Print(format!(
                "-- {chat} is open: {last_seq} events, showing the last {} --",
                events.len()
            )));
        }
        let seqs: Vec<u64> = events
            .iter()
            .filter_map(|e| e.get("seq").and_then(Value::as_u64))
            .collect();
        if events.is_empty() {
            let text = if before.is_some() {
                "(no older events)"
            } else {
                "(no events)"
            };
            effects.push(Effect::Print(text.to_owned()));
        }
        for event in events {
            effects.push(Effect::Print(format::event(event)));
        }
        if seqs.contains(&1) && !events.is_empty() {
            effects.push(Effect::Print("-- beginning of the chat --".to_owned()));
        }
        let view = self.chats.entry(chat.clone()).or_default();
        view.last_seq = view.last_seq.max(last_seq);
        if let Some(&oldest) = seqs.iter().min() {
            view.oldest_shown_seq = Some(oldest);
        }
        if let Some(&newest) = seqs.iter().max() {
            view.seen_seq = view.seen_seq.max(newest);
        }
        effects.extend(self.acknowledge(&chat));
        effects
    }
}

/// Refuses more users than one presence request may name.
fn check_user_count(users: &[String]) -> Result<(), Vec<Effect>> {
    if users.len() > PRESENCE_USERS_MAX {
        return Err(vec![Effect::Print(format!(
            "at most {PRESENCE_USERS_MAX} users at once"
        ))]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session() -> Session {
        Session::new("tok".into(), "cli".into(), "t".into())
    }

    fn frames(effects: &[Effect]) -> Vec<Value> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Frame(f) => Some(f.clone()),
                _ => None,
            })
            .collect()
    }

    fn prints(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Print(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    fn text(frame: Value) -> String {
        frame.to_string()
    }

    fn event(chat: &str, seq: u64, body: &str) -> String {
        text(
            json!({"ev":"event","event":{"chat":chat,"seq":seq,"kind":"message",
            "sender":"bob","ts":0,"cmid":format!("c{seq}"),"body":body,"file":null}}),
        )
    }

    /// A session through `hello`, `welcome` and `synced` with nothing to resume.
    fn connected() -> Session {
        let mut s = session();
        s.on_connecting();
        let hello = frames(&s.on_connected());
        assert_eq!(hello, [json!({"op":"hello","token":"tok","device":"cli"})]);
        s.on_text(&text(json!({"ev":"welcome","user":"alice","device":"cli"})));
        s.on_text(&text(json!({"ev":"synced"})));
        s
    }

    /// `connected()` with chat g1 open, its history (seq 1..=3) answered.
    fn with_open_chat() -> Session {
        let mut s = connected();
        let sent = frames(&s.on_line("/open g1"));
        assert_eq!(
            sent,
            [json!({"op":"history","id":1,"chat":"g1","limit":20})]
        );
        let events: Vec<Value> = (1..=3)
            .map(|seq| {
                json!({"chat":"g1","seq":seq,"kind":"message","sender":"bob","ts":0,
                "body":"x","edited":false,"deleted":false})
            })
            .collect();
        let effects = s.on_text(&text(
            json!({"id":1,"result":{"events":events,"last_seq":3}}),
        ));
        assert_eq!(
            frames(&effects),
            [json!({"op":"delivered","id":2,"chat":"g1","seq":3})]
        );
        s.on_text(&text(json!({"id":2,"result":{}})));
        assert_eq!(s.pending_count(), 0);
        s
    }

    #[test]
    fn commands_typed_before_welcome_go_out_after_it() {
        let mut s = session();
        s.on_connecting();
        let queued = s.on_line("/chats");
        assert!(frames(&queued).is_empty());
        assert!(prints(&queued)[0].contains("not connected"));
        s.on_connected();
        let effects = s.on_text(&text(json!({"ev":"welcome","user":"alice","device":"cli"})));
        assert_eq!(prints(&effects)[0], "connected as alice (device cli)");
        assert_eq!(frames(&effects), [json!({"op":"list_chats","id":1})]);
    }

    #[test]
    fn opening_a_chat_shows_history_and_acknowledges_it() {
        let s = with_open_chat();
        assert_eq!(s.current, Some(ChatId::Text("g1".into())));
        let view = &s.chats[&ChatId::Text("g1".into())];
        assert_eq!(view.oldest_shown_seq, Some(1));
        assert_eq!(view.delivered_sent_seq, 3);
    }

    #[test]
    fn a_failed_open_keeps_the_previous_chat() {
        let mut s = with_open_chat();
        s.on_line("/open g9");
        let effects = s.on_text(&text(
            json!({"id":3,"error":{"code":"not_found","message":"no chat g9"}}),
        ));
        assert_eq!(
            prints(&effects),
            ["error (history) not_found: no chat g9 (chat not opened)"]
        );
        assert_eq!(s.current, Some(ChatId::Text("g1".into())));
    }

    #[test]
    fn plain_lines_send_with_unique_cmids_and_show_the_seq() {
        let mut s = with_open_chat();
        let first = frames(&s.on_line("hello"));
        let second = frames(&s.on_line("hello"));
        assert_eq!(first[0]["op"], "send");
        assert_eq!(first[0]["body"], "hello");
        assert_ne!(first[0]["cmid"], second[0]["cmid"]);
        let effects = s.on_text(&text(
            json!({"id":first[0]["id"],"result":{"chat":"g1","seq":4,"ts":1}}),
        ));
        assert_eq!(prints(&effects), ["sent as #4"]);
    }

    #[test]
    fn frames_above_the_server_limit_are_not_sent() {
        let mut s = with_open_chat();
        let effects = s.on_line(&"x".repeat(FRAME_BYTES_MAX));
        assert!(frames(&effects).is_empty());
        assert!(prints(&effects)[0].starts_with("not sent: the send request would be"));
        assert_eq!(s.pending_count(), 0);
        // Below the frame limit the server decides (its body limit is 16 KiB by default).
        let effects = s.on_line(&"x".repeat(20_000));
        assert_eq!(frames(&effects).len(), 1);
    }

    #[test]
    fn chat_commands_need_an_open_chat() {
        let mut s = connected();
        for line in [
            "hi",
            "/history",
            "/older",
            "/read",
            "/receipts",
            "/typing",
            "/add x",
        ] {
            let effects = s.on_line(line);
            assert!(frames(&effects).is_empty(), "{line}");
            assert!(prints(&effects)[0].starts_with("no chat is open"), "{line}");
        }
    }

    #[test]
    fn live_events_in_the_open_chat_are_acknowledged_and_others_are_not() {
        let mut s = with_open_chat();
        let effects = s.on_text(&event("g1", 4, "new"));
        assert_eq!(prints(&effects), ["[g1 #4 00:00:00] bob: new"]);
        assert_eq!(
            frames(&effects),
            [json!({"op":"delivered","id":3,"chat":"g1","seq":4})]
        );
        let other = s.on_text(&event("g2", 9, "elsewhere"));
        assert_eq!(prints(&other), ["[g2 #9 00:00:00] bob: elsewhere"]);
        assert!(frames(&other).is_empty());
    }

    #[test]
    fn resumed_events_are_acknowledged_once_at_synced_and_repeats_are_hidden() {
        let mut s = with_open_chat();
        s.on_disconnected("test");
        s.on_connecting();
        s.on_connected();
        s.on_text(&text(json!({"ev":"welcome","user":"alice","device":"cli"})));
        // seq 3 was shown by history already: a resume repeating it prints nothing.
        assert!(s.on_text(&event("g1", 3, "x")).is_empty());
        let e4 = s.on_text(&event("g1", 4, "a"));
        let e5 = s.on_text(&event("g1", 5, "b"));
        assert!(frames(&e4).is_empty() && frames(&e5).is_empty());
        let synced = s.on_text(&text(json!({"ev":"synced"})));
        assert_eq!(prints(&synced), ["-- synced: 2 events above were new --"]);
        assert_eq!(
            frames(&synced),
            [json!({"op":"delivered","id":3,"chat":"g1","seq":5})]
        );
    }

    #[test]
    fn after_a_drop_safe_requests_are_resent_and_unsafe_ones_reported() {
        let mut s = with_open_chat();
        let send = frames(&s.on_line("hello"))[0].clone();
        s.on_line("/edit 2 fixed");
        s.on_line("/typing");
        assert_eq!(s.pending_count(), 3);
        let dropped = s.on_disconnected("reset by peer");
        let lines = prints(&dropped);
        assert_eq!(lines[0], "disconnected: reset by peer");
        assert!(lines[1].contains("(edit)") && lines[1].contains("may or may not"));
        assert_eq!(s.pending_count(), 1);
        s.on_connecting();
        s.on_connected();
        let welcome = s.on_text(&text(json!({"ev":"welcome","user":"alice","device":"cli"})));
        // Same id and the same cmid: the server answers with the seq it stored the first time.
        assert_eq!(frames(&welcome), [send]);
    }

    #[test]
    fn watched_users_are_subscribed_again_on_reconnect() {
        let mut s = connected();
        let sub = frames(&s.on_line("/watch bob"));
        let effects = s.on_text(&text(json!({"id":sub[0]["id"],"result":{}})));
        assert_eq!(prints(&effects), ["watching bob"]);
        s.on_disconnected("gone");
        s.on_connecting();
        s.on_connected();
        let welcome = s.on_text(&text(json!({"ev":"welcome","user":"alice","device":"cli"})));
        let again = frames(&welcome);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0]["op"], "subscribe_presence");
        assert_eq!(again[0]["users"], json!(["bob"]));
        let quiet = s.on_text(&text(json!({"id":again[0]["id"],"result":{}})));
        assert!(quiet.is_empty());
    }

    #[test]
    fn older_pages_back_from_the_oldest_event_shown() {
        let mut s = connected();
        s.on_line("/open g1");
        let page: Vec<Value> = (31..=50)
            .map(|seq| json!({"chat":"g1","seq":seq,"kind":"message","sender":"b","ts":0,"body":"x"}))
            .collect();
        s.on_text(&text(
            json!({"id":1,"result":{"events":page,"last_seq":50}}),
        ));
        let older = frames(&s.on_line("/older"));
        assert_eq!(
            older,
            [json!({"op":"history","id":3,"chat":"g1","limit":20,"before":31})]
        );
        let first: Vec<Value> = (1..=20)
            .map(|seq| json!({"chat":"g1","seq":seq,"kind":"message","sender":"b","ts":0,"body":"x"}))
            .collect();
        let shown = s.on_text(&text(
            json!({"id":3,"result":{"events":first,"last_seq":50}}),
        ));
        assert_eq!(
            prints(&shown).last().map(String::as_str),
            Some("-- beginning of the chat --")
        );
        let at_start = s.on_line("/older");
        assert!(frames(&at_start).is_empty());
        assert_eq!(prints(&at_start), ["already at the beginning of the chat"]);
    }

    #[test]
    fn read_marks_up_to_the_last_known_seq() {
        let mut s = with_open_chat();
        s.on_text(&event("g1", 7, "late"));
        let read = frames(&s.on_line("/read"));
        assert_eq!(read, [json!({"op":"read","id":4,"chat":"g1","seq":7})]);
    }

    #[test]
    fn create_opens_the_new_chat() {
        let mut s = connected();
        let create = frames(&s.on_line("/create Team bob"));
        let effects = s.on_text(&text(json!({"id":create[0]["id"],"result":{"chat":"g7"}})));
        assert_eq!(prints(&effects), ["created chat g7; opening it"]);
        assert_eq!(
            frames(&effects),
            [json!({"op":"history","id":2,"chat":"g7","limit":20})]
        );
    }

    #[test]
    fn chat_ids_typed_by_the_user_resolve_to_known_ids_first() {
        let mut s = connected();
        s.on_text(&text(
            json!({"ev":"event","event":{"chat":12,"seq":1,"kind":"message",
            "sender":"b","ts":0,"body":"x"}}),
        ));
        assert_eq!(s.resolve_chat("12"), ChatId::Number(12));
        assert_eq!(s.resolve_chat("g1"), ChatId::Text("g1".into()));
        assert_eq!(s.resolve_chat("99"), ChatId::Number(99));
    }

    #[test]
    fn own_receipts_are_hidden_and_others_shown() {
        let mut s = connected();
        let mine = s.on_text(&text(
            json!({"ev":"receipt","chat":"g1","user":"alice","delivered":3,"read":0}),
        ));
        assert!(mine.is_empty());
        let theirs = s.on_text(&text(
            json!({"ev":"receipt","chat":"g1","user":"bob","delivered":3,"read":2}),
        ));
        assert_eq!(prints(&theirs), ["[g1] bob: delivered #3, read #2"]);
    }

    #[test]
    fn being_removed_closes_the_open_chat() {
        let mut s = with_open_chat();
        let effects = s.on_text(&text(json!({"ev":"event","event":{"chat":"g1","seq":4,
            "kind":"members","sender":"bob","ts":0,"added":[],"removed":["alice"]}})));
        assert_eq!(
            prints(&effects),
            [
                "[g1 #4 00:00:00] bob removed alice",
                "you are no longer a member of g1; no chat is open"
            ]
        );
        assert!(frames(&effects).is_empty());
        assert_eq!(s.current, None);
    }

    #[test]
    fn bad_server_input_is_reported_not_fatal() {
        let mut s = connected();
        for junk in [
            "not json",
            "[]",
            "null",
            "{}",
            r#"{"ev":"event"}"#,
            r#"{"ev":"event","event":{"chat":"g1"}}"#,
            r#"{"ev":7}"#,
            r#"{"id":999,"result":{}}"#,
            r#"{"id":"x","error":{"code":"bad_request","message":"m"}}"#,
            r#"{"ev":"welcome"}"#,
        ] {
            let effects = s.on_text(junk);
            assert!(!effects.is_empty(), "{junk}");
            assert!(
                effects.iter().all(|e| matches!(e, Effect::Print(_))),
                "{junk}"
            );
        }
        s.on_line("/chats");
        let odd = s.on_text(r#"{"id":1,"result":{"chats":"nope"}}"#);
        assert!(prints(&odd)[0].starts_with("unexpected"));
    }

    #[test]
    fn unauthorized_before_welcome_is_fatal() {
        let mut s = session();
        s.on_connecting();
        s.on_connected();
        let effects = s.on_text(r#"{"error":{"code":"unauthorized","message":"bad token"}}"#);
        assert!(matches!(&effects[..], [Effect::Fail(m)] if m.contains("bad token")));
    }

    #[test]
    fn quit_waits_for_replies_then_finishes() {
        let mut s = with_open_chat();
        s.on_line("hello");
        let effects = s.on_line("/quit");
        assert!(prints(&effects)[0].starts_with("waiting for 1 reply "));
        assert!(!s.finished());
        s.on_text(r#"{"id":3,"result":{"chat":"g1","seq":4,"ts":0}}"#);
        assert!(s.finished());
    }

    #[test]
    fn a_second_quit_leaves_at_once() {
        let mut s = with_open_chat();
        s.on_line("hello");
        s.on_line("/quit");
        s.on_line("/quit");
        assert!(s.finished());
    }

    #[test]
    fn end_of_input_waits_for_the_first_resume() {
        let mut s = session();
        s.on_input_closed();
        s.on_connecting();
        assert!(!s.finished());
        s.on_connected();
        s.on_text(&text(json!({"ev":"welcome","user":"alice","device":"cli"})));
        assert!(!s.finished());
        s.on_text(&text(json!({"ev":"synced"})));
        assert!(s.finished());
    }
}
