//! `krest job …`: apply (in [`super::apply`]), list, get, history, pause, resume, delete,
//! trigger (with `--wait`). Listings follow the API's pages to the end.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use krest_schemas::api::{
    JobHistoryRequest, JobListRequest, JobRequest, JobView, Op, RunDetail, RunRequest, RunStatus,
    TriggerRequest, TriggerResponse,
};

use super::args::JobCmd;
use super::client::{Client, ClientError};
use super::render::{esc, fmt_time, job_rows, print_json, table, JOB_HEADERS};

pub(crate) async fn job(client: &Client, cmd: JobCmd, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        JobCmd::Apply { files } => return super::apply::apply(client, &files, json).await,
        JobCmd::List { app, group } => {
            let jobs: Vec<JobView> = client
                .fetch_all(
                    Op::JobList,
                    |cursor, _| JobListRequest {
                        app: app.clone(),
                        group: group.clone(),
                        limit: None,
                        cursor,
                        ..Default::default()
                    },
                    None,
                )
                .await?;
            if json {
                print_json(&jobs)?;
            } else {
                table(&JOB_HEADERS, job_rows(&jobs))?;
            }
        }
        JobCmd::History { job } => {
            let revisions: Vec<krest_schemas::api::JobRevision> = client
                .fetch_all(
                    Op::JobHistory,
                    |cursor, _| JobHistoryRequest {
                        job: job.clone(),
                        limit: None,
                        cursor,
                    },
                    None,
                )
                .await?;
            if json {
                print_json(&revisions)?;
            } else {
                table(
                    &[
                        "REV",
                        "WRITTEN (UTC)",
                        "OP",
                        "CRON",
                        "STATE",
                        "PATH",
                        "ARGS",
                    ],
                    revisions
                        .iter()
                        .map(|r| {
                            let s = r.spec.as_ref();
                            vec![
                                r.revision.to_string(),
                                fmt_time(Some(r.written_at)),
                                r.operation.clone(),
                                s.and_then(|s| s.cron.clone()).unwrap_or_else(|| "-".into()),
                                s.map_or("-", |s| if s.running { "running" } else { "paused" })
                                    .to_string(),
                                s.map_or_else(|| "-".into(), |s| s.path.clone()),
                                s.map_or_else(|| "-".into(), |s| s.args.to_string())
                                    .chars()
                                    .take(40)
                                    .collect(),
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        JobCmd::Get { job, revision } => {
            let view: JobView = client
                .call(Op::JobGet, &JobRequest { job, revision })
                .await?;
            if json {
                print_json(&view)?;
            } else {
                table(&JOB_HEADERS, job_rows(std::slice::from_ref(&view)))?;
                outln!();
                for line in serde_json::to_string_pretty(&view.spec)?.lines() {
                    outln!("{}", esc(line));
                }
            }
        }
        JobCmd::Pause { job } => job_change(client, Op::JobPause, job, "paused", json).await?,
        JobCmd::Resume { job } => job_change(client, Op::JobResume, job, "resumed", json).await?,
        JobCmd::Delete { job } => job_change(client, Op::JobDelete, job, "deleted", json).await?,
        JobCmd::Trigger {
            job,
            args,
            wait,
            wait_timeout,
        } => {
            let args = match args {
                None => None,
                Some(a) => Some(krest_schemas::json::parse(a.as_bytes()).with_context(|| {
                    format!(
                        "--args must be JSON (quote strings: --args '\"text\"'); got `{}`",
                        krest_schemas::text::echo(&a)
                    )
                })?),
            };
            let request_id = Some(krest_schemas::names::new_request_id(chrono::Utc::now()));
            let resp: TriggerResponse = client
                .call(
                    Op::JobTrigger,
                    &TriggerRequest {
                        job,
                        args,
                        request_id,
                    },
                )
                .await?;
            if !wait {
                if json {
                    print_json(&resp)?;
                } else {
                    outln!(
                        "{} ({} shard{})",
                        resp.run_id,
                        resp.shard_total,
                        if resp.shard_total == 1 { "" } else { "s" }
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "{} dispatched; following it (ctrl-c stops following, not the run)",
                resp.run_id
            );
            let detail = follow(client, &resp.run_id, resp.shard_total, wait_timeout).await?;
            if json {
                print_json(&detail)?;
            } else {
                let r = &detail.run;
                outln!(
                    "{} {} ({}/{} shards succeeded{})",
                    r.run_id,
                    r.status.as_str(),
                    r.shards_succeeded,
                    r.shard_total,
                    r.error
                        .as_deref()
                        .map(|e| format!("; {}", esc(e)))
                        .unwrap_or_default()
                );
            }
            return Ok(if detail.run.status == RunStatus::Succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls a run until it ends, drawing its progress on stderr.
async fn follow(
    client: &Client,
    run_id: &str,
    shards: u32,
    timeout: Duration,
) -> anyhow::Result<RunDetail> {
    use std::io::IsTerminal as _;
    let tty = std::io::stderr().is_terminal();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let detail = match client
            .call::<_, RunDetail>(
                Op::RunsGet,
                &RunRequest {
                    run_id: run_id.to_string(),
                },
            )
            .await
        {
            Ok(d) => Some(d),
            // Not recorded yet.
            Err(ClientError::Api(e)) if e.code == krest_schemas::api::ErrorCode::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let (status, done, failed, total) =
            detail.as_ref().map_or(("PENDING", 0, 0, shards), |d| {
                (
                    d.run.status.as_str(),
                    d.run.shards_succeeded,
                    d.run.shards_failed,
                    d.run.shard_total.max(1),
                )
            });
        let width = 30usize;
        let filled = (done as usize * width) / total.max(1) as usize;
        let line = format!(
            "[{}{}] {done}/{total} shards {status}{}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        );
        if line != last {
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
            last = line;
        }
        if let Some(d) = detail.filter(|d| d.run.status.is_final()) {
            if tty {
                eprintln!();
            }
            return Ok(d);
        }
        if tokio::time::Instant::now() > deadline {
            if tty {
                eprintln!();
            }
            bail!("run {run_id} has not ended after {timeout:?}; it goes on (see `krest runs get {run_id}`)");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => bail!("stopped following {run_id}; the run goes on"),
        }
    }
}

async fn job_change(
    client: &Client,
    op: Op,
    job: String,
    verb: &str,
    json: bool,
) -> anyhow::Result<()> {
    let view: JobView = client.call(op, &JobRequest::new(job)).await?;
    if json {
        print_json(&view)?;
    } else {
        outln!("{} {verb} (revision {})", view.key, view.revision);
    }
    Ok(())
}
