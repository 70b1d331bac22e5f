//! Durable keys: a journal that holds each operation's key from before its first send.
//!
//! Every retry library keeps its key in memory for one call; when the process dies, a re-run
//! mints a new key and the server creates a duplicate. A [`KeyStore`] keeps the key with the
//! *operation*: it is written (and, for [`SqliteJournal`](crate::SqliteJournal), committed to disk)
//! before the request goes out, so a crash, a re-run or a CI retry resumes with the same key.
//!
//! The rules for choosing the key are on [`KeyStore`](crate::KeyStore).

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::key::IdempotencyKey;
use crate::time::{lock, rfc3339};

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
    /// The server refused it, or it certainly did not take effect.
    Failed,
    /// It may have taken effect and nothing settled it.
    Unknown,
}

impl OpState {
    /// The lowercase name stored in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Pending => "pending",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            OpState::Unknown => "unknown",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => OpState::Pending,
            "succeeded" => OpState::Succeeded,
            "failed" => OpState::Failed,
            "unknown" => OpState::Unknown,
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
    /// This key, whatever the journal holds (explicit, derived or from git).
    Fixed(IdempotencyKey),
    /// No key.
    None,
}

/// An operation about to be sent.
#[derive(Debug, Clone)]
pub struct Intent<'a> {
    /// The operation's name.
    pub operation: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Target URL.
    pub url: &'a str,
    /// The payload [`fingerprint`].
    pub fingerprint: &'a str,
    /// How to choose the key.
    pub key: KeyPlan,
    /// Now, by the caller's clock.
    pub now: SystemTime,
}

/// What [`KeyStore::begin`] decided.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Begun {
    /// The key to send (`None`: send without one).
    pub key: Option<IdempotencyKey>,
    /// The key is a previous run's, taken from the journal.
    pub resumed: bool,
    /// When the key was first recorded.
    pub key_created_at: SystemTime,
    /// A previous run may have taken effect and is not settled (the journal said pending or
    /// unknown). With a resumed key the server settles it; without one, read back first.
    pub unsettled: Option<Record>,
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
    /// The key is pinned to another payload.
    #[error(transparent)]
    PayloadMismatch(Box<PayloadMismatch>),
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
    /// Applies the journal's rules (see the table on [`KeyStore`]) to what a store holds:
    /// `existing`, this operation's record, and `same_key`, another operation's record with the
    /// fixed key, if any. Returns the record to write (state pending) and the decision.
    ///
    /// Stores call this inside their own atomic section; a custom [`KeyStore`] should too.
    ///
    /// # Errors
    ///
    /// [`PayloadMismatch`] when the key is pinned to another payload.
    pub fn plan(
        &self,
        existing: Option<&Record>,
        same_key: Option<&Record>,
    ) -> Result<(Record, Begun), Box<PayloadMismatch>> {
        let unsettled = existing.filter(|r| r.state.is_unsettled()).cloned();
        let (key, resumed, key_created_at) = match &self.key {
            KeyPlan::Fixed(key) => {
                if let Some(other) =
                    same_key.filter(|o| o.operation != self.operation && o.fingerprint != self.fingerprint)
                {
                    return Err(Box::new(PayloadMismatch::new(self.operation, other, Some(key))));
                }
                match existing.filter(|r| r.key.as_ref() == Some(key)) {
                    Some(r) if r.fingerprint != self.fingerprint => {
                        return Err(Box::new(PayloadMismatch::new(self.operation, r, Some(key))));
                    }
                    Some(r) => (Some(key.clone()), r.state.is_unsettled(), r.created_at),
                    None => (Some(key.clone()), false, self.now),
                }
            }
            KeyPlan::Random => match unsettled.as_ref() {
                Some(r) if r.fingerprint != self.fingerprint => {
                    return Err(Box::new(PayloadMismatch::new(self.operation, r, r.key.as_ref())));
                }
                Some(Record { key: Some(key), created_at, .. }) => (Some(key.clone()), true, *created_at),
                _ => (Some(IdempotencyKey::random()), false, self.now),
            },
            KeyPlan::None => (None, false, self.now),
        };
        // A resumed key settles the previous run; anything else leaves it to the caller.
        let unsettled = if resumed { None } else { unsettled };
        let record = Record {
            operation: self.operation.to_owned(),
            key: key.clone(),
            method: self.method.to_owned(),
            url: self.url.to_owned(),
            fingerprint: self.fingerprint.to_owned(),
            state: OpState::Pending,
            created_at: key_created_at,
            updated_at: self.now,
            status: None,
            identity: None,
        };
        Ok((record, Begun { key, resumed, key_created_at, unsettled }))
    }
}

/// How an operation ended, for [`KeyStore::finish`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Finish {
    /// The new state.
    pub state: OpState,
    /// The final HTTP status, if any.
    pub status: Option<u16>,
    /// The identity the server returned, if known.
    pub identity: Option<serde_json::Value>,
    /// Now, by the caller's clock.
    pub now: SystemTime,
}

impl Finish {
    /// A finish record.
    pub fn new(state: OpState, status: Option<u16>, identity: Option<serde_json::Value>, now: SystemTime) -> Self {
        Self { state, status, identity, now }
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
/// | pending or unknown, same payload | **resume its key** | the fixed key | read back first |
/// | pending or unknown, other payload | refused | refused if the key is the same | read back first |
/// | succeeded or failed | mint a new key (a new run) | the fixed key: the server replays | – |
///
/// and, for any fixed key, another operation that used the key with another payload means the
/// request is refused before sending, with an error that names both.
///
/// Implemented by [`MemoryStore`] and [`SqliteJournal`](crate::SqliteJournal); implement it to keep
/// keys elsewhere, e.g. in Terraform state. [`begin`](Self::begin) must be atomic with respect
/// to other processes using the same store, and durable before it returns: the caller sends
/// right after.
///
/// # Examples
///
/// ```
/// use std::time::SystemTime;
/// use idempotent_retry::{Intent, KeyPlan, KeyStore, MemoryStore, fingerprint};
///
/// let store = MemoryStore::new();
/// let fp = fingerprint("POST", "https://api.test/cvms", b"{}");
/// let intent = Intent { operation: "create/web-1", method: "POST", url: "https://api.test/cvms", fingerprint: &fp, key: KeyPlan::Random, now: SystemTime::now() };
/// let first = store.begin(&intent).unwrap();
/// // The process dies here. The re-run resumes the same key:
/// let again = store.begin(&intent).unwrap();
/// assert_eq!(again.key, first.key);
/// assert!(again.resumed);
/// ```
pub trait KeyStore: Send + Sync + fmt::Debug {
    /// Decides the key for an operation about to be sent ([`Intent::plan`]) and records it as
    /// pending, durably, before returning.
    ///
    /// # Errors
    ///
    /// [`JournalError::PayloadMismatch`] when the key is pinned to another payload; other
    /// variants when the store cannot be used.
    fn begin(&self, intent: &Intent<'_>) -> Result<Begun, JournalError>;

    /// Records how the operation ended.
    ///
    /// # Errors
    ///
    /// When the store cannot be written.
    fn finish(&self, operation: &str, finish: &Finish) -> Result<(), JournalError>;

    /// The record of one operation.
    ///
    /// # Errors
    ///
    /// When the store cannot be read.
    fn get(&self, operation: &str) -> Result<Option<Record>, JournalError>;

    /// Every record, oldest first.
    ///
    /// # Errors
    ///
    /// When the store cannot be read.
    fn list(&self) -> Result<Vec<Record>, JournalError>;

    /// Removes an operation's record; whether there was one.
    ///
    /// # Errors
    ///
    /// When the store cannot be written.
    fn forget(&self, operation: &str) -> Result<bool, JournalError>;

    /// Whether calls may block (disk, network): [`Operations`](crate::Operations) then makes them
    /// on tokio's blocking pool. A store that answers from memory says `false` and is called
    /// in place, saving two thread hand-offs per operation. Default: `true`.
    fn is_blocking(&self) -> bool {
        true
    }
}

/// Keys in memory, for one process. Useful in tests and where durability is not wanted; it
/// protects retries within the process, not re-runs.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: std::sync::Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    /// Records by operation name.
    records: HashMap<String, Record>,
    /// Operation names by key, for the pinning check.
    by_key: HashMap<IdempotencyKey, String>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl KeyStore for MemoryStore {
    fn begin(&self, intent: &Intent<'_>) -> Result<Begun, JournalError> {
        let mut memory = lock(&self.inner);
        let Memory { records, by_key } = &mut *memory;
        let existing = records.get(intent.operation);
        let same_key = match &intent.key {
            KeyPlan::Fixed(key) => {
                by_key.get(key).filter(|op| op.as_str() != intent.operation).and_then(|op| records.get(op))
            }
            _ => None,
        };
        let (record, begun) = intent.plan(existing, same_key).map_err(JournalError::PayloadMismatch)?;
        if let Some(old) = records.get(intent.operation).and_then(|r| r.key.clone()) {
            by_key.remove(&old);
        }
        if let Some(key) = &record.key {
            by_key.insert(key.clone(), record.operation.clone());
        }
        records.insert(record.operation.clone(), record);
        Ok(begun)
    }

    fn finish(&self, operation: &str, finish: &Finish) -> Result<(), JournalError> {
        if let Some(r) = lock(&self.inner).records.get_mut(operation) {
            r.state = finish.state;
            r.status = finish.status;
            r.identity = finish.identity.clone();
            r.updated_at = finish.now;
        }
        Ok(())
    }

    fn get(&self, operation: &str) -> Result<Option<Record>, JournalError> {
        Ok(lock(&self.inner).records.get(operation).cloned())
    }

    fn list(&self) -> Result<Vec<Record>, JournalError> {
        let mut records: Vec<Record> = lock(&self.inner).records.values().cloned().collect();
        records.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.operation.cmp(&b.operation)));
        Ok(records)
    }

    fn is_blocking(&self) -> bool {
        false
    }

    fn forget(&self, operation: &str) -> Result<bool, JournalError> {
        let mut memory = lock(&self.inner);
        let Some(record) = memory.records.remove(operation) else { return Ok(false) };
        if let Some(key) = record.key {
            memory.by_key.remove(&key);
        }
        Ok(true)
    }
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

    fn intent<'a>(op: &'a str, fp: &'a str, key: KeyPlan) -> Intent<'a> {
        Intent { operation: op, method: "POST", url: "https://api.test/cvms", fingerprint: fp, key, now: UNIX_EPOCH }
    }

    fn _object_safe(_: &dyn KeyStore) {}

    #[test]
    fn random_keys_resume_while_unsettled_and_renew_after() {
        let store = MemoryStore::new();
        let first = store.begin(&intent("op", "fp1", KeyPlan::Random)).unwrap();
        assert!(!first.resumed && first.key.is_some());
        let again = store.begin(&intent("op", "fp1", KeyPlan::Random)).unwrap();
        assert_eq!((again.key.clone(), again.resumed), (first.key.clone(), true));
        assert_eq!(again.unsettled, None, "the resumed key settles it");

        store.finish("op", &Finish::new(OpState::Succeeded, Some(201), None, UNIX_EPOCH)).unwrap();
        let next_run = store.begin(&intent("op", "fp1", KeyPlan::Random)).unwrap();
        assert_ne!(next_run.key, first.key, "a succeeded operation run again is a new operation");
        assert!(!next_run.resumed);
    }

    #[test]
    fn a_pending_random_operation_with_another_payload_is_refused() {
        let store = MemoryStore::new();
        store.begin(&intent("op", "fp1", KeyPlan::Random)).unwrap();
        let err = store.begin(&intent("op", "fp2", KeyPlan::Random)).unwrap_err();
        assert!(matches!(err, JournalError::PayloadMismatch(_)), "{err}");
    }

    #[test]
    fn fixed_keys_are_pinned_to_one_payload_across_operations() {
        let store = MemoryStore::new();
        let key = IdempotencyKey::new("deploy-abc").unwrap();
        store.begin(&intent("deploy/a", "fp1", KeyPlan::Fixed(key.clone()))).unwrap();
        store.finish("deploy/a", &Finish::new(OpState::Succeeded, Some(201), None, UNIX_EPOCH)).unwrap();
        // Same key, same payload, run again: fine (the server replays).
        let again = store.begin(&intent("deploy/a", "fp1", KeyPlan::Fixed(key.clone()))).unwrap();
        assert_eq!(again.key.as_ref(), Some(&key));
        // Same key, another payload, another operation: refused, naming both.
        let err = store.begin(&intent("deploy/b", "fp2", KeyPlan::Fixed(key.clone()))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`deploy/b`") && msg.contains("`deploy/a`") && msg.contains("nothing was sent"), "{msg}");
        assert!(!msg.contains("deploy-abc"), "the key is fingerprinted: {msg}");
        // Same operation, same key, another payload: refused too.
        let err = store.begin(&intent("deploy/a", "fp3", KeyPlan::Fixed(key))).unwrap_err();
        assert!(matches!(err, JournalError::PayloadMismatch(_)));
    }

    #[test]
    fn keyless_reruns_report_the_unsettled_run() {
        let store = MemoryStore::new();
        let first = store.begin(&intent("op", "fp", KeyPlan::None)).unwrap();
        assert_eq!((first.key.clone(), first.unsettled.clone()), (None, None));
        let again = store.begin(&intent("op", "fp", KeyPlan::None)).unwrap();
        assert_eq!(again.unsettled.map(|r| r.state), Some(OpState::Pending));
    }

    #[test]
    fn fingerprints_cover_method_url_and_body() {
        let a = fingerprint("POST", "u", b"{}");
        assert_eq!(a.len(), 64);
        assert_ne!(a, fingerprint("PUT", "u", b"{}"));
        assert_ne!(a, fingerprint("POST", "v", b"{}"));
        assert_ne!(a, fingerprint("POST", "u", b"{ }"));
    }
}
