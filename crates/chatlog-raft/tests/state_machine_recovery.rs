#![allow(clippy::result_large_err)] // openraft's StorageError
//! The state machine's engine log is not synced per entry (the Raft log is the durable copy).
//! These tests build the disk states a power loss can leave behind and check that the state
//! machine opens on each, reports the entries it still holds, and reaches the same state as an
//! undamaged replica once openraft applies the rest again from the Raft log.

use std::path::{Path, PathBuf};

use chatlog::engine::{EngineConfig, Op};
use chatlog::log::Preallocate;
use chatlog_raft::state_machine::StateMachine;
use chatlog_raft::types::{Entry, LogId};
use chatlog_raft::{Request, node::digest};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload};

fn config() -> EngineConfig {
    let mut engine = EngineConfig::default();
    engine.log.segment_size_bytes = 32 << 20;
    engine.log.preallocate = Preallocate::Sparse;
    engine
}

fn entry(index: u64, ops: Vec<Op>) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request {
            ops: ops.into_iter().map(|op| (op, 1_000 + index)).collect(),
        }),
    }
}

fn sends(tag: &str, n: usize) -> Vec<Op> {
    (0..n)
        .map(|i| Op::Send {
            user: "alice".into(),
            chat: "g1".into(),
            cmid: format!("{tag}-{i}"),
            body: Some(format!("{tag}-body-{i}")),
            file: None,
        })
        .collect()
}

/// The three entries every test applies: a chat with three messages, then two more groups.
fn entries() -> Vec<Entry> {
    let mut first = vec![Op::Create {
        creator: "alice".into(),
        members: vec!["alice".into(), "bob".into()],
        title: Some("t".into()),
        direct: false,
    }];
    first.extend(sends("first", 3));
    vec![
        entry(1, first),
        entry(2, sends("second", 4)),
        entry(3, sends("third", 5)),
    ]
}

#[path = "../../chatlog/tests/support/fs.rs"]
mod fs;
use fs::copy_dir;

/// Applies `entries` one `apply` call each, then closes the state machine.
async fn apply(dir: &Path, entries: Vec<Entry>) -> (Option<u64>, String) {
    let mut sm = StateMachine::open(dir, config()).expect("state machine opens");
    for e in entries {
        sm.apply(vec![e]).await.expect("apply");
    }
    let (applied, _) = sm.applied_state().await.unwrap();
    let digest = digest(&sm.cell().get()).unwrap();
    (applied.map(|l| l.index), digest)
}

/// The engine's segment files under a state machine directory (generation 0).
fn segments(sm: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(sm.join("0").join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .collect();
    out.sort();
    out
}

struct Disks {
    _tmp: tempfile::TempDir,
    /// After entry 1 only.
    after_first: PathBuf,
    /// After all three entries.
    after_all: PathBuf,
    /// The undamaged replica's digest after all three.
    digest: String,
}

async fn disks() -> Disks {
    let tmp = tempfile::tempdir().unwrap();
    let after_first = tmp.path().join("after-first");
    let after_all = tmp.path().join("after-all");
    let es = entries();
    apply(&after_all, es[..1].to_vec()).await;
    copy_dir(&after_all, &after_first);
    let (applied, digest) = apply(&after_all, es[1..].to_vec()).await;
    assert_eq!(applied, Some(3));
    Disks {
        _tmp: tmp,
        after_first,
        after_all,
        digest,
    }
}

/// Opens `dir` (the damaged disk), checks it reports entry 1 as the last applied, applies
/// entries 2 and 3 again (what openraft does from the Raft log) and compares with the
/// undamaged replica.
async fn recovers_to(dir: &Path, digest: &str) {
    let (applied, _) = {
        let mut sm = StateMachine::open(dir, config()).expect("the damaged state machine opens");
        sm.applied_state().await.unwrap()
    };
    assert_eq!(
        applied.map(|l| l.index),
        Some(1),
        "the state machine reports what it still holds"
    );
    let (applied, again) = apply(dir, entries()[1..].to_vec()).await;
    assert_eq!(applied, Some(3));
    assert_eq!(
        again, digest,
        "re-applied replica differs from the undamaged one"
    );
}

/// Power loss after the indexes' RocksDB WAL reached the disk but the engine log's unsynced
/// tail did not: the indexes are ahead of the log.
#[tokio::test]
async fn indexes_ahead_of_a_log_that_lost_its_tail_are_rebuilt() {
    let d = disks().await;
    let damaged = d.after_first.clone();
    std::fs::remove_dir_all(damaged.join("0").join("index")).unwrap();
    copy_dir(
        &d.after_all.join("0").join("index"),
        &damaged.join("0").join("index"),
    );
    recovers_to(&damaged, &d.digest).await;
}

/// Power loss where a later write of the engine log reached the disk and an earlier one did
/// not: a damaged group followed by a valid one (in a synced log that is corruption of
/// acknowledged data; here the Raft log still has both).
#[tokio::test]
async fn a_hole_in_the_unsynced_log_is_cut_and_the_rest_applied_again() {
    let d = disks().await;
    let damaged = d.after_all.clone();
    let needle = b"second-body-1";
    let mut hit = false;
    for seg in segments(&damaged) {
        let mut bytes = std::fs::read(&seg).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[at] ^= 0xff;
            std::fs::write(&seg, bytes).unwrap();
            hit = true;
        }
    }
    assert!(hit, "the second group's message is in the engine log");
    recovers_to(&damaged, &d.digest).await;
}

/// A node whose engine holds less than its Raft log dropped (synced engine data lost or
/// damaged) must not start: applying the Raft log onto that engine would diverge.
#[tokio::test]
async fn a_node_whose_engine_is_behind_its_purged_raft_log_refuses_to_start() {
    use openraft::storage::RaftLogStorage;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("node");
    let mut raft_log_config = config().log;
    raft_log_config.preallocate = Preallocate::Sparse;
    {
        let mut log =
            chatlog_raft::log_store::LogStore::open(&data.join("raft"), raft_log_config.clone())
                .unwrap();
        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 5))
            .await
            .unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut cc = chatlog_raft::ClusterConfig::new(1, [(1, addr)].into(), data);
    cc.engine = config();
    cc.raft_log = raft_log_config;
    let err = chatlog_raft::ClusterNode::start(cc, listener)
        .await
        .expect_err("the node refuses to start");
    let why = err.to_string();
    assert!(
        why.contains("has applied up to None") && why.contains("starts after Some(5)"),
        "{why}"
    );
}

/// Entries `from..=to`, each a group of sends by alice and bob to `g1` (large bodies, so a
/// few hundred of them fill several small segments).
fn sends_between(from: u64, to: u64) -> Vec<Entry> {
    (from..=to)
        .map(|i| {
            let ops = (0..4)
                .map(|k| Op::Send {
                    user: if k % 2 == 0 { "alice" } else { "bob" }.into(),
                    chat: "g1".into(),
                    cmid: format!("m-{i}-{k}"),
                    body: Some(format!("{i}-{k}-{}", "x".repeat(300))),
                    file: None,
                })
                .collect();
            entry(i, ops)
        })
        .collect()
}

/// A snapshot is begun between two applies and finished while more entries are applied: it
/// holds exactly the state at its begin (sealed engine segments linked, the last one copied
/// up to the applied entry, the index tail not ingested but replayed by the install), and a
/// replica that installs it and applies the rest matches the one that applied everything.
/// The replica's own current snapshot is then the installed state.
#[tokio::test]
async fn a_snapshot_finished_during_later_applies_holds_the_state_at_its_begin() {
    use openraft::RaftSnapshotBuilder;
    let small = || {
        let mut c = config();
        c.log.segment_size_bytes = 64 << 10;
        c.log.entry_size_bytes_max = 16 << 10;
        c
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut source = StateMachine::open(&tmp.path().join("source"), small()).unwrap();
    let mut first = entries();
    first.extend(sends_between(4, 300));
    for e in first {
        source.apply(vec![e]).await.unwrap();
    }
    let sealed = std::fs::read_dir(tmp.path().join("source").join("0").join("log"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(".idx")
        })
        .count();
    assert!(sealed >= 3, "the engine log has sealed segments ({sealed})");
    let mut builder = source.get_snapshot_builder().await;
    // Applied after the begin: not in the snapshot.
    for e in sends_between(301, 340) {
        source.apply(vec![e]).await.unwrap();
    }
    let built = builder.build_snapshot().await.unwrap();
    assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(300));
    // What a follower is sent: the current snapshot, packed from its directory.
    let snapshot = source.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(snapshot.meta, built.meta);

    // The state at the begin, from a replica that applied only that far.
    let (_, at_300) = {
        let mut e = entries();
        e.extend(sends_between(4, 300));
        apply(&tmp.path().join("reference"), e).await
    };
    let mut replica = StateMachine::open(&tmp.path().join("replica"), small()).unwrap();
    replica
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    let (applied, _) = replica.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(300));
    assert_eq!(digest(&replica.cell().get()).unwrap(), at_300);
    let again = replica.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(again.meta.last_log_id.map(|l| l.index), Some(300));
    for e in sends_between(301, 340) {
        replica.apply(vec![e]).await.unwrap();
    }
    assert_eq!(
        digest(&replica.cell().get()).unwrap(),
        digest(&source.cell().get()).unwrap()
    );
}

/// The current snapshot's bundle is packed only when read: at start-up openraft asks for the
/// current snapshot for its meta alone. A handle read after a newer snapshot replaced its
/// directory fails and says so (openraft asks again).
#[tokio::test]
async fn a_snapshot_is_packed_only_when_read() {
    use openraft::RaftSnapshotBuilder;
    use tokio::io::AsyncReadExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sm");
    {
        let mut sm = StateMachine::open(&dir, config()).unwrap();
        for e in entries() {
            sm.apply(vec![e]).await.unwrap();
        }
        let built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert!(!built.snapshot.is_packed(), "building packs nothing");
    }
    let mut sm = StateMachine::open(&dir, config()).unwrap();
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(3));
    assert!(
        !current.snapshot.is_packed(),
        "asking for the snapshot packs nothing"
    );
    let stale = sm.get_current_snapshot().await.unwrap().unwrap();

    let mut data = current.snapshot;
    let mut bundle = Vec::new();
    data.read_to_end(&mut bundle).await.unwrap();
    assert!(data.is_packed());
    assert!(
        bundle.len() > 1000,
        "the bundle holds the state ({} bytes)",
        bundle.len()
    );

    // A newer snapshot replaces the one the stale handle names; the handle still reads its
    // own (openraft reads a snapshot a while after asking for it, and a failed read stops
    // the Raft core), and its directory goes with the last holder.
    sm.apply(sends_between(4, 5)).await.unwrap();
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let snapshot_dirs = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("snapshot-")
            })
            .count()
    };
    assert_eq!(snapshot_dirs(), 2, "the stale handle keeps its directory");
    let mut stale_data = stale.snapshot;
    let mut stale_bundle = Vec::new();
    stale_data.read_to_end(&mut stale_bundle).await.unwrap();
    assert!(
        stale_bundle == bundle,
        "the stale handle reads its own snapshot"
    );
    drop(stale_data);
    assert_eq!(snapshot_dirs(), 1, "the replaced directory is removed");
    let newest = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(newest.meta.last_log_id.map(|l| l.index), Some(5));
}
