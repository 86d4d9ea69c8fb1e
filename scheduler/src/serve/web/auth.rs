//! Who may call the HTTP API: bearer tokens (a write token, an optional read-only token),
//! optional anonymous reads, compared in constant time.

use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
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

/// Checks requests against [`WebOptions`].
#[derive(Debug)]
pub struct Auth {
    opts: WebOptions,
}

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
        Auth { opts }
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
            None if need == Access::Read && self.opts.anonymous_read => return Ok(()),
            None => return Err(self.missing(need)),
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
