//! Why an operation did not complete.

use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;

use crate::error::BoxError;
use crate::journal::{JournalError, PayloadMismatch};
use crate::key::IdempotencyKey;

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
    /// The retry layer gave up on the request (see the [`Error`](crate::Error) inside the
    /// source for attempts and cause).
    #[error("operation `{operation}` failed{}", gave_up(*.may_have_been_applied, .key.is_some()))]
    GaveUp {
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
    /// The server created the resource, and the wait for it to be ready ended without it
    /// being ready. It is tracked: a re-run resumes the wait; it never creates again.
    #[error(transparent)]
    Wait(Box<WaitFailed>),
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

/// What a [`GaveUp`](OperationError::GaveUp) adds to its message: only a keyed request is
/// resumed by a re-run; a keyless one that may have been applied must be checked first.
fn gave_up(may_have_been_applied: bool, keyed: bool) -> &'static str {
    match (may_have_been_applied, keyed) {
        (true, true) => "; it may have been applied, and re-running it resumes its key",
        (true, false) => "; it may have been applied, and it carried no key: read it back before sending it again",
        (false, _) => "; it was not applied",
    }
}

/// The server created the resource, and the wait for it to be ready ended without it being
/// ready (a failure state, the timeout, a failed poll). It is tracked: the journal holds its
/// handle, and a re-run resumes the wait; it never creates again.
#[derive(Debug, thiserror::Error)]
#[error("operation `{operation}` created its resource, but the wait for it ended: {source}")]
#[non_exhaustive]
pub struct WaitFailed {
    /// The operation.
    pub operation: String,
    /// The key sent, if any.
    pub key: Option<IdempotencyKey>,
    /// Where the wait polled (`None` when the answer named nowhere that can be polled).
    pub handle: Option<crate::wait::Handle>,
    /// Why the wait ended.
    #[source]
    pub source: crate::wait::WaitError,
}

impl OperationError {
    /// Whether the operation may have taken effect.
    pub fn may_have_been_applied(&self) -> bool {
        match self {
            OperationError::GaveUp { may_have_been_applied, .. } => *may_have_been_applied,
            OperationError::Unknown { .. }
            | OperationError::Wait(_)
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
            OperationError::GaveUp { key, .. }
            | OperationError::Unknown { key, .. }
            | OperationError::Unrecorded { key, .. }
            | OperationError::Rejected { key, .. } => key.as_ref(),
            OperationError::Wait(failed) => failed.key.as_ref(),
            _ => None,
        }
    }

    pub(crate) fn journal(e: JournalError) -> Self {
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

    pub(crate) fn error(
        operation: &str,
        field: &str,
        expected: Value,
        found: Value,
        resource: Value,
    ) -> OperationError {
        OperationError::IdentityMismatch(Box::new(Self::new(operation, field, expected, found, resource)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_keyed_give_up_says_a_rerun_resumes_its_key() {
        let gave_up = |key: Option<IdempotencyKey>, may_have_been_applied| OperationError::GaveUp {
            operation: "create".into(),
            key,
            may_have_been_applied,
            source: reqwest_middleware::Error::middleware(std::io::Error::other("lost")),
        };
        let keyed = gave_up(Some(IdempotencyKey::random()), true).to_string();
        let keyless = gave_up(None, true).to_string();
        assert!(keyed.contains("resumes its key"), "{keyed}");
        assert!(!keyless.contains("resumes") && keyless.contains("carried no key"), "{keyless}");
        assert!(gave_up(None, false).to_string().ends_with("it was not applied"));
    }
}
