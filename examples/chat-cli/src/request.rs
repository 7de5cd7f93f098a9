//! The client's requests and the JSON frames they become (PROTOCOL.md, "Ops").
//!
//! Pure: building a frame needs only the request and its id, so tests check the exact JSON.

use std::fmt;

use serde_json::{Value, json};

/// Most users one `presence` or `subscribe_presence` request may name (PROTOCOL.md).
pub const PRESENCE_USERS_MAX: usize = 256;

/// Largest `limit` the server honours for `history`; larger values are capped by it anyway.
pub const HISTORY_LIMIT_MAX: u32 = 500;

/// A chat id as the server spells it. The protocol leaves its JSON type open, so both strings
/// (`"g1"`, `"d:alice:bob"`) and integers are kept exactly as received and sent back the same
/// way.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChatId {
    /// A string id.
    Text(String),
    /// An integer id.
    Number(u64),
}

impl ChatId {
    /// The chat id in a server frame, if it is a string or a non-negative integer.
    pub fn from_json(value: Option<&Value>) -> Option<ChatId> {
        match value? {
            Value::String(s) => Some(ChatId::Text(s.clone())),
            Value::Number(n) => n.as_u64().map(ChatId::Number),
            _ => None,
        }
    }

    /// The JSON value to send for this chat.
    pub fn to_json(&self) -> Value {
        match self {
            ChatId::Text(s) => Value::String(s.clone()),
            ChatId::Number(n) => Value::from(*n),
        }
    }
}

impl fmt::Display for ChatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChatId::Text(s) => f.write_str(&crate::format::clean(s)),
            ChatId::Number(n) => write!(f, "{n}"),
        }
    }
}

/// One request the client can make, with everything needed to send it again after a
/// reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `list_chats`.
    ListChats,
    /// `create_chat`; `direct` asks for the one direct chat with a single other user.
    CreateChat {
        /// Title, if any.
        title: Option<String>,
        /// The other members (the caller is added by the server).
        members: Vec<String>,
        /// Whether this is a direct chat.
        direct: bool,
    },
    /// `add_members`.
    AddMembers {
        /// The chat.
        chat: ChatId,
        /// Users to add.
        users: Vec<String>,
    },
    /// `remove_members`.
    RemoveMembers {
        /// The chat.
        chat: ChatId,
        /// Users to remove.
        users: Vec<String>,
    },
    /// `send` of a text message.
    Send {
        /// The chat.
        chat: ChatId,
        /// Client message id: the same on every retry, so the server stores it once.
        cmid: String,
        /// The text.
        body: String,
    },
    /// `edit` of one of the caller's messages.
    Edit {
        /// The chat.
        chat: ChatId,
        /// Seq of the message.
        target: u64,
        /// The new text.
        body: String,
    },
    /// `delete` of a message.
    Delete {
        /// The chat.
        chat: ChatId,
        /// Seq of the message.
        target: u64,
    },
    /// `history`: the latest `limit` events, or those before `before`.
    History {
        /// The chat.
        chat: ChatId,
        /// Only events with a seq below this.
        before: Option<u64>,
        /// How many events at most.
        limit: u32,
        /// Whether the reply makes this the current chat (`/open`, and after `/create`).
        open: bool,
    },
    /// `delivered`: this device has everything up to `seq`.
    Delivered {
        /// The chat.
        chat: ChatId,
        /// Highest seq received.
        seq: u64,
    },
    /// `read`: the user has read everything up to `seq`.
    Read {
        /// The chat.
        chat: ChatId,
        /// Highest seq read.
        seq: u64,
    },
    /// `receipts` of every member.
    Receipts {
        /// The chat.
        chat: ChatId,
    },
    /// `presence` of some users.
    Presence {
        /// At most [`PRESENCE_USERS_MAX`] users.
        users: Vec<String>,
    },
    /// `subscribe_presence` to some users.
    SubscribePresence {
        /// At most [`PRESENCE_USERS_MAX`] users.
        users: Vec<String>,
    },
    /// `typing` in a chat.
    Typing {
        /// The chat.
        chat: ChatId,
    },
}

/// What to do with a request that was sent but not answered when the connection dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterDrop {
    /// Send it again on the next connection: repeating it cannot change anything twice
    /// (reads, cursor moves that only go forward, adding members, who are skipped when they
    /// already are, and `send`, deduplicated by its cmid).
    Resend,
    /// Forget it without a word: it only mattered at that moment (`typing`).
    Forget,
    /// Forget it and tell the user: it may or may not have been applied, and repeating it
    /// could apply it twice (a second chat, a second edit event).
    Unknown,
}

impl Request {
    /// The protocol's name of this request.
    pub fn op(&self) -> &'static str {
        match self {
            Request::ListChats => "list_chats",
            Request::CreateChat { .. } => "create_chat",
            Request::AddMembers { .. } => "add_members",
            Request::RemoveMembers { .. } => "remove_members",
            Request::Send { .. } => "send",
            Request::Edit { .. } => "edit",
            Request::Delete { .. } => "delete",
            Request::History { .. } => "history",
            Request::Delivered { .. } => "delivered",
            Request::Read { .. } => "read",
            Request::Receipts { .. } => "receipts",
            Request::Presence { .. } => "presence",
            Request::SubscribePresence { .. } => "subscribe_presence",
            Request::Typing { .. } => "typing",
        }
    }

    /// What to do with this request if the connection drops before its reply.
    pub fn after_drop(&self) -> AfterDrop {
        match self {
            Request::ListChats
            | Request::AddMembers { .. }
            | Request::Send { .. }
            | Request::History { .. }
            | Request::Delivered { .. }
            | Request::Read { .. }
            | Request::Receipts { .. }
            | Request::Presence { .. }
            | Request::SubscribePresence { .. } => AfterDrop::Resend,
            Request::Typing { .. } => AfterDrop::Forget,
            Request::CreateChat { .. }
            | Request::RemoveMembers { .. }
            | Request::Edit { .. }
            | Request::Delete { .. } => AfterDrop::Unknown,
        }
    }

    /// The frame to send for this request under request id `id`.
    pub fn to_frame(&self, id: u64) -> Value {
        let mut frame = json!({"op": self.op(), "id": id});
        let fields = match self {
            Request::ListChats => json!({}),
            Request::CreateChat {
                title,
                members,
                direct,
            } => {
                let mut fields = json!({"members": members});
                if let Some(title) = title {
                    fields["title"] = json!(title);
                }
                if *direct {
                    fields["direct"] = json!(true);
                }
                fields
            }
            Request::AddMembers { chat, users } | Request::RemoveMembers { chat, users } => {
                json!({"chat": chat.to_json(), "users": users})
            }
            Request::Send { chat, cmid, body } => {
                json!({"chat": chat.to_json(), "cmid": cmid, "body": body})
            }
            Request::Edit { chat, target, body } => {
                json!({"chat": chat.to_json(), "target": target, "body": body})
            }
            Request::Delete { chat, target } => json!({"chat": chat.to_json(), "target": target}),
            Request::History {
                chat,
                before,
                limit,
                open: _,
            } => {
                let mut fields = json!({"chat": chat.to_json(), "limit": limit});
                if let Some(before) = before {
                    fields["before"] = json!(before);
                }
                fields
            }
            Request::Delivered { chat, seq } | Request::Read { chat, seq } => {
                json!({"chat": chat.to_json(), "seq": seq})
            }
            Request::Receipts { chat } | Request::Typing { chat } => {
                json!({"chat": chat.to_json()})
            }
            Request::Presence { users } | Request::SubscribePresence { users } => {
                json!({"users": users})
            }
        };
        if let (Some(frame), Value::Object(fields)) = (frame.as_object_mut(), fields) {
            frame.extend(fields);
        }
        frame
    }
}

/// The first frame of every connection. The device id stays the same across reconnects so the
/// server resumes from this device's `delivered` cursor.
pub fn hello(token: &str, device: &str) -> Value {
    json!({"op": "hello", "token": token, "device": device})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g1() -> ChatId {
        ChatId::Text("g1".to_owned())
    }

    #[test]
    fn hello_frame() {
        assert_eq!(
            hello("tok", "laptop"),
            json!({"op":"hello","token":"tok","device":"laptop"})
        );
    }

    #[test]
    fn frames_match_the_protocol() {
        let cases = [
            (Request::ListChats, json!({"op":"list_chats","id":1})),
            (
                Request::CreateChat {
                    title: Some("Team".into()),
                    members: vec!["bob".into(), "carol".into()],
                    direct: false,
                },
                json!({"op":"create_chat","id":1,"title":"Team","members":["bob","carol"]}),
            ),
            (
                Request::CreateChat {
                    title: None,
                    members: vec!["bob".into()],
                    direct: true,
                },
                json!({"op":"create_chat","id":1,"members":["bob"],"direct":true}),
            ),
            (
                Request::AddMembers {
                    chat: g1(),
                    users: vec!["dan".into()],
                },
                json!({"op":"add_members","id":1,"chat":"g1","users":["dan"]}),
            ),
            (
                Request::RemoveMembers {
                    chat: g1(),
                    users: vec!["dan".into()],
                },
                json!({"op":"remove_members","id":1,"chat":"g1","users":["dan"]}),
            ),
            (
                Request::Send {
                    chat: g1(),
                    cmid: "c-1".into(),
                    body: "hi".into(),
                },
                json!({"op":"send","id":1,"chat":"g1","cmid":"c-1","body":"hi"}),
            ),
            (
                Request::Edit {
                    chat: g1(),
                    target: 3,
                    body: "fixed".into(),
                },
                json!({"op":"edit","id":1,"chat":"g1","target":3,"body":"fixed"}),
            ),
            (
                Request::Delete {
                    chat: g1(),
                    target: 3,
                },
                json!({"op":"delete","id":1,"chat":"g1","target":3}),
            ),
            (
                Request::History {
                    chat: g1(),
                    before: None,
                    limit: 20,
                    open: true,
                },
                json!({"op":"history","id":1,"chat":"g1","limit":20}),
            ),
            (
                Request::History {
                    chat: g1(),
                    before: Some(41),
                    limit: 20,
                    open: false,
                },
                json!({"op":"history","id":1,"chat":"g1","limit":20,"before":41}),
            ),
            (
                Request::Delivered { chat: g1(), seq: 7 },
                json!({"op":"delivered","id":1,"chat":"g1","seq":7}),
            ),
            (
                Request::Read { chat: g1(), seq: 7 },
                json!({"op":"read","id":1,"chat":"g1","seq":7}),
            ),
            (
                Request::Receipts { chat: g1() },
                json!({"op":"receipts","id":1,"chat":"g1"}),
            ),
            (
                Request::Presence {
                    users: vec!["bob".into()],
                },
                json!({"op":"presence","id":1,"users":["bob"]}),
            ),
            (
                Request::SubscribePresence {
                    users: vec!["bob".into()],
                },
                json!({"op":"subscribe_presence","id":1,"users":["bob"]}),
            ),
            (
                Request::Typing { chat: g1() },
                json!({"op":"typing","id":1,"chat":"g1"}),
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(request.to_frame(1), expected, "{request:?}");
        }
    }

    #[test]
    fn numeric_chat_ids_are_sent_back_as_numbers() {
        let chat = ChatId::from_json(Some(&json!(42))).unwrap();
        assert_eq!(chat, ChatId::Number(42));
        assert_eq!(
            Request::Receipts { chat }.to_frame(9),
            json!({"op":"receipts","id":9,"chat":42})
        );
        assert_eq!(ChatId::from_json(Some(&json!(-1))), None);
        assert_eq!(ChatId::from_json(Some(&json!(null))), None);
        assert_eq!(ChatId::from_json(None), None);
    }

    #[test]
    fn only_repeat_safe_requests_are_resent_after_a_drop() {
        let send = Request::Send {
            chat: g1(),
            cmid: "c".into(),
            body: "b".into(),
        };
        assert_eq!(send.after_drop(), AfterDrop::Resend);
        let edit = Request::Edit {
            chat: g1(),
            target: 1,
            body: "b".into(),
        };
        assert_eq!(edit.after_drop(), AfterDrop::Unknown);
        assert_eq!(
            Request::Typing { chat: g1() }.after_drop(),
            AfterDrop::Forget
        );
    }
}
