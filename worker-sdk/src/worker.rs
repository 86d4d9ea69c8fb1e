//! The worker runtime: connect, heartbeat, pull runs within capacity, execute handlers, report
//! results, retry through redelivery, shut down gracefully.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use chrono::Utc;
use futures_util::StreamExt;
use krest_schemas::deadletter::{parked_copy, Origin};
use krest_schemas::names::{
    app_consumer, cancel_subject, dlq_subject, instance_consumer, parked_work_id, retry_msg_id,
    server_list, work_instance_filter, work_queue_filter, work_router_subject, worker_key,
    CANCELS_BUCKET, WORKERS_BUCKET, WORK_STREAM,
};
use krest_schemas::{AttemptOutcome, Finished, JobType, RunEvent, RunMessage, Started, WorkerInfo};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::context::{truncate, JobContext, JobError, MAX_OUTPUT};
use crate::events::{spawn_publisher, EventSink};
use crate::options::{host_name, redact, Backoff, HandlerFn, WorkerBuilder};
use crate::Error;

/// Deliveries after which the server stops redelivering a run (a backstop for workers that
/// crash on a message; `retryTimes` normally ends a run far earlier).
pub const MAX_DELIVER: i64 = 30;

/// Bound on each step of the final clean-up (heartbeat removal, flushing events).
const CLEANUP_STEP: Duration = Duration::from_secs(3);

/// A configured worker. [`Worker::run`] it until a shutdown signal, or [`Worker::spawn`] it.
pub struct Worker {
    cfg: WorkerBuilder,
    instance: String,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("instance", &self.instance)
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// A worker running in the background, from [`Worker::spawn`].
#[derive(Debug)]
pub struct RunningWorker {
    instance: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl RunningWorker {
    /// The instance id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Graceful shutdown: stop pulling, let running handlers finish (up to the shutdown
    /// timeout), remove the heartbeat; returns the worker's result.
    pub async fn stop(self) -> Result<(), Error> {
        self.stop.cancel();
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(Error::Internal(format!("worker task failed: {e}"))),
        }
    }

    /// Abrupt stop, as if the process died: nothing is acknowledged or cleaned up; the server
    /// redelivers this worker's runs after their ack wait and its heartbeat expires.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Runs executing here that a cancellation can reach: run id → the shards being executed
/// (registration id, token) and the reason once cancelled.
#[derive(Default)]
struct Cancellable {
    next: std::sync::atomic::AtomicU64,
    runs: std::sync::Mutex<CancelMap>,
}

type CancelMap = std::collections::HashMap<String, (Vec<(u64, CancellationToken)>, Option<String>)>;

impl Cancellable {
    fn register(&self, run_id: &str) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        if let Ok(mut runs) = self.runs.lock() {
            runs.entry(run_id.to_string())
                .or_default()
                .0
                .push((id, token.clone()));
        }
        (id, token)
    }

    fn unregister(&self, run_id: &str, id: u64) {
        if let Ok(mut runs) = self.runs.lock() {
            if let Some(entry) = runs.get_mut(run_id) {
                entry.0.retain(|(i, _)| *i != id);
                if entry.0.is_empty() {
                    runs.remove(run_id);
                }
            }
        }
    }

    fn cancel(&self, run_id: &str, reason: &str) {
        if let Ok(mut runs) = self.runs.lock() {
            if let Some((tokens, why)) = runs.get_mut(run_id) {
                *why = Some(reason.to_string());
                for (_, t) in tokens.iter() {
                    t.cancel();
                }
            }
        }
    }

    fn reason(&self, run_id: &str) -> Option<String> {
        self.runs
            .lock()
            .ok()?
            .get(run_id)
            .and_then(|(_, why)| why.clone())
    }
}

struct Shared {
    js: jetstream::Context,
    cancels: jetstream::kv::Store,
    cancellable: Cancellable,
    app: String,
    instance: String,
    handlers: BTreeMap<String, HandlerFn>,
    backoff: Backoff,
    events: EventSink,
    in_flight: AtomicU32,
    progress_every: Duration,
    cancel_grace: Duration,
}

impl Worker {
    /// Starts configuring a worker of `app` (Krest-Job's `appName`).
    pub fn builder(app: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder::new(app)
    }

    pub(crate) fn new(cfg: WorkerBuilder, instance: String) -> Worker {
        Worker { cfg, instance }
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Runs in the background until [`RunningWorker::stop`] or [`RunningWorker::abort`].
    pub fn spawn(self) -> RunningWorker {
        let stop = CancellationToken::new();
        let instance = self.instance.clone();
        let token = stop.clone();
        let task = tokio::spawn(async move { self.run(token.cancelled_owned()).await });
        RunningWorker {
            instance,
            stop,
            task,
        }
    }

    /// Connects and works until `shutdown` completes, then shuts down gracefully: stops pulling,
    /// lets running handlers finish up to the shutdown timeout, cancels and naks the rest (so
    /// another instance picks them up at once) and removes its heartbeat.
    ///
    /// NATS being unreachable at start is not an error: the worker logs and keeps trying until
    /// `shutdown`.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let stop = CancellationToken::new();
        let runner = self.run_inner(stop.clone());
        tokio::pin!(runner);
        tokio::pin!(shutdown);
        tokio::select! {
            r = &mut runner => return r,
            _ = &mut shutdown => {
                tracing::info!(instance = %self.instance, "shutdown requested");
                stop.cancel();
            }
        }
        runner.await
    }

    async fn run_inner(&self, stop: CancellationToken) -> Result<(), Error> {
        let cfg = &self.cfg;
        let Some(client) = connect(&cfg.nats_url, &self.instance, &cfg.app, &stop).await? else {
            return Ok(());
        };
        let js = jetstream::new(client.clone());
        let Some(stream) = wait_for(&stop, "work stream", || async {
            js.get_stream(WORK_STREAM).await.map_err(|e| e.to_string())
        })
        .await
        else {
            return Ok(());
        };
        let Some(registry) = wait_for(&stop, "workers bucket", || async {
            js.get_key_value(WORKERS_BUCKET)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        else {
            return Ok(());
        };
        let Some(cancels) = wait_for(&stop, "cancellations bucket", || async {
            js.get_key_value(CANCELS_BUCKET)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        else {
            return Ok(());
        };
        let mut cancel_sub = match client.subscribe(cancel_subject(&cfg.app)).await {
            Ok(s) => s,
            Err(e) => {
                return Err(Error::Internal(format!(
                    "cannot subscribe to cancellations: {e}"
                )))
            }
        };
        let Some(consumer) = wait_for(&stop, "app consumer", || async {
            consumer_for(&stream, Source::App, &cfg.app, cfg.ack_wait).await
        })
        .await
        else {
            return Ok(());
        };
        let ack_wait = consumer.cached_info().config.ack_wait;
        let (events, publisher) = spawn_publisher(js.clone());
        let mut publisher = AbortOnDrop(Some(publisher));
        let shared = Arc::new(Shared {
            js: js.clone(),
            cancels,
            cancellable: Cancellable::default(),
            app: cfg.app.clone(),
            instance: self.instance.clone(),
            handlers: cfg.handlers.clone(),
            backoff: cfg.backoff,
            events: events.clone(),
            in_flight: AtomicU32::new(0),
            progress_every: (ack_wait / 3).max(Duration::from_millis(500)),
            cancel_grace: cfg.cancel_grace,
        });
        let capacity = cfg.weight.saturating_mul(cfg.slots) as usize;
        tracing::info!(
            app = %cfg.app, instance = %self.instance, capacity,
            handlers = ?cfg.handlers.keys().collect::<Vec<_>>(),
            "worker started"
        );

        // This instance's own consumer exists before its first heartbeat: the leader addresses
        // runs to instances it sees heartbeating, and treats one without a consumer as
        // unreachable.
        let Some(instance_consumer) = wait_for(&stop, "instance consumer", || async {
            consumer_for(
                &stream,
                Source::Instance(&self.instance),
                &cfg.app,
                cfg.ack_wait,
            )
            .await
        })
        .await
        else {
            return Ok(());
        };
        // Heartbeats until the end.
        let heartbeat_stop = CancellationToken::new();
        let mut heartbeat = AbortOnDrop(Some(tokio::spawn(heartbeat_loop(
            registry.clone(),
            shared.clone(),
            cfg.info_template(),
            cfg.heartbeat_interval,
            heartbeat_stop.clone(),
        ))));

        // Cancellations of runs executing here.
        let listener = shared.clone();
        let _cancel_listener = AbortOnDrop(Some(tokio::spawn(async move {
            while let Some(msg) = cancel_sub.next().await {
                match serde_json::from_slice::<krest_schemas::CancelRequest>(&msg.payload) {
                    Ok(req) => listener.cancellable.cancel(&req.run_id, &req.reason),
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed cancellation"),
                }
            }
        })));

        // Pull and execute until told to stop: from the app's shared consumer (the weighted
        // group) and from this instance's own consumer (runs the leader addressed to it). Each
        // source holds at most `weight × slots` runs.
        let hard_stop = CancellationToken::new();
        let pull = |consumer, source| {
            pull_loop(
                consumer,
                source,
                PullContext {
                    stream: &stream,
                    app: &cfg.app,
                    ack_wait: cfg.ack_wait,
                    expiry: cfg.pull_expiry,
                    permits: Arc::new(Semaphore::new(capacity)),
                    shared: shared.clone(),
                    stop: &stop,
                    hard_stop: &hard_stop,
                },
            )
        };
        let (mut app_tasks, mut instance_tasks) = tokio::join!(
            pull(consumer, Source::App),
            pull(instance_consumer, Source::Instance(&self.instance)),
        );

        // Graceful shutdown.
        let running = app_tasks.len() + instance_tasks.len();
        if running > 0 {
            tracing::info!(running, timeout = ?cfg.shutdown_timeout, "waiting for running handlers");
        }
        let drained = tokio::time::timeout(cfg.shutdown_timeout, async {
            while app_tasks.join_next().await.is_some() {}
            while instance_tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                running = app_tasks.len() + instance_tasks.len(),
                "shutdown timeout reached; cancelling handlers and handing their runs back"
            );
            hard_stop.cancel();
            while app_tasks.join_next().await.is_some() {}
            while instance_tasks.join_next().await.is_some() {}
        }
        heartbeat_stop.cancel();
        heartbeat.join().await;
        // Each clean-up step is bounded: a worker asked to stop must stop even when NATS is
        // gone (its heartbeat then expires by itself, and unacknowledged runs are redelivered).
        let key = worker_key(&cfg.app, &self.instance);
        match tokio::time::timeout(CLEANUP_STEP, registry.delete(&key)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not remove heartbeat"),
            Err(_) => tracing::warn!("could not remove heartbeat: NATS did not answer"),
        }
        events.close();
        if tokio::time::timeout(CLEANUP_STEP * 3, publisher.join())
            .await
            .is_err()
        {
            tracing::warn!("some run events could not be published before stopping");
        }
        let _ = tokio::time::timeout(CLEANUP_STEP, client.flush()).await;
        tracing::info!(instance = %self.instance, "worker stopped");
        Ok(())
    }
}

impl WorkerBuilder {
    fn info_template(&self) -> InfoTemplate {
        InfoTemplate {
            handlers: self.handlers.keys().cloned().collect(),
            weight: self.weight,
            slots: self.slots,
            version: self.version.clone(),
            host: host_name(),
            started_at: Utc::now(),
        }
    }
}

struct InfoTemplate {
    handlers: Vec<String>,
    weight: u32,
    slots: u32,
    version: String,
    host: String,
    started_at: chrono::DateTime<Utc>,
}

async fn heartbeat_loop(
    registry: jetstream::kv::Store,
    shared: Arc<Shared>,
    t: InfoTemplate,
    every: Duration,
    stop: CancellationToken,
) {
    let key = worker_key(&shared.app, &shared.instance);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let info = WorkerInfo {
            app_name: shared.app.clone(),
            instance: shared.instance.clone(),
            handlers: t.handlers.clone(),
            weight: t.weight,
            slots: t.slots,
            in_flight: shared.in_flight.load(Ordering::Relaxed),
            version: t.version.clone(),
            sdk: "rust".to_string(),
            host: t.host.clone(),
            started_at: t.started_at,
            heartbeat_at: Utc::now(),
        };
        match serde_json::to_vec(&info) {
            Ok(body) => {
                tokio::select! {
                    r = registry.put(&key, body.into()) => if let Err(e) = r {
                        tracing::warn!(error = %e, "heartbeat failed");
                    },
                    _ = stop.cancelled() => return,
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot serialize heartbeat"),
        }
    }
}

async fn connect(
    url: &str,
    instance: &str,
    app: &str,
    stop: &CancellationToken,
) -> Result<Option<async_nats::Client>, Error> {
    let mut failures = 0;
    loop {
        let opts = async_nats::ConnectOptions::new()
            .name(format!("krest-worker {app}/{instance}"))
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            });
        match tokio::select! {
            r = opts.connect(server_list(url)) => r,
            _ = stop.cancelled() => return Ok(None),
        } {
            Ok(c) => return Ok(Some(c)),
            Err(e) if e.kind() == async_nats::ConnectErrorKind::ServerParse => {
                return Err(Error::Config(format!(
                    "invalid NATS URL {}: {e}",
                    redact(url)
                )));
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(url = %redact(url), error = %krest_schemas::redact::text(&e.to_string()), "cannot connect to NATS; retrying");
                if !pause(stop, failures).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Sleeps with exponential backoff (0.5 s doubling to 10 s); false if `stop` fired meanwhile.
async fn pause(stop: &CancellationToken, failures: u32) -> bool {
    let d = Duration::from_millis(500u64 << failures.min(5)).min(Duration::from_secs(10));
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.cancelled() => false,
    }
}

/// Retries `f` until it succeeds or `stop` fires, logging what it waits for.
async fn wait_for<T, F, Fut>(stop: &CancellationToken, what: &str, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut failures = 0;
    loop {
        match f().await {
            Ok(v) => return Some(v),
            Err(e) => {
                failures += 1;
                if failures == 1 || failures % 10 == 0 {
                    tracing::warn!(
                        error = %e,
                        "waiting for the {what}: is a `krest scheduler` running against this NATS?"
                    );
                }
                if !pause(stop, failures).await {
                    return None;
                }
            }
        }
    }
}

/// Which consumer a pull loop reads.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The app's shared consumer group.
    App,
    /// This instance's own consumer.
    Instance(&'a str),
}

/// The durable consumer for `source`, created if missing (an existing one keeps its settings).
async fn consumer_for(
    stream: &jetstream::stream::Stream,
    source: Source<'_>,
    app: &str,
    ack_wait: Duration,
) -> Result<consumer::Consumer<consumer::pull::Config>, String> {
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
    let existing = stream
        .get_or_create_consumer(&name, config.clone())
        .await
        .map_err(|e| format!("cannot create consumer {name}: {e}"))?;
    let found = existing.cached_info().config.filter_subject.clone();
    if found == filter {
        return Ok(existing);
    }
    // A consumer of another protocol version (or someone else's) under our name: it would
    // never deliver our runs.
    tracing::warn!(consumer = %name, found = %found, expected = %filter, "replacing a consumer whose filter is not Krest's");
    stream
        .delete_consumer(&name)
        .await
        .map_err(|e| format!("cannot replace consumer {name}: {e}"))?;
    stream
        .get_or_create_consumer(&name, config)
        .await
        .map_err(|e| format!("cannot create consumer {name}: {e}"))
}

/// What a pull loop works with.
struct PullContext<'a> {
    stream: &'a jetstream::stream::Stream,
    app: &'a str,
    ack_wait: Duration,
    expiry: Duration,
    permits: Arc<Semaphore>,
    shared: Arc<Shared>,
    stop: &'a CancellationToken,
    hard_stop: &'a CancellationToken,
}

/// Pulls runs within the permits until `stop`; returns the tasks still running.
async fn pull_loop(
    mut consumer: consumer::Consumer<consumer::pull::Config>,
    source: Source<'_>,
    cx: PullContext<'_>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let mut failures = 0u32;
    while !cx.stop.is_cancelled() {
        let first = tokio::select! {
            p = cx.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = cx.stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let mut held: Vec<OwnedSemaphorePermit> = vec![first];
        while let Ok(p) = cx.permits.clone().try_acquire_owned() {
            held.push(p);
        }
        let batch = consumer
            .batch()
            .max_messages(held.len())
            .expires(cx.expiry)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => {
                failures = 0;
                b
            }
            Err(e) => {
                failures += 1;
                drop(held);
                tracing::warn!(error = %e, "pulling runs failed; retrying");
                pause(cx.stop, failures).await;
                // The consumer may have been removed (an instance's, by the leader): recreate.
                if failures % 3 == 0 {
                    if let Ok(c) = consumer_for(cx.stream, source, cx.app, cx.ack_wait).await {
                        consumer = c;
                    }
                }
                continue;
            }
        };
        // Read the batch to its end even when stopping: the server may still deliver to
        // this pull request, and such runs are handed back (nak) instead of being lost
        // until their ack wait. The batch ends by itself when the pull request expires;
        // the extra bound covers a connection lost meanwhile.
        let batch_end = tokio::time::Instant::now() + cx.expiry + Duration::from_secs(2);
        while let Ok(Some(item)) = tokio::time::timeout_at(batch_end, batch.next()).await {
            match item {
                Ok(msg) => {
                    if cx.stop.is_cancelled() {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        continue;
                    }
                    let Some(permit) = held.pop() else {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        continue;
                    };
                    tasks.spawn(process(
                        cx.shared.clone(),
                        msg,
                        permit,
                        cx.hard_stop.clone(),
                    ));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "pull batch ended with an error");
                    break;
                }
            }
        }
        drop(held);
        while tasks.try_join_next().is_some() {}
    }
    tasks
}

/// A background task that dies with the worker, even when the worker itself is aborted.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    async fn join(&mut self) {
        if let Some(task) = self.0.take() {
            let _ = task.await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Parks a message this worker cannot read on the dead-letter stream (`krest.dlq.work`): a copy
/// bounded to fit the server's max payload with its headers.
async fn park(
    js: &jetstream::Context,
    seq: u64,
    reason: &str,
    msg: &jetstream::Message,
) -> Result<(), String> {
    let id = parked_work_id(seq);
    let copy = parked_copy(
        msg.payload.len(),
        reason,
        &Origin {
            subject: &msg.subject,
            seq: Some(seq),
        },
        &id,
        js.client().server_info().max_payload,
    );
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in &copy.headers {
        headers.insert(*name, value.as_str());
    }
    js.send_publish(
        dlq_subject("work"),
        async_nats::jetstream::message::PublishMessage::build()
            .payload(msg.payload.slice(..copy.keep))
            .headers(headers)
            .message_id(id),
    )
    .await
    .map_err(|e| e.to_string())?
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// How an attempt ended, before it is reported.
enum Ending {
    Done(Result<crate::Output, JobError>),
    /// The worker shut down before the handler finished.
    Interrupted,
    /// The handler ran past the job's timeout and was cancelled.
    TimedOut,
    /// The run was cancelled (the reason, once known).
    Cancelled(String),
}

async fn process(
    shared: Arc<Shared>,
    msg: jetstream::Message,
    _permit: OwnedSemaphorePermit,
    hard_stop: CancellationToken,
) {
    shared.in_flight.fetch_add(1, Ordering::Relaxed);
    let _guard = InFlight(&shared.in_flight);
    let delivered = msg
        .info()
        .map(|i| u32::try_from(i.delivered.max(1)).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let run: RunMessage = match serde_json::from_slice(&msg.payload) {
        Ok(run) => run,
        Err(e) => {
            // serde quotes the offending value: shortened, and URLs redacted.
            let e =
                krest_schemas::redact::text(&krest_schemas::text::shorten_quoted(&e.to_string()))
                    .into_owned();
            tracing::error!(subject = %msg.subject, error = %e, "malformed run message; parking it");
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
            let reason = format!("malformed run message: {e}");
            match park(&shared.js, seq, &reason, &msg).await {
                Ok(()) => {
                    let _ = msg.double_ack_with(AckKind::Term).await;
                }
                // Not parked: leave it for redelivery (and, at worst, the server's max
                // deliveries, after which the scheduler parks it).
                Err(e) => {
                    tracing::warn!(error = %e, "could not park the malformed run message");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(10))))
                        .await;
                }
            }
            return;
        }
    };
    // Retries and re-routes are new messages: earlier attempts are carried in the offset.
    let attempt = run.attempt_offset.saturating_add(delivered);
    let started_at = Utc::now();
    shared.events.send(RunEvent::Started(Started {
        run: run.run.clone(),
        shard: run.shard_index(),
        shard_total: run.shard_total(),
        attempt,
        worker: shared.instance.clone(),
        at: started_at,
        scheduled_at: Some(run.scheduled_at),
    }));
    let cancel = CancellationToken::new();
    let ctx = JobContext::new(
        run.clone(),
        attempt,
        shared.instance.clone(),
        cancel.clone(),
        shared.events.clone(),
    );
    let clock = std::time::Instant::now();
    // Register before checking the marker, so a cancellation arriving in between is not lost.
    let (registration, cancel_request) = shared.cancellable.register(&run.run.run_id);
    let marked = match shared.cancels.get(&run.run.run_id).await {
        Ok(Some(v)) => Some(
            serde_json::from_slice::<krest_schemas::CancelRequest>(&v)
                .map(|c| c.reason)
                .unwrap_or_else(|_| "cancelled".to_string()),
        ),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(error = %e, "cannot check for a cancellation; running the run");
            None
        }
    };
    let ending = match (marked, shared.handlers.get(&run.path)) {
        (Some(reason), _) => Ending::Cancelled(reason),
        (None, None) => Ending::Done(Err(JobError::new(format!(
            "no handler `{}` on worker {}/{} (it has: {})",
            run.path,
            shared.app,
            shared.instance,
            shared
                .handlers
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )))),
        (None, Some(handler)) => {
            execute(
                handler(ctx.clone()),
                &msg,
                shared.progress_every,
                Stops {
                    timeout: run.timeout_secs.map(Duration::from_secs),
                    hard_stop: &hard_stop,
                    cancel_request: &cancel_request,
                    cancel: &cancel,
                    grace: shared.cancel_grace,
                },
            )
            .await
        }
    };
    let ending = match ending {
        Ending::Cancelled(why) if why.is_empty() => Ending::Cancelled(
            shared
                .cancellable
                .reason(&run.run.run_id)
                .unwrap_or_else(|| "cancelled".to_string()),
        ),
        other => other,
    };
    shared.cancellable.unregister(&run.run.run_id, registration);
    drop(ctx);
    let duration_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    let max_attempts = run.retry_times.saturating_add(1);
    // The job's backoff wins over the worker's default.
    let backoff = run.retry_backoff.map_or(shared.backoff, |b| Backoff {
        initial: Duration::from_millis(b.initial_ms),
        factor: b.factor,
        max: Duration::from_millis(b.max_ms),
    });
    let (outcome, will_retry, output, error, ack) = match ending {
        Ending::Done(Ok(out)) => (
            AttemptOutcome::Succeeded,
            false,
            out.0.map(|s| truncate(s, MAX_OUTPUT)),
            None,
            AckKind::Ack,
        ),
        Ending::Done(Err(e)) => {
            let retry = e.is_retryable() && attempt < max_attempts;
            let ack = if retry {
                AckKind::Nak(Some(backoff.delay(attempt)))
            } else {
                AckKind::Term
            };
            (
                AttemptOutcome::Failed,
                retry,
                None,
                Some(truncate(e.message().to_string(), MAX_OUTPUT)),
                ack,
            )
        }
        Ending::TimedOut => {
            let retry = attempt < max_attempts;
            let ack = if retry {
                AckKind::Nak(Some(backoff.delay(attempt)))
            } else {
                AckKind::Term
            };
            (
                AttemptOutcome::TimedOut,
                retry,
                None,
                Some(format!(
                    "timed out after {} s (timeoutSecs); the handler was cancelled",
                    run.timeout_secs.unwrap_or_default()
                )),
                ack,
            )
        }
        Ending::Cancelled(reason) => (
            AttemptOutcome::Cancelled,
            false,
            None,
            Some(format!("cancelled: {reason}")),
            AckKind::Term,
        ),
        Ending::Interrupted => (
            AttemptOutcome::Failed,
            true,
            None,
            Some(format!(
                "worker {} shut down before the handler finished; handed back for another attempt",
                shared.instance
            )),
            AckKind::Nak(None),
        ),
    };
    let retry_in_ms = match ack {
        AckKind::Nak(Some(d)) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        AckKind::Nak(None) => Some(0),
        _ => None,
    };
    // Stored texts never carry a URL's credentials (an HTTP client's error names the URL).
    let scrub = |s: String| match krest_schemas::redact::text(&s) {
        std::borrow::Cow::Owned(r) => r,
        std::borrow::Cow::Borrowed(_) => s,
    };
    let (output, error) = (output.map(scrub), error.map(scrub));
    let finished = RunEvent::Finished(Finished {
        run: run.run.clone(),
        shard: run.shard_index(),
        shard_total: run.shard_total(),
        attempt,
        worker: shared.instance.clone(),
        at: Utc::now(),
        outcome,
        will_retry,
        retry_in_ms,
        output,
        error,
        duration_ms,
    });
    match shared.events.send_confirmed(finished).await {
        Ok(()) => {
            // A run addressed to this instance is retried through the leader's router, which
            // prefers another instance (BROADCAST shards stay: this instance is their point).
            let ack = match ack {
                AckKind::Nak(delay)
                    if run.target.is_some() && run.job_type != JobType::Broadcast =>
                {
                    match reroute(&shared, &run, attempt, delay.unwrap_or_default()).await {
                        Ok(()) => AckKind::Term,
                        Err(e) => {
                            tracing::warn!(run = %run.run.run_id, error = %e, "could not hand the retry to the router; retrying here");
                            AckKind::Nak(delay)
                        }
                    }
                }
                other => other,
            };
            let acked = match ack {
                AckKind::Ack | AckKind::Term => msg.double_ack_with(ack).await,
                other => msg.ack_with(other).await,
            };
            if let Err(e) = acked {
                tracing::warn!(run = %run.run.run_id, error = %e, "ack failed; the run may be redelivered");
            }
        }
        Err(e) => tracing::error!(
            run = %run.run.run_id, error = %e,
            "could not store the attempt's result; leaving the run unacknowledged so it is redelivered"
        ),
    }
}

/// Hands a retry of an instance-addressed run to the leader's router: due after `delay`,
/// avoiding this instance.
async fn reroute(
    shared: &Shared,
    run: &RunMessage,
    attempt: u32,
    delay: Duration,
) -> Result<(), String> {
    let mut next = run.clone();
    next.attempt_offset = attempt;
    next.target = None;
    next.retry_at = Some(Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default());
    next.avoid = vec![shared.instance.clone()];
    let body = serde_json::to_vec(&next).map_err(|e| e.to_string())?;
    shared
        .js
        .send_publish(
            work_router_subject(&run.run.app_name, &run.run.job_group, &run.run.job_name),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(body.into())
                .message_id(retry_msg_id(&run.run.run_id, run.shard_index(), attempt)),
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// What may stop a handler early, and how long it then has to return.
struct Stops<'a> {
    /// The job's timeout.
    timeout: Option<Duration>,
    /// The worker's shutdown deadline passed.
    hard_stop: &'a CancellationToken,
    /// The run was cancelled.
    cancel_request: &'a CancellationToken,
    /// The handler's `ctx.cancelled()`.
    cancel: &'a CancellationToken,
    /// Time a cancelled handler gets before it is aborted.
    grace: Duration,
}

/// Runs the handler in its own task (so a panic is a failure, not a crash), sending progress
/// acks while it runs and stopping it at the job's timeout, on cancellation, or when the
/// worker's shutdown deadline passes.
async fn execute(
    fut: crate::options::HandlerFuture,
    msg: &jetstream::Message,
    progress_every: Duration,
    stops: Stops<'_>,
) -> Ending {
    let Stops {
        timeout,
        hard_stop,
        cancel_request,
        cancel,
        grace,
    } = stops;
    let mut handle = tokio::spawn(fut);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    // Why the handler was asked to stop, and until when it may take to return.
    let mut stopping: Option<(Ending, tokio::time::Instant)> = None;
    loop {
        let grace_sleep = async {
            match &stopping {
                Some((_, until)) => tokio::time::sleep_until(*until).await,
                None => std::future::pending().await,
            }
        };
        let deadline_sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            joined = &mut handle => {
                match stopping {
                    Some((Ending::TimedOut, _)) => return Ending::TimedOut,
                    Some((Ending::Cancelled(why), _)) => return Ending::Cancelled(why),
                    _ => {}
                }
                return Ending::Done(match joined {
                    Ok(r) => r,
                    Err(e) if e.is_panic() => Err(JobError::new(format!(
                        "handler panicked: {}",
                        panic_message(e.into_panic())
                    ))),
                    Err(_) => Err(JobError::new("handler task was cancelled")),
                });
            }
            _ = tick.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "progress ack failed");
                }
            }
            _ = deadline_sleep, if stopping.is_none() => {
                cancel.cancel();
                stopping = Some((Ending::TimedOut, tokio::time::Instant::now() + grace));
            }
            _ = cancel_request.cancelled(), if stopping.is_none() => {
                cancel.cancel();
                stopping = Some((Ending::Cancelled(String::new()), tokio::time::Instant::now() + grace));
            }
            _ = hard_stop.cancelled(), if stopping.is_none() => {
                cancel.cancel();
                stopping = Some((Ending::Interrupted, tokio::time::Instant::now() + grace));
            }
            _ = grace_sleep => {
                handle.abort();
                return stopping.map_or(Ending::Interrupted, |(why, _)| why);
            }
        }
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
