//! `krest` command-line interface: argument definitions (stage one, as close to the flags as
//! possible) and the commands that use them. Data goes to stdout, messages to stderr.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use krest_schemas::api::{
    ApplyRequest, ApplyResponse, ClusterStatus, JobListRequest, JobRequest, JobView, Op, RunDetail,
    RunRequest, RunStatus, RunSummary, RunsListRequest, TriggerRequest, TriggerResponse,
};
use krest_schemas::cron::parse_time_zone;
use krest_schemas::names::EVENTS_SUBJECTS;
use krest_schemas::{CronSchedule, RunEvent, WorkerInfo};

use crate::client::{Client, ClientError};

/// `println!` that reports a closed stdout (`krest … | head`) as an error instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*)?;
    }};
}

/// Parses `500ms`, `3s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: use e.g. 500ms, 3s, 2m, 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}` has an unknown unit: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
}

/// Krest: a distributed job scheduler on NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "krest", version, about, long_about = None)]
pub struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table", global = true)]
    pub output: Format,
    /// How long to wait for NATS and for a scheduler node's answer.
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a scheduler node (leader election, cron dispatch, recording, API).
    Scheduler(SchedulerArgs),
    /// Manage job definitions.
    #[command(subcommand)]
    Job(JobCmd),
    /// Inspect runs.
    #[command(subcommand)]
    Runs(RunsCmd),
    /// Inspect live workers.
    #[command(subcommand)]
    Workers(WorkersCmd),
    /// Inspect the scheduler cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Preview cron expressions.
    #[command(subcommand)]
    Cron(CronCmd),
    /// Run a built-in worker.
    #[command(subcommand)]
    Worker(WorkerRunCmd),
    /// Inspect the dead-letter stream (bad input, runs that exhausted their deliveries).
    #[command(subcommand)]
    Dlq(DlqCmd),
}

/// `krest dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// List the newest parked messages.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

/// `krest worker …`
#[derive(Debug, Subcommand)]
pub enum WorkerRunCmd {
    /// The seed's demo handlers (same as `krest-demo-worker`).
    Demo(DemoWorkerArgs),
    /// The built-in HTTP executor: runs the app's jobs of type HTTP.
    Http(HttpWorkerArgs),
}

/// Flags every built-in worker takes.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Relative capacity of this instance.
    #[arg(long, env = "KREST_WEIGHT", default_value_t = 1)]
    pub weight: u32,
    /// Concurrent runs per unit of weight.
    #[arg(long, env = "KREST_SLOTS", default_value_t = 2)]
    pub slots: u32,
    /// Instance id (default: host name, pid and a random suffix).
    #[arg(long, env = "KREST_INSTANCE")]
    pub instance: Option<String>,
    /// Ack wait of the app's consumer, if this worker creates it.
    #[arg(long, env = "KREST_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// How long a graceful stop waits for running handlers.
    #[arg(long, env = "KREST_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

/// `krest worker demo` flags.
#[derive(Debug, Args)]
pub struct DemoWorkerArgs {
    /// App name.
    #[arg(long, env = "KREST_APP", default_value = krest_demo_worker::APP)]
    pub app: String,
    /// Simulated work per shard.
    #[arg(long, env = "KREST_WORK", default_value = "300ms", value_parser = parse_duration)]
    pub work: Duration,
    /// Append `run_id shard attempt instance` per execution to this file.
    #[arg(long, env = "KREST_JOURNAL")]
    pub journal: Option<PathBuf>,
    /// Common worker flags.
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// `krest worker http` flags.
#[derive(Debug, Args)]
pub struct HttpWorkerArgs {
    /// The app whose HTTP jobs this worker runs.
    #[arg(long, env = "KREST_APP")]
    pub app: String,
    /// Common worker flags.
    #[command(flatten)]
    pub worker: WorkerArgs,
}

fn worker_builder(nats_url: String, app: &str, args: &WorkerArgs) -> krest_worker::WorkerBuilder {
    let mut builder = krest_worker::Worker::builder(app)
        .nats_url(nats_url)
        .weight(args.weight)
        .slots(args.slots)
        .ack_wait(args.ack_wait)
        .shutdown_timeout(args.shutdown_timeout)
        .version(env!("CARGO_PKG_VERSION"));
    if let Some(id) = &args.instance {
        builder = builder.instance(id);
    }
    builder
}

/// Runs `krest worker …` until SIGTERM or ctrl-c.
pub async fn run_worker(nats_url: String, cmd: WorkerRunCmd) -> anyhow::Result<()> {
    let worker = match cmd {
        WorkerRunCmd::Demo(args) => {
            let opts = krest_demo_worker::DemoOptions {
                work: args.work,
                journal: args.journal,
            };
            krest_demo_worker::register(worker_builder(nats_url, &args.app, &args.worker), opts)
                .build()?
        }
        WorkerRunCmd::Http(args) => {
            krest_worker::http::register(worker_builder(nats_url, &args.app, &args.worker))?
                .build()?
        }
    };
    tracing::info!(instance = worker.instance(), "worker starting");
    worker.run(krest_worker::shutdown_signal()).await?;
    Ok(())
}

/// `krest scheduler` flags.
#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Database URL: sqlite://PATH (created if missing).
    #[arg(long, env = "KREST_DB", default_value = "sqlite://krest.db")]
    pub db: String,
    /// Node name (default: host name and process id).
    #[arg(long, env = "KREST_NODE")]
    pub node: Option<String>,
    /// Leader lease TTL (used when the lease bucket is created).
    #[arg(long, env = "KREST_LEASE_TTL", default_value = "3s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Lease renewal period (and standby polling period).
    #[arg(long, env = "KREST_LEASE_RENEW", default_value = "1s", value_parser = parse_duration)]
    pub lease_renew: Duration,
    /// Fires later than this when published are misfires (collapsed into one run).
    #[arg(long, env = "KREST_MISFIRE_THRESHOLD", default_value = "60s", value_parser = parse_duration)]
    pub misfire_threshold: Duration,
    /// Replicas of streams and buckets when creating them (default: 1, or the NATS cluster's
    /// size up to 3).
    #[arg(long, env = "KREST_REPLICAS")]
    pub replicas: Option<usize>,
    /// Address of the /healthz and /readyz endpoint (`off` to disable; port 0 picks one).
    #[arg(long, env = "KREST_HTTP", default_value = "127.0.0.1:8722", value_parser = parse_http_addr)]
    pub http: HttpAddr,
}

/// `--http`: an address or `off`.
#[derive(Debug, Clone, Copy)]
pub struct HttpAddr(pub Option<std::net::SocketAddr>);

fn parse_http_addr(s: &str) -> Result<HttpAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(HttpAddr(None));
    }
    s.parse().map(|a| HttpAddr(Some(a))).map_err(|_| {
        format!("`{s}` is not an address: use e.g. 127.0.0.1:8722, 0.0.0.0:8722 or off")
    })
}

/// `krest job …`
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Create or update jobs from JSON files (one definition or an array per file).
    Apply {
        /// Files to read (`-` for stdin).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// List jobs.
    List {
        /// Only jobs of this app.
        #[arg(long)]
        app: Option<String>,
        /// Only jobs of this group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Show one job (`group.name`, or a name unique across groups).
    Get {
        /// The job.
        job: String,
        /// Show this earlier revision (see `krest job history`).
        #[arg(long)]
        revision: Option<u64>,
    },
    /// List the revisions of a job's definition, newest first.
    History {
        /// The job (`group.name` also finds deleted jobs).
        job: String,
    },
    /// Stop scheduling a job.
    Pause {
        /// The job.
        job: String,
    },
    /// Resume scheduling a paused job (missed fires are not caught up).
    Resume {
        /// The job.
        job: String,
    },
    /// Delete a job (its run history stays).
    Delete {
        /// The job.
        job: String,
    },
    /// Run a job now.
    Trigger {
        /// The job.
        job: String,
        /// JSON arguments replacing the job's `args` for this run.
        #[arg(long)]
        args: Option<String>,
        /// Follow the run until it ends (progress on stderr); the exit code is 0 only if it
        /// SUCCEEDED.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (exit code 1).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
}

/// `krest runs …`
#[derive(Debug, Subcommand)]
pub enum RunsCmd {
    /// List runs, newest first.
    List {
        /// Only runs of this job.
        #[arg(long)]
        job: Option<String>,
        /// Only runs in this status (PENDING, RUNNING, SUCCEEDED, FAILED).
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one run with its shards, attempts and log lines.
    Get {
        /// The run id.
        run_id: String,
    },
    /// Cancel a pending or running run (every shard), wherever it runs.
    Cancel {
        /// The run id.
        run_id: String,
    },
    /// Follow run events as they happen (until ctrl-c).
    Watch {
        /// Only events of this job (`group.name`).
        #[arg(long)]
        job: Option<String>,
    },
}

/// `krest workers …`
#[derive(Debug, Subcommand)]
pub enum WorkersCmd {
    /// List live worker instances.
    List,
}

/// `krest cluster …`
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Show scheduler nodes and the leader.
    Status,
}

/// `krest cron …`
#[derive(Debug, Subcommand)]
pub enum CronCmd {
    /// Print the next fire times of a cron expression.
    Next {
        /// The expression (Quartz with seconds, or 5-field).
        expr: String,
        /// IANA time zone.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// How many.
        #[arg(short = 'n', default_value_t = 5)]
        count: usize,
    },
}

fn fmt_time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
    )
}

/// Prints rows as an aligned table.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> std::io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        outln!("{}", s.trim_end());
        Ok(())
    };
    line(headers.iter().map(|h| h.to_string()).collect())?;
    for row in rows {
        line(row)?;
    }
    Ok(())
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Reads job documents from files: each file holds one definition or an array of them.
fn read_documents(files: &[PathBuf]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
    for f in files {
        let text = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read stdin")?;
            s
        } else {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", f.display()))?;
        match v {
            serde_json::Value::Array(items) => docs.extend(items),
            other => docs.push(other),
        }
    }
    Ok(docs)
}

/// Runs a client command; returns the exit code.
pub async fn run_client(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Cron(CronCmd::Next { expr, tz, count }) = &cli.command {
        let tz = parse_time_zone(tz).map_err(anyhow::Error::msg)?;
        let s = CronSchedule::new(expr, tz)?;
        let mut t = Utc::now();
        let mut out = Vec::new();
        for _ in 0..*count {
            match s.next_after(t) {
                Some(n) => {
                    out.push(n);
                    t = n;
                }
                None => break,
            }
        }
        if cli.output == Format::Json {
            print_json(&out)?;
        } else {
            for t in out {
                outln!(
                    "{}  ({})",
                    t.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S %Z"),
                    t.format("%Y-%m-%dT%H:%M:%SZ")
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let client = Client::connect(&cli.nats_url, cli.timeout).await?;
    let json = cli.output == Format::Json;
    match cli.command {
        Command::Scheduler(_) | Command::Cron(_) | Command::Worker(_) => {
            unreachable!("handled elsewhere")
        }
        Command::Job(cmd) => job(&client, cmd, json).await,
        Command::Runs(cmd) => runs(&client, cmd, json).await,
        Command::Workers(WorkersCmd::List) => {
            let workers: Vec<WorkerInfo> =
                client.call(Op::WorkersList, &serde_json::json!({})).await?;
            if json {
                print_json(&workers)?;
            } else {
                table(
                    &[
                        "APP",
                        "INSTANCE",
                        "WEIGHT",
                        "SLOTS",
                        "IN-FLIGHT",
                        "HANDLERS",
                        "HOST",
                        "HEARTBEAT",
                    ],
                    workers
                        .iter()
                        .map(|w| {
                            vec![
                                w.app_name.clone(),
                                w.instance.clone(),
                                w.weight.to_string(),
                                w.slots.to_string(),
                                w.in_flight.to_string(),
                                w.handlers.join(","),
                                w.host.clone(),
                                fmt_time(Some(w.heartbeat_at)),
                            ]
                        })
                        .collect(),
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq(DlqCmd::List { limit }) => {
            let letters: Vec<krest_schemas::api::DeadLetter> = client
                .call(
                    Op::DlqList,
                    &krest_schemas::api::DlqListRequest { limit: Some(limit) },
                )
                .await?;
            if json {
                print_json(&letters)?;
            } else {
                table(
                    &["SEQ", "PARKED (UTC)", "KIND", "SOURCE", "REASON", "PAYLOAD"],
                    letters
                        .iter()
                        .map(|d| {
                            vec![
                                d.seq.to_string(),
                                fmt_time(Some(d.at)),
                                d.subject.trim_start_matches("krest.dlq.").to_string(),
                                d.source.clone(),
                                d.reason.clone(),
                                d.payload.chars().take(60).collect(),
                            ]
                        })
                        .collect(),
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster(ClusterCmd::Status) => {
            let status: ClusterStatus = client
                .call(Op::ClusterStatus, &serde_json::json!({}))
                .await?;
            if json {
                print_json(&status)?;
            } else {
                match &status.leader {
                    Some(l) => outln!(
                        "leader: {} (epoch {}, since {})",
                        l.node,
                        l.epoch,
                        fmt_time(Some(l.acquired_at))
                    ),
                    None => outln!("leader: none"),
                }
                outln!("nats-server: {}", status.nats_server);
                table(
                    &[
                        "NODE",
                        "ROLE",
                        "DATABASE",
                        "RECORDED-SEQ",
                        "VERSION",
                        "STARTED",
                    ],
                    status
                        .nodes
                        .iter()
                        .map(|n| {
                            vec![
                                n.node.clone(),
                                format!("{:?}", n.role).to_uppercase(),
                                n.database.clone(),
                                n.recorded_seq.to_string(),
                                n.nats_server.clone(),
                                n.http_addr.clone().unwrap_or_else(|| "-".into()),
                                n.version.clone(),
                                fmt_time(Some(n.started_at)),
                            ]
                        })
                        .collect(),
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn job_rows(jobs: &[JobView]) -> Vec<Vec<String>> {
    jobs.iter()
        .map(|j| {
            let s = &j.spec;
            vec![
                j.key.clone(),
                s.app_name.clone(),
                format!("{:?}", s.job_type).to_uppercase(),
                match (&s.cron, &s.every, &s.at) {
                    (Some(c), _, _) => c.clone(),
                    (_, Some(e), _) => format!("every {e}"),
                    (_, _, Some(a)) => format!("at {a}"),
                    _ => "(manual)".into(),
                },
                s.time_zone.clone(),
                s.path.clone(),
                if s.running {
                    "running".into()
                } else {
                    "paused".into()
                },
                j.revision.to_string(),
                fmt_time(j.next_fire_at),
            ]
        })
        .collect()
}

const JOB_HEADERS: [&str; 9] = [
    "JOB",
    "APP",
    "TYPE",
    "SCHEDULE",
    "TZ",
    "PATH",
    "STATE",
    "REV",
    "NEXT FIRE (UTC)",
];

async fn job(client: &Client, cmd: JobCmd, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        JobCmd::Apply { files } => {
            let documents = read_documents(&files)?;
            let resp: ApplyResponse = client
                .call(Op::JobApply, &ApplyRequest { documents })
                .await?;
            if json {
                print_json(&resp)?;
            } else {
                for r in &resp.results {
                    outln!(
                        "{} {} (revision {})",
                        r.job,
                        format!("{:?}", r.outcome).to_lowercase(),
                        r.revision
                    );
                }
            }
        }
        JobCmd::List { app, group } => {
            let jobs: Vec<JobView> = client
                .call(Op::JobList, &JobListRequest { app, group })
                .await?;
            if json {
                print_json(&jobs)?;
            } else {
                table(&JOB_HEADERS, job_rows(&jobs))?;
            }
        }
        JobCmd::History { job } => {
            let revisions: Vec<krest_schemas::api::JobRevision> =
                client.call(Op::JobHistory, &JobRequest::new(job)).await?;
            if json {
                print_json(&revisions)?;
            } else {
                table(
                    &[
                        "REV",
                        "WRITTEN (UTC)",
                        "OP",
                        "CRON",
                        "STATE",
                        "PATH",
                        "ARGS",
                    ],
                    revisions
                        .iter()
                        .map(|r| {
                            let s = r.spec.as_ref();
                            vec![
                                r.revision.to_string(),
                                fmt_time(Some(r.written_at)),
                                r.operation.clone(),
                                s.and_then(|s| s.cron.clone()).unwrap_or_else(|| "-".into()),
                                s.map_or("-", |s| if s.running { "running" } else { "paused" })
                                    .to_string(),
                                s.map_or_else(|| "-".into(), |s| s.path.clone()),
                                s.map_or_else(|| "-".into(), |s| s.args.to_string())
                                    .chars()
                                    .take(40)
                                    .collect(),
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        JobCmd::Get { job, revision } => {
            let view: JobView = client
                .call(Op::JobGet, &JobRequest { job, revision })
                .await?;
            if json {
                print_json(&view)?;
            } else {
                table(&JOB_HEADERS, job_rows(std::slice::from_ref(&view)))?;
                outln!();
                outln!("{}", serde_json::to_string_pretty(&view.spec)?);
            }
        }
        JobCmd::Pause { job } => job_change(client, Op::JobPause, job, "paused", json).await?,
        JobCmd::Resume { job } => job_change(client, Op::JobResume, job, "resumed", json).await?,
        JobCmd::Delete { job } => job_change(client, Op::JobDelete, job, "deleted", json).await?,
        JobCmd::Trigger {
            job,
            args,
            wait,
            wait_timeout,
        } => {
            let args = match args {
                None => None,
                Some(a) => Some(serde_json::from_str(&a).with_context(|| {
                    format!("--args must be JSON (quote strings: --args '\"text\"'); got `{a}`")
                })?),
            };
            let request_id = Some(crate::dispatch::request_id(chrono::Utc::now()));
            let resp: TriggerResponse = client
                .call(
                    Op::JobTrigger,
                    &TriggerRequest {
                        job,
                        args,
                        request_id,
                    },
                )
                .await?;
            if !wait {
                if json {
                    print_json(&resp)?;
                } else {
                    outln!(
                        "{} ({} shard{})",
                        resp.run_id,
                        resp.shard_total,
                        if resp.shard_total == 1 { "" } else { "s" }
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "{} dispatched; following it (ctrl-c stops following, not the run)",
                resp.run_id
            );
            let detail = follow(client, &resp.run_id, resp.shard_total, wait_timeout).await?;
            if json {
                print_json(&detail)?;
            } else {
                let r = &detail.run;
                outln!(
                    "{} {} ({}/{} shards succeeded{})",
                    r.run_id,
                    r.status.as_str(),
                    r.shards_succeeded,
                    r.shard_total,
                    r.error
                        .as_deref()
                        .map(|e| format!("; {e}"))
                        .unwrap_or_default()
                );
            }
            return Ok(if detail.run.status == RunStatus::Succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls a run until it ends, drawing its progress on stderr.
async fn follow(
    client: &Client,
    run_id: &str,
    shards: u32,
    timeout: Duration,
) -> anyhow::Result<RunDetail> {
    use std::io::IsTerminal as _;
    let tty = std::io::stderr().is_terminal();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let detail = match client
            .call::<_, RunDetail>(
                Op::RunsGet,
                &RunRequest {
                    run_id: run_id.to_string(),
                },
            )
            .await
        {
            Ok(d) => Some(d),
            // Not recorded yet.
            Err(ClientError::Api(e)) if e.code == krest_schemas::api::ErrorCode::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let (status, done, failed, total) =
            detail.as_ref().map_or(("PENDING", 0, 0, shards), |d| {
                (
                    d.run.status.as_str(),
                    d.run.shards_succeeded,
                    d.run.shards_failed,
                    d.run.shard_total.max(1),
                )
            });
        let width = 30usize;
        let filled = (done as usize * width) / total.max(1) as usize;
        let line = format!(
            "[{}{}] {done}/{total} shards {status}{}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        );
        if line != last {
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
            last = line;
        }
        if let Some(d) = detail.filter(|d| d.run.status.is_final()) {
            if tty {
                eprintln!();
            }
            return Ok(d);
        }
        if tokio::time::Instant::now() > deadline {
            if tty {
                eprintln!();
            }
            bail!("run {run_id} has not ended after {timeout:?}; it goes on (see `krest runs get {run_id}`)");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => bail!("stopped following {run_id}; the run goes on"),
        }
    }
}

async fn job_change(
    client: &Client,
    op: Op,
    job: String,
    verb: &str,
    json: bool,
) -> anyhow::Result<()> {
    let view: JobView = client.call(op, &JobRequest::new(job)).await?;
    if json {
        print_json(&view)?;
    } else {
        outln!("{} {verb} (revision {})", view.key, view.revision);
    }
    Ok(())
}

async fn runs(client: &Client, cmd: RunsCmd, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        RunsCmd::List { job, status, limit } => {
            let status = match status {
                None => None,
                Some(s) => Some(RunStatus::parse(&s).with_context(|| {
                    format!("unknown status `{s}`: use PENDING, RUNNING, SUCCEEDED or FAILED")
                })?),
            };
            let runs: Vec<RunSummary> = client
                .call(
                    Op::RunsList,
                    &RunsListRequest {
                        job,
                        status,
                        limit: Some(limit),
                    },
                )
                .await?;
            if json {
                print_json(&runs)?;
            } else {
                table(
                    &[
                        "RUN",
                        "STATUS",
                        "TRIGGER",
                        "SCHEDULED (UTC)",
                        "SHARDS",
                        "ATTEMPTS",
                        "FINISHED (UTC)",
                        "RESULT",
                    ],
                    runs.iter()
                        .map(|r| {
                            vec![
                                r.run_id.clone(),
                                r.status.as_str().to_string(),
                                r.trigger.map_or("-", |t| t.as_str()).to_string(),
                                fmt_time(r.scheduled_at),
                                format!("{}/{}", r.shards_succeeded, r.shard_total),
                                r.attempts.to_string(),
                                fmt_time(r.finished_at),
                                r.error
                                    .clone()
                                    .or_else(|| r.output.clone())
                                    .unwrap_or_default()
                                    .chars()
                                    .take(60)
                                    .collect(),
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        RunsCmd::Get { run_id } => {
            let d: RunDetail = client.call(Op::RunsGet, &RunRequest { run_id }).await?;
            if json {
                print_json(&d)?;
            } else {
                let r = &d.run;
                outln!("run:        {}", r.run_id);
                outln!(
                    "job:        {}.{} (app {})",
                    r.job_group,
                    r.job_name,
                    r.app_name
                );
                outln!("status:     {}", r.status.as_str());
                outln!(
                    "trigger:    {}{}",
                    r.trigger.map_or("-", |t| t.as_str()),
                    if r.misfired > 0 {
                        format!(" (stands for {} misfired fires)", r.misfired)
                    } else {
                        String::new()
                    }
                );
                outln!("scheduled:  {}", fmt_time(r.scheduled_at));
                outln!("dispatched: {}", fmt_time(r.dispatched_at));
                outln!("started:    {}", fmt_time(r.started_at));
                outln!("finished:   {}", fmt_time(r.finished_at));
                outln!(
                    "shards:     {} succeeded, {} failed, {} in all",
                    r.shards_succeeded,
                    r.shards_failed,
                    r.shard_total
                );
                if let Some(args) = &d.args {
                    outln!("args:       {args}");
                }
                for a in &d.attempts {
                    outln!();
                    outln!(
                        "shard {} attempt {}: {:?}{} on {} ({} → {})",
                        a.shard,
                        a.attempt,
                        a.status,
                        if a.will_retry { ", will retry" } else { "" },
                        a.worker.as_deref().unwrap_or("-"),
                        fmt_time(a.started_at),
                        fmt_time(a.finished_at)
                    );
                    if let Some(o) = &a.output {
                        outln!("  output: {o}");
                    }
                    if let Some(e) = &a.error {
                        outln!("  error:  {e}");
                    }
                    for l in &a.logs {
                        outln!(
                            "  {} {:<5} {}",
                            l.at.format("%H:%M:%S%.3f"),
                            l.level.as_str(),
                            l.line
                        );
                    }
                }
            }
        }
        RunsCmd::Cancel { run_id } => {
            let resp: krest_schemas::api::CancelResponse =
                client.call(Op::RunsCancel, &RunRequest { run_id }).await?;
            if json {
                print_json(&resp)?;
            } else {
                outln!(
                    "{} cancelling (was {}); the workers of {} were told",
                    resp.run_id,
                    resp.status_before.as_str(),
                    resp.app_name
                );
            }
        }
        RunsCmd::Watch { job } => {
            let subject = match &job {
                Some(j) => match j.split_once('.') {
                    Some((g, n)) => krest_schemas::names::events_subject(g, n),
                    None => bail!("--job takes `group.name` here"),
                },
                None => EVENTS_SUBJECTS.to_string(),
            };
            let mut sub = client
                .nats()
                .subscribe(subject)
                .await
                .map_err(|e| ClientError::Other(e.to_string()))?;
            eprintln!("following run events (ctrl-c to stop)");
            loop {
                let msg = tokio::select! {
                    m = sub.next() => match m { Some(m) => m, None => break },
                    _ = tokio::signal::ctrl_c() => break,
                };
                let Ok(event) = serde_json::from_slice::<RunEvent>(&msg.payload) else {
                    continue;
                };
                if json {
                    outln!("{}", serde_json::to_string(&event)?);
                    continue;
                }
                let line = match &event {
                    RunEvent::Dispatched(d) => format!(
                        "{} {:<10} {} {} shard(s) {}{}",
                        d.dispatched_at.format("%H:%M:%S%.3f"),
                        "dispatched",
                        d.run_id,
                        d.shard_total,
                        d.trigger.as_str(),
                        if d.misfired > 0 {
                            format!(" (+{} misfired)", d.misfired)
                        } else {
                            String::new()
                        }
                    ),
                    RunEvent::Skipped(k) => format!(
                        "{} {:<10} {} {}",
                        k.at.format("%H:%M:%S%.3f"),
                        "skipped",
                        k.run_id,
                        k.reason
                    ),
                    RunEvent::Started(s) => format!(
                        "{} {:<10} {} shard {}/{} attempt {} on {}",
                        s.at.format("%H:%M:%S%.3f"),
                        "started",
                        s.run_id,
                        s.shard + 1,
                        s.shard_total,
                        s.attempt,
                        s.worker
                    ),
                    RunEvent::Log(l) => format!(
                        "{} {:<10} {} shard {} | {}",
                        l.at.format("%H:%M:%S%.3f"),
                        "log",
                        l.run_id,
                        l.shard + 1,
                        l.line
                    ),
                    RunEvent::Finished(f) => format!(
                        "{} {:<10} {} shard {}/{} attempt {} on {}: {:?}{} {}",
                        f.at.format("%H:%M:%S%.3f"),
                        "finished",
                        f.run_id,
                        f.shard + 1,
                        f.shard_total,
                        f.attempt,
                        f.worker,
                        f.outcome,
                        if f.will_retry { " (will retry)" } else { "" },
                        f.error
                            .clone()
                            .or_else(|| f.output.clone())
                            .unwrap_or_default()
                    ),
                };
                outln!("{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints an error for humans, with every invalid document's problems.
pub fn report(err: &anyhow::Error) {
    if let Some(ClientError::Api(api)) = err.downcast_ref::<ClientError>() {
        eprintln!("error: {}", api.message);
        for doc in &api.invalid {
            let name = doc.job.as_deref().unwrap_or("?");
            eprintln!("  document {} ({name}):", doc.index);
            for p in &doc.problems {
                eprintln!("    - {p}");
            }
        }
        return;
    }
    eprintln!("error: {err:#}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["krest", "job", "apply", "-f", "a.json", "-f", "b.json"]).unwrap();
        assert!(
            matches!(cli.command, Command::Job(JobCmd::Apply { ref files }) if files.len() == 2)
        );
    }
}
