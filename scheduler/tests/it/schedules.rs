//! Schedules beyond cron (fixed rate, one instant) and the misfire policies after an outage.

use std::time::Duration;

use krest::cli::client::ClientError;
use krest_schemas::api::{ApplyOutcome, ErrorCode, JobRequest, JobView, Op, RunStatus, RunSummary};
use krest_schemas::Trigger;
use krest_test_support::eventually;
use krest_worker::JobContext;
use serde_json::json;

use crate::harness::*;

const APP: &str = "sched-app";

fn worker(env: &Env) -> krest_worker::RunningWorker {
    env.worker(APP, "w1")
        .slots(8)
        .handler("noop", |_ctx: JobContext| async move { Ok(()) })
        .build()
        .unwrap()
        .spawn()
}

async fn done(client: &krest::cli::client::Client, job: &str, n: usize) -> Vec<RunSummary> {
    eventually(DEADLINE, &format!("{n} finished runs of {job}"), || async {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_and_at_jobs_fire_on_their_schedule() {
    let env = Env::new("every-at");
    let node = env.node("n1");
    let client = env.client().await;
    let w = worker(&env);
    let at_time = chrono::Utc::now() + chrono::Duration::seconds(3);
    let at = at_time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    apply(
        &client,
        vec![
            job("rate", APP, "noop", json!({"every": "2s"})),
            job("once", APP, "noop", json!({"at": at})),
        ],
    )
    .await;
    let rate: JobView = client
        .call(Op::JobGet, &JobRequest::new("rate"))
        .await
        .unwrap();
    let first = rate.next_fire_at.unwrap();
    assert_eq!(
        (first - rate.created_at).num_milliseconds(),
        2000,
        "counted from creation"
    );

    let runs_rate = done(&client, "rate", 3).await;
    for pair in runs_rate.windows(2) {
        let gap = pair[1].scheduled_at.unwrap() - pair[0].scheduled_at.unwrap();
        assert_eq!(gap.num_milliseconds(), 2000);
    }
    assert_eq!(runs_rate[0].scheduled_at, Some(first));

    let once = done(&client, "once", 1).await;
    assert_eq!(once[0].status, RunStatus::Succeeded);
    assert_eq!(
        once[0].scheduled_at.unwrap().to_rfc3339(),
        chrono::DateTime::parse_from_rfc3339(&at)
            .unwrap()
            .with_timezone(&chrono::Utc)
            .to_rfc3339()
    );
    let view: JobView = client
        .call(Op::JobGet, &JobRequest::new("once"))
        .await
        .unwrap();
    assert!(view.next_fire_at.is_none(), "an `at` job fires once");

    // Its `at` has passed: re-applying the same document is idempotent (Git-driven applies)…
    let again = apply(&client, vec![job("once", APP, "noop", json!({"at": at}))]).await;
    assert_eq!(again.results[0].outcome, ApplyOutcome::Unchanged);
    // …and changing anything else is fine…
    let changed = apply(
        &client,
        vec![job(
            "once",
            APP,
            "noop",
            json!({"at": at, "description": "ran"}),
        )],
    )
    .await;
    assert_eq!(changed.results[0].outcome, ApplyOutcome::Updated);
    // …but moving it to another past time, or creating a job in the past, is refused.
    let past = (chrono::Utc::now() - chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for name in ["once", "late"] {
        let err = client
            .call_value(
                Op::JobApply,
                &json!({"documents": [job(name, APP, "noop", json!({"at": past}))]}),
            )
            .await
            .unwrap_err();
        let ClientError::Api(api) = err else {
            panic!("{err:?}")
        };
        assert_eq!(api.code, ErrorCode::InvalidJob);
        let p = &api.invalid[0].problems[0];
        assert_eq!(p.field, "at");
        assert!(p.message.contains("is in the past (now "), "{p}");
        assert!(
            p.message.contains(&format!("krest job trigger t.{name}")),
            "{p}"
        );
    }
    assert!(client
        .call::<_, JobView>(Op::JobGet, &JobRequest::new("late"))
        .await
        .is_err());

    // Still exactly one run a few rate-fires later.
    done(&client, "rate", 5).await;
    assert_eq!(runs(&client, "once").await.len(), 1);
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

/// Runs sorted by fire time; checks that consecutive entries are 1 s apart except right before
/// the one collapsed entry, whose gap is exactly the fires it stands for. Returns that entry.
fn one_collapsed(runs: &[RunSummary]) -> RunSummary {
    let collapsed: Vec<&RunSummary> = runs.iter().filter(|r| r.misfired > 0).collect();
    assert_eq!(collapsed.len(), 1, "{runs:#?}");
    for pair in runs.windows(2) {
        let gap = (pair[1].scheduled_at.unwrap() - pair[0].scheduled_at.unwrap()).num_seconds();
        let expected = if pair[1].misfired > 0 {
            i64::from(pair[1].misfired) + 1
        } else {
            1
        };
        assert_eq!(
            gap, expected,
            "between {} and {}",
            pair[0].run_id, pair[1].run_id
        );
    }
    collapsed[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misfire_policies_after_an_outage() {
    let env = Env::new("misfire");
    let mut opts = env.node_opts("n1");
    opts.engine.misfire_threshold = Duration::from_secs(1);
    let node = krest::node::spawn(opts.clone());
    let client = env.client().await;
    let w = worker(&env);
    apply(
        &client,
        vec![
            job("once", APP, "noop", json!({"cron": "* * * * * ?"})),
            job(
                "skip",
                APP,
                "noop",
                json!({"cron": "* * * * * ?", "misfirePolicy": "SKIP"}),
            ),
            job(
                "all",
                APP,
                "noop",
                json!({"cron": "* * * * * ?", "misfirePolicy": "FIRE_ALL", "catchUpWindow": "3s"}),
            ),
        ],
    )
    .await;
    for j in ["once", "skip", "all"] {
        done(&client, j, 2).await;
    }
    node.stop().await.unwrap();
    // The outage: no scheduler for 7 s.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let node = krest::node::spawn(opts);
    let client = env.client().await;
    for j in ["once", "skip", "all"] {
        let before = runs(&client, j).await.len();
        done(&client, j, before + 3).await;
    }
    let settle = |j: &'static str| {
        let client = client.clone();
        async move {
            let mut r = runs(&client, j).await;
            r.sort_by_key(|r| r.scheduled_at);
            r
        }
    };
    // FIRE_ONCE: one catch-up run stands for the old misfires.
    let once = one_collapsed(&settle("once").await);
    assert_eq!(
        (once.status, once.trigger),
        (RunStatus::Succeeded, Some(Trigger::CatchUp))
    );
    // SKIP: the old misfires are recorded as one SKIPPED entry; nothing ran for them.
    let skip = one_collapsed(&settle("skip").await);
    assert_eq!(skip.status, RunStatus::Skipped);
    assert!(
        skip.error
            .as_deref()
            .unwrap()
            .contains("misfire policy SKIP"),
        "{skip:?}"
    );
    // FIRE_ALL: fires within the 3 s window all ran; older ones are one SKIPPED entry.
    let all = settle("all").await;
    let skipped = one_collapsed(&all);
    assert_eq!(skipped.status, RunStatus::Skipped);
    let i = all.iter().position(|r| r.run_id == skipped.run_id).unwrap();
    let caught: Vec<_> = all[i + 1..]
        .iter()
        .take_while(|r| r.trigger == Some(Trigger::CatchUp))
        .collect();
    assert!(
        caught.len() >= 3,
        "fires in the window each ran: {caught:#?}"
    );
    assert!(caught.iter().all(|r| r.status == RunStatus::Succeeded));
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}
