//! The core loop against a real HTTP server (wiremock): one key across attempts, delays as the
//! policy says, replays, key reuse, final statuses.

use std::time::Duration;

use idempotent_retry::{Error, IdempotencyKey, RequestOptions, RetryOutcome, RetryPolicy};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

async fn fails_then_creates(failures: u64, status: u16) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/cvms"))
        .respond_with(ResponseTemplate::new(status))
        .up_to_n_times(failures)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cvms"))
        .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({"id": "cvm-1"})))
        .mount(&server)
        .await;
    server
}

#[tokio::test]
async fn two_503s_then_201_three_attempts_one_key_policy_delays() {
    let server = fails_then_creates(2, 503).await;
    let time = Time::new();
    let client = client(time.layer().policy(fast_policy()));

    let response =
        client.post(format!("{}/cvms", server.uri())).json(&serde_json::json!({"name": "web-1"})).send().await.unwrap();

    assert_eq!(response.status(), 201);
    let keys = keys_seen(&server, "idempotency-key").await;
    assert_eq!(keys.len(), 3);
    let key = one_key(&keys);
    assert_eq!(time.delays(), [ms(100), ms(200)]);
    let outcome = RetryOutcome::of(&response).unwrap().clone();
    assert_eq!(outcome.attempts, 3);
    assert_eq!(outcome.key.unwrap().as_str(), key);
    assert!(!outcome.replayed);
    assert_eq!(outcome.total_delay, ms(300));
    // Every attempt sent the identical body.
    let bodies: Vec<_> = server.received_requests().await.unwrap().into_iter().map(|r| r.body).collect();
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["id"], "cvm-1");
}

#[tokio::test]
async fn full_jitter_delays_are_the_policys_for_the_seed() {
    let server = fails_then_creates(3, 503).await;
    let time = Time::new();
    let client = client(time.layer());

    let response = client.post(format!("{}/cvms", server.uri())).body("{}").send().await.unwrap();

    assert_eq!(response.status(), 201);
    // Computed apart from the code under test (Python: SplitMix64 from seed 0x5eed, each draw
    // scaled as (r * (ceiling_ns + 1)) >> 64, ceilings 200, 400, 800 ms):
    // [7769746, 133120443, 291745485] ns.
    let want = [Duration::from_nanos(7_769_746), Duration::from_nanos(133_120_443), Duration::from_nanos(291_745_485)];
    assert_eq!(time.delays(), want);
    one_key(&keys_seen(&server, "idempotency-key").await);
}

#[tokio::test]
async fn conflict_in_flight_then_replayed_201_is_a_replayed_success() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(409).set_body_string(r#"{"error":"a request with this key is in progress"}"#),
        )
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(201)
                .insert_header("Idempotent-Replayed", "true")
                .set_body_string(r#"{"id":"cvm-1"}"#),
        )
        .mount(&server)
        .await;
    let time = Time::new();
    let client = client(time.layer().policy(fast_policy()));

    let response = client.post(server.uri()).body("{}").send().await.unwrap();

    assert_eq!(response.status(), 201);
    let outcome = RetryOutcome::of(&response).unwrap();
    assert!(outcome.replayed);
    assert_eq!(outcome.attempts, 2);
    one_key(&keys_seen(&server, "idempotency-key").await);
    assert_eq!(time.delays(), [ms(100)]);
}

#[tokio::test]
async fn unprocessable_422_is_a_key_reuse_error_after_one_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(422).set_body_string("Idempotency-Key is already used with another payload"),
        )
        .mount(&server)
        .await;
    let time = Time::new();
    let client = client(time.layer());

    let err = client.post(server.uri()).body("{}").send().await.unwrap_err();

    let err = Error::find(&err).expect("typed error");
    assert!(err.is_key_reuse(), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(err.status().map(|s| s.as_u16()), Some(422));
    assert_eq!(err.attempts(), 1);
    let sent = one_key(&keys_seen(&server, "idempotency-key").await);
    assert_eq!(err.idempotency_key().unwrap().as_str(), sent);
    let Some(idempotent_retry::error::LastAttempt::Status { body, .. }) = err.failure().map(|f| &f.last) else {
        panic!()
    };
    assert_eq!(&body[..], b"Idempotency-Key is already used with another payload");
    assert_eq!(requests_seen(&server).await, 1);
    assert!(time.delays().is_empty());
}

#[tokio::test]
async fn conflict_saying_mismatch_and_stripe_idempotency_error_are_key_reuse() {
    for (status, body) in [
        (
            409,
            r#"{"message":"There was a mismatch between this request's parameters and the parameters of a previously stored request"}"#,
        ),
        (
            400,
            r#"{"error":{"type":"idempotency_error","message":"Keys for idempotent requests can only be used with the same parameters"}}"#,
        ),
        (417, ""),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_string(body))
            .mount(&server)
            .await;
        let client = client(Time::new().layer());
        let err = client.post(server.uri()).body("{}").send().await.unwrap_err();
        assert!(Error::find(&err).unwrap().is_key_reuse(), "{status}");
        assert_eq!(requests_seen(&server).await, 1, "{status}");
    }
}

#[tokio::test]
async fn a_replayed_503_stops_at_once() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).insert_header("Idempotent-Replayed", "true"))
        .mount(&server)
        .await;
    let time = Time::new();
    let client = client(time.layer());

    let err = client.post(server.uri()).body("{}").send().await.unwrap_err();

    let err = Error::find(&err).unwrap();
    assert!(matches!(err, Error::ReplayedFailure(_)), "{err}");
    assert!(err.may_have_been_applied());
    assert_eq!(requests_seen(&server).await, 1);
    assert!(time.delays().is_empty());
}

#[tokio::test]
async fn final_statuses_come_back_as_responses_with_body_and_url() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(404).set_body_string("no such app"))
        .mount(&server)
        .await;
    let client = client(Time::new().layer());
    let url = format!("{}/apps/a1/cvms", server.uri());

    let response = client.post(&url).body("{}").send().await.unwrap();

    assert_eq!(response.status(), 404);
    assert_eq!(response.url().as_str(), url);
    assert_eq!(RetryOutcome::of(&response).unwrap().attempts, 1);
    assert_eq!(response.text().await.unwrap(), "no such app");
    assert_eq!(requests_seen(&server).await, 1);
}

#[tokio::test]
async fn retries_exhausted_on_sustained_503_carry_the_last_status() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503).set_body_string("down")).mount(&server).await;
    let time = Time::new();
    let client = client(time.layer().policy(fast_policy().with_max_attempts(3)));

    let err = client.post(server.uri()).body("{}").send().await.unwrap_err();

    let err = Error::find(&err).unwrap();
    assert!(matches!(err, Error::AttemptsExhausted(_)), "{err}");
    assert!(err.is_retryable());
    assert!(err.may_have_been_applied());
    assert_eq!(err.attempts(), 3);
    assert_eq!(err.status().map(|s| s.as_u16()), Some(503));
    assert_eq!(requests_seen(&server).await, 3);
    assert_eq!(time.delays(), [ms(100), ms(200)]);
    one_key(&keys_seen(&server, "idempotency-key").await);
}

#[tokio::test]
async fn keyless_post_503_is_an_unknown_outcome_but_429_is_retried() {
    // A 503 may come from a proxy that forwarded the request: without a key it is not resent.
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&server).await;
    let keyless = client(Time::new().layer());
    let err =
        keyless.post(server.uri()).body("{}").with_extension(RequestOptions::new().no_key()).send().await.unwrap_err();
    let err = Error::find(&err).unwrap();
    assert!(err.is_outcome_unknown(), "{err}");
    assert!(err.idempotency_key().is_none());
    assert_eq!(requests_seen(&server).await, 1);
    assert_eq!(keys_seen(&server, "idempotency-key").await, [None]);

    // A 429 is a refusal before processing: safe to resend without a key.
    let server = fails_then_creates(2, 429).await;
    let time = Time::new();
    let retrying = client(time.layer().policy(fast_policy()));
    let response = retrying
        .post(format!("{}/cvms", server.uri()))
        .body("{}")
        .with_extension(RequestOptions::new().no_key())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(keys_seen(&server, "idempotency-key").await, [None, None, None]);
}

#[tokio::test]
async fn idempotent_methods_are_retried_without_a_key() {
    let server = MockServer::start().await;
    Mock::given(method("PUT")).respond_with(ResponseTemplate::new(502)).up_to_n_times(1).mount(&server).await;
    Mock::given(method("PUT")).respond_with(ResponseTemplate::new(200)).mount(&server).await;
    let client = client(Time::new().layer());

    let response = client.put(server.uri()).body("{}").send().await.unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(keys_seen(&server, "idempotency-key").await, [None, None]);
}

#[tokio::test]
async fn per_request_overrides_no_retry_and_policy() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&server).await;
    let client = client(Time::new().layer());

    let err =
        client.post(server.uri()).body("{}").with_extension(RequestOptions::new().no_retry()).send().await.unwrap_err();
    assert_eq!(Error::find(&err).unwrap().attempts(), 1);
    assert_eq!(requests_seen(&server).await, 1);

    let two = RequestOptions::new().policy(fast_policy().with_max_attempts(2));
    let err = client.post(server.uri()).body("{}").with_extension(two).send().await.unwrap_err();
    assert_eq!(Error::find(&err).unwrap().attempts(), 2);
    assert_eq!(requests_seen(&server).await, 3);

    // Contradictory options: nothing is sent.
    let bad = RequestOptions::new().policy(RetryPolicy::standard()).no_retry();
    let err = client.post(server.uri()).body("{}").with_extension(bad).send().await.unwrap_err();
    assert!(matches!(Error::find(&err), Some(Error::InvalidRequest(_))), "{err}");
    assert_eq!(requests_seen(&server).await, 3);
}

#[tokio::test]
async fn typed_error_comes_back_out_by_value() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(422)).mount(&server).await;
    let client = client(Time::new().layer());
    let err = client.post(server.uri()).body("{}").send().await.unwrap_err();
    let owned: Error = Error::from_middleware(err).expect("our error");
    assert!(owned.is_key_reuse());
    // The chain: decision, then how the last attempt ended. Each said once.
    let source = std::error::Error::source(&owned).expect("a failure");
    assert!(source.to_string().contains("422"), "{source}");
    assert!(!owned.to_string().contains("422"), "{owned}");
}

#[tokio::test]
async fn on_retry_reports_each_retry_as_data() {
    use std::sync::{Arc, Mutex};
    let server = fails_then_creates(2, 503).await;
    let time = Time::new();
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let client = client(time.layer().policy(fast_policy()).on_retry(move |e| seen.lock().unwrap().push(e.clone())));

    client.post(format!("{}/cvms?token=secret", server.uri())).body("{}").send().await.unwrap();

    let events = events.lock().unwrap().clone();
    let key = one_key(&keys_seen(&server, "idempotency-key").await);
    assert_eq!(events.len(), 2);
    assert_eq!(
        events.iter().map(|e| (e.attempt, e.max_attempts, e.delay)).collect::<Vec<_>>(),
        [(1, 5, ms(100)), (2, 5, ms(200))]
    );
    assert!(events.iter().all(|e| e.cause == "503"));
    assert!(events.iter().all(
        |e| e.key_fingerprint.as_deref() == Some(IdempotencyKey::new(key.clone()).unwrap().fingerprint().as_str())
    ));
    assert_eq!(events[0].target, format!("POST {}/cvms", server.uri()), "no query string: it may hold secrets");
}
