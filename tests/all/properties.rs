//! Random fault schedules × server profiles, through the chaos proxy on real sockets. Whatever
//! the faults, for every logical operation:
//!
//! - a keyed operation creates at most one resource;
//! - an operation reported as succeeded created exactly one;
//! - a keyless operation never creates more than one.
//!
//! 256 cases by default, from a fixed seed; `PROPTEST_CASES=N` runs more, `PROPTEST_RNG_SEED=N`
//! draws others.

use std::sync::LazyLock;
use std::time::Duration;

use http::Method;
use idempotent_retry::testing::{ChaosProxy, FakeCloud, Fault, InFlight, Replay, RetryAfter, Schedule, ServerProfile};
use idempotent_retry::{RequestOptions, RetryOutcome};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::support::*;

/// A proxy delay longer than the client's attempt timeout. Both are on the injected clock: the
/// proxy moves it (time travel), the attempt times out at once, and a slow machine cannot make
/// an ordinary attempt time out.
const HOLD: Duration = Duration::from_millis(80);
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(40);

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());

fn profiles() -> Vec<ServerProfile> {
    let mut all = ServerProfile::keyed();
    all.push(ServerProfile::no_keys());
    all
}

/// The kinds of fault a request can meet.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Pass,
    Lose,
    Reset,
    Unavailable,
    Throttled,
    /// The server's own "still in flight" answer (409, or 423 for django…), injected.
    InFlight,
    Delay,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => Just(Kind::Pass),
        2 => Just(Kind::Lose),
        1 => Just(Kind::Reset),
        1 => Just(Kind::Unavailable),
        1 => Just(Kind::Throttled),
        1 => Just(Kind::InFlight),
        1 => Just(Kind::Delay),
    ]
}

fn fault(kind: Kind, profile: &ServerProfile) -> Fault {
    let in_flight_status = match (profile.in_flight, &profile.replay) {
        (InFlight::Status423, _) => 423,
        (InFlight::Status429, _) => 429,
        (InFlight::Status503, _) => 503,
        // django has no in-flight answer (its 409 is its replay); its lock-timeout 423 is the
        // nearest thing it sends.
        (InFlight::RunsAgain, Replay::StoredAs409) => 423,
        _ => 409,
    };
    match kind {
        Kind::Pass => Fault::Pass,
        Kind::Lose => Fault::Lose,
        Kind::Reset => Fault::Reset,
        Kind::Unavailable => Fault::unavailable(RetryAfter::Seconds(1)),
        Kind::Throttled => Fault::throttled(RetryAfter::DateIn(Duration::from_secs(2))),
        Kind::InFlight => Fault::Status { status: in_flight_status, retry_after: None },
        Kind::Delay => Fault::Delay(HOLD),
    }
}

#[derive(Debug, Clone)]
struct Case {
    profile: usize,
    /// How long the server keeps a first request in flight, on its (manual) clock.
    processing_ms: u64,
    /// One entry per logical operation: whether it is sent without a key.
    keyless: Vec<bool>,
    faults: Vec<Kind>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..profiles().len(),
        prop_oneof![Just(0u64), Just(300), Just(1500)],
        proptest::collection::vec(any::<bool>(), 1..4),
        proptest::collection::vec(kind(), 0..14),
    )
        .prop_map(|(profile, processing_ms, keyless, faults)| Case { profile, processing_ms, keyless, faults })
}

async fn run(case: Case) -> Result<(), TestCaseError> {
    let mut profile = profiles()[case.profile].clone();
    // A server with no in-flight check runs a second request that arrives while the first is
    // still being processed: that duplicate is the server's, whatever the client does.
    if profile.in_flight != InFlight::RunsAgain {
        profile = profile.with_processing(Duration::from_millis(case.processing_ms));
    }
    let time = Time::new();
    let cloud = FakeCloud::builder(profile.clone()).clock(time.clock.clone()).start().await;
    let faults: Vec<Fault> = case.faults.iter().map(|k| fault(*k, &profile)).collect();
    let proxy = ChaosProxy::builder(cloud.address())
        .schedule(Schedule::script(faults))
        .only(Method::POST)
        .time_travel(time.clock.clone())
        .start()
        .await;
    let policy = fast_policy().with_attempt_timeout(ATTEMPT_TIMEOUT).with_max_attempts(6);
    let client = client(profile.configure(time.layer().policy(policy)));

    let mut reported = Vec::new();
    for (i, keyless) in case.keyless.iter().enumerate() {
        let name = format!("op-{i}");
        let mut request = client.post(format!("{}/cvms", proxy.uri())).json(&serde_json::json!({ "name": name }));
        if *keyless {
            request = request.with_extension(RequestOptions::new().no_key());
        }
        let succeeded = match request.send().await {
            Ok(response) => RetryOutcome::of(&response).is_some_and(|o| o.succeeded),
            Err(_) => false,
        };
        reported.push((name, *keyless, succeeded));
    }
    // Delayed requests whose clients gave up still land; count after they have.
    proxy.settle().await;

    for (name, keyless, succeeded) in reported {
        let created = cloud.created_named(&name);
        let label = if keyless || !profile.takes_keys() { "keyless" } else { "keyed" };
        prop_assert!(created <= 1, "{}: {label} {name} created {created} resources", profile.name);
        if succeeded {
            prop_assert_eq!(created, 1, "{}: {} reported success", profile.name, name);
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

proptest! {
    #![proptest_config(seeded(cases()))]

    #[test]
    fn operations_never_duplicate_under_random_faults(case in case()) {
        RUNTIME.block_on(run(case))?;
    }
}

/// The reconcile engine under random faults (on every method) and list lag, keyed and keyless:
/// every step ends with exactly the desired count; with keys, no list ever shows more than the
/// desired count while scaling up, and nothing is created twice.
mod reconcile {
    use super::*;
    use idempotent_retry::testing::replicas;
    use idempotent_retry::{
        Operations, Reconciler,
        journal::MemoryStore,
        reconcile::{Desired, Prune},
    };

    #[derive(Debug, Clone)]
    struct Steps {
        profile: usize,
        lag: u32,
        counts: Vec<usize>,
        faults: Vec<Kind>,
    }

    fn steps() -> impl Strategy<Value = Steps> {
        (
            prop_oneof![Just(0usize), Just(1), Just(2), Just(3), Just(7)],
            0u32..=3,
            proptest::collection::vec(0usize..=6, 1..4),
            proptest::collection::vec(prop_oneof![4 => Just(Kind::Pass), 2 => Just(Kind::Lose), 1 => Just(Kind::Reset), 1 => Just(Kind::Unavailable), 1 => Just(Kind::Throttled)], 0..30),
        )
            .prop_map(|(profile, lag, counts, faults)| Steps { profile, lag, counts, faults })
    }

    async fn run(steps: Steps) -> Result<(), TestCaseError> {
        let profile = profiles()[steps.profile].clone();
        let time = Time::new();
        let cloud = FakeCloud::builder(profile.clone()).clock(time.clock.clone()).list_lag(steps.lag).start().await;
        let faults: Vec<Fault> = steps.faults.iter().map(|k| fault(*k, &profile)).collect();
        let proxy = ChaosProxy::builder(cloud.address())
            .schedule(Schedule::script(faults))
            .time_travel(time.clock.clone())
            .start()
            .await;
        let client = client(profile.configure(time.layer().policy(fast_policy())));
        let ops = Operations::new(client, MemoryStore::new()).clock(time.clock.clone()).scope("tenant");
        let collection = replicas("app-1", "vm-1");
        // No other writer uses this collection, so surplus may go even when nothing proves it is
        // ours: a create whose answer was lost while the count was met is never resent to find
        // out (that could create), and a lost keyless create's item is only presumed ours.
        let mut reconciler = Reconciler::new(ops, format!("{}/{collection}", proxy.uri()), "replicas")
            .expect_field("vm_uuid", "vm-1")
            .prune(Prune::Any)
            .expectation_ttl(Duration::from_secs(30))
            .clock(time.clock.clone())
            .sleeper(time.sleeper.clone());
        if !profile.takes_keys() {
            reconciler = reconciler.keyless();
        }

        let mut needed_creates = 0;
        let mut live = 0;
        for desired in steps.counts {
            let report = reconciler
                .reconcile(&Desired::Count(desired))
                .await
                .map_err(|e| TestCaseError::fail(format!("{}: {e}\n{:?}", profile.name, e.report)))?;
            prop_assert!(report.converged, "{}: {report}", profile.name);
            prop_assert_eq!(cloud.resources(&collection).len(), desired, "{}: {}", profile.name, report);
            if profile.takes_keys() && desired >= live {
                prop_assert!(report.max_observed <= desired, "{}: overshoot while scaling up: {report}", profile.name);
            }
            needed_creates += desired.saturating_sub(live);
            live = desired;
        }
        if profile.takes_keys() {
            prop_assert_eq!(cloud.created(), needed_creates, "{}: nothing created twice", profile.name);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(seeded(cases()))]

        #[test]
        fn reconcile_converges_without_overshoot(steps in steps()) {
            RUNTIME.block_on(run(steps))?;
        }
    }
}
