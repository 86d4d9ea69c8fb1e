//! NATS logins (user/password, token, nkey, TLS client certificates) for nodes, workers and
//! the CLI, and what a refused login looks like.

use std::path::Path;
use std::process::Command;

use std::time::Duration;

use krest_test_support::{NatsServer, TestDir};
use krest_worker::nats::NatsConfig;
use krest_worker::JobContext;
use serde_json::json;

use crate::harness::*;

/// A nats-server started with `conf` (written into `dir`).
pub fn server_with(dir: &TestDir, conf: &str) -> NatsServer {
    let path = dir.join("auth.conf");
    std::fs::write(&path, conf).unwrap();
    NatsServer::start_with_args(&["-c", path.to_str().unwrap()])
}

/// The `krest` flags that log in as `cfg` does.
pub fn login_flags(cfg: &NatsConfig) -> Vec<String> {
    let mut args = vec!["--nats-url".to_string(), cfg.url.clone()];
    let mut flag = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            args.push(format!("--{name}"));
            args.push(v);
        }
    };
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    flag("user", cfg.user.clone());
    flag("password", cfg.password.clone());
    flag("token", cfg.token.clone());
    flag("creds", path(&cfg.creds));
    flag("nkey", cfg.nkey.clone());
    flag("tlscert", path(&cfg.tls_cert));
    flag("tlskey", path(&cfg.tls_key));
    flag("tlsca", path(&cfg.tls_ca));
    flag("inbox-prefix", cfg.inbox_prefix.clone());
    args
}

/// Runs `krest` logged in as `cfg`; returns (exit code, stdout, stderr).
pub fn cli_as(cfg: &NatsConfig, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_krest"))
        .env_remove("NATS_URL")
        .args(login_flags(cfg))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A node, a worker and the CLI, all logged in as `cfg`, run a job end to end; the node and
/// the worker keep running.
async fn end_to_end(
    env: &Env,
    cfg: &NatsConfig,
) -> (krest::node::RunningNode, krest_worker::RunningWorker) {
    let mut opts = env.node_opts("n1");
    opts.nats = cfg.clone();
    let node = krest::node::spawn(opts);
    let worker = env
        .worker("app", "w1")
        .nats(cfg.clone())
        .handler("p", |_ctx: JobContext| async move { Ok("done") })
        .build()
        .unwrap()
        .spawn();
    let file = env.write(
        "job.json",
        &json!({"appName": "app", "jobGroup": "t", "jobName": "j", "path": "p"}).to_string(),
    );
    let (code, out, err) =
        eventually_cli(cfg, &["job", "apply", "-f", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli_as(cfg, &["job", "trigger", "j", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("SUCCEEDED"), "{out}{err}");
    let (code, out, err) = cli_as(cfg, &["runs", "list", "--job", "j"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("SUCCEEDED"), "{out}");
    (node, worker)
}

/// Runs the CLI until a node answers (it may still be starting).
async fn eventually_cli(cfg: &NatsConfig, args: &[&str]) -> (i32, String, String) {
    krest_test_support::eventually(DEADLINE, "a node answering the CLI", || async {
        let r = cli_as(cfg, args);
        (!r.2.contains("no Krest scheduler node")).then_some(r)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password() {
    let env = Env::new("auth-user");
    let nats = server_with(
        &env.dir,
        r#"authorization { users = [ { user: krest, password: "s3cr3t-pw" } ] }"#,
    );
    let mut cfg = NatsConfig::new(nats.url());
    cfg.user = Some("krest".into());
    cfg.password = Some("s3cr3t-pw".into());
    let _running = end_to_end(&env, &cfg).await;
    // In the URL too.
    let url = NatsConfig::new(nats.url().replace("nats://", "nats://krest:s3cr3t-pw@"));
    let (code, out, err) = cli_as(&url, &["job", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("t.j"), "{out}");
}

/// Base64url without padding, as JWTs use it.
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A NATS JWT (v2) with `claims`, signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = b64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": format!("{:032X}", rand_id()),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", b64url(claims.to_string().as_bytes()));
    let sig = issuer.sign(body.as_bytes()).unwrap();
    format!("{body}.{}", b64url(&sig))
}

fn rand_id() -> u128 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(1);
    u128::from(h.finish()) << 64 | u128::from(std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file() {
    // A server in operator mode (decentralized JWT auth, as NGS and nsc set up), its account
    // with JetStream, and a user whose `.creds` file holds its JWT and seed.
    let env = Env::new("auth-creds");
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "krest-test",
        json!({"type": "operator", "version": 2}),
    );
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
    });
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "KREST",
        json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2}),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "krest-user",
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
               "type": "user", "version": 2}),
    );
    let nats = server_with(
        &env.dir,
        &format!(
            "operator: \"{operator_jwt}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{account_jwt}\"\n  {}: \"{system_jwt}\"\n}}\n",
            system.public_key(),
            account.public_key(),
            system.public_key()
        ),
    );
    let creds = env.write(
        "user.creds",
        &format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    );
    let mut cfg = NatsConfig::new(nats.url());
    cfg.creds = Some(creds);
    let _running = end_to_end(&env, &cfg).await;
    // Without the creds the server refuses, at once and by name.
    let (code, _, err) = cli_as(&NatsConfig::new(nats.url()), &["job", "list"]);
    assert_eq!(code, 1);
    assert!(err.to_lowercase().contains("authorization"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token() {
    let env = Env::new("auth-token");
    let nats = server_with(&env.dir, r#"authorization { token: "t0ken-s3cret" }"#);
    let mut cfg = NatsConfig::new(nats.url());
    cfg.token = Some("t0ken-s3cret".into());
    let _running = end_to_end(&env, &cfg).await;
    let url = NatsConfig::new(nats.url().replace("nats://", "nats://t0ken-s3cret@"));
    let (code, _, err) = cli_as(&url, &["job", "list"]);
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey() {
    let env = Env::new("auth-nkey");
    let user = nkeys::KeyPair::new_user();
    let nats = server_with(
        &env.dir,
        &format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}",
            user.public_key()
        ),
    );
    let seed_file = env.write("user.nk", &format!("{}\n", user.seed().unwrap()));
    let mut cfg = NatsConfig::new(nats.url());
    cfg.nkey = Some(seed_file.display().to_string());
    let _running = end_to_end(&env, &cfg).await;
    // The seed itself works too.
    cfg.nkey = Some(user.seed().unwrap());
    let (code, _, err) = cli_as(&cfg, &["job", "list"]);
    assert_eq!(code, 0, "{err}");
    // Another key is refused, naming the key (its public part).
    let other = nkeys::KeyPair::new_user();
    cfg.nkey = Some(other.seed().unwrap());
    let (code, _, err) = cli_as(&cfg, &["job", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains(&other.public_key()), "{err}");
    assert!(err.contains("authorization violation"), "{err}");
    assert!(!err.contains(&other.seed().unwrap()), "{err}");
}

/// A throwaway CA and a server and a client certificate signed by it, made with the `openssl`
/// command: (ca, server cert, server key, client cert, client key).
pub fn certificates(dir: &Path) -> [std::path::PathBuf; 5] {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=krest-test-ca"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca);
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let mut req = vec!["req", "-subj"];
        let subject = format!("/CN=krest-test-{name}");
        req.push(&subject);
        req.extend(ec);
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        req.extend(["-keyout", &key, "-out", &csr]);
        openssl(&req);
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        let pem = format!("{name}.pem");
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }
    [
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ]
    .map(|f| dir.join(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let env = Env::new("auth-tls");
    let [ca, server_cert, server_key, client_cert, client_key] = certificates(env.dir.path());
    let nats = server_with(
        &env.dir,
        &format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 2 }}",
            server_cert.display().to_string(),
            server_key.display().to_string(),
            ca.display().to_string()
        ),
    );
    let mut cfg = NatsConfig::new(nats.url());
    cfg.tls_ca = Some(ca.clone());
    cfg.tls_cert = Some(client_cert);
    cfg.tls_key = Some(client_key);
    let _running = end_to_end(&env, &cfg).await;
    // Without the CA, the server's certificate is not trusted: a TLS error, at once.
    let mut no_ca = cfg.clone();
    no_ca.tls_ca = None;
    let (code, _, err) = cli_as(&no_ca, &["job", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("TLS with NATS at"), "{err}");
    // A CA file that cannot be read is named.
    let mut bad = cfg.clone();
    bad.tls_ca = Some(env.dir.join("missing-ca.pem"));
    let (code, _, err) = cli_as(&bad, &["job", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("missing-ca.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_fails_at_once_with_what_to_check() {
    let env = Env::new("auth-refused");
    let nats = server_with(
        &env.dir,
        r#"authorization { users = [ { user: krest, password: "right-pw" } ] }"#,
    );
    let mut cfg = NatsConfig::new(nats.url());
    cfg.user = Some("krest".into());
    cfg.password = Some("wrong-pw".into());

    // The CLI.
    let started = std::time::Instant::now();
    let (code, _, err) = cli_as(&cfg, &["job", "list"]);
    eprintln!("CLI refused after {:?}", started.elapsed());
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "NATS at {} refused user 'krest': authorization violation — check NATS_USER/NATS_PASSWORD",
            nats.url()
        )),
        "{err}"
    );
    assert!(!err.contains("wrong-pw"), "{err}");
    // No credentials at all.
    let (code, _, err) = cli_as(&NatsConfig::new(nats.url()), &["job", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("the server requires a login"), "{err}");
    // A credentials file that cannot be read is named.
    let mut creds = NatsConfig::new(nats.url());
    creds.creds = Some(env.dir.join("nope.creds"));
    let (code, _, err) = cli_as(&creds, &["job", "list"]);
    assert_eq!(code, 1);
    assert!(err.contains("nope.creds"), "{err}");

    // A node stops with the error instead of retrying.
    let mut opts = env.node_opts("n1");
    opts.nats = cfg.clone();
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(DEADLINE, krest::node::spawn(opts).ended())
        .await
        .expect("the node gave up")
        .unwrap_err()
        .to_string();
    eprintln!("node refused after {:?}", started.elapsed());
    assert!(e.contains("refused user 'krest'"), "{e}");
    assert!(!e.contains("wrong-pw"), "{e}");

    // So does a worker.
    let started = std::time::Instant::now();
    let worker = env
        .worker("app", "w1")
        .nats(cfg.clone())
        .handler("p", |_ctx: JobContext| async move { Ok(()) })
        .build()
        .unwrap();
    let e = tokio::time::timeout(DEADLINE, worker.run(std::future::pending()))
        .await
        .expect("the worker gave up")
        .unwrap_err();
    eprintln!("worker refused after {:?}", started.elapsed());
    assert_eq!(e.kind(), krest_worker::ErrorKind::Config);
    assert!(
        e.to_string().contains("check NATS_USER/NATS_PASSWORD"),
        "{e}"
    );

    // And `krest scheduler` exits non-zero saying so.
    let out = Command::new(env!("CARGO_BIN_EXE_krest"))
        .args(login_flags(&cfg))
        .args(["scheduler", "--db", &env.db("n2"), "--http", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("refused user 'krest'"), "{err}");
    assert!(!err.contains("wrong-pw"), "{err}");
}

/// Passwords of the roles in `nats/accounts.conf` (test values).
const ROLES: [(&str, &str); 6] = [
    ("KREST_SCHEDULER_PASSWORD", "sched-pw"),
    ("KREST_OPERATOR_PASSWORD", "oper-pw"),
    ("KREST_VIEWER_PASSWORD", "view-pw"),
    ("KREST_BILLING_PASSWORD", "bill-pw"),
    ("KREST_SHIPPING_PASSWORD", "ship-pw"),
    ("KREST_SYS_PASSWORD", "sys-pw"),
];

/// A server with the repository's `nats/accounts.conf` (passwords filled in, a second app
/// `shipping` added the way its comment says).
fn server_with_roles(env: &Env) -> NatsServer {
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nats/accounts.conf");
    let mut conf = std::fs::read_to_string(repo).unwrap();
    // "To add an app, copy this entry and replace every `billing` with the app's name."
    let start = conf.find("      { user: billing").unwrap();
    let end = start + conf[start..].find("\n    ]\n").unwrap();
    let shipping = conf[start..end]
        .replace("billing", "shipping")
        .replace("BILLING", "SHIPPING");
    conf.insert_str(end, &format!("\n{shipping}"));
    for (var, pw) in ROLES {
        conf = conf.replace(&format!("${var}"), &format!("\"{pw}\""));
    }
    std::fs::write(env.dir.join("accounts.conf"), conf).unwrap();
    server_with(&env.dir, "include accounts.conf\n")
}

fn role(nats: &NatsServer, user: &str) -> NatsConfig {
    let pw = match user {
        "scheduler" => "sched-pw",
        "operator" => "oper-pw",
        "viewer" => "view-pw",
        "billing" => "bill-pw",
        "shipping" => "ship-pw",
        _ => unreachable!(),
    };
    let mut cfg = NatsConfig::new(nats.url());
    cfg.user = Some(user.into());
    cfg.password = Some(pw.into());
    if matches!(user, "billing" | "shipping") {
        // What the SDK's workers use by default, and all their permissions allow.
        cfg.inbox_prefix = Some(format!("_INBOX_{user}"));
    }
    cfg
}

/// A raw connection as `cfg` that collects the server's permission violations.
async fn raw(
    cfg: &NatsConfig,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = cfg
        .connect_tuned(krest_worker::nats::ConnectStyle::Service, move |o| {
            o.event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = tx.send(e.to_string());
                    }
                }
            })
        })
        .await
        .unwrap();
    (client, rx)
}

/// Publishes on `subject` and waits for the server to refuse it.
async fn assert_denied(
    client: &async_nats::Client,
    violations: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    subject: &str,
) {
    client
        .publish(subject.to_string(), "{}".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let wanted = format!("Permissions Violation for Publish to \"{subject}\"");
    loop {
        let v = tokio::time::timeout(DEADLINE, violations.recv())
            .await
            .unwrap_or_else(|_| panic!("no violation for {subject}"))
            .unwrap();
        if v.contains(&wanted) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn roles_have_least_privilege() {
    use krest::cli::client::{Client, ClientError};
    use krest_schemas::api::{Op, RunStatus};
    let env = Env::new("auth-roles");
    let nats = server_with_roles(&env);

    // The full flow with the roles: node as scheduler, worker as billing, CLI as operator.
    let mut opts = env.node_opts("n1");
    opts.nats = role(&nats, "scheduler");
    let node = krest::node::spawn(opts);
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let worker = env
        .worker("billing", "w1")
        .nats(role(&nats, "billing"))
        .handler("bill", move |ctx: JobContext| {
            let gate = held.clone();
            async move {
                if ctx.args() == &json!("wait") {
                    gate.acquire().await.unwrap().forget();
                }
                Ok("billed")
            }
        })
        .build()
        .unwrap()
        .spawn();
    let operator = role(&nats, "operator");
    let file = env.write(
        "jobs.json",
        &json!([
            {"appName": "billing", "jobGroup": "t", "jobName": "bill", "path": "bill"},
            {"appName": "shipping", "jobGroup": "t", "jobName": "ship", "path": "ship"}
        ])
        .to_string(),
    );
    let (code, out, err) =
        eventually_cli(&operator, &["job", "apply", "-f", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli_as(&operator, &["job", "trigger", "bill", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("SUCCEEDED"), "{out}{err}");

    // A viewer reads, and is told clearly that it may not change anything.
    let viewer = role(&nats, "viewer");
    let (code, out, err) = cli_as(&viewer, &["job", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("t.bill"), "{out}");
    let (code, out, err) = cli_as(&viewer, &["runs", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("SUCCEEDED"), "{out}");
    // ... follows runs: their logs, and the events stream replayed.
    let (code, out, err) = cli_as(&viewer, &["-o", "json", "runs", "list"]);
    assert_eq!(code, 0, "{err}");
    let runs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let run_id = runs[0]["runId"].as_str().unwrap().to_string();
    let (code, _, err) = cli_as(&viewer, &["runs", "logs", &run_id]);
    assert_eq!(code, 0, "{err}");
    let mut watch = Command::new(env!("CARGO_BIN_EXE_krest"));
    watch
        .env_remove("NATS_URL")
        .args(login_flags(&viewer))
        .args(["runs", "watch", "--since", "1h"]);
    first_line(watch, Output::Stdout, |l| l.contains(" finished ")).await;

    let (code, _, err) = cli_as(&viewer, &["job", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("Permissions Violation for Publish to \"krest.api.job.apply\""),
        "{err}"
    );
    assert!(
        err.contains("permissions do not allow this operation"),
        "{err}"
    );
    let (code, _, err) = cli_as(&viewer, &["job", "trigger", "bill"]);
    assert_eq!(code, 1);
    assert!(err.contains("krest.api.job.trigger"), "{err}");

    // A worker of billing may not use the API (apply, delete) ...
    let as_billing = Client::connect_with(&role(&nats, "billing"), Duration::from_secs(5))
        .await
        .unwrap();
    for (op, req) in [
        (Op::JobApply, json!({"documents": []})),
        (Op::JobDelete, json!({"job": "t.ship"})),
    ] {
        match as_billing.call_value(op, &req).await {
            Err(ClientError::Permission { violation, .. }) => {
                assert!(violation.contains(op.name()), "{violation}")
            }
            other => panic!("{} as billing: {other:?}", op.name()),
        }
    }
    // ... nor write definitions, the leader key, another app's heartbeats or events, nor
    // an advisory that would dead-letter runs.
    let (billing, mut violations) = raw(&role(&nats, "billing")).await;
    for subject in [
        "$KV.krest-jobs.t.ship",
        "$KV.krest-leader.leader",
        "$KV.krest-state.t.ship",
        "$KV.krest-cancels.t.ship.1",
        "$KV.krest-workers.shipping.w9",
        "krest.events.shipping.t.ship",
        "krest.work.shipping.t.ship.r",
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.KREST_WORK.krest-app-shipping",
        "$JS.API.STREAM.MSG.DELETE.KREST_WORK",
        "$JS.API.STREAM.PURGE.KREST_WORK",
        "$JS.API.DIRECT.GET.KV_krest-secrets.$KV.krest-secrets.delivery",
    ] {
        assert_denied(&billing, &mut violations, subject).await;
    }

    // A forged early `finished` (billing may publish its own app's events) does not drop or
    // replace the real result: it lacks the run's delivery token.
    let client = Client::connect_with(&operator, Duration::from_secs(5))
        .await
        .unwrap();
    let run_id = krest_test_support::eventually(DEADLINE, "a trigger", || async {
        client
            .call::<_, krest_schemas::api::TriggerResponse>(
                Op::JobTrigger,
                &json!({"job": "t.bill", "args": "wait"}),
            )
            .await
            .ok()
    })
    .await
    .run_id;
    krest_test_support::eventually(DEADLINE, "the run to start", || async {
        run(&client, &run_id)
            .await
            .filter(|d| d.run.status == RunStatus::Running)
    })
    .await;
    let js = async_nats::jetstream::new(billing.clone());
    let forged = |token: &str| {
        krest_schemas::RunEvent::Finished(krest_schemas::Finished {
            run: krest_schemas::RunRef {
                run_id: run_id.clone(),
                job_group: "t".into(),
                job_name: "bill".into(),
                app_name: "billing".into(),
            },
            shard: 0,
            shard_total: 1,
            attempt: 1,
            worker: "w1".into(),
            at: chrono::Utc::now(),
            outcome: krest_schemas::AttemptOutcome::Failed,
            will_retry: false,
            retry_in_ms: None,
            output: None,
            error: Some("forged".into()),
            duration_ms: 1,
            delivery_token: token.into(),
            started_at: None,
            scheduled_at: None,
        })
    };
    for e in [forged(""), forged("00000000000000000000000000000000")] {
        js.publish_with_headers(
            e.subject(),
            {
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", e.msg_id().as_str());
                h
            },
            serde_json::to_vec(&e).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // The first forgery took the id the real result had before delivery tokens.
    gate.add_permits(1);
    let done = wait_final(&client, &run_id).await;
    assert_eq!(done.run.status, RunStatus::Succeeded, "{done:?}");
    assert_eq!(done.attempts.len(), 1, "{done:?}");

    // A hand-off to the router without the token (billing may publish its hand-offs) is
    // refused too: it would run the job again.
    let handoff = json!({
        "runId": "t.bill.m-forged", "jobGroup": "t", "jobName": "bill", "appName": "billing",
        "path": "bill", "jobType": "NORMAL", "args": null, "scheduledAt": chrono::Utc::now(),
        "dispatchedAt": chrono::Utc::now(), "trigger": "MANUAL", "retryTimes": 0, "revision": 1
    });
    js.publish(
        krest_schemas::names::work_router_subject("billing", "t", "bill"),
        serde_json::to_vec(&handoff).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Nor is a `dispatched` event (it would make a run appear): only nodes can sign those.
    let dispatched = krest_schemas::RunEvent::Dispatched(krest_schemas::Dispatched {
        run: krest_schemas::RunRef {
            run_id: "t.bill.m-phantom".into(),
            job_group: "t".into(),
            job_name: "bill".into(),
            app_name: "billing".into(),
        },
        path: "bill".into(),
        job_type: krest_schemas::JobType::Normal,
        trigger: krest_schemas::Trigger::Manual,
        scheduled_at: chrono::Utc::now(),
        dispatched_at: chrono::Utc::now(),
        shard_total: 1,
        args: json!(null),
        misfired: 0,
        parent_run_id: None,
        revision: 1,
        node: "n1".into(),
        epoch: None,
    });
    js.publish(
        dispatched.subject(),
        serde_json::to_vec(&dispatched).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    krest_test_support::eventually(DEADLINE, "the forgeries parked", || async {
        let (_, out, _) = cli_as(&operator, &["dlq", "list"]);
        (out.contains("without the run's delivery token")
            && out.contains("hand-off of run t.bill.m-forged shard 0 refused")
            && out.contains("run t.bill.m-phantom without a scheduler node's token"))
        .then_some(())
    })
    .await;
    assert!(run(&client, "t.bill.m-phantom").await.is_none());
    assert!(!out.contains("forged\""), "{out}");
    assert!(run(&client, "t.bill.m-forged").await.is_none());

    worker.stop().await.unwrap();
    node.stop().await.unwrap();
}

#[test]
fn the_shipped_secure_configs_are_valid() {
    let nats = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nats");
    for conf in [
        "single-secure.conf",
        "cluster/n1-secure.conf",
        "cluster/n2-secure.conf",
        "cluster/n3-secure.conf",
    ] {
        let out = Command::new(krest_test_support::nats_server_binary())
            .args(["-t", "-c"])
            .arg(nats.join(conf))
            .envs(ROLES)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{conf}: {text}");
        assert!(text.contains("is valid"), "{conf}: {text}");
    }
    // No password has a default: a variable left unset stops the server.
    let mut cmd = Command::new(krest_test_support::nats_server_binary());
    cmd.args(["-t", "-c"]).arg(nats.join("single-secure.conf"));
    for (var, _) in ROLES {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("KREST_"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
