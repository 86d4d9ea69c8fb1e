//! The node's HTTP endpoint: `/healthz` (the process serves) and `/readyz` (connected to NATS,
//! database writable, recorder keeping up with the events stream), for load balancers and
//! orchestrators.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

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
}

async fn healthz(State(s): State<HttpState>) -> Json<Value> {
    Json(json!({"status": "ok", "node": s.node}))
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, Json<Value>) {
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
    let ready = nats && db.is_ok() && recorder_ok;
    let body = json!({
        "ready": ready,
        "node": s.node,
        "role": role,
        "epoch": epoch,
        "nats": if nats { "connected" } else { "disconnected" },
        "database": match &db { Ok(()) => "writable".to_string(), Err(e) => e.clone() },
        "recorder": {
            "ok": recorder_ok,
            "recordedSeq": rec.recorded_seq,
            "streamSeq": rec.stream_seq,
            "lagEvents": rec.lag_events,
            "lagSeconds": rec.lag.as_secs_f64(),
            "maxLagSeconds": s.max_lag.as_secs_f64(),
            "failing": rec.failing,
            "catchingUp": crate::record::recorder::catching_up(&s.node, &rec).is_some(),
            "parked": rec.parked,
            "dropped": rec.dropped,
        },
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// Serves until `stop`.
pub async fn serve(listener: tokio::net::TcpListener, state: HttpState, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "HTTP endpoint failed");
    }
}
