//! One run message, start to end: read it (or park it), check for a cancel marker, execute the
//! handler (progress acks, timeout, cancellation, shutdown), [`decide`] what follows, report the
//! attempt, hand a retry to the router where the decision says so, acknowledge.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage as Publish, AckKind};
use chrono::Utc;
use krest_schemas::deadletter::{parked_copy, Origin};
use krest_schemas::names::{dlq_subject, parked_work_id};
use krest_schemas::{Backoff, CancelRequest, Finished, RunEvent, RunMessage, Started};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::context::{HandlerFn, HandlerFuture, JobContext, JobError};
use crate::decide::{attempt_number, decide, handed_off, Decision, Ending, Facts, Reply};
use crate::error::{Error, PublishKind};
use crate::events::{store, EventSink, StartReport};
use crate::markers::{Lookup, Markers};

/// What every attempt on this worker shares.
pub(crate) struct Shared {
    pub(crate) js: jetstream::Context,
    pub(crate) cancels: jetstream::kv::Store,
    pub(crate) cancellable: Cancellable,
    pub(crate) markers: Arc<Markers>,
    pub(crate) app: String,
    pub(crate) instance: String,
    pub(crate) handlers: BTreeMap<String, HandlerFn>,
    pub(crate) backoff: Backoff,
    pub(crate) events: EventSink,
    pub(crate) in_flight: AtomicU32,
    pub(crate) cancel_grace: Duration,
    pub(crate) report_start_after: Duration,
    /// Held runs by when they are due: reports wait for the due ones to start.
    pub(crate) due: crate::due::DueRuns,
}

/// Runs executing here that a cancellation can reach: run id → the shards being executed
/// (registration id, token) and the reason once cancelled. A cancellation of a run not
/// executing here is remembered for a while ([`EARLY_KEPT`], at most [`EARLY_MAX`] of them): its
/// run may arrive an instant later, before the marker mirror has seen the marker.
#[derive(Default)]
pub(crate) struct Cancellable {
    next: AtomicU64,
    runs: Mutex<CancelMap>,
    early: Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
}

/// How long a cancellation of a run not executing here is remembered.
const EARLY_KEPT: Duration = Duration::from_secs(60);

/// Most cancellations of runs not executing here remembered at once.
const EARLY_MAX: usize = 10_000;

type CancelMap = std::collections::HashMap<String, (Vec<(u64, CancellationToken)>, Option<String>)>;

impl Cancellable {
    fn register(&self, run_id: &str) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        if let Ok(mut runs) = self.runs.lock() {
            runs.entry(run_id.to_string())
                .or_default()
                .0
                .push((id, token.clone()));
        }
        (id, token)
    }

    fn unregister(&self, run_id: &str, id: u64) {
        if let Ok(mut runs) = self.runs.lock() {
            if let Some(entry) = runs.get_mut(run_id) {
                entry.0.retain(|(i, _)| *i != id);
                if entry.0.is_empty() {
                    runs.remove(run_id);
                }
            }
        }
    }

    /// Cancels every shard of `run_id` executing here; remembers the cancellation of a run
    /// that is not.
    pub(crate) fn cancel(&self, run_id: &str, reason: &str) {
        if let Ok(mut runs) = self.runs.lock() {
            if let Some((tokens, why)) = runs.get_mut(run_id) {
                *why = Some(reason.to_string());
                for (_, t) in tokens.iter() {
                    t.cancel();
                }
                return;
            }
        }
        if let Ok(mut early) = self.early.lock() {
            let now = std::time::Instant::now();
            early.retain(|_, (_, at)| now.duration_since(*at) < EARLY_KEPT);
            if early.len() < EARLY_MAX {
                early.insert(run_id.to_string(), (reason.to_string(), now));
            }
        }
    }

    /// The reason of a recent cancellation of `run_id` received before it arrived here.
    fn cancelled_early(&self, run_id: &str) -> Option<String> {
        let early = self.early.lock().ok()?;
        early
            .get(run_id)
            .filter(|(_, at)| at.elapsed() < EARLY_KEPT)
            .map(|(reason, _)| reason.clone())
    }

    fn reason(&self, run_id: &str) -> Option<String> {
        self.runs
            .lock()
            .ok()?
            .get(run_id)
            .and_then(|(_, why)| why.clone())
    }
}

struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handles one run message: executes, decides, reports, acknowledges. `progress_every` is a
/// third of the ack wait of the consumer the message came from.
pub(crate) async fn process(
    shared: Arc<Shared>,
    msg: jetstream::Message,
    permit: OwnedSemaphorePermit,
    slots: crate::pull::Slots,
    progress_every: Duration,
    hard_stop: CancellationToken,
) {
    shared.in_flight.fetch_add(1, Ordering::Relaxed);
    let _guard = InFlight(&shared.in_flight);
    let Some(run) = read(&shared.js, &msg).await else {
        return;
    };
    let delivered = msg
        .info()
        .map(|i| u32::try_from(i.delivered.max(1)).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let attempt = attempt_number(&run, delivered);
    // A run dispatched ahead of its fire time starts at that time, never earlier. Held beyond
    // the intake while the source has room for held runs, so the next runs are pulled
    // meanwhile.
    let hold_for = run.hold_at(Utc::now());
    let mut permit = Some(permit);
    if !hold_for.is_zero() {
        let held = slots.holding.try_hold(msg.length);
        if held.is_some() {
            permit = None;
        }
        let until = tokio::time::Instant::now() + hold_for;
        let due = shared.due.hold(until);
        hold(&msg, until, progress_every).await;
        drop(due);
        drop(held);
    }
    // A running handler's slot (the semaphore is never closed).
    let Ok(running) = slots.running.clone().acquire_owned().await else {
        return;
    };
    slots.holding.started();
    // Sent after the start-report delay or before the first log line; folded into
    // `finished` if the attempt ends first.
    let start = Arc::new(StartReport::new(
        Started {
            run: run.run.clone(),
            shard: run.shard_index(),
            shard_total: run.shard_total(),
            attempt,
            worker: shared.instance.clone(),
            at: Utc::now(),
            scheduled_at: Some(run.scheduled_at),
            delivery_token: run.delivery_token.clone(),
        },
        shared.events.clone(),
        shared.report_start_after,
    ));
    // Every log line of the attempt (the SDK's and the handler's own `tracing` calls) carries
    // the run, job, shard and attempt.
    let span = tracing::info_span!(
        "run",
        run = %run.run.run_id,
        job = %format_args!("{}.{}", run.run.job_group, run.run.job_name),
        shard = run.shard_index(),
        attempt,
        trace_id = %krest_schemas::trace::trace_id(&run.run.run_id)
    );
    let clock = std::time::Instant::now();
    let ending = attempt_run(
        &shared,
        &run,
        attempt,
        &msg,
        &start,
        progress_every,
        &hard_stop,
    )
    .instrument(span.clone())
    .await;
    let duration_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    // A slot is a running handler: the next run may start while this one's result is stored
    // and acknowledged (two round trips to the server).
    drop(running);
    drop(permit);
    // Runs due now start before this one's result is reported.
    shared.due.quiet().await;
    let decision = decide(
        ending,
        &Facts::of(&run, attempt, shared.backoff, &shared.instance),
    );
    span.in_scope(|| {
        tracing::debug!(
            outcome = decision.outcome.as_str(),
            will_retry = decision.will_retry,
            duration_ms,
            "attempt ended"
        );
    });
    let folded = start.fold();
    let finished = RunEvent::Finished(Finished {
        run: run.run.clone(),
        shard: run.shard_index(),
        shard_total: run.shard_total(),
        attempt,
        worker: shared.instance.clone(),
        at: Utc::now(),
        outcome: decision.outcome,
        will_retry: decision.will_retry,
        retry_in_ms: decision.retry_in_ms,
        output: decision.output.clone(),
        error: decision.error.clone(),
        duration_ms,
        delivery_token: run.delivery_token.clone(),
        started_at: folded.map(|(at, _)| at),
        scheduled_at: folded.and_then(|(_, due)| due),
    });
    // A run message is answered only once its result is stored.
    if let Err(e) = shared.events.send_confirmed(finished).await {
        tracing::error!(
            run = %run.run.run_id, attempt, error = %e,
            "could not store the attempt's result; leaving the run unacknowledged so it is redelivered"
        );
        return;
    }
    acknowledge(&shared, &msg, &run, attempt, &decision)
        .instrument(span)
        .await;
}

/// Waits `until` (a run's `notBefore`), telling the server the message is in
/// progress every `progress_every` so a hold is never taken for a lost worker. A cancellation
/// arriving meanwhile is remembered and found when the attempt starts; a shutdown waits for
/// the hold like a running handler (a hold is at most [`krest_schemas::messages::MAX_HOLD`]).
async fn hold(msg: &jetstream::Message, until: tokio::time::Instant, progress_every: Duration) {
    loop {
        let step = until
            .saturating_duration_since(tokio::time::Instant::now())
            .min(progress_every.max(Duration::from_millis(100)));
        if step.is_zero() {
            return;
        }
        tokio::time::sleep(step).await;
        if tokio::time::Instant::now() >= until {
            return;
        }
        let _ = msg.ack_with(AckKind::Progress).await;
    }
}

/// The run in `msg`; a payload that is not a RunMessage is parked and terminated (`None`).
async fn read(js: &jetstream::Context, msg: &jetstream::Message) -> Option<RunMessage> {
    let e = match serde_json::from_slice::<RunMessage>(&msg.payload) {
        Ok(run) => return Some(run),
        Err(e) => e,
    };
    // serde quotes the offending value: shortened, and URLs redacted.
    let e = krest_schemas::redact::text(&krest_schemas::text::shorten_quoted(&e.to_string()))
        .into_owned();
    tracing::error!(subject = %msg.subject, error = %e, "malformed run message; parking it");
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
    let reason = format!("malformed run message: {e}");
    match park(js, seq, &reason, msg).await {
        Ok(()) => {
            let _ = msg.ack_with(AckKind::Term).await;
        }
        // Not parked: leave it for redelivery (and, at worst, the server's max deliveries,
        // after which the scheduler parks it).
        Err(e) => {
            tracing::warn!(error = %e, "could not park the malformed run message");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(10))))
                .await;
        }
    }
    None
}

/// Makes the attempt: a run with a cancel marker ends CANCELLED without executing; a run for a
/// handler this instance lacks fails naming it; otherwise the handler runs.
async fn attempt_run(
    shared: &Shared,
    run: &RunMessage,
    attempt: u32,
    msg: &jetstream::Message,
    start: &Arc<StartReport>,
    progress_every: Duration,
    hard_stop: &CancellationToken,
) -> Ending {
    let run_id = &run.run.run_id;
    // Register before checking the marker, so a cancellation arriving in between is not lost.
    let (registration, cancel_request) = shared.cancellable.register(run_id);
    let marker = match shared.cancellable.cancelled_early(run_id) {
        Some(reason) => Some(reason),
        None => match shared.markers.lookup(run_id) {
            Lookup::Cancelled(reason) => Some(reason),
            Lookup::None => None,
            Lookup::Unknown => cancel_marker(shared, run_id).await,
        },
    };
    let ending = match (marker, shared.handlers.get(&run.path)) {
        (Some(reason), _) => Ending::Cancelled(reason),
        (None, None) => Ending::Done(Err(JobError::new(format!(
            "no handler `{}` on worker {}/{} (it has: {})",
            run.path,
            shared.app,
            shared.instance,
            shared
                .handlers
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )))),
        (None, Some(handler)) => {
            let cancel = CancellationToken::new();
            let ctx = JobContext::new(
                run.clone(),
                attempt,
                shared.instance.clone(),
                cancel.clone(),
                shared.events.clone(),
                start.clone(),
            );
            execute(
                handler(ctx),
                msg,
                progress_every,
                Stops {
                    timeout: run.timeout_secs.map(Duration::from_secs),
                    hard_stop,
                    cancel_request: &cancel_request,
                    cancel: &cancel,
                    grace: shared.cancel_grace,
                    start,
                },
            )
            .await
        }
    };
    let ending = match ending {
        Ending::Cancelled(why) if why.is_empty() => Ending::Cancelled(
            shared
                .cancellable
                .reason(run_id)
                .unwrap_or_else(|| "cancelled".to_string()),
        ),
        other => other,
    };
    shared.cancellable.unregister(run_id, registration);
    ending
}

/// The reason of the run's cancel marker in `krest-cancels`, if it has one. A failed lookup
/// counts as none (the run executes; a cancellation broadcast still reaches it).
async fn cancel_marker(shared: &Shared, run_id: &str) -> Option<String> {
    match shared.cancels.get(run_id).await {
        Ok(Some(v)) => Some(
            serde_json::from_slice::<CancelRequest>(&v)
                .map(|c| c.reason)
                .unwrap_or_else(|_| "cancelled".to_string()),
        ),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(run = %run_id, error = %e, "cannot check for a cancellation; executing the run");
            None
        }
    }
}

/// Answers the run message as decided, handing the retry to the router first where the
/// decision says so.
async fn acknowledge(
    shared: &Shared,
    msg: &jetstream::Message,
    run: &RunMessage,
    attempt: u32,
    decision: &Decision,
) {
    let ack = match decision.hand_off {
        None => decision.ack,
        Some(delay) => match hand_off(shared, run, &msg.payload, attempt, delay).await {
            Ok(()) => Reply::Term,
            Err(e) => {
                tracing::warn!(run = %run.run.run_id, error = %e, "could not hand the retry to the router; retrying here");
                decision.ack
            }
        },
    };
    // A plain publish, not a request for the server's confirmation ("double ack"): the
    // result is stored already, a lost reply only means the run comes back after its ack
    // wait (which a confirmation would have logged, not prevented), and the connection is
    // flushed before a worker stops. The confirmation cost the worker ~18 % of its CPU per run.
    if let Err(e) = msg.ack_with(ack.kind()).await {
        tracing::warn!(run = %run.run.run_id, error = %e, "ack failed; the run may be redelivered");
    }
}

/// Hands a retry of an instance-addressed run to the leader's router: due after `delay`,
/// avoiding this instance.
async fn hand_off(
    shared: &Shared,
    run: &RunMessage,
    received: &[u8],
    attempt: u32,
    delay: Duration,
) -> Result<(), Error<PublishKind>> {
    let encode = |e: serde_json::Error| {
        Error::new(
            PublishKind::Encode,
            format!("cannot serialize the retry: {e}"),
        )
    };
    let handoff = handed_off(
        run,
        received,
        attempt,
        &shared.instance,
        Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default(),
    )
    .map_err(encode)?;
    let body = serde_json::to_vec(&handoff.message).map_err(encode)?;
    store(
        &shared.js,
        handoff.subject,
        Publish::build()
            .payload(body.into())
            .message_id(handoff.msg_id)
            .header(
                krest_schemas::trace::TRACEPARENT,
                krest_schemas::trace::attempt_traceparent(
                    &run.run.run_id,
                    run.shard_index(),
                    attempt,
                )
                .as_str(),
            ),
    )
    .await
}

/// Parks a message this worker cannot read on the dead-letter stream (`krest.dlq.work`): a copy
/// bounded to fit the server's max payload with its headers.
async fn park(
    js: &jetstream::Context,
    seq: u64,
    reason: &str,
    msg: &jetstream::Message,
) -> Result<(), Error<PublishKind>> {
    let id = parked_work_id(seq);
    let copy = parked_copy(
        msg.payload.len(),
        reason,
        &Origin {
            subject: &msg.subject,
            seq: Some(seq),
        },
        &id,
        js.client().server_info().max_payload,
    );
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in &copy.headers {
        headers.insert(*name, value.as_str());
    }
    store(
        js,
        dlq_subject("work"),
        Publish::build()
            .payload(msg.payload.slice(..copy.keep))
            .headers(headers)
            .message_id(id),
    )
    .await
}

/// What may stop a handler early, and how long it then has to return.
struct Stops<'a> {
    /// The job's timeout.
    timeout: Option<Duration>,
    /// The worker's shutdown deadline passed.
    hard_stop: &'a CancellationToken,
    /// The run was cancelled.
    cancel_request: &'a CancellationToken,
    /// The handler's `ctx.cancelled()`.
    cancel: &'a CancellationToken,
    /// Time a cancelled handler gets before it is aborted.
    grace: Duration,
    /// The attempt's `started` event, sent once the handler has run for its delay.
    start: &'a StartReport,
}

/// Runs the handler in its own task (so a panic is a failure, not a crash), sending progress
/// acks while it runs and stopping it at the job's timeout, on cancellation, or when the
/// worker's shutdown deadline passes.
async fn execute(
    fut: HandlerFuture,
    msg: &jetstream::Message,
    progress_every: Duration,
    stops: Stops<'_>,
) -> Ending {
    let Stops {
        timeout,
        hard_stop,
        cancel_request,
        cancel,
        grace,
        start,
    } = stops;
    let mut handle = tokio::spawn(fut.in_current_span());
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let report_start = tokio::time::sleep(start.after());
    tokio::pin!(report_start);
    let mut start_reported = false;
    // Why the handler was asked to stop, and until when it may take to return.
    let mut stopping: Option<(Ending, tokio::time::Instant)> = None;
    loop {
        let grace_sleep = async {
            match &stopping {
                Some((_, until)) => tokio::time::sleep_until(*until).await,
                None => std::future::pending().await,
            }
        };
        let deadline_sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            joined = &mut handle => {
                match stopping {
                    Some((Ending::TimedOut, _)) => return Ending::TimedOut,
                    Some((Ending::Cancelled(why), _)) => return Ending::Cancelled(why),
                    // Stopped by the shutdown deadline: unless it finished its work anyway,
                    // the run is handed back, not failed.
                    Some((Ending::Interrupted, _)) if !matches!(joined, Ok(Ok(_))) => {
                        return Ending::Interrupted
                    }
                    _ => {}
                }
                return Ending::Done(match joined {
                    Ok(r) => r,
                    Err(e) if e.is_panic() => Err(JobError::new(format!(
                        "handler panicked: {}",
                        krest_schemas::text::panic_message(&*e.into_panic())
                    ))),
                    Err(_) => Err(JobError::new("handler task was cancelled")),
                });
            }
            _ = &mut report_start, if !start_reported => {
                start_reported = true;
                start.send();
            }
            _ = tick.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "progress ack failed");
                }
            }
            _ = deadline_sleep, if stopping.is_none() => {
                cancel.cancel();
                stopping = Some((Ending::TimedOut, tokio::time::Instant::now() + grace));
            }
            _ = cancel_request.cancelled(), if stopping.is_none() => {
                cancel.cancel();
                stopping = Some((Ending::Cancelled(String::new()), tokio::time::Instant::now() + grace));
            }
            _ = hard_stop.cancelled(), if stopping.is_none() => {
                cancel.cancel();
                stopping = Some((Ending::Interrupted, tokio::time::Instant::now() + grace));
            }
            _ = grace_sleep => {
                handle.abort();
                return stopping.map_or(Ending::Interrupted, |(why, _)| why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(extra: serde_json::Value) -> RunMessage {
        let mut m = serde_json::json!({
            "runId": "g.j.1", "jobGroup": "g", "jobName": "j", "appName": "a",
            "path": "p", "jobType": "NORMAL", "args": null,
            "scheduledAt": "2026-11-29T08:43:40Z", "dispatchedAt": "2026-11-29T08:43:40.001Z",
            "trigger": "SCHEDULE", "retryTimes": 3, "revision": 1
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            m[k] = v.clone();
        }
        serde_json::from_value(m).unwrap()
    }

    #[test]
    fn a_hand_off_carries_the_attempts_and_avoids_this_instance() {
        let at = Utc::now();
        let r = run(serde_json::json!({"target": "w1", "attemptOffset": 1, "epoch": 7}));
        let mut received = serde_json::to_value(&r).unwrap();
        received["fieldOfANewerScheduler"] = serde_json::json!({"kept": true});
        let payload = serde_json::to_vec(&received).unwrap();
        let handoff = handed_off(&r, &payload, 3, "w1", at).unwrap();
        assert_eq!(
            (handoff.subject.as_str(), handoff.msg_id.as_str()),
            ("krest.work.a.g.j.r", "g.j.1/0/retry-3")
        );
        assert_eq!(
            handoff.message["fieldOfANewerScheduler"],
            serde_json::json!({"kept": true}),
            "fields this SDK does not know are kept"
        );
        let next: RunMessage = serde_json::from_value(handoff.message).unwrap();
        assert_eq!(next.attempt_offset, 3);
        assert_eq!(next.target, None);
        assert_eq!(next.retry_at, Some(at));
        assert_eq!(next.avoid, ["w1"]);
        assert_eq!(
            (next.epoch, &next.run),
            (r.epoch, &r.run),
            "the rest unchanged"
        );
    }

    #[test]
    fn run_messages_are_read_with_any_fractional_precision() {
        for (at, nanos) in [
            ("2026-11-29T08:43:40Z", 0),
            ("2026-11-29T08:43:40.5Z", 500_000_000),
            ("2026-11-29T08:43:40.001Z", 1_000_000),
            ("2026-11-29T08:43:40.0012Z", 1_200_000),
            ("2026-11-29T08:43:40.123456Z", 123_456_000),
            ("2026-11-29T08:43:40.123456789Z", 123_456_789),
            ("2026-11-29T09:43:40.25+01:00", 250_000_000),
        ] {
            let r = run(serde_json::json!({"scheduledAt": at, "dispatchedAt": at}));
            assert_eq!(
                r.scheduled_at.timestamp_nanos_opt(),
                Some(1_795_941_820_000_000_000 + nanos),
                "{at}"
            );
        }
        // What this SDK writes: UTC, with 0, 3, 6 or 9 fractional digits.
        let written = |nanos: u32| {
            let at = chrono::DateTime::from_timestamp(1_795_941_820, nanos).unwrap();
            serde_json::to_value(at).unwrap()
        };
        assert_eq!(written(0), "2026-11-29T08:43:40Z");
        assert_eq!(written(1_000_000), "2026-11-29T08:43:40.001Z");
        assert_eq!(written(1_200_000), "2026-11-29T08:43:40.001200Z");
        assert_eq!(written(123_456_789), "2026-11-29T08:43:40.123456789Z");
    }
}
