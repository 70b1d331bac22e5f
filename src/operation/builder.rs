//! Describing one operation: its request, its key source, its checks.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::Value;
use tracing::Instrument;

use super::run::{Binding, Ran};
use super::{Completed, KeySource, OperationError, Operations, ReadBack};
use crate::journal::store::Claim;
use crate::key::IdempotencyKey;
use crate::operation::git::GitKeyMode;
use crate::policy::RetryPolicy;
use crate::wait::WaitFor;

/// Describes one operation; [`send`](Self::send) runs it.
#[derive(Debug)]
#[must_use = "an operation does nothing until sent"]
pub struct OperationBuilder<'a> {
    pub(super) ops: &'a Operations,
    pub(super) name: String,
    pub(super) sources: Vec<KeySource>,
    pub(super) method: Method,
    pub(super) url: Option<String>,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    pub(super) invalid: Option<String>,
    pub(super) identity: Vec<String>,
    pub(super) expect: Vec<(String, Value)>,
    pub(super) read_back: Option<ReadBack>,
    pub(super) retention: Option<Duration>,
    pub(super) policy: Option<RetryPolicy>,
    pub(super) deadline: Option<Duration>,
    pub(super) wait: Option<WaitFor>,
    pub(super) once: bool,
}

impl<'a> OperationBuilder<'a> {
    /// `POST url`.
    pub fn post(self, url: impl Into<String>) -> Self {
        self.request(Method::POST, url)
    }

    /// `PATCH url`.
    pub fn patch(self, url: impl Into<String>) -> Self {
        self.request(Method::PATCH, url)
    }

    /// `PUT url`.
    pub fn put(self, url: impl Into<String>) -> Self {
        self.request(Method::PUT, url)
    }

    /// Any method.
    pub fn request(mut self, method: Method, url: impl Into<String>) -> Self {
        self.method = method;
        self.url = Some(url.into());
        self
    }

    /// A JSON body (and `Content-Type: application/json`).
    pub fn json<T: serde::Serialize + ?Sized>(mut self, body: &T) -> Self {
        match serde_json::to_vec(body) {
            Ok(bytes) => {
                self.body = bytes.into();
                self.headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            Err(e) => self.invalid = Some(format!("the body does not serialize to JSON: {e}")),
        }
        self
    }

    /// A body as it is.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// A header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            (Ok(n), Ok(v)) => {
                self.headers.append(n, v);
            }
            _ => self.invalid = Some(format!("invalid header `{name}`")),
        }
        self
    }

    /// A random key, journaled (the default).
    pub fn random_key(mut self) -> Self {
        self.sources.push(KeySource::Random);
        self
    }

    /// The derived key of this operation at `generation` (see [`KeySource::Derived`]).
    pub fn derived_key(mut self, generation: u64) -> Self {
        self.sources.push(KeySource::Derived { generation });
        self
    }

    /// This key.
    pub fn key(mut self, key: IdempotencyKey) -> Self {
        self.sources.push(KeySource::Explicit(key));
        self
    }

    /// The clean HEAD of the git working tree at `dir`.
    pub fn key_from_git(mut self, dir: impl Into<PathBuf>, mode: GitKeyMode) -> Self {
        self.sources.push(KeySource::Git { dir: dir.into(), mode });
        self
    }

    /// No key: the endpoint takes none. A lost response is then settled by the read-back.
    pub fn no_key(mut self) -> Self {
        self.sources.push(KeySource::None);
        self
    }

    /// The operation happens once: a success the journal holds for it answers every later run
    /// (resolution [`Recorded`](super::Resolution::Recorded), refreshed by the read-back when
    /// there is one), whatever the key source; nothing is sent. Without it a run after a
    /// success is a new run of the operation (with a random key, or none, a new resource). To
    /// run it anew, [forget](crate::journal::KeyStore::forget) it. `idem post` runs every
    /// command once.
    pub fn once(mut self) -> Self {
        self.once = true;
        self
    }

    /// Any key source.
    pub fn key_source(mut self, source: KeySource) -> Self {
        self.sources.push(source);
        self
    }

    /// The fields that identify the resource (e.g. `id`, `name`); each must be in the answer.
    pub fn identity<I, S>(mut self, fields: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.identity.extend(fields.into_iter().map(Into::into));
        self
    }

    /// Requires the answer's `field` to equal `value` (e.g. `app_id`), else
    /// [`OperationError::IdentityMismatch`].
    pub fn expect(mut self, field: impl Into<String>, value: impl Into<Value>) -> Self {
        self.expect.push((field.into(), value.into()));
        self
    }

    /// How to find out whether it took effect, when that is unknown.
    pub fn read_back(mut self, read_back: ReadBack) -> Self {
        self.read_back = Some(read_back);
        self
    }

    /// This server's key retention, for this operation.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// A retry policy for this operation's request.
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// At most this long for the request, retries included (see [`RequestOptions::deadline`](crate::RequestOptions::deadline)).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// After the create answers, waits for the resource to be ready: follows a long-running
    /// operation the answer starts (a 202, an operation resource, an action) and polls the
    /// resource until `wait`'s target state. The [`Handle`](crate::wait::Handle) is journaled the moment the create
    /// answers, before the wait begins, with the identity known so far: a crash, a timeout or
    /// a failure state during the wait leaves the resource tracked, and a re-run resumes the
    /// wait ([`Resolution::Resumed`](super::Resolution::Resumed)) instead of creating again.
    pub fn wait(mut self, wait: WaitFor) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Runs the operation, and the [wait](Self::wait) if there is one.
    ///
    /// # Errors
    ///
    /// [`OperationError`]; its [`may_have_been_applied`](OperationError::may_have_been_applied)
    /// says whether the operation may have taken effect.
    pub async fn send(self) -> Result<Completed, OperationError> {
        self.start().await?.wait().await
    }

    /// Runs the operation up to the create's answer (or an earlier run's): the identity and
    /// the handle to wait on are journaled, and the caller can record them too (a provider's
    /// state, a log) before [`Started::wait`] waits.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send), without the wait's.
    pub async fn start(self) -> Result<Started<'a>, OperationError> {
        let span = tracing::info_span!("operation", name = %self.name, key = tracing::field::Empty, outcome = tracing::field::Empty);
        match self.run().instrument(span.clone()).await {
            Ok(Ran { done, claim, binding }) => Ok(Started { op: self, completed: done, claim, binding, span }),
            Err(e) => {
                report(&span, Err(&e));
                Err(e)
            }
        }
    }

    pub(super) fn invalid(&self, reason: impl Into<String>) -> OperationError {
        OperationError::InvalidOptions { operation: self.name.clone(), reason: reason.into() }
    }
}

/// An operation whose create has answered (or an earlier run's had): what it created is
/// journaled, and so is where to wait for it.
#[derive(Debug)]
#[must_use = "the wait happens in `wait`"]
pub struct Started<'a> {
    op: OperationBuilder<'a>,
    completed: Completed,
    claim: Option<Claim>,
    binding: Option<Binding>,
    span: tracing::Span,
}

impl Started<'_> {
    /// What the create answered: the resource, its identity as known so far, and the
    /// [`handle`](Completed::handle) the wait will poll (`None` when there is nothing to wait
    /// for).
    pub fn created(&self) -> &Completed {
        &self.completed
    }

    /// Waits until the resource is ready, as the operation's [`WaitFor`] says; at once when
    /// there is nothing to wait for.
    ///
    /// # Errors
    ///
    /// [`OperationError::Wait`] when the wait ends without the resource ready (it stays
    /// tracked: a re-run resumes the wait); [`OperationError::IdentityMismatch`] when the ready
    /// resource is not the one asked for; [`OperationError::Unrecorded`] when the journal fails.
    pub async fn wait(self) -> Result<Completed, OperationError> {
        let Started { op, completed, claim, binding, span } = self;
        let result = op.wait_until_ready(completed, claim, binding).instrument(span.clone()).await;
        report(&span, result.as_ref());
        result
    }
}

/// Records how the operation ended on its span and in the metrics.
fn report(span: &tracing::Span, result: Result<&Completed, &OperationError>) {
    let outcome = match result {
        Ok(done) if done.handle.is_some() => "waiting",
        Ok(done) => done.resolution.as_str(),
        Err(OperationError::Wait(_)) => "wait_failed",
        Err(e) if e.may_have_been_applied() => "unknown",
        Err(_) => "not_applied",
    };
    span.record("outcome", outcome);
    crate::telemetry::operation(outcome);
}
