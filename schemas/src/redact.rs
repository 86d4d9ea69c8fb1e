//! Secrets are never shown: the one place that decides what is secret and how it is hidden.
//!
//! Secret-bearing data:
//! - every value of an HTTP job's `headers` (`Authorization`, API keys…);
//! - the userinfo of any URL (`https://user:password@host`, `nats://token@host`): HTTP job
//!   `url`s, NATS and database URLs;
//! - the whole path and query of an alert `webhook` (Slack-style hooks carry their token there).
//!
//! Views — API replies, CLI output, log lines, stored errors, alerts, job revisions — carry the
//! [`REDACTED`] placeholder instead: header values become `<redacted>`, a URL's userinfo
//! `https://<redacted>@host/path`, a webhook `https://hooks.example.com/<redacted>`. Definitions
//! keep the real values, and so do the work messages workers execute.
//!
//! A redacted view applied back (`krest job get NAME -o json > f; krest job apply -f f`) keeps
//! the stored secrets: [`JobSpec::restore_secrets`] resolves each placeholder against the stored
//! definition, and refuses a placeholder there is nothing (or nothing safe) to resolve from.

use std::borrow::Cow;

use serde_json::Value;

use crate::api::{AlertPayload, AttemptView, RunDetail, RunSummary};
use crate::job::{problem, Alert, JobSpec, Problem};
use crate::messages::HttpCall;
use crate::text::echo;

/// What a view shows instead of a secret (a header value, a URL's userinfo, a webhook's path).
/// In a definition being applied it means "the stored value, unchanged".
pub const REDACTED: &str = "<redacted>";

/// A URL split into its parts; `rest` is path, query and fragment (with their leading `/`,
/// `?` or `#`).
struct Parts<'a> {
    /// `https://` (scheme with its separator), or `""` for a URL without a scheme.
    scheme: &'a str,
    userinfo: Option<&'a str>,
    host: &'a str,
    rest: &'a str,
}

fn split(url: &str) -> Parts<'_> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (scheme, after) = url.split_at(start);
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    let (userinfo, host) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    Parts {
        scheme,
        userinfo,
        host,
        rest,
    }
}

/// `url` with its userinfo (user, password or token) replaced by [`REDACTED`].
///
/// ```
/// use krest_schemas::redact;
/// assert_eq!(redact::url("https://u:pw@h:8443/p?q=1"), "https://<redacted>@h:8443/p?q=1");
/// assert_eq!(redact::url("nats://token@h"), "nats://<redacted>@h");
/// assert_eq!(redact::url("https://h/p@x"), "https://h/p@x");
/// ```
pub fn url(url: &str) -> Cow<'_, str> {
    let p = split(url);
    match p.userinfo {
        Some(u) if !u.is_empty() && u != REDACTED => {
            Cow::Owned(format!("{}{REDACTED}@{}{}", p.scheme, p.host, p.rest))
        }
        _ => Cow::Borrowed(url),
    }
}

/// A comma-separated list of URLs (NATS server lists), each passed through [`url`].
pub fn urls(list: &str) -> String {
    list.split(',')
        .map(|u| url(u).into_owned())
        .collect::<Vec<_>>()
        .join(",")
}

/// An alert webhook as shown: userinfo, path and query hidden, scheme and host kept.
///
/// ```
/// use krest_schemas::redact;
/// assert_eq!(
///     redact::webhook("https://hooks.slack.com/services/T0/B0/XXXX"),
///     "https://hooks.slack.com/<redacted>"
/// );
/// assert_eq!(redact::webhook("https://alerts.internal"), "https://alerts.internal");
/// ```
pub fn webhook(webhook: &str) -> Cow<'_, str> {
    let p = split(webhook);
    let hide_userinfo = p.userinfo.is_some_and(|u| !u.is_empty());
    let hide_rest = !(p.rest.is_empty() || p.rest == "/");
    if !hide_userinfo && !hide_rest {
        return Cow::Borrowed(webhook);
    }
    let mut out = String::from(p.scheme);
    if hide_userinfo {
        out.push_str(REDACTED);
        out.push('@');
    }
    out.push_str(p.host);
    if hide_rest {
        out.push('/');
        out.push_str(REDACTED);
    } else {
        out.push_str(p.rest);
    }
    Cow::Owned(out)
}

/// Free text (errors, outputs, log lines) with the userinfo of every URL in it hidden.
///
/// ```
/// use krest_schemas::redact;
/// assert_eq!(
///     redact::text("request to https://u:pw@h/x failed (https://u:pw@h/x)"),
///     "request to https://<redacted>@h/x failed (https://<redacted>@h/x)"
/// );
/// ```
pub fn text(s: &str) -> Cow<'_, str> {
    if !s.contains("://") {
        return Cow::Borrowed(s);
    }
    let mut out = String::new();
    let mut copied = 0;
    let mut from = 0;
    while let Some(i) = s[from..].find("://") {
        let start = from + i + 3;
        let end = s[start..]
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '/' | '?' | '#' | '"' | '\'' | '`' | '\\')
            })
            .map_or(s.len(), |j| start + j);
        if let Some(at) = s[start..end].rfind('@') {
            if at > 0 && &s[start..start + at] != REDACTED {
                out.push_str(&s[copied..start]);
                out.push_str(REDACTED);
                copied = start + at;
            }
        }
        // The next URL may begin inside this authority (`nats://a@h1,nats://b@h2`).
        from = start;
    }
    if copied == 0 {
        return Cow::Borrowed(s);
    }
    out.push_str(&s[copied..]);
    Cow::Owned(out)
}

/// Redacts a JSON document whose shape is unknown (a parked message, a raw definition): every
/// value of an object under a `headers` key, every `url` (userinfo) and `webhook` string, and
/// URLs in any other string ([`text`]).
pub fn json(v: &mut Value) {
    match v {
        Value::String(s) => {
            if let Cow::Owned(r) = text(s) {
                *s = r;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(json),
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match (k.as_str(), &mut *v) {
                    ("headers", Value::Object(headers)) => {
                        for h in headers.values_mut() {
                            *h = Value::String(REDACTED.to_string());
                        }
                    }
                    ("url", Value::String(s)) => *s = url(s).into_owned(),
                    ("webhook", Value::String(s)) => *s = webhook(s).into_owned(),
                    _ => json(v),
                }
            }
        }
        _ => {}
    }
}

/// A parked message's payload as shown: redacted structurally when it is JSON ([`json`]); else
/// (malformed, or a copy cut short to fit the dead-letter stream) scanned token by token for
/// the same keys ([`partial_json`]), then as [`text`].
pub fn payload(raw: &str) -> String {
    match serde_json::from_str::<Value>(raw) {
        Ok(mut v) => {
            json(&mut v);
            serde_json::to_string(&v).unwrap_or_else(|_| text(&partial_json(raw)).into_owned())
        }
        Err(_) => text(&partial_json(raw)).into_owned(),
    }
}

/// Text that may be JSON cut anywhere: string values inside a `"headers": {…}` object become
/// [`REDACTED`] (one cut short too), `"url"` and `"webhook"` values go through [`url`] and
/// [`webhook`]; everything else is kept as it is.
fn partial_json(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    // The key whose value comes next, and whether we are inside a `headers` object.
    let mut key: Option<&str> = None;
    let mut in_headers = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i + 1;
                let mut j = start;
                let mut escaped = false;
                while j < b.len() {
                    match b[j] {
                        _ if escaped => escaped = false,
                        b'\\' => escaped = true,
                        b'"' => break,
                        _ => {}
                    }
                    j += 1;
                }
                let closed = j < b.len();
                let content = &s[start..j];
                let next = s[(j + 1).min(s.len())..].trim_start();
                if closed && next.starts_with(':') {
                    out.push_str(&s[i..=j]);
                    key = Some(content);
                } else {
                    let shown = match key {
                        Some(_) if in_headers => Cow::Borrowed(REDACTED),
                        // Cut short: what remains may be userinfo without its `@`.
                        Some("url" | "webhook") if !closed => {
                            Cow::Owned(format!("{}{REDACTED}", split(content).scheme))
                        }
                        Some("url") => url(content),
                        Some("webhook") => webhook(content),
                        _ => Cow::Borrowed(content),
                    };
                    out.push('"');
                    out.push_str(&shown);
                    if closed {
                        out.push('"');
                    }
                    key = None;
                }
                i = if closed { j + 1 } else { b.len() };
            }
            b'{' => {
                in_headers = key == Some("headers");
                key = None;
                out.push('{');
                i += 1;
            }
            b'}' => {
                in_headers = false;
                key = None;
                out.push('}');
                i += 1;
            }
            _ => {
                let c = s[i..].chars().next().unwrap_or(' ');
                if !(c.is_whitespace() || c == ':') {
                    key = None;
                }
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

fn redact_opt(s: &mut Option<String>) {
    if let Some(Cow::Owned(r)) = s.as_deref().map(text) {
        *s = Some(r);
    }
}

impl JobSpec {
    /// The definition as views show it: header values, the url's userinfo and the webhook's
    /// path and query replaced by [`REDACTED`].
    pub fn redacted(&self) -> JobSpec {
        let mut spec = self.clone();
        for v in spec.headers.values_mut() {
            *v = REDACTED.to_string();
        }
        if let Some(u) = &mut spec.url {
            *u = url(u).into();
        }
        if let Some(a) = &mut spec.alert {
            a.webhook = webhook(&a.webhook).into_owned();
        }
        spec
    }

    /// Resolves the [`REDACTED`] placeholders of a definition being applied against the stored
    /// definition of the same job (`None` for a new job), so a redacted view applied back
    /// keeps the secrets:
    /// - a header value `<redacted>` takes the stored value of that header;
    /// - a url with userinfo `<redacted>` takes the stored url's userinfo;
    /// - a webhook equal to the redacted stored webhook takes the stored webhook.
    ///
    /// Headers and userinfo are only carried over while the url's scheme, host and port stay
    /// the same, so a placeholder cannot send a stored credential to another server. Every
    /// placeholder that cannot be resolved is a problem naming its field.
    pub fn restore_secrets(&mut self, stored: Option<&JobSpec>) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let key = self.key();
        let none_stored = |what: &str| {
            format!("`{REDACTED}` stands for the stored {what}, but job {key} has none stored: give the real value")
        };
        fn origin(u: Option<&str>) -> Option<(&str, &str)> {
            u.map(split).map(|p| (p.scheme, p.host))
        }
        let stored_url = stored.and_then(|s| s.url.as_deref());
        let same_origin = origin(self.url.as_deref()).is_some()
            && origin(self.url.as_deref()) == origin(stored_url);
        let shown = |u: Option<&str>| u.map_or_else(|| "none".to_string(), |u| echo(&url(u)));
        let (was, now) = (shown(stored_url), shown(self.url.as_deref()));
        let moved = |field_what: &str| {
            format!(
                "`{REDACTED}` keeps the stored {field_what} only while the url's scheme, host and port stay the same (stored: {was}, now: {now}): give the real value"
            )
        };

        if let Some(u) = self.url.clone() {
            let p = split(&u);
            if p.userinfo == Some(REDACTED) {
                let stored_userinfo = stored
                    .and_then(|s| s.url.as_deref())
                    .map(split)
                    .and_then(|s| s.userinfo.filter(|i| !i.is_empty() && *i != REDACTED));
                match stored_userinfo {
                    None => problems.push(problem("url", none_stored("url userinfo"))),
                    Some(_) if !same_origin => problems.push(problem("url", moved("userinfo"))),
                    Some(info) => {
                        self.url = Some(format!("{}{info}@{}{}", p.scheme, p.host, p.rest).into());
                    }
                }
            }
        }

        let stored_headers = stored.map(|s| &s.headers);
        for (name, value) in self.headers.iter_mut() {
            if value != REDACTED {
                continue;
            }
            let field = format!("headers.{}", echo(name));
            let found = stored_headers.and_then(|h| {
                h.get(name)
                    .or_else(|| {
                        h.iter()
                            .find(|(n, _)| n.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v)
                    })
                    .filter(|v| *v != REDACTED)
            });
            match found {
                None => problems.push(problem(&field, none_stored("value of this header"))),
                Some(_) if !same_origin => problems.push(problem(&field, moved("header value"))),
                Some(v) => *value = v.clone(),
            }
        }

        if let Some(alert) = &mut self.alert {
            if alert.webhook.contains(REDACTED) {
                let stored_webhook = stored
                    .and_then(|s| s.alert.as_ref())
                    .map(|a| &a.webhook)
                    .filter(|w| !w.contains(REDACTED));
                match stored_webhook {
                    Some(w) if *webhook(w) == alert.webhook => alert.webhook = w.clone(),
                    Some(w) => problems.push(problem(
                        "alert.webhook",
                        format!(
                            "`{}` holds `{REDACTED}` but is not the stored webhook's redacted form `{}`: keep it as shown, or give the whole new webhook",
                            echo(&alert.webhook),
                            echo(&webhook(w))
                        ),
                    )),
                    None => problems.push(problem("alert.webhook", none_stored("webhook"))),
                }
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

impl std::fmt::Debug for JobSpec {
    /// Debug output is a view too: the redacted definition, as JSON.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_string(&self.redacted()) {
            Ok(json) => write!(f, "JobSpec {json}"),
            Err(_) => f.write_str("JobSpec { .. }"),
        }
    }
}

impl std::fmt::Debug for Alert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alert")
            .field("webhook", &webhook(&self.webhook))
            .field("on", &self.on)
            .finish()
    }
}

impl HttpCall {
    /// The request as views show it (header values and the url's userinfo hidden).
    pub fn redacted(&self) -> HttpCall {
        HttpCall {
            url: url(&self.url).into_owned(),
            method: self.method,
            headers: self
                .headers
                .keys()
                .map(|k| (k.clone(), REDACTED.to_string()))
                .collect(),
        }
    }
}

impl std::fmt::Debug for HttpCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.redacted();
        f.debug_struct("HttpCall")
            .field("url", &r.url)
            .field("method", &r.method)
            .field("headers", &r.headers)
            .finish()
    }
}

impl RunSummary {
    /// Hides URL userinfo in the run's error and output ([`text`]).
    pub fn redact_secrets(&mut self) {
        redact_opt(&mut self.error);
        redact_opt(&mut self.output);
    }
}

impl AttemptView {
    /// Hides URL userinfo in the attempt's error, output and log lines ([`text`]).
    pub fn redact_secrets(&mut self) {
        redact_opt(&mut self.error);
        redact_opt(&mut self.output);
        for l in &mut self.logs {
            if let Cow::Owned(r) = text(&l.line) {
                l.line = r;
            }
        }
    }
}

impl RunDetail {
    /// Hides URL userinfo in every text of the run ([`text`]).
    pub fn redact_secrets(&mut self) {
        self.run.redact_secrets();
        self.attempts
            .iter_mut()
            .for_each(AttemptView::redact_secrets);
    }
}

impl AlertPayload {
    /// Hides URL userinfo in the run's texts ([`text`]).
    pub fn redact_secrets(&mut self) {
        self.run.redact_secrets();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::parse_job;
    use serde_json::json;

    #[test]
    fn urls_lose_their_userinfo_only() {
        assert_eq!(url("https://h/p"), "https://h/p");
        assert_eq!(url("https://u:p@h"), "https://<redacted>@h");
        assert_eq!(url("https://u:p@h?x=@y"), "https://<redacted>@h?x=@y");
        assert_eq!(url("https://<redacted>@h"), "https://<redacted>@h");
        assert_eq!(url("u:p@h:4222"), "<redacted>@h:4222", "no scheme");
        assert_eq!(url("https://a@b@h/"), "https://<redacted>@h/");
        assert_eq!(
            urls("nats://a:b@h1:4222,nats://h2,nats://tok@h3"),
            "nats://<redacted>@h1:4222,nats://h2,nats://<redacted>@h3"
        );
    }

    #[test]
    fn webhooks_lose_userinfo_path_and_query() {
        assert_eq!(
            webhook("https://u:p@h:1/x?token=1"),
            "https://<redacted>@h:1/<redacted>"
        );
        assert_eq!(webhook("https://h?token=1"), "https://h/<redacted>");
        assert_eq!(webhook("https://h/"), "https://h/");
        assert_eq!(webhook("https://h/<redacted>"), "https://h/<redacted>");
    }

    #[test]
    fn text_scrubs_every_url() {
        assert_eq!(text("no urls"), "no urls");
        assert_eq!(
            text("a nats://u:p@h1,nats://v:q@h2 b"),
            "a nats://<redacted>@h1,nats://<redacted>@h2 b"
        );
        assert_eq!(
            text("error sending request for url (https://user:pass@127.0.0.1:1/x)"),
            "error sending request for url (https://<redacted>@127.0.0.1:1/x)"
        );
        assert_eq!(text("see https://h/a@b"), "see https://h/a@b");
        assert_eq!(text("\"https://u:p@h\""), "\"https://<redacted>@h\"");
        assert_eq!(text("x://"), "x://");
    }

    #[test]
    fn json_documents_are_redacted_structurally() {
        let mut v = json!({"runId": "r", "http": {"url": "https://u:p@h/x", "method": "POST",
            "headers": {"Authorization": "Bearer s3cret"}},
            "alert": {"webhook": "https://hooks/T/B/X"}, "error": "GET https://u:p@h failed"});
        json(&mut v);
        let s = v.to_string();
        assert!(
            !s.contains("s3cret") && !s.contains("u:p") && !s.contains("T/B/X"),
            "{s}"
        );
        assert_eq!(v["http"]["headers"]["Authorization"], REDACTED);
        assert_eq!(
            payload("not json https://u:p@h"),
            "not json https://<redacted>@h"
        );
    }

    #[test]
    fn json_cut_short_is_redacted_too() {
        let full = serde_json::to_string(&json!({"args": {"a": "x\"y"}, "http": {
            "url": "https://u:p@h/x", "headers": {"A": "Bearer s3cret", "B": "k3y"}},
            "alert": {"webhook": "https://hooks/T/B/X"}}))
        .unwrap();
        for cut in 1..full.len() {
            let shown = payload(&full[..cut]);
            for secret in ["s3cret", "k3y", "u:p", "T/B", "Bearer"] {
                assert!(!shown.contains(secret), "cut at {cut}: {shown}");
            }
        }
        assert_eq!(
            payload(r#"{"http": {"headers": {"A": "Bear"#),
            r#"{"http": {"headers": {"A": "<redacted>"#
        );
        let other = r#"{"args": {"a": "x\"y"}, "n"#;
        assert_eq!(payload(other), other);
    }

    fn http_job(extra: Value) -> JobSpec {
        let mut doc = json!({"appName": "web", "jobGroup": "t", "jobName": "call", "jobType": "HTTP",
            "url": "https://user:pw@api.example.com/run",
            "headers": {"Authorization": "Bearer s3cret", "X-Trace": "1"},
            "alert": {"webhook": "https://hooks.example.com/T0/B0/XX"}});
        for (k, v) in extra.as_object().unwrap() {
            doc[k] = v.clone();
        }
        parse_job(&doc).unwrap()
    }

    #[test]
    fn a_redacted_view_restores_to_the_stored_definition() {
        let stored = http_job(json!({}));
        let view = stored.redacted();
        let shown = serde_json::to_string(&view).unwrap();
        for secret in ["s3cret", "user:pw", "T0/B0"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert_eq!(view.headers["X-Trace"], REDACTED, "every header value");
        assert_eq!(
            view.url.as_deref(),
            Some("https://<redacted>@api.example.com/run")
        );
        let mut back = parse_job(&serde_json::to_value(&view).unwrap()).unwrap();
        back.restore_secrets(Some(&stored)).unwrap();
        assert_eq!(back, stored);
        // Debug output is a view.
        let dbg = format!("{stored:?}");
        assert!(!dbg.contains("s3cret") && !dbg.contains("T0/B0"), "{dbg}");
    }

    #[test]
    fn placeholders_keep_secrets_while_other_fields_change() {
        let stored = http_job(json!({}));
        let mut changed = stored.redacted();
        changed.url = Some("https://<redacted>@api.example.com/other-path".into());
        changed.headers.insert("X-New".into(), "plain".into());
        changed.restore_secrets(Some(&stored)).unwrap();
        assert_eq!(
            changed.url.as_deref(),
            Some("https://user:pw@api.example.com/other-path")
        );
        assert_eq!(changed.headers["Authorization"], "Bearer s3cret");
        assert_eq!(changed.headers["X-New"], "plain");
    }

    #[test]
    fn unresolvable_placeholders_name_their_field() {
        let fields = |spec: &mut JobSpec, stored: Option<&JobSpec>| -> Vec<String> {
            spec.restore_secrets(stored)
                .unwrap_err()
                .iter()
                .map(|p| p.field.clone())
                .collect()
        };
        let stored = http_job(json!({}));
        // A new job: nothing to restore from.
        let mut new = stored.redacted();
        assert_eq!(
            fields(&mut new, None),
            [
                "url",
                "headers.Authorization",
                "headers.X-Trace",
                "alert.webhook"
            ]
        );
        // Another host: stored credentials are not sent there.
        let mut moved = stored.redacted();
        moved.url = Some("https://<redacted>@evil.example.com/run".into());
        let problems = moved.restore_secrets(Some(&stored)).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].message.contains("evil.example.com"),
            "{problems:?}"
        );
        let mut moved_plain = stored.redacted();
        moved_plain.url = Some("https://evil.example.com/run".into());
        assert_eq!(
            fields(&mut moved_plain, Some(&stored)),
            ["headers.Authorization", "headers.X-Trace"]
        );
        // A header the stored definition does not have.
        let mut extra = stored.clone();
        extra.headers.insert("X-Other".into(), REDACTED.into());
        assert_eq!(fields(&mut extra, Some(&stored)), ["headers.X-Other"]);
        // A webhook placeholder must be the stored webhook's redacted form.
        let mut hook = stored.clone();
        hook.alert.as_mut().unwrap().webhook = "https://other.example.com/<redacted>".into();
        assert_eq!(fields(&mut hook, Some(&stored)), ["alert.webhook"]);
    }

    #[test]
    fn run_texts_are_scrubbed() {
        let mut p: AlertPayload = serde_json::from_value(json!({
            "alert": "FAILED", "job": "t.j", "node": "n", "at": "2026-01-01T00:00:00Z",
            "run": {"runId": "r", "jobGroup": "t", "jobName": "j", "appName": "a",
                    "status": "FAILED", "shardTotal": 1, "shardsSucceeded": 0, "shardsFailed": 1,
                    "attempts": 1, "misfired": 0,
                    "error": "request to https://user:pass@h/ failed"}
        }))
        .unwrap();
        p.redact_secrets();
        assert_eq!(
            p.run.error.as_deref(),
            Some("request to https://<redacted>@h/ failed")
        );
    }
}
