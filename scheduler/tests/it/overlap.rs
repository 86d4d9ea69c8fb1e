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
    assert!(
        seen.load(Ordering::SeqCst) >= 3,
        "each replaced handler saw the cancellation"
    );
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}
