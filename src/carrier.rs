//! Where the key travels: a header (any name, quoted or bare) or a field of a JSON body.
//!
//! Servers disagree: the IETF draft wants `Idempotency-Key: "…"` (a Structured-Field string,
//! quoted), Stripe and most frameworks take it bare, tower calls it `X-Tower-Idempotency-Key`,
//! bencher wants an `idempotency_key` field in the JSON body. The carrier is a per-server setting.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, InvalidHeaderName};
use reqwest::Request;
use serde_json::Value;

use crate::error::Error;
use crate::key::{IdempotencyKey, KeyError};

/// How a key is put on a request.
///
/// # Examples
///
/// ```
/// use idempotent_retry::KeyCarrier;
///
/// let stripe = KeyCarrier::standard();                       // Idempotency-Key: 3f2a…
/// let ietf = KeyCarrier::ietf();                             // Idempotency-Key: "3f2a…"
/// let tower = KeyCarrier::header("X-Tower-Idempotency-Key").unwrap();
/// let bencher = KeyCarrier::body_field("idempotency_key");   // {"idempotency_key":"3f2a…", …}
/// # let _ = (stripe, ietf, tower, bencher);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCarrier(Carrier);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Carrier {
    Header { name: HeaderName, structured: bool },
    BodyField(String),
}

impl KeyCarrier {
    /// The header most servers use: `Idempotency-Key`.
    pub const DEFAULT_HEADER: &'static str = "Idempotency-Key";

    /// `Idempotency-Key`, bare (Stripe and most server frameworks).
    pub fn standard() -> Self {
        Self(Carrier::Header { name: HeaderName::from_static("idempotency-key"), structured: false })
    }

    /// `Idempotency-Key` as an IETF Structured-Field string, i.e. quoted (draft-ietf-httpapi-idempotency-key-header).
    pub fn ietf() -> Self {
        Self::standard().quoted()
    }

    /// A header with any name, bare.
    ///
    /// # Errors
    ///
    /// If `name` is not a valid header name.
    pub fn header(name: &str) -> Result<Self, InvalidHeaderName> {
        Ok(Self(Carrier::Header { name: HeaderName::from_bytes(name.as_bytes())?, structured: false }))
    }

    /// A string field at the top level of a JSON object body.
    pub fn body_field(name: impl Into<String>) -> Self {
        Self(Carrier::BodyField(name.into()))
    }

    /// For a header carrier, sends the key as a Structured-Field string (`"…"`, the IETF
    /// draft's form). No effect on a body-field carrier.
    pub fn quoted(mut self) -> Self {
        if let Carrier::Header { structured, .. } = &mut self.0 {
            *structured = true;
        }
        self
    }

    /// The header name, for a header carrier.
    pub fn header_name(&self) -> Option<&HeaderName> {
        match &self.0 {
            Carrier::Header { name, .. } => Some(name),
            Carrier::BodyField(_) => None,
        }
    }

    /// The body field name, for a body-field carrier.
    pub fn field_name(&self) -> Option<&str> {
        match &self.0 {
            Carrier::BodyField(field) => Some(field),
            Carrier::Header { .. } => None,
        }
    }

    /// Whether this carrier puts the key in the body (and so needs a JSON object body).
    pub fn in_body(&self) -> bool {
        matches!(self.0, Carrier::BodyField(_))
    }

    /// The header value for `key`, quoted if this carrier uses Structured-Field strings.
    pub fn header_value(&self, key: &IdempotencyKey) -> HeaderValue {
        // Keys are printable ASCII, and quoting adds only '"' and '\\'.
        let value = match &self.0 {
            Carrier::Header { structured: true, .. } => HeaderValue::from_str(&sf_quote(key.as_str())),
            _ => HeaderValue::from_maybe_shared(key.bytes().clone()),
        };
        value.expect("a validated key is a valid header value")
    }

    /// Reads the key a caller already put on the request, if any, and validates it against
    /// `max_len`.
    ///
    /// `body` is the request body if it is in memory; for a body carrier the body must then be a
    /// JSON object.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] if the key present is not valid; [`Error::InvalidRequest`] if the
    /// body cannot carry a key.
    pub fn existing_key(
        &self,
        headers: &HeaderMap,
        body: Option<&[u8]>,
        max_len: usize,
    ) -> Result<Option<IdempotencyKey>, Error> {
        match &self.0 {
            Carrier::Header { name, structured } => {
                let Some(value) = headers.get(name) else { return Ok(None) };
                // Two keys on one request: which one the server reads is its business, and a
                // retry would not know either. Refused, not resolved.
                if headers.get_all(name).iter().nth(1).is_some() {
                    return Err(Error::InvalidRequest(format!(
                        "the request carries the `{name}` header twice: one request has one idempotency key"
                    )));
                }
                // Header values may carry bytes a key may not (obs-text, tabs): report them as a
                // bad key, with the position, before anything else.
                if let Some((position, &byte)) =
                    value.as_bytes().iter().enumerate().find(|(_, b)| !(0x20..=0x7e).contains(*b))
                {
                    return Err(KeyError::InvalidByte { position, byte }.into());
                }
                let text = value.to_str().expect("checked to be visible ASCII or space");
                // Quotes are syntax only for a Structured-Field carrier; for a bare one a `"` is
                // part of the key.
                let raw = if *structured && text.starts_with('"') {
                    sf_unquote(text).ok_or_else(|| {
                        Error::InvalidRequest(format!(
                            "the `{name}` header set on the request is not a valid Structured-Field string"
                        ))
                    })?
                } else {
                    text.to_owned()
                };
                Ok(Some(IdempotencyKey::with_max_len(raw, max_len)?))
            }
            Carrier::BodyField(field) => {
                let object = scan_object(field, body)?;
                match object.field.as_slice() {
                    [] => Ok(None),
                    [Value::String(s)] => Ok(Some(IdempotencyKey::with_max_len(s.clone(), max_len)?)),
                    [_] => {
                        Err(Error::InvalidRequest(format!("the body's `{field}` field is present but is not a string")))
                    }
                    _ => Err(Error::InvalidRequest(format!("the body has more than one `{field}` field"))),
                }
            }
        }
    }

    /// Puts `key` on `request`: sets the header, or adds the field at the end of the JSON body's
    /// object. The body's other bytes are sent as they are: numbers keep every digit, duplicate
    /// members and whitespace stay, nothing is parsed and written out again.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] if the carrier is a body field and the body is not a JSON object
    /// held in memory.
    pub fn attach(&self, request: &mut Request, key: &IdempotencyKey) -> Result<(), Error> {
        match &self.0 {
            Carrier::Header { name, .. } => {
                request.headers_mut().insert(name.clone(), self.header_value(key));
            }
            Carrier::BodyField(field) => {
                let body = request.body().map_or(Some(&[][..]), |b| b.as_bytes());
                let object = scan_object(field, body)?;
                let body = body.expect("scanned, so in memory");
                let close = body.iter().rposition(|b| *b == b'}').expect("an object ends with }");
                let name = serde_json::to_string(field).expect("a string serializes");
                let value = serde_json::to_string(key.as_str()).expect("a string serializes");
                let separator = if object.members == 0 { "" } else { "," };
                let mut bytes = Vec::with_capacity(body.len() + name.len() + value.len() + 2);
                bytes.extend_from_slice(&body[..close]);
                bytes.extend_from_slice(format!("{separator}{name}:{value}").as_bytes());
                bytes.extend_from_slice(&body[close..]);
                *request.body_mut() = Some(Bytes::from(bytes).into());
            }
        }
        Ok(())
    }
}

impl Default for KeyCarrier {
    /// [`KeyCarrier::standard`].
    fn default() -> Self {
        Self::standard()
    }
}

/// What a body-field carrier needs to know about a JSON object body, found without building it.
struct Scanned {
    /// Top-level members.
    members: usize,
    /// The values of the key field, as often as it occurs at the top level.
    field: Vec<Value>,
}

/// Checks that `body` is one JSON object and finds the key field in it, leaving the bytes alone.
fn scan_object(field: &str, body: Option<&[u8]>) -> Result<Scanned, Error> {
    let Some(body) = body else {
        return Err(Error::InvalidRequest(format!(
            "the key goes in the JSON body field `{field}`, but the body is a stream, which cannot be read to add it"
        )));
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::InvalidRequest(format!(
            "the key goes in the JSON body field `{field}`, but the request has no body; send a JSON object"
        )));
    }
    // JSON is UTF-8 (RFC 8259 §8.1). The scan below skips over string values without
    // checking them, so a body with invalid UTF-8 inside a string would pass as an object.
    if std::str::from_utf8(body).is_err() {
        return Err(Error::InvalidRequest(format!(
            "the key goes in the JSON body field `{field}`, but the body is not UTF-8, so it is not JSON"
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let scanned = serde::de::DeserializeSeed::deserialize(TopLevel(field), &mut de).and_then(|s| de.end().map(|()| s));
    match scanned {
        Ok(Ok(scanned)) => Ok(scanned),
        Ok(Err(kind)) => Err(Error::InvalidRequest(format!(
            "the key goes in the JSON body field `{field}`, but the body is a JSON {kind}, not an object"
        ))),
        Err(e) => Err(Error::InvalidRequest(format!(
            "the key goes in the JSON body field `{field}`, but the body is not JSON: {e}"
        ))),
    }
}

/// Visits one JSON value: an object is scanned for the field, anything else is named.
struct TopLevel<'a>(&'a str);

impl<'de> serde::de::DeserializeSeed<'de> for TopLevel<'_> {
    type Value = Result<Scanned, &'static str>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TopLevel<'_> {
    type Value = Result<Scanned, &'static str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut scanned = Scanned { members: 0, field: Vec::new() };
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            scanned.members += 1;
            if name == self.0 {
                scanned.field.push(map.next_value()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Ok(scanned))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Err("array"))
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err("string"))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err("boolean"))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err("number"))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err("number"))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err("number"))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Err("null"))
    }
}

/// RFC 8941 sf-string serialization: `"` + (escaped `\` and `"`) + `"`.
fn sf_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// RFC 8941 sf-string parsing; `None` if malformed.
pub(crate) fn sf_unquote(s: &str) -> Option<String> {
    let inner = s.trim().strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                e @ ('"' | '\\') => out.push(e),
                _ => return None,
            },
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> IdempotencyKey {
        IdempotencyKey::new(s).unwrap()
    }

    /// Found by the `body_field_carrier` fuzz target (libFuzzer): `{"":"\x80"}` (invalid
    /// UTF-8 inside a string) passed as a JSON object and went out with the key added.
    #[test]
    fn a_body_that_is_not_utf8_is_refused() {
        let mut request = Request::new(http::Method::POST, "http://api.test/run".parse().unwrap());
        *request.body_mut() = Some(Bytes::from_static(b"{\"\":\"\x80\"}").into());
        let err = KeyCarrier::body_field("idempotency_key").attach(&mut request, &key("k-1")).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn structured_field_round_trip() {
        for raw in ["abc", r#"a"b"#, r"a\b", r#"\"\\"#] {
            let quoted = sf_quote(raw);
            assert_eq!(sf_unquote(&quoted).as_deref(), Some(raw), "{quoted}");
        }
        assert_eq!(sf_quote(r#"a"b"#), r#""a\"b""#);
        assert_eq!(sf_unquote(r#""a"b""#), None);
        assert_eq!(sf_unquote(r#""a\xb""#), None);
        assert_eq!(sf_unquote("abc"), None);
    }

    #[test]
    fn header_values() {
        let k = key("k-1");
        assert_eq!(KeyCarrier::standard().header_value(&k), "k-1");
        assert_eq!(KeyCarrier::ietf().header_value(&k), "\"k-1\"");
    }

    #[test]
    fn reads_a_users_header_quoted_or_not() {
        let mut h = HeaderMap::new();
        h.insert("idempotency-key", HeaderValue::from_static("\"user-1\""));
        let got = KeyCarrier::ietf().existing_key(&h, None, IdempotencyKey::DEFAULT_MAX_LEN).unwrap();
        assert_eq!(got, Some(key("user-1")));
        h.insert("idempotency-key", HeaderValue::from_static("user-2"));
        let got = KeyCarrier::standard().existing_key(&h, None, IdempotencyKey::DEFAULT_MAX_LEN).unwrap();
        assert_eq!(got, Some(key("user-2")));
        // A bare IETF value is accepted as is; quotes are part of a key for a bare carrier.
        assert_eq!(KeyCarrier::ietf().existing_key(&h, None, 255).unwrap(), Some(key("user-2")));
        h.insert("idempotency-key", HeaderValue::from_static("\"q\""));
        assert_eq!(KeyCarrier::standard().existing_key(&h, None, 255).unwrap(), Some(key("\"q\"")));
        h.insert("idempotency-key", HeaderValue::from_bytes(b"cl\xc3\xa9").unwrap());
        let err = KeyCarrier::standard().existing_key(&h, None, 255).unwrap_err();
        assert!(matches!(err, Error::InvalidKey(KeyError::InvalidByte { position: 2, byte: 0xc3 })), "{err:?}");
        h.insert("idempotency-key", HeaderValue::from_static("a b"));
        let err = KeyCarrier::standard().existing_key(&h, None, 255).unwrap_err();
        assert!(matches!(err, Error::InvalidKey(KeyError::InvalidByte { position: 1, byte: b' ' })), "{err:?}");
        h.insert("idempotency-key", HeaderValue::from_static("user-2"));
        let too_long = KeyCarrier::standard().existing_key(&h, None, 3);
        assert!(matches!(too_long, Err(Error::InvalidKey(_))));
    }

    #[test]
    fn body_field_inserts_and_reads() {
        let c = KeyCarrier::body_field("idempotency_key");
        let mut req = Request::new(http::Method::POST, "http://x.test/".parse().unwrap());
        *req.body_mut() = Some(r#"{"b":1,"a":2}"#.into());
        c.attach(&mut req, &key("k-9")).unwrap();
        let body = req.body().unwrap().as_bytes().unwrap();
        // Field order is kept; the key is appended.
        assert_eq!(std::str::from_utf8(body).unwrap(), r#"{"b":1,"a":2,"idempotency_key":"k-9"}"#);
        assert_eq!(
            c.existing_key(req.headers(), Some(body), IdempotencyKey::DEFAULT_MAX_LEN).unwrap(),
            Some(key("k-9"))
        );
    }

    #[test]
    fn body_field_rejects_what_cannot_carry_a_key() {
        let c = KeyCarrier::body_field("idempotency_key");
        for (body, needle) in
            [("[1,2]", "JSON array, not an object"), ("nope", "not JSON"), ("", "no body"), ("\"s\"", "JSON string")]
        {
            let mut req = Request::new(http::Method::POST, "http://x.test/".parse().unwrap());
            *req.body_mut() = Some(body.to_owned().into());
            let err = c.attach(&mut req, &key("k")).unwrap_err();
            assert!(err.to_string().contains(needle), "{body:?}: {err}");
        }
        let h = HeaderMap::new();
        let err = c.existing_key(&h, Some(br#"{"idempotency_key":5}"#), 255).unwrap_err();
        assert!(err.to_string().contains("not a string"), "{err}");
        let twice = br#"{"idempotency_key":"a","x":1e400,"idempotency_key":"b"}"#;
        let err = c.existing_key(&h, Some(twice), 255).unwrap_err();
        assert!(err.to_string().contains("more than one"), "{err}");
        let trailing = br#"{"a":1} {"b":2}"#;
        assert!(c.existing_key(&h, Some(trailing), 255).unwrap_err().to_string().contains("not JSON"));
        let huge_exponent = br#"{"x":1e400}"#;
        assert_eq!(c.existing_key(&h, Some(huge_exponent), 255).unwrap(), None, "numbers are not converted");
    }
}
