//! What a client must know about how a server takes idempotency keys: where the key goes, how
//! long it may be, how a replay looks. Presets for the servers the crate was checked against.

use http::{HeaderName, StatusCode};

use crate::carrier::KeyCarrier;
use crate::key::IdempotencyKey;
use crate::replay::ReplayDetector;

/// How a server takes idempotency keys, from the client's side.
///
/// Servers disagree on where the key goes, how long it may be, and how a replay is told apart
/// from a first answer; a client configured for the wrong convention either sends keys the
/// server ignores (and duplicates on retry) or takes replays for failures. Each preset is named
/// after the system it follows; [`IdempotentRetryBuilder::convention`](crate::IdempotentRetryBuilder::convention) applies one.
///
/// ```
/// use idempotent_retry::{IdempotentRetry, ServerConvention};
///
/// // django-idempotency-key replays the stored body under 409, with no marker.
/// let layer = IdempotentRetry::builder().convention(&ServerConvention::django()).build();
/// # let _ = layer;
/// assert_eq!(ServerConvention::named("no-keys"), Some(ServerConvention::no_keys()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerConvention {
    /// The preset's name, as [`named`](Self::named) takes it.
    pub name: &'static str,
    /// Where the key goes; `None` for an endpoint that takes no key (no method then gets one).
    pub carrier: Option<KeyCarrier>,
    /// The longest key the server accepts.
    pub max_key_len: usize,
    /// How the server's replays are recognised.
    pub replay: ReplayDetector,
}

impl ServerConvention {
    fn header(name: &'static str, carrier: KeyCarrier, max_key_len: usize, replay: ReplayDetector) -> Self {
        Self { name, carrier: Some(carrier), max_key_len, replay }
    }

    /// The layer's defaults: `Idempotency-Key`, bare, up to 255; replays marked by
    /// `Idempotent-Replayed` or `Idempotency-Replayed`.
    pub fn standard() -> Self {
        Self::header("standard", KeyCarrier::standard(), IdempotencyKey::DEFAULT_MAX_LEN, ReplayDetector::standard())
    }

    /// The IETF draft: `Idempotency-Key` as a quoted Structured-Field string; replays carry no
    /// marker.
    pub fn ietf() -> Self {
        Self::header("ietf", KeyCarrier::ietf(), IdempotencyKey::DEFAULT_MAX_LEN, ReplayDetector::none())
    }

    /// Stripe: `Idempotency-Key`, bare, up to 255; replays marked `Idempotent-Replayed: true`.
    pub fn stripe() -> Self {
        let marker = ReplayDetector::headers([HeaderName::from_static("idempotent-replayed")]);
        Self::header("stripe", KeyCarrier::standard(), IdempotencyKey::DEFAULT_MAX_LEN, marker)
    }

    /// brandur's Postgres design: `Idempotency-Key`, bare, 20 to 100 characters; no marker.
    pub fn brandur() -> Self {
        Self::header("brandur", KeyCarrier::standard(), 100, ReplayDetector::none())
    }

    /// django-idempotency-key: `Idempotency-Key`, bare; a replay is the stored body under
    /// status **409**, with no marker. It has no in-flight guard (its lock covers only the store
    /// lookup; its 423 means that lookup timed out), so a retry that arrives while the first
    /// request is still running runs the handler again: give its endpoints attempt timeouts
    /// longer than they take.
    pub fn django() -> Self {
        let replay = ReplayDetector::none().replay_status(StatusCode::CONFLICT);
        Self::header("django", KeyCarrier::standard(), IdempotencyKey::DEFAULT_MAX_LEN, replay)
    }

    /// express-idempotency: `Idempotency-Key`, bare, any length; no marker.
    pub fn express() -> Self {
        Self::header("express", KeyCarrier::standard(), usize::MAX, ReplayDetector::none())
    }

    /// bencher's run API: an `idempotency_key` field in the JSON body, a UUID; a replay is the
    /// existing object again, 201, no marker.
    pub fn bencher() -> Self {
        Self::header("bencher", KeyCarrier::body_field("idempotency_key"), 36, ReplayDetector::none())
    }

    /// tower's deploy API: `X-Tower-Idempotency-Key` (a git SHA); no marker.
    pub fn tower() -> Self {
        let carrier = KeyCarrier::header("X-Tower-Idempotency-Key").expect("a valid header name");
        Self::header("tower", carrier, IdempotencyKey::DEFAULT_MAX_LEN, ReplayDetector::none())
    }

    /// An endpoint that takes no key at all (Phala Cloud's `POST /cvms` and replicas). A key
    /// the server ignores would protect nothing, so none is sent: a write that may have been
    /// applied is then never resent, and the caller settles it by reading back.
    pub fn no_keys() -> Self {
        Self {
            name: "no-keys",
            carrier: None,
            max_key_len: IdempotencyKey::DEFAULT_MAX_LEN,
            replay: ReplayDetector::none(),
        }
    }

    /// Every preset.
    pub fn all() -> Vec<Self> {
        vec![
            Self::standard(),
            Self::ietf(),
            Self::stripe(),
            Self::brandur(),
            Self::django(),
            Self::express(),
            Self::bencher(),
            Self::tower(),
            Self::no_keys(),
        ]
    }

    /// The preset called `name` (`no-keys` or `no_keys` for the last), if there is one.
    pub fn named(name: &str) -> Option<Self> {
        let name = name.replace('_', "-");
        Self::all().into_iter().find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_found_by_its_name() {
        for convention in ServerConvention::all() {
            assert_eq!(ServerConvention::named(convention.name).as_ref(), Some(&convention));
        }
        assert_eq!(ServerConvention::named("no_keys"), Some(ServerConvention::no_keys()));
        assert_eq!(ServerConvention::named("acme"), None);
    }

    #[test]
    fn django_replays_under_409() {
        let django = ServerConvention::django();
        let key = crate::IdempotencyKey::new("k-1").unwrap();
        assert!(django.replay.is_replay(StatusCode::CONFLICT, &http::HeaderMap::new(), Some(&key)));
        assert!(!django.replay.is_replay(StatusCode::CONFLICT, &http::HeaderMap::new(), None));
    }
}
