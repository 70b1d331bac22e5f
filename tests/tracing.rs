//! Traces carry attempts, causes, delays and a key fingerprint — never the key, never
//! `Authorization`.
//!
//! A test binary of its own, unlike the rest of the suite (`tests/all`): `tracing` caches each
//! callsite's interest process-wide, and a callsite first hit by another test thread while this
//! test installs its thread-scoped subscriber can be cached as "never", dropping events at random.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotent_retry::IdempotencyKey;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use idempotent_retry::{
    IdempotentRetry, RetryPolicy,
    backoff::{ExponentialBackoff, Jitter},
    time::{ManualClock, RecordingSleeper},
};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn traces_fingerprint_the_key_and_never_show_secrets() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).up_to_n_times(2).mount(&server).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let key = IdempotencyKey::new("super-secret-key-0001").unwrap();
    let clock = ManualClock::new(std::time::SystemTime::UNIX_EPOCH);
    let policy = RetryPolicy::standard()
        .with_backoff(ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(5)).jitter(Jitter::None));
    let layer =
        IdempotentRetry::builder().clock(clock.clone()).sleeper(RecordingSleeper::advancing(&clock)).policy(policy);
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).with(layer.build()).build();

    client
        .post(server.uri())
        .bearer_auth("token-do-not-log")
        .body("{}")
        .with_extension(idempotent_retry::RequestOptions::new().key(key.clone()))
        .send()
        .await
        .unwrap();

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains(&key.fingerprint()), "{logs}");
    assert!(!logs.contains("super-secret-key"), "{logs}");
    assert!(!logs.contains("token-do-not-log"), "{logs}");
    assert!(logs.contains("retrying"), "{logs}");
    assert!(logs.contains("cause=503"), "{logs}");
    assert!(logs.contains("delay_ms=100"), "{logs}");
    assert!(logs.contains("delay_ms=200"), "{logs}");
    assert!(logs.contains("attempts=3"), "{logs}");
}
