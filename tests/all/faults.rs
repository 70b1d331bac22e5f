//! Transport faults on real sockets: resets after the server read the request, refused
//! connections, attempt timeouts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_retry::testing::{CacheErrors, Fault, Schedule, ServerProfile};
use idempotent_retry::{
    Error, RequestOptions, RetryOutcome,
    time::{Sleep, Sleeper},
};

use crate::support::*;

#[tokio::test]
async fn keyed_post_survives_resets_with_one_key() {
    const RESETS: usize = 3;
    let server = ResetServer::start(RESETS).await;
    let time = Time::new();
    let client = client(time.layer().policy(fast_policy()));

    let response = client.post(format!("{}/cvms", server.url)).body(r#"{"name":"web-1"}"#).send().await.unwrap();

    assert_eq!(response.status(), 201);
    let requests = server.requests();
    assert_eq!(requests.len(), RESETS + 1, "the server saw N+1 requests");
    let keys: Vec<_> = requests.iter().map(|r| r.header("idempotency-key")).collect();
    let key = one_key(&keys);
    assert!(requests.iter().all(|r| r.body == br#"{"name":"web-1"}"#));
    let outcome = RetryOutcome::of(&response).unwrap();
    assert_eq!(outcome.attempts, RESETS as u32 + 1);
    assert_eq!(outcome.key.as_ref().unwrap().as_str(), key);
    assert_eq!(time.delays(), [ms(100), ms(200), ms(400)]);
}

#[tokio::test]
async fn keyless_post_reset_is_an_unknown_outcome_after_one_request() {
    let server = ResetServer::start(usize::MAX).await;
    let time = Time::new();
    let client = client(time.layer());

    let err = client
        .post(format!("{}/cvms", server.url))
        .body("{}")
        .with_extension(RequestOptions::new().no_key())
        .send()
        .await
        .unwrap_err();

    let err = Error::find(&err).expect("typed error");
    assert!(err.is_outcome_unknown(), "{err}");
    assert!(err.may_have_been_applied());
    assert!(!err.is_retryable());
    assert_eq!(err.attempts(), 1);
    assert_eq!(server.requests().len(), 1, "never resent");
    assert_eq!(server.requests()[0].header("idempotency-key"), None);
    assert!(time.delays().is_empty());
    let cause = match &err.failure().unwrap().last {
        idempotent_retry::error::LastAttempt::Transport { cause, .. } => *cause,
        other => panic!("{other:?}"),
    };
    assert!(
        matches!(
            cause,
            idempotent_retry::classify::TransportCause::Reset | idempotent_retry::classify::TransportCause::Closed
        ),
        "{cause:?}"
    );
}

/// A sleeper that starts a server on `port` the first time it is asked to sleep, so the first
/// attempt meets a refused connection and the retry finds the server up.
#[derive(Clone)]
struct StartServerOnFirstSleep {
    port: u16,
    started: Arc<Mutex<Option<Arc<ResetServer>>>>,
}

impl std::fmt::Debug for StartServerOnFirstSleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartServerOnFirstSleep")
    }
}

impl Sleeper for StartServerOnFirstSleep {
    fn sleep(&self, _: Duration) -> Sleep {
        let this = self.clone();
        Box::pin(async move {
            let mut started = this.started.lock().unwrap();
            if started.is_none() {
                let listener = std::net::TcpListener::bind(("127.0.0.1", this.port)).unwrap();
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                *started = Some(Arc::new(ResetServer::serve(listener, 0)));
            }
        })
    }

    fn timeout(&self, _: Duration) -> Sleep {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn connection_refused_is_retried_even_without_a_key() {
    let port = closed_port();
    let sleeper = StartServerOnFirstSleep { port, started: Arc::default() };
    let client = client(Time::new().layer().sleeper(sleeper.clone()));

    let response = client
        .post(format!("http://127.0.0.1:{port}/cvms"))
        .body("{}")
        .with_extension(RequestOptions::new().no_key())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(RetryOutcome::of(&response).unwrap().attempts, 2);
    let server = sleeper.started.lock().unwrap().clone().unwrap();
    assert_eq!(server.requests().len(), 1, "the refused attempt never reached a server");
}

#[tokio::test]
async fn refused_throughout_is_exhausted_and_not_applied() {
    let port = closed_port();
    let time = Time::new();
    let client = client(time.layer().policy(fast_policy().with_max_attempts(3)));

    let err = client.post(format!("http://127.0.0.1:{port}/cvms")).body("{}").send().await.unwrap_err();

    let err = Error::find(&err).unwrap();
    assert!(matches!(err, Error::AttemptsExhausted(_)), "{err}");
    assert!(!err.may_have_been_applied());
    assert_eq!(err.attempts(), 3);
    assert_eq!(time.delays().len(), 2);
}

/// The first attempt is held longer than the attempt timeout (on the injected clock: the proxy
/// moves it, the client's timer fires, nothing waits in real time).
#[tokio::test]
async fn attempt_timeout_is_retried_with_the_same_key() {
    let policy = fast_policy().with_attempt_timeout(ms(500));
    let rig = Rig::with_policy(ServerProfile::stripe(), Schedule::script([Fault::Delay(ms(1000))]), policy).await;

    let response = rig.create("web-1").await.unwrap();
    rig.proxy.settle().await;

    assert_eq!(response.status(), 201);
    assert_eq!(RetryOutcome::of(&response).unwrap().attempts, 2, "one timeout, one retry");
    assert_eq!(rig.time.delays(), [ms(100)]);
    rig.one_key_per_name();
    assert_eq!(rig.cloud.created_named("web-1"), 1, "the late first attempt and the retry: one CVM");
}

#[tokio::test]
async fn keyless_attempt_timeout_is_an_unknown_outcome() {
    let policy = fast_policy().with_attempt_timeout(ms(200));
    let rig = Rig::with_policy(ServerProfile::no_keys(), Schedule::script([Fault::Delay(ms(1000))]), policy).await;

    let err = rig.create_keyless("web-1").await.unwrap_err();
    rig.proxy.settle().await;

    let err = Error::find(&err).unwrap();
    assert!(err.is_outcome_unknown(), "{err}");
    assert_eq!(err.attempts(), 1);
    assert_eq!(rig.attempts(), 1, "never resent");
    assert_eq!(rig.cloud.created_named("web-1"), 1, "it arrived late, and was applied");
}

#[tokio::test]
async fn idempotent_get_is_retried_after_a_reset_without_a_key() {
    let server = ResetServer::start(1).await;
    let client = client(Time::new().layer());

    let response = client.get(format!("{}/cvms", server.url)).send().await.unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(server.requests().len(), 2);
    assert!(server.requests().iter().all(|r| r.header("idempotency-key").is_none()));
}

/// Defect: a 400 MB error body was buffered whole. The layer keeps at most its limit in memory
/// and never reads the rest of a body it is retrying past.
#[tokio::test]
async fn a_huge_error_body_is_not_read_past_the_limit() {
    const LEN: u64 = 400 << 20;
    let server = HugeBodyServer::start(500, LEN).await;
    let client = client(Time::new().layer().policy(fast_policy().with_max_attempts(2)));

    let err = client.post(format!("{}/cvms", server.url)).body("{}").send().await.unwrap_err();
    let body_len = match &Error::find(&err).expect("typed error").failure().unwrap().last {
        idempotent_retry::error::LastAttempt::Status { body, .. } => body.len(),
        other => panic!("{other:?}"),
    };

    assert!(body_len <= 8 << 20, "kept {body_len} bytes");
    let written = server.written();
    assert!(written < 64 << 20, "the server wrote {written} of {LEN} bytes: the client read them all");
}

/// A 503 whose body stalls after the headers: the attempt times out (on the injected clock),
/// and the retry with the same key creates the CVM once.
#[tokio::test]
async fn a_stalled_error_body_times_the_attempt_out() {
    let policy = fast_policy().with_attempt_timeout(ms(500));
    // A server that does not keep failed answers: the retry runs the handler again.
    let profile = ServerProfile::stripe().with_cache(CacheErrors::SuccessOnly);
    let rig = Rig::with_policy(profile, Schedule::script([Fault::StallBody(ms(1000))]), policy).await;
    rig.cloud.fail_next_creates(1, http::StatusCode::SERVICE_UNAVAILABLE);

    let response = rig.create("web-1").await.unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(RetryOutcome::of(&response).unwrap().attempts, 2);
    rig.one_key_per_name();
    assert_eq!(rig.cloud.created_named("web-1"), 1);
}

/// A buffered success whose body stalls is a lost answer: retried with the key, replayed.
#[tokio::test]
async fn a_stalled_success_body_is_a_lost_answer_when_buffered() {
    let policy = fast_policy().with_attempt_timeout(ms(500));
    let rig = Rig::with_policy(ServerProfile::stripe(), Schedule::script([Fault::StallBody(ms(1000))]), policy).await;

    let response = rig
        .client
        .post(rig.cvms())
        .json(&serde_json::json!({"name": "web-1"}))
        .with_extension(RequestOptions::new().buffer_body())
        .send()
        .await
        .unwrap();

    let outcome = RetryOutcome::of(&response).unwrap().clone();
    assert_eq!((response.status().as_u16(), outcome.attempts, outcome.replayed), (201, 2, true));
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["name"], "web-1");
    assert_eq!(rig.cloud.created_named("web-1"), 1);
}

/// A final error body longer than the limit is classified on its first bytes and reaches the
/// caller whole; asked to buffer it, the layer refuses with the limit instead.
#[tokio::test]
async fn a_long_final_body_reaches_the_caller_whole_unless_buffering_was_asked_for() {
    let body = "x".repeat(3000);
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(wiremock::ResponseTemplate::new(404).set_body_string(body.clone()))
        .mount(&server)
        .await;
    let client = client(Time::new().layer().max_body(1000));

    let response = client.post(server.uri()).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.text().await.unwrap(), body, "prefix and unread rest, in order");

    let err = client
        .post(server.uri())
        .body("{}")
        .with_extension(RequestOptions::new().buffer_body())
        .send()
        .await
        .unwrap_err();
    let err = Error::find(&err).unwrap();
    assert!(matches!(err, Error::ResponseTooLarge { limit: 1000, .. }), "{err}");
    assert!(!err.may_have_been_applied(), "a 404 is a refusal");
}
