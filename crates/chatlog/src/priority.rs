//! CPU priority of the engine's background threads.
//!
//! The index tail's ingestion and the spare segment's zero fill run beside the threads every
//! write waits for (sequencer, log writer, applier). At the same priority the scheduler shares
//! the cores evenly, so an ingestion (a tenth of a second of CPU) delays every write behind
//! it; one step less urgent, the writes go first and the background work takes the time they
//! leave idle (about a sixth of both cores in the append benchmark, waiting for `fdatasync`).
//! RocksDB's compaction threads are lowered the same way (`Store::open`).

/// How much less urgent a background thread is (`nice` steps; 0 is the default, 19 the least).
const BACKGROUND_NICE: i32 = 5;

/// Makes the calling thread a background thread. Best effort: a failure leaves its priority
/// as it was.
pub(crate) fn lower_this_thread() {
    if let Err(e) = rustix::process::nice(BACKGROUND_NICE) {
        tracing::debug!(error = %e, "lowering a background thread's priority failed");
    }
}

#[cfg(test)]
mod tests {
    /// The calling thread, and only it, becomes less urgent.
    #[test]
    fn a_background_thread_is_lowered_and_others_are_not() {
        let before = rustix::process::getpriority_process(None).expect("getpriority");
        let lowered = std::thread::spawn(|| {
            super::lower_this_thread();
            rustix::process::getpriority_process(None).expect("getpriority")
        })
        .join()
        .expect("thread");
        assert_eq!(lowered, (before + super::BACKGROUND_NICE).min(19));
        assert_eq!(
            rustix::process::getpriority_process(None).expect("getpriority"),
            before
        );
    }
}
