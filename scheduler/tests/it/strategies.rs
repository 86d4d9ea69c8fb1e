//! Load-balancing strategies with exact sequences, BROADCAST, and runs re-routed away from
//! failing or departed instances.

use std::time::Duration;

use krest_schemas::api::{RunDetail, RunStatus};
use krest_test_support::eventually;
use krest_worker::{JobContext, JobError};
use serde_json::json;

use crate::harness::*;

const APP: &str = "lb";

/// A worker of app `lb` with handler `work` (and `only-a` when `extra`), recording executions.
fn worker(env: &Env, instance: &str, weight: u32, log: Executions) -> krest_worker::RunningWorker {
    let name = instance.to_string();
    env.worker(APP, instance)
        .weight(weight)
        .slots(4)
        .handler("work", move |ctx: JobContext| {
            let log = log.clone();
            let name = name.clone();
            async move {
                log.record(&ctx);
                if ctx.args() == &json!("hang") && name == "a" {
                    tokio::time::sleep(Duration::from_secs(600)).await;
                }
                if ctx.args() == &json!("fail-on-a") && name == "a" {
                    return Err(JobError::new("a cannot do it"));
                }
                Ok(name)
            }
        })
        .build()
        .unwrap()
        .spawn()
}

/// Waits until `n` instances of the app have heartbeated.
async fn registered(client: &krest::cli::client::Client, n: usize) {
    eventually(DEADLINE, &format!("{n} workers registered"), || async {
        let w: Vec<krest_schemas::WorkerInfo> = client
            .call(krest_schemas::api::Op::WorkersList, &json!({}))
            .await
            .ok()?;
        (w.iter().filter(|w| w.app_name == APP).count() == n).then_some(())
    })
    .await;
}

/// The instance that ran each shard (last attempt), by shard.
fn placement(d: &RunDetail) -> Vec<String> {
    let mut out = vec![String::new(); d.run.shard_total as usize];
    for a in &d.attempts {
        out[a.shard as usize] = a.worker.clone().unwrap_or_default();
    }
    out
}

async fn run_on(client: &krest::cli::client::Client, job: &str) -> String {
    let d = wait_final(client, &trigger(client, job).await.run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded, "{d:?}");
    placement(&d).remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strategies_place_runs_in_exact_sequences() {
    let env = Env::new("strategies");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    // a first, so it is the older instance (the FAILOVER primary).
    let a = worker(&env, "a", 3, log.clone());
    registered(&client, 1).await;
    let b = worker(&env, "b", 1, log.clone());
    registered(&client, 2).await;
    let shards: Vec<u32> = (0..8).collect();
    apply(
        &client,
        vec![
            job("wrr", APP, "work", json!({"jobType": "SHARDING", "args": shards, "loadBalanceType": "WEIGHTROUNDRIBBON"})),
            job("rr", APP, "work", json!({"loadBalanceType": "ROUND_ROBIN"})),
            job("busy", APP, "work", json!({"loadBalanceType": "LEAST_BUSY"})),
            job("hash", APP, "work", json!({"loadBalanceType": "CONSISTENT_HASH", "args": {"customer": 42}})),
            job("fo", APP, "work", json!({"loadBalanceType": "FAILOVER"})),
            job("rand", APP, "work", json!({"loadBalanceType": "RANDOM"})),
        ],
    )
    .await;

    // Weights 3:1: three of every four shards on a, in smooth order.
    let d = wait_final(&client, &trigger(&client, "wrr").await.run_id).await;
    assert_eq!(placement(&d).join(","), "a,a,b,a,a,a,b,a");

    // Round robin: in turn.
    let mut rr = Vec::new();
    for _ in 0..4 {
        rr.push(run_on(&client, "rr").await);
    }
    assert_eq!(rr.join(","), "a,b,a,b");

    // Consistent hash: the same args always land on the same instance.
    let first = run_on(&client, "hash").await;
    for _ in 0..3 {
        assert_eq!(run_on(&client, "hash").await, first);
    }

    // Random: only live instances with the handler.
    for _ in 0..6 {
        let i = run_on(&client, "rand").await;
        assert!(i == "a" || i == "b", "{i}");
    }

    // Failover: the oldest instance (a started first) takes everything; when it leaves, the
    // next oldest does.
    for _ in 0..3 {
        assert_eq!(run_on(&client, "fo").await, "a");
    }
    a.stop().await.unwrap();
    assert_eq!(run_on(&client, "fo").await, "b");
    assert_eq!(run_on(&client, "busy").await, "b");
    b.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broadcast_runs_once_on_every_instance_with_the_handler() {
    let env = Env::new("broadcast");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let a = worker(&env, "a", 1, log.clone());
    let b = worker(&env, "b", 1, log.clone());
    // An instance of the app without the handler gets nothing.
    let other = env
        .worker(APP, "c")
        .handler("something-else", |_ctx: JobContext| async move { Ok(()) })
        .build()
        .unwrap()
        .spawn();
    registered(&client, 3).await;
    apply(
        &client,
        vec![job("all", APP, "work", json!({"jobType": "BROADCAST"}))],
    )
    .await;
    let t = trigger(&client, "all").await;
    assert_eq!(t.shard_total, 2);
    let d = wait_final(&client, &t.run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(placement(&d).join(","), "a,b");
    let items: Vec<_> = log
        .of(&t.run_id)
        .into_iter()
        .map(|(s, _, w)| (s, w))
        .collect();
    assert_eq!(items.len(), 2, "{items:?}");
    for x in [a, b, other] {
        x.stop().await.unwrap();
    }
    // No instance: the broadcast is refused with a reason.
    let err = client
        .call::<_, krest_schemas::api::TriggerResponse>(
            krest_schemas::api::Op::JobTrigger,
            &krest_schemas::api::TriggerRequest {
                job: "all".into(),
                args: None,
                request_id: None,
            },
        )
        .await;
    let text = format!("{err:?}");
    assert!(
        text.contains("no live instance of app lb has the handler `work`"),
        "{text}"
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_goes_to_another_instance() {
    let env = Env::new("retry-elsewhere");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    // a first, so it is the older instance (the FAILOVER primary).
    let a = worker(&env, "a", 1, log.clone());
    registered(&client, 1).await;
    let b = worker(&env, "b", 1, log.clone());
    registered(&client, 2).await;
    apply(
        &client,
        vec![job(
            "fo",
            APP,
            "work",
            json!({"loadBalanceType": "FAILOVER", "retryTimes": 2, "args": "fail-on-a"}),
        )],
    )
    .await;
    let d = wait_final(&client, &trigger(&client, "fo").await.run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    let attempts: Vec<(u32, String)> = d
        .attempts
        .iter()
        .map(|x| (x.attempt, x.worker.clone().unwrap()))
        .collect();
    assert_eq!(attempts, [(1, "a".to_string()), (2, "b".to_string())]);
    assert_eq!(d.run.output.as_deref(), Some("b"));
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_addressed_to_an_instance_that_dies_is_rerouted() {
    let env = Env::new("reroute");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    // a first, so it is the older instance (the FAILOVER primary).
    let a = worker(&env, "a", 1, log.clone());
    registered(&client, 1).await;
    let b = worker(&env, "b", 1, log.clone());
    registered(&client, 2).await;
    apply(
        &client,
        vec![job(
            "fo",
            APP,
            "work",
            json!({"loadBalanceType": "FAILOVER", "retryTimes": 2, "args": "hang"}),
        )],
    )
    .await;
    let run_id = trigger(&client, "fo").await.run_id;
    eventually(DEADLINE, "a to start the run", || async {
        (!log.of(&run_id).is_empty()).then_some(())
    })
    .await;
    a.abort(); // dies holding the run
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    let last = d.attempts.last().unwrap();
    assert_eq!(
        (last.attempt, last.worker.as_deref()),
        (2, Some("b")),
        "the lost attempt counts"
    );
    b.stop().await.unwrap();
    node.stop().await.unwrap();
}
