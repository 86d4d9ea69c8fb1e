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
use super::render::{esc, jobs_table, print_json, revisions_table};

pub(crate) async fn job(client: &Client, cmd: JobCmd, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        JobCmd::Apply { files, dry_run } => {
            return super::apply::apply(client, &files, json, dry_run).await
        }
        JobCmd::Edit { job } => return edit(client, &job, json).await,
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
                jobs_table(&jobs).print()?;
            }
        }
        JobCmd::Stats { job, recent } => {
            let stats: krest_schemas::api::JobStats = client
                .call(
                    Op::JobStats,
                    &krest_schemas::api::JobStatsRequest {
                        job,
                        recent: Some(recent),
                    },
                )
                .await?;
            if json {
                print_json(&stats)?;
            } else {
                super::render::print_job_stats(&stats)?;
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
                revisions_table(&revisions).print()?;
            }
        }
        JobCmd::Get { job, revision } => {
            let view: JobView = client
                .call(
                    Op::JobGet,
                    &JobRequest {
                        job,
                        revision,
                        request_id: None,
                    },
                )
                .await?;
            if json {
                print_json(&view)?;
            } else {
                jobs_table(std::slice::from_ref(&view)).print()?;
                outln!();
                for line in serde_json::to_string_pretty(&view.spec)?.lines() {
                    outln!("{}", esc(line));
                }
            }
        }
        JobCmd::Pause { job } => {
            job_change(client, Op::JobPause, JobRequest::new(job), "paused", json).await?
        }
        JobCmd::Resume { job } => {
            job_change(client, Op::JobResume, JobRequest::new(job), "resumed", json).await?
        }
        JobCmd::Delete { job } => {
            job_change(
                client,
                Op::JobDelete,
                JobRequest::delete(job),
                "deleted",
                json,
            )
            .await?
        }
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
            let name = job.clone();
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
            if let Ok(view) = client
                .call::<_, JobView>(Op::JobGet, &JobRequest::new(name.as_str()))
                .await
            {
                super::warn_without_workers(client, [(view.spec.app_name.to_string(), view.key)])
                    .await;
            }
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

/// Polls a run until it ends, drawing its progress on stderr: a bar on a terminal, a line per
/// change otherwise (logs, CI).
async fn follow(
    client: &Client,
    run_id: &str,
    shards: u32,
    timeout: Duration,
) -> anyhow::Result<RunDetail> {
    use std::io::IsTerminal as _;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(u64::from(shards.max(1)));
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} shards {msg}")
        {
            bar.set_style(style.progress_chars("#>-"));
        }
        bar
    });
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
        let msg = if failed > 0 {
            format!("{status}, {failed} failed")
        } else {
            status.to_string()
        };
        match &bar {
            Some(bar) => {
                bar.set_length(u64::from(total));
                bar.set_position(u64::from(done));
                bar.set_message(msg);
            }
            None => {
                let line = format!("{done}/{total} shards {msg}");
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
            }
        }
        let finish = || {
            if let Some(bar) = &bar {
                bar.abandon();
            }
        };
        if let Some(d) = detail.filter(|d| d.run.status.is_final()) {
            finish();
            return Ok(d);
        }
        if tokio::time::Instant::now() > deadline {
            finish();
            bail!("run {run_id} has not ended after {timeout:?}; it goes on (see `krest runs get {run_id}`)");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => {
                finish();
                bail!("stopped following {run_id}; the run goes on")
            }
        }
    }
}

/// `krest job edit`: the definition in an editor, checked and applied when it exits.
async fn edit(client: &Client, job: &str, json: bool) -> anyhow::Result<ExitCode> {
    let view: JobView = client.call(Op::JobGet, &JobRequest::new(job)).await?;
    let original = format!("{}\n", serde_json::to_string_pretty(&view.spec)?);
    let path = std::env::temp_dir().join(format!(
        "krest-edit-{}-{}.json",
        view.key,
        std::process::id()
    ));
    // A new file (never one already there, such as a link planted in a shared /tmp).
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, original.as_bytes()))
        .with_context(|| format!("cannot create {} for editing", path.display()))?;
    let editor = ["VISUAL", "EDITOR"]
        .into_iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|e| !e.trim().is_empty())
        .unwrap_or_else(|| "vi".to_string());
    // Through the shell, so an editor with arguments (`code --wait`) works.
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&path)
        .status()
        .with_context(|| format!("cannot run the editor `{editor}` (set VISUAL or EDITOR)"))?;
    let keep = |why: String| -> anyhow::Result<ExitCode> {
        eprintln!("error: {why}");
        eprintln!(
            "your edit is kept in {p}; fix it and run `krest job apply -f {p}`",
            p = path.display()
        );
        Ok(ExitCode::FAILURE)
    };
    if !status.success() {
        return keep(format!(
            "the editor `{editor}` exited with {status}; nothing was applied"
        ));
    }
    let edited = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if edited == original.as_bytes() {
        let _ = std::fs::remove_file(&path);
        eprintln!("no changes; nothing was applied");
        return Ok(ExitCode::SUCCESS);
    }
    let spec = match krest_schemas::json::parse(&edited)
        .map_err(|e| e.to_string())
        .and_then(|doc| krest_schemas::job::parse_job(&doc).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => return keep(format!("the edited definition is invalid: {e}")),
    };
    if spec.key() != view.key {
        return keep(format!(
            "the edit changes the job from {} to {}: `job edit` does not rename or copy jobs (apply the file to create {})",
            view.key,
            spec.key(),
            spec.key()
        ));
    }
    let code = super::apply::apply(client, std::slice::from_ref(&path), json, false).await?;
    if code == ExitCode::SUCCESS {
        let _ = std::fs::remove_file(&path);
    } else {
        eprintln!("your edit is kept in {}", path.display());
    }
    Ok(code)
}

async fn job_change(
    client: &Client,
    op: Op,
    req: JobRequest,
    verb: &str,
    json: bool,
) -> anyhow::Result<()> {
    let view: JobView = client.call(op, &req).await?;
    if json {
        print_json(&view)?;
    } else {
        outln!("{} {verb} (revision {})", view.key, view.revision);
    }
    Ok(())
}
