//! Replay detection: did the server answer from its idempotency store?
//!
//! Stripe marks replays with `Idempotent-Replayed: true`; other servers spell it
//! `Idempotency-Replayed`; django-idempotency-key replays with the stored body under status 409.
//! Many servers do not mark replays at all (bencher re-renders the existing object with 201);
//! for those the flag stays `false` and the caller must infer from the resource.

use http::{HeaderMap, HeaderName, StatusCode};

use crate::key::IdempotencyKey;

/// Recognises a replayed response by its headers.
///
/// # Examples
///
/// ```
/// use http::HeaderMap;
/// use idempotent_retry::ReplayDetector;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("idempotent-replayed", "true".parse().unwrap());
/// assert!(ReplayDetector::standard().is_replayed(&headers));
/// assert!(!ReplayDetector::none().is_replayed(&headers));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayDetector {
    headers: Vec<HeaderName>,
    status: Option<StatusCode>,
}

impl ReplayDetector {
    /// `Idempotent-Replayed` (Stripe) and `Idempotency-Replayed`.
    pub fn standard() -> Self {
        Self::headers([HeaderName::from_static("idempotent-replayed"), HeaderName::from_static("idempotency-replayed")])
    }

    /// Recognises replays by the given header names.
    pub fn headers(names: impl IntoIterator<Item = HeaderName>) -> Self {
        Self { headers: names.into_iter().collect(), status: None }
    }

    /// Also recognises replays by the header `name`.
    pub fn marker(mut self, name: HeaderName) -> Self {
        if !self.headers.contains(&name) {
            self.headers.push(name);
        }
        self
    }

    /// Never reports a replay.
    pub fn none() -> Self {
        Self { headers: Vec::new(), status: None }
    }

    /// Also treats `status` on a keyed request as a replay of the stored response, for servers
    /// that replay under a status of their own (django-idempotency-key: 409 with the original
    /// body and no marker). Such a server's 409 means only that: it has no "still running"
    /// answer (django runs a request that arrives during the first one again; its 423 means its
    /// store lookup timed out).
    ///
    /// ```
    /// use http::{HeaderMap, StatusCode};
    /// use idempotent_retry::{IdempotencyKey, ReplayDetector};
    ///
    /// let django = ReplayDetector::none().replay_status(StatusCode::CONFLICT);
    /// let key = IdempotencyKey::random();
    /// assert!(django.is_replay(StatusCode::CONFLICT, &HeaderMap::new(), Some(&key)));
    /// assert!(!django.is_replay(StatusCode::CONFLICT, &HeaderMap::new(), None), "no key: a plain conflict");
    /// ```
    pub fn replay_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// Whether `status`, answering a request sent with `key`, is this server's replay of a
    /// *successful* original (see [`replay_status`](Self::replay_status)). Without a key there
    /// is nothing to replay.
    pub fn is_success_replay(&self, status: StatusCode, key: Option<&IdempotencyKey>) -> bool {
        key.is_some() && self.status == Some(status)
    }

    /// Whether a response to a request sent with `key` (or none) is a replay: by a marker
    /// header, or by the [replay status](Self::replay_status) when there was a key.
    pub fn is_replay(&self, status: StatusCode, headers: &HeaderMap, key: Option<&IdempotencyKey>) -> bool {
        self.is_success_replay(status, key) || self.is_replayed(headers)
    }

    /// Whether the response carries one of the marker headers at all, whatever it says (a
    /// server that writes `Idempotent-Replayed: false` shows it reads keys), or `echo`, the key's
    /// own header sent back. One pass over the response's few headers, no hash lookups.
    pub(crate) fn carries_marker_or(&self, headers: &HeaderMap, echo: Option<&HeaderName>) -> bool {
        headers.keys().any(|name| echo == Some(name) || self.headers.contains(name))
    }

    /// Whether any marker header says "true" (`true`, `1`, or the Structured-Field boolean `?1`,
    /// case-insensitively).
    pub fn is_replayed(&self, headers: &HeaderMap) -> bool {
        // Responses carry few headers: one pass over them beats a hash lookup per marker name.
        !self.headers.is_empty()
            && headers.iter().any(|(name, value)| {
                self.headers.contains(name)
                    && value.to_str().is_ok_and(|v| {
                        let v = v.trim();
                        v.eq_ignore_ascii_case("true") || v == "1" || v == "?1"
                    })
            })
    }
}

impl Default for ReplayDetector {
    /// [`ReplayDetector::standard`].
    fn default() -> Self {
        Self::standard()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        let d = ReplayDetector::standard();
        for (name, value, want) in [
            ("idempotent-replayed", "true", true),
            ("Idempotent-Replayed", "TRUE", true),
            ("idempotency-replayed", "?1", true),
            ("idempotency-replayed", "1", true),
            ("idempotent-replayed", "false", false),
            ("idempotent-replayed", "?0", false),
            ("x-replayed", "true", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
            assert_eq!(d.is_replayed(&h), want, "{name}: {value}");
        }
        let custom = ReplayDetector::headers([HeaderName::from_static("x-replayed")]);
        let mut h = HeaderMap::new();
        h.insert("x-replayed", "true".parse().unwrap());
        assert!(custom.is_replayed(&h));
    }
}
