//! Failover: how long fires stop when the leader dies (SIGKILL) or hands over (SIGTERM). Run
//! with `cargo bench -p krest --bench failover [-- --reps N] [--idle-jobs N]`; results go into
//! BENCHMARKS.md. `--idle-jobs N` registers N more jobs that do not fire during the run (what
//! a new leader loads before it fires again). `KREST_BENCH_TINY=1` runs one repetition of each
//! with 10 idle jobs (CI does, so it cannot rot).
//!
//! Starts its own nats-server, two `krest scheduler` nodes and a worker process; one job fires
//! every second. Each repetition stops the current leader half-way between two fires, and
//! measures from the signal to the next leader's lease (`acquiredAt`) and to the first run it
//! dispatches, and how late that run's fire was; then it restarts the stopped node and waits
//! until it is a standby again. Every fire of the whole run must have run exactly once.
//!
//! `--load-only` (with `--idle-jobs N`, `--reps N`) measures instead what a node does first:
//! it applies the N jobs through a node that stays the leader, then starts one standby at a
//! time and measures from its start until its job table holds every job (its `krest_jobs`
//! gauge), with the node's CPU seconds and RSS then and the nats-server's CPU seconds
//! meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{
    apply, krest, run_worker_if_asked, sleep_until, spread, start_node, tiny, wait_for_api,
    BenchWorker, APP,
};
use krest_schemas::api::ClusterStatus;
use krest_test_support::{free_port, NatsServer, Proc, ProcStats, TestDir};
use serde_json::json;

const GROUP: &str = "failover";

fn status(url: &str) -> Option<ClusterStatus> {
    let out = krest(url, &["--timeout", "2s", "-o", "json", "cluster", "status"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Waits until `n` nodes are live and one leads; returns the leader's name.
fn settled(url: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = status(url) {
            if s.nodes.len() == n {
                if let Some(l) = s.leader {
                    return l.node;
                }
            }
        }
        assert!(Instant::now() < deadline, "the cluster did not settle");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the gauge `name` on the node serving HTTP on `port`, if it answers.
fn gauge(port: u16, name: &str) -> Option<u64> {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `--load-only`: each repetition starts a node (a standby: another node leads) and measures
/// how long until its job table holds all `jobs`.
fn load_only(nats: &NatsServer, dir: &std::path::Path, jobs: usize, reps: usize) {
    let url = nats.url();
    let mut took = Vec::new();
    for rep in 0..reps {
        let port = free_port();
        let name = format!("load{rep}");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_krest"));
        cmd.args(["scheduler", "--nats-url", &url, "--node", &name, "--http"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--db")
            .arg(format!(
                "sqlite://{}",
                dir.join(format!("{name}.db")).display()
            ))
            .env("KREST_LOG", "warn");
        let server_before = nats.pid().and_then(ProcStats::of).unwrap_or_default();
        let start = Instant::now();
        let mut node = Proc::spawn(&name, cmd, dir.join(format!("{name}.log")));
        let deadline = start + Duration::from_secs(600);
        while gauge(port, "krest_jobs") != Some(jobs as u64) {
            assert!(Instant::now() < deadline, "the node did not load the jobs");
            std::thread::sleep(Duration::from_millis(20));
        }
        let ms = start.elapsed().as_millis() as i64;
        let stats = ProcStats::of(node.pid()).unwrap_or_default();
        let server = nats.pid().and_then(ProcStats::of).unwrap_or_default();
        println!(
            "failover/load: {jobs} jobs loaded {ms} ms after the node's start; node CPU {:.2} s, RSS {} MiB (peak {} MiB); nats-server CPU meanwhile {:.2} s",
            stats.cpu_secs,
            stats.rss >> 20,
            stats.peak_rss >> 20,
            server.cpu_secs - server_before.cpu_secs,
        );
        took.push(ms);
        node.terminate(Duration::from_secs(30));
    }
    println!("failover/load: {} ({reps} starts)", spread(&mut took));
}

fn main() {
    if run_worker_if_asked() {
        return;
    }
    let reps: usize = common::flag("--reps").unwrap_or(if tiny() { 1 } else { 10 });
    // Jobs registered besides the ticking one, none firing in the run (one fire a year): what
    // a new leader loads before it fires again.
    let idle: usize = common::flag("--idle-jobs").unwrap_or(if tiny() { 10 } else { 0 });
    let load_only_mode = std::env::args().any(|a| a == "--load-only");
    if load_only_mode {
        println!("failover --load-only: {reps} starts of a standby, {idle} jobs registered");
    } else {
        println!(
        "failover: {reps} repetitions of SIGKILL and of SIGTERM of the leader, {idle} idle jobs registered"
    );
    }
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = TestDir::new("bench-failover");
    if load_only_mode {
        let docs: Vec<serde_json::Value> = (0..idle)
            .map(|i| {
                json!({
                    "appName": APP, "jobGroup": GROUP, "jobName": format!("idle{i:07}"),
                    "path": "noop", "cron": "0 0 3 1 1 ?", "args": {"i": i}
                })
            })
            .collect();
        // It stays the leader: each measured node starts as a standby, as after a restart.
        let mut leader = start_node("leader", &url, dir.path());
        wait_for_api(&url);
        apply(&url, dir.path(), &docs);
        settled(&url, 1);
        load_only(&nats, dir.path(), idle, reps);
        leader.terminate(Duration::from_secs(30));
        return;
    }
    let mut nodes: HashMap<String, Proc> = ["n1", "n2"]
        .into_iter()
        .map(|n| (n.to_string(), start_node(n, &url, dir.path())))
        .collect();
    wait_for_api(&url);
    let worker = BenchWorker::start("worker", &url, dir.path(), 16);
    let mut docs = vec![json!({
        "appName": APP, "jobGroup": GROUP, "jobName": "tick", "path": "noop",
        "cron": "* * * * * ?"
    })];
    docs.extend((0..idle).map(|i| {
        json!({
            "appName": APP, "jobGroup": GROUP, "jobName": format!("idle{i:07}"), "path": "noop",
            "cron": "0 0 3 1 1 ?", "args": {"i": i}
        })
    }));
    apply(&url, dir.path(), &docs);
    let first_fire = (Utc::now().timestamp_millis() / 1000 + 2) * 1000;
    // Signal time (ms), kind, and the next lease's acquisition time of each stop.
    let mut stops: Vec<(i64, &str, i64)> = Vec::new();
    for kind in ["SIGKILL", "SIGTERM"] {
        for _ in 0..reps {
            let leader = settled(&url, 2);
            // Stop it half-way between two fires, once it has been leading for a while.
            let now = Utc::now().timestamp_millis();
            sleep_until((now / 1000 + 2) * 1000 + 500);
            let proc = nodes.get_mut(&leader).unwrap();
            let at = Utc::now().timestamp_millis();
            if kind == "SIGKILL" {
                proc.kill9();
            } else {
                proc.terminate(Duration::from_secs(30));
            }
            // The other node takes over: wait for it, then bring the stopped one back.
            let deadline = Instant::now() + Duration::from_secs(60);
            let acquired = loop {
                let s = status(&url);
                if let Some(l) = s.and_then(|s| s.leader).filter(|l| l.node != leader) {
                    break l.acquired_at.timestamp_millis();
                }
                assert!(Instant::now() < deadline, "no node took over");
                std::thread::sleep(Duration::from_millis(50));
            };
            stops.push((at, kind, acquired));
            // Let a fire or two pass under the new leader before the next stop.
            sleep_until(Utc::now().timestamp_millis() + 1500);
            nodes.insert(leader.clone(), start_node(&leader, &url, dir.path()));
        }
    }
    settled(&url, 2);
    let last_fire = (Utc::now().timestamp_millis() / 1000) * 1000 - 1000;
    sleep_until(last_fire + 3000);
    let starts = worker.stop();

    let mut by_fire: HashMap<i64, Vec<i64>> = HashMap::new();
    for s in &starts {
        by_fire
            .entry(s.scheduled_ms)
            .or_default()
            .push(s.dispatched_ms);
    }
    let missed = (first_fire / 1000..=last_fire / 1000)
        .filter(|s| !by_fire.contains_key(&(s * 1000)))
        .count();
    let doubled: usize = by_fire.values().map(|v| v.len() - 1).sum();
    for kind in ["SIGKILL", "SIGTERM"] {
        let these: Vec<&(i64, &str, i64)> = stops.iter().filter(|(_, k, _)| *k == kind).collect();
        let mut leases: Vec<i64> = these.iter().map(|(at, _, acq)| acq - at).collect();
        // The first fire due after the signal: when it was dispatched, and how late.
        let next: Vec<(i64, i64)> = these
            .iter()
            .map(|(at, _, _)| {
                let due = (at / 1000 + 1) * 1000;
                let dispatched = by_fire
                    .get(&due)
                    .and_then(|d| d.iter().min().copied())
                    .unwrap_or(i64::MAX);
                (dispatched - at, dispatched - due)
            })
            .collect();
        let mut to_next: Vec<i64> = next.iter().map(|n| n.0).collect();
        let mut late: Vec<i64> = next.iter().map(|n| n.1).collect();
        println!(
            "failover/{kind} of the leader → next lease acquired: {} ({} repetitions)",
            spread(&mut leases),
            leases.len()
        );
        println!(
            "failover/{kind} of the leader → next fire dispatched: {}",
            spread(&mut to_next)
        );
        println!(
            "failover/{kind}: lateness of the next fire (due 0.5 s after the signal): {}",
            spread(&mut late)
        );
    }
    println!(
        "failover/fires: {} due from the first to the last, {missed} missed, {doubled} ran twice",
        last_fire / 1000 - first_fire / 1000 + 1
    );
    assert_eq!(missed, 0, "fires were missed");
    assert_eq!(doubled, 0, "fires ran twice");
    if tiny() {
        // So that `--load-only` cannot rot: one standby more, loading what is registered.
        load_only(&nats, dir.path(), idle + 1, 1);
    }
    drop(nodes);
}
