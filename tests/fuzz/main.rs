//! Fuzz targets for everything the crate parses from a server or a user (issue 17, §2).
//!
//! Each target is a `bolero::check!` harness: under `cargo test` it replays its seed corpus
//! (`tests/fuzz/__fuzz__/<target>/corpus/`, one input a file) and then a bounded number of
//! random inputs; under `cargo bolero test <target> --engine libfuzzer` (or `afl`) it is a real
//! coverage-guided fuzzer. `BOLERO_RANDOM_ITERATIONS=N cargo test --test fuzz` runs N random
//! inputs a target instead. A crash found becomes a corpus file here, and a regression test
//! where it belongs.
//!
//! Inputs are raw bytes, read as text where a target needs text (lossily, so every byte string
//! is an input), split at the first newline where a target needs two parts: the corpus files
//! stay readable.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use idempotent_retry::{
    Error, IdempotencyKey, IdempotentRetry, KeyCarrier, RetryPolicy,
    backoff::{ExponentialBackoff, Jitter, parse_retry_after},
    classify::{AttemptContext, Classifier, DefaultClassifier},
    time::{ManualClock, RecordingSleeper, SeededRng},
};
use reqwest::ResponseBuilderExt;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};

mod journal;
mod lists;

/// Random inputs a target runs under `cargo test` (after its corpus), unless
/// `BOLERO_RANDOM_ITERATIONS` says otherwise: enough to find what a corpus misses, seconds in
/// all.
const ITERATIONS: usize = 2000;

/// Sun, 22 Nov 2026 00:00:00 GMT.
fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_305_600)
}

/// `input` as two parts: up to the first newline, and the rest.
fn split(input: &[u8]) -> (String, &[u8]) {
    match input.iter().position(|b| *b == b'\n') {
        Some(at) => (String::from_utf8_lossy(&input[..at]).into_owned(), &input[at + 1..]),
        None => (String::from_utf8_lossy(input).into_owned(), &[][..]),
    }
}

/// The requests a [`Canned`] server saw: method, URL and headers, body.
type Seen = Arc<Mutex<Vec<(http::Method, reqwest::Url, http::HeaderMap, Bytes)>>>;

type Answer = dyn Fn(&reqwest::Request) -> http::Response<Vec<u8>> + Send + Sync;

/// The end of a middleware chain that answers every request itself (no sockets: fast enough to
/// fuzz the whole layer), keeping what it saw.
struct Canned {
    answer: Box<Answer>,
    seen: Seen,
}

#[async_trait::async_trait]
impl Middleware for Canned {
    async fn handle(
        &self,
        req: reqwest::Request,
        _: &mut http::Extensions,
        _: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let body = req.body().and_then(|b| b.as_bytes()).map(Bytes::copy_from_slice).unwrap_or_default();
        self.seen.lock().unwrap().push((req.method().clone(), req.url().clone(), req.headers().clone(), body));
        let (mut parts, body) = (self.answer)(&req).into_parts();
        parts.extensions.insert(reqwest::Url::clone(req.url()));
        let mut response = http::Response::builder().status(parts.status).version(parts.version).url(req.url().clone());
        *response.headers_mut().expect("a builder") = parts.headers;
        Ok(reqwest::Response::from(response.body(body).expect("valid parts")))
    }
}

/// A client through `layer` to a [`Canned`] server answering with `answer`.
fn canned(
    layer: IdempotentRetry,
    answer: impl Fn(&reqwest::Request) -> http::Response<Vec<u8>> + Send + Sync + 'static,
) -> (ClientWithMiddleware, Seen) {
    // Building a reqwest client loads TLS roots: once, not an input.
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let seen = Seen::default();
    let client = ClientBuilder::new(HTTP.get_or_init(reqwest::Client::new).clone())
        .with(layer)
        .with(Canned { answer: Box::new(answer), seen: seen.clone() })
        .build();
    (client, seen)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn response(status: u16, headers: &[(&str, HeaderValue)], body: &[u8]) -> http::Response<Vec<u8>> {
    let mut response = http::Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, value.clone());
    }
    response.body(body.to_vec()).unwrap()
}

/// `Retry-After`, any text: the parser never panics; through the layer, a 503 carrying it is
/// waited out no longer than the cap, and never past the deadline.
#[test]
fn retry_after() {
    const CAP: Duration = Duration::from_secs(20);
    const DEADLINE: Duration = Duration::from_secs(30);
    let rt = runtime();
    bolero::check!().with_iterations(ITERATIONS).for_each(|input: &[u8]| {
        let text = String::from_utf8_lossy(input);
        let parsed = parse_retry_after(&text, t0());
        if !text.trim().is_empty() && text.trim().bytes().all(|b| b.is_ascii_digit()) {
            assert!(parsed.is_some(), "delta-seconds {text:?}");
        }
        let Ok(value) = HeaderValue::from_bytes(input) else { return };
        let clock = ManualClock::new(t0());
        let sleeper = RecordingSleeper::advancing(&clock);
        let policy = RetryPolicy::standard()
            .with_max_attempts(4)
            .with_max_retry_after(CAP)
            .with_deadline(DEADLINE)
            .with_backoff(
                ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(5)).jitter(Jitter::Full),
            );
        let layer = IdempotentRetry::builder()
            .policy(policy)
            .clock(clock.clone())
            .sleeper(sleeper.clone())
            .rng(SeededRng::new(1))
            .no_budget()
            .build();
        let (client, seen) = canned(layer, move |_| response(503, &[("retry-after", value.clone())], b""));
        let result = rt.block_on(client.post("http://api.test/cvms").body("{}").send());
        let err = result.expect_err("503 every time");
        assert!(Error::find(&err).is_some(), "the layer's own error: {err}");
        for delay in sleeper.delays() {
            assert!(delay <= CAP, "{text:?}: waited {delay:?}");
        }
        assert!(sleeper.total() < DEADLINE, "{text:?}: waited {:?} in all", sleeper.total());
        assert!(!seen.lock().unwrap().is_empty());
    });
}

/// Idempotency keys, any bytes: what is accepted goes on the wire as it was given (bare) or
/// quoted and unquoted back (IETF), and is visible ASCII; what is refused is never sent.
#[test]
fn idempotency_key() {
    let rt = runtime();
    bolero::check!().with_iterations(ITERATIONS).for_each(|input: &[u8]| {
        let text = String::from_utf8_lossy(input).into_owned();
        if let Ok(key) = IdempotencyKey::new(text.clone()) {
            assert_eq!(key.as_str(), text);
            for carrier in [KeyCarrier::standard(), KeyCarrier::ietf()] {
                let value = carrier.header_value(&key);
                assert!(value.as_bytes().iter().all(|b| (0x20..=0x7e).contains(b)), "{value:?}");
                let mut headers = http::HeaderMap::new();
                headers.insert("idempotency-key", value);
                let back = carrier.existing_key(&headers, None, usize::MAX).unwrap();
                assert_eq!(back.as_ref().map(IdempotencyKey::as_str), Some(text.as_str()), "{carrier:?}");
            }
        }
        // The same bytes given as the request's own key header, through the layer.
        let Ok(value) = HeaderValue::from_bytes(input) else { return };
        for carrier in [KeyCarrier::standard(), KeyCarrier::ietf()] {
            let layer = IdempotentRetry::builder().carrier(carrier.clone()).build();
            let (client, seen) = canned(layer, |_| response(201, &[], b"{}"));
            let result = rt.block_on(
                client.post("http://api.test/cvms").header("idempotency-key", value.clone()).body("{}").send(),
            );
            let seen = seen.lock().unwrap();
            match result {
                Ok(_) => {
                    let sent = seen[0].2.get("idempotency-key").expect("the key went out");
                    assert_eq!(sent, &value, "{carrier:?}: the caller's key, untouched");
                    assert!(!sent.as_bytes().iter().any(|b| matches!(b, b'\r' | b'\n' | 0..0x20 | 0x7f..)), "{sent:?}");
                }
                Err(err) => {
                    assert!(
                        matches!(Error::find(&err), Some(Error::InvalidKey(_) | Error::InvalidRequest(_))),
                        "{err}"
                    );
                    assert!(seen.is_empty(), "{carrier:?}: a refused key never reaches the wire");
                }
            }
        }
    });
}

/// A classifier that checks what it is shown, then asks the default one.
struct Bounded(usize);

impl Classifier for Bounded {
    fn classify(&self, attempt: &AttemptContext<'_>) -> idempotent_retry::classify::Verdict {
        assert!(attempt.body().is_none_or(|b| b.len() <= self.0), "the classifier sees at most the body limit");
        DefaultClassifier.classify(attempt)
    }
}

/// Error bodies (problem+json and anything else): the first line is the status and the
/// content type, the rest the body. Classification never panics, sees at most the body limit,
/// and the layer ends within its attempts.
#[test]
fn classify() {
    const LIMIT: usize = 512;
    let rt = runtime();
    bolero::check!().with_iterations(ITERATIONS).for_each(|input: &[u8]| {
        let (head, body) = split(input);
        let mut words = head.split_whitespace();
        let status = words.next().and_then(|s| s.parse::<u16>().ok()).filter(|s| (100..600).contains(s)).unwrap_or(409);
        let content_type = words.next().unwrap_or("application/problem+json").to_owned();
        let body = body.to_vec();
        for keyed in [true, false] {
            let clock = ManualClock::new(t0());
            let layer = IdempotentRetry::builder()
                .classifier(Bounded(LIMIT))
                .max_body(LIMIT)
                .policy(RetryPolicy::standard().with_max_attempts(3))
                .clock(clock.clone())
                .sleeper(RecordingSleeper::advancing(&clock))
                .no_budget()
                .build();
            let ct =
                HeaderValue::from_str(&content_type).unwrap_or(HeaderValue::from_static("application/problem+json"));
            let body = body.clone();
            let (client, seen) = canned(layer, move |_| response(status, &[("content-type", ct.clone())], &body));
            let mut request = client.post("http://api.test/cvms").body("{}");
            if !keyed {
                request = request.with_extension(idempotent_retry::RequestOptions::new().no_key());
            }
            let _ = rt.block_on(request.send());
            let sent = seen.lock().unwrap().len();
            assert!((1..=3).contains(&sent), "{status}: {sent} attempts");
        }
        // The classifier on its own, on the whole body.
        let request = reqwest::Request::new(http::Method::POST, "http://api.test/cvms".parse().unwrap());
        let headers = http::HeaderMap::new();
        let key = IdempotencyKey::random();
        let result = idempotent_retry::classify::AttemptResult::Response {
            status: StatusCode::from_u16(status).unwrap(),
            headers: &headers,
            body: Some(&body),
            replayed: false,
        };
        let _ = DefaultClassifier.classify(&AttemptContext::new(&request, 1, Some(&key), result));
    });
}

/// Whether `bytes` is one JSON object by the grammar (RFC 8259): UTF-8, and an object once
/// whitespace is skipped. Numbers of any size count (`1E310` is JSON; serde's `Value` refuses
/// it for its range, and the carrier must keep it as written).
fn is_json_object(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|text| text.trim_start().starts_with('{'))
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

/// Whether the object `bytes` has a member named `field` (names decoded, values skipped).
fn has_member(bytes: &[u8], field: &str) -> bool {
    struct Names<'a>(&'a str);
    impl<'de> serde::de::Visitor<'de> for Names<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut found = false;
            while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                found |= name == self.0;
                map.next_value::<serde::de::IgnoredAny>()?;
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde::Deserializer::deserialize_map(&mut de, Names(field)).unwrap_or(false)
}

/// The JSON body-field carrier, any body: for a JSON object (without the key's field: with
/// one, the layer takes that key and never attaches) the output is a JSON object and, the key
/// member taken out, the input byte for byte; anything else is refused.
#[test]
fn body_field_carrier() {
    bolero::check!().with_iterations(ITERATIONS).for_each(|input: &[u8]| {
        let carrier = KeyCarrier::body_field("idempotency_key");
        let key = IdempotencyKey::new("k-7c9e6679").unwrap();
        let mut request = reqwest::Request::new(http::Method::POST, "http://api.test/run".parse().unwrap());
        *request.body_mut() = Some(Bytes::copy_from_slice(input).into());
        let object = is_json_object(input);
        if object && has_member(input, "idempotency_key") {
            let _ = carrier.attach(&mut request, &key);
            return;
        }
        match carrier.attach(&mut request, &key) {
            Ok(()) => {
                assert!(object, "only a JSON object takes a key");
                let output = request.body().unwrap().as_bytes().unwrap().to_vec();
                let close = input.iter().rposition(|b| *b == b'}').unwrap();
                let inserted = output.len() - input.len();
                assert_eq!(&output[..close], &input[..close], "the bytes before the member");
                assert_eq!(&output[close + inserted..], &input[close..], "and after it");
                let member = std::str::from_utf8(&output[close..close + inserted]).unwrap();
                let member = member.strip_prefix(',').unwrap_or(member);
                assert_eq!(member, r#""idempotency_key":"k-7c9e6679""#);
                assert!(is_json_object(&output), "a JSON object out");
                if let Ok(out) = serde_json::from_slice::<serde_json::Value>(&output) {
                    assert_eq!(out["idempotency_key"], "k-7c9e6679");
                }
            }
            Err(e) => assert!(!object, "an object refused: {e}"),
        }
    });
}

/// The waiter's state extraction: the first line is the field (a dotted path or a JSON
/// pointer), the rest the body. Never panics, and ends ready, failed or at its timeout.
#[test]
fn wait_status() {
    use idempotent_retry::wait::{Observation, WaitError, WaitFor, Waiter};
    let rt = runtime();
    bolero::check!().with_iterations(ITERATIONS).for_each(|input: &[u8]| {
        let (path, body) = split(input);
        let resource = serde_json::from_slice(body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()));
        let clock = ManualClock::new(t0());
        let waiter =
            Waiter::new().clock(clock.clone()).sleeper(RecordingSleeper::advancing(&clock)).rng(SeededRng::new(3));
        for spec in [
            WaitFor::field(path.clone()).target(["running"]).failure(["error"]).timeout(Duration::from_secs(10)),
            WaitFor::field(path.clone())
                .target([true])
                .pending([serde_json::Value::Null])
                .timeout(Duration::from_secs(10)),
            WaitFor::done().timeout(Duration::from_secs(10)),
        ] {
            let resource = resource.clone();
            let result = rt.block_on(waiter.wait(&spec, || {
                let resource = resource.clone();
                async move { Ok(Observation::resource(resource)) }
            }));
            match result {
                Ok(_)
                | Err(WaitError::Failed { .. } | WaitError::UnexpectedState { .. } | WaitError::TimedOut { .. }) => {}
                Err(other) => panic!("{path:?}: {other}"),
            }
        }
    });
}
