//! What happens after an attempt, as one pure function: [`decide`] takes how the attempt ended
//! ([`Ending`]) and what is known about the run ([`Facts`]) and returns everything the worker
//! then reports and does ([`Decision`]): the outcome, `willRetry`, `retryInMs`, the output or
//! error text as stored, whether the retry goes through the leader's router, and the one reply
//! to the run message ([`Reply`], a closed enum that maps onto async-nats's `AckKind`).
//!
//! [`attempt_number`] and [`handed_off`] are the rest of the decision: which attempt a delivery
//! is, and the message a retry is handed to the router as.
//!
//! No IO and no clock: [`crate::attempt`] executes, calls [`decide`], reports and acknowledges.
//! Every SDK must agree with the shared test vectors in `schemas/testdata/decide-vectors.json`
//! (tested here and by the Python SDK's `tests/test_vectors.py`).

use std::time::Duration;

use async_nats::jetstream::AckKind;
use chrono::{DateTime, Utc};
use krest_schemas::names::{retry_msg_id, work_router_subject};
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

/// The attempt a delivery of `run` is: earlier attempts (retries and re-routes are new messages)
/// are carried in `attemptOffset`, this message's own in the JetStream delivery count.
pub(crate) fn attempt_number(run: &RunMessage, delivered: u32) -> u32 {
    run.attempt_offset.saturating_add(delivered.max(1))
}

/// A retry handed to the leader's router: the message and where it is published.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HandOff {
    /// `krest.work.<app>.<group>.<name>.r`.
    pub(crate) subject: String,
    /// `Nats-Msg-Id`: one hand-off per shard and attempt.
    pub(crate) msg_id: String,
    /// The run message received, with the attempts so far in `attemptOffset`, no target, due at
    /// `retryAt`, avoiding this instance; every other field unchanged, those this SDK does not
    /// know included (a newer scheduler's).
    pub(crate) message: serde_json::Value,
}

/// The hand-off of attempt `attempt` of `run` on `instance`, due at `retry_at`. `received` is
/// the message's payload as received (`run` was read from it).
pub(crate) fn handed_off(
    run: &RunMessage,
    received: &[u8],
    attempt: u32,
    instance: &str,
    retry_at: DateTime<Utc>,
) -> Result<HandOff, serde_json::Error> {
    let mut next: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(received)?;
    next.insert("attemptOffset".into(), attempt.into());
    next.remove("target");
    next.insert("retryAt".into(), serde_json::to_value(retry_at)?);
    next.insert("avoid".into(), serde_json::json!([instance]));
    Ok(HandOff {
        subject: work_router_subject(&run.run.app_name, &run.run.job_group, &run.run.job_name),
        msg_id: retry_msg_id(&run.run.run_id, run.shard_index(), attempt),
        message: next.into(),
    })
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

    /// A reply as `(kind, delay)`: `-NAK {"delay": n}` and `-NAK {"delay":n}` are the same.
    fn reply_parts(wire: &str) -> serde_json::Value {
        match wire.split_once(' ') {
            Some((kind, body)) => serde_json::json!([
                kind,
                serde_json::from_str::<serde_json::Value>(body).expect("a reply's JSON body")
            ]),
            None => serde_json::json!([wire]),
        }
    }

    /// The shared test vectors (`schemas/testdata/decide-vectors.json`, read the same way by
    /// the Python SDK's tests): attempt number, decision, reply bytes and hand-off message.
    #[test]
    fn the_shared_test_vectors() {
        use serde_json::{json, Value};
        let doc: Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../schemas/testdata/decide-vectors.json"
        )))
        .expect("the vectors file is JSON");
        let base = &doc["base"];
        let now: DateTime<Utc> = serde_json::from_value(base["now"].clone()).unwrap();
        let instance = base["instance"].as_str().unwrap();
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 40, "{} vectors", vectors.len());
        // The run message as received: the base with the vector's fields (null removes one).
        let message = |v: &Value| -> Value {
            let mut m = base["run"].clone();
            for (k, x) in v["run"].as_object().into_iter().flatten() {
                if x.is_null() {
                    m.as_object_mut().unwrap().remove(k);
                } else {
                    m[k] = x.clone();
                }
            }
            m
        };
        // `retryAt` as an instant, so that two spellings of one compare equal.
        let normalized = |mut m: Value| -> Value {
            let at: DateTime<Utc> = serde_json::from_value(m["retryAt"].clone()).unwrap();
            m["retryAt"] = json!(at.timestamp_nanos_opt());
            m
        };
        let mut wrong = Vec::new();
        for v in vectors {
            let name = v["name"].as_str().unwrap();
            let received = message(v);
            let run: RunMessage = serde_json::from_value(received.clone())
                .unwrap_or_else(|e| panic!("{name}: not a run message: {e}"));
            let worker_backoff: BackoffMs = serde_json::from_value(
                v.get("workerBackoff")
                    .unwrap_or(&base["workerBackoff"])
                    .clone(),
            )
            .unwrap();
            let delivered = u32::try_from(v["delivered"].as_u64().unwrap()).unwrap();
            let text = v["ending"]["text"].as_str().map(str::to_string);
            let ending = match v["ending"]["kind"].as_str().unwrap() {
                "succeeded" => Ending::Done(Ok(Output(text))),
                "failed" => Ending::Done(Err(JobError::new(text.unwrap()))),
                "fatal" => Ending::Done(Err(JobError::fatal(text.unwrap()))),
                "timedOut" => Ending::TimedOut,
                "cancelled" => Ending::Cancelled(text.unwrap()),
                "interrupted" => Ending::Interrupted,
                other => panic!("{name}: unknown ending {other}"),
            };

            let attempt = attempt_number(&run, delivered);
            let d = decide(
                ending,
                &Facts::of(&run, attempt, Backoff::from(worker_backoff), instance),
            );
            let wire = bytes::Bytes::from(d.ack.kind());
            let hand_off = d.hand_off.map(|delay| {
                let at = now + chrono::Duration::from_std(delay).unwrap();
                let payload = serde_json::to_vec(&received).unwrap();
                let h = handed_off(&run, &payload, attempt, instance, at).unwrap();
                json!({"subject": h.subject, "msgId": h.msg_id, "message": normalized(h.message)})
            });
            let got = json!({
                "attempt": attempt, "outcome": d.outcome.as_str(), "willRetry": d.will_retry,
                "retryInMs": d.retry_in_ms, "output": d.output, "error": d.error,
                "reply": reply_parts(std::str::from_utf8(&wire).unwrap()), "handOff": hand_off,
            });

            let x = &v["expect"];
            let want_hand_off = match &x["handOff"] {
                Value::Null => Value::Null,
                h => {
                    let mut m = received.clone();
                    m.as_object_mut().unwrap().remove("target");
                    for field in ["attemptOffset", "avoid", "retryAt"] {
                        m[field] = h[field].clone();
                    }
                    json!({"subject": h["subject"], "msgId": h["msgId"], "message": normalized(m)})
                }
            };
            let want = json!({
                "attempt": x["attempt"], "outcome": x["outcome"], "willRetry": x["willRetry"],
                "retryInMs": x["retryInMs"], "output": x["output"], "error": x["error"],
                "reply": reply_parts(x["reply"].as_str().unwrap()), "handOff": want_hand_off,
            });
            if got != want {
                wrong.push(format!("{name}:\n  got  {got}\n  want {want}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
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
