//! The engine behind the layer: one request's attempts, each sent, classified, decided on, and
//! slept after, read top-down as those steps.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Extensions, Method};
use reqwest::{Request, Response};
use reqwest_middleware::Next;
use tracing::Instrument;
use tracing::field::Empty;

use crate::attempt::{self, Ended, Reading};
use crate::backoff::retry_after;
use crate::budget::{RetryBudget, RetryCost, RetryPartition, Withdrawal};
use crate::carrier::KeyCarrier;
use crate::classify::{AttemptContext, Classifier, RetryKind, TransportCause, Verdict};
use crate::decide::{Decision, Setback, decide};
use crate::error::{Error, Failure};
use crate::key::IdempotencyKey;
use crate::options::RequestOptions;
use crate::outcome::{RetryEvent, RetryOutcome};
use crate::policy::RetryPolicy;
use crate::rate_limit::AdaptiveRateLimiter;
use crate::redirect::Redirect;
use crate::replay::ReplayDetector;
use crate::telemetry;
use crate::time::{Clock, Random, Sleeper};

pub(crate) type OnRetry = dyn Fn(&RetryEvent) + Send + Sync;

/// What the layer was built with.
#[derive(Clone)]
pub(crate) struct Engine {
    pub policy: RetryPolicy,
    pub carrier: KeyCarrier,
    pub keyed_methods: Vec<Method>,
    pub max_key_len: usize,
    pub max_body: usize,
    pub budget: Option<Arc<RetryBudget>>,
    /// The budget's partition this layer's requests draw from.
    pub partition: RetryPartition,
    /// The adaptive rate limiter, when turned on.
    pub rate: Option<Arc<AdaptiveRateLimiter>>,
    pub classifier: Arc<dyn Classifier>,
    pub replay: ReplayDetector,
    pub clock: Arc<dyn Clock>,
    pub sleeper: Arc<dyn Sleeper>,
    pub rng: Arc<dyn Random>,
    pub on_retry: Option<Arc<OnRetry>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("policy", &self.policy)
            .field("carrier", &self.carrier)
            .field("keyed_methods", &self.keyed_methods)
            .field("max_key_len", &self.max_key_len)
            .field("max_body", &self.max_body)
            .field("budget", &self.budget)
            .field("partition", &self.partition)
            .field("rate", &self.rate)
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

/// One request while the engine works on it.
struct Exchange<'a> {
    options: &'a RequestOptions,
    policy: Cow<'a, RetryPolicy>,
    /// What every attempt sends (a body-less copy when the body is a stream).
    template: Request,
    /// A stream body, sent once, by the first attempt.
    stream: Option<Box<Request>>,
    /// The body can be sent again.
    replayable: bool,
    /// The request carries a key or its method is idempotent.
    resendable: bool,
    started: SystemTime,
    /// When the last attempt went out.
    sent: SystemTime,
    tally: Tally,
    /// Tokens the last retry took from the budget, to hand back on success.
    withdrawal: Option<Withdrawal>,
    /// The request's span.
    span: tracing::Span,
    /// The current attempt's span.
    attempt_span: tracing::Span,
}

/// What the attempts have come to so far.
struct Tally {
    key: Option<IdempotencyKey>,
    attempts: u32,
    total_delay: Duration,
    may_have_been_applied: bool,
    retry_after: Option<Duration>,
    /// Attempts the server refused unprocessed.
    refusals: u32,
}

impl Tally {
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

impl Engine {
    /// Sends `request` until it is answered for good, the rules stop it, or its time runs out.
    ///
    /// Not an `async fn`: one would keep `request` as its argument and again inside the
    /// exchange, and this future is boxed for every request (a larger box is a slower malloc).
    pub(crate) fn execute<'a>(
        &'a self,
        request: Request,
        extensions: &'a mut Extensions,
        next: Next<'a>,
        options: &'a RequestOptions,
        span: tracing::Span,
    ) -> impl Future<Output = Result<Response, Error>> + 'a {
        let mut prepared = self.prepare(request, options, span);
        async move {
            // Used in place, never moved into a local of its own (which would be a second copy).
            let exchange = match prepared {
                Ok(ref mut exchange) => exchange,
                Err(error) => return Err(error),
            };
            self.pace_first(exchange).await?;
            loop {
                let ended = self.attempt(exchange, extensions, next.clone()).await;
                if let Some(redirect) = crate::redirect::of(&exchange.template, &ended) {
                    let turn = self.redirected(exchange, redirect, ended)?;
                    if !turn.is_zero() {
                        self.sleeper.sleep(turn).await;
                        exchange.tally.total_delay += turn;
                    }
                    continue;
                }
                let replayed = self.is_replay(exchange, &ended);
                let verdict = self.classify(exchange, &ended, replayed);
                if let Some(rate) = &self.rate {
                    let throttled = matches!(verdict, Verdict::Retry { kind: RetryKind::Throttled, .. });
                    rate.record(budget_host(&exchange.template), exchange.sent, self.clock.now(), throttled);
                }
                let delay = match verdict {
                    Verdict::Done => return self.finish(ended, exchange, replayed),
                    Verdict::KeyReuse => {
                        exchange.span.record("outcome", "key_reuse");
                        return Err(Error::KeyReuse(exchange.tally.failure(ended)));
                    }
                    Verdict::Retry { kind, may_have_been_applied } => {
                        exchange.tally.may_have_been_applied |= may_have_been_applied;
                        match self.decide(exchange, &ended, kind, may_have_been_applied, replayed) {
                            Ok(delay) => delay,
                            Err(stop) => return Err(stop(exchange.tally.failure(ended))),
                        }
                    }
                };
                self.before_sleep(exchange, ended, delay, replayed);
                self.sleeper.sleep(delay).await;
                exchange.tally.total_delay += delay;
            }
        }
    }

    /// Checks the options and the policy, settles the key and puts it on the request. Nothing
    /// is sent when this fails.
    /// `span` is the request's, which the caller enters around the future (not yet entered here).
    fn prepare<'a>(
        &'a self,
        mut request: Request,
        options: &'a RequestOptions,
        span: tracing::Span,
    ) -> Result<Exchange<'a>, Error> {
        options.validate()?;
        let policy = options.policy_or(&self.policy);
        policy.check().map_err(Error::InvalidRequest)?;
        let key = self.prepare_key(&mut request, options)?;
        let replayable = request.body().is_none_or(|b| b.as_bytes().is_some());
        let resendable = key.is_some() || request.method().is_idempotent();
        if !span.is_disabled()
            && let Some(key) = &key
        {
            span.record("key", key.fingerprint());
        }
        // A stream goes out once, as is; the classifier sees a body-less copy of it.
        let (template, stream) =
            if replayable { (request, None) } else { (without_body(&request), Some(Box::new(request))) };
        Ok(Exchange {
            options,
            policy,
            template,
            stream,
            replayable,
            resendable,
            started: self.clock.now(),
            sent: SystemTime::UNIX_EPOCH,
            tally: Tally {
                key,
                attempts: 0,
                total_delay: Duration::ZERO,
                may_have_been_applied: false,
                retry_after: None,
                refusals: 0,
            },
            withdrawal: None,
            span,
            attempt_span: tracing::Span::none(),
        })
    }

    /// Settles the key: the one already on the request (never overwritten), the one in the
    /// options, or a fresh one for keyed methods. Validates it and puts it on the request.
    fn prepare_key(&self, request: &mut Request, options: &RequestOptions) -> Result<Option<IdempotencyKey>, Error> {
        let wants_key = options.explicit_key().is_some()
            || (!options.is_keyless() && self.keyed_methods.contains(request.method()));
        let existing = if self.carrier.in_body() && !wants_key {
            None
        } else {
            let body = match request.body() {
                None => Some(&[][..]),
                Some(b) => b.as_bytes(),
            };
            self.carrier.existing_key(request.headers(), body, self.max_key_len)?
        };
        let key = match (existing, options.explicit_key()) {
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

    /// One attempt, within what is left of the deadline.
    async fn attempt(&self, x: &mut Exchange<'_>, extensions: &mut Extensions, next: Next<'_>) -> Ended {
        let now = self.clock.now();
        let elapsed = since(x.started, now);
        let limit = match (x.policy.attempt_timeout(), x.policy.deadline()) {
            (t, None) => t,
            (t, Some(deadline)) => Some(t.unwrap_or(Duration::MAX).min(deadline.saturating_sub(elapsed))),
        };
        let request = match x.stream.take() {
            Some(original) => *original,
            // The first attempt sends the request as the caller built it and keeps the copy:
            // the original's header map has room for the client's default headers, a copy's
            // has none (it would grow and rehash inside reqwest, ~1,100 instructions).
            None if x.tally.attempts == 0 => {
                let copy = x.template.try_clone().expect("a replayable request clones");
                std::mem::replace(&mut x.template, copy)
            }
            None => x.template.try_clone().expect("only replayable requests are attempted more than once"),
        };
        x.tally.attempts += 1;
        x.sent = now;
        x.attempt_span = attempt_span(&x.template, x.tally.attempts);
        let reading = Reading { all_bodies: x.options.is_buffered(), max_body: self.max_body };
        let send = attempt::send(next, request, extensions, limit, &*self.sleeper, reading);
        // No subscriber wants the span: no `Instrumented` wrapper to move the future into.
        let result =
            if x.attempt_span.is_disabled() { send.await } else { send.instrument(x.attempt_span.clone()).await };
        attempt::ended(result, limit)
    }

    /// Whether the server answered from its idempotency store.
    fn is_replay(&self, x: &Exchange<'_>, ended: &Ended) -> bool {
        match (ended.status(), ended.headers()) {
            (Some(status), Some(headers)) => self.replay.is_replay(status, headers, x.tally.key.as_ref()),
            _ => false,
        }
    }

    /// What the attempt was, by the classifier.
    fn classify(&self, x: &Exchange<'_>, ended: &Ended, replayed: bool) -> Verdict {
        let context =
            AttemptContext::new(&x.template, x.tally.attempts, x.tally.key.as_ref(), ended.as_result(replayed));
        let verdict = self.classifier.classify(&context);
        if !x.attempt_span.is_disabled() {
            let span = &x.attempt_span;
            span.record("cause", ended.cause()).record("replayed", replayed);
            match (ended.status(), ended) {
                (Some(status), _) => {
                    span.record("http.response.status_code", status.as_u16());
                    if status.as_u16() >= 400 {
                        span.record("error.type", status.as_str());
                    }
                }
                (None, Ended::Transport { cause, .. }) => {
                    span.record("error.type", cause.as_str());
                }
                (None, _) => {}
            }
        }
        if !x.span.is_disabled() {
            x.span.record("attempts", x.tally.attempts).record("replayed", replayed);
        }
        verdict
    }

    /// Whether to retry a transient failure, and after how long: the pure rules, then the
    /// budget. `Err` holds how to stop.
    fn decide(
        &self,
        x: &mut Exchange<'_>,
        ended: &Ended,
        kind: RetryKind,
        may_have_been_applied: bool,
        replayed: bool,
    ) -> Result<Duration, fn(Box<Failure>) -> Error> {
        let now = self.clock.now();
        let server_delay = ended.headers().and_then(|h| retry_after(h, now));
        x.tally.retry_after = server_delay.or(x.tally.retry_after);
        x.tally.refusals += u32::from(kind == RetryKind::Transport(TransportCause::Refused));
        let setback = Setback {
            attempts: x.tally.attempts,
            may_have_been_applied,
            replayed_server_error: replayed && ended.status().is_some_and(|s| s.is_server_error()),
            resendable: x.resendable,
            replayable: x.replayable,
            server_delay,
            elapsed: since(x.started, now),
            refusals: x.tally.refusals,
            // With the adaptive rate limiter on, it paces throttled retries (its wait is the
            // floor below), so they keep the transient schedule: both at once waited twice over
            // (benches/throttling.rs: goodput 0.886 of the server's rate with both, 0.937 without).
            throttled: kind == RetryKind::Throttled && self.rate.is_none(),
        };
        let delay = match decide(&x.policy, &setback, &*self.rng) {
            Decision::Retry { delay } => delay,
            Decision::Stop(stop) => {
                x.span.record("outcome", stop.name());
                return Err(stop.error());
            }
        };
        if let Some(budget) = &self.budget {
            let cost = match kind {
                RetryKind::Transport(TransportCause::Timeout) => RetryCost::AfterTimeout,
                RetryKind::Throttled => RetryCost::Throttled,
                _ => RetryCost::Retry,
            };
            match budget.try_acquire(self.partition(x), budget_host(&x.template), cost, now) {
                Some(withdrawal) => x.withdrawal = Some(withdrawal),
                None => {
                    x.span.record("outcome", "budget_exhausted");
                    return Err(Error::BudgetExhausted);
                }
            }
        }
        let delay = match self.turn(x, now) {
            Ok(wait) => delay.max(wait),
            Err(_) => {
                x.span.record("outcome", "deadline_exceeded");
                return Err(Error::DeadlineExceeded);
            }
        };
        telemetry::retry(kind.as_str(), delay);
        Ok(delay)
    }

    /// The budget partition of this request: its options', or the layer's.
    fn partition<'x>(&'x self, x: &'x Exchange<'_>) -> &'x RetryPartition {
        x.options.partition().unwrap_or(&self.partition)
    }

    /// How long the next send to the request's host waits for its turn with the adaptive rate
    /// limiter (none when it is off), the turn taken; `Err` with the wait when it lands past
    /// what is left of the deadline, nothing taken.
    fn turn(&self, x: &Exchange<'_>, now: SystemTime) -> Result<Duration, Duration> {
        let Some(rate) = &self.rate else { return Ok(Duration::ZERO) };
        let left = x.policy.deadline().map(|deadline| deadline.saturating_sub(since(x.started, now)));
        rate.reserve(budget_host(&x.template), now, left)
    }

    /// Waits for the first send's turn when the host has been throttling (the adaptive rate
    /// limiter); a turn past the deadline sends nothing.
    async fn pace_first(&self, x: &mut Exchange<'_>) -> Result<(), Error> {
        if self.rate.is_none() {
            return Ok(());
        }
        match self.turn(x, self.clock.now()) {
            Ok(Duration::ZERO) => Ok(()),
            Ok(wait) => {
                tracing::debug!(wait_ms = wait.as_millis() as u64, "waiting for the adaptive rate limit");
                self.sleeper.sleep(wait).await;
                x.tally.total_delay += wait;
                Ok(())
            }
            Err(wait) => {
                x.span.record("outcome", "rate_limited");
                Err(Error::RateLimited { wait })
            }
        }
    }

    /// A write answered with a redirect: followed within its origin as one more attempt (the
    /// same method, body and key, without backoff, after the adaptive rate limiter's turn when
    /// it is on, which is what `Ok` holds), or the end of it. A stop on a redirect never says
    /// "not applied".
    fn redirected(&self, x: &mut Exchange<'_>, redirect: Redirect, ended: Ended) -> Result<Duration, Error> {
        let stop = |x: &mut Exchange<'_>, name: &'static str, error: fn(Box<Failure>) -> Error, ended: Ended| {
            x.tally.may_have_been_applied = true;
            x.span.record("outcome", name);
            Err(error(x.tally.failure(ended)))
        };
        let followed = matches!(redirect, Redirect::Followed(_));
        let url = match redirect {
            Redirect::Follow(url) => url,
            Redirect::OtherOrigin(url) | Redirect::Followed(url) => {
                x.tally.may_have_been_applied = true;
                x.span.record("outcome", "redirected");
                let location = crate::target::redact(&url);
                return Err(Error::Redirected { location, followed, failure: x.tally.failure(ended) });
            }
        };
        if !x.replayable {
            return stop(x, "not_replayable", Error::NotReplayable, ended);
        }
        if x.tally.attempts >= x.policy.max_attempts() {
            return stop(x, "attempts_exhausted", Error::AttemptsExhausted, ended);
        }
        let now = self.clock.now();
        if x.policy.deadline().is_some_and(|deadline| since(x.started, now) >= deadline) {
            return stop(x, "deadline_exceeded", Error::DeadlineExceeded, ended);
        }
        // The same origin, so the same host's turn; one that lands past the deadline stops here.
        let Ok(turn) = self.turn(x, now) else { return stop(x, "deadline_exceeded", Error::DeadlineExceeded, ended) };
        tracing::debug!(parent: &x.attempt_span, status = ended.status().map(|s| s.as_u16()), "following a redirect of the write within its origin");
        *x.template.url_mut() = url;
        Ok(turn)
    }

    /// Tells whoever listens that the engine will wait `delay`, and lets the failed attempt go
    /// (its connection with it) before the wait.
    fn before_sleep(&self, x: &mut Exchange<'_>, ended: Ended, delay: Duration, replayed: bool) {
        if let Some(hook) = &self.on_retry {
            let url = x.template.url();
            hook(&RetryEvent {
                attempt: x.tally.attempts,
                max_attempts: x.policy.max_attempts(),
                cause: ended.cause(),
                delay,
                key_fingerprint: x.tally.key.as_ref().map(IdempotencyKey::fingerprint),
                target: format!("{} {}{}", x.template.method(), url.origin().ascii_serialization(), url.path()),
            });
        }
        x.attempt_span.record("delay_ms", delay.as_millis() as u64);
        tracing::debug!(
            parent: &x.attempt_span,
            attempt = x.tally.attempts,
            cause = %ended.cause(),
            delay_ms = delay.as_millis() as u64,
            replayed,
            "retrying"
        );
        drop(ended);
    }

    /// Hands a final answer to the caller, with the outcome record attached.
    fn finish(&self, ended: Ended, x: &mut Exchange<'_>, replayed: bool) -> Result<Response, Error> {
        let mut response = match ended {
            Ended::Streaming(response) => response,
            Ended::Buffered(buffered) if x.options.is_buffered() && buffered.is_truncated() => {
                // The caller asked for the whole body in memory, and it does not fit. An answer
                // that is not a refusal may mean the request took effect.
                x.tally.may_have_been_applied |= !buffered.status().is_client_error();
                x.span.record("outcome", "response_too_large");
                let failure = x.tally.failure(Ended::Buffered(buffered));
                return Err(Error::ResponseTooLarge { limit: self.max_body, failure });
            }
            Ended::Buffered(buffered) => buffered.into_response(),
            failed @ Ended::Transport { .. } => {
                x.span.record("outcome", "transport_error");
                return Err(Error::Transport(x.tally.failure(failed)));
            }
        };
        if let Some(budget) = &self.budget {
            // The last send's time stands for now: no clock read on the success path (the refill
            // it misses comes with the next call).
            budget.on_success(self.partition(x), budget_host(&x.template), x.withdrawal, x.sent);
        }
        x.span.record("outcome", if replayed { "replayed" } else { "done" });
        let status = response.status();
        let key = x.tally.key.as_ref();
        let headers = response.headers();
        let key_acknowledged =
            key.is_some() && (replayed || self.replay.carries_marker_or(headers, self.carrier.header_name()));
        response.extensions_mut().insert(RetryOutcome {
            attempts: x.tally.attempts,
            // A 303 answering a write says it was done, and where the result is.
            succeeded: status.is_success()
                || (replayed && self.replay.is_success_replay(status, key))
                || (status == http::StatusCode::SEE_OTHER && crate::redirect::is_write(x.template.method())),
            key: x.tally.key.clone(),
            replayed,
            total_delay: x.tally.total_delay,
            may_be_replay: replayed || (key.is_some() && x.tally.may_have_been_applied),
            key_acknowledged,
        });
        Ok(response)
    }
}

/// An attempt's span, with OpenTelemetry's HTTP client attributes: `url.full` without
/// credentials or query values, `http.request.resend_count` from the second attempt on; the
/// status and `error.type` are recorded when the attempt ends.
fn attempt_span(request: &Request, attempt: u32) -> tracing::Span {
    let method = request.method().as_str();
    let span = tracing::info_span!(
        "attempt",
        otel.name = method,
        otel.kind = "client",
        http.request.method = method,
        url.full = Empty,
        server.address = request.url().host_str(),
        server.port = request.url().port_or_known_default(),
        http.request.resend_count = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
        attempt,
        cause = Empty,
        delay_ms = Empty,
        replayed = Empty
    );
    if !span.is_disabled() {
        span.record("url.full", crate::target::otel_url(request.url()));
        if attempt > 1 {
            span.record("http.request.resend_count", attempt - 1);
        }
    }
    span
}

fn since(start: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(start).unwrap_or(Duration::ZERO)
}

/// The budget is per host and port: `host[:port]` as the URL spells it, sliced, not built.
pub(crate) fn budget_host(request: &Request) -> &str {
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
