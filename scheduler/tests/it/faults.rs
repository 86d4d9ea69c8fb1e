//! The fault suite: real `krest scheduler` and `krest worker demo` processes, real nats-server
//! processes, broken on purpose (SIGKILL unless the test is about a clean stop). Each test
//! runs a job firing every second and then checks the recorded history: for every fire time in
//! the window exactly one run, every run finished, no attempt executed twice.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};
use krest::cli::client::Client;
use krest_schemas::api::{ClusterStatus, DeadLetter, DlqListRequest, Op, RunStatus, RunSummary};
use krest_schemas::names::{app_consumer, WORK_STREAM};
use krest_schemas::{NodeRole, Trigger};
use krest_test_support::{eventually, NatsServer, Proc, TestDir};
use serde_json::json;

use crate::harness::*;

const APP: &str = "demo-spring-krest-job";
const POST: &str = "service/demo-krestjob-post";
const SHARDING: &str = "service/demo-krestjob/sharding";

/// Processes of one test, killed on drop.
struct Fleet {
    dir: TestDir,
    urls: String,
    nodes: BTreeMap<String, Proc>,
    workers: BTreeMap<String, Proc>,
    journal: PathBuf,
}

impl Fleet {
    fn new(name: &str, urls: String) -> Fleet {
        krest_test_support::init_tracing();
        let dir = TestDir::new(name);
        let journal = dir.join("journal.txt");
        Fleet {
            dir,
            urls,
            nodes: BTreeMap::new(),
            workers: BTreeMap::new(),
            journal,
        }
    }

    fn krest(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_krest"));
        cmd.args(["--nats-url", &self.urls])
            .env("KREST_LOG", "info,krest=debug");
        cmd
    }

    fn start_node(&mut self, name: &str, extra: &[&str]) {
        let mut cmd = self.krest();
        let db = format!(
            "sqlite://{}",
            self.dir.join(&format!("{name}.db")).display()
        );
        cmd.arg("scheduler");
        if !extra.contains(&"--db") {
            cmd.args(["--db", &db]);
        }
        cmd.args(["--node", name, "--http", "127.0.0.1:0"])
            .args(extra);
        let log = self.dir.join(&format!("{name}.log"));
        self.nodes
            .insert(name.to_string(), Proc::spawn(name, cmd, log));
    }

    /// Starts `krest worker demo`; `extra` flags replace the defaults of the same name.
    fn start_worker(&mut self, name: &str, extra: &[&str]) {
        let mut cmd = self.krest();
        cmd.args(["worker", "demo", "--instance", name]);
        for (flag, value) in [
            ("--slots", "4"),
            ("--work", "300ms"),
            ("--ack-wait", "3s"),
            ("--shutdown-timeout", "5s"),
        ] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        cmd.arg("--journal").arg(&self.journal).args(extra);
        let log = self.dir.join(&format!("{name}.log"));
        self.workers
            .insert(name.to_string(), Proc::spawn(name, cmd, log));
    }

    async fn client(&self) -> Client {
        client_for(&self.urls).await
    }

    /// Every execution the demo workers journaled: (run, shard, attempt, worker).
    fn journal(&self) -> Vec<(String, u32, u32, String)> {
        std::fs::read_to_string(&self.journal)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut p = l.split(' ');
                Some((
                    p.next()?.to_string(),
                    p.next()?.parse().ok()?,
                    p.next()?.parse().ok()?,
                    p.next()?.to_string(),
                ))
            })
            .collect()
    }
}

/// Waits for the current leader as the cluster reports it (a lease naming a live node).
async fn current_leader(client: &Client, not: Option<&str>) -> String {
    eventually(DEADLINE, "a (new) leader", || async {
        let status: ClusterStatus = client.call(Op::ClusterStatus, &json!({})).await.ok()?;
        let leader = status.leader?.node;
        let live_leader = status
            .nodes
            .iter()
            .any(|n| n.node == leader && n.role == NodeRole::Leader);
        (live_leader && Some(leader.as_str()) != not).then_some(leader)
    })
    .await
}

async fn finished(client: &Client, job: &str) -> Vec<RunSummary> {
    runs(client, job)
        .await
        .into_iter()
        .filter(|r| r.status.is_final())
        .collect()
}

/// Waits until `n` more runs of `job` than `before` have finished.
async fn more_runs(client: &Client, job: &str, before: usize, n: usize) -> Vec<RunSummary> {
    eventually(
        DEADLINE,
        &format!("{n} more finished runs of {job}"),
        || async {
            let f = finished(client, job).await;
            (f.len() >= before + n).then_some(f)
        },
    )
    .await
}

/// All runs of `job` scheduled up to the newest finished one, once every one of them finished.
async fn settled(client: &Client, job: &str) -> Vec<RunSummary> {
    eventually(DEADLINE, "every run up to the newest to finish", || async {
        let all = runs(client, job).await;
        let newest = all
            .iter()
            .filter(|r| r.status.is_final())
            .filter_map(|r| r.scheduled_at)
            .max()?;
        let upto: Vec<_> = all
            .into_iter()
            .filter(|r| r.scheduled_at.is_some_and(|t| t <= newest))
            .collect();
        upto.iter().all(|r| r.status.is_final()).then_some(upto)
    })
    .await
}

/// How often an attempt may be executed.
#[derive(Clone, Copy, PartialEq)]
enum Executions {
    /// Each (run, shard, attempt) once.
    Once,
    /// Possibly more: a crashed NATS server restores each consumer from its last persisted
    /// state, so a delivery it made just before dying can be made again with the same count.
    AtLeastOnce,
}

/// The history check: one run per second from the first fire to the last, all SUCCEEDED, every
/// run executed, and no (run, shard, attempt) executed twice.
fn assert_history(runs: &[RunSummary], journal: &[(String, u32, u32, String)]) {
    assert_history_with(runs, journal, Executions::Once);
}

fn assert_history_with(
    runs: &[RunSummary],
    journal: &[(String, u32, u32, String)],
    executions: Executions,
) {
    let mut by_time: BTreeMap<i64, Vec<&RunSummary>> = BTreeMap::new();
    for r in runs {
        by_time
            .entry(r.scheduled_at.unwrap().timestamp_millis())
            .or_default()
            .push(r);
    }
    let (first, last) = (
        *by_time.keys().next().unwrap(),
        *by_time.keys().last().unwrap(),
    );
    let mut t = first;
    while t <= last {
        let n = by_time.get(&t).map_or(0, Vec::len);
        assert_eq!(
            n,
            1,
            "fire time {} has {n} runs",
            DateTime::<Utc>::from_timestamp_millis(t).unwrap()
        );
        t += 1000;
    }
    for r in runs {
        assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    }
    if executions == Executions::Once {
        let mut seen = HashSet::new();
        for (run, shard, attempt, worker) in journal {
            assert!(
                seen.insert((run, shard, attempt)),
                "{run} shard {shard} attempt {attempt} executed twice (again on {worker})"
            );
        }
    }
    let ids: HashSet<&str> = runs.iter().map(|r| r.run_id.as_str()).collect();
    let executed: HashSet<&str> = journal.iter().map(|(r, ..)| r.as_str()).collect();
    for id in &ids {
        assert!(
            executed.contains(id),
            "run {id} recorded but never executed"
        );
    }
}

fn every_second(name: &str) -> serde_json::Value {
    json!({"appName": APP, "jobGroup": "f", "jobName": name, "path": POST, "cron": "* * * * * ?", "args": "tick"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_sigkilled_five_times_among_three_nodes() {
    let nats = NatsServer::start();
    let mut f = Fleet::new("kill5", nats.url());
    for n in ["a", "b", "c"] {
        f.start_node(n, &[]);
    }
    f.start_worker("w1", &[]);
    let client = f.client().await;
    apply(&client, vec![every_second("tick")]).await;
    let mut seen = more_runs(&client, "f.tick", 0, 3).await.len();
    for _ in 0..5 {
        let leader = current_leader(&client, None).await;
        f.nodes.get_mut(&leader).unwrap().kill9();
        let next = current_leader(&client, Some(&leader)).await;
        assert_ne!(next, leader);
        f.start_node(&leader, &[]);
        seen = more_runs(&client, "f.tick", seen, 2).await.len();
    }
    let all = settled(&client, "f.tick").await;
    assert!(
        all.iter().any(|r| r.trigger == Some(Trigger::CatchUp)),
        "leaderless gaps were caught up"
    );
    assert_history(&all, &f.journal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_does_not_dispatch_after_losing_its_lease() {
    let nats = NatsServer::start();
    let mut f = Fleet::new("sigstop", nats.url());
    f.start_node("a", &[]);
    f.start_node("b", &[]);
    f.start_worker("w1", &[]);
    let client = f.client().await;
    apply(&client, vec![every_second("tick")]).await;
    more_runs(&client, "f.tick", 0, 3).await;
    let old = current_leader(&client, None).await;
    f.nodes[&old].pause();
    let new = current_leader(&client, Some(&old)).await;
    let before = finished(&client, "f.tick").await.len();
    more_runs(&client, "f.tick", before, 3).await;
    f.nodes[&old].resume();
    // The old leader wakes past its lease: it steps down without dispatching.
    eventually(DEADLINE, "the resumed node to step down", || async {
        let out = f.nodes[&old].output();
        (out.contains("stepping down") || out.contains("lost leadership")).then_some(())
    })
    .await;
    let before = finished(&client, "f.tick").await.len();
    more_runs(&client, "f.tick", before, 3).await;
    assert_eq!(current_leader(&client, None).await, new);
    // Either node may answer; the resumed one may still be catching up its record, so wait
    // for a history that shows the new leader's runs.
    let (all, takeover) = eventually(DEADLINE, "a history with the new leader's runs", || async {
        let all = settled(&client, "f.tick").await;
        let takeover = all
            .iter()
            .filter(|r| r.node.as_deref() == Some(new.as_str()))
            .filter_map(|r| r.scheduled_at)
            .min()?;
        Some((all, takeover))
    })
    .await;
    let late_by_old: Vec<_> = all
        .iter()
        .filter(|r| r.scheduled_at.unwrap() > takeover && r.node.as_deref() == Some(old.as_str()))
        .collect();
    assert!(
        late_by_old.is_empty(),
        "the deposed leader dispatched {late_by_old:#?}"
    );
    assert_history(&all, &f.journal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_schedulers_down_for_twenty_seconds_then_back_catch_up_once() {
    let nats = NatsServer::start();
    let mut f = Fleet::new("all-down", nats.url());
    // Misfires older than 10 s collapse into one run (FIRE_ONCE); newer ones run each.
    let threshold = ["--misfire-threshold", "10s"];
    f.start_node("a", &threshold);
    f.start_node("b", &threshold);
    f.start_worker("w1", &[]);
    let client = f.client().await;
    apply(&client, vec![every_second("tick")]).await;
    more_runs(&client, "f.tick", 0, 3).await;
    for n in f.nodes.values_mut() {
        n.kill9();
    }
    // The outage itself: nothing to wait for but time.
    tokio::time::sleep(Duration::from_secs(20)).await;
    f.start_node("a", &threshold);
    f.start_node("b", &threshold);
    let client = f.client().await;
    let before = finished(&client, "f.tick").await.len();
    more_runs(&client, "f.tick", before, 15).await;
    let mut all = settled(&client, "f.tick").await;
    all.sort_by_key(|r| r.scheduled_at);
    let collapsed: Vec<_> = all.iter().filter(|r| r.misfired > 0).collect();
    assert_eq!(
        collapsed.len(),
        1,
        "one run stands for the old misfires: {collapsed:#?}"
    );
    let c = collapsed[0];
    assert_eq!(c.trigger, Some(Trigger::CatchUp));
    let i = all.iter().position(|r| r.run_id == c.run_id).unwrap();
    let gap = (c.scheduled_at.unwrap() - all[i - 1].scheduled_at.unwrap()).num_seconds();
    assert_eq!(
        gap,
        i64::from(c.misfired) + 1,
        "the collapsed run covers exactly the fires it skipped"
    );
    assert!(c.misfired >= 5, "{c:?}");
    // Everything else: one run per second, each once.
    let (before_gap, after_gap) = all.split_at(i);
    assert_history(before_gap, &f.journal());
    assert_history(after_gap, &f.journal());
    assert!(
        after_gap[1..]
            .iter()
            .take(5)
            .all(|r| r.trigger == Some(Trigger::CatchUp)),
        "recent misfires each caught up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_sigkilled_mid_run_has_its_runs_finished_elsewhere() {
    let nats = NatsServer::start();
    let mut f = Fleet::new("worker-kill", nats.url());
    f.start_node("a", &[]);
    f.start_worker("w1", &["--work", "4s", "--slots", "2"]);
    f.start_worker("w2", &["--work", "4s", "--slots", "2"]);
    let client = f.client().await;
    eventually(DEADLINE, "two workers registered", || async {
        let w: Vec<krest_schemas::WorkerInfo> =
            client.call(Op::WorkersList, &json!({})).await.ok()?;
        (w.len() == 2).then_some(())
    })
    .await;
    apply(&client, vec![json!({"appName": APP, "jobGroup": "f", "jobName": "long", "path": SHARDING, "jobType": "SHARDING", "args": ["a", "b", "c", "d"], "retryTimes": 2})]).await;
    let run_id = trigger(&client, "f.long").await.run_id;
    // Both workers hold shards; kill one in the middle of its runs.
    let victim = eventually(DEADLINE, "both workers running shards", || async {
        let j = f.journal();
        let workers: HashSet<&str> = j.iter().map(|(_, _, _, w)| w.as_str()).collect();
        (workers.len() == 2).then(|| j[0].3.clone())
    })
    .await;
    let held: HashSet<u32> = f
        .journal()
        .iter()
        .filter(|(_, _, _, w)| *w == victim)
        .map(|(_, s, _, _)| *s)
        .collect();
    f.workers.get_mut(&victim).unwrap().kill9();
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    let survivor = if victim == "w1" { "w2" } else { "w1" };
    for shard in &held {
        let attempts: Vec<_> = d.attempts.iter().filter(|a| a.shard == *shard).collect();
        let last = attempts.last().unwrap();
        assert_eq!(
            (last.attempt, last.worker.as_deref()),
            (2, Some(survivor)),
            "shard {shard}: {attempts:#?}"
        );
    }
    // The dead instance's heartbeat expires from the registry.
    eventually(
        DEADLINE,
        "the dead worker to leave the registry",
        || async {
            let w: Vec<krest_schemas::WorkerInfo> =
                client.call(Op::WorkersList, &json!({})).await.ok()?;
            (w.len() == 1 && w[0].instance == survivor).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_under_load_loses_and_duplicates_nothing() {
    let mut nats = NatsServer::start();
    let mut f = Fleet::new("nats-restart", nats.url());
    f.start_node("a", &[]);
    f.start_node("b", &[]);
    f.start_worker("w1", &[]);
    let client = f.client().await;
    // Load: a run every second and nine shards every second.
    let mut sharded = every_second("shards");
    sharded["path"] = json!(SHARDING);
    sharded["jobType"] = json!("SHARDING");
    sharded["args"] = json!([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    apply(&client, vec![every_second("tick"), sharded]).await;
    more_runs(&client, "f.tick", 0, 3).await;
    nats.restart();
    let client = f.client().await;
    let before = finished(&client, "f.tick").await.len();
    more_runs(&client, "f.tick", before, 6).await;
    // No fire time may have two runs and every run completes; attempts in flight when the
    // server died may run again (at-least-once execution, see docs/guarantees.md).
    let journal = f.journal();
    assert_history_with(
        &settled(&client, "f.tick").await,
        &journal,
        Executions::AtLeastOnce,
    );
    let shards = settled(&client, "f.shards").await;
    assert_history_with(&shards, &journal, Executions::AtLeastOnce);
    assert!(shards.iter().all(|r| r.shards_succeeded == 9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_nats_node_the_leader_uses_in_a_three_node_cluster() {
    let mut cluster = NatsServer::start_cluster(3);
    let urls = cluster
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let mut f = Fleet::new("cluster", urls);
    // No --replicas: the nodes see a 3-node cluster and replicate everything 3 times.
    f.start_node("a", &[]);
    f.start_node("b", &[]);
    f.start_worker("w1", &[]);
    let client = f.client().await;
    apply(&client, vec![every_second("tick")]).await;
    more_runs(&client, "f.tick", 0, 3).await;
    let js = async_nats::jetstream::new(async_nats::connect(cluster[0].url()).await.unwrap());
    for name in [
        WORK_STREAM,
        "KREST_EVENTS",
        "KREST_DLQ",
        "KV_krest-leader",
        "KV_krest-jobs",
        "KV_krest-state",
    ] {
        let mut stream = js.get_stream(name).await.unwrap();
        assert_eq!(
            stream.info().await.unwrap().config.num_replicas,
            3,
            "{name}"
        );
    }
    let leader = current_leader(&client, None).await;
    let status: ClusterStatus = client.call(Op::ClusterStatus, &json!({})).await.unwrap();
    let server = status
        .nodes
        .iter()
        .find(|n| n.node == leader)
        .unwrap()
        .nats_server
        .clone();
    let name = server.split('@').next().unwrap().to_string();
    let idx: usize = name.trim_start_matches('n').parse::<usize>().unwrap() - 1;
    cluster[idx].kill();
    let client = Client::connect(
        &cluster
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != idx)
            .map(|(_, s)| s.url())
            .collect::<Vec<_>>()
            .join(","),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let before = eventually(DEADLINE, "the API answering again", || async {
        Some(finished(&client, "f.tick").await.len())
    })
    .await;
    more_runs(&client, "f.tick", before, 6).await;
    let all = settled(&client, "f.tick").await;
    assert_history(&all, &f.journal());
}

/// `GET path` on `addr`; returns the status code.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_get(addr, path)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `GET path` on `addr`; returns the body.
fn http_body(addr: &str, path: &str) -> Option<String> {
    Some(http_get(addr, path)?.split_once("\r\n\r\n")?.1.to_string())
}

/// `GET path` on `addr`; returns the whole response.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_wait_in_the_stream_while_the_database_is_locked() {
    let nats = NatsServer::start();
    let mut f = Fleet::new("db-outage", nats.url());
    f.start_node("a", &[]);
    f.start_worker("w1", &[]);
    let client = f.client().await;
    apply(&client, vec![every_second("tick")]).await;
    more_runs(&client, "f.tick", 0, 2).await;
    let status: ClusterStatus = client.call(Op::ClusterStatus, &json!({})).await.unwrap();
    let http = status.nodes[0].http_addr.clone().unwrap();
    assert_eq!(http_status(&http, "/readyz"), Some(200));
    assert_eq!(http_status(&http, "/healthz"), Some(200));

    // Another process takes the database's write lock and keeps it.
    let db = f.dir.join("a.db");
    let mut lock = sqlx_lock(&db).await;
    eventually(DEADLINE, "/readyz to report the database", || async {
        (http_status(&http, "/readyz") == Some(503)).then_some(())
    })
    .await;
    // The lock is held, so no transaction commits any more; the node says how far behind it
    // is and why.
    let stuck = runs(&client, "f.tick").await.len();
    eventually(
        DEADLINE,
        "cluster status to show the recorder's lag",
        || async {
            let status: ClusterStatus = client.call(Op::ClusterStatus, &json!({})).await.ok()?;
            let n = &status.nodes[0];
            (n.recorder_lag_events > 0 && n.recorder_lag_ms > 0 && n.recorder_failing.is_some())
                .then_some(())
        },
    )
    .await;
    let (code, out, _) = {
        let out = f.krest().args(["cluster", "status"]).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(code, Some(0));
    assert!(
        out.contains("events,") && out.contains("stuck: cannot record run events"),
        "{out}"
    );
    // `krest health` (the container health check) says the same.
    let health = |ready: bool| {
        let mut cmd = f.krest();
        cmd.args(["health", "--http", &http]);
        if ready {
            cmd.arg("--ready");
        }
        cmd.output().unwrap().status.code()
    };
    assert_eq!(health(false), Some(0), "alive");
    assert_eq!(health(true), Some(1), "not ready");
    let body = http_body(&http, "/readyz").unwrap();
    assert!(
        body.contains("\"lagEvents\"") && body.contains("cannot record run events"),
        "{body}"
    );
    // Runs go on meanwhile (the workers' results wait in the events stream).
    let journal_before = f.journal().len();
    eventually(
        DEADLINE,
        "five executions while the database is locked",
        || async { (f.journal().len() >= journal_before + 5).then_some(()) },
    )
    .await;
    assert_eq!(
        runs(&client, "f.tick").await.len(),
        stuck,
        "nothing new recorded while locked"
    );
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    drop(lock);

    eventually(DEADLINE, "/readyz to recover", || async {
        (http_status(&http, "/readyz") == Some(200)).then_some(())
    })
    .await;
    assert_eq!(health(true), Some(0), "ready again");
    let before = finished(&client, "f.tick").await.len();
    more_runs(&client, "f.tick", before, 3).await;
    let all = settled(&client, "f.tick").await;
    assert_history(&all, &f.journal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_input_is_parked_and_disturbs_nothing() {
    let nats = NatsServer::start();
    let mut f = Fleet::new("poison", nats.url());
    f.start_node("a", &[]);
    f.start_node("b", &[]);
    f.start_worker("w1", &[]);
    let client = f.client().await;
    apply(&client, vec![every_second("tick")]).await;
    more_runs(&client, "f.tick", 0, 2).await;

    let raw = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(raw.clone());
    let junk = bytes::Bytes::from_static(b"{not json");
    let big = bytes::Bytes::from(vec![b'x'; 900 * 1024]);
    // The largest message the server accepts: its parked copy cannot carry it whole.
    let max = raw.server_info().max_payload;
    let at_limit = bytes::Bytes::from(vec![b'{'; max]);
    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    for payload in [junk.clone(), big.clone(), at_limit.clone()] {
        // Work for the demo app, events of a job, a definition written straight into the bucket,
        // heartbeats, node presence, job state: all garbage.
        for subject in [
            krest_schemas::names::work_queue_subject(APP, "f", "tick"),
            krest_schemas::names::events_subject(APP, "f", "tick"),
            "$KV.krest-jobs.f.garbage".to_string(),
            "$KV.krest-workers.x.y".to_string(),
            "$KV.krest-nodes.zz".to_string(),
            "$KV.krest-state.f.tick".to_string(),
            "$KV.krest-leader.leader".to_string(),
            "krest.dlq.work".to_string(),
        ] {
            // A bucket may cap its values below max_payload; what the server refuses never
            // reached Krest.
            if js
                .publish(subject.clone(), payload.clone())
                .await
                .unwrap()
                .await
                .is_ok()
            {
                *accepted.entry(subject).or_default() += 1;
            }
        }
        // Every API operation.
        for op in Op::ALL {
            let reply = raw.request(op.subject(), payload.clone()).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
            if op != Op::WorkersList && op != Op::ClusterStatus {
                assert_eq!(v["ok"], false, "{}: {v}", op.name());
            }
        }
    }
    // Parked: the work messages (by the worker), the events and the definitions (by the nodes).
    let letters: Vec<DeadLetter> = eventually(DEADLINE, "the bad input parked", || async {
        let l: Vec<DeadLetter> = client
            .call(
                Op::DlqList,
                &DlqListRequest {
                    limit: Some(100),
                    ..Default::default()
                },
            )
            .await
            .ok()?;
        let count = |subject: &str, reason: &str| {
            l.iter()
                .filter(|d| d.subject == subject && d.reason.starts_with(reason))
                .count()
        };
        (count("krest.dlq.work", "malformed run message")
            == accepted[&krest_schemas::names::work_queue_subject(APP, "f", "tick")]
            && count("krest.dlq.events", "malformed run event") == 3
            && count("krest.dlq.jobs", "malformed job definition")
                == accepted["$KV.krest-jobs.f.garbage"])
            .then_some(l)
    })
    .await;
    assert!(
        letters
            .iter()
            .any(|d| d.reason.starts_with("malformed run message")),
        "{letters:#?}"
    );

    // The event at the limit was parked as a bounded copy that says what it cut and where the
    // original is.
    let mut dlq = js.get_stream("KREST_DLQ").await.unwrap();
    let last = dlq.info().await.unwrap().state.last_sequence;
    let mut truncated = Vec::new();
    for seq in 1..=last {
        let m = dlq.get_raw_message(seq).await.unwrap();
        if m.headers.get("Krest-Truncated").is_some() {
            assert!(m.payload.len() < max, "{}", m.payload.len());
            assert!(m.payload.iter().all(|b| *b == b'{'));
            assert_eq!(
                m.headers.get("Krest-Original-Size").unwrap().as_str(),
                max.to_string()
            );
            assert!(m.headers.get("Krest-Source-Seq").is_some());
            truncated.push(m.subject.to_string());
        }
    }
    assert!(
        truncated.contains(&"krest.dlq.events".to_string()),
        "{truncated:?}"
    );
    // Both nodes recorded past it and say they are current.
    eventually(DEADLINE, "both recorders current", || async {
        let status: ClusterStatus = client.call(Op::ClusterStatus, &json!({})).await.ok()?;
        (status.nodes.len() == 2
            && status
                .nodes
                .iter()
                .all(|n| n.recorder_failing.is_none() && n.recorder_lag_events < 50))
        .then_some(())
    })
    .await;

    // Everything else goes on: the nodes answer, the job runs every second, once.
    let before = finished(&client, "f.tick").await.len();
    more_runs(&client, "f.tick", before, 4).await;
    let workers: Vec<krest_schemas::WorkerInfo> =
        client.call(Op::WorkersList, &json!({})).await.unwrap();
    assert_eq!(
        workers
            .iter()
            .map(|w| w.instance.as_str())
            .collect::<Vec<_>>(),
        ["w1"]
    );
    let all = settled(&client, "f.tick").await;
    assert_history(&all, &f.journal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_that_exhaust_their_deliveries_are_dead_lettered_and_recorded() {
    let env = Env::new("max-deliver");
    let node = env.node("n1");
    let client = env.client().await;
    // A consumer that gives up after two deliveries, and a "worker" that never acknowledges.
    let raw = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(raw);
    let stream = js.get_stream(WORK_STREAM).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(app_consumer("dl")),
            filter_subject: krest_schemas::names::work_queue_filter("dl"),
            ack_wait: Duration::from_secs(1),
            max_deliver: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    apply(
        &client,
        vec![json!({"appName": "dl", "jobName": "stuck", "path": "p"})],
    )
    .await;
    let run_id = trigger(&client, "stuck").await.run_id;
    // Keep pulling without acknowledging, as a crashing worker fleet would: the server hands
    // the run out twice, and on the next pull reports that its deliveries are exhausted.
    let deliveries = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = deliveries.clone();
    let puller = tokio::spawn(async move {
        loop {
            let Ok(mut batch) = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(2))
                .messages()
                .await
            else {
                continue;
            };
            while let Some(Ok(_unacked)) = futures_util::StreamExt::next(&mut batch).await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let d = wait_final(&client, &run_id).await;
    puller.abort();
    assert_eq!(deliveries.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(d.run.status, RunStatus::Failed);
    assert!(
        d.run
            .error
            .as_deref()
            .unwrap()
            .starts_with("dead-lettered: delivered 2 times"),
        "{:?}",
        d.run.error
    );
    let letters: Vec<DeadLetter> = client
        .call(Op::DlqList, &DlqListRequest::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].payload.contains(&run_id));
    let mut stream = js.get_stream(WORK_STREAM).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        0,
        "removed from the work stream"
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_on_the_leader_hands_over_at_once_and_exits_cleanly() {
    let nats = NatsServer::start();
    let mut f = Fleet::new("sigterm", nats.url());
    f.start_node("a", &[]);
    f.start_node("b", &[]);
    f.start_worker("w1", &[]);
    let client = f.client().await;
    apply(&client, vec![every_second("tick")]).await;
    more_runs(&client, "f.tick", 0, 3).await;
    let leader = current_leader(&client, None).await;
    assert!(
        f.nodes.get_mut(&leader).unwrap().terminate(DEADLINE),
        "exit status 0 after SIGTERM"
    );
    let out = f.nodes[&leader].output();
    assert!(out.contains("released leadership"), "{out}");
    // Released, not expired: the lease is gone as soon as the process has exited.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let lease = js
        .get_key_value("krest-leader")
        .await
        .unwrap()
        .entry("leader")
        .await
        .unwrap();
    let held_by_old = lease.as_ref().is_some_and(|e| {
        e.operation == async_nats::jetstream::kv::Operation::Put
            && String::from_utf8_lossy(&e.value).contains(&format!("\"node\":\"{leader}\""))
    });
    assert!(!held_by_old, "{lease:?}");
    current_leader(&client, Some(&leader)).await;
    let before = finished(&client, "f.tick").await.len();
    more_runs(&client, "f.tick", before, 3).await;
    assert_history(&settled(&client, "f.tick").await, &f.journal());
    // A worker's SIGTERM is graceful too: it exits 0 and leaves the registry at once.
    assert!(f.workers.get_mut("w1").unwrap().terminate(DEADLINE));
    let workers: Vec<krest_schemas::WorkerInfo> =
        client.call(Op::WorkersList, &json!({})).await.unwrap();
    assert!(workers.is_empty(), "{workers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_and_workers_started_before_nats_wait_for_it() {
    let mut nats = NatsServer::start();
    nats.kill();
    let mut f = Fleet::new("nats-late", nats.url());
    f.start_node("a", &[]);
    f.start_worker("w1", &[]);
    eventually(DEADLINE, "the node to report NATS unreachable", || async {
        f.nodes["a"]
            .output()
            .contains(&format!(
                "cannot connect to NATS at {}; retrying",
                nats.url()
            ))
            .then_some(())
    })
    .await;
    eventually(
        DEADLINE,
        "the worker to report NATS unreachable",
        || async {
            f.workers["w1"]
                .output()
                .contains("cannot connect to NATS; retrying")
                .then_some(())
        },
    )
    .await;
    nats.start_again();
    let client = f.client().await;
    apply(&client, vec![every_second("tick")]).await;
    more_runs(&client, "f.tick", 0, 3).await;
    assert_history(&settled(&client, "f.tick").await, &f.journal());
}

/// The value of the sample `series` (name with its labels, as printed) in a Prometheus text
/// exposition.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_fires_runs_lateness_and_workers() {
    let nats = NatsServer::start();
    let mut f = Fleet::new("metrics", nats.url());
    f.start_node("a", &["--log-format", "json"]);
    f.start_worker("w1", &["--log-format", "json"]);
    let client = f.client().await;
    apply(&client, vec![every_second("tick")]).await;
    more_runs(&client, "f.tick", 0, 3).await;
    let status: ClusterStatus = client.call(Op::ClusterStatus, &json!({})).await.unwrap();
    let http = status.nodes[0].http_addr.clone().unwrap();

    // The one node leads, but may lose its lease for a moment on a machine loaded enough to
    // delay a renewal past the lease's TTL (seen once in CI, a fire 10 s late): wait for a
    // scrape where it leads.
    let body = eventually(
        DEADLINE,
        "metrics of three recorded runs, from the leader",
        || async {
            let body = http_body(&http, "/metrics")?;
            let ended = sample(&body, "krest_runs_ended_total{status=\"SUCCEEDED\"}")?;
            (ended >= 3.0 && sample(&body, "krest_leader") == Some(1.0)).then_some(body)
        },
    )
    .await;
    let head = http_get(&http, "/metrics").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(sample(&body, "krest_leader"), Some(1.0), "{body}");
    assert!(sample(&body, "krest_leader_epoch").unwrap() >= 1.0);
    assert!(
        sample(&body, "krest_fires_total{trigger=\"SCHEDULE\"}").unwrap() >= 3.0,
        "{body}"
    );
    assert!(
        sample(&body, "krest_dispatch_lateness_seconds_count").unwrap() >= 3.0,
        "{body}"
    );
    assert!(
        sample(&body, "krest_handler_start_lateness_seconds_count").unwrap() >= 3.0,
        "{body}"
    );
    assert!(
        sample(&body, "krest_run_duration_seconds_count").unwrap() >= 3.0,
        "{body}"
    );
    assert_eq!(sample(&body, "krest_dispatch_errors_total"), Some(0.0));
    assert_eq!(sample(&body, "krest_jobs"), Some(1.0));
    assert_eq!(
        sample(&body, &format!("krest_workers_live{{app=\"{APP}\"}}")),
        Some(1.0),
        "{body}"
    );
    assert_eq!(sample(&body, "krest_recorder_failing"), Some(0.0));
    // Well formed: every sample belongs to a metric declared with HELP and TYPE before it.
    let mut declared = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            declared.insert(rest.split(' ').next().unwrap().to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| declared.contains(*b)))
            .unwrap_or(name);
        assert!(declared.contains(base), "undeclared sample: {line}");
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
    }

    // --log-format json: every line of both processes is a JSON object; the worker's lines
    // about an attempt carry its run, job, shard and attempt.
    for p in [&f.nodes["a"], &f.workers["w1"]] {
        for line in p.output().lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", p.name()));
            assert!(
                v["level"].is_string() && v["timestamp"].is_string(),
                "{line}"
            );
        }
    }
    let ended = f.workers["w1"]
        .output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "attempt ended")
        .expect("an `attempt ended` line");
    let run = &ended["spans"][0];
    assert_eq!(run["name"], "run", "{ended}");
    assert!(
        run["run"].as_str().unwrap().starts_with("f.tick."),
        "{ended}"
    );
    assert_eq!(run["job"], "f.tick");
    assert_eq!(run["attempt"], 1);
    assert_eq!(ended["fields"]["outcome"], "SUCCEEDED");
}

/// Runs `krest scheduler --db <db>` against a NATS URL where nothing listens and returns its
/// exit code and stderr once it exits.
async fn scheduler_exit(db: &str, dir: &std::path::Path) -> (Option<i32>, String) {
    let nats = format!("nats://127.0.0.1:{}", krest_test_support::free_port());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_krest"));
    cmd.args([
        "scheduler",
        "--nats-url",
        &nats,
        "--db",
        db,
        "--http",
        "off",
    ])
    .current_dir(dir);
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .expect("the node to exit")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_unreachable_database_stops_the_node_before_it_connects_to_nats() {
    let dir = krest_test_support::TestDir::new("bad-db");
    let server = krest_test_support::postgres_server_url();
    let base = server.rsplit_once('/').unwrap().0.to_string();
    let cases = [
        // Nothing listens on port 1.
        (
            "postgres://krest:s3cret@127.0.0.1:1/krest".to_string(),
            "cannot open the database at postgres://<redacted>@127.0.0.1:1/krest: ",
            "check that PostgreSQL runs",
        ),
        (
            format!("{base}/krest_no_such_database"),
            "cannot open the database at ",
            "the database does not exist",
        ),
        (
            format!("sqlite://{}/missing/dir/a.db", dir.path().display()),
            "cannot open the database at sqlite://",
            "check that the file's directory exists",
        ),
        (
            "mysql://root:s3cret@127.0.0.1/krest".to_string(),
            "unsupported database URL `mysql://<redacted>@127.0.0.1/krest`",
            "postgres://USER",
        ),
    ];
    for (db, what, hint) in cases {
        let (code, err) = scheduler_exit(&db, dir.path()).await;
        assert_eq!(code, Some(1), "{db}: {err}");
        assert!(err.contains(what), "{db}: {err}");
        assert!(err.contains(hint), "{db}: {err}");
        assert!(!err.contains("s3cret"), "{db}: {err}");
        // Before NATS: the node never tried to connect.
        assert!(!err.contains("NATS"), "{db}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_started_late_says_it_is_catching_up_until_it_is_current() {
    let nats = NatsServer::start();
    let mut f = Fleet::new("catching-up", nats.url());
    f.start_node("a", &[]);
    f.start_worker("w1", &[]);
    let client = f.client().await;
    apply(&client, vec![every_second("tick")]).await;
    more_runs(&client, "f.tick", 0, 3).await;
    // Node a stops: the node started late answers alone.
    assert!(f.nodes.get_mut("a").unwrap().terminate(DEADLINE));
    assert!(f.workers.get_mut("w1").unwrap().terminate(DEADLINE));
    // Node b's database exists, and another process holds its write lock: b starts, replays
    // nothing until the lock is released, and says so meanwhile.
    let db = f.dir.join("b.db");
    krest::record::store::Store::open(&format!("sqlite://{}", db.display()))
        .await
        .unwrap()
        .close()
        .await;
    let mut lock = sqlx_lock(&db).await;
    f.start_node("b", &[]);
    // (stdout, stderr) of a successful `krest` command.
    let cli = |args: &[&str]| {
        let out = f.krest().args(args).output().unwrap();
        out.status.success().then(|| {
            (
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        })
    };
    let notice = eventually(DEADLINE, "runs list to say b is catching up", || async {
        let (_, err) = cli(&["runs", "list", "--job", "f.tick"])?;
        err.contains("notice: node b is catching up on the events stream: ")
            .then_some(err)
    })
    .await;
    assert!(notice.contains("recent runs may be missing"), "{notice}");
    let (_, err) = cli(&["-o", "json", "runs", "list"]).unwrap();
    assert!(err.contains("notice: node b is catching up"), "{err}");
    let http = eventually(DEADLINE, "b's presence", || async {
        let status: ClusterStatus = client.call(Op::ClusterStatus, &json!({})).await.ok()?;
        status.nodes.into_iter().find(|n| n.node == "b")?.http_addr
    })
    .await;
    let body = http_body(&http, "/readyz").unwrap();
    assert!(body.contains(r#""catchingUp":true"#), "{body}");

    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    drop(lock);
    let out = eventually(DEADLINE, "b to be current", || async {
        let (out, err) = cli(&["runs", "list", "--job", "f.tick"])?;
        (!err.contains("catching up")).then_some(out)
    })
    .await;
    assert!(out.lines().count() > 3, "the runs recorded by b: {out}");
    let run_id = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let (_, err) = cli(&["runs", "get", run_id]).unwrap();
    assert!(!err.contains("catching up"), "{err}");
    let body = http_body(&http, "/readyz").unwrap();
    assert!(body.contains(r#""catchingUp":false"#), "{body}");
}
