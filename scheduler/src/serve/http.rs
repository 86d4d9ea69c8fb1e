//! The node's HTTP endpoint: `/healthz` (the process serves) and `/readyz` (connected to NATS,
//! database writable, job table loaded, recorder keeping up with the events stream), for load balancers and
//! orchestrators; `/metrics` (Prometheus text, [`crate::metrics`]); and, on the same address,
//! the HTTP API and web console ([`super::web`]).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use krest_schemas::web::{NodeHealth, RecorderHealth};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::web::WebState;

use crate::leader::lease::{Leadership, Role};
use crate::record::recorder::StatusRx;
use crate::record::store::Store;

/// What the probes look at.
#[derive(Clone)]
pub struct HttpState {
    /// This node's name.
    pub node: String,
    /// NATS connection.
    pub client: async_nats::Client,
    /// The node's database.
    pub store: Store,
    /// The node's role.
    pub leadership: Leadership,
    /// The recorder's progress.
    pub recorder: StatusRx,
    /// Recorder lag beyond which the node is not ready.
    pub max_lag: Duration,
    /// The node's job table.
    pub table: std::sync::Arc<crate::jobs::JobTable>,
    /// The worker registry.
    pub routing: std::sync::Arc<crate::leader::balance::Routing>,
}

async fn metrics(State(s): State<HttpState>) -> impl axum::response::IntoResponse {
    let leader_epoch = match s.leadership.role() {
        Role::Leader { epoch } => Some(epoch),
        Role::Standby => None,
    };
    let recorder = s.recorder.borrow().clone();
    let mut workers = std::collections::BTreeMap::<String, u64>::new();
    for w in s.routing.live_now().await.iter() {
        *workers.entry(w.app_name.clone()).or_default() += 1;
    }
    let body = crate::metrics::render(&crate::metrics::Snapshot {
        node: &s.node,
        leader_epoch,
        recorder: &recorder,
        jobs: s.table.len(),
        workers,
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn healthz(State(s): State<HttpState>) -> Json<Value> {
    Json(json!({"status": "ok", "node": s.node}))
}

/// This node's health: NATS connection, database writability (probed now, at most 2 s),
/// role, whether its job table is loaded (a node still loading neither leads nor is ready)
/// and the recorder's lag. The body of `/readyz` and part of `GET /api/v1/cluster`.
pub async fn health(s: &HttpState) -> NodeHealth {
    let nats = s.client.connection_state() == async_nats::connection::State::Connected;
    let db = match tokio::time::timeout(Duration::from_secs(2), s.store.probe_write()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2 s".to_string()),
    };
    let (role, epoch) = match s.leadership.role() {
        Role::Leader { epoch } => ("leader", Some(epoch)),
        Role::Standby => ("standby", None),
    };
    let rec = s.recorder.borrow().clone();
    let recorder_ok = rec.lag <= s.max_lag && (rec.failing.is_none() || rec.lag_events == 0);
    let jobs = s.table.load_progress();
    NodeHealth {
        ready: nats && db.is_ok() && jobs.loaded && recorder_ok,
        node: s.node.clone(),
        role: role.to_string(),
        epoch,
        nats: if nats { "connected" } else { "disconnected" }.to_string(),
        database: match db {
            Ok(()) => "writable".to_string(),
            Err(e) => e,
        },
        jobs: jobs.to_string(),
        recorder: RecorderHealth {
            ok: recorder_ok,
            recorded_seq: rec.recorded_seq,
            stream_seq: rec.stream_seq,
            lag_events: rec.lag_events,
            lag_seconds: rec.lag.as_secs_f64(),
            max_lag_seconds: s.max_lag.as_secs_f64(),
            catching_up: crate::record::recorder::catching_up(&s.node, &rec).is_some(),
            failing: rec.failing,
            parked: rec.parked,
            dropped: rec.dropped,
        },
    }
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, Json<NodeHealth>) {
    let body = health(&s).await;
    let code = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// Serves the probes, and the HTTP API and console when `web` is given, until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    web: Option<WebState>,
    stop: CancellationToken,
) {
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    if let Some(web) = web {
        app = app.merge(super::web::router(web));
    }
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "HTTP endpoint failed");
    }
}
