//! Redirects of writes (issue 17, defects 1 and 5), on real sockets. A 3xx answering a POST is
//! the write's own answer: a 303 says it was done; a 307 or 308 within the origin is sent again
//! with the same key and body, as one more attempt; another origin never receives the write; a
//! redirect the client followed on its own is reported, never taken for the write's answer.
//! None of them says "not applied".

use std::sync::{Arc, Mutex};

use idempotent_retry::{
    Error, Operations, RetryOutcome,
    journal::{KeyStore, MemoryStore, OpState},
    operation::{OperationError, Resolution},
};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::support::*;

/// A client that leaves redirects to the layer, as the README says to build one.
fn no_follow(layer: idempotent_retry::IdempotentRetryBuilder) -> reqwest_middleware::ClientWithMiddleware {
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    reqwest_middleware::ClientBuilder::new(http).with(layer.build()).build()
}

type Seen = Arc<Mutex<Vec<(String, Option<String>, String)>>>;

/// Keeps what each request carried (path, key, body) and answers `template`.
struct Keep(Seen, ResponseTemplate);

impl Respond for Keep {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let key = request.headers.get("idempotency-key").map(|v| v.to_str().unwrap().to_owned());
        let body = String::from_utf8_lossy(&request.body).into_owned();
        self.0.lock().unwrap().push((request.url.path().to_owned(), key, body));
        self.1.clone()
    }
}

async fn answering(server: &MockServer, route: &str, template: ResponseTemplate) -> Seen {
    let seen = Seen::default();
    Mock::given(path(route.to_owned())).respond_with(Keep(seen.clone(), template)).mount(server).await;
    seen
}

#[tokio::test]
async fn a_same_origin_307_or_308_is_sent_again_with_its_key_and_body() {
    for (status, verb) in [(307, http::Method::POST), (308, http::Method::POST), (308, http::Method::PATCH)] {
        let server = MockServer::start().await;
        let old = answering(&server, "/old", ResponseTemplate::new(status).insert_header("location", "/cvms")).await;
        let new = answering(&server, "/cvms", ResponseTemplate::new(201).set_body_string(r#"{"id":"c-1"}"#)).await;
        let time = Time::new();
        let client = no_follow(time.layer().policy(fast_policy()));

        let response =
            client.request(verb.clone(), format!("{}/old", server.uri())).body(r#"{"name":"a"}"#).send().await.unwrap();

        assert_eq!(response.status(), 201, "{status} {verb}");
        let outcome = RetryOutcome::of(&response).unwrap();
        assert_eq!(outcome.attempts, 2, "{status}: the redirect is an attempt");
        let (old, new) = (old.lock().unwrap().clone(), new.lock().unwrap().clone());
        assert_eq!((old.len(), new.len()), (1, 1));
        assert_eq!(old[0].1, new[0].1, "{status}: the same key");
        assert_eq!(old[0].1.as_deref(), outcome.key.as_ref().map(|k| k.as_str()));
        assert_eq!(new[0].2, r#"{"name":"a"}"#, "{status}: the same body");
        assert!(time.delays().is_empty(), "no backoff before following");
    }
}

#[tokio::test]
async fn another_origin_never_receives_the_write() {
    let other = MockServer::start().await;
    let elsewhere = answering(&other, "/cvms", ResponseTemplate::new(201)).await;
    for status in [301, 302, 307, 308] {
        let server = MockServer::start().await;
        let to = format!("{}/cvms", other.uri());
        let old =
            answering(&server, "/old", ResponseTemplate::new(status).insert_header("location", to.as_str())).await;
        let client = no_follow(Time::new().layer().policy(fast_policy()));

        let err = client.post(format!("{}/old", server.uri())).body("{}").send().await.unwrap_err();

        let typed = Error::find(&err).unwrap();
        assert!(matches!(typed, Error::Redirected { followed: false, .. }), "{status}: {typed}");
        assert!(typed.may_have_been_applied(), "{status}: never \"not applied\"");
        assert!(!typed.is_retryable());
        assert!(typed.to_string().contains("another origin"), "{typed}");
        assert_eq!(old.lock().unwrap().len(), 1, "{status}: sent once");
    }
    assert_eq!(elsewhere.lock().unwrap().len(), 0, "the other origin received nothing");
}

/// With a client that follows redirects (reqwest's default), the damage of a 307 to another
/// origin is done inside reqwest before the layer sees anything; what the layer can still do
/// is not take the other origin's answer (or a 303's GET) for the write's.
#[tokio::test]
async fn a_redirect_the_client_followed_is_reported_not_taken_for_the_answer() {
    let server = MockServer::start().await;
    answering(&server, "/cvms", ResponseTemplate::new(303).insert_header("location", "/cvms/c-1")).await;
    answering(&server, "/cvms/c-1", ResponseTemplate::new(404)).await;
    let client = client(Time::new().layer().policy(fast_policy()));

    let err = client.post(format!("{}/cvms", server.uri())).body("{}").send().await.unwrap_err();

    let typed = Error::find(&err).unwrap();
    assert!(matches!(typed, Error::Redirected { followed: true, .. }), "{typed}");
    assert!(typed.may_have_been_applied());
    assert!(typed.to_string().contains("Policy::none()"), "says what to do: {typed}");

    // Through an operation: the journal says unknown, never not_applied, and a derived key is
    // resumed by the next run.
    let store = Arc::new(MemoryStore::new());
    let ops = Operations::with_store(client.clone(), store.clone());
    let op =
        || ops.operation("create-cvm/web-1").post(format!("{}/cvms", server.uri())).json(&json!({})).derived_key(1);
    let err = op().send().await.unwrap_err();
    assert!(err.may_have_been_applied(), "{err}");
    assert_eq!(store.get("create-cvm/web-1").await.unwrap().unwrap().state, OpState::Unknown);
}

#[tokio::test]
async fn a_303_is_the_writes_answer_and_its_result_is_read_where_it_points() {
    let server = MockServer::start().await;
    let posts = answering(&server, "/cvms", ResponseTemplate::new(303).insert_header("location", "/cvms/c-1")).await;
    Mock::given(method("GET"))
        .and(path("/cvms/c-1"))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"id":"c-1","name":"web-1"}"#))
        .mount(&server)
        .await;
    let store = Arc::new(MemoryStore::new());
    let ops = Operations::with_store(no_follow(Time::new().layer().policy(fast_policy())), store.clone());

    let done = ops
        .operation("create-cvm/web-1")
        .post(format!("{}/cvms", server.uri()))
        .json(&json!({"name": "web-1"}))
        .send()
        .await
        .unwrap();

    assert_eq!((done.resolution, done.status.map(|s| s.as_u16())), (Resolution::Created, Some(303)));
    assert_eq!(done.identity["id"], "c-1", "read at the Location");
    let record = store.get("create-cvm/web-1").await.unwrap().unwrap();
    assert_eq!((record.state, record.status), (OpState::Succeeded, Some(303)));
    assert_eq!(posts.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_redirect_loop_or_a_stream_ends_and_never_says_not_applied() {
    let server = MockServer::start().await;
    let seen = answering(&server, "/a", ResponseTemplate::new(307).insert_header("location", "/a")).await;
    let client = no_follow(Time::new().layer().policy(fast_policy().with_max_attempts(3)));

    let err = client.post(format!("{}/a", server.uri())).body("{}").send().await.unwrap_err();
    let typed = Error::find(&err).unwrap();
    assert!(matches!(typed, Error::AttemptsExhausted(_)), "{typed}");
    assert!(typed.may_have_been_applied());
    assert_eq!(seen.lock().unwrap().len(), 3, "bounded by the attempts");

    let stream = reqwest::Body::wrap_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(
        bytes::Bytes::from_static(b"{}"),
    )]));
    let err = client.post(format!("{}/a", server.uri())).body(stream).send().await.unwrap_err();
    let typed = Error::find(&err).unwrap();
    assert!(matches!(typed, Error::NotReplayable(_)) && typed.may_have_been_applied(), "{typed}");

    // A keyless operation redirected away is unknown too, and stays unsettled.
    let other = MockServer::start().await;
    answering(&server, "/b", ResponseTemplate::new(307).insert_header("location", format!("{}/x", other.uri()))).await;
    let store = Arc::new(MemoryStore::new());
    let ops = Operations::with_store(client, store.clone());
    let err = ops
        .operation("keyless")
        .post(format!("{}/b", server.uri()))
        .json(&json!({}))
        .no_key()
        .send()
        .await
        .unwrap_err();
    assert!(matches!(err, OperationError::GaveUp { may_have_been_applied: true, .. }), "{err}");
    assert_eq!(store.get("keyless").await.unwrap().unwrap().state, OpState::Unknown);
}

/// A followed redirect is one more send to the host: with the adaptive rate limiter on, it
/// waits for its turn as a retry does, and a turn past the deadline stops there, never saying
/// "not applied" (the first send went out).
#[tokio::test]
async fn a_followed_redirect_waits_for_the_rate_limiters_turn() {
    use idempotent_retry::rate_limit::AdaptiveRateLimiter;
    use idempotent_retry::time::Clock;
    use std::time::Duration;
    for tight_deadline in [false, true] {
        let server = MockServer::start().await;
        let old = answering(&server, "/old", ResponseTemplate::new(307).insert_header("location", "/cvms")).await;
        let new = answering(&server, "/cvms", ResponseTemplate::new(201)).await;
        let time = Time::new();
        let host = budget_host(&server);
        let limiter = Arc::new(AdaptiveRateLimiter::new());
        // The host throttled: every send is a token's time from the last.
        limiter.record(&host, time.clock.now(), time.clock.now(), true);
        let turn = Duration::from_secs_f64(1.0 / limiter.state(&host).unwrap().fill_rate);
        // A tight deadline has room for the first turn, not for the second.
        let policy = if tight_deadline { fast_policy().with_deadline(turn + turn / 2) } else { fast_policy() };
        let client = no_follow(time.layer().policy(policy).adaptive_limiter(limiter.clone()));

        let result = client.post(format!("{}/old", server.uri())).body("{}").send().await;

        assert_eq!(old.lock().unwrap().len(), 1);
        let delays = time.delays();
        assert_eq!(delays[0], turn, "the first send's turn");
        if !tight_deadline {
            assert_eq!(result.unwrap().status(), 201);
            assert_eq!(delays.len(), 2, "the followed redirect waited its turn too: {delays:?}");
            // A token's time again, to float rounding (the bucket is empty after the first).
            assert!(delays[1] > turn - turn / 100 && delays[1] < turn + turn / 100, "{delays:?}");
            assert_eq!(new.lock().unwrap().len(), 1);
        } else {
            let err = result.unwrap_err();
            let typed = Error::find(&err).unwrap();
            assert!(matches!(typed, Error::DeadlineExceeded(_)), "{typed}");
            assert!(typed.may_have_been_applied(), "the first send went out: {typed}");
            assert_eq!(delays, [turn], "no wait past the deadline");
            assert_eq!(new.lock().unwrap().len(), 0, "the redirect was not followed");
        }
    }
}
