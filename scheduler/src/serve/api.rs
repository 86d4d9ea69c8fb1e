//! The node side of the request/reply API (`krest.api.<op>`, queue group `krest-api`): every
//! node answers, so clients need only a NATS connection. Reads come from the node's job table
//! and database; writes go to the jobs bucket with revision checks.
//!
//! Request bodies are parsed strictly ([`krest_schemas::json`]: a BOM is skipped, duplicate
//! keys are refused); user values echoed in errors are shortened ([`krest_schemas::text::echo`]);
//! every reply is a view with secrets redacted ([`krest_schemas::redact`]), and `job.apply`
//! resolves the redacted placeholders against the stored definition.

use std::sync::Arc;

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use krest_schemas::api::{
    ApiError, ApiReply, ApplyOutcome, ApplyRequest, ApplyResponse, ApplyResult, CancelResponse,
    ClusterStatus, DlqListRequest, ErrorCode, InvalidDocument, JobListRequest, JobRequest,
    JobRevision, JobView, Op, RunRequest, RunsListRequest, TriggerRequest, TriggerResponse,
};
use krest_schemas::names::{API_PREFIX, API_QUEUE_GROUP, NODES_BUCKET};
use krest_schemas::text::{echo, shorten_quoted};
use krest_schemas::{parse_job, JobSpec, NodeInfo, Problem, StoredJob, Trigger, WorkerInfo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::infra::Infra;
use crate::jobs::{JobEntry, JobTable, ResolveError};
use crate::leader::dispatch::{manual_run_id, Fire, Publisher};
use crate::record::store::Store;

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
}

/// An API failure: code and message.
#[derive(Debug)]
struct Failure(ApiError);

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure(ApiError {
            code,
            message: message.into(),
            invalid: Vec::new(),
        })
    }

    fn internal(e: impl std::fmt::Display) -> Failure {
        Failure::new(ErrorCode::Internal, e.to_string())
    }
}

impl From<ResolveError> for Failure {
    fn from(e: ResolveError) -> Self {
        let code = match e {
            ResolveError::NotFound(_) => ErrorCode::NotFound,
            ResolveError::Ambiguous { .. } => ErrorCode::Ambiguous,
        };
        Failure::new(code, e.to_string())
    }
}

type Answer = Result<serde_json::Value, Failure>;

/// How long a write waits for this node's job table to show it, so the next request (to any
/// node, usually this one) reads it.
const READ_YOUR_WRITES: std::time::Duration = std::time::Duration::from_secs(2);

fn to_value<T: Serialize>(v: T) -> Answer {
    serde_json::to_value(v).map_err(Failure::internal)
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
                let reply_body = match answer {
                    Ok(result) => ApiReply { ok: true, result: Some(result), error: None },
                    Err(Failure(error)) => {
                        if error.code == ErrorCode::Internal {
                            tracing::warn!(op = op_name, error = %error.message, "API request failed");
                        }
                        ApiReply { ok: false, result: None, error: Some(error) }
                    }
                };
                let bytes = serde_json::to_vec(&reply_body).unwrap_or_default();
                if let Err(e) = server.client.publish(reply, Bytes::from(bytes)).await {
                    tracing::warn!(error = %e, "cannot send API reply");
                }
            });
        }
        let _ = sub.unsubscribe().await;
        while tasks.join_next().await.is_some() {}
    }

    async fn handle(&self, op: Op, payload: &[u8]) -> Answer {
        match op {
            Op::JobApply => self.apply(body(payload)?).await,
            Op::JobList => self.list(body(payload)?),
            Op::JobGet => {
                let req: JobRequest = body(payload)?;
                match req.revision {
                    None => {
                        let key = self.table.resolve(&req.job)?;
                        let entry = self
                            .table
                            .get(&key)
                            .ok_or_else(|| ResolveError::NotFound(req.job.clone()))?;
                        to_value(view(&key, &entry))
                    }
                    Some(revision) => to_value(self.revision(&req.job, revision).await?),
                }
            }
            Op::JobHistory => {
                let req: JobRequest = body(payload)?;
                to_value(self.history(&req.job).await?)
            }
            Op::JobPause => self.set_running(body(payload)?, false).await,
            Op::JobResume => self.set_running(body(payload)?, true).await,
            Op::JobDelete => self.delete(body(payload)?).await,
            Op::JobTrigger => self.trigger(body(payload)?).await,
            Op::RunsList => self.runs_list(body(payload)?).await,
            Op::RunsGet => {
                let req: RunRequest = body(payload)?;
                match self
                    .store
                    .get_run(&req.run_id)
                    .await
                    .map_err(Failure::internal)?
                {
                    Some(mut d) => {
                        d.redact_secrets();
                        to_value(d)
                    }
                    None => Err(no_run(&req.run_id)),
                }
            }
            Op::RunsCancel => {
                let req: RunRequest = body(payload)?;
                let Some(d) = self
                    .store
                    .get_run(&req.run_id)
                    .await
                    .map_err(Failure::internal)?
                else {
                    return Err(no_run(&req.run_id));
                };
                if d.run.status.is_final() {
                    return Err(Failure::new(
                        ErrorCode::BadRequest,
                        format!(
                            "run {} already ended: {}",
                            echo(&req.run_id),
                            d.run.status.as_str()
                        ),
                    ));
                }
                crate::cancel::cancel(
                    &self.infra,
                    &self.client,
                    &req.run_id,
                    &d.run.app_name,
                    "cancelled by request",
                )
                .await
                .map_err(Failure::internal)?;
                to_value(CancelResponse {
                    run_id: req.run_id,
                    app_name: d.run.app_name,
                    status_before: d.run.status,
                })
            }
            Op::WorkersList => to_value(self.workers().await?),
            Op::ClusterStatus => to_value(self.cluster().await?),
            Op::DlqList => {
                let req: DlqListRequest = body(payload)?;
                let limit = req.limit.unwrap_or(20).clamp(1, 1000) as usize;
                to_value(
                    crate::deadletter::list(&self.infra.js, limit)
                        .await
                        .map_err(Failure::internal)?,
                )
            }
        }
    }

    async fn apply(&self, req: ApplyRequest) -> Answer {
        let mut invalid = Vec::new();
        let mut specs = Vec::new();
        let now = Utc::now();
        for (index, doc) in req.documents.iter().enumerate() {
            // Checked here against this node's table so that nothing is written when any
            // document is wrong; `put_job` checks again against the revision it replaces.
            let checked = parse_job(doc).and_then(|spec| {
                let stored = self.table.get(&spec.key());
                prepare(&spec, stored.as_ref().map(|e| &e.stored.spec), now).map(|_| spec)
            });
            match checked {
                Ok(spec) => {
                    let duplicate = specs
                        .iter()
                        .find(|(_, s): &&(usize, krest_schemas::JobSpec)| s.key() == spec.key())
                        .map(|(i, _)| *i);
                    if let Some(first) = duplicate {
                        invalid.push(InvalidDocument {
                            index,
                            job: Some(spec.key()),
                            problems: vec![krest_schemas::Problem {
                                field: String::new(),
                                message: format!("defines the same job as document {first}"),
                            }],
                        });
                    } else {
                        specs.push((index, spec));
                    }
                }
                Err(e) => invalid.push(InvalidDocument {
                    index,
                    job: e.job,
                    problems: e.problems,
                }),
            }
        }
        if req.documents.is_empty() {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                "no job definitions given",
            ));
        }
        invalid.extend(self.check_children(&specs));
        invalid.sort_by_key(|d| d.index);
        if !invalid.is_empty() {
            let n = invalid.len();
            return Err(Failure(ApiError {
                code: ErrorCode::InvalidJob,
                message: format!(
                    "{n} of {} definitions are invalid; nothing was applied",
                    req.documents.len()
                ),
                invalid,
            }));
        }
        let mut results = Vec::new();
        for (index, spec) in specs {
            results.push(self.put_job(index, spec).await?);
        }
        to_value(ApplyResponse { results })
    }

    /// Child jobs must exist (already, or in this apply) and never lead back to their parent.
    fn check_children(&self, specs: &[(usize, krest_schemas::JobSpec)]) -> Vec<InvalidDocument> {
        let mut graph: std::collections::HashMap<String, Vec<String>> = self
            .table
            .all()
            .into_iter()
            .map(|(k, e)| (k, e.stored.spec.child_keys()))
            .collect();
        for (_, spec) in specs {
            graph.insert(spec.key(), spec.child_keys());
        }
        let mut invalid = Vec::new();
        for (index, spec) in specs {
            let mut problems = Vec::new();
            for child in spec.child_keys() {
                if !graph.contains_key(&child) {
                    problems.push(krest_schemas::Problem {
                        field: "childJobs".into(),
                        message: format!("no job `{child}`: apply it first, or in the same file"),
                    });
                }
            }
            if let Some(cycle) = find_cycle(&graph, &spec.key()) {
                problems.push(krest_schemas::Problem {
                    field: "childJobs".into(),
                    message: format!("child jobs form a cycle: {}", cycle.join(" → ")),
                });
            }
            if !problems.is_empty() {
                invalid.push(InvalidDocument {
                    index: *index,
                    job: Some(spec.key()),
                    problems,
                });
            }
        }
        invalid
    }

    /// Writes one validated spec with a revision check, retrying on a concurrent write. Its
    /// secret placeholders are resolved, and its `at` checked, against the revision it
    /// replaces.
    async fn put_job(
        &self,
        index: usize,
        spec: krest_schemas::JobSpec,
    ) -> Result<ApplyResult, Failure> {
        let key = spec.key();
        let now = Utc::now();
        self.write_job(&key, |current| {
            prepare(&spec, current.map(|s| &s.spec), now).map_err(|e| {
                Failure(ApiError {
                    code: ErrorCode::InvalidJob,
                    message: format!(
                        "job {key} changed while being applied and document {index} no longer fits it; the documents before it were applied, the rest were not"
                    ),
                    invalid: vec![InvalidDocument {
                        index,
                        job: e.job,
                        problems: e.problems,
                    }],
                })
            })
        })
        .await
    }

    /// The one write path of job definitions: reads the current revision, asks `next` for the
    /// new spec (given the current one, if any), writes it revision-checked (retrying when
    /// another write came in between), and waits until this node's table shows it. Identical
    /// specs are not written.
    async fn write_job(
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
                .and_then(|e| {
                    serde_json::from_slice::<StoredJob>(&e.value)
                        .ok()
                        .map(|s| (s, e.revision))
                });
            let spec = next(existing.as_ref().map(|(s, _)| s))?;
            if let Some((stored, revision)) = &existing {
                if stored.spec == spec {
                    return Ok(ApplyResult {
                        job: key.to_string(),
                        outcome: ApplyOutcome::Unchanged,
                        revision: *revision,
                    });
                }
            }
            let created_at = existing
                .as_ref()
                .map(|(s, _)| s.created_at)
                .or_else(|| {
                    spec.create_time
                        .as_deref()
                        .and_then(krest_schemas::job::parse_create_time)
                })
                .unwrap_or(now);
            let stored = StoredJob {
                spec,
                created_at,
                updated_at: now,
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
                    tracing::info!(job = %key, revision, ?outcome, "job written");
                    return Ok(ApplyResult {
                        job: key.to_string(),
                        outcome,
                        revision,
                    });
                }
                Err(e) => tracing::debug!(job = %key, error = %e, "concurrent write; retrying"),
            }
        }
        Err(Failure::internal(format!(
            "job {key} is being changed concurrently; try again"
        )))
    }

    /// The key of a job, current or deleted (a deleted one by `group.name` only).
    fn resolve_any(&self, name: &str) -> Result<String, Failure> {
        match self.table.resolve(name) {
            Ok(key) => Ok(key),
            Err(ResolveError::NotFound(_)) if name.contains('.') || name.contains('/') => {
                Ok(name.replacen('/', ".", 1))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn history(&self, name: &str) -> Result<Vec<JobRevision>, Failure> {
        let key = self.resolve_any(name)?;
        let mut entries = self
            .infra
            .jobs
            .history(&key)
            .await
            .map_err(Failure::internal)?;
        let mut out = Vec::new();
        while let Some(entry) = entries.next().await {
            let entry = entry.map_err(Failure::internal)?;
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
            out.push(JobRevision {
                revision: entry.revision,
                written_at: chrono::DateTime::from_timestamp(
                    entry.created.unix_timestamp(),
                    entry.created.nanosecond(),
                )
                .unwrap_or_default(),
                operation: operation.to_string(),
                spec,
            });
        }
        if out.is_empty() {
            return Err(ResolveError::NotFound(name.to_string()).into());
        }
        out.reverse();
        Ok(out)
    }

    async fn revision(&self, name: &str, revision: u64) -> Result<JobView, Failure> {
        let key = self.resolve_any(name)?;
        let entry = self
            .infra
            .jobs
            .entry_for_revision(&key, revision)
            .await
            .map_err(Failure::internal)?
            .filter(|e| e.operation == kv::Operation::Put)
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
        let mut v = view(&key, &JobEntry { stored, revision });
        v.next_fire_at = None;
        Ok(v)
    }

    fn list(&self, req: JobListRequest) -> Answer {
        let mut jobs: Vec<JobView> = self
            .table
            .all()
            .into_iter()
            .filter(|(_, e)| {
                req.app
                    .as_deref()
                    .is_none_or(|a| e.stored.spec.app_name == a)
            })
            .filter(|(_, e)| {
                req.group
                    .as_deref()
                    .is_none_or(|g| e.stored.spec.job_group == g)
            })
            .map(|(k, e)| view(&k, &e))
            .collect();
        jobs.sort_by(|a, b| a.key.cmp(&b.key));
        to_value(jobs)
    }

    async fn set_running(&self, req: JobRequest, running: bool) -> Answer {
        let key = self.table.resolve(&req.job)?;
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

    async fn delete(&self, req: JobRequest) -> Answer {
        let key = self.table.resolve(&req.job)?;
        let entry = self
            .table
            .get(&key)
            .ok_or_else(|| ResolveError::NotFound(req.job.clone()))?;
        self.infra
            .jobs
            .delete(&key)
            .await
            .map_err(Failure::internal)?;
        self.table.wait_for(&key, None, READ_YOUR_WRITES).await;
        if let Err(e) = self.infra.state.purge(&key).await {
            tracing::warn!(job = %key, error = %e, "could not purge job state");
        }
        tracing::info!(job = %key, "job deleted");
        to_value(view(&key, &entry))
    }

    async fn trigger(&self, req: TriggerRequest) -> Answer {
        let key = self.table.resolve(&req.job)?;
        let entry = self
            .table
            .get(&key)
            .ok_or_else(|| ResolveError::NotFound(req.job.clone()))?;
        let args = match req.args {
            None => entry.stored.spec.args.clone(),
            Some(args) => {
                let mut spec = entry.stored.spec.clone();
                spec.args = args;
                match spec.validate() {
                    Ok(spec) => spec.args,
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

    async fn runs_list(&self, req: RunsListRequest) -> Answer {
        let limit = req.limit.unwrap_or(20).clamp(1, 1000);
        let job = match req.job.as_deref() {
            None => None,
            Some(name) => Some(match self.table.resolve(name) {
                Ok(key) => key,
                // A deleted job's runs are still listed by `group.name` or bare name.
                Err(ResolveError::NotFound(_)) => name.to_string(),
                Err(e) => return Err(e.into()),
            }),
        };
        let filter = job.as_deref().map(|k| match k.split_once('.') {
            Some((group, name)) => (name, Some(group)),
            None => (k, None),
        });
        let mut runs = self
            .store
            .list_runs(filter, req.status, limit)
            .await
            .map_err(Failure::internal)?;
        runs.iter_mut()
            .for_each(krest_schemas::api::RunSummary::redact_secrets);
        to_value(runs)
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, Failure> {
        Ok(self.routing.live_now().await.as_ref().clone())
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

/// A path from `start` back to itself through child links, if there is one.
fn find_cycle(
    graph: &std::collections::HashMap<String, Vec<String>>,
    start: &str,
) -> Option<Vec<String>> {
    fn visit(
        graph: &std::collections::HashMap<String, Vec<String>>,
        start: &str,
        node: &str,
        path: &mut Vec<String>,
        seen: &mut std::collections::HashSet<String>,
    ) -> bool {
        for child in graph.get(node).into_iter().flatten() {
            if child == start {
                path.push(child.clone());
                return true;
            }
            if seen.insert(child.clone()) {
                path.push(child.clone());
                if visit(graph, start, child, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = std::collections::HashSet::new();
    visit(graph, start, start, &mut path, &mut seen).then_some(path)
}

/// What `job.apply` requires of a valid definition beyond validation, given the stored one it
/// replaces: its secret placeholders resolved ([`JobSpec::restore_secrets`]), then checked again
/// (a restored secret counts toward the limits), and an `at` that is not in the past unless
/// unchanged ([`JobSpec::check_at`]). The `at` check lives here, not in `validate`: it depends
/// on the stored revision and the clock, and `validate` also re-checks stored definitions and
/// manual-trigger args, where an `at` gone by is normal.
fn prepare(
    spec: &JobSpec,
    stored: Option<&JobSpec>,
    now: chrono::DateTime<Utc>,
) -> Result<JobSpec, krest_schemas::InvalidJob> {
    let invalid = |problems: Vec<Problem>| krest_schemas::InvalidJob {
        job: Some(spec.key()),
        problems,
    };
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
    spec.validate()
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
    let spec = &entry.stored.spec;
    let next_fire_at = if spec.running {
        spec.schedule(entry.stored.created_at)
            .and_then(Result::ok)
            .and_then(|s| s.next_after(Utc::now()))
    } else {
        None
    };
    JobView {
        key: key.to_string(),
        spec: spec.redacted(),
        revision: entry.revision,
        created_at: entry.stored.created_at,
        updated_at: entry.stored.updated_at,
        next_fire_at,
    }
}

/// Now, to the millisecond: stored times are kept at the precision of fire times and run ids.
fn now_ms() -> chrono::DateTime<Utc> {
    let now = Utc::now();
    chrono::DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}
