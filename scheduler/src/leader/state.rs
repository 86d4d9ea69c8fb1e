//! Leadership as one value. [`Engine`] is the node task that waits for this node to lead; at
//! each takeover it builds a [`Leader`] — everything only a leader has — from NATS, runs it
//! while the lease is valid, and drops it when leadership ends, so nothing of one leadership
//! survives into the next:
//!
//! - the cron heap ([`Schedules`]), from the job table (the jobs bucket), the fire watermark
//!   (`krest-state` key `watermark`: how far the previous leader handed every fire over) and
//!   each job's own state (`krest-state`: the last fire handed over, as earlier versions wrote
//!   it after every fire);
//! - fires held by the QUEUE_ONE overlap policy, restored from `krest-state` (a queued fire is
//!   written there when it is queued, so it survives failover);
//! - fires to publish again after a failed publish;
//! - the strategies' counters ([`Balancer`]), shared with
//! - the router ([`crate::leader::router`]), a task of this leadership.
//!
//! Overlap decisions ask the work stream ([`Outstanding`]), never a node's database. Every
//! message a leader publishes carries its epoch.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use krest_schemas::{FireWatermark, JobState, OverlapPolicy, QueuedFire, Trigger};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::infra::Infra;
use crate::jobs::JobTable;
use crate::leader::balance::{Balancer, Routing};
use crate::leader::dispatch::{Fire, Publisher};
use crate::leader::engine::{EngineConfig, Schedules};
use crate::leader::lease::{Leadership, Role};
use crate::leader::outstanding::Outstanding;
use crate::leader::router::RouterConfig;

/// Jobs scheduled between two yields to the runtime when a leader builds its schedules.
const YIELD_EVERY: usize = 8_192;

/// What the leader reads and writes besides the job table.
pub struct EngineDeps {
    /// Publishes fires.
    pub publisher: Publisher,
    /// Buckets (job state, cancellations).
    pub infra: Infra,
    /// NATS client (cancellation broadcasts).
    pub client: async_nats::Client,
    /// Addresses runs to instances (strategies, BROADCAST).
    pub routing: Arc<Routing>,
    /// Router settings.
    pub router: RouterConfig,
}

/// Why leading ended.
enum Ended {
    LostLeadership,
    Stopped,
    /// Part of the leadership failed for good: the node must stop.
    Failed(String),
}

/// The engine task: idle while standby; while leader, runs a [`Leader`].
pub struct Engine {
    table: Arc<JobTable>,
    changes: mpsc::UnboundedReceiver<(String, u64)>,
    leadership: Leadership,
    deps: EngineDeps,
    outstanding: Outstanding,
    cfg: EngineConfig,
}

impl Engine {
    /// Assembles an engine.
    pub fn new(
        table: Arc<JobTable>,
        changes: mpsc::UnboundedReceiver<(String, u64)>,
        leadership: Leadership,
        deps: EngineDeps,
        cfg: EngineConfig,
    ) -> Engine {
        Engine {
            outstanding: Outstanding::new(deps.infra.js.clone()),
            table,
            changes,
            leadership,
            deps,
            cfg,
        }
    }

    /// Runs until `stop`, or until part of a leadership fails (then the node must stop).
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
            let ended = match Leader::take_over(&mut self, epoch, &stop).await {
                Ok(mut leader) => leader.lead(&mut self, &mut role, &stop).await,
                Err(ended) => ended,
            };
            match ended {
                Ended::Stopped => return,
                Ended::LostLeadership => {
                    tracing::warn!(epoch, "stopped dispatching: leadership lost");
                }
                Ended::Failed(why) => {
                    tracing::error!(epoch, error = %why, "leadership failed");
                    return;
                }
            }
        }
    }
}

/// Everything only the leader of one epoch has; dropped when that leadership ends.
struct Leader {
    epoch: u64,
    took_over_at: DateTime<Utc>,
    schedules: Schedules,
    /// Per job, the last fire handed over and the fire it holds queued (as written to
    /// `krest-state`).
    states: HashMap<String, JobState>,
    /// The newest jobs-bucket revision whose change the schedule has applied (every earlier
    /// one is applied too): what the fire watermark claims.
    jobs_revision: u64,
    /// Fires whose publish failed, to publish again.
    retry: Vec<Fire>,
    /// Fires held by QUEUE_ONE, one per job.
    queued: HashMap<String, Fire>,
    /// Fires planned ahead of their time for an app with a live instance that cannot hold a
    /// run (an older SDK): published at their time instead.
    deferred: Vec<Fire>,
    /// The strategies' counters, shared with this leadership's router.
    balancer: Arc<tokio::sync::Mutex<Balancer>>,
    /// The router of this leadership (aborted with it).
    router: tokio::task::JoinHandle<()>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.router.abort();
    }
}

impl Leader {
    /// Builds the leadership state from NATS: job states (with queued fires) from
    /// `krest-state`, the heap from the job table; starts the router.
    async fn take_over(
        engine: &mut Engine,
        epoch: u64,
        stop: &CancellationToken,
    ) -> Result<Leader, Ended> {
        let took_over_at = Utc::now();
        let mut failures = 0u32;
        let (states, watermark) = loop {
            // Bounded: a watch on a clustered stream that is changing leader can stall.
            let loaded = tokio::time::timeout(
                Duration::from_secs(15),
                load_states(&engine.deps.infra.js, &engine.deps.infra.state),
            )
            .await
            .unwrap_or_else(|_| Err("timed out".to_string()));
            match loaded {
                Ok(s) => break s,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "cannot read job state; retrying");
                    if !crate::retry::pause(stop, krest_schemas::Backoff::QUICK, failures).await {
                        return Err(Ended::Stopped);
                    }
                    if engine.leadership.valid_epoch() != Some(epoch) {
                        return Err(Ended::LostLeadership);
                    }
                }
            }
        };
        // Every change up to `jobs_revision` was sent on the channel before the table said it
        // had seen it, so draining the channel and then reading the table applies all of them.
        let jobs_revision = engine.table.seen();
        while engine.changes.try_recv().is_ok() {}
        let mut schedules = Schedules::with_ahead(engine.cfg.dispatch_ahead);
        let mut queued = HashMap::new();
        for (i, (key, entry)) in engine.table.all().into_iter().enumerate() {
            // A million jobs take a second or more to schedule: let the runtime's other tasks —
            // the lease renewal above all — run meanwhile, even one queued behind this task on
            // its worker thread (BENCHMARKS.md, "Lease renewal under load").
            if i % YIELD_EVERY == YIELD_EVERY - 1 {
                tokio::task::yield_now().await;
            }
            let state = states.get(&*key);
            let allow = entry.stored.spec.overlap_policy == OverlapPolicy::Allow;
            let floor = anchor_floor(state, watermark.as_ref(), entry.revision, allow);
            schedules.set_shared(key.clone(), Some(entry.clone()), floor);
            if let Some(q) = state.and_then(|s| s.queued.as_ref()) {
                if entry.stored.spec.running {
                    let mut fire = Fire::scheduled(entry, q.scheduled_at, q.trigger, q.misfired);
                    fire.run_id = q.run_id.clone();
                    queued.insert(key.to_string(), fire);
                }
            }
        }
        let balancer = Arc::new(tokio::sync::Mutex::new(Balancer::default()));
        let router = tokio::spawn(crate::leader::router::run(
            engine.deps.infra.clone(),
            engine.deps.routing.clone(),
            engine.leadership.clone(),
            epoch,
            engine.deps.router.clone(),
            balancer.clone(),
            stop.clone(),
        ));
        tracing::info!(
            epoch,
            jobs = schedules.len(),
            queued = queued.len(),
            "leading: scheduling jobs"
        );
        Ok(Leader {
            epoch,
            took_over_at,
            schedules,
            states,
            jobs_revision,
            retry: Vec::new(),
            queued,
            deferred: Vec::new(),
            balancer,
            router,
        })
    }

    async fn lead(
        &mut self,
        engine: &mut Engine,
        role: &mut watch::Receiver<Role>,
        stop: &CancellationToken,
    ) -> Ended {
        let epoch = self.epoch;
        loop {
            if engine.leadership.valid_epoch() != Some(epoch) {
                return Ended::LostLeadership;
            }
            let now = Utc::now();
            let wait = match self.schedules.next_due() {
                Some(ms) => {
                    Duration::from_millis(u64::try_from(ms - now.timestamp_millis()).unwrap_or(0))
                }
                None => Duration::from_secs(3600),
            };
            let wait = if self.retry.is_empty() && self.queued.is_empty() {
                wait
            } else {
                wait.min(Duration::from_secs(1))
            };
            let wait = match self.deferred.iter().map(|f| f.scheduled_at).min() {
                Some(at) => wait.min((at - now).to_std().unwrap_or(Duration::ZERO)),
                None => wait,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {
                    if let Err(ended) = self.tick(engine).await {
                        return ended;
                    }
                }
                Some((key, revision)) = engine.changes.recv() => {
                    self.jobs_revision = self.jobs_revision.max(revision);
                    let found = engine.table.get_shared(&key);
                    if !found.as_ref().is_some_and(|(_, e)| e.stored.spec.running) {
                        // Deleted or paused: what it held queued is dropped with it, and what
                        // was handed over ahead of its time is cancelled.
                        if self.queued.remove(&key).is_some() {
                            self.forget_queued(engine, &key).await;
                        }
                        let why = if found.is_some() { "paused" } else { "deleted" };
                        self.cancel_ahead(engine, &key, why).await;
                    }
                    match found {
                        Some((shared, entry)) => self.schedules.set_shared(shared, Some(entry), None),
                        None => self.schedules.set(&key, None, None),
                    }
                }
                r = role.changed() => {
                    if r.is_err() {
                        return Ended::Stopped;
                    }
                    if *role.borrow_and_update() != (Role::Leader { epoch }) {
                        return Ended::LostLeadership;
                    }
                }
                r = &mut self.router => {
                    if stop.is_cancelled() {
                        return Ended::Stopped;
                    }
                    if engine.leadership.valid_epoch() != Some(epoch) {
                        return Ended::LostLeadership;
                    }
                    return Ended::Failed(match r {
                        Ok(()) => "the router ended".to_string(),
                        Err(e) => format!("the router failed: {e}"),
                    });
                }
                _ = stop.cancelled() => return Ended::Stopped,
            }
        }
    }

    /// One round: due fires, released queued fires and retries, through the overlap policies
    /// and the strategies, published.
    async fn tick(&mut self, engine: &Engine) -> Result<(), Ended> {
        let mut fires = std::mem::take(&mut self.retry);
        let released = self.release_queued(engine).await;
        let busy: HashSet<String> = released.iter().map(Fire::key).collect();
        fires.extend(released);
        let now = Utc::now();
        let (mut due, later): (Vec<Fire>, Vec<Fire>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|f| f.scheduled_at <= now);
        self.deferred = later;
        let jobs_revision = self.jobs_revision;
        self.schedules.pop_due(
            now,
            engine.cfg.misfire_threshold,
            self.took_over_at,
            &mut due,
        );
        self.defer_unheld(engine, &mut due);
        let queued_before: HashSet<String> = self.queued.keys().cloned().collect();
        fires.extend(self.overlap(engine, due, busy).await);
        {
            let mut balancer = self.balancer.lock().await;
            engine
                .deps
                .routing
                .assign(&mut fires, Some(&mut balancer))
                .await;
        }
        for fire in &mut fires {
            fire.epoch = Some(self.epoch);
        }
        // Newly queued fires are handed over too: their state says so.
        let newly_queued: Vec<String> = self
            .queued
            .keys()
            .filter(|k| !queued_before.contains(*k))
            .cloned()
            .collect();
        if fires.is_empty() && newly_queued.is_empty() {
            return Ok(());
        }
        let mut changed: BTreeSet<String> = newly_queued.into_iter().collect();
        let queued: Vec<Fire> = changed
            .iter()
            .filter_map(|k| self.queued.get(k).cloned())
            .collect();
        for fire in &queued {
            self.handed(fire);
        }
        let published = self.dispatch(engine, fires).await?;
        changed.extend(published);
        // Every scheduled fire due by `now` is handed over, and every fire of an ALLOW job due
        // within the dispatch-ahead (each was popped ahead, or its job's next fire lies
        // beyond) — except those to publish again or held here (deferred ones are all after
        // `now`).
        let first_not_handed = self
            .retry
            .iter()
            .chain(&self.deferred)
            .filter(|f| f.trigger != Trigger::Manual)
            .map(|f| f.scheduled_at - chrono::Duration::milliseconds(1))
            .min();
        let before_first = |t: DateTime<Utc>| first_not_handed.map_or(t, |f| f.min(t));
        let through = before_first(now);
        let ahead = self.schedules.ahead();
        let ahead_through =
            (ahead > chrono::Duration::zero()).then(|| before_first(now + ahead).max(through));
        let watermark = FireWatermark {
            through,
            ahead_through,
            jobs_revision,
            epoch: self.epoch,
            node: engine.deps.publisher.node().to_string(),
        };
        self.write_states(engine, &changed, Some(&watermark)).await;
        Ok(())
    }

    /// Moves the fires planned ahead of their time whose app has a live instance that would
    /// not hold them (or none to ask) to `deferred`, to publish at their time.
    fn defer_unheld(&mut self, engine: &Engine, due: &mut Vec<Fire>) {
        if due.iter().all(|f| f.not_before.is_none()) {
            return;
        }
        let live = engine.deps.routing.live();
        let mut holds: HashMap<String, bool> = HashMap::new();
        let mut kept = Vec::with_capacity(due.len());
        for mut fire in due.drain(..) {
            if fire.not_before.is_some() {
                let app = &*fire.job.stored.spec.app_name;
                let ok = match holds.get(app) {
                    Some(ok) => *ok,
                    None => {
                        let ok = crate::leader::balance::all_hold_runs(&live, app);
                        holds.insert(app.to_string(), ok);
                        ok
                    }
                };
                if !ok {
                    fire.not_before = None;
                    self.deferred.push(fire);
                    continue;
                }
            }
            kept.push(fire);
        }
        *due = kept;
    }

    /// Cancels the runs of `key` handed over ahead of their time (the job was paused or
    /// deleted before they were due); those still deferred here are dropped instead.
    async fn cancel_ahead(&mut self, engine: &Engine, key: &str, why: &str) {
        let now = Utc::now();
        let mut dropped = HashSet::new();
        self.deferred.retain(|f| {
            let mine = *f.key() == *key;
            if mine {
                dropped.insert(f.run_id.clone());
            }
            !mine
        });
        let Some((entry, times)) = self.schedules.ahead_of(key, now) else {
            return;
        };
        let spec = &entry.stored.spec;
        for at in times {
            let run_id =
                crate::leader::dispatch::scheduled_run_id(&spec.job_group, &spec.job_name, at);
            if dropped.contains(&run_id) {
                continue;
            }
            let reason = format!("the job was {why} before this fire's time");
            if let Err(e) = crate::cancel::cancel(
                &engine.deps.infra,
                &engine.deps.client,
                &run_id,
                &spec.app_name,
                &reason,
            )
            .await
            {
                tracing::warn!(run = %run_id, error = %e, "could not cancel a run dispatched ahead");
            }
        }
    }

    /// Notes `fire` as handed over in its job's state; returns whether the job's queued fire
    /// changed (only then is the state written: ordinary progress is the watermark's).
    fn handed(&mut self, fire: &Fire) -> bool {
        let queued = self.queued.get(&fire.key()).map(|q| QueuedFire {
            run_id: q.run_id.clone(),
            scheduled_at: q.scheduled_at,
            trigger: q.trigger,
            misfired: q.misfired,
        });
        note_handed(&mut self.states, fire, queued)
    }

    /// Publishes fires in batches; keeps those that failed for the next round. Returns the
    /// keys of jobs whose queued fire changed.
    async fn dispatch(&mut self, engine: &Engine, fires: Vec<Fire>) -> Result<Vec<String>, Ended> {
        let mut changed = Vec::new();
        for chunk in fires.chunks(engine.cfg.batch_size.max(1)) {
            // Fencing: never publish once our own clock says the lease may have passed on.
            if engine.leadership.valid_epoch() != Some(self.epoch) {
                return Err(Ended::LostLeadership);
            }
            let results = engine.deps.publisher.publish(chunk).await;
            for (fire, result) in chunk.iter().zip(results) {
                match result {
                    Ok(()) => {
                        tracing::debug!(run = %fire.run_id, trigger = fire.trigger.as_str(), "dispatched");
                        if self.handed(fire) {
                            changed.push(fire.key());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "will retry");
                        self.retry.push(fire.clone());
                    }
                }
            }
        }
        Ok(changed)
    }

    /// Writes the states of `keys` and the watermark (pipelined). A failure is logged: the runs
    /// are stored, and a later leader that re-publishes them is de-duplicated by JetStream.
    async fn write_states(
        &self,
        engine: &Engine,
        keys: &BTreeSet<String>,
        watermark: Option<&FireWatermark>,
    ) {
        let states: Vec<(&str, &JobState)> = keys
            .iter()
            .filter_map(|k| self.states.get(k).map(|s| (k.as_str(), s)))
            .collect();
        if let Err(e) = engine.deps.publisher.write_states(&states, watermark).await {
            tracing::warn!(error = %e, "could not record job state");
        }
    }

    /// Clears the queued fire from a job's state (the job was deleted or paused).
    async fn forget_queued(&mut self, engine: &Engine, key: &str) {
        if let Some(state) = self.states.get_mut(key) {
            state.queued = None;
            let keys = BTreeSet::from([key.to_string()]);
            self.write_states(engine, &keys, None).await;
        }
    }

    /// Applies each fire's overlap policy against the job's outstanding runs (from the work
    /// stream): SKIP marks it skipped, QUEUE_ONE holds it in `queued` (or skips it when one
    /// already waits), REPLACE cancels the outstanding ones. Manual runs and ALLOW jobs pass
    /// through. `busy` names jobs already given a run in this round (released queued fires).
    async fn overlap(
        &mut self,
        engine: &Engine,
        fires: Vec<Fire>,
        mut busy: HashSet<String>,
    ) -> Vec<Fire> {
        let checked = |f: &Fire| {
            f.skip.is_none()
                && f.job.stored.spec.overlap_policy != OverlapPolicy::Allow
                && f.trigger != Trigger::Manual
        };
        let ask: BTreeSet<(String, String)> = fires
            .iter()
            .filter(|f| checked(f) && !busy.contains(&f.key()))
            .map(|f| {
                let s = &f.job.stored.spec;
                (s.job_group.clone(), s.job_name.clone())
            })
            .collect();
        let outstanding = if ask.is_empty() {
            HashSet::new()
        } else {
            engine.outstanding.busy(&ask).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot tell whether previous runs are still going; running anyway");
                HashSet::new()
            })
        };
        let mut out = Vec::with_capacity(fires.len());
        for mut fire in fires {
            if !checked(&fire) {
                out.push(fire);
                continue;
            }
            let key = fire.key();
            if busy.contains(&key) || outstanding.contains(&key) {
                match fire.job.stored.spec.overlap_policy {
                    OverlapPolicy::Allow => {}
                    OverlapPolicy::Skip => {
                        fire.skip =
                            Some("overlap policy SKIP: the previous run is still going".into());
                    }
                    OverlapPolicy::QueueOne => match self.queued.entry(key.clone()) {
                        std::collections::hash_map::Entry::Occupied(_) => {
                            fire.skip =
                                Some("overlap policy QUEUE_ONE: a fire is already waiting".into());
                        }
                        std::collections::hash_map::Entry::Vacant(slot) => {
                            tracing::debug!(run = %fire.run_id, "queued behind the previous run");
                            slot.insert(fire);
                            continue;
                        }
                    },
                    OverlapPolicy::Replace => self.replace(engine, &fire).await,
                }
            }
            if fire.skip.is_none() {
                busy.insert(key);
            }
            out.push(fire);
        }
        out
    }

    /// Cancels the outstanding runs of `fire`'s job (overlap policy REPLACE).
    async fn replace(&self, engine: &Engine, fire: &Fire) {
        let spec = &fire.job.stored.spec;
        let runs = match engine
            .outstanding
            .runs(&spec.job_group, &spec.job_name)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(job = %spec.key(), error = %e, "cannot find the previous run to replace");
                return;
            }
        };
        for (run_id, app) in runs.iter().filter(|(r, _)| *r != fire.run_id) {
            let reason = format!("replaced by {}", fire.run_id);
            if let Err(e) = crate::cancel::cancel(
                &engine.deps.infra,
                &engine.deps.client,
                run_id,
                app,
                &reason,
            )
            .await
            {
                tracing::warn!(run = %run_id, error = %e, "could not cancel the previous run");
            }
        }
    }

    /// Queued fires whose job has no run outstanding any more.
    async fn release_queued(&mut self, engine: &Engine) -> Vec<Fire> {
        if self.queued.is_empty() {
            return Vec::new();
        }
        let ask: BTreeSet<(String, String)> = self
            .queued
            .values()
            .map(|f| {
                let s = &f.job.stored.spec;
                (s.job_group.clone(), s.job_name.clone())
            })
            .collect();
        let busy = match engine.outstanding.busy(&ask).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the previous runs of queued fires");
                return Vec::new();
            }
        };
        let ready: Vec<String> = self
            .queued
            .keys()
            .filter(|k| !busy.contains(*k))
            .cloned()
            .collect();
        ready
            .into_iter()
            .filter_map(|k| self.queued.remove(&k))
            .collect()
    }
}

/// Notes `fire` as handed over in its job's entry of `states`, with `queued` the fire its job
/// now holds queued; returns whether that queued fire changed (only then is the state written).
///
/// Only jobs with a state in `krest-state` (read at takeover) or a fire queued keep one: only
/// those are ever written (ordinary progress is the watermark's), and a leader of 100,000 jobs
/// would otherwise hold a state for every job that fired.
fn note_handed(
    states: &mut HashMap<String, JobState>,
    fire: &Fire,
    queued: Option<QueuedFire>,
) -> bool {
    let state = match states.entry(fire.key()) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            if queued.is_none() {
                return false;
            }
            v.insert(JobState {
                last_fire_at: fire.scheduled_at,
                last_run_id: fire.run_id.clone(),
                queued: None,
            })
        }
    };
    if fire.trigger != Trigger::Manual && fire.scheduled_at >= state.last_fire_at {
        state.last_fire_at = fire.scheduled_at;
        state.last_run_id = fire.run_id.clone();
    }
    let changed = state.queued != queued;
    state.queued = queued;
    changed
}

/// Where a new leader starts a job's schedule (besides the job's last apply time): after the
/// job's own last fire, and after the watermark if the watermark's writer had the job's
/// current definition.
fn anchor_floor(
    state: Option<&JobState>,
    watermark: Option<&FireWatermark>,
    job_revision: u64,
    allow: bool,
) -> Option<DateTime<Utc>> {
    let by_watermark = watermark
        .filter(|w| job_revision <= w.jobs_revision)
        .map(|w| match w.ahead_through {
            Some(ahead) if allow => w.through.max(ahead),
            _ => w.through,
        });
    state.map(|s| s.last_fire_at).max(by_watermark)
}

/// Reads every job's state and the fire watermark.
async fn load_states(
    js: &async_nats::jetstream::Context,
    state: &kv::Store,
) -> Result<(HashMap<String, JobState>, Option<FireWatermark>), String> {
    let mut out = HashMap::new();
    let mut watermark = None;
    // An empty bucket's watch would wait forever for a first entry.
    if crate::infra::bucket_state(js, krest_schemas::names::STATE_BUCKET)
        .await?
        .messages
        == 0
    {
        return Ok((out, watermark));
    }
    let mut watch = state
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.operation == kv::Operation::Put
            && entry.key == krest_schemas::names::STATE_WATERMARK_KEY
        {
            match serde_json::from_slice::<FireWatermark>(&entry.value) {
                Ok(w) => watermark = Some(w),
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed fire watermark"),
            }
        } else if entry.operation == kv::Operation::Put {
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
    Ok((out, watermark))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn state(at: &str) -> JobState {
        JobState {
            last_fire_at: t(at),
            last_run_id: "g.j.1".into(),
            queued: None,
        }
    }

    fn watermark(through: &str, jobs_revision: u64) -> FireWatermark {
        FireWatermark {
            through: t(through),
            ahead_through: None,
            jobs_revision,
            epoch: 1,
            node: "n1".into(),
        }
    }

    #[test]
    fn only_jobs_holding_a_queued_fire_or_a_stored_state_keep_a_state() {
        let job = |name: &str| {
            let spec = krest_schemas::parse_job(&serde_json::json!({
                "appName": "a", "jobGroup": "g", "jobName": name, "path": "p", "cron": "0 * * * * ?"
            }))
            .unwrap();
            Arc::new(crate::jobs::JobEntry {
                stored: krest_schemas::StoredJob {
                    spec,
                    created_at: t("2026-01-01T00:00:00Z"),
                    updated_at: t("2026-01-01T00:00:00Z"),
                    version: 1,
                },
                revision: 1,
                version: 1,
            })
        };
        let fire = |name: &str, at: &str| Fire::scheduled(job(name), t(at), Trigger::Schedule, 0);
        let mut states = HashMap::new();
        // A job that only fires: nothing kept, nothing to write.
        assert!(!note_handed(
            &mut states,
            &fire("plain", "2026-01-01T00:01:00Z"),
            None
        ));
        assert!(states.is_empty());
        // A fire queued: kept and written, with its last fire.
        let held = fire("held", "2026-01-01T00:02:00Z");
        let queued = QueuedFire {
            run_id: held.run_id.clone(),
            scheduled_at: held.scheduled_at,
            trigger: held.trigger,
            misfired: 0,
        };
        assert!(note_handed(&mut states, &held, Some(queued.clone())));
        assert_eq!(states["g.held"].queued, Some(queued));
        assert_eq!(states["g.held"].last_fire_at, t("2026-01-01T00:02:00Z"));
        // Released: the state (which the bucket now has) follows, queue cleared.
        let next = fire("held", "2026-01-01T00:03:00Z");
        assert!(note_handed(&mut states, &next, None));
        assert_eq!(states["g.held"].queued, None);
        assert_eq!(states["g.held"].last_run_id, next.run_id);
        // A state read at takeover keeps following its job's fires.
        states.insert("g.old".into(), state("2026-01-01T00:00:00Z"));
        assert!(!note_handed(
            &mut states,
            &fire("old", "2026-01-01T00:04:00Z"),
            None
        ));
        assert_eq!(states["g.old"].last_fire_at, t("2026-01-01T00:04:00Z"));
        assert_eq!(states.len(), 2);
    }

    #[test]
    fn the_watermark_covers_only_jobs_its_writer_had() {
        let w = watermark("2026-01-01T00:10:00Z", 50);
        // The writer had this definition: its fires up to the watermark are handed over.
        assert_eq!(
            anchor_floor(None, Some(&w), 50, false),
            Some(t("2026-01-01T00:10:00Z"))
        );
        // Changed after the writer's last applied revision: the watermark says nothing of it.
        assert_eq!(anchor_floor(None, Some(&w), 51, false), None);
        let s = state("2026-01-01T00:05:00Z");
        assert_eq!(
            anchor_floor(Some(&s), Some(&w), 51, false),
            Some(t("2026-01-01T00:05:00Z"))
        );
        // The later of the two wins.
        let s = state("2026-01-01T00:11:00Z");
        assert_eq!(
            anchor_floor(Some(&s), Some(&w), 10, false),
            Some(t("2026-01-01T00:11:00Z"))
        );
        assert_eq!(anchor_floor(None, None, 10, false), None);
    }

    #[test]
    fn fires_sent_ahead_are_covered_for_allow_jobs_only() {
        let mut w = watermark("2026-01-01T00:10:00Z", 50);
        w.ahead_through = Some(t("2026-01-01T00:10:01Z"));
        // An ALLOW job's fires were sent a second ahead: a new leader starts after them (it
        // would otherwise count an already run fire among its misfires).
        assert_eq!(
            anchor_floor(None, Some(&w), 50, true),
            Some(t("2026-01-01T00:10:01Z"))
        );
        // Other jobs were dispatched at their time.
        assert_eq!(
            anchor_floor(None, Some(&w), 50, false),
            Some(t("2026-01-01T00:10:00Z"))
        );
        // Changed after the writer's revision: nothing from the watermark.
        assert_eq!(anchor_floor(None, Some(&w), 51, true), None);
    }
}
