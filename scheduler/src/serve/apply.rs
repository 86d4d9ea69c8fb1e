//! `job.apply` for any number of documents.
//!
//! Both sides check a set of documents the same way: each parsed and validated on its own and
//! kept as a [`Summary`] (key, children, size), then the set ([`check_documents`]: duplicates,
//! child jobs known and acyclic, sizes that fit in a NATS message). The CLI does it for a
//! whole file before sending anything, then orders the documents children first
//! ([`children_first`]) and splits them into requests whose body and reply fit in the
//! server's `max_payload` ([`split_requests`]); the node checks each request again against its
//! job table plus the request and writes the request's jobs pipelined
//! ([`ApiServer::write_specs`]): one publish per changed job to `$KV.krest-jobs.<key>` with the
//! expected last subject sequence (a revision-checked KV update), all acks awaited together,
//! the revision-checked retry path only for conflicts, and one wait for the node's job table.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Range;

use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::Utc;
use futures_util::stream::{FuturesUnordered, StreamExt};
use krest_schemas::api::{ApiError, ApplyOutcome, ApplyResult, ErrorCode, InvalidDocument};
use krest_schemas::job::MAX_DEFINITION_BYTES;
use krest_schemas::names::JOBS_BUCKET;
use krest_schemas::{parse_job, InvalidJob, JobSpec, Problem, StoredJob};
use serde_json::Value;

use super::api::{now_ms, prepare, ApiServer, Failure, READ_YOUR_WRITES};
use super::page::result_budget;

/// Documents per `job.apply` request at most, whatever their size: a request is answered
/// well within the CLI's per-attempt timeout.
pub const MAX_DOCUMENTS_PER_REQUEST: usize = 1000;

/// Unacknowledged publishes a node keeps in flight while writing one request's jobs.
const MAX_INFLIGHT: usize = 1024;

/// Bytes of a `job.apply` request around its documents: `{"documents":[` … `]}`.
const REQUEST_OVERHEAD: usize = 16;

/// Bytes of a `job.apply` reply around its results.
const REPLY_OVERHEAD: usize = 32;

/// Bytes a `JobView` or `JobRevision` adds around a definition (key, revision, times).
const VIEW_OVERHEAD: usize = 256;

/// What the checks of a set of documents ([`check_documents`]) need of one valid definition,
/// so a set of any size can be checked without holding its definitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The job's key.
    pub key: String,
    /// The keys of its child jobs.
    pub children: Vec<String>,
    /// Its size as JSON, held to what one request and reply can carry ([`size_problem`]).
    pub size: usize,
}

impl Summary {
    /// The summary of `spec`, whose document is `doc_bytes` long as JSON, when every request
    /// and reply must fit in `max_payload`.
    pub fn of(spec: &JobSpec, doc_bytes: usize, max_payload: usize) -> Summary {
        Summary {
            key: spec.key(),
            children: spec.child_keys(),
            size: checked_size(spec, doc_bytes, max_payload),
        }
    }
}

/// The bytes of the reply entry of one applied job (its largest form).
pub fn result_bytes(key: &str) -> usize {
    serde_json::to_vec(&ApplyResult {
        job: key.to_string(),
        outcome: ApplyOutcome::Unchanged,
        revision: u64::MAX,
    })
    .map_or(key.len() + 64, |v| v.len())
        + 1
}

/// The size a definition whose document is `doc_bytes` long is checked at: the larger of the
/// document and the definition as stored (only serialized when a definition within the
/// limits could be too large for a message).
fn checked_size(spec: &JobSpec, doc_bytes: usize, max_payload: usize) -> usize {
    let budget = result_budget(max_payload);
    let stored = if budget >= MAX_DEFINITION_BYTES + VIEW_OVERHEAD.max(REQUEST_OVERHEAD) {
        // Validation holds a definition to MAX_DEFINITION_BYTES as stored: it fits.
        0
    } else {
        serde_json::to_vec(spec).map_or(usize::MAX, |v| v.len())
    };
    doc_bytes.max(stored)
}

/// What is wrong with the size of a definition of `size` bytes ([`Summary::size`]), when
/// every request and reply must fit in `max_payload`.
pub fn size_problem(size: usize, max_payload: usize) -> Option<Problem> {
    let budget = result_budget(max_payload);
    let needed = size.saturating_add(VIEW_OVERHEAD.max(REQUEST_OVERHEAD));
    (needed > budget).then(|| Problem {
        field: String::new(),
        message: format!(
            "the definition is {size} bytes as JSON; with nats-server's max_payload of {max_payload} at most {} fit in one request and reply: shorten it (large args are the usual cause) or raise max_payload in the nats-server configuration",
            budget.saturating_sub(VIEW_OVERHEAD.max(REQUEST_OVERHEAD))
        ),
    })
}

/// Checks a set of documents together, each parsed and validated on its own and summarized
/// ([`Summary::of`]) or found invalid: no job defined twice; every child job defined here or
/// existing (`existing(key)` gives an existing job's children, `None` if there is no such
/// job); no cycle of child jobs; each fits in a message. Returns the summaries of the valid
/// documents with their index, in document order, and the invalid documents with every
/// problem.
pub fn check_documents(
    docs: Vec<Result<Summary, InvalidJob>>,
    max_payload: usize,
    existing: impl Fn(&str) -> Option<Vec<String>>,
) -> (Vec<(usize, Summary)>, Vec<InvalidDocument>) {
    let mut invalid = Vec::new();
    let mut specs: Vec<(usize, Summary)> = Vec::with_capacity(docs.len());
    for (index, result) in docs.into_iter().enumerate() {
        match result {
            Ok(summary) => specs.push((index, summary)),
            Err(e) => invalid.push(InvalidDocument {
                index,
                job: e.job,
                problems: e.problems,
            }),
        }
    }
    // Each key's first valid definition (its position in `specs`); later ones are invalid.
    let mut bad = vec![false; specs.len()];
    let mut here: HashMap<&str, usize> = HashMap::with_capacity(specs.len());
    for (position, (index, summary)) in specs.iter().enumerate() {
        let key = summary.key.as_str();
        let problem = match here.get(key) {
            Some(&earlier) => Some(Problem {
                field: String::new(),
                message: format!("defines the same job as document {}", specs[earlier].0),
            }),
            None => size_problem(summary.size, max_payload),
        };
        match problem {
            Some(p) => {
                bad[position] = true;
                invalid.push(InvalidDocument {
                    index: *index,
                    job: Some(summary.key.clone()),
                    problems: vec![p],
                });
            }
            None => {
                here.insert(key, position);
            }
        }
    }
    let children = |key: &str| -> Option<Cow<'_, [String]>> {
        match here.get(key) {
            Some(&p) => Some(Cow::Borrowed(specs[p].1.children.as_slice())),
            None => existing(key).map(Cow::Owned),
        }
    };
    let mut unresolved = Vec::new();
    for (position, (index, summary)) in specs.iter().enumerate() {
        if bad[position] || summary.children.is_empty() {
            continue;
        }
        let mut problems = Vec::new();
        for child in &summary.children {
            if !here.contains_key(child.as_str()) && existing(child).is_none() {
                problems.push(Problem {
                    field: "childJobs".into(),
                    message: format!("no job `{child}`: apply it first, or in the same file"),
                });
            }
        }
        if let Some(cycle) = find_cycle(&children, &summary.key) {
            problems.push(Problem {
                field: "childJobs".into(),
                message: format!("child jobs form a cycle: {}", cycle.join(" → ")),
            });
        }
        if !problems.is_empty() {
            unresolved.push(position);
            invalid.push(InvalidDocument {
                index: *index,
                job: Some(summary.key.clone()),
                problems,
            });
        }
    }
    drop(here);
    for position in unresolved {
        bad[position] = true;
    }
    invalid.sort_by_key(|d| d.index);
    let mut position = 0;
    specs.retain(|_| {
        position += 1;
        !bad[position - 1]
    });
    (specs, invalid)
}

/// The child keys of the valid documents in `docs` that none of them defines: the jobs that
/// must already exist.
pub fn external_children(docs: &[Result<Summary, InvalidJob>]) -> BTreeSet<String> {
    let keys: HashSet<&str> = docs.iter().flatten().map(|s| s.key.as_str()).collect();
    docs.iter()
        .flatten()
        .flat_map(|s| &s.children)
        .filter(|c| !keys.contains(c.as_str()))
        .cloned()
        .collect()
}

/// A path from `start` back to itself through child links, if there is one.
pub fn find_cycle<'a>(
    children: &dyn Fn(&str) -> Option<Cow<'a, [String]>>,
    start: &str,
) -> Option<Vec<String>> {
    fn visit<'a>(
        children: &dyn Fn(&str) -> Option<Cow<'a, [String]>>,
        start: &str,
        node: &str,
        path: &mut Vec<String>,
        seen: &mut HashSet<String>,
    ) -> bool {
        for child in children(node).iter().flat_map(|c| c.iter()) {
            if child == start {
                path.push(child.clone());
                return true;
            }
            if seen.insert(child.clone()) {
                path.push(child.clone());
                if visit(children, start, child, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = HashSet::new();
    visit(children, start, start, &mut path, &mut seen).then_some(path)
}

/// Each job's position in `specs`, by key; empty when no job has children (the map is only
/// needed, and only built, to find children).
pub fn positions_by_key(specs: &[(usize, Summary)]) -> HashMap<&str, usize> {
    if !specs.iter().any(|(_, s)| !s.children.is_empty()) {
        return HashMap::new();
    }
    specs
        .iter()
        .enumerate()
        .map(|(i, (_, s))| (s.key.as_str(), i))
        .collect()
}

/// Positions in `specs` ordered so that every job comes after its children defined in
/// `specs` (document order otherwise). `specs` must have no cycle ([`check_documents`]).
pub fn children_first(specs: &[(usize, Summary)]) -> Vec<usize> {
    let position = positions_by_key(specs);
    let mut order = Vec::with_capacity(specs.len());
    let mut done = vec![false; specs.len()];
    for root in 0..specs.len() {
        if specs[root].1.children.is_empty() {
            if !done[root] {
                done[root] = true;
                order.push(root);
            }
            continue;
        }
        // Iterative post-order: (position, children visited).
        let mut stack = vec![(root, false)];
        while let Some((i, expanded)) = stack.pop() {
            if done[i] {
                continue;
            }
            if expanded {
                done[i] = true;
                order.push(i);
                continue;
            }
            stack.push((i, true));
            for child in specs[i].1.children.iter().rev() {
                if let Some(&c) = position.get(child.as_str()) {
                    if !done[c] {
                        stack.push((c, false));
                    }
                }
            }
        }
    }
    order
}

/// Splits documents, in order, into consecutive requests: each at most `max_docs`, with a
/// body (`sizes[i].0`: document JSON bytes) and a reply (`sizes[i].1`: [`result_bytes`]) that
/// fit in `max_payload`. A document too large for a request of its own gets one anyway (the
/// sizes are checked before, by [`check_documents`]).
pub fn split_requests(
    sizes: &[(usize, usize)],
    max_payload: usize,
    max_docs: usize,
) -> Vec<Range<usize>> {
    let budget = result_budget(max_payload);
    let mut out = Vec::new();
    let mut start = 0;
    let (mut body, mut reply) = (REQUEST_OVERHEAD, REPLY_OVERHEAD);
    for (i, &(doc, result)) in sizes.iter().enumerate() {
        let full = i > start
            && (i - start >= max_docs.max(1) || body + doc + 1 > budget || reply + result > budget);
        if full {
            out.push(start..i);
            start = i;
            body = REQUEST_OVERHEAD;
            reply = REPLY_OVERHEAD;
        }
        body += doc + 1;
        reply += result;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Keeps the first invalid documents whose description fits in half a reply; returns them
/// with the number left out.
pub fn cap_invalid(
    invalid: Vec<InvalidDocument>,
    max_payload: usize,
) -> (Vec<InvalidDocument>, usize) {
    let budget = result_budget(max_payload) / 2;
    let total = invalid.len();
    let mut used = 0;
    let mut kept = Vec::new();
    for doc in invalid {
        let size = serde_json::to_vec(&doc).map_or(usize::MAX, |v| v.len());
        if used + size > budget && !kept.is_empty() {
            break;
        }
        used += size;
        kept.push(doc);
    }
    let left_out = total - kept.len();
    (kept, left_out)
}

/// One valid document of a request, ready to write.
pub(super) struct Prepared {
    /// Its position in the request.
    index: usize,
    /// Its key.
    key: String,
    /// The job table's entry for it when checked.
    current: Option<std::sync::Arc<crate::jobs::JobEntry>>,
    /// As validated.
    spec: JobSpec,
    /// With its secret placeholders resolved against the job table's revision
    /// ([`super::api::prepare`]): what is written.
    write: JobSpec,
}

impl ApiServer {
    /// Applies one request: checks every document (against the job table and the request),
    /// writes the valid set if all are valid, and answers one result per document.
    pub(super) async fn apply_documents(
        &self,
        documents: &[Value],
    ) -> Result<Vec<ApplyResult>, Failure> {
        if documents.is_empty() {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                "no job definitions given",
            ));
        }
        // Bring the table up to the bucket as it is now, so it can stand in for reading each
        // key: the checks below and the writes then see what a read of each key would.
        let fresh = self.table_is_fresh().await;
        let max_payload = self.max_payload();
        // Each document's spec (taken when prepared) and summary, or its problems.
        let mut specs: Vec<Option<JobSpec>> = Vec::with_capacity(documents.len());
        let mut summaries = Vec::with_capacity(documents.len());
        for d in documents {
            match parse_job(d) {
                Ok(spec) => {
                    let size = serde_json::to_vec(d).map_or(usize::MAX, |v| v.len());
                    summaries.push(Ok(Summary::of(&spec, size, max_payload)));
                    specs.push(Some(spec));
                }
                Err(e) => {
                    summaries.push(Err(e));
                    specs.push(None);
                }
            }
        }
        let (valid, mut invalid) = check_documents(summaries, max_payload, |key| {
            self.table.get(key).map(|e| e.stored.spec.child_keys())
        });
        let now = Utc::now();
        let mut prepared = Vec::with_capacity(valid.len());
        for (index, Summary { key, .. }) in valid {
            let Some(spec) = specs.get_mut(index).and_then(Option::take) else {
                continue;
            };
            let current = self.table.get(&key);
            match prepare(&spec, current.as_ref().map(|e| &e.stored.spec), now) {
                Ok(write) => prepared.push(Prepared {
                    index,
                    key,
                    current,
                    spec,
                    write,
                }),
                Err(e) => invalid.push(InvalidDocument {
                    index,
                    job: e.job,
                    problems: e.problems,
                }),
            }
        }
        if !invalid.is_empty() {
            invalid.sort_by_key(|d| d.index);
            let n = invalid.len();
            let (invalid, left_out) = cap_invalid(invalid, max_payload);
            let more = if left_out > 0 {
                format!(" ({left_out} more not listed)")
            } else {
                String::new()
            };
            return Err(Failure(ApiError {
                code: ErrorCode::InvalidJob,
                message: format!(
                    "{n} of {} definitions are invalid; nothing was applied{more}",
                    documents.len()
                ),
                invalid,
            }));
        }
        let reply: usize =
            REPLY_OVERHEAD + prepared.iter().map(|p| result_bytes(&p.key)).sum::<usize>();
        if reply > result_budget(max_payload) {
            return Err(Failure::new(
                ErrorCode::TooLarge,
                format!(
                    "{} definitions in one request make a reply of about {reply} bytes, over nats-server's max_payload of {max_payload}; nothing was applied: send fewer per request (`krest job apply` splits a file by itself)",
                    prepared.len()
                ),
            ));
        }
        self.write_specs(prepared, fresh).await
    }

    /// Waits until this node's job table has applied everything the jobs bucket holds now;
    /// false if that cannot be told or takes too long.
    pub(super) async fn table_is_fresh(&self) -> bool {
        // The bucket's state now (a `kv::Store`'s own status is cached from when it opened).
        match crate::infra::bucket_state(&self.infra.js, JOBS_BUCKET).await {
            Ok(state) => {
                self.table
                    .wait_seen(state.last_sequence, READ_YOUR_WRITES)
                    .await
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the jobs bucket's status");
                false
            }
        }
    }

    /// Writes prepared specs, pipelined when the table is `fresh`, and waits once for this
    /// node's job table to show them. Specs equal to the current definition are not written
    /// (`UNCHANGED`).
    async fn write_specs(
        &self,
        specs: Vec<Prepared>,
        fresh: bool,
    ) -> Result<Vec<ApplyResult>, Failure> {
        if !fresh {
            tracing::debug!("job table behind the bucket; applying one job at a time");
            let mut results = Vec::with_capacity(specs.len());
            for p in &specs {
                results.push(self.write_one(p).await?);
            }
            return Ok(results);
        }
        let now = now_ms();
        let mut results: Vec<Option<ApplyResult>> = vec![None; specs.len()];
        let mut retry: Vec<usize> = Vec::new();
        // The newest bucket revision written, for one wait on the job table at the end.
        let mut newest = 0u64;
        let mut inflight = FuturesUnordered::new();
        let finish = |results: &mut Vec<Option<ApplyResult>>,
                      retry: &mut Vec<usize>,
                      newest: &mut u64,
                      (i, key, update, version, acked): (
            usize,
            String,
            bool,
            u64,
            Result<u64, String>,
        )| {
            match acked {
                Ok(sequence) => {
                    *newest = (*newest).max(sequence);
                    results[i] = Some(ApplyResult {
                        job: key,
                        outcome: if update {
                            ApplyOutcome::Updated
                        } else {
                            ApplyOutcome::Created
                        },
                        revision: version,
                    });
                }
                Err(e) => {
                    tracing::debug!(job = %key, error = %e, "pipelined write refused; retrying it alone");
                    retry.push(i);
                }
            }
        };
        for (i, p) in specs.iter().enumerate() {
            let key = p.key.clone();
            // The table was fresh when the request was checked; a write since then makes the
            // revision-checked publish fail, and the job is written alone.
            let current = p.current.clone();
            if let Some(entry) = &current {
                if entry.stored.spec == p.write {
                    results[i] = Some(ApplyResult {
                        job: key,
                        outcome: ApplyOutcome::Unchanged,
                        revision: entry.version,
                    });
                    continue;
                }
            }
            let created_at = current
                .as_ref()
                .map(|e| e.stored.created_at)
                .or_else(|| {
                    p.write
                        .create_time
                        .as_deref()
                        .and_then(krest_schemas::job::parse_create_time)
                })
                .unwrap_or(now);
            // A key the table does not hold is written as new (1): if the bucket has a
            // deletion marker there, the publish is refused and the one-at-a-time path
            // numbers it after the deletion.
            let version = current.as_ref().map_or(1, |e| e.version + 1);
            let stored = StoredJob {
                spec: p.write.clone(),
                created_at,
                updated_at: now,
                version,
            };
            let value = Bytes::from(serde_json::to_vec(&stored).map_err(Failure::internal)?);
            let expected = current.as_ref().map_or(0, |e| e.revision);
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected.to_string().as_str(),
            );
            while inflight.len() >= MAX_INFLIGHT {
                if let Some(done) = inflight.next().await {
                    finish(&mut results, &mut retry, &mut newest, done);
                }
            }
            let update = current.is_some();
            match self
                .infra
                .js
                .send_publish(
                    format!("$KV.{JOBS_BUCKET}.{key}"),
                    PublishMessage::build().payload(value).headers(headers),
                )
                .await
            {
                Ok(ack) => inflight.push(async move {
                    let acked = ack.await.map(|a| a.sequence).map_err(|e| e.to_string());
                    (i, key, update, version, acked)
                }),
                Err(e) => finish(
                    &mut results,
                    &mut retry,
                    &mut newest,
                    (i, key, update, version, Err(e.to_string())),
                ),
            }
        }
        while let Some(done) = inflight.next().await {
            finish(&mut results, &mut retry, &mut newest, done);
        }
        // Conflicts (a concurrent write, a key deleted before) go through the one-at-a-time
        // path, which reads the key and retries on a revision mismatch.
        retry.sort_unstable();
        for i in retry {
            results[i] = Some(self.write_one(&specs[i]).await?);
        }
        let results: Vec<ApplyResult> = results.into_iter().flatten().collect();
        // (Jobs written alone were waited for by `write_job`.)
        if newest > 0 && !self.table.wait_seen(newest, READ_YOUR_WRITES).await {
            tracing::warn!(revision = newest, "job table did not show an apply in time");
        }
        let count = |o: ApplyOutcome| results.iter().filter(|r| r.outcome == o).count();
        tracing::info!(
            created = count(ApplyOutcome::Created),
            updated = count(ApplyOutcome::Updated),
            unchanged = count(ApplyOutcome::Unchanged),
            "jobs applied"
        );
        Ok(results)
    }

    /// Writes one spec through the revision-checked path, its secret placeholders resolved
    /// (and its `at` checked) again against the revision it replaces.
    async fn write_one(&self, p: &Prepared) -> Result<ApplyResult, Failure> {
        let key = p.key.clone();
        let index = p.index;
        let now = Utc::now();
        self.write_job(&key, |current| {
            prepare(&p.spec, current.map(|s| &s.spec), now).map_err(|e| {
                Failure(ApiError {
                    code: ErrorCode::InvalidJob,
                    message: format!(
                        "job {key} changed while being applied and document {index} no longer fits it; other documents of this request may have been applied: apply them again to see"
                    ),
                    invalid: vec![InvalidDocument {
                        index,
                        job: e.job,
                        problems: e.problems,
                    }],
                })
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(name: &str, children: &[&str]) -> Value {
        json!({"appName": "a", "jobGroup": "g", "jobName": name, "path": "p", "childJobs": children})
    }

    /// Each document parsed, validated and summarized.
    fn summaries(docs: &[Value], max_payload: usize) -> Vec<Result<Summary, InvalidJob>> {
        docs.iter()
            .map(|d| {
                Ok(Summary::of(
                    &parse_job(d)?,
                    d.to_string().len(),
                    max_payload,
                ))
            })
            .collect()
    }

    fn check(
        docs: &[Value],
        existing: &[(&str, &[&str])],
    ) -> (Vec<(usize, Summary)>, Vec<InvalidDocument>) {
        let existing: HashMap<String, Vec<String>> = existing
            .iter()
            .map(|(k, c)| (k.to_string(), c.iter().map(|s| s.to_string()).collect()))
            .collect();
        check_documents(summaries(docs, 1 << 20), 1 << 20, |k| {
            existing.get(k).cloned()
        })
    }

    #[test]
    fn documents_are_checked_together() {
        let docs = [
            doc("a", &["b"]),
            doc("b", &["g.a"]),
            doc("c", &["nowhere"]),
            doc("d", &["e"]),
            doc("d", &[]),
            json!({"appName": "a", "jobName": "x", "path": "p", "cron": "61 * * * * ?"}),
        ];
        let (specs, invalid) = check(&docs, &[("g.e", &[])]);
        assert_eq!(specs.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [3]);
        let problems: Vec<(usize, String)> = invalid
            .iter()
            .flat_map(|d| d.problems.iter().map(move |p| (d.index, p.to_string())))
            .collect();
        assert_eq!(
            problems[0],
            (
                0,
                "childJobs: child jobs form a cycle: g.a → g.b → g.a".into()
            )
        );
        assert_eq!(
            problems[1],
            (
                1,
                "childJobs: child jobs form a cycle: g.b → g.a → g.b".into()
            )
        );
        assert!(
            problems[2].1.starts_with("childJobs: no job `g.nowhere`"),
            "{problems:?}"
        );
        assert_eq!(
            problems[3],
            (4, "defines the same job as document 3".into())
        );
        assert!(
            problems[4].1.starts_with("cron: invalid cron expression"),
            "{problems:?}"
        );
        // A cycle through an existing job is found too.
        let (_, invalid) = check(&[doc("a", &["e"])], &[("g.e", &["g.a"])]);
        assert_eq!(
            invalid[0].problems[0].message,
            "child jobs form a cycle: g.a → g.e → g.a"
        );
    }

    #[test]
    fn a_definition_too_large_for_a_message_is_named() {
        let big =
            json!({"appName": "a", "jobName": "big", "path": "p", "args": "x".repeat(30_000)});
        let (specs, invalid) = check_documents(summaries(&[big], 16 * 1024), 16 * 1024, |_| None);
        assert!(specs.is_empty());
        assert_eq!(invalid[0].job.as_deref(), Some("default.big"));
        let msg = &invalid[0].problems[0].message;
        assert!(msg.starts_with("the definition is 30"), "{msg}");
        assert!(msg.contains("raise max_payload"), "{msg}");
    }

    #[test]
    fn children_come_first_and_file_order_is_kept_otherwise() {
        let docs = [
            doc("p", &["c1", "c2"]),
            doc("x", &[]),
            doc("c2", &["c1"]),
            doc("c1", &[]),
        ];
        let (specs, invalid) = check(&docs, &[]);
        assert!(invalid.is_empty());
        let order: Vec<String> = children_first(&specs)
            .into_iter()
            .map(|i| specs[i].1.key.clone())
            .collect();
        assert_eq!(order, ["g.c1", "g.c2", "g.p", "g.x"]);
    }

    #[test]
    fn requests_are_split_by_count_body_and_reply() {
        let sizes = vec![(100, 60); 10];
        assert_eq!(split_requests(&sizes, 1 << 20, 4), vec![0..4, 4..8, 8..10]);
        // A budget of exactly three bodies.
        let budget = REQUEST_OVERHEAD + 3 * 101;
        let ranges = split_requests(&sizes, budget + super::super::page::ENVELOPE_MARGIN, 1000);
        assert_eq!(ranges, vec![0..3, 3..6, 6..9, 9..10]);
        // Replies bigger than bodies (tiny documents) bound the request too.
        let tiny = vec![(40, 200); 100];
        let ranges = split_requests(&tiny, 2048 + 1024, 1000);
        assert!(
            ranges
                .iter()
                .all(|r| REPLY_OVERHEAD + r.len() * 200 <= 2048),
            "{ranges:?}"
        );
        assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), 100);
        // One oversized document still gets a request of its own.
        let ranges = split_requests(&[(10, 60), (5000, 60), (10, 60)], 2048 + 1024, 1000);
        assert_eq!(ranges, vec![0..1, 1..2, 2..3]);
    }
}
