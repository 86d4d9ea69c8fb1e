//! Which jobs have runs outstanding, asked of JetStream.
//!
//! A run is pending or running exactly while one of its messages is in the work stream: the
//! leader publishes the work before the run exists anywhere else, a worker acknowledges it only
//! after its result is stored, and every hand-off (a retry to the router, a re-route, a move off
//! a departed instance) publishes the next message before acknowledging the previous one. Work
//! subjects name the job (`krest.work.<app>.<group>.<name>.…`), so the stream's per-subject
//! counts answer "is this job's previous run still going?" — with no lag, on any node, and the
//! same for a leader that took over a second ago. The overlap policies decide from this, never
//! from a node's own database (which lags the events).

use std::collections::{BTreeSet, HashSet};

use async_nats::jetstream;
use futures_util::StreamExt;
use krest_schemas::names::{job_key, parse_work_subject, work_job_filter, WORK_STREAM};
use krest_schemas::RunMessage;

/// Above this many jobs, one listing of every work subject is cheaper than one per job.
const PER_JOB_QUERIES: usize = 8;

/// Why the question could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum OutstandingError {
    /// The work stream could not be read.
    #[error("cannot read the work stream: {0}")]
    Stream(String),
}

/// Asks the work stream about outstanding runs.
#[derive(Clone, Debug)]
pub struct Outstanding {
    js: jetstream::Context,
}

impl Outstanding {
    /// Asks through `js`.
    pub fn new(js: jetstream::Context) -> Outstanding {
        Outstanding { js }
    }

    async fn subjects(&self, filter: &str) -> Result<Vec<String>, OutstandingError> {
        let err = |e: &dyn std::fmt::Display| OutstandingError::Stream(e.to_string());
        let stream = self.js.get_stream(WORK_STREAM).await.map_err(|e| err(&e))?;
        let mut subjects = stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| err(&e))?;
        let mut out = Vec::new();
        while let Some(s) = subjects.next().await {
            let (subject, count) = s.map_err(|e| err(&e))?;
            if count > 0 {
                out.push(subject);
            }
        }
        Ok(out)
    }

    /// The keys, among `jobs` (`(group, name)` pairs), of jobs with runs outstanding.
    pub async fn busy(
        &self,
        jobs: &BTreeSet<(String, String)>,
    ) -> Result<HashSet<String>, OutstandingError> {
        let mut out = HashSet::new();
        if jobs.len() <= PER_JOB_QUERIES {
            for (group, name) in jobs {
                if !self
                    .subjects(&work_job_filter(group, name))
                    .await?
                    .is_empty()
                {
                    out.insert(job_key(group, name));
                }
            }
            return Ok(out);
        }
        for subject in self.subjects(krest_schemas::names::WORK_SUBJECTS).await? {
            if let Some(w) = parse_work_subject(&subject) {
                if jobs.contains(&(w.group.clone(), w.name.clone())) {
                    out.insert(w.job_key());
                }
            }
        }
        Ok(out)
    }

    /// The outstanding runs of job `group.name`, as `(run id, app)`: the newest message on
    /// each of its work subjects (a job's runs replace each other under REPLACE, so there is
    /// rarely more than one).
    pub async fn runs(
        &self,
        group: &str,
        name: &str,
    ) -> Result<Vec<(String, String)>, OutstandingError> {
        let stream = self
            .js
            .get_stream(WORK_STREAM)
            .await
            .map_err(|e| OutstandingError::Stream(e.to_string()))?;
        let mut out = BTreeSet::new();
        for subject in self.subjects(&work_job_filter(group, name)).await? {
            // Gone in between: that run ended.
            let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await else {
                continue;
            };
            if let Ok(run) = serde_json::from_slice::<RunMessage>(&m.payload) {
                out.insert((run.run.run_id, run.run.app_name));
            }
        }
        Ok(out.into_iter().collect())
    }
}
