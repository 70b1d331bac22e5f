//! Retry policy: how many attempts, how long in total, how long each, and how long between.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::{Backoff, ExponentialBackoff};

/// How persistently to retry.
///
/// Start from a named preset and adjust:
///
/// ```
/// use std::time::Duration;
/// use idempotent_retry::RetryPolicy;
/// use idempotent_retry::backoff::ExponentialBackoff;
///
/// let policy = RetryPolicy::standard()
///     .with_max_attempts(8)
///     .with_deadline(Duration::from_secs(120))
///     .with_backoff(ExponentialBackoff::new(Duration::from_millis(500), Duration::from_secs(20)));
/// assert_eq!(policy.max_attempts(), 8);
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    deadline: Option<Duration>,
    attempt_timeout: Option<Duration>,
    max_retry_after: Duration,
    backoff: Arc<dyn Backoff>,
    throttle_backoff: Arc<dyn Backoff>,
}

impl RetryPolicy {
    /// The default policy:
    ///
    /// | setting | value | why |
    /// |---|---|---|
    /// | `max_attempts` | 5 | one first attempt and four retries, as go-retryablehttp; enough to ride out a proxy restart |
    /// | `deadline` | 60 s | total time for the operation, sleeps included |
    /// | `attempt_timeout` | 10 s | per attempt, further clipped to what remains of the deadline |
    /// | `max_retry_after` | 30 s | a server's `Retry-After` is honoured up to this, never hours |
    /// | `backoff` | [`ExponentialBackoff::STANDARD`] | 200 ms doubling to 10 s, full jitter |
    /// | `throttle_backoff` | [`ExponentialBackoff::THROTTLED`] | after a throttle: 1 s doubling to 20 s, full jitter (AWS) |
    ///
    /// AWS retry behaviour 2.1 starts transient retries at 50 ms; ours start at 200 ms, because
    /// the writes we retry go through proxies and load balancers whose restarts take longer than
    /// a dropped packet does, and a create retried too soon meets the first still in flight.
    pub fn standard() -> Self {
        Self {
            max_attempts: 5,
            deadline: Some(Duration::from_secs(60)),
            attempt_timeout: Some(Duration::from_secs(10)),
            max_retry_after: Duration::from_secs(30),
            backoff: Arc::new(ExponentialBackoff::STANDARD),
            throttle_backoff: Arc::new(ExponentialBackoff::THROTTLED),
        }
    }

    /// One attempt, no retries, no deadline or attempt timeout beyond the client's own.
    ///
    /// Keys are still minted and sent, so a retry by the caller, with the same key, is safe.
    pub fn never() -> Self {
        Self { max_attempts: 1, deadline: None, attempt_timeout: None, ..Self::standard() }
    }

    /// Sets the maximum number of attempts, the first included. Values below 1 count as 1: the
    /// request is always sent once.
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Sets the total time budget for the operation, sleeps included.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Removes the total deadline: only `max_attempts` bounds the operation.
    pub fn without_deadline(mut self) -> Self {
        self.deadline = None;
        self
    }

    /// Sets the timeout of one attempt (until the response headers arrive). It is clipped to
    /// what remains of the deadline.
    ///
    /// When this timer fires the engine cannot tell how far the exchange got, so it counts the
    /// attempt as [may have been applied](crate::classify::Delivery::MaybeApplied): retried with a key, an
    /// unknown outcome without one. Set `connect_timeout` on the `reqwest::Client` as well; a
    /// connect that times out there is reported as [not sent](crate::classify::Delivery::NotSent) and is
    /// always safe to retry.
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Removes the per-attempt timeout (the deadline, if any, still clips each attempt).
    pub fn without_attempt_timeout(mut self) -> Self {
        self.attempt_timeout = None;
        self
    }

    /// Sets the most the engine will wait because a server said `Retry-After`.
    pub fn with_max_retry_after(mut self, cap: Duration) -> Self {
        self.max_retry_after = cap;
        self
    }

    /// Sets the delay schedule of every retry, throttled ones included; follow with
    /// [`with_throttle_backoff`](Self::with_throttle_backoff) to give throttled retries their
    /// own again.
    pub fn with_backoff(mut self, backoff: impl Backoff + 'static) -> Self {
        self.backoff = Arc::new(backoff);
        self.throttle_backoff = self.backoff.clone();
        self
    }

    /// Sets the delay schedule of retries after a throttle (a 429, a throttling code), apart from
    /// the one after other failures, as the AWS SDKs do. A server's `Retry-After` is still the
    /// floor of either. With the [adaptive rate limiter](crate::IdempotentRetryBuilder::adaptive)
    /// on, the limiter paces throttled retries instead, over the transient schedule.
    pub fn with_throttle_backoff(mut self, backoff: impl Backoff + 'static) -> Self {
        self.throttle_backoff = Arc::new(backoff);
        self
    }

    /// The maximum number of attempts.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The total deadline, if any.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The per-attempt timeout, if any.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.attempt_timeout
    }

    /// The cap on server-directed waits.
    pub fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    /// The delay schedule of retries after failures other than throttles.
    pub fn backoff(&self) -> &dyn Backoff {
        &*self.backoff
    }

    /// The delay schedule of retries after a throttle.
    pub fn throttle_backoff(&self) -> &dyn Backoff {
        &*self.throttle_backoff
    }

    /// Refuses a policy under which nothing could be sent: a zero deadline or attempt timeout.
    pub(crate) fn check(&self) -> Result<(), String> {
        let zero = |what: &str| Err(format!("the {what} is zero, so no attempt could be made in it"));
        if self.deadline == Some(Duration::ZERO) {
            return zero("deadline");
        }
        if self.attempt_timeout == Some(Duration::ZERO) {
            return zero("attempt timeout");
        }
        Ok(())
    }
}

impl Default for RetryPolicy {
    /// [`RetryPolicy::standard`].
    fn default() -> Self {
        Self::standard()
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("deadline", &self.deadline)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("max_retry_after", &self.max_retry_after)
            .field("backoff", &self.backoff)
            .field("throttle_backoff", &self.throttle_backoff)
            .finish()
    }
}
