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
