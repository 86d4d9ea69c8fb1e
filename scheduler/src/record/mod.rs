//! What happened: the events stream recorded into SQL on every node, and what follows a run's
//! end.
//!
//! - [`recorder`]: an ordered consumer on `KREST_EVENTS` from the database's cursor;
//! - [`fold`]: a run's status from its attempts (pure);
//! - [`store`]: the SQL schema, idempotent batch upserts and queries (the only module that
//!   knows SQL);
//! - [`followup`]: child jobs and [`alert`]s once a run ends, once across nodes;
//! - [`retention`]: ended runs deleted by age and count per job, in small batches.

pub mod alert;
pub mod fold;
pub mod followup;
pub mod recorder;
pub mod retention;
pub mod store;
