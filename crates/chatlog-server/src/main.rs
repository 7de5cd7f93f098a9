//! chatlog-server — not built yet.
//!
//! The server (WebSocket protocol of PROTOCOL.md, auth, fanout, CLI) is a later issue. Until
//! then this binary says so and exits with a non-zero status instead of pretending to serve.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "chatlog-server {}: the WebSocket server is not built yet.\n\
         What exists today is the storage engine (crate `chatlog`): its durable segment log.\n\
         See README.md and docs/ARCHITECTURE.md for the current state.",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
