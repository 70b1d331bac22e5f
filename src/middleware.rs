//! The retry layer: a `reqwest_middleware::Middleware` that keys, attempts, classifies, decides,
//! sleeps and reports.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Extensions, Method};
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use tracing::Instrument;
use tracing::field::Empty;

use crate::attempt::{self, Ended, Reading};
use crate::budget::{RetryBudget, Withdrawal};
use crate::carrier::KeyCarrier;
use crate::classify::{AttemptContext, Classifier, DefaultClassifier, RetryKind, TransportCause, Verdict};
use crate::decide::{Decision, Failed, Stop, decide};
use crate::error::{Error, Failure};
use crate::key::{DEFAULT_MAX_KEY_LEN, IdempotencyKey};
use crate::options::RequestOptions;
use crate::outcome::RetryOutcome;
use crate::policy::RetryPolicy;
use crate::replay::ReplayDetector;
use crate::retry_after::retry_after;
use crate::rng::{Random, SeededRng};
use crate::time::{Clock, Sleeper, SystemClock, TokioSleeper};

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
///             .policy(RetryPolicy::standard().max_attempts(8))
///             .build(),
///     )
///     .build();
/// # let _ = client;
/// ```
#[derive(Debug, Clone)]
pub struct IdempotentRetry {
    config: Arc<Config>,
}

#[derive(Clone)]
struct Config {
    policy: RetryPolicy,
    carrier: KeyCarrier,
    keyed_methods: Vec<Method>,
    max_key_len: usize,
    max_body: usize,
    budget: Option<Arc<RetryBudget>>,
    classifier: Arc<dyn Classifier>,
    replay: ReplayDetector,
    clock: Arc<dyn Clock>,
    sleeper: Arc<dyn Sleeper>,
    rng: Arc<dyn Random>,
    on_retry: Option<Arc<OnRetry>>,
}

type OnRetry = dyn Fn(&RetryEvent) + Send + Sync;

/// One retry about to happen, as reported to [`IdempotentRetryBuilder::on_retry`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryEvent {
    /// The attempt that just failed (1 for the first).
    pub attempt: u32,
    /// The most attempts the policy allows.
    pub max_attempts: u32,
    /// Why: the status (`503`) or the transport failure (`reset`, `timeout`, …).
    pub cause: String,
    /// How long the engine waits before the next attempt.
    pub delay: Duration,
    /// The key's [fingerprint](IdempotencyKey::fingerprint), never the key.
    pub key_fingerprint: Option<String>,
    /// The method and URL of the request (without its query string).
    pub target: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("policy", &self.policy)
            .field("carrier", &self.carrier)
            .field("keyed_methods", &self.keyed_methods)
            .field("max_key_len", &self.max_key_len)
            .field("max_body", &self.max_body)
            .field("budget", &self.budget)
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

/// Builds an [`IdempotentRetry`]. Every setting has a default; see each method.
#[derive(Debug, Clone)]
pub struct IdempotentRetryBuilder {
    config: Config,
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
            config: Config {
                policy: RetryPolicy::standard(),
                carrier: KeyCarrier::standard(),
                keyed_methods: vec![Method::POST, Method::PATCH],
                max_key_len: DEFAULT_MAX_KEY_LEN,
                max_body: IdempotentRetry::DEFAULT_MAX_BODY,
                budget: Some(Arc::new(RetryBudget::new())),
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
        self.config.budget.as_ref()
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
        self.config.policy = policy;
        self
    }

    /// Where the key goes (default [`KeyCarrier::standard`], a bare `Idempotency-Key` header).
    pub fn carrier(mut self, carrier: KeyCarrier) -> Self {
        self.config.carrier = carrier;
        self
    }

    /// Configures the layer for a server's convention: carrier, maximum key length and replay
    /// detection; for an endpoint that takes no key, no method gets one.
    pub fn convention(self, convention: &crate::convention::ServerConvention) -> Self {
        convention.configure(self)
    }

    /// The methods that get a key minted (default POST and PATCH).
    pub fn keyed_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.keyed_methods = methods.into_iter().collect();
        self
    }

    /// The longest key this server accepts (default 255; AWS EC2 accepts 64). Longer keys given
    /// by the caller are refused before sending.
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.config.max_key_len = max;
        self
    }

    /// The most bytes of one response body the layer reads into memory (default
    /// [`IdempotentRetry::DEFAULT_MAX_BODY`], 8 MiB).
    ///
    /// The layer reads error bodies (status 400 and above) so the classifier can look inside
    /// them, and every body of a request sent with [`RequestOptions::buffer_body`]. An error
    /// body longer than this is classified on its first `max` bytes and handed to the caller
    /// with the rest unread; a body the caller asked to have buffered fails the request with
    /// [`Error::ResponseTooLarge`].
    pub fn max_body(mut self, max: usize) -> Self {
        self.config.max_body = max;
        self
    }

    /// A retry budget, possibly shared with other layers (default: a fresh
    /// [`RetryBudget::new`] per layer).
    pub fn budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.config.budget = Some(budget);
        self
    }

    /// Turns the retry budget off: only the policy bounds retries.
    pub fn no_budget(mut self) -> Self {
        self.config.budget = None;
        self
    }

    /// The classifier (default [`DefaultClassifier`]).
    pub fn classifier(mut self, classifier: impl Classifier + 'static) -> Self {
        self.config.classifier = Arc::new(classifier);
        self
    }

    /// How replays are recognised (default [`ReplayDetector::standard`]).
    pub fn replay_detector(mut self, detector: ReplayDetector) -> Self {
        self.config.replay = detector;
        self
    }

    /// The clock (default [`SystemClock`]).
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.config.clock = Arc::new(clock);
        self
    }

    /// The sleeper (default [`TokioSleeper`]).
    pub fn sleeper(mut self, sleeper: impl Sleeper + 'static) -> Self {
        self.config.sleeper = Arc::new(sleeper);
        self
    }

    /// The jitter source (default [`SeededRng::from_entropy`]).
    pub fn rng(mut self, rng: impl Random + 'static) -> Self {
        self.config.rng = Arc::new(rng);
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
        self.config.on_retry = Some(Arc::new(hook));
        self
    }

    /// The layer.
    pub fn build(self) -> IdempotentRetry {
        IdempotentRetry { config: Arc::new(self.config) }
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
            host = %budget_host(&req),
            key = Empty,
            attempts = Empty,
            replayed = Empty,
            outcome = Empty,
        );
        self.config
            .execute(req, extensions, next, &options)
            .instrument(span)
            .await
            .map_err(reqwest_middleware::Error::middleware)
    }
}

/// Per-request state of the attempt loop.
struct Run {
    key: Option<IdempotencyKey>,
    attempts: u32,
    total_delay: Duration,
    may_have_been_applied: bool,
    retry_after: Option<Duration>,
}

impl Run {
    fn failure(&self, ended: Ended) -> Box<Failure> {
        Box::new(Failure {
            attempts: self.attempts,
            key: self.key.clone(),
            may_have_been_applied: self.may_have_been_applied,
            last: ended.into_last(),
            retry_after: self.retry_after,
            total_delay: self.total_delay,
        })
    }
}

impl Config {
    async fn execute(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
        options: &RequestOptions,
    ) -> Result<Response, Error> {
        // Key: validated and attached before anything is sent.
        options.validate()?;
        let policy = options.policy_or(&self.policy);
        policy.check().map_err(Error::InvalidRequest)?;
        let key = self.prepare_key(&mut request, options)?;
        let replayable = request.body().is_none_or(|b| b.as_bytes().is_some());
        let resendable = key.is_some() || request.method().is_idempotent();
        // The request's span, looked up once (a thread-local read each time).
        let request_span = tracing::Span::current();
        if !request_span.is_disabled()
            && let Some(key) = &key
        {
            request_span.record("key", key.fingerprint());
        }
        // A stream goes out once, as is; the classifier sees a body-less copy of it.
        let (template, mut stream) = if replayable { (request, None) } else { (without_body(&request), Some(request)) };
        let mut run =
            Run { key, attempts: 0, total_delay: Duration::ZERO, may_have_been_applied: false, retry_after: None };
        let mut withdrawal: Option<Withdrawal> = None;
        let started = self.clock.now();

        loop {
            // Attempt, within what is left of the deadline.
            let elapsed = since(started, self.clock.now());
            let timeout = match (policy.get_attempt_timeout(), policy.get_deadline()) {
                (t, None) => t,
                (t, Some(deadline)) => Some(t.unwrap_or(Duration::MAX).min(deadline.saturating_sub(elapsed))),
            };
            let attempt_request = match stream.take() {
                Some(original) => original,
                None => template.try_clone().expect("only replayable requests are attempted more than once"),
            };
            run.attempts += 1;
            let attempt_span = tracing::debug_span!(
                "attempt",
                attempt = run.attempts,
                cause = Empty,
                delay_ms = Empty,
                replayed = Empty
            );
            let reading = Reading { all_bodies: options.is_buffered(), max_body: self.max_body };
            let ended = attempt::run(next.clone(), attempt_request, extensions, timeout, &*self.sleeper, reading)
                .instrument(attempt_span.clone())
                .await;

            // Classify.
            let replayed = match (ended.status(), ended.headers()) {
                (Some(status), Some(headers)) => self.replay.is_replayed_response(status, headers, run.key.is_some()),
                _ => false,
            };
            let context = AttemptContext::new(&template, run.attempts, run.key.is_some(), ended.as_result(replayed));
            let verdict = self.classifier.classify(&context);
            if !attempt_span.is_disabled() {
                attempt_span.record("cause", ended.cause()).record("replayed", replayed);
            }
            if !request_span.is_disabled() {
                request_span.record("attempts", run.attempts).record("replayed", replayed);
            }

            // Decide.
            let kind = match verdict {
                Verdict::Done => {
                    let host = budget_host(&template);
                    return self.finish(ended, run, replayed, host, withdrawal, options, &request_span);
                }
                Verdict::KeyReuse => {
                    request_span.record("outcome", "key_reuse");
                    return Err(Error::KeyReuse(run.failure(ended)));
                }
                Verdict::Retry { kind, may_have_been_applied } => {
                    run.may_have_been_applied |= may_have_been_applied;
                    kind
                }
            };
            let now = self.clock.now();
            let server_delay = ended.headers().and_then(|h| retry_after(h, now));
            run.retry_after = server_delay.or(run.retry_after);
            let failed = Failed {
                attempts: run.attempts,
                may_have_been_applied: matches!(verdict, Verdict::Retry { may_have_been_applied: true, .. }),
                replayed_server_error: replayed && ended.status().is_some_and(|s| s.is_server_error()),
                resendable,
                replayable,
                server_delay,
                elapsed: since(started, now),
            };
            let delay = match decide(&policy, &failed, &*self.rng) {
                Decision::Retry { delay } => delay,
                Decision::Stop(stop) => {
                    request_span.record("outcome", stop_name(stop));
                    return Err(stop_error(stop, run.failure(ended)));
                }
            };
            if let Some(budget) = &self.budget {
                match budget.try_acquire(budget_host(&template), kind == RetryKind::Transport(TransportCause::Timeout))
                {
                    Some(w) => withdrawal = Some(w),
                    None => {
                        request_span.record("outcome", "budget_exhausted");
                        return Err(Error::BudgetExhausted(run.failure(ended)));
                    }
                }
            }

            // Sleep.
            if let Some(hook) = &self.on_retry {
                let url = template.url();
                hook(&RetryEvent {
                    attempt: run.attempts,
                    max_attempts: policy.get_max_attempts(),
                    cause: ended.cause(),
                    delay,
                    key_fingerprint: run.key.as_ref().map(IdempotencyKey::fingerprint),
                    target: format!("{} {}{}", template.method(), url.origin().ascii_serialization(), url.path()),
                });
            }
            attempt_span.record("delay_ms", delay.as_millis() as u64);
            tracing::debug!(
                parent: &attempt_span,
                attempt = run.attempts,
                cause = %ended.cause(),
                delay_ms = delay.as_millis() as u64,
                replayed,
                "retrying"
            );
            drop(ended);
            self.sleeper.sleep(delay).await;
            run.total_delay += delay;
        }
    }

    /// Settles the key: the one already on the request (never overwritten), the one in the
    /// options, or a fresh one for keyed methods. Validates it and puts it on the request.
    fn prepare_key(&self, request: &mut Request, options: &RequestOptions) -> Result<Option<IdempotencyKey>, Error> {
        let wants_key =
            options.get_key().is_some() || (!options.is_keyless() && self.keyed_methods.contains(request.method()));
        let existing = if self.carrier.in_body() && !wants_key {
            None
        } else {
            let body = match request.body() {
                None => Some(&[][..]),
                Some(b) => b.as_bytes(),
            };
            self.carrier.existing_key(request.headers(), body, self.max_key_len)?
        };
        let key = match (existing, options.get_key()) {
            (Some(have), Some(want)) if have != *want => {
                return Err(Error::InvalidRequest(format!(
                    "the request already carries idempotency key sha256:{} and RequestOptions sets another, sha256:{}",
                    have.fingerprint(),
                    want.fingerprint()
                )));
            }
            (Some(have), _) => return Ok(Some(have)),
            (None, Some(want)) => want.clone(),
            (None, None) if wants_key => IdempotencyKey::random(),
            (None, None) => return Ok(None),
        };
        key.check_max_len(self.max_key_len)?;
        self.carrier.attach(request, &key)?;
        Ok(Some(key))
    }

    /// Hands a final answer to the caller, with the outcome record attached.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        ended: Ended,
        mut run: Run,
        replayed: bool,
        host: &str,
        withdrawal: Option<Withdrawal>,
        options: &RequestOptions,
        span: &tracing::Span,
    ) -> Result<Response, Error> {
        let mut response = match ended {
            Ended::Streaming(response) => response,
            Ended::Buffered(buffered) if options.is_buffered() && buffered.is_truncated() => {
                // The caller asked for the whole body in memory, and it does not fit. An answer
                // that is not a refusal may mean the request took effect.
                let status = buffered.status();
                run.may_have_been_applied |= !status.is_client_error();
                span.record("outcome", "response_too_large");
                let failure = run.failure(Ended::Buffered(buffered));
                return Err(Error::ResponseTooLarge { limit: self.max_body, failure });
            }
            Ended::Buffered(buffered) => buffered.into_response(),
            failed @ Ended::Failed { .. } => {
                span.record("outcome", "transport_error");
                return Err(Error::Transport(run.failure(failed)));
            }
        };
        if let Some(budget) = &self.budget {
            budget.on_success(host, withdrawal);
        }
        span.record("outcome", if replayed { "replayed" } else { "done" });
        let status = response.status();
        response.extensions_mut().insert(RetryOutcome {
            attempts: run.attempts,
            succeeded: status.is_success() || (replayed && self.replay.is_success_replay(status, run.key.is_some())),
            key: run.key,
            replayed,
            total_delay: run.total_delay,
        });
        Ok(response)
    }
}

fn stop_error(stop: Stop, failure: Box<Failure>) -> Error {
    match stop {
        Stop::ReplayedFailure => Error::ReplayedFailure(failure),
        Stop::OutcomeUnknown => Error::OutcomeUnknown(failure),
        Stop::NotReplayable => Error::NotReplayable(failure),
        Stop::AttemptsExhausted => Error::AttemptsExhausted(failure),
        Stop::Deadline => Error::DeadlineExceeded(failure),
    }
}

fn stop_name(stop: Stop) -> &'static str {
    match stop {
        Stop::ReplayedFailure => "replayed_failure",
        Stop::OutcomeUnknown => "outcome_unknown",
        Stop::NotReplayable => "not_replayable",
        Stop::AttemptsExhausted => "attempts_exhausted",
        Stop::Deadline => "deadline_exceeded",
    }
}

fn since(start: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(start).unwrap_or(Duration::ZERO)
}

/// The budget is per host and port: `host[:port]` as the URL spells it, sliced, not built.
fn budget_host(request: &Request) -> &str {
    &request.url()[url::Position::BeforeHost..url::Position::AfterPort]
}

/// A copy of `request` without its body, for classifiers to look at when the original (a
/// stream) has been sent.
fn without_body(request: &Request) -> Request {
    let mut copy = Request::new(request.method().clone(), request.url().clone());
    *copy.headers_mut() = request.headers().clone();
    *copy.version_mut() = request.version();
    copy
}
