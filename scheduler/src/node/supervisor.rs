//! The node's supervisor: every task of a node is critical. Tasks run until the node asks them
//! to stop; one that ends or panics before that would leave a node that renews its lease and
//! answers health checks while it no longer schedules, records or answers. So the first such
//! exit is reported ([`Supervisor::failed`]), and the node shuts down the usual way — releasing
//! its lease, so a standby takes over at once — and exits non-zero for its orchestrator to
//! restart it.
//!
//! Dropping a [`Task`] aborts it, so a node that is dropped (as a crash would) takes every task
//! with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It returned.
    Returned,
    /// It panicked, with this message.
    Panicked(String),
    /// It was aborted.
    Aborted,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Returned => write!(f, "returned"),
            Exit::Panicked(m) => write!(f, "panicked: {m}"),
            Exit::Aborted => write!(f, "was aborted"),
        }
    }
}

/// Aborts named tasks of a running node from outside (tests use it to prove that a node whose
/// task died hands over its leadership).
#[derive(Clone, Debug, Default)]
pub struct TaskControl(Arc<Mutex<HashMap<&'static str, AbortHandle>>>);

impl TaskControl {
    /// Aborts the task named `name`; false if there is none.
    pub fn abort(&self, name: &str) -> bool {
        let Ok(tasks) = self.0.lock() else {
            return false;
        };
        match tasks.get(name) {
            Some(h) => {
                h.abort();
                true
            }
            None => false,
        }
    }

    /// The names of the node's tasks.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self
            .0
            .lock()
            .map(|t| t.keys().copied().collect())
            .unwrap_or_default();
        names.sort_unstable();
        names
    }
}

/// Spawns the node's tasks and hears of each one's end.
pub struct Supervisor {
    exits_tx: mpsc::UnboundedSender<(&'static str, Exit)>,
    exits: mpsc::UnboundedReceiver<(&'static str, Exit)>,
    control: TaskControl,
}

impl Supervisor {
    /// A supervisor whose tasks `control` can abort.
    pub fn new(control: TaskControl) -> Supervisor {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Supervisor {
            exits_tx,
            exits,
            control,
        }
    }

    /// Spawns `fut` as the critical task `name`.
    pub fn spawn(
        &self,
        name: &'static str,
        fut: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Task {
        let handle = tokio::spawn(fut);
        let abort = handle.abort_handle();
        if let Ok(mut tasks) = self.control.0.lock() {
            tasks.insert(name, abort.clone());
        }
        let (done_tx, done) = oneshot::channel();
        let exits = self.exits_tx.clone();
        tokio::spawn(async move {
            let exit = match handle.await {
                Ok(()) => Exit::Returned,
                Err(e) if e.is_panic() => {
                    Exit::Panicked(krest_schemas::text::panic_message(&*e.into_panic()))
                }
                Err(_) => Exit::Aborted,
            };
            let _ = exits.send((name, exit));
            let _ = done_tx.send(());
        });
        Task {
            abort,
            done: Some(done),
        }
    }

    /// Waits for the first task to end on its own; never returns if none does.
    pub async fn failed(&mut self) -> (&'static str, Exit) {
        match self.exits.recv().await {
            Some(exit) => exit,
            // We hold a sender, so the channel never closes.
            None => std::future::pending().await,
        }
    }
}

/// A running task: [`Task::join`] waits for its end; dropping it aborts it.
pub struct Task {
    abort: AbortHandle,
    done: Option<oneshot::Receiver<()>>,
}

impl Task {
    /// Waits until the task has ended.
    pub async fn join(mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if self.done.is_some() {
            self.abort.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_task_to_end_on_its_own_is_reported_with_how() {
        let control = TaskControl::default();
        let mut sup = Supervisor::new(control.clone());
        let _forever = sup.spawn("forever", std::future::pending());
        let _boom = sup.spawn("boom", async { panic!("engine exploded") });
        assert_eq!(
            sup.failed().await,
            ("boom", Exit::Panicked("engine exploded".into()))
        );
        assert!(control.abort("forever"));
        assert_eq!(sup.failed().await, ("forever", Exit::Aborted));
        assert!(!control.abort("nothing"));
        let done = sup.spawn("done", async {});
        done.join().await;
        assert_eq!(sup.failed().await, ("done", Exit::Returned));
    }
}
