//! The HTTP API under `/api/v1` and the web console (`/`, [`console`]), served on the node's
//! `--http` address next to the probes.
//!
//! Every operation goes through the same service layer as the NATS API
//! ([`ApiServer::answer`](super::api::ApiServer::answer)): the same checks, results, paging
//! and error messages; this module only maps HTTP onto it (paths, query parameters, bodies
//! parsed strictly, status codes, one error shape: [`error`]). What HTTP adds lives here too:
//! bearer-token access ([`auth`]), live run events as server-sent events ([`events`]), cron
//! previews, revision diffs, and the OpenAPI document ([`openapi`]) rendered from the route
//! table ([`routes::routes`]) the router itself is built from, so every route is documented.

pub mod auth;
pub mod console;
pub mod error;
mod events;
pub mod openapi;
pub mod routes;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use auth::{Access, WebOptions};

use super::api::ApiServer;
use super::http::HttpState;

/// Largest request body taken (a job apply of many documents fits; larger sets go in
/// several requests, as `krest job apply` sends them over NATS).
pub const MAX_BODY: usize = 1024 * 1024;

/// What the HTTP API works with.
#[derive(Clone)]
pub struct WebState {
    /// The service layer shared with the NATS API.
    pub api: ApiServer,
    /// The probes' state (this node's health for `GET /api/v1/cluster`).
    pub health: HttpState,
    /// Access checks.
    pub auth: Arc<auth::Auth>,
    /// Ends open event streams when the node stops (so the server can shut down).
    pub stop: CancellationToken,
}

/// The router of the HTTP API (built from [`routes::routes`]) and the console's files.
pub fn router(state: WebState) -> axum::Router {
    routes::router(state).merge(console::router())
}
