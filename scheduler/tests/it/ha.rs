//! Leadership: one leader among several nodes, failover after SIGKILL with catch-up and no
//! duplicate, lease released on a clean stop.

use std::collections::BTreeMap;

use krest::leader::lease::Role;
use krest_schemas::api::{RunStatus, RunSummary};
use krest_schemas::names::{LEADER_BUCKET, LEADER_KEY};
use krest_schemas::Trigger;
use krest_test_support::eventually;
use krest_worker::JobContext;
use serde_json::json;

use crate::harness::*;

const APP: &str = "ha-app";

/// Applies the job `tick`: every second, on the counting worker's handler.
async fn apply_tick(client: &krest::cli::client::Client) {
    apply(
        client,
        vec![job("tick", APP, "tick", json!({"cron": "* * * * * ?"}))],
    )
    .await;
}

fn counting_worker(env: &Env, instance: &str, log: Executions) -> krest_worker::RunningWorker {
    env.worker(APP, instance)
        .slots(8)
        .handler("tick", move |ctx: JobContext| {
            let log = log.clone();
            async move {
                log.record(&ctx);
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn()
}

/// Checks the recorded runs of a job firing every second: from the first to the last fire time
/// there is exactly one run per second, each executed exactly once, all finished.
fn assert_one_run_per_second(runs: &[RunSummary], log: &Executions) {
    let mut by_time: BTreeMap<i64, Vec<&RunSummary>> = BTreeMap::new();
    for r in runs {
        by_time
            .entry(r.scheduled_at.unwrap().timestamp_millis())
            .or_default()
            .push(r);
    }
    let first = *by_time.keys().next().unwrap();
    let last = *by_time.keys().last().unwrap();
    let mut t = first;
    while t <= last {
        let at = by_time.get(&t).map_or(0, Vec::len);
        assert_eq!(
            at,
            1,
            "fire time {t} has {at} runs; runs: {:#?}",
            by_time.keys().collect::<Vec<_>>()
        );
        t += 1000;
    }
    // The tests end by pausing the job: a fire dispatched ahead of its time (`--dispatch-ahead`)
    // is then cancelled before it runs — only the last fires, never executed.
    let paused = |r: &RunSummary| {
        r.status == RunStatus::Cancelled
            && r.error
                .as_deref()
                .is_some_and(|e| e.contains("the job was paused before this fire's time"))
    };
    let last_run = runs
        .iter()
        .filter(|r| !paused(r))
        .filter_map(|r| r.scheduled_at)
        .max();
    for r in runs.iter().filter(|r| paused(r)) {
        assert!(
            r.scheduled_at > last_run,
            "cancelled by the pause before a later run: {r:?}"
        );
        assert!(log.of(&r.run_id).is_empty(), "{r:?}");
    }
    for r in runs.iter().filter(|r| !paused(r)) {
        assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
        let executions = log.of(&r.run_id);
        assert_eq!(
            executions.len(),
            1,
            "run {} executed {executions:?}",
            r.run_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_elect_one_leader_and_never_fire_twice() {
    two_nodes_one_leader(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_sharing_postgres_elect_one_leader_and_record_each_run_once() {
    two_nodes_one_leader(Db::Postgres).await;
}

async fn two_nodes_one_leader(db: Db) {
    let env = Env::new("two-nodes").on(db);
    let n1 = env.node("n1");
    let n2 = env.node("n2");
    let client = env.client().await;
    let log = Executions::default();
    let w = counting_worker(&env, "w1", log.clone());
    apply_tick(&client).await;

    let runs_seen = eventually(DEADLINE, "eight finished runs", || async {
        let r: Vec<_> = runs(&client, "tick")
            .await
            .into_iter()
            .filter(|r| r.status.is_final())
            .collect();
        (r.len() >= 8).then_some(r)
    })
    .await;

    // Both nodes are up (a node still creating the streams has no election yet: the other may
    // have fired eight runs by then), and exactly one holds the lease; the cluster status agrees.
    eventually(DEADLINE, "both nodes in the election", || async {
        [&n1, &n2]
            .iter()
            .all(|n| n.leadership.borrow().is_some())
            .then_some(())
    })
    .await;
    let roles: Vec<Role> = [&n1, &n2]
        .iter()
        .map(|n| n.leadership.borrow().as_ref().unwrap().role())
        .collect();
    assert_eq!(
        roles
            .iter()
            .filter(|r| matches!(r, Role::Leader { .. }))
            .count(),
        1,
        "{roles:?}"
    );
    let leader = leader(&client).await.unwrap();
    let expected = if matches!(roles[0], Role::Leader { .. }) {
        "n1"
    } else {
        "n2"
    };
    assert_eq!(leader, expected);

    w.stop().await.unwrap();
    // Both nodes record the same history (each into its own database, or both into one).
    assert_one_run_per_second(&runs_seen, &log);
    if db == Db::Postgres {
        assert_recorded_once(&env, &log).await;
    }
    n1.stop().await.unwrap();
    n2.stop().await.unwrap();
}

/// With one shared Postgres database: once every execution is recorded, there is one attempt
/// row per execution, one succeeded run row per run executed, and no other run is final.
async fn assert_recorded_once(env: &Env, log: &Executions) {
    let count = |sql: &str| -> usize { env.pg_query(sql).parse().unwrap() };
    let (executed_runs, executions) = log.totals();
    eventually(DEADLINE, "every execution recorded", || async {
        (count("SELECT COUNT(*) FROM attempts WHERE finished_at IS NOT NULL") == executions)
            .then_some(())
    })
    .await;
    assert_eq!(count("SELECT COUNT(*) FROM attempts"), executions);
    // (The job keeps firing: runs dispatched since the worker stopped are pending.)
    assert_eq!(
        env.pg_query(
            "SELECT COUNT(*) FILTER (WHERE status = 'SUCCEEDED') || ' ' || \
             COUNT(*) FILTER (WHERE status NOT IN ('SUCCEEDED', 'PENDING')) FROM runs"
        ),
        format!("{executed_runs} 0")
    );
    assert_eq!(count("SELECT COALESCE(MAX(attempts), 0) FROM runs"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_leader_fails_over_and_catches_up_each_missed_fire_once() {
    failover(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_leader_sharing_postgres_fails_over_and_records_each_run_once() {
    failover(Db::Postgres).await;
}

async fn failover(db: Db) {
    let env = Env::new("failover").on(db);
    let mut a = env.node_process("a");
    let mut b = env.node_process("b");
    let client = env.client().await;
    let log = Executions::default();
    let w = counting_worker(&env, "w1", log.clone());
    apply_tick(&client).await;

    eventually(DEADLINE, "three finished runs", || async {
        (runs(&client, "tick")
            .await
            .iter()
            .filter(|r| r.status.is_final())
            .count()
            >= 3)
            .then_some(())
    })
    .await;
    // The leader records its progress as one fire watermark per round, not a state per job.
    let raw = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(raw);
    let state = js.get_key_value("krest-state").await.unwrap();
    let jobs = js.get_key_value("krest-jobs").await.unwrap();
    let watermark = || async {
        let w = state.get("watermark").await.unwrap()?;
        Some(serde_json::from_slice::<krest_schemas::FireWatermark>(&w).unwrap())
    };
    let job_revision = jobs.entry("t.tick").await.unwrap().unwrap().revision;
    let before = watermark().await.expect("a fire watermark");
    assert!(before.jobs_revision >= job_revision, "{before:?}");
    assert!(
        state.get("t.tick").await.unwrap().is_none(),
        "no per-job state"
    );
    let first_leader = leader(&client).await.unwrap();
    let (dead, survivor) = if first_leader == "a" {
        (&mut a, "b")
    } else {
        (&mut b, "a")
    };
    dead.kill9();
    let killed_at = chrono::Utc::now();

    // The survivor takes over (the lease expires after its TTL) and keeps firing.
    eventually(DEADLINE, "the survivor to lead", || async {
        (leader(&client).await.as_deref() == Some(survivor)).then_some(())
    })
    .await;
    let after = eventually(
        DEADLINE,
        "five finished runs after the takeover",
        || async {
            let all = runs(&client, "tick").await;
            let late: Vec<_> = all
                .iter()
                .filter(|r| {
                    r.status.is_final()
                        && r.scheduled_at.unwrap() > killed_at + chrono::Duration::seconds(5)
                })
                .collect();
            (late.len() >= 5).then_some(all)
        },
    )
    .await;
    // Fires missed while nobody led were caught up: each once, marked as catch-up.
    let all: Vec<RunSummary> = eventually(DEADLINE, "all runs finished", || async {
        let all = runs(&client, "tick").await;
        let newest = after.iter().map(|r| r.scheduled_at).max().flatten();
        let upto: Vec<_> = all
            .into_iter()
            .filter(|r| r.scheduled_at <= newest)
            .collect();
        upto.iter().all(|r| r.status.is_final()).then_some(upto)
    })
    .await;
    assert!(
        all.iter().any(|r| r.trigger == Some(Trigger::CatchUp)),
        "some fire fell into the leaderless gap and was caught up: {:#?}",
        all.iter()
            .map(|r| (r.scheduled_at, r.trigger))
            .collect::<Vec<_>>()
    );
    // The new leader writes the watermark from now on.
    let after = watermark().await.unwrap();
    assert!(
        after.epoch > before.epoch && after.node == survivor && after.through > before.through,
        "{before:?} → {after:?}"
    );
    w.stop().await.unwrap();
    assert_one_run_per_second(&all, &log);
    if db == Db::Postgres {
        // Both nodes' recorders wrote into the database until one was killed.
        assert_recorded_once(&env, &log).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_stop_releases_the_lease_to_a_standby() {
    let env = Env::new("release");
    let n1 = env.node("n1");
    let client = env.client().await;
    eventually(DEADLINE, "n1 to lead", || async {
        (leader(&client).await.as_deref() == Some("n1")).then_some(())
    })
    .await;
    let n2 = env.node("n2");
    eventually(DEADLINE, "n2 to be a standby", || async {
        client
            .call::<_, krest_schemas::api::ClusterStatus>(
                krest_schemas::api::Op::ClusterStatus,
                &json!({}),
            )
            .await
            .ok()
            .filter(|s| s.nodes.iter().any(|n| n.node == "n2"))
    })
    .await;
    n1.stop().await.unwrap();

    // The lease was deleted, not left to expire.
    let nats = async_nats::connect(env.url()).await.unwrap();
    let kv = async_nats::jetstream::new(nats)
        .get_key_value(LEADER_BUCKET)
        .await
        .unwrap();
    let entry = kv.entry(LEADER_KEY).await.unwrap();
    let released = entry
        .as_ref()
        .is_none_or(|e| e.operation != async_nats::jetstream::kv::Operation::Put)
        || entry
            .as_ref()
            .is_some_and(|e| String::from_utf8_lossy(&e.value).contains("\"node\":\"n2\""));
    assert!(released, "lease after a clean stop: {entry:?}");
    eventually(DEADLINE, "n2 to lead", || async {
        (leader(&client).await.as_deref() == Some("n2")).then_some(())
    })
    .await;
    n2.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_task_dies_stops_and_a_standby_takes_over() {
    let env = Env::new("task-dies");
    let n1 = env.node("n1");
    let client = env.client().await;
    eventually(DEADLINE, "n1 to lead", || async {
        (leader(&client).await.as_deref() == Some("n1")).then_some(())
    })
    .await;
    let n2 = env.node("n2");
    let n3 = env.node("n3");
    let log = Executions::default();
    let w = counting_worker(&env, "w1", log.clone());
    apply_tick(&client).await;
    eventually(DEADLINE, "three finished runs", || async {
        let done = runs(&client, "tick").await;
        (done.iter().filter(|r| r.status.is_final()).count() >= 3).then_some(())
    })
    .await;
    assert_eq!(
        n1.tasks.names(),
        [
            "api",
            "dead-letter",
            "election",
            "engine",
            "job-watcher",
            "presence",
            "recorder",
            "registry",
            "retention"
        ]
    );

    // The leader's engine dies: the node stops, saying which task, and hands over its lease.
    assert!(n1.tasks.abort("engine"));
    let ended = n1.ended().await;
    assert!(
        matches!(
            ended,
            Err(krest::node::NodeError::TaskEnded { task: "engine", .. })
        ),
        "{ended:?}"
    );
    let taken_over = eventually(DEADLINE, "a standby to lead", || async {
        leader(&client).await.filter(|l| l != "n1")
    })
    .await;
    let runs_before = runs(&client, "tick").await.len();
    eventually(DEADLINE, "three more runs under the new leader", || async {
        (runs(&client, "tick")
            .await
            .iter()
            .filter(|r| r.status.is_final())
            .count()
            >= runs_before + 3)
            .then_some(())
    })
    .await;

    // A standby's task dying stops that node too (a node that only seems healthy is worse).
    let (standby, new_leader) = if taken_over == "n2" {
        (n3, n2)
    } else {
        (n2, n3)
    };
    assert!(standby.tasks.abort("recorder"));
    let ended = standby.ended().await;
    assert!(
        matches!(
            ended,
            Err(krest::node::NodeError::TaskEnded {
                task: "recorder",
                ..
            })
        ),
        "{ended:?}"
    );
    // Through all of it: one run per second, each executed once.
    let all = pause_and_wait_for_the_end(&client, "tick").await;
    w.stop().await.unwrap();
    assert_one_run_per_second(&all, &log);
    new_leader.stop().await.unwrap();
}

/// A standby still reading the jobs bucket does not campaign: when the leader dies it leaves
/// the lease free (rather than win it and fire nothing while it loads), says so on `/readyz`,
/// and takes the lease as soon as its job table is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_still_loading_its_jobs_takes_the_lease_only_once_loaded() {
    let env = Env::new("loading-standby");
    let n1 = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let w = counting_worker(&env, "w1", log.clone());
    apply_tick(&client).await;
    eventually(DEADLINE, "n1 to lead and fire", || async {
        let led = leader(&client).await.as_deref() == Some("n1");
        let fired = runs(&client, "tick")
            .await
            .iter()
            .any(|r| r.status.is_final());
        (led && fired).then_some(())
    })
    .await;

    // n2 reads the whole jobs bucket, but its table is held as loading (the test hook).
    let mut opts = env.node_opts("n2");
    opts.http_addr = Some("127.0.0.1:0".parse().unwrap());
    let n2 = krest::node::spawn_holding_load(opts);
    let addr = eventually(DEADLINE, "n2 to have read the jobs and be live", || async {
        if n2.jobs().len() != 1 || n2.leadership.borrow().is_none() {
            return None;
        }
        let status: krest_schemas::api::ClusterStatus = client
            .call(krest_schemas::api::Op::ClusterStatus, &json!({}))
            .await
            .ok()?;
        status
            .nodes
            .into_iter()
            .find(|n| n.node == "n2")
            .and_then(|n| n.http_addr)
    })
    .await;
    let http = Web::new(&format!("http://{addr}"), None);
    let (code, body) = http.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["role"], "standby", "{body}");
    assert_eq!(body["jobs"], "loading jobs: 1 read", "{body}");
    // `cluster status` says so too (the node's presence, written every 2 s).
    eventually(DEADLINE, "cluster status showing n2 loading", || async {
        let (code, out, _) = env.cli(&["cluster", "status"]);
        let row = out.lines().find(|l| l.starts_with("n2 "))?;
        (code == 0 && row.contains("STANDBY (loading jobs: 1 read)")).then_some(())
    })
    .await;
    let n2_leadership = n2.leadership.borrow().clone().unwrap();

    // The leader dies without releasing its lease; the lease expires by its TTL.
    n1.abort();
    let raw = async_nats::connect(env.url()).await.unwrap();
    let lease_kv = async_nats::jetstream::new(raw)
        .get_key_value(LEADER_BUCKET)
        .await
        .unwrap();
    let lease = || async {
        lease_kv
            .entry(LEADER_KEY)
            .await
            .unwrap()
            .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
            .map(|e| String::from_utf8_lossy(&e.value).to_string())
    };
    eventually(DEADLINE, "n1's lease to end", || async {
        (!lease().await.is_some_and(|l| l.contains("\"node\":\"n1\""))).then_some(())
    })
    .await;
    // Two more rounds of n2's election with the lease free: a node that may campaign takes a
    // free lease in the first of them.
    let rounds = n2_leadership.rounds();
    eventually(DEADLINE, "two more election rounds of n2", || async {
        (n2_leadership.rounds() >= rounds + 2).then_some(())
    })
    .await;
    assert_eq!(lease().await, None, "a node still loading took the lease");
    assert_eq!(n2_leadership.role(), Role::Standby);
    assert_eq!(leader(&client).await, None);
    let (code, body) = http.get("/readyz").await;
    assert_eq!((code, &body["jobs"]), (503, &json!("loading jobs: 1 read")));

    // Loaded: it campaigns at once, leads, fires and says it is ready.
    let released_at = chrono::Utc::now();
    n2.jobs().release_load();
    eventually(DEADLINE, "n2 to lead", || async {
        (leader(&client).await.as_deref() == Some("n2")).then_some(())
    })
    .await;
    eventually(DEADLINE, "a run fired by n2", || async {
        runs(&client, "tick")
            .await
            .iter()
            .any(|r| r.status.is_final() && r.scheduled_at.is_some_and(|t| t > released_at))
            .then_some(())
    })
    .await;
    let body = eventually(DEADLINE, "n2 to be ready", || async {
        let (code, body) = http.get("/readyz").await;
        (code == 200).then_some(body)
    })
    .await;
    eventually(DEADLINE, "n2's presence without `loading`", || async {
        let status: krest_schemas::api::ClusterStatus = client
            .call(krest_schemas::api::Op::ClusterStatus, &json!({}))
            .await
            .ok()?;
        status
            .nodes
            .iter()
            .any(|n| n.node == "n2" && n.loading.is_none())
            .then_some(())
    })
    .await;
    assert_eq!(
        (&body["jobs"], &body["role"]),
        (&json!("loaded"), &json!("leader"))
    );
    w.stop().await.unwrap();
    n2.stop().await.unwrap();
}

/// Sends `sig` (`-STOP`, `-CONT`) to the test's nats-server.
fn signal_nats(env: &Env, sig: &str) {
    let pid = env.nats.pid().expect("nats-server running");
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// A node whose lease lives `ttl` (the bucket's max age; the first node creates it).
fn node_with_ttl(env: &Env, node: &str, ttl: std::time::Duration) -> krest::node::RunningNode {
    let mut opts = env.node_opts(node);
    opts.infra.lease_ttl = ttl;
    krest::node::spawn(opts)
}

async fn leadership_of(node: &krest::node::RunningNode) -> krest::leader::lease::Leadership {
    eventually(DEADLINE, "the node's election", || async {
        node.leadership.borrow().clone()
    })
    .await
}

/// The lease as a node writes it.
fn lease_of(node: &str) -> bytes::Bytes {
    serde_json::to_vec(&krest_schemas::LeaderLease {
        node: node.to_string(),
        epoch: 0,
        acquired_at: chrono::Utc::now(),
        renewed_at: chrono::Utc::now(),
    })
    .unwrap()
    .into()
}

/// NATS frozen for longer than a renewal's timeout, but well within the lease's validity, moves
/// nothing: the leader's renewals time out, it keeps its lease and epoch (no step-down, no
/// election), goes on renewing from the right revision once NATS answers, and keeps firing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_keeps_its_lease_through_a_nats_freeze_within_its_validity() {
    let env = Env::new("lease-freeze");
    // Valid for 20 s − 3.3 s after each renewal sent: far longer than the freeze below.
    let ttl = std::time::Duration::from_secs(20);
    let n1 = node_with_ttl(&env, "n1", ttl);
    let client = env.client().await;
    let log = Executions::default();
    let w = counting_worker(&env, "w1", log.clone());
    apply_tick(&client).await;
    let leadership = leadership_of(&n1).await;
    let epoch = eventually(DEADLINE, "n1 to lead and fire", || async {
        let Role::Leader { epoch } = leadership.role() else {
            return None;
        };
        let fired = runs(&client, "tick")
            .await
            .iter()
            .any(|r| r.status.is_final());
        fired.then_some(epoch)
    })
    .await;
    let n2 = node_with_ttl(&env, "n2", ttl);
    let n2_leadership = leadership_of(&n2).await;
    eventually(DEADLINE, "n2 to campaign", || async {
        (n2_leadership.rounds() >= 1).then_some(())
    })
    .await;
    let mut roles = leadership.watch();
    roles.borrow_and_update();
    let mut n2_roles = n2_leadership.watch();
    n2_roles.borrow_and_update();

    // Frozen until two rounds of n1's election have ended: the second was sent to the frozen
    // server, so it ended by its timeout.
    signal_nats(&env, "-STOP");
    let rounds = leadership.rounds();
    eventually(DEADLINE, "two rounds of n1 with NATS frozen", || async {
        (leadership.rounds() >= rounds + 2).then_some(())
    })
    .await;
    assert_eq!(leadership.valid_epoch(), Some(epoch), "still valid, frozen");
    signal_nats(&env, "-CONT");
    let resumed = chrono::Utc::now();

    // Renewed again, from the revision the timed-out renewals left, under the same epoch.
    let raw = async_nats::connect(env.url()).await.unwrap();
    let lease_kv = async_nats::jetstream::new(raw)
        .get_key_value(LEADER_BUCKET)
        .await
        .unwrap();
    eventually(
        DEADLINE,
        "a renewal of n1's lease after the freeze",
        || async {
            let entry = lease_kv.entry(LEADER_KEY).await.ok()??;
            let lease: krest_schemas::LeaderLease = serde_json::from_slice(&entry.value).ok()?;
            (lease.node == "n1" && lease.epoch == epoch && lease.renewed_at > resumed).then_some(())
        },
    )
    .await;
    eventually(DEADLINE, "two runs fired after the freeze", || async {
        let fired = runs(&client, "tick")
            .await
            .into_iter()
            .filter(|r| r.status.is_final() && r.scheduled_at.is_some_and(|t| t > resumed))
            .count();
        (fired >= 2).then_some(())
    })
    .await;
    assert!(!roles.has_changed().unwrap(), "n1's role changed");
    assert_eq!(leadership.role(), Role::Leader { epoch });
    assert_eq!(leadership.valid_epoch(), Some(epoch));
    assert!(!n2_roles.has_changed().unwrap(), "n2's role changed");
    assert_eq!(n2_leadership.role(), Role::Standby);

    // Every fire once, all dispatched by n1 under its one epoch.
    let all = pause_and_wait_for_the_end(&client, "tick").await;
    w.stop().await.unwrap();
    assert!(
        all.iter()
            .all(|r| r.node.as_deref() == Some("n1") && r.epoch == Some(epoch)),
        "{all:#?}"
    );
    assert_one_run_per_second(&all, &log);
    n2.stop().await.unwrap();
    n1.stop().await.unwrap();
}

/// A leader whose lease someone else took — the key overwritten, or deleted and created again
/// — steps down at its next renewal, long before its own validity would end, and does not take
/// the other holder's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_lease_was_taken_steps_down_at_once() {
    let env = Env::new("lease-taken");
    // Valid for 100 s after each renewal: longer than any wait below, so only the renewal can
    // end leadership here.
    let n1 = node_with_ttl(&env, "n1", std::time::Duration::from_secs(120));
    let leadership = leadership_of(&n1).await;
    let leads = || async {
        match leadership.role() {
            Role::Leader { epoch } => Some(epoch),
            Role::Standby => None,
        }
    };
    eventually(DEADLINE, "n1 to lead", leads).await;
    let raw = async_nats::connect(env.url()).await.unwrap();
    let lease_kv = async_nats::jetstream::new(raw)
        .get_key_value(LEADER_BUCKET)
        .await
        .unwrap();
    let standby = || async {
        (leadership.role() == Role::Standby && leadership.valid_epoch().is_none()).then_some(())
    };

    // Overwritten by another node's lease.
    let taken = lease_kv
        .put(LEADER_KEY, lease_of("intruder"))
        .await
        .unwrap();
    eventually(DEADLINE, "n1 to step down", standby).await;
    // It leaves the other node's lease alone.
    let rounds = leadership.rounds();
    eventually(DEADLINE, "two more rounds of n1", || async {
        (leadership.rounds() >= rounds + 2).then_some(())
    })
    .await;
    assert_eq!(leadership.role(), Role::Standby);
    let entry = lease_kv.entry(LEADER_KEY).await.unwrap().unwrap();
    assert_eq!(entry.revision, taken, "the intruder's lease was replaced");

    // Released: n1 leads again, under a new epoch.
    lease_kv.delete(LEADER_KEY).await.unwrap();
    let second = eventually(DEADLINE, "n1 to lead again", leads).await;
    assert!(second > taken, "epoch {second} after {taken}");

    // Deleted and created again by another node (if n1 took it back in between, again).
    loop {
        eventually(DEADLINE, "n1 to lead", leads).await;
        lease_kv.delete(LEADER_KEY).await.unwrap();
        match lease_kv.create(LEADER_KEY, lease_of("other")).await {
            Ok(_) => break,
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => panic!("{e}"),
        }
    }
    eventually(DEADLINE, "n1 to step down", standby).await;
    let entry = lease_kv.entry(LEADER_KEY).await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&entry.value).contains("\"node\":\"other\""),
        "{entry:?}"
    );
    n1.stop().await.unwrap();
}

/// Pauses `job` and waits until every run of it has ended; returns them.
async fn pause_and_wait_for_the_end(
    client: &krest::cli::client::Client,
    job: &str,
) -> Vec<krest_schemas::api::RunSummary> {
    let _: krest_schemas::api::JobView = client
        .call(
            krest_schemas::api::Op::JobPause,
            &krest_schemas::api::JobRequest::new(job),
        )
        .await
        .unwrap();
    eventually(DEADLINE, "all runs finished", || async {
        let all = runs(client, job).await;
        all.iter().all(|r| r.status.is_final()).then_some(all)
    })
    .await
}
