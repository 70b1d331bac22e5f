//! Deciding whether, and after how long, to retry an attempt the classifier called transient.
//!
//! Pure: everything it needs is passed in, so every rule has a unit test without HTTP. The retry
//! budget, which is shared state, is consulted by the engine after a `Retry` decision.

use std::time::Duration;

use crate::classify::MAX_REFUSALS;
use crate::error::{Error, Failure};
use crate::policy::RetryPolicy;
use crate::time::Random;

/// A setback: facts about the attempt that just failed transiently.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Setback {
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
    /// Attempts the server refused unprocessed so far, this one included.
    pub refusals: u32,
    /// The server throttled this attempt: the throttled schedule applies.
    pub throttled: bool,
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

impl Stop {
    /// The name recorded in traces.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stop::ReplayedFailure => "replayed_failure",
            Stop::OutcomeUnknown => "outcome_unknown",
            Stop::NotReplayable => "not_replayable",
            Stop::AttemptsExhausted => "attempts_exhausted",
            Stop::Deadline => "deadline_exceeded",
        }
    }

    /// The error to give the caller, once the attempts' failure is known.
    pub(crate) fn error(self) -> fn(Box<Failure>) -> Error {
        match self {
            Stop::ReplayedFailure => Error::ReplayedFailure,
            Stop::OutcomeUnknown => Error::OutcomeUnknown,
            Stop::NotReplayable => Error::NotReplayable,
            Stop::AttemptsExhausted => Error::AttemptsExhausted,
            Stop::Deadline => Error::DeadlineExceeded,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Retry { delay: Duration },
    Stop(Stop),
}

/// The rules, in order: a replayed failure is futile; a keyless request that may have been
/// applied is not resent; a stream cannot be resent; attempts, refusals and the schedule bound
/// the retries; and the wait — `max(backoff, min(Retry-After, cap))`, the backoff from the
/// throttled schedule after a throttle — must fit in the deadline, or
/// the engine stops now rather than sleep and then fail.
pub(crate) fn decide(policy: &RetryPolicy, f: &Setback, rng: &dyn Random) -> Decision {
    if f.replayed_server_error {
        return Decision::Stop(Stop::ReplayedFailure);
    }
    if f.may_have_been_applied && !f.resendable {
        return Decision::Stop(Stop::OutcomeUnknown);
    }
    if !f.replayable {
        return Decision::Stop(Stop::NotReplayable);
    }
    if f.attempts >= policy.max_attempts() || f.refusals > MAX_REFUSALS {
        return Decision::Stop(Stop::AttemptsExhausted);
    }
    let schedule = if f.throttled { policy.throttle_backoff() } else { policy.backoff() };
    let Some(backoff) = schedule.delay(f.attempts, rng) else {
        return Decision::Stop(Stop::AttemptsExhausted);
    };
    let server = f.server_delay.map_or(Duration::ZERO, |d| d.min(policy.max_retry_after()));
    let delay = backoff.max(server);
    if let Some(deadline) = policy.deadline()
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
    use crate::time::SeededRng;

    fn policy() -> RetryPolicy {
        RetryPolicy::standard()
            .with_backoff(
                ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(5)).jitter(Jitter::None),
            )
            .with_max_retry_after(Duration::from_secs(20))
            .with_deadline(Duration::from_secs(30))
    }

    fn setback() -> Setback {
        Setback {
            attempts: 1,
            may_have_been_applied: true,
            replayed_server_error: false,
            resendable: true,
            replayable: true,
            server_delay: None,
            elapsed: Duration::ZERO,
            refusals: 0,
            throttled: false,
        }
    }

    fn run(f: Setback) -> Decision {
        decide(&policy(), &f, &SeededRng::new(0))
    }

    fn retry_ms(ms: u64) -> Decision {
        Decision::Retry { delay: Duration::from_millis(ms) }
    }

    #[test]
    fn a_throttle_backs_off_on_its_own_schedule() {
        let policy = policy().with_throttle_backoff(
            ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(20)).jitter(Jitter::None),
        );
        let rng = SeededRng::new(0);
        let throttled = |attempts| Setback { attempts, throttled: true, ..setback() };
        assert_eq!(decide(&policy, &throttled(1), &rng), retry_ms(1_000));
        assert_eq!(decide(&policy, &throttled(3), &rng), retry_ms(4_000));
        assert_eq!(decide(&policy, &setback(), &rng), retry_ms(100), "a transient failure keeps its own");
        // Retry-After is still the floor.
        let f = Setback { server_delay: Some(Duration::from_secs(3)), ..throttled(1) };
        assert_eq!(decide(&policy, &f, &rng), retry_ms(3_000));
        // with_backoff sets both; the standard policy's throttled schedule starts at 1 s.
        assert_eq!(run(throttled(1)), retry_ms(100));
        let standard = RetryPolicy::standard();
        assert_eq!(format!("{:?}", standard.throttle_backoff()), format!("{:?}", ExponentialBackoff::THROTTLED));
        assert_eq!(ExponentialBackoff::THROTTLED.ceiling(1), Duration::from_secs(1));
    }

    #[test]
    fn backs_off_exponentially() {
        assert_eq!(run(Setback { attempts: 1, ..setback() }), retry_ms(100));
        assert_eq!(run(Setback { attempts: 3, ..setback() }), retry_ms(400));
    }

    #[test]
    fn retry_after_is_a_floor_and_capped() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(run(Setback { server_delay: secs(2), ..setback() }), retry_ms(2000));
        // Below the backoff: the backoff wins.
        assert_eq!(
            run(Setback { attempts: 4, server_delay: Some(Duration::from_millis(50)), ..setback() }),
            retry_ms(800)
        );
        // Above the cap: capped.
        assert_eq!(run(Setback { server_delay: secs(3600), ..setback() }), retry_ms(20_000));
    }

    #[test]
    fn a_wait_that_cannot_fit_the_deadline_stops_now() {
        let f = Setback { server_delay: Some(Duration::from_secs(10)), elapsed: Duration::from_secs(25), ..setback() };
        assert_eq!(run(f), Decision::Stop(Stop::Deadline));
        let f = Setback { server_delay: Some(Duration::from_secs(10)), elapsed: Duration::from_secs(19), ..setback() };
        assert_eq!(run(f), retry_ms(10_000));
        let f = Setback { elapsed: Duration::from_secs(30), ..setback() };
        assert_eq!(run(f), Decision::Stop(Stop::Deadline));
    }

    #[test]
    fn keyless_maybe_applied_is_never_resent() {
        let f = Setback { resendable: false, ..setback() };
        assert_eq!(run(f), Decision::Stop(Stop::OutcomeUnknown));
        // Not applied (a 429, a refused connection): safe even without a key.
        let f = Setback { resendable: false, may_have_been_applied: false, ..setback() };
        assert_eq!(run(f), retry_ms(100));
    }

    #[test]
    fn other_stops() {
        assert_eq!(run(Setback { replayed_server_error: true, ..setback() }), Decision::Stop(Stop::ReplayedFailure));
        assert_eq!(run(Setback { replayable: false, ..setback() }), Decision::Stop(Stop::NotReplayable));
        assert_eq!(run(Setback { attempts: 5, ..setback() }), Decision::Stop(Stop::AttemptsExhausted));
        let ended = policy().with_backoff(crate::backoff::backoff_fn(|_, _| None));
        assert_eq!(decide(&ended, &setback(), &SeededRng::new(0)), Decision::Stop(Stop::AttemptsExhausted));
    }

    #[test]
    fn refusals_are_retried_three_times_key_or_not() {
        let refused = |refusals| Setback { resendable: false, may_have_been_applied: false, refusals, ..setback() };
        for refusals in 1..=MAX_REFUSALS {
            assert_eq!(run(Setback { attempts: refusals, ..refused(refusals) }), retry_ms(100 << (refusals - 1)));
        }
        assert_eq!(run(Setback { attempts: 2, ..refused(MAX_REFUSALS + 1) }), Decision::Stop(Stop::AttemptsExhausted));
    }
}
