//! `krest job apply -f FILE…` with any number of documents.
//!
//! Every document is parsed and validated here first, together (duplicates, child jobs that
//! must exist — asked of the nodes — and cycles, sizes that fit in a NATS message): if any is
//! invalid, the whole set is rejected with each document's problems and nothing is sent. Then
//! the documents go out in requests that fit in the server's `max_payload` (body and reply),
//! children before their parents so a node always finds a job's children in its table or in
//! the same request. Each document's outcome is printed; the exit code is 1 if any was not
//! applied.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use futures_util::stream::{FuturesOrdered, StreamExt};
use krest_schemas::api::{
    ApiError, ApplyRequest, ApplyResponse, ApplyResult, ErrorCode, InvalidDocument, JobRequest,
    JobView, Op,
};
use krest_schemas::Problem;
use serde::Serialize;

use super::client::{Client, ClientError};
use super::render::{esc, print_json};
use crate::serve::apply::{
    check_documents, children_first, external_children, parse_documents, result_bytes,
    split_requests, MAX_DOCUMENTS_PER_REQUEST,
};

/// Existing jobs asked about at most (children of the file's jobs, and theirs).
const MAX_LOOKUPS: usize = 10_000;

/// Reads job documents from files: each file holds one definition or an array of them. Files
/// are parsed strictly (a UTF-8 BOM is skipped; a key given twice in an object is an error with
/// its line and column). A job view as `krest job get|list -o json` prints it (`{"key", "spec",
/// …}`) stands for its `spec`, so saved views apply back (with their redacted secrets kept).
fn read_documents(files: &[PathBuf]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
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
        let v = krest_schemas::json::parse(&bytes)
            .with_context(|| format!("{} is not valid JSON", f.display()))?;
        match v {
            serde_json::Value::Array(items) => docs.extend(items.into_iter().map(unview)),
            other => docs.push(unview(other)),
        }
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
    file: &HashSet<String>,
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
                queue.extend(children.iter().filter(|c| !file.contains(*c)).cloned());
                known.insert(key, children);
            }
            Err(ClientError::Api(e)) if e.code == ErrorCode::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(known)
}

/// What `-o json` prints: the applied documents' results in file order, and the others.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Outcomes<'a> {
    results: Vec<&'a ApplyResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    failed: Vec<&'a InvalidDocument>,
}

/// Requests a CLI keeps in flight while applying (each answered as its node writes it).
const IN_FLIGHT: usize = 3;

/// What became of one document: its result, or its problems.
type Outcome = (usize, Result<ApplyResult, Vec<Problem>>);

/// Sends one request of documents (`batch`: their positions in `documents`). A node may
/// still reject some (a child deleted meanwhile, a cycle through jobs changed meanwhile): the
/// others are sent again without them.
async fn send(
    client: &Client,
    documents: &[serde_json::Value],
    mut batch: Vec<usize>,
) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(batch.len());
    while !batch.is_empty() {
        let req = ApplyRequest {
            documents: batch.iter().map(|i| documents[*i].clone()).collect(),
        };
        let problem = |message: String| {
            vec![Problem {
                field: String::new(),
                message,
            }]
        };
        match client.call::<_, ApplyResponse>(Op::JobApply, &req).await {
            Ok(resp) if resp.results.len() == batch.len() => {
                out.extend(batch.into_iter().zip(resp.results.into_iter().map(Ok)));
                break;
            }
            Ok(resp) => {
                let message = format!(
                    "the node answered {} results for {} documents; check with `krest job get`",
                    resp.results.len(),
                    batch.len()
                );
                out.extend(
                    batch
                        .into_iter()
                        .map(|i| (i, Err(problem(message.clone())))),
                );
                break;
            }
            Err(ClientError::Api(e))
                if e.code == ErrorCode::InvalidJob && !e.invalid.is_empty() =>
            {
                let mut rejected = HashSet::new();
                for d in e.invalid {
                    if let Some(&i) = batch.get(d.index) {
                        rejected.insert(i);
                        out.push((i, Err(d.problems)));
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
                out.extend(
                    batch
                        .into_iter()
                        .map(|i| (i, Err(problem(message.clone())))),
                );
                break;
            }
        }
    }
    out
}

fn record(
    outcomes: &mut [Option<Result<ApplyResult, InvalidDocument>>],
    keys: &HashMap<usize, String>,
    done: Vec<Outcome>,
) {
    for (index, outcome) in done {
        outcomes[index] = Some(outcome.map_err(|problems| InvalidDocument {
            index,
            job: keys.get(&index).cloned(),
            problems,
        }));
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
    let documents = read_documents(files)?;
    if documents.is_empty() {
        anyhow::bail!("no job definitions in the given files");
    }
    let max_payload = client.max_payload();
    let sizes: Vec<usize> = documents
        .iter()
        .map(|d| serde_json::to_vec(d).map_or(usize::MAX, |v| v.len()))
        .collect();
    let parsed = parse_documents(&documents);
    let valid: Vec<(usize, krest_schemas::JobSpec)> = parsed
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|s| (i, s.clone())))
        .collect();
    let file: HashSet<String> = valid.iter().map(|(_, s)| s.key()).collect();
    let existing = existing_jobs(client, external_children(&valid), &file).await?;
    drop(valid);
    let (specs, invalid) = check_documents(parsed, &sizes, max_payload, |key| {
        existing.get(key).cloned()
    });
    if !invalid.is_empty() {
        return Err(ClientError::Api(ApiError {
            code: ErrorCode::InvalidJob,
            message: format!(
                "{} of {} definitions are invalid; nothing was applied",
                invalid.len(),
                documents.len()
            ),
            invalid,
        })
        .into());
    }
    if dry_run {
        return self::dry_run(client, &specs, json).await;
    }

    let apps: Vec<(String, String)> = specs
        .iter()
        .filter(|(_, s)| s.running)
        .map(|(_, s)| (s.app_name.clone(), s.key()))
        .collect();

    // Children first, then split by size.
    let order: Vec<(usize, String, Vec<String>)> = children_first(&specs)
        .into_iter()
        .map(|p| (specs[p].0, specs[p].1.key(), specs[p].1.child_keys()))
        .collect();
    drop(specs);
    let request_sizes: Vec<(usize, usize)> = order
        .iter()
        .map(|(i, key, _)| (sizes[*i], result_bytes(key)))
        .collect();
    let ranges = split_requests(&request_sizes, max_payload, MAX_DOCUMENTS_PER_REQUEST);
    // A request whose documents have children in an earlier request waits for that one (and
    // all before it) to be answered; the others go out while earlier ones are in flight.
    let batch_of: HashMap<&str, usize> = ranges
        .iter()
        .enumerate()
        .flat_map(|(b, r)| {
            order[r.clone()]
                .iter()
                .map(move |(_, k, _)| (k.as_str(), b))
        })
        .collect();
    let keys: HashMap<usize, String> = order.iter().map(|(i, k, _)| (*i, k.clone())).collect();
    let mut outcomes: Vec<Option<Result<ApplyResult, InvalidDocument>>> =
        (0..documents.len()).map(|_| None).collect();
    let mut inflight = FuturesOrdered::new();
    for (b, range) in ranges.iter().enumerate() {
        let waits = order[range.clone()].iter().any(|(_, _, children)| {
            children
                .iter()
                .any(|c| batch_of.get(c.as_str()).is_some_and(|cb| *cb < b))
        });
        while !inflight.is_empty() && (waits || inflight.len() >= IN_FLIGHT) {
            if let Some(done) = inflight.next().await {
                record(&mut outcomes, &keys, done);
            }
        }
        let batch: Vec<usize> = order[range.clone()].iter().map(|(i, _, _)| *i).collect();
        inflight.push_back(send(client, &documents, batch));
    }
    while let Some(done) = inflight.next().await {
        record(&mut outcomes, &keys, done);
    }

    let applied: Vec<&ApplyResult> = outcomes
        .iter()
        .flatten()
        .filter_map(|o| o.as_ref().ok())
        .collect();
    let not_applied: Vec<&InvalidDocument> = outcomes
        .iter()
        .flatten()
        .filter_map(|o| o.as_ref().err())
        .collect();
    if json {
        print_json(&Outcomes {
            results: applied,
            failed: not_applied.clone(),
        })?;
    } else {
        for r in &applied {
            outln!(
                "{} {} (revision {})",
                r.job,
                format!("{:?}", r.outcome).to_lowercase(),
                r.revision
            );
        }
    }
    super::warn_without_workers(client, apps).await;
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
        "error: {} of {} documents were not applied",
        not_applied.len(),
        documents.len()
    );
    Ok(ExitCode::FAILURE)
}
