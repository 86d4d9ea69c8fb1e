//! Dispatch straight through the publisher: large batches complete (the pipelining window
//! never deadlocks on the client's ack permits) and a second publish of the same fires stores
//! nothing.

use std::sync::Arc;

use chrono::Utc;
use krest::infra::{self, InfraConfig};
use krest::jobs::JobEntry;
use krest::leader::dispatch::{Fire, Publisher};
use krest_schemas::names::WORK_STREAM;
use krest_schemas::{parse_job, StoredJob, Trigger};
use serde_json::json;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_ack_window_is_stored_once() {
    let env = Env::new("dispatch");
    let client = async_nats::connect(env.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let infra = infra::ensure(&js, &InfraConfig::default()).await.unwrap();
    let items: Vec<u32> = (0..1000).collect();
    let spec = parse_job(&json!({"appName": "a", "jobName": "big", "path": "p", "jobType": "SHARDING", "args": items})).unwrap();
    let now = Utc::now();
    let job = Arc::new(JobEntry {
        stored: StoredJob {
            spec,
            created_at: now,
            updated_at: now,
            version: 1,
        },
        revision: 1,
        version: 1,
    });
    // 7 fires × 1000 shards: 7007 messages in one call, more than the context's 5000 permits.
    let fires: Vec<Fire> = (0..7)
        .map(|i| {
            Fire::scheduled(
                job.clone(),
                now + chrono::Duration::seconds(i),
                Trigger::Schedule,
                0,
            )
        })
        .collect();
    let publisher = Publisher::new(js.clone(), "n1".into(), infra.delivery.clone());
    assert!(publisher.publish(&fires).await.iter().all(Result::is_ok));
    let stream = js.get_stream(WORK_STREAM).await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 7000);
    // The same fires again, as a second leader would publish them: all duplicates.
    assert!(publisher.publish(&fires).await.iter().all(Result::is_ok));
    assert_eq!(stream.get_info().await.unwrap().state.messages, 7000);
    let last = krest_schemas::JobState {
        last_fire_at: fires[6].scheduled_at,
        last_run_id: fires[6].run_id.clone(),
        queued: None,
    };
    publisher
        .write_states(&[("default.big", &last)], None)
        .await
        .unwrap();
    let state = js
        .get_key_value("krest-state")
        .await
        .unwrap()
        .get("default.big")
        .await
        .unwrap()
        .unwrap();
    let state: krest_schemas::JobState = serde_json::from_slice(&state).unwrap();
    assert_eq!(state.last_fire_at, fires[6].scheduled_at);
}
