//! Deciding whether, and after how long, to retry an attempt the classifier called transient.
//!
//! Pure: everything it needs is passed in, so every rule has a unit test without HTTP. The retry
//! budget, which is shared state, is consulted by the engine after a `Retry` decision.

use std::time::Duration;

use crate::policy::RetryPolicy;
use crate::rng::Random;

/// Facts about the attempt that just failed transiently.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Failed {
    /// Attempts made so far, this one included.
    pub attempts: u32,
    pub may_have_been_applied: bool,
    /// The response was a marked replay with status 500 or above.
    pub replayed_server_error: bool,
    /// The request carries a key or its method is idempotent.
    pub resendable: bool,
    /// The body can be sent again.
    pub replayable: bool,
    /// The server's `Retry-After`, uncapped.
    pub server_delay: Option<Duration>,
    /// Time since the operation started.
    pub elapsed: Duration,
}

/// Why the engine stops retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    ReplayedFailure,
    OutcomeUnknown,
    NotReplayable,
    AttemptsExhausted,
    Deadline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Retry { delay: Duration },
    Stop(Stop),
}

/// The rules, in order: a replayed failure is futile; a keyless request that may have been
/// applied is not resent; a stream cannot be resent; attempts and the schedule bound the
/// retries; and the wait — `max(backoff, min(Retry-After, cap))` — must fit in the deadline, or
/// the engine stops now rather than sleep and then fail.
pub(crate) fn decide(policy: &RetryPolicy, f: &Failed, rng: &dyn Random) -> Decision {
    if f.replayed_server_error {
        return Decision::Stop(Stop::ReplayedFailure);
    }
    if f.may_have_been_applied && !f.resendable {
        return Decision::Stop(Stop::OutcomeUnknown);
    }
    if !f.replayable {
        return Decision::Stop(Stop::NotReplayable);
    }
    if f.attempts >= policy.get_max_attempts() {
        return Decision::Stop(Stop::AttemptsExhausted);
    }
    let Some(backoff) = policy.get_backoff().delay(f.attempts, rng) else {
        return Decision::Stop(Stop::AttemptsExhausted);
    };
    let server = f.server_delay.map_or(Duration::ZERO, |d| d.min(policy.get_max_retry_after()));
    let delay = backoff.max(server);
    if let Some(deadline) = policy.get_deadline()
        && f.elapsed.saturating_add(delay) >= deadline
    {
        return Decision::Stop(Stop::Deadline);
    }
    Decision::Retry { delay }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::{ExponentialBackoff, Jitter};
    use crate::rng::SeededRng;

    fn policy() -> RetryPolicy {
        RetryPolicy::standard()
            .backoff(ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(5)).jitter(Jitter::None))
            .max_retry_after(Duration::from_secs(20))
            .deadline(Duration::from_secs(30))
    }

    fn failed() -> Failed {
        Failed {
            attempts: 1,
            may_have_been_applied: true,
            replayed_server_error: false,
            resendable: true,
            replayable: true,
            server_delay: None,
            elapsed: Duration::ZERO,
        }
    }

    fn run(f: Failed) -> Decision {
        decide(&policy(), &f, &SeededRng::new(0))
    }

    fn retry_ms(ms: u64) -> Decision {
        Decision::Retry { delay: Duration::from_millis(ms) }
    }

    #[test]
    fn backs_off_exponentially() {
        assert_eq!(run(Failed { attempts: 1, ..failed() }), retry_ms(100));
        assert_eq!(run(Failed { attempts: 3, ..failed() }), retry_ms(400));
    }

    #[test]
    fn retry_after_is_a_floor_and_capped() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(run(Failed { server_delay: secs(2), ..failed() }), retry_ms(2000));
        // Below the backoff: the backoff wins.
        assert_eq!(
            run(Failed { attempts: 4, server_delay: Some(Duration::from_millis(50)), ..failed() }),
            retry_ms(800)
        );
        // Above the cap: capped.
        assert_eq!(run(Failed { server_delay: secs(3600), ..failed() }), retry_ms(20_000));
    }

    #[test]
    fn a_wait_that_cannot_fit_the_deadline_stops_now() {
        let f = Failed { server_delay: Some(Duration::from_secs(10)), elapsed: Duration::from_secs(25), ..failed() };
        assert_eq!(run(f), Decision::Stop(Stop::Deadline));
        let f = Failed { server_delay: Some(Duration::from_secs(10)), elapsed: Duration::from_secs(19), ..failed() };
        assert_eq!(run(f), retry_ms(10_000));
        let f = Failed { elapsed: Duration::from_secs(30), ..failed() };
        assert_eq!(run(f), Decision::Stop(Stop::Deadline));
    }

    #[test]
    fn keyless_maybe_applied_is_never_resent() {
        let f = Failed { resendable: false, ..failed() };
        assert_eq!(run(f), Decision::Stop(Stop::OutcomeUnknown));
        // Not applied (a 429, a refused connection): safe even without a key.
        let f = Failed { resendable: false, may_have_been_applied: false, ..failed() };
        assert_eq!(run(f), retry_ms(100));
    }

    #[test]
    fn other_stops() {
        assert_eq!(run(Failed { replayed_server_error: true, ..failed() }), Decision::Stop(Stop::ReplayedFailure));
        assert_eq!(run(Failed { replayable: false, ..failed() }), Decision::Stop(Stop::NotReplayable));
        assert_eq!(run(Failed { attempts: 5, ..failed() }), Decision::Stop(Stop::AttemptsExhausted));
        let ended = policy().backoff(crate::backoff::backoff_fn(|_, _| None));
        assert_eq!(decide(&ended, &failed(), &SeededRng::new(0)), Decision::Stop(Stop::AttemptsExhausted));
    }
}
