//! `GET /api/v1/runs/{run}/events`: a run's events as server-sent events, read from the
//! `KREST_EVENTS` stream (an ordered consumer on the job's subject, from just before the run
//! was dispatched) and filtered to the run.
//!
//! The stream opens with a `run` event (the run's summary as recorded), then forwards
//! `dispatched`, `started`, `log`, `finished` and `skipped` events as they are published
//! (each the event's JSON, redacted like every view), and ends with `end` once every shard
//! has finished for good (or at once, after `run`, when the run had already ended).

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use async_nats::jetstream::consumer;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use krest_schemas::api::{ErrorCode, Op, RunDetail, RunGetRequest, RunSummary};
use krest_schemas::names::{events_subject, EVENTS_STREAM};
use krest_schemas::RunEvent;

use super::error::WebError;
use super::WebState;

/// How far before the run's dispatch the replay starts (clock skew between nodes).
const REPLAY_MARGIN: Duration = Duration::from_secs(2);

pub(super) async fn run_events(
    State(s): State<WebState>,
    Path(run_id): Path<String>,
) -> Result<Response, WebError> {
    let detail: RunDetail = s
        .get(
            Op::RunsGet,
            &RunGetRequest {
                run_id: run_id.clone(),
                limit: Some(1),
                cursor: None,
            },
        )
        .await?;
    let run = detail.run;
    let mut feed = Feed {
        messages: None,
        pending: VecDeque::from([summary_event(&run)]),
        finished: HashSet::new(),
        shard_total: run.shard_total,
        run_id,
        ended: false,
    };
    if run.status.is_final() {
        feed.pending
            .push_back(Event::default().event("end").data(run.status.as_str()));
        feed.ended = true;
    } else {
        let internal = |e: String| {
            WebError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Internal,
                format!("cannot read the events stream: {e}"),
            )
        };
        let since = run.dispatched_at.or(run.scheduled_at);
        let deliver_policy = match since.and_then(|t| {
            let t = t - chrono::Duration::from_std(REPLAY_MARGIN).unwrap_or_default();
            time::OffsetDateTime::from_unix_timestamp(t.timestamp()).ok()
        }) {
            Some(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
            None => consumer::DeliverPolicy::All,
        };
        let stream = s
            .api
            .infra
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| internal(e.to_string()))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: events_subject(&run.app_name, &run.job_group, &run.job_name),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| internal(e.to_string()))?;
        feed.messages = Some(
            consumer
                .messages()
                .await
                .map_err(|e| internal(e.to_string()))?,
        );
    }
    let events = futures_util::stream::unfold(feed, Feed::next)
        .map(Ok::<_, Infallible>)
        .take_until(s.stop.clone().cancelled_owned());
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn summary_event(run: &RunSummary) -> Event {
    let mut run = run.clone();
    run.redact_secrets();
    Event::default()
        .event("run")
        .data(serde_json::to_string(&run).unwrap_or_default())
}

/// The events of one run, read from the job's events.
struct Feed {
    messages: Option<consumer::pull::Ordered>,
    pending: VecDeque<Event>,
    /// Shards that finished for good.
    finished: HashSet<u32>,
    shard_total: u32,
    run_id: String,
    ended: bool,
}

impl Feed {
    async fn next(mut self) -> Option<(Event, Feed)> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some((e, self));
            }
            if self.ended {
                return None;
            }
            let messages = self.messages.as_mut()?;
            let message = match messages.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    self.ended = true;
                    self.pending.push_back(
                        Event::default()
                            .event("error")
                            .data(format!("the events stream failed: {e}")),
                    );
                    continue;
                }
                None => return None,
            };
            let Ok(event) = serde_json::from_slice::<RunEvent>(&message.payload) else {
                continue;
            };
            if event.run_id() != self.run_id {
                continue;
            }
            match &event {
                RunEvent::Dispatched(d) => self.shard_total = d.shard_total.max(1),
                RunEvent::Skipped(_) => self.ended = true,
                RunEvent::Finished(f) if !f.will_retry => {
                    self.shard_total = f.shard_total.max(1);
                    self.finished.insert(f.shard);
                    if self.finished.len() as u32 >= self.shard_total {
                        self.ended = true;
                    }
                }
                _ => {}
            }
            let mut value = serde_json::to_value(&event).unwrap_or_default();
            krest_schemas::redact::json(&mut value);
            let kind = value
                .get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("event")
                .to_string();
            let mut sse = Event::default().event(kind).data(value.to_string());
            if let Ok(info) = message.info() {
                sse = sse.id(info.stream_sequence.to_string());
            }
            self.pending.push_back(sse);
            if self.ended {
                self.pending
                    .push_back(Event::default().event("end").data(""));
            }
        }
    }
}
