//! A retry budget: a token bucket per partition and host that caps how much retrying can amplify
//! load.
//!
//! # Why a budget, and not only a maximum number of attempts
//!
//! A per-request limit of *n* attempts bounds one request, not the system. When a server is
//! down, every request makes all *n* attempts and the client multiplies its own load by *n*
//! exactly when the server can least take it; thousands of clients doing the same keep it down.
//! A budget bounds retries *across* requests: retries draw tokens from a shared bucket,
//! successes (and time, if asked) put tokens back. While things are healthy the bucket stays full
//! and every transient failure is retried; in a sustained outage it drains after a bounded number
//! of retries (`capacity / cost`), and from then on only first attempts go out, so the load the
//! client adds is at most its normal load plus that bounded surplus.
//!
//! # The numbers: AWS retry behaviour 2.1, and where ours differs
//!
//! | | AWS 2.1 (smithy-rs `token_bucket.rs`) | here |
//! |---|---|---|
//! | capacity | 500 | 500 |
//! | a retry after a transient failure (5xx, reset) | 14 | **5** (AWS 2.0's) |
//! | a retry after a timeout | 14 | **10** (AWS 2.0's) |
//! | a retry after a throttle (429, `Throttling` codes) | 5 | **2** (AWS 2.1's ratio to a transient retry) |
//! | a success that needed retries | returns its last retry's cost | the same |
//! | a first-attempt success | +1 | +1 |
//! | refill with time | off unless `refill_rate` is set | the same ([`refill_rate`](RetryBudget::refill_rate)) |
//! | partitioned by | the retry partition (service and region) | [`RetryPartition`] *and* host |
//!
//! Throttled retries are cheap because a throttle is the server's own, deliberate answer: it
//! costs the server little, and the caller waits longer before it (the throttled backoff, 1 s
//! base, [`RetryPolicy::with_throttle_backoff`](crate::RetryPolicy::with_throttle_backoff)).
//! Failures that cost the server work (resets, 5xx, timeouts) drain the bucket 2.5 times as fast,
//! about AWS 2.1's ratio (14 / 5).
//!
//! The transient cost stays AWS 2.0's 5, not 2.1's 14. AWS raised it with its 50 ms backoff, to
//! stop storms of quick retries; ours start at 200 ms, and what we retry is a keyed write whose
//! failure fails a whole apply. Measured with 14: `cargo run --example chaos -- --seed 42`
//! (200 creates, 40% of them faulted) succeeded 194 instead of 198, and the figures bench's
//! reconcile of 1,000 replicas at a 30% fault rate stopped with the budget exhausted instead of
//! converging. A sustained outage still drains the bucket after 100 retries, and the outage
//! bound (≤ 1.05 requests per operation) holds either way.
//!
//! Time refill is off by default, as in the AWS SDKs, because it is what keeps the outage bound
//! whatever the request rate: with it on, a sustained outage pays for `rate / 14` retries a
//! second on top of the first attempts, which is nothing for a busy client and a 7% surplus for
//! one sending a request a second at 1 token/s. Turn it on (`refill_rate(1.0)`) for a
//! long-lived process whose only traffic to a host is rare writes: without it, a bucket an outage
//! drained fills again only as first attempts succeed (one token each).
//!
//! Time is the engine's injected [`Clock`](crate::time::Clock), so tests drive the refill
//! exactly; a clock that steps backwards adds nothing.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::time::lock;

/// A per-partition, per-host token bucket shared by every request that goes through one
/// middleware (or several, if they share the `Arc`).
///
/// # Examples
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use idempotent_retry::budget::{RetryBudget, RetryCost, RetryPartition};
///
/// let budget = RetryBudget::new().capacity(10);
/// let (any, host, now) = (&RetryPartition::HOST, "api.example.com:443", SystemTime::UNIX_EPOCH);
/// assert!(budget.try_acquire(any, host, RetryCost::Retry, now).is_some());
/// assert!(budget.try_acquire(any, host, RetryCost::Retry, now).is_some());
/// assert!(budget.try_acquire(any, host, RetryCost::Retry, now).is_none()); // drained
/// assert!(budget.try_acquire(any, "other.example.com:443", RetryCost::Retry, now).is_some()); // per host
/// let tenant = RetryPartition::new("tenant-b").unwrap();
/// assert!(budget.try_acquire(&tenant, host, RetryCost::Retry, now).is_some()); // per partition
/// ```
pub struct RetryBudget {
    capacity: u32,
    retry_cost: u32,
    timeout_cost: u32,
    throttle_cost: u32,
    success_refill: u32,
    /// Millionths of a token per second.
    refill_rate: u64,
    /// Buckets by partition name, then by host: looked up with two `&str`s, no key built.
    buckets: Mutex<HashMap<Cow<'static, str>, HashMap<String, Bucket>>>,
}

/// One bucket, in millionths of a token (time refills by fractions, and fixed point keeps every
/// count exact), and when it was last refilled.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    micros: u64,
    refilled: SystemTime,
}

/// Millionths of a token in a token.
const MICROS: u64 = 1_000_000;

impl Bucket {
    /// Adds what the time since the last refill pays for at `rate` (millionths of a token per
    /// second), up to `capacity` (millionths).
    fn refill(&mut self, now: SystemTime, rate: u64, capacity: u64) {
        // A clock that stepped back adds nothing, and keeps the later instant as the mark.
        if let Ok(elapsed) = now.duration_since(self.refilled) {
            let added = elapsed.as_nanos().saturating_mul(u128::from(rate)) / 1_000_000_000;
            self.micros = u64::try_from(added).unwrap_or(u64::MAX).saturating_add(self.micros).min(capacity);
            self.refilled = now;
        }
    }

    fn whole(&self) -> u32 {
        u32::try_from(self.micros / MICROS).unwrap_or(u32::MAX)
    }
}

/// What a retry costs: a throttle is the server's cheap, deliberate answer, so a retry after
/// one costs less than a retry after a failure that cost the server work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryCost {
    /// A retry after any other transient failure: a 5xx, a reset
    /// ([`RetryBudget::DEFAULT_RETRY_COST`] tokens).
    Retry,
    /// A retry after a timeout ([`RetryBudget::DEFAULT_TIMEOUT_COST`] tokens).
    AfterTimeout,
    /// A retry after a throttle: a 429, or a 503 with a throttling code
    /// ([`RetryBudget::DEFAULT_THROTTLE_COST`] tokens).
    Throttled,
}

/// Tokens taken for one retry, to be handed back by [`RetryBudget::on_success`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Withdrawal(u32);

impl Withdrawal {
    /// The tokens taken.
    pub fn tokens(self) -> u32 {
        self.0
    }
}

/// Which set of buckets a request draws from, besides its host: the caller's choice, so that
/// one workload (a tenant, an account, a batch job) draining its budget leaves the others'
/// alone, as the AWS SDKs' `RetryPartition`.
///
/// [`RetryPartition::HOST`], the default, partitions by host alone.
///
/// ```
/// use idempotent_retry::budget::RetryPartition;
///
/// let tenant = RetryPartition::new("tenant-a")?;
/// assert_eq!(tenant.name(), "tenant-a");
/// assert!(RetryPartition::new("").is_err());
/// assert!(RetryPartition::new("a\nb").is_err());
/// # Ok::<(), idempotent_retry::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RetryPartition(Cow<'static, str>);

impl RetryPartition {
    /// The default: one bucket per host, shared by every request to it.
    pub const HOST: RetryPartition = RetryPartition(Cow::Borrowed(""));

    /// The longest name accepted.
    pub const MAX_LEN: usize = 128;

    /// A partition of its own. The name is a label (it appears in metrics): 1 to 128 visible
    /// ASCII characters, or [`Error::InvalidRequest`](crate::Error::InvalidRequest).
    pub fn new(name: impl Into<String>) -> Result<Self, crate::Error> {
        let name = name.into();
        if name.is_empty() || name.len() > Self::MAX_LEN || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(crate::Error::InvalidRequest(format!(
                "a retry partition's name is 1 to {} visible ASCII characters, not {:?}",
                Self::MAX_LEN,
                name.chars().take(Self::MAX_LEN + 1).collect::<String>()
            )));
        }
        Ok(Self(Cow::Owned(name)))
    }

    /// The name; empty for [`RetryPartition::HOST`].
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Default for RetryPartition {
    fn default() -> Self {
        Self::HOST
    }
}

impl fmt::Debug for RetryPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() { f.write_str("RetryPartition::HOST") } else { write!(f, "RetryPartition({:?})", self.0) }
    }
}

impl RetryBudget {
    /// Tokens in a full bucket (AWS: 500).
    pub const DEFAULT_CAPACITY: u32 = 500;
    /// Tokens a retry after a transient failure costs (AWS 2.0: 5; 2.1: 14; see the module
    /// docs).
    pub const DEFAULT_RETRY_COST: u32 = 5;
    /// Tokens a retry after a timeout costs (AWS 2.0: 10; 2.1: 14).
    pub const DEFAULT_TIMEOUT_COST: u32 = 10;
    /// Tokens a retry after a throttle costs (AWS 2.1: 5, against 14 for a transient one; here
    /// the same ratio to 5).
    pub const DEFAULT_THROTTLE_COST: u32 = 2;
    /// Tokens a first-attempt success puts back (AWS: 1).
    pub const DEFAULT_SUCCESS_REFILL: u32 = 1;
    /// Tokens time puts back, per second (AWS: 0, off; see the module docs).
    pub const DEFAULT_REFILL_RATE: f64 = 0.0;

    /// A budget with the defaults above.
    pub fn new() -> Self {
        Self {
            capacity: Self::DEFAULT_CAPACITY,
            retry_cost: Self::DEFAULT_RETRY_COST,
            timeout_cost: Self::DEFAULT_TIMEOUT_COST,
            throttle_cost: Self::DEFAULT_THROTTLE_COST,
            success_refill: Self::DEFAULT_SUCCESS_REFILL,
            refill_rate: (Self::DEFAULT_REFILL_RATE * MICROS as f64) as u64,
            buckets: Mutex::default(),
        }
    }

    /// AWS retry behaviour 2.1's numbers exactly: 14 a transient or timed-out retry, 5 a
    /// throttled one, no time refill.
    ///
    /// ```
    /// use idempotent_retry::budget::{RetryBudget, RetryCost};
    ///
    /// let aws = RetryBudget::aws_retry_2_1();
    /// assert_eq!((aws.cost(RetryCost::Retry), aws.cost(RetryCost::Throttled)), (14, 5));
    /// ```
    pub fn aws_retry_2_1() -> Self {
        Self::new().retry_cost(14).timeout_cost(14).throttle_cost(5)
    }

    /// Sets the bucket size (default 500).
    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets the cost of a retry after a transient failure (default 5).
    pub fn retry_cost(mut self, cost: u32) -> Self {
        self.retry_cost = cost;
        self
    }

    /// Sets the cost of a retry after a timeout (default 10).
    pub fn timeout_cost(mut self, cost: u32) -> Self {
        self.timeout_cost = cost;
        self
    }

    /// Sets the cost of a retry after a throttle (default 2).
    pub fn throttle_cost(mut self, cost: u32) -> Self {
        self.throttle_cost = cost;
        self
    }

    /// Sets what a first-attempt success puts back (default 1).
    pub fn success_refill(mut self, tokens: u32) -> Self {
        self.success_refill = tokens;
        self
    }

    /// Sets how many tokens time puts back per second (default 0: off, as in the AWS SDKs), to a
    /// millionth of a token. A negative or non-finite rate counts as zero.
    pub fn refill_rate(mut self, tokens_per_second: f64) -> Self {
        let rate = if tokens_per_second.is_finite() { tokens_per_second.max(0.0) } else { 0.0 };
        // `as` saturates: an absurd rate is a bucket that is always full.
        self.refill_rate = (rate * MICROS as f64).round() as u64;
        self
    }

    /// The tokens one retry of this kind costs.
    pub fn cost(&self, cost: RetryCost) -> u32 {
        match cost {
            RetryCost::Retry => self.retry_cost,
            RetryCost::AfterTimeout => self.timeout_cost,
            RetryCost::Throttled => self.throttle_cost,
        }
    }

    /// Takes the tokens for one retry to `host` in `partition` at `now` (after refilling what the
    /// time since the last call pays for), or returns `None` when the bucket cannot pay.
    pub fn try_acquire(
        &self,
        partition: &RetryPartition,
        host: &str,
        cost: RetryCost,
        now: SystemTime,
    ) -> Option<Withdrawal> {
        let cost = self.cost(cost);
        let mut buckets = lock(&self.buckets);
        let bucket = self.bucket(&mut buckets, partition, host, now);
        bucket.refill(now, self.refill_rate, self.full());
        let price = u64::from(cost) * MICROS;
        if bucket.micros < price {
            return None;
        }
        bucket.micros -= price;
        crate::telemetry::budget_tokens(partition.name(), host, bucket.whole());
        Some(Withdrawal(cost))
    }

    /// Records a success: hands back the last retry's tokens, or adds the first-attempt refill,
    /// and what the time since the last call pays for.
    pub fn on_success(&self, partition: &RetryPartition, host: &str, last_retry: Option<Withdrawal>, now: SystemTime) {
        let refill = last_retry.map_or(self.success_refill, |w| w.0);
        let mut buckets = lock(&self.buckets);
        // A host without a bucket has a full one: nothing to refill, nothing to record. (The
        // common case, a first-attempt success to a healthy host, ends here.)
        if last_retry.is_none() && buckets.get(partition.name()).is_none_or(|hosts| !hosts.contains_key(host)) {
            return;
        }
        let bucket = self.bucket(&mut buckets, partition, host, now);
        bucket.refill(now, self.refill_rate, self.full());
        bucket.micros = (bucket.micros + u64::from(refill) * MICROS).min(self.full());
        crate::telemetry::budget_tokens(partition.name(), host, bucket.whole());
    }

    /// Whole tokens available for `host` in `partition` at `now`, the time refill included.
    pub fn available(&self, partition: &RetryPartition, host: &str, now: SystemTime) -> u32 {
        let buckets = lock(&self.buckets);
        match buckets.get(partition.name()).and_then(|hosts| hosts.get(host)) {
            Some(bucket) => {
                let mut bucket = *bucket;
                bucket.refill(now, self.refill_rate, self.full());
                bucket.whole()
            }
            None => self.capacity,
        }
    }

    /// A full bucket, in millionths.
    fn full(&self) -> u64 {
        u64::from(self.capacity) * MICROS
    }

    /// The bucket for `host` in `partition`, made full when it is new.
    fn bucket<'m>(
        &self,
        buckets: &'m mut HashMap<Cow<'static, str>, HashMap<String, Bucket>>,
        partition: &RetryPartition,
        host: &str,
        now: SystemTime,
    ) -> &'m mut Bucket {
        if !buckets.contains_key(partition.name()) {
            buckets.insert(partition.0.clone(), HashMap::new());
        }
        let hosts = buckets.get_mut(partition.name()).expect("inserted above");
        if !hosts.contains_key(host) {
            hosts.insert(host.to_owned(), Bucket { micros: self.full(), refilled: now });
        }
        hosts.get_mut(host).expect("inserted above")
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("capacity", &self.capacity)
            .field("retry_cost", &self.retry_cost)
            .field("timeout_cost", &self.timeout_cost)
            .field("throttle_cost", &self.throttle_cost)
            .field("success_refill", &self.success_refill)
            .field("refill_rate", &(self.refill_rate as f64 / MICROS as f64))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const H: &RetryPartition = &RetryPartition::HOST;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_millis(ms)
    }

    fn still() -> RetryBudget {
        RetryBudget::new()
    }

    #[test]
    fn drains_after_capacity_over_cost_retries() {
        let b = still();
        let granted = (0..1000).filter_map(|_| b.try_acquire(H, "h", RetryCost::Retry, at(0))).count();
        assert_eq!(granted, 100, "500 / 5");
        assert_eq!(b.available(H, "h", at(0)), 0);
    }

    #[test]
    fn throttled_retries_cost_two_and_timeouts_ten() {
        let b = still();
        let granted = (0..1000).filter_map(|_| b.try_acquire(H, "h", RetryCost::Throttled, at(0))).count();
        assert_eq!(granted, 250);
        assert_eq!(b.available(H, "h", at(0)), 0);
        let b = still();
        let granted = (0..1000).filter_map(|_| b.try_acquire(H, "h", RetryCost::AfterTimeout, at(0))).count();
        assert_eq!(granted, 50);
    }

    #[test]
    fn successes_refill_up_to_capacity() {
        let b = still().capacity(40);
        let w = b.try_acquire(H, "h", RetryCost::Retry, at(0)).unwrap();
        assert_eq!(w.tokens(), 5);
        assert_eq!(b.available(H, "h", at(0)), 35);
        b.on_success(H, "h", Some(w), at(0));
        assert_eq!(b.available(H, "h", at(0)), 40);
        b.on_success(H, "h", None, at(0));
        assert_eq!(b.available(H, "h", at(0)), 40, "never above capacity");
        b.try_acquire(H, "h", RetryCost::Throttled, at(0)).unwrap();
        b.on_success(H, "h", None, at(0));
        assert_eq!(b.available(H, "h", at(0)), 39, "40 − 2 + 1");
    }

    /// A scripted sequence on injected time, token by token: an outage drains the bucket, time
    /// pays for one retry every 14 s, throttles are cheaper, a recovered success returns its cost.
    #[test]
    fn time_refills_the_bucket_exactly() {
        let b = RetryBudget::aws_retry_2_1().capacity(30).refill_rate(1.0);
        let take = |cost, ms| b.try_acquire(H, "h", cost, at(ms));
        assert!(take(RetryCost::Retry, 0).is_some()); // 16
        assert!(take(RetryCost::Retry, 0).is_some()); // 2
        assert!(take(RetryCost::Retry, 0).is_none(), "2 tokens cannot pay 14");
        assert_eq!(b.available(H, "h", at(0)), 2);
        // 2.5 s later: 4.5 tokens, a throttled retry (5) still cannot be paid...
        assert!(take(RetryCost::Throttled, 2_500).is_none());
        assert_eq!(b.available(H, "h", at(2_500)), 4);
        // ...half a second later it can: 5.0 − 5 = 0.
        assert!(take(RetryCost::Throttled, 3_000).is_some());
        assert_eq!(b.available(H, "h", at(3_000)), 0);
        // 14 s of nothing pays for exactly one transient retry.
        assert_eq!(b.available(H, "h", at(16_999)), 13, "13.999 tokens");
        let w = take(RetryCost::Retry, 17_000).expect("14 tokens");
        assert_eq!(b.available(H, "h", at(17_000)), 0);
        // Its success hands the 14 back; a first-attempt success adds 1; time adds the rest, up to
        // the capacity.
        b.on_success(H, "h", Some(w), at(17_000));
        assert_eq!(b.available(H, "h", at(17_000)), 14);
        b.on_success(H, "h", None, at(18_000));
        assert_eq!(b.available(H, "h", at(18_000)), 16, "14 + 1 s of time + 1");
        assert_eq!(b.available(H, "h", at(60_000)), 30, "capped");
    }

    #[test]
    fn a_clock_that_steps_back_adds_nothing() {
        let b = RetryBudget::aws_retry_2_1().capacity(14).refill_rate(1.0);
        assert!(b.try_acquire(H, "h", RetryCost::Retry, at(10_000)).is_some());
        assert_eq!(b.available(H, "h", at(0)), 0, "earlier than the last refill");
        assert!(b.try_acquire(H, "h", RetryCost::Throttled, at(0)).is_none());
        // Time counts again from the later mark, not from the step back.
        assert_eq!(b.available(H, "h", at(15_000)), 5);
    }

    #[test]
    fn partitions_and_hosts_have_their_own_buckets() {
        let b = RetryBudget::aws_retry_2_1().capacity(14);
        let a = RetryPartition::new("tenant-a").unwrap();
        assert!(b.try_acquire(&a, "h", RetryCost::Retry, at(0)).is_some());
        assert!(b.try_acquire(&a, "h", RetryCost::Retry, at(0)).is_none());
        assert!(b.try_acquire(&a, "other", RetryCost::Retry, at(0)).is_some(), "same partition, other host");
        assert!(b.try_acquire(H, "h", RetryCost::Retry, at(0)).is_some(), "same host, default partition");
        let again = RetryPartition::new("tenant-a").unwrap();
        assert_eq!(b.available(&again, "h", at(0)), 0, "a partition is its name");
    }

    #[test]
    fn odd_refill_rates_count_as_zero() {
        for rate in [f64::NAN, f64::INFINITY, -3.0] {
            let b = RetryBudget::aws_retry_2_1().capacity(14).refill_rate(rate);
            b.try_acquire(H, "h", RetryCost::Retry, at(0)).unwrap();
            assert_eq!(b.available(H, "h", at(3_600_000)), 0, "{rate}");
        }
    }

    #[test]
    fn partition_names_are_labels() {
        assert!(RetryPartition::new("x".repeat(128)).is_ok());
        assert!(RetryPartition::new("x".repeat(129)).is_err());
        assert!(RetryPartition::new("a b").is_err());
        assert_eq!(format!("{:?}", RetryPartition::HOST), "RetryPartition::HOST");
    }
}
