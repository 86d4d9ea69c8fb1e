//! HTTP jobs through the built-in executor, and alert webhooks, against a real HTTP server
//! started by the test; their secrets (headers, URL passwords, webhook tokens) and NATS
//! credentials kept out of every view, error, alert and log line.

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

/// Answers with the `traceparent` header it got.
async fn trace(headers: HeaderMap) -> String {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
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
        .route("/trace", post(trace))
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
            json!({"appName": "web", "jobGroup": "t", "jobName": "traced", "jobType": "HTTP",
                   "url": format!("{base}/trace")}),
        ],
    )
    .await;
    // The run's W3C trace context reaches the called service, and the run's events carry it.
    let traced = wait_final(&client, &trigger(&client, "traced").await.run_id).await;
    let trace_id = krest_schemas::trace::trace_id(&traced.run.run_id);
    assert_eq!(traced.run.trace_id, trace_id);
    assert_eq!(
        traced.run.output.as_deref(),
        Some(format!(
            "HTTP 200 OK: {}",
            krest_schemas::trace::attempt_traceparent(&traced.run.run_id, 0, 1)
        ))
        .as_deref()
    );
    let (_, out, _) = env.cli(&["runs", "get", &traced.run.run_id]);
    assert!(out.contains(&format!("trace:      {trace_id}")), "{out}");
    let js = async_nats::jetstream::new(async_nats::connect(env.url()).await.unwrap());
    let events = js
        .get_stream(krest_schemas::names::EVENTS_STREAM)
        .await
        .unwrap();
    let subject = krest_schemas::names::events_subject("web", "t", "traced");
    let dispatched = events
        .get_first_raw_message_by_subject(&subject, 1)
        .await
        .unwrap();
    assert_eq!(
        dispatched
            .headers
            .get("traceparent")
            .map(|v| v.as_str().to_string()),
        Some(krest_schemas::trace::dispatch_traceparent(
            &traced.run.run_id,
            0
        )),
        "the leader's dispatched event"
    );
    let finished = events
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    let headers = finished.headers;
    assert!(
        headers
            .get("traceparent")
            .is_some_and(
                |v| krest_schemas::trace::parse_trace_id(v.as_str()) == Some(trace_id.as_str())
            ),
        "{headers:?}"
    );
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

/// What `/secure` was called with: (Authorization, X-Api-Key) per call.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

async fn secure(State(seen): State<Seen>, headers: HeaderMap) -> &'static str {
    let get = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    seen.lock()
        .unwrap()
        .push((get("authorization"), get("x-api-key")));
    "ok"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_job_secrets_never_show_and_survive_get_then_apply() {
    let env = Env::new("http-secrets");
    let mut node = env.node_process("n1");
    let client = env.client().await;
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/secure", post(secure))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let hooks = Server::default();
    hooks.alert_calls.store(1, Ordering::SeqCst); // accept every call
    let hook_base = start_server(hooks.clone()).await;
    let w = krest_worker::http::register(env.worker("web", "h1"))
        .unwrap()
        .build()
        .unwrap()
        .spawn();
    let dead = krest_test_support::free_port();
    let docs = json!([
        {"appName": "web", "jobGroup": "t", "jobName": "secure", "jobType": "HTTP",
         "url": format!("http://user:pw-s3cret@{addr}/secure"),
         "headers": {"X-Api-Key": "key-s3cret"},
         "alert": {"webhook": format!("{hook_base}/hook?token=hook-s3cret")}},
        {"appName": "web", "jobGroup": "t", "jobName": "down", "jobType": "HTTP",
         "url": format!("http://user:pw-s3cret@127.0.0.1:{dead}/x"),
         "alert": {"webhook": format!("{hook_base}/hook?token=hook-s3cret")}},
        {"appName": "web", "jobGroup": "t", "jobName": "dead-hook", "jobType": "HTTP",
         "url": format!("http://127.0.0.1:{dead}/x"),
         "alert": {"webhook": format!("http://127.0.0.1:{dead}/hook/dead-s3cret")}}
    ]);
    let file = env.write("jobs.json", &docs.to_string());
    let (code, _, err) = env.cli(&["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let no_secret = |what: &str, text: &str| {
        assert!(!text.contains("s3cret"), "{what} shows a secret: {text}");
    };

    // Views: job get (table and JSON), list, history.
    let (code, view, _) = env.cli(&["-o", "json", "job", "get", "t.secure"]);
    assert_eq!(code, 0);
    no_secret("job get -o json", &view);
    let v: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(v["spec"]["headers"]["X-Api-Key"], "<redacted>");
    assert_eq!(
        v["spec"]["url"],
        format!("http://<redacted>@{addr}/secure").as_str()
    );
    assert_eq!(
        v["spec"]["alert"]["webhook"],
        format!("{hook_base}/<redacted>").as_str()
    );
    for args in [
        &["job", "get", "t.secure"][..],
        &["-o", "json", "job", "list"],
        &["-o", "json", "job", "history", "t.secure"],
    ] {
        let (code, out, _) = env.cli(args);
        assert_eq!(code, 0);
        no_secret(&args.join(" "), &out);
    }

    // get → apply keeps the secrets (unchanged), also after an edit; the worker gets them.
    let saved = env.write("secure.json", &view);
    let (code, out, err) = env.cli(&["job", "apply", "-f", saved.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("t.secure unchanged"), "{out}");
    let (_, list, _) = env.cli(&["-o", "json", "job", "list"]);
    let all = env.write("all.json", &list);
    let (code, out, err) = env.cli(&["job", "apply", "-f", all.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches(" unchanged").count(), 3, "{out}");
    let mut edited = v.clone();
    edited["spec"]["description"] = json!("edited");
    let edited_file = env.write("edited.json", &edited.to_string());
    let (code, out, err) = env.cli(&["job", "apply", "-f", edited_file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("t.secure updated"), "{out}");
    let ok = wait_final(&client, &trigger(&client, "t.secure").await.run_id).await;
    assert_eq!(ok.run.status, RunStatus::Succeeded, "{ok:?}");
    assert_eq!(
        seen.lock().unwrap().clone(),
        [(
            "Basic dXNlcjpwdy1zM2NyZXQ=".to_string(),
            "key-s3cret".to_string()
        )],
        "the worker calls with the real credentials"
    );

    // A placeholder with nothing stored behind it is an error naming the field.
    let mut fresh = edited["spec"].clone();
    fresh["jobName"] = json!("fresh");
    let fresh_file = env.write("fresh.json", &fresh.to_string());
    let (code, _, err) = env.cli(&["job", "apply", "-f", fresh_file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("- url: `<redacted>` stands for the stored"),
        "{err}"
    );
    assert!(err.contains("- headers.X-Api-Key: `<redacted>`"), "{err}");

    // A failed call's error (reqwest names the URL) and the alert about it show no password.
    let down = trigger(&client, "t.down").await.run_id;
    assert_eq!(
        wait_final(&client, &down).await.run.status,
        RunStatus::Failed
    );
    let (_, out, _) = env.cli(&["runs", "get", &down]);
    no_secret("runs get", &out);
    assert!(
        out.contains(&format!(
            "request to http://<redacted>@127.0.0.1:{dead}/x failed"
        )),
        "{out}"
    );
    for args in [
        &["-o", "json", "runs", "get", &down][..],
        &["runs", "list", "--job", "t.down"],
    ] {
        let (code, out, _) = env.cli(args);
        assert_eq!(code, 0);
        no_secret(&args.join(" "), &out);
    }
    let alerts = eventually(DEADLINE, "the alert", || async {
        let a = hooks.alerts.lock().unwrap().clone();
        (!a.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(alerts[0].run.run_id, down);
    no_secret("the alert", &serde_json::to_string(&alerts).unwrap());

    // An unreachable webhook is logged redacted; nothing in the node's log shows a secret.
    let dead_run = trigger(&client, "t.dead-hook").await.run_id;
    wait_final(&client, &dead_run).await;
    eventually(DEADLINE, "the undelivered alert logged", || async {
        node.output()
            .contains("alert not delivered after 3 tries")
            .then_some(())
    })
    .await;
    let log = node.output();
    assert!(log.contains("/<redacted>"), "{log}");
    no_secret("the scheduler's log", &log);
    w.stop().await.unwrap();
    node.terminate(std::time::Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_credentials_stay_out_of_logs_and_errors() {
    let env = Env::new("nats-secret");
    let port = krest_test_support::free_port();
    let url = format!("nats://user:pw-s3cret@127.0.0.1:{port},nats://tok-s3cret@127.0.0.1:{port}");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_krest"));
    cmd.args([
        "scheduler",
        "--nats-url",
        &url,
        "--db",
        &env.db("n1"),
        "--http",
        "off",
    ]);
    let mut node = krest_test_support::Proc::spawn("n1", cmd, env.dir.join("n1.log"));
    eventually(DEADLINE, "a failed connection logged", || async {
        node.output()
            .contains("cannot connect to NATS")
            .then_some(())
    })
    .await;
    let log = node.output();
    assert!(!log.contains("s3cret"), "{log}");
    assert!(log.contains("nats://<redacted>@127.0.0.1"), "{log}");
    node.terminate(std::time::Duration::from_secs(10));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
        .args(["--nats-url", &url, "--timeout", "1s", "job", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(!err.contains("s3cret"), "{err}");
    assert!(
        err.contains("cannot connect to NATS at nats://<redacted>@"),
        "{err}"
    );
}
