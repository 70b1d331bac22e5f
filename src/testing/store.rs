//! The idempotency store a fake server runs in front of its create handlers, following a
//! [`ServerProfile`]. Pure: time comes in as an argument, the handler as a closure.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::profile::{InFlight, KeyLocation, Mismatch, Replay, ServerProfile};
use crate::carrier::sf_unquote;

/// A request as the store sees it.
pub(crate) struct Incoming<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// What a create handler did.
#[derive(Debug, Clone)]
pub(crate) struct Handled {
    pub status: StatusCode,
    pub body: Bytes,
    /// The answer's own headers (e.g. where to poll a long-running create), kept with it.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The resource created, if any.
    pub created: Option<String>,
}

impl Handled {
    /// An answer without headers of its own.
    pub(crate) fn new(status: StatusCode, body: Bytes, created: Option<String>) -> Self {
        Self { status, body, headers: Vec::new(), created }
    }
}

/// The answer to send.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// How long the answer takes (the first request of a key is processed this long).
    pub processing: Duration,
}

impl Answer {
    /// A JSON answer, sent at once.
    pub(crate) fn json(status: StatusCode, body: Value) -> Self {
        Self { status, body: Bytes::from(body.to_string()), headers: Vec::new(), processing: Duration::ZERO }
    }

    /// An answer with no body, sent at once.
    pub(crate) fn empty(status: StatusCode) -> Self {
        Self { status, body: Bytes::new(), headers: Vec::new(), processing: Duration::ZERO }
    }
}

/// The key of a request, as the server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyRead {
    Absent,
    Key(String),
    Malformed(String),
}

/// Reads the key the way `profile`'s server does, checking its format.
pub(crate) fn read_key(profile: &ServerProfile, headers: &HeaderMap, body: &[u8]) -> KeyRead {
    let raw = match &profile.key {
        KeyLocation::Nowhere => return KeyRead::Absent,
        KeyLocation::Header { name, structured } => {
            let Some(value) = headers.get(name) else { return KeyRead::Absent };
            let Ok(text) = value.to_str() else { return KeyRead::Malformed("the key is not ASCII".into()) };
            if *structured {
                match sf_unquote(text) {
                    Some(inner) => inner,
                    None => return KeyRead::Malformed(format!("`{name}` must be a Structured-Field string (quoted)")),
                }
            } else {
                text.to_owned()
            }
        }
        KeyLocation::BodyField(field) => match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => match map.get(field) {
                None | Some(Value::Null) => return KeyRead::Absent,
                Some(Value::String(s)) => s.clone(),
                Some(_) => return KeyRead::Malformed(format!("`{field}` must be a string")),
            },
            _ => return KeyRead::Absent,
        },
    };
    let format = profile.format;
    if raw.len() < format.min_len || raw.len() > format.max_len {
        return KeyRead::Malformed(format!(
            "the key must be {} to {} characters, not {}",
            format.min_len,
            format.max_len,
            raw.len()
        ));
    }
    if format.uuid_only && uuid::Uuid::parse_str(&raw).is_err() {
        return KeyRead::Malformed("the key must be a UUID".into());
    }
    KeyRead::Key(raw)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EntryId {
    key: String,
    authorization: Option<Vec<u8>>,
    request: Option<String>,
    body: Option<[u8; 32]>,
}

#[derive(Debug)]
struct Entry {
    fingerprint: [u8; 32],
    started: SystemTime,
    ready_at: SystemTime,
    /// The stored answer; `None` when the answer is not cached (the entry then only marks the
    /// key as in flight until `ready_at`).
    answer: Option<Handled>,
}

/// Stored keys and their answers.
#[derive(Debug, Default)]
pub(crate) struct Store {
    entries: HashMap<EntryId, Entry>,
}

impl Store {
    /// Answers a create request: runs `run` (the handler) when the key is new, or answers from the
    /// store. `render` re-renders an existing resource by id (for [`Replay::ExistingObject`]).
    pub(crate) fn handle(
        &mut self,
        profile: &ServerProfile,
        incoming: &Incoming<'_>,
        now: SystemTime,
        run: &mut dyn FnMut() -> Handled,
        render: &dyn Fn(&str) -> Option<Bytes>,
    ) -> Answer {
        let key = match read_key(profile, incoming.headers, incoming.body) {
            KeyRead::Absent if profile.require_key => {
                return Answer::json(StatusCode::BAD_REQUEST, json!({"error": "an idempotency key is required"}));
            }
            KeyRead::Absent => return fresh(run(), Duration::ZERO),
            KeyRead::Malformed(why) => {
                return Answer::json(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("invalid idempotency key: {why}")}),
                );
            }
            KeyRead::Key(key) => key,
        };
        let fingerprint = payload_fingerprint(profile, incoming.body);
        let id = EntryId::new(profile, incoming, key, fingerprint);
        if let Some(retention) = profile.retention
            && self.entries.get(&id).is_some_and(|e| now >= e.started + retention)
        {
            self.entries.remove(&id);
        }

        let Some(entry) = self.entries.get(&id) else {
            let handled = run();
            let answer = profile.cache.caches(handled.status).then(|| handled.clone());
            let ready_at = now + profile.processing;
            self.entries.insert(id, Entry { fingerprint, started: now, ready_at, answer });
            return fresh(handled, profile.processing);
        };
        if now < entry.ready_at {
            return in_flight(profile.in_flight).unwrap_or_else(|| fresh(run(), profile.processing));
        }
        if entry.fingerprint != fingerprint
            && let Some(refused) = mismatch(profile.mismatch)
        {
            return refused;
        }
        let replayed = entry.answer.clone().and_then(|stored| replay(&profile.replay, stored, render));
        replayed.unwrap_or_else(|| {
            // Not cached (an error the server does not keep), or the object is gone (or was
            // never made): this is a new request.
            self.entries.remove(&id);
            self.handle(profile, incoming, now, run, render)
        })
    }
}

impl EntryId {
    /// What the server's stored keys are scoped to.
    fn new(profile: &ServerProfile, incoming: &Incoming<'_>, key: String, fingerprint: [u8; 32]) -> Self {
        let authorization = incoming.headers.get(http::header::AUTHORIZATION);
        EntryId {
            key,
            authorization: profile
                .scope
                .authorization
                .then(|| authorization.map_or_else(Vec::new, |v| v.as_bytes().to_vec())),
            request: profile.scope.request.then(|| format!("{} {}", incoming.method, incoming.path)),
            body: profile.scope.body.then_some(fingerprint),
        }
    }
}

/// The answer to a key whose first request is still being processed; `None` when the server
/// runs the request again.
fn in_flight(in_flight: InFlight) -> Option<Answer> {
    Some(match in_flight {
        InFlight::Status409 => Answer::json(
            StatusCode::CONFLICT,
            json!({"error": "a request with this idempotency key is in progress; retry later"}),
        ),
        InFlight::Status423 => Answer::json(
            StatusCode::LOCKED,
            json!({"detail": "the idempotency key is locked by a request in progress"}),
        ),
        InFlight::Status429 => Answer::json(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": "lock_wait: a request with this idempotency key is in progress"}),
        ),
        InFlight::Status503 => Answer::json(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "database is locked"})),
        InFlight::RunsAgain => return None,
    })
}

/// The refusal of a key reused with another payload; `None` when the server does not check.
fn mismatch(mismatch: Mismatch) -> Option<Answer> {
    let (status, body) = match mismatch {
        Mismatch::Status422 => (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"title": "Idempotency-Key is already used with a different request payload"}),
        ),
        Mismatch::Status417 => (
            StatusCode::EXPECTATION_FAILED,
            json!({"error": "idempotency key reused with a different request payload"}),
        ),
        Mismatch::Status409 => (
            StatusCode::CONFLICT,
            json!({"message": "There was a mismatch between this request's parameters and the parameters of a previously stored request with the same Idempotency-Key."}),
        ),
        Mismatch::Stripe400 => (
            StatusCode::BAD_REQUEST,
            json!({"error": {"type": "idempotency_error", "message": "Keys for idempotent requests can only be used with the same parameters they were first used with."}}),
        ),
        Mismatch::NotChecked => return None,
    };
    Some(Answer::json(status, body))
}

/// The stored answer replayed as `replay` says; `None` when an existing object is gone.
fn replay(replay: &Replay, stored: Handled, render: &dyn Fn(&str) -> Option<Bytes>) -> Option<Answer> {
    let answer = |status, body, headers| Answer { status, body, headers, processing: Duration::ZERO };
    match replay {
        Replay::Stored { marker } => {
            let mut headers = stored.headers;
            headers.extend(marker.iter().map(|m| (m.clone(), HeaderValue::from_static("true"))));
            Some(answer(stored.status, stored.body, headers))
        }
        Replay::StoredAs409 => Some(answer(StatusCode::CONFLICT, stored.body, Vec::new())),
        Replay::ExistingObject => {
            let body = stored.created.as_deref().and_then(render)?;
            Some(answer(StatusCode::CREATED, body, Vec::new()))
        }
    }
}

fn fresh(handled: Handled, processing: Duration) -> Answer {
    Answer { status: handled.status, body: handled.body, headers: handled.headers, processing }
}

/// SHA-256 of the payload; for a body-field key, of the body without the key field.
fn payload_fingerprint(profile: &ServerProfile, body: &[u8]) -> [u8; 32] {
    let bytes = match &profile.key {
        KeyLocation::BodyField(field) => match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(mut map)) => {
                map.remove(field);
                serde_json::to_vec(&Value::Object(map)).expect("a JSON object serializes")
            }
            _ => body.to_vec(),
        },
        _ => body.to_vec(),
    };
    Sha256::digest(&bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::profile::CacheErrors;

    struct Fixture {
        store: Store,
        created: Vec<String>,
        now: SystemTime,
    }

    impl Fixture {
        fn new() -> Self {
            Self { store: Store::default(), created: Vec::new(), now: SystemTime::UNIX_EPOCH }
        }

        fn post(&mut self, profile: &ServerProfile, key: Option<&str>, body: &str) -> Answer {
            self.send(profile, key, body, StatusCode::CREATED)
        }

        fn send(&mut self, profile: &ServerProfile, key: Option<&str>, body: &str, status: StatusCode) -> Answer {
            let mut headers = HeaderMap::new();
            if let Some(k) = key {
                headers.insert("idempotency-key", k.parse().unwrap());
            }
            let created = &mut self.created;
            let mut run = || {
                if !status.is_success() {
                    return Handled::new(status, Bytes::from_static(b"{\"error\":\"boom\"}"), None);
                }
                let id = format!("r{}", created.len() + 1);
                created.push(id.clone());
                Handled::new(status, Bytes::from(format!("{{\"id\":\"{id}\"}}")), Some(id))
            };
            let incoming = Incoming { method: "POST", path: "/cvms", headers: &headers, body: body.as_bytes() };
            self.store
                .handle(profile, &incoming, self.now, &mut run, &|id| Some(Bytes::from(format!("{{\"id\":\"{id}\"}}"))))
        }
    }

    #[test]
    fn replay_forms() {
        let mut f = Fixture::new();
        let stripe = ServerProfile::stripe();
        let first = f.post(&stripe, Some("k1"), "{}");
        let again = f.post(&stripe, Some("k1"), "{}");
        assert_eq!((first.status, again.status), (StatusCode::CREATED, StatusCode::CREATED));
        assert_eq!(first.body, again.body);
        assert!(first.headers.is_empty());
        assert_eq!(again.headers[0].0, "idempotent-replayed");
        assert_eq!(f.created.len(), 1);

        let django = ServerProfile::django();
        f.post(&django, Some("k2"), "{}");
        assert_eq!(f.post(&django, Some("k2"), "{}").status, StatusCode::CONFLICT);
        // The body is part of the key: another payload is another request.
        assert_eq!(f.post(&django, Some("k2"), "{\"x\":1}").status, StatusCode::CREATED);
        assert_eq!(f.created.len(), 3);
    }

    #[test]
    fn mismatch_statuses() {
        for (profile, want) in [
            (ServerProfile::ietf(), StatusCode::UNPROCESSABLE_ENTITY),
            (ServerProfile::express(), StatusCode::EXPECTATION_FAILED),
            (ServerProfile::brandur(), StatusCode::CONFLICT),
            (ServerProfile::stripe(), StatusCode::BAD_REQUEST),
        ] {
            let mut f = Fixture::new();
            let key = Some("a-key-long-enough-for-brandur");
            let headers_key = if matches!(profile.key, KeyLocation::Header { structured: true, .. }) {
                Some("\"a-key-long-enough-for-brandur\"")
            } else {
                key
            };
            assert_eq!(f.post(&profile, headers_key, "{\"a\":1}").status, StatusCode::CREATED, "{}", profile.name);
            assert_eq!(f.post(&profile, headers_key, "{\"a\":2}").status, want, "{}", profile.name);
            assert_eq!(f.created.len(), 1);
        }
    }

    #[test]
    fn in_flight_then_replay_on_the_servers_clock() {
        let profile = ServerProfile::ietf().with_processing(Duration::from_secs(2));
        let mut f = Fixture::new();
        assert_eq!(f.post(&profile, Some("\"k\""), "{}").processing, Duration::from_secs(2));
        f.now += Duration::from_secs(1);
        assert_eq!(f.post(&profile, Some("\"k\""), "{}").status, StatusCode::CONFLICT);
        f.now += Duration::from_secs(1);
        assert_eq!(f.post(&profile, Some("\"k\""), "{}").status, StatusCode::CREATED);
        assert_eq!(f.created.len(), 1);

        let mut runs_again = ServerProfile::tower().with_processing(Duration::from_secs(2));
        runs_again.key = KeyLocation::Header { name: HeaderName::from_static("idempotency-key"), structured: false };
        let mut f = Fixture::new();
        f.post(&runs_again, Some("k"), "{}");
        f.post(&runs_again, Some("k"), "{}");
        assert_eq!(f.created.len(), 2, "no in-flight check: both run");
    }

    #[test]
    fn retention_expires_keys() {
        let profile = ServerProfile::stripe().with_retention(Some(Duration::from_secs(60)));
        let mut f = Fixture::new();
        f.post(&profile, Some("k"), "{}");
        f.now += Duration::from_secs(59);
        f.post(&profile, Some("k"), "{}");
        assert_eq!(f.created.len(), 1);
        f.now += Duration::from_secs(1);
        f.post(&profile, Some("k"), "{}");
        assert_eq!(f.created.len(), 2, "forgotten after retention: a duplicate");
    }

    #[test]
    fn cached_and_uncached_errors() {
        let mut f = Fixture::new();
        let stripe = ServerProfile::stripe();
        assert_eq!(f.send(&stripe, Some("k"), "{}", StatusCode::INTERNAL_SERVER_ERROR).status, 500);
        let again = f.post(&stripe, Some("k"), "{}");
        assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR, "Stripe replays the 500");
        assert_eq!(again.headers.len(), 1);
        assert!(f.created.is_empty());

        let express = ServerProfile::express();
        f.send(&express, Some("k"), "{}", StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(f.post(&express, Some("k"), "{}").status, StatusCode::CREATED, "2xx only: runs again");
        assert_eq!(f.created.len(), 1);

        let listed = ServerProfile::ietf().with_cache(CacheErrors::Statuses(vec![503]));
        assert!(listed.cache.caches(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!listed.cache.caches(StatusCode::INTERNAL_SERVER_ERROR));
    }

    #[test]
    fn key_formats_and_scopes() {
        let mut headers = HeaderMap::new();
        headers.insert("idempotency-key", "short".parse().unwrap());
        assert!(matches!(read_key(&ServerProfile::brandur(), &headers, b""), KeyRead::Malformed(_)));
        assert!(matches!(read_key(&ServerProfile::ietf(), &headers, b""), KeyRead::Malformed(_)), "ietf wants quotes");
        headers.insert("idempotency-key", "\"quoted\"".parse().unwrap());
        assert_eq!(read_key(&ServerProfile::ietf(), &headers, b""), KeyRead::Key("quoted".into()));
        let bencher = ServerProfile::bencher();
        let body = br#"{"idempotency_key":"not-a-uuid"}"#;
        assert!(matches!(read_key(&bencher, &HeaderMap::new(), body), KeyRead::Malformed(_)));
        let body = br#"{"idempotency_key":"8d3c1f0e-6a3b-4c53-9f5e-2a1b3c4d5e6f"}"#;
        assert!(matches!(read_key(&bencher, &HeaderMap::new(), body), KeyRead::Key(_)));
        assert_eq!(read_key(&ServerProfile::no_keys(), &headers, b""), KeyRead::Absent);

        // Stripe scopes keys per account: the same key from another account is another request.
        let mut f = Fixture::new();
        let stripe = ServerProfile::stripe();
        f.post(&stripe, Some("k"), "{}");
        let mut other = HeaderMap::new();
        other.insert("idempotency-key", "k".parse().unwrap());
        other.insert("authorization", "Bearer other".parse().unwrap());
        let incoming = Incoming { method: "POST", path: "/cvms", headers: &other, body: b"{}" };
        let mut ran = false;
        let mut run = || {
            ran = true;
            Handled::new(StatusCode::CREATED, Bytes::new(), None)
        };
        f.store.handle(&stripe, &incoming, f.now, &mut run, &|_| None);
        assert!(ran);
    }
}
