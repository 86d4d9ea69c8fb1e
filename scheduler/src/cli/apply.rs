//! `krest job apply -f FILE…` with any number of documents.
//!
//! Every document is parsed and validated here first, together (duplicates, child jobs that
//! must exist — asked of the nodes — and cycles, sizes that fit in a NATS message): if any is
//! invalid, the whole set is rejected with each document's problems and nothing is sent. Then
//! the documents go out in requests that fit in the server's `max_payload` (body and reply),
//! children before their parents so a node always finds a job's children in its table or in
//! the same request. Each document's outcome is printed; the exit code is 1 if any was not
//! applied.
//!
//! A file's documents are parsed one at a time and kept only as what is sent (compact JSON)
//! and what the checks need ([`Summary`]): a file of a million jobs is held in about as many
//! bytes as it has, not as a tree of values fifteen times that.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use futures_util::stream::{FuturesOrdered, StreamExt};
use krest_schemas::api::{
    ApiError, ApplyOutcome, ApplyResponse, ApplyResult, ErrorCode, InvalidDocument, JobRequest,
    JobView, Op,
};
use krest_schemas::{parse_job, InvalidJob, Problem};
use serde::ser::{SerializeStruct as _, Serializer};
use serde::Serialize;

use super::client::{Client, ClientError};
use super::render::{esc, print_json};
use crate::serve::apply::{
    check_documents, children_first, external_children, positions_by_key, result_bytes,
    split_requests, Summary, MAX_DOCUMENTS_PER_REQUEST,
};

/// Existing jobs asked about at most (children of the file's jobs, and theirs).
const MAX_LOOKUPS: usize = 10_000;

/// The documents of the files applied, in order.
#[derive(Default)]
struct Documents {
    /// Every document as it is sent, compact JSON (a view's `spec`), one after the other.
    json: Vec<u8>,
    /// Where each document ends in `json`.
    ends: Vec<usize>,
    /// What the checks need of each, or why it is invalid on its own.
    checked: Vec<Result<Summary, InvalidJob>>,
    /// Each app of a running job, with the last such job (for the warning when no worker of
    /// an app runs).
    apps: BTreeMap<String, String>,
}

impl Documents {
    /// Takes one document: parses and validates it, keeps what is sent and checked.
    fn push(&mut self, doc: serde_json::Value, max_payload: usize) {
        let doc = unview(doc);
        let start = self.json.len();
        let checked = match serde_json::to_writer(&mut self.json, &doc) {
            Ok(()) => parse_job(&doc).map(|spec| {
                if spec.running {
                    self.apps.insert(spec.app_name.to_string(), spec.key());
                }
                Summary::of(&spec, self.json.len() - start, max_payload)
            }),
            Err(e) => {
                self.json.truncate(start);
                Err(InvalidJob {
                    job: None,
                    problems: vec![Problem {
                        field: String::new(),
                        message: format!("cannot be encoded as JSON: {e}"),
                    }],
                })
            }
        };
        self.ends.push(self.json.len());
        self.checked.push(checked);
    }

    /// How many documents there are.
    fn len(&self) -> usize {
        self.ends.len()
    }

    /// Document `i` as JSON.
    fn get(&self, i: usize) -> &[u8] {
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p]);
        &self.json[start..self.ends[i]]
    }

    /// The body of a `job.apply` request of documents `batch` (an [`ApplyRequest`]).
    fn request(&self, batch: &[usize]) -> Vec<u8> {
        let size: usize = batch.iter().map(|i| self.get(*i).len() + 1).sum();
        let mut body = Vec::with_capacity(size + 16);
        body.extend_from_slice(b"{\"documents\":[");
        for (n, i) in batch.iter().enumerate() {
            if n > 0 {
                body.push(b',');
            }
            body.extend_from_slice(self.get(*i));
        }
        body.extend_from_slice(b"]}");
        body
    }
}

/// Reads job documents from files: each file holds one definition or an array of them. Files
/// are parsed strictly (a UTF-8 BOM is skipped; a key given twice in an object is an error with
/// its line and column). A job view as `krest job get|list -o json` prints it (`{"key", "spec",
/// …}`) stands for its `spec`, so saved views apply back (with their redacted secrets kept).
fn read_documents(files: &[PathBuf], max_payload: usize) -> anyhow::Result<Documents> {
    let mut docs = Documents::default();
    for f in files {
        let bytes = if f.as_os_str() == "-" {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("cannot read stdin")?;
            b
        } else {
            std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?
        };
        krest_schemas::json::parse_each(&bytes, |doc| docs.push(doc, max_payload))
            .with_context(|| format!("{} is not valid JSON", f.display()))?;
    }
    Ok(docs)
}

/// The definition inside a job view (`{"key": …, "spec": {…}, "revision": …}`), else `doc`.
fn unview(doc: serde_json::Value) -> serde_json::Value {
    match doc {
        serde_json::Value::Object(mut m)
            if m.contains_key("key") && m.get("spec").is_some_and(|s| s.is_object()) =>
        {
            m.remove("spec").unwrap_or_default()
        }
        other => other,
    }
}

/// The children (child keys) of existing jobs, starting from `keys` and following their
/// children outside the file (`file`), so cycles through existing jobs are found too.
async fn existing_jobs(
    client: &Client,
    keys: BTreeSet<String>,
    file: &HashSet<&str>,
) -> Result<HashMap<String, Vec<String>>, ClientError> {
    let mut known = HashMap::new();
    let mut asked = HashSet::new();
    let mut queue: VecDeque<String> = keys.into_iter().collect();
    while let Some(key) = queue.pop_front() {
        if asked.len() >= MAX_LOOKUPS || !asked.insert(key.clone()) {
            continue;
        }
        match client
            .call::<_, JobView>(Op::JobGet, &JobRequest::new(key.clone()))
            .await
        {
            Ok(view) => {
                let children = view.spec.child_keys();
                queue.extend(
                    children
                        .iter()
                        .filter(|c| !file.contains(c.as_str()))
                        .cloned(),
                );
                known.insert(key, children);
            }
            Err(ClientError::Api(e)) if e.code == ErrorCode::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(known)
}

/// Requests a CLI keeps in flight while applying (each answered as its node writes it).
const IN_FLIGHT: usize = 3;

/// What became of one document: what the node did with its job (its key is the document's),
/// or why it was not applied.
enum Done {
    Applied(ApplyOutcome, u64),
    Failed(Vec<Problem>),
}

/// Sends one request of documents (`batch`: their indexes in `documents`). A node may
/// still reject some (a child deleted meanwhile, a cycle through jobs changed meanwhile): the
/// others are sent again without them.
async fn send(client: &Client, documents: &Documents, mut batch: Vec<usize>) -> Vec<(usize, Done)> {
    let mut out = Vec::with_capacity(batch.len());
    let failed = |message: &str| {
        Done::Failed(vec![Problem {
            field: String::new(),
            message: message.to_string(),
        }])
    };
    while !batch.is_empty() {
        match client
            .call_json::<ApplyResponse>(Op::JobApply, documents.request(&batch))
            .await
        {
            Ok(resp) if resp.results.len() == batch.len() => {
                out.extend(
                    batch.into_iter().zip(
                        resp.results
                            .into_iter()
                            .map(|r| Done::Applied(r.outcome, r.revision)),
                    ),
                );
                break;
            }
            Ok(resp) => {
                let message = format!(
                    "the node answered {} results for {} documents; check with `krest job get`",
                    resp.results.len(),
                    batch.len()
                );
                out.extend(batch.into_iter().map(|i| (i, failed(&message))));
                break;
            }
            Err(ClientError::Api(e))
                if e.code == ErrorCode::InvalidJob && !e.invalid.is_empty() =>
            {
                let mut rejected = HashSet::new();
                for d in e.invalid {
                    if let Some(&i) = batch.get(d.index) {
                        rejected.insert(i);
                        out.push((i, Done::Failed(d.problems)));
                    }
                }
                if rejected.is_empty() {
                    break;
                }
                batch.retain(|i| !rejected.contains(i));
            }
            Err(e) => {
                let message = format!(
                    "{e} (its request may or may not have been applied: run the apply again)"
                );
                out.extend(batch.into_iter().map(|i| (i, failed(&message))));
                break;
            }
        }
    }
    out
}

/// What `-o json` prints: the applied documents' results in file order, and the others
/// (`failed`, left out when there are none). Written as it is serialized: a result is made
/// for each document only when it is printed.
struct Outcomes<'a> {
    /// The documents sent, with their index.
    specs: &'a [(usize, Summary)],
    /// What became of each, by document index.
    done: &'a [Option<Done>],
}

impl Outcomes<'_> {
    /// Each document's index, key and outcome, in file order.
    fn each(&self) -> impl Iterator<Item = (usize, &str, &Done)> + '_ {
        self.specs
            .iter()
            .filter_map(|(i, s)| Some((*i, s.key.as_str(), self.done.get(*i)?.as_ref()?)))
    }

    fn applied(&self) -> impl Iterator<Item = ApplyResult> + '_ {
        self.each().filter_map(|(_, key, d)| match d {
            Done::Applied(outcome, revision) => Some(ApplyResult {
                job: key.to_string(),
                outcome: *outcome,
                revision: *revision,
            }),
            Done::Failed(_) => None,
        })
    }

    fn failed(&self) -> impl Iterator<Item = InvalidDocument> + '_ {
        self.each().filter_map(|(index, key, d)| match d {
            Done::Failed(problems) => Some(InvalidDocument {
                index,
                job: Some(key.to_string()),
                problems: problems.clone(),
            }),
            Done::Applied(..) => None,
        })
    }
}

impl Serialize for Outcomes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// A sequence serialized from an iterator made anew.
        struct Seq<F>(F);
        impl<I: Iterator<Item = T>, T: Serialize, F: Fn() -> I> Serialize for Seq<F> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq((self.0)())
            }
        }
        let any_failed = self.failed().next().is_some();
        let mut out = serializer.serialize_struct("Outcomes", 1 + usize::from(any_failed))?;
        out.serialize_field("results", &Seq(|| self.applied()))?;
        if any_failed {
            out.serialize_field("failed", &Seq(|| self.failed()))?;
        } else {
            out.skip_field("failed")?;
        }
        out.end()
    }
}

/// What a document would do to its job (`job apply --dry-run`).
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Planned {
    job: String,
    /// `create`, `update` or `unchanged`.
    action: &'static str,
    /// For an update: the fields that change, with their values before and after (secrets
    /// redacted on both sides).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    changes: Vec<FieldChange>,
}

/// One top-level field of a definition that an apply changes.
#[derive(Debug, Serialize, PartialEq)]
struct FieldChange {
    field: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    before: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<serde_json::Value>,
}

/// The top-level fields in which two definitions (as JSON objects) differ, in field order.
fn field_changes(before: &serde_json::Value, after: &serde_json::Value) -> Vec<FieldChange> {
    let empty = serde_json::Map::new();
    let b = before.as_object().unwrap_or(&empty);
    let a = after.as_object().unwrap_or(&empty);
    let fields: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
    fields
        .into_iter()
        .filter(|f| b.get(*f) != a.get(*f))
        .map(|f| FieldChange {
            field: f.clone(),
            before: b.get(f).cloned(),
            after: a.get(f).cloned(),
        })
        .collect()
}

/// Jobs asked one by one up to this many; more are read with one listing.
const DRY_RUN_LOOKUPS: usize = 200;

/// The current (redacted) definitions of `keys`, where they exist.
async fn current_specs(
    client: &Client,
    keys: &[String],
) -> Result<HashMap<String, krest_schemas::JobSpec>, ClientError> {
    if keys.len() > DRY_RUN_LOOKUPS {
        let all: Vec<JobView> = client
            .fetch_all(
                Op::JobList,
                |cursor, _| krest_schemas::api::JobListRequest {
                    cursor,
                    ..Default::default()
                },
                None,
            )
            .await?;
        let wanted: HashSet<&String> = keys.iter().collect();
        return Ok(all
            .into_iter()
            .filter(|v| wanted.contains(&v.key))
            .map(|v| (v.key, v.spec))
            .collect());
    }
    let mut out = HashMap::new();
    for key in keys {
        match client
            .call::<_, JobView>(Op::JobGet, &JobRequest::new(key.clone()))
            .await
        {
            Ok(view) => {
                out.insert(view.key, view.spec);
            }
            Err(ClientError::Api(e)) if e.code == ErrorCode::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// `--dry-run`: prints what applying `specs` would do, changing nothing.
async fn dry_run(
    client: &Client,
    specs: &[(usize, krest_schemas::JobSpec)],
    json: bool,
) -> anyhow::Result<ExitCode> {
    let keys: Vec<String> = specs.iter().map(|(_, s)| s.key()).collect();
    let current = current_specs(client, &keys).await?;
    let mut planned: Vec<(usize, Planned)> = specs
        .iter()
        .map(|(i, spec)| {
            let key = spec.key();
            let after = serde_json::to_value(spec.redacted()).unwrap_or_default();
            let p = match current.get(&key) {
                None => Planned {
                    job: key,
                    action: "create",
                    changes: Vec::new(),
                },
                Some(stored) => {
                    let before = serde_json::to_value(stored).unwrap_or_default();
                    let changes = field_changes(&before, &after);
                    Planned {
                        job: key,
                        action: if changes.is_empty() {
                            "unchanged"
                        } else {
                            "update"
                        },
                        changes,
                    }
                }
            };
            (*i, p)
        })
        .collect();
    planned.sort_by_key(|(i, _)| *i);
    let planned: Vec<Planned> = planned.into_iter().map(|(_, p)| p).collect();
    if json {
        print_json(&planned)?;
    } else {
        let compact = |v: &Option<serde_json::Value>| {
            v.as_ref().map_or_else(String::new, |v| {
                super::render::cut(&serde_json::to_string(v).unwrap_or_default(), 200)
            })
        };
        for p in &planned {
            outln!(
                "{} would be {}",
                esc(&p.job),
                match p.action {
                    "create" => "created",
                    "update" => "updated:",
                    _ => "unchanged",
                }
            );
            for c in &p.changes {
                if c.before.is_some() {
                    outln!("  - {}: {}", c.field, esc(&compact(&c.before)));
                }
                if c.after.is_some() {
                    outln!("  + {}: {}", c.field, esc(&compact(&c.after)));
                }
            }
        }
    }
    eprintln!("dry run: nothing was applied");
    Ok(ExitCode::SUCCESS)
}

/// `krest job apply`: every document of `files` checked, then applied (or, with `dry_run`,
/// compared with what is stored).
pub(crate) async fn apply(
    client: &Client,
    files: &[PathBuf],
    json: bool,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let max_payload = client.max_payload();
    let mut documents = read_documents(files, max_payload)?;
    if documents.len() == 0 {
        anyhow::bail!("no job definitions in the given files");
    }
    let total = documents.len();
    let checked = std::mem::take(&mut documents.checked);
    let external = external_children(&checked);
    let existing = if external.is_empty() {
        HashMap::new()
    } else {
        let file: HashSet<&str> = checked.iter().flatten().map(|s| s.key.as_str()).collect();
        existing_jobs(client, external, &file).await?
    };
    let (specs, invalid) = check_documents(checked, max_payload, |key| existing.get(key).cloned());
    if !invalid.is_empty() {
        return Err(ClientError::Api(ApiError {
            code: ErrorCode::InvalidJob,
            message: format!(
                "{} of {total} definitions are invalid; nothing was applied",
                invalid.len(),
            ),
            invalid,
        })
        .into());
    }
    if dry_run {
        let specs = specs
            .iter()
            .map(|(i, _)| {
                let doc = serde_json::from_slice(documents.get(*i))?;
                Ok((*i, parse_job(&doc)?))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        return self::dry_run(client, &specs, json).await;
    }

    // Children first, then split by size.
    let order = children_first(&specs);
    let request_sizes: Vec<(usize, usize)> = order
        .iter()
        .map(|p| {
            let (i, s) = &specs[*p];
            (documents.get(*i).len(), result_bytes(&s.key))
        })
        .collect();
    let ranges = split_requests(&request_sizes, max_payload, MAX_DOCUMENTS_PER_REQUEST);
    drop(request_sizes);
    // A request whose documents have children in an earlier request waits for that one (and
    // all before it) to be answered; the others go out while earlier ones are in flight.
    let mut batch_of = vec![0; specs.len()];
    for (b, range) in ranges.iter().enumerate() {
        for p in &order[range.clone()] {
            batch_of[*p] = b;
        }
    }
    let position = positions_by_key(&specs);
    // Outcomes by document index.
    let mut done: Vec<Option<Done>> = (0..total).map(|_| None).collect();
    let mut record = |finished: Vec<(usize, Done)>| {
        for (i, d) in finished {
            if let Some(slot) = done.get_mut(i) {
                *slot = Some(d);
            }
        }
    };
    let mut inflight = FuturesOrdered::new();
    for (b, range) in ranges.iter().enumerate() {
        let waits = order[range.clone()].iter().any(|p| {
            specs[*p]
                .1
                .children
                .iter()
                .any(|c| position.get(c.as_str()).is_some_and(|cp| batch_of[*cp] < b))
        });
        while !inflight.is_empty() && (waits || inflight.len() >= IN_FLIGHT) {
            if let Some(finished) = inflight.next().await {
                record(finished);
            }
        }
        let batch: Vec<usize> = order[range.clone()].iter().map(|p| specs[*p].0).collect();
        inflight.push_back(send(client, &documents, batch));
    }
    while let Some(finished) = inflight.next().await {
        record(finished);
    }
    drop(inflight);
    drop(documents.json);

    let outcomes = Outcomes {
        specs: &specs,
        done: &done,
    };
    if json {
        print_json(&outcomes)?;
    } else {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for r in outcomes.applied() {
            writeln!(
                out,
                "{} {} (revision {})",
                r.job,
                format!("{:?}", r.outcome).to_lowercase(),
                r.revision
            )?;
        }
        out.flush()?;
    }
    super::warn_without_workers(client, documents.apps).await;
    let not_applied: Vec<InvalidDocument> = outcomes.failed().collect();
    if not_applied.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for doc in &not_applied {
        eprintln!(
            "error: document {} ({}) was not applied:",
            doc.index,
            esc(doc.job.as_deref().unwrap_or("?"))
        );
        for p in &doc.problems {
            eprintln!("    - {}", esc(&p.to_string()));
        }
    }
    eprintln!(
        "error: {} of {total} documents were not applied",
        not_applied.len(),
    );
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use krest_schemas::api::ApplyRequest;
    use serde_json::json;

    fn read(text: &str) -> anyhow::Result<Documents> {
        let mut docs = Documents::default();
        krest_schemas::json::parse_each(text.as_bytes(), |d| docs.push(d, 1 << 20))?;
        Ok(docs)
    }

    #[test]
    fn documents_are_kept_as_sent_and_a_request_is_an_apply_request() {
        let text = r#"[
            {"appName": "a", "jobName": "x", "path": "p", "args": {"k": [1, 2.5, "é\n"]}},
            {"key": "g.y", "revision": 3, "spec": {"appName": "b", "jobGroup": "g", "jobName": "y", "path": "p", "running": false}},
            {"appName": "a", "jobName": "bad", "path": "p", "cron": "61 * * * * ?"}
        ]"#;
        let docs = read(text).unwrap();
        assert_eq!(docs.len(), 3);
        let values: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
        // A view stands for its spec; each is kept as compact JSON.
        let sent = [
            values[0].clone(),
            values[1]["spec"].clone(),
            values[2].clone(),
        ];
        for (i, v) in sent.iter().enumerate() {
            assert_eq!(docs.get(i), serde_json::to_vec(v).unwrap().as_slice());
        }
        assert_eq!(
            docs.request(&[2, 0]),
            serde_json::to_vec(&ApplyRequest {
                documents: vec![sent[2].clone(), sent[0].clone()],
            })
            .unwrap()
        );
        let keys: Vec<Option<&str>> = docs
            .checked
            .iter()
            .map(|c| c.as_ref().ok().map(|s| s.key.as_str()))
            .collect();
        assert_eq!(keys, [Some("default.x"), Some("g.y"), None]);
        assert_eq!(
            docs.checked[0].as_ref().unwrap().size,
            docs.get(0).len(),
            "sizes are those of what is sent"
        );
        // Only running jobs' apps are noted for the warning.
        assert_eq!(
            docs.apps.into_iter().collect::<Vec<_>>(),
            [("a".to_string(), "default.x".to_string())]
        );
    }

    #[test]
    fn outcomes_print_as_results_in_file_order_then_failures() {
        let summary = |key: &str| Summary {
            key: key.into(),
            children: Vec::new(),
            size: 10,
        };
        let specs = [
            (0, summary("g.a")),
            (1, summary("g.b")),
            (2, summary("g.c")),
        ];
        let done = [
            Some(Done::Applied(ApplyOutcome::Created, 1)),
            Some(Done::Failed(vec![Problem {
                field: String::new(),
                message: "gone".into(),
            }])),
            Some(Done::Applied(ApplyOutcome::Unchanged, 4)),
        ];
        let out = serde_json::to_value(Outcomes {
            specs: &specs,
            done: &done,
        })
        .unwrap();
        assert_eq!(
            out,
            json!({
                "results": [
                    {"job": "g.a", "outcome": "CREATED", "revision": 1},
                    {"job": "g.c", "outcome": "UNCHANGED", "revision": 4}
                ],
                "failed": [{"index": 1, "job": "g.b", "problems": [{"field": "", "message": "gone"}]}]
            })
        );
        let done = [None, None, Some(Done::Applied(ApplyOutcome::Updated, 2))];
        let out = serde_json::to_value(Outcomes {
            specs: &specs,
            done: &done,
        })
        .unwrap();
        assert_eq!(
            out,
            json!({"results": [{"job": "g.c", "outcome": "UPDATED", "revision": 2}]})
        );
    }
}
