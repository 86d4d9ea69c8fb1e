//! Starts before reports: runs dispatched ahead of their time come due together (a second's
//! burst of fires), and the reports of runs that just finished — their `finished` events and
//! acks, each costing the worker, the server and the recorder about as much as a start — wait
//! until every run already due has started.
//!
//! A held run is counted here from when it begins holding until its task resumes at its time
//! ([`DueRuns::hold`], the guard dropped); a run due by the clock whose task has not resumed yet
//! is one of a burst still being started. Its task resumes before it waits for a running slot,
//! so runs waiting for slots held by long handlers do not hold reports back. A report waits at
//! most [`MAX_REPORT_WAIT`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The longest a finished run's report waits for due runs to start.
pub(crate) const MAX_REPORT_WAIT: Duration = Duration::from_millis(50);

/// Held runs by the time they are due (see the module documentation).
#[derive(Default)]
pub(crate) struct DueRuns {
    /// Due time → runs held for it whose tasks have not resumed.
    held: Mutex<BTreeMap<Instant, usize>>,
    /// Woken when no run due by the clock is left unstarted.
    quiet: Notify,
}

impl DueRuns {
    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<Instant, usize>> {
        // Never poisoned: nothing panics while holding it.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a run held until `until`, until the guard is dropped (when its task resumes).
    pub(crate) fn hold(&self, until: Instant) -> DueGuard<'_> {
        *self.held().entry(until).or_default() += 1;
        DueGuard { due: self, until }
    }

    /// Whether a run due by `now` has not started yet.
    fn busy(&self, now: Instant) -> bool {
        self.held()
            .first_key_value()
            .is_some_and(|(due, _)| *due <= now)
    }

    /// Waits until every run due now has started, at most [`MAX_REPORT_WAIT`].
    pub(crate) async fn quiet(&self) {
        let deadline = Instant::now() + MAX_REPORT_WAIT;
        loop {
            let notified = self.quiet.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.busy(Instant::now()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

/// A held run counted in [`DueRuns`].
pub(crate) struct DueGuard<'a> {
    due: &'a DueRuns,
    until: Instant,
}

impl Drop for DueGuard<'_> {
    fn drop(&mut self) {
        let quiet = {
            let mut held = self.due.held();
            if let Some(n) = held.get_mut(&self.until) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&self.until);
                }
            }
            let now = Instant::now();
            held.first_key_value().is_none_or(|(due, _)| *due > now)
        };
        if quiet {
            self.due.quiet.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `fut` once: whether it is still waiting.
    async fn pending<F: std::future::Future>(mut fut: std::pin::Pin<&mut F>) -> bool {
        std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx).is_pending())).await
    }

    #[tokio::test]
    async fn reports_wait_for_the_runs_due_to_start_and_no_longer() {
        let due = DueRuns::default();
        let now = Instant::now();
        // Nothing due: no wait.
        assert!(!pending(std::pin::pin!(due.quiet())).await);
        // Held for later: not due yet, no wait.
        let later = due.hold(now + Duration::from_secs(60));
        assert!(!pending(std::pin::pin!(due.quiet())).await);

        // Two runs due now: a report waits until both have started.
        let a = due.hold(now);
        let b = due.hold(now);
        let mut waiting = std::pin::pin!(due.quiet());
        assert!(
            pending(waiting.as_mut()).await,
            "two runs due are unstarted"
        );
        drop(a);
        assert!(
            pending(waiting.as_mut()).await,
            "one run due is still unstarted"
        );
        drop(b);
        assert!(!pending(waiting.as_mut()).await, "woken once both started");
        drop(later);

        // A run due that never starts holds a report back at most MAX_REPORT_WAIT.
        let _stuck = due.hold(now);
        let started = std::time::Instant::now();
        due.quiet().await;
        assert!(started.elapsed() >= MAX_REPORT_WAIT);
    }
}
