//! Stage one of the command line: the flags as clap parses them, validated but not resolved
//! (the commands turn them into requests).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Parses a point in time flag: an RFC 3339 time or a period back from now
/// ([`krest_schemas::parse_time_or_ago`]).
pub fn parse_time_or_ago(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    krest_schemas::parse_time_or_ago(s, chrono::Utc::now())
}

/// Parses a duration flag: `500ms`, `3s`, `2m`, `1h30m`, `1d` or a bare number of seconds
/// (the same syntax as job definitions).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    krest_schemas::parse_duration(s)
}

/// Parses `--dispatch-ahead`: a duration of at most what a worker holds a run
/// ([`krest_schemas::messages::MAX_HOLD`]).
pub fn parse_dispatch_ahead(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    let max = krest_schemas::messages::MAX_HOLD;
    if d > max {
        return Err(format!(
            "at most {}s: workers hold a run at most that long before its time",
            max.as_secs()
        ));
    }
    Ok(d)
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
}

/// `krest --version`: the crate version and the git revision it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("KREST_GIT_REVISION"),
    ")"
);

/// Krest: a distributed job scheduler on NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "krest", version = VERSION)]
pub struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// NATS credentials and TLS (`krest_worker::nats_args`).
    #[command(flatten)]
    pub nats: krest_worker::nats_args::NatsArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table", global = true)]
    pub output: Format,
    /// How long to wait for NATS and for a scheduler node's answer.
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    pub timeout: Duration,
    /// Log lines of `krest scheduler` and `krest worker` on stderr: `text` (coloured only on a
    /// terminal) or `json` (one object per line, for log collectors).
    #[arg(long, env = "KREST_LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: krest_worker::logging::LogFormat,
    /// Read settings from this TOML file (after flags and environment variables; see
    /// docs/config.md).
    #[arg(long, env = "KREST_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
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
    /// Print a shell completion script (`krest completion bash > /etc/bash_completion.d/krest`).
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page, in roff (`krest man | man -l -`).
    Man,
    /// Probe a scheduler node's HTTP endpoint (for container health checks): exits 0 when it
    /// answers 200, 1 otherwise, printing the answer.
    Health(HealthArgs),
}

/// `krest health` flags.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The node's HTTP address (its `--http`).
    #[arg(long, env = "KREST_HTTP", default_value = "127.0.0.1:8722")]
    pub http: String,
    /// Ask `/readyz` (connected, database writable, jobs loaded, recorder current) instead of `/healthz`
    /// (the process serves).
    #[arg(long)]
    pub ready: bool,
}

/// `krest dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// List the newest parked messages.
    List {
        /// At most this many (0: all).
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

/// `krest scheduler` flags.
#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Database URL: sqlite://PATH (a file per node, created if missing) or
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (one database several nodes may share).
    #[arg(
        long,
        env = "KREST_DB",
        default_value = "sqlite://krest.db",
        hide_env_values = true
    )]
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
    /// Dispatch fires of jobs with overlap policy ALLOW this long before their time; workers
    /// hold them and start the handler on time, so a burst of fires is not late by the time it
    /// takes to publish (0 dispatches at the fire time; at most 10s). Pausing or deleting a job
    /// cancels what was dispatched ahead; an edit applies from the first fire not yet dispatched.
    #[arg(long, env = "KREST_DISPATCH_AHEAD", default_value = "1s", value_parser = parse_dispatch_ahead)]
    pub dispatch_ahead: Duration,
    /// Replicas of streams and buckets when creating them (default: 1, or the NATS cluster's
    /// size up to 3).
    #[arg(long, env = "KREST_REPLICAS")]
    pub replicas: Option<usize>,
    /// Recorder lag (age of the oldest event not recorded yet) beyond which /readyz reports the
    /// node not ready.
    #[arg(long, env = "KREST_RECORDER_MAX_LAG", default_value = "30s", value_parser = parse_duration)]
    pub recorder_max_lag: Duration,
    /// Delete ended runs (with attempts and logs) this many days after they ended.
    #[arg(long, env = "KREST_KEEP_DAYS", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_days: Option<u32>,
    /// Keep at most this many runs per job (older ended ones are deleted).
    #[arg(long, env = "KREST_KEEP_RUNS", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_runs: Option<u32>,
    /// Address of the HTTP endpoint: /healthz, /readyz, /metrics, the API and the web console
    /// (`off` to disable; port 0 picks one).
    #[arg(long, env = "KREST_HTTP", default_value = "127.0.0.1:8722", value_parser = parse_http_addr)]
    pub http: HttpAddr,
    /// The HTTP API's access (its own block: other flag groups are flattened beside it).
    #[command(flatten)]
    pub api: ApiAccessArgs,
    /// Print the effective configuration (flags, environment, config file, defaults; secrets
    /// redacted) as TOML with where each value came from, and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Who may use the HTTP API and console (`/api/v1`, on the `--http` address).
#[derive(Debug, Args)]
pub struct ApiAccessArgs {
    /// Bearer token that may read and write through the HTTP API (without it, nothing can
    /// write over HTTP).
    #[arg(long, env = "KREST_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Bearer token that may only read.
    #[arg(long, env = "KREST_API_READ_TOKEN", hide_env_values = true)]
    pub api_read_token: Option<String>,
    /// Let anyone who reaches the HTTP address read (jobs, runs, logs, workers) without a
    /// token.
    #[arg(long, env = "KREST_API_ANONYMOUS_READ")]
    pub api_anonymous_read: bool,
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
        /// Check the documents and show what would change (created, updated with each changed
        /// field before and after, unchanged) without applying anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Edit a job's definition in $VISUAL or $EDITOR (default vi); it is checked and applied
    /// when the editor exits, and kept in a file when it is invalid.
    Edit {
        /// The job (`group.name`, or a name unique across groups).
        job: String,
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
    /// How a job's recent runs went: the last run, success rate and p50/p95 durations.
    Stats {
        /// The job (`group.name` also finds deleted jobs).
        job: String,
        /// How many of the newest ended runs to look at.
        #[arg(long, default_value_t = 100)]
        recent: u32,
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
        /// Only runs in this status: PENDING, RUNNING, SUCCEEDED, FAILED, TIMED_OUT, SKIPPED or
        /// CANCELLED.
        #[arg(long)]
        status: Option<String>,
        /// At most this many, newest first (0: all).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Show times in this time zone (an IANA name such as `Europe/Paris`) instead of UTC.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// Only runs of this app.
        #[arg(long)]
        app: Option<String>,
        /// Only runs scheduled since: an RFC 3339 time or a period back (`1h`, `2d`).
        #[arg(long, value_parser = parse_time_or_ago)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only runs scheduled before: an RFC 3339 time or a period back (`30m`).
        #[arg(long, value_parser = parse_time_or_ago)]
        until: Option<chrono::DateTime<chrono::Utc>>,
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
        /// Only events of this job.
        #[arg(long)]
        job: Option<String>,
        /// First replay the events of this last period (`10m`, `1h`) from the events stream.
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
    },
    /// Print a run's log lines (every shard and attempt, in order); with --follow, then the
    /// new ones live until the run ends.
    Logs {
        /// The run id.
        run_id: String,
        /// Keep printing lines as they are logged, until the run ends.
        #[arg(short, long)]
        follow: bool,
        /// Only this shard's lines (shards count from 0).
        #[arg(long)]
        shard: Option<u32>,
    },
}

/// `krest workers …`
#[derive(Debug, Subcommand)]
pub enum WorkersCmd {
    /// List live worker instances.
    List {
        /// Only instances of this app.
        #[arg(long)]
        app: Option<String>,
    },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
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
            matches!(cli.command, Command::Job(JobCmd::Apply { ref files, dry_run: false }) if files.len() == 2)
        );
    }
}
