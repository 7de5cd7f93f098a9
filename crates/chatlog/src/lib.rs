//! # chatlog — an embeddable chat storage engine
//!
//! The foundation is [`log::Log`]: a durable, append-only log of opaque entries stored in
//! CRC-framed segment files, written by one group-committing writer thread and read
//! concurrently (sealed segments through `mmap`, the active one with positional reads).
//!
//! - [`log`]: open, append (blocking, batch, async), read, iterate, truncate, purge.
//! - [`segment`]: the on-disk format (pure codecs), file naming and recovery decisions.
//! - [`io`]: the file-system trait all I/O goes through, with a fault-injecting test double.
//! - [`Error`]: one error type; I/O failures poison the log instead of being retried.
//!
//! See `docs/storage-format.md` for byte diagrams and durability guarantees.

#[cfg(feature = "engine")]
pub mod engine;
pub mod error;
pub mod io;
pub mod log;
pub mod presence;
mod priority;
pub mod segment;

pub use error::{Error, Result};
pub use log::{Durability, Log, LogConfig, LogStats, Preallocate, RecoveryMode};
