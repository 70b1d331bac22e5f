//! Errors: what went wrong, and whether the request may have been applied.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::classify::TransportCause;
use crate::key::{IdempotencyKey, KeyError};

/// An error from the idempotent retry layer.
///
/// Inside a `reqwest_middleware` client it arrives wrapped in
/// [`reqwest_middleware::Error::Middleware`]; get it back with [`Error::find`] (by reference) or
/// [`Error::from_middleware`] (by value):
///
/// ```
/// # async fn run(client: reqwest_middleware::ClientWithMiddleware) {
/// use idempotent_retry::Error;
///
/// match client.post("http://127.0.0.1:9/cvms").body("{}").send().await {
///     Ok(response) => println!("{}", response.status()),
///     Err(err) => match Error::find(&err) {
///         Some(e) if e.may_have_been_applied() => {
///             eprintln!("outcome unknown; re-run with key {:?} to settle it", e.idempotency_key())
///         }
///         Some(e) => eprintln!("not applied: {e}"),
///         None => eprintln!("{err}"),
///     },
/// }
/// # }
/// ```
///
/// Every variant but [`InvalidKey`](Self::InvalidKey), [`InvalidRequest`](Self::InvalidRequest)
/// and [`RateLimited`](Self::RateLimited)
/// carries a [`Failure`]: the attempts made, the key, the last status or transport cause, and
/// whether the request may have been applied. The message says what the engine decided; its
/// [`source`](std::error::Error::source) is the `Failure`, which says how the last attempt ended,
/// and whose own source is the transport error, if there was one. Each fact appears once in the chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key given (by [`RequestOptions::key`](crate::RequestOptions::key) or already on the
    /// request) is not acceptable to this server. Nothing was sent.
    #[error("invalid idempotency key, nothing was sent")]
    InvalidKey(#[source] KeyError),

    /// The request cannot be sent as asked: contradictory options, or a body the key carrier
    /// cannot work with. Nothing was sent.
    #[error("invalid request, nothing was sent: {0}")]
    InvalidRequest(String),

    /// The request carries no key and is not idempotent, an attempt failed after the request may
    /// have reached the server, so it was not resent. Whether it took effect is unknown: read
    /// the resource back to find out.
    #[error("outcome unknown after {attempts}: the request may have been applied and carries no idempotency key, so it was not resent", attempts = attempts(.0))]
    OutcomeUnknown(#[source] Box<Failure>),

    /// The [adaptive rate limiter](crate::rate_limit) would hold the request's first send
    /// past its deadline: the host has been throttling, and the rate it allows leaves no turn in
    /// time. Nothing was sent; running it again later may succeed.
    #[error("rate limited: the host throttled, and the next turn to send is {}s away, past the deadline; nothing was sent", .wait.as_secs_f64())]
    RateLimited {
        /// How long the request would have had to wait.
        wait: Duration,
    },

    /// Every attempt allowed by the policy failed transiently.
    #[error("gave up after {attempts}", attempts = attempts(.0))]
    AttemptsExhausted(#[source] Box<Failure>),

    /// The deadline ran out, or the next wait (often the server's `Retry-After`) would not fit in
    /// what remained of it. The engine fails at once instead of sleeping and then failing.
    #[error("deadline exceeded after {attempts}{hint}", attempts = attempts(.0), hint = retry_after_hint(.0))]
    DeadlineExceeded(#[source] Box<Failure>),

    /// The shared retry budget for this host is empty (a sustained outage): no retry was made.
    #[error("retry budget exhausted after {attempts}; not retrying so as not to add load to a failing server", attempts = attempts(.0))]
    BudgetExhausted(#[source] Box<Failure>),

    /// The server refused the key: it was used before with a different payload (422, 417, a
    /// 409 that says so, or Stripe's 400 `idempotency_error`). Retrying cannot help.
    #[error("the server rejected the idempotency key as reused with a different payload")]
    KeyReuse(#[source] Box<Failure>),

    /// The server replayed a stored 5xx for this key. Every retry with the key would get it
    /// again, so the engine stopped.
    #[error("the server replayed a stored failure for this idempotency key; retrying it is futile")]
    ReplayedFailure(#[source] Box<Failure>),

    /// The body is a stream that cannot be replayed, so the request was sent once and not
    /// retried after a transient failure.
    #[error("the request body is a stream and could not be replayed, so the request was not retried")]
    NotReplayable(#[source] Box<Failure>),

    /// The caller asked for the response body in memory ([`RequestOptions::buffer_body`]) and
    /// it is longer than the layer's limit
    /// ([`max_body`](crate::IdempotentRetryBuilder::max_body)). The first `limit` bytes are in
    /// the failure; the rest was not read. An answer other than a 4xx may mean the request took
    /// effect.
    ///
    /// [`RequestOptions::buffer_body`]: crate::RequestOptions::buffer_body
    #[error("the response body is longer than the {limit}-byte limit, so it was not read to the end")]
    ResponseTooLarge {
        /// The limit in force, in bytes.
        limit: usize,
        /// The attempts; the last one holds the body's first `limit` bytes.
        #[source]
        failure: Box<Failure>,
    },

    /// A write was answered with a redirect the layer does not follow: to another origin (the
    /// write is never sent anywhere but where it was meant for), or one the client followed on
    /// its own (a `reqwest::Client` built without `redirect::Policy::none()`), whose answer is
    /// not the write's. Whether the write was applied is unknown; nothing was sent to the other
    /// origin by the layer.
    #[error("{}", redirected(.location, *.followed))]
    Redirected {
        /// Where the redirect pointed (credentials and query values hidden).
        location: String,
        /// The client followed it before the layer saw the answer.
        followed: bool,
        /// The attempts; the last holds the redirect (or the answer of where it led).
        #[source]
        failure: Box<Failure>,
    },

    /// A transport failure the engine does not retry (e.g. a redirect loop or an error from
    /// another middleware).
    #[error("request failed after {attempts}", attempts = attempts(.0))]
    Transport(#[source] Box<Failure>),
}

fn attempts(f: &Failure) -> String {
    match f.attempts {
        1 => "1 attempt".to_owned(),
        n => format!("{n} attempts"),
    }
}

fn redirected(location: &str, followed: bool) -> String {
    if followed {
        format!(
            "the client followed a redirect of the write to {location}, so its answer is not the write's and whether the write was applied is unknown; build the reqwest::Client with redirect::Policy::none(): the layer follows a write's redirects itself, within its origin"
        )
    } else {
        format!(
            "the server redirected the write to another origin ({location}); it was not sent there, and whether it was applied is unknown"
        )
    }
}

fn retry_after_hint(f: &Failure) -> String {
    match f.retry_after {
        Some(d) => format!("; the server asked to retry after {}s", d.as_secs_f64()),
        None => String::new(),
    }
}

impl Error {
    /// The typed error inside a `reqwest_middleware::Error`, if this layer produced it.
    pub fn find(err: &reqwest_middleware::Error) -> Option<&Error> {
        match err {
            reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<Error>(),
            _ => None,
        }
    }

    /// Takes the typed error out of a `reqwest_middleware::Error`.
    ///
    /// # Errors
    ///
    /// Gives `err` back unchanged when it did not come from this layer.
    pub fn from_middleware(err: reqwest_middleware::Error) -> Result<Error, reqwest_middleware::Error> {
        match err {
            reqwest_middleware::Error::Middleware(e) => {
                e.downcast::<Error>().map_err(reqwest_middleware::Error::Middleware)
            }
            other => Err(other),
        }
    }

    /// The details of the failed attempts, for every variant but the "nothing was sent" ones.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Error::InvalidKey(_) | Error::InvalidRequest(_) | Error::RateLimited { .. } => None,
            Error::OutcomeUnknown(f)
            | Error::AttemptsExhausted(f)
            | Error::DeadlineExceeded(f)
            | Error::BudgetExhausted(f)
            | Error::KeyReuse(f)
            | Error::ReplayedFailure(f)
            | Error::NotReplayable(f)
            | Error::Transport(f)
            | Error::ResponseTooLarge { failure: f, .. }
            | Error::Redirected { failure: f, .. } => Some(f),
        }
    }

    /// Whether the request may have taken effect on the server. `false` means it certainly did
    /// not (nothing was sent, or every attempt was refused before processing).
    pub fn may_have_been_applied(&self) -> bool {
        self.failure().is_some_and(|f| f.may_have_been_applied)
    }

    /// Whether the failure was transient, so running the same operation again later, with the
    /// same key, may succeed. `false` for refusals that will not change (a bad key, key reuse, a
    /// replayed failure) and for [`OutcomeUnknown`](Self::OutcomeUnknown), which must be settled by
    /// reading back, not by resending.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::AttemptsExhausted(_)
                | Error::DeadlineExceeded(_)
                | Error::RateLimited { .. }
                | Error::BudgetExhausted(_)
                | Error::NotReplayable(_)
        )
    }

    /// Whether the server refused the key as reused with another payload.
    pub fn is_key_reuse(&self) -> bool {
        matches!(self, Error::KeyReuse(_))
    }

    /// Whether a write's redirect was not followed (see [`Redirected`](Self::Redirected)).
    pub fn is_redirected(&self) -> bool {
        matches!(self, Error::Redirected { .. })
    }

    /// Whether the outcome is unknown (see [`OutcomeUnknown`](Self::OutcomeUnknown)).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown(_))
    }

    /// The key the request was sent with, if it had one.
    pub fn idempotency_key(&self) -> Option<&IdempotencyKey> {
        self.failure().and_then(|f| f.key.as_ref())
    }

    /// Attempts made (0 when nothing was sent).
    pub fn attempts(&self) -> u32 {
        self.failure().map_or(0, |f| f.attempts)
    }

    /// The status of the last response, if the last attempt got one.
    pub fn status(&self) -> Option<StatusCode> {
        self.failure().and_then(|f| f.last.status())
    }

    /// The server's last `Retry-After`, uncapped, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.failure().and_then(|f| f.retry_after)
    }
}

impl From<Error> for reqwest_middleware::Error {
    fn from(err: Error) -> Self {
        reqwest_middleware::Error::middleware(err)
    }
}

impl From<KeyError> for Error {
    fn from(err: KeyError) -> Self {
        Error::InvalidKey(err)
    }
}

/// What the attempts of a failed request amounted to.
#[derive(Debug)]
#[non_exhaustive]
pub struct Failure {
    /// Attempts made.
    pub attempts: u32,
    /// The key sent on every attempt, if any.
    pub key: Option<IdempotencyKey>,
    /// Whether any attempt may have taken effect on the server.
    pub may_have_been_applied: bool,
    /// How the last attempt ended.
    pub last: LastAttempt,
    /// The last `Retry-After` the server sent, uncapped.
    pub retry_after: Option<Duration>,
    /// Time spent waiting between attempts.
    pub total_delay: Duration,
}

/// How the last attempt ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum LastAttempt {
    /// The server answered.
    Status {
        /// The status.
        status: StatusCode,
        /// The response headers.
        headers: HeaderMap,
        /// The response body (error responses are read in full; see the crate docs).
        body: Bytes,
    },
    /// The exchange failed below HTTP.
    Transport {
        /// The kind of failure.
        cause: TransportCause,
        /// The underlying error.
        error: reqwest_middleware::Error,
    },
}

impl LastAttempt {
    /// The status, if the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            LastAttempt::Status { status, .. } => Some(*status),
            LastAttempt::Transport { .. } => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.last {
            LastAttempt::Status { status, .. } => write!(f, "last status {status}")?,
            LastAttempt::Transport { cause, .. } => write!(f, "last failure: {cause}")?,
        }
        if let Some(key) = &self.key {
            write!(f, ", key sha256:{}", key.fingerprint())?;
        }
        f.write_str(if self.may_have_been_applied { ", may have been applied" } else { ", not applied" })
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.last {
            LastAttempt::Transport { error, .. } => Some(error),
            LastAttempt::Status { .. } => None,
        }
    }
}

/// An error and its causes on one line, each cause once (a cause whose text the line already
/// holds is left out): what a command-line tool prints.
///
/// ```
/// use idempotent_retry::IdempotencyKey;
///
/// let error = IdempotencyKey::new("").unwrap_err();
/// assert_eq!(idempotent_retry::error::chain(&error), error.to_string());
/// ```
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// Any error a read-back lookup, a wait's poll or another caller-supplied step may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
