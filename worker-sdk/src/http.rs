//! The built-in HTTP executor (feature `http`): runs jobs of type HTTP by making the request
//! the run carries — `url`, `methodType`, `headers`, and `args` as the body (a string as is,
//! other JSON as `application/json`, nothing for `null`). A 2xx response succeeds with
//! `HTTP <status>: <body excerpt>` as the output; anything else fails (and is retried like any
//! failure), with the status and an excerpt of the body as the error.
//!
//! The run message carries the real URL and header values; what the executor records (log
//! lines, errors) shows the URL redacted (`krest_schemas::redact::url`) and never the headers.
//!
//! ```no_run
//! # async fn demo() -> Result<(), krest_worker::Error> {
//! let worker = krest_worker::http::register(krest_worker::Worker::builder("billing"))?
//!     .build()?;
//! worker.run(krest_worker::shutdown_signal()).await
//! # }
//! ```

use std::time::Duration;

use krest_schemas::names::HTTP_HANDLER;
use krest_schemas::redact;
use serde_json::Value;

use crate::{Error, JobContext, JobError, WorkerBuilder};

/// Longest response body excerpt kept in the output or error.
pub const BODY_EXCERPT: usize = 2048;

/// Registers the HTTP executor (handler `krest/http`) on `builder`.
pub fn register(builder: WorkerBuilder) -> Result<WorkerBuilder, Error> {
    let client = reqwest::Client::builder()
        .user_agent(concat!("krest-worker/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Error::config(format!("cannot build the HTTP client: {e}")))?;
    Ok(builder.handler(HTTP_HANDLER, move |ctx: JobContext| {
        let client = client.clone();
        async move { call(&client, &ctx).await }
    }))
}

/// A request error with its causes (`error sending request: client error (Connect): tcp connect
/// error: Connection refused`), without the URL reqwest attaches (it may hold credentials).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    redact::text(&text).into_owned()
}

fn excerpt(body: &str) -> String {
    crate::context::truncate(body.to_string(), BODY_EXCERPT)
}

async fn call(client: &reqwest::Client, ctx: &JobContext) -> Result<String, JobError> {
    let http = ctx
        .run()
        .http
        .clone()
        .ok_or_else(|| JobError::fatal("not an HTTP job: the run carries no url"))?;
    let method = reqwest::Method::from_bytes(http.method.as_str().as_bytes())
        .map_err(|e| JobError::fatal(format!("bad method: {e}")))?;
    let mut req = client.request(method.clone(), &http.url);
    for (name, value) in &http.headers {
        req = req.header(name.as_str(), value.as_str());
    }
    // The run's trace goes on to the called service, unless the job sets its own.
    if !http
        .headers
        .keys()
        .any(|h| h.eq_ignore_ascii_case(krest_schemas::trace::TRACEPARENT))
    {
        req = req.header(krest_schemas::trace::TRACEPARENT, ctx.traceparent());
    }
    req = match ctx.args() {
        Value::Null => req,
        Value::String(s) => req.body(s.clone()),
        other => req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(other.to_string()),
    };
    if let Some(secs) = ctx.run().timeout_secs {
        req = req.timeout(Duration::from_secs(secs));
    }
    let shown = redact::url(&http.url);
    ctx.log(format!("{method} {shown}"));
    let resp = tokio::select! {
        r = req.send() => r.map_err(|e| JobError::new(format!("request to {shown} failed: {}", describe(e))))?,
        _ = ctx.cancelled() => return Err(JobError::new("cancelled before the response")),
    };
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    ctx.log(format!("HTTP {status}"));
    if status.is_success() {
        Ok(format!("HTTP {status}: {}", excerpt(&body)))
    } else {
        Err(JobError::new(format!("HTTP {status}: {}", excerpt(&body))))
    }
}
