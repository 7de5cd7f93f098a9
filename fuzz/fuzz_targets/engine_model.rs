//! Model-based target for the chat engine: random chat operations on an [`Engine`] whose
//! segment log runs on the fault-injecting `FaultFs` with an I/O countdown (every I/O fails
//! after N), checked against a model of what was acknowledged after every reopen.
//!
//! The model, and the comparison of the engine's answers with it, is the one the proptest
//! model test uses (`crates/chatlog/tests/support/engine_model.rs`, included below as `model`):
//! this file decodes operations from the fuzz input and drives the faults and crashes. The
//! operations are a part of the test's: group chats (no titles, no direct chats), valid ids,
//! no device registration or resume, and the clock never moves. Every write's result must be
//! the model's (the seq, or the refusal's error code) unless a fault is armed, and then it may
//! also be `ChatError::Unavailable`.
//!
//! A write that fails when the log fails stops the engine (`Engine::failure` is set): every
//! later write must answer `Unavailable` until the engine is reopened, and the failed write may
//! or may not have happened (its record may have reached the page cache before the fsync
//! failed). The model keeps it as `pending` and, after the next open, asks the indexes whether
//! it happened: a created chat exists, the chat's last seq moved by exactly one, the cursor
//! moved. A pending send is then retried with its cmid: it must get its original seq if it
//! happened. A write that fails on a *read* inside the sequencer (an edit's target, a dedup's
//! timestamp) does not stop the engine and did not happen.
//!
//! After every fault-free open, everything the model knows against the engine
//! (`model::check_state`: `list_chats` of every user; every chat's last seq, members, whole
//! history, receipts; every device's cursor; the next group id still free); at the end also
//! that seqs are gapless and no cmid repeats (`model::check_gapless_and_deduplicated`).
//!
//! Crashes are process crashes only (`Crash::Process`: the page cache survives). The indexes
//! are RocksDB on a real temporary directory, which no simulated crash touches; a simulated
//! power loss would drop the log's unsynced writes but keep every write RocksDB made (its WAL
//! is not synced per write either), leaving the indexes ahead of the log: a state no real
//! machine reaches, since a real power loss would cut RocksDB's unsynced tail as well.
//! Engines are dropped without `close` for a crash, after the log's file system was
//! snapshotted, so nothing the old engine does afterwards reaches the reopened one.

#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use chatlog::engine::{ChatError, Engine, EngineConfig};
use chatlog::io::fault::{Crash, FaultFs, Faults};
use chatlog::{Durability, LogConfig, Preallocate, RecoveryMode};
use chatlog_fuzz::{ScratchDir, trace};
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/chatlog/tests/support/engine_model.rs"]
mod model;

use model::{
    BODY_BYTES_MAX, CLOCK_START_MS, Call, HISTORY_LIMIT_MAX, HistoryQuery, MEMBERS_MAX, Mismatch,
    Model, TITLE_BYTES_MAX, Text, USER_REF_SELF, USERS, Write,
};

/// Cmids drawn: few, so a sender often repeats one (dedup) in a chat.
const CMIDS_DRAWN: u8 = 3;
/// Bodies are drawn up to this length, so some are over the limit.
const BODY_BYTES_DRAWN_MAX: usize = BODY_BYTES_MAX + 2;
/// Other members a created chat is drawn with: up to the limit, so it is sometimes over it.
const CREATE_MEMBERS_DRAWN_MAX: usize = MEMBERS_MAX;
/// Operations per input: each reopen opens RocksDB, which is most of an input's time.
const OPS_MAX: usize = 32;
/// Largest I/O countdown: an operation does a handful of I/Os, an open a few dozen.
const COUNTDOWN_MAX: u64 = 64;
/// Small segments so the log rolls over within an input.
const SEGMENT_SIZE_BYTES: u64 = 1024;
const ENTRY_SIZE_BYTES_MAX: usize = 256;

const _: () = assert!((CMIDS_DRAWN as usize) <= model::CMIDS.len());
const _: () = assert!(BODY_BYTES_DRAWN_MAX < u8::MAX as usize);
const _: () = assert!(
    OPS_MAX < HISTORY_LIMIT_MAX,
    "one history page holds a whole chat"
);

#[derive(Debug, Clone, Copy, Arbitrary)]
struct Body {
    len: u8,
    letter: u8,
}

impl Body {
    fn text(self) -> Text {
        Text {
            len: self.len % (BODY_BYTES_DRAWN_MAX as u8 + 1),
            letter: self.letter,
            wide: false,
        }
    }
}

/// One of `USERS`, as a user reference.
fn user(v: u8) -> u8 {
    v % USERS.len() as u8
}

/// Operations. Chats, users and seqs are small numbers resolved against the model when the
/// operation runs (the writes by `Model::resolve`), so most hit existing chats and members
/// while some miss.
#[derive(Debug, Clone, Arbitrary)]
enum Op {
    /// Create a group chat with up to `CREATE_MEMBERS_DRAWN_MAX` other members.
    Create {
        creator: u8,
        members: [u8; CREATE_MEMBERS_DRAWN_MAX],
        count: u8,
    },
    Send {
        chat: u8,
        actor: u8,
        cmid: u8,
        body: Body,
    },
    Edit {
        chat: u8,
        actor: u8,
        target: u8,
        body: Body,
    },
    Delete {
        chat: u8,
        actor: u8,
        target: u8,
    },
    Mark {
        chat: u8,
        actor: u8,
        device: u8,
        seq: u8,
        read: bool,
    },
    Add {
        chat: u8,
        actor: u8,
        user: u8,
    },
    /// Half the time the actor leaves; else someone is removed.
    Remove {
        chat: u8,
        actor: u8,
        user: u8,
    },
    /// A history page of a chat, compared with the model (no reopen).
    Read {
        chat: u8,
        actor: u8,
    },
    /// Close the engine, clear the faults, open it again on the same files.
    Reopen,
    /// Process crash: snapshot the log's files, drop the engine, open on the snapshot.
    Crash,
    /// Process crash, then open with a countdown armed; if that open fails, crash and open
    /// again without faults.
    CrashWithFault {
        countdown: u8,
    },
    /// Arm the I/O countdown on the running engine's log.
    Arm {
        countdown: u8,
    },
}

impl Op {
    /// The model's write this operation is, or `None` for operations that are not writes.
    fn write(&self) -> Option<Write> {
        Some(match *self {
            Op::Create {
                creator,
                members,
                count,
            } => Write::Create {
                creator: user(creator),
                members: members[..usize::from(count) % (CREATE_MEMBERS_DRAWN_MAX + 1)]
                    .iter()
                    .map(|&m| user(m))
                    .collect(),
                // `model::title_of`: no title.
                title: 0,
                direct: false,
            },
            Op::Send {
                chat,
                actor,
                cmid,
                body,
            } => Write::Send {
                chat,
                actor,
                cmid: cmid % CMIDS_DRAWN,
                body: Some(body.text()),
            },
            Op::Edit {
                chat,
                actor,
                target,
                body,
            } => Write::Edit {
                chat,
                actor,
                target,
                body: body.text(),
            },
            Op::Delete {
                chat,
                actor,
                target,
            } => Write::Delete {
                chat,
                actor,
                target,
            },
            Op::Mark {
                chat,
                actor,
                device,
                seq,
                read,
            } => Write::Mark {
                chat,
                actor,
                device,
                seq,
                read,
            },
            Op::Add {
                chat,
                actor,
                user: added,
            } => Write::Add {
                chat,
                actor,
                users: vec![user(added)],
            },
            Op::Remove {
                chat,
                actor,
                user: removed,
            } => Write::Remove {
                chat,
                actor,
                users: vec![if removed.is_multiple_of(2) {
                    USER_REF_SELF
                } else {
                    user(removed / 2)
                }],
            },
            Op::Read { .. }
            | Op::Reopen
            | Op::Crash
            | Op::CrashWithFault { .. }
            | Op::Arm { .. } => return None,
        })
    }
}

/// Panics with `mismatch`, the engine's answer that differs from the model's.
fn agree(checked: Result<(), Mismatch>) {
    if let Err(mismatch) = checked {
        panic!("engine and model disagree: {mismatch}");
    }
}

fn countdown(n: u8) -> Faults {
    Faults {
        ios_left: Some(u64::from(n) % (COUNTDOWN_MAX + 1)),
        ..Faults::default()
    }
}

/// The directory of a new, empty engine (its indexes in `index/`), made once per process. Every
/// input starts from a copy of it: opening RocksDB is most of an input's time, and creating its
/// column families (what a first open does) is a third of that.
fn template_dir() -> &'static Path {
    static TEMPLATE: OnceLock<ScratchDir> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let dir = ScratchDir::new("engine_model-template");
            let fs = FaultFs::new();
            Engine::open(dir.path(), config(&fs))
                .expect("a new engine opens")
                .close();
            dir
        })
        .path()
}

/// Copies the index files of the engine directory `from` into a new `to`. RocksDB keeps no
/// subdirectories; the engine's one, `ingest/` (index tail files on their way in), is emptied
/// and made again by every open, so it is not copied.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the index directory");
    for entry in std::fs::read_dir(from.join("index")).expect("read the template") {
        let entry = entry.expect("template entry");
        if entry.file_type().expect("template entry type").is_dir() {
            continue;
        }
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy the template");
    }
}

fn config(fs: &FaultFs) -> EngineConfig {
    EngineConfig {
        log: LogConfig {
            segment_size_bytes: SEGMENT_SIZE_BYTES,
            entry_size_bytes_max: ENTRY_SIZE_BYTES_MAX,
            queue_depth_max: 64,
            index_stride: 2,
            durability: Durability::Batch,
            preallocate: Preallocate::Sparse,
            recovery: RecoveryMode::TolerateTornTail,
            file_system: Some(Arc::new(fs.clone())),
            ..LogConfig::default()
        },
        members_max: MEMBERS_MAX,
        body_bytes_max: BODY_BYTES_MAX,
        title_bytes_max: TITLE_BYTES_MAX,
        queue_depth_max: 64,
        subscriber_buffer: 16,
        clock: Arc::new(|| CLOCK_START_MS),
        ..EngineConfig::default()
    }
}

/// Fields drop in order: the engine before the directory it works in.
struct Harness {
    engine: Option<Engine>,
    /// Real directory of the indexes (RocksDB); the log lives at `<dir>/log` inside `fs`.
    dir: ScratchDir,
    fs: FaultFs,
    model: Model,
    /// The write that failed when the engine stopped: it may or may not have happened.
    pending: Option<Call>,
    /// A countdown is armed on `fs` (so operations may fail).
    armed: bool,
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(first_countdown) = u.arbitrary::<Option<u8>>() else {
        return;
    };
    let dir = ScratchDir::new("engine_model");
    copy_dir(template_dir(), &dir.path().join("index"));
    let mut h = Harness {
        engine: None,
        dir,
        fs: FaultFs::new(),
        model: Model::new(),
        pending: None,
        armed: false,
    };
    h.open_clean("first open");
    if let Some(n) = first_countdown {
        h.arm(n);
    }
    for op in u.arbitrary_iter::<Op>().expect("iterator").take(OPS_MAX) {
        let Ok(op) = op else { break };
        if trace() {
            eprintln!("op: {op:?}");
        }
        h.step(op);
    }
    // Whatever happened, a process crash now must give back everything acknowledged.
    h.crash_and_reopen();
    agree(model::check_gapless_and_deduplicated(h.engine(), &h.model));
    h.engine.take().expect("engine is open").close();
});

impl Harness {
    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("engine is open")
    }

    fn open(&self, fs: &FaultFs) -> Result<Engine, ChatError> {
        Engine::open(self.dir.path(), config(fs))
    }

    fn arm(&mut self, n: u8) {
        self.fs.set_faults(countdown(n));
        self.armed = true;
    }

    fn step(&mut self, op: Op) {
        if let Some(write) = op.write() {
            self.write(self.model.resolve(&write));
            return;
        }
        match op {
            Op::Read { chat, actor } => {
                let chat = self.model.chat_ref(chat);
                let actor = self.model.actor_ref(&chat, actor);
                self.check_history(&actor, &chat);
            }
            Op::Reopen => {
                self.engine.take().expect("engine is open").close();
                self.fs.set_faults(Faults::default());
                self.open_clean("reopen");
            }
            Op::Crash => self.crash_and_reopen(),
            Op::CrashWithFault { countdown: n } => {
                let crashed = self.fs.crash(Crash::Process);
                drop(self.engine.take());
                crashed.set_faults(countdown(n));
                self.fs = crashed;
                match self.open(&self.fs) {
                    Ok(engine) => {
                        // Opened (replay done); its reads may now fail, so only the indexes
                        // are consulted. Everything is checked at the next fault-free open.
                        self.engine = Some(engine);
                        self.armed = true;
                        self.settle();
                    }
                    Err(error) => {
                        assert!(
                            matches!(error, ChatError::Unavailable(_)),
                            "open under an I/O countdown failed with: {error}"
                        );
                        self.crash_and_reopen();
                    }
                }
            }
            Op::Arm { countdown: n } => self.arm(n),
            _ => unreachable!("writes are resolved above"),
        }
    }

    /// Crash (process): the log's files as they are now, the engine dropped, then a
    /// fault-free open and a full check.
    fn crash_and_reopen(&mut self) {
        let crashed = self.fs.crash(Crash::Process);
        drop(self.engine.take());
        self.fs = crashed;
        self.open_clean("reopen after a process crash");
    }

    fn open_clean(&mut self, what: &str) {
        let engine = self
            .open(&self.fs)
            .unwrap_or_else(|e| panic!("{what} failed: {e} (pending {:?})", self.pending));
        self.engine = Some(engine);
        self.armed = false;
        self.settle();
    }

    /// After an open: decides from the indexes whether the pending write happened, retries
    /// a pending send, and (when no fault is armed) checks everything against the model.
    fn settle(&mut self) {
        assert!(self.engine().failure().is_none(), "a new engine has failed");
        if let Some(call) = self.pending.take() {
            let happened = self.happened(&call);
            if trace() {
                eprintln!("pending {call:?} happened: {happened}");
            }
            if happened {
                assert!(self.model.apply(&call).is_ok(), "pending {call:?} refused");
            }
            if matches!(call, Call::Send { .. }) {
                // The client retries with the same cmid: it gets the original seq if the
                // send happened, else (the same) next seq.
                self.write(call);
            }
        }
        if !self.armed {
            agree(model::check_state(self.engine(), &self.model));
        }
    }

    /// Whether the pending write `call` (which the model accepts) is in the indexes.
    fn happened(&self, call: &Call) -> bool {
        let engine = self.engine();
        match call {
            Call::Create { .. } => {
                let id = self.model.next_group();
                match engine.members(&id) {
                    Ok(_) => true,
                    Err(ChatError::NotFound(_)) => false,
                    Err(e) => panic!("members of {id}: {e}"),
                }
            }
            Call::Add { chat, .. }
            | Call::Remove { chat, .. }
            | Call::Send { chat, .. }
            | Call::Edit { chat, .. }
            | Call::Delete { chat, .. } => {
                let want = self.model.chats[chat].last_seq();
                let got = engine.store().last_seq(chat).expect("indexes read");
                assert!(
                    got == want || got == want + 1,
                    "{chat}: last seq {got} after a failed {call:?}, model has {want}"
                );
                got == want + 1
            }
            Call::Mark {
                user, device, chat, ..
            } => {
                let old = self.model.cursor(user, device, chat).as_cursor();
                let mut next = self.model.clone();
                next.apply(call).expect("pending call is accepted");
                let new = next.cursor(user, device, chat).as_cursor();
                let got = engine.cursor(user, device, chat).expect("cursor read");
                assert!(
                    got == old || got == new,
                    "cursor of {user}/{device} in {chat} is {got:?} after a failed mark, \
                     model has {old:?} or {new:?}"
                );
                got == new && new != old
            }
            Call::Register { .. } => unreachable!("this target registers no devices"),
        }
    }

    /// Runs one write and checks its result against the model.
    fn write(&mut self, call: Call) {
        let mut next = self.model.clone();
        let expected = next.apply(&call);
        let failed_before = self.engine().failure().is_some();
        let got = model::submit(self.engine(), &call).wait();
        if trace() {
            eprintln!("  {call:?} -> {got:?} (model: {expected:?})");
        }
        match got {
            Err(ChatError::Unavailable(error)) => {
                assert!(
                    self.armed,
                    "{call:?} failed with no fault armed: unavailable: {error}"
                );
                assert!(
                    !matches!(error, chatlog::Error::Closed),
                    "{call:?}: engine closed"
                );
                let failed_now = self.engine().failure().is_some();
                if !failed_before && failed_now && expected.is_ok() {
                    // The log failed under this write: it may or may not have happened.
                    assert!(self.pending.is_none(), "two writes failed the engine");
                    self.pending = Some(call);
                }
                // Otherwise a read inside the sequencer failed (nothing was written), or the
                // engine had already stopped (refused before deciding anything).
            }
            Err(ChatError::Busy) => panic!("{call:?}: busy with one operation in flight"),
            got => {
                assert!(
                    !failed_before,
                    "{call:?} answered {got:?} after the engine failed (must be unavailable)"
                );
                let got = model::code(got);
                assert_eq!(got, expected, "{call:?}: engine and model disagree");
                self.model = next;
            }
        }
    }

    /// A history page of `chat` read by `user` (the whole chat), against the model; with a
    /// fault armed it may also fail as unavailable.
    fn check_history(&self, user: &str, chat: &str) {
        let q = HistoryQuery {
            user,
            chat,
            before: None,
            after: Some(0),
            limit: Some(HISTORY_LIMIT_MAX),
        };
        match q.ask(self.engine()) {
            Err(ChatError::Unavailable(error)) => {
                assert!(self.armed, "{q} failed unarmed: {error}");
            }
            got => agree(model::compare_history_page(&self.model, &q, got)),
        }
    }
}
