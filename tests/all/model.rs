//! The whole stack under sequences of actions across process lifetimes: `Operations`, the SQLite
//! journal on disk and `Reconciler`, against `FakeCloud` behind `ChaosProxy`, on one manual
//! clock.
//!
//! A case is a server profile and a sequence of actions. A process is a client, a journal
//! opened on the case's file, and the reconcilers it made; `Restart` drops it and opens a new
//! one on the same file; `Crash` runs an action until its first create is held at the proxy's
//! gate, kills it there, and lets the held request reach the server or not. Other actions run
//! an operation with any key source (random, derived, explicit, git, none), with or without a
//! read-back, with another payload; change a reconcile's count, generation, keys and pruning; a
//! foreign writer adds or deletes items; the clock jumps (past the servers' retention); the
//! user forgets an operation; git's HEAD moves; the proxy's faults change. Creates provision
//! for a while before they run (and the next one may fail): a post may wait for its CVM to
//! run, a reconcile for its items, and a crash may come in the middle of a wait.
//!
//! After every action (the promise, as the product states it):
//! 1. per logical operation, at most one resource on the server;
//! 2. no item a reconcile did not create is deleted unless it ran with `prune_foreign`;
//! 3. a reconcile never leaves more than max(before, desired) of its own; for a run killed or
//!    stopped by an error, "before" counts the keyed creates an earlier run left on their way
//!    (they may have been applied: resending such a key to learn its item before pruning makes
//!    the item if it was not, and a run that finishes prunes it);
//! 4. "not sent" means no request was made; "not applied" means nothing was created;
//! 5. "created/replayed/recovered/recorded" returns an identity that is on the server;
//! 6. the journal's record agrees with the server after a settled run (a record the server's
//!    answer confirmed names an item it made; an item only *presumed* ours, matched to a lost
//!    keyless create by its appearance, is a guess by design, and 2 keeps it from being pruned);
//! 7. a run of an operation whose record is waiting sends no create, whatever it is told;
//! 8. a wait that ends ready returns a resource the server has running; one that ends in a
//!    failure state names a resource the server has failed, and leaves the record waiting;
//!    a reconcile that waited and converged has every item running.
//!
//! A logical operation (what "one resource" counts against) is the model's: an operation name
//! with an instance number. A run continues the current instance while it is unsettled (the
//! last run failed or was killed); once a run succeeded, a random key or none starts a new
//! instance (the documented meaning of running a random-key operation again), and a fixed key
//! (derived, explicit, git) continues the instance it first served. `Forget` is the user saying
//! they checked the server: the operation starts over, every key as new. The instance is in the resource's name, so the server's log tells which
//! instance each resource was made for.
//!
//! Two machines share the journal: `Switch` moves the next actions to the other one (a client
//! and a journal of its own on the same store, another lease owner), so what one machine left
//! (a killed run, a waiting record, a success) is what the other meets. The journal is a SQLite
//! file, or, with `MODEL_STORE=postgres`, a real PostgreSQL (the server libpq's environment
//! names, as `pg_virtualenv` exports it; a schema of its own for each case, leases of 1 ms so
//! that a killed run's lease has run out when the next action comes).
//!
//! 256 cases by default, from a fixed seed (`MODEL_CASES=N` for more; `PROPTEST_RNG_SEED=N`
//! draws others).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use idempotent_retry::testing::{
    ChaosProxy, FakeCloud, FaultMix, LongRunning, RetryAfter, Schedule, ServerProfile, replicas,
};
use idempotent_retry::{
    IdempotencyKey, Operations, Reconciler, RetryPolicy,
    backoff::{ExponentialBackoff, Jitter},
    journal::{KeyStore, OpState, SqliteJournal},
    operation::{GitKeyMode, OperationError, ReadBack},
    reconcile::{Desired, Prune},
    time::Clock,
    wait::{WaitError, WaitFor},
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};

use crate::git_support;
use crate::support::*;

const POST_OPS: usize = 2;
const COLLECTIONS: usize = 2;
const HOUR: Duration = Duration::from_secs(3600);

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());

/// The profiles whose servers keep their promise (a key seen within its retention is never run
/// twice): those that run a request again while the first is in flight are left out, as they
/// duplicate whatever the client does (scenario 2 pins that).
fn profiles() -> Vec<ServerProfile> {
    vec![ServerProfile::stripe(), ServerProfile::ietf(), ServerProfile::brandur(), ServerProfile::express()]
}

#[derive(Debug, Clone, PartialEq)]
enum Source {
    Random,
    Derived(u64),
    Explicit(u8),
    Git,
    None,
}

#[derive(Debug, Clone)]
enum Action {
    Post {
        op: usize,
        source: Source,
        payload: u8,
        read_back: bool,
        wait: bool,
    },
    Reconcile {
        coll: usize,
        count: usize,
        generation: u64,
        prune: bool,
        prune_foreign: bool,
        keyless: bool,
        ready: bool,
    },
    Crash {
        action: Box<Action>,
        at: usize,
        deliver: bool,
    },
    Restart,
    Foreign {
        coll: usize,
        add: bool,
    },
    Advance {
        hours: u64,
    },
    Forget {
        op: usize,
    },
    Commit,
    Faults {
        seed: u64,
        percent: u8,
    },
    /// The next create's provisioning fails.
    FailProvisioning,
    /// The next actions run on the other machine.
    Switch,
}

/// How long a create provisions, and how long a wait waits: a wait may time out, and its
/// re-run resume it.
const PROVISIONING: Duration = Duration::from_secs(45);
const WAIT: Duration = Duration::from_secs(30);

fn running() -> WaitFor {
    WaitFor::field("status")
        .target(["running"])
        .failure(["error"])
        .timeout(WAIT)
        .poll(ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(8)).jitter(Jitter::None))
}

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![
        3 => Just(Source::Random),
        2 => (1u64..=2).prop_map(Source::Derived),
        2 => (0u8..=1).prop_map(Source::Explicit),
        1 => Just(Source::Git),
        2 => Just(Source::None),
    ]
}

fn post() -> impl Strategy<Value = Action> {
    (0..POST_OPS, source(), 0u8..=1, any::<bool>(), prop::bool::weighted(0.4))
        .prop_map(|(op, source, payload, read_back, wait)| Action::Post { op, source, payload, read_back, wait })
}

fn reconcile() -> impl Strategy<Value = Action> {
    (
        0..COLLECTIONS,
        0usize..=4,
        1u64..=2,
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(coll, count, generation, prune, prune_foreign, keyless, ready)| Action::Reconcile {
            coll,
            count,
            generation,
            prune,
            prune_foreign: prune && prune_foreign,
            keyless,
            ready,
        })
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => post(),
        5 => reconcile(),
        2 => (prop_oneof![post(), reconcile()], 1usize..=4, any::<bool>())
            .prop_map(|(action, at, deliver)| Action::Crash { action: Box::new(action), at, deliver }),
        1 => Just(Action::Restart),
        2 => (0..COLLECTIONS, prop::bool::weighted(0.7)).prop_map(|(coll, add)| Action::Foreign { coll, add }),
        1 => prop_oneof![Just(1u64), Just(23), Just(49)].prop_map(|hours| Action::Advance { hours }),
        1 => (0..POST_OPS).prop_map(|op| Action::Forget { op }),
        1 => Just(Action::Commit),
        2 => (any::<u64>(), prop_oneof![Just(0u8), Just(10), Just(30), Just(50)])
            .prop_map(|(seed, percent)| Action::Faults { seed, percent }),
        1 => Just(Action::FailProvisioning),
        2 => Just(Action::Switch),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    profile: usize,
    actions: Vec<Action>,
}

fn case() -> impl Strategy<Value = Case> {
    (0..profiles().len(), prop::collection::vec(action(), 1..24))
        .prop_map(|(profile, actions)| Case { profile, actions })
}

/// The spec's memory of one operation name.
#[derive(Debug, Default)]
struct OpModel {
    /// The current instance, and whether a run may still change its outcome.
    instance: u32,
    open: bool,
    /// Instances fixed keys first served.
    by_key: HashMap<String, u32>,
}

/// One process: a client, the journal opened on the case's store, its reconcilers.
struct Process {
    ops: Operations,
    store: Arc<dyn KeyStore>,
    reconcilers: HashMap<(usize, u64, bool, bool), Reconciler>,
}

/// Where the case's journal is.
#[derive(Debug, Clone)]
enum Backend {
    Sqlite(PathBuf),
    #[cfg(feature = "postgres")]
    Postgres {
        url: String,
        schema: String,
    },
}

impl Backend {
    /// The store `MODEL_STORE` names (`sqlite`, the default, or `postgres`) for the case in `dir`.
    fn for_case(dir: &Path, n: u64) -> Self {
        match std::env::var("MODEL_STORE").as_deref() {
            Ok("postgres") => Self::postgres(n),
            Ok("sqlite") | Err(_) => Backend::Sqlite(dir.join("journal.sqlite3")),
            Ok(other) => panic!("MODEL_STORE={other}: sqlite or postgres"),
        }
    }

    #[cfg(feature = "postgres")]
    fn postgres(n: u64) -> Self {
        let url = idempotent_retry::journal::PostgresJournal::url_from_env()
            .expect("MODEL_STORE=postgres needs a server: run inside pg_virtualenv");
        Backend::Postgres { url, schema: format!("idem_model_{}_{n}", std::process::id()) }
    }

    #[cfg(not(feature = "postgres"))]
    fn postgres(_: u64) -> Self {
        panic!("MODEL_STORE=postgres needs the postgres feature")
    }

    async fn open(&self) -> Arc<dyn KeyStore> {
        match self {
            Backend::Sqlite(path) => Arc::new(SqliteJournal::open(path).unwrap()),
            #[cfg(feature = "postgres")]
            Backend::Postgres { url, schema } => Arc::new(
                idempotent_retry::journal::PostgresJournal::builder(url)
                    .schema(schema)
                    .scope("model")
                    .lease(Duration::from_millis(1))
                    .open()
                    .await
                    .unwrap(),
            ),
        }
    }
}

struct World {
    profile: ServerProfile,
    time: Time,
    cloud: FakeCloud,
    proxy: ChaosProxy,
    journal: Backend,
    repo: Option<PathBuf>,
    /// The two machines, and the one the actions run on.
    processes: Vec<Process>,
    current: usize,
    ops: Vec<OpModel>,
    next_instance: u32,
    /// Ids of items the foreign writer put in each collection.
    foreign: Vec<BTreeSet<String>>,
    log: Vec<String>,
}

fn policy() -> RetryPolicy {
    RetryPolicy::standard()
        .with_max_attempts(4)
        .with_attempt_timeout(Duration::from_secs(2))
        .with_backoff(ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(2)).jitter(Jitter::None))
}

fn collection(coll: usize) -> String {
    replicas(&format!("app-{coll}"), "vm-1")
}

impl World {
    async fn new(profile: ServerProfile, dir: &Path, n: u64) -> Self {
        let time = Time::new();
        let cloud = FakeCloud::builder(profile.clone())
            .clock(time.clock.clone())
            .long_running(LongRunning::Status, PROVISIONING)
            .start()
            .await;
        let proxy = ChaosProxy::builder(cloud.address()).time_travel(time.clock.clone()).start().await;
        let journal = Backend::for_case(dir, n);
        let repo = git_repo(dir);
        let processes =
            vec![Self::process(&profile, &time, &journal).await, Self::process(&profile, &time, &journal).await];
        Self {
            profile,
            time,
            cloud,
            proxy,
            journal,
            repo,
            processes,
            current: 0,
            ops: (0..POST_OPS).map(|_| OpModel::default()).collect(),
            next_instance: 0,
            foreign: vec![BTreeSet::new(); COLLECTIONS],
            log: Vec::new(),
        }
    }

    async fn process(profile: &ServerProfile, time: &Time, journal: &Backend) -> Process {
        let client = client(profile.configure(time.layer().policy(policy())));
        let store = journal.open().await;
        let ops = Operations::with_store(client, store.clone())
            .clock(time.clock.clone())
            .sleeper(time.sleeper.clone())
            .scope("tenant");
        Process { ops, store, reconcilers: HashMap::new() }
    }

    fn name(op: usize, instance: u32) -> String {
        format!("op-{op}.{instance}")
    }

    /// The instance a post of `op` with `source` is for, and its fixed key's label.
    fn instance_for(&mut self, op: usize, source: &Source) -> (u32, Option<String>) {
        let label = match source {
            Source::Derived(g) => Some(format!("derived-{g}")),
            Source::Explicit(k) => Some(format!("explicit-{k}")),
            Source::Git => self.repo.as_deref().map(|repo| format!("git-{}", git_head(repo))),
            Source::Random | Source::None => None,
        };
        let model = &mut self.ops[op];
        if model.open {
            return (model.instance, label);
        }
        if let Some(instance) = label.as_ref().and_then(|l| model.by_key.get(l)) {
            return (*instance, label);
        }
        self.next_instance += 1;
        let model = &mut self.ops[op];
        model.instance = self.next_instance;
        model.open = true;
        (model.instance, label)
    }

    /// Runs one action, then checks every invariant.
    async fn step(&mut self, action: &Action) -> Result<(), TestCaseError> {
        self.log.push(format!("{action:?}"));
        match action {
            Action::Post { .. } | Action::Reconcile { .. } => self.act(action, None).await,
            Action::Crash { action, at, deliver } => self.act(action, Some((*at, *deliver))).await,
            Action::Restart => {
                self.processes[self.current] = Self::process(&self.profile, &self.time, &self.journal).await;
                Ok(())
            }
            Action::Switch => {
                self.current = 1 - self.current;
                Ok(())
            }
            Action::Foreign { coll, add } => {
                let collection = collection(*coll);
                if *add {
                    let item = self.cloud.add_foreign(&collection, "foreign", self.time.clock.now());
                    self.foreign[*coll].insert(item.id);
                } else if let Some(id) = self.foreign[*coll].iter().next().cloned() {
                    self.cloud.remove(&collection, &id);
                }
                Ok(())
            }
            Action::Advance { hours } => {
                self.time.clock.advance(HOUR * *hours as u32);
                Ok(())
            }
            Action::Forget { op } => {
                let name = format!("post/op-{op}");
                let forgot = self.processes[self.current].store.forget(&name).await.unwrap();
                // Forgotten after checking the server (the user's part): the operation starts
                // over, and a key it used is as new as any other.
                self.ops[*op].open = false;
                self.ops[*op].by_key.clear();
                self.log.push(format!("  forgot: {forgot}"));
                Ok(())
            }
            Action::Commit => {
                if let Some(repo) = &self.repo {
                    git_commit(repo);
                }
                Ok(())
            }
            Action::FailProvisioning => {
                self.cloud.fail_next_provisioning(1);
                Ok(())
            }
            Action::Faults { seed, percent } => {
                let mix = FaultMix::chaos()
                    .with_retry_after(Some(RetryAfter::Seconds(1)))
                    .with_delay(0.1, Duration::from_secs(3))
                    .scaled_to(f64::from(*percent) / 100.0);
                self.proxy.set_schedule(if *percent == 0 { Schedule::pass() } else { Schedule::random(*seed, mix) });
                Ok(())
            }
        }
    }

    /// A post or a reconcile, run to its end or killed at its first held create.
    async fn act(&mut self, action: &Action, crash: Option<(usize, bool)>) -> Result<(), TestCaseError> {
        match action {
            Action::Post { op, source, payload, read_back, wait } => {
                self.post(*op, source, Options { payload: *payload, read_back: *read_back, wait: *wait }, crash).await
            }
            Action::Reconcile { coll, count, generation, prune, prune_foreign, keyless, ready } => {
                let settings = ReconcileSettings {
                    coll: *coll,
                    count: *count,
                    generation: *generation,
                    prune: *prune,
                    prune_foreign: *prune_foreign,
                    keyless: *keyless,
                    ready: *ready,
                };
                self.reconcile(settings, crash).await
            }
            other => panic!("not an operation: {other:?}"),
        }
    }

    async fn post(
        &mut self,
        op: usize,
        source: &Source,
        options: Options,
        crash: Option<(usize, bool)>,
    ) -> Result<(), TestCaseError> {
        let Options { payload, read_back, wait } = options;
        let (instance, label) = self.instance_for(op, source);
        let name = Self::name(op, instance);
        let was_waiting = self.processes[self.current]
            .store
            .get(&format!("post/op-{op}"))
            .await
            .unwrap()
            .filter(|r| r.state == OpState::Waiting);
        let posts_before = self.proxy.records().iter().filter(|r| r.method == "POST").count();
        let made_before = self.cloud.created_named(&name);
        let url = format!("{}/cvms", self.proxy.uri());
        let ops = self.processes[self.current].ops.clone();
        let (source, repo) = (source.clone(), self.repo.clone());
        let body = json!({"name": name, "v": payload});
        let find = ReadBack::find_in_list(url.clone(), "name", name.clone());
        let run = async move {
            let mut builder = ops.operation(format!("post/op-{op}")).post(url).json(&body).identity(["id"]);
            builder = match &source {
                Source::Random => builder.random_key(),
                Source::Derived(g) => builder.derived_key(*g),
                Source::Explicit(k) => builder.key(IdempotencyKey::new(format!("explicit-{k}")).unwrap()),
                Source::Git => match &repo {
                    Some(repo) => builder.key_from_git(repo, GitKeyMode::CleanOnly),
                    None => builder.no_key(),
                },
                Source::None => builder.no_key(),
            };
            if read_back {
                builder = builder.read_back(find);
            }
            if wait {
                builder = builder.wait(running());
            }
            builder.send().await
        };
        let result = self.run_or_crash(run, crash).await;
        let posts = self.proxy.records().iter().filter(|r| r.method == "POST").count() - posts_before;
        // 7. A waiting record is resumed, never sent again.
        if let Some(record) = &was_waiting {
            prop_assert_eq!(posts, 0, "the record was waiting ({:?}), and the run sent a create", record.handle);
        }
        let Some(result) = result else {
            self.log.push("  killed".into());
            return self.check_posts();
        };
        let made = self.cloud.created_named(&name) - made_before;
        self.log.push(format!("  {}: {posts} POSTs, {made} made", describe(&result)));
        match &result {
            Ok(done) => {
                // 5. Success names a resource that is on the server, made for this instance.
                let id = done.identity.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
                let ours = self.ids_named(&name);
                prop_assert!(ours.contains(&id), "{:?} returned id {id:?}; {name} has {ours:?}", done.resolution);
                // 6. The journal agrees: its record of this run, when this run's key is the
                // operation's current one (a fixed key used before another run's is kept
                // among the operation's retired records, as it was).
                let record = self.processes[self.current].store.get(&format!("post/op-{op}")).await.unwrap();
                let record = record.ok_or_else(|| TestCaseError::fail("a success left no record"))?;
                if done.handle.is_some() {
                    // An earlier run's wait, resumed by a run that does not wait: still waiting.
                    prop_assert_eq!(record.state, OpState::Waiting);
                    return self.check_posts();
                }
                prop_assert_eq!(record.state, OpState::Succeeded);
                let older_fixed_key = done.key.is_some() && record.key != done.key;
                if !older_fixed_key {
                    let recorded = record.identity.as_ref().and_then(|i| i.get("id")).and_then(Value::as_str);
                    prop_assert_eq!(recorded, Some(id.as_str()), "{:?}", record);
                }
                // 8. Waited for: running on the server.
                if wait {
                    let status = self.status_of(&id);
                    prop_assert_eq!(status.as_deref(), Some("running"), "waited for {}", id);
                }
                let model = &mut self.ops[op];
                model.open = false;
                if let Some(label) = label {
                    model.by_key.entry(label).or_insert(instance);
                }
            }
            Err(OperationError::Wait(failed)) => {
                // 8. Created, not ready: tracked, and a failure state is the server's.
                // (A fixed key kept among the retired records, as it was, has no record to
                // wait in: a re-run with it replays, or reads the journal, and waits again.)
                let record = self.processes[self.current].store.get(&format!("post/op-{op}")).await.unwrap();
                let record = record.ok_or_else(|| TestCaseError::fail("a wait left no record"))?;
                prop_assert!(
                    record.state == OpState::Waiting || record.key != failed.key,
                    "{}: the record is {:?}",
                    failed,
                    record
                );
                if let WaitError::Failed { resource, .. } = &failed.source {
                    let id = resource.get("id").and_then(Value::as_str).unwrap_or_default();
                    let status = self.status_of(id);
                    prop_assert_eq!(status.as_deref(), Some("error"), "{}", failed);
                }
            }
            Err(e) => {
                // 4. Nothing sent, nothing made; not applied, nothing made.
                let never_sent = matches!(
                    e,
                    OperationError::InvalidOptions { .. }
                        | OperationError::PayloadMismatch(_)
                        | OperationError::Journal(_)
                );
                if never_sent {
                    prop_assert_eq!(posts, 0, "{} said nothing was sent", e);
                }
                if !e.may_have_been_applied() {
                    prop_assert_eq!(made, 0, "{} said it was not applied", e);
                }
            }
        }
        self.check_posts()
    }

    /// 1. At most one resource per logical operation.
    fn check_posts(&self) -> Result<(), TestCaseError> {
        let mut made: BTreeMap<String, usize> = BTreeMap::new();
        for (resource, foreign, _) in self.cloud.history("cvms") {
            if !foreign {
                *made.entry(resource.name).or_default() += 1;
            }
        }
        for (name, n) in made {
            prop_assert!(n <= 1, "{name}: {n} resources for one logical operation");
        }
        Ok(())
    }

    fn status_of(&self, id: &str) -> Option<String> {
        self.cloud.history("cvms").into_iter().find(|(r, _, _)| r.id == id).map(|(r, _, _)| r.status)
    }

    fn ids_named(&self, name: &str) -> BTreeSet<String> {
        self.cloud.history("cvms").into_iter().filter(|(r, f, _)| !f && r.name == name).map(|(r, _, _)| r.id).collect()
    }

    async fn reconcile(&mut self, s: ReconcileSettings, crash: Option<(usize, bool)>) -> Result<(), TestCaseError> {
        let collection = collection(s.coll);
        let history_before = self.cloud.history(&collection);
        let ours_before = history_before.iter().filter(|(_, foreign, live)| !foreign && *live).count();
        // Keyed creates a killed or failed run left on their way may have been applied: a
        // reconcile that resends them to learn their items (before pruning) may make them now.
        let prefix = format!("rec-{}/", s.coll);
        let on_their_way = self.processes[self.current]
            .store
            .list()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.operation.starts_with(&prefix) && r.state.is_unsettled() && r.key.is_some())
            .count();
        let key = (s.coll, s.generation, s.keyless, s.ready);
        let mut r = match self.processes[self.current].reconcilers.remove(&key) {
            Some(r) => r,
            None => {
                let url = format!("{}/{collection}", self.proxy.uri());
                let mut r = Reconciler::new(self.processes[self.current].ops.clone(), url, format!("rec-{}", s.coll))
                    .generation(s.generation)
                    .create_body(json!({"name": "ours"}))
                    .clock(self.time.clock.clone())
                    .sleeper(self.time.sleeper.clone())
                    .rng(idempotent_retry::time::SeededRng::new(7))
                    .deadline(Duration::from_secs(300));
                if s.ready {
                    r = r.wait_for(running());
                }
                if s.keyless { r.keyless() } else { r }
            }
        };
        r = r.prune(match (s.prune, s.prune_foreign) {
            (false, _) => Prune::Never,
            (true, false) => Prune::Ours,
            (true, true) => Prune::Any,
        });
        let desired = Desired::Count(s.count);
        let run = async move {
            let result = r.reconcile(&desired).await;
            (r, result)
        };
        let outcome = self.run_or_crash(run, crash).await;
        let history = self.cloud.history(&collection);
        let ours_after = history.iter().filter(|(_, foreign, live)| !foreign && *live).count();
        match &outcome {
            None => self.log.push(format!("  killed; ours {ours_before} -> {ours_after}")),
            Some((_, Ok(report))) => self.log.push(format!("  {report}; ours {ours_before} -> {ours_after}")),
            Some((_, Err(e))) => self.log.push(format!("  {e}; ours {ours_before} -> {ours_after}")),
        }
        // 2. Never delete what is not ours (unless told).
        if !s.prune_foreign {
            for (resource, foreign, _) in &history {
                let deleted_now = self.cloud.deleted_through_api(&resource.id)
                    && history_before.iter().any(|(r, _, live)| r.id == resource.id && *live);
                prop_assert!(!(*foreign && deleted_now), "deleted foreign item {} without prune_foreign", resource.id);
            }
        }
        // 3. Never more of ours than max(before, desired); a run that did not finish may have
        // made what was on its way (before the prune that follows the resend).
        let finished = matches!(outcome, Some((_, Ok(_))));
        let maybe_before = if finished { ours_before } else { ours_before + on_their_way };
        prop_assert!(
            ours_after <= maybe_before.max(s.count),
            "{ours_after} of ours after a reconcile to {} from {ours_before} (and {on_their_way} on their way)",
            s.count
        );
        if let Some((r, result)) = outcome {
            if let Ok(report) = &result {
                let live = history.iter().filter(|(_, _, live)| *live).count();
                if report.converged {
                    prop_assert_eq!(live, s.count, "converged: {}", report);
                    // 8. Waited for: every item running.
                    if s.ready {
                        let running = history.iter().filter(|(r, _, live)| *live && r.status == "running").count();
                        prop_assert_eq!(running, s.count, "converged with waiting: {}", report);
                    }
                }
                // 6. The journal's slot records name items the server made in this collection.
                let ever: BTreeSet<&str> =
                    history.iter().filter(|(_, f, _)| !f).map(|(r, _, _)| r.id.as_str()).collect();
                for record in self.processes[self.current]
                    .store
                    .list()
                    .await
                    .unwrap()
                    .iter()
                    .filter(|r| r.operation.starts_with(&prefix))
                {
                    let presumed = record.identity.as_ref().and_then(|i| i.get("presumed")).is_some();
                    if let (OpState::Succeeded, Some(id), false) = (
                        record.state,
                        record.identity.as_ref().and_then(|i| i.get("id")).and_then(Value::as_str),
                        presumed,
                    ) {
                        prop_assert!(
                            ever.contains(id),
                            "{} records {id}, which this collection never had",
                            record.operation
                        );
                    }
                }
            }
            self.processes[self.current].reconcilers.insert(key, r);
        }
        Ok(())
    }

    /// Runs `run`; with `crash = (k, deliver)`, kills it while its `k`th request (of any kind:
    /// a list, a read-back, a create) is held at the gate, then lets that request reach the
    /// server (`deliver`) or drops it. `None` when killed.
    async fn run_or_crash<F>(&self, run: F, crash: Option<(usize, bool)>) -> Option<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let Some((at, deliver)) = crash else {
            let output = tokio::spawn(run).await.unwrap();
            self.proxy.settle().await;
            return Some(output);
        };
        let gate = self.proxy.gate(None);
        let mut task = tokio::spawn(run);
        for n in 1..=at {
            tokio::select! {
                output = &mut task => {
                    gate.open();
                    self.proxy.settle().await;
                    return Some(output.unwrap());
                }
                () = gate.until_held(1) => {}
            }
            if n < at {
                gate.release_oldest();
            }
        }
        task.abort();
        let _ = task.await;
        if !deliver {
            gate.discard();
        }
        gate.open();
        self.proxy.settle().await;
        None
    }
}

#[derive(Debug, Clone, Copy)]
struct ReconcileSettings {
    coll: usize,
    count: usize,
    generation: u64,
    prune: bool,
    prune_foreign: bool,
    keyless: bool,
    ready: bool,
}

/// How a post is made.
#[derive(Debug, Clone, Copy)]
struct Options {
    payload: u8,
    read_back: bool,
    wait: bool,
}

fn describe(result: &Result<idempotent_retry::operation::Completed, OperationError>) -> String {
    match result {
        Ok(done) => format!("{:?} {:?}", done.resolution, done.identity.get("id")),
        Err(e) => format!("error: {e}"),
    }
}

/// A repository with one commit, if git can be run.
fn git_repo(dir: &Path) -> Option<PathBuf> {
    if !git_support::available() {
        return None;
    }
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git_support::git(&repo, &["init", "-q"]);
    git_commit(&repo);
    Some(repo)
}

fn git_commit(repo: &Path) {
    git_support::git(repo, &["commit", "-q", "--allow-empty", "-m", "change"]);
}

fn git_head(repo: &Path) -> String {
    git_support::head(repo)
}

async fn run_case(case: Case) -> Result<(), TestCaseError> {
    run_logged(case).await.0
}

/// Runs the case: its verdict, and the log of what each action did.
async fn run_logged(case: Case) -> (Result<(), TestCaseError>, Vec<String>) {
    static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CASE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("idem-model-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut world = World::new(profiles()[case.profile].clone(), &dir, n).await;
    let mut result = Ok(());
    for action in &case.actions {
        result = world.step(action).await;
        if result.is_err() {
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let result =
        result.map_err(|e| TestCaseError::fail(format!("{e}\n{}: {}", world.profile.name, world.log.join("\n"))));
    (result, world.log)
}

fn cases() -> u32 {
    std::env::var("MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

proptest! {
    #![proptest_config(seeded(cases()))]

    #[test]
    fn the_promise_holds_across_processes_and_hostile_sequences(case in case()) {
        RUNTIME.block_on(run_case(case))?;
    }
}

/// Cases the random search found, kept as they were found (each failed on the code of its
/// day). Each runs on the store `MODEL_STORE` names.
mod found {
    use super::*;

    fn reconcile(count: usize, prune: bool) -> Action {
        Action::Reconcile { coll: 0, count, generation: 2, prune, prune_foreign: false, keyless: false, ready: false }
    }

    fn crash(action: Action, at: usize) -> Action {
        Action::Crash { action: Box::new(action), at, deliver: false }
    }

    /// A reconcile to 2 killed with its first create held (never delivered); then a reconcile to
    /// 0 that may prune ours meets a foreign item it cannot prove is not the lost create's, so it
    /// resends that key (the server makes the item now) and is killed before it deletes it.
    /// The item was a "may have been applied" of the first run, not a new one: the bound counts
    /// it, and the next run deletes it, knowing its id.
    #[test]
    fn a_resent_key_killed_before_its_prune_is_counted_and_pruned_next() {
        let case = Case {
            profile: 0,
            actions: vec![
                Action::Foreign { coll: 0, add: true },
                crash(reconcile(2, false), 2),
                crash(reconcile(0, true), 3),
                reconcile(0, true),
            ],
        };
        let (result, log) = RUNTIME.block_on(run_logged(case));
        result.unwrap();
        assert!(log.last().unwrap().ends_with("ours 1 -> 0"), "{}", log.join("\n"));
    }
}
