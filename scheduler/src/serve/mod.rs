//! What a node answers: the `krest.api.*` request/reply API ([`api`]), with replies that fit in
//! one NATS message ([`page`]) and bulk applies ([`apply`]), and the HTTP endpoint ([`http`]:
//! `/healthz`, `/readyz`).

pub mod api;
pub mod apply;
pub mod http;
pub mod page;
