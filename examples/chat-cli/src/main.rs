//! # chat-cli — an interactive terminal client for `chatlog-server`
//!
//! A small line-oriented client for people trying the server: type commands or plain text,
//! and see messages, receipts, presence and typing notices as they arrive. It speaks the
//! public protocol of `PROTOCOL.md` over a WebSocket, and nothing else.
//!
//! ## Try it
//!
//! Start the server on its defaults (`127.0.0.1:8080`, data under `./chatlog-data`). On a
//! first run it creates a secret there and prints a ready-to-use token for the user `demo`:
//!
//! ```sh
//! cargo run --release -p chatlog-server
//! ```
//!
//! In a second terminal, connect with that token:
//!
//! ```sh
//! cargo run -p chat-cli -- --token <token>
//! ```
//!
//! For a second user, mint a token signed with the same secret (run it from the same directory,
//! so it finds `./chatlog-data`) and connect in a third terminal:
//!
//! ```sh
//! cargo run --release -p chatlog-server -- token --user bob
//! cargo run -p chat-cli -- --token <bob's token>
//! ```
//!
//! Then, as `demo`: `/direct bob` (or `/create Team bob`) and type a line to send it; bob
//! sees the message arrive, finds the chat in `/chats` and answers after `/open <chat>`.
//! `/receipts` shows what each member's clients have received and read, `/watch bob` reports
//! when bob comes and goes, and `/help` lists every command.
//!
//! ## Options
//!
//! - `--url` (or `CHATLOG_URL`): the WebSocket endpoint, default `ws://127.0.0.1:8080/v1/ws`.
//!   Only `ws://` is supported (no TLS).
//! - `--token` (or `CHATLOG_TOKEN`): the JWT.
//! - `--device` (or `CHATLOG_DEVICE`): the device id, default `cli`. The server keeps a
//!   delivery cursor per device and resumes from it on every connection, so keep the same id
//!   to see only what arrived while you were away; two clients of one user should use two ids.
//!
//! ## Behaviour worth knowing
//!
//! - Every event in every chat is printed as it arrives, prefixed with its chat, seq and time
//!   (UTC): `[g1 #5 12:34:56] bob: hello`.
//! - Events of the open chat are acknowledged with `delivered` automatically, so `/receipts`
//!   and other members' receipt lines show what this client has received. `/read` marks the
//!   open chat read up to its last event. Receipts about yourself are not printed. Events of
//!   other chats are printed but not acknowledged, so the next start of the same device shows
//!   them again, as the server resumes from the device's cursor.
//! - When the connection drops the client reconnects with exponential backoff (0.25 s doubling
//!   to 30 s) under the same device id, so the server resumes from its cursor. Messages whose
//!   reply was lost are sent again with the same cmid, which the server stores only once;
//!   edits, deletions, new chats and removals are not repeated but reported as uncertain.
//!   A connection silent for 45 s gets a ping; one silent for 75 s is taken as dead and
//!   reopened.
//! - Input can be piped: at the end of input the client waits (up to 5 s) for the replies it
//!   still expects, then exits. For example:
//!   `printf '/chats\n' | cargo run -p chat-cli -- --token <token>`.
//!
//! ## Code map
//!
//! - `command.rs`: a typed line → [`command::Command`] (pure).
//! - `request.rs`: a [`request::Request`] → its JSON frame (pure).
//! - `format.rs`: server JSON → printable lines (pure).
//! - `session.rs`: the client's state and decisions: [`session::Session`] takes lines, frames
//!   and connection changes and returns what to print and send (pure).
//! - `backoff.rs`: reconnect delays (pure).
//! - `connection.rs`: the only I/O: stdin, the WebSocket, timers.

mod backoff;
mod command;
mod connection;
mod format;
mod request;
mod session;

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;

use crate::connection::Exit;
use crate::session::Session;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(
    name = "chat-cli",
    version,
    about = "An interactive terminal client for chatlog-server"
)]
struct Args {
    /// WebSocket URL of the server's client endpoint.
    #[arg(long, env = "CHATLOG_URL", default_value = "ws://127.0.0.1:8080/v1/ws")]
    url: String,
    /// JWT for the user (`chatlog-server token --user NAME` prints one).
    #[arg(long, env = "CHATLOG_TOKEN", hide_env_values = true)]
    token: String,
    /// Device id; keep it stable so the server resumes where this device left off.
    #[arg(long, env = "CHATLOG_DEVICE", default_value = "cli")]
    device: String,
}

/// A prefix that makes this process's cmids unique: the start time in milliseconds and the
/// process id, so two clients started in the same millisecond still differ.
fn cmid_prefix() -> String {
    let start_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("cli-{start_ms:x}-{:x}", std::process::id())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chat-cli: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("connecting to {} (type /help for commands)", args.url);
    let session = Session::new(args.token, args.device, cmid_prefix());
    let exit = runtime.block_on(connection::run(args.url, session));
    // Reading stdin blocks a thread that cannot be cancelled; do not wait for it.
    runtime.shutdown_background();
    match exit {
        Exit::Quit => ExitCode::SUCCESS,
        Exit::Fail(message) => {
            eprintln!("chat-cli: {message}");
            ExitCode::FAILURE
        }
    }
}
