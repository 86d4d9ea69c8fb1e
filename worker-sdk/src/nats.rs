//! Connecting to NATS, for every Krest process: workers, scheduler nodes and the `krest` CLI.
//!
//! [`NatsConfig`] holds where to connect and how to log in — user and password, token,
//! credentials file (JWT), nkey seed, TLS client certificate and CA — read the way the `nats`
//! CLI reads them ([`NatsConfig::from_env`]: `NATS_URL`, `NATS_USER`, `NATS_PASSWORD`,
//! `NATS_TOKEN`, `NATS_CREDS`, `NATS_NKEY`, `NATS_CERT`, `NATS_KEY`, `NATS_CA`,
//! `NATS_INBOX_PREFIX`). Credentials in the URL (`nats://user:pass@host`, `nats://token@host`)
//! work too; explicit settings win over them.
//!
//! [`NatsConfig::connect`] makes one attempt and says what went wrong in a way a caller can act
//! on: [`NatsError::is_retryable`] is true only for an unreachable server (nodes and workers
//! wait for it); a refused login, a TLS failure, an unreadable credentials file or an invalid
//! URL fail at once with a message naming the problem. Secrets never appear in `Debug` output
//! or in error messages.
//!
//! ```no_run
//! # async fn demo() -> Result<(), krest_worker::nats::NatsError> {
//! use krest_worker::nats::{ConnectStyle, NatsConfig};
//!
//! let client = NatsConfig::from_env()
//!     .name("my-tool")
//!     .connect(ConnectStyle::Service)
//!     .await?;
//! # drop(client);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use krest_schemas::names::server_list;
use krest_schemas::redact;

/// The default server.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// Where and how to connect to NATS. `Debug` shows no secret (URLs redacted, password, token
/// and a literal nkey seed hidden).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (default [`DEFAULT_URL`]).
    pub url: String,
    /// User name (with [`NatsConfig::password`]).
    pub user: Option<String>,
    /// Password of [`NatsConfig::user`].
    pub password: Option<String>,
    /// Authentication token.
    pub token: Option<String>,
    /// Credentials file (a user JWT and its nkey seed, as `nsc` writes them).
    pub creds: Option<PathBuf>,
    /// Nkey seed: a file holding it, or the seed itself (`SU…`).
    pub nkey: Option<String>,
    /// TLS client certificate (PEM), with [`NatsConfig::tls_key`].
    pub tls_cert: Option<PathBuf>,
    /// TLS client key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) the server's certificate must chain to (default: the system's).
    pub tls_ca: Option<PathBuf>,
    /// Prefix of reply subjects (default `_INBOX`). Restricted users are allowed to subscribe
    /// to their own prefix only, so they cannot read others' replies (see docs/security.md).
    pub inbox_prefix: Option<String>,
    /// The connection's name, as the server shows it (`nats server report connections`).
    pub name: String,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| redact::REDACTED);
        let nkey = self.nkey.as_ref().map(|n| {
            if is_seed(n) {
                redact::REDACTED.to_string()
            } else {
                n.clone()
            }
        });
        f.debug_struct("NatsConfig")
            .field("url", &redact::urls(&self.url))
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("creds", &self.creds)
            .field("nkey", &nkey)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_ca", &self.tls_ca)
            .field("inbox_prefix", &self.inbox_prefix)
            .field("name", &self.name)
            .finish()
    }
}

/// How a connection behaves once made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectStyle {
    /// A long-lived process (node, worker): reconnects forever, logs disconnections.
    Service,
    /// A short command (the CLI): gives up after `timeout` and does not reconnect.
    OneShot {
        /// Connection and request timeout.
        timeout: Duration,
    },
}

/// Why connecting failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatsError {
    /// The settings are unusable: an invalid URL, a file that cannot be read, conflicting
    /// credentials. Fix the configuration.
    #[error("{0}")]
    Config(String),
    /// The server refused the login or the TLS handshake failed. Retrying cannot help.
    #[error("{0}")]
    Refused(String),
    /// The server could not be reached (yet): retrying may help.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Unreachable {
        /// The URL(s), redacted.
        url: String,
        /// Why.
        reason: String,
    },
}

impl NatsError {
    /// True when waiting and trying again may help (the server is unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, NatsError::Unreachable { .. })
    }
}

/// Reads `var`, treating an empty value as absent.
fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

/// True when `s` looks like an nkey user seed rather than a path.
fn is_seed(s: &str) -> bool {
    let s = s.trim();
    s.starts_with("SU") && s.len() == 58 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl NatsConfig {
    /// Connects to `url` without credentials.
    pub fn new(url: impl Into<String>) -> NatsConfig {
        NatsConfig {
            url: url.into(),
            ..NatsConfig::default()
        }
    }

    /// Reads the environment the way the `nats` CLI does: `NATS_URL` (default
    /// [`DEFAULT_URL`]), `NATS_USER`, `NATS_PASSWORD`, `NATS_TOKEN`, `NATS_CREDS`, `NATS_NKEY`,
    /// `NATS_CERT`, `NATS_KEY`, `NATS_CA`, and `NATS_INBOX_PREFIX`.
    pub fn from_env() -> NatsConfig {
        NatsConfig {
            url: env("NATS_URL").unwrap_or_else(|| DEFAULT_URL.to_string()),
            user: env("NATS_USER"),
            password: env("NATS_PASSWORD"),
            token: env("NATS_TOKEN"),
            creds: env("NATS_CREDS").map(PathBuf::from),
            nkey: env("NATS_NKEY"),
            tls_cert: env("NATS_CERT").map(PathBuf::from),
            tls_key: env("NATS_KEY").map(PathBuf::from),
            tls_ca: env("NATS_CA").map(PathBuf::from),
            inbox_prefix: env("NATS_INBOX_PREFIX"),
            name: String::new(),
        }
    }

    /// Sets the connection's name.
    pub fn name(mut self, name: impl Into<String>) -> NatsConfig {
        self.name = name.into();
        self
    }

    /// The URL(s) with any credentials hidden, for messages.
    pub fn shown_url(&self) -> String {
        redact::urls(self.url_or_default())
    }

    fn url_or_default(&self) -> &str {
        if self.url.trim().is_empty() {
            DEFAULT_URL
        } else {
            &self.url
        }
    }

    /// The login to use: explicit settings, else credentials found in a URL.
    fn login(&self) -> Result<(Login, Vec<String>), NatsError> {
        let mut urls = Vec::new();
        let mut from_url: Option<Login> = None;
        for raw in server_list(self.url_or_default()) {
            let (url, userinfo) = split_userinfo(&raw);
            if let (Some(info), None) = (userinfo, &from_url) {
                from_url = Some(match info.split_once(':') {
                    Some((u, p)) => Login::User {
                        user: percent_decode(u),
                        password: percent_decode(p),
                    },
                    None => Login::Token(percent_decode(info)),
                });
            }
            urls.push(url);
        }
        if urls.is_empty() {
            return Err(NatsError::Config(
                "no NATS URL given (set --nats-url or NATS_URL)".into(),
            ));
        }
        let mut explicit = Vec::new();
        if self.user.is_some() || self.password.is_some() {
            explicit.push("user/password");
        }
        if self.token.is_some() {
            explicit.push("token");
        }
        if self.creds.is_some() {
            explicit.push("credentials file");
        }
        if self.nkey.is_some() {
            explicit.push("nkey");
        }
        if explicit.len() > 1 {
            return Err(NatsError::Config(format!(
                "conflicting NATS credentials: {} are set; use one way to log in",
                explicit.join(", ")
            )));
        }
        let login = if let Some(user) = &self.user {
            Login::User {
                user: user.clone(),
                password: self.password.clone().unwrap_or_default(),
            }
        } else if self.password.is_some() {
            return Err(NatsError::Config(
                "a NATS password is set without a user (set NATS_USER or --user)".into(),
            ));
        } else if let Some(token) = &self.token {
            Login::Token(token.clone())
        } else if let Some(path) = &self.creds {
            Login::Creds(path.clone())
        } else if let Some(nkey) = &self.nkey {
            Login::Nkey(nkey.clone())
        } else {
            from_url.unwrap_or(Login::None)
        };
        Ok((login, urls))
    }

    /// The `ConnectOptions` for these settings (files read and checked), and the server
    /// list without credentials.
    async fn options(
        &self,
        style: ConnectStyle,
    ) -> Result<(async_nats::ConnectOptions, Vec<String>, Login), NatsError> {
        let (login, urls) = self.login()?;
        let mut opts = async_nats::ConnectOptions::new();
        match &login {
            Login::None => {}
            Login::User { user, password } => {
                opts = opts.user_and_password(user.clone(), password.clone());
            }
            Login::Token(token) => opts = opts.token(token.clone()),
            Login::Creds(path) => {
                let text = read(path, "NATS credentials file (NATS_CREDS, --creds)")?;
                opts = opts.credentials(&text).map_err(|e| {
                    NatsError::Config(format!(
                        "NATS credentials file {} is not usable: {e}",
                        path.display()
                    ))
                })?;
            }
            Login::Nkey(nkey) => opts = opts.nkey(read_seed(nkey)?),
        }
        let tls = self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_ca.is_some()
            || urls.iter().any(|u| u.starts_with("tls://"));
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                read(cert, "TLS client certificate (NATS_CERT, --tlscert)")?;
                read(key, "TLS client key (NATS_KEY, --tlskey)")?;
                opts = opts.add_client_certificate(cert.clone(), key.clone());
            }
            (Some(_), None) => {
                return Err(NatsError::Config(
                    "a TLS client certificate is set without its key (set NATS_KEY or --tlskey)"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(NatsError::Config(
                    "a TLS client key is set without its certificate (set NATS_CERT or --tlscert)"
                        .into(),
                ))
            }
            (None, None) => {}
        }
        if let Some(ca) = &self.tls_ca {
            read(ca, "TLS CA certificate (NATS_CA, --tlsca)")?;
            opts = opts.add_root_certificates(ca.clone());
        }
        if tls {
            opts = opts.require_tls(true);
        }
        if let Some(prefix) = &self.inbox_prefix {
            opts = opts.custom_inbox_prefix(prefix);
        }
        if !self.name.is_empty() {
            opts = opts.name(&self.name);
        }
        opts = match style {
            ConnectStyle::Service => {
                opts.max_reconnects(None).event_callback(|event| async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            tracing::warn!("disconnected from NATS")
                        }
                        async_nats::Event::Connected => tracing::info!("connected to NATS"),
                        async_nats::Event::ServerError(e) => {
                            tracing::warn!(error = %redact::text(&e.to_string()), "NATS server error")
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                })
            }
            ConnectStyle::OneShot { timeout } => opts
                .connection_timeout(timeout)
                .request_timeout(Some(timeout))
                .max_reconnects(Some(1)),
        };
        Ok((opts, urls, login))
    }

    /// Connects once. See [`NatsError`] for what can go wrong.
    pub async fn connect(&self, style: ConnectStyle) -> Result<async_nats::Client, NatsError> {
        let (opts, urls, login) = self.options(style).await?;
        self.connect_with(opts, urls, &login).await
    }

    /// Like [`NatsConfig::connect`], with `tune` applied to the options last (event
    /// callbacks, timeouts).
    pub async fn connect_tuned(
        &self,
        style: ConnectStyle,
        tune: impl FnOnce(async_nats::ConnectOptions) -> async_nats::ConnectOptions,
    ) -> Result<async_nats::Client, NatsError> {
        let (opts, urls, login) = self.options(style).await?;
        self.connect_with(tune(opts), urls, &login).await
    }

    async fn connect_with(
        &self,
        opts: async_nats::ConnectOptions,
        urls: Vec<String>,
        login: &Login,
    ) -> Result<async_nats::Client, NatsError> {
        use async_nats::ConnectErrorKind as K;
        let shown = self.shown_url();
        let e = match opts.connect(urls).await {
            Ok(client) => return Ok(client),
            Err(e) => e,
        };
        let detail = redact::text(&e.to_string()).into_owned();
        // A failed TLS handshake arrives as an IO error wrapping rustls's.
        let tls_failed = {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let mut found = false;
            while let Some(err) = source {
                let inner = err
                    .downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .map(|i| i as &(dyn std::error::Error + 'static));
                if err.is::<async_nats::rustls::Error>()
                    || inner.is_some_and(|i| i.is::<async_nats::rustls::Error>())
                {
                    found = true;
                    break;
                }
                source = err.source();
            }
            found
        };
        let kind = if tls_failed { K::Tls } else { e.kind() };
        Err(match kind {
            K::ServerParse => NatsError::Config(format!("invalid NATS URL {shown}: {detail}")),
            K::AuthorizationViolation => NatsError::Refused(format!(
                "NATS at {shown} refused {}: authorization violation — {}",
                login.describe(),
                login.hint()
            )),
            K::Authentication => NatsError::Refused(format!(
                "cannot log in to NATS at {shown} with {}: {detail} — {}",
                login.describe(),
                login.hint()
            )),
            K::Tls => NatsError::Refused(format!(
                "TLS with NATS at {shown} failed: {detail} — check NATS_CA/--tlsca (the CA of \
                 the server's certificate) and NATS_CERT/NATS_KEY (a client certificate the \
                 server accepts)"
            )),
            _ => NatsError::Unreachable {
                url: shown,
                reason: detail,
            },
        })
    }
}

/// How a connection logs in. `Debug` shows who, never a secret.
#[derive(Clone)]
enum Login {
    None,
    User { user: String, password: String },
    Token(String),
    Creds(PathBuf),
    Nkey(String),
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Login {
    /// Who, for messages (no secret).
    fn describe(&self) -> String {
        match self {
            Login::None => "a connection without credentials".into(),
            Login::User { user, .. } => format!("user '{}'", krest_schemas::text::echo(user)),
            Login::Token(_) => "the token".into(),
            Login::Creds(path) => format!("the credentials in {}", path.display()),
            Login::Nkey(n) => match read_seed(n)
                .ok()
                .and_then(|s| nkeys::KeyPair::from_seed(&s).ok())
            {
                Some(kp) => format!("nkey {}", kp.public_key()),
                None => "the nkey".into(),
            },
        }
    }

    /// What to check.
    fn hint(&self) -> &'static str {
        match self {
            Login::None => {
                "the server requires a login: set NATS_USER/NATS_PASSWORD, \
                            NATS_TOKEN, NATS_CREDS or NATS_NKEY (or the matching flags)"
            }
            Login::User { .. } => "check NATS_USER/NATS_PASSWORD (--user/--password)",
            Login::Token(_) => "check NATS_TOKEN (--token)",
            Login::Creds(_) => "check NATS_CREDS (--creds)",
            Login::Nkey(_) => "check NATS_NKEY (--nkey)",
        }
    }
}

/// Reads a file, with an error naming it and what it is for.
fn read(path: &Path, what: &str) -> Result<String, NatsError> {
    std::fs::read_to_string(path)
        .map_err(|e| NatsError::Config(format!("cannot read the {what} {}: {e}", path.display())))
}

/// The seed itself, or the seed read from the file `nkey` names.
fn read_seed(nkey: &str) -> Result<String, NatsError> {
    if is_seed(nkey) {
        return Ok(nkey.trim().to_string());
    }
    let path = Path::new(nkey);
    let text = read(path, "nkey seed file (NATS_NKEY, --nkey)")?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| is_seed(l))
        .ok_or_else(|| {
            NatsError::Config(format!(
                "the nkey seed file {} holds no user seed (a line starting with SU)",
                path.display()
            ))
        })?;
    nkeys::KeyPair::from_seed(seed).map_err(|e| {
        NatsError::Config(format!(
            "the nkey seed in {} is not valid: {e}",
            path.display()
        ))
    })?;
    Ok(seed.to_string())
}

/// `nats://user:pass@host:4222` → (`nats://host:4222`, `Some("user:pass")`).
fn split_userinfo(url: &str) -> (String, Option<&str>) {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    match authority.rfind('@') {
        Some(at) => (
            format!("{scheme}{}{}", &authority[at + 1..], &rest[end..]),
            Some(&authority[..at]).filter(|u| !u.is_empty()),
        ),
        None => (url.to_string(), None),
    }
}

/// Decodes `%XX` escapes (URL userinfo).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_taken_out() {
        let c = NatsConfig::new("nats://al%40ice:p%3Aw@h:4222, nats://h2:4222");
        let (login, urls) = c.login().unwrap();
        assert_eq!(urls, ["nats://h:4222", "nats://h2:4222"]);
        assert!(
            matches!(login, Login::User { user, password } if user == "al@ice" && password == "p:w")
        );
        let (login, urls) = NatsConfig::new("tls://s3cr3t@h").login().unwrap();
        assert_eq!(urls, ["tls://h"]);
        assert!(matches!(login, Login::Token(t) if t == "s3cr3t"));
        // Explicit settings win.
        let mut c = NatsConfig::new("nats://u:p@h");
        c.token = Some("t".into());
        assert!(matches!(c.login().unwrap().0, Login::Token(t) if t == "t"));
    }

    #[test]
    fn conflicting_or_incomplete_credentials_are_refused() {
        let mut c = NatsConfig::new("nats://h");
        c.token = Some("t".into());
        c.user = Some("u".into());
        let e = c.login().unwrap_err().to_string();
        assert!(e.contains("user/password, token"), "{e}");
        let mut c = NatsConfig::new("nats://h");
        c.password = Some("p".into());
        assert!(c
            .login()
            .unwrap_err()
            .to_string()
            .contains("without a user"));
    }

    #[test]
    fn debug_hides_secrets() {
        let mut c = NatsConfig::new("nats://u:urlpass@h");
        c.user = Some("u".into());
        c.password = Some("hunter2".into());
        c.token = Some("tok3n".into());
        c.nkey = Some(nkeys::KeyPair::new_user().seed().unwrap());
        let shown = format!("{c:?}");
        for secret in ["urlpass", "hunter2", "tok3n", "SU"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn unreadable_files_are_named() {
        let mut c = NatsConfig::new("nats://h");
        c.nkey = Some("/nonexistent/user.nk".into());
        let e = read_seed(c.nkey.as_deref().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/user.nk"), "{e}");
        assert!(read_seed(&nkeys::KeyPair::new_user().seed().unwrap()).is_ok());
    }
}
