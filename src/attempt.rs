//! One attempt: send down the middleware chain and read what must be read, all within the
//! attempt's time limit, keeping at most a bounded number of body bytes in memory.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Extensions, HeaderMap, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use reqwest::{Request, Response, ResponseBuilderExt, Url};
use reqwest_middleware::Next;

use crate::classify::{AttemptResult, AttemptTimedOut, Delivery, TransportCause, categorize};
use crate::error::LastAttempt;
use crate::time::{Sleeper, Within, within};

/// Responses with a status at or above this have their body read before classification.
const BUFFER_FROM: u16 = 400;

/// What an attempt reads into memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    /// Read the body of every response, not only of error responses.
    pub all_bodies: bool,
    /// The most body bytes kept in memory.
    pub max_body: usize,
}

/// How an attempt ended.
pub(crate) enum Ended {
    /// A response whose body is still streaming (status below 400, bodies not read).
    Streaming(Response),
    /// A response whose body has been read, in full or up to the limit.
    Buffered(Buffered),
    /// A transport failure.
    Transport { error: reqwest_middleware::Error, delivery: Delivery, cause: TransportCause },
}

/// A response whose body has been read (up to the limit), with everything needed to rebuild it.
pub(crate) struct Buffered {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    url: Url,
    extensions: Extensions,
    /// The body, or its first `max_body` bytes.
    body: Bytes,
    /// The unread rest of a body longer than the limit.
    rest: Option<Remainder>,
}

/// Sends `request` down the chain and reads what `reading` asks for, giving up after `limit`
/// (measured by `sleeper`). The limit covers the body: a server that sends headers and then
/// stalls is a timed-out attempt, not a hang. Await it and hand the result to [`ended`].
///
/// Not an `async fn`: one would keep the request both as its argument and inside the exchange
/// it sends, doubling the attempt's future, which every request's future contains.
pub(crate) fn send<'a>(
    next: Next<'a>,
    request: Request,
    extensions: &'a mut Extensions,
    limit: Option<Duration>,
    sleeper: &dyn Sleeper,
    reading: Reading,
) -> Within<impl Future<Output = Result<Ended, reqwest_middleware::Error>> + 'a> {
    let exchange = async move {
        match next.run(request, extensions).await {
            Ok(response) if reading.all_bodies || response.status().as_u16() >= BUFFER_FROM => {
                Buffered::read(response, reading.max_body).await
            }
            Ok(response) => Ok(Ended::Streaming(response)),
            Err(error) => Err(error),
        }
    };
    within(sleeper, limit, exchange)
}

/// How the attempt [`send`] ran ended, with `limit`, the limit it ran under.
pub(crate) fn ended(result: Result<Result<Ended, reqwest_middleware::Error>, ()>, limit: Option<Duration>) -> Ended {
    let result = match result {
        Ok(result) => result,
        Err(()) => {
            let limit = limit.expect("only a limit expires");
            Err(reqwest_middleware::Error::middleware(AttemptTimedOut(limit)))
        }
    };
    result.unwrap_or_else(|mut error| {
        let (delivery, cause) = categorize(&error);
        // reqwest's errors show their URL: never its password or query values.
        if let reqwest_middleware::Error::Reqwest(e) = &mut error
            && let Some(url) = e.url_mut()
            && let Ok(shown) = Url::parse(&crate::target::redact(url))
        {
            *url = shown;
        }
        Ended::Transport { error, delivery, cause }
    })
}

impl Buffered {
    /// Reads up to `max_body` bytes of the body. A body cut short is a failed exchange: the
    /// server answered, so the request may have been applied.
    async fn read(mut response: Response, max_body: usize) -> Result<Ended, reqwest_middleware::Error> {
        let mut body = BytesMut::new();
        let mut leftover = None;
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() <= max_body {
                body.extend_from_slice(&chunk);
                continue;
            }
            // Keep what fits; the remainder reaches the caller unread.
            let fits = max_body - body.len();
            body.extend_from_slice(&chunk[..fits]);
            leftover = Some(chunk.slice(fits..));
            break;
        }
        let status = response.status();
        let version = response.version();
        let url = response.url().clone();
        let headers = std::mem::take(response.headers_mut());
        let extensions = std::mem::take(response.extensions_mut());
        let rest = leftover.map(|head| Remainder { head: Some(head), body: reqwest::Body::from(response) });
        Ok(Ended::Buffered(Buffered { status, version, headers, url, extensions, body: body.freeze(), rest }))
    }

    /// The response status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// Whether the body was longer than the limit (only its first bytes were read).
    pub(crate) fn is_truncated(&self) -> bool {
        self.rest.is_some()
    }

    /// The response again: the body read, followed by whatever was left unread.
    pub(crate) fn into_response(self) -> Response {
        let body = match self.rest {
            None => reqwest::Body::from(self.body),
            Some(rest) => reqwest::Body::wrap(Remainder { head: Some(self.body), body: reqwest::Body::wrap(rest) }),
        };
        let mut builder = http::Response::builder().status(self.status).version(self.version).url(self.url);
        if let Some(headers) = builder.headers_mut() {
            *headers = self.headers;
        }
        if let Some(extensions) = builder.extensions_mut() {
            extensions.extend(self.extensions);
        }
        Response::from(builder.body(body).expect("parts taken from a valid response"))
    }
}

/// Bytes already read, then the rest of a body.
struct Remainder {
    head: Option<Bytes>,
    body: reqwest::Body,
}

impl HttpBody for Remainder {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(head) = self.head.take().filter(|h| !h.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let inner = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + head);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + head);
        }
        hint
    }
}

impl Ended {
    /// The view a classifier gets.
    pub(crate) fn as_result(&self, replayed: bool) -> AttemptResult<'_> {
        match self {
            Ended::Streaming(r) => {
                AttemptResult::Response { status: r.status(), headers: r.headers(), body: None, replayed }
            }
            Ended::Buffered(b) => {
                AttemptResult::Response { status: b.status, headers: &b.headers, body: Some(&b.body), replayed }
            }
            Ended::Transport { error, delivery, cause } => {
                AttemptResult::Error { error, delivery: *delivery, cause: *cause }
            }
        }
    }

    /// The response headers, if the server answered.
    pub(crate) fn headers(&self) -> Option<&HeaderMap> {
        match self {
            Ended::Streaming(r) => Some(r.headers()),
            Ended::Buffered(b) => Some(&b.headers),
            Ended::Transport { .. } => None,
        }
    }

    /// The status, if the server answered.
    pub(crate) fn status(&self) -> Option<StatusCode> {
        match self {
            Ended::Streaming(r) => Some(r.status()),
            Ended::Buffered(b) => Some(b.status),
            Ended::Transport { .. } => None,
        }
    }

    /// For an answer: its status, the URL it answers (the request's, unless the client followed
    /// a redirect) and its headers.
    pub(crate) fn redirect_parts(&self) -> Option<(StatusCode, &Url, &HeaderMap)> {
        match self {
            Ended::Streaming(r) => Some((r.status(), r.url(), r.headers())),
            Ended::Buffered(b) => Some((b.status, &b.url, &b.headers)),
            Ended::Transport { .. } => None,
        }
    }

    /// The `cause` recorded in traces.
    pub(crate) fn cause(&self) -> String {
        match self {
            Ended::Transport { cause, .. } => cause.to_string(),
            _ => self.status().map_or_else(String::new, |s| s.as_u16().to_string()),
        }
    }

    /// The attempt as the last one of a failure (a body's unread rest is dropped).
    pub(crate) fn into_last(self) -> LastAttempt {
        match self {
            Ended::Streaming(r) => {
                LastAttempt::Status { status: r.status(), headers: r.headers().clone(), body: Bytes::new() }
            }
            Ended::Buffered(b) => LastAttempt::Status { status: b.status, headers: b.headers, body: b.body },
            Ended::Transport { error, cause, .. } => LastAttempt::Transport { cause, error },
        }
    }
}
