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

/// Records the fields of every `attempt` span, as set when it opened and recorded later.
#[derive(Clone, Default)]
struct Attempts(Arc<Mutex<Vec<std::collections::BTreeMap<String, String>>>>);

struct Fields<'a>(&'a mut std::collections::BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

#[derive(Clone, Copy)]
struct Index(usize);

impl<S> tracing_subscriber::Layer<S> for Attempts
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "attempt" {
            return;
        }
        let mut fields = std::collections::BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut all = self.0.lock().unwrap();
        all.push(fields);
        ctx.span(id).unwrap().extensions_mut().insert(Index(all.len() - 1));
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(Index(i)) = ctx.span(id).and_then(|s| s.extensions().get::<Index>().copied()) else { return };
        values.record(&mut Fields(&mut self.0.lock().unwrap()[i]));
    }
}

#[tokio::test]
async fn attempt_spans_carry_opentelemetry_http_attributes() {
    use tracing_subscriber::layer::SubscriberExt;

    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).up_to_n_times(1).mount(&server).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    let attempts = Attempts::default();
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(attempts.clone()));
    let clock = ManualClock::new(std::time::SystemTime::UNIX_EPOCH);
    let layer = IdempotentRetry::builder().clock(clock.clone()).sleeper(RecordingSleeper::advancing(&clock));
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).with(layer.build()).build();
    let port = server.address().port();
    let url = format!("http://ci:s3cret@127.0.0.1:{port}/cvms?token=abc&page=2");

    client.post(&url).body("{}").send().await.unwrap();

    let spans = attempts.0.lock().unwrap().clone();
    let field = |i: usize, name: &str| spans[i].get(name).cloned();
    assert_eq!(spans.len(), 2, "{spans:?}");
    for i in 0..2 {
        assert_eq!(field(i, "otel.kind").as_deref(), Some("client"));
        assert_eq!(field(i, "otel.name").as_deref(), Some("POST"));
        assert_eq!(field(i, "http.request.method").as_deref(), Some("POST"));
        // reqwest moves the user info into `Authorization` (never recorded); query values are
        // redacted.
        assert_eq!(field(i, "url.full"), Some(format!("http://127.0.0.1:{port}/cvms?token=REDACTED&page=REDACTED")));
        assert_eq!(field(i, "server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(field(i, "server.port"), Some(port.to_string()));
    }
    assert_eq!(
        (field(0, "http.response.status_code"), field(0, "error.type"), field(0, "http.request.resend_count")),
        (Some("503".into()), Some("503".into()), None)
    );
    assert_eq!(
        (field(1, "http.response.status_code"), field(1, "error.type"), field(1, "http.request.resend_count")),
        (Some("201".into()), None, Some("1".into()))
    );
    let all = format!("{spans:?}");
    assert!(!all.contains("s3cret") && !all.contains("abc"), "{all}");
}
