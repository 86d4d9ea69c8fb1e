//! `krest runs …`: list, get, cancel, watch. `runs get` fetches every page of a run
//! ([`run_detail`]).

use std::process::ExitCode;

use anyhow::{bail, Context as _};
use futures_util::StreamExt;
use krest_schemas::api::{
    Op, RunDetail, RunGetRequest, RunRequest, RunStatus, RunSummary, RunsListRequest,
};
use krest_schemas::names::EVENTS_SUBJECTS;
use krest_schemas::RunEvent;

use super::args::RunsCmd;
use super::client::{Client, ClientError};
use super::render::{esc, fmt_time, print_json, table};

pub(crate) async fn runs(client: &Client, cmd: RunsCmd, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        RunsCmd::List { job, status, limit } => {
            let status = match status {
                None => None,
                Some(s) => Some(RunStatus::parse(&s).with_context(|| {
                    format!(
                        "unknown status `{}`: use PENDING, RUNNING, SUCCEEDED, FAILED, TIMED_OUT, SKIPPED or CANCELLED",
                        krest_schemas::text::echo(&s)
                    )
                })?),
            };
            let runs: Vec<RunSummary> = client
                .fetch_all(
                    Op::RunsList,
                    |cursor, wanted| RunsListRequest {
                        job: job.clone(),
                        status,
                        limit: wanted.map(|w| w.min(1000) as u32),
                        cursor,
                    },
                    Some(limit as usize),
                )
                .await?;
            if let Some(c) = client.take_catching_up() {
                eprintln!("notice: {}", esc(&c.to_string()));
            }
            if json {
                print_json(&runs)?;
            } else {
                table(
                    &[
                        "RUN",
                        "STATUS",
                        "TRIGGER",
                        "SCHEDULED (UTC)",
                        "SHARDS",
                        "ATTEMPTS",
                        "FINISHED (UTC)",
                        "RESULT",
                    ],
                    runs.iter()
                        .map(|r| {
                            vec![
                                r.run_id.clone(),
                                r.status.as_str().to_string(),
                                r.trigger.map_or("-", |t| t.as_str()).to_string(),
                                fmt_time(r.scheduled_at),
                                format!("{}/{}", r.shards_succeeded, r.shard_total),
                                r.attempts.to_string(),
                                fmt_time(r.finished_at),
                                r.error
                                    .clone()
                                    .or_else(|| r.output.clone())
                                    .unwrap_or_default()
                                    .chars()
                                    .take(60)
                                    .collect(),
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        RunsCmd::Get { run_id } => {
            let d = run_detail(client, &run_id).await?;
            if let Some(c) = client.take_catching_up() {
                eprintln!("notice: {}", esc(&c.to_string()));
            }
            if json {
                print_json(&d)?;
            } else {
                // Every line goes through `esc`: run ids, args, outputs, errors and log lines
                // are data.
                macro_rules! outln {
                    () => {{
                        use std::io::Write as _;
                        writeln!(std::io::stdout())?;
                    }};
                    ($($t:tt)*) => {{
                        use std::io::Write as _;
                        writeln!(std::io::stdout(), "{}", esc(&format!($($t)*)))?;
                    }};
                }
                let r = &d.run;
                outln!("run:        {}", r.run_id);
                outln!(
                    "job:        {}.{} (app {})",
                    r.job_group,
                    r.job_name,
                    r.app_name
                );
                outln!("status:     {}", r.status.as_str());
                outln!(
                    "trigger:    {}{}",
                    r.trigger.map_or("-", |t| t.as_str()),
                    if r.misfired > 0 {
                        format!(" (stands for {} misfired fires)", r.misfired)
                    } else {
                        String::new()
                    }
                );
                outln!("scheduled:  {}", fmt_time(r.scheduled_at));
                outln!(
                    "dispatched: {}{}{}",
                    fmt_time(r.dispatched_at),
                    r.node
                        .as_deref()
                        .map(|n| format!(" by {n}"))
                        .unwrap_or_default(),
                    r.epoch
                        .map(|e| format!(" (leader epoch {e})"))
                        .unwrap_or_default()
                );
                outln!("started:    {}", fmt_time(r.started_at));
                outln!("finished:   {}", fmt_time(r.finished_at));
                outln!(
                    "shards:     {} succeeded, {} failed, {} in all",
                    r.shards_succeeded,
                    r.shards_failed,
                    r.shard_total
                );
                if let Some(args) = &d.args {
                    outln!("args:       {args}");
                }
                for a in &d.attempts {
                    outln!();
                    outln!(
                        "shard {} attempt {}: {:?}{} on {} ({} → {})",
                        a.shard,
                        a.attempt,
                        a.status,
                        if a.will_retry { ", will retry" } else { "" },
                        a.worker.as_deref().unwrap_or("-"),
                        fmt_time(a.started_at),
                        fmt_time(a.finished_at)
                    );
                    if let Some(o) = &a.output {
                        outln!("  output: {o}");
                    }
                    if let Some(e) = &a.error {
                        outln!("  error:  {e}");
                    }
                    for l in &a.logs {
                        outln!(
                            "  {} {:<5} {}",
                            l.at.format("%H:%M:%S%.3f"),
                            l.level.as_str(),
                            l.line
                        );
                    }
                }
            }
        }
        RunsCmd::Cancel { run_id } => {
            let resp: krest_schemas::api::CancelResponse =
                client.call(Op::RunsCancel, &RunRequest { run_id }).await?;
            if json {
                print_json(&resp)?;
            } else {
                outln!(
                    "{} cancelling (was {}); the workers of {} were told",
                    resp.run_id,
                    resp.status_before.as_str(),
                    resp.app_name
                );
            }
        }
        RunsCmd::Watch { job } => {
            let subject = match &job {
                Some(j) => match j.split_once('.') {
                    Some((g, n)) => krest_schemas::names::events_subject(g, n),
                    None => bail!("--job takes `group.name` here"),
                },
                None => EVENTS_SUBJECTS.to_string(),
            };
            let mut sub = client
                .nats()
                .subscribe(subject)
                .await
                .map_err(|e| ClientError::Other(e.to_string()))?;
            eprintln!("following run events (ctrl-c to stop)");
            loop {
                let msg = tokio::select! {
                    m = sub.next() => match m { Some(m) => m, None => break },
                    _ = tokio::signal::ctrl_c() => break,
                };
                let Ok(event) = serde_json::from_slice::<RunEvent>(&msg.payload) else {
                    continue;
                };
                // Events come straight from NATS, not through the API: redact here.
                let event = match serde_json::to_value(&event) {
                    Ok(mut v) => {
                        krest_schemas::redact::json(&mut v);
                        serde_json::from_value::<RunEvent>(v).unwrap_or(event)
                    }
                    Err(_) => event,
                };
                if json {
                    outln!("{}", serde_json::to_string(&event)?);
                    continue;
                }
                let line = match &event {
                    RunEvent::Dispatched(d) => format!(
                        "{} {:<10} {} {} shard(s) {}{}",
                        d.dispatched_at.format("%H:%M:%S%.3f"),
                        "dispatched",
                        d.run.run_id,
                        d.shard_total,
                        d.trigger.as_str(),
                        if d.misfired > 0 {
                            format!(" (+{} misfired)", d.misfired)
                        } else {
                            String::new()
                        }
                    ),
                    RunEvent::Skipped(k) => format!(
                        "{} {:<10} {} {}",
                        k.at.format("%H:%M:%S%.3f"),
                        "skipped",
                        k.run.run_id,
                        k.reason
                    ),
                    RunEvent::Started(s) => format!(
                        "{} {:<10} {} shard {}/{} attempt {} on {}",
                        s.at.format("%H:%M:%S%.3f"),
                        "started",
                        s.run.run_id,
                        s.shard + 1,
                        s.shard_total,
                        s.attempt,
                        s.worker
                    ),
                    RunEvent::Log(l) => format!(
                        "{} {:<10} {} shard {} | {}",
                        l.at.format("%H:%M:%S%.3f"),
                        "log",
                        l.run.run_id,
                        l.shard + 1,
                        l.line
                    ),
                    RunEvent::Finished(f) => format!(
                        "{} {:<10} {} shard {}/{} attempt {} on {}: {:?}{} {}",
                        f.at.format("%H:%M:%S%.3f"),
                        "finished",
                        f.run.run_id,
                        f.shard + 1,
                        f.shard_total,
                        f.attempt,
                        f.worker,
                        f.outcome,
                        if f.will_retry { " (will retry)" } else { "" },
                        f.error
                            .clone()
                            .or_else(|| f.output.clone())
                            .unwrap_or_default()
                    ),
                };
                outln!("{}", esc(&line));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A run with all its attempts and log lines, fetched page by page (an attempt whose lines go
/// on in the next page is repeated there: its lines are joined).
pub(crate) async fn run_detail(client: &Client, run_id: &str) -> Result<RunDetail, ClientError> {
    let mut req = RunGetRequest::new(run_id);
    let (mut detail, mut next): (RunDetail, Option<String>) =
        client.call_page(Op::RunsGet, &req).await?;
    while let Some(cursor) = next {
        req.cursor = Some(cursor);
        let (page, more): (RunDetail, Option<String>) = client.call_page(Op::RunsGet, &req).await?;
        if page.attempts.is_empty() && more.is_some() {
            return Err(ClientError::Other(
                "the node answered runs.get with an empty page and a cursor; try again".into(),
            ));
        }
        for attempt in page.attempts {
            match detail.attempts.last_mut() {
                Some(last) if (last.shard, last.attempt) == (attempt.shard, attempt.attempt) => {
                    last.logs.extend(attempt.logs);
                }
                _ => detail.attempts.push(attempt),
            }
        }
        next = more;
    }
    detail.attempts_left = 0;
    detail.logs_left = 0;
    Ok(detail)
}
