//! A worker's settings: [`WorkerBuilder`] collects the app name, handlers and tuning, and
//! checks them into a [`Config`], which the runtime (`worker.rs`) consumes. This module knows
//! nothing of the runtime: [`WorkerBuilder::build`] lives with [`crate::Worker`].

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use krest_schemas::names::{is_token, sanitize_token};

use crate::context::{HandlerFn, JobContext, JobError, Output};
use crate::nats::NatsConfig;
use crate::Error;

/// Delay before retrying a failed attempt (shared with the scheduler: see
/// [`krest_schemas::backoff`]).
pub use krest_schemas::Backoff;

/// Collects a worker's configuration. Start with [`Worker::builder`](crate::Worker::builder),
/// end with [`WorkerBuilder::build`].
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
    cfg: Config,
    instance: Option<String>,
}

/// A worker's settings (checked once they come out of [`WorkerBuilder::checked`]).
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) app: String,
    pub(crate) nats: NatsConfig,
    pub(crate) weight: u32,
    pub(crate) slots: u32,
    pub(crate) handlers: BTreeMap<String, HandlerFn>,
    pub(crate) backoff: Backoff,
    pub(crate) ack_wait: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) cancel_grace: Duration,
    pub(crate) report_start_after: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) pull_expiry: Duration,
    pub(crate) version: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("app", &self.app)
            .field("nats", &self.nats)
            .field("weight", &self.weight)
            .field("slots", &self.slots)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field("backoff", &self.backoff)
            .field("ack_wait", &self.ack_wait)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("instance", &self.instance)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl WorkerBuilder {
    pub(crate) fn new(app: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            cfg: Config {
                app: app.into(),
                nats: NatsConfig::new(crate::nats::DEFAULT_URL),
                weight: 1,
                slots: 4,
                handlers: BTreeMap::new(),
                backoff: Backoff::default(),
                ack_wait: Duration::from_secs(30),
                shutdown_timeout: Duration::from_secs(30),
                cancel_grace: Duration::from_secs(5),
                report_start_after: Duration::from_millis(100),
                heartbeat_interval: Duration::from_secs(3),
                pull_expiry: Duration::from_secs(2),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            instance: None,
        }
    }

    /// NATS server URL(s), comma-separated. Default `nats://127.0.0.1:4222`.
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.cfg.nats.url = url.into();
        self
    }

    /// Every NATS setting at once: URL(s), credentials, TLS (e.g.
    /// [`NatsConfig::from_env`], which reads `NATS_URL`, `NATS_USER`, … like the `nats` CLI).
    /// The connection name is set by the worker.
    ///
    /// ```no_run
    /// # fn demo() -> krest_worker::WorkerBuilder {
    /// use krest_worker::{nats::NatsConfig, Worker};
    /// Worker::builder("billing").nats(NatsConfig::from_env())
    /// # }
    /// ```
    pub fn nats(mut self, nats: NatsConfig) -> Self {
        self.cfg.nats = nats;
        self
    }

    /// Logs in with a user and password (`NATS_USER`/`NATS_PASSWORD`).
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.cfg.nats.user = Some(user.into());
        self.cfg.nats.password = Some(password.into());
        self
    }

    /// Logs in with a token (`NATS_TOKEN`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.cfg.nats.token = Some(token.into());
        self
    }

    /// Logs in with a credentials file: a user JWT and its seed (`NATS_CREDS`).
    pub fn credentials_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.cfg.nats.creds = Some(path.into());
        self
    }

    /// Logs in with an nkey: a file holding the user seed, or the seed itself (`NATS_NKEY`).
    pub fn nkey(mut self, seed_or_file: impl Into<String>) -> Self {
        self.cfg.nats.nkey = Some(seed_or_file.into());
        self
    }

    /// Presents a TLS client certificate and its key (PEM files; `NATS_CERT`, `NATS_KEY`).
    pub fn tls_client_cert(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.cfg.nats.tls_cert = Some(cert.into());
        self.cfg.nats.tls_key = Some(key.into());
        self
    }

    /// Trusts the CA certificate(s) in this PEM file for the server's certificate, instead of
    /// the system's (`NATS_CA`). Any TLS setting makes the worker require TLS.
    pub fn tls_ca(mut self, ca: impl Into<std::path::PathBuf>) -> Self {
        self.cfg.nats.tls_ca = Some(ca.into());
        self
    }

    /// Prefix of the worker's reply subjects. Default `_INBOX_<app>`, so a restricted worker
    /// user may subscribe to its own replies only (see docs/security.md).
    pub fn inbox_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.cfg.nats.inbox_prefix = Some(prefix.into());
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
        self.cfg.weight = weight;
        self
    }

    /// Concurrent runs per unit of weight. Default 4.
    pub fn slots(mut self, slots: u32) -> Self {
        self.cfg.slots = slots;
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
        self.cfg.handlers.insert(path.into(), f);
        self
    }

    /// Delay between attempts of a failed run, for jobs that set no `retryBackoff` (a job's
    /// own backoff wins). Default 1 s doubling to 60 s.
    pub fn retry_backoff(mut self, backoff: Backoff) -> Self {
        self.cfg.backoff = backoff;
        self
    }

    /// How long the server waits for an ack before redelivering a run elsewhere, used when this
    /// worker creates a consumer (an existing consumer keeps its setting). While a handler
    /// runs, the worker sends progress acks every third of the ack wait *of the consumer the
    /// run came from*, as the server reports it. Default 30 s.
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.cfg.ack_wait = d;
        self
    }

    /// How long a graceful shutdown waits for running handlers before cancelling them.
    /// Default 30 s.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.cfg.shutdown_timeout = d;
        self
    }

    /// How long a cancelled handler may take to return before it is aborted. Default 5 s.
    pub fn cancel_grace(mut self, d: Duration) -> Self {
        self.cfg.cancel_grace = d;
        self
    }

    /// How long an attempt runs before its `started` event is sent. An attempt that ends
    /// sooner, without logging, sends no `started` event: its `finished` event carries the
    /// start (`startedAt`), one message stored and recorded instead of two. The run shows as
    /// RUNNING this much later. Default 100 ms; zero sends `started` at once.
    pub fn report_start_after(mut self, d: Duration) -> Self {
        self.cfg.report_start_after = d;
        self
    }

    /// Heartbeat period. Default 3 s.
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.cfg.heartbeat_interval = d;
        self
    }

    /// Version reported in heartbeats. Default: the SDK's version.
    pub fn version(mut self, v: impl Into<String>) -> Self {
        self.cfg.version = v.into();
        self
    }

    /// Checks the configuration; returns it with the instance id (the default one when none
    /// was set).
    pub(crate) fn checked(self) -> Result<(Config, String), Error> {
        let WorkerBuilder { cfg, instance } = self;
        if !is_token(&cfg.app) {
            return Err(Error::config(format!(
                "app name `{}` is invalid: use 1 to 64 letters, digits, `-` or `_`",
                cfg.app
            )));
        }
        if let Some(id) = &instance {
            if !is_token(id) {
                return Err(Error::config(format!(
                    "instance id `{id}` is invalid: use 1 to 64 letters, digits, `-` or `_`"
                )));
            }
        }
        if cfg.handlers.is_empty() {
            return Err(Error::config(
                "no handlers registered: call .handler(path, fn) at least once",
            ));
        }
        if cfg.weight == 0 || cfg.slots == 0 {
            return Err(Error::config("weight and slots must be at least 1"));
        }
        if cfg.weight.saturating_mul(cfg.slots) > 10_000 {
            return Err(Error::config("weight × slots must be at most 10000"));
        }
        if cfg.ack_wait < Duration::from_secs(1) {
            return Err(Error::config("ack_wait must be at least 1 s"));
        }
        let instance = instance.unwrap_or_else(default_instance);
        Ok((cfg, instance))
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
    fn checks_the_configuration() {
        let ok = |b: WorkerBuilder| b.handler("p", |_ctx| async { Ok(()) });
        let builder = || ok(WorkerBuilder::new("app"));
        assert!(builder().checked().is_ok());
        let bad = [
            ok(WorkerBuilder::new("my app")),
            WorkerBuilder::new("app"),
            builder().weight(0),
            builder().slots(0),
            builder().weight(101).slots(100),
            builder().instance("a.b"),
            builder().ack_wait(Duration::from_millis(999)),
        ];
        for b in bad {
            let shown = format!("{b:?}");
            let e = b
                .checked()
                .err()
                .unwrap_or_else(|| panic!("accepted {shown}"));
            assert_eq!(e.kind(), crate::ErrorKind::Config, "{shown}");
        }
        let (cfg, instance) = builder().instance("w-1").checked().unwrap();
        assert_eq!((cfg.app.as_str(), instance.as_str()), ("app", "w-1"));
        let (_, instance) = builder().checked().unwrap();
        assert!(krest_schemas::names::is_token(&instance), "{instance}");
    }

    #[test]
    fn debug_output_hides_url_credentials() {
        let b = WorkerBuilder::new("app")
            .nats_url("nats://u:secret@h:4222")
            .user_and_password("u", "pw-secret")
            .token("tok-secret");
        let shown = format!("{b:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
