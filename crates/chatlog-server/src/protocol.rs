//! The client protocol of PROTOCOL.md as pure functions: parsing client frames into typed
//! requests (or a typed error naming the problem) and encoding replies and pushes.
//!
//! Nothing here does I/O. Frames are parsed once into a JSON tree so that the request `id` can
//! be echoed even when the rest of the frame is wrong, then the fields of the named op are
//! deserialized with their path recorded, so a wrong type names the field.

use std::collections::HashMap;

use chatlog::engine::{ChatSummary, Event, EventKind, HistoryEvent, Receipt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Users named in one `presence` or `subscribe_presence` request (PROTOCOL.md).
pub const PRESENCE_USERS_MAX: usize = 256;

/// A request id as the client sent it: an integer or a string, echoed verbatim.
pub type RequestId = Value;

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `hello`: authenticate (first frame only).
    Hello {
        /// The JWT.
        token: String,
        /// Device id (default `"default"`).
        device: Option<String>,
        /// Per-chat overrides of where this connection starts.
        since: HashMap<String, u64>,
    },
    /// `create_chat`.
    CreateChat {
        /// Other members.
        members: Vec<String>,
        /// Title.
        title: Option<String>,
        /// Direct chat with one other user.
        direct: bool,
    },
    /// `add_members`.
    AddMembers {
        /// Chat.
        chat: String,
        /// Users to add.
        users: Vec<String>,
    },
    /// `remove_members`.
    RemoveMembers {
        /// Chat.
        chat: String,
        /// Users to remove.
        users: Vec<String>,
    },
    /// `list_chats`.
    ListChats,
    /// `send`.
    Send {
        /// Chat.
        chat: String,
        /// Client message id (idempotency key).
        cmid: String,
        /// Text.
        body: Option<String>,
        /// Attached file id.
        file: Option<String>,
    },
    /// `edit`.
    Edit {
        /// Chat.
        chat: String,
        /// Seq of the message.
        target: u64,
        /// New text.
        body: String,
    },
    /// `delete`.
    Delete {
        /// Chat.
        chat: String,
        /// Seq of the message.
        target: u64,
    },
    /// `history`.
    History {
        /// Chat.
        chat: String,
        /// Exclusive upper bound.
        before: Option<u64>,
        /// Exclusive lower bound.
        after: Option<u64>,
        /// Page size.
        limit: Option<u64>,
    },
    /// `delivered` or `read`.
    Mark {
        /// Chat.
        chat: String,
        /// Up to here.
        seq: u64,
        /// `read` (implies delivered).
        read: bool,
    },
    /// `receipts`.
    Receipts {
        /// Chat.
        chat: String,
    },
    /// `presence`.
    Presence {
        /// Users asked about.
        users: Vec<String>,
    },
    /// `subscribe_presence`.
    SubscribePresence {
        /// Users to watch.
        users: Vec<String>,
    },
    /// `unsubscribe_presence` (an addition: stop watching users).
    UnsubscribePresence {
        /// Users to stop watching.
        users: Vec<String>,
    },
    /// `typing`.
    Typing {
        /// Chat.
        chat: String,
    },
    /// `ping`.
    Ping,
}

impl Request {
    /// The op name (for metrics and logs).
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::CreateChat { .. } => "create_chat",
            Request::AddMembers { .. } => "add_members",
            Request::RemoveMembers { .. } => "remove_members",
            Request::ListChats => "list_chats",
            Request::Send { .. } => "send",
            Request::Edit { .. } => "edit",
            Request::Delete { .. } => "delete",
            Request::History { .. } => "history",
            Request::Mark { read: false, .. } => "delivered",
            Request::Mark { read: true, .. } => "read",
            Request::Receipts { .. } => "receipts",
            Request::Presence { .. } => "presence",
            Request::SubscribePresence { .. } => "subscribe_presence",
            Request::UnsubscribePresence { .. } => "unsubscribe_presence",
            Request::Typing { .. } => "typing",
            Request::Ping => "ping",
        }
    }
}

/// A protocol error code (PROTOCOL.md "Error codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// `bad_request`.
    BadRequest,
    /// `unauthorized`.
    Unauthorized,
    /// `forbidden`.
    Forbidden,
    /// `not_found`.
    NotFound,
    /// `too_large`.
    TooLarge,
    /// `too_many_members`.
    TooManyMembers,
    /// `rate_limited`.
    RateLimited,
    /// `unavailable`.
    Unavailable,
    /// `internal`.
    Internal,
}

impl Code {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not_found",
            Code::TooLarge => "too_large",
            Code::TooManyMembers => "too_many_members",
            Code::RateLimited => "rate_limited",
            Code::Unavailable => "unavailable",
            Code::Internal => "internal",
        }
    }

    /// The code of an engine error.
    pub fn of(error: &chatlog::engine::ChatError) -> Code {
        match error.code() {
            "bad_request" => Code::BadRequest,
            "forbidden" => Code::Forbidden,
            "not_found" => Code::NotFound,
            "too_large" => Code::TooLarge,
            "too_many_members" => Code::TooManyMembers,
            "unavailable" => Code::Unavailable,
            _ => Code::Internal,
        }
    }
}

/// A refused request: the code, a message for humans, and for `rate_limited` the wait.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Error code.
    pub code: Code,
    /// What went wrong.
    pub message: String,
    /// `rate_limited` only: when to retry.
    pub retry_after_ms: Option<u64>,
}

impl Failure {
    /// A failure with a code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(Code::BadRequest, message)
    }
}

impl From<chatlog::engine::ChatError> for Failure {
    fn from(e: chatlog::engine::ChatError) -> Failure {
        let code = Code::of(&e);
        // The engine's messages start with the code in words ("forbidden: ..."); the error
        // object carries the code already.
        let text = e.to_string();
        let prefix = format!("{}: ", e.code().replace('_', " "));
        let message = text.strip_prefix(&prefix).unwrap_or(&text).to_owned();
        Failure::new(code, message)
    }
}

/// Parses one text frame. On failure returns the id when it could be read.
pub fn parse(text: &str) -> Result<(RequestId, Request), (Option<RequestId>, Failure)> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| (None, Failure::bad_request(format!("invalid JSON: {e}"))))?;
    let Value::Object(mut map) = value else {
        return Err((None, Failure::bad_request("a frame must be a JSON object")));
    };
    let id = match map.remove("id") {
        None | Some(Value::Null) => Value::Null,
        Some(id @ (Value::Number(_) | Value::String(_))) => id,
        Some(_) => {
            return Err((
                None,
                Failure::bad_request("field `id`: must be an integer or a string"),
            ));
        }
    };
    let echo = |f: Failure| (Some(id.clone()).filter(|v| !v.is_null()), f);
    let op = match map.remove("op") {
        Some(Value::String(op)) => op,
        Some(_) => return Err(echo(Failure::bad_request("field `op`: must be a string"))),
        None => return Err(echo(Failure::bad_request("missing field `op`"))),
    };
    let request = parse_op(&op, map).map_err(echo)?;
    Ok((id, request))
}

fn fields<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, Failure> {
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Failure::bad_request(inner.to_string())
        } else {
            Failure::bad_request(format!("field `{path}`: {inner}"))
        }
    })
}

#[derive(Deserialize)]
struct HelloFields {
    token: String,
    device: Option<String>,
    #[serde(default)]
    since: Option<HashMap<String, u64>>,
}

#[derive(Deserialize)]
struct CreateFields {
    #[serde(default)]
    members: Vec<String>,
    title: Option<String>,
    #[serde(default)]
    direct: Option<bool>,
}

#[derive(Deserialize)]
struct UsersFields {
    chat: String,
    users: Vec<String>,
}

#[derive(Deserialize)]
struct SendFields {
    chat: String,
    cmid: String,
    body: Option<String>,
    file: Option<String>,
}

#[derive(Deserialize)]
struct EditFields {
    chat: String,
    target: u64,
    body: String,
}

#[derive(Deserialize)]
struct DeleteFields {
    chat: String,
    target: u64,
}

#[derive(Deserialize)]
struct HistoryFields {
    chat: String,
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u64>,
}

#[derive(Deserialize)]
struct MarkFields {
    chat: String,
    seq: u64,
}

#[derive(Deserialize)]
struct ChatField {
    chat: String,
}

#[derive(Deserialize)]
struct UserList {
    users: Vec<String>,
}

fn user_list(map: Map<String, Value>) -> Result<Vec<String>, Failure> {
    let UserList { users } = fields(map)?;
    if users.len() > PRESENCE_USERS_MAX {
        return Err(Failure::bad_request(format!(
            "field `users`: {} users, at most {PRESENCE_USERS_MAX} per request",
            users.len()
        )));
    }
    Ok(users)
}

fn parse_op(op: &str, map: Map<String, Value>) -> Result<Request, Failure> {
    Ok(match op {
        "hello" => {
            let f: HelloFields = fields(map)?;
            Request::Hello {
                token: f.token,
                device: f.device,
                since: f.since.unwrap_or_default(),
            }
        }
        "create_chat" => {
            let f: CreateFields = fields(map)?;
            Request::CreateChat {
                members: f.members,
                title: f.title,
                direct: f.direct.unwrap_or(false),
            }
        }
        "add_members" => {
            let f: UsersFields = fields(map)?;
            Request::AddMembers {
                chat: f.chat,
                users: f.users,
            }
        }
        "remove_members" => {
            let f: UsersFields = fields(map)?;
            Request::RemoveMembers {
                chat: f.chat,
                users: f.users,
            }
        }
        "list_chats" => Request::ListChats,
        "send" => {
            let f: SendFields = fields(map)?;
            Request::Send {
                chat: f.chat,
                cmid: f.cmid,
                body: f.body,
                file: f.file,
            }
        }
        "edit" => {
            let f: EditFields = fields(map)?;
            Request::Edit {
                chat: f.chat,
                target: f.target,
                body: f.body,
            }
        }
        "delete" => {
            let f: DeleteFields = fields(map)?;
            Request::Delete {
                chat: f.chat,
                target: f.target,
            }
        }
        "history" => {
            let f: HistoryFields = fields(map)?;
            Request::History {
                chat: f.chat,
                before: f.before,
                after: f.after,
                limit: f.limit,
            }
        }
        "delivered" | "read" => {
            let f: MarkFields = fields(map)?;
            Request::Mark {
                chat: f.chat,
                seq: f.seq,
                read: op == "read",
            }
        }
        "receipts" => {
            let f: ChatField = fields(map)?;
            Request::Receipts { chat: f.chat }
        }
        "presence" => Request::Presence {
            users: user_list(map)?,
        },
        "subscribe_presence" => Request::SubscribePresence {
            users: user_list(map)?,
        },
        "unsubscribe_presence" => Request::UnsubscribePresence {
            users: user_list(map)?,
        },
        "typing" => {
            let f: ChatField = fields(map)?;
            Request::Typing { chat: f.chat }
        }
        "ping" => Request::Ping,
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(Failure::bad_request(format!("unknown op `{shown}`")));
        }
    })
}

/// `{"id": .., "result": ..}`.
pub fn reply(id: &RequestId, result: &impl Serialize) -> String {
    #[derive(Serialize)]
    struct Reply<'a, T> {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        result: &'a T,
    }
    // A request without `id` gets a reply without one, as errors do.
    let id = Some(id).filter(|v| !v.is_null());
    serde_json::to_string(&Reply { id, result }).expect("replies serialize")
}

/// `{"id": .., "error": {..}}`, without `id` when there is none.
pub fn error(id: Option<&RequestId>, failure: &Failure) -> String {
    #[derive(Serialize)]
    struct ErrorBody<'a> {
        code: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    }
    #[derive(Serialize)]
    struct ErrorFrame<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        error: ErrorBody<'a>,
    }
    serde_json::to_string(&ErrorFrame {
        id: id.filter(|v| !v.is_null()),
        error: ErrorBody {
            code: failure.code.as_str(),
            message: &failure.message,
            retry_after_ms: failure.retry_after_ms,
        },
    })
    .expect("errors serialize")
}

/// An event object as PROTOCOL.md shows it.
#[derive(Serialize)]
struct EventJson<'a> {
    chat: &'a str,
    seq: u64,
    kind: &'static str,
    sender: &'a str,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    added: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    removed: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    edited: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted: Option<bool>,
}

impl<'a> EventJson<'a> {
    fn new(event: &'a Event) -> EventJson<'a> {
        let mut out = EventJson {
            chat: &event.chat,
            seq: event.seq,
            kind: event.kind.name(),
            sender: &event.sender,
            ts: event.ts,
            cmid: None,
            body: None,
            file: None,
            target: None,
            added: None,
            removed: None,
            title: None,
            edited: None,
            deleted: None,
        };
        match &event.kind {
            EventKind::Message { cmid, body, file } => {
                out.cmid = Some(cmid);
                out.body = Some(body.as_deref());
                out.file = Some(file.as_deref());
            }
            EventKind::Edit { target, body } => {
                out.target = Some(*target);
                out.body = Some(Some(body));
            }
            EventKind::Delete { target } => out.target = Some(*target),
            EventKind::Members {
                added,
                removed,
                title,
            } => {
                out.added = Some(added);
                out.removed = Some(removed);
                out.title = Some(title.as_deref());
            }
        }
        out
    }

    fn history(h: &'a HistoryEvent) -> EventJson<'a> {
        let mut out = EventJson::new(&h.event);
        if matches!(h.event.kind, EventKind::Message { .. }) {
            out.edited = Some(h.edited);
            out.deleted = Some(h.deleted);
        }
        out
    }
}

/// `{"ev":"event","event":{..}}` for a live push.
pub fn event_push(event: &Event) -> String {
    push_of(EventJson::new(event))
}

/// `{"ev":"event","event":{..}}` for an event replayed on resume (with the history flags).
pub fn resume_push(event: &HistoryEvent) -> String {
    push_of(EventJson::history(event))
}

fn push_of(event: EventJson<'_>) -> String {
    #[derive(Serialize)]
    struct Push<'a> {
        ev: &'static str,
        event: EventJson<'a>,
    }
    serde_json::to_string(&Push { ev: "event", event }).expect("events serialize")
}

/// The result of `history`.
pub fn history_result(events: &[HistoryEvent], last_seq: u64, horizon: u64) -> impl Serialize {
    #[derive(Serialize)]
    struct HistoryResult<'a> {
        events: Vec<EventJson<'a>>,
        last_seq: u64,
        /// An addition: the first seq retention still keeps (1 when nothing was dropped).
        horizon: u64,
    }
    HistoryResult {
        events: events.iter().map(EventJson::history).collect(),
        last_seq,
        horizon,
    }
}

/// The result of `list_chats`.
pub fn chats_result(chats: &[ChatSummary]) -> Value {
    let chats: Vec<Value> = chats
        .iter()
        .map(|c| {
            serde_json::json!({
                "chat": c.chat,
                "title": c.title,
                "members": c.members,
                "last_seq": c.last_seq,
                "delivered": c.delivered,
                "read": c.read,
            })
        })
        .collect();
    serde_json::json!({ "chats": chats })
}

/// The result of `receipts`.
pub fn receipts_result(receipts: &[Receipt]) -> Value {
    let receipts: Vec<Value> = receipts
        .iter()
        .map(|r| serde_json::json!({"user": r.user, "delivered": r.delivered, "read": r.read}))
        .collect();
    serde_json::json!({ "receipts": receipts })
}

/// `{"ev":"receipt",..}`.
pub fn receipt_push(chat: &str, user: &str, delivered: u64, read: u64) -> String {
    serde_json::json!({"ev": "receipt", "chat": chat, "user": user, "delivered": delivered, "read": read})
        .to_string()
}

/// `{"ev":"presence",..}`.
pub fn presence_push(user: &str, online: bool, last_seen: Option<u64>) -> String {
    serde_json::json!({"ev": "presence", "user": user, "online": online, "last_seen": last_seen})
        .to_string()
}

/// `{"ev":"typing",..}`.
pub fn typing_push(chat: &str, user: &str) -> String {
    serde_json::json!({"ev": "typing", "chat": chat, "user": user}).to_string()
}

/// `{"ev":"welcome",..}`.
pub fn welcome(user: &str, device: &str) -> String {
    serde_json::json!({"ev": "welcome", "user": user, "device": device}).to_string()
}

/// `{"ev":"synced"}`.
pub const SYNCED: &str = r#"{"ev":"synced"}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_op() {
        let cases = [
            (r#"{"op":"hello","token":"t"}"#, "hello"),
            (
                r#"{"op":"create_chat","id":1,"members":["b"],"title":"x"}"#,
                "create_chat",
            ),
            (
                r#"{"op":"add_members","id":1,"chat":"g1","users":["b"]}"#,
                "add_members",
            ),
            (
                r#"{"op":"remove_members","id":1,"chat":"g1","users":["b"]}"#,
                "remove_members",
            ),
            (r#"{"op":"list_chats","id":"a"}"#, "list_chats"),
            (
                r#"{"op":"send","id":1,"chat":"g1","cmid":"m","body":"hi"}"#,
                "send",
            ),
            (
                r#"{"op":"edit","id":1,"chat":"g1","target":2,"body":"x"}"#,
                "edit",
            ),
            (r#"{"op":"delete","id":1,"chat":"g1","target":2}"#, "delete"),
            (
                r#"{"op":"history","id":1,"chat":"g1","before":9}"#,
                "history",
            ),
            (
                r#"{"op":"delivered","id":1,"chat":"g1","seq":3}"#,
                "delivered",
            ),
            (r#"{"op":"read","id":1,"chat":"g1","seq":3}"#, "read"),
            (r#"{"op":"receipts","id":1,"chat":"g1"}"#, "receipts"),
            (r#"{"op":"presence","id":1,"users":["a"]}"#, "presence"),
            (
                r#"{"op":"subscribe_presence","id":1,"users":["a"]}"#,
                "subscribe_presence",
            ),
            (r#"{"op":"typing","id":1,"chat":"g1"}"#, "typing"),
            (r#"{"op":"ping","id":1}"#, "ping"),
        ];
        for (text, op) in cases {
            let (_, request) = parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert_eq!(request.op(), op);
        }
    }

    #[test]
    fn errors_name_the_problem_and_keep_the_id() {
        let (id, f) = parse("{not json").unwrap_err();
        assert_eq!((id, f.code), (None, Code::BadRequest));
        let (id, f) = parse(r#"{"op":"nope","id":7}"#).unwrap_err();
        assert_eq!(id, Some(Value::from(7)));
        assert!(f.message.contains("unknown op `nope`"), "{}", f.message);
        let (id, f) = parse(r#"{"op":"send","id":"x","chat":5,"cmid":"m"}"#).unwrap_err();
        assert_eq!(id, Some(Value::from("x")));
        assert!(f.message.contains("field `chat`"), "{}", f.message);
        let (_, f) = parse(r#"{"op":"history","id":1,"chat":"c","limit":-1}"#).unwrap_err();
        assert!(f.message.contains("field `limit`"), "{}", f.message);
        let (_, f) = parse(r#"{"op":"edit","id":1,"chat":"c","target":1}"#).unwrap_err();
        assert!(f.message.contains("body"), "{}", f.message);
        let (id, f) = parse(r#"{"op":"ping","id":[1]}"#).unwrap_err();
        assert_eq!(id, None);
        assert!(f.message.contains("`id`"), "{}", f.message);
        let (_, f) = parse("[1,2]").unwrap_err();
        assert_eq!(f.code, Code::BadRequest);
        let users: Vec<String> = (0..257).map(|i| format!("u{i}")).collect();
        let text = serde_json::json!({"op":"presence","id":1,"users":users}).to_string();
        let (_, f) = parse(&text).unwrap_err();
        assert!(f.message.contains("at most 256"), "{}", f.message);
    }

    #[test]
    fn events_encode_as_the_contract_says() {
        let event = Event {
            chat: "g1".into(),
            seq: 3,
            ts: 10,
            sender: "alice".into(),
            kind: EventKind::Message {
                cmid: "m1".into(),
                body: Some("hi".into()),
                file: None,
            },
        };
        let v: Value = serde_json::from_str(&event_push(&event)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ev":"event","event":{"chat":"g1","seq":3,"kind":"message",
                "sender":"alice","ts":10,"cmid":"m1","body":"hi","file":null}})
        );
        let h = HistoryEvent {
            event: event.clone(),
            edited: true,
            deleted: false,
        };
        let v: Value = serde_json::from_str(&resume_push(&h)).unwrap();
        assert_eq!(v["event"]["edited"], true);
        assert_eq!(v["event"]["deleted"], false);
        let members = Event {
            kind: EventKind::Members {
                added: vec!["a".into()],
                removed: vec![],
                title: Some("t".into()),
            },
            ..event
        };
        let v: Value = serde_json::from_str(&event_push(&members)).unwrap();
        assert_eq!(v["event"]["added"], serde_json::json!(["a"]));
        assert_eq!(v["event"]["removed"], serde_json::json!([]));
        assert_eq!(v["event"]["title"], "t");
        assert!(v["event"].get("cmid").is_none());
    }

    #[test]
    fn engine_messages_do_not_repeat_the_code() {
        let f = Failure::from(chatlog::engine::ChatError::Forbidden(
            "only the sender".into(),
        ));
        assert_eq!(
            (f.code, f.message.as_str()),
            (Code::Forbidden, "only the sender")
        );
        let f = Failure::from(chatlog::engine::ChatError::NotFound("chat g9".into()));
        assert_eq!((f.code, f.message.as_str()), (Code::NotFound, "chat g9"));
    }

    #[test]
    fn error_frames_carry_retry_after_only_when_rate_limited() {
        let f = Failure {
            code: Code::RateLimited,
            message: "slow down".into(),
            retry_after_ms: Some(250),
        };
        let v: Value = serde_json::from_str(&error(Some(&Value::from(3)), &f)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":3,"error":{"code":"rate_limited","message":"slow down","retry_after_ms":250}})
        );
        let v: Value = serde_json::from_str(&error(None, &Failure::bad_request("x"))).unwrap();
        assert!(v.get("id").is_none());
    }
}
