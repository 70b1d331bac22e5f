//! Per-request overrides, passed through request extensions.

use crate::budget::RetryPartition;
use crate::error::Error;
use crate::key::IdempotencyKey;
use crate::policy::RetryPolicy;

/// Overrides for one request: a specific key, no key, no retries, or another policy.
///
/// Attach with `reqwest_middleware::RequestBuilder::with_extension`:
///
/// ```
/// # async fn run(client: reqwest_middleware::ClientWithMiddleware) -> Result<(), Box<dyn std::error::Error>> {
/// use idempotent_retry::{IdempotencyKey, RequestOptions, RetryPolicy};
///
/// let key = IdempotencyKey::new("deploy-3f2a9c1")?;
/// client
///     .post("http://127.0.0.1:9/deploy")
///     .body("{}")
///     .with_extension(RequestOptions::new().key(key).policy(RetryPolicy::standard().with_max_attempts(8)))
///     .send()
///     .await?;
/// # Ok(()) }
/// ```
///
/// Contradictory choices (a key and [`no_key`](Self::no_key); a policy and
/// [`no_retry`](Self::no_retry)) are reported as [`Error::InvalidRequest`] when the request is
/// sent, and nothing is sent.
#[derive(Debug, Clone, Default)]
pub struct RequestOptions {
    key: Option<IdempotencyKey>,
    no_key: bool,
    policy: Option<RetryPolicy>,
    no_retry: bool,
    buffer_body: bool,
    deadline: Option<std::time::Duration>,
    partition: Option<RetryPartition>,
}

impl RequestOptions {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends this key (instead of minting one), on any method.
    pub fn key(mut self, key: IdempotencyKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Sends no key, even on a method that normally gets one. A key the caller put on the request
    /// themselves is still left alone: the layer never removes what the caller set.
    pub fn no_key(mut self) -> Self {
        self.no_key = true;
        self
    }

    /// Uses this policy instead of the middleware's.
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Makes one attempt only ([`RetryPolicy::never`]).
    pub fn no_retry(mut self) -> Self {
        self.no_retry = true;
        self
    }

    /// Gives this request at most `deadline` in all, retries and waits included: the policy's
    /// own deadline, if shorter, still holds. For a caller with a time budget of its own (a
    /// reconcile run, an apply) to pass what is left of it down.
    pub fn deadline(mut self, deadline: std::time::Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Draws this request's retries from `partition`'s budget instead of the layer's (see
    /// [`IdempotentRetryBuilder::retry_partition`](crate::IdempotentRetryBuilder::retry_partition)):
    /// for a client that serves several tenants or accounts, so one draining its budget leaves
    /// the others' retries alone.
    pub fn retry_partition(mut self, partition: RetryPartition) -> Self {
        self.partition = Some(partition);
        self
    }

    /// The retry partition these options select, if any.
    pub fn partition(&self) -> Option<&RetryPartition> {
        self.partition.as_ref()
    }

    /// Has the layer read the whole response body into memory within the attempt, up to its
    /// [`max_body`](crate::IdempotentRetryBuilder::max_body) limit.
    ///
    /// The attempt's time limit then covers the body: a server that sends its headers and
    /// stalls, or cuts the body short, fails the attempt (retried as a lost response when the
    /// request is keyed or idempotent) instead of leaving the caller waiting. A body over the
    /// limit fails the request with [`Error::ResponseTooLarge`]. Reading the body afterwards
    /// (`response.bytes()`) is then immediate.
    pub fn buffer_body(mut self) -> Self {
        self.buffer_body = true;
        self
    }

    /// Whether [`buffer_body`](Self::buffer_body) is on.
    pub fn is_buffered(&self) -> bool {
        self.buffer_body
    }

    /// The explicit key, if any.
    pub fn explicit_key(&self) -> Option<&IdempotencyKey> {
        self.key.as_ref()
    }

    /// Whether minting a key is switched off.
    pub fn is_keyless(&self) -> bool {
        self.no_key
    }

    /// Checks the options for contradictions.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] naming the two options that contradict each other.
    pub fn validate(&self) -> Result<(), Error> {
        if self.key.is_some() && self.no_key {
            return Err(Error::InvalidRequest("RequestOptions sets both an explicit key and no_key()".into()));
        }
        if self.policy.is_some() && self.no_retry {
            return Err(Error::InvalidRequest("RequestOptions sets both a policy and no_retry()".into()));
        }
        Ok(())
    }

    /// The policy these options select, given the middleware's default.
    pub(crate) fn policy_or<'a>(&'a self, default: &'a RetryPolicy) -> std::borrow::Cow<'a, RetryPolicy> {
        use std::borrow::Cow;
        let policy = if self.no_retry {
            Cow::Owned(RetryPolicy::never())
        } else {
            self.policy.as_ref().map_or(Cow::Borrowed(default), Cow::Borrowed)
        };
        match self.deadline {
            Some(limit) if policy.deadline().is_none_or(|d| d > limit) => {
                Cow::Owned(policy.into_owned().with_deadline(limit))
            }
            _ => policy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contradictions_are_errors() {
        let k = IdempotencyKey::new("k").unwrap();
        assert!(RequestOptions::new().key(k.clone()).validate().is_ok());
        assert!(RequestOptions::new().key(k).no_key().validate().is_err());
        assert!(RequestOptions::new().policy(RetryPolicy::standard()).no_retry().validate().is_err());
        assert!(RequestOptions::new().no_retry().no_key().validate().is_ok());
    }

    #[test]
    fn a_deadline_clips_the_policys() {
        let std = RetryPolicy::standard();
        let secs = |s| Some(std::time::Duration::from_secs(s));
        let clipped = RequestOptions::new().deadline(std::time::Duration::from_secs(5));
        assert_eq!(clipped.policy_or(&std).deadline(), secs(5));
        let loose = RequestOptions::new().deadline(std::time::Duration::from_secs(500));
        assert_eq!(loose.policy_or(&std).deadline(), secs(60), "the shorter one holds");
        let never = RequestOptions::new().no_retry().deadline(std::time::Duration::from_secs(5));
        assert_eq!(never.policy_or(&std).deadline(), secs(5));
    }

    #[test]
    fn no_retry_means_one_attempt() {
        let std = RetryPolicy::standard();
        assert_eq!(RequestOptions::new().no_retry().policy_or(&std).max_attempts(), 1);
        assert_eq!(RequestOptions::new().policy_or(&std).max_attempts(), 5);
    }
}
