//! Run queries at scale: the store functions behind `runs list` (by job, app, status, time
//! range, combined; first page and a deep cursor page), `job stats`, the dashboard's run
//! counts and `runs get`, timed against `KREST_BENCH_N` runs (default 10,000,000) in a fresh
//! SQLite file and a fresh Postgres database. Run with `cargo bench -p krest --bench queries`;
//! results go into BENCHMARKS.md.
//!
//! The runs are inserted in bulk by the database itself (a recursive CTE on SQLite,
//! `generate_series` on Postgres; the recorder is not involved) with the secondary indexes of
//! the migrations dropped during the fill and rebuilt afterwards (their build time is what a
//! migration adding one costs at that size). They are spread over 1,000 jobs in 20 groups, 50
//! apps, every status (96 % succeeded, 1 % failed, …, a few pending) and a year of scheduled
//! times; one run in 100,000 has no scheduled time (the recorder saw its start before its
//! dispatch). Each query runs 5 times (once if it takes over a second); the table shows the
//! median. A query slower than 50 ms has its plan printed (`EXPLAIN QUERY PLAN` / `EXPLAIN`).
//! Retention passes are timed too (`Store::prune` with nothing to prune: what each pass costs).
//!
//! Up to 100,000 runs every answer is also checked against the generator (filters, order, the
//! cursor's run first, totals), so CI runs this at a tiny size (`KREST_BENCH_TINY=1`, 1,000 runs, with every benchmark
//! in scripts/test.sh) and it cannot rot. Postgres is the server of `$KREST_TEST_POSTGRES`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use krest::record::store::{Backend, Explain, PruneRule, PruneScope, RunFilter, Store};
use krest_schemas::api::{RunStatus, RunSummary};
use krest_test_support::{PgDatabase, TestDir};
use sqlx::{Connection, Row};

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;
const YEAR_MS: i64 = 365 * 24 * 3_600_000;
const JOBS: i64 = 1_000;
const GROUPS: i64 = 20;
const APPS: i64 = 50;
/// Every this many runs, one has no scheduled time.
const UNSCHEDULED_EVERY: i64 = 100_000;
/// Runs inserted per statement.
const CHUNK: i64 = 500_000;
/// What a query may take before its plan is printed.
const SLOW: Duration = Duration::from_millis(50);
const REPEAT: usize = 5;
/// The API's default page (20) plus the one run that becomes the `next` cursor.
const PAGE: u32 = 21;

/// The generator, in Rust: what run `i` is.
#[derive(Debug, Clone, Copy)]
struct Gen {
    n: i64,
    step: i64,
}

impl Gen {
    fn new(n: i64) -> Gen {
        Gen {
            n,
            step: (YEAR_MS / n).max(1),
        }
    }
    fn job(i: i64) -> i64 {
        i % JOBS
    }
    fn group(i: i64) -> String {
        format!("g{}", Self::job(i) % GROUPS)
    }
    fn name(i: i64) -> String {
        format!("job{}", Self::job(i))
    }
    fn time(&self, i: i64) -> i64 {
        T0 + i * self.step
    }
    fn scheduled(&self, i: i64) -> Option<i64> {
        (i % UNSCHEDULED_EVERY != UNSCHEDULED_EVERY - 1).then(|| self.time(i))
    }
    fn run_id(&self, i: i64) -> String {
        format!("{}.{}.{}", Self::group(i), Self::name(i), self.time(i))
    }
    fn status(i: i64) -> &'static str {
        if i % 100 == 0 {
            "FAILED"
        } else if i % 250 == 1 {
            "TIMED_OUT"
        } else if i % 500 == 2 {
            "CANCELLED"
        } else if i % 700 == 3 {
            "SKIPPED"
        } else if i % 10_000 == 4 {
            "RUNNING"
        } else if i % 20_000 == 5 {
            "PENDING"
        } else {
            "SUCCEEDED"
        }
    }
    /// The same as SQL over an integer column `i` (valid on both backends).
    fn select_sql(&self) -> String {
        let time = format!("({T0} + i * {})", self.step);
        let sched = format!(
            "CASE WHEN i % {UNSCHEDULED_EVERY} = {} THEN NULL ELSE {time} END",
            UNSCHEDULED_EVERY - 1
        );
        let group = format!("('g' || ((i % {JOBS}) % {GROUPS}))");
        let name = format!("('job' || (i % {JOBS}))");
        let status = "CASE WHEN i % 100 = 0 THEN 'FAILED' WHEN i % 250 = 1 THEN 'TIMED_OUT' \
             WHEN i % 500 = 2 THEN 'CANCELLED' WHEN i % 700 = 3 THEN 'SKIPPED' \
             WHEN i % 10000 = 4 THEN 'RUNNING' WHEN i % 20000 = 5 THEN 'PENDING' \
             ELSE 'SUCCEEDED' END";
        format!(
            "SELECT {group} || '.' || {name} || '.' || {time}, {group}, {name}, \
             ('app' || ((i % {JOBS}) % {APPS})), 'bench.handler', 'NORMAL', 'SCHEDULE', \
             {sched}, {sched}, 1, 'bench-node', {status}, \
             CASE WHEN i % 20000 = 5 THEN 0 ELSE 1 END, \
             CASE WHEN i % 20000 = 5 THEN NULL ELSE {time} + 2 END, \
             CASE WHEN i % 20000 = 5 OR i % 10000 = 4 THEN NULL ELSE {time} + 20 + i % 1000 END, \
             CASE WHEN i % 100 = 0 THEN 'boom' END"
        )
    }
}

const INSERT: &str = "INSERT INTO runs (run_id, job_group, job_name, app_name, path, job_type, \
    trigger_kind, scheduled_at, dispatched_at, revision, node, status, attempts, started_at, \
    finished_at, error) ";

async fn exec(c: &mut sqlx::AnyConnection, sql: &str) {
    sqlx::query(sql)
        .execute(&mut *c)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Fills the runs table of the (migrated) database at `url` with `g.n` runs: secondary
/// indexes dropped, rows inserted, indexes rebuilt. Prints the times.
async fn fill(backend: Backend, url: &str, g: Gen) {
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(url).await.unwrap();
    let indexes: Vec<(String, String)> = match backend {
        Backend::Sqlite => {
            exec(&mut c, "PRAGMA synchronous = OFF").await;
            exec(&mut c, "PRAGMA cache_size = -262144").await;
            sqlx::query("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs' AND sql IS NOT NULL")
        }
        Backend::Postgres => {
            exec(&mut c, "SET maintenance_work_mem = '512MB'").await;
            sqlx::query("SELECT indexname::text, indexdef::text FROM pg_indexes WHERE tablename = 'runs' AND indexname <> 'runs_pkey'")
        }
    }
    .fetch_all(&mut c)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    for (name, _) in &indexes {
        exec(&mut c, &format!("DROP INDEX {name}")).await;
    }
    let start = Instant::now();
    let select = g.select_sql();
    let mut lo = 0;
    while lo < g.n {
        let hi = (lo + CHUNK).min(g.n) - 1;
        let sql = match backend {
            Backend::Sqlite => format!(
                "WITH RECURSIVE s(i) AS (SELECT {lo} UNION ALL SELECT i + 1 FROM s WHERE i < {hi}) {INSERT} {select} FROM s"
            ),
            Backend::Postgres => format!(
                "{INSERT} {select} FROM generate_series({lo}::bigint, {hi}::bigint) AS s(i)"
            ),
        };
        exec(&mut c, &sql).await;
        lo = hi + 1;
        if g.n >= 10 * CHUNK {
            eprintln!(
                "  {}: {lo} runs in {:.0} s",
                backend.as_str(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "{}: {} runs inserted in {:.1} s",
        backend.as_str(),
        g.n,
        start.elapsed().as_secs_f64()
    );
    for (name, sql) in &indexes {
        let start = Instant::now();
        exec(&mut c, sql).await;
        println!(
            "{}: index {name} built in {:.1} s",
            backend.as_str(),
            start.elapsed().as_secs_f64()
        );
    }
    if backend == Backend::Postgres {
        // What autovacuum does on a live database: statistics, and the visibility map
        // (without it an index-only scan reads every row's page, e.g. retention's walk
        // through `runs_by_job`: 15 ms instead of 0.3 ms per job of 1,000 runs).
        exec(&mut c, "VACUUM ANALYZE runs").await;
    }
    c.close().await.unwrap();
}

/// One timed query: its name and how to run it; `check` verifies its answer.
struct Case {
    name: String,
    query: Query,
}

enum Query {
    List {
        filter: RunFilter<'static>,
        start: Option<(Option<i64>, String)>,
        /// What run `i` must be to be listed.
        matches: Box<dyn Fn(i64) -> bool>,
    },
    JobStats {
        recent: u32,
    },
    Counts {
        since_ms: i64,
    },
    Head {
        run_id: String,
    },
    /// Retention with nothing to prune: what every pass costs.
    Prune {
        ended_before: Option<i64>,
        keep_runs: Option<u32>,
    },
}

/// The first run at or after `from` (going to older runs from there is what a deep page does)
/// that `matches`, with a scheduled time: the cursor of a page that starts with it.
/// `None` when no run qualifies (a tiny `KREST_BENCH_N`).
fn deep_cursor(g: Gen, from: i64, matches: &dyn Fn(i64) -> bool) -> Option<(Option<i64>, String)> {
    let i = (0..=from)
        .rev()
        .find(|&i| matches(i) && g.scheduled(i).is_some())?;
    Some((g.scheduled(i), g.run_id(i)))
}

fn cases(g: Gen) -> Vec<Case> {
    let mid = g.n / 2;
    // A week around the middle of the year (scaled down with the runs).
    let week = (7 * 24 * 3_600_000).min(YEAR_MS / 10);
    let (since, until) = (g.time(mid) - week / 2, g.time(mid) + week / 2);
    let last = g.time(g.n - 1);
    let mut out = Vec::new();
    // (name, filter, which runs it lists, where its deep page starts)
    type Pred = fn(Gen, i64, (i64, i64)) -> bool;
    let specs: Vec<(&str, RunFilter<'static>, Pred, i64)> = vec![
        ("all runs", RunFilter::default(), |_, _, _| true, mid),
        (
            "by job",
            RunFilter {
                job: Some(("job7", Some("g7"))),
                ..RunFilter::default()
            },
            |_, i, _| Gen::job(i) == 7,
            mid,
        ),
        (
            "by app",
            RunFilter {
                app: Some("app7"),
                ..RunFilter::default()
            },
            |_, i, _| Gen::job(i) % APPS == 7,
            mid,
        ),
        (
            "status FAILED (1 %)",
            RunFilter {
                status: Some(RunStatus::Failed),
                ..RunFilter::default()
            },
            |_, i, _| Gen::status(i) == "FAILED",
            mid,
        ),
        (
            "status SUCCEEDED (96 %)",
            RunFilter {
                status: Some(RunStatus::Succeeded),
                ..RunFilter::default()
            },
            |_, i, _| Gen::status(i) == "SUCCEEDED",
            mid,
        ),
        (
            "status PENDING (0.005 %)",
            RunFilter {
                status: Some(RunStatus::Pending),
                ..RunFilter::default()
            },
            |_, i, _| Gen::status(i) == "PENDING",
            mid,
        ),
        (
            "job and status FAILED",
            RunFilter {
                job: Some(("job100", Some("g0"))),
                status: Some(RunStatus::Failed),
                ..RunFilter::default()
            },
            |_, i, _| Gen::job(i) == 100 && Gen::status(i) == "FAILED",
            mid,
        ),
        (
            "job and status PENDING",
            RunFilter {
                job: Some(("job5", Some("g5"))),
                status: Some(RunStatus::Pending),
                ..RunFilter::default()
            },
            |_, i, _| Gen::job(i) == 5 && Gen::status(i) == "PENDING",
            mid,
        ),
        (
            "app and status PENDING",
            RunFilter {
                app: Some("app5"),
                status: Some(RunStatus::Pending),
                ..RunFilter::default()
            },
            |_, i, _| Gen::job(i) % APPS == 5 && Gen::status(i) == "PENDING",
            mid,
        ),
        (
            "app and status FAILED",
            RunFilter {
                app: Some("app0"),
                status: Some(RunStatus::Failed),
                ..RunFilter::default()
            },
            |_, i, _| Gen::job(i) % APPS == 0 && Gen::status(i) == "FAILED",
            mid,
        ),
        (
            "time range (a week)",
            RunFilter {
                since_ms: Some(since),
                until_ms: Some(until),
                ..RunFilter::default()
            },
            |g, i, (since, until)| g.scheduled(i).is_some_and(|t| t >= since && t < until),
            mid,
        ),
        (
            "job and time range",
            RunFilter {
                job: Some(("job7", Some("g7"))),
                since_ms: Some(since),
                until_ms: Some(until),
                ..RunFilter::default()
            },
            |g, i, (since, until)| {
                Gen::job(i) == 7 && g.scheduled(i).is_some_and(|t| t >= since && t < until)
            },
            mid,
        ),
        (
            "job by bare name (a deleted job's)",
            RunFilter {
                job: Some(("job7", None)),
                ..RunFilter::default()
            },
            |_, i, _| Gen::job(i) == 7,
            mid,
        ),
    ];
    for (name, filter, pred, from) in specs {
        let range = (since, until);
        let deep = deep_cursor(g, from, &|i| pred(g, i, range));
        for start in [None].into_iter().chain(deep.map(Some)) {
            out.push(Case {
                name: format!(
                    "runs list, {name}, {}",
                    if start.is_some() {
                        "deep page"
                    } else {
                        "first page"
                    }
                ),
                query: Query::List {
                    filter: filter.clone(),
                    start,
                    matches: Box::new(move |i| pred(g, i, range)),
                },
            });
        }
    }
    for recent in [100, 10_000] {
        out.push(Case {
            name: format!("job stats, newest run and {recent} ended runs"),
            query: Query::JobStats { recent },
        });
    }
    for (what, back) in [("an hour", 3_600_000), ("a day", 86_400_000)] {
        out.push(Case {
            name: format!("run counts since {what} ago"),
            query: Query::Counts {
                since_ms: last - back,
            },
        });
    }
    out.push(Case {
        name: "retention, nothing ended before the first run".into(),
        query: Query::Prune {
            ended_before: Some(T0),
            keep_runs: None,
        },
    });
    out.push(Case {
        name: "retention, keep 1,000,000 runs per job".into(),
        query: Query::Prune {
            ended_before: None,
            keep_runs: Some(1_000_000),
        },
    });
    out.push(Case {
        name: "runs get (the run's row)".into(),
        query: Query::Head {
            run_id: g.run_id(mid),
        },
    });
    out
}

/// Checks a listing: every run matches, newest first (unscheduled last), a full page when
/// there are enough runs, the cursor's run first.
fn check_list(
    g: Gen,
    case: &str,
    runs: &[RunSummary],
    start: &Option<(Option<i64>, String)>,
    matches: &dyn Fn(i64) -> bool,
) {
    let index = |r: &RunSummary| -> i64 {
        let t: i64 = r.run_id.rsplit('.').next().unwrap().parse().unwrap();
        (t - T0) / g.step
    };
    let mut expected: Vec<i64> = (0..g.n).filter(|&i| matches(i)).collect();
    // Newest first by (scheduled, run id), then the unscheduled by run id.
    expected.sort_by(|&a, &b| {
        let key = |i: i64| (g.scheduled(i).is_some(), g.scheduled(i), g.run_id(i));
        key(b).cmp(&key(a))
    });
    if let Some((_, id)) = start {
        let at = expected
            .iter()
            .position(|&i| g.run_id(i) == *id)
            .unwrap_or_else(|| panic!("{case}: cursor run {id} not among the expected"));
        expected.drain(..at);
    }
    expected.truncate(PAGE as usize);
    let got: Vec<i64> = runs.iter().map(index).collect();
    assert_eq!(got, expected, "{case}");
}

async fn run_case(store: &Store, g: Gen, case: &Case, check: bool) -> Duration {
    let mut times = Vec::with_capacity(REPEAT);
    // A query that takes seconds is timed once.
    while times.len() < REPEAT && times.first().is_none_or(|t| *t < Duration::from_secs(1)) {
        let t = Instant::now();
        match &case.query {
            Query::List {
                filter,
                start,
                matches,
            } => {
                let runs = store.list_runs(filter, PAGE, start.clone()).await.unwrap();
                times.push(t.elapsed());
                if check {
                    check_list(g, &case.name, &runs, start, matches.as_ref());
                }
            }
            Query::JobStats { recent } => {
                let (last, ended) = store.job_runs_ended("g7", "job7", *recent).await.unwrap();
                times.push(t.elapsed());
                if check {
                    let last = last.unwrap();
                    let newest = (0..g.n).rev().find(|&i| Gen::job(i) == 7).unwrap();
                    assert_eq!(last.run_id, g.run_id(newest), "{}", case.name);
                    let ended_total = (0..g.n)
                        .filter(|&i| {
                            Gen::job(i) == 7 && !matches!(Gen::status(i), "PENDING" | "RUNNING")
                        })
                        .count();
                    assert_eq!(
                        ended.len(),
                        ended_total.min(*recent as usize),
                        "{}",
                        case.name
                    );
                }
            }
            Query::Counts { since_ms } => {
                let counts = store.run_counts_since(*since_ms).await.unwrap();
                times.push(t.elapsed());
                if check {
                    let total: i64 = counts.iter().map(|(_, n)| n).sum();
                    let expected = (0..g.n)
                        .filter(|&i| g.scheduled(i).is_some_and(|s| s >= *since_ms))
                        .count();
                    assert_eq!(total, i64::try_from(expected).unwrap(), "{}", case.name);
                }
            }
            Query::Prune {
                ended_before,
                keep_runs,
            } => {
                let rule = PruneRule {
                    ended_before: *ended_before,
                    keep_runs: *keep_runs,
                    scope: PruneScope::Except(&[]),
                };
                let pruned = store.prune(&rule, 1_000).await.unwrap();
                times.push(t.elapsed());
                assert_eq!(pruned, 0, "{}", case.name);
            }
            Query::Head { run_id } => {
                let head = store.run_head(run_id).await.unwrap();
                times.push(t.elapsed());
                if check {
                    assert_eq!(head.unwrap().0.run_id, *run_id, "{}", case.name);
                }
            }
        }
    }
    times.sort();
    times[times.len() / 2]
}

async fn explain(store: &Store, case: &Case) -> Vec<String> {
    let q = match &case.query {
        Query::List { filter, start, .. } => Explain::ListRuns {
            filter: filter.clone(),
            limit: PAGE,
            start: start.clone(),
        },
        Query::JobStats { recent } => Explain::JobRunsEnded {
            group: "g7",
            name: "job7",
            recent: *recent,
        },
        Query::Counts { since_ms } => Explain::RunCounts {
            since_ms: *since_ms,
        },
        Query::Head { .. } => return vec!["(primary key lookup)".into()],
        Query::Prune { .. } => return vec!["(Store::prune: not explained here)".into()],
    };
    store.explain(&q).await.unwrap()
}

async fn bench(backend: Backend, url: &str, g: Gen, cases: &[Case]) -> Vec<Duration> {
    let store = Store::open(url).await.unwrap();
    fill(backend, url, g).await;
    // The generator is checked against every answer when that is cheap.
    let check = g.n <= 100_000;
    let mut out = Vec::new();
    for case in cases {
        let took = run_case(&store, g, case, check).await;
        println!(
            "{}: {}: {:.2} ms",
            backend.as_str(),
            case.name,
            took.as_secs_f64() * 1000.0
        );
        if took > SLOW {
            for line in explain(&store, case).await {
                println!("    {line}");
            }
        }
        out.push(took);
    }
    store.close().await;
    out
}

#[tokio::main]
async fn main() {
    let n: i64 = std::env::var("KREST_BENCH_N")
        .ok()
        .map(|v| {
            v.replace(['_', ','], "")
                .parse()
                .expect("KREST_BENCH_N: a number of runs")
        })
        .unwrap_or(if std::env::var_os("KREST_BENCH_TINY").is_some() {
            1_000
        } else {
            10_000_000
        });
    assert!(n >= 1_000, "KREST_BENCH_N: at least 1,000 runs");
    let g = Gen::new(n);
    let cases = cases(g);

    let dir = TestDir::new("bench-queries");
    let sqlite_url = format!("sqlite://{}", dir.join("bench.db").display());
    let sqlite = bench(Backend::Sqlite, &sqlite_url, g, &cases).await;
    let db = PgDatabase::create();
    let pg = bench(Backend::Postgres, db.url(), g, &cases).await;

    println!("\n{n} runs; median of {REPEAT}, ms\n");
    println!("| query | SQLite | Postgres |");
    println!("|---|---:|---:|");
    for ((case, s), p) in cases.iter().zip(sqlite).zip(pg) {
        println!(
            "| {} | {:.2} | {:.2} |",
            case.name,
            s.as_secs_f64() * 1000.0,
            p.as_secs_f64() * 1000.0
        );
    }
}
