//! What happens after a run ends: triggering child jobs (`childJobs`) when it SUCCEEDS, and
//! alert webhooks (`alert`) when it ends in an outcome the job lists.
//!
//! Every node's recorder sees every run end, so each would act. A "done once" marker in the
//! `krest-once` bucket (kept 7 days, like the events) makes the first node act and the others —
//! and any node replaying old events — skip; the child run's message id (derived from the parent
//! run) drops the publishes of nodes that raced past the marker check.

use std::sync::Arc;

use async_nats::jetstream::kv;
use chrono::Utc;
use krest_schemas::api::{AlertPayload, RunStatus, RunSummary};
use krest_schemas::AlertOn;

use crate::record::alert::Alerter;
use krest_schemas::names::job_key;
use krest_schemas::Trigger;

use crate::jobs::JobTable;
use crate::leader::dispatch::{Fire, Publisher};

/// Follow-up actions on ended runs.
#[derive(Clone)]
pub struct Followups {
    /// The node's job table.
    pub table: Arc<JobTable>,
    /// Publishes child runs.
    pub publisher: Publisher,
    /// "Done once" markers.
    pub once: kv::Store,
    /// Sends alert webhooks.
    pub alerter: Alerter,
    /// This node's name (in alerts).
    pub node: String,
    /// Addresses child runs to instances.
    pub routing: Arc<crate::leader::balance::Routing>,
}

impl Followups {
    /// Acts on runs that just reached a final status.
    pub async fn on_ended(&self, runs: &[RunSummary]) {
        for run in runs {
            if run.status == RunStatus::Succeeded {
                self.trigger_children(run).await;
            }
            self.alert(run).await;
        }
    }

    async fn alert(&self, run: &RunSummary) {
        let key = job_key(&run.job_group, &run.job_name);
        let Some(job) = self.table.get(&key) else {
            return;
        };
        let Some(alert) = &job.stored.spec.alert else {
            return;
        };
        let mut kinds = Vec::new();
        match run.status {
            RunStatus::Failed => kinds.push(AlertOn::Failed),
            RunStatus::TimedOut => kinds.push(AlertOn::TimedOut),
            RunStatus::Cancelled => kinds.push(AlertOn::Cancelled),
            _ => {}
        }
        if run.misfired > 0 {
            kinds.push(AlertOn::Misfired);
        }
        for kind in kinds.into_iter().filter(|k| alert.on.contains(k)) {
            // Exactly one node sends each alert: the one that creates its marker.
            let marker = krest_schemas::names::alert_marker(&run.run_id, kind.as_str());
            match self.once.create(&marker, self.node.clone().into()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => {
                    tracing::warn!(run = %run.run_id, error = %e, "cannot claim the alert; not sending it");
                    continue;
                }
            }
            self.alerter.send(
                &alert.webhook,
                AlertPayload {
                    alert: kind.as_str().to_string(),
                    job: key.clone(),
                    run: run.clone(),
                    node: self.node.clone(),
                    at: Utc::now(),
                },
            );
        }
    }

    async fn trigger_children(&self, parent: &RunSummary) {
        let key = job_key(&parent.job_group, &parent.job_name);
        let Some(job) = self.table.get(&key) else {
            return;
        };
        for child_key in job.stored.spec.child_keys() {
            let Some(child) = self.table.get(&child_key) else {
                tracing::warn!(parent = %parent.run_id, child = %child_key, "child job does not exist (any more); not triggered");
                continue;
            };
            let run_id = krest_schemas::names::child_run_id(&child_key, &parent.run_id);
            let marker = krest_schemas::names::child_marker(&run_id);
            match self.once.get(&marker).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(run = %run_id, error = %e, "cannot check whether the child run was triggered; not triggering it now");
                    continue;
                }
            }
            let fire = Fire {
                run_id: run_id.clone(),
                args: child.stored.spec.args.to_value(),
                job: child,
                scheduled_at: Utc::now(),
                trigger: Trigger::Child,
                misfired: 0,
                skip: None,
                parent_run_id: Some(parent.run_id.clone()),
                shards: None,
                epoch: None,
                not_before: None,
            };
            // Routed like a manual run (a BROADCAST child reaches every instance).
            let mut fires = [fire];
            self.routing.assign(&mut fires, None).await;
            let [fire] = fires;
            match self
                .publisher
                .publish(std::slice::from_ref(&fire))
                .await
                .pop()
            {
                Some(Err(e)) => {
                    tracing::error!(run = %run_id, error = %e, "could not trigger the child job");
                    continue;
                }
                _ => tracing::info!(parent = %parent.run_id, run = %run_id, "child job triggered"),
            }
            if let Err(e) = self.once.put(&marker, parent.run_id.clone().into()).await {
                tracing::warn!(run = %run_id, error = %e, "could not record the child trigger");
            }
        }
    }
}
