//! Alert webhooks: an HTTP POST of an [`AlertPayload`] when a run ends in an outcome the job's
//! `alert.on` lists. Deliveries are queued and sent by a background task (a few at a time, each
//! retried up to three times), so alerting never holds up recording or dispatch; when the queue
//! is full an alert is dropped with an error log. The webhook URL carries secrets (tokens in its
//! path or query): log lines show it redacted, and HTTP errors without it.

use std::sync::Arc;
use std::time::Duration;

use krest_schemas::Backoff;

use krest_schemas::api::AlertPayload;
use krest_schemas::redact;
use tokio::sync::{mpsc, Semaphore};

/// Queued deliveries at most.
const QUEUE: usize = 1000;
/// Deliveries in flight at most.
const CONCURRENT: usize = 8;
/// Tries per delivery.
const TRIES: u32 = 3;

struct Delivery {
    url: String,
    payload: AlertPayload,
}

/// A cheap handle to the alert sender.
#[derive(Clone)]
pub struct Alerter {
    tx: mpsc::Sender<Delivery>,
}

impl Alerter {
    /// Starts the sender task; it ends when every handle is dropped.
    pub fn start() -> Alerter {
        let (tx, mut rx) = mpsc::channel::<Delivery>(QUEUE);
        let client = reqwest::Client::builder()
            .user_agent(concat!("krest/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(10))
            .build();
        tokio::spawn(async move {
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the HTTP client; alerts are disabled");
                    return;
                }
            };
            let limit = Arc::new(Semaphore::new(CONCURRENT));
            while let Some(d) = rx.recv().await {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let client = client.clone();
                tokio::spawn(async move {
                    deliver(&client, &d).await;
                    drop(permit);
                });
            }
        });
        Alerter { tx }
    }

    /// Queues an alert. The payload is a view: secrets in the run's texts are redacted here.
    pub fn send(&self, url: &str, mut payload: AlertPayload) {
        payload.redact_secrets();
        let run = payload.run.run_id.clone();
        if self
            .tx
            .try_send(Delivery {
                url: url.to_string(),
                payload,
            })
            .is_err()
        {
            tracing::error!(run = %run, "alert queue full; alert dropped");
        }
    }
}

async fn deliver(client: &reqwest::Client, d: &Delivery) {
    let body = match serde_json::to_vec(&d.payload) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize an alert");
            return;
        }
    };
    for attempt in 1..=TRIES {
        let sent = client
            .post(&d.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status().is_success() => {
                tracing::info!(run = %d.payload.run.run_id, alert = %d.payload.alert, "alert delivered");
                return;
            }
            Ok(resp) => {
                tracing::warn!(run = %d.payload.run.run_id, status = %resp.status(), attempt, "alert webhook refused")
            }
            Err(e) => {
                tracing::warn!(run = %d.payload.run.run_id, error = %e.without_url(), attempt, "alert webhook unreachable")
            }
        }
        if attempt < TRIES {
            tokio::time::sleep(Backoff::QUICK.delay(attempt) * 10).await;
        }
    }
    tracing::error!(run = %d.payload.run.run_id, url = %redact::webhook(&d.url), "alert not delivered after {TRIES} tries");
}
