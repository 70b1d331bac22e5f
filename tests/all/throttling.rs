//! Adaptive rate limiting against a server that throttles: it allows `RATE` requests in each
//! second of the test's clock and answers 429 above that. Real sockets, injected time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use idempotent_retry::Error;
use idempotent_retry::rate_limit::AdaptiveRateLimiter;
use idempotent_retry::time::{Clock, ManualClock};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::support::*;

const RATE: u64 = 20;
const OPS: usize = 400;

/// Counts requests per second of `clock`; above `RATE` in a second, a 429.
struct Throttler {
    clock: ManualClock,
    seen: Mutex<Seen>,
}

/// The second being counted, the requests in it, and every answer as (time, throttled).
type Seen = (u64, u64, Vec<(SystemTime, bool)>);

/// The server's handle on the shared [`Throttler`].
struct Serve(Arc<Throttler>);

impl Respond for Serve {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let now = self.0.clock.now();
        let second = now.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let mut seen = self.0.seen.lock().unwrap();
        if seen.0 != second {
            (seen.0, seen.1) = (second, 0);
        }
        seen.1 += 1;
        let throttled = seen.1 > RATE;
        seen.2.push((now, throttled));
        ResponseTemplate::new(if throttled { 429 } else { 201 })
    }
}

struct Run {
    /// Share of requests answered 429 after the first 2 s.
    throttled_after_2s: f64,
    /// Successes a second over the whole run, on the test's clock.
    goodput: f64,
    failed: usize,
    host: String,
}

async fn run(adaptive: bool) -> (Run, Option<Arc<AdaptiveRateLimiter>>) {
    let time = Time::new();
    let throttler = Arc::new(Throttler { clock: time.clock.clone(), seen: Mutex::new((0, 0, Vec::new())) });
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(Serve(throttler.clone())).mount(&server).await;
    let limiter = adaptive.then(|| Arc::new(AdaptiveRateLimiter::new()));
    let mut layer = time.layer().policy(fast_policy().without_deadline()).no_budget();
    if let Some(limiter) = &limiter {
        layer = layer.adaptive_limiter(limiter.clone());
    }
    let client = client(layer);
    let mut failed = 0;
    for _ in 0..OPS {
        if client.post(server.uri()).body("{}").send().await.is_err() {
            failed += 1;
        }
    }
    let seen = throttler.seen.lock().unwrap();
    let started = t0();
    let after: Vec<bool> =
        seen.2.iter().filter(|(at, _)| *at >= started + Duration::from_secs(2)).map(|(_, t)| *t).collect();
    let throttled_after_2s = after.iter().filter(|t| **t).count() as f64 / after.len().max(1) as f64;
    let elapsed = time.clock.now().duration_since(started).unwrap().as_secs_f64().max(1.0);
    let goodput = seen.2.iter().filter(|(_, t)| !t).count() as f64 / elapsed;
    let host = budget_host(&server);
    (Run { throttled_after_2s, goodput, failed, host }, limiter)
}

#[tokio::test]
async fn adaptive_mode_stops_the_waves_of_429s() {
    let (with, limiter) = run(true).await;
    let (without, _) = run(false).await;
    eprintln!(
        "throttled after 2 s: adaptive {:.3}, backoff only {:.3}; goodput: adaptive {:.1}/s, backoff only {:.1}/s (server allows {RATE}/s); failed: {} / {}",
        with.throttled_after_2s, without.throttled_after_2s, with.goodput, without.goodput, with.failed, without.failed
    );
    assert_eq!(with.failed, 0, "every request got through in its turn");
    assert!(with.throttled_after_2s <= 0.05, "adaptive: {:.3} throttled after 2 s", with.throttled_after_2s);
    // One client sending back to back: the rate probes up to the server's, drops by β on a
    // throttle, and a throttled retry costs five sends' worth of tokens, so goodput is below
    // the server's rate (about 0.85 of it here).
    assert!(with.goodput >= 0.75 * RATE as f64, "adaptive goodput {:.1}/s", with.goodput);
    // The same run without it: every second starts with a burst past the limit.
    assert!(without.throttled_after_2s > 0.05, "backoff only: {:.3}", without.throttled_after_2s);
    let state = limiter.unwrap().state(&with.host).expect("the host is known");
    assert!(state.enabled && state.fill_rate < 2.0 * RATE as f64, "{state:?}");
}

#[tokio::test]
async fn a_turn_past_the_deadline_sends_nothing() {
    let time = Time::new();
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    let host = budget_host(&server);
    let limiter = Arc::new(AdaptiveRateLimiter::new());
    // The host throttled the one request it had: the next turn is a token's time away.
    limiter.record(&host, time.clock.now(), time.clock.now(), true);
    let turn = Duration::from_secs_f64(1.0 / limiter.state(&host).unwrap().fill_rate);
    let within =
        |deadline| client(time.layer().policy(fast_policy().with_deadline(deadline)).adaptive_limiter(limiter.clone()));

    let err = within(turn / 2).post(server.uri()).body("{}").send().await.unwrap_err();
    let err = Error::find(&err).expect("the layer's error");
    assert!(matches!(err, Error::RateLimited { wait } if *wait == turn), "{err}");
    assert!(!err.may_have_been_applied() && err.is_retryable(), "{err}");
    assert_eq!(err.attempts(), 0);
    assert!(err.to_string().contains("nothing was sent"), "{err}");
    assert_eq!(requests_seen(&server).await, 0, "nothing left");
    assert!(time.delays().is_empty(), "and nothing waited");

    // The refused turn took no token: with twice the time, the request waits the same turn.
    within(turn * 2).post(server.uri()).body("{}").send().await.expect("the turn fits");
    assert_eq!(time.delays(), [turn]);
    assert_eq!(requests_seen(&server).await, 1);
}

#[tokio::test]
async fn a_retry_whose_turn_is_past_the_deadline_stops_there() {
    let time = Time::new();
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(429)).mount(&server).await;
    let client = client(time.layer().policy(fast_policy().with_deadline(Duration::from_secs(3))).adaptive());

    let err = client.post(server.uri()).body("{}").send().await.unwrap_err();
    let err = Error::find(&err).expect("the layer's error");
    // Backoff alone would spend 1.5 s on five attempts and end AttemptsExhausted; each
    // throttle cuts the rate, and the turn of a retry lands past what is left of the 3 s.
    assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
    assert!(!err.may_have_been_applied(), "{err}");
    assert!(err.attempts() < 5, "{err}");
    assert_eq!(requests_seen(&server).await, err.attempts() as usize);
    assert!(time.sleeper.total() < Duration::from_secs(3), "{:?}", time.delays());
}

#[tokio::test]
async fn off_by_default() {
    let time = Time::new();
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(429)).up_to_n_times(3).mount(&server).await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
    assert!(time.layer().build().rate_limiter().is_none());
    let client = client(time.layer().policy(fast_policy()));
    client.post(server.uri()).body("{}").send().await.unwrap();
    // Backoff alone: 100, 200, 400 ms.
    assert_eq!(time.delays(), [ms(100), ms(200), ms(400)]);
}

/// With the adaptive rate limiter on, the limiter paces a throttled retry, over the transient
/// schedule; without it, the throttled schedule applies. (Both at once waited twice over:
/// `benches/throttling.rs` measured 0.886 of the server's rate with both, 0.937 without.)
#[tokio::test]
async fn the_limiter_not_the_throttled_backoff_paces_an_adaptive_retry() {
    use idempotent_retry::backoff::{ExponentialBackoff, Jitter};
    for adaptive in [false, true] {
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(429)).up_to_n_times(1).mount(&server).await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
        let time = Time::new();
        let policy = fast_policy().with_throttle_backoff(
            ExponentialBackoff::new(Duration::from_secs(5), Duration::from_secs(20)).jitter(Jitter::None),
        );
        let mut layer = time.layer().policy(policy);
        if adaptive {
            layer = layer.adaptive();
        }
        let response = client(layer).post(server.uri()).body("{}").send().await.unwrap();
        assert_eq!(response.status(), 201);
        let delay = time.delays()[0];
        if adaptive {
            // The limiter's turn: 0.7 of the rate it measured (one request in the first half
            // second, 1.4 a second), over the 100 ms transient backoff.
            assert!(delay > Duration::from_millis(500) && delay < Duration::from_secs(1), "{delay:?}");
        } else {
            assert_eq!(delay, Duration::from_secs(5), "the throttled schedule");
        }
    }
}
