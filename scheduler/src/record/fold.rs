//! A run's status, folded from its attempts: pure, so every rule is a row in a table test.
//!
//! Per shard, the attempt with the highest number decides: a shard has succeeded if any attempt
//! succeeded, and has failed for good when its latest attempt failed (FAILED, TIMED_OUT or
//! CANCELLED) with no retry announced. A run SUCCEEDED when every shard succeeded; it ended
//! (CANCELLED if a failed shard was cancelled, else TIMED_OUT if every failed shard timed out,
//! else FAILED) when every shard succeeded or failed for good and at least one failed; it is
//! RUNNING once any attempt started, PENDING before.

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

/// What one shard's attempts say about it (fed in attempt order).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Shard {
    succeeded: bool,
    latest: i64,
    failed_for_good: bool,
    timed_out: bool,
    cancelled: bool,
}

impl Shard {
    /// The state of a shard with these attempts (in attempt order); `None` without any.
    pub fn of<'a>(attempts: impl IntoIterator<Item = &'a Attempt>) -> Option<Shard> {
        let mut it = attempts.into_iter().peekable();
        it.peek()?;
        let mut sh = Shard::default();
        for a in it {
            sh.add(a);
        }
        Some(sh)
    }

    /// Takes one more attempt (or an attempt's new state) into account. Fed an attempt with a
    /// lower number than the latest, only a success counts.
    pub fn add(&mut self, a: &Attempt) {
        if a.outcome == Some(AttemptOutcome::Succeeded) {
            self.succeeded = true;
        }
        if a.attempt >= self.latest {
            self.latest = a.attempt;
            self.failed_for_good = failed(a.outcome) && !a.will_retry;
            self.timed_out = a.outcome == Some(AttemptOutcome::TimedOut);
            self.cancelled = a.outcome == Some(AttemptOutcome::Cancelled);
        }
    }

    fn lost(&self) -> bool {
        !self.succeeded && self.failed_for_good
    }
}

/// A run's attempts summed up so that the summary can be updated from the attempts that changed
/// alone: counters over shards (a shard's old state is taken out and its new one put in) and
/// extremes over attempts (attempts only ever gain a start and, once, an end). Kept with the
/// run (without the output and error texts, which are the run's own columns).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    /// Shards with at least one attempt.
    pub shards: i64,
    /// Shards that succeeded.
    pub succeeded: i64,
    /// Shards that failed for good (and did not succeed).
    pub lost: i64,
    /// Of those, shards whose latest attempt was cancelled.
    pub lost_cancelled: i64,
    /// Of those, shards whose latest attempt timed out.
    pub lost_timed_out: i64,
    /// Highest attempt number.
    pub max_attempt: i64,
    /// First start (epoch ms).
    pub first_start: Option<i64>,
    /// Last end (epoch ms).
    pub last_finish: Option<i64>,
    /// `(shard, attempt)` of the output: the last successful attempt with one.
    pub output_key: Option<(i64, i64)>,
    /// Its output.
    #[serde(skip)]
    pub output: Option<String>,
    /// `(end, shard, attempt)` of the error: the failed attempt that ended last.
    pub error_key: Option<(i64, i64, i64)>,
    /// Its error.
    #[serde(skip)]
    pub error: Option<String>,
}

impl Tally {
    /// Counts a shard's state in (`sign` 1) or out (`sign` -1).
    pub fn shard(&mut self, s: &Shard, sign: i64) {
        self.shards += sign;
        if s.succeeded {
            self.succeeded += sign;
        }
        if s.lost() {
            self.lost += sign;
            if s.cancelled {
                self.lost_cancelled += sign;
            }
            if s.timed_out {
                self.lost_timed_out += sign;
            }
        }
    }

    /// Takes an attempt's start, end, output and error into account (adding one twice changes
    /// nothing).
    pub fn attempt(&mut self, a: &Attempt) {
        self.max_attempt = self.max_attempt.max(a.attempt);
        if let Some(s) = a.started_at {
            self.first_start = Some(self.first_start.map_or(s, |f| f.min(s)));
        }
        if let Some(f) = a.finished_at {
            self.last_finish = Some(self.last_finish.map_or(f, |l| l.max(f)));
        }
        if a.outcome == Some(AttemptOutcome::Succeeded) && a.output.is_some() {
            let key = (a.shard, a.attempt);
            if self.output_key.is_none_or(|k| key >= k) {
                self.output_key = Some(key);
                self.output.clone_from(&a.output);
            }
        }
        if failed(a.outcome) && a.error.is_some() {
            let key = (a.finished_at.unwrap_or(0), a.shard, a.attempt);
            if self.error_key.is_none_or(|k| key >= k) {
                self.error_key = Some(key);
                self.error.clone_from(&a.error);
            }
        }
    }

    /// The state of the run's one shard, when the tally counts exactly one, as far as the run's
    /// counters depend on it: whether it succeeded, its latest attempt, and whether that attempt
    /// failed for good (timed out, cancelled). The flags of a succeeded shard's latest attempt
    /// are not kept, as they count for nothing once the shard succeeded. Adding attempts to it
    /// (`Shard::add`) gives the shard's new state as long as no attempt it already counts ends
    /// again (an ended attempt can take a success back): the recorder sums such runs up again.
    pub fn sole_shard(&self) -> Option<Shard> {
        (self.shards == 1).then(|| {
            let lost = self.lost > 0;
            Shard {
                succeeded: self.succeeded > 0,
                latest: self.max_attempt,
                failed_for_good: lost,
                timed_out: lost && self.lost_timed_out > 0,
                cancelled: lost && self.lost_cancelled > 0,
            }
        })
    }

    /// Sums up attempts given in `(shard, attempt)` order.
    pub fn of(attempts: &[Attempt]) -> Tally {
        let mut t = Tally::default();
        let mut i = 0;
        while i < attempts.len() {
            let shard = attempts[i].shard;
            let mut sh = Shard::default();
            while i < attempts.len() && attempts[i].shard == shard {
                sh.add(&attempts[i]);
                t.attempt(&attempts[i]);
                i += 1;
            }
            t.shard(&sh, 1);
        }
        t
    }

    /// The run's summary for `shard_total` shards (0 or less counts as 1).
    pub fn folded(&self, shard_total: i64) -> Folded {
        let total = shard_total.max(1);
        let status = if self.succeeded >= total {
            RunStatus::Succeeded
        } else if self.lost > 0 && self.succeeded + self.lost >= total {
            if self.lost_cancelled > 0 {
                RunStatus::Cancelled
            } else if self.lost_timed_out == self.lost {
                RunStatus::TimedOut
            } else {
                RunStatus::Failed
            }
        } else if self.shards > 0 {
            RunStatus::Running
        } else {
            RunStatus::Pending
        };
        Folded {
            status,
            shards_succeeded: self.succeeded,
            shards_failed: self.lost,
            attempts: self.max_attempt,
            started_at: self.first_start,
            finished_at: if status.is_final() {
                self.last_finish
            } else {
                None
            },
            output: self.output.clone(),
            error: self.error.clone(),
        }
    }
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
    Tally::of(attempts).folded(shard_total)
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

    /// The recorder's fast path for one-shard runs: the shard's state taken from the tally
    /// (`Tally::sole_shard`), the batch's attempts added, gives the tally of all attempts, for
    /// new attempts and for an attempt that ends after it started.
    #[test]
    fn a_sole_shard_from_the_tally_takes_new_attempts_like_all_attempts() {
        let histories: &[&[Row]] = &[
            &[(0, 1, Some(Succeeded), false)],
            &[(0, 1, Some(Failed), true), (0, 2, Some(Succeeded), false)],
            &[(0, 1, Some(Failed), true), (0, 2, Some(Failed), false)],
            &[(0, 1, Some(Failed), false), (0, 2, Some(Succeeded), false)],
            &[(0, 1, Some(Succeeded), false), (0, 2, Some(Failed), false)],
            &[(0, 1, Some(TimedOut), true), (0, 2, Some(Cancelled), false)],
            &[(0, 1, Some(Cancelled), true), (0, 2, Some(TimedOut), false)],
            &[(0, 1, Some(TimedOut), true), (0, 3, None, false)],
            &[(0, 2, Some(Failed), false), (0, 3, Some(TimedOut), false)],
        ];
        for rows in histories {
            let all = attempts(rows);
            let want = Tally::of(&all);
            // Split after k attempts; the split attempt is also seen started only (not ended)
            // before the batch that ends it.
            for k in 1..all.len() + 1 {
                for started_first in [false, true] {
                    let mut before = all[..k].to_vec();
                    let mut batch = all[k..].to_vec();
                    if started_first {
                        let Some(last) = before.last_mut() else {
                            continue;
                        };
                        batch.insert(0, last.clone());
                        last.finished_at = None;
                        last.outcome = None;
                        last.will_retry = false;
                        last.output = None;
                        last.error = None;
                    } else if batch.is_empty() {
                        continue;
                    }
                    let mut t = Tally::of(&before);
                    let old = t.sole_shard().unwrap();
                    let mut new = old;
                    for a in &batch {
                        new.add(a);
                        t.attempt(a);
                    }
                    t.shard(&old, -1);
                    t.shard(&new, 1);
                    assert_eq!(t, want, "{rows:?} split after {k}, {started_first}");
                }
            }
        }
        let two = attempts(&[(0, 1, None, false), (1, 1, None, false)]);
        assert_eq!(Tally::of(&two).sole_shard(), None, "two shards");
        assert_eq!(Tally::default().sole_shard(), None, "no shard yet");
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
