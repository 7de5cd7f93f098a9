//! Presence as a service: the engine's pure [`chatlog::presence::Presence`] tracker behind a
//! lock, driven by connections (connect, heartbeat on inbound traffic, disconnect) and by an
//! expiry task, with subscriptions that push `{"ev":"presence",..}` on every change.
//! `last_seen` is written to the engine lazily (every [`LAST_SEEN_FLUSH_MS`]), never through
//! the log's fsync path.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatlog::engine::Clock;
use chatlog::presence::{Presence, PresenceChange, PresenceConfig, PresenceState};
use chatlog_raft::EngineCell;
use tungstenite::Utf8Bytes;

use crate::hub::{Outbox, Push};
use crate::protocol;

/// How often dirty `last_seen` values are persisted.
pub const LAST_SEEN_FLUSH_MS: u64 = 5_000;
/// The expiry task looks at least this often (covers injected clocks that jump).
const EXPIRY_TICK_MS_MAX: u64 = 100;

/// How long a user another node reported online stays online here without a refresh: a
/// node that dies takes its users offline everywhere within this.
pub const REMOTE_ONLINE_TTL_MS: u64 = 800;
/// Every node sends its full list of online users this often (and each change at once).
pub const GOSSIP_FULL_MS: u64 = 250;

/// Presence one node tells the others (cluster mode): users online on it, and users that
/// went offline on it with their `last_seen`. Never in the Raft log.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PresenceGossip {
    /// Users online on the sender.
    pub online: Vec<String>,
    /// Users that went offline on the sender, with their `last_seen` (ms).
    pub offline: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Remote {
    /// Online until this time (ms) unless refreshed; 0 = offline.
    online_until: u64,
    last_seen: Option<u64>,
}

/// Presence tracker plus watchers.
pub struct PresenceHub {
    tracker: Mutex<Presence>,
    /// Users with a session on this node (from the tracker's transitions).
    local_online: Mutex<HashSet<Arc<str>>>,
    /// Other nodes' reports: user → node → state.
    remote: Mutex<HashMap<Arc<str>, HashMap<u64, Remote>>>,
    /// The online flag last pushed to watchers per user (merged over nodes); absent = offline.
    shown: Mutex<HashMap<Arc<str>, bool>>,
    /// Local transitions not yet gossiped.
    outgoing: Mutex<Vec<PresenceChange>>,
    /// Woken when `outgoing` gets something.
    pub gossip_wake: tokio::sync::Notify,
    /// Watched user → connections watching it.
    watchers: Mutex<HashMap<Arc<str>, Vec<Arc<Outbox>>>>,
    clock: Clock,
    cell: Arc<EngineCell>,
}

impl std::fmt::Debug for PresenceHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceHub").finish_non_exhaustive()
    }
}

/// Why a session could not be tracked.
#[derive(Debug)]
pub struct TooManySessions;

impl PresenceHub {
    /// A tracker with the given TTL.
    pub fn new(cell: Arc<EngineCell>, ttl_ms: u64) -> PresenceHub {
        PresenceHub {
            tracker: Mutex::new(Presence::new(PresenceConfig {
                ttl_ms,
                ..PresenceConfig::default()
            })),
            watchers: Mutex::new(HashMap::new()),
            local_online: Mutex::new(HashSet::new()),
            remote: Mutex::new(HashMap::new()),
            shown: Mutex::new(HashMap::new()),
            outgoing: Mutex::new(Vec::new()),
            gossip_wake: tokio::sync::Notify::new(),
            clock: cell.get().config().clock.clone(),
            cell,
        }
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Presence> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session connected.
    pub fn connect(&self, user: &str, session: u64) -> Result<(), TooManySessions> {
        let now = self.now();
        let changes = self
            .tracker()
            .connect(user, session, now)
            .map_err(|_| TooManySessions)?;
        self.publish(&changes);
        Ok(())
    }

    /// A session showed a sign of life.
    pub fn heartbeat(&self, user: &str, session: u64) {
        let now = self.now();
        let changes = self.tracker().heartbeat(user, session, now);
        if let Ok(changes) = changes {
            self.publish(&changes);
        }
    }

    /// A session closed.
    pub fn disconnect(&self, user: &str, session: u64) {
        let now = self.now();
        let changes = self.tracker().disconnect(user, session, now);
        self.publish(&changes);
    }

    /// The state of `user` now, merged over this node and (in a cluster) the others: online
    /// if online anywhere, the latest `last_seen`.
    fn effective(&self, user: &str, now: u64) -> PresenceState {
        let mut state = self.tracker().get(user, now);
        let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(nodes) = remote.get(user) {
            for r in nodes.values() {
                state.online |= r.online_until > now;
                state.last_seen_ms = state.last_seen_ms.max(r.last_seen);
            }
        }
        state
    }

    /// Whether `user` is online on any node (no storage read).
    pub fn is_online(&self, user: &str) -> bool {
        self.effective(user, self.now()).online
    }

    /// The state of `user` now (persisted `last_seen` for users not seen since start).
    pub fn get(&self, user: &str) -> PresenceState {
        let now = self.now();
        let state = self.effective(user, now);
        if state.last_seen_ms.is_none()
            && let Ok(Some(seen)) = self.cell.get().last_seen(user)
        {
            return PresenceState {
                online: false,
                last_seen_ms: Some(seen),
            };
        }
        state
    }

    /// `outbox` watches `users`.
    pub fn watch(&self, outbox: &Arc<Outbox>, users: &[String]) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for user in users {
            let list = watchers.entry(Arc::from(user.as_str())).or_default();
            if !list.iter().any(|o| o.id == outbox.id) {
                list.push(outbox.clone());
            }
        }
    }

    /// `outbox` stops watching `users`.
    pub fn unwatch(&self, outbox: &Outbox, users: &[String]) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for user in users {
            if let Some(list) = watchers.get_mut(user.as_str()) {
                list.retain(|o| o.id != outbox.id);
                if list.is_empty() {
                    watchers.remove(user.as_str());
                }
            }
        }
    }

    /// Local transitions: remembered for gossip, then shown as the merged state.
    fn publish(&self, changes: &[PresenceChange]) {
        if changes.is_empty() {
            return;
        }
        {
            let mut local = self.local_online.lock().unwrap_or_else(|e| e.into_inner());
            for c in changes {
                if c.online {
                    local.insert(c.user.clone());
                } else {
                    local.remove(&c.user);
                }
            }
        }
        self.outgoing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(changes.iter().cloned());
        self.gossip_wake.notify_one();
        let now = self.now();
        for change in changes {
            self.show(&change.user, now);
        }
    }

    /// Pushes `user`'s merged state to its watchers if its online flag changed.
    fn show(&self, user: &Arc<str>, now: u64) {
        let state = self.effective(user, now);
        {
            let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
            let before = shown.get(user).copied().unwrap_or(false);
            if before == state.online {
                return;
            }
            if state.online {
                shown.insert(user.clone(), true);
            } else {
                shown.remove(user);
            }
        }
        let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = watchers.get(user) {
            let push = Push::Frame(Utf8Bytes::from(protocol::presence_push(
                user,
                state.online,
                state.last_seen_ms,
            )));
            for outbox in list {
                outbox.push(push.clone());
            }
        }
    }

    /// What to gossip now: the changes since the last call, or with `full` every user online
    /// here plus those changes.
    pub fn gossip_out(&self, full: bool) -> Option<PresenceGossip> {
        let changes = std::mem::take(&mut *self.outgoing.lock().unwrap_or_else(|e| e.into_inner()));
        let mut g = PresenceGossip::default();
        for c in &changes {
            if !c.online {
                g.offline
                    .push((c.user.to_string(), c.last_seen_ms.unwrap_or(0)));
            } else if !full {
                g.online.push(c.user.to_string());
            }
        }
        if full {
            let local = self.local_online.lock().unwrap_or_else(|e| e.into_inner());
            g.online = local.iter().map(|u| u.to_string()).collect();
        }
        (full || !changes.is_empty()).then_some(g)
    }

    /// Applies another node's report.
    pub fn gossip_in(&self, from: u64, g: PresenceGossip) {
        let now = self.now();
        let mut touched = Vec::with_capacity(g.online.len() + g.offline.len());
        {
            let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            for user in g.online {
                let user: Arc<str> = Arc::from(user);
                remote.entry(user.clone()).or_default().insert(
                    from,
                    Remote {
                        online_until: now + REMOTE_ONLINE_TTL_MS,
                        last_seen: Some(now),
                    },
                );
                touched.push(user);
            }
            for (user, seen) in g.offline {
                let user: Arc<str> = Arc::from(user);
                remote.entry(user.clone()).or_default().insert(
                    from,
                    Remote {
                        online_until: 0,
                        last_seen: Some(seen),
                    },
                );
                touched.push(user);
            }
        }
        for user in &touched {
            self.show(user, now);
        }
    }

    /// Remote users whose reports went stale go offline (their node stopped reporting).
    fn expire_remote(&self, now: u64) {
        let mut stale = Vec::new();
        {
            let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            remote.retain(|user, nodes| {
                for r in nodes.values_mut() {
                    if r.online_until != 0 && r.online_until <= now {
                        r.online_until = 0;
                        stale.push(user.clone());
                    }
                }
                // Offline reports are kept an hour for their last_seen (the owning node
                // persists it; this is the cluster-wide view meanwhile).
                nodes.retain(|_, r| {
                    r.online_until != 0 || r.last_seen.is_some_and(|t| t + 3_600_000 > now)
                });
                !nodes.is_empty()
            });
        }
        for user in &stale {
            self.show(user, now);
        }
    }

    /// Expires sessions and persists `last_seen` until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut last_flush = self.now();
        loop {
            let now = self.now();
            let (changes, next) = {
                let mut tracker = self.tracker();
                let changes = tracker.expire(now);
                (changes, tracker.next_deadline_ms())
            };
            self.publish(&changes);
            self.expire_remote(now);
            if now.saturating_sub(last_flush) >= LAST_SEEN_FLUSH_MS {
                last_flush = now;
                self.flush_last_seen().await;
            }
            let wait_ms = next
                .map_or(EXPIRY_TICK_MS_MAX, |d| d.saturating_sub(now))
                .clamp(1, EXPIRY_TICK_MS_MAX);
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
    }

    /// Writes dirty `last_seen` values to the engine.
    pub async fn flush_last_seen(&self) {
        let dirty = self.tracker().take_dirty_last_seen();
        if dirty.is_empty() {
            return;
        }
        let engine = self.cell.get();
        let result = tokio::task::spawn_blocking(move || engine.save_last_seen(&dirty)).await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "could not persist last_seen");
        }
    }

    /// Users online now (for metrics and tests).
    pub fn online_users(&self) -> usize {
        self.tracker().online_users()
    }
}
