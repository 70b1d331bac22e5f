//! Logical operations: name a write, send it, learn what happened.
//!
//! ```
//! # async fn run(ops: idempotent_retry::Operations) -> Result<(), idempotent_retry::OperationError> {
//! use idempotent_retry::{Outcome, ReadBack};
//!
//! let done = ops
//!     .operation("create-cvm/web-1")
//!     .post("https://cloud.example/cvms")
//!     .json(&serde_json::json!({"name": "web-1"}))
//!     .read_back(ReadBack::find_in_list("https://cloud.example/cvms", "name", "web-1"))
//!     .send()
//!     .await?;
//! match done.outcome {
//!     Outcome::Created => println!("created {}", done.identity["id"]),
//!     Outcome::Replayed => println!("it was created earlier: {}", done.identity["id"]),
//!     Outcome::Recovered => println!("found by reading back: {}", done.identity["id"]),
//!     Outcome::Recorded => println!("done long ago, by the journal: {}", done.identity["id"]),
//! }
//! # Ok(()) }
//! ```
//!
//! The key is chosen by the [`KeyStore`] and is on record before the first byte is sent (see
//! the table on [`KeyStore`]). Unknown outcomes — a keyless endpoint whose response was lost, a
//! key older than the server keeps keys, retries exhausted after the request may have arrived —
//! are settled by the [read-back](ReadBack), never by a blind resend.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use reqwest_middleware::ClientWithMiddleware;
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::Error;
use crate::git::{GitKeyMode, key_from_git};
use crate::journal::{
    Begun, Claim, Finish, Intent, JournalError, KeyPlan, KeyStore, OpState, PayloadMismatch, Record, fingerprint,
};
use crate::key::IdempotencyKey;
use crate::options::RequestOptions;
use crate::outcome::RetryOutcome;
use crate::policy::RetryPolicy;
use crate::time::{Clock, Sleeper, SystemClock, TokioSleeper};

/// An error from a read-back lookup.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Lookup =
    dyn Fn(ClientWithMiddleware) -> Pin<Box<dyn Future<Output = Result<Option<Value>, BoxError>> + Send>> + Send + Sync;

/// How to find out whether an operation took effect: a lookup that returns the resource, if it
/// exists.
///
/// It runs when an outcome is unknown. It must see what the create did: look an item up by a
/// name or id the create chose, on a read that does not lag (or use the reconcile engine, which
/// tolerates lag).
///
/// ```
/// use idempotent_retry::ReadBack;
///
/// // The common case: list the collection and find the item by the name the create gave it.
/// let by_name = ReadBack::find_in_list("https://cloud.example/cvms", "name", "web-1");
///
/// // Anything else: an async function of the client.
/// let by_id = ReadBack::new(|client: reqwest_middleware::ClientWithMiddleware| async move {
///     let response = client.get("https://cloud.example/cvms/by-name/web-1").send().await?;
///     if response.status() == 404 {
///         return Ok(None);
///     }
///     Ok(Some(serde_json::from_slice(&response.bytes().await?)?))
/// });
/// # let _ = (by_name, by_id);
/// ```
#[derive(Clone)]
pub struct ReadBack(Arc<Lookup>);

impl ReadBack {
    /// A lookup from an async function of the client.
    pub fn new<F, Fut>(lookup: F) -> Self
    where
        F: Fn(ClientWithMiddleware) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<Value>, BoxError>> + Send + 'static,
    {
        Self(Arc::new(move |client| Box::pin(lookup(client))))
    }

    /// `GET list_url` and find the item whose `field` equals `value`. The items are the
    /// top-level array, or the array under `items` or `data`.
    pub fn find_in_list(list_url: impl Into<String>, field: impl Into<String>, value: impl Into<Value>) -> Self {
        let (url, field, value) = (list_url.into(), field.into(), value.into());
        Self::new(move |client: ClientWithMiddleware| {
            let (url, field, value) = (url.clone(), field.clone(), value.clone());
            async move {
                let request = client.get(&url).with_extension(RequestOptions::new().buffer_body());
                let response = request.send().await?.error_for_status()?;
                let list: Value = serde_json::from_slice(&response.bytes().await?)?;
                Ok(items(&list).and_then(|items| items.iter().find(|item| item.get(&field) == Some(&value)).cloned()))
            }
        })
    }

    async fn run(&self, client: &ClientWithMiddleware) -> Result<Option<Value>, BoxError> {
        (self.0)(client.clone()).await
    }
}

impl std::fmt::Debug for ReadBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadBack(..)")
    }
}

/// The items of a list response: the top-level array, or the array under `items` or `data`.
pub fn items(list: &Value) -> Option<&Vec<Value>> {
    list.as_array()
        .or_else(|| list.get("items").and_then(Value::as_array))
        .or_else(|| list.get("data").and_then(Value::as_array))
}

/// What happened. The four are the whole set: match them exhaustively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The server created it now.
    Created,
    /// The server returned the original: it had been created before (a lost response, a
    /// re-run, a concurrent run).
    Replayed,
    /// Found by reading back.
    Recovered,
    /// The journal says this key succeeded, longer ago than the server keeps keys, so nothing
    /// was sent (the server would have created anew): the identity is the journal's.
    Recorded,
}

/// A finished operation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Completed {
    /// What happened.
    pub outcome: Outcome,
    /// The final status (`None` when recovered by reading back).
    pub status: Option<StatusCode>,
    /// The resource: the response body as JSON (`Null` if it was not JSON), or what the
    /// read-back found. After a replay with a read-back attached, the read-back's fresher copy.
    pub resource: Value,
    /// The response body as received (empty when recovered by reading back).
    pub body: Bytes,
    /// The identity fields declared (and `id` when present), as the server returned them.
    pub identity: BTreeMap<String, Value>,
    /// The key sent.
    pub key: Option<IdempotencyKey>,
    /// The key came from the journal: a previous run's.
    pub resumed: bool,
    /// Attempts of the last request.
    pub attempts: u32,
    /// Why no key was sent, when a key source found none (e.g. a dirty git tree).
    pub no_key_reason: Option<String>,
}

/// Why an operation did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperationError {
    /// Conflicting or missing settings. Nothing was sent.
    #[error("invalid operation `{operation}`, nothing was sent: {reason}")]
    InvalidOptions {
        /// The operation.
        operation: String,
        /// What is wrong.
        reason: String,
    },
    /// The journal could not be used. Nothing was sent.
    #[error("journal error, nothing was sent: {0}")]
    Journal(#[source] JournalError),
    /// The request was sent, but the journal could not record how it ended. The record stays as
    /// it was (pending: a re-run resumes the key).
    #[error("operation `{operation}` was sent, but the journal could not record how it ended: {source}")]
    Unrecorded {
        /// The operation.
        operation: String,
        /// The key sent, if any.
        key: Option<IdempotencyKey>,
        /// What the journal said.
        #[source]
        source: JournalError,
    },
    /// The key is pinned to another payload. Nothing was sent.
    #[error(transparent)]
    PayloadMismatch(Box<PayloadMismatch>),
    /// The server answered with a final refusal. Not applied.
    #[error("operation `{operation}` was refused with {status}{}", if *.key_reuse { ": the server says the key was used before with another payload, so this key can never be sent with this payload" } else { "" })]
    Rejected {
        /// The operation.
        operation: String,
        /// The status.
        status: StatusCode,
        /// The response body.
        body: Bytes,
        /// Attempts made.
        attempts: u32,
        /// The key sent, if any.
        key: Option<IdempotencyKey>,
        /// The refusal is the server's "key reused with another payload" (422, 417, a 409 that
        /// says so, Stripe's `idempotency_error`).
        key_reuse: bool,
    },
    /// The request failed (see [`Error`] inside the source for attempts and cause).
    #[error("operation `{operation}` failed{}", if *.may_have_been_applied { "; it may have been applied, and re-running it resumes its key" } else { "; it was not applied" })]
    Failed {
        /// The operation.
        operation: String,
        /// The key sent.
        key: Option<IdempotencyKey>,
        /// Whether it may have taken effect.
        may_have_been_applied: bool,
        /// The request error.
        #[source]
        source: reqwest_middleware::Error,
    },
    /// It may have taken effect, and nothing could settle it.
    #[error("operation `{operation}`: outcome unknown: {reason}")]
    Unknown {
        /// The operation.
        operation: String,
        /// The key sent, if any.
        key: Option<IdempotencyKey>,
        /// Why it is unknown and what would settle it.
        reason: String,
    },
    /// The server returned a resource that is not the one asked for.
    #[error(transparent)]
    IdentityMismatch(Box<IdentityMismatch>),
    /// The operation succeeded earlier (the journal recorded it, longer ago than the server
    /// keeps keys), and the read-back no longer finds what it created: it was deleted since.
    /// Nothing was sent. A new resource is a new operation: bump the generation of a derived
    /// key, use a new key, or forget the operation.
    #[error(
        "operation `{operation}` succeeded earlier ({identity}), and the read-back no longer finds it; nothing was sent. A new resource is a new operation: bump the generation, use another key, or forget the operation"
    )]
    Gone {
        /// The operation.
        operation: String,
        /// The identity the journal recorded.
        identity: Value,
    },
    /// The read-back lookup failed.
    #[error("operation `{operation}`: the read-back failed")]
    ReadBack {
        /// The operation.
        operation: String,
        /// The lookup's error.
        #[source]
        source: BoxError,
    },
}

impl OperationError {
    /// Whether the operation may have taken effect.
    pub fn may_have_been_applied(&self) -> bool {
        match self {
            OperationError::Failed { may_have_been_applied, .. } => *may_have_been_applied,
            OperationError::Unknown { .. }
            | OperationError::IdentityMismatch { .. }
            | OperationError::ReadBack { .. }
            | OperationError::Unrecorded { .. } => true,
            _ => false,
        }
    }

    /// Whether the key was refused as pinned to another payload, before sending.
    pub fn is_payload_mismatch(&self) -> bool {
        matches!(self, OperationError::PayloadMismatch(_))
    }

    /// The key the operation was sent with, if known.
    pub fn idempotency_key(&self) -> Option<&IdempotencyKey> {
        match self {
            OperationError::Failed { key, .. }
            | OperationError::Unknown { key, .. }
            | OperationError::Unrecorded { key, .. }
            | OperationError::Rejected { key, .. } => key.as_ref(),
            _ => None,
        }
    }

    fn journal(e: JournalError) -> Self {
        match e {
            JournalError::PayloadMismatch(m) => OperationError::PayloadMismatch(m),
            other => OperationError::Journal(other),
        }
    }
}

/// The server returned a resource that is not the one asked for.
#[derive(Debug, thiserror::Error)]
#[error("operation `{operation}`: the server returned {field} = {found}, expected {expected}")]
#[non_exhaustive]
pub struct IdentityMismatch {
    /// The operation.
    pub operation: String,
    /// The field.
    pub field: String,
    /// The expected value.
    pub expected: Value,
    /// What the server returned (`null` if absent).
    pub found: Value,
    /// The whole resource.
    pub resource: Value,
}

impl IdentityMismatch {
    pub(crate) fn new(operation: &str, field: &str, expected: Value, found: Value, resource: Value) -> Self {
        Self { operation: operation.to_owned(), field: field.to_owned(), expected, found, resource }
    }

    fn error(operation: &str, field: &str, expected: Value, found: Value, resource: Value) -> OperationError {
        OperationError::IdentityMismatch(Box::new(Self::new(operation, field, expected, found, resource)))
    }
}

/// Where an operation's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// A random key, journaled: a re-run of an unfinished operation resumes it.
    Random,
    /// UUIDv5 of the namespace, the caller's scope, the operation's name and a generation.
    Derived {
        /// Bump to make the same name a new operation (e.g. a later scale-up after a scale-down).
        generation: u64,
    },
    /// This key.
    Explicit(IdempotencyKey),
    /// The clean HEAD of a git working tree; none for a dirty tree or outside a repository.
    Git {
        /// The working tree.
        dir: PathBuf,
        /// What to do with a dirty tree.
        mode: GitKeyMode,
    },
    /// No key.
    None,
}

/// Runs logical operations through a client and a [`KeyStore`].
///
/// The client must include the [`IdempotentRetry`](crate::IdempotentRetry) layer: keys travel to
/// it as [`RequestOptions`]. Use [`Operations::with_layer`] to build one that does.
///
/// ```
/// use idempotent_retry::{IdempotentRetry, Operations, Outcome};
/// use idempotent_retry::testing::{FakeCloud, ServerProfile};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let cloud = FakeCloud::start(ServerProfile::stripe()).await;
/// # let api = cloud.uri();
/// // In production: SqliteJournal::open_default()? keeps keys across runs.
/// let ops = Operations::with_layer(reqwest::Client::new(), IdempotentRetry::new(), idempotent_retry::MemoryStore::new())
///     .scope("tenant-42");
/// let create = || ops.operation("create-cvm/web-1").post(format!("{api}/cvms")).json(&serde_json::json!({"name": "web-1"}));
///
/// let first = create().derived_key(1).send().await?;
/// let again = create().derived_key(1).send().await?; // a re-run: same key, the server replays
/// assert_eq!((first.outcome, again.outcome), (Outcome::Created, Outcome::Replayed));
/// assert_eq!(first.identity["id"], again.identity["id"]);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Operations {
    client: ClientWithMiddleware,
    store: Arc<dyn KeyStore>,
    scope: String,
    namespace: Uuid,
    retention: Duration,
    margin: Option<Duration>,
    clock: Arc<dyn Clock>,
    sleeper: Arc<dyn Sleeper>,
    in_flight_window: Duration,
}

impl std::fmt::Debug for Operations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operations")
            .field("store", &self.store)
            .field("scope", &self.scope)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Operations {
    /// How long a request may still be on its way after its client gave up on it, unless told
    /// otherwise: 60 seconds (the usual proxy and load-balancer timeout).
    pub const DEFAULT_IN_FLIGHT_WINDOW: Duration = Duration::from_secs(60);

    /// A server's key retention unless told otherwise: 24 hours (Stripe's minimum; the IETF
    /// draft asks servers to publish theirs).
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

    /// Operations through `client` (which must include the `IdempotentRetry` layer), with keys
    /// in `store`.
    pub fn new(client: ClientWithMiddleware, store: impl KeyStore + 'static) -> Self {
        Self::with_store(client, Arc::new(store))
    }

    /// Like [`new`](Self::new), with a shared store.
    pub fn with_store(client: ClientWithMiddleware, store: Arc<dyn KeyStore>) -> Self {
        Self {
            client,
            store,
            scope: String::new(),
            namespace: IdempotencyKey::NAMESPACE,
            retention: Self::DEFAULT_RETENTION,
            margin: None,
            clock: Arc::new(SystemClock),
            sleeper: Arc::new(TokioSleeper),
            in_flight_window: Self::DEFAULT_IN_FLIGHT_WINDOW,
        }
    }

    /// Operations through a client built from `client` and `layer`.
    pub fn with_layer(client: reqwest::Client, layer: crate::IdempotentRetry, store: impl KeyStore + 'static) -> Self {
        Self::new(reqwest_middleware::ClientBuilder::new(client).with(layer).build(), store)
    }

    /// The caller's scope (account, tenant, project) for derived keys. It must be part of every
    /// derived key: two tenants deriving a key for `create-cvm/web-1` on a server that does not
    /// scope keys would otherwise collide, and one would receive the other's resource.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }

    /// The namespace for derived keys (default [`IdempotencyKey::NAMESPACE`]).
    pub fn namespace(mut self, namespace: Uuid) -> Self {
        self.namespace = namespace;
        self
    }

    /// How long the server keeps keys (default 24 h). A pending key older than this, less the
    /// safety margin, is not resent: the server may have forgotten it and would create anew.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The safety margin under the retention (default: a tenth of it).
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.margin = Some(margin);
        self
    }

    /// The clock for journal times and key ages (default the system clock).
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The sleeper for waiting out the in-flight window (default tokio's timer).
    pub fn sleeper(mut self, sleeper: impl Sleeper + 'static) -> Self {
        self.sleeper = Arc::new(sleeper);
        self
    }

    /// How long a request may still be on its way after its client gave up on it: queued at a
    /// proxy, retried by a load balancer (default
    /// [`DEFAULT_IN_FLIGHT_WINDOW`](Self::DEFAULT_IN_FLIGHT_WINDOW), 60 s).
    ///
    /// A read-back that finds nothing proves nothing while the request may still arrive: before
    /// one whose "not found" would lead to sending again (a keyless write), the operation waits
    /// until this long after the last send.
    pub fn in_flight_window(mut self, window: Duration) -> Self {
        self.in_flight_window = window;
        self
    }

    /// The key store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Calls the store: on tokio's blocking pool when it [may block](KeyStore::is_blocking),
    /// in place when it answers from memory.
    pub(crate) async fn journal<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn KeyStore) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        if !self.store.is_blocking() {
            return call(&*self.store);
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || call(&*store)).await.map_err(|e| JournalError::Other {
            path: "(journal)".into(),
            reason: format!("the journal call failed: {e}"),
        })?
    }

    /// The client.
    pub fn client(&self) -> &ClientWithMiddleware {
        &self.client
    }

    /// The derived key of operation `name` at `generation`, as [`KeySource::Derived`] computes it.
    pub fn derived_key(&self, name: &str, generation: u64) -> IdempotencyKey {
        IdempotencyKey::derive(&self.namespace, &self.scope, &[name, &generation.to_string()])
    }

    /// Starts describing operation `name`.
    pub fn operation(&self, name: impl Into<String>) -> OperationBuilder<'_> {
        OperationBuilder {
            ops: self,
            name: name.into(),
            sources: Vec::new(),
            method: Method::POST,
            url: None,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            invalid: None,
            identity: Vec::new(),
            expect: Vec::new(),
            read_back: None,
            retention: None,
            policy: None,
            deadline: None,
        }
    }
}

/// Describes one operation; [`send`](Self::send) runs it.
#[derive(Debug)]
#[must_use = "an operation does nothing until sent"]
pub struct OperationBuilder<'a> {
    ops: &'a Operations,
    name: String,
    sources: Vec<KeySource>,
    method: Method,
    url: Option<String>,
    headers: HeaderMap,
    body: Bytes,
    invalid: Option<String>,
    identity: Vec<String>,
    expect: Vec<(String, Value)>,
    read_back: Option<ReadBack>,
    retention: Option<Duration>,
    policy: Option<RetryPolicy>,
    deadline: Option<Duration>,
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

    /// At most this long for the request, retries included (see [`RequestOptions::deadline`]).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Runs the operation.
    ///
    /// # Errors
    ///
    /// [`OperationError`]; its [`may_have_been_applied`](OperationError::may_have_been_applied)
    /// says whether the operation may have taken effect.
    pub async fn send(self) -> Result<Completed, OperationError> {
        let span = tracing::info_span!("operation", name = %self.name, key = tracing::field::Empty, outcome = tracing::field::Empty);
        self.run().instrument(span).await
    }

    fn invalid(&self, reason: impl Into<String>) -> OperationError {
        OperationError::InvalidOptions { operation: self.name.clone(), reason: reason.into() }
    }

    async fn run(self) -> Result<Completed, OperationError> {
        let url = self.checked_url()?;
        let (plan, no_key_reason) = self.key_plan().await?;
        let fp = fingerprint(self.method.as_str(), &url, &self.body);
        let stored_url = crate::target::redact_str(&url);
        let run = match self.start(&stored_url, &fp, &plan, no_key_reason.clone()).await? {
            Start::Done(done) => return Ok(*done),
            Start::Send(run) => run,
        };
        tracing::Span::current().record("key", run.claim.key.as_ref().map(IdempotencyKey::fingerprint));
        self.send_until_settled(&url, run, no_key_reason).await
    }

    /// The URL, the options and the operation's own policy, checked before anything else.
    fn checked_url(&self) -> Result<String, OperationError> {
        if let Some(reason) = &self.invalid {
            return Err(self.invalid(reason.clone()));
        }
        let Some(url) = self.url.clone() else {
            return Err(self.invalid("no URL: call post(), patch(), put() or request()"));
        };
        crate::target::http_url(&url).map_err(|why| self.invalid(why))?;
        if let Some(policy) = &self.policy {
            policy.check().map_err(|why| self.invalid(why))?;
        }
        if self.sources.len() > 1 {
            return Err(self.invalid(format!("conflicting key sources: {:?}", self.sources)));
        }
        Ok(url)
    }

    /// How the key is chosen, and why there is none when a source found none. Git runs off the
    /// async thread.
    async fn key_plan(&self) -> Result<(KeyPlan, Option<String>), OperationError> {
        Ok(match self.sources.first().cloned().unwrap_or(KeySource::Random) {
            KeySource::Random => (KeyPlan::Random, None),
            KeySource::Derived { generation } => (KeyPlan::Fixed(self.ops.derived_key(&self.name, generation)), None),
            KeySource::Explicit(key) => (KeyPlan::Fixed(key), None),
            KeySource::Git { dir, mode } => {
                let found = tokio::task::spawn_blocking(move || key_from_git(&dir, mode))
                    .await
                    .map_err(|e| self.invalid(format!("reading the git key failed: {e}")))?;
                match found {
                    Ok(key) => (KeyPlan::Fixed(key), None),
                    Err(why) => {
                        tracing::warn!(operation = %self.name, "no idempotency key from git: {why}");
                        (KeyPlan::None, Some(why.to_string()))
                    }
                }
            }
            KeySource::None => (KeyPlan::None, None),
        })
    }

    /// Asks the journal what this run does, settling what stands in the way first: a previous
    /// run that may have taken effect, a key the server may have forgotten.
    async fn start(
        &self,
        url: &str,
        fp: &str,
        plan: &KeyPlan,
        no_key_reason: Option<String>,
    ) -> Result<Start, OperationError> {
        // Another process may change the record between two looks; a few rounds settle that.
        for _ in 0..4 {
            match self.begin(url, fp, plan.clone()).await? {
                Begun::Send { claim, resumed } => {
                    if !resumed || !self.past_retention(&claim) {
                        return Ok(Start::Send(Run { claim, resumed, resending_success: false }));
                    }
                    // The server may have forgotten the key: it is not resent blind.
                    let Some(read_back) = &self.read_back else {
                        self.finish(&claim, Finish::new(claim.clone(), OpState::Unknown, self.ops.clock.now())).await?;
                        return Err(self.unknown(claim.key.clone(), self.retention_reason(&claim)));
                    };
                    if let Some(found) = self.lookup(read_back).await? {
                        return self.recovered(found, &claim, no_key_reason).await.map(Start::done);
                    }
                    // Not there: nothing was created. A random key is renewed; a fixed one is
                    // sent again (the server no longer knows it).
                    if *plan != KeyPlan::Random {
                        return Ok(Start::Send(Run { claim, resumed, resending_success: false }));
                    }
                    self.settle_as_failed(&claim).await?;
                }
                Begun::Succeeded(record) => {
                    let claim = record.claim();
                    // A success the server answered under this key, which it still holds: it
                    // replays. One found by reading back (no status) may never have reached the
                    // server under this key: never sent blind.
                    if record.status.is_some() && !self.past_retention(&claim) {
                        return Ok(Start::Send(Run { claim, resumed: false, resending_success: true }));
                    }
                    return self.succeeded_earlier(record, no_key_reason).await.map(Start::done);
                }
                Begun::Unsettled(previous) => {
                    let claim = previous.claim();
                    let Some(read_back) = &self.read_back else {
                        return Err(self.unknown(
                            previous.key.clone(),
                            format!(
                                "a previous run ({}, {}, {}) may have taken effect, and this run cannot resume it; attach a read-back, or check the server and then forget the operation (`idem journal forget`, KeyStore::forget)",
                                previous.state,
                                previous.key.as_ref().map_or_else(|| "no key".to_owned(), |k| format!("key sha256:{}", k.fingerprint())),
                                crate::time::rfc3339(previous.updated_at)
                            ),
                        ));
                    };
                    // The previous run's request may still be on its way.
                    self.wait_in_flight(previous.updated_at).await;
                    if let Some(found) = self.lookup(read_back).await? {
                        let done = self.recovered(found, &claim, no_key_reason).await?;
                        // The previous run did this run's work: a fixed key remembers it, as a
                        // success it never sent (so it is never sent blind after).
                        if let KeyPlan::Fixed(_) = plan {
                            self.bind_recovery(url, fp, plan, &done).await?;
                        }
                        return Ok(Start::done(done));
                    }
                    // Not there: the previous run did not take effect. Settle it, then plan again.
                    self.settle_as_failed(&claim).await?;
                }
            }
        }
        Err(self
            .unknown(None, "the journal's record kept changing under this run (another process is running it?)".into()))
    }

    /// Records `done` (found by reading back, for a previous run) as the outcome of this run's
    /// fixed key, without a status: the key itself was never sent.
    ///
    /// A key pinned to another payload stays as it is (it is refused for this payload anyway):
    /// the previous run's outcome, found and recorded, is this run's answer either way.
    async fn bind_recovery(&self, url: &str, fp: &str, plan: &KeyPlan, done: &Completed) -> Result<(), OperationError> {
        let claim = match self.begin(url, fp, plan.clone()).await {
            Ok(Begun::Send { claim, .. }) => claim,
            Ok(_) | Err(OperationError::PayloadMismatch(_)) => return Ok(()),
            Err(OperationError::Journal(source)) => {
                return Err(OperationError::Unrecorded { operation: self.name.clone(), key: done.key.clone(), source });
            }
            Err(other) => return Err(other),
        };
        let identity = Some(self.identity_record(&done.resource));
        let finish = Finish::new(claim.clone(), OpState::Succeeded, self.ops.clock.now()).identity(identity);
        self.record(finish).await.map_err(OperationError::journal)
    }

    /// Sends; if the outcome is unknown, reads back; if not found, sends once more.
    async fn send_until_settled(
        &self,
        url: &str,
        run: Run,
        mut no_key_reason: Option<String>,
    ) -> Result<Completed, OperationError> {
        let mut read_back_done = false;
        loop {
            let error = match self.send_once(url, run.claim.key.as_ref()).await {
                Ok(response) => return self.answered(response, &run, no_key_reason.take()).await,
                Err(error) => error,
            };
            if run.resending_success {
                // The journal already knows it succeeded; a failed replay changes nothing there.
                return Err(self.failed(error, &run.claim, true));
            }
            if let Some(why) = never_sent(&error) {
                // It could not be sent at all: nothing to settle.
                self.settle_as_failed(&run.claim).await?;
                return Err(self.invalid(why));
            }
            if let Some(refusal) = self.key_refusal(&error, &run.claim).await? {
                return Err(refusal);
            }
            let may_have_been_applied = Error::find(&error).is_none_or(Error::may_have_been_applied);
            if !may_have_been_applied {
                let status = error.status().map(|s| s.as_u16());
                self.finish(
                    &run.claim,
                    Finish::new(run.claim.clone(), OpState::Failed, self.ops.clock.now()).status(status),
                )
                .await?;
                return Err(self.failed(error, &run.claim, false));
            }
            let failed_at = self.ops.clock.now();
            let Some(read_back) = self.read_back.as_ref().filter(|_| !read_back_done) else {
                self.finish(&run.claim, Finish::new(run.claim.clone(), OpState::Unknown, failed_at)).await?;
                return Err(self.failed(error, &run.claim, true));
            };
            if run.claim.key.is_none() {
                // Without a key, "not found" must also mean "not on its way": wait that out.
                self.wait_in_flight(failed_at).await;
            }
            if let Some(found) = self.lookup(read_back).await? {
                return self.recovered(found, &run.claim, no_key_reason).await;
            }
            read_back_done = true;
            tracing::info!(operation = %self.name, "not found by reading back: sending again");
        }
    }

    /// Waits until the in-flight window since `sent` has passed.
    async fn wait_in_flight(&self, sent: SystemTime) {
        let until = sent + self.ops.in_flight_window;
        if let Ok(left) = until.duration_since(self.ops.clock.now())
            && !left.is_zero()
        {
            tracing::info!(operation = %self.name, "waiting {left:?} for a request that may still be on its way before reading back");
            self.ops.sleeper.sleep(left).await;
        }
    }

    /// The server refused the key as used with another payload: a final refusal, with its body.
    async fn key_refusal(
        &self,
        error: &reqwest_middleware::Error,
        claim: &Claim,
    ) -> Result<Option<OperationError>, OperationError> {
        let Some(Error::KeyReuse(failure)) = Error::find(error) else { return Ok(None) };
        let crate::error::LastAttempt::Status { status, body, .. } = &failure.last else { return Ok(None) };
        let finish = Finish::new(claim.clone(), OpState::Failed, self.ops.clock.now()).status(Some(status.as_u16()));
        self.finish(claim, finish).await?;
        Ok(Some(OperationError::Rejected {
            operation: self.name.clone(),
            status: *status,
            body: body.clone(),
            attempts: failure.attempts,
            key: claim.key.clone(),
            key_reuse: true,
        }))
    }

    /// Whether the key's age is past the server's retention, less the margin.
    fn past_retention(&self, claim: &Claim) -> bool {
        let (retention, margin) = self.retention_and_margin();
        self.key_age(claim) >= retention.saturating_sub(margin)
    }

    fn retention_and_margin(&self) -> (Duration, Duration) {
        let retention = self.retention.unwrap_or(self.ops.retention);
        (retention, self.ops.margin.unwrap_or(retention / 10))
    }

    fn key_age(&self, claim: &Claim) -> Duration {
        self.ops.clock.now().duration_since(claim.created_at).unwrap_or_default()
    }

    fn retention_reason(&self, claim: &Claim) -> String {
        format!(
            "the key was recorded {}s ago, past the server's retention ({}s) less the margin; the server may have forgotten it, so it is not resent. Attach a read-back",
            self.key_age(claim).as_secs(),
            self.retention_and_margin().0.as_secs()
        )
    }

    /// A fixed key that succeeded, past the server's retention: the journal's record, refreshed
    /// by the read-back when there is one. Nothing is sent.
    async fn succeeded_earlier(
        &self,
        record: Record,
        no_key_reason: Option<String>,
    ) -> Result<Completed, OperationError> {
        let claim = record.claim();
        if let Some(read_back) = &self.read_back {
            return match self.lookup(read_back).await? {
                Some(found) => self.recovered(found, &claim, no_key_reason).await,
                None => Err(OperationError::Gone {
                    operation: self.name.clone(),
                    identity: record.identity.unwrap_or(Value::Null),
                }),
            };
        }
        tracing::Span::current().record("outcome", "recorded");
        let identity: BTreeMap<String, Value> = match &record.identity {
            Some(Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            _ => BTreeMap::new(),
        };
        Ok(Completed {
            outcome: Outcome::Recorded,
            status: record.status.and_then(|s| StatusCode::from_u16(s).ok()),
            resource: record.identity.clone().unwrap_or(Value::Null),
            body: Bytes::new(),
            identity,
            key: record.key,
            resumed: false,
            attempts: 0,
            no_key_reason,
        })
    }

    async fn begin(&self, url: &str, fp: &str, plan: KeyPlan) -> Result<Begun, OperationError> {
        let (operation, method, url, fp) =
            (self.name.clone(), self.method.as_str().to_owned(), url.to_owned(), fp.to_owned());
        let now = self.ops.clock.now();
        self.ops
            .journal(move |store| {
                store.begin(&Intent {
                    operation: &operation,
                    method: &method,
                    url: &url,
                    fingerprint: &fp,
                    key: plan,
                    now,
                })
            })
            .await
            .map_err(OperationError::journal)
    }

    /// Records how the run ended, once its request was sent.
    async fn finish(&self, claim: &Claim, finish: Finish) -> Result<(), OperationError> {
        self.record(finish).await.map_err(|source| OperationError::Unrecorded {
            operation: self.name.clone(),
            key: claim.key.clone(),
            source,
        })
    }

    /// Records that a run took no effect, before anything of this run was sent.
    async fn settle_as_failed(&self, claim: &Claim) -> Result<(), OperationError> {
        let finish = Finish::new(claim.clone(), OpState::Failed, self.ops.clock.now());
        self.record(finish).await.map_err(OperationError::journal)
    }

    /// `finish` as a compare-and-set: a newer run's record is left alone.
    async fn record(&self, finish: Finish) -> Result<(), JournalError> {
        let operation = self.name.clone();
        let applied = self.ops.journal(move |store| store.finish(&operation, &finish)).await?;
        if !applied {
            tracing::info!(operation = %self.name, "the journal's record moved on to a newer run: this run's outcome is not recorded over it");
        }
        Ok(())
    }

    fn unknown(&self, key: Option<IdempotencyKey>, reason: String) -> OperationError {
        OperationError::Unknown { operation: self.name.clone(), key, reason }
    }

    async fn send_once(
        &self,
        url: &str,
        key: Option<&IdempotencyKey>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        // The answer is read within the attempt: a body that stalls or is cut short is a lost
        // answer (retried with the key), and its size is bounded.
        let options = RequestOptions::new().buffer_body();
        let mut options = match key {
            Some(key) => options.key(key.clone()),
            None => options.no_key(),
        };
        if let Some(policy) = &self.policy {
            options = options.policy(policy.clone());
        }
        if let Some(deadline) = self.deadline {
            options = options.deadline(deadline);
        }
        self.ops
            .client
            .request(self.method.clone(), url)
            .headers(self.headers.clone())
            .body(self.body.clone())
            .with_extension(options)
            .send()
            .await
    }

    async fn lookup(&self, read_back: &ReadBack) -> Result<Option<Value>, OperationError> {
        read_back
            .run(&self.ops.client)
            .await
            .map_err(|source| OperationError::ReadBack { operation: self.name.clone(), source })
    }

    fn failed(&self, source: reqwest_middleware::Error, claim: &Claim, may_have_been_applied: bool) -> OperationError {
        OperationError::Failed { operation: self.name.clone(), key: claim.key.clone(), may_have_been_applied, source }
    }

    /// The identity fields of `resource` as the journal keeps them: `id` and the declared and
    /// expected fields, as found (`null` where missing), whether or not they match.
    fn identity_record(&self, resource: &Value) -> Value {
        let mut identity = serde_json::Map::new();
        let fields = std::iter::once("id").chain(self.identity.iter().map(String::as_str));
        for field in fields.chain(self.expect.iter().map(|(f, _)| f.as_str())) {
            if let Some(value) = resource.get(field) {
                identity.insert(field.to_owned(), value.clone());
            } else if field != "id" {
                identity.insert(field.to_owned(), Value::Null);
            }
        }
        Value::Object(identity)
    }

    /// Identity fields of `resource`, checked against the expectations.
    fn identity_of(&self, resource: &Value) -> Result<BTreeMap<String, Value>, OperationError> {
        let mut identity = BTreeMap::new();
        if let Some(id) = resource.get("id") {
            identity.insert("id".to_owned(), id.clone());
        }
        for field in &self.identity {
            let Some(value) = resource.get(field) else {
                let expected = Value::String("a value".into());
                return Err(IdentityMismatch::error(&self.name, field, expected, Value::Null, resource.clone()));
            };
            identity.insert(field.clone(), value.clone());
        }
        for (field, expected) in &self.expect {
            let found = resource.get(field).cloned().unwrap_or(Value::Null);
            if found != *expected {
                return Err(IdentityMismatch::error(&self.name, field, expected.clone(), found, resource.clone()));
            }
            identity.insert(field.clone(), found);
        }
        Ok(identity)
    }

    async fn answered(
        &self,
        response: reqwest::Response,
        run: &Run,
        no_key_reason: Option<String>,
    ) -> Result<Completed, OperationError> {
        let claim = &run.claim;
        let now = self.ops.clock.now();
        let Some(record) = RetryOutcome::of(&response).cloned() else {
            if !run.resending_success {
                let finish = Finish::new(claim.clone(), OpState::Unknown, now).status(Some(response.status().as_u16()));
                self.finish(claim, finish).await?;
            }
            return Err(self.invalid(
                "the client has no IdempotentRetry layer, so the request went out without its key; build it with Operations::with_layer",
            ));
        };
        let status = response.status();
        // In memory already: the layer read it within the attempt (`buffer_body`).
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => {
                if !run.resending_success {
                    self.finish(claim, Finish::new(claim.clone(), OpState::Unknown, now).status(Some(status.as_u16())))
                        .await?;
                }
                return Err(self.failed(e.into(), claim, true));
            }
        };
        if !record.succeeded {
            if !run.resending_success {
                self.finish(claim, Finish::new(claim.clone(), OpState::Failed, now).status(Some(status.as_u16())))
                    .await?;
            }
            return Err(OperationError::Rejected {
                operation: self.name.clone(),
                status,
                body,
                attempts: record.attempts,
                key: claim.key.clone(),
                key_reuse: false,
            });
        }
        let mut resource = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let outcome = if record.replayed { Outcome::Replayed } else { Outcome::Created };
        // A replay carries the state of its time: trust its identity, re-read the state.
        if outcome == Outcome::Replayed
            && let Some(read_back) = &self.read_back
            && let Some(fresh) = self.lookup(read_back).await?
        {
            if fresh.get("id").is_some() && fresh.get("id") != resource.get("id") {
                let expected = resource.get("id").cloned().unwrap_or(Value::Null);
                let finish = Finish::new(claim.clone(), OpState::Succeeded, now)
                    .status(Some(status.as_u16()))
                    .identity(Some(self.identity_record(&resource)));
                self.finish(claim, finish).await?;
                let found = fresh.get("id").cloned().unwrap_or(Value::Null);
                return Err(IdentityMismatch::error(&self.name, "id", expected, found, fresh));
            }
            resource = fresh;
        }
        // What was created is recorded, whether or not its identity is the one expected: it is
        // this operation's, and a re-run must not create another.
        let finish = Finish::new(claim.clone(), OpState::Succeeded, now)
            .status(Some(status.as_u16()))
            .identity(Some(self.identity_record(&resource)));
        self.finish(claim, finish).await?;
        let identity = self.identity_of(&resource)?;
        tracing::Span::current().record("outcome", if record.replayed { "replayed" } else { "created" });
        Ok(Completed {
            outcome,
            status: Some(status),
            resource,
            body,
            identity,
            key: claim.key.clone(),
            resumed: run.resumed,
            attempts: record.attempts,
            no_key_reason,
        })
    }

    async fn recovered(
        &self,
        found: Value,
        claim: &Claim,
        no_key_reason: Option<String>,
    ) -> Result<Completed, OperationError> {
        let finish = Finish::new(claim.clone(), OpState::Succeeded, self.ops.clock.now())
            .identity(Some(self.identity_record(&found)));
        self.finish(claim, finish).await?;
        let identity = self.identity_of(&found)?;
        tracing::Span::current().record("outcome", "recovered");
        Ok(Completed {
            outcome: Outcome::Recovered,
            status: None,
            resource: found,
            body: Bytes::new(),
            identity,
            key: claim.key.clone(),
            resumed: false,
            attempts: 0,
            no_key_reason,
        })
    }
}

/// What a run does once the journal has been asked.
enum Start {
    /// Nothing to send: settled by reading back, or by the journal's record.
    Done(Box<Completed>),
    /// Send, as this run.
    Send(Run),
}

impl Start {
    fn done(completed: Completed) -> Self {
        Start::Done(Box::new(completed))
    }
}

/// The run about to send.
struct Run {
    /// Its key and when that key was first recorded.
    claim: Claim,
    /// The key is a previous run's.
    resumed: bool,
    /// The key already succeeded (within the server's retention): the server replays, and the
    /// journal's record is refreshed only by a success.
    resending_success: bool,
}

/// Why a request could not be sent at all, if that is how it failed: the request could not be
/// built, or the layer refused it before the first attempt.
fn never_sent(error: &reqwest_middleware::Error) -> Option<String> {
    match error {
        reqwest_middleware::Error::Reqwest(e) if e.is_builder() => Some(e.to_string()),
        _ => match Error::find(error) {
            Some(e @ (Error::InvalidKey(_) | Error::InvalidRequest(_))) => Some(crate::error::chain(e)),
            _ => None,
        },
    }
}
