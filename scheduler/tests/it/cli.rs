//! The `krest` binary as a user runs it: exit codes, tables, JSON, errors.

use krest_schemas::api::RunStatus;
use krest_test_support::eventually;
use krest_worker::JobContext;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_applies_lists_triggers_and_reports_errors() {
    let env = Env::new("cli");
    let node = env.node("n1");
    let client = env.client().await;
    let w = env
        .worker("demo-spring-krest-job", "w1")
        .handler("service/demo-krestjob-post", |ctx: JobContext| async move {
            ctx.log("hello from the handler");
            Ok("ok")
        })
        .build()
        .unwrap()
        .spawn();

    let seed = env.write(
        "seed.json",
        &serde_json::to_string(&seed_documents()).unwrap(),
    );
    let (code, out, err) = env.cli(&["job", "apply", "-f", seed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("default-jobGroup.demo-job2 created"), "{out}");
    assert!(out.contains("default-jobGroup.demo-job3 created"), "{out}");

    let (code, out, _) = env.cli(&["job", "list"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("JOB "), "{out}");
    assert!(
        out.contains("WEIGHT_ROUND_ROBIN") || out.contains("0/5 * * * * ?"),
        "{out}"
    );

    let (code, out, _) = env.cli(&["-o", "json", "job", "get", "demo-job2"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spec"]["args"].as_array().unwrap().len(), 9);
    assert_eq!(v["spec"]["loadBalanceType"], "WEIGHT_ROUND_ROBIN");

    // Pause the scheduled job so only the manual run below exists.
    let (code, out, _) = env.cli(&["-o", "json", "job", "pause", "demo-job3"]);
    assert_eq!(code, 0);
    let paused_revision = serde_json::from_str::<serde_json::Value>(&out).unwrap()["revision"]
        .as_u64()
        .unwrap();
    let (code, out, err) = env.cli(&[
        "-o",
        "json",
        "job",
        "trigger",
        "demo-job3",
        "--args",
        "\"manual\"",
    ]);
    assert_eq!(code, 0, "{err}");
    let run_id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["runId"]
        .as_str()
        .unwrap()
        .to_string();
    let d = wait_final(&client, &run_id).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    assert_eq!(
        d.run.revision,
        Some(paused_revision),
        "the run records its definition's revision"
    );
    let (code, out, _) = env.cli(&["job", "history", "demo-job3"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().filter(|l| l.contains(" PUT ")).count(),
        2,
        "{out}"
    );
    let (code, out, _) = env.cli(&["runs", "get", &run_id]);
    assert_eq!(code, 0);
    assert!(out.contains("status:     SUCCEEDED"), "{out}");
    assert!(out.contains("hello from the handler"), "{out}");
    let (code, out, _) = env.cli(&[
        "runs",
        "list",
        "--job",
        "demo-job3",
        "--status",
        "succeeded",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains(&run_id), "{out}");
    let (code, out, err) = env.cli(&["job", "stats", "demo-job3"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("job:           default-jobGroup.demo-job3"),
        "{out}"
    );
    assert!(
        out.contains(&format!("last run:      {run_id} SUCCEEDED")),
        "{out}"
    );
    assert!(out.contains("success rate:  100.0 %"), "{out}");
    assert!(out.contains("duration:      p50 "), "{out}");
    // Filters by app and time range.
    let listed = |args: &[&str]| {
        let mut all = vec!["runs", "list"];
        all.extend_from_slice(args);
        let (code, out, err) = env.cli(&all);
        assert_eq!(code, 0, "{args:?}: {err}");
        out.contains(&run_id)
    };
    assert!(listed(&["--app", "demo-spring-krest-job", "--since", "1h"]));
    assert!(!listed(&["--app", "another-app"]));
    assert!(!listed(&["--until", "1h"]));
    assert!(listed(&[
        "--since",
        "2000-01-01T00:00:00Z",
        "--until",
        "2100-01-01T00:00:00Z"
    ]));
    let (code, _, err) = env.cli(&["runs", "list", "--since", "last tuesday"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("neither an RFC 3339 time"), "{err}");

    // --wait follows a run and reflects its end in the exit code.
    let (code, out, err) = env.cli(&["job", "trigger", "demo-job3", "--wait"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(" SUCCEEDED (1/1 shards succeeded)"), "{out}");
    assert!(
        err.contains("1/1 shards SUCCEEDED"),
        "progress on stderr: {err}"
    );
    let broken = env.write(
        "broken-job.json",
        r#"{"appName":"demo-spring-krest-job","jobName":"no-handler","path":"missing/handler"}"#,
    );
    assert_eq!(
        env.cli(&["job", "apply", "-f", broken.to_str().unwrap()]).0,
        0
    );
    let (code, out, _) = env.cli(&["job", "trigger", "no-handler", "--wait"]);
    assert_eq!(code, 1);
    assert!(
        out.contains(" FAILED (0/1 shards succeeded; no handler `missing/handler`"),
        "{out}"
    );

    let (code, out, _) = env.cli(&["workers", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("w1"), "{out}");
    let (code, out, _) = env.cli(&["cluster", "status"]);
    assert_eq!(code, 0);
    assert!(out.contains("leader: n1"), "{out}");

    // Errors: invalid document, unknown job, bad JSON file, bad status — all non-zero with a
    // message naming the problem.
    let bad = env.write(
        "bad.json",
        r#"{"appName":"a","jobName":"x","path":"p","cron":"61 * * * * ?"}"#,
    );
    let (code, _, err) = env.cli(&["job", "apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cron: invalid cron expression `61 * * * * ?`"),
        "{err}"
    );
    let (code, _, err) = env.cli(&["job", "get", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no job named `nope`"), "{err}");
    let broken = env.write("broken.json", "{ not json");
    let (code, _, err) = env.cli(&["job", "apply", "-f", broken.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("is not valid JSON"), "{err}");
    let (code, _, err) = env.cli(&["runs", "list", "--status", "weird"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown status `weird`"), "{err}");

    w.stop().await.unwrap();
    node.stop().await.unwrap();

    // No node answering: a clear error, non-zero exit.
    eventually(DEADLINE, "no node answering", || async {
        let (code, _, err) = env.cli(&["--timeout", "2s", "job", "list"]);
        (code == 1 && err.contains("no Krest scheduler node is answering")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_explains_an_unreachable_nats() {
    let port = krest_test_support::free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
        .args([
            "--nats-url",
            &format!("nats://127.0.0.1:{port}"),
            "--timeout",
            "1s",
            "job",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to NATS at nats://127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("is nats-server running?"), "{err}");
}

#[test]
fn cron_next_previews_fire_times_in_a_time_zone() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
        .args([
            "-o",
            "json",
            "cron",
            "next",
            "0 15 10 ? * 6#3",
            "--tz",
            "Europe/Berlin",
            "-n",
            "3",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let times: Vec<chrono::DateTime<chrono::Utc>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(times.len(), 3);
    let berlin: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
    for t in &times {
        let local = t.with_timezone(&berlin);
        use chrono::{Datelike, Timelike};
        assert_eq!(
            (local.hour(), local.minute(), local.weekday()),
            (10, 15, chrono::Weekday::Fri)
        );
        assert!((15..=21).contains(&local.day()), "third Friday: {local}");
    }
    assert!(times.windows(2).all(|w| w[0] < w[1]));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
        .args(["cron", "next", "0 0 25 * * ?"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid cron expression `0 0 25 * * ?`"));
}

#[test]
fn version_completions_and_man_page_come_from_the_binary() {
    let krest = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // `krest 0.1.0 (<git revision>)`
    let version = krest(&["--version"]);
    let rev = version
        .trim()
        .strip_prefix(&format!("krest {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{version}"));
    assert!(!rev.is_empty(), "{version}");
    assert!(krest(&["completion", "bash"]).contains("complete -F _krest"));
    assert!(krest(&["completion", "zsh"]).contains("#compdef krest"));
    assert!(krest(&["completion", "fish"]).contains("complete -c krest"));
    let man = krest(&["man"]);
    assert!(man.contains(".TH krest 1"), "{man}");
    assert!(man.contains("scheduler"), "subcommands listed");
    // Writing into a closed pipe (`krest completion bash | head -1`) is not a crash.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
        .args(["completion", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Terminal escapes a hostile handler, job or parked message may carry.
const CLEAR: &str = "\x1b[2J";
const TITLE: &str = "\x1b]0;pwned\x07";

fn assert_inert(what: &str, out: &str) {
    assert!(
        !out.contains('\x1b') && !out.contains('\x07') && !out.contains('\u{9b}'),
        "{what} prints terminal escapes raw: {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_output_is_inert_and_files_may_have_a_bom_but_no_duplicate_keys() {
    let env = Env::new("cli-hygiene");
    let node = env.node("n1");
    let client = env.client().await;
    let w = env
        .worker("esc", "w1")
        .handler("boom", |ctx: JobContext| async move {
            ctx.log(format!("{CLEAR}log line"));
            Err::<(), _>(krest_worker::JobError::fatal(format!(
                "{TITLE}failed\nFAKE LINE"
            )))
        })
        .handler(
            format!("odd{CLEAR}"),
            |_ctx: JobContext| async move { Ok(()) },
        )
        .build()
        .unwrap()
        .spawn();

    // A file starting with a UTF-8 BOM applies.
    let bom = env.write(
        "bom.json",
        "\u{feff}{\"appName\": \"esc\", \"jobGroup\": \"t\", \"jobName\": \"boom\", \"path\": \"boom\", \"description\": \"csi \u{9b}31m\"}",
    );
    let (code, out, err) = env.cli(&["job", "apply", "-f", bom.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("t.boom created"), "{out}");
    // A key given twice is refused, naming it and where it is; nothing is applied.
    let dup = env.write(
        "dup.json",
        "[{\"appName\": \"esc\", \"jobName\": \"ok\", \"path\": \"p\"},\n {\"appName\": \"esc\",\n  \"jobName\": \"d\",\n  \"path\": \"p\", \"path\": \"q\"}]",
    );
    let (code, _, err) = env.cli(&["job", "apply", "-f", dup.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("is not valid JSON: duplicate key `path` at line 4 column 21"),
        "{err}"
    );
    let (_, out, _) = env.cli(&["job", "list"]);
    assert!(
        !out.contains("esc.ok") && !out.contains("default.ok"),
        "{out}"
    );

    // `job get` shows the description's C1 control escaped; JSON keeps it exact.
    let (code, out, _) = env.cli(&["job", "get", "t.boom"]);
    assert_eq!(code, 0);
    assert_inert("job get", &out);
    assert!(out.contains("csi \\u{9b}31m"), "{out}");
    let (_, out, _) = env.cli(&["-o", "json", "job", "get", "t.boom"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spec"]["description"], "csi \u{9b}31m");

    // `runs watch` follows the run's events while it happens.
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
        .args(["--nats-url", &env.url(), "runs", "watch", "--job", "t.boom"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let stderr = watch.stderr.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr).lines() {
            if line.unwrap_or_default().contains("following run events") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx.recv_timeout(DEADLINE).unwrap();

    // The failing run: its log line and error carry escapes and a newline. Its events reach
    // the watch by core NATS, so a run may go by before the watch's subscription is in place:
    // trigger until the watch has shown a finished run.
    let mut watched = String::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    let run_id = loop {
        let run_id = trigger(&client, "t.boom").await.run_id;
        let d = wait_final(&client, &run_id).await;
        assert_eq!(d.run.status, RunStatus::Failed);
        while let Ok(line) = rx.try_recv() {
            watched.push_str(&line);
            watched.push('\n');
        }
        if watched.contains(" finished ") {
            break run_id;
        }
        assert!(std::time::Instant::now() < deadline, "nothing watched");
    };
    let _ = watch.kill();
    let _ = watch.wait();
    assert_inert("runs watch", &watched);
    assert!(
        watched.contains("\\u{1b}]0;pwned\\u{7}failed\\nFAKE LINE"),
        "{watched}"
    );
    assert!(watched.contains("\\u{1b}[2Jlog line"), "{watched}");

    let (code, out, _) = env.cli(&["runs", "get", &run_id]);
    assert_eq!(code, 0);
    assert_inert("runs get", &out);
    assert!(
        out.contains("error:  \\u{1b}]0;pwned\\u{7}failed\\nFAKE LINE"),
        "{out}"
    );
    assert!(out.contains("\\u{1b}[2Jlog line"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("FAKE LINE")), "{out}");
    let (_, out, _) = env.cli(&["runs", "list", "--job", "t.boom"]);
    assert_inert("runs list", &out);
    assert!(out.contains("\\u{1b}]0;pwned"), "{out}");
    let (_, out, _) = env.cli(&["job", "trigger", "t.boom", "--wait"]);
    assert_inert("job trigger --wait", &out);
    let (_, out, _) = env.cli(&["-o", "json", "runs", "get", &run_id]);
    let exact: krest_schemas::api::RunDetail = serde_json::from_str(&out).unwrap();
    assert_eq!(
        exact.run.error.as_deref(),
        Some(format!("{TITLE}failed\nFAKE LINE").as_str()),
        "JSON output is exact"
    );
    let (_, out, _) = env.cli(&["workers", "list"]);
    assert_inert("workers list", &out);
    assert!(out.contains("odd\\u{1b}[2J"), "{out}");
    let (_, out, _) = env.cli(&["job", "history", "t.boom"]);
    assert_inert("job history", &out);

    // A parked message with escapes in its payload and reason.
    let nats = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        krest_schemas::names::DLQ_REASON_HEADER,
        format!("{TITLE}reason").as_str(),
    );
    headers.insert(krest_schemas::names::DLQ_SOURCE_HEADER, "krest.work.esc.q");
    js.publish_with_headers(
        "krest.dlq.work",
        headers,
        format!("bad {CLEAR} payload").into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let (code, out, _) = env.cli(&["dlq", "list"]);
    assert_eq!(code, 0);
    assert_inert("dlq list", &out);
    assert!(out.contains("bad \\u{1b}[2J payload"), "{out}");
    assert!(out.contains("\\u{1b}]0;pwned\\u{7}reason"), "{out}");
    let (_, out, _) = env.cli(&["-o", "json", "dlq", "list"]);
    let letters: Vec<krest_schemas::api::DeadLetter> = serde_json::from_str(&out).unwrap();
    assert_eq!(letters[0].payload, format!("bad {CLEAR} payload"));

    w.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_applies_files_many_times_larger_than_max_payload() {
    let env = Env::with_max_payload("bulk-apply", SMALL_PAYLOAD);
    let node = env.node("n1");
    let _client = env.client().await;
    let apply_file = |name: &str, docs: &[serde_json::Value]| {
        let file = env.write(name, &serde_json::to_string(docs).unwrap());
        env.cli(&["job", "apply", "-f", file.to_str().unwrap()])
    };
    // 600 documents of ~1 KiB, about ten times max_payload; the first is the parent of the
    // last 60 (~2 KiB each: more than one request holds), so the parent comes before its
    // children in the file and the CLI must send them first, in earlier requests.
    let mut docs: Vec<serde_json::Value> = (0..600)
        .map(|i| {
            job(
                &format!("b{i:03}"),
                "bulk",
                "p",
                serde_json::json!({"args": "x".repeat(1000)}),
            )
        })
        .collect();
    docs[0]["childJobs"] = (540..600).map(|i| format!("b{i:03}")).collect();
    for doc in &mut docs[540..] {
        doc["args"] = serde_json::json!("x".repeat(2000));
    }
    assert!(serde_json::to_string(&docs).unwrap().len() > 9 * SMALL_PAYLOAD);
    let (code, out, err) = apply_file("bulk.json", &docs);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 600, "{out}");
    for (i, line) in lines.iter().enumerate() {
        assert!(line == &format!("t.b{i:03} created (revision 1)"), "{line}");
    }
    let (code, out, err) = env.cli(&["job", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 601);
    let (code, out, err) = env.cli(&["-o", "json", "job", "get", "b000"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"b599\""), "{out}");

    // Again: every document unchanged; one edited: updated; one deleted meanwhile (its key
    // has a delete marker, so the pipelined write is refused and retried alone): created.
    docs[300]["args"] = serde_json::json!("changed");
    assert_eq!(env.cli(&["job", "delete", "b005"]).0, 0);
    let (code, out, err) = apply_file("bulk2.json", &docs);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches(" unchanged (revision 1)").count(), 598, "{out}");
    assert!(out.contains("t.b300 updated (revision 2)"), "{out}");
    // b005's deletion took revision 2.
    assert!(out.contains("t.b005 created (revision 3)"), "{out}");
    let (code, out, err) = {
        let file = env.write("bulk3.json", &serde_json::to_string(&docs).unwrap());
        env.cli(&["-o", "json", "job", "apply", "-f", file.to_str().unwrap()])
    };
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 600);
    assert!(v.get("failed").is_none());

    // One invalid document among 400 new ones: nothing is applied.
    let mut more: Vec<serde_json::Value> = (0..400)
        .map(|i| {
            job(
                &format!("c{i:03}"),
                "bulk",
                "p",
                serde_json::json!({"args": "x".repeat(1000)}),
            )
        })
        .collect();
    more[250]["cron"] = serde_json::json!("61 * * * * ?");
    let (code, out, err) = apply_file("bad.json", &more);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("error: 1 of 400 definitions are invalid; nothing was applied"),
        "{err}"
    );
    assert!(err.contains("document 250 (t.c250):"), "{err}");
    assert!(
        err.contains("cron: invalid cron expression `61 * * * * ?`"),
        "{err}"
    );
    // A child that exists nowhere, and a document too large for any request: named too.
    more[250]["cron"] = serde_json::json!("0 0 * * * ?");
    more[10]["childJobs"] = serde_json::json!(["nowhere"]);
    more[20]["args"] = serde_json::json!("d".repeat(65_000));
    let (code, _, err) = apply_file("bad2.json", &more);
    assert_eq!(code, 1);
    assert!(
        err.contains("error: 2 of 400 definitions are invalid"),
        "{err}"
    );
    assert!(err.contains("document 10 (t.c010):"), "{err}");
    assert!(err.contains("childJobs: no job `t.nowhere`"), "{err}");
    assert!(err.contains("document 20 (t.c020):"), "{err}");
    assert!(
        err.contains("raise max_payload in the nats-server configuration"),
        "{err}"
    );
    let (_, out, _) = env.cli(&["job", "list"]);
    assert_eq!(
        out.lines().count(),
        601,
        "nothing of the rejected files applied"
    );
    node.stop().await.unwrap();
}

/// A file of `docs`, one document per line (line n + 2 holds document n).
fn lines_file(docs: &[serde_json::Value]) -> String {
    let lines: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
    format!("[\n{}\n]\n", lines.join(",\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_is_checked_whole_before_anything_is_sent_and_stdin_applies() {
    let env = Env::new("cli-large");
    let node = env.node("n1");
    let _client = env.client().await;
    let docs = |n: usize| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| {
                job(
                    &format!("j{i:05}"),
                    "large",
                    "p",
                    serde_json::json!({"cron": format!("0 {} 3 1 1 ?", i % 60), "args": {"i": i}}),
                )
            })
            .collect()
    };
    let jobs_listed = || {
        let (code, out, err) = env.cli(&["-o", "json", "job", "list"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .unwrap()
            .len()
    };

    // 20,000 documents, the invalid one near the end: nothing is sent, the error names it.
    let mut many = docs(20_000);
    many[19_990]["cron"] = serde_json::json!("61 * * * * ?");
    let file = env.write("late-invalid.json", &lines_file(&many));
    let (code, out, err) = env.cli(&["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("error: 1 of 20000 definitions are invalid; nothing was applied"),
        "{err}"
    );
    assert!(err.contains("document 19990 (t.j19990):"), "{err}");
    assert!(
        err.contains("cron: invalid cron expression `61 * * * * ?`"),
        "{err}"
    );
    // The same job twice, far apart: the later one is named with the earlier one.
    many[19_990]["cron"] = serde_json::json!("0 0 3 1 1 ?");
    many[19_999]["jobName"] = serde_json::json!("j00007");
    let file = env.write("late-twice.json", &lines_file(&many));
    let (code, _, err) = env.cli(&["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("document 19999 (t.j00007):")
            && err.contains("defines the same job as document 7"),
        "{err}"
    );
    // A key given twice in a late document: not valid JSON, with its line in the file.
    many[19_999]["jobName"] = serde_json::json!("j19999");
    let mut text = lines_file(&many);
    let late = text.find("\"jobName\":\"j19995\"").unwrap();
    text.insert_str(late, "\"path\":\"q\",");
    let file = env.write("late-dup.json", &text);
    let (code, _, err) = env.cli(&["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("late-dup.json is not valid JSON: duplicate key `path` at line 19997 column"),
        "{err}"
    );
    assert_eq!(jobs_listed(), 0, "nothing of the rejected files applied");

    // From stdin (`-f -`), with a BOM, over several requests: each result in file order.
    let few = docs(2_500);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
        .args([
            "--nats-url",
            &env.url(),
            "-o",
            "json",
            "job",
            "apply",
            "-f",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"\xEF\xBB\xBF").unwrap();
        stdin.write_all(lines_file(&few).as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2_500);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["job"], format!("t.j{i:05}"), "{r}");
        // (CREATED, or UNCHANGED when a slow node's reply came after the client's retry.)
        assert!(
            r["outcome"] == "CREATED" || r["outcome"] == "UNCHANGED",
            "{r}"
        );
        assert_eq!(r["revision"], 1, "{r}");
    }
    assert!(v.get("failed").is_none(), "{v}");
    assert_eq!(jobs_listed(), 2_500);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_shows_changes_and_edit_applies_or_keeps_the_edit() {
    let env = Env::new("cli-edit");
    let _node = env.node("n1");
    let client = env.client().await;
    let seed = env.write(
        "seed.json",
        &serde_json::to_string(&seed_documents()).unwrap(),
    );
    let (code, _, err) = env.cli(&["job", "apply", "-f", seed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // No worker of the seed's app runs here: apply and trigger --wait say so.
    assert!(
        err.contains("warning: no worker of app demo-spring-krest-job is running"),
        "{err}"
    );
    let (code, _, err) = env.cli(&[
        "job",
        "trigger",
        "demo-job3",
        "--wait",
        "--wait-timeout",
        "1s",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("warning: no worker of app demo-spring-krest-job is running: runs of default-jobGroup.demo-job3 wait as PENDING"),
        "{err}"
    );

    // Names resolve the same way everywhere; a typo fails and suggests the closest names.
    for args in [
        &["runs", "list", "--job", "demo-jb3"][..],
        &["job", "get", "demo-jb3"],
        &["job", "history", "demo-jb3"],
        &["runs", "watch", "--job", "demo-jb3"],
    ] {
        let (code, out, err) = env.cli(args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(
            err.contains("no job named `demo-jb3`; did you mean default-jobGroup.demo-job3 or default-jobGroup.demo-job2?"),
            "{args:?}: {err}"
        );
    }
    let (code, out, err) = env.cli(&["runs", "list", "--job", "demo-job3"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("RUN "),
        "a known job without runs lists none: {out}"
    );

    // --dry-run: one job changed, one new, one unchanged; nothing applied.
    let mut docs = seed_documents();
    let job3 = docs
        .iter_mut()
        .find(|d| d["jobName"] == "demo-job3")
        .unwrap();
    job3["cron"] = serde_json::json!("0/7 * * * * ?");
    job3["description"] = serde_json::json!("changed");
    docs.push(
        serde_json::json!({"appName": "a", "jobName": "fresh", "path": "p", "cron": "0 0 * * * ?"}),
    );
    let changed = env.write("changed.json", &serde_json::to_string(&docs).unwrap());
    let (code, out, err) = env.cli(&["job", "apply", "--dry-run", "-f", changed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("dry run: nothing was applied"), "{err}");
    assert!(
        out.contains("default-jobGroup.demo-job2 would be unchanged"),
        "{out}"
    );
    assert!(
        out.contains("default-jobGroup.demo-job3 would be updated:\n"),
        "{out}"
    );
    assert!(
        out.contains("  - cron: \"0/5 * * * * ?\"\n  + cron: \"0/7 * * * * ?\""),
        "{out}"
    );
    assert!(out.contains("  + description: \"changed\""), "{out}");
    assert!(!out.contains("- description"), "{out}");
    assert!(out.contains("default.fresh would be created"), "{out}");
    let (code, out, _) = env.cli(&[
        "-o",
        "json",
        "job",
        "apply",
        "--dry-run",
        "-f",
        changed.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let planned: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(planned[1]["action"], "update");
    assert_eq!(
        planned[1]["changes"].as_array().unwrap().len(),
        2,
        "{planned}"
    );
    let view = get_job(&client, "demo-job3").await;
    assert_eq!(
        view.spec.cron.as_deref(),
        Some("0/5 * * * * ?"),
        "dry run applied nothing"
    );
    let (code, _, _) = env.cli(&["job", "get", "fresh"]);
    assert_ne!(code, 0, "dry run created nothing");

    // `job edit`: the editor's change is checked and applied.
    let (code, out, err) = env.cli_env(
        &["job", "edit", "demo-job3"],
        &[("EDITOR", "sed -i -e s#0/5#0/9#"), ("VISUAL", "")],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("default-jobGroup.demo-job3 updated"), "{out}");
    let view = get_job(&client, "demo-job3").await;
    assert_eq!(view.spec.cron.as_deref(), Some("0/9 * * * * ?"));

    // An invalid edit is refused, kept in a file, and applies nothing.
    let (code, _, err) = env.cli_env(
        &["job", "edit", "demo-job3"],
        &[("EDITOR", "sed -i -e s#0/9#nonsense#"), ("VISUAL", "")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the edited definition is invalid"), "{err}");
    assert!(err.contains("cron"), "{err}");
    let kept = err
        .split("your edit is kept in ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap()
        .to_string();
    assert!(std::fs::read_to_string(&kept).unwrap().contains("nonsense"));
    let _ = std::fs::remove_file(&kept);
    assert_eq!(
        get_job(&client, "demo-job3").await.spec.cron.as_deref(),
        Some("0/9 * * * * ?")
    );

    // Renaming through edit is refused; leaving the editor without a change applies nothing.
    let (code, _, err) = env.cli_env(
        &["job", "edit", "demo-job3"],
        &[("EDITOR", "sed -i -e s#demo-job3#other#"), ("VISUAL", "")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not rename or copy jobs"), "{err}");
    let (code, _, err) = env.cli_env(
        &["job", "edit", "demo-job3"],
        &[("EDITOR", "true"), ("VISUAL", "")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no changes; nothing was applied"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_logs_follows_a_run_and_an_attempts_log_is_bounded() {
    let env = Env::new("cli-logs");
    let _node = env.node("n1");
    let client = env.client().await;
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let w = env
        .worker("logs", "w1")
        .handler("slow", move |ctx: JobContext| {
            let mut go = go_rx.clone();
            async move {
                ctx.log("first line");
                let _ = go.wait_for(|g| *g).await;
                ctx.warn("second line");
                Ok("done")
            }
        })
        .handler("chatty", |ctx: JobContext| async move {
            for i in 0..krest_worker::MAX_LOG_LINES_PER_ATTEMPT + 50 {
                ctx.log(format!("line {i}"));
            }
            Ok(())
        })
        .build()
        .unwrap()
        .spawn();
    apply(
        &client,
        vec![
            serde_json::json!({"appName": "logs", "jobGroup": "t", "jobName": "slow", "path": "slow"}),
            serde_json::json!({"appName": "logs", "jobGroup": "t", "jobName": "chatty", "path": "chatty"}),
        ],
    )
    .await;

    // `runs logs --follow` prints what is stored, then lines as they are logged, and ends
    // with the run.
    let run_id = trigger(&client, "slow").await.run_id;
    let follow = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
        .args([
            "--nats-url",
            &env.url(),
            "runs",
            "logs",
            "--follow",
            &run_id,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(DEADLINE, "the first line recorded", || async {
        run(&client, &run_id)
            .await
            .filter(|d| d.attempts.iter().any(|a| !a.logs.is_empty()))
    })
    .await;
    go_tx.send(true).unwrap();
    let out = tokio::task::spawn_blocking(move || follow.wait_with_output().unwrap())
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].ends_with("INFO  shard 0 attempt 1 | first line"),
        "{stdout}"
    );
    assert!(
        lines[1].ends_with("WARN  shard 0 attempt 1 | second line"),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("run {run_id} ended: SUCCEEDED")),
        "{stderr}"
    );
    let (code, again, _) = env.cli(&["runs", "logs", &run_id]);
    assert_eq!(code, 0);
    assert_eq!(again, stdout, "stored lines read back the same");

    // `runs watch --since` replays the events of that run before following.
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_krest"));
    watch.args([
        "--nats-url",
        &env.url(),
        "runs",
        "watch",
        "--since",
        "10m",
        "--job",
        "slow",
    ]);
    let replayed = first_line(watch, Output::Stdout, |l| {
        l.contains(" finished ") && l.contains("SUCCEEDED")
    })
    .await;
    assert!(replayed.contains(&run_id), "{replayed}");

    // An attempt keeps MAX lines plus a marker saying the log was cut.
    let chatty = trigger(&client, "chatty").await.run_id;
    let d = wait_final(&client, &chatty).await;
    assert_eq!(d.run.status, RunStatus::Succeeded);
    let (code, out, err) = env.cli(&["runs", "logs", &chatty]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        krest_worker::MAX_LOG_LINES_PER_ATTEMPT as usize + 1,
        "{}",
        lines.last().unwrap()
    );
    assert!(
        lines
            .last()
            .unwrap()
            .contains("WARN  shard 0 attempt 1 | log cut:"),
        "{}",
        lines.last().unwrap()
    );
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_nats_is_named_with_what_is_there() {
    let krest = |url: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
            .args(["--nats-url", url, "--timeout", "2s"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // A NATS where Krest never ran.
    let other = krest_test_support::NatsServer::start();
    let (code, err) = krest(&other.url(), &["job", "list"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "no Krest scheduler node is answering on NATS at {}",
            other.url()
        )),
        "{err}"
    );
    assert!(err.contains("has no Krest streams"), "{err}");
    assert!(err.contains("NATS_URL"), "{err}");
    // `runs watch` there says so instead of waiting silently.
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_krest"));
    watch.args(["--nats-url", &other.url(), "runs", "watch"]);
    let warning = first_line(watch, Output::Stderr, |l| l.starts_with("warning:")).await;
    assert!(warning.contains("has no Krest streams"), "{warning}");

    // Krest's NATS with its schedulers stopped.
    let env = Env::new("cli-stopped");
    let node = env.node("n1");
    let _client = env.client().await;
    node.stop().await.unwrap();
    let (code, err) = krest(&env.url(), &["job", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("holds Krest's streams"), "{err}");
    assert!(err.contains("start one with `krest scheduler`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_sets_what_flags_and_environment_do_not() {
    let env = Env::new("cli-config");
    let _node = env.node("n1");
    let _client = env.client().await;
    let file = env.write(
        "krest.toml",
        &format!(
            "nats-url = \"{}\"\n[scheduler]\nlease-ttl = \"9s\"\n",
            env.url()
        ),
    );
    let krest = |args: &[&str], vars: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_krest"))
            .env_remove("NATS_URL")
            .env_remove("KREST_LEASE_TTL")
            .envs(vars.iter().copied())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // The file's NATS URL reaches the node.
    let (code, out, err) = krest(
        &["--config", file.to_str().unwrap(), "cluster", "status"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("n1"), "{out}");
    // KREST_CONFIG names the file too; the environment beats the file, a flag beats both.
    let cfg = file.to_str().unwrap();
    let (code, out, err) = krest(
        &["scheduler", "--print-config"],
        &[("KREST_CONFIG", cfg), ("KREST_LEASE_TTL", "5s")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("lease-ttl = \"5s\"  # environment KREST_LEASE_TTL"),
        "{out}"
    );
    let (_, out, _) = krest(
        &["scheduler", "--print-config", "--lease-ttl", "4s"],
        &[("KREST_CONFIG", cfg), ("KREST_LEASE_TTL", "5s")],
    );
    assert!(out.contains("lease-ttl = \"4s\"  # flag"), "{out}");
    let (_, out, _) = krest(&["scheduler", "--print-config"], &[("KREST_CONFIG", cfg)]);
    assert!(out.contains("lease-ttl = \"9s\"  # config file"), "{out}");
    assert!(
        out.contains(&format!("nats-url = \"{}\"  # config file", env.url())),
        "{out}"
    );
    // A typo in the file stops the command with the key named.
    let bad = env.write("bad.toml", "[scheduler]\nreplica = 3\n");
    let (code, _, err) = krest(&["--config", bad.to_str().unwrap(), "scheduler"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown setting `scheduler.replica`"), "{err}");
}

/// Revisions are numbered per job: every job starts at 1, each change and the deletion take
/// the next number, a job applied again after its deletion continues; `job history`,
/// `job get --revision`, `job delete` and `job apply` show the same numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_are_numbered_per_job() {
    let env = Env::new("cli-revisions");
    let node = env.node("n1");
    env.client().await;
    let apply_file = |name: &str, docs: &[serde_json::Value]| {
        let file = env.write(name, &serde_json::to_string(docs).unwrap());
        env.cli(&["job", "apply", "-f", file.to_str().unwrap()])
    };
    let a = job("a", "app", "p", serde_json::json!({"cron": "0 0 * * * ?"}));
    let b = job("b", "app", "p", serde_json::json!({"cron": "0 0 * * * ?"}));
    let (code, out, err) = apply_file("two.json", &[a.clone(), b]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out, "t.a created (revision 1)\nt.b created (revision 1)\n",
        "each job starts at 1"
    );
    let mut a2 = a.clone();
    a2["cron"] = serde_json::json!("0 30 * * * ?");
    let (code, out, err) = apply_file("a2.json", std::slice::from_ref(&a2));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "t.a updated (revision 2)\n");
    let (code, out, err) = apply_file("a2.json", std::slice::from_ref(&a2));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "t.a unchanged (revision 2)\n");

    let history = |name: &str| -> Vec<(u64, String)> {
        let (code, out, err) = env.cli(&["-o", "json", "job", "history", name]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["revision"].as_u64().unwrap(),
                    r["operation"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let put = |n: u64| (n, "PUT".to_string());
    assert_eq!(history("t.a"), [put(2), put(1)]);
    assert_eq!(history("t.b"), [put(1)]);
    let (code, out, _) = env.cli(&["job", "history", "t.a"]);
    assert_eq!(code, 0);
    let revs: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(revs, ["2", "1"], "{out}");

    let (code, out, err) = env.cli(&["-o", "json", "job", "get", "t.a", "--revision", "1"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["revision"].as_u64(), v["spec"]["cron"].as_str()),
        (Some(1), Some("0 0 * * * ?"))
    );
    let (code, _, err) = env.cli(&["job", "get", "t.a", "--revision", "3"]);
    assert_eq!(code, 1);
    assert!(err.contains("job t.a has no revision 3"), "{err}");

    // Pause: a revision; the job and its view agree.
    let (code, out, err) = env.cli(&["job", "pause", "a"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "t.a paused (revision 3)\n");
    let (code, out, err) = env.cli(&["-o", "json", "job", "get", "a"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["revision"].as_u64(), Some(3));

    // Delete prints the number the history then shows for the deletion.
    let (code, out, err) = env.cli(&["job", "delete", "t.a"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "t.a deleted (revision 4)\n");
    let delete = |n: u64| (n, "DELETE".to_string());
    assert_eq!(history("t.a"), [delete(4), put(3), put(2), put(1)]);
    let (code, _, err) = env.cli(&["job", "get", "t.a", "--revision", "4"]);
    assert_eq!(code, 1, "a deletion has no definition");
    assert!(err.contains("no revision 4"), "{err}");

    // Applied again: the numbers continue after the deletion (a fresh node reads them from
    // the bucket alike).
    let (code, out, err) = apply_file("a.json", std::slice::from_ref(&a));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "t.a created (revision 5)\n");
    node.stop().await.unwrap();
    let node = env.node("n2");
    env.client().await;
    assert_eq!(history("t.a"), [put(5), delete(4), put(3), put(2), put(1)]);
    let (code, out, err) = env.cli(&["-o", "json", "job", "get", "t.a"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["revision"].as_u64(), Some(5));
    let (code, out, err) = env.cli(&["job", "delete", "t.b"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "t.b deleted (revision 2)\n");
    node.stop().await.unwrap();
}
