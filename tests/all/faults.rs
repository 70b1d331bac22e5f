//! Transport faults on real sockets: resets after the server read the request, refused
//! connections, attempt timeouts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_retry::{Error, RequestOptions, RetryOutcome, Sleep, Sleeper};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

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
        idempotent_retry::LastAttempt::Transport { cause, .. } => *cause,
        other => panic!("{other:?}"),
    };
    assert!(
        matches!(cause, idempotent_retry::TransportCause::Reset | idempotent_retry::TransportCause::Closed),
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
    let client = client(time.layer().policy(fast_policy().max_attempts(3)));

    let err = client.post(format!("http://127.0.0.1:{port}/cvms")).body("{}").send().await.unwrap_err();

    let err = Error::find(&err).unwrap();
    assert!(matches!(err, Error::AttemptsExhausted(_)), "{err}");
    assert!(!err.may_have_been_applied());
    assert_eq!(err.attempts(), 3);
    assert_eq!(time.delays().len(), 2);
}

#[tokio::test]
async fn attempt_timeout_is_retried_with_the_same_key() {
    // Real timers: the first response is held back longer than the attempt timeout.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201).set_delay(Duration::from_secs(5)))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    let time = Time::new();
    let client = client(time.layer().policy(fast_policy().attempt_timeout(Duration::from_millis(500))));

    let response = client.post(server.uri()).body("{}").send().await.unwrap();

    assert_eq!(response.status(), 201);
    // At least the held-back attempt and one more (a slow machine may time out more than once).
    let attempts = RetryOutcome::of(&response).unwrap().attempts;
    assert!(attempts >= 2, "{attempts}");
    let keys = keys_seen(&server, "idempotency-key").await;
    assert_eq!(keys.len(), attempts as usize);
    one_key(&keys);
}

#[tokio::test]
async fn keyless_attempt_timeout_is_an_unknown_outcome() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    let client = client(Time::new().layer().policy(fast_policy().attempt_timeout(Duration::from_millis(200))));

    let err =
        client.post(server.uri()).body("{}").with_extension(RequestOptions::new().no_key()).send().await.unwrap_err();

    let err = Error::find(&err).unwrap();
    assert!(err.is_outcome_unknown(), "{err}");
    assert_eq!(requests_seen(&server).await, 1);
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
