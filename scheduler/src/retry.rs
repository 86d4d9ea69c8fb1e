//! Waiting between attempts: every retry loop of a node waits with
//! [`krest_schemas::Backoff`] (one formula, shared with the worker SDK and job retries) and
//! stops waiting when the node stops.

use std::future::Future;

use krest_schemas::Backoff;
use tokio_util::sync::CancellationToken;

/// Sleeps `backoff`'s delay after `failures` consecutive failures; `false` if `stop` fired
/// first.
pub async fn pause(stop: &CancellationToken, backoff: Backoff, failures: u32) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(backoff.delay(failures)) => true,
        _ = stop.cancelled() => false,
    }
}

/// What to do after a failed attempt.
pub enum Failure<E> {
    /// Log and try again.
    Retry(E),
    /// Give up with this error.
    Fatal(E),
}

/// Runs `op` until it succeeds (`Ok(Some)`), fails for good (`Err`), or `stop` fires
/// (`Ok(None)`), waiting `backoff` between attempts. The first failure and every tenth are
/// logged as a warning: `what` says what failed (`cannot connect to NATS at …`).
pub async fn until_ok<T, E, F, Fut>(
    stop: &CancellationToken,
    backoff: Backoff,
    what: &str,
    mut op: F,
) -> Result<Option<T>, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure<E>>>,
{
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            r = op() => r,
            _ = stop.cancelled() => return Ok(None),
        };
        match attempt {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(failures, "{what}: recovered");
                }
                return Ok(Some(v));
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(e)) => {
                failures += 1;
                if failures == 1 || failures % 10 == 0 {
                    tracing::warn!(error = %e, failures, "{what}; retrying");
                }
                if !pause(stop, backoff, failures).await {
                    return Ok(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_a_fatal_error_or_stop() {
        let stop = CancellationToken::new();
        let mut n = 0;
        let r: Result<Option<u32>, String> = until_ok(&stop, Backoff::QUICK, "test", || {
            n += 1;
            let n = n;
            async move {
                if n < 4 {
                    Err(Failure::Retry(format!("attempt {n}")))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r, Ok(Some(4)));
        let r: Result<Option<u32>, String> = until_ok(&stop, Backoff::QUICK, "test", || async {
            Err(Failure::Fatal("bad url".to_string()))
        })
        .await;
        assert_eq!(r, Err("bad url".to_string()));
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            stopper.cancel();
        });
        let r: Result<Option<u32>, String> =
            until_ok(&stop, Backoff::RECONNECT, "test", || async {
                Err(Failure::Retry("down".to_string()))
            })
            .await;
        assert_eq!(r, Ok(None));
    }
}
