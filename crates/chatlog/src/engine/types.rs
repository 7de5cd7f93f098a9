//! Identifiers, events and the records the engine writes to its log.

use serde::{Deserialize, Serialize};

use super::error::ChatError;

/// Longest user id, device id or cmid, in bytes.
pub const ID_BYTES_MAX: usize = 64;

/// Checks a user id: 1–64 chars of `A-Za-z0-9_.@-` (PROTOCOL.md).
pub fn check_user(user: &str) -> Result<(), ChatError> {
    check_id("user id", user)
}

/// Checks a device id (same alphabet as user ids).
pub fn check_device(device: &str) -> Result<(), ChatError> {
    check_id("device id", device)
}

fn check_id(what: &str, id: &str) -> Result<(), ChatError> {
    let ok = !id.is_empty()
        && id.len() <= ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ChatError::BadRequest(format!(
            "{what} must be 1-{ID_BYTES_MAX} characters of A-Za-z0-9_.@-"
        )))
    }
}

/// Checks a client message id: 1–64 characters (PROTOCOL.md; so up to 256 bytes of UTF-8).
pub fn check_cmid(cmid: &str) -> Result<(), ChatError> {
    if cmid.is_empty() || cmid.chars().count() > ID_BYTES_MAX {
        return Err(ChatError::BadRequest(format!(
            "cmid must be 1-{ID_BYTES_MAX} characters"
        )));
    }
    Ok(())
}

/// The id of the direct chat between two users: the same for the pair in either order.
pub fn direct_chat_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("d:{lo}:{hi}")
}

/// What an event is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A message. `cmid` is the sender's idempotency key.
    Message {
        /// Client message id.
        cmid: String,
        /// Text, if any.
        body: Option<String>,
        /// Attached file id, if any.
        file: Option<String>,
    },
    /// A new body for the message at `target`.
    Edit {
        /// Seq of the edited message.
        target: u64,
        /// The new text.
        body: String,
    },
    /// Deletion of the message at `target` (it stays as a tombstone).
    Delete {
        /// Seq of the deleted message.
        target: u64,
    },
    /// Membership change; the chat's first event adds everyone and carries the title.
    Members {
        /// Users added.
        added: Vec<String>,
        /// Users removed.
        removed: Vec<String>,
        /// Title, on creation.
        title: Option<String>,
    },
}

impl EventKind {
    /// The protocol name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Message { .. } => "message",
            EventKind::Edit { .. } => "edit",
            EventKind::Delete { .. } => "delete",
            EventKind::Members { .. } => "members",
        }
    }
}

/// One event of a chat's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Chat id.
    pub chat: String,
    /// Position in the chat: 1, 2, 3, … with no gaps.
    pub seq: u64,
    /// Server time in ms since the epoch.
    pub ts: u64,
    /// Who caused it.
    pub sender: String,
    /// What it is.
    pub kind: EventKind,
}

/// An event as history shows it: a message with its current body and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEvent {
    /// The event. For messages, `body` is the current text (the latest edit's; `None` once
    /// deleted).
    pub event: Event,
    /// The message has been edited.
    pub edited: bool,
    /// The message has been deleted.
    pub deleted: bool,
}

/// Metadata of an uploaded file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// File id (content-addressed by the server).
    pub id: String,
    /// Uploader.
    pub uploader: String,
    /// Size in bytes.
    pub size: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    /// MIME type given at upload.
    pub content_type: String,
}

/// A record of the engine's log. Everything in the indexes is derived from these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A chat event. A `Members` event with seq 1 creates the chat.
    Event {
        /// The event.
        event: Event,
        /// On creation: the creator and whether the chat is direct.
        created: Option<Creation>,
    },
    /// A device's cursor moved; carries the new device and user-level values.
    Cursor(CursorMove),
    /// A device was seen for the first time; it starts at these seqs.
    DeviceSeen {
        /// User.
        user: String,
        /// Device.
        device: String,
        /// (chat, seq) the device starts after.
        starts: Vec<(String, u64)>,
    },
    /// A file was uploaded.
    File(FileMeta),
    /// Retention: events of `chat` below `seq` are gone from history.
    Horizon {
        /// Chat.
        chat: String,
        /// First seq still kept.
        seq: u64,
    },
    /// Replication: every record before this one, back to the previous `Applied`, is the
    /// effect of one replicated group ([`super::Engine::apply_replicated`]). `marker` is opaque
    /// to the engine (the replication layer stores its last applied log id and membership in
    /// it). On open, a replicated engine cuts its log after the last `Applied` record, so a
    /// group is either wholly in the engine or not at all.
    Applied {
        /// The replication layer's bytes.
        marker: Vec<u8>,
    },
}

/// Facts fixed at chat creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creation {
    /// The creator (may remove anyone, delete any message).
    pub creator: String,
    /// Direct chat between two users.
    pub direct: bool,
}

/// A decided cursor move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorMove {
    /// Chat.
    pub chat: String,
    /// User.
    pub user: String,
    /// Device.
    pub device: String,
    /// The device's new cursor.
    pub cursor: Cursor,
    /// The user's new values: max over its devices.
    pub user_delivered: u64,
    /// The user's new read value: max over its devices.
    pub user_read: u64,
}

/// A device's position in a chat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Where the device started (first seen, not a receipt).
    pub start: u64,
    /// Everything up to here was delivered to the device.
    pub delivered: u64,
    /// Everything up to here was read on the device.
    pub read: u64,
}

impl Cursor {
    /// The seq after which the device resumes.
    pub fn resume_after(&self) -> u64 {
        self.start.max(self.delivered)
    }
}

/// One chat as `list_chats` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSummary {
    /// Chat id.
    pub chat: String,
    /// Title, if any.
    pub title: Option<String>,
    /// Current members, sorted.
    pub members: Vec<String>,
    /// Last seq.
    pub last_seq: u64,
    /// The caller's user-level delivered value.
    pub delivered: u64,
    /// The caller's user-level read value.
    pub read: u64,
}

/// A user's receipt values in a chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// User.
    pub user: String,
    /// Max delivered over the user's devices.
    pub delivered: u64,
    /// Max read over the user's devices.
    pub read: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_user("alice.b@x-y_z9").is_ok());
        assert!(check_user("").is_err());
        assert!(check_user("a b").is_err());
        assert!(check_user(&"a".repeat(65)).is_err());
        assert!(check_cmid("m-1").is_ok());
        assert!(check_cmid("").is_err());
        assert_eq!(
            direct_chat_id("bob", "alice"),
            direct_chat_id("alice", "bob")
        );
    }
}
