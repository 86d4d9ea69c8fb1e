//! Publishing run events (started, log, finished) to the events stream: in order, pipelined
//! (acks are awaited off the send path), retried with the same `Nats-Msg-Id` so a retry never
//! creates a duplicate.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage as Publish};
use krest_schemas::names::events_subject;
use krest_schemas::RunEvent;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// How many times a publish is retried before it is given up.
const PUBLISH_ATTEMPTS: u32 = 8;

enum Cmd {
    Publish {
        event: Box<RunEvent>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    },
    Close,
}

/// A cheap handle to the worker's event publisher.
#[derive(Clone)]
pub(crate) struct EventSink {
    tx: mpsc::UnboundedSender<Cmd>,
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
    pub(crate) async fn send_confirmed(&self, event: RunEvent) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::Publish {
                event: Box::new(event),
                done: Some(done),
            })
            .map_err(|_| "event publisher has stopped".to_string())?;
        wait.await
            .map_err(|_| "event publisher has stopped".to_string())?
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

async fn publish(
    js: &jetstream::Context,
    acks: &mut JoinSet<()>,
    event: RunEvent,
    done: Option<oneshot::Sender<Result<(), String>>>,
) {
    let (group, name) = event.job();
    let subject = events_subject(group, name);
    let id = event.msg_id();
    let payload = match serde_json::to_vec(&event) {
        Ok(p) => bytes::Bytes::from(p),
        Err(e) => {
            if let Some(done) = done {
                let _ = done.send(Err(format!("cannot serialize event: {e}")));
            }
            return;
        }
    };
    // Send now, in order; await the ack in the background.
    let first = js
        .send_publish(
            subject.clone(),
            Publish::build().payload(payload.clone()).message_id(&id),
        )
        .await;
    let js = js.clone();
    acks.spawn(async move {
        let mut result = match first {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut attempt = 1;
        while let Err(e) = &result {
            if attempt >= PUBLISH_ATTEMPTS {
                break;
            }
            tracing::warn!(event = %id, error = %e, attempt, "publishing run event failed; retrying");
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(7))).await;
            attempt += 1;
            result = match js
                .send_publish(
                    subject.clone(),
                    Publish::build().payload(payload.clone()).message_id(&id),
                )
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
        }
        if let Err(e) = &result {
            tracing::error!(event = %id, error = %e, "giving up publishing run event");
        }
        if let Some(done) = done {
            let _ = done.send(result);
        }
    });
}
