//! Cancelling runs: a marker in the `krest-cancels` bucket (so a worker that receives the run
//! later skips it) and a broadcast on `krest.cancel.<app>` (so the worker running it cancels
//! its handler at once). Used by `krest runs cancel` and the REPLACE overlap policy.

use chrono::Utc;
use krest_schemas::names::cancel_subject;
use krest_schemas::CancelRequest;

use crate::infra::Infra;

/// Asks the workers of `app` to cancel every shard of `run_id`.
pub async fn cancel(
    infra: &Infra,
    client: &async_nats::Client,
    run_id: &str,
    app: &str,
    reason: &str,
) -> Result<(), String> {
    let req = CancelRequest {
        run_id: run_id.to_string(),
        reason: reason.to_string(),
        at: Utc::now(),
    };
    let body = bytes::Bytes::from(serde_json::to_vec(&req).map_err(|e| e.to_string())?);
    infra
        .cancels
        .put(run_id, body.clone())
        .await
        .map_err(|e| format!("cannot record the cancellation of {run_id}: {e}"))?;
    client
        .publish(cancel_subject(app), body)
        .await
        .map_err(|e| format!("cannot broadcast the cancellation of {run_id}: {e}"))?;
    tracing::info!(run = %run_id, reason, "cancellation requested");
    Ok(())
}
