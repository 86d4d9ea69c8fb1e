//! Test harness for Krest: real processes, no mocks.
//!
//! - [`NatsServer`]: a real `nats-server` with JetStream on a free loopback port and its own
//!   temporary store directory, killed (and its directory removed) on drop; [`NatsServer::restart`]
//!   keeps port and store, [`NatsServer::kill`] is a SIGKILL.
//! - [`Proc`]: a child process (a `krest` node, a worker) killed on drop, with SIGKILL, SIGTERM,
//!   SIGSTOP and SIGCONT helpers and its output captured to a file.
//! - [`eventually`]: wait for a condition with a deadline instead of sleeping.
//! - [`PgDatabase`]: a fresh PostgreSQL database per test, dropped at the end.
//! - [`webdriver::Browser`]: headless Chromium through `chromedriver` (W3C WebDriver over HTTP).
//!
//! The `nats-server` binary is taken from `$NATS_SERVER`, else from `PATH`. Set
//! `KREST_KEEP_TEST_DIRS=1` to keep temporary directories (stores, logs) for inspection.

#![allow(clippy::unwrap_used)]

pub mod webdriver;

use std::fs;
use std::future::Future;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A temporary directory that is kept when `KREST_KEEP_TEST_DIRS` is set.
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates a new directory under the system temp dir, named after `prefix`.
    pub fn new(prefix: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("krest-{prefix}-"))
            .tempdir()
            .unwrap();
        let path = dir.path().to_path_buf();
        if std::env::var_os("KREST_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test dir {}", path.display());
            let _ = dir.keep();
            TestDir { dir: None, path }
        } else {
            TestDir {
                dir: Some(dir),
                path,
            }
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn is_temporary(&self) -> bool {
        self.dir.is_some()
    }
}

/// Reserves a free TCP port on 127.0.0.1 (bound, then released for the caller to use).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The nats-server to run: `NATS_SERVER`, else the one on `PATH` or in the usual places.
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    for p in ["/usr/sbin/nats-server", "/usr/local/bin/nats-server"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("nats-server not found: install it (apt-get install nats-server) or set NATS_SERVER")
}

/// A real nats-server with JetStream, on its own port and store directory.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TestDir,
    extra_args: Vec<String>,
}

impl NatsServer {
    /// Starts a single JetStream-enabled server on a free loopback port.
    pub fn start() -> NatsServer {
        NatsServer::start_with_args(&[])
    }

    /// Starts a server with extra command-line arguments (e.g. `["-c", "conf"]`).
    pub fn start_with_args(extra: &[&str]) -> NatsServer {
        let mut server = NatsServer {
            child: None,
            // Chosen by the server (`-p -1`) and read from its log: a port picked here and
            // released could be taken by another test's server before this one binds it.
            port: 0,
            dir: TestDir::new("nats"),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        server
    }

    /// Starts a JetStream cluster of `n` servers on loopback (routes between all of them,
    /// cluster name `krest`, server names `n1`…). Servers can be killed and restarted one by
    /// one; JetStream needs a majority up.
    pub fn start_cluster(n: usize) -> Vec<NatsServer> {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_urls = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers: Vec<NatsServer> = routes
            .iter()
            .enumerate()
            .map(|(i, route)| NatsServer {
                child: None,
                port: free_port(),
                dir: TestDir::new(&format!("nats-n{}", i + 1)),
                extra_args: vec![
                    "--server_name".into(),
                    format!("n{}", i + 1),
                    "--cluster_name".into(),
                    "krest".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".into(),
                    route_urls.clone(),
                ],
            })
            .collect();
        for s in &mut servers {
            s.spawn();
        }
        servers
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats-server.log"))
            .unwrap();
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let log_start = fs::metadata(self.dir.join("nats-server.log"))
            .map(|m| m.len())
            .unwrap_or(0);
        let child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &port, "-js"])
            .arg("-sd")
            .arg(self.dir.join("store"))
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.port == 0 {
            // `Listening for client connections on 127.0.0.1:PORT`, in this start's part of
            // the log.
            let log = self.log();
            let tail = log
                .get(usize::try_from(log_start).unwrap_or(0)..)
                .unwrap_or("");
            if let Some(port) = tail
                .lines()
                .find_map(|l| l.split("client connections on ").nth(1))
                .and_then(|a| a.trim().rsplit(':').next())
                .and_then(|p| p.parse().ok())
            {
                self.port = port;
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nats-server exited with {status} before listening; log:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not say which port it listens on within 20 s; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "nats-server exited with {status} before listening; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {} within 20 s; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's OS process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("nats-server.log")).unwrap_or_default()
    }

    /// SIGKILLs the server; its store stays for [`NatsServer::start_again`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "server is still running");
        self.spawn();
    }

    /// SIGKILL, then start again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if !self.dir.is_temporary() {
            eprintln!("nats-server log kept in {}", self.dir.path().display());
        }
    }
}

/// A child process killed on drop, its stdout and stderr captured to a file.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with output appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Output so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} {} failed", self.name);
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for exit; returns whether it exited successfully.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        if self.child.is_none() {
            return false;
        }
        self.signal("-TERM");
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.success();
            }
            if Instant::now() > deadline {
                self.kill9();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP: the process freezes.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: the process resumes.
    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- output of {} ----\n{}",
                self.name,
                tail(&self.output(), 200)
            );
        }
    }
}

/// CPU time and memory of a running process, read from `/proc` (Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStats {
    /// User plus system CPU time so far, in seconds.
    pub cpu_secs: f64,
    /// Peak resident set size so far (`VmHWM`), in bytes.
    pub peak_rss: u64,
    /// Resident set size now (`VmRSS`), in bytes.
    pub rss: u64,
}

impl ProcStats {
    /// Reads the stats of process `pid`; `None` if it is gone or `/proc` is unreadable.
    pub fn of(pid: u32) -> Option<ProcStats> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the full line: 11 and 12 here (0-based).
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Some(ProcStats {
            // The kernel's USER_HZ is 100 on every Linux this runs on.
            cpu_secs: ticks / 100.0,
            peak_rss: kib("VmHWM:") * 1024,
            rss: kib("VmRSS:") * 1024,
        })
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Initializes `tracing` output for tests once (honours `RUST_LOG`, default `warn`).
pub fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_server_starts_restarts_and_stops() {
        let mut s = NatsServer::start();
        let port = s.port();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        s.restart();
        assert_eq!(s.port(), port);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        s.kill();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}

/// Where the Postgres tests find a server: `$KREST_TEST_POSTGRES`, a URL of its maintenance
/// database (the tests create and drop their own databases through it).
pub fn postgres_server_url() -> String {
    std::env::var("KREST_TEST_POSTGRES")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A fresh PostgreSQL database (`krest_test_<random>`) created through the server of
/// [`postgres_server_url`] with `psql`, dropped (connections forced off) on drop.
///
/// A server that cannot be reached fails the test with how to start one: Postgres tests are
/// never skipped silently.
#[derive(Debug)]
pub struct PgDatabase {
    name: String,
    server: String,
    url: String,
}

impl PgDatabase {
    /// Creates the database.
    pub fn create() -> PgDatabase {
        let server = postgres_server_url();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "krest_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos()
        );
        psql(&server, &format!("CREATE DATABASE {name}"));
        let url = match server.rsplit_once('/') {
            Some((base, last)) if !base.ends_with('/') => {
                let query = last.split_once('?').map(|(_, q)| format!("?{q}"));
                format!("{base}/{name}{}", query.unwrap_or_default())
            }
            _ => panic!("KREST_TEST_POSTGRES must name a database, like postgres://postgres@127.0.0.1:5432/postgres (got {server})"),
        };
        PgDatabase { name, server, url }
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `sql` in it with `psql` and returns the output (unaligned, tuples only).
    pub fn query(&self, sql: &str) -> String {
        psql(&self.url, sql)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                self.server.as_str(),
                "-Atqc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-Atqc", sql])
        .output();
    let how = "start PostgreSQL (scripts/ensure-postgres.sh installs and starts it: apt-get install -y postgresql; pg_ctlcluster 15 main start) or point KREST_TEST_POSTGRES at a server whose user may create databases";
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => panic!(
            "Postgres test database: `{sql}` failed at {url}: {}; {how}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("Postgres test database: cannot run psql ({e}); {how}"),
    }
}
