//! The openraft type configuration: what a Raft log entry carries and what applying it answers.

use chatlog::engine::{Op, Outcome, Refusal};
use serde::{Deserialize, Serialize};

/// Node ids are small integers given on the command line (`--node-id`).
pub type NodeId = u64;

/// A replicated write: engine operations, each with the time (ms) the proposing node gave it,
/// in the order they were proposed. One Raft entry carries every operation a node batched
/// while earlier entries were being committed. Every replica decides each operation with its
/// timestamp, so all assign the same `ts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The operations and their timestamps.
    pub ops: Vec<(Op, u64)>,
}

/// What applying a [`Request`] answered, one result per operation: the same on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Vec<Result<Outcome, Refusal>>);

openraft::declare_raft_types!(
    /// chatlog's Raft types: requests are engine operations, nodes are addressed by their
    /// replication address (`--peer-listen`), snapshots are byte bundles in files, packed when
    /// first read ([`crate::snapshot_data`]).
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::snapshot_data::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of a chatlog node.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// Membership as stored by the state machine.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
/// A storage error.
pub type StorageError = openraft::StorageError<NodeId>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;

/// Wraps any error as openraft's `AnyError`.
pub(crate) fn any<E: std::error::Error + 'static>(e: &E) -> openraft::AnyError {
    openraft::AnyError::new(e)
}
