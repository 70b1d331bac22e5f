//! The reconcile engine: make a collection hold what is desired, without overshoot.
//!
//! [`Reconciler`] keeps the Kubernetes ReplicaSet "expectations" discipline, plus what
//! Kubernetes lacks, a stable identity per create: each slot's key is derived from the caller's
//! scope, the operation, a *generation* and the slot, so a re-run or a second applier sends the
//! same keys; nothing is created while a create is expected, nor (but for one exception before
//! pruning) once the desired count is met; only members this operation created are pruned, and
//! only when allowed. The rules, their exception and an example are set out once, in the guide
//! `docs/reconcile.md`; each setting is documented on
//! [`Reconciler`]'s methods.
//!
//! Each round reads as its steps, one file each: *observe* (list the collection, read the
//! journal), *settle* (match expectations to what the list shows: pure, unit-tested), *plan* (the
//! pure [`plan`] function), *act* (creates and deletes), *wait*.

mod act;
mod observe;
mod plan;
mod report;
mod settle;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use url::Url;

pub use plan::{Action, Desired, MAX_ACTIONS_PER_ROUND, Member, Plan, PlanInput, Prune, Slot, plan};
pub use report::ReconcileReport;

use self::settle::{ExpectedCreate, ExpectedDelete, Listed, Settled};
use crate::backoff::{Backoff, ExponentialBackoff, Jitter};
use crate::journal::store::Finish;
use crate::journal::{OpState, Record};
use crate::operation::{IdentityMismatch, OperationError, Operations};
use crate::pagination::Pagination;
use crate::time::{Clock, Sleeper, SystemClock, TokioSleeper};
use crate::time::{Random, SeededRng};
use crate::wait::{Readiness, WaitFor};

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
    pub failure: StopReason,
    /// What was done before it stopped.
    pub report: Box<ReconcileReport>,
}

/// Why a reconcile stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StopReason {
    /// A create's answer was not the item asked for, or an item this operation created no longer
    /// is: no further creates were made. The item created is this operation's (reported and
    /// journaled as such).
    #[error(transparent)]
    Identity(Box<IdentityMismatch>),
    /// A create's answer carried an id that belongs to another slot, or no usable id at all.
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
    /// The retry layer's budget for the collection's host is empty: more rounds would only add
    /// load to a failing server.
    #[error("the retry budget for the collection's host is empty; not trying again so as not to add load")]
    BudgetExhausted,
    /// The settings cannot work (the collection URL is not an http or https URL). Nothing was
    /// sent.
    #[error("invalid settings, nothing was sent: {0}")]
    InvalidOptions(String),
    /// The desired state asks for more items than [`Desired::MAX`]. Nothing was sent.
    #[error("{desired} items desired, but a reconcile makes at most {max}; nothing was sent")]
    TooMany {
        /// Items asked for.
        desired: usize,
        /// The most there may be ([`Desired::MAX`]).
        max: usize,
    },
    /// An item counted toward the desired state is in a state that will never be
    /// [ready](Reconciler::wait_for): a failure state, or one that is neither pending nor a
    /// target. It is not deleted or replaced: delete it (or prune), then reconcile again.
    #[error("item {id} is in state {state}, which will never be ready")]
    NotReady {
        /// The item.
        id: String,
        /// Its state.
        state: Value,
    },
}

/// Makes a collection hold the desired items.
///
/// # Examples
///
/// ```
/// # async fn run(ops: idempotent_retry::Operations) -> Result<(), idempotent_retry::reconcile::ReconcileError> {
/// use idempotent_retry::Reconciler;
/// use idempotent_retry::reconcile::{Desired, Prune};
///
/// let mut replicas = Reconciler::new(ops, "https://cloud.example/apps/app-9/cvms/vm-1/replicas", "replicas/app-9/vm-1")
///     .generation(1)
///     .expect_field("app_id", "app-9")
///     .expect_field("vm_uuid", "vm-1")
///     .prune(Prune::Ours);
/// let report = replicas.reconcile(&Desired::Count(5)).await?;
/// println!("{report}");
/// # Ok(()) }
/// ```
pub struct Reconciler {
    settings: Settings,
    memory: Memory,
}

/// How the reconciler works: what the builder sets.
struct Settings {
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
    pagination: Pagination,
    keyed: bool,
    ttl: Duration,
    poll: Duration,
    concurrency: usize,
    deadline: Duration,
    round_backoff: Arc<dyn Backoff>,
    ready: Option<WaitFor>,
    clock: Arc<dyn Clock>,
    sleeper: Arc<dyn Sleeper>,
    rng: Arc<dyn Random>,
}

/// What this reconciler remembers from round to round and call to call: the expectations of
/// this process (Kubernetes keeps them in memory likewise), and when it first saw each item.
#[derive(Default)]
struct Memory {
    creates: Vec<ExpectedCreate>,
    deletes: Vec<ExpectedDelete>,
    /// The number of the list each id first appeared in.
    first_seen: HashMap<String, u64>,
    /// Lists made so far.
    lists: u64,
    /// The journal's unsettled creates were taken over as expectations.
    inherited: bool,
}

/// One reconcile call's own state.
struct RunState {
    started: SystemTime,
    report: ReconcileReport,
    overshoot_seen: HashSet<String>,
    /// Rounds in a row that ended in a transient failure: how long the next wait is.
    failures: u32,
    /// A list has answered in this call (the first answer is `before`).
    listed_once: bool,
    /// Rounds in a row that found the count right and some item not ready yet.
    unready: u32,
    /// Slots whose pending key this call resent to prove their item ours before pruning.
    settled_by_key: HashSet<Slot>,
}

/// What a round waits for before the next.
enum Wait {
    /// Expected creates or deletes to show in a list.
    Poll,
    /// A transient failure to pass.
    Backoff,
    /// Items to become ready.
    Ready,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.settings;
        f.debug_struct("Reconciler")
            .field("collection", &crate::target::redact_str(&s.collection))
            .field("operation", &s.operation)
            .field("generation", &s.generation)
            .field("prune", &s.prune)
            .field("keyed", &s.keyed)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// Expectations expire after this (Kubernetes: 5 minutes).
    pub const DEFAULT_EXPECTATION_TTL: Duration = Duration::from_secs(300);
    /// The wait between lists while something is expected: 1 s.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
    /// The most requests at once: 16.
    pub const DEFAULT_CONCURRENCY: usize = 16;
    /// The most time one reconcile call may take: 10 minutes.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);
    /// The wait after a round that failed transiently: 1 s doubling to 30 s, equal jitter (at
    /// least half of each ceiling, so rounds never follow one another without a wait).
    pub const DEFAULT_ROUND_BACKOFF: ExponentialBackoff =
        ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(30)).jitter(Jitter::Equal);

    /// A reconciler for the collection at `collection_url` (`GET` lists it, `POST` creates in it,
    /// `DELETE {collection_url}/{id}` deletes, the id as one path segment), named `operation`
    /// (slot keys and the journal's records derive from it).
    pub fn new(ops: Operations, collection_url: impl Into<String>, operation: impl Into<String>) -> Self {
        let settings = Settings {
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
            pagination: Pagination::standard(),
            keyed: true,
            ttl: Self::DEFAULT_EXPECTATION_TTL,
            poll: Self::DEFAULT_POLL_INTERVAL,
            concurrency: Self::DEFAULT_CONCURRENCY,
            deadline: Self::DEFAULT_DEADLINE,
            round_backoff: Arc::new(Self::DEFAULT_ROUND_BACKOFF),
            ready: None,
            clock: Arc::new(SystemClock),
            sleeper: Arc::new(TokioSleeper),
            rng: Arc::new(SeededRng::from_entropy()),
        };
        Self { settings, memory: Memory::default() }
    }

    /// The generation of slot keys (default 1). A slot's key is the same forever within a
    /// generation. Bump it whenever the desired count rises after having fallen, or when the
    /// create body changes (a key is pinned to its payload): the journal retires the slots of
    /// deleted items, but without it (a new machine, a cleared journal) a scale-up in the same
    /// generation would reuse a slot whose key the server still remembers, and the server would
    /// answer with the deleted item instead of creating one.
    pub fn generation(mut self, generation: u64) -> Self {
        self.settings.generation = generation;
        self
    }

    /// The body of each create (a JSON object; default `{}`). For a named slot the name field
    /// is set to the slot's name.
    pub fn create_body(mut self, body: Value) -> Self {
        self.settings.body = body;
        self
    }

    /// The field holding an item's id (default `id`).
    pub fn id_field(mut self, field: impl Into<String>) -> Self {
        self.settings.id_field = field.into();
        self
    }

    /// The field holding an item's name (default `name`).
    pub fn name_field(mut self, field: impl Into<String>) -> Self {
        self.settings.name_field = field.into();
        self
    }

    /// The field holding an item's creation time, RFC 3339 (default `created_at`): for "newest
    /// first", and to tell whether an item came after a lost create a previous process sent.
    pub fn created_at_field(mut self, field: impl Into<String>) -> Self {
        self.settings.created_at_field = field.into();
        self
    }

    /// Requires every create's answer, and every item this operation created, to carry
    /// `field == value` (e.g. `vm_uuid`).
    pub fn expect_field(mut self, field: impl Into<String>, value: impl Into<Value>) -> Self {
        self.settings.expect.push((field.into(), value.into()));
        self
    }

    /// What surplus may be deleted (default [`Prune::Never`]: report only).
    pub fn prune(mut self, prune: Prune) -> Self {
        self.settings.prune = prune;
        self
    }

    /// Items for which `protect` says true are never deleted.
    pub fn protect(mut self, protect: impl Fn(&Value) -> bool + Send + Sync + 'static) -> Self {
        self.settings.protect = Some(Arc::new(protect));
        self
    }

    /// Calls `progress` after each list with the report so far (e.g. for a progress bar: `after`
    /// of `desired`).
    pub fn on_progress(mut self, progress: impl Fn(&ReconcileReport) + Send + Sync + 'static) -> Self {
        self.settings.progress = Some(Arc::new(progress));
        self
    }

    /// The field of each list page that holds the items, a dotted path or a JSON pointer
    /// (default: the page itself if it is an array, else `items`, `data` or `results`).
    pub fn items_field(mut self, field: impl Into<String>) -> Self {
        self.settings.items_field = Some(field.into());
        self
    }

    /// How the list's pages lead to one another (default [`Pagination::standard`]: `Link`
    /// headers, `next` URLs, the common cursor fields). Every page is read; a list that says
    /// there is more but cannot be followed stops the run with [`StopReason::List`], never a
    /// short count.
    ///
    /// ```
    /// # fn make(ops: idempotent_retry::Operations) -> idempotent_retry::Reconciler {
    /// use idempotent_retry::{Reconciler, pagination::Pagination};
    ///
    /// Reconciler::new(ops, "https://cloud.example/replicas", "replicas/web")
    ///     .pagination(Pagination::standard().cursor("continuation", "from").max_pages(50))
    /// # }
    /// ```
    pub fn pagination(mut self, pagination: Pagination) -> Self {
        self.settings.pagination = pagination;
        self
    }

    /// The endpoint takes no key (e.g. Phala's replicas): creates are sent without one, and a
    /// lost answer is settled by watching the list.
    pub fn keyless(mut self) -> Self {
        self.settings.keyed = false;
        self
    }

    /// How long an expectation waits to be seen (default
    /// [`DEFAULT_EXPECTATION_TTL`](Self::DEFAULT_EXPECTATION_TTL), 5 minutes).
    pub fn expectation_ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self
    }

    /// How long to wait between lists while expecting (default
    /// [`DEFAULT_POLL_INTERVAL`](Self::DEFAULT_POLL_INTERVAL), 1 s).
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.settings.poll = poll;
        self
    }

    /// The wait after a round that failed transiently, by how many failed in a row (default
    /// [`DEFAULT_ROUND_BACKOFF`](Self::DEFAULT_ROUND_BACKOFF)).
    pub fn round_backoff(mut self, backoff: impl Backoff + 'static) -> Self {
        self.settings.round_backoff = Arc::new(backoff);
        self
    }

    /// The most requests at once (default [`DEFAULT_CONCURRENCY`](Self::DEFAULT_CONCURRENCY), 16).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.settings.concurrency = concurrency.max(1);
        self
    }

    /// The most time one reconcile call may take, waits and requests included (default
    /// [`DEFAULT_DEADLINE`](Self::DEFAULT_DEADLINE), 10 minutes). Each request gets at most
    /// what is left of it.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.settings.deadline = deadline;
        self
    }

    /// Counts the desired state as reached only once every item counted toward it is ready:
    /// its state (read as `ready` says) is a target. Until then the reconciler lists again,
    /// paced by `ready`'s poll schedule, within its deadline; an item that is not yet ready
    /// still counts, so nothing is created for it. An item in a failure state (or, with
    /// pending states, any other state) stops the run with [`StopReason::NotReady`].
    pub fn wait_for(mut self, ready: WaitFor) -> Self {
        self.settings.ready = Some(ready);
        self
    }

    /// The clock (default the system clock).
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.settings.clock = Arc::new(clock);
        self
    }

    /// The sleeper for waits between rounds (default tokio's timer).
    pub fn sleeper(mut self, sleeper: impl Sleeper + 'static) -> Self {
        self.settings.sleeper = Arc::new(sleeper);
        self
    }

    /// The jitter source for waits between failed rounds (default seeded from the system).
    pub fn rng(mut self, rng: impl Random + 'static) -> Self {
        self.settings.rng = Arc::new(rng);
        self
    }

    /// Makes the collection hold `desired`.
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] with the report so far, when a create's identity is wrong, the journal
    /// fails, the collection cannot be listed, a delete is refused, the retry budget is empty, or
    /// the deadline passes.
    pub async fn reconcile(&mut self, desired: &Desired) -> Result<ReconcileReport, ReconcileError> {
        let started = self.settings.clock.now();
        let report = ReconcileReport { desired: desired.len(), ..ReconcileReport::default() };
        let mut run = RunState {
            started,
            report,
            overshoot_seen: HashSet::new(),
            failures: 0,
            listed_once: false,
            unready: 0,
            settled_by_key: HashSet::new(),
        };
        let result = match crate::target::http_url(&self.settings.collection) {
            _ if desired.len() > Desired::MAX => Err(StopReason::TooMany { desired: desired.len(), max: Desired::MAX }),
            Ok(url) => self.rounds(&url, desired, &mut run).await,
            Err(why) => Err(StopReason::InvalidOptions(why)),
        };
        let mut report = run.report;
        report.elapsed_ms = self.settings.clock.now().duration_since(started).unwrap_or_default().as_millis() as u64;
        match result {
            Ok(()) => Ok(report),
            Err(failure) => {
                Err(ReconcileError { operation: self.settings.operation.clone(), failure, report: Box::new(report) })
            }
        }
    }

    /// Observe, settle, plan, act, wait: until converged, or nothing more can be done.
    async fn rounds(&mut self, collection: &Url, desired: &Desired, run: &mut RunState) -> Result<(), StopReason> {
        loop {
            run.report.rounds += 1;
            let remaining = self.remaining(run)?;
            let Some(listed) = self.observe(collection, remaining, &mut run.report).await? else {
                self.wait(run, Wait::Backoff).await?;
                continue;
            };
            let ledger = self.ledger().await?;
            let (settled, ledger) = self.settle(&listed, ledger, &mut run.report).await?;
            let planned = self.plan(desired, &listed, &ledger, &settled)?;
            self.record(&planned, &listed, run);
            let unproven = self.keyed_unsettled(&planned, &settled, &ledger, run);
            if !unproven.is_empty() {
                // Prove what those keys made ours before pruning: the server answers each
                // resent key with its item (a key that never arrived makes one, ours too).
                let remaining = self.remaining(run)?;
                let actions = unproven.iter().cloned().map(Action::Create).collect();
                if self.act(collection, actions, &ledger, remaining, &mut run.report).await? {
                    run.failures = 0;
                    run.settled_by_key.extend(unproven);
                } else {
                    self.wait(run, Wait::Backoff).await?;
                }
                continue;
            }
            if planned.converged && !self.all_ready(&listed, run)? {
                self.wait(run, Wait::Ready).await?;
                continue;
            }
            if planned.converged || (planned.actions.is_empty() && !planned.waiting) {
                return Ok(());
            }
            if planned.actions.is_empty() {
                self.wait(run, Wait::Poll).await?;
                continue;
            }
            let remaining = self.remaining(run)?;
            if self.act(collection, planned.actions, &ledger, remaining, &mut run.report).await? {
                run.failures = 0;
            } else {
                self.wait(run, Wait::Backoff).await?;
            }
        }
    }

    /// The slots of this generation whose keyed create's outcome is unknown (a process killed
    /// while it was on its way, an answer lost past the retries), when pruning would spare an
    /// item it cannot prove ours: resending those keys proves whose the items are. Nothing when
    /// nothing is to be pruned: a met count is not a reason to create.
    fn keyed_unsettled(
        &self,
        planned: &Plan,
        settled: &Settled,
        ledger: &[(u64, Slot, Record)],
        run: &RunState,
    ) -> Vec<Slot> {
        let s = &self.settings;
        let spared = planned.overshoot.iter().any(|id| !settled.ours.contains(id));
        if !s.keyed || !s.prune.allowed() || planned.waiting || !spared {
            return Vec::new();
        }
        ledger
            .iter()
            .filter(|(g, slot, r)| {
                *g == s.generation
                    && r.state.is_unsettled()
                    && r.key.is_some()
                    && !run.settled_by_key.contains(slot)
                    && !self.memory.creates.iter().any(|c| c.slot == *slot)
            })
            .map(|(_, slot, _)| slot.clone())
            .take(MAX_ACTIONS_PER_ROUND)
            .collect()
    }

    /// What is left of the run's deadline.
    fn remaining(&self, run: &RunState) -> Result<Duration, StopReason> {
        let elapsed = self.settings.clock.now().duration_since(run.started).unwrap_or_default();
        match self.settings.deadline.checked_sub(elapsed) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(StopReason::Deadline(self.settings.deadline)),
        }
    }

    /// With [`wait_for`](Self::wait_for): whether every item counted is ready (recording how
    /// many are, and taking back `converged` while some are not); an item that will never be
    /// ready stops the run.
    fn all_ready(&self, listed: &[Listed], run: &mut RunState) -> Result<bool, StopReason> {
        let Some(spec) = &self.settings.ready else { return Ok(true) };
        let deleting: HashSet<&str> = self.memory.deletes.iter().map(|d| d.id.as_str()).collect();
        let (mut ready, mut never) = (0, None);
        for item in listed.iter().filter(|l| !deleting.contains(l.id.as_str())) {
            match spec.readiness(&item.item) {
                Readiness::Ready => ready += 1,
                Readiness::Pending => {}
                Readiness::Never(state) => never = never.or(Some(StopReason::NotReady { id: item.id.clone(), state })),
            }
        }
        run.report.ready = Some(ready);
        let all = ready == run.report.after;
        run.report.converged = all;
        if let Some(stop) = never {
            return Err(stop);
        }
        if let (false, Some(progress)) = (all, &self.settings.progress) {
            progress(&run.report);
        }
        Ok(all)
    }

    /// Waits before the next round, within the deadline.
    async fn wait(&self, run: &mut RunState, why: Wait) -> Result<(), StopReason> {
        let delay = match why {
            Wait::Poll => self.settings.poll,
            Wait::Ready => {
                run.unready += 1;
                let schedule = self.settings.ready.as_ref().map(WaitFor::schedule);
                schedule.and_then(|s| s.delay(run.unready, &*self.settings.rng)).unwrap_or(self.settings.poll)
            }
            Wait::Backoff => {
                run.failures += 1;
                self.settings.round_backoff.delay(run.failures, &*self.settings.rng).unwrap_or(self.settings.poll)
            }
        };
        let remaining = self.remaining(run)?;
        self.settings.sleeper.sleep(delay.min(remaining)).await;
        if delay >= remaining {
            return Err(StopReason::Deadline(self.settings.deadline));
        }
        Ok(())
    }

    /// Settles the round's expectations and records what that decided; returns the journal as
    /// it is after.
    async fn settle(
        &mut self,
        listed: &[Listed],
        ledger: Vec<(u64, Slot, Record)>,
        report: &mut ReconcileReport,
    ) -> Result<(Settled, Vec<(u64, Slot, Record)>), StopReason> {
        let now = self.settings.clock.now();
        if !self.memory.inherited {
            let inherited = observe::inherit(&ledger, self.settings.generation, &self.memory.creates);
            self.memory.creates.extend(inherited);
            self.memory.inherited = true;
        }
        let settled = settle::settle(&settle::Round {
            now,
            listed,
            ledger: &ledger,
            id_field: &self.settings.id_field,
            creates: &self.memory.creates,
            deletes: &self.memory.deletes,
            first_seen: &self.memory.first_seen,
            ttl: self.settings.ttl,
        });
        let mut written = false;
        for (create, id) in &settled.attributed {
            let identity = serde_json::json!({ self.settings.id_field.clone(): id, settle::PRESUMED: true });
            written |= self.finish_slot(create, OpState::Succeeded, Some(identity)).await?;
            if !report.presumed.contains(id) {
                report.presumed.push(id.clone());
            }
        }
        report.expired += settled.expired.len();
        for create in &settled.expired {
            tracing::warn!(operation = %self.settings.operation, slot = %create.slot, "expected create not seen before the expectation expired");
            if create.id.is_none() {
                // Presumed not to have taken effect: the slot's record says so.
                written |= self.finish_slot(create, OpState::NotApplied, None).await?;
            }
        }
        self.memory.creates = settled.creates.clone();
        self.memory.deletes = settled.deletes.clone();
        // If settling wrote to the journal, plan from what it says now.
        let ledger = if written { self.ledger().await? } else { ledger };
        Ok((settled, ledger))
    }

    /// Plans the round; before any create, checks that what this operation created is still
    /// what it asked for (an item that is not would be created again and again).
    fn plan(
        &self,
        desired: &Desired,
        listed: &[Listed],
        ledger: &[(u64, Slot, Record)],
        settled: &Settled,
    ) -> Result<Plan, StopReason> {
        let s = &self.settings;
        let names: HashSet<&str> = match desired {
            Desired::Names(names) => names.iter().map(String::as_str).collect(),
            Desired::Count(_) => HashSet::new(),
        };
        let deleting: HashSet<&str> = self.memory.deletes.iter().map(|d| d.id.as_str()).collect();
        let members: Vec<Member> = listed
            .iter()
            .filter(|l| !deleting.contains(l.id.as_str()))
            .map(|l| {
                let mut member = if settled.ours.contains(&l.id) {
                    Member::ours(l.id.clone())
                } else {
                    Member::foreign(l.id.clone())
                };
                if let Some(name) = l.item.get(&s.name_field).and_then(Value::as_str) {
                    if names.contains(name) {
                        member = member.protected();
                    }
                    member = member.name(name);
                }
                if let Some(at) = l.item.get(&s.created_at_field).and_then(Value::as_str) {
                    member = member.created_at(at);
                }
                if s.protect.as_ref().is_some_and(|p| p(&l.item)) {
                    member = member.protected();
                }
                member
            })
            .collect();
        let live: HashSet<&str> = listed.iter().map(|l| l.id.as_str()).collect();
        let used = observe::used_slots(ledger, s.generation, &s.id_field, &live, &self.memory.creates);
        let planned = plan(&PlanInput {
            desired,
            observed: &members,
            expected_creates: self.memory.creates.len(),
            expected_deletes: self.memory.deletes.len(),
            used_slots: &used,
            prune: s.prune,
        });
        if planned.actions.iter().any(|a| matches!(a, Action::Create(_))) {
            self.check_ours(listed, ledger)?;
        }
        Ok(planned)
    }

    /// Every item this generation created, as listed, still carries the expected fields.
    fn check_ours(&self, listed: &[Listed], ledger: &[(u64, Slot, Record)]) -> Result<(), StopReason> {
        let s = &self.settings;
        let ours: HashSet<String> = ledger
            .iter()
            .filter(|(g, _, r)| *g == s.generation && r.state == OpState::Succeeded)
            .filter_map(|(_, _, r)| r.identity.as_ref())
            .filter(|identity| identity.get(settle::PRESUMED).is_none())
            .filter_map(|identity| field_text(identity, &s.id_field))
            .chain(self.memory.creates.iter().filter_map(|c| c.id.clone()))
            .collect();
        for item in listed.iter().filter(|l| ours.contains(&l.id)) {
            for (field, expected) in &s.expect {
                let found = item.item.get(field).cloned().unwrap_or(Value::Null);
                if found != *expected {
                    let operation = format!("{}: item {}", s.operation, item.id);
                    return Err(StopReason::Identity(Box::new(IdentityMismatch::new(
                        &operation,
                        field,
                        expected.clone(),
                        found,
                        item.item.clone(),
                    ))));
                }
            }
        }
        Ok(())
    }

    /// Puts what the round saw and decided into the report.
    fn record(&self, planned: &Plan, listed: &[Listed], run: &mut RunState) {
        let report = &mut run.report;
        if !run.listed_once {
            run.listed_once = true;
            report.before = listed.len();
        }
        let deleting: HashSet<&str> = self.memory.deletes.iter().map(|d| d.id.as_str()).collect();
        report.after = listed.iter().filter(|l| !deleting.contains(l.id.as_str())).count();
        report.max_observed = report.max_observed.max(listed.len());
        report.overshoot = report.overshoot.max(planned.overshoot.len());
        for id in &planned.overshoot {
            if run.overshoot_seen.insert(id.clone()) {
                report.overshoot_ids.push(id.clone());
            }
        }
        for id in &planned.adopted {
            if !report.adopted.contains(id) && !report.created.contains(id) {
                report.adopted.push(id.clone());
            }
        }
        report.converged = planned.converged;
        if !planned.converged {
            run.unready = 0;
        }
        if let Some(progress) = &self.settings.progress {
            progress(report);
        }
    }

    /// The journal name of a slot's create.
    fn slot_operation(&self, generation: u64, slot: &Slot) -> String {
        format!("{}/g{generation}/{slot}", self.settings.operation)
    }

    fn parse_slot_operation(&self, name: &str) -> Option<(u64, Slot)> {
        let rest = name.strip_prefix(&self.settings.operation)?.strip_prefix("/g")?;
        let (generation, slot) = rest.split_once('/')?;
        Some((generation.parse().ok()?, Slot::parse(slot)?))
    }

    /// This operation's slot records in the journal.
    async fn ledger(&self) -> Result<Vec<(u64, Slot, Record)>, StopReason> {
        let records = self.settings.ops.store().list().await.map_err(journal_failure)?;
        Ok(records
            .into_iter()
            .filter_map(|r| self.parse_slot_operation(&r.operation).map(|(g, s)| (g, s, r)))
            .collect())
    }

    /// Settles an expected create's slot record, if the run that sent it still holds it;
    /// whether it did.
    async fn finish_slot(
        &self,
        create: &ExpectedCreate,
        state: OpState,
        identity: Option<Value>,
    ) -> Result<bool, StopReason> {
        let Some(claim) = create.claim.clone() else { return Ok(false) };
        let name = self.slot_operation(self.settings.generation, &create.slot);
        let finish = Finish::new(claim, state, self.settings.clock.now()).identity(identity);
        self.settings.ops.store().finish(&name, &finish).await.map_err(journal_failure)
    }
}

fn journal_failure(e: crate::journal::JournalError) -> StopReason {
    StopReason::Operation(OperationError::Journal(e))
}

use crate::target::field_text;

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
