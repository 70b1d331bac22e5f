//! Faults a [`ChaosProxy`](super::ChaosProxy) injects, and the schedules that pick them.

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::{Random, SeededRng};

/// What the proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Forward it and return the answer.
    Pass,
    /// Forward it, let the server answer (and commit), then reset the client's connection
    /// (SO_LINGER 0): the response is lost after the fact.
    Lose,
    /// Reset the client's connection without forwarding: the server never sees the request, but
    /// the client cannot know that.
    Reset,
    /// Answer with this status without forwarding, with an optional `Retry-After`.
    Status {
        /// The status to answer with (e.g. 503, 429).
        status: u16,
        /// The `Retry-After` to send.
        retry_after: Option<RetryAfter>,
    },
    /// Hold the request this long, then forward it. A client whose attempt timeout is shorter
    /// times out, while the request still reaches the server afterwards.
    Delay(Duration),
    /// Forward it, let the server answer (and commit), then hold the answer this long before
    /// relaying it: the window in which a client can crash after the server committed.
    HoldResponse(Duration),
    /// Forward it, let the server answer (and commit), relay the answer's head and half its
    /// body, then stall: nothing more is sent until the client hangs up (or this long has
    /// passed, when the proxy closes the connection).
    StallBody(Duration),
    /// Answer with this status and a body of this many bytes (chunked, generated as it is sent,
    /// never held in memory), without forwarding: a hostile or broken server.
    HugeBody {
        /// The status to answer with.
        status: u16,
        /// The body's length in bytes.
        len: u64,
    },
}

impl Fault {
    /// A 503 with `Retry-After`.
    pub const fn unavailable(retry_after: RetryAfter) -> Self {
        Fault::Status { status: 503, retry_after: Some(retry_after) }
    }

    /// A 429 with `Retry-After`.
    pub const fn throttled(retry_after: RetryAfter) -> Self {
        Fault::Status { status: 429, retry_after: Some(retry_after) }
    }

    /// Whether this is a fault (anything but [`Pass`](Self::Pass)).
    pub fn is_fault(&self) -> bool {
        *self != Fault::Pass
    }

    /// Whether the request reaches the server under this fault.
    pub fn forwards(&self) -> bool {
        matches!(self, Fault::Pass | Fault::Lose | Fault::Delay(_) | Fault::HoldResponse(_) | Fault::StallBody(_))
    }
}

/// A `Retry-After` value for an injected status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryAfter {
    /// Delta-seconds.
    Seconds(u64),
    /// An IMF-fixdate this long after the proxy's clock reads now.
    DateIn(Duration),
}

/// Probabilities of each fault in a random schedule. The rest pass.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct FaultMix {
    /// Forward, then reset.
    pub lose: f64,
    /// Reset without forwarding.
    pub reset: f64,
    /// A 503 or a 429 (half each), with [`retry_after`](Self::retry_after).
    pub status: f64,
    /// Hold for [`delay`](Self::delay), then forward.
    pub delay_rate: f64,
    /// The `Retry-After` sent with injected statuses.
    pub retry_after: Option<RetryAfter>,
    /// How long a delayed request is held.
    pub delay: Duration,
}

impl FaultMix {
    /// The chaos example's mix: 20% lose, 10% reset, 10% 503/429 with `Retry-After: 1`.
    pub const fn chaos() -> Self {
        Self {
            lose: 0.2,
            reset: 0.1,
            status: 0.1,
            delay_rate: 0.0,
            retry_after: Some(RetryAfter::Seconds(1)),
            delay: Duration::ZERO,
        }
    }

    /// No faults.
    pub const fn none() -> Self {
        Self { lose: 0.0, reset: 0.0, status: 0.0, delay_rate: 0.0, retry_after: None, delay: Duration::ZERO }
    }

    /// Sets the `Retry-After` sent with injected statuses.
    pub const fn with_retry_after(mut self, retry_after: Option<RetryAfter>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Answers a share `rate` of requests with a 503 or 429 (half each).
    pub const fn with_status(mut self, rate: f64) -> Self {
        self.status = rate;
        self
    }

    /// Holds a share `rate` of requests for `delay` before forwarding them.
    pub const fn with_delay(mut self, rate: f64, delay: Duration) -> Self {
        self.delay_rate = rate;
        self.delay = delay;
        self
    }

    /// The same proportions, scaled so that faults add up to `total` (0.0 to 1.0).
    pub fn scaled_to(self, total: f64) -> Self {
        let sum = self.total();
        if sum == 0.0 {
            return self;
        }
        let k = total.clamp(0.0, 1.0) / sum;
        Self {
            lose: self.lose * k,
            reset: self.reset * k,
            status: self.status * k,
            delay_rate: self.delay_rate * k,
            ..self
        }
    }

    /// The probability that a request meets any fault.
    pub fn total(&self) -> f64 {
        self.lose + self.reset + self.status + self.delay_rate
    }
}

/// Which fault each request meets, in arrival order.
#[derive(Debug)]
pub struct Schedule(Kind);

#[derive(Debug)]
enum Kind {
    Script(VecDeque<Fault>),
    Random { rng: SeededRng, mix: FaultMix },
    Always(Fault),
}

impl Schedule {
    /// These faults for the first requests, in order; every later request passes.
    pub fn script(faults: impl IntoIterator<Item = Fault>) -> Self {
        Self(Kind::Script(faults.into_iter().collect()))
    }

    /// Faults drawn from `mix` by a generator seeded with `seed`: the same seed gives the same
    /// sequence of faults (which request meets which depends on arrival order).
    pub fn random(seed: u64, mix: FaultMix) -> Self {
        Self(Kind::Random { rng: SeededRng::new(seed), mix })
    }

    /// The same fault for every request (e.g. a sustained outage: `Fault::Status { status: 503, .. }`).
    pub fn always(fault: Fault) -> Self {
        Self(Kind::Always(fault))
    }

    /// No faults.
    pub fn pass() -> Self {
        Self::always(Fault::Pass)
    }

    /// The fault for the next request.
    pub fn next_fault(&mut self) -> Fault {
        match &mut self.0 {
            Kind::Script(faults) => faults.pop_front().unwrap_or(Fault::Pass),
            Kind::Always(fault) => *fault,
            Kind::Random { rng, mix } => {
                let u = unit(rng);
                let mut edge = mix.lose;
                if u < edge {
                    return Fault::Lose;
                }
                edge += mix.reset;
                if u < edge {
                    return Fault::Reset;
                }
                edge += mix.status;
                if u < edge {
                    let status = if rng.next_u64() & 1 == 0 { 503 } else { 429 };
                    return Fault::Status { status, retry_after: mix.retry_after };
                }
                edge += mix.delay_rate;
                if u < edge {
                    return Fault::Delay(mix.delay);
                }
                Fault::Pass
            }
        }
    }
}

fn unit(rng: &SeededRng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_then_pass() {
        let mut s = Schedule::script([Fault::Lose, Fault::Reset]);
        assert_eq!([s.next_fault(), s.next_fault(), s.next_fault()], [Fault::Lose, Fault::Reset, Fault::Pass]);
    }

    #[test]
    fn random_follows_the_mix_and_the_seed() {
        let draw = |seed| {
            let mut s = Schedule::random(seed, FaultMix::chaos());
            (0..10_000).map(|_| s.next_fault()).collect::<Vec<_>>()
        };
        let faults = draw(7);
        assert_eq!(faults, draw(7));
        assert_ne!(faults, draw(8));
        let share = |f: fn(&Fault) -> bool| faults.iter().filter(|x| f(x)).count() as f64 / 10_000.0;
        assert!((share(|f| *f == Fault::Lose) - 0.2).abs() < 0.02);
        assert!((share(|f| *f == Fault::Reset) - 0.1).abs() < 0.02);
        assert!((share(|f| matches!(f, Fault::Status { .. })) - 0.1).abs() < 0.02);
        assert!((share(|f| *f == Fault::Pass) - 0.6).abs() < 0.02);
    }

    #[test]
    fn scaling_keeps_proportions() {
        let m = FaultMix::chaos().scaled_to(0.8);
        assert!((m.total() - 0.8).abs() < 1e-9);
        assert!((m.lose - 0.4).abs() < 1e-9);
    }
}
