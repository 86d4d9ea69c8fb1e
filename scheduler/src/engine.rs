//! The leader's cron engine: a min-heap of next fire times over every running job, which it
//! pops as they come due, turning each into a [`Fire`] for the [`Publisher`].
//!
//! Per job it keeps an *anchor*: the instant up to which every fire has been published. On
//! taking over, the anchor is the later of the job's last recorded fire (state bucket) and its
//! last apply time, so a new leader publishes exactly what the previous one had not, and the
//! run ids (derived from job and fire time) make anything published twice a duplicate that
//! JetStream drops.
//!
//! Misfires (fire times older than the misfire threshold at the moment they are published) are
//! collapsed into one run for the latest of them, which records how many it stands for
//! (`FIRE_ONCE`). Fires within the threshold are each published, late.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use krest_schemas::{CronSchedule, JobState, Trigger};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Fire, Publisher};
use crate::jobs::{JobEntry, JobTable};
use crate::lease::{Leadership, Role};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Fires later than this when published are misfires (collapsed into one run).
    pub misfire_threshold: Duration,
    /// Most fires published in one pipelined batch.
    pub batch_size: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            misfire_threshold: Duration::from_secs(60),
            batch_size: 2000,
        }
    }
}

/// Most misfires counted one by one (beyond this, the count says "at least").
const MISFIRE_COUNT_LIMIT: usize = 10_000;

/// One planned fire of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The fire time.
    pub at: DateTime<Utc>,
    /// Fire times it stands for beyond itself (0 unless it collapses misfires).
    pub misfired: u32,
}

/// The fires of `schedule` in `(anchor, now]` to publish: each fire within `threshold` of
/// `now`, plus one for the latest older fire if there are any (standing for all of them).
/// Pure, so it is tested directly.
pub fn plan(
    schedule: &CronSchedule,
    anchor: DateTime<Utc>,
    now: DateTime<Utc>,
    threshold: Duration,
) -> Vec<Planned> {
    let threshold = chrono::Duration::from_std(threshold).unwrap_or(chrono::Duration::MAX);
    let horizon = now.checked_sub_signed(threshold).unwrap_or(anchor);
    let mut out = Vec::new();
    if horizon > anchor {
        if let Some(latest) = schedule.prev_at_or_before(horizon).filter(|t| *t > anchor) {
            let count = schedule
                .fires_between(anchor, horizon, MISFIRE_COUNT_LIMIT)
                .len()
                .max(1);
            out.push(Planned {
                at: latest,
                misfired: u32::try_from(count - 1).unwrap_or(u32::MAX),
            });
        }
    }
    let from = anchor.max(horizon);
    out.extend(
        schedule
            .fires_between(from, now, usize::MAX)
            .into_iter()
            .map(|at| Planned { at, misfired: 0 }),
    );
    out
}

struct JobSched {
    entry: Arc<JobEntry>,
    schedule: Arc<CronSchedule>,
    /// Every fire up to and including this instant has been handed to the publisher.
    anchor: DateTime<Utc>,
    generation: u64,
}

/// `(cron expression, time zone)`: jobs with equal keys share one parsed schedule.
type ScheduleKey = (String, String);

/// The leader's schedule of every running job: a min-heap of `(fire time in ms, generation,
/// key)`; entries whose generation is no longer the job's current one are stale and skipped
/// (lazy deletion), so an update costs O(log n) and nothing is ever searched.
///
/// Parsed cron expressions are interned: parsing costs ~25 µs and a parsed expression ~5 KiB
/// (croner keeps a bitmap of years), so jobs sharing an expression share one copy.
#[derive(Default)]
pub struct Schedules {
    jobs: HashMap<String, JobSched>,
    heap: BinaryHeap<Reverse<(i64, u64, String)>>,
    generation: u64,
    parsed: HashMap<ScheduleKey, Arc<CronSchedule>>,
}

impl Schedules {
    /// (Re)schedules a job whose fires up to `anchor_floor` (if any) are already published,
    /// or removes it if it is deleted, paused or unscheduled.
    pub fn set(
        &mut self,
        key: &str,
        entry: Option<Arc<JobEntry>>,
        anchor_floor: Option<DateTime<Utc>>,
    ) {
        let Some(entry) = entry else {
            self.remove(key);
            return;
        };
        if let Some(existing) = self.jobs.get(key) {
            if existing.entry.revision == entry.revision {
                return;
            }
        }
        let spec = &entry.stored.spec;
        let (true, Some(expr)) = (spec.running, spec.cron.clone()) else {
            self.remove(key);
            return;
        };
        let schedule = match self.parsed.get(&(expr.clone(), spec.time_zone.clone())) {
            Some(s) => s.clone(),
            None => match spec.schedule() {
                Some(Ok(s)) => {
                    let s = Arc::new(s);
                    self.parsed
                        .insert((expr, spec.time_zone.clone()), s.clone());
                    s
                }
                Some(Err(e)) => {
                    tracing::error!(job = %key, error = %e, "cannot schedule job");
                    self.remove(key);
                    return;
                }
                None => {
                    self.remove(key);
                    return;
                }
            },
        };
        let previous = self.jobs.get(key).map(|j| j.anchor);
        let anchor = [Some(entry.stored.updated_at), previous, anchor_floor]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(entry.stored.updated_at);
        self.generation += 1;
        let generation = self.generation;
        if let Some(next) = schedule.next_after(anchor) {
            self.heap.push(Reverse((
                next.timestamp_millis(),
                generation,
                key.to_string(),
            )));
        }
        let old = self.jobs.insert(
            key.to_string(),
            JobSched {
                entry,
                schedule,
                anchor,
                generation,
            },
        );
        if let Some(old) = old {
            self.release(old);
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.jobs.remove(key) {
            self.release(old);
        }
    }

    /// Drops an interned schedule no job uses any more.
    fn release(&mut self, old: JobSched) {
        let spec = &old.entry.stored.spec;
        let cache_key = (
            spec.cron.clone().unwrap_or_default(),
            spec.time_zone.clone(),
        );
        drop(old);
        if self
            .parsed
            .get(&cache_key)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            self.parsed.remove(&cache_key);
        }
    }

    /// Number of distinct parsed cron expressions held.
    pub fn distinct_schedules(&self) -> usize {
        self.parsed.len()
    }

    /// Number of scheduled jobs.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether no job is scheduled.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The next fire time (epoch ms), if any job is scheduled.
    pub fn next_due(&mut self) -> Option<i64> {
        while let Some(Reverse((at, generation, key))) = self.heap.peek() {
            match self.jobs.get(key) {
                Some(j) if j.generation == *generation => return Some(*at),
                _ => {
                    self.heap.pop();
                }
            }
        }
        None
    }

    /// Pops every job due at `now` and plans its fires; fires at or before `catch_up_until`
    /// are marked as catch-up.
    pub fn pop_due(
        &mut self,
        now: DateTime<Utc>,
        threshold: Duration,
        catch_up_until: DateTime<Utc>,
        out: &mut Vec<Fire>,
    ) {
        let now_ms = now.timestamp_millis();
        while let Some(Reverse((at, generation, _))) = self.heap.peek() {
            if *at > now_ms {
                break;
            }
            let generation = *generation;
            let Some(Reverse((_, _, key))) = self.heap.pop() else {
                break;
            };
            let Some(job) = self.jobs.get_mut(&key) else {
                continue;
            };
            if job.generation != generation {
                continue;
            }
            for p in plan(&job.schedule, job.anchor, now, threshold) {
                let trigger = if p.misfired > 0 || p.at <= catch_up_until {
                    Trigger::CatchUp
                } else {
                    Trigger::Schedule
                };
                out.push(Fire::scheduled(
                    job.entry.clone(),
                    p.at,
                    trigger,
                    p.misfired,
                ));
            }
            job.anchor = now.max(job.anchor);
            if let Some(next) = job.schedule.next_after(job.anchor) {
                self.heap
                    .push(Reverse((next.timestamp_millis(), generation, key)));
            }
        }
    }
}

/// Why leading ended.
enum Ended {
    LostLeadership,
    Stopped,
}

/// The engine task: idle while standby, scheduling while leader.
pub struct Engine {
    table: Arc<JobTable>,
    changes: mpsc::UnboundedReceiver<String>,
    leadership: Leadership,
    publisher: Publisher,
    state: kv::Store,
    cfg: EngineConfig,
}

impl Engine {
    /// Assembles an engine.
    pub fn new(
        table: Arc<JobTable>,
        changes: mpsc::UnboundedReceiver<String>,
        leadership: Leadership,
        publisher: Publisher,
        state: kv::Store,
        cfg: EngineConfig,
    ) -> Engine {
        Engine {
            table,
            changes,
            leadership,
            publisher,
            state,
            cfg,
        }
    }

    /// Runs until `stop`.
    pub async fn run(mut self, jobs_ready: watch::Receiver<bool>, stop: CancellationToken) {
        let mut role = self.leadership.watch();
        let mut jobs_ready = jobs_ready;
        loop {
            let epoch = loop {
                if let Role::Leader { epoch } = *role.borrow_and_update() {
                    if *jobs_ready.borrow() {
                        break epoch;
                    }
                }
                tokio::select! {
                    r = role.changed() => if r.is_err() { return },
                    r = jobs_ready.changed() => if r.is_err() { return },
                    Some(_) = self.changes.recv() => {}
                    _ = stop.cancelled() => return,
                }
            };
            match self.lead(epoch, &mut role, &stop).await {
                Ended::Stopped => return,
                Ended::LostLeadership => {
                    tracing::warn!(epoch, "stopped dispatching: leadership lost");
                }
            }
        }
    }

    async fn lead(
        &mut self,
        epoch: u64,
        role: &mut watch::Receiver<Role>,
        stop: &CancellationToken,
    ) -> Ended {
        let took_over_at = Utc::now();
        while self.changes.try_recv().is_ok() {}
        let states = loop {
            match load_states(&self.state).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read job state; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.cancelled() => return Ended::Stopped,
                    }
                    if self.leadership.valid_epoch() != Some(epoch) {
                        return Ended::LostLeadership;
                    }
                }
            }
        };
        let mut sched = Schedules::default();
        for (key, entry) in self.table.all() {
            let floor = states.get(&key).map(|s| s.last_fire_at);
            sched.set(&key, Some(entry), floor);
        }
        tracing::info!(epoch, jobs = sched.len(), "leading: scheduling jobs");
        let mut retry: Vec<Fire> = Vec::new();
        loop {
            if self.leadership.valid_epoch() != Some(epoch) {
                return Ended::LostLeadership;
            }
            let now = Utc::now();
            let wait = match sched.next_due() {
                Some(ms) => {
                    Duration::from_millis(u64::try_from(ms - now.timestamp_millis()).unwrap_or(0))
                }
                None => Duration::from_secs(3600),
            };
            let wait = if retry.is_empty() {
                wait
            } else {
                wait.min(Duration::from_secs(1))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {
                    let mut fires = std::mem::take(&mut retry);
                    sched.pop_due(Utc::now(), self.cfg.misfire_threshold, took_over_at, &mut fires);
                    if !fires.is_empty() {
                        match self.dispatch(epoch, fires).await {
                            Ok(failed) => retry = failed,
                            Err(ended) => return ended,
                        }
                    }
                }
                Some(key) = self.changes.recv() => {
                    sched.set(&key, self.table.get(&key), None);
                }
                r = role.changed() => {
                    if r.is_err() {
                        return Ended::Stopped;
                    }
                    if *role.borrow_and_update() != (Role::Leader { epoch }) {
                        return Ended::LostLeadership;
                    }
                }
                _ = stop.cancelled() => return Ended::Stopped,
            }
        }
    }

    /// Publishes fires in batches; returns those to retry.
    async fn dispatch(&self, epoch: u64, fires: Vec<Fire>) -> Result<Vec<Fire>, Ended> {
        let mut failed = Vec::new();
        for chunk in fires.chunks(self.cfg.batch_size.max(1)) {
            // Fencing: never publish once our own clock says the lease may have passed on.
            if self.leadership.valid_epoch() != Some(epoch) {
                return Err(Ended::LostLeadership);
            }
            let results = self.publisher.publish(chunk).await;
            let mut stored = Vec::with_capacity(chunk.len());
            for (fire, result) in chunk.iter().zip(results) {
                match result {
                    Ok(()) => {
                        tracing::debug!(run = %fire.run_id, trigger = fire.trigger.as_str(), "dispatched");
                        stored.push(fire);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "will retry");
                        failed.push(fire.clone());
                    }
                }
            }
            if let Err(e) = self.publisher.record_state(&stored).await {
                // The runs are stored; a later leader may re-publish them, and JetStream drops
                // the duplicates inside its window.
                tracing::warn!(error = %e, "could not record job state");
            }
        }
        Ok(failed)
    }
}

/// Reads every job's state.
async fn load_states(state: &kv::Store) -> Result<HashMap<String, JobState>, String> {
    let mut out = HashMap::new();
    if state.status().await.map_err(|e| e.to_string())?.values() == 0 {
        return Ok(out);
    }
    let mut watch = state
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.operation == kv::Operation::Put {
            match serde_json::from_slice::<JobState>(&entry.value) {
                Ok(s) => {
                    out.insert(entry.key.clone(), s);
                }
                Err(e) => {
                    tracing::warn!(job = %entry.key, error = %e, "ignoring malformed job state")
                }
            }
        }
        if entry.delta == 0 {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Tz;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn every5() -> CronSchedule {
        CronSchedule::new("0/5 * * * * ?", Tz::UTC).unwrap()
    }

    #[test]
    fn plan_on_time() {
        let p = plan(
            &every5(),
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:00:05.002Z"),
            Duration::from_secs(60),
        );
        assert_eq!(
            p,
            vec![Planned {
                at: t("2026-01-01T00:00:05Z"),
                misfired: 0
            }]
        );
    }

    #[test]
    fn plan_short_gap_fires_each_once() {
        // A failover of 12 s: fires at 5, 10 (and not 0, which the anchor covers).
        let p = plan(
            &every5(),
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:00:12Z"),
            Duration::from_secs(60),
        );
        let at: Vec<_> = p.iter().map(|p| p.at).collect();
        assert_eq!(at, [t("2026-01-01T00:00:05Z"), t("2026-01-01T00:00:10Z")]);
        assert!(p.iter().all(|p| p.misfired == 0));
    }

    #[test]
    fn plan_long_gap_collapses_misfires() {
        // Down from 00:00 to 00:10: fires older than 60 s collapse into one run at 00:09:00
        // standing for 108 misfires; the last minute's 12 fires run each.
        let p = plan(
            &every5(),
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:10:00Z"),
            Duration::from_secs(60),
        );
        assert_eq!(
            p[0],
            Planned {
                at: t("2026-01-01T00:09:00Z"),
                misfired: 107
            }
        );
        assert_eq!(p.len(), 13);
        assert_eq!(p[1].at, t("2026-01-01T00:09:05Z"));
        assert_eq!(p[12].at, t("2026-01-01T00:10:00Z"));
    }

    #[test]
    fn plan_nothing_due() {
        let p = plan(
            &every5(),
            t("2026-01-01T00:00:05Z"),
            t("2026-01-01T00:00:09Z"),
            Duration::from_secs(60),
        );
        assert!(p.is_empty());
    }

    #[test]
    fn plan_is_idempotent_across_takeovers() {
        // Two leaders planning from the same anchor at different moments produce the same run
        // times for the overlap, so run ids collide and JetStream deduplicates.
        let s = every5();
        let a = plan(
            &s,
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:00:21Z"),
            Duration::from_secs(60),
        );
        let b = plan(
            &s,
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:00:26Z"),
            Duration::from_secs(60),
        );
        assert_eq!(a[..], b[..a.len()]);
    }
}
