//! Job management through the API: validation errors that name the problem (and apply
//! nothing), revisions, pause/resume, delete, name resolution.

use krest::cli::client::ClientError;
use krest_schemas::api::{
    ApiReply, ApplyOutcome, ErrorCode, JobListRequest, JobRequest, JobView, Op, RunDetail,
    RunGetRequest, RunSummary,
};
use krest_test_support::eventually;
use serde_json::json;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_documents_are_rejected_with_every_problem_named_and_nothing_applied() {
    let env = Env::new("invalid");
    let node = env.node("n1");
    let client = env.client().await;
    let mut seed = seed_documents();
    let good = seed.remove(0);
    let err = client
        .call_value(
            Op::JobApply,
            &json!({"documents": [
                good,
                {"appName": "a", "jobName": "typo", "path": "p", "crn": "* * * * * ?"},
                {"appName": "a", "jobName": "badcron", "path": "p", "cron": "0/5 * * * ?x"},
                {"appName": "a b", "jobName": "j.k", "path": "p", "retryTimes": 50},
                {"appName": "a", "jobName": "shard", "path": "p", "jobType": "SHARDING", "args": "nope"},
                {"appName": "a", "jobName": "tz", "path": "p", "cron": "@hourly", "timeZone": "Mars/Base"},
                "not an object"
            ]}),
        )
        .await
        .unwrap_err();
    let ClientError::Api(api) = err else {
        panic!("expected an API error, got {err:?}")
    };
    assert_eq!(api.code, ErrorCode::InvalidJob);
    assert_eq!(
        api.message,
        "6 of 7 definitions are invalid; nothing was applied"
    );
    let problems: Vec<(usize, Vec<String>)> = api
        .invalid
        .iter()
        .map(|d| {
            (
                d.index,
                d.problems.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    assert_eq!(problems[0].0, 1);
    assert!(
        problems[0].1[0].contains("unknown field `crn`"),
        "{problems:?}"
    );
    assert!(
        problems[1].1[0].starts_with("cron: invalid cron expression `0/5 * * * ?x`"),
        "{problems:?}"
    );
    assert_eq!(problems[2].1.len(), 3, "{problems:?}");
    assert!(problems[2].1[0].starts_with("appName: `a b` is not a valid name"));
    assert!(problems[2].1[1].starts_with("jobName: `j.k` is not a valid name"));
    assert!(problems[2].1[2].starts_with("retryTimes: 50 is out of range"));
    assert!(
        problems[3].1[0].starts_with("args: a SHARDING job needs a JSON array"),
        "{problems:?}"
    );
    assert!(
        problems[4].1[0].starts_with("timeZone: unknown time zone `Mars/Base`"),
        "{problems:?}"
    );
    assert_eq!(
        problems[5].1[0],
        "a job definition must be a JSON object, found a string"
    );

    let jobs: Vec<JobView> = client
        .call(Op::JobList, &JobListRequest::default())
        .await
        .unwrap();
    assert!(jobs.is_empty(), "nothing applied: {jobs:?}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_idempotent_and_revisions_count_changes() {
    let env = Env::new("revisions");
    let node = env.node("n1");
    let client = env.client().await;
    let doc = job("j", "app", "p", json!({"cron": "0 0 * * * ?"}));
    assert_eq!(
        apply(&client, vec![doc.clone()]).await.results[0].outcome,
        ApplyOutcome::Created
    );
    let again = apply(&client, vec![doc.clone()]).await.results[0].clone();
    assert_eq!(again.outcome, ApplyOutcome::Unchanged);
    let mut changed = doc.clone();
    changed["cron"] = json!("0 30 * * * ?");
    let updated = apply(&client, vec![changed]).await.results[0].clone();
    assert_eq!(updated.outcome, ApplyOutcome::Updated);
    assert_eq!((again.revision, updated.revision), (1, 2));

    // Pause and resume are revisions too; get shows the state.
    let paused: JobView = client
        .call(Op::JobPause, &JobRequest::new("j"))
        .await
        .unwrap();
    assert!(!paused.spec.running);
    assert!(paused.next_fire_at.is_none());
    let view: JobView = client
        .call(Op::JobGet, &JobRequest::new("t.j"))
        .await
        .unwrap();
    assert_eq!((view.revision, paused.revision), (3, 3));
    let resumed: JobView = client
        .call(Op::JobResume, &JobRequest::new("t/j"))
        .await
        .unwrap();
    assert!(resumed.spec.running && resumed.next_fire_at.is_some());
    assert_eq!(resumed.created_at, paused.created_at);

    // Same name in two groups: a bare name is ambiguous.
    let mut other = doc;
    other["jobGroup"] = json!("u");
    apply(&client, vec![other]).await;
    let err = client
        .call::<_, JobView>(Op::JobGet, &JobRequest::new("j"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api(e) if e.code == ErrorCode::Ambiguous),
        "{err:?}"
    );

    let deleted: JobView = client
        .call(Op::JobDelete, &JobRequest::delete("u.j"))
        .await
        .unwrap();
    assert_eq!((deleted.key.as_str(), deleted.revision), ("u.j", 2));
    // The history keeps every revision, newest first; earlier ones can be read back.
    let history: Vec<krest_schemas::api::JobRevision> = client
        .call(Op::JobHistory, &JobRequest::new("t.j"))
        .await
        .unwrap();
    let crons: Vec<(String, Option<String>)> = history
        .iter()
        .map(|r| {
            (
                r.operation.clone(),
                r.spec
                    .as_ref()
                    .and_then(|s| s.cron.as_deref().map(str::to_string)),
            )
        })
        .collect();
    assert_eq!(
        crons,
        [
            ("PUT".to_string(), Some("0 30 * * * ?".to_string())),
            ("PUT".to_string(), Some("0 30 * * * ?".to_string())),
            ("PUT".to_string(), Some("0 30 * * * ?".to_string())),
            ("PUT".to_string(), Some("0 0 * * * ?".to_string())),
        ]
    );
    let first: JobView = client
        .call(
            Op::JobGet,
            &JobRequest {
                job: "t.j".into(),
                revision: Some(history[3].revision),
                request_id: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(first.spec.cron.as_deref(), Some("0 0 * * * ?"));
    assert_eq!(first.revision, history[3].revision);
    assert_eq!(
        history.iter().map(|r| r.revision).collect::<Vec<_>>(),
        [4, 3, 2, 1]
    );
    let deleted_history: Vec<krest_schemas::api::JobRevision> = client
        .call(Op::JobHistory, &JobRequest::new("u.j"))
        .await
        .unwrap();
    assert_eq!(
        (
            deleted_history[0].operation.as_str(),
            deleted_history[0].revision
        ),
        ("DELETE", 2)
    );
    assert_eq!(
        (
            deleted_history[1].operation.as_str(),
            deleted_history[1].revision
        ),
        ("PUT", 1)
    );
    // Reads see the API's own writes at once.
    let r = client
        .call::<_, JobView>(Op::JobGet, &JobRequest::new("u.j"))
        .await;
    assert!(
        matches!(&r, Err(ClientError::Api(e)) if e.code == ErrorCode::NotFound),
        "{r:?}"
    );
    node.stop().await.unwrap();
}

/// Sends `body` as-is (bytes the `Client` would never produce) to `krest.api.<op>`.
async fn raw(client: &krest::cli::client::Client, op: Op, body: &[u8]) -> ApiReply {
    let reply = client
        .nats()
        .request(op.subject(), body.to_vec().into())
        .await
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_documents_get_short_errors_and_bom_and_duplicate_keys_are_handled() {
    let env = Env::new("hostile");
    let node = env.node("n1");
    let client = env.client().await;

    // Limits: a 900 KB description is refused, naming the field and the limit.
    let huge = job(
        "big",
        "app",
        "p",
        json!({"description": "d".repeat(900 * 1024)}),
    );
    let err = client
        .call_value(Op::JobApply, &json!({"documents": [huge]}))
        .await
        .unwrap_err();
    let ClientError::Api(api) = err else {
        panic!("{err:?}")
    };
    assert_eq!(
        api.invalid[0].problems[0].to_string(),
        "description: is 921600 bytes; the limit is 4096"
    );

    // Echoes: a 100 KB name comes back shortened, not twice in full.
    let name = "n".repeat(100 * 1024);
    let err = client
        .call_value(
            Op::JobApply,
            &json!({"documents": [{"appName": "app", "jobName": name, "path": "p"}]}),
        )
        .await
        .unwrap_err();
    let ClientError::Api(api) = err else {
        panic!("{err:?}")
    };
    let reply = serde_json::to_string(&api).unwrap();
    assert!(reply.len() < 1000, "{} bytes: {reply}", reply.len());
    assert!(reply.contains("…(102400 bytes)"), "{reply}");
    for name in [name.as_str(), "x.y"] {
        let err = client
            .call::<_, JobView>(Op::JobGet, &JobRequest::new(name))
            .await
            .unwrap_err();
        assert!(err.to_string().len() < 300, "{err}");
    }
    let reply = raw(&client, Op::JobGet, b"{\"job\": 1}").await;
    assert_eq!(reply.error.unwrap().code, ErrorCode::BadRequest);

    // A UTF-8 BOM in front of a request is skipped.
    let doc =
        br#"{"documents": [{"appName": "app", "jobGroup": "t", "jobName": "bom", "path": "p"}]}"#;
    let reply = raw(
        &client,
        Op::JobApply,
        &[b"\xEF\xBB\xBF".as_slice(), doc].concat(),
    )
    .await;
    assert!(reply.ok, "{reply:?}");

    // Duplicate keys, at any depth, are refused naming the key and where it is.
    let dup = b"{\"documents\": [{\"appName\": \"app\", \"jobName\": \"dup\", \"path\": \"p\",\n \"running\": true, \"running\": false}]}";
    let reply = raw(&client, Op::JobApply, dup).await;
    let error = reply.error.unwrap();
    assert_eq!(error.code, ErrorCode::BadRequest);
    assert_eq!(
        error.message,
        "malformed request: duplicate key `running` at line 2 column 27"
    );
    let nested = br#"{"documents": [{"appName": "app", "jobName": "dup", "path": "p", "args": {"a": 1, "a": 2}}]}"#;
    let reply = raw(&client, Op::JobApply, nested).await;
    assert!(
        reply.error.unwrap().message.contains("duplicate key `a`"),
        "nested"
    );
    let jobs: Vec<JobView> = client
        .call(Op::JobList, &JobListRequest::default())
        .await
        .unwrap();
    let keys: Vec<&str> = jobs.iter().map(|j| j.key.as_str()).collect();
    assert_eq!(keys, ["t.bom"]);
    node.stop().await.unwrap();
}

/// Job documents of about `size` bytes each: `n` jobs `j000`… in groups `g1` (the first half)
/// and `g2`, apps `app-a` (even) and `app-b` (odd).
fn sized_jobs(n: usize, size: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let mut d = job(
                &format!("j{i:03}"),
                if i % 2 == 0 { "app-a" } else { "app-b" },
                "p",
                json!({"args": "x".repeat(size)}),
            );
            d["jobGroup"] = json!(if i < n / 2 { "g1" } else { "g2" });
            d
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_list_and_history_come_in_pages_that_fit_max_payload() {
    let env = Env::with_max_payload("list-pages", SMALL_PAYLOAD);
    let node = env.node("n1");
    let client = env.client().await;
    // 300 jobs of about 1 KiB: their views are several times max_payload.
    let file = env.write(
        "jobs.json",
        &serde_json::to_string(&sized_jobs(300, 1000)).unwrap(),
    );
    let (code, _, err) = env.cli(&["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");

    // Pages bounded by bytes: every job once, in key order.
    let pages: Vec<Vec<JobView>> = all_pages(&client, Op::JobList, |cursor| JobListRequest {
        cursor,
        ..Default::default()
    })
    .await;
    assert!(pages.len() >= 5, "{} pages", pages.len());
    let keys: Vec<String> = pages.concat().into_iter().map(|j| j.key).collect();
    let mut expected: Vec<String> = (0..300)
        .map(|i| format!("{}.j{i:03}", if i < 150 { "g1" } else { "g2" }))
        .collect();
    expected.sort();
    assert_eq!(keys, expected);
    // Bounded by count.
    let pages: Vec<Vec<JobView>> = all_pages(&client, Op::JobList, |cursor| JobListRequest {
        limit: Some(7),
        cursor,
        ..Default::default()
    })
    .await;
    assert_eq!(pages.len(), 43);
    assert_eq!(pages.concat().len(), 300);
    // Filters page too.
    let count = |group: Option<&'static str>, app: Option<&'static str>| {
        let req = move |cursor| JobListRequest {
            group: group.map(str::to_string),
            app: app.map(str::to_string),
            limit: Some(40),
            cursor,
            ..Default::default()
        };
        let client = client.clone();
        async move {
            all_pages::<_, JobView>(&client, Op::JobList, req)
                .await
                .concat()
                .len()
        }
    };
    assert_eq!(count(Some("g2"), None).await, 150);
    assert_eq!(count(None, Some("app-a")).await, 150);
    assert_eq!(count(Some("g1"), Some("app-b")).await, 75);

    // The CLI follows the pages.
    let (code, out, err) = env.cli(&["job", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 301, "header and 300 jobs");
    let (code, out, err) = env.cli(&["-o", "json", "job", "list", "--group", "g2"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<JobView> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 150);

    // 20 revisions of 8 KiB: the history is larger than max_payload.
    for r in 0..20 {
        let doc = job(
            "h",
            "app-a",
            "p",
            json!({"args": format!("{r:02}-{}", "y".repeat(8000))}),
        );
        apply(&client, vec![doc]).await;
    }
    let pages: Vec<Vec<krest_schemas::api::JobRevision>> =
        all_pages(&client, Op::JobHistory, |cursor| {
            krest_schemas::api::JobHistoryRequest {
                job: "t.h".into(),
                limit: None,
                cursor,
            }
        })
        .await;
    assert!(pages.len() >= 3, "{} pages", pages.len());
    let args: Vec<String> = pages
        .concat()
        .iter()
        .map(|r| r.spec.as_ref().unwrap().args.to_value().as_str().unwrap()[..2].to_string())
        .collect();
    let expected: Vec<String> = (0..20).rev().map(|r| format!("{r:02}")).collect();
    assert_eq!(args, expected, "newest first, each once");
    let (code, out, err) = env.cli(&["job", "history", "h"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains(" PUT ")).count(),
        20,
        "{out}"
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_too_large_for_any_reply_is_a_clear_error() {
    let env = Env::with_max_payload("too-large", SMALL_PAYLOAD);
    let node = env.node("n1");
    let client = env.client().await;
    // A definition written to the bucket directly (`job apply` refuses it): it fits in a
    // stored message but its view does not fit in a reply.
    let nats = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let mut pad = 64_000;
    let stored = loop {
        let spec =
            krest_schemas::parse_job(&job("big", "a", "p", json!({"args": "z".repeat(pad)})))
                .unwrap();
        let stored = serde_json::to_vec(&krest_schemas::StoredJob {
            spec,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            version: 1,
        })
        .unwrap();
        if stored.len() >= SMALL_PAYLOAD - 600 {
            break stored;
        }
        pad += 100;
    };
    js.publish("$KV.krest-jobs.t.big", stored.into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(DEADLINE, "the job in the table", || async {
        client
            .call::<_, JobView>(Op::JobGet, &JobRequest::new("t.big"))
            .await
            .ok()
    })
    .await;

    let err = client
        .call::<_, Vec<JobView>>(Op::JobList, &JobListRequest::default())
        .await
        .unwrap_err();
    let ClientError::Api(api) = err else {
        panic!("expected an API error, got {err:?}")
    };
    assert_eq!(api.code, ErrorCode::TooLarge);
    assert!(api.message.starts_with("job t.big is 6"), "{}", api.message);
    assert!(
        api.message.contains("raise max_payload in the nats-server configuration, or delete the job (`krest job delete t.big`)"),
        "{}",
        api.message
    );
    let (code, _, err) = env.cli(&["job", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("error: job t.big is "), "{err}");
    assert!(!err.contains("no answer"), "{err}");
    // `job apply` of the same definition names the problem instead.
    let doc = job("big2", "a", "p", json!({"args": "z".repeat(pad)}));
    let file = env.write("big.json", &doc.to_string());
    let (code, _, err) = env.cli(&["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("document 0 (t.big2)"), "{err}");
    assert!(err.contains("the definition is "), "{err}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_list_and_runs_get_come_in_pages_with_every_log_line() {
    runs_in_pages(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_list_and_runs_get_come_in_pages_with_every_log_line_from_postgres() {
    runs_in_pages(Db::Postgres).await;
}

async fn runs_in_pages(db: Db) {
    let env = Env::with_max_payload("run-pages", SMALL_PAYLOAD).on(db);
    let node = env.node("n1");
    let client = env.client().await;
    // One run logs 100 lines of 4 KiB (~400 KiB); the others answer 6 KiB of output.
    let w = env
        .worker("runs-app", "w1")
        .handler("chatty", |ctx: krest_worker::JobContext| async move {
            if ctx.args() == &json!("chatty") {
                for i in 1..=100 {
                    ctx.log(format!("line {i:03} {}", "z".repeat(4000)));
                }
            }
            Ok("o".repeat(6000))
        })
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![job(
            "chatty",
            "runs-app",
            "chatty",
            json!({"args": "chatty"}),
        )],
    )
    .await;
    let chatty = trigger(&client, "chatty").await.run_id;
    wait_final(&client, &chatty).await;
    apply(
        &client,
        vec![job(
            "chatty",
            "runs-app",
            "chatty",
            json!({"args": "quiet"}),
        )],
    )
    .await;
    let mut ids = vec![chatty.clone()];
    for _ in 0..11 {
        let id = trigger(&client, "chatty").await.run_id;
        wait_final(&client, &id).await;
        ids.push(id);
    }

    // runs.list: 12 runs of 6 KiB output are more than one reply; pages lose none.
    let pages: Vec<Vec<RunSummary>> = all_pages(&client, Op::RunsList, |cursor| {
        krest_schemas::api::RunsListRequest {
            job: Some("chatty".into()),
            limit: Some(1000),
            cursor,
            ..Default::default()
        }
    })
    .await;
    assert!(pages.len() >= 2, "{} pages", pages.len());
    let mut listed: Vec<String> = pages.concat().into_iter().map(|r| r.run_id).collect();
    assert_eq!(listed.len(), 12);
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    let (code, out, err) = env.cli(&[
        "-o", "json", "runs", "list", "--job", "chatty", "--limit", "100",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Vec<RunSummary>>(&out).unwrap().len(),
        12
    );
    let (code, out, err) = env.cli(&["runs", "list", "--job", "chatty", "--limit", "5"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 6, "header and 5 runs: {out}");

    // runs.get: the first page says what it left out; the pages carry every line once.
    let (first, next): (RunDetail, Option<String>) = client
        .call_page(Op::RunsGet, &RunGetRequest::new(chatty.clone()))
        .await
        .unwrap();
    assert!(next.is_some());
    let shown = first.attempts[0].logs.len() as u64;
    assert!(shown < 100, "{shown}");
    assert_eq!(first.logs_left, 100 - shown);
    assert!(first.args.is_some());
    let mut req = RunGetRequest::new(chatty.clone());
    let mut lines = Vec::new();
    let mut pages = 0;
    loop {
        let (page, next): (RunDetail, Option<String>) =
            client.call_page(Op::RunsGet, &req).await.unwrap();
        pages += 1;
        for a in &page.attempts {
            lines.extend(a.logs.iter().map(|l| l.line.clone()));
        }
        match next {
            Some(n) => req.cursor = Some(n),
            None => break,
        }
    }
    assert!(pages >= 7, "{pages} pages");
    let expected: Vec<String> = (1..=100)
        .map(|i| format!("line {i:03} {}", "z".repeat(4000)))
        .collect();
    assert_eq!(lines, expected);
    let (code, out, err) = env.cli(&["runs", "get", &chatty]);
    assert_eq!(code, 0, "{err}");
    let printed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(" INFO  ").map(|(_, line)| line))
        .collect();
    assert_eq!(printed, expected);
    assert_eq!(
        out.matches("shard 0 of 1 attempt 1:").count(),
        1,
        "one attempt, joined"
    );
    let (code, out, err) = env.cli(&["-o", "json", "runs", "get", &chatty]);
    assert_eq!(code, 0, "{err}");
    let whole: RunDetail = serde_json::from_str(&out).unwrap();
    assert_eq!(whole.attempts.len(), 1);
    assert_eq!(whole.attempts[0].logs.len(), 100);
    assert_eq!(whole.logs_left, 0);
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_thousands_of_shards_comes_in_pages() {
    use krest_schemas::{AttemptOutcome, Dispatched, Finished, RunEvent, Started, Trigger};
    let env = Env::with_max_payload("shard-pages", SMALL_PAYLOAD);
    let node = env.node("n1");
    let client = env.client().await;
    // The events of a run of 2,000 shards, the first 10 retried once, as workers report them.
    let js = async_nats::jetstream::new(async_nats::connect(env.url()).await.unwrap());
    let key = delivery_key(&js).await;
    let run_id = "t.wide.1000".to_string();
    let now = chrono::Utc::now();
    let shards = 2000u32;
    let mut events = vec![RunEvent::Dispatched(Dispatched {
        run: krest_schemas::RunRef {
            run_id: run_id.clone(),
            job_group: "t".into(),
            job_name: "wide".into(),
            app_name: "a".into(),
        },
        path: "p".into(),
        job_type: krest_schemas::JobType::Sharding,
        trigger: Trigger::Manual,
        scheduled_at: now,
        dispatched_at: now,
        shard_total: shards,
        args: json!([]),
        misfired: 0,
        parent_run_id: None,
        revision: 1,
        node: "n1".into(),
        epoch: None,
    })];
    for shard in 0..shards {
        for attempt in 1..=(if shard < 10 { 2 } else { 1 }) {
            let ok = shard >= 10 || attempt == 2;
            events.push(RunEvent::Started(Started {
                run: krest_schemas::RunRef {
                    run_id: run_id.clone(),
                    job_group: "t".into(),
                    job_name: "wide".into(),
                    app_name: "a".into(),
                },
                shard,
                shard_total: shards,
                attempt,
                worker: "w1".into(),
                at: now,
                scheduled_at: Some(now),
                delivery_token: key.token(&run_id, shard),
            }));
            events.push(RunEvent::Finished(Finished {
                run: krest_schemas::RunRef {
                    run_id: run_id.clone(),
                    job_group: "t".into(),
                    job_name: "wide".into(),
                    app_name: "a".into(),
                },
                shard,
                shard_total: shards,
                attempt,
                worker: "w1".into(),
                at: now,
                outcome: if ok {
                    AttemptOutcome::Succeeded
                } else {
                    AttemptOutcome::Failed
                },
                will_retry: !ok,
                retry_in_ms: None,
                output: ok.then(|| format!("shard {shard} done")),
                error: (!ok).then(|| "first try fails".to_string()),
                duration_ms: 1,
                delivery_token: key.token(&run_id, shard),
                started_at: None,
                scheduled_at: None,
            }));
        }
    }
    let mut acks = Vec::new();
    for e in &events {
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(e).unwrap().into())
            .message_id(e.msg_id())
            .header(
                krest_schemas::names::SCHEDULER_TOKEN_HEADER,
                key.scheduler_token(&run_id).as_str(),
            );
        acks.push(js.send_publish(e.subject(), msg).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
    let done = eventually(DEADLINE, "the run recorded", || async {
        run(&client, &run_id)
            .await
            .filter(|d| d.run.status == krest_schemas::api::RunStatus::Succeeded)
    })
    .await;
    assert_eq!(done.run.shards_succeeded, shards);
    assert!(done.attempts_left > 0);

    let mut req = RunGetRequest::new(run_id.clone());
    let mut attempts = Vec::new();
    let mut pages = 0;
    loop {
        let (page, next): (RunDetail, Option<String>) =
            client.call_page(Op::RunsGet, &req).await.unwrap();
        pages += 1;
        if next.is_some() {
            assert_eq!(
                page.attempts_left as usize,
                2010 - attempts.len() - page.attempts.len()
            );
        }
        attempts.extend(
            page.attempts
                .into_iter()
                .map(|a| (a.shard, a.attempt, a.status)),
        );
        match next {
            Some(n) => req.cursor = Some(n),
            None => break,
        }
    }
    assert!(pages >= 5, "{pages} pages");
    let expected: Vec<(u32, u32)> = (0..shards)
        .flat_map(|s| (1..=(if s < 10 { 2 } else { 1 })).map(move |a| (s, a)))
        .collect();
    assert_eq!(
        attempts
            .iter()
            .map(|(s, a, _)| (*s, *a))
            .collect::<Vec<_>>(),
        expected
    );
    let (code, out, err) = env.cli(&["runs", "get", &run_id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches(" attempt 1: SUCCEEDED").count(), 1990);
    assert_eq!(out.matches(" attempt 2: SUCCEEDED").count(), 10);
    assert_eq!(out.matches(" attempt 1: FAILED, will retry").count(), 10);
    assert!(
        out.contains("shard 1999 of 2000 attempt 1: SUCCEEDED"),
        "{}",
        &out[out.len() - 500..]
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_dead_letters_come_in_pages() {
    use krest_schemas::api::{DeadLetter, DlqListRequest, WorkersListRequest};
    use krest_schemas::names::{DLQ_REASON_HEADER, DLQ_SOURCE_HEADER};
    let env = Env::with_max_payload("more-pages", SMALL_PAYLOAD);
    let node = env.node("n1");
    let client = env.client().await;
    let js = async_nats::jetstream::new(async_nats::connect(env.url()).await.unwrap());

    // 40 parked messages of 4 KiB: more than one reply.
    for i in 0..40 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(DLQ_REASON_HEADER, format!("reason {i}").as_str());
        headers.insert(DLQ_SOURCE_HEADER, "krest.work.a.q");
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(format!("{i:02}{}", "p".repeat(4094)).into())
            .headers(headers)
            .message_id(format!("work/{i}"));
        js.send_publish("krest.dlq.work", msg)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let pages: Vec<Vec<DeadLetter>> = all_pages(&client, Op::DlqList, |cursor| DlqListRequest {
        limit: Some(1000),
        cursor,
    })
    .await;
    assert!(pages.len() >= 3, "{} pages", pages.len());
    let reasons: Vec<String> = pages.concat().into_iter().map(|d| d.reason).collect();
    let expected: Vec<String> = (0..40).rev().map(|i| format!("reason {i}")).collect();
    assert_eq!(reasons, expected, "newest first, each once");
    let pages: Vec<Vec<DeadLetter>> = all_pages(&client, Op::DlqList, |cursor| DlqListRequest {
        limit: Some(6),
        cursor,
    })
    .await;
    assert_eq!(pages.len(), 7);
    let (code, out, err) = env.cli(&["-o", "json", "dlq", "list", "--limit", "1000"]);
    assert_eq!(code, 0, "{err}");
    let letters: Vec<DeadLetter> = serde_json::from_str(&out).unwrap();
    assert_eq!(letters.len(), 40);
    assert!(letters.iter().all(|d| d.payload.len() == 4096));
    let (code, out, err) = env.cli(&["dlq", "list", "--limit", "25"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 26, "header and 25: {out}");

    // 150 worker instances with long handler lists (~2.5 KiB each), registered as workers do.
    let now = chrono::Utc::now();
    let handlers: Vec<String> = (0..40)
        .map(|h| format!("service/handler-{h:02}-{}", "h".repeat(40)))
        .collect();
    for i in 0..150 {
        let info = krest_schemas::WorkerInfo {
            app_name: if i % 3 == 0 {
                "app-b".into()
            } else {
                "app-a".into()
            },
            instance: format!("inst-{i:03}"),
            handlers: handlers.clone(),
            weight: 1,
            slots: 1,
            in_flight: 0,
            version: "1".into(),
            sdk: "test".into(),
            host: "h".into(),
            started_at: now,
            heartbeat_at: now,
            capabilities: Vec::new(),
        };
        let key = format!("{}.{}", info.app_name, info.instance);
        js.publish(
            format!("$KV.krest-workers.{key}"),
            serde_json::to_vec(&info).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // Heartbeats expire after 10 s: list while they are fresh.
    let pages: Vec<Vec<krest_schemas::WorkerInfo>> =
        all_pages(&client, Op::WorkersList, |cursor| WorkersListRequest {
            app: None,
            limit: None,
            cursor,
        })
        .await;
    assert!(pages.len() >= 5, "{} pages", pages.len());
    let listed: Vec<(String, String)> = pages
        .concat()
        .into_iter()
        .map(|w| (w.app_name, w.instance))
        .collect();
    let mut expected: Vec<(String, String)> = (0..150)
        .map(|i| {
            (
                if i % 3 == 0 { "app-b" } else { "app-a" }.to_string(),
                format!("inst-{i:03}"),
            )
        })
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    let (code, out, err) = env.cli(&["workers", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 151, "header and 150 instances");
    // One app's instances only, in pages of 7 (cursors inside and past the other app's).
    let pages: Vec<Vec<krest_schemas::WorkerInfo>> =
        all_pages(&client, Op::WorkersList, |cursor| WorkersListRequest {
            app: Some("app-b".into()),
            limit: Some(7),
            cursor,
        })
        .await;
    assert_eq!(pages.len(), 8, "50 instances in pages of 7");
    let listed: Vec<(String, String)> = pages
        .concat()
        .into_iter()
        .map(|w| (w.app_name, w.instance))
        .collect();
    let app_b: Vec<(String, String)> = expected
        .iter()
        .filter(|(app, _)| app == "app-b")
        .cloned()
        .collect();
    assert_eq!(listed, app_b);
    let (code, out, err) = env.cli(&["workers", "list", "--app", "app-b"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 51, "header and app-b's 50: {out}");
    assert!(!out.contains("app-a"), "{out}");
    let (code, out, err) = env.cli(&["-o", "json", "workers", "list", "--app", "app-a"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<krest_schemas::WorkerInfo> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 100);
    assert!(listed.iter().all(|w| w.app_name == "app-a"));
    let (code, out, err) = env.cli(&["workers", "list", "--app", "nobody"]);
    assert_eq!(
        (code, out.lines().count()),
        (0, 1),
        "the header only: {out}"
    );
    assert!(err.contains("no worker of app nobody is running"), "{err}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_runs_of_each_job() {
    retention_keeps_newest(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_runs_of_each_job_in_postgres() {
    retention_keeps_newest(Db::Postgres).await;
}

async fn retention_keeps_newest(db: Db) {
    let env = Env::new("retention").on(db);
    let mut opts = env.node_opts("n1");
    opts.retention.keep_runs = Some(2);
    opts.retention.every = std::time::Duration::from_millis(200);
    opts.retention.batch = 1;
    let node = krest::node::spawn(opts);
    let client = env.client().await;
    let w = env
        .worker("ret-app", "w1")
        .handler("ok", |ctx: krest_worker::JobContext| async move {
            ctx.log("a line");
            Ok(())
        })
        .build()
        .unwrap()
        .spawn();
    // "own" keeps its newest run only (its own retention instead of the node's two).
    apply(
        &client,
        vec![
            job("keep", "ret-app", "ok", json!({})),
            job("own", "ret-app", "ok", json!({"retention": {"runs": 1}})),
        ],
    )
    .await;
    let mut own = Vec::new();
    for _ in 0..3 {
        let id = trigger(&client, "own").await.run_id;
        wait_final(&client, &id).await;
        own.push(id);
    }
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = trigger(&client, "keep").await.run_id;
        wait_final(&client, &id).await;
        ids.push(id);
    }
    let mut kept: Vec<String> = eventually(DEADLINE, "the newest two runs kept", || async {
        let r = runs(&client, "keep").await;
        (r.len() == 2).then(|| r.into_iter().map(|r| r.run_id).collect())
    })
    .await;
    kept.sort();
    let mut newest = ids[3..].to_vec();
    newest.sort();
    assert_eq!(kept, newest);
    let kept_own = eventually(DEADLINE, "the newest run of `own` kept", || async {
        let r = runs(&client, "own").await;
        (r.len() == 1).then(|| r[0].run_id.clone())
    })
    .await;
    assert_eq!(kept_own, own[2]);
    // A pruned run is gone with its attempts and log lines; a kept one is whole.
    let err = client
        .call::<_, RunDetail>(Op::RunsGet, &RunGetRequest::new(ids[0].clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Api(ref e) if e.code == ErrorCode::NotFound),
        "{err}"
    );
    let d = wait_final(&client, &ids[4]).await;
    assert_eq!(d.attempts[0].logs[0].line, "a line");
    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

/// Writers racing on one job through two nodes: every write is checked against the bucket
/// revision it read, so each change gets its own number and none is lost — the numbers in
/// the history are 1, 2, … without gaps or repeats, and the last one is the job's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_distinct_revision_numbers() {
    let env = Env::new("revisions-race");
    let n1 = env.node("n1");
    let n2 = env.node("n2");
    let client = env.client().await;
    apply(&client, vec![job("j", "app", "p", json!({"args": 0}))]).await;
    // (Few enough that each gets through the write path's five attempts.)
    let writers = 4;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 1..=writers {
        let client = env.client().await;
        tasks.spawn(async move {
            apply(&client, vec![job("j", "app", "p", json!({"args": i}))])
                .await
                .results[0]
                .clone()
        });
    }
    let mut numbers = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let result = result.unwrap();
        assert_eq!(result.outcome, ApplyOutcome::Updated);
        numbers.push(result.revision);
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (2..=writers + 1).collect::<Vec<u64>>());
    let history: Vec<krest_schemas::api::JobRevision> = client
        .call(Op::JobHistory, &JobRequest::new("t.j"))
        .await
        .unwrap();
    assert_eq!(
        history.iter().map(|r| r.revision).collect::<Vec<_>>(),
        (1..=writers + 1).rev().collect::<Vec<u64>>()
    );
    let view = get_job(&client, "t.j").await;
    assert_eq!(view.revision, writers + 1);
    assert_eq!(
        Some(&view.spec.args),
        history[0].spec.as_ref().map(|s| &s.args)
    );

    // A deletion racing a change: whichever comes first, each takes its own number. (A
    // delete the client resends after its per-attempt timeout carries its request id, so it
    // does not delete the job again if the change re-created it in between.)
    let deleting = {
        let client = env.client().await;
        tokio::spawn(async move {
            client
                .call::<_, JobView>(Op::JobDelete, &JobRequest::delete("t.j"))
                .await
        })
    };
    let changing = env.client().await;
    let changed = apply(
        &changing,
        vec![job("j", "app", "p", json!({"args": "last"}))],
    )
    .await
    .results[0]
        .clone();
    let deleted = deleting.await.unwrap().unwrap();
    let history: Vec<krest_schemas::api::JobRevision> = client
        .call(Op::JobHistory, &JobRequest::new("t.j"))
        .await
        .unwrap();
    let numbers: Vec<u64> = history.iter().map(|r| r.revision).collect();
    assert_eq!(
        numbers,
        (1..=numbers.len() as u64).rev().collect::<Vec<u64>>()
    );
    let ops: Vec<(u64, &str)> = history[..2]
        .iter()
        .map(|r| (r.revision, r.operation.as_str()))
        .collect();
    let n = writers + 1;
    if changed.outcome == ApplyOutcome::Created {
        // Deleted first, then created again.
        assert_eq!(ops, [(n + 2, "PUT"), (n + 1, "DELETE")]);
        assert_eq!((deleted.revision, changed.revision), (n + 1, n + 2));
    } else {
        assert_eq!(changed.outcome, ApplyOutcome::Updated);
        assert_eq!(ops, [(n + 2, "DELETE"), (n + 1, "PUT")]);
        assert_eq!((deleted.revision, changed.revision), (n + 2, n + 1));
    }
    n1.stop().await.unwrap();
    n2.stop().await.unwrap();
}

/// A `job.delete` resent with its request id (a client that timed out waiting for the answer)
/// answers with the deletion it made: not "no such job", and it does not delete the job
/// applied again in between. A different request id deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_delete_answers_with_its_deletion_and_spares_the_job_applied_again() {
    let env = Env::new("delete-resent");
    let node = env.node("n1");
    let client = env.client().await;
    apply(&client, vec![job("d", "app", "p", json!({"args": 1}))]).await;
    let req = JobRequest::delete("t.d");
    let first: JobView = client.call(Op::JobDelete, &req).await.unwrap();
    assert_eq!((first.key.as_str(), first.revision), ("t.d", 2));

    // Resent while the job is still deleted: the same answer.
    let again: JobView = client.call(Op::JobDelete, &req).await.unwrap();
    assert_eq!(again, first);

    // Applied again, then the first deletion resent: the new job stays.
    let created = apply(&client, vec![job("d", "app", "p", json!({"args": 2}))])
        .await
        .results[0]
        .clone();
    assert_eq!(
        (created.outcome, created.revision),
        (ApplyOutcome::Created, 3)
    );
    let late: JobView = client.call(Op::JobDelete, &req).await.unwrap();
    assert_eq!(late, first);
    let current = get_job(&client, "t.d").await;
    assert_eq!(current.revision, 3);
    assert_eq!(current.spec.args, json!(2));
    let history: Vec<krest_schemas::api::JobRevision> = client
        .call(Op::JobHistory, &JobRequest::new("t.d"))
        .await
        .unwrap();
    let ops: Vec<(u64, &str)> = history
        .iter()
        .map(|r| (r.revision, r.operation.as_str()))
        .collect();
    assert_eq!(ops, [(3, "PUT"), (2, "DELETE"), (1, "PUT")]);

    // Another request deletes; a request id that is not a token is refused.
    let second: JobView = client
        .call(Op::JobDelete, &JobRequest::delete("t.d"))
        .await
        .unwrap();
    assert_eq!(second.revision, 4);
    let bad = JobRequest {
        request_id: Some("a b".into()),
        ..JobRequest::new("t.d")
    };
    let err = client
        .call::<_, JobView>(Op::JobDelete, &bad)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api(e) if e.code == ErrorCode::BadRequest),
        "{err:?}"
    );
    node.stop().await.unwrap();
}

/// Definitions written before jobs were numbered (no `version`) are numbered by their place
/// in the key's history, and the next write continues from there and records its number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_without_a_number_are_numbered_by_history() {
    let env = Env::new("revisions-legacy");
    let node = env.node("n1");
    let client = env.client().await;
    let nats = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    for args in [1, 2] {
        let spec = krest_schemas::parse_job(&job("old", "a", "p", json!({"args": args}))).unwrap();
        // As Krest wrote it before: no `version`.
        let mut stored = serde_json::to_value(krest_schemas::StoredJob {
            spec,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            version: 0,
        })
        .unwrap();
        assert!(stored.as_object_mut().unwrap().remove("version").is_none());
        js.publish("$KV.krest-jobs.t.old", stored.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let view = eventually(DEADLINE, "the second definition in the table", || async {
        client
            .call::<_, JobView>(Op::JobGet, &JobRequest::new("t.old"))
            .await
            .ok()
            .filter(|v| v.spec.args == json!(2))
    })
    .await;
    assert_eq!(view.revision, 2);
    let first: JobView = client
        .call(
            Op::JobGet,
            &JobRequest {
                job: "t.old".into(),
                revision: Some(1),
                request_id: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(first.spec.args, json!(1));
    let result = apply(&client, vec![job("old", "a", "p", json!({"args": 3}))])
        .await
        .results[0]
        .clone();
    assert_eq!(
        (result.outcome, result.revision),
        (ApplyOutcome::Updated, 3)
    );
    let kv = js.get_key_value("krest-jobs").await.unwrap();
    let stored: krest_schemas::StoredJob =
        serde_json::from_slice(&kv.get("t.old").await.unwrap().unwrap()).unwrap();
    assert_eq!(stored.version, 3);
    let history: Vec<krest_schemas::api::JobRevision> = client
        .call(Op::JobHistory, &JobRequest::new("t.old"))
        .await
        .unwrap();
    assert_eq!(
        history.iter().map(|r| r.revision).collect::<Vec<_>>(),
        [3, 2, 1]
    );
    // A deletion written without a number (`nats kv del`) takes the next one too.
    kv.delete("t.old").await.unwrap();
    let history: Vec<krest_schemas::api::JobRevision> = client
        .call(Op::JobHistory, &JobRequest::new("t.old"))
        .await
        .unwrap();
    assert_eq!(
        (history[0].operation.as_str(), history[0].revision),
        ("DELETE", 4)
    );
    let result = apply(&client, vec![job("old", "a", "p", json!({"args": 3}))])
        .await
        .results[0]
        .clone();
    assert_eq!(
        (result.outcome, result.revision),
        (ApplyOutcome::Created, 5)
    );
    node.stop().await.unwrap();
}
