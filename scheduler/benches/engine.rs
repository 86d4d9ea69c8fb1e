//! Scheduling and dispatch benchmarks. Run with `cargo bench -p krest --bench engine`;
//! results go into BENCHMARKS.md.
//!
//! 1. Engine: schedule 100,000 jobs, then pop an hour of fires (pure, no IO).
//! 2. Engine: 100,000 jobs due at the same instant (the worst tick).
//! 3. Dispatch: publish fires to a real nats-server (spawned here), pipelined, and record state.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use krest::infra::{self, InfraConfig};
use krest::jobs::JobEntry;
use krest::leader::dispatch::{Fire, Publisher};
use krest::leader::engine::Schedules;
use krest_schemas::{parse_job, StoredJob, Trigger};
use serde_json::json;

/// Jobs in the large scenarios (1,000 at the tiny size CI runs: `KREST_BENCH_TINY`).
fn jobs() -> usize {
    if std::env::var_os("KREST_BENCH_TINY").is_some() {
        1_000
    } else {
        100_000
    }
}

fn entry(i: usize, cron: &str, t0: DateTime<Utc>) -> Arc<JobEntry> {
    let spec = parse_job(&json!({
        "appName": "bench", "jobGroup": "bench", "jobName": format!("job-{i}"),
        "path": "noop", "cron": cron, "args": {"i": i}
    }))
    .unwrap();
    Arc::new(JobEntry {
        stored: StoredJob {
            spec,
            created_at: t0,
            updated_at: t0,
            version: 1,
        },
        revision: i as u64 + 1,
        version: 1,
    })
}

/// Resident memory of this process, from /proc (Linux).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn per_sec(n: usize, d: Duration) -> String {
    format!("{:.0}/s", n as f64 / d.as_secs_f64())
}

fn spread_hour() {
    let jobs = jobs();
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let entries: Vec<_> = (0..jobs)
        .map(|i| entry(i, &format!("{} {} * * * ?", i % 60, (i / 60) % 60), t0))
        .collect();
    let mut s = Schedules::default();
    let start = Instant::now();
    for (i, e) in entries.iter().enumerate() {
        s.set(&format!("bench.job-{i}"), Some(e.clone()), None);
    }
    let build = start.elapsed();
    println!(
        "engine/spread-hour: {jobs} jobs ({} distinct expressions) scheduled in {build:?} ({}), RSS {:.0} MiB",
        s.distinct_schedules(),
        per_sec(jobs, build),
        rss_mib()
    );
    let mut fires = Vec::new();
    let start = Instant::now();
    let mut pops = 0;
    while let Some(ms) = s.next_due() {
        let now = Utc.timestamp_millis_opt(ms).unwrap();
        if now > t0 + chrono::Duration::hours(1) {
            break;
        }
        s.pop_due(now, Duration::from_secs(60), t0, &mut fires);
        pops += 1;
    }
    let run = start.elapsed();
    println!(
        "engine/spread-hour: one hour = {} fires over {pops} ticks popped and planned in {run:?} ({}, {:.1} µs per fire)",
        fires.len(),
        per_sec(fires.len(), run),
        run.as_secs_f64() * 1e6 / fires.len() as f64
    );
    assert_eq!(fires.len(), jobs);
}

fn distinct(n: usize) {
    // Worst case for memory: every job with its own expression (croner keeps ~5 KiB each).
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let entries: Vec<_> = (0..n)
        .map(|i| {
            entry(
                i,
                &format!("{} {} {} * * ?", i % 60, (i / 60) % 60, (i / 3600) % 24),
                t0,
            )
        })
        .collect();
    let before = rss_mib();
    let mut s = Schedules::default();
    let start = Instant::now();
    for (i, e) in entries.iter().enumerate() {
        s.set(&format!("bench.job-{i}"), Some(e.clone()), None);
    }
    let took = start.elapsed();
    println!(
        "engine/distinct: {n} jobs with {} distinct expressions scheduled in {took:?} ({}), RSS +{:.0} MiB",
        s.distinct_schedules(),
        per_sec(n, took),
        rss_mib() - before
    );
}

fn same_instant() {
    let jobs = jobs();
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let entries: Vec<_> = (0..jobs).map(|i| entry(i, "0/5 * * * * ?", t0)).collect();
    let mut s = Schedules::default();
    let start = Instant::now();
    for (i, e) in entries.iter().enumerate() {
        s.set(&format!("bench.job-{i}"), Some(e.clone()), None);
    }
    println!(
        "engine/same-instant: {jobs} jobs sharing one expression scheduled in {:?}",
        start.elapsed()
    );
    let mut fires = Vec::new();
    let start = Instant::now();
    s.pop_due(
        t0 + chrono::Duration::seconds(5),
        Duration::from_secs(60),
        t0,
        &mut fires,
    );
    let tick = start.elapsed();
    println!(
        "engine/same-instant: {} fires due at one instant popped, planned and rescheduled in {tick:?} ({})",
        fires.len(),
        per_sec(fires.len(), tick)
    );
    assert_eq!(fires.len(), jobs);
}

fn dispatch(rt: &tokio::runtime::Runtime, fires_n: usize, shards: usize) {
    let nats = krest_test_support::NatsServer::start();
    rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let infra = infra::ensure(&js, &InfraConfig::default()).await.unwrap();
        let publisher = Publisher::new(js.clone(), "bench".into(), infra.delivery);
        let t0 = Utc::now();
        let job = if shards > 1 {
            let items: Vec<String> = (0..shards).map(|i| i.to_string()).collect();
            let spec = parse_job(&json!({"appName": "bench", "jobGroup": "bench", "jobName": "sharded", "path": "noop", "jobType": "SHARDING", "args": items})).unwrap();
            Some(Arc::new(JobEntry { stored: StoredJob { spec, created_at: t0, updated_at: t0, version: 1 }, revision: 1, version: 1 }))
        } else {
            None
        };
        let fires: Vec<Fire> = (0..fires_n)
            .map(|i| {
                let e = job.clone().unwrap_or_else(|| entry(i, "0/5 * * * * ?", t0));
                Fire::scheduled(e, t0 + chrono::Duration::milliseconds(i as i64), Trigger::Schedule, 0)
            })
            .collect();
        let start = Instant::now();
        for chunk in fires.chunks(2000) {
            let results = publisher.publish(chunk).await;
            assert!(results.iter().all(Result::is_ok));
            // The leader's fire watermark after the round.
            let watermark = krest_schemas::FireWatermark {
                through: chunk[chunk.len() - 1].scheduled_at,
                ahead_through: None,
                jobs_revision: 1,
                epoch: 1,
                node: "bench".into(),
            };
            publisher.write_states(&[], Some(&watermark)).await.unwrap();
        }
        let took = start.elapsed();
        // Per fire: one work message per shard and a dispatched event; per round: the watermark.
        let msgs = fires_n * (shards + 1) + fires_n.div_ceil(2000);
        println!(
            "dispatch/{}: {fires_n} fires × {shards} shard(s) = {msgs} messages (work, dispatched events, watermark) stored in {took:?}: {} fires, {} messages (nats-server {})",
            if shards > 1 { "sharded" } else { "normal" },
            per_sec(fires_n, took),
            per_sec(msgs, took),
            js.client().server_info().version
        );
        // Publishing the same fires again stores nothing new: every message is a duplicate.
        let stream = js.get_stream(krest_schemas::names::WORK_STREAM).await.unwrap();
        let before = stream.get_info().await.unwrap().state.messages;
        for chunk in fires.chunks(2000) {
            assert!(publisher.publish(chunk).await.iter().all(Result::is_ok));
        }
        let after = stream.get_info().await.unwrap().state.messages;
        assert_eq!(before, after, "re-publishing created no message");
    });
}

fn main() {
    krest_test_support::init_tracing();
    // First, while the process is fresh, so its RSS growth is the schedules' memory.
    let tiny = std::env::var_os("KREST_BENCH_TINY").is_some();
    distinct(if tiny { 200 } else { 20_000 });
    spread_hour();
    same_instant();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    dispatch(&rt, if tiny { 200 } else { 20_000 }, 1);
    dispatch(&rt, if tiny { 20 } else { 2_000 }, 10);
}
