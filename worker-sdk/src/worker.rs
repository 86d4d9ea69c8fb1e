//! The worker runtime: connect, wait for the streams and buckets, heartbeat, pull runs within
//! capacity (each handled by [`crate::attempt::process`]), listen for cancellations, shut down
//! gracefully.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use futures_util::StreamExt;
use krest_schemas::names::{
    cancel_subject, worker_key, CANCELS_BUCKET, EVENTS_STREAM, WORKERS_BUCKET, WORK_STREAM,
};
use krest_schemas::{Backoff, WorkerInfo};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::attempt::{Cancellable, Shared};
use crate::error::{Error, ErrorKind, WaitKind};
use crate::events::spawn_publisher;
use crate::nats::{ConnectStyle, NatsConfig};
use crate::options::{host_name, Config, WorkerBuilder};
use crate::pull::{consumer_for, pull_loop, PullContext, Source};

/// Bound on each step of the final clean-up (heartbeat removal, flushing events).
const CLEANUP_STEP: Duration = Duration::from_secs(3);

/// A configured worker. [`Worker::run`] it until a shutdown signal, or [`Worker::spawn`] it.
pub struct Worker {
    cfg: Config,
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

    /// Graceful shutdown as in [`Worker::run`]; returns the worker's result ([`ErrorKind::Task`]
    /// if its task panicked).
    pub async fn stop(self) -> Result<(), Error> {
        self.stop.cancel();
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(Error::new(
                ErrorKind::Task,
                format!("worker failure: worker task failed: {e}"),
            )),
        }
    }

    /// Abrupt stop, as if the process died: nothing is acknowledged or cleaned up; the server
    /// redelivers this worker's runs after their ack wait and its heartbeat expires.
    pub fn abort(self) {
        self.task.abort();
    }
}

impl WorkerBuilder {
    /// Checks the configuration and makes the worker. Every error has kind
    /// [`ErrorKind::Config`].
    pub fn build(self) -> Result<Worker, Error> {
        let (cfg, instance) = self.checked()?;
        Ok(Worker { cfg, instance })
    }
}

impl Worker {
    /// Starts configuring a worker of `app` (Krest-Job's `appName`).
    pub fn builder(app: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder::new(app)
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

    /// Connects and works until `shutdown` completes, then shuts down gracefully: stops pulling
    /// (runs still arriving on the open pull request are handed back unexecuted: `-NAK`), keeps
    /// heartbeating while running handlers finish up to the shutdown timeout, cancels the rest
    /// and hands them back for another attempt at once (reporting the attempt FAILED with
    /// `willRetry` first; runs addressed to this instance go to the leader's router), then
    /// removes its heartbeat.
    ///
    /// NATS being unreachable, or the streams and buckets a scheduler node creates not existing
    /// yet, is not an error at start: the worker logs what it waits for and keeps trying until
    /// `shutdown`. Errors: [`ErrorKind::Config`] for an unusable NATS URL, [`ErrorKind::Nats`]
    /// when the cancellation subscription is refused.
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
        let Some(client) = connect(&cfg.nats, &self.instance, &cfg.app, &stop).await? else {
            return Ok(());
        };
        let js = jetstream::new(client.clone());
        // What a scheduler node creates at start: until then there is nothing to do.
        let Some(stream) = wait_for(&stop, &format!("stream {WORK_STREAM}"), || {
            find_stream(&js, WORK_STREAM)
        })
        .await
        else {
            return Ok(());
        };
        if wait_for(&stop, &format!("stream {EVENTS_STREAM}"), || {
            find_stream(&js, EVENTS_STREAM)
        })
        .await
        .is_none()
        {
            return Ok(());
        }
        let Some(registry) = wait_for(&stop, &format!("bucket {WORKERS_BUCKET}"), || {
            find_bucket(&js, WORKERS_BUCKET)
        })
        .await
        else {
            return Ok(());
        };
        let Some(cancels) = wait_for(&stop, &format!("bucket {CANCELS_BUCKET}"), || {
            find_bucket(&js, CANCELS_BUCKET)
        })
        .await
        else {
            return Ok(());
        };
        let mut cancel_sub = match client.subscribe(cancel_subject(&cfg.app)).await {
            Ok(s) => s,
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Nats,
                    format!("worker failure: cannot subscribe to cancellations: {e}"),
                ))
            }
        };
        let Some(consumer) = wait_for(&stop, "the app's consumer", || {
            consumer_for(&stream, Source::App, &cfg.app, cfg.ack_wait)
        })
        .await
        else {
            return Ok(());
        };
        let (events, publisher) = spawn_publisher(js.clone());
        let mut publisher = AbortOnDrop(Some(publisher));
        let markers = Arc::new(crate::markers::Markers::default());
        let _mirror = AbortOnDrop(Some(tokio::spawn(crate::markers::mirror(
            js.clone(),
            cancels.clone(),
            markers.clone(),
            stop.child_token(),
        ))));
        let shared = Arc::new(Shared {
            js: js.clone(),
            cancels,
            cancellable: Cancellable::default(),
            markers,
            app: cfg.app.clone(),
            instance: self.instance.clone(),
            handlers: cfg.handlers.clone(),
            backoff: cfg.backoff,
            events: events.clone(),
            in_flight: AtomicU32::new(0),
            cancel_grace: cfg.cancel_grace,
            report_start_after: cfg.report_start_after,
            due: Default::default(),
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
        let Some(instance_consumer) = wait_for(&stop, "this instance's consumer", || {
            consumer_for(
                &stream,
                Source::Instance(&self.instance),
                &cfg.app,
                cfg.ack_wait,
            )
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
                    slots: crate::pull::Slots::new(capacity),
                    capacity,
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

impl Config {
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
            capabilities: vec![krest_schemas::messages::CAPABILITY_NOT_BEFORE.to_string()],
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

/// Connects with the worker's NATS settings (named `krest-worker <app>/<instance>`, replies
/// under `_INBOX_<app>` unless set), waiting out an unreachable server; a refused login, a TLS
/// failure or unusable settings end the worker with [`ErrorKind::Config`].
async fn connect(
    nats: &NatsConfig,
    instance: &str,
    app: &str,
    stop: &CancellationToken,
) -> Result<Option<async_nats::Client>, Error> {
    let mut nats = nats.clone().name(format!("krest-worker {app}/{instance}"));
    if nats.inbox_prefix.is_none() {
        nats.inbox_prefix = Some(format!("_INBOX_{app}"));
    }
    let mut failures = 0;
    loop {
        match tokio::select! {
            r = nats.connect(ConnectStyle::Service) => r,
            _ = stop.cancelled() => return Ok(None),
        } {
            Ok(c) => return Ok(Some(c)),
            Err(e) if !e.is_retryable() => {
                return Err(Error::new(ErrorKind::Config, e.to_string()))
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures % 10 == 0 {
                    tracing::warn!(error = %e, failures, "cannot connect to NATS; retrying");
                }
                if !pause(stop, Backoff::RECONNECT, failures).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Sleeps `backoff`'s delay after `failures` consecutive failures; false if `stop` fired
/// meanwhile.
async fn pause(stop: &CancellationToken, backoff: Backoff, failures: u32) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(backoff.delay(failures)) => true,
        _ = stop.cancelled() => false,
    }
}

/// Retries `f` until it succeeds or `stop` fires (`None`), waiting [`Backoff::RECONNECT`]
/// between tries. Logs a warning `waiting for <what>` with the error at the first failure and
/// every tenth, and when it recovers.
async fn wait_for<T, K, F, Fut>(stop: &CancellationToken, what: &str, mut f: F) -> Option<T>
where
    K: std::fmt::Debug + Copy,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error<K>>>,
{
    let mut failures = 0u32;
    loop {
        let tried = tokio::select! {
            r = f() => r,
            _ = stop.cancelled() => return None,
        };
        match tried {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(failures, "{what} is ready");
                }
                return Some(v);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures % 10 == 0 {
                    tracing::warn!(error = %e, kind = ?e.kind(), failures, "waiting for {what}");
                }
                if !pause(stop, Backoff::RECONNECT, failures).await {
                    return None;
                }
            }
        }
    }
}

/// The stream `name`, if it exists.
async fn find_stream(
    js: &jetstream::Context,
    name: &str,
) -> Result<jetstream::stream::Stream, Error<WaitKind>> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    js.get_stream(name).await.map_err(|e| match e.kind() {
        GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            Error::new(
                WaitKind::NotFound,
                format!(
                    "stream {name} does not exist yet: is a `krest scheduler` running against this NATS?"
                ),
            )
        }
        _ => Error::new(
            WaitKind::Unavailable,
            format!("cannot look up stream {name} ({e}): is JetStream enabled on this NATS server?"),
        ),
    })
}

/// The KV bucket `name`, if it exists.
async fn find_bucket(
    js: &jetstream::Context,
    name: &str,
) -> Result<jetstream::kv::Store, Error<WaitKind>> {
    find_stream(js, &format!("KV_{name}"))
        .await
        .map_err(|e| match e.kind() {
            WaitKind::NotFound => Error::new(
                WaitKind::NotFound,
                format!(
                    "bucket {name} does not exist yet: is a `krest scheduler` running against this NATS?"
                ),
            ),
            WaitKind::Unavailable => e,
        })?;
    js.get_key_value(name).await.map_err(|e| {
        Error::new(
            WaitKind::Unavailable,
            format!("cannot open bucket {name}: {e}"),
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ConsumerKind;
    use crate::pull::progress_interval;
    use async_nats::jetstream::{consumer, stream};
    use krest_schemas::names::{app_consumer, work_queue_filter};
    use krest_test_support::NatsServer;

    async fn jetstream(server: &NatsServer) -> jetstream::Context {
        jetstream::new(async_nats::connect(server.url()).await.unwrap())
    }

    async fn work_stream(js: &jetstream::Context) -> stream::Stream {
        js.create_stream(stream::Config {
            name: WORK_STREAM.to_string(),
            subjects: vec!["krest.work.>".to_string()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn missing_streams_and_buckets_are_told_from_an_unavailable_jetstream() {
        let server = NatsServer::start();
        let js = jetstream(&server).await;
        let e = find_stream(&js, WORK_STREAM).await.err().unwrap();
        assert_eq!(e.kind(), WaitKind::NotFound, "{e}");
        let e = find_bucket(&js, WORKERS_BUCKET).await.err().unwrap();
        assert_eq!(e.kind(), WaitKind::NotFound, "{e}");
        work_stream(&js).await;
        assert!(find_stream(&js, WORK_STREAM).await.is_ok());

        let no_jetstream = NatsServer::start_with_args(&["-js=false"]);
        let js = jetstream(&no_jetstream).await;
        let e = find_stream(&js, WORK_STREAM).await.err().unwrap();
        assert_eq!(e.kind(), WaitKind::Unavailable, "{e}");
    }

    #[tokio::test]
    async fn consumers_are_created_replaced_or_refused() {
        let server = NatsServer::start();
        let js = jetstream(&server).await;
        let stream = work_stream(&js).await;
        let wait = Duration::from_secs(7);

        // Someone else's consumer under our name (another filter) is replaced.
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(app_consumer("app")),
                filter_subject: "krest.work.app.elsewhere".to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
        let c = consumer_for(&stream, Source::App, "app", wait)
            .await
            .unwrap();
        assert_eq!(
            c.cached_info().config.filter_subject,
            work_queue_filter("app")
        );
        assert_eq!(progress_interval(&c), wait / 3);

        // An existing consumer keeps its ack wait: progress follows the consumer, not us.
        let c = consumer_for(&stream, Source::App, "app", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(c.cached_info().config.ack_wait, wait);
        assert_eq!(progress_interval(&c), wait / 3);

        // A foreign consumer whose filter overlaps ours on the work-queue stream: refused.
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some("intruder".to_string()),
                filter_subject: "krest.work.other.g.j.q".to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
        let e = consumer_for(&stream, Source::App, "other", wait)
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ConsumerKind::Refused, "{e}");
    }
}
