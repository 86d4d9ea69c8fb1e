//! What a node answers: the `krest.api.*` request/reply API ([`api`]), with replies that fit in
//! one NATS message ([`page`]) and bulk applies ([`apply`]), and the HTTP endpoint ([`http`]:
//! `/healthz`, `/readyz`), and on the same address the HTTP API ([`web`]: `/api/v1`).

pub mod api;
pub mod apply;
pub mod http;
pub mod page;
pub mod web;
