//! Lists that come in pages.
//!
//! A list read only to its first page is a short count, and a short count is the worst thing a
//! reconciler can see: it creates what is already there, on every run. So every page is read,
//! and a list that says there is more but cannot be followed is an error, never a count.
//!
//! [`Pagination::standard`] follows what APIs use:
//!
//! | the page says | the next page |
//! |---|---|
//! | `Link: <…>; rel="next"` (RFC 8288: GitHub, GitLab) | that URL |
//! | `next`, `next_url`, `links.next`, `pagination.next`, `_links.next.href` holding a URL (Django REST framework, JSON:API, HAL) | that URL |
//! | `next_page_token` / `nextPageToken` (Google) | `?page_token=…` / `?pageToken=…` |
//! | `next_cursor`, `meta.next_cursor`, `response_metadata.next_cursor` (Slack) | `?cursor=…` |
//! | `metadata.continue` (Kubernetes) | `?continue=…` |
//! | `has_more: true` (Stripe) | `?starting_after=` the last item's id |
//!
//! Anything else that looks like "more" (a field named like `next`, `cursor`, `continue` or
//! `more` with a value, at the top of the page or under `meta`, `metadata`, `links`,
//! `pagination`, `_links` or `response_metadata`), a next page on another origin, a page seen
//! twice, or more pages than [`Pagination::max_pages`] stops the list with an error naming it;
//! [`Pagination::cursor`] and [`Pagination::next_url`] teach it a field of the server's own.
//! An `X-Total-Count` header larger than what the pages held is an error too.
//!
//! ```
//! use idempotent_retry::pagination::Pagination;
//!
//! // A server that answers `{"items": [...], "continuation": "…"}` and takes `?from=…`.
//! let pages = Pagination::standard().cursor("continuation", "from");
//! # let _ = pages;
//! ```

use std::collections::HashSet;
use std::ops::ControlFlow;

use http::HeaderMap;
use reqwest_middleware::ClientWithMiddleware;
use serde_json::Value;
use url::Url;

use crate::options::RequestOptions;
use crate::wait::read_path;

/// How the pages of a list lead to one another. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagination {
    /// The caller's fields first, then the standard ones.
    fields: Vec<Next>,
    link_header: bool,
    max_pages: usize,
}

/// A field that leads to the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    /// It holds the next page's URL (absolute, or relative to the page).
    Url(String),
    /// It holds a token, sent back as the query parameter `param`.
    Token { field: String, param: String },
    /// `true` means more, after the last item's id, sent as `param`.
    AfterLast { flag: String, param: String },
}

/// Where a list went wrong.
#[derive(Debug)]
pub(crate) enum ListFailure {
    /// A page could not be fetched.
    Request(reqwest_middleware::Error),
    /// A page was answered with this status.
    Status(http::StatusCode),
    /// The pages cannot be read, or say more than can be followed.
    Invalid(String),
}

impl Pagination {
    /// The most pages one list may take unless told otherwise: 1,000.
    pub const DEFAULT_MAX_PAGES: usize = 1000;

    /// The conventions in the [module docs](self)' table.
    pub fn standard() -> Self {
        let url = |f: &str| Next::Url(f.to_owned());
        let token = |f: &str, p: &str| Next::Token { field: f.to_owned(), param: p.to_owned() };
        Self {
            fields: vec![
                url("next"),
                url("next_url"),
                url("links.next"),
                url("pagination.next"),
                url("_links.next.href"),
                token("next_page_token", "page_token"),
                token("nextPageToken", "pageToken"),
                token("next_cursor", "cursor"),
                token("meta.next_cursor", "cursor"),
                token("response_metadata.next_cursor", "cursor"),
                token("metadata.continue", "continue"),
                Next::AfterLast { flag: "has_more".into(), param: "starting_after".into() },
            ],
            link_header: true,
            max_pages: Self::DEFAULT_MAX_PAGES,
        }
    }

    /// Also follows `field` (a dotted path such as `meta.next`, or a JSON pointer), which holds
    /// the next page's URL, absolute or relative to the page; it is looked at before the
    /// standard fields.
    pub fn next_url(mut self, field: impl Into<String>) -> Self {
        self.fields.insert(0, Next::Url(field.into()));
        self
    }

    /// Also follows `field`, which holds a cursor the server takes back as the query parameter
    /// `param`; it is looked at before the standard fields.
    pub fn cursor(mut self, field: impl Into<String>, param: impl Into<String>) -> Self {
        self.fields.insert(0, Next::Token { field: field.into(), param: param.into() });
        self
    }

    /// The most pages one list may take (default [`DEFAULT_MAX_PAGES`](Self::DEFAULT_MAX_PAGES));
    /// a list with more is an error, never a short count.
    pub fn max_pages(mut self, pages: usize) -> Self {
        self.max_pages = pages.max(1);
        self
    }

    /// The next page after `page`, answered with `headers` and `body`, whose items are `items`;
    /// `None` when it was the last. Pure: what the answer says, checked against `first`'s
    /// origin.
    pub(crate) fn next(
        &self,
        first: &Url,
        page: &Url,
        headers: &HeaderMap,
        body: &Value,
        items: &[Value],
        id_field: &str,
    ) -> Result<Option<Url>, String> {
        let mut handled: Vec<&str> = Vec::new();
        let mut next = None;
        for field in &self.fields {
            let found = match field {
                Next::Url(path) => {
                    handled.push(path);
                    match read_path(body, path) {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) if s.is_empty() => None,
                        Some(Value::String(s)) if looks_like_url(s) => Some(join(page, s, path)?),
                        Some(Value::Object(o)) if o.get("href").and_then(Value::as_str).is_some_and(looks_like_url) => {
                            Some(join(page, o["href"].as_str().expect("checked"), path)?)
                        }
                        Some(other) => {
                            return Err(format!(
                                "the list's `{path}` says there is more ({other}), but it is not a URL: tell the reconciler which query parameter takes it back (Pagination::cursor, idem's --next-field {path}=PARAM)"
                            ));
                        }
                    }
                }
                Next::Token { field, param } => {
                    handled.push(field);
                    match read_path(body, field) {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) if s.is_empty() => None,
                        Some(Value::String(s)) => Some(with_param(page, param, s)),
                        Some(Value::Number(n)) => Some(with_param(page, param, &n.to_string())),
                        Some(other) => return Err(format!("the list's `{field}` is not a cursor: {other}")),
                    }
                }
                Next::AfterLast { flag, param } => {
                    handled.push(flag);
                    match read_path(body, flag) {
                        Some(Value::Bool(true)) => {
                            let last = items.last().and_then(|i| crate::target::field_text(i, id_field));
                            let last = last.ok_or_else(|| {
                                format!("the list's `{flag}` says there is more, and its last item has no `{id_field}` to go on after")
                            })?;
                            Some(with_param(page, param, &last))
                        }
                        _ => None,
                    }
                }
            };
            if found.is_some() {
                next = found;
                break;
            }
        }
        if next.is_none() && self.link_header {
            next = link_next(headers).map(|target| join(page, &target, "Link")).transpose()?;
        }
        match next {
            Some(url) if url.origin() != first.origin() => Err(format!(
                "the next page is on another origin ({}): not followed (the list's requests carry the caller's headers)",
                crate::target::redact(&url)
            )),
            Some(url) => Ok(Some(url)),
            None => match more_signalled(body, &handled) {
                Some(field) => Err(format!(
                    "the list's `{field}` suggests there are more pages, and the reconciler cannot follow it: tell it how (Pagination::cursor or Pagination::next_url; idem's --next-field {field}=PARAM or --next-field {field})"
                )),
                None => Ok(None),
            },
        }
    }

    /// Reads every page of the list at `first`, handing each page's items to `page` (which may
    /// stop early); each request gets `options()`. The requests it sent, and how it ended.
    pub(crate) async fn each_page(
        &self,
        client: &ClientWithMiddleware,
        first: &Url,
        items_field: Option<&str>,
        id_field: &str,
        options: impl Fn() -> RequestOptions,
        mut page: impl FnMut(Vec<Value>) -> ControlFlow<()>,
    ) -> (u64, Result<(), ListFailure>) {
        let mut requests = 0;
        let mut at = first.clone();
        let mut seen_pages = HashSet::new();
        let mut seen_ids = HashSet::new();
        let mut total = None;
        let mut count = 0usize;
        for number in 1.. {
            if number > self.max_pages {
                let why = format!("the list has more than {} pages: not read to the end", self.max_pages);
                return (requests, Err(ListFailure::Invalid(why)));
            }
            seen_pages.insert(at.clone());
            let result = client.get(at.clone()).with_extension(options().buffer_body()).send().await;
            requests += crate::outcome::RetryOutcome::requests(&result);
            let response = match result {
                Ok(response) => response,
                Err(e) => return (requests, Err(ListFailure::Request(e))),
            };
            let status = response.status();
            if !status.is_success() {
                return (requests, Err(ListFailure::Status(status)));
            }
            let headers = response.headers().clone();
            if number == 1 {
                total = total_count(&headers);
            }
            // In memory already: the layer read it within the attempt (`buffer_body`).
            let body = match response.bytes().await {
                Ok(body) => body,
                Err(e) => return (requests, Err(ListFailure::Request(e.into()))),
            };
            let list: Value = match serde_json::from_slice(&body) {
                Ok(list) => list,
                Err(e) => return (requests, Err(ListFailure::Invalid(format!("page {number} is not JSON: {e}")))),
            };
            let entries = match entries(&list, items_field) {
                Ok(entries) => entries,
                Err(why) => return (requests, Err(ListFailure::Invalid(format!("page {number}: {why}")))),
            };
            let next = match self.next(first, &at, &headers, &list, entries, id_field) {
                Ok(next) => next,
                Err(why) => return (requests, Err(ListFailure::Invalid(why))),
            };
            count += entries.len();
            // An item shifted onto a later page by a concurrent create is the same item.
            let fresh: Vec<Value> = entries
                .iter()
                .filter(|item| {
                    number == 1 || crate::target::field_text(item, id_field).is_none_or(|id| !seen_ids.contains(&id))
                })
                .cloned()
                .collect();
            seen_ids.extend(fresh.iter().filter_map(|item| crate::target::field_text(item, id_field)));
            if page(fresh).is_break() {
                return (requests, Ok(()));
            }
            match next {
                None => break,
                Some(url) if seen_pages.contains(&url) => {
                    let why =
                        format!("page {number} leads back to a page already read ({})", crate::target::redact(&url));
                    return (requests, Err(ListFailure::Invalid(why)));
                }
                Some(url) => at = url,
            }
        }
        match total {
            Some(total) if total > count => {
                let why = format!("the list says it holds {total} items (X-Total-Count) and its pages held {count}");
                (requests, Err(ListFailure::Invalid(why)))
            }
            _ => (requests, Ok(())),
        }
    }
}

impl Default for Pagination {
    /// [`Pagination::standard`].
    fn default() -> Self {
        Self::standard()
    }
}

/// The items of a page: under `items_field`, or the page itself if it is an array, else under
/// `items`, `data` or `results`.
pub(crate) fn entries<'v>(list: &'v Value, items_field: Option<&str>) -> Result<&'v Vec<Value>, String> {
    match items_field {
        Some(field) => {
            read_path(list, field).and_then(Value::as_array).ok_or_else(|| format!("no array under `{field}`"))
        }
        None => items(list).ok_or_else(|| "no array at the top, under `items`, `data` or `results`".into()),
    }
}

/// A value a URL field holds that is a URL: absolute http(s), or a path or query reference.
fn looks_like_url(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || s.starts_with('/') || s.starts_with('?')
}

fn join(page: &Url, target: &str, from: &str) -> Result<Url, String> {
    page.join(target).map_err(|e| format!("the list's {from} ({target:?}) is not a URL: {e}"))
}

/// `page` with query parameter `param` set to `value` (replacing any earlier one).
fn with_param(page: &Url, param: &str, value: &str) -> Url {
    let kept: Vec<(String, String)> =
        page.query_pairs().filter(|(k, _)| k != param).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let mut url = page.clone();
    url.query_pairs_mut().clear().extend_pairs(kept).append_pair(param, value);
    url
}

/// The target of the `rel="next"` link among `Link` headers (RFC 8288), if any.
pub(crate) fn link_next(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(http::header::LINK) {
        let Ok(value) = value.to_str() else { continue };
        for link in split_links(value) {
            let Some((target, params)) = link.trim().strip_prefix('<').and_then(|rest| rest.split_once('>')) else {
                continue;
            };
            let is_next = params.split(';').any(|param| {
                let Some((name, rel)) = param.split_once('=') else { return false };
                name.trim().eq_ignore_ascii_case("rel")
                    && rel.trim().trim_matches('"').split_ascii_whitespace().any(|r| r.eq_ignore_ascii_case("next"))
            });
            if is_next {
                return Some(target.trim().to_owned());
            }
        }
    }
    None
}

/// A `Link` value's links: split on the commas that are not inside `<…>` or quotes.
fn split_links(value: &str) -> Vec<&str> {
    let (mut links, mut start, mut in_uri, mut in_quotes) = (Vec::new(), 0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            '<' if !in_quotes => in_uri = true,
            '>' if !in_quotes => in_uri = false,
            '"' if !in_uri => in_quotes = !in_quotes,
            ',' if !in_uri && !in_quotes => {
                links.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    links.push(&value[start..]);
    links
}

fn total_count(headers: &HeaderMap) -> Option<usize> {
    headers.get("x-total-count")?.to_str().ok()?.trim().parse().ok()
}

/// A field (top level, or under a container of paging data) whose name says "more" and whose
/// value is not empty, that no rule followed.
fn more_signalled(body: &Value, handled: &[&str]) -> Option<String> {
    const CONTAINERS: [&str; 6] = ["meta", "metadata", "links", "pagination", "_links", "response_metadata"];
    // By the words of the name (`next_cursor`, `nextPageToken`, `hasMore`), not its letters
    // (`nextgen_version` is not paging).
    let says_more = |name: &str| {
        words(name).iter().any(|w| matches!(w.as_str(), "next" | "cursor" | "continue" | "continuation" | "more"))
    };
    let has_value = |v: &Value| match v {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Bool(true) => true,
    };
    let object = body.as_object()?;
    let top = object.iter().map(|(name, value)| (name.clone(), value));
    let nested = CONTAINERS
        .iter()
        .filter_map(|c| object.get(*c).and_then(Value::as_object).map(|o| (c, o)))
        .flat_map(|(container, o)| o.iter().map(move |(name, value)| (format!("{container}.{name}"), value)));
    top.chain(nested)
        .filter(|(path, _)| !handled.iter().any(|h| h == path || h.starts_with(&format!("{path}."))))
        .find(|(path, value)| says_more(path.rsplit('.').next().unwrap_or(path)) && has_value(value))
        .map(|(path, _)| path)
}

/// The words of a field name, lowercase: split at `_`, `-`, `.` and lower-to-upper changes.
fn words(name: &str) -> Vec<String> {
    let mut words = vec![String::new()];
    let mut previous_lower = false;
    for c in name.chars() {
        if matches!(c, '_' | '-' | '.' | ' ') {
            words.push(String::new());
            previous_lower = false;
            continue;
        }
        if c.is_ascii_uppercase() && previous_lower {
            words.push(String::new());
        }
        previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        words.last_mut().expect("one word at least").push(c.to_ascii_lowercase());
    }
    words.retain(|w| !w.is_empty());
    words
}

/// The items of a list response: the top-level array, or the array under `items`, `data` or
/// `results`.
pub fn items(list: &Value) -> Option<&Vec<Value>> {
    list.as_array()
        .or_else(|| list.get("items").and_then(Value::as_array))
        .or_else(|| list.get("data").and_then(Value::as_array))
        .or_else(|| list.get("results").and_then(Value::as_array))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_names_are_read_by_their_words() {
        assert_eq!(words("nextPageToken"), ["next", "page", "token"]);
        assert_eq!(words("has_more"), ["has", "more"]);
        assert_eq!(words("nextgen_version"), ["nextgen", "version"]);
        assert!(more_signalled(&json!({"items": [], "nextgen_version": "v2"}), &[]).is_none());
        assert_eq!(more_signalled(&json!({"items": [], "hasMore": true}), &[]).as_deref(), Some("hasMore"));
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn next(p: &Pagination, headers: &[(&str, &str)], body: Value) -> Result<Option<String>, String> {
        let first = url("https://api.test/items?x=1");
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        let items = items(&body).cloned().unwrap_or_default();
        p.next(&first, &first, &map, &body, &items, "id").map(|n| n.map(String::from))
    }

    #[test]
    fn the_standard_conventions() {
        let p = Pagination::standard();
        let link =
            [("link", r#"<https://api.test/items?page=2>; rel="next", <https://api.test/items?page=9>; rel="last""#)];
        assert_eq!(next(&p, &link, json!([])), Ok(Some("https://api.test/items?page=2".into())));
        let link = [("link", r#"</items?page=3>; rel="prev next""#)];
        assert_eq!(next(&p, &link, json!([])), Ok(Some("https://api.test/items?page=3".into())));
        let drf = json!({"count": 9, "next": "https://api.test/items?page=2", "results": []});
        assert_eq!(next(&p, &[], drf), Ok(Some("https://api.test/items?page=2".into())));
        let google = json!({"items": [], "nextPageToken": "t2"});
        assert_eq!(next(&p, &[], google), Ok(Some("https://api.test/items?x=1&pageToken=t2".into())));
        let slack = json!({"items": [], "response_metadata": {"next_cursor": "dXNlcjpV"}});
        assert_eq!(next(&p, &[], slack), Ok(Some("https://api.test/items?x=1&cursor=dXNlcjpV".into())));
        let k8s = json!({"items": [], "metadata": {"continue": "c1"}});
        assert_eq!(next(&p, &[], k8s), Ok(Some("https://api.test/items?x=1&continue=c1".into())));
        let stripe = json!({"data": [{"id": "a"}, {"id": "b"}], "has_more": true});
        assert_eq!(next(&p, &[], stripe), Ok(Some("https://api.test/items?x=1&starting_after=b".into())));
        let hal = json!({"items": [], "_links": {"next": {"href": "/items?page=2"}}});
        assert_eq!(next(&p, &[], hal), Ok(Some("https://api.test/items?page=2".into())));
    }

    #[test]
    fn the_last_page_ends_the_list() {
        let p = Pagination::standard();
        for last in [
            json!([]),
            json!({"items": [], "next": null}),
            json!({"items": [], "next_page_token": ""}),
            json!({"data": [], "has_more": false}),
            json!({"items": [], "metadata": {"continue": ""}}),
            json!({"items": [], "total": 3, "page": 2}),
        ] {
            assert_eq!(next(&p, &[], last.clone()), Ok(None), "{last}");
        }
    }

    #[test]
    fn more_that_cannot_be_followed_is_an_error() {
        let p = Pagination::standard();
        for body in [
            json!({"items": [], "continuation": "abc"}),
            json!({"items": [], "next": "abc"}),
            json!({"items": [], "meta": {"cursor_after": 42}}),
            json!({"items": [], "more": true}),
            json!({"data": [], "has_more": true}),
        ] {
            assert!(next(&p, &[], body.clone()).is_err(), "{body}");
        }
        let elsewhere = [("link", r#"<https://other.test/items?page=2>; rel="next""#)];
        assert!(next(&p, &elsewhere, json!([])).unwrap_err().contains("another origin"));
        let taught = Pagination::standard().cursor("continuation", "from");
        let body = json!({"items": [], "continuation": "abc"});
        assert_eq!(next(&taught, &[], body), Ok(Some("https://api.test/items?x=1&from=abc".into())));
        let taught = Pagination::standard().cursor("next", "page");
        assert_eq!(
            next(&taught, &[], json!({"items": [], "next": "abc"})),
            Ok(Some("https://api.test/items?x=1&page=abc".into()))
        );
    }

    #[test]
    fn a_cursor_replaces_the_last_one() {
        let page = url("https://api.test/items?page_token=t1&x=1");
        assert_eq!(with_param(&page, "page_token", "t2").as_str(), "https://api.test/items?x=1&page_token=t2");
    }

    #[test]
    fn link_headers_are_split_where_links_end() {
        let mut headers = HeaderMap::new();
        headers.append(
            "link",
            r#"<https://a.test/x?a=1,2>; rel="prev", <https://a.test/x?p=2>; title="a, b"; rel=next"#.parse().unwrap(),
        );
        assert_eq!(link_next(&headers).as_deref(), Some("https://a.test/x?p=2"));
        headers.clear();
        headers.append("link", "garbage, <>; rel=nexty".parse().unwrap());
        assert_eq!(link_next(&headers), None);
    }
}
