//! What the end-to-end benchmarks share: a worker process (this bench binary again, in worker
//! mode, or `py_worker.py` on the Python SDK) whose no-op handler notes when each run started,
//! `krest` CLI calls, scheduler node processes, and figures (percentiles, sizes).

#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use krest_test_support::Proc;

/// App of the benchmark's jobs and workers.
pub(crate) const APP: &str = "bench";

/// Whether to run at the tiny size CI uses (`KREST_BENCH_TINY` set).
pub(crate) fn tiny() -> bool {
    std::env::var_os("KREST_BENCH_TINY").is_some()
}

/// The value after `--flag` on the command line, parsed.
pub(crate) fn flag<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    let v = args
        .get(i + 1)
        .unwrap_or_else(|| panic!("{name} needs a value"));
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}: cannot read {v:?}")),
    )
}

/// One handler start, as the worker saw it (epoch ms).
#[derive(Debug, Clone)]
pub(crate) struct Start {
    pub(crate) run_id: String,
    pub(crate) shard: u32,
    pub(crate) scheduled_ms: i64,
    pub(crate) dispatched_ms: i64,
    pub(crate) start_ms: i64,
}

/// If this process was started as a worker (`BENCH __worker NATS_URL OUT_FILE SLOTS`), runs
/// it and returns true. Its no-op handler `noop` notes each start; they are written to
/// OUT_FILE (one `run_id shard scheduled dispatched start` line each) when it is stopped with
/// SIGTERM.
pub(crate) fn run_worker_if_asked() -> bool {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("__worker") {
        return false;
    }
    let (url, out, slots) = (&args[2], &args[3], args[4].parse::<u32>().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let starts: Arc<Mutex<Vec<Start>>> = Arc::default();
        let noted = starts.clone();
        let worker = krest_worker::Worker::builder(APP)
            .nats_url(url.as_str())
            .slots(slots)
            .handler("noop", move |ctx: krest_worker::JobContext| {
                let start_ms = Utc::now().timestamp_millis();
                let start = Start {
                    run_id: ctx.run_id().to_string(),
                    shard: ctx.shard_index(),
                    scheduled_ms: ctx.scheduled_at().timestamp_millis(),
                    dispatched_ms: ctx.run().dispatched_at.timestamp_millis(),
                    start_ms,
                };
                noted.lock().unwrap().push(start);
                async { Ok::<_, krest_worker::JobError>(()) }
            })
            .build()
            .unwrap();
        worker.run(krest_worker::shutdown_signal()).await.unwrap();
        let mut f = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
        for s in starts.lock().unwrap().iter() {
            writeln!(
                f,
                "{} {} {} {} {}",
                s.run_id, s.shard, s.scheduled_ms, s.dispatched_ms, s.start_ms
            )
            .unwrap();
        }
        f.flush().unwrap();
    });
    true
}

/// A worker process of this bench binary.
pub(crate) struct BenchWorker {
    pub(crate) proc: Proc,
    out: PathBuf,
}

impl BenchWorker {
    /// Starts one with `slots` concurrent runs.
    pub(crate) fn start(name: &str, url: &str, dir: &Path, slots: u32) -> BenchWorker {
        let out = dir.join(format!("{name}.starts"));
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["__worker", url])
            .arg(&out)
            .arg(slots.to_string())
            .env("RUST_LOG", "warn");
        BenchWorker {
            proc: Proc::spawn(name, cmd, dir.join(format!("{name}.log"))),
            out,
        }
    }

    /// Starts one on the Python SDK instead: `py_worker.py` run by `python` (a venv's python
    /// with `krest_worker` installed, or found through `PYTHONPATH`), the same no-op handler.
    pub(crate) fn start_python(
        name: &str,
        url: &str,
        dir: &Path,
        slots: u32,
        python: &str,
    ) -> BenchWorker {
        let out = dir.join(format!("{name}.starts"));
        let script = dir.join("py_worker.py");
        std::fs::write(&script, include_str!("py_worker.py")).unwrap();
        let mut cmd = Command::new(python);
        cmd.arg(&script).arg(url).arg(&out).arg(slots.to_string());
        BenchWorker {
            proc: Proc::spawn(name, cmd, dir.join(format!("{name}.log"))),
            out,
        }
    }

    /// Stops it (SIGTERM) and reads the starts it noted.
    pub(crate) fn stop(mut self) -> Vec<Start> {
        assert!(
            self.proc.terminate(Duration::from_secs(60)),
            "the worker did not stop: {}",
            self.proc.output()
        );
        std::fs::read_to_string(&self.out)
            .unwrap()
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                Start {
                    run_id: f[0].to_string(),
                    shard: f[1].parse().unwrap(),
                    scheduled_ms: f[2].parse().unwrap(),
                    dispatched_ms: f[3].parse().unwrap(),
                    start_ms: f[4].parse().unwrap(),
                }
            })
            .collect()
    }
}

/// Runs `krest --nats-url URL ARGS…`.
pub(crate) fn krest(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_krest"))
        .args(["--nats-url", url])
        .args(args)
        .output()
        .unwrap()
}

/// Runs `krest`, panicking with its stderr if it fails; returns its stdout.
pub(crate) fn krest_ok(url: &str, args: &[&str]) -> String {
    let out = krest(url, args);
    assert!(
        out.status.success(),
        "krest {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Starts a `krest scheduler` node named `name` with a SQLite database in `dir`.
pub(crate) fn start_node(name: &str, url: &str, dir: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_krest"));
    cmd.args([
        "scheduler",
        "--nats-url",
        url,
        "--node",
        name,
        "--http",
        "off",
    ])
    .arg("--db")
    .arg(format!(
        "sqlite://{}",
        dir.join(format!("{name}.db")).display()
    ))
    .env("KREST_LOG", "warn");
    Proc::spawn(name, cmd, dir.join(format!("{name}.log")))
}

/// Waits until a node answers the API.
pub(crate) fn wait_for_api(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !krest(url, &["--timeout", "2s", "cluster", "status"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "no node answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Applies `docs` (job definitions) from a file in `dir`.
pub(crate) fn apply(url: &str, dir: &Path, docs: &[serde_json::Value]) {
    let file = dir.join("jobs.json");
    std::fs::write(&file, serde_json::to_vec(docs).unwrap()).unwrap();
    krest_ok(
        url,
        &[
            "--timeout",
            "120s",
            "job",
            "apply",
            "-f",
            file.to_str().unwrap(),
        ],
    );
}

/// Sleeps until epoch ms `ms` (wall clock).
pub(crate) fn sleep_until(ms: i64) {
    let wait = ms - Utc::now().timestamp_millis();
    if wait > 0 {
        std::thread::sleep(Duration::from_millis(wait as u64));
    }
}

/// `p50 / p99 / max` of `v` (sorted here), in ms.
pub(crate) fn pcts(v: &mut [i64]) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort_unstable();
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    format!(
        "p50 {} / p99 {} / max {} ms",
        at(0.50),
        at(0.99),
        v[v.len() - 1]
    )
}

/// `min / median / max` of `v` (sorted here), in ms.
pub(crate) fn spread(v: &mut [i64]) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort_unstable();
    format!(
        "min {} / median {} / max {} ms",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// Counts the runs of a node's SQLite file matching a `SELECT COUNT(*)` whose `?` parameters
/// are `job_group` and then `nums`, on one read-only connection kept open between polls.
pub(crate) struct RunCounter<'a> {
    rt: &'a tokio::runtime::Runtime,
    conn: sqlx::SqliteConnection,
}

impl<'a> RunCounter<'a> {
    /// Opens the node's database `db` read-only.
    pub(crate) fn open(rt: &'a tokio::runtime::Runtime, db: &Path) -> RunCounter<'a> {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db)
            .read_only(true);
        let conn = rt
            .block_on(<sqlx::SqliteConnection as sqlx::Connection>::connect_with(
                &opts,
            ))
            .unwrap();
        RunCounter { rt, conn }
    }

    /// The count `sql` answers for `group` and `nums`.
    pub(crate) fn count(&mut self, sql: &str, group: &str, nums: &[i64]) -> usize {
        let mut q = sqlx::query_scalar::<_, i64>(sql).bind(group.to_string());
        for n in nums {
            q = q.bind(*n);
        }
        let n = self.rt.block_on(q.fetch_one(&mut self.conn)).unwrap();
        usize::try_from(n).unwrap()
    }
}

/// Bytes as MiB.
pub(crate) fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
}
