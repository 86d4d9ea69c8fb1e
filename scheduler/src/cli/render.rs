//! Human output: tables, times, durations, JSON. Data goes to stdout.
//!
//! Every table the CLI prints is built here, by a function per listing returning a
//! [`Table<N>`]: its headers are an array of `N` names and every row an array of `N` cells, so a
//! header without its cell (or the other way round) does not compile. Layout (widths,
//! alignment, Unicode widths) is `comfy-table`'s. Golden tests below pin each table's shape.
//!
//! Everything human output prints from job data, run outputs, errors, log lines or parked
//! payloads goes through [`esc`], so control characters and terminal escape sequences show as
//! text instead of acting on the terminal; [`Table`] applies it to every cell. A cell cut to
//! fit ends in `…` ([`cut`]). JSON output (`-o json`) is printed exact (JSON escapes control
//! characters itself).

use std::borrow::Cow;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use krest_schemas::api::{DeadLetter, JobRevision, JobView, RunStatus, RunSummary};
use krest_schemas::text::is_unsafe;
use krest_schemas::{NodeInfo, WorkerInfo};

/// `s` safe for a terminal: control characters (ESC, CR, newlines, DEL, C1) and Unicode
/// direction overrides become visible escapes — `\n`, `\r`, `\t`, else `\u{1b}` — so one
/// value is one line and cannot move the cursor, clear the screen or retitle the window.
pub(crate) fn esc(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` cut to at most `max` characters; a cut value ends in `…`, so a reader knows there is
/// more (`-o json` prints it whole).
pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `--tz`: `UTC` (any case) or an IANA name (`Europe/Paris`).
pub(crate) fn parse_zone(s: &str) -> anyhow::Result<Tz> {
    if s.eq_ignore_ascii_case("utc") {
        return Ok(Tz::UTC);
    }
    krest_schemas::cron::parse_time_zone(s).map_err(anyhow::Error::msg)
}

/// A time in UTC with milliseconds, `-` when absent.
pub(crate) fn fmt_time(t: Option<DateTime<Utc>>) -> String {
    fmt_time_in(t, Tz::UTC)
}

/// A time in `zone` with milliseconds, `-` when absent.
pub(crate) fn fmt_time_in(t: Option<DateTime<Utc>>, zone: Tz) -> String {
    t.map_or_else(
        || "-".to_string(),
        |t| {
            t.with_timezone(&zone)
                .format("%Y-%m-%d %H:%M:%S%.3f")
                .to_string()
        },
    )
}

/// A time in a job's own time zone, with the zone's abbreviation: `2026-12-03 09:00:00 CET`.
fn fmt_job_time(t: Option<DateTime<Utc>>, zone: &str) -> String {
    let Some(t) = t else {
        return "-".into();
    };
    match krest_schemas::cron::parse_time_zone(zone) {
        Ok(tz) => t
            .with_timezone(&tz)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string(),
        Err(_) => t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    }
}

/// A duration for people: `850ms`, `12.3s`, `4m05s`, `2h03m`, `3d04h`.
pub(crate) fn fmt_duration(ms: i64) -> String {
    if ms < 0 {
        return "-".into();
    }
    let s = ms / 1000;
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..=86_399_999 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// How long ago `t` was, seen at `now`: `3s ago`.
fn fmt_age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!("{} ago", fmt_duration((now - t).num_milliseconds().max(0)))
}

/// A table of `N` columns: rows have exactly as many cells as there are headers.
pub(crate) struct Table<const N: usize> {
    headers: [String; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    /// An empty table with these headers.
    pub(crate) fn new(headers: [&str; N]) -> Table<N> {
        Table {
            headers: headers.map(str::to_string),
            rows: Vec::new(),
        }
    }

    /// Adds a row; every cell goes through [`esc`].
    pub(crate) fn row(&mut self, cells: [String; N]) {
        self.rows.push(cells.map(|c| match esc(&c) {
            Cow::Borrowed(_) => c,
            Cow::Owned(e) => e,
        }));
    }

    /// The table as text: left-aligned columns two spaces apart, no borders, no trailing
    /// spaces, one line per row after the header line.
    pub(crate) fn render(&self) -> String {
        let mut t = comfy_table::Table::new();
        t.load_style(comfy_table::presets::NOTHING);
        t.set_header(self.headers.to_vec());
        for row in &self.rows {
            t.add_row(row.to_vec());
        }
        for (i, column) in t.column_iter_mut().enumerate() {
            column.set_padding((0, if i + 1 == N { 0 } else { 2 }));
        }
        t.lines()
            .map(|l| l.trim_end().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Prints the table on stdout.
    pub(crate) fn print(&self) -> std::io::Result<()> {
        use std::io::Write as _;
        writeln!(std::io::stdout(), "{}", self.render())
    }
}

/// Prints `v` as pretty JSON, exactly (no escaping beyond JSON's own).
pub(crate) fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    use std::io::Write as _;
    // Written as it is serialized: a large listing is never held as one string.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// `running` / `paused`.
fn job_state(running: bool) -> String {
    if running { "running" } else { "paused" }.into()
}

/// `krest job list` / `job get`: next fire in the job's own time zone.
pub(crate) fn jobs_table(jobs: &[JobView]) -> Table<9> {
    let mut t = Table::new([
        "JOB",
        "APP",
        "TYPE",
        "SCHEDULE",
        "TZ",
        "PATH",
        "STATE",
        "REV",
        "NEXT FIRE",
    ]);
    for j in jobs {
        let s = &j.spec;
        t.row([
            j.key.clone(),
            s.app_name.to_string(),
            format!("{:?}", s.job_type).to_uppercase(),
            match (&s.cron, &s.every, &s.at) {
                (Some(c), _, _) => c.to_string(),
                (_, Some(e), _) => format!("every {e}"),
                (_, _, Some(a)) => format!("at {a}"),
                _ => "(manual)".into(),
            },
            s.time_zone.to_string(),
            cut(&s.path, 40),
            job_state(s.running),
            j.revision.to_string(),
            fmt_job_time(j.next_fire_at, &s.time_zone),
        ]);
    }
    t
}

/// `krest job history`.
pub(crate) fn revisions_table(revisions: &[JobRevision]) -> Table<7> {
    let mut t = Table::new([
        "REV",
        "WRITTEN (UTC)",
        "OP",
        "SCHEDULE",
        "STATE",
        "PATH",
        "ARGS",
    ]);
    for r in revisions {
        let s = r.spec.as_ref();
        t.row([
            r.revision.to_string(),
            fmt_time(Some(r.written_at)),
            r.operation.clone(),
            s.and_then(|s| s.cron.as_deref().or(s.every.as_deref()).map(str::to_string))
                .unwrap_or_else(|| "-".into()),
            s.map_or_else(|| "-".into(), |s| job_state(s.running)),
            s.map_or_else(|| "-".into(), |s| cut(&s.path, 40)),
            s.map_or_else(|| "-".into(), |s| cut(&s.args.to_string(), 40)),
        ]);
    }
    t
}

/// How long a run took (or has been running, seen at `now`), `-` before it started.
fn run_duration(r: &RunSummary, now: DateTime<Utc>) -> String {
    match (r.started_at, r.finished_at) {
        (Some(s), Some(f)) => fmt_duration((f - s).num_milliseconds()),
        (Some(s), None) => format!("{}…", fmt_duration((now - s).num_milliseconds())),
        _ => "-".into(),
    }
}

/// `krest runs list`: times in `zone`.
pub(crate) fn runs_table(runs: &[RunSummary], zone: Tz, now: DateTime<Utc>) -> Table<9> {
    let scheduled = format!("SCHEDULED ({})", zone.name());
    let finished = format!("FINISHED ({})", zone.name());
    let mut t = Table::new([
        "RUN", "STATUS", "TRIGGER", &scheduled, "SHARDS", "ATTEMPTS", &finished, "DURATION",
        "RESULT",
    ]);
    for r in runs {
        t.row([
            r.run_id.clone(),
            r.status.as_str().into(),
            r.trigger.map_or("-", |t| t.as_str()).into(),
            fmt_time_in(r.scheduled_at, zone),
            format!("{}/{}", r.shards_succeeded, r.shard_total),
            r.attempts.to_string(),
            fmt_time_in(r.finished_at, zone),
            run_duration(r, now),
            cut(run_result(r), 60),
        ]);
    }
    t
}

/// The RESULT column: a run that succeeded shows its output, even when an earlier attempt
/// failed (the run keeps that attempt's error); any other run its error, or else its output.
fn run_result(r: &RunSummary) -> &str {
    let shown = if r.status == RunStatus::Succeeded {
        r.output.as_deref()
    } else {
        r.error.as_deref().or(r.output.as_deref())
    };
    shown.unwrap_or_default()
}

/// `krest workers list`: heartbeat as an age at `now`.
pub(crate) fn workers_table(workers: &[WorkerInfo], now: DateTime<Utc>) -> Table<8> {
    let mut t = Table::new([
        "APP",
        "INSTANCE",
        "WEIGHT",
        "SLOTS",
        "IN-FLIGHT",
        "HANDLERS",
        "HOST",
        "HEARTBEAT",
    ]);
    for w in workers {
        t.row([
            w.app_name.clone(),
            w.instance.clone(),
            w.weight.to_string(),
            w.slots.to_string(),
            w.in_flight.to_string(),
            cut(&w.handlers.join(","), 60),
            w.host.clone(),
            fmt_age(w.heartbeat_at, now),
        ]);
    }
    t
}

/// A node's recorder lag: events and age of the oldest unrecorded one, and why it is stuck.
fn recorder_lag(n: &NodeInfo) -> String {
    let mut s = if n.recorder_lag_events == 0 {
        "0".to_string()
    } else {
        format!(
            "{} events, {:.1} s",
            n.recorder_lag_events,
            n.recorder_lag_ms as f64 / 1000.0
        )
    };
    if let Some(why) = &n.recorder_failing {
        s.push_str(&format!(" (stuck: {})", cut(why, 80)));
    }
    s
}

/// `krest cluster status`.
pub(crate) fn nodes_table(nodes: &[NodeInfo]) -> Table<9> {
    let mut t = Table::new([
        "NODE",
        "ROLE",
        "VERSION",
        "DATABASE",
        "RECORDED-SEQ",
        "LAG",
        "NATS-SERVER",
        "HTTP",
        "STARTED (UTC)",
    ]);
    for n in nodes {
        t.row([
            n.node.clone(),
            match &n.loading {
                Some(how_far) => format!(
                    "{} ({})",
                    format!("{:?}", n.role).to_uppercase(),
                    cut(how_far, 60)
                ),
                None => format!("{:?}", n.role).to_uppercase(),
            },
            n.version.clone(),
            n.database.clone(),
            n.recorded_seq.to_string(),
            recorder_lag(n),
            n.nats_server.clone(),
            n.http_addr.clone().unwrap_or_else(|| "-".into()),
            fmt_time(Some(n.started_at)),
        ]);
    }
    t
}

/// `krest dlq list`.
pub(crate) fn dead_letters_table(letters: &[DeadLetter]) -> Table<6> {
    let mut t = Table::new(["SEQ", "PARKED (UTC)", "KIND", "SOURCE", "REASON", "PAYLOAD"]);
    for d in letters {
        t.row([
            d.seq.to_string(),
            fmt_time(Some(d.at)),
            d.subject.trim_start_matches("krest.dlq.").to_string(),
            d.source.clone(),
            d.reason.clone(),
            cut(&d.payload, 60),
        ]);
    }
    t
}

/// `krest job stats` as `key: value` lines.
pub(crate) fn job_stats_text(s: &krest_schemas::api::JobStats) -> String {
    let ms = |v: Option<i64>| v.map_or_else(|| "-".to_string(), fmt_duration);
    let last = s.last_run.as_ref().map_or_else(
        || "none".to_string(),
        |r| {
            format!(
                "{} {} (scheduled {})",
                r.run_id,
                r.status.as_str(),
                fmt_time(r.scheduled_at.or(r.dispatched_at))
            )
        },
    );
    let rate = s
        .success_rate
        .map_or_else(|| "-".to_string(), |r| format!("{:.1} %", r * 100.0));
    [
        format!("job:           {}", s.job),
        format!("last run:      {last}"),
        format!(
            "ended runs:    {} (newest), {} succeeded, {} failed or timed out",
            s.ended, s.succeeded, s.failed
        ),
        format!("success rate:  {rate}"),
        format!(
            "duration:      p50 {}, p95 {}, max {}",
            ms(s.p50_ms),
            ms(s.p95_ms),
            ms(s.max_ms)
        ),
    ]
    .map(|l| esc(&l).into_owned())
    .join("\n")
}

/// Prints [`job_stats_text`].
pub(crate) fn print_job_stats(s: &krest_schemas::api::JobStats) -> std::io::Result<()> {
    use std::io::Write as _;
    writeln!(std::io::stdout(), "{}", job_stats_text(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn terminal_escapes_are_shown_not_sent() {
        assert_eq!(esc("plain text é"), "plain text é");
        assert_eq!(esc("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(esc("l1\nl2\r\t"), "l1\\nl2\\r\\t");
        assert_eq!(
            esc("\u{9b}31m \u{7f} \u{202e}"),
            "\\u{9b}31m \\u{7f} \\u{202e}"
        );
        assert_eq!(esc("\u{1b}]0;title\u{7}"), "\\u{1b}]0;title\\u{7}");
    }

    #[test]
    fn cut_cells_end_in_an_ellipsis() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("exactly10!", 10), "exactly10!");
        assert_eq!(cut("a bit too long", 10), "a bit too…");
        assert_eq!(cut("ééééé", 3), "éé…");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(0), "0ms");
        assert_eq!(fmt_duration(850), "850ms");
        assert_eq!(fmt_duration(12_345), "12.3s");
        assert_eq!(fmt_duration(245_000), "4m05s");
        assert_eq!(fmt_duration(7_380_000), "2h03m");
        assert_eq!(fmt_duration(273_600_000), "3d04h");
        assert_eq!(fmt_duration(-1), "-");
    }

    #[test]
    fn cells_are_escaped_and_columns_aligned() {
        let mut t = Table::new(["A", "LONGER HEADER", "C"]);
        t.row(["x\u{1b}[2J".into(), "1".into(), "last".into()]);
        t.row(["wide value".into(), "22".into(), String::new()]);
        assert_eq!(
            t.render(),
            "A           LONGER HEADER  C\n\
             x\\u{1b}[2J  1              last\n\
             wide value  22"
        );
    }

    fn job() -> JobView {
        serde_json::from_value(json!({
            "key": "billing.invoices",
            "spec": krest_schemas::job::parse_job(&json!({
                "appName": "billing", "jobGroup": "billing", "jobName": "invoices",
                "cron": "0 0 9 * * ?", "timeZone": "Europe/Paris", "path": "invoices/run",
                "running": true
            })).unwrap(),
            "revision": 3,
            "createdAt": "2026-12-01T08:00:00Z",
            "updatedAt": "2026-12-02T08:00:00Z",
            "nextFireAt": "2026-12-03T08:00:00Z"
        }))
        .unwrap()
    }

    #[test]
    fn golden_jobs() {
        let mut paused = job();
        paused.key = "billing.reports".into();
        paused.spec.running = false;
        paused.next_fire_at = None;
        assert_eq!(
            jobs_table(&[job(), paused]).render(),
            "\
JOB               APP      TYPE    SCHEDULE     TZ            PATH          STATE    REV  NEXT FIRE
billing.invoices  billing  NORMAL  0 0 9 * * ?  Europe/Paris  invoices/run  running  3    2026-12-03 09:00:00 CET
billing.reports   billing  NORMAL  0 0 9 * * ?  Europe/Paris  invoices/run  paused   3    -"
        );
    }

    #[test]
    fn a_run_that_succeeded_after_a_retry_shows_its_output() {
        let run = |status: &str, output: Option<&str>, error: Option<&str>| -> RunSummary {
            serde_json::from_value(json!({
                "runId": "r1", "jobGroup": "g", "jobName": "j", "appName": "a",
                "status": status, "shardTotal": 1, "shardsSucceeded": 0, "shardsFailed": 0,
                "attempts": 2, "misfired": 0, "output": output, "error": error,
            }))
            .unwrap()
        };
        let retried = run("SUCCEEDED", Some("42 rows"), Some("connection reset"));
        assert_eq!(run_result(&retried), "42 rows");
        assert_eq!(
            run_result(&run("SUCCEEDED", None, Some("connection reset"))),
            ""
        );
        let failed = run("FAILED", Some("partial"), Some("connection reset"));
        assert_eq!(run_result(&failed), "connection reset");
        assert_eq!(run_result(&run("RUNNING", Some("so far"), None)), "so far");
    }

    #[test]
    fn golden_revisions() {
        let revisions: Vec<JobRevision> = vec![
            JobRevision {
                revision: 2,
                written_at: at("2026-12-02T08:00:00Z"),
                operation: "delete".into(),
                spec: None,
            },
            JobRevision {
                revision: 1,
                written_at: at("2026-12-01T08:00:00Z"),
                operation: "put".into(),
                spec: Some(job().spec),
            },
        ];
        assert_eq!(
            revisions_table(&revisions).render(),
            "\
REV  WRITTEN (UTC)            OP      SCHEDULE     STATE    PATH          ARGS
2    2026-12-02 08:00:00.000  delete  -            -        -             -
1    2026-12-01 08:00:00.000  put     0 0 9 * * ?  running  invoices/run  null"
        );
    }

    fn run(id: &str, status: &str, started: Option<&str>, finished: Option<&str>) -> RunSummary {
        serde_json::from_value(json!({
            "runId": id, "jobGroup": "billing", "jobName": "invoices", "appName": "billing",
            "status": status, "trigger": "SCHEDULE",
            "scheduledAt": "2026-12-03T08:00:00Z",
            "startedAt": started, "finishedAt": finished,
            "shardTotal": 2, "shardsSucceeded": 1, "shardsFailed": 1, "attempts": 3,
            "misfired": 0,
            "error": "shard 1: connection refused by the invoice service at https://invoices.internal/api/v2"
        }))
        .unwrap()
    }

    #[test]
    fn golden_runs() {
        let runs = [
            run(
                "r1",
                "FAILED",
                Some("2026-12-03T08:00:00.010Z"),
                Some("2026-12-03T08:00:12.355Z"),
            ),
            run("r2", "RUNNING", Some("2026-12-03T08:00:00Z"), None),
        ];
        let now = at("2026-12-03T08:04:05Z");
        assert_eq!(
            runs_table(&runs, Tz::UTC, now).render(),
            "\
RUN  STATUS   TRIGGER   SCHEDULED (UTC)          SHARDS  ATTEMPTS  FINISHED (UTC)           DURATION  RESULT
r1   FAILED   SCHEDULE  2026-12-03 08:00:00.000  1/2     3         2026-12-03 08:00:12.355  12.3s     shard 1: connection refused by the invoice service at https…
r2   RUNNING  SCHEDULE  2026-12-03 08:00:00.000  1/2     3         -                        4m05s…    shard 1: connection refused by the invoice service at https…"
        );
        let paris = parse_zone("Europe/Paris").unwrap();
        let text = runs_table(&runs[..1], paris, now).render();
        assert!(text.contains("  SCHEDULED (Europe/Paris)  "), "{text}");
        assert!(text.contains("2026-12-03 09:00:00.000"), "{text}");
    }

    #[test]
    fn golden_workers() {
        let w: WorkerInfo = serde_json::from_value(json!({
            "appName": "billing", "instance": "billing-host1-1234", "handlers": ["a/b", "c"],
            "weight": 2, "slots": 4, "inFlight": 1, "version": "0.1.0", "sdk": "rust",
            "host": "host1", "startedAt": "2026-12-03T07:00:00Z",
            "heartbeatAt": "2026-12-03T08:00:00Z"
        }))
        .unwrap();
        assert_eq!(
            workers_table(&[w], at("2026-12-03T08:00:02.500Z")).render(),
            "\
APP      INSTANCE            WEIGHT  SLOTS  IN-FLIGHT  HANDLERS  HOST   HEARTBEAT
billing  billing-host1-1234  2       4      1          a/b,c     host1  2.5s ago"
        );
    }

    #[test]
    fn golden_nodes() {
        let n: NodeInfo = serde_json::from_value(json!({
            "node": "node-a", "version": "0.1.0 (abc1234)", "role": "LEADER",
            "database": "sqlite", "natsServer": "2.9.10", "httpAddr": "127.0.0.1:8722",
            "recordedSeq": 42, "recorderLagEvents": 3, "recorderLagMs": 1500,
            "startedAt": "2026-12-03T07:00:00Z", "heartbeatAt": "2026-12-03T08:00:00Z"
        }))
        .unwrap();
        assert_eq!(
            nodes_table(&[n]).render(),
            "\
NODE    ROLE    VERSION          DATABASE  RECORDED-SEQ  LAG              NATS-SERVER  HTTP            STARTED (UTC)
node-a  LEADER  0.1.0 (abc1234)  sqlite    42            3 events, 1.5 s  2.9.10       127.0.0.1:8722  2026-12-03 07:00:00.000"
        );
    }

    #[test]
    fn golden_dead_letters() {
        let d: DeadLetter = serde_json::from_value(json!({
            "seq": 7, "subject": "krest.dlq.events", "reason": "not a run event: expected value",
            "source": "KREST_EVENTS/12", "at": "2026-12-03T08:00:00Z", "payload": "garbage\n"
        }))
        .unwrap();
        assert_eq!(
            dead_letters_table(&[d]).render(),
            "\
SEQ  PARKED (UTC)             KIND    SOURCE           REASON                           PAYLOAD
7    2026-12-03 08:00:00.000  events  KREST_EVENTS/12  not a run event: expected value  garbage\\n"
        );
    }
}
