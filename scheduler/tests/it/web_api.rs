//! The HTTP API (`/api/v1`) on a real node, NATS and workers, through `reqwest`: every
//! endpoint, its errors (bad input, unknown names) and its access rules (missing, wrong and
//! read-only tokens; anonymous reads).

use std::sync::Arc;
use std::time::Duration;

use krest::serve::web::WebOptions;
use krest_test_support::eventually;
use krest_worker::JobContext;
use serde_json::{json, Value};

use crate::harness::*;

const WRITE: &str = "w-token-123";
const READ: &str = "r-token-456";

fn access() -> WebOptions {
    WebOptions {
        api_token: Some(WRITE.into()),
        read_token: Some(READ.into()),
        anonymous_read: false,
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap()
}

fn field(v: &Value) -> &str {
    v["error"]["field"].as_str().unwrap_or("")
}

/// Reads server-sent events until `end` (or the deadline); returns (event, data) pairs.
async fn sse_until_end(web: &Web, path: &str) -> Vec<(String, String)> {
    sse_until_end_signalling(web, path, None).await
}

/// [`sse_until_end`], telling `opened` once the first event arrived.
async fn sse_until_end_signalling(
    web: &Web,
    path: &str,
    mut opened: Option<tokio::sync::oneshot::Sender<()>>,
) -> Vec<(String, String)> {
    let mut res = web
        .http
        .get(format!("{}{path}", web.base))
        .header("authorization", format!("Bearer {READ}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut buf = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let chunk = tokio::time::timeout_at(deadline, res.chunk())
            .await
            .expect("the event stream to end")
            .unwrap();
        let Some(chunk) = chunk else { return events };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            let mut event = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            if block.lines().all(|l| l.starts_with(':')) {
                continue; // keep-alive
            }
            let end = event == "end";
            events.push((event, data));
            if let Some(tx) = opened.take() {
                let _ = tx.send(());
            }
            if end {
                return events;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_api_serves_every_endpoint_with_tokens_and_errors() {
    let env = Env::new("web-api");
    let (_node, base) = web_node(&env, "n1", access()).await;
    let (_anon_node, anon_base) = web_node(
        &env,
        "n2",
        WebOptions {
            api_token: None,
            read_token: None,
            anonymous_read: true,
        },
    )
    .await;
    let demo = krest_demo_worker::register(
        env.worker("demo-spring-krest-job", "demo-1"),
        krest_demo_worker::DemoOptions {
            work: Duration::from_millis(30),
            journal: None,
        },
    )
    .build()
    .unwrap()
    .spawn();
    // A handler that waits for the test: runs that stay RUNNING until released.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let gated = env
        .worker("gated", "gate-1")
        .handler("wait", move |ctx: JobContext| {
            let g = g.clone();
            async move {
                ctx.log("waiting at the gate");
                // Each release lets one run through.
                g.acquire()
                    .await
                    .map_err(|_| krest_worker::JobError::fatal("closed"))?
                    .forget();
                ctx.log("through the gate with https://user:pw@example.com/x");
                Ok("done".to_string())
            }
        })
        .build()
        .unwrap()
        .spawn();

    let writer = Web::new(&base, Some(WRITE));
    let reader = writer.with_token(Some(READ));
    let nobody = writer.with_token(None);
    let stranger = writer.with_token(Some("not-the-token"));

    // --- Access: 401 without or with a wrong token (with WWW-Authenticate), 403 for a read
    // token used to write; the OpenAPI document is public.
    let (s, h, v) = nobody.raw(reqwest::Method::GET, "/api/v1/jobs", None).await;
    assert_eq!((s, code(&v)), (401, "unauthorized"), "{v}");
    assert_eq!(h["www-authenticate"], r#"Bearer realm="krest""#);
    assert!(message(&v).contains("missing bearer token"), "{v}");
    let (s, h, v) = stranger
        .raw(reqwest::Method::GET, "/api/v1/jobs", None)
        .await;
    assert_eq!((s, code(&v)), (401, "unauthorized"), "{v}");
    assert!(h["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    let (s, v) = reader.get("/api/v1/jobs").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"], json!([]));
    let (s, v) = reader
        .send(
            "POST",
            "/api/v1/jobs",
            Some(json!({"appName": "a", "jobName": "x", "path": "p"})),
        )
        .await;
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    let (s, v) = nobody.send("POST", "/api/v1/jobs/x/pause", None).await;
    assert_eq!((s, code(&v)), (401, "unauthorized"), "{v}");
    let (s, v) = stranger.send("DELETE", "/api/v1/jobs/x", None).await;
    assert_eq!((s, code(&v)), (401, "unauthorized"), "{v}");
    let (s, doc) = nobody.get("/api/v1/openapi.json").await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    // Anonymous reads where allowed; writes there are disabled (no write token).
    let anon = Web::new(&anon_base, None);
    assert_eq!(anon.get("/api/v1/jobs").await.0, 200);
    // The console there opens read-only without a login.
    let (s, v) = anon.get("/api/v1/session").await;
    assert_eq!((s, v["access"].as_str()), (200, Some("anonymous")), "{v}");
    let (s, _) = Web::new(&base, None).get("/api/v1/session").await;
    assert_eq!(s, 401, "no anonymous session where reads need a token");
    let (s, v) = anon.send("POST", "/api/v1/jobs/x/pause", None).await;
    assert_eq!((s, code(&v)), (401, "unauthorized"), "{v}");
    assert!(message(&v).contains("--api-token"), "{v}");

    // --- Every documented route exists (answers something other than the router's
    // fallback), and unknown routes and methods answer the JSON error shape.
    let paths = doc["paths"].as_object().unwrap();
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{job}", "no.such")
                .replace("{run}", "no-such")
                .replace("{revision}", "1");
            let (s, v) = writer.send(&method.to_uppercase(), &concrete, None).await;
            assert_ne!(s, 405, "{method} {path}: {v}");
            if s == 404 {
                assert!(!message(&v).starts_with("no route"), "{method} {path}: {v}");
            }
        }
    }
    let (s, v) = reader.get("/api/v1/nope").await;
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");
    assert!(message(&v).starts_with("no route"), "{v}");
    let (s, v) = writer.send("PATCH", "/api/v1/jobs", None).await;
    assert_eq!(s, 405, "{v}");
    assert_eq!(code(&v), "bad_request");

    // --- Jobs: the seed's documents applied as `job apply` takes them (an array).
    let (s, v) = writer
        .send("POST", "/api/v1/jobs", Some(Value::Array(seed_documents())))
        .await;
    assert_eq!(s, 200, "{v}");
    let outcomes: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["CREATED", "CREATED"]);
    let secret_job = json!({
        "appName": "web", "jobGroup": "t", "jobName": "secret", "jobType": "HTTP",
        "url": "https://user:hunter2@example.com/hook", "headers": {"X-Token": "s3cret-value"},
        "cron": "0 0 3 * * ?", "timeZone": "Europe/Berlin",
    });
    let gated_job = json!({
        "appName": "gated", "jobGroup": "t", "jobName": "gated", "path": "wait",
        "cron": "0 0 0 1 1 ?",
    });
    let (s, v) = writer
        .send("POST", "/api/v1/jobs", Some(json!([secret_job, gated_job])))
        .await;
    assert_eq!(s, 200, "{v}");

    // Listing: next fire times, search, status filter, paging.
    let v = reader.ok("/api/v1/jobs").await;
    let keys: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "default-jobGroup.demo-job2",
            "default-jobGroup.demo-job3",
            "t.gated",
            "t.secret"
        ]
    );
    assert!(v["items"][0]["nextFireAt"].is_string(), "{v}");
    let v = reader.ok("/api/v1/jobs?search=JOB3").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["key"], "default-jobGroup.demo-job3");
    let v = reader.ok("/api/v1/jobs?limit=3").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    let next = v["next"].as_str().unwrap().to_string();
    let v = reader
        .ok(&format!("/api/v1/jobs?limit=3&cursor={next}"))
        .await;
    assert_eq!(v["items"][0]["key"], "t.secret");
    assert!(v.get("next").is_none(), "{v}");
    let (s, v) = reader.get("/api/v1/jobs?status=sleeping").await;
    assert_eq!(
        (s, code(&v), field(&v)),
        (400, "bad_request", "status"),
        "{v}"
    );
    let (s, v) = reader.get("/api/v1/jobs?limit=many").await;
    assert_eq!((s, field(&v)), (400, "limit"), "{v}");
    let (s, v) = reader.get("/api/v1/jobs?colour=red").await;
    assert_eq!((s, field(&v)), (400, "colour"), "{v}");

    // Secrets appear only redacted.
    let v = reader.ok("/api/v1/jobs/t.secret").await;
    let text = v.to_string();
    assert!(
        !text.contains("s3cret-value") && !text.contains("hunter2"),
        "{text}"
    );
    assert_eq!(v["spec"]["headers"]["X-Token"], "<redacted>");
    let text = reader
        .ok("/api/v1/jobs/t.secret/revisions")
        .await
        .to_string();
    assert!(
        !text.contains("s3cret-value") && !text.contains("hunter2"),
        "{text}"
    );

    // Get: by bare name too; unknown names with the CLI's message.
    let v = reader.ok("/api/v1/jobs/demo-job3").await;
    assert_eq!(v["key"], "default-jobGroup.demo-job3");
    let (s, v) = reader.get("/api/v1/jobs/nope").await;
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");
    assert!(message(&v).contains("nope"), "{v}");

    // PUT: an update; a definition for another key; an invalid one names its field.
    let mut doc = reader.ok("/api/v1/jobs/t.secret").await["spec"].clone();
    doc["cron"] = json!("0 30 4 * * ?");
    let (s, v) = writer
        .send("PUT", "/api/v1/jobs/t.secret", Some(doc.clone()))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["outcome"], "UPDATED");
    // The placeholders were resolved against the stored secrets, not stored as text.
    let rev2 = v["revision"].as_u64().unwrap();
    let (s, v) = writer
        .send("PUT", "/api/v1/jobs/t.other", Some(doc.clone()))
        .await;
    assert_eq!((s, field(&v)), (400, "jobName"), "{v}");
    doc["cron"] = json!("0 61 * * * ?");
    let (s, v) = writer.send("PUT", "/api/v1/jobs/t.secret", Some(doc)).await;
    assert_eq!(
        (s, code(&v), field(&v)),
        (422, "invalid_job", "cron"),
        "{v}"
    );
    assert!(!v["error"]["invalid"].as_array().unwrap().is_empty());
    // Strict JSON: duplicate keys refused with where they are; bodies over the limit refused.
    let (s, _, v) = writer
        .raw(
            reqwest::Method::POST,
            "/api/v1/jobs",
            Some(br#"{"appName": "a", "appName": "b", "jobName": "x", "path": "p"}"#.to_vec()),
        )
        .await;
    assert_eq!((s, code(&v)), (400, "bad_request"), "{v}");
    assert!(message(&v).contains("duplicate"), "{v}");
    // On a connection of its own: the server stops reading at the limit and closes it.
    let alone = Web::new(&base, Some(WRITE));
    let (s, _, v) = alone
        .raw(
            reqwest::Method::POST,
            "/api/v1/jobs",
            Some(vec![b' '; 2 * 1024 * 1024]),
        )
        .await;
    assert_eq!((s, code(&v)), (413, "too_large"), "{v}");
    let (s, v) = writer.send("POST", "/api/v1/jobs", None).await;
    assert_eq!((s, code(&v)), (400, "bad_request"), "{v}");

    // Revisions, one revision, and a diff between two.
    let v = reader.ok("/api/v1/jobs/t.secret/revisions").await;
    let revisions = v["items"].as_array().unwrap();
    assert_eq!(revisions.len(), 2);
    assert_eq!(revisions[0]["revision"].as_u64(), Some(rev2));
    let rev1 = revisions[1]["revision"].as_u64().unwrap();
    assert_eq!((rev1, rev2), (1, 2), "numbered per job");
    let v = reader
        .ok(&format!("/api/v1/jobs/t.secret/revisions/{rev1}"))
        .await;
    assert_eq!(v["spec"]["cron"], "0 0 3 * * ?");
    let (s, v) = reader.get("/api/v1/jobs/t.secret/revisions/x").await;
    assert_eq!((s, field(&v)), (400, "revision"), "{v}");
    let v = reader
        .ok(&format!("/api/v1/jobs/t.secret/diff?from={rev1}"))
        .await;
    assert_eq!(v["from"].as_u64(), Some(rev1));
    assert_eq!(v["to"].as_u64(), Some(rev2));
    assert_eq!(
        v["changes"],
        json!([{"path": "/cron", "before": "0 0 3 * * ?", "after": "0 30 4 * * ?"}])
    );
    let (s, v) = reader.get("/api/v1/jobs/t.secret/diff").await;
    assert_eq!((s, field(&v)), (400, "from"), "{v}");
    let (s, v) = reader.get("/api/v1/jobs/t.secret/diff?from=999").await;
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");

    // Pause and resume.
    let (s, v) = writer
        .send("POST", "/api/v1/jobs/demo-job2/pause", None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["spec"]["running"], false);
    assert!(v.get("nextFireAt").is_none());
    let v = reader.ok("/api/v1/jobs?status=paused").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let (s, v) = writer
        .send("POST", "/api/v1/jobs/demo-job2/resume", None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["spec"]["running"], true);

    // --- Trigger with args, then the run: listed, detailed with attempts and logs.
    let (s, v) = writer
        .send(
            "POST",
            "/api/v1/jobs/demo-job3/trigger",
            Some(json!({"args": "from the web"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let run_id = v["runId"].as_str().unwrap().to_string();
    let (s, v) = writer
        .send(
            "POST",
            "/api/v1/jobs/demo-job3/trigger",
            Some(json!({"colour": 1})),
        )
        .await;
    assert_eq!((s, field(&v)), (400, "colour"), "{v}");
    let detail = eventually(DEADLINE, "the triggered run to succeed", || async {
        let (s, v) = reader.get(&format!("/api/v1/runs/{run_id}")).await;
        (s == 200 && v["run"]["status"] == "SUCCEEDED").then_some(v)
    })
    .await;
    // Figures: runs by status since an hour ago, and the job's stats.
    let v = reader.ok("/api/v1/runs/counts?since=1h").await;
    assert!(v["counts"]["SUCCEEDED"].as_u64().unwrap() >= 1, "{v}");
    let (s, v) = reader.get("/api/v1/runs/counts?since=yesterday").await;
    assert_eq!((s, field(&v)), (400, "since"), "{v}");
    let v = reader.ok("/api/v1/jobs/demo-job3/stats?recent=10").await;
    assert_eq!(v["job"], "default-jobGroup.demo-job3");
    assert!(v["succeeded"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["p50Ms"].is_number(), "{v}");
    assert!(v["lastRun"]["runId"].is_string(), "{v}");
    assert_eq!(detail["args"], "from the web");
    assert_eq!(detail["run"]["output"], "post ok: from the web");
    let logs = &detail["attempts"][0]["logs"];
    assert!(
        logs[0]["line"].as_str().unwrap().contains("from the web"),
        "{detail}"
    );
    let v = reader
        .ok("/api/v1/runs?job=demo-job3&status=succeeded")
        .await;
    assert!(
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["runId"] == run_id.as_str()),
        "{v}"
    );
    let v = reader.ok("/api/v1/runs?limit=1").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let (s, v) = reader.get("/api/v1/runs?status=bogus").await;
    assert_eq!((s, field(&v)), (400, "status"), "{v}");
    let (s, v) = reader.get("/api/v1/runs?cursor=garbage").await;
    assert_eq!((s, code(&v)), (400, "bad_request"), "{v}");
    assert!(message(&v).contains("malformed cursor"), "{v}");
    let (s, v) = reader.get("/api/v1/runs/no-such-run").await;
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");
    let (s, v) = writer
        .send("POST", &format!("/api/v1/runs/{run_id}/cancel"), None)
        .await;
    assert_eq!((s, code(&v)), (400, "bad_request"), "{v}");
    assert!(message(&v).contains("already ended"), "{v}");
    // A finished run's event stream: its summary, then the end.
    let events = sse_until_end(&reader, &format!("/api/v1/runs/{run_id}/events")).await;
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds, ["run", "end"]);

    // --- Live events of a running run: the run waits at the gate until the stream is open.
    let (s, v) = writer
        .send("POST", "/api/v1/jobs/t.gated/trigger", None)
        .await;
    assert_eq!(s, 200, "{v}");
    let gated_run = v["runId"].as_str().unwrap().to_string();
    eventually(DEADLINE, "the gated run to be recorded running", || async {
        let (s, v) = reader.get(&format!("/api/v1/runs/{gated_run}")).await;
        (s == 200 && v["run"]["status"] == "RUNNING").then_some(())
    })
    .await;
    let (opened_tx, opened) = tokio::sync::oneshot::channel();
    let stream = tokio::spawn({
        let reader = reader.clone();
        let path = format!("/api/v1/runs/{gated_run}/events");
        async move { sse_until_end_signalling(&reader, &path, Some(opened_tx)).await }
    });
    // Released only once the stream is open on a run still running.
    opened.await.unwrap();
    gate.add_permits(1);
    let events = stream.await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"run"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"end"), "{kinds:?}");
    assert!(
        kinds.contains(&"started") && kinds.contains(&"finished"),
        "{kinds:?}"
    );
    let lines: Vec<&str> = events
        .iter()
        .filter(|(e, _)| e == "log")
        .map(|(_, d)| d.as_str())
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("through the gate")),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| !l.contains("user:pw")), "{lines:?}");

    // Cancel a run that is still running.
    let (_, v) = writer
        .send("POST", "/api/v1/jobs/t.gated/trigger", None)
        .await;
    let cancel_run = v["runId"].as_str().unwrap().to_string();
    eventually(DEADLINE, "the second gated run to be recorded", || async {
        let (s, _) = reader.get(&format!("/api/v1/runs/{cancel_run}")).await;
        (s == 200).then_some(())
    })
    .await;
    let (s, v) = writer
        .send("POST", &format!("/api/v1/runs/{cancel_run}/cancel"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["runId"], cancel_run.as_str());

    // --- Workers, cluster, dead letters.
    let v = reader.ok("/api/v1/workers").await;
    let instances: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["instance"].as_str().unwrap())
        .collect();
    assert!(
        instances.contains(&"demo-1") && instances.contains(&"gate-1"),
        "{v}"
    );
    let v = reader.ok("/api/v1/workers?app=gated").await;
    let of_gated: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["instance"].as_str().unwrap())
        .collect();
    assert_eq!(of_gated, ["gate-1"], "{v}");
    let v = reader.ok("/api/v1/cluster").await;
    assert!(v["cluster"]["leader"]["node"].is_string(), "{v}");
    assert_eq!(v["cluster"]["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(v["node"]["node"], "n1");
    assert_eq!(v["node"]["nats"], "connected");
    assert_eq!(v["node"]["database"], "writable");
    assert!(v["node"]["recorder"]["lagEvents"].is_u64(), "{v}");
    let v = reader.ok("/api/v1/dlq").await;
    assert!(v["items"].is_array());

    // --- Cron preview: times in the zone, or the CLI's own error naming the field.
    let v = reader
        .ok("/api/v1/cron/preview?expr=0%200%209%20*%20*%20%3F&tz=Europe/Berlin&count=3")
        .await;
    assert_eq!(v["next"].as_array().unwrap().len(), 3);
    assert!(
        v["local"][0].as_str().unwrap().ends_with("09:00:00 CET")
            || v["local"][0].as_str().unwrap().ends_with("09:00:00 CEST"),
        "{v}"
    );
    let (s, v) = reader
        .get("/api/v1/cron/preview?expr=0%2061%20*%20*%20*%20%3F")
        .await;
    assert_eq!((s, field(&v)), (400, "expr"), "{v}");
    let (code_cli, _, err) = env.cli(&["cron", "next", "0 61 * * * ?"]);
    assert_ne!(code_cli, 0);
    assert!(err.contains(message(&v)), "CLI said {err:?}, API said {v}");
    let (s, v) = reader
        .get("/api/v1/cron/preview?expr=*%20*%20*%20*%20*&tz=Mars/Olympus")
        .await;
    assert_eq!((s, field(&v)), (400, "tz"), "{v}");
    let (s, v) = reader
        .get("/api/v1/cron/preview?expr=*%20*%20*%20*%20*&count=0")
        .await;
    assert_eq!((s, field(&v)), (400, "count"), "{v}");
    let (s, v) = reader.get("/api/v1/cron/preview").await;
    assert_eq!((s, field(&v)), (400, "expr"), "{v}");

    // --- Delete.
    let (s, v) = writer.send("DELETE", "/api/v1/jobs/t.secret", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["key"], "t.secret");
    let (s, _) = reader.get("/api/v1/jobs/t.secret").await;
    assert_eq!(s, 404);

    // --- Console sessions: a token exchanged for an HttpOnly SameSite=Strict cookie; writes
    // with the cookie need the session's CSRF token, writes with a bearer token do not.
    let (s, v) = nobody
        .send("POST", "/api/v1/session", Some(json!({"token": "wrong"})))
        .await;
    assert_eq!(
        (s, code(&v), field(&v)),
        (401, "unauthorized", "token"),
        "{v}"
    );
    let res = nobody
        .http
        .post(format!("{base}/api/v1/session"))
        .body(json!({"token": WRITE}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let set_cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    let session: Value = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap();
    assert_eq!(session["access"], "write");
    let csrf = session["csrf"].as_str().unwrap().to_string();
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let with_cookie = |method: reqwest::Method, path: &str, csrf: Option<&str>| {
        let mut req = nobody
            .http
            .request(method, format!("{base}{path}"))
            .header("cookie", &cookie);
        if let Some(c) = csrf {
            req = req.header("x-krest-csrf", c);
        }
        req.send()
    };
    let res = with_cookie(reqwest::Method::GET, "/api/v1/session", None)
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let res = with_cookie(reqwest::Method::GET, "/api/v1/jobs", None)
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let res = with_cookie(reqwest::Method::POST, "/api/v1/jobs/demo-job2/pause", None)
        .await
        .unwrap();
    assert_eq!(
        res.status().as_u16(),
        403,
        "a cookie write without CSRF token"
    );
    let res = with_cookie(
        reqwest::Method::POST,
        "/api/v1/jobs/demo-job2/pause",
        Some("forged"),
    )
    .await
    .unwrap();
    assert_eq!(
        res.status().as_u16(),
        403,
        "a cookie write with a wrong CSRF token"
    );
    let res = with_cookie(
        reqwest::Method::POST,
        "/api/v1/jobs/demo-job2/pause",
        Some(&csrf),
    )
    .await
    .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let res = with_cookie(reqwest::Method::DELETE, "/api/v1/session", None)
        .await
        .unwrap();
    assert!(res.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let res = with_cookie(reqwest::Method::GET, "/api/v1/jobs", None)
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401, "the session ended");
    // A read-only token's session cannot write.
    let (s, v) = nobody
        .send("POST", "/api/v1/session", Some(json!({"token": READ})))
        .await;
    assert_eq!((s, v["access"].as_str()), (200, Some("read")), "{v}");
    // The console's page and files, with a restrictive Content-Security-Policy.
    let res = nobody.http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert!(res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    assert!(res.text().await.unwrap().contains("/console.js"));
    for asset in ["/console.js", "/console.css"] {
        let res = nobody
            .http
            .get(format!("{base}{asset}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 200, "{asset}");
    }

    gate.add_permits(100);
    demo.stop().await.unwrap();
    gated.stop().await.unwrap();
}

/// The revision routes use the job's own numbers: a new job is at 1, a change and a
/// deletion take the next, a job created again continues; a diff may span the deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_and_diffs_use_per_job_numbers() {
    let env = Env::new("web-revisions");
    let (node, base) = web_node(&env, "n1", access()).await;
    let writer = Web::new(&base, Some(WRITE));
    let doc = job("r", "app", "p", json!({"cron": "0 0 3 * * ?"}));
    let other = job("other", "app", "p", json!({"cron": "0 0 3 * * ?"}));
    for d in [&doc, &other] {
        let (s, v) = writer.send("POST", "/api/v1/jobs", Some(d.clone())).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            (
                v["results"][0]["outcome"].as_str(),
                v["results"][0]["revision"].as_u64()
            ),
            (Some("CREATED"), Some(1)),
            "{v}"
        );
    }
    let mut changed = doc.clone();
    changed["cron"] = json!("0 0 4 * * ?");
    let (s, v) = writer.send("PUT", "/api/v1/jobs/t.r", Some(changed)).await;
    assert_eq!((s, v["revision"].as_u64()), (200, Some(2)), "{v}");
    let (s, v) = writer
        .send("DELETE", "/api/v1/jobs/t.r?requestId=del-1", None)
        .await;
    assert_eq!((s, v["revision"].as_u64()), (200, Some(3)), "{v}");
    let (s, v) = writer.send("PUT", "/api/v1/jobs/t.r", Some(doc)).await;
    assert_eq!(
        (s, v["outcome"].as_str(), v["revision"].as_u64()),
        (200, Some("CREATED"), Some(4)),
        "{v}"
    );
    // The deletion resent with its request id answers with it and deletes nothing.
    let (s, v) = writer
        .send("DELETE", "/api/v1/jobs/t.r?requestId=del-1", None)
        .await;
    assert_eq!((s, v["revision"].as_u64()), (200, Some(3)), "{v}");

    let v = writer.ok("/api/v1/jobs/t.r/revisions").await;
    let listed: Vec<(u64, &str)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["revision"].as_u64().unwrap(),
                r["operation"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed, [(4, "PUT"), (3, "DELETE"), (2, "PUT"), (1, "PUT")]);
    // Paged by number: the cursor is a revision number.
    let v = writer.ok("/api/v1/jobs/t.r/revisions?limit=2").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "{v}");
    let next = v["next"].as_str().unwrap().to_string();
    let v = writer
        .ok(&format!("/api/v1/jobs/t.r/revisions?limit=2&cursor={next}"))
        .await;
    let rest: Vec<u64> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(rest, [2, 1], "{v}");
    assert_eq!(
        writer.ok("/api/v1/jobs/t.r").await["revision"].as_u64(),
        Some(4)
    );
    assert_eq!(
        writer.ok("/api/v1/jobs/t.r/revisions/2").await["spec"]["cron"],
        "0 0 4 * * ?"
    );
    let (s, v) = writer.get("/api/v1/jobs/t.r/revisions/3").await;
    assert_eq!(
        (s, code(&v)),
        (404, "not_found"),
        "a deletion has no definition: {v}"
    );
    let v = writer.ok("/api/v1/jobs/t.r/diff?from=2").await;
    assert_eq!((v["from"].as_u64(), v["to"].as_u64()), (Some(2), Some(4)));
    assert_eq!(
        v["changes"],
        json!([{"path": "/cron", "before": "0 0 4 * * ?", "after": "0 0 3 * * ?"}])
    );
    let v = writer.ok("/api/v1/jobs/t.r/diff?from=1&to=4").await;
    assert_eq!(v["changes"], json!([]), "{v}");
    assert_eq!(
        writer.ok("/api/v1/jobs/t.other").await["revision"].as_u64(),
        Some(1)
    );
    node.stop().await.unwrap();
}

/// Run listings and run details over HTTP say when the node's database is behind the events
/// stream (`catchingUp`, as the NATS API's `runs.list`/`runs.get`), and stop saying it once the
/// node is current. The database is held behind by another connection holding SQLite's write
/// lock, as in the NATS API's test (`a_node_started_late_says_it_is_catching_up_…`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_run_answers_say_when_the_node_is_catching_up() {
    let env = Env::new("web-catching-up");
    let (_node, base) = web_node(&env, "b", access()).await;
    let web = Web::new(&base, Some(WRITE));
    let client = env.client().await;
    // No worker: the runs stay pending, which is all the listing needs.
    apply(
        &client,
        vec![job("idle", "nobody-serves-this", "idle", json!({}))],
    )
    .await;
    let trigger = || async {
        let (s, v) = web.send("POST", "/api/v1/jobs/t.idle/trigger", None).await;
        assert_eq!(s, 200, "{v}");
        v["runId"].as_str().unwrap().to_string()
    };
    let first = trigger().await;
    let detail = eventually(DEADLINE, "the first run to be recorded", || async {
        let (s, v) = web.get(&format!("/api/v1/runs/{first}")).await;
        (s == 200).then_some(v)
    })
    .await;
    assert!(detail.get("catchingUp").is_none(), "{detail}");
    let list = web.ok("/api/v1/runs?job=t.idle").await;
    assert!(list.get("catchingUp").is_none(), "{list}");

    // Another connection holds the write lock: events keep coming, the node records none.
    let mut lock = sqlx_lock(&env.dir.join("b.db")).await;
    let second = trigger().await;
    let list = eventually(
        DEADLINE,
        "the run listing to say b is catching up",
        || async {
            let v = web.ok("/api/v1/runs?job=t.idle").await;
            v.get("catchingUp").is_some().then_some(v)
        },
    )
    .await;
    let c = &list["catchingUp"];
    assert_eq!(c["node"], "b", "{list}");
    assert!(c["lagEvents"].as_u64().unwrap() >= 1, "{list}");
    assert!(c["lagMs"].as_u64().unwrap() >= 1000, "{list}");
    assert!(
        c["streamSeq"].as_u64().unwrap() > c["recordedSeq"].as_u64().unwrap(),
        "{list}"
    );
    // The page is still a page: what b has recorded.
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["runId"].as_str())
        .collect();
    assert!(ids.contains(&first.as_str()), "{list}");
    let detail = web.ok(&format!("/api/v1/runs/{first}")).await;
    assert_eq!(detail["catchingUp"]["node"], "b", "{detail}");
    assert_eq!(detail["run"]["runId"], first.as_str(), "{detail}");

    // The lock released, b records the backlog and says nothing more.
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    drop(lock);
    let list = eventually(DEADLINE, "b to be current", || async {
        let v = web.ok("/api/v1/runs?job=t.idle").await;
        v.get("catchingUp").is_none().then_some(v)
    })
    .await;
    let recorded = eventually(DEADLINE, "the second run to be recorded", || async {
        let (s, v) = web.get(&format!("/api/v1/runs/{second}")).await;
        (s == 200).then_some(v)
    })
    .await;
    assert!(recorded.get("catchingUp").is_none(), "{recorded}");
    assert!(list["items"].is_array(), "{list}");
}
