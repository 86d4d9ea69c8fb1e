//! Job semantics end to end: shard counts with per-shard parameters, per-job retry backoff.

use std::sync::{Arc, Mutex};

use krest_schemas::api::RunStatus;
use krest_worker::{JobContext, JobError};
use serde_json::{json, Value};

use crate::harness::*;

const APP: &str = "jobs-app";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shard_count_with_per_shard_parameters() {
    let env = Env::new("shard-params");
    let node = env.node("n1");
    let client = env.client().await;
    // (shard index, shard total, item, args) per execution.
    type Seen = (u32, u32, Value, Value);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let s = seen.clone();
    let w = env
        .worker(APP, "w1")
        .handler("cities", move |ctx: JobContext| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push((
                    ctx.shard_index(),
                    ctx.shard_total(),
                    ctx.shard_item().cloned().unwrap_or(Value::Null),
                    ctx.args().clone(),
                ));
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![job(
            "cities",
            APP,
            "cities",
            json!({"jobType": "SHARDING", "shardCount": 3, "shardingParams": "0=Beijing,1=Shanghai", "args": {"day": "monday"}}),
        )],
    )
    .await;
    let t = trigger(&client, "cities").await;
    assert_eq!(t.shard_total, 3);
    let d = wait_final(&client, &t.run_id).await;
    assert_eq!(
        (d.run.status, d.run.shards_succeeded),
        (RunStatus::Succeeded, 3)
    );
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|s| s.0);
    assert_eq!(
        seen,
        [
            (0, 3, json!("Beijing"), json!({"day": "monday"})),
            (1, 3, json!("Shanghai"), json!({"day": "monday"})),
            (2, 3, Value::Null, json!({"day": "monday"})),
        ]
    );
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_retry_backoff_replaces_the_workers() {
    let env = Env::new("job-backoff");
    let node = env.node("n1");
    let client = env.client().await;
    let w = env
        .worker(APP, "w1")
        .handler("broken", |_ctx: JobContext| async move {
            Err::<(), _>(JobError::new("nope"))
        })
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![job(
            "broken",
            APP,
            "broken",
            json!({"retryTimes": 3, "retryBackoff": {"initial": "300ms", "factor": 3, "max": "1s"}}),
        )],
    )
    .await;
    let run_id = trigger(&client, "broken").await.run_id;
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Failed);
    let delays: Vec<Option<u64>> = d.attempts.iter().map(|a| a.retry_in_ms).collect();
    assert_eq!(delays, [Some(300), Some(900), Some(1000), None]);
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn child_jobs_run_once_after_a_success_and_cycles_are_rejected() {
    let env = Env::new("children");
    // Two nodes: both record the parent's success; the child must still run once.
    let n1 = env.node("n1");
    let n2 = env.node("n2");
    let client = env.client().await;
    let log = Executions::default();
    let l = log.clone();
    let w = env
        .worker(APP, "w1")
        .handler("step", move |ctx: JobContext| {
            let l = l.clone();
            async move {
                l.record(&ctx);
                if ctx.args() == &json!("fail") {
                    return Err(JobError::fatal("failing on purpose"));
                }
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn();

    // Cycles and unknown children are rejected at apply time, naming the problem.
    let err = client
        .call_value(
            krest_schemas::api::Op::JobApply,
            &json!({"documents": [
                job("a", APP, "step", json!({"childJobs": ["b"]})),
                job("b", APP, "step", json!({"childJobs": ["t.a"]})),
                job("c", APP, "step", json!({"childJobs": ["nowhere"]})),
            ]}),
        )
        .await
        .unwrap_err();
    let krest::cli::client::ClientError::Api(api) = err else {
        panic!("{err:?}")
    };
    let msgs: Vec<String> = api
        .invalid
        .iter()
        .flat_map(|d| d.problems.iter().map(ToString::to_string))
        .collect();
    assert!(
        msgs.iter()
            .any(|m| m == "childJobs: child jobs form a cycle: t.a → t.b → t.a"),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("childJobs: no job `t.nowhere`")),
        "{msgs:?}"
    );

    apply(
        &client,
        vec![
            job("parent", APP, "step", json!({"childJobs": ["child"]})),
            job(
                "child",
                APP,
                "step",
                json!({"childJobs": ["t.grandchild"], "args": "from child"}),
            ),
            job("grandchild", APP, "step", json!({})),
            job(
                "broken",
                APP,
                "step",
                json!({"args": "fail", "childJobs": ["child"]}),
            ),
        ],
    )
    .await;
    let parent = trigger(&client, "parent").await.run_id;
    assert_eq!(
        wait_final(&client, &parent).await.run.status,
        RunStatus::Succeeded
    );
    let child_id = krest_schemas::names::child_run_id("t.child", &parent);
    let child = wait_final(&client, &child_id).await;
    assert_eq!(child.run.status, RunStatus::Succeeded);
    assert_eq!(child.run.trigger, Some(krest_schemas::Trigger::Child));
    assert_eq!(child.run.parent_run_id.as_deref(), Some(parent.as_str()));
    assert_eq!(child.args, Some(json!("from child")));
    let grandchild = wait_final(
        &client,
        &krest_schemas::names::child_run_id("t.grandchild", &child_id),
    )
    .await;
    assert_eq!(
        grandchild.run.parent_run_id.as_deref(),
        Some(child_id.as_str())
    );

    // A failed parent triggers nothing.
    let broken = trigger(&client, "broken").await.run_id;
    assert_eq!(
        wait_final(&client, &broken).await.run.status,
        RunStatus::Failed
    );
    // Let both nodes' recorders see the grandchild's end: nothing follows it.
    assert_eq!(
        runs(&client, "child").await.len(),
        1,
        "one child run, from the successful parent"
    );
    assert_eq!(
        log.of(&child_id).len(),
        1,
        "executed once although two nodes recorded the parent"
    );
    w.stop().await.unwrap();
    n1.stop().await.unwrap();
    n2.stop().await.unwrap();
}
