//! A scheduler node: wires the job watcher, election, engine, recorder, API and presence
//! together and runs them until asked to stop.
//!
//! Shutdown order matters: the engine and API stop first (no more dispatches), then the
//! election releases the lease (a standby takes over at once), then the recorder and presence.

pub mod supervisor;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use krest_schemas::names::sanitize_token;
use krest_schemas::{NodeInfo, NodeRole};
use krest_worker::nats::{ConnectStyle, NatsConfig};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::infra::{self, InfraConfig};
use crate::jobs::{self, JobTable};
use crate::leader::dispatch::Publisher;
use crate::leader::engine::EngineConfig;
use crate::leader::lease::{Election, Leadership, LeaseConfig, Role};
use crate::leader::state::{Engine, EngineDeps};
use crate::record::recorder::{self, RecorderConfig, RecorderStatus, StatusRx};
use crate::record::store::{redact_db_url, Store};
use crate::retry::Failure;
use crate::serve::api::ApiServer;
use krest_schemas::Backoff;
use supervisor::{Supervisor, TaskControl};

/// Prefix of a node's reply subjects: restricted users are not allowed to read it (see
/// docs/security.md).
pub const SCHEDULER_INBOX_PREFIX: &str = "_INBOX_krest";

/// Everything a node needs to start. `Debug` shows the URLs redacted.
#[derive(Clone)]
pub struct NodeOptions {
    /// Where and how to connect to NATS (URL(s), credentials, TLS).
    pub nats: NatsConfig,
    /// Database URL (`sqlite://krest.db`, `postgres://user@host/db`).
    pub db_url: String,
    /// Node name (letters, digits, `-`, `_`).
    pub node: String,
    /// Lease renewal period.
    pub lease_renew: Duration,
    /// Streams and buckets.
    pub infra: InfraConfig,
    /// Engine.
    pub engine: EngineConfig,
    /// Recorder.
    pub recorder: RecorderConfig,
    /// Router.
    pub router: crate::leader::router::RouterConfig,
    /// Address of the HTTP endpoint (`/healthz`, `/readyz`, the HTTP API); `None` disables it.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Which ended runs the database keeps.
    pub retention: crate::record::retention::RetentionConfig,
    /// Who may use the HTTP API.
    pub web: crate::serve::web::WebOptions,
}

impl NodeOptions {
    /// Defaults for a node named `node`.
    pub fn new(
        nats_url: impl Into<String>,
        db_url: impl Into<String>,
        node: impl Into<String>,
    ) -> NodeOptions {
        NodeOptions {
            nats: NatsConfig::new(nats_url),
            db_url: db_url.into(),
            node: sanitize_token(&node.into()),
            lease_renew: Duration::from_secs(1),
            infra: InfraConfig::default(),
            engine: EngineConfig::default(),
            recorder: RecorderConfig::default(),
            router: Default::default(),
            http_addr: None,
            retention: Default::default(),
            web: Default::default(),
        }
    }
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("nats", &self.nats)
            .field("db_url", &redact_db_url(&self.db_url))
            .field("node", &self.node)
            .field("lease_renew", &self.lease_renew)
            .field("infra", &self.infra)
            .field("engine", &self.engine)
            .field("recorder", &self.recorder)
            .field("router", &self.router)
            .field("http_addr", &self.http_addr)
            .field("retention", &self.retention)
            .field("web", &self.web)
            .finish()
    }
}

/// The default node name: host name and process id.
pub fn default_node_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "krest".to_string());
    sanitize_token(&format!(
        "{}-{}",
        host.chars().take(40).collect::<String>(),
        std::process::id()
    ))
}

/// Errors that end a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] crate::record::store::StoreError),
    /// The HTTP endpoint's address cannot be bound.
    #[error("cannot listen on {addr} for /healthz and /readyz (choose another address with --http, or --http off)")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// NATS cannot be used: an invalid URL, unusable credentials, a refused login or TLS.
    #[error(transparent)]
    Nats(krest_worker::nats::NatsError),
    /// A critical task ended while the node ran: the node stopped.
    #[error("the node's {task} task {exit}; the node stopped (restart it)")]
    TaskEnded {
        /// The task.
        task: &'static str,
        /// How it ended.
        exit: supervisor::Exit,
    },
}

/// Handles to a node running in the background (tests, embedding).
#[derive(Debug)]
pub struct RunningNode {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), NodeError>>,
    /// The node's view of leadership.
    pub leadership: watch::Receiver<Option<Leadership>>,
    /// Aborts the node's tasks (a test hook: a task that dies must stop the node).
    pub tasks: TaskControl,
    table: Arc<JobTable>,
}

impl RunningNode {
    /// Graceful stop: release leadership, finish in-flight work.
    pub async fn stop(self) -> Result<(), NodeError> {
        self.stop.cancel();
        self.task.await.unwrap_or(Ok(()))
    }

    /// Abrupt stop, as if the process died: the lease is not released.
    pub fn abort(self) {
        self.task.abort();
    }

    /// The node's job table: how far it is loaded, and (test hook) holding it as loading
    /// ([`JobTable::hold_load`], [`spawn_holding_load`]).
    pub fn jobs(&self) -> &JobTable {
        &self.table
    }

    /// Waits until the node ends by itself (a critical task ended) and returns why.
    pub async fn ended(self) -> Result<(), NodeError> {
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Starts a node in the background.
pub fn spawn(opts: NodeOptions) -> RunningNode {
    spawn_with(opts, Arc::new(JobTable::default()))
}

/// Starts a node in the background whose job table counts as loading, whatever it has read,
/// until `running.jobs().release_load()` (a test hook: a node still loading its jobs must not
/// campaign for the lease nor say it is ready).
pub fn spawn_holding_load(opts: NodeOptions) -> RunningNode {
    let table = Arc::new(JobTable::default());
    table.hold_load();
    spawn_with(opts, table)
}

fn spawn_with(opts: NodeOptions, table: Arc<JobTable>) -> RunningNode {
    let stop = CancellationToken::new();
    let (tx, rx) = watch::channel(None);
    let token = stop.clone();
    let tasks = TaskControl::default();
    let control = tasks.clone();
    let node_table = table.clone();
    let task =
        tokio::spawn(
            async move { run_supervised(opts, token, Some(tx), control, node_table).await },
        );
    RunningNode {
        stop,
        task,
        leadership: rx,
        tasks,
        table,
    }
}

/// Runs a node until `stop`. The database is opened first: one that cannot be opened ends the
/// node at once with [`NodeError::Store`]. NATS being unreachable at start is waited out with
/// logs.
pub async fn run(
    opts: NodeOptions,
    stop: CancellationToken,
    leadership_out: Option<watch::Sender<Option<Leadership>>>,
) -> Result<(), NodeError> {
    run_supervised(
        opts,
        stop,
        leadership_out,
        TaskControl::default(),
        Arc::new(JobTable::default()),
    )
    .await
}

/// [`run`], with the node's tasks reachable through `control`.
async fn run_supervised(
    opts: NodeOptions,
    stop: CancellationToken,
    leadership_out: Option<watch::Sender<Option<Leadership>>>,
    control: TaskControl,
    table: Arc<JobTable>,
) -> Result<(), NodeError> {
    // The database first: a wrong or unreachable one stops the node before it connects to
    // NATS or takes part in the election.
    let store = Store::open(&opts.db_url).await?;
    tracing::info!(db = %redact_db_url(&opts.db_url), backend = store.backend().as_str(), "database open");
    let http_listener = match opts.http_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Http { addr, source })?,
        ),
        None => None,
    };
    let http_addr = http_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string());
    let Some(client) = connect(&opts, &stop).await? else {
        return Ok(());
    };
    let js = async_nats::jetstream::new(client.clone());
    let Some(infra) = infra::ensure_with_retry(&js, &opts.infra, &stop).await else {
        return Ok(());
    };
    tracing::info!(node = %opts.node, db = %redact_db_url(&opts.db_url), nats = %client.server_info().version, "scheduler node starting");

    let (changes_tx, changes_rx) = mpsc::unbounded_channel();
    let (election, leadership) = Election::new(
        infra.leader.clone(),
        LeaseConfig {
            node: opts.node.clone(),
            ttl: infra.lease_ttl,
            renew_every: opts.lease_renew,
        },
    );
    // A node still reading the jobs bucket could not fire them: it does not campaign yet.
    let election = election.campaign_when(table.loaded());
    if let Some(out) = &leadership_out {
        let _ = out.send(Some(leadership.clone()));
    }
    let publisher = Publisher::new(js.clone(), opts.node.clone(), infra.delivery.clone());
    let registry = Arc::new(crate::leader::balance::Registry::new(js.clone()));
    let routing = Arc::new(crate::leader::balance::Routing::new(registry.clone()));
    let (recorder_tx, recorder_rx) = watch::channel(RecorderStatus::default());

    let mut sup = Supervisor::new(control);
    // Tokens in shutdown order.
    let front = CancellationToken::new(); // engine, API
    let lease_stop = CancellationToken::new();
    let back = CancellationToken::new(); // watcher, recorder, presence

    let watcher = sup.spawn(
        "job-watcher",
        jobs::watch_jobs(
            js.clone(),
            infra.jobs.clone(),
            table.clone(),
            changes_tx,
            back.clone(),
        ),
    );
    let election_task = sup.spawn("election", election.run(lease_stop.clone()));
    let engine = Engine::new(
        table.clone(),
        changes_rx,
        leadership.clone(),
        EngineDeps {
            publisher: publisher.clone(),
            infra: infra.clone(),
            client: client.clone(),
            routing: routing.clone(),
            router: opts.router.clone(),
        },
        opts.engine.clone(),
    );
    let engine_task = sup.spawn("engine", engine.run(table.loaded(), front.clone()));
    let registry_task = sup.spawn("registry", registry.clone().refresh_loop(back.clone()));

    let followups = crate::record::followup::Followups {
        table: table.clone(),
        publisher: publisher.clone(),
        once: infra.once.clone(),
        alerter: crate::record::alert::Alerter::start(),
        node: opts.node.clone(),
        routing: routing.clone(),
    };
    let recorder_task = sup.spawn(
        "recorder",
        recorder::run(
            js.clone(),
            store.clone(),
            followups,
            opts.recorder.clone(),
            infra.delivery.clone(),
            recorder_tx,
            back.clone(),
        ),
    );
    let retention_task = sup.spawn(
        "retention",
        crate::record::retention::run(
            store.clone(),
            table.clone(),
            opts.retention.clone(),
            back.clone(),
        ),
    );
    let api = ApiServer {
        client: client.clone(),
        infra: infra.clone(),
        table: table.clone(),
        store: store.clone(),
        publisher,
        routing: routing.clone(),
        node: opts.node.clone(),
        recorder: recorder_rx.clone(),
    };
    let web_api = api.clone();
    let api_task = sup.spawn("api", api.run(front.clone()));
    let deadletter_task = sup.spawn(
        "dead-letter",
        crate::deadletter::run_advisories(client.clone(), js.clone(), back.clone()),
    );
    let http_task = http_listener.map(|listener| {
        tracing::info!(addr = ?http_addr, "serving /healthz, /readyz and the HTTP API (/api/v1)");
        let state = crate::serve::http::HttpState {
            node: opts.node.clone(),
            client: client.clone(),
            store: store.clone(),
            leadership: leadership.clone(),
            recorder: recorder_rx.clone(),
            max_lag: opts.recorder.max_lag,
            table: table.clone(),
            routing: routing.clone(),
        };
        let web = crate::serve::web::WebState {
            api: web_api,
            health: state.clone(),
            auth: std::sync::Arc::new(crate::serve::web::auth::Auth::new(opts.web.clone())),
            stop: back.clone(),
        };
        sup.spawn(
            "http",
            crate::serve::http::serve(listener, state, Some(web), back.clone()),
        )
    });
    let presence_task = sup.spawn(
        "presence",
        presence(
            infra.nodes.clone(),
            client.clone(),
            Presence {
                node: opts.node.clone(),
                database: store.backend().as_str(),
                http_addr,
            },
            leadership.clone(),
            recorder_rx,
            table.clone(),
            back.clone(),
        ),
    );

    let failed = tokio::select! {
        _ = stop.cancelled() => None,
        f = sup.failed() => Some(f),
    };
    match &failed {
        None => tracing::info!(node = %opts.node, "shutting down"),
        Some((task, exit)) => tracing::error!(
            node = %opts.node, task, %exit,
            "a critical task ended; shutting down (releasing the lease, so a standby takes over) to be restarted"
        ),
    }
    front.cancel();
    engine_task.join().await;
    api_task.join().await;
    lease_stop.cancel();
    election_task.join().await;
    back.cancel();
    watcher.join().await;
    recorder_task.join().await;
    retention_task.join().await;
    presence_task.join().await;
    deadletter_task.join().await;
    registry_task.join().await;
    if let Some(t) = http_task {
        t.join().await;
    }
    // Bounded: a node asked to stop must stop even when NATS is gone.
    match tokio::time::timeout(Duration::from_secs(3), infra.nodes.delete(&opts.node)).await {
        Ok(Ok(())) => {}
        _ => tracing::debug!("could not remove node presence"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), client.flush()).await;
    store.close().await;
    tracing::info!(node = %opts.node, "stopped");
    match failed {
        None => Ok(()),
        Some((task, exit)) => Err(NodeError::TaskEnded { task, exit }),
    }
}

/// Connects with the node's NATS settings (replies under `_INBOX_krest` unless set), waiting
/// out an unreachable server; a refused login, a TLS failure or unusable settings end the node.
async fn connect(
    opts: &NodeOptions,
    stop: &CancellationToken,
) -> Result<Option<async_nats::Client>, NodeError> {
    let mut nats = opts
        .nats
        .clone()
        .name(format!("krest-scheduler {}", opts.node));
    if nats.inbox_prefix.is_none() {
        nats.inbox_prefix = Some(SCHEDULER_INBOX_PREFIX.to_string());
    }
    let what = format!("cannot connect to NATS at {}", nats.shown_url());
    let connected = crate::retry::until_ok(stop, Backoff::RECONNECT, &what, || async {
        nats.connect(ConnectStyle::Service).await.map_err(|e| {
            if e.is_retryable() {
                Failure::Retry(e)
            } else {
                Failure::Fatal(e)
            }
        })
    })
    .await;
    connected.map_err(NodeError::Nats)
}

/// The fixed part of a node's presence.
struct Presence {
    node: String,
    database: &'static str,
    http_addr: Option<String>,
}

async fn presence(
    nodes: async_nats::jetstream::kv::Store,
    client: async_nats::Client,
    me: Presence,
    leadership: Leadership,
    recorder: StatusRx,
    table: Arc<JobTable>,
    stop: CancellationToken,
) {
    let started_at = Utc::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut roles = leadership.watch();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = roles.changed() => {}
            _ = stop.cancelled() => return,
        }
        let role = match leadership.role() {
            Role::Leader { .. } => NodeRole::Leader,
            Role::Standby => NodeRole::Standby,
        };
        let server = client.server_info();
        // One borrow, cloned: a second `borrow()` of the same watch while the first is held
        // deadlocks once the recorder waits to send in between (its lock prefers writers).
        let rec = recorder.borrow().clone();
        let info = NodeInfo {
            node: me.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            role,
            database: me.database.to_string(),
            nats_server: format!("{}@{}:{}", server.server_name, server.host, server.port),
            http_addr: me.http_addr.clone(),
            recorded_seq: rec.recorded_seq,
            recorder_lag_events: rec.lag_events,
            recorder_lag_ms: u64::try_from(rec.lag.as_millis()).unwrap_or(u64::MAX),
            recorder_failing: rec.failing,
            started_at,
            heartbeat_at: Utc::now(),
            loading: Some(table.load_progress())
                .filter(|p| !p.loaded)
                .map(|p| p.to_string()),
        };
        if let Ok(body) = serde_json::to_vec(&info) {
            if let Err(e) = nodes.put(&me.node, body.into()).await {
                tracing::debug!(error = %e, "presence update failed");
            }
        }
    }
}
