//! The leader's cron engine: a min-heap of next fire times over every running job, which it
//! pops as they come due, turning each into a [`Fire`] (the leadership state,
//! [`crate::leader::state`], owns the heap and publishes the fires).
//!
//! Per job it keeps an *anchor*: the instant up to which every fire has been published. On
//! taking over, the anchor is the later of the job's last recorded fire (state bucket) and its
//! last apply time, so a new leader publishes exactly what the previous one had not, and the
//! run ids (derived from job and fire time) make anything published twice a duplicate that
//! JetStream drops.
//!
//! Misfires (fire times older than the misfire threshold at the moment they are published) are
//! handled by the job's misfire policy: collapsed into one run for the latest of them
//! (`FIRE_ONCE`), recorded as one SKIPPED entry (`SKIP`), or run each within the job's catch-up
//! window (`FIRE_ALL`). Fires within the threshold are each published, late.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use krest_schemas::{MisfirePolicy, Schedule, Trigger};

use crate::jobs::JobEntry;
use crate::leader::dispatch::Fire;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Fires later than this when published are misfires (collapsed into one run).
    pub misfire_threshold: Duration,
    /// Most fires published in one pipelined batch.
    pub batch_size: usize,
    /// How long before its time a fire of an `ALLOW` job is dispatched, to workers that hold
    /// it until then (zero: at its time).
    pub dispatch_ahead: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            misfire_threshold: Duration::from_secs(60),
            batch_size: 2000,
            dispatch_ahead: Duration::from_secs(1),
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
    /// Recorded as SKIPPED instead of run.
    pub skip: bool,
}

impl Planned {
    fn run(at: DateTime<Utc>) -> Planned {
        Planned {
            at,
            misfired: 0,
            skip: false,
        }
    }
}

/// The misfire settings `plan` needs.
#[derive(Debug, Clone, Copy)]
pub struct Misfire {
    /// Fires older than this at planning time are misfires.
    pub threshold: Duration,
    /// The job's policy.
    pub policy: MisfirePolicy,
    /// How far back `FIRE_ALL` runs missed fires.
    pub window: Duration,
}

/// The latest fire in `(after, upto]` and how many fires that range holds, if any.
fn collapse(
    schedule: &Schedule,
    after: DateTime<Utc>,
    upto: DateTime<Utc>,
) -> Option<(DateTime<Utc>, u32)> {
    if upto <= after {
        return None;
    }
    let latest = schedule.prev_at_or_before(upto).filter(|t| *t > after)?;
    let count = schedule
        .fires_between(after, upto, MISFIRE_COUNT_LIMIT)
        .len()
        .max(1);
    Some((latest, u32::try_from(count).unwrap_or(u32::MAX)))
}

fn ago(now: DateTime<Utc>, d: Duration, floor: DateTime<Utc>) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(floor)
        .max(floor)
}

/// The fires of `schedule` in `(anchor, now]` to publish, by the misfire policy: fires within
/// the threshold of `now` each run; older ones are collapsed into one run (`FIRE_ONCE`), into
/// one SKIPPED entry (`SKIP`), or run each within the catch-up window with one SKIPPED entry for
/// those before it (`FIRE_ALL`). Pure, so it is tested directly.
pub fn plan(
    schedule: &Schedule,
    anchor: DateTime<Utc>,
    now: DateTime<Utc>,
    m: Misfire,
) -> Vec<Planned> {
    plan_until(schedule, anchor, now, now, m)
}

/// [`plan`] through `upto` (at or after `now`): the fires after `now` are planned ahead of
/// their time (misfires are still reckoned from `now`).
pub fn plan_until(
    schedule: &Schedule,
    anchor: DateTime<Utc>,
    now: DateTime<Utc>,
    upto: DateTime<Utc>,
    m: Misfire,
) -> Vec<Planned> {
    let horizon = ago(now, m.threshold, anchor);
    let mut out = Vec::new();
    let recent_from = match m.policy {
        MisfirePolicy::FireOnce | MisfirePolicy::Skip => {
            if let Some((at, count)) = collapse(schedule, anchor, horizon) {
                out.push(Planned {
                    at,
                    misfired: count - 1,
                    skip: m.policy == MisfirePolicy::Skip,
                });
            }
            horizon
        }
        MisfirePolicy::FireAll => {
            let window_start = ago(now, m.window.max(m.threshold), anchor);
            if let Some((at, count)) = collapse(schedule, anchor, window_start) {
                out.push(Planned {
                    at,
                    misfired: count - 1,
                    skip: true,
                });
            }
            window_start
        }
    };
    out.extend(
        schedule
            .fires_between(recent_from, upto.max(now), usize::MAX)
            .into_iter()
            .map(Planned::run),
    );
    out
}

struct JobSched {
    entry: Arc<JobEntry>,
    schedule: Arc<Schedule>,
    /// Every fire up to and including this instant has been handed to the publisher.
    anchor: DateTime<Utc>,
    generation: u64,
    /// How long before its fire times it wakes: the dispatch-ahead for an `ALLOW` job, else 0.
    lead_ms: i64,
}

/// `(cron expression, time zone)`: jobs with equal keys share one parsed schedule.
type ScheduleKey = (String, String);

/// The leader's schedule of every running job: a min-heap of `(wake time in ms, generation,
/// key)` — a job's wake time is its next fire time, less the dispatch-ahead for jobs planned
/// ahead —; entries whose generation is no longer the job's current one are stale and skipped
/// (lazy deletion), so an update costs O(log n) and nothing is ever searched.
///
/// Cron schedules are interned, so jobs sharing an expression share one schedule (and one
/// validation: building a schedule parses its expression, ~25 µs). A schedule holds only its
/// text; the parses themselves are kept in a bounded cache ([`krest_schemas::cron::PARSES_KEPT`]).
#[derive(Default)]
pub struct Schedules {
    /// Each job's key is one shared string, in this map and in its heap entries.
    jobs: HashMap<Arc<str>, JobSched>,
    heap: BinaryHeap<Reverse<(i64, u64, Arc<str>)>>,
    generation: u64,
    parsed: HashMap<ScheduleKey, Arc<Schedule>>,
    /// How long before their time fires of `ALLOW` jobs are planned, in ms.
    ahead_ms: i64,
}

/// The interning key of a job's schedule: only cron expressions are interned.
fn cron_key(spec: &krest_schemas::JobSpec) -> Option<ScheduleKey> {
    spec.cron
        .as_deref()
        .map(|c| (c.to_string(), spec.time_zone.to_string()))
}

impl Schedules {
    /// Schedules whose `ALLOW` jobs' fires are planned `ahead` of their time (at most
    /// [`krest_schemas::messages::MAX_HOLD`], the longest a worker holds a run).
    pub fn with_ahead(ahead: Duration) -> Schedules {
        let ahead = ahead.min(krest_schemas::messages::MAX_HOLD);
        Schedules {
            ahead_ms: i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX),
            ..Schedules::default()
        }
    }

    /// How long before their time the fires of `ALLOW` jobs are planned.
    pub fn ahead(&self) -> chrono::Duration {
        chrono::Duration::milliseconds(self.ahead_ms)
    }

    /// (Re)schedules a job whose fires up to `anchor_floor` (if any) are already published,
    /// or removes it if it is deleted, paused or unscheduled.
    pub fn set(
        &mut self,
        key: &str,
        entry: Option<Arc<JobEntry>>,
        anchor_floor: Option<DateTime<Utc>>,
    ) {
        let shared = self
            .jobs
            .get_key_value(key)
            .map_or_else(|| Arc::from(key), |(k, _)| k.clone());
        self.set_shared(shared, entry, anchor_floor);
    }

    /// [`Schedules::set`] with the job's key as the job table holds it, so the table, this
    /// map and the heap share one copy.
    pub fn set_shared(
        &mut self,
        key: Arc<str>,
        entry: Option<Arc<JobEntry>>,
        anchor_floor: Option<DateTime<Utc>>,
    ) {
        let Some(entry) = entry else {
            self.remove(&key);
            return;
        };
        if let Some(existing) = self.jobs.get(&*key) {
            if existing.entry.revision == entry.revision {
                return;
            }
        }
        let spec = &entry.stored.spec;
        if !spec.running {
            self.remove(&key);
            return;
        }
        let interned = cron_key(spec).and_then(|k| self.parsed.get(&k).cloned());
        let schedule = match interned {
            Some(s) => s,
            None => match spec.schedule(entry.stored.created_at) {
                Some(Ok(s)) => {
                    let s = Arc::new(s);
                    if let Some(k) = cron_key(spec) {
                        self.parsed.insert(k, s.clone());
                    }
                    s
                }
                Some(Err(e)) => {
                    tracing::error!(job = %key, error = %e, "cannot schedule job");
                    self.remove(&key);
                    return;
                }
                None => {
                    // Manual-only job.
                    self.remove(&key);
                    return;
                }
            },
        };
        let lead_ms = if spec.overlap_policy == krest_schemas::OverlapPolicy::Allow {
            self.ahead_ms
        } else {
            0
        };
        let previous = self.jobs.get(&*key).map(|j| j.anchor);
        let anchor = [Some(entry.stored.updated_at), previous, anchor_floor]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(entry.stored.updated_at);
        self.generation += 1;
        let generation = self.generation;
        // The map's copy if it has one (stale heap entries hold it too), else the one given.
        let key: Arc<str> = self
            .jobs
            .get_key_value(&*key)
            .map_or(key, |(k, _)| k.clone());
        if let Some(next) = schedule.next_after(anchor) {
            let wake = next.timestamp_millis().saturating_sub(lead_ms);
            self.heap.push(Reverse((wake, generation, key.clone())));
        }
        let old = self.jobs.insert(
            key,
            JobSched {
                entry,
                schedule,
                anchor,
                generation,
                lead_ms,
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
        let Some(cache_key) = cron_key(&old.entry.stored.spec) else {
            return;
        };
        drop(old);
        if self
            .parsed
            .get(&cache_key)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            self.parsed.remove(&cache_key);
        }
    }

    /// How many holders share the schedule's copy of `key` (its map entry and its heap
    /// entries), if the job is scheduled.
    #[cfg(test)]
    pub(crate) fn key_copies(&self, key: &str) -> Option<usize> {
        self.jobs
            .get_key_value(key)
            .map(|(k, _)| Arc::strong_count(k))
    }

    /// The fire times of `key` after `now` already handed over (planned ahead of their time),
    /// with the job as it was scheduled: what a pause or deletion arriving now must cancel.
    pub fn ahead_of(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> Option<(Arc<JobEntry>, Vec<DateTime<Utc>>)> {
        let job = self
            .jobs
            .get(key)
            .filter(|j| j.lead_ms > 0 && j.anchor > now)?;
        let at = job.schedule.fires_between(now, job.anchor, 64);
        (!at.is_empty()).then(|| (job.entry.clone(), at))
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

    /// The next time (epoch ms) a job is due to be popped — its next fire time, less the
    /// dispatch-ahead for jobs planned ahead —, if any job is scheduled.
    pub fn next_due(&mut self) -> Option<i64> {
        while let Some(Reverse((at, generation, key))) = self.heap.peek() {
            match self.jobs.get(&**key) {
                Some(j) if j.generation == *generation => return Some(*at),
                _ => {
                    self.heap.pop();
                }
            }
        }
        None
    }

    /// Pops every job due at `now` and plans its fires by its misfire policy (misfires are
    /// fires older than `threshold`); fires at or before `catch_up_until` are marked as
    /// catch-up. Jobs planned ahead are popped that much before their fire time; their fires
    /// after `now` carry it as `not_before`.
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
            let Some(job) = self.jobs.get_mut(&*key) else {
                continue;
            };
            if job.generation != generation {
                continue;
            }
            let spec = &job.entry.stored.spec;
            let misfire = Misfire {
                threshold,
                policy: spec.misfire_policy,
                window: spec.catch_up_window(),
            };
            let lead = job.lead_ms;
            let upto = now + chrono::Duration::milliseconds(lead);
            for p in plan_until(&job.schedule, job.anchor, now, upto, misfire) {
                let trigger = if p.misfired > 0 || p.at <= catch_up_until {
                    Trigger::CatchUp
                } else {
                    Trigger::Schedule
                };
                let mut fire = Fire::scheduled(job.entry.clone(), p.at, trigger, p.misfired);
                if p.skip {
                    fire.skip = Some(format!(
                        "missed while no leader dispatched ({} fire(s)); misfire policy {}",
                        p.misfired + 1,
                        match spec.misfire_policy {
                            MisfirePolicy::Skip => "SKIP",
                            _ => "FIRE_ALL: older than the catch-up window",
                        }
                    ));
                }
                if p.at > now {
                    fire.not_before = Some(p.at);
                }
                out.push(fire);
            }
            job.anchor = upto.max(job.anchor);
            if let Some(next) = job.schedule.next_after(job.anchor) {
                let wake = next.timestamp_millis().saturating_sub(lead);
                self.heap.push(Reverse((wake, generation, key)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Tz;
    use krest_schemas::CronSchedule;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn every5() -> Schedule {
        Schedule::Cron(Box::new(
            CronSchedule::new("0/5 * * * * ?", Tz::UTC).unwrap(),
        ))
    }

    fn once(threshold_s: u64) -> Misfire {
        Misfire {
            threshold: Duration::from_secs(threshold_s),
            policy: MisfirePolicy::FireOnce,
            window: Duration::from_secs(600),
        }
    }

    fn times(p: &[Planned]) -> Vec<(String, u32, bool)> {
        p.iter()
            .map(|p| (p.at.format("%H:%M:%S").to_string(), p.misfired, p.skip))
            .collect()
    }

    fn entry(name: &str, extra: serde_json::Value) -> Arc<JobEntry> {
        let mut doc = serde_json::json!({
            "appName": "a", "jobGroup": "g", "jobName": name, "path": "p", "cron": "0/5 * * * * ?"
        });
        for (k, v) in extra.as_object().unwrap() {
            doc[k] = v.clone();
        }
        Arc::new(JobEntry {
            stored: krest_schemas::StoredJob {
                spec: krest_schemas::parse_job(&doc).unwrap(),
                created_at: t("2026-01-01T00:00:00Z"),
                updated_at: t("2026-01-01T00:00:00Z"),
                version: 1,
            },
            revision: 1,
            version: 1,
        })
    }

    fn popped(s: &mut Schedules, now: &str) -> Vec<(String, String, Option<String>)> {
        let mut out = Vec::new();
        s.pop_due(
            t(now),
            Duration::from_secs(60),
            t("2026-01-01T00:00:00Z"),
            &mut out,
        );
        let hms = |d: DateTime<Utc>| d.format("%H:%M:%S%.3f").to_string();
        out.iter()
            .map(|f| (f.key(), hms(f.scheduled_at), f.not_before.map(hms)))
            .collect()
    }

    #[test]
    fn allow_jobs_are_popped_ahead_of_their_time_and_others_at_it() {
        let mut s = Schedules::with_ahead(Duration::from_secs(1));
        s.set("g.allow", Some(entry("allow", serde_json::json!({}))), None);
        s.set(
            "g.skip",
            Some(entry("skip", serde_json::json!({"overlapPolicy": "SKIP"}))),
            None,
        );
        // The allow job wakes a second before its fire at 00:00:05, the other at it.
        assert_eq!(
            s.next_due(),
            Some(t("2026-01-01T00:00:04Z").timestamp_millis())
        );
        assert!(popped(&mut s, "2026-01-01T00:00:03.999Z").is_empty());
        assert_eq!(
            popped(&mut s, "2026-01-01T00:00:04.010Z"),
            [(
                "g.allow".into(),
                "00:00:05.000".into(),
                Some("00:00:05.000".into())
            )]
        );
        // Handed over ahead: a pause now has that fire to cancel; the other job has none.
        let (_, ahead) = s
            .ahead_of("g.allow", t("2026-01-01T00:00:04.500Z"))
            .unwrap();
        assert_eq!(ahead, [t("2026-01-01T00:00:05Z")]);
        assert!(s
            .ahead_of("g.skip", t("2026-01-01T00:00:04.500Z"))
            .is_none());
        assert!(s.ahead_of("g.allow", t("2026-01-01T00:00:05Z")).is_none());
        assert_eq!(
            s.next_due(),
            Some(t("2026-01-01T00:00:05Z").timestamp_millis())
        );
        // At its time: the other job, on time (no `not_before`), and nothing of the allow job
        // again; its next wake is a second before 00:00:10.
        assert_eq!(
            popped(&mut s, "2026-01-01T00:00:05.002Z"),
            [("g.skip".into(), "00:00:05.000".into(), None)]
        );
        assert_eq!(
            s.next_due(),
            Some(t("2026-01-01T00:00:09Z").timestamp_millis())
        );
        // Popped late (past the fire time): no hold.
        assert_eq!(
            popped(&mut s, "2026-01-01T00:00:10.300Z"),
            [
                ("g.allow".into(), "00:00:10.000".into(), None),
                ("g.skip".into(), "00:00:10.000".into(), None)
            ]
        );
    }

    #[test]
    fn without_dispatch_ahead_every_job_is_popped_at_its_time() {
        let mut s = Schedules::default();
        s.set("g.allow", Some(entry("allow", serde_json::json!({}))), None);
        assert_eq!(
            s.next_due(),
            Some(t("2026-01-01T00:00:05Z").timestamp_millis())
        );
        assert!(popped(&mut s, "2026-01-01T00:00:04.500Z").is_empty());
        assert!(s
            .ahead_of("g.allow", t("2026-01-01T00:00:04.500Z"))
            .is_none());
    }

    #[test]
    fn an_update_after_a_fire_handed_ahead_does_not_fire_it_again() {
        let mut s = Schedules::with_ahead(Duration::from_secs(1));
        s.set("g.allow", Some(entry("allow", serde_json::json!({}))), None);
        assert_eq!(popped(&mut s, "2026-01-01T00:00:04.100Z").len(), 1);
        let mut changed = (*entry("allow", serde_json::json!({"description": "v2"}))).clone();
        changed.revision = 2;
        changed.stored.updated_at = t("2026-01-01T00:00:04.200Z");
        s.set("g.allow", Some(Arc::new(changed)), None);
        assert!(popped(&mut s, "2026-01-01T00:00:05.000Z").is_empty());
        assert_eq!(
            popped(&mut s, "2026-01-01T00:00:09.000Z"),
            [(
                "g.allow".into(),
                "00:00:10.000".into(),
                Some("00:00:10.000".into())
            )]
        );
    }

    #[test]
    fn plan_on_time() {
        let p = plan(
            &every5(),
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:00:05.002Z"),
            once(60),
        );
        assert_eq!(times(&p), [("00:00:05".into(), 0, false)]);
    }

    #[test]
    fn plan_short_gap_fires_each_once() {
        // A failover of 12 s: fires at 5, 10 (and not 0, which the anchor covers).
        let p = plan(
            &every5(),
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:00:12Z"),
            once(60),
        );
        assert_eq!(
            times(&p),
            [("00:00:05".into(), 0, false), ("00:00:10".into(), 0, false)]
        );
    }

    #[test]
    fn plan_long_gap_collapses_misfires() {
        // Down from 00:00 to 00:10: fires older than 60 s collapse into one run at 00:09:00
        // standing for 108 fires; the last minute's 12 fires run each.
        let p = plan(
            &every5(),
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:10:00Z"),
            once(60),
        );
        assert_eq!(
            p[0],
            Planned {
                at: t("2026-01-01T00:09:00Z"),
                misfired: 107,
                skip: false
            }
        );
        assert_eq!(p.len(), 13);
        assert_eq!(p[1].at, t("2026-01-01T00:09:05Z"));
        assert_eq!(p[12].at, t("2026-01-01T00:10:00Z"));
    }

    #[test]
    fn plan_skip_records_the_misfires_and_runs_the_recent_fires() {
        let m = Misfire {
            policy: MisfirePolicy::Skip,
            ..once(60)
        };
        let p = plan(
            &every5(),
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:10:00Z"),
            m,
        );
        assert_eq!(
            p[0],
            Planned {
                at: t("2026-01-01T00:09:00Z"),
                misfired: 107,
                skip: true
            }
        );
        assert_eq!(p.len(), 13);
        assert!(p[1..].iter().all(|p| !p.skip));
    }

    #[test]
    fn plan_fire_all_runs_every_fire_in_the_window() {
        // Window 2 minutes: 24 fires run; the 96 before it are recorded skipped as one entry.
        let m = Misfire {
            policy: MisfirePolicy::FireAll,
            window: Duration::from_secs(120),
            ..once(60)
        };
        let p = plan(
            &every5(),
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:10:00Z"),
            m,
        );
        assert_eq!(
            p[0],
            Planned {
                at: t("2026-01-01T00:08:00Z"),
                misfired: 95,
                skip: true
            }
        );
        assert_eq!(p.len(), 25);
        assert_eq!(p[1].at, t("2026-01-01T00:08:05Z"));
        assert!(p[1..].iter().all(|p| !p.skip && p.misfired == 0));
        // A gap inside the window: everything runs, nothing skipped.
        let p = plan(
            &every5(),
            t("2026-01-01T00:09:00Z"),
            t("2026-01-01T00:10:00Z"),
            m,
        );
        assert_eq!(p.len(), 12);
        assert!(p.iter().all(|p| !p.skip));
    }

    #[test]
    fn plan_nothing_due() {
        let p = plan(
            &every5(),
            t("2026-01-01T00:00:05Z"),
            t("2026-01-01T00:00:09Z"),
            once(60),
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
            once(60),
        );
        let b = plan(
            &s,
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:00:26Z"),
            once(60),
        );
        assert_eq!(a[..], b[..a.len()]);
    }

    #[test]
    fn plan_every_and_at() {
        let every = Schedule::Every {
            start: t("2026-01-01T00:00:00Z"),
            period_ms: 30_000,
        };
        let p = plan(
            &every,
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T00:01:40Z"),
            once(60),
        );
        assert_eq!(
            times(&p),
            [
                ("00:00:30".into(), 0, false),
                ("00:01:00".into(), 0, false),
                ("00:01:30".into(), 0, false)
            ]
        );
        let at = Schedule::At(t("2026-01-01T00:00:30Z"));
        assert_eq!(
            plan(
                &at,
                t("2026-01-01T00:00:00Z"),
                t("2026-01-01T00:00:31Z"),
                once(60)
            )
            .len(),
            1
        );
        assert!(
            plan(
                &at,
                t("2026-01-01T00:00:30Z"),
                t("2026-01-02T00:00:00Z"),
                once(60)
            )
            .is_empty(),
            "fires once"
        );
        // Missed by hours: FIRE_ONCE still runs it, once.
        let p = plan(
            &at,
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T05:00:00Z"),
            once(60),
        );
        assert_eq!(times(&p), [("00:00:30".into(), 0, false)]);
    }

    #[test]
    fn dst_jobs_in_new_york_run_once_on_both_change_days() {
        let tz = krest_schemas::cron::parse_time_zone("America/New_York").unwrap();
        for (expr, from, to) in [
            (
                "0 30 2 * * ?",
                "2026-03-07T12:00:00Z",
                "2026-03-09T12:00:00Z",
            ), // skipped hour
            (
                "0 30 1 * * ?",
                "2026-10-31T12:00:00Z",
                "2026-11-02T12:00:00Z",
            ), // repeated hour
        ] {
            let s = Schedule::Cron(Box::new(CronSchedule::new(expr, tz).unwrap()));
            // A leader running through both days, tick by tick, plans each day's fire once.
            let mut anchor = t(from);
            let mut fired = Vec::new();
            while let Some(next) = s.next_after(anchor).filter(|n| *n <= t(to)) {
                let p = plan(&s, anchor, next, once(60));
                fired.extend(p.iter().map(|p| p.at));
                anchor = next;
            }
            assert_eq!(fired.len(), 2, "{expr}: {fired:?}");
        }
    }
}
