//! # chatlog-raft — replication for chatlog on openraft
//!
//! A cluster of 3 or 5 nodes agrees on one ordered log of chat operations through
//! [`openraft`]; every node applies it to its own [`chatlog::engine::Engine`], so every node
//! serves the same chats, seqs and history and publishes applied events to its own
//! subscribers (fanout across nodes needs no broker).
//!
//! - [`types`]: the openraft type configuration ([`Request`] = an engine operation with the
//!   proposer's timestamp).
//! - [`log_store`]: the Raft log on the project's segment log, acknowledged to openraft once
//!   `fdatasync`ed; vote and purge point in an atomically replaced `meta` file.
//! - [`state_machine`]: the engine as state machine (one engine group per apply, with the
//!   applied log id and membership stored in the same group); snapshots from a RocksDB
//!   checkpoint plus the engine log.
//! - [`network`]: openraft's network and the peer client, with injectable faults.
//! - [`wire`]: postcard messages in binary frames over one multiplexed TCP connection per peer.
//! - [`node`]: a running node: Raft, the peer server (frames, and HTTP `/raft/*`, `/admin/*`
//!   on the same port), and the
//!   proposer that turns the engine's writes into Raft writes (forwarded to the leader).
//! - [`cell`]: the node's current engine (replaced when a snapshot is installed).
//! - [`blobs`]: file attachments' bytes, content-addressed on every node, copied to a
//!   majority before an upload is acknowledged and fetched from a peer where missing.

// openraft's traits return its `StorageError` (224 bytes); our helpers return it too.
#![allow(clippy::result_large_err)]

pub mod blobs;
pub mod cell;
mod forward;
pub mod log_store;
pub mod network;
pub mod node;
pub mod snapshot_data;
pub mod state_machine;
pub mod types;
pub mod wire;

pub use cell::EngineCell;
pub use network::NetFaults;
pub use node::{ClusterConfig, ClusterNode, StartError};
pub use types::{NodeId, Request, Response, TypeConfig};

/// Names of the histograms (seconds unless said) that time the stages of a replicated write,
/// recorded through the `metrics` facade (the server exports them at `/metrics`).
pub mod stages {
    /// A proposer's wait from a write's arrival until its batch leaves the queue (on the
    /// leader: until one of the entries in flight is answered).
    pub const QUEUE: &str = "chatlog_raft_queue_seconds";
    /// Operations per Raft entry the leader proposes (a count, not seconds).
    pub const ENTRY_OPS: &str = "chatlog_raft_entry_ops";
    /// From proposing an entry on the leader until it is committed and applied there.
    pub const ENTRY: &str = "chatlog_raft_entry_seconds";
    /// From a Raft log append until its group commit is durable.
    pub const LOG_FLUSH: &str = "chatlog_raft_log_flush_seconds";
    /// Applying one batch of committed entries to the engine (durable and indexed).
    pub const APPLY: &str = "chatlog_raft_apply_seconds";
    /// On a follower: forwarding one batch to the leader until the leader answers (it answers
    /// once the entry is committed and applied there).
    pub const FORWARD: &str = "chatlog_raft_forward_seconds";
    /// After the leader's answer: waiting until this node applied the entry too, before its
    /// callers are answered (read-your-writes on this node).
    pub const APPLIED_WAIT: &str = "chatlog_raft_applied_wait_seconds";
    /// Applies paused while a snapshot's checkpoint begins (a RocksDB checkpoint and links to
    /// the engine log's sealed segments).
    pub const SNAPSHOT_PAUSE: &str = "chatlog_raft_snapshot_pause_seconds";
    /// Finishing a snapshot after that pause (copying the engine log's last segment, syncing
    /// it), while applies go on.
    pub const SNAPSHOT_BUILD: &str = "chatlog_raft_snapshot_build_seconds";
}

/// Names of the gauges that show a node's Raft state, set once a second
/// ([`node::ClusterNode::start`]): what an operator alerts on.
pub mod gauges {
    /// The current term.
    pub const TERM: &str = "chatlog_raft_term";
    /// The leader this node knows (its id; 0 if none).
    pub const LEADER: &str = "chatlog_raft_leader";
    /// 1 on the leader, 0 elsewhere.
    pub const IS_LEADER: &str = "chatlog_raft_is_leader";
    /// The last index in this node's Raft log.
    pub const LAST_LOG_INDEX: &str = "chatlog_raft_last_log_index";
    /// The last index this node applied to its engine.
    pub const LAST_APPLIED_INDEX: &str = "chatlog_raft_last_applied_index";
    /// Voters in the membership this node knows.
    pub const VOTERS: &str = "chatlog_raft_voters";
    /// On the leader, per other member (`peer` label): entries of the leader's log that it
    /// does not hold yet.
    pub const REPLICATION_LAG: &str = "chatlog_raft_replication_lag_entries";
    /// 1 while this node may start elections, 0 while the election guard holds it back
    /// (`node.rs::guard_elections`: it hears no leader and cannot reach a majority that hears
    /// none). Set at each of the guard's checks (10 a second by default).
    pub const CAMPAIGNING_ALLOWED: &str = "chatlog_raft_campaigning_allowed";
}
