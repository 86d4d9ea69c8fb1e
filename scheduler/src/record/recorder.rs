//! The recorder: reads the events stream from the database's cursor with an ordered consumer
//! and writes it into SQL in batches. Each node runs one into its own database.
//!
//! Nothing is acknowledged: the stream is the log and the cursor lives in the database, updated
//! in the same transaction as the rows. When the database is unavailable the recorder retries the
//! same batch with backoff; the events wait in the stream.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use krest_schemas::names::{EVENTS_STREAM, EVENTS_SUBJECTS};
use krest_schemas::RunEvent;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::record::store::Store;

/// How long the recorder waits for an event before checking that it is not stalled.
const STALL_CHECK: Duration = Duration::from_secs(5);

/// Recorder settings.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// Most events per transaction.
    pub max_batch: usize,
    /// How long to wait for more events before writing a partial batch.
    pub linger: Duration,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig {
            max_batch: 1000,
            linger: Duration::from_millis(20),
        }
    }
}

/// Runs until `stop`, publishing the last recorded stream sequence on `progress`.
pub async fn run(
    js: jetstream::Context,
    store: Store,
    followups: crate::record::followup::Followups,
    cfg: RecorderConfig,
    progress: watch::Sender<u64>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match record(&js, &store, &followups, &cfg, &progress, &stop).await {
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "recorder interrupted; restarting from the database cursor");
                let d =
                    Duration::from_millis(200u64 << failures.min(5)).min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

async fn record(
    js: &jetstream::Context,
    store: &Store,
    followups: &crate::record::followup::Followups,
    cfg: &RecorderConfig,
    progress: &watch::Sender<u64>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let cursor = retry_db(stop, "read the recorder cursor", || store.cursor()).await?;
    let _ = progress.send(cursor);
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let deliver_policy = if cursor == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: cursor + 1,
        }
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: EVENTS_SUBJECTS.to_string(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot create the recorder's consumer: {e}"))?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    tracing::info!(from = cursor + 1, "recording run events");
    loop {
        // Wait for the first event of a batch, then take what arrives within the linger time.
        // While idle, check now and then that the stream has nothing we have not seen: an
        // ordered consumer whose server died can stall silently, and is then recreated.
        let first = loop {
            tokio::select! {
                m = messages.next() => break m,
                _ = tokio::time::sleep(STALL_CHECK) => {
                    let mut stream = js.get_stream(EVENTS_STREAM).await.map_err(|e| e.to_string())?;
                    let last = stream.info().await.map_err(|e| e.to_string())?.state.last_sequence;
                    if last > *progress.borrow() {
                        return Err(format!("event consumer stalled at {} while the stream is at {last}", *progress.borrow()));
                    }
                }
                _ = stop.cancelled() => return Ok(()),
            }
        };
        let mut batch = Batch::default();
        match first {
            Some(Ok(m)) => batch.push(m)?,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("event consumer ended".into()),
        }
        let deadline = tokio::time::Instant::now() + cfg.linger;
        while batch.events.len() < cfg.max_batch {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(m))) => batch.push(m)?,
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(None) => return Err("event consumer ended".into()),
                Err(_) => break,
            }
        }
        // Park malformed events first: once the cursor moves past them they are not read again.
        for (seq, subject, payload, error) in &batch.bad {
            crate::deadletter::park(
                js,
                "events",
                &format!("events/{seq}"),
                error,
                subject,
                payload.clone(),
            )
            .await
            .map_err(|e| format!("cannot park malformed event {seq}: {e}"))?;
        }
        let ended = retry_db(stop, "record run events", || {
            store.apply(&batch.events, batch.last_seq)
        })
        .await?;
        followups.on_ended(&ended).await;
        let _ = progress.send(batch.last_seq);
    }
}

#[derive(Default)]
struct Batch {
    events: Vec<RunEvent>,
    last_seq: u64,
    /// Malformed events: (stream sequence, subject, payload, error).
    bad: Vec<(u64, String, bytes::Bytes, String)>,
}

impl Batch {
    fn push(&mut self, m: jetstream::Message) -> Result<(), String> {
        let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
        self.last_seq = seq;
        match serde_json::from_slice::<RunEvent>(&m.payload) {
            Ok(e) => self.events.push(e),
            Err(e) => {
                tracing::error!(seq, subject = %m.subject, error = %e, "malformed run event");
                self.bad.push((
                    seq,
                    m.subject.to_string(),
                    m.payload.clone(),
                    format!("malformed run event: {e}"),
                ));
            }
        }
        Ok(())
    }
}

/// Retries a database operation with backoff until it succeeds or `stop` fires.
async fn retry_db<T, F, Fut>(stop: &CancellationToken, what: &str, mut op: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::record::store::StoreError>>,
{
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!("database available again; recording resumes");
                }
                return Ok(v);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures % 10 == 0 {
                    tracing::error!(error = %e, failures, "cannot {what}; events wait in the stream, retrying");
                }
                let d =
                    Duration::from_millis(100u64 << failures.min(6)).min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop.cancelled() => return Err("stopped".into()),
                }
            }
        }
    }
}
