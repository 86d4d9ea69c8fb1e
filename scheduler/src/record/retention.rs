//! Retention: deletes ended runs (with their attempts and log lines) older than `--keep-days`
//! or beyond the newest `--keep-runs` of their job, in the background, in small batches — each
//! its own short transaction, so the recorder waits at most for one batch. Runs that have not
//! ended are never deleted. Nodes sharing a database may all prune it: deletes are idempotent.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::record::store::Store;

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

/// Prunes every `cfg.every` until `stop` (and only waits for `stop` when nothing is limited).
pub async fn run(store: Store, cfg: RetentionConfig, stop: CancellationToken) {
    if cfg.keep_for.is_none() && cfg.keep_runs.is_none() {
        stop.cancelled().await;
        return;
    }
    let batch = cfg.batch.max(1);
    let mut tick = tokio::time::interval(cfg.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let ended_before = cfg.keep_for.map(|d| {
            let keep = chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            Utc::now()
                .checked_sub_signed(keep)
                .map_or(i64::MIN, |t| t.timestamp_millis())
        });
        let mut pruned = 0u64;
        loop {
            match store.prune(ended_before, cfg.keep_runs, batch).await {
                Ok(n) => {
                    pruned += n;
                    if n < u64::from(batch) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention: cannot prune runs; trying again later");
                    break;
                }
            }
            if stop.is_cancelled() {
                return;
            }
            // Let the recorder and the API in between batches.
            tokio::task::yield_now().await;
        }
        if pruned > 0 {
            tracing::info!(pruned, "retention: deleted ended runs");
        }
    }
}
