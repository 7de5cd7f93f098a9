//! Presence as a service: the engine's pure [`chatlog::presence::Presence`] tracker behind a
//! lock, driven by connections (connect, heartbeat on inbound traffic, disconnect) and by an
//! expiry task, with subscriptions that push `{"ev":"presence",..}` on every change.
//! `last_seen` is written to the engine lazily (every [`LAST_SEEN_FLUSH_MS`]), never through
//! the log's fsync path.

use std::collections::HashMap;
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
const EXPIRY_TICK_MS_MAX: u64 = 250;

/// Presence tracker plus watchers.
pub struct PresenceHub {
    tracker: Mutex<Presence>,
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

    /// The state of `user` now (persisted `last_seen` for users not seen since start).
    pub fn get(&self, user: &str) -> PresenceState {
        let now = self.now();
        let state = self.tracker().get(user, now);
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

    fn publish(&self, changes: &[PresenceChange]) {
        if changes.is_empty() {
            return;
        }
        let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for change in changes {
            if let Some(list) = watchers.get(&change.user) {
                let push = Push::Frame(Utf8Bytes::from(protocol::presence_push(
                    &change.user,
                    change.online,
                    change.last_seen_ms,
                )));
                for outbox in list {
                    outbox.push(push.clone());
                }
            }
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
