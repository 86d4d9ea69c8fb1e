//! What a node answers: the `krest.api.*` request/reply API ([`api`]) and the HTTP endpoint
//! ([`http`]: `/healthz`, `/readyz`).

pub mod api;
pub mod http;
