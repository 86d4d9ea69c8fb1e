//! Who may call the HTTP API: bearer tokens (a write token, an optional read-only token),
//! optional anonymous reads, compared in constant time; and the console's sessions: a token
//! exchanged for an `HttpOnly`, `SameSite=Strict` cookie, whose writes must also carry the
//! session's CSRF token in the `X-Krest-Csrf` header (the bearer path needs none: a browser
//! never sends a bearer token on its own).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::header::{AUTHORIZATION, COOKIE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use krest_schemas::api::ErrorCode;

use super::error::WebError;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (the OpenAPI document, the console's static files).
    Public,
    /// A read or write token (or nothing, with `--api-anonymous-read`).
    Read,
    /// The write token.
    Write,
}

impl Access {
    /// The name used in the OpenAPI document (`x-krest-access`).
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Public => "public",
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// The HTTP API's access settings. `Debug` hides the tokens.
#[derive(Clone, Default)]
pub struct WebOptions {
    /// Bearer token that may read and write (`--api-token`); without it, nothing can write.
    pub api_token: Option<String>,
    /// Bearer token that may only read (`--api-read-token`).
    pub read_token: Option<String>,
    /// Reads need no token (`--api-anonymous-read`).
    pub anonymous_read: bool,
}

impl std::fmt::Debug for WebOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |t: &Option<String>| t.as_ref().map(|_| "<redacted>");
        f.debug_struct("WebOptions")
            .field("api_token", &hidden(&self.api_token))
            .field("read_token", &hidden(&self.read_token))
            .field("anonymous_read", &self.anonymous_read)
            .finish()
    }
}

/// Checks requests against [`WebOptions`] and the console's sessions.
#[derive(Debug)]
pub struct Auth {
    opts: WebOptions,
    sessions: Mutex<HashMap<String, Session>>,
}

/// A console session.
#[derive(Debug, Clone)]
pub struct Session {
    /// What its token granted.
    pub access: Access,
    /// What its writes must send in [`CSRF_HEADER`].
    pub csrf: String,
    expires: Instant,
}

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "krest_session";
/// The header carrying a session's CSRF token on writes.
pub const CSRF_HEADER: &str = "x-krest-csrf";
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once (the oldest go first).
const MAX_SESSIONS: usize = 10_000;

/// `WWW-Authenticate` of a request without a token.
const CHALLENGE: &str = r#"Bearer realm="krest""#;
/// `WWW-Authenticate` of a request with a wrong token.
const CHALLENGE_INVALID: &str = r#"Bearer realm="krest", error="invalid_token""#;

impl Auth {
    /// Access settings `opts`; empty tokens count as not set.
    pub fn new(mut opts: WebOptions) -> Auth {
        for t in [&mut opts.api_token, &mut opts.read_token] {
            if t.as_deref().is_some_and(|t| t.trim().is_empty()) {
                *t = None;
            }
        }
        Auth {
            opts,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a session for `token`: its id (the cookie's value) and the session, or `None`
    /// when the token grants nothing.
    pub fn login(&self, token: &str) -> Option<(String, Session)> {
        let access = self.grant(token)?;
        let id = random_token()?;
        let session = Session {
            access,
            csrf: random_token()?,
            expires: Instant::now() + SESSION_TTL,
        };
        let mut sessions = self.sessions.lock().ok()?;
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), session.clone());
        Some((id, session))
    }

    /// The live session of a request's cookie.
    pub fn session(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let sessions = self.sessions.lock().ok()?;
        // Looked up by id; the id is 256 random bits, so a guess cannot be refined by timing.
        let s = sessions.get(id)?;
        (s.expires > Instant::now()).then(|| (id.to_string(), s.clone()))
    }

    /// Ends the session of a request's cookie, if any.
    pub fn logout(&self, headers: &HeaderMap) {
        if let (Some(id), Ok(mut sessions)) =
            (cookie(headers, SESSION_COOKIE), self.sessions.lock())
        {
            sessions.remove(id);
        }
    }

    /// What a token grants: `Write`, `Read`, or nothing (`None`).
    pub fn grant(&self, token: &str) -> Option<Access> {
        let token = token.as_bytes();
        // Both are compared, whatever the first gives: the time does not tell which matched.
        let write = self
            .opts
            .api_token
            .as_deref()
            .is_some_and(|t| ct_eq(token, t.as_bytes()));
        let read = self
            .opts
            .read_token
            .as_deref()
            .is_some_and(|t| ct_eq(token, t.as_bytes()));
        if write {
            Some(Access::Write)
        } else if read {
            Some(Access::Read)
        } else {
            None
        }
    }

    /// Whether a request with `headers` may use a route needing `need`.
    pub fn check(&self, headers: &HeaderMap, need: Access) -> Result<(), WebError> {
        if need == Access::Public {
            return Ok(());
        }
        let granted = match headers.get(AUTHORIZATION) {
            Some(value) => {
                let token = bearer(value).ok_or_else(|| {
                    unauthorized(
                        "the Authorization header must be `Bearer <token>`",
                        CHALLENGE_INVALID,
                    )
                })?;
                self.grant(token).ok_or_else(|| {
                    unauthorized(
                        "the bearer token is not valid for this node (it must be the node's --api-token, or its --api-read-token for reads)",
                        CHALLENGE_INVALID,
                    )
                })?
            }
            None => match self.session(headers) {
                Some((_, session)) => {
                    if need == Access::Write {
                        let sent = headers.get(CSRF_HEADER).map(HeaderValue::as_bytes);
                        if !sent.is_some_and(|c| ct_eq(c, session.csrf.as_bytes())) {
                            return Err(WebError::new(
                                StatusCode::FORBIDDEN,
                                ErrorCode::Forbidden,
                                "missing or wrong CSRF token: writes with the session cookie must send the session's `csrf` in the X-Krest-Csrf header",
                            ));
                        }
                    }
                    session.access
                }
                None if need == Access::Read && self.opts.anonymous_read => return Ok(()),
                None => return Err(self.missing(need)),
            },
        };
        allowed(granted, need)
    }

    fn missing(&self, need: Access) -> WebError {
        let message = match need {
            Access::Write if self.opts.api_token.is_none() => {
                "missing bearer token; writes through the HTTP API are disabled on this node (start it with --api-token or KREST_API_TOKEN)"
            }
            Access::Write => {
                "missing bearer token: send `Authorization: Bearer <token>` with the node's --api-token"
            }
            _ => {
                "missing bearer token: send `Authorization: Bearer <token>` with the node's --api-token or --api-read-token (or start the node with --api-anonymous-read)"
            }
        };
        unauthorized(message, CHALLENGE)
    }
}

/// Whether `granted` covers `need`: a read token used for a write is 403.
pub fn allowed(granted: Access, need: Access) -> Result<(), WebError> {
    if need == Access::Write && granted != Access::Write {
        return Err(WebError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "this token may only read: writes need the node's --api-token",
        ));
    }
    Ok(())
}

/// The token of `Authorization: Bearer <token>` (the scheme is case-insensitive).
fn bearer(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// 256 random bits from the OS, as hex.
fn random_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn unauthorized(message: &str, challenge: &'static str) -> WebError {
    WebError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
        .with_header(WWW_AUTHENTICATE, HeaderValue::from_static(challenge))
}

/// Equality whose time depends only on the length of `given` (the caller's, known to them),
/// not on where it first differs from `secret` nor on the secret's length.
pub fn ct_eq(given: &[u8], secret: &[u8]) -> bool {
    if secret.is_empty() {
        return false;
    }
    let mut diff = u8::from(given.len() != secret.len());
    for (i, g) in given.iter().enumerate() {
        diff |= g ^ secret[i % secret.len()];
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(anonymous_read: bool) -> Auth {
        Auth::new(WebOptions {
            api_token: Some("w-secret".into()),
            read_token: Some("r-secret".into()),
            anonymous_read,
        })
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    fn status(r: Result<(), WebError>) -> u16 {
        r.map_or_else(|e| e.status().as_u16(), |()| 200)
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abd", b"abc"));
        assert!(!ct_eq(b"ab", b"abc"));
        assert!(!ct_eq(b"abcabc", b"abc"));
        assert!(!ct_eq(b"", b"abc"));
        assert!(!ct_eq(b"", b""));
    }

    #[test]
    fn tokens_grant_what_they_should() {
        let a = auth(false);
        let read = Access::Read;
        let write = Access::Write;
        assert_eq!(status(a.check(&headers(None), Access::Public)), 200);
        assert_eq!(status(a.check(&headers(None), read)), 401);
        assert_eq!(status(a.check(&headers(None), write)), 401);
        assert_eq!(status(a.check(&headers(Some("Bearer nope")), read)), 401);
        assert_eq!(status(a.check(&headers(Some("Basic dzpw")), read)), 401);
        assert_eq!(
            status(a.check(&headers(Some("Bearer r-secret")), read)),
            200
        );
        assert_eq!(
            status(a.check(&headers(Some("Bearer r-secret")), write)),
            403
        );
        assert_eq!(
            status(a.check(&headers(Some("bearer w-secret")), write)),
            200
        );
        assert_eq!(
            status(a.check(&headers(Some("Bearer w-secret")), read)),
            200
        );
        let anon = auth(true);
        assert_eq!(status(anon.check(&headers(None), read)), 200);
        assert_eq!(status(anon.check(&headers(None), write)), 401);
        // A wrong token is refused even where anonymous reads are allowed.
        assert_eq!(status(anon.check(&headers(Some("Bearer x")), read)), 401);
        let e = a.check(&headers(None), read).unwrap_err();
        assert!(e.header(WWW_AUTHENTICATE).is_some());
    }

    #[test]
    fn sessions_need_csrf_for_writes() {
        let a = auth(false);
        assert!(a.login("nope").is_none());
        let (id, s) = a.login("w-secret").unwrap();
        assert_eq!(s.access, Access::Write);
        assert_eq!(id.len(), 64);
        let mut h = headers(None);
        h.insert(
            COOKIE,
            HeaderValue::from_str(&format!("a=b; {SESSION_COOKIE}={id}")).unwrap(),
        );
        assert_eq!(status(a.check(&h, Access::Read)), 200);
        assert_eq!(status(a.check(&h, Access::Write)), 403);
        h.insert(CSRF_HEADER, HeaderValue::from_static("wrong"));
        assert_eq!(status(a.check(&h, Access::Write)), 403);
        h.insert(CSRF_HEADER, HeaderValue::from_str(&s.csrf).unwrap());
        assert_eq!(status(a.check(&h, Access::Write)), 200);
        // A read session cannot write, CSRF or not.
        let (rid, rs) = a.login("r-secret").unwrap();
        let mut r = headers(None);
        r.insert(
            COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}={rid}")).unwrap(),
        );
        r.insert(CSRF_HEADER, HeaderValue::from_str(&rs.csrf).unwrap());
        assert_eq!(status(a.check(&r, Access::Write)), 403);
        a.logout(&h);
        assert_eq!(status(a.check(&h, Access::Read)), 401);
    }

    #[test]
    fn no_write_token_means_no_writes() {
        let a = Auth::new(WebOptions {
            api_token: Some("  ".into()),
            read_token: Some("r".into()),
            anonymous_read: false,
        });
        assert_eq!(
            status(a.check(&headers(Some("Bearer   ")), Access::Write)),
            401
        );
        assert_eq!(
            status(a.check(&headers(Some("Bearer r")), Access::Write)),
            403
        );
        let debug = format!("{:?}", a);
        assert!(!debug.contains("\"r\""), "{debug}");
    }
}
