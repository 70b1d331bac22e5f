//! Injected time: a [`Clock`] to read, a [`Sleeper`] to wait.
//!
//! The retry engine never calls `SystemTime::now` or `tokio::time::sleep` directly. Production
//! code uses [`SystemClock`] and [`TokioSleeper`]; tests use [`ManualClock`] with a
//! [`RecordingSleeper`] that advances it, so a test can assert `delays == [1s, 2s]` without
//! waiting, and deadline logic still sees time pass.
//!
//! Per-attempt I/O timeouts are real timers on real sockets and are not part of this seam:
//! never pause tokio's clock around real sockets, because a paused clock jumps forward whenever
//! the runtime is idle and every I/O timeout then fires at once.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A future returned by a [`Sleeper`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A source of the current wall-clock time.
///
/// Wall-clock time is what HTTP-dates in `Retry-After` are measured against, and what deadlines
/// are counted in.
///
/// # Examples
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use idempotent_retry::{Clock, ManualClock};
///
/// let clock = ManualClock::new(SystemTime::UNIX_EPOCH);
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now(), SystemTime::UNIX_EPOCH + Duration::from_secs(5));
/// ```
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// Something that can wait.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use idempotent_retry::{RecordingSleeper, Sleeper};
///
/// # tokio_test_block_on(async {
/// let sleeper = RecordingSleeper::new();
/// sleeper.sleep(Duration::from_millis(250)).await; // returns at once
/// assert_eq!(sleeper.delays(), vec![Duration::from_millis(250)]);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
pub trait Sleeper: Send + Sync + fmt::Debug {
    /// A future that completes after `duration`.
    fn sleep(&self, duration: Duration) -> Sleep;
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Sleeps with `tokio::time::sleep`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, duration: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// A clock that moves only when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<SystemTime>>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self { now: Arc::new(Mutex::new(start)) }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        *lock(&self.now) += by;
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: SystemTime) {
        *lock(&self.now) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *lock(&self.now)
    }
}

/// A sleeper that records every requested delay and returns at once. Clones share the record.
///
/// Built with [`advancing`](Self::advancing), it also moves a [`ManualClock`] forward by each
/// delay, so deadline checks behave as if the time had really passed.
#[derive(Debug, Clone, Default)]
pub struct RecordingSleeper {
    delays: Arc<Mutex<Vec<Duration>>>,
    clock: Option<ManualClock>,
}

impl RecordingSleeper {
    /// A sleeper that only records.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sleeper that records and advances `clock` by each delay.
    pub fn advancing(clock: &ManualClock) -> Self {
        Self { delays: Arc::default(), clock: Some(clock.clone()) }
    }

    /// Every delay requested so far, in order.
    pub fn delays(&self) -> Vec<Duration> {
        lock(&self.delays).clone()
    }

    /// The sum of the delays requested so far.
    pub fn total(&self) -> Duration {
        lock(&self.delays).iter().sum()
    }
}

impl Sleeper for RecordingSleeper {
    fn sleep(&self, duration: Duration) -> Sleep {
        lock(&self.delays).push(duration);
        if let Some(clock) = &self.clock {
            clock.advance(duration);
        }
        // Yield once so a sleep is still a scheduling point, as a real one would be.
        Box::pin(tokio::task::yield_now())
    }
}

/// A time as RFC 3339 in UTC, to the second: `2026-11-22T00:00:07Z`. Journal records, fixture
/// resources and the CLI print times this way.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// assert_eq!(idempotent_retry::rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_305_607)), "2026-11-22T00:00:07Z");
/// ```
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Locks a mutex, ignoring poisoning: the guarded values are plain data that a panic elsewhere
/// cannot leave half-written.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Public traits stay object safe: the engine stores them as `Arc<dyn _>`.
    fn _object_safe(_: &dyn Clock, _: &dyn Sleeper) {}

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_305_607)), "2026-11-22T00:00:07Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
    }

    #[tokio::test]
    async fn recording_sleeper_advances_the_manual_clock() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH);
        let sleeper = RecordingSleeper::advancing(&clock);
        sleeper.sleep(Duration::from_secs(2)).await;
        sleeper.sleep(Duration::from_millis(500)).await;
        assert_eq!(sleeper.delays(), vec![Duration::from_secs(2), Duration::from_millis(500)]);
        assert_eq!(sleeper.total(), Duration::from_millis(2500));
        assert_eq!(clock.now(), SystemTime::UNIX_EPOCH + Duration::from_millis(2500));
    }
}
