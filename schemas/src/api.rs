//! The request/reply API between clients (`krest` CLI, web page, scripts) and scheduler nodes.
//!
//! Each operation is a NATS request on `krest.api.<op>` ([`Op::subject`]) with a JSON body; the
//! reply is an [`ApiReply`]. Every scheduler node answers (queue group `krest-api`), so a
//! client needs nothing but a NATS connection.
//!
//! No reply is larger than the server's `max_payload`. Listings (`job.list`, `job.history`,
//! `runs.list`, `workers.list`, `dlq.list`) and `runs.get` come in pages: a page is bounded by
//! the request's `limit` and by bytes, and [`ApiReply::next`] is the `cursor` to send for the
//! following page (absent on the last one).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::{JobSpec, Problem};
use crate::messages::{AttemptOutcome, LeaderLease, LogLevel, NodeInfo, Trigger, WorkerInfo};
use crate::names::api_subject;

/// API operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`ApplyRequest`] → [`ApplyResponse`]
    JobApply,
    /// [`JobListRequest`] → `Vec<JobView>`, by key (paged)
    JobList,
    /// [`JobRequest`] → [`JobView`]
    JobGet,
    /// [`JobRequest`] → [`JobView`]
    JobPause,
    /// [`JobRequest`] → [`JobView`]
    JobResume,
    /// [`JobRequest`] → [`JobView`] (the deleted job)
    JobDelete,
    /// [`JobHistoryRequest`] → `Vec<JobRevision>`, newest first (paged)
    JobHistory,
    /// [`TriggerRequest`] → [`TriggerResponse`]
    JobTrigger,
    /// [`RunsListRequest`] → `Vec<RunSummary>`, newest first (paged)
    RunsList,
    /// [`RunGetRequest`] → [`RunDetail`] (attempts and log lines paged)
    RunsGet,
    /// [`RunRequest`] → [`CancelResponse`]
    RunsCancel,
    /// [`WorkersListRequest`] → `Vec<WorkerInfo>`, by app and instance (paged)
    WorkersList,
    /// `{}` → [`ClusterStatus`]
    ClusterStatus,
    /// [`DlqListRequest`] → `Vec<DeadLetter>`, newest first (paged)
    DlqList,
    /// [`JobStatsRequest`] → [`JobStats`]
    JobStats,
    /// [`RunCountsRequest`] → [`RunCounts`]
    RunsCounts,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 16] = [
        Op::JobApply,
        Op::JobList,
        Op::JobGet,
        Op::JobPause,
        Op::JobResume,
        Op::JobDelete,
        Op::JobHistory,
        Op::JobTrigger,
        Op::RunsList,
        Op::RunsGet,
        Op::RunsCancel,
        Op::WorkersList,
        Op::ClusterStatus,
        Op::DlqList,
        Op::JobStats,
        Op::RunsCounts,
    ];

    /// The operation's name, e.g. `job.apply`.
    pub fn name(self) -> &'static str {
        match self {
            Op::JobApply => "job.apply",
            Op::JobList => "job.list",
            Op::JobGet => "job.get",
            Op::JobPause => "job.pause",
            Op::JobResume => "job.resume",
            Op::JobDelete => "job.delete",
            Op::JobHistory => "job.history",
            Op::JobTrigger => "job.trigger",
            Op::RunsList => "runs.list",
            Op::RunsGet => "runs.get",
            Op::RunsCancel => "runs.cancel",
            Op::WorkersList => "workers.list",
            Op::ClusterStatus => "cluster.status",
            Op::DlqList => "dlq.list",
            Op::JobStats => "job.stats",
            Op::RunsCounts => "runs.counts",
        }
    }

    /// The operation for a name, the inverse of [`Op::name`].
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    /// The NATS subject the operation is requested on.
    pub fn subject(self) -> String {
        api_subject(self.name())
    }
}

/// The reply to every API request: `{"ok":true,"result":…}` or `{"ok":false,"error":…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiReply {
    /// Whether the operation succeeded.
    pub ok: bool,
    /// The operation's result, when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// What went wrong, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    /// For paged operations: `result` is one page, and this is the `cursor` that asks for the
    /// next one. Absent on the last page. Opaque: send it back as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// On `runs.list` and `runs.get`: set when the answering node's database is behind the
    /// events stream (a new or restarted node replaying it): the answer may miss recent runs or
    /// show them in an older state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catching_up: Option<CatchingUp>,
}

/// How far behind the events stream the database of the node that answered is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CatchingUp {
    /// The node that answered.
    pub node: String,
    /// Events in the stream it has not recorded yet.
    pub lag_events: u64,
    /// Age of the oldest of them, in milliseconds.
    pub lag_ms: u64,
    /// Stream sequence of the last event recorded.
    pub recorded_seq: u64,
    /// Last sequence of the events stream.
    pub stream_seq: u64,
}

impl std::fmt::Display for CatchingUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node {} is catching up on the events stream: {} events ({} s) behind (recorded up to {} of {}); recent runs may be missing or out of date",
            self.node,
            self.lag_events,
            self.lag_ms / 1000,
            self.recorded_seq,
            self.stream_seq
        )
    }
}

/// Machine-readable error kinds of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request body is not what the operation takes.
    BadRequest,
    /// One or more job definitions are invalid; nothing was written.
    InvalidJob,
    /// The named job or run does not exist.
    NotFound,
    /// A job name matches jobs in several groups: qualify it as `group.name`.
    Ambiguous,
    /// The node failed (NATS or database error); retrying may help.
    Internal,
    /// The reply (or one item of it, or the request) would exceed the NATS server's
    /// `max_payload`; the message says what to do.
    TooLarge,
    /// HTTP API: no token, or a token that is not the node's (HTTP 401).
    Unauthorized,
    /// HTTP API: the token may read but not write (HTTP 403).
    Forbidden,
}

/// An API error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    /// The kind.
    pub code: ErrorCode,
    /// A sentence for humans.
    pub message: String,
    /// For `invalid_job`: each invalid document with its problems.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid: Vec<InvalidDocument>,
}

/// One rejected document of an apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvalidDocument {
    /// 0-based position of the document in the request.
    pub index: usize,
    /// `group.name`, when the document got far enough to tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// What is wrong with it.
    pub problems: Vec<Problem>,
}

/// `job.apply`: create or update job definitions. All are validated first; if any is invalid,
/// none is written. A request (and its reply, about 80 bytes per document) must fit in the
/// server's `max_payload`: larger sets go in several requests, children before parents
/// (`krest job apply` does this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyRequest {
    /// The definitions, as written by the user.
    pub documents: Vec<Value>,
}

/// What `job.apply` did with one definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApplyOutcome {
    /// A new job.
    Created,
    /// A new revision of an existing job.
    Updated,
    /// Identical to the current revision; nothing written.
    Unchanged,
}

/// Result of `job.apply`, one entry per document in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResponse {
    /// One per document.
    pub results: Vec<ApplyResult>,
}

/// What happened to one applied document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    /// `group.name`.
    pub job: String,
    /// Created, updated or unchanged.
    pub outcome: ApplyOutcome,
    /// The job's revision number after the apply (its own numbers: 1 for a new job).
    pub revision: u64,
}

/// `job.list` filter and page.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobListRequest {
    /// Only jobs of this app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// Only jobs of this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only jobs whose `group.name` contains this text (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<String>,
    /// Only running (or only paused) jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<JobStatus>,
    /// At most this many per page (default and at most 10000; fewer when they would not fit
    /// in one reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Where to continue: the `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// Whether a job fires on its schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// `running: true`.
    Running,
    /// `running: false` (paused).
    Paused,
}

/// `job.history`: the revisions of one job, newest first, a page at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobHistoryRequest {
    /// `group.name` or `name` (a deleted job's history needs `group.name`).
    pub job: String,
    /// At most this many per page (default 64, the revisions the bucket keeps; at most 10000;
    /// fewer when they would not fit in one reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Where to continue: the `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

impl JobHistoryRequest {
    /// The first page of `job`'s history.
    pub fn new(job: impl Into<String>) -> JobHistoryRequest {
        JobHistoryRequest {
            job: job.into(),
            limit: None,
            cursor: None,
        }
    }
}

/// Names one job: `group.name`, or a bare name when it is unique across groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobRequest {
    /// `group.name` or `name` (a deleted job's history needs `group.name`).
    pub job: String,
    /// For `job.get`: an earlier revision (its number, as `job.history` lists it) instead
    /// of the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// For `job.delete`: an idempotency key chosen by the client (a token: letters, digits,
    /// `-`, `_`). A resend with the same key answers with the deletion it made, even after
    /// the job was applied again, so a client may safely resend after a timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl JobRequest {
    /// A request for the current revision of `job`.
    pub fn new(job: impl Into<String>) -> JobRequest {
        JobRequest {
            job: job.into(),
            revision: None,
            request_id: None,
        }
    }

    /// A `job.delete` of `job` with a fresh request id
    /// ([`crate::names::new_request_id`]), safe to resend.
    pub fn delete(job: impl Into<String>) -> JobRequest {
        JobRequest {
            request_id: Some(crate::names::new_request_id(Utc::now())),
            ..JobRequest::new(job)
        }
    }
}

/// One revision of a job definition (`job.history`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobRevision {
    /// The revision's number among the job's own: 1 for its first definition, one more for
    /// each change and for a deletion; a job applied again after its deletion continues.
    pub revision: u64,
    /// When it was written (server time).
    pub written_at: DateTime<Utc>,
    /// `PUT` (a definition), `DELETE` or `PURGE`.
    pub operation: String,
    /// The definition, for `PUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<JobSpec>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    /// `group.name`.
    pub key: String,
    /// The definition (normalized).
    pub spec: JobSpec,
    /// The definition's revision number among the job's own (as `job.history` lists them);
    /// in the reply of `job.delete`, the deletion's.
    pub revision: u64,
    /// When first applied.
    pub created_at: DateTime<Utc>,
    /// When this revision was applied.
    pub updated_at: DateTime<Utc>,
    /// Next scheduled fire, if running and scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_fire_at: Option<DateTime<Utc>>,
}

/// `job.trigger`: run a job now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerRequest {
    /// `group.name` or `name`.
    pub job: String,
    /// Replaces the job's `args` for this run (for SHARDING jobs: an array, or a string
    /// holding one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Idempotency key chosen by the client (a token: letters, digits, `-`, `_`). Requests
    /// with the same key make one run, so a client may safely retry after a timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Result of `job.trigger`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerResponse {
    /// The new run.
    pub run_id: String,
    /// Number of shards published.
    pub shard_total: u32,
}

/// Status of a run (and of each of its shards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    /// Published, no attempt started yet.
    Pending,
    /// An attempt is executing (or a failed attempt waits for its retry).
    Running,
    /// Every shard succeeded.
    Succeeded,
    /// A shard failed with no retries left.
    Failed,
    /// A shard's last attempt ran past the job's `timeoutSecs`, with no retries left.
    TimedOut,
    /// Not run: skipped by the misfire or overlap policy.
    Skipped,
    /// Cancelled before it ended.
    Cancelled,
}

impl RunStatus {
    /// The canonical name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "PENDING",
            RunStatus::Running => "RUNNING",
            RunStatus::Succeeded => "SUCCEEDED",
            RunStatus::Failed => "FAILED",
            RunStatus::TimedOut => "TIMED_OUT",
            RunStatus::Skipped => "SKIPPED",
            RunStatus::Cancelled => "CANCELLED",
        }
    }

    /// Every status, in the order a run may pass through them.
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Pending,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::TimedOut,
        RunStatus::Skipped,
        RunStatus::Cancelled,
    ];

    /// Parses the canonical name, case-insensitively.
    pub fn parse(s: &str) -> Option<RunStatus> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }

    /// True for statuses a run never leaves.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded
                | RunStatus::Failed
                | RunStatus::TimedOut
                | RunStatus::Skipped
                | RunStatus::Cancelled
        )
    }
}

/// `runs.list` filter; newest runs first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunsListRequest {
    /// Only runs of this job (`group.name` or a unique `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Only runs in this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RunStatus>,
    /// Only runs of this app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// Only runs scheduled at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Only runs scheduled before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// At most this many per page (default 20, at most 1000; fewer when they would not fit in
    /// one reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Where to continue: the `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// One run, summarized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// The run.
    pub run_id: String,
    /// The job's group.
    pub job_group: String,
    /// The job's name.
    pub job_name: String,
    /// The app.
    pub app_name: String,
    /// Status.
    pub status: RunStatus,
    /// Why it exists (unknown until the dispatch event is recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
    /// The fire time it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<DateTime<Utc>>,
    /// When it was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<DateTime<Utc>>,
    /// When its first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Number of shards.
    pub shard_total: u32,
    /// Shards that succeeded.
    pub shards_succeeded: u32,
    /// Shards that failed for good.
    pub shards_failed: u32,
    /// Most attempts any shard made.
    pub attempts: u32,
    /// Misfired fire times this run stands in for.
    pub misfired: u32,
    /// The scheduler node that dispatched it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Revision number of the job definition it ran with (the job's own numbers; runs
    /// recorded before jobs were numbered carry the jobs bucket's revision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// For CHILD runs: the parent job's run that triggered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<String>,
    /// Fencing epoch of the leader that dispatched it (absent for manual and child runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// The output a successful attempt reported (for a sharded run, that of the highest-numbered
    /// shard that reported one), as the worker kept it (at most 16 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The error of the failed, timed-out or cancelled attempt that ended last, of any shard;
    /// kept when a later attempt succeeded (a SUCCEEDED run with an error needed a retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The run's W3C trace id (a function of its run id, see `krest_schemas::trace`): the
    /// `traceparent` of its messages, events and HTTP calls carries it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
}

/// `runs.cancel` (and the first page of `runs.get`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunRequest {
    /// The run id.
    pub run_id: String,
}

/// `runs.get`: one run with its attempts and log lines, a page at a time. The first page
/// (no `cursor`) has the run, its args and as many attempts and log lines as fit; each
/// following page has the run again and continues where the previous one stopped (an attempt
/// whose log lines continue is repeated, with the remaining lines).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunGetRequest {
    /// The run id.
    pub run_id: String,
    /// At most this many attempts and log lines together per page (default and at most
    /// 10000; fewer when they would not fit in one reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Where to continue: the `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

impl RunGetRequest {
    /// The first page of `run_id`.
    pub fn new(run_id: impl Into<String>) -> RunGetRequest {
        RunGetRequest {
            run_id: run_id.into(),
            limit: None,
            cursor: None,
        }
    }
}

/// Result of `runs.cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelResponse {
    /// The run.
    pub run_id: String,
    /// Its app, whose workers were told.
    pub app_name: String,
    /// Its status when the cancellation was requested.
    pub status_before: RunStatus,
}

/// One run with its shards, attempts and log lines (one page of them: see
/// [`RunGetRequest`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunDetail {
    /// The summary.
    pub run: RunSummary,
    /// The job's arguments as dispatched (first page only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Attempts of the shards, by shard then attempt: all of them, or this page's.
    pub attempts: Vec<AttemptView>,
    /// Attempts after this page (not in `attempts`); fetch them with the reply's `next`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts_left: u64,
    /// Log lines after this page (not in any attempt's `logs`); fetch them with the reply's
    /// `next`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub logs_left: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Status of one attempt as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AttemptStatus {
    /// Started, not finished.
    Running,
    /// Succeeded.
    Succeeded,
    /// Failed; `willRetry` tells whether another attempt follows.
    Failed,
    /// Cancelled at the job's timeout; `willRetry` tells whether another attempt follows.
    TimedOut,
    /// Cancelled on request.
    Cancelled,
}

impl AttemptStatus {
    /// The name as on the wire (`SUCCEEDED`, `TIMED_OUT`, …), the one spelling every view uses.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Running => "RUNNING",
            AttemptStatus::Succeeded => "SUCCEEDED",
            AttemptStatus::Failed => "FAILED",
            AttemptStatus::TimedOut => "TIMED_OUT",
            AttemptStatus::Cancelled => "CANCELLED",
        }
    }
}

impl From<AttemptOutcome> for AttemptStatus {
    fn from(o: AttemptOutcome) -> Self {
        match o {
            AttemptOutcome::Succeeded => AttemptStatus::Succeeded,
            AttemptOutcome::Failed => AttemptStatus::Failed,
            AttemptOutcome::TimedOut => AttemptStatus::TimedOut,
            AttemptOutcome::Cancelled => AttemptStatus::Cancelled,
        }
    }
}

/// One attempt of one shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptView {
    /// Shard index.
    pub shard: u32,
    /// Attempt number.
    pub attempt: u32,
    /// Status.
    pub status: AttemptStatus,
    /// Whether a retry follows a failure.
    pub will_retry: bool,
    /// Delay before that retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// Worker instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Start time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// End time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Output on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Log lines in order.
    pub logs: Vec<LogView>,
}

/// A log line of an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogView {
    /// Position within the attempt.
    pub seq: u32,
    /// When logged.
    pub at: DateTime<Utc>,
    /// Severity.
    pub level: LogLevel,
    /// Text.
    pub line: String,
}

/// The body of an alert webhook call (HTTP POST, `application/json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertPayload {
    /// What happened: `FAILED`, `TIMED_OUT`, `CANCELLED` or `MISFIRED`.
    pub alert: String,
    /// `group.name` of the job.
    pub job: String,
    /// The run, as `krest runs get` summarizes it.
    pub run: RunSummary,
    /// The scheduler node that sent the alert.
    pub node: String,
    /// When it was sent.
    pub at: DateTime<Utc>,
}

/// Result of `cluster.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// The current lease holder, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderView>,
    /// Live nodes.
    pub nodes: Vec<NodeInfo>,
    /// Version of the nats-server answering.
    pub nats_server: String,
}

/// The leader lease as the API shows it.
pub type LeaderView = LeaderLease;

/// `dlq.list`: the newest parked messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DlqListRequest {
    /// At most this many per page (default 20, at most 1000; fewer when they would not fit in
    /// one reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Where to continue: the `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `workers.list`: the live worker instances, by app and instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkersListRequest {
    /// Only instances of this app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// At most this many per page (default and at most 10000; fewer when they would not fit
    /// in one reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Where to continue: the `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// A message parked on the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Sequence in the dead-letter stream.
    pub seq: u64,
    /// `krest.dlq.<kind>`.
    pub subject: String,
    /// Why it was parked.
    pub reason: String,
    /// Where it was found.
    pub source: String,
    /// When it was parked.
    pub at: DateTime<Utc>,
    /// The payload as text (lossy UTF-8, truncated to 4 KiB).
    pub payload: String,
}

/// Worker listing (`workers.list`).
pub type WorkersList = Vec<WorkerInfo>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_round_trip() {
        for op in Op::ALL {
            assert_eq!(Op::from_name(op.name()), Some(op));
            assert!(op.subject().starts_with("krest.api."));
        }
        assert_eq!(Op::from_name("nope"), None);
    }
}

/// `job.stats`: how a job's recent runs went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatsRequest {
    /// `group.name` or `name` (a deleted job by `group.name`).
    pub job: String,
    /// How many of the newest ended runs to look at (default 100, at most 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent: Option<u32>,
}

/// A job's recent runs in figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStats {
    /// `group.name`.
    pub job: String,
    /// The newest run, ended or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunSummary>,
    /// Ended runs looked at (the newest, at most the request's `recent`).
    pub ended: u32,
    /// Of those, SUCCEEDED.
    pub succeeded: u32,
    /// Of those, FAILED or TIMED_OUT.
    pub failed: u32,
    /// `succeeded / (succeeded + failed)`, when there is one of either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    /// Median duration (first start to end) of the ended runs that started, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<i64>,
    /// 95th percentile of the same durations, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_ms: Option<i64>,
    /// Longest of the same durations, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<i64>,
}

/// `runs.counts`: runs by status since a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunCountsRequest {
    /// Runs scheduled (or dispatched, for manual runs) at or after this time.
    pub since: DateTime<Utc>,
}

/// Runs by status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunCounts {
    /// The request's `since`.
    pub since: DateTime<Utc>,
    /// Status (`SUCCEEDED`, …) → runs; statuses without runs are absent.
    pub counts: std::collections::BTreeMap<String, u64>,
}
