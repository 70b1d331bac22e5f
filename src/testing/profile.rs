//! How a fake server treats idempotency keys, and presets named after the systems they emulate.

use std::time::Duration;

use http::{HeaderName, StatusCode};

use crate::carrier::KeyCarrier;
use crate::convention::ServerConvention;
use crate::middleware::IdempotentRetryBuilder;
use crate::replay::ReplayDetector;

/// Where the server looks for the key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyLocation {
    /// A header. With `structured`, the value must be an IETF Structured-Field string (`"…"`);
    /// a bare value is then malformed (400).
    Header {
        /// Header name.
        name: HeaderName,
        /// Whether the value is a quoted Structured-Field string.
        structured: bool,
    },
    /// A string field at the top level of the JSON body.
    BodyField(String),
    /// The endpoint takes no key: any key sent is ignored.
    Nowhere,
}

/// Which keys the server accepts; others get a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyFormat {
    /// Shortest key accepted.
    pub min_len: usize,
    /// Longest key accepted.
    pub max_len: usize,
    /// Only UUIDs are accepted.
    pub uuid_only: bool,
}

impl KeyFormat {
    /// Any key from 1 to `max_len` characters.
    pub const fn up_to(max_len: usize) -> Self {
        Self { min_len: 1, max_len, uuid_only: false }
    }

    /// Keys of `min_len..=max_len` characters.
    pub const fn between(min_len: usize, max_len: usize) -> Self {
        Self { min_len, max_len, uuid_only: false }
    }

    /// UUIDs only.
    pub const fn uuid() -> Self {
        Self { min_len: 36, max_len: 36, uuid_only: true }
    }
}

/// How the server answers a key it has seen (with the same payload).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Replay {
    /// The stored status and body, with `marker: true` when a marker header is named.
    Stored {
        /// The header set to `true` on a replay (Stripe: `Idempotent-Replayed`), if any.
        marker: Option<HeaderName>,
    },
    /// The stored body with the status rewritten to 409 (django-idempotency-key).
    StoredAs409,
    /// The existing object re-rendered, 201, no marker; if the object is gone the request
    /// creates anew (bencher).
    ExistingObject,
}

/// How the server answers a key it has seen with a different payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mismatch {
    /// 422 Unprocessable Content (IETF draft).
    Status422,
    /// 417 Expectation Failed (express-idempotency).
    Status417,
    /// 409 Conflict whose body says "mismatch" (brandur's design).
    Status409,
    /// 400 with an error of type `idempotency_error` (Stripe).
    Stripe400,
    /// Not checked: the stored answer is replayed whatever the payload.
    NotChecked,
}

/// How the server answers a key whose first request is still being processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InFlight {
    /// 409 Conflict, "a request with this key is in progress".
    Status409,
    /// 423 Locked (django-idempotency-key when its store lookup's lock timed out).
    Status423,
    /// 429 Too Many Requests with lock text (brandur's alternative).
    Status429,
    /// 503 Service Unavailable, "database is locked" (bencher's SQLite busy).
    Status503,
    /// No check: the second request runs too, and may create a second resource.
    RunsAgain,
}

/// What identifies a stored key besides the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Scope {
    /// Keys are per `Authorization` value (an account, a user).
    pub authorization: bool,
    /// Keys are per method and path.
    pub request: bool,
    /// The body is part of the key (django hashes it in), so another payload is another entry.
    pub body: bool,
}

impl Scope {
    /// One key space for everybody.
    pub const GLOBAL: Self = Self { authorization: false, request: false, body: false };
    /// One key space per `Authorization` value.
    pub const PER_AUTHORIZATION: Self = Self { authorization: true, request: false, body: false };
}

/// Which answers the server stores for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheErrors {
    /// Every answer, a 500 included (Stripe).
    All,
    /// Only 2xx answers; a failed request can be retried and runs again.
    SuccessOnly,
    /// Answers below 500 (definitive ones).
    Definitive,
    /// 2xx answers and these statuses.
    Statuses(Vec<u16>),
}

impl CacheErrors {
    /// Whether an answer with `status` is stored.
    pub fn caches(&self, status: StatusCode) -> bool {
        status.is_success()
            || match self {
                CacheErrors::All => true,
                CacheErrors::SuccessOnly => false,
                CacheErrors::Definitive => !status.is_server_error(),
                CacheErrors::Statuses(list) => list.contains(&status.as_u16()),
            }
    }
}

/// A server's idempotency behaviour. Start from a preset and adjust the public fields or use
/// the `with_*` methods.
///
/// ```
/// use std::time::Duration;
/// use idempotent_retry::testing::{InFlight, ServerProfile};
///
/// let mut slow_stripe = ServerProfile::stripe().with_processing(Duration::from_millis(300));
/// slow_stripe.in_flight = InFlight::Status429;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerProfile {
    /// The preset's name, for test output.
    pub name: &'static str,
    /// Where the key is read from.
    pub key: KeyLocation,
    /// Which keys are accepted.
    pub format: KeyFormat,
    /// Whether a create without a key is refused (400).
    pub require_key: bool,
    /// How a seen key is answered.
    pub replay: Replay,
    /// How a seen key with another payload is answered.
    pub mismatch: Mismatch,
    /// How a key still in flight is answered.
    pub in_flight: InFlight,
    /// How long the first request with a key is "in flight". Measured on the server's clock.
    pub processing: Duration,
    /// How long keys are kept; `None` for ever.
    pub retention: Option<Duration>,
    /// What else identifies a key.
    pub scope: Scope,
    /// Which answers are stored.
    pub cache: CacheErrors,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn header(name: &'static str, structured: bool) -> KeyLocation {
    KeyLocation::Header { name: HeaderName::from_static(name), structured }
}

impl ServerProfile {
    /// The IETF draft (draft-ietf-httpapi-idempotency-key-header): `Idempotency-Key` as a quoted
    /// Structured-Field string; prior result replayed without a marker; 422 on another payload;
    /// 409 while in flight; errors cached; retention 24 h (the draft says "publish it").
    pub fn ietf() -> Self {
        Self {
            name: "ietf",
            key: header("idempotency-key", true),
            format: KeyFormat::up_to(255),
            require_key: false,
            replay: Replay::Stored { marker: None },
            mismatch: Mismatch::Status422,
            in_flight: InFlight::Status409,
            processing: Duration::ZERO,
            retention: Some(DAY),
            scope: Scope::GLOBAL,
            cache: CacheErrors::All,
        }
    }

    /// Stripe: bare header ≤ 255; stored status and body with `Idempotent-Replayed: true`;
    /// `idempotency_error` (400) on another payload; 409 in flight; keys per account
    /// (`Authorization`), kept ≥ 24 h; every answer cached, 500 included.
    pub fn stripe() -> Self {
        Self {
            name: "stripe",
            key: header("idempotency-key", false),
            format: KeyFormat::up_to(255),
            require_key: false,
            replay: Replay::Stored { marker: Some(HeaderName::from_static("idempotent-replayed")) },
            mismatch: Mismatch::Stripe400,
            in_flight: InFlight::Status409,
            processing: Duration::ZERO,
            retention: Some(DAY),
            scope: Scope::PER_AUTHORIZATION,
            cache: CacheErrors::All,
        }
    }

    /// brandur's Postgres design: bare header of 20–100 characters; stored result, no marker;
    /// 409 (with "mismatch") on another payload; 409 in flight; keys per user, kept ~72 h;
    /// definitive answers (below 500) cached.
    pub fn brandur() -> Self {
        Self {
            name: "brandur",
            key: header("idempotency-key", false),
            format: KeyFormat::between(20, 100),
            require_key: false,
            replay: Replay::Stored { marker: None },
            mismatch: Mismatch::Status409,
            in_flight: InFlight::Status409,
            processing: Duration::ZERO,
            retention: Some(3 * DAY),
            scope: Scope::PER_AUTHORIZATION,
            cache: CacheErrors::Definitive,
        }
    }

    /// django-idempotency-key: bare header; stored body with status rewritten to 409; the body is
    /// hashed into the key (another payload is another request); **no in-flight guard**: its lock
    /// covers only the store lookup, so a request that arrives while the first is still running
    /// runs the handler again (set `in_flight` to [`InFlight::Status423`] for the answer it gives
    /// when that lookup's lock times out); scope is key, path, method, body and `Authorization`;
    /// cache timeout (24 h here); 2xx cached only.
    pub fn django() -> Self {
        Self {
            name: "django",
            key: header("idempotency-key", false),
            format: KeyFormat::up_to(255),
            require_key: false,
            replay: Replay::StoredAs409,
            mismatch: Mismatch::NotChecked,
            in_flight: InFlight::RunsAgain,
            processing: Duration::ZERO,
            retention: Some(DAY),
            scope: Scope { authorization: true, request: true, body: true },
            cache: CacheErrors::SuccessOnly,
        }
    }

    /// express-idempotency: bare header, any key; stored status and body, no marker; 417 on
    /// another payload; 409 in flight; no expiry; global scope; 2xx cached only.
    pub fn express() -> Self {
        Self {
            name: "express",
            key: header("idempotency-key", false),
            format: KeyFormat::up_to(usize::MAX),
            require_key: false,
            replay: Replay::Stored { marker: None },
            mismatch: Mismatch::Status417,
            in_flight: InFlight::Status409,
            processing: Duration::ZERO,
            retention: None,
            scope: Scope::GLOBAL,
            cache: CacheErrors::SuccessOnly,
        }
    }

    /// bencher's run API: `idempotency_key` JSON body field, UUID only; the existing object again,
    /// 201, no marker; payload not checked; 409 on the unique-index race; kept for ever; scope
    /// project and key (here: path); errors not stored.
    pub fn bencher() -> Self {
        Self {
            name: "bencher",
            key: KeyLocation::BodyField("idempotency_key".into()),
            format: KeyFormat::uuid(),
            require_key: false,
            replay: Replay::ExistingObject,
            mismatch: Mismatch::NotChecked,
            in_flight: InFlight::Status409,
            processing: Duration::ZERO,
            retention: None,
            scope: Scope { authorization: false, request: true, body: false },
            cache: CacheErrors::SuccessOnly,
        }
    }

    /// tower's deploy API: `X-Tower-Idempotency-Key` (a git SHA, opaque); the existing version
    /// returned with its original `created_at`, no marker; payload not checked; no in-flight
    /// check documented (a second request runs); scope the app (here: path); errors not stored.
    pub fn tower() -> Self {
        Self {
            name: "tower",
            key: header("x-tower-idempotency-key", false),
            format: KeyFormat::up_to(255),
            require_key: false,
            replay: Replay::Stored { marker: None },
            mismatch: Mismatch::NotChecked,
            in_flight: InFlight::RunsAgain,
            processing: Duration::ZERO,
            retention: None,
            scope: Scope { authorization: false, request: true, body: false },
            cache: CacheErrors::SuccessOnly,
        }
    }

    /// Phala Cloud's `POST /cvms` and replica endpoints: no key at all. Every request creates.
    pub fn no_keys() -> Self {
        Self {
            name: "no_keys",
            key: KeyLocation::Nowhere,
            format: KeyFormat::up_to(usize::MAX),
            require_key: false,
            replay: Replay::Stored { marker: None },
            mismatch: Mismatch::NotChecked,
            in_flight: InFlight::RunsAgain,
            processing: Duration::ZERO,
            retention: None,
            scope: Scope::GLOBAL,
            cache: CacheErrors::SuccessOnly,
        }
    }

    /// Every preset that takes keys.
    pub fn keyed() -> Vec<Self> {
        vec![
            Self::ietf(),
            Self::stripe(),
            Self::brandur(),
            Self::django(),
            Self::express(),
            Self::bencher(),
            Self::tower(),
        ]
    }

    /// The preset named `name` (`stripe`, `no_keys` or `no-keys`, …), if there is one.
    pub fn named(name: &str) -> Option<Self> {
        let name = name.replace('-', "_");
        Self::keyed().into_iter().chain([Self::no_keys()]).find(|p| p.name == name)
    }

    /// Sets how long a first request stays in flight.
    pub fn with_processing(mut self, processing: Duration) -> Self {
        self.processing = processing;
        self
    }

    /// Sets the retention (`None`: for ever).
    pub fn with_retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// Sets which answers are stored.
    pub fn with_cache(mut self, cache: CacheErrors) -> Self {
        self.cache = cache;
        self
    }

    /// Whether the server takes keys at all.
    pub fn takes_keys(&self) -> bool {
        self.key != KeyLocation::Nowhere
    }

    /// The client carrier matching this server, `None` if it takes no key.
    pub fn carrier(&self) -> Option<KeyCarrier> {
        match &self.key {
            KeyLocation::Header { name, structured } => {
                let carrier = KeyCarrier::header(name.as_str()).expect("a valid header name");
                Some(if *structured { carrier.quoted() } else { carrier })
            }
            KeyLocation::BodyField(field) => Some(KeyCarrier::body_field(field.clone())),
            KeyLocation::Nowhere => None,
        }
    }

    /// The client replay detector matching this server.
    pub fn replay_detector(&self) -> ReplayDetector {
        match &self.replay {
            Replay::Stored { marker: Some(name) } => ReplayDetector::headers([name.clone()]),
            Replay::StoredAs409 => ReplayDetector::none().replay_status(StatusCode::CONFLICT),
            Replay::Stored { marker: None } | Replay::ExistingObject => ReplayDetector::none(),
        }
    }

    /// What a client must know about this server: the [`ServerConvention`] it follows.
    pub fn convention(&self) -> ServerConvention {
        let mut convention = ServerConvention::no_keys();
        convention.name = self.name;
        convention.carrier = self.carrier();
        convention.max_key_len = self.format.max_len;
        convention.replay = self.replay_detector();
        convention
    }

    /// Configures a client layer for this server ([`IdempotentRetryBuilder::convention`]).
    ///
    /// For a server that takes no key no method gets one: a key the server ignores protects
    /// nothing, and a client that believes its writes are keyed would resend them after a lost
    /// response and create duplicates. Keyless, a write that may have been applied is never
    /// resent; the caller gets an unknown outcome to settle by reading back.
    pub fn configure(&self, builder: IdempotentRetryBuilder) -> IdempotentRetryBuilder {
        builder.convention(&self.convention())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_found_by_name() {
        for profile in ServerProfile::keyed().into_iter().chain([ServerProfile::no_keys()]) {
            assert_eq!(ServerProfile::named(profile.name).map(|p| p.name), Some(profile.name));
        }
        assert_eq!(ServerProfile::named("no-keys").map(|p| p.name), Some("no_keys"));
        assert!(ServerProfile::named("acme").is_none());
    }
}
