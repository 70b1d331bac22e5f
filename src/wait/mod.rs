//! Waiting for what a create started: poll until a resource (or the server's operation) reaches
//! a target state, the way Terraform's `StateChangeConf` does, with injected time.
//!
//! A create rarely ends with its 201: a CVM answers `starting`, Azure answers 202 with an
//! `Operation-Location`, Google returns an operation to poll until `done`, Hetzner returns an
//! action. [`WaitFor`] says what "ready" means and how patiently to poll; a [`Waiter`] polls a
//! refresh function until then. [`Operations`](crate::Operations) uses both: with
//! [`OperationBuilder::wait`](crate::operation::OperationBuilder::wait) it recognises the
//! server's long-running pattern from the create's answer ([`Handle`]), journals that handle
//! *before* the wait begins, and a re-run resumes polling it instead of creating again.
//!
//! Polls are paced by an exponential schedule with its own bounds (1 s to 30 s by default), a
//! `Retry-After` on a poll's answer is a floor under the next delay, and the whole wait is
//! clipped to [`WaitFor::timeout`]. A 404 is tolerated [`WaitFor::not_found_checks`] times in a
//! row (reads lag behind creates), and [`WaitFor::target_occurrences`] asks for the target
//! state several polls in a row (eventual consistency). HTTP polls go through the client's
//! retry layer: a poll that fails transiently is retried with the same classifier, within the
//! same retry budget.
//!
//! ```
//! use std::time::Duration;
//! use idempotent_retry::wait::{Observation, WaitFor, Waiter};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let ready = WaitFor::field("status").target(["running"]).failure(["error"]).timeout(Duration::from_secs(600));
//! let mut states = vec!["running", "starting"];
//! let clock = idempotent_retry::time::ManualClock::new(std::time::UNIX_EPOCH);
//! let waiter = Waiter::new().clock(clock.clone()).sleeper(idempotent_retry::time::RecordingSleeper::advancing(&clock));
//! let done = waiter
//!     .wait(&ready, || {
//!         let state = states.pop().unwrap();
//!         async move { Ok(Observation::resource(json!({"id": "cvm-1", "status": state}))) }
//!     })
//!     .await
//!     .unwrap();
//! assert_eq!((done.polls, done.resource["status"].as_str()), (2, Some("running")));
//! # }
//! ```

mod http;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::backoff::{Backoff, ExponentialBackoff, Jitter};
use crate::error::BoxError;
use crate::time::{Clock, Random, SeededRng, Sleeper, SystemClock, TokioSleeper};

pub use http::Handle;
pub(crate) use http::{Answered, Poller, Stage};

/// What "ready" means, and how patiently to poll for it.
///
/// States are JSON values read from the resource at a field path (`status`, `metadata.phase`,
/// or a JSON pointer such as `/action/status`); strings compare ASCII case-insensitively.
/// Without [`pending`](Self::pending) states, every state that is neither a target nor a
/// failure counts as pending; with them, any other state ends the wait with
/// [`WaitError::UnexpectedState`].
#[derive(Clone)]
pub struct WaitFor {
    pub(crate) rule: Option<StateRule>,
    target: Vec<Value>,
    pending: Vec<Value>,
    failure: Vec<Value>,
    timeout: Duration,
    poll: ExponentialBackoff,
    not_found_checks: u32,
    target_occurrences: u32,
    initial_delay: Duration,
    pub(crate) follow: Follow,
    on_poll: Option<Arc<PollHook>>,
}

type PollHook = dyn Fn(&PollEvent) + Send + Sync;

/// How a state is read from what a poll returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StateRule {
    /// A field path or JSON pointer.
    Field(String),
    /// Google's operations: `done` (with `error` when it failed).
    Done,
}

/// Which of a create's answers start a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Follow {
    /// Every long-running pattern [`Handle`] knows.
    Any,
    /// Only a `202 Accepted` that names where to poll.
    Accepted,
}

impl fmt::Debug for WaitFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitFor")
            .field("rule", &self.rule)
            .field("target", &self.target)
            .field("pending", &self.pending)
            .field("failure", &self.failure)
            .field("timeout", &self.timeout)
            .field("poll", &self.poll)
            .field("not_found_checks", &self.not_found_checks)
            .field("target_occurrences", &self.target_occurrences)
            .field("follow", &self.follow)
            .finish_non_exhaustive()
    }
}

impl WaitFor {
    /// How long a wait may take in all (default 10 minutes).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
    /// How long one HTTP poll may take past the timeout: the last poll comes at the timeout,
    /// and needs time of its own.
    pub const POLL_GRACE: Duration = Duration::from_secs(10);
    /// The poll schedule: 1 s doubling to 30 s, equal jitter (each wait at least half its
    /// ceiling).
    pub const DEFAULT_POLL: ExponentialBackoff =
        ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(30)).jitter(Jitter::Equal);
    /// 404s in a row tolerated while a read lags behind the create (Terraform's default).
    pub const DEFAULT_NOT_FOUND_CHECKS: u32 = 20;

    /// Wait until the resource's `field` holds a [target](Self::target) state. `field` is a
    /// dotted path (`status`, `action.status`) or a JSON pointer (`/status`). A long-running
    /// operation the create's answer starts (a 202, an operation resource) is followed first.
    pub fn field(field: impl Into<String>) -> Self {
        Self { rule: Some(StateRule::Field(field.into())), ..Self::done() }
    }

    /// Wait only for a long-running operation the create's answer starts (any pattern
    /// [`Handle`] knows) to finish; an answer that starts none is ready at once.
    pub fn done() -> Self {
        Self {
            rule: None,
            target: Vec::new(),
            pending: Vec::new(),
            failure: Vec::new(),
            timeout: Self::DEFAULT_TIMEOUT,
            poll: Self::DEFAULT_POLL,
            not_found_checks: Self::DEFAULT_NOT_FOUND_CHECKS,
            target_occurrences: 1,
            initial_delay: Duration::ZERO,
            follow: Follow::Any,
            on_poll: None,
        }
    }

    /// Like [`done`](Self::done), but only a `202 Accepted` with `Location`,
    /// `Operation-Location` or `Azure-AsyncOperation` starts a wait: what a generic client
    /// (`idem post`) follows without being told about the API.
    pub fn accepted() -> Self {
        Self { follow: Follow::Accepted, ..Self::done() }
    }

    /// The states that mean ready.
    pub fn target<I: IntoIterator<Item = V>, V: Into<Value>>(mut self, states: I) -> Self {
        self.target = states.into_iter().map(Into::into).collect();
        self
    }

    /// The states that mean "not yet". Without any, every state that is neither a target nor
    /// a failure is pending.
    pub fn pending<I: IntoIterator<Item = V>, V: Into<Value>>(mut self, states: I) -> Self {
        self.pending = states.into_iter().map(Into::into).collect();
        self
    }

    /// The states that mean it will never be ready: the wait ends with [`WaitError::Failed`].
    pub fn failure<I: IntoIterator<Item = V>, V: Into<Value>>(mut self, states: I) -> Self {
        self.failure = states.into_iter().map(Into::into).collect();
        self
    }

    /// How long the wait may take in all (default [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT)).
    /// The last poll comes at the timeout; an HTTP poll may take up to
    /// [`POLL_GRACE`](Self::POLL_GRACE) more.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The delays between polls (default [`DEFAULT_POLL`](Self::DEFAULT_POLL)).
    pub fn poll(mut self, schedule: ExponentialBackoff) -> Self {
        self.poll = schedule;
        self
    }

    /// 404s in a row to tolerate before giving up (default
    /// [`DEFAULT_NOT_FOUND_CHECKS`](Self::DEFAULT_NOT_FOUND_CHECKS)).
    pub fn not_found_checks(mut self, checks: u32) -> Self {
        self.not_found_checks = checks;
        self
    }

    /// Polls in a row that must see a target state (default 1).
    pub fn target_occurrences(mut self, polls: u32) -> Self {
        self.target_occurrences = polls.max(1);
        self
    }

    /// Time to let pass before the first poll (default none).
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Calls `hook` after every poll: for progress output.
    pub fn on_poll(mut self, hook: impl Fn(&PollEvent) + Send + Sync + 'static) -> Self {
        self.on_poll = Some(Arc::new(hook));
        self
    }

    /// The configured timeout.
    pub fn timeout_limit(&self) -> Duration {
        self.timeout
    }

    /// Whether a resource state was asked for (not only the end of a long-running operation).
    pub fn has_state(&self) -> bool {
        self.rule.is_some()
    }

    /// The same patience and hooks, with another state rule and states.
    pub(crate) fn with_rule(&self, rule: StateRule, target: Vec<Value>, failure: Vec<Value>) -> Self {
        Self { rule: Some(rule), target, pending: Vec::new(), failure, ..self.clone() }
    }

    /// The state of `resource`, by the rule (`Null` when the field is missing).
    fn state_of(&self, resource: &Value) -> Value {
        match &self.rule {
            Some(StateRule::Field(path)) => read_path(resource, path).cloned().unwrap_or(Value::Null),
            Some(StateRule::Done) => match resource.get("done") {
                Some(Value::Bool(true)) if resource.get("error").is_some_and(|e| !e.is_null()) => "failed".into(),
                Some(Value::Bool(true)) => "done".into(),
                _ => "running".into(),
            },
            None => Value::Null,
        }
    }

    /// Whether `resource` is ready by this rule: the reconciler's view of one listed item.
    pub(crate) fn readiness(&self, resource: &Value) -> Readiness {
        let state = self.state_of(resource);
        match self.judge(&state) {
            Judgement::Target => Readiness::Ready,
            Judgement::Pending => Readiness::Pending,
            Judgement::Failure | Judgement::Unexpected => Readiness::Never(state),
        }
    }

    /// The poll schedule.
    pub(crate) fn schedule(&self) -> &ExponentialBackoff {
        &self.poll
    }

    fn judge(&self, state: &Value) -> Judgement {
        let is_in = |set: &[Value]| set.iter().any(|s| same_state(s, state));
        if self.rule.is_none() || is_in(&self.target) {
            Judgement::Target
        } else if is_in(&self.failure) {
            Judgement::Failure
        } else if self.pending.is_empty() || is_in(&self.pending) {
            Judgement::Pending
        } else {
            Judgement::Unexpected
        }
    }
}

/// Whether one resource is ready.
pub(crate) enum Readiness {
    Ready,
    Pending,
    /// A failure state, or one that is neither pending nor a target: never ready.
    Never(Value),
}

enum Judgement {
    Target,
    Failure,
    Pending,
    Unexpected,
}

/// Strings compare ASCII case-insensitively (`Succeeded`, `succeeded`); other values exactly.
fn same_state(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
        _ => a == b,
    }
}

/// The value at `path`: a JSON pointer (`/a/b`) or a dotted path (`a.b`).
pub(crate) fn read_path<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    if path.starts_with('/') {
        return value.pointer(path);
    }
    path.split('.').try_fold(value, |v, part| v.get(part))
}

/// What one poll saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub(crate) seen: Seen,
    pub(crate) retry_after: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seen {
    /// The resource (or the server's operation), whose state the rule reads.
    Resource(Value),
    /// Not there (yet).
    NotFound,
    /// In progress, whatever the body says (a 202 on a `Location` poll).
    InProgress,
    /// Finished: the final resource.
    Finished(Value),
}

impl Observation {
    /// The resource as read: its state decides.
    pub fn resource(resource: Value) -> Self {
        Self { seen: Seen::Resource(resource), retry_after: None }
    }

    /// Not found: a read that lags, tolerated [`WaitFor::not_found_checks`] times in a row.
    pub fn not_found() -> Self {
        Self { seen: Seen::NotFound, retry_after: None }
    }

    /// Still in progress, whatever the state.
    pub fn in_progress() -> Self {
        Self { seen: Seen::InProgress, retry_after: None }
    }

    /// Done: `resource` is the final resource, whatever its state.
    pub fn finished(resource: Value) -> Self {
        Self { seen: Seen::Finished(resource), retry_after: None }
    }

    /// With the server's `Retry-After`: the next poll waits at least this long.
    pub fn retry_after(mut self, delay: Option<Duration>) -> Self {
        self.retry_after = delay;
        self
    }
}

impl From<Option<Value>> for Observation {
    /// `Some` resource, or not found.
    fn from(found: Option<Value>) -> Self {
        found.map_or_else(Self::not_found, Self::resource)
    }
}

/// After each poll, for progress output.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PollEvent {
    /// Polls so far, this one included.
    pub poll: u32,
    /// The state this poll read (`Null` for not found or in progress).
    pub state: Value,
    /// Time since the wait began.
    pub elapsed: Duration,
    /// The wait before the next poll (zero when this poll ended the wait).
    pub next: Duration,
}

/// A wait that ended in a target state.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Ready {
    /// The resource as the last poll read it.
    pub resource: Value,
    /// Its state.
    pub state: Value,
    /// Polls made.
    pub polls: u32,
    /// Time from the start of the wait to its end.
    pub waited: Duration,
}

/// Why a wait ended without the target state. The resource exists (or may): it is not created
/// again; wait again, or delete it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The resource reached a failure state.
    #[error("it reached the failure state {state}")]
    Failed {
        /// The state.
        state: Value,
        /// The resource as read.
        resource: Value,
    },
    /// The timeout passed first.
    #[error("it was not ready after {waited:?} (last state: {state})")]
    TimedOut {
        /// Time waited.
        waited: Duration,
        /// The last state read (`Null` if none).
        state: Value,
        /// The resource as last read, if it was.
        resource: Option<Value>,
    },
    /// Too many polls in a row found nothing.
    #[error("it was not found in {checks} polls in a row")]
    NotFound {
        /// Polls in a row that found nothing.
        checks: u32,
    },
    /// A state that is neither pending, a target nor a failure.
    #[error("it reached the state {state}, which is neither pending nor a target")]
    UnexpectedState {
        /// The state.
        state: Value,
        /// The resource as read.
        resource: Value,
    },
    /// A poll failed (after the retry layer's own retries).
    #[error("a poll failed: {0}")]
    Poll(#[source] BoxError),
}

/// Polls until a [`WaitFor`] is met, on an injected clock and sleeper.
#[derive(Debug, Clone)]
pub struct Waiter {
    clock: Arc<dyn Clock>,
    sleeper: Arc<dyn Sleeper>,
    rng: Arc<dyn Random>,
}

impl Default for Waiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Waiter {
    /// A waiter on the system clock, sleeping with tokio.
    pub fn new() -> Self {
        Self { clock: Arc::new(SystemClock), sleeper: Arc::new(TokioSleeper), rng: Arc::new(SeededRng::from_entropy()) }
    }

    /// The clock (default the system clock).
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The sleeper (default tokio's).
    pub fn sleeper(mut self, sleeper: impl Sleeper + 'static) -> Self {
        self.sleeper = Arc::new(sleeper);
        self
    }

    /// The jitter source (default seeded from the OS).
    pub fn rng(mut self, rng: impl Random + 'static) -> Self {
        self.rng = Arc::new(rng);
        self
    }

    pub(crate) fn from_parts(clock: Arc<dyn Clock>, sleeper: Arc<dyn Sleeper>, rng: Arc<dyn Random>) -> Self {
        Self { clock, sleeper, rng }
    }

    /// Polls `refresh` until `spec` is met.
    ///
    /// # Errors
    ///
    /// [`WaitError`]: a failure state, the timeout, too many 404s, an unexpected state, or a
    /// poll that failed.
    pub async fn wait<F, Fut>(&self, spec: &WaitFor, mut refresh: F) -> Result<Ready, WaitError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Observation, BoxError>>,
    {
        let started = self.clock.now();
        if !spec.initial_delay.is_zero() {
            self.sleeper.sleep(spec.initial_delay.min(spec.timeout)).await;
        }
        let mut tally = Tally::default();
        loop {
            tally.polls += 1;
            let polled = refresh().await;
            let elapsed = since(started, self.clock.now());
            let observation = match polled {
                Ok(observation) => observation,
                // The last poll, at the timeout, failed: the wait timed out.
                Err(_) if elapsed >= spec.timeout => {
                    let state = tally.last.as_ref().map_or(Value::Null, |r| spec.state_of(r));
                    return Err(WaitError::TimedOut { waited: elapsed, state, resource: tally.last });
                }
                Err(e) => return Err(WaitError::Poll(e)),
            };
            let state = match tally.see(spec, observation.seen)? {
                Step::Ready(resource, state) => {
                    self.tell(spec, &tally, state.clone(), elapsed, Duration::ZERO);
                    return Ok(Ready { resource, state, polls: tally.polls, waited: elapsed });
                }
                Step::Pending(state) => state,
            };
            if elapsed >= spec.timeout {
                return Err(WaitError::TimedOut { waited: elapsed, state, resource: tally.last });
            }
            let schedule = spec.poll.delay(tally.polls, &*self.rng).unwrap_or(Duration::ZERO);
            let delay = schedule.max(observation.retry_after.unwrap_or_default()).min(spec.timeout - elapsed);
            self.tell(spec, &tally, state, elapsed, delay);
            self.sleeper.sleep(delay).await;
        }
    }

    fn tell(&self, spec: &WaitFor, tally: &Tally, state: Value, elapsed: Duration, next: Duration) {
        if let Some(hook) = &spec.on_poll {
            hook(&PollEvent { poll: tally.polls, state, elapsed, next });
        }
    }

    /// Now, by the waiter's clock.
    pub(crate) fn now(&self) -> SystemTime {
        self.clock.now()
    }
}

/// What the polls have come to so far.
#[derive(Default)]
struct Tally {
    polls: u32,
    not_found: u32,
    targets: u32,
    last: Option<Value>,
}

enum Step {
    Ready(Value, Value),
    Pending(Value),
}

impl Tally {
    /// Takes in one poll's observation.
    // The error carries the resource as read; it is built once, when the wait ends.
    #[allow(clippy::result_large_err)]
    fn see(&mut self, spec: &WaitFor, seen: Seen) -> Result<Step, WaitError> {
        let resource = match seen {
            Seen::Finished(resource) => return Ok(Step::Ready(resource, Value::Null)),
            Seen::NotFound => {
                self.targets = 0;
                self.not_found += 1;
                if self.not_found > spec.not_found_checks {
                    return Err(WaitError::NotFound { checks: self.not_found });
                }
                return Ok(Step::Pending(Value::Null));
            }
            Seen::InProgress => {
                (self.targets, self.not_found) = (0, 0);
                return Ok(Step::Pending(Value::Null));
            }
            Seen::Resource(resource) => resource,
        };
        self.not_found = 0;
        let state = spec.state_of(&resource);
        match spec.judge(&state) {
            Judgement::Target => {
                self.targets += 1;
                if self.targets >= spec.target_occurrences {
                    return Ok(Step::Ready(resource, state));
                }
            }
            Judgement::Failure => return Err(WaitError::Failed { state, resource }),
            Judgement::Unexpected => return Err(WaitError::UnexpectedState { state, resource }),
            Judgement::Pending => self.targets = 0,
        }
        self.last = Some(resource);
        Ok(Step::Pending(state))
    }
}

fn since(start: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(start).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests;
