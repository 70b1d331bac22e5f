//! What the resources ask of the cloud, answered two ways: through idempotent-retry (the
//! default), or the usual way (feature `naive`), for comparison.

use std::time::Duration;

use serde_json::Value;

#[cfg(feature = "naive")]
mod naive;
#[cfg(not(feature = "naive"))]
mod ours;

#[cfg(feature = "naive")]
pub use naive::Api;
#[cfg(not(feature = "naive"))]
pub use ours::Api;

/// How long a create may wait for its CVM to run, and a reconcile for its replicas.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// The provider's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The API's base URL, e.g. `http://127.0.0.1:8080`.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer …`, if any.
    pub token: Option<String>,
    /// Where the journal is: a SQLite file's path, or a `postgres://` URL shared by every
    /// agent (default: the crate's default journal).
    #[cfg_attr(feature = "naive", allow(dead_code))] // the naive twin keeps no journal
    pub journal: Option<String>,
    /// Adaptive client-side rate limiting once the API throttles.
    #[cfg_attr(feature = "naive", allow(dead_code))] // the naive twin has no retry layer
    pub adaptive_rate: bool,
}

/// A CVM as the cloud has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cvm {
    pub id: String,
    pub name: String,
    pub app_id: String,
    pub status: String,
}

impl Cvm {
    pub fn from_json(resource: &Value) -> Option<Self> {
        let text = |field: &str| resource.get(field).and_then(Value::as_str).map(str::to_owned);
        Some(Self { id: text("id")?, name: text("name")?, app_id: text("app_id")?, status: text("status")? })
    }
}

/// A create that did not end ready. `created` is what the cloud made, if it made something:
/// the resource then goes into Terraform's state, tainted, instead of being orphaned.
#[derive(Debug)]
pub struct CreateFailure {
    pub created: Option<Cvm>,
    pub message: String,
}

/// The collection of a CVM's replicas, relative to the endpoint.
pub fn replicas_path(app_id: &str, vm_uuid: &str) -> String {
    let mut url = url::Url::parse("http://x/").expect("a URL");
    url.path_segments_mut().expect("a base").extend(["apps", app_id, "cvms", vm_uuid, "replicas"]);
    url.path().to_owned()
}

/// The ids of the items a list answer holds (`{"items": […]}` or an array), sorted.
pub fn listed_ids(list: &Value) -> Vec<String> {
    let items = list.as_array().or_else(|| list.get("items").and_then(Value::as_array));
    let mut ids: Vec<String> =
        items.into_iter().flatten().filter_map(|i| i.get("id").and_then(Value::as_str)).map(str::to_owned).collect();
    ids.sort();
    ids
}
