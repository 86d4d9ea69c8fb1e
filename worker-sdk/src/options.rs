//! Building a worker: [`WorkerBuilder`] collects the app name, handlers and tuning, and checks
//! them in [`WorkerBuilder::build`].

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use krest_schemas::names::{is_token, sanitize_token};

use crate::context::{JobContext, JobError, Output};
use crate::worker::Worker;
use crate::Error;

pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Output, JobError>> + Send>>;
pub(crate) type HandlerFn = Arc<dyn Fn(JobContext) -> HandlerFuture + Send + Sync>;

/// Delay before retrying a failed attempt (shared with the scheduler: see
/// [`krest_schemas::backoff`]).
pub use krest_schemas::Backoff;

/// Collects a worker's configuration. Start with [`Worker::builder`].
///
/// ```no_run
/// # async fn demo() -> Result<(), krest_worker::Error> {
/// use krest_worker::{JobContext, Worker};
///
/// let worker = Worker::builder("billing")
///     .nats_url("nats://127.0.0.1:4222")
///     .weight(2)
///     .handler("invoices/run", |ctx: JobContext| async move {
///         ctx.log(format!("invoicing {}", ctx.args()));
///         Ok("42 invoices")
///     })
///     .build()?;
/// worker.run(async { tokio::signal::ctrl_c().await.ok(); }).await
/// # }
/// ```
pub struct WorkerBuilder {
    pub(crate) app: String,
    pub(crate) nats_url: String,
    pub(crate) instance: Option<String>,
    pub(crate) weight: u32,
    pub(crate) slots: u32,
    pub(crate) handlers: BTreeMap<String, HandlerFn>,
    pub(crate) backoff: Backoff,
    pub(crate) ack_wait: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) cancel_grace: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) pull_expiry: Duration,
    pub(crate) version: String,
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("app", &self.app)
            .field("nats_url", &redact(&self.nats_url))
            .field("instance", &self.instance)
            .field("weight", &self.weight)
            .field("slots", &self.slots)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field("backoff", &self.backoff)
            .field("ack_wait", &self.ack_wait)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

/// Hides credentials in NATS URLs (`nats://user:pass@host` → `nats://<redacted>@host`), for
/// every URL of a comma-separated list.
pub(crate) fn redact(urls: &str) -> String {
    krest_schemas::redact::urls(urls)
}

impl WorkerBuilder {
    pub(crate) fn new(app: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            app: app.into(),
            nats_url: "nats://127.0.0.1:4222".to_string(),
            instance: None,
            weight: 1,
            slots: 4,
            handlers: BTreeMap::new(),
            backoff: Backoff::default(),
            ack_wait: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(3),
            pull_expiry: Duration::from_secs(2),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// NATS server URL(s), comma-separated. Default `nats://127.0.0.1:4222`.
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.nats_url = url.into();
        self
    }

    /// Instance id (letters, digits, `-`, `_`). Default: host name, process id and a random
    /// suffix.
    pub fn instance(mut self, id: impl Into<String>) -> Self {
        self.instance = Some(id.into());
        self
    }

    /// Relative capacity. The instance holds at most `weight × slots` runs at once, so under
    /// load it takes `weight` times the share of an instance of weight 1. Default 1.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Concurrent runs per unit of weight. Default 4.
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Registers `handler` under `path`, the name jobs refer to (Krest-Job's `path`).
    pub fn handler<F, Fut, O>(mut self, path: impl Into<String>, handler: F) -> Self
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, JobError>> + Send + 'static,
        O: Into<Output>,
    {
        let f: HandlerFn = Arc::new(move |ctx| {
            let fut = handler(ctx);
            Box::pin(async move { fut.await.map(Into::into) })
        });
        self.handlers.insert(path.into(), f);
        self
    }

    /// Delay between attempts of a failed run. Default 1 s doubling to 60 s.
    pub fn retry_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long the server waits for an ack before redelivering a run elsewhere, used when this
    /// worker creates its app's consumer (an existing consumer keeps its setting). The worker
    /// sends progress acks every third of it while a handler runs. Default 30 s.
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }

    /// How long a graceful shutdown waits for running handlers before cancelling them.
    /// Default 30 s.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    /// How long a cancelled handler may take to return before it is aborted. Default 5 s.
    pub fn cancel_grace(mut self, d: Duration) -> Self {
        self.cancel_grace = d;
        self
    }

    /// Heartbeat period. Default 3 s.
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.heartbeat_interval = d;
        self
    }

    /// Version reported in heartbeats. Default: the SDK's version.
    pub fn version(mut self, v: impl Into<String>) -> Self {
        self.version = v.into();
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<Worker, Error> {
        if !is_token(&self.app) {
            return Err(Error::Config(format!(
                "app name `{}` is invalid: use 1 to 64 letters, digits, `-` or `_`",
                self.app
            )));
        }
        if let Some(id) = &self.instance {
            if !is_token(id) {
                return Err(Error::Config(format!(
                    "instance id `{id}` is invalid: use 1 to 64 letters, digits, `-` or `_`"
                )));
            }
        }
        if self.handlers.is_empty() {
            return Err(Error::Config(
                "no handlers registered: call .handler(path, fn) at least once".into(),
            ));
        }
        if self.weight == 0 || self.slots == 0 {
            return Err(Error::Config("weight and slots must be at least 1".into()));
        }
        if self.weight.saturating_mul(self.slots) > 10_000 {
            return Err(Error::Config("weight × slots must be at most 10000".into()));
        }
        if self.ack_wait < Duration::from_secs(1) {
            return Err(Error::Config("ack_wait must be at least 1 s".into()));
        }
        let instance = self.instance.clone().unwrap_or_else(default_instance);
        Ok(Worker::new(self, instance))
    }
}

/// The host name, best effort.
pub(crate) fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".to_string())
}

fn default_instance() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let suffix = h.finish() & 0xffff;
    let host: String = sanitize_token(&host_name()).chars().take(40).collect();
    format!("{host}-{}-{suffix:04x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff::default();
        assert_eq!(b.delay(1), Duration::from_secs(1));
        assert_eq!(b.delay(2), Duration::from_secs(2));
        assert_eq!(b.delay(3), Duration::from_secs(4));
        assert_eq!(b.delay(10), Duration::from_secs(60));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact("nats://u:p@h:4222"), "nats://<redacted>@h:4222");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
        assert_eq!(
            redact("nats://tok@h1,nats://u:p@h2"),
            "nats://<redacted>@h1,nats://<redacted>@h2"
        );
    }

    #[test]
    fn build_checks_configuration() {
        let ok = |b: WorkerBuilder| b.handler("p", |_ctx| async { Ok(()) });
        assert!(ok(Worker::builder("app")).build().is_ok());
        assert!(matches!(
            ok(Worker::builder("my app")).build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Worker::builder("app").build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            ok(Worker::builder("app")).weight(0).build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            ok(Worker::builder("app")).instance("a.b").build(),
            Err(Error::Config(_))
        ));
        let w = ok(Worker::builder("app")).build().unwrap();
        assert!(
            krest_schemas::names::is_token(w.instance()),
            "{}",
            w.instance()
        );
    }
}
