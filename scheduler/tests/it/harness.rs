//! Shared set-up for the integration tests: a private nats-server, scheduler nodes (in-process
//! or as `krest` processes), workers, an API client and an execution log that handlers write
//! into, so tests can count what really ran.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use krest::cli::client::Client;
use krest::node::{NodeOptions, RunningNode};
use krest_schemas::api::{
    ApplyRequest, ApplyResponse, ClusterStatus, Op, RunDetail, RunRequest, RunSummary,
    RunsListRequest, TriggerRequest, TriggerResponse,
};
use krest_test_support::{eventually, NatsServer, PgDatabase, Proc, TestDir};
use krest_worker::{Backoff, WorkerBuilder};
use serde_json::{json, Value};

/// Generous deadline for anything that should happen within seconds.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A `max_payload` small enough that size limits are reached with few items (tests of
/// paging and bulk applies).
pub const SMALL_PAYLOAD: usize = 64 * 1024;

pub struct Env {
    pub nats: NatsServer,
    pub dir: TestDir,
    /// With [`Db::Postgres`], the one database every node of the test shares.
    pub pg: Option<PgDatabase>,
}

/// The database backend a test's nodes record into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    /// A SQLite file per node.
    Sqlite,
    /// One fresh Postgres database shared by all nodes (dropped at the end of the test).
    Postgres,
}

impl Env {
    pub fn new(name: &str) -> Env {
        krest_test_support::init_tracing();
        Env {
            nats: NatsServer::start(),
            dir: TestDir::new(name),
            pg: None,
        }
    }

    /// The same, its nodes recording into `db`.
    pub fn on(mut self, db: Db) -> Env {
        if db == Db::Postgres {
            self.pg = Some(PgDatabase::create());
        }
        self
    }

    /// Runs `sql` in the test's Postgres database (panics without one).
    pub fn pg_query(&self, sql: &str) -> String {
        self.pg.as_ref().expect("a test on Postgres").query(sql)
    }

    /// A test whose nats-server takes messages of at most `max_payload` bytes.
    pub fn with_max_payload(name: &str, max_payload: usize) -> Env {
        krest_test_support::init_tracing();
        let dir = TestDir::new(name);
        let conf = dir.join("nats.conf");
        std::fs::write(&conf, format!("max_payload: {max_payload}\n")).unwrap();
        Env {
            nats: NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]),
            dir,
            pg: None,
        }
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// The database URL of `node`: its own SQLite file, or the shared Postgres database.
    pub fn db(&self, node: &str) -> String {
        if let Some(pg) = &self.pg {
            return pg.url().to_string();
        }
        format!(
            "sqlite://{}",
            self.dir.join(&format!("{node}.db")).display()
        )
    }

    pub fn node_opts(&self, node: &str) -> NodeOptions {
        NodeOptions::new(self.url(), self.db(node), node)
    }

    /// Starts an in-process scheduler node.
    pub fn node(&self, node: &str) -> RunningNode {
        krest::node::spawn(self.node_opts(node))
    }

    /// Starts `krest scheduler` as a process.
    pub fn node_process(&self, node: &str) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_krest"));
        cmd.args([
            "scheduler",
            "--nats-url",
            &self.url(),
            "--db",
            &self.db(node),
            "--node",
            node,
            "--http",
            "127.0.0.1:0",
        ])
        .env("KREST_LOG", "info,krest=debug");
        Proc::spawn(node, cmd, self.dir.join(&format!("{node}.log")))
    }

    /// Runs the `krest` CLI with `args`; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_env(args, &[])
    }

    /// [`Env::cli`] with environment variables set.
    pub fn cli_env(&self, args: &[&str], vars: &[(&str, &str)]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_krest"))
            .args(["--nats-url", &self.url()])
            .args(args)
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    /// A worker builder with test-friendly timings.
    pub fn worker(&self, app: &str, instance: &str) -> WorkerBuilder {
        krest_worker::Worker::builder(app)
            .nats_url(self.url())
            .instance(instance)
            .heartbeat_interval(Duration::from_millis(500))
            .ack_wait(Duration::from_secs(5))
            .retry_backoff(Backoff {
                initial: Duration::from_millis(100),
                factor: 2.0,
                max: Duration::from_secs(1),
            })
    }

    /// Connects an API client once a node answers.
    pub async fn client(&self) -> Client {
        client_for(&self.url()).await
    }
}

/// The key of delivery tokens (once a node has made it), for tests that publish attempt events
/// as a worker would.
pub async fn delivery_key(js: &async_nats::jetstream::Context) -> krest::delivery::DeliveryKey {
    let secrets = eventually(DEADLINE, "the secrets bucket", || async {
        js.get_key_value(krest_schemas::names::SECRETS_BUCKET)
            .await
            .ok()
    })
    .await;
    krest::delivery::DeliveryKey::load_or_create(&secrets)
        .await
        .unwrap()
}

/// An API client on NATS at `urls`, once a scheduler node answers.
pub async fn client_for(urls: &str) -> Client {
    let client = Client::connect(urls, Duration::from_secs(5)).await.unwrap();
    eventually(DEADLINE, "a scheduler node answering", || {
        let c = client.clone();
        async move {
            c.call::<_, ClusterStatus>(Op::ClusterStatus, &json!({}))
                .await
                .ok()
        }
    })
    .await;
    client
}

/// Which output of a process [`first_line`] reads.
pub enum Output {
    Stdout,
    Stderr,
}

/// Starts `cmd` (a process that runs until stopped, like `runs watch`) and returns the first
/// line it prints on `output` that satisfies `wanted`, then kills it. Fails the test when no
/// such line comes within [`DEADLINE`] or the process exits first, with what it printed.
pub async fn first_line(
    mut cmd: Command,
    output: Output,
    wanted: impl Fn(&str) -> bool + Send + 'static,
) -> String {
    use std::io::BufRead as _;
    use std::process::Stdio;
    let (out, err) = match output {
        Output::Stdout => (Stdio::piped(), Stdio::null()),
        Output::Stderr => (Stdio::null(), Stdio::piped()),
    };
    let mut child = cmd.stdout(out).stderr(err).spawn().unwrap();
    let pipe: Box<dyn std::io::Read + Send> = match output {
        Output::Stdout => Box::new(child.stdout.take().unwrap()),
        Output::Stderr => Box::new(child.stderr.take().unwrap()),
    };
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let found = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if wanted(&line) => break Ok(line),
                Ok(line) => seen.push(line),
                // Timed out, or the process closed its output (it exited).
                Err(_) => break Err(seen.join("\n")),
            }
        }
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    found.unwrap_or_else(|seen| panic!("no wanted line within {DEADLINE:?}; it printed:\n{seen}"))
}

/// A job's current view.
pub async fn get_job(client: &Client, name: &str) -> krest_schemas::api::JobView {
    client
        .call(Op::JobGet, &krest_schemas::api::JobRequest::new(name))
        .await
        .unwrap()
}

pub async fn apply(client: &Client, documents: Vec<Value>) -> ApplyResponse {
    client
        .call(Op::JobApply, &ApplyRequest { documents })
        .await
        .unwrap()
}

pub async fn trigger(client: &Client, job: &str) -> TriggerResponse {
    client
        .call(
            Op::JobTrigger,
            &TriggerRequest {
                job: job.into(),
                args: None,
                request_id: Some(krest_schemas::names::new_request_id(chrono::Utc::now())),
            },
        )
        .await
        .unwrap()
}

/// The runs of `job`, retrying while no node answers in time (a node may be frozen on purpose).
pub async fn runs(client: &Client, job: &str) -> Vec<RunSummary> {
    let req = RunsListRequest {
        job: Some(job.into()),
        limit: Some(1000),
        ..Default::default()
    };
    eventually(DEADLINE, "an answer to runs.list", || async {
        client.call(Op::RunsList, &req).await.ok()
    })
    .await
}

pub async fn run(client: &Client, run_id: &str) -> Option<RunDetail> {
    client
        .call(
            Op::RunsGet,
            &RunRequest {
                run_id: run_id.into(),
            },
        )
        .await
        .ok()
}

/// Waits until `run_id` is recorded in a final status.
pub async fn wait_final(client: &Client, run_id: &str) -> RunDetail {
    eventually(DEADLINE, &format!("run {run_id} to finish"), || async {
        run(client, run_id)
            .await
            .filter(|d| d.run.status.is_final())
    })
    .await
}

/// Every page of a paged operation: `req(cursor)` builds each request. Each reply must fit
/// in the server's `max_payload`.
pub async fn all_pages<Req: serde::Serialize, T: serde::de::DeserializeOwned>(
    client: &Client,
    op: Op,
    mut req: impl FnMut(Option<String>) -> Req,
) -> Vec<Vec<T>> {
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let (page, next): (Vec<T>, Option<String>) =
            client.call_page(op, &req(cursor.take())).await.unwrap();
        pages.push(page);
        match next {
            Some(n) => cursor = Some(n),
            None => return pages,
        }
    }
}

pub async fn leader(client: &Client) -> Option<String> {
    client
        .call::<_, ClusterStatus>(Op::ClusterStatus, &json!({}))
        .await
        .ok()?
        .leader
        .map(|l| l.node)
}

/// What handlers really executed: run id → (shard, attempt, instance) per execution.
#[derive(Clone, Default)]
pub struct Executions(Arc<Mutex<HashMap<String, Vec<Execution>>>>);

/// `(shard, attempt, worker instance)` of one handler execution.
pub type Execution = (u32, u32, String);

impl Executions {
    pub fn record(&self, ctx: &krest_worker::JobContext) {
        self.0
            .lock()
            .unwrap()
            .entry(ctx.run_id().to_string())
            .or_default()
            .push((ctx.shard_index(), ctx.attempt(), ctx.worker().to_string()));
    }

    /// Executions of every run.
    pub fn total(&self) -> usize {
        self.0.lock().unwrap().values().map(Vec::len).sum()
    }

    /// `(runs executed, executions)`.
    pub fn totals(&self) -> (usize, usize) {
        let all = self.0.lock().unwrap();
        (all.len(), all.values().map(Vec::len).sum())
    }

    pub fn of(&self, run_id: &str) -> Vec<Execution> {
        self.0
            .lock()
            .unwrap()
            .get(run_id)
            .cloned()
            .unwrap_or_default()
    }
}

/// A job document with test defaults.
pub fn job(name: &str, app: &str, path: &str, extra: Value) -> Value {
    let mut doc = json!({
        "appName": app,
        "jobGroup": "t",
        "jobName": name,
        "path": path,
    });
    if let (Some(d), Some(e)) = (doc.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            d.insert(k.clone(), v.clone());
        }
    }
    doc
}

/// The seed's example documents, as kept in `examples/jobs/`.
pub fn seed_documents() -> Vec<Value> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
    let mut docs: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (
                p.display().to_string(),
                serde_json::from_str(&text).unwrap(),
            )
        })
        .collect();
    docs.sort_by(|a, b| a.0.cmp(&b.0));
    docs.into_iter().map(|(_, v)| v).collect()
}

/// Takes the write lock of the SQLite database at `db` and keeps it until the connection
/// commits or is dropped, as another process holding it would.
pub async fn sqlx_lock(db: &std::path::Path) -> sqlx::AnyConnection {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut c)
        .await
        .unwrap();
    c
}

/// Starts an in-process node serving HTTP on a free loopback port with the HTTP API's access
/// `web`; returns it and its base URL (`http://127.0.0.1:port`), once it is published.
pub async fn web_node(
    env: &Env,
    node: &str,
    web: krest::serve::web::WebOptions,
) -> (RunningNode, String) {
    let mut opts = env.node_opts(node);
    opts.http_addr = Some("127.0.0.1:0".parse().unwrap());
    opts.web = web;
    let running = krest::node::spawn(opts);
    let client = env.client().await;
    let addr = eventually(DEADLINE, &format!("node {node}'s HTTP address"), || async {
        let status: ClusterStatus = client.call(Op::ClusterStatus, &json!({})).await.ok()?;
        status
            .nodes
            .into_iter()
            .find(|n| n.node == node)
            .and_then(|n| n.http_addr)
    })
    .await;
    (running, format!("http://{addr}"))
}

/// A small HTTP client for the HTTP API: every answer as (status, headers, JSON body).
#[derive(Clone)]
pub struct Web {
    pub base: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl Web {
    pub fn new(base: &str, token: Option<&str>) -> Web {
        Web {
            base: base.to_string(),
            http: reqwest::Client::new(),
            token: token.map(str::to_string),
        }
    }

    /// The same node with another token.
    pub fn with_token(&self, token: Option<&str>) -> Web {
        Web {
            token: token.map(str::to_string),
            ..self.clone()
        }
    }

    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let res = req.send().await.unwrap_or_else(|e| panic!("{path}: {e:?}"));
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).to_string()));
        (status, headers, value)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (s, _, v) = self.raw(reqwest::Method::GET, path, None).await;
        (s, v)
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        let (s, _, v) = self.raw(method, path, body).await;
        (s, v)
    }

    /// GET that must succeed.
    pub async fn ok(&self, path: &str) -> Value {
        let (s, v) = self.get(path).await;
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }
}

/// The `(unacknowledged, pending)` counts of `app`'s shared consumer: runs its workers hold,
/// and runs waiting for one. `None` while it cannot be read.
pub async fn app_consumer_counts(
    js: &async_nats::jetstream::Context,
    app: &str,
) -> Option<(usize, u64)> {
    let stream = js
        .get_stream(krest_schemas::names::WORK_STREAM)
        .await
        .ok()?;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&krest_schemas::names::app_consumer(app))
        .await
        .ok()?;
    let info = consumer.info().await.ok()?;
    Some((info.num_ack_pending, info.num_pending))
}
