//! The retry budget through the layer: a sustained outage, throttles, time refill, partitions;
//! exact token counts and delays on injected time.

use std::sync::Arc;
use std::time::Duration;

use idempotent_retry::budget::{RetryBudget, RetryPartition};
use idempotent_retry::{Error, RequestOptions};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use idempotent_retry::time::Clock;

use crate::support::*;

const OPS: usize = 200;

async fn always(status: u16) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(status)).mount(&server).await;
    server
}

const H: &RetryPartition = &RetryPartition::HOST;

#[tokio::test]
async fn sustained_503_amplification_is_bounded_by_the_budget() {
    let server = always(503).await;
    let budget = Arc::new(RetryBudget::new().refill_rate(0.0));
    let time = Time::new();
    let client = client(time.layer().policy(fast_policy().without_deadline()).budget(budget.clone()));

    let mut budget_errors = 0;
    for _ in 0..OPS {
        let err = client.post(server.uri()).body("{}").send().await.unwrap_err();
        let err = Error::find(&err).unwrap();
        assert!(err.is_retryable(), "{err}");
        if matches!(err, Error::BudgetExhausted(_)) {
            budget_errors += 1;
        }
    }

    let sent = requests_seen(&server).await;
    // Without a budget it would be 5 per operation; the bucket paid for exactly 500 / 5 = 100
    // retries.
    let bound = OPS + (RetryBudget::DEFAULT_CAPACITY / RetryBudget::DEFAULT_RETRY_COST) as usize;
    assert_eq!(sent, bound);
    assert_eq!(budget.available(H, &budget_host(&server), time.clock.now()), 0, "drained");
    assert!(budget_errors >= OPS - 25, "once drained, operations stop after their first attempt: {budget_errors}");
}

/// The outage figure once the bucket drains, with operations spread over time (one a second,
/// each failing): exactly one request per operation by default; with time refill on, the
/// surplus is what the refill pays for (1 token a second, 5 a retry: one retry per 5 s).
#[tokio::test]
async fn the_outage_bound_holds_over_time_and_time_refill_pays_its_share() {
    for rate in [0.0, 1.0] {
        let server = always(503).await;
        let budget = Arc::new(RetryBudget::new().refill_rate(rate));
        let time = Time::new();
        let client = client(time.layer().policy(fast_policy().without_deadline()).budget(budget.clone()));
        while budget.available(H, &budget_host(&server), time.clock.now()) >= RetryBudget::DEFAULT_RETRY_COST {
            client.post(server.uri()).body("{}").send().await.unwrap_err();
        }
        let before = requests_seen(&server).await;
        let ops = 1_400;
        for _ in 0..ops {
            time.clock.advance(Duration::from_secs(1));
            client.post(server.uri()).body("{}").send().await.unwrap_err();
        }
        let retries = requests_seen(&server).await - before - ops;
        if rate == 0.0 {
            assert_eq!(retries, 0, "a drained bucket pays for nothing without successes");
        } else {
            // 1,400 s of refill pays for 280 retries, and their 100 ms waits for a few more.
            assert!((280..=286).contains(&retries), "{retries}");
        }
    }
}

/// A scripted run on injected time, every count exact: throttles cost 2 and back off on their
/// own schedule; transient failures cost 5; time pays the bucket back at 1 token a second.
#[tokio::test]
async fn throttles_cost_less_and_time_refills_exactly() {
    let server = MockServer::start().await;
    let throttled = ResponseTemplate::new(429);
    let unavailable = ResponseTemplate::new(503);
    Mock::given(method("POST")).respond_with(throttled).up_to_n_times(2).mount(&server).await;
    Mock::given(method("POST")).respond_with(unavailable).up_to_n_times(2).mount(&server).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    let budget = Arc::new(RetryBudget::new().capacity(40).refill_rate(1.0));
    let time = Time::new();
    let policy = fast_policy().with_throttle_backoff(
        idempotent_retry::backoff::ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(20))
            .jitter(idempotent_retry::backoff::Jitter::None),
    );
    let client = client(time.layer().policy(policy).budget(budget.clone()));
    let start = time.clock.now();

    // 429 (−2, wait 1 s, +1 s of time), 429 (−2, wait 2 s, +2), 503 (−5, wait 400 ms, +0.4),
    // 503 (−5, wait 800 ms, +0.8), 201: its last retry's 5 come back.
    let response = client.post(server.uri()).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(time.delays(), [ms(1_000), ms(2_000), ms(400), ms(800)], "throttled schedule, then transient");
    let now = time.clock.now();
    assert_eq!(now.duration_since(start).unwrap(), ms(4_200));
    // 40 − 2 + 1 − 2 + 2 − 5 + 0.4 − 5 + 0.8 = 30.2 (the bucket is refilled on each withdrawal,
    // and on the success, with the time to the last send), then + 5 returned = 35.2.
    assert_eq!(budget.available(H, &budget_host(&server), now), 35);
    time.clock.advance(ms(800));
    assert_eq!(budget.available(H, &budget_host(&server), time.clock.now()), 36);
    time.clock.advance(Duration::from_secs(60));
    assert_eq!(budget.available(H, &budget_host(&server), time.clock.now()), 40, "capped at the capacity");
}

#[tokio::test]
async fn successes_refill_the_budget() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).up_to_n_times(1).mount(&server).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    let budget = Arc::new(RetryBudget::new());
    let time = Time::new();
    let client = client(time.layer().budget(budget.clone()));

    client.post(server.uri()).body("{}").send().await.unwrap();

    assert_eq!(
        budget.available(H, &budget_host(&server), time.clock.now()),
        500,
        "the retry's cost came back with its success"
    );
}

#[tokio::test]
async fn without_a_budget_only_the_policy_bounds_retries() {
    let server = always(503).await;
    let client = client(Time::new().layer().policy(fast_policy().without_deadline()).no_budget());
    for _ in 0..20 {
        client.post(server.uri()).body("{}").send().await.unwrap_err();
    }
    assert_eq!(requests_seen(&server).await, 20 * 5);
}

/// One tenant's outage drains its partition only: the other tenant, through the same layer and
/// budget, to the same host, still gets its retries.
#[tokio::test]
async fn a_partition_drains_alone() {
    let server = always(503).await;
    let budget = Arc::new(RetryBudget::new().capacity(10));
    let time = Time::new();
    let a = RetryPartition::new("tenant-a").unwrap();
    let b = RetryPartition::new("tenant-b").unwrap();
    let client =
        client(time.layer().policy(fast_policy().without_deadline()).budget(budget.clone()).retry_partition(a.clone()));

    // The layer's partition (tenant-a): 2 retries paid, then drained.
    client.post(server.uri()).body("{}").send().await.unwrap_err();
    assert_eq!(requests_seen(&server).await, 3, "two retries for 10 tokens");
    assert_eq!(budget.available(&a, &budget_host(&server), time.clock.now()), 0);
    assert_eq!(budget.available(&b, &budget_host(&server), time.clock.now()), 10);
    assert_eq!(budget.available(H, &budget_host(&server), time.clock.now()), 10);

    // A request that names tenant-b draws from tenant-b's bucket.
    let err = client
        .post(server.uri())
        .body("{}")
        .with_extension(RequestOptions::new().retry_partition(b.clone()))
        .send()
        .await
        .unwrap_err();
    assert!(matches!(Error::find(&err), Some(Error::BudgetExhausted(_))), "{err}");
    assert_eq!(requests_seen(&server).await, 6);
    assert_eq!(budget.available(&b, &budget_host(&server), time.clock.now()), 0);
}

/// A 503 naming a throttling code, through the layer: a keyed write is retried on the throttled
/// schedule and pays the throttle's 2 tokens, where a plain 503 pays 5 and backs off on the
/// transient one; a keyless write is not resent (the 503 may have been applied), and the caller
/// is told the outcome is unknown.
#[tokio::test]
async fn a_503_with_a_throttling_code_is_a_throttle_that_may_have_been_applied() {
    use idempotent_retry::backoff::{ExponentialBackoff, Jitter};
    let slow_down = r#"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"#;
    for (body, cost, first_delay) in [(slow_down, 2, Duration::from_secs(3)), ("Service Unavailable", 5, ms(100))] {
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(503).set_body_string(body)).mount(&server).await;
        let budget = Arc::new(RetryBudget::new());
        let time = Time::new();
        let policy = fast_policy().with_max_attempts(2).with_throttle_backoff(
            ExponentialBackoff::new(Duration::from_secs(3), Duration::from_secs(20)).jitter(Jitter::None),
        );
        let client = client(time.layer().policy(policy).budget(budget.clone()));

        let err = client.post(server.uri()).body("{}").send().await.unwrap_err();
        assert!(matches!(Error::find(&err), Some(Error::AttemptsExhausted(_))), "{body}: {err}");
        assert_eq!(requests_seen(&server).await, 2, "{body}: one retry, with the key");
        assert_eq!(time.delays(), [first_delay], "{body}");
        assert_eq!(budget.available(H, &budget_host(&server), time.clock.now()), 500 - cost, "{body}");

        let keyless = client
            .post(server.uri())
            .body("{}")
            .with_extension(RequestOptions::new().no_key())
            .send()
            .await
            .unwrap_err();
        let keyless = Error::find(&keyless).unwrap();
        assert!(matches!(keyless, Error::OutcomeUnknown(_)), "{body}: {keyless}");
        assert!(keyless.may_have_been_applied(), "{body}");
        assert_eq!(requests_seen(&server).await, 3, "{body}: the keyless write went out once");
    }
}
