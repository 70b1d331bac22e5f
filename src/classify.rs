//! Classification of one attempt: was it a success, a final answer, something to retry, or a
//! refusal of the key? And, for a failure, may the request have been applied?
//!
//! The engine keeps three layers apart: a [`Classifier`] says what an attempt *was*
//! ([`Verdict`]); the engine then *decides* (attempts left, deadline, budget, whether the request
//! is safe to resend) and *sleeps* through an injected [`Sleeper`](crate::time::Sleeper). The classifier
//! is replaceable; [`DefaultClassifier`] documents the default table.

use std::fmt;

use http::{HeaderMap, Method, StatusCode};
use reqwest::Request;

use crate::key::IdempotencyKey;

/// What happened to the request when an attempt failed below HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Delivery {
    /// The request never left: connection refused, DNS or TLS failure, connect timeout.
    /// Always safe to send again.
    NotSent,
    /// The request may have reached the server: reset, EOF, incomplete response, or a timeout
    /// after writing. Safe to send again only with a key, or for an idempotent method.
    MaybeApplied,
}

/// The kind of transport failure, for decisions and for the `cause` field of traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportCause {
    /// The connection could not be established (refused, DNS, TLS).
    Connect,
    /// A timeout: the attempt timeout, or one set on the client.
    Timeout,
    /// The connection was reset or aborted.
    Reset,
    /// The connection closed before a complete response arrived.
    Closed,
    /// The server refused the request unprocessed: an HTTP/2 `REFUSED_STREAM`, or a `GOAWAY`
    /// whose last stream id is below the request's (RFC 9113 §8.7). Safe to send again, key or
    /// not; the engine does so at most [`MAX_REFUSALS`] times per request.
    Refused,
    /// The server's TLS certificate was not accepted. Final: another attempt would meet the
    /// same certificate.
    Certificate,
    /// Any other failure.
    Other,
}

/// How many times one request is sent again after the server [refused](TransportCause::Refused)
/// it unprocessed.
pub const MAX_REFUSALS: u32 = 3;

impl TransportCause {
    /// A short lowercase name, as used in traces.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportCause::Connect => "connect",
            TransportCause::Timeout => "timeout",
            TransportCause::Reset => "reset",
            TransportCause::Closed => "closed",
            TransportCause::Refused => "refused",
            TransportCause::Certificate => "certificate",
            TransportCause::Other => "transport",
        }
    }
}

impl fmt::Display for TransportCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an attempt should be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryKind {
    /// Rate limited: a 429 (refused before processing), or a 503 naming a throttling code.
    Throttled,
    /// A gateway or availability failure (502, 503, 504).
    Unavailable,
    /// The server failed (500).
    ServerError,
    /// The first request with this key is still being processed (409, 423).
    InFlight,
    /// The exchange failed below HTTP.
    Transport(TransportCause),
}

impl RetryKind {
    /// A short lowercase name, as used in traces.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryKind::Throttled => "throttled",
            RetryKind::Unavailable => "unavailable",
            RetryKind::ServerError => "server_error",
            RetryKind::InFlight => "in_flight",
            RetryKind::Transport(cause) => cause.as_str(),
        }
    }
}

impl fmt::Display for RetryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a classifier says about one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Hand the response (or error) to the caller as it is: a success or a final answer.
    Done,
    /// A transient failure: retry if the engine's rules allow.
    Retry {
        /// Why.
        kind: RetryKind,
        /// Whether this attempt may have taken effect on the server. A keyless, non-idempotent
        /// request that may have been applied is never resent.
        may_have_been_applied: bool,
    },
    /// The server refused the key as reused with a different payload.
    KeyReuse,
}

impl Verdict {
    /// A retry verdict with the usual answer to "may it have been applied": no for a 429, a
    /// connect failure or a refused stream, yes for everything else.
    pub fn retry(kind: RetryKind) -> Self {
        let may_have_been_applied = !matches!(
            kind,
            RetryKind::Throttled | RetryKind::Transport(TransportCause::Connect | TransportCause::Refused)
        );
        Verdict::Retry { kind, may_have_been_applied }
    }
}

/// How one attempt ended, as shown to a [`Classifier`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum AttemptResult<'a> {
    /// The server answered.
    Response {
        /// The status.
        status: StatusCode,
        /// The response headers.
        headers: &'a HeaderMap,
        /// The body, for responses with status 400 or above (read in full so the classifier can
        /// look inside); `None` for other statuses, whose body is left streaming for the caller.
        body: Option<&'a [u8]>,
        /// Whether the server marked the response as a replay.
        replayed: bool,
    },
    /// The exchange failed below HTTP.
    Error {
        /// The error.
        error: &'a reqwest_middleware::Error,
        /// Whether the request may have reached the server.
        delivery: Delivery,
        /// The kind of failure.
        cause: TransportCause,
    },
}

/// Everything a classifier may look at: the request, how the attempt ended, and which attempt
/// it was.
#[derive(Debug)]
pub struct AttemptContext<'a> {
    request: &'a Request,
    attempt: u32,
    key: Option<&'a IdempotencyKey>,
    result: AttemptResult<'a>,
}

impl<'a> AttemptContext<'a> {
    /// A context for `request`'s attempt number `attempt` (1-based). Public so custom classifiers
    /// can be unit-tested.
    pub fn new(request: &'a Request, attempt: u32, key: Option<&'a IdempotencyKey>, result: AttemptResult<'a>) -> Self {
        Self { request, attempt, key, result }
    }

    /// The request as sent (key included).
    pub fn request(&self) -> &'a Request {
        self.request
    }

    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.request.method()
    }

    /// 1 for the first attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the request carries an idempotency key.
    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// The key the request carries, if any.
    pub fn key(&self) -> Option<&'a IdempotencyKey> {
        self.key
    }

    /// Whether the method is idempotent by HTTP semantics (GET, HEAD, OPTIONS, TRACE, PUT, DELETE).
    pub fn is_idempotent(&self) -> bool {
        self.request.method().is_idempotent()
    }

    /// How the attempt ended.
    pub fn result(&self) -> AttemptResult<'a> {
        self.result
    }

    /// The response status, if the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self.result {
            AttemptResult::Response { status, .. } => Some(status),
            AttemptResult::Error { .. } => None,
        }
    }

    /// The response body, if it was read (status 400 or above).
    pub fn body(&self) -> Option<&'a [u8]> {
        match self.result {
            AttemptResult::Response { body, .. } => body,
            AttemptResult::Error { .. } => None,
        }
    }
}

/// Decides what an attempt was.
///
/// # Examples
///
/// A server that uses 422 for validation errors, not for key reuse:
///
/// ```
/// use idempotent_retry::{IdempotentRetry, classify::{classify_fn, Classifier, DefaultClassifier, Verdict}};
///
/// let classifier = classify_fn(|ctx| match ctx.status() {
///     Some(s) if s.as_u16() == 422 => Verdict::Done,
///     _ => DefaultClassifier.classify(ctx),
/// });
/// let middleware = IdempotentRetry::builder().classifier(classifier).build();
/// # let _ = middleware;
/// ```
pub trait Classifier: Send + Sync {
    /// Classifies one attempt.
    fn classify(&self, attempt: &AttemptContext<'_>) -> Verdict;
}

/// Wraps a closure as a [`Classifier`].
///
/// A wrapper rather than a blanket impl for closures keeps type inference working at call sites.
pub fn classify_fn<F>(f: F) -> ClassifyFn<F>
where
    F: Fn(&AttemptContext<'_>) -> Verdict + Send + Sync,
{
    ClassifyFn(f)
}

/// See [`classify_fn`].
#[derive(Clone, Copy)]
pub struct ClassifyFn<F>(F);

impl<F> fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClassifyFn(..)")
    }
}

impl<F> Classifier for ClassifyFn<F>
where
    F: Fn(&AttemptContext<'_>) -> Verdict + Send + Sync,
{
    fn classify(&self, attempt: &AttemptContext<'_>) -> Verdict {
        (self.0)(attempt)
    }
}

/// The default classification. The table shows what happens with its verdicts; the "stop"
/// entries are the engine's rules, which apply to any classifier.
///
/// | attempt ended in | keyed request | idempotent method (GET, PUT, DELETE…) | keyless POST/PATCH |
/// |---|---|---|---|
/// | connection refused, DNS or TLS failure (not sent) | retry | retry | retry |
/// | reset, EOF, timeout after sending (maybe applied) | retry | retry | stop: outcome unknown |
/// | 429 | retry (throttled) | retry (throttled) | retry (throttled) |
/// | 503 with a [throttling code](DefaultClassifier::THROTTLING_CODES) | retry (throttled) | retry (throttled) | stop: outcome unknown |
/// | 502, 503, 504 | retry | retry | stop: outcome unknown |
/// | 500 | retry | retry | stop: outcome unknown |
/// | 409 in flight, 423 locked | retry | final | final |
/// | 409 saying "already exists" (the resource, not the key) | final | final | final |
/// | 409 with mismatch text, 422, 417, 400 `idempotency_error` | key-reuse error | final | final |
/// | a replayed answer below 500 (marker header or replay status) | final, `replayed` | – | – |
/// | a replayed 5xx | stop: replayed failure | – | – |
/// | any other status | final | final | final |
///
/// A 5xx or a gateway status means the server (or a proxy in front of it) may have processed the
/// request, so for a keyless POST it is an unknown outcome, not a reason to resend. A 429 is a
/// refusal before processing and is always safe to retry.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl DefaultClassifier {
    /// Phrases by which servers say "this key was used with a different payload" in a 409
    /// (brandur's design: "mismatch"; AWS: `IdempotentParameterMismatch`; Stripe: "same
    /// parameters"). Matched case-insensitively.
    pub const MISMATCH_PHRASES: &'static [&'static str] =
        &["mismatch", "same parameters", "different parameters", "different payload", "different request"];

    /// Whether a response body says the key was reused with another payload.
    pub fn says_mismatch(body: &[u8]) -> bool {
        let text = String::from_utf8_lossy(body).to_ascii_lowercase();
        Self::MISMATCH_PHRASES.iter().any(|p| text.contains(p))
    }

    /// Phrases by which a 409 says the *resource* conflicts (a name taken), not the key: such a
    /// 409 is final even on a keyed request. Matched case-insensitively.
    pub const DOMAIN_CONFLICT_PHRASES: &'static [&'static str] = &["already exists", "already taken", "duplicate"];

    /// Whether a response body says the resource itself conflicts.
    pub fn says_domain_conflict(body: &[u8]) -> bool {
        let text = String::from_utf8_lossy(body).to_ascii_lowercase();
        Self::DOMAIN_CONFLICT_PHRASES.iter().any(|p| text.contains(p))
    }

    /// Error codes by which a server says it is throttling, as the AWS SDKs list them
    /// (smithy-rs `THROTTLING_ERRORS`, botocore `_THROTTLED_ERROR_CODES`). Matched exactly.
    pub const THROTTLING_CODES: &'static [&'static str] = &[
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    ];

    /// Whether a response names a throttling code in a structured field: the `x-amzn-ErrorType`
    /// header, a JSON body's `code`, `__type`, `Code` or `error.code`/`Error.Code`, or an XML
    /// body's `<Code>`. Free text that merely mentions throttling does not count.
    pub fn says_throttling(headers: &HeaderMap, body: &[u8]) -> bool {
        let named = |code: &str| {
            // `com.amazon.coral.availability#ThrottlingException`, `ThrottlingException:http://…`
            let code = code.rsplit('#').next().unwrap_or(code);
            let code = code.split(':').next().unwrap_or(code).trim();
            Self::THROTTLING_CODES.contains(&code)
        };
        if headers.get("x-amzn-errortype").and_then(|v| v.to_str().ok()).is_some_and(named) {
            return true;
        }
        let text = body.trim_ascii_start();
        if text.starts_with(b"{") {
            let Ok(serde_json::Value::Object(doc)) = serde_json::from_slice::<serde_json::Value>(text) else {
                return false;
            };
            let field = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).is_some_and(named);
            let nested = |name: &str| doc.get(name).and_then(|e| e.as_object());
            return ["code", "__type", "Code"].iter().any(|k| field(doc.get(*k)))
                || nested("error").is_some_and(|e| field(e.get("code")))
                || nested("Error").is_some_and(|e| field(e.get("Code")));
        }
        let text = String::from_utf8_lossy(text);
        text.split("<Code>").skip(1).any(|rest| rest.split("</Code>").next().is_some_and(named))
    }

    /// Whether a body carries Stripe's `idempotency_error` type.
    pub fn says_idempotency_error(body: &[u8]) -> bool {
        String::from_utf8_lossy(body).contains("idempotency_error")
    }
}

impl Classifier for DefaultClassifier {
    fn classify(&self, ctx: &AttemptContext<'_>) -> Verdict {
        let keyed = ctx.is_keyed();
        let (status, headers, body) = match ctx.result() {
            AttemptResult::Error { delivery, cause, error } => {
                if cause == TransportCause::Other && !error.is_request() && !error.is_body() {
                    // Builder, redirect or another middleware's error: nothing transient about it.
                    return Verdict::Done;
                }
                if cause == TransportCause::Certificate {
                    return Verdict::Done;
                }
                return Verdict::Retry {
                    kind: RetryKind::Transport(cause),
                    may_have_been_applied: delivery == Delivery::MaybeApplied,
                };
            }
            AttemptResult::Response { status, headers, body, replayed } => {
                // A replayed answer is the original one: final, unless it is a stored 5xx (which
                // the engine then stops on, since every retry would get it again).
                if replayed && !status.is_server_error() {
                    return Verdict::Done;
                }
                (status, headers, body.unwrap_or_default())
            }
        };
        match status.as_u16() {
            429 => Verdict::retry(RetryKind::Throttled),
            // Throttled (cheaper in the budget, the throttled backoff, a cut in the adaptive
            // rate), but still a 503: a proxy may have passed the write on, so it may have been
            // applied.
            503 if Self::says_throttling(headers, body) => {
                Verdict::Retry { kind: RetryKind::Throttled, may_have_been_applied: true }
            }
            502..=504 => Verdict::retry(RetryKind::Unavailable),
            500 => Verdict::retry(RetryKind::ServerError),
            409 if keyed && Self::says_mismatch(body) => Verdict::KeyReuse,
            409 if keyed && Self::says_domain_conflict(body) => Verdict::Done,
            409 | 423 if keyed => Verdict::retry(RetryKind::InFlight),
            422 | 417 if keyed => Verdict::KeyReuse,
            400 if keyed && Self::says_idempotency_error(body) => Verdict::KeyReuse,
            _ => Verdict::Done,
        }
    }
}

/// Works out how far a failed exchange got, from the error and its sources.
pub(crate) fn categorize(error: &reqwest_middleware::Error) -> (Delivery, TransportCause) {
    let reqwest_middleware::Error::Reqwest(e) = error else {
        let timed_out = matches!(error, reqwest_middleware::Error::Middleware(m) if m.is::<AttemptTimedOut>());
        return if timed_out {
            (Delivery::MaybeApplied, TransportCause::Timeout)
        } else {
            (Delivery::MaybeApplied, TransportCause::Other)
        };
    };
    if e.is_builder() {
        return (Delivery::NotSent, TransportCause::Other);
    }
    if e.is_connect() {
        let cause = if e.is_timeout() {
            TransportCause::Timeout
        } else if causes(e).any(rejects_certificate) {
            TransportCause::Certificate
        } else {
            TransportCause::Connect
        };
        return (Delivery::NotSent, cause);
    }
    if e.is_timeout() {
        return (Delivery::MaybeApplied, TransportCause::Timeout);
    }
    for err in causes(e) {
        if let Some(h2) = err.downcast_ref::<h2::Error>()
            && h2.is_remote()
            && (h2.is_go_away() || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)))
        {
            // RFC 9113 §8.7: a refused stream, and a stream above a GOAWAY's last stream id
            // (h2 fails only those with the GOAWAY), were not processed.
            return (Delivery::NotSent, TransportCause::Refused);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                ConnectionReset | ConnectionAborted | BrokenPipe => {
                    return (Delivery::MaybeApplied, TransportCause::Reset);
                }
                UnexpectedEof => return (Delivery::MaybeApplied, TransportCause::Closed),
                _ => {}
            }
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_closed())
        {
            return (Delivery::MaybeApplied, TransportCause::Closed);
        }
    }
    (Delivery::MaybeApplied, TransportCause::Other)
}

/// An error and its sources, each `io::Error` followed by the error it wraps (which its
/// `source` skips: a TLS library's error is found only there).
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    let mut stack: Vec<&'a (dyn std::error::Error + 'static)> = vec![error];
    std::iter::from_fn(move || {
        let current = stack.pop()?;
        let wrapped = current.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        match wrapped {
            // Its sources are the wrapped error's.
            Some(wrapped) => stack.push(wrapped),
            None => stack.extend(current.source()),
        }
        Some(current)
    })
}

/// Whether `error` is a TLS library refusing the server's certificate: rustls's
/// `InvalidCertificate` (reqwest's default TLS), or OpenSSL's "certificate verify failed"
/// (native-tls on Linux).
fn rejects_certificate(error: &(dyn std::error::Error + 'static)) -> bool {
    matches!(error.downcast_ref::<rustls::Error>(), Some(rustls::Error::InvalidCertificate(_)))
        || error.to_string().contains("certificate verify failed")
}

/// The engine's per-attempt timeout fired before response headers arrived.
#[derive(Debug, thiserror::Error)]
#[error("attempt timed out after {0:?} without a response")]
pub(crate) struct AttemptTimedOut(pub(crate) std::time::Duration);

#[cfg(test)]
mod tests {
    use super::*;

    fn _object_safe(_: &dyn Classifier) {}

    fn classify(method: Method, keyed: bool, status: u16, body: &str) -> Verdict {
        let key = IdempotencyKey::random();
        let req = Request::new(method, "http://example.test/x".parse().unwrap());
        let headers = HeaderMap::new();
        let result = AttemptResult::Response {
            status: StatusCode::from_u16(status).unwrap(),
            headers: &headers,
            body: Some(body.as_bytes()),
            replayed: false,
        };
        DefaultClassifier.classify(&AttemptContext::new(&req, 1, keyed.then_some(&key), result))
    }

    #[test]
    fn replayed_answers_are_final_except_server_errors() {
        let key = IdempotencyKey::random();
        let req = Request::new(Method::POST, "http://example.test/x".parse().unwrap());
        let headers = HeaderMap::new();
        let verdict = |status: u16| {
            let result = AttemptResult::Response {
                status: StatusCode::from_u16(status).unwrap(),
                headers: &headers,
                body: Some(br#"{"id":"cvm-1"}"#),
                replayed: true,
            };
            DefaultClassifier.classify(&AttemptContext::new(&req, 2, Some(&key), result))
        };
        assert_eq!(verdict(409), Verdict::Done, "django's replay");
        assert_eq!(verdict(201), Verdict::Done);
        assert_eq!(verdict(400), Verdict::Done);
        assert_eq!(verdict(500), Verdict::retry(RetryKind::ServerError), "the engine stops on it");
    }

    #[test]
    fn a_503_naming_a_throttling_code_is_a_throttle_that_may_have_been_applied() {
        let throttled = Verdict::Retry { kind: RetryKind::Throttled, may_have_been_applied: true };
        for body in [
            r#"{"__type":"com.amazon.coral.availability#ThrottlingException","message":"Rate exceeded"}"#,
            r#"{"code":"SlowDown"}"#,
            r#"  {"Error":{"Code":"RequestLimitExceeded"}}"#,
            r#"{"error":{"code":"TooManyRequestsException","message":"x"}}"#,
            "<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>",
        ] {
            assert_eq!(classify(Method::POST, true, 503, body), throttled, "{body}");
            assert_eq!(classify(Method::POST, false, 503, body), throttled, "{body}: the engine stops a keyless one");
        }
        for body in [
            "Service Unavailable: throttling upstream",
            r#"{"message":"ThrottlingException"}"#,
            r#"{"code":"ServiceUnavailable"}"#,
            "<Code>InternalError</Code>",
            "{not json",
            "",
        ] {
            assert_eq!(classify(Method::POST, true, 503, body), Verdict::retry(RetryKind::Unavailable), "{body}");
        }
        assert_eq!(classify(Method::POST, true, 500, r#"{"code":"SlowDown"}"#), Verdict::retry(RetryKind::ServerError));
        let mut headers = HeaderMap::new();
        headers.insert("x-amzn-ErrorType", "ThrottlingException:http://internal.amazon.com/".parse().unwrap());
        assert!(DefaultClassifier::says_throttling(&headers, b""));
    }

    #[test]
    fn status_table() {
        use Verdict::*;
        let maybe = |kind| Retry { kind, may_have_been_applied: true };
        #[rustfmt::skip]
        let cases: &[(Method, bool, u16, &str, Verdict)] = &[
            (Method::POST, true, 200, "", Done),
            (Method::POST, true, 201, "", Done),
            (Method::POST, true, 429, "", Retry { kind: RetryKind::Throttled, may_have_been_applied: false }),
            (Method::POST, false, 429, "", Retry { kind: RetryKind::Throttled, may_have_been_applied: false }),
            (Method::POST, true, 503, "", maybe(RetryKind::Unavailable)),
            (Method::POST, true, 502, "", maybe(RetryKind::Unavailable)),
            (Method::POST, true, 504, "", maybe(RetryKind::Unavailable)),
            (Method::POST, false, 503, "", maybe(RetryKind::Unavailable)),
            (Method::POST, true, 500, "", maybe(RetryKind::ServerError)),
            (Method::POST, true, 409, r#"{"error":"request in progress"}"#, maybe(RetryKind::InFlight)),
            (Method::POST, true, 409, "", maybe(RetryKind::InFlight)),
            (Method::POST, true, 423, "locked", maybe(RetryKind::InFlight)),
            (Method::POST, true, 409, "There was a MISMATCH between this request's parameters", KeyReuse),
            (Method::POST, true, 409, "IdempotentParameterMismatch", KeyReuse),
            (Method::POST, false, 409, "name already exists", Done),
            (Method::POST, true, 409, r#"{"error":"a cvm named web-1 already exists"}"#, Done),
            (Method::POST, true, 422, "", KeyReuse),
            (Method::POST, true, 417, "", KeyReuse),
            (Method::POST, false, 422, "", Done),
            (Method::POST, true, 400, r#"{"error":{"type":"idempotency_error"}}"#, KeyReuse),
            (Method::POST, true, 400, r#"{"error":"bad field"}"#, Done),
            (Method::POST, true, 404, "", Done),
            (Method::POST, true, 501, "", Done),
            (Method::GET, false, 503, "", maybe(RetryKind::Unavailable)),
            (Method::GET, false, 409, "", Done),
        ];
        for (method, keyed, status, body, want) in cases {
            assert_eq!(
                classify(method.clone(), *keyed, *status, body),
                *want,
                "{method} keyed={keyed} {status} {body:?}"
            );
        }
    }
}
