//! The state machine: the chat engine applying replicated operations deterministically.
//!
//! Each `apply` call becomes one engine group ([`Engine::apply_replicated`]) ending in an
//! `Applied` record whose marker holds the last applied log id and the membership, so the
//! engine's own durable state says exactly which Raft entries it contains: after a crash
//! `applied_state` reports that, and openraft re-applies what follows from the Raft log.
//!
//! Snapshots are built from the engine itself: a RocksDB checkpoint of the indexes plus the
//! engine log's entries ([`Engine::checkpoint`]), bundled into one byte string. Installing one
//! opens a new engine directory from the bundle and swaps it into the [`EngineCell`].

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chatlog::engine::{Engine, EngineConfig, PendingCheckpoint};
use chatlog::log::{Durability, RecoveryMode};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cell::EngineCell;
use crate::log_store::write_atomic;
use crate::types::{Entry, LogId, Response, StorageError, StoredMembership, TypeConfig, any};

/// What the engine's `Applied` records carry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Marker {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// The current snapshot, kept as `snapshot.data` (the bundle) and `snapshot.meta` (postcard),
/// the meta written last: a snapshot without its meta does not exist.
///
/// Replacing the pair and reading it take one lock, so a reader never sees the moment between
/// the old meta's removal and the new one's rename. It did: openraft asks for the current
/// snapshot to send to a follower behind the purged log, and a missing one is a fatal
/// storage error (the leader's Raft core quit with "when Read Snapshot(None): snapshot not
/// found" in `wiped_node_catches_up_from_a_snapshot`, under load, while the next snapshot was
/// being saved).
#[derive(Debug)]
struct SnapshotFiles {
    dir: PathBuf,
    lock: Mutex<()>,
}

type Meta = SnapshotMeta<u64, openraft::BasicNode>;

impl SnapshotFiles {
    fn new(dir: &Path) -> SnapshotFiles {
        SnapshotFiles {
            dir: dir.to_path_buf(),
            lock: Mutex::new(()),
        }
    }

    fn save(&self, meta: &Meta, data: &[u8]) -> std::io::Result<()> {
        let meta = postcard::to_allocvec(meta).map_err(|e| other(e.to_string()))?;
        let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = std::fs::remove_file(self.dir.join("snapshot.meta"));
        write_atomic(&self.dir.join("snapshot.data"), data)?;
        write_atomic(&self.dir.join("snapshot.meta"), &meta)
    }

    /// The current snapshot's meta and bundle, if there is one.
    fn load(&self) -> std::io::Result<Option<(Meta, Vec<u8>)>> {
        let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let meta = match std::fs::read(self.dir.join("snapshot.meta")) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = postcard::from_bytes(&meta).map_err(|e| other(e.to_string()))?;
        let data = std::fs::read(self.dir.join("snapshot.data"))?;
        Ok(Some((meta, data)))
    }
}

fn sm_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageError::IO {
        source: StorageIOError::write_state_machine(any(&e)),
    }
}

fn snap_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageError::IO {
        source: StorageIOError::write_snapshot(None, any(&e)),
    }
}

fn other(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    config: EngineConfig,
    cell: Arc<EngineCell>,
    last: Mutex<Marker>,
    applied: watch::Sender<u64>,
    snapshot_counter: Mutex<u64>,
    snapshot: SnapshotFiles,
}

/// The Raft state machine over a chat engine.
#[derive(Debug, Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

fn current_generation(dir: &Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(dir.join("CURRENT")) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|e| other(format!("{}: {e}", dir.join("CURRENT").display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// How long a replica's engine log may hold written, unsynced entries. Without a bound
/// ([`Durability::None`]) ten seconds of entries waited for the `fdatasync` that precedes
/// every index tail ingestion, and that sync held the log's writer, so every replica's
/// `apply` stalled for 5–40 ms at the same entry (the three ingest together). At 100 ms it
/// took 0–11 ms, for about ten more syncs a second per node (docs/benchmarks.md, "Where the
/// waves in p99 come from").
const ENGINE_LOG_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl StateMachine {
    /// Opens the engine under `dir` (`dir/<generation>`, the generation named by
    /// `dir/CURRENT`), as a replica.
    ///
    /// The engine's own log is written without an `fdatasync` per group
    /// ([`Durability::Interval`] of 100 ms, `ENGINE_LOG_SYNC_INTERVAL`): every entry it applies is
    /// already durable in the Raft log of a majority, so a sync per group bought nothing but a
    /// second fsync per entry on every node (and a serial wait inside `apply`). Its writer
    /// syncs it at most that long after a write, when a segment is sealed, and before every
    /// snapshot ([`Engine::checkpoint`]) and index tail ingestion; openraft purges Raft log
    /// entries only up to a snapshot, so the engine never depends on a purged entry. After a
    /// power loss the engine log may have lost an unsynced tail, or have holes in it: it is
    /// cut at the first bad frame ([`RecoveryMode::Repair`]), indexes ahead of it are
    /// rebuilt, and openraft applies the entries after the engine's marker again from the
    /// Raft log.
    pub fn open(dir: &Path, mut config: EngineConfig) -> Result<StateMachine, StorageError> {
        config.replicated = true;
        config.log.durability = Durability::Interval(ENGINE_LOG_SYNC_INTERVAL);
        config.log.recovery = RecoveryMode::Repair;
        std::fs::create_dir_all(dir).map_err(sm_err)?;
        let generation = current_generation(dir).map_err(sm_err)?;
        // Directories of other generations are left-overs of an interrupted install.
        for entry in std::fs::read_dir(dir).map_err(sm_err)? {
            let entry = entry.map_err(sm_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.parse::<u64>().is_ok_and(|g| g != generation) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let engine =
            Engine::open(dir.join(generation.to_string()), config.clone()).map_err(sm_err)?;
        let marker = read_marker(&engine)?;
        let applied = marker.last_applied.map_or(0, |l| l.index + 1);
        Ok(StateMachine {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                config,
                cell: EngineCell::new(Arc::new(engine)),
                last: Mutex::new(marker),
                applied: watch::channel(applied).0,
                snapshot_counter: Mutex::new(0),
                snapshot: SnapshotFiles::new(dir),
            }),
        })
    }

    /// The engine cell (the server reads the engine through it).
    pub fn cell(&self) -> Arc<EngineCell> {
        self.shared.cell.clone()
    }

    /// Watches the number of applied entries (last applied index + 1; 0 before any).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }
}

fn read_marker(engine: &Engine) -> Result<Marker, StorageError> {
    match engine.replicated_marker().map_err(sm_err)? {
        None => Ok(Marker::default()),
        Some(bytes) => postcard::from_bytes(&bytes).map_err(sm_err),
    }
}

/// Packs every file under `dir` into one byte string: per file, the path's length (u32 LE)
/// and bytes, the file's length (u64 LE), the stored length (u64 LE) and the stored bytes.
/// Trailing zeros (preallocated, unwritten segment space) are not stored; unpacking restores
/// the file's length.
fn pack(dir: &Path) -> std::io::Result<Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<u8>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                walk(root, &path, out)?;
            } else {
                let rel = path
                    .strip_prefix(root)
                    .map_err(|e| other(e.to_string()))?
                    .to_string_lossy()
                    .into_owned();
                let data = std::fs::read(&path)?;
                let stored = data.len() - data.iter().rev().take_while(|b| **b == 0).count();
                out.extend_from_slice(&(rel.len() as u32).to_le_bytes());
                out.extend_from_slice(rel.as_bytes());
                out.extend_from_slice(&(data.len() as u64).to_le_bytes());
                out.extend_from_slice(&(stored as u64).to_le_bytes());
                out.extend_from_slice(&data[..stored]);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// Restores a snapshot's bundle (a node's `snapshot.data`) as a standalone engine directory:
/// [`Engine::open`] on `dir` (without `replicated`) serves the chats as of the snapshot.
pub fn restore_bundle(bundle: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        return Err(other(format!("{} exists and is not empty", dir.display())));
    }
    let bytes = std::fs::read(bundle)?;
    unpack(&bytes, dir)
}

/// Unpacks a bundle made by [`pack`] into `dir`, refusing paths that leave it and truncated
/// or inconsistent bundles.
fn unpack(bytes: &[u8], dir: &Path) -> std::io::Result<()> {
    let bad = |what: &str| other(format!("snapshot bundle: {what}"));
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> std::io::Result<&'a [u8]> {
        if rest.len() < n {
            return Err(other("snapshot bundle: truncated".into()));
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head)
    }
    let mut rest = bytes;
    let rest = &mut rest;
    std::fs::create_dir_all(dir)?;
    while !rest.is_empty() {
        let len = take(rest, 4)?;
        let path_len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let rel =
            std::str::from_utf8(take(rest, path_len)?).map_err(|_| bad("path is not UTF-8"))?;
        let file_len = u64::from_le_bytes(take(rest, 8)?.try_into().expect("8 bytes"));
        let stored = u64::from_le_bytes(take(rest, 8)?.try_into().expect("8 bytes"));
        if stored > file_len {
            return Err(bad("stored bytes exceed the file length"));
        }
        let data = take(
            rest,
            usize::try_from(stored).map_err(|_| bad("file too large"))?,
        )?;
        let rel_path = Path::new(rel);
        if rel_path.is_absolute()
            || rel_path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad(&format!("bad path {rel:?}")));
        }
        let path = dir.join(rel_path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::File::create(&path)?;
        use std::io::Write;
        (&file).write_all(data)?;
        file.set_len(file_len)?;
    }
    // Make the files durable before the directory becomes current.
    sync_tree(dir)
}

fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Builds a snapshot from a checkpoint begun between two applies.
#[derive(Debug)]
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
    /// The engine the checkpoint was begun on, its directory and the pending checkpoint.
    checkpoint: Result<(Arc<Engine>, PathBuf, PendingCheckpoint), String>,
    marker: Marker,
    id: String,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (engine, dir, pending) = std::mem::replace(
            &mut self.checkpoint,
            Err("the checkpoint was used by an earlier build".into()),
        )
        .map_err(|e| snap_err(other(e)))?;
        let meta = SnapshotMeta {
            last_log_id: self.marker.last_applied,
            last_membership: self.marker.membership.clone(),
            snapshot_id: self.id.clone(),
        };
        let shared = self.shared.clone();
        let meta2 = meta.clone();
        let data = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            engine
                .checkpoint_finish(pending)
                .map_err(|e| other(e.to_string()))?;
            drop(engine);
            let data = pack(&dir)?;
            let _ = std::fs::remove_dir_all(&dir);
            shared.snapshot.save(&meta2, &data)?;
            Ok(data)
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        tracing::info!(id = %meta.snapshot_id, bytes = data.len(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let last = self.shared.last.lock().unwrap_or_else(|e| e.into_inner());
        Ok((last.last_applied, last.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut marker = self
            .shared
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut ops = Vec::new();
        // Per entry: Some(range) = its operations' answers, None = a Raft-internal entry.
        let mut slots = Vec::new();
        for entry in entries {
            marker.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => slots.push(None),
                EntryPayload::Normal(req) => {
                    slots.push(Some(ops.len()..ops.len() + req.ops.len()));
                    ops.extend(req.ops);
                }
                EntryPayload::Membership(m) => {
                    marker.membership = StoredMembership::new(Some(entry.log_id), m);
                    slots.push(None);
                }
            }
        }
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let bytes = postcard::to_allocvec(&marker).map_err(sm_err)?;
        let engine = self.shared.cell.get();
        let started = std::time::Instant::now();
        let answers = engine.apply_replicated(ops, bytes).await.map_err(sm_err)?;
        metrics::histogram!(crate::stages::APPLY).record(started.elapsed().as_secs_f64());
        let out = slots
            .into_iter()
            .map(|slot| match slot {
                Some(range) => Response(answers[range].to_vec()),
                None => Response(Vec::new()),
            })
            .collect();
        let applied = marker.last_applied.map_or(0, |l| l.index + 1);
        *self.shared.last.lock().unwrap_or_else(|e| e.into_inner()) = marker;
        self.shared.applied.send_replace(applied);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let marker = self
            .shared
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let n = {
            let mut c = self
                .shared
                .snapshot_counter
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *c += 1;
            *c
        };
        let (term, index) = marker
            .last_applied
            .map_or((0, 0), |l| (l.leader_id.term, l.index));
        let id = format!("{term}-{index}-{n}");
        let dir = self.shared.dir.join(format!("build-{id}"));
        let engine = self.shared.cell.get();
        let d = dir.clone();
        // The checkpoint is begun here, between two applies, so it matches `marker` exactly;
        // the rest of it (copying the log's last segment) waits for `build_snapshot`, which
        // does not hold up applies.
        let checkpoint = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&d);
            let pending = engine.checkpoint_begin(&d).map_err(|e| e.to_string())?;
            Ok((engine, d, pending))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        SnapshotBuilder {
            shared: self.shared.clone(),
            checkpoint,
            marker,
            id,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        let data = snapshot.into_inner();
        let meta = meta.clone();
        let (engine, marker) = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
            let generation = current_generation(&shared.dir).map_err(snap_err)? + 1;
            let dir = shared.dir.join(generation.to_string());
            let _ = std::fs::remove_dir_all(&dir);
            unpack(&data, &dir).map_err(snap_err)?;
            let engine = Engine::open(&dir, shared.config.clone()).map_err(snap_err)?;
            let marker = read_marker(&engine)?;
            if marker.last_applied != meta.last_log_id {
                return Err(snap_err(other(format!(
                    "snapshot {} holds log id {:?}, its meta says {:?}",
                    meta.snapshot_id, marker.last_applied, meta.last_log_id
                ))));
            }
            write_atomic(
                &shared.dir.join("CURRENT"),
                generation.to_string().as_bytes(),
            )
            .map_err(snap_err)?;
            shared.snapshot.save(&meta, &data).map_err(snap_err)?;
            Ok((engine, marker))
        })
        .await
        .map_err(snap_err)??;
        let applied = marker.last_applied.map_or(0, |l| l.index + 1);
        *self.shared.last.lock().unwrap_or_else(|e| e.into_inner()) = marker;
        let old = self.shared.cell.replace(Arc::new(engine));
        // Close and remove the old engine if nobody else holds it any more; otherwise its
        // directory is removed at the next open.
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(old) = Arc::try_unwrap(old) {
                let dir = old.dir().to_path_buf();
                old.close();
                let _ = std::fs::remove_dir_all(dir);
            }
        })
        .await;
        self.shared.applied.send_replace(applied);
        tracing::info!(applied, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let shared = self.shared.clone();
        let loaded = tokio::task::spawn_blocking(move || shared.snapshot.load())
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        Ok(loaded.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn meta(i: u64) -> Meta {
        Meta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
            snapshot_id: i.to_string(),
        }
    }

    fn data(i: u64) -> Vec<u8> {
        vec![(i % 251) as u8; 64 * 1024]
    }

    /// While snapshots are replaced, a reader always finds one, and its bundle is the one its
    /// meta names. It fails without the lock: the reader then sees no meta between the old
    /// one's removal and the new one's rename.
    #[test]
    fn the_snapshot_is_never_missing_while_it_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Arc::new(SnapshotFiles::new(dir.path()));
        files.save(&meta(0), &data(0)).expect("first save");
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (files, done) = (files.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 1..=100 {
                    files.save(&meta(i), &data(i)).expect("save");
                }
                done.store(true, Ordering::Release);
            })
        };
        let mut reads = 0;
        while !done.load(Ordering::Acquire) {
            let (m, d) = files
                .load()
                .expect("load")
                .expect("a snapshot is always there");
            let i: u64 = m.snapshot_id.parse().expect("a numeric id");
            assert_eq!(d, data(i), "snapshot {i}'s bundle");
            reads += 1;
        }
        writer.join().expect("writer");
        assert!(reads > 0);
    }
}
