//! Demo worker: the Krest-Job seed's demo app (`demo-spring-krest-job`) with its two handlers,
//! `service/demo-krestjob-post` (NORMAL) and `service/demo-krestjob/sharding` (SHARDING).

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use krest_worker::{JobContext, JobError, Worker};

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
    #[arg(long, env = "KREST_APP", default_value = "demo-spring-krest-job")]
    app: String,
    /// Simulated work per shard, in milliseconds.
    #[arg(long, env = "KREST_WORK_MS", default_value_t = 300)]
    work_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KREST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let work = Duration::from_millis(args.work_ms);
    let mut builder = Worker::builder(&args.app)
        .nats_url(&args.nats_url)
        .weight(args.weight)
        .slots(args.slots)
        .version(env!("CARGO_PKG_VERSION"))
        .handler(
            "service/demo-krestjob-post",
            move |ctx: JobContext| async move {
                ctx.log(format!(
                    "demo-krestjob-post received {} (attempt {})",
                    ctx.args(),
                    ctx.attempt()
                ));
                tokio::time::sleep(work / 3).await;
                let echo = ctx.args().as_str().unwrap_or("").to_string();
                Ok(format!("post ok: {echo}"))
            },
        )
        .handler(
            "service/demo-krestjob/sharding",
            move |ctx: JobContext| async move {
                let item = ctx
                    .shard_item()
                    .cloned()
                    .ok_or_else(|| JobError::fatal("this handler expects a SHARDING job"))?;
                ctx.log(format!(
                    "shard {}/{} processing item {item}",
                    ctx.shard_index() + 1,
                    ctx.shard_total()
                ));
                tokio::select! {
                    _ = tokio::time::sleep(work) => {}
                    _ = ctx.cancelled() => return Err(JobError::new("cancelled")),
                }
                Ok(format!(
                    "shard {}/{} done",
                    ctx.shard_index() + 1,
                    ctx.shard_total()
                ))
            },
        );
    if let Some(id) = args.instance {
        builder = builder.instance(id);
    }
    let worker = builder.build().context("bad worker configuration")?;
    tracing::info!(instance = worker.instance(), "demo worker starting");
    worker
        .run(krest_worker::shutdown_signal())
        .await
        .context("worker failed")?;
    Ok(())
}
