//! The retry layer: a `reqwest_middleware::Middleware`, its builder, and what it reports. The
//! work is the [engine](crate::engine)'s.

use std::sync::Arc;

use http::{Extensions, Method};
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use tracing::Instrument;
use tracing::field::Empty;

use crate::budget::{RetryBudget, RetryPartition};
use crate::carrier::KeyCarrier;
use crate::classify::{Classifier, DefaultClassifier};
use crate::engine::Engine;
use crate::key::IdempotencyKey;
use crate::options::RequestOptions;
use crate::outcome::RetryEvent;
use crate::outcome::RetryOutcome;
use crate::policy::RetryPolicy;
use crate::rate_limit::AdaptiveRateLimiter;
use crate::replay::ReplayDetector;
use crate::time::{Clock, Random, SeededRng, Sleeper, SystemClock, TokioSleeper};

/// Makes non-idempotent writes safe to retry: one key per request, sent unchanged on every
/// attempt; transient failures retried within a deadline and a budget; a keyless request that
/// may have been applied never resent.
///
/// # Examples
///
/// ```
/// use idempotent_retry::{IdempotentRetry, KeyCarrier, RetryPolicy};
///
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(
///         IdempotentRetry::builder()
///             .carrier(KeyCarrier::ietf())
///             .policy(RetryPolicy::standard().with_max_attempts(8))
///             .build(),
///     )
///     .build();
/// # let _ = client;
/// ```
#[derive(Debug, Clone)]
pub struct IdempotentRetry {
    engine: Arc<Engine>,
}

/// Builds an [`IdempotentRetry`]. Every setting has a default; see each method.
#[derive(Debug, Clone)]
pub struct IdempotentRetryBuilder {
    engine: Engine,
}

impl IdempotentRetry {
    /// The most bytes of one response body the layer keeps in memory unless told otherwise:
    /// 8 MiB. See [`IdempotentRetryBuilder::max_body`].
    pub const DEFAULT_MAX_BODY: usize = 8 << 20;

    /// The layer with every default: [`RetryPolicy::standard`], the `Idempotency-Key` header,
    /// keys on POST and PATCH, a fresh [`RetryBudget`], [`DefaultClassifier`],
    /// [`ReplayDetector::standard`], the system clock, tokio's timer, and jitter seeded from the
    /// operating system.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder starting from the defaults of [`new`](Self::new).
    pub fn builder() -> IdempotentRetryBuilder {
        IdempotentRetryBuilder {
            engine: Engine {
                policy: RetryPolicy::standard(),
                carrier: KeyCarrier::standard(),
                keyed_methods: vec![Method::POST, Method::PATCH],
                max_key_len: IdempotencyKey::DEFAULT_MAX_LEN,
                max_body: IdempotentRetry::DEFAULT_MAX_BODY,
                budget: Some(Arc::new(RetryBudget::new())),
                partition: RetryPartition::HOST,
                rate: None,
                classifier: Arc::new(DefaultClassifier),
                replay: ReplayDetector::standard(),
                clock: Arc::new(SystemClock),
                sleeper: Arc::new(TokioSleeper),
                rng: Arc::new(SeededRng::from_entropy()),
                on_retry: None,
            },
        }
    }

    /// The retry budget in use, if any.
    pub fn budget(&self) -> Option<&Arc<RetryBudget>> {
        self.engine.budget.as_ref()
    }

    /// The adaptive rate limiter in use, if turned on.
    pub fn rate_limiter(&self) -> Option<&Arc<AdaptiveRateLimiter>> {
        self.engine.rate.as_ref()
    }
}

impl Default for IdempotentRetry {
    fn default() -> Self {
        Self::new()
    }
}

impl IdempotentRetryBuilder {
    /// The retry policy (default [`RetryPolicy::standard`]). A request can override it with
    /// [`RequestOptions`].
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.engine.policy = policy;
        self
    }

    /// Where the key goes (default [`KeyCarrier::standard`], a bare `Idempotency-Key` header).
    pub fn carrier(mut self, carrier: KeyCarrier) -> Self {
        self.engine.carrier = carrier;
        self
    }

    /// Configures the layer for a server's convention: carrier, maximum key length and replay
    /// detection; for an endpoint that takes no key, no method gets one.
    pub fn convention(self, convention: &crate::convention::ServerConvention) -> Self {
        let builder = self.replay_detector(convention.replay.clone()).max_key_len(convention.max_key_len);
        match &convention.carrier {
            Some(carrier) => builder.carrier(carrier.clone()),
            None => builder.keyed_methods([]),
        }
    }

    /// The methods that get a key minted (default POST and PATCH).
    pub fn keyed_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.engine.keyed_methods = methods.into_iter().collect();
        self
    }

    /// The longest key this server accepts (default 255; AWS EC2 accepts 64). Longer keys given
    /// by the caller are refused before sending.
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.engine.max_key_len = max;
        self
    }

    /// The most bytes of one response body the layer reads into memory (default
    /// [`IdempotentRetry::DEFAULT_MAX_BODY`], 8 MiB).
    ///
    /// The layer reads error bodies (status 400 and above) so the classifier can look inside
    /// them, and every body of a request sent with [`RequestOptions::buffer_body`]. An error
    /// body longer than this is classified on its first `max` bytes and handed to the caller
    /// with the rest unread; a body the caller asked to have buffered fails the request with
    /// [`Error::ResponseTooLarge`](crate::Error::ResponseTooLarge).
    pub fn max_body(mut self, max: usize) -> Self {
        self.engine.max_body = max;
        self
    }

    /// A retry budget, possibly shared with other layers (default: a fresh
    /// [`RetryBudget::new`] per layer).
    pub fn budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.engine.budget = Some(budget);
        self
    }

    /// Which of the budget's partitions this layer's requests draw from (default
    /// [`RetryPartition::HOST`]: one bucket per host). Layers that share one budget `Arc` but
    /// serve different workloads give each its own partition, as the AWS SDKs'
    /// `RetryPartition`; a request can pick another with
    /// [`RequestOptions::retry_partition`](crate::RequestOptions::retry_partition).
    pub fn retry_partition(mut self, partition: RetryPartition) -> Self {
        self.engine.partition = partition;
        self
    }

    /// Turns the retry budget off: only the policy bounds retries.
    pub fn no_budget(mut self) -> Self {
        self.engine.budget = None;
        self
    }

    /// Turns on adaptive client-side rate limiting (the AWS SDKs' adaptive retry mode; see
    /// [`rate_limit`](crate::rate_limit)), with a limiter of this layer's own. Off by default:
    /// until a host throttles (a 429) it costs nothing; after that every send to the host waits
    /// for a token, at a rate that drops on each throttle and grows back along a cubic curve.
    pub fn adaptive(self) -> Self {
        self.adaptive_limiter(Arc::new(AdaptiveRateLimiter::new()))
    }

    /// Adaptive rate limiting with a limiter shared with other layers (every worker of a
    /// process, say), so they slow down together.
    pub fn adaptive_limiter(mut self, limiter: Arc<AdaptiveRateLimiter>) -> Self {
        self.engine.rate = Some(limiter);
        self
    }

    /// The classifier (default [`DefaultClassifier`]).
    pub fn classifier(mut self, classifier: impl Classifier + 'static) -> Self {
        self.engine.classifier = Arc::new(classifier);
        self
    }

    /// How replays are recognised (default [`ReplayDetector::standard`]).
    pub fn replay_detector(mut self, detector: ReplayDetector) -> Self {
        self.engine.replay = detector;
        self
    }

    /// The clock (default [`SystemClock`]).
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.engine.clock = Arc::new(clock);
        self
    }

    /// The sleeper (default [`TokioSleeper`]).
    pub fn sleeper(mut self, sleeper: impl Sleeper + 'static) -> Self {
        self.engine.sleeper = Arc::new(sleeper);
        self
    }

    /// The jitter source (default [`SeededRng::from_entropy`]).
    pub fn rng(mut self, rng: impl Random + 'static) -> Self {
        self.engine.rng = Arc::new(rng);
        self
    }

    /// Calls `hook` before every retry, with what failed and how long the engine will wait:
    /// for progress output, metrics, or logs of your own.
    ///
    /// ```
    /// use idempotent_retry::IdempotentRetry;
    ///
    /// let layer = IdempotentRetry::builder()
    ///     .on_retry(|e| eprintln!("attempt {}/{} failed ({}), retrying in {:?}", e.attempt, e.max_attempts, e.cause, e.delay))
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn on_retry(mut self, hook: impl Fn(&RetryEvent) + Send + Sync + 'static) -> Self {
        self.engine.on_retry = Some(Arc::new(hook));
        self
    }

    /// The layer.
    pub fn build(self) -> IdempotentRetry {
        IdempotentRetry { engine: Arc::new(self.engine) }
    }
}

#[async_trait::async_trait]
impl Middleware for IdempotentRetry {
    async fn handle(
        &self,
        req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let options = extensions.get::<RequestOptions>().cloned().unwrap_or_default();
        // One span for the request, entered around the whole loop (instrumenting once keeps the
        // large request future from being moved more than it must).
        let span = tracing::info_span!(
            "idempotent_request",
            method = %req.method(),
            host = %crate::engine::budget_host(&req),
            key = Empty,
            attempts = Empty,
            replayed = Empty,
            outcome = Empty,
        );
        let method = req.method().clone();
        let execute = self.engine.execute(req, extensions, next, &options, span.clone());
        // No subscriber wants the span: no `Instrumented` wrapper to move the future into.
        let result = if span.is_disabled() { execute.await } else { execute.instrument(span).await };
        let attempts = match &result {
            Ok(response) => RetryOutcome::of(response).map_or(1, |o| o.attempts),
            Err(e) => e.attempts(),
        };
        if attempts > 0 {
            crate::telemetry::attempts(&method, attempts);
        }
        result.map_err(reqwest_middleware::Error::middleware)
    }
}
