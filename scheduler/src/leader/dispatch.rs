//! Turning fires into messages: one work message per shard plus a `dispatched` event, each with
//! a `Nats-Msg-Id` derived from the run id, published pipelined (all sent, then all acks
//! awaited). A second publish of the same fire inside the stream's duplicate window is dropped
//! by JetStream, which is what makes a failover safe.

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use krest_schemas::names::{
    self, kv_subject, work_instance_subject, work_msg_id, work_queue_subject,
    SCHEDULER_TOKEN_HEADER, STATE_BUCKET, STATE_WATERMARK_KEY,
};
use krest_schemas::trace::{dispatch_traceparent, TRACEPARENT};
use krest_schemas::{
    Dispatched, FireWatermark, JobState, RunEvent, RunMessage, ShardInfo, Skipped, Trigger,
};
use serde_json::Value;
use std::sync::Arc;

use crate::jobs::JobEntry;

/// Most publishes awaiting their ack at once (a pipelining window; see FACTS.md: ~15× the
/// throughput of awaiting each ack).
const MAX_INFLIGHT: usize = 1024;

/// Id of the run of `group.name` scheduled at `at` (see [`krest_schemas::names`]).
pub fn scheduled_run_id(group: &str, name: &str, at: DateTime<Utc>) -> String {
    names::scheduled_run_id(group, name, at.timestamp_millis())
}

/// Id of a manually triggered run: unique.
pub fn manual_run_id(group: &str, name: &str, at: DateTime<Utc>) -> String {
    names::manual_run_id(group, name, &names::new_request_id(at))
}

/// One run to publish.
#[derive(Debug, Clone)]
pub struct Fire {
    /// The run id.
    pub run_id: String,
    /// The job as it was when the run was made.
    pub job: Arc<JobEntry>,
    /// The fire time it belongs to (now, for manual runs).
    pub scheduled_at: DateTime<Utc>,
    /// Why it exists.
    pub trigger: Trigger,
    /// Misfired fire times it stands for.
    pub misfired: u32,
    /// Arguments (the job's, or a manual override, normalized).
    pub args: Value,
    /// Set when the fire is recorded as SKIPPED instead of run: why.
    pub skip: Option<String>,
    /// For CHILD runs: the parent run.
    pub parent_run_id: Option<String>,
    /// Fencing epoch of the leader publishing it; `None` for runs dispatched without leading
    /// (manual and child runs).
    pub epoch: Option<u64>,
    /// The shards with their targets, once routed ([`crate::leader::balance::Routing::assign`]);
    /// `None`: the job's shards, all to the app's shared queue.
    pub shards: Option<Vec<ShardPlan>>,
    /// Set when the fire is dispatched ahead of its time: the worker starts it at this instant
    /// (its `scheduled_at`).
    pub not_before: Option<DateTime<Utc>>,
}

/// One shard of a fire: its item (SHARDING, BROADCAST) and the instance it goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardPlan {
    /// The shard's item.
    pub item: Option<Value>,
    /// The worker instance it is addressed to; `None`: the app's shared queue.
    pub target: Option<String>,
}

impl Fire {
    /// A fire of the job's schedule.
    pub fn scheduled(
        job: Arc<JobEntry>,
        at: DateTime<Utc>,
        trigger: Trigger,
        misfired: u32,
    ) -> Fire {
        let spec = &job.stored.spec;
        Fire {
            run_id: scheduled_run_id(&spec.job_group, &spec.job_name, at),
            args: spec.args.to_value(),
            scheduled_at: at,
            trigger,
            misfired,
            skip: None,
            parent_run_id: None,
            shards: None,
            epoch: None,
            not_before: None,
            job,
        }
    }

    /// The job's `group.name`.
    pub fn key(&self) -> String {
        self.job.stored.spec.key()
    }

    /// The shards of this run: as routed, or the job's shards (see
    /// [`krest_schemas::JobSpec::shard_items`]) for the app's queue.
    pub fn shard_plans(&self) -> Vec<ShardPlan> {
        self.shards.clone().unwrap_or_else(|| {
            self.job
                .stored
                .spec
                .shard_items(&self.args)
                .into_iter()
                .map(|item| ShardPlan { item, target: None })
                .collect()
        })
    }
}

/// A fire's work message serialized once, with its per-shard fields left open: `head` (every
/// field before `shard`), then the shard field if any, then `middle` (every field after it up
/// to the value of `deliveryToken`, the last field), the token and `"}`. A message made from it
/// is byte for byte what `serde_json` makes of the same [`RunMessage`] with that shard and
/// token (checked when it is built: `None` if the layout is not the expected one; messages are
/// then serialized whole), for messages without a `target`.
#[derive(Debug)]
struct Splice {
    head: Vec<u8>,
    middle: Vec<u8>,
}

/// Length of a delivery token ([`crate::delivery::DeliveryKey::token`]: 128 bits in hex).
const TOKEN_LEN: usize = 32;

impl Splice {
    /// The splice of `template`'s fields (its shard, target and token are ignored), for shards
    /// of a run of `total`.
    fn of(template: &RunMessage, total: u32) -> Option<Splice> {
        let mut msg = template.clone();
        msg.target = None;
        msg.shard = None;
        msg.delivery_token = "0".repeat(TOKEN_LEN);
        let plain = serde_json::to_vec(&msg).ok()?;
        let tail = format!("\"deliveryToken\":\"{}\"}}", msg.delivery_token);
        let body = plain.strip_suffix(tail.as_bytes())?;
        // Where the shard field goes: serialize with one and find it.
        let probe = ShardInfo {
            index: 0,
            total,
            item: Value::Null,
        };
        msg.shard = Some(probe.clone());
        let shaped = serde_json::to_vec(&msg).ok()?;
        let mut field = b"\"shard\":".to_vec();
        serde_json::to_writer(&mut field, &probe).ok()?;
        field.push(b',');
        if shaped.len() != plain.len() + field.len() {
            return None;
        }
        let common = plain
            .iter()
            .zip(&shaped)
            .take_while(|(a, b)| a == b)
            .count();
        let at = (common.saturating_sub(16)..=common).rev().find(|&at| {
            shaped[..at] == plain[..at]
                && shaped[at..].starts_with(&field)
                && shaped[at + field.len()..] == plain[at..]
        })?;
        if at > body.len() {
            return None;
        }
        let mut middle = body[at..].to_vec();
        middle.extend_from_slice(b"\"deliveryToken\":\"");
        Some(Splice {
            head: body[..at].to_vec(),
            middle,
        })
    }

    /// The JSON of the message with `shard` and `token` (`None` if the token is not plain
    /// hex of the expected length or the shard cannot be serialized), in a buffer of at least
    /// `size` bytes.
    fn payload(&self, shard: Option<&ShardInfo>, token: &str, size: usize) -> Option<Vec<u8>> {
        if token.len() != TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(&self.head);
        if let Some(shard) = shard {
            out.extend_from_slice(b"\"shard\":");
            serde_json::to_writer(&mut out, shard).ok()?;
            out.push(b',');
        }
        out.extend_from_slice(&self.middle);
        out.extend_from_slice(token.as_bytes());
        out.extend_from_slice(b"\"}");
        Some(out)
    }
}

/// Publishes runs and job state.
#[derive(Clone, Debug)]
pub struct Publisher {
    js: jetstream::Context,
    node: String,
    /// Makes each work message's delivery token.
    key: crate::delivery::DeliveryKey,
}

/// What went wrong publishing one fire.
#[derive(Debug, Clone, thiserror::Error)]
#[error("publishing run {run_id} failed: {message}")]
pub struct PublishError {
    /// The run.
    pub run_id: String,
    /// The reason.
    pub message: String,
}

/// Counts published fires in the node's metrics: by trigger, with the due → stored lateness of
/// scheduled and catch-up fires; failed ones as dispatch errors.
fn count(fires: &[Fire], results: &[Result<(), PublishError>]) {
    let m = &crate::metrics::METRICS;
    let now = Utc::now();
    for (fire, result) in fires.iter().zip(results) {
        if result.is_err() {
            m.dispatch_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        if fire.skip.is_some() {
            continue;
        }
        m.fires.add(fire.trigger.as_str(), 1);
        if matches!(fire.trigger, Trigger::Schedule | Trigger::CatchUp) {
            m.dispatch_lateness
                .observe_ms((now - fire.scheduled_at).num_milliseconds());
        }
    }
}

/// A waiting ack: the fire it belongs to, and whether the message was stored.
type Acked =
    std::pin::Pin<Box<dyn std::future::Future<Output = (usize, Result<(), String>)> + Send>>;

/// One pipelined publish of a list of fires: what each fire's messages came to.
struct Round<'a> {
    js: &'a jetstream::Context,
    fires: &'a [Fire],
    results: Vec<Result<(), PublishError>>,
    inflight: FuturesUnordered<Acked>,
}

impl Round<'_> {
    fn fail(&mut self, i: usize, message: String) {
        if self.results[i].is_ok() {
            self.results[i] = Err(PublishError {
                run_id: self.fires[i].run_id.clone(),
                message,
            });
        }
    }

    /// Sends one message of fire `i`, keeping at most [`MAX_INFLIGHT`] acks waiting (the
    /// context holds a permit per waiting ack, and acks must be consumed for permits to come
    /// back). A fire with a failed message is published again whole: the rest of it is skipped.
    async fn send(&mut self, i: usize, (subject, message): (String, PublishMessage)) {
        if self.inflight.len() >= MAX_INFLIGHT {
            if let Some((j, Err(e))) = self.inflight.next().await {
                self.fail(j, e);
            }
            // Take every other ack already in as well, so the next sends go out together
            // instead of one send per wake-up (fewer task switches per message).
            while let Some(Some((j, r))) = self.inflight.next().now_or_never() {
                if let Err(e) = r {
                    self.fail(j, e);
                }
            }
        }
        if self.results[i].is_err() {
            return;
        }
        match self.js.send_publish(subject, message).await {
            Ok(ack) => self.inflight.push(Box::pin(async move {
                (i, ack.await.map(|_| ()).map_err(|e| e.to_string()))
            })),
            Err(e) => self.fail(i, e.to_string()),
        }
    }

    /// Awaits every ack; the result of each fire.
    async fn finish(mut self) -> Vec<Result<(), PublishError>> {
        while let Some((j, r)) = self.inflight.next().await {
            if let Err(e) = r {
                self.fail(j, e);
            }
        }
        self.results
    }
}

impl Publisher {
    /// A publisher stamping `node` on dispatched events.
    pub fn new(
        js: jetstream::Context,
        node: String,
        key: crate::delivery::DeliveryKey,
    ) -> Publisher {
        Publisher { js, node, key }
    }

    /// The node it stamps on what it publishes.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Publishes every fire (one message per shard, and its `dispatched` event), sending all
    /// before awaiting any ack: the work messages of every fire first, so the last run of a
    /// large round reaches its worker after as few messages as possible, then the events.
    /// Returns, per fire, whether all its messages were stored.
    pub async fn publish(&self, fires: &[Fire]) -> Vec<Result<(), PublishError>> {
        let now = Utc::now();
        let mut round = Round {
            js: &self.js,
            fires,
            results: fires.iter().map(|_| Ok(())).collect(),
            inflight: FuturesUnordered::new(),
        };
        // Each fire's work messages are sent as soon as they are built (the first leave before
        // the last fire is built); its event waits until every work message is sent.
        let mut events = Vec::with_capacity(fires.len());
        for (i, fire) in fires.iter().enumerate() {
            let mut msgs = match self.messages(fire, now) {
                Ok(msgs) => msgs.into_iter(),
                Err(message) => {
                    round.fail(i, message);
                    continue;
                }
            };
            if let Some(event) = msgs.next() {
                events.push((i, event));
            }
            for msg in msgs {
                round.send(i, msg).await;
            }
        }
        for (i, event) in events {
            round.send(i, event).await;
        }
        let results = round.finish().await;
        count(fires, &results);
        results
    }

    /// The fire's messages: its event (`dispatched` or `skipped`) first, then its work
    /// messages.
    fn messages(
        &self,
        fire: &Fire,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, PublishMessage)>, String> {
        let event = |e: &RunEvent| -> Result<(String, PublishMessage), String> {
            let payload = Bytes::from(serde_json::to_vec(e).map_err(|e| e.to_string())?);
            let token = self.key.scheduler_token(e.run_id());
            Ok((
                e.subject(),
                PublishMessage::build()
                    .payload(payload)
                    .message_id(e.msg_id())
                    .header(SCHEDULER_TOKEN_HEADER, token.as_str())
                    .header(TRACEPARENT, e.traceparent().as_str()),
            ))
        };
        let spec = &fire.job.stored.spec;
        if let Some(reason) = &fire.skip {
            let skipped = RunEvent::Skipped(Skipped {
                run: krest_schemas::RunRef {
                    run_id: fire.run_id.clone(),
                    job_group: spec.job_group.clone(),
                    job_name: spec.job_name.clone(),
                    app_name: spec.app_name.to_string(),
                },
                trigger: fire.trigger,
                scheduled_at: fire.scheduled_at,
                at: now,
                reason: reason.clone(),
                misfired: fire.misfired,
                revision: fire.job.version,
                node: self.node.clone(),
                epoch: fire.epoch,
            });
            return Ok(vec![event(&skipped)?]);
        }
        let items = fire.shard_plans();
        let total = u32::try_from(items.len()).map_err(|_| "too many shards".to_string())?;
        let run_ref = krest_schemas::RunRef {
            run_id: fire.run_id.clone(),
            job_group: spec.job_group.clone(),
            job_name: spec.job_name.clone(),
            app_name: spec.app_name.to_string(),
        };
        let dispatched = RunEvent::Dispatched(Dispatched {
            run: run_ref.clone(),
            path: spec.path.to_string(),
            job_type: spec.job_type,
            trigger: fire.trigger,
            scheduled_at: fire.scheduled_at,
            dispatched_at: now,
            shard_total: total,
            args: fire.args.clone(),
            misfired: fire.misfired,
            parent_run_id: fire.parent_run_id.clone(),
            revision: fire.job.version,
            node: self.node.clone(),
            epoch: fire.epoch,
        });
        let mut out = Vec::with_capacity(items.len() + 1);
        out.push(event(&dispatched)?);
        // What every shard's message shares is built once per fire; each shard sets its own
        // shard info, target and delivery token, and is serialized into a buffer sized after
        // the previous one.
        let mut msg = RunMessage {
            run: run_ref,
            path: spec.path.to_string(),
            job_type: spec.job_type,
            args: fire.args.clone(),
            shard: None,
            scheduled_at: fire.scheduled_at,
            dispatched_at: now,
            trigger: fire.trigger,
            parent_run_id: fire.parent_run_id.clone(),
            target: None,
            load_balance: spec.load_balance_type,
            attempt_offset: 0,
            retry_at: None,
            not_before: fire.not_before,
            avoid: Vec::new(),
            retry_times: u32::try_from(spec.retry_times).unwrap_or(0),
            timeout_secs: spec.timeout_secs.and_then(|t| u64::try_from(t).ok()),
            http: spec.url.as_ref().map(|url| krest_schemas::HttpCall {
                url: url.to_string(),
                method: spec.method_type,
                headers: spec.headers.clone(),
            }),
            retry_backoff: spec
                .retry_backoff
                .as_ref()
                .and_then(|b| b.to_millis().ok())
                .map(|(initial_ms, factor, max_ms)| krest_schemas::BackoffMs {
                    initial_ms,
                    factor,
                    max_ms,
                }),
            revision: fire.job.version,
            epoch: fire.epoch,
            delivery_token: String::new(),
        };
        let queue_subject = work_queue_subject(&spec.app_name, &spec.job_group, &spec.job_name);
        // Shards on the app's queue differ only in their shard info and token: their JSON is
        // the fire's, spliced (see [`Splice`]). Making the splice costs two serializations,
        // so a one-shard fire is serialized whole.
        let splice = if items.len() > 1 {
            Splice::of(&msg, total)
        } else {
            None
        };
        let mut size = 512;
        for (index, ShardPlan { item, target }) in items.into_iter().enumerate() {
            let subject = match &target {
                Some(instance) => {
                    work_instance_subject(&spec.app_name, &spec.job_group, &spec.job_name, instance)
                }
                None => queue_subject.clone(),
            };
            let index = u32::try_from(index).map_err(|_| "too many shards".to_string())?;
            let shard = item.map(|item| ShardInfo { index, total, item });
            let token = self.key.token(&fire.run_id, index);
            let spliced = match (&splice, &target) {
                (Some(sp), None) => sp.payload(shard.as_ref(), &token, size),
                _ => None,
            };
            let payload = match spliced {
                Some(payload) => payload,
                None => {
                    msg.shard = shard;
                    msg.target = target;
                    msg.delivery_token = token;
                    let mut payload = Vec::with_capacity(size);
                    serde_json::to_writer(&mut payload, &msg).map_err(|e| e.to_string())?;
                    payload
                }
            };
            size = payload.len() + 64;
            out.push((
                subject,
                PublishMessage::build()
                    .payload(Bytes::from(payload))
                    .message_id(work_msg_id(&fire.run_id, index))
                    .header(
                        TRACEPARENT,
                        dispatch_traceparent(&fire.run_id, index).as_str(),
                    ),
            ));
        }
        Ok(out)
    }

    /// Writes job states and the fire watermark into the state bucket, pipelined. Only the
    /// leader calls it, for fires whose messages are stored (or that it holds queued).
    pub async fn write_states(
        &self,
        states: &[(&str, &JobState)],
        watermark: Option<&FireWatermark>,
    ) -> Result<(), String> {
        let mut inflight = FuturesUnordered::new();
        let mut first_error = None;
        let mut values = Vec::with_capacity(states.len() + 1);
        for (key, state) in states {
            values.push((*key, serde_json::to_vec(state).map_err(|e| e.to_string())?));
        }
        if let Some(w) = watermark {
            values.push((
                STATE_WATERMARK_KEY,
                serde_json::to_vec(w).map_err(|e| e.to_string())?,
            ));
        }
        for (key, payload) in values {
            while inflight.len() >= MAX_INFLIGHT {
                if let Some(Err(e)) = inflight.next().await {
                    first_error.get_or_insert(e);
                }
            }
            let ack = self
                .js
                .send_publish(
                    kv_subject(STATE_BUCKET, key),
                    PublishMessage::build().payload(payload.into()),
                )
                .await
                .map_err(|e| e.to_string())?;
            inflight.push(async move { ack.await.map(|_| ()).map_err(|e| e.to_string()) });
        }
        while let Some(r) = inflight.next().await {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(args: Value) -> RunMessage {
        RunMessage {
            run: krest_schemas::RunRef {
                run_id: "g.j.1767225605000".into(),
                job_group: "g".into(),
                job_name: "j".into(),
                app_name: "app".into(),
            },
            path: "p/\"q\"".into(),
            job_type: krest_schemas::JobType::Sharding,
            args,
            shard: None,
            scheduled_at: DateTime::parse_from_rfc3339("2026-01-01T00:00:05Z")
                .unwrap()
                .with_timezone(&Utc),
            dispatched_at: Utc::now(),
            trigger: Trigger::Schedule,
            parent_run_id: Some("parent \"shard\":".into()),
            target: None,
            load_balance: krest_schemas::LoadBalance::Queue,
            attempt_offset: 0,
            retry_at: None,
            not_before: None,
            avoid: Vec::new(),
            retry_times: 3,
            timeout_secs: Some(30),
            http: None,
            retry_backoff: Some(krest_schemas::BackoffMs {
                initial_ms: 10,
                factor: 2.0,
                max_ms: 1000,
            }),
            revision: 7,
            epoch: Some(4),
            delivery_token: String::new(),
        }
    }

    #[test]
    fn spliced_messages_are_what_serde_makes() {
        let argss = [
            Value::Null,
            serde_json::json!({"shard": {"index": 1}, "deliveryToken": "x\"}"}),
            serde_json::json!(["a", "b\"c", {"scheduledAt": 1}]),
        ];
        let items = [
            None,
            Some(Value::Null),
            Some(serde_json::json!("Beijing \"north\"")),
            Some(serde_json::json!({"k": [1, 2, {"shard": null}]})),
        ];
        for args in argss {
            let mut msg = template(args);
            let splice = Splice::of(&msg, 3).expect("the layout is the expected one");
            for item in &items {
                for index in 0..3u32 {
                    let token = format!("{index:032x}");
                    let shard = item.clone().map(|item| ShardInfo {
                        index,
                        total: 3,
                        item,
                    });
                    let spliced = splice.payload(shard.as_ref(), &token, 0).unwrap();
                    msg.shard = shard;
                    msg.delivery_token = token;
                    assert_eq!(
                        String::from_utf8(spliced).unwrap(),
                        serde_json::to_string(&msg).unwrap()
                    );
                }
            }
        }
        // A token that is not plain hex is not spliced in.
        let splice = Splice::of(&template(Value::Null), 1).unwrap();
        assert!(splice.payload(None, "\"", 0).is_none());
    }

    #[test]
    fn run_ids() {
        let at = DateTime::parse_from_rfc3339("2026-01-01T00:00:05Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(scheduled_run_id("g", "j", at), "g.j.1767225605000");
        let a = manual_run_id("g", "j", at);
        assert!(a.starts_with("g.j.m-1767225605000-"), "{a}");
    }
}
