//! Fanout: who is connected, and the one task that turns committed records into pushes.
//!
//! The hub subscribes to the engine's committed records (in log order, never dropped: a
//! lagging subscription resumes from the log). For each chat event it encodes the push
//! **once** and queues the same bytes on every connected device of every member. Each
//! connection has a bounded [`Outbox`]; the hub never waits for a connection: a full outbox
//! marks the connection as too slow and the connection closes itself with 4001, to resume
//! from its cursor on reconnect. One slow client therefore never delays the others.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chatlog::engine::{Committed, Engine, EventKind, Record, SubscriptionError};
use tokio::sync::Notify;
use tungstenite::Utf8Bytes;

use crate::metrics as m;
use crate::protocol;
use crate::webhook::{Recipient, Webhook};

/// One queued frame for a connection.
#[derive(Debug, Clone)]
pub enum Push {
    /// A chat event: the connection drops it if it already sent this seq of the chat.
    Event {
        /// Chat id (shared by all recipients).
        chat: Arc<str>,
        /// Seq.
        seq: u64,
        /// The encoded frame (shared by all recipients).
        frame: Utf8Bytes,
    },
    /// Any other push (receipt, presence, typing).
    Frame(Utf8Bytes),
}

/// The outbound queue of one connection, filled by the hub and drained by the connection's
/// task. Empty queues hold no allocation, so idle connections stay small.
#[derive(Debug)]
pub struct Outbox {
    /// Connection id (also the presence session id).
    pub id: u64,
    /// Authenticated user.
    pub user: Arc<str>,
    queue: Mutex<VecDeque<Push>>,
    capacity: usize,
    overflowed: AtomicBool,
    /// Woken when something was queued or the queue overflowed.
    pub notify: Notify,
}

impl Outbox {
    /// An empty outbox.
    pub fn new(id: u64, user: Arc<str>, capacity: usize) -> Outbox {
        Outbox {
            id,
            user,
            queue: Mutex::new(VecDeque::new()),
            capacity,
            overflowed: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    /// Queues a push and wakes the connection; on overflow marks the connection too slow
    /// instead (it will close).
    pub fn push(&self, push: Push) {
        self.push_quiet(push);
        self.notify.notify_one();
    }

    /// Queues a push without waking the connection (the caller wakes it once for a batch).
    pub fn push_quiet(&self, push: Push) {
        if self.overflowed.load(Ordering::Relaxed) {
            return;
        }
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= self.capacity {
            drop(queue);
            if !self.overflowed.swap(true, Ordering::Relaxed) {
                metrics::counter!(m::OUTBOUND_DROPS).increment(1);
            }
        } else {
            queue.push_back(push);
        }
    }

    /// Takes everything queued (the queue's allocation goes with it).
    pub fn take(&self) -> VecDeque<Push> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The queue overflowed: the connection must close with 4001.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }
}

/// Connected devices by user, and the fanout's view of chat membership.
#[derive(Debug, Default)]
pub struct Hub {
    connections: RwLock<HashMap<Arc<str>, Vec<Arc<Outbox>>>>,
    next_id: AtomicU64,
}

impl Hub {
    /// A new connection id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a connection so it receives pushes from now on.
    pub fn register(&self, outbox: Arc<Outbox>) {
        let mut map = self.connections.write().unwrap_or_else(|e| e.into_inner());
        map.entry(outbox.user.clone()).or_default().push(outbox);
    }

    /// Removes a connection.
    pub fn unregister(&self, outbox: &Outbox) {
        let mut map = self.connections.write().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = map.get_mut(&outbox.user) {
            list.retain(|o| o.id != outbox.id);
            if list.is_empty() {
                map.remove(&outbox.user);
            }
        }
    }

    /// Wakes every connection (shutdown: they see the cancelled flag).
    pub fn wake_all(&self) {
        let map = self.connections.read().unwrap_or_else(|e| e.into_inner());
        for outbox in map.values().flatten() {
            outbox.notify.notify_one();
        }
    }

    /// Marks every connection too slow (they close with 4001 and their clients resume from
    /// their cursors): used when the node's engine was replaced by a snapshot, so no
    /// connection misses what the old engine's fanout did not send.
    pub fn overflow_all(&self) {
        let map = self.connections.read().unwrap_or_else(|e| e.into_inner());
        for outbox in map.values().flatten() {
            outbox.overflowed.store(true, Ordering::Relaxed);
            outbox.notify.notify_one();
        }
    }

    /// Whether `user` has a connected device here.
    pub fn is_connected(&self, user: &str) -> bool {
        self.connections
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(user)
    }

    /// Queues `push` on every connection of every user in `users` (except connections of
    /// `skip_user`) and wakes them; returns how many connections got it.
    pub fn send_to<'a>(
        &self,
        users: impl IntoIterator<Item = &'a str>,
        skip_user: Option<&str>,
        push: &Push,
    ) -> u64 {
        let mut wake = Wakes::default();
        let n = self.queue_to(users, skip_user, push, &mut wake);
        wake.wake();
        n
    }

    /// Like [`Hub::send_to`], but the connections are woken later by `wake`, once for a whole
    /// batch of pushes.
    pub fn queue_to<'a>(
        &self,
        users: impl IntoIterator<Item = &'a str>,
        skip_user: Option<&str>,
        push: &Push,
        wake: &mut Wakes,
    ) -> u64 {
        let map = self.connections.read().unwrap_or_else(|e| e.into_inner());
        let mut delivered = 0;
        for user in users {
            if Some(user) == skip_user {
                continue;
            }
            if let Some(list) = map.get(user) {
                for outbox in list {
                    outbox.push_quiet(push.clone());
                    wake.add(outbox);
                    delivered += 1;
                }
            }
        }
        delivered
    }

    /// Whether each of `users` has a device connected here, in order.
    fn connected(&self, users: &[Arc<str>]) -> Vec<bool> {
        let map = self.connections.read().unwrap_or_else(|e| e.into_inner());
        users.iter().map(|u| map.contains_key(&**u)).collect()
    }
}

/// Connections to wake after a batch of pushes (each once).
#[derive(Debug, Default)]
pub struct Wakes {
    ids: HashSet<u64>,
    outboxes: Vec<Arc<Outbox>>,
}

impl Wakes {
    fn add(&mut self, outbox: &Arc<Outbox>) {
        if self.ids.insert(outbox.id) {
            self.outboxes.push(outbox.clone());
        }
    }

    /// Wakes every connection added since the last call.
    pub fn wake(&mut self) {
        for outbox in self.outboxes.drain(..) {
            outbox.notify.notify_one();
        }
        self.ids.clear();
    }
}

/// The fanout task's cache of chat members, kept current by the `members` events it sees.
#[derive(Debug, Default)]
struct Members {
    chats: HashMap<String, Vec<Arc<str>>>,
}

impl Members {
    /// Members of `chat` (loaded from the engine on first sight).
    fn get(&mut self, engine: &Engine, chat: &str) -> &mut Vec<Arc<str>> {
        if !self.chats.contains_key(chat) {
            let members = engine
                .members(chat)
                .unwrap_or_default()
                .into_iter()
                .map(Arc::from)
                .collect();
            self.chats.insert(chat.to_owned(), members);
        }
        self.chats.get_mut(chat).expect("inserted above")
    }
}

/// Runs the fanout of the cell's engine until it closes; when a snapshot replaces the engine,
/// every connection is closed with 4001 (its client resumes from its cursor) and the fanout
/// continues from the new engine.
pub async fn run_fanout_cell(
    cell: Arc<chatlog_raft::EngineCell>,
    hub: Arc<Hub>,
    webhook: Option<Webhook>,
    push_filter: Option<PushFilter>,
    batch_max: usize,
) {
    let webhook = webhook.map(|w| (w, push_filter));
    cell.follow(
        |engine| run_fanout(engine, hub.clone(), webhook.as_ref(), batch_max),
        || {
            tracing::warn!("engine replaced by a snapshot: connections resume from their cursors");
            hub.overflow_all();
        },
    )
    .await;
}

/// Who sends the push webhook in a cluster: only one node (the leader), and a user counts as
/// offline only when no device of it is connected to any node.
#[derive(Clone)]
pub struct PushFilter {
    /// Whether this node sends the posts now.
    pub posts_here: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Whether a device of the user is connected to any node (asked only for users with no
    /// device connected here).
    pub online_elsewhere: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

impl std::fmt::Debug for PushFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushFilter").finish_non_exhaustive()
    }
}

/// Runs the fanout until the engine closes.
pub async fn run_fanout(
    engine: Arc<Engine>,
    hub: Arc<Hub>,
    webhook: Option<&(Webhook, Option<PushFilter>)>,
    batch_max: usize,
) {
    let mut subscription = engine.subscribe();
    let mut out = Fanout {
        members: Members::default(),
        wakes: Wakes::default(),
        delivered: metrics::counter!(m::EVENTS_DELIVERED),
        appended: metrics::counter!(m::MESSAGES_APPENDED),
    };
    loop {
        let mut next = subscription.recv().await;
        // Everything already committed goes out as one batch: each connection is woken once
        // and writes all of its frames with one flush.
        let mut handled = 0;
        loop {
            handled += 1;
            match next {
                Ok(committed) => {
                    fan_out(&engine, &hub, webhook, &mut out, &committed);
                }
                Err(SubscriptionError::Lagged { resume_from }) => {
                    tracing::warn!(resume_from, "fanout lagged; catching up from the log");
                }
                Err(SubscriptionError::Closed) => {
                    out.wakes.wake();
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "fanout cannot read the log; stopping fanout");
                    out.wakes.wake();
                    return;
                }
            }
            // Take the next record only if this batch has room: a record taken is handled.
            if handled >= batch_max {
                break;
            }
            match subscription.try_recv() {
                Some(n) => next = n,
                None => break,
            }
        }
        out.wakes.wake();
    }
}

struct Fanout {
    members: Members,
    wakes: Wakes,
    delivered: metrics::Counter,
    appended: metrics::Counter,
}

fn fan_out(
    engine: &Engine,
    hub: &Hub,
    webhook: Option<&(Webhook, Option<PushFilter>)>,
    out: &mut Fanout,
    committed: &Committed,
) {
    let members = &mut out.members;
    match &committed.record {
        Record::Event { event, created } => {
            let chat: Arc<str> = Arc::from(event.chat.as_str());
            let push = Push::Event {
                chat,
                seq: event.seq,
                frame: Utf8Bytes::from(protocol::event_push(event)),
            };
            let changed: Vec<Arc<str>>;
            let recipients: &[Arc<str>] = match &event.kind {
                EventKind::Members { added, removed, .. } => {
                    let list = if created.is_some() {
                        // A new chat: the event names everyone.
                        let list = members.chats.entry(event.chat.clone()).or_default();
                        list.clear();
                        list
                    } else {
                        members.get(engine, &event.chat)
                    };
                    // Removed users see the event that removes them.
                    let before: Vec<Arc<str>> = list.clone();
                    let gone: HashSet<&str> = removed.iter().map(String::as_str).collect();
                    list.retain(|m| !gone.contains(&**m));
                    for user in added {
                        if !list.iter().any(|m| &**m == user) {
                            list.push(Arc::from(user.as_str()));
                        }
                    }
                    let mut all = before;
                    for m in list.iter() {
                        if !all.contains(m) {
                            all.push(m.clone());
                        }
                    }
                    changed = all;
                    &changed
                }
                _ => members.get(engine, &event.chat),
            };
            let delivered =
                hub.queue_to(recipients.iter().map(|u| &**u), None, &push, &mut out.wakes);
            out.delivered.increment(delivered);
            if let EventKind::Message { .. } = event.kind {
                out.appended.increment(1);
                if let Some((webhook, policy)) = webhook
                    && policy.as_ref().is_none_or(|p| (p.posts_here)())
                {
                    let here = hub.connected(recipients);
                    let recipients = recipients.iter().zip(here).map(|(user, here)| {
                        let away =
                            !here && policy.as_ref().is_none_or(|p| !(p.online_elsewhere)(user));
                        let how = if away {
                            Recipient::Offline
                        } else {
                            Recipient::Online
                        };
                        (&**user, how)
                    });
                    webhook.message(&event.chat, event.seq, &event.sender, recipients);
                }
            }
        }
        Record::Cursor(moved) => {
            let push = Push::Frame(Utf8Bytes::from(protocol::receipt_push(
                &moved.chat,
                &moved.user,
                moved.user_delivered,
                moved.user_read,
            )));
            let recipients = members.get(engine, &moved.chat);
            hub.queue_to(recipients.iter().map(|u| &**u), None, &push, &mut out.wakes);
        }
        _ => {}
    }
}
