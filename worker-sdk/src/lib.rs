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
//! - **Logs in to NATS** with what you give it ([`WorkerBuilder::user_and_password`],
//!   [`WorkerBuilder::token`], [`WorkerBuilder::credentials_file`], [`WorkerBuilder::nkey`],
//!   TLS with [`WorkerBuilder::tls_client_cert`] and [`WorkerBuilder::tls_ca`], or all at once
//!   from the `NATS_*` environment with [`nats::NatsConfig::from_env`]); a refused login ends
//!   [`Worker::run`] at once with [`ErrorKind::Config`] saying what to check. Replies use the
//!   prefix `_INBOX_<app>`, which the worker role of `nats/accounts.conf` allows
//!   (docs/security.md).
//! - **Waits for Krest** at start: NATS (reconnecting), then the streams `KREST_WORK` and
//!   `KREST_EVENTS` and the buckets `krest-workers` and `krest-cancels` that scheduler nodes
//!   create, then its two consumers; meanwhile it logs a warning `waiting for <what>` with the
//!   reason (first failure and every tenth), retrying with [`Backoff::RECONNECT`].
//! - **Heartbeats** into the `krest-workers` bucket (app, instance, handlers, weight, slots,
//!   runs in flight, version, host) every 3 s; the entry expires when the process dies.
//! - **Weighted consumer group**: all instances of an app share one durable pull consumer; each
//!   holds at most `weight × slots` runs at once, so busy instances share work by weight. Runs
//!   the leader addresses to one instance come from that instance's own consumer.
//! - **Runs dispatched ahead** of their fire time (`notBefore`) are held until then and started
//!   on time, never earlier. Held runs do not take slots: a consumer holds as many as it
//!   started in the last one to two seconds (at least `4 × weight × slots`, at most 16,384 runs
//!   and 64 MiB of messages), so a second's burst is held whole. While runs are coming due,
//!   the results of runs that just ended are reported after the due ones have started (at most
//!   50 ms later), so a burst's starts are not slowed by reports.
//! - **Handlers** get a [`JobContext`]: run id (an idempotency key), args, shard index/total/item,
//!   attempt, scheduled time, a cancellation signal and [`JobContext::log`], whose lines are
//!   stored with the run.
//! - **Results**: success acks the run; a failure or a timeout (`timeoutSecs`) is retried
//!   after a backoff (the job's `retryBackoff`, else [`WorkerBuilder::retry_backoff`]) until
//!   the job's `retryTimes` are used, then the run ends FAILED or TIMED_OUT. Runs of the app's
//!   queue are retried by redelivery; runs addressed to this instance are handed to the
//!   leader's router, which prefers another instance (BROADCAST shards stay here). A handler
//!   panic is a failure. [`JobError::fatal`] fails at once. A cancelled run (`krest runs
//!   cancel`, overlap REPLACE) ends CANCELLED, never retried; one cancelled before it arrives
//!   (its marker in `krest-cancels`) is not executed. A run for a handler this instance lacks
//!   fails with an error naming it (and is retried, possibly elsewhere). Every attempt's
//!   result is stored before the run message is answered.
//! - **Long handlers** keep their run: progress acks are sent every third of the ack wait of
//!   the consumer the run came from (as the server reports it: an existing consumer keeps the
//!   ack wait it was created with).
//! - **Graceful shutdown** ([`Worker::run`]'s future, or [`RunningWorker::stop`]): stop pulling
//!   (runs still arriving on the open pull request are read and handed back unexecuted), keep
//!   heartbeating while running handlers finish up to a deadline, cancel the rest and hand them
//!   back (their attempt reported first), remove the heartbeat.
//!
//! Errors have kinds ([`Error::kind`], [`ErrorKind`]): decide by kind, not by message.
//!
//! The wire protocol is documented in `docs/protocol.md`; a worker in another language can be
//! written from it.
//!
//! # Modules
//!
//! Dependencies go one way, from the runtime down to settings and pure logic; nothing depends
//! on `worker`:
//!
//! ```text
//! worker    Worker, WorkerBuilder::build; start, heartbeat, pull loops, shutdown
//! ├─▶ attempt   one run message: execute, decide, report, acknowledge
//! │   └─▶ decide    pure: how it ended + the run's facts → outcome, retry, texts, reply
//! ├─▶ options   WorkerBuilder's settings → a checked Config (knows nothing of the runtime)
//! ├─▶ context   JobContext, JobError, Output, the handler type
//! ├─▶ events    publishing run events; `store`, the one confirmed JetStream publish
//! └─▶ error     Error<Kind> and the kinds
//! ```
//!
//! Below `worker` and `attempt`: `decide` → `context`; `options` → `context`, `error`;
//! `context` → `events` → `error`. `options` turns a [`WorkerBuilder`] into a `Config` that
//! `worker` consumes, and [`WorkerBuilder::build`] is defined in `worker`, next to [`Worker`].
//! `decide`, `options` and `error` do no IO.

mod attempt;
mod context;
mod decide;
mod due;
mod error;
mod events;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "logging")]
pub mod logging;
mod markers;
pub mod nats;
#[cfg(feature = "cli")]
pub mod nats_args;
mod options;
mod pull;
mod worker;

pub use context::{
    JobContext, JobError, Output, MAX_LOG_BYTES_PER_ATTEMPT, MAX_LOG_LINE,
    MAX_LOG_LINES_PER_ATTEMPT, MAX_OUTPUT,
};
pub use error::{Error, ErrorKind};
pub use krest_schemas::{LogLevel, RunMessage, ShardInfo, Trigger};
pub use options::{Backoff, WorkerBuilder};
pub use pull::MAX_DELIVER;
pub use worker::{RunningWorker, Worker};

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
