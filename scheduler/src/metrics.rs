//! The node's metrics, served as Prometheus text on `/metrics` (`serve/http.rs`).
//!
//! Event counters and histograms live in one process-wide [`METRICS`] (a process is one node),
//! updated where things happen: the leader's publisher (fires, dispatch errors, due → publish
//! lateness) and the recorder (runs ended by status, run durations, due → handler start as
//! workers report it in `started` events). The recorder of every node records every run, so
//! run metrics are cluster-wide on each node: aggregate them across nodes with `max`, not
//! `sum`. State (leader, recorder lag, jobs, live workers) is read when scraped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the lateness histograms: 1 ms to 1 min.
const LATENESS_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Upper bounds (seconds) of the run duration histogram: 10 ms to 1 h.
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// A Prometheus histogram with fixed buckets; observations in microseconds.
pub struct Histogram {
    bounds: &'static [f64; 14],
    buckets: [AtomicU64; 14],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new(bounds: &'static [f64; 14]) -> Histogram {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; 14],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Records `ms` milliseconds; negative values (clock skew between hosts) count as zero.
    pub fn observe_ms(&self, ms: i64) {
        self.observe(Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (bound, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// A counter with one label whose values are few and fixed (statuses, triggers).
pub struct LabeledCounter {
    values: Mutex<BTreeMap<&'static str, u64>>,
}

impl LabeledCounter {
    const fn new() -> LabeledCounter {
        LabeledCounter {
            values: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds `n` to the counter of `label`.
    pub fn add(&self, label: &'static str, n: u64) {
        if let Ok(mut v) = self.values.lock() {
            *v.entry(label).or_default() += n;
        }
    }

    fn render(&self, out: &mut String, name: &str, label: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        if let Ok(v) = self.values.lock() {
            for (value, n) in v.iter() {
                let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
            }
        }
    }
}

/// Everything counted in this process.
pub struct Metrics {
    /// Fires published (their messages stored), by trigger.
    pub fires: LabeledCounter,
    /// Fires whose publishing failed (retried by the engine).
    pub dispatch_errors: AtomicU64,
    /// Due time → the fire's messages acknowledged by JetStream (scheduled and catch-up fires).
    pub dispatch_lateness: Histogram,
    /// Due time → handler start, from first attempts' `started` events.
    pub start_lateness: Histogram,
    /// Runs that reached a final status, by status.
    pub runs_ended: LabeledCounter,
    /// Start → end of ended runs.
    pub run_duration: Histogram,
}

/// This process's metrics.
pub static METRICS: Metrics = Metrics {
    fires: LabeledCounter::new(),
    dispatch_errors: AtomicU64::new(0),
    dispatch_lateness: Histogram::new(&LATENESS_BUCKETS),
    start_lateness: Histogram::new(&LATENESS_BUCKETS),
    runs_ended: LabeledCounter::new(),
    run_duration: Histogram::new(&DURATION_BUCKETS),
};

/// What is read at scrape time.
pub struct Snapshot<'a> {
    /// The node's name.
    pub node: &'a str,
    /// Leader epoch when this node leads.
    pub leader_epoch: Option<u64>,
    /// The recorder's progress.
    pub recorder: &'a crate::record::recorder::RecorderStatus,
    /// Jobs in the node's table.
    pub jobs: usize,
    /// Live worker instances per app.
    pub workers: BTreeMap<String, u64>,
}

/// Escapes a label value (`\`, `"` and newlines).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// The Prometheus text exposition (format 0.0.4) of [`METRICS`] and `s`.
pub fn render(s: &Snapshot<'_>) -> String {
    let m = &METRICS;
    let mut out = String::with_capacity(8192);
    let _ = writeln!(
        out,
        "# HELP krest_build_info The node's name and Krest version.\n# TYPE krest_build_info gauge\nkrest_build_info{{node=\"{}\",version=\"{}\"}} 1",
        label(s.node),
        label(crate::VERSION)
    );
    gauge(
        &mut out,
        "krest_leader",
        "1 while this node is the leader.",
        u8::from(s.leader_epoch.is_some()),
    );
    gauge(
        &mut out,
        "krest_leader_epoch",
        "The leader epoch this node holds (0 when it does not lead).",
        s.leader_epoch.unwrap_or(0),
    );
    m.fires.render(
        &mut out,
        "krest_fires_total",
        "trigger",
        "Runs dispatched by this node (messages stored), by trigger.",
    );
    let _ = writeln!(
        out,
        "# HELP krest_dispatch_errors_total Fires this node failed to publish (retried).\n# TYPE krest_dispatch_errors_total counter\nkrest_dispatch_errors_total {}",
        m.dispatch_errors.load(Ordering::Relaxed)
    );
    m.dispatch_lateness.render(
        &mut out,
        "krest_dispatch_lateness_seconds",
        "Scheduled fire time to its messages stored in JetStream, for fires this node published.",
    );
    m.start_lateness.render(
        &mut out,
        "krest_handler_start_lateness_seconds",
        "Scheduled time to handler start of first attempts, as workers report it.",
    );
    m.runs_ended.render(
        &mut out,
        "krest_runs_ended_total",
        "status",
        "Runs recorded in a final status (cluster-wide: every node records every run).",
    );
    m.run_duration.render(
        &mut out,
        "krest_run_duration_seconds",
        "First start to end of runs recorded as ended.",
    );
    gauge(
        &mut out,
        "krest_recorder_recorded_seq",
        "Events stream sequence recorded into this node's database.",
        s.recorder.recorded_seq,
    );
    gauge(
        &mut out,
        "krest_recorder_lag_events",
        "Events in the stream not yet recorded by this node.",
        s.recorder.lag_events,
    );
    gauge(
        &mut out,
        "krest_recorder_lag_seconds",
        "Age of the oldest event not yet recorded by this node.",
        s.recorder.lag.as_secs_f64(),
    );
    gauge(
        &mut out,
        "krest_recorder_failing",
        "1 while the recorder cannot write (see /readyz for why).",
        u8::from(s.recorder.failing.is_some()),
    );
    let _ = writeln!(
        out,
        "# HELP krest_recorder_parked_total Bad events parked on the dead-letter stream by this node.\n# TYPE krest_recorder_parked_total counter\nkrest_recorder_parked_total {}",
        s.recorder.parked
    );
    gauge(&mut out, "krest_jobs", "Job definitions.", s.jobs);
    let _ = writeln!(
        out,
        "# HELP krest_workers_live Live worker instances (heartbeating), by app.\n# TYPE krest_workers_live gauge"
    );
    for (app, n) in &s.workers {
        let _ = writeln!(out, "krest_workers_live{{app=\"{}\"}} {n}", label(app));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::new(&LATENESS_BUCKETS);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(120));
        h.observe_ms(-5);
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.01\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"60\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_count 4\n"), "{out}");
        assert!(out.contains("x_seconds_sum 120.0075\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
