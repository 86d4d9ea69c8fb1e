//! Retention: deletes ended runs (with their attempts and log lines) older than `--keep-days`
//! or beyond the newest `--keep-runs` of their job — or, for a job with its own `retention`,
//! beyond its `days`/`runs` instead — in the background, in small batches, each its own short
//! transaction, so the recorder waits at most for one batch. Runs that have not ended are never
//! deleted. Nodes sharing a database may all prune it: deletes are idempotent.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::jobs::JobTable;
use crate::record::store::{PruneRule, PruneScope, Store};

/// What to keep, and how often to prune.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Keep ended runs this long after they ended (`None`: forever).
    pub keep_for: Option<Duration>,
    /// Keep at most this many runs per job (`None`: all).
    pub keep_runs: Option<u32>,
    /// How often to prune.
    pub every: Duration,
    /// Runs deleted per transaction.
    pub batch: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_for: None,
            keep_runs: None,
            every: Duration::from_secs(60),
            batch: 500,
        }
    }
}

/// `Utc::now() - keep` in epoch ms.
fn ended_before(keep: Duration) -> i64 {
    let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
    Utc::now()
        .checked_sub_signed(keep)
        .map_or(i64::MIN, |t| t.timestamp_millis())
}

/// Prunes every `cfg.every` until `stop`: each job with its own `retention` by it, every other
/// job by `cfg`.
pub async fn run(
    store: Store,
    table: Arc<JobTable>,
    cfg: RetentionConfig,
    stop: CancellationToken,
) {
    let batch = cfg.batch.max(1);
    let mut tick = tokio::time::interval(cfg.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let mut own: Vec<(String, String)> = Vec::new();
        let mut rules: Vec<(Option<i64>, Option<u32>)> = Vec::new();
        for (_, entry) in table.all() {
            let spec = &entry.stored.spec;
            if let Some(r) = &spec.retention {
                own.push((spec.job_group.clone(), spec.job_name.clone()));
                rules.push((
                    r.days
                        .and_then(|d| u64::try_from(d).ok())
                        .map(|d| ended_before(Duration::from_secs(d.saturating_mul(86_400)))),
                    r.runs.and_then(|n| u32::try_from(n).ok()),
                ));
            }
        }
        let mut pruned = 0u64;
        for ((group, name), (before, keep_runs)) in own.iter().zip(&rules) {
            let rule = PruneRule {
                ended_before: *before,
                keep_runs: *keep_runs,
                scope: PruneScope::Job { group, name },
            };
            match prune_all(&store, &rule, batch, &stop).await {
                Some(n) => pruned += n,
                None => return,
            }
        }
        if cfg.keep_for.is_some() || cfg.keep_runs.is_some() {
            let rule = PruneRule {
                ended_before: cfg.keep_for.map(ended_before),
                keep_runs: cfg.keep_runs,
                scope: PruneScope::Except(&own),
            };
            match prune_all(&store, &rule, batch, &stop).await {
                Some(n) => pruned += n,
                None => return,
            }
        }
        if pruned > 0 {
            tracing::info!(pruned, "retention: deleted ended runs");
        }
    }
}

/// Prunes by `rule` batch after batch until nothing is left (or the database fails: logged,
/// tried again at the next tick). `None` when stopping.
async fn prune_all(
    store: &Store,
    rule: &PruneRule<'_>,
    batch: u32,
    stop: &CancellationToken,
) -> Option<u64> {
    let mut pruned = 0u64;
    // Where the last full batch stopped: the next one starts at that job.
    let mut from = None;
    loop {
        match store.prune_from(rule, batch, &mut from).await {
            Ok(n) => {
                pruned += n;
                if n < u64::from(batch) {
                    return Some(pruned);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention: cannot prune runs; trying again later");
                return Some(pruned);
            }
        }
        if stop.is_cancelled() {
            return None;
        }
        // Let the recorder and the API in between batches.
        tokio::task::yield_now().await;
    }
}
