//! The leader's router: moves runs addressed to one worker instance when that instance cannot
//! take them any more, so no run is stranded.
//!
//! - **Retries** of instance-addressed runs come here (`krest.work.<app>.r`) from the worker
//!   that failed them, with the instant they are due and the instance to avoid. The router holds
//!   each until due (a nak with that delay) and re-addresses it by the job's strategy, preferring
//!   another instance.
//! - **Departed instances**: when an instance's heartbeat is gone, its consumer still holds the
//!   runs addressed to it. The router drains that consumer — runs waiting, and runs the instance
//!   held when it died once their ack wait passes — into the retry path (the attempt it lost
//!   counts), then deletes the consumer. A BROADCAST shard cannot move (its instance *was* the
//!   point): it is recorded FAILED.
//!
//! Only the leader routes; the router's consumer is durable, so a new leader continues.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, message::PublishMessage, AckKind};
use chrono::Utc;
use futures_util::StreamExt;
use krest_schemas::names::{
    work_instance_subject, work_msg_id, work_queue_subject, work_router_subject, ROUTER_CONSUMER,
    WORK_ROUTER_FILTER, WORK_STREAM,
};
use krest_schemas::{JobType, RunMessage};
use tokio_util::sync::CancellationToken;

use crate::leader::balance::Routing;
use crate::leader::lease::Leadership;

/// How often departed instances are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Runs until `stop`, routing while this node leads.
pub async fn run(
    js: jetstream::Context,
    routing: Arc<Routing>,
    leadership: Leadership,
    stop: CancellationToken,
) {
    let mut role = leadership.watch();
    loop {
        if leadership.valid_epoch().is_none() {
            tokio::select! {
                r = role.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
            continue;
        }
        if let Err(e) = lead(&js, &routing, &leadership, &stop).await {
            tracing::warn!(error = %e, "router interrupted; restarting");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
        }
        if stop.is_cancelled() {
            return;
        }
    }
}

async fn lead(
    js: &jetstream::Context,
    routing: &Routing,
    leadership: &Leadership,
    stop: &CancellationToken,
) -> Result<(), String> {
    let stream = js
        .get_stream(WORK_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let router = stream
        .get_or_create_consumer(
            ROUTER_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(ROUTER_CONSUMER.to_string()),
                description: Some("Krest router: retries and runs of departed instances".into()),
                filter_subject: WORK_ROUTER_FILTER.to_string(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("cannot create the router's consumer: {e}"))?;
    let mut last_sweep = tokio::time::Instant::now() - SWEEP_EVERY;
    while leadership.valid_epoch().is_some() && !stop.is_cancelled() {
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = tokio::time::Instant::now();
            if let Err(e) = sweep(js, &stream, routing).await {
                tracing::warn!(error = %e, "looking for departed instances failed");
            }
        }
        let mut batch = router
            .fetch()
            .max_messages(200)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| e.to_string())?;
            if leadership.valid_epoch().is_none() {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            }
            route(js, routing, msg).await;
        }
    }
    Ok(())
}

/// Re-addresses one message from the router subject.
async fn route(js: &jetstream::Context, routing: &Routing, msg: jetstream::Message) {
    let mut run: RunMessage = match serde_json::from_slice(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            let _ = crate::deadletter::park(
                js,
                "work",
                &format!(
                    "router/{}",
                    msg.info().map(|i| i.stream_sequence).unwrap_or_default()
                ),
                &format!("malformed run message for the router: {e}"),
                &msg.subject,
                msg.payload.clone(),
            )
            .await;
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    if let Some(due) = run.retry_at {
        let wait = (due - Utc::now()).to_std().unwrap_or_default();
        if wait > Duration::from_millis(20) {
            let _ = msg
                .ack_with(AckKind::Nak(Some(wait.min(Duration::from_secs(3600)))))
                .await;
            return;
        }
    }
    let job = krest_schemas::names::job_key(&run.job_group, &run.job_name);
    let hash_input = run
        .shard
        .as_ref()
        .map_or_else(|| run.args.to_string(), |s| s.item.to_string());
    let target = routing
        .pick(
            run.load_balance,
            &job,
            &run.app_name,
            &run.path,
            &hash_input,
            &run.avoid,
        )
        .await;
    let subject = match &target {
        Some(instance) => work_instance_subject(&run.app_name, instance),
        None => work_queue_subject(&run.app_name),
    };
    let next_attempt = run.attempt_offset + 1;
    run.target = target;
    run.retry_at = None;
    run.avoid.clear();
    let id = format!(
        "{}/a{next_attempt}",
        work_msg_id(&run.run_id, run.shard_index())
    );
    let published = match serde_json::to_vec(&run) {
        Ok(body) => match js
            .send_publish(
                subject,
                PublishMessage::build().payload(body.into()).message_id(id),
            )
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    match published {
        Ok(()) => {
            tracing::debug!(run = %run.run_id, shard = run.shard_index(), target = ?run.target, "re-routed");
            let _ = msg.double_ack().await;
        }
        Err(e) => {
            tracing::warn!(run = %run.run_id, error = %e, "re-routing failed; will retry");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

/// Finds consumers of instances that have no heartbeat any more and drains them.
async fn sweep(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    routing: &Routing,
) -> Result<(), String> {
    // Departure decides about moving runs: look at the registry as it is now.
    let live = routing.live_now().await;
    let mut infos = stream.consumers();
    let mut departed = Vec::new();
    while let Some(info) = infos.next().await {
        let info = info.map_err(|e| e.to_string())?;
        // Instance consumers filter `krest.work.<app>.i.<instance>`.
        let tokens: Vec<&str> = info.config.filter_subject.split('.').collect();
        if let ["krest", "work", app, "i", instance] = tokens[..] {
            if !live
                .iter()
                .any(|w| w.app_name == app && w.instance == instance)
            {
                departed.push((info.name.clone(), app.to_string(), instance.to_string()));
            }
        }
    }
    for (name, app, instance) in departed {
        drain(js, stream, &name, &app, &instance).await?;
    }
    Ok(())
}

async fn drain(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    name: &str,
    app: &str,
    instance: &str,
) -> Result<(), String> {
    let consumer: consumer::PullConsumer =
        stream.get_consumer(name).await.map_err(|e| e.to_string())?;
    let mut batch = consumer
        .fetch()
        .max_messages(500)
        .expires(Duration::from_millis(300))
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    let mut moved = 0;
    while let Some(msg) = batch.next().await {
        let msg = msg.map_err(|e| e.to_string())?;
        let info = msg.info().map_err(|e| e.to_string())?;
        let (seq, delivered) = (
            info.stream_sequence,
            u32::try_from(info.delivered).unwrap_or(1),
        );
        let Ok(mut run) = serde_json::from_slice::<RunMessage>(&msg.payload) else {
            let _ = crate::deadletter::park(
                js,
                "work",
                &format!("work/{seq}"),
                "malformed run message",
                &msg.subject,
                msg.payload.clone(),
            )
            .await;
            let _ = msg.double_ack_with(AckKind::Term).await;
            continue;
        };
        // Deliveries before this one were attempts on the departed instance.
        let lost = delivered.saturating_sub(1);
        if run.job_type == JobType::Broadcast {
            let attempt = run.attempt_offset + lost.max(1);
            let error = format!("instance {instance} left before finishing its BROADCAST shard");
            crate::deadletter::record_failure(js, &run, attempt, instance, &error).await?;
        } else {
            run.attempt_offset += lost;
            run.target = None;
            run.retry_at = None;
            run.avoid = vec![instance.to_string()];
            let body = serde_json::to_vec(&run).map_err(|e| e.to_string())?;
            js.send_publish(
                work_router_subject(app),
                PublishMessage::build()
                    .payload(body.into())
                    .message_id(format!(
                        "{}/from-{instance}-{seq}",
                        work_msg_id(&run.run_id, run.shard_index())
                    )),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        }
        let _ = msg.double_ack().await;
        moved += 1;
    }
    if moved > 0 {
        tracing::warn!(
            app,
            instance,
            moved,
            "moved the runs of a departed instance"
        );
    }
    let mut consumer = consumer;
    let info = consumer.info().await.map_err(|e| e.to_string())?;
    if info.num_pending == 0 && info.num_ack_pending == 0 {
        stream
            .delete_consumer(name)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(app, instance, "removed the consumer of a departed instance");
    }
    Ok(())
}
