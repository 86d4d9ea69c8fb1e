//! Dispatch straight through the publisher: large batches complete (the pipelining window
//! never deadlocks on the client's ack permits) and a second publish of the same fires stores
//! nothing. Dispatch ahead of the fire time: runs start on time and never before it, only with
//! workers that hold them, and a pause cancels what was dispatched ahead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use krest::infra::{self, InfraConfig};
use krest::jobs::JobEntry;
use krest::leader::dispatch::{Fire, Publisher};
use krest_schemas::api::{RunStatus, RunSummary};
use krest_schemas::names::WORK_STREAM;
use krest_schemas::{parse_job, StoredJob, Trigger};
use krest_test_support::eventually;
use krest_worker::JobContext;
use serde_json::json;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_ack_window_is_stored_once() {
    let env = Env::new("dispatch");
    let client = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let infra = infra::ensure(&js, &InfraConfig::default()).await.unwrap();
    let items: Vec<u32> = (0..1000).collect();
    let spec = parse_job(&json!({"appName": "a", "jobName": "big", "path": "p", "jobType": "SHARDING", "args": items})).unwrap();
    let now = Utc::now();
    let job = Arc::new(JobEntry {
        stored: StoredJob {
            spec,
            created_at: now,
            updated_at: now,
            version: 1,
        },
        revision: 1,
        version: 1,
    });
    // 7 fires × 1000 shards: 7007 messages in one call, more than the context's 5000 permits.
    let fires: Vec<Fire> = (0..7)
        .map(|i| {
            Fire::scheduled(
                job.clone(),
                now + chrono::Duration::seconds(i),
                Trigger::Schedule,
                0,
            )
        })
        .collect();
    let publisher = Publisher::new(js.clone(), "n1".into(), infra.delivery.clone());
    assert!(publisher.publish(&fires).await.iter().all(Result::is_ok));
    let stream = js.get_stream(WORK_STREAM).await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 7000);
    // The same fires again, as a second leader would publish them: all duplicates.
    assert!(publisher.publish(&fires).await.iter().all(Result::is_ok));
    assert_eq!(stream.get_info().await.unwrap().state.messages, 7000);
    let last = krest_schemas::JobState {
        last_fire_at: fires[6].scheduled_at,
        last_run_id: fires[6].run_id.clone(),
        queued: None,
    };
    publisher
        .write_states(&[("default.big", &last)], None)
        .await
        .unwrap();
    let state = js
        .get_key_value("krest-state")
        .await
        .unwrap()
        .get("default.big")
        .await
        .unwrap()
        .unwrap();
    let state: krest_schemas::JobState = serde_json::from_slice(&state).unwrap();
    assert_eq!(state.last_fire_at, fires[6].scheduled_at);
}

const AHEAD_APP: &str = "ahead-app";

/// (run id, scheduled time, start time by this machine's clock) of every execution.
type Noted = Arc<Mutex<Vec<(String, chrono::DateTime<Utc>, chrono::DateTime<Utc>)>>>;

/// A worker of `AHEAD_APP` whose `note` handler notes every execution.
fn noting_worker(env: &Env, instance: &str) -> (krest_worker::RunningWorker, Noted) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let w = env
        .worker(AHEAD_APP, instance)
        .slots(8)
        .handler("note", move |ctx: JobContext| {
            let started = Utc::now();
            log.lock()
                .unwrap()
                .push((ctx.run_id().to_string(), ctx.scheduled_at(), started));
            async move { Ok(()) }
        })
        .build()
        .unwrap()
        .spawn();
    (w, seen)
}

async fn finished(client: &krest::cli::client::Client, job: &str, n: usize) -> Vec<RunSummary> {
    eventually(DEADLINE, &format!("{n} finished runs of {job}"), || async {
        let r: Vec<_> = runs(client, job)
            .await
            .into_iter()
            .filter(|r| r.status.is_final())
            .collect();
        (r.len() >= n).then_some(r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_dispatched_ahead_start_at_their_time_and_never_before() {
    let env = Env::new("ahead");
    let mut opts = env.node_opts("n1");
    opts.engine.dispatch_ahead = Duration::from_secs(2);
    let node = krest::node::spawn(opts);
    let client = env.client().await;
    let (w, seen) = noting_worker(&env, "w1");
    eventually(DEADLINE, "the worker's heartbeat", || async {
        (!client_workers(&client).await.is_empty()).then_some(())
    })
    .await;
    apply(
        &client,
        vec![job("tick", AHEAD_APP, "note", json!({"every": "1s"}))],
    )
    .await;
    let done = finished(&client, "tick", 5).await;
    for r in &done {
        assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    }
    // Every execution started at or after its fire time, by the clock the fire time is on.
    let executions = seen.lock().unwrap().clone();
    assert!(executions.len() >= 5);
    for (run, due, started) in &executions {
        assert!(
            started >= due,
            "{run} started at {started}, before its time {due}"
        );
    }
    // And the runs were on the bus before their time: with a 2 s lead on a 1 s rate, a
    // dispatch late by more than the lead every time would mean nothing is sent ahead.
    let ahead = done
        .iter()
        .filter(|r| r.dispatched_at.unwrap() < r.scheduled_at.unwrap())
        .count();
    assert!(
        ahead > 0,
        "no run was dispatched ahead of its time: {done:#?}"
    );
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

/// The live workers the API lists.
async fn client_workers(client: &krest::cli::client::Client) -> Vec<krest_schemas::WorkerInfo> {
    all_pages(client, krest_schemas::api::Op::WorkersList, |cursor| {
        krest_schemas::api::WorkersListRequest {
            app: None,
            limit: None,
            cursor,
        }
    })
    .await
    .concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_with_an_instance_that_cannot_hold_runs_gets_them_at_their_time() {
    let env = Env::new("ahead-old");
    let mut opts = env.node_opts("n1");
    opts.engine.dispatch_ahead = Duration::from_secs(2);
    let node = krest::node::spawn(opts);
    let client = env.client().await;
    let (w, _seen) = noting_worker(&env, "w1");
    // A second instance of the app, as an SDK without `notBefore` announces itself; it never
    // pulls, so every run goes to w1 — but w1 is not the only one that could take them.
    let nats = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let forged = tokio::spawn(async move {
        let kv = loop {
            if let Ok(kv) = js.get_key_value("krest-workers").await {
                break kv;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        loop {
            let info = krest_schemas::WorkerInfo {
                app_name: AHEAD_APP.into(),
                instance: "old".into(),
                handlers: vec!["note".into()],
                weight: 1,
                slots: 1,
                in_flight: 0,
                version: "0.1".into(),
                sdk: "older".into(),
                host: "h".into(),
                started_at: Utc::now(),
                heartbeat_at: Utc::now(),
                capabilities: Vec::new(),
            };
            let _ = kv
                .put(
                    krest_schemas::names::worker_key(AHEAD_APP, "old"),
                    serde_json::to_vec(&info).unwrap().into(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    eventually(DEADLINE, "both instances listed", || async {
        (client_workers(&client).await.len() == 2).then_some(())
    })
    .await;
    apply(
        &client,
        vec![job("tick", AHEAD_APP, "note", json!({"every": "1s"}))],
    )
    .await;
    let done = finished(&client, "tick", 4).await;
    for r in &done {
        assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
        assert!(
            r.dispatched_at.unwrap() >= r.scheduled_at.unwrap(),
            "dispatched ahead to an app with an instance that would start it early: {r:?}"
        );
    }
    forged.abort();
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pausing_a_job_cancels_the_run_dispatched_ahead() {
    let env = Env::new("ahead-pause");
    let mut opts = env.node_opts("n1");
    opts.engine.dispatch_ahead = krest_schemas::messages::MAX_HOLD;
    let node = krest::node::spawn(opts);
    let client = env.client().await;
    let (w, seen) = noting_worker(&env, "w1");
    eventually(DEADLINE, "the worker's heartbeat", || async {
        (!client_workers(&client).await.is_empty()).then_some(())
    })
    .await;
    // Fires 15 s from now: dispatched ~5 s from now, 10 s ahead of its time.
    let at = (Utc::now() + chrono::Duration::seconds(15))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    apply(
        &client,
        vec![job("once", AHEAD_APP, "note", json!({"at": at}))],
    )
    .await;
    // Dispatched ahead: the worker holds it (its run is recorded only from its time on).
    let nats = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let due = chrono::DateTime::parse_from_rfc3339(&at).unwrap();
    eventually(
        DEADLINE,
        "the run dispatched ahead, held by the worker",
        || async {
            let (held, _) = app_consumer_counts(&js, AHEAD_APP).await?;
            assert!(
                Utc::now() < due,
                "the run came due before the worker held it"
            );
            (held == 1).then_some(())
        },
    )
    .await;
    let (code, out, err) = env.cli(&["job", "pause", "t.once"]);
    assert_eq!(code, 0, "{out}{err}");
    let run = eventually(DEADLINE, "the run ended", || async {
        runs(&client, "once")
            .await
            .into_iter()
            .find(|r| r.status.is_final())
    })
    .await;
    assert_eq!(run.status, RunStatus::Cancelled, "{run:?}");
    assert!(
        run.error
            .as_deref()
            .unwrap_or_default()
            .contains("the job was paused before this fire's time"),
        "{run:?}"
    );
    assert!(seen.lock().unwrap().is_empty(), "the handler ran");
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}
