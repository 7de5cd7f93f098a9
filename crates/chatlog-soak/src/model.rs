//! What the server acknowledged, across every cycle: the reference the checks compare with.

use std::collections::BTreeMap;

/// (chat, sender, cmid): the dedup key of a send.
pub type SendKey = (String, String, String);
/// (chat, user).
pub type UserChat = (String, String);

/// An acknowledged `send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendAck {
    pub body: String,
    pub seq: u64,
    pub ts: u64,
}

/// An acknowledged event-appending op other than `send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpAck {
    Edit {
        sender: String,
        target: u64,
        body: String,
    },
    Delete {
        sender: String,
        target: u64,
    },
    Members {
        sender: String,
        added: Vec<String>,
        removed: Vec<String>,
    },
}

/// Counts of acknowledged ops (per cycle and in total).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub sends: u64,
    pub edits: u64,
    pub deletes: u64,
    pub cursor_moves: u64,
    pub member_changes: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.sends + self.edits + self.deletes + self.cursor_moves + self.member_changes
    }

    pub fn add(&mut self, other: &Counts) {
        self.sends += other.sends;
        self.edits += other.edits;
        self.deletes += other.deletes;
        self.cursor_moves += other.cursor_moves;
        self.member_changes += other.member_changes;
    }
}

/// Everything acknowledged so far. Shared by the load clients behind a mutex (never held
/// across an await).
#[derive(Debug, Default)]
pub struct Model {
    /// Acknowledged sends by dedup key.
    pub sends: BTreeMap<SendKey, SendAck>,
    /// Acknowledged edits, deletes and membership changes: (chat, seq) → op.
    pub ops: BTreeMap<(String, u64), OpAck>,
    /// Highest acknowledged (delivered, read) per (chat, user); `read` raises both.
    pub cursors: BTreeMap<UserChat, (u64, u64)>,
    /// Sends written but not acknowledged when the server died: retried after the restart.
    pub pending: BTreeMap<SendKey, String>,
    /// (delivered, read) per (chat, user) as reported at the last check: may never go back.
    pub observed: BTreeMap<UserChat, (u64, u64)>,
    /// `last_seq` per chat at the last check.
    pub last_seqs: BTreeMap<String, u64>,
    /// Acknowledged this cycle.
    pub cycle: Counts,
}

impl Model {
    pub fn cursor_acked(&mut self, chat: &str, user: &str, seq: u64, read: bool) {
        let c = self
            .cursors
            .entry((chat.to_owned(), user.to_owned()))
            .or_default();
        c.0 = c.0.max(seq);
        if read {
            c.1 = c.1.max(seq);
        }
        self.cycle.cursor_moves += 1;
    }

    /// Records an op acknowledged at `(chat, seq)`; a second op at the same place is itself a
    /// violation (two acknowledgements of one seq).
    pub fn op_acked(&mut self, chat: &str, seq: u64, op: OpAck) -> Result<(), String> {
        match &op {
            OpAck::Edit { .. } => self.cycle.edits += 1,
            OpAck::Delete { .. } => self.cycle.deletes += 1,
            OpAck::Members { .. } => self.cycle.member_changes += 1,
        }
        if let Some(old) = self.ops.insert((chat.to_owned(), seq), op.clone()) {
            return Err(format!(
                "{chat} seq {seq} acknowledged twice: {old:?} and {op:?}"
            ));
        }
        Ok(())
    }
}
