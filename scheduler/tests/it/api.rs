//! Job management through the API: validation errors that name the problem (and apply
//! nothing), revisions, pause/resume, delete, name resolution.

use krest::cli::client::ClientError;
use krest_schemas::api::{
    ApiReply, ApplyOutcome, ErrorCode, JobListRequest, JobRequest, JobView, Op,
};
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
    assert!(updated.revision > again.revision);

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
    assert_eq!(view.revision, paused.revision);
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
        .call(Op::JobDelete, &JobRequest::new("u.j"))
        .await
        .unwrap();
    assert_eq!(deleted.key, "u.j");
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
                r.spec.as_ref().and_then(|s| s.cron.clone()),
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
            },
        )
        .await
        .unwrap();
    assert_eq!(first.spec.cron.as_deref(), Some("0 0 * * * ?"));
    assert_eq!(first.revision, history[3].revision);
    let deleted_history: Vec<krest_schemas::api::JobRevision> = client
        .call(Op::JobHistory, &JobRequest::new("u.j"))
        .await
        .unwrap();
    assert_eq!(deleted_history[0].operation, "DELETE");
    assert_eq!(deleted_history[1].operation, "PUT");
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
