//! Metrics through the `metrics` facade (feature `metrics`); without the feature every call
//! here compiles to nothing. The names and labels are listed in the crate docs.

// Without the feature, the names are only documentation.
#![cfg_attr(not(feature = "metrics"), allow(dead_code))]

use std::time::Duration;

/// Attempts one request through the layer took (histogram; label `method`).
pub(crate) const ATTEMPTS: &str = "idempotent_retry_attempts";
/// Retries, by what failed (counter; label `cause`: `unavailable`, `throttled`, `reset`, …).
pub(crate) const RETRIES: &str = "idempotent_retry_retries_total";
/// How each operation ended (counter; label `outcome`: `created`, `replayed`, `recovered`,
/// `recorded`, `unknown`, `not_applied`).
pub(crate) const OPERATIONS: &str = "idempotent_retry_operations_total";
/// Tokens left in the retry budget (gauge; labels `host`, and `partition` when one is set).
pub(crate) const BUDGET_TOKENS: &str = "idempotent_retry_budget_tokens";
/// Each wait before a retry, in seconds (histogram).
pub(crate) const RETRY_WAIT: &str = "idempotent_retry_retry_wait_seconds";
/// Each wait for a resource to become ready, in seconds, from the create's answer to the end
/// of the wait (histogram; label `outcome`: `ready`, `failed`, `timed_out`).
pub(crate) const RESOURCE_WAIT: &str = "idempotent_retry_resource_wait_seconds";

#[cfg(feature = "metrics")]
mod on {
    use super::*;

    pub(crate) fn attempts(method: &http::Method, attempts: u32) {
        metrics::histogram!(ATTEMPTS, "method" => method.as_str().to_owned()).record(f64::from(attempts));
    }

    pub(crate) fn retry(cause: &'static str, wait: Duration) {
        metrics::counter!(RETRIES, "cause" => cause).increment(1);
        metrics::histogram!(RETRY_WAIT).record(wait.as_secs_f64());
    }

    pub(crate) fn operation(outcome: &'static str) {
        metrics::counter!(OPERATIONS, "outcome" => outcome).increment(1);
    }

    pub(crate) fn budget_tokens(partition: &str, host: &str, tokens: u32) {
        let gauge = if partition.is_empty() {
            metrics::gauge!(BUDGET_TOKENS, "host" => host.to_owned())
        } else {
            metrics::gauge!(BUDGET_TOKENS, "host" => host.to_owned(), "partition" => partition.to_owned())
        };
        gauge.set(f64::from(tokens));
    }

    pub(crate) fn resource_wait(outcome: &'static str, waited: Duration) {
        metrics::histogram!(RESOURCE_WAIT, "outcome" => outcome).record(waited.as_secs_f64());
    }
}

#[cfg(not(feature = "metrics"))]
mod on {
    use super::*;

    pub(crate) fn attempts(_: &http::Method, _: u32) {}
    pub(crate) fn retry(_: &'static str, _: Duration) {}
    pub(crate) fn operation(_: &'static str) {}
    pub(crate) fn budget_tokens(_: &str, _: &str, _: u32) {}
    pub(crate) fn resource_wait(_: &'static str, _: Duration) {}
}

pub(crate) use on::*;
