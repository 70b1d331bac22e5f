//! `Retry-After` in every form, as a floor, capped, and refused up front when it cannot fit.

use std::time::Duration;

use idempotent_retry::Error;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

async fn once_then_created(status: u16, retry_after: &str) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(status).insert_header("Retry-After", retry_after))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    server
}

#[tokio::test]
async fn every_form_gives_the_recorded_delay() {
    // The clock stands at Sun, 22 Nov 2026 00:00:00 GMT; each date is 7 s later.
    let cases = [
        (429, "7"),
        (503, "7"),
        (503, "Sun, 22 Nov 2026 00:00:07 GMT"),  // IMF-fixdate
        (503, "Sunday, 22-Nov-26 00:00:07 GMT"), // RFC 850
        (429, "Sun Nov 22 00:00:07 2026"),       // asctime
    ];
    for (status, value) in cases {
        let server = once_then_created(status, value).await;
        let time = Time::new();
        let client = client(time.layer().policy(fast_policy()));

        let response = client.post(server.uri()).body("{}").send().await.unwrap();

        assert_eq!(response.status(), 201, "{value}");
        assert_eq!(time.delays(), [Duration::from_secs(7)], "{status} Retry-After: {value}");
        one_key(&keys_seen(&server, "idempotency-key").await);
    }
}

#[tokio::test]
async fn below_the_backoff_the_backoff_wins() {
    let server = once_then_created(503, "0").await;
    let time = Time::new();
    let client = client(time.layer().policy(fast_policy()));
    client.post(server.uri()).body("{}").send().await.unwrap();
    assert_eq!(time.delays(), [ms(100)]);
}

#[tokio::test]
async fn over_the_cap_it_is_capped() {
    let server = once_then_created(503, "3600").await;
    let time = Time::new();
    let client = client(
        time.layer()
            .policy(fast_policy().with_max_retry_after(Duration::from_secs(5)).with_deadline(Duration::from_secs(60))),
    );

    let response = client.post(server.uri()).body("{}").send().await.unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(time.delays(), [Duration::from_secs(5)]);
}

#[tokio::test]
async fn past_the_deadline_it_fails_at_once_with_the_hint() {
    let server = once_then_created(503, "30").await;
    let time = Time::new();
    let client = client(
        time.layer()
            .policy(fast_policy().with_max_retry_after(Duration::from_secs(60)).with_deadline(Duration::from_secs(10))),
    );

    let err = client.post(server.uri()).body("{}").send().await.unwrap_err();

    let err = Error::find(&err).unwrap();
    assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    assert!(err.to_string().contains("retry after 30s"), "{err}");
    assert!(err.is_retryable());
    assert!(time.delays().is_empty(), "no sleep before failing");
    assert_eq!(requests_seen(&server).await, 1);
}

#[tokio::test]
async fn the_deadline_also_bounds_backoff_across_attempts() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", "4"))
        .mount(&server)
        .await;
    let time = Time::new();
    let client =
        client(time.layer().policy(fast_policy().with_max_attempts(10).with_deadline(Duration::from_secs(10))));

    let err = client.post(server.uri()).body("{}").send().await.unwrap_err();

    // 4 s + 4 s fit in 10 s; a third wait of 4 s would end at 12 s.
    assert!(matches!(Error::find(&err), Some(Error::DeadlineExceeded(_))), "{err}");
    assert_eq!(time.delays(), [Duration::from_secs(4), Duration::from_secs(4)]);
    assert_eq!(requests_seen(&server).await, 3);
}
