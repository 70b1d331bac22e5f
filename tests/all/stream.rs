//! Streaming bodies cannot be replayed: sent once, with a clear error if that was not enough.

use bytes::Bytes;
use idempotent_retry::{Error, KeyCarrier, RetryOutcome};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

fn stream_body() -> reqwest::Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        vec![Ok(Bytes::from_static(b"{\"report\":")), Ok(Bytes::from_static(b"[1,2,3]}"))];
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn a_stream_is_sent_once_and_the_error_says_it_could_not_be_replayed() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount(&server).await;
    let time = Time::new();
    let client = client(time.layer());

    let err = client.post(server.uri()).body(stream_body()).send().await.unwrap_err();

    let typed = Error::find(&err).unwrap();
    assert!(matches!(typed, Error::NotReplayable(_)), "{err}");
    assert!(typed.to_string().contains("could not be replayed"), "{typed}");
    assert!(typed.idempotency_key().is_some());
    assert_eq!(requests_seen(&server).await, 1);
    assert_eq!(server.received_requests().await.unwrap()[0].body, br#"{"report":[1,2,3]}"#);
    one_key(&keys_seen(&server, "idempotency-key").await);
    assert!(time.delays().is_empty());
}

#[tokio::test]
async fn a_stream_that_succeeds_is_fine() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    let client = client(Time::new().layer());

    let response = client.post(server.uri()).body(stream_body()).send().await.unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(RetryOutcome::of(&response).unwrap().attempts, 1);
}

#[tokio::test]
async fn a_stream_cannot_carry_a_key_in_its_body() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    let client = client(Time::new().layer().carrier(KeyCarrier::body_field("idempotency_key")));

    let err = client.post(server.uri()).body(stream_body()).send().await.unwrap_err();

    assert!(matches!(Error::find(&err), Some(Error::InvalidRequest(_))), "{err}");
    assert!(err.to_string().contains("stream"), "{err}");
    assert_eq!(requests_seen(&server).await, 0);
}
