//! Job definitions: the document users write (a superset of Krest-Job's JSON), its parsing with
//! field-precise errors, and its validation.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::cron::{parse_time_zone, CronSchedule};
use crate::names::{is_token, job_key, HTTP_HANDLER, MAX_TOKEN_LEN};
use crate::redact;
use crate::schedule::{parse_duration, Schedule};
use crate::shared::{Interner, Shared};
use crate::text::{echo, shorten_quoted, ECHO_CHARS};

/// Most retries a job may ask for (`retryTimes`); a run makes at most `retryTimes + 1` attempts.
pub const MAX_RETRY_TIMES: u32 = 20;
/// Most shards a SHARDING job may have.
pub const MAX_SHARDS: usize = 1000;
/// Largest `args`, serialized, in bytes (messages must stay well under NATS's 1 MiB payload).
pub const MAX_ARGS_BYTES: usize = 64 * 1024;
/// Longest `timeoutSecs` (7 days).
pub const MAX_TIMEOUT_SECS: i64 = 7 * 24 * 3600;
/// Longest `every` period and `catchUpWindow`.
pub const MAX_PERIOD: std::time::Duration = std::time::Duration::from_secs(366 * 86400);
/// Longest handler `path`.
pub const MAX_PATH_LEN: usize = 256;
/// Longest `description`, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Longest `url` and `alert.webhook`, in bytes.
pub const MAX_URL_BYTES: usize = 4096;
/// Most `headers` of an HTTP job.
pub const MAX_HEADERS: usize = 64;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 256;
/// Longest header value, in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 8192;
/// Longest `shardingParams`, in bytes.
pub const MAX_SHARDING_PARAMS_BYTES: usize = 64 * 1024;
/// Most `childJobs`.
pub const MAX_CHILD_JOBS: usize = 64;
/// Longest value of the short text fields (`cron`, `every`, `at`, `timeZone`, `catchUpWindow`,
/// `createTime`, `id`, `retryBackoff.initial` and `.max`), in bytes.
pub const MAX_SHORT_TEXT_BYTES: usize = 256;
/// Largest definition, serialized as stored (normalized JSON), in bytes. Everything that
/// carries a definition — its view in an API reply, a revision, a run message with its
/// `args` — stays far below NATS's default 1 MiB payload.
pub const MAX_DEFINITION_BYTES: usize = 128 * 1024;

/// A job definition, as applied with `krest job apply` and stored in the jobs bucket.
///
/// Field names are camelCase, as in Krest-Job. Unknown fields are rejected by [`parse_job`].
///
/// `Debug` shows the redacted definition ([`JobSpec::redacted`]): secrets stay out of logs.
#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSpec {
    /// The app whose workers run this job (a worker's app name). Letters, digits, `-`, `_`.
    pub app_name: Shared,
    /// Group of the job; with `jobName` it identifies the job. Letters, digits, `-`, `_`.
    #[serde(default = "default_group")]
    pub job_group: String,
    /// Name of the job, unique within its group. Letters, digits, `-`, `_`.
    pub job_name: String,
    /// NORMAL (one execution per fire) or SHARDING (one execution per element of `args`).
    #[serde(default)]
    pub job_type: JobType,
    /// Arguments handed to the handler: any JSON value. For SHARDING jobs a JSON array (one
    /// shard per element), or a string holding one (Krest-Job's form), normalized to an array.
    #[serde(default, skip_serializing_if = "JobArgs::is_null")]
    pub args: JobArgs,
    /// When the job fires: Quartz cron with seconds (`0/5 * * * * ?`) or 5-field cron. Absent:
    /// the job only runs when triggered by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<Shared>,
    /// Fixed rate instead of a cron (`30s`, `5m`, `1h30m`): fires every period, counted from
    /// the job's creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<Box<str>>,
    /// One instant instead of a cron (RFC 3339): the job fires once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Box<str>>,
    /// IANA time zone the cron expression is evaluated in.
    #[serde(default = "default_time_zone")]
    pub time_zone: Shared,
    /// What to do with fires missed while no leader dispatched (failover, downtime) that are
    /// older than the misfire threshold.
    #[serde(default)]
    pub misfire_policy: MisfirePolicy,
    /// For `FIRE_ALL`: how far back missed fires are run (default `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_window: Option<Box<str>>,
    /// How runs are spread over the app's workers.
    #[serde(default)]
    pub load_balance_type: LoadBalance,
    /// HTTP method, for jobs that call an HTTP endpoint (kept from Krest-Job).
    #[serde(default)]
    pub method_type: MethodType,
    /// The handler that runs the job (Krest-Job's `path`): workers register handlers by this
    /// name. HTTP jobs may leave it out (they run on the built-in `krest/http` handler).
    #[serde(default)]
    pub path: Shared,
    /// HTTP jobs: the URL called (`http://` or `https://`), with `methodType`, `headers`, and
    /// `args` as the body (a string as is, other JSON as `application/json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<Box<str>>,
    /// HTTP jobs: request headers.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Where to report runs that end badly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<Box<Alert>>,
    /// Whether the job is scheduled (false = paused).
    #[serde(default = "default_true")]
    pub running: bool,
    /// Retries after a failed attempt; a run makes at most `retryTimes + 1` attempts.
    #[serde(default)]
    pub retry_times: i64,
    /// Jobs to trigger when a run of this one SUCCEEDS (`group.name`, or a name in this job's
    /// group); each child run carries the parent's run id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub child_jobs: Vec<String>,
    /// What a fire does while the job's previous run is still going.
    #[serde(default)]
    pub overlap_policy: OverlapPolicy,
    /// For SHARDING jobs without an `args` array: the number of shards (1 to 1000); every
    /// shard gets the whole `args`, and its item from `shardingParams`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_count: Option<i64>,
    /// Per-shard parameters for `shardCount` (ElasticJob style): `0=Beijing,1=Shanghai`. A shard
    /// without one gets `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharding_params: Option<Box<str>>,
    /// Delay between attempts of a failed run, instead of the worker's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_backoff: Option<Box<RetryBackoff>>,
    /// Seconds an attempt may run; past it the worker cancels the handler and records the
    /// attempt TIMED_OUT (retried like a failure). Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<i64>,
    /// How long this job's ended runs stay in the run history, instead of the scheduler's
    /// `--keep-days`/`--keep-runs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Box<Retention>>,
    /// Free-form id carried over from Krest-Job documents (not used for identity).
    #[serde(
        default,
        deserialize_with = "string_or_number",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub id: Option<Box<str>>,
    /// Creation time as given by the author (`yyyy-MM-dd HH:mm:ss` or RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<Box<str>>,
    /// Free text shown in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<Box<str>>,
}

/// A job's `args`: any JSON value, held as its compact JSON text (as `serde_json` writes it:
/// no spaces, object keys sorted) rather than as a tree of [`Value`]s.
///
/// A leader holds every job's definition: an object such as `{"i":1}` costs one small buffer
/// this way, against a B-tree node of ~600 bytes as a `Value`. On the wire it is the same
/// JSON value (its schema is `Value`'s); it is parsed when a run is made ([`JobArgs::to_value`]).
#[derive(Clone, Default)]
pub struct JobArgs(Option<Box<serde_json::value::RawValue>>);

impl JobArgs {
    /// Whether the args are `null` (absent).
    pub fn is_null(&self) -> bool {
        self.0.is_none()
    }

    /// The args as compact JSON text (`null` when absent).
    pub fn json(&self) -> &str {
        self.0
            .as_deref()
            .map_or("null", serde_json::value::RawValue::get)
    }

    /// The args as a JSON value.
    pub fn to_value(&self) -> Value {
        match &self.0 {
            // The text was written by `serde_json` from a value: it parses.
            Some(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            None => Value::Null,
        }
    }
}

impl From<&Value> for JobArgs {
    fn from(value: &Value) -> JobArgs {
        if value.is_null() {
            return JobArgs(None);
        }
        // Serializing a `Value` cannot fail (its map keys are strings).
        JobArgs(serde_json::value::to_raw_value(value).ok())
    }
}

impl From<Value> for JobArgs {
    fn from(value: Value) -> JobArgs {
        JobArgs::from(&value)
    }
}

impl PartialEq for JobArgs {
    fn eq(&self, other: &JobArgs) -> bool {
        // Equal texts are equal values; different texts may still be (`-0.0` and `0.0`).
        self.json() == other.json() || self.to_value() == other.to_value()
    }
}

impl PartialEq<Value> for JobArgs {
    fn eq(&self, other: &Value) -> bool {
        self.to_value() == *other
    }
}

impl fmt::Debug for JobArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.json())
    }
}

impl fmt::Display for JobArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.json())
    }
}

impl Serialize for JobArgs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(raw) => raw.serialize(s),
            None => s.serialize_unit(),
        }
    }
}

impl<'de> Deserialize<'de> for JobArgs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<JobArgs, D::Error> {
        // Through a value, so the text is canonical whatever the input's spacing and key order.
        Ok(JobArgs::from(&Value::deserialize(d)?))
    }
}

impl JsonSchema for JobArgs {
    fn inline_schema() -> bool {
        <Value as JsonSchema>::inline_schema()
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        <Value as JsonSchema>::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        <Value as JsonSchema>::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <Value as JsonSchema>::json_schema(generator)
    }
}

fn default_group() -> String {
    "default".to_string()
}

fn default_time_zone() -> Shared {
    "UTC".into()
}

fn default_true() -> bool {
    true
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<str>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(serde_json::Number),
    }
    Ok(Option::<Id>::deserialize(d)?.map(|id| match id {
        Id::S(s) => s.into_boxed_str(),
        Id::N(n) => n.to_string().into_boxed_str(),
    }))
}

/// What one fire of a job produces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobType {
    /// One execution per fire.
    #[default]
    Normal,
    /// One execution per element of `args`, spread over the app's workers by weight.
    Sharding,
    /// An HTTP call to `url`, made by a worker running the built-in HTTP executor.
    Http,
    /// One execution on every live instance of the app that has the handler.
    Broadcast,
}

/// `retention`: which ended runs of the job the run history keeps (a run goes when either limit
/// says so; runs that have not ended are always kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retention {
    /// Days a run is kept after it ended (1 to 36500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<i64>,
    /// Most runs kept, newest first (1 to 1000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<i64>,
}

/// Largest `retention.days`.
pub const MAX_RETENTION_DAYS: i64 = 36_500;
/// Largest `retention.runs`.
pub const MAX_RETENTION_RUNS: i64 = 1_000_000;

/// `retryBackoff`: the delay after failed attempt n is `initial × factor^(n-1)`, at most `max`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBackoff {
    /// Delay after the first failure (`1s`, `500ms`).
    pub initial: String,
    /// Growth per further failure (1 to 10; default 2).
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// Upper bound (default `60s`).
    #[serde(default = "default_backoff_max")]
    pub max: String,
}

fn default_factor() -> f64 {
    2.0
}

fn default_backoff_max() -> String {
    "60s".to_string()
}

/// What a scheduled fire does while the job's previous run is still pending or running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OverlapPolicy {
    /// Run anyway: runs may overlap.
    #[default]
    Allow,
    /// Do not run; record the fire SKIPPED.
    Skip,
    /// Hold at most one fire until the running one ends; further fires are SKIPPED.
    QueueOne,
    /// Cancel the running one (its handler sees cancellation), then run.
    Replace,
}

impl MethodType {
    /// The method's name (`GET`, `POST`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            MethodType::Get => "GET",
            MethodType::Post => "POST",
            MethodType::Put => "PUT",
            MethodType::Patch => "PATCH",
            MethodType::Delete => "DELETE",
            MethodType::Head => "HEAD",
        }
    }
}

/// `alert`: an HTTP POST to `webhook` when a run ends in one of the `on` outcomes. `Debug`
/// shows the webhook redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Alert {
    /// The URL posted to (`http://` or `https://`).
    pub webhook: String,
    /// Which outcomes alert (default `FAILED` and `TIMED_OUT`).
    #[serde(default = "default_alert_on")]
    pub on: Vec<AlertOn>,
}

fn default_alert_on() -> Vec<AlertOn> {
    vec![AlertOn::Failed, AlertOn::TimedOut]
}

/// Outcomes that can trigger an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AlertOn {
    /// The run failed.
    Failed,
    /// The run's last attempt timed out.
    TimedOut,
    /// The run was cancelled.
    Cancelled,
    /// The run (or SKIPPED entry) stands for fires missed beyond the misfire threshold.
    Misfired,
}

impl AlertOn {
    /// The canonical name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertOn::Failed => "FAILED",
            AlertOn::TimedOut => "TIMED_OUT",
            AlertOn::Cancelled => "CANCELLED",
            AlertOn::Misfired => "MISFIRED",
        }
    }
}

/// Checks an `http://` / `https://` URL without parsing it fully; errors show `shown` (the
/// URL redacted, as views show it).
fn check_http_url(url: &str, shown: &str) -> Result<(), String> {
    let shown = echo(shown);
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("`{shown}` must start with http:// or https://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("`{shown}` has no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{shown}` contains spaces or control characters"));
    }
    Ok(())
}

/// What happens to fires missed for longer than the misfire threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MisfirePolicy {
    /// One run for the latest missed fire, recording how many it stands for.
    #[default]
    FireOnce,
    /// No run; one SKIPPED entry records the missed fires.
    Skip,
    /// A run for every missed fire within `catchUpWindow`; older ones are recorded SKIPPED.
    FireAll,
}

/// Default `catchUpWindow`.
pub const DEFAULT_CATCH_UP_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// How runs are spread over an app's workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalance {
    /// The app's shared consumer group: an idle instance takes the next run, each instance
    /// holding at most `weight × slots` runs at once.
    #[default]
    Queue,
    /// Weighted round robin (Krest-Job's `WEIGHTROUNDRIBBON` is accepted as an alias).
    #[serde(alias = "WEIGHTROUNDRIBBON", alias = "WEIGHT_ROUND_RIBBON")]
    WeightRoundRobin,
    /// A random live instance.
    Random,
    /// Live instances in turn.
    RoundRobin,
    /// The instance with the fewest runs in flight per unit of weight.
    LeastBusy,
    /// The same args go to the same instance while it lives.
    ConsistentHash,
    /// The first healthy instance in a stable order.
    Failover,
}

impl LoadBalance {
    /// Strategies this version dispatches (all of them).
    pub const SUPPORTED: [LoadBalance; 7] = [
        LoadBalance::Queue,
        LoadBalance::WeightRoundRobin,
        LoadBalance::Random,
        LoadBalance::RoundRobin,
        LoadBalance::LeastBusy,
        LoadBalance::ConsistentHash,
        LoadBalance::Failover,
    ];

    /// The canonical name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalance::Queue => "QUEUE",
            LoadBalance::WeightRoundRobin => "WEIGHT_ROUND_ROBIN",
            LoadBalance::Random => "RANDOM",
            LoadBalance::RoundRobin => "ROUND_ROBIN",
            LoadBalance::LeastBusy => "LEAST_BUSY",
            LoadBalance::ConsistentHash => "CONSISTENT_HASH",
            LoadBalance::Failover => "FAILOVER",
        }
    }
}

/// HTTP method of jobs that call an HTTP endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs)]
pub enum MethodType {
    Get,
    #[default]
    Post,
    Put,
    Patch,
    Delete,
    Head,
}

/// One thing wrong with a job definition: the field (camelCase, as written) and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Problem {
    /// The offending field, or `""` for the document as a whole.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// A definition that could not be accepted, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidJob {
    /// `group.name` when the document got far enough to tell, else `None`.
    pub job: Option<String>,
    /// Everything wrong with it, in field order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for InvalidJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.job {
            Some(job) => write!(f, "job {job} is invalid: ")?,
            None => f.write_str("job definition is invalid: ")?,
        }
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

pub(crate) fn problem(field: &str, message: impl Into<String>) -> Problem {
    Problem {
        field: field.to_string(),
        message: message.into(),
    }
}

/// `group.name` as shown in errors: shortened ([`echo`]) unless both parts are valid names.
fn job_label(group: &str, name: &str) -> String {
    if is_token(group) && is_token(name) {
        job_key(group, name)
    } else {
        echo(&job_key(group, name))
    }
}

/// Parses one JSON document into a [`JobSpec`] with errors that name the field, then validates
/// and normalizes it ([`JobSpec::validate`]). Values echoed in errors are shortened.
pub fn parse_job(doc: &Value) -> Result<JobSpec, InvalidJob> {
    let name_hint = || {
        let group = doc
            .get("jobGroup")
            .and_then(Value::as_str)
            .unwrap_or("default");
        doc.get("jobName")
            .and_then(Value::as_str)
            .map(|n| job_label(group, n))
    };
    if !doc.is_object() {
        return Err(InvalidJob {
            job: None,
            problems: vec![problem(
                "",
                format!(
                    "a job definition must be a JSON object, found {}",
                    json_kind(doc)
                ),
            )],
        });
    }
    let spec: JobSpec = serde_path_to_error::deserialize(doc).map_err(|e| {
        let field = e.path().to_string();
        let field = match field.as_str() {
            "." => String::new(),
            f if f.chars().count() > ECHO_CHARS => echo(f),
            _ => field,
        };
        let message = shorten_quoted(&e.into_inner().to_string());
        InvalidJob {
            job: name_hint(),
            problems: vec![problem(&field, message)],
        }
    })?;
    spec.validate()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses a `createTime` in Krest-Job's `yyyy-MM-dd HH:mm:ss` (taken as UTC) or RFC 3339.
pub fn parse_create_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
                .ok()
                .map(|n| n.and_utc())
        })
}

impl JobSpec {
    /// `group.name`: the job's key in the jobs and state buckets.
    pub fn key(&self) -> String {
        job_key(&self.job_group, &self.job_name)
    }

    /// Makes its texts that many jobs repeat — app, cron expression, time zone, handler
    /// path — the interner's shared copies ([`crate::shared`]).
    pub fn intern(&mut self, interner: &mut Interner) {
        interner.intern(&mut self.app_name);
        if let Some(cron) = &mut self.cron {
            interner.intern(cron);
        }
        interner.intern(&mut self.time_zone);
        interner.intern(&mut self.path);
    }

    /// The keys of the child jobs (a bare name is in this job's group).
    pub fn child_keys(&self) -> Vec<String> {
        self.child_jobs
            .iter()
            .map(|c| {
                if c.contains('.') {
                    c.clone()
                } else {
                    job_key(&self.job_group, c)
                }
            })
            .collect()
    }

    /// Checks every field and returns the normalized definition (SHARDING args as an array,
    /// `WEIGHTROUNDRIBBON` as `WEIGHT_ROUND_ROBIN`), or every problem found. Enforces the size
    /// limits (`MAX_*_BYTES`, [`MAX_HEADERS`], [`MAX_CHILD_JOBS`], [`MAX_DEFINITION_BYTES`]).
    pub fn validate(self) -> Result<JobSpec, InvalidJob> {
        self.check(true)
    }

    /// [`JobSpec::validate`] for a definition read back from the jobs bucket: the same checks
    /// without the size limits, so a definition stored before a limit existed keeps running.
    pub fn validate_stored(self) -> Result<JobSpec, InvalidJob> {
        self.check(false)
    }

    fn check(mut self, limits: bool) -> Result<JobSpec, InvalidJob> {
        let mut problems = Vec::new();
        // A value past its limit is reported as such and not looked into further (parsing a
        // megabyte cron expression, or echoing it, helps nobody).
        let too_long = |problems: &mut Vec<Problem>, field: &str, value: &str, max: usize| {
            let over = limits && value.len() > max;
            if over {
                problems.push(problem(
                    field,
                    format!("is {} bytes; the limit is {max}", value.len()),
                ));
            }
            over
        };
        for (field, value) in [
            ("appName", self.app_name.as_str()),
            ("jobGroup", self.job_group.as_str()),
            ("jobName", self.job_name.as_str()),
        ] {
            if !is_token(value) {
                problems.push(problem(
                    field,
                    format!(
                        "`{}` is not a valid name: use 1 to {MAX_TOKEN_LEN} letters, digits, `-` or `_` (it becomes part of NATS subjects)",
                        echo(value)
                    ),
                ));
            }
        }
        if self.job_type == JobType::Http && self.path.is_empty() {
            self.path = HTTP_HANDLER.into();
        }
        match (self.job_type, &self.url) {
            (JobType::Http, Some(url)) => {
                if !too_long(&mut problems, "url", url, MAX_URL_BYTES) {
                    if let Err(e) = check_http_url(url, &redact::url(url)) {
                        problems.push(problem("url", e));
                    }
                }
            }
            (JobType::Http, None) => problems.push(problem(
                "url",
                "an HTTP job needs the URL to call, e.g. https://billing.internal/run",
            )),
            (_, Some(_)) => problems.push(problem("url", "only HTTP jobs have a url")),
            (_, None) => {}
        }
        if !self.headers.is_empty() && self.job_type != JobType::Http {
            problems.push(problem("headers", "only HTTP jobs have headers"));
        } else if limits && self.headers.len() > MAX_HEADERS {
            problems.push(problem(
                "headers",
                format!(
                    "has {} headers; the limit is {MAX_HEADERS}",
                    self.headers.len()
                ),
            ));
        } else {
            for (name, value) in &self.headers {
                let field = format!("headers.{}", echo(name));
                if too_long(&mut problems, &field, name, MAX_HEADER_NAME_BYTES) {
                    continue;
                }
                let bad_name = name.is_empty()
                    || name
                        .chars()
                        .any(|c| !(c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)));
                if bad_name {
                    problems.push(problem(
                        &field,
                        format!(
                            "`{}` is not a valid header name: use letters, digits and !#$%&'*+-.^_`|~",
                            echo(name)
                        ),
                    ));
                } else if too_long(&mut problems, &field, value, MAX_HEADER_VALUE_BYTES) {
                } else if value.chars().any(char::is_control) {
                    // The value is a secret: it is not echoed.
                    problems.push(problem(&field, "the value has control characters"));
                }
            }
        }
        if let Some(alert) = &self.alert {
            if !too_long(
                &mut problems,
                "alert.webhook",
                &alert.webhook,
                MAX_URL_BYTES,
            ) {
                if let Err(e) = check_http_url(&alert.webhook, &redact::webhook(&alert.webhook)) {
                    problems.push(problem("alert.webhook", e));
                }
            }
            if alert.on.is_empty() {
                problems.push(problem(
                    "alert.on",
                    "is empty: list FAILED, TIMED_OUT, CANCELLED or MISFIRED",
                ));
            } else if limits && alert.on.len() > 4 {
                problems.push(problem(
                    "alert.on",
                    format!(
                        "has {} entries: list each of FAILED, TIMED_OUT, CANCELLED and MISFIRED at most once",
                        alert.on.len()
                    ),
                ));
            }
        }
        if self.path.trim().is_empty() {
            problems.push(problem(
                "path",
                "is empty: name the handler that runs this job, e.g. `service/demo-krestjob-post`",
            ));
        } else if self.path.len() > MAX_PATH_LEN
            || self
                .path
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            problems.push(problem(
                "path",
                format!("must be at most {MAX_PATH_LEN} characters without spaces or control characters"),
            ));
        }
        let tz = if too_long(
            &mut problems,
            "timeZone",
            &self.time_zone,
            MAX_SHORT_TEXT_BYTES,
        ) {
            None
        } else {
            match parse_time_zone(&self.time_zone) {
                Ok(tz) => Some(tz),
                Err(e) => {
                    problems.push(problem("timeZone", e));
                    None
                }
            }
        };
        if let Some(expr) = &self.cron {
            if !too_long(&mut problems, "cron", expr, MAX_SHORT_TEXT_BYTES) {
                if let Some(tz) = tz {
                    if let Err(e) = crate::cron::check(expr, tz) {
                        problems.push(problem("cron", e.to_string()));
                    }
                }
            }
        }
        let kinds = [self.cron.is_some(), self.every.is_some(), self.at.is_some()];
        if kinds.iter().filter(|k| **k).count() > 1 {
            problems.push(problem(
                "",
                "cron, every and at exclude each other: give one of them (or none for a job that only runs when triggered)",
            ));
        }
        if let Some(every) = &self.every {
            if !too_long(&mut problems, "every", every, MAX_SHORT_TEXT_BYTES) {
                match parse_duration(every) {
                    Ok(d) if d >= std::time::Duration::from_secs(1) && d <= MAX_PERIOD => {}
                    Ok(_) => problems.push(problem(
                        "every",
                        format!("`{}` is out of range: use 1s to 366d", echo(every)),
                    )),
                    Err(e) => problems.push(problem("every", e)),
                }
            }
        }
        if let Some(at) = &self.at {
            if !too_long(&mut problems, "at", at, MAX_SHORT_TEXT_BYTES)
                && DateTime::parse_from_rfc3339(at).is_err()
            {
                problems.push(problem(
                    "at",
                    format!(
                        "`{}` is not an RFC 3339 time such as 2026-12-24T18:00:00+01:00",
                        echo(at)
                    ),
                ));
            }
        }
        if let Some(window) = &self.catch_up_window {
            if !too_long(&mut problems, "catchUpWindow", window, MAX_SHORT_TEXT_BYTES) {
                match parse_duration(window) {
                    Ok(d) if d <= MAX_PERIOD => {}
                    Ok(_) => problems.push(problem(
                        "catchUpWindow",
                        format!("`{}` is out of range: use at most 366d", echo(window)),
                    )),
                    Err(e) => problems.push(problem("catchUpWindow", e)),
                }
            }
        }
        if !(0..=i64::from(MAX_RETRY_TIMES)).contains(&self.retry_times) {
            problems.push(problem(
                "retryTimes",
                format!(
                    "{} is out of range: use 0 to {MAX_RETRY_TIMES}",
                    self.retry_times
                ),
            ));
        }
        if let Some(r) = &self.retention {
            if r.days.is_none() && r.runs.is_none() {
                problems.push(problem(
                    "retention",
                    "give `days` (keep runs that many days after they ended), `runs` (keep the newest that many), or both",
                ));
            }
            if let Some(d) = r.days.filter(|d| !(1..=MAX_RETENTION_DAYS).contains(d)) {
                problems.push(problem(
                    "retention.days",
                    format!("{d} is out of range: use 1 to {MAX_RETENTION_DAYS}"),
                ));
            }
            if let Some(n) = r.runs.filter(|n| !(1..=MAX_RETENTION_RUNS).contains(n)) {
                problems.push(problem(
                    "retention.runs",
                    format!("{n} is out of range: use 1 to {MAX_RETENTION_RUNS}"),
                ));
            }
        }
        if let Some(t) = self.timeout_secs {
            if !(1..=MAX_TIMEOUT_SECS).contains(&t) {
                problems.push(problem(
                    "timeoutSecs",
                    format!("{t} is out of range: use 1 to {MAX_TIMEOUT_SECS} seconds, or leave it out for no limit"),
                ));
            }
        }
        if !LoadBalance::SUPPORTED.contains(&self.load_balance_type) {
            problems.push(problem(
                "loadBalanceType",
                format!(
                    "{} is not supported by this version",
                    self.load_balance_type.as_str()
                ),
            ));
        }
        if let Some(id) = &self.id {
            too_long(&mut problems, "id", id, MAX_SHORT_TEXT_BYTES);
        }
        if let Some(ct) = &self.create_time {
            if !too_long(&mut problems, "createTime", ct, MAX_SHORT_TEXT_BYTES)
                && parse_create_time(ct).is_none()
            {
                problems.push(problem(
                    "createTime",
                    format!(
                        "`{}` is not a time: use `yyyy-MM-dd HH:mm:ss` or RFC 3339",
                        echo(ct)
                    ),
                ));
            }
        }
        if let Some(d) = &self.description {
            too_long(&mut problems, "description", d, MAX_DESCRIPTION_BYTES);
        }
        let params_too_long = match &self.sharding_params {
            Some(p) => too_long(
                &mut problems,
                "shardingParams",
                p,
                MAX_SHARDING_PARAMS_BYTES,
            ),
            None => false,
        };
        match (self.job_type, self.shard_count) {
            (JobType::Sharding, None) => {
                if self.sharding_params.is_some() {
                    problems.push(problem("shardingParams", "needs shardCount"));
                }
                match sharding_items(&self.args.to_value()) {
                    Ok(items) => self.args = JobArgs::from(&Value::Array(items)),
                    Err(msg) => problems.push(problem("args", msg)),
                }
            }
            (JobType::Sharding, Some(n)) => {
                if !(1..=MAX_SHARDS as i64).contains(&n) {
                    problems.push(problem(
                        "shardCount",
                        format!("{n} is out of range: use 1 to {MAX_SHARDS}"),
                    ));
                } else if let (Some(params), false) = (&self.sharding_params, params_too_long) {
                    if let Err(msg) = parse_sharding_params(params, n as usize) {
                        problems.push(problem("shardingParams", msg));
                    }
                }
            }
            (_, Some(_)) => problems.push(problem("shardCount", "only SHARDING jobs have shards")),
            (_, None) => {
                if self.sharding_params.is_some() {
                    problems.push(problem("shardingParams", "only SHARDING jobs have shards"));
                }
            }
        }
        if limits && self.child_jobs.len() > MAX_CHILD_JOBS {
            problems.push(problem(
                "childJobs",
                format!(
                    "has {} jobs; the limit is {MAX_CHILD_JOBS}",
                    self.child_jobs.len()
                ),
            ));
        } else {
            for child in &self.child_jobs {
                let ok = match child.split_once('.') {
                    Some((g, n)) => is_token(g) && is_token(n),
                    None => is_token(child),
                };
                if !ok {
                    problems.push(problem(
                        "childJobs",
                        format!(
                            "`{}` is not a job: use `group.name`, or a name in this job's group",
                            echo(child)
                        ),
                    ));
                }
            }
        }
        if let Some(b) = &self.retry_backoff {
            let long = too_long(
                &mut problems,
                "retryBackoff.initial",
                &b.initial,
                MAX_SHORT_TEXT_BYTES,
            ) | too_long(
                &mut problems,
                "retryBackoff.max",
                &b.max,
                MAX_SHORT_TEXT_BYTES,
            );
            if !long {
                if let Err(msg) = b.to_millis() {
                    problems.push(problem("retryBackoff", msg));
                }
            }
        }
        // The args' text is their compact serialization: its length is their size.
        if limits && self.args.json().len() > MAX_ARGS_BYTES {
            problems.push(problem(
                "args",
                format!(
                    "is {} bytes; the limit is {MAX_ARGS_BYTES}: pass a reference (an id, a URL) instead of the data",
                    self.args.json().len()
                ),
            ));
        }
        if limits && problems.is_empty() {
            match serde_json::to_vec(&self) {
                Ok(bytes) if bytes.len() > MAX_DEFINITION_BYTES => problems.push(problem(
                    "",
                    format!(
                        "the definition is {} bytes as stored; the limit is {MAX_DEFINITION_BYTES}: shorten args, shardingParams, headers or description",
                        bytes.len()
                    ),
                )),
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(InvalidJob {
                job: Some(job_label(&self.job_group, &self.job_name)),
                problems,
            })
        }
    }

    /// Refuses an `at` that has passed when the job is new (`stored` is `None`) or its `at`
    /// changed: such a job would never fire. A re-apply that leaves an existing job's `at` as it
    /// was is fine even when that time has passed (applies from a Git repository stay
    /// idempotent). Pure: the caller passes `now`.
    pub fn check_at(&self, stored: Option<&JobSpec>, now: DateTime<Utc>) -> Result<(), Problem> {
        let Some(at) = self.at.as_deref() else {
            return Ok(());
        };
        let Ok(when) = DateTime::parse_from_rfc3339(at).map(|t| t.with_timezone(&Utc)) else {
            return Ok(()); // Reported by validation.
        };
        let unchanged = stored
            .and_then(|s| s.at.as_deref())
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .is_some_and(|s| s == when);
        if unchanged || when > now {
            return Ok(());
        }
        Err(problem(
            "at",
            format!(
                "{} is in the past (now {}): the job would never fire; give a future time, or leave `at` out and run the job with `krest job trigger {}`",
                when.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                job_label(&self.job_group, &self.job_name),
            ),
        ))
    }

    /// The shards of one fire with `args`: `[None]` for NORMAL jobs; for SHARDING jobs one
    /// `Some(item)` per element of the `args` array, or per shard of `shardCount` (its
    /// `shardingParams` entry, or `null`). Call on a validated spec.
    pub fn shard_items(&self, args: &Value) -> Vec<Option<Value>> {
        match (self.job_type, self.shard_count, args) {
            (JobType::Sharding, Some(n), _) => {
                let n = usize::try_from(n).unwrap_or(0);
                let params = self
                    .sharding_params
                    .as_deref()
                    .and_then(|p| parse_sharding_params(p, n).ok())
                    .unwrap_or_default();
                (0..n)
                    .map(|i| Some(params.get(&i).cloned().map_or(Value::Null, Value::String)))
                    .collect()
            }
            (JobType::Sharding, None, Value::Array(items)) => {
                items.iter().cloned().map(Some).collect()
            }
            _ => vec![None],
        }
    }

    /// The job's schedule, if it has one (`created_at` anchors `every`). Call on a validated
    /// spec (the "fires in the future" check of cron validation is not repeated).
    pub fn schedule(&self, created_at: DateTime<Utc>) -> Option<Result<Schedule, String>> {
        if let Some(expr) = self.cron.as_deref() {
            return Some(parse_time_zone(&self.time_zone).and_then(|tz| {
                CronSchedule::parse(expr, tz)
                    .map(|c| Schedule::Cron(Box::new(c)))
                    .map_err(|e| e.to_string())
            }));
        }
        if let Some(every) = self.every.as_deref() {
            return Some(parse_duration(every).and_then(|d| {
                let period_ms = i64::try_from(d.as_millis()).map_err(|e| e.to_string())?;
                if period_ms < 1000 {
                    return Err(format!("every `{}` is shorter than 1s", echo(every)));
                }
                Ok(Schedule::Every {
                    start: created_at,
                    period_ms,
                })
            }));
        }
        let at = self.at.as_deref()?;
        Some(
            DateTime::parse_from_rfc3339(at)
                .map(|t| {
                    // Fire times have millisecond precision (as run ids do).
                    let t = t.with_timezone(&Utc);
                    Schedule::At(DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t))
                })
                .map_err(|e| format!("at `{}`: {e}", echo(at))),
        )
    }

    /// The catch-up window of `FIRE_ALL` (default 10 minutes).
    pub fn catch_up_window(&self) -> std::time::Duration {
        self.catch_up_window
            .as_deref()
            .and_then(|w| parse_duration(w).ok())
            .unwrap_or(DEFAULT_CATCH_UP_WINDOW)
    }
}

/// Parses `0=Beijing,1=Shanghai` for `n` shards.
fn parse_sharding_params(
    params: &str,
    n: usize,
) -> Result<std::collections::BTreeMap<usize, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for part in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (index, value) = part.split_once('=').ok_or_else(|| {
            format!(
                "`{}` is not `index=value` (e.g. 0=Beijing,1=Shanghai)",
                echo(part)
            )
        })?;
        let index: usize = index.trim().parse().map_err(|_| {
            format!(
                "`{}` in `{}` is not a shard index",
                echo(index.trim()),
                echo(part)
            )
        })?;
        if index >= n {
            return Err(format!("shard {index} does not exist: shardCount is {n}"));
        }
        if out.insert(index, value.trim().to_string()).is_some() {
            return Err(format!("shard {index} is given twice"));
        }
    }
    Ok(out)
}

impl RetryBackoff {
    /// `(initial ms, factor, max ms)`, checked.
    pub fn to_millis(&self) -> Result<(u64, f64, u64), String> {
        let initial = parse_duration(&self.initial)?;
        let max = parse_duration(&self.max)?;
        if !(1.0..=10.0).contains(&self.factor) {
            return Err(format!(
                "factor {} is out of range: use 1 to 10",
                self.factor
            ));
        }
        if initial > max {
            return Err(format!(
                "initial `{}` is longer than max `{}`",
                echo(&self.initial),
                echo(&self.max)
            ));
        }
        if max > std::time::Duration::from_secs(24 * 3600) {
            return Err(format!("max `{}` is longer than a day", echo(&self.max)));
        }
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Ok((ms(initial), self.factor, ms(max)))
    }
}

fn sharding_items(args: &Value) -> Result<Vec<Value>, String> {
    let items = match args {
        Value::Array(items) => items.clone(),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(items)) => items,
            _ => {
                return Err(format!(
                    "a SHARDING job needs a JSON array (one shard per element), or a string holding one such as \"[\\\"1\\\",\\\"2\\\"]\"; got the string `{}`",
                    echo(s)
                ))
            }
        },
        other => {
            return Err(format!(
                "a SHARDING job needs a JSON array (one shard per element); got {}",
                json_kind(other)
            ))
        }
    };
    if items.is_empty() {
        return Err("a SHARDING job needs at least one shard: args is an empty array".into());
    }
    if items.len() > MAX_SHARDS {
        return Err(format!(
            "has {} shards; the limit is {MAX_SHARDS}",
            items.len()
        ));
    }
    Ok(items)
}

/// A job definition as stored in the jobs bucket: the spec plus what the scheduler keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredJob {
    /// The validated, normalized definition.
    pub spec: JobSpec,
    /// When the job was first applied.
    pub created_at: DateTime<Utc>,
    /// When this revision was applied (a pause or resume is a revision too). Fires before it
    /// are never caught up.
    pub updated_at: DateTime<Utc>,
    /// The job's own revision number: 1 for its first definition, one more for each change,
    /// and a definition applied after a deletion continues after the deletion's number
    /// ([`DeletedJob`]). The jobs bucket's revision (shared by all jobs) is only used to
    /// check writes. 0 (absent) in definitions written before jobs were numbered: their
    /// number is then their place in the key's history.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The body of a job's deletion marker in the jobs bucket (a `KV-Operation: DEL` message):
/// the number the deletion takes in the job's revisions, so a job applied again continues
/// after it without reading the key's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletedJob {
    /// The deletion's revision number (the deleted definition's plus one).
    pub version: u64,
    /// The `requestId` of the `job.delete` that wrote it: a resend of that request finds
    /// its deletion here (in the key's history) and answers with it, rather than deleting a
    /// job applied again in between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed_sharding() -> Value {
        json!({
            "appName": "demo-spring-krest-job",
            "createTime": "2022-07-03 16:49:47",
            "id": "1543439397951193088",
            "jobGroup": "default-jobGroup",
            "jobName": "demo-job2",
            "jobType": "SHARDING",
            "args": "[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\"]",
            "cron": "0/5 * * * * ?",
            "loadBalanceType": "WEIGHTROUNDRIBBON",
            "methodType": "POST",
            "path": "service/demo-krestjob/sharding",
            "running": true,
            "retryTimes": 3
        })
    }

    #[test]
    fn seed_sharding_document_parses_and_normalizes() {
        let spec = parse_job(&seed_sharding()).unwrap();
        assert_eq!(spec.key(), "default-jobGroup.demo-job2");
        assert_eq!(spec.load_balance_type, LoadBalance::WeightRoundRobin);
        assert_eq!(spec.job_type, JobType::Sharding);
        assert_eq!(spec.shard_items(&spec.args.to_value()).len(), 9);
        assert_eq!(spec.args.to_value()[8], json!("9"));
        assert_eq!(&*spec.time_zone, "UTC");
        // Normalized form round-trips through parse_job unchanged.
        let again = parse_job(&serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn seed_normal_document_parses() {
        let doc = json!({
            "appName": "demo-spring-krest-job",
            "createTime": "2022-06-28 21:33:59",
            "id": "1543439397951193089",
            "args": "from server",
            "jobGroup": "default-jobGroup",
            "cron": "0/5 * * * * ?",
            "jobName": "demo-job3",
            "jobType": "NORMAL",
            "loadBalanceType": "WEIGHTROUNDRIBBON",
            "methodType": "POST",
            "retryTimes": 3,
            "path": "service/demo-krestjob-post",
            "running": true
        });
        let spec = parse_job(&doc).unwrap();
        assert_eq!(spec.args, json!("from server"));
        assert_eq!(spec.shard_items(&spec.args.to_value()), vec![None]);
        assert_eq!(spec.retry_times, 3);
    }

    #[test]
    fn defaults_apply() {
        let spec = parse_job(&json!({"appName": "a", "jobName": "j", "path": "p"})).unwrap();
        assert_eq!(spec.job_group, "default");
        assert_eq!(spec.job_type, JobType::Normal);
        assert_eq!(spec.load_balance_type, LoadBalance::Queue);
        assert!(spec.running);
        assert_eq!(spec.retry_times, 0);
        assert_eq!(spec.cron, None);
    }

    fn problems_of(doc: Value) -> Vec<String> {
        parse_job(&doc)
            .unwrap_err()
            .problems
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn retention_is_checked() {
        let doc = |r: Value| json!({"appName": "a", "jobName": "j", "path": "p", "retention": r});
        let spec = parse_job(&doc(json!({"days": 30, "runs": 100}))).unwrap();
        assert_eq!(
            spec.retention,
            Some(Box::new(Retention {
                days: Some(30),
                runs: Some(100)
            }))
        );
        assert!(problems_of(doc(json!({})))[0].starts_with("retention: give `days`"));
        assert_eq!(
            problems_of(doc(json!({"days": 0, "runs": 2_000_000}))),
            [
                "retention.days: 0 is out of range: use 1 to 36500",
                "retention.runs: 2000000 is out of range: use 1 to 1000000"
            ]
        );
        assert!(problems_of(doc(json!({"weeks": 1})))[0].contains("weeks"));
    }

    #[test]
    fn unknown_field_is_named() {
        let mut doc = seed_sharding();
        doc["retryTime"] = json!(3);
        let p = problems_of(doc);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("unknown field `retryTime`"), "{p:?}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let mut doc = seed_sharding();
        doc["running"] = json!("yes");
        let p = problems_of(doc);
        assert!(p[0].starts_with("running: invalid type"), "{p:?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let p = problems_of(json!({
            "appName": "demo app",
            "jobGroup": "g.1",
            "jobName": "",
            "path": "",
            "cron": "0/5 * * * *  ? *  *",
            "timeZone": "Mars/Olympus",
            "retryTimes": 99,
            "createTime": "yesterday",
            "jobType": "SHARDING",
            "args": "not an array"
        }));
        let fields: Vec<&str> = p.iter().map(|s| s.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "appName",
                "jobGroup",
                "jobName",
                "path",
                "timeZone",
                "retryTimes",
                "createTime",
                "args"
            ],
            "{p:#?}"
        );
        assert!(p[5].contains("99 is out of range: use 0 to 20"));
    }

    #[test]
    fn invalid_cron_is_explained() {
        let mut doc = seed_sharding();
        doc["cron"] = json!("0/5 * * * ?x");
        let p = problems_of(doc);
        assert!(
            p[0].starts_with("cron: invalid cron expression `0/5 * * * ?x`"),
            "{p:?}"
        );
    }

    #[test]
    fn sharding_args_forms() {
        let mut doc = seed_sharding();
        doc["args"] = json!(["a", {"k": 1}]);
        let spec = parse_job(&doc).unwrap();
        assert_eq!(spec.shard_items(&spec.args.to_value()).len(), 2);
        doc["args"] = json!("[]");
        assert!(problems_of(doc.clone())[0].contains("at least one shard"));
        doc["args"] = json!(7);
        assert!(problems_of(doc.clone())[0].contains("got a number"));
        doc.as_object_mut().unwrap().remove("args");
        assert!(problems_of(doc)[0].contains("got null"));
    }

    #[test]
    fn schedules_every_and_at() {
        let base = json!({"appName": "a", "jobName": "j", "path": "p"});
        let with = |k: &str, v: Value| {
            let mut d = base.clone();
            d[k] = v;
            d
        };
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let every = parse_job(&with("every", json!("1m30s"))).unwrap();
        match every.schedule(t0).unwrap().unwrap() {
            Schedule::Every { start, period_ms } => assert_eq!((start, period_ms), (t0, 90_000)),
            other => panic!("{other:?}"),
        }
        let at = parse_job(&with("at", json!("2026-12-24T18:00:00+01:00"))).unwrap();
        assert!(matches!(at.schedule(t0), Some(Ok(Schedule::At(_)))));
        assert!(
            parse_job(&base).unwrap().schedule(t0).is_none(),
            "manual-only"
        );
        assert!(problems_of(with("every", json!("500ms")))[0]
            .starts_with("every: `500ms` is out of range"));
        assert!(problems_of(with("every", json!("soon")))[0]
            .starts_with("every: `soon` is not a duration"));
        assert!(problems_of(with("at", json!("tomorrow")))[0]
            .starts_with("at: `tomorrow` is not an RFC 3339 time"));
        let mut both = with("every", json!("1m"));
        both["cron"] = json!("* * * * * ?");
        assert!(problems_of(both)[0].starts_with("cron, every and at exclude each other"));
        let fire_all = parse_job(&json!({"appName": "a", "jobName": "j", "path": "p", "misfirePolicy": "FIRE_ALL", "catchUpWindow": "5m"})).unwrap();
        assert_eq!(fire_all.misfire_policy, MisfirePolicy::FireAll);
        assert_eq!(
            fire_all.catch_up_window(),
            std::time::Duration::from_secs(300)
        );
        assert!(problems_of(with("misfirePolicy", json!("LATER")))[0]
            .starts_with("misfirePolicy: unknown variant `LATER`"));
    }

    #[test]
    fn shard_count_with_params() {
        let spec = parse_job(&json!({
            "appName": "a", "jobName": "j", "path": "p", "jobType": "SHARDING",
            "shardCount": 3, "shardingParams": "0=Beijing, 2=Guangzhou", "args": {"date": "today"}
        }))
        .unwrap();
        assert_eq!(
            spec.shard_items(&spec.args.to_value()),
            vec![
                Some(json!("Beijing")),
                Some(Value::Null),
                Some(json!("Guangzhou"))
            ]
        );
        assert_eq!(
            spec.args,
            json!({"date": "today"}),
            "args go whole to every shard"
        );
        let bad = |params: &str| {
            problems_of(
                json!({"appName": "a", "jobName": "j", "path": "p", "jobType": "SHARDING", "shardCount": 2, "shardingParams": params}),
            )
        };
        assert!(bad("0=a,2=b")[0].contains("shard 2 does not exist"));
        assert!(bad("0=a,0=b")[0].contains("shard 0 is given twice"));
        assert!(bad("zero=a")[0].contains("is not a shard index"));
        assert!(bad("Beijing")[0].contains("is not `index=value`"));
        assert!(
            problems_of(json!({"appName": "a", "jobName": "j", "path": "p", "shardCount": 2}))[0]
                .starts_with("shardCount: only SHARDING jobs have shards")
        );
    }

    #[test]
    fn retry_backoff_is_checked() {
        let doc =
            |b: Value| json!({"appName": "a", "jobName": "j", "path": "p", "retryBackoff": b});
        let spec = parse_job(&doc(json!({"initial": "200ms", "factor": 3, "max": "5s"}))).unwrap();
        assert_eq!(
            spec.retry_backoff.unwrap().to_millis().unwrap(),
            (200, 3.0, 5000)
        );
        assert!(
            problems_of(doc(json!({"initial": "10s", "max": "1s"})))[0].contains("longer than max")
        );
        assert!(problems_of(doc(json!({"initial": "1s", "factor": 0.5})))[0]
            .contains("factor 0.5 is out of range"));
        assert!(
            problems_of(doc(json!({"initial": "1s", "jitter": true})))[0]
                .contains("unknown field `jitter`")
        );
    }

    #[test]
    fn non_object_is_rejected() {
        let p = problems_of(json!([1, 2]));
        assert_eq!(
            p,
            ["a job definition must be a JSON object, found an array"]
        );
    }

    #[test]
    fn numeric_id_is_accepted() {
        let mut doc = seed_sharding();
        doc["id"] = json!(1543439397951193088_u64);
        assert_eq!(
            parse_job(&doc).unwrap().id.as_deref(),
            Some("1543439397951193088")
        );
    }

    fn http_doc() -> Value {
        json!({"appName": "web", "jobGroup": "t", "jobName": "call", "jobType": "HTTP",
               "url": "https://api.example.com/run"})
    }

    #[test]
    fn every_free_text_field_has_a_limit() {
        let with = |base: Value, k: &str, v: Value| {
            let mut d = base;
            d[k] = v;
            problems_of(d)
        };
        let plain = json!({"appName": "a", "jobName": "j", "path": "p"});
        assert_eq!(
            with(plain.clone(), "description", json!("d".repeat(900 * 1024))),
            ["description: is 921600 bytes; the limit is 4096"]
        );
        for field in [
            "cron",
            "every",
            "at",
            "timeZone",
            "catchUpWindow",
            "createTime",
            "id",
        ] {
            let p = with(plain.clone(), field, json!("x".repeat(300)));
            assert!(
                p.contains(&format!("{field}: is 300 bytes; the limit is 256")),
                "{field}: {p:?}"
            );
        }
        let long_url = format!("https://h/{}", "u".repeat(MAX_URL_BYTES));
        assert_eq!(
            with(http_doc(), "url", json!(long_url)),
            ["url: is 4106 bytes; the limit is 4096"]
        );
        let many: serde_json::Map<String, Value> = (0..=MAX_HEADERS)
            .map(|i| (format!("X-{i}"), json!("v")))
            .collect();
        assert_eq!(
            with(http_doc(), "headers", Value::Object(many)),
            ["headers: has 65 headers; the limit is 64"]
        );
        let p = with(
            http_doc(),
            "headers",
            json!({"X-Big": "v".repeat(MAX_HEADER_VALUE_BYTES + 1), "N".repeat(300): "v"}),
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p.iter()
                .any(|m| m.starts_with("headers.X-Big: is 8193 bytes")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.contains("is 300 bytes; the limit is 256")),
            "{p:?}"
        );
        assert_eq!(
            with(
                http_doc(),
                "alert",
                json!({"webhook": format!("https://h/{}", "w".repeat(MAX_URL_BYTES))})
            ),
            ["alert.webhook: is 4106 bytes; the limit is 4096"]
        );
        let sharded = json!({"appName": "a", "jobName": "j", "path": "p", "jobType": "SHARDING", "shardCount": 2});
        assert_eq!(
            with(sharded, "shardingParams", json!("0=".repeat(40 * 1024))),
            ["shardingParams: is 81920 bytes; the limit is 65536"]
        );
        let children: Vec<String> = (0..=MAX_CHILD_JOBS).map(|i| format!("c{i}")).collect();
        assert_eq!(
            with(plain.clone(), "childJobs", json!(children)),
            ["childJobs: has 65 jobs; the limit is 64"]
        );
        // Each field within its limit, the whole beyond: the definition limit.
        let headers: serde_json::Map<String, Value> = (0..20)
            .map(|i| (format!("X-{i}"), json!("v".repeat(MAX_HEADER_VALUE_BYTES))))
            .collect();
        let mut big = http_doc();
        big["headers"] = Value::Object(headers);
        big["args"] = json!("a".repeat(60 * 1024));
        let p = problems_of(big);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("the definition is ") && p[0].contains("the limit is 131072"),
            "{p:?}"
        );
    }

    #[test]
    fn stored_definitions_are_not_held_to_the_limits() {
        let mut spec = parse_job(&json!({"appName": "a", "jobName": "j", "path": "p"})).unwrap();
        spec.description = Some("d".repeat(MAX_DESCRIPTION_BYTES + 1).into());
        assert!(spec.clone().validate().is_err());
        assert!(spec.validate_stored().is_ok());
    }

    #[test]
    fn echoed_values_are_shortened() {
        let name = "n".repeat(100 * 1024);
        let err = parse_job(&json!({"appName": "a", "jobName": name, "path": "p"})).unwrap_err();
        let text = err.to_string();
        assert!(text.len() < 400, "{} bytes: {text}", text.len());
        assert!(text.contains("…(102408 bytes)"), "{text}");
        // Values quoted by serde's own messages too.
        let p = problems_of(json!({"appName": "a", "jobName": "j", "path": "p",
            "jobType": "X".repeat(100 * 1024)}));
        assert!(p[0].len() < 300, "{p:?}");
        assert!(p[0].starts_with("jobType: unknown variant `XXX"), "{p:?}");
        let p = problems_of(json!({"appName": "a", "jobName": "j", "path": "p",
            "k".repeat(100 * 1024): 1}));
        assert!(p[0].len() < 1000, "{p:?}");
        // A URL with credentials is echoed redacted.
        let mut doc = http_doc();
        doc["url"] = json!("ftp://user:pw@host/x");
        let p = problems_of(doc);
        assert_eq!(
            p,
            ["url: `ftp://<redacted>@host/x` must start with http:// or https://"]
        );
    }

    #[test]
    fn an_at_in_the_past_is_refused_when_new_or_changed() {
        let now = DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |t: &str| {
            parse_job(
                &json!({"appName": "a", "jobGroup": "t", "jobName": "j", "path": "p", "at": t}),
            )
            .unwrap()
        };
        let past = at("2026-06-01T11:59:59Z");
        let p = past.check_at(None, now).unwrap_err();
        assert_eq!(p.field, "at");
        assert_eq!(
            p.message,
            "2026-06-01T11:59:59.000Z is in the past (now 2026-06-01T12:00:00.000Z): the job would never fire; give a future time, or leave `at` out and run the job with `krest job trigger t.j`"
        );
        assert!(at("2026-06-01T12:00:01Z").check_at(None, now).is_ok());
        // Unchanged (the same instant, however written): fine; changed: refused.
        assert!(past
            .check_at(Some(&at("2026-06-01T13:59:59+02:00")), now)
            .is_ok());
        assert!(past
            .check_at(Some(&at("2026-06-01T11:00:00Z")), now)
            .is_err());
        let plain = parse_job(&json!({"appName": "a", "jobName": "j", "path": "p"})).unwrap();
        assert!(past.check_at(Some(&plain), now).is_err());
        assert!(plain.check_at(None, now).is_ok());
    }

    #[test]
    fn the_largest_valid_definition_fits_in_one_api_reply() {
        // The fields without secrets filled up to the definition limit (an HTTP job cannot get
        // there: its secrets are what would fill it, and views show them shorter).
        let mut doc = json!({"appName": "a", "jobGroup": "t", "jobName": "j", "path": "p",
            "jobType": "SHARDING", "shardCount": 1000, "shardingParams": "0=",
            "args": "a".repeat(MAX_ARGS_BYTES - 10),
            "description": "d".repeat(MAX_DESCRIPTION_BYTES)});
        let base = serde_json::to_vec(&parse_job(&doc).unwrap()).unwrap().len();
        doc["shardingParams"] = json!(format!("0={}", "b".repeat(MAX_DEFINITION_BYTES - base)));
        let spec = parse_job(&doc).unwrap();
        let stored = serde_json::to_vec(&spec).unwrap().len();
        assert_eq!(stored, MAX_DEFINITION_BYTES);
        let view = crate::api::JobView {
            key: spec.key(),
            spec: spec.redacted(),
            revision: u64::MAX,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            next_fire_at: Some(Utc::now()),
        };
        let reply = crate::api::ApiReply {
            catching_up: None,
            ok: true,
            result: Some(serde_json::to_value(&view).unwrap()),
            error: None,
            next: None,
        };
        let bytes = serde_json::to_vec(&reply).unwrap().len();
        assert!(
            bytes < MAX_DEFINITION_BYTES + 512,
            "{bytes} bytes for a {stored}-byte definition"
        );
        assert!(
            bytes * 4 < 1024 * 1024,
            "a quarter of NATS's default max_payload"
        );
        // One byte more is refused.
        doc["shardingParams"] = json!(format!("0={}", "b".repeat(MAX_DEFINITION_BYTES - base + 1)));
        assert!(problems_of(doc)[0].starts_with("the definition is 131073 bytes"));
    }

    #[test]
    fn views_of_http_jobs_are_not_much_larger_than_their_definition() {
        // Every redaction lengthening a value: one-byte header values, userinfo, webhook path.
        let headers: serde_json::Map<String, Value> = (0..MAX_HEADERS)
            .map(|i| (format!("X-{i}"), json!("v")))
            .collect();
        let mut doc = http_doc();
        doc["url"] = json!("https://u@api.example.com/run");
        doc["headers"] = Value::Object(headers);
        doc["alert"] = json!({"webhook": "https://hooks.example.com/x"});
        let spec = parse_job(&doc).unwrap();
        let stored = serde_json::to_vec(&spec).unwrap().len();
        let shown = serde_json::to_vec(&spec.redacted()).unwrap().len();
        assert!(
            shown <= stored + 10 * (MAX_HEADERS + 2),
            "{shown} vs {stored}"
        );
    }

    #[test]
    fn oversized_args_are_rejected() {
        let mut doc = seed_sharding();
        doc["jobType"] = json!("NORMAL");
        doc["args"] = json!("x".repeat(MAX_ARGS_BYTES + 1));
        assert!(problems_of(doc)[0].starts_with("args: is 65539 bytes"));
    }
}
