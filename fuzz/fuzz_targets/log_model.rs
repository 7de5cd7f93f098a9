//! Model-based target: a sequence of operations on a `Log` over the fault-injecting `FaultFs`,
//! checked against a model of what was acknowledged.
//!
//! The model holds `acked` (entries whose append returned `Ok`, minus acknowledged truncations
//! and purges) and `maybe` (the entries of the one operation that failed since the last open:
//! they may or may not survive a crash, but if they do, they must be exactly what was
//! submitted, as a prefix). Invariants:
//!
//! - Every acknowledged entry is present and equal after any reopen (process crash or power
//!   loss: the log runs with `Durability::Batch`), and recovery never reports corruption.
//! - Reads and iteration return exactly the model's entries.
//! - Operations fail only when a fault is armed, and then only with an I/O error; after a
//!   failure the log is poisoned and every later write returns `Error::Poisoned` until reopen.
//! - An open that fails under injected faults fails with an I/O error, and a later open of
//!   what it left behind succeeds.
//!
//! Faults: by default only the I/O countdown (`Faults::ios_left`). With the `torn-writes`
//! feature, short writes, failing fsyncs and ENOSPC as well.

#![no_main]

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use chatlog::io::fault::{Crash, FaultFs, Faults};
use chatlog::{Durability, Error, Log, LogConfig, Preallocate, RecoveryMode};
use chatlog_fuzz::{all_entries, dir, entry_bytes};
use libfuzzer_sys::fuzz_target;

const SEGMENT_SIZE_BYTES: u64 = 2048;
const ENTRY_SIZE_BYTES_MAX: usize = 600;
const BATCH_ENTRIES_MAX: usize = 12;
const OPS_MAX: usize = 64;

#[derive(Debug, Clone, Copy, Arbitrary)]
enum CrashKind {
    Process,
    PowerLoss,
}

impl From<CrashKind> for Crash {
    fn from(kind: CrashKind) -> Crash {
        match kind {
            CrashKind::Process => Crash::Process,
            CrashKind::PowerLoss => Crash::PowerLoss,
        }
    }
}

/// A fault to arm. Without the `torn-writes` feature every kind becomes a countdown, so the
/// input format (and a saved corpus) is the same in both builds.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Fault {
    /// Every I/O fails after this many more.
    Countdown(u8),
    /// The next write stores only this many bytes.
    ShortWrite(u16),
    /// The next fsync fails.
    FailNextSync,
    /// ENOSPC after this many more bytes.
    SpaceLeft(u16),
}

impl Fault {
    fn faults(self) -> Faults {
        let countdown = |n: u8| Faults {
            ios_left: Some(u64::from(n % 48)),
            ..Faults::default()
        };
        if !cfg!(feature = "torn-writes") {
            return match self {
                Fault::Countdown(n) => countdown(n),
                Fault::ShortWrite(n) | Fault::SpaceLeft(n) => countdown(n as u8),
                Fault::FailNextSync => countdown(0),
            };
        }
        match self {
            Fault::Countdown(n) => countdown(n),
            Fault::ShortWrite(n) => Faults {
                short_write_bytes: Some(usize::from(n) % 4096),
                ..Faults::default()
            },
            Fault::FailNextSync => Faults {
                fail_next_sync: true,
                ..Faults::default()
            },
            Fault::SpaceLeft(n) => Faults {
                space_left_bytes: Some(u64::from(n) % 8192),
                ..Faults::default()
            },
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// Append one entry of `len % (ENTRY_SIZE_BYTES_MAX + 1)` bytes.
    Append { len: u16, seed: u8 },
    /// Append several entries with one call (they may span segments).
    AppendBatch { lens: Vec<u16>, seed: u8 },
    /// Submit several appends without waiting (`append_batch_deferred`), so the writer can
    /// group-commit them into one write, then wait for each.
    AppendDeferred {
        lens: Vec<u16>,
        per_request: u8,
        seed: u8,
    },
    /// Truncate the last `back % (len + 1)` entries.
    Truncate { back: u16 },
    /// Purge sealed segments below `first + ahead % (len + 1)`.
    Purge { ahead: u16 },
    /// Read one entry.
    Read { at: u16 },
    /// Iterate over the whole log.
    Iterate,
    /// Crash and reopen.
    Reopen { crash: CrashKind },
    /// Crash, then open with a fault armed; if that open fails, crash again and reopen.
    ReopenWithFault {
        crash: CrashKind,
        fault: Fault,
        retry: CrashKind,
    },
    /// Arm a fault on the running log.
    Arm { fault: Fault },
}

#[derive(Debug, Default, Clone)]
struct Model {
    /// Index of the first entry the model holds.
    first: u64,
    /// Entries that must be present, from `first` on.
    acked: Vec<Bytes>,
    /// Entries after `acked` that may be present, as a prefix (from a failed operation).
    maybe: Vec<Bytes>,
    /// A failed purge may have moved the first index up to here.
    first_max: u64,
    /// An operation failed since the last open.
    poisoned: bool,
    /// A fault is armed on the current file system.
    armed: bool,
}

impl std::fmt::Display for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lens = |v: &[Bytes]| v.iter().map(Bytes::len).collect::<Vec<_>>();
        write!(
            f,
            "model: first {} (up to {}), acked entry sizes {:?}, maybe entry sizes {:?}, \
             poisoned {}, armed {}",
            self.first,
            self.first_max,
            lens(&self.acked),
            lens(&self.maybe),
            self.poisoned,
            self.armed
        )
    }
}

impl Model {
    fn end(&self) -> u64 {
        self.first + self.acked.len() as u64
    }

    /// The entry at `index` if the model has (or may have) it.
    fn entry(&self, index: u64) -> Option<&Bytes> {
        let k = usize::try_from(index.checked_sub(self.first)?).ok()?;
        match k.checked_sub(self.acked.len()) {
            None => self.acked.get(k),
            Some(beyond) => self.maybe.get(beyond),
        }
    }

    /// Checks the log's bounds against the model (no I/O).
    fn check_bounds(&self, log: &Log) {
        let (first, next) = (log.first_index(), log.next_index());
        assert_eq!(log.is_poisoned(), self.poisoned, "poisoned flag disagrees");
        if self.poisoned {
            assert!(
                (self.first..=self.first_max).contains(&first),
                "first index {first} outside {}..={}",
                self.first,
                self.first_max
            );
            let least = self.end();
            let most = least + self.maybe.len() as u64;
            assert!(
                (least..=most).contains(&next),
                "next index {next} outside {least}..={most}"
            );
        } else {
            assert_eq!(first, self.first, "first index");
            assert_eq!(next, self.end(), "next index");
        }
    }

    /// After a successful open: the log must hold the acknowledged entries, then a prefix of
    /// the maybe-entries; the model then takes the log's contents as acknowledged.
    fn settle(&mut self, log: &Log, read_all: bool) {
        let (first, next) = (log.first_index(), log.next_index());
        assert!(!log.is_poisoned());
        assert!(
            (self.first..=self.first_max).contains(&first),
            "after reopen: first index {first} outside {}..={}",
            self.first,
            self.first_max
        );
        let least = self.end();
        let most = least + self.maybe.len() as u64;
        assert!(
            (least..=most).contains(&next),
            "after reopen: next index {next} outside {least}..={most} (acknowledged entries lost?)"
        );
        if read_all {
            let entries = all_entries(log).expect("a recovered log verifies");
            assert_eq!(entries.len() as u64, next - first);
            for (k, got) in entries.iter().enumerate() {
                let index = first + k as u64;
                let want = self.entry(index).expect("in bounds");
                assert_eq!(got, want, "after reopen: entry {index} differs");
            }
        }
        let mut all = std::mem::take(&mut self.acked);
        all.append(&mut self.maybe);
        let from = (first - self.first) as usize;
        let to = (next - self.first) as usize;
        self.acked = all[from..to].to_vec();
        self.first = first;
        self.first_max = first;
        self.poisoned = false;
    }

    /// Records a failed mutation: checks the error and that the log is poisoned.
    fn failed(&mut self, log: &Log, error: &Error, what: &str) {
        assert!(self.armed, "{what} failed with no fault armed: {error}");
        assert!(
            matches!(error, Error::Io { .. } | Error::NoSpace { .. }),
            "{what} failed with an unexpected error: {error}"
        );
        self.poisoned = true;
        assert!(log.is_poisoned(), "a failed {what} did not poison the log");
        assert!(
            matches!(log.append(Bytes::from_static(b"x")), Err(Error::Poisoned)),
            "append after a failed {what} was not refused as poisoned"
        );
    }
}

/// `CHATLOG_FUZZ_TRACE=1` prints each operation (to read a crash's minimized input).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("CHATLOG_FUZZ_TRACE").is_some())
}

fn config() -> LogConfig {
    LogConfig {
        segment_size_bytes: SEGMENT_SIZE_BYTES,
        entry_size_bytes_max: ENTRY_SIZE_BYTES_MAX,
        queue_depth_max: 64,
        index_stride: 2,
        durability: Durability::Batch,
        preallocate: Preallocate::Sparse,
        recovery: RecoveryMode::TolerateTornTail,
        ..LogConfig::default()
    }
}

fn open(fs: &FaultFs) -> chatlog::Result<Log> {
    Log::open_with(Arc::new(fs.clone()), dir(), config())
}

struct Harness {
    fs: FaultFs,
    log: Log,
    model: Model,
    /// Makes every entry's contents distinct.
    salt: u64,
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let fs = FaultFs::new();
    let log = open(&fs).expect("a new log opens");
    let mut h = Harness {
        fs,
        log,
        model: Model {
            first: 1,
            first_max: 1,
            ..Model::default()
        },
        salt: 0,
    };
    h.model.check_bounds(&h.log);
    for op in u.arbitrary_iter::<Op>().expect("iterator").take(OPS_MAX) {
        let Ok(op) = op else { break };
        if trace() {
            eprintln!("op: {op:?}");
        }
        h.apply(op);
        h.model.check_bounds(&h.log);
    }
    // Whatever happened, a process crash and, separately, a power loss at this point must
    // each give back every acknowledged entry.
    let power_loss = h.fs.crash(Crash::PowerLoss);
    let process = h.fs.crash(Crash::Process);
    let model = h.model.clone();
    h.reopen_from(process, CrashKind::Process);
    h.model = model;
    h.reopen_from(power_loss, CrashKind::PowerLoss);
});

impl Harness {
    fn entry(&mut self, len: u16, seed: u8) -> Bytes {
        self.salt += 1;
        let len = usize::from(len) % (ENTRY_SIZE_BYTES_MAX + 1);
        Bytes::from(entry_bytes(seed, self.salt, len))
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Append { len, seed } => {
                let data = self.entry(len, seed);
                self.append(vec![data], false);
            }
            Op::AppendBatch { lens, seed } => {
                let entries = lens
                    .into_iter()
                    .take(BATCH_ENTRIES_MAX)
                    .map(|len| self.entry(len, seed))
                    .collect();
                self.append(entries, true);
            }
            Op::AppendDeferred {
                lens,
                per_request,
                seed,
            } => {
                let entries: Vec<Bytes> = lens
                    .into_iter()
                    .take(BATCH_ENTRIES_MAX)
                    .map(|len| self.entry(len, seed))
                    .collect();
                let per_request = usize::from(per_request % 4) + 1;
                let requests: Vec<Vec<Bytes>> =
                    entries.chunks(per_request).map(<[Bytes]>::to_vec).collect();
                self.append_deferred(requests);
            }
            Op::Truncate { back } => {
                let n = self.model.acked.len() as u64;
                let from = self.model.end() - u64::from(back) % (n + 1);
                let result = self.log.truncate_from(from);
                if self.model.poisoned {
                    assert!(matches!(result, Err(Error::Poisoned)), "{result:?}");
                    return;
                }
                match result {
                    Ok(()) => {
                        let keep = (from - self.model.first) as usize;
                        self.model.acked.truncate(keep);
                    }
                    Err(error) => {
                        let keep = (from - self.model.first) as usize;
                        self.model.maybe = self.model.acked.split_off(keep);
                        self.model.failed(&self.log, &error, "truncate");
                    }
                }
            }
            Op::Purge { ahead } => {
                let n = self.model.acked.len() as u64;
                let before = self.model.first + u64::from(ahead) % (n + 1);
                let was_poisoned = self.model.poisoned;
                let result = self.log.purge_before(before);
                if was_poisoned {
                    assert!(matches!(result, Err(Error::Poisoned)), "{result:?}");
                    return;
                }
                match result {
                    Ok(first) => {
                        assert!(
                            (self.model.first..=before.max(self.model.first)).contains(&first),
                            "purge_before({before}) returned {first}"
                        );
                        assert!(first <= self.model.end());
                        self.model
                            .acked
                            .drain(..(first - self.model.first) as usize);
                        self.model.first = first;
                        self.model.first_max = first;
                    }
                    Err(error) => {
                        self.model.first_max = before.max(self.model.first);
                        self.model.failed(&self.log, &error, "purge");
                    }
                }
            }
            Op::Read { at } => {
                let (first, next) = (self.log.first_index(), self.log.next_index());
                if next > first {
                    let index = first + u64::from(at) % (next - first);
                    self.check_read(index, self.log.read(index));
                }
                // Out of range on both sides.
                assert!(matches!(self.log.read(next), Err(Error::OutOfRange { .. })));
                if first > 0 {
                    assert!(matches!(
                        self.log.read(first - 1),
                        Err(Error::OutOfRange { .. })
                    ));
                }
            }
            Op::Iterate => {
                let first = self.log.first_index();
                for (k, item) in self.log.iter_from(first).enumerate() {
                    self.check_read(first + k as u64, item.map(|(_, data)| data));
                }
            }
            Op::Reopen { crash } => self.reopen(crash),
            Op::ReopenWithFault {
                crash,
                fault,
                retry,
            } => {
                let crashed = self.fs.crash(crash.into());
                crashed.set_faults(fault.faults());
                match open(&crashed) {
                    Ok(log) => {
                        // Recovery completed; reads may now fail, so check bounds only. The
                        // contents are checked at the next fault-free open.
                        self.log = log;
                        self.fs = crashed;
                        self.model.settle(&self.log, false);
                        self.model.armed = true;
                    }
                    Err(error) => {
                        assert!(
                            matches!(error, Error::Io { .. } | Error::NoSpace { .. }),
                            "open under an I/O fault failed with: {error}"
                        );
                        self.fs = crashed;
                        self.reopen(retry);
                    }
                }
            }
            Op::Arm { fault } => {
                self.fs.set_faults(fault.faults());
                self.model.armed = true;
            }
        }
    }

    fn append(&mut self, entries: Vec<Bytes>, as_batch: bool) {
        let expected = self.model.end();
        let result = if as_batch {
            self.log.append_batch(entries.clone())
        } else {
            self.log.append(entries[0].clone())
        };
        if entries.is_empty() {
            // An empty batch writes nothing and reports the next index, poisoned or not.
            assert!(matches!(result, Ok(i) if i == self.log.next_index()));
            return;
        }
        if self.model.poisoned {
            assert!(matches!(result, Err(Error::Poisoned)), "{result:?}");
            return;
        }
        match result {
            Ok(first) => {
                assert_eq!(first, expected, "append returned the wrong index");
                self.model.acked.extend(entries);
            }
            Err(error) => {
                self.model.maybe = entries;
                self.model.failed(&self.log, &error, "append");
            }
        }
    }

    fn append_deferred(&mut self, requests: Vec<Vec<Bytes>>) {
        let was_poisoned = self.model.poisoned;
        let pending: Vec<_> = requests
            .iter()
            .map(|entries| self.log.append_batch_deferred(entries.clone()))
            .collect();
        let mut expected = self.model.end();
        let mut first_error = None;
        for (entries, pending) in requests.into_iter().zip(pending) {
            let result = pending.and_then(|p| p.wait());
            if was_poisoned {
                assert!(matches!(result, Err(Error::Poisoned)), "{result:?}");
                continue;
            }
            match result {
                Ok(first) => {
                    assert!(
                        first_error.is_none(),
                        "an append queued after a failed one succeeded"
                    );
                    assert_eq!(first, expected, "deferred append got the wrong index");
                    expected += entries.len() as u64;
                    self.model.acked.extend(entries);
                }
                Err(error) => {
                    // The first failure is the batch's I/O error; requests in the same batch
                    // get a copy of it, later ones are refused as poisoned.
                    if first_error.is_none() {
                        first_error = Some(error);
                    } else {
                        assert!(
                            matches!(
                                error,
                                Error::Io { .. } | Error::NoSpace { .. } | Error::Poisoned
                            ),
                            "{error}"
                        );
                    }
                    self.model.maybe.extend(entries);
                }
            }
        }
        if let Some(error) = first_error {
            self.model.failed(&self.log, &error, "deferred append");
        }
    }

    fn check_read(&self, index: u64, result: chatlog::Result<Bytes>) {
        match result {
            Ok(data) => {
                let want = self
                    .model
                    .entry(index)
                    .unwrap_or_else(|| panic!("read {index}: not in the model"));
                assert_eq!(&data, want, "read {index} differs from the model");
            }
            Err(error) => assert!(
                self.model.armed && matches!(error, Error::Io { .. }),
                "read {index} failed: {error}"
            ),
        }
    }

    /// Crash (the running log is abandoned as is), reopen with no faults, check everything.
    fn reopen(&mut self, crash: CrashKind) {
        let crashed = self.fs.crash(crash.into());
        self.reopen_from(crashed, crash);
    }

    /// Opens `crashed`, what `crash` left of the running log's file system, and checks it.
    fn reopen_from(&mut self, crashed: FaultFs, crash: CrashKind) {
        let log = open(&crashed)
            .unwrap_or_else(|e| panic!("reopen after {crash:?} failed: {e} ({})", self.model));
        self.log = log;
        self.fs = crashed;
        self.model.armed = false;
        self.model.settle(&self.log, true);
    }
}
