//! The Krest-Job seed's demo app (`demo-spring-krest-job`): its two handlers, registered on a
//! [`WorkerBuilder`] by [`register`]. Used by the `krest-demo-worker` binary and by
//! `krest worker demo`.
//!
//! - `service/demo-krestjob-post` (NORMAL): logs its args, returns `post ok: <args>`.
//! - `service/demo-krestjob/sharding` (SHARDING): logs its shard, works for `work` (honouring
//!   cancellation), returns `shard i of n done` (shards count from 0, as everywhere in Krest).
//! - `service/demo-krestjob/flaky` (not in the seed; `examples/demo/flaky.json` and
//!   `broken.json` use it): fails its first `failures` attempts (from its args, default 1),
//!   then succeeds — so the demo shows retries, and FAILED runs when retries run out.
//! - `service/demo-krestjob/crash` (not in the seed): logs a line, then panics — a handler
//!   bug. The SDK records the attempt as FAILED (`handler panicked: …`), retries it as the job
//!   says, and the worker goes on running other runs. The conformance suite uses it.
//!
//! With a journal file set, every handler execution appends `run_id shard attempt instance`
//! as one line — an audit trail that tells executions apart even when a run is executed
//! twice (which the run history, keyed by attempt, cannot show).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use krest_worker::{JobContext, JobError, WorkerBuilder};

/// The seed's app name.
pub const APP: &str = "demo-spring-krest-job";
/// Handler of the seed's NORMAL job.
pub const POST_HANDLER: &str = "service/demo-krestjob-post";
/// Handler of the seed's SHARDING job.
pub const SHARDING_HANDLER: &str = "service/demo-krestjob/sharding";
/// Handler that fails its first attempts (the demo's retries and failures).
pub const FLAKY_HANDLER: &str = "service/demo-krestjob/flaky";
/// Handler that panics (a handler bug: the attempt fails, the worker survives).
pub const CRASH_HANDLER: &str = "service/demo-krestjob/crash";

/// How the demo handlers behave.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated work per shard (a third of it for the NORMAL job).
    pub work: Duration,
    /// Append one line per execution to this file.
    pub journal: Option<PathBuf>,
}

fn journal(path: &Option<PathBuf>, ctx: &JobContext) -> Result<(), JobError> {
    let Some(path) = path else { return Ok(()) };
    let line = format!(
        "{} {} {} {}\n",
        ctx.run_id(),
        ctx.shard_index(),
        ctx.attempt(),
        ctx.worker()
    );
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| JobError::new(format!("cannot write the journal {}: {e}", path.display())))
}

/// Registers the demo handlers on `builder`.
pub fn register(builder: WorkerBuilder, opts: DemoOptions) -> WorkerBuilder {
    let opts = Arc::new(opts);
    let post = opts.clone();
    builder
        .handler(POST_HANDLER, move |ctx: JobContext| {
            let opts = post.clone();
            async move {
                journal(&opts.journal, &ctx)?;
                ctx.log(format!(
                    "demo-krestjob-post received {} (attempt {})",
                    ctx.args(),
                    ctx.attempt()
                ));
                tokio::time::sleep(opts.work / 3).await;
                Ok(format!("post ok: {}", ctx.args().as_str().unwrap_or("")))
            }
        })
        .handler(SHARDING_HANDLER, move |ctx: JobContext| {
            let opts = opts.clone();
            async move {
                journal(&opts.journal, &ctx)?;
                let item = ctx
                    .shard_item()
                    .cloned()
                    .ok_or_else(|| JobError::fatal("this handler expects a SHARDING job"))?;
                ctx.log(format!(
                    "shard {} of {} processing item {item}",
                    ctx.shard_index(),
                    ctx.shard_total()
                ));
                tokio::select! {
                    _ = tokio::time::sleep(opts.work) => {}
                    _ = ctx.cancelled() => return Err(JobError::new("cancelled")),
                }
                Ok(format!(
                    "shard {} of {} done",
                    ctx.shard_index(),
                    ctx.shard_total()
                ))
            }
        })
        .handler(FLAKY_HANDLER, |ctx: JobContext| async move {
            let failures = ctx
                .args()
                .get("failures")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(1);
            if u64::from(ctx.attempt()) <= failures {
                ctx.log(format!(
                    "attempt {} of a flaky call: the upstream answered 503",
                    ctx.attempt()
                ));
                return Err(JobError::new(format!(
                    "upstream unavailable (attempt {}; this job fails its first {failures})",
                    ctx.attempt()
                )));
            }
            Ok(format!("succeeded at attempt {}", ctx.attempt()))
        })
        .handler(CRASH_HANDLER, |ctx: JobContext| async move {
            ctx.log(format!("attempt {}: about to hit a bug", ctx.attempt()));
            crash(ctx.attempt())
        })
}

/// The crash handler's bug: a panic, as an indexing or `unwrap` bug would raise.
fn crash(attempt: u32) -> Result<String, JobError> {
    panic!("demo crash at attempt {attempt}")
}
