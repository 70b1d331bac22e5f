//! Where requests go: checking a URL before anything is sent, building an item's URL from a
//! server-given id, and showing a URL without its secrets.

use url::Url;

/// Parses `url` as an absolute `http` or `https` URL with a host: what the crate can send to.
///
/// # Errors
///
/// Why not, in words for the caller.
pub(crate) fn http_url(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{} is not an http or https URL", redact(&parsed)));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{} has no host", redact(&parsed)));
    }
    Ok(parsed)
}

/// `collection/{id}` with `id` as one path segment: percent-encoded, so an id can neither leave
/// the collection (`../../admin`) nor add a query (`x?force=true`).
///
/// # Errors
///
/// An empty id, `.` or `..`: no item can be named so.
pub(crate) fn item_url(collection: &Url, id: &str) -> Result<Url, String> {
    check_id(id)?;
    let mut url = collection.clone();
    url.set_query(None);
    url.set_fragment(None);
    url.path_segments_mut().map_err(|()| format!("{} cannot have items", redact(collection)))?.pop_if_empty().push(id);
    Ok(url)
}

/// An item's `field` (its id, most often) as text: a string, or a number written out.
pub(crate) fn field_text(item: &serde_json::Value, field: &str) -> Option<String> {
    match item.get(field)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether `id` can name an item: not empty, not `.` or `..`.
///
/// # Errors
///
/// Why not.
pub(crate) fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id == "." || id == ".." {
        return Err(format!("{id:?} cannot name an item: it is not a path segment"));
    }
    Ok(())
}

/// The URL as it may be shown or stored: a password and every query value replaced by `***`,
/// the user name kept (it says whose request it was; the password is the secret). No fragment.
pub(crate) fn redact(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    mask_query(&mut shown, "***");
    shown.set_fragment(None);
    shown.to_string()
}

/// The URL as OpenTelemetry's `url.full` wants it: user name, password and every query value
/// replaced by `REDACTED`, no fragment.
pub(crate) fn otel_url(url: &Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() || shown.password().is_some() {
        let _ = shown.set_username("REDACTED");
        let _ = shown.set_password(Some("REDACTED"));
    }
    mask_query(&mut shown, "REDACTED");
    shown.set_fragment(None);
    shown.to_string()
}

/// Replaces every query value with `mask`, keeping the names.
fn mask_query(shown: &mut Url, mask: &str) {
    if shown.query().is_some() {
        let names: Vec<String> = shown.query_pairs().map(|(name, _)| name.into_owned()).collect();
        if names.is_empty() {
            shown.set_query(None);
        } else {
            shown.query_pairs_mut().clear().extend_pairs(names.iter().map(|n| (n.as_str(), mask)));
        }
    }
}

/// A URL as it may be shown, logged or stored: its password and every query value replaced by
/// `***`, no fragment. Text that is not a URL is shown as `(not a URL)`, since there is no
/// telling which part of it is secret.
///
/// The journal stores URLs this way, and `idem` names operations with it.
///
/// ```
/// assert_eq!(
///     idempotent_retry::journal::redact_url("https://ci:s3cret@api.example/runs?token=abc&page=2"),
///     "https://ci:***@api.example/runs?token=***&page=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    redact_str(url)
}

/// [`redact`] for a URL given as text (see [`redact_url`]).
pub(crate) fn redact_str(url: &str) -> String {
    Url::parse(url).map_or_else(|_| "(not a URL)".to_owned(), |u| redact(&u))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otel_urls_redact_userinfo_and_query_values() {
        let url = Url::parse("https://ci:s3cret@api.example/runs?token=abc&page=2#frag").unwrap();
        assert_eq!(otel_url(&url), "https://REDACTED:REDACTED@api.example/runs?token=REDACTED&page=REDACTED");
        assert_eq!(redact(&url), "https://ci:***@api.example/runs?token=***&page=***");
        let plain = Url::parse("https://api.example/cvms").unwrap();
        assert_eq!(otel_url(&plain), "https://api.example/cvms");
    }

    #[test]
    fn only_absolute_http_urls_with_a_host() {
        assert!(http_url("https://api.example/cvms").is_ok());
        assert!(http_url("http://127.0.0.1:8080/x?y=1").is_ok());
        for bad in ["not a url", "http://", "http://[::1", "file:///x", "/cvms", "mailto:a@b.c", "ftp://h/x"] {
            assert!(http_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_one_segment() {
        let collection = Url::parse("http://h/apps/a/replicas?page=2").unwrap();
        let url = |id| item_url(&collection, id).map(|u| u.to_string());
        assert_eq!(url("r-1").unwrap(), "http://h/apps/a/replicas/r-1");
        assert_eq!(
            url("../../../admin/users/42").unwrap(),
            "http://h/apps/a/replicas/..%2F..%2F..%2Fadmin%2Fusers%2F42"
        );
        assert_eq!(url("x?force=true").unwrap(), "http://h/apps/a/replicas/x%3Fforce=true");
        assert_eq!(url("a#b").unwrap(), "http://h/apps/a/replicas/a%23b");
        assert_eq!(url("sp ace").unwrap(), "http://h/apps/a/replicas/sp%20ace");
        for bad in ["", ".", ".."] {
            assert!(url(bad).is_err(), "{bad:?}");
        }
        let trailing = Url::parse("http://h/cvms/").unwrap();
        assert_eq!(item_url(&trailing, "c1").unwrap().as_str(), "http://h/cvms/c1");
    }

    #[test]
    fn secrets_are_not_shown() {
        let url = Url::parse("https://user:s3cret@api.example/cvms?token=abc123&page=2#frag").unwrap();
        let shown = redact(&url);
        assert_eq!(shown, "https://user:***@api.example/cvms?token=***&page=***");
        assert!(!shown.contains("s3cret") && !shown.contains("abc123"));
        assert_eq!(redact_str("https://api.example/cvms"), "https://api.example/cvms");
        assert_eq!(redact_str("https://:tok@h/"), "https://:***@h/");
        assert_eq!(redact_str("not a url with s3cret"), "(not a URL)");
    }
}
