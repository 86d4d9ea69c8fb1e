//! Parking bad input on the dead-letter stream (`KREST_DLQ`, subjects `krest.dlq.<kind>`), and
//! dead-lettering runs that exhausted their deliveries.
//!
//! Parked messages keep their payload as found, with headers `Krest-Reason` and
//! `Krest-Source-Subject`, and a `Nats-Msg-Id` derived from where they were found, so every node
//! may park the same bad input and only one copy is stored. [`list`] shows them redacted
//! (`krest_schemas::redact::payload`): a parked HTTP run message carries real header values.
//!
//! JetStream leaves a work-queue message that reached its consumer's max deliveries in the
//! stream and emits an advisory. Every node listens (one per advisory, by queue group): the
//! message is parked, its run's last attempt is recorded as FAILED (so the run ends), and it is
//! deleted from the work stream.

use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use krest_schemas::api::DeadLetter;
use krest_schemas::deadletter::{header_value, parked_copy, Origin};
use krest_schemas::names::{
    dlq_subject, parked_work_id, DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, DLQ_STREAM, WORK_STREAM,
};
use krest_schemas::{redact, AttemptOutcome, Finished, RunEvent, RunMessage};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::error::{error_kinds, Error};

/// Largest payload shown by [`list`].
const SHOWN_PAYLOAD: usize = 4096;

error_kinds! {
    /// What failed handling bad input.
    pub enum DeadLetterErrorKind {
        /// Publishing the parked copy.
        Park => "cannot park a message on the dead-letter stream",
        /// Publishing a run's failure event.
        RecordFailure => "cannot record the run's failure",
        /// Reading or deleting the dead-lettered message.
        WorkStream => "cannot read the work stream",
    }
}

/// Failure handling bad input.
pub type DeadLetterError = Error<DeadLetterErrorKind>;

/// Publishes `payload` to `subject` with `msg_id` (and `headers`), waiting for the ack.
async fn publish_acked(
    js: &jetstream::Context,
    subject: String,
    msg: PublishMessage,
    kind: DeadLetterErrorKind,
) -> Result<(), DeadLetterError> {
    js.send_publish(subject, msg)
        .await
        .map_err(|e| Error::with_source(kind, e))?
        .await
        .map_err(|e| Error::with_source(kind, e))?;
    Ok(())
}

/// Parks `payload`, found at `origin`, on `krest.dlq.<kind>` (deduplicated by `msg_id`): a copy
/// bounded to fit the server's max payload with its headers (see
/// [`krest_schemas::deadletter`]), so parking never fails for size.
pub async fn park(
    js: &jetstream::Context,
    kind: &str,
    msg_id: &str,
    reason: &str,
    origin: Origin<'_>,
    payload: Bytes,
) -> Result<(), DeadLetterError> {
    let max_payload = js.client().server_info().max_payload;
    let copy = parked_copy(payload.len(), reason, &origin, msg_id, max_payload);
    let mut headers = HeaderMap::new();
    for (name, value) in &copy.headers {
        headers.insert(*name, value.as_str());
    }
    publish_acked(
        js,
        dlq_subject(kind),
        PublishMessage::build()
            .payload(payload.slice(..copy.keep))
            .headers(headers)
            .message_id(msg_id),
        DeadLetterErrorKind::Park,
    )
    .await?;
    tracing::warn!(
        kind,
        reason = %redact::text(&header_value(reason)),
        source = %header_value(origin.subject),
        seq = ?origin.seq,
        bytes = payload.len(),
        truncated = copy.truncated,
        "parked bad input on the dead-letter stream"
    );
    Ok(())
}

/// Up to `limit` parked messages, newest first, starting at sequence `start` (inclusive; the
/// newest if `None`).
pub async fn list(
    js: &jetstream::Context,
    start: Option<u64>,
    limit: usize,
) -> Result<Vec<DeadLetter>, String> {
    let mut stream = js.get_stream(DLQ_STREAM).await.map_err(|e| e.to_string())?;
    let state = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .clone();
    let mut out = Vec::new();
    let mut seq = start.map_or(state.last_sequence, |s| s.min(state.last_sequence));
    while seq >= state.first_sequence.max(1) && out.len() < limit {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let header = |name: &str| {
                m.headers
                    .get(name)
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default()
            };
            // A view: secrets in parked run messages and definitions are redacted.
            let text = redact::payload(&String::from_utf8_lossy(&m.payload));
            out.push(DeadLetter {
                seq,
                subject: m.subject.to_string(),
                reason: redact::text(&header(DLQ_REASON_HEADER)).into_owned(),
                source: header(DLQ_SOURCE_HEADER),
                at: chrono::DateTime::from_timestamp(m.time.unix_timestamp(), m.time.nanosecond())
                    .unwrap_or_default(),
                payload: text.chars().take(SHOWN_PAYLOAD).collect(),
            });
        }
        seq -= 1;
    }
    Ok(out)
}

#[derive(Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: u64,
}

/// Handles max-deliveries advisories of the work stream until `stop`.
pub async fn run_advisories(
    client: async_nats::Client,
    js: jetstream::Context,
    stop: CancellationToken,
) {
    let subject = krest_schemas::names::max_deliveries_advisories();
    let subscribed = crate::retry::until_ok(
        &stop,
        krest_schemas::Backoff::RECONNECT,
        "cannot subscribe to max-deliveries advisories",
        || async {
            client
                .queue_subscribe(subject.clone(), "krest-deadletter".to_string())
                .await
                .map_err(crate::retry::Failure::Retry)
        },
    )
    .await;
    let Ok(Some(mut sub)) = subscribed else {
        return;
    };
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            _ = stop.cancelled() => return,
        };
        let advisory: MaxDeliveries = match serde_json::from_slice(&msg.payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable max-deliveries advisory");
                continue;
            }
        };
        if let Err(e) = dead_letter(&js, advisory.stream_seq, advisory.deliveries).await {
            tracing::error!(seq = advisory.stream_seq, error = %e, "could not dead-letter a run; it stays in the work stream");
        }
    }
}

/// Records `attempt` of `run` as FAILED for good (no retry follows), on behalf of `worker`.
pub async fn record_failure(
    js: &jetstream::Context,
    run: &RunMessage,
    attempt: u32,
    worker: &str,
    error: &str,
) -> Result<(), DeadLetterError> {
    let finished = RunEvent::Finished(Finished {
        run: run.run.clone(),
        shard: run.shard_index(),
        shard_total: run.shard_total(),
        attempt,
        worker: worker.to_string(),
        at: Utc::now(),
        outcome: AttemptOutcome::Failed,
        will_retry: false,
        retry_in_ms: None,
        output: None,
        error: Some(error.to_string()),
        duration_ms: 0,
        delivery_token: run.delivery_token.clone(),
        started_at: None,
        scheduled_at: None,
    });
    let body = serde_json::to_vec(&finished)
        .map_err(|e| Error::with_source(DeadLetterErrorKind::RecordFailure, e))?;
    publish_acked(
        js,
        finished.subject(),
        PublishMessage::build()
            .payload(body.into())
            .message_id(finished.msg_id()),
        DeadLetterErrorKind::RecordFailure,
    )
    .await
}

/// Parks work message `seq`, records its run's last attempt as failed, deletes it.
async fn dead_letter(
    js: &jetstream::Context,
    seq: u64,
    deliveries: u64,
) -> Result<(), DeadLetterError> {
    let stream = js
        .get_stream(WORK_STREAM)
        .await
        .map_err(|e| Error::with_source(DeadLetterErrorKind::WorkStream, e))?;
    let Ok(raw) = stream.get_raw_message(seq).await else {
        return Ok(()); // Already handled (by another node or an earlier advisory).
    };
    let reason = format!(
        "delivered {deliveries} times without being acknowledged (the workers holding it crashed or hung)"
    );
    park(
        js,
        "work",
        &parked_work_id(seq),
        &reason,
        Origin {
            subject: &raw.subject,
            seq: Some(seq),
        },
        raw.payload.clone(),
    )
    .await?;
    if let Ok(run) = serde_json::from_slice::<RunMessage>(&raw.payload) {
        let attempt = run
            .attempt_offset
            .saturating_add(u32::try_from(deliveries).unwrap_or(u32::MAX));
        record_failure(
            js,
            &run,
            attempt,
            "krest-deadletter",
            &format!("dead-lettered: {reason}; parked on krest.dlq.work"),
        )
        .await?;
    }
    stream
        .delete_message(seq)
        .await
        .map_err(|e| Error::with_source(DeadLetterErrorKind::WorkStream, e))?;
    Ok(())
}
