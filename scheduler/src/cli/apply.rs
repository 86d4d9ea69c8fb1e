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

pub(crate) async fn apply(
    client: &Client,
    files: &[PathBuf],
    json: bool,
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
