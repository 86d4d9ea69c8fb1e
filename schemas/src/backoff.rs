//! [`Backoff`]: the one formula for waiting between attempts, used for a job's retries (its
//! `retryBackoff`, or a worker's default) and for every component's reconnect and retry loops
//! ([`Backoff::RECONNECT`], [`Backoff::QUICK`]).

use std::time::Duration;

use crate::messages::BackoffMs;

/// Delay after failed attempt `n` (1-based): `initial × factor^(n-1)`, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Growth per further failure (below 1 counts as 1).
    pub factor: f64,
    /// Upper bound.
    pub max: Duration,
}

impl Default for Backoff {
    /// A job's retries when neither the job nor the worker says otherwise: 1 s, doubling, at
    /// most 60 s.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// Waiting for a service to come back (NATS, a stream, the database): 250 ms, doubling, at
    /// most 5 s.
    pub const RECONNECT: Backoff = Backoff {
        initial: Duration::from_millis(250),
        factor: 2.0,
        max: Duration::from_secs(5),
    };

    /// Retrying one operation that should succeed soon (a publish, a write): 100 ms,
    /// doubling, at most 2 s.
    pub const QUICK: Backoff = Backoff {
        initial: Duration::from_millis(100),
        factor: 2.0,
        max: Duration::from_secs(2),
    };

    /// The delay after failed attempt number `attempt` (1-based; 0 counts as 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.max(1.0).powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

impl From<BackoffMs> for Backoff {
    fn from(b: BackoffMs) -> Backoff {
        Backoff {
            initial: Duration::from_millis(b.initial_ms),
            factor: b.factor,
            max: Duration::from_millis(b.max_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_the_factor_and_stop_at_the_max() {
        let ms = |b: Backoff, n| b.delay(n).as_millis();
        let cases = [
            (Backoff::default(), [1000, 1000, 2000, 4000, 60_000, 60_000]),
            (Backoff::RECONNECT, [250, 250, 500, 1000, 5000, 5000]),
            (Backoff::QUICK, [100, 100, 200, 400, 2000, 2000]),
        ];
        for (b, expected) in cases {
            let got: Vec<u128> = [0, 1, 2, 3, 7, u32::MAX].map(|n| ms(b, n)).to_vec();
            assert_eq!(got, expected, "{b:?}");
        }
        let flat = Backoff {
            initial: Duration::from_secs(3),
            factor: 0.5,
            max: Duration::from_secs(10),
        };
        assert_eq!(
            flat.delay(5),
            Duration::from_secs(3),
            "factor below 1 counts as 1"
        );
        let from_job = Backoff::from(BackoffMs {
            initial_ms: 500,
            factor: 3.0,
            max_ms: 4000,
        });
        assert_eq!(from_job.delay(3), Duration::from_millis(4000));
        assert_eq!(from_job.delay(2), Duration::from_millis(1500));
    }
}
