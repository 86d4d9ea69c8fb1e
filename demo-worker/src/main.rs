//! Demo worker: the Krest-Job seed's demo app (`demo-spring-krest-job`) with its two handlers,
//! `service/demo-krestjob-post` (NORMAL) and `service/demo-krestjob/sharding` (SHARDING).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use krest_demo_worker::{register, DemoOptions, APP};
use krest_worker::nats::NatsConfig;
use krest_worker::Worker;

/// Runs the seed's demo handlers as a Krest worker.
#[derive(Debug, Parser)]
#[command(name = "krest-demo-worker", version, about)]
struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Relative capacity of this instance.
    #[arg(long, env = "KREST_WEIGHT", default_value_t = 1)]
    weight: u32,
    /// Concurrent runs per unit of weight.
    #[arg(long, env = "KREST_SLOTS", default_value_t = 2)]
    slots: u32,
    /// Instance id (default: host name, pid and a random suffix).
    #[arg(long, env = "KREST_INSTANCE")]
    instance: Option<String>,
    /// App name (the seed's appName).
    #[arg(long, env = "KREST_APP", default_value = APP)]
    app: String,
    /// Simulated work per shard, in milliseconds.
    #[arg(long, env = "KREST_WORK_MS", default_value_t = 300)]
    work_ms: u64,
    /// Log lines on stderr: `text` or `json` (one object per line).
    #[arg(long, env = "KREST_LOG_FORMAT", default_value = "text")]
    log_format: krest_worker::logging::LogFormat,
    /// Append `run_id shard attempt instance` per execution to this file.
    #[arg(long, env = "KREST_JOURNAL")]
    journal: Option<PathBuf>,
    /// NATS login, like the `nats` CLI's flags and variables.
    #[command(flatten)]
    login: Login,
}

/// NATS credentials and TLS (the same flags as `krest`'s).
#[derive(clap::Args)]
struct Login {
    /// NATS user name (with --password).
    #[arg(long, env = "NATS_USER")]
    user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// NATS authentication token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// NATS credentials file (user JWT and seed).
    #[arg(long, env = "NATS_CREDS")]
    creds: Option<PathBuf>,
    /// NATS nkey: a file holding the user seed, or the seed itself.
    #[arg(long, env = "NATS_NKEY", hide_env_values = true)]
    nkey: Option<String>,
    /// TLS client certificate (PEM).
    #[arg(long, env = "NATS_CERT")]
    tlscert: Option<PathBuf>,
    /// TLS client key (PEM).
    #[arg(long, env = "NATS_KEY")]
    tlskey: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify the server with.
    #[arg(long, env = "NATS_CA")]
    tlsca: Option<PathBuf>,
    /// Prefix of reply subjects (default `_INBOX_<app>`).
    #[arg(long, env = "NATS_INBOX_PREFIX")]
    inbox_prefix: Option<String>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.config(""), f)
    }
}

impl Login {
    fn config(&self, url: &str) -> NatsConfig {
        let set = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        let path = |v: &Option<PathBuf>| v.clone().filter(|v| !v.as_os_str().is_empty());
        NatsConfig {
            url: url.to_string(),
            user: set(&self.user),
            password: set(&self.password),
            token: set(&self.token),
            creds: path(&self.creds),
            nkey: set(&self.nkey),
            tls_cert: path(&self.tlscert),
            tls_key: path(&self.tlskey),
            tls_ca: path(&self.tlsca),
            inbox_prefix: set(&self.inbox_prefix),
            name: String::new(),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    krest_worker::logging::init(args.log_format, "info,async_nats=warn");
    let mut builder = Worker::builder(&args.app)
        .nats(args.login.config(&args.nats_url))
        .weight(args.weight)
        .slots(args.slots)
        .version(env!("CARGO_PKG_VERSION"));
    if let Some(id) = args.instance {
        builder = builder.instance(id);
    }
    let opts = DemoOptions {
        work: Duration::from_millis(args.work_ms),
        journal: args.journal,
    };
    let worker = register(builder, opts)
        .build()
        .context("bad worker configuration")?;
    tracing::info!(instance = worker.instance(), "demo worker starting");
    worker
        .run(krest_worker::shutdown_signal())
        .await
        .context("worker failed")?;
    Ok(())
}
