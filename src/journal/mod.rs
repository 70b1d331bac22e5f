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
//!   its methods take and return — [`Intent`] (with [`KeyPlan`]), [`Intent::plan`] and its
//!   [`Planned`], [`Begun`], [`Claim`], [`Finish`] — checked with `testing::check_key_store`.
//!   These are public because a store outside this crate must name them; nothing else needs
//!   them.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "journal")]
mod sqlite;

pub use crate::target::redact_url;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{PostgresJournal, PostgresJournalBuilder};
#[cfg(feature = "journal")]
pub use sqlite::SqliteJournal;

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

/// How the key of an operation about to be sent is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyPlan {
    /// Resume the pending key, or mint a new random one.
    Random,
    /// This key (explicit, derived or from git).
    Fixed(IdempotencyKey),
    /// No key.
    None,
}

/// An operation about to be sent.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Intent<'a> {
    /// The operation's name.
    pub operation: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Target URL, as it may be stored (see [`Record::url`]).
    pub url: &'a str,
    /// The payload [`fingerprint`].
    pub fingerprint: &'a str,
    /// How to choose the key.
    pub key: KeyPlan,
    /// Now, by the caller's clock.
    pub now: SystemTime,
    /// The run this one waited for ([`Begun::Running`]): if it is the record's run and it
    /// succeeded, its success is this run's answer, and nothing new starts.
    pub waited_for: Option<Claim>,
    /// The operation happens once: a success on record answers every later run, whatever
    /// the key source (see [`OperationBuilder::once`](crate::operation::OperationBuilder::once)).
    pub once: bool,
}

/// One run's hold on an operation's record: its key and when that key was first recorded.
///
/// [`KeyStore::finish`] changes a record only while it still carries the claim it names, so a
/// run that reports late cannot overwrite the record of a newer run with another key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Claim {
    /// The key (`None` for a run without one).
    pub key: Option<IdempotencyKey>,
    /// When the key was first recorded (the age that counts against a server's retention).
    pub created_at: SystemTime,
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

/// What [`Intent::plan`] decided, for a store to carry out in one atomic step.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Planned {
    /// The operation's new record (pending), if this run sends.
    pub write: Option<Record>,
    /// The record it replaces, to keep among the operation's retired records: a settled run
    /// with a fixed key, which a later run may name again.
    pub retire: Option<Record>,
    /// The answer to give.
    pub begun: Begun,
}

/// What [`KeyStore::begin`] decided.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Begun {
    /// Send, with the claim's key (or without a key when it has none). The record is pending.
    Send {
        /// The key to send and when it was first recorded; [`KeyStore::finish`] names it.
        claim: Claim,
        /// The key is a previous run's, taken from the journal: that run was pending or unknown.
        resumed: bool,
    },
    /// This operation already succeeded with this (fixed) key. Nothing was written.
    Succeeded(Record),
    /// The server created this operation's resource and a run was waiting for it: resume the
    /// wait at the record's handle, send nothing. Nothing was written.
    Waiting(Record),
    /// Another run, live on another machine, holds this operation's pending record (a store
    /// that leases its records: [`PostgresJournal`]). Nothing
    /// was written: wait for it to settle (or for its lease to expire: its holder died), then
    /// begin again [`after`](Intent::after) it.
    Running(Record),
    /// A previous run may have taken effect and this run cannot resume it: it had another key,
    /// or none, or this run has none. Nothing was written, and nothing may be sent until it is
    /// settled: found by reading back, or finished as failed once a read-back did not find it,
    /// or forgotten.
    Unsettled(Record),
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
    fn new(operation: &str, earlier: &Record, key: Option<&IdempotencyKey>) -> Self {
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

impl<'a> Intent<'a> {
    /// An intent to run `operation` (`method` on `url`, the payload's `fingerprint`), its key
    /// chosen as `key` says, at `now`.
    pub fn new(
        operation: &'a str,
        method: &'a str,
        url: &'a str,
        fingerprint: &'a str,
        key: KeyPlan,
        now: SystemTime,
    ) -> Self {
        Self { operation, method, url, fingerprint, key, now, waited_for: None, once: false }
    }

    /// The same intent, for an operation that happens [once](Self::once).
    pub fn happening_once(mut self, once: bool) -> Self {
        self.once = once;
        self
    }

    /// The same intent, by a run that waited for the run with `claim` to settle.
    pub fn after(mut self, claim: Option<Claim>) -> Self {
        self.waited_for = claim;
        self
    }

    /// The same intent, owning its parts: to move into a blocking task.
    pub(crate) fn to_owned_parts(&self) -> OwnedIntent {
        OwnedIntent {
            operation: self.operation.to_owned(),
            method: self.method.to_owned(),
            url: self.url.to_owned(),
            fingerprint: self.fingerprint.to_owned(),
            key: self.key.clone(),
            now: self.now,
            waited_for: self.waited_for.clone(),
            once: self.once,
        }
    }
}

/// An [`Intent`] that owns its parts.
#[derive(Debug, Clone)]
pub(crate) struct OwnedIntent {
    operation: String,
    method: String,
    url: String,
    fingerprint: String,
    key: KeyPlan,
    now: SystemTime,
    waited_for: Option<Claim>,
    once: bool,
}

impl OwnedIntent {
    /// The intent, borrowing from this.
    pub(crate) fn intent(&self) -> Intent<'_> {
        Intent::new(&self.operation, &self.method, &self.url, &self.fingerprint, self.key.clone(), self.now)
            .after(self.waited_for.clone())
            .happening_once(self.once)
    }
}

impl Intent<'_> {
    /// Applies the journal's rules (the table on [`KeyStore`]) to what a store holds:
    /// `existing`, this operation's record; `earlier`, this operation's retired record with the
    /// fixed key, when `existing` holds another key; `conflict`, another operation's record
    /// (current or retired) that holds the fixed key with another payload.
    ///
    /// Stores call this inside their own atomic section and carry out what it returns; a custom
    /// [`KeyStore`] should too.
    ///
    /// # Errors
    ///
    /// [`PayloadMismatch`] when the key is pinned to another payload.
    pub fn plan(
        &self,
        existing: Option<&Record>,
        earlier: Option<&Record>,
        conflict: Option<&Record>,
    ) -> Result<Planned, Box<PayloadMismatch>> {
        let mismatch =
            |r: &Record, key: Option<&IdempotencyKey>| Box::new(PayloadMismatch::new(self.operation, r, key));
        let same_payload = |r: &Record, key: Option<&IdempotencyKey>| {
            if r.fingerprint == self.fingerprint { Ok(()) } else { Err(mismatch(r, key)) }
        };
        let fixed = matches!(self.key, KeyPlan::Fixed(_));
        let planned = |key: Option<IdempotencyKey>, created_at: SystemTime, resumed: bool| {
            let claim = Claim { key, created_at };
            let write = self.pending(&claim, fixed);
            // A settled run whose fixed key this run does not reuse is remembered.
            let retire = existing
                .filter(|r| r.fixed_key && r.key.is_some() && r.key != claim.key && !r.state.is_unsettled())
                .cloned();
            Planned { write: Some(write), retire, begun: Begun::Send { claim, resumed } }
        };
        let start = |key: Option<IdempotencyKey>, created_at: SystemTime| planned(key, created_at, false);
        let nothing = |begun: Begun| Planned { write: None, retire: None, begun };
        // One arm per row of the table on `KeyStore`.
        Ok(match self.situation(existing, earlier, conflict) {
            Situation::KeyTaken { by, key } => return Err(mismatch(by, Some(key))),
            Situation::Answered(r) => {
                same_payload(r, r.key.as_ref())?;
                nothing(Begun::Succeeded(r.clone()))
            }
            Situation::Waiting(r) => {
                same_payload(r, r.key.as_ref())?;
                nothing(Begun::Waiting(r.clone()))
            }
            Situation::Nothing => start(self.new_key(), self.now),
            Situation::Resumable { record, key } => {
                same_payload(record, Some(key))?;
                planned(Some(key.clone()), record.created_at, true)
            }
            Situation::Unsettled(r) => nothing(Begun::Unsettled(r.clone())),
            Situation::FixedKeyUsed { record, key } => {
                same_payload(record, Some(key))?;
                if record.state == OpState::Succeeded {
                    nothing(Begun::Succeeded(record.clone()))
                } else {
                    start(Some(key.clone()), record.created_at)
                }
            }
            Situation::Settled(r) => match &self.key {
                KeyPlan::None => start(None, self.keyless_after(r)),
                _ => start(self.new_key(), self.now),
            },
        })
    }

    /// Which row of the rule table a begin is in, given what the store holds (see
    /// [`plan`](Self::plan)). The order of the checks is the table's precedence.
    fn situation<'r>(
        &'r self,
        existing: Option<&'r Record>,
        earlier: Option<&'r Record>,
        conflict: Option<&'r Record>,
    ) -> Situation<'r> {
        if let (KeyPlan::Fixed(key), Some(other)) = (&self.key, conflict) {
            return Situation::KeyTaken { by: other, key };
        }
        let Some(r) = existing else { return Situation::Nothing };
        // The run this one waited for succeeded, or the operation happens once and succeeded:
        // that is this run's answer (the same payload only), not a reason to start another.
        if r.state == OpState::Succeeded
            && (self.once || self.waited_for.as_ref().is_some_and(|claim| r.is_claimed_by(claim)))
        {
            return Situation::Answered(r);
        }
        // Created already: whatever the key source, the run resumes the wait.
        if r.state == OpState::Waiting {
            return Situation::Waiting(r);
        }
        let holds = |record: &Record| matches!((&self.key, &record.key), (KeyPlan::Fixed(k), Some(held)) if k == held);
        if r.state.is_unsettled() {
            return match &r.key {
                Some(key) if holds(r) || self.key == KeyPlan::Random => Situation::Resumable { record: r, key },
                _ => Situation::Unsettled(r),
            };
        }
        // The record that used the fixed key: the current one, or a retired one.
        let used = if holds(r) { Some(r) } else { earlier.filter(|e| holds(e)) };
        match (used, &self.key) {
            (Some(record), KeyPlan::Fixed(key)) => Situation::FixedKeyUsed { record, key },
            _ => Situation::Settled(r),
        }
    }

    /// The key a new run sends.
    fn new_key(&self) -> Option<IdempotencyKey> {
        match &self.key {
            KeyPlan::Random => Some(IdempotencyKey::random()),
            KeyPlan::Fixed(key) => Some(key.clone()),
            KeyPlan::None => None,
        }
    }

    /// When a keyless run after `previous` is recorded: two keyless runs must not share a claim,
    /// so the new one is later by at least a millisecond.
    fn keyless_after(&self, previous: &Record) -> SystemTime {
        if previous.key.is_none() && to_millis(self.now) <= to_millis(previous.created_at) {
            from_millis(to_millis(previous.created_at) + 1)
        } else {
            self.now
        }
    }

    /// The pending record of a run with `claim`.
    fn pending(&self, claim: &Claim, fixed_key: bool) -> Record {
        Record {
            operation: self.operation.to_owned(),
            key: claim.key.clone(),
            method: self.method.to_owned(),
            url: self.url.to_owned(),
            fingerprint: self.fingerprint.to_owned(),
            state: OpState::Pending,
            created_at: claim.created_at,
            updated_at: self.now,
            status: None,
            identity: None,
            fixed_key,
            handle: None,
        }
    }
}

/// Where a begin stands: one row of the rule table on [`KeyStore`] each, found by
/// [`Intent::situation`] and carried out by [`Intent::plan`].
#[derive(Debug)]
enum Situation<'r> {
    /// Another operation used this fixed key with another payload: refused.
    KeyTaken { by: &'r Record, key: &'r IdempotencyKey },
    /// The run this one waited for succeeded, or the operation happens once and succeeded.
    Answered(&'r Record),
    /// Created, not yet ready: resume the wait.
    Waiting(&'r Record),
    /// Nothing on record: a first run.
    Nothing,
    /// The previous run is unsettled, with a key this run takes over (its own fixed key, or any
    /// key for a random source).
    Resumable { record: &'r Record, key: &'r IdempotencyKey },
    /// The previous run is unsettled and this run cannot take its key over: touch nothing.
    Unsettled(&'r Record),
    /// Settled, and the fixed key was this operation's before (the record, or a retired one).
    FixedKeyUsed { record: &'r Record, key: &'r IdempotencyKey },
    /// Settled, run again: a new run.
    Settled(&'r Record),
}

/// How a run ended, for [`KeyStore::finish`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Finish {
    /// The run: only a record that still carries this claim is changed.
    pub claim: Claim,
    /// The new state.
    pub state: OpState,
    /// The final HTTP status, if any.
    pub status: Option<u16>,
    /// The identity the server returned, if known.
    pub identity: Option<serde_json::Value>,
    /// Where to poll, for a run that is [waiting](OpState::Waiting).
    pub handle: Option<Handle>,
    /// Now, by the caller's clock.
    pub now: SystemTime,
}

impl Finish {
    /// The run with `claim` ended in `state` at `now`.
    pub fn new(claim: Claim, state: OpState, now: SystemTime) -> Self {
        Self { claim, state, status: None, identity: None, handle: None, now }
    }

    /// With the final HTTP status.
    pub fn status(mut self, status: Option<u16>) -> Self {
        self.status = status;
        self
    }

    /// With the identity the server returned.
    pub fn identity(mut self, identity: Option<serde_json::Value>) -> Self {
        self.identity = identity;
        self
    }

    /// With where to poll (stored without secrets: [`Handle::stored`]).
    pub fn handle(mut self, handle: Option<&Handle>) -> Self {
        self.handle = handle.map(Handle::stored);
        self
    }

    /// Applies this to `record` if the record is the claimed run's; whether it was.
    pub fn apply(&self, record: &mut Record) -> bool {
        if !record.is_claimed_by(&self.claim) {
            return false;
        }
        record.state = self.state;
        record.status = self.status;
        record.identity = self.identity.clone();
        record.handle = self.handle.clone();
        record.updated_at = self.now;
        true
    }
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
/// use idempotent_retry::journal::{Begun, Intent, KeyPlan, KeyStore, MemoryStore, fingerprint};
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
