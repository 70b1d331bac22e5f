//! Idempotency keys: one validated value per logical operation.
//!
//! A key is minted (or given) once, before the first attempt, and sent unchanged on every
//! retry. The type guarantees that whatever reaches the wire is a legal key: non-empty,
//! printable ASCII without spaces (0x21–0x7E), and no longer than the server accepts
//! (255 by default; AWS EC2 accepts 64). A bad key is an error at construction, so it never
//! reaches the wire.
//!
//! Keys are secrets of a sort: anyone holding one can read the stored response back from a
//! server that replays. `Debug` therefore prints only a short [fingerprint](IdempotencyKey::fingerprint),
//! and so do the crate's logs; `Display` prints the key itself, for the places that need it.

use bytes::Bytes;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Why a string is not a valid idempotency key.
///
/// The error never contains the key itself, so it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is the empty string.
    #[error("the idempotency key is empty")]
    Empty,
    /// The key is longer than the server accepts.
    #[error("the idempotency key is {len} characters long; this server accepts at most {max}")]
    TooLong {
        /// Length of the rejected key.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
    /// The key contains a byte outside printable ASCII (0x21–0x7E): a space, a control
    /// character such as CR or LF, or part of a non-ASCII character.
    #[error(
        "the idempotency key has byte {byte:#04x} at position {position}; only printable ASCII (0x21-0x7E) is allowed"
    )]
    InvalidByte {
        /// Zero-based byte offset of the first offending byte.
        position: usize,
        /// The offending byte.
        byte: u8,
    },
}

/// A validated idempotency key.
///
/// # Examples
///
/// ```
/// use idempotent_retry::{IdempotencyKey, KeyError};
///
/// // Random (UUIDv4): the default for a new operation.
/// let random = IdempotencyKey::random();
/// assert_eq!(random.as_str().len(), 36);
///
/// // Derived (UUIDv5): the same scope and parts always give the same key.
/// let a = IdempotencyKey::derive(&IdempotencyKey::NAMESPACE, "tenant-42", &["create-cvm", "web-1"]);
/// let b = IdempotencyKey::derive(&IdempotencyKey::NAMESPACE, "tenant-42", &["create-cvm", "web-1"]);
/// assert_eq!(a, b);
///
/// // User-given: validated.
/// assert!(IdempotencyKey::new("deploy-3f2a9c1").is_ok());
/// assert_eq!(IdempotencyKey::new("bad\r\nkey").unwrap_err(), KeyError::InvalidByte { position: 3, byte: b'\r' });
/// assert!(matches!(IdempotencyKey::with_max_len("x".repeat(65), 64), Err(KeyError::TooLong { len: 65, max: 64 })));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(Bytes);

impl IdempotencyKey {
    /// The longest key accepted unless a server says otherwise: 255 (Stripe's limit).
    pub const DEFAULT_MAX_LEN: usize = 255;

    /// The crate's default namespace for [derived](Self::derive) keys.
    ///
    /// It is fixed forever: changing it would change every derived key, and a re-run after an
    /// upgrade would then create duplicates.
    pub const NAMESPACE: Uuid = Uuid::from_u128(0x43958a80_f04e_4835_909f_6485f4499999);

    /// Validates a user-given key against the default maximum length (255).
    ///
    /// # Errors
    ///
    /// [`KeyError`] if the key is empty, too long, or not printable ASCII.
    pub fn new(key: impl Into<String>) -> Result<Self, KeyError> {
        Self::with_max_len(key, Self::DEFAULT_MAX_LEN)
    }

    /// Validates a user-given key against a server-specific maximum length.
    ///
    /// # Errors
    ///
    /// [`KeyError`] if the key is empty, longer than `max_len`, or not printable ASCII.
    pub fn with_max_len(key: impl Into<String>, max_len: usize) -> Result<Self, KeyError> {
        let key = key.into();
        validate(&key, max_len)?;
        Ok(Self(Bytes::from(key)))
    }

    /// A fresh random key (UUIDv4 from a cryptographically secure generator seeded by the
    /// operating system).
    ///
    /// Random keys deliberately do not come from the seeded generator used for jitter: two
    /// processes seeded alike would otherwise mint the same keys for different operations, and
    /// the server would answer one with the other's result.
    pub fn random() -> Self {
        Self::from_uuid(Uuid::new_v4())
    }

    /// The key spelled as a hyphenated lowercase UUID.
    pub fn from_uuid(uuid: Uuid) -> Self {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        uuid.hyphenated().encode_lower(&mut buf);
        // A shared buffer from the start: every header built from the key, and every clone of a
        // request carrying it, only bumps a reference count.
        Self(Bytes::from_owner(buf))
    }

    /// A deterministic key: UUIDv5 of `namespace` and an unambiguous encoding of `scope`
    /// followed by `parts`.
    ///
    /// `scope` is the caller's own scope: the account, tenant or project on whose behalf the
    /// operation runs. It must be part of the key because not every server scopes keys: two
    /// tenants creating `web-1` through a server with one global key space would otherwise send
    /// the same key, and the second would receive the first one's resource.
    ///
    /// Each field is length-prefixed before hashing, so `["ab", "c"]` and `["a", "bc"]` give
    /// different keys. The encoding is stable across releases.
    pub fn derive(namespace: &Uuid, scope: &str, parts: &[&str]) -> Self {
        let mut name = Vec::with_capacity(16 + scope.len() + parts.iter().map(|p| p.len() + 8).sum::<usize>());
        for field in std::iter::once(&scope).chain(parts) {
            name.extend_from_slice(field.len().to_string().as_bytes());
            name.push(b':');
            name.extend_from_slice(field.as_bytes());
            name.push(b',');
        }
        Self::from_uuid(Uuid::new_v5(namespace, &name))
    }

    /// The key as sent on the wire (before any carrier quoting).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("validated as printable ASCII")
    }

    /// The key's bytes, shared (cloning is a reference-count increment).
    pub(crate) fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// Length of the key in bytes (equal to characters: keys are ASCII).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always `false`: a valid key is never empty. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks the key against a server's maximum length.
    ///
    /// # Errors
    ///
    /// [`KeyError::TooLong`] if the key is longer than `max_len`.
    pub fn check_max_len(&self, max_len: usize) -> Result<(), KeyError> {
        if self.len() > max_len {
            return Err(KeyError::TooLong { len: self.len(), max: max_len });
        }
        Ok(())
    }

    /// A short, stable, non-reversible fingerprint of the key (the first 12 hex digits of its
    /// SHA-256), for logs and traces. Logs carry this, never the key.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(&self.0);
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn validate(key: &str, max_len: usize) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if let Some((position, &byte)) = key.as_bytes().iter().enumerate().find(|(_, b)| !(0x21..=0x7e).contains(*b)) {
        return Err(KeyError::InvalidByte { position, byte });
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong { len: key.len(), max: max_len });
    }
    Ok(())
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey(sha256:{})", self.fingerprint())
    }
}

impl AsRef<str> for IdempotencyKey {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl FromStr for IdempotencyKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = KeyError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for IdempotencyKey {
    type Error = KeyError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl Serialize for IdempotencyKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for IdempotencyKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_printable_ascii_up_to_the_limit() {
        let all: String = (0x21u8..=0x7e).map(char::from).collect();
        assert_eq!(IdempotencyKey::new(all.clone()).unwrap().as_str(), all);
        assert!(IdempotencyKey::new("k".repeat(255)).is_ok());
        assert!(IdempotencyKey::with_max_len("k".repeat(64), 64).is_ok());
    }

    #[test]
    fn rejects_bad_keys_with_the_reason() {
        let cases: &[(&str, KeyError)] = &[
            ("", KeyError::Empty),
            ("a b", KeyError::InvalidByte { position: 1, byte: b' ' }),
            ("ab\r\n", KeyError::InvalidByte { position: 2, byte: b'\r' }),
            ("ab\n", KeyError::InvalidByte { position: 2, byte: b'\n' }),
            ("clé", KeyError::InvalidByte { position: 2, byte: 0xc3 }),
            ("tab\t", KeyError::InvalidByte { position: 3, byte: b'\t' }),
            ("del\x7f", KeyError::InvalidByte { position: 3, byte: 0x7f }),
        ];
        for (key, want) in cases {
            assert_eq!(IdempotencyKey::new(*key).unwrap_err(), *want, "{key:?}");
        }
        assert_eq!(IdempotencyKey::new("k".repeat(256)).unwrap_err(), KeyError::TooLong { len: 256, max: 255 });
        assert_eq!(
            IdempotencyKey::with_max_len("k".repeat(65), 64).unwrap_err(),
            KeyError::TooLong { len: 65, max: 64 }
        );
    }

    #[test]
    fn errors_do_not_leak_the_key() {
        let err = IdempotencyKey::new(format!("secret-{}", "x".repeat(300))).unwrap_err();
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn random_keys_are_uuid_v4_and_distinct() {
        let a = IdempotencyKey::random();
        let b = IdempotencyKey::random();
        assert_ne!(a, b);
        assert_eq!(Uuid::parse_str(a.as_str()).unwrap().get_version_num(), 4);
    }

    #[test]
    fn derived_keys_are_stable_and_unambiguous() {
        let ns = IdempotencyKey::NAMESPACE;
        let k = IdempotencyKey::derive(&ns, "acct-1", &["create-cvm", "web-1"]);
        // Fixed vector, computed independently with Python: uuid5(NAMESPACE, "6:acct-1,10:create-cvm,5:web-1,").
        // A change here changes every derived key ever issued.
        assert_eq!(k.as_str(), "4ac6a298-5f0e-5b46-a45c-57cc2c8a320f");
        assert_eq!(Uuid::parse_str(k.as_str()).unwrap().get_version_num(), 5);
        assert_ne!(IdempotencyKey::derive(&ns, "s", &["ab", "c"]), IdempotencyKey::derive(&ns, "s", &["a", "bc"]));
        assert_ne!(IdempotencyKey::derive(&ns, "tenant-a", &["op"]), IdempotencyKey::derive(&ns, "tenant-b", &["op"]));
        assert_ne!(IdempotencyKey::derive(&ns, "", &["a"]), IdempotencyKey::derive(&ns, "a", &[]));
        let other_ns = Uuid::from_u128(1);
        assert_ne!(IdempotencyKey::derive(&other_ns, "acct-1", &["create-cvm", "web-1"]), k);
    }

    #[test]
    fn debug_hides_the_key_display_shows_it() {
        let k = IdempotencyKey::new("my-very-secret-key").unwrap();
        assert_eq!(k.to_string(), "my-very-secret-key");
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("secret"), "{dbg}");
        assert_eq!(k.fingerprint().len(), 12);
    }

    #[test]
    fn serde_round_trips_and_validates() {
        let k = IdempotencyKey::new("abc-123").unwrap();
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, "\"abc-123\"");
        assert_eq!(serde_json::from_str::<IdempotencyKey>(&json).unwrap(), k);
        assert!(serde_json::from_str::<IdempotencyKey>("\"a\\nb\"").is_err());
        assert!(serde_json::from_str::<IdempotencyKey>("\"\"").is_err());
    }
}
