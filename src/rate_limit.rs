//! Adaptive client-side rate limiting: when a host throttles, send slower, then find the rate
//! it takes again.
//!
//! # Why, beside backoff and the budget
//!
//! Backoff spaces one request's attempts; the [budget](crate::budget) caps how many retries all
//! requests make. Neither sets a *rate*. Twenty provider workers that each back off on their own
//! after a 429 come back at about the same time and are throttled again, in waves. The AWS SDKs'
//! adaptive retry mode answers with a token bucket in front of every send, per host, whose fill
//! rate follows the CUBIC congestion-control curve (RFC 8312):
//!
//! - Off until the host first throttles: until then it costs one map lookup per request.
//! - The rate the client actually sends at is measured in half-second buckets and smoothed
//!   (an exponentially weighted moving average, weight 0.8 on the newest bucket).
//! - On a throttle, the allowed rate drops to 0.7 × the rate at the time (β = 0.7), and the
//!   time window `K = ∛(W_max · (1 − β) / C)` (C = 0.4) starts.
//! - On every other answer, the rate grows back along `C · (t − K)³ + W_max`: fast at first,
//!   flat near the rate that was throttled, then probing beyond it.
//! - The new rate never exceeds twice the measured rate, and never falls below 0.5 requests a
//!   second.
//! - One cut per round trip, as TCP's CUBIC reacts once per window: a throttle answering a
//!   request sent before the last cut was already paid for by that cut, and so is one in the
//!   same half-second bucket as the cut (a server's window that ran out stays out until it
//!   turns over). The SDKs cut again for each: 32 concurrent requests throttled together cut
//!   the rate by 0.7³² to the floor, and a fleet that hits a limit once crawls for a minute.
//! - A throttle before the first half-second bucket closed cuts from the rate measured so far
//!   in the open bucket (the SDKs take 0 there, the floor: 0.5 requests a second for a client
//!   that was sending hundreds).
//! - Every send takes one token, retries included (aws-sdk-go-v2's `DefaultRequestCost`, and
//!   botocore's; smithy-rs charges a retry 5 and a retry after a timeout 10, which after a
//!   first throttle, at the floor rate, holds a retry 8 to 18 s: the [budget](crate::budget)
//!   already makes retries the scarcer resource). A send that finds no token reserves one and
//!   waits until the bucket would have it: concurrent senders queue up behind each other
//!   instead of all going at once.
//!
//! The constants and the published test vectors are those of aws-sdk-go-v2's
//! `aws/retry/adaptive_ratelimit.go` (as smithy-rs's `client_rate_limiter.rs` has them too);
//! the unit tests below reproduce the vectors exactly.
//!
//! Time comes from the layer's injected [`Clock`](crate::time::Clock), waits go through its
//! [`Sleeper`](crate::time::Sleeper), and a wait that would not fit the request's deadline is
//! not taken: nothing is sent ([`Error::RateLimited`](crate::Error::RateLimited)).
//!
//! # Examples
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use idempotent_retry::rate_limit::AdaptiveRateLimiter;
//!
//! let limiter = AdaptiveRateLimiter::new();
//! let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
//! // Off until the host throttles: nothing waits.
//! assert_eq!(limiter.reserve("api.example.com", t0, None), Ok(Duration::ZERO));
//! limiter.record("api.example.com", t0, t0, true); // a 429 to a request sent at t0
//! let state = limiter.state("api.example.com").unwrap();
//! // One request in the first half second: 2 a second, cut by β to 1.4.
//! assert!(state.enabled && (state.fill_rate - 1.4).abs() < 1e-9);
//! // Now each send waits for its token, and reserving one queues the next behind it.
//! let first = limiter.reserve("api.example.com", t0, None).unwrap();
//! let second = limiter.reserve("api.example.com", t0, None).unwrap();
//! assert!(first.as_secs_f64() > 0.7 && second > first);
//! // Another host is not slowed down.
//! assert!(limiter.state("other.example.com").is_none());
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::time::lock;

/// Weight of the newest half-second bucket in the measured send rate.
const SMOOTH: f64 = 0.8;
/// What a throttle multiplies the rate by.
const BETA: f64 = 0.7;
/// How aggressively the rate grows back (CUBIC's C).
const SCALE: f64 = 0.4;
/// The lowest fill rate, in tokens a second.
const MIN_FILL_RATE: f64 = 0.5;
/// The smallest bucket.
const MIN_CAPACITY: f64 = 1.0;

/// Tokens one send takes.
const SEND_COST: f64 = 1.0;

/// A host's limiter, as it stands: for tests, dashboards and logs.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RateState {
    /// Whether the host has throttled yet (before that, nothing waits).
    pub enabled: bool,
    /// Tokens added a second: the allowed send rate.
    pub fill_rate: f64,
    /// The smoothed rate the client has sent at, in requests a second.
    pub measured_rate: f64,
    /// The rate when the host last throttled (CUBIC's `W_max`).
    pub rate_at_throttle: f64,
    /// Tokens in the bucket (negative while reservations wait for it to fill).
    pub tokens: f64,
    /// The bucket's size.
    pub capacity: f64,
}

/// One host's CUBIC token bucket, on seconds since the Unix epoch.
#[derive(Debug, Clone)]
struct Cubic {
    enabled: bool,
    fill_rate: f64,
    capacity: f64,
    tokens: f64,
    last_refill: Option<f64>,
    measured_rate: f64,
    bucket_start: f64,
    in_bucket: u64,
    rate_at_throttle: f64,
    throttled_at: f64,
}

impl Cubic {
    fn starting_at(now: f64) -> Cubic {
        Cubic {
            enabled: false,
            fill_rate: MIN_FILL_RATE,
            capacity: MIN_CAPACITY,
            tokens: 0.0,
            last_refill: None,
            measured_rate: 0.0,
            bucket_start: half_second(now),
            in_bucket: 0,
            rate_at_throttle: 0.0,
            throttled_at: now,
        }
    }

    /// `K`: how long after a throttle the curve reaches the throttled rate again.
    fn window(&self) -> f64 {
        (self.rate_at_throttle * (1.0 - BETA) / SCALE).cbrt()
    }

    /// The rate the curve allows at `now` since the last throttle.
    fn cubic_rate(&self, now: f64) -> f64 {
        let t = (now - self.throttled_at).max(0.0) - self.window();
        SCALE * t.powi(3) + self.rate_at_throttle
    }

    fn refill(&mut self, now: f64) {
        if let Some(last) = self.last_refill {
            let elapsed = (now - last).max(0.0);
            self.tokens = (self.tokens + elapsed * self.fill_rate).min(self.capacity);
        }
        self.last_refill = Some(self.last_refill.map_or(now, |last| last.max(now)));
    }

    /// Counts one answer into the measured send rate.
    fn measure(&mut self, now: f64) {
        self.in_bucket += 1;
        let bucket = half_second(now);
        if bucket > self.bucket_start {
            let rate = self.in_bucket as f64 / (bucket - self.bucket_start);
            self.measured_rate = rate * SMOOTH + self.measured_rate * (1.0 - SMOOTH);
            self.in_bucket = 0;
            self.bucket_start = bucket;
        }
    }

    fn record(&mut self, now: f64, throttled: bool) {
        self.measure(now);
        let rate = if throttled {
            let current = if self.enabled { self.measured_rate.min(self.fill_rate) } else { self.measured_rate };
            self.rate_at_throttle = current;
            self.throttled_at = now;
            self.enabled = true;
            current * BETA
        } else {
            self.cubic_rate(now)
        };
        let rate = rate.min(2.0 * self.measured_rate);
        self.refill(now);
        self.fill_rate = rate.max(MIN_FILL_RATE);
        self.capacity = rate.max(MIN_CAPACITY);
        self.tokens = self.tokens.min(self.capacity);
    }

    fn reserve(&mut self, now: f64, cost: f64, max_wait: Option<Duration>) -> Result<Duration, Duration> {
        if !self.enabled {
            return Ok(Duration::ZERO);
        }
        self.refill(now);
        let wait = if cost > self.tokens { (cost - self.tokens) / self.fill_rate } else { 0.0 };
        let wait = Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX);
        if max_wait.is_some_and(|max| wait >= max) {
            return Err(wait);
        }
        self.tokens -= cost;
        Ok(wait)
    }

    /// An answer to a request sent at `sent`: a throttle of a request sent before the last cut
    /// only counts into the measured rate.
    fn answer(&mut self, sent: f64, now: f64, throttled: bool) {
        let paid_for = sent < self.throttled_at || half_second(now) == half_second(self.throttled_at);
        if throttled && self.enabled && paid_for {
            self.measure(now);
            return;
        }
        if throttled && self.measured_rate == 0.0 && !self.enabled {
            // No bucket closed yet: what the open one holds, over at least half a second.
            self.measured_rate = (self.in_bucket + 1) as f64 / (now - self.bucket_start).max(0.5);
        }
        self.record(now, throttled);
    }

    fn state(&self) -> RateState {
        RateState {
            enabled: self.enabled,
            fill_rate: self.fill_rate,
            measured_rate: self.measured_rate,
            rate_at_throttle: self.rate_at_throttle,
            tokens: self.tokens,
            capacity: self.capacity,
        }
    }
}

fn half_second(now: f64) -> f64 {
    (now * 2.0).floor() / 2.0
}

fn seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The adaptive rate limiter: a CUBIC token bucket per host, shared by every request through
/// one layer (or several, if they share the `Arc`). Turn it on with
/// [`IdempotentRetryBuilder::adaptive`](crate::IdempotentRetryBuilder::adaptive).
#[derive(Debug, Default)]
pub struct AdaptiveRateLimiter {
    hosts: Mutex<HashMap<String, Cubic>>,
}

impl AdaptiveRateLimiter {
    /// A limiter with no host known: every host is unlimited until it throttles.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the token for one send to `host` at `now`, and says how long to wait before
    /// sending. `Err(wait)` when the wait would take all of `max_wait` (what is left of a
    /// deadline) or more: nothing is taken.
    ///
    /// # Errors
    ///
    /// The wait needed, when it reaches `max_wait`.
    pub fn reserve(&self, host: &str, now: SystemTime, max_wait: Option<Duration>) -> Result<Duration, Duration> {
        let mut hosts = lock(&self.hosts);
        match hosts.get_mut(host) {
            Some(cubic) => cubic.reserve(seconds(now), SEND_COST, max_wait),
            // A host never heard from has never throttled.
            None => Ok(Duration::ZERO),
        }
    }

    /// Counts the answer `host` gave at `now` to a request sent at `sent`: a throttle (a 429)
    /// cuts the rate, unless the request left before the last cut; anything else lets the rate
    /// grow back.
    pub fn record(&self, host: &str, sent: SystemTime, now: SystemTime, throttled: bool) {
        let (sent, now) = (seconds(sent), seconds(now));
        let mut hosts = lock(&self.hosts);
        let cubic = match hosts.get_mut(host) {
            Some(cubic) => cubic,
            None => hosts.entry(host.to_owned()).or_insert_with(|| Cubic::starting_at(now)),
        };
        cubic.answer(sent, now, throttled);
    }

    /// Where `host`'s limiter stands, if any answer from it was counted.
    pub fn state(&self, host: &str) -> Option<RateState> {
        lock(&self.hosts).get(host).map(Cubic::state)
    }
}

#[cfg(test)]
mod tests {
    //! The published vectors: aws-sdk-go-v2 `aws/retry/adaptive_ratelimit_test.go`
    //! (TestAdaptiveRateLimit_CubicSuccess, _CubicThrottle, _ClientSendingRates at commit
    //! 844ff45c), ported by smithy-rs to `aws-smithy-runtime/src/client/retries/
    //! client_rate_limiter.rs` (`test_calculated_rate_with_successes`, `…_with_throttles`,
    //! `test_client_sending_rates`). Each expected value is theirs, compared within 1e-9
    //! relative.
    use super::*;

    fn close(expected: f64, got: f64, what: &str) {
        let tolerance = 1e-9 * expected.abs().max(1.0);
        assert!((expected - got).abs() <= tolerance, "{what}: expected {expected}, got {got}");
    }

    /// A bucket last throttled at `at` seconds while sending `rate` a second.
    fn throttled_at(at: f64, rate: f64) -> Cubic {
        Cubic { rate_at_throttle: rate, throttled_at: at, ..Cubic::starting_at(0.0) }
    }

    #[test]
    fn a_throttle_multiplies_the_rate_by_beta_and_the_curve_starts_there() {
        let cubic = throttled_at(1.0, 10.0);
        close(7.0, 10.0 * BETA, "β decrease");
        close(7.0, cubic.cubic_rate(1.0), "the curve at the throttle");
    }

    #[test]
    fn the_success_curve_matches_the_published_vector() {
        let cubic = throttled_at(5.0, 10.0);
        let vector = [
            (5.0, 7.0),
            (6.0, 9.64893600966),
            (7.0, 10.000030849917364),
            (8.0, 10.453284520772092),
            (9.0, 13.408697022224185),
            (10.0, 21.26626835427364),
            (11.0, 36.425998516920465),
        ];
        for (t, expected) in vector {
            close(expected, cubic.cubic_rate(t), &format!("t = {t}"));
        }
    }

    #[test]
    fn throttles_and_successes_match_the_published_vector() {
        let mut cubic = throttled_at(5.0, 10.0);
        let vector = [
            (false, 5.0, 7.0),
            (false, 6.0, 9.64893600966),
            (true, 7.0, 6.754255206761999),
            (true, 8.0, 4.727978644733399),
            (false, 9.0, 4.670125557970046),
            (false, 10.0, 4.770870456867401),
            (false, 11.0, 6.011819748005445),
            (false, 12.0, 10.792973431384178),
        ];
        // As the Go test does: a throttle applies β to the last calculated rate and makes it
        // the curve's new `W_max`.
        let mut rate = 0.0;
        for (throttled, t, expected) in vector {
            if throttled {
                rate *= BETA;
                cubic.throttled_at = t;
                cubic.rate_at_throttle = rate;
            } else {
                rate = cubic.cubic_rate(t);
            }
            close(expected, rate, &format!("t = {t}"));
        }
    }

    #[test]
    fn measured_and_allowed_rates_match_the_published_vector() {
        // (throttled, t, measured rate, fill rate), one answer every 200 ms from t = 0.
        let vector = [
            (false, 0.2, 0.0, 0.5),
            (false, 0.4, 0.0, 0.5),
            (false, 0.6, 4.800000000000001, 0.5),
            (false, 0.8, 4.800000000000001, 0.5),
            (false, 1.0, 4.16, 0.5),
            (false, 1.2, 4.16, 0.6912),
            (false, 1.4, 4.16, 1.0975999999999997),
            (false, 1.6, 5.632000000000001, 1.6384000000000005),
            (false, 1.8, 5.632000000000001, 2.3328),
            (true, 2.0, 4.3264, 3.0284799999999996),
            (false, 2.2, 4.3264, 3.48663917347026),
            (false, 2.4, 4.3264, 3.821874416040255),
            (false, 2.6, 5.66528, 4.053385727709987),
            (false, 2.8, 5.66528, 4.200373108479454),
            (false, 3.0, 4.333056, 4.282036558348658),
            (true, 3.2, 4.333056, 2.99742559084406),
            (false, 3.4, 4.333056, 3.4522263943863463),
        ];
        let mut cubic = Cubic::starting_at(0.0);
        for (n, (throttled, t, measured, fill)) in vector.into_iter().enumerate() {
            // The time as the tests' manual clock reaches it: 200 ms slept n + 1 times.
            let now = (Duration::from_millis(200) * (n as u32 + 1)).as_secs_f64();
            assert_eq!(t, now, "the clock");
            cubic.record(now, throttled);
            close(measured, cubic.measured_rate, &format!("measured rate at t = {t}"));
            close(fill, cubic.fill_rate, &format!("fill rate at t = {t}"));
        }
    }

    #[test]
    fn off_until_the_first_throttle() {
        let limiter = AdaptiveRateLimiter::new();
        let at = |s: f64| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s);
        for n in 0..100 {
            limiter.record("h", at(n as f64 * 0.01), at(n as f64 * 0.01), false);
            assert_eq!(limiter.reserve("h", at(n as f64 * 0.01), None), Ok(Duration::ZERO));
        }
        assert!(!limiter.state("h").unwrap().enabled);
        limiter.record("h", at(1.0), at(1.0), true);
        assert!(limiter.state("h").unwrap().enabled);
    }

    #[test]
    fn once_throttled_requests_still_go_out_at_the_allowed_rate() {
        // From the smithy-rs test of the same name: after a throttle, a request sent after a
        // random pause (here a seeded one) always gets its turn, and the bucket keeps time.
        let mut cubic = Cubic::starting_at(0.0);
        cubic.record(0.0, true);
        let mut now = 0.0;
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            now += (seed >> 11) as f64 / (1u64 << 53) as f64;
            let wait = cubic.reserve(now, SEND_COST, None).expect("no bound");
            now += wait.as_secs_f64();
            cubic.record(now, false);
        }
        assert!(cubic.enabled);
        close(now, cubic.last_refill.unwrap(), "the bucket's clock");
    }

    #[test]
    fn concurrent_senders_queue_behind_each_other() {
        let mut cubic = Cubic::starting_at(0.0);
        cubic.record(0.0, true); // fill rate at its floor, 0.5 a second
        close(0.5, cubic.fill_rate, "fill rate");
        let waits: Vec<f64> = (0..4).map(|_| cubic.reserve(0.0, SEND_COST, None).unwrap().as_secs_f64()).collect();
        for (n, wait) in waits.iter().enumerate() {
            close(2.0 * (n + 1) as f64, *wait, &format!("sender {n}"));
        }
    }

    #[test]
    fn a_wait_past_the_bound_takes_nothing() {
        let mut cubic = Cubic::starting_at(0.0);
        cubic.record(0.0, true);
        let before = cubic.tokens;
        assert_eq!(cubic.reserve(0.0, 10.0, Some(Duration::from_secs(1))), Err(Duration::from_secs(20)));
        close(before, cubic.tokens, "tokens");
        assert_eq!(
            cubic.reserve(0.0, 1.0, Some(Duration::from_secs(2))),
            Err(Duration::from_secs(2)),
            "no time left to send"
        );
        assert_eq!(cubic.reserve(0.0, 1.0, Some(Duration::from_secs(3))), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn a_clock_that_goes_back_never_adds_tokens_or_panics() {
        let mut cubic = Cubic::starting_at(100.0);
        cubic.record(100.0, true);
        cubic.record(50.0, false);
        let wait = cubic.reserve(40.0, 1.0, None).unwrap();
        assert!(wait > Duration::ZERO, "{wait:?}");
        assert!(cubic.fill_rate >= MIN_FILL_RATE && cubic.fill_rate.is_finite());
    }

    #[test]
    fn throttles_of_requests_sent_before_the_cut_cut_nothing_more() {
        let mut cubic = Cubic::starting_at(0.0);
        for n in 0..200 {
            cubic.record(n as f64 * 0.01, false); // 100 a second for 2 s
        }
        cubic.answer(2.0, 2.0, true);
        let cut = cubic.fill_rate;
        assert!(cut > 50.0, "one cut from about 100 a second: {cut}");
        // 31 more requests sent with the first, throttled too.
        for _ in 0..31 {
            cubic.answer(1.99, 2.0, true);
        }
        close(cut, cubic.fill_rate, "the rate after the other 31 throttles");
        // Sent after the cut, throttled in the cut's half second: the window that ran out.
        cubic.answer(2.1, 2.2, true);
        close(cut, cubic.fill_rate, "the rate after a throttle in the cut's bucket");
        // Sent after the cut and throttled in a later bucket: a second cut.
        cubic.answer(2.3, 2.6, true);
        assert!(cubic.fill_rate < cut, "{} !< {cut}", cubic.fill_rate);
    }

    #[test]
    fn a_throttle_before_the_first_bucket_closed_cuts_from_what_was_sent() {
        let mut cubic = Cubic::starting_at(0.0);
        for n in 0..40 {
            cubic.answer(n as f64 * 0.01, n as f64 * 0.01, false); // 100 a second, 0.4 s
        }
        cubic.answer(0.4, 0.4, true);
        // 41 answers over half a second: 82 a second, cut to 0.7 of it.
        close(0.7 * 82.0, cubic.fill_rate, "the cut");
    }
}
