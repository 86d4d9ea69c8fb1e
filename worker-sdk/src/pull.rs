//! Pipelined pulls: a pull loop keeps a pull request open at the server for every free slot,
//! so a slot freed while earlier requests are still open is offered to the server at once
//! instead of after the open request ends.
//!
//! Each free slot is a semaphore permit. A pull request (an async-nats [`Batch`], one inbox
//! each, so its deliveries are told apart exactly) asks for as many messages as it holds
//! permits; a delivered run takes one of them into its task, and the rest go back when the
//! request ends (filled, expired or failed). At most `weight × slots` runs are ever held —
//! running or requested — per source, which is what spreads an app's runs over its instances
//! by weight.
//!
//! When no request is open, freed permits are requested at once; while one is open, they are
//! gathered until a quarter of the capacity is free (or the open requests end), so a busy
//! worker sends few, larger requests rather than one per finished run.
//!
//! [`Batch`]: async_nats::jetstream::consumer::pull::Batch

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use futures_util::stream::{self, BoxStream, SelectAll};
use futures_util::StreamExt;
use krest_schemas::names::{
    app_consumer, instance_consumer, work_instance_filter, work_queue_filter,
};
use krest_schemas::Backoff;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::attempt::{process, Shared};
use crate::error::{ConsumerKind, Error};

/// Deliveries after which the server stops redelivering a run (a backstop for workers that
/// crash on a message; `retryTimes` normally ends a run far earlier).
pub const MAX_DELIVER: i64 = 30;

/// Which consumer a pull loop reads.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// The app's shared consumer group.
    App,
    /// This instance's own consumer.
    Instance(&'a str),
}

/// The durable consumer for `source`, created if missing (an existing one keeps its settings,
/// ack wait included).
pub(crate) async fn consumer_for(
    stream: &jetstream::stream::Stream,
    source: Source<'_>,
    app: &str,
    ack_wait: Duration,
) -> Result<consumer::Consumer<consumer::pull::Config>, Error<ConsumerKind>> {
    use async_nats::jetstream::stream::ConsumerErrorKind;
    let (name, filter, description, inactive) = match source {
        Source::App => (
            app_consumer(app),
            work_queue_filter(app),
            format!("Krest work queue of app {app}"),
            Duration::ZERO,
        ),
        Source::Instance(instance) => (
            instance_consumer(app, instance),
            work_instance_filter(app, instance),
            format!("Krest runs addressed to {app}/{instance}"),
            // Removed by the server if the instance is gone for good (the leader normally
            // drains and deletes it first).
            Duration::from_secs(3600),
        ),
    };
    let config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        description: Some(description),
        filter_subject: filter.clone(),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait,
        max_deliver: MAX_DELIVER,
        max_ack_pending: 20_000,
        inactive_threshold: inactive,
        ..Default::default()
    };
    let create_failed = |e: async_nats::jetstream::stream::ConsumerError| {
        let kind = match e.kind() {
            ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => ConsumerKind::Unavailable,
            _ => ConsumerKind::Refused,
        };
        Error::new(kind, format!("cannot create consumer {name}: {e}"))
    };
    let existing = stream
        .get_or_create_consumer(&name, config.clone())
        .await
        .map_err(create_failed)?;
    let found = existing.cached_info().config.filter_subject.clone();
    if found == filter {
        return Ok(existing);
    }
    // A consumer of another protocol version (or someone else's) under our name: it would
    // never deliver our runs.
    tracing::warn!(consumer = %name, found = %found, expected = %filter, "replacing a consumer whose filter is not Krest's");
    stream.delete_consumer(&name).await.map_err(|e| {
        Error::new(
            ConsumerKind::Foreign,
            format!("cannot replace consumer {name} (its filter is {found}): {e}"),
        )
    })?;
    stream
        .get_or_create_consumer(&name, config)
        .await
        .map_err(create_failed)
}

/// How often to send progress acks for runs from `consumer`: a third of its ack wait as the
/// server reports it (an existing consumer keeps the ack wait it was created with, which may
/// not be this worker's setting).
pub(crate) fn progress_interval(consumer: &consumer::Consumer<consumer::pull::Config>) -> Duration {
    (consumer.cached_info().config.ack_wait / 3).max(Duration::from_millis(500))
}

/// What a pull loop works with.
pub(crate) struct PullContext<'a> {
    pub(crate) stream: &'a jetstream::stream::Stream,
    pub(crate) app: &'a str,
    pub(crate) ack_wait: Duration,
    /// How long a pull request stays open at the server.
    pub(crate) expiry: Duration,
    /// The source's intake: `capacity` permits, each a run requested or received and not yet
    /// running or held ([`Slots`]).
    pub(crate) permits: Arc<Semaphore>,
    /// The source's running handlers and held runs.
    pub(crate) slots: Slots,
    pub(crate) capacity: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) stop: &'a CancellationToken,
    pub(crate) hard_stop: &'a CancellationToken,
}

/// Runs a source may hold for their `notBefore` beyond its capacity, per unit of capacity,
/// whatever its rate: a worker taking runs dispatched a second ahead holds the next second's
/// runs while it runs this second's.
pub(crate) const HOLD_FACTOR: usize = 4;

/// At most this many runs held beyond a source's capacity, however fast it starts them.
pub(crate) const MAX_HELD: usize = 16_384;

/// At most this many bytes of run messages held beyond a source's capacity (a held run costs
/// memory, not a slot): messages may be as large as the server allows.
pub(crate) const MAX_HELD_BYTES: usize = 64 << 20;

/// A source's bounds besides its intake: at most `capacity` handlers running, and runs held
/// for their `notBefore` without an intake permit (a held run gives its intake permit back, so
/// the pull loop asks for more, and takes a running permit at its time) within a
/// [`HoldBudget`].
#[derive(Clone)]
pub(crate) struct Slots {
    /// Running handlers.
    pub(crate) running: Arc<Semaphore>,
    /// Runs held without an intake permit.
    pub(crate) holding: Arc<HoldBudget>,
}

impl Slots {
    /// The bounds of a source of `capacity`.
    pub(crate) fn new(capacity: usize) -> Slots {
        Slots {
            running: Arc::new(Semaphore::new(capacity)),
            holding: Arc::new(HoldBudget::new(capacity.saturating_mul(HOLD_FACTOR))),
        }
    }
}

/// How many runs a source holds beyond its intake: as many as it started in the last one to
/// two seconds (a second's burst of runs dispatched a second ahead is held whole, whatever
/// the slots), at least `floor` (`HOLD_FACTOR × capacity`), at most [`MAX_HELD`] runs and
/// [`MAX_HELD_BYTES`] of messages. A slow source (handlers longer than a second) starts at
/// most its capacity a second and stays at the floor.
pub(crate) struct HoldBudget {
    floor: usize,
    state: std::sync::Mutex<HoldState>,
}

struct HoldState {
    /// Runs held now, and their messages' bytes.
    held: usize,
    bytes: usize,
    /// Runs started in the current one-second window, which ends at `window_end`, and in the
    /// window before it (0 if none started then).
    started: usize,
    last: usize,
    window_end: Instant,
}

impl HoldState {
    fn roll(&mut self, now: Instant) {
        if now >= self.window_end {
            let second = Duration::from_secs(1);
            self.last = if now < self.window_end + second {
                self.started
            } else {
                0
            };
            self.started = 0;
            self.window_end = now + second;
        }
    }
}

impl HoldBudget {
    pub(crate) fn new(floor: usize) -> HoldBudget {
        HoldBudget {
            floor,
            state: std::sync::Mutex::new(HoldState {
                held: 0,
                bytes: 0,
                started: 0,
                last: 0,
                window_end: Instant::now(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HoldState> {
        // Never poisoned: nothing panics while holding it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn budget_of(&self, s: &HoldState) -> usize {
        (s.started + s.last).clamp(self.floor, MAX_HELD.max(self.floor))
    }

    /// Holds a run whose message has `bytes`, if the budget has room: `None` when it has not
    /// (the run is then held in its intake permit).
    pub(crate) fn try_hold(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        self.try_hold_at(bytes, Instant::now())
    }

    fn try_hold_at(self: &Arc<Self>, bytes: usize, now: Instant) -> Option<Held> {
        let mut s = self.state();
        s.roll(now);
        let room = s.held < self.budget_of(&s)
            && (s.held == 0 || s.bytes.saturating_add(bytes) <= MAX_HELD_BYTES);
        if !room {
            return None;
        }
        s.held += 1;
        s.bytes = s.bytes.saturating_add(bytes);
        Some(Held {
            budget: self.clone(),
            bytes,
        })
    }

    /// Counts a run started by the source.
    pub(crate) fn started(&self) {
        self.started_at(Instant::now());
    }

    fn started_at(&self, now: Instant) {
        let mut s = self.state();
        s.roll(now);
        s.started += 1;
    }
}

/// A run held within a [`HoldBudget`], until dropped.
pub(crate) struct Held {
    budget: Arc<HoldBudget>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut s = self.budget.state();
        s.held = s.held.saturating_sub(1);
        s.bytes = s.bytes.saturating_sub(self.bytes);
    }
}

/// What an open request yields: a delivery, or `None` once it has ended.
type Delivery = (u64, Option<Result<jetstream::Message, async_nats::Error>>);

/// The open pull requests and the permits each still holds.
struct Open {
    deliveries: SelectAll<BoxStream<'static, Delivery>>,
    held: HashMap<u64, Vec<OwnedSemaphorePermit>>,
    next_id: u64,
}

impl Open {
    fn new() -> Self {
        Open {
            deliveries: SelectAll::new(),
            held: HashMap::new(),
            next_id: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Tracks a request made with `permits`.
    fn push(&mut self, batch: consumer::pull::Batch, permits: Vec<OwnedSemaphorePermit>) {
        let id = self.next_id;
        self.next_id += 1;
        self.held.insert(id, permits);
        let ended = stream::once(async move { (id, None) });
        self.deliveries
            .push(batch.map(move |m| (id, Some(m))).chain(ended).boxed());
    }

    /// A permit of request `id` for one of its deliveries; `None` if it holds no more (the
    /// server delivered more than was asked: the message is handed back).
    fn take(&mut self, id: u64) -> Option<OwnedSemaphorePermit> {
        self.held.get_mut(&id).and_then(Vec::pop)
    }

    /// Request `id` ended: the permits it still holds are free again.
    fn end(&mut self, id: u64) {
        self.held.remove(&id);
    }
}

/// Pulls runs within the permits until `stop`; returns the tasks still running.
pub(crate) async fn pull_loop(
    mut consumer: consumer::Consumer<consumer::pull::Config>,
    source: Source<'_>,
    cx: PullContext<'_>,
) -> JoinSet<()> {
    let gather = (cx.capacity / 4).max(1);
    let mut tasks = JoinSet::new();
    let mut open = Open::new();
    let mut spare: Vec<OwnedSemaphorePermit> = Vec::new();
    // Consecutive failed requests, and when the next may be made.
    let mut failures = 0u32;
    let mut not_before = Instant::now();
    loop {
        let waiting = Instant::now() < not_before;
        if !spare.is_empty() && !waiting && (open.is_empty() || spare.len() >= gather) {
            let asked = consumer
                .batch()
                .max_messages(spare.len())
                .expires(cx.expiry)
                .messages()
                .await;
            match asked {
                Ok(batch) => open.push(batch, std::mem::take(&mut spare)),
                Err(e) => {
                    tracing::warn!(error = %e, "pulling runs failed; retrying");
                    consumer = failed(&mut failures, &mut not_before, consumer, source, &cx).await;
                }
            }
            continue;
        }
        tokio::select! {
            biased;
            _ = cx.stop.cancelled() => break,
            delivery = open.deliveries.next(), if !open.deliveries.is_empty() => match delivery {
                Some((id, Some(Ok(msg)))) => {
                    failures = 0;
                    match open.take(id) {
                        // Progress acks follow the ack wait of the consumer as it is now (it
                        // may have been recreated since).
                        Some(permit) => {
                            tasks.spawn(process(
                                cx.shared.clone(),
                                msg,
                                permit,
                                cx.slots.clone(),
                                progress_interval(&consumer),
                                cx.hard_stop.clone(),
                            ));
                        }
                        None => {
                            let _ = msg.ack_with(AckKind::Nak(None)).await;
                        }
                    }
                }
                // The request ends after an error (e.g. its consumer was deleted): back off
                // before the next, and recreate the consumer now and then.
                Some((_, Some(Err(e)))) => {
                    tracing::debug!(error = %e, "pull request ended with an error");
                    consumer = failed(&mut failures, &mut not_before, consumer, source, &cx).await;
                }
                Some((id, None)) => open.end(id),
                None => {}
            },
            p = cx.permits.clone().acquire_owned() => match p {
                Ok(p) => {
                    spare.push(p);
                    while let Ok(p) = cx.permits.clone().try_acquire_owned() {
                        spare.push(p);
                    }
                }
                Err(_) => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = tokio::time::sleep_until(not_before), if waiting => {}
        }
    }
    drop(spare);
    // Read the open requests to their end: the server may still deliver to them, and such
    // runs are handed back (nak) instead of being lost until their ack wait. A request ends by
    // itself when it expires; the extra bound covers a connection lost meanwhile.
    let end = Instant::now() + cx.expiry + Duration::from_secs(2);
    while let Ok(Some((id, delivery))) = tokio::time::timeout_at(end, open.deliveries.next()).await
    {
        match delivery {
            Some(Ok(msg)) => {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
            }
            Some(Err(_)) => {}
            None => open.end(id),
        }
    }
    while tasks.try_join_next().is_some() {}
    tasks
}

/// Counts a failed pull request: the next waits [`Backoff::RECONNECT`]'s delay, and every
/// third failure in a row the consumer is looked up or recreated (an instance's consumer may
/// have been removed by the leader).
async fn failed(
    failures: &mut u32,
    not_before: &mut Instant,
    consumer: consumer::Consumer<consumer::pull::Config>,
    source: Source<'_>,
    cx: &PullContext<'_>,
) -> consumer::Consumer<consumer::pull::Config> {
    *failures += 1;
    *not_before = Instant::now() + Backoff::RECONNECT.delay(*failures);
    if *failures % 3 == 0 {
        if let Ok(c) = consumer_for(cx.stream, source, cx.app, cx.ack_wait).await {
            return c;
        }
    }
    consumer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold_all(budget: &Arc<HoldBudget>, bytes: usize, now: Instant) -> Vec<Held> {
        std::iter::from_fn(|| budget.try_hold_at(bytes, now)).collect()
    }

    #[test]
    fn a_source_holds_its_floor_then_what_it_started_in_the_last_second_or_two() {
        let budget = Arc::new(HoldBudget::new(8));
        let t0 = Instant::now();
        let held = hold_all(&budget, 100, t0);
        assert_eq!(held.len(), 8, "the floor, before any start");
        drop(held);

        // A burst of 1,000 starts: the next second's burst is held whole.
        for _ in 0..1000 {
            budget.started_at(t0);
        }
        let t1 = t0 + Duration::from_millis(100);
        let held = hold_all(&budget, 100, t1);
        assert_eq!(held.len(), 1000);
        assert!(budget.try_hold_at(100, t1).is_none(), "full");
        drop(held);

        // A window later the burst still counts (the window before); two windows without a
        // start, and the budget is back to the floor.
        let t2 = t0 + Duration::from_millis(1500);
        assert_eq!(hold_all(&budget, 100, t2).len(), 1000);
        let t3 = t2 + Duration::from_millis(2500);
        assert_eq!(hold_all(&budget, 100, t3).len(), 8);
    }

    #[test]
    fn held_runs_are_bounded_by_count_and_bytes_and_freed_when_dropped() {
        let budget = Arc::new(HoldBudget::new(4));
        let now = Instant::now();
        for _ in 0..(MAX_HELD * 2) {
            budget.started_at(now);
        }
        assert_eq!(hold_all(&budget, 1, now).len(), MAX_HELD);

        // Large messages: as many as fit in MAX_HELD_BYTES, but always one.
        let big = MAX_HELD_BYTES / 3;
        let held = hold_all(&budget, big, now);
        assert_eq!(held.len(), 3);
        drop(held);
        let huge = hold_all(&budget, MAX_HELD_BYTES * 2, now);
        assert_eq!(huge.len(), 1, "one run is held whatever its size");
        drop(huge);

        let one = budget.try_hold_at(big, now);
        assert!(one.is_some(), "freed when dropped");
    }
}
