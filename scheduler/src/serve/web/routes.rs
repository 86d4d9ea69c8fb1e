//! The route table of the HTTP API and its handlers. The router is built from [`routes`] and
//! nothing else, and the OpenAPI document is rendered from the same table, so a route cannot
//! exist undocumented.
//!
//! Each handler turns the HTTP request into a request of the service layer
//! ([`WebState::call`]) and the reply into the HTTP answer: a result is the body, a page is
//! `{"items": …, "next": …}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use chrono::Utc;
use krest_schemas::api::{
    ApplyRequest, ApplyResponse, ApplyResult, CancelResponse, CatchingUp, ClusterStatus,
    DeadLetter, DlqListRequest, ErrorCode, JobHistoryRequest, JobListRequest, JobRequest,
    JobRevision, JobStatus, JobView, Op, RunGetRequest, RunRequest, RunStatus, RunsListRequest,
    TriggerRequest, TriggerResponse, WorkersListRequest,
};
use krest_schemas::text::{echo, shorten_quoted};
use krest_schemas::web::{
    ClusterHealth, CronPreview, FieldChange, HttpError, ItemsPage, JobDiff, RunDetailPage,
    RunsPage, SessionRequest, SessionView, TriggerBody,
};
use krest_schemas::{CronSchedule, WorkerInfo};
use schemars::{Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::{Access, Auth};
use super::error::WebError;
use super::{events, openapi, WebState, MAX_BODY};
use crate::serve::page::Reply;

/// An HTTP method of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// PUT
    Put,
    /// DELETE
    Delete,
}

impl Method {
    /// Lower case, as OpenAPI names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
            Method::Delete => "delete",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Method::Get => MethodFilter::GET,
            Method::Post => MethodFilter::POST,
            Method::Put => MethodFilter::PUT,
            Method::Delete => MethodFilter::DELETE,
        }
    }
}

/// A schema, generated on demand (components land in the generator).
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// What a route answers with on success.
#[derive(Clone, Copy)]
pub enum Answer {
    /// `application/json` of this schema.
    Json(SchemaFn),
    /// `text/event-stream`.
    EventStream,
}

/// A query parameter.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// Its name.
    pub name: &'static str,
    /// What it does.
    pub description: &'static str,
    /// Whether it must be given.
    pub required: bool,
    /// `string` or `integer`.
    pub kind: &'static str,
}

/// One route: documentation and handler together.
pub struct Route {
    /// Method.
    pub method: Method,
    /// Path, with `{param}` segments (axum's and OpenAPI's syntax alike).
    pub path: &'static str,
    /// `operationId`.
    pub id: &'static str,
    /// One line.
    pub summary: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Query parameters.
    pub query: Vec<Param>,
    /// Request body schema.
    pub body: Option<SchemaFn>,
    /// Whether the body must be given.
    pub body_required: bool,
    /// Success answer.
    pub answer: Answer,
    handler: MethodRouter<WebState>,
}

fn route<H, T>(
    method: Method,
    path: &'static str,
    id: &'static str,
    summary: &'static str,
    access: Access,
    handler: H,
) -> Route
where
    H: axum::handler::Handler<T, WebState>,
    T: 'static,
{
    Route {
        method,
        path,
        id,
        summary,
        access,
        query: Vec::new(),
        body: None,
        body_required: false,
        answer: Answer::Json(|g| g.subschema_for::<Value>()),
        handler: on(method.filter(), handler),
    }
}

impl Route {
    fn query(mut self, query: Vec<Param>) -> Route {
        self.query = query;
        self
    }

    fn body(mut self, body: SchemaFn) -> Route {
        self.body = Some(body);
        self.body_required = true;
        self
    }

    fn optional_body(mut self, body: SchemaFn) -> Route {
        self.body = Some(body);
        self
    }

    fn returns(mut self, answer: SchemaFn) -> Route {
        self.answer = Answer::Json(answer);
        self
    }

    fn streams(mut self) -> Route {
        self.answer = Answer::EventStream;
        self
    }
}

const fn param(name: &'static str, description: &'static str) -> Param {
    Param {
        name,
        description,
        required: false,
        kind: "string",
    }
}

const fn int(name: &'static str, description: &'static str) -> Param {
    Param {
        name,
        description,
        required: false,
        kind: "integer",
    }
}

const LIMIT: Param = int("limit", "At most this many per page.");
const CURSOR: Param = param(
    "cursor",
    "Where to continue: the `next` of the previous page, as it is.",
);

/// Every route of the HTTP API.
pub fn routes() -> Vec<Route> {
    use Access::{Public, Read, Write};
    use Method::{Delete, Get, Post, Put};
    vec![
        route(Get, "/api/v1/openapi.json", "openapi", "This document.", Public, openapi_json),
        route(Post, "/api/v1/session", "login", "Console login: exchanges a token for an HttpOnly, SameSite=Strict session cookie; answers the CSRF token its writes must send in X-Krest-Csrf.", Public, session_login)
            .body(|g| g.subschema_for::<SessionRequest>())
            .returns(|g| g.subschema_for::<SessionView>()),
        route(Get, "/api/v1/session", "session", "The console session of the cookie (401 without one; with anonymous reads, access `anonymous`).", Public, session_get)
            .returns(|g| g.subschema_for::<SessionView>()),
        route(Delete, "/api/v1/session", "logout", "Ends the console session and clears its cookie.", Public, session_logout),
        route(Get, "/api/v1/jobs", "listJobs", "Jobs by key, with their next fire times.", Read, jobs_list)
            .query(vec![
                param("search", "Only jobs whose `group.name` contains this text (case-insensitive)."),
                param("status", "`RUNNING` or `PAUSED`."),
                param("group", "Only jobs of this group."),
                param("app", "Only jobs of this app."),
                LIMIT,
                CURSOR,
            ])
            .returns(|g| g.subschema_for::<ItemsPage<JobView>>()),
        route(Post, "/api/v1/jobs", "applyJobs", "Create or update jobs from definitions (one document or an array), as `krest job apply`.", Write, jobs_apply)
            .body(|g| g.subschema_for::<Value>())
            .returns(|g| g.subschema_for::<ApplyResponse>()),
        route(Get, "/api/v1/jobs/{job}", "getJob", "One job (`group.name`, or a name unique across groups).", Read, job_get)
            .returns(|g| g.subschema_for::<JobView>()),
        route(Put, "/api/v1/jobs/{job}", "putJob", "Create or update one job from its definition (its key must be `{job}`).", Write, job_put)
            .body(|g| g.subschema_for::<krest_schemas::JobSpec>())
            .returns(|g| g.subschema_for::<ApplyResult>()),
        route(Delete, "/api/v1/jobs/{job}", "deleteJob", "Delete a job; answers the deleted job.", Write, job_delete)
            .returns(|g| g.subschema_for::<JobView>()),
        route(Post, "/api/v1/jobs/{job}/pause", "pauseJob", "Stop firing the job on its schedule.", Write, job_pause)
            .returns(|g| g.subschema_for::<JobView>()),
        route(Post, "/api/v1/jobs/{job}/resume", "resumeJob", "Fire the job on its schedule again.", Write, job_resume)
            .returns(|g| g.subschema_for::<JobView>()),
        route(Post, "/api/v1/jobs/{job}/trigger", "triggerJob", "Run the job now, optionally with other args (the body may be empty).", Write, job_trigger)
            .optional_body(|g| g.subschema_for::<TriggerBody>())
            .returns(|g| g.subschema_for::<TriggerResponse>()),
        route(Get, "/api/v1/jobs/{job}/revisions", "listRevisions", "The job's revisions, newest first.", Read, job_revisions)
            .query(vec![LIMIT, CURSOR])
            .returns(|g| g.subschema_for::<ItemsPage<JobRevision>>()),
        route(Get, "/api/v1/jobs/{job}/revisions/{revision}", "getRevision", "One revision of the job.", Read, job_revision)
            .returns(|g| g.subschema_for::<JobView>()),
        route(Get, "/api/v1/jobs/{job}/diff", "diffRevisions", "The fields that differ between two revisions.", Read, job_diff)
            .query(vec![
                Param { required: true, ..int("from", "The older revision.") },
                int("to", "The newer revision (default: the current one)."),
            ])
            .returns(|g| g.subschema_for::<JobDiff>()),
        route(Get, "/api/v1/jobs/{job}/stats", "jobStats", "How the job's recent runs went: the newest run, success rate, p50/p95/max durations (as `krest job stats`).", Read, job_stats)
            .query(vec![int("recent", "How many of the newest ended runs to look at (default 100, at most 10,000).")])
            .returns(|g| g.subschema_for::<krest_schemas::api::JobStats>()),
        route(Get, "/api/v1/runs/counts", "countRuns", "Runs by status among those scheduled since a time.", Read, run_counts)
            .query(vec![Param { required: true, ..param("since", "An RFC 3339 time, or a period back from now (`1h`, `30m`).") }])
            .returns(|g| g.subschema_for::<krest_schemas::api::RunCounts>()),
        route(Get, "/api/v1/runs", "listRuns", "Runs, newest first.", Read, runs_list)
            .query(vec![
                param("job", "Only runs of this job (`group.name` or a unique name)."),
                param("status", "Only runs in this status (`FAILED`, `RUNNING`, …; any case)."),
                param("app", "Only runs of this app."),
                param("since", "Only runs scheduled since: an RFC 3339 time or a period back (`1h`)."),
                param("until", "Only runs scheduled before: an RFC 3339 time or a period back."),
                LIMIT,
                CURSOR,
            ])
            .returns(|g| g.subschema_for::<RunsPage>()),
        route(Get, "/api/v1/runs/{run}", "getRun", "One run with its shards' attempts and log lines (paged: `next`).", Read, run_get)
            .query(vec![LIMIT, CURSOR])
            .returns(|g| g.subschema_for::<RunDetailPage>()),
        route(Post, "/api/v1/runs/{run}/cancel", "cancelRun", "Cancel a run that has not ended.", Write, run_cancel)
            .returns(|g| g.subschema_for::<CancelResponse>()),
        route(Get, "/api/v1/runs/{run}/events", "runEvents", "The run's events as they happen (server-sent events: `run` first, then `dispatched`, `started`, `log`, `finished`, `skipped`; `end` when the run ended).", Read, events::run_events)
            .streams(),
        route(Get, "/api/v1/workers", "listWorkers", "Live worker instances, by app and instance.", Read, workers_list)
            .query(vec![param("app", "Only instances of this app."), LIMIT, CURSOR])
            .returns(|g| g.subschema_for::<ItemsPage<WorkerInfo>>()),
        route(Get, "/api/v1/cluster", "cluster", "Nodes, leader, NATS server, and the answering node's health (NATS, database, recorder lag).", Read, cluster)
            .returns(|g| g.subschema_for::<ClusterHealth>()),
        route(Get, "/api/v1/dlq", "listDeadLetters", "Parked bad input, newest first.", Read, dlq_list)
            .query(vec![LIMIT, CURSOR])
            .returns(|g| g.subschema_for::<ItemsPage<DeadLetter>>()),
        route(Get, "/api/v1/cron/preview", "cronPreview", "The next fire times of a cron expression, or the error `krest cron next` shows.", Read, cron_preview)
            .query(vec![
                Param { required: true, ..param("expr", "The expression (Quartz with seconds, or 5 fields).") },
                param("tz", "IANA time zone (default UTC)."),
                int("count", "How many (default 5, 1 to 100)."),
            ])
            .returns(|g| g.subschema_for::<CronPreview>()),
    ]
}

/// The router of the table: each route behind its access check; anything else under
/// `/api/v1` is a JSON 404 (or 405).
pub fn router(state: WebState) -> Router {
    let mut router = Router::new();
    for r in routes() {
        let guard = axum::middleware::from_fn_with_state((state.auth.clone(), r.access), require);
        router = router.route(r.path, r.handler.route_layer(guard));
    }
    router
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn require(
    State((auth, need)): State<(Arc<Auth>, Access)>,
    req: Request,
    next: Next,
) -> Response {
    match auth.check(req.headers(), need) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            // Read what the client sent (bounded) so the connection stays usable: a body
            // left unread makes the server close it under the client's next request.
            let _ = axum::body::to_bytes(req.into_body(), MAX_BODY).await;
            e.into_response()
        }
    }
}

async fn no_route(uri: axum::http::Uri) -> WebError {
    WebError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        format!("no route {}: see /api/v1/openapi.json", echo(uri.path())),
    )
}

async fn no_method(method: axum::http::Method, uri: axum::http::Uri) -> WebError {
    WebError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadRequest,
        format!(
            "{method} is not allowed on {}: see /api/v1/openapi.json",
            echo(uri.path())
        ),
    )
}

impl WebState {
    /// One request to the service layer shared with the NATS API.
    pub(super) async fn call<R: Serialize>(&self, op: Op, req: &R) -> Result<Reply, WebError> {
        let payload = serde_json::to_vec(req).map_err(|e| {
            WebError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                e.to_string(),
            )
        })?;
        Ok(self.api.answer(op, &payload).await?)
    }

    /// [`WebState::call`], its result decoded.
    pub(super) async fn get<R: Serialize, T: DeserializeOwned>(
        &self,
        op: Op,
        req: &R,
    ) -> Result<T, WebError> {
        let reply = self.call(op, req).await?;
        serde_json::from_slice(&reply.result).map_err(|e| {
            WebError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                e.to_string(),
            )
        })
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

/// A result as the body.
fn result(reply: Reply) -> Response {
    json_response(StatusCode::OK, reply.result)
}

/// A page as `{"items": …, "next": …}` (and `"catchingUp": …` on run listings answered
/// while the node's database is behind the events stream).
fn page(reply: Reply) -> Response {
    let mut body = Vec::with_capacity(reply.result.len() + 64);
    body.extend_from_slice(br#"{"items":"#);
    body.extend_from_slice(&reply.result);
    push_next(&mut body, reply.next.as_deref());
    push_catching_up(&mut body, reply.catching_up.as_ref());
    body.push(b'}');
    json_response(StatusCode::OK, body)
}

fn push_catching_up(body: &mut Vec<u8>, catching_up: Option<&CatchingUp>) {
    if let Some(c) = catching_up {
        if let Ok(c) = serde_json::to_vec(c) {
            body.extend_from_slice(br#","catchingUp":"#);
            body.extend_from_slice(&c);
        }
    }
}

fn push_next(body: &mut Vec<u8>, next: Option<&str>) {
    if let Some(next) = next {
        body.extend_from_slice(br#","next":"#);
        body.extend_from_slice(&serde_json::to_vec(next).unwrap_or_else(|_| b"null".to_vec()));
    }
}

/// Query parameters, strictly: an unknown or malformed one is a 400 naming it.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, WebError> {
    match q {
        Ok(Query(q)) => Ok(q),
        Err(e) => {
            let text = e.body_text();
            let detail = text
                .strip_prefix("Failed to deserialize query string: ")
                .unwrap_or(&text)
                .to_string();
            let field = detail
                .split_once(": ")
                .map(|(f, _)| f.to_string())
                .filter(|f| !f.contains(' '))
                .or_else(|| {
                    detail
                        .strip_prefix("unknown field `")
                        .and_then(|r| r.split_once('`'))
                        .map(|(f, _)| f.to_string())
                });
            let message = format!("invalid query: {}", shorten_quoted(&detail));
            Err(match field {
                Some(f) => WebError::bad_field(&f, message),
                None => WebError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message),
            })
        }
    }
}

/// A JSON body, parsed strictly ([`krest_schemas::json`]: a BOM is skipped, duplicate keys
/// are refused with their line and column), at most [`MAX_BODY`] bytes. An empty body is
/// `None`.
fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Option<Value>, WebError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            WebError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                format!(
                    "the request body is over {} KiB: send fewer definitions per request",
                    MAX_BODY / 1024
                ),
            )
        } else {
            WebError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                e.body_text(),
            )
        }
    })?;
    let bytes = krest_schemas::json::strip_bom(&body);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    krest_schemas::json::parse(bytes).map(Some).map_err(|e| {
        WebError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("malformed JSON body: {}", shorten_quoted(&e.to_string())),
        )
    })
}

fn parse_limit(limit: Option<u32>) -> Result<Option<u32>, WebError> {
    match limit {
        Some(0) => Err(WebError::bad_field("limit", "limit must be at least 1")),
        l => Ok(l),
    }
}

async fn openapi_json() -> Response {
    json_response(
        StatusCode::OK,
        serde_json::to_vec_pretty(&openapi::document()).unwrap_or_default(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    search: Option<String>,
    status: Option<String>,
    group: Option<String>,
    app: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn jobs_list(
    State(s): State<WebState>,
    q: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let q = query(q)?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(st) if st.eq_ignore_ascii_case("running") => Some(JobStatus::Running),
        Some(st) if st.eq_ignore_ascii_case("paused") => Some(JobStatus::Paused),
        Some(st) => {
            return Err(WebError::bad_field(
                "status",
                format!("unknown job status `{}`: use RUNNING or PAUSED", echo(st)),
            ))
        }
    };
    let req = JobListRequest {
        app: q.app.filter(|a| !a.is_empty()),
        group: q.group.filter(|g| !g.is_empty()),
        search: q.search.filter(|t| !t.is_empty()),
        status,
        limit: parse_limit(q.limit)?,
        cursor: q.cursor,
    };
    Ok(page(s.call(Op::JobList, &req).await?))
}

async fn jobs_apply(
    State(s): State<WebState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, WebError> {
    let documents = match json_body(body)? {
        None => {
            return Err(WebError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                "no job definitions given: send one definition or an array of them",
            ))
        }
        Some(Value::Array(docs)) => docs,
        Some(doc) => vec![doc],
    };
    Ok(result(
        s.call(Op::JobApply, &ApplyRequest { documents }).await?,
    ))
}

async fn job_put(
    State(s): State<WebState>,
    Path(job): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, WebError> {
    let doc = match json_body(body)? {
        Some(doc @ Value::Object(_)) => doc,
        _ => {
            return Err(WebError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                "the body must be one job definition (a JSON object)",
            ))
        }
    };
    // A definition for another key is refused before anything is written (an invalid one
    // is left to the service layer, which names every problem).
    if let Ok(spec) = krest_schemas::parse_job(&doc) {
        let matches = match job.split_once('.') {
            Some((group, name)) => spec.job_group == group && spec.job_name == name,
            None => spec.job_name == job,
        };
        if !matches {
            return Err(WebError::bad_field(
                "jobName",
                format!(
                    "the definition is job {} but the path names {}: PUT it to /api/v1/jobs/{}",
                    echo(&spec.key()),
                    echo(&job),
                    echo(&spec.key())
                ),
            ));
        }
    }
    let mut applied: ApplyResponse = s
        .get(
            Op::JobApply,
            &ApplyRequest {
                documents: vec![doc],
            },
        )
        .await?;
    let one = applied.results.pop().ok_or_else(|| {
        WebError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "no apply result",
        )
    })?;
    let body = serde_json::to_vec(&one).unwrap_or_default();
    Ok(json_response(StatusCode::OK, body))
}

async fn job_get(State(s): State<WebState>, Path(job): Path<String>) -> Result<Response, WebError> {
    Ok(result(s.call(Op::JobGet, &JobRequest::new(job)).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DeleteQuery {
    request_id: Option<String>,
}

async fn job_delete(
    State(s): State<WebState>,
    Path(job): Path<String>,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let req = JobRequest {
        request_id: query(q)?.request_id,
        ..JobRequest::new(job)
    };
    Ok(result(s.call(Op::JobDelete, &req).await?))
}

async fn job_pause(
    State(s): State<WebState>,
    Path(job): Path<String>,
) -> Result<Response, WebError> {
    Ok(result(s.call(Op::JobPause, &JobRequest::new(job)).await?))
}

async fn job_resume(
    State(s): State<WebState>,
    Path(job): Path<String>,
) -> Result<Response, WebError> {
    Ok(result(s.call(Op::JobResume, &JobRequest::new(job)).await?))
}

async fn job_trigger(
    State(s): State<WebState>,
    Path(job): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, WebError> {
    let body: TriggerBody = match json_body(body)? {
        None => TriggerBody::default(),
        Some(v) => serde_json::from_value(v).map_err(|e| {
            let message = shorten_quoted(&e.to_string());
            let field = message
                .strip_prefix("unknown field `")
                .and_then(|r| r.split_once('`'))
                .map_or("", |(f, _)| f)
                .to_string();
            WebError::bad_field(&field, format!("malformed trigger request: {message}"))
        })?,
    };
    let req = TriggerRequest {
        job,
        args: body.args,
        request_id: body.request_id,
    };
    Ok(result(s.call(Op::JobTrigger, &req).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn job_revisions(
    State(s): State<WebState>,
    Path(job): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let q = query(q)?;
    let req = JobHistoryRequest {
        job,
        limit: parse_limit(q.limit)?,
        cursor: q.cursor,
    };
    Ok(page(s.call(Op::JobHistory, &req).await?))
}

async fn job_revision(
    State(s): State<WebState>,
    Path((job, revision)): Path<(String, String)>,
) -> Result<Response, WebError> {
    let revision = parse_revision("revision", &revision)?;
    let req = JobRequest {
        job,
        revision: Some(revision),
        request_id: None,
    };
    Ok(result(s.call(Op::JobGet, &req).await?))
}

fn parse_revision(field: &str, text: &str) -> Result<u64, WebError> {
    text.parse::<u64>().ok().filter(|r| *r > 0).ok_or_else(|| {
        WebError::bad_field(
            field,
            format!(
                "{field} `{}` is not a revision number (1, 2, …)",
                echo(text)
            ),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffQuery {
    from: Option<String>,
    to: Option<String>,
}

async fn job_diff(
    State(s): State<WebState>,
    Path(job): Path<String>,
    q: Result<Query<DiffQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let q = query(q)?;
    let from = match q.from.as_deref() {
        Some(f) => parse_revision("from", f)?,
        None => {
            return Err(WebError::bad_field(
                "from",
                "missing `from`: the older revision (see /api/v1/jobs/{job}/revisions)",
            ))
        }
    };
    let to =
        q.to.as_deref()
            .map(|t| parse_revision("to", t))
            .transpose()?;
    let older: JobView = s
        .get(
            Op::JobGet,
            &JobRequest {
                job: job.clone(),
                revision: Some(from),
                request_id: None,
            },
        )
        .await?;
    let newer: JobView = s
        .get(
            Op::JobGet,
            &JobRequest {
                job,
                revision: to,
                request_id: None,
            },
        )
        .await?;
    let before = serde_json::to_value(&older.spec).unwrap_or_default();
    let after = serde_json::to_value(&newer.spec).unwrap_or_default();
    let mut changes = Vec::new();
    diff("", Some(&before), Some(&after), &mut changes);
    let body = JobDiff {
        job: newer.key,
        from: older.revision,
        to: newer.revision,
        changes,
    };
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    ))
}

/// The fields that differ between `a` and `b` under `path`: objects field by field (in
/// `a`'s order, then `b`'s new fields), anything else as a whole.
pub fn diff(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<FieldChange>) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            for (k, v) in x {
                diff(&pointer(path, k), Some(v), y.get(k), out);
            }
            for (k, v) in y.iter().filter(|(k, _)| !x.contains_key(*k)) {
                diff(&pointer(path, k), None, Some(v), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(FieldChange {
            path: path.to_string(),
            before: a.cloned(),
            after: b.cloned(),
        }),
    }
}

fn pointer(path: &str, key: &str) -> String {
    format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    job: Option<String>,
    status: Option<String>,
    app: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn runs_list(
    State(s): State<WebState>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let q = query(q)?;
    let status = match q.status.as_deref().filter(|st| !st.is_empty()) {
        None => None,
        Some(st) => Some(RunStatus::parse(st).ok_or_else(|| {
            WebError::bad_field(
                "status",
                format!(
                    "unknown status `{}`: use PENDING, RUNNING, SUCCEEDED, FAILED, TIMED_OUT, SKIPPED or CANCELLED",
                    echo(st)
                ),
            )
        })?),
    };
    let time = |field: &'static str, v: Option<String>| {
        v.filter(|v| !v.is_empty())
            .map(|v| {
                krest_schemas::parse_time_or_ago(&v, chrono::Utc::now())
                    .map_err(|e| WebError::bad_field(field, e))
            })
            .transpose()
    };
    let req = RunsListRequest {
        job: q.job.filter(|j| !j.is_empty()),
        status,
        app: q.app.filter(|a| !a.is_empty()),
        since: time("since", q.since)?,
        until: time("until", q.until)?,
        limit: parse_limit(q.limit)?,
        cursor: q.cursor,
    };
    Ok(page(s.call(Op::RunsList, &req).await?))
}

async fn run_get(
    State(s): State<WebState>,
    Path(run_id): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let q = query(q)?;
    let req = RunGetRequest {
        run_id,
        limit: parse_limit(q.limit)?,
        cursor: q.cursor,
    };
    let reply = s.call(Op::RunsGet, &req).await?;
    // The detail with `next` and `catchingUp` added: the result is an object (`{"run":…}`).
    let mut body = reply.result;
    if body.last() == Some(&b'}') && (reply.next.is_some() || reply.catching_up.is_some()) {
        body.pop();
        push_next(&mut body, reply.next.as_deref());
        push_catching_up(&mut body, reply.catching_up.as_ref());
        body.push(b'}');
    }
    Ok(json_response(StatusCode::OK, body))
}

async fn run_cancel(
    State(s): State<WebState>,
    Path(run_id): Path<String>,
) -> Result<Response, WebError> {
    Ok(result(
        s.call(Op::RunsCancel, &RunRequest { run_id }).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkersQuery {
    app: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn workers_list(
    State(s): State<WebState>,
    q: Result<Query<WorkersQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let q = query(q)?;
    let req = WorkersListRequest {
        app: q.app.filter(|a| !a.is_empty()),
        limit: parse_limit(q.limit)?,
        cursor: q.cursor,
    };
    Ok(page(s.call(Op::WorkersList, &req).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    recent: Option<u32>,
}

async fn job_stats(
    State(s): State<WebState>,
    Path(job): Path<String>,
    q: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let q = query(q)?;
    let req = krest_schemas::api::JobStatsRequest {
        job,
        recent: q.recent,
    };
    Ok(result(s.call(Op::JobStats, &req).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CountsQuery {
    since: Option<String>,
}

async fn run_counts(
    State(s): State<WebState>,
    q: Result<Query<CountsQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let q = query(q)?;
    let since = q.since.ok_or_else(|| {
        WebError::bad_field(
            "since",
            "missing `since`: an RFC 3339 time or a period such as `1h`",
        )
    })?;
    let since = krest_schemas::parse_time_or_ago(&since, chrono::Utc::now())
        .map_err(|e| WebError::bad_field("since", e))?;
    let req = krest_schemas::api::RunCountsRequest { since };
    Ok(result(s.call(Op::RunsCounts, &req).await?))
}

async fn dlq_list(
    State(s): State<WebState>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    let q = query(q)?;
    let req = DlqListRequest {
        limit: parse_limit(q.limit)?,
        cursor: q.cursor,
    };
    Ok(page(s.call(Op::DlqList, &req).await?))
}

async fn cluster(State(s): State<WebState>) -> Result<Response, WebError> {
    let cluster: ClusterStatus = s.get(Op::ClusterStatus, &serde_json::json!({})).await?;
    let node = crate::serve::http::health(&s.health).await;
    let body = ClusterHealth { cluster, node };
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CronQuery {
    expr: Option<String>,
    tz: Option<String>,
    count: Option<usize>,
}

/// Most fire times a preview lists.
const MAX_PREVIEW: usize = 100;

async fn cron_preview(q: Result<Query<CronQuery>, QueryRejection>) -> Result<Response, WebError> {
    let q = query(q)?;
    let expr = q
        .expr
        .ok_or_else(|| WebError::bad_field("expr", "missing `expr`: the cron expression"))?;
    let tz_name =
        q.tz.filter(|t| !t.is_empty())
            .unwrap_or_else(|| "UTC".to_string());
    let count = q.count.unwrap_or(5);
    if !(1..=MAX_PREVIEW).contains(&count) {
        return Err(WebError::bad_field(
            "count",
            format!("count must be 1 to {MAX_PREVIEW}"),
        ));
    }
    let tz = krest_schemas::cron::parse_time_zone(&tz_name)
        .map_err(|message| WebError::bad_field("tz", message))?;
    let schedule =
        CronSchedule::new(&expr, tz).map_err(|e| WebError::bad_field("expr", e.to_string()))?;
    let mut next = Vec::with_capacity(count);
    let mut t = Utc::now();
    while next.len() < count {
        match schedule.next_after(t) {
            Some(n) => {
                next.push(n);
                t = n;
            }
            None => break,
        }
    }
    let local = next
        .iter()
        .map(|t| {
            t.with_timezone(&tz)
                .format("%Y-%m-%d %H:%M:%S %Z")
                .to_string()
        })
        .collect();
    let body = CronPreview {
        expr,
        time_zone: tz_name,
        next,
        local,
    };
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    ))
}

fn session_view(session: &super::auth::Session) -> Vec<u8> {
    serde_json::to_vec(&SessionView {
        access: session.access.as_str().to_string(),
        csrf: session.csrf.clone(),
    })
    .unwrap_or_default()
}

fn no_session(message: &str) -> WebError {
    WebError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
}

async fn session_login(
    State(s): State<WebState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, WebError> {
    let req: SessionRequest = match json_body(body)? {
        Some(v) => serde_json::from_value(v).map_err(|e| {
            WebError::bad_field(
                "token",
                format!("malformed login: {}", shorten_quoted(&e.to_string())),
            )
        })?,
        None => return Err(WebError::bad_field("token", "missing `token`")),
    };
    let (id, session) = s
        .auth
        .login(&req.token)
        .ok_or_else(|| no_session("this token is not valid for this node").field("token"))?;
    // Behind a TLS-terminating proxy the cookie is also `Secure`.
    let https = headers
        .get("x-forwarded-proto")
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        super::auth::SESSION_COOKIE,
        super::auth::SESSION_TTL.as_secs(),
        if https { "; Secure" } else { "" }
    );
    let mut response = json_response(StatusCode::OK, session_view(&session));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response
            .headers_mut()
            .insert(axum::http::header::SET_COOKIE, v);
    }
    Ok(response)
}

async fn session_get(
    State(s): State<WebState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, WebError> {
    match s.auth.session(&headers) {
        Some((_, session)) => Ok(json_response(StatusCode::OK, session_view(&session))),
        // With anonymous reads the console opens read-only, without a login.
        None if s.auth.anonymous_read() => Ok(json_response(
            StatusCode::OK,
            serde_json::to_vec(&krest_schemas::web::SessionView {
                access: "anonymous".into(),
                csrf: String::new(),
            })
            .unwrap_or_default(),
        )),
        None => Err(no_session("not logged in")),
    }
}

async fn session_logout(State(s): State<WebState>, headers: axum::http::HeaderMap) -> Response {
    s.auth.logout(&headers);
    let mut response = json_response(StatusCode::OK, b"{}".to_vec());
    let clear = format!(
        "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        super::auth::SESSION_COOKIE
    );
    if let Ok(v) = HeaderValue::from_str(&clear) {
        response
            .headers_mut()
            .insert(axum::http::header::SET_COOKIE, v);
    }
    response
}

/// Schemas every route may answer with (errors).
pub fn error_schema(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<HttpError>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diffs_name_changed_fields() {
        let mut out = Vec::new();
        diff(
            "",
            Some(&json!({"cron": "a", "headers": {"X": "1"}, "same": 1, "gone": true})),
            Some(&json!({"cron": "b", "headers": {"X": "1", "Y/Z": "2"}, "same": 1})),
            &mut out,
        );
        let paths: Vec<&str> = out.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["/cron", "/gone", "/headers/Y~1Z"]);
        assert_eq!(out[1].after, None);
        assert_eq!(out[2].before, None);
    }

    #[test]
    fn every_route_is_unique_and_versioned() {
        let routes = routes();
        let mut seen = std::collections::HashSet::new();
        for r in &routes {
            assert!(r.path.starts_with("/api/v1/"), "{}", r.path);
            assert!(
                seen.insert((r.method, r.path)),
                "{:?} {} twice",
                r.method,
                r.path
            );
        }
    }
}
