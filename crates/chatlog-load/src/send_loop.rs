//! The per-connection send loop every target shares: what differs between chatlog, Redis and
//! NATS (how one message is sent, what comes back) is behind [`Transport`]; everything else is
//! here, once.
//!
//! # Pacing
//!
//! - At `--rate R` the connection's ticker fires every `N/R` seconds, its first tick spread over
//!   one period ([`Shared::send_ticker`]). A tick that finds `--inflight` sends outstanding is
//!   skipped, and counted in the measured window (`send_slots_skipped`): the target rate was not
//!   offered.
//! - Without a rate, the connection sends as soon as the window opens until `--inflight` sends
//!   are outstanding, and tops up after every event (an acknowledgement frees a slot).
//! - Sends go to the connection's chats in turn. Each is claimed through [`Shared::begin_send`],
//!   so none starts once the window is over; it is counted as sent (in the measured window)
//!   before the transport issues it, and its acknowledgement latency is measured from the
//!   [`Instant`] the transport took just before issuing it.
//! - The loop ends when the worker reaches [`Phase::Done`] or the connection is lost; sends still
//!   outstanding then are released and counted as `unacked_at_end`.

use std::future::Future;

use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::time::{Instant, Interval};

use crate::stats::Recorder;
use crate::worker::{Phase, Shared};

/// The connection is gone; whoever noticed has recorded why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLost;

/// One connection of a target, as the send loop drives it.
///
/// Contract: [`Transport::outstanding`] counts every send [`Transport::send`] issued (even one
/// that failed with [`ConnectionLost`]) until [`Transport::on_event`] ended it through
/// [`Context::end_send`]. The loop relies on this both for the `--inflight` bound and for
/// releasing the worker's count of outstanding sends.
pub trait Transport {
    /// What the loop waits for besides its ticker and the phase: an incoming frame, a finished
    /// send.
    type Event;

    /// Sends issued and not yet ended.
    fn outstanding(&self) -> usize;

    /// Waits for the next event. Must be cancel-safe: the loop drops the future whenever its
    /// ticker or the phase fires first, and asks again.
    fn next_event(&mut self) -> impl Future<Output = Self::Event> + Send;

    /// Handles one event; an acknowledgement or a failed send goes to [`Context::end_send`].
    /// `Err` ends the loop.
    fn on_event(
        &mut self,
        event: Self::Event,
        context: &mut Context<'_>,
    ) -> Result<(), ConnectionLost>;

    /// Issues one message to chat slot `slot` (an index into the connection's chats, in the order
    /// the connection was given them), timestamped now. The loop has claimed and counted it.
    fn send(
        &mut self,
        slot: usize,
        context: &mut Context<'_>,
    ) -> impl Future<Output = Result<(), ConnectionLost>> + Send;
}

/// What the loop hands a [`Transport`]: the worker's shared state, the connection's recorder and
/// the phase the loop last saw.
#[derive(Debug)]
pub struct Context<'a> {
    /// The worker's shared state.
    pub shared: &'a Shared,
    /// The connection's counters and latency samples.
    pub recorder: &'a mut Recorder,
    /// The phase, as of the loop's last look.
    pub phase: Phase,
}

impl Context<'_> {
    /// Ends one outstanding send issued at `sent_at`: acknowledged (its latency is recorded in
    /// the measured window) or failed with an error kind (counted whenever it happens).
    pub fn end_send(&mut self, sent_at: Instant, outcome: Result<(), String>) {
        self.shared.end_sends(1);
        match outcome {
            Ok(()) if self.phase == Phase::Measure => {
                let latency_us = u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.recorder.ack(latency_us, &self.shared.stats);
            }
            Ok(()) => {}
            Err(kind) => self.recorder.error(&kind),
        }
    }
}

/// Which chat the next send goes to, and how many may be outstanding.
#[derive(Debug)]
struct Sends {
    chats: usize,
    next_slot: usize,
    inflight_max: usize,
}

impl Sends {
    /// Claims one send and issues it to the next chat in turn; `Ok(false)` when none was issued
    /// (the connection has no chats, or sends are closed).
    async fn send_next<T: Transport>(
        &mut self,
        transport: &mut T,
        context: &mut Context<'_>,
    ) -> Result<bool, ConnectionLost> {
        if self.chats == 0 || !context.shared.begin_send() {
            return Ok(false);
        }
        let slot = self.next_slot;
        self.next_slot = (slot + 1) % self.chats;
        if context.phase == Phase::Measure {
            context.recorder.counts().sent += 1;
        }
        transport.send(slot, context).await?;
        Ok(true)
    }

    /// Sends until `--inflight` sends are outstanding, or no more can be issued.
    async fn fill<T: Transport>(
        &mut self,
        transport: &mut T,
        context: &mut Context<'_>,
    ) -> Result<(), ConnectionLost> {
        while transport.outstanding() < self.inflight_max
            && self.send_next(transport, context).await?
        {}
        Ok(())
    }
}

/// Waits for the next tick of `ticker`, or forever when there is none.
async fn next_tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Runs connection `index`'s sends over `transport` to its `chats` chats (see the module docs)
/// until the worker reaches [`Phase::Done`] or the connection is lost, and returns the phase it
/// last saw.
pub async fn run<T: Transport>(
    transport: &mut T,
    shared: &Shared,
    index: usize,
    chats: usize,
    recorder: &mut Recorder,
) -> Phase {
    let mut phase_rx = shared.phase.clone();
    let mut context = Context {
        phase: *phase_rx.borrow_and_update(),
        shared,
        recorder,
    };
    let mut sends = Sends {
        chats,
        next_slot: 0,
        inflight_max: shared.args.inflight,
    };
    let as_fast_as_possible = shared.send_period.is_none();
    let mut ticker = None;
    let mut started = false;
    loop {
        if context.phase == Phase::Done {
            break;
        }
        if context.phase.sending() && !started {
            started = true;
            ticker = shared.send_ticker(index);
            if as_fast_as_possible && sends.fill(transport, &mut context).await.is_err() {
                break;
            }
        }
        if !context.phase.sending() {
            ticker = None;
        }
        tokio::select! {
            event = transport.next_event() => {
                if transport.on_event(event, &mut context).is_err() {
                    break;
                }
                if as_fast_as_possible
                    && context.phase.sending()
                    && sends.fill(transport, &mut context).await.is_err()
                {
                    break;
                }
            }
            () = next_tick(&mut ticker) => {
                if transport.outstanding() < sends.inflight_max {
                    if sends.send_next(transport, &mut context).await.is_err() {
                        break;
                    }
                } else if context.phase == Phase::Measure {
                    context.recorder.counts().send_slots_skipped += 1;
                }
            }
            changed = phase_rx.changed() => {
                context.phase = if changed.is_ok() { *phase_rx.borrow_and_update() } else { Phase::Done };
            }
        }
    }
    let unacked = transport.outstanding() as u64;
    shared.end_sends(unacked);
    context.recorder.counts().unacked_at_end += unacked;
    context.phase
}

/// A send in flight whose future resolves to its acknowledgement: when it was issued, and `Ok`
/// or the error kind.
pub type PendingAck = BoxFuture<'static, (Instant, Result<(), String>)>;

/// The [`Transport`] of targets whose client hands back one future per send that resolves once
/// the send is acknowledged (Redis, NATS); what they deliver is read by a task of its own
/// ([`run_beside_reader`]). `issue(slot)` issues one send to chat slot `slot`, taking its
/// [`Instant`] just before.
pub struct AckFutures<'a> {
    pending: FuturesUnordered<PendingAck>,
    /// Boxed once per connection, at the cost of one dynamic call per send: with the closure's
    /// own type as a parameter, rustc cannot prove the connection task `Send` (it reports a
    /// higher-ranked lifetime mismatch on the boxed futures).
    issue: Box<dyn FnMut(usize) -> PendingAck + Send + 'a>,
}

impl<'a> AckFutures<'a> {
    /// No send outstanding yet.
    pub fn new(issue: impl FnMut(usize) -> PendingAck + Send + 'a) -> Self {
        Self {
            pending: FuturesUnordered::new(),
            issue: Box::new(issue),
        }
    }
}

impl Transport for AckFutures<'_> {
    type Event = (Instant, Result<(), String>);

    fn outstanding(&self) -> usize {
        self.pending.len()
    }

    async fn next_event(&mut self) -> Self::Event {
        match self.pending.next().await {
            Some(ended) => ended,
            // Nothing outstanding: the ticker or the phase ends the wait.
            None => std::future::pending().await,
        }
    }

    fn on_event(
        &mut self,
        (sent_at, outcome): Self::Event,
        context: &mut Context<'_>,
    ) -> Result<(), ConnectionLost> {
        context.end_send(sent_at, outcome);
        Ok(())
    }

    async fn send(
        &mut self,
        slot: usize,
        _context: &mut Context<'_>,
    ) -> Result<(), ConnectionLost> {
        self.pending.push((self.issue)(slot));
        Ok(())
    }
}

/// Runs connection `index`'s send loop over `transport` to its `chats` chats while `reader`, the
/// connection's reading half, runs as a task of its own and records deliveries; then waits for
/// the reader (it ends when the worker is done).
pub async fn run_beside_reader<T: Transport>(
    mut transport: T,
    shared: &Shared,
    index: usize,
    chats: usize,
    reader: impl Future<Output = ()> + Send + 'static,
) {
    let reader = tokio::spawn(reader);
    let mut recorder = Recorder::default();
    run(&mut transport, shared, index, chats, &mut recorder).await;
    // Sends still outstanding are abandoned now, not when the reader is done.
    drop(transport);
    recorder.flush(&shared.stats);
    if reader.await.is_err() {
        recorder.error("reader_panicked");
        recorder.flush(&shared.stats);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::watch;

    use super::*;

    /// The warm-up of [`drive`]: off the grid the tests' sends and acknowledgements are on (whole
    /// multiples of 10 ms, plus the acknowledgement delay), so that none coincides with the start
    /// or the end of the measured window.
    const WARMUP: Duration = Duration::from_millis(1003);

    /// What a test's sends did: the chat slot of every send, and the most outstanding at once.
    #[derive(Debug, Default)]
    struct Issued {
        slots: Vec<usize>,
        outstanding: usize,
        outstanding_max: usize,
    }

    /// An [`AckFutures`] whose sends are acknowledged `ack_after` after they were issued (never,
    /// with `None`), recording what was issued in `issued`.
    fn acked_after(
        ack_after: Option<Duration>,
        issued: &Arc<Mutex<Issued>>,
    ) -> AckFutures<'static> {
        let issued = Arc::clone(issued);
        AckFutures::new(move |slot| {
            let sent_at = Instant::now();
            {
                let mut issued = issued.lock().unwrap();
                issued.slots.push(slot);
                issued.outstanding += 1;
                issued.outstanding_max = issued.outstanding_max.max(issued.outstanding);
            }
            let issued = Arc::clone(&issued);
            Box::pin(async move {
                match ack_after {
                    Some(after) => tokio::time::sleep_until(sent_at + after).await,
                    None => std::future::pending().await,
                }
                issued.lock().unwrap().outstanding -= 1;
                (sent_at, Ok(()))
            })
        })
    }

    /// What [`drive`] saw.
    #[derive(Debug)]
    struct Outcome {
        counts: crate::stats::Counters,
        /// The worker's count of outstanding sends at the end.
        inflight: u64,
        issued: Issued,
    }

    /// Runs connection 0 with `args` and `chats` chats over [`acked_after`]`(ack_after)`:
    /// warm-up [`WARMUP`], measured `measure`, drain 1 s, then done.
    async fn drive(
        ack_after: Option<Duration>,
        args: &[&str],
        chats: usize,
        measure: Duration,
    ) -> Outcome {
        let issued = Arc::default();
        let mut transport = acked_after(ack_after, &issued);
        let (phase_tx, phase) = watch::channel(Phase::Setup);
        let shared = Shared::for_tests(args, phase);
        let mut recorder = Recorder::default();
        let phases = async {
            shared.sends_open.store(true, Ordering::SeqCst);
            phase_tx.send_replace(Phase::Warmup);
            tokio::time::sleep(WARMUP).await;
            phase_tx.send_replace(Phase::Measure);
            tokio::time::sleep(measure).await;
            shared.sends_open.store(false, Ordering::SeqCst);
            phase_tx.send_replace(Phase::Drain);
            tokio::time::sleep(Duration::from_secs(1)).await;
            phase_tx.send_replace(Phase::Done);
        };
        let sending = run(&mut transport, &shared, 0, chats, &mut recorder);
        let (phase, ()) = tokio::join!(sending, phases);
        assert_eq!(phase, Phase::Done);
        recorder.flush(&shared.stats);
        drop(transport);
        let counts = shared.stats.lock().unwrap().counts.clone();
        let issued = std::mem::take(&mut *issued.lock().unwrap());
        Outcome {
            counts,
            inflight: shared.inflight.load(Ordering::SeqCst),
            issued,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_rate_keeps_inflight_sends_outstanding_round_robin() {
        let ack_after = Some(Duration::from_millis(10));
        let seen = drive(ack_after, &["--inflight", "3"], 2, Duration::from_secs(1)).await;
        assert_eq!(seen.issued.outstanding_max, 3);
        let round_robin = (0..2).cycle().take(seen.issued.slots.len());
        assert!(seen.issued.slots.iter().copied().eq(round_robin));
        // Three sends per 10 ms: batches at 1.01, 1.02, ..., 2.00 s are in the window.
        assert_eq!(seen.counts.sent, 300);
        assert_eq!(seen.counts.acked, 300);
        assert_eq!(seen.counts.send_slots_skipped, 0);
        assert_eq!(seen.counts.unacked_at_end, 0);
        assert_eq!(seen.inflight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn at_a_rate_skips_the_slots_that_find_inflight_outstanding() {
        // 1000 connections at 10,000 msg/s: one send per connection every 100 ms. With no
        // acknowledgement, the first send fills `--inflight 1` and every later slot is skipped.
        let seen = drive(None, &["--rate", "10000"], 1, Duration::from_secs(1)).await;
        assert_eq!(seen.issued.slots, vec![0]);
        assert_eq!(seen.counts.sent, 0, "the one send was in the warm-up");
        // Ticks at 1.1, 1.2, ..., 2.0 s are in the window; the warm-up's are not counted.
        assert_eq!(seen.counts.send_slots_skipped, 10);
        assert_eq!(seen.counts.unacked_at_end, 1);
        assert_eq!(seen.inflight, 0, "the unacknowledged send is released");
    }

    #[tokio::test(start_paused = true)]
    async fn at_a_rate_sends_one_per_period_when_acknowledged_in_time() {
        let ack_after = Some(Duration::from_millis(1));
        let seen = drive(ack_after, &["--rate", "10000"], 3, Duration::from_secs(1)).await;
        // Eleven sends in the warm-up (0, 0.1, ..., 1.0 s), ten in the window.
        assert_eq!(seen.counts.sent, 10);
        assert_eq!(seen.counts.acked, 10);
        assert_eq!(seen.counts.send_slots_skipped, 0);
        assert!(
            seen.issued
                .slots
                .iter()
                .copied()
                .eq((0..3).cycle().take(21))
        );
        assert_eq!(seen.issued.outstanding_max, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_chats_sends_nothing() {
        let ack_after = Some(Duration::from_millis(1));
        let seen = drive(ack_after, &[], 0, Duration::from_secs(1)).await;
        assert!(seen.issued.slots.is_empty());
        assert_eq!(seen.counts.sent, 0);
        assert_eq!((seen.counts.unacked_at_end, seen.inflight), (0, 0));
    }
}
