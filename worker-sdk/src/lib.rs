//! Krest worker SDK: run Krest jobs in your service.
//!
//! An app registers handlers by name (the job's `path`), connects to NATS and works:
//!
//! ```no_run
//! use krest_worker::{JobContext, JobError, Worker};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), krest_worker::Error> {
//!     Worker::builder("demo-spring-krest-job")
//!         .nats_url("nats://127.0.0.1:4222")
//!         .weight(2) // takes twice the share of a weight-1 instance
//!         .handler("service/demo-krestjob-post", |ctx: JobContext| async move {
//!             ctx.log(format!("args: {}", ctx.args()));
//!             Ok("done")
//!         })
//!         .handler("service/demo-krestjob/sharding", |ctx: JobContext| async move {
//!             let item = ctx.shard_item().ok_or_else(|| JobError::fatal("not a sharded run"))?;
//!             ctx.log(format!("shard {}/{}: {item}", ctx.shard_index() + 1, ctx.shard_total()));
//!             Ok(())
//!         })
//!         .build()?
//!         .run(async { tokio::signal::ctrl_c().await.ok(); })
//!         .await
//! }
//! ```
//!
//! What the worker does for you:
//! - **Heartbeats** into the `krest-workers` bucket (app, instance, handlers, weight, slots,
//!   runs in flight, version, host) every 3 s; the entry expires when the process dies.
//! - **Weighted consumer group**: all instances of an app share one durable pull consumer; each
//!   holds at most `weight × slots` runs at once, so busy instances share work by weight.
//! - **Handlers** get a [`JobContext`]: run id (an idempotency key), args, shard index/total/item,
//!   attempt, scheduled time, a cancellation signal and [`JobContext::log`], whose lines are
//!   stored with the run.
//! - **Results**: success acks the run; a failure is retried through redelivery after a
//!   backoff ([`Backoff`]) until the job's `retryTimes` are used, then the run is FAILED. A
//!   handler panic is a failure. [`JobError::fatal`] fails at once. A run for a handler this
//!   instance lacks fails with an error naming it (and is retried, possibly elsewhere).
//! - **Long handlers** keep their run: progress acks are sent every third of the ack wait.
//! - **Graceful shutdown** ([`Worker::run`]'s future, or [`RunningWorker::stop`]): stop pulling,
//!   let running handlers finish up to a deadline, cancel and hand back the rest, remove the
//!   heartbeat.
//!
//! The wire protocol is documented in `docs/protocol.md`; a worker in another language can be
//! written from it.

mod context;
mod events;
#[cfg(feature = "http")]
pub mod http;
mod options;
mod worker;

pub use context::{JobContext, JobError, Output, MAX_LOG_LINE, MAX_OUTPUT};
pub use krest_schemas::{LogLevel, RunMessage, ShardInfo, Trigger};
pub use options::{Backoff, WorkerBuilder};
pub use worker::{RunningWorker, Worker, MAX_DELIVER};

/// Completes on SIGTERM or ctrl-c (SIGINT): pass it to [`Worker::run`] for the usual
/// graceful shutdown of a service.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Errors of the worker SDK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The builder's settings are unusable.
    #[error("invalid worker configuration: {0}")]
    Config(String),
    /// Something inside the worker failed.
    #[error("worker failure: {0}")]
    Internal(String),
}
