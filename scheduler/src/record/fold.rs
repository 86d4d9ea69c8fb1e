//! A run's status, folded from its attempts: pure, so every rule is a row in a table test.
//!
//! Per shard, the attempt with the highest number decides: a shard has succeeded if any attempt
//! succeeded, and has failed for good when its latest attempt failed (FAILED, TIMED_OUT or
//! CANCELLED) with no retry announced. A run SUCCEEDED when every shard succeeded; it ended
//! (CANCELLED if a failed shard was cancelled, else TIMED_OUT if every failed shard timed out,
//! else FAILED) when every shard succeeded or failed for good and at least one failed; it is
//! RUNNING once any attempt started, PENDING before.

use std::collections::BTreeMap;

use krest_schemas::api::RunStatus;
use krest_schemas::AttemptOutcome;

/// One recorded attempt of a shard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attempt {
    /// Shard index.
    pub shard: i64,
    /// Attempt number.
    pub attempt: i64,
    /// When it started (epoch ms).
    pub started_at: Option<i64>,
    /// When it ended (epoch ms).
    pub finished_at: Option<i64>,
    /// How it ended, once it did.
    pub outcome: Option<AttemptOutcome>,
    /// Whether a retry was announced.
    pub will_retry: bool,
    /// The handler's output (successes).
    pub output: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// What a run's attempts say about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded {
    /// The run's status.
    pub status: RunStatus,
    /// Shards that succeeded.
    pub shards_succeeded: i64,
    /// Shards that failed for good (and did not succeed).
    pub shards_failed: i64,
    /// Highest attempt number of any shard.
    pub attempts: i64,
    /// First start (epoch ms).
    pub started_at: Option<i64>,
    /// Last end (epoch ms), once the run ended.
    pub finished_at: Option<i64>,
    /// Output of the last successful attempt seen (in shard, attempt order).
    pub output: Option<String>,
    /// Error of the failed attempt that ended last.
    pub error: Option<String>,
}

#[derive(Default)]
struct Shard {
    succeeded: bool,
    latest: i64,
    failed_for_good: bool,
    timed_out: bool,
    cancelled: bool,
}

fn failed(o: Option<AttemptOutcome>) -> bool {
    matches!(
        o,
        Some(AttemptOutcome::Failed | AttemptOutcome::TimedOut | AttemptOutcome::Cancelled)
    )
}

/// Folds the attempts of a run of `shard_total` shards (0 or less counts as 1), given in
/// `(shard, attempt)` order.
pub fn fold(shard_total: i64, attempts: &[Attempt]) -> Folded {
    let total = shard_total.max(1);
    let mut shards: BTreeMap<i64, Shard> = BTreeMap::new();
    let mut max_attempt = 0;
    let mut first_start: Option<i64> = None;
    let mut last_finish: Option<i64> = None;
    let mut output = None;
    let mut error: Option<(i64, String)> = None;
    for a in attempts {
        max_attempt = max_attempt.max(a.attempt);
        if let Some(s) = a.started_at {
            first_start = Some(first_start.map_or(s, |f| f.min(s)));
        }
        if let Some(f) = a.finished_at {
            last_finish = Some(last_finish.map_or(f, |l| l.max(f)));
        }
        let sh = shards.entry(a.shard).or_default();
        if a.outcome == Some(AttemptOutcome::Succeeded) {
            sh.succeeded = true;
            if a.output.is_some() {
                output.clone_from(&a.output);
            }
        }
        if failed(a.outcome) {
            if let Some(e) = &a.error {
                let at = a.finished_at.unwrap_or(0);
                if error.as_ref().is_none_or(|(t, _)| at >= *t) {
                    error = Some((at, e.clone()));
                }
            }
        }
        if a.attempt >= sh.latest {
            sh.latest = a.attempt;
            sh.failed_for_good = failed(a.outcome) && !a.will_retry;
            sh.timed_out = a.outcome == Some(AttemptOutcome::TimedOut);
            sh.cancelled = a.outcome == Some(AttemptOutcome::Cancelled);
        }
    }
    let succeeded = shards.values().filter(|s| s.succeeded).count() as i64;
    let lost: Vec<&Shard> = shards
        .values()
        .filter(|s| !s.succeeded && s.failed_for_good)
        .collect();
    let failed_n = lost.len() as i64;
    let status = if succeeded >= total {
        RunStatus::Succeeded
    } else if failed_n > 0 && succeeded + failed_n >= total {
        if lost.iter().any(|s| s.cancelled) {
            RunStatus::Cancelled
        } else if lost.iter().all(|s| s.timed_out) {
            RunStatus::TimedOut
        } else {
            RunStatus::Failed
        }
    } else if !shards.is_empty() {
        RunStatus::Running
    } else {
        RunStatus::Pending
    };
    Folded {
        status,
        shards_succeeded: succeeded,
        shards_failed: failed_n,
        attempts: max_attempt,
        started_at: first_start,
        finished_at: if status.is_final() { last_finish } else { None },
        output,
        error: error.map(|(_, e)| e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttemptOutcome::{Cancelled, Failed, Succeeded, TimedOut};

    /// `(shard, attempt, outcome, will_retry)`; started at `attempt`, ended at `attempt + 1`.
    type Row = (i64, i64, Option<AttemptOutcome>, bool);

    /// `(case, shard total, attempts, status, shards succeeded, shards failed)`.
    type Case<'a> = (&'a str, i64, &'a [Row], RunStatus, i64, i64);

    fn attempts(rows: &[Row]) -> Vec<Attempt> {
        rows.iter()
            .map(|&(shard, attempt, outcome, will_retry)| Attempt {
                shard,
                attempt,
                started_at: Some(attempt * 10),
                finished_at: outcome.map(|_| attempt * 10 + 1),
                outcome,
                will_retry,
                output: (outcome == Some(Succeeded)).then(|| format!("out {shard}/{attempt}")),
                error: outcome
                    .filter(|o| *o != Succeeded)
                    .map(|o| format!("{o:?} {shard}/{attempt}")),
            })
            .collect()
    }

    #[test]
    fn status_folded_from_attempts() {
        use RunStatus as S;
        let cases: &[Case] = &[
            ("nothing recorded yet", 1, &[], S::Pending, 0, 0),
            ("started", 1, &[(0, 1, None, false)], S::Running, 0, 0),
            (
                "succeeded at once",
                1,
                &[(0, 1, Some(Succeeded), false)],
                S::Succeeded,
                1,
                0,
            ),
            (
                "failed, retry announced",
                1,
                &[(0, 1, Some(Failed), true)],
                S::Running,
                0,
                0,
            ),
            (
                "failed then succeeded",
                1,
                &[(0, 1, Some(Failed), true), (0, 2, Some(Succeeded), false)],
                S::Succeeded,
                1,
                0,
            ),
            (
                "failed for good",
                1,
                &[(0, 1, Some(Failed), true), (0, 2, Some(Failed), false)],
                S::Failed,
                0,
                1,
            ),
            (
                "timed out for good",
                1,
                &[(0, 1, Some(TimedOut), false)],
                S::TimedOut,
                0,
                1,
            ),
            (
                "cancelled",
                1,
                &[(0, 1, Some(Cancelled), false)],
                S::Cancelled,
                0,
                1,
            ),
            (
                "one shard of two done",
                2,
                &[(0, 1, Some(Succeeded), false)],
                S::Running,
                1,
                0,
            ),
            (
                "a shard failed, the other still going",
                2,
                &[(0, 1, Some(Failed), false), (1, 1, None, false)],
                S::Running,
                0,
                1,
            ),
            (
                "a shard failed, the other succeeded",
                2,
                &[(0, 1, Some(Failed), false), (1, 1, Some(Succeeded), false)],
                S::Failed,
                1,
                1,
            ),
            (
                "one timed out, one failed: FAILED",
                2,
                &[(0, 1, Some(TimedOut), false), (1, 1, Some(Failed), false)],
                S::Failed,
                0,
                2,
            ),
            (
                "every failed shard timed out: TIMED_OUT",
                2,
                &[
                    (0, 1, Some(TimedOut), false),
                    (1, 1, Some(Succeeded), false),
                ],
                S::TimedOut,
                1,
                1,
            ),
            (
                "a cancelled shard wins",
                2,
                &[(0, 1, Some(Failed), false), (1, 1, Some(Cancelled), false)],
                S::Cancelled,
                0,
                2,
            ),
            (
                "a late success after a final failure (redelivered) counts",
                1,
                &[(0, 1, Some(Failed), false), (0, 2, Some(Succeeded), false)],
                S::Succeeded,
                1,
                0,
            ),
            (
                "shard total 0 counts as 1",
                0,
                &[(0, 1, Some(Succeeded), false)],
                S::Succeeded,
                1,
                0,
            ),
        ];
        for (name, total, rows, status, ok, bad) in cases {
            let f = fold(*total, &attempts(rows));
            assert_eq!(
                (f.status, f.shards_succeeded, f.shards_failed),
                (*status, *ok, *bad),
                "{name}"
            );
            assert_eq!(f.finished_at.is_some(), status.is_final(), "{name}");
        }
    }

    #[test]
    fn times_output_and_error() {
        let f = fold(
            2,
            &attempts(&[
                (0, 1, Some(Failed), true),
                (0, 2, Some(Succeeded), false),
                (1, 3, Some(Failed), false),
            ]),
        );
        assert_eq!(f.attempts, 3);
        assert_eq!(f.started_at, Some(10));
        assert_eq!(f.finished_at, Some(31));
        assert_eq!(f.output.as_deref(), Some("out 0/2"));
        assert_eq!(
            f.error.as_deref(),
            Some("Failed 1/3"),
            "the failure that ended last"
        );
    }
}
