//! API benchmarks at scale, through the `krest` binary as a user runs it. Run with
//! `cargo bench -p krest --bench api [-- --jobs N --shards N --apply-only]`; results go into
//! BENCHMARKS.md.
//!
//! Starts its own nats-server (default max_payload, 1 MiB) and a `krest scheduler` process,
//! then times:
//! 1. `krest job apply -f FILE` of `--jobs` jobs (100,000 by default) from one file (all
//!    created), and again (all unchanged), with the CLI's CPU time and peak RSS and the CPU
//!    time of the node and nats-server during each;
//! 2. `krest job list` of those jobs (table and JSON);
//! 3. `krest runs get` of a run with `--shards` shards (100,000 by default; its events
//!    published as workers would).
//!
//! `--apply-only` stops after 1 (with the node's and nats-server's peak RSS).

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use futures_util::stream::{FuturesUnordered, StreamExt};
use krest_schemas::{AttemptOutcome, Dispatched, Finished, RunEvent, Started, Trigger};
use krest_test_support::{NatsServer, ProcStats, TestDir};
use serde_json::json;

use common::{flag, mib, tiny};

/// One `krest` run: wall time, stdout, and the process's CPU time and peak RSS.
struct Ran {
    took: Duration,
    out: String,
    cpu_secs: f64,
    peak_rss: u64,
}

struct Cli {
    url: String,
}

impl Cli {
    /// Runs `krest` with `args`, sampling its `/proc` entry until it exits (its CPU time is
    /// read once it is a zombie, before it is reaped). Panics on a non-zero exit.
    fn run(&self, args: &[&str]) -> Ran {
        let start = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_krest"))
            .args(["--nats-url", &self.url, "--timeout", "60s"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut b = Vec::new();
            stdout.read_to_end(&mut b).unwrap();
            b
        });
        let err = std::thread::spawn(move || {
            let mut b = Vec::new();
            stderr.read_to_end(&mut b).unwrap();
            b
        });
        let (mut cpu_secs, mut peak_rss) = (0.0, 0);
        loop {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.rfind(')').is_some_and(|i| s[i..].starts_with(") Z")))
                .unwrap_or(true);
            if let Some(st) = ProcStats::of(pid) {
                cpu_secs = st.cpu_secs;
                peak_rss = peak_rss.max(st.peak_rss);
            }
            if zombie {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = child.wait().unwrap();
        let took = start.elapsed();
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        assert!(
            status.success(),
            "krest {args:?} failed: {}",
            String::from_utf8_lossy(&err)
        );
        Ran {
            took,
            out: String::from_utf8(out).unwrap(),
            cpu_secs,
            peak_rss,
        }
    }
}

fn per_sec(n: usize, d: Duration) -> String {
    format!("{:.0}/s", n as f64 / d.as_secs_f64())
}

/// Load averages (1, 5, 15 min), to print beside the figures.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let jobs: usize = flag("--jobs").unwrap_or(if tiny() { 1_000 } else { 100_000 });
    let shards: u32 = flag("--shards").unwrap_or(if tiny() { 1_000 } else { 100_000 });
    let apply_only = std::env::args().any(|a| a == "--apply-only");
    let nats = NatsServer::start();
    let dir = TestDir::new("bench-api");
    let node = common::start_node("n1", &nats.url(), dir.path());
    common::wait_for_api(&nats.url());
    let cli = Cli { url: nats.url() };
    let servers = [("node", node.pid()), ("nats-server", nats.pid().unwrap())];
    let cpu = || servers.map(|(_, p)| ProcStats::of(p).map_or(0.0, |s| s.cpu_secs));
    let report = |what: &str, ran: &Ran, before: [f64; 2]| {
        let after = cpu();
        println!(
            "api/{what}: CPU krest {:.1} s (peak RSS {}), node {:.1} s, nats-server {:.1} s; load average {}",
            ran.cpu_secs,
            mib(ran.peak_rss),
            after[0] - before[0],
            after[1] - before[1],
            load()
        );
    };

    // 1. Apply cron jobs (100 groups, 60 distinct schedules) from one file, written one
    // document at a time (a million `Value`s would take gigabytes here).
    let file = dir.join("jobs.json");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        w.write_all(b"[").unwrap();
        for i in 0..jobs {
            if i > 0 {
                w.write_all(b",").unwrap();
            }
            let doc = json!({
                "appName": "bench", "jobGroup": format!("g{:02}", i % 100),
                "jobName": format!("job-{i:06}"), "path": "noop",
                "cron": format!("0 {} 3 1 1 ?", i % 60), "args": {"i": i}
            });
            serde_json::to_writer(&mut w, &doc).unwrap();
        }
        w.write_all(b"]").unwrap();
        w.flush().unwrap();
    }
    let bytes = std::fs::metadata(&file).unwrap().len();
    println!("api: load average {} before the apply", load());
    let before = cpu();
    let ran = cli.run(&["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(ran.out.matches(" created (revision ").count(), jobs);
    println!(
        "api/apply: {jobs} jobs from one file ({:.1} MiB) created in {:?} ({})",
        bytes as f64 / (1024.0 * 1024.0),
        ran.took,
        per_sec(jobs, ran.took)
    );
    report("apply", &ran, before);
    let before = cpu();
    let ran = cli.run(&["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(ran.out.matches(" unchanged (revision ").count(), jobs);
    println!(
        "api/apply-again: {jobs} jobs unchanged in {:?} ({})",
        ran.took,
        per_sec(jobs, ran.took)
    );
    report("apply-again", &ran, before);
    if apply_only {
        for (name, pid) in servers {
            let st = ProcStats::of(pid).unwrap();
            println!(
                "api: {name} RSS {} now, peak {}",
                mib(st.rss),
                mib(st.peak_rss)
            );
        }
        return;
    }

    // 2. List them.
    let Ran { took, out, .. } = cli.run(&["job", "list"]);
    assert_eq!(out.lines().count(), jobs + 1);
    println!(
        "api/list: {jobs} jobs listed (table) in {took:?} ({}), {:.1} MiB of output",
        per_sec(jobs, took),
        out.len() as f64 / (1024.0 * 1024.0)
    );
    let Ran { took, out, .. } = cli.run(&["-o", "json", "job", "list"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), jobs);
    println!(
        "api/list-json: {jobs} jobs listed (JSON) in {took:?} ({})",
        per_sec(jobs, took)
    );

    // 3. A run with `shards` shards.
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
    let Ran { took, out, .. } = cli.run(&["runs", "get", run_id]);
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
