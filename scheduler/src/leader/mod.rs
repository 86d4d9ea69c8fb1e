//! Everything only the leader does, and the election that decides who that is.
//!
//! - [`lease`]: the KV lease, its fencing epoch and the node's [`lease::Leadership`] view;
//! - [`state`]: leadership as one value — the engine task builds a leader's state at each
//!   takeover (from NATS) and drops it when leadership ends;
//! - [`engine`]: the cron heap that turns due schedules into [`dispatch::Fire`]s;
//! - [`outstanding`]: which jobs have runs outstanding, asked of the work stream (overlap
//!   policies);
//! - [`dispatch`]: fires → work messages and events, pipelined, with deterministic message ids
//!   (also used by non-leaders for manual and child runs, which need no leadership);
//! - [`balance`]: the live worker registry and the load-balancing strategies;
//! - [`router`]: retries of addressed runs and the runs of departed instances.

pub mod balance;
pub mod dispatch;
pub mod engine;
pub mod lease;
pub mod outstanding;
pub mod router;
pub mod state;
