//! Recording throughput: run events applied by `Store::apply` in the recorder's batches (1,000
//! events per transaction), into SQLite and into PostgreSQL. Run with
//! `cargo bench -p krest --bench record`; results go into BENCHMARKS.md.
//!
//! Each run is 6 events (dispatched, started, 3 log lines, finished), as a worker reports a
//! short job; then the same events in a live stream's order (`spread`). Postgres is the server
//! of `$KREST_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/postgres`); a fresh
//! database is created and dropped.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use krest::record::store::Store;
use krest_schemas::{
    AttemptOutcome, Dispatched, Finished, JobType, LogLevel, LogLine, RunEvent, RunRef, Started,
    Trigger,
};
use krest_test_support::{PgDatabase, TestDir};

/// Runs recorded (100 at the tiny size CI runs: `KREST_BENCH_TINY`).
fn runs() -> usize {
    if std::env::var_os("KREST_BENCH_TINY").is_some() {
        100
    } else {
        10_000
    }
}
const BATCH: usize = 1_000;

fn events(runs: usize) -> Vec<(u64, RunEvent)> {
    let at = |ms: i64| Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap();
    let mut out = Vec::with_capacity(runs * 6);
    for n in 0..runs {
        let n = i64::try_from(n).unwrap();
        let run = RunRef {
            run_id: format!("bench.job{}.{}", n % 100, 1_800_000_000_000 + n * 1000),
            job_group: "bench".into(),
            job_name: format!("job{}", n % 100),
            app_name: "bench-app".into(),
        };
        out.push(RunEvent::Dispatched(Dispatched {
            run: run.clone(),
            path: "bench.handler".into(),
            job_type: JobType::Normal,
            trigger: Trigger::Schedule,
            scheduled_at: at(n * 1000),
            dispatched_at: at(n * 1000 + 1),
            shard_total: 1,
            args: serde_json::json!({"n": n}),
            misfired: 0,
            parent_run_id: None,
            revision: 1,
            node: "bench-node".into(),
            epoch: Some(1),
        }));
        out.push(RunEvent::Started(Started {
            run: run.clone(),
            shard: 0,
            shard_total: 1,
            attempt: 1,
            worker: "bench-worker".into(),
            at: at(n * 1000 + 2),
            scheduled_at: Some(at(n * 1000)),
            delivery_token: String::new(),
        }));
        for seq in 1..=3 {
            out.push(RunEvent::Log(LogLine {
                run: run.clone(),
                shard: 0,
                attempt: 1,
                seq,
                at: at(n * 1000 + 3),
                level: LogLevel::Info,
                line: format!("step {seq} of the benchmark job, a line of ordinary length"),
                delivery_token: String::new(),
            }));
        }
        out.push(RunEvent::Finished(Finished {
            run,
            shard: 0,
            shard_total: 1,
            attempt: 1,
            worker: "bench-worker".into(),
            at: at(n * 1000 + 10),
            outcome: AttemptOutcome::Succeeded,
            will_retry: false,
            retry_in_ms: None,
            output: Some("done".into()),
            error: None,
            duration_ms: 8,
            delivery_token: String::new(),
            started_at: None,
            scheduled_at: None,
        }));
    }
    (1..).zip(out).collect()
}

/// The same events in the order of a live stream, where a run's events are spread over
/// batches: each run's `dispatched` first, its `started` and log lines 100 runs later, its
/// `finished` 200 runs later (so a batch of 1,000 events holds the starts of runs dispatched in
/// the batch before and the ends of runs started there: the recorder's path for runs it
/// already holds, not only new ones).
fn spread(events: &[(u64, RunEvent)]) -> Vec<(u64, RunEvent)> {
    let mut keyed: Vec<(usize, usize, &RunEvent)> = events
        .iter()
        .enumerate()
        .map(|(i, (_, e))| {
            let (run, k) = (i / 6, i % 6);
            let slot = match k {
                0 => run * 3,
                5 => (run + 200) * 3 + 2,
                _ => (run + 100) * 3 + 1,
            };
            (slot, i, e)
        })
        .collect();
    keyed.sort_by_key(|&(slot, i, _)| (slot, i));
    (1..)
        .zip(keyed.into_iter().map(|(_, _, e)| e.clone()))
        .collect()
}

/// Applies `events` in batches; returns the wall time.
async fn record(store: &Store, events: &[(u64, RunEvent)]) -> Duration {
    let start = Instant::now();
    for batch in events.chunks(BATCH) {
        let last = batch.last().unwrap().0;
        store.apply(batch, last).await.unwrap();
    }
    start.elapsed()
}

fn report(what: &str, n: usize, took: Duration) {
    println!(
        "{what}: {n} events in {:.2} s = {:.0} events/s",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
}

/// Records `events` of `runs` runs into a fresh store at `url`, reports the rate as `what`,
/// and checks that every run and attempt was recorded.
async fn alone(what: &str, url: &str, events: &[(u64, RunEvent)], runs: usize) {
    let store = Store::open(url).await.unwrap();
    report(what, events.len(), record(&store, events).await);
    assert_eq!(
        store.counts().await.unwrap(),
        (runs as i64, runs as i64, 3 * runs as i64)
    );
    store.close().await;
}

#[tokio::main]
async fn main() {
    let runs = runs();
    let evs = events(runs);
    let n = evs.len();

    let dir = TestDir::new("bench-record");
    let sqlite = |file: &str| format!("sqlite://{}", dir.join(file).display());
    let spread = spread(&evs);
    alone("sqlite", &sqlite("bench.db"), &evs, runs).await;
    alone("postgres", PgDatabase::create().url(), &evs, runs).await;
    // Each run's events spread over batches, as a live stream has them.
    alone(
        "sqlite, runs spread over batches",
        &sqlite("spread.db"),
        &spread,
        runs,
    )
    .await;
    alone(
        "postgres, runs spread over batches",
        PgDatabase::create().url(),
        &spread,
        runs,
    )
    .await;

    // Two nodes sharing one database, each reading the whole stream: every event is applied
    // once; the time is until both have gone through it.
    let db = PgDatabase::create();
    let a = Store::open(db.url()).await.unwrap();
    let b = Store::open(db.url()).await.unwrap();
    let start = Instant::now();
    let (ta, tb) = tokio::join!(record(&a, &evs), record(&b, &evs));
    let took = start.elapsed().max(ta).max(tb);
    report("postgres, two nodes sharing it", n, took);
    assert_eq!(
        a.counts().await.unwrap(),
        (runs as i64, runs as i64, 3 * runs as i64)
    );
    a.close().await;
    b.close().await;
}
