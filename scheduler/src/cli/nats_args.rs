//! The NATS login flags every `krest` command takes, named like the `nats` CLI's and read from
//! the same environment variables (`NATS_USER`, `NATS_PASSWORD`, `NATS_TOKEN`, `NATS_CREDS`,
//! `NATS_NKEY`, `NATS_CERT`, `NATS_KEY`, `NATS_CA`, `NATS_INBOX_PREFIX`). `Debug` hides the
//! secrets.

use std::fmt;
use std::path::PathBuf;

use clap::Args;
use krest_worker::nats::NatsConfig;

/// NATS credentials and TLS (global flags).
#[derive(Clone, Default, Args)]
pub struct NatsArgs {
    /// NATS user name (with --password).
    #[arg(long, env = "NATS_USER", global = true, help_heading = "NATS login")]
    pub user: Option<String>,
    /// NATS password.
    #[arg(
        long,
        env = "NATS_PASSWORD",
        hide_env_values = true,
        global = true,
        help_heading = "NATS login"
    )]
    pub password: Option<String>,
    /// NATS authentication token.
    #[arg(
        long,
        env = "NATS_TOKEN",
        hide_env_values = true,
        global = true,
        help_heading = "NATS login"
    )]
    pub token: Option<String>,
    /// NATS credentials file (user JWT and seed).
    #[arg(long, env = "NATS_CREDS", global = true, help_heading = "NATS login")]
    pub creds: Option<PathBuf>,
    /// NATS nkey: a file holding the user seed, or the seed itself.
    #[arg(
        long,
        env = "NATS_NKEY",
        hide_env_values = true,
        global = true,
        help_heading = "NATS login"
    )]
    pub nkey: Option<String>,
    /// TLS client certificate (PEM).
    #[arg(long, env = "NATS_CERT", global = true, help_heading = "NATS login")]
    pub tlscert: Option<PathBuf>,
    /// TLS client key (PEM).
    #[arg(long, env = "NATS_KEY", global = true, help_heading = "NATS login")]
    pub tlskey: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify the server with (default: the system's).
    #[arg(long, env = "NATS_CA", global = true, help_heading = "NATS login")]
    pub tlsca: Option<PathBuf>,
    /// Prefix of reply subjects (default: `_INBOX`; workers `_INBOX_<app>`, nodes
    /// `_INBOX_krest`).
    #[arg(
        long,
        env = "NATS_INBOX_PREFIX",
        global = true,
        help_heading = "NATS login"
    )]
    pub inbox_prefix: Option<String>,
}

impl NatsArgs {
    /// The connection settings for `url` (empty values count as absent).
    pub fn config(&self, url: &str) -> NatsConfig {
        fn set(v: &Option<String>) -> Option<String> {
            v.clone().filter(|v| !v.is_empty())
        }
        fn path(v: &Option<PathBuf>) -> Option<PathBuf> {
            v.clone().filter(|v| !v.as_os_str().is_empty())
        }
        NatsConfig {
            url: url.to_string(),
            user: set(&self.user),
            password: set(&self.password),
            token: set(&self.token),
            creds: path(&self.creds),
            nkey: set(&self.nkey),
            tls_cert: path(&self.tlscert),
            tls_key: path(&self.tlskey),
            tls_ca: path(&self.tlsca),
            inbox_prefix: set(&self.inbox_prefix),
            name: String::new(),
        }
    }
}

impl fmt::Debug for NatsArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.config(""), f)
    }
}
