//! Sharded runs end to end: R SHARDING jobs of N shards each (no-op handler), all due at the
//! same instant, run by two worker processes. Run with
//! `cargo bench -p krest --bench shards [-- --shards N --runs R --workers W --slots S]`; results
//! go into BENCHMARKS.md. `KREST_BENCH_TINY=1` runs one job of 1,000 shards (CI does, so it
//! cannot rot).
//!
//! `--publish-only` starts no worker: it times the leader's publishing alone (fire instant →
//! last work message stored) and stops there, for profiling the scheduler during that window
//! (`--fire-in SECS` puts the fire instant further out, to attach `perf record -p PID` to the
//! printed scheduler pid first).
//!
//! A job has at most 1,000 shards (`MAX_SHARDS`, docs/jobs.md limits), so the issue's
//! "100,000-shard run" is measured as 100 runs of 1,000 shards fired in the same tick (the
//! default); `--shards` above 1,000 is refused by the job validation.
//!
//! Starts its own nats-server, one `krest scheduler` node (SQLite) and W workers (this binary
//! again), and prints:
//! - the raw pipelined JetStream publish rate of this server, measured first in the same run:
//!   100,000 300-byte messages to a scratch stream (file storage), 1,024 acks outstanding;
//! - the time from the fire instant until the last work message of the runs was stored (the
//!   work stream's last sequence and its server timestamp), as a rate and as a % of the raw rate;
//! - the time until every shard's handler started (the workers' notes) and until every run is
//!   recorded SUCCEEDED with all shards succeeded (read from the node's SQLite file) → shard runs
//!   per second end to end;
//! - CPU seconds (from the fire instant to the end) and peak RSS per process.
//!
//! Rates count from when publishing began: the fire instant, or the first dispatch when the
//! node dispatches ahead (`--dispatch-ahead`, 1 s by default for these ALLOW jobs). The
//! publish-only figure needs `KREST_DISPATCH_AHEAD=0` (the bench says so otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::{SecondsFormat, TimeZone, Utc};
use common::{
    apply, krest_ok, mib, run_worker_if_asked, sleep_until, start_node, tiny, wait_for_api,
    BenchWorker, RunCounter, APP,
};
use futures_util::stream::{FuturesUnordered, StreamExt};
use krest_test_support::{NatsServer, ProcStats, TestDir};
use serde_json::json;

const GROUP: &str = "shards";

/// Runs recorded SUCCEEDED with all their shards (group, shards per run).
const RECORDED: &str =
    "SELECT COUNT(*) FROM runs WHERE job_group = ? AND status = 'SUCCEEDED' AND shards_succeeded = ?";

/// Publishes `n` messages of `size` bytes to a scratch stream with 1,024 acks outstanding;
/// returns messages per second.
///
/// `shaped`: each message also carries a unique `Nats-Msg-Id` (deduplicated by the server) and
/// a `traceparent` header, like the leader's work messages.
async fn raw_rate(js: &jetstream::Context, n: usize, size: usize, shaped: bool) -> f64 {
    js.create_stream(jetstream::stream::Config {
        name: "SCRATCH".into(),
        subjects: vec!["scratch.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    type Acked = Result<jetstream::publish::PublishAck, jetstream::context::PublishError>;
    let mut inflight: FuturesUnordered<
        std::pin::Pin<Box<dyn std::future::Future<Output = Acked> + Send>>,
    > = FuturesUnordered::new();
    let start = Instant::now();
    for i in 0..n {
        while inflight.len() >= 1024 {
            inflight.next().await.unwrap().unwrap();
        }
        let subject = format!("scratch.{}", i % 16);
        let ack = if shaped {
            let msg = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(format!("raw.s{:04}.1764779000000/{i}", i % 100))
                .header(
                    "traceparent",
                    format!("00-{:032x}-{:016x}-01", i + 1, i + 1).as_str(),
                );
            js.send_publish(subject, msg).await.unwrap()
        } else {
            js.publish(subject, payload.clone()).await.unwrap()
        };
        inflight.push(Box::pin(async move { ack.await }));
    }
    while let Some(r) = inflight.next().await {
        r.unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    js.delete_stream("SCRATCH").await.unwrap();
    rate
}

fn main() {
    if run_worker_if_asked() {
        return;
    }
    let shards: usize = common::flag("--shards").unwrap_or(1000);
    let runs: usize = common::flag("--runs").unwrap_or(if tiny() { 1 } else { 100 });
    let publish_only = std::env::args().any(|a| a == "--publish-only");
    let fire_in: i64 = common::flag("--fire-in").unwrap_or(4);
    let workers: usize = if publish_only {
        0
    } else {
        common::flag("--workers").unwrap_or(2)
    };
    let slots: u32 = common::flag("--slots").unwrap_or(256);
    let raw_n: usize = if tiny() { 10_000 } else { 100_000 };
    let total = shards * runs;
    println!(
        "shards: {runs} SHARDING run(s) × {shards} shards = {total} shard runs, fired together; \
         {workers} worker(s) × {slots} slots"
    );
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = TestDir::new("bench-shards");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (js, raw, shaped) = rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let js = jetstream::new(client);
        let raw = raw_rate(&js, raw_n, 300, false).await;
        let shaped = if publish_only {
            raw_rate(&js, raw_n, 500, true).await
        } else {
            0.0
        };
        (js, raw, shaped)
    });
    println!("shards/raw publish: {raw_n} × 300 B, 1,024 acks outstanding: {raw:.0} msg/s");
    if publish_only {
        println!(
            "shards/raw publish shaped like work messages: {raw_n} × 500 B with a unique \
             Nats-Msg-Id and a traceparent header: {shaped:.0} msg/s"
        );
    }

    let node = start_node("n1", &url, dir.path());
    wait_for_api(&url);
    let ws: Vec<BenchWorker> = (0..workers)
        .map(|i| BenchWorker::start(&format!("worker{i}"), &url, dir.path(), slots))
        .collect();
    // Fire instant: whole second, far enough out for the apply and the workers to be ready.
    let fire_ms = (Utc::now().timestamp_millis() / 1000 + fire_in + runs as i64 / 50) * 1000;
    let at = Utc
        .timestamp_millis_opt(fire_ms)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Secs, true);
    let docs: Vec<serde_json::Value> = (0..runs)
        .map(|i| {
            json!({
                "appName": APP, "jobGroup": GROUP, "jobName": format!("s{i:04}"),
                "path": "noop", "jobType": "SHARDING", "shardCount": shards, "at": at
            })
        })
        .collect();
    apply(&url, dir.path(), &docs);
    assert!(
        Utc::now().timestamp_millis() < fire_ms - 500,
        "the apply took too long for the chosen fire instant"
    );
    let work = || {
        rt.block_on(async {
            let mut s = js
                .get_stream(krest_schemas::names::WORK_STREAM)
                .await
                .unwrap();
            let st = s.info().await.unwrap().state.clone();
            (st.last_sequence, st.last_timestamp)
        })
    };
    let (base_seq, _) = work();
    let mut pids = vec![
        ("nats-server".to_string(), nats.pid().unwrap()),
        ("scheduler".to_string(), node.pid()),
    ];
    pids.extend(ws.iter().map(|w| (w.proc.name().to_string(), w.proc.pid())));
    let stats = || -> Vec<ProcStats> {
        pids.iter()
            .map(|(n, p)| ProcStats::of(*p).unwrap_or_else(|| panic!("{n} is gone")))
            .collect()
    };
    println!(
        "shards/scheduler pid {}, fire in {} ms",
        node.pid(),
        fire_ms - Utc::now().timestamp_millis()
    );
    sleep_until(fire_ms - 50);
    let before = stats();

    // (b) Published: the work stream holds `total` more messages than before the fire.
    let deadline = Instant::now() + Duration::from_secs(600);
    let published_ms = loop {
        let (seq, ts) = work();
        if seq >= base_seq + total as u64 {
            break (ts.unix_timestamp_nanos() / 1_000_000) as i64;
        }
        assert!(Instant::now() < deadline, "not all work messages published");
        std::thread::sleep(Duration::from_millis(10));
    };
    if publish_only {
        let after = stats();
        let pub_ms = published_ms - fire_ms;
        assert!(
            pub_ms > 0,
            "the work messages were stored before the fire instant: the node dispatched ahead; \
             run the publish-only bench with KREST_DISPATCH_AHEAD=0"
        );
        let pub_rate = total as f64 / (pub_ms.max(1) as f64 / 1000.0);
        println!(
            "shards/published (publish only, no worker): all {total} work messages stored \
             {pub_ms} ms after the fire instant: {pub_rate:.0} msg/s = {:.0} % of the raw rate",
            100.0 * pub_rate / raw
        );
        let last = rt.block_on(async {
            let s = js
                .get_stream(krest_schemas::names::WORK_STREAM)
                .await
                .unwrap();
            s.get_raw_message(base_seq + total as u64).await.unwrap()
        });
        println!(
            "shards/published: a work message is {} B of payload and {} B of headers; \
             {:.0} % of the shaped raw rate",
            last.payload.len(),
            last.headers
                .iter()
                .map(|(k, v)| k.to_string().len()
                    + v.iter().map(|v| v.as_str().len() + 4).sum::<usize>())
                .sum::<usize>(),
            100.0 * pub_rate / shaped
        );
        for (i, (name, _)) in pids.iter().enumerate() {
            println!(
                "shards/process {name}: {:.2} CPU-s from the fire instant to the last work \
                 message stored",
                after[i].cpu_secs - before[i].cpu_secs,
            );
        }
        return;
    }

    // (c) Recorded: every run SUCCEEDED with all its shards (the SQLite file read directly).
    let db = dir.join("n1.db");
    let mut recorded = RunCounter::open(&rt, &db);
    let deadline = Instant::now() + Duration::from_secs(1200);
    let recorded_ms = loop {
        if recorded.count(RECORDED, GROUP, &[shards as i64]) >= runs {
            break Utc::now().timestamp_millis();
        }
        assert!(
            Instant::now() < deadline,
            "runs not recorded: {} of {runs}",
            recorded.count(RECORDED, GROUP, &[shards as i64])
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let after = stats();
    let peaks: Vec<u64> = pids
        .iter()
        .map(|(_, p)| ProcStats::of(*p).map_or(0, |st| st.peak_rss))
        .collect();
    let first_run = krest_schemas::names::scheduled_run_id(GROUP, "s0000", fire_ms);
    let got: serde_json::Value =
        serde_json::from_str(&krest_ok(&url, &["-o", "json", "runs", "get", &first_run])).unwrap();
    let starts: Vec<common::Start> = ws.into_iter().flat_map(BenchWorker::stop).collect();

    let first_dispatch = starts.iter().map(|s| s.dispatched_ms).min().unwrap_or(0);
    let last_start = starts.iter().map(|s| s.start_ms).max().unwrap_or(0);
    let mut seen: Vec<(String, u32)> = starts.iter().map(|s| (s.run_id.clone(), s.shard)).collect();
    seen.sort_unstable();
    seen.dedup();
    let secs = |ms: i64| ms as f64 / 1000.0;
    // Rates count from when publishing began: the fire instant, or the first dispatch when the
    // node dispatched ahead of it (`--dispatch-ahead`, the default for these ALLOW jobs).
    let began = fire_ms.min(first_dispatch);
    let pub_ms = published_ms - fire_ms;
    let pub_rate = total as f64 / secs((published_ms - began).max(1));
    println!(
        "shards/published: all {total} work messages stored {pub_ms} ms after the fire instant \
         (first dispatchedAt {:+} ms): {pub_rate:.0} msg/s from the first dispatch = {:.0} % of \
         the raw rate",
        first_dispatch - fire_ms,
        100.0 * pub_rate / raw
    );
    let early = starts.iter().filter(|s| s.start_ms <= published_ms).count();
    println!(
        "shards/published: meanwhile {early} handlers started, so the server also stored ~{} \
         events (started + finished): ~{:.0} stored msg/s in all",
        2 * early,
        (total + 2 * early) as f64 / secs((published_ms - began).max(1))
    );
    println!(
        "shards/completed: {} handler starts ({} distinct shards), the last {} ms after the fire \
         instant: {:.0} shard runs/s from the first dispatch",
        starts.len(),
        seen.len(),
        last_start - fire_ms,
        total as f64 / secs((last_start - began).max(1))
    );
    println!(
        "shards/recorded: all {runs} runs SUCCEEDED with {shards}/{shards} shards {} ms after \
         the fire instant: {:.0} shard runs/s end to end from the first dispatch",
        recorded_ms - fire_ms,
        total as f64 / secs((recorded_ms - began).max(1))
    );
    for (i, (name, _)) in pids.iter().enumerate() {
        println!(
            "shards/process {name}: {:.2} CPU-s from the fire instant to the last run recorded, \
             peak RSS {}",
            after[i].cpu_secs - before[i].cpu_secs,
            mib(peaks[i])
        );
    }
    assert_eq!(
        got["run"]["status"], "SUCCEEDED",
        "runs get of {first_run}: {got}"
    );
    assert_eq!(seen.len(), total, "every shard ran");
}
