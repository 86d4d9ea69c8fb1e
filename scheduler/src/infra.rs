//! Creating (or finding) Krest's streams and KV buckets, idempotently, on nats-server 2.9 and
//! newer.
//!
//! KV buckets are created as their backing streams (`KV_<bucket>`) and then opened with
//! `get_key_value`: async-nats's `create_key_value` fails against 2.9 (see FACTS.md), and the
//! stream form works on every server version.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use krest_schemas::names::{
    CANCELS_BUCKET, DLQ_STREAM, DLQ_SUBJECTS, EVENTS_STREAM, EVENTS_SUBJECTS, JOBS_BUCKET,
    LEADER_BUCKET, NODES_BUCKET, ONCE_BUCKET, SECRETS_BUCKET, STATE_BUCKET, WORKERS_BUCKET,
    WORK_STREAM, WORK_SUBJECTS,
};

/// Sizes and lifetimes of what [`ensure`] creates. Existing streams keep their settings.
#[derive(Debug, Clone)]
pub struct InfraConfig {
    /// Replicas of every stream and bucket; `None` = decided from the server ([`auto_replicas`]).
    pub replicas: Option<usize>,
    /// Lease TTL: max age of the leader bucket.
    pub lease_ttl: Duration,
    /// Heartbeat TTL of workers and nodes.
    pub heartbeat_ttl: Duration,
    /// How long run events are kept in the stream.
    pub events_max_age: Duration,
    /// Window in which a re-published run (same `Nats-Msg-Id`) is dropped as a duplicate.
    pub duplicate_window: Duration,
    /// Revisions kept per job definition.
    pub job_history: i64,
}

impl Default for InfraConfig {
    fn default() -> Self {
        InfraConfig {
            replicas: None,
            lease_ttl: Duration::from_secs(3),
            heartbeat_ttl: Duration::from_secs(10),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(5 * 60),
            job_history: 64,
        }
    }
}

/// The opened buckets and streams a node works with.
#[derive(Clone, Debug)]
pub struct Infra {
    /// JetStream context.
    pub js: jetstream::Context,
    /// Leader lease.
    pub leader: kv::Store,
    /// Job definitions.
    pub jobs: kv::Store,
    /// Per-job scheduling state.
    pub state: kv::Store,
    /// Worker heartbeats.
    pub workers: kv::Store,
    /// Node presence.
    pub nodes: kv::Store,
    /// Cancelled runs.
    pub cancels: kv::Store,
    /// "Done once" markers.
    pub once: kv::Store,
    /// The lease TTL actually configured on the leader bucket.
    pub lease_ttl: Duration,
    /// The key of delivery tokens (from the `krest-secrets` bucket).
    pub delivery: crate::delivery::DeliveryKey,
}

/// Errors creating or opening streams and buckets.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up {what}: {message}")]
pub struct InfraError {
    /// The stream or bucket.
    pub what: String,
    /// The server's or client's reason.
    pub message: String,
}

fn err(what: &str, e: impl std::fmt::Display) -> InfraError {
    InfraError {
        what: what.to_string(),
        message: e.to_string(),
    }
}

/// Creates what is missing and opens everything. Safe to call from many nodes at once.
/// Replicas for a server: 1 outside a cluster, else the cluster's size up to 3 (from the
/// client URLs the server advertises; 1 if it advertises none).
pub fn auto_replicas(info: &async_nats::ServerInfo) -> usize {
    match info.cluster {
        Some(_) => info.connect_urls.len().clamp(1, 3),
        None => 1,
    }
}

/// Creates what is missing and opens everything. Safe to call from many nodes at once.
pub async fn ensure(js: &jetstream::Context, cfg: &InfraConfig) -> Result<Infra, InfraError> {
    let replicas = cfg
        .replicas
        .unwrap_or_else(|| auto_replicas(&js.client().server_info()));
    ensure_configured(js, cfg, replicas).await
}

async fn ensure_configured(
    js: &jetstream::Context,
    cfg: &InfraConfig,
    replicas: usize,
) -> Result<Infra, InfraError> {
    ensure_stream(
        js,
        stream::Config {
            name: WORK_STREAM.to_string(),
            description: Some("Krest runs waiting for a worker".into()),
            subjects: vec![WORK_SUBJECTS.to_string()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: cfg.duplicate_window,
            ..Default::default()
        },
    )
    .await?;
    ensure_stream(
        js,
        stream::Config {
            name: EVENTS_STREAM.to_string(),
            description: Some("Krest run events: dispatched, started, log, finished".into()),
            subjects: vec![EVENTS_SUBJECTS.to_string()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_age: cfg.events_max_age,
            duplicate_window: Duration::from_secs(120).min(cfg.events_max_age),
            ..Default::default()
        },
    )
    .await?;
    ensure_stream(
        js,
        stream::Config {
            name: DLQ_STREAM.to_string(),
            description: Some(
                "Krest dead letters: bad input and runs that exhausted their deliveries".into(),
            ),
            subjects: vec![DLQ_SUBJECTS.to_string()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_age: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
    )
    .await?;
    let leader = ensure_bucket(js, LEADER_BUCKET, 1, cfg.lease_ttl, replicas).await?;
    let jobs = ensure_bucket(js, JOBS_BUCKET, cfg.job_history, Duration::ZERO, replicas).await?;
    let state = ensure_bucket(js, STATE_BUCKET, 1, Duration::ZERO, replicas).await?;
    let workers = ensure_bucket(js, WORKERS_BUCKET, 1, cfg.heartbeat_ttl, replicas).await?;
    let nodes = ensure_bucket(js, NODES_BUCKET, 1, cfg.heartbeat_ttl, replicas).await?;
    let cancels =
        ensure_bucket(js, CANCELS_BUCKET, 1, Duration::from_secs(86400), replicas).await?;
    let once = ensure_bucket(js, ONCE_BUCKET, 1, Duration::from_secs(7 * 86400), replicas).await?;
    let secrets = ensure_bucket(js, SECRETS_BUCKET, 1, Duration::ZERO, replicas).await?;
    let delivery = crate::delivery::DeliveryKey::load_or_create(&secrets)
        .await
        .map_err(|e| err(SECRETS_BUCKET, e))?;
    let lease_ttl = js
        .get_stream(format!("KV_{LEADER_BUCKET}"))
        .await
        .map_err(|e| err(LEADER_BUCKET, e))?
        .cached_info()
        .config
        .max_age;
    if lease_ttl != cfg.lease_ttl {
        tracing::warn!(
            configured = ?cfg.lease_ttl, actual = ?lease_ttl,
            "the leader bucket exists with another TTL; using the bucket's"
        );
    }
    Ok(Infra {
        js: js.clone(),
        leader,
        jobs,
        state,
        workers,
        nodes,
        cancels,
        once,
        lease_ttl,
        delivery,
    })
}

async fn ensure_stream(js: &jetstream::Context, cfg: stream::Config) -> Result<(), InfraError> {
    let name = cfg.name.clone();
    match js.get_stream(&name).await {
        Ok(_) => return Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(_)
            ) =>
        {
            // Not found (or another API error): try to create it below.
        }
        Err(e) => return Err(err(&name, e)),
    }
    match js.create_stream(cfg).await {
        Ok(_) => Ok(()),
        // Another node created it in between.
        Err(e) => match js.get_stream(&name).await {
            Ok(_) => Ok(()),
            Err(_) => Err(err(&name, e)),
        },
    }
}

async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &str,
    history: i64,
    ttl: Duration,
    replicas: usize,
) -> Result<kv::Store, InfraError> {
    ensure_stream(
        js,
        stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![krest_schemas::names::kv_subjects(bucket)],
            max_messages_per_subject: history,
            max_age: ttl,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        },
    )
    .await?;
    js.get_key_value(bucket).await.map_err(|e| err(bucket, e))
}

/// Waits until a JetStream API call succeeds, so a node started before its NATS server (or
/// before JetStream is ready) comes up by itself. Logs each failure with the reason.
pub async fn ensure_with_retry(
    js: &jetstream::Context,
    cfg: &InfraConfig,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<Infra> {
    crate::retry::until_ok(
        stop,
        krest_schemas::Backoff::RECONNECT,
        "JetStream not ready: cannot set up Krest's streams and buckets",
        || async { ensure(js, cfg).await.map_err(crate::retry::Failure::Retry) },
    )
    .await
    .unwrap_or(None) // every failure is retried
}

/// The current value of every live key of a KV bucket, read from its stream (key list from
/// stream info, then each key's last message) — no consumer involved, which stays reliable
/// while a clustered stream changes leader. Deleted and purged keys are left out.
pub async fn kv_values(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<Vec<(String, bytes::Bytes)>, String> {
    use futures_util::StreamExt;
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| e.to_string())?;
    let prefix = format!("$KV.{bucket}.");
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    while let Some(s) = subjects.next().await {
        keys.push(s.map_err(|e| e.to_string())?.0);
    }
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    for subject in keys {
        let Ok(msg) = stream.get_last_raw_message_by_subject(&subject).await else {
            continue; // expired in between
        };
        let deleted = msg
            .headers
            .get("KV-Operation")
            .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
        if !deleted {
            let key = subject
                .strip_prefix(&prefix)
                .unwrap_or(&subject)
                .to_string();
            out.push((key, msg.payload));
        }
    }
    Ok(out)
}

/// The state of KV bucket `bucket`'s stream now. (A `kv::Store`'s own status is the stream
/// info cached when it was opened, so it cannot tell whether the bucket is empty or changed.)
pub async fn bucket_state(js: &jetstream::Context, bucket: &str) -> Result<stream::State, String> {
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| e.to_string())?;
    let info = stream.info().await.map_err(|e| e.to_string())?;
    Ok(info.state.clone())
}
