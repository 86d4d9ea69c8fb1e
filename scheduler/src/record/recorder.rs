//! The recorder: reads the events stream from the database's cursor with an ordered consumer
//! and writes it into SQL in batches. Each node runs one into its own database.
//!
//! Nothing is acknowledged: the stream is the log and the cursor lives in the database, updated
//! in the same transaction as the rows. When the database is unavailable the recorder retries the
//! same batch with backoff; the events wait in the stream.
//!
//! No single event can stall it:
//! - an event that does not decode is parked on `krest.dlq.events` (a copy bounded to fit the
//!   server's max payload; see [`crate::deadletter::park`]); if even that fails a few times, the
//!   copy is dropped with an error log naming the sequence — the original stays in the stream;
//! - a batch the database keeps rejecting is applied event by event: an event that fails while a
//!   write without it succeeds is poison, and is parked the same way. If no write succeeds, the
//!   database is down, and the recorder waits for it.
//!
//! Its progress and lag (events and seconds behind the stream) are published as a
//! [`RecorderStatus`], shown by `/readyz` and `krest cluster status`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use krest_schemas::deadletter::{header_value, Origin};
use krest_schemas::messages::{MAX_LOG_LINE, MAX_LOG_LINES_PER_ATTEMPT};
use krest_schemas::names::{parked_event_id, EVENTS_STREAM, EVENTS_SUBJECTS};
use krest_schemas::{Backoff, RunEvent};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{error_kinds, Error};
use crate::record::store::{Applied, Store};

/// How long the recorder waits for an event before checking that it is not stalled.
const STALL_CHECK: Duration = Duration::from_secs(5);

/// How often the lag behind the stream is measured.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Attempts to park one bad event before its copy is dropped.
const PARK_ATTEMPTS: u32 = 3;

/// Consecutive failures of a whole batch after which it is applied event by event.
const ISOLATE_AFTER: u32 = 3;

/// Age of the oldest unrecorded event from which a node says it is catching up (events a
/// current node has not written yet are younger than this).
pub const CATCHING_UP_AFTER: Duration = Duration::from_secs(1);

/// What a node tells with its answers to run queries when its database is behind the events
/// stream (its oldest unrecorded event older than [`CATCHING_UP_AFTER`]); `None` when current.
pub fn catching_up(node: &str, s: &RecorderStatus) -> Option<krest_schemas::api::CatchingUp> {
    (s.lag_events > 0 && s.lag >= CATCHING_UP_AFTER).then(|| krest_schemas::api::CatchingUp {
        node: node.to_string(),
        lag_events: s.lag_events,
        lag_ms: u64::try_from(s.lag.as_millis()).unwrap_or(u64::MAX),
        recorded_seq: s.recorded_seq,
        stream_seq: s.stream_seq,
    })
}

error_kinds! {
    /// What interrupted recording (the recorder restarts from the database's cursor).
    pub enum RecordErrorKind {
        /// The events stream could not be read.
        EventsStream => "cannot read the events stream",
        /// The recorder's consumer could not be created or failed.
        Consumer => "the recorder's consumer failed",
        /// The consumer delivers nothing while the stream has more (its server died).
        Stalled => "the recorder's consumer stalled",
        /// The database failed where no retry applies (moving the cursor past a poison event).
        Database => "the database failed",
        /// The node is stopping.
        Stopped => "stopping",
    }
}

/// What interrupted recording.
pub type RecordError = Error<RecordErrorKind>;

fn err<E: Into<crate::error::BoxError>>(kind: RecordErrorKind) -> impl FnOnce(E) -> RecordError {
    move |e| Error::with_source(kind, e)
}

/// Recorder settings.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// Most events per transaction.
    pub max_batch: usize,
    /// How long to wait for the next event before writing a partial batch: a batch grows while
    /// events keep coming at most this far apart (an idle node writes an event after this
    /// long), up to `max_batch` events or `max_linger`.
    pub linger: Duration,
    /// How long a batch may wait from its first event before it is written, however busy the
    /// stream. Under load a batch then holds the `dispatched` and `finished` events of most
    /// runs together, and a run is written once, with its final status.
    pub max_linger: Duration,
    /// Most bytes of event messages per batch: events may be as large as the server's
    /// `max_payload` (a worker's output, a forged event), and a batch of `max_batch` of them
    /// would be held in memory at once.
    pub max_batch_bytes: usize,
    /// Lag beyond which the node reports itself not ready (`/readyz`).
    pub max_lag: Duration,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig {
            max_batch: 5000,
            linger: Duration::from_millis(20),
            max_linger: Duration::from_millis(250),
            max_batch_bytes: 16 << 20,
            max_lag: Duration::from_secs(30),
        }
    }
}

/// Where the recorder stands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecorderStatus {
    /// Stream sequence of the last event recorded (or parked).
    pub recorded_seq: u64,
    /// Last sequence of the events stream, as last measured.
    pub stream_seq: u64,
    /// Events in the stream not recorded yet.
    pub lag_events: u64,
    /// Age of the oldest event not recorded yet (0 when none).
    pub lag: Duration,
    /// Why the recorder is not progressing, while it is not (database down, stream unreachable).
    pub failing: Option<String>,
    /// Bad events parked since the node started.
    pub parked: u64,
    /// Bad events whose copy could not be parked and was dropped since the node started.
    pub dropped: u64,
}

/// A cheap handle to the recorder's status.
pub type StatusRx = watch::Receiver<RecorderStatus>;

/// Runs until `stop`, publishing progress on `status`.
pub async fn run(
    js: jetstream::Context,
    store: Store,
    followups: crate::record::followup::Followups,
    cfg: RecorderConfig,
    key: crate::delivery::DeliveryKey,
    status: watch::Sender<RecorderStatus>,
    stop: CancellationToken,
) {
    let recorder = Recorder {
        key: &key,
        js: &js,
        store: &store,
        followups: &followups,
        cfg: &cfg,
        status: &status,
        stop: &stop,
    };
    tokio::join!(recorder.record_loop(), measure_lag(&js, &status, &stop));
}

struct Recorder<'a> {
    /// Checks the delivery tokens of attempt events.
    key: &'a crate::delivery::DeliveryKey,
    js: &'a jetstream::Context,
    store: &'a Store,
    followups: &'a crate::record::followup::Followups,
    cfg: &'a RecorderConfig,
    status: &'a watch::Sender<RecorderStatus>,
    stop: &'a CancellationToken,
}

impl Recorder<'_> {
    async fn record_loop(&self) {
        let mut failures = 0u32;
        while !self.stop.is_cancelled() {
            match self.record().await {
                Ok(()) => return,
                Err(e) if e.kind() == RecordErrorKind::Stopped => return,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "recorder interrupted; restarting from the database cursor");
                    self.failing(Some(e.to_string()));
                    if !crate::retry::pause(self.stop, Backoff::RECONNECT, failures).await {
                        return;
                    }
                }
            }
        }
    }

    fn failing(&self, why: Option<String>) {
        self.status.send_if_modified(|s| {
            if s.failing != why {
                s.failing = why;
                true
            } else {
                false
            }
        });
    }

    /// The database holds the stream up to `seq` (recorded by this node, or by another sharing
    /// the database: it never goes back).
    fn recorded(&self, seq: u64) {
        self.status.send_modify(|s| {
            let seq = s.recorded_seq.max(seq);
            s.recorded_seq = seq;
            s.failing = None;
            if s.stream_seq <= seq {
                s.stream_seq = seq;
                s.lag_events = 0;
                s.lag = Duration::ZERO;
            } else {
                s.lag_events = s.stream_seq - seq;
            }
        });
    }

    async fn record(&self) -> Result<(), RecordError> {
        let cursor = self
            .retry_db("read the recorder cursor", || self.store.cursor())
            .await?;
        self.recorded(cursor);
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(err(RecordErrorKind::EventsStream))?;
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
            .map_err(err(RecordErrorKind::Consumer))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(err(RecordErrorKind::Consumer))?;
        tracing::info!(from = cursor + 1, "recording run events");
        // `dispatched` events held until their run's next event or a second past their time
        // ([`hold_dispatched`]).
        let mut held: Vec<Held> = Vec::new();
        let mut clock = StreamClock::default();
        let mut read = cursor;
        loop {
            // Wait for the first event of a batch, then take what follows while events keep
            // coming within the linger time of each other (up to the batch's size and age
            // bounds). While idle, check now and then that the stream has nothing we have not
            // seen: an ordered consumer whose server died can stall silently, and is then
            // recreated.
            let release_at = held.iter().map(|e| clock.wall(e.until)).min();
            let first = loop {
                tokio::select! {
                    // Messages before a held event's time: that time is by the stream's clock,
                    // behind the wall clock while messages wait to be read.
                    biased;
                    _ = self.stop.cancelled() => return Ok(()),
                    m = messages.next() => break Some(m),
                    _ = sleep_until_utc(release_at), if release_at.is_some() => break None,
                    _ = tokio::time::sleep(STALL_CHECK) => {
                        let mut stream = self.js.get_stream(EVENTS_STREAM).await.map_err(err(RecordErrorKind::EventsStream))?;
                        let last = stream.info().await.map_err(err(RecordErrorKind::EventsStream))?.state.last_sequence;
                        let recorded = self.status.borrow().recorded_seq;
                        if last > recorded {
                            return Err(Error::with_source(RecordErrorKind::Stalled, format!("at {recorded} while the stream is at {last}")));
                        }
                    }
                }
            };
            let mut batch = Batch {
                last_seq: read,
                ..Batch::default()
            };
            let got_message = first.is_some();
            match first {
                Some(Some(Ok(m))) => batch.push(m, self.key)?,
                Some(Some(Err(e))) => return Err(Error::with_source(RecordErrorKind::Consumer, e)),
                Some(None) => {
                    return Err(Error::with_source(RecordErrorKind::Consumer, "it ended"))
                }
                // A held event's time has come.
                None => {}
            }
            if got_message && batch.size(self.cfg) < self.cfg.max_batch {
                gather(&mut messages, self.cfg, |m| {
                    batch.push(m, self.key)?;
                    Ok(batch.size(self.cfg))
                })
                .await?;
            }
            read = batch.last_seq;
            let now = clock.now(batch.stored, Utc::now());
            hold_dispatched(&mut batch, &mut held, now);
            // Park malformed events first: once the cursor moves past them they are not read
            // again.
            for bad in &batch.bad {
                self.park(bad).await;
            }
            let applied = self.write(&batch).await?;
            count(&batch, &applied.ended);
            self.followups.on_ended(&applied.ended).await;
            self.recorded(batch.last_seq.max(applied.cursor));
        }
    }

    /// Writes a batch; a batch the database keeps rejecting is isolated event by event.
    async fn write(&self, batch: &Batch) -> Result<Applied, RecordError> {
        let mut failures = 0u32;
        loop {
            match self.store.apply(&batch.events, batch.cursor()).await {
                Ok(applied) => {
                    if failures > 0 {
                        tracing::info!("database available again; recording resumes");
                    }
                    return Ok(applied);
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures % 10 == 0 {
                        tracing::error!(error = %e, failures, "cannot record run events; they wait in the stream, retrying");
                    }
                    self.failing(Some(format!("cannot record run events: {e}")));
                    if failures % ISOLATE_AFTER == 0 {
                        if let Some(applied) = self.isolate(batch).await? {
                            return Ok(applied);
                        }
                    }
                    self.pause(failures).await?;
                }
            }
        }
    }

    /// Applies the batch one event at a time. An event the database rejects while a write
    /// without it succeeds is parked and skipped. Returns `None` when the database accepts no
    /// write at all (it is down: the caller waits and retries the batch).
    async fn isolate(&self, batch: &Batch) -> Result<Option<Applied>, RecordError> {
        let mut ended = Vec::new();
        let mut done = self.status.borrow().recorded_seq;
        for item in &batch.events {
            let (seq, event) = item;
            match self
                .store
                .apply(std::slice::from_ref(item), (*seq).min(batch.cursor()))
                .await
            {
                Ok(a) => {
                    ended.extend(a.ended);
                    done = *seq;
                }
                Err(e) => {
                    // Is it this event, or the database? A write without it tells.
                    if self.store.apply(&[], done).await.is_err() {
                        return Ok(None);
                    }
                    let payload = serde_json::to_vec(event).unwrap_or_default();
                    let subject = event.subject();
                    self.park(&Bad {
                        seq: *seq,
                        subject,
                        payload: payload.into(),
                        reason: format!("the database rejected this event: {e}"),
                    })
                    .await;
                }
            }
        }
        let last = self
            .store
            .apply(&[], batch.cursor())
            .await
            .map_err(err(RecordErrorKind::Database))?;
        Ok(Some(Applied {
            ended,
            cursor: last.cursor,
        }))
    }

    /// Parks a bad event, trying a few times; then drops the copy with an error log.
    async fn park(&self, bad: &Bad) {
        for attempt in 1..=PARK_ATTEMPTS {
            match crate::deadletter::park(
                self.js,
                "events",
                &parked_event_id(bad.seq),
                &bad.reason,
                Origin {
                    subject: &bad.subject,
                    seq: Some(bad.seq),
                },
                bad.payload.clone(),
            )
            .await
            {
                Ok(()) => {
                    self.status.send_modify(|s| s.parked += 1);
                    return;
                }
                Err(e) if attempt == PARK_ATTEMPTS => {
                    tracing::error!(
                        seq = bad.seq,
                        error = %e,
                        reason = %bad.reason,
                        "could not park a bad event; skipping it (the original stays in {EVENTS_STREAM} at this sequence)"
                    );
                    self.status.send_modify(|s| s.dropped += 1);
                }
                Err(e) => {
                    tracing::warn!(seq = bad.seq, error = %e, "could not park a bad event; retrying");
                    if self.pause(attempt).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Waits between retries; errs when stopping.
    async fn pause(&self, failures: u32) -> Result<(), RecordError> {
        if crate::retry::pause(self.stop, Backoff::RECONNECT, failures).await {
            Ok(())
        } else {
            Err(Error::new(RecordErrorKind::Stopped))
        }
    }

    /// Retries a database operation with backoff until it succeeds or `stop` fires.
    async fn retry_db<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, RecordError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::record::store::StoreError>>,
    {
        let mut failures = 0u32;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures % 10 == 0 {
                        tracing::error!(error = %e, failures, "cannot {what}; retrying");
                    }
                    self.failing(Some(format!("cannot {what}: {e}")));
                    self.pause(failures).await?;
                }
            }
        }
    }
}

/// A `dispatched` event held back by [`hold_dispatched`] (boxed: thousands are held at N =
/// 10,000 fires a second, and moved between vectors with each batch).
struct Held {
    seq: u64,
    event: Box<RunEvent>,
    /// Written by then at the latest (by the stream's clock, see [`StreamClock`]).
    until: DateTime<Utc>,
}

/// How long past its fire time (or its dispatch, if later) a held `dispatched` event waits for
/// its run's next event.
const HOLD_GRACE: chrono::Duration = chrono::Duration::seconds(1);

/// The clock [`hold_dispatched`] goes by: the time the server stored the last message read,
/// and while no message comes, the wall clock less how far behind that message was when read.
/// A recorder behind the stream then holds and releases `dispatched` events as one that is
/// not: by the wall clock, a recorder more than a second behind found every fire's time
/// passed, held nothing, and wrote each run twice (inserted, then updated a batch or more
/// later), which put it further behind.
#[derive(Debug, Default)]
struct StreamClock {
    /// How far the last message read was behind the wall clock when read.
    behind: chrono::Duration,
}

impl StreamClock {
    /// The time of a batch: when its last message was stored (`None`: the batch was started by
    /// a held event's time, not by a message), given the wall clock `wall`.
    fn now(&mut self, stored: Option<DateTime<Utc>>, wall: DateTime<Utc>) -> DateTime<Utc> {
        match stored {
            Some(t) => {
                self.behind = (wall - t).max(chrono::Duration::zero());
                t
            }
            None => wall - self.behind,
        }
    }

    /// The wall-clock time at which this clock reaches `at`.
    fn wall(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        at + self.behind
    }
}

/// Holds back each `dispatched` event whose run this batch brings no other event of, until the
/// batch that brings the run's next event (its start or end: a second or so later for a run
/// dispatched ahead of its time, up to the handlers' lateness for one dispatched at its time),
/// so that a run is written once, with its end, instead of inserted now and updated then; or
/// until a second past its fire time or its dispatch, whichever is later (at most
/// [`krest_schemas::messages::MAX_HOLD`] and a second after `now`). `now` is the stream's clock
/// ([`StreamClock`]). Held events go back in front of the batch that releases them, and the
/// database's cursor stays before the first still held, so a restart reads them again.
///
/// At N = 10,000 fires a second, a run's `dispatched` and `finished` were ~10,000 events
/// apart, more than a batch holds, whether dispatched ahead or at its time.
fn hold_dispatched(batch: &mut Batch, held: &mut Vec<Held>, now: DateTime<Utc>) {
    let dispatched = |e: &RunEvent| matches!(e, RunEvent::Dispatched(_));
    if held.is_empty() && !batch.events.iter().any(|(_, e)| dispatched(e)) {
        return;
    }
    // Which of the batch's events to hold, and which held ones to release: those whose run
    // this batch brings other events of, and those whose time has come.
    let (hold, release): (Vec<bool>, Vec<bool>) = {
        let others: std::collections::HashSet<&str> = batch
            .events
            .iter()
            .filter(|(_, e)| !dispatched(e))
            .map(|(_, e)| e.run_id())
            .collect();
        (
            batch
                .events
                .iter()
                .map(|(_, e)| dispatched(e) && !others.contains(e.run_id()))
                .collect(),
            held.iter()
                .map(|e| e.until <= now || others.contains(e.event.run_id()))
                .collect(),
        )
    };
    if hold.contains(&true) || release.contains(&true) {
        let latest = now
            + chrono::Duration::from_std(krest_schemas::messages::MAX_HOLD).unwrap_or(HOLD_GRACE)
            + HOLD_GRACE;
        let mut events = Vec::with_capacity(batch.events.len());
        let mut kept = Vec::with_capacity(held.len());
        for (e, release) in held.drain(..).zip(release) {
            if release {
                events.push((e.seq, *e.event));
            } else {
                kept.push(e);
            }
        }
        for ((seq, event), hold) in batch.events.drain(..).zip(hold) {
            if !hold {
                events.push((seq, event));
                continue;
            }
            let due = match &event {
                RunEvent::Dispatched(d) => d.scheduled_at.max(d.dispatched_at),
                _ => now,
            };
            kept.push(Held {
                seq,
                until: (due + HOLD_GRACE).min(latest),
                event: Box::new(event),
            });
        }
        *held = kept;
        batch.events = events;
    }
    batch.held_from = held.iter().map(|e| e.seq).min();
}

/// Sleeps until `at` by the wall clock (at once if it has passed); forever for `None`.
async fn sleep_until_utc(at: Option<DateTime<Utc>>) {
    match at {
        Some(at) => tokio::time::sleep((at - Utc::now()).to_std().unwrap_or(Duration::ZERO)).await,
        None => std::future::pending().await,
    }
}

/// Takes the rest of a batch from `messages` into `take` (which answers the batch's size in
/// events): while the next message comes within `cfg.linger` of the last one, until the
/// batch holds `cfg.max_batch` events or `cfg.max_linger` has passed since this call.
async fn gather<M, E>(
    messages: &mut (impl futures_util::Stream<Item = Result<M, E>> + Unpin),
    cfg: &RecorderConfig,
    mut take: impl FnMut(M) -> Result<usize, RecordError>,
) -> Result<(), RecordError>
where
    E: Into<crate::error::BoxError>,
{
    let last_call = tokio::time::Instant::now() + cfg.max_linger;
    loop {
        let deadline = (tokio::time::Instant::now() + cfg.linger).min(last_call);
        match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(Ok(m))) => {
                if take(m)? >= cfg.max_batch {
                    return Ok(());
                }
            }
            Ok(Some(Err(e))) => return Err(Error::with_source(RecordErrorKind::Consumer, e)),
            Ok(None) => return Err(Error::with_source(RecordErrorKind::Consumer, "it ended")),
            Err(_) => return Ok(()),
        }
    }
}

/// Counts a recorded batch in the node's metrics: runs ended (by status, with their
/// durations) and the lateness of first attempts' handler starts.
fn count(batch: &Batch, ended: &[krest_schemas::api::RunSummary]) {
    let m = &crate::metrics::METRICS;
    for (_, event) in &batch.events {
        // A start is reported by `started`, or folded into `finished` (`startedAt`).
        let (attempt, started, due) = match event {
            RunEvent::Started(s) => (s.attempt, Some(s.at), s.scheduled_at),
            RunEvent::Finished(f) => (f.attempt, f.started_at, f.scheduled_at),
            _ => continue,
        };
        if let (1, Some(at), Some(due)) = (attempt, started, due) {
            m.start_lateness.observe_ms((at - due).num_milliseconds());
        }
    }
    for run in ended {
        m.runs_ended.add(run.status.as_str(), 1);
        if let (Some(start), Some(end)) = (run.started_at, run.finished_at) {
            m.run_duration.observe_ms((end - start).num_milliseconds());
        }
    }
}

/// Measures, every second, how far the recorder is behind the stream: in events, and as the
/// age of the oldest event it has not recorded.
async fn measure_lag(
    js: &jetstream::Context,
    status: &watch::Sender<RecorderStatus>,
    stop: &CancellationToken,
) {
    let mut tick = tokio::time::interval(LAG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let measured = tokio::time::timeout(Duration::from_secs(2), lag(js, status)).await;
        match measured {
            Ok(Ok((stream_seq, oldest))) => status.send_modify(|s| {
                s.stream_seq = stream_seq.max(s.recorded_seq);
                s.lag_events = s.stream_seq - s.recorded_seq;
                s.lag = match oldest {
                    Some(at) if s.lag_events > 0 => (Utc::now() - at).to_std().unwrap_or_default(),
                    _ => Duration::ZERO,
                };
            }),
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot measure the recorder's lag"),
            Err(_) => tracing::debug!("cannot measure the recorder's lag: NATS did not answer"),
        }
    }
}

/// The stream's last sequence and the time of the first event after the recorded one.
async fn lag(
    js: &jetstream::Context,
    status: &watch::Sender<RecorderStatus>,
) -> Result<(u64, Option<DateTime<Utc>>), RecordError> {
    let mut stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(err(RecordErrorKind::EventsStream))?;
    let state = stream
        .info()
        .await
        .map_err(err(RecordErrorKind::EventsStream))?
        .state
        .clone();
    let recorded = status.borrow().recorded_seq;
    if state.last_sequence <= recorded {
        return Ok((state.last_sequence, None));
    }
    let next = (recorded + 1).max(state.first_sequence);
    let oldest = match stream.get_raw_message(next).await {
        Ok(m) => DateTime::from_timestamp(m.time.unix_timestamp(), m.time.nanosecond()),
        Err(_) => None,
    };
    Ok((state.last_sequence, oldest))
}

/// Why event `e`, found in `m`, must not be recorded (`None`: it may): it is not on its run's
/// subject (the app, group and job in the subject are what the server's permissions check);
/// it is about an attempt and lacks the run's delivery token (forged by someone who never
/// received the run, or from a worker too old to copy the token); or it is a `dispatched` or
/// `skipped` event without a scheduler node's token.
fn refused(
    e: &RunEvent,
    m: &jetstream::Message,
    key: &crate::delivery::DeliveryKey,
) -> Option<String> {
    let subject = m.subject.as_str();
    let expected = e.subject();
    if subject != expected {
        return Some(format!(
            "event about run {} of app {} found on {}, not on its run's subject {}: not recorded",
            header_value(e.run_id()),
            header_value(&e.run().app_name),
            header_value(subject),
            header_value(&expected)
        ));
    }
    match e.delivery() {
        Some((shard, token)) if !key.verify(e.run_id(), shard, token) => Some(format!(
            "attempt event for run {} shard {shard} without the run's delivery token \
             (forged, or from a worker that does not copy deliveryToken): not recorded",
            header_value(e.run_id())
        )),
        Some(_) => None,
        None => {
            let token = m
                .headers
                .as_ref()
                .and_then(|h| h.get(krest_schemas::names::SCHEDULER_TOKEN_HEADER))
                .map(|v| v.as_str())
                .unwrap_or_default();
            (!key.verify_scheduler(e.run_id(), token)).then(|| {
                format!(
                    "run event about run {} without a scheduler node's token \
                     (Krest-Scheduler-Token; forged?): not recorded",
                    header_value(e.run_id())
                )
            })
        }
    }
}

/// A message that is not a run event.
struct Bad {
    seq: u64,
    subject: String,
    payload: bytes::Bytes,
    reason: String,
}

#[derive(Default)]
struct Batch {
    events: Vec<(u64, RunEvent)>,
    /// The last stream sequence read.
    last_seq: u64,
    /// Where the database's cursor may move with this batch: before the first event held
    /// back ([`hold_dispatched`]), else `last_seq`.
    held_from: Option<u64>,
    /// When the server stored the last message taken.
    stored: Option<DateTime<Utc>>,
    bad: Vec<Bad>,
    /// Bytes of the messages taken.
    bytes: usize,
}

impl Batch {
    /// The cursor to store with this batch: every event up to it is written.
    fn cursor(&self) -> u64 {
        self.held_from
            .map_or(self.last_seq, |h| h.saturating_sub(1).min(self.last_seq))
    }

    /// The batch's size as [`gather`] counts it: its events, or `cfg.max_batch` (full) once
    /// its messages' bytes reach `cfg.max_batch_bytes`.
    fn size(&self, cfg: &RecorderConfig) -> usize {
        if self.bytes >= cfg.max_batch_bytes {
            cfg.max_batch
        } else {
            self.events.len()
        }
    }

    fn push(
        &mut self,
        m: jetstream::Message,
        key: &crate::delivery::DeliveryKey,
    ) -> Result<(), RecordError> {
        let info = m.info().map_err(err(RecordErrorKind::Consumer))?;
        let seq = info.stream_sequence;
        self.stored =
            DateTime::from_timestamp(info.published.unix_timestamp(), info.published.nanosecond());
        self.last_seq = seq;
        self.bytes = self.bytes.saturating_add(m.payload.len());
        match serde_json::from_slice::<RunEvent>(&m.payload) {
            Ok(e) => match refused(&e, &m, key) {
                Some(reason) => {
                    tracing::warn!(seq, subject = %header_value(&m.subject), run = %header_value(e.run_id()), %reason, "parking a refused run event");
                    self.bad.push(Bad {
                        seq,
                        subject: m.subject.to_string(),
                        payload: m.payload.clone(),
                        reason,
                    });
                }
                // Past an attempt's log bound (the SDK's cut marker is the last line kept) a
                // line is not stored: a worker that ignores the bound cannot grow a run's log
                // forever.
                None => match e {
                    RunEvent::Log(l) if l.seq > MAX_LOG_LINES_PER_ATTEMPT + 1 => {
                        tracing::debug!(seq, run = %l.run.run_id, line = l.seq, "log line past the attempt's bound; not stored");
                    }
                    RunEvent::Log(mut l) if l.line.len() > MAX_LOG_LINE => {
                        l.line = krest_schemas::text::truncate(
                            std::mem::take(&mut l.line),
                            MAX_LOG_LINE,
                        );
                        self.events.push((seq, RunEvent::Log(l)));
                    }
                    e => self.events.push((seq, e)),
                },
            },
            Err(e) => {
                // Serde's message may quote the input: bounded like a header.
                let reason = header_value(&format!("malformed run event: {e}"));
                tracing::error!(seq, subject = %header_value(&m.subject), bytes = m.payload.len(), %reason, "parking a malformed run event");
                self.bad.push(Bad {
                    seq,
                    subject: m.subject.to_string(),
                    payload: m.payload.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    fn dispatched(run: &str, seq: u64, due: &str) -> (u64, RunEvent) {
        let e = serde_json::from_value(serde_json::json!({
            "type": "dispatched", "runId": run, "jobGroup": "g", "jobName": "j", "appName": "a",
            "path": "p", "jobType": "NORMAL", "trigger": "SCHEDULE", "scheduledAt": due,
            "dispatchedAt": "2026-01-01T00:00:00Z", "shardTotal": 1, "args": null,
            "revision": 1, "node": "n1"
        }))
        .unwrap();
        (seq, e)
    }

    fn finished(run: &str, seq: u64) -> (u64, RunEvent) {
        let e = serde_json::from_value(serde_json::json!({
            "type": "finished", "runId": run, "jobGroup": "g", "jobName": "j", "appName": "a",
            "shard": 0, "shardTotal": 1, "attempt": 1, "worker": "w", "at": "2026-01-01T00:00:01Z",
            "outcome": "SUCCEEDED", "durationMs": 1
        }))
        .unwrap();
        (seq, e)
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn seqs(b: &Batch) -> Vec<u64> {
        b.events.iter().map(|(s, _)| *s).collect()
    }

    /// A run's `dispatched` waits for the batch bringing its next event, whether it was
    /// dispatched ahead of its time or at it, and the cursor stays before what is held.
    #[test]
    fn a_run_dispatched_is_written_with_its_next_event() {
        let mut held = Vec::new();
        // Read at 00:00:00.010: run a due at :01 (ahead), run b due at :00 (on time), run c
        // dispatched and ended in the same batch.
        let mut b = Batch {
            events: vec![
                dispatched("a", 10, "2026-01-01T00:00:01Z"),
                dispatched("b", 11, "2026-01-01T00:00:00Z"),
                dispatched("c", 12, "2026-01-01T00:00:00Z"),
                finished("c", 13),
            ],
            last_seq: 13,
            ..Batch::default()
        };
        hold_dispatched(&mut b, &mut held, t("2026-01-01T00:00:00.010Z"));
        assert_eq!(seqs(&b), [12, 13], "a's and b's dispatches wait");
        assert_eq!(b.cursor(), 9, "the cursor stays before what is held");
        // Run b's end comes: its dispatch goes in front of it; a's still waits.
        let mut b = Batch {
            events: vec![finished("b", 14)],
            last_seq: 14,
            ..Batch::default()
        };
        hold_dispatched(&mut b, &mut held, t("2026-01-01T00:00:00.500Z"));
        assert_eq!(seqs(&b), [11, 14]);
        assert_eq!(b.cursor(), 9);
        // Run a's end comes: its dispatch goes in front of it, in the same batch.
        let mut b = Batch {
            events: vec![finished("a", 15)],
            last_seq: 15,
            ..Batch::default()
        };
        hold_dispatched(&mut b, &mut held, t("2026-01-01T00:00:01.020Z"));
        assert_eq!(seqs(&b), [10, 15]);
        assert_eq!(b.cursor(), 15);
        assert!(held.is_empty());
    }

    #[test]
    fn a_held_dispatch_is_written_a_second_past_its_time_without_its_run() {
        let mut held = Vec::new();
        let mut b = Batch {
            events: vec![dispatched("a", 10, "2026-01-01T00:00:01Z")],
            last_seq: 10,
            ..Batch::default()
        };
        hold_dispatched(&mut b, &mut held, t("2026-01-01T00:00:00Z"));
        assert!(b.events.is_empty());
        assert_eq!(held[0].until, t("2026-01-01T00:00:02Z"));
        // Woken at that time with nothing new read: written.
        let mut b = Batch {
            last_seq: 10,
            ..Batch::default()
        };
        hold_dispatched(&mut b, &mut held, t("2026-01-01T00:00:02Z"));
        assert_eq!(seqs(&b), [10]);
        assert_eq!(b.cursor(), 10);
        // A forged far future is held at most MAX_HOLD and a second.
        let mut b = Batch {
            events: vec![dispatched("x", 11, "2100-01-01T00:00:00Z")],
            last_seq: 11,
            ..Batch::default()
        };
        hold_dispatched(&mut b, &mut held, t("2026-01-01T00:00:00Z"));
        assert_eq!(held[0].until, t("2026-01-01T00:00:11Z"));
    }

    /// A recorder behind the stream holds a run dispatched ahead as one that is not: the
    /// hold goes by when the stream stored the events, not by when they are read (the
    /// recorder 5 s behind here, past the run's time and grace when it reads its dispatch).
    #[test]
    fn a_run_dispatched_ahead_and_read_late_is_written_with_its_next_event() {
        let mut clock = StreamClock::default();
        let mut held = Vec::new();
        let mut b = Batch {
            events: vec![dispatched("a", 10, "2026-01-01T00:00:01Z")],
            last_seq: 10,
            stored: Some(t("2026-01-01T00:00:00.010Z")),
            ..Batch::default()
        };
        let now = clock.now(b.stored, t("2026-01-01T00:00:05.010Z"));
        hold_dispatched(&mut b, &mut held, now);
        assert!(b.events.is_empty(), "a's dispatch waits");
        assert_eq!(b.cursor(), 9);
        // Run a's end, stored 20 ms after its time, read 5 s later: written together.
        let mut b = Batch {
            events: vec![finished("a", 11)],
            last_seq: 11,
            stored: Some(t("2026-01-01T00:00:01.020Z")),
            ..Batch::default()
        };
        let now = clock.now(b.stored, t("2026-01-01T00:00:06.020Z"));
        hold_dispatched(&mut b, &mut held, now);
        assert_eq!(seqs(&b), [10, 11]);
        assert_eq!(b.cursor(), 11);
        // A run whose next event does not come: held until a second past its time by the
        // stream's clock, which the wall clock reaches as late as the stream was behind.
        let mut b = Batch {
            events: vec![dispatched("c", 12, "2026-01-01T00:00:02Z")],
            last_seq: 12,
            stored: Some(t("2026-01-01T00:00:01.500Z")),
            ..Batch::default()
        };
        let now = clock.now(b.stored, t("2026-01-01T00:00:06.500Z"));
        hold_dispatched(&mut b, &mut held, now);
        assert!(b.events.is_empty());
        assert_eq!(clock.wall(held[0].until), t("2026-01-01T00:00:08Z"));
        let mut b = Batch {
            last_seq: 12,
            ..Batch::default()
        };
        let now = clock.now(None, t("2026-01-01T00:00:07.990Z"));
        hold_dispatched(&mut b, &mut held, now);
        assert!(b.events.is_empty(), "not yet");
        let now = clock.now(None, t("2026-01-01T00:00:08Z"));
        hold_dispatched(&mut b, &mut held, now);
        assert_eq!(seqs(&b), [12]);
        assert_eq!(b.cursor(), 12);
    }

    fn cfg(max_batch: usize, linger_ms: u64, max_linger_ms: u64) -> RecorderConfig {
        RecorderConfig {
            max_batch,
            linger: Duration::from_millis(linger_ms),
            max_linger: Duration::from_millis(max_linger_ms),
            ..RecorderConfig::default()
        }
    }

    /// Messages `0..n`, each `gap_ms` after the previous one, then none for an hour.
    fn spaced(
        n: u32,
        gap_ms: u64,
    ) -> impl futures_util::Stream<Item = Result<u32, std::io::Error>> + Unpin {
        Box::pin(
            stream::iter(0..n)
                .then(move |i| async move {
                    tokio::time::sleep(Duration::from_millis(gap_ms)).await;
                    Ok(i)
                })
                .chain(stream::once(async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(u32::MAX)
                })),
        )
    }

    async fn gathered(
        messages: &mut (impl futures_util::Stream<Item = Result<u32, std::io::Error>> + Unpin),
        cfg: &RecorderConfig,
    ) -> Vec<u32> {
        let mut batch = Vec::new();
        gather(messages, cfg, |m| {
            batch.push(m);
            Ok(batch.len())
        })
        .await
        .unwrap();
        batch
    }

    /// A batch grows while events keep coming, however long that takes in all (here 4 gaps
    /// of a third of the linger time: longer than the linger time together), and ends when
    /// they stop.
    #[tokio::test]
    async fn a_batch_grows_while_events_keep_coming() {
        let mut messages = spaced(4, 300);
        let batch = gathered(&mut messages, &cfg(5000, 1000, 60_000)).await;
        assert_eq!(batch, [0, 1, 2, 3]);
    }

    /// A batch of large events is full at its byte bound, whatever its number of events.
    #[test]
    fn a_batch_of_large_events_is_full_at_its_byte_bound() {
        let cfg = RecorderConfig::default();
        let mut batch = Batch {
            bytes: cfg.max_batch_bytes - 1,
            ..Batch::default()
        };
        assert_eq!(batch.size(&cfg), 0);
        batch.bytes = cfg.max_batch_bytes;
        assert_eq!(batch.size(&cfg), cfg.max_batch, "full");
    }

    /// A batch ends at its size bound, or at its age bound while events never stop.
    #[tokio::test]
    async fn a_batch_ends_at_its_size_or_age_bound() {
        let mut ready =
            stream::iter((0..10_000).map(Ok::<u32, std::io::Error>)).chain(stream::pending());
        let batch = gathered(&mut ready, &cfg(7_000, 50, 60_000)).await;
        assert_eq!(batch.len(), 7_000, "stopped at max_batch");
        let next = gathered(&mut ready, &cfg(7_000, 50, 60_000)).await;
        assert_eq!(next.len(), 3_000, "the rest comes next");
        assert_eq!(next.first(), Some(&7_000));

        let mut endless = Box::pin(stream::repeat_with(|| Ok::<u32, std::io::Error>(1)).then(
            |m| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                m
            },
        ));
        let batch = gathered(&mut endless, &cfg(usize::MAX, 1000, 100)).await;
        assert!(
            !batch.is_empty(),
            "an endless stream's batch ends at max_linger"
        );
    }
}
