//! The client side of the API: connect, request, decode the reply, with errors that say what
//! to do; follow the pages of listings ([`Client::fetch_all`]).

use std::time::Duration;

use krest_schemas::api::{ApiError, ApiReply, CatchingUp, Op};
use krest_worker::nats::{ConnectStyle, NatsConfig, NatsError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

/// Attempts per request (see [`Client::call_value`]).
const ATTEMPTS: u32 = 3;

/// Errors talking to scheduler nodes.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// NATS is unreachable.
    #[error("cannot connect to NATS at {url}: {reason} (is nats-server running? set --nats-url or NATS_URL)")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// NATS refused the login or the TLS handshake, or the settings are unusable (the message
    /// says which and what to check).
    #[error("{0}")]
    Login(String),
    /// The NATS user may not do this (the server's permissions refused a subject).
    #[error("NATS at {url} refused this user: {violation} — the user's permissions do not allow this operation (see docs/security.md for the roles)")]
    Permission {
        /// The URL.
        url: String,
        /// The server's words (`Permissions Violation for Publish to "krest.api.job.apply"`).
        violation: String,
    },
    /// No scheduler node subscribes to the API: NATS at `url` answered; `why` says what was
    /// found there.
    #[error("no Krest scheduler node is answering on NATS at {url}: {why}")]
    NoScheduler {
        /// The URL used, redacted.
        url: String,
        /// What the server holds, and what to do.
        why: String,
    },
    /// A node did not answer in time.
    #[error("no answer from a scheduler node within {0:?}; try again or raise --timeout")]
    Timeout(Duration),
    /// The node answered with an error.
    #[error("{}", .0.message)]
    Api(ApiError),
    /// Transport or decoding failure.
    #[error("{0}")]
    Other(String),
}

/// A connected API client.
#[derive(Clone, Debug)]
pub struct Client {
    nats: async_nats::Client,
    /// The NATS URL(s), redacted (for messages).
    url: String,
    timeout: Duration,
    /// The last `catchingUp` notice a node sent with a reply.
    catching_up: std::sync::Arc<std::sync::Mutex<Option<CatchingUp>>>,
    /// The last permissions violation the server reported on this connection.
    violations: watch::Receiver<Option<String>>,
}

impl Client {
    /// Connects to NATS at `url` without credentials (other than the URL's), giving up after
    /// `timeout`. Errors show the URL redacted.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Client, ClientError> {
        Client::connect_with(&NatsConfig::new(url), timeout).await
    }

    /// Connects with `nats`'s settings, giving up after `timeout`: an unreachable server, a
    /// refused login or unusable settings fail at once with a message saying which.
    pub async fn connect_with(nats: &NatsConfig, timeout: Duration) -> Result<Client, ClientError> {
        let nats = nats.clone().name("krest-cli");
        let (tx, violations) = watch::channel(None);
        let client = nats
            .connect_tuned(ConnectStyle::OneShot { timeout }, move |opts| {
                opts.event_callback(move |event| {
                    let tx = tx.clone();
                    async move {
                        if let async_nats::Event::ServerError(async_nats::ServerError::Other(e)) =
                            event
                        {
                            if e.to_ascii_lowercase().contains("permissions violation") {
                                tx.send_replace(Some(e));
                            }
                        }
                    }
                })
            })
            .await
            .map_err(|e| match e {
                NatsError::Unreachable { url, reason } => ClientError::Connect { url, reason },
                e => ClientError::Login(e.to_string()),
            })?;
        Ok(Client {
            nats: client,
            url: nats.shown_url(),
            timeout,
            catching_up: Default::default(),
            violations,
        })
    }

    /// Takes the last notice that the answering node's database is behind the events stream
    /// (sent with `runs.list` and `runs.get` replies).
    pub fn take_catching_up(&self) -> Option<CatchingUp> {
        self.catching_up.lock().ok().and_then(|mut c| c.take())
    }

    /// The underlying NATS client.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Sends `req` as operation `op` and decodes the result.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        op: Op,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        Ok(self.call_page(op, req).await?.0)
    }

    /// Sends `req` as operation `op`; returns the decoded result and the reply's `next`
    /// cursor (for paged operations).
    pub async fn call_page<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        op: Op,
        req: &Req,
    ) -> Result<(Resp, Option<String>), ClientError> {
        let payload = self.request(op, req).await?;
        self.decode(op, &payload)
    }

    /// Sends `body`, a request already encoded as JSON, as operation `op` and decodes the
    /// result (for requests assembled from JSON kept as bytes, such as `job.apply`'s).
    pub async fn call_json<Resp: DeserializeOwned>(
        &self,
        op: Op,
        body: Vec<u8>,
    ) -> Result<Resp, ClientError> {
        let payload = self.request_body(op, bytes::Bytes::from(body)).await?;
        Ok(self.decode(op, &payload)?.0)
    }

    /// Decodes the reply `payload` to operation `op`: its result and `next` cursor.
    fn decode<Resp: DeserializeOwned>(
        &self,
        op: Op,
        payload: &[u8],
    ) -> Result<(Resp, Option<String>), ClientError> {
        // Decoded straight into `Resp` (no intermediate JSON value: pages are large).
        let reply: TypedReply<Resp> = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                // Tell a malformed reply from a result of an unexpected shape.
                return Err(match serde_json::from_slice::<ApiReply>(payload) {
                    Ok(ApiReply {
                        ok: false,
                        error: Some(error),
                        ..
                    }) => ClientError::Api(error),
                    Ok(_) => ClientError::Other(format!("unexpected reply to {}: {e}", op.name())),
                    Err(e) => ClientError::Other(format!("malformed reply to {}: {e}", op.name())),
                });
            }
        };
        if let Some(c) = reply.catching_up {
            if let Ok(mut last) = self.catching_up.lock() {
                *last = Some(c);
            }
        }
        match (reply.ok, reply.result, reply.error) {
            (true, Some(result), _) => Ok((result, reply.next)),
            (true, None, _) => serde_json::from_value(serde_json::Value::Null)
                .map(|r| (r, reply.next))
                .map_err(|e| ClientError::Other(format!("unexpected reply to {}: {e}", op.name()))),
            (false, _, Some(error)) => Err(ClientError::Api(error)),
            (false, _, None) => Err(ClientError::Other(
                "the node reported a failure without details".into(),
            )),
        }
    }

    /// Every item of a paged listing, following `next` cursors: `req(cursor, wanted)` builds
    /// the request for a page (`wanted`: how many items are still wanted, when `max` is
    /// given). Stops after `max` items.
    pub async fn fetch_all<Req: Serialize, T: DeserializeOwned>(
        &self,
        op: Op,
        mut req: impl FnMut(Option<String>, Option<usize>) -> Req,
        max: Option<usize>,
    ) -> Result<Vec<T>, ClientError> {
        let mut items: Vec<T> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let wanted = max.map(|m| m.saturating_sub(items.len()));
            let (page, next): (Vec<T>, Option<String>) =
                self.call_page(op, &req(cursor.take(), wanted)).await?;
            let empty = page.is_empty();
            items.extend(page);
            if let Some(m) = max {
                if items.len() >= m {
                    items.truncate(m);
                    return Ok(items);
                }
            }
            match next {
                Some(_) if empty => {
                    return Err(ClientError::Other(format!(
                        "the node answered {} with an empty page and a cursor; try again",
                        op.name()
                    )))
                }
                Some(n) => cursor = Some(n),
                None => return Ok(items),
            }
        }
    }

    /// Sends `req` as operation `op` and returns the raw result.
    pub async fn call_value<Req: Serialize>(
        &self,
        op: Op,
        req: &Req,
    ) -> Result<serde_json::Value, ClientError> {
        self.call(op, req).await
    }

    /// The largest request the connected server takes.
    pub fn max_payload(&self) -> usize {
        match self.nats.server_info().max_payload {
            0 => crate::serve::page::DEFAULT_MAX_PAYLOAD,
            n => n,
        }
    }

    /// Sends `req` as operation `op`; returns the reply's payload.
    ///
    /// A node that is frozen (stopped, stalled) still holds its place in the queue group until
    /// the server notices, and a request routed to it gets no answer. So the request is sent
    /// up to three times within the timeout, each time most likely to another node. Reads
    /// are idempotent, and so are `job.trigger` and `job.delete` sent with a request id
    /// (`TriggerRequest::request_id`, [`JobRequest::delete`](krest_schemas::api::JobRequest::delete));
    /// a resent apply, pause or resume writes its definition again (docs/protocol.md).
    async fn request<Req: Serialize>(
        &self,
        op: Op,
        req: &Req,
    ) -> Result<bytes::Bytes, ClientError> {
        let body = bytes::Bytes::from(
            serde_json::to_vec(req).map_err(|e| ClientError::Other(e.to_string()))?,
        );
        self.request_body(op, body).await
    }

    /// [`Client::request`] with the request already encoded.
    async fn request_body(&self, op: Op, body: bytes::Bytes) -> Result<bytes::Bytes, ClientError> {
        if body.len() > self.max_payload() {
            return Err(ClientError::Other(format!(
                "the {} request is {} bytes, over nats-server's max_payload of {}: send less at once",
                op.name(),
                body.len(),
                self.max_payload()
            )));
        }
        let per_attempt = (self.timeout / ATTEMPTS).max(Duration::from_millis(500));
        let mut attempt = 0;
        let mut violations = self.violations.clone();
        violations.borrow_and_update();
        let reply = loop {
            attempt += 1;
            let request = async_nats::Request::new()
                .payload(body.clone())
                .timeout(Some(per_attempt));
            // A subject this user may not publish to (or an inbox it may not subscribe to) is
            // dropped by the server, which says so on the connection: fail with that at once.
            let sent = tokio::select! {
                r = self.nats.send_request(op.subject(), request) => r,
                Ok(()) = violations.changed() => {
                    let violation = violations.borrow().clone().unwrap_or_default();
                    return Err(ClientError::Permission { url: self.url.clone(), violation });
                }
            };
            match sent {
                Ok(reply) => break reply,
                Err(e) => {
                    use async_nats::client::RequestErrorKind;
                    match e.kind() {
                        RequestErrorKind::NoResponders => {
                            return Err(ClientError::NoScheduler {
                                url: self.url.clone(),
                                why: match self.krest_is_there().await {
                                    Ok(()) => "the server answered and holds Krest's streams, so schedulers ran here before: start one with `krest scheduler`".into(),
                                    Err(why) => why,
                                },
                            })
                        }
                        RequestErrorKind::TimedOut if attempt < ATTEMPTS => continue,
                        RequestErrorKind::TimedOut => {
                            return Err(ClientError::Timeout(self.timeout))
                        }
                        _ => return Err(ClientError::Other(e.to_string())),
                    }
                }
            }
        };
        Ok(reply.payload)
    }
}

impl Client {
    /// What the connected server holds of Krest: `Ok(())` when its events stream exists,
    /// else why not (for an error or a warning), with where the URL came from.
    pub async fn krest_is_there(&self) -> Result<(), String> {
        use async_nats::jetstream::context::GetStreamErrorKind;
        let js = async_nats::jetstream::new(self.nats.clone());
        let found = tokio::time::timeout(
            Duration::from_secs(2),
            js.get_stream(krest_schemas::names::EVENTS_STREAM),
        )
        .await;
        let url_hint =
            "check the URL (--nats-url or NATS_URL; the default is nats://127.0.0.1:4222)";
        match found {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    format!("the server answered but has no Krest streams: no scheduler ever ran on it — is it the right server? {url_hint}")
                }
                _ if e.to_string().to_lowercase().contains("no responders") => {
                    format!("the server answered but has no JetStream, so this is not Krest's NATS: {url_hint}")
                }
                _ => format!(
                    "the server answered; Krest's streams could not be looked up ({e}): {url_hint}"
                ),
            }),
            Err(_) => Err(format!(
                "the server answered, but not to a JetStream request within 2 s: {url_hint}"
            )),
        }
    }
}

/// An [`ApiReply`] whose result is decoded as `T`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypedReply<T> {
    ok: bool,
    result: Option<T>,
    error: Option<ApiError>,
    next: Option<String>,
    #[serde(default)]
    catching_up: Option<CatchingUp>,
}
