//! Adapter for the `backoff` crate's schedules (feature `backoff`).
//!
//! The `backoff` crate is unmaintained (RUSTSEC-2025-0012); this adapter exists so a caller with
//! a tuned `backoff::ExponentialBackoff` can keep its numbers while moving off the crate. Its
//! jitter uses the `backoff` crate's own random generator, not the injected one.

use std::fmt;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::time::Random;

/// Uses a `backoff::backoff::Backoff` as this crate's [`Backoff`].
///
/// `backoff` schedules are stateful, so the adapter holds a function that makes a fresh one:
/// each delay is computed from a new schedule, and one adapter serves any number of concurrent
/// operations. `next_backoff` returning `None` ends the retries.
///
/// # Examples
///
/// ```
/// use idempotent_retry::{RetryPolicy, backoff::FromBackoff};
///
/// let legacy = backoff::ExponentialBackoff::default();
/// let policy = RetryPolicy::standard().with_backoff(FromBackoff::new(move || legacy.clone()));
/// # let _ = policy;
/// ```
pub struct FromBackoff<F>(F);

impl<F> FromBackoff<F> {
    /// Wraps a function that makes a fresh schedule.
    pub fn new(make: F) -> Self {
        Self(make)
    }
}

impl<F> fmt::Debug for FromBackoff<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FromBackoff(..)")
    }
}

impl<F, B> Backoff for FromBackoff<F>
where
    F: Fn() -> B + Send + Sync,
    B: backoff::backoff::Backoff,
{
    fn delay(&self, retry: u32, _rng: &dyn Random) -> Option<Duration> {
        let mut schedule = (self.0)();
        // A schedule built as a struct literal starts from its `current_interval`; reset makes
        // it start from `initial_interval`, as a fresh operation should.
        schedule.reset();
        let mut delay = None;
        for _ in 0..retry.max(1) {
            delay = Some(schedule.next_backoff()?);
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::SeededRng;

    #[test]
    fn follows_the_wrapped_schedule_and_its_end() {
        let constant = FromBackoff::new(|| backoff::backoff::Constant::new(Duration::from_millis(300)));
        let rng = SeededRng::new(0);
        assert_eq!(constant.delay(1, &rng), Some(Duration::from_millis(300)));
        assert_eq!(constant.delay(7, &rng), Some(Duration::from_millis(300)));
        let stop = FromBackoff::new(|| backoff::backoff::Stop {});
        assert_eq!(stop.delay(1, &rng), None);
    }

    #[test]
    fn exponential_grows() {
        let exp = backoff::ExponentialBackoff {
            initial_interval: Duration::from_millis(100),
            randomization_factor: 0.0,
            multiplier: 2.0,
            max_elapsed_time: None,
            ..Default::default()
        };
        let adapter = FromBackoff::new(move || exp.clone());
        let rng = SeededRng::new(0);
        assert_eq!(adapter.delay(1, &rng), Some(Duration::from_millis(100)));
        assert_eq!(adapter.delay(3, &rng), Some(Duration::from_millis(400)));
    }
}
