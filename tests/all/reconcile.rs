//! The reconcile engine against the fixture cloud: scaling with generations, named slots,
//! identity checks, prune rules, slow start, and scenarios 3, 4, 5 and 10.

use std::time::Duration;

use idempotent_retry::testing::{ChaosProxy, FakeCloud, Fault, Schedule, ServerProfile, replicas};
use idempotent_retry::{
    Operations, Reconciler, RetryPolicy,
    journal::MemoryStore,
    reconcile::{Desired, Prune, StopReason},
    time::Clock,
};
use serde_json::json;

use crate::support::*;

const APP: &str = "app-1";
const VM: &str = "vm-1";

/// A rig whose cloud lags its lists by `lag`, with faults on creates only.
async fn rig_with_lag(profile: ServerProfile, schedule: Schedule, lag: u32) -> Rig {
    rig_for_creates(profile, schedule, lag, fast_policy()).await
}

/// A rig with faults on creates only, lists lagging by `lag`, and the client's `policy`.
async fn rig_for_creates(profile: ServerProfile, schedule: Schedule, lag: u32, policy: RetryPolicy) -> Rig {
    let time = Time::new();
    let cloud = FakeCloud::builder(profile.clone()).clock(time.clock.clone()).list_lag(lag).start().await;
    let proxy = ChaosProxy::builder(cloud.address())
        .schedule(schedule)
        .only(http::Method::POST)
        .time_travel(time.clock.clone())
        .start()
        .await;
    let client = client(profile.configure(time.layer().policy(policy)));
    Rig { profile, cloud, proxy, client, time }
}

fn reconciler(rig: &Rig, scope: &str) -> Reconciler {
    let ops = Operations::new(rig.client.clone(), MemoryStore::new()).clock(rig.time.clock.clone()).scope(scope);
    let keyless = !rig.profile.takes_keys();
    let r = Reconciler::new(ops, format!("{}/{}", rig.proxy.uri(), replicas(APP, VM)), format!("replicas/{APP}/{VM}"))
        .expect_field("app_id", APP)
        .expect_field("vm_uuid", VM)
        .clock(rig.time.clock.clone())
        .sleeper(rig.time.sleeper.clone())
        .expectation_ttl(Duration::from_secs(30));
    if keyless { r.keyless() } else { r }
}

fn live(rig: &Rig) -> usize {
    rig.cloud.resources(&replicas(APP, VM)).len()
}

#[tokio::test]
async fn scales_up_down_and_up_again_with_generations() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let mut r = reconciler(&rig, "tenant-1").prune(Prune::Ours);

    let up = r.reconcile(&Desired::Count(5)).await.unwrap();
    assert!(up.converged, "{up}");
    assert_eq!((up.before, up.after, up.created.len(), up.overshoot), (0, 5, 5, 0));
    let keys = rig.cloud.keys_seen();
    assert_eq!(keys.iter().collect::<std::collections::HashSet<_>>().len(), 5, "one key per slot");

    let down = r.reconcile(&Desired::Count(2)).await.unwrap();
    assert!(down.converged, "{down}");
    assert_eq!((down.before, down.after, down.deleted.len(), down.overshoot), (5, 2, 3, 3));
    let mut resources = rig.cloud.resources(&replicas(APP, VM));
    resources.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    assert!(down.deleted.iter().all(|id| !resources.iter().any(|r| &r.id == id)));

    let mut r = r.generation(2);
    let up_again = r.reconcile(&Desired::Count(7)).await.unwrap();
    assert!(up_again.converged, "{up_again}");
    assert_eq!((up_again.before, up_again.after, up_again.created.len()), (2, 7, 5));
    assert_eq!(live(&rig), 7);
    assert_eq!(rig.cloud.created(), 10, "5, then 5 more: nothing replayed from the first generation");

    // A re-run changes nothing and sends nothing but a list.
    let requests = rig.proxy.requests();
    let again = r.reconcile(&Desired::Count(7)).await.unwrap();
    assert!(again.converged && again.created.is_empty());
    assert_eq!((again.requests, rig.proxy.requests() - requests), (1, 1));
}

#[tokio::test]
async fn the_same_inputs_send_the_same_keys() {
    let first = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let second = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    reconciler(&first, "tenant-1").reconcile(&Desired::Count(3)).await.unwrap();
    reconciler(&second, "tenant-1").reconcile(&Desired::Count(3)).await.unwrap();
    let other_scope = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    reconciler(&other_scope, "tenant-2").reconcile(&Desired::Count(3)).await.unwrap();

    let sorted = |rig: &Rig| {
        let mut keys = rig.cloud.keys_seen();
        keys.sort();
        keys
    };
    assert_eq!(sorted(&first), sorted(&second), "a second applier with the same inputs sends the same keys");
    assert!(sorted(&first).iter().all(|k| !sorted(&other_scope).contains(k)), "another scope, other keys");
}

/// 3. An endpoint without keys, responses lost: no blind resend; the list settles it, and the
/// count never exceeds what is desired.
#[tokio::test]
async fn s03_keyless_lost_responses_are_settled_by_the_list() {
    let rig =
        rig_with_lag(ServerProfile::no_keys(), Schedule::script([Fault::Lose, Fault::Lose, Fault::Reset]), 0).await;
    let mut r = reconciler(&rig, "tenant-1");

    let report = r.reconcile(&Desired::Count(3)).await.unwrap();

    assert!(report.converged, "{report}");
    assert_eq!(live(&rig), 3);
    assert_eq!(rig.cloud.created(), 3, "never more than desired");
    assert!(report.max_observed <= 3, "{report}");
    assert_eq!(report.unknown, 3, "{report}");
    // The two lost after the server committed are presumed ours once they show; the reset one
    // never arrived, its expectation expired, and its slot was created again.
    assert_eq!((report.presumed.len(), report.created.len()), (2, 1), "{report}");
}

/// 4. The list lags the create: the new item is missing from the next lists; no second create.
#[tokio::test]
async fn s04_list_lag_does_not_cause_a_second_create() {
    for profile in [ServerProfile::stripe(), ServerProfile::ietf(), ServerProfile::no_keys()] {
        let rig = rig_with_lag(profile.clone(), Schedule::pass(), 3).await;
        let mut r = reconciler(&rig, "tenant-1");

        let report = r.reconcile(&Desired::Count(3)).await.unwrap();

        assert!(report.converged, "{}: {report}", profile.name);
        assert_eq!(rig.cloud.created(), 3, "{}", profile.name);
        assert_eq!(rig.cloud.handler_runs(), 3, "{}", profile.name);
        assert!(report.rounds > 3, "{}: it waited for the lists to catch up: {report}", profile.name);
    }
}

/// 5. The expectation expires and the item appears late: a surplus is created, detected by a
/// later observation, and removed only if pruning is allowed, never a protected member.
#[tokio::test]
async fn s05_a_late_item_is_detected_and_pruned_only_when_allowed() {
    for prune in [false, true] {
        let rig = rig_with_lag(ServerProfile::stripe(), Schedule::pass(), 0).await;
        // A protected member already in the collection.
        let url = format!("{}/{}", rig.cloud.uri(), replicas(APP, VM));
        reqwest::Client::new().post(&url).json(&json!({"name": "gpu-pinned"})).send().await.unwrap();
        // From now on lists lag by 4, while expectations last 3 s at a list a second.
        rig.cloud.set_list_lag(4);
        let mut r = reconciler(&rig, "tenant-1")
            .expectation_ttl(Duration::from_secs(3))
            .prune(if prune { Prune::Any } else { Prune::Never })
            .protect(|item| item["name"] == "gpu-pinned");

        let first = r.reconcile(&Desired::Count(2)).await.unwrap();
        assert!(first.expired >= 1, "prune={prune}: the guess is on record: {first}");
        assert_eq!(rig.cloud.created(), 3, "the pinned one, ours, and the surplus an expired expectation led to");

        let newest =
            rig.cloud.resources(&replicas(APP, VM)).into_iter().max_by(|a, b| a.created_at.cmp(&b.created_at)).unwrap();

        let second = r.reconcile(&Desired::Count(2)).await.unwrap();

        assert_eq!(second.overshoot, 1, "prune={prune}: detected: {second}");
        assert_eq!(second.overshoot_ids, std::slice::from_ref(&newest.id), "{second}");
        let names: Vec<String> = rig.cloud.resources(&replicas(APP, VM)).into_iter().map(|r| r.name).collect();
        if prune {
            assert!(second.converged, "{second}");
            assert_eq!(second.deleted, [newest.id], "newest first");
            assert_eq!(live(&rig), 2);
        } else {
            assert!(!second.converged && second.deleted.is_empty(), "{second}");
            assert_eq!(live(&rig), 3);
        }
        let after: Vec<String> = rig.cloud.resources(&replicas(APP, VM)).into_iter().map(|r| r.name).collect();
        assert!(
            names.contains(&"gpu-pinned".to_owned()) && after.contains(&"gpu-pinned".to_owned()),
            "never the protected member"
        );
    }
}

/// 10. Two appliers with different keys and the same desired state: the overshoot is detected and
/// reported, and with foreign pruning (newest first, the same choice for both) they converge.
/// The gate makes the interleaving the scenario is about: both list an empty collection, both
/// create, and both look again only once all six exist.
#[tokio::test]
async fn s10_two_appliers_with_different_keys() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let gate = rig.proxy.gate(Some(http::Method::GET));
    let (mut a, mut b) = (reconciler(&rig, "tenant-a"), reconciler(&rig, "tenant-b"));
    let both = tokio::spawn(async move {
        let (ra, rb) = tokio::join!(a.reconcile(&Desired::Count(3)), b.reconcile(&Desired::Count(3)));
        (a, b, ra, rb)
    });
    gate.until_held(2).await;
    gate.release();
    gate.until_held(2).await;
    assert_eq!(rig.cloud.created(), 6, "both created: different keys");
    gate.open();
    let (a, b, ra, rb) = both.await.unwrap();
    let (ra, rb) = (ra.unwrap(), rb.unwrap());

    assert_eq!(live(&rig), 6);
    assert_eq!((ra.overshoot, rb.overshoot), (3, 3), "{ra}\n{rb}");
    assert_eq!(ra.overshoot_ids, rb.overshoot_ids, "the same three, newest first");
    assert!(ra.deleted.is_empty() && rb.deleted.is_empty(), "no pruning asked for");

    let mut a = a.prune(Prune::Any);
    let mut b = b.prune(Prune::Any);
    let (ra, rb) = tokio::join!(a.reconcile(&Desired::Count(3)), b.reconcile(&Desired::Count(3)));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra.converged && rb.converged, "{ra}\n{rb}");
    assert_eq!(live(&rig), 3);
}

#[tokio::test]
async fn named_slots_adopt_what_exists_and_create_the_rest() {
    let rig = rig_with_lag(ServerProfile::stripe(), Schedule::script([Fault::Lose]), 0).await;
    let url = format!("{}/{}", rig.cloud.uri(), replicas(APP, VM));
    let existing: serde_json::Value =
        reqwest::Client::new().post(&url).json(&json!({"name": "web-1"})).send().await.unwrap().json().await.unwrap();
    let names = || Desired::Names(vec!["web-1".into(), "web-2".into(), "web-3".into()]);
    let mut r = reconciler(&rig, "tenant-1").prune(Prune::Any);

    let report = r.reconcile(&names()).await.unwrap();

    assert!(report.converged, "{report}");
    assert_eq!(report.adopted, [existing["id"].as_str().unwrap()]);
    assert_eq!(report.created.len(), 2);
    let mut have: Vec<String> = rig.cloud.resources(&replicas(APP, VM)).into_iter().map(|r| r.name).collect();
    have.sort();
    assert_eq!(have, ["web-1", "web-2", "web-3"]);
    assert_eq!(rig.cloud.created_named("web-2"), 1, "the lost create was replayed, not repeated");

    // A second web-1 appears: it is reported, and, being a named slot's, never deleted.
    reqwest::Client::new().post(&url).json(&json!({"name": "web-1"})).send().await.unwrap();
    let report = r.reconcile(&names()).await.unwrap();
    assert_eq!(report.overshoot, 1, "{report}");
    assert!(report.deleted.is_empty(), "{report}");
    assert_eq!(live(&rig), 4);
}

#[tokio::test]
async fn an_identity_mismatch_stops_further_creates() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let mut r = reconciler(&rig, "tenant-1").expect_field("vm_uuid", "vm-other");

    let err = r.reconcile(&Desired::Count(8)).await.unwrap_err();

    assert!(matches!(err.failure, StopReason::Identity(_)), "{err}");
    assert_eq!(rig.cloud.created(), 1, "slow start: the first batch of one showed the problem");
    assert!(!err.report.converged);
}

#[tokio::test]
async fn prune_spares_foreign_members_unless_told() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let url = format!("{}/{}", rig.cloud.uri(), replicas(APP, VM));
    for name in ["foreign-1", "foreign-2"] {
        reqwest::Client::new().post(&url).json(&json!({"name": name})).send().await.unwrap();
    }
    let mut r = reconciler(&rig, "tenant-1").prune(Prune::Ours);
    r.reconcile(&Desired::Count(4)).await.unwrap();
    assert_eq!(live(&rig), 4);

    // Down to 1: only our two may go; the foreign pair stays, and the surplus is reported.
    let report = r.reconcile(&Desired::Count(1)).await.unwrap();
    assert_eq!(report.deleted.len(), 2, "{report}");
    assert!(!report.converged);
    let names: Vec<String> = rig.cloud.resources(&replicas(APP, VM)).into_iter().map(|r| r.name).collect();
    assert!(names.contains(&"foreign-1".into()) && names.contains(&"foreign-2".into()), "{names:?}");

    let mut r = r.prune(Prune::Any);
    let report = r.reconcile(&Desired::Count(1)).await.unwrap();
    assert!(report.converged, "{report}");
    assert_eq!(live(&rig), 1);
}

// A wrong batch's extra creates travel real sockets: the test gives them real time to show.
#[allow(clippy::disallowed_methods)]
#[tokio::test]
async fn slow_start_doubles_batches_and_a_refusal_stops_the_run() {
    // Unhindered: one list, then batches of 1, 2, 4 and 1. The gate holds every create: each
    // batch is all at the gate before any of it reaches the server.
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let gate = rig.proxy.gate(Some(http::Method::POST));
    let mut r = reconciler(&rig, "tenant-1");
    let run = tokio::spawn(async move { r.reconcile(&Desired::Count(8)).await });
    for (round, batch) in [1, 2, 4, 1].into_iter().enumerate() {
        gate.until_held(batch).await;
        // A wrong batch would have more on the way; give them a moment to show (this can only
        // catch a bug, never fail a right batch).
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(gate.held(), batch, "batch {round}");
        assert_eq!(rig.cloud.created(), [0, 1, 3, 7][round], "batch {round} waited for the one before");
        gate.release();
    }
    let report = run.await.unwrap().unwrap();
    assert!(report.converged, "{report}");
    assert_eq!(rig.cloud.created(), 8);
    assert_eq!(gate.held(), 0);

    // The second create is refused: the batch of two is the last; the run stops with the reason.
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let gate = rig.proxy.gate(Some(http::Method::POST));
    let mut r = reconciler(&rig, "tenant-1");
    let run = tokio::spawn(async move {
        let result = r.reconcile(&Desired::Count(8)).await;
        (r, result)
    });
    gate.until_held(1).await;
    gate.release();
    gate.until_held(2).await;
    rig.cloud.fail_next_creates(1, http::StatusCode::FORBIDDEN);
    gate.open();
    let (mut r, result) = run.await.unwrap();

    let err = result.unwrap_err();
    assert!(matches!(&err.failure, StopReason::Rejected { status, .. } if *status == 403), "{err}");
    assert_eq!(rig.attempts(), 3, "batch of 1, batch of 2 with the refusal, nothing more");
    assert_eq!(err.report.created.len(), 2);

    // Fixed: the next run converges; the refused slot is retired, not replayed.
    let report = r.reconcile(&Desired::Count(8)).await.unwrap();
    assert!(report.converged, "{report}");
    assert_eq!(live(&rig), 8);
}

/// Defect: delete URLs were `format!("{collection}/{id}")` with the server's id as it came. A
/// listed id `../../../admin/users/42` deleted `/admin/users/42`; `x?force=true` added a query.
/// An id is one percent-encoded path segment, and an empty id is refused.
#[tokio::test]
async fn hostile_ids_are_one_path_segment() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    let items = json!({"items": [
        {"id": "../../../admin/users/42", "name": "a", "created_at": "2026-11-22T00:00:01Z"},
        {"id": "x?force=true", "name": "b", "created_at": "2026-11-22T00:00:02Z"},
    ]});
    Mock::given(method("GET")).respond_with(ResponseTemplate::new(200).set_body_json(items)).mount(&server).await;
    Mock::given(method("DELETE")).respond_with(ResponseTemplate::new(404)).mount(&server).await;
    let time = Time::new();
    let ops = Operations::new(client(time.layer().policy(fast_policy())), MemoryStore::new()).clock(time.clock.clone());
    let collection = format!("{}/apps/a/cvms/v/replicas", server.uri());
    let mut r = Reconciler::new(ops, &collection, "replicas")
        .prune(Prune::Any)
        .clock(time.clock.clone())
        .sleeper(time.sleeper.clone());

    let _ = r.reconcile(&Desired::Count(0)).await;

    let deletes: Vec<String> = server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.method.as_str() == "DELETE")
        .map(|r| format!("{}{}", r.url.path(), r.url.query().map(|q| format!("?{q}")).unwrap_or_default()))
        .collect();
    assert!(!deletes.is_empty(), "surplus was deleted");
    for path in &deletes {
        assert!(path.starts_with("/apps/a/cvms/v/replicas/"), "left the collection: {path}");
        assert!(!path.contains('?'), "added a query: {path}");
        assert_eq!(path.matches('/').count(), 6, "more than one segment: {path}");
    }
    let mut deletes = deletes;
    deletes.sort();
    deletes.dedup();
    assert_eq!(
        deletes,
        ["/apps/a/cvms/v/replicas/..%2F..%2F..%2Fadmin%2Fusers%2F42", "/apps/a/cvms/v/replicas/x%3Fforce=true"]
    );
}

#[tokio::test]
async fn an_empty_listed_id_is_an_identity_error_and_nothing_is_deleted() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    for id in ["", ".", ".."] {
        let server = MockServer::start().await;
        let items = json!({"items": [{"id": id, "name": "a"}]});
        Mock::given(method("GET")).respond_with(ResponseTemplate::new(200).set_body_json(items)).mount(&server).await;
        let time = Time::new();
        let ops = Operations::new(client(time.layer()), MemoryStore::new()).clock(time.clock.clone());
        let mut r = Reconciler::new(ops, format!("{}/cvms", server.uri()), "cvms")
            .prune(Prune::Any)
            .clock(time.clock.clone())
            .sleeper(time.sleeper.clone());

        let err = r.reconcile(&Desired::Count(0)).await.unwrap_err();

        assert!(matches!(err.failure, StopReason::List(_)), "{id:?}: {err}");
        assert!(err.to_string().contains("cannot name"), "{id:?}: {err}");
        let requests = server.received_requests().await.unwrap();
        assert!(requests.iter().all(|r| r.method.as_str() == "GET"), "{id:?}: nothing deleted");
    }
}

/// A reconciler like `reconciler`, on a store shared across "processes".
fn reconciler_on(rig: &Rig, store: std::sync::Arc<dyn idempotent_retry::journal::KeyStore>) -> Reconciler {
    let ops = Operations::with_store(rig.client.clone(), store).clock(rig.time.clock.clone()).scope("tenant-1");
    let r = Reconciler::new(ops, format!("{}/{}", rig.proxy.uri(), replicas(APP, VM)), format!("replicas/{APP}/{VM}"))
        .clock(rig.time.clock.clone())
        .sleeper(rig.time.sleeper.clone())
        .expectation_ttl(Duration::from_secs(30));
    if rig.profile.takes_keys() { r } else { r.keyless() }
}

/// Creates an item in the collection behind the proxy's back (a foreign writer).
async fn foreign_item(rig: &Rig, name: &str) -> String {
    let url = format!("{}/{}", rig.cloud.uri(), replicas(APP, VM));
    let item: serde_json::Value =
        reqwest::Client::new().post(&url).json(&json!({ "name": name })).send().await.unwrap().json().await.unwrap();
    item["id"].as_str().unwrap().to_owned()
}

/// Runs `r` in a task and kills it (drops it mid-flight) once the proxy has seen `posts` POSTs.
async fn kill_after_posts(rig: &Rig, mut r: Reconciler, desired: usize, posts: usize) {
    let run = tokio::spawn(async move { r.reconcile(&Desired::Count(desired)).await });
    while rig.attempts() < posts && !run.is_finished() {
        tokio::task::yield_now().await;
    }
    run.abort();
    let _ = run.await;
    rig.proxy.settle().await;
}

/// Defect: the desired count met, a reconcile still created. A run whose creates failed left
/// keyed slots unsettled and was killed; the next run, desired 1 with one item present, resent
/// one of them "to settle it" and ended with 2. Desired met means no create.
#[tokio::test]
async fn a_met_count_creates_nothing_after_a_killed_run() {
    let rig =
        rig_for_creates(ServerProfile::stripe(), Schedule::always(Fault::Reset), 0, fast_policy().with_max_attempts(1))
            .await;
    let store: std::sync::Arc<dyn idempotent_retry::journal::KeyStore> = std::sync::Arc::new(MemoryStore::new());
    kill_after_posts(&rig, reconciler_on(&rig, store.clone()), 3, 2).await;
    assert_eq!(live(&rig), 0, "nothing reached the server");
    foreign_item(&rig, "foreign").await;
    rig.proxy.set_schedule(Schedule::pass());
    let posts = rig.attempts();

    let report = reconciler_on(&rig, store).reconcile(&Desired::Count(1)).await.unwrap();

    assert_eq!(rig.attempts(), posts, "no POST: {report}");
    assert_eq!(live(&rig), 1);
    assert!(report.converged, "{report}");
}

/// The same with a foreign item appearing while a create's outcome is unknown: desired 2, one
/// created, one unknown, a foreign one appears before the next list: 2 present, so nothing more
/// is created.
#[tokio::test]
async fn a_foreign_item_meeting_the_count_stops_creates() {
    let faults = Schedule::script([Fault::Pass, Fault::Reset, Fault::Reset]);
    let rig = rig_for_creates(ServerProfile::stripe(), faults, 0, fast_policy().with_max_attempts(1)).await;
    let gate = rig.proxy.gate(Some(http::Method::GET));
    let mut r = reconciler(&rig, "tenant-1");
    let run = tokio::spawn(async move { r.reconcile(&Desired::Count(2)).await });
    gate.until_held(1).await;
    gate.release(); // the first list: empty
    gate.until_held(1).await; // the second list waits: one created, one unknown
    assert_eq!((live(&rig), rig.attempts()), (1, 2));
    foreign_item(&rig, "foreign").await;
    gate.open();

    let report = run.await.unwrap().unwrap();

    assert_eq!(live(&rig), 2, "{report}");
    assert!(report.converged && report.max_observed <= 2, "{report}");
    assert_eq!(rig.cloud.created(), 2, "ours and the foreign one: {report}");
}

/// Defect: an expectation inherited from a killed keyless run was satisfied by a foreign item
/// created a year earlier, reported as created, and deleted by `--count 0 --prune` (without
/// `--prune-foreign`). An expectation is satisfied only by an item that was not there before the
/// create was sent.
#[tokio::test]
async fn an_inherited_expectation_never_claims_an_older_foreign_item() {
    let unavailable = Schedule::always(Fault::Status { status: 503, retry_after: None });
    let rig = rig_for_creates(ServerProfile::no_keys(), unavailable, 0, fast_policy().with_max_attempts(1)).await;
    let old = foreign_item(&rig, "from-last-year").await;
    rig.time.clock.advance(Duration::from_secs(365 * 24 * 3600));
    let store: std::sync::Arc<dyn idempotent_retry::journal::KeyStore> = std::sync::Arc::new(MemoryStore::new());
    // Desired 2, one present: one create, answered 503 by a proxy (it never arrived), then killed.
    kill_after_posts(&rig, reconciler_on(&rig, store.clone()), 2, 1).await;
    rig.proxy.set_schedule(Schedule::pass());

    let first = reconciler_on(&rig, store.clone()).prune(Prune::Ours).reconcile(&Desired::Count(2)).await.unwrap();
    assert!(!first.created.contains(&old), "the year-old item is not this run's: {first}");
    let down = reconciler_on(&rig, store).prune(Prune::Ours).reconcile(&Desired::Count(0)).await.unwrap();

    assert!(!down.deleted.contains(&old), "{down}");
    assert!(rig.cloud.resources(&replicas(APP, VM)).iter().any(|r| r.id == old), "never delete what is not ours");
}

/// Defect: a create whose answer did not match the expected identity was journaled with no
/// identity and reported as `created: []`, though the POST created an item; each re-run retired
/// the slot and created another. The item is ours: recorded, reported, never created again.
#[tokio::test]
async fn an_identity_mismatch_is_recorded_as_ours_and_not_created_again() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let store: std::sync::Arc<dyn idempotent_retry::journal::KeyStore> = std::sync::Arc::new(MemoryStore::new());
    let mismatched = || reconciler_on(&rig, store.clone()).expect_field("vm_uuid", "vm-other");

    let err = mismatched().reconcile(&Desired::Count(3)).await.unwrap_err();
    assert!(matches!(err.failure, StopReason::Identity(_)), "{err}");
    let made = rig.cloud.resources(&replicas(APP, VM));
    assert_eq!(made.len(), 1);
    assert_eq!(err.report.created, [made[0].id.clone()], "reported: {}", err.report);
    let recorded = store.list().await.unwrap();
    assert!(
        recorded.iter().any(|r| r.identity.as_ref().is_some_and(|i| i["id"] == made[0].id.as_str())),
        "recorded: {recorded:?}"
    );

    for _ in 0..2 {
        let again = mismatched().reconcile(&Desired::Count(3)).await.unwrap_err();
        assert!(matches!(again.failure, StopReason::Identity(_)), "{again}");
    }
    assert_eq!(rig.cloud.created(), 1, "no re-run created another");
}

/// Defect: against creates that keep failing, rounds followed one another with no wait, and once
/// the retry budget was empty every round sent a fresh first attempt: 619 POSTs in 90 s. Rounds
/// back off, the budget stops them, and the run ends by its deadline with a report.
#[tokio::test]
async fn failing_creates_back_off_respect_the_budget_and_end_by_the_deadline() {
    let unavailable = Schedule::always(Fault::Status { status: 503, retry_after: None });
    let rig = rig_for_creates(ServerProfile::stripe(), unavailable, 0, fast_policy()).await;
    let started = rig.time.clock.now();
    let mut r = reconciler(&rig, "tenant-1").deadline(Duration::from_secs(90));

    let err = r.reconcile(&Desired::Count(3)).await.unwrap_err();

    let elapsed = rig.time.clock.now().duration_since(started).unwrap();
    assert!(elapsed <= Duration::from_secs(91), "ended by its deadline: {elapsed:?}, {err}");
    let posts = rig.attempts();
    assert!(posts <= 120, "{posts} POSTs in 90 s: {err}");
    assert!(err.report.rounds <= 30, "{}", err.report);
    assert_eq!(err.report.requests as usize, rig.proxy.requests(), "the report counts every request");
    assert_eq!(live(&rig), 0);
}

/// A rig whose replicas provision for `provisioning`; `failing` of them fail.
async fn provisioning_rig(provisioning: Duration, failing: u32) -> Rig {
    let time = Time::new();
    let profile = ServerProfile::stripe();
    let cloud = FakeCloud::builder(profile.clone())
        .clock(time.clock.clone())
        .long_running(idempotent_retry::testing::LongRunning::Status, provisioning)
        .failing_provisioning(failing)
        .start()
        .await;
    let proxy = ChaosProxy::builder(cloud.address()).time_travel(time.clock.clone()).start().await;
    let client = client(profile.configure(time.layer().policy(fast_policy())));
    Rig { profile, cloud, proxy, client, time }
}

fn ready_when_running() -> idempotent_retry::wait::WaitFor {
    use idempotent_retry::backoff::{ExponentialBackoff, Jitter};
    idempotent_retry::wait::WaitFor::field("status")
        .target(["running"])
        .failure(["error"])
        .poll(ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(30)).jitter(Jitter::None))
}

#[tokio::test]
async fn items_count_toward_the_desired_state_once_ready_and_nothing_more_is_created() {
    let rig = provisioning_rig(Duration::from_secs(10), 0).await;
    let mut r = reconciler(&rig, "tenant-1").wait_for(ready_when_running());

    let report = r.reconcile(&Desired::Count(3)).await.unwrap();

    assert!(report.converged, "{report}");
    assert_eq!((report.created.len(), report.after, report.ready), (3, 3, Some(3)), "{report}");
    assert_eq!(rig.cloud.created(), 3, "starting items count: none created for them");
    // Created at 0 s (batches of 1 and 2), ready at 10 s: lists 1, 2, 4 s apart, then 8.
    assert_eq!(rig.time.delays(), [ms(1000), ms(2000), ms(4000), ms(8000)]);
    assert!(rig.cloud.resources(&replicas(APP, VM)).iter().all(|r| r.status == "running"));
}

#[tokio::test]
async fn an_item_that_will_never_be_ready_stops_the_run_and_is_kept() {
    let rig = provisioning_rig(Duration::from_secs(10), 1).await;
    let mut r = reconciler(&rig, "tenant-1").wait_for(ready_when_running()).prune(Prune::Ours);

    let err = r.reconcile(&Desired::Count(2)).await.unwrap_err();

    let failed = rig.cloud.resources(&replicas(APP, VM)).into_iter().find(|r| r.status == "error").unwrap();
    assert!(
        matches!(&err.failure, StopReason::NotReady { id, state } if *id == failed.id && *state == json!("error")),
        "{err}"
    );
    assert!(!err.report.converged && err.report.ready == Some(1), "{}", err.report);
    assert_eq!((rig.cloud.created(), live(&rig)), (2, 2), "not replaced, not deleted");
}

/// Issue 17, defect 6: `Desired::Count(1_000_000_000)` planned every create up front (gigabytes)
/// and a count past `u32` wrapped the slot indices. A count above `Desired::MAX` is refused
/// before anything is sent; below it, a round plans a bounded batch and the rest come later.
#[tokio::test]
async fn a_count_above_the_maximum_is_refused_and_large_counts_come_in_batches() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let mut r = reconciler(&rig, "tenant-1");
    for count in [Desired::MAX + 1, 1 << 32, usize::MAX] {
        let err = r.reconcile(&Desired::Count(count)).await.unwrap_err();
        assert!(
            matches!(err.failure, StopReason::TooMany { desired, max } if desired == count && max == Desired::MAX),
            "{err}"
        );
        assert_eq!(err.report.requests, 0);
    }
    assert!(rig.proxy.records().is_empty(), "nothing sent");

    // 1,500 creates: a first round of 1,024 at most, then the rest; exact.
    let mut r = reconciler(&rig, "tenant-1").concurrency(64);
    let report = r.reconcile(&Desired::Count(1500)).await.unwrap();
    assert!(report.converged, "{report}");
    assert_eq!((report.created.len(), live(&rig)), (1500, 1500));
    assert_eq!(rig.cloud.created(), 1500);
}

/// Issue 17, defect 4 (found against a third-party middleware through the real Terraform): a
/// run killed while a keyed create was on its way left the slot pending; the server made the
/// item. The next run counted it (desired met) without proving it ours, and a scale to zero
/// with pruning deleted every item but that one, reporting "not converged" to a provider that
/// ignored it: a replica of a destroyed set, in no state. A slot whose key is pending is
/// settled by resending that key (the server answers with the item) before anything is
/// pruned, so the item is proven ours and deleted.
#[tokio::test]
async fn the_item_of_a_killed_keyed_create_is_proven_ours_and_pruned() {
    let rig = rig_for_creates(ServerProfile::stripe(), Schedule::pass(), 0, fast_policy()).await;
    let store: std::sync::Arc<dyn idempotent_retry::journal::KeyStore> = std::sync::Arc::new(MemoryStore::new());
    let gate = rig.proxy.gate(Some(http::Method::POST));
    let mut first = reconciler_on(&rig, store.clone()).prune(Prune::Ours);
    let run = tokio::spawn(async move { first.reconcile(&Desired::Count(2)).await });
    gate.until_held(1).await;
    gate.release(); // slot 0: created and answered
    gate.until_held(1).await; // slot 1 on its way
    run.abort(); // the process dies
    let _ = run.await;
    gate.open(); // ... and its request lands: the server makes the item, nobody hears
    rig.proxy.settle().await;
    assert_eq!((live(&rig), rig.cloud.created()), (2, 2));

    let met = reconciler_on(&rig, store.clone()).prune(Prune::Ours).reconcile(&Desired::Count(2)).await.unwrap();
    assert!(met.converged && met.created.is_empty(), "two present: {met}");

    let gone = reconciler_on(&rig, store.clone()).prune(Prune::Ours).reconcile(&Desired::Count(0)).await.unwrap();

    assert!(gone.converged, "{gone}");
    assert_eq!(live(&rig), 0, "both were ours, and both are gone: {gone}");
    assert_eq!(rig.cloud.created(), 2, "settling the key created nothing: the server answered with the item");
    assert_eq!(gone.deleted.len(), 2);
}
