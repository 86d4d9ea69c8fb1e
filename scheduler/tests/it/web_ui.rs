//! The web console in real headless Chromium (through chromedriver, W3C WebDriver) on a real
//! node, NATS and worker: log in, create a job through the form, see it run and its logs
//! appear (live, over server-sent events, for a run still running), pause it, see an invalid cron refused as you type, log out; a read-only login sees
//! no control that writes. With `KREST_BLESS=1`
//! the dashboard's screenshot is written to `docs/img/dashboard.png`.

use krest_test_support::webdriver::Browser;
use krest_worker::JobContext;
use serde_json::json;

use crate::harness::*;

const WRITE: &str = "console-write-token";
const READ: &str = "console-read-token";

/// With `KREST_WEB_SHOTS=<dir>`, saves a screenshot of the page as `<dir>/<name>.png`.
async fn shot(browser: &Browser, name: &str) {
    if let Some(dir) = std::env::var_os("KREST_WEB_SHOTS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), browser.screenshot().await).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn console_logs_in_creates_runs_pauses_and_logs_out() {
    let env = Env::new("web-ui");
    let (_node, base) = web_node(
        &env,
        "n1",
        krest::serve::web::WebOptions {
            api_token: Some(WRITE.into()),
            read_token: Some(READ.into()),
            anonymous_read: false,
        },
    )
    .await;
    // Runs of `gated` wait until the test releases them.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let worker = env
        .worker("console", "console-1")
        .handler("say-hello", |ctx: JobContext| async move {
            ctx.log(format!(
                "hello from the console job, shard {}",
                ctx.shard_index()
            ));
            Ok("said hello".to_string())
        })
        .handler("gated", move |ctx: JobContext| {
            let g = g.clone();
            async move {
                ctx.log("waiting at the gate");
                g.acquire()
                    .await
                    .map_err(|_| krest_worker::JobError::fatal("closed"))?
                    .forget();
                ctx.log("through the gate");
                Ok("released".to_string())
            }
        })
        .build()
        .unwrap()
        .spawn();
    let browser = Browser::start(1280, 900).await;

    // The console asks for a token; a wrong one is refused with the API's message.
    browser.goto(&format!("{base}/")).await;
    let token = browser.find("#token").await;
    browser.fill(&token, "wrong").await;
    browser.click(&browser.find("#login-submit").await).await;
    browser
        .wait_text("#login-error", "the login error", |t| {
            t.contains("not valid")
        })
        .await;
    browser.fill(&token, WRITE).await;
    browser.click(&browser.find("#login-submit").await).await;
    browser
        .wait_text("#card-leader", "the dashboard", |t| t.contains("n1"))
        .await;
    // The session cookie is HttpOnly: the page's script cannot read it.
    let cookies = browser.exec("return document.cookie", json!([])).await;
    assert_eq!(cookies, json!(""));

    // Create a job through the form; the cron is checked and previewed as typed.
    browser.goto(&format!("{base}/#/new")).await;
    for (field, value) in [
        ("#f-appName", "console"),
        ("#f-jobGroup", "ui"),
        ("#f-jobName", "hello"),
        ("#f-path", "say-hello"),
        ("#f-timeZone", "Europe/Berlin"),
        ("#f-cron", "0 0 9 * * ?"),
    ] {
        let el = browser.find(field).await;
        browser.fill(&el, value).await;
    }
    browser
        .wait_text("#cron-preview", "the next fire times", |t| {
            t.contains("09:00:00 CET") || t.contains("09:00:00 CEST")
        })
        .await;
    browser.click(&browser.find("#save-job").await).await;
    browser
        .wait_text("#view h1", "the job page", |t| t.contains("ui.hello"))
        .await;
    let definition = browser.text(&browser.find("#definition").await).await;
    assert!(
        definition.contains("\"path\": \"say-hello\""),
        "{definition}"
    );

    // Trigger it now with args: the run page shows it run, its logs, then success.
    let args = browser.find("#trigger-args").await;
    browser.fill(&args, "{\"who\": \"console\"}").await;
    browser.click(&browser.find("#trigger-job").await).await;
    browser
        .wait_text("#run-status", "the run to succeed", |t| t == "SUCCEEDED")
        .await;
    browser
        .wait_text("#run-detail", "the run's logs", |t| {
            t.contains("hello from the console job, shard 0")
        })
        .await;
    let detail = browser.text(&browser.find("#run-detail").await).await;
    assert!(detail.contains("said hello"), "{detail}");
    shot(&browser, "run").await;

    // A run page updates live (server-sent events): a running run's log lines appear, then
    // its end, without reloading.
    let web = Web::new(&base, Some(WRITE));
    let (s, v) = web
        .send(
            "POST",
            "/api/v1/jobs",
            Some(json!({"appName": "console", "jobGroup": "ui", "jobName": "gated", "path": "gated"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    browser.goto(&format!("{base}/#/jobs/ui.gated")).await;
    browser.click(&browser.find("#trigger-job").await).await;
    browser
        .wait_text("#live-log", "the live log line", |t| {
            t.contains("waiting at the gate")
        })
        .await;
    browser
        .wait_text("#run-status", "the run running", |t| t == "RUNNING")
        .await;
    gate.add_permits(1);
    browser
        .wait_text("#run-status", "the run's end, live", |t| t == "SUCCEEDED")
        .await;
    browser
        .wait_text("#run-detail", "the last log line", |t| {
            t.contains("through the gate")
        })
        .await;

    // Pause it from its page.
    browser.goto(&format!("{base}/#/jobs/ui.hello")).await;
    browser.click(&browser.find("#pause-job").await).await;
    browser
        .wait_text("#view h1", "the job paused", |t| t.contains("PAUSED"))
        .await;
    assert_eq!(
        web.ok("/api/v1/jobs/ui.hello").await["spec"]["running"],
        false
    );

    // An invalid cron in the edit form: the API's error, shown as typed.
    browser.goto(&format!("{base}/#/edit/ui.hello")).await;
    let cron = browser.find("#f-cron").await;
    browser
        .wait_text("#cron-preview", "the current preview", |t| {
            t.contains("09:00:00")
        })
        .await;
    browser.fill(&cron, "0 61 * * * ?").await;
    let shown = browser
        .wait_text("#cron-error", "the cron error", |t| !t.is_empty())
        .await;
    let (_, api) = web
        .get("/api/v1/cron/preview?expr=0%2061%20*%20*%20*%20%3F&tz=Europe/Berlin")
        .await;
    assert_eq!(shown, api["error"]["message"].as_str().unwrap());
    shot(&browser, "edit").await;

    // The dashboard, with its screenshot.
    browser.goto(&format!("{base}/#/")).await;
    browser
        .wait_text("#card-jobs", "the dashboard's jobs", |t| {
            t.contains("paused")
        })
        .await;
    browser.find("#runs-by-status").await;
    let png = browser.screenshot().await;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    if std::env::var_os("KREST_BLESS").is_some() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img/dashboard.png");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &png).unwrap();
    }

    // Log out: the login form is back, and the session no longer works.
    browser.click(&browser.find("#logout").await).await;
    krest_test_support::eventually(DEADLINE, "the login form after logout", || async {
        let hidden = browser
            .exec("return document.getElementById('login').hidden", json!([]))
            .await;
        (hidden == json!(false)).then_some(())
    })
    .await;
    browser.goto(&format!("{base}/#/jobs")).await;
    let token = browser.find("#login:not([hidden]) #token").await;

    // A read-only login sees the job but no control that writes.
    browser.fill(&token, READ).await;
    browser.click(&browser.find("#login-submit").await).await;
    browser
        .wait_text("#who", "the read-only session", |t| t == "read only")
        .await;
    browser.goto(&format!("{base}/#/jobs/ui.hello")).await;
    browser
        .wait_text("#view h1", "the job page", |t| t.contains("ui.hello"))
        .await;
    for control in [
        "#pause-job",
        "#resume-job",
        "#trigger-job",
        "#delete-job",
        "#edit-job",
    ] {
        assert!(
            browser.try_find(control).await.is_none(),
            "{control} shown to a reader"
        );
    }

    browser.close().await;
    gate.add_permits(100);
    worker.stop().await.unwrap();
}
