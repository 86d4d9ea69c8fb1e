//! What happens after an attempt, as one pure function: [`decide`] takes how the attempt ended
//! ([`Ending`]) and what is known about the run ([`Facts`]) and returns everything the worker
//! then reports and does ([`Decision`]): the outcome, `willRetry`, `retryInMs`, the output or
//! error text as stored, whether the retry goes through the leader's router, and the one reply
//! to the run message ([`Reply`], a closed enum that maps onto async-nats's `AckKind`).
//!
//! No IO and no clock: [`crate::attempt`] executes, calls [`decide`], reports and acknowledges.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use krest_schemas::{AttemptOutcome, Backoff, BackoffMs, JobType, RunMessage};

use crate::context::{truncate, JobError, Output, MAX_OUTPUT};

/// How an attempt ended, before it is reported.
#[derive(Debug)]
pub(crate) enum Ending {
    /// The handler returned (or panicked, or no handler was found: a retryable failure).
    Done(Result<Output, JobError>),
    /// The worker's shutdown deadline passed before the handler finished.
    Interrupted,
    /// The handler ran past the job's `timeoutSecs` and was cancelled.
    TimedOut,
    /// The run was cancelled, with the reason.
    Cancelled(String),
}

/// Where a run message came from, which decides how a failed attempt is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The app's shared queue: retried by redelivery from the queue (any instance).
    Queue,
    /// Addressed to this instance by a strategy: retried through the leader's router, which
    /// prefers another instance.
    Addressed,
    /// A BROADCAST shard for this instance: retried here (this instance is its point).
    Broadcast,
}

impl Route {
    /// The route of `run`.
    pub(crate) fn of(run: &RunMessage) -> Route {
        match (&run.target, run.job_type) {
            (None, _) => Route::Queue,
            (Some(_), JobType::Broadcast) => Route::Broadcast,
            (Some(_), _) => Route::Addressed,
        }
    }
}

/// What the decision depends on besides the ending.
#[derive(Debug, Clone)]
pub(crate) struct Facts<'a> {
    /// This attempt's number (`attemptOffset` + delivery count; it may exceed `retryTimes + 1`
    /// when a worker died holding the run).
    pub(crate) attempt: u32,
    /// The job's `retryTimes`.
    pub(crate) retry_times: u32,
    /// The job's `retryBackoff`, if it sets one.
    pub(crate) job_backoff: Option<BackoffMs>,
    /// The worker's default backoff ([`crate::WorkerBuilder::retry_backoff`]).
    pub(crate) default_backoff: Backoff,
    /// Where the message came from.
    pub(crate) route: Route,
    /// The job's `timeoutSecs` (for the error text of a timeout).
    pub(crate) timeout_secs: Option<u64>,
    /// This worker instance (for the error text of an interrupted attempt).
    pub(crate) instance: &'a str,
}

impl<'a> Facts<'a> {
    /// The facts of attempt `attempt` of `run` on `instance`.
    pub(crate) fn of(
        run: &RunMessage,
        attempt: u32,
        default_backoff: Backoff,
        instance: &'a str,
    ) -> Facts<'a> {
        Facts {
            attempt,
            retry_times: run.retry_times,
            job_backoff: run.retry_backoff,
            default_backoff,
            route: Route::of(run),
            timeout_secs: run.timeout_secs,
            instance,
        }
    }
}

/// The reply to a run message: exactly one of these, mapped onto async-nats's [`AckKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Done: `+ACK`.
    Ack,
    /// Redeliver from the same consumer after the delay: `-NAK {"delay": …}`.
    Nak(Duration),
    /// Hand back for immediate redelivery: `-NAK`.
    NakNow,
    /// Never deliver again: `+TERM`.
    Term,
}

impl Reply {
    /// The async-nats acknowledgement.
    pub(crate) fn kind(self) -> AckKind {
        match self {
            Reply::Ack => AckKind::Ack,
            Reply::Nak(delay) => AckKind::Nak(Some(delay)),
            Reply::NakNow => AckKind::Nak(None),
            Reply::Term => AckKind::Term,
        }
    }

    /// Whether to wait for the server to confirm the reply (for replies that end the message;
    /// a lost nak is harmless: the message comes back after its ack wait anyway).
    pub(crate) fn is_final(self) -> bool {
        matches!(self, Reply::Ack | Reply::Term)
    }
}

/// Everything reported and done after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    /// The attempt's outcome.
    pub(crate) outcome: AttemptOutcome,
    /// Whether another attempt follows.
    pub(crate) will_retry: bool,
    /// When it follows (0: at once), if it does.
    pub(crate) retry_in_ms: Option<u64>,
    /// The handler's output as stored (successes only): URL userinfo redacted, at most
    /// [`MAX_OUTPUT`] bytes.
    pub(crate) output: Option<String>,
    /// Why the attempt did not succeed, as stored: URL userinfo redacted, at most
    /// [`MAX_OUTPUT`] bytes.
    pub(crate) error: Option<String>,
    /// When set, the retry is handed to the leader's router, due after this delay and
    /// avoiding this instance; the message is then answered [`Reply::Term`]. If the hand-off
    /// fails, the message is answered [`Decision::ack`] instead (retried here).
    pub(crate) hand_off: Option<Duration>,
    /// The reply to the message (after a failed hand-off, if any).
    pub(crate) ack: Reply,
}

/// Decides what follows an attempt.
///
/// | ending | retries left¹ | reply |
/// |---|---|---|
/// | handler succeeded | – | `Ack` (SUCCEEDED) |
/// | retryable failure, timeout | yes | `Nak(backoff)`; addressed runs: hand-off to the router after the backoff |
/// | retryable failure, timeout | no | `Term` |
/// | [`JobError::fatal`] | – | `Term` (FAILED) |
/// | cancelled | – | `Term` (CANCELLED) |
/// | interrupted by shutdown | – | `NakNow` (FAILED, will retry at once); addressed runs: hand-off now |
///
/// ¹ `attempt < retryTimes + 1`. The backoff is the job's `retryBackoff`, else the worker's
/// default, at the attempt's number. BROADCAST shards are never handed off.
pub(crate) fn decide(ending: Ending, f: &Facts<'_>) -> Decision {
    let backoff = f.job_backoff.map_or(f.default_backoff, Backoff::from);
    let retries_left = f.attempt < f.retry_times.saturating_add(1);
    let retry_later = backoff.delay(f.attempt);
    let (outcome, retry, output, error) = match ending {
        Ending::Done(Ok(out)) => (AttemptOutcome::Succeeded, None, out.0, None),
        Ending::Done(Err(e)) => (
            AttemptOutcome::Failed,
            (e.is_retryable() && retries_left).then_some(retry_later),
            None,
            Some(e.message().to_string()),
        ),
        Ending::TimedOut => (
            AttemptOutcome::TimedOut,
            retries_left.then_some(retry_later),
            None,
            Some(format!(
                "timed out after {} s (timeoutSecs); the handler was cancelled",
                f.timeout_secs.unwrap_or_default()
            )),
        ),
        Ending::Cancelled(reason) => (
            AttemptOutcome::Cancelled,
            None,
            None,
            Some(format!("cancelled: {reason}")),
        ),
        // Not the handler's fault: handed back whatever the attempt number.
        Ending::Interrupted => (
            AttemptOutcome::Failed,
            Some(Duration::ZERO),
            None,
            Some(format!(
                "worker {} shut down before the handler finished; handed back for another attempt",
                f.instance
            )),
        ),
    };
    let (ack, hand_off) = match (outcome, retry) {
        (AttemptOutcome::Succeeded, _) => (Reply::Ack, None),
        (_, None) => (Reply::Term, None),
        (_, Some(delay)) => {
            let ack = if delay.is_zero() {
                Reply::NakNow
            } else {
                Reply::Nak(delay)
            };
            (ack, (f.route == Route::Addressed).then_some(delay))
        }
    };
    Decision {
        outcome,
        will_retry: retry.is_some(),
        retry_in_ms: retry.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        output: output.map(stored),
        error: error.map(stored),
        hand_off,
        ack,
    }
}

/// A text as stored with the attempt: a URL's credentials never (an HTTP client's error names
/// the URL), and at most [`MAX_OUTPUT`] bytes. Redacted before the cut, so a cut cannot leave
/// part of a credential unrecognised.
fn stored(text: String) -> String {
    let text = match krest_schemas::redact::text(&text) {
        std::borrow::Cow::Owned(r) => r,
        std::borrow::Cow::Borrowed(_) => text,
    };
    truncate(text, MAX_OUTPUT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttemptOutcome::{Cancelled, Failed, Succeeded, TimedOut};

    const S: Duration = Duration::from_secs(1);

    fn facts(attempt: u32, retry_times: u32, route: Route) -> Facts<'static> {
        Facts {
            attempt,
            retry_times,
            job_backoff: None,
            default_backoff: Backoff::default(),
            route,
            timeout_secs: Some(7),
            instance: "w1",
        }
    }

    fn ok(out: &str) -> Ending {
        Ending::Done(Ok(Output(Some(out.to_string()))))
    }

    fn fail(msg: &str) -> Ending {
        Ending::Done(Err(JobError::new(msg)))
    }

    fn fatal(msg: &str) -> Ending {
        Ending::Done(Err(JobError::fatal(msg)))
    }

    /// (outcome, will_retry, retry_in_ms, hand_off, ack) of a decision.
    type Summary = (AttemptOutcome, bool, Option<u64>, Option<Duration>, Reply);

    fn summary(d: &Decision) -> Summary {
        (d.outcome, d.will_retry, d.retry_in_ms, d.hand_off, d.ack)
    }

    #[test]
    fn the_decision_table() {
        use Route::{Addressed, Broadcast, Queue};
        let ms = Duration::from_millis;
        let job_backoff = BackoffMs {
            initial_ms: 300,
            factor: 3.0,
            max_ms: 5000,
        };
        let with_job_backoff = |attempt, retry_times, route| Facts {
            job_backoff: Some(job_backoff),
            ..facts(attempt, retry_times, route)
        };
        let with_worker_backoff = |attempt, retry_times, route| Facts {
            default_backoff: Backoff {
                initial: ms(100),
                factor: 2.0,
                max: S,
            },
            ..facts(attempt, retry_times, route)
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Ending, Facts<'static>, Summary)> = vec![
            // Success, on any route and at any attempt number.
            ("success", ok("fine"), facts(1, 3, Queue), (Succeeded, false, None, None, Reply::Ack)),
            ("success, addressed", ok("fine"), facts(2, 3, Addressed), (Succeeded, false, None, None, Reply::Ack)),
            ("success beyond retryTimes + 1", ok("fine"), facts(9, 2, Queue), (Succeeded, false, None, None, Reply::Ack)),
            // Failures with retries left: the worker's backoff at the attempt's number.
            ("failure, retries left", fail("x"), facts(1, 3, Queue), (Failed, true, Some(1000), None, Reply::Nak(S))),
            ("failure, retries left, attempt 3", fail("x"), facts(3, 3, Queue), (Failed, true, Some(4000), None, Reply::Nak(4 * S))),
            // ... none left: attempt == retryTimes + 1, or beyond it (redelivered after a crash).
            ("failure, last attempt", fail("x"), facts(4, 3, Queue), (Failed, false, None, None, Reply::Term)),
            ("failure beyond retryTimes + 1", fail("x"), facts(6, 3, Queue), (Failed, false, None, None, Reply::Term)),
            ("failure, no retries at all", fail("x"), facts(1, 0, Queue), (Failed, false, None, None, Reply::Term)),
            // A fatal error ends the run whatever is left.
            ("fatal", fatal("bad args"), facts(1, 3, Queue), (Failed, false, None, None, Reply::Term)),
            ("fatal, addressed", fatal("bad args"), facts(1, 3, Addressed), (Failed, false, None, None, Reply::Term)),
            // Timeouts are retried like failures.
            ("timeout, retries left", Ending::TimedOut, facts(2, 3, Queue), (TimedOut, true, Some(2000), None, Reply::Nak(2 * S))),
            ("timeout, none left", Ending::TimedOut, facts(4, 3, Queue), (TimedOut, false, None, None, Reply::Term)),
            ("timeout beyond retryTimes + 1", Ending::TimedOut, facts(5, 3, Queue), (TimedOut, false, None, None, Reply::Term)),
            // Cancelled: never retried.
            ("cancelled", Ending::Cancelled("replaced".into()), facts(1, 3, Queue), (Cancelled, false, None, None, Reply::Term)),
            ("cancelled, addressed", Ending::Cancelled("replaced".into()), facts(1, 3, Addressed), (Cancelled, false, None, None, Reply::Term)),
            // Interrupted by shutdown: handed back at once, even on the last attempt.
            ("interrupted", Ending::Interrupted, facts(1, 3, Queue), (Failed, true, Some(0), None, Reply::NakNow)),
            ("interrupted, last attempt", Ending::Interrupted, facts(4, 3, Queue), (Failed, true, Some(0), None, Reply::NakNow)),
            ("interrupted, addressed", Ending::Interrupted, facts(1, 3, Addressed), (Failed, true, Some(0), Some(Duration::ZERO), Reply::NakNow)),
            ("interrupted, broadcast", Ending::Interrupted, facts(1, 3, Broadcast), (Failed, true, Some(0), None, Reply::NakNow)),
            // Addressed runs retry through the router (nak here only if the hand-off fails);
            // BROADCAST shards and the app queue never hand off.
            ("failure, addressed", fail("x"), facts(1, 3, Addressed), (Failed, true, Some(1000), Some(S), Reply::Nak(S))),
            ("timeout, addressed", Ending::TimedOut, facts(2, 3, Addressed), (TimedOut, true, Some(2000), Some(2 * S), Reply::Nak(2 * S))),
            ("failure, addressed, none left", fail("x"), facts(4, 3, Addressed), (Failed, false, None, None, Reply::Term)),
            ("failure, broadcast", fail("x"), facts(1, 3, Broadcast), (Failed, true, Some(1000), None, Reply::Nak(S))),
            ("failure, broadcast, none left", fail("x"), facts(4, 3, Broadcast), (Failed, false, None, None, Reply::Term)),
            // The job's retryBackoff wins over the worker's default: 300 ms × 3^(n-1), ≤ 5 s.
            ("job backoff, attempt 1", fail("x"), with_job_backoff(1, 5, Queue), (Failed, true, Some(300), None, Reply::Nak(ms(300)))),
            ("job backoff, attempt 2", fail("x"), with_job_backoff(2, 5, Queue), (Failed, true, Some(900), None, Reply::Nak(ms(900)))),
            ("job backoff, capped", fail("x"), with_job_backoff(4, 5, Queue), (Failed, true, Some(5000), None, Reply::Nak(5 * S))),
            ("job backoff, addressed", Ending::TimedOut, with_job_backoff(2, 5, Addressed), (TimedOut, true, Some(900), Some(ms(900)), Reply::Nak(ms(900)))),
            // The worker's default, when it is not the built-in one: 100 ms doubling, ≤ 1 s.
            ("worker backoff", fail("x"), with_worker_backoff(3, 5, Queue), (Failed, true, Some(400), None, Reply::Nak(ms(400)))),
            ("worker backoff, capped", fail("x"), with_worker_backoff(5, 5, Queue), (Failed, true, Some(1000), None, Reply::Nak(S))),
        ];
        for (name, ending, f, expected) in cases {
            assert_eq!(summary(&decide(ending, &f)), expected, "{name}");
        }
    }

    #[test]
    fn texts_reported_with_each_ending() {
        let f = facts(1, 3, Route::Queue);
        let d = decide(ok("42 invoices"), &f);
        assert_eq!((d.output.as_deref(), d.error), (Some("42 invoices"), None));
        let d = decide(Ending::Done(Ok(Output(None))), &f);
        assert_eq!((d.output, d.error), (None, None));
        let d = decide(fail("connection refused"), &f);
        assert_eq!(
            (d.output, d.error.as_deref()),
            (None, Some("connection refused"))
        );
        let d = decide(Ending::TimedOut, &f);
        assert_eq!(
            d.error.as_deref(),
            Some("timed out after 7 s (timeoutSecs); the handler was cancelled")
        );
        let d = decide(Ending::Cancelled("replaced by a newer run".into()), &f);
        assert_eq!(
            d.error.as_deref(),
            Some("cancelled: replaced by a newer run")
        );
        let d = decide(Ending::Interrupted, &f);
        assert_eq!(
            d.error.as_deref(),
            Some(
                "worker w1 shut down before the handler finished; handed back for another attempt"
            )
        );
    }

    #[test]
    fn stored_texts_are_redacted_then_cut() {
        let f = facts(1, 0, Route::Queue);
        let d = decide(fail("GET https://user:secret@example.com/x failed"), &f);
        assert_eq!(
            d.error.as_deref(),
            Some("GET https://<redacted>@example.com/x failed")
        );
        // A credential that straddles the cut is redacted, not half kept.
        let long = format!(
            "{} https://user:secret@example.com/",
            "x".repeat(MAX_OUTPUT - 20)
        );
        let d = decide(Ending::Done(Ok(Output(Some(long)))), &f);
        let out = d.output.unwrap();
        assert!(out.len() <= MAX_OUTPUT, "{}", out.len());
        assert!(out.ends_with("..."));
        assert!(!out.contains("secret") && !out.contains("user:"), "{out}");
    }

    #[test]
    fn acks_map_onto_async_nats() {
        assert!(matches!(Reply::Ack.kind(), AckKind::Ack));
        assert!(matches!(Reply::Nak(S).kind(), AckKind::Nak(Some(d)) if d == S));
        assert!(matches!(Reply::NakNow.kind(), AckKind::Nak(None)));
        assert!(matches!(Reply::Term.kind(), AckKind::Term));
        assert!(Reply::Ack.is_final() && Reply::Term.is_final());
        assert!(!Reply::Nak(S).is_final() && !Reply::NakNow.is_final());
    }

    #[test]
    fn routes_of_run_messages() {
        let run = |extra: serde_json::Value| -> RunMessage {
            let mut m = serde_json::json!({
                "runId": "g.j.1", "jobGroup": "g", "jobName": "j", "appName": "a",
                "path": "p", "jobType": "NORMAL", "args": null,
                "scheduledAt": "2026-11-29T08:43:40Z", "dispatchedAt": "2026-11-29T08:43:40.001Z",
                "trigger": "SCHEDULE", "retryTimes": 3, "revision": 1
            });
            for (k, v) in extra.as_object().unwrap() {
                m[k] = v.clone();
            }
            serde_json::from_value(m).unwrap()
        };
        assert_eq!(Route::of(&run(serde_json::json!({}))), Route::Queue);
        assert_eq!(
            Route::of(&run(serde_json::json!({"target": "w1"}))),
            Route::Addressed
        );
        assert_eq!(
            Route::of(&run(
                serde_json::json!({"target": "w1", "jobType": "BROADCAST"})
            )),
            Route::Broadcast
        );
        // A BROADCAST job's message without a target (not addressed) comes from the queue.
        assert_eq!(
            Route::of(&run(serde_json::json!({"jobType": "BROADCAST"}))),
            Route::Queue
        );
        let f = Facts::of(
            &run(
                serde_json::json!({"retryBackoff": {"initialMs": 10, "factor": 1.0, "maxMs": 10}, "timeoutSecs": 5}),
            ),
            2,
            Backoff::default(),
            "w1",
        );
        assert_eq!((f.attempt, f.retry_times, f.timeout_secs), (2, 3, Some(5)));
        assert_eq!(f.job_backoff.map(|b| b.initial_ms), Some(10));
    }
}
