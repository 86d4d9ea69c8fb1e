//! The node side of the request/reply API (`krest.api.<op>`, queue group `krest-api`): every
//! node answers, so clients need only a NATS connection. Reads come from the node's job table
//! and database; writes go to the jobs bucket with revision checks (bulk applies pipelined, see
//! [`super::apply`]).
//!
//! Request bodies are parsed strictly ([`krest_schemas::json`]: a BOM is skipped, duplicate
//! keys are refused); user values echoed in errors are shortened ([`krest_schemas::text::echo`]);
//! every reply is a view with secrets redacted ([`krest_schemas::redact`]), and `job.apply`
//! resolves the redacted placeholders against the stored definition.
//!
//! Every reply fits in one NATS message: listings and `runs.get` are built a page at a time by
//! [`super::page`], bounded by the request's `limit` and by the server's `max_payload`, with a
//! `next` cursor when something was left for the next page; [`super::page::guard`] turns any
//! reply that would still be too large into a `too_large` error.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use krest_schemas::api::{
    ApiError, ApplyOutcome, ApplyRequest, ApplyResponse, ApplyResult, CancelResponse,
    ClusterStatus, DlqListRequest, ErrorCode, JobHistoryRequest, JobListRequest, JobRequest,
    JobRevision, JobStats, JobStatsRequest, JobStatus, JobView, LogView, Op, RunCounts,
    RunCountsRequest, RunGetRequest, RunRequest, RunStatus, RunSummary, RunsListRequest,
    TriggerRequest, TriggerResponse, WorkersListRequest,
};
use krest_schemas::names::{API_PREFIX, API_QUEUE_GROUP, NODES_BUCKET};
use krest_schemas::text::{echo, shorten_quoted};
use krest_schemas::{JobSpec, NodeInfo, Problem, Schedule, StoredJob, Trigger};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::page::{
    cap_args, cap_text, error_bytes, guard, result_budget, PageBuilder, PageError, Reply,
    RunPageBuilder,
};
use crate::infra::Infra;
use crate::jobs::{JobEntry, JobTable, ResolveError};
use crate::leader::dispatch::{manual_run_id, Fire, Publisher};
use crate::record::store::{RunStart, Store};

/// Everything the API reads and writes.
#[derive(Clone)]
pub struct ApiServer {
    /// NATS client (for replies and server info).
    pub client: async_nats::Client,
    /// Buckets and streams.
    pub infra: Infra,
    /// The node's job table.
    pub table: Arc<JobTable>,
    /// The node's database.
    pub store: Store,
    /// Publishes manual runs.
    pub publisher: Publisher,
    /// Addresses manual runs to instances.
    pub routing: Arc<crate::leader::balance::Routing>,
    /// This node's name.
    pub node: String,
    /// The recorder's progress (run queries say when the database is behind).
    pub recorder: crate::record::recorder::StatusRx,
}

/// An API failure: code and message.
#[derive(Debug)]
pub(super) struct Failure(pub(super) ApiError);

impl Failure {
    pub(super) fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure(ApiError {
            code,
            message: message.into(),
            invalid: Vec::new(),
        })
    }

    pub(super) fn internal(e: impl std::fmt::Display) -> Failure {
        Failure::new(ErrorCode::Internal, e.to_string())
    }

    fn cursor(cursor: &str) -> Failure {
        Failure::new(
            ErrorCode::BadRequest,
            format!(
                "malformed cursor `{}`: pass the `next` of the previous page as it is",
                echo(cursor)
            ),
        )
    }
}

impl From<PageError> for Failure {
    fn from(e: PageError) -> Self {
        match e {
            PageError::TooLarge { .. } => Failure::new(ErrorCode::TooLarge, e.to_string()),
            PageError::Encode(_) => Failure::internal(e),
        }
    }
}

impl From<ResolveError> for Failure {
    fn from(e: ResolveError) -> Self {
        let code = match e {
            ResolveError::NotFound(_) | ResolveError::Unknown { .. } => ErrorCode::NotFound,
            ResolveError::Ambiguous { .. } => ErrorCode::Ambiguous,
        };
        Failure::new(code, e.to_string())
    }
}

type Answer = Result<Reply, Failure>;

/// How long a write waits for this node's job table to show it, so the next request (to any
/// node, usually this one) reads it.
pub(super) const READ_YOUR_WRITES: std::time::Duration = std::time::Duration::from_secs(2);

/// Jobs (and workers) per page: default and most.
const MAX_PAGE: u32 = 10_000;

/// Attempts read from the database at a time while filling a `runs.get` page.
const ATTEMPT_BATCH: u32 = 256;

/// Log lines read from the database at a time while filling a `runs.get` page.
const LOG_BATCH: u32 = 1024;

fn to_value<T: Serialize>(v: T) -> Answer {
    Ok(Reply::of(&v)?)
}

/// Decodes a request body with the strict parser (a BOM is skipped; duplicate keys are an
/// error naming the key and its line and column). An empty body is `{}`.
fn body<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Failure> {
    let payload = krest_schemas::json::strip_bom(payload);
    let payload: &[u8] = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        payload
    };
    krest_schemas::json::parse_as(payload).map_err(|e| {
        Failure::new(
            ErrorCode::BadRequest,
            format!("malformed request: {}", shorten_quoted(&e.to_string())),
        )
    })
}

impl ApiServer {
    /// Serves requests until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let subscribed = crate::retry::until_ok(
            &stop,
            krest_schemas::Backoff::RECONNECT,
            "cannot subscribe to the API subjects",
            || async {
                self.client
                    .queue_subscribe(format!("{API_PREFIX}.>"), API_QUEUE_GROUP.to_string())
                    .await
                    .map_err(crate::retry::Failure::Retry)
            },
        )
        .await;
        let Ok(Some(mut sub)) = subscribed else {
            return;
        };
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let msg = tokio::select! {
                m = sub.next() => match m { Some(m) => m, None => break },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                _ = stop.cancelled() => break,
            };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let server = self.clone();
            tasks.spawn(async move {
                let op_name = msg.subject.as_str().strip_prefix(API_PREFIX).unwrap_or("").trim_start_matches('.');
                let answer = match Op::from_name(op_name) {
                    Some(op) => server.handle(op, &msg.payload).await,
                    None => Err(Failure::new(
                        ErrorCode::BadRequest,
                        format!("unknown operation `{}`", echo(op_name)),
                    )),
                };
                let message = match answer {
                    Ok(reply) => reply.into_bytes(),
                    Err(Failure(error)) => {
                        if error.code == ErrorCode::Internal {
                            tracing::warn!(op = op_name, error = %error.message, "API request failed");
                        }
                        error_bytes(error)
                    }
                };
                let message = guard(message, server.max_payload(), op_name);
                if let Err(e) = server.client.publish(reply, Bytes::from(message)).await {
                    tracing::warn!(error = %e, "cannot send API reply");
                }
            });
        }
        let _ = sub.unsubscribe().await;
        while tasks.join_next().await.is_some() {}
    }

    /// The largest message the connected server takes (requests and replies alike).
    pub(super) fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Answers one request exactly as the `krest.api.*` responder does (same parsing, checks,
    /// results and errors): the entry of the HTTP API ([`super::web`]), so both front ends share
    /// one service layer.
    pub(crate) async fn answer(&self, op: Op, payload: &[u8]) -> Result<Reply, ApiError> {
        self.handle(op, payload).await.map_err(|Failure(e)| e)
    }

    async fn handle(&self, op: Op, payload: &[u8]) -> Answer {
        match op {
            Op::JobApply => {
                let req: ApplyRequest = body(payload)?;
                let results = self.apply_documents(&req.documents).await?;
                to_value(ApplyResponse { results })
            }
            Op::JobList => self.list(body(payload)?),
            Op::JobGet => {
                let req: JobRequest = body(payload)?;
                match req.revision {
                    None => {
                        let key = self.resolve(&req.job).await?;
                        let entry = self
                            .table
                            .get(&key)
                            .ok_or_else(|| ResolveError::NotFound(req.job.clone()))?;
                        to_value(view(&key, &entry))
                    }
                    Some(revision) => to_value(self.revision(&req.job, revision).await?),
                }
            }
            Op::JobHistory => self.history(body(payload)?).await,
            Op::JobPause => self.set_running(body(payload)?, false).await,
            Op::JobResume => self.set_running(body(payload)?, true).await,
            Op::JobDelete => self.delete(body(payload)?).await,
            Op::JobTrigger => self.trigger(body(payload)?).await,
            Op::RunsList => self
                .runs_list(body(payload)?)
                .await
                .map(|r| self.noting_lag(r)),
            Op::RunsGet => self
                .run_get(body(payload)?)
                .await
                .map(|r| self.noting_lag(r)),
            Op::RunsCancel => {
                let req: RunRequest = body(payload)?;
                let Some((run, _)) = self
                    .store
                    .run_head(&req.run_id)
                    .await
                    .map_err(Failure::internal)?
                else {
                    return Err(no_run(&req.run_id));
                };
                if run.status.is_final() {
                    return Err(Failure::new(
                        ErrorCode::BadRequest,
                        format!(
                            "run {} already ended: {}",
                            echo(&req.run_id),
                            run.status.as_str()
                        ),
                    ));
                }
                crate::cancel::cancel(
                    &self.infra,
                    &self.client,
                    &req.run_id,
                    &run.app_name,
                    "cancelled by request",
                )
                .await
                .map_err(Failure::internal)?;
                to_value(CancelResponse {
                    run_id: req.run_id,
                    app_name: run.app_name,
                    status_before: run.status,
                })
            }
            Op::WorkersList => self.workers(body(payload)?).await,
            Op::ClusterStatus => to_value(self.cluster().await?),
            Op::DlqList => self.dlq(body(payload)?).await,
            Op::JobStats => to_value(self.job_stats(body(payload)?).await?),
            Op::RunsCounts => to_value(self.run_counts(body(payload)?).await?),
        }
    }

    /// `job.stats`: the newest run and figures over the newest ended ones.
    async fn job_stats(&self, req: JobStatsRequest) -> Result<JobStats, Failure> {
        let key = self.resolve_any(&req.job).await?;
        let (group, name) = key
            .split_once('.')
            .ok_or_else(|| Failure::new(ErrorCode::BadRequest, "a job is `group.name`"))?;
        let recent = req.recent.unwrap_or(100).clamp(1, 10_000);
        let (mut last, ended) = self
            .store
            .job_runs_ended(group, name, recent)
            .await
            .map_err(Failure::internal)?;
        if let Some(run) = last.as_mut() {
            run.redact_secrets();
            cap_summary(run, text_cap(self.max_payload()));
        }
        Ok(job_stats(key, last, &ended))
    }

    /// `runs.counts`: runs by status since a time.
    async fn run_counts(&self, req: RunCountsRequest) -> Result<RunCounts, Failure> {
        let counts = self
            .store
            .run_counts_since(req.since.timestamp_millis())
            .await
            .map_err(Failure::internal)?;
        Ok(RunCounts {
            since: req.since,
            counts: counts
                .into_iter()
                .map(|(status, n)| (status, u64::try_from(n).unwrap_or(0)))
                .collect(),
        })
    }

    /// The one-at-a-time write path of job definitions: reads the current revision, asks
    /// `next` for the new spec (given the current one, if any), writes it revision-checked
    /// (retrying when another write came in between), and waits until this node's table shows
    /// it. Identical specs are not written. (Bulk applies write pipelined and come here only
    /// for conflicts: [`ApiServer::write_specs`].)
    pub(super) async fn write_job(
        &self,
        key: &str,
        next: impl Fn(Option<&StoredJob>) -> Result<krest_schemas::JobSpec, Failure>,
    ) -> Result<ApplyResult, Failure> {
        for _ in 0..5 {
            let now = now_ms();
            let current = self
                .infra
                .jobs
                .entry(key)
                .await
                .map_err(Failure::internal)?;
            let existing = current
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put)
                .and_then(|e| serde_json::from_slice::<StoredJob>(&e.value).ok());
            let spec = next(existing.as_ref())?;
            // The number of what is there now — a definition or a deletion marker — so the
            // new definition takes the next one (a job applied again after its deletion
            // continues its numbers).
            let number = match &current {
                Some(entry) => crate::jobs::number_of(&self.infra.jobs, key, entry)
                    .await
                    .map_err(Failure::internal)?,
                None => 0,
            };
            if let Some(stored) = &existing {
                if stored.spec == spec {
                    return Ok(ApplyResult {
                        job: key.to_string(),
                        outcome: ApplyOutcome::Unchanged,
                        revision: number,
                    });
                }
            }
            let created_at = existing
                .as_ref()
                .map(|s| s.created_at)
                .or_else(|| {
                    spec.create_time
                        .as_deref()
                        .and_then(krest_schemas::job::parse_create_time)
                })
                .unwrap_or(now);
            let version = number + 1;
            let stored = StoredJob {
                spec,
                created_at,
                updated_at: now,
                version,
            };
            let value = Bytes::from(serde_json::to_vec(&stored).map_err(Failure::internal)?);
            let written = match &current {
                Some(entry) => self
                    .infra
                    .jobs
                    .update(key, value, entry.revision)
                    .await
                    .map_err(|e| e.to_string()),
                None => self
                    .infra
                    .jobs
                    .create(key, value)
                    .await
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(revision) => {
                    self.table
                        .wait_for(key, Some(revision), READ_YOUR_WRITES)
                        .await;
                    let outcome = if existing.is_some() {
                        ApplyOutcome::Updated
                    } else {
                        ApplyOutcome::Created
                    };
                    tracing::info!(job = %key, revision = version, ?outcome, "job written");
                    return Ok(ApplyResult {
                        job: key.to_string(),
                        outcome,
                        revision: version,
                    });
                }
                Err(e) => tracing::debug!(job = %key, error = %e, "concurrent write; retrying"),
            }
        }
        Err(Failure::internal(format!(
            "job {key} is being changed concurrently; try again"
        )))
    }

    /// The key of a job named `group.name` or by a name unique across groups. A name this
    /// node does not know is looked up again once its table has caught up with the jobs
    /// bucket: a job just applied through another node is found.
    async fn resolve(&self, name: &str) -> Result<String, ResolveError> {
        match self.table.resolve(name) {
            Err(ResolveError::Unknown { .. }) if self.table_is_fresh().await => {
                self.table.resolve(name)
            }
            other => other,
        }
    }

    /// The key of a job, current or deleted (a deleted one by `group.name` only).
    async fn resolve_any(&self, name: &str) -> Result<String, Failure> {
        match self.resolve(name).await {
            Ok(key) => Ok(key),
            Err(ResolveError::Unknown { .. }) if name.contains('.') || name.contains('/') => {
                Ok(name.replacen('/', ".", 1))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `job.history`: revisions newest first, from the cursor's revision number down.
    async fn history(&self, req: JobHistoryRequest) -> Answer {
        let limit = req.limit.unwrap_or(64).clamp(1, MAX_PAGE) as usize;
        let start = match req.cursor.as_deref() {
            None => u64::MAX,
            Some(c) => c.parse::<u64>().map_err(|_| Failure::cursor(c))?,
        };
        let key = self.resolve_any(&req.job).await?;
        let all = crate::jobs::numbered_history(&self.infra.jobs, &key)
            .await
            .map_err(Failure::internal)?;
        if all.is_empty() {
            return Err(ResolveError::NotFound(req.job.clone()).into());
        }
        let mut page = PageBuilder::new(limit, self.max_payload());
        for (entry, number) in all.into_iter().rev().filter(|(_, n)| *n <= start) {
            let (operation, spec) = match entry.operation {
                kv::Operation::Put => (
                    "PUT",
                    serde_json::from_slice::<StoredJob>(&entry.value)
                        .ok()
                        .map(|s| s.spec.redacted()),
                ),
                kv::Operation::Delete => ("DELETE", None),
                kv::Operation::Purge => ("PURGE", None),
            };
            let revision = JobRevision {
                revision: number,
                written_at: chrono::DateTime::from_timestamp(
                    entry.created.unix_timestamp(),
                    entry.created.nanosecond(),
                )
                .unwrap_or_default(),
                operation: operation.to_string(),
                spec,
            };
            let pushed = page.push(
                &revision,
                || number.to_string(),
                || (format!("revision {number} of job {key}"), String::new()),
            )?;
            if !pushed {
                break;
            }
        }
        Ok(page.finish())
    }

    /// `job.get` with a revision number: that definition, found in the key's history.
    async fn revision(&self, name: &str, revision: u64) -> Result<JobView, Failure> {
        let key = self.resolve_any(name).await?;
        let (entry, version) = crate::jobs::numbered_history(&self.infra.jobs, &key)
            .await
            .map_err(Failure::internal)?
            .into_iter()
            .rev()
            .find(|(e, n)| *n == revision && e.operation == kv::Operation::Put)
            .ok_or_else(|| {
                Failure::new(
                    ErrorCode::NotFound,
                    format!(
                        "job {key} has no revision {revision}: see `krest job history {key}`",
                        key = echo(&key)
                    ),
                )
            })?;
        let stored: StoredJob = serde_json::from_slice(&entry.value).map_err(Failure::internal)?;
        let mut v = view(
            &key,
            &JobEntry {
                stored,
                revision: entry.revision,
                version,
            },
        );
        v.next_fire_at = None;
        Ok(v)
    }

    /// `job.list`: jobs by key from the cursor on, read as a range of the job table.
    fn list(&self, req: JobListRequest) -> Answer {
        let limit = req.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE) as usize;
        let app = req.app.as_deref();
        let search = req.search.as_deref().map(str::to_lowercase);
        let running = req.status.map(|s| s == JobStatus::Running);
        let entries = self.table.page(
            req.cursor.as_deref(),
            req.group.as_deref(),
            |e| {
                let spec = &e.stored.spec;
                app.is_none_or(|a| spec.app_name == a)
                    && running.is_none_or(|r| spec.running == r)
                    && search
                        .as_deref()
                        .is_none_or(|s| spec.key().to_lowercase().contains(s))
            },
            limit + 1,
        );
        let mut page = PageBuilder::new(limit, self.max_payload());
        let mut views = Views::new();
        for (key, entry) in entries {
            let pushed = page.push(
                &views.view(&key, &entry),
                || key.clone(),
                || {
                    (
                        format!("job {key}"),
                        format!(", or delete the job (`krest job delete {key}`)"),
                    )
                },
            )?;
            if !pushed {
                break;
            }
        }
        Ok(page.finish())
    }

    async fn set_running(&self, req: JobRequest, running: bool) -> Answer {
        let key = self.resolve(&req.job).await?;
        // Pause and resume are revisions: `updatedAt` moves, so a resumed job does not catch
        // up the fires of its pause.
        self.write_job(&key, |current| {
            let mut spec = current
                .ok_or_else(|| ResolveError::NotFound(req.job.clone()))?
                .spec
                .clone();
            spec.running = running;
            Ok(spec)
        })
        .await?;
        let entry = self
            .table
            .get(&key)
            .ok_or_else(|| ResolveError::NotFound(req.job.clone()))?;
        to_value(view(&key, &entry))
    }

    /// `job.delete`: writes a deletion marker carrying the deletion's revision number
    /// ([`krest_schemas::job::DeletedJob`]), checked against the definition's bucket revision
    /// like any write, and answers the deleted definition's view with that number.
    ///
    /// With a `requestId`, a resend of a deletion already made answers with that deletion
    /// (found by its marker in the key's history) and changes nothing: not "no such job",
    /// and not a second deletion of the job applied again in between.
    async fn delete(&self, req: JobRequest) -> Answer {
        let request_id = match req.request_id.as_deref() {
            None => None,
            Some(id) if krest_schemas::names::is_token(id) => Some(id),
            Some(id) => {
                return Err(Failure::new(
                    ErrorCode::BadRequest,
                    format!(
                        "requestId `{}` must be a token: letters, digits, `-` and `_`",
                        krest_schemas::text::echo(id)
                    ),
                ))
            }
        };
        let key = match (self.resolve(&req.job).await, request_id) {
            (Ok(key), _) => key,
            // A deleted job is found by `group.name` only.
            (Err(e @ ResolveError::Unknown { .. }), Some(id)) if req.job.contains('.') => {
                let key = req.job.clone();
                return match self.own_deletion(&key, id).await? {
                    Some(done) => self.deleted(&key, done),
                    None => Err(e.into()),
                };
            }
            (Err(e), _) => return Err(e.into()),
        };
        if let Some(id) = request_id {
            if let Some(done) = self.own_deletion(&key, id).await? {
                return self.deleted(&key, done);
            }
        }
        let entry = self
            .table
            .get(&key)
            .ok_or_else(|| ResolveError::NotFound(req.job.clone()))?;
        let mut deleted = None;
        // The marker last published, with the definition it replaced: a publish whose
        // acknowledgement was lost may have been written all the same.
        let mut tried: Option<(StoredJob, u64)> = None;
        for _ in 0..5 {
            let current = self
                .infra
                .jobs
                .entry(key.as_str())
                .await
                .map_err(Failure::internal)?;
            let current = match current {
                Some(e) if e.operation == kv::Operation::Put => e,
                Some(e)
                    if e.operation == kv::Operation::Delete
                        && tried.as_ref().is_some_and(|(_, n)| {
                            Some(*n) == crate::jobs::recorded_number(&e.value)
                        }) =>
                {
                    deleted = tried;
                    break;
                }
                _ => return Err(ResolveError::NotFound(req.job.clone()).into()),
            };
            let number = crate::jobs::number_of(&self.infra.jobs, &key, &current)
                .await
                .map_err(Failure::internal)?;
            let marker = krest_schemas::job::DeletedJob {
                version: number + 1,
                request_id: request_id.map(str::to_string),
            };
            // What is deleted: the definition the marker replaces.
            let stored = serde_json::from_slice::<StoredJob>(&current.value)
                .unwrap_or_else(|_| entry.stored.clone());
            tried = Some((stored, marker.version));
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("KV-Operation", "DEL");
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                current.revision.to_string().as_str(),
            );
            let body = Bytes::from(serde_json::to_vec(&marker).map_err(Failure::internal)?);
            let written = match self
                .infra
                .js
                .send_publish(
                    format!("$KV.{}.{key}", krest_schemas::names::JOBS_BUCKET),
                    async_nats::jetstream::message::PublishMessage::build()
                        .payload(body)
                        .headers(headers),
                )
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match written {
                Ok(()) => {
                    deleted = tried;
                    break;
                }
                Err(e) => {
                    tracing::debug!(job = %key, error = %e, "concurrent write; retrying the delete")
                }
            }
        }
        let Some((stored, number)) = deleted else {
            return Err(Failure::internal(format!(
                "job {key} is being changed concurrently; try again"
            )));
        };
        self.table.wait_for(&key, None, READ_YOUR_WRITES).await;
        if let Err(e) = self.infra.state.purge(&key).await {
            tracing::warn!(job = %key, error = %e, "could not purge job state");
        }
        tracing::info!(job = %key, revision = number, "job deleted");
        self.deleted(&key, Deletion { stored, number })
    }

    /// The deletion of `key` that the `job.delete` with `request_id` made, if its marker is
    /// in the key's history. When that marker is still the key's last entry (no one applied
    /// the job again), the job's state is purged again: the first attempt may have stopped
    /// between the marker and the purge.
    async fn own_deletion(&self, key: &str, request_id: &str) -> Result<Option<Deletion>, Failure> {
        let history = crate::jobs::numbered_history(&self.infra.jobs, key)
            .await
            .map_err(Failure::internal)?;
        let mut last_put: Option<StoredJob> = None;
        for (i, (entry, number)) in history.iter().enumerate() {
            match entry.operation {
                kv::Operation::Put => last_put = serde_json::from_slice(&entry.value).ok(),
                kv::Operation::Delete => {
                    let ours =
                        serde_json::from_slice::<krest_schemas::job::DeletedJob>(&entry.value)
                            .is_ok_and(|m| m.request_id.as_deref() == Some(request_id));
                    let deleted = last_put.take();
                    let Some(stored) = deleted.filter(|_| ours) else {
                        continue;
                    };
                    if i + 1 == history.len() {
                        if let Err(e) = self.infra.state.purge(key).await {
                            tracing::warn!(job = %key, error = %e, "could not purge job state");
                        }
                    }
                    tracing::info!(job = %key, revision = number, "job.delete resent: answered with its deletion");
                    return Ok(Some(Deletion {
                        stored,
                        number: *number,
                    }));
                }
                kv::Operation::Purge => last_put = None,
            }
        }
        Ok(None)
    }

    /// `job.delete`'s answer: the deleted definition's view, with the deletion's number.
    fn deleted(&self, key: &str, done: Deletion) -> Answer {
        let mut v = view(
            key,
            &JobEntry {
                stored: done.stored,
                revision: 0,
                version: done.number,
            },
        );
        v.next_fire_at = None;
        to_value(v)
    }

    async fn trigger(&self, req: TriggerRequest) -> Answer {
        let key = self.resolve(&req.job).await?;
        let entry = self
            .table
            .get(&key)
            .ok_or_else(|| ResolveError::NotFound(req.job.clone()))?;
        let args = match req.args {
            None => entry.stored.spec.args.to_value(),
            Some(args) => {
                let mut spec = entry.stored.spec.clone();
                spec.args = krest_schemas::JobArgs::from(args);
                match spec.validate() {
                    Ok(spec) => spec.args.to_value(),
                    Err(e) => {
                        return Err(Failure::new(
                            ErrorCode::BadRequest,
                            e.problems
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join("; "),
                        ))
                    }
                }
            }
        };
        let now = Utc::now();
        let spec = &entry.stored.spec;
        let run_id = match req.request_id.as_deref() {
            Some(id) if krest_schemas::names::is_token(id) => {
                krest_schemas::names::manual_run_id(&spec.job_group, &spec.job_name, id)
            }
            Some(id) => {
                return Err(Failure::new(
                    ErrorCode::BadRequest,
                    format!(
                        "requestId `{}` must be 1 to 64 letters, digits, `-` or `_`",
                        echo(id)
                    ),
                ))
            }
            None => manual_run_id(&spec.job_group, &spec.job_name, now),
        };
        let fire = Fire {
            run_id,
            job: entry.clone(),
            scheduled_at: now,
            trigger: Trigger::Manual,
            misfired: 0,
            args,
            skip: None,
            parent_run_id: None,
            shards: None,
            epoch: None,
            not_before: None,
        };
        let mut fires = [fire];
        self.routing.assign(&mut fires, None).await;
        let [fire] = fires;
        if let Some(reason) = &fire.skip {
            return Err(Failure::new(ErrorCode::BadRequest, reason.clone()));
        }
        let shard_total = u32::try_from(fire.shard_plans().len()).unwrap_or(u32::MAX);
        if let Some(Err(e)) = self
            .publisher
            .publish(std::slice::from_ref(&fire))
            .await
            .pop()
        {
            return Err(Failure::internal(e));
        }
        tracing::info!(run = %fire.run_id, "manual run dispatched");
        to_value(TriggerResponse {
            run_id: fire.run_id,
            shard_total,
        })
    }

    /// A run query's reply, saying so when this node's database is behind the events stream.
    fn noting_lag(&self, mut reply: Reply) -> Reply {
        reply.catching_up =
            crate::record::recorder::catching_up(&self.node, &self.recorder.borrow());
        reply
    }

    /// `runs.list`: newest first, from the cursor's run on.
    async fn runs_list(&self, req: RunsListRequest) -> Answer {
        let limit = req.limit.unwrap_or(20).clamp(1, 1000);
        let start = req.cursor.as_deref().map(parse_run_cursor).transpose()?;
        let first_page = start.is_none();
        // A deleted job's runs are still listed by `group.name` or bare name; a name that is
        // no job's and has no runs is an error with the closest names, not an empty list.
        let mut unknown = None;
        let job = match req.job.as_deref() {
            None => None,
            Some(name) => Some(match self.resolve(name).await {
                Ok(key) => key,
                Err(e @ ResolveError::Unknown { .. }) => {
                    unknown = Some(e);
                    name.to_string()
                }
                Err(e) => return Err(e.into()),
            }),
        };
        let filter = job.as_deref().map(|k| match k.split_once('.') {
            Some((group, name)) => (name, Some(group)),
            None => (k, None),
        });
        let runs = self
            .store
            .list_runs(
                &crate::record::store::RunFilter {
                    job: filter,
                    app: req.app.as_deref(),
                    status: req.status,
                    since_ms: req.since.map(|t| t.timestamp_millis()),
                    until_ms: req.until.map(|t| t.timestamp_millis()),
                },
                limit + 1,
                start,
            )
            .await
            .map_err(Failure::internal)?;
        if let Some(e) = unknown.filter(|_| runs.is_empty() && first_page) {
            return Err(e.into());
        }
        let max_payload = self.max_payload();
        let cap = text_cap(max_payload);
        let mut page = PageBuilder::new(limit as usize, max_payload);
        for mut run in runs {
            run.redact_secrets();
            cap_summary(&mut run, cap);
            let pushed = page.push(
                &run,
                || run_cursor(&run),
                || (format!("run {}", run.run_id), String::new()),
            )?;
            if !pushed {
                break;
            }
        }
        Ok(page.finish())
    }

    /// `runs.get`: the run, then its attempts and their log lines in (shard, attempt, seq)
    /// order from the cursor on, as many as fit.
    async fn run_get(&self, req: RunGetRequest) -> Answer {
        let limit = req.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE) as usize;
        let start = req
            .cursor
            .as_deref()
            .map(parse_run_get_cursor)
            .transpose()?;
        let Some((mut run, args)) = self
            .store
            .run_head(&req.run_id)
            .await
            .map_err(Failure::internal)?
        else {
            return Err(no_run(&req.run_id));
        };
        let max_payload = self.max_payload();
        let cap = text_cap(max_payload);
        run.redact_secrets();
        cap_summary(&mut run, cap);
        // Args on the first page only.
        let args = match start {
            None => args.map(|a| cap_args(a, 2 * cap)),
            Some(_) => None,
        };
        let mut page = RunPageBuilder::start(&run, args.as_ref(), limit, max_payload)?;
        let start = start.unwrap_or(RunStart {
            shard: 0,
            attempt: 0,
            seq: 0,
        });
        let mut from = (start.shard, start.attempt);
        'batches: loop {
            let attempts = self
                .store
                .attempts_from(&req.run_id, from, ATTEMPT_BATCH)
                .await
                .map_err(Failure::internal)?;
            let (Some(first), Some(last)) = (attempts.first(), attempts.last()) else {
                break;
            };
            let log_start = if (first.shard, first.attempt) == (start.shard, start.attempt) {
                start
            } else {
                RunStart {
                    shard: first.shard,
                    attempt: first.attempt,
                    seq: 0,
                }
            };
            let mut logs = LogFeed::new(log_start, (last.shard, last.attempt));
            let full_batch = attempts.len() as u32 == ATTEMPT_BATCH;
            from = (last.shard, last.attempt.saturating_add(1));
            for mut attempt in attempts {
                let (shard, number) = (attempt.shard, attempt.attempt);
                attempt.redact_secrets();
                for text in [&mut attempt.output, &mut attempt.error]
                    .into_iter()
                    .flatten()
                {
                    cap_text(text, cap);
                }
                if !page.open_attempt(&attempt, || format!("{shard}.{number}"))? {
                    break 'batches;
                }
                while let Some(mut line) = logs
                    .next_for(&self.store, &req.run_id, shard, number)
                    .await?
                {
                    if let std::borrow::Cow::Owned(redacted) =
                        krest_schemas::redact::text(&line.line)
                    {
                        line.line = redacted;
                    }
                    cap_text(&mut line.line, cap);
                    let seq = line.seq;
                    if !page.push_log(&line, || format!("{shard}.{number}.{seq}"))? {
                        break 'batches;
                    }
                }
            }
            if !full_batch {
                break;
            }
        }
        let (attempts_left, logs_left) = match page.next().map(parse_run_get_cursor) {
            Some(Ok(next)) => self
                .store
                .left_from(&req.run_id, next)
                .await
                .map_err(Failure::internal)?,
            _ => (0, 0),
        };
        Ok(page.finish(attempts_left, logs_left))
    }

    /// `workers.list`: by app and instance from the cursor on, only `app`'s if given. The
    /// first page reads the registry now; the following ones page through the same view.
    async fn workers(&self, req: WorkersListRequest) -> Answer {
        let limit = req.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE) as usize;
        let live = match &req.cursor {
            None => self.routing.live_now().await,
            Some(_) => self.routing.live(),
        };
        let start = match req.cursor.as_deref() {
            None => None,
            Some(c) => Some(c.split_once('.').ok_or_else(|| Failure::cursor(c))?),
        };
        let mut page = PageBuilder::new(limit, self.max_payload());
        let from = live.iter().filter(|w| {
            req.app.as_deref().is_none_or(|app| w.app_name == app)
                && start.is_none_or(|(app, instance)| {
                    (w.app_name.as_str(), w.instance.as_str()) >= (app, instance)
                })
        });
        for worker in from {
            let key = || format!("{}.{}", worker.app_name, worker.instance);
            let pushed = page.push(worker, key, || (format!("worker {}", key()), String::new()))?;
            if !pushed {
                break;
            }
        }
        Ok(page.finish())
    }

    /// `dlq.list`: newest first, from the cursor's sequence down.
    async fn dlq(&self, req: DlqListRequest) -> Answer {
        let limit = req.limit.unwrap_or(20).clamp(1, 1000) as usize;
        let start = match req.cursor.as_deref() {
            None => None,
            Some(c) => Some(c.parse::<u64>().map_err(|_| Failure::cursor(c))?),
        };
        let letters = crate::deadletter::list(&self.infra.js, start, limit + 1)
            .await
            .map_err(Failure::internal)?;
        let mut page = PageBuilder::new(limit, self.max_payload());
        for letter in &letters {
            let pushed = page.push(
                letter,
                || letter.seq.to_string(),
                || (format!("dead letter {}", letter.seq), String::new()),
            )?;
            if !pushed {
                break;
            }
        }
        Ok(page.finish())
    }

    async fn cluster(&self) -> Result<ClusterStatus, Failure> {
        let leader = crate::leader::lease::current(&self.infra.leader)
            .await
            .map_err(Failure::internal)?;
        let mut nodes: Vec<NodeInfo> = crate::infra::kv_values(&self.infra.js, NODES_BUCKET)
            .await
            .map_err(Failure::internal)?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(ClusterStatus {
            leader,
            nodes,
            nats_server: self.client.server_info().version,
        })
    }
}

/// The longest output, error or log line put in a reply: an eighth of the reply.
fn text_cap(max_payload: usize) -> usize {
    result_budget(max_payload) / 8
}

/// Caps a summary's output and error (the attempts have them too).
fn cap_summary(run: &mut RunSummary, cap: usize) {
    for text in [&mut run.output, &mut run.error].into_iter().flatten() {
        cap_text(text, cap);
    }
}

/// `runs.list` cursor of a run: `<scheduled epoch ms>:<run id>` (`-` for no time).
fn run_cursor(run: &RunSummary) -> String {
    match run.scheduled_at {
        Some(t) => format!("{}:{}", t.timestamp_millis(), run.run_id),
        None => format!("-:{}", run.run_id),
    }
}

fn parse_run_cursor(cursor: &str) -> Result<(Option<i64>, String), Failure> {
    let (at, id) = cursor
        .split_once(':')
        .ok_or_else(|| Failure::cursor(cursor))?;
    let at = match at {
        "-" => None,
        ms => Some(ms.parse::<i64>().map_err(|_| Failure::cursor(cursor))?),
    };
    Ok((at, id.to_string()))
}

/// `runs.get` cursor: `<shard>.<attempt>` (the attempt and all its lines) or
/// `<shard>.<attempt>.<seq>` (the attempt again, its lines from `seq`).
fn parse_run_get_cursor(cursor: &str) -> Result<RunStart, Failure> {
    let mut parts = cursor.split('.').map(str::parse::<u32>);
    let mut next = || {
        parts
            .next()
            .transpose()
            .map_err(|_| Failure::cursor(cursor))
    };
    let (Some(shard), Some(attempt)) = (next()?, next()?) else {
        return Err(Failure::cursor(cursor));
    };
    let seq = next()?.unwrap_or(0);
    if next()?.is_some() {
        return Err(Failure::cursor(cursor));
    }
    Ok(RunStart {
        shard,
        attempt,
        seq,
    })
}

/// The log lines of a batch of attempts, read in key order a thousand at a time and handed
/// out attempt by attempt.
struct LogFeed {
    buf: VecDeque<(u32, u32, LogView)>,
    from: RunStart,
    until: (u32, u32),
    done: bool,
}

impl LogFeed {
    fn new(from: RunStart, until: (u32, u32)) -> LogFeed {
        LogFeed {
            buf: VecDeque::new(),
            from,
            until,
            done: false,
        }
    }

    /// The next line of attempt `(shard, attempt)`; attempts must be asked in order.
    async fn next_for(
        &mut self,
        store: &Store,
        run_id: &str,
        shard: u32,
        attempt: u32,
    ) -> Result<Option<LogView>, Failure> {
        loop {
            match self.buf.front() {
                Some((s, a, _)) if (*s, *a) < (shard, attempt) => {
                    // Lines of an attempt with no attempt row: not shown (as before paging).
                    self.buf.pop_front();
                }
                Some((s, a, _)) if (*s, *a) == (shard, attempt) => {
                    return Ok(self.buf.pop_front().map(|(_, _, l)| l));
                }
                Some(_) => return Ok(None),
                None if self.done => return Ok(None),
                None => {
                    let lines = store
                        .logs_between(run_id, self.from, self.until, LOG_BATCH)
                        .await
                        .map_err(Failure::internal)?;
                    self.done = (lines.len() as u32) < LOG_BATCH;
                    if let Some((s, a, l)) = lines.last() {
                        self.from = RunStart {
                            shard: *s,
                            attempt: *a,
                            seq: l.seq.saturating_add(1),
                        };
                    }
                    self.buf.extend(lines);
                }
            }
        }
    }
}

/// What `job.apply` requires of a valid definition beyond validation, given the stored one it
/// replaces: its secret placeholders resolved ([`JobSpec::restore_secrets`]), then checked again
/// (a restored secret counts toward the limits), and an `at` that is not in the past unless
/// unchanged ([`JobSpec::check_at`]). The `at` check lives here, not in `validate`: it depends
/// on the stored revision and the clock, and `validate` also re-checks stored definitions and
/// manual-trigger args, where an `at` gone by is normal.
pub(super) fn prepare(
    spec: &JobSpec,
    stored: Option<&JobSpec>,
    now: chrono::DateTime<Utc>,
) -> Result<JobSpec, krest_schemas::InvalidJob> {
    let invalid = |problems: Vec<Problem>| krest_schemas::InvalidJob {
        job: Some(spec.key()),
        problems,
    };
    let original = spec;
    let mut spec = spec.clone();
    let mut problems = Vec::new();
    if let Err(p) = spec.check_at(stored, now) {
        problems.push(p);
    }
    if let Err(p) = spec.restore_secrets(stored) {
        problems.extend(p);
    }
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    if spec == *original {
        // No placeholder resolved: `original` passed `validate` already (bulk applies check
        // thousands of definitions; a second validation is measurable).
        return Ok(spec);
    }
    spec.validate()
}

/// Figures over ended runs (status, duration in ms if the run started), newest first.
fn job_stats(
    job: String,
    last_run: Option<RunSummary>,
    ended: &[(RunStatus, Option<i64>)],
) -> JobStats {
    let count = |f: &dyn Fn(RunStatus) -> bool| {
        u32::try_from(ended.iter().filter(|(s, _)| f(*s)).count()).unwrap_or(u32::MAX)
    };
    let succeeded = count(&|s| s == RunStatus::Succeeded);
    let failed = count(&|s| matches!(s, RunStatus::Failed | RunStatus::TimedOut));
    let mut durations: Vec<i64> = ended.iter().filter_map(|(_, d)| *d).collect();
    durations.sort_unstable();
    // Nearest-rank percentile.
    let pct = |p: usize| {
        (!durations.is_empty()).then(|| durations[(durations.len() * p).div_ceil(100).max(1) - 1])
    };
    JobStats {
        job,
        last_run,
        ended: u32::try_from(ended.len()).unwrap_or(u32::MAX),
        succeeded,
        failed,
        success_rate: (succeeded + failed > 0)
            .then(|| f64::from(succeeded) / f64::from(succeeded + failed)),
        p50_ms: pct(50),
        p95_ms: pct(95),
        max_ms: durations.last().copied(),
    }
}

fn no_run(run_id: &str) -> Failure {
    Failure::new(
        ErrorCode::NotFound,
        format!(
            "no run `{}` recorded (yet): see `krest runs list`",
            echo(run_id)
        ),
    )
}

/// The API's view of a job, with its next fire time computed now. Secrets are redacted.
pub fn view(key: &str, entry: &JobEntry) -> JobView {
    Views::new().view(key, entry)
}

/// Builds the views of many jobs (a page), parsing each distinct cron expression once.
struct Views {
    now: chrono::DateTime<Utc>,
    parsed: HashMap<(String, String), Option<Schedule>>,
}

impl Views {
    fn new() -> Views {
        Views {
            now: Utc::now(),
            parsed: HashMap::new(),
        }
    }

    fn view(&mut self, key: &str, entry: &JobEntry) -> JobView {
        let spec = &entry.stored.spec;
        let next_fire_at = if !spec.running {
            None
        } else if let Some(expr) = &spec.cron {
            let now = self.now;
            self.parsed
                .entry((expr.to_string(), spec.time_zone.to_string()))
                .or_insert_with(|| spec.schedule(entry.stored.created_at).and_then(Result::ok))
                .as_ref()
                .and_then(|s| s.next_after(now))
        } else {
            spec.schedule(entry.stored.created_at)
                .and_then(Result::ok)
                .and_then(|s| s.next_after(self.now))
        };
        JobView {
            key: key.to_string(),
            spec: spec.redacted(),
            revision: entry.version,
            created_at: entry.stored.created_at,
            updated_at: entry.stored.updated_at,
            next_fire_at,
        }
    }
}

/// Now, to the millisecond: stored times are kept at the precision of fire times and run ids.
pub(super) fn now_ms() -> chrono::DateTime<Utc> {
    let now = Utc::now();
    chrono::DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// A deletion `job.delete` made: the definition it deleted and its revision number.
struct Deletion {
    stored: StoredJob,
    number: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_stats_count_rates_and_percentiles() {
        let ended: Vec<(RunStatus, Option<i64>)> = (1..=20)
            .map(|i| {
                let status = match i % 10 {
                    0 => RunStatus::Failed,
                    5 => RunStatus::TimedOut,
                    7 => RunStatus::Cancelled,
                    _ => RunStatus::Succeeded,
                };
                (status, Some(i * 100))
            })
            .chain([(RunStatus::Skipped, None)])
            .collect();
        let s = job_stats("g.j".into(), None, &ended);
        assert_eq!((s.ended, s.succeeded, s.failed), (21, 14, 4));
        assert_eq!(s.success_rate, Some(14.0 / 18.0));
        assert_eq!(s.p50_ms, Some(1000));
        assert_eq!(s.p95_ms, Some(1900));
        assert_eq!(s.max_ms, Some(2000));
        let none = job_stats("g.j".into(), None, &[]);
        assert_eq!(
            (none.success_rate, none.p50_ms, none.max_ms),
            (None, None, None)
        );
    }
}
