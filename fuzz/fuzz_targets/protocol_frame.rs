//! The server's client-frame parser, `chatlog_server::protocol::parse`, on untrusted text, and
//! the `error`/`reply`/`event_push` encoders.
//!
//! Every input is checked against a small model of the request table in docs/protocol.md
//! ([`model`]): a frame that is not a JSON object, or whose `id`, `op` or fields are missing
//! or of the wrong type, must fail with `bad_request` and a message (echoing the `id` when it
//! could be read); any other frame must parse to exactly the request the model builds. What
//! parses must also re-encode to a frame that parses to the same request, and every reply or
//! error frame the server would send for it must be JSON that reads back to what was encoded.
//!
//! Inputs whose first byte is `0xFF` (never part of UTF-8 text) are read as a *description* of
//! a frame instead ([`Frame`]): an `op` from the real names, an `id` of any type, and fields
//! with the real names (or random ones) holding values of the right type or of any type, so the
//! fuzzer reaches the per-op field parsing without first learning the op names. The frame is
//! written as text key by key, so it may also repeat keys. Any other input is used as the
//! frame's text as it is (when it is UTF-8).

#![no_main]

use std::collections::HashMap;

use arbitrary::{Result, Unstructured};
use chatlog::engine::{Event, EventKind};
use chatlog_fuzz::server_protocol::{
    self as protocol, Code, Failure, PRESENCE_USERS_MAX, Request, RequestId,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

/// Every op name of the protocol, as `Request::op` returns them.
const OPS: [&str; 17] = [
    "hello",
    "create_chat",
    "add_members",
    "remove_members",
    "list_chats",
    "send",
    "edit",
    "delete",
    "history",
    "delivered",
    "read",
    "receipts",
    "presence",
    "subscribe_presence",
    "unsubscribe_presence",
    "typing",
    "ping",
];

/// Every field name some op reads, plus the two the frame itself has.
const FIELDS: [&str; 18] = [
    "token", "device", "since", "members", "title", "direct", "chat", "users", "cmid", "body",
    "file", "target", "before", "after", "limit", "seq", "id", "op",
];

/// Most fields in one described frame (besides `id` and `op`).
const FRAME_FIELDS_MAX: usize = 10;
/// Nesting of arbitrary JSON values in a described frame.
const VALUE_DEPTH_MAX: u32 = 3;
/// Most elements of an arbitrary JSON array or object.
const VALUE_ITEMS_MAX: usize = 4;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0xFF, rest)) => {
            let mut u = Unstructured::new(rest);
            if let Ok(text) = described_frame(&mut u) {
                check_frame(&text);
            }
            // Running out of input part-way through is fine: what was built was checked.
            let _ = check_encoders(&mut u);
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(data) {
                check_frame(text);
            }
        }
    }
});

/// Parses `text`, compares the result with the model, and checks the replies built from it.
fn check_frame(text: &str) {
    let parsed = protocol::parse(text);
    if trace() {
        eprintln!("parse {text:?}: {parsed:?}");
    }
    let expected = match serde_json::from_str::<Value>(text) {
        Ok(value) => model(&value),
        Err(_) => Err(None),
    };
    match (&parsed, &expected) {
        (Ok((id, request)), Ok((model_id, model_request))) => {
            assert_eq!(
                (id, request),
                (model_id, model_request),
                "parsed request differs from the model for {text:?}"
            );
            check_request(text, id, request);
        }
        (Err((echo, failure)), Err(model_echo)) => {
            assert_eq!(
                echo, model_echo,
                "wrong id echoed in the error for {text:?}"
            );
            check_parse_failure(text, failure);
            check_error_frame(echo.as_ref(), failure);
        }
        _ => {
            panic!("parse and model disagree for {text:?}:\nparse: {parsed:?}\nmodel: {expected:?}")
        }
    }
}

/// A parse failure is always `bad_request` with a message and no retry hint.
fn check_parse_failure(text: &str, failure: &Failure) {
    assert_eq!(
        failure.code,
        Code::BadRequest,
        "a parse failure must be bad_request: {text:?} gave {failure:?}"
    );
    assert!(
        !failure.message.is_empty(),
        "empty error message for {text:?}"
    );
    assert_eq!(failure.retry_after_ms, None);
}

/// Invariants of a parsed request that hold whatever the model says, then a re-encode.
fn check_request(text: &str, id: &RequestId, request: &Request) {
    assert!(
        matches!(id, Value::Null | Value::Number(_) | Value::String(_)),
        "id of another type accepted: {id:?}"
    );
    let op = request.op();
    assert!(OPS.contains(&op), "unknown op name {op:?}");
    let frame: Value = serde_json::from_str(text).expect("a parsed frame is JSON");
    assert_eq!(frame.get("op").and_then(Value::as_str), Some(op));
    match request {
        Request::Presence { users }
        | Request::SubscribePresence { users }
        | Request::UnsubscribePresence { users } => assert!(
            users.len() <= PRESENCE_USERS_MAX,
            "{} users accepted in `{op}`",
            users.len()
        ),
        Request::Mark { read, .. } => assert_eq!(*read, op == "read"),
        _ => {}
    }

    // The request written back as a frame parses to the same request (ids compared as JSON
    // numbers: serde_json's default float parsing may move a float by one unit in the last place).
    let again = encode_request(id, request).to_string();
    match protocol::parse(&again) {
        Ok((id_again, request_again)) => {
            assert_eq!(&request_again, request, "re-encoded {again:?}");
            assert!(
                json_eq(&id_again, id),
                "id {id:?} came back as {id_again:?}"
            );
        }
        Err(e) => panic!("the re-encoded request {again:?} does not parse: {e:?}"),
    }

    // The replies the server would send for it.
    let result = json!({"ok": true, "seq": 7});
    let reply: Value = serde_json::from_str(&protocol::reply(id, &result)).expect("reply is JSON");
    let mut expected = Map::new();
    if !id.is_null() {
        expected.insert("id".into(), id.clone());
    }
    expected.insert("result".into(), result);
    assert!(
        json_eq(&reply, &Value::Object(expected)),
        "reply frame {reply}"
    );
    check_error_frame(
        Some(id),
        &Failure::new(Code::Forbidden, format!("not a member of {op}")),
    );
}

/// `protocol::error` writes JSON that reads back as the failure, with the id only when there is
/// one.
fn check_error_frame(id: Option<&RequestId>, failure: &Failure) {
    let text = protocol::error(id, failure);
    let value: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error frame {text:?} is not JSON: {e}"));
    let mut body = Map::new();
    body.insert("code".into(), failure.code.as_str().into());
    body.insert("message".into(), failure.message.clone().into());
    if let Some(ms) = failure.retry_after_ms {
        body.insert("retry_after_ms".into(), ms.into());
    }
    let mut expected = Map::new();
    if let Some(id) = id.filter(|id| !id.is_null()) {
        expected.insert("id".into(), id.clone());
    }
    expected.insert("error".into(), Value::Object(body));
    assert!(
        json_eq(&value, &Value::Object(expected)),
        "error frame {text:?} for id {id:?} and {failure:?}"
    );
}

/// The encoders on arbitrary values: what they write must read back as what they were given.
fn check_encoders(u: &mut Unstructured<'_>) -> Result<()> {
    let id = match u.int_in_range(0u8..=2)? {
        0 => None,
        1 => Some(id_value(u)?),
        _ => Some(any_value(u, VALUE_DEPTH_MAX)?),
    };
    let codes = [
        Code::BadRequest,
        Code::Unauthorized,
        Code::Forbidden,
        Code::NotFound,
        Code::TooLarge,
        Code::TooManyMembers,
        Code::RateLimited,
        Code::Unavailable,
        Code::Internal,
    ];
    let failure = Failure {
        code: *u.choose(&codes)?,
        message: u.arbitrary()?,
        retry_after_ms: u.arbitrary()?,
    };
    check_error_frame(id.as_ref(), &failure);

    let result = any_value(u, VALUE_DEPTH_MAX)?;
    let reply_id = id.unwrap_or(Value::Null);
    let text = protocol::reply(&reply_id, &result);
    let value: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("reply {text:?} is not JSON: {e}"));
    let mut expected = Map::new();
    if !reply_id.is_null() {
        expected.insert("id".into(), reply_id.clone());
    }
    expected.insert("result".into(), result);
    assert!(json_eq(&value, &Value::Object(expected)), "reply {text:?}");

    let event = Event {
        chat: some_string(u)?,
        seq: u.arbitrary()?,
        ts: u.arbitrary()?,
        sender: some_string(u)?,
        kind: match u.int_in_range(0u8..=3)? {
            0 => EventKind::Message {
                cmid: some_string(u)?,
                body: u.arbitrary()?,
                file: u.arbitrary()?,
            },
            1 => EventKind::Edit {
                target: u.arbitrary()?,
                body: u.arbitrary()?,
            },
            2 => EventKind::Delete {
                target: u.arbitrary()?,
            },
            _ => EventKind::Members {
                added: u.arbitrary()?,
                removed: u.arbitrary()?,
                title: u.arbitrary()?,
            },
        },
    };
    let text = protocol::event_push(&event);
    let push: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("event push {text:?} is not JSON: {e}"));
    assert_eq!(
        push,
        json!({"ev": "event", "event": event_json(&event)}),
        "{text:?}"
    );
    Ok(())
}

/// The event object of docs/protocol.md "Event object", written from the table.
fn event_json(event: &Event) -> Value {
    let mut out = json!({
        "chat": event.chat,
        "seq": event.seq,
        "kind": event.kind.name(),
        "sender": event.sender,
        "ts": event.ts,
    });
    let map = out.as_object_mut().expect("an object");
    match &event.kind {
        EventKind::Message { cmid, body, file } => {
            map.insert("cmid".into(), json!(cmid));
            map.insert("body".into(), json!(body));
            map.insert("file".into(), json!(file));
        }
        EventKind::Edit { target, body } => {
            map.insert("target".into(), json!(target));
            map.insert("body".into(), json!(body));
        }
        EventKind::Delete { target } => {
            map.insert("target".into(), json!(target));
        }
        EventKind::Members {
            added,
            removed,
            title,
        } => {
            map.insert("added".into(), json!(added));
            map.insert("removed".into(), json!(removed));
            map.insert("title".into(), json!(title));
        }
    }
    out
}

/// `CHATLOG_FUZZ_TRACE=1` prints each frame and what `parse` said (to read a crash input).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("CHATLOG_FUZZ_TRACE").is_some())
}

// ---------------------------------------------------------------------------------------------
// The model: the request table of docs/protocol.md over a parsed JSON value.
// ---------------------------------------------------------------------------------------------

/// The request a frame must parse to, or the id its error must echo (`None`: no id).
///
/// Written from docs/protocol.md: a frame is an object; `id` is absent, null, a number or a
/// string (another type is refused without echo); `op` is a known string; unknown fields are
/// ignored; a field of type "string or null" (or an optional one) may be absent or null; a
/// required field must be present with its type; integers are non-negative 64-bit; lists of
/// users in `presence`, `subscribe_presence` and `unsubscribe_presence` hold at most
/// `PRESENCE_USERS_MAX` entries.
fn model(frame: &Value) -> std::result::Result<(RequestId, Request), Option<RequestId>> {
    let Value::Object(map) = frame else {
        return Err(None);
    };
    let id = match map.get("id") {
        None | Some(Value::Null) => Value::Null,
        Some(id @ (Value::Number(_) | Value::String(_))) => id.clone(),
        Some(_) => return Err(None),
    };
    let echo = Some(id.clone()).filter(|id| !id.is_null());
    let Some(Value::String(op)) = map.get("op") else {
        return Err(echo);
    };
    let f = Fields(map);
    let request = match op.as_str() {
        "hello" => (|| {
            Some(Request::Hello {
                token: f.string("token")?,
                device: f.optional_string("device")?,
                since: f.since()?,
            })
        })(),
        "create_chat" => (|| {
            Some(Request::CreateChat {
                members: f.optional_users("members")?,
                title: f.optional_string("title")?,
                direct: f.optional_bool("direct")?.unwrap_or(false),
            })
        })(),
        "add_members" => (|| {
            Some(Request::AddMembers {
                chat: f.string("chat")?,
                users: f.users("users")?,
            })
        })(),
        "remove_members" => (|| {
            Some(Request::RemoveMembers {
                chat: f.string("chat")?,
                users: f.users("users")?,
            })
        })(),
        "list_chats" => Some(Request::ListChats),
        "send" => (|| {
            Some(Request::Send {
                chat: f.string("chat")?,
                cmid: f.string("cmid")?,
                body: f.optional_string("body")?,
                file: f.optional_string("file")?,
            })
        })(),
        "edit" => (|| {
            Some(Request::Edit {
                chat: f.string("chat")?,
                target: f.integer("target")?,
                body: f.string("body")?,
            })
        })(),
        "delete" => (|| {
            Some(Request::Delete {
                chat: f.string("chat")?,
                target: f.integer("target")?,
            })
        })(),
        "history" => (|| {
            Some(Request::History {
                chat: f.string("chat")?,
                before: f.optional_integer("before")?,
                after: f.optional_integer("after")?,
                limit: f.optional_integer("limit")?,
            })
        })(),
        "delivered" | "read" => (|| {
            Some(Request::Mark {
                chat: f.string("chat")?,
                seq: f.integer("seq")?,
                read: op == "read",
            })
        })(),
        "receipts" => f.string("chat").map(|chat| Request::Receipts { chat }),
        "presence" => f.bounded_users().map(|users| Request::Presence { users }),
        "subscribe_presence" => f
            .bounded_users()
            .map(|users| Request::SubscribePresence { users }),
        "unsubscribe_presence" => f
            .bounded_users()
            .map(|users| Request::UnsubscribePresence { users }),
        "typing" => f.string("chat").map(|chat| Request::Typing { chat }),
        "ping" => Some(Request::Ping),
        _ => None,
    };
    request.map(|request| (id, request)).ok_or(echo)
}

/// Typed reads of a frame's fields; `None` means the frame must be refused.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn string(&self, name: &str) -> Option<String> {
        self.0.get(name)?.as_str().map(str::to_owned)
    }

    fn optional_string(&self, name: &str) -> Option<Option<String>> {
        match self.0.get(name) {
            None | Some(Value::Null) => Some(None),
            Some(Value::String(s)) => Some(Some(s.clone())),
            Some(_) => None,
        }
    }

    fn integer(&self, name: &str) -> Option<u64> {
        self.0.get(name)?.as_u64()
    }

    fn optional_integer(&self, name: &str) -> Option<Option<u64>> {
        match self.0.get(name) {
            None | Some(Value::Null) => Some(None),
            Some(v) => v.as_u64().map(Some),
        }
    }

    fn optional_bool(&self, name: &str) -> Option<Option<bool>> {
        match self.0.get(name) {
            None | Some(Value::Null) => Some(None),
            Some(v) => v.as_bool().map(Some),
        }
    }

    /// A required list of strings.
    fn users(&self, name: &str) -> Option<Vec<String>> {
        self.0
            .get(name)?
            .as_array()?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// A list of strings that defaults to empty when absent (`null` is not a list).
    fn optional_users(&self, name: &str) -> Option<Vec<String>> {
        if self.0.contains_key(name) {
            self.users(name)
        } else {
            Some(Vec::new())
        }
    }

    /// `users` of the presence ops: required, at most `PRESENCE_USERS_MAX`.
    fn bounded_users(&self) -> Option<Vec<String>> {
        self.users("users")
            .filter(|users| users.len() <= PRESENCE_USERS_MAX)
    }

    /// `since` of `hello`: absent, null, or an object of non-negative integers.
    fn since(&self) -> Option<HashMap<String, u64>> {
        match self.0.get("since") {
            None | Some(Value::Null) => Some(HashMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(chat, seq)| seq.as_u64().map(|seq| (chat.clone(), seq)))
                .collect(),
            Some(_) => None,
        }
    }
}

/// A request written back as a frame, with only the fields it has.
fn encode_request(id: &RequestId, request: &Request) -> Value {
    let mut frame = match request {
        Request::Hello {
            token,
            device,
            since,
        } => json!({"token": token, "device": device, "since": since}),
        Request::CreateChat {
            members,
            title,
            direct,
        } => json!({"members": members, "title": title, "direct": direct}),
        Request::AddMembers { chat, users } | Request::RemoveMembers { chat, users } => {
            json!({"chat": chat, "users": users})
        }
        Request::ListChats | Request::Ping => json!({}),
        Request::Send {
            chat,
            cmid,
            body,
            file,
        } => json!({"chat": chat, "cmid": cmid, "body": body, "file": file}),
        Request::Edit { chat, target, body } => {
            json!({"chat": chat, "target": target, "body": body})
        }
        Request::Delete { chat, target } => json!({"chat": chat, "target": target}),
        Request::History {
            chat,
            before,
            after,
            limit,
        } => json!({"chat": chat, "before": before, "after": after, "limit": limit}),
        Request::Mark { chat, seq, .. } => json!({"chat": chat, "seq": seq}),
        Request::Receipts { chat } | Request::Typing { chat } => json!({"chat": chat}),
        Request::Presence { users }
        | Request::SubscribePresence { users }
        | Request::UnsubscribePresence { users } => json!({"users": users}),
        // A new op must be added here and to the model.
        #[allow(unreachable_patterns)]
        _ => panic!("encode_request does not know {request:?}"),
    };
    let map = frame.as_object_mut().expect("an object");
    map.insert("op".into(), request.op().into());
    if !id.is_null() {
        map.insert("id".into(), id.clone());
    }
    frame
}

/// JSON equality, except that floats may differ by a few units in the last place (serde_json's
/// default float parsing is not exact, so a float written and read back may move).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                let (Some(x), Some(y)) = (x.as_f64(), y.as_f64()) else {
                    return false;
                };
                x == y
                    || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
                    || (x - y).abs() <= 4.0 * f64::from_bits(1)
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

// ---------------------------------------------------------------------------------------------
// Described frames.
// ---------------------------------------------------------------------------------------------

/// Builds the text of a frame from a description: `op`, `id`, then fields, key by key.
fn described_frame(u: &mut Unstructured<'_>) -> Result<String> {
    let mut pairs: Vec<(String, Value)> = Vec::new();
    // `op`: a real name mostly; sometimes any string, another type, or none.
    match u.int_in_range(0u8..=15)? {
        0 => {}
        1 => pairs.push(("op".into(), any_value(u, 1)?)),
        2 => pairs.push(("op".into(), Value::String(u.arbitrary()?))),
        _ => pairs.push(("op".into(), (*u.choose(&OPS)?).into())),
    }
    match u.int_in_range(0u8..=5)? {
        0 => {}
        1 => pairs.push(("id".into(), any_value(u, 1)?)),
        _ => pairs.push(("id".into(), id_value(u)?)),
    }
    let fields = u.int_in_range(0..=FRAME_FIELDS_MAX)?;
    for _ in 0..fields {
        let name: String = if u.ratio(1u8, 8)? {
            u.arbitrary()?
        } else {
            (*u.choose(&FIELDS)?).into()
        };
        let value = if u.ratio(3u8, 4)? {
            typed_value(u, &name)?
        } else {
            any_value(u, VALUE_DEPTH_MAX)?
        };
        pairs.push((name, value));
    }
    // Shuffle a little so `op` and `id` are not always first.
    if pairs.len() > 1 {
        let a = u.choose_index(pairs.len())?;
        let b = u.choose_index(pairs.len())?;
        pairs.swap(a, b);
    }
    let spacing = if u.arbitrary()? { " " } else { "" };
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}:{spacing}{v}", Value::String(k.clone())))
        .collect();
    Ok(format!("{{{}}}", body.join(&format!(",{spacing}"))))
}

/// A value of the type the named field has (sometimes `null`), so per-op parsing succeeds often.
fn typed_value(u: &mut Unstructured<'_>, name: &str) -> Result<Value> {
    if u.ratio(1u8, 10)? {
        return Ok(Value::Null);
    }
    Ok(match name {
        "token" | "device" | "chat" | "cmid" | "body" | "file" | "title" | "op" => {
            some_string(u)?.into()
        }
        "target" | "before" | "after" | "limit" | "seq" => integer(u)?,
        "direct" => Value::Bool(u.arbitrary()?),
        "users" | "members" => {
            let len = match u.int_in_range(0u8..=7)? {
                0 => PRESENCE_USERS_MAX - 1 + u.int_in_range(0..=2)?,
                1 => u.int_in_range(0..=2 * PRESENCE_USERS_MAX)?,
                _ => u.int_in_range(0..=4)?,
            };
            let mut users = Vec::with_capacity(len);
            for i in 0..len {
                // Long lists are cheap to describe: generated names, sometimes one of another type.
                users.push(if len > 8 {
                    Value::String(format!("u{i}"))
                } else if u.ratio(1u8, 16)? {
                    any_value(u, 0)?
                } else {
                    some_string(u)?.into()
                });
            }
            Value::Array(users)
        }
        "since" => {
            let len = u.int_in_range(0..=VALUE_ITEMS_MAX)?;
            let mut map = Map::new();
            for _ in 0..len {
                let seq = if u.ratio(1u8, 8)? {
                    any_value(u, 0)?
                } else {
                    integer(u)?
                };
                map.insert(some_string(u)?, seq);
            }
            Value::Object(map)
        }
        "id" => id_value(u)?,
        _ => any_value(u, VALUE_DEPTH_MAX)?,
    })
}

/// An `id`: an integer, a negative one, a float, a string, or null.
fn id_value(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0u8..=5)? {
        0 => Value::Null,
        1 => (-(u.int_in_range(1i64..=i64::MAX)?)).into(),
        2 => float(u)?,
        3 | 4 => some_string(u)?.into(),
        _ => integer(u)?,
    })
}

/// An integer for a field that wants a non-negative one: often at an edge, sometimes negative.
fn integer(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 => u64::MAX.into(),
        1 => (i64::MAX as u64 + u.int_in_range(0..=1)?).into(),
        2 => (-(u.int_in_range(1i64..=3)?)).into(),
        3 => u.arbitrary::<u64>()?.into(),
        _ => u.int_in_range(0u64..=10)?.into(),
    })
}

/// A finite float (JSON has no NaN or infinity).
fn float(u: &mut Unstructured<'_>) -> Result<Value> {
    let x: f64 = u.arbitrary()?;
    Ok(serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number))
}

/// A string: a plausible id, an edge-length id, or arbitrary text.
fn some_string(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => u.arbitrary()?,
        1 => "a".repeat(64 + u.int_in_range(0..=1)?),
        _ => {
            const ALPHABET: &[u8] = b"abcxyz019_.@- ";
            let len = u.int_in_range(0..=6)?;
            let mut s = String::with_capacity(len);
            for _ in 0..len {
                s.push(char::from(*u.choose(ALPHABET)?));
            }
            s
        }
    })
}

/// Any JSON value, nested at most `depth` deep.
fn any_value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let kinds = if depth == 0 { 5 } else { 7 };
    Ok(match u.int_in_range(0..=kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => integer(u)?,
        3 => float(u)?,
        4 | 5 => some_string(u)?.into(),
        6 => {
            let len = u.int_in_range(0..=VALUE_ITEMS_MAX)?;
            let mut items = Vec::with_capacity(len);
            for _ in 0..len {
                items.push(any_value(u, depth - 1)?);
            }
            Value::Array(items)
        }
        _ => {
            let len = u.int_in_range(0..=VALUE_ITEMS_MAX)?;
            let mut map = Map::new();
            for _ in 0..len {
                let key = if u.arbitrary()? {
                    (*u.choose(&FIELDS)?).to_owned()
                } else {
                    some_string(u)?
                };
                map.insert(key, any_value(u, depth - 1)?);
            }
            Value::Object(map)
        }
    })
}
