//! Presence: who is online, and when each user was last seen.
//!
//! Presence is soft state, like a Redis key set with `SET EX`: a *session* (one connection of a
//! user, named by the caller's `u64` session id) is live for `ttl_ms` after it was connected or
//! last refreshed by a heartbeat, or until it is explicitly disconnected. A user is **online
//! while at least one of its sessions is live** (PROTOCOL.md: "online while any device of the
//! user is connected"). Nothing here is durable and nothing goes through fsync; only `last_seen`
//! is handed out, lazily and in batches, for the engine to persist.
//!
//! [`Presence`] is a pure state machine in the manner of STYLE.md's "decisions are functions of
//! `(state, input, now)`": no threads, no clocks, no I/O. Every call takes `now_ms`, and every
//! mutating call returns the [`PresenceChange`]s it caused — only real transitions of a *user*
//! (offline → online or online → offline), in the order they happened — for the caller (the
//! server's fanout) to deliver to subscribers. Who subscribes to whom is not kept here.
//!
//! # A thin driver
//!
//! ```
//! use chatlog::presence::{Presence, PresenceConfig};
//!
//! let mut presence = Presence::new(PresenceConfig::default());
//! // On `hello`: the connection becomes a session.
//! let changes = presence.connect("alice", 7, 1_000).unwrap();
//! assert!(changes[0].online);
//! // On every inbound frame or pong.
//! assert!(presence.heartbeat("alice", 7, 31_000).unwrap().is_empty());
//! // Periodically, or when `next_deadline_ms()` is reached.
//! assert!(presence.expire(60_000).is_empty());
//! // On close.
//! let changes = presence.disconnect("alice", 7, 65_000);
//! assert_eq!(changes[0].last_seen_ms, Some(65_000));
//! // Every few seconds: persist what changed.
//! assert_eq!(presence.take_dirty_last_seen(), vec![("alice".to_string(), 65_000)]);
//! ```
//!
//! # Time
//!
//! A session touched at `t` has the deadline `t + ttl_ms`; it is live at `now` while
//! `now < deadline` and expired from the deadline on. Results do not depend on when
//! [`Presence::expire`] runs: [`Presence::get`] already treats a session past its deadline as
//! gone, and a call about a user first expires that user's overdue sessions (so a heartbeat on
//! an overdue session reports the user going offline, then online again). `expire` only
//! *delivers* the changes of users nobody touched. `now_ms` should come from a clock that does
//! not step back; if it does, the step is ignored (time stands still until the clock catches
//! up), which keeps deadlines and `last_seen` monotonic; a time above [`TIME_MS_MAX`] is
//! treated as `TIME_MS_MAX`.
//!
//! # `last_seen`
//!
//! The last time there was evidence of the user: a connect, a heartbeat, or an explicit
//! disconnect. While the user is online [`Presence::get`] reports `now`. When the last session
//! is disconnected it is the time of the disconnect; when it expires it is that session's last
//! connect or heartbeat (not the deadline: the user was not seen in between), or a later
//! disconnect of one of the user's other sessions. A user never seen has none (`null` on the
//! wire). Every transition to offline marks the user *dirty*; [`Presence::take_dirty_last_seen`]
//! drains those for the engine to write in batches, and [`Presence::load_last_seen`] seeds the
//! persisted values at startup without marking them dirty. A crash loses at most the
//! `last_seen` values changed since the last drain, which is the point of persisting lazily.
//!
//! # Data structures and their cost
//!
//! - User ids are interned once: a `HashMap<Arc<str>, u32>` maps a name to a slot of a
//!   `Vec<User>` arena, and the slot holds the same `Arc<str>` (one allocation per user, shared
//!   with the map and with every [`PresenceChange`], so fanout clones a pointer, not a string).
//! - A user's sessions are a list with one session inline (most users have one device) that
//!   spills into a `Vec` for more, bounded by [`PresenceConfig::sessions_per_user_max`].
//! - Deadlines are in a `BTreeSet<(deadline_ms, slot, session)>`: connect, heartbeat and
//!   disconnect cost O(log n) for n live sessions; `expire` splits off every due timer in
//!   O(log n) and then does O(1) work per expired session, delivering changes in deadline order
//!   (ties: by user slot, then session). [`Presence::next_deadline_ms`] is O(log n) as well.
//!
//!   DESIGN.md names a timer wheel. The ordered set was chosen instead because it is exact to
//!   the millisecond without any tick or bucket scan (an expiry happens exactly at its deadline
//!   however seldom `expire` is called), yields changes in deadline order for free, and has no
//!   fixed cost (a 1 ms wheel over a 60 s TTL is 60,001 buckets before the first user). Its
//!   price is about 50 bytes per live session in B-tree nodes (deadlines arrive in increasing
//!   order, so nodes split at the right edge and stay a little over half full) and a
//!   logarithmic factor that stays small (7–8 node levels at 1 M sessions).
//! - Users are never forgotten: an offline user keeps its slot for its `last_seen`.
//!
//! Measured with `examples/presence_memory.rs` (figures in `docs/benchmarks.md`, "Presence"),
//! for ids like `user-123456`: about 150 bytes per offline tracked user (48 for the `Arc<str>`
//! allocation, 48 for the `User` slot, about 50 for the hash map at its load factor) and about
//! 200 bytes per online user with one session; one `expire` call drops 1 M users in about
//! 0.1 s.
#![deny(missing_docs)]

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Default time a session stays live without a heartbeat (60 s, the server's idle timeout).
pub const TTL_MS_DEFAULT: u64 = 60_000;

/// Largest accepted [`PresenceConfig::ttl_ms`] (one day); longer is not presence any more.
pub const TTL_MS_MAX: u64 = 24 * 60 * 60 * 1_000;

/// Default bound on the live sessions (connections) of one user.
pub const SESSIONS_PER_USER_MAX: usize = 32;

/// Bound on the number of tracked users: slots are `u32`.
pub const TRACKED_USERS_MAX: usize = u32::MAX as usize;

/// Latest accepted time; a larger `now_ms` is treated as this. (`u64::MAX` is reserved to
/// mean "never seen" inside the tracker, which saves 8 bytes per user over `Option<u64>`.)
pub const TIME_MS_MAX: u64 = u64::MAX - 1;

/// `User::last_seen_ms` of a user never seen.
const NEVER_SEEN: u64 = u64::MAX;

const _: () = assert!(TTL_MS_DEFAULT > 0 && TTL_MS_DEFAULT <= TTL_MS_MAX);
const _: () = assert!(SESSIONS_PER_USER_MAX >= 1);

/// Configuration of a [`Presence`] tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceConfig {
    /// How long a session stays live after its connect or last heartbeat, in milliseconds.
    /// Must be in `1..=`[`TTL_MS_MAX`]. Default [`TTL_MS_DEFAULT`].
    pub ttl_ms: u64,
    /// How many live sessions one user may have; one more is refused with
    /// [`Error::LimitExceeded`]. Must be at least 1. Default [`SESSIONS_PER_USER_MAX`].
    pub sessions_per_user_max: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            ttl_ms: TTL_MS_DEFAULT,
            sessions_per_user_max: SESSIONS_PER_USER_MAX,
        }
    }
}

/// What a client is told about one user: the `{"online","last_seen"}` of PROTOCOL.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PresenceState {
    /// Whether any session of the user is live.
    pub online: bool,
    /// While online, `now`; otherwise the last time the user was seen, in milliseconds.
    /// `None` for a user never seen.
    pub last_seen_ms: Option<u64>,
}

/// A transition of one user between offline and online, to be sent to its subscribers as
/// `{"ev":"presence","user","online","last_seen"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    /// The user whose presence changed (shared with the tracker: cloning is cheap).
    pub user: Arc<str>,
    /// `true` for offline → online, `false` for online → offline.
    pub online: bool,
    /// The user's `last_seen` after the change: the time it came online, or the time it was
    /// last seen before going offline. Always `Some` for a change; an `Option` so that it has
    /// the same shape as [`PresenceState::last_seen_ms`].
    pub last_seen_ms: Option<u64>,
}

impl PresenceChange {
    /// The user's state right after this change.
    pub fn state(&self) -> PresenceState {
        PresenceState {
            online: self.online,
            last_seen_ms: self.last_seen_ms,
        }
    }
}

/// The presence of every tracked user: a pure state machine, driven by the caller with the
/// current time. See the [module documentation](self) for semantics and costs.
pub struct Presence {
    config: PresenceConfig,
    /// Name → slot in `users`.
    slots: HashMap<Arc<str>, u32>,
    /// Arena of tracked users, indexed by slot; never shrinks.
    users: Vec<User>,
    /// One entry per live session, ordered by deadline.
    timers: BTreeSet<Timer>,
    /// Slots whose `last_seen_ms` changed since the last `take_dirty_last_seen`, in the order
    /// they became dirty; no repeats, guarded by `dirty_bits`.
    dirty: Vec<u32>,
    /// One bit per slot: whether it is in `dirty` (a bitmap rather than a `bool` in `User`,
    /// which would cost 8 bytes per user in padding).
    dirty_bits: Vec<u64>,
    /// Users with at least one session (online as last reported).
    online_users: usize,
    /// The latest `now_ms` seen; earlier values are raised to it.
    now_ms_max: u64,
}

/// One tracked user. Invariant: the user is online (as last reported) iff `sessions` is not
/// empty, and every session in `sessions` has exactly one matching entry in `timers`.
#[derive(Debug)]
struct User {
    name: Arc<str>,
    sessions: Sessions,
    /// The latest evidence of the user among sessions already removed (plus loaded values),
    /// or [`NEVER_SEEN`].
    last_seen_ms: u64,
}

/// A live session: its id and when it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Session {
    id: u64,
    deadline_ms: u64,
}

/// The sessions of one user, the first one inline. Invariant: `Many` holds at least two.
#[derive(Debug, Default)]
enum Sessions {
    #[default]
    Empty,
    One(Session),
    Many(Vec<Session>),
}

/// An entry of the expiry index. Field order is the sort order: deadline first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    deadline_ms: u64,
    slot: u32,
    session: u64,
}

impl Sessions {
    fn as_slice(&self) -> &[Session] {
        match self {
            Sessions::Empty => &[],
            Sessions::One(session) => std::slice::from_ref(session),
            Sessions::Many(sessions) => sessions,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Session] {
        match self {
            Sessions::Empty => &mut [],
            Sessions::One(session) => std::slice::from_mut(session),
            Sessions::Many(sessions) => sessions,
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Sessions::Empty)
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.as_slice().iter().position(|session| session.id == id)
    }

    fn push(&mut self, session: Session) {
        debug_assert!(self.position(session.id).is_none(), "duplicate session");
        *self = match std::mem::take(self) {
            Sessions::Empty => Sessions::One(session),
            Sessions::One(first) => Sessions::Many(vec![first, session]),
            Sessions::Many(mut sessions) => {
                sessions.push(session);
                Sessions::Many(sessions)
            }
        };
    }

    fn remove(&mut self, index: usize) -> Session {
        let (removed, rest) = match std::mem::take(self) {
            Sessions::Empty => unreachable!("remove from an empty session list"),
            Sessions::One(session) => {
                assert_eq!(index, 0);
                (session, Sessions::Empty)
            }
            Sessions::Many(mut sessions) => {
                let removed = sessions.swap_remove(index);
                if sessions.len() == 1 {
                    (removed, Sessions::One(sessions[0]))
                } else {
                    (removed, Sessions::Many(sessions))
                }
            }
        };
        *self = rest;
        removed
    }
}

impl User {
    fn new(name: Arc<str>) -> Self {
        Self {
            name,
            sessions: Sessions::Empty,
            last_seen_ms: NEVER_SEEN,
        }
    }

    fn last_seen_ms(&self) -> Option<u64> {
        (self.last_seen_ms != NEVER_SEEN).then_some(self.last_seen_ms)
    }

    fn see(&mut self, at_ms: u64) {
        let at_ms = at_ms.min(TIME_MS_MAX);
        self.last_seen_ms = match self.last_seen_ms {
            NEVER_SEEN => at_ms,
            seen_ms => seen_ms.max(at_ms),
        };
    }
}

impl Presence {
    /// An empty tracker.
    ///
    /// # Panics
    ///
    /// If `config.ttl_ms` is not in `1..=`[`TTL_MS_MAX`] or `config.sessions_per_user_max` is
    /// zero.
    pub fn new(config: PresenceConfig) -> Self {
        assert!(
            (1..=TTL_MS_MAX).contains(&config.ttl_ms),
            "presence ttl_ms {} is not in 1..={TTL_MS_MAX}",
            config.ttl_ms
        );
        assert!(
            config.sessions_per_user_max >= 1,
            "sessions_per_user_max is 0"
        );
        Self {
            config,
            slots: HashMap::new(),
            users: Vec::new(),
            timers: BTreeSet::new(),
            dirty: Vec::new(),
            dirty_bits: Vec::new(),
            online_users: 0,
            now_ms_max: 0,
        }
    }

    /// The configuration this tracker was created with.
    pub fn config(&self) -> PresenceConfig {
        self.config
    }

    /// Session `session` of `user` connected at `now_ms`; it is live until `now_ms + ttl_ms`
    /// unless refreshed. Returns the changes caused: the user coming online if this is its
    /// only live session. Connecting a session that is already live just refreshes it, like
    /// [`heartbeat`](Self::heartbeat).
    ///
    /// # Errors
    ///
    /// [`Error::LimitExceeded`] if `user` already has
    /// [`sessions_per_user_max`](PresenceConfig::sessions_per_user_max) other live sessions,
    /// or if [`TRACKED_USERS_MAX`] users are tracked; nothing changes then.
    pub fn connect(
        &mut self,
        user: &str,
        session: u64,
        now_ms: u64,
    ) -> Result<Vec<PresenceChange>> {
        self.touch(user, session, now_ms)
    }

    /// Session `session` of `user` showed a sign of life at `now_ms`: its deadline becomes
    /// `now_ms + ttl_ms`. A session not live (never connected, disconnected, or expired) is
    /// created, because a heartbeat proves the connection is alive; so the caller must not
    /// heartbeat a session after disconnecting it. Returns the changes caused: none for a
    /// live session; the user going offline and coming back online for an overdue one.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub fn heartbeat(
        &mut self,
        user: &str,
        session: u64,
        now_ms: u64,
    ) -> Result<Vec<PresenceChange>> {
        self.touch(user, session, now_ms)
    }

    /// Session `session` of `user` closed at `now_ms` (explicit offline of that session).
    /// Returns the changes caused: the user going offline, with `last_seen` = `now_ms`, if
    /// that was its last live session. An unknown user or session changes nothing.
    pub fn disconnect(&mut self, user: &str, session: u64, now_ms: u64) -> Vec<PresenceChange> {
        let now_ms = self.advance(now_ms);
        let mut changes = Vec::new();
        let Some(&slot) = self.slots.get(user) else {
            return changes;
        };
        self.expire_user(slot, now_ms, &mut changes);
        let entry = &mut self.users[slot as usize];
        if let Some(index) = entry.sessions.position(session) {
            let removed = entry.sessions.remove(index);
            let was_indexed = self.timers.remove(&Timer {
                deadline_ms: removed.deadline_ms,
                slot,
                session,
            });
            assert!(was_indexed, "live session without a timer");
            entry.see(now_ms);
            if entry.sessions.is_empty() {
                changes.push(self.went_offline(slot));
            }
        }
        changes
    }

    /// Removes every session whose deadline is at or before `now_ms` and returns the users
    /// that went offline, in deadline order. Costs O(log n + k) for k expired sessions; the
    /// returned changes are the only work proportional to k, so a caller that wants to bound
    /// one call can call it with the time advanced in smaller steps.
    pub fn expire(&mut self, now_ms: u64) -> Vec<PresenceChange> {
        let now_ms = self.advance(now_ms);
        // `now_ms <= TIME_MS_MAX`, so `now_ms + 1` does not overflow.
        let live = self.timers.split_off(&Timer {
            deadline_ms: now_ms + 1,
            slot: 0,
            session: 0,
        });
        let expired = std::mem::replace(&mut self.timers, live);
        let ttl_ms = self.config.ttl_ms;
        let mut changes = Vec::new();
        for timer in expired {
            let entry = &mut self.users[timer.slot as usize];
            let index = entry
                .sessions
                .position(timer.session)
                .expect("timer without a session");
            let removed = entry.sessions.remove(index);
            assert_eq!(
                removed.deadline_ms, timer.deadline_ms,
                "timer and session disagree"
            );
            entry.see(removed.deadline_ms.saturating_sub(ttl_ms));
            if entry.sessions.is_empty() {
                changes.push(self.went_offline(timer.slot));
            }
        }
        changes
    }

    /// The earliest deadline of a live session: when the next call to
    /// [`expire`](Self::expire) can have an effect. `None` when no session is live.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.timers.first().map(|timer| timer.deadline_ms)
    }

    /// The presence of `user` at `now_ms`, whether or not [`expire`](Self::expire) has run
    /// since a deadline passed. An unknown user is offline and never seen; asking does not
    /// start tracking it.
    pub fn get(&self, user: &str, now_ms: u64) -> PresenceState {
        let now_ms = now_ms.min(TIME_MS_MAX).max(self.now_ms_max);
        let Some(&slot) = self.slots.get(user) else {
            return PresenceState::default();
        };
        let entry = &self.users[slot as usize];
        let sessions = entry.sessions.as_slice();
        if sessions.iter().any(|session| session.deadline_ms > now_ms) {
            return PresenceState {
                online: true,
                last_seen_ms: Some(now_ms),
            };
        }
        // Every session (if any) is overdue: report what `expire` will.
        let overdue_seen_ms = sessions
            .iter()
            .map(|&session| self.touched_ms(session))
            .max();
        PresenceState {
            online: false,
            last_seen_ms: entry.last_seen_ms().max(overdue_seen_ms),
        }
    }

    /// Drains the users whose `last_seen` changed (went offline) since the previous call,
    /// with their current `last_seen`, for the engine to persist in one batch. Each user
    /// appears at most once, in the order it became dirty.
    pub fn take_dirty_last_seen(&mut self) -> Vec<(String, u64)> {
        let mut drained = Vec::with_capacity(self.dirty.len());
        for slot in self.dirty.drain(..) {
            let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
            assert!(
                self.dirty_bits[word] & bit != 0,
                "dirty list and bitmap disagree"
            );
            self.dirty_bits[word] &= !bit;
            let entry = &self.users[slot as usize];
            let last_seen_ms = entry.last_seen_ms().expect("dirty user never seen");
            drained.push((entry.name.to_string(), last_seen_ms));
        }
        drained
    }

    /// Seeds persisted `last_seen` values (typically at startup, before any connect) without
    /// marking them dirty. A value older than what is already known is ignored.
    ///
    /// # Panics
    ///
    /// If the users would exceed [`TRACKED_USERS_MAX`].
    pub fn load_last_seen<I, S>(&mut self, values: I)
    where
        I: IntoIterator<Item = (S, u64)>,
        S: AsRef<str>,
    {
        for (user, last_seen_ms) in values {
            let slot = self
                .intern(user.as_ref())
                .expect("more than TRACKED_USERS_MAX users loaded");
            self.users[slot as usize].see(last_seen_ms);
        }
    }

    /// Users tracked: every user ever connected or loaded (offline users keep their
    /// `last_seen`).
    pub fn tracked_users(&self) -> usize {
        self.users.len()
    }

    /// Users online as last reported by the returned changes (some may be overdue until the
    /// next [`expire`](Self::expire)).
    pub fn online_users(&self) -> usize {
        self.online_users
    }

    /// Sessions not yet expired or disconnected (some may be overdue until the next
    /// [`expire`](Self::expire)).
    pub fn sessions(&self) -> usize {
        self.timers.len()
    }

    /// Raises the tracker's clock to `now_ms` and returns the effective time: a clock that
    /// steps back is held at its latest value.
    fn advance(&mut self, now_ms: u64) -> u64 {
        self.now_ms_max = self.now_ms_max.max(now_ms.min(TIME_MS_MAX));
        self.now_ms_max
    }

    /// When a session was last connected or refreshed.
    fn touched_ms(&self, session: Session) -> u64 {
        session.deadline_ms.saturating_sub(self.config.ttl_ms)
    }

    fn intern(&mut self, user: &str) -> Result<u32> {
        match self.slots.get(user) {
            Some(&slot) => Ok(slot),
            None => self.track(user),
        }
    }

    /// Gives `user`, not yet tracked, a slot.
    fn track(&mut self, user: &str) -> Result<u32> {
        debug_assert!(!self.slots.contains_key(user));
        let slot = match u32::try_from(self.users.len()) {
            Ok(slot) if slot != u32::MAX => slot,
            _ => {
                return Err(Error::LimitExceeded {
                    what: "tracked presence users",
                    limit: TRACKED_USERS_MAX as u64,
                    actual: self.users.len() as u64 + 1,
                });
            }
        };
        let name: Arc<str> = Arc::from(user);
        self.slots.insert(Arc::clone(&name), slot);
        self.users.push(User::new(name));
        if slot % 64 == 0 {
            self.dirty_bits.push(0);
        }
        Ok(slot)
    }

    fn touch(&mut self, user: &str, session: u64, now_ms: u64) -> Result<Vec<PresenceChange>> {
        // Refuse before changing anything, counting only sessions live at `now_ms` (overdue
        // ones are about to be expired and do not count against the bound).
        let effective_now_ms = now_ms.min(TIME_MS_MAX).max(self.now_ms_max);
        let live_now = |candidate: &Session| candidate.deadline_ms > effective_now_ms;
        // One hash lookup on the hot path (a heartbeat of a tracked user).
        let slot = match self.slots.get(user) {
            Some(&slot) => {
                let sessions = self.users[slot as usize].sessions.as_slice();
                let known = sessions.iter().any(|s| s.id == session && live_now(s));
                let live = sessions.iter().filter(|s| live_now(s)).count();
                if !known && live >= self.config.sessions_per_user_max {
                    return Err(Error::LimitExceeded {
                        what: "live presence sessions of one user",
                        limit: self.config.sessions_per_user_max as u64,
                        actual: live as u64 + 1,
                    });
                }
                slot
            }
            None => self.track(user)?,
        };
        let now_ms = self.advance(now_ms);
        let mut changes = Vec::new();
        self.expire_user(slot, now_ms, &mut changes);

        let deadline_ms = now_ms.saturating_add(self.config.ttl_ms).min(TIME_MS_MAX);
        let entry = &mut self.users[slot as usize];
        let was_online = !entry.sessions.is_empty();
        match entry.sessions.position(session) {
            Some(index) => {
                let current = &mut entry.sessions.as_mut_slice()[index];
                assert!(current.deadline_ms <= deadline_ms, "a deadline moved back");
                if current.deadline_ms != deadline_ms {
                    let was_indexed = self.timers.remove(&Timer {
                        deadline_ms: current.deadline_ms,
                        slot,
                        session,
                    });
                    assert!(was_indexed, "live session without a timer");
                    current.deadline_ms = deadline_ms;
                    self.timers.insert(Timer {
                        deadline_ms,
                        slot,
                        session,
                    });
                }
            }
            None => {
                entry.sessions.push(Session {
                    id: session,
                    deadline_ms,
                });
                let inserted = self.timers.insert(Timer {
                    deadline_ms,
                    slot,
                    session,
                });
                assert!(inserted, "new session already had a timer");
            }
        }
        if !was_online {
            self.online_users += 1;
            changes.push(PresenceChange {
                user: Arc::clone(&self.users[slot as usize].name),
                online: true,
                last_seen_ms: Some(now_ms),
            });
        }
        Ok(changes)
    }

    /// Removes the sessions of `slot` that are overdue at `now_ms`, reporting the user going
    /// offline if that leaves none.
    fn expire_user(&mut self, slot: u32, now_ms: u64, changes: &mut Vec<PresenceChange>) {
        let ttl_ms = self.config.ttl_ms;
        let entry = &mut self.users[slot as usize];
        if entry.sessions.is_empty() {
            return;
        }
        let mut index = 0;
        while index < entry.sessions.as_slice().len() {
            let session = entry.sessions.as_slice()[index];
            if session.deadline_ms > now_ms {
                index += 1;
                continue;
            }
            entry.sessions.remove(index);
            let was_indexed = self.timers.remove(&Timer {
                deadline_ms: session.deadline_ms,
                slot,
                session: session.id,
            });
            assert!(was_indexed, "live session without a timer");
            entry.see(session.deadline_ms.saturating_sub(ttl_ms));
            if entry.sessions.is_empty() {
                changes.push(self.went_offline(slot));
                return;
            }
        }
    }

    /// Bookkeeping for `slot` having just lost its last session.
    fn went_offline(&mut self, slot: u32) -> PresenceChange {
        let entry = &self.users[slot as usize];
        debug_assert!(entry.sessions.is_empty());
        let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        if self.dirty_bits[word] & bit == 0 {
            self.dirty_bits[word] |= bit;
            self.dirty.push(slot);
        }
        self.online_users -= 1;
        PresenceChange {
            user: Arc::clone(&entry.name),
            online: false,
            last_seen_ms: Some(entry.last_seen_ms().expect("a user going offline was seen")),
        }
    }
}

#[cfg(test)]
impl Presence {
    /// Checks every structural invariant; for tests, after each operation.
    fn check_invariants(&self) {
        assert_eq!(self.slots.len(), self.users.len());
        assert_eq!(self.dirty_bits.len(), self.users.len().div_ceil(64));
        let mut sessions = 0;
        let mut online = 0;
        for (slot, user) in self.users.iter().enumerate() {
            let slot = u32::try_from(slot).unwrap();
            assert_eq!(self.slots.get(&*user.name), Some(&slot));
            assert!(!matches!(&user.sessions, Sessions::Many(v) if v.len() < 2));
            let list = user.sessions.as_slice();
            for (index, session) in list.iter().enumerate() {
                assert!(list[..index].iter().all(|other| other.id != session.id));
                assert!(self.timers.contains(&Timer {
                    deadline_ms: session.deadline_ms,
                    slot,
                    session: session.id,
                }));
                assert!(session.deadline_ms <= self.now_ms_max + self.config.ttl_ms);
            }
            sessions += list.len();
            online += usize::from(!list.is_empty());
            let dirty = self.dirty_bits[slot as usize / 64] & (1 << (slot % 64)) != 0;
            assert_eq!(dirty, self.dirty.contains(&slot));
            assert!(!dirty || user.last_seen_ms().is_some());
        }
        assert_eq!(self.timers.len(), sessions);
        assert_eq!(self.online_users, online);
    }
}

impl Default for Presence {
    fn default() -> Self {
        Self::new(PresenceConfig::default())
    }
}

impl fmt::Debug for Presence {
    // Summarised: a derived Debug would print every tracked user.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presence")
            .field("config", &self.config)
            .field("tracked_users", &self.users.len())
            .field("online_users", &self.online_users)
            .field("sessions", &self.timers.len())
            .field("dirty", &self.dirty.len())
            .field("now_ms_max", &self.now_ms_max)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const TTL: u64 = TTL_MS_DEFAULT;

    fn change(user: &str, online: bool, last_seen_ms: u64) -> PresenceChange {
        PresenceChange {
            user: Arc::from(user),
            online,
            last_seen_ms: Some(last_seen_ms),
        }
    }

    fn state(online: bool, last_seen_ms: Option<u64>) -> PresenceState {
        PresenceState {
            online,
            last_seen_ms,
        }
    }

    #[test]
    fn presence_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Presence>();
        assert_send_sync::<PresenceChange>();
    }

    #[test]
    fn user_is_online_while_any_device_is_connected() {
        let mut p = Presence::default();
        assert_eq!(
            p.connect("alice", 1, 100).unwrap(),
            vec![change("alice", true, 100)]
        );
        assert_eq!(p.get("alice", 150), state(true, Some(150)));
        // A second device: no transition.
        assert_eq!(p.connect("alice", 2, 200).unwrap(), vec![]);
        assert_eq!(p.online_users(), 1);
        assert_eq!(p.sessions(), 2);
        // One of two devices leaves: still online.
        assert_eq!(p.disconnect("alice", 1, 300), vec![]);
        assert_eq!(p.get("alice", 300), state(true, Some(300)));
        // The last device leaves: offline, last seen now.
        assert_eq!(
            p.disconnect("alice", 2, 400),
            vec![change("alice", false, 400)]
        );
        assert_eq!(p.get("alice", 10_000), state(false, Some(400)));
        assert_eq!(p.online_users(), 0);
        assert_eq!(p.sessions(), 0);
        assert_eq!(p.next_deadline_ms(), None);
    }

    #[test]
    fn reconnecting_a_live_session_is_a_refresh() {
        let mut p = Presence::default();
        assert_eq!(p.connect("alice", 1, 0).unwrap().len(), 1);
        assert_eq!(p.connect("alice", 1, 10).unwrap(), vec![]);
        assert_eq!(p.sessions(), 1);
        assert_eq!(p.next_deadline_ms(), Some(10 + TTL));
    }

    #[test]
    fn disconnect_of_unknown_user_or_session_changes_nothing() {
        let mut p = Presence::default();
        assert_eq!(p.disconnect("nobody", 1, 10), vec![]);
        assert_eq!(p.tracked_users(), 0);
        p.connect("alice", 1, 10).unwrap();
        assert_eq!(p.disconnect("alice", 99, 20), vec![]);
        assert_eq!(p.get("alice", 20), state(true, Some(20)));
        // A second disconnect of the same session is a no-op too.
        assert_eq!(p.disconnect("alice", 1, 30).len(), 1);
        assert_eq!(p.disconnect("alice", 1, 40), vec![]);
        assert_eq!(p.get("alice", 50), state(false, Some(30)));
    }

    #[test]
    fn missing_heartbeat_expires_exactly_at_the_deadline() {
        let mut p = Presence::default();
        p.connect("alice", 1, 1_000).unwrap();
        assert_eq!(p.next_deadline_ms(), Some(1_000 + TTL));
        assert_eq!(p.expire(1_000 + TTL - 1), vec![]);
        assert_eq!(
            p.get("alice", 1_000 + TTL - 1),
            state(true, Some(1_000 + TTL - 1))
        );
        // At the deadline `get` already says offline, before `expire` runs...
        assert_eq!(p.get("alice", 1_000 + TTL), state(false, Some(1_000)));
        // ...and `expire` reports it, with the time of the last sign of life.
        assert_eq!(p.expire(1_000 + TTL), vec![change("alice", false, 1_000)]);
        assert_eq!(p.expire(1_000 + TTL), vec![]);
        assert_eq!(p.get("alice", 1_000 + TTL), state(false, Some(1_000)));
        assert_eq!(p.sessions(), 0);
    }

    #[test]
    fn heartbeat_extends_the_deadline() {
        let mut p = Presence::default();
        p.connect("alice", 1, 0).unwrap();
        assert_eq!(p.heartbeat("alice", 1, 50_000).unwrap(), vec![]);
        assert_eq!(p.next_deadline_ms(), Some(50_000 + TTL));
        // The original deadline passes without effect.
        assert_eq!(p.expire(TTL), vec![]);
        assert_eq!(p.expire(50_000 + TTL - 1), vec![]);
        assert!(p.get("alice", 50_000 + TTL - 1).online);
        assert_eq!(p.expire(50_000 + TTL), vec![change("alice", false, 50_000)]);
    }

    #[test]
    fn heartbeat_on_an_overdue_session_reports_offline_then_online() {
        let mut p = Presence::default();
        p.connect("alice", 1, 0).unwrap();
        // `expire` was not called, but the session lapsed at TTL.
        assert_eq!(
            p.heartbeat("alice", 1, TTL + 5).unwrap(),
            vec![change("alice", false, 0), change("alice", true, TTL + 5)]
        );
        assert_eq!(p.sessions(), 1);
        assert_eq!(p.online_users(), 1);
        assert_eq!(p.take_dirty_last_seen(), vec![("alice".to_string(), 0)]);
    }

    #[test]
    fn heartbeat_of_an_unknown_session_creates_it() {
        let mut p = Presence::default();
        assert_eq!(
            p.heartbeat("bob", 3, 7).unwrap(),
            vec![change("bob", true, 7)]
        );
        assert_eq!(p.get("bob", 8), state(true, Some(8)));
    }

    #[test]
    fn expiry_of_a_non_last_session_keeps_the_user_online() {
        let mut p = Presence::default();
        p.connect("alice", 1, 0).unwrap();
        p.connect("alice", 2, 30_000).unwrap();
        assert_eq!(p.expire(TTL), vec![]);
        assert_eq!(p.sessions(), 1);
        assert!(p.get("alice", TTL).online);
        assert_eq!(p.expire(30_000 + TTL), vec![change("alice", false, 30_000)]);
    }

    #[test]
    fn last_seen_counts_a_later_disconnect_of_another_device() {
        let mut p = Presence::default();
        p.connect("alice", 1, 100).unwrap();
        p.connect("alice", 2, 150).unwrap();
        // Device 2 leaves at 155; device 1 then lapses (deadline 100 + TTL, touched at 100).
        assert_eq!(p.disconnect("alice", 2, 155), vec![]);
        assert_eq!(p.get("alice", 100 + TTL), state(false, Some(155)));
        assert_eq!(p.expire(100 + TTL), vec![change("alice", false, 155)]);
    }

    #[test]
    fn expiry_of_many_users_is_in_deadline_order() {
        let mut p = Presence::default();
        // Users connect in an order unrelated to their names, two per millisecond (equal
        // deadlines are ordered by slot, i.e. first connect); then every third user, walked
        // backwards, heartbeats, so the deadline order is neither name nor connect order.
        let name = |i: u64| format!("user-{}", (i * 7919) % 200);
        let mut touched_ms = BTreeMap::new();
        for i in 0..200u64 {
            let now = 5_000 + i / 2;
            p.connect(&name(i), i, now).unwrap();
            touched_ms.insert(i, now);
        }
        for (step, i) in (0..200u64).rev().step_by(3).enumerate() {
            let now = 6_000 + step as u64;
            p.heartbeat(&name(i), i, now).unwrap();
            touched_ms.insert(i, now);
        }
        let mut expected: Vec<(u64, u64)> = touched_ms.iter().map(|(&i, &t)| (t, i)).collect();
        expected.sort_unstable();
        let expected: Vec<PresenceChange> = expected
            .into_iter()
            .map(|(t, i)| change(&name(i), false, t))
            .collect();
        assert_eq!(p.online_users(), 200);
        // Two batches: up to the last first-round deadline, then the rest.
        let mut changes = p.expire(5_099 + TTL);
        assert_eq!(changes.len(), 200 - 67);
        changes.extend(p.expire(7_000 + TTL));
        assert_eq!(changes, expected);
        assert_eq!(p.online_users(), 0);
        assert_eq!(p.sessions(), 0);
    }

    #[test]
    fn dirty_last_seen_is_drained_once() {
        let mut p = Presence::default();
        p.connect("alice", 1, 10).unwrap();
        p.connect("bob", 1, 20).unwrap();
        assert_eq!(
            p.take_dirty_last_seen(),
            vec![],
            "online users are not dirty"
        );
        p.disconnect("bob", 1, 30);
        p.disconnect("alice", 1, 40);
        assert_eq!(
            p.take_dirty_last_seen(),
            vec![("bob".to_string(), 30), ("alice".to_string(), 40)]
        );
        assert_eq!(p.take_dirty_last_seen(), vec![]);
        // Offline twice before a drain: listed once, with the latest value.
        p.connect("alice", 1, 50).unwrap();
        p.disconnect("alice", 1, 60);
        p.connect("alice", 1, 70).unwrap();
        p.disconnect("alice", 1, 80);
        assert_eq!(p.take_dirty_last_seen(), vec![("alice".to_string(), 80)]);
        assert_eq!(p.take_dirty_last_seen(), vec![]);
    }

    #[test]
    fn never_seen_user_has_no_last_seen_and_is_not_tracked_by_asking() {
        let p = Presence::default();
        assert_eq!(p.get("ghost", 1_000), state(false, None));
        assert_eq!(p.tracked_users(), 0);
    }

    #[test]
    fn loaded_last_seen_is_visible_but_not_dirty() {
        let mut p = Presence::default();
        p.load_last_seen([("alice", 500u64), ("bob", 700)]);
        p.load_last_seen(vec![("alice".to_string(), 400u64)]);
        assert_eq!(p.get("alice", 1_000), state(false, Some(500)));
        assert_eq!(p.get("bob", 1_000), state(false, Some(700)));
        assert_eq!(p.take_dirty_last_seen(), vec![]);
        assert_eq!(p.online_users(), 0);
        // Coming online and leaving replaces it.
        p.connect("alice", 1, 2_000).unwrap();
        assert_eq!(
            p.disconnect("alice", 1, 3_000),
            vec![change("alice", false, 3_000)]
        );
        assert_eq!(p.take_dirty_last_seen(), vec![("alice".to_string(), 3_000)]);
    }

    #[test]
    fn sessions_per_user_are_bounded() {
        let mut p = Presence::new(PresenceConfig {
            ttl_ms: 1_000,
            sessions_per_user_max: 2,
        });
        p.connect("alice", 1, 0).unwrap();
        p.connect("alice", 2, 0).unwrap();
        let refused = p.connect("alice", 3, 10);
        assert!(matches!(
            refused,
            Err(Error::LimitExceeded {
                limit: 2,
                actual: 3,
                ..
            })
        ));
        assert!(matches!(
            p.heartbeat("alice", 3, 10),
            Err(Error::LimitExceeded { .. })
        ));
        assert_eq!(p.sessions(), 2);
        // Live sessions can still be refreshed.
        assert_eq!(p.heartbeat("alice", 2, 500).unwrap(), vec![]);
        // Once one lapses (overdue, not even expired yet) there is room again.
        assert_eq!(p.connect("alice", 3, 1_000).unwrap(), vec![]);
        assert_eq!(p.sessions(), 2);
        // Another user is not affected.
        assert_eq!(p.connect("bob", 1, 1_000).unwrap().len(), 1);
    }

    #[test]
    fn a_clock_stepping_back_is_held() {
        let mut p = Presence::default();
        p.connect("alice", 1, 10_000).unwrap();
        // A heartbeat stamped earlier does not move the deadline back.
        assert_eq!(p.heartbeat("alice", 1, 5_000).unwrap(), vec![]);
        assert_eq!(p.next_deadline_ms(), Some(10_000 + TTL));
        assert_eq!(
            p.disconnect("alice", 1, 9_000),
            vec![change("alice", false, 10_000)]
        );
        assert_eq!(p.get("alice", 0), state(false, Some(10_000)));
    }

    #[test]
    fn times_at_the_end_of_the_clock_do_not_overflow() {
        let mut p = Presence::default();
        assert_eq!(
            p.connect("alice", 1, u64::MAX).unwrap(),
            vec![change("alice", true, TIME_MS_MAX)]
        );
        // The deadline saturates: the session is overdue at once and expires.
        assert_eq!(
            p.get("alice", u64::MAX),
            state(false, Some(TIME_MS_MAX - TTL))
        );
        assert_eq!(p.expire(u64::MAX).len(), 1);
        assert_eq!(p.sessions(), 0);
        p.load_last_seen([("bob", u64::MAX)]);
        assert_eq!(p.get("bob", 0), state(false, Some(TIME_MS_MAX)));
    }

    #[test]
    fn dirty_bitmap_covers_many_slots() {
        let mut p = Presence::default();
        for i in 0..130u64 {
            p.connect(&format!("u{i}"), 1, i).unwrap();
        }
        for i in (0..130u64).rev() {
            p.disconnect(&format!("u{i}"), 1, 400 - i);
        }
        let drained = p.take_dirty_last_seen();
        let expected: Vec<(String, u64)> = (0..130u64)
            .rev()
            .map(|i| (format!("u{i}"), 400 - i))
            .collect();
        assert_eq!(drained, expected);
        assert_eq!(p.take_dirty_last_seen(), vec![]);
        p.connect("u129", 1, 500).unwrap();
        p.disconnect("u129", 1, 501);
        assert_eq!(p.take_dirty_last_seen(), vec![("u129".to_string(), 501)]);
    }

    /// Guards the per-user memory figure in the module docs and `docs/benchmarks.md`.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn per_user_structures_stay_small() {
        assert_eq!(std::mem::size_of::<User>(), 48);
        assert_eq!(std::mem::size_of::<Sessions>(), 24);
        assert_eq!(std::mem::size_of::<Timer>(), 24);
    }

    #[test]
    fn debug_output_is_a_summary() {
        let mut p = Presence::default();
        p.connect("alice", 1, 0).unwrap();
        let text = format!("{p:?}");
        assert!(text.contains("tracked_users: 1"), "{text}");
        assert!(!text.contains("alice"), "{text}");
    }

    #[test]
    fn sessions_list_spills_and_returns_inline() {
        let mut sessions = Sessions::Empty;
        for id in 0..4 {
            sessions.push(Session {
                id,
                deadline_ms: id,
            });
        }
        assert!(matches!(sessions, Sessions::Many(ref v) if v.len() == 4));
        for _ in 0..3 {
            let index = sessions.position(sessions.as_slice()[0].id).unwrap();
            sessions.remove(index);
        }
        assert!(matches!(sessions, Sessions::One(_)));
        sessions.remove(0);
        assert!(sessions.is_empty());
    }

    // ---- Model-based property test ----

    const USERS: [&str; 4] = ["ann", "bob", "cy", "dee"];
    const MODEL_TTL: u64 = 100;
    const MODEL_SESSIONS_MAX: usize = 2;

    #[derive(Debug, Clone)]
    enum Op {
        Connect(usize, u64),
        Heartbeat(usize, u64),
        Disconnect(usize, u64),
        Advance(u64),
        Expire,
        TakeDirty,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..USERS.len(), 0..4u64).prop_map(|(u, s)| Op::Connect(u, s)),
            3 => (0..USERS.len(), 0..4u64).prop_map(|(u, s)| Op::Heartbeat(u, s)),
            2 => (0..USERS.len(), 0..4u64).prop_map(|(u, s)| Op::Disconnect(u, s)),
            3 => prop_oneof![0..5u64, 95..106u64, 0..250u64].prop_map(Op::Advance),
            1 => Just(Op::Expire),
            1 => Just(Op::TakeDirty),
        ]
    }

    /// The naive model: per user, session → deadline, and the max of every piece of
    /// evidence (touch or disconnect of a live session) ever seen.
    #[derive(Debug, Default)]
    struct ModelUser {
        sessions: BTreeMap<u64, u64>,
        evidence_ms: Option<u64>,
        reported_online: bool,
        offline_since_drain: bool,
    }

    impl ModelUser {
        fn online(&self, now: u64) -> bool {
            self.sessions.values().any(|&deadline| deadline > now)
        }

        fn live(&self, now: u64) -> usize {
            self.sessions
                .values()
                .filter(|&&deadline| deadline > now)
                .count()
        }

        fn seen(&mut self, at: u64) {
            self.evidence_ms = Some(self.evidence_ms.map_or(at, |e| e.max(at)));
        }

        /// The offline change owed if the user is reported online but no longer is.
        fn settle(&mut self, name: &str, now: u64, expected: &mut Vec<PresenceChange>) {
            if self.reported_online && !self.online(now) {
                self.sessions.clear();
                self.reported_online = false;
                self.offline_since_drain = true;
                expected.push(change(name, false, self.evidence_ms.unwrap()));
            }
            self.sessions.retain(|_, &mut deadline| deadline > now);
        }

        fn report_online(&mut self, name: &str, now: u64, expected: &mut Vec<PresenceChange>) {
            if !self.reported_online && self.online(now) {
                self.reported_online = true;
                expected.push(change(name, true, now));
            }
        }
    }

    fn check_states(p: &Presence, model: &BTreeMap<&str, ModelUser>, now: u64) {
        for name in USERS {
            let expected = match model.get(name) {
                None => state(false, None),
                Some(user) if user.online(now) => state(true, Some(now)),
                Some(user) => state(false, user.evidence_ms),
            };
            assert_eq!(p.get(name, now), expected, "get({name}) at {now}");
        }
        let reported = model.values().filter(|u| u.reported_online).count();
        assert_eq!(p.online_users(), reported);
    }

    fn run_model(ops: Vec<Op>) {
        let mut p = Presence::new(PresenceConfig {
            ttl_ms: MODEL_TTL,
            sessions_per_user_max: MODEL_SESSIONS_MAX,
        });
        let mut model: BTreeMap<&str, ModelUser> = BTreeMap::new();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Connect(u, session) | Op::Heartbeat(u, session) => {
                    let name = USERS[u];
                    let result = if matches!(op, Op::Connect(..)) {
                        p.connect(name, session, now)
                    } else {
                        p.heartbeat(name, session, now)
                    };
                    let user = model.entry(name).or_default();
                    let known = user.sessions.get(&session).is_some_and(|&d| d > now);
                    if !known && user.live(now) >= MODEL_SESSIONS_MAX {
                        assert!(
                            matches!(result, Err(Error::LimitExceeded { .. })),
                            "{result:?}"
                        );
                        check_states(&p, &model, now);
                        p.check_invariants();
                        continue;
                    }
                    let mut expected = Vec::new();
                    user.settle(name, now, &mut expected);
                    user.sessions.insert(session, now + MODEL_TTL);
                    user.seen(now);
                    user.report_online(name, now, &mut expected);
                    assert_eq!(result.unwrap(), expected, "{op:?} at {now}");
                }
                Op::Disconnect(u, session) => {
                    let name = USERS[u];
                    let changes = p.disconnect(name, session, now);
                    let mut expected = Vec::new();
                    if let Some(user) = model.get_mut(name) {
                        user.settle(name, now, &mut expected);
                        if user.sessions.remove(&session).is_some() {
                            user.seen(now);
                            user.settle(name, now, &mut expected);
                        }
                    }
                    assert_eq!(changes, expected, "{op:?} at {now}");
                }
                Op::Advance(ms) => now += ms,
                Op::Expire => {
                    let mut changes = p.expire(now);
                    // Deadline order: the deadline of a user's last session.
                    let deadlines: Vec<u64> = changes
                        .iter()
                        .map(|c| model[&*c.user].sessions.values().copied().max().unwrap())
                        .collect();
                    assert!(deadlines.windows(2).all(|w| w[0] <= w[1]), "{deadlines:?}");
                    let mut expected = Vec::new();
                    for (name, user) in model.iter_mut() {
                        user.settle(name, now, &mut expected);
                    }
                    changes.sort_by(|a, b| a.user.cmp(&b.user));
                    assert_eq!(changes, expected, "expire at {now}");
                    assert_eq!(p.sessions(), model.values().map(|u| u.sessions.len()).sum());
                    assert!(p.next_deadline_ms().is_none_or(|d| d > now));
                }
                Op::TakeDirty => {
                    let drained = p.take_dirty_last_seen();
                    let mut names: Vec<&str> = drained.iter().map(|(n, _)| n.as_str()).collect();
                    names.sort_unstable();
                    let expected: Vec<&str> = model
                        .iter()
                        .filter(|(_, u)| u.offline_since_drain)
                        .map(|(n, _)| *n)
                        .collect();
                    assert_eq!(names, expected, "drained users");
                    for (name, value) in &drained {
                        let user = model.get_mut(name.as_str()).unwrap();
                        user.offline_since_drain = false;
                        assert!(Some(*value) <= user.evidence_ms);
                        if !user.reported_online {
                            assert_eq!(Some(*value), user.evidence_ms);
                        }
                    }
                    assert_eq!(p.take_dirty_last_seen(), vec![]);
                }
            }
            check_states(&p, &model, now);
            p.check_invariants();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn presence_matches_a_naive_model(ops in prop::collection::vec(op(), 1..120)) {
            run_model(ops);
        }
    }
}
