//! `Retry-After` (RFC 9110 §10.2.3): delta-seconds or an HTTP-date.
//!
//! All three date forms a recipient must accept are parsed — IMF-fixdate
//! (`Sun, 06 Nov 1994 08:49:37 GMT`), RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime
//! (`Sun Nov  6 08:49:37 1994`) — against an injected clock. An RFC 850 date's two-digit year is
//! read by RFC 9110's rule: the year ending in those digits that is at most 50 years ahead. A
//! date in the past means "now".
//! The engine treats the result as a floor under its own backoff and caps it
//! (see [`RetryPolicy::max_retry_after`](crate::RetryPolicy::max_retry_after)).

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::RETRY_AFTER;

/// Parses a `Retry-After` value relative to `now`.
///
/// Returns `None` when the value is neither delta-seconds nor an HTTP-date. Delta-seconds too
/// large for a `u64` saturate to [`Duration::MAX`] (the engine's cap then applies).
///
/// # Examples
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use idempotent_retry::backoff::parse_retry_after;
///
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_770); // Sun, 06 Nov 1994 08:49:30 GMT
/// assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
/// assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(Duration::from_secs(7)));
/// assert_eq!(parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now), Some(Duration::from_secs(7)));
/// assert_eq!(parse_retry_after("Sun Nov  6 08:49:37 1994", now), Some(Duration::from_secs(7)));
/// assert_eq!(parse_retry_after("soon", now), None);
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(value.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    // Every HTTP-date is ASCII; the RFC 850 reader below slices by byte offsets.
    if !value.is_ascii() {
        return None;
    }
    let at = match rfc850(value, now) {
        Some(at) => at,
        None => httpdate::parse_http_date(value).ok()?,
    };
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An RFC 850 date (`Sunday, 06-Nov-94 08:49:37 GMT`), its two-digit year read by RFC 9110's
/// rule (§5.6.7): the year with those last two digits that is at most 50 years after `now`.
/// `None` for anything else (the weekday is not checked against the date).
fn rfc850(value: &str, now: SystemTime) -> Option<SystemTime> {
    let (weekday, rest) = value.split_once(", ")?;
    if !weekday.ends_with("day") || !weekday.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let b = rest.as_bytes();
    if b.len() != 22 || b[2] != b'-' || b[6] != b'-' || b[9] != b' ' || &rest[18..] != " GMT" {
        return None;
    }
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = MONTHS.iter().position(|m| *m == &rest[3..6])? + 1;
    let yy: i64 = rest[7..9].parse().ok().filter(|_| rest[7..9].bytes().all(|b| b.is_ascii_digit()))?;
    let (day, time) = (&rest[..2], &rest[10..18]);
    let this_year: i64 = crate::time::rfc3339(now)[..4].parse().ok()?;
    let year = |century: i64| century * 100 + yy;
    let candidate = |century| crate::time::parse_rfc3339(&format!("{:04}-{month:02}-{day}T{time}Z", year(century)));
    let century = this_year.div_euclid(100);
    // The latest year ending in `yy` that is not more than 50 years ahead.
    let fifty_years = Duration::from_secs(50 * 31_556_952);
    [century + 1, century, century - 1]
        .into_iter()
        .filter(|c| year(*c) >= 0)
        .filter_map(candidate)
        .find(|at| at.duration_since(now).map_or(true, |ahead| ahead <= fifty_years))
}

/// The `Retry-After` of a response, if present and well-formed.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 784_111_770; // Sun, 06 Nov 1994 08:49:30 GMT

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0)
    }

    #[test]
    fn table() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("1", Some(1)),
            (" 30 ", Some(30)),
            ("Sun, 06 Nov 1994 08:49:37 GMT", Some(7)),
            ("Sunday, 06-Nov-94 08:49:37 GMT", Some(7)),
            ("Sun Nov  6 08:49:37 1994", Some(7)),
            ("Sun, 06 Nov 1994 09:49:30 GMT", Some(3600)),
            // In the past: retry now.
            ("Sun, 06 Nov 1994 08:00:00 GMT", Some(0)),
            ("-1", None),
            ("1.5", None),
            ("", None),
            ("tomorrow", None),
            ("Sun, 06 Nov 1994 08:49:37", None),
        ];
        for (value, want) in cases {
            assert_eq!(parse_retry_after(value, now()), want.map(Duration::from_secs), "{value:?}");
        }
    }

    #[test]
    fn rfc850_years_follow_the_fifty_year_rule() {
        let at = |text: &str| crate::time::parse_rfc3339(text).unwrap();
        let in_2026 = at("2026-11-23T12:00:00Z");
        // "94" is 2094 (68 years ahead: more than 50), so 1994: in the past, retry now.
        assert_eq!(rfc850("Sunday, 06-Nov-94 08:49:37 GMT", in_2026), Some(at("1994-11-06T08:49:37Z")));
        assert_eq!(rfc850("Monday, 23-Nov-26 12:00:30 GMT", in_2026), Some(at("2026-11-23T12:00:30Z")));
        assert_eq!(parse_retry_after("Monday, 23-Nov-26 12:00:30 GMT", in_2026), Some(Duration::from_secs(30)));
        // 2070 is 44 years ahead: kept (httpdate alone reads it as 1970).
        assert_eq!(rfc850("Tuesday, 01-Jan-70 00:00:00 GMT", in_2026), Some(at("2070-01-01T00:00:00Z")));
        assert_eq!(rfc850("Friday, 01-Jan-77 00:00:00 GMT", in_2026), Some(at("1977-01-01T00:00:00Z")));
        // Across a century: on the last day of 2099, "00" is tomorrow, not 2000.
        let in_2099 = at("2099-12-31T23:59:50Z");
        assert_eq!(rfc850("Friday, 01-Jan-00 00:00:00 GMT", in_2099), Some(at("2100-01-01T00:00:00Z")));
        assert_eq!(parse_retry_after("Friday, 01-Jan-00 00:00:00 GMT", in_2099), Some(Duration::from_secs(10)));
        for not_rfc850 in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37",
            "Sunday, 6-Nov-94 08:49:37 GMT",
            "Sunday, 06-Foo-94 08:49:37 GMT",
            "Sunday, 06-Nov-9x 08:49:37 GMT",
        ] {
            assert_eq!(rfc850(not_rfc850, in_2026), None, "{not_rfc850}");
        }
    }

    #[test]
    fn huge_delta_saturates() {
        assert_eq!(parse_retry_after("99999999999999999999999", now()), Some(Duration::MAX));
    }

    #[test]
    fn from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now()), None);
        h.insert(RETRY_AFTER, "5".parse().unwrap());
        assert_eq!(retry_after(&h, now()), Some(Duration::from_secs(5)));
    }

    /// Found by the `retry_after` fuzz target: a value shaped like an RFC 850 date with a
    /// multibyte character where the time ends panicked (a slice inside the character).
    #[test]
    fn a_non_ascii_value_is_not_a_date_and_never_panics() {
        assert_eq!(parse_retry_after("Sunday, 06-Nov-94 08:49:3\u{e9}GMT", now()), None);
        assert_eq!(parse_retry_after("Sunday, 06-N\u{f6}v-94 08:49:37 GMT", now()), None);
        assert_eq!(parse_retry_after("\u{fffd}, 06-Nov-94 08:49:37 GMT", now()), None);
    }
}
