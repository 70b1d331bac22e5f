//! A retry budget: a token bucket per host that caps how much retrying can amplify load.
//!
//! # Why a budget, and not only a maximum number of attempts
//!
//! A per-request limit of *n* attempts bounds one request, not the system. When a server is
//! down, every request makes all *n* attempts and the client multiplies its own load by *n*
//! exactly when the server can least take it; thousands of clients doing the same keep it down.
//! A budget bounds retries *across* requests: retries draw tokens from a shared bucket, successes
//! put tokens back. While things are healthy the bucket stays full and every transient failure is
//! retried; in a sustained outage it drains after a bounded number of retries
//! (`capacity / cost`), and from then on only first attempts go out, so the load the client adds
//! is at most its normal load plus that bounded surplus.
//!
//! The numbers follow the AWS SDKs' standard retry mode: capacity 500, a retry costs 5, a retry
//! after a timeout costs 10 (timeouts hold resources on both ends), a success that needed retries
//! returns what its retry cost, and a success on the first attempt adds 1.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::time::lock;

/// A per-host token bucket shared by every request that goes through one middleware (or several,
/// if they share the `Arc`).
///
/// # Examples
///
/// ```
/// use idempotent_retry::budget::{RetryBudget, RetryCost};
///
/// let budget = RetryBudget::new().capacity(10).retry_cost(5);
/// assert!(budget.try_acquire("api.example.com:443", RetryCost::Retry).is_some());
/// assert!(budget.try_acquire("api.example.com:443", RetryCost::Retry).is_some());
/// assert!(budget.try_acquire("api.example.com:443", RetryCost::Retry).is_none()); // drained
/// assert!(budget.try_acquire("other.example.com:443", RetryCost::Retry).is_some()); // per host
/// ```
#[derive(Debug)]
pub struct RetryBudget {
    capacity: u32,
    retry_cost: u32,
    timeout_cost: u32,
    success_refill: u32,
    tokens: Mutex<HashMap<String, u32>>,
}

/// What a retry costs: a timeout holds resources on both ends, so a retry after one costs more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryCost {
    /// A retry after any other failure ([`RetryBudget::DEFAULT_RETRY_COST`] tokens).
    Retry,
    /// A retry after a timeout ([`RetryBudget::DEFAULT_TIMEOUT_COST`] tokens).
    AfterTimeout,
}

/// Tokens taken for one retry, to be handed back by [`RetryBudget::on_success`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Withdrawal(u32);

impl RetryBudget {
    /// Tokens in a full bucket (AWS: 500).
    pub const DEFAULT_CAPACITY: u32 = 500;
    /// Tokens a retry costs (AWS: 5).
    pub const DEFAULT_RETRY_COST: u32 = 5;
    /// Tokens a retry after a timeout costs (AWS: 10).
    pub const DEFAULT_TIMEOUT_COST: u32 = 10;
    /// Tokens a first-attempt success puts back (AWS: 1).
    pub const DEFAULT_SUCCESS_REFILL: u32 = 1;

    /// A budget with the AWS defaults.
    pub fn new() -> Self {
        Self {
            capacity: Self::DEFAULT_CAPACITY,
            retry_cost: Self::DEFAULT_RETRY_COST,
            timeout_cost: Self::DEFAULT_TIMEOUT_COST,
            success_refill: Self::DEFAULT_SUCCESS_REFILL,
            tokens: Mutex::default(),
        }
    }

    /// Sets the bucket size (default 500).
    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets the cost of a retry (default 5).
    pub fn retry_cost(mut self, cost: u32) -> Self {
        self.retry_cost = cost;
        self
    }

    /// Sets the cost of a retry after a timeout (default 10).
    pub fn timeout_cost(mut self, cost: u32) -> Self {
        self.timeout_cost = cost;
        self
    }

    /// Sets what a first-attempt success puts back (default 1).
    pub fn success_refill(mut self, tokens: u32) -> Self {
        self.success_refill = tokens;
        self
    }

    /// Takes the tokens for one retry to `host`, or returns `None` when the bucket cannot pay.
    pub fn try_acquire(&self, host: &str, cost: RetryCost) -> Option<Withdrawal> {
        let cost = match cost {
            RetryCost::Retry => self.retry_cost,
            RetryCost::AfterTimeout => self.timeout_cost,
        };
        let mut tokens = lock(&self.tokens);
        let available = match tokens.get_mut(host) {
            Some(available) => available,
            None => tokens.entry(host.to_owned()).or_insert(self.capacity),
        };
        if *available < cost {
            return None;
        }
        *available -= cost;
        crate::telemetry::budget_tokens(host, *available);
        Some(Withdrawal(cost))
    }

    /// Records a success: hands back the last retry's tokens, or adds the first-attempt refill.
    pub fn on_success(&self, host: &str, last_retry: Option<Withdrawal>) {
        let refill = last_retry.map_or(self.success_refill, |w| w.0);
        let mut tokens = lock(&self.tokens);
        // A host without an entry has a full bucket: nothing to refill, nothing to record.
        if last_retry.is_none() && !tokens.contains_key(host) {
            return;
        }
        let available = tokens.entry(host.to_owned()).or_insert(self.capacity);
        *available = available.saturating_add(refill).min(self.capacity);
        crate::telemetry::budget_tokens(host, *available);
    }

    /// Tokens currently available for `host`.
    pub fn available(&self, host: &str) -> u32 {
        lock(&self.tokens).get(host).copied().unwrap_or(self.capacity)
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_after_capacity_over_cost_retries() {
        let b = RetryBudget::new();
        let granted = (0..1000).filter_map(|_| b.try_acquire("h", RetryCost::Retry)).count();
        assert_eq!(granted, 100);
        assert_eq!(b.available("h"), 0);
    }

    #[test]
    fn timeouts_cost_double() {
        let b = RetryBudget::new();
        let granted = (0..1000).filter_map(|_| b.try_acquire("h", RetryCost::AfterTimeout)).count();
        assert_eq!(granted, 50);
    }

    #[test]
    fn successes_refill_up_to_capacity() {
        let b = RetryBudget::new().capacity(20);
        let w = b.try_acquire("h", RetryCost::Retry).unwrap();
        assert_eq!(b.available("h"), 15);
        b.on_success("h", Some(w));
        assert_eq!(b.available("h"), 20);
        b.on_success("h", None);
        assert_eq!(b.available("h"), 20, "never above capacity");
        b.try_acquire("h", RetryCost::AfterTimeout).unwrap();
        b.on_success("h", None);
        assert_eq!(b.available("h"), 11);
    }
}
