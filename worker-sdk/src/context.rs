//! What a handler receives ([`JobContext`]) and returns ([`Output`] or [`JobError`]), and the
//! type-erased handler the worker stores ([`HandlerFn`]).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use krest_schemas::{LogLevel, LogLine, RunEvent, RunMessage, ShardInfo, Trigger};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::events::{EventSink, StartReport};

/// What a registered handler returns, boxed.
pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Output, JobError>> + Send>>;
/// A registered handler (see [`crate::WorkerBuilder::handler`]).
pub(crate) type HandlerFn = Arc<dyn Fn(JobContext) -> HandlerFuture + Send + Sync>;

pub use krest_schemas::messages::{
    MAX_LOG_BYTES_PER_ATTEMPT, MAX_LOG_LINE, MAX_LOG_LINES_PER_ATTEMPT,
};
/// Longest output or error text stored with an attempt, in bytes; a longer text is cut on a
/// character boundary and ends in `...`.
pub const MAX_OUTPUT: usize = 16 * 1024;

/// Everything a handler knows about the run it executes. Cheap to clone.
#[derive(Clone)]
pub struct JobContext {
    inner: Arc<Inner>,
}

struct Inner {
    run: RunMessage,
    attempt: u32,
    worker: String,
    cancel: CancellationToken,
    log_seq: AtomicU32,
    /// Bytes of the lines sent so far.
    log_bytes: std::sync::atomic::AtomicUsize,
    events: EventSink,
    /// The attempt's `started` event, sent before its first log line at the latest.
    start: Arc<StartReport>,
}

impl fmt::Debug for JobContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("run_id", &self.inner.run.run.run_id)
            .field("shard", &self.inner.run.shard_index())
            .field("attempt", &self.inner.attempt)
            .finish_non_exhaustive()
    }
}

impl JobContext {
    pub(crate) fn new(
        run: RunMessage,
        attempt: u32,
        worker: String,
        cancel: CancellationToken,
        events: EventSink,
        start: Arc<StartReport>,
    ) -> JobContext {
        JobContext {
            inner: Arc::new(Inner {
                run,
                attempt,
                worker,
                cancel,
                log_seq: AtomicU32::new(0),
                log_bytes: std::sync::atomic::AtomicUsize::new(0),
                events,
                start,
            }),
        }
    }

    /// The run id: stable across attempts and shards, so use it as an idempotency key.
    pub fn run_id(&self) -> &str {
        &self.inner.run.run.run_id
    }

    /// The job's group.
    pub fn job_group(&self) -> &str {
        &self.inner.run.run.job_group
    }

    /// The job's name.
    pub fn job_name(&self) -> &str {
        &self.inner.run.run.job_name
    }

    /// The handler name this run was addressed to.
    pub fn path(&self) -> &str {
        &self.inner.run.path
    }

    /// The job's arguments (for SHARDING jobs, the whole array; see [`JobContext::shard_item`]).
    pub fn args(&self) -> &Value {
        &self.inner.run.args
    }

    /// Shard index, total and item, for SHARDING runs.
    pub fn shard(&self) -> Option<&ShardInfo> {
        self.inner.run.shard.as_ref()
    }

    /// 0-based shard index (0 for unsharded runs).
    pub fn shard_index(&self) -> u32 {
        self.inner.run.shard_index()
    }

    /// Number of shards (1 for unsharded runs).
    pub fn shard_total(&self) -> u32 {
        self.inner.run.shard_total()
    }

    /// This shard's element of `args`, for SHARDING runs.
    pub fn shard_item(&self) -> Option<&Value> {
        self.inner.run.shard.as_ref().map(|s| &s.item)
    }

    /// 1-based attempt number (earlier attempts of the run on any instance count). It can
    /// exceed [`JobContext::max_attempts`]: a run held by a worker that died, or handed back
    /// by one shutting down, is delivered again whatever its count.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// The W3C `traceparent` of this attempt: the run's trace (its id is a function of the run
    /// id, the same on every node and worker) with this attempt's span. Pass it on to what the
    /// handler calls (the HTTP executor sends it as the `traceparent` header) to join the run's
    /// trace; Krest sends it on the attempt's events.
    pub fn traceparent(&self) -> String {
        krest_schemas::trace::attempt_traceparent(
            &self.inner.run.run.run_id,
            self.inner.run.shard_index(),
            self.inner.attempt,
        )
    }

    /// The run's trace id (32 hex digits), as in [`JobContext::traceparent`].
    pub fn trace_id(&self) -> String {
        krest_schemas::trace::trace_id(&self.inner.run.run.run_id)
    }

    /// Attempts allowed in all (`retryTimes + 1`).
    pub fn max_attempts(&self) -> u32 {
        self.inner.run.retry_times.saturating_add(1)
    }

    /// The fire time the run belongs to.
    pub fn scheduled_at(&self) -> DateTime<Utc> {
        self.inner.run.scheduled_at
    }

    /// Why the run exists.
    pub fn trigger(&self) -> Trigger {
        self.inner.run.trigger
    }

    /// This worker instance's id.
    pub fn worker(&self) -> &str {
        &self.inner.worker
    }

    /// The whole run message.
    pub fn run(&self) -> &RunMessage {
        &self.inner.run
    }

    /// Whether the handler has been asked to stop: the run was cancelled, the job's
    /// `timeoutSecs` passed, or the worker's shutdown deadline passed. A handler that does not
    /// return within the worker's cancel grace ([`crate::WorkerBuilder::cancel_grace`]) is
    /// aborted.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Completes when the handler is asked to stop (see [`JobContext::is_cancelled`]);
    /// `select!` on it in long loops.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await;
    }

    /// Logs a line into the run's history (INFO).
    pub fn log(&self, line: impl Into<String>) {
        self.log_at(LogLevel::Info, line);
    }

    /// Logs a WARN line into the run's history.
    pub fn warn(&self, line: impl Into<String>) {
        self.log_at(LogLevel::Warn, line);
    }

    /// Logs an ERROR line into the run's history.
    pub fn error(&self, line: impl Into<String>) {
        self.log_at(LogLevel::Error, line);
    }

    /// Logs a line at `level` into the run's history. Lines are sent in order, without waiting;
    /// they are stored before the attempt's result. The userinfo of URLs in the line is stored
    /// as `<redacted>` (`krest_schemas::redact::text`).
    ///
    /// An attempt keeps at most [`MAX_LOG_LINES_PER_ATTEMPT`] lines and
    /// [`MAX_LOG_BYTES_PER_ATTEMPT`] bytes: the first line past either limit is replaced by a
    /// WARN marker saying the log was cut, and later lines are dropped.
    pub fn log_at(&self, level: LogLevel, line: impl Into<String>) {
        let inner = &self.inner;
        if inner.log_seq.load(Ordering::Relaxed) > MAX_LOG_LINES_PER_ATTEMPT {
            return;
        }
        let line = truncate(
            krest_schemas::redact::text(&line.into()).into_owned(),
            MAX_LOG_LINE,
        );
        let bytes = inner.log_bytes.fetch_add(line.len(), Ordering::Relaxed) + line.len();
        let seq = inner.log_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (level, line) = match seq {
            s if s > MAX_LOG_LINES_PER_ATTEMPT + 1 => return,
            s if s == MAX_LOG_LINES_PER_ATTEMPT + 1 || bytes > MAX_LOG_BYTES_PER_ATTEMPT => {
                // The marker takes this line's place; nothing is logged after it.
                inner
                    .log_seq
                    .store(MAX_LOG_LINES_PER_ATTEMPT + 1, Ordering::Relaxed);
                (
                    LogLevel::Warn,
                    format!(
                        "log cut: an attempt keeps at most {MAX_LOG_LINES_PER_ATTEMPT} lines and {} KiB; later lines were dropped",
                        MAX_LOG_BYTES_PER_ATTEMPT / 1024
                    ),
                )
            }
            _ => (level, line),
        };
        let run = &inner.run;
        inner.start.send();
        inner.events.send(RunEvent::Log(LogLine {
            run: run.run.clone(),
            shard: run.shard_index(),
            attempt: inner.attempt,
            seq,
            at: Utc::now(),
            level,
            line,
            delivery_token: run.delivery_token.clone(),
        }));
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
pub(crate) fn truncate(s: String, max: usize) -> String {
    krest_schemas::text::truncate(s, max)
}

/// What a successful handler returns: an optional text recorded as the run's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output(pub Option<String>);

impl From<()> for Output {
    fn from(_: ()) -> Self {
        Output(None)
    }
}

impl From<String> for Output {
    fn from(s: String) -> Self {
        Output(Some(s))
    }
}

impl From<&str> for Output {
    fn from(s: &str) -> Self {
        Output(Some(s.to_string()))
    }
}

impl From<Value> for Output {
    fn from(v: Value) -> Self {
        Output(Some(v.to_string()))
    }
}

/// Why a handler failed, and whether retrying can help.
///
/// Any `std::error::Error` converts with `?`; such errors are retryable. Use
/// [`JobError::fatal`] for failures a retry cannot fix (bad arguments): the run fails at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    message: String,
    retryable: bool,
}

impl JobError {
    /// A retryable failure.
    pub fn new(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry can fix: the run is marked FAILED without further attempts.
    pub fn fatal(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            retryable: false,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether another attempt may be made.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for JobError {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        JobError::new(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncate("abc".into(), 10), "abc");
        assert_eq!(truncate("abcdefghij".into(), 6), "abc...");
        let s = truncate("ééééé".into(), 6);
        assert!(s.ends_with("..."), "{s}");
        assert!(s.len() <= 6);
    }

    #[test]
    fn errors_convert_with_their_sources() {
        let io = std::io::Error::other("disk full");
        let e: JobError = io.into();
        assert_eq!(e.message(), "disk full");
        assert!(e.is_retryable());
        assert!(!JobError::fatal("bad args").is_retryable());
    }
}
