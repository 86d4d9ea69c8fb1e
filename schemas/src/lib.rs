//! Krest's wire contract: the job definition users write, the messages scheduler nodes and
//! workers exchange over NATS JetStream, the request/reply API, and the names of every subject,
//! stream and bucket.
//!
//! - [`job`]: [`JobSpec`] (a superset of Krest-Job's JSON), [`parse_job`] with field-precise
//!   errors, validation and normalization.
//! - [`cron`]: [`CronSchedule`], Quartz and 5-field cron evaluated in a time zone.
//! - [`schedule`]: [`Schedule`], cron or fixed rate (`every`) or one instant (`at`).
//! - [`messages`]: [`RunMessage`] (work), [`RunEvent`] (results and logs), [`WorkerInfo`]
//!   (heartbeats), [`NodeInfo`], [`LeaderLease`], [`JobState`].
//! - [`api`]: requests and replies of `krest.api.*`.
//! - [`names`]: subjects, streams, consumers, buckets, keys and message ids.
//! - [`deadletter`]: the bounded copy of bad input parked on the dead-letter stream.
//! - [`json`]: the strict JSON parser for user input (BOM skipped, duplicate keys refused).
//! - [`redact`]: what is secret and how views hide it; restoring secrets on apply.
//! - [`text`]: [`text::echo`], how user values are echoed in errors.
//! - [`web`]: what the HTTP API (`/api/v1`) adds: its error body, pages, cron previews,
//!   revision diffs, node health.
//!
//! This crate does no IO and knows nothing of NATS clients or SQL; everything here is data that
//! crosses a process boundary. [`json_schemas`] renders the JSON Schema of each wire message;
//! the committed copies live in `schemas/json/`.
//!
//! ```
//! let doc = serde_json::json!({
//!     "appName": "billing", "jobName": "nightly-invoices",
//!     "path": "invoices/run", "cron": "0 30 2 * * ?", "timeZone": "Europe/Berlin"
//! });
//! let spec = krest_schemas::parse_job(&doc).unwrap();
//! assert_eq!(spec.key(), "default.nightly-invoices");
//! ```

pub mod api;
pub mod backoff;
pub mod cron;
pub mod deadletter;
pub mod job;
pub mod json;
pub mod messages;
pub mod names;
pub mod redact;
pub mod schedule;
pub mod shared;
pub mod text;
pub mod trace;
pub mod web;

pub use backoff::Backoff;
pub use cron::{CronError, CronSchedule};
pub use job::{
    parse_job, Alert, AlertOn, DeletedJob, InvalidJob, JobArgs, JobSpec, JobType, LoadBalance,
    MethodType, MisfirePolicy, OverlapPolicy, Problem, Retention, RetryBackoff, StoredJob,
};
pub use messages::{
    AttemptOutcome, BackoffMs, CancelRequest, Dispatched, Finished, FireWatermark, HttpCall,
    JobState, LeaderLease, LogLevel, LogLine, NodeInfo, NodeRole, QueuedFire, RunEvent, RunMessage,
    RunRef, ShardInfo, Skipped, Started, Trigger, WorkerInfo,
};
pub use schedule::{parse_duration, parse_time_or_ago, Schedule};
pub use shared::{Interner, Shared};

/// The JSON Schema of every wire message, as `(file name, pretty JSON)` pairs, in the order
/// they are documented in `docs/protocol.md`.
pub fn json_schemas() -> Vec<(&'static str, String)> {
    fn render(schema: schemars::Schema) -> String {
        let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
        s.push('\n');
        s
    }
    vec![
        ("job-spec.json", render(schemars::schema_for!(JobSpec))),
        ("stored-job.json", render(schemars::schema_for!(StoredJob))),
        (
            "deleted-job.json",
            render(schemars::schema_for!(DeletedJob)),
        ),
        (
            "run-message.json",
            render(schemars::schema_for!(RunMessage)),
        ),
        ("run-event.json", render(schemars::schema_for!(RunEvent))),
        (
            "worker-info.json",
            render(schemars::schema_for!(WorkerInfo)),
        ),
        ("node-info.json", render(schemars::schema_for!(NodeInfo))),
        (
            "leader-lease.json",
            render(schemars::schema_for!(LeaderLease)),
        ),
        ("job-state.json", render(schemars::schema_for!(JobState))),
        (
            "fire-watermark.json",
            render(schemars::schema_for!(FireWatermark)),
        ),
        (
            "api-reply.json",
            render(schemars::schema_for!(api::ApiReply)),
        ),
        (
            "api-apply-request.json",
            render(schemars::schema_for!(api::ApplyRequest)),
        ),
        (
            "api-apply-response.json",
            render(schemars::schema_for!(api::ApplyResponse)),
        ),
        (
            "api-job-list-request.json",
            render(schemars::schema_for!(api::JobListRequest)),
        ),
        (
            "api-job-request.json",
            render(schemars::schema_for!(api::JobRequest)),
        ),
        (
            "api-job-view.json",
            render(schemars::schema_for!(api::JobView)),
        ),
        (
            "api-job-history-request.json",
            render(schemars::schema_for!(api::JobHistoryRequest)),
        ),
        (
            "api-trigger-request.json",
            render(schemars::schema_for!(api::TriggerRequest)),
        ),
        (
            "api-trigger-response.json",
            render(schemars::schema_for!(api::TriggerResponse)),
        ),
        (
            "api-runs-list-request.json",
            render(schemars::schema_for!(api::RunsListRequest)),
        ),
        (
            "api-run-summary.json",
            render(schemars::schema_for!(api::RunSummary)),
        ),
        (
            "api-run-request.json",
            render(schemars::schema_for!(api::RunRequest)),
        ),
        (
            "api-run-get-request.json",
            render(schemars::schema_for!(api::RunGetRequest)),
        ),
        (
            "api-run-detail.json",
            render(schemars::schema_for!(api::RunDetail)),
        ),
        (
            "api-workers-list-request.json",
            render(schemars::schema_for!(api::WorkersListRequest)),
        ),
        (
            "api-workers-list.json",
            render(schemars::schema_for!(api::WorkersList)),
        ),
        (
            "api-cluster-status.json",
            render(schemars::schema_for!(api::ClusterStatus)),
        ),
        (
            "api-job-revision.json",
            render(schemars::schema_for!(api::JobRevision)),
        ),
        (
            "alert-payload.json",
            render(schemars::schema_for!(api::AlertPayload)),
        ),
        (
            "api-cancel-response.json",
            render(schemars::schema_for!(api::CancelResponse)),
        ),
        (
            "cancel-request.json",
            render(schemars::schema_for!(messages::CancelRequest)),
        ),
        (
            "api-dlq-list-request.json",
            render(schemars::schema_for!(api::DlqListRequest)),
        ),
        (
            "api-dead-letter.json",
            render(schemars::schema_for!(api::DeadLetter)),
        ),
        (
            "api-job-stats-request.json",
            render(schemars::schema_for!(api::JobStatsRequest)),
        ),
        (
            "api-job-stats.json",
            render(schemars::schema_for!(api::JobStats)),
        ),
        (
            "api-run-counts-request.json",
            render(schemars::schema_for!(api::RunCountsRequest)),
        ),
        (
            "api-run-counts.json",
            render(schemars::schema_for!(api::RunCounts)),
        ),
    ]
}
