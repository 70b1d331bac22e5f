//! The reconcile engine: make a collection hold what is desired, without overshoot.
//!
//! The Kubernetes ReplicaSet "expectations" discipline, plus what Kubernetes lacks, a stable
//! identity per create:
//!
//! - **Stable keys per slot.** Each create's key is derived from the caller's scope, the
//!   operation, a *generation* and the slot (an index, or a name). A re-run, or a second applier
//!   with the same inputs, sends the same keys, and the server answers with the same items.
//! - **Expectations.** A create is expected from the moment it is sent until a list shows it
//!   (or it definitely failed, or the expectation expires: 5 minutes by default). While anything
//!   is expected, nothing new is created for the collection: a list that lags the create is not
//!   a reason to create again. Deletes are expected likewise.
//! - **Identity checks.** Each create's answer must carry an id, unique to its slot, and the
//!   declared fields (e.g. `app_id`, `vm_uuid`); otherwise the run stops with a typed error.
//!   Created ids must appear in a list before convergence is reported.
//! - **Overshoot** is always reported with the ids; it is deleted only if pruning is allowed,
//!   newest first, never a protected member or a named slot's, and only members this operation
//!   created unless foreign pruning is on. A 404 on delete counts as done.
//! - **Care.** Creates go out in slow-start batches (1, 2, 4, …) that stop at the first
//!   failure, under a concurrency cap. A transient failure is retried in the next round (a keyed
//!   slot with its own key); a refusal (a final status) stops the run with a typed error; every request goes through the retry layer and, for
//!   creates, through the [`KeyStore`](crate::KeyStore) of the [`Operations`].
//!
//! # Generations
//!
//! A slot's key is the same forever within a generation. After a scale-down, the deleted
//! items' slots are *retired* (the journal remembers them) and a later scale-up uses new slots.
//! Without the journal's memory (a new machine, a cleared journal) a later scale-up in the same
//! generation would reuse a slot whose key the server still remembers, and the server would
//! answer with the deleted item instead of creating one. Bump the generation whenever the
//! desired count rises after having fallen, or when the create body changes (a key is pinned to
//! its payload).

mod plan;
mod report;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

pub use plan::{Action, Desired, Member, Plan, PlanInput, Prune, Slot, plan};
pub use report::ReconcileReport;

use crate::error::Error;
use crate::journal::{Finish, OpState, Record};
use crate::operation::{IdentityMismatch, OperationError, Operations, items};
use crate::options::RequestOptions;
use crate::outcome::RetryOutcome;
use crate::time::{Clock, Sleeper, SystemClock, TokioSleeper};

type Protect = dyn Fn(&Value) -> bool + Send + Sync;
type Progress = dyn Fn(&ReconcileReport) + Send + Sync;

/// Why a reconcile stopped before converging. Carries the report of what it did so far.
#[derive(Debug, thiserror::Error)]
#[error("reconcile `{operation}` stopped: {failure}")]
#[non_exhaustive]
pub struct ReconcileError {
    /// The reconcile operation.
    pub operation: String,
    /// Why.
    pub failure: ReconcileFailure,
    /// What was done before it stopped.
    pub report: Box<ReconcileReport>,
}

/// Why a reconcile stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileFailure {
    /// A create's answer was not the item asked for; no further creates were made.
    #[error(transparent)]
    Identity(Box<IdentityMismatch>),
    /// A create's answer carried an id that belongs to another slot, or no id at all.
    #[error("slot {slot} was answered with id {id:?}, {why}")]
    BadId {
        /// The slot.
        slot: String,
        /// The id returned (empty if none).
        id: String,
        /// What is wrong with it.
        why: String,
    },
    /// The server refused a create (a final status). The slot is retired: its key may replay the
    /// refusal. Fix the cause, then reconcile again.
    #[error("the create for {slot} was refused with {status}: {body}")]
    Rejected {
        /// The slot.
        slot: String,
        /// The status.
        status: http::StatusCode,
        /// The response body, as text.
        body: String,
    },
    /// The collection could not be listed.
    #[error("cannot list the collection: {0}")]
    List(String),
    /// A create failed in a way that stops the run (journal, payload pinning).
    #[error(transparent)]
    Operation(OperationError),
    /// A delete was refused.
    #[error("deleting {id} was refused: {reason}")]
    Delete {
        /// The item.
        id: String,
        /// The status or error.
        reason: String,
    },
    /// The deadline passed before the collection converged.
    #[error("not converged within {0:?}")]
    Deadline(Duration),
    /// The settings cannot work (the collection URL is not an http or https URL). Nothing was
    /// sent.
    #[error("invalid settings, nothing was sent: {0}")]
    InvalidOptions(String),
}

/// Why a list failed: worth another try, or not.
enum Listing {
    Transient(String),
    Fatal(ReconcileFailure),
}

#[derive(Debug, Clone)]
struct ExpectedCreate {
    slot: Slot,
    /// The id, when the answer arrived; `None` for a create whose outcome is unknown.
    id: Option<String>,
    since: SystemTime,
    /// Loaded from the journal (a previous process): any unattributed item may satisfy it.
    inherited: bool,
}

#[derive(Debug, Clone)]
struct ExpectedDelete {
    id: String,
    since: SystemTime,
}

/// Makes a collection hold the desired items.
///
/// # Examples
///
/// ```
/// # async fn run(ops: idempotent_retry::Operations) -> Result<(), idempotent_retry::ReconcileError> {
/// use idempotent_retry::{Desired, Reconciler};
///
/// let mut replicas = Reconciler::new(ops, "https://cloud.example/apps/app-9/cvms/vm-1/replicas", "replicas/app-9/vm-1")
///     .generation(1)
///     .expect_field("app_id", "app-9")
///     .expect_field("vm_uuid", "vm-1")
///     .prune(true);
/// let report = replicas.reconcile(&Desired::Count(5)).await?;
/// println!("{report}");
/// # Ok(()) }
/// ```
pub struct Reconciler {
    ops: Operations,
    collection: String,
    operation: String,
    generation: u64,
    body: Value,
    id_field: String,
    name_field: String,
    created_at_field: String,
    expect: Vec<(String, Value)>,
    prune: Prune,
    protect: Option<Arc<Protect>>,
    progress: Option<Arc<Progress>>,
    items_field: Option<String>,
    keyed: bool,
    ttl: Duration,
    poll: Duration,
    concurrency: usize,
    deadline: Duration,
    clock: Arc<dyn Clock>,
    sleeper: Arc<dyn Sleeper>,
    creates: Vec<ExpectedCreate>,
    deletes: Vec<ExpectedDelete>,
    /// Keyed slots whose create may have been applied: a resend with the slot's key settles
    /// them (a replay names the item), so they hold nothing back.
    unsettled: BTreeSet<Slot>,
    seen: HashSet<String>,
    loaded: bool,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("collection", &self.collection)
            .field("operation", &self.operation)
            .field("generation", &self.generation)
            .field("prune", &self.prune)
            .field("keyed", &self.keyed)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// Expectations expire after this (Kubernetes: 5 minutes).
    pub const DEFAULT_EXPECTATION_TTL: Duration = Duration::from_secs(300);

    /// A reconciler for the collection at `collection_url` (`GET` lists it, `POST` creates in it,
    /// `DELETE {collection_url}/{id}` deletes), named `operation` (slot keys and the journal's
    /// records derive from it).
    pub fn new(ops: Operations, collection_url: impl Into<String>, operation: impl Into<String>) -> Self {
        Self {
            ops,
            collection: collection_url.into().trim_end_matches('/').to_owned(),
            operation: operation.into(),
            generation: 1,
            body: Value::Object(Default::default()),
            id_field: "id".into(),
            name_field: "name".into(),
            created_at_field: "created_at".into(),
            expect: Vec::new(),
            prune: Prune::default(),
            protect: None,
            progress: None,
            items_field: None,
            keyed: true,
            ttl: Self::DEFAULT_EXPECTATION_TTL,
            poll: Duration::from_secs(1),
            concurrency: 16,
            deadline: Duration::from_secs(600),
            clock: Arc::new(SystemClock),
            sleeper: Arc::new(TokioSleeper),
            creates: Vec::new(),
            deletes: Vec::new(),
            unsettled: BTreeSet::new(),
            seen: HashSet::new(),
            loaded: false,
        }
    }

    /// The generation of slot keys (default 1; see the module docs).
    pub fn generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// The body of each create (a JSON object; default `{}`). For a named slot the name field
    /// is set to the slot's name.
    pub fn create_body(mut self, body: Value) -> Self {
        self.body = body;
        self
    }

    /// The field holding an item's id (default `id`).
    pub fn id_field(mut self, field: impl Into<String>) -> Self {
        self.id_field = field.into();
        self
    }

    /// The field holding an item's name (default `name`).
    pub fn name_field(mut self, field: impl Into<String>) -> Self {
        self.name_field = field.into();
        self
    }

    /// The field holding an item's creation time, for "newest first" (default `created_at`).
    pub fn created_at_field(mut self, field: impl Into<String>) -> Self {
        self.created_at_field = field.into();
        self
    }

    /// Requires every create's answer to carry `field == value` (e.g. `vm_uuid`).
    pub fn expect_field(mut self, field: impl Into<String>, value: impl Into<Value>) -> Self {
        self.expect.push((field.into(), value.into()));
        self
    }

    /// Deletes surplus items (default: report only).
    pub fn prune(mut self, allowed: bool) -> Self {
        self.prune.allowed = allowed;
        self
    }

    /// Deletes surplus items this operation did not create too (default: no).
    pub fn prune_foreign(mut self, foreign: bool) -> Self {
        self.prune.foreign = foreign;
        self
    }

    /// Items for which `protect` says true are never deleted.
    pub fn protect(mut self, protect: impl Fn(&Value) -> bool + Send + Sync + 'static) -> Self {
        self.protect = Some(Arc::new(protect));
        self
    }

    /// Calls `progress` after each list with the report so far (e.g. for a progress bar: `after`
    /// of `desired`).
    pub fn on_progress(mut self, progress: impl Fn(&ReconcileReport) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(progress));
        self
    }

    /// The field of the list response that holds the items (default: the response itself if it
    /// is an array, else `items`, else `data`).
    pub fn items_field(mut self, field: impl Into<String>) -> Self {
        self.items_field = Some(field.into());
        self
    }

    /// The endpoint takes no key (e.g. Phala's replicas): creates are sent without one, and a
    /// lost answer is settled by watching the list.
    pub fn keyless(mut self) -> Self {
        self.keyed = false;
        self
    }

    /// How long an expectation waits to be seen (default 5 minutes).
    pub fn expectation_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait between lists while expecting (default 1 s).
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// The most requests at once (default 16).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// The most time one reconcile call may take (default 10 minutes).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The clock (default the system clock).
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The sleeper for waits between lists (default tokio's timer).
    pub fn sleeper(mut self, sleeper: impl Sleeper + 'static) -> Self {
        self.sleeper = Arc::new(sleeper);
        self
    }

    fn slot_operation(&self, generation: u64, slot: &Slot) -> String {
        format!("{}/g{generation}/{slot}", self.operation)
    }

    fn parse_slot_operation(&self, name: &str) -> Option<(u64, Slot)> {
        let rest = name.strip_prefix(&self.operation)?.strip_prefix("/g")?;
        let (generation, slot) = rest.split_once('/')?;
        Some((generation.parse().ok()?, Slot::parse(slot)?))
    }

    /// This operation's slot records in the journal.
    async fn ledger(&self) -> Result<Vec<(u64, Slot, Record)>, ReconcileFailure> {
        let records = self.ops.journal(|store| store.list()).await.map_err(journal_failure)?;
        Ok(records
            .into_iter()
            .filter_map(|r| self.parse_slot_operation(&r.operation).map(|(g, s)| (g, s, r)))
            .collect())
    }

    /// Settles a slot's record: the run that holds it now ended in `state`.
    async fn finish_slot(&self, slot: &Slot, state: OpState, id: Option<&str>) -> Result<(), ReconcileFailure> {
        let name = self.slot_operation(self.generation, slot);
        let identity = id.map(|id| serde_json::json!({ self.id_field.clone(): id }));
        let now = self.clock.now();
        self.ops
            .journal(move |store| {
                let Some(record) = store.get(&name)? else { return Ok(false) };
                store.finish(&name, &Finish::new(record.claim(), state, now).identity(identity))
            })
            .await
            .map(drop)
            .map_err(journal_failure)
    }

    /// Makes the collection hold `desired`.
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] with the report so far, when a create's identity is wrong, the journal
    /// fails, the collection cannot be listed, a delete is refused, or the deadline passes.
    pub async fn reconcile(&mut self, desired: &Desired) -> Result<ReconcileReport, ReconcileError> {
        let started = self.clock.now();
        let mut report = ReconcileReport { desired: desired.len(), ..ReconcileReport::default() };
        let result = match crate::target::http_url(&self.collection) {
            Ok(url) => self.run(&url, desired, &mut report, started).await,
            Err(why) => Err(ReconcileFailure::InvalidOptions(why)),
        };
        report.elapsed_ms = self.clock.now().duration_since(started).unwrap_or_default().as_millis() as u64;
        match result {
            Ok(()) => Ok(report),
            Err(failure) => {
                Err(ReconcileError { operation: self.operation.clone(), failure, report: Box::new(report) })
            }
        }
    }

    async fn run(
        &mut self,
        collection: &url::Url,
        desired: &Desired,
        report: &mut ReconcileReport,
        started: SystemTime,
    ) -> Result<(), ReconcileFailure> {
        let names: HashSet<String> = match desired {
            Desired::Names(names) => names.iter().cloned().collect(),
            Desired::Count(_) => HashSet::new(),
        };
        let mut overshoot_seen = HashSet::new();
        loop {
            report.rounds += 1;
            if report.rounds > 10_000 {
                return Err(ReconcileFailure::Deadline(self.deadline));
            }
            // Observe. A transient failure to list is waited out, within the deadline.
            let listed = match self.list(collection, report).await {
                Ok(listed) => listed,
                Err(Listing::Transient(why)) => {
                    if self.clock.now().duration_since(started).unwrap_or_default() >= self.deadline {
                        return Err(ReconcileFailure::List(why));
                    }
                    tracing::info!(operation = %self.operation, "listing failed, trying again: {why}");
                    self.sleeper.sleep(self.poll).await;
                    continue;
                }
                Err(Listing::Fatal(failure)) => return Err(failure),
            };
            let now = self.clock.now();
            let ledger = self.ledger().await?;
            if !self.loaded {
                self.inherit(&ledger, now);
                self.loaded = true;
            }

            // Settle expectations against what the list shows.
            let live_ids: HashSet<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
            let mut ours: HashSet<String> =
                ledger.iter().filter_map(|(_, _, r)| identity_id(r.identity.as_ref(), &self.id_field)).collect();
            ours.extend(self.creates.iter().filter_map(|c| c.id.clone()));
            let mut settled = Vec::new();
            // Keyless creates of unknown outcome: a new, unattributed item is one of them.
            let unattributed: Vec<String> = listed
                .iter()
                .map(|(id, _)| id)
                .filter(|id| !ours.contains(id.as_str()))
                .filter(|id| {
                    !self.seen.contains(id.as_str()) || self.creates.iter().any(|c| c.inherited && c.id.is_none())
                })
                .cloned()
                .collect();
            let mut unattributed = unattributed.into_iter();
            for create in self.creates.iter_mut().filter(|c| c.id.is_none()) {
                if let Some(id) = unattributed.next() {
                    settled.push((create.slot.clone(), id.clone()));
                    ours.insert(id.clone());
                    create.id = Some(id);
                }
            }
            self.creates.retain(|c| c.id.as_ref().is_none_or(|id| !live_ids.contains(id.as_str())));
            let mut journal_written = !settled.is_empty();
            for (slot, id) in settled {
                self.finish_slot(&slot, OpState::Succeeded, Some(&id)).await?;
                report.created.push(id);
            }
            let expired: Vec<ExpectedCreate> = self
                .creates
                .iter()
                .filter(|c| now.duration_since(c.since).unwrap_or_default() >= self.ttl)
                .cloned()
                .collect();
            self.creates.retain(|c| now.duration_since(c.since).unwrap_or_default() < self.ttl);
            report.expired += expired.len();
            for create in expired {
                tracing::warn!(operation = %self.operation, slot = %create.slot, "expected create not seen before the expectation expired");
                if create.id.is_none() {
                    // Presumed not created: the slot may be used again.
                    self.finish_slot(&create.slot, OpState::Failed, None).await?;
                    journal_written = true;
                }
            }
            self.deletes.retain(|d| {
                live_ids.contains(d.id.as_str()) && now.duration_since(d.since).unwrap_or_default() < self.ttl
            });
            self.seen.extend(live_ids.iter().map(|id| id.to_string()));
            // If settling wrote to the journal, plan from what it says now.
            let ledger = if journal_written { self.ledger().await? } else { ledger };

            // Plan.
            let deleting: HashSet<&str> = self.deletes.iter().map(|d| d.id.as_str()).collect();
            let members: Vec<Member> = listed
                .iter()
                .filter(|(id, _)| !deleting.contains(id.as_str()))
                .map(|(id, item)| {
                    let name = item.get(&self.name_field).and_then(Value::as_str).map(str::to_owned);
                    let protected = self.protect.as_ref().is_some_and(|p| p(item))
                        || name.as_ref().is_some_and(|n| names.contains(n));
                    let created_at = item.get(&self.created_at_field).and_then(Value::as_str).map(str::to_owned);
                    Member::new(id.clone(), name, created_at, ours.contains(id), protected)
                })
                .collect();
            let used = self.used_slots(&ledger, &live_ids);
            let unmet = self.creates.len();
            let mut planned = plan(&PlanInput {
                desired,
                observed: &members,
                expected_creates: unmet,
                expected_deletes: self.deletes.len(),
                used_slots: &used,
                prune: self.prune,
            });
            // A keyed create of unknown outcome may be an item nobody claims: resend it with its
            // key to find out (a replay names the item). With no such item it was not applied.
            if planned.actions.is_empty() && !planned.waiting && !self.unsettled.is_empty() {
                let unclaimed = members.iter().filter(|m| !m.ours).count();
                let settle: Vec<Action> = self.unsettled.iter().take(unclaimed).cloned().map(Action::Create).collect();
                if !settle.is_empty() {
                    planned.converged = false;
                    planned.actions = settle;
                }
            }
            if report.rounds == 1 {
                report.before = listed.len();
            }
            report.after = members.len();
            report.max_observed = report.max_observed.max(listed.len());
            report.overshoot = report.overshoot.max(planned.overshoot.len());
            for id in &planned.overshoot {
                if overshoot_seen.insert(id.clone()) {
                    report.overshoot_ids.push(id.clone());
                }
            }
            for id in &planned.adopted {
                if !report.adopted.contains(id) && !report.created.contains(id) {
                    report.adopted.push(id.clone());
                }
            }
            report.converged = planned.converged;
            if let Some(progress) = &self.progress {
                progress(report);
            }
            if planned.converged || (planned.actions.is_empty() && !planned.waiting) {
                return Ok(());
            }
            if self.clock.now().duration_since(started).unwrap_or_default() >= self.deadline {
                return Err(ReconcileFailure::Deadline(self.deadline));
            }
            if planned.actions.is_empty() {
                self.sleeper.sleep(self.poll).await;
                continue;
            }

            // Act.
            let (creates, deletes): (Vec<_>, Vec<_>) =
                planned.actions.into_iter().partition(|a| matches!(a, Action::Create(_)));
            let creates: Vec<Slot> =
                creates.into_iter().filter_map(|a| if let Action::Create(s) = a { Some(s) } else { None }).collect();
            let deletes: Vec<String> =
                deletes.into_iter().filter_map(|a| if let Action::Delete(id) = a { Some(id) } else { None }).collect();
            self.create_all(creates, &live_ids.iter().map(|s| s.to_string()).collect(), report).await?;
            self.delete_all(collection, deletes, report).await?;
        }
    }

    /// Rebuilds expectations from a previous process's unsettled creates.
    fn inherit(&mut self, ledger: &[(u64, Slot, Record)], now: SystemTime) {
        for (generation, slot, record) in ledger {
            if *generation != self.generation || !record.state.is_unsettled() {
                continue;
            }
            if record.key.is_some() {
                self.unsettled.insert(slot.clone());
            } else if !self.creates.iter().any(|c| c.slot == *slot) {
                let since = if record.updated_at > now { now } else { record.updated_at };
                self.creates.push(ExpectedCreate { slot: slot.clone(), id: None, since, inherited: true });
            }
        }
    }

    /// Slots not to create in: expected, filled, or retired (filled and since deleted).
    fn used_slots(&self, ledger: &[(u64, Slot, Record)], live: &HashSet<&str>) -> BTreeSet<Slot> {
        let mut used: BTreeSet<Slot> = self.creates.iter().map(|c| c.slot.clone()).collect();
        for (generation, slot, record) in ledger {
            if *generation != self.generation {
                continue;
            }
            // A refused slot is retired too: its key may replay the refusal (Stripe caches 4xx).
            let filled = matches!(record.state, OpState::Succeeded | OpState::Failed);
            // A named slot whose item is gone may be filled again; an index slot is retired.
            let named_and_gone = matches!(slot, Slot::Name(_))
                && identity_id(record.identity.as_ref(), &self.id_field).is_none_or(|id| !live.contains(id.as_str()));
            if filled && !named_and_gone {
                used.insert(slot.clone());
            }
        }
        used
    }

    /// Lists the collection: `(id, item)` for each item.
    async fn list(&self, collection: &url::Url, report: &mut ReconcileReport) -> Result<Vec<(String, Value)>, Listing> {
        let shown = crate::target::redact(collection);
        let result =
            self.ops.client().get(collection.clone()).with_extension(RequestOptions::new().buffer_body()).send().await;
        report.requests += attempts(&result);
        let response = match result {
            Ok(response) => response,
            Err(e) if Error::find(&e).is_some_and(Error::is_retryable) => {
                return Err(Listing::Transient(e.to_string()));
            }
            Err(e) => return Err(Listing::Fatal(ReconcileFailure::List(e.to_string()))),
        };
        let status = response.status();
        if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            return Err(Listing::Transient(format!("GET {shown} answered {status}")));
        }
        if !status.is_success() {
            return Err(Listing::Fatal(ReconcileFailure::List(format!("GET {shown} answered {status}"))));
        }
        let body = response.bytes().await.map_err(|e| Listing::Transient(e.to_string()))?;
        let fatal = |why: String| Listing::Fatal(ReconcileFailure::List(why));
        let list: Value = serde_json::from_slice(&body).map_err(|e| fatal(format!("not JSON: {e}")))?;
        let entries = match &self.items_field {
            Some(field) => {
                list.get(field).and_then(Value::as_array).ok_or_else(|| fatal(format!("no array under `{field}`")))?
            }
            None => items(&list).ok_or_else(|| fatal("no array at the top, under `items` or under `data`".into()))?,
        };
        let mut listed = Vec::with_capacity(entries.len());
        let mut ids = HashSet::new();
        for item in entries {
            let id = field_text(item, &self.id_field)
                .ok_or_else(|| fatal(format!("an item has no `{}`: {item}", self.id_field)))?;
            crate::target::item_url(collection, &id)
                .map_err(|why| fatal(format!("an item's `{}` {why}: {item}", self.id_field)))?;
            if !ids.insert(id.clone()) {
                return Err(fatal(format!("id {id} is listed twice")));
            }
            listed.push((id, item.clone()));
        }
        Ok(listed)
    }

    /// Creates the slots in slow-start batches, stopping at the first failure.
    async fn create_all(
        &mut self,
        slots: Vec<Slot>,
        live: &HashSet<String>,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileFailure> {
        let mut next = 0;
        let mut batch = 1;
        while next < slots.len() {
            let chunk = &slots[next..(next + batch).min(slots.len())];
            let mut failed = false;
            for group in chunk.chunks(self.concurrency) {
                let mut tasks = tokio::task::JoinSet::new();
                for (order, slot) in group.iter().enumerate() {
                    let request = self.create_request(slot);
                    tasks.spawn(async move { (order, request.await) });
                }
                let mut results = tasks.join_all().await;
                results.sort_by_key(|(order, _)| *order);
                // Record every answer of the group before stopping on the first fatal one.
                let mut fatal = None;
                for ((_, result), slot) in results.into_iter().zip(group) {
                    match self.created(slot, result, live, report).await {
                        Ok(ok) => failed |= !ok,
                        Err(e) => fatal = fatal.or(Some(e)),
                    }
                }
                if let Some(e) = fatal {
                    return Err(e);
                }
            }
            if failed {
                break;
            }
            next += chunk.len();
            batch *= 2;
        }
        Ok(())
    }

    fn create_request(
        &self,
        slot: &Slot,
    ) -> impl Future<Output = Result<crate::Completed, OperationError>> + Send + 'static {
        let mut body = self.body.clone();
        if let (Slot::Name(name), Value::Object(map)) = (slot, &mut body) {
            map.insert(self.name_field.clone(), Value::String(name.clone()));
        }
        let ops = self.ops.clone();
        let (name, url, generation, keyed) =
            (self.slot_operation(self.generation, slot), self.collection.clone(), self.generation, self.keyed);
        let expect = self.expect.clone();
        let id_field = self.id_field.clone();
        async move {
            let mut op = ops.operation(name).post(url).json(&body).identity([id_field]);
            op = if keyed { op.derived_key(generation) } else { op.no_key() };
            for (field, value) in expect {
                op = op.expect(field, value);
            }
            op.send().await
        }
    }

    /// Records one create's result; whether it succeeded (or may have).
    async fn created(
        &mut self,
        slot: &Slot,
        result: Result<crate::Completed, OperationError>,
        live: &HashSet<String>,
        report: &mut ReconcileReport,
    ) -> Result<bool, ReconcileFailure> {
        let now = self.clock.now();
        match result {
            Ok(done) => {
                report.requests += u64::from(done.attempts);
                let id = field_text(&done.resource, &self.id_field).unwrap_or_default();
                if let Err(why) = crate::target::check_id(&id) {
                    return Err(ReconcileFailure::BadId { slot: slot.to_string(), id, why });
                }
                let taken = self.creates.iter().any(|c| c.slot != *slot && c.id.as_deref() == Some(&id))
                    || (live.contains(&id) && self.owner_of(&id).await?.is_some_and(|owner| owner != *slot));
                if taken {
                    return Err(ReconcileFailure::BadId {
                        slot: slot.to_string(),
                        id,
                        why: "which belongs to another slot".into(),
                    });
                }
                if !report.created.contains(&id) && !live.contains(&id) {
                    report.created.push(id.clone());
                }
                self.creates.retain(|c| c.slot != *slot);
                self.unsettled.remove(slot);
                self.creates.push(ExpectedCreate { slot: slot.clone(), id: Some(id), since: now, inherited: false });
                Ok(true)
            }
            Err(OperationError::IdentityMismatch(m)) => Err(ReconcileFailure::Identity(m)),
            Err(OperationError::Rejected { status, body, .. }) => {
                report.requests += 1;
                Err(ReconcileFailure::Rejected {
                    slot: slot.to_string(),
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                })
            }
            Err(
                e @ (OperationError::Journal(_)
                | OperationError::PayloadMismatch(_)
                | OperationError::InvalidOptions { .. }),
            ) => Err(ReconcileFailure::Operation(e)),
            Err(e) => {
                report.requests += match &e {
                    OperationError::Failed { source, .. } => Error::find(source).map_or(1, |e| u64::from(e.attempts())),
                    _ => 0,
                };
                if e.may_have_been_applied() {
                    report.unknown += 1;
                    if self.keyed {
                        // The slot stays free: a resend with its key settles it.
                        self.unsettled.insert(slot.clone());
                    } else {
                        // No key to resend with: expect it, and let the list settle it.
                        self.creates.push(ExpectedCreate {
                            slot: slot.clone(),
                            id: None,
                            since: now,
                            inherited: false,
                        });
                    }
                }
                tracing::info!(operation = %self.operation, %slot, "create failed: {e}");
                Ok(false)
            }
        }
    }

    /// The slot the journal says holds `id`, if any.
    async fn owner_of(&self, id: &str) -> Result<Option<Slot>, ReconcileFailure> {
        Ok(self
            .ledger()
            .await?
            .into_iter()
            .find(|(g, _, r)| {
                *g == self.generation && identity_id(r.identity.as_ref(), &self.id_field).as_deref() == Some(id)
            })
            .map(|(_, slot, _)| slot))
    }

    async fn delete_all(
        &mut self,
        collection: &url::Url,
        ids: Vec<String>,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileFailure> {
        let mut next = 0;
        let mut batch = 1;
        while next < ids.len() {
            let chunk = &ids[next..(next + batch).min(ids.len())];
            for group in chunk.chunks(self.concurrency) {
                let mut tasks = tokio::task::JoinSet::new();
                for id in group {
                    let url = crate::target::item_url(collection, id)
                        .map_err(|why| ReconcileFailure::Delete { id: id.clone(), reason: why })?;
                    let (client, id) = (self.ops.client().clone(), id.clone());
                    tasks.spawn(async move {
                        let result = client.delete(url).send().await;
                        (id, result)
                    });
                }
                for (id, result) in tasks.join_all().await {
                    report.requests += attempts(&result);
                    match result {
                        Ok(r) if r.status().is_success() || r.status() == http::StatusCode::NOT_FOUND => {
                            report.deleted.push(id.clone());
                            self.deletes.push(ExpectedDelete { id, since: self.clock.now() });
                        }
                        Ok(r) => return Err(ReconcileFailure::Delete { id, reason: r.status().to_string() }),
                        Err(e) => {
                            report.unknown += 1;
                            tracing::info!(operation = %self.operation, %id, "delete failed: {e}");
                            return Ok(());
                        }
                    }
                }
            }
            next += chunk.len();
            batch *= 2;
        }
        Ok(())
    }
}

fn journal_failure(e: crate::journal::JournalError) -> ReconcileFailure {
    ReconcileFailure::Operation(OperationError::Journal(e))
}

fn attempts(result: &reqwest_middleware::Result<reqwest::Response>) -> u64 {
    match result {
        Ok(r) => RetryOutcome::of(r).map_or(1, |o| u64::from(o.attempts)),
        Err(e) => Error::find(e).map_or(1, |e| u64::from(e.attempts())),
    }
}

fn field_text(item: &Value, field: &str) -> Option<String> {
    match item.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn identity_id(identity: Option<&Value>, field: &str) -> Option<String> {
    identity.and_then(|i| field_text(i, field))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Callers spawn reconciles: the future must be Send.
    #[allow(dead_code)]
    fn reconcile_is_send(r: &mut Reconciler, d: &Desired) {
        fn send<T: Send>(_: T) {}
        send(r.reconcile(d));
    }
}
