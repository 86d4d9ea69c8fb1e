//! Every node's in-memory copy of the job definitions, kept current by watching the jobs
//! bucket. The engine learns which keys changed through a channel and re-reads them here.
//!
//! The table is ordered by key, so `job.list` reads one page as a range
//! ([`JobTable::page`]) without copying or sorting the rest, and it remembers the newest
//! bucket revision its watch applied ([`JobTable::wait_seen`]): a writer that knows the
//! bucket's last revision can wait until the table shows everything up to it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use krest_schemas::names::JOBS_BUCKET;
use krest_schemas::text::echo;
use krest_schemas::{Interner, StoredJob};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// One job as the table holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEntry {
    /// The stored definition.
    pub stored: StoredJob,
    /// Its revision in the jobs bucket (shared by all jobs): what writes are checked against.
    pub revision: u64,
    /// Its revision number among the job's own revisions ([`number_history`]): what users see.
    pub version: u64,
}

/// Why a job's revision numbers could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the history of job {key}: {reason}")]
pub struct HistoryError {
    /// The job's key.
    pub key: String,
    /// What failed.
    pub reason: String,
}

/// The revision number an entry of the jobs bucket carries: a definition's `version`, a
/// deletion marker's ([`krest_schemas::job::DeletedJob`]); `None` for definitions written
/// before jobs were numbered, deletions without a body and purges.
pub fn recorded_number(value: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Numbered {
        #[serde(default)]
        version: u64,
    }
    serde_json::from_slice::<Numbered>(value)
        .ok()
        .map(|n| n.version)
        .filter(|n| *n > 0)
}

/// Numbers a key's history, oldest first, from what each entry carries
/// ([`recorded_number`]): an entry with a number keeps it, one without takes one more than
/// the entry before it (the first, 1). Definitions written before jobs were numbered are so
/// numbered by their place in the history the bucket keeps.
pub fn number_history(recorded: impl IntoIterator<Item = Option<u64>>) -> Vec<u64> {
    let mut last = 0u64;
    recorded
        .into_iter()
        .map(|n| {
            last = n.unwrap_or(last.saturating_add(1));
            last
        })
        .collect()
}

/// The history of `key` the bucket keeps, oldest first, each entry with its revision number.
pub async fn numbered_history(
    bucket: &kv::Store,
    key: &str,
) -> Result<Vec<(kv::Entry, u64)>, HistoryError> {
    let failed = |e: &dyn std::fmt::Display| HistoryError {
        key: key.to_string(),
        reason: e.to_string(),
    };
    let mut entries = bucket.history(key).await.map_err(|e| failed(&e))?;
    let mut all = Vec::new();
    while let Some(entry) = entries.next().await {
        all.push(entry.map_err(|e| failed(&e))?);
    }
    let numbers = number_history(all.iter().map(|e| recorded_number(&e.value)));
    Ok(all.into_iter().zip(numbers).collect())
}

/// The revision number of `entry`, the bucket's entry for `key`: the number it carries, or
/// (for an entry written before jobs were numbered) the one its place in the key's history
/// gives it — the only case that reads the history.
pub async fn number_of(
    bucket: &kv::Store,
    key: &str,
    entry: &kv::Entry,
) -> Result<u64, HistoryError> {
    if let Some(n) = recorded_number(&entry.value) {
        return Ok(n);
    }
    let history = numbered_history(bucket, key).await?;
    Ok(history
        .iter()
        .take_while(|(e, _)| e.revision <= entry.revision)
        .last()
        .map_or(1, |(_, n)| *n))
}

/// The shared job table.
#[derive(Debug)]
pub struct JobTable {
    /// Keyed by `group.name`, each key one shared string ([`JobTable::get_shared`]).
    jobs: RwLock<BTreeMap<Arc<str>, Arc<JobEntry>>>,
    /// Bumped on every change, so writers can wait to read their own writes.
    version: watch::Sender<u64>,
    /// The newest bucket revision (stream sequence) the watch has applied.
    seen: watch::Sender<u64>,
    /// The texts jobs repeat (app, cron, time zone, path), one copy each for the whole
    /// table ([`krest_schemas::JobSpec::intern`]).
    texts: Mutex<Interner>,
    /// Changes applied to `jobs` since the last [`JobTable::announce`], and the newest
    /// revision applied: announced to waiters in one go rather than entry by entry (waking
    /// the watch channels' waiters cost a tenth of a node's start with 1,000,000 jobs).
    unannounced: AtomicBool,
    applied: AtomicU64,
    /// How far the first read of the bucket has got ([`JobTable::loaded`]).
    load: Load,
}

impl Default for JobTable {
    fn default() -> Self {
        JobTable {
            jobs: RwLock::default(),
            version: watch::channel(0).0,
            seen: watch::channel(0).0,
            texts: Mutex::default(),
            unannounced: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            load: Load::default(),
        }
    }
}

/// The first read of the jobs bucket: entries read, entries left, and whether it is done.
#[derive(Debug)]
struct Load {
    /// Read to the end and not held: what [`JobTable::loaded`] shows.
    loaded: watch::Sender<bool>,
    done: AtomicBool,
    held: AtomicBool,
    read: AtomicU64,
    pending: AtomicU64,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            loaded: watch::channel(false).0,
            done: AtomicBool::new(false),
            held: AtomicBool::new(false),
            read: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        }
    }
}

impl Load {
    /// Publishes `done && !held` (computed under the channel's lock, so concurrent changes
    /// cannot leave it stale).
    fn update(&self) {
        self.loaded.send_if_modified(|loaded| {
            let now = self.done.load(Ordering::SeqCst) && !self.held.load(Ordering::SeqCst);
            let changed = *loaded != now;
            *loaded = now;
            changed
        });
    }
}

/// How far a node has read the jobs bucket since it started ([`JobTable::load_progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    /// The table holds the bucket's content: the node may lead.
    pub loaded: bool,
    /// Entries read so far.
    pub read: u64,
    /// Entries still to read, as the server last said.
    pub pending: u64,
}

impl std::fmt::Display for LoadProgress {
    /// `loaded`, or `loading jobs: 412,000 read, 588,000 to go`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.loaded {
            return write!(f, "loaded");
        }
        write!(f, "loading jobs: {} read", thousands(self.read))?;
        if self.pending > 0 {
            write!(f, ", {} to go", thousands(self.pending))?;
        }
        Ok(())
    }
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Why a job name could not be resolved to a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No such job (it went away meanwhile).
    #[error("no job named `{}`: see `krest job list`", echo(.0))]
    NotFound(String),
    /// No job has this name; `suggestions` are the closest names there are.
    #[error("no job named `{}`{}", echo(.name), did_you_mean(.suggestions))]
    Unknown {
        /// The name given.
        name: String,
        /// Up to three existing `group.name` keys close to it, closest first.
        suggestions: Vec<String>,
    },
    /// The bare name exists in several groups.
    #[error("`{}` names jobs in several groups: use one of {candidates:?}", echo(.name))]
    Ambiguous {
        /// The name given.
        name: String,
        /// The matching `group.name` keys.
        candidates: Vec<String>,
    },
}

/// `; did you mean a.b or c.d?`, or a pointer to the job list.
fn did_you_mean(suggestions: &[String]) -> String {
    match suggestions {
        [] => ": see `krest job list`".into(),
        [one] => format!("; did you mean {one}?"),
        [init @ .., last] => format!("; did you mean {} or {last}?", init.join(", ")),
    }
}

/// The edit distance between `a` and `b` if it is at most `max` (a banded Levenshtein, so a
/// far-off name costs little).
fn distance_within(a: &str, b: &str, max: usize) -> Option<usize> {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.len().abs_diff(b.len()) > max {
        return None;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        let mut row_min = cur[0];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
            row_min = row_min.min(cur[j + 1]);
        }
        if row_min > max {
            return None;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    Some(prev[b.len()]).filter(|d| *d <= max)
}

/// Existing keys close to `name` (a bare name or `group.name`): within a few edits of the
/// key or of its job name, or containing it; closest first, at most three.
fn suggestions<'a>(name: &str, keys: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    let lower = name.to_lowercase();
    let max = (name.chars().count() / 4).clamp(1, 3);
    let mut found: Vec<(usize, &str)> = keys
        .filter_map(|(key, job_name)| {
            let d = distance_within(&lower, &key.to_lowercase(), max)
                .or_else(|| distance_within(&lower, &job_name.to_lowercase(), max))
                .or_else(|| {
                    (lower.len() >= 3 && key.to_lowercase().contains(&lower)).then_some(max + 1)
                })?;
            Some((d, key))
        })
        .collect();
    found.sort();
    found
        .into_iter()
        .take(3)
        .map(|(_, k)| k.to_string())
        .collect()
}

impl JobTable {
    /// The entry for `key`.
    pub fn get(&self, key: &str) -> Option<Arc<JobEntry>> {
        self.jobs.read().ok()?.get(key).cloned()
    }

    /// The entry for `key`, with the table's copy of the key (shared with the leader's
    /// schedules: [`crate::leader::engine::Schedules::set_shared`]).
    pub fn get_shared(&self, key: &str) -> Option<(Arc<str>, Arc<JobEntry>)> {
        self.jobs
            .read()
            .ok()?
            .get_key_value(key)
            .map(|(k, e)| (k.clone(), e.clone()))
    }

    /// Every entry, by key.
    pub fn all(&self) -> Vec<(Arc<str>, Arc<JobEntry>)> {
        self.jobs
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Number of jobs.
    pub fn len(&self) -> usize {
        self.jobs.read().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether the table has no job.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `n` entries by key, starting at `start` (inclusive), of group `group` if given,
    /// that pass `keep`: one page of a listing, read as a range of the ordered table.
    pub fn page(
        &self,
        start: Option<&str>,
        group: Option<&str>,
        keep: impl Fn(&JobEntry) -> bool,
        n: usize,
    ) -> Vec<(String, Arc<JobEntry>)> {
        let Ok(jobs) = self.jobs.read() else {
            return Vec::new();
        };
        let prefix = group.map(|g| format!("{g}."));
        let from = match (start, prefix.as_deref()) {
            (Some(s), Some(p)) => s.max(p),
            (Some(s), None) => s,
            (None, Some(p)) => p,
            (None, None) => "",
        };
        jobs.range::<str, _>((Bound::Included(from), Bound::Unbounded))
            .take_while(|(k, _)| prefix.as_deref().is_none_or(|p| k.starts_with(p)))
            .filter(|(_, e)| keep(e))
            .take(n)
            .map(|(k, e)| (k.to_string(), e.clone()))
            .collect()
    }

    /// The newest bucket revision the watch has applied: every change up to it is in the
    /// table, and its key was sent on the watch's change channel before this says so.
    pub fn seen(&self) -> u64 {
        *self.seen.borrow()
    }

    /// Records that the watch applied bucket revision `revision`; [`JobTable::seen`] says so
    /// from the next [`JobTable::announce`].
    pub fn note_seen(&self, revision: u64) {
        self.applied.fetch_max(revision, Ordering::SeqCst);
    }

    /// Tells those waiting ([`JobTable::wait_for`], [`JobTable::wait_seen`]) about the
    /// changes applied since the last call. The watch calls it whenever it has no entry at
    /// hand, and at least every [`ANNOUNCE_EVERY`] entries.
    pub fn announce(&self) {
        if self.unannounced.swap(false, Ordering::SeqCst) {
            self.version.send_modify(|v| *v += 1);
        }
        let revision = self.applied.load(Ordering::SeqCst);
        self.seen.send_if_modified(|seen| {
            let newer = revision > *seen;
            if newer {
                *seen = revision;
            }
            newer
        });
    }

    /// Waits (up to `timeout`) until the watch has applied bucket revision `revision` or a
    /// later one; returns whether it has.
    pub async fn wait_seen(&self, revision: u64, timeout: Duration) -> bool {
        let mut seen = self.seen.subscribe();
        tokio::time::timeout(timeout, seen.wait_for(|s| *s >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Turns true once the node's first read of the jobs bucket has reached the end of what
    /// the bucket held: before that the table lacks jobs, and a node must neither lead (the
    /// election waits for it) nor say it is ready. It never turns false again.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.load.loaded.subscribe()
    }

    /// Whether the table is loaded ([`JobTable::loaded`]), with how far the reading has got.
    pub fn load_progress(&self) -> LoadProgress {
        LoadProgress {
            loaded: *self.load.loaded.borrow(),
            read: self.load.read.load(Ordering::Relaxed),
            pending: self.load.pending.load(Ordering::Relaxed),
        }
    }

    /// Notes one entry of the first read, with how many the server says follow it.
    fn note_read(&self, pending: u64) {
        if !self.load.done.load(Ordering::Relaxed) {
            self.load.read.fetch_add(1, Ordering::Relaxed);
            self.load.pending.store(pending, Ordering::Relaxed);
        }
    }

    /// The first read has reached the end of the bucket.
    fn mark_loaded(&self) {
        self.load.pending.store(0, Ordering::Relaxed);
        if !self.load.done.swap(true, Ordering::SeqCst) {
            self.load.update();
        }
    }

    /// Holds the table as not loaded, whatever the watch has read, until
    /// [`JobTable::release_load`] (a test hook: a standby still loading must not campaign).
    pub fn hold_load(&self) {
        self.load.held.store(true, Ordering::SeqCst);
        self.load.update();
    }

    /// Ends [`JobTable::hold_load`].
    pub fn release_load(&self) {
        self.load.held.store(false, Ordering::SeqCst);
        self.load.update();
    }

    /// Resolves `group.name` or a bare `name` unique across groups to a key.
    pub fn resolve(&self, name: &str) -> Result<String, ResolveError> {
        let jobs = self
            .jobs
            .read()
            .map_err(|_| ResolveError::NotFound(name.to_string()))?;
        if jobs.contains_key(name) {
            return Ok(name.to_string());
        }
        if let Some((group, job)) = name.split_once('/') {
            let key = krest_schemas::names::job_key(group, job);
            if jobs.contains_key(key.as_str()) {
                return Ok(key);
            }
        }
        let mut candidates: Vec<String> = jobs
            .iter()
            .filter(|(_, e)| e.stored.spec.job_name == name)
            .map(|(k, _)| k.to_string())
            .collect();
        candidates.sort();
        match candidates.len() {
            0 => Err(ResolveError::Unknown {
                name: name.to_string(),
                suggestions: suggestions(
                    name,
                    jobs.iter()
                        .map(|(k, e)| (&**k, e.stored.spec.job_name.as_str())),
                ),
            }),
            1 => Ok(candidates.remove(0)),
            _ => Err(ResolveError::Ambiguous {
                name: name.to_string(),
                candidates,
            }),
        }
    }

    /// Waits (up to `timeout`) until `key` is at `revision` or later — or absent, for
    /// `None` — so an API call reads its own write.
    pub async fn wait_for(&self, key: &str, revision: Option<u64>, timeout: Duration) {
        let mut version = self.version.subscribe();
        let reached = || {
            let current = self.get(key).map(|e| e.revision);
            match revision {
                Some(rev) => current.is_some_and(|c| c >= rev),
                None => current.is_none(),
            }
        };
        let _ = tokio::time::timeout(timeout, async {
            while !reached() {
                if version.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Applies `entry` (announced later: [`JobTable::announce`]), its repeated texts shared
    /// with the table's other jobs; whether it changed the table.
    fn upsert(&self, key: String, mut entry: JobEntry) -> bool {
        if let Ok(mut texts) = self.texts.lock() {
            entry.stored.spec.intern(&mut texts);
        }
        let revision = entry.revision;
        let changed = match self.jobs.write() {
            // An existing key keeps its copy (shared with the schedules).
            Ok(mut m) => {
                m.insert(Arc::from(key), Arc::new(entry))
                    .map(|e| e.revision)
                    != Some(revision)
            }
            Err(_) => false,
        };
        self.unannounced.store(true, Ordering::SeqCst);
        changed
    }

    /// Removes `key` (announced later: [`JobTable::announce`]); whether it was there.
    fn remove(&self, key: &str) -> bool {
        let removed = self
            .jobs
            .write()
            .map(|mut m| m.remove(key).is_some())
            .unwrap_or(false);
        self.unannounced.store(true, Ordering::SeqCst);
        removed
    }
}

/// Reads a stored definition, checking it as `krest job apply` would (but for the size limits).
fn parse_stored(value: &[u8]) -> Result<StoredJob, String> {
    let mut stored = serde_json::from_slice::<StoredJob>(value).map_err(|e| {
        format!(
            "malformed job definition: {}",
            krest_schemas::redact::text(&krest_schemas::text::shorten_quoted(&e.to_string()))
        )
    })?;
    // Without the size limits: a definition stored before a limit existed keeps running.
    // Stored definitions are normalized already, so the checked spec (not a copy) is kept.
    stored.spec = stored.spec.validate_stored().map_err(|e| e.to_string())?;
    Ok(stored)
}

/// At most this many entries applied between two [`JobTable::announce`]s.
pub const ANNOUNCE_EVERY: u32 = 1024;

/// Watches the jobs bucket into `table` until `stop`, sending each changed key on `changes`
/// with the bucket revision that changed it, in bucket order, once the table is loaded (the
/// engine reads the whole table when it takes over, which it does only once the table is
/// loaded). The table turns [`JobTable::loaded`] once the bucket's current content is read.
pub async fn watch_jobs(
    js: async_nats::jetstream::Context,
    bucket: kv::Store,
    table: Arc<JobTable>,
    changes: mpsc::UnboundedSender<(String, u64)>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    let started = std::time::Instant::now();
    let loaded = |table: &JobTable| {
        table.announce();
        if !table.load.done.load(Ordering::Relaxed) {
            tracing::info!(
                jobs = table.len(),
                entries = table.load.read.load(Ordering::Relaxed),
                seconds = started.elapsed().as_secs_f64(),
                "job table loaded"
            );
        }
        table.mark_loaded();
    };
    while !stop.is_cancelled() {
        let state = match crate::infra::bucket_state(&js, JOBS_BUCKET).await {
            Ok(state) => Some(state),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the jobs bucket status");
                None
            }
        };
        if state.as_ref().is_some_and(|s| s.messages == 0) {
            loaded(&table);
        }
        // The first read of a bucket whose every key holds one entry (no older revisions)
        // reads it from its start: the same entries in the same order as the last entry per
        // key, which nats-server 2.9 delivers for about 60 % of the CPU (BENCHMARKS.md, "A
        // standby that is still loading the job table"). A write in between adds at most an
        // older revision before its newer one, while nothing reads changes yet. Later
        // (re)opened watches, and buckets with history, ask for the last entry per key.
        let one_entry_per_key = !table.load.done.load(Ordering::SeqCst)
            && state
                .as_ref()
                .is_some_and(|s| s.messages > 0 && s.messages == s.subjects_count);
        let opened = if one_entry_per_key {
            bucket.watch_all_from_revision(1).await
        } else {
            bucket.watch_with_history(">").await
        };
        let mut watch = match opened {
            Ok(w) => {
                failures = 0;
                w
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "cannot watch job definitions; retrying");
                if !crate::retry::pause(&stop, krest_schemas::Backoff::RECONNECT, failures).await {
                    return;
                }
                continue;
            }
        };
        let mut last_revision = 0u64;
        let mut unannounced = 0u32;
        loop {
            if unannounced >= ANNOUNCE_EVERY {
                table.announce();
                unannounced = 0;
            }
            // Entries at hand are applied first and announced together.
            let ready = futures_util::FutureExt::now_or_never(watch.next());
            let item = if let Some(item) = ready {
                item
            } else {
                table.announce();
                unannounced = 0;
                tokio::select! {
                item = watch.next() => item,
                // While idle, check that the bucket has no revision we have not seen: a watch
                // whose server died can stall silently; it is then restarted.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    match crate::infra::bucket_state(&js, JOBS_BUCKET).await {
                        Ok(state) if state.last_sequence > last_revision => {
                            tracing::warn!(seen = last_revision, "job watch stalled; restarting it");
                            break;
                        }
                        _ => continue,
                    }
                }
                _ = stop.cancelled() => return,
                }
            };
            unannounced += 1;
            let mut entry = match item {
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "job watch failed; restarting it");
                    break;
                }
                None => break,
            };
            last_revision = last_revision.max(entry.revision);
            // Taken, not copied: nothing below reads the entry's own key.
            let key = std::mem::take(&mut entry.key);
            let changed = match entry.operation {
                kv::Operation::Put => match parse_stored(&entry.value) {
                    Ok(stored) => {
                        let version = match stored.version {
                            0 => number_of(&bucket, &key, &entry).await.unwrap_or_else(|e| {
                                tracing::warn!(error = %e, "numbering a definition by the one before it");
                                table.get(&key).map_or(1, |e| e.version + 1)
                            }),
                            n => n,
                        };
                        table.upsert(
                            key.clone(),
                            JobEntry {
                                stored,
                                revision: entry.revision,
                                version,
                            },
                        )
                    }
                    Err(reason) => {
                        tracing::error!(job = %key, revision = entry.revision, error = %reason, "ignoring a bad job definition in the jobs bucket (write definitions with `krest job apply`)");
                        let id = krest_schemas::names::parked_job_id(&key, entry.revision);
                        let source = krest_schemas::names::kv_subject(
                            krest_schemas::names::JOBS_BUCKET,
                            &key,
                        );
                        let parked = crate::deadletter::park(
                            &js,
                            "jobs",
                            &id,
                            &reason,
                            krest_schemas::deadletter::Origin {
                                subject: &source,
                                seq: Some(entry.revision),
                            },
                            entry.value.clone(),
                        );
                        if let Err(e) = parked.await {
                            tracing::warn!(job = %key, error = %e, "could not park the bad definition");
                        }
                        table.remove(&key)
                    }
                },
                kv::Operation::Delete | kv::Operation::Purge => table.remove(&key),
            };
            // Sent before the table says it has seen the revision: whoever reads `seen()` and
            // then drains the channel has every change up to it. Not while loading: nobody
            // leads from this table yet.
            if changed && table.load.done.load(Ordering::SeqCst) {
                let _ = changes.send((key, entry.revision));
            }
            table.note_seen(entry.revision);
            table.note_read(entry.delta);
            if entry.delta == 0 {
                loaded(&table);
            }
        }
        table.announce();
    }
}

#[cfg(test)]
mod resolve_tests {
    use super::*;

    #[test]
    fn histories_are_numbered_per_job() {
        assert_eq!(number_history([]), Vec::<u64>::new());
        // Written before jobs were numbered: by place.
        assert_eq!(number_history([None, None, None]), [1, 2, 3]);
        // Numbered entries keep their number; a purge (no number) follows the one before.
        assert_eq!(
            number_history([Some(4), Some(5), None, Some(7)]),
            [4, 5, 6, 7]
        );
        // Older entries numbered by place, then numbered ones continuing.
        assert_eq!(number_history([None, None, Some(3)]), [1, 2, 3]);
        assert_eq!(recorded_number(br#"{"version":3}"#), Some(3));
        assert_eq!(recorded_number(br#"{"spec":{},"version":0}"#), None);
        assert_eq!(recorded_number(b""), None);
        assert_eq!(recorded_number(b"not json"), None);
    }

    #[test]
    fn close_names_are_suggested() {
        let keys: Vec<(String, String)> = [
            ("default-jobGroup.demo-job3", "demo-job3"),
            ("default-jobGroup.demo-job2", "demo-job2"),
            ("billing.invoices", "invoices"),
            ("billing.reports", "reports"),
        ]
        .iter()
        .map(|(k, n)| (k.to_string(), n.to_string()))
        .collect();
        let s = |name: &str| suggestions(name, keys.iter().map(|(k, n)| (k.as_str(), n.as_str())));
        assert_eq!(
            s("demo-jb3"),
            ["default-jobGroup.demo-job3", "default-jobGroup.demo-job2"]
        );
        assert_eq!(s("invoice"), ["billing.invoices"]);
        assert_eq!(s("billing.invoces"), ["billing.invoices"]);
        assert_eq!(s("Reports"), ["billing.reports"]);
        assert!(s("zzzzzzzz").is_empty());
        assert_eq!(
            did_you_mean(&s("demo-jb3")),
            "; did you mean default-jobGroup.demo-job3 or default-jobGroup.demo-job2?"
        );
        assert_eq!(did_you_mean(&[]), ": see `krest job list`");
    }

    #[test]
    fn banded_distance() {
        assert_eq!(distance_within("kitten", "sitting", 3), Some(3));
        assert_eq!(distance_within("kitten", "sitting", 2), None);
        assert_eq!(distance_within("", "ab", 2), Some(2));
        assert_eq!(distance_within("abc", "abc", 0), Some(0));
    }
}

/// What the table and the leader's schedules hold per job. Run alone with
/// `KREST_TABLE_JOBS=100000 cargo test -p krest --lib table_memory -- --nocapture` it prints
/// the process's RSS growth per job (or profile it with heaptrack for where each byte goes).
#[cfg(test)]
mod memory_tests {
    use super::*;
    use crate::leader::engine::Schedules;
    use chrono::{TimeZone, Utc};
    use krest_schemas::Shared;

    fn rss() -> u64 {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * 4096)
    }

    /// The definitions of the benchmarks: `precision --cron` (no args, one expression) and
    /// `api --apply-only` (an object as args, 100 groups, 60 expressions).
    fn stored(i: usize, with_args: bool) -> Vec<u8> {
        let doc = if with_args {
            serde_json::json!({
                "appName": "bench", "jobGroup": format!("g{:02}", i % 100),
                "jobName": format!("job-{i:06}"), "path": "noop",
                "cron": format!("0 {} 3 1 1 ?", i % 60), "args": {"i": i}
            })
        } else {
            serde_json::json!({
                "appName": "bench", "jobGroup": "bench",
                "jobName": format!("j{i:06}"), "path": "noop", "cron": "0 0 3 1 1 ?"
            })
        };
        let at = Utc.with_ymd_and_hms(2026, 12, 4, 0, 0, 0).unwrap();
        let stored = StoredJob {
            spec: krest_schemas::parse_job(&doc).unwrap(),
            created_at: at,
            updated_at: at,
            version: 1,
        };
        serde_json::to_vec(&stored).unwrap()
    }

    #[test]
    fn table_memory_per_job() {
        let n: usize = std::env::var("KREST_TABLE_JOBS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        let entry_size = std::mem::size_of::<JobEntry>();
        println!(
            "sizes: JobEntry {entry_size} B, JobSpec {} B",
            std::mem::size_of::<krest_schemas::JobSpec>()
        );
        // Optional texts as `Box<str>`, rarely set parts boxed, the app a shared text (16
        // bytes, not a `String`'s 24): 424 bytes (432 with the app a `String`, 648 with
        // `String`s and unboxed parts).
        assert!(entry_size <= 424, "JobEntry is {entry_size} bytes");
        let mut kept = Vec::new();
        for with_args in [false, true] {
            let before = rss();
            let table = JobTable::default();
            for i in 0..n {
                let value = stored(i, with_args);
                let stored = parse_stored(&value).unwrap();
                let key = stored.spec.key();
                table.upsert(
                    key,
                    JobEntry {
                        stored,
                        revision: i as u64 + 1,
                        version: 1,
                    },
                );
            }
            let loaded = rss();
            let mut schedules = Schedules::default();
            for (key, entry) in table.all() {
                schedules.set_shared(key, Some(entry), None);
            }
            let scheduled = rss();
            println!(
                "{n} jobs {}: table {} B/job, schedules {} B/job (RSS growth)",
                if with_args {
                    "with args, 60 crons"
                } else {
                    "without args, one cron"
                },
                loaded.saturating_sub(before) / n as u64,
                scheduled.saturating_sub(loaded) / n as u64,
            );
            assert_eq!(table.len(), n);
            assert_eq!(schedules.len(), n);
            assert_eq!(
                schedules.distinct_schedules(),
                if with_args { 60 } else { 1 }
            );
            let (key, expected) = if with_args {
                ("g07.job-000007", r#"{"i":7}"#)
            } else {
                ("bench.j000007", "null")
            };
            // args are one buffer of compact JSON, not a tree of values.
            let entry = table.get(key).unwrap();
            assert_eq!(entry.stored.spec.args.json(), expected);
            // One copy of the key for the table, the schedule's map and its heap entry.
            assert_eq!(schedules.key_copies(key), Some(3));
            // One copy of each repeated text for the whole table: app, cron, time zone and path
            // of a job 60 keys on (the same cron in both shapes) are the same copies.
            let other = table
                .get(if with_args {
                    "g67.job-000067"
                } else {
                    "bench.j000067"
                })
                .unwrap();
            let (a, b) = (&entry.stored.spec, &other.stored.spec);
            for (field, x, y) in [
                ("appName", &a.app_name, &b.app_name),
                ("timeZone", &a.time_zone, &b.time_zone),
                ("path", &a.path, &b.path),
                ("cron", a.cron.as_ref().unwrap(), b.cron.as_ref().unwrap()),
            ] {
                assert_eq!(x, y);
                assert!(Shared::same_copy(x, y), "{field} is one copy");
            }

            // Kept to the end, so the next shape's growth is its own.
            kept.push((table, schedules));
        }
    }
}
