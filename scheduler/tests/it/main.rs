//! End-to-end tests of Krest against real nats-server processes. Each test starts its own
//! server on a free port with a temporary store (see `harness`).
//!
//! Modules: `seed` (the seed's demo jobs), `jobs` (definitions, validation, revisions), `api`
//! (the request/reply API), `auth` (NATS logins, roles and permissions), `cli` (the `krest` binary), `schedules` (every, at, misfire
//! policies), `dispatch` (publishing and de-duplication), `strategies` (load balancing),
//! `overlap` (overlap policies and cancellation), `retries` (failure handling), `worker` (the
//! SDK's capacity, shutdown and redelivery), `ha` (leadership and failover), `http` (HTTP jobs,
//! alert webhooks, secrets kept out of views and logs), `faults` (the fault suite behind
//! docs/guarantees.md), `web_api` (the HTTP API), `web_ui` (the console in
//! headless Chromium). Add to these rather than adding modules.

#![allow(clippy::unwrap_used, missing_docs, unreachable_pub)]

mod api;
mod auth;
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
mod web_api;
mod web_ui;
mod worker;
