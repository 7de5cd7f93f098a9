//! Writes a follower forwards to the leader, several at a time, proposed in the order the
//! follower made them.
//!
//! A follower batches its clients' operations and forwards each batch to the leader
//! (`/raft/write`). Waiting for one forward to come back before sending the next cost its
//! operations a whole leader round trip of queueing (6–7 ms at the median at 10,000 msg/s), so
//! up to `FORWARDS_IN_FLIGHT` (in `node.rs`) are in flight. Separate HTTP requests may
//! overtake each other, but one connection's writes must be ordered as it sent them, so every
//! batch carries the follower's *epoch* and its *sequence number* in that epoch, and the
//! leader queues a follower's batches strictly in sequence ([`Order`]) into its own batcher,
//! where they join the leader's next entry with the leader's own clients' operations (one
//! entry and one fsync per node for all of them).
//!
//! - A follower starts a new epoch (sequence 0) whenever it forwards to a different leader
//!   and after any forward that failed, so a lost batch never blocks the ones behind it for
//!   longer than it takes the follower to notice. Epochs only grow (they start from the
//!   wall clock in µs), also across restarts.
//! - The leader keeps, per follower, the newest epoch it has seen and the next sequence it
//!   expects. A batch ahead of its turn waits (until its deadline); a batch of an older epoch,
//!   or one whose predecessor never came, is answered `Retry`: nothing was written, the
//!   follower queues its operations again. So is a batch past the first of an epoch from a
//!   follower this leader process has not heard from, once it has waited 200 ms for the
//!   epoch's first batch (this leader just took over or restarted, and the batches before it
//!   went elsewhere).
//! - A duplicate of a batch (the network may deliver a request twice) gets the answer of the
//!   original, never a second write.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::types::{NodeId, Request, Response};

/// A batch a follower forwards to the leader.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Forwarded {
    /// The follower.
    pub from: NodeId,
    /// The follower's epoch (see the module documentation).
    pub epoch: u64,
    /// The batch's place in the epoch, from 0.
    pub seq: u64,
    /// The operations.
    pub request: Request,
}

/// The answer of the leader to a forwarded write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum WriteReply {
    /// Committed and applied at this Raft index.
    Done { index: u64, response: Response },
    /// The receiver is not the leader (nothing was written).
    NotLeader,
    /// Out of turn (an older epoch, or the batch before it never came): nothing was written;
    /// send the operations again.
    Retry,
    /// The write failed on the leader.
    Failed(String),
}

/// How long a batch past the first of an epoch waits for that epoch's first batch when the
/// leader has not heard from its follower yet.
const UNKNOWN_FOLLOWER_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Answers of recently proposed batches kept per follower, for duplicates.
const RECENT_MAX: usize = 64;

/// The leader's record of each follower's forwarded batches.
#[derive(Default)]
pub(crate) struct Order {
    streams: Mutex<HashMap<NodeId, Stream>>,
    changed: Notify,
}

struct Stream {
    epoch: u64,
    next: u64,
    /// (seq, answer once known) of the last batches proposed in this epoch.
    recent: VecDeque<(u64, watch::Receiver<Option<WriteReply>>)>,
}

/// What [`Order::turn`] decided for a batch.
pub(crate) enum Turn<'a> {
    /// Its turn: propose it, then call [`Ticket::proposed`].
    Go(Ticket<'a>),
    /// A duplicate of a batch already proposed: its answer arrives here.
    Duplicate(watch::Receiver<Option<WriteReply>>),
    /// Not to be written: answer [`WriteReply::Retry`].
    Retry,
}

/// The right to propose one batch; proposing (or dropping the ticket) lets the next one go.
pub(crate) struct Ticket<'a> {
    order: &'a Order,
    from: NodeId,
    epoch: u64,
    answer: Option<watch::Sender<Option<WriteReply>>>,
    advanced: bool,
}

impl Order {
    /// Waits (until `deadline`) for batch `seq` of `from`'s `epoch` to be next.
    pub(crate) async fn turn(
        &self,
        from: NodeId,
        epoch: u64,
        seq: u64,
        deadline: Instant,
    ) -> Turn<'_> {
        let arrived = Instant::now();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let mut wait_until = deadline;
            {
                let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
                if seq > 0 && !streams.contains_key(&from) {
                    // A follower this leader has not heard from: either the first batch of
                    // its epoch is a moment behind (they were sent together), or this leader
                    // just took over (or restarted) and the batches before went elsewhere
                    // and will never come. Wait briefly for the first; then the follower
                    // starts a new epoch rather than stalling until the deadline.
                    wait_until = deadline.min(arrived + UNKNOWN_FOLLOWER_WAIT);
                    if Instant::now() >= wait_until {
                        return Turn::Retry;
                    }
                } else {
                    let stream = streams.entry(from).or_insert_with(|| Stream {
                        epoch,
                        next: 0,
                        recent: VecDeque::new(),
                    });
                    if epoch > stream.epoch {
                        *stream = Stream {
                            epoch,
                            next: 0,
                            recent: VecDeque::new(),
                        };
                        // Batches waiting in the older epoch give up.
                        self.changed.notify_waiters();
                    }
                    if epoch < stream.epoch {
                        return Turn::Retry;
                    }
                    // Its turn was given already (maybe not yet proposed): a duplicate.
                    if let Some((_, answer)) = stream.recent.iter().find(|(s, _)| *s == seq) {
                        return Turn::Duplicate(answer.clone());
                    }
                    if seq < stream.next {
                        return Turn::Retry;
                    }
                    if seq == stream.next {
                        let (tx, rx) = watch::channel(None);
                        if stream.recent.len() == RECENT_MAX {
                            stream.recent.pop_front();
                        }
                        stream.recent.push_back((seq, rx));
                        return Turn::Go(Ticket {
                            order: self,
                            from,
                            epoch,
                            answer: Some(tx),
                            advanced: false,
                        });
                    }
                }
            }
            if tokio::time::timeout_at(wait_until.into(), changed)
                .await
                .is_err()
            {
                return Turn::Retry;
            }
        }
    }
}

impl Ticket<'_> {
    /// The batch is handed to Raft (in order): the next one may go.
    pub(crate) fn proposed(&mut self) {
        if std::mem::replace(&mut self.advanced, true) {
            return;
        }
        let mut streams = self.order.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = streams.get_mut(&self.from)
            && stream.epoch == self.epoch
        {
            stream.next += 1;
        }
        drop(streams);
        self.order.changed.notify_waiters();
    }

    /// Records the answer for duplicates of this batch.
    pub(crate) fn answer(mut self, reply: &WriteReply) {
        if let Some(tx) = self.answer.take() {
            tx.send_replace(Some(reply.clone()));
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // Not proposed (failed before): nothing was written, the next batch may go.
        self.proposed();
        if let Some(tx) = self.answer.take() {
            tx.send_replace(Some(WriteReply::Failed(
                "the original of this duplicate was not answered".into(),
            )));
        }
    }
}

/// A follower's epoch and next sequence number.
pub(crate) struct Stamps {
    leader: Option<NodeId>,
    epoch: u64,
    next: u64,
}

impl Stamps {
    pub(crate) fn new() -> Stamps {
        Stamps {
            leader: None,
            epoch: now_micros(),
            next: 0,
        }
    }

    /// The (epoch, seq) of the next batch forwarded to `leader`.
    pub(crate) fn stamp(&mut self, leader: NodeId) -> (u64, u64) {
        if self.leader != Some(leader) {
            self.leader = Some(leader);
            self.new_epoch();
        }
        let seq = self.next;
        self.next += 1;
        (self.epoch, seq)
    }

    /// A forward of `epoch` failed: later batches start a new epoch (once per epoch).
    pub(crate) fn failed(&mut self, epoch: u64) {
        if self.epoch == epoch {
            self.new_epoch();
        }
    }

    fn new_epoch(&mut self) {
        self.epoch = (self.epoch + 1).max(now_micros());
        self.next = 0;
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn batches_go_in_sequence_whatever_order_they_arrive_in() {
        let order = Arc::new(Order::default());
        let log = Arc::new(Mutex::new(vec![0]));
        let Turn::Go(mut first) = order.turn(7, 100, 0, soon()).await else {
            panic!("first batch")
        };
        first.proposed();
        let mut tasks = Vec::new();
        for seq in (1..20u64).rev() {
            let (order, log) = (order.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                match order.turn(7, 100, seq, soon()).await {
                    Turn::Go(mut ticket) => {
                        log.lock().unwrap().push(seq);
                        ticket.proposed();
                        ticket.answer(&WriteReply::NotLeader);
                    }
                    _ => panic!("batch {seq} was not given its turn"),
                }
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_duplicate_gets_the_original_answer_and_a_newer_epoch_retires_the_old() {
        let order = Order::default();
        let Turn::Go(mut ticket) = order.turn(1, 5, 0, soon()).await else {
            panic!("first batch")
        };
        ticket.proposed();
        let Turn::Duplicate(mut dup) = order.turn(1, 5, 0, soon()).await else {
            panic!("duplicate not recognised")
        };
        ticket.answer(&WriteReply::Failed("x".into()));
        let answer = dup.wait_for(|a| a.is_some()).await.unwrap().clone();
        assert!(matches!(answer, Some(WriteReply::Failed(why)) if why == "x"));

        // Batch 2 waits for batch 1, which never comes; a newer epoch retires it.
        let waiting = order.turn(1, 5, 2, soon());
        let newer = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            order.turn(1, 6, 0, soon()).await
        };
        let (old, new) = tokio::join!(waiting, newer);
        assert!(matches!(old, Turn::Retry));
        assert!(matches!(new, Turn::Go(_)));
        drop(new);
        // The old epoch stays retired; an unanswered ticket lets the next one go.
        assert!(matches!(order.turn(1, 5, 1, soon()).await, Turn::Retry));
        assert!(matches!(order.turn(1, 6, 1, soon()).await, Turn::Go(_)));
    }

    #[tokio::test]
    async fn a_duplicate_arriving_before_the_original_is_proposed_is_not_given_a_turn() {
        let order = Order::default();
        let Turn::Go(mut original) = order.turn(2, 1, 0, soon()).await else {
            panic!("first batch")
        };
        assert!(matches!(
            order.turn(2, 1, 0, soon()).await,
            Turn::Duplicate(_)
        ));
        original.proposed();
        assert!(matches!(
            order.turn(2, 1, 0, soon()).await,
            Turn::Duplicate(_)
        ));
    }

    #[tokio::test]
    async fn a_batch_whose_predecessor_never_comes_is_retried_at_its_deadline() {
        let order = Order::default();
        let Turn::Go(ticket) = order.turn(3, 1, 0, soon()).await else {
            panic!("first batch")
        };
        drop(ticket);
        let deadline = Instant::now() + Duration::from_millis(50);
        assert!(matches!(order.turn(3, 1, 2, deadline).await, Turn::Retry));
    }

    #[tokio::test]
    async fn a_follower_met_mid_epoch_is_told_to_start_a_new_one_at_once() {
        // A restarted leader process, or a new leader, knows nothing of this follower's
        // epoch 9: batch 5 of it is refused without waiting, and the new epoch goes.
        let order = Order::default();
        let started = Instant::now();
        assert!(matches!(order.turn(4, 9, 5, soon()).await, Turn::Retry));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(matches!(order.turn(4, 10, 0, soon()).await, Turn::Go(_)));
    }

    #[test]
    fn stamps_start_a_new_epoch_per_leader_and_after_a_failure() {
        let mut s = Stamps::new();
        let (e1, q0) = s.stamp(1);
        assert_eq!(q0, 0);
        assert_eq!(s.stamp(1), (e1, 1));
        s.failed(e1);
        let (e2, q) = s.stamp(1);
        assert!(e2 > e1 && q == 0);
        s.failed(e1); // a late failure of the old epoch changes nothing
        assert_eq!(s.stamp(1), (e2, 1));
        let (e3, q) = s.stamp(2);
        assert!(e3 > e2 && q == 0);
    }
}
