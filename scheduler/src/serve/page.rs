//! Replies that fit in one NATS message.
//!
//! nats-server's `max_payload` (1 MiB by default) bounds every request and reply. Every API
//! reply is built here: listings item by item with [`PageBuilder`], `runs.get` element by
//! element with [`RunPageBuilder`], each measuring the JSON as it is written and stopping
//! before the reply would pass the budget ([`result_budget`]: `max_payload` minus
//! [`ENVELOPE_MARGIN`]); the first item left out becomes the `next` cursor (pages restart at
//! their cursor, inclusive). [`guard`] is the last check on every reply: one that would still
//! be too large is replaced by a `too_large` error, so a client never waits for an answer that
//! cannot be sent.
//!
//! Text that can be as large as a whole message (outputs, errors, log lines, args) is capped
//! with [`cap_text`] and [`cap_args`] before it goes into a page, with a visible marker, so one
//! item always fits and paging always makes progress.

use krest_schemas::api::{ApiError, ApiReply, CatchingUp, ErrorCode};
use serde::Serialize;

/// Bytes of every reply kept for the envelope (`{"ok":true,"result":…,"next":…}`) around the
/// result, the cursor included (cursors are job keys, run ids and numbers: well under this).
pub const ENVELOPE_MARGIN: usize = 1024;

/// `max_payload` assumed when the server did not say (nats-server's default).
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// The bytes a reply's `result` may take when the server's `max_payload` is `max_payload`.
pub fn result_budget(max_payload: usize) -> usize {
    effective(max_payload).saturating_sub(ENVELOPE_MARGIN)
}

fn effective(max_payload: usize) -> usize {
    if max_payload == 0 {
        DEFAULT_MAX_PAYLOAD
    } else {
        max_payload
    }
}

/// Why a reply could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// One item is larger than a whole reply may be.
    #[error("{what} is {size} bytes as JSON, more than one API reply can carry ({budget} bytes with nats-server's max_payload of {max_payload}): raise max_payload in the nats-server configuration{hint}")]
    TooLarge {
        /// What the item is (`job t.big`).
        what: String,
        /// Its size.
        size: usize,
        /// The result budget.
        budget: usize,
        /// The server's limit.
        max_payload: usize,
        /// What else can be done, starting with `, or`.
        hint: String,
    },
    /// Serialization failed.
    #[error("cannot encode the reply: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A successful reply: the serialized `result`, and the cursor of the next page, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// `result` as JSON.
    pub result: Vec<u8>,
    /// The `next` cursor.
    pub next: Option<String>,
    /// Set on run queries answered while the node's database is behind the events stream.
    pub catching_up: Option<CatchingUp>,
}

impl Reply {
    /// A reply whose result is `value` (not paged).
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Reply, PageError> {
        Ok(Reply {
            result: serde_json::to_vec(value)?,
            next: None,
            catching_up: None,
        })
    }

    /// The message: `{"ok":true,"result":…,"next":…}`.
    pub fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.result.len() + 64);
        out.extend_from_slice(br#"{"ok":true,"result":"#);
        out.extend_from_slice(&self.result);
        if let Some(next) = &self.next {
            out.extend_from_slice(br#","next":"#);
            // A string always serializes.
            out.extend_from_slice(&serde_json::to_vec(next).unwrap_or_else(|_| b"null".to_vec()));
        }
        if let Some(c) = &self.catching_up {
            if let Ok(c) = serde_json::to_vec(c) {
                out.extend_from_slice(br#","catchingUp":"#);
                out.extend_from_slice(&c);
            }
        }
        out.push(b'}');
        out
    }
}

/// The message of an error reply.
pub fn error_bytes(error: ApiError) -> Vec<u8> {
    let reply = ApiReply {
        catching_up: None,
        ok: false,
        result: None,
        error: Some(error),
        next: None,
    };
    serde_json::to_vec(&reply).unwrap_or_else(|_| br#"{"ok":false}"#.to_vec())
}

/// The last check before a reply is sent: a message over `max_payload` cannot be published
/// (the client would only see a timeout), so it is replaced by a `too_large` error saying so.
pub fn guard(message: Vec<u8>, max_payload: usize, op: &str) -> Vec<u8> {
    let max = effective(max_payload);
    if message.len() <= max {
        return message;
    }
    tracing::warn!(
        op,
        bytes = message.len(),
        max_payload = max,
        "API reply too large for NATS; answering with an error"
    );
    error_bytes(ApiError {
        code: ErrorCode::TooLarge,
        message: format!(
            "the reply to {op} would be {} bytes, over nats-server's max_payload of {max}: ask for fewer items (a smaller limit) or raise max_payload in the nats-server configuration",
            message.len()
        ),
        invalid: Vec::new(),
    })
}

/// Cuts `text` to at most about `max` bytes (at a character boundary), saying how much was
/// left out. Returns whether it cut.
pub fn cap_text(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut end = max.saturating_sub(120).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let omitted = text.len() - end;
    text.truncate(end);
    text.push_str(&format!(
        "… [{omitted} more bytes not shown: too large for one API reply]"
    ));
    true
}

/// `args` when its JSON fits in `max` bytes, else a string saying it was left out.
pub fn cap_args(args: serde_json::Value, max: usize) -> serde_json::Value {
    let size = serde_json::to_vec(&args).map_or(usize::MAX, |v| v.len());
    if size <= max {
        args
    } else {
        serde_json::Value::String(format!(
            "[args not shown: {size} bytes, too large for one API reply]"
        ))
    }
}

/// Builds one page of a listing: a JSON array of items, bounded by a count and by bytes.
///
/// Offer items in order with [`push`](PageBuilder::push) until it returns `false` (the page is
/// full: that item is the first of the next page, its cursor is kept) or the items run out;
/// offer one more than `limit` so a full last page is recognized as the last.
#[derive(Debug)]
pub struct PageBuilder {
    buf: Vec<u8>,
    budget: usize,
    max_payload: usize,
    limit: usize,
    count: usize,
    next: Option<String>,
}

impl PageBuilder {
    /// A page of at most `limit` items (at least 1) in a reply under `max_payload`.
    pub fn new(limit: usize, max_payload: usize) -> PageBuilder {
        PageBuilder {
            buf: vec![b'['],
            budget: result_budget(max_payload),
            max_payload: effective(max_payload),
            limit: limit.max(1),
            count: 0,
            next: None,
        }
    }

    /// Items on the page so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the page has no item.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `item` if it fits; `cursor` names it as the start of the next page if it does
    /// not, `what` names it in the error if it cannot fit even alone (`hint`: what else the
    /// user can do, e.g. `, or delete the job`).
    pub fn push<T: Serialize>(
        &mut self,
        item: &T,
        cursor: impl FnOnce() -> String,
        what: impl FnOnce() -> (String, String),
    ) -> Result<bool, PageError> {
        if self.next.is_some() {
            return Ok(false);
        }
        if self.count >= self.limit {
            self.next = Some(cursor());
            return Ok(false);
        }
        let bytes = serde_json::to_vec(item)?;
        let separator = usize::from(self.count > 0);
        // `]` closes the array.
        if self.buf.len() + separator + bytes.len() + 1 > self.budget {
            if self.count == 0 {
                let (what, hint) = what();
                return Err(PageError::TooLarge {
                    what,
                    size: bytes.len(),
                    budget: self.budget,
                    max_payload: self.max_payload,
                    hint,
                });
            }
            self.next = Some(cursor());
            return Ok(false);
        }
        if separator == 1 {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(&bytes);
        self.count += 1;
        Ok(true)
    }

    /// The page, with the cursor of the first item left out (if one was).
    pub fn finish(mut self) -> Reply {
        self.buf.push(b']');
        Reply {
            catching_up: None,
            result: self.buf,
            next: self.next,
        }
    }
}

/// Room kept for the end of a `runs.get` page: `]}` of an open attempt, `]` of the attempts
/// and the `attemptsLeft`/`logsLeft` counters.
const RUN_PAGE_TAIL: usize = 96;

/// Builds one page of `runs.get`: `{"run":…,"args":…,"attempts":[{…,"logs":[…]},…]}`, the
/// attempts and log lines bounded together by a count and by bytes.
///
/// Attempts are opened with [`open_attempt`](RunPageBuilder::open_attempt), their lines added
/// with [`push_log`](RunPageBuilder::push_log); both return `false` once the page is full,
/// keeping the cursor they were given (the element left out starts the next page).
#[derive(Debug)]
pub struct RunPageBuilder {
    buf: Vec<u8>,
    budget: usize,
    max_payload: usize,
    limit: usize,
    count: usize,
    attempts: usize,
    open: Option<usize>,
    next: Option<String>,
}

impl RunPageBuilder {
    /// Starts a page with the run's summary and args (serialized as given).
    pub fn start<R: Serialize>(
        run: &R,
        args: Option<&serde_json::Value>,
        limit: usize,
        max_payload: usize,
    ) -> Result<RunPageBuilder, PageError> {
        let budget = result_budget(max_payload);
        let mut buf = br#"{"run":"#.to_vec();
        buf.extend_from_slice(&serde_json::to_vec(run)?);
        if let Some(args) = args {
            buf.extend_from_slice(br#","args":"#);
            buf.extend_from_slice(&serde_json::to_vec(args)?);
        }
        buf.extend_from_slice(br#","attempts":["#);
        if buf.len() + RUN_PAGE_TAIL > budget {
            return Err(PageError::TooLarge {
                what: "the run's summary and args".into(),
                size: buf.len(),
                budget,
                max_payload: effective(max_payload),
                hint: String::new(),
            });
        }
        Ok(RunPageBuilder {
            buf,
            budget,
            max_payload: effective(max_payload),
            limit: limit.max(1),
            count: 0,
            attempts: 0,
            open: None,
            next: None,
        })
    }

    fn fits(&self, more: usize) -> bool {
        self.buf.len() + more + RUN_PAGE_TAIL <= self.budget
    }

    fn refuse(&mut self, cursor: String) -> bool {
        self.next = Some(cursor);
        self.close_attempt();
        false
    }

    fn too_large(&self, what: String, size: usize) -> PageError {
        PageError::TooLarge {
            what,
            size,
            budget: self.budget,
            max_payload: self.max_payload,
            hint: String::new(),
        }
    }

    /// Opens `attempt` (its `logs` are ignored: add them with [`push_log`]); closes the open
    /// one. `cursor` starts the next page here if it does not fit.
    ///
    /// [`push_log`]: RunPageBuilder::push_log
    pub fn open_attempt<A: Serialize>(
        &mut self,
        attempt: &A,
        cursor: impl FnOnce() -> String,
    ) -> Result<bool, PageError> {
        if self.next.is_some() {
            return Ok(false);
        }
        self.close_attempt();
        if self.count >= self.limit {
            return Ok(self.refuse(cursor()));
        }
        let mut header = match serde_json::to_value(attempt)? {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        header.remove("logs");
        let mut bytes = serde_json::to_vec(&header)?;
        // `{…}` → `{…,"logs":[`
        bytes.pop();
        if !header.is_empty() {
            bytes.push(b',');
        }
        bytes.extend_from_slice(br#""logs":["#);
        let separator = usize::from(self.attempts > 0);
        if !self.fits(separator + bytes.len() + 2) {
            if self.count == 0 {
                return Err(self.too_large("an attempt".into(), bytes.len()));
            }
            return Ok(self.refuse(cursor()));
        }
        if separator == 1 {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(&bytes);
        self.attempts += 1;
        self.count += 1;
        self.open = Some(0);
        Ok(true)
    }

    /// Adds a log line to the open attempt. `cursor` starts the next page here if it does
    /// not fit.
    pub fn push_log<L: Serialize>(
        &mut self,
        line: &L,
        cursor: impl FnOnce() -> String,
    ) -> Result<bool, PageError> {
        if self.next.is_some() {
            return Ok(false);
        }
        let Some(lines) = self.open else {
            return Ok(false);
        };
        if self.count >= self.limit {
            return Ok(self.refuse(cursor()));
        }
        let bytes = serde_json::to_vec(line)?;
        let separator = usize::from(lines > 0);
        if !self.fits(separator + bytes.len() + 2) {
            if self.count <= 1 {
                return Err(self.too_large("a log line".into(), bytes.len()));
            }
            return Ok(self.refuse(cursor()));
        }
        if separator == 1 {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(&bytes);
        self.count += 1;
        self.open = Some(lines + 1);
        Ok(true)
    }

    fn close_attempt(&mut self) {
        if self.open.take().is_some() {
            self.buf.extend_from_slice(b"]}");
        }
    }

    /// Whether a push was refused (the page is full).
    pub fn is_full(&self) -> bool {
        self.next.is_some()
    }

    /// The cursor of the first element left out, if one was.
    pub fn next(&self) -> Option<&str> {
        self.next.as_deref()
    }

    /// The page, with what is left after it.
    pub fn finish(mut self, attempts_left: u64, logs_left: u64) -> Reply {
        self.close_attempt();
        self.buf.push(b']');
        if attempts_left > 0 {
            self.buf
                .extend_from_slice(format!(r#","attemptsLeft":{attempts_left}"#).as_bytes());
        }
        if logs_left > 0 {
            self.buf
                .extend_from_slice(format!(r#","logsLeft":{logs_left}"#).as_bytes());
        }
        self.buf.push(b'}');
        Reply {
            catching_up: None,
            result: self.buf,
            next: self.next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn items(n: usize, size: usize) -> Vec<Value> {
        (0..n)
            .map(|i| json!({"i": i, "pad": "x".repeat(size)}))
            .collect()
    }

    /// Pages `all` the way a node and a client do, returning each page's items.
    fn pages(all: &[Value], limit: usize, max_payload: usize) -> Vec<Vec<Value>> {
        let mut out = Vec::new();
        let mut start = 0;
        loop {
            let mut page = PageBuilder::new(limit, max_payload);
            for item in &all[start..] {
                let i = item["i"].as_u64().unwrap();
                if !page
                    .push(item, || i.to_string(), || ("item".into(), String::new()))
                    .unwrap()
                {
                    break;
                }
            }
            let reply = page.finish();
            let bytes = reply.clone().into_bytes();
            assert!(
                bytes.len() <= max_payload,
                "{} > {max_payload}",
                bytes.len()
            );
            let parsed: ApiReply = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(parsed.next, reply.next);
            let got: Vec<Value> = serde_json::from_value(parsed.result.unwrap()).unwrap();
            out.push(got);
            match reply.next {
                Some(n) => start = n.parse().unwrap(),
                None => return out,
            }
        }
    }

    #[test]
    fn pages_are_bounded_by_count_and_bytes_and_lose_nothing() {
        let all = items(1000, 100);
        let by_count = pages(&all, 300, 1 << 20);
        assert_eq!(
            by_count.iter().map(Vec::len).collect::<Vec<_>>(),
            [300, 300, 300, 100]
        );
        let by_bytes = pages(&all, 10_000, 16 * 1024);
        assert!(by_bytes.len() > 5, "{}", by_bytes.len());
        assert_eq!(by_bytes.concat(), all);
        // Exactly `limit` items: one page, no cursor.
        assert_eq!(pages(&all[..300], 300, 1 << 20).len(), 1);
        // An empty listing is one empty page.
        assert_eq!(pages(&[], 10, 1 << 20), vec![Vec::<Value>::new()]);
    }

    #[test]
    fn an_item_larger_than_a_reply_is_an_error_naming_it() {
        let mut page = PageBuilder::new(10, 8 * 1024);
        let big = json!({"pad": "x".repeat(10 * 1024)});
        let err = page
            .push(
                &big,
                || "c".into(),
                || ("job t.big".into(), ", or delete it".into()),
            )
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("job t.big is 10"), "{msg}");
        assert!(msg.contains("raise max_payload"), "{msg}");
        assert!(msg.ends_with(", or delete it"), "{msg}");
        // After a first item, a big one only ends the page.
        let mut page = PageBuilder::new(10, 8 * 1024);
        assert!(page
            .push(&json!(1), || "1".into(), || ("".into(), "".into()))
            .unwrap());
        assert!(!page
            .push(&big, || "2".into(), || ("".into(), "".into()))
            .unwrap());
        assert_eq!(page.finish().next.as_deref(), Some("2"));
    }

    #[test]
    fn the_guard_replaces_a_reply_over_max_payload_with_an_error() {
        let small = Reply::of(&json!([1, 2])).unwrap().into_bytes();
        assert_eq!(guard(small.clone(), 1024, "job.list"), small);
        let big = Reply::of(&json!(["x".repeat(2000)])).unwrap().into_bytes();
        let out = guard(big, 1024, "job.list");
        assert!(out.len() <= 1024);
        let reply: ApiReply = serde_json::from_slice(&out).unwrap();
        let error = reply.error.unwrap();
        assert_eq!(error.code, ErrorCode::TooLarge);
        assert!(
            error.message.contains("the reply to job.list would be"),
            "{}",
            error.message
        );
    }

    #[test]
    fn capped_text_says_what_was_left_out() {
        let mut s = "é".repeat(1000);
        assert!(cap_text(&mut s, 500));
        assert!(s.len() <= 500, "{}", s.len());
        assert!(
            s.ends_with("more bytes not shown: too large for one API reply]"),
            "{s}"
        );
        let mut short = "abc".to_string();
        assert!(!cap_text(&mut short, 500));
        assert_eq!(short, "abc");
        assert_eq!(cap_args(json!([1]), 100), json!([1]));
        assert!(cap_args(json!(["x".repeat(200)]), 100)
            .as_str()
            .unwrap()
            .starts_with("[args not shown: 204 bytes"));
    }

    #[test]
    fn run_pages_split_log_lines_and_resume_at_the_cursor() {
        #[derive(Serialize)]
        struct Attempt {
            shard: u32,
            logs: Vec<u32>,
        }
        // Three attempts with 50 lines of ~200 bytes each, in pages of 4 KiB.
        let line =
            |s: u32, q: u32| json!({"seq": q, "line": format!("{s}-{q}-{}", "y".repeat(200))});
        let mut seen: Vec<(u32, u32)> = Vec::new();
        let mut cursor: Option<(u32, u32)> = None;
        let mut pages = 0;
        loop {
            pages += 1;
            let mut page = RunPageBuilder::start(&json!({"id": "r"}), None, 10_000, 4096).unwrap();
            let (s0, q0) = cursor.unwrap_or((0, 0));
            'attempts: for s in s0..3 {
                if !page
                    .open_attempt(
                        &Attempt {
                            shard: s,
                            logs: vec![],
                        },
                        || format!("{s}.0"),
                    )
                    .unwrap()
                {
                    break;
                }
                let from = if s == s0 { q0 } else { 0 };
                for q in from..50 {
                    if !page.push_log(&line(s, q), || format!("{s}.{q}")).unwrap() {
                        break 'attempts;
                    }
                }
            }
            let reply = page.finish(1, 2);
            assert!(reply.clone().into_bytes().len() <= 4096);
            let v: Value = serde_json::from_slice(&reply.result).unwrap();
            for a in v["attempts"].as_array().unwrap() {
                let s = a["shard"].as_u64().unwrap() as u32;
                for l in a["logs"].as_array().unwrap() {
                    seen.push((s, l["seq"].as_u64().unwrap() as u32));
                }
            }
            match reply.next {
                Some(n) => {
                    assert_eq!(v["attemptsLeft"], 1);
                    let (s, q) = n.split_once('.').unwrap();
                    cursor = Some((s.parse().unwrap(), q.parse().unwrap()));
                }
                None => break,
            }
        }
        let expected: Vec<(u32, u32)> = (0..3).flat_map(|s| (0..50).map(move |q| (s, q))).collect();
        assert_eq!(seen, expected);
        assert!(pages > 5, "{pages}");
    }
}
