//! Delivery tokens: the proof that an attempt event or a hand-off comes from a worker that
//! received the run.
//!
//! Every work message carries `deliveryToken` = HMAC-SHA256(key, `<runId>/<shard>`) (hex, 128
//! bits), computed by whichever node dispatches it; the worker copies it into the run's
//! `started`, `log` and `finished` events and into their `Nats-Msg-Id`s. Someone able to
//! publish on the events subject but not to read the run's work message cannot guess it, so
//! cannot publish a forged result early under the real result's message id (JetStream would
//! drop the real one as a duplicate), and the recorder parks attempt events whose token is not
//! the run's. The router does the same for hand-offs.
//!
//! The key is random, made once by the first node and kept in the `krest-secrets` bucket,
//! which only the scheduler role may read (docs/security.md). The token is a pure function of
//! the run and shard, so a fire published twice (a retry, a new leader) carries the same
//! token — de-duplication keeps working — and any node can check it without state.

use std::fmt;

use async_nats::jetstream::kv;
use krest_schemas::names::DELIVERY_KEY;
use ring::hmac;
use ring::rand::SecureRandom;

/// The key delivery tokens are made with. `Debug` does not show it.
#[derive(Clone)]
pub struct DeliveryKey(hmac::Key);

impl fmt::Debug for DeliveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeliveryKey(<redacted>)")
    }
}

/// Why the key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryKeyError {
    /// The bucket did not answer or refused.
    #[error("cannot read or create the delivery key in krest-secrets: {0}")]
    Bucket(String),
    /// The stored key is not 32 bytes.
    #[error("the delivery key in krest-secrets is {0} bytes, not 32: delete it to have a new one made (runs in flight will then be refused)")]
    Malformed(usize),
    /// No randomness.
    #[error("cannot make a random delivery key")]
    Random,
}

impl DeliveryKey {
    /// A key from 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> DeliveryKey {
        DeliveryKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// Reads the key from `secrets`, creating it if no node has yet (the first creator wins).
    pub async fn load_or_create(secrets: &kv::Store) -> Result<DeliveryKey, DeliveryKeyError> {
        for _ in 0..3 {
            let found = secrets
                .get(DELIVERY_KEY)
                .await
                .map_err(|e| DeliveryKeyError::Bucket(e.to_string()))?;
            if let Some(bytes) = found {
                if bytes.len() != 32 {
                    return Err(DeliveryKeyError::Malformed(bytes.len()));
                }
                return Ok(DeliveryKey::from_bytes(&bytes));
            }
            let mut fresh = [0u8; 32];
            ring::rand::SystemRandom::new()
                .fill(&mut fresh)
                .map_err(|_| DeliveryKeyError::Random)?;
            match secrets
                .create(DELIVERY_KEY, bytes::Bytes::copy_from_slice(&fresh))
                .await
            {
                Ok(_) => return Ok(DeliveryKey::from_bytes(&fresh)),
                // Another node made it first: read theirs.
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(DeliveryKeyError::Bucket(e.to_string())),
            }
        }
        Err(DeliveryKeyError::Bucket(
            "the key kept changing while being read".into(),
        ))
    }

    /// The token of shard `shard` of run `run_id`.
    pub fn token(&self, run_id: &str, shard: u32) -> String {
        self.tag(&format!("{run_id}/{shard}"))
    }

    /// True when `token` is the token of shard `shard` of run `run_id` (compared in constant
    /// time).
    pub fn verify(&self, run_id: &str, shard: u32, token: &str) -> bool {
        same(&self.token(run_id, shard), token)
    }

    /// The proof that a scheduler node wrote an event about run `run_id` (`dispatched`,
    /// `skipped`), sent in the [`SCHEDULER_TOKEN_HEADER`] header: workers never see it.
    ///
    /// [`SCHEDULER_TOKEN_HEADER`]: krest_schemas::names::SCHEDULER_TOKEN_HEADER
    pub fn scheduler_token(&self, run_id: &str) -> String {
        self.tag(&format!("{run_id}/scheduler"))
    }

    /// True when `token` is [`DeliveryKey::scheduler_token`] of `run_id`.
    pub fn verify_scheduler(&self, run_id: &str, token: &str) -> bool {
        same(&self.scheduler_token(run_id), token)
    }

    /// HMAC-SHA256 of `input`, first 128 bits in hex.
    fn tag(&self, input: &str) -> String {
        let tag = hmac::sign(&self.0, input.as_bytes());
        let mut first = [0u8; 16];
        first.copy_from_slice(&tag.as_ref()[..16]);
        format!("{:032x}", u128::from_be_bytes(first))
    }
}

/// `a == b` in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_per_run_and_shard_and_key() {
        let k = DeliveryKey::from_bytes(&[7; 32]);
        let t = k.token("g.j.1000", 0);
        assert_eq!(t.len(), 32);
        assert_eq!(t, k.token("g.j.1000", 0));
        assert!(k.verify("g.j.1000", 0, &t));
        assert!(!k.verify("g.j.1000", 1, &t));
        assert!(!k.verify("g.j.1001", 0, &t));
        assert!(!k.verify("g.j.1000", 0, ""));
        assert!(!DeliveryKey::from_bytes(&[8; 32]).verify("g.j.1000", 0, &t));
        let s = k.scheduler_token("g.j.1000");
        assert!(k.verify_scheduler("g.j.1000", &s));
        assert!(!k.verify_scheduler("g.j.1001", &s));
        assert!(!k.verify("g.j.1000", 0, &s));
        assert_eq!(format!("{k:?}"), "DeliveryKey(<redacted>)");
    }
}
