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

/// Runs held for their `notBefore` beyond a source's capacity, per unit of capacity: a worker
/// taking runs dispatched a second ahead holds the next second's runs while it runs this
/// second's.
pub(crate) const HOLD_FACTOR: usize = 4;

/// A source's bounds besides its intake: at most `capacity` handlers running, and at most
/// `HOLD_FACTOR × capacity` runs held for their `notBefore` without an intake permit (a held
/// run gives its intake permit back, so the pull loop asks for more, and takes a running
/// permit at its time).
#[derive(Clone)]
pub(crate) struct Slots {
    /// Running handlers.
    pub(crate) running: Arc<Semaphore>,
    /// Runs held without an intake permit.
    pub(crate) holding: Arc<Semaphore>,
}

impl Slots {
    /// The bounds of a source of `capacity`.
    pub(crate) fn new(capacity: usize) -> Slots {
        Slots {
            running: Arc::new(Semaphore::new(capacity)),
            holding: Arc::new(Semaphore::new(capacity.saturating_mul(HOLD_FACTOR))),
        }
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
