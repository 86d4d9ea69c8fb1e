//! Messages on the wire between scheduler nodes and workers: the run message a worker executes,
//! the run events it reports back, heartbeats, node presence, the leader lease and job state.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::JobType;
use crate::names::{attempt_event_msg_id, run_event_msg_id};

/// Why a run exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Trigger {
    /// Its cron fired.
    Schedule,
    /// A fire missed while no leader was dispatching (failover, downtime), fired afterwards.
    CatchUp,
    /// Someone asked for it (`krest job trigger`).
    Manual,
    /// A parent job's run succeeded (`childJobs`).
    Child,
}

impl Trigger {
    /// The canonical name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "SCHEDULE",
            Trigger::CatchUp => "CATCH_UP",
            Trigger::Manual => "MANUAL",
            Trigger::Child => "CHILD",
        }
    }
}

/// The position of one shard in a SHARDING run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardInfo {
    /// 0-based index of this shard.
    pub index: u32,
    /// Number of shards in the run.
    pub total: u32,
    /// This shard's element of the job's `args` array.
    pub item: Value,
}

/// Which run a message is about: the identity every work message and every event carries
/// (flattened: on the wire these are top-level fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunRef {
    /// Stable id of the run: `<group>.<name>.<scheduled epoch ms>` for scheduled fires,
    /// `<group>.<name>.m-<request id>` for manual runs, `<child key>.c-<parent run id>` for child
    /// runs; it doubles as an idempotency key for handlers.
    pub run_id: String,
    /// The job's group.
    pub job_group: String,
    /// The job's name.
    pub job_name: String,
    /// The app whose workers run it (absent on log lines of older workers).
    #[serde(default)]
    pub app_name: String,
}

impl RunRef {
    /// The job's `group.name` key.
    pub fn job_key(&self) -> String {
        crate::names::job_key(&self.job_group, &self.job_name)
    }
}

/// One unit of work on the work stream: a run (NORMAL) or one shard of a run (SHARDING).
///
/// Published to `krest.work.<app>.<group>.<name>.q` (or `….i.<instance>` when addressed) with
/// `Nats-Msg-Id: <runId>/<shard>`. The attempt number is not in the message: it is
/// `attemptOffset` plus the JetStream delivery count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunMessage {
    /// The run.
    #[serde(flatten)]
    pub run: RunRef,
    /// The handler to run.
    pub path: String,
    /// NORMAL or SHARDING.
    pub job_type: JobType,
    /// The job's arguments (the whole array for SHARDING runs; see `shard.item`).
    pub args: Value,
    /// Present on SHARDING runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardInfo>,
    /// The fire time this run belongs to.
    pub scheduled_at: DateTime<Utc>,
    /// When the leader published it.
    pub dispatched_at: DateTime<Utc>,
    /// Why the run exists.
    pub trigger: Trigger,
    /// For CHILD runs: the parent job's run that triggered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<String>,
    /// Retries allowed after a failed attempt.
    pub retry_times: u32,
    /// The worker instance this run is addressed to (per-instance strategies, BROADCAST);
    /// absent for the app's shared queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The job's load-balancing strategy (used to re-route retries and runs of departed
    /// instances).
    #[serde(default)]
    pub load_balance: crate::job::LoadBalance,
    /// Attempts made before this message (retries and re-routes are new messages): the attempt
    /// number is `attemptOffset` + the delivery count.
    #[serde(default)]
    pub attempt_offset: u32,
    /// For messages to the router: not before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    /// Set when the leader dispatched the run ahead of its fire time (`--dispatch-ahead`): the
    /// worker holds the run and starts its handler at this instant, by its own clock, and never
    /// earlier (holding at most [`MAX_HOLD`]). Sent only to apps whose every live instance
    /// declares [`CAPABILITY_NOT_BEFORE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// For messages to the router: instances to avoid if others can take the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid: Vec<String>,
    /// For HTTP jobs: the request to make (the body is `args`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCall>,
    /// The job's retry backoff, when it sets one (else the worker's default applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_backoff: Option<BackoffMs>,
    /// Seconds an attempt may run before the worker cancels it (TIMED_OUT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Revision number of the job definition the run was made from (the job's own numbers,
    /// as `krest job history` shows them).
    pub revision: u64,
    /// Fencing epoch of the leader that dispatched it (the lease revision at its takeover);
    /// absent for runs a node dispatched without leading (manual and child runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Proof of delivery for this shard of the run (set by the node that dispatched it): the
    /// worker copies it into the attempt's `started`, `log` and `finished` events and into
    /// hand-offs; events and hand-offs without the right token are refused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub delivery_token: String,
}

/// The request an HTTP job makes. It carries the real header values and URL (the worker needs
/// them); `Debug` shows them redacted ([`HttpCall::redacted`]).
#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCall {
    /// The URL.
    pub url: String,
    /// The method.
    pub method: crate::job::MethodType,
    /// Request headers.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// A retry backoff in milliseconds: delay after failed attempt n = `initial × factor^(n-1)`,
/// at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackoffMs {
    /// Delay after the first failure.
    pub initial_ms: u64,
    /// Growth per further failure.
    pub factor: f64,
    /// Upper bound.
    pub max_ms: u64,
}

impl RunMessage {
    /// The shard index (0 for unsharded runs).
    pub fn shard_index(&self) -> u32 {
        self.shard.as_ref().map_or(0, |s| s.index)
    }

    /// The number of shards (1 for unsharded runs).
    pub fn shard_total(&self) -> u32 {
        self.shard.as_ref().map_or(1, |s| s.total)
    }
}

/// Final status of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AttemptOutcome {
    /// The handler returned success.
    Succeeded,
    /// The handler failed, panicked, or no handler was found; or the worker shut down before
    /// the handler finished (then `willRetry`, at once).
    Failed,
    /// The handler ran past the job's `timeoutSecs` and was cancelled.
    TimedOut,
    /// The run was cancelled (`krest runs cancel`, or replaced by the overlap policy).
    Cancelled,
}

impl AttemptOutcome {
    /// The name as on the wire (`SUCCEEDED`, `TIMED_OUT`, …), the one spelling every view uses.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Succeeded => "SUCCEEDED",
            AttemptOutcome::Failed => "FAILED",
            AttemptOutcome::TimedOut => "TIMED_OUT",
            AttemptOutcome::Cancelled => "CANCELLED",
        }
    }
}

/// Severity of a handler log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum LogLevel {
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl LogLevel {
    /// The canonical name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARN",
            LogLevel::Error => "ERROR",
        }
    }
}

/// A run was published to the work stream (sent by the leader).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dispatched {
    /// The run.
    #[serde(flatten)]
    pub run: RunRef,
    /// The handler.
    pub path: String,
    /// NORMAL or SHARDING.
    pub job_type: JobType,
    /// Why the run exists.
    pub trigger: Trigger,
    /// The fire time it belongs to.
    pub scheduled_at: DateTime<Utc>,
    /// When it was published.
    pub dispatched_at: DateTime<Utc>,
    /// Number of work messages (shards) it was split into.
    pub shard_total: u32,
    /// The job's arguments as sent.
    pub args: Value,
    /// Fire times older than the misfire threshold that this run stands in for (0 normally).
    #[serde(default)]
    pub misfired: u32,
    /// For CHILD runs: the parent job's run that triggered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<String>,
    /// Revision number of the job definition (the job's own numbers).
    pub revision: u64,
    /// The scheduler node that published it.
    pub node: String,
    /// Fencing epoch of the leader that dispatched it (the lease revision at its takeover);
    /// absent for runs a node dispatched without leading (manual and child runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// An attempt began on a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    /// The run.
    #[serde(flatten)]
    pub run: RunRef,
    /// Shard index (0 for unsharded runs).
    pub shard: u32,
    /// Number of shards (1 for unsharded runs).
    pub shard_total: u32,
    /// 1-based attempt number (the delivery count).
    pub attempt: u32,
    /// Worker instance id.
    pub worker: String,
    /// When the handler started.
    pub at: DateTime<Utc>,
    /// The fire time the run belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<DateTime<Utc>>,
    /// The run message's `deliveryToken`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub delivery_token: String,
}

/// Longest log line kept, in bytes; a longer line is cut and ends in `...`.
pub const MAX_LOG_LINE: usize = 4 * 1024;
/// Log lines kept per attempt (of one shard). The SDK sends one more, a marker saying the log
/// was cut, and drops the rest; the recorder stores no line numbered beyond the marker.
pub const MAX_LOG_LINES_PER_ATTEMPT: u32 = 10_000;
/// Bytes of log lines kept per attempt; past them the SDK sends the marker and drops the rest.
pub const MAX_LOG_BYTES_PER_ATTEMPT: usize = 1024 * 1024;

/// A line a handler logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogLine {
    /// The run.
    #[serde(flatten)]
    pub run: RunRef,
    /// Shard index.
    pub shard: u32,
    /// Attempt number.
    pub attempt: u32,
    /// 1-based position of the line within the attempt.
    pub seq: u32,
    /// When it was logged.
    pub at: DateTime<Utc>,
    /// Severity.
    pub level: LogLevel,
    /// The text (truncated to 4 KiB by the SDK).
    pub line: String,
    /// The run message's `deliveryToken`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub delivery_token: String,
}

/// An attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Finished {
    /// The run.
    #[serde(flatten)]
    pub run: RunRef,
    /// Shard index.
    pub shard: u32,
    /// Number of shards.
    pub shard_total: u32,
    /// Attempt number.
    pub attempt: u32,
    /// Worker instance id.
    pub worker: String,
    /// When the attempt ended.
    pub at: DateTime<Utc>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// True when another attempt follows: a failure or timeout with retries left, or an attempt
    /// handed back by a worker shutting down.
    #[serde(default)]
    pub will_retry: bool,
    /// Delay before that attempt, when `willRetry` (0: at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// What the handler returned on success (the SDK keeps at most 16 KiB, ending a cut text in
    /// `...`, with URL userinfo redacted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Why the attempt did not succeed (FAILED, TIMED_OUT, CANCELLED), kept like `output`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Handler run time.
    pub duration_ms: u64,
    /// The run message's `deliveryToken`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub delivery_token: String,
    /// When the handler started, for an attempt that sent no `started` event: the Rust SDK
    /// folds the start into `finished` when the attempt ends within its start-report delay
    /// (100 ms by default) without logging. Absent when a `started` event was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// The fire time the run belongs to, with `startedAt` (as `started` carries it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<DateTime<Utc>>,
}

/// A fire the leader decided not to run (misfire policy, overlap policy), recorded as a
/// SKIPPED run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    /// The run.
    #[serde(flatten)]
    pub run: RunRef,
    /// Why the fire exists.
    pub trigger: Trigger,
    /// The fire time.
    pub scheduled_at: DateTime<Utc>,
    /// When it was skipped.
    pub at: DateTime<Utc>,
    /// Why.
    pub reason: String,
    /// Further missed fire times this entry stands for.
    #[serde(default)]
    pub misfired: u32,
    /// Revision number of the job definition (the job's own numbers).
    pub revision: u64,
    /// The scheduler node that decided.
    pub node: String,
    /// Fencing epoch of the leader that decided (the lease revision at its takeover);
    /// absent for runs a node dispatched without leading (manual and child runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// Everything on the events stream (`krest.events.<app>.<group>.<name>`), tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum RunEvent {
    /// A run was published.
    Dispatched(Dispatched),
    /// A fire was skipped.
    Skipped(Skipped),
    /// An attempt began.
    Started(Started),
    /// A handler logged a line.
    Log(LogLine),
    /// An attempt ended.
    Finished(Finished),
}

impl RunEvent {
    /// The run the event belongs to.
    pub fn run_id(&self) -> &str {
        match self {
            RunEvent::Dispatched(e) => &e.run.run_id,
            RunEvent::Skipped(e) => &e.run.run_id,
            RunEvent::Started(e) => &e.run.run_id,
            RunEvent::Log(e) => &e.run.run_id,
            RunEvent::Finished(e) => &e.run.run_id,
        }
    }

    /// The run the event is about.
    pub fn run(&self) -> &RunRef {
        match self {
            RunEvent::Dispatched(e) => &e.run,
            RunEvent::Skipped(e) => &e.run,
            RunEvent::Started(e) => &e.run,
            RunEvent::Log(e) => &e.run,
            RunEvent::Finished(e) => &e.run,
        }
    }

    /// The subject the event is published on (`krest.events.<app>.<group>.<name>`).
    pub fn subject(&self) -> String {
        let run = self.run();
        crate::names::events_subject(&run.app_name, &run.job_group, &run.job_name)
    }

    /// For events about an attempt (`started`, `log`, `finished`): the shard and the delivery
    /// token the event carries.
    pub fn delivery(&self) -> Option<(u32, &str)> {
        match self {
            RunEvent::Dispatched(_) | RunEvent::Skipped(_) => None,
            RunEvent::Started(e) => Some((e.shard, &e.delivery_token)),
            RunEvent::Log(e) => Some((e.shard, &e.delivery_token)),
            RunEvent::Finished(e) => Some((e.shard, &e.delivery_token)),
        }
    }

    /// The W3C `traceparent` of the hop the event reports: the dispatch (`dispatched`,
    /// `skipped`) or the attempt (`started`, `log`, `finished`); see [`crate::trace`].
    pub fn traceparent(&self) -> String {
        match self {
            RunEvent::Dispatched(e) => crate::trace::dispatch_traceparent(&e.run.run_id, 0),
            RunEvent::Skipped(e) => crate::trace::dispatch_traceparent(&e.run.run_id, 0),
            RunEvent::Started(e) => {
                crate::trace::attempt_traceparent(&e.run.run_id, e.shard, e.attempt)
            }
            RunEvent::Log(e) => {
                crate::trace::attempt_traceparent(&e.run.run_id, e.shard, e.attempt)
            }
            RunEvent::Finished(e) => {
                crate::trace::attempt_traceparent(&e.run.run_id, e.shard, e.attempt)
            }
        }
    }

    /// `(group, name)` of the job the event belongs to.
    pub fn job(&self) -> (&str, &str) {
        match self {
            RunEvent::Dispatched(e) => (&e.run.job_group, &e.run.job_name),
            RunEvent::Skipped(e) => (&e.run.job_group, &e.run.job_name),
            RunEvent::Started(e) => (&e.run.job_group, &e.run.job_name),
            RunEvent::Log(e) => (&e.run.job_group, &e.run.job_name),
            RunEvent::Finished(e) => (&e.run.job_group, &e.run.job_name),
        }
    }

    /// `Nats-Msg-Id` for the event: stable, so a re-publish is dropped as a duplicate.
    pub fn msg_id(&self) -> String {
        match self {
            RunEvent::Dispatched(e) => run_event_msg_id(&e.run.run_id, "dispatched"),
            RunEvent::Skipped(e) => run_event_msg_id(&e.run.run_id, "skipped"),
            RunEvent::Started(e) => attempt_event_msg_id(
                &e.run.run_id,
                e.shard,
                e.attempt,
                &e.delivery_token,
                "started",
            ),
            RunEvent::Log(e) => attempt_event_msg_id(
                &e.run.run_id,
                e.shard,
                e.attempt,
                &e.delivery_token,
                &format!("log/{}", e.seq),
            ),
            RunEvent::Finished(e) => attempt_event_msg_id(
                &e.run.run_id,
                e.shard,
                e.attempt,
                &e.delivery_token,
                "finished",
            ),
        }
    }
}

/// A cancellation, broadcast on `krest.cancel.<app>` to the app's workers and kept as the
/// value of `krest-cancels` key `<runId>` (so a worker receiving the run later skips it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    /// The run to cancel (every shard).
    pub run_id: String,
    /// Why (shown as the attempt's error).
    pub reason: String,
    /// When it was requested.
    pub at: DateTime<Utc>,
}

/// A worker instance's heartbeat, the value of `krest-workers` key `<app>.<instance>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerInfo {
    /// The app the instance belongs to.
    pub app_name: String,
    /// Unique id of the instance.
    pub instance: String,
    /// Handler names (`path`s) it can run.
    pub handlers: Vec<String>,
    /// Relative capacity: the instance holds at most `weight × slots` runs at once.
    pub weight: u32,
    /// Concurrent runs per unit of weight.
    pub slots: u32,
    /// Runs received and not yet done: executing, or held for their `notBefore`.
    pub in_flight: u32,
    /// Version of the app or SDK.
    pub version: String,
    /// Which SDK (e.g. `rust`).
    pub sdk: String,
    /// Host name.
    pub host: String,
    /// When the instance started.
    pub started_at: DateTime<Utc>,
    /// When this heartbeat was sent.
    pub heartbeat_at: DateTime<Utc>,
    /// What the instance's SDK supports beyond the base protocol (e.g.
    /// [`CAPABILITY_NOT_BEFORE`]); a scheduler uses a feature only with instances declaring it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// Capability of a worker that holds a run until its `notBefore` (so the leader may dispatch
/// runs ahead of their fire time to its app).
pub const CAPABILITY_NOT_BEFORE: &str = "notBefore";

/// The longest a worker holds a run for its `notBefore`: a run whose `notBefore` is further
/// away (a skewed clock, a forged message) is held this long, so no message can keep a slot
/// for longer. Also the most a leader may dispatch ahead.
pub const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

impl RunMessage {
    /// How long to hold the run before its handler starts, at `now`: until `notBefore`, at most
    /// [`MAX_HOLD`]; zero when it has none or it has passed.
    pub fn hold_at(&self, now: DateTime<Utc>) -> std::time::Duration {
        self.not_before
            .and_then(|nb| (nb - now).to_std().ok())
            .map_or(std::time::Duration::ZERO, |d| d.min(MAX_HOLD))
    }
}

/// Role of a scheduler node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NodeRole {
    /// Holds the lease and dispatches.
    Leader,
    /// Waits to take over.
    Standby,
}

/// A scheduler node's presence, the value of `krest-nodes` key `<node>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Node name.
    pub node: String,
    /// Krest version.
    pub version: String,
    /// Current role.
    pub role: NodeRole,
    /// Database backend (`sqlite`, `postgres`).
    pub database: String,
    /// The NATS server this node is connected to (`name@host:port`).
    #[serde(default)]
    pub nats_server: String,
    /// Address of the node's HTTP endpoint (`/healthz`, `/readyz`), if enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// Stream sequence of the last event recorded into the node's database.
    pub recorded_seq: u64,
    /// Events in the stream the node has not recorded yet.
    #[serde(default)]
    pub recorder_lag_events: u64,
    /// Age in milliseconds of the oldest event the node has not recorded yet (0 when none).
    #[serde(default)]
    pub recorder_lag_ms: u64,
    /// Why the node's recorder is not progressing, while it is not (database down, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorder_failing: Option<String>,
    /// When the node started.
    pub started_at: DateTime<Utc>,
    /// When this presence was written.
    pub heartbeat_at: DateTime<Utc>,
    /// Set while the node reads the job table after its start — it does not campaign for
    /// the lease until it has read it all —: how far it has got (`loading jobs: 412,000 read,
    /// 588,000 to go`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loading: Option<String>,
}

/// The value of the leader lease (`krest-leader` key `leader`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaderLease {
    /// The leader's node name.
    pub node: String,
    /// Fencing epoch: the KV revision at which the lease was acquired (0 until the first
    /// renewal records it).
    #[serde(default)]
    pub epoch: u64,
    /// When this node acquired the lease.
    pub acquired_at: DateTime<Utc>,
    /// When it last renewed it.
    pub renewed_at: DateTime<Utc>,
}

/// Per-job scheduling state (`krest-state` key `<group>.<name>`), written by the leader when
/// the fire a job holds queued (overlap policy QUEUE_ONE) changes; the progress of ordinary
/// fires is the [`FireWatermark`]. (Earlier versions wrote it after every fire; a new leader
/// still reads it.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobState {
    /// The latest fire time handed over: its run (or SKIPPED entry) is stored on a stream, or
    /// it is the queued fire below.
    pub last_fire_at: DateTime<Utc>,
    /// Its run id.
    pub last_run_id: String,
    /// A fire held by the QUEUE_ONE overlap policy until the job's previous run ends; a new
    /// leader restores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<QueuedFire>,
}

/// How far the leader's schedule as a whole has been handed over (`krest-state` key
/// [`crate::names::STATE_WATERMARK_KEY`]), written once per round of fires after their messages
/// are stored — instead of one [`JobState`] per fire. It claims that every scheduled fire due at
/// or before `through`, of every job whose jobs-bucket revision is at most `jobs_revision`, has
/// been handed over; a new leader starts each such job after it (jobs changed later fall back
/// to their own [`JobState`] and last apply time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FireWatermark {
    /// Every fire due at or before this instant is handed over.
    pub through: DateTime<Utc>,
    /// Every fire of a job with overlap policy ALLOW due at or before this instant is handed
    /// over too (dispatched ahead of its time); absent from leaders that did not dispatch
    /// ahead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ahead_through: Option<DateTime<Utc>>,
    /// The newest jobs-bucket revision the writing leader had applied to its schedule.
    pub jobs_revision: u64,
    /// The writing leader's epoch.
    pub epoch: u64,
    /// The writing node.
    pub node: String,
}

/// A fire waiting behind the previous run of its job (overlap policy QUEUE_ONE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueuedFire {
    /// The run id it will have.
    pub run_id: String,
    /// Its fire time.
    pub scheduled_at: DateTime<Utc>,
    /// Why it exists.
    pub trigger: Trigger,
    /// Misfired fire times it stands for.
    #[serde(default)]
    pub misfired: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_held_until_its_not_before_and_at_most_max_hold() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let mut run: RunMessage = serde_json::from_value(serde_json::json!({
            "runId": "g.j.1", "jobGroup": "g", "jobName": "j", "appName": "a", "path": "p",
            "jobType": "NORMAL", "args": null, "scheduledAt": "2026-11-29T08:43:40Z",
            "dispatchedAt": "2026-11-29T08:43:39Z", "trigger": "SCHEDULE", "retryTimes": 0,
            "revision": 1, "notBefore": "2026-11-29T08:43:40Z"
        }))
        .unwrap();
        let now = t("2026-11-29T08:43:39.250Z");
        assert_eq!(run.hold_at(now), std::time::Duration::from_millis(750));
        assert_eq!(
            run.hold_at(t("2026-11-29T08:43:41Z")),
            std::time::Duration::ZERO
        );
        run.not_before = Some(t("2126-01-01T00:00:00Z"));
        assert_eq!(run.hold_at(now), MAX_HOLD, "bounded");
        run.not_before = None;
        assert_eq!(run.hold_at(now), std::time::Duration::ZERO);
    }

    #[test]
    fn events_are_tagged_by_type() {
        let e = RunEvent::Log(LogLine {
            run: RunRef {
                run_id: "g.j.1".into(),
                job_group: "g".into(),
                job_name: "j".into(),
                app_name: String::new(),
            },
            shard: 2,
            attempt: 1,
            seq: 7,
            at: DateTime::<Utc>::from_timestamp(0, 0).unwrap(),
            level: LogLevel::Warn,
            line: "hello".into(),
            delivery_token: String::new(),
        });
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "log");
        assert_eq!(v["runId"], "g.j.1");
        assert_eq!(v["level"], "WARN");
        assert_eq!(e.msg_id(), "g.j.1/2/1/log/7");
        let back: RunEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
