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

use std::io::{Seek, Write};
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
use crate::snapshot_data::SnapshotData;
use crate::types::{Entry, LogId, Response, StorageError, StoredMembership, TypeConfig, any};

/// What the engine's `Applied` records carry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Marker {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// The current snapshot: a finished engine checkpoint kept as a directory
/// (`snapshot-<id>`, its sealed segments and SST files hard links into the engine's), named
/// with its meta by `snapshot.current` (postcard, written last: a snapshot whose name file
/// does not name it does not exist). Building one therefore writes almost nothing: the byte
/// bundle a follower needs ([`pack`]) is made when a follower asks for it
/// ([`SnapshotFiles::load`]), streamed to a temporary file, never held in memory.
///
/// `snapshot.data` and `snapshot.meta` are a bundle and its meta written on request
/// ([`SnapshotFiles::export`], the admin snapshot endpoint) for backups, and read as the
/// current snapshot only when there is no `snapshot.current` (a node snapshotted by an
/// earlier version).
///
/// Replacing the current snapshot and naming it take one lock, so a reader never sees the
/// moment between two snapshots. It did once: openraft asks for the current snapshot to send
/// to a follower behind the purged log, and a missing one is a fatal storage error (the
/// leader's Raft core quit with "when Read Snapshot(None): snapshot not found" in
/// `wiped_node_catches_up_from_a_snapshot`, under load, while the next snapshot was saved).
///
/// A snapshot handed out stays readable after it is replaced: its directory is a
/// [`SnapshotDir`] every holder shares, removed when the last one lets go. openraft reads a
/// snapshot a while after asking for it (a replication stream in backoff towards a dead
/// follower), and a failed read is as fatal: the leader's Raft core quit with "snapshot ... was
/// replaced by a newer one before it was read" in the same test, when it still removed the
/// directory at once.
#[derive(Debug)]
pub(crate) struct SnapshotFiles {
    dir: PathBuf,
    /// The current snapshot's directory, once saved or handed out.
    current: Mutex<Option<Arc<SnapshotDir>>>,
}

/// A snapshot directory, removed when it has been replaced and its last holder lets it go.
#[derive(Debug)]
pub(crate) struct SnapshotDir {
    name: String,
    path: PathBuf,
    replaced: std::sync::atomic::AtomicBool,
}

impl SnapshotDir {
    fn new(root: &Path, name: &str) -> Arc<SnapshotDir> {
        Arc::new(SnapshotDir {
            name: name.to_owned(),
            path: root.join(name),
            replaced: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl Drop for SnapshotDir {
    fn drop(&mut self) {
        if self.replaced.load(std::sync::atomic::Ordering::Acquire) {
            // Left behind on failure, `SnapshotFiles::clean` removes it at the next open.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

type Meta = SnapshotMeta<u64, openraft::BasicNode>;

/// Where a snapshot's bundle comes from.
#[derive(Debug, Clone)]
pub(crate) enum BundleSource {
    /// A snapshot directory (`snapshot-<id>-<stamp>`), packed when read; kept while held.
    Dir(Arc<SnapshotDir>),
    /// An exported bundle (`snapshot.data`).
    Exported,
}

/// Names the current snapshot's directory, with its meta.
const CURRENT_SNAPSHOT: &str = "snapshot.current";
/// An exported bundle and its meta (backups; the current snapshot of earlier versions).
const EXPORTED_DATA: &str = "snapshot.data";
const EXPORTED_META: &str = "snapshot.meta";

impl SnapshotFiles {
    fn new(dir: &Path) -> SnapshotFiles {
        SnapshotFiles {
            dir: dir.to_path_buf(),
            current: Mutex::new(None),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Arc<SnapshotDir>>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared handle of directory `name`, the current snapshot's (the lock held).
    fn handle(held: &mut Option<Arc<SnapshotDir>>, root: &Path, name: &str) -> Arc<SnapshotDir> {
        match held {
            Some(dir) if dir.name == name => dir.clone(),
            _ => {
                let dir = SnapshotDir::new(root, name);
                if let Some(old) = held.replace(dir.clone()) {
                    // Named no more: replaced by a save (or `snapshot.current` changed).
                    old.replaced
                        .store(true, std::sync::atomic::Ordering::Release);
                }
                dir
            }
        }
    }

    /// The current snapshot's meta and directory name (the lock held).
    fn current_locked(&self) -> std::io::Result<Option<(Meta, String)>> {
        match std::fs::read(self.dir.join(CURRENT_SNAPSHOT)) {
            Ok(b) => postcard::from_bytes(&b)
                .map(Some)
                .map_err(|e| other(format!("{CURRENT_SNAPSHOT}: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes `built`, a finished checkpoint directory under this directory, the current
    /// snapshot, and removes the one before once nobody reads it.
    fn save(&self, meta: &Meta, built: &Path) -> std::io::Result<BundleSource> {
        let mut held = self.held();
        let previous = self.current_locked()?;
        // Unique even when a restarted node builds a snapshot with an earlier id again.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("snapshot-{}-{stamp}", meta.snapshot_id);
        std::fs::rename(built, self.dir.join(&name))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        let named = postcard::to_allocvec(&(meta, &name)).map_err(|e| other(e.to_string()))?;
        write_atomic(&self.dir.join(CURRENT_SNAPSHOT), &named)?;
        // A handed-out predecessor is marked replaced and goes with its last holder (now, if
        // there is none); one never handed out is removed here.
        let handed_out = held.is_some();
        let dir = Self::handle(&mut held, &self.dir, &name);
        if !handed_out && let Some((_, old)) = previous.filter(|(_, old)| *old != name) {
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
        Ok(BundleSource::Dir(dir))
    }

    /// The current snapshot's meta and where its bundle comes from, without packing it:
    /// its directory, or an earlier version's exported bundle.
    pub(crate) fn current(&self) -> std::io::Result<Option<(Meta, BundleSource)>> {
        let mut held = self.held();
        self.current_source_locked(&mut held)
    }

    fn current_source_locked(
        &self,
        held: &mut Option<Arc<SnapshotDir>>,
    ) -> std::io::Result<Option<(Meta, BundleSource)>> {
        if let Some((meta, name)) = self.current_locked()? {
            let dir = Self::handle(held, &self.dir, &name);
            return Ok(Some((meta, BundleSource::Dir(dir))));
        }
        let meta = match std::fs::read(self.dir.join(EXPORTED_META)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta =
            postcard::from_bytes(&meta).map_err(|e| other(format!("{EXPORTED_META}: {e}")))?;
        Ok(Some((meta, BundleSource::Exported)))
    }

    /// The bundle of a snapshot [`SnapshotFiles::current`] named: its directory packed into
    /// a temporary file (removed once the handle closes), or the exported file. The
    /// directory stays while `source` holds it, replaced or not, so no lock is taken: a
    /// save does not wait for a packing.
    pub(crate) fn open_bundle(&self, source: &BundleSource) -> std::io::Result<std::fs::File> {
        let dir = match source {
            BundleSource::Exported => return std::fs::File::open(self.dir.join(EXPORTED_DATA)),
            BundleSource::Dir(dir) => &dir.path,
        };
        if !dir.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("snapshot directory {} is missing", dir.display()),
            ));
        }
        let mut file = empty_file(&self.dir)?;
        pack(dir, &mut file)?;
        file.seek(std::io::SeekFrom::Start(0))?;
        Ok(file)
    }

    /// The current snapshot's meta and bundle (packed now).
    #[cfg(test)]
    fn load(&self) -> std::io::Result<Option<(Meta, std::fs::File)>> {
        match self.current()? {
            None => Ok(None),
            Some((meta, source)) => Ok(Some((meta, self.open_bundle(&source)?))),
        }
    }

    /// Writes the current snapshot as `snapshot.data` (its bundle) and `snapshot.meta`;
    /// returns its meta, or `None` if there is no snapshot.
    fn export(&self) -> std::io::Result<Option<Meta>> {
        let mut held = self.held();
        let (meta, dir) = match self.current_source_locked(&mut held)? {
            None => return Ok(None),
            // Already exported (the current snapshot of an earlier version).
            Some((meta, BundleSource::Exported)) => return Ok(Some(meta)),
            Some((meta, BundleSource::Dir(dir))) => (meta, dir),
        };
        let tmp = self.dir.join(format!("{EXPORTED_DATA}.tmp"));
        {
            let mut out = std::fs::File::create(&tmp)?;
            pack(&dir.path, &mut out)?;
            out.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(EXPORTED_DATA))?;
        let bytes = postcard::to_allocvec(&meta).map_err(|e| other(e.to_string()))?;
        write_atomic(&self.dir.join(EXPORTED_META), &bytes)?;
        Ok(Some(meta))
    }

    /// Removes what an interrupted build, save or load left behind: snapshot directories
    /// the name file does not name, checkpoints being built, temporary files.
    fn clean(&self) -> std::io::Result<()> {
        let _held = self.held();
        let current = self.current_locked()?.map(|(_, name)| name);
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_dir = (name.starts_with("snapshot-") || name.starts_with("build-"))
                && current.as_deref() != Some(name.as_str());
            if stale_dir && entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            } else if name.ends_with(".tmp") && entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
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
    snapshot: Arc<SnapshotFiles>,
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
        let snapshot = Arc::new(SnapshotFiles::new(dir));
        snapshot.clean().map_err(sm_err)?;
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
                snapshot,
            }),
        })
    }

    /// Writes the current snapshot as `snapshot.data` (the bundle [`restore_bundle`] reads)
    /// and `snapshot.meta` in the state machine's directory, for a backup; returns the
    /// snapshot's last log index (`Ok(None)`: there is no snapshot yet). Blocks: call it
    /// off the async threads.
    pub fn export_snapshot(&self) -> std::io::Result<Option<u64>> {
        Ok(self
            .shared
            .snapshot
            .export()?
            .map(|meta| meta.last_log_id.map_or(0, |l| l.index)))
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

/// Bytes copied per read when a bundle is written or read.
const BUNDLE_CHUNK_BYTES: usize = 1 << 20;

/// Length of `file` without its trailing zeros (preallocated, unwritten segment space), read
/// backwards a chunk at a time.
fn stored_len(file: &std::fs::File, len: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; BUNDLE_CHUNK_BYTES];
    let mut end = len;
    while end > 0 {
        let n = end.min(BUNDLE_CHUNK_BYTES as u64) as usize;
        let chunk = &mut buf[..n];
        file.read_exact_at(chunk, end - n as u64)?;
        if let Some(last) = chunk.iter().rposition(|b| *b != 0) {
            return Ok(end - n as u64 + last as u64 + 1);
        }
        end -= n as u64;
    }
    Ok(0)
}

/// Writes every file under `dir` to `out` as one bundle: per file, the path's length (u32
/// LE) and bytes, the file's length (u64 LE), the stored length (u64 LE) and the stored
/// bytes. Trailing zeros (preallocated, unwritten segment space) are not stored; unpacking
/// restores the file's length. Streams through a buffer: memory does not grow with the files.
fn pack(dir: &Path, out: &mut std::fs::File) -> std::io::Result<()> {
    fn walk(root: &Path, dir: &Path, out: &mut impl std::io::Write) -> std::io::Result<()> {
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
                let file = std::fs::File::open(&path)?;
                let len = file.metadata()?.len();
                let stored = stored_len(&file, len)?;
                out.write_all(&(rel.len() as u32).to_le_bytes())?;
                out.write_all(rel.as_bytes())?;
                out.write_all(&len.to_le_bytes())?;
                out.write_all(&stored.to_le_bytes())?;
                let copied = std::io::copy(&mut std::io::Read::take(&file, stored), out)?;
                if copied != stored {
                    return Err(other(format!(
                        "{} shrank while it was packed",
                        path.display()
                    )));
                }
            }
        }
        Ok(())
    }
    let mut buffered = std::io::BufWriter::with_capacity(BUNDLE_CHUNK_BYTES, out);
    walk(dir, dir, &mut buffered)?;
    buffered.flush()
}

/// Restores a snapshot's bundle (`snapshot.data`, exported by the admin snapshot endpoint) as
/// a standalone engine directory: [`Engine::open`] on `dir` (without `replicated`) serves the
/// chats as of the snapshot.
pub fn restore_bundle(bundle: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        return Err(other(format!("{} exists and is not empty", dir.display())));
    }
    let file = std::fs::File::open(bundle)?;
    let existed = dir.exists();
    let result = unpack(
        std::io::BufReader::with_capacity(BUNDLE_CHUNK_BYTES, file),
        dir,
    );
    if result.is_err() {
        // Leave the directory as it was (absent or empty), so that a retry with a good bundle
        // is not refused for what the bad one left.
        let _ = std::fs::remove_dir_all(dir);
        if existed {
            let _ = std::fs::create_dir_all(dir);
        }
    }
    result
}

/// Unpacks a bundle made by [`pack`] into `dir`, refusing paths that leave it and truncated
/// or inconsistent bundles. Streams, like `pack`.
fn unpack(mut input: impl std::io::Read, dir: &Path) -> std::io::Result<()> {
    use std::io::Read;
    let bad = |what: &str| other(format!("snapshot bundle: {what}"));
    let truncated = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => bad("truncated"),
        _ => e,
    };
    std::fs::create_dir_all(dir)?;
    loop {
        // A record's first byte, or the bundle's clean end.
        let mut len = [0u8; 4];
        if input.read(&mut len[..1])? == 0 {
            break;
        }
        input.read_exact(&mut len[1..]).map_err(truncated)?;
        let path_len = u32::from_le_bytes(len) as usize;
        if path_len > 4096 {
            return Err(bad(
                "a path longer than 4096 bytes: not a snapshot bundle, or a damaged one \
                 (pass the `snapshot.data` that `cluster snapshot` wrote, not `snapshot.meta`)",
            ));
        }
        let mut rel = vec![0u8; path_len];
        input.read_exact(&mut rel).map_err(truncated)?;
        let rel = String::from_utf8(rel).map_err(|_| bad("path is not UTF-8"))?;
        let mut word = [0u8; 8];
        input.read_exact(&mut word).map_err(truncated)?;
        let file_len = u64::from_le_bytes(word);
        input.read_exact(&mut word).map_err(truncated)?;
        let stored = u64::from_le_bytes(word);
        if stored > file_len {
            return Err(bad("stored bytes exceed the file length"));
        }
        let rel_path = Path::new(&rel);
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
        let mut file = std::fs::File::create(&path)?;
        let copied = std::io::copy(&mut (&mut input).take(stored), &mut file)?;
        if copied != stored {
            return Err(bad("truncated"));
        }
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
        let started = std::time::Instant::now();
        let source = tokio::task::spawn_blocking(move || -> std::io::Result<BundleSource> {
            engine
                .checkpoint_finish(pending)
                .map_err(|e| other(e.to_string()))?;
            drop(engine);
            shared.snapshot.save(&meta2, &dir)
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        metrics::histogram!(crate::stages::SNAPSHOT_BUILD).record(started.elapsed().as_secs_f64());
        tracing::info!(
            id = %meta.snapshot_id,
            took_ms = started.elapsed().as_millis() as u64,
            "snapshot built"
        );
        // Packed only if read: openraft keeps just the meta of a snapshot it had built.
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::lazy(self.shared.snapshot.clone(), source)),
        })
    }
}

/// An empty, already removed file in `dir` (for a bundle being packed or received).
fn empty_file(dir: &Path) -> std::io::Result<std::fs::File> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("scratch-{}-{n}.tmp", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
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
        let started = std::time::Instant::now();
        let checkpoint = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&d);
            let pending = engine.checkpoint_begin(&d).map_err(|e| e.to_string())?;
            Ok((engine, d, pending))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        metrics::histogram!(crate::stages::SNAPSHOT_PAUSE).record(started.elapsed().as_secs_f64());
        tracing::info!(
            id,
            applies_paused_ms = started.elapsed().as_millis() as u64,
            "snapshot checkpoint begun"
        );
        SnapshotBuilder {
            shared: self.shared.clone(),
            checkpoint,
            marker,
            id,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let dir = self.shared.dir.clone();
        let file = tokio::task::spawn_blocking(move || empty_file(&dir))
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        Ok(Box::new(SnapshotData::file(tokio::fs::File::from_std(
            file,
        ))))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        let mut bundle = snapshot.into_std().await.map_err(snap_err)?;
        let meta = meta.clone();
        let (engine, marker) = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
            bundle.seek(std::io::SeekFrom::Start(0)).map_err(snap_err)?;
            let generation = current_generation(&shared.dir).map_err(snap_err)? + 1;
            let dir = shared.dir.join(generation.to_string());
            let _ = std::fs::remove_dir_all(&dir);
            unpack(
                std::io::BufReader::with_capacity(BUNDLE_CHUNK_BYTES, bundle),
                &dir,
            )
            .map_err(snap_err)?;
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
            // The installed state becomes this node's current snapshot (a checkpoint of the
            // engine just opened: nothing has been applied to it yet).
            let built = shared
                .dir
                .join(format!("build-install-{}", meta.snapshot_id));
            let _ = std::fs::remove_dir_all(&built);
            engine.checkpoint(&built).map_err(snap_err)?;
            shared.snapshot.save(&meta, &built).map_err(snap_err)?;
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

    /// The current snapshot's meta, its bundle packed only when read (at start-up openraft
    /// reads only the meta).
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let files = self.shared.snapshot.clone();
        let current = tokio::task::spawn_blocking(move || files.current())
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        Ok(current.map(|(meta, source)| Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::lazy(self.shared.snapshot.clone(), source)),
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
        let mut d = vec![(i % 251) as u8; 64 * 1024];
        // Trailing zeros are not stored in a bundle but restored from the file's length.
        d.extend([0u8; 1000]);
        d
    }

    /// A finished "checkpoint" directory for snapshot `i`: one data file, one in a subdirectory.
    fn built(root: &Path, i: u64) -> PathBuf {
        let dir = root.join(format!("build-{i}"));
        std::fs::create_dir_all(dir.join("log")).unwrap();
        std::fs::write(dir.join("log").join("seg"), data(i)).unwrap();
        std::fs::write(dir.join("id"), i.to_string()).unwrap();
        dir
    }

    /// The names of the snapshot directories under `root`, sorted.
    fn snapshot_dirs(root: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("snapshot-"))
            .collect();
        names.sort();
        names
    }

    /// Unpacks a loaded bundle and returns the snapshot id its files hold.
    fn unpacked_id(bundle: std::fs::File, into: &Path) -> u64 {
        unpack(std::io::BufReader::new(bundle), into).expect("the bundle unpacks");
        let i: u64 = std::fs::read_to_string(into.join("id"))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            std::fs::read(into.join("log").join("seg")).unwrap(),
            data(i)
        );
        i
    }

    /// While snapshots are replaced, a reader always finds one, and its bundle is the one its
    /// meta names; replaced snapshots' directories are removed. It fails without the lock
    /// (the reader finds none) or without the shared handle (it packs a directory the writer
    /// is removing).
    #[test]
    fn the_snapshot_is_never_missing_while_it_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Arc::new(SnapshotFiles::new(dir.path()));
        files
            .save(&meta(0), &built(dir.path(), 0))
            .expect("first save");
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (files, done, root) = (files.clone(), done.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || {
                for i in 1..=60 {
                    files.save(&meta(i), &built(&root, i)).expect("save");
                }
                done.store(true, Ordering::Release);
            })
        };
        let mut reads = 0;
        while !done.load(Ordering::Acquire) {
            let (m, bundle) = files
                .load()
                .expect("load")
                .expect("a snapshot is always there");
            let i: u64 = m.snapshot_id.parse().expect("a numeric id");
            let into = dir.path().join(format!("read-{reads}"));
            assert_eq!(unpacked_id(bundle, &into), i, "snapshot {i}'s bundle");
            std::fs::remove_dir_all(into).unwrap();
            reads += 1;
        }
        writer.join().expect("writer");
        assert!(reads > 0);
        let left = snapshot_dirs(dir.path());
        assert_eq!(left.len(), 1, "replaced snapshots are removed: {left:?}");
    }

    /// A snapshot handed out is still read whole after newer ones replaced it (openraft
    /// reads it a while after asking: a replication stream in backoff), and its directory is
    /// removed when the last holder lets go. Removing it at once failed the read, which
    /// stopped the leader's Raft core.
    #[test]
    fn a_replaced_snapshot_stays_readable_while_it_is_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = SnapshotFiles::new(dir.path());
        files.save(&meta(1), &built(dir.path(), 1)).unwrap();
        let (m, held) = files.current().unwrap().expect("snapshot 1");
        assert_eq!(m.snapshot_id, "1");
        let held_twice = held.clone();
        files.save(&meta(2), &built(dir.path(), 2)).unwrap();
        files.save(&meta(3), &built(dir.path(), 3)).unwrap();
        let snapshot_dirs = || snapshot_dirs(dir.path());
        // 2 was never handed out: gone at once. 1 is held, 3 is current.
        assert_eq!(snapshot_dirs().len(), 2, "{:?}", snapshot_dirs());
        let bundle = files
            .open_bundle(&held)
            .expect("the replaced snapshot is read");
        assert_eq!(unpacked_id(bundle, &dir.path().join("read-1")), 1);
        drop(held);
        assert_eq!(snapshot_dirs().len(), 2, "a holder is left");
        drop(held_twice);
        let left = snapshot_dirs();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].starts_with("snapshot-3-"), "{left:?}");
        let (m, current) = files.load().unwrap().expect("snapshot 3");
        assert_eq!(m.snapshot_id, "3");
        assert_eq!(unpacked_id(current, &dir.path().join("read-3")), 3);
    }

    /// The export writes the current snapshot as a bundle `restore_bundle` reads, and a
    /// node of an earlier version (only `snapshot.meta` and `snapshot.data`) still serves
    /// that bundle; leftovers of interrupted builds and saves are removed by `clean`.
    #[test]
    fn exported_bundles_restore_and_leftovers_are_cleaned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = SnapshotFiles::new(dir.path());
        assert!(files.load().unwrap().is_none());
        assert!(files.export().unwrap().is_none());
        files.save(&meta(7), &built(dir.path(), 7)).unwrap();
        assert_eq!(
            files.export().unwrap().map(|m| m.snapshot_id),
            Some("7".into())
        );
        let restored = dir.path().join("restored");
        restore_bundle(&dir.path().join(EXPORTED_DATA), &restored).unwrap();
        assert_eq!(std::fs::read_to_string(restored.join("id")).unwrap(), "7");
        assert_eq!(
            std::fs::read(restored.join("log").join("seg")).unwrap(),
            data(7)
        );

        // Without `snapshot.current`, the exported pair is the current snapshot.
        std::fs::remove_file(dir.path().join(CURRENT_SNAPSHOT)).unwrap();
        let (m, bundle) = files.load().unwrap().expect("the exported snapshot");
        assert_eq!(m.snapshot_id, "7");
        assert_eq!(unpacked_id(bundle, &dir.path().join("legacy")), 7);

        // Leftovers: an unnamed snapshot directory (the one whose name file was removed
        // above), a checkpoint being built, a temporary file.
        built(dir.path(), 8);
        std::fs::write(dir.path().join("x.bundle.tmp"), b"partial").unwrap();
        files.clean().unwrap();
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.starts_with("snapshot-") || n.starts_with("build-") || n.ends_with(".tmp")
            })
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// Truncated or hostile bundles are refused with an error naming the problem.
    #[test]
    fn bad_bundles_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = SnapshotFiles::new(dir.path());
        files.save(&meta(3), &built(dir.path(), 3)).unwrap();
        let (_, mut bundle) = files.load().unwrap().unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut bundle, &mut bytes).unwrap();
        let cut = &bytes[..bytes.len() - 10];
        let err = unpack(cut, &dir.path().join("cut")).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut evil = Vec::new();
        let path = b"../escape";
        evil.extend((path.len() as u32).to_le_bytes());
        evil.extend(path);
        evil.extend(1u64.to_le_bytes());
        evil.extend(1u64.to_le_bytes());
        evil.push(1);
        let err = unpack(&evil[..], &dir.path().join("evil")).unwrap_err();
        assert!(err.to_string().contains("bad path"), "{err}");
        assert!(!dir.path().join("escape").exists());

        // Through `restore_bundle`: a failed restore leaves nothing behind, so a retry with
        // the good bundle works; a file that is no bundle at all says so.
        let target = dir.path().join("restored");
        let cut_file = dir.path().join("cut.data");
        std::fs::write(&cut_file, cut).unwrap();
        assert!(restore_bundle(&cut_file, &target).is_err());
        assert!(
            !target.exists(),
            "a failed restore left {}",
            target.display()
        );
        let garbage = dir.path().join("garbage.data");
        std::fs::write(&garbage, [0xffu8; 64]).unwrap();
        let err = restore_bundle(&garbage, &target).unwrap_err();
        assert!(err.to_string().contains("not a snapshot bundle"), "{err}");
        let good = dir.path().join("good.data");
        std::fs::write(&good, &bytes).unwrap();
        restore_bundle(&good, &target).unwrap();
        assert!(std::fs::read_dir(&target).unwrap().next().is_some());
    }
}
