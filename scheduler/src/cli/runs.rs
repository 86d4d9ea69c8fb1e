//! `krest runs …`: list, get, cancel, watch. `runs get` fetches every page of a run
//! ([`run_detail`]).

use std::process::ExitCode;

use anyhow::Context as _;
use std::collections::HashSet;
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use krest_schemas::api::{
    ErrorCode, JobRequest, JobView, Op, RunDetail, RunGetRequest, RunRequest, RunStatus,
    RunSummary, RunsListRequest,
};
use krest_schemas::names::EVENTS_SUBJECTS;
use krest_schemas::RunEvent;

use super::args::RunsCmd;
use super::client::{Client, ClientError};
use super::render::{esc, fmt_time, parse_zone, print_json, runs_table};

pub(crate) async fn runs(client: &Client, cmd: RunsCmd, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        RunsCmd::List {
            job,
            status,
            limit,
            tz,
            app,
            since,
            until,
        } => {
            let zone = parse_zone(&tz).context("--tz")?;
            let status = match status {
                None => None,
                Some(s) => Some(RunStatus::parse(&s).with_context(|| {
                    format!(
                        "unknown status `{}`: use one of {}",
                        krest_schemas::text::echo(&s),
                        RunStatus::ALL.map(RunStatus::as_str).join(", ")
                    )
                })?),
            };
            let runs: Vec<RunSummary> = client
                .fetch_all(
                    Op::RunsList,
                    |cursor, wanted| RunsListRequest {
                        job: job.clone(),
                        status,
                        app: app.clone(),
                        since,
                        until,
                        limit: wanted.map(|w| w.min(1000) as u32),
                        cursor,
                    },
                    (limit > 0).then_some(limit as usize),
                )
                .await?;
            if let Some(c) = client.take_catching_up() {
                eprintln!("notice: {}", esc(&c.to_string()));
            }
            if json {
                print_json(&runs)?;
            } else {
                runs_table(&runs, zone, chrono::Utc::now()).print()?;
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
                if !r.trace_id.is_empty() {
                    outln!("trace:      {}", r.trace_id);
                }
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
                        "shard {} of {} attempt {}: {}{} on {} ({} → {})",
                        a.shard,
                        r.shard_total,
                        a.attempt,
                        a.status.as_str(),
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
        RunsCmd::Logs {
            run_id,
            follow,
            shard,
        } => return logs(client, &run_id, follow, shard, json).await,
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
        RunsCmd::Watch { job, since } => {
            let subject = match &job {
                Some(j) => events_subject_of(client, j).await?,
                None => EVENTS_SUBJECTS.to_string(),
            };
            if job.is_none() {
                if let Err(why) = client.krest_is_there().await {
                    eprintln!("warning: {why}; nothing may ever come");
                }
            }
            let mut events = event_source(client, subject, since).await?;
            eprintln!("following run events (ctrl-c to stop)");
            loop {
                let payload = tokio::select! {
                    m = events.next() => match m { Some(m) => m, None => break },
                    _ = tokio::signal::ctrl_c() => break,
                };
                let Ok(event) = serde_json::from_slice::<RunEvent>(&payload) else {
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
                        "{} {:<10} {} shard {} of {} attempt {} on {}",
                        s.at.format("%H:%M:%S%.3f"),
                        "started",
                        s.run.run_id,
                        s.shard,
                        s.shard_total,
                        s.attempt,
                        s.worker
                    ),
                    RunEvent::Log(l) => format!(
                        "{} {:<10} {} shard {} | {}",
                        l.at.format("%H:%M:%S%.3f"),
                        "log",
                        l.run.run_id,
                        l.shard,
                        l.line
                    ),
                    RunEvent::Finished(f) => format!(
                        "{} {:<10} {} shard {} of {} attempt {} on {}: {}{} {}",
                        f.at.format("%H:%M:%S%.3f"),
                        "finished",
                        f.run.run_id,
                        f.shard,
                        f.shard_total,
                        f.attempt,
                        f.worker,
                        f.outcome.as_str(),
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

/// The events subject of a job named as every command names jobs (`group.name`, or a name
/// unique across groups); a deleted job by `group.name`.
async fn events_subject_of(client: &Client, job: &str) -> anyhow::Result<String> {
    match client
        .call::<_, JobView>(Op::JobGet, &JobRequest::new(job))
        .await
    {
        Ok(view) => Ok(krest_schemas::names::events_subject(
            &view.spec.app_name,
            &view.spec.job_group,
            &view.spec.job_name,
        )),
        Err(ClientError::Api(e)) if e.code == ErrorCode::NotFound => match job.split_once('.') {
            Some((g, n)) => Ok(krest_schemas::names::events_job_filter(g, n)),
            None => Err(ClientError::Api(e).into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// Run events on `subject` as they are published; with `since`, first those stored in the
/// last `since` (replayed from the events stream), then the new ones.
async fn event_source(
    client: &Client,
    subject: String,
    since: Option<Duration>,
) -> anyhow::Result<BoxStream<'static, bytes::Bytes>> {
    let Some(since) = since else {
        let sub = client
            .nats()
            .subscribe(subject)
            .await
            .map_err(|e| ClientError::Other(e.to_string()))?;
        return Ok(sub.map(|m| m.payload).boxed());
    };
    use async_nats::jetstream::consumer;
    let start_time =
        chrono::Utc::now() - chrono::Duration::from_std(since).context("--since is too long")?;
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(start_time.timestamp_millis()) * 1_000_000,
    )
    .context("--since is too long")?;
    let js = async_nats::jetstream::new(client.nats().clone());
    let stream = js
        .get_stream(krest_schemas::names::EVENTS_STREAM)
        .await
        .map_err(|e| ClientError::Other(format!("cannot read the events stream: {e}")))?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await
        .map_err(|e| ClientError::Other(format!("cannot replay the events stream: {e}")))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| ClientError::Other(format!("cannot replay the events stream: {e}")))?;
    Ok(messages
        .filter_map(|m| async move { m.ok().map(|m| m.message.payload) })
        .boxed())
}

/// One log line for people: `08:00:01.234 INFO  shard 0 attempt 1 | text`.
fn log_line(shard: u32, attempt: u32, l: &krest_schemas::api::LogView) -> String {
    format!(
        "{} {:<5} shard {shard} attempt {attempt} | {}",
        l.at.format("%Y-%m-%d %H:%M:%S%.3f"),
        l.level.as_str(),
        l.line
    )
}

/// `krest runs logs`: a run's log lines from the database; with `follow`, then live until the
/// run ends.
async fn logs(
    client: &Client,
    run_id: &str,
    follow: bool,
    shard: Option<u32>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut printed: HashSet<(u32, u32, u32)> = HashSet::new();
    let print = |printed: &mut HashSet<(u32, u32, u32)>,
                 s: u32,
                 a: u32,
                 l: &krest_schemas::api::LogView|
     -> anyhow::Result<()> {
        if shard.is_some_and(|want| want != s) || !printed.insert((s, a, l.seq)) {
            return Ok(());
        }
        if json {
            outln!(
                "{}",
                serde_json::json!({"shard": s, "attempt": a, "seq": l.seq, "at": l.at, "level": l.level, "line": l.line})
            );
        } else {
            outln!("{}", esc(&log_line(s, a, l)));
        }
        Ok(())
    };
    let print_detail = |printed: &mut HashSet<(u32, u32, u32)>, d: &RunDetail| {
        for a in &d.attempts {
            for l in &a.logs {
                print(printed, a.shard, a.attempt, l)?;
            }
        }
        anyhow::Ok(())
    };
    if !follow {
        let d = run_detail(client, run_id).await?;
        print_detail(&mut printed, &d)?;
        return Ok(ExitCode::SUCCESS);
    }
    // Following: the run may not be recorded yet (just triggered).
    let detail = loop {
        match run_detail(client, run_id).await {
            Ok(d) => break d,
            Err(ClientError::Api(e)) if e.code == ErrorCode::NotFound => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    let r = &detail.run;
    let subject = krest_schemas::names::events_subject(&r.app_name, &r.job_group, &r.job_name);
    // The job's events are replayed from the run's dispatch on (a few seconds earlier, for
    // clocks that disagree): a line published but not yet recorded when the stored lines are
    // read comes in order from the stream, not only at the end (lines already printed are
    // skipped). Without a dispatch time (not recorded yet), live events only.
    let since = r
        .dispatched_at
        .or(r.scheduled_at)
        .map(|at| (chrono::Utc::now() - at).to_std().unwrap_or_default() + Duration::from_secs(5));
    let mut live = event_source(client, subject, since).await?;
    let detail = run_detail(client, run_id).await?;
    print_detail(&mut printed, &detail)?;
    let mut status = detail.run.status;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    while !status.is_final() {
        tokio::select! {
            m = live.next() => {
                let Some(payload) = m else { break };
                match serde_json::from_slice::<RunEvent>(&payload) {
                    Ok(RunEvent::Log(l)) if l.run.run_id == run_id => {
                        let v = krest_schemas::api::LogView {
                            seq: l.seq,
                            at: l.at,
                            level: l.level,
                            line: krest_schemas::redact::text(&l.line).into_owned(),
                        };
                        print(&mut printed, l.shard, l.attempt, &v)?;
                        continue;
                    }
                    Ok(RunEvent::Finished(f)) if f.run.run_id == run_id => {}
                    _ => continue,
                }
            }
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
        status = run_status(client, run_id).await?;
    }
    // The stored lines again: any the subscription missed.
    let detail = run_detail(client, run_id).await?;
    print_detail(&mut printed, &detail)?;
    eprintln!("run {run_id} ended: {}", detail.run.status.as_str());
    Ok(ExitCode::SUCCESS)
}

/// A run's status, from the first page of `runs.get` cut to one attempt (not the whole run).
async fn run_status(client: &Client, run_id: &str) -> Result<RunStatus, ClientError> {
    let mut req = RunGetRequest::new(run_id);
    req.limit = Some(1);
    let (head, _): (RunDetail, Option<String>) = client.call_page(Op::RunsGet, &req).await?;
    Ok(head.run.status)
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
