//! Picking a worker instance for a run: the live registry (from heartbeats) and the
//! deterministic load-balancing strategies.
//!
//! `QUEUE` runs go to the app's shared consumer group and never come here. Every other strategy
//! addresses each run (or shard) to one instance that has the job's handler:
//!
//! - `RANDOM`: any, uniformly;
//! - `ROUND_ROBIN`: each in turn (instances ordered by id);
//! - `WEIGHT_ROUND_ROBIN`: smooth weighted round robin — weights 3:1 give A A B A, A A B A, …;
//! - `LEAST_BUSY`: fewest runs in flight per unit of weight (heartbeat count plus what was sent
//!   since that heartbeat);
//! - `CONSISTENT_HASH`: by a hash ring over the args, so the same args go to the same instance
//!   while it lives (and only runs of a departed instance move);
//! - `FAILOVER`: the oldest live instance (then by id) — a primary with standbys.
//!
//! Counters live in the [`Balancer`], per job, in the memory of the node that dispatches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use krest_schemas::names::{is_token, worker_key, WORKERS_BUCKET};
use krest_schemas::{LoadBalance, RunMessage, WorkerInfo};
use tokio::sync::Mutex;

/// Virtual nodes per instance on the consistent-hash ring.
const VNODES: u64 = 64;

/// FNV-1a with a final avalanche (murmur3's fmix64): the same on every node and every run
/// (unlike std's hasher), and well spread even for similar inputs.
fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Strategy state, per job.
#[derive(Debug, Default)]
pub struct Balancer {
    rr: HashMap<String, u64>,
    wrr: HashMap<String, HashMap<String, i64>>,
    /// Runs sent to an instance since its last heartbeat: (count, that heartbeat's time).
    assigned: HashMap<String, (u32, DateTime<Utc>)>,
    rng: u64,
}

impl Balancer {
    /// Picks an instance among `candidates` (live instances having the handler, in any order)
    /// for a run of `job` whose args hash as `hash_input`. `None` when there is no candidate or
    /// the strategy is `QUEUE`.
    pub fn pick(
        &mut self,
        strategy: LoadBalance,
        job: &str,
        candidates: &[WorkerInfo],
        hash_input: &str,
    ) -> Option<String> {
        if candidates.is_empty() {
            return None;
        }
        let mut sorted: Vec<&WorkerInfo> = candidates.iter().collect();
        sorted.sort_by(|a, b| a.instance.cmp(&b.instance));
        let chosen = match strategy {
            LoadBalance::Queue => return None,
            LoadBalance::Random => {
                // xorshift64*, seeded from the clock once.
                if self.rng == 0 {
                    self.rng = u64::try_from(Utc::now().timestamp_nanos_opt().unwrap_or(1))
                        .unwrap_or(1)
                        | 1;
                }
                self.rng ^= self.rng >> 12;
                self.rng ^= self.rng << 25;
                self.rng ^= self.rng >> 27;
                let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
                sorted[(r % sorted.len() as u64) as usize]
            }
            LoadBalance::RoundRobin => {
                let n = self.rr.entry(job.to_string()).or_default();
                let c = sorted[(*n % sorted.len() as u64) as usize];
                *n = n.wrapping_add(1);
                c
            }
            LoadBalance::WeightRoundRobin => {
                let current = self.wrr.entry(job.to_string()).or_default();
                current.retain(|k, _| sorted.iter().any(|c| &c.instance == k));
                let total: i64 = sorted.iter().map(|c| i64::from(c.weight.max(1))).sum();
                let mut best: Option<(&WorkerInfo, i64)> = None;
                for c in &sorted {
                    let w = current.entry(c.instance.clone()).or_default();
                    *w += i64::from(c.weight.max(1));
                    if best.is_none_or(|(_, bw)| *w > bw) {
                        best = Some((c, *w));
                    }
                }
                let (c, _) = best?;
                if let Some(w) = current.get_mut(&c.instance) {
                    *w -= total;
                }
                c
            }
            LoadBalance::LeastBusy => {
                let load = |c: &WorkerInfo, assigned: &HashMap<String, (u32, DateTime<Utc>)>| {
                    let extra = assigned
                        .get(&c.instance)
                        .filter(|(_, at)| *at == c.heartbeat_at)
                        .map_or(0, |(n, _)| *n);
                    f64::from(c.in_flight + extra) / f64::from(c.weight.max(1))
                };
                sorted.iter().copied().min_by(|a, b| {
                    load(a, &self.assigned)
                        .partial_cmp(&load(b, &self.assigned))
                        .unwrap_or(std::cmp::Ordering::Equal)
                })?
            }
            LoadBalance::ConsistentHash => {
                let key = fnv(hash_input.as_bytes());
                let mut ring: Vec<(u64, &WorkerInfo)> = sorted
                    .iter()
                    .flat_map(|c| {
                        (0..VNODES)
                            .map(move |v| (fnv(format!("{}#{v}", c.instance).as_bytes()), *c))
                    })
                    .collect();
                ring.sort_by_key(|(h, _)| *h);
                let i = ring.partition_point(|(h, _)| *h < key);
                ring[i % ring.len()].1
            }
            LoadBalance::Failover => sorted
                .iter()
                .copied()
                .min_by(|a, b| (a.started_at, &a.instance).cmp(&(b.started_at, &b.instance)))?,
        };
        let entry = self
            .assigned
            .entry(chosen.instance.clone())
            .or_insert((0, chosen.heartbeat_at));
        if entry.1 != chosen.heartbeat_at {
            *entry = (0, chosen.heartbeat_at);
        }
        entry.0 += 1;
        Some(chosen.instance.clone())
    }
}

/// The live worker instances, from the heartbeat bucket.
///
/// A background task refreshes the view every second, so dispatch never waits on NATS;
/// [`Registry::live_now`] asks for a fresh read (bounded) where a stale view would be wrong.
/// Reads list the bucket's keys from its stream and fetch each one's last message directly —
/// no consumer is created, which stays reliable while a clustered stream changes leader.
pub struct Registry {
    js: jetstream::Context,
    view: std::sync::RwLock<Arc<Vec<WorkerInfo>>>,
    /// Serializes reads.
    reading: Mutex<()>,
}

/// Bound on one read of the registry.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

impl Registry {
    /// A registry over the `krest-workers` bucket (its stream `KV_krest-workers`).
    pub fn new(js: jetstream::Context) -> Registry {
        Registry {
            js,
            view: std::sync::RwLock::new(Arc::new(Vec::new())),
            reading: Mutex::new(()),
        }
    }

    /// Refreshes the view every second until `stop`.
    pub async fn refresh_loop(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            self.live_now().await;
        }
    }

    /// The last view (at most about a second old).
    pub fn live(&self) -> Arc<Vec<WorkerInfo>> {
        self.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// A fresh view, or the last one if NATS does not answer within two seconds.
    pub async fn live_now(&self) -> Arc<Vec<WorkerInfo>> {
        let _reading = self.reading.lock().await;
        match tokio::time::timeout(READ_TIMEOUT, self.read()).await {
            Ok(Ok(live)) => {
                let live = Arc::new(live);
                if let Ok(mut v) = self.view.write() {
                    *v = live.clone();
                }
                live
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the worker registry; using the last view");
                self.live()
            }
            Err(_) => {
                tracing::debug!("reading the worker registry timed out; using the last view");
                self.live()
            }
        }
    }

    /// A fresh view, or why there is none (no fallback to the last view: for decisions that a
    /// stale or empty view would get wrong, such as an instance's departure).
    pub async fn read_now(&self) -> Result<Arc<Vec<WorkerInfo>>, String> {
        let _reading = self.reading.lock().await;
        let live = tokio::time::timeout(READ_TIMEOUT, self.read())
            .await
            .map_err(|_| "reading the worker registry timed out".to_string())??;
        let live = Arc::new(live);
        if let Ok(mut v) = self.view.write() {
            *v = live.clone();
        }
        Ok(live)
    }

    /// Every heartbeat that parses and whose key names the instance it describes (a value
    /// under another instance's key is not believed).
    async fn read(&self) -> Result<Vec<WorkerInfo>, String> {
        let mut out: Vec<WorkerInfo> = crate::infra::kv_values(&self.js, WORKERS_BUCKET)
            .await?
            .into_iter()
            .filter_map(|(key, v)| {
                let w: WorkerInfo = serde_json::from_slice(&v).ok()?;
                (is_token(&w.app_name)
                    && is_token(&w.instance)
                    && worker_key(&w.app_name, &w.instance) == key)
                    .then_some(w)
            })
            .collect();
        out.sort_by(|a, b| (&a.app_name, &a.instance).cmp(&(&b.app_name, &b.instance)));
        Ok(out)
    }
}

/// Whether `app` has live instances and every one of them holds a run until its `notBefore`
/// (declares [`krest_schemas::messages::CAPABILITY_NOT_BEFORE`]): only then may its runs be
/// dispatched ahead of their time, as any of them may take a run from the app's queue.
pub fn all_hold_runs(live: &[WorkerInfo], app: &str) -> bool {
    let mut of_app = live.iter().filter(|w| w.app_name == app).peekable();
    of_app.peek().is_some()
        && of_app.all(|w| {
            w.capabilities
                .iter()
                .any(|c| c == krest_schemas::messages::CAPABILITY_NOT_BEFORE)
        })
}

/// The live instances of `app` that have `handler`.
pub fn candidates(live: &[WorkerInfo], app: &str, handler: &str) -> Vec<WorkerInfo> {
    live.iter()
        .filter(|w| w.app_name == app && w.handlers.iter().any(|h| h == handler))
        .cloned()
        .collect()
}

/// Routing for one node: the registry, the instances found unreachable, and the strategies'
/// counters of what this node dispatches without leading (manual triggers, child jobs). The
/// leader's own counters live in its leadership state and are passed in.
pub struct Routing {
    registry: Arc<Registry>,
    balancer: Mutex<Balancer>,
    /// Instances that heartbeat but have no consumer of their own (set by the router): runs
    /// addressed to them would wait forever, so they are never candidates.
    unreachable: std::sync::RwLock<std::collections::HashSet<(String, String)>>,
}

impl Routing {
    /// Routing over `registry`.
    pub fn new(registry: Arc<Registry>) -> Routing {
        Routing {
            registry,
            balancer: Mutex::new(Balancer::default()),
            unreachable: Default::default(),
        }
    }

    /// The live instances (the registry's last view).
    pub fn live(&self) -> Arc<Vec<WorkerInfo>> {
        self.registry.live()
    }

    /// The live instances, read now.
    pub async fn live_now(&self) -> Arc<Vec<WorkerInfo>> {
        self.registry.live_now().await
    }

    /// The live instances, read now, or why they cannot be.
    pub async fn read_now(&self) -> Result<Arc<Vec<WorkerInfo>>, String> {
        self.registry.read_now().await
    }

    /// Replaces the set of `(app, instance)` that heartbeat without a consumer.
    pub fn set_unreachable(&self, instances: std::collections::HashSet<(String, String)>) {
        if let Ok(mut u) = self.unreachable.write() {
            *u = instances;
        }
    }

    fn reachable(&self, mut found: Vec<WorkerInfo>) -> Vec<WorkerInfo> {
        if let Ok(u) = self.unreachable.read() {
            if !u.is_empty() {
                found.retain(|w| !u.contains(&(w.app_name.clone(), w.instance.clone())));
            }
        }
        found
    }

    /// The live instances of `app` with `handler`; read again (not from the cache) when the
    /// cached view has none, so instances that just came up are seen.
    async fn candidates(
        &self,
        live: &mut Arc<Vec<WorkerInfo>>,
        app: &str,
        handler: &str,
    ) -> Vec<WorkerInfo> {
        let found = self.reachable(candidates(live, app, handler));
        if !found.is_empty() {
            return found;
        }
        *live = self.registry.live_now().await;
        self.reachable(candidates(live, app, handler))
    }

    /// Addresses each fire's shards by its job's strategy (BROADCAST: one shard per live
    /// instance with the handler; a BROADCAST with none is skipped). Fires already routed,
    /// skipped, or of `QUEUE` jobs are left alone; a shard no instance can take stays on the
    /// app's queue, where the first instance to come up takes it.
    ///
    /// `balancer` holds the strategies' counters: the leader's own for what it dispatches, or
    /// `None` for this node's (manual and child runs, which any node dispatches).
    pub async fn assign(
        &self,
        fires: &mut [crate::leader::dispatch::Fire],
        balancer: Option<&mut Balancer>,
    ) {
        use krest_schemas::JobType;
        let routed = |f: &crate::leader::dispatch::Fire| {
            let spec = &f.job.stored.spec;
            f.skip.is_none()
                && f.shards.is_none()
                && (spec.job_type == JobType::Broadcast
                    || spec.load_balance_type != LoadBalance::Queue)
        };
        if !fires.iter().any(routed) {
            return;
        }
        // A BROADCAST must reach exactly the instances alive now: read the registry afresh.
        let broadcast = fires
            .iter()
            .any(|f| routed(f) && f.job.stored.spec.job_type == JobType::Broadcast);
        let mut live = if broadcast {
            self.registry.live_now().await
        } else {
            self.live()
        };
        let mut local;
        let balancer: &mut Balancer = match balancer {
            Some(b) => b,
            None => {
                local = self.balancer.lock().await;
                &mut local
            }
        };
        for fire in fires.iter_mut().filter(|f| routed(f)) {
            let spec = &fire.job.stored.spec;
            let cands = self.candidates(&mut live, &spec.app_name, &spec.path).await;
            if spec.job_type == JobType::Broadcast {
                if cands.is_empty() {
                    let of_app = live.iter().filter(|w| w.app_name == spec.app_name).count();
                    fire.skip = Some(format!(
                        "BROADCAST: no live instance of app {} has the handler `{}` ({of_app} live instance(s) of the app)",
                        spec.app_name, spec.path
                    ));
                    continue;
                }
                let mut instances: Vec<String> = cands.into_iter().map(|c| c.instance).collect();
                instances.sort();
                fire.shards = Some(
                    instances
                        .into_iter()
                        .map(|i| crate::leader::dispatch::ShardPlan {
                            item: Some(serde_json::Value::String(i.clone())),
                            target: Some(i),
                        })
                        .collect(),
                );
                continue;
            }
            let key = spec.key();
            let strategy = spec.load_balance_type;
            let args = fire.args.to_string();
            let plans = fire
                .shard_plans()
                .into_iter()
                .map(|p| {
                    let hash_input = p
                        .item
                        .as_ref()
                        .map_or_else(|| args.clone(), |i| i.to_string());
                    let target = balancer.pick(strategy, &key, &cands, &hash_input);
                    crate::leader::dispatch::ShardPlan { target, ..p }
                })
                .collect();
            fire.shards = Some(plans);
        }
    }

    /// Picks an instance for a run being re-routed by its job's strategy, avoiding the
    /// instances in `run.avoid` when another instance can take it.
    pub async fn pick(&self, balancer: &mut Balancer, run: &RunMessage) -> Option<String> {
        let job = krest_schemas::names::job_key(&run.run.job_group, &run.run.job_name);
        let hash_input = run
            .shard
            .as_ref()
            .map_or_else(|| run.args.to_string(), |s| s.item.to_string());
        let (strategy, app, handler, avoid) =
            (run.load_balance, &run.run.app_name, &run.path, &run.avoid);
        let mut live = self.live();
        let all = self.candidates(&mut live, app, handler).await;
        let preferred: Vec<WorkerInfo> = all
            .iter()
            .filter(|c| !avoid.contains(&c.instance))
            .cloned()
            .collect();
        let cands = if preferred.is_empty() { all } else { preferred };
        let strategy = if strategy == LoadBalance::Queue {
            LoadBalance::LeastBusy
        } else {
            strategy
        };
        balancer.pick(strategy, &job, &cands, &hash_input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(instance: &str, weight: u32, in_flight: u32, started_s: i64) -> WorkerInfo {
        WorkerInfo {
            app_name: "a".into(),
            instance: instance.into(),
            handlers: vec!["h".into()],
            weight,
            slots: 1,
            in_flight,
            version: "1".into(),
            sdk: "rust".into(),
            host: "h".into(),
            started_at: DateTime::from_timestamp(started_s, 0).unwrap(),
            heartbeat_at: DateTime::from_timestamp(1000, 0).unwrap(),
            capabilities: Vec::new(),
        }
    }

    fn sequence(b: &mut Balancer, s: LoadBalance, c: &[WorkerInfo], n: usize) -> String {
        (0..n)
            .map(|i| b.pick(s, "job", c, &i.to_string()).unwrap())
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_exact() {
        let c = [w("a", 3, 0, 0), w("b", 1, 0, 0)];
        let mut b = Balancer::default();
        assert_eq!(
            sequence(&mut b, LoadBalance::WeightRoundRobin, &c, 8),
            "a,a,b,a,a,a,b,a"
        );
        let c = [w("x", 2, 0, 0), w("y", 1, 0, 0)];
        let mut b = Balancer::default();
        let s = sequence(&mut b, LoadBalance::WeightRoundRobin, &c, 9);
        assert_eq!(s.matches('x').count(), 6, "{s}");
        assert_eq!(s, "x,y,x,x,y,x,x,y,x");
    }

    #[test]
    fn round_robin_takes_turns_per_job() {
        let c = [w("b", 1, 0, 0), w("a", 5, 0, 0), w("c", 1, 0, 0)];
        let mut b = Balancer::default();
        assert_eq!(
            sequence(&mut b, LoadBalance::RoundRobin, &c, 5),
            "a,b,c,a,b"
        );
        assert_eq!(
            b.pick(LoadBalance::RoundRobin, "other", &c, "").unwrap(),
            "a"
        );
    }

    #[test]
    fn least_busy_counts_in_flight_per_weight_and_recent_picks() {
        let c = [w("a", 2, 3, 0), w("b", 1, 1, 0)];
        let mut b = Balancer::default();
        // a: 3/2 = 1.5, b: 1/1 = 1 → b; then b: 2 → a (1.5); then a: 4/2 = 2 vs b 2 → a (first).
        assert_eq!(sequence(&mut b, LoadBalance::LeastBusy, &c, 3), "b,a,a");
    }

    #[test]
    fn consistent_hash_keeps_keys_and_moves_only_a_departed_instances() {
        let c3 = [w("a", 1, 0, 0), w("b", 1, 0, 0), w("c", 1, 0, 0)];
        let mut b = Balancer::default();
        let before: Vec<String> = (0..200)
            .map(|i| {
                b.pick(LoadBalance::ConsistentHash, "j", &c3, &format!("args-{i}"))
                    .unwrap()
            })
            .collect();
        let again: Vec<String> = (0..200)
            .map(|i| {
                b.pick(LoadBalance::ConsistentHash, "j", &c3, &format!("args-{i}"))
                    .unwrap()
            })
            .collect();
        assert_eq!(before, again, "same args, same instance");
        for inst in ["a", "b", "c"] {
            assert!(
                before.iter().filter(|x| *x == inst).count() > 30,
                "spread: {inst}"
            );
        }
        let c2 = [w("a", 1, 0, 0), w("c", 1, 0, 0)];
        for (i, was) in before.iter().enumerate() {
            let now = b
                .pick(LoadBalance::ConsistentHash, "j", &c2, &format!("args-{i}"))
                .unwrap();
            if was != "b" {
                assert_eq!(&now, was, "keys of live instances stay");
            }
        }
    }

    #[test]
    fn failover_prefers_the_oldest_instance() {
        let c = [w("new", 1, 0, 20), w("old", 1, 0, 10), w("mid", 1, 0, 15)];
        let mut b = Balancer::default();
        assert_eq!(
            sequence(&mut b, LoadBalance::Failover, &c, 3),
            "old,old,old"
        );
        assert_eq!(
            b.pick(LoadBalance::Failover, "j", &c[..1], "").unwrap(),
            "new",
            "when the primary is gone, the next oldest"
        );
    }

    #[test]
    fn random_uses_every_instance_and_nothing_else() {
        let c = [w("a", 1, 0, 0), w("b", 1, 0, 0)];
        let mut b = Balancer::default();
        let s = sequence(&mut b, LoadBalance::Random, &c, 100);
        assert!(s.contains('a') && s.contains('b'));
        assert_eq!(b.pick(LoadBalance::Random, "j", &[], ""), None);
        assert_eq!(b.pick(LoadBalance::Queue, "j", &c, ""), None);
    }
}
