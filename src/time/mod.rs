//! Injected time and randomness: a [`Clock`] to read, a [`Sleeper`] to wait, a [`Random`] for
//! jitter, and their test doubles.
//!
//! The retry engine never calls `SystemTime::now` or `tokio::time::sleep` directly. Production
//! code uses [`SystemClock`] and [`TokioSleeper`]; tests use [`ManualClock`] with a
//! [`RecordingSleeper`] that advances it, so a test can assert `delays == [1s, 2s]` without
//! waiting, and deadline logic still sees time pass.
//!
//! A sleeper does two jobs. [`Sleeper::sleep`] is a wait the engine chooses (a backoff, a
//! `Retry-After`, a poll interval): a recording sleeper returns at once and moves the manual
//! clock. [`Sleeper::timeout`] is a limit on something else (an attempt, a body read): it fires
//! when the clock gets there, and a recording sleeper lets the manual clock decide, so a test
//! (or [`ChaosProxy`](crate::testing::ChaosProxy) in time-travel mode) makes an attempt time
//! out by advancing the clock, without waiting and without racing real timers.
//!
//! Never pause tokio's clock around real sockets instead: a paused clock jumps forward whenever
//! the runtime is idle, and every I/O timeout then fires at once.

// The one module that reads the real clock and waits in real time (see `clippy.toml`).
#![allow(clippy::disallowed_methods)]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) mod rng;

pub use rng::{Random, SeededRng};

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
/// use idempotent_retry::time::{Clock, ManualClock};
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
/// use idempotent_retry::time::{RecordingSleeper, Sleeper};
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
    /// A wait the caller chose: a future that completes after `duration` (a backoff, a
    /// `Retry-After`, a poll interval).
    fn sleep(&self, duration: Duration) -> Sleep;

    /// A limit on something else: a future that completes once `limit` has passed, raced
    /// against an attempt or a body read. A real sleeper sleeps; a test sleeper lets its clock
    /// decide (see [`RecordingSleeper`]), or never fires.
    fn timeout(&self, limit: Duration) -> Sleep;
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

    fn timeout(&self, limit: Duration) -> Sleep {
        self.sleep(limit)
    }
}

/// A clock that moves only when told to. Clones share the same time.
///
/// Futures from [`at`](Self::at) complete when the clock reaches their time, however it gets
/// there: [`advance`](Self::advance), [`set`](Self::set), or a [`RecordingSleeper`] moving it.
#[derive(Clone)]
pub struct ManualClock {
    state: Arc<Mutex<Manual>>,
}

struct Manual {
    now: SystemTime,
    /// Wakers of [`ManualClock::at`] futures still waiting, by future, with their times.
    waiting: std::collections::HashMap<u64, (SystemTime, Waker)>,
    next_id: u64,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("ManualClock").field("now", &state.now).field("waiting", &state.waiting.len()).finish()
    }
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self { state: Arc::new(Mutex::new(Manual { now: start, waiting: Default::default(), next_id: 0 })) }
    }

    /// Moves the clock forward, completing the [`at`](Self::at) futures it passes.
    pub fn advance(&self, by: Duration) {
        let state = lock(&self.state);
        let to = state.now + by;
        Self::move_to(state, to);
    }

    /// Sets the clock to `to`, completing the [`at`](Self::at) futures it reaches.
    pub fn set(&self, to: SystemTime) {
        Self::move_to(lock(&self.state), to);
    }

    fn move_to(mut state: std::sync::MutexGuard<'_, Manual>, to: SystemTime) {
        state.now = to;
        let due: Vec<u64> = state.waiting.iter().filter(|(_, (at, _))| *at <= to).map(|(id, _)| *id).collect();
        let wakers: Vec<Waker> = due.iter().filter_map(|id| state.waiting.remove(id)).map(|(_, w)| w).collect();
        drop(state);
        for waker in wakers {
            waker.wake();
        }
    }

    /// A future that completes when this clock reads `at` or later.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use idempotent_retry::time::ManualClock;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let clock = ManualClock::new(SystemTime::UNIX_EPOCH);
    /// let later = clock.at(SystemTime::UNIX_EPOCH + Duration::from_secs(5));
    /// let mover = clock.clone();
    /// tokio::spawn(async move { mover.advance(Duration::from_secs(5)) });
    /// later.await; // returns once the clock was moved, without waiting five seconds
    /// # });
    /// ```
    pub fn at(&self, at: SystemTime) -> Sleep {
        let id = {
            let mut state = lock(&self.state);
            state.next_id += 1;
            state.next_id
        };
        Box::pin(ClockReaches { clock: self.clone(), at, id })
    }

    /// Futures from [`at`](Self::at) not yet completed (for tests that wait until something is
    /// waiting on the clock before they move it).
    pub fn waiting(&self) -> usize {
        lock(&self.state).waiting.len()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        lock(&self.state).now
    }
}

struct ClockReaches {
    clock: ManualClock,
    at: SystemTime,
    id: u64,
}

impl Future for ClockReaches {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = lock(&self.clock.state);
        if state.now >= self.at {
            return Poll::Ready(());
        }
        match state.waiting.get_mut(&self.id) {
            Some((_, waker)) if waker.will_wake(cx.waker()) => {}
            _ => {
                state.waiting.insert(self.id, (self.at, cx.waker().clone()));
            }
        }
        Poll::Pending
    }
}

impl Drop for ClockReaches {
    fn drop(&mut self) {
        // A future dropped before its time (the attempt finished first) leaves no waker behind.
        lock(&self.clock.state).waiting.remove(&self.id);
    }
}

/// A sleeper that records every requested delay and returns at once. Clones share the record.
///
/// Built with [`advancing`](Self::advancing), it also moves a [`ManualClock`] forward by each
/// delay, so deadline checks behave as if the time had really passed, and its
/// [timeouts](Sleeper::timeout) fire when that clock reaches them: an attempt times out when
/// the test (or a time-travelling [`ChaosProxy`](crate::testing::ChaosProxy)) moves the clock
/// past its limit, never by accident of a slow machine. Built with [`new`](Self::new), it has
/// no clock and its timeouts never fire.
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

    fn timeout(&self, limit: Duration) -> Sleep {
        match &self.clock {
            Some(clock) => match clock.now().checked_add(limit) {
                Some(at) => clock.at(at),
                None => Box::pin(std::future::pending()),
            },
            None => Box::pin(std::future::pending()),
        }
    }
}

/// `future`, unless `limit` passes first on `sleeper`'s clock (`Err(())`). No limit: `future`.
///
/// The limit starts now, before the future first runs (before a request is sent). A future of
/// its own rather than an `async fn`: an `async fn` keeps its argument and its pinned copy side by
/// side in its state, twice the size of `future`, and an attempt's future is large.
pub(crate) fn within<F: Future>(sleeper: &dyn Sleeper, limit: Option<Duration>, future: F) -> Within<F> {
    Within { future, timer: limit.map(|limit| sleeper.timeout(limit)) }
}

pin_project_lite::pin_project! {
    /// See [`within`].
    pub(crate) struct Within<F> {
        #[pin]
        future: F,
        timer: Option<Sleep>,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match this.timer {
            Some(timer) => timer.as_mut().poll(cx).map(Err),
            None => Poll::Pending,
        }
    }
}

/// A time as RFC 3339 in UTC, to the second: `2026-11-22T00:00:07Z`. Journal records, fixture
/// resources and the CLI print times this way.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// assert_eq!(idempotent_retry::time::rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_305_607)), "2026-11-22T00:00:07Z");
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

/// Parses an RFC 3339 time (`2026-11-22T00:00:07Z`, `2026-11-22T01:00:07.250+01:00`), as
/// servers write `created_at`. `None` for anything else.
pub(crate) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.trim().as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        digits.iter().all(u8::is_ascii_digit).then(|| digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &b[19..];
    let mut nanos = 0u32;
    if rest.first() == Some(&b'.') {
        let digits = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        for (i, d) in rest[1..=digits].iter().enumerate().take(9) {
            nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &rest[1 + digits..];
    }
    let offset = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let minutes = i64::from(h1 - b'0') * 600
                + i64::from(h2 - b'0') * 60
                + i64::from(m1 - b'0') * 10
                + i64::from(m2 - b'0');
            if *sign == b'+' { minutes * 60 } else { -minutes * 60 }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// `future`, unless `limit` passes first by the wall clock (`Err(())`): for I/O with a real
/// database (the PostgreSQL journal), whose own timeouts cannot fire when it never answers.
#[cfg(feature = "postgres")]
pub(crate) async fn io_bound<F: Future>(limit: Duration, future: F) -> Result<F::Output, ()> {
    tokio::time::timeout(limit, future).await.map_err(|_| ())
}

/// Blocks this thread for `duration`: for blocking code (the journal's SQLite calls) that waits
/// out a lock. Not for the engine, whose waits go through the injected [`Sleeper`].
#[cfg(feature = "journal")]
pub(crate) fn pause_thread(duration: Duration) {
    std::thread::sleep(duration);
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

    #[test]
    fn rfc3339_round_trips_and_reads_offsets() {
        for secs in [0, 951_782_400, 1_795_305_607, 4_102_444_800] {
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t), "{secs}");
        }
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_305_607);
        assert_eq!(parse_rfc3339("2026-11-22T01:00:07+01:00"), Some(t));
        assert_eq!(parse_rfc3339("2026-11-21T23:30:07-00:30"), Some(t));
        assert_eq!(parse_rfc3339("2026-11-22T00:00:07.250Z"), Some(t + Duration::from_millis(250)));
        for bad in
            ["", "2026-11-22", "2026-13-22T00:00:07Z", "2026-11-22T00:00:07", "yesterday", "2026-11-22T00:00:07+0100"]
        {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn limits_fire_when_the_manual_clock_gets_there() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH);
        let sleeper = RecordingSleeper::advancing(&clock);
        // Done before the limit: the limit's waker is gone with it.
        assert_eq!(within(&sleeper, Some(Duration::from_secs(1)), async { 7 }).await, Ok(7));
        assert_eq!(clock.waiting(), 0);
        // Not done: the limit fires once the clock is moved past it, and not before.
        let mover = clock.clone();
        let moved = tokio::spawn(async move {
            while mover.waiting() == 0 {
                tokio::task::yield_now().await;
            }
            mover.advance(Duration::from_millis(999));
            tokio::task::yield_now().await;
            let early = mover.waiting();
            mover.advance(Duration::from_millis(1));
            early
        });
        assert_eq!(within(&sleeper, Some(Duration::from_secs(1)), std::future::pending::<()>()).await, Err(()));
        assert_eq!(moved.await.unwrap(), 1, "still waiting at 999 ms");
        assert!(sleeper.delays().is_empty(), "limits are not recorded as delays");
        // No limit: the future alone.
        assert_eq!(within(&sleeper, None, async { 1 }).await, Ok(1));
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
