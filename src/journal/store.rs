//! What a [`KeyStore`](super::KeyStore) takes and returns: the vocabulary for writing a store of your own.
//!
//! A caller of [`Operations`](crate::Operations) never names these; a store does. Its
//! [`begin`](super::KeyStore::begin) gets an [`Intent`] (with its [`KeyPlan`]), applies the rules with
//! [`Intent::plan`] inside its own atomic section, carries out the [`Planned`] step and answers
//! the [`Begun`]; its [`finish`](super::KeyStore::finish) gets a [`Finish`], a compare-and-set on the
//! run's [`Claim`]. Check a store with `testing::check_key_store` (feature `test-util`).

use std::time::SystemTime;

use super::{OpState, PayloadMismatch, Record, from_millis, to_millis};
use crate::key::IdempotencyKey;
use crate::wait::Handle;

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
    /// The payload [`fingerprint`](super::fingerprint).
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
/// [`KeyStore::finish`](super::KeyStore::finish) changes a record only while it still carries the claim it names, so a
/// run that reports late cannot overwrite the record of a newer run with another key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Claim {
    /// The key (`None` for a run without one).
    pub key: Option<IdempotencyKey>,
    /// When the key was first recorded (the age that counts against a server's retention).
    pub created_at: SystemTime,
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

/// What [`KeyStore::begin`](super::KeyStore::begin) decided.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Begun {
    /// Send, with the claim's key (or without a key when it has none). The record is pending.
    Send {
        /// The key to send and when it was first recorded; [`KeyStore::finish`](super::KeyStore::finish) names it.
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
    /// that leases its records: [`PostgresJournal`](super::PostgresJournal)). Nothing
    /// was written: wait for it to settle (or for its lease to expire: its holder died), then
    /// begin again [`after`](Intent::after) it.
    Running(Record),
    /// A previous run may have taken effect and this run cannot resume it: it had another key,
    /// or none, or this run has none. Nothing was written, and nothing may be sent until it is
    /// settled: found by reading back, or finished as failed once a read-back did not find it,
    /// or forgotten.
    Unsettled(Record),
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
    /// Applies the journal's rules (the table on [`KeyStore`](super::KeyStore)) to what a store holds:
    /// `existing`, this operation's record; `earlier`, this operation's retired record with the
    /// fixed key, when `existing` holds another key; `conflict`, another operation's record
    /// (current or retired) that holds the fixed key with another payload.
    ///
    /// Stores call this inside their own atomic section and carry out what it returns; a custom
    /// [`KeyStore`](super::KeyStore) should too.
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

/// Where a begin stands: one row of the rule table on [`KeyStore`](super::KeyStore) each, found by
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

/// How a run ended, for [`KeyStore::finish`](super::KeyStore::finish).
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
