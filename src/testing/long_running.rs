//! Creates that go on after they answer, as real APIs run them: a status that moves, Azure's
//! 202s, Google's operations, Hetzner's actions.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::json;

use super::resource::Resource;
use super::store::{Answer, Handled};

/// How a [`FakeCloud`](super::FakeCloud)'s creates go on after they answer. Every style but
/// [`Immediate`](Self::Immediate) creates the resource `starting`; it becomes `running` (or
/// `error`, when [provisioning fails](super::FakeCloudBuilder::failing_provisioning)) once the
/// [provisioning time](super::FakeCloudBuilder::long_running) has passed on the server's clock.
///
/// | style | the create answers | then poll |
/// |---|---|---|
/// | `Immediate` | `201` and the resource, `starting` for good (tests move it with [`set_status`](super::FakeCloud::set_status)) | – |
/// | `Status` | `201` and the resource, `starting` (Phala's CVMs) | `GET /cvms/{id}` until `running` / `error` |
/// | `Location` | `202`, `Location: /operations/{op}` (Azure) | it: `202` until done, then `200` and the resource (failed: `400`) |
/// | `OperationLocation` | `202`, `Operation-Location: /operations/{op}`, `Location:` the resource (Azure) | the monitor: `status` `Running` → `Succeeded` with `resourceLocation`, or `Failed` |
/// | `Operation` | `200`, `{"name": "operations/{op}", "done": false}` (Google) | `GET /operations/{op}` until `done`, with `response` or `error` |
/// | `Action` | `201`, the resource and `"action": {"id": n, "status": "running"}` (Hetzner) | `GET /actions/{n}` until `success` / `error` |
///
/// In-progress answers carry `Retry-After` when [asked to](super::FakeCloudBuilder::poll_retry_after).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LongRunning {
    /// Nothing goes on: the resource stays as created.
    #[default]
    Immediate,
    /// The resource's `status` moves.
    Status,
    /// `202` with `Location`.
    Location,
    /// `202` with `Operation-Location`.
    OperationLocation,
    /// An operation resource.
    Operation,
    /// An action.
    Action,
}

/// How creates go on, as configured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Provisioning {
    pub style: LongRunning,
    /// How long provisioning takes on the server's clock.
    pub takes: Duration,
    /// How many of the next creates fail provisioning.
    pub failing: u32,
    /// `Retry-After` seconds on in-progress answers.
    pub retry_after: Option<u64>,
}

/// One item's provisioning.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    pub ready_at: SystemTime,
    pub fails: bool,
}

impl Provisioning {
    /// The provisioning of a resource created now, if creates go on.
    pub(crate) fn start(&mut self, now: SystemTime) -> Option<Progress> {
        if self.style == LongRunning::Immediate {
            return None;
        }
        let fails = self.failing > 0;
        self.failing = self.failing.saturating_sub(1);
        Some(Progress { ready_at: now + self.takes, fails })
    }

    /// The create's answer for `resource`, created in `collection` as item `n` (its operation
    /// and action number).
    pub(crate) fn answer(&self, resource: &Resource, collection: &str, n: usize, plain: Bytes) -> Handled {
        let id = resource.id.clone();
        let location = |value: String| (HeaderName::from_static("location"), header(&value));
        match self.style {
            LongRunning::Immediate | LongRunning::Status => Handled::new(StatusCode::CREATED, plain, Some(id)),
            LongRunning::Location => Handled {
                headers: vec![location(format!("/operations/op-{n}"))],
                ..Handled::new(StatusCode::ACCEPTED, Bytes::new(), Some(id))
            },
            LongRunning::OperationLocation => Handled {
                headers: vec![
                    (HeaderName::from_static("operation-location"), header(&format!("/operations/op-{n}"))),
                    location(item_path(collection, &resource.id)),
                ],
                ..Handled::new(StatusCode::ACCEPTED, Bytes::new(), Some(id))
            },
            LongRunning::Operation => {
                let body =
                    json!({"name": format!("operations/op-{n}"), "done": false, "metadata": {"target": resource.id}});
                Handled::new(StatusCode::OK, Bytes::from(body.to_string()), Some(id))
            }
            LongRunning::Action => {
                let mut body = json!(resource);
                body["action"] = json!({"id": n, "command": "create", "status": "running", "progress": 0});
                Handled::new(StatusCode::CREATED, Bytes::from(body.to_string()), Some(id))
            }
        }
    }

    /// The answer to a poll of operation `n` (`GET /operations/op-{n}`), whose resource is
    /// `resource` in `collection`.
    pub(crate) fn operation(&self, n: usize, resource: &Resource, collection: &str) -> Answer {
        let op = format!("op-{n}");
        let (done, failed) = (resource.status != "starting", resource.status == "error");
        let error =
            json!({"code": "ProvisioningFailed", "message": format!("{} could not be provisioned", resource.id)});
        let answer = match (self.style, done, failed) {
            (LongRunning::Location, false, _) => Answer::empty(StatusCode::ACCEPTED),
            (LongRunning::Location, true, false) => Answer::json(StatusCode::OK, json!(resource)),
            (LongRunning::Location, true, true) => Answer::json(StatusCode::BAD_REQUEST, json!({ "error": error })),
            (LongRunning::OperationLocation, false, _) => {
                Answer::json(StatusCode::OK, json!({"id": op, "status": "Running"}))
            }
            (LongRunning::OperationLocation, true, false) => Answer::json(
                StatusCode::OK,
                json!({"id": op, "status": "Succeeded", "resourceLocation": item_path(collection, &resource.id)}),
            ),
            (LongRunning::OperationLocation, true, true) => {
                Answer::json(StatusCode::OK, json!({"id": op, "status": "Failed", "error": error}))
            }
            (LongRunning::Operation, false, _) => {
                Answer::json(StatusCode::OK, json!({"name": format!("operations/{op}"), "done": false}))
            }
            (LongRunning::Operation, true, false) => Answer::json(
                StatusCode::OK,
                json!({"name": format!("operations/{op}"), "done": true, "response": resource}),
            ),
            (LongRunning::Operation, true, true) => Answer::json(
                StatusCode::OK,
                json!({"name": format!("operations/{op}"), "done": true, "error": {"code": 13, "message": error["message"]}}),
            ),
            _ => return Answer::json(StatusCode::NOT_FOUND, json!({"error": "no such operation"})),
        };
        if done { answer } else { self.in_progress(answer) }
    }

    /// The answer to a poll of action `n` (`GET /actions/{n}`).
    pub(crate) fn action(&self, n: usize, resource: &Resource) -> Answer {
        if self.style != LongRunning::Action {
            return Answer::json(StatusCode::NOT_FOUND, json!({"error": "no such action"}));
        }
        let (status, progress) = match resource.status.as_str() {
            "starting" => ("running", 50),
            "error" => ("error", 100),
            _ => ("success", 100),
        };
        let answer = Answer::json(
            StatusCode::OK,
            json!({"action": {"id": n, "command": "create", "status": status, "progress": progress}}),
        );
        if status == "running" { self.in_progress(answer) } else { answer }
    }

    /// `answer`, with `Retry-After` when in-progress answers carry one.
    pub(crate) fn in_progress(&self, mut answer: Answer) -> Answer {
        if let Some(seconds) = self.retry_after {
            answer.headers.push((HeaderName::from_static("retry-after"), header(&seconds.to_string())));
        }
        answer
    }
}

impl Progress {
    /// The status the resource has at `now`, if provisioning has ended.
    pub(crate) fn status_at(&self, now: SystemTime) -> Option<&'static str> {
        (now >= self.ready_at).then_some(if self.fails { "error" } else { "running" })
    }
}

fn header(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).expect("a header value")
}

/// The path of item `id` in `collection`.
pub(crate) fn item_path(collection: &str, id: &str) -> String {
    let mut url = url::Url::parse("http://x/").expect("a URL");
    url.path_segments_mut().expect("a base").extend(collection.split('/')).push(id);
    url.path().to_owned()
}

/// A poll route's item number: `op-{n}` or `{n}`.
pub(crate) fn number(text: &str) -> Option<usize> {
    text.strip_prefix("op-").unwrap_or(text).parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_paths_take_the_id_as_one_segment() {
        assert_eq!(item_path("cvms", "c1"), "/cvms/c1");
        assert_eq!(item_path("apps/a/cvms/v/replicas", "../x"), "/apps/a/cvms/v/replicas/..%2Fx");
        assert_eq!((number("op-7"), number("7"), number("x")), (Some(7), Some(7), None));
    }

    #[test]
    fn provisioning_fails_as_many_times_as_asked() {
        let t0 = SystemTime::UNIX_EPOCH;
        let mut p =
            Provisioning { style: LongRunning::Status, takes: Duration::from_secs(5), failing: 1, retry_after: None };
        let first = p.start(t0).unwrap();
        let second = p.start(t0).unwrap();
        assert_eq!((first.fails, second.fails), (true, false));
        assert_eq!(first.status_at(t0 + Duration::from_secs(4)), None);
        assert_eq!(
            (first.status_at(t0 + Duration::from_secs(5)), second.status_at(t0 + Duration::from_secs(5))),
            (Some("error"), Some("running"))
        );
        assert!(Provisioning::default().start(t0).is_none());
    }
}
