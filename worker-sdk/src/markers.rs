//! Cancel markers (`krest-cancels`) mirrored in memory by a KV watch, so checking a run for a
//! marker before its handler starts costs no round trip to the server.
//!
//! The mirror answers only while it is known to be complete: after the watch has delivered the
//! bucket's history, and while it keeps up with the bucket (checked every few seconds; a watch
//! that falls behind is restarted). Otherwise — and when the bucket holds more markers than
//! the mirror keeps — a run's check asks the bucket, as it always did. A marker written an
//! instant before its run arrives may not be mirrored yet; its cancellation broadcast, which
//! follows the marker, is remembered by [`crate::attempt::Cancellable`] for runs not yet here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use krest_schemas::names::CANCELS_BUCKET;
use krest_schemas::{Backoff, CancelRequest};
use tokio_util::sync::CancellationToken;

/// Most markers mirrored; beyond this, checks go to the bucket.
const MAX_MARKERS: usize = 100_000;

/// How often the watch is checked against the bucket's last revision.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// What the mirror knows of a run's marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The run has a marker: the cancellation's reason.
    Cancelled(String),
    /// The run has no marker.
    None,
    /// The mirror is not complete: ask the bucket.
    Unknown,
}

/// The mirrored markers: run id → reason.
#[derive(Default)]
pub(crate) struct Markers {
    map: Mutex<HashMap<String, String>>,
    complete: AtomicBool,
}

impl Markers {
    /// The marker of `run_id`, as far as the mirror knows.
    pub(crate) fn lookup(&self, run_id: &str) -> Lookup {
        if !self.complete.load(Ordering::Acquire) {
            return Lookup::Unknown;
        }
        match self.map.lock() {
            Ok(map) => match map.get(run_id) {
                Some(reason) => Lookup::Cancelled(reason.clone()),
                None => Lookup::None,
            },
            Err(_) => Lookup::Unknown,
        }
    }

    fn set_complete(&self, complete: bool) {
        self.complete.store(complete, Ordering::Release);
    }

    /// Applies one bucket entry; returns false once the mirror is over its bound.
    fn apply(&self, entry: &kv::Entry) -> bool {
        let Ok(mut map) = self.map.lock() else {
            return false;
        };
        match entry.operation {
            kv::Operation::Put => {
                let reason = serde_json::from_slice::<CancelRequest>(&entry.value)
                    .map(|c| c.reason)
                    .unwrap_or_else(|_| "cancelled".to_string());
                map.insert(entry.key.clone(), reason);
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                map.remove(&entry.key);
            }
        }
        map.len() <= MAX_MARKERS
    }

    fn clear(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.clear();
        }
    }
}

/// The bucket's stream state: (messages, last sequence).
async fn bucket_state(js: &jetstream::Context) -> Option<(u64, u64)> {
    let mut stream = js.get_stream(format!("KV_{CANCELS_BUCKET}")).await.ok()?;
    let info = stream.info().await.ok()?;
    Some((info.state.messages, info.state.last_sequence))
}

/// Mirrors the bucket into `markers` until `stop` (then the mirror answers no more).
pub(crate) async fn mirror(
    js: jetstream::Context,
    bucket: kv::Store,
    markers: std::sync::Arc<Markers>,
    stop: CancellationToken,
) {
    mirror_until_stopped(&js, &bucket, &markers, &stop).await;
    markers.set_complete(false);
}

async fn mirror_until_stopped(
    js: &jetstream::Context,
    bucket: &kv::Store,
    markers: &Markers,
    stop: &CancellationToken,
) {
    let mut failures = 0u32;
    let mut overflowed = false;
    while !stop.is_cancelled() {
        markers.set_complete(false);
        markers.clear();
        if std::mem::take(&mut overflowed) {
            // Checks go to the bucket meanwhile; try again once markers may have expired.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                _ = stop.cancelled() => return,
            }
        }
        // An empty bucket's watch delivers nothing until the first marker: complete at once.
        let empty = bucket_state(js).await.is_some_and(|(n, _)| n == 0);
        let mut watch = match bucket.watch_with_history(">").await {
            Ok(w) => {
                failures = 0;
                w
            }
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "cannot watch cancel markers; checking each run instead");
                tokio::select! {
                    _ = tokio::time::sleep(Backoff::RECONNECT.delay(failures)) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        if empty {
            markers.set_complete(true);
        }
        let mut seen = 0u64;
        let mut behind_checks = 0u32;
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.tick().await;
        loop {
            tokio::select! {
                item = watch.next() => match item {
                    Some(Ok(entry)) => {
                        seen = seen.max(entry.revision);
                        if !markers.apply(&entry) {
                            tracing::warn!(max = MAX_MARKERS, "too many cancel markers to mirror; checking each run instead");
                            overflowed = true;
                            break;
                        }
                        if entry.delta == 0 {
                            markers.set_complete(true);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "cancel marker watch failed; restarting it");
                        break;
                    }
                    None => break,
                },
                _ = check.tick() => {
                    // A watch that stopped delivering (seen on clustered streams) is restarted.
                    match bucket_state(js).await {
                        Some((n, last)) if n > 0 && last > seen => {
                            behind_checks += 1;
                            if behind_checks >= 2 {
                                tracing::debug!(seen, last, "cancel marker watch is behind; restarting it");
                                break;
                            }
                        }
                        Some(_) => behind_checks = 0,
                        None => {}
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use krest_test_support::{eventually, NatsServer};
    use std::sync::Arc;

    #[tokio::test]
    async fn mirrors_markers_and_says_when_it_cannot_tell() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        // As a scheduler node creates it (nats-server 2.9 refuses async-nats' own KV create).
        js.create_stream(jetstream::stream::Config {
            name: format!("KV_{CANCELS_BUCKET}"),
            subjects: vec![krest_schemas::names::kv_subjects(CANCELS_BUCKET)],
            max_messages_per_subject: 1,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
        let bucket = js.get_key_value(CANCELS_BUCKET).await.unwrap();
        let body = |reason: &str| {
            serde_json::to_vec(&serde_json::json!({
                "runId": "x", "reason": reason, "at": "2026-12-03T00:00:00Z"
            }))
            .unwrap()
        };
        bucket.put("g.j.1", body("before").into()).await.unwrap();
        let markers = Arc::new(Markers::default());
        assert_eq!(markers.lookup("g.j.1"), Lookup::Unknown);
        let stop = CancellationToken::new();
        let task = tokio::spawn(mirror(
            js.clone(),
            bucket.clone(),
            markers.clone(),
            stop.clone(),
        ));
        eventually(
            Duration::from_secs(20),
            "the history is mirrored",
            || async {
                (markers.lookup("g.j.1") == Lookup::Cancelled("before".into())).then_some(())
            },
        )
        .await;
        assert_eq!(markers.lookup("g.j.2"), Lookup::None);
        bucket
            .put("g.j.2", b"not json".to_vec().into())
            .await
            .unwrap();
        eventually(
            Duration::from_secs(20),
            "a new marker is mirrored",
            || async {
                (markers.lookup("g.j.2") == Lookup::Cancelled("cancelled".into())).then_some(())
            },
        )
        .await;
        bucket.delete("g.j.1").await.unwrap();
        eventually(
            Duration::from_secs(20),
            "a deleted marker is gone",
            || async { (markers.lookup("g.j.1") == Lookup::None).then_some(()) },
        )
        .await;
        stop.cancel();
        task.await.unwrap();
    }
}
