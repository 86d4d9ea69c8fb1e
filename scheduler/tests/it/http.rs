//! HTTP jobs through the built-in executor, and alert webhooks, against a real HTTP server
//! started by the test.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use krest_schemas::api::{AlertPayload, RunStatus};
use krest_test_support::eventually;
use krest_worker::{JobContext, JobError};
use serde_json::json;

use crate::harness::*;

#[derive(Clone, Default)]
struct Server {
    alerts: Arc<Mutex<Vec<AlertPayload>>>,
    alert_calls: Arc<AtomicUsize>,
}

async fn echo(headers: HeaderMap, body: String) -> String {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let token = headers
        .get("x-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    format!("ct={ct} token={token} body={body}")
}

async fn fail() -> (StatusCode, &'static str) {
    (StatusCode::INTERNAL_SERVER_ERROR, "boom")
}

/// Refuses the first call, accepts the rest (so alert delivery must retry).
async fn hook(State(s): State<Server>, body: String) -> StatusCode {
    if s.alert_calls.fetch_add(1, Ordering::SeqCst) == 0 {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    s.alerts
        .lock()
        .unwrap()
        .push(serde_json::from_str(&body).unwrap());
    StatusCode::NO_CONTENT
}

async fn start_server(state: Server) -> String {
    let app = Router::new()
        .route("/echo", post(echo))
        .route("/fail", post(fail))
        .route("/hook", post(hook))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_jobs_call_their_url_and_fail_on_non_2xx() {
    let env = Env::new("http-jobs");
    let node = env.node("n1");
    let client = env.client().await;
    let base = start_server(Server::default()).await;
    let w = krest_worker::http::register(env.worker("web", "h1"))
        .unwrap()
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![
            json!({"appName": "web", "jobGroup": "t", "jobName": "call", "jobType": "HTTP",
                   "url": format!("{base}/echo"), "methodType": "POST",
                   "headers": {"X-Token": "abc"}, "args": {"n": 1}}),
            json!({"appName": "web", "jobGroup": "t", "jobName": "plain", "jobType": "HTTP",
                   "url": format!("{base}/echo"), "args": "raw text"}),
            json!({"appName": "web", "jobGroup": "t", "jobName": "broken", "jobType": "HTTP",
                   "url": format!("{base}/fail"), "retryTimes": 1}),
        ],
    )
    .await;
    let ok = wait_final(&client, &trigger(&client, "call").await.run_id).await;
    assert_eq!(ok.run.status, RunStatus::Succeeded);
    assert_eq!(
        ok.run.output.as_deref(),
        Some("HTTP 200 OK: ct=application/json token=abc body={\"n\":1}")
    );
    assert!(ok.attempts[0]
        .logs
        .iter()
        .any(|l| l.line == format!("POST {base}/echo")));
    let plain = wait_final(&client, &trigger(&client, "plain").await.run_id).await;
    assert_eq!(
        plain.run.output.as_deref(),
        Some("HTTP 200 OK: ct=- token=- body=raw text")
    );
    let bad = wait_final(&client, &trigger(&client, "broken").await.run_id).await;
    assert_eq!(bad.run.status, RunStatus::Failed);
    assert_eq!(bad.attempts.len(), 2, "non-2xx is a failure, retried");
    assert_eq!(
        bad.run.error.as_deref(),
        Some("HTTP 500 Internal Server Error: boom")
    );

    // Validation: an HTTP job needs a URL; other jobs cannot have one.
    let err = client
        .call_value(
            krest_schemas::api::Op::JobApply,
            &json!({"documents": [
                {"appName": "web", "jobName": "nourl", "jobType": "HTTP"},
                {"appName": "web", "jobName": "ftp", "jobType": "HTTP", "url": "ftp://x"},
                {"appName": "web", "jobName": "normal", "path": "p", "url": "http://x"}
            ]}),
        )
        .await
        .unwrap_err();
    let text = format!("{:?}", err);
    assert!(text.contains("an HTTP job needs the URL to call"), "{text}");
    assert!(
        text.contains("must start with http:// or https://"),
        "{text}"
    );
    assert!(text.contains("only HTTP jobs have a url"), "{text}");
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_run_alerts_once_and_the_delivery_is_retried() {
    let env = Env::new("alerts");
    let n1 = env.node("n1");
    let n2 = env.node("n2");
    let client = env.client().await;
    let server = Server::default();
    let base = start_server(server.clone()).await;
    let w = env
        .worker("al", "w1")
        .handler("bad", |_ctx: JobContext| async move {
            Err::<(), _>(JobError::fatal("it broke"))
        })
        .handler("good", |_ctx: JobContext| async move { Ok(()) })
        .build()
        .unwrap()
        .spawn();
    let alert = json!({"webhook": format!("{base}/hook"), "on": ["FAILED"]});
    apply(
        &client,
        vec![
            job("bad", "al", "bad", json!({"alert": alert})),
            job("good", "al", "good", json!({"alert": alert})),
        ],
    )
    .await;
    let good = trigger(&client, "good").await.run_id;
    assert_eq!(
        wait_final(&client, &good).await.run.status,
        RunStatus::Succeeded
    );
    let bad = trigger(&client, "bad").await.run_id;
    assert_eq!(
        wait_final(&client, &bad).await.run.status,
        RunStatus::Failed
    );
    let alerts = eventually(DEADLINE, "the alert", || async {
        let a = server.alerts.lock().unwrap().clone();
        (!a.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].alert, "FAILED");
    assert_eq!(alerts[0].job, "t.bad");
    assert_eq!(alerts[0].run.run_id, bad);
    assert_eq!(alerts[0].run.error.as_deref(), Some("it broke"));
    // Two nodes recorded the failure; the second call was the retry of the refused first one,
    // and the successful run alerted nobody.
    let good_again = trigger(&client, "good").await.run_id;
    wait_final(&client, &good_again).await;
    assert_eq!(server.alert_calls.load(Ordering::SeqCst), 2);
    assert_eq!(server.alerts.lock().unwrap().len(), 1);
    w.stop().await.unwrap();
    n1.stop().await.unwrap();
    n2.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misfires_alert_after_an_outage() {
    let env = Env::new("misfire-alert");
    let mut opts = env.node_opts("n1");
    opts.engine.misfire_threshold = std::time::Duration::from_secs(1);
    let node = krest::node::spawn(opts.clone());
    let client = env.client().await;
    let server = Server::default();
    // Accept every call (the first one too).
    server.alert_calls.store(1, Ordering::SeqCst);
    let base = start_server(server.clone()).await;
    let w = env
        .worker("mf", "w1")
        .handler("tick", |_ctx: JobContext| async move { Ok(()) })
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![job("tick", "mf", "tick", json!({"cron": "* * * * * ?", "alert": {"webhook": format!("{base}/hook"), "on": ["MISFIRED"]}}))],
    )
    .await;
    eventually(DEADLINE, "a run", || async {
        runs(&client, "tick")
            .await
            .iter()
            .any(|r| r.status.is_final())
            .then_some(())
    })
    .await;
    node.stop().await.unwrap();
    // The outage.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let node = krest::node::spawn(opts);
    let alerts = eventually(DEADLINE, "the misfire alert", || async {
        let a = server.alerts.lock().unwrap().clone();
        (!a.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].alert, "MISFIRED");
    assert!(alerts[0].run.misfired >= 1, "{:?}", alerts[0].run);
    assert_eq!(alerts[0].run.trigger, Some(krest_schemas::Trigger::CatchUp));
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}
