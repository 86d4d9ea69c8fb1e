//! The SQL view of the events stream: runs, attempts and log lines, written in batches by the
//! recorder and read by the API. This is the only module that knows SQL.
//!
//! Two backends through one `sqlx::Any` pool: SQLite (a file per node, the default) and
//! PostgreSQL (one database that several nodes may share). The schema is portable: times are
//! epoch milliseconds in BIGINT columns, booleans are 0/1, text keys compare bytewise (`COLLATE
//! "C"` on Postgres, SQLite's default), NULL scheduled times sort last on both. Where SQL
//! differs, a migration has a Postgres variant. Fixed statements use `$n`; the generated
//! multi-row statements use anonymous `?` on SQLite (its driver resolves `$n` by name on every
//! bind, quadratic in the parameters) and `$n` on Postgres.
//!
//! Every write is an idempotent upsert keyed by run, shard, attempt and log sequence, and the
//! stream sequence of the last applied event is stored in the same transaction, so replaying the
//! stream never duplicates a row and a crash never skips one. A batch first locks the cursor row
//! (`SELECT … FOR UPDATE` on Postgres, a write on SQLite) and skips the events at or below it:
//! several nodes recording into one database interleave, and each event is applied once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use crate::record::fold;
use chrono::{DateTime, TimeZone, Utc};
use krest_schemas::api::{AttemptStatus, AttemptView, LogView, RunDetail, RunStatus, RunSummary};
use krest_schemas::{AttemptOutcome, LogLevel, RunEvent, Trigger};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Connection, Row};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is not one Krest understands.
    #[error(
        "unsupported database URL `{0}`: use sqlite://PATH (the file is created if missing) or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
    )]
    BadUrl(String),
    /// The database could not be opened or migrated at start.
    #[error("cannot open the database at {url}: {cause} ({hint})")]
    Open {
        /// The URL, password redacted.
        url: String,
        /// What failed (shown in the message, not chained: sqlx repeats itself).
        cause: sqlx::Error,
        /// What to check.
        hint: &'static str,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A row held something unreadable.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// Database backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file, one per node.
    Sqlite,
    /// PostgreSQL, possibly shared by several nodes.
    Postgres,
}

impl Backend {
    /// Name shown in node presence.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// What [`Store::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The runs the batch brought to a final status.
    pub ended: Vec<RunSummary>,
    /// The cursor after the batch: the last stream sequence recorded in the database, by this
    /// node or another sharing it.
    pub cursor: u64,
}

/// Which ended runs [`Store::prune`] deletes.
#[derive(Debug, Clone)]
pub struct PruneRule<'a> {
    /// Runs that ended before this (epoch ms).
    pub ended_before: Option<i64>,
    /// Runs beyond the newest this many of their job.
    pub keep_runs: Option<u32>,
    /// Whose runs.
    pub scope: PruneScope<'a>,
}

/// The runs a [`PruneRule`] applies to.
#[derive(Debug, Clone, Copy)]
pub enum PruneScope<'a> {
    /// One job's.
    Job {
        /// Its group.
        group: &'a str,
        /// Its name.
        name: &'a str,
    },
    /// Every job's but these `(group, name)` (which have their own rules).
    Except(&'a [(String, String)]),
}

/// The statuses of ended runs, which retention may delete.
const PRUNE_ENDED_STATUSES: [&str; 5] =
    ["SUCCEEDED", "FAILED", "TIMED_OUT", "SKIPPED", "CANCELLED"];
/// [`PRUNE_ENDED_STATUSES`] as a condition.
const PRUNE_ENDED: &str = "status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'SKIPPED', 'CANCELLED')";

/// A connection pool with Krest's schema.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// A schema migration: its SQL (statements separated by `;`) and, where Postgres needs other
/// SQL, its Postgres variant.
struct Migration {
    version: i64,
    sql: &'static str,
    postgres: Option<&'static str>,
}

impl Migration {
    const fn same(version: i64, sql: &'static str) -> Migration {
        Migration {
            version,
            sql,
            postgres: None,
        }
    }

    fn sql(&self, backend: Backend) -> &'static str {
        match (backend, self.postgres) {
            (Backend::Postgres, Some(sql)) => sql,
            _ => self.sql,
        }
    }
}

const MIGRATIONS: &[Migration] = &[
    Migration::same(
        1,
        r#"
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    job_group TEXT NOT NULL,
    job_name TEXT NOT NULL,
    app_name TEXT NOT NULL,
    path TEXT,
    job_type TEXT,
    trigger_kind TEXT,
    scheduled_at BIGINT,
    dispatched_at BIGINT,
    misfired BIGINT NOT NULL DEFAULT 0,
    revision BIGINT,
    args TEXT,
    node TEXT,
    shard_total BIGINT NOT NULL DEFAULT 1,
    status TEXT NOT NULL DEFAULT 'PENDING',
    shards_succeeded BIGINT NOT NULL DEFAULT 0,
    shards_failed BIGINT NOT NULL DEFAULT 0,
    attempts BIGINT NOT NULL DEFAULT 0,
    started_at BIGINT,
    finished_at BIGINT,
    output TEXT,
    error TEXT
);
CREATE INDEX runs_by_job ON runs (job_group, job_name, scheduled_at);
CREATE INDEX runs_by_time ON runs (scheduled_at);
CREATE INDEX runs_by_status ON runs (status, scheduled_at);
CREATE TABLE attempts (
    run_id TEXT NOT NULL,
    shard BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    worker TEXT,
    started_at BIGINT,
    finished_at BIGINT,
    outcome TEXT,
    will_retry BIGINT NOT NULL DEFAULT 0,
    output TEXT,
    error TEXT,
    duration_ms BIGINT,
    PRIMARY KEY (run_id, shard, attempt)
);
CREATE TABLE logs (
    run_id TEXT NOT NULL,
    shard BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    level TEXT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (run_id, shard, attempt, seq)
);
CREATE TABLE recorder_cursor (
    id BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL
);
INSERT INTO recorder_cursor (id, seq) VALUES (1, 0);
"#,
    ),
    Migration::same(
        2,
        r#"
ALTER TABLE attempts ADD COLUMN retry_in_ms BIGINT;
CREATE INDEX runs_by_status_job ON runs (job_group, job_name, status)
"#,
    ),
    Migration::same(
        3,
        r#"
ALTER TABLE runs ADD COLUMN parent_run_id TEXT
"#,
    ),
    Migration::same(
        4,
        r#"
ALTER TABLE runs ADD COLUMN epoch BIGINT
"#,
    ),
    // Run ids order `runs.list` (and its keyset paging): compare them bytewise on Postgres too,
    // as SQLite does, whatever the database's default collation.
    Migration {
        version: 5,
        sql: "",
        postgres: Some(r#"ALTER TABLE runs ALTER COLUMN run_id TYPE TEXT COLLATE "C""#),
    },
    // `runs.list --app`.
    Migration::same(
        6,
        r#"
CREATE INDEX runs_by_app ON runs (app_name, scheduled_at)
"#,
    ),
    // Ten million runs (BENCHMARKS.md, run queries): `runs.counts` (the console's last hour)
    // reads its time range of `runs_by_time_status` alone (it replaces `runs_by_time`), and
    // `runs.list --job … --status …` one range of `runs_by_job_status` in order (it replaces
    // `runs_by_status_job`, which had no `scheduled_at`: Postgres sorted the job's runs in
    // that status, 31 ms for 100 of them).
    Migration::same(
        7,
        r#"
CREATE INDEX runs_by_time_status ON runs (scheduled_at, status);
DROP INDEX runs_by_time;
CREATE INDEX runs_by_job_status ON runs (job_group, job_name, status, scheduled_at);
DROP INDEX runs_by_status_job
"#,
    ),
    // A run's attempts summed up (`fold::Tally`, JSON), so that a batch updates a run's summary
    // from the attempts it changed alone. NULL: sum them up from all attempts once.
    Migration::same(
        8,
        r#"
ALTER TABLE runs ADD COLUMN tally TEXT
"#,
    ),
];

/// Which runs `runs.list` wants.
#[derive(Debug, Clone, Default)]
pub struct RunFilter<'a> {
    /// The job: its name, and its group when known.
    pub job: Option<(&'a str, Option<&'a str>)>,
    /// The app.
    pub app: Option<&'a str>,
    /// The status.
    pub status: Option<RunStatus>,
    /// Scheduled at or after (ms).
    pub since_ms: Option<i64>,
    /// Scheduled before (ms).
    pub until_ms: Option<i64>,
}

/// Rows per multi-row INSERT (well under every backend's bind-parameter limit).
const ROWS_PER_INSERT: usize = 400;

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(|m| Utc.timestamp_millis_opt(m).single())
}

fn u32_of(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// A value bound into a query.
#[derive(Debug, Clone)]
enum Val {
    I(Option<i64>),
    S(Option<String>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::I(Some(v))
    }
}
impl From<Option<i64>> for Val {
    fn from(v: Option<i64>) -> Self {
        Val::I(v)
    }
}
impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::S(Some(v))
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::S(Some(v.to_string()))
    }
}
impl From<Option<String>> for Val {
    fn from(v: Option<String>) -> Self {
        Val::S(v)
    }
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    vals: Vec<Val>,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    for v in vals {
        q = match v {
            Val::I(i) => q.bind(i),
            Val::S(s) => q.bind(s),
        };
    }
    q
}

/// A statement generated for a batch — multi-row `VALUES`, `IN` lists: its text changes with
/// the number of rows — with its values bound. It is not kept in the connection's statement
/// cache, which holds up to 100 prepared statements per connection: under load a recorder
/// writing batches of ever-different sizes filled it with statements of thousands of
/// parameters, each one to two MiB of SQLite memory (a leader recording 1,700 runs a second
/// held ~28 MiB of them after a minute, and growing). Statements of fixed text stay cached.
fn batch_query<'q>(
    sql: &'q str,
    vals: Vec<Val>,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    bind_all(sqlx::query(sql).persistent(false), vals)
}

/// One bind parameter of a generated statement: `?` on SQLite (bound by position; its driver
/// looks `$n` up by name on every bind), `$n` on Postgres.
fn param(backend: Backend, s: &mut String, n: usize) {
    match backend {
        Backend::Sqlite => s.push('?'),
        Backend::Postgres => {
            s.push('$');
            s.push_str(&n.to_string());
        }
    }
}

/// `($1,$2,$3),($4,$5,$6)` (Postgres) or `(?,?,?),(?,?,?)` (SQLite) for `rows` rows of `cols`
/// columns.
fn placeholders(backend: Backend, rows: usize, cols: usize) -> String {
    let mut s = String::with_capacity(rows * cols * 5);
    let mut n = 1;
    for r in 0..rows {
        if r > 0 {
            s.push(',');
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push(',');
            }
            param(backend, &mut s, n);
            n += 1;
        }
        s.push(')');
    }
    s
}

/// `$1,$2,$3` or `?,?,?`.
fn list_placeholders(backend: Backend, n: usize) -> String {
    let mut s = String::with_capacity(n * 4);
    for i in 1..=n {
        if i > 1 {
            s.push(',');
        }
        param(backend, &mut s, i);
    }
    s
}

/// `(run, shard, attempt, seq)` of a log line.
type LogKey = (String, i64, i64, i64);

#[derive(Debug, Default, Clone)]
struct RunRow {
    job_group: String,
    job_name: String,
    app_name: String,
    path: Option<String>,
    job_type: Option<String>,
    trigger: Option<String>,
    scheduled_at: Option<i64>,
    dispatched_at: Option<i64>,
    misfired: Option<i64>,
    revision: Option<i64>,
    args: Option<String>,
    node: Option<String>,
    shard_total: i64,
    /// Set by a `skipped` event: (reason, when).
    skipped: Option<(String, i64)>,
    parent_run_id: Option<String>,
    epoch: Option<i64>,
}

impl RunRow {
    /// Whether upserting this row would leave `prior` as it is: it holds what attempt events
    /// tell of a run (no `dispatched` or `skipped` in the batch), and the run exists with the
    /// same shard total and a scheduled time. Such rows are not upserted: the upsert sets
    /// `scheduled_at`, so SQLite would rewrite the row and every index holding that column
    /// (five of them) for each ended attempt, only to store the same values again.
    fn changes_nothing_in(&self, prior: &Prior) -> bool {
        self.path.is_none()
            && self.job_type.is_none()
            && self.trigger.is_none()
            && self.dispatched_at.is_none()
            && self.misfired.is_none()
            && self.revision.is_none()
            && self.args.is_none()
            && self.node.is_none()
            && self.skipped.is_none()
            && self.parent_run_id.is_none()
            && self.epoch.is_none()
            && self.shard_total == prior.shard_total
            && (self.scheduled_at.is_none() || prior.scheduled_at.is_some())
    }
}

#[derive(Debug, Default, Clone)]
struct AttemptRow {
    worker: Option<String>,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    outcome: Option<String>,
    will_retry: i64,
    retry_in_ms: Option<i64>,
    output: Option<String>,
    error: Option<String>,
    duration_ms: Option<i64>,
}

impl AttemptRow {
    /// The row as [`fold`] reads it: what [`attempt_of`] makes of the stored row, for a row
    /// inserted as is (an attempt of a run new to the database).
    fn folded(&self, shard: i64, attempt: i64) -> fold::Attempt {
        fold::Attempt {
            shard,
            attempt,
            started_at: self.started_at,
            finished_at: self.finished_at,
            outcome: self.outcome.as_deref().and_then(parse_outcome),
            will_retry: self.will_retry != 0,
            output: self.output.clone(),
            error: self.error.clone(),
        }
    }
}

fn outcome_str(o: AttemptOutcome) -> &'static str {
    match o {
        AttemptOutcome::Succeeded => "SUCCEEDED",
        AttemptOutcome::Failed => "FAILED",
        AttemptOutcome::TimedOut => "TIMED_OUT",
        AttemptOutcome::Cancelled => "CANCELLED",
    }
}

fn parse_outcome(s: &str) -> Option<AttemptOutcome> {
    [
        AttemptOutcome::Succeeded,
        AttemptOutcome::Failed,
        AttemptOutcome::TimedOut,
        AttemptOutcome::Cancelled,
    ]
    .into_iter()
    .find(|o| outcome_str(*o) == s)
}

fn enum_str<T: serde::Serialize>(v: &T) -> Option<String> {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
}

fn parse_enum<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

impl Store {
    /// Opens the database at `url` (a SQLite file is created if missing) and applies pending
    /// migrations. Any failure is an [`StoreError::Open`] naming the URL (password redacted),
    /// what failed and what to check.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, normalized) = normalize_url(url)?;
        let failed = |cause: sqlx::Error| StoreError::Open {
            url: redact_db_url(url),
            hint: open_hint(backend, &cause),
            cause,
        };
        let pool = match backend {
            Backend::Sqlite => sqlite_pool(&normalized).await.map_err(failed)?,
            Backend::Postgres => {
                // One connection first: the pool would retry a refused connection until its
                // acquire timeout and then only say it timed out.
                let probe = sqlx::AnyConnection::connect(&normalized)
                    .await
                    .map_err(failed)?;
                let _ = probe.close().await;
                AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(&normalized)
                    .await
                    .map_err(failed)?
            }
        };
        let store = Store { pool, backend };
        store.migrate().await.map_err(|e| match e {
            StoreError::Db(cause) => StoreError::Open {
                url: redact_db_url(url),
                cause,
                hint: "the database refused Krest's schema migration: check that this user may create and alter tables",
            },
            e => e,
        })?;
        Ok(store)
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies pending migrations in one transaction. On Postgres the transaction first takes
    /// an advisory lock, so nodes starting together on one database migrate it once.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock(4733284)) AS l")
                .fetch_one(&mut *tx)
                .await?;
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS krest_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let applied: HashSet<i64> = sqlx::query("SELECT version FROM krest_migrations")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()?;
        for m in MIGRATIONS {
            if applied.contains(&m.version) {
                continue;
            }
            for stmt in m
                .sql(self.backend)
                .split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                sqlx::query(stmt).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO krest_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(m.version)
                .bind(ms(Utc::now()))
                .execute(&mut *tx)
                .await?;
            tracing::info!(version = m.version, "applying database migration");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Stream sequence of the last event applied.
    pub async fn cursor(&self) -> Result<u64, StoreError> {
        let seq: i64 = sqlx::query("SELECT seq FROM recorder_cursor WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    /// Locks the cursor row for the transaction and returns it: `SELECT … FOR UPDATE` on
    /// Postgres; on SQLite a no-op write first takes the database's write lock.
    async fn lock_cursor(&self, tx: &mut sqlx::Transaction<'_, Any>) -> Result<u64, StoreError> {
        let sql = match self.backend {
            Backend::Postgres => "SELECT seq FROM recorder_cursor WHERE id = 1 FOR UPDATE",
            Backend::Sqlite => {
                sqlx::query("UPDATE recorder_cursor SET seq = seq WHERE id = 1")
                    .execute(&mut **tx)
                    .await?;
                "SELECT seq FROM recorder_cursor WHERE id = 1"
            }
        };
        let seq: i64 = sqlx::query(sql).fetch_one(&mut **tx).await?.try_get(0)?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    /// Applies a batch of events `(stream sequence, event)`, in stream order, in one transaction,
    /// and moves the cursor to `last_seq`. The cursor row is locked first and events at or below
    /// it are skipped (another node sharing the database recorded them), and the cursor never
    /// moves back. Returns the runs this batch brought to a final status (for follow-ups such as
    /// child jobs and alerts; a replayed batch has none) and the cursor.
    pub async fn apply(
        &self,
        events: &[(u64, RunEvent)],
        last_seq: u64,
    ) -> Result<Applied, StoreError> {
        let mut tx = self.pool.begin().await?;
        let stored = self.lock_cursor(&mut tx).await?;
        if last_seq <= stored && events.iter().all(|(seq, _)| *seq <= stored) {
            // Everything here is recorded already.
            tx.commit().await?;
            return Ok(Applied {
                ended: Vec::new(),
                cursor: stored,
            });
        }
        let events = events
            .iter()
            .filter(|(seq, _)| *seq > stored)
            .map(|(_, e)| e);
        let mut runs: BTreeMap<String, RunRow> = BTreeMap::new();
        let mut attempts: BTreeMap<(String, i64, i64), AttemptRow> = BTreeMap::new();
        let mut logs: BTreeMap<LogKey, (i64, String, String)> = BTreeMap::new();
        for event in events {
            match event {
                RunEvent::Dispatched(d) => {
                    let r = runs.entry(d.run.run_id.clone()).or_default();
                    r.job_group = d.run.job_group.clone();
                    r.job_name = d.run.job_name.clone();
                    r.app_name = d.run.app_name.clone();
                    r.path = Some(d.path.clone());
                    r.job_type = enum_str(&d.job_type);
                    r.trigger = Some(d.trigger.as_str().to_string());
                    r.scheduled_at = Some(ms(d.scheduled_at));
                    r.dispatched_at = Some(ms(d.dispatched_at));
                    r.misfired = Some(i64::from(d.misfired));
                    r.revision = i64::try_from(d.revision).ok();
                    r.args = Some(d.args.to_string());
                    r.node = Some(d.node.clone());
                    r.shard_total = i64::from(d.shard_total);
                    r.parent_run_id = d.parent_run_id.clone();
                    r.epoch = d.epoch.and_then(|e| i64::try_from(e).ok());
                }
                RunEvent::Skipped(k) => {
                    let r = runs.entry(k.run.run_id.clone()).or_default();
                    r.job_group = k.run.job_group.clone();
                    r.job_name = k.run.job_name.clone();
                    r.app_name = k.run.app_name.clone();
                    r.trigger = Some(k.trigger.as_str().to_string());
                    r.scheduled_at = Some(ms(k.scheduled_at));
                    r.misfired = Some(i64::from(k.misfired));
                    r.revision = i64::try_from(k.revision).ok();
                    r.node = Some(k.node.clone());
                    r.shard_total = 0;
                    r.epoch = k.epoch.and_then(|e| i64::try_from(e).ok());
                    r.skipped = Some((k.reason.clone(), ms(k.at)));
                }
                RunEvent::Started(s) => {
                    let r = runs.entry(s.run.run_id.clone()).or_default();
                    r.job_group = s.run.job_group.clone();
                    r.job_name = s.run.job_name.clone();
                    r.app_name = s.run.app_name.clone();
                    r.shard_total = i64::from(s.shard_total);
                    r.scheduled_at = r.scheduled_at.or(s.scheduled_at.map(ms));
                    let a = attempts
                        .entry((
                            s.run.run_id.clone(),
                            i64::from(s.shard),
                            i64::from(s.attempt),
                        ))
                        .or_default();
                    a.worker = Some(s.worker.clone());
                    a.started_at = Some(ms(s.at));
                }
                RunEvent::Log(l) => {
                    logs.insert(
                        (
                            l.run.run_id.clone(),
                            i64::from(l.shard),
                            i64::from(l.attempt),
                            i64::from(l.seq),
                        ),
                        (ms(l.at), l.level.as_str().to_string(), l.line.clone()),
                    );
                }
                RunEvent::Finished(f) => {
                    let r = runs.entry(f.run.run_id.clone()).or_default();
                    r.job_group = f.run.job_group.clone();
                    r.job_name = f.run.job_name.clone();
                    r.app_name = f.run.app_name.clone();
                    r.shard_total = i64::from(f.shard_total);
                    let a = attempts
                        .entry((
                            f.run.run_id.clone(),
                            i64::from(f.shard),
                            i64::from(f.attempt),
                        ))
                        .or_default();
                    a.worker = Some(f.worker.clone());
                    // An attempt that sent no `started` event carries its start here.
                    if let Some(at) = f.started_at {
                        a.started_at = a.started_at.or(Some(ms(at)));
                    }
                    r.scheduled_at = r.scheduled_at.or(f.scheduled_at.map(ms));
                    a.finished_at = Some(ms(f.at));
                    a.outcome = Some(outcome_str(f.outcome).to_string());
                    a.will_retry = i64::from(f.will_retry);
                    a.retry_in_ms = f.retry_in_ms.and_then(|v| i64::try_from(v).ok());
                    a.output = f.output.clone();
                    a.error = f.error.clone();
                    a.duration_ms = i64::try_from(f.duration_ms).ok();
                }
            }
        }
        // Every attempt event also names its run, so `runs` holds every run the batch touches.
        // Those runs as they were before it (read before the upsert, which creates new ones):
        // their tallies say which attempt rows, if any, must be read (see `Before`).
        let mut priors: HashMap<String, Prior> = HashMap::with_capacity(runs.len());
        let ids: Vec<&str> = runs.keys().map(String::as_str).collect();
        for chunk in ids.chunks(ROWS_PER_INSERT) {
            prior_runs(self.backend, &mut tx, chunk, &mut priors).await?;
        }

        let run_rows: Vec<(String, RunRow)> = runs.into_iter().collect();
        let attempt_rows: Vec<((String, i64, i64), AttemptRow)> = attempts.into_iter().collect();
        // What each run held before the batch in the shards it touches: known from the tally
        // for most runs; read for the others (see `before_of`).
        let mut touched: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
        for ((run, shard, attempt), _) in &attempt_rows {
            touched
                .entry(run.as_str())
                .or_default()
                .push((*shard, *attempt));
        }
        let mut befores: HashMap<&str, Before> = HashMap::with_capacity(run_rows.len());
        let mut read: Vec<(String, i64)> = Vec::new();
        for (id, r) in &run_rows {
            let touched = touched.get(id.as_str()).map_or(&[][..], Vec::as_slice);
            let b = before_of(priors.get(id), r.shard_total, touched);
            if matches!(b, Before::Read) {
                // In (shard, attempt) order: each shard once.
                let mut shards: Vec<i64> = touched.iter().map(|&(shard, _)| shard).collect();
                shards.dedup();
                read.extend(shards.into_iter().map(|shard| (id.clone(), shard)));
            }
            befores.insert(id.as_str(), b);
        }
        let before = shard_attempts(self.backend, &mut tx, &read).await?;
        // An attempt ending again (a redelivered or conflicting end) can move its run's summary
        // back: such runs are summed up from all their attempts.
        for ((run, shard, attempt), a) in &attempt_rows {
            if a.finished_at.is_some()
                && before.get(&(run.clone(), *shard)).is_some_and(|rows| {
                    rows.iter().any(|r| {
                        r.attempt == *attempt && (r.finished_at.is_some() || r.outcome.is_some())
                    })
                })
            {
                befores.insert(run.as_str(), Before::Refold);
            }
        }
        // The attempt rows as the upsert left them (its COALESCE rules applied by the
        // database, not repeated here), keyed by `(run, shard)`, in attempt order. Written
        // before the runs: a new run's summary is then known when it is inserted. A new run
        // has no attempt rows yet (they are written with their run, and pruned with it), so
        // its rows are the batch's own, and are not read back.
        let mut merged: ShardAttempts = HashMap::new();
        let (new_attempts, old_attempts): (Vec<_>, Vec<_>) = attempt_rows
            .iter()
            .partition(|((run, _, _), _)| !priors.contains_key(run));
        for (rows, returning) in [(&new_attempts, false), (&old_attempts, true)] {
            for chunk in rows.chunks(ROWS_PER_INSERT) {
                let sql = format!(
                    "INSERT INTO attempts (run_id, shard, attempt, worker, started_at, finished_at, outcome, will_retry, output, error, duration_ms, retry_in_ms) VALUES {} \
                     ON CONFLICT (run_id, shard, attempt) DO UPDATE SET \
                     worker = COALESCE(excluded.worker, attempts.worker), \
                     started_at = COALESCE(attempts.started_at, excluded.started_at), \
                     finished_at = COALESCE(excluded.finished_at, attempts.finished_at), \
                     outcome = COALESCE(excluded.outcome, attempts.outcome), \
                     will_retry = CASE WHEN excluded.finished_at IS NOT NULL THEN excluded.will_retry ELSE attempts.will_retry END, \
                     output = COALESCE(excluded.output, attempts.output), \
                     error = COALESCE(excluded.error, attempts.error), \
                     duration_ms = COALESCE(excluded.duration_ms, attempts.duration_ms), \
                     retry_in_ms = COALESCE(excluded.retry_in_ms, attempts.retry_in_ms){}",
                    placeholders(self.backend, chunk.len(), 12),
                    if returning {
                        format!(" RETURNING {ATTEMPT_FOLD_COLUMNS}")
                    } else {
                        String::new()
                    }
                );
                let mut vals = Vec::with_capacity(chunk.len() * 12);
                for ((run, shard, attempt), a) in chunk {
                    vals.extend([
                        Val::from(run.clone()),
                        (*shard).into(),
                        (*attempt).into(),
                        a.worker.clone().into(),
                        a.started_at.into(),
                        a.finished_at.into(),
                        a.outcome.clone().into(),
                        a.will_retry.into(),
                        a.output.clone().into(),
                        a.error.clone().into(),
                        a.duration_ms.into(),
                        a.retry_in_ms.into(),
                    ]);
                }
                let q = batch_query(&sql, vals);
                if !returning {
                    q.execute(&mut *tx).await?;
                    for ((run, shard, attempt), a) in chunk {
                        merged
                            .entry((run.clone(), *shard))
                            .or_default()
                            .push(a.folded(*shard, *attempt));
                    }
                    continue;
                }
                for r in q.fetch_all(&mut *tx).await? {
                    let a = attempt_of(&r)?;
                    merged
                        .entry((r.try_get("run_id")?, a.shard))
                        .or_default()
                        .push(a);
                }
            }
        }
        for rows in merged.values_mut() {
            rows.sort_by_key(|a| a.attempt);
        }
        let changes = Changes {
            priors: &priors,
            befores: &befores,
            before: &before,
            merged: &merged,
            touched: &touched,
        };
        let mut tallies = tallies(self.backend, &mut tx, &run_rows, &changes).await?;

        // New runs are inserted with their summary (a run's `dispatched` and `finished` in one
        // batch make one row write); runs that exist are upserted when the batch changes them,
        // and their summaries updated below. No other node inserts a run while this
        // transaction holds the cursor, so a run not read above is new.
        let (new_runs, old_runs): (Vec<_>, Vec<_>) = run_rows
            .iter()
            .partition(|(id, _)| !priors.contains_key(id) && tallies.contains_key(id.as_str()));
        let mut ended: Vec<String> = Vec::new();
        let mut ended_new: Vec<RunSummary> = Vec::new();
        for chunk in new_runs.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO runs (run_id, job_group, job_name, app_name, path, job_type, trigger_kind, scheduled_at, dispatched_at, misfired, revision, args, node, shard_total, parent_run_id, epoch, \
                 status, shards_succeeded, shards_failed, attempts, started_at, finished_at, output, error, tally) VALUES {} \
                 ON CONFLICT (run_id) DO UPDATE SET {RUN_UPSERT_SET}",
                placeholders(self.backend, chunk.len(), 16 + SUMMARY_COLUMNS)
            );
            let mut vals = Vec::with_capacity(chunk.len() * (16 + SUMMARY_COLUMNS));
            for (id, r) in chunk {
                vals.extend(run_vals(id, r));
                let Some(tally) = tallies.remove(id.as_str()) else {
                    return Err(StoreError::Corrupt(format!("no summary for new run {id}")));
                };
                let (folded, summary) = summary_vals(&tally, r.shard_total)?;
                vals.extend(summary);
                if folded.status.is_final() {
                    ended_new.push(new_run_summary(id, r, folded));
                }
            }
            batch_query(&sql, vals).execute(&mut *tx).await?;
        }
        let upserts: Vec<&(String, RunRow)> = old_runs
            .iter()
            .copied()
            .filter(|(id, r)| !priors.get(id).is_some_and(|p| r.changes_nothing_in(p)))
            .collect();
        for chunk in upserts.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO runs (run_id, job_group, job_name, app_name, path, job_type, trigger_kind, scheduled_at, dispatched_at, misfired, revision, args, node, shard_total, parent_run_id, epoch) VALUES {} \
                 ON CONFLICT (run_id) DO UPDATE SET {RUN_UPSERT_SET}",
                placeholders(self.backend, chunk.len(), 16)
            );
            let mut vals = Vec::with_capacity(chunk.len() * 16);
            for (id, r) in chunk {
                vals.extend(run_vals(id, r));
            }
            batch_query(&sql, vals).execute(&mut *tx).await?;
        }
        for (id, r) in &old_runs {
            if let Some((reason, at)) = &r.skipped {
                let updated = sqlx::query(
                    "UPDATE runs SET status = 'SKIPPED', error = $1, finished_at = $2 WHERE run_id = $3 AND status <> 'SKIPPED'",
                )
                .bind(reason.as_str())
                .bind(*at)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
                if updated.rows_affected() > 0 {
                    ended.push(id.clone());
                }
            }
        }
        let log_rows: Vec<_> = logs.into_iter().collect();
        for chunk in log_rows.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO logs (run_id, shard, attempt, seq, at, level, line) VALUES {} ON CONFLICT DO NOTHING",
                placeholders(self.backend, chunk.len(), 7)
            );
            let mut vals = Vec::with_capacity(chunk.len() * 7);
            for ((run, shard, attempt, seq), (at, level, line)) in chunk {
                vals.extend([
                    Val::from(run.clone()),
                    (*shard).into(),
                    (*attempt).into(),
                    (*seq).into(),
                    (*at).into(),
                    level.clone().into(),
                    line.clone().into(),
                ]);
            }
            batch_query(&sql, vals).execute(&mut *tx).await?;
        }
        // (Runs without a tally — skipped ones — are passed over by `update_summaries`.)
        for chunk in old_runs.chunks(ROWS_PER_INSERT) {
            ended.extend(update_summaries(self.backend, &mut tx, chunk, &tallies, &priors).await?);
        }
        let mut summaries = ended_new;
        summaries.reserve(ended.len());
        for chunk in ended.chunks(ROWS_PER_INSERT) {
            let vals: Vec<Val> = chunk.iter().map(|s| Val::from(s.clone())).collect();
            let sql = format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE run_id IN ({})",
                list_placeholders(self.backend, chunk.len())
            );
            for row in batch_query(&sql, vals).fetch_all(&mut *tx).await? {
                summaries.push(run_summary(&row)?);
            }
        }
        // Behind the stored cursor when the batch's events pass events held back for later
        // (the recorder's `hold_dispatched`): the cursor never moves back.
        let cursor = last_seq.max(stored);
        sqlx::query("UPDATE recorder_cursor SET seq = $1 WHERE id = 1")
            .bind(i64::try_from(cursor).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Applied {
            ended: summaries,
            cursor,
        })
    }

    /// Runs matching the filter, newest first (by scheduled time, then run id), starting at
    /// `start` (`(scheduled ms, run id)` of the first run wanted, inclusive) if given. Runs
    /// without a scheduled time come last, by run id.
    ///
    /// Two index-ordered queries rather than one `ORDER BY scheduled_at DESC NULLS LAST`: the
    /// runs with a scheduled time (a range of an index ending in `scheduled_at`, read
    /// backwards), then, when the page is not full, those without one (`scheduled_at IS NULL`,
    /// a range of the same index). Postgres cannot read an ascending index backwards in `NULLS
    /// LAST` order and sorted every matching run instead, and an `OR … IS NULL` in the cursor's
    /// condition made both backends scan (BENCHMARKS.md, run queries).
    pub async fn list_runs(
        &self,
        filter: &RunFilter<'_>,
        limit: u32,
        start: Option<(Option<i64>, String)>,
    ) -> Result<Vec<RunSummary>, StoreError> {
        let mut runs = Vec::new();
        if let Some((sql, vals)) =
            runs_statement(filter, RunsPart::Scheduled, start.as_ref(), limit)
        {
            let rows = bind_all(sqlx::query(&sql), vals)
                .fetch_all(&self.pool)
                .await?;
            runs = rows.iter().map(run_summary).collect::<Result<_, _>>()?;
        }
        let left = limit.saturating_sub(u32::try_from(runs.len()).unwrap_or(u32::MAX));
        if left == 0 {
            return Ok(runs);
        }
        if let Some((sql, vals)) =
            runs_statement(filter, RunsPart::Unscheduled, start.as_ref(), left)
        {
            let rows = bind_all(sqlx::query(&sql), vals)
                .fetch_all(&self.pool)
                .await?;
            for r in &rows {
                runs.push(run_summary(r)?);
            }
        }
        Ok(runs)
    }

    /// The plans the database makes for the statements of a query (`EXPLAIN QUERY PLAN` on
    /// SQLite, `EXPLAIN` on Postgres), one line per plan line, for benchmarks and diagnosis.
    pub async fn explain(&self, query: &Explain<'_>) -> Result<Vec<String>, StoreError> {
        let statements: Vec<(String, Vec<Val>)> = match query {
            Explain::ListRuns {
                filter,
                limit,
                start,
            } => [RunsPart::Scheduled, RunsPart::Unscheduled]
                .into_iter()
                .filter_map(|part| runs_statement(filter, part, start.as_ref(), *limit))
                .collect(),
            Explain::JobRunsEnded {
                group,
                name,
                recent,
            } => [SCHEDULED, UNSCHEDULED]
                .into_iter()
                .map(|scheduled| {
                    (
                        job_ended_sql(scheduled),
                        vec![
                            Val::from(*group),
                            Val::from(*name),
                            Val::from(i64::from(*recent)),
                        ],
                    )
                })
                .collect(),
            Explain::RunCounts { since_ms } => {
                vec![(run_counts_sql(), vec![Val::from(*since_ms)])]
            }
        };
        let mut out = Vec::new();
        for (sql, vals) in statements {
            out.push(format!("-- {sql}"));
            let prefix = match self.backend {
                Backend::Sqlite => "EXPLAIN QUERY PLAN ",
                Backend::Postgres => "EXPLAIN ",
            };
            let rows = bind_all(sqlx::query(&format!("{prefix}{sql}")), vals)
                .fetch_all(&self.pool)
                .await?;
            for r in &rows {
                out.push(match self.backend {
                    Backend::Sqlite => r.try_get::<String, _>(3)?,
                    Backend::Postgres => r.try_get::<String, _>(0)?,
                });
            }
        }
        Ok(out)
    }

    /// A job's newest run, and the status and duration (ms, `None` if it never started) of
    /// its newest `recent` ended runs (uses the `runs_by_job` index, read backwards; runs
    /// without a scheduled time come last, as in [`Store::list_runs`]).
    pub async fn job_runs_ended(
        &self,
        group: &str,
        name: &str,
        recent: u32,
    ) -> Result<(Option<RunSummary>, Vec<(RunStatus, Option<i64>)>), StoreError> {
        let filter = RunFilter {
            job: Some((name, Some(group))),
            ..RunFilter::default()
        };
        let last = self.list_runs(&filter, 1, None).await?.pop();
        let mut rows = Vec::new();
        for scheduled in [SCHEDULED, UNSCHEDULED] {
            let left = i64::from(recent) - i64::try_from(rows.len()).unwrap_or(i64::MAX);
            if left <= 0 {
                break;
            }
            rows.extend(
                sqlx::query(&job_ended_sql(scheduled))
                    .bind(group)
                    .bind(name)
                    .bind(left)
                    .fetch_all(&self.pool)
                    .await?,
            );
        }
        let mut ended = Vec::with_capacity(rows.len());
        for r in &rows {
            let status: String = r.try_get("status")?;
            let status = RunStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown run status `{status}`")))?;
            let started: Option<i64> = r.try_get("started_at")?;
            let finished: Option<i64> = r.try_get("finished_at")?;
            ended.push((status, started.zip(finished).map(|(s, f)| f - s)));
        }
        Ok((last, ended))
    }

    /// Runs by status among those scheduled at or after `since_ms` (statuses with none left
    /// out). One count per status over a range of `runs_by_time_status` alone: with `GROUP BY
    /// status` instead, SQLite (without statistics) scanned all of `runs_by_status` for its
    /// order (0.5 s at 10 million runs).
    pub async fn run_counts_since(&self, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let row = sqlx::query(&run_counts_sql())
            .bind(since_ms)
            .fetch_one(&self.pool)
            .await?;
        let mut counts = Vec::new();
        for (i, status) in RunStatus::ALL.iter().enumerate() {
            // COUNT is never NULL; a NULL would be no runs.
            let n: Option<i64> = row.try_get(i)?;
            if let Some(n) = n.filter(|n| *n > 0) {
                counts.push((status.as_str().to_string(), n));
            }
        }
        Ok(counts)
    }

    /// One run's summary and args.
    pub async fn run_head(
        &self,
        run_id: &str,
    ) -> Result<Option<(RunSummary, Option<serde_json::Value>)>, StoreError> {
        let Some(row) = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS}, args FROM runs WHERE run_id = $1"
        ))
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let run = run_summary(&row)?;
        let args = row
            .try_get::<Option<String>, _>("args")?
            .and_then(|s| serde_json::from_str(&s).ok());
        Ok(Some((run, args)))
    }

    /// Up to `limit` attempts of a run from `(shard, attempt)` on (inclusive), by shard then
    /// attempt, without their log lines.
    pub async fn attempts_from(
        &self,
        run_id: &str,
        (shard, attempt): (u32, u32),
        limit: u32,
    ) -> Result<Vec<AttemptView>, StoreError> {
        let rows = sqlx::query(
            "SELECT shard, attempt, worker, started_at, finished_at, outcome, will_retry, retry_in_ms, output, error FROM attempts \
             WHERE run_id = $1 AND (shard, attempt) >= ($2, $3) ORDER BY shard, attempt LIMIT $4",
        )
        .bind(run_id)
        .bind(i64::from(shard))
        .bind(i64::from(attempt))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(attempt_view).collect()
    }

    /// Up to `limit` log lines of a run from `from` (inclusive) through attempt `until`
    /// (inclusive), by shard, attempt and seq: `(shard, attempt, line)`.
    pub async fn logs_between(
        &self,
        run_id: &str,
        from: RunStart,
        until: (u32, u32),
        limit: u32,
    ) -> Result<Vec<(u32, u32, LogView)>, StoreError> {
        let rows = sqlx::query(
            "SELECT shard, attempt, seq, at, level, line FROM logs WHERE run_id = $1 \
             AND (shard, attempt, seq) >= ($2, $3, $4) AND (shard, attempt) <= ($5, $6) \
             ORDER BY shard, attempt, seq LIMIT $7",
        )
        .bind(run_id)
        .bind(i64::from(from.shard))
        .bind(i64::from(from.attempt))
        .bind(i64::from(from.seq))
        .bind(i64::from(until.0))
        .bind(i64::from(until.1))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    u32_of(r.try_get("shard")?),
                    u32_of(r.try_get("attempt")?),
                    log_view(r)?,
                ))
            })
            .collect()
    }

    /// What of a run comes from `from` on: attempts after it (its own attempt counts when
    /// `from` starts it, at seq 0) and log lines from it.
    pub async fn left_from(&self, run_id: &str, from: RunStart) -> Result<(u64, u64), StoreError> {
        let attempt_min = if from.seq == 0 {
            i64::from(from.attempt)
        } else {
            i64::from(from.attempt) + 1
        };
        let attempts: i64 = sqlx::query(
            "SELECT COUNT(*) FROM attempts WHERE run_id = $1 AND (shard, attempt) >= ($2, $3)",
        )
        .bind(run_id)
        .bind(i64::from(from.shard))
        .bind(attempt_min)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        let logs: i64 = sqlx::query(
            "SELECT COUNT(*) FROM logs WHERE run_id = $1 AND (shard, attempt, seq) >= ($2, $3, $4)",
        )
        .bind(run_id)
        .bind(i64::from(from.shard))
        .bind(i64::from(from.attempt))
        .bind(i64::from(from.seq))
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        Ok((
            u64::try_from(attempts).unwrap_or(0),
            u64::try_from(logs).unwrap_or(0),
        ))
    }

    /// One run with all its attempts and log lines (for tests and small runs; the API pages
    /// with [`Store::attempts_from`] and [`Store::logs_between`]).
    pub async fn get_run(&self, run_id: &str) -> Result<Option<RunDetail>, StoreError> {
        let Some((run, args)) = self.run_head(run_id).await? else {
            return Ok(None);
        };
        let mut attempts = self.attempts_from(run_id, (0, 0), u32::MAX).await?;
        let start = RunStart {
            shard: 0,
            attempt: 0,
            seq: 0,
        };
        let mut lines = self
            .logs_between(run_id, start, (u32::MAX, u32::MAX), u32::MAX)
            .await?
            .into_iter()
            .peekable();
        for a in &mut attempts {
            while let Some((s, n, _)) = lines.peek() {
                if (*s, *n) < (a.shard, a.attempt) {
                    lines.next();
                } else if (*s, *n) == (a.shard, a.attempt) {
                    if let Some((_, _, l)) = lines.next() {
                        a.logs.push(l);
                    }
                } else {
                    break;
                }
            }
        }
        Ok(Some(RunDetail {
            run,
            args,
            attempts,
            attempts_left: 0,
            logs_left: 0,
        }))
    }

    /// Runs of a job that have not ended (pending or running), oldest first: `(run id, app)`.
    pub async fn active_runs(
        &self,
        group: &str,
        name: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT run_id, app_name FROM runs WHERE job_group = $1 AND job_name = $2 AND status IN ('PENDING', 'RUNNING') ORDER BY scheduled_at",
        )
        .bind(group)
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Deletes up to `batch` ended runs (with their attempts and log lines) of `rule`'s scope
    /// that it no longer keeps: ended before `ended_before` (epoch ms), or beyond the newest
    /// `keep_runs` runs of their job. One short transaction; returns how many runs it deleted
    /// (less than `batch`: nothing more to prune now). Runs that have not ended are always kept.
    pub async fn prune(&self, rule: &PruneRule<'_>, batch: u32) -> Result<u64, StoreError> {
        self.prune_from(rule, batch, &mut None).await
    }

    /// [`Store::prune`], job by job (in `(group, name)` order) from `from` (a job, inclusive;
    /// `None`: the first), which it leaves at the job the batch filled up with, so that the
    /// next batch of a backlog starts there instead of looking at the jobs before it again.
    ///
    /// What it costs (BENCHMARKS.md, retention): the jobs with runs are found by skipping
    /// through `runs_by_job` (one lookup per job). By age, a job's ended runs scheduled before
    /// the cutoff are ranges of `runs_by_job_status` (a run's end is never before its
    /// scheduled time, but for skewed clocks: such a run waits until both are before the
    /// cutoff); a first global look at `runs_by_time_status` skips all of that when nothing
    /// ended that early. By count, a job's `keep_runs + 1`-th newest scheduled time is read
    /// from `runs_by_job` (an index-only walk of at most `keep_runs` entries), and the ended
    /// runs older than it are ranges of `runs_by_job_status`. Runs without a scheduled time
    /// (rare: their start was recorded before their dispatch) rank last, as in `runs.list`.
    pub async fn prune_from(
        &self,
        rule: &PruneRule<'_>,
        batch: u32,
        from: &mut Option<(String, String)>,
    ) -> Result<u64, StoreError> {
        let want = batch.max(1) as usize;
        let mut ids: Vec<String> = Vec::new();
        // Age: anything old enough at all? (Usually not: then no job needs a look for it.)
        let mut by_age = rule.ended_before;
        if let (Some(before), PruneScope::Except(_)) = (by_age, rule.scope) {
            let old = sqlx::query(&format!(
                "SELECT run_id FROM runs WHERE {PRUNE_ENDED} AND scheduled_at < $1 LIMIT 1"
            ))
            .bind(before)
            .fetch_optional(&self.pool)
            .await?
            .is_some()
                || sqlx::query(&format!(
                    "SELECT run_id FROM runs WHERE scheduled_at IS NULL AND {PRUNE_ENDED} \
                     AND finished_at < $1 LIMIT 1"
                ))
                .bind(before)
                .fetch_optional(&self.pool)
                .await?
                .is_some();
            if !old {
                by_age = None;
            }
        }
        if by_age.is_none() && rule.keep_runs.is_none() {
            return Ok(0);
        }
        let mut at = from.take();
        let mut inclusive = true;
        loop {
            let job = match rule.scope {
                PruneScope::Job { group, name } => {
                    let job = (group.to_string(), name.to_string());
                    match &at {
                        Some(a) if (inclusive && *a > job) || (!inclusive && *a >= job) => None,
                        _ => Some(job),
                    }
                }
                PruneScope::Except(_) => self.next_job(at.as_ref(), inclusive).await?,
            };
            let Some(job) = job else { break };
            let excluded = match rule.scope {
                PruneScope::Except(jobs) => jobs.contains(&job),
                PruneScope::Job { .. } => false,
            };
            if !excluded {
                let found = self
                    .prunable(&job, by_age, rule.keep_runs, want - ids.len())
                    .await?;
                ids.extend(found);
                if ids.len() >= want {
                    ids.truncate(want);
                    *from = Some(job);
                    break;
                }
            }
            at = Some(job);
            inclusive = false;
        }
        self.delete_ended(&ids).await
    }

    /// Deletes those of `ids` that are still ended, with their attempts and log lines, in one
    /// transaction; returns how many runs it deleted. The runs go first, re-checked: a run
    /// that came back to life since it was chosen (a late event) keeps its row, its attempts
    /// and its log lines — only the attempts and lines of runs actually deleted go.
    async fn delete_ended(&self, ids: &[String]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let list = list_placeholders(self.backend, ids.len());
        let vals: Vec<Val> = ids.iter().map(|s| Val::from(s.as_str())).collect();
        let mut tx = self.pool.begin().await?;
        let gone: Vec<String> = batch_query(
            &format!(
                "DELETE FROM runs WHERE run_id IN ({list}) AND {PRUNE_ENDED} RETURNING run_id"
            ),
            vals,
        )
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<_, sqlx::Error>>()?;
        if !gone.is_empty() {
            let list = list_placeholders(self.backend, gone.len());
            let vals: Vec<Val> = gone.iter().map(|s| Val::from(s.as_str())).collect();
            for table in ["logs", "attempts"] {
                batch_query(
                    &format!("DELETE FROM {table} WHERE run_id IN ({list})"),
                    vals.clone(),
                )
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(gone.len() as u64)
    }

    /// The first job with runs at or after (`inclusive`) or after `at`, in `(group, name)`
    /// order: one lookup in `runs_by_job`.
    async fn next_job(
        &self,
        at: Option<&(String, String)>,
        inclusive: bool,
    ) -> Result<Option<(String, String)>, StoreError> {
        let row = match at {
            None => {
                sqlx::query(
                    "SELECT job_group, job_name FROM runs ORDER BY job_group, job_name LIMIT 1",
                )
                .fetch_optional(&self.pool)
                .await?
            }
            Some((group, name)) => {
                let op = if inclusive { ">=" } else { ">" };
                sqlx::query(&format!(
                    "SELECT job_group, job_name FROM runs WHERE (job_group, job_name) {op} ($1, $2) \
                     ORDER BY job_group, job_name LIMIT 1"
                ))
                .bind(group.as_str())
                .bind(name.as_str())
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
            .map_err(|e: sqlx::Error| e.into())
    }

    /// Up to `limit` distinct ended runs of `job` that are not kept: ended before `before`,
    /// or beyond its newest `keep` runs (newest first by scheduled time, then run id;
    /// unscheduled runs last).
    async fn prunable(
        &self,
        (group, name): &(String, String),
        before: Option<i64>,
        keep: Option<u32>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        const JOB: &str = "job_group = $1 AND job_name = $2";
        let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut ids: Vec<String> = Vec::new();
        let ids_of = |rows: Vec<AnyRow>| -> Result<Vec<String>, sqlx::Error> {
            rows.iter().map(|r| r.try_get::<String, _>(0)).collect()
        };
        // Each query asks for what is still missing plus what the earlier ones found (which
        // it may find again).
        let more = |ids: &Vec<String>| limit_i.saturating_add(ids.len() as i64);
        let add = |ids: &mut Vec<String>, found: Vec<String>| {
            for id in found {
                if ids.len() < limit && !ids.contains(&id) {
                    ids.push(id);
                }
            }
        };
        if let Some(before) = before {
            for sql in [
                format!(
                    "SELECT run_id FROM runs WHERE {JOB} AND {PRUNE_ENDED} AND scheduled_at < $3 \
                     AND COALESCE(finished_at, scheduled_at) < $3 LIMIT $4"
                ),
                format!(
                    "SELECT run_id FROM runs WHERE {JOB} AND scheduled_at IS NULL AND {PRUNE_ENDED} \
                     AND finished_at < $3 LIMIT $4"
                ),
            ] {
                if ids.len() >= limit {
                    break;
                }
                let rows = sqlx::query(&sql)
                    .bind(group.as_str())
                    .bind(name.as_str())
                    .bind(before)
                    .bind(more(&ids))
                    .fetch_all(&self.pool)
                    .await?;
                add(&mut ids, ids_of(rows)?);
            }
        }
        let Some(keep) = keep else { return Ok(ids) };
        if ids.len() >= limit {
            return Ok(ids);
        }
        let keep = i64::from(keep);
        // The newest scheduled time beyond the newest `keep`.
        let boundary: Option<i64> = sqlx::query(&format!(
            "SELECT scheduled_at FROM runs WHERE {JOB} AND scheduled_at IS NOT NULL \
             ORDER BY scheduled_at DESC LIMIT 1 OFFSET $3"
        ))
        .bind(group.as_str())
        .bind(name.as_str())
        .bind(keep)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
        let count = |cond: &'static str, at: Option<i64>| {
            let q = format!("SELECT COUNT(*) FROM runs WHERE {JOB} AND {cond}");
            async move {
                let mut q = sqlx::query(&q).bind(group.as_str()).bind(name.as_str());
                if let Some(at) = at {
                    q = q.bind(at);
                }
                let n: i64 = q.fetch_one(&self.pool).await?.try_get(0)?;
                Ok::<i64, StoreError>(n)
            }
        };
        // Ranked runs tied at a place (scheduled at `boundary`, or unscheduled), newest run id
        // first, with `before` runs ranked ahead of them: those ranked beyond `keep` go.
        let beyond = |rows: Vec<AnyRow>, ahead: i64| -> Result<Vec<String>, sqlx::Error> {
            let mut out = Vec::new();
            for (i, r) in rows.iter().enumerate() {
                let status: String = r.try_get(1)?;
                if ahead + i as i64 + 1 > keep && PRUNE_ENDED_STATUSES.contains(&status.as_str()) {
                    out.push(r.try_get(0)?);
                }
            }
            Ok(out)
        };
        match boundary {
            Some(b) => {
                let ties = sqlx::query(&format!(
                    "SELECT run_id, status FROM runs WHERE {JOB} AND scheduled_at = $3 \
                     ORDER BY run_id DESC"
                ))
                .bind(group.as_str())
                .bind(name.as_str())
                .bind(b)
                .fetch_all(&self.pool)
                .await?;
                // Runs scheduled after `b`: exactly `keep` when `b` is not shared.
                let ahead = if ties.len() == 1 {
                    keep
                } else {
                    count("scheduled_at > $3", Some(b)).await?
                };
                add(&mut ids, beyond(ties, ahead)?);
                for (sql, with_b) in [
                    (
                        format!(
                            "SELECT run_id FROM runs WHERE {JOB} AND {PRUNE_ENDED} \
                             AND scheduled_at < $3 LIMIT $4"
                        ),
                        true,
                    ),
                    (
                        format!(
                            "SELECT run_id FROM runs WHERE {JOB} AND scheduled_at IS NULL \
                             AND {PRUNE_ENDED} LIMIT $3"
                        ),
                        false,
                    ),
                ] {
                    if ids.len() >= limit {
                        break;
                    }
                    let mut q = sqlx::query(&sql).bind(group.as_str()).bind(name.as_str());
                    if with_b {
                        q = q.bind(b);
                    }
                    let rows = q.bind(more(&ids)).fetch_all(&self.pool).await?;
                    add(&mut ids, ids_of(rows)?);
                }
            }
            None => {
                // At most `keep` scheduled runs: only unscheduled ones can be beyond.
                let unscheduled = sqlx::query(&format!(
                    "SELECT run_id, status FROM runs WHERE {JOB} AND scheduled_at IS NULL \
                     ORDER BY run_id DESC"
                ))
                .bind(group.as_str())
                .bind(name.as_str())
                .fetch_all(&self.pool)
                .await?;
                if !unscheduled.is_empty() {
                    let ahead = count("scheduled_at IS NOT NULL", None).await?;
                    add(&mut ids, beyond(unscheduled, ahead)?);
                }
            }
        }
        Ok(ids)
    }

    /// Checks that the database accepts a write (a no-op update of the cursor row).
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        sqlx::query("UPDATE recorder_cursor SET seq = seq WHERE id = 1")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Number of rows in each table (for tests and diagnostics).
    pub async fn counts(&self) -> Result<(i64, i64, i64), StoreError> {
        let one = |sql: &'static str| async move {
            sqlx::query(sql)
                .fetch_one(&self.pool)
                .await
                .and_then(|r| r.try_get::<i64, _>(0))
        };
        Ok((
            one("SELECT COUNT(*) FROM runs").await?,
            one("SELECT COUNT(*) FROM attempts").await?,
            one("SELECT COUNT(*) FROM logs").await?,
        ))
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Where a page of a run's attempts and log lines starts: attempt `(shard, attempt)`, its
/// log lines from `seq` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunStart {
    /// Shard index.
    pub shard: u32,
    /// Attempt number.
    pub attempt: u32,
    /// First log sequence wanted (0: all).
    pub seq: u32,
}

fn attempt_view(r: &AnyRow) -> Result<AttemptView, StoreError> {
    let outcome: Option<String> = r.try_get("outcome")?;
    let status = match outcome.as_deref().and_then(parse_enum::<AttemptOutcome>) {
        Some(o) => AttemptStatus::from(o),
        None => AttemptStatus::Running,
    };
    Ok(AttemptView {
        shard: u32_of(r.try_get("shard")?),
        attempt: u32_of(r.try_get("attempt")?),
        status,
        will_retry: r.try_get::<i64, _>("will_retry")? != 0,
        retry_in_ms: r
            .try_get::<Option<i64>, _>("retry_in_ms")?
            .and_then(|v| u64::try_from(v).ok()),
        worker: r.try_get("worker")?,
        started_at: from_ms(r.try_get("started_at")?),
        finished_at: from_ms(r.try_get("finished_at")?),
        output: r.try_get("output")?,
        error: r.try_get("error")?,
        logs: Vec::new(),
    })
}

fn log_view(r: &AnyRow) -> Result<LogView, StoreError> {
    let level: String = r.try_get("level")?;
    Ok(LogView {
        seq: u32_of(r.try_get("seq")?),
        at: from_ms(Some(r.try_get("at")?)).unwrap_or_default(),
        level: parse_enum(&level).unwrap_or(LogLevel::Info),
        line: r.try_get("line")?,
    })
}

/// What [`Store::explain`] explains: the statements of a query of the store.
#[derive(Debug, Clone)]
pub enum Explain<'a> {
    /// [`Store::list_runs`] (both its statements).
    ListRuns {
        /// The filter.
        filter: RunFilter<'a>,
        /// Page size.
        limit: u32,
        /// The cursor.
        start: Option<(Option<i64>, String)>,
    },
    /// [`Store::job_runs_ended`]'s ended runs.
    JobRunsEnded {
        /// Job group.
        group: &'a str,
        /// Job name.
        name: &'a str,
        /// How many.
        recent: u32,
    },
    /// [`Store::run_counts_since`].
    RunCounts {
        /// Since (ms).
        since_ms: i64,
    },
}

/// The two parts of a run listing: runs with a scheduled time, newest first, then those
/// without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunsPart {
    Scheduled,
    Unscheduled,
}

const SCHEDULED: &str = "scheduled_at IS NOT NULL";
const UNSCHEDULED: &str = "scheduled_at IS NULL";

/// `runs.counts`: one column per status, in [`RunStatus::ALL`]'s order.
fn run_counts_sql() -> String {
    let counts: Vec<String> = RunStatus::ALL
        .iter()
        .map(|s| format!("COUNT(*) FILTER (WHERE status = '{}')", s.as_str()))
        .collect();
    format!(
        "SELECT {} FROM runs WHERE scheduled_at >= $1",
        counts.join(", ")
    )
}

/// A job's newest ended runs among those with (`SCHEDULED`) or without a scheduled time.
fn job_ended_sql(scheduled: &str) -> String {
    format!(
        "SELECT status, started_at, finished_at FROM runs WHERE job_group = $1 AND job_name = $2 AND {scheduled} AND finished_at IS NOT NULL ORDER BY scheduled_at DESC, run_id DESC LIMIT $3"
    )
}

/// The statement of one part of [`Store::list_runs`] from `start` on, at most `limit` runs;
/// `None` when the part cannot have any (the cursor is past it, or a time bound leaves out
/// unscheduled runs).
fn runs_statement(
    filter: &RunFilter<'_>,
    part: RunsPart,
    start: Option<&(Option<i64>, String)>,
    limit: u32,
) -> Option<(String, Vec<Val>)> {
    let timed = filter.since_ms.is_some() || filter.until_ms.is_some();
    match (part, start) {
        (RunsPart::Scheduled, Some((None, _))) => return None,
        (RunsPart::Unscheduled, _) if timed => return None,
        _ => {}
    }
    let mut sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE ");
    sql.push_str(match part {
        RunsPart::Scheduled => SCHEDULED,
        RunsPart::Unscheduled => UNSCHEDULED,
    });
    let mut vals: Vec<Val> = Vec::new();
    if let Some(app) = filter.app {
        vals.push(app.into());
        sql.push_str(&format!(" AND app_name = ${}", vals.len()));
    }
    if let Some(since) = filter.since_ms {
        vals.push(since.into());
        sql.push_str(&format!(" AND scheduled_at >= ${}", vals.len()));
    }
    if let Some(until) = filter.until_ms {
        vals.push(until.into());
        sql.push_str(&format!(" AND scheduled_at < ${}", vals.len()));
    }
    if let Some((name, group)) = filter.job {
        vals.push(name.into());
        sql.push_str(&format!(" AND job_name = ${}", vals.len()));
        if let Some(group) = group {
            vals.push(group.into());
            sql.push_str(&format!(" AND job_group = ${}", vals.len()));
        }
    }
    if let Some(status) = filter.status {
        vals.push(status.as_str().into());
        sql.push_str(&format!(" AND status = ${}", vals.len()));
    }
    match (part, start) {
        (RunsPart::Scheduled, Some((Some(at), id))) => {
            // `scheduled_at <= at` bounds the index range; the run id is compared on the runs
            // scheduled at `at` only.
            vals.push((*at).into());
            let at_n = vals.len();
            vals.push(id.as_str().into());
            sql.push_str(&format!(
                " AND scheduled_at <= ${at_n} AND (scheduled_at < ${at_n} OR run_id <= ${})",
                vals.len()
            ));
        }
        (RunsPart::Unscheduled, Some((None, id))) => {
            vals.push(id.as_str().into());
            sql.push_str(&format!(" AND run_id <= ${}", vals.len()));
        }
        _ => {}
    }
    vals.push(i64::from(limit).into());
    sql.push_str(&format!(
        " ORDER BY scheduled_at DESC, run_id DESC LIMIT ${}",
        vals.len()
    ));
    Some((sql, vals))
}

const RUN_COLUMNS: &str = "run_id, job_group, job_name, app_name, status, trigger_kind, scheduled_at, dispatched_at, started_at, finished_at, shard_total, shards_succeeded, shards_failed, attempts, misfired, output, error, node, revision, parent_run_id, epoch";

fn run_summary(r: &AnyRow) -> Result<RunSummary, StoreError> {
    let status: String = r.try_get("status")?;
    let trigger: Option<String> = r.try_get("trigger_kind")?;
    let run_id: String = r.try_get("run_id")?;
    Ok(RunSummary {
        trace_id: krest_schemas::trace::trace_id(&run_id),
        run_id,
        job_group: r.try_get("job_group")?,
        job_name: r.try_get("job_name")?,
        app_name: r.try_get("app_name")?,
        status: RunStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown run status `{status}`")))?,
        trigger: trigger.as_deref().and_then(parse_enum::<Trigger>),
        scheduled_at: from_ms(r.try_get("scheduled_at")?),
        dispatched_at: from_ms(r.try_get("dispatched_at")?),
        started_at: from_ms(r.try_get("started_at")?),
        finished_at: from_ms(r.try_get("finished_at")?),
        shard_total: u32_of(r.try_get("shard_total")?),
        shards_succeeded: u32_of(r.try_get("shards_succeeded")?),
        shards_failed: u32_of(r.try_get("shards_failed")?),
        attempts: u32_of(r.try_get("attempts")?),
        misfired: u32_of(r.try_get("misfired")?),
        output: r.try_get("output")?,
        error: r.try_get("error")?,
        node: r.try_get("node")?,
        revision: r
            .try_get::<Option<i64>, _>("revision")?
            .and_then(|v| u64::try_from(v).ok()),
        parent_run_id: r.try_get("parent_run_id")?,
        epoch: r
            .try_get::<Option<i64>, _>("epoch")?
            .and_then(|e| u64::try_from(e).ok()),
    })
}

/// The attempt columns `attempt_of` reads.
const ATTEMPT_FOLD_COLUMNS: &str =
    "run_id, shard, attempt, started_at, finished_at, outcome, will_retry, output, error";

/// Attempts of a shard, in attempt order, keyed by `(run, shard)`.
type ShardAttempts = HashMap<(String, i64), Vec<fold::Attempt>>;

/// The attempt rows (as `fold` wants them) of `shards` `(run, shard)`.
async fn shard_attempts(
    backend: Backend,
    tx: &mut sqlx::Transaction<'_, Any>,
    shards: &[(String, i64)],
) -> Result<ShardAttempts, StoreError> {
    let mut out: ShardAttempts = HashMap::new();
    for chunk in shards.chunks(ROWS_PER_INSERT) {
        let mut vals = Vec::with_capacity(chunk.len() * 2);
        for (run, shard) in chunk {
            vals.extend([Val::from(run.as_str()), Val::from(*shard)]);
        }
        // VALUES columns are `column1…` on both backends.
        let sql = format!(
            "SELECT a.run_id, a.shard, a.attempt, a.started_at, a.finished_at, a.outcome, a.will_retry, a.output, a.error \
             FROM attempts a JOIN (VALUES {}) AS v ON a.run_id = v.column1 AND a.shard = v.column2 \
             ORDER BY a.run_id, a.shard, a.attempt",
            placeholders(backend, chunk.len(), 2)
        );
        for r in batch_query(&sql, vals).fetch_all(&mut **tx).await? {
            let a = attempt_of(&r)?;
            out.entry((r.try_get("run_id")?, a.shard))
                .or_default()
                .push(a);
        }
    }
    Ok(out)
}

fn attempt_of(r: &AnyRow) -> Result<fold::Attempt, StoreError> {
    let outcome: Option<String> = r.try_get("outcome")?;
    Ok(fold::Attempt {
        shard: r.try_get("shard")?,
        attempt: r.try_get("attempt")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        outcome: outcome.as_deref().and_then(parse_outcome),
        will_retry: r.try_get::<i64, _>("will_retry")? != 0,
        output: r.try_get("output")?,
        error: r.try_get("error")?,
    })
}

/// A run touched by a batch, as it was before the batch.
struct Prior {
    status: String,
    shard_total: i64,
    scheduled_at: Option<i64>,
    /// Its tally (with the run's output and error), when it agrees with the run's counters. A
    /// tally that does not was not written with them (a node older than tallies recorded the
    /// run since): the run is summed up again.
    tally: Option<fold::Tally>,
}

/// Reads the runs `ids` that exist into `out`.
async fn prior_runs(
    backend: Backend,
    tx: &mut sqlx::Transaction<'_, Any>,
    ids: &[&str],
    out: &mut HashMap<String, Prior>,
) -> Result<(), StoreError> {
    let vals: Vec<Val> = ids.iter().map(|s| Val::from(*s)).collect();
    for r in batch_query(
        &format!(
            "SELECT run_id, shard_total, scheduled_at, status, shards_succeeded, shards_failed, attempts, started_at, output, error, tally FROM runs WHERE run_id IN ({})",
            list_placeholders(backend, ids.len())
        ),
        vals,
    )
    .fetch_all(&mut **tx)
    .await?
    {
        let output: Option<String> = r.try_get("output")?;
        let error: Option<String> = r.try_get("error")?;
        let counters = (
            r.try_get::<i64, _>("shards_succeeded")?,
            r.try_get::<i64, _>("shards_failed")?,
            r.try_get::<i64, _>("attempts")?,
            r.try_get::<Option<i64>, _>("started_at")?,
            output.is_some(),
            error.is_some(),
        );
        let tally = r
            .try_get::<Option<String>, _>("tally")?
            .and_then(|t| serde_json::from_str::<fold::Tally>(&t).ok())
            .filter(|t| {
                counters
                    == (
                        t.succeeded,
                        t.lost,
                        t.max_attempt,
                        t.first_start,
                        t.output_key.is_some(),
                        t.error_key.is_some(),
                    )
            })
            .map(|mut t| {
                t.output = output;
                t.error = error;
                t
            });
        out.insert(
            r.try_get("run_id")?,
            Prior {
                status: r.try_get("status")?,
                shard_total: r.try_get("shard_total")?,
                scheduled_at: r.try_get("scheduled_at")?,
                tally,
            },
        );
    }
    Ok(())
}

/// What a run held, before a batch, in the shards the batch touches.
enum Before {
    /// Rows: none (a new run, or a tally that counts no shard), or as read from the database
    /// (`Changes::before`) for the runs that `Read` named.
    Rows,
    /// To be read (turns into `Rows` or `Refold` once read).
    Read,
    /// The state of its one shard, from its tally; no attempt the batch touches had ended.
    Sole(fold::Shard),
    /// Summed up again from all its attempts: no usable tally, or an attempt ended again.
    Refold,
}

/// What must be known of a run before a batch touching its `touched` `(shard, attempt)` (in
/// order; `shard_total` as the batch has it), from the run as it was (`None`: a new run).
///
/// Nothing is read for a new run or a run whose tally counts no shard yet (no attempts), nor
/// for a one-shard run whose tally counts its shard, when every attempt the batch touches is
/// either new (above the tally's highest attempt) or cannot have ended (no attempt of the run
/// has ended): the shard's state is the tally's (`Tally::sole_shard`), and no attempt ends a
/// second time. Shard indexes of a run are below its shard total (the leader signs a delivery
/// token per shard), so a one-shard run's shard is shard 0. Other runs with a tally read the
/// touched shards' attempts; runs without one are summed up from all their attempts.
fn before_of(prior: Option<&Prior>, shard_total: i64, touched: &[(i64, i64)]) -> Before {
    let Some(prior) = prior else {
        return Before::Rows;
    };
    let Some(t) = &prior.tally else {
        return Before::Refold;
    };
    if t.shards == 0 || touched.is_empty() {
        return Before::Rows;
    }
    let one_shard = prior.shard_total <= 1 && shard_total <= 1;
    if one_shard
        && touched.iter().all(|&(shard, attempt)| {
            shard == 0 && (attempt > t.max_attempt || t.last_finish.is_none())
        })
    {
        if let Some(sh) = t.sole_shard() {
            return Before::Sole(sh);
        }
    }
    Before::Read
}

/// What a batch did to attempts: the runs as they were, what was known or read of the shards
/// they touched before it, the touched attempts as the upsert left them, and the touched
/// `(shard, attempt)` of each run.
struct Changes<'a> {
    priors: &'a HashMap<String, Prior>,
    befores: &'a HashMap<&'a str, Before>,
    before: &'a ShardAttempts,
    merged: &'a ShardAttempts,
    touched: &'a BTreeMap<&'a str, Vec<(i64, i64)>>,
}

/// What an upsert of a run that exists sets: what the batch tells of it, keeping what it does
/// not tell.
const RUN_UPSERT_SET: &str = "path = COALESCE(excluded.path, runs.path), \
     job_type = COALESCE(excluded.job_type, runs.job_type), \
     trigger_kind = COALESCE(excluded.trigger_kind, runs.trigger_kind), \
     scheduled_at = COALESCE(excluded.scheduled_at, runs.scheduled_at), \
     dispatched_at = COALESCE(excluded.dispatched_at, runs.dispatched_at), \
     misfired = CASE WHEN excluded.dispatched_at IS NOT NULL THEN excluded.misfired ELSE runs.misfired END, \
     revision = COALESCE(excluded.revision, runs.revision), \
     args = COALESCE(excluded.args, runs.args), \
     node = COALESCE(excluded.node, runs.node), \
     shard_total = excluded.shard_total, \
     parent_run_id = COALESCE(excluded.parent_run_id, runs.parent_run_id), \
     epoch = COALESCE(excluded.epoch, runs.epoch)";

/// The 16 values of a run's own columns, in `INSERT INTO runs (run_id, …, epoch)` order.
fn run_vals(id: &str, r: &RunRow) -> [Val; 16] {
    [
        Val::from(id),
        r.job_group.clone().into(),
        r.job_name.clone().into(),
        r.app_name.clone().into(),
        r.path.clone().into(),
        r.job_type.clone().into(),
        r.trigger.clone().into(),
        r.scheduled_at.into(),
        r.dispatched_at.into(),
        r.misfired.unwrap_or(0).into(),
        r.revision.into(),
        r.args.clone().into(),
        r.node.clone().into(),
        r.shard_total.into(),
        r.parent_run_id.clone().into(),
        r.epoch.into(),
    ]
}

/// Columns of a run's summary: status, shards_succeeded, shards_failed, attempts, started_at,
/// finished_at, output, error, tally.
const SUMMARY_COLUMNS: usize = 9;

/// A run's status and the values of its summary columns, from its tally.
fn summary_vals(
    tally: &fold::Tally,
    shard_total: i64,
) -> Result<(fold::Folded, [Val; SUMMARY_COLUMNS]), StoreError> {
    let folded = tally.folded(shard_total);
    let json =
        serde_json::to_string(tally).map_err(|e| StoreError::Corrupt(format!("run tally: {e}")))?;
    let vals = [
        folded.status.as_str().into(),
        folded.shards_succeeded.into(),
        folded.shards_failed.into(),
        folded.attempts.into(),
        folded.started_at.into(),
        folded.finished_at.into(),
        folded.output.clone().into(),
        folded.error.clone().into(),
        json.into(),
    ];
    Ok((folded, vals))
}

/// The summary of a run the batch inserted, as `run_summary` would read it back: a new row
/// holds exactly the values bound.
fn new_run_summary(run_id: &str, r: &RunRow, folded: fold::Folded) -> RunSummary {
    RunSummary {
        trace_id: krest_schemas::trace::trace_id(run_id),
        run_id: run_id.to_string(),
        job_group: r.job_group.clone(),
        job_name: r.job_name.clone(),
        app_name: r.app_name.clone(),
        status: folded.status,
        trigger: r.trigger.as_deref().and_then(parse_enum::<Trigger>),
        scheduled_at: from_ms(r.scheduled_at),
        dispatched_at: from_ms(r.dispatched_at),
        started_at: from_ms(folded.started_at),
        finished_at: from_ms(folded.finished_at),
        shard_total: u32_of(r.shard_total),
        shards_succeeded: u32_of(folded.shards_succeeded),
        shards_failed: u32_of(folded.shards_failed),
        attempts: u32_of(folded.attempts),
        misfired: u32_of(r.misfired.unwrap_or(0)),
        output: folded.output,
        error: folded.error,
        node: r.node.clone(),
        revision: r.revision.and_then(|v| u64::try_from(v).ok()),
        parent_run_id: r.parent_run_id.clone(),
        epoch: r.epoch.and_then(|e| u64::try_from(e).ok()),
    }
}

/// The tallies of the runs a batch touched, as the batch leaves them: from the run's tally and
/// the shards the batch changed (a batch costs what it changed, not what the run holds), or,
/// for a run without a usable tally or with an attempt ended again, from all its attempts
/// (read after the batch's attempt upsert). Skipped runs have none (their status says so).
async fn tallies<'r>(
    backend: Backend,
    tx: &mut sqlx::Transaction<'_, Any>,
    runs: &'r [(String, RunRow)],
    changes: &Changes<'_>,
) -> Result<HashMap<&'r str, fold::Tally>, StoreError> {
    let no_rows: &[fold::Attempt] = &[];
    let mut tallies: HashMap<&str, fold::Tally> = HashMap::with_capacity(runs.len());
    let mut refold: Vec<&str> = Vec::new();
    for (id, r) in runs {
        let prior = changes.priors.get(id);
        if r.skipped.is_some() || prior.is_some_and(|p| p.status == RunStatus::Skipped.as_str()) {
            continue;
        }
        let mut t = prior.and_then(|p| p.tally.clone()).unwrap_or_default();
        let merged = |shard: i64| {
            changes
                .merged
                .get(&(id.clone(), shard))
                .map_or(no_rows, Vec::as_slice)
        };
        match changes.befores.get(id.as_str()) {
            Some(Before::Refold) => {
                refold.push(id.as_str());
                continue;
            }
            Some(Before::Sole(old)) => {
                // One shard (shard 0); its attempts as they are now taken in on top.
                let mut new = *old;
                for a in merged(0) {
                    new.add(a);
                    t.attempt(a);
                }
                t.shard(old, -1);
                t.shard(&new, 1);
            }
            Some(Before::Rows | Before::Read) | None => {
                let mut shards: Vec<i64> = changes
                    .touched
                    .get(id.as_str())
                    .into_iter()
                    .flatten()
                    .map(|(shard, _)| *shard)
                    .collect();
                shards.dedup();
                for shard in shards {
                    let key = (id.clone(), shard);
                    let old = changes.before.get(&key).map_or(no_rows, Vec::as_slice);
                    // The shard now: its rows before, with the touched ones as upserted.
                    let mut new: BTreeMap<i64, &fold::Attempt> =
                        old.iter().map(|a| (a.attempt, a)).collect();
                    new.extend(merged(shard).iter().map(|a| (a.attempt, a)));
                    if let Some(sh) = fold::Shard::of(old) {
                        t.shard(&sh, -1);
                    }
                    if let Some(sh) = fold::Shard::of(new.values().copied()) {
                        t.shard(&sh, 1);
                    }
                    for a in new.values() {
                        t.attempt(a);
                    }
                }
            }
        }
        tallies.insert(id.as_str(), t);
    }

    for chunk in refold.chunks(ROWS_PER_INSERT) {
        let mut by_run: HashMap<String, Vec<fold::Attempt>> = HashMap::new();
        let vals: Vec<Val> = chunk.iter().map(|s| Val::from(*s)).collect();
        let rows = batch_query(
            &format!(
                "SELECT {ATTEMPT_FOLD_COLUMNS} FROM attempts WHERE run_id IN ({}) ORDER BY run_id, shard, attempt",
                list_placeholders(backend, chunk.len())
            ),
            vals,
        )
        .fetch_all(&mut **tx)
        .await?;
        for r in &rows {
            by_run
                .entry(r.try_get("run_id")?)
                .or_default()
                .push(attempt_of(r)?);
        }
        for id in chunk {
            let t = fold::Tally::of(by_run.get(*id).map_or(no_rows, Vec::as_slice));
            tallies.insert(id, t);
        }
    }
    Ok(tallies)
}

/// Writes the summaries of runs that existed before the batch (`chunk`, each with a tally):
/// one multi-row UPDATE … FROM (VALUES …) (a statement per run costs a round trip each on
/// Postgres; VALUES columns are `column1…` on both backends). Returns the runs that reached a
/// final status now.
async fn update_summaries(
    backend: Backend,
    tx: &mut sqlx::Transaction<'_, Any>,
    chunk: &[&(String, RunRow)],
    tallies: &HashMap<&str, fold::Tally>,
    priors: &HashMap<String, Prior>,
) -> Result<Vec<String>, StoreError> {
    let mut ended = Vec::new();
    let mut vals: Vec<Val> = Vec::with_capacity(chunk.len() * (1 + SUMMARY_COLUMNS));
    let mut rows = 0;
    for (run_id, r) in chunk {
        let Some(tally) = tallies.get(run_id.as_str()) else {
            continue;
        };
        // The upsert of runs set the shard total the batch has.
        let (folded, summary) = summary_vals(tally, r.shard_total)?;
        let status = folded.status;
        vals.push(Val::from(run_id.as_str()));
        vals.extend(summary);
        rows += 1;
        let was_final = priors
            .get(run_id)
            .and_then(|p| RunStatus::parse(&p.status))
            .is_some_and(RunStatus::is_final);
        if status.is_final() && !was_final {
            ended.push(run_id.clone());
        }
    }
    if rows > 0 {
        let sql = format!(
            "UPDATE runs SET status = v.column2, shards_succeeded = v.column3, shards_failed = v.column4, attempts = v.column5, \
             started_at = v.column6, finished_at = v.column7, output = v.column8, error = v.column9, tally = v.column10 \
             FROM (VALUES {}) AS v WHERE runs.run_id = v.column1",
            placeholders(backend, rows, 1 + SUMMARY_COLUMNS)
        );
        batch_query(&sql, vals).execute(&mut **tx).await?;
    }
    Ok(ended)
}

/// Accepts `postgres://…`/`postgresql://…` (checked by the Postgres driver's parser), and
/// `sqlite://PATH`, `sqlite:PATH` or a bare path for SQLite, whose files are created if missing.
fn normalize_url(url: &str) -> Result<(Backend, String), StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        sqlx::postgres::PgConnectOptions::from_str(url)
            .map_err(|_| StoreError::BadUrl(redact_db_url(url)))?;
        return Ok((Backend::Postgres, url.to_string()));
    }
    let path = if let Some(rest) = url.strip_prefix("sqlite://") {
        rest
    } else if let Some(rest) = url.strip_prefix("sqlite:") {
        rest
    } else if !url.contains("://") && !url.is_empty() {
        url
    } else {
        return Err(StoreError::BadUrl(redact_db_url(url)));
    };
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    if path.is_empty() {
        return Err(StoreError::BadUrl(redact_db_url(url)));
    }
    let mut params: Vec<String> = query
        .map(|q| q.split('&').map(str::to_string).collect())
        .unwrap_or_default();
    if !params.iter().any(|p| p.starts_with("mode=")) {
        params.push("mode=rwc".to_string());
    }
    // Validate early with the real parser for a clear error.
    let normalized = format!("sqlite://{path}?{}", params.join("&"));
    sqlx::sqlite::SqliteConnectOptions::from_str(&normalized)
        .map_err(|_| StoreError::BadUrl(redact_db_url(url)))?;
    Ok((Backend::Sqlite, normalized))
}

/// A database URL as shown in logs and errors: userinfo redacted, and a `password=` query
/// parameter too.
pub fn redact_db_url(url: &str) -> String {
    let shown = krest_schemas::redact::url(url).into_owned();
    let Some((base, query)) = shown.split_once('?') else {
        return shown;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=<redacted>"),
            _ => p.to_string(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// What to check when opening the database failed.
fn open_hint(backend: Backend, e: &sqlx::Error) -> &'static str {
    let code = match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    };
    match (backend, code.as_deref(), e) {
        (Backend::Postgres, Some("3D000"), _) => {
            "the database does not exist: create it (createdb NAME, or CREATE DATABASE) or fix its name in the URL"
        }
        (Backend::Postgres, Some("28P01" | "28000"), _) => {
            "the server refused this user: check the user name and password in the URL and the server's pg_hba.conf"
        }
        (Backend::Postgres, _, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => {
            "check that PostgreSQL runs and accepts TCP connections at this host and port"
        }
        (Backend::Postgres, _, sqlx::Error::Tls(_)) => {
            "the TLS handshake failed: check sslmode and the server's certificate"
        }
        (Backend::Postgres, _, _) => {
            "check the URL, that PostgreSQL is reachable and that this user may connect"
        }
        (Backend::Sqlite, Some("5" | "6"), _) => {
            "another process kept the database file locked for seconds (a tool with it open, or a node stuck in a transaction): close it, or give this node its own file"
        }
        (Backend::Sqlite, _, _) => {
            "check that the file's directory exists and is writable by this process"
        }
    }
}

/// A pool on a SQLite file, in WAL mode. Opening it, or switching it to WAL (which does not
/// wait for a lock), can find the file locked for a moment by another process opening or
/// migrating it at the same time (two nodes starting together): each step is tried again while
/// the file is locked, for up to about 5 seconds.
async fn sqlite_pool(url: &str) -> Result<sqlx::AnyPool, sqlx::Error> {
    let pool = while_locked(|| {
        AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA busy_timeout = 5000")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect(url)
    })
    .await?;
    while_locked(|| sqlx::query("PRAGMA journal_mode = WAL").execute(&pool)).await?;
    Ok(pool)
}

/// `step`, tried again every 200 ms while it fails with SQLITE_BUSY or SQLITE_LOCKED, at most
/// 25 times.
async fn while_locked<T, F, Fut>(mut step: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut tries = 0;
    loop {
        match step().await {
            Err(e) if tries < 25 && locked(&e) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED.
fn locked(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("5" | "6")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use krest_schemas::{Dispatched, Finished, JobType, LogLine, Started};

    fn at(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).single().unwrap()
    }

    fn events() -> Vec<RunEvent> {
        let run = "g.j.1000".to_string();
        let base = |shard: u32, attempt: u32| (run.clone(), shard, attempt);
        let mut out = vec![RunEvent::Dispatched(Dispatched {
            run: krest_schemas::RunRef {
                run_id: run.clone(),
                job_group: "g".into(),
                job_name: "j".into(),
                app_name: "a".into(),
            },
            path: "p".into(),
            job_type: JobType::Sharding,
            trigger: Trigger::Schedule,
            scheduled_at: at(1000),
            dispatched_at: at(1001),
            shard_total: 2,
            args: serde_json::json!(["x", "y"]),
            misfired: 0,
            parent_run_id: None,
            revision: 3,
            node: "n1".into(),
            epoch: Some(7),
        })];
        for (shard, attempt, ok) in [(0, 1, true), (1, 1, false), (1, 2, true)] {
            let (run_id, shard, attempt) = base(shard, attempt);
            out.push(RunEvent::Started(Started {
                run: krest_schemas::RunRef {
                    run_id: run_id.clone(),
                    job_group: "g".into(),
                    job_name: "j".into(),
                    app_name: "a".into(),
                },
                shard,
                shard_total: 2,
                attempt,
                worker: "w".into(),
                at: at(1002),
                scheduled_at: Some(at(1000)),
                delivery_token: String::new(),
            }));
            out.push(RunEvent::Log(LogLine {
                run: krest_schemas::RunRef {
                    run_id: run_id.clone(),
                    job_group: "g".into(),
                    job_name: "j".into(),
                    app_name: String::new(),
                },
                shard,
                attempt,
                seq: 1,
                at: at(1003),
                level: LogLevel::Info,
                line: format!("shard {shard} attempt {attempt}"),
                delivery_token: String::new(),
            }));
            out.push(RunEvent::Finished(Finished {
                run: krest_schemas::RunRef {
                    run_id,
                    job_group: "g".into(),
                    job_name: "j".into(),
                    app_name: "a".into(),
                },
                shard,
                shard_total: 2,
                attempt,
                worker: "w".into(),
                at: at(1004 + i64::from(attempt)),
                outcome: if ok {
                    AttemptOutcome::Succeeded
                } else {
                    AttemptOutcome::Failed
                },
                will_retry: !ok,
                retry_in_ms: None,
                output: ok.then(|| "done".to_string()),
                error: (!ok).then(|| "oops".to_string()),
                duration_ms: 2,
                delivery_token: String::new(),
                started_at: None,
                scheduled_at: None,
            }));
        }
        out
    }

    /// Numbers events with stream sequences from `first` on.
    fn seqd(events: &[RunEvent], first: u64) -> Vec<(u64, RunEvent)> {
        (first..).zip(events.iter().cloned()).collect()
    }

    /// A fresh database of each backend: a SQLite file, a new Postgres database.
    enum Db {
        Sqlite(tempfile::TempDir),
        Postgres(krest_test_support::PgDatabase),
    }

    impl Db {
        fn new(backend: Backend) -> Db {
            match backend {
                Backend::Sqlite => Db::Sqlite(tempfile::tempdir().unwrap()),
                Backend::Postgres => Db::Postgres(krest_test_support::PgDatabase::create()),
            }
        }

        fn url(&self) -> String {
            match self {
                Db::Sqlite(dir) => format!("sqlite://{}/t.db", dir.path().display()),
                Db::Postgres(db) => db.url().to_string(),
            }
        }

        async fn open(&self) -> Store {
            Store::open(&self.url()).await.unwrap()
        }
    }

    /// `name_sqlite` and `name_postgres` tests running `body(backend)`.
    macro_rules! on_both {
        ($($name:ident => $body:ident),* $(,)?) => {
            mod both {
                $(
                    pub(super) mod $name {
                        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                        async fn sqlite() {
                            super::super::$body(super::super::Backend::Sqlite).await;
                        }
                        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                        async fn postgres() {
                            super::super::$body(super::super::Backend::Postgres).await;
                        }
                    }
                )*
            }
        };
    }

    on_both! {
        held_back => events_past_one_held_back_are_written_and_the_cursor_waits_for_it,
        replaying => replaying_events_creates_no_duplicates_in_any_order,
        final_failure => a_final_failure_of_one_shard_fails_the_run_once_all_shards_end,
        paging => runs_page_newest_first_with_unscheduled_runs_last,
        shared => stores_sharing_a_database_apply_each_event_once,
        reopen => reopening_migrates_once_and_keeps_the_cursor,
        prune => retention_prunes_ended_runs_by_age_and_count_in_batches,
        prune_like_ranking => retention_prunes_what_ranking_every_run_would,
        tally => a_summary_updated_batch_by_batch_equals_the_summary_of_all_attempts,
        one_shard => one_shard_runs_recorded_at_once_or_event_by_event_have_the_same_summary,
        prune_alive => a_run_alive_again_when_pruned_keeps_its_attempts_and_lines,
        ended_new => a_run_ended_in_its_first_batch_is_reported_as_stored,
    }

    /// A run whose events all come in one batch is inserted with its summary, and the summary
    /// reported for its end (built from the batch, not read back) is the one stored.
    async fn a_run_ended_in_its_first_batch_is_reported_as_stored(backend: Backend) {
        let db = Db::new(backend);
        let store = db.open().await;
        let evs = events();
        let applied = store.apply(&seqd(&evs, 1), evs.len() as u64).await.unwrap();
        let d = store.get_run("g.j.1000").await.unwrap().unwrap();
        assert_eq!(d.run.status, RunStatus::Succeeded);
        assert_eq!(d.run.attempts, 2);
        assert_eq!(applied.ended, [d.run]);
        assert_eq!(d.attempts.len(), 3);
        store.close().await;
    }

    /// Retention chooses runs, then deletes them: a run that a late event brought back to
    /// life in between keeps its row and its attempts and log lines (before, the attempts
    /// and lines of every chosen run went, and the row that stayed lost its history).
    async fn a_run_alive_again_when_pruned_keeps_its_attempts_and_lines(backend: Backend) {
        let db = Db::new(backend);
        let store = db.open().await;
        for (id, status) in [("g.j.ended", "FAILED"), ("g.j.alive", "RUNNING")] {
            sqlx::query(
                "INSERT INTO runs (run_id, job_group, job_name, app_name, scheduled_at, status) \
                 VALUES ($1, 'g', 'j', 'a', 1, $2)",
            )
            .bind(id)
            .bind(status)
            .execute(&store.pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO attempts (run_id, shard, attempt, worker) VALUES ($1, 0, 1, 'w')",
            )
            .bind(id)
            .execute(&store.pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO logs (run_id, shard, attempt, seq, at, level, line) \
                 VALUES ($1, 0, 1, 1, 1, 'INFO', 'x')",
            )
            .bind(id)
            .execute(&store.pool)
            .await
            .unwrap();
        }
        // Both were chosen while ended; one has come back to life since.
        let chosen = ["g.j.ended".to_string(), "g.j.alive".to_string()];
        assert_eq!(store.delete_ended(&chosen).await.unwrap(), 1);
        for table in ["runs", "attempts", "logs"] {
            assert_eq!(run_ids_in(&store, table).await, ["g.j.alive"], "{table}");
        }
    }

    /// The `run_id` column of every row of `table`.
    async fn run_ids_in(store: &Store, table: &str) -> Vec<String> {
        sqlx::query(&format!("SELECT run_id FROM {table}"))
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get(0).unwrap())
            .collect()
    }

    /// Events of a SHARDING run of 4 shards with retries, an end before its start, a tie in
    /// end times, a redelivered end and a shard run again after it failed for good.
    fn tricky_events(run_id: &str) -> Vec<RunEvent> {
        let r = krest_schemas::RunRef {
            run_id: run_id.into(),
            job_group: "g".into(),
            job_name: "j".into(),
            app_name: "a".into(),
        };
        let start = |shard: u32, attempt: u32| {
            RunEvent::Started(Started {
                run: r.clone(),
                shard,
                shard_total: 4,
                attempt,
                worker: "w".into(),
                at: at(i64::from(shard * 10 + attempt)),
                scheduled_at: Some(at(1)),
                delivery_token: String::new(),
            })
        };
        let end = |shard: u32, attempt: u32, outcome: AttemptOutcome, retry: bool, t: i64| {
            let ok = outcome == AttemptOutcome::Succeeded;
            RunEvent::Finished(Finished {
                run: r.clone(),
                shard,
                shard_total: 4,
                attempt,
                worker: "w".into(),
                at: at(t),
                outcome,
                will_retry: retry,
                retry_in_ms: None,
                output: ok.then(|| format!("o{shard}/{attempt}")),
                error: (!ok).then(|| format!("e{shard}/{attempt}")),
                duration_ms: 1,
                delivery_token: String::new(),
                started_at: None,
                scheduled_at: None,
            })
        };
        use AttemptOutcome::{Cancelled, Failed, Succeeded, TimedOut};
        let mut d = events().remove(0);
        if let RunEvent::Dispatched(d) = &mut d {
            d.run = r.clone();
            d.shard_total = 4;
        }
        vec![
            d,
            start(0, 1),
            end(0, 1, Failed, true, 100),
            start(1, 1),
            end(1, 1, Succeeded, false, 101),
            end(2, 1, TimedOut, false, 102),
            start(2, 1),
            start(0, 2),
            end(0, 2, Succeeded, false, 103),
            start(3, 1),
            end(3, 1, Failed, false, 102),
            end(1, 1, Succeeded, false, 101),
            start(3, 2),
            end(3, 2, Cancelled, false, 104),
            end(3, 2, Failed, false, 99),
        ]
    }

    async fn a_summary_updated_batch_by_batch_equals_the_summary_of_all_attempts(backend: Backend) {
        let db = Db::new(backend);
        let store = db.open().await;
        let summary = |r: RunSummary| {
            (
                r.status,
                r.shards_succeeded,
                r.shards_failed,
                r.attempts,
                r.started_at,
                r.finished_at,
                r.output,
                r.error,
            )
        };
        let mut seq = 0;
        let n = tricky_events("x").len();
        // Run `inc` gets one event per batch; after each, run `refN` gets the first N events
        // in one batch (summed up from all its attempts).
        for (i, e) in tricky_events("g.j.inc").into_iter().enumerate() {
            seq += 1;
            store.apply(&[(seq, e)], seq).await.unwrap();
            let prefix: Vec<RunEvent> = tricky_events(&format!("g.j.ref{i}"))
                .into_iter()
                .take(i + 1)
                .collect();
            let batch = seqd(&prefix, seq + 1);
            seq += prefix.len() as u64;
            store.apply(&batch, seq).await.unwrap();
            let inc = store.get_run("g.j.inc").await.unwrap().unwrap().run;
            let full = store
                .get_run(&format!("g.j.ref{i}"))
                .await
                .unwrap()
                .unwrap()
                .run;
            assert_eq!(summary(inc), summary(full), "after event {i}");
        }
        // Batches of 3; a tally left behind by batches 2 and 3 (as a node older than tallies
        // would leave it), then forgotten (as in a database recorded before them).
        let evs = tricky_events("g.j.by3");
        let mut kept = String::new();
        for (k, chunk) in evs.chunks(3).enumerate() {
            let batch = seqd(chunk, seq + 1);
            seq += chunk.len() as u64;
            store.apply(&batch, seq).await.unwrap();
            let tally = sqlx::query("SELECT tally FROM runs WHERE run_id = 'g.j.by3'");
            match k {
                0 => kept = tally.fetch_one(&store.pool).await.unwrap().get(0),
                2 => {
                    sqlx::query("UPDATE runs SET tally = $1 WHERE run_id = 'g.j.by3'")
                        .bind(kept.as_str())
                        .execute(&store.pool)
                        .await
                        .unwrap();
                }
                3 => {
                    sqlx::query("UPDATE runs SET tally = NULL")
                        .execute(&store.pool)
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
        let by3 = store.get_run("g.j.by3").await.unwrap().unwrap().run;
        let full = store
            .get_run(&format!("g.j.ref{}", n - 1))
            .await
            .unwrap()
            .unwrap()
            .run;
        assert_eq!(by3.status, RunStatus::Failed, "the last end wins");
        assert_eq!(summary(by3), summary(full));
        store.close().await;
    }

    /// Which runs a batch reads attempts of before its upsert (`before_of`).
    #[test]
    fn what_a_batch_reads_of_a_run_before_its_upsert() {
        let a = |shard: i64, attempt: i64, ended: bool| fold::Attempt {
            shard,
            attempt,
            started_at: Some(1),
            finished_at: ended.then_some(2),
            outcome: ended.then_some(AttemptOutcome::Failed),
            will_retry: true,
            ..fold::Attempt::default()
        };
        let prior = |shard_total: i64, attempts: Option<&[fold::Attempt]>| Prior {
            status: "RUNNING".into(),
            shard_total,
            scheduled_at: Some(1000),
            tally: attempts.map(fold::Tally::of),
        };
        let started = [a(0, 1, false)];
        let retried = [a(0, 1, true)];
        let two = [a(0, 1, false), a(1, 1, false)];
        type Case<'a> = (&'a str, Option<Prior>, i64, &'a [(i64, i64)], &'a str);
        let cases: Vec<Case> = vec![
            ("a new run", None, 1, &[(0, 1)], "nothing"),
            (
                "no attempt yet",
                Some(prior(1, Some(&[]))),
                1,
                &[(0, 1)],
                "nothing",
            ),
            (
                "a sharded run's first attempts",
                Some(prior(4, Some(&[]))),
                4,
                &[(0, 1), (3, 1)],
                "nothing",
            ),
            (
                "a started attempt ends",
                Some(prior(1, Some(&started))),
                1,
                &[(0, 1)],
                "tally",
            ),
            (
                "a retry starts",
                Some(prior(1, Some(&retried))),
                1,
                &[(0, 2)],
                "tally",
            ),
            (
                "an earlier attempt ends",
                Some(prior(1, Some(&[a(0, 1, false), a(0, 2, false)]))),
                1,
                &[(0, 1)],
                "tally",
            ),
            (
                "an ended attempt again",
                Some(prior(1, Some(&retried))),
                1,
                &[(0, 1)],
                "read",
            ),
            (
                "below the highest attempt, after an end",
                Some(prior(1, Some(&[a(0, 1, true), a(0, 3, false)]))),
                1,
                &[(0, 2)],
                "read",
            ),
            (
                "a sharded run",
                Some(prior(4, Some(&two))),
                4,
                &[(0, 1)],
                "read",
            ),
            (
                "one shard of two so far",
                Some(prior(4, Some(&started))),
                4,
                &[(0, 1)],
                "read",
            ),
            (
                "another shard",
                Some(prior(1, Some(&started))),
                1,
                &[(1, 1)],
                "read",
            ),
            ("no tally", Some(prior(1, None)), 1, &[(0, 1)], "all"),
            ("no tally, no attempt", Some(prior(1, None)), 1, &[], "all"),
        ];
        for (name, prior, total, touched, want) in cases {
            let got = match before_of(prior.as_ref(), total, touched) {
                Before::Rows => "nothing",
                Before::Sole(_) => "tally",
                Before::Read => "read",
                Before::Refold => "all",
            };
            assert_eq!(got, want, "{name}");
        }
    }

    /// One-shard histories, each a run's events: `HISTORIES` kinds, `dispatched` first unless
    /// said otherwise.
    const HISTORIES: usize = 15;

    fn one_shard_events(run_id: &str, history: usize) -> Vec<RunEvent> {
        use AttemptOutcome::{Cancelled, Failed, Succeeded, TimedOut};
        let r = krest_schemas::RunRef {
            run_id: run_id.into(),
            job_group: "g".into(),
            job_name: "j".into(),
            app_name: "a".into(),
        };
        let start = |attempt: u32, t: i64| {
            RunEvent::Started(Started {
                run: r.clone(),
                shard: 0,
                shard_total: 1,
                attempt,
                worker: "w".into(),
                at: at(t),
                scheduled_at: Some(at(1)),
                delivery_token: String::new(),
            })
        };
        let end = |attempt: u32, outcome: AttemptOutcome, retry: bool, t: i64| {
            let ok = outcome == Succeeded;
            RunEvent::Finished(Finished {
                run: r.clone(),
                shard: 0,
                shard_total: 1,
                attempt,
                worker: "w".into(),
                at: at(t),
                outcome,
                will_retry: retry,
                retry_in_ms: None,
                output: ok.then(|| format!("o{attempt}/{t}")),
                error: (!ok).then(|| format!("e{attempt}/{t}")),
                duration_ms: 1,
                delivery_token: String::new(),
                started_at: None,
                scheduled_at: None,
            })
        };
        let mut d = events().remove(0);
        if let RunEvent::Dispatched(d) = &mut d {
            d.run = r.clone();
            d.shard_total = 1;
        }
        let mut evs = match history {
            0 => vec![start(1, 10), end(1, Succeeded, false, 20)],
            1 => vec![
                start(1, 10),
                end(1, Failed, true, 20),
                start(2, 30),
                end(2, Succeeded, false, 40),
            ],
            2 => vec![start(1, 10), end(1, Failed, false, 20)],
            3 => vec![start(1, 10), end(1, TimedOut, false, 20)],
            4 => vec![start(1, 10), end(1, Cancelled, false, 20)],
            5 => vec![start(1, 10)],
            // The end recorded before the start.
            6 => vec![end(1, Succeeded, false, 20), start(1, 10)],
            // An attempt that ends twice: the later end wins, either way.
            7 => vec![
                start(1, 10),
                end(1, Succeeded, false, 20),
                end(1, Failed, false, 25),
            ],
            8 => vec![
                start(1, 10),
                end(1, Failed, false, 20),
                end(1, Succeeded, false, 25),
            ],
            // A late success after a final failure (redelivered).
            9 => vec![
                start(1, 10),
                end(1, Failed, false, 20),
                start(2, 30),
                end(2, Succeeded, false, 40),
            ],
            // The first attempt's start redelivered after the second started.
            10 => vec![
                start(1, 10),
                end(1, Failed, true, 20),
                start(2, 30),
                start(1, 10),
                end(2, TimedOut, false, 40),
            ],
            11 => vec![start(1, 10), start(1, 10), end(1, Succeeded, false, 20)],
            12 => vec![start(1, 10), end(1, Failed, true, 20)],
            // The first attempt ends after the second started.
            13 => vec![
                start(1, 10),
                start(2, 30),
                end(1, Failed, false, 20),
                end(2, Succeeded, false, 40),
            ],
            _ => vec![start(1, 10), end(1, Succeeded, false, 20)],
        };
        if history == 14 {
            evs.push(d);
        } else {
            evs.insert(0, d);
        }
        evs
    }

    /// `(status, shards succeeded, shards failed, attempts, started, finished, output, error)`.
    type Summary = (
        String,
        i64,
        i64,
        i64,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<String>,
    );

    /// A run's stored summary, and the summary of all its stored attempts; its stored tally
    /// is the tally of those attempts.
    async fn stored_and_folded(store: &Store, run_id: &str) -> (Summary, Summary) {
        let r = sqlx::query(
            "SELECT shard_total, status, shards_succeeded, shards_failed, attempts, started_at, finished_at, output, error, tally FROM runs WHERE run_id = $1",
        )
        .bind(run_id)
        .fetch_one(&store.pool)
        .await
        .unwrap();
        let stored = (
            r.get("status"),
            r.get("shards_succeeded"),
            r.get("shards_failed"),
            r.get("attempts"),
            r.get("started_at"),
            r.get("finished_at"),
            r.get("output"),
            r.get("error"),
        );
        let rows = sqlx::query(&format!(
            "SELECT {ATTEMPT_FOLD_COLUMNS} FROM attempts WHERE run_id = $1 ORDER BY shard, attempt"
        ))
        .bind(run_id)
        .fetch_all(&store.pool)
        .await
        .unwrap();
        let attempts: Vec<fold::Attempt> = rows.iter().map(|r| attempt_of(r).unwrap()).collect();
        let mut tally = fold::Tally::of(&attempts);
        tally.output = None;
        tally.error = None;
        let stored_tally: String = r.get("tally");
        assert_eq!(
            serde_json::from_str::<fold::Tally>(&stored_tally).unwrap(),
            tally,
            "{run_id}: its tally"
        );
        let f = fold::fold(r.get("shard_total"), &attempts);
        let folded = (
            f.status.as_str().to_string(),
            f.shards_succeeded,
            f.shards_failed,
            f.attempts,
            f.started_at,
            f.finished_at,
            f.output,
            f.error,
        );
        (stored, folded)
    }

    /// The fast path for one-shard runs (`before_of`: nothing read for new runs, the shard's
    /// state from the tally for the others) against recording event by event: many runs in
    /// one batch (more than a chunk of rows), the same histories one event per batch, and
    /// interleaved in batches of 7 (new runs, runs summed up from their tally, runs whose
    /// attempts are read and runs with an attempt ended twice in one batch).
    async fn one_shard_runs_recorded_at_once_or_event_by_event_have_the_same_summary(
        backend: Backend,
    ) {
        let db = Db::new(backend);
        let store = db.open().await;
        let mut seq = 0;
        let mut ended: Vec<String> = Vec::new();
        let mut apply = async |batch: &[RunEvent]| {
            let b = seqd(batch, seq + 1);
            seq += batch.len() as u64;
            let applied = store.apply(&b, seq).await.unwrap();
            ended.extend(applied.ended.into_iter().map(|r| r.run_id));
        };
        let copies = ROWS_PER_INSERT / HISTORIES + 2;
        let mut all = Vec::new();
        for c in 0..copies {
            for h in 0..HISTORIES {
                all.extend(one_shard_events(&format!("g.j.all{c}.{h}"), h));
            }
        }
        apply(&all).await;
        for h in 0..HISTORIES {
            for e in one_shard_events(&format!("g.j.each.{h}"), h) {
                apply(&[e]).await;
            }
        }
        let runs: Vec<Vec<RunEvent>> = (0..HISTORIES)
            .map(|h| one_shard_events(&format!("g.j.mix.{h}"), h))
            .collect();
        let mut mixed = Vec::new();
        for k in 0..runs.iter().map(Vec::len).max().unwrap() {
            mixed.extend(runs.iter().filter_map(|evs| evs.get(k).cloned()));
        }
        for batch in mixed.chunks(7) {
            apply(batch).await;
        }

        for h in 0..HISTORIES {
            let (reference, folded) = stored_and_folded(&store, &format!("g.j.each.{h}")).await;
            assert_eq!(reference, folded, "history {h} event by event");
            let mut ids: Vec<String> = (0..copies).map(|c| format!("g.j.all{c}.{h}")).collect();
            ids.push(format!("g.j.mix.{h}"));
            ids.push(format!("g.j.each.{h}"));
            for id in ids {
                let (stored, folded) = stored_and_folded(&store, &id).await;
                assert_eq!(stored, folded, "{id}: the summary of its attempts");
                assert_eq!(stored, reference, "{id}: as recorded event by event");
                // Reported each time it reached a final status (a late success after a final
                // failure goes through RUNNING when recorded event by event): once at once.
                let reported = ended.iter().filter(|e| **e == id).count();
                let is_final = RunStatus::parse(&stored.0).is_some_and(RunStatus::is_final);
                if id.starts_with("g.j.all") {
                    assert_eq!(reported, usize::from(is_final), "{id}: reported ended");
                } else {
                    assert_eq!(reported > 0, is_final, "{id}: reported ended");
                }
            }
        }
        store.close().await;
    }

    async fn retention_prunes_ended_runs_by_age_and_count_in_batches(backend: Backend) {
        let db = Db::new(backend);
        let store = db.open().await;
        // Runs at 10, 20, … 100 ms of job g.j (dispatched only: pending), and the full run
        // g.j.1000 (ended at 1006, with attempts and logs).
        let mut evs: Vec<RunEvent> = (1..=10).map(|n| dispatched(n * 10)).collect();
        evs.extend(events());
        store.apply(&seqd(&evs, 1), 20).await.unwrap();
        assert_eq!(store.counts().await.unwrap(), (11, 3, 3));
        // Pending runs are never pruned, however old.
        let rule = |ended_before: Option<i64>, keep_runs: Option<u32>| PruneRule {
            ended_before,
            keep_runs,
            scope: PruneScope::Except(&[]),
        };
        // Jobs with their own rules are left to them; another job's rule leaves g.j alone.
        let own = [("g".to_string(), "j".to_string())];
        let others = PruneRule {
            ended_before: Some(i64::MAX),
            keep_runs: Some(1),
            scope: PruneScope::Except(&own),
        };
        assert_eq!(store.prune(&others, 100).await.unwrap(), 0);
        let other_job = PruneRule {
            ended_before: Some(i64::MAX),
            keep_runs: Some(1),
            scope: PruneScope::Job {
                group: "g",
                name: "other",
            },
        };
        assert_eq!(store.prune(&other_job, 100).await.unwrap(), 0);
        assert_eq!(
            store.prune(&rule(Some(i64::MAX), None), 100).await.unwrap(),
            1
        );
        assert_eq!(store.counts().await.unwrap(), (10, 0, 0));
        // End the runs at 10..50 (skipped: final), then keep the newest 7 of the job: the
        // three oldest go, two per batch.
        let skipped: Vec<RunEvent> = (1..=5)
            .map(|n| {
                RunEvent::Skipped(krest_schemas::Skipped {
                    run: krest_schemas::RunRef {
                        run_id: format!("g.j.{:05}", n * 10),
                        job_group: "g".into(),
                        job_name: "j".into(),
                        app_name: "a".into(),
                    },
                    trigger: Trigger::Schedule,
                    scheduled_at: at(n * 10),
                    misfired: 0,
                    revision: 1,
                    node: "n1".into(),
                    epoch: None,
                    reason: "overlap".into(),
                    at: at(n * 10 + 1),
                })
            })
            .collect();
        store.apply(&seqd(&skipped, 21), 25).await.unwrap();
        let seven = PruneRule {
            ended_before: None,
            keep_runs: Some(7),
            scope: PruneScope::Job {
                group: "g",
                name: "j",
            },
        };
        assert_eq!(store.prune(&seven, 2).await.unwrap(), 2);
        assert_eq!(store.prune(&seven, 2).await.unwrap(), 1);
        assert_eq!(store.prune(&seven, 2).await.unwrap(), 0);
        let left: Vec<String> = store
            .list_runs(&RunFilter::default(), 100, None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        assert_eq!(left.len(), 7);
        assert!(left.contains(&"g.j.00040".to_string()), "{left:?}");
        // By age: ended before 45 ms: 40 goes; pending 60..100 stay.
        assert_eq!(store.prune(&rule(Some(45), None), 100).await.unwrap(), 1);
        assert_eq!(store.counts().await.unwrap().0, 6);
        store.close().await;
    }

    /// What the rule deletes, by the unindexed queries retention used before (every run of
    /// the scope ranked at once): the semantics `Store::prune` keeps.
    async fn prunable_by_ranking(store: &Store, rule: &PruneRule<'_>) -> Vec<String> {
        type Row6 = (String, String, String, Option<i64>, String, Option<i64>);
        let mut all: Vec<Row6> = Vec::new();
        for r in sqlx::query(
            "SELECT run_id, job_group, job_name, scheduled_at, status, finished_at FROM runs",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap()
        {
            all.push((
                r.try_get(0).unwrap(),
                r.try_get(1).unwrap(),
                r.try_get(2).unwrap(),
                r.try_get(3).unwrap(),
                r.try_get(4).unwrap(),
                r.try_get(5).unwrap(),
            ));
        }
        let in_scope = |g: &str, n: &str| match rule.scope {
            PruneScope::Job { group, name } => g == group && n == name,
            PruneScope::Except(jobs) => !jobs.contains(&(g.to_string(), n.to_string())),
        };
        let mut out = Vec::new();
        for (id, g, n, sched, status, fin) in &all {
            if !in_scope(g, n) || !PRUNE_ENDED_STATUSES.contains(&status.as_str()) {
                continue;
            }
            let old = rule
                .ended_before
                .is_some_and(|b| fin.or(*sched).is_some_and(|t| t < b));
            // Rank: newest scheduled first (unscheduled last), then run id descending.
            let newer = all
                .iter()
                .filter(|(id2, g2, n2, s2, _, _)| {
                    g2 == g
                        && n2 == n
                        && match (s2, sched) {
                            (Some(a), Some(b)) => a > b || (a == b && id2 > id),
                            (Some(_), None) => true,
                            (None, Some(_)) => false,
                            (None, None) => id2 > id,
                        }
                })
                .count();
            let beyond = rule.keep_runs.is_some_and(|k| newer >= k as usize);
            if old || beyond {
                out.push(id.clone());
            }
        }
        out.sort();
        out
    }

    async fn retention_prunes_what_ranking_every_run_would(backend: Backend) {
        let db = Db::new(backend);
        let store = db.open().await;
        // Three jobs; scheduled times with ties and unscheduled runs; pending and running runs
        // among the ended ones (they count for `keep_runs` but are never deleted).
        let fill = || async {
            sqlx::query("DELETE FROM runs")
                .execute(&store.pool)
                .await
                .unwrap();
            let statuses = [
                "SUCCEEDED",
                "PENDING",
                "SKIPPED",
                "FAILED",
                "RUNNING",
                "CANCELLED",
            ];
            for (j, (group, name)) in [("g", "a"), ("g", "b"), ("h", "c")].iter().enumerate() {
                for i in 0..14i64 {
                    let sched = (i % 5 != 4).then_some(100 + (i / 3) * 10);
                    let status = statuses[(i as usize + j) % statuses.len()];
                    let fin = (status != "SKIPPED" && status != "PENDING" && status != "RUNNING")
                        .then(|| sched.unwrap_or(100) + 5 + i);
                    sqlx::query(
                        "INSERT INTO runs (run_id, job_group, job_name, app_name, scheduled_at, status, finished_at) \
                         VALUES ($1, $2, $3, 'a', $4, $5, $6)",
                    )
                    .bind(format!("{group}.{name}.{i:03}"))
                    .bind(*group)
                    .bind(*name)
                    .bind(sched)
                    .bind(status)
                    .bind(fin)
                    .execute(&store.pool)
                    .await
                    .unwrap();
                }
            }
        };
        let own = [("g".to_string(), "b".to_string())];
        let scopes = [
            PruneScope::Except(&[]),
            PruneScope::Except(&own),
            PruneScope::Job {
                group: "h",
                name: "c",
            },
        ];
        let mut cases = 0;
        for scope in scopes {
            for keep_runs in [
                None,
                Some(0),
                Some(1),
                Some(2),
                Some(3),
                Some(7),
                Some(11),
                Some(50),
            ] {
                for ended_before in [None, Some(0), Some(121), Some(1_000)] {
                    if keep_runs.is_none() && ended_before.is_none() {
                        continue;
                    }
                    let rule = PruneRule {
                        ended_before,
                        keep_runs,
                        scope,
                    };
                    fill().await;
                    let expected = prunable_by_ranking(&store, &rule).await;
                    let before: HashSet<String> =
                        run_ids_in(&store, "runs").await.into_iter().collect();
                    // Batches of 2, each starting where the last full one stopped.
                    let mut from = None;
                    let mut deleted = 0;
                    loop {
                        let n = store.prune_from(&rule, 2, &mut from).await.unwrap();
                        deleted += n;
                        if n < 2 {
                            break;
                        }
                    }
                    let after: HashSet<String> =
                        run_ids_in(&store, "runs").await.into_iter().collect();
                    let mut gone: Vec<String> = before.difference(&after).cloned().collect();
                    gone.sort();
                    assert_eq!(gone, expected, "{rule:?}");
                    assert_eq!(deleted, expected.len() as u64, "{rule:?}");
                    // Nothing left to prune.
                    assert_eq!(store.prune(&rule, 2).await.unwrap(), 0, "{rule:?}");
                    cases += 1;
                }
            }
        }
        assert!(cases > 50);
        store.close().await;
    }

    /// The recorder holds a run's `dispatched` event back (a run dispatched ahead of its
    /// time) while writing the events after it: those are written, and the cursor stays before
    /// the held one until it is written too.
    async fn events_past_one_held_back_are_written_and_the_cursor_waits_for_it(backend: Backend) {
        let db = Db::new(backend);
        let store = db.open().await;
        let evs = events();
        let n = evs.len() as u64;
        // The dispatch (seq 1) held; the rest (2..=n) written with the cursor kept at 0.
        let a = store.apply(&seqd(&evs[1..], 2), 0).await.unwrap();
        assert_eq!(a.cursor, 0);
        assert_eq!(store.cursor().await.unwrap(), 0);
        assert_eq!(
            store.counts().await.unwrap().1,
            3,
            "the attempts are written"
        );
        // Then the dispatch, with the cursor moving past everything.
        store.apply(&seqd(&evs[..1], 1), n).await.unwrap();
        assert_eq!(store.cursor().await.unwrap(), n);
        let d = store.get_run("g.j.1000").await.unwrap().unwrap();
        assert_eq!(d.run.status, RunStatus::Succeeded);
        assert_eq!(d.run.trigger, Some(Trigger::Schedule));
        assert_eq!(d.args, Some(serde_json::json!(["x", "y"])));
    }

    async fn replaying_events_creates_no_duplicates_in_any_order(backend: Backend) {
        let db = Db::new(backend);
        let store = db.open().await;
        assert_eq!(store.backend(), backend);
        let evs = events();
        // Finished before Started, the run's events before its dispatch: order does not matter.
        let mut reversed = evs.clone();
        reversed.reverse();
        store.apply(&seqd(&reversed[..5], 1), 5).await.unwrap();
        store.apply(&seqd(&evs, 6), 15).await.unwrap();
        // A replay at or below the cursor is skipped; the same content again is harmless.
        let replayed = store.apply(&seqd(&evs, 6), 15).await.unwrap();
        assert!(replayed.ended.is_empty());
        assert_eq!(replayed.cursor, 15);
        store.apply(&seqd(&evs, 16), 25).await.unwrap();
        assert_eq!(store.counts().await.unwrap(), (1, 3, 3));
        assert_eq!(store.cursor().await.unwrap(), 25);
        // The cursor never moves back.
        store.apply(&[], 3).await.unwrap();
        assert_eq!(store.cursor().await.unwrap(), 25);
        let d = store.get_run("g.j.1000").await.unwrap().unwrap();
        assert_eq!(d.run.status, RunStatus::Succeeded);
        assert_eq!(
            (d.run.shards_succeeded, d.run.shards_failed, d.run.attempts),
            (2, 0, 2)
        );
        assert_eq!(d.run.trigger, Some(Trigger::Schedule));
        assert_eq!(d.run.finished_at, Some(at(1006)));
        assert_eq!(d.run.epoch, Some(7));
        assert_eq!(d.run.revision, Some(3));
        assert_eq!(d.args, Some(serde_json::json!(["x", "y"])));
        assert_eq!(d.attempts.len(), 3);
        assert_eq!(d.attempts[1].status, AttemptStatus::Failed);
        assert!(d.attempts[1].will_retry);
        assert!(!d.attempts[2].will_retry);
        assert_eq!(d.attempts[2].logs[0].line, "shard 1 attempt 2");
        let listed = store
            .list_runs(
                &RunFilter {
                    job: Some(("j", Some("g"))),
                    status: Some(RunStatus::Succeeded),
                    ..RunFilter::default()
                },
                10,
                None,
            )
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert!(store
            .list_runs(
                &RunFilter {
                    job: Some(("j", Some("other"))),
                    ..RunFilter::default()
                },
                10,
                None,
            )
            .await
            .unwrap()
            .is_empty());
        // Paged reads of one run.
        let from = RunStart {
            shard: 1,
            attempt: 1,
            seq: 0,
        };
        assert_eq!(store.left_from("g.j.1000", from).await.unwrap(), (2, 2));
        let lines = store
            .logs_between("g.j.1000", from, (1, 1), 10)
            .await
            .unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].2.line, "shard 1 attempt 1");
        assert_eq!(
            store
                .attempts_from("g.j.1000", (1, 2), 10)
                .await
                .unwrap()
                .len(),
            1
        );
        store.probe_write().await.unwrap();
        store.close().await;
    }

    async fn a_final_failure_of_one_shard_fails_the_run_once_all_shards_end(backend: Backend) {
        let db = Db::new(backend);
        let store = db.open().await;
        let mut evs = events();
        // Make shard 1's failure final and drop its retry.
        evs.truncate(7);
        if let Some(RunEvent::Finished(f)) = evs.last_mut() {
            f.will_retry = false;
        }
        let applied = store.apply(&seqd(&evs, 1), 7).await.unwrap();
        assert_eq!(applied.ended.len(), 1);
        assert_eq!(applied.cursor, 7);
        let d = store.get_run("g.j.1000").await.unwrap().unwrap();
        assert_eq!(d.run.status, RunStatus::Failed);
        assert_eq!(d.run.error.as_deref(), Some("oops"));
        assert_eq!((d.run.shards_succeeded, d.run.shards_failed), (1, 1));
        assert_eq!(store.active_runs("g", "j").await.unwrap(), vec![]);
        store.close().await;
    }

    /// Attempt events of a run that exists with its scheduled time leave the run's row (and
    /// the five indexes holding `scheduled_at`) alone; one that brings the scheduled time a
    /// run lacked still writes it. SQLite only: the test counts writes with a trigger.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attempt_events_do_not_rewrite_a_run_they_do_not_change() {
        let db = Db::new(Backend::Sqlite);
        let store = db.open().await;
        let evs = events();
        store.apply(&seqd(&evs[..1], 1), 1).await.unwrap();
        for sql in [
            "CREATE TABLE rewrites (n BIGINT NOT NULL)",
            "INSERT INTO rewrites (n) VALUES (0)",
            "CREATE TRIGGER count_rewrites AFTER UPDATE OF scheduled_at ON runs \
             BEGIN UPDATE rewrites SET n = n + 1; END",
        ] {
            sqlx::query(sql).execute(&store.pool).await.unwrap();
        }
        let rewrites = || async {
            sqlx::query_scalar::<_, i64>("SELECT n FROM rewrites")
                .fetch_one(&store.pool)
                .await
                .unwrap()
        };
        // The attempts one batch each, then all of them again (redelivered) in one.
        for (i, e) in evs.iter().enumerate().skip(1) {
            let seq = i as u64 + 1;
            store.apply(&[(seq, e.clone())], seq).await.unwrap();
        }
        let last = evs.len() as u64;
        store
            .apply(&seqd(&evs[1..], last + 1), 2 * last - 1)
            .await
            .unwrap();
        assert_eq!(rewrites().await, 0, "attempt events rewrote the run");
        let d = store.get_run("g.j.1000").await.unwrap().unwrap();
        assert_eq!(d.run.status, RunStatus::Succeeded);
        assert_eq!(d.run.shards_succeeded, 2);
        assert_eq!(d.run.scheduled_at, Some(at(1000)));

        // A run first seen by an attempt that did not tell its scheduled time: the end that
        // tells it is written.
        let mut started = dispatched(-7);
        let RunEvent::Started(s) = &mut started else {
            panic!("dispatched(-7) is a started event")
        };
        let run = s.run.clone();
        let mut seq = 2 * last;
        store.apply(&[(seq, started)], seq).await.unwrap();
        seq += 1;
        let finished = RunEvent::Finished(Finished {
            run: run.clone(),
            shard: 0,
            shard_total: 1,
            attempt: 1,
            worker: "w".into(),
            at: at(9),
            outcome: AttemptOutcome::Succeeded,
            will_retry: false,
            retry_in_ms: None,
            output: None,
            error: None,
            duration_ms: 1,
            delivery_token: String::new(),
            started_at: None,
            scheduled_at: Some(at(7)),
        });
        store.apply(&[(seq, finished)], seq).await.unwrap();
        assert_eq!(rewrites().await, 1);
        let d = store.get_run(&run.run_id).await.unwrap().unwrap();
        assert_eq!(d.run.scheduled_at, Some(at(7)));
        assert_eq!(d.run.status, RunStatus::Succeeded);
        store.close().await;
    }

    /// A run's `dispatched` and `finished` in one batch insert the run once, with its final
    /// status: the row (and the indexes holding its status) is not updated after. Apart, the
    /// run is inserted, then updated once by its end. A redelivered pair rewrites nothing and
    /// ends nothing again. SQLite only: the test counts writes with triggers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_dispatched_and_finished_in_one_batch_is_written_once() {
        let db = Db::new(Backend::Sqlite);
        let store = db.open().await;
        for sql in [
            "CREATE TABLE writes (kind TEXT NOT NULL, run_id TEXT NOT NULL)",
            "CREATE TRIGGER count_inserts AFTER INSERT ON runs \
             BEGIN INSERT INTO writes (kind, run_id) VALUES ('insert', new.run_id); END",
            "CREATE TRIGGER count_updates AFTER UPDATE ON runs \
             BEGIN INSERT INTO writes (kind, run_id) VALUES ('update', new.run_id); END",
        ] {
            sqlx::query(sql).execute(&store.pool).await.unwrap();
        }
        let writes = |run: &'static str| {
            let pool = store.pool.clone();
            async move {
                sqlx::query_scalar::<_, String>(
                    "SELECT kind FROM writes WHERE run_id = $1 ORDER BY rowid",
                )
                .bind(run)
                .fetch_all(&pool)
                .await
                .unwrap()
            }
        };
        let finished = |n: i64| {
            let RunEvent::Dispatched(d) = dispatched(n) else {
                panic!("dispatched({n}) is a dispatched event")
            };
            RunEvent::Finished(Finished {
                run: d.run,
                shard: 0,
                shard_total: 1,
                attempt: 1,
                worker: "w".into(),
                at: at(n + 5),
                outcome: AttemptOutcome::Succeeded,
                will_retry: false,
                retry_in_ms: None,
                output: Some("ok".into()),
                error: None,
                duration_ms: 3,
                delivery_token: String::new(),
                started_at: Some(at(n + 2)),
                scheduled_at: Some(at(n)),
            })
        };

        let together = [dispatched(10), finished(10)];
        let applied = store.apply(&seqd(&together, 1), 2).await.unwrap();
        assert_eq!(writes("g.j.00010").await, ["insert"]);
        assert_eq!(applied.ended.len(), 1, "the run's end is reported");
        let run = &applied.ended[0];
        assert_eq!(
            (
                run.run_id.as_str(),
                run.status,
                run.attempts,
                run.shards_succeeded
            ),
            ("g.j.00010", RunStatus::Succeeded, 1, 1)
        );
        assert_eq!(
            (run.started_at, run.finished_at),
            (Some(at(12)), Some(at(15)))
        );
        assert_eq!(run.dispatched_at, Some(at(10)));

        let applied = store.apply(&seqd(&[dispatched(20)], 3), 3).await.unwrap();
        assert!(applied.ended.is_empty());
        assert_eq!(writes("g.j.00020").await, ["insert"]);
        let d = store.get_run("g.j.00020").await.unwrap().unwrap();
        assert_eq!(d.run.status, RunStatus::Pending);
        let applied = store.apply(&seqd(&[finished(20)], 4), 4).await.unwrap();
        assert_eq!(applied.ended.len(), 1);
        assert_eq!(writes("g.j.00020").await, ["insert", "update"]);

        // Delivered again (a crash before the cursor moved): the run exists and is final.
        let applied = store.apply(&seqd(&together, 5), 6).await.unwrap();
        assert!(applied.ended.is_empty(), "ended once");
        let d = store.get_run("g.j.00010").await.unwrap().unwrap();
        assert_eq!(d.run.status, RunStatus::Succeeded);
        assert_eq!(d.run.finished_at, Some(at(15)));
        assert_eq!(d.attempts.len(), 1);
        assert_eq!(d.attempts[0].output.as_deref(), Some("ok"));
        store.close().await;
    }

    /// A dispatched event of run `g.j.<n>` scheduled at `n` ms (or a started one without a
    /// scheduled time when `n` is negative).
    fn dispatched(n: i64) -> RunEvent {
        let run = krest_schemas::RunRef {
            run_id: format!("g.j.{:05}", n.abs()),
            job_group: "g".into(),
            job_name: "j".into(),
            app_name: "a".into(),
        };
        if n < 0 {
            return RunEvent::Started(Started {
                run,
                shard: 0,
                shard_total: 1,
                attempt: 1,
                worker: "w".into(),
                at: at(1),
                scheduled_at: None,
                delivery_token: String::new(),
            });
        }
        RunEvent::Dispatched(Dispatched {
            run,
            path: "p".into(),
            job_type: JobType::Normal,
            trigger: Trigger::Manual,
            scheduled_at: at(n),
            dispatched_at: at(n),
            shard_total: 1,
            args: serde_json::json!(null),
            misfired: 0,
            parent_run_id: None,
            revision: 1,
            node: "n1".into(),
            epoch: None,
        })
    }

    /// A statement made for a batch (its text changes with the batch's size) is not kept in
    /// the connection's statement cache; one of fixed text is. Before, every size of every
    /// multi-row statement was kept, up to 100 per connection: a leader recording 1,700 runs a
    /// second held 40–50 MiB of them in SQLite's heap within 40 s (BENCHMARKS.md, "1,000,000
    /// registered jobs on one leader"). (sqlx's `Any` connections do not report their cache.)
    #[test]
    fn statements_made_for_a_batch_are_not_cached() {
        let sql = format!(
            "SELECT run_id FROM runs WHERE run_id IN ({})",
            list_placeholders(Backend::Sqlite, 3)
        );
        let vals = vec![Val::from("a"), Val::from("b"), Val::from("c")];
        let q = batch_query(&sql, vals.clone());
        assert!(
            !sqlx::Execute::persistent(&q),
            "a batch's statement is prepared for its batch only"
        );
        let fixed = bind_all(
            sqlx::query("SELECT run_id FROM runs WHERE run_id IN (?, ?, ?)"),
            vals,
        );
        assert!(
            sqlx::Execute::persistent(&fixed),
            "fixed statements stay cached"
        );
    }

    async fn runs_page_newest_first_with_unscheduled_runs_last(backend: Backend) {
        let db = Db::new(backend);
        let store = db.open().await;
        // Two runs share a scheduled time (ordered by id), two have none (last, by id).
        let mut evs: Vec<RunEvent> = (1..=5).map(|n| dispatched(n * 10)).collect();
        evs.push(dispatched(6));
        if let RunEvent::Dispatched(d) = &mut evs[5] {
            d.run.run_id = "g.j.00050b".into();
            d.scheduled_at = at(50);
        }
        evs.push(dispatched(-7));
        evs.push(dispatched(-8));
        store.apply(&seqd(&evs, 1), 8).await.unwrap();
        let mut seen = Vec::new();
        let mut start = None;
        loop {
            let page = store
                .list_runs(&RunFilter::default(), 3, start.clone())
                .await
                .unwrap();
            let more = page.len() == 3;
            for r in &page {
                seen.push(r.run_id.clone());
            }
            let Some(last) = page.last() else { break };
            // The next page starts at the last one (inclusive): drop it from the next read.
            seen.pop();
            start = Some((last.scheduled_at.map(ms), last.run_id.clone()));
            if !more {
                seen.push(last.run_id.clone());
                break;
            }
        }
        assert_eq!(
            seen,
            [
                "g.j.00050b",
                "g.j.00050",
                "g.j.00040",
                "g.j.00030",
                "g.j.00020",
                "g.j.00010",
                "g.j.00008",
                "g.j.00007"
            ]
        );
        // The same order for a job's newest run; counts only of scheduled runs, statuses
        // without runs left out.
        let (last, ended) = store.job_runs_ended("g", "j", 10).await.unwrap();
        assert_eq!(last.unwrap().run_id, "g.j.00050b");
        assert!(ended.is_empty());
        assert_eq!(
            store.run_counts_since(0).await.unwrap(),
            [("PENDING".to_string(), 6)]
        );
        assert_eq!(store.run_counts_since(ms(at(41))).await.unwrap().len(), 1);
        assert!(store.run_counts_since(ms(at(51))).await.unwrap().is_empty());
        store.close().await;
    }

    async fn stores_sharing_a_database_apply_each_event_once(backend: Backend) {
        let db = Db::new(backend);
        let a = db.open().await;
        let b = db.open().await;
        // 200 runs, each dispatched, started and finished: 600 events, read by both "nodes"
        // in batches of different sizes, concurrently.
        let mut evs = Vec::new();
        for n in 1..=200 {
            let RunEvent::Dispatched(d) = dispatched(n) else {
                unreachable!()
            };
            let run = d.run.clone();
            evs.push(RunEvent::Dispatched(d));
            evs.push(RunEvent::Started(Started {
                run: run.clone(),
                shard: 0,
                shard_total: 1,
                attempt: 1,
                worker: "w".into(),
                at: at(n + 1),
                scheduled_at: Some(at(n)),
                delivery_token: String::new(),
            }));
            evs.push(RunEvent::Finished(Finished {
                run,
                shard: 0,
                shard_total: 1,
                attempt: 1,
                worker: "w".into(),
                at: at(n + 2),
                outcome: AttemptOutcome::Succeeded,
                will_retry: false,
                retry_in_ms: None,
                output: Some("ok".into()),
                error: None,
                duration_ms: 1,
                delivery_token: String::new(),
                started_at: None,
                scheduled_at: None,
            }));
        }
        let all = seqd(&evs, 1);
        let record = |store: Store, size: usize, all: Vec<(u64, RunEvent)>| {
            tokio::spawn(async move {
                let mut ended = Vec::new();
                for batch in all.chunks(size) {
                    let last = batch.last().unwrap().0;
                    ended.extend(store.apply(batch, last).await.unwrap().ended);
                }
                ended
            })
        };
        let ta = record(a.clone(), 7, all.clone());
        let tb = record(b.clone(), 11, all.clone());
        let mut ended: Vec<String> = ta.await.unwrap().into_iter().map(|r| r.run_id).collect();
        ended.extend(tb.await.unwrap().into_iter().map(|r| r.run_id));
        ended.sort();
        let before = ended.len();
        ended.dedup();
        assert_eq!(
            before, 200,
            "each run's end reported once across both stores"
        );
        assert_eq!(ended.len(), 200);
        assert_eq!(a.counts().await.unwrap(), (200, 200, 0));
        assert_eq!(b.cursor().await.unwrap(), 600);
        let runs = a
            .list_runs(&RunFilter::default(), 1000, None)
            .await
            .unwrap();
        assert!(runs
            .iter()
            .all(|r| r.status == RunStatus::Succeeded && r.attempts == 1));
        a.close().await;
        b.close().await;
    }

    async fn reopening_migrates_once_and_keeps_the_cursor(backend: Backend) {
        let db = Db::new(backend);
        // Two stores opening a fresh database at once migrate it once.
        let url = db.url();
        let (a, b) = tokio::join!(Store::open(&url), Store::open(&url));
        let (a, b) = (a.unwrap(), b.unwrap());
        a.apply(&seqd(&events(), 1), 10).await.unwrap();
        a.close().await;
        b.close().await;
        let again = db.open().await;
        assert_eq!(again.cursor().await.unwrap(), 10);
        let versions: i64 = sqlx::query("SELECT COUNT(*) FROM krest_migrations")
            .fetch_one(&again.pool)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(versions, i64::try_from(MIGRATIONS.len()).unwrap());
        again.close().await;
    }

    #[tokio::test]
    async fn a_database_that_cannot_be_opened_is_named_with_what_to_check() {
        // Nothing listens on port 1.
        let e = Store::open("postgres://krest:s3cret@127.0.0.1:1/krest")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot open the database at postgres://<redacted>@127.0.0.1:1/krest: "),
            "{e}"
        );
        assert!(e.contains("check that PostgreSQL runs"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let e = Store::open("postgres://127.0.0.1/krest?password=s3cret&port=1")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("password=<redacted>&port=1"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        // A database that does not exist on a server that runs.
        let server = krest_test_support::postgres_server_url();
        let missing = format!("{}/krest_no_such_db", server.rsplit_once('/').unwrap().0);
        let e = Store::open(&missing).await.unwrap_err().to_string();
        assert!(e.contains("the database does not exist"), "{e}");
        // A SQLite file in a directory that does not exist.
        let dir = tempfile::tempdir().unwrap();
        let e = Store::open(&format!("sqlite://{}/no/t.db", dir.path().display()))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("directory exists"), "{e}");
        let e = Store::open("mysql://u:s3cret@h/db")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unsupported database URL `mysql://<redacted>@h/db`"),
            "{e}"
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            normalize_url("sqlite://krest.db").unwrap().1,
            "sqlite://krest.db?mode=rwc"
        );
        assert_eq!(
            normalize_url("/tmp/x.db").unwrap().1,
            "sqlite:///tmp/x.db?mode=rwc"
        );
        assert_eq!(
            normalize_url("postgresql://u@h/db").unwrap(),
            (Backend::Postgres, "postgresql://u@h/db".to_string())
        );
        assert!(normalize_url("mysql://x").is_err());
        assert!(normalize_url("postgres://h:notaport/db").is_err());
        assert_eq!(placeholders(Backend::Postgres, 2, 2), "($1,$2),($3,$4)");
        assert_eq!(placeholders(Backend::Sqlite, 2, 2), "(?,?),(?,?)");
        assert_eq!(list_placeholders(Backend::Postgres, 3), "$1,$2,$3");
        assert_eq!(list_placeholders(Backend::Sqlite, 3), "?,?,?");
    }
}
