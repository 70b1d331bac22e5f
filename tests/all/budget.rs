//! The retry budget under a sustained outage.

use std::sync::Arc;

use idempotent_retry::{Error, budget::RetryBudget};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

const OPS: usize = 200;

async fn outage() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&server).await;
    server
}

#[tokio::test]
async fn sustained_503_amplification_is_bounded_by_the_budget() {
    let server = outage().await;
    let budget = Arc::new(RetryBudget::new());
    let client = client(Time::new().layer().policy(fast_policy().without_deadline()).budget(budget.clone()));

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
    let bound = OPS + (RetryBudget::DEFAULT_CAPACITY / RetryBudget::DEFAULT_RETRY_COST) as usize;
    assert!(sent <= bound, "{sent} requests for {OPS} operations, bound {bound}");
    // Without a budget it would be 5 per operation; the bucket paid for exactly 100 retries.
    assert_eq!(sent, bound);
    let host = format!("127.0.0.1:{}", server.address().port());
    assert!(budget.available(&host) < RetryBudget::DEFAULT_RETRY_COST, "drained");
    assert!(budget_errors >= OPS - 25, "once drained, operations stop after their first attempt: {budget_errors}");
}

#[tokio::test]
async fn without_a_budget_only_the_policy_bounds_retries() {
    let server = outage().await;
    let client = client(Time::new().layer().policy(fast_policy().without_deadline()).no_budget());
    for _ in 0..20 {
        client.post(server.uri()).body("{}").send().await.unwrap_err();
    }
    assert_eq!(requests_seen(&server).await, 20 * 5);
}

#[tokio::test]
async fn successes_refill_the_budget() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).up_to_n_times(1).mount(&server).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    let budget = Arc::new(RetryBudget::new());
    let client = client(Time::new().layer().budget(budget.clone()));
    let host = format!("127.0.0.1:{}", server.address().port());

    client.post(server.uri()).body("{}").send().await.unwrap();

    assert_eq!(budget.available(&host), 500, "the retry's cost came back with its success");
}
