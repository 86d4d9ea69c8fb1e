//! The worker SDK against a real server: capacity limits, heartbeats, progress acks, graceful
//! shutdown and redelivery when a worker dies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use krest_schemas::api::{AttemptStatus, Op, RunStatus};
use krest_schemas::WorkerInfo;
use krest_test_support::eventually;
use krest_worker::JobContext;
use serde_json::json;

use crate::harness::*;

/// Counts handlers running at once and the most ever seen.
#[derive(Clone, Default)]
struct Concurrency {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

impl Concurrency {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Registers a `work` handler that signals when it starts, then hangs ignoring cancellation.
fn hanging(
    builder: krest_worker::WorkerBuilder,
) -> (krest_worker::RunningWorker, Arc<tokio::sync::Notify>) {
    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    let worker = builder
        .handler("work", move |_ctx: JobContext| {
            let s = s.clone();
            async move {
                s.notify_one();
                tokio::time::sleep(Duration::from_secs(600)).await;
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn();
    (worker, started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_holds_at_most_weight_times_slots_runs_and_heartbeats_its_capacity() {
    let env = Env::new("capacity");
    let node = env.node("n1");
    let client = env.client().await;
    let c = Concurrency::default();
    let cc = c.clone();
    let w = env
        .worker("cap", "w1")
        .weight(2)
        .slots(2)
        .version("9.9.9")
        .handler("slow", move |_ctx: JobContext| {
            let c = cc.clone();
            async move {
                c.enter();
                tokio::time::sleep(Duration::from_millis(400)).await;
                c.leave();
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn();
    let items: Vec<String> = (0..12).map(|i| i.to_string()).collect();
    apply(
        &client,
        vec![job(
            "many",
            "cap",
            "slow",
            json!({"jobType": "SHARDING", "args": items}),
        )],
    )
    .await;
    let run_id = trigger(&client, "many").await.run_id;

    let info: Vec<WorkerInfo> = eventually(DEADLINE, "the worker's heartbeat", || async {
        client
            .call::<_, Vec<WorkerInfo>>(Op::WorkersList, &json!({}))
            .await
            .ok()
            .filter(|w| !w.is_empty())
    })
    .await;
    assert_eq!(info[0].instance, "w1");
    assert_eq!((info[0].weight, info[0].slots), (2, 2));
    assert_eq!(info[0].handlers, ["slow"]);
    assert_eq!(info[0].version, "9.9.9");

    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(
        c.max.load(Ordering::SeqCst),
        4,
        "12 shards pending, capacity 2 × 2"
    );

    // A clean stop removes the heartbeat at once.
    w.stop().await.unwrap();
    let left: Vec<WorkerInfo> = client.call(Op::WorkersList, &json!({})).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_lets_running_handlers_finish() {
    let env = Env::new("graceful");
    let node = env.node("n1");
    let client = env.client().await;
    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    let w = env
        .worker("grace", "w1")
        .handler("long", move |ctx: JobContext| {
            let s = s.clone();
            async move {
                s.notify_one();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Ok(format!("finished, cancelled={}", ctx.is_cancelled()))
            }
        })
        .build()
        .unwrap()
        .spawn();
    apply(&client, vec![job("long", "grace", "long", json!({}))]).await;
    let run_id = trigger(&client, "long").await.run_id;
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .unwrap();
    w.stop().await.unwrap();
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(d.run.output.as_deref(), Some("finished, cancelled=false"));
    assert_eq!(d.attempts.len(), 1);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_outliving_the_shutdown_deadline_is_cancelled_and_handed_to_another_worker() {
    let env = Env::new("deadline");
    let node = env.node("n1");
    let client = env.client().await;
    let (stubborn, started) = hanging(
        env.worker("dl", "stubborn")
            .shutdown_timeout(Duration::from_millis(300))
            .cancel_grace(Duration::from_millis(200)),
    );
    apply(
        &client,
        vec![job("work", "dl", "work", json!({"retryTimes": 0}))],
    )
    .await;
    let run_id = trigger(&client, "work").await.run_id;
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .unwrap();
    stubborn.stop().await.unwrap();

    let helper = env
        .worker("dl", "helper")
        .handler(
            "work",
            |_ctx: JobContext| async move { Ok("done by helper") },
        )
        .build()
        .unwrap()
        .spawn();
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    let attempts: Vec<(u32, AttemptStatus, Option<String>)> = d
        .attempts
        .iter()
        .map(|a| (a.attempt, a.status, a.worker.clone()))
        .collect();
    assert_eq!(
        attempts,
        [
            (1, AttemptStatus::Failed, Some("stubborn".into())),
            (2, AttemptStatus::Succeeded, Some("helper".into()))
        ]
    );
    assert!(d.attempts[0]
        .error
        .as_deref()
        .unwrap()
        .contains("shut down before the handler finished"));
    helper.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_handlers_keep_their_run_with_progress_acks() {
    let env = Env::new("progress");
    let node = env.node("n1");
    let client = env.client().await;
    let log = Executions::default();
    let l = log.clone();
    let w = env
        .worker("prog", "w1")
        .ack_wait(Duration::from_secs(1))
        .handler("long", move |ctx: JobContext| {
            let l = l.clone();
            async move {
                l.record(&ctx);
                tokio::time::sleep(Duration::from_secs(4)).await;
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![job("long", "prog", "long", json!({"retryTimes": 3}))],
    )
    .await;
    let run_id = trigger(&client, "long").await.run_id;
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(
        d.attempts.len(),
        1,
        "no redelivery while the handler runs past the ack wait"
    );
    assert_eq!(log.of(&run_id).len(), 1);
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_held_by_a_dead_worker_is_redelivered_to_a_live_one() {
    let env = Env::new("dead-worker");
    let node = env.node("n1");
    let client = env.client().await;
    let (doomed, started) = hanging(env.worker("dw", "doomed").ack_wait(Duration::from_secs(2)));
    apply(
        &client,
        vec![job("work", "dw", "work", json!({"retryTimes": 2}))],
    )
    .await;
    let run_id = trigger(&client, "work").await.run_id;
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .unwrap();
    doomed.abort();
    let survivor = env
        .worker("dw", "survivor")
        .handler("work", |ctx: JobContext| async move {
            Ok(format!("attempt {}", ctx.attempt()))
        })
        .build()
        .unwrap()
        .spawn();
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(d.run.output.as_deref(), Some("attempt 2"));
    let last = d.attempts.last().unwrap();
    assert_eq!(
        (last.attempt, last.worker.as_deref()),
        (2, Some("survivor"))
    );
    survivor.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_acks_follow_the_ack_wait_of_the_consumer_a_run_came_from() {
    use async_nats::jetstream::consumer::{self, AckPolicy};
    use krest_schemas::names::{app_consumer, work_queue_filter, WORK_STREAM};

    let env = Env::new("progress-per-consumer");
    let node = env.node("n1");
    let client = env.client().await;
    // The app's consumer already exists with a long ack wait (made by another worker):
    // it keeps it. This worker's own consumer gets the worker's short one.
    let js = async_nats::jetstream::new(async_nats::connect(env.url()).await.unwrap());
    js.get_stream(WORK_STREAM)
        .await
        .unwrap()
        .create_consumer(consumer::pull::Config {
            durable_name: Some(app_consumer("pc")),
            filter_subject: work_queue_filter("pc"),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_deliver: krest_worker::MAX_DELIVER,
            ..Default::default()
        })
        .await
        .unwrap();
    let log = Executions::default();
    let l = log.clone();
    let w = env
        .worker("pc", "w1")
        .ack_wait(Duration::from_secs(1))
        .handler("long", move |ctx: JobContext| {
            let l = l.clone();
            async move {
                l.record(&ctx);
                tokio::time::sleep(Duration::from_secs(4)).await;
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn();
    eventually(DEADLINE, "the worker's heartbeat", || async {
        client
            .call::<_, Vec<WorkerInfo>>(Op::WorkersList, &json!({}))
            .await
            .ok()
            .filter(|w| !w.is_empty())
    })
    .await;
    // ROUND_ROBIN addresses the run to w1: it comes from w1's own consumer (ack wait 1 s),
    // so progress acks must come every third of 1 s, not of the app consumer's 60 s.
    apply(
        &client,
        vec![job(
            "long",
            "pc",
            "long",
            json!({"retryTimes": 3, "loadBalanceType": "ROUND_ROBIN"}),
        )],
    )
    .await;
    let run_id = trigger(&client, "long").await.run_id;
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    let attempts: Vec<(u32, AttemptStatus)> =
        d.attempts.iter().map(|a| (a.attempt, a.status)).collect();
    assert_eq!(
        attempts,
        [(1, AttemptStatus::Succeeded)],
        "no redelivery while the handler runs past its consumer's ack wait"
    );
    assert_eq!(log.of(&run_id), [(0, 1, "w1".to_string())]);
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_started_before_any_scheduler_waits_for_its_streams_and_buckets() {
    let env = Env::new("worker-first");
    let w = env
        .worker("early", "w1")
        .handler("work", |ctx: JobContext| async move {
            Ok(format!("attempt {}", ctx.attempt()))
        })
        .build()
        .unwrap()
        .spawn();
    // Nothing exists yet: the worker waits (logging what for) instead of failing.
    let js = async_nats::jetstream::new(async_nats::connect(env.url()).await.unwrap());
    assert!(js
        .get_stream(krest_schemas::names::WORK_STREAM)
        .await
        .is_err());
    let node = env.node("n1");
    let client = env.client().await;
    apply(&client, vec![job("work", "early", "work", json!({}))]).await;
    let run_id = trigger(&client, "work").await.run_id;
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(d.run.output.as_deref(), Some("attempt 1"));
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

/// The events stored for job `t.NAME` of `app`, in stream order.
async fn job_events(env: &Env, app: &str, name: &str) -> Vec<krest_schemas::RunEvent> {
    let js = async_nats::jetstream::new(async_nats::connect(env.url()).await.unwrap());
    let stream = js
        .get_stream(krest_schemas::names::EVENTS_STREAM)
        .await
        .unwrap();
    let subject = krest_schemas::names::events_subject(app, "t", name);
    let mut out = Vec::new();
    let mut seq = 1;
    while let Ok(m) = stream.get_first_raw_message_by_subject(&subject, seq).await {
        out.push(serde_json::from_slice(&m.payload).unwrap());
        seq = m.sequence + 1;
    }
    out
}

/// The kinds of a job's events in stream order, but for the one `dispatched` event (the
/// leader stores it after the work message, so a quick worker's events may precede it).
fn kinds(events: &[krest_schemas::RunEvent]) -> Vec<&'static str> {
    let dispatched = events
        .iter()
        .filter(|e| matches!(e, krest_schemas::RunEvent::Dispatched(_)))
        .count();
    assert!(dispatched <= 1, "{events:?}");
    events
        .iter()
        .filter(|e| !matches!(e, krest_schemas::RunEvent::Dispatched(_)))
        .map(|e| match e {
            krest_schemas::RunEvent::Dispatched(_) => "dispatched",
            krest_schemas::RunEvent::Started(_) => "started",
            krest_schemas::RunEvent::Log(_) => "log",
            krest_schemas::RunEvent::Finished(_) => "finished",
            krest_schemas::RunEvent::Skipped(_) => "skipped",
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_attempt_folds_its_start_into_finished_and_a_long_one_reports_it() {
    let env = Env::new("startfold");
    let node = env.node("n1");
    let client = env.client().await;
    // Attempts that end without logging within an hour send no `started` event.
    let patient = env
        .worker("patient", "w1")
        .report_start_after(Duration::from_secs(3600))
        .handler("quick", |_ctx: JobContext| async { Ok("quick") })
        .handler("chatty", |ctx: JobContext| async move {
            ctx.log("hello");
            Ok("chatty")
        })
        .build()
        .unwrap()
        .spawn();
    // This one reports a start after 10 ms; its handler waits until the event is stored.
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let prompt = env
        .worker("prompt", "w1")
        .report_start_after(Duration::from_millis(10))
        .handler("long", move |_ctx: JobContext| {
            let r = r.clone();
            async move {
                r.notified().await;
                Ok("long")
            }
        })
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![
            job("quick", "patient", "quick", json!({})),
            job("chatty", "patient", "chatty", json!({})),
            job("long", "prompt", "long", json!({})),
        ],
    )
    .await;

    let quick = trigger(&client, "quick").await.run_id;
    let d = wait_final(&client, &quick).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    let events = job_events(&env, "patient", "quick").await;
    assert_eq!(kinds(&events), ["finished"]);
    let Some(krest_schemas::RunEvent::Finished(f)) = events.last() else {
        panic!("{events:?}")
    };
    let started = f.started_at.expect("the start rides with finished");
    assert!(started <= f.at);
    // Stored to the millisecond.
    let ms = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.timestamp_millis());
    assert_eq!(ms(f.scheduled_at), ms(d.run.scheduled_at));
    // Recorded as if a `started` event had come.
    assert_eq!(d.attempts.len(), 1);
    assert_eq!(ms(d.attempts[0].started_at), ms(Some(started)));
    assert_eq!(d.attempts[0].worker.as_deref(), Some("w1"));
    assert_eq!(ms(d.run.started_at), ms(Some(started)));

    // A log line is preceded by the attempt's start.
    let chatty = trigger(&client, "chatty").await.run_id;
    assert_eq!(
        wait_final(&client, &chatty).await.run.status,
        RunStatus::Succeeded
    );
    let events = job_events(&env, "patient", "chatty").await;
    assert_eq!(kinds(&events), ["started", "log", "finished"]);
    let Some(krest_schemas::RunEvent::Finished(f)) = events.last() else {
        panic!("{events:?}")
    };
    assert_eq!(f.started_at, None);

    // A handler still running after the delay has its start reported while it runs.
    let long = trigger(&client, "long").await.run_id;
    eventually(DEADLINE, "the long run's started event", || {
        let env = &env;
        async move {
            let k = kinds(&job_events(env, "prompt", "long").await);
            (k == ["started"]).then_some(())
        }
    })
    .await;
    eventually(DEADLINE, "the long run recorded RUNNING", || {
        let client = &client;
        let long = &long;
        async move {
            let d = run(client, long).await?;
            (d.run.status == RunStatus::Running).then_some(())
        }
    })
    .await;
    release.notify_one();
    let d = wait_final(&client, &long).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    let events = job_events(&env, "prompt", "long").await;
    assert_eq!(kinds(&events), ["started", "finished"]);
    let Some(krest_schemas::RunEvent::Finished(f)) = events.last() else {
        panic!("{events:?}")
    };
    assert_eq!(f.started_at, None);

    patient.stop().await.unwrap();
    prompt.stop().await.unwrap();
    node.stop().await.unwrap();
}

/// Runs dispatched ahead of their time are held beyond the worker's slots (so it takes the
/// next runs meanwhile) but run within them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_held_for_their_time_exceed_the_slots_but_run_within_them() {
    const APP: &str = "hold-app";
    let env = Env::new("hold-slots");
    let mut opts = env.node_opts("n1");
    opts.engine.dispatch_ahead = krest_schemas::messages::MAX_HOLD;
    let node = krest::node::spawn(opts);
    let client = env.client().await;
    let seen = Concurrency::default();
    let c = seen.clone();
    let w = env
        .worker(APP, "w1")
        .slots(1)
        .handler("work", move |_ctx: JobContext| {
            let c = c.clone();
            async move {
                c.enter();
                tokio::time::sleep(Duration::from_millis(200)).await;
                c.leave();
                Ok(())
            }
        })
        .build()
        .unwrap()
        .spawn();
    // Three jobs due at the same instant 15 s from now: dispatched ~10 s ahead of it.
    let at = (chrono::Utc::now() + chrono::Duration::seconds(15))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let docs = (0..3)
        .map(|i| job(&format!("h{i}"), APP, "work", json!({"at": at})))
        .collect();
    apply(&client, docs).await;
    // All three delivered to the one-slot worker and held (unacknowledged) before their time.
    let nats = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let due = chrono::DateTime::parse_from_rfc3339(&at).unwrap();
    eventually(DEADLINE, "three runs held by the worker", || async {
        let counts = app_consumer_counts(&js, APP).await?;
        assert!(
            chrono::Utc::now() < due,
            "the runs came due before all three were held"
        );
        (counts == (3, 0)).then_some(())
    })
    .await;
    for i in 0..3 {
        let r = eventually(DEADLINE, "the run ended", || async {
            runs(&client, &format!("h{i}"))
                .await
                .into_iter()
                .find(|r| r.status.is_final())
        })
        .await;
        assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
        assert!(r.started_at.unwrap() >= r.scheduled_at.unwrap(), "{r:?}");
    }
    assert_eq!(
        seen.max.load(Ordering::SeqCst),
        1,
        "one slot: one handler at a time"
    );
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}
