//! The leader's router: moves runs addressed to one worker instance when that instance cannot
//! take them any more, so no run is stranded.
//!
//! - **Retries** of instance-addressed runs come here (`krest.work.<app>.<group>.<name>.r`) from the worker
//!   that failed them, with the instant they are due and the instance to avoid. The router holds
//!   each until due (a nak with that delay) and re-addresses it by the job's strategy, preferring
//!   another instance.
//! - **Departed instances** are decided from the heartbeat registry, not from consumers: every
//!   sweep looks at each instance that has a consumer *or* runs waiting on its subject. One with
//!   no heartbeat has departed, unless its own consumer is younger than
//!   [`RouterConfig::consumer_grace`] (it is starting: the SDKs create the consumer before their
//!   first heartbeat); one that heartbeats but has had no consumer of its own for
//!   [`RouterConfig::consumer_grace`] (the SDK creates its consumer before its first heartbeat,
//!   so this is a forged or broken heartbeat) is unreachable: no run is addressed to it, and
//!   what waits for it moves. Moving drains the instance's consumer (created by the router when
//!   there is none) — runs waiting, and runs the instance held when it died once their ack wait
//!   passes — into the retry path (the attempt it lost counts), then deletes the consumer. A
//!   BROADCAST shard cannot move (its instance *was* the point): it is recorded FAILED.
//!
//! So no run addressed to a vanished instance waits longer than the heartbeat TTL plus one
//! sweep. Only the leader routes; the router's consumer is durable, so a new leader continues.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, message::PublishMessage, AckKind};
use chrono::Utc;
use futures_util::StreamExt;
use krest_schemas::deadletter::Origin;
use krest_schemas::names::{
    instance_consumer, moved_msg_id, parked_work_id, parse_work_subject, rerouted_msg_id,
    work_instance_filter, work_instance_subject, work_queue_subject, work_router_subject,
    Destination, WorkSubject, ROUTER_CONSUMER, WORK_INSTANCE_SUBJECTS, WORK_ROUTER_FILTER,
    WORK_STREAM,
};
use krest_schemas::{JobType, RunMessage};
use tokio_util::sync::CancellationToken;

use crate::error::{error_kinds, Error};
use crate::leader::balance::{Balancer, Routing};
use crate::leader::lease::Leadership;

error_kinds! {
    /// What failed while routing.
    pub enum RouterErrorKind {
        /// Reading the work stream (its info, consumers or subjects).
        WorkStream => "cannot read the work stream",
        /// Creating, reading or removing a consumer, or pulling from one.
        Consumer => "consumer failed",
        /// A consumer under the router's name had another filter; it was replaced.
        ForeignConsumer => "replaced a router consumer with another filter",
        /// Reading the worker registry.
        Registry => "cannot read the worker registry",
        /// Publishing a re-routed or moved run.
        Publish => "cannot publish a run",
        /// Recording a departed instance's BROADCAST shard as failed.
        RecordFailure => "cannot record a lost BROADCAST shard",
    }
}

/// Failure while routing.
pub type RouterError = Error<RouterErrorKind>;

fn err<E: Into<crate::error::BoxError>>(kind: RouterErrorKind) -> impl FnOnce(E) -> RouterError {
    move |e| Error::with_source(kind, e)
}

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// How often departed and unreachable instances are looked for.
    pub sweep_every: Duration,
    /// How long an instance may heartbeat without a consumer of its own (counted from when
    /// this leader first saw it) before it is unreachable.
    pub consumer_grace: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            sweep_every: Duration::from_secs(2),
            consumer_grace: Duration::from_secs(5),
        }
    }
}

/// Description of instance consumers the router creates to move runs (not the instance's own).
const MOVER_DESCRIPTION: &str = "Krest router: moving runs of a departed instance";

/// Routes while this node leads in `epoch` (restarting after errors), until the epoch ends or
/// `stop`. Part of the leadership state: the leader spawns it at takeover and drops it when
/// leadership ends; `balancer` is the leader's. From `infra`: the JetStream context and the
/// key hand-offs' delivery tokens are checked with.
pub async fn run(
    infra: crate::infra::Infra,
    routing: Arc<Routing>,
    leadership: Leadership,
    epoch: u64,
    cfg: RouterConfig,
    balancer: Arc<tokio::sync::Mutex<Balancer>>,
    stop: CancellationToken,
) {
    let (js, key) = (infra.js, infra.delivery);
    let leading = || leadership.valid_epoch() == Some(epoch) && !stop.is_cancelled();
    let mut sweeper = Sweeper::default();
    let mut failures = 0u32;
    while leading() {
        let ctx = Ctx {
            js: &js,
            routing: &routing,
            leading: &leading,
            cfg: &cfg,
            balancer: &balancer,
            key: &key,
        };
        if let Err(e) = lead(ctx, &mut sweeper).await {
            failures += 1;
            tracing::warn!(epoch, error = %e, "router interrupted; restarting");
            if !crate::retry::pause(&stop, krest_schemas::Backoff::RECONNECT, failures).await {
                return;
            }
        } else {
            failures = 0;
        }
    }
}

/// What one router leadership works with.
struct Ctx<'a> {
    js: &'a jetstream::Context,
    routing: &'a Routing,
    leading: &'a (dyn Fn() -> bool + Sync),
    cfg: &'a RouterConfig,
    balancer: &'a tokio::sync::Mutex<Balancer>,
    /// Checks the delivery tokens of hand-offs.
    key: &'a crate::delivery::DeliveryKey,
}

async fn lead(cx: Ctx<'_>, sweeper: &mut Sweeper) -> Result<(), RouterError> {
    let Ctx {
        js,
        routing,
        leading,
        cfg,
        balancer,
        key,
    } = cx;
    let stream = js
        .get_stream(WORK_STREAM)
        .await
        .map_err(err(RouterErrorKind::WorkStream))?;
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
        .map_err(err(RouterErrorKind::Consumer))?;
    if router.cached_info().config.filter_subject != WORK_ROUTER_FILTER {
        // Left by another protocol version: it would never see a retry.
        stream
            .delete_consumer(ROUTER_CONSUMER)
            .await
            .map_err(err(RouterErrorKind::Consumer))?;
        return Err(Error::new(RouterErrorKind::ForeignConsumer));
    }
    let mut last_sweep = tokio::time::Instant::now() - cfg.sweep_every;
    while leading() {
        if last_sweep.elapsed() >= cfg.sweep_every {
            last_sweep = tokio::time::Instant::now();
            if let Err(e) = sweeper.sweep(js, &stream, routing, cfg).await {
                tracing::warn!(error = %e, "looking for departed instances failed");
            }
        }
        let mut batch = router
            .fetch()
            .max_messages(200)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .map_err(err(RouterErrorKind::Consumer))?;
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(err(RouterErrorKind::Consumer))?;
            if !leading() {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            }
            route(js, routing, balancer, key, msg).await;
        }
    }
    Ok(())
}

/// Re-addresses one message from the router subject.
async fn route(
    js: &jetstream::Context,
    routing: &Routing,
    balancer: &tokio::sync::Mutex<Balancer>,
    key: &crate::delivery::DeliveryKey,
    msg: jetstream::Message,
) {
    let mut run: RunMessage = match serde_json::from_slice(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
            let reason = format!("malformed run message for the router: {e}");
            park_or_retry(js, msg, seq, reason).await;
            return;
        }
    };
    // A hand-off comes from a worker that received the run: on its run's subject (the app in
    // the subject is what the server's permissions check) and with its delivery token.
    let on_own_subject = parse_work_subject(&msg.subject).is_some_and(|s| {
        s.app == run.run.app_name && s.group == run.run.job_group && s.name == run.run.job_name
    });
    if !on_own_subject || !key.verify(&run.run.run_id, run.shard_index(), &run.delivery_token) {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
        let reason = format!(
            "hand-off of run {} shard {} refused: {}",
            krest_schemas::text::echo(&run.run.run_id),
            run.shard_index(),
            if on_own_subject {
                "without the run's delivery token (forged, or from a worker that does not copy deliveryToken)"
            } else {
                "not on its run's work subject"
            }
        );
        tracing::warn!(seq, %reason, "parking a refused hand-off");
        park_or_retry(js, msg, seq, reason).await;
        return;
    }
    if let Some(due) = run.retry_at {
        let wait = (due - Utc::now()).to_std().unwrap_or_default();
        if wait > Duration::from_millis(20) {
            let _ = msg
                .ack_with(AckKind::Nak(Some(wait.min(Duration::from_secs(3600)))))
                .await;
            return;
        }
    }
    let target = {
        let mut balancer = balancer.lock().await;
        routing.pick(&mut balancer, &run).await
    };
    let subject = match &target {
        Some(instance) => work_instance_subject(
            &run.run.app_name,
            &run.run.job_group,
            &run.run.job_name,
            instance,
        ),
        None => work_queue_subject(&run.run.app_name, &run.run.job_group, &run.run.job_name),
    };
    let next_attempt = run.attempt_offset + 1;
    run.target = target;
    run.retry_at = None;
    run.avoid.clear();
    let id = rerouted_msg_id(&run.run.run_id, run.shard_index(), next_attempt);
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
            tracing::debug!(run = %run.run.run_id, shard = run.shard_index(), target = ?run.target, "re-routed");
            let _ = msg.double_ack().await;
        }
        Err(e) => {
            tracing::warn!(run = %run.run.run_id, error = %e, "re-routing failed; will retry");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

/// Parks a message the router cannot read and terminates it; if parking fails, leaves it for
/// the next attempt (redelivered after a short delay) with a log line, never dropping it
/// unparked.
async fn park_or_retry(js: &jetstream::Context, msg: jetstream::Message, seq: u64, reason: String) {
    let parked = crate::deadletter::park(
        js,
        "work",
        &parked_work_id(seq),
        &reason,
        Origin {
            subject: &msg.subject,
            seq: Some(seq),
        },
        msg.payload.clone(),
    )
    .await;
    match parked {
        Ok(()) => {
            let _ = msg.double_ack_with(AckKind::Term).await;
        }
        Err(e) => {
            tracing::warn!(seq, error = %e, "could not park an unreadable run message; retrying later");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
        }
    }
}

/// Leader-local memory of the sweeps: when each instance was first seen heartbeating.
#[derive(Default)]
struct Sweeper {
    first_seen: std::collections::HashMap<(String, String), tokio::time::Instant>,
}

impl Sweeper {
    /// Moves the runs of departed and unreachable instances; marks the unreachable ones so no
    /// run is addressed to them.
    async fn sweep(
        &mut self,
        js: &jetstream::Context,
        stream: &jetstream::stream::Stream,
        routing: &Routing,
        cfg: &RouterConfig,
    ) -> Result<(), RouterError> {
        // Departure decides about moving runs: the registry as it is now, or no decision.
        let live = routing
            .read_now()
            .await
            .map_err(err(RouterErrorKind::Registry))?;
        let now = tokio::time::Instant::now();
        self.first_seen.retain(|k, _| {
            live.iter()
                .any(|w| (&w.app_name, &w.instance) == (&k.0, &k.1))
        });
        for w in live.iter() {
            self.first_seen
                .entry((w.app_name.clone(), w.instance.clone()))
                .or_insert(now);
        }
        // Instance consumers: (app, instance) → (name, the instance's own?). An instance's
        // own consumer younger than the grace belongs to an instance starting up (the SDKs
        // create it before their first heartbeat, which this sweep's registry read may have
        // missed): such an instance has not departed, and its consumer is left alone.
        let mut consumers = std::collections::HashMap::new();
        let mut starting = std::collections::HashSet::new();
        let wall = Utc::now();
        let mut infos = stream.consumers();
        while let Some(info) = infos.next().await {
            let info = info.map_err(err(RouterErrorKind::WorkStream))?;
            if let Some(key) = instance_of(&info.config.filter_subject) {
                let own = info.config.description.as_deref() != Some(MOVER_DESCRIPTION);
                if own && younger_than(info.created, wall, cfg.consumer_grace) {
                    starting.insert(key.clone());
                }
                consumers.insert(key, (info.name.clone(), own));
            }
        }
        // Instance subjects with runs waiting.
        let mut waiting = std::collections::HashSet::new();
        let mut subjects = stream
            .info_with_subjects(WORK_INSTANCE_SUBJECTS)
            .await
            .map_err(err(RouterErrorKind::WorkStream))?;
        while let Some(s) = subjects.next().await {
            let (subject, _) = s.map_err(err(RouterErrorKind::WorkStream))?;
            if let Some(key) = instance_of(&subject) {
                waiting.insert(key);
            }
        }
        let mut unreachable = std::collections::HashSet::new();
        for w in live.iter() {
            let key = (w.app_name.clone(), w.instance.clone());
            let own = consumers.get(&key).is_some_and(|(_, own)| *own);
            let seen = self.first_seen.get(&key).copied().unwrap_or(now);
            if !own && now.duration_since(seen) >= cfg.consumer_grace {
                unreachable.insert(key);
            }
        }
        let mut keys: Vec<(String, String)> = consumers.keys().cloned().collect();
        keys.extend(waiting.into_iter().filter(|k| !consumers.contains_key(k)));
        keys.sort();
        keys.dedup();
        for key in &keys {
            let heartbeating = live
                .iter()
                .any(|w| (&w.app_name, &w.instance) == (&key.0, &key.1));
            if (heartbeating && !unreachable.contains(key))
                || (!heartbeating && starting.contains(key))
            {
                continue;
            }
            let (app, instance) = key;
            let name = match consumers.get(key) {
                Some((name, _)) => name.clone(),
                None => mover(stream, app, instance).await?,
            };
            if heartbeating {
                tracing::warn!(app, instance, "an instance heartbeats without a consumer of its own; moving its runs and addressing none to it");
            }
            drain(js, stream, &name, app, instance).await?;
        }
        routing.set_unreachable(unreachable);
        Ok(())
    }
}

/// Whether a consumer created at `created` (the server's clock) is younger than `grace` at
/// `now` (this node's clock). A consumer dated in the future counts as young.
fn younger_than(
    created: time::OffsetDateTime,
    now: chrono::DateTime<Utc>,
    grace: Duration,
) -> bool {
    let created = created.unix_timestamp_nanos();
    let now = i128::from(now.timestamp_nanos_opt().unwrap_or(i64::MAX));
    now - created < i128::try_from(grace.as_nanos()).unwrap_or(i128::MAX)
}

/// `(app, instance)` of an instance work subject or an instance consumer's filter
/// (`krest.work.<app>.<group>.<name>.i.<instance>`, where group and name may be `*`).
fn instance_of(subject: &str) -> Option<(String, String)> {
    match parse_work_subject(subject)? {
        WorkSubject {
            app,
            destination: Destination::Instance(instance),
            ..
        } => Some((app, instance)),
        _ => None,
    }
}

/// Creates a consumer on an instance's subject that has none, to move what waits there.
async fn mover(
    stream: &jetstream::stream::Stream,
    app: &str,
    instance: &str,
) -> Result<String, RouterError> {
    let name = instance_consumer(app, instance);
    stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                description: Some(MOVER_DESCRIPTION.to_string()),
                filter_subject: work_instance_filter(app, instance),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::All,
                ack_wait: Duration::from_secs(30),
                inactive_threshold: Duration::from_secs(3600),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            Error::with_source(
                RouterErrorKind::Consumer,
                format!("creating a consumer to move the runs of {app}/{instance}: {e}"),
            )
        })?;
    Ok(name)
}

async fn drain(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    name: &str,
    app: &str,
    instance: &str,
) -> Result<(), RouterError> {
    let mut consumer: consumer::PullConsumer = stream
        .get_consumer(name)
        .await
        .map_err(err(RouterErrorKind::Consumer))?;
    // Nothing to move (the common case: an instance that stopped cleanly): removed at once,
    // without a fetch that would wait out its expiry — sweeps look at departed instances one
    // after the other, and the router routes nothing while it sweeps.
    let info = consumer.cached_info();
    if info.num_pending == 0 && info.num_ack_pending == 0 {
        return remove(stream, name, app, instance).await;
    }
    let mut batch = consumer
        .fetch()
        .max_messages(500)
        .expires(Duration::from_millis(300))
        .messages()
        .await
        .map_err(err(RouterErrorKind::Consumer))?;
    let mut moved = 0;
    while let Some(msg) = batch.next().await {
        let msg = msg.map_err(err(RouterErrorKind::Consumer))?;
        let info = msg.info().map_err(err(RouterErrorKind::Consumer))?;
        let (seq, delivered) = (
            info.stream_sequence,
            u32::try_from(info.delivered).unwrap_or(1),
        );
        let Ok(mut run) = serde_json::from_slice::<RunMessage>(&msg.payload) else {
            park_or_retry(js, msg, seq, "malformed run message".into()).await;
            continue;
        };
        // Deliveries before this one were attempts on the departed instance.
        let lost = delivered.saturating_sub(1);
        if run.job_type == JobType::Broadcast {
            let attempt = run.attempt_offset + lost.max(1);
            let error = format!("instance {instance} left before finishing its BROADCAST shard");
            crate::deadletter::record_failure(js, &run, attempt, instance, &error)
                .await
                .map_err(err(RouterErrorKind::RecordFailure))?;
        } else {
            run.attempt_offset += lost;
            run.target = None;
            run.retry_at = None;
            run.avoid = vec![instance.to_string()];
            let body = serde_json::to_vec(&run).map_err(err(RouterErrorKind::Publish))?;
            js.send_publish(
                work_router_subject(app, &run.run.job_group, &run.run.job_name),
                PublishMessage::build()
                    .payload(body.into())
                    .message_id(moved_msg_id(
                        &run.run.run_id,
                        run.shard_index(),
                        instance,
                        seq,
                    )),
            )
            .await
            .map_err(err(RouterErrorKind::Publish))?
            .await
            .map_err(err(RouterErrorKind::Publish))?;
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
    let info = consumer
        .info()
        .await
        .map_err(err(RouterErrorKind::Consumer))?;
    if info.num_pending == 0 && info.num_ack_pending == 0 {
        remove(stream, name, app, instance).await?;
    }
    Ok(())
}

/// Deletes a departed instance's consumer (runs arriving on its subject later are found by a
/// later sweep and moved through a consumer the router creates).
async fn remove(
    stream: &jetstream::stream::Stream,
    name: &str,
    app: &str,
    instance: &str,
) -> Result<(), RouterError> {
    stream
        .delete_consumer(name)
        .await
        .map_err(err(RouterErrorKind::Consumer))?;
    tracing::info!(app, instance, "removed the consumer of a departed instance");
    Ok(())
}
