//! Every NATS subject, stream, consumer and KV bucket name Krest uses, in one place.
//!
//! Names that embed user data (an app name, a job group or name, a worker instance id) only ever
//! embed *tokens*: strings of ASCII letters, digits, `-` and `_`, checked by [`is_token`]. That
//! keeps them valid as subject tokens, KV keys and consumer names at once.

/// The JetStream stream holding runs waiting for a worker (work-queue retention).
pub const WORK_STREAM: &str = "KREST_WORK";
/// Subjects of [`WORK_STREAM`].
pub const WORK_SUBJECTS: &str = "krest.work.>";
/// The JetStream stream holding run events (dispatched, started, log, finished).
pub const EVENTS_STREAM: &str = "KREST_EVENTS";
/// Subjects of [`EVENTS_STREAM`].
pub const EVENTS_SUBJECTS: &str = "krest.events.>";
/// The JetStream stream where bad input is parked: malformed run messages and events, invalid
/// job definitions found in the jobs bucket, runs that exhausted their deliveries.
pub const DLQ_STREAM: &str = "KREST_DLQ";
/// Subjects of [`DLQ_STREAM`].
pub const DLQ_SUBJECTS: &str = "krest.dlq.>";
/// Header naming why a message was parked.
pub const DLQ_REASON_HEADER: &str = "Krest-Reason";
/// Header holding the subject the parked message was found on.
pub const DLQ_SOURCE_HEADER: &str = "Krest-Source-Subject";
/// Header holding the parked message's sequence in the stream it was read from.
pub const DLQ_SOURCE_SEQ_HEADER: &str = "Krest-Source-Seq";
/// Header holding the parked message's original payload size in bytes.
pub const DLQ_ORIGINAL_SIZE_HEADER: &str = "Krest-Original-Size";
/// Header present when the parked copy keeps only the start of the payload (it says how much).
pub const DLQ_TRUNCATED_HEADER: &str = "Krest-Truncated";

/// Dead-letter subject for one kind of bad input (`work`, `events`, `jobs`).
pub fn dlq_subject(kind: &str) -> String {
    format!("krest.dlq.{kind}")
}

/// Subject prefix of the request/reply API spoken by `krest` CLI and scheduler nodes.
pub const API_PREFIX: &str = "krest.api";
/// Queue group every scheduler node's API responders join, so one node answers each request.
pub const API_QUEUE_GROUP: &str = "krest-api";

/// KV bucket holding the leader lease (history 1, max age = lease TTL).
pub const LEADER_BUCKET: &str = "krest-leader";
/// The one key of [`LEADER_BUCKET`].
pub const LEADER_KEY: &str = "leader";
/// KV bucket of job definitions, keyed by [`job_key`]; its history keeps earlier revisions.
pub const JOBS_BUCKET: &str = "krest-jobs";
/// KV bucket of per-job scheduling state (last fire time), keyed by [`job_key`].
pub const STATE_BUCKET: &str = "krest-state";
/// Key of the leader's [`crate::FireWatermark`] in [`STATE_BUCKET`] (job keys always hold a
/// dot, so it cannot be one).
pub const STATE_WATERMARK_KEY: &str = "watermark";
/// KV bucket of worker heartbeats (max age = heartbeat TTL), keyed by [`worker_key`].
pub const WORKERS_BUCKET: &str = "krest-workers";
/// KV bucket of "done once" markers (max age 7 days): a node that creates a key first does the
/// thing (trigger a child job, send an alert); the others skip it.
pub const ONCE_BUCKET: &str = "krest-once";
/// KV bucket of cancelled runs (max age one day), keyed by run id.
pub const CANCELS_BUCKET: &str = "krest-cancels";
/// KV bucket of scheduler node presence (max age = node TTL), keyed by node name.
pub const NODES_BUCKET: &str = "krest-nodes";

/// The handler name of the built-in HTTP executor: HTTP jobs run on it.
pub const HTTP_HANDLER: &str = "krest/http";

/// Largest length of a token (app, group, job name, worker instance, node name).
pub const MAX_TOKEN_LEN: usize = 64;

/// True when `s` can be embedded in subjects, KV keys and consumer names: 1 to
/// [`MAX_TOKEN_LEN`] ASCII letters, digits, `-` or `_`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOKEN_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Turns any string into a token by replacing every other character with `-` and truncating.
/// Used for host names and generated ids, never for user-chosen job names (those are rejected).
pub fn sanitize_token(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_TOKEN_LEN)
        .collect();
    if out.is_empty() {
        out.push_str("unnamed");
    }
    out
}

/// Splits a comma-separated NATS server list (`nats://a:4222, nats://b:4222`) into URLs.
pub fn server_list(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

// Work subjects name the app, the job and the destination:
// `krest.work.<app>.<group>.<name>.q` (the app's shared queue), `….i.<instance>` (one
// instance), `….r` (the leader's router). The job in the subject lets anyone ask JetStream
// whether a job has runs outstanding (messages on `krest.work.*.<group>.<name>.>`): a run is
// pending or running exactly while one of its messages is in the work stream.

/// Work subject of a run of job `group.name` for the app's shared, weighted consumer group.
pub fn work_queue_subject(app: &str, group: &str, name: &str) -> String {
    format!("krest.work.{app}.{group}.{name}.q")
}

/// Filter of the app's shared consumer: every job's queue subject.
pub fn work_queue_filter(app: &str) -> String {
    format!("krest.work.{app}.*.*.q")
}

/// Work subject of a run of job `group.name` addressed to one worker instance of an app.
pub fn work_instance_subject(app: &str, group: &str, name: &str, instance: &str) -> String {
    format!("krest.work.{app}.{group}.{name}.i.{instance}")
}

/// Filter of one instance's own consumer: every job's runs addressed to it.
pub fn work_instance_filter(app: &str, instance: &str) -> String {
    format!("krest.work.{app}.*.*.i.{instance}")
}

/// Every instance-addressed work subject.
pub const WORK_INSTANCE_SUBJECTS: &str = "krest.work.*.*.*.i.*";

/// Work subject the leader's router reads for job `group.name`: retries of addressed runs
/// and runs to re-route.
pub fn work_router_subject(app: &str, group: &str, name: &str) -> String {
    format!("krest.work.{app}.{group}.{name}.r")
}

/// Filter of the router's consumer.
pub const WORK_ROUTER_FILTER: &str = "krest.work.*.*.*.r";

/// Every work subject of job `group.name`, whatever its app and destination.
pub fn work_job_filter(group: &str, name: &str) -> String {
    format!("krest.work.*.{group}.{name}.>")
}

/// Where a work message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The app's shared queue.
    Queue,
    /// One instance.
    Instance(String),
    /// The leader's router.
    Router,
}

/// A work subject, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkSubject {
    /// The app.
    pub app: String,
    /// The job's group.
    pub group: String,
    /// The job's name.
    pub name: String,
    /// Where it goes.
    pub destination: Destination,
}

impl WorkSubject {
    /// The job's key.
    pub fn job_key(&self) -> String {
        job_key(&self.group, &self.name)
    }
}

/// Takes a work subject apart; `None` for anything else.
pub fn parse_work_subject(subject: &str) -> Option<WorkSubject> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let (app, group, name, destination) = match tokens[..] {
        ["krest", "work", app, group, name, "q"] => (app, group, name, Destination::Queue),
        ["krest", "work", app, group, name, "r"] => (app, group, name, Destination::Router),
        ["krest", "work", app, group, name, "i", instance] => (
            app,
            group,
            name,
            Destination::Instance(instance.to_string()),
        ),
        _ => return None,
    };
    Some(WorkSubject {
        app: app.to_string(),
        group: group.to_string(),
        name: name.to_string(),
        destination,
    })
}

/// Durable consumer name of an app's shared consumer group on [`WORK_STREAM`].
pub fn app_consumer(app: &str) -> String {
    format!("krest-app-{app}")
}

/// Core NATS subject on which an app's workers hear cancellations.
pub fn cancel_subject(app: &str) -> String {
    format!("krest.cancel.{app}")
}

/// Durable consumer name of one worker instance's own runs on [`WORK_STREAM`].
pub fn instance_consumer(app: &str, instance: &str) -> String {
    format!("krest-inst-{app}-{instance}")
}

/// Durable consumer name of the router.
pub const ROUTER_CONSUMER: &str = "krest-router";

/// Subject run events of one job of app `app` are published on: the app in the subject
/// lets the server's permissions keep each app's workers to their own runs' events.
pub fn events_subject(app: &str, group: &str, name: &str) -> String {
    format!("krest.events.{app}.{group}.{name}")
}

/// Every event subject of job `group.name`, whatever its app.
pub fn events_job_filter(group: &str, name: &str) -> String {
    format!("krest.events.*.{group}.{name}")
}

/// KV bucket of secrets only scheduler nodes read: the key of delivery tokens.
pub const SECRETS_BUCKET: &str = "krest-secrets";
/// Header of the `dispatched` and `skipped` events a scheduler node publishes: proof that a
/// node wrote it (HMAC of `<runId>/scheduler` with the delivery-token key).
pub const SCHEDULER_TOKEN_HEADER: &str = "Krest-Scheduler-Token";
/// Key in [`SECRETS_BUCKET`] of the delivery-token key (32 random bytes).
pub const DELIVERY_KEY: &str = "delivery";

/// Subject of one API operation, e.g. `api_subject("job.apply")`.
pub fn api_subject(op: &str) -> String {
    format!("{API_PREFIX}.{op}")
}

/// Key of a job in [`JOBS_BUCKET`] and [`STATE_BUCKET`].
pub fn job_key(group: &str, name: &str) -> String {
    format!("{group}.{name}")
}

/// Key of a worker instance in [`WORKERS_BUCKET`].
pub fn worker_key(app: &str, instance: &str) -> String {
    format!("{app}.{instance}")
}

/// Subjects of KV bucket `bucket`'s stream (`KV_<bucket>`).
pub fn kv_subjects(bucket: &str) -> String {
    format!("$KV.{bucket}.>")
}

/// The advisories JetStream emits when a work-stream message reaches a consumer's max
/// deliveries (one token per consumer).
pub fn max_deliveries_advisories() -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{WORK_STREAM}.*")
}

/// Subject of `key` in KV bucket `bucket` (what a KV put publishes to).
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

// Run identity. A run id and every message id about a run is built here and nowhere else:
// JetStream de-duplicates by message id, so two nodes (or a node and a worker) that publish
// the same thing must build the same id.

/// Id of the run of `group.name` scheduled at `at_ms` (epoch milliseconds): the same on every
/// node, so a fire published again by another leader is a duplicate.
pub fn scheduled_run_id(group: &str, name: &str, at_ms: i64) -> String {
    format!("{group}.{name}.{at_ms}")
}

/// Id of a manual run of `group.name` triggered with `request_id` (a token, see
/// [`new_request_id`]): the same for every resend of one request.
pub fn manual_run_id(group: &str, name: &str, request_id: &str) -> String {
    format!("{group}.{name}.m-{request_id}")
}

/// Id of the run of child job `child` (a `group.name` key) triggered by `parent_run_id`: the
/// same on every node, so every node that sees the parent succeed publishes one run.
pub fn child_run_id(child: &str, parent_run_id: &str) -> String {
    format!("{child}.c-{parent_run_id}")
}

/// Key in [`ONCE_BUCKET`] claimed by the node that sends alert `kind` of run `run_id`.
pub fn alert_marker(run_id: &str, kind: &str) -> String {
    format!("alert.{run_id}.{kind}")
}

/// Key in [`ONCE_BUCKET`] written once child run `child_run_id` was triggered.
pub fn child_marker(child_run_id: &str) -> String {
    format!("child.{child_run_id}")
}

/// A fresh request id (a manual trigger's, a deletion's): `<epoch ms>-<6 hex digits>` from the clock's
/// nanoseconds and a per-process random state.
pub fn new_request_id(at: chrono::DateTime<chrono::Utc>) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(at.timestamp_nanos_opt().unwrap_or_default());
    format!("{}-{:06x}", at.timestamp_millis(), h.finish() & 0xff_ffff)
}

/// `Nats-Msg-Id` of the work message for one shard of a run (shard 0 for unsharded runs), as
/// the leader dispatches it.
pub fn work_msg_id(run_id: &str, shard: u32) -> String {
    format!("{run_id}/{shard}")
}

/// `Nats-Msg-Id` of a worker's retry of an instance-addressed shard, handed to the router
/// after `attempt` failed.
pub fn retry_msg_id(run_id: &str, shard: u32, attempt: u32) -> String {
    format!("{run_id}/{shard}/retry-{attempt}")
}

/// `Nats-Msg-Id` of a shard the router moved off departed instance `instance`, where it was
/// work-stream message `seq`.
pub fn moved_msg_id(run_id: &str, shard: u32, instance: &str, seq: u64) -> String {
    format!("{run_id}/{shard}/from-{instance}-{seq}")
}

/// `Nats-Msg-Id` of a shard the router re-addressed for `attempt`.
pub fn rerouted_msg_id(run_id: &str, shard: u32, attempt: u32) -> String {
    format!("{run_id}/{shard}/a{attempt}")
}

/// `Nats-Msg-Id` of an event about a whole run: `kind` is `dispatched` or `skipped`.
pub fn run_event_msg_id(run_id: &str, kind: &str) -> String {
    format!("{run_id}/{kind}")
}

/// `Nats-Msg-Id` of an event about one attempt of a shard: `kind` is `started`, `finished` or
/// `log/<n>`; `token` is the run message's delivery token (`<runId>/<shard>/<attempt>/<token>/
/// <kind>`), so an event published without it cannot take the real event's id. Without a
/// token (workers before 0.2), `<runId>/<shard>/<attempt>/<kind>`.
pub fn attempt_event_msg_id(
    run_id: &str,
    shard: u32,
    attempt: u32,
    token: &str,
    kind: &str,
) -> String {
    if token.is_empty() {
        format!("{run_id}/{shard}/{attempt}/{kind}")
    } else {
        format!("{run_id}/{shard}/{attempt}/{token}/{kind}")
    }
}

/// `Nats-Msg-Id` of the parked copy of work-stream message `seq` (whoever parks it: a worker,
/// the router, the dead-letter handler).
pub fn parked_work_id(seq: u64) -> String {
    format!("work/{seq}")
}

/// `Nats-Msg-Id` of the parked copy of events-stream message `seq`.
pub fn parked_event_id(seq: u64) -> String {
    format!("events/{seq}")
}

/// `Nats-Msg-Id` of the parked copy of revision `revision` of job definition `key`.
pub fn parked_job_id(key: &str, revision: u64) -> String {
    format!("jobs/{key}/{revision}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(is_token("default-jobGroup"));
        assert!(is_token("demo_job2"));
        assert!(!is_token(""));
        assert!(!is_token("a.b"));
        assert!(!is_token("a b"));
        assert!(!is_token("a*"));
        assert!(!is_token(&"x".repeat(65)));
        assert_eq!(sanitize_token("host.example.com"), "host-example-com");
        assert_eq!(sanitize_token(""), "unnamed");
        assert_eq!(
            server_list("nats://a:1, nats://b:2,"),
            ["nats://a:1", "nats://b:2"]
        );
    }

    /// Whether `subject` matches `filter` (NATS wildcards `*` and a final `>`).
    fn matches(filter: &str, subject: &str) -> bool {
        let f: Vec<&str> = filter.split('.').collect();
        let s: Vec<&str> = subject.split('.').collect();
        let tail = f.last() == Some(&">");
        let len_ok = if tail {
            s.len() >= f.len()
        } else {
            s.len() == f.len()
        };
        len_ok
            && f.iter()
                .zip(&s)
                .all(|(f, s)| *f == "*" || *f == ">" || f == s)
    }

    #[test]
    fn work_subjects_round_trip_and_filters_do_not_overlap() {
        let q = work_queue_subject("app", "g", "j");
        let i = work_instance_subject("app", "g", "j", "w-1");
        let r = work_router_subject("app", "g", "j");
        assert_eq!(
            parse_work_subject(&q).unwrap().destination,
            Destination::Queue
        );
        assert_eq!(
            parse_work_subject(&i).unwrap().destination,
            Destination::Instance("w-1".into())
        );
        let parsed = parse_work_subject(&r).unwrap();
        assert_eq!(parsed.destination, Destination::Router);
        assert_eq!(parsed.job_key(), "g.j");
        assert_eq!(parse_work_subject("krest.work.app.q"), None);
        // A subject matches exactly one consumer filter (work-queue streams require it).
        for subject in [&q, &i, &r] {
            let hits = [
                work_queue_filter("app"),
                work_instance_filter("app", "w-1"),
                WORK_ROUTER_FILTER.to_string(),
            ]
            .iter()
            .filter(|f| matches(f, subject))
            .count();
            assert_eq!(hits, 1, "{subject}");
            assert!(matches(&work_job_filter("g", "j"), subject));
            assert!(!matches(&work_job_filter("g", "k"), subject));
            assert!(matches(WORK_SUBJECTS, subject));
        }
        assert!(matches(WORK_INSTANCE_SUBJECTS, &i));
        assert!(!matches(WORK_INSTANCE_SUBJECTS, &q));
    }
}
