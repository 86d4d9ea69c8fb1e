//! Failures: retries through redelivery, final failure after exactly `retryTimes + 1`
//! attempts, panics, unknown handlers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use krest_schemas::api::{AttemptStatus, RunStatus};
use krest_schemas::names::{app_consumer, WORK_STREAM};
use krest_test_support::eventually;
use krest_worker::{JobContext, JobError};
use serde_json::json;

use crate::harness::*;

const APP: &str = "retry-app";

fn worker(env: &Env, instance: &str, log: Executions) -> krest_worker::RunningWorker {
    let failures: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (l1, l2, l3) = (log.clone(), log.clone(), log);
    env.worker(APP, instance)
        .handler("flaky", move |ctx: JobContext| {
            let log = l1.clone();
            let failures = failures.clone();
            async move {
                log.record(&ctx);
                let mut f = failures.lock().unwrap();
                let n = f.entry(ctx.run_id().to_string()).or_default();
                if *n < 2 {
                    *n += 1;
                    ctx.warn(format!("failing on purpose ({n})"));
                    return Err(JobError::new(format!("transient failure {n}")));
                }
                Ok("third time lucky")
            }
        })
        .handler("broken", move |ctx: JobContext| {
            let log = l2.clone();
            async move {
                log.record(&ctx);
                Err::<(), _>(JobError::new("always broken"))
            }
        })
        .handler("panics", move |ctx: JobContext| {
            let log = l3.clone();
            async move {
                log.record(&ctx);
                if ctx.args() == &json!("panic") {
                    panic!("boom");
                }
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn()
}

/// True once the app's consumer holds nothing pending or unacknowledged: no delivery is
/// coming any more.
async fn consumer_idle(env: &Env) -> bool {
    let client = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(WORK_STREAM).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(&app_consumer(APP)).await.unwrap();
    let info = consumer.info().await.unwrap();
    info.num_pending == 0 && info.num_ack_pending == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_failing_twice_succeeds_on_attempt_three() {
    failing_twice_then_succeeding(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_failing_twice_succeeds_on_attempt_three_recorded_in_postgres() {
    failing_twice_then_succeeding(Db::Postgres).await;
}

async fn failing_twice_then_succeeding(db: Db) {
    let env = Env::new("retry-ok").on(db);
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let w = worker(&env, "w1", log.clone());
    apply(
        &client,
        vec![job("flaky", APP, "flaky", json!({"retryTimes": 3}))],
    )
    .await;

    let run_id = trigger(&client, "t.flaky").await.run_id;
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(d.run.attempts, 3);
    let statuses: Vec<(u32, AttemptStatus, bool)> = d
        .attempts
        .iter()
        .map(|a| (a.attempt, a.status, a.will_retry))
        .collect();
    assert_eq!(
        statuses,
        [
            (1, AttemptStatus::Failed, true),
            (2, AttemptStatus::Failed, true),
            (3, AttemptStatus::Succeeded, false)
        ]
    );
    assert_eq!(d.attempts[0].error.as_deref(), Some("transient failure 1"));
    assert_eq!(d.attempts[0].logs[0].line, "failing on purpose (1)");
    assert_eq!(d.run.output.as_deref(), Some("third time lucky"));
    // The summary keeps the error of the last failed attempt (docs/protocol.md, run summaries).
    assert_eq!(d.run.error.as_deref(), Some("transient failure 2"));
    assert_eq!(log.of(&run_id).len(), 3);
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_that_always_fails_is_failed_after_exactly_four_attempts() {
    let env = Env::new("retry-fail");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let w = worker(&env, "w1", log.clone());
    apply(
        &client,
        vec![job("broken", APP, "broken", json!({"retryTimes": 3}))],
    )
    .await;

    let run_id = trigger(&client, "broken").await.run_id;
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Failed);
    assert_eq!(d.run.error.as_deref(), Some("always broken"));
    let attempts: Vec<(u32, bool)> = d
        .attempts
        .iter()
        .map(|a| (a.attempt, a.will_retry))
        .collect();
    assert_eq!(attempts, [(1, true), (2, true), (3, true), (4, false)]);
    // The message is terminated: nothing pending, nothing awaiting an ack, so no fifth attempt.
    eventually(DEADLINE, "the work consumer to be idle", || async {
        consumer_idle(&env).await.then_some(())
    })
    .await;
    assert_eq!(log.of(&run_id).len(), 4);
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_handler_fails_the_run_not_the_worker() {
    let env = Env::new("panic");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let w = worker(&env, "w1", log.clone());
    apply(
        &client,
        vec![job("panics", APP, "panics", json!({"args": "panic"}))],
    )
    .await;

    let run_id = trigger(&client, "panics").await.run_id;
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Failed);
    assert_eq!(d.attempts.len(), 1, "retryTimes 0: one attempt");
    assert_eq!(d.run.error.as_deref(), Some("handler panicked: boom"));

    // The same worker keeps serving: a run with other args succeeds.
    let ok = client
        .call::<_, krest_schemas::api::TriggerResponse>(
            krest_schemas::api::Op::JobTrigger,
            &krest_schemas::api::TriggerRequest {
                job: "panics".into(),
                args: Some(json!("fine")),
                request_id: None,
            },
        )
        .await
        .unwrap();
    let d = wait_final(&client, &ok.run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(d.args, Some(json!("fine")));
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_for_an_unknown_handler_fails_naming_it() {
    let env = Env::new("unknown-handler");
    let node = env.node("n1");
    let client = env.client().await;
    let w = worker(&env, "w1", Executions::default());
    apply(
        &client,
        vec![job(
            "ghost",
            APP,
            "no/such/handler",
            json!({"retryTimes": 1}),
        )],
    )
    .await;

    let run_id = trigger(&client, "ghost").await.run_id;
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Failed);
    assert_eq!(d.attempts.len(), 2);
    let err = d.run.error.unwrap();
    assert!(
        err.contains("no handler `no/such/handler` on worker retry-app/w1"),
        "{err}"
    );
    assert!(err.contains("it has: broken, flaky, panics"), "{err}");
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_handler_times_out_is_retried_and_ends_timed_out() {
    let env = Env::new("timeout");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let l = log.clone();
    let w = env
        .worker("to-app", "w1")
        .cancel_grace(std::time::Duration::from_millis(300))
        .handler("hang", move |ctx: JobContext| {
            let l = l.clone();
            async move {
                l.record(&ctx);
                // Ignores cancellation: the worker must abort it after the grace period.
                tokio::time::sleep(std::time::Duration::from_secs(600)).await;
                Ok(())
            }
        })
        .handler("quick", |_ctx: JobContext| async move { Ok("fine") })
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![
            job(
                "hang",
                "to-app",
                "hang",
                json!({"timeoutSecs": 1, "retryTimes": 1}),
            ),
            job("quick", "to-app", "quick", json!({"timeoutSecs": 60})),
        ],
    )
    .await;
    let run_id = trigger(&client, "hang").await.run_id;
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::TimedOut);
    let attempts: Vec<(u32, AttemptStatus, bool)> = d
        .attempts
        .iter()
        .map(|a| (a.attempt, a.status, a.will_retry))
        .collect();
    assert_eq!(
        attempts,
        [
            (1, AttemptStatus::TimedOut, true),
            (2, AttemptStatus::TimedOut, false)
        ]
    );
    assert!(d.attempts[0]
        .error
        .as_deref()
        .unwrap()
        .starts_with("timed out after 1 s"));
    assert_eq!(log.of(&run_id).len(), 2);
    // The worker's slots came back: other runs still go through.
    let ok = trigger(&client, "quick").await.run_id;
    assert_eq!(
        wait_final(&client, &ok).await.run.status,
        RunStatus::Succeeded
    );
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}
