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
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use reqwest_middleware::ClientWithMiddleware;
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::Error;
use crate::git::{GitKeyMode, key_from_git};
use crate::journal::{Begun, Finish, Intent, JournalError, KeyPlan, KeyStore, OpState, PayloadMismatch, fingerprint};
use crate::key::IdempotencyKey;
use crate::options::RequestOptions;
use crate::outcome::RetryOutcome;
use crate::policy::RetryPolicy;
use crate::time::{Clock, SystemClock};

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

/// What happened. The three are the whole set: match them exhaustively.
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
    #[error("journal error, nothing was sent")]
    Journal(#[source] JournalError),
    /// The key is pinned to another payload. Nothing was sent.
    #[error(transparent)]
    PayloadMismatch(Box<PayloadMismatch>),
    /// The server answered with a final refusal. Not applied.
    #[error("operation `{operation}` was refused with {status}")]
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
            | OperationError::ReadBack { .. } => true,
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
    fn error(operation: &str, field: &str, expected: Value, found: Value, resource: Value) -> OperationError {
        OperationError::IdentityMismatch(Box::new(Self {
            operation: operation.to_owned(),
            field: field.to_owned(),
            expected,
            found,
            resource,
        }))
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

    /// The key store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
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
        let (plan, mut no_key_reason) = match self.sources.first().cloned().unwrap_or(KeySource::Random) {
            KeySource::Random => (KeyPlan::Random, None),
            KeySource::Derived { generation } => (KeyPlan::Fixed(self.ops.derived_key(&self.name, generation)), None),
            KeySource::Explicit(key) => (KeyPlan::Fixed(key), None),
            KeySource::Git { dir, mode } => match key_from_git(&dir, mode) {
                Ok(key) => (KeyPlan::Fixed(key), None),
                Err(why) => {
                    tracing::warn!(operation = %self.name, "no idempotency key from git: {why}");
                    (KeyPlan::None, Some(why.to_string()))
                }
            },
            KeySource::None => (KeyPlan::None, None),
        };
        let fp = fingerprint(self.method.as_str(), &url, &self.body);

        // The key is on record before anything is sent.
        let mut begun = self.begin(&url, &fp, plan.clone()).await?;
        tracing::Span::current().record("key", begun.key.as_ref().map(IdempotencyKey::fingerprint));

        // A previous run without a key may have taken effect: read back before sending again.
        if let Some(previous) = begun.unsettled.take() {
            let Some(read_back) = &self.read_back else {
                return Err(OperationError::Unknown {
                    operation: self.name.clone(),
                    key: None,
                    reason: format!(
                        "a previous run ({}, {}) may have taken effect and there is no read-back to find out; attach one, or forget the operation once checked",
                        previous.state,
                        crate::time::rfc3339(previous.updated_at)
                    ),
                });
            };
            if let Some(found) = self.lookup(read_back).await? {
                return self.recovered(found, &begun, no_key_reason).await;
            }
        }

        // A key the server may have forgotten is not resent.
        let retention = self.retention.unwrap_or(self.ops.retention);
        let margin = self.ops.margin.unwrap_or(retention / 10);
        let age = self.ops.clock.now().duration_since(begun.key_created_at).unwrap_or_default();
        if begun.resumed && age >= retention.saturating_sub(margin) {
            let Some(read_back) = &self.read_back else {
                self.finish(OpState::Unknown, None, None).await?;
                return Err(OperationError::Unknown {
                    operation: self.name.clone(),
                    key: begun.key.clone(),
                    reason: format!(
                        "the key was recorded {}s ago, past the server's retention ({}s) less the margin; the server may have forgotten it, so it is not resent. Attach a read-back",
                        age.as_secs(),
                        retention.as_secs()
                    ),
                });
            };
            if let Some(found) = self.lookup(read_back).await? {
                return self.recovered(found, &begun, no_key_reason).await;
            }
            // Not there: nothing was created; a fresh create is safe, with a fresh key if the
            // key was random.
            if plan == KeyPlan::Random {
                self.finish(OpState::Failed, None, None).await?;
                begun = self.begin(&url, &fp, KeyPlan::Random).await?;
            }
        }

        // Send; if the outcome is unknown, read back; if not found, send once more.
        let mut retried_after_read_back = false;
        loop {
            let result = self.send_once(&url, begun.key.as_ref()).await;
            let error = match result {
                Ok(response) => return self.answered(response, &begun, no_key_reason.take()).await,
                Err(error) => error,
            };
            if let Some(why) = never_sent(&error) {
                // It could not be sent at all: nothing to settle.
                self.finish(OpState::Failed, None, None).await?;
                return Err(self.invalid(why));
            }
            let may_have_been_applied = Error::find(&error).is_none_or(Error::may_have_been_applied);
            if !may_have_been_applied {
                self.finish(OpState::Failed, error.status().map(|s| s.as_u16()), None).await?;
                return Err(self.failed(error, &begun, false));
            }
            let Some(read_back) = self.read_back.clone().filter(|_| !retried_after_read_back) else {
                self.finish(OpState::Unknown, None, None).await?;
                return Err(self.failed(error, &begun, true));
            };
            if let Some(found) = self.lookup(&read_back).await? {
                return self.recovered(found, &begun, no_key_reason).await;
            }
            retried_after_read_back = true;
            tracing::info!(operation = %self.name, "not found by reading back: sending again");
        }
    }

    async fn begin(&self, url: &str, fp: &str, plan: KeyPlan) -> Result<Begun, OperationError> {
        let now = self.ops.clock.now();
        let method = self.method.as_str();
        let result = if self.ops.store.is_blocking() {
            let store = self.ops.store.clone();
            let (operation, method, url, fp) = (self.name.clone(), method.to_owned(), url.to_owned(), fp.to_owned());
            tokio::task::spawn_blocking(move || {
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
            .map_err(|e| {
                OperationError::Journal(JournalError::Other { path: "(journal)".into(), reason: e.to_string() })
            })?
        } else {
            self.ops.store.begin(&Intent { operation: &self.name, method, url, fingerprint: fp, key: plan, now })
        };
        result.map_err(OperationError::journal)
    }

    async fn finish(&self, state: OpState, status: Option<u16>, identity: Option<Value>) -> Result<(), OperationError> {
        let finish = Finish::new(state, status, identity, self.ops.clock.now());
        let result = if self.ops.store.is_blocking() {
            let (store, operation) = (self.ops.store.clone(), self.name.clone());
            tokio::task::spawn_blocking(move || store.finish(&operation, &finish)).await.map_err(|e| {
                OperationError::Journal(JournalError::Other { path: "(journal)".into(), reason: e.to_string() })
            })?
        } else {
            self.ops.store.finish(&self.name, &finish)
        };
        result.map_err(OperationError::journal)
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

    fn failed(&self, source: reqwest_middleware::Error, begun: &Begun, may_have_been_applied: bool) -> OperationError {
        OperationError::Failed { operation: self.name.clone(), key: begun.key.clone(), may_have_been_applied, source }
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
        begun: &Begun,
        no_key_reason: Option<String>,
    ) -> Result<Completed, OperationError> {
        let Some(record) = RetryOutcome::of(&response).cloned() else {
            self.finish(OpState::Unknown, Some(response.status().as_u16()), None).await?;
            return Err(self.invalid(
                "the client has no IdempotentRetry layer, so the request went out without its key; build it with Operations::with_layer",
            ));
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => {
                self.finish(OpState::Unknown, Some(status.as_u16()), None).await?;
                return Err(self.failed(e.into(), begun, true));
            }
        };
        if !record.succeeded {
            self.finish(OpState::Failed, Some(status.as_u16()), None).await?;
            return Err(OperationError::Rejected {
                operation: self.name.clone(),
                status,
                body,
                attempts: record.attempts,
                key: begun.key.clone(),
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
                self.finish(OpState::Succeeded, Some(status.as_u16()), Some(resource.clone())).await?;
                let found = fresh.get("id").cloned().unwrap_or(Value::Null);
                return Err(IdentityMismatch::error(&self.name, "id", expected, found, fresh));
            }
            resource = fresh;
        }
        let identity = self.identity_of(&resource);
        let stored = identity.as_ref().ok().map(|i| serde_json::to_value(i).expect("a map of JSON values"));
        self.finish(OpState::Succeeded, Some(status.as_u16()), stored).await?;
        tracing::Span::current().record("outcome", if record.replayed { "replayed" } else { "created" });
        Ok(Completed {
            outcome,
            status: Some(status),
            resource,
            body,
            identity: identity?,
            key: begun.key.clone(),
            resumed: begun.resumed,
            attempts: record.attempts,
            no_key_reason,
        })
    }

    async fn recovered(
        &self,
        found: Value,
        begun: &Begun,
        no_key_reason: Option<String>,
    ) -> Result<Completed, OperationError> {
        let identity = self.identity_of(&found);
        let stored = identity.as_ref().ok().map(|i| serde_json::to_value(i).expect("a map of JSON values"));
        self.finish(OpState::Succeeded, None, stored).await?;
        tracing::Span::current().record("outcome", "recovered");
        Ok(Completed {
            outcome: Outcome::Recovered,
            status: None,
            resource: found,
            body: Bytes::new(),
            identity: identity?,
            key: begun.key.clone(),
            resumed: begun.resumed,
            attempts: 0,
            no_key_reason,
        })
    }
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
