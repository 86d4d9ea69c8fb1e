//! Fire precision end to end: N jobs each firing every second, for a window of S seconds;
//! lateness = handler start − scheduled fire time, as the handler sees it. Run with
//! `cargo bench -p krest --bench precision [-- --jobs N --seconds S --workers W]`; results go
//! into BENCHMARKS.md. `KREST_BENCH_TINY=1` runs it at a tiny size (CI does, so it cannot rot).
//!
//! `--python PYTHON` runs the workers on the Python SDK (`common/py_worker.py` with the
//! interpreter PYTHON, e.g. a venv's `bin/python` with `krest_worker` installed) instead of the
//! Rust one, with the same no-op handler.
//!
//! The node dispatches ahead by its default (`--dispatch-ahead`, 1 s); set
//! `KREST_DISPATCH_AHEAD=0` in the environment to measure dispatch at the fire time.
//!
//! `--per-minute` makes each job fire once a minute instead (job i at second i mod 60: N/60
//! fires a second); `--cron EXPR` gives every job that expression and checks no fires (for the
//! memory of many registered jobs).
//!
//! Starts its own nats-server, one `krest scheduler` node (SQLite) and W worker processes (this
//! binary again, with a no-op handler that notes when it started), applies the jobs with the
//! `krest` CLI, and prints: lateness percentiles (due → dispatched, dispatched → handler
//! start, due → handler start), missed and doubled fires, CPU seconds in the window and peak
//! RSS of each process, and how far recording lags behind.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{
    apply, mib, pcts, run_worker_if_asked, sleep_until, start_node, tiny, wait_for_api,
    BenchWorker, RunCounter, Start, APP,
};
use krest_test_support::{NatsServer, ProcStats, TestDir};
use serde_json::json;

const GROUP: &str = "bench";

/// Runs of the window recorded as SUCCEEDED (group, window start and end in ms).
const RECORDED: &str = "SELECT COUNT(*) FROM runs WHERE job_group = ? AND status = 'SUCCEEDED' \
                        AND scheduled_at >= ? AND scheduled_at < ?";

fn main() {
    if run_worker_if_asked() {
        return;
    }
    let jobs: usize = common::flag("--jobs").unwrap_or(if tiny() { 10 } else { 1000 });
    let seconds: i64 = common::flag("--seconds").unwrap_or(if tiny() { 2 } else { 30 });
    let warmup: i64 = common::flag("--warmup").unwrap_or(if tiny() { 2 } else { 5 });
    let workers: usize = common::flag("--workers").unwrap_or(1);
    let slots: u32 = common::flag("--slots").unwrap_or(256);
    let per_minute = std::env::args().any(|a| a == "--per-minute");
    let fixed_cron: Option<String> = common::flag("--cron");
    let python: Option<String> = common::flag("--python");
    // Whether job `i` fires at second `sec` (epoch seconds).
    let fires_at = |i: usize, sec: i64| -> bool {
        fixed_cron.is_none() && (!per_minute || (i % 60) as i64 == sec.rem_euclid(60))
    };
    let every = match (&fixed_cron, per_minute) {
        (Some(c), _) => format!("on `{c}`"),
        (None, true) => "every minute".to_string(),
        (None, false) => "every second".to_string(),
    };
    println!(
        "precision: {jobs} jobs {every}, {seconds} s window after {warmup} s warm-up, \
         {workers} {}worker(s) × {slots} slots",
        if python.is_some() { "Python " } else { "" }
    );
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = TestDir::new("bench-precision");
    let node = start_node("n1", &url, dir.path());
    wait_for_api(&url);
    let ws: Vec<BenchWorker> = (0..workers)
        .map(|i| {
            let name = format!("worker{i}");
            match &python {
                Some(py) => BenchWorker::start_python(&name, &url, dir.path(), slots, py),
                None => BenchWorker::start(&name, &url, dir.path(), slots),
            }
        })
        .collect();
    let docs: Vec<serde_json::Value> = (0..jobs)
        .map(|i| {
            json!({
                "appName": APP, "jobGroup": GROUP, "jobName": format!("j{i:06}"),
                "path": "noop",
                "cron": match (&fixed_cron, per_minute) {
                    (Some(c), _) => c.clone(),
                    (None, true) => format!("{} * * * * ?", i % 60),
                    (None, false) => "* * * * * ?".to_string(),
                }
            })
        })
        .collect();
    apply(&url, dir.path(), &docs);
    let applied = Utc::now().timestamp_millis();
    // The window: whole seconds, starting after the warm-up.
    let from_s = applied / 1000 + 1 + warmup;
    let until_s = from_s + seconds; // exclusive
    let mut pids = vec![
        ("nats-server".to_string(), nats.pid().unwrap()),
        ("scheduler".to_string(), node.pid()),
    ];
    pids.extend(ws.iter().map(|w| (w.proc.name().to_string(), w.proc.pid())));
    let stats = || -> Vec<ProcStats> {
        pids.iter()
            .map(|(n, p)| ProcStats::of(*p).unwrap_or_else(|| panic!("{n} is gone")))
            .collect()
    };
    sleep_until(from_s * 1000 - 100);
    let before = stats();
    sleep_until(until_s * 1000 - 100);
    let after = stats();

    // Recording: how many of the window's runs are recorded 1 s after its last fire, then how
    // long the rest take (the SQLite file is read directly).
    let expected = (0..jobs)
        .map(|i| (from_s..until_s).filter(|s| fires_at(i, *s)).count())
        .sum::<usize>();
    let db = dir.join("n1.db");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut recorded = RunCounter::open(&rt, &db);
    sleep_until(until_s * 1000 + 1000);
    let at_1s = recorded.count(RECORDED, GROUP, &[from_s * 1000, until_s * 1000]);
    let mut all_recorded_after = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if recorded.count(RECORDED, GROUP, &[from_s * 1000, until_s * 1000]) >= expected {
            all_recorded_after = Some(Utc::now().timestamp_millis() - until_s * 1000);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let peaks: Vec<u64> = pids
        .iter()
        .map(|(_, p)| ProcStats::of(*p).map_or(0, |st| st.peak_rss))
        .collect();

    let mut by_run: HashMap<String, Vec<Start>> = HashMap::new();
    for w in ws {
        for start in w.stop() {
            if start.scheduled_ms >= from_s * 1000 && start.scheduled_ms < until_s * 1000 {
                by_run.entry(start.run_id.clone()).or_default().push(start);
            }
        }
    }
    let mut missed = 0;
    for i in 0..jobs {
        for sec in (from_s..until_s).filter(|s| fires_at(i, *s)) {
            let id = krest_schemas::names::scheduled_run_id(GROUP, &format!("j{i:06}"), sec * 1000);
            if !by_run.contains_key(&id) {
                missed += 1;
            }
        }
    }
    let doubled: usize = by_run.values().map(|v| v.len() - 1).sum();
    let firsts: Vec<&Start> = by_run.values().map(|v| &v[0]).collect();
    let lateness = |f: &dyn Fn(&Start) -> i64| -> String {
        let mut v: Vec<i64> = firsts.iter().map(|s| f(s)).collect();
        pcts(&mut v)
    };
    println!(
        "precision/lateness due → handler start: {}",
        lateness(&|s| s.start_ms - s.scheduled_ms)
    );
    println!(
        "precision/lateness due → dispatched: {}",
        lateness(&|s| s.dispatched_ms - s.scheduled_ms)
    );
    println!(
        "precision/lateness dispatched → handler start: {}",
        lateness(&|s| s.start_ms - s.dispatched_ms)
    );
    println!(
        "precision/fires: {expected} expected, {} ran, {missed} missed, {doubled} ran twice",
        by_run.len()
    );
    // Dispatched ahead (`--dispatch-ahead`, KREST_DISPATCH_AHEAD): on the bus before their time,
    // and none may start before it.
    let ahead = firsts
        .iter()
        .filter(|s| s.dispatched_ms < s.scheduled_ms)
        .count();
    let early = firsts
        .iter()
        .filter(|s| s.start_ms < s.scheduled_ms)
        .count();
    println!(
        "precision/dispatch ahead: {ahead} of {} runs dispatched before their time, {early} started before it",
        firsts.len()
    );
    for (i, (name, _)) in pids.iter().enumerate() {
        println!(
            "precision/process {name}: {:.2} CPU-s in the {seconds} s window, peak RSS {}",
            after[i].cpu_secs - before[i].cpu_secs,
            mib(peaks[i])
        );
    }
    match all_recorded_after {
        Some(_) if at_1s >= expected => println!(
            "precision/recording: all {expected} runs recorded 1 s after the window's last fire"
        ),
        Some(ms) => println!(
            "precision/recording: {at_1s} of {expected} recorded 1 s after the window's last fire, all after {ms} ms"
        ),
        None => println!(
            "precision/recording: {at_1s} of {expected} recorded 1 s after the window's last fire, {} after 2 min",
            recorded.count(RECORDED, GROUP, &[from_s * 1000, until_s * 1000])
        ),
    }
    assert_eq!(missed, 0, "fires were missed");
    assert_eq!(doubled, 0, "fires ran twice");
    assert_eq!(early, 0, "runs started before their time");
}
