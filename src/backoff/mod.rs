//! How long to wait: delay schedules between attempts, and the server's `Retry-After`.
//!
//! The default is exponential backoff with full jitter: before retry *n* wait a uniformly random
//! time in `[0, min(cap, base · factor^(n-1))]`. Full jitter spreads a burst of clients that
//! failed together, so they do not come back together (see the AWS Architecture Blog,
//! "Exponential Backoff And Jitter"). A server's `Retry-After` is applied on top, as a floor, by
//! the engine; a schedule only says what the client would wait on its own.

use std::fmt;
use std::time::Duration;

#[cfg(feature = "backoff")]
mod compat;
mod retry_after;

#[cfg(feature = "backoff")]
pub use compat::FromBackoff;
pub use retry_after::{parse_retry_after, retry_after};

use crate::time::Random;
use crate::time::rng::uniform;

/// A delay schedule: how long to wait before each retry.
///
/// # Examples
///
/// A fixed one-second schedule that gives up after three retries:
///
/// ```
/// use std::time::Duration;
/// use idempotent_retry::{backoff::{Backoff, backoff_fn}, time::SeededRng};
///
/// let schedule = backoff_fn(|retry, _rng| (retry <= 3).then(|| Duration::from_secs(1)));
/// let rng = SeededRng::new(0);
/// assert_eq!(schedule.delay(1, &rng), Some(Duration::from_secs(1)));
/// assert_eq!(schedule.delay(4, &rng), None);
/// ```
pub trait Backoff: Send + Sync + fmt::Debug {
    /// The delay before retry number `retry` (1 for the first retry, i.e. the second attempt),
    /// or `None` when the schedule has ended and no further retry should be made.
    fn delay(&self, retry: u32, rng: &dyn Random) -> Option<Duration>;
}

/// How much randomness to apply to an exponential delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// No jitter: exactly the exponential ceiling. Deterministic; mostly for tests and demos.
    None,
    /// Full jitter: uniform in `[0, ceiling]`.
    #[default]
    Full,
    /// Equal jitter: half the ceiling, plus a uniform share of the other half, so the wait is
    /// never less than half the ceiling (AWS Architecture Blog, "Exponential Backoff And
    /// Jitter"). For waits that must make time pass, such as rounds of a reconcile.
    Equal,
}

/// Exponential backoff with a cap and (by default) full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExponentialBackoff {
    base: Duration,
    factor: u32,
    cap: Duration,
    jitter: Jitter,
}

impl ExponentialBackoff {
    /// `base` 200 ms, `factor` 2, `cap` 10 s, full jitter: ceilings 0.2, 0.4, 0.8, 1.6, 3.2 s…
    ///
    /// Four retries fit well inside the 60 s deadline of
    /// [`RetryPolicy::standard`](crate::RetryPolicy::standard), with room for server-directed waits.
    pub const STANDARD: Self = Self::new(Duration::from_millis(200), Duration::from_secs(10));

    /// For retries after a throttle: `base` 1 s, `factor` 2, `cap` 20 s, full jitter (the AWS
    /// SDKs' throttling backoff). A server that throttles wants fewer requests, and a retry 200 ms
    /// later is likely throttled again; four retries still fit the standard 60 s deadline.
    pub const THROTTLED: Self = Self::new(Duration::from_secs(1), Duration::from_secs(20));

    /// Backoff starting at `base`, doubling, never above `cap`, with full jitter.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self { base, factor: 2, cap, jitter: Jitter::Full }
    }

    /// Sets the growth factor (default 2). A factor of 1 gives a constant ceiling.
    pub const fn factor(mut self, factor: u32) -> Self {
        self.factor = factor;
        self
    }

    /// Sets the jitter (default [`Jitter::Full`]).
    pub const fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The largest delay this schedule can pick before retry `retry`: `min(cap, base · factor^(retry-1))`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1);
        let growth = u64::from(self.factor).checked_pow(exp).unwrap_or(u64::MAX);
        let nanos = self.base.as_nanos().saturating_mul(u128::from(growth));
        Duration::from_nanos(nanos.min(self.cap.as_nanos()).min(u128::from(u64::MAX)) as u64)
    }
}

impl Default for ExponentialBackoff {
    fn default() -> Self {
        Self::STANDARD
    }
}

impl Backoff for ExponentialBackoff {
    fn delay(&self, retry: u32, rng: &dyn Random) -> Option<Duration> {
        let ceiling = self.ceiling(retry);
        Some(match self.jitter {
            Jitter::None => ceiling,
            Jitter::Full => uniform(rng, ceiling),
            Jitter::Equal => ceiling / 2 + uniform(rng, ceiling - ceiling / 2),
        })
    }
}

/// A [`Backoff`] from a closure `(retry, rng) -> Option<Duration>`.
///
/// A wrapper rather than a blanket impl for closures keeps type inference working at call sites.
pub fn backoff_fn<F>(f: F) -> BackoffFn<F>
where
    F: Fn(u32, &dyn Random) -> Option<Duration> + Send + Sync,
{
    BackoffFn(f)
}

/// See [`backoff_fn`].
#[derive(Clone, Copy)]
pub struct BackoffFn<F>(F);

impl<F> fmt::Debug for BackoffFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackoffFn(..)")
    }
}

impl<F> Backoff for BackoffFn<F>
where
    F: Fn(u32, &dyn Random) -> Option<Duration> + Send + Sync,
{
    fn delay(&self, retry: u32, rng: &dyn Random) -> Option<Duration> {
        (self.0)(retry, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::SeededRng;

    fn _object_safe(_: &dyn Backoff) {}

    #[test]
    fn ceilings_double_then_cap() {
        let b = ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<_> = (1..=6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        // No overflow for absurd retry numbers.
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
        let flat = b.factor(1);
        assert_eq!(flat.ceiling(9), Duration::from_millis(100));
    }

    #[test]
    fn no_jitter_is_exactly_the_ceiling() {
        let b = ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(10)).jitter(Jitter::None);
        let rng = SeededRng::new(3);
        let delays: Vec<_> = (1..=3).map(|n| b.delay(n, &rng).unwrap()).collect();
        assert_eq!(delays, [Duration::from_millis(100), Duration::from_millis(200), Duration::from_millis(400)]);
    }

    #[test]
    fn equal_jitter_is_between_half_and_the_whole_ceiling() {
        let b = ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(30)).jitter(Jitter::Equal);
        let rng = SeededRng::new(5);
        for n in 1..=10 {
            for _ in 0..50 {
                let d = b.delay(n, &rng).unwrap();
                assert!(d >= b.ceiling(n) / 2 && d <= b.ceiling(n), "{n}: {d:?}");
            }
        }
    }

    #[test]
    fn full_jitter_is_within_the_ceiling_and_reproducible() {
        let b = ExponentialBackoff::STANDARD;
        let (r1, r2) = (SeededRng::new(9), SeededRng::new(9));
        for n in 1..=8 {
            let d = b.delay(n, &r1).unwrap();
            assert!(d <= b.ceiling(n));
            assert_eq!(Some(d), b.delay(n, &r2));
        }
    }
}
