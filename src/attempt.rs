//! One attempt: send down the middleware chain within a timeout, and read error bodies so the
//! classifier can look inside them.

use std::time::Duration;

use bytes::Bytes;
use http::{Extensions, HeaderMap, StatusCode, Version};
use reqwest::{Request, Response, ResponseBuilderExt, Url};
use reqwest_middleware::Next;

use crate::classify::{AttemptResult, AttemptTimedOut, Delivery, TransportCause, categorize};
use crate::error::LastAttempt;

/// Responses with a status at or above this have their body read before classification.
const BUFFER_FROM: u16 = 400;

/// How an attempt ended.
pub(crate) enum Ended {
    /// A response whose body is still streaming (status below 400).
    Streaming(Response),
    /// A response read in full (status 400 or above).
    Buffered(Buffered),
    /// A transport failure.
    Failed { error: reqwest_middleware::Error, delivery: Delivery, cause: TransportCause },
}

/// A response whose body has been read, with everything needed to rebuild it.
pub(crate) struct Buffered {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    url: Url,
    extensions: Extensions,
    body: Bytes,
}

/// Sends `request` down the chain, giving up after `timeout`.
pub(crate) async fn run(
    next: Next<'_>,
    request: Request,
    extensions: &mut Extensions,
    timeout: Option<Duration>,
) -> Ended {
    let sent = next.run(request, extensions);
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, sent).await {
            Ok(result) => result,
            Err(_) => Err(reqwest_middleware::Error::middleware(AttemptTimedOut(limit))),
        },
        None => sent.await,
    };
    match result {
        Ok(response) if response.status().as_u16() >= BUFFER_FROM => Ended::Buffered(Buffered::read(response).await),
        Ok(response) => Ended::Streaming(response),
        Err(error) => {
            let (delivery, cause) = categorize(&error);
            Ended::Failed { error, delivery, cause }
        }
    }
}

impl Buffered {
    async fn read(mut response: Response) -> Self {
        let status = response.status();
        let version = response.version();
        let headers = std::mem::take(response.headers_mut());
        let url = response.url().clone();
        let extensions = std::mem::take(response.extensions_mut());
        // The status is what matters; a body cut short (the connection dropped mid-way) is kept
        // as far as it is known, which for classification is "empty".
        let body = response.bytes().await.unwrap_or_default();
        Self { status, version, headers, url, extensions, body }
    }

    /// The response again, with the body it had.
    pub(crate) fn into_response(self) -> Response {
        let mut builder = http::Response::builder().status(self.status).version(self.version).url(self.url);
        if let Some(headers) = builder.headers_mut() {
            *headers = self.headers;
        }
        if let Some(extensions) = builder.extensions_mut() {
            extensions.extend(self.extensions);
        }
        Response::from(builder.body(self.body).expect("parts taken from a valid response"))
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
            Ended::Failed { error, delivery, cause } => {
                AttemptResult::Error { error, delivery: *delivery, cause: *cause }
            }
        }
    }

    /// The response headers, if the server answered.
    pub(crate) fn headers(&self) -> Option<&HeaderMap> {
        match self {
            Ended::Streaming(r) => Some(r.headers()),
            Ended::Buffered(b) => Some(&b.headers),
            Ended::Failed { .. } => None,
        }
    }

    /// The status, if the server answered.
    pub(crate) fn status(&self) -> Option<StatusCode> {
        match self {
            Ended::Streaming(r) => Some(r.status()),
            Ended::Buffered(b) => Some(b.status),
            Ended::Failed { .. } => None,
        }
    }

    /// The `cause` recorded in traces.
    pub(crate) fn cause(&self) -> String {
        match self {
            Ended::Failed { cause, .. } => cause.to_string(),
            _ => self.status().map_or_else(String::new, |s| s.as_u16().to_string()),
        }
    }

    /// The attempt as the last one of a failure.
    pub(crate) fn into_last(self) -> LastAttempt {
        match self {
            Ended::Streaming(r) => {
                LastAttempt::Status { status: r.status(), headers: r.headers().clone(), body: Bytes::new() }
            }
            Ended::Buffered(b) => LastAttempt::Status { status: b.status, headers: b.headers, body: b.body },
            Ended::Failed { error, cause, .. } => LastAttempt::Transport { cause, error },
        }
    }
}
