//! Keys on the wire: the caller's kept, bad ones refused before sending, every carrier.

use idempotent_retry::{Error, IdempotencyKey, KeyCarrier, KeyError, RequestOptions, RetryOutcome};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

async fn server_503_then_201() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).up_to_n_times(1).mount(&server).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    server
}

#[tokio::test]
async fn a_key_the_user_set_is_kept_on_every_attempt() {
    let server = server_503_then_201().await;
    let client = client(Time::new().layer());

    let response = client.post(server.uri()).header("Idempotency-Key", "user-key-1").body("{}").send().await.unwrap();

    assert_eq!(keys_seen(&server, "idempotency-key").await, [Some("user-key-1".into()), Some("user-key-1".into())]);
    assert_eq!(RetryOutcome::of(&response).unwrap().key.as_ref().unwrap().as_str(), "user-key-1");
}

/// Issue 17, defect 8: two key headers sent the first and dropped the second without a word.
#[tokio::test]
async fn two_key_headers_are_refused_and_nothing_is_sent() {
    let server = server_503_then_201().await;
    let client = client(Time::new().layer());

    let err = client
        .post(server.uri())
        .header("Idempotency-Key", "a-1")
        .header("Idempotency-Key", "b-2")
        .body("{}")
        .send()
        .await
        .unwrap_err();

    assert!(matches!(Error::find(&err), Some(Error::InvalidRequest(why)) if why.contains("twice")), "{err}");
    assert_eq!(requests_seen(&server).await, 0);
}

#[tokio::test]
async fn a_key_from_request_options_is_sent() {
    let server = server_503_then_201().await;
    let client = client(Time::new().layer());
    let key = IdempotencyKey::new("deploy-3f2a9c1").unwrap();

    client.post(server.uri()).body("{}").with_extension(RequestOptions::new().key(key)).send().await.unwrap();

    assert_eq!(
        keys_seen(&server, "idempotency-key").await,
        [Some("deploy-3f2a9c1".into()), Some("deploy-3f2a9c1".into())]
    );
}

#[tokio::test]
async fn a_different_key_in_the_header_and_the_options_is_refused() {
    let server = server_503_then_201().await;
    let client = client(Time::new().layer());
    let key = IdempotencyKey::new("theirs-9c2b").unwrap();

    let err = client
        .post(server.uri())
        .header("Idempotency-Key", "mine-7f3a")
        .body("{}")
        .with_extension(RequestOptions::new().key(key))
        .send()
        .await
        .unwrap_err();

    assert!(matches!(Error::find(&err), Some(Error::InvalidRequest(_))), "{err}");
    assert!(
        !err.to_string().contains("mine-7f3a") && !err.to_string().contains("theirs-9c2b"),
        "keys are fingerprinted: {err}"
    );
    assert_eq!(requests_seen(&server).await, 0);
}

#[tokio::test]
async fn invalid_keys_are_refused_and_nothing_is_sent() {
    // Constructed keys: refused at construction.
    for bad in ["", "cr\rlf\n", "clé", "has space", &"k".repeat(256)] {
        assert!(IdempotencyKey::new(bad).is_err(), "{bad:?}");
    }

    let server = server_503_then_201().await;
    let ec2 = client(Time::new().layer().max_key_len(64));
    let plain = client(Time::new().layer());
    let body_carrier = client(Time::new().layer().carrier(KeyCarrier::body_field("idempotency_key")));

    // Too long for this server, given in the options.
    let long = IdempotencyKey::new("k".repeat(65)).unwrap();
    let err =
        ec2.post(server.uri()).body("{}").with_extension(RequestOptions::new().key(long)).send().await.unwrap_err();
    assert!(matches!(Error::find(&err), Some(Error::InvalidKey(KeyError::TooLong { len: 65, max: 64 }))), "{err}");

    // Too long, set by hand on the header.
    let err = ec2.post(server.uri()).header("Idempotency-Key", "k".repeat(65)).body("{}").send().await.unwrap_err();
    assert!(matches!(Error::find(&err), Some(Error::InvalidKey(KeyError::TooLong { .. }))), "{err}");

    // Empty, non-ASCII and space-containing headers set by hand.
    for value in [&b""[..], "clé".as_bytes(), b"a b"] {
        let header = reqwest::header::HeaderValue::from_bytes(value).unwrap();
        let err = plain.post(server.uri()).header("Idempotency-Key", header).body("{}").send().await.unwrap_err();
        assert!(matches!(Error::find(&err), Some(Error::InvalidKey(_))), "{value:?}: {err}");
    }

    // CR/LF cannot be put in a header at all, but can be in a JSON body field.
    let err = body_carrier.post(server.uri()).body(r#"{"idempotency_key":"a\r\nb"}"#).send().await.unwrap_err();
    assert!(matches!(Error::find(&err), Some(Error::InvalidKey(KeyError::InvalidByte { byte: b'\r', .. }))), "{err}");

    assert_eq!(requests_seen(&server).await, 0, "no bad key reached the wire");
}

#[tokio::test]
async fn ietf_carrier_quotes_and_custom_header_names_work() {
    let server = server_503_then_201().await;
    client(Time::new().layer().carrier(KeyCarrier::ietf())).post(server.uri()).body("{}").send().await.unwrap();
    let keys = keys_seen(&server, "idempotency-key").await;
    let key = one_key(&keys);
    assert!(key.starts_with('"') && key.ends_with('"') && key.len() == 38, "{key}");

    let server = server_503_then_201().await;
    let tower = KeyCarrier::header("X-Tower-Idempotency-Key").unwrap();
    client(Time::new().layer().carrier(tower)).post(server.uri()).body("{}").send().await.unwrap();
    one_key(&keys_seen(&server, "x-tower-idempotency-key").await);
    assert_eq!(keys_seen(&server, "idempotency-key").await, [None, None]);
}

#[tokio::test]
async fn body_field_carrier_puts_one_key_in_every_body() {
    let server = server_503_then_201().await;
    let client = client(Time::new().layer().carrier(KeyCarrier::body_field("idempotency_key")));

    let response =
        client.post(server.uri()).json(&serde_json::json!({"branch": "main", "report": [1, 2]})).send().await.unwrap();

    assert_eq!(response.status(), 201);
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    let bodies: Vec<serde_json::Value> = requests.iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect();
    assert_eq!(bodies[0], bodies[1]);
    let key = bodies[0]["idempotency_key"].as_str().unwrap();
    assert_eq!(RetryOutcome::of(&response).unwrap().key.as_ref().unwrap().as_str(), key);
    assert_eq!(bodies[0]["branch"], "main");
    assert!(requests.iter().all(|r| r.headers.get("idempotency-key").is_none()));
}

#[tokio::test]
async fn body_field_carrier_refuses_a_body_that_is_not_an_object() {
    let server = server_503_then_201().await;
    let client = client(Time::new().layer().carrier(KeyCarrier::body_field("idempotency_key")));

    for body in ["[1,2,3]", "not json"] {
        let err = client.post(server.uri()).body(body).send().await.unwrap_err();
        let typed = Error::find(&err).unwrap();
        assert!(matches!(typed, Error::InvalidRequest(_)), "{body}: {err}");
        assert!(typed.to_string().contains("idempotency_key"), "names the field: {typed}");
        assert!(!typed.may_have_been_applied());
    }
    assert_eq!(requests_seen(&server).await, 0);
}

#[tokio::test]
async fn keys_are_minted_per_request_and_only_for_keyed_methods() {
    let server = MockServer::start().await;
    Mock::given(wiremock::matchers::any()).respond_with(ResponseTemplate::new(200)).mount(&server).await;
    let client = client(Time::new().layer());

    client.post(server.uri()).body("{}").send().await.unwrap();
    client.post(server.uri()).body("{}").send().await.unwrap();
    client.patch(server.uri()).body("{}").send().await.unwrap();
    client.get(server.uri()).send().await.unwrap();
    client.put(server.uri()).body("{}").send().await.unwrap();

    let keys = keys_seen(&server, "idempotency-key").await;
    assert!(keys[0].is_some() && keys[1].is_some() && keys[2].is_some());
    assert_ne!(keys[0], keys[1], "a new request is a new operation");
    assert_eq!(keys[3], None);
    assert_eq!(keys[4], None);
}

/// Defect: the body-field carrier parsed the body into a map and wrote it out again, so large
/// integers became floats, `1e-400` became `0.0` and a duplicate member was dropped. The key is
/// inserted into the bytes as they are; every other byte reaches the server unchanged.
#[tokio::test]
async fn body_field_carrier_leaves_every_other_byte_alone() {
    let bodies = [
        r#"{"big": 12345678901234567890123, "f": 9007199254740993.0, "tiny": 1e-400, "dup": 1, "dup": 2}"#,
        "{ }",
        "  {\"nested\": {\"idempotency_key\": 5}, \"s\": \"\\u00e9\\n\"}\n",
    ];
    for body in bodies {
        let server = server_503_then_201().await;
        let client = client(Time::new().layer().carrier(KeyCarrier::body_field("idempotency_key")));

        let response = client.post(server.uri()).body(body).send().await.unwrap();

        let key = RetryOutcome::of(&response).unwrap().key.clone().unwrap();
        let close = body.rfind('}').unwrap();
        let empty = body[body.find('{').unwrap() + 1..close].trim().is_empty();
        let member = format!(r#"{}"idempotency_key":"{key}""#, if empty { "" } else { "," });
        let want = format!("{}{member}{}", &body[..close], &body[close..]);
        for request in server.received_requests().await.unwrap() {
            assert_eq!(String::from_utf8(request.body).unwrap(), want, "{body}");
        }
    }
}
