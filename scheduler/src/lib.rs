//! Krest scheduler node and CLI.
//!
//! A node ([`node::run`]) is a set of tasks sharing one NATS connection:
//! - [`jobs`]: watches the jobs bucket into an in-memory [`jobs::JobTable`];
//! - [`lease`]: leader election through a KV lease with a fencing epoch;
//! - [`engine`]: on the leader, a heap of next fire times that turns due fires into
//!   [`dispatch::Fire`]s, catching up what a previous leader missed;
//! - [`dispatch`]: publishes runs (one message per shard) with deterministic `Nats-Msg-Id`s,
//!   addressed by [`balance`] (strategies over the live registry);
//! - [`router`]: on the leader, re-routes retries and the runs of departed instances;
//! - [`recorder`]: reads the events stream into SQL ([`store`]), then [`followup`] triggers
//!   child jobs of runs that succeeded and sends [`alert`]s for runs that did not;
//! - [`api`]: answers `krest.api.*` requests from the CLI and other clients;
//! - [`http`]: `/healthz` and `/readyz`;
//! - [`deadletter`]: parks bad input and runs that exhausted their deliveries.
//!
//! [`cli`] and [`client`] are the command-line side. Only [`store`] knows SQL.

pub mod alert;
pub mod api;
pub mod balance;
pub mod cancel;
pub mod cli;
pub mod client;
pub mod deadletter;
pub mod dispatch;
pub mod engine;
pub mod followup;
pub mod http;
pub mod infra;
pub mod jobs;
pub mod lease;
pub mod node;
pub mod recorder;
pub mod router;
pub mod store;
