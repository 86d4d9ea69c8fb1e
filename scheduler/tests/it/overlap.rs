//! Cancellation (`krest runs cancel`) and the overlap policies (SKIP, QUEUE_ONE, REPLACE).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use krest_schemas::api::{AttemptStatus, CancelResponse, Op, RunRequest, RunStatus, RunSummary};
use krest_test_support::eventually;
use krest_worker::{JobContext, JobError};
use serde_json::json;

use crate::harness::*;

const APP: &str = "ov-app";

/// A worker whose `slow` handler works for `work` unless cancelled (it then returns an error
/// and counts the cancellation).
fn worker(
    env: &Env,
    work: Duration,
    log: Executions,
    cancelled: Arc<AtomicUsize>,
) -> krest_worker::RunningWorker {
    env.worker(APP, "w1")
        .slots(8)
        .handler("slow", move |ctx: JobContext| {
            let log = log.clone();
            let cancelled = cancelled.clone();
            async move {
                log.record(&ctx);
                tokio::select! {
                    _ = tokio::time::sleep(work) => Ok(()),
                    _ = ctx.cancelled() => {
                        cancelled.fetch_add(1, Ordering::SeqCst);
                        Err(JobError::new("stopped on cancellation"))
                    }
                }
            }
        })
        .build()
        .unwrap()
        .spawn()
}

async fn cancel(client: &krest::cli::client::Client, run_id: &str) -> CancelResponse {
    client
        .call(
            Op::RunsCancel,
            &RunRequest {
                run_id: run_id.into(),
            },
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_running_and_a_pending_run() {
    let env = Env::new("cancel");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let w = worker(&env, Duration::from_secs(600), log.clone(), seen.clone());
    apply(
        &client,
        vec![job("slow", APP, "slow", json!({"retryTimes": 3}))],
    )
    .await;

    // Running: the handler sees the cancellation; the run ends CANCELLED, not retried.
    let running = trigger(&client, "slow").await.run_id;
    eventually(DEADLINE, "the run to start", || async {
        (!log.of(&running).is_empty()).then_some(())
    })
    .await;
    eventually(DEADLINE, "the run recorded as running", || async {
        run(&client, &running)
            .await
            .filter(|d| d.run.status == RunStatus::Running)
    })
    .await;
    let resp = cancel(&client, &running).await;
    assert_eq!(
        (resp.status_before, resp.app_name.as_str()),
        (RunStatus::Running, APP)
    );
    let d = wait_final(&client, &running).await;
    assert_eq!(d.run.status, RunStatus::Cancelled);
    assert_eq!(d.attempts.len(), 1);
    assert_eq!(d.attempts[0].status, AttemptStatus::Cancelled);
    assert_eq!(
        d.run.error.as_deref(),
        Some("cancelled: cancelled by request")
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the handler saw ctx.cancelled()"
    );

    // Pending (no worker of the app is up): the run is skipped when it is delivered.
    w.stop().await.unwrap();
    let pending = trigger(&client, "slow").await.run_id;
    eventually(DEADLINE, "the pending run recorded", || async {
        run(&client, &pending)
            .await
            .filter(|d| d.run.status == RunStatus::Pending)
    })
    .await;
    assert_eq!(
        cancel(&client, &pending).await.status_before,
        RunStatus::Pending
    );
    let w = worker(&env, Duration::from_secs(600), log.clone(), seen.clone());
    let d = wait_final(&client, &pending).await;
    assert_eq!(d.run.status, RunStatus::Cancelled);
    assert!(log.of(&pending).is_empty(), "never executed");

    // A finished run cannot be cancelled.
    let err = client
        .call::<_, CancelResponse>(
            Op::RunsCancel,
            &RunRequest {
                run_id: running.clone(),
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("already ended: CANCELLED"),
        "{err}"
    );
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

async fn settled_runs(client: &krest::cli::client::Client, job: &str, n: usize) -> Vec<RunSummary> {
    eventually(DEADLINE, &format!("{n} ended runs of {job}"), || async {
        let mut r: Vec<_> = runs(client, job)
            .await
            .into_iter()
            .filter(|r| r.status.is_final())
            .collect();
        r.sort_by_key(|r| r.scheduled_at);
        (r.len() >= n).then_some(r)
    })
    .await
}

/// No two executed runs overlapped in time.
fn assert_disjoint(runs: &[RunSummary]) {
    let mut executed: Vec<_> = runs.iter().filter(|r| r.started_at.is_some()).collect();
    executed.sort_by_key(|r| r.started_at);
    for pair in executed.windows(2) {
        assert!(
            pair[0].finished_at.unwrap() <= pair[1].started_at.unwrap(),
            "{} and {} overlapped: {:#?}",
            pair[0].run_id,
            pair[1].run_id,
            runs.iter()
                .map(|r| (&r.run_id, r.status, r.started_at, r.finished_at, &r.error))
                .collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlap_skip_and_queue_one_never_run_two_at_once() {
    let env = Env::new("overlap");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let w = worker(
        &env,
        Duration::from_millis(2500),
        log.clone(),
        Arc::default(),
    );
    apply(
        &client,
        vec![
            job(
                "skip",
                APP,
                "slow",
                json!({"cron": "* * * * * ?", "overlapPolicy": "SKIP"}),
            ),
            job(
                "queue",
                APP,
                "slow",
                json!({"cron": "* * * * * ?", "overlapPolicy": "QUEUE_ONE"}),
            ),
        ],
    )
    .await;
    let skip = settled_runs(&client, "skip", 8).await;
    assert_disjoint(&skip);
    let skipped: Vec<_> = skip
        .iter()
        .filter(|r| r.status == RunStatus::Skipped)
        .collect();
    assert!(!skipped.is_empty());
    assert!(skipped.iter().all(
        |r| r.error.as_deref() == Some("overlap policy SKIP: the previous run is still going")
    ));
    assert!(skip.iter().any(|r| r.status == RunStatus::Succeeded));

    let queue = settled_runs(&client, "queue", 8).await;
    assert_disjoint(&queue);
    // A queued fire runs as soon as the previous run ends, keeping its fire time.
    let succeeded: Vec<_> = queue
        .iter()
        .filter(|r| r.status == RunStatus::Succeeded)
        .collect();
    assert!(succeeded.len() >= 2);
    assert!(
        succeeded
            .windows(2)
            .any(|p| p[1].scheduled_at < p[0].finished_at),
        "a fire waited for its predecessor: {succeeded:#?}"
    );
    assert!(queue.iter().any(|r| r.status == RunStatus::Skipped
        && r.error.as_deref() == Some("overlap policy QUEUE_ONE: a fire is already waiting")));
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlap_replace_cancels_the_running_run() {
    let env = Env::new("replace");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let w = worker(&env, Duration::from_secs(600), log.clone(), seen.clone());
    apply(
        &client,
        vec![job(
            "replace",
            APP,
            "slow",
            json!({"every": "2s", "overlapPolicy": "REPLACE"}),
        )],
    )
    .await;
    let r = settled_runs(&client, "replace", 3).await;
    for run in &r {
        assert_eq!(run.status, RunStatus::Cancelled, "{run:?}");
        assert!(
            run.error
                .as_deref()
                .unwrap()
                .starts_with("cancelled: replaced by t.replace."),
            "{run:?}"
        );
    }
    // Every replaced run that had started saw the cancellation in its handler (a run still
    // pending when replaced is skipped by the worker without executing).
    let executed = r
        .iter()
        .filter(|run| !log.of(&run.run_id).is_empty())
        .count();
    assert!(executed >= 1, "{r:#?}");
    assert!(
        seen.load(Ordering::SeqCst) >= executed,
        "each replaced handler saw the cancellation"
    );
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlap_is_decided_from_the_work_stream_even_when_the_leaders_database_is_stuck() {
    let env = Env::new("overlap-nats");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (n, m, l) = (now.clone(), max.clone(), log.clone());
    let w = env
        .worker(APP, "w1")
        .slots(8)
        .handler("slow", move |ctx: JobContext| {
            let (n, m, l) = (n.clone(), m.clone(), l.clone());
            async move {
                l.record(&ctx);
                let running = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![job(
            "skip",
            APP,
            "slow",
            json!({"cron": "* * * * * ?", "overlapPolicy": "SKIP"}),
        )],
    )
    .await;
    eventually(DEADLINE, "the first execution", || async {
        (log.total() > 0).then_some(())
    })
    .await;
    // The leader's own database stops taking writes: what it knows of runs is stale from now
    // on, and the overlap policy must not depend on it.
    let mut lock = sqlx_lock(&env.dir.join("n1.db")).await;
    let before = log.total();
    eventually(DEADLINE, "five more executions", || async {
        (log.total() >= before + 5).then_some(())
    })
    .await;
    assert_eq!(
        max.load(Ordering::SeqCst),
        1,
        "runs of a SKIP job overlapped"
    );
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    drop(lock);
    // Recorded once the database is back: fires in between were skipped, not run.
    let all = eventually(DEADLINE, "skipped fires recorded", || async {
        let r = runs(&client, "skip").await;
        (r.iter().filter(|r| r.status == RunStatus::Skipped).count() >= 3).then_some(r)
    })
    .await;
    assert!(all
        .iter()
        .filter(|r| r.status == RunStatus::Skipped)
        .all(|r| r.error.as_deref().unwrap_or_default().contains("SKIP")));
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_fire_survives_the_failover_of_its_leader() {
    let env = Env::new("queue-failover");
    let n1 = env.node("n1");
    let client = env.client().await;
    eventually(DEADLINE, "n1 to lead", || async {
        (leader(&client).await.as_deref() == Some("n1")).then_some(())
    })
    .await;
    let n2 = env.node("n2");
    let log = Executions::default();
    // The first run holds until the test opens the gate; later runs end at once.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (g, l) = (gate.clone(), log.clone());
    let w = env
        .worker(APP, "w1")
        .slots(8)
        .handler("gated", move |ctx: JobContext| {
            let (g, l) = (g.clone(), l.clone());
            async move {
                let first = l.total() == 0;
                l.record(&ctx);
                if first {
                    let _ = g.acquire().await;
                }
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![job(
            "q",
            APP,
            "gated",
            json!({"cron": "* * * * * ?", "overlapPolicy": "QUEUE_ONE"}),
        )],
    )
    .await;
    // The first run holds; the next fire is queued behind it, and the leader has written it
    // into the job's state; fires after it are skipped (one already waits), which the fire
    // watermark says.
    let raw = async_nats::connect(env.url()).await.unwrap();
    let kv = async_nats::jetstream::new(raw)
        .get_key_value("krest-state")
        .await
        .unwrap();
    let state = eventually(
        DEADLINE,
        "a queued fire behind later skipped ones",
        || async {
            let v = kv.get("t.q").await.ok()??;
            let s: krest_schemas::JobState = serde_json::from_slice(&v).ok()?;
            let q = s.queued.as_ref()?;
            let w = kv.get("watermark").await.ok()??;
            let w: krest_schemas::FireWatermark = serde_json::from_slice(&w).ok()?;
            (w.through >= q.scheduled_at + chrono::Duration::seconds(2)).then_some(s)
        },
    )
    .await;
    let queued = state.queued.unwrap();

    // The leader dies (no clean release); n2 takes over once the lease expires.
    n1.abort();
    eventually(DEADLINE, "n2 to lead", || async {
        (leader(&client).await.as_deref() == Some("n2")).then_some(())
    })
    .await;
    // The first run ends: the queued fire runs, under the new leader.
    gate.add_permits(1);
    let d = wait_final(&client, &queued.run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded, "{d:?}");
    assert_eq!(d.run.scheduled_at, Some(queued.scheduled_at));
    assert_eq!(log.of(&queued.run_id).len(), 1);
    assert!(d.run.epoch.is_some(), "dispatched by a leader: {d:?}");
    w.stop().await.unwrap();
    n2.stop().await.unwrap();
}
