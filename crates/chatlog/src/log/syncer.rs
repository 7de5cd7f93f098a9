//! The sync thread of [`Durability::Interval`](crate::log::Durability::Interval).
//!
//! In that mode entries are acknowledged once written, and made durable by an `fdatasync` at
//! most an interval after the oldest unsynced write. Run on the writer thread, that sync held
//! every append that arrived during it: a replica's engine log (synced every 100 ms) made its
//! applies wait 4.6–8.7 ms now and then (docs/benchmarks.md, "What the remaining p99 is made
//! of"). Here the writer hands each written batch's file and end to this thread and goes on.
//!
//! The writer [`Syncer::flush`]es before anything that needs every written entry durable first:
//! sealing a segment, truncating, closing (a segment is sealed only after such a flush, so this
//! thread only ever holds the active segment). An explicit [`super::Log::sync`] (the
//! engine's, before each index tail ingestion) is answered from here, and the writer goes on
//! meanwhile. A failed sync poisons the log, as it does on the writer.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::io::FileHandle;
use crate::log::Shared;

/// Work handed from the writer to the sync thread.
pub(crate) enum Job {
    /// Entries up to `next` (exclusive) were written to `file`, and acknowledged.
    Written {
        file: Arc<dyn FileHandle>,
        path: PathBuf,
        next: u64,
    },
    /// Sync everything written so far now, then answer.
    Flush(oneshot::Sender<Result<()>>),
}

/// The writer's handle on its sync thread.
pub(crate) struct Syncer {
    tx: Option<flume::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the sync thread, syncing at most `every` after the oldest unsynced write; `None`
    /// if no thread can be spawned (the writer then syncs itself).
    pub(crate) fn start(shared: Arc<Shared>, every: Duration) -> Option<Syncer> {
        let (tx, rx) = flume::unbounded();
        let thread = std::thread::Builder::new()
            .name("chatlog-sync".into())
            .spawn(move || run(&rx, &shared, every))
            .ok()?;
        Some(Syncer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands over a written batch.
    pub(crate) fn written(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // Fails only if the thread is gone (it panicked); then the next flush says so.
            let _ = tx.send(job);
        }
    }

    /// Syncs everything written so far and returns once it is durable.
    pub(crate) fn flush(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.flush_then(reply);
        rx.recv().map_err(|_| Error::Poisoned)?
    }

    /// Syncs everything written so far and answers `reply` once it is durable, without
    /// waiting for it here (an explicit [`super::Log::sync`]: the writer goes on writing).
    pub(crate) fn flush_then(&self, reply: oneshot::Sender<Result<()>>) {
        let job = Job::Flush(reply);
        let unsent = match &self.tx {
            Some(tx) => tx.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(Job::Flush(reply)) = unsent {
            let _ = reply.send(Err(Error::Poisoned));
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // The thread syncs what it still holds, then ends.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the thread holds between syncs.
#[derive(Default)]
struct Unsynced {
    /// Files with written, unsynced entries, in the order they were written to.
    files: Vec<(Arc<dyn FileHandle>, PathBuf)>,
    /// One past the last entry written.
    next: Option<u64>,
    flushes: Vec<oneshot::Sender<Result<()>>>,
    /// When the oldest unsynced write was handed over.
    since: Option<Instant>,
}

impl Unsynced {
    fn take(&mut self, job: Job) {
        match job {
            Job::Written { file, path, next } => {
                if !self
                    .files
                    .last()
                    .is_some_and(|(f, _)| Arc::ptr_eq(f, &file))
                {
                    self.files.push((file, path));
                }
                self.next = Some(next);
                self.since.get_or_insert_with(Instant::now);
            }
            Job::Flush(reply) => self.flushes.push(reply),
        }
    }
}

fn run(rx: &flume::Receiver<Job>, shared: &Shared, every: Duration) {
    let mut held = Unsynced::default();
    loop {
        let received = match held.since {
            Some(since) => match rx.recv_deadline(since + every) {
                Ok(job) => Some(job),
                Err(flume::RecvTimeoutError::Timeout) => None,
                Err(flume::RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            },
        };
        if let Some(job) = received {
            held.take(job);
            while let Ok(job) = rx.try_recv() {
                held.take(job);
            }
        }
        if !held.flushes.is_empty() || held.since.is_some_and(|s| s.elapsed() >= every) {
            sync(&mut held, shared);
        }
    }
    sync(&mut held, shared);
}

/// Syncs the held files, then records them durable and answers the flushes.
fn sync(held: &mut Unsynced, shared: &Shared) {
    let mut result = if shared.poisoned.load(Ordering::Acquire) {
        Err(Error::Poisoned)
    } else {
        Ok(())
    };
    for (file, path) in held.files.drain(..) {
        if result.is_ok() {
            result = file
                .sync_data()
                .map_err(|e| Error::io("fdatasync", &path, e));
        }
    }
    held.since = None;
    let next = held.next.take();
    match &result {
        Ok(()) => {
            if let Some(next) = next {
                let durable = shared.durable_next.load(Ordering::Acquire);
                shared.stats.record_sync(next.saturating_sub(durable));
                shared.durable_next.fetch_max(next, Ordering::AcqRel);
            }
        }
        Err(error) => {
            if !matches!(error, Error::Poisoned) {
                tracing::error!(%error, "log poisoned");
            }
            shared.poisoned.store(true, Ordering::Release);
        }
    }
    for reply in held.flushes.drain(..) {
        let _ = reply.send(result.as_ref().map(|_| ()).map_err(Error::duplicate));
    }
}
