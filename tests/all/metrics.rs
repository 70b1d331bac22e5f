//! The `metrics` feature: each metric's value after a scripted fault sequence, read from a
//! debugging recorder.
#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::time::Duration;

use http::Method;
use idempotent_retry::backoff::{ExponentialBackoff, Jitter};
use idempotent_retry::journal::MemoryStore;
use idempotent_retry::operation::OperationError;
use idempotent_retry::testing::{ChaosProxy, FakeCloud, Fault, LongRunning, RetryAfter, Schedule, ServerProfile};
use idempotent_retry::time::SeededRng;
use idempotent_retry::wait::WaitFor;
use idempotent_retry::{IdempotentRetry, Operations};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use serde_json::json;

use crate::support::*;

/// Every metric, as `name{label=value,…}` → its value.
fn read(snapshot: metrics_util::debugging::Snapshot) -> BTreeMap<String, DebugValue> {
    snapshot
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
            (format!("{}{{{}}}", key.name(), labels.join(",")), value)
        })
        .collect()
}

fn histogram(values: &[f64]) -> DebugValue {
    DebugValue::Histogram(values.iter().map(|v| (*v).into()).collect())
}

#[test]
fn each_metric_after_a_scripted_fault_sequence() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let host = metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(scripted_faults())
    });

    let metrics = read(snapshotter.snapshot());

    let expected = BTreeMap::from([
        // The keyed create: a 503, a lost answer, then 201 (3 attempts); the keyless one: a
        // lost answer, not resent (1). The polls: five GETs, one attempt each.
        ("idempotent_retry_attempts{method=POST}".to_owned(), histogram(&[3.0, 1.0])),
        ("idempotent_retry_attempts{method=GET}".to_owned(), histogram(&[1.0; 5])),
        ("idempotent_retry_retries_total{cause=unavailable}".to_owned(), DebugValue::Counter(1)),
        ("idempotent_retry_retries_total{cause=reset}".to_owned(), DebugValue::Counter(1)),
        // Retry-After 1 s over a 100 ms backoff; then 200 ms.
        ("idempotent_retry_retry_wait_seconds{}".to_owned(), histogram(&[1.0, 0.2])),
        // The lost answer came after the server created it: the retry is a replay.
        ("idempotent_retry_operations_total{outcome=replayed}".to_owned(), DebugValue::Counter(1)),
        ("idempotent_retry_operations_total{outcome=unknown}".to_owned(), DebugValue::Counter(1)),
        // 500 - 5 - 5, the last retry's 5 back on success, then +1 for each first-attempt poll.
        (format!("idempotent_retry_budget_tokens{{host={host}}}"), DebugValue::Gauge(500.0.into())),
        // Created 1.2 s in, ready at 11.2 s, seen at the poll at 16.2 s.
        ("idempotent_retry_resource_wait_seconds{outcome=ready}".to_owned(), histogram(&[15.0])),
    ]);
    assert_eq!(metrics, expected);
}

/// Returns the budget's host label.
async fn scripted_faults() -> String {
    let time = Time::new();
    let cloud = FakeCloud::builder(ServerProfile::stripe())
        .clock(time.clock.clone())
        .long_running(LongRunning::Status, Duration::from_secs(10))
        .start()
        .await;
    let posts = Schedule::script([Fault::unavailable(RetryAfter::Seconds(1)), Fault::Lose, Fault::Pass, Fault::Lose]);
    let proxy = ChaosProxy::builder(cloud.address()).schedule(posts).only(Method::POST).start().await;
    let layer: IdempotentRetry = time.layer().policy(fast_policy()).build();
    let ops = Operations::with_layer(reqwest::Client::new(), layer, MemoryStore::new())
        .clock(time.clock.clone())
        .sleeper(time.sleeper.clone())
        .rng(SeededRng::new(SEED));
    let url = format!("{}/cvms", proxy.uri());
    let polls = ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(30)).jitter(Jitter::None);

    let done = ops
        .operation("create-cvm/web-1")
        .post(&url)
        .json(&json!({"name": "web-1"}))
        .wait(WaitFor::field("status").target(["running"]).poll(polls))
        .send()
        .await
        .unwrap();
    assert_eq!(done.resource["status"], "running");
    let err =
        ops.operation("create-cvm/web-2").post(&url).json(&json!({"name": "web-2"})).no_key().send().await.unwrap_err();
    assert!(matches!(err, OperationError::GaveUp { may_have_been_applied: true, .. }), "{err}");

    proxy.uri().trim_start_matches("http://").to_owned()
}
