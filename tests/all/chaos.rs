//! The chaos example's setting as a test: the example's fault mix over several seeds, many
//! concurrent operations. Ours never duplicates; a blind retry layer does.

use std::time::Duration;

use futures_util::StreamExt;
use http::Method;
use idempotent_retry::testing::{ChaosProxy, FakeCloud, FaultMix, RetryAfter, Schedule, ServerProfile};
use reqwest_middleware::ClientWithMiddleware;

use crate::support::*;

const OPS: usize = 120;

/// Runs `OPS` concurrent creates through a chaos proxy; returns (duplicates, created, succeeded).
async fn run(seed: u64, make_client: impl FnOnce() -> ClientWithMiddleware) -> (usize, usize, Vec<String>) {
    let cloud = FakeCloud::start(ServerProfile::stripe()).await;
    let mix = FaultMix::chaos().with_retry_after(Some(RetryAfter::Seconds(1)));
    let proxy =
        ChaosProxy::builder(cloud.address()).schedule(Schedule::random(seed, mix)).only(Method::POST).start().await;
    let client = make_client();
    let url = format!("{}/cvms", proxy.uri());
    let succeeded: Vec<String> = futures_util::stream::iter(0..OPS)
        .map(|i| {
            let (client, url) = (&client, &url);
            async move {
                let name = format!("cvm-{i:04}");
                let response = client.post(url).json(&serde_json::json!({ "name": name })).send().await;
                response.is_ok_and(|r| r.status().is_success()).then_some(name)
            }
        })
        .buffer_unordered(12)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    proxy.settle().await;
    assert!(proxy.faults_injected() > OPS / 5, "the mix injected faults");
    for name in &succeeded {
        assert!(cloud.created_named(name) >= 1, "{name} reported success without a resource");
    }
    (cloud.duplicates(), cloud.created(), succeeded)
}

#[tokio::test]
async fn ours_never_duplicates_whatever_the_seed() {
    for seed in 1..=6 {
        let time = Time::new();
        let (duplicates, created, succeeded) = run(seed, || client(time.layer())).await;

        assert_eq!(duplicates, 0, "seed {seed}");
        assert!(created <= OPS, "seed {seed}");
        assert!(succeeded.len() >= OPS * 9 / 10, "seed {seed}: {} of {OPS} succeeded", succeeded.len());
    }
}

#[tokio::test]
async fn a_blind_retry_layer_duplicates_under_the_same_faults() {
    use reqwest_retry::RetryTransientMiddleware;
    use reqwest_retry::policies::ExponentialBackoff;
    // reqwest-retry with its default strategy; only the delays are shortened to keep the test quick.
    let policy = ExponentialBackoff::builder()
        .retry_bounds(Duration::from_millis(1), Duration::from_millis(10))
        .build_with_max_retries(3);
    let (duplicates, created, _) = run(1, || {
        reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(RetryTransientMiddleware::new_with_policy(policy))
            .build()
    })
    .await;

    assert!(duplicates > OPS / 10, "{duplicates} duplicates");
    assert!(created - duplicates <= OPS, "one named CVM per operation, the rest duplicates");
}
