//! End-to-end tests of Krest against real nats-server processes. Each test starts its own
//! server on a free port with a temporary store.
//!
//! Modules: `seed` (the seed's demo jobs), `retries` (failure handling), `ha` (leadership and
//! failover), `cli` (the `krest` binary), `api` (validation and job management).

#![allow(clippy::unwrap_used, missing_docs, unreachable_pub)]

mod api;
mod cli;
mod dispatch;
mod faults;
mod ha;
mod harness;
mod http;
mod jobs;
mod overlap;
mod retries;
mod schedules;
mod seed;
mod strategies;
mod worker;
