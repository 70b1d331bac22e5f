//! A fake cloud: CVMs and replicas behind an idempotency store, on a real wiremock server.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};
use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

use super::long_running::{LongRunning, Progress, Provisioning, number};
use super::profile::ServerProfile;
use super::resource::Resource;
use super::store::{Answer, Handled, Incoming, KeyRead, Store, read_key};
use crate::time::{Clock, SystemClock, lock, rfc3339};

/// A request the server received.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SeenRequest {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// The idempotency key as the server read it (unquoted), if it carried a valid one.
    pub key: Option<String>,
    /// The body.
    pub body: Bytes,
    /// The status answered.
    pub status: u16,
    decoded_last: Option<String>,
}

impl SeenRequest {
    /// A top-level string field of the JSON body, e.g. `"name"`, to tell operations apart.
    pub fn json_field(&self, field: &str) -> Option<String> {
        json_field(&self.body, field)
    }

    /// Whether it was a create (`POST` to a collection).
    pub fn is_create(&self) -> bool {
        self.method == "POST"
    }

    /// The last path segment, percent-decoded: the item an item route names.
    pub fn path_id(&self) -> Option<&str> {
        self.decoded_last.as_deref()
    }
}

pub(crate) fn json_field(body: &[u8], field: &str) -> Option<String> {
    match serde_json::from_slice::<Value>(body).ok()?.get(field)? {
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

struct Item {
    collection: String,
    resource: Resource,
    /// Lists of the collection this item is still hidden from.
    hidden_for: u32,
    deleted: bool,
    /// Put there by [`FakeCloud::add_foreign`], not created through the API.
    foreign: bool,
    /// Its provisioning, while it goes on.
    progress: Option<Progress>,
}

/// How a fake cloud makes and answers creates.
#[derive(Clone)]
struct Shape {
    list_lag: u32,
    /// How lists are paged, and how many items a page holds.
    pages: Option<(PageStyle, usize)>,
    unique_names: bool,
    /// Ids from the number of the item (1, 2, …) instead of UUIDs.
    ids: Option<Arc<dyn Fn(u64) -> String + Send + Sync>>,
    answer: CreateAnswer,
    provisioning: Provisioning,
}

/// How a fake cloud pages its lists (see [`FakeCloudBuilder::pagination`]). The next page's
/// address is relative to the list's, or built from the `Host` the client sent, so a client
/// behind a [`ChaosProxy`](super::ChaosProxy) keeps going through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PageStyle {
    /// `Link: </…?page=2>; rel="next"` (RFC 8288, GitHub's style); no header on the last page.
    LinkHeader,
    /// `{"items": […], "next": "http://host/…?page=2"}` (Django REST framework's style);
    /// `"next": null` on the last page.
    NextUrl,
    /// `{"items": […], "next_page_token": "…"}`, read back from `?page_token=…` (Google's
    /// style); no token on the last page.
    PageToken,
    /// `{"items": […], field: "…"}`, read back from `?param=…`: a cursor of the server's own
    /// naming.
    Cursor {
        /// The response field that holds the cursor.
        field: &'static str,
        /// The query parameter that takes it back.
        param: &'static str,
    },
}

/// What a create's successful answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CreateAnswer {
    /// The resource, as JSON (the default).
    #[default]
    Json,
    /// `Created`, as `text/plain`: no id to read.
    PlainText,
    /// Nothing.
    Empty,
}

struct State {
    store: Store,
    items: Vec<Item>,
    requests: Vec<SeenRequest>,
    handler_runs: usize,
    fail_next: VecDeque<StatusCode>,
    shape: Shape,
    /// compose_hash → (name, app_id) of provisioned, not yet committed CVMs.
    provisions: std::collections::HashMap<String, (String, String)>,
}

struct Shared {
    profile: ServerProfile,
    clock: Arc<dyn Clock>,
    hold_responses: bool,
    state: Mutex<State>,
}

/// A fake cloud API on a real socket, enforcing idempotency as a [`ServerProfile`] says.
///
/// | route | does |
/// |---|---|
/// | `POST /cvms` | creates a CVM (`{"name": …, "app_id": …}`, both optional) |
/// | `POST /cvms/provision`, then `POST /cvms` with `{"compose_hash": …}` | a two-step create: provision (no resource yet), then commit |
/// | `GET /cvms`, `GET /cvms/{id}`, `DELETE /cvms/{id}` | lists (`{"items": […]}`), reads, deletes |
/// | `POST /apps/{app_id}/cvms/{vm_uuid}/replicas` | creates a replica of that CVM |
/// | `GET …/replicas`, `DELETE …/replicas/{id}` | lists, deletes (404 if absent) |
///
/// Creates go through the profile's idempotency store; lists may lag (a new item is hidden from
/// the next *k* lists of its collection); counters tell how often the create handler ran and how
/// many resources were made.
///
/// # Examples
///
/// ```
/// use idempotent_retry::IdempotentRetry;
/// use idempotent_retry::testing::{FakeCloud, ServerProfile};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let profile = ServerProfile::stripe();
/// let cloud = FakeCloud::start(profile.clone()).await;
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(profile.configure(IdempotentRetry::builder()).build())
///     .build();
///
/// let response = client.post(format!("{}/cvms", cloud.uri())).body(r#"{"name":"web-1"}"#).send().await.unwrap();
/// assert_eq!(response.status(), 201);
/// assert_eq!(cloud.created(), 1);
/// # }
/// ```
pub struct FakeCloud {
    server: MockServer,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FakeCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCloud")
            .field("uri", &self.uri())
            .field("profile", &self.shared.profile.name)
            .field("created", &self.created())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for FakeCloudBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCloudBuilder")
            .field("profile", &self.profile.name)
            .field("list_lag", &self.shape.list_lag)
            .field("unique_names", &self.shape.unique_names)
            .field("answer", &self.shape.answer)
            .finish_non_exhaustive()
    }
}

/// Builds a [`FakeCloud`].
pub struct FakeCloudBuilder {
    profile: ServerProfile,
    clock: Option<Arc<dyn Clock>>,
    shape: Shape,
}

impl FakeCloudBuilder {
    /// The server's clock, for retention and in-flight windows (default: the system clock).
    ///
    /// With a clock of its own, processing time passes only on that clock: answers are not also
    /// held back in real time, so a test with a manual clock never waits.
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Hides each new item from the next `lists` lists of its collection (default 0).
    pub fn list_lag(mut self, lists: u32) -> Self {
        self.shape.list_lag = lists;
        self
    }

    /// Serves lists `page_size` items a page, in `style` (default: one page, all items).
    pub fn pagination(mut self, style: PageStyle, page_size: usize) -> Self {
        self.shape.pages = Some((style, page_size.max(1)));
        self
    }

    /// Refuses a second live item with the same name in a collection: 409 "already exists".
    pub fn unique_names(mut self) -> Self {
        self.shape.unique_names = true;
        self
    }

    /// Gives the `n`th item (1, 2, …) the id `ids(n)` instead of a UUID: e.g. hostile ids such
    /// as `../../admin/users/{n}` or `x?force=true&n={n}`, to check that a client treats an id
    /// as one path segment. Routes take path segments percent-decoded.
    pub fn ids(mut self, ids: impl Fn(u64) -> String + Send + Sync + 'static) -> Self {
        self.shape.ids = Some(Arc::new(ids));
        self
    }

    /// What a successful create answers with (default the resource as JSON).
    pub fn create_answer(mut self, answer: CreateAnswer) -> Self {
        self.shape.answer = answer;
        self
    }

    /// Creates go on after they answer, as `style` says (see [`LongRunning`]); provisioning
    /// takes `provisioning` on the server's clock (default: [`LongRunning::Immediate`]).
    pub fn long_running(mut self, style: LongRunning, provisioning: Duration) -> Self {
        self.shape.provisioning.style = style;
        self.shape.provisioning.takes = provisioning;
        self
    }

    /// The next `creates` creates fail provisioning: they end in the failure state.
    pub fn failing_provisioning(mut self, creates: u32) -> Self {
        self.shape.provisioning.failing = creates;
        self
    }

    /// In-progress answers to polls carry `Retry-After: seconds`.
    pub fn poll_retry_after(mut self, seconds: u64) -> Self {
        self.shape.provisioning.retry_after = Some(seconds);
        self
    }

    /// Starts the server.
    pub async fn start(self) -> FakeCloud {
        let hold_responses = self.clock.is_none();
        let shared = Arc::new(Shared {
            profile: self.profile,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            hold_responses,
            state: Mutex::new(State {
                store: Store::default(),
                items: Vec::new(),
                requests: Vec::new(),
                handler_runs: 0,
                fail_next: VecDeque::new(),
                shape: self.shape,
                provisions: std::collections::HashMap::new(),
            }),
        });
        let server = MockServer::start().await;
        Mock::given(wiremock::matchers::any()).respond_with(Responder(shared.clone())).mount(&server).await;
        FakeCloud { server, shared }
    }
}

impl FakeCloud {
    /// A fake cloud with `profile` and every default.
    pub async fn start(profile: ServerProfile) -> Self {
        Self::builder(profile).start().await
    }

    /// A builder for a fake cloud with `profile`.
    pub fn builder(profile: ServerProfile) -> FakeCloudBuilder {
        let shape = Shape {
            list_lag: 0,
            pages: None,
            unique_names: false,
            ids: None,
            answer: CreateAnswer::Json,
            provisioning: Provisioning::default(),
        };
        FakeCloudBuilder { profile, clock: None, shape }
    }

    /// `http://127.0.0.1:port`.
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// The socket address, e.g. for a [`ChaosProxy`](super::ChaosProxy) in front.
    pub fn address(&self) -> SocketAddr {
        *self.server.address()
    }

    /// The profile it enforces.
    pub fn profile(&self) -> &ServerProfile {
        &self.shared.profile
    }

    /// The next `count` create handler runs fail with `status` and create nothing.
    pub fn fail_next_creates(&self, count: usize, status: StatusCode) {
        lock(&self.shared.state).fail_next.extend(std::iter::repeat_n(status, count));
    }

    /// Sets a resource's `status` (e.g. `running`), wherever it is.
    pub fn set_status(&self, id: &str, status: &str) {
        if let Some(item) = lock(&self.shared.state).items.iter_mut().find(|i| i.resource.id == id) {
            item.resource.status = status.to_owned();
        }
    }

    /// The next `creates` creates fail provisioning (see [`FakeCloudBuilder::long_running`]).
    pub fn fail_next_provisioning(&self, creates: u32) {
        lock(&self.shared.state).shape.provisioning.failing = creates;
    }

    /// Changes the list lag for items created from now on.
    pub fn set_list_lag(&self, lists: u32) {
        lock(&self.shared.state).shape.list_lag = lists;
    }

    /// Puts an item in a collection the way another client would (not through this fake's API,
    /// so counters such as [`created`](Self::created) leave it out): a pre-existing or concurrent
    /// foreign item, created at `created_at` by the server's clock.
    pub fn add_foreign(&self, collection: &str, name: &str, created_at: SystemTime) -> Resource {
        let mut state = lock(&self.shared.state);
        let n = state.items.len() as u64 + 1;
        let id = state.shape.ids.as_ref().map_or_else(|| uuid::Uuid::new_v4().to_string(), |ids| ids(n));
        let resource = Resource {
            id,
            app_id: "app-foreign".into(),
            vm_uuid: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            created_at: rfc3339(created_at),
            status: "running".into(),
        };
        state.items.push(Item {
            collection: collection.to_owned(),
            resource: resource.clone(),
            hidden_for: 0,
            deleted: false,
            foreign: true,
            progress: None,
        });
        resource
    }

    /// Deletes an item the way another client would (not through this fake's API); whether it
    /// was there.
    pub fn remove(&self, collection: &str, id: &str) -> bool {
        let mut state = lock(&self.shared.state);
        let found = state.items.iter_mut().find(|i| i.collection == collection && i.resource.id == id && !i.deleted);
        found.map(|item| item.deleted = true).is_some()
    }

    /// The server forgets every idempotency key it holds (a restart of a server that keeps them
    /// in memory, or its retention passing): a key sent again is new to it.
    pub fn forget_keys(&self) {
        lock(&self.shared.state).store = Store::default();
    }

    /// Whether `id` was deleted through the API ([`remove`](Self::remove) does not count).
    pub fn deleted_through_api(&self, id: &str) -> bool {
        let state = lock(&self.shared.state);
        state.requests.iter().any(|r| r.method == "DELETE" && (200..300).contains(&r.status) && r.path_id() == Some(id))
    }

    /// Every resource ever in `collection` (deleted ones too, foreign ones too), with whether it
    /// is foreign and whether it is live.
    pub fn history(&self, collection: &str) -> Vec<(Resource, bool, bool)> {
        let mut state = lock(&self.shared.state);
        state.provision(self.shared.clock.now());
        state
            .items
            .iter()
            .filter(|i| i.collection == collection)
            .map(|i| (i.resource.clone(), i.foreign, !i.deleted))
            .collect()
    }

    /// Every collection that has held an item, in the order first used (`cvms`,
    /// `apps/{app}/cvms/{vm}/replicas`, …).
    pub fn collections(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for item in &lock(&self.shared.state).items {
            if !seen.contains(&item.collection) {
                seen.push(item.collection.clone());
            }
        }
        seen
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.shared.state).requests.clone()
    }

    /// The keys carried by create requests, in order (`None` for a request without one).
    pub fn keys_seen(&self) -> Vec<Option<String>> {
        self.requests().into_iter().filter(SeenRequest::is_create).map(|r| r.key).collect()
    }

    /// How many times the create handler ran (a replay or an in-flight answer does not run it).
    pub fn handler_runs(&self) -> usize {
        lock(&self.shared.state).handler_runs
    }

    /// How many resources were ever created through the API, deleted ones included.
    pub fn created(&self) -> usize {
        lock(&self.shared.state).items.iter().filter(|i| !i.foreign).count()
    }

    /// How many resources named `name` were ever created through the API.
    pub fn created_named(&self, name: &str) -> usize {
        lock(&self.shared.state).items.iter().filter(|i| !i.foreign && i.resource.name == name).count()
    }

    /// Resources created beyond the first of each name in each collection: the duplicates.
    pub fn duplicates(&self) -> usize {
        let state = lock(&self.shared.state);
        let mut names = BTreeMap::<(&str, &str), usize>::new();
        for item in state.items.iter().filter(|i| !i.foreign) {
            *names.entry((&item.collection, &item.resource.name)).or_default() += 1;
        }
        names.values().map(|n| n - 1).sum()
    }

    /// The live resources of a collection (`"cvms"` or `"apps/{app}/cvms/{vm}/replicas"`), lag ignored.
    pub fn resources(&self, collection: &str) -> Vec<Resource> {
        let mut state = lock(&self.shared.state);
        state.provision(self.shared.clock.now());
        state.items.iter().filter(|i| i.collection == collection && !i.deleted).map(|i| i.resource.clone()).collect()
    }

    /// The distinct keys each operation's create requests carried, the operation told by
    /// `operation` (e.g. `|r| r.json_field("name")`).
    pub fn keys_by_operation(
        &self,
        operation: impl Fn(&SeenRequest) -> Option<String>,
    ) -> BTreeMap<String, BTreeSet<Option<String>>> {
        let mut map = BTreeMap::<String, BTreeSet<Option<String>>>::new();
        for request in self.requests().iter().filter(|r| r.is_create()) {
            if let Some(op) = operation(request) {
                map.entry(op).or_default().insert(request.key.clone());
            }
        }
        map
    }
}

struct Responder(Arc<Shared>);

impl Respond for Responder {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        self.0.respond(request)
    }
}

enum Route {
    Provision,
    /// `GET /operations/op-{n}`.
    Operation(usize),
    /// `GET /actions/{n}`.
    Action(usize),
    Create {
        collection: String,
        app_id: Option<String>,
        vm_uuid: Option<String>,
    },
    List {
        collection: String,
    },
    Get {
        collection: String,
        id: String,
    },
    Delete {
        collection: String,
        id: String,
    },
    NotFound,
}

fn route(method: &str, path: &str) -> Route {
    let decoded: Vec<String> = path.trim_matches('/').split('/').map(percent_decode).collect();
    let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();
    match (method, parts.as_slice()) {
        ("POST", ["cvms", "provision"]) => Route::Provision,
        ("POST", ["cvms"]) => Route::Create { collection: "cvms".into(), app_id: None, vm_uuid: None },
        ("GET", ["cvms"]) => Route::List { collection: "cvms".into() },
        ("GET", ["cvms", id]) => Route::Get { collection: "cvms".into(), id: (*id).into() },
        ("DELETE", ["cvms", id]) => Route::Delete { collection: "cvms".into(), id: (*id).into() },
        ("GET", ["operations", op]) => number(op).map_or(Route::NotFound, Route::Operation),
        ("GET", ["actions", n]) => number(n).map_or(Route::NotFound, Route::Action),
        ("POST", ["apps", app, "cvms", vm, "replicas"]) => {
            Route::Create { collection: replicas(app, vm), app_id: Some((*app).into()), vm_uuid: Some((*vm).into()) }
        }
        ("GET", ["apps", app, "cvms", vm, "replicas"]) => Route::List { collection: replicas(app, vm) },
        ("GET", ["apps", app, "cvms", vm, "replicas", id]) => {
            Route::Get { collection: replicas(app, vm), id: (*id).into() }
        }
        ("DELETE", ["apps", app, "cvms", vm, "replicas", id]) => {
            Route::Delete { collection: replicas(app, vm), id: (*id).into() }
        }
        _ => Route::NotFound,
    }
}

/// A path segment with its `%XX` escapes decoded (invalid escapes kept as they are).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The collection name of a CVM's replicas.
pub fn replicas(app_id: &str, vm_uuid: &str) -> String {
    format!("apps/{app_id}/cvms/{vm_uuid}/replicas")
}

fn json_response(status: StatusCode, body: &Value) -> (StatusCode, Bytes) {
    (status, Bytes::from(body.to_string()))
}

impl Shared {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let now = self.clock.now();
        let method = request.method.as_str();
        let path = request.url.path();
        let mut state = lock(&self.state);
        state.provision(now);
        let answer = match route(method, path) {
            Route::Create { collection, app_id, vm_uuid } => {
                let spec = CreateSpec {
                    collection: &collection,
                    app_id: app_id.as_deref(),
                    vm_uuid: vm_uuid.as_deref(),
                    name: None,
                };
                self.create_keyed(&mut state, request, &spec, now)
            }
            Route::Provision => state.provision_cvm(&request.body),
            Route::Operation(n) => match state.items.get(n.wrapping_sub(1)).filter(|i| !i.foreign) {
                Some(item) => state.shape.provisioning.operation(n, &item.resource, &item.collection),
                None => Answer::json(StatusCode::NOT_FOUND, json!({"error": "no such operation"})),
            },
            Route::Action(n) => match state.items.get(n.wrapping_sub(1)).filter(|i| !i.foreign) {
                Some(item) => state.shape.provisioning.action(n, &item.resource),
                None => Answer::json(StatusCode::NOT_FOUND, json!({"error": "no such action"})),
            },
            Route::List { collection } => {
                let host = request.headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost");
                state.list(&collection, &request.url, host)
            }
            Route::Get { collection, id } => match state.live(&collection, &id) {
                Some(item) => Answer::json(StatusCode::OK, json!(item.resource)),
                None => Answer::json(StatusCode::NOT_FOUND, json!({"error": "not found"})),
            },
            Route::Delete { collection, id } => match state.live(&collection, &id) {
                Some(item) => {
                    item.deleted = true;
                    Answer::empty(StatusCode::NO_CONTENT)
                }
                None => Answer::json(StatusCode::NOT_FOUND, json!({"error": "not found"})),
            },
            Route::NotFound => Answer::json(StatusCode::NOT_FOUND, json!({"error": "no such route"})),
        };
        let key = match read_key(&self.profile, &request.headers, &request.body) {
            KeyRead::Key(key) => Some(key),
            _ => None,
        };
        state.requests.push(SeenRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            key,
            body: Bytes::from(request.body.clone()),
            status: answer.status.as_u16(),
            decoded_last: path.trim_matches('/').rsplit('/').next().map(percent_decode),
        });
        drop(state);
        self.template(answer)
    }

    /// A create through the server's idempotency store.
    fn create_keyed(
        &self,
        state: &mut State,
        request: &wiremock::Request,
        spec: &CreateSpec<'_>,
        now: SystemTime,
    ) -> Answer {
        let incoming = Incoming {
            method: request.method.as_str(),
            path: request.url.path(),
            headers: &request.headers,
            body: &request.body,
        };
        let State { store, items, handler_runs, fail_next, shape, provisions, .. } = state;
        // The store calls one or the other, never both at once.
        let items = std::cell::RefCell::new(items);
        let mut run = || {
            *handler_runs += 1;
            let mut items = items.borrow_mut();
            // A commit of a provisioned CVM takes its name and app from the provision.
            let (name, app) = match json_field(&request.body, "compose_hash").map(|h| provisions.get(&h).cloned()) {
                Some(None) => {
                    let (status, body) =
                        json_response(StatusCode::BAD_REQUEST, &json!({"error": "unknown compose_hash"}));
                    return Handled::new(status, body, None);
                }
                Some(Some((name, app))) => (Some(name), Some(app)),
                None => (None, None),
            };
            let spec = CreateSpec { app_id: spec.app_id.or(app.as_deref()), name: name.as_deref(), ..*spec };
            create(&mut items, fail_next, shape, &spec, &request.body, now)
        };
        let render = |id: &str| {
            items
                .borrow()
                .iter()
                .find(|i| i.resource.id == id && !i.deleted)
                .map(|i| Bytes::from(serde_json::to_vec(&i.resource).expect("serializable")))
        };
        store.handle(&self.profile, &incoming, now, &mut run, &render)
    }

    fn template(&self, answer: Answer) -> ResponseTemplate {
        let mut template = ResponseTemplate::new(answer.status.as_u16());
        if !answer.body.is_empty() {
            let json = serde_json::from_slice::<serde::de::IgnoredAny>(&answer.body).is_ok();
            template =
                template.set_body_raw(answer.body.to_vec(), if json { "application/json" } else { "text/plain" });
        }
        for (name, value) in answer.headers {
            template = template.insert_header(name, value);
        }
        if self.hold_responses && !answer.processing.is_zero() {
            template = template.set_delay(answer.processing);
        }
        template
    }
}

impl State {
    /// Moves every item whose provisioning has ended to its final status.
    fn provision(&mut self, now: SystemTime) {
        for item in &mut self.items {
            if let Some(status) = item.progress.as_ref().and_then(|p| p.status_at(now)) {
                item.resource.status = status.to_owned();
                item.progress = None;
            }
        }
    }

    /// Provisions a CVM: its name and app, kept under a new compose hash.
    fn provision_cvm(&mut self, body: &[u8]) -> Answer {
        let name = json_field(body, "name").unwrap_or_else(|| "cvm".to_owned());
        let app_id = json_field(body, "app_id").unwrap_or_else(|| "app-1".to_owned());
        let hash = uuid::Uuid::new_v4().simple().to_string();
        self.provisions.insert(hash.clone(), (name.clone(), app_id.clone()));
        Answer::json(StatusCode::OK, json!({"compose_hash": hash, "name": name, "app_id": app_id}))
    }

    /// The items of `collection` a list shows now, the page `url` asks for. A list that starts
    /// at the first page runs each lagging item's lag down by one.
    fn list(&mut self, collection: &str, url: &url::Url, host: &str) -> Answer {
        let Some((style, size)) = self.shape.pages else {
            return Answer::json(StatusCode::OK, json!({ "items": self.visible(collection) }));
        };
        let param = match style {
            PageStyle::LinkHeader | PageStyle::NextUrl => "page",
            PageStyle::PageToken => "page_token",
            PageStyle::Cursor { param, .. } => param,
        };
        let cursor = url.query_pairs().find(|(k, _)| k == param).map(|(_, v)| v.into_owned());
        // Pages are numbered from 1 (`page=2`); tokens and cursors say where the page starts.
        let start = match (&cursor, style) {
            (None, _) => 0,
            (Some(page), PageStyle::LinkHeader | PageStyle::NextUrl) => match page.parse::<usize>() {
                Ok(n) if n >= 1 => (n - 1) * size,
                _ => return Answer::json(StatusCode::BAD_REQUEST, json!({"error": "bad page"})),
            },
            (Some(token), _) => match token.strip_prefix("after-").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => n,
                None => return Answer::json(StatusCode::BAD_REQUEST, json!({"error": "bad cursor"})),
            },
        };
        let visible = if cursor.is_none() { self.visible(collection) } else { self.shown(collection) };
        let page: Vec<Resource> = visible.iter().skip(start).take(size).cloned().collect();
        let more = start + size < visible.len();
        let (page_number, token) = (start / size + 2, format!("after-{}", start + size));
        let next_path = format!(
            "{}?{param}={}",
            url.path(),
            if matches!(style, PageStyle::LinkHeader | PageStyle::NextUrl) {
                page_number.to_string()
            } else {
                token.clone()
            }
        );
        let mut answer = match style {
            PageStyle::LinkHeader => Answer::json(StatusCode::OK, json!({ "items": page })),
            PageStyle::NextUrl => {
                let next = more.then(|| format!("http://{host}{next_path}"));
                Answer::json(StatusCode::OK, json!({ "items": page, "next": next }))
            }
            PageStyle::PageToken | PageStyle::Cursor { .. } => {
                let field = match style {
                    PageStyle::Cursor { field, .. } => field,
                    _ => "next_page_token",
                };
                let mut body = json!({ "items": page });
                if more {
                    body[field] = Value::String(token);
                }
                Answer::json(StatusCode::OK, body)
            }
        };
        if more && style == PageStyle::LinkHeader {
            let link = format!("<{next_path}>; rel=\"next\"");
            answer.headers.push((http::header::LINK, http::HeaderValue::from_str(&link).expect("a valid header")));
        }
        answer
    }

    /// The items of `collection` a list shows now; each lagging item's lag runs down by one.
    fn visible(&mut self, collection: &str) -> Vec<Resource> {
        let mut visible = Vec::new();
        for item in self.items.iter_mut().filter(|i| i.collection == collection && !i.deleted) {
            if item.hidden_for > 0 {
                item.hidden_for -= 1;
            } else {
                visible.push(item.resource.clone());
            }
        }
        visible
    }

    /// The items of `collection` a list shows now, lags left as they are (a later page).
    fn shown(&self, collection: &str) -> Vec<Resource> {
        let live = self.items.iter().filter(|i| i.collection == collection && !i.deleted && i.hidden_for == 0);
        live.map(|i| i.resource.clone()).collect()
    }

    /// The live item `id` of `collection`.
    fn live(&mut self, collection: &str, id: &str) -> Option<&mut Item> {
        self.items.iter_mut().find(|i| i.collection == collection && i.resource.id == id && !i.deleted)
    }
}

/// Where a create goes: the collection, and the parent's ids for a replica.
struct CreateSpec<'a> {
    collection: &'a str,
    app_id: Option<&'a str>,
    vm_uuid: Option<&'a str>,
    /// A name fixed by a provision, over the body's.
    name: Option<&'a str>,
}

fn create(
    items: &mut Vec<Item>,
    fail_next: &mut VecDeque<StatusCode>,
    shape: &mut Shape,
    spec: &CreateSpec<'_>,
    body: &[u8],
    now: SystemTime,
) -> Handled {
    let CreateSpec { collection, app_id, vm_uuid, name: fixed_name } = *spec;
    if let Some(status) = fail_next.pop_front() {
        let (status, body) = json_response(status, &json!({"error": "internal error"}));
        return Handled::new(status, body, None);
    }
    let live_in_collection = items.iter().filter(|i| i.collection == collection).count();
    let kind = if collection == "cvms" { "cvm" } else { "replica" };
    let name = fixed_name
        .map(str::to_owned)
        .or_else(|| json_field(body, "name"))
        .unwrap_or_else(|| format!("{kind}-{}", live_in_collection + 1));
    if shape.unique_names && items.iter().any(|i| i.collection == collection && !i.deleted && i.resource.name == name) {
        let (status, body) =
            json_response(StatusCode::CONFLICT, &json!({"error": format!("a {kind} named {name} already exists")}));
        return Handled::new(status, body, None);
    }
    let n = items.len() as u64 + 1;
    let id = shape.ids.as_ref().map_or_else(|| uuid::Uuid::new_v4().to_string(), |ids| ids(n));
    let resource = Resource {
        app_id: app_id.map(str::to_owned).or_else(|| json_field(body, "app_id")).unwrap_or_else(|| "app-1".to_owned()),
        vm_uuid: vm_uuid.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned),
        id: id.clone(),
        name,
        created_at: rfc3339(now),
        status: "starting".to_owned(),
    };
    let plain = match shape.answer {
        CreateAnswer::Json => Bytes::from(json!(resource).to_string()),
        CreateAnswer::PlainText => Bytes::from_static(b"Created"),
        CreateAnswer::Empty => Bytes::new(),
    };
    let answer = shape.provisioning.answer(&resource, collection, items.len() + 1, plain);
    items.push(Item {
        collection: collection.to_owned(),
        resource,
        hidden_for: shape.list_lag,
        deleted: false,
        foreign: false,
        progress: shape.provisioning.start(now),
    });
    debug_assert_eq!(answer.created.as_deref(), Some(id.as_str()));
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_routes_take_one_decoded_segment() {
        assert!(matches!(route("DELETE", "/cvms/..%2F..%2Fadmin"), Route::Delete { id, .. } if id == "../../admin"));
        assert!(matches!(route("GET", "/cvms/x%3Fforce=true"), Route::Get { id, .. } if id == "x?force=true"));
        assert!(matches!(route("DELETE", "/cvms/../admin"), Route::NotFound));
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }

    #[test]
    fn routes() {
        assert!(matches!(route("POST", "/cvms"), Route::Create { .. }));
        assert!(
            matches!(route("GET", "/apps/a/cvms/v/replicas"), Route::List { collection } if collection == "apps/a/cvms/v/replicas")
        );
        assert!(matches!(route("DELETE", "/apps/a/cvms/v/replicas/r1"), Route::Delete { id, .. } if id == "r1"));
        assert!(matches!(route("PUT", "/cvms"), Route::NotFound));
    }
}
