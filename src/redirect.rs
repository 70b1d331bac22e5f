//! Redirects of writes. A 3xx answering a POST is the write's own answer: a `303 See Other`
//! says it was done and where the result is; a 301, 302, 307 or 308 says to send it elsewhere.
//! A client that follows them on its own takes the answer to a `GET` (or to a write sent to
//! another origin, key and body included) for the write's: `reqwest` does, unless built with
//! `redirect::Policy::none()`.
//!
//! The layer follows a redirect of a write only to the same origin (scheme, host and port),
//! sending the same method, body and key again, as one more attempt. A redirect to another
//! origin is never followed: the write is never sent anywhere but the origin it was meant for
//! (and journaled for). A redirect the client followed is found by the answer's URL and
//! reported, never taken for the write's answer. Neither says "not applied".

use http::{Method, StatusCode};
use reqwest::{Request, Url};

use crate::attempt::Ended;

/// What a write's answer says about where it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Redirect {
    /// Send it again, as it is, to this URL of the same origin.
    Follow(Url),
    /// The server sent it to another origin: it goes nowhere else.
    OtherOrigin(Url),
    /// The client followed a redirect on its own: the answer is this URL's, not the write's.
    Followed(Url),
}

/// Whether `method` changes things (a redirect of it is the layer's business): every method
/// but GET, HEAD, OPTIONS and TRACE.
pub(crate) fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

/// What `ended`, the answer to `request`, says about a redirect of a write; `None` for anything
/// else (a read, a 303, a redirect without a usable `Location`, which are final answers).
pub(crate) fn of(request: &Request, ended: &Ended) -> Option<Redirect> {
    if !is_write(request.method()) {
        return None;
    }
    let (status, answered_at, headers) = ended.redirect_parts()?;
    if answered_at != request.url() {
        return Some(Redirect::Followed(answered_at.clone()));
    }
    if !matches!(
        status,
        StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT
    ) {
        return None;
    }
    // Looked up only for a redirect: the success path does no header lookup here.
    let location = headers.get(http::header::LOCATION).and_then(|v| v.to_str().ok());
    let target = request.url().join(location?).ok()?;
    if target.origin() == request.url().origin() {
        Some(Redirect::Follow(target))
    } else {
        Some(Redirect::OtherOrigin(target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(method: Method, status: u16, location: Option<&str>) -> Option<Redirect> {
        let request = Request::new(method, "https://api.test/cvms".parse().unwrap());
        use reqwest::ResponseBuilderExt;
        // The answer's URL is the request's, as reqwest gives it when it followed nothing.
        let mut response = http::Response::builder().status(status).url(request.url().clone());
        if let Some(location) = location {
            response = response.header("location", location);
        }
        let response = reqwest::Response::from(response.body(Vec::<u8>::new()).unwrap());
        of(&request, &Ended::Streaming(response))
    }

    #[test]
    fn same_origin_is_followed_other_origins_never() {
        let url = |s: &str| Url::parse(s).unwrap();
        for status in [301, 302, 307, 308] {
            assert_eq!(
                redirect(Method::POST, status, Some("/v2/cvms")),
                Some(Redirect::Follow(url("https://api.test/v2/cvms")))
            );
            assert_eq!(
                redirect(Method::POST, status, Some("https://other.test/cvms")),
                Some(Redirect::OtherOrigin(url("https://other.test/cvms")))
            );
            assert_eq!(
                redirect(Method::POST, status, Some("http://api.test/cvms")),
                Some(Redirect::OtherOrigin(url("http://api.test/cvms"))),
                "another scheme is another origin"
            );
            assert_eq!(
                redirect(Method::POST, status, Some("https://api.test:8443/cvms")),
                Some(Redirect::OtherOrigin(url("https://api.test:8443/cvms"))),
                "another port too"
            );
        }
        assert_eq!(redirect(Method::POST, 303, Some("/cvms/c-1")), None, "a 303 is the write's answer");
        assert_eq!(redirect(Method::POST, 307, None), None, "nowhere to go: a final answer");
        assert_eq!(redirect(Method::GET, 307, Some("https://other.test/")), None, "reads are the client's");
        assert_eq!(redirect(Method::PUT, 308, Some("/x")), Some(Redirect::Follow(url("https://api.test/x"))));
    }
}
