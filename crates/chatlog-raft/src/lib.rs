//! # chatlog-raft — replication for chatlog (not built yet)
//!
//! This crate will hold the `openraft` glue: `types.rs` (the type config), `log_store.rs`
//! (Raft log storage on [`chatlog::Log`], acknowledged through openraft's flush callback once
//! durable), `state_machine.rs` (the chat engine applying commands deterministically) and
//! `network.rs` (postcard over TCP between nodes). None of it exists yet; nothing here claims
//! to replicate anything.

/// What this crate provides today.
pub const STATUS: &str = "chatlog-raft: replication is not built yet (single-node only)";

#[cfg(test)]
mod tests {
    #[test]
    fn status_says_not_built() {
        assert!(super::STATUS.contains("not built"));
    }
}
