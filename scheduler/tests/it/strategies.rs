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

/// Writes a heartbeat for `instance` of app `lb` with the `work` handler, as a worker would —
/// but no worker (and no consumer) stands behind it.
async fn forge_heartbeat(js: &async_nats::jetstream::Context, instance: &str) {
    let info = krest_schemas::WorkerInfo {
        app_name: APP.into(),
        instance: instance.into(),
        handlers: vec!["work".into()],
        weight: 1,
        slots: 4,
        in_flight: 0,
        version: "forged".into(),
        sdk: "none".into(),
        host: "nowhere".into(),
        started_at: chrono::Utc::now(),
        heartbeat_at: chrono::Utc::now(),
        capabilities: Vec::new(),
    };
    let kv = js.get_key_value("krest-workers").await.unwrap();
    kv.put(
        krest_schemas::names::worker_key(APP, instance),
        serde_json::to_vec(&info).unwrap().into(),
    )
    .await
    .unwrap();
}

/// Messages waiting on `instance`'s own work subject.
async fn waiting_for(js: &async_nats::jetstream::Context, instance: &str) -> usize {
    use futures_util::StreamExt;
    let stream = js.get_stream("KREST_WORK").await.unwrap();
    let subject = krest_schemas::names::work_instance_subject(APP, "t", "rr", instance);
    let mut subjects = stream.info_with_subjects(&subject).await.unwrap();
    let mut n = 0;
    while let Some(s) = subjects.next().await {
        let (s, count) = s.unwrap();
        if s == subject {
            n += count;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_addressed_to_an_instance_that_vanished_before_making_its_consumer_move_on() {
    let env = Env::new("vanished");
    let mut opts = env.node_opts("n1");
    opts.infra.heartbeat_ttl = Duration::from_secs(3);
    // The ghost counts as an instance still starting up for the whole test: only its
    // departure (the heartbeat ending) moves its runs.
    opts.router.consumer_grace = Duration::from_secs(3600);
    let node = krest::node::spawn(opts);
    let client = env.client().await;
    let log = Executions::default();
    let real = worker(&env, "real", 1, log.clone());
    registered(&client, 1).await;
    apply(
        &client,
        vec![job(
            "rr",
            APP,
            "work",
            json!({"loadBalanceType": "ROUND_ROBIN"}),
        )],
    )
    .await;
    let raw = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(raw);

    // The ghost heartbeats (as a worker that died between its heartbeat and its consumer), and
    // round robin addresses one of two runs to it.
    let mut run_ids = Vec::new();
    forge_heartbeat(&js, "ghost").await;
    registered(&client, 2).await;
    while waiting_for(&js, "ghost").await == 0 {
        forge_heartbeat(&js, "ghost").await;
        run_ids.push(trigger(&client, "rr").await.run_id);
        assert!(run_ids.len() < 20, "round robin never chose the ghost");
    }
    // It never heartbeats again. Its run is moved once the heartbeat expires, and every run
    // ends on the real instance.
    for id in &run_ids {
        let d = wait_final(&client, id).await;
        assert_eq!(d.run.status, RunStatus::Succeeded, "{d:?}");
        assert_eq!(placement(&d), ["real"]);
    }
    assert_eq!(waiting_for(&js, "ghost").await, 0);
    real.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_that_heartbeats_without_a_consumer_gets_no_runs() {
    let env = Env::new("no-consumer");
    let mut opts = env.node_opts("n1");
    opts.router.consumer_grace = Duration::from_secs(1);
    let node = krest::node::spawn(opts);
    let client = env.client().await;
    let log = Executions::default();
    let real = worker(&env, "real", 1, log.clone());
    registered(&client, 1).await;
    apply(
        &client,
        vec![job(
            "rr",
            APP,
            "work",
            json!({"loadBalanceType": "ROUND_ROBIN"}),
        )],
    )
    .await;
    let raw = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(raw);
    // A forged heartbeat, renewed for the whole test.
    let forger = {
        let js = js.clone();
        tokio::spawn(async move {
            loop {
                forge_heartbeat(&js, "ghost").await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    registered(&client, 2).await;
    // Runs addressed to it before it was found out are moved; afterwards none is addressed to
    // it. Every run ends on the real instance while the ghost keeps heartbeating.
    for _ in 0..6 {
        let d = wait_final(&client, &trigger(&client, "rr").await.run_id).await;
        assert_eq!(d.run.status, RunStatus::Succeeded, "{d:?}");
        assert_eq!(placement(&d), ["real"]);
    }
    forger.abort();
    real.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_starting_instance_keeps_its_consumer_until_the_grace_has_passed() {
    // The SDKs create an instance's own consumer before its first heartbeat. A sweep that read
    // the registry before that heartbeat and listed consumers after the consumer was created
    // took the instance for departed and removed the consumer it was about to pull from.
    let env = Env::new("starting");
    let mut opts = env.node_opts("n1");
    let grace = Duration::from_secs(2);
    opts.router.consumer_grace = grace;
    opts.router.sweep_every = Duration::from_millis(100);
    let node = krest::node::spawn(opts);
    let client = env.client().await;
    let real = worker(&env, "real", 1, Executions::default());
    registered(&client, 1).await;
    let raw = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(raw);
    let stream = js.get_stream("KREST_WORK").await.unwrap();
    // The consumer of an instance that never heartbeats (it died while starting).
    let name = krest_schemas::names::instance_consumer(APP, "newbie");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some("Krest runs addressed to lb/newbie".into()),
            filter_subject: krest_schemas::names::work_instance_filter(APP, "newbie"),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let created = consumer.info().await.unwrap().created;
    // Sweeps run every 100 ms meanwhile; the consumer goes once the grace has passed.
    eventually(
        Duration::from_secs(30),
        "the starting instance's consumer removed",
        || {
            let stream = stream.clone();
            let name = name.clone();
            async move { stream.consumer_info(&name).await.is_err().then_some(()) }
        },
    )
    .await;
    let gone = time::OffsetDateTime::now_utc();
    assert!(
        gone - created >= grace,
        "removed {} after its creation, within the grace of {grace:?}",
        gone - created
    );
    real.stop().await.unwrap();
    node.stop().await.unwrap();
}
