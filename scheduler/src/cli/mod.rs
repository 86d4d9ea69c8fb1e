//! The `krest` command line. Parsing is in two stages: [`args`] holds the flags as close to the
//! command line as possible; the command modules ([`job`], [`runs`], and the inspections here)
//! turn them into API requests through [`client`] and print with [`render`]. Data goes to
//! stdout, messages to stderr. Listings follow the API's pages ([`client::Client::fetch_all`])
//! and `runs get` fetches every page of a run, so output is whole however large the data.

/// `println!` that reports a closed stdout (`krest … | head`) as an error instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*)?;
    }};
}

mod apply;
pub mod args;
pub mod client;
pub mod config;
mod job;
mod render;
mod runs;
mod worker;

use std::process::ExitCode;

use chrono::Utc;
use krest_schemas::api::{ClusterStatus, DlqListRequest, Op, WorkersListRequest};
use krest_schemas::cron::parse_time_zone;
use krest_schemas::{CronSchedule, WorkerInfo};

pub use args::{Cli, Command, Format};
use args::{ClusterCmd, CronCmd, DlqCmd, WorkersCmd};
use client::{Client, ClientError};
use render::{esc, fmt_time, print_json};
pub use worker::run_worker;

/// Runs a client command; returns the exit code.
pub async fn run_client(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Cron(CronCmd::Next { expr, tz, count }) = &cli.command {
        let tz = parse_time_zone(tz).map_err(anyhow::Error::msg)?;
        let s = CronSchedule::new(expr, tz)?;
        let mut t = Utc::now();
        let mut out = Vec::new();
        for _ in 0..*count {
            match s.next_after(t) {
                Some(n) => {
                    out.push(n);
                    t = n;
                }
                None => break,
            }
        }
        if cli.output == Format::Json {
            print_json(&out)?;
        } else {
            for t in out {
                outln!(
                    "{}  ({})",
                    t.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S %Z"),
                    t.format("%Y-%m-%dT%H:%M:%SZ")
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let client = Client::connect_with(&cli.nats.config(&cli.nats_url), cli.timeout).await?;
    let json = cli.output == Format::Json;
    match cli.command {
        Command::Scheduler(_)
        | Command::Cron(_)
        | Command::Worker(_)
        | Command::Completion { .. }
        | Command::Health(_)
        | Command::Man => {
            unreachable!("handled elsewhere")
        }
        Command::Job(cmd) => job::job(&client, cmd, json).await,
        Command::Runs(cmd) => runs::runs(&client, cmd, json).await,
        Command::Workers(WorkersCmd::List { app }) => {
            let workers = live_workers(&client, app.as_deref()).await?;
            if json {
                print_json(&workers)?;
            } else {
                render::workers_table(&workers, Utc::now()).print()?;
                if let (Some(app), true) = (app, workers.is_empty()) {
                    eprintln!("no worker of app {} is running", esc(&app));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq(DlqCmd::List { limit }) => {
            let letters: Vec<krest_schemas::api::DeadLetter> = client
                .fetch_all(
                    Op::DlqList,
                    |cursor, wanted| DlqListRequest {
                        limit: wanted.map(|w| w.min(1000) as u32),
                        cursor,
                    },
                    (limit > 0).then_some(limit as usize),
                )
                .await?;
            if json {
                print_json(&letters)?;
            } else {
                render::dead_letters_table(&letters).print()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster(ClusterCmd::Status) => {
            let status: ClusterStatus = client
                .call(Op::ClusterStatus, &serde_json::json!({}))
                .await?;
            if json {
                print_json(&status)?;
            } else {
                match &status.leader {
                    Some(l) => outln!(
                        "leader: {} (epoch {}, since {})",
                        l.node,
                        l.epoch,
                        fmt_time(Some(l.acquired_at))
                    ),
                    None => outln!("leader: none"),
                }
                outln!("nats-server: {}", status.nats_server);
                render::nodes_table(&status.nodes).print()?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Every live worker instance (of `app` only, if given).
pub(crate) async fn live_workers(
    client: &Client,
    app: Option<&str>,
) -> Result<Vec<WorkerInfo>, ClientError> {
    client
        .fetch_all(
            Op::WorkersList,
            |cursor, _| WorkersListRequest {
                app: app.map(str::to_string),
                limit: None,
                cursor,
            },
            None,
        )
        .await
}

/// Warns on stderr about each app of `apps` (with one of its jobs) that has no live worker:
/// its runs would wait as PENDING until one starts.
pub(crate) async fn warn_without_workers(
    client: &Client,
    apps: impl IntoIterator<Item = (String, String)>,
) {
    let apps: std::collections::BTreeMap<String, String> = apps.into_iter().collect();
    if apps.is_empty() {
        return;
    }
    let Ok(workers) = live_workers(client, None).await else {
        return;
    };
    for (app, job) in apps {
        if !workers.iter().any(|w| w.app_name == app) {
            eprintln!(
                "warning: no worker of app {} is running: runs of {} wait as PENDING until one starts (see `krest workers list`)",
                esc(&app),
                esc(&job)
            );
        }
    }
}

/// `krest health`: GETs `/healthz` (or `/readyz`) on a node's HTTP address; exit code 0 on 200.
pub async fn health(
    args: &args::HealthArgs,
    timeout: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    // `0.0.0.0:8722` (what a node in a container listens on) is asked on loopback.
    let addr = args.http.replace("0.0.0.0", "127.0.0.1");
    let path = if args.ready { "readyz" } else { "healthz" };
    let url = format!("http://{addr}/{path}");
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot make an HTTP client: {e}"))?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("no answer from {url}: {}", e.without_url()))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    outln!("{}", render::esc(body.trim()));
    if status.is_success() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{url} answered {status}");
        Ok(ExitCode::FAILURE)
    }
}

/// The manual page, generated from the command line's definition (roff).
pub fn man_page() -> std::io::Result<Vec<u8>> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
    Ok(out)
}

/// Prints an error for humans, with every invalid document's problems (escaped: errors echo
/// user input).
pub fn report(err: &anyhow::Error) {
    if let Some(ClientError::Api(api)) = err.downcast_ref::<ClientError>() {
        eprintln!("error: {}", esc(&api.message));
        for doc in &api.invalid {
            let name = doc.job.as_deref().unwrap_or("?");
            eprintln!("  document {} ({}):", doc.index, esc(name));
            for p in &doc.problems {
                eprintln!("    - {}", esc(&p.to_string()));
            }
        }
        return;
    }
    eprintln!("error: {}", esc(&format!("{err:#}")));
}
