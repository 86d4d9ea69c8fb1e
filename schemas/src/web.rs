//! The HTTP API (`/api/v1` on a node's `--http` address): the types it adds to the
//! request/reply API of [`crate::api`].
//!
//! The HTTP API answers with the same results as `krest.api.*` (the node calls the same
//! service layer); what differs is the envelope: a result is the body itself, a page is an
//! [`ItemsPage`], and an error is an [`HttpError`] with an HTTP status.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{CatchingUp, ClusterStatus, ErrorCode, InvalidDocument, RunDetail, RunSummary};

/// The body of every HTTP API error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpError {
    /// What went wrong.
    pub error: HttpErrorDetail,
}

/// One HTTP API error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpErrorDetail {
    /// The kind (the same codes as the NATS API, plus `unauthorized` and `forbidden`).
    pub code: ErrorCode,
    /// A sentence for humans: the message the CLI shows for the same failure.
    pub message: String,
    /// The request field (query parameter or body field) at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For `invalid_job`: each invalid document with its problems.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid: Vec<InvalidDocument>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ItemsPage<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// The `cursor` query parameter that asks for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `GET /api/v1/runs`: one page of runs, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunsPage {
    /// The runs of this page.
    pub items: Vec<RunSummary>,
    /// The `cursor` query parameter that asks for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// Set when the answering node's database is behind the events stream (a new or
    /// restarted node replaying it): the page may miss recent runs or show them in an older
    /// state. The same notice as the NATS API's `runs.list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catching_up: Option<CatchingUp>,
}

/// `GET /api/v1/runs/{run}`: one page of a run's attempts and log lines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunDetailPage {
    /// The run, its args (first page) and this page's attempts and log lines.
    #[serde(flatten)]
    pub detail: RunDetail,
    /// The `cursor` query parameter of the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// Set when the answering node's database is behind the events stream: the run may be
    /// shown in an older state (as the NATS API's `runs.get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catching_up: Option<CatchingUp>,
}

/// `GET /api/v1/cron/preview`: the next fire times of a cron expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CronPreview {
    /// The expression as given.
    pub expr: String,
    /// The IANA time zone it was evaluated in.
    pub time_zone: String,
    /// The next fire times, in UTC.
    pub next: Vec<DateTime<Utc>>,
    /// The same times as local times of `timeZone` (`2026-01-01 09:00:00 CET`).
    pub local: Vec<String>,
}

/// `GET /api/v1/jobs/{job}/diff`: what changed between two revisions of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobDiff {
    /// `group.name`.
    pub job: String,
    /// The older revision.
    pub from: u64,
    /// The newer revision.
    pub to: u64,
    /// The fields that differ, in document order (secrets redacted on both sides).
    pub changes: Vec<FieldChange>,
}

/// One field that differs between two revisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldChange {
    /// JSON pointer of the field (`/cron`, `/headers/X-Token`).
    pub path: String,
    /// Its value in `from` (absent when added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    /// Its value in `to` (absent when removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

/// `GET /api/v1/cluster`: the cluster as `cluster.status` shows it, and the health of the
/// node answering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterHealth {
    /// Nodes and leader.
    pub cluster: ClusterStatus,
    /// The node that answered.
    pub node: NodeHealth,
}

/// The health of one node: the body of its `/readyz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeHealth {
    /// Connected to NATS, database writable, job table loaded and recorder keeping up.
    pub ready: bool,
    /// Node name.
    pub node: String,
    /// `leader` or `standby`.
    pub role: String,
    /// The leader's fencing epoch, while leading.
    pub epoch: Option<u64>,
    /// `connected` or `disconnected`.
    pub nats: String,
    /// `writable`, or why not.
    pub database: String,
    /// `loaded` once the node holds every job definition (only then does it campaign for
    /// the lease), or how far it has read them: `loading jobs: 412,000 read, 588,000 to go`.
    #[serde(default)]
    pub jobs: String,
    /// The recorder's progress.
    pub recorder: RecorderHealth,
}

/// How far the node's recorder is behind the events stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecorderHealth {
    /// Lag within `maxLagSeconds` and not failing.
    pub ok: bool,
    /// Stream sequence of the last event recorded.
    pub recorded_seq: u64,
    /// Last sequence of the events stream, as last measured.
    pub stream_seq: u64,
    /// Events not recorded yet.
    pub lag_events: u64,
    /// Age of the oldest event not recorded yet.
    pub lag_seconds: f64,
    /// Lag beyond which the node is not ready.
    pub max_lag_seconds: f64,
    /// Why the recorder is not progressing, while it is not.
    pub failing: Option<String>,
    /// The node's database is behind the events stream (a node replaying it): its answers to
    /// run queries may miss recent runs.
    #[serde(default)]
    pub catching_up: bool,
    /// Bad events parked since the node started.
    pub parked: u64,
    /// Bad events dropped since the node started.
    pub dropped: u64,
}

/// `POST /api/v1/jobs/{job}/trigger`: run a job now (the body may be empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerBody {
    /// Replaces the job's `args` for this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Idempotency key (letters, digits, `-`, `_`): requests with the same key make one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `POST /api/v1/session`: exchanges an API token for a console session cookie.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionRequest {
    /// The write or read token.
    pub token: String,
}

/// The console session: what it may do and the CSRF token its writes must send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    /// `read` or `write`; `anonymous` for a node with anonymous reads and no login.
    pub access: String,
    /// Send it back in the `X-Krest-Csrf` header of every write made with the session cookie.
    pub csrf: String,
}
