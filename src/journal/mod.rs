//! Durable keys: a journal that holds each operation's key from before its first send.
//!
//! Every retry library keeps its key in memory for one call; when the process dies, a re-run
//! mints a new key and the server creates a duplicate. A [`KeyStore`] keeps the key with the
//! *operation*: it is written (and, for [`SqliteJournal`], committed to disk; for
//! `PostgresJournal`, committed to a database every machine shares) before the request goes
//! out, so a crash, a re-run or a CI retry, on this machine or another, resumes with the same
//! key.
//!
//! The rules for choosing the key are on [`KeyStore`].
//!
//! # Which names you need
//!
//! - **Using a journal** (most callers): a store — [`SqliteJournal`], `PostgresJournal`
//!   (feature `postgres`) or [`MemoryStore`] — handed to
//!   [`Operations`](crate::Operations); [`Record`] and [`OpState`] to list what it holds;
//!   [`JournalError`] and [`PayloadMismatch`] when it refuses.
//! - **Writing a store** (keys kept elsewhere, e.g. in Terraform state): [`KeyStore`], and what
//!   its methods take and return, in [`store`]: [`store::Intent`] and its
//!   [`plan`](store::Intent::plan), [`store::Begun`], [`store::Finish`] and the
//!   rest, checked with `testing::check_key_store`. Nothing else needs them.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
mod postgres_tls;
#[cfg(feature = "journal")]
mod sqlite;
pub mod store;

pub use crate::target::redact_url;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{PostgresJournal, PostgresJournalBuilder};
#[cfg(feature = "journal")]
pub use sqlite::SqliteJournal;
// Their first home: code that names them there still builds. Documented in `store`.
#[doc(hidden)]
pub use store::{Begun, Claim, Finish, Intent, KeyPlan, Planned};

use crate::key::IdempotencyKey;
use crate::time::rfc3339;
use crate::wait::Handle;

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum OpState {
    /// The key is recorded; the request is about to be sent, is being sent, or the process died
    /// while sending it.
    Pending,
    /// The server created it (or replayed its creation), or a read-back found it.
    Succeeded,
    /// It certainly did not take effect: the server refused it, the request never left, or a
    /// read-back settled that it was not applied.
    #[serde(rename = "not_applied", alias = "failed")]
    NotApplied,
    /// It may have taken effect and nothing settled it.
    Unknown,
    /// The server created it, and the run waits for it to be ready: the record's
    /// [`handle`](Record::handle) says where to poll. Never sent again: a re-run resumes the
    /// wait.
    Waiting,
}

impl OpState {
    /// The lowercase name stored in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Pending => "pending",
            OpState::Succeeded => "succeeded",
            OpState::NotApplied => "not_applied",
            OpState::Unknown => "unknown",
            OpState::Waiting => "waiting",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => OpState::Pending,
            "succeeded" => OpState::Succeeded,
            // "failed" is how journals written before 0.2 say it.
            "not_applied" | "failed" => OpState::NotApplied,
            "unknown" => OpState::Unknown,
            "waiting" => OpState::Waiting,
            _ => return None,
        })
    }

    /// Whether a previous run may have taken effect without anything settling it.
    pub fn is_unsettled(self) -> bool {
        matches!(self, OpState::Pending | OpState::Unknown)
    }
}

impl fmt::Display for OpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the journal holds for one operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Record {
    /// The operation's name, e.g. `create-cvm/web-1`.
    pub operation: String,
    /// Its key (`None` for an operation sent without one).
    pub key: Option<IdempotencyKey>,
    /// HTTP method.
    pub method: String,
    /// Target URL.
    pub url: String,
    /// SHA-256 of method, URL and body ([`fingerprint`]), in hex. The body is the one sent,
    /// byte for byte, except for the key a body-field carrier adds to it.
    pub fingerprint: String,
    /// Where it stands.
    pub state: OpState,
    /// When the key was first recorded (the age that counts against a server's retention).
    #[serde(with = "unix_millis")]
    pub created_at: SystemTime,
    /// When the record last changed.
    #[serde(with = "unix_millis")]
    pub updated_at: SystemTime,
    /// The final HTTP status, if there was one.
    pub status: Option<u16>,
    /// The identity the server returned (e.g. `{"id": "…"}`), once known.
    pub identity: Option<serde_json::Value>,
    /// The key was the caller's (explicit, derived, from git) rather than minted: it may be sent
    /// again, so the journal remembers how it ended after later runs of the operation with
    /// other keys.
    #[serde(default)]
    pub fixed_key: bool,
    /// Where to poll while the operation is [waiting](OpState::Waiting) (as
    /// [stored](crate::wait::Handle::stored)).
    #[serde(default)]
    pub handle: Option<Handle>,
}

/// The payload fingerprint: SHA-256 of method, URL and body, in hex.
pub fn fingerprint(method: &str, url: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update(b"\n");
    hash.update(url.as_bytes());
    hash.update(b"\n");
    hash.update(body);
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Record {
    /// The claim of the run that wrote this record.
    pub fn claim(&self) -> Claim {
        Claim { key: self.key.clone(), created_at: self.created_at }
    }

    /// Whether `claim` is this record's (times compared to the millisecond, as stores keep them).
    pub fn is_claimed_by(&self, claim: &Claim) -> bool {
        self.key == claim.key && to_millis(self.created_at) == to_millis(claim.created_at)
    }
}

/// The journal refused to start an operation: the key is pinned to another payload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "operation `{operation}` would send key sha256:{key_fingerprint} with a different payload than operation `{earlier}` ({earlier_method} {earlier_url}, recorded {earlier_at}); nothing was sent. Use a new key (or a new generation), or forget the earlier operation"
)]
#[non_exhaustive]
pub struct PayloadMismatch {
    /// The operation being started.
    pub operation: String,
    /// The earlier operation that holds the key (may be the same name, with other content).
    pub earlier: String,
    /// The earlier request's method.
    pub earlier_method: String,
    /// The earlier request's URL.
    pub earlier_url: String,
    /// When the earlier request was recorded (RFC 3339).
    pub earlier_at: String,
    /// The key's fingerprint (never the key).
    pub key_fingerprint: String,
}

impl PayloadMismatch {
    pub(super) fn new(operation: &str, earlier: &Record, key: Option<&IdempotencyKey>) -> Self {
        Self {
            operation: operation.to_owned(),
            earlier: earlier.operation.clone(),
            earlier_method: earlier.method.clone(),
            earlier_url: earlier.url.clone(),
            earlier_at: rfc3339(earlier.created_at),
            key_fingerprint: key.map_or_else(|| "-".to_owned(), IdempotencyKey::fingerprint),
        }
    }
}

/// Why a journal could not be used. Never answered by falling back to keys in memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The file is not a journal: corrupt, or some other file.
    #[error(
        "the journal at {path} is not a valid SQLite database (corrupt?); move it aside or delete it to start a new one"
    )]
    Corrupt {
        /// The journal's path.
        path: String,
    },
    /// Another process held the journal locked for longer than the lock timeout.
    #[error("the journal at {path} stayed locked by another process for more than {waited:?}")]
    Locked {
        /// The journal's path.
        path: String,
        /// How long the journal waited.
        waited: Duration,
    },
    /// The journal cannot be written where it is.
    #[error("the journal at {path} cannot be written: {reason}")]
    ReadOnly {
        /// The journal's path.
        path: String,
        /// What the system said.
        reason: String,
    },
    /// There is no journal where one was to be opened (not created: see
    /// [`SqliteJournal::open_existing`](crate::journal::SqliteJournal::open_existing)).
    #[error("there is no journal at {path}")]
    Missing {
        /// The path looked at.
        path: String,
    },
    /// The key is pinned to another payload.
    #[error(transparent)]
    PayloadMismatch(Box<PayloadMismatch>),
    /// The store cannot be reached (a database down, refusing, or out of reach). Nothing was
    /// recorded.
    #[error("the journal at {path} cannot be reached: {reason}")]
    Unavailable {
        /// Where the store is (credentials hidden).
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Any other failure of the store.
    #[error("the journal at {path} failed: {reason}")]
    Other {
        /// The journal's path (or the store's name).
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Where operation keys are kept.
///
/// The rules for choosing the key live in one place, [`Intent::plan`], which every store applies
/// atomically:
///
/// | the journal holds for this operation | random key source | fixed key (explicit, derived, git) | no key |
/// |---|---|---|---|
/// | nothing | mint a key | the fixed key | – |
/// | pending or unknown, with a key, same payload | **resume its key** | resume it if it is the fixed key, else *unsettled* | *unsettled* |
/// | pending or unknown, with a key, other payload | refused | refused if it is the fixed key, else *unsettled* | *unsettled* |
/// | pending or unknown, without a key | *unsettled* | *unsettled* | *unsettled* |
/// | waiting (created, not yet ready) | *waiting*: resume the wait (same payload only) | *waiting* (same payload only) | *waiting* (same payload only) |
/// | succeeded | mint a new key (a new run) | a key this operation used: *succeeded* (or, if that run failed, the key again, same payload only); another key: a new run | a new run |
/// | succeeded, the operation happening [once](Intent::once), or the run this one waited for | *succeeded* (same payload only) | *succeeded* (same payload only) | *succeeded* (same payload only) |
/// | failed | mint a new key | as for succeeded | a new run |
///
/// *Unsettled*, *waiting* and *succeeded* write nothing: a record that may have taken effect survives any
/// re-run, whatever key source it names, until a read-back settles it (then
/// [`finish`](Self::finish) it) or it is [forgotten](Self::forget); a succeeded key is not sent
/// again blindly once the server may have forgotten it. "A key this operation used" includes
/// its *retired* records: a settled run with a fixed key that a later run with another key
/// replaced is kept (and still pins its key), so that key is never mistaken for a new one. For any fixed key, another operation
/// that used the key with another payload means the request is refused before sending, with an
/// error that names both.
///
/// [`finish`](Self::finish) is a compare-and-set on the run's [`Claim`]: a run that reports
/// late never overwrites the record of a newer run.
///
/// Implemented by [`MemoryStore`], [`SqliteJournal`] and `PostgresJournal`; implement it to keep
/// keys elsewhere, e.g. in Terraform state, and check the implementation with
/// `testing::check_key_store` (feature `test-util`). [`begin`](Self::begin) must be atomic
/// with respect to other processes using the same store, and durable before it returns: the
/// caller sends right after.
///
/// The methods are `async`: a store on a network database (PostgreSQL) answers through an
/// async driver, and a store on a disk (SQLite) does its blocking work on tokio's blocking
/// pool itself. Call them from a tokio runtime.
///
/// # Examples
///
/// ```
/// use std::time::SystemTime;
/// use idempotent_retry::journal::store::{Begun, Intent, KeyPlan};
/// use idempotent_retry::journal::{KeyStore, MemoryStore, fingerprint};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MemoryStore::new();
/// let fp = fingerprint("POST", "https://api.test/cvms", b"{}");
/// let intent = Intent::new("create/web-1", "POST", "https://api.test/cvms", &fp, KeyPlan::Random, SystemTime::now());
/// let Begun::Send { claim: first, .. } = store.begin(&intent).await.unwrap() else { unreachable!() };
/// // The process dies here. The re-run resumes the same key:
/// let Begun::Send { claim: again, resumed } = store.begin(&intent).await.unwrap() else { unreachable!() };
/// assert_eq!((again.key, resumed), (first.key, true));
/// # }
/// ```
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync + fmt::Debug {
    /// Decides what a run of the operation does ([`Intent::plan`]) and records the pending run,
    /// when there is one, durably, before returning.
    ///
    /// # Errors
    ///
    /// [`JournalError::PayloadMismatch`] when the key is pinned to another payload; other
    /// variants when the store cannot be used.
    async fn begin(&self, intent: &Intent<'_>) -> Result<Begun, JournalError>;

    /// Records how a run ended, if the operation's record is still that run's
    /// ([`Finish::apply`]); whether it was.
    ///
    /// # Errors
    ///
    /// When the store cannot be written.
    async fn finish(&self, operation: &str, finish: &Finish) -> Result<bool, JournalError>;

    /// The record of one operation.
    ///
    /// # Errors
    ///
    /// When the store cannot be read.
    async fn get(&self, operation: &str) -> Result<Option<Record>, JournalError>;

    /// Every record, oldest first.
    ///
    /// # Errors
    ///
    /// When the store cannot be read.
    async fn list(&self) -> Result<Vec<Record>, JournalError>;

    /// Removes an operation's record; whether there was one.
    ///
    /// # Errors
    ///
    /// When the store cannot be written.
    async fn forget(&self, operation: &str) -> Result<bool, JournalError>;
}

pub(crate) fn to_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

mod unix_millis {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(super::to_millis(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(super::from_millis(i64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _object_safe(_: &dyn KeyStore) {}

    #[test]
    fn fingerprints_cover_method_url_and_body() {
        let a = fingerprint("POST", "u", b"{}");
        assert_eq!(a.len(), 64);
        assert_ne!(a, fingerprint("PUT", "u", b"{}"));
        assert_ne!(a, fingerprint("POST", "v", b"{}"));
        assert_ne!(a, fingerprint("POST", "u", b"{ }"));
    }
}
