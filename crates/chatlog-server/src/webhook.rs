//! The push webhook (PROTOCOL.md "Resume and offline delivery"): when a message is appended
//! and a member has no connected device, post `{"user","chat","seq","sender","count"}` to the
//! configured URL, at most once per user per interval, `count` being the messages since the
//! previous post (also those the user received while connected).
//!
//! The fanout records each message for its recipients in a pure [`Batcher`] over injected time
//! (one short lock per event, no I/O): a slow or dead webhook never delays the write path or
//! fanout. Posts run in their own tasks with retries and backoff, and a post that fails after
//! every retry puts its count back so the next post carries it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatlog::engine::Clock;
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::metrics as m;

/// Attempts per post.
pub const ATTEMPTS_MAX: u32 = 4;
/// Delay before the first retry; doubles each time.
pub const RETRY_BACKOFF_MS: u64 = 250;
/// Timeout of one post.
pub const POST_TIMEOUT_MS: u64 = 5_000;
/// Posts in flight at once (bounded so a dead endpoint cannot pile up tasks).
pub const POSTS_IN_FLIGHT_MAX: usize = 256;
/// A user with no post scheduled whose last post is this old is forgotten (bounded memory),
/// with the messages it got since: its next post counts from the message that triggers it.
pub const FORGET_AFTER_MS: u64 = 24 * 60 * 60 * 1000;

/// The body of one post.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PushBody {
    /// The offline member.
    pub user: String,
    /// Chat of the latest message.
    pub chat: String,
    /// Its seq.
    pub seq: u64,
    /// Its sender.
    pub sender: String,
    /// Messages since the previous post.
    pub count: u64,
}

/// Handle used by the fanout.
#[derive(Clone)]
pub struct Webhook {
    shared: Arc<Shared>,
}

struct Shared {
    batcher: Mutex<Batcher>,
    clock: Clock,
    /// Posts due now, for the posting task.
    due: mpsc::UnboundedSender<PushBody>,
    /// Wakes the posting task when a new wait was scheduled.
    scheduled: Notify,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").finish_non_exhaustive()
    }
}

/// One recipient of a message, as the fanout saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient {
    /// No device connected anywhere: a post is due (now, or when the user's interval ends).
    Offline,
    /// Connected: the message only counts towards the user's next post.
    Online,
}

impl Webhook {
    /// Starts the webhook task posting to `url`.
    pub fn start(url: String, interval_ms: u64, clock: Clock) -> Webhook {
        let (due, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            batcher: Mutex::new(Batcher::new(interval_ms)),
            clock,
            due,
            scheduled: Notify::new(),
        });
        tokio::spawn(run(url, shared.clone(), rx));
        Webhook { shared }
    }

    /// A message was appended: records it for each recipient (never the sender). Never blocks
    /// on I/O.
    pub fn message<'a>(
        &self,
        chat: &str,
        seq: u64,
        sender: &str,
        recipients: impl IntoIterator<Item = (&'a str, Recipient)>,
    ) {
        let now = (self.shared.clock)();
        let mut due = Vec::new();
        let scheduled = {
            let mut b = self
                .shared
                .batcher
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let timers = b.timers.len();
            for (user, how) in recipients {
                if user == sender {
                    continue;
                }
                match how {
                    Recipient::Offline => due.extend(b.message(user, chat, seq, sender, now)),
                    Recipient::Online => b.seen(user),
                }
            }
            b.timers.len() != timers
        };
        for body in due {
            let _ = self.shared.due.send(body);
        }
        if scheduled {
            self.shared.scheduled.notify_one();
        }
    }
}

#[derive(Debug, Default)]
struct UserState {
    /// The latest message not yet posted, and how many are pending.
    latest: Option<(String, u64, String)>,
    pending: u64,
    /// When the last post was sent (ms), if ever.
    last_post_ms: Option<u64>,
    /// A wake-up is scheduled at this time.
    scheduled_ms: Option<u64>,
}

/// Pure batching decisions: per user, post at once if the interval since the last post has
/// passed, otherwise when it will have.
#[derive(Debug)]
pub struct Batcher {
    interval_ms: u64,
    users: HashMap<String, UserState>,
    timers: BTreeSet<(u64, String)>,
    /// When users were last forgotten.
    forgot_ms: u64,
}

impl Batcher {
    /// A batcher with the per-user interval.
    pub fn new(interval_ms: u64) -> Batcher {
        Batcher {
            interval_ms,
            users: HashMap::new(),
            timers: BTreeSet::new(),
            forgot_ms: 0,
        }
    }

    /// Records a message for `user`; returns a post to send now, if one is due.
    pub fn message(
        &mut self,
        user: &str,
        chat: &str,
        seq: u64,
        sender: &str,
        now_ms: u64,
    ) -> Option<PushBody> {
        let state = self.users.entry(user.to_owned()).or_default();
        state.pending += 1;
        state.latest = Some((chat.to_owned(), seq, sender.to_owned()));
        self.due(user, now_ms)
    }

    /// A message reached `user` while connected: it counts towards the user's next post, if
    /// the user has been posted to (a user never posted to starts counting at its first post).
    pub fn seen(&mut self, user: &str) {
        if let Some(state) = self.users.get_mut(user) {
            state.pending += 1;
        }
    }

    /// A post for `user` failed for good: its messages count towards the next one.
    pub fn failed(&mut self, user: &str, count: u64, now_ms: u64) -> Option<PushBody> {
        let state = self.users.entry(user.to_owned()).or_default();
        state.pending += count;
        self.due(user, now_ms)
    }

    fn due(&mut self, user: &str, now_ms: u64) -> Option<PushBody> {
        let interval = self.interval_ms;
        let state = self.users.get_mut(user)?;
        if state.pending == 0 || state.latest.is_none() {
            return None;
        }
        match state.last_post_ms {
            Some(last) if now_ms < last + interval => {
                let at = last + interval;
                if state.scheduled_ms.is_none() {
                    state.scheduled_ms = Some(at);
                    self.timers.insert((at, user.to_owned()));
                }
                None
            }
            _ => {
                let (chat, seq, sender) = state.latest.clone().expect("checked above");
                let count = std::mem::take(&mut state.pending);
                state.last_post_ms = Some(now_ms);
                Some(PushBody {
                    user: user.to_owned(),
                    chat,
                    seq,
                    sender,
                    count,
                })
            }
        }
    }

    /// Posts whose wait ended at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Vec<PushBody> {
        let mut out = Vec::new();
        while let Some((at, user)) = self.timers.first().cloned() {
            if at > now_ms {
                break;
            }
            self.timers.pop_first();
            if let Some(state) = self.users.get_mut(&user) {
                state.scheduled_ms = None;
            }
            out.extend(self.due(&user, now_ms));
        }
        self.forget(now_ms);
        out
    }

    /// Forgets users with no wait scheduled whose last post is [`FORGET_AFTER_MS`] old
    /// (bounded memory; checked at most once per interval).
    fn forget(&mut self, now_ms: u64) {
        if now_ms
            < self
                .forgot_ms
                .saturating_add(self.interval_ms.min(FORGET_AFTER_MS))
        {
            return;
        }
        self.forgot_ms = now_ms;
        self.users.retain(|_, s| {
            s.scheduled_ms.is_some()
                || s.last_post_ms
                    .is_some_and(|l| now_ms < l.saturating_add(FORGET_AFTER_MS))
        });
    }

    /// When the next wait ends.
    pub fn next_ms(&self) -> Option<u64> {
        self.timers.first().map(|(at, _)| *at)
    }
}

async fn run(url: String, shared: Arc<Shared>, mut due_rx: mpsc::UnboundedReceiver<PushBody>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(POST_TIMEOUT_MS))
        .build()
        .expect("HTTP client without TLS builds");
    let url: Arc<str> = Arc::from(url.as_str());
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<(String, u64)>();
    let slots = Arc::new(tokio::sync::Semaphore::new(POSTS_IN_FLIGHT_MAX));
    loop {
        let now = (shared.clock)();
        let next = shared
            .batcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_ms();
        let wait = next.map_or(Duration::from_secs(3600), |at| {
            Duration::from_millis(at.saturating_sub(now).max(1))
        });
        let mut due = Vec::new();
        tokio::select! {
            body = due_rx.recv() => {
                let Some(body) = body else { return };
                due.push(body);
                while let Ok(body) = due_rx.try_recv() {
                    due.push(body);
                }
            }
            Some((user, count)) = failed_rx.recv() => {
                let mut b = shared.batcher.lock().unwrap_or_else(|e| e.into_inner());
                due.extend(b.failed(&user, count, (shared.clock)()));
            }
            () = shared.scheduled.notified() => {}
            () = tokio::time::sleep(wait) => {
                let mut b = shared.batcher.lock().unwrap_or_else(|e| e.into_inner());
                due.extend(b.tick((shared.clock)()));
            }
        }
        for body in due {
            let client = client.clone();
            let url = url.clone();
            let failed_tx = failed_tx.clone();
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            tokio::spawn(async move {
                let _permit = permit;
                if !post(&client, &url, &body).await {
                    metrics::counter!(m::WEBHOOK_FAILURES).increment(1);
                    let _ = failed_tx.send((body.user, body.count));
                }
            });
        }
    }
}

async fn post(client: &reqwest::Client, url: &str, body: &PushBody) -> bool {
    let json = serde_json::to_vec(body).expect("push bodies serialize");
    let mut backoff = Duration::from_millis(RETRY_BACKOFF_MS);
    for attempt in 1..=ATTEMPTS_MAX {
        let result = client
            .post(url)
            .header("content-type", "application/json")
            .body(json.clone())
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() => {
                metrics::counter!(m::WEBHOOK_POSTS).increment(1);
                return true;
            }
            Ok(r) => tracing::warn!(status = %r.status(), attempt, "push webhook refused a post"),
            Err(e) => tracing::warn!(error = %e, attempt, "push webhook post failed"),
        }
        if attempt < ATTEMPTS_MAX {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posts_at_most_once_per_interval_with_the_count_since_the_last() {
        let mut b = Batcher::new(1000);
        let first = b.message("bob", "g1", 1, "alice", 0).unwrap();
        assert_eq!((first.seq, first.count), (1, 1));
        assert_eq!(b.message("bob", "g1", 2, "alice", 100), None);
        assert_eq!(b.message("bob", "g2", 7, "carol", 200), None);
        assert_eq!(b.next_ms(), Some(1000));
        assert!(b.tick(999).is_empty());
        let second = b.tick(1000);
        assert_eq!(
            second,
            vec![PushBody {
                user: "bob".into(),
                chat: "g2".into(),
                seq: 7,
                sender: "carol".into(),
                count: 2
            }]
        );
        // Nothing pending: no timer, no post.
        assert!(b.tick(5000).is_empty());
        // Other users are independent.
        assert!(b.message("dave", "g1", 3, "alice", 1500).is_some());
        // A failed post's count carries over into the next one.
        assert_eq!(b.failed("bob", 2, 1500), None);
        let third = b.tick(2000);
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].count, 2);
    }

    #[test]
    fn messages_received_while_connected_count_towards_the_next_post() {
        let mut b = Batcher::new(1000);
        // Never posted to: messages while connected start nothing.
        b.seen("bob");
        b.seen("bob");
        assert!(b.tick(10_000).is_empty());
        let first = b.message("bob", "g1", 3, "alice", 10_000).unwrap();
        assert_eq!(
            (first.seq, first.count),
            (3, 1),
            "counting starts at the first post"
        );
        // Two while connected, then one while offline after the interval: one post of 3.
        b.seen("bob");
        b.seen("bob");
        assert!(
            b.tick(20_000).is_empty(),
            "messages while connected post nothing"
        );
        let second = b.message("bob", "g1", 6, "alice", 20_000).unwrap();
        assert_eq!((second.seq, second.count), (6, 3));
        // Within the interval: counted into the scheduled post.
        assert_eq!(b.message("bob", "g1", 7, "alice", 20_100), None);
        b.seen("bob");
        let third = b.tick(21_000);
        assert_eq!(third.len(), 1);
        assert_eq!((third[0].seq, third[0].count), (7, 2));
        // A day without a post: forgotten, so the next post counts from its own message.
        b.seen("bob");
        assert!(b.tick(21_000 + FORGET_AFTER_MS).is_empty());
        let fourth = b
            .message("bob", "g1", 9, "alice", 22_000 + FORGET_AFTER_MS)
            .unwrap();
        assert_eq!(fourth.count, 1);
    }
}
