//! The seed's two demo jobs, applied verbatim, run on schedule and are recorded.

use std::collections::HashMap;
use std::time::Duration;

use krest_schemas::api::{AttemptStatus, RunStatus};
use krest_test_support::eventually;
use krest_worker::{JobContext, JobError};

use crate::harness::*;

const APP: &str = "demo-spring-krest-job";

/// Starts a worker with the seed's two handlers; shards take `work` each.
fn seed_worker(
    env: &Env,
    instance: &str,
    weight: u32,
    work: Duration,
    log: Executions,
) -> krest_worker::RunningWorker {
    let post_log = log.clone();
    env.worker(APP, instance)
        .weight(weight)
        .slots(1)
        .handler("service/demo-krestjob-post", move |ctx: JobContext| {
            let log = post_log.clone();
            async move {
                log.record(&ctx);
                ctx.log(format!("post received {}", ctx.args()));
                Ok(format!("post ok: {}", ctx.args()))
            }
        })
        .handler("service/demo-krestjob/sharding", move |ctx: JobContext| {
            let log = log.clone();
            async move {
                log.record(&ctx);
                let item = ctx
                    .shard_item()
                    .cloned()
                    .ok_or_else(|| JobError::fatal("not sharded"))?;
                ctx.log(format!("shard {} item {item}", ctx.shard_index()));
                tokio::time::sleep(work).await;
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_jobs_run_every_five_seconds_and_are_recorded() {
    let env = Env::new("seed");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let heavy = seed_worker(&env, "heavy", 2, Duration::from_millis(400), log.clone());
    let light = seed_worker(&env, "light", 1, Duration::from_millis(400), log.clone());

    // The seed's documents, verbatim.
    let applied = apply(&client, seed_documents()).await;
    assert_eq!(applied.results.len(), 2);

    // NORMAL job: at least three consecutive fires, 5 s apart, each SUCCEEDED on attempt 1.
    let normal = eventually(DEADLINE, "three recorded runs of demo-job3", || async {
        let done: Vec<_> = runs(&client, "default-jobGroup.demo-job3")
            .await
            .into_iter()
            .filter(|r| r.status == RunStatus::Succeeded)
            .collect();
        (done.len() >= 3).then_some(done)
    })
    .await;
    let mut times: Vec<i64> = normal
        .iter()
        .map(|r| r.scheduled_at.unwrap().timestamp_millis())
        .collect();
    times.sort();
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 5000, "fires 5 s apart: {times:?}");
    }
    for r in &normal {
        assert_eq!(r.scheduled_at.unwrap().timestamp_millis() % 5000, 0);
        assert_eq!(r.attempts, 1);
        assert_eq!(r.output.as_deref(), Some("post ok: \"from server\""));
        let d = run(&client, &r.run_id).await.unwrap();
        assert_eq!(d.attempts.len(), 1);
        assert_eq!(d.attempts[0].logs[0].line, "post received \"from server\"");
        assert_eq!(log.of(&r.run_id).len(), 1, "executed once");
    }

    // SHARDING job: every fire yields 9 shard executions, SUCCEEDED as a whole.
    let sharded = eventually(DEADLINE, "three complete runs of demo-job2", || async {
        let done: Vec<_> = runs(&client, "default-jobGroup.demo-job2")
            .await
            .into_iter()
            .filter(|r| r.status == RunStatus::Succeeded)
            .collect();
        (done.len() >= 3).then_some(done)
    })
    .await;
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for r in &sharded {
        assert_eq!(
            (r.shard_total, r.shards_succeeded, r.shards_failed),
            (9, 9, 0)
        );
        let d = run(&client, &r.run_id).await.unwrap();
        let shards: Vec<u32> = d.attempts.iter().map(|a| a.shard).collect();
        assert_eq!(shards, (0..9).collect::<Vec<_>>(), "one attempt per shard");
        assert!(d
            .attempts
            .iter()
            .all(|a| a.status == AttemptStatus::Succeeded));
        let executed = log.of(&r.run_id);
        assert_eq!(executed.len(), 9, "9 shard executions per fire");
        for (_, _, worker) in executed {
            *per_worker.entry(worker).or_default() += 1;
        }
    }
    // Weights 2:1 with one slot each: the heavy instance holds two shards at a time, the
    // light one one, so while the shards keep both busy the split is about 2:1.
    let (h, l) = (per_worker["heavy"], per_worker["light"]);
    assert!(
        h as f64 >= 1.4 * l as f64 && (h as f64) <= 3.0 * l as f64,
        "split heavy:light = {h}:{l}, expected about 2:1"
    );

    heavy.stop().await.unwrap();
    light.stop().await.unwrap();
    node.stop().await.unwrap();
}
