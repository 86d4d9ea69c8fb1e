//! Publishing run events (started, log, finished) to the events stream: in order, pipelined
//! (acks are awaited off the send path), retried with the same `Nats-Msg-Id` so a retry never
//! creates a duplicate. Also [`store`], the one JetStream publish awaited until stored that the
//! worker's other publishes (parked copies, retries handed to the router) use.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage as Publish};
use async_nats::Subject;
use chrono::{DateTime, Utc};
use krest_schemas::{Backoff, RunEvent, Started};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::error::{Error, PublishKind};

/// How many times a publish is tried before it is given up (with [`PUBLISH_BACKOFF`]
/// between tries: about 28 s of waiting in all).
const PUBLISH_ATTEMPTS: u32 = 10;

/// Waiting between tries of an event publish: it fails while NATS or the events stream is
/// unavailable.
const PUBLISH_BACKOFF: Backoff = Backoff::RECONNECT;

type Done = oneshot::Sender<Result<(), Error<PublishKind>>>;

enum Cmd {
    Publish {
        event: Box<RunEvent>,
        done: Option<Done>,
    },
    Close,
}

/// A cheap handle to the worker's event publisher.
#[derive(Clone)]
pub(crate) struct EventSink {
    tx: mpsc::UnboundedSender<Cmd>,
}

/// An attempt's `started` event, sent at most once: when the attempt has run for the worker's
/// start-report delay, or before its first log line — or never, when the attempt ends first:
/// its `finished` event then carries the start (`startedAt`), one stored message instead of
/// two for a short handler.
pub(crate) struct StartReport {
    event: Mutex<Option<Started>>,
    events: EventSink,
    /// The start-report delay.
    after: Duration,
}

impl StartReport {
    /// The report of `event`, due `after` the attempt starts (sent now if `after` is zero).
    pub(crate) fn new(event: Started, events: EventSink, after: Duration) -> StartReport {
        let report = StartReport {
            event: Mutex::new(Some(event)),
            events,
            after,
        };
        if after.is_zero() {
            report.send();
        }
        report
    }

    /// How long after the attempt's start the event is sent.
    pub(crate) fn after(&self) -> Duration {
        self.after
    }

    /// Sends the `started` event unless it was sent or folded already.
    pub(crate) fn send(&self) {
        if let Some(e) = self.take() {
            self.events.send(RunEvent::Started(e));
        }
    }

    /// The start to fold into `finished` (when and for which fire time), if the `started`
    /// event was not sent; after this it never is.
    pub(crate) fn fold(&self) -> Option<(DateTime<Utc>, Option<DateTime<Utc>>)> {
        self.take().map(|e| (e.at, e.scheduled_at))
    }

    fn take(&self) -> Option<Started> {
        self.event
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

fn stopped() -> Error<PublishKind> {
    Error::new(PublishKind::Stopped, "event publisher has stopped")
}

impl EventSink {
    /// Queues an event; failures are logged, not reported.
    pub(crate) fn send(&self, event: RunEvent) {
        let _ = self.tx.send(Cmd::Publish {
            event: Box::new(event),
            done: None,
        });
    }

    /// Queues an event and waits until the events stream has stored it.
    pub(crate) async fn send_confirmed(&self, event: RunEvent) -> Result<(), Error<PublishKind>> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::Publish {
                event: Box::new(event),
                done: Some(done),
            })
            .map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }

    /// Asks the publisher to finish what is queued and stop.
    pub(crate) fn close(&self) {
        let _ = self.tx.send(Cmd::Close);
    }
}

/// Starts the publisher task. It ends after [`EventSink::close`] once every queued event is
/// stored or given up.
pub(crate) fn spawn_publisher(js: jetstream::Context) -> (EventSink, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
    let task = tokio::spawn(async move {
        let mut acks = JoinSet::new();
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Publish { event, done }) => {
                        publish(&js, &mut acks, *event, done).await;
                    }
                    Some(Cmd::Close) | None => break,
                },
                Some(_) = acks.join_next(), if !acks.is_empty() => {}
            }
        }
        // Drain whatever was queued before the close.
        while let Ok(cmd) = rx.try_recv() {
            if let Cmd::Publish { event, done } = cmd {
                publish(&js, &mut acks, *event, done).await;
            }
        }
        while acks.join_next().await.is_some() {}
    });
    (EventSink { tx }, task)
}

/// Publishes `msg` to `subject` and waits until JetStream has stored it (or answered that it is
/// a duplicate of a stored one).
pub(crate) async fn store(
    js: &jetstream::Context,
    subject: impl Into<Subject>,
    msg: Publish,
) -> Result<(), Error<PublishKind>> {
    let subject = subject.into();
    let fail = |e: async_nats::jetstream::context::PublishError| {
        Error::new(
            PublishKind::of(&e),
            format!("cannot publish to {subject}: {e}"),
        )
    };
    js.send_publish(subject.clone(), msg)
        .await
        .map_err(fail)?
        .await
        .map_err(fail)?;
    Ok(())
}

async fn publish(
    js: &jetstream::Context,
    acks: &mut JoinSet<()>,
    event: RunEvent,
    done: Option<Done>,
) {
    let subject = event.subject();
    let id = event.msg_id();
    let payload = match serde_json::to_vec(&event) {
        Ok(p) => bytes::Bytes::from(p),
        Err(e) => {
            let e = Error::new(
                PublishKind::Encode,
                format!("cannot serialize event {id}: {e}"),
            );
            tracing::error!(event = %id, error = %e, "giving up publishing run event");
            if let Some(done) = done {
                let _ = done.send(Err(e));
            }
            return;
        }
    };
    let traceparent = event.traceparent();
    let message = move || {
        Publish::build()
            .payload(payload.clone())
            .message_id(&id)
            .header(krest_schemas::trace::TRACEPARENT, traceparent.as_str())
    };
    // Send now, in order; await the ack in the background.
    let first = js.send_publish(subject.clone(), message()).await;
    let js = js.clone();
    let id = event.msg_id();
    acks.spawn(async move {
        let fail = |e: async_nats::jetstream::context::PublishError| {
            Error::new(
                PublishKind::of(&e),
                format!("cannot publish to {subject}: {e}"),
            )
        };
        let mut result = match first {
            Ok(ack) => ack.await.map(|_| ()).map_err(fail),
            Err(e) => Err(fail(e)),
        };
        let mut attempt = 1;
        while let Err(e) = &result {
            if attempt >= PUBLISH_ATTEMPTS || !e.kind().is_transient() {
                break;
            }
            tracing::warn!(event = %id, error = %e, attempt, "publishing run event failed; retrying");
            tokio::time::sleep(PUBLISH_BACKOFF.delay(attempt)).await;
            attempt += 1;
            result = store(&js, subject.clone(), message()).await;
        }
        if let Err(e) = &result {
            tracing::error!(event = %id, error = %e, attempts = attempt, "giving up publishing run event");
        }
        if let Some(done) = done {
            let _ = done.send(result);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use krest_test_support::NatsServer;

    #[tokio::test]
    async fn publish_failures_have_kinds() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client.clone());
        let e = store(&js, "krest.nowhere", Publish::build().payload("x".into()))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), PublishKind::NoStream, "{e}");
        let too_big = vec![b'x'; client.server_info().max_payload + 1];
        let e = store(
            &js,
            "krest.nowhere",
            Publish::build().payload(too_big.into()),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(e.kind(), PublishKind::TooLarge, "{e}");

        // After the publisher stops, a confirmed send says so.
        let (sink, task) = spawn_publisher(js);
        sink.close();
        task.await.unwrap();
        let event = serde_json::from_value(serde_json::json!({
            "type": "log", "runId": "g.j.1", "jobGroup": "g", "jobName": "j", "shard": 0,
            "attempt": 1, "seq": 1, "at": "2026-11-29T08:43:40Z", "level": "INFO", "line": "hi"
        }))
        .unwrap();
        let e = sink.send_confirmed(event).await.err().unwrap();
        assert_eq!(e.kind(), PublishKind::Stopped, "{e}");
    }
}
