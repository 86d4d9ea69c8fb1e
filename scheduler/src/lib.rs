//! Krest scheduler node and CLI.
//!
//! A node ([`node::run`]) is a set of supervised tasks sharing one NATS connection, grouped by
//! role:
//! - [`leader`]: the election ([`leader::lease`]) and everything only the leader does — the
//!   cron [`leader::engine`], [`leader::dispatch`] of fires as messages, the strategies of
//!   [`leader::balance`] and the [`leader::router`] for retries and departed instances;
//! - [`record`]: every node records the events stream into SQL ([`record::recorder`],
//!   [`record::store`]), then follows up on ended runs (child jobs, alerts);
//! - [`serve`]: the `krest.api.*` request/reply API and the HTTP endpoints (health, [`metrics`]);
//! - [`jobs`] (the node's copy of the job definitions), [`infra`] (streams and buckets),
//!   [`cancel`], [`deadletter`] and [`delivery`] (the delivery tokens that prove an attempt
//!   event comes from a worker that received the run) are shared by the roles.
//!
//! [`cli`] is the command-line side. Only [`record::store`] knows SQL.

pub mod cancel;
pub mod cli;
pub mod deadletter;
pub mod delivery;
pub mod error;
pub mod infra;
pub mod jobs;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod record;
pub mod retry;
pub mod serve;

/// Krest's version and the git revision it was built from: `0.1.0 (abc1234)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("KREST_GIT_REVISION"),
    ")"
);
