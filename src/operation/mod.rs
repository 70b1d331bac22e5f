//! Logical operations: name a write, send it, learn what happened.
//!
//! ```
//! # async fn run(ops: idempotent_retry::Operations) -> Result<(), idempotent_retry::operation::OperationError> {
//! use idempotent_retry::operation::{Resolution, ReadBack};
//!
//! let done = ops
//!     .operation("create-cvm/web-1")
//!     .post("https://cloud.example/cvms")
//!     .json(&serde_json::json!({"name": "web-1"}))
//!     .read_back(ReadBack::find_in_list("https://cloud.example/cvms", "name", "web-1"))
//!     .send()
//!     .await?;
//! match done.resolution {
//!     Resolution::Created => println!("created {}", done.identity["id"]),
//!     Resolution::Replayed => println!("it was created earlier: {}", done.identity["id"]),
//!     Resolution::Recovered => println!("found by reading back: {}", done.identity["id"]),
//!     Resolution::Recorded => println!("done long ago, by the journal: {}", done.identity["id"]),
//!     Resolution::Resumed => println!("an earlier run created it; it is ready now: {}", done.identity["id"]),
//! }
//! # Ok(()) }
//! ```
//!
//! The key is chosen by the [`KeyStore`] and is on record before the first byte is sent (see
//! the table on [`KeyStore`]). Unknown outcomes — a keyless endpoint whose response was lost, a
//! key older than the server keeps keys, retries exhausted after the request may have arrived —
//! are settled by the [read-back](ReadBack), never by a blind resend.

mod builder;
mod error;
mod git;
mod read_back;
mod run;
mod waiting;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use reqwest_middleware::ClientWithMiddleware;
use serde_json::Value;
use uuid::Uuid;

pub use crate::error::BoxError;
pub use crate::pagination::items;
pub use builder::{OperationBuilder, Started};
pub use error::{IdentityMismatch, OperationError, WaitFailed};
pub use git::{GitKeyMode, NoGitKey, key_from_git};
pub use read_back::ReadBack;

use crate::journal::KeyStore;
use crate::key::IdempotencyKey;
use crate::time::{Clock, Random, SeededRng, Sleeper, SystemClock, TokioSleeper};

/// How an operation was resolved: where the resource it names came from. The five are the
/// whole set: match them exhaustively. (How one *request* went, attempts and replays, is the
/// [`RetryOutcome`](crate::RetryOutcome) on its response.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// The server created it now, by its answer (which, for a key sent before, may be an
    /// unmarked replay: see [`Completed::may_be_replay`]).
    Created,
    /// The server returned the original: it had been created before (a lost response, a
    /// re-run, a concurrent run).
    Replayed,
    /// Found by reading back.
    Recovered,
    /// The journal says this key succeeded, longer ago than the server keeps keys, so nothing
    /// was sent (the server would have created anew): the identity is the journal's.
    Recorded,
    /// An earlier run created it and was waiting for it to be ready: this run resumed that wait
    /// at the journaled [`Handle`](crate::wait::Handle). Nothing was sent.
    Resumed,
}

impl Resolution {
    /// The lowercase name, as in traces and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Created => "created",
            Resolution::Replayed => "replayed",
            Resolution::Recovered => "recovered",
            Resolution::Recorded => "recorded",
            Resolution::Resumed => "resumed",
        }
    }
}

/// A finished operation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Completed {
    /// What happened.
    pub resolution: Resolution,
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
    /// The server's answer may be its replay of an earlier send of this key, not a new
    /// resource: the server marked a replay, or the key had been sent before (by an earlier
    /// run whose key this run resumed, or by an earlier attempt of this run that may have
    /// reached the server, or the journal knows it succeeded). Against a server that marks no
    /// replays (bencher's, the IETF draft's) the resolution then says [`Created`](Resolution::Created)
    /// for what may be the original. `false` when nothing was sent.
    pub may_be_replay: bool,
    /// The server's answer showed it read the key (see
    /// [`RetryOutcome::key_acknowledged`](crate::RetryOutcome::key_acknowledged)). `false`
    /// when nothing was sent.
    pub key_acknowledged: bool,
    /// Why no key was sent, when a key source found none (e.g. a dirty git tree).
    pub no_key_reason: Option<String>,
    /// Where the operation polls while it [waits](OperationBuilder::wait) for the resource to
    /// be ready; `None` once it is (or when it does not wait). Journaled before the wait begins.
    pub handle: Option<crate::wait::Handle>,
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
/// it as [`RequestOptions`](crate::RequestOptions). Use [`Operations::with_layer`] to build one that does.
///
/// ```
/// use idempotent_retry::{IdempotentRetry, Operations, operation::Resolution};
/// use idempotent_retry::testing::{FakeCloud, ServerProfile};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let cloud = FakeCloud::start(ServerProfile::stripe()).await;
/// # let api = cloud.uri();
/// // In production: SqliteJournal::open_default()? keeps keys across runs.
/// let ops = Operations::with_layer(reqwest::Client::new(), IdempotentRetry::new(), idempotent_retry::journal::MemoryStore::new())
///     .scope("tenant-42");
/// let create = || ops.operation("create-cvm/web-1").post(format!("{api}/cvms")).json(&serde_json::json!({"name": "web-1"}));
///
/// let first = create().derived_key(1).send().await?;
/// let again = create().derived_key(1).send().await?; // a re-run: same key, the server replays
/// assert_eq!((first.resolution, again.resolution), (Resolution::Created, Resolution::Replayed));
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
    rng: Arc<dyn Random>,
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
            rng: Arc::new(SeededRng::from_entropy()),
            in_flight_window: Self::DEFAULT_IN_FLIGHT_WINDOW,
        }
    }

    /// Operations through a client built from `client` and `layer`. Build `client` with
    /// `redirect(reqwest::redirect::Policy::none())`: the layer handles a write's redirects
    /// itself (see [`Error::Redirected`](crate::Error::Redirected)).
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

    /// The sleeper for waiting out the in-flight window and between polls (default tokio's
    /// timer).
    pub fn sleeper(mut self, sleeper: impl Sleeper + 'static) -> Self {
        self.sleeper = Arc::new(sleeper);
        self
    }

    /// The jitter source for the delays between polls (default seeded from the OS).
    pub fn rng(mut self, rng: impl Random + 'static) -> Self {
        self.rng = Arc::new(rng);
        self
    }

    /// A waiter on these operations' clock, sleeper and jitter source.
    pub fn waiter(&self) -> crate::wait::Waiter {
        crate::wait::Waiter::from_parts(self.clock.clone(), self.sleeper.clone(), self.rng.clone())
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
            wait: None,
            once: false,
        }
    }
}
