//! API benchmarks at scale, through the `krest` binary as a user runs it. Run with
//! `cargo bench -p krest --bench api`; results go into BENCHMARKS.md.
//!
//! Starts its own nats-server (default max_payload, 1 MiB) and a `krest scheduler` process,
//! then times:
//! 1. `krest job apply -f FILE` of 100,000 jobs from one file (all created), and again (all
//!    unchanged);
//! 2. `krest job list` of those 100,000 jobs (table and JSON);
//! 3. `krest runs get` of a run with 100,000 shards (its events published as workers would).

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use futures_util::stream::{FuturesUnordered, StreamExt};
use krest_schemas::{AttemptOutcome, Dispatched, Finished, RunEvent, Started, Trigger};
use krest_test_support::{NatsServer, Proc, TestDir};
use serde_json::json;

/// Jobs applied and listed, and shards of the run shown (1,000 at the tiny size CI runs:
/// `KREST_BENCH_TINY`).
fn size() -> usize {
    if std::env::var_os("KREST_BENCH_TINY").is_some() {
        1_000
    } else {
        100_000
    }
}

struct Cli {
    url: String,
}

impl Cli {
    /// Runs `krest` with `args`; returns (wall time, stdout). Panics on a non-zero exit.
    fn run(&self, args: &[&str]) -> (Duration, String) {
        let start = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_krest"))
            .args(["--nats-url", &self.url, "--timeout", "30s"])
            .args(args)
            .output()
            .unwrap();
        let took = start.elapsed();
        assert!(
            out.status.success(),
            "krest {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (took, String::from_utf8(out.stdout).unwrap())
    }
}

fn per_sec(n: usize, d: Duration) -> String {
    format!("{:.0}/s", n as f64 / d.as_secs_f64())
}

fn main() {
    let jobs = size();
    let shards = u32::try_from(size()).unwrap();
    let nats = NatsServer::start();
    let dir = TestDir::new("bench-api");
    let mut node_cmd = Command::new(env!("CARGO_BIN_EXE_krest"));
    node_cmd
        .args([
            "scheduler",
            "--nats-url",
            &nats.url(),
            "--node",
            "n1",
            "--http",
            "off",
        ])
        .arg("--db")
        .arg(format!("sqlite://{}", dir.join("n1.db").display()))
        .env("KREST_LOG", "warn");
    let _node = Proc::spawn("n1", node_cmd, dir.join("n1.log"));
    let cli = Cli { url: nats.url() };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Command::new(env!("CARGO_BIN_EXE_krest"))
        .args([
            "--nats-url",
            &nats.url(),
            "--timeout",
            "2s",
            "cluster",
            "status",
        ])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "the node did not answer");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 1. Apply 100,000 cron jobs (100 groups, 60 distinct schedules) from one file.
    let docs: Vec<serde_json::Value> = (0..jobs)
        .map(|i| {
            json!({
                "appName": "bench", "jobGroup": format!("g{:02}", i % 100),
                "jobName": format!("job-{i:06}"), "path": "noop",
                "cron": format!("0 {} 3 1 1 ?", i % 60), "args": {"i": i}
            })
        })
        .collect();
    let file = dir.join("jobs.json");
    std::fs::write(&file, serde_json::to_vec(&docs).unwrap()).unwrap();
    let bytes = std::fs::metadata(&file).unwrap().len();
    let (took, out) = cli.run(&["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(out.matches(" created (revision ").count(), jobs);
    println!(
        "api/apply: {jobs} jobs from one file ({:.1} MiB) created in {took:?} ({})",
        bytes as f64 / (1024.0 * 1024.0),
        per_sec(jobs, took)
    );
    let (took, out) = cli.run(&["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(out.matches(" unchanged (revision ").count(), jobs);
    println!(
        "api/apply-again: {jobs} jobs unchanged in {took:?} ({})",
        per_sec(jobs, took)
    );

    // 2. List them.
    let (took, out) = cli.run(&["job", "list"]);
    assert_eq!(out.lines().count(), jobs + 1);
    println!(
        "api/list: {jobs} jobs listed (table) in {took:?} ({}), {:.1} MiB of output",
        per_sec(jobs, took),
        out.len() as f64 / (1024.0 * 1024.0)
    );
    let (took, out) = cli.run(&["-o", "json", "job", "list"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), jobs);
    println!(
        "api/list-json: {jobs} jobs listed (JSON) in {took:?} ({})",
        per_sec(jobs, took)
    );

    // 3. A run with 100,000 shards.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let run_id = "g00.wide.1000";
    let took = rt.block_on(publish_run(&nats.url(), run_id, shards));
    println!("api/shards: events of a {shards}-shard run published in {took:?}");
    let start = Instant::now();
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_krest"))
            .args([
                "--nats-url",
                &nats.url(),
                "-o",
                "json",
                "runs",
                "list",
                "--job",
                "g00.wide",
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("\"SUCCEEDED\"") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "run not recorded"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "api/shards: recorded (SUCCEEDED) {:?} after the last publish",
        start.elapsed()
    );
    let (took, out) = cli.run(&["runs", "get", run_id]);
    assert_eq!(
        out.matches(" attempt 1: SUCCEEDED").count(),
        shards as usize
    );
    println!(
        "api/runs-get: a run with {shards} shards shown (every attempt) in {took:?}, {:.1} MiB of output",
        out.len() as f64 / (1024.0 * 1024.0)
    );
}

/// Publishes the events of a run of `shards` shards, each started and succeeded once.
async fn publish_run(url: &str, run_id: &str, shards: u32) -> Duration {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let secrets = js
        .get_key_value(krest_schemas::names::SECRETS_BUCKET)
        .await
        .unwrap();
    let key = krest::delivery::DeliveryKey::load_or_create(&secrets)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let (group, name) = ("g00", "wide");
    let mut events = vec![RunEvent::Dispatched(Dispatched {
        run: krest_schemas::RunRef {
            run_id: run_id.into(),
            job_group: group.into(),
            job_name: name.into(),
            app_name: "bench".into(),
        },
        path: "noop".into(),
        job_type: krest_schemas::JobType::Sharding,
        trigger: Trigger::Manual,
        scheduled_at: now,
        dispatched_at: now,
        shard_total: shards,
        args: json!([]),
        misfired: 0,
        parent_run_id: None,
        revision: 1,
        node: "n1".into(),
        epoch: None,
    })];
    for shard in 0..shards {
        events.push(RunEvent::Started(Started {
            run: krest_schemas::RunRef {
                run_id: run_id.into(),
                job_group: group.into(),
                job_name: name.into(),
                app_name: "bench".into(),
            },
            shard,
            shard_total: shards,
            attempt: 1,
            worker: "w1".into(),
            at: now,
            scheduled_at: Some(now),
            delivery_token: key.token(run_id, shard),
        }));
        events.push(RunEvent::Finished(Finished {
            run: krest_schemas::RunRef {
                run_id: run_id.into(),
                job_group: group.into(),
                job_name: name.into(),
                app_name: "bench".into(),
            },
            shard,
            shard_total: shards,
            attempt: 1,
            worker: "w1".into(),
            at: now,
            outcome: AttemptOutcome::Succeeded,
            will_retry: false,
            retry_in_ms: None,
            output: Some(format!("shard {shard} done")),
            error: None,
            duration_ms: 1,
            delivery_token: key.token(run_id, shard),
            started_at: None,
            scheduled_at: None,
        }));
    }
    let start = Instant::now();
    let subject = krest_schemas::names::events_subject("bench", group, name);
    type Acked = Result<
        async_nats::jetstream::publish::PublishAck,
        async_nats::jetstream::context::PublishError,
    >;
    let mut inflight: FuturesUnordered<
        std::pin::Pin<Box<dyn std::future::Future<Output = Acked> + Send>>,
    > = FuturesUnordered::new();
    for e in &events {
        while inflight.len() >= 1024 {
            inflight.next().await.unwrap().unwrap();
        }
        let msg = PublishMessage::build()
            .payload(serde_json::to_vec(e).unwrap().into())
            .message_id(e.msg_id())
            .header(
                krest_schemas::names::SCHEDULER_TOKEN_HEADER,
                key.scheduler_token(run_id).as_str(),
            );
        let ack = js.send_publish(subject.clone(), msg).await.unwrap();
        inflight.push(Box::pin(async move { ack.await }));
    }
    while let Some(r) = inflight.next().await {
        r.unwrap();
    }
    start.elapsed()
}
