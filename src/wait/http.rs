//! The long-running patterns of HTTP APIs: recognised from a create's answer, polled through the
//! client's retry layer.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, header::LOCATION};
use reqwest_middleware::ClientWithMiddleware;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use super::{Follow, Observation, Ready, StateRule, WaitError, WaitFor, Waiter, read_path};
use crate::backoff::retry_after;
use crate::error::BoxError;
use crate::options::RequestOptions;

/// Where and how to poll what a create started. Journaled the moment the create answers, so
/// that a re-run resumes the wait instead of creating again.
///
/// | the create answered | handle | polled until |
/// |---|---|---|
/// | `202` with `Operation-Location` or `Azure-AsyncOperation` | [`StatusMonitor`](Self::StatusMonitor) | `status` is `Succeeded` (`Failed`, `Canceled`: failure) |
/// | `202` with `Location` | [`Location`](Self::Location) | it stops answering `202` |
/// | an operation: `{"name": …, "done": false}` (Google) | [`Operation`](Self::Operation) | `done`; `error` is a failure, `response` the resource |
/// | `"action": {"id": …}` (Hetzner) | [`Action`](Self::Action) | `action.status` is `success` (`error`: failure) |
/// | a resource, and a state was asked for | [`Resource`](Self::Resource) | the [`WaitFor`]'s target state |
///
/// Header URLs may be relative to the create's. A poll URL on another origin than the create's
/// is refused (a hostile answer must not send the caller's credentials elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "pattern", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Handle {
    /// An Azure-style status monitor; afterwards the resource is read at the monitor's
    /// `resourceLocation`, or at `resource_url` (the 202's `Location`).
    StatusMonitor {
        /// The monitor.
        url: String,
        /// Where the resource is, if the 202 said.
        resource_url: Option<String>,
    },
    /// An Azure-style `Location`: `202` while in progress, then the resource (`200`, `201`) or
    /// nothing (`204`).
    Location {
        /// Where to poll.
        url: String,
    },
    /// A Google-style operation resource.
    Operation {
        /// Where to poll: the operation's `selfLink`, or its `name` under the API's root.
        url: String,
    },
    /// A Hetzner-style action; afterwards the resource is read at `resource_url`.
    Action {
        /// The action: `actions/{id}` under the API's root.
        url: String,
        /// The resource, when the answer named its id.
        resource_url: Option<String>,
    },
    /// The resource itself.
    Resource {
        /// Where to read it.
        url: String,
    },
}

impl Handle {
    /// The URL polled.
    pub fn url(&self) -> &str {
        match self {
            Handle::StatusMonitor { url, .. }
            | Handle::Location { url }
            | Handle::Operation { url }
            | Handle::Action { url, .. }
            | Handle::Resource { url } => url,
        }
    }

    /// A short name of the pattern, as journaled (`status_monitor`, `location`, …).
    pub fn pattern(&self) -> &'static str {
        match self {
            Handle::StatusMonitor { .. } => "status_monitor",
            Handle::Location { .. } => "location",
            Handle::Operation { .. } => "operation",
            Handle::Action { .. } => "action",
            Handle::Resource { .. } => "resource",
        }
    }

    /// The handle as it may be stored: URLs without user info, and the values of query
    /// parameters whose names say they are secret (`token`, `sig`, …) replaced by `***`.
    pub fn stored(&self) -> Self {
        let mut stored = self.clone();
        let strip = |url: &mut String| *url = storable(url);
        match &mut stored {
            Handle::StatusMonitor { url, resource_url } | Handle::Action { url, resource_url } => {
                strip(url);
                resource_url.as_mut().map(strip);
            }
            Handle::Location { url } | Handle::Operation { url } | Handle::Resource { url } => strip(url),
        }
        stored
    }

    /// Recognises the pattern the create's answer starts, if any (see the table). `Err` names
    /// why a handle the answer points to cannot be used.
    pub(crate) fn detect(answer: &Answered<'_>, spec: &WaitFor) -> Result<Option<Self>, String> {
        let header = |name: &str| answer.headers.get(name).and_then(|v| v.to_str().ok());
        let at = |reference: &str| same_origin(answer.create_url, reference);
        if answer.status == StatusCode::ACCEPTED {
            let monitor = header("azure-asyncoperation").or_else(|| header("operation-location"));
            if let Some(monitor) = monitor {
                let resource_url = header(LOCATION.as_str()).map(at).transpose()?;
                return Ok(Some(Handle::StatusMonitor { url: at(monitor)?, resource_url }));
            }
            if let Some(location) = header(LOCATION.as_str()) {
                return Ok(Some(Handle::Location { url: at(location)? }));
            }
        }
        if spec.follow == Follow::Any {
            let resource = answer.resource;
            if let (Some(Value::Bool(_)), Some(Value::String(name))) = (resource.get("done"), resource.get("name")) {
                let url = match resource.get("selfLink").and_then(Value::as_str) {
                    Some(link) => at(link)?,
                    None => under_root(answer.create_url, name)?,
                };
                return Ok(Some(Handle::Operation { url }));
            }
            if let Some(action) = resource.get("action").and_then(|a| a.get("id")) {
                let id = action.as_str().map_or_else(|| action.to_string(), str::to_owned);
                let url = under_root(answer.create_url, &format!("actions/{}", segment(&id)?))?;
                return Ok(Some(Handle::Action { url, resource_url: resource_url(answer)? }));
            }
        }
        if !spec.has_state() {
            return Ok(None);
        }
        match resource_url(answer)? {
            Some(url) => Ok(Some(Handle::Resource { url })),
            None => Err("the answer has neither a Location nor an id to read the resource at".into()),
        }
    }
}

/// The create's answer, as detection sees it.
pub(crate) struct Answered<'a> {
    pub status: StatusCode,
    pub headers: &'a HeaderMap,
    pub resource: &'a Value,
    pub create_url: &'a Url,
    pub id_field: &'a str,
}

/// Where the created resource is: a `Location` header, else the collection's URL and the id.
fn resource_url(answer: &Answered<'_>) -> Result<Option<String>, String> {
    if answer.status != StatusCode::ACCEPTED
        && let Some(location) = answer.headers.get(LOCATION).and_then(|v| v.to_str().ok())
    {
        return same_origin(answer.create_url, location).map(Some);
    }
    let id = match read_path(answer.resource, answer.id_field) {
        Some(Value::String(id)) => id.clone(),
        Some(id @ Value::Number(_)) => id.to_string(),
        _ => return Ok(None),
    };
    crate::target::item_url(answer.create_url, &id).map(|u| Some(u.to_string()))
}

/// `reference` resolved against `base`, refused when it leaves `base`'s origin.
fn same_origin(base: &Url, reference: &str) -> Result<String, String> {
    let url = base.join(reference).map_err(|e| format!("the poll URL {reference:?} is not a URL: {e}"))?;
    if url.origin() != base.origin() {
        return Err(format!(
            "the server named a poll URL on another origin ({}); it is not followed",
            crate::target::redact(&url)
        ));
    }
    Ok(url.to_string())
}

/// `path` under the API's root: the create URL's origin and its path up to the first version
/// segment (`/v1/`), if it has one.
fn under_root(create: &Url, path: &str) -> Result<String, String> {
    let mut root = create.clone();
    root.set_query(None);
    root.set_fragment(None);
    let segments: Vec<&str> = create.path_segments().map(Iterator::collect).unwrap_or_default();
    let version = segments
        .iter()
        .position(|s| s.strip_prefix('v').is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit())));
    let prefix = version.map_or(String::new(), |i| format!("{}/", segments[..=i].join("/")));
    root.set_path(&format!("/{prefix}"));
    root.join(path.trim_start_matches('/')).map(|u| u.to_string()).map_err(|e| e.to_string())
}

/// `id` checked as one path segment and percent-encoded.
fn segment(id: &str) -> Result<String, String> {
    crate::target::check_id(id)?;
    let base = Url::parse("http://x/").expect("a URL");
    let mut url = base.clone();
    url.path_segments_mut().expect("a base").push(id);
    Ok(url.path().trim_start_matches('/').to_owned())
}

/// Query parameters whose values are secrets by their names.
const SECRET_PARAMETERS: &[&str] = &[
    "token",
    "access_token",
    "sig",
    "signature",
    "secret",
    "password",
    "key",
    "api_key",
    "apikey",
    "code",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
];

fn storable(url: &str) -> String {
    let Ok(mut url) = Url::parse(url) else { return url.to_owned() };
    let _ = url.set_username("");
    let _ = url.set_password(None);
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(name, value)| {
                let secret = SECRET_PARAMETERS.iter().any(|s| name.eq_ignore_ascii_case(s));
                (name.into_owned(), if secret { "***".to_owned() } else { value.into_owned() })
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// How an answer to a poll is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// A resource or monitor whose state decides.
    State,
    /// `202` in progress; anything else 2xx is the final resource.
    Final,
}

/// One stage of a wait: polling one handle.
pub(crate) enum Stage {
    /// Done.
    Ready(Ready),
    /// The server's operation finished; now wait for the resource at this handle.
    Then(Handle),
}

/// Polls handles through the client (and so its retry layer).
pub(crate) struct Poller<'a> {
    pub client: &'a ClientWithMiddleware,
    pub waiter: Waiter,
    pub spec: &'a WaitFor,
    /// The create's URL, as sent (with any user info, which polls on its origin reuse).
    pub create_url: &'a Url,
    pub id_field: &'a str,
    /// When the whole wait must end.
    pub until: SystemTime,
}

impl Poller<'_> {
    /// Polls `handle` until its pattern says done.
    pub(crate) async fn stage(&self, handle: &Handle) -> Result<Stage, WaitError> {
        let remaining = self.until.duration_since(self.waiter.now()).unwrap_or(Duration::ZERO);
        let spec = self.spec.clone().timeout(remaining);
        let poll = |url: &str, reading| {
            let url = self.with_credentials(url);
            move || {
                let url = url.clone();
                async move { self.observe(&url, reading).await }
            }
        };
        let (ready, resource_url) = match handle {
            Handle::Resource { url } => {
                return self.waiter.wait(&spec, poll(url, Reading::State)).await.map(Stage::Ready);
            }
            Handle::Location { url } => {
                let done = WaitFor { rule: None, ..spec };
                (self.waiter.wait(&done, poll(url, Reading::Final)).await?, None)
            }
            Handle::StatusMonitor { url, resource_url } => {
                let rule = StateRule::Field("status".into());
                let monitor = spec.with_rule(
                    rule,
                    vec!["Succeeded".into()],
                    vec!["Failed".into(), "Canceled".into(), "Cancelled".into()],
                );
                let mut ready = self.waiter.wait(&monitor, poll(url, Reading::State)).await?;
                let located = ready.resource.get("resourceLocation").and_then(Value::as_str).map(str::to_owned);
                // The monitor is not the resource.
                ready.resource = Value::Null;
                (ready, located.or_else(|| resource_url.clone()))
            }
            Handle::Operation { url } => {
                let operation = spec.with_rule(StateRule::Done, vec!["done".into()], vec!["failed".into()]);
                let mut ready = self.waiter.wait(&operation, poll(url, Reading::State)).await?;
                ready.resource = ready.resource.get("response").cloned().unwrap_or(Value::Null);
                (ready, None)
            }
            Handle::Action { url, resource_url } => {
                let rule = StateRule::Field("action.status".into());
                let action = spec.with_rule(rule, vec!["success".into()], vec!["error".into()]);
                let mut ready = self.waiter.wait(&action, poll(url, Reading::State)).await?;
                ready.resource = Value::Null;
                (ready, resource_url.clone())
            }
        };
        self.after_operation(ready, resource_url).await
    }

    /// The server's operation finished: the resource, read where it is, or the next stage.
    async fn after_operation(&self, ready: Ready, located: Option<String>) -> Result<Stage, WaitError> {
        let located = match located {
            Some(url) => Some(same_origin(self.create_url, &url).map_err(|e| WaitError::Poll(e.into()))?),
            None => {
                let answered = Answered {
                    status: StatusCode::OK,
                    headers: &HeaderMap::new(),
                    resource: &ready.resource,
                    create_url: self.create_url,
                    id_field: self.id_field,
                };
                let self_link = ready.resource.get("selfLink").and_then(Value::as_str);
                match self_link {
                    Some(link) => Some(same_origin(self.create_url, link).map_err(|e| WaitError::Poll(e.into()))?),
                    None => resource_url(&answered).map_err(|e| WaitError::Poll(e.into()))?,
                }
            }
        };
        match located {
            Some(url) if self.spec.has_state() => Ok(Stage::Then(Handle::Resource { url })),
            Some(url) if ready.resource.is_null() => {
                let remaining = self.until.duration_since(self.waiter.now()).unwrap_or(Duration::ZERO);
                let done = WaitFor { rule: None, ..self.spec.clone().timeout(remaining) };
                let url = self.with_credentials(&url);
                let read = self.waiter.wait(&done, || self.observe(&url, Reading::Final)).await?;
                Ok(Stage::Ready(Ready { polls: ready.polls + read.polls, waited: ready.waited + read.waited, ..read }))
            }
            _ if self.spec.has_state() => Err(WaitError::Poll(
                "the operation finished, but names neither the resource's location nor its id".into(),
            )),
            _ => Ok(Stage::Ready(ready)),
        }
    }

    /// `url` with the create URL's user info, when it is on the create's origin.
    fn with_credentials(&self, url: &str) -> String {
        match Url::parse(url) {
            Ok(mut parsed) if parsed.origin() == self.create_url.origin() => {
                let _ = parsed.set_username(self.create_url.username());
                let _ = parsed.set_password(self.create_url.password());
                parsed.to_string()
            }
            _ => url.to_owned(),
        }
    }

    /// One poll: `GET url`, within what is left of the wait, its body read within the retry
    /// layer's limits.
    async fn observe(&self, url: &str, reading: Reading) -> Result<Observation, BoxError> {
        let remaining = self.until.duration_since(self.waiter.now()).unwrap_or(Duration::ZERO);
        let options = RequestOptions::new().buffer_body().deadline(remaining + WaitFor::POLL_GRACE);
        let response = self.client.get(url).with_extension(options).send().await?;
        let status = response.status();
        let after = retry_after(response.headers(), self.waiter.now());
        let body = response.bytes().await?;
        let json = || serde_json::from_slice::<Value>(&body);
        let observation = match (status.as_u16(), reading) {
            (404, _) => Observation::not_found(),
            (202, _) => Observation::in_progress(),
            (204, _) => Observation::finished(Value::Null),
            (200..=299, Reading::Final) => Observation::finished(json().unwrap_or(Value::Null)),
            (200..=299, Reading::State) => Observation::resource(json().map_err(|e| {
                format!("the poll of {} answered {status} with a body that is not JSON: {e}", redacted(url))
            })?),
            _ => {
                let excerpt = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
                return Err(format!("the poll of {} answered {status}: {excerpt}", redacted(url)).into());
            }
        };
        Ok(observation.retry_after(after))
    }
}

fn redacted(url: &str) -> String {
    crate::target::redact_str(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(
        status: u16,
        headers: &[(&str, &str)],
        resource: Value,
        spec: &WaitFor,
    ) -> Result<Option<Handle>, String> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        let create_url = Url::parse("https://api.example/v1/projects/p/cvms").unwrap();
        let answer = Answered {
            status: StatusCode::from_u16(status).unwrap(),
            headers: &map,
            resource: &resource,
            create_url: &create_url,
            id_field: "id",
        };
        Handle::detect(&answer, spec)
    }

    #[test]
    fn recognises_each_pattern() {
        let any = WaitFor::done();
        let running = WaitFor::field("status").target(["running"]);
        let handle = |status, headers: &[(&str, &str)], resource| detect(status, headers, resource, &any).unwrap();
        assert_eq!(
            handle(202, &[("operation-location", "/v1/operations/op-1"), ("location", "/v1/cvms/c1")], Value::Null),
            Some(Handle::StatusMonitor {
                url: "https://api.example/v1/operations/op-1".into(),
                resource_url: Some("https://api.example/v1/cvms/c1".into())
            })
        );
        assert_eq!(
            handle(202, &[("azure-asyncoperation", "https://api.example/ops/1")], Value::Null),
            Some(Handle::StatusMonitor { url: "https://api.example/ops/1".into(), resource_url: None })
        );
        assert_eq!(
            handle(202, &[("location", "ops/7")], Value::Null),
            Some(Handle::Location { url: "https://api.example/v1/projects/p/ops/7".into() })
        );
        assert_eq!(
            handle(200, &[], serde_json::json!({"name": "operations/op-3", "done": false})),
            Some(Handle::Operation { url: "https://api.example/v1/operations/op-3".into() })
        );
        assert_eq!(
            handle(201, &[], serde_json::json!({"id": 42, "action": {"id": 9, "status": "running"}})),
            Some(Handle::Action {
                url: "https://api.example/v1/actions/9".into(),
                resource_url: Some("https://api.example/v1/projects/p/cvms/42".into())
            })
        );
        assert_eq!(handle(201, &[], serde_json::json!({"id": "c1", "status": "starting"})), None, "no state asked for");
        assert_eq!(
            detect(201, &[], serde_json::json!({"id": "c1", "status": "starting"}), &running).unwrap(),
            Some(Handle::Resource { url: "https://api.example/v1/projects/p/cvms/c1".into() })
        );
        assert_eq!(
            detect(201, &[("location", "/v1/cvms/c1")], serde_json::json!({}), &running).unwrap(),
            Some(Handle::Resource { url: "https://api.example/v1/cvms/c1".into() })
        );
        assert!(detect(201, &[], serde_json::json!({"status": "starting"}), &running).is_err(), "nowhere to read it");
        // A generic client follows only 202s.
        let accepted = WaitFor::accepted();
        assert_eq!(
            detect(200, &[], serde_json::json!({"name": "operations/1", "done": false}), &accepted).unwrap(),
            None
        );
    }

    #[test]
    fn hostile_poll_urls_are_refused() {
        let any = WaitFor::done();
        for (headers, resource) in [
            (vec![("location", "https://evil.example/steal")], Value::Null),
            (vec![("operation-location", "//evil.example/x")], Value::Null),
        ] {
            assert!(detect(202, &headers, resource, &any).unwrap_err().contains("another origin"));
        }
        let action = serde_json::json!({"action": {"id": "../../admin"}});
        assert_eq!(
            detect(201, &[], action, &any).unwrap().map(|h| h.url().to_owned()).as_deref(),
            Some("https://api.example/v1/actions/..%2F..%2Fadmin"),
            "an id is one segment"
        );
        assert!(detect(201, &[], serde_json::json!({"action": {"id": ".."}}), &any).is_err());
        let link = serde_json::json!({"name": "o", "done": false, "selfLink": "http://api.example/x"});
        assert!(detect(200, &[], link, &any).unwrap_err().contains("another origin"), "http is another origin");
    }

    #[test]
    fn stored_handles_keep_no_secrets() {
        let handle = Handle::StatusMonitor {
            url: "https://u:p@api.example/ops/1?api-version=2024&sig=abc".into(),
            resource_url: Some("https://api.example/cvms/c1?token=t".into()),
        };
        assert_eq!(
            handle.stored(),
            Handle::StatusMonitor {
                url: "https://api.example/ops/1?api-version=2024&sig=***".into(),
                resource_url: Some("https://api.example/cvms/c1?token=***".into()),
            }
        );
        let json = serde_json::to_value(handle.stored()).unwrap();
        assert_eq!(json["pattern"], "status_monitor");
        assert_eq!(serde_json::from_value::<Handle>(json).unwrap(), handle.stored());
    }
}
