//! Logical operations against the fixture cloud: outcomes, key sources, payload pinning, and
//! scenarios 6 (refused before sending), 9 (key expired: read back), 12 (two-step create) and
//! 13 (a replay carries stale state).

use std::time::Duration;

use http::StatusCode;
use idempotent_retry::testing::{Fault, Schedule, ServerProfile};
use idempotent_retry::{
    IdempotencyKey, Operations,
    journal::{MemoryStore, OpState},
    operation::{OperationError, ReadBack, Resolution},
    time::Clock,
};
use serde_json::json;

use crate::support::*;

fn ops(rig: &Rig) -> Operations {
    Operations::new(rig.client.clone(), MemoryStore::new())
        .clock(rig.time.clock.clone())
        .sleeper(rig.time.sleeper.clone())
        .scope("tenant-42")
}

fn find_cvm(rig: &Rig, name: &str) -> ReadBack {
    ReadBack::find_in_list(rig.cvms(), "name", name)
}

fn posts(rig: &Rig) -> usize {
    rig.attempts()
}

#[tokio::test]
async fn created_then_replayed_with_a_derived_key_new_with_a_random_one() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let ops = ops(&rig);
    let create = || ops.operation("create-cvm/web-1").post(rig.cvms()).json(&json!({"name": "web-1"}));

    let first = create().derived_key(1).send().await.unwrap();
    let again = create().derived_key(1).send().await.unwrap();

    assert_eq!((first.resolution, again.resolution), (Resolution::Created, Resolution::Replayed));
    assert_eq!(first.identity["id"], again.identity["id"]);
    assert_eq!(first.key, Some(ops.derived_key("create-cvm/web-1", 1)));
    assert_eq!(rig.cloud.created(), 1);

    // A random key: a succeeded operation run again is a new operation.
    let random = ops.operation("create-cvm/web-2").post(rig.cvms()).json(&json!({"name": "web-2"}));
    let a = random.send().await.unwrap();
    let b = ops.operation("create-cvm/web-2").post(rig.cvms()).json(&json!({"name": "web-2"})).send().await.unwrap();
    assert_ne!(a.key, b.key);
    assert_eq!((a.resolution, b.resolution), (Resolution::Created, Resolution::Created));
    assert_eq!(rig.cloud.created_named("web-2"), 2);
}

#[tokio::test]
async fn derived_keys_include_the_scope() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let a =
        Operations::new(rig.client.clone(), MemoryStore::new()).scope("tenant-a").derived_key("create-cvm/web-1", 1);
    let b =
        Operations::new(rig.client.clone(), MemoryStore::new()).scope("tenant-b").derived_key("create-cvm/web-1", 1);
    let next =
        Operations::new(rig.client.clone(), MemoryStore::new()).scope("tenant-a").derived_key("create-cvm/web-1", 2);
    assert_ne!(a, b);
    assert_ne!(a, next, "a new generation is a new operation");
}

/// 6. Same key, other payload: refused before sending, naming both operations.
#[tokio::test]
async fn s06_a_key_pinned_to_another_payload_is_refused_before_sending() {
    let rig = Rig::new(ServerProfile::ietf(), Schedule::pass()).await;
    let ops = ops(&rig);
    let key = IdempotencyKey::new("deploy-2f6c9a1").unwrap();
    ops.operation("deploy/api").post(rig.cvms()).json(&json!({"name": "api"})).key(key.clone()).send().await.unwrap();

    let err = ops
        .operation("deploy/web")
        .post(rig.cvms())
        .json(&json!({"name": "web"}))
        .key(key.clone())
        .send()
        .await
        .unwrap_err();

    assert!(err.is_payload_mismatch(), "{err}");
    let message = err.to_string();
    assert!(message.contains("`deploy/web`") && message.contains("`deploy/api`"), "{message}");
    assert!(!err.may_have_been_applied());
    assert_eq!(posts(&rig), 1, "nothing was sent");

    // Same key, same payload: fine, and the server replays.
    let again =
        ops.operation("deploy/api").post(rig.cvms()).json(&json!({"name": "api"})).key(key).send().await.unwrap();
    assert_eq!(again.resolution, Resolution::Created, "the IETF profile replays without a marker");
    assert_eq!(rig.cloud.created(), 1);

    // A derived key with a changed payload is refused too; a new generation is a new operation.
    let derived = |generation, name: &str| {
        ops.operation("create-cvm/x").post(rig.cvms()).json(&json!({"name": name})).derived_key(generation).send()
    };
    derived(1, "x").await.unwrap();
    assert!(derived(1, "x-renamed").await.unwrap_err().is_payload_mismatch());
    assert_eq!(derived(2, "x-renamed").await.unwrap().resolution, Resolution::Created);
}

/// 9. The key expires mid-retry: past the declared retention it is not resent; a read-back
/// settles it.
#[tokio::test]
async fn s09_an_expired_key_is_settled_by_reading_back() {
    for (first_faults, applied) in [([Fault::Lose, Fault::Lose], true), ([Fault::Reset, Fault::Reset], false)] {
        let rig = Rig::with_policy(
            ServerProfile::stripe(),
            Schedule::script(first_faults),
            fast_policy().with_max_attempts(2),
        )
        .await;
        let ops = ops(&rig);
        let create = || ops.operation("create-cvm/web-1").post(rig.cvms()).json(&json!({"name": "web-1"}));

        let err = create().send().await.unwrap_err();
        assert!(err.may_have_been_applied(), "{err}");
        let record = ops.store().get("create-cvm/web-1").await.unwrap().unwrap();
        assert_eq!(record.state, OpState::Unknown);
        let first_key = record.key.clone();

        // A day and more later: the server has forgotten the key.
        rig.time.clock.advance(Duration::from_secs(25 * 3600));
        let sent_before = posts(&rig);

        // Without a read-back the key is not resent.
        let err = create().send().await.unwrap_err();
        assert!(matches!(err, OperationError::Unknown { .. }), "{err}");
        assert_eq!(posts(&rig), sent_before, "nothing resent with an expired key");

        let done = create().read_back(find_cvm(&rig, "web-1")).send().await.unwrap();

        assert_eq!(rig.cloud.created_named("web-1"), 1, "applied first time: {applied}");
        if applied {
            assert_eq!(done.resolution, Resolution::Recovered);
            assert_eq!(posts(&rig), sent_before, "found: nothing sent");
        } else {
            assert_eq!(done.resolution, Resolution::Created);
            assert_ne!(done.key, first_key, "a fresh create gets a fresh key");
        }
        assert_eq!(ops.store().get("create-cvm/web-1").await.unwrap().unwrap().state, OpState::Succeeded);
    }
}

/// 12. Two-step create (provision, then commit) on an endpoint without keys, the commit's
/// response lost: look up before committing again; one resource.
#[tokio::test]
async fn s12_two_step_create_reads_back_before_committing_again() {
    let rig = Rig::new(ServerProfile::no_keys(), Schedule::script([Fault::Pass, Fault::Lose])).await;
    let ops = ops(&rig);

    let provision = ops
        .operation("provision/web-1")
        .post(format!("{}/provision", rig.cvms()))
        .json(&json!({"name": "web-1", "app_id": "app-9"}))
        .no_key()
        .send()
        .await
        .unwrap();
    let hash = provision.resource["compose_hash"].as_str().unwrap().to_owned();
    let commit = ops
        .operation("commit/web-1")
        .post(rig.cvms())
        .json(&json!({"compose_hash": hash}))
        .no_key()
        .read_back(find_cvm(&rig, "web-1"))
        .expect("app_id", "app-9")
        .send()
        .await
        .unwrap();

    assert_eq!(commit.resolution, Resolution::Recovered);
    assert_eq!(commit.identity["app_id"], "app-9");
    assert_eq!(rig.cloud.created(), 1);
    assert_eq!(posts(&rig), 2, "provision once, commit once");
}

/// 13. A replay carries the state of its time: keep its identity, re-read the state.
#[tokio::test]
async fn s13_a_replay_is_refreshed_by_the_read_back() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let ops = ops(&rig);
    let create = || ops.operation("create-cvm/web-1").post(rig.cvms()).json(&json!({"name": "web-1"})).derived_key(1);
    let first = create().send().await.unwrap();
    assert_eq!(first.resource["status"], "starting");
    rig.cloud.set_status(first.identity["id"].as_str().unwrap(), "running");

    let stale = create().send().await.unwrap();
    let fresh = create().read_back(find_cvm(&rig, "web-1")).send().await.unwrap();

    assert_eq!((stale.resolution, fresh.resolution), (Resolution::Replayed, Resolution::Replayed));
    assert_eq!(stale.resource["status"], "starting", "the server replays what it stored");
    assert_eq!(fresh.resource["status"], "running", "re-read");
    assert_eq!(fresh.identity["id"], first.identity["id"]);
    assert_eq!(rig.cloud.created(), 1);
}

#[tokio::test]
async fn a_keyless_rerun_reads_back_before_sending_again() {
    let rig = Rig::new(ServerProfile::no_keys(), Schedule::script([Fault::Lose])).await;
    let ops = ops(&rig);
    let create = || ops.operation("create-cvm/web-1").post(rig.cvms()).json(&json!({"name": "web-1"})).no_key();

    let err = create().send().await.unwrap_err();
    assert!(err.may_have_been_applied(), "{err}");

    let err = create().send().await.unwrap_err();
    assert!(matches!(err, OperationError::Unknown { .. }), "no read-back, no resend: {err}");
    assert_eq!(posts(&rig), 1);

    let done = create().read_back(find_cvm(&rig, "web-1")).send().await.unwrap();
    assert_eq!(done.resolution, Resolution::Recovered);
    assert_eq!((posts(&rig), rig.cloud.created()), (1, 1));
}

#[tokio::test]
async fn a_keyless_lost_response_not_found_is_created_once() {
    // Reset before arriving: the read-back finds nothing, and one fresh send is safe.
    let rig = Rig::new(ServerProfile::no_keys(), Schedule::script([Fault::Reset])).await;
    let ops = ops(&rig);

    let done = ops
        .operation("create-cvm/web-1")
        .post(rig.cvms())
        .json(&json!({"name": "web-1"}))
        .no_key()
        .read_back(find_cvm(&rig, "web-1"))
        .send()
        .await
        .unwrap();

    assert_eq!(done.resolution, Resolution::Created);
    assert_eq!((posts(&rig), rig.cloud.created()), (2, 1));
    assert_eq!(rig.time.delays().last(), Some(&Operations::DEFAULT_IN_FLIGHT_WINDOW), "waited for stragglers first");
}

/// A keyless create that timed out may still be on its way (queued at a proxy): a read-back
/// that finds nothing then proves nothing. The read-back that could lead to sending again waits
/// until the in-flight window has passed since the send; the straggler lands before it, and is
/// found instead of duplicated.
#[tokio::test]
async fn a_keyless_straggler_is_found_not_duplicated() {
    let policy = fast_policy().with_attempt_timeout(Duration::from_secs(2));
    let rig = Rig::with_policy(ServerProfile::no_keys(), Schedule::pass(), policy).await;
    let ops = ops(&rig);
    let gate = rig.proxy.gate(None);
    let sent = rig.time.clock.now();
    let run = {
        let ops = ops.clone();
        let url = rig.cvms();
        let find = find_cvm(&rig, "web-1");
        tokio::spawn(async move {
            ops.operation("create-cvm/web-1")
                .post(url)
                .json(&json!({"name": "web-1"}))
                .no_key()
                .read_back(find)
                .send()
                .await
        })
    };
    gate.until_held(1).await;
    rig.time.clock.advance(Duration::from_secs(2)); // the attempt times out; the request is still on its way
    gate.until_held(2).await; // the read-back
    let read_back_at = rig.time.clock.now();
    assert!(gate.release_oldest()); // the straggler lands first
    while rig.cloud.created() == 0 {
        tokio::task::yield_now().await;
    }
    gate.open();

    let done = run.await.unwrap().unwrap();

    assert!(read_back_at.duration_since(sent).unwrap() >= Operations::DEFAULT_IN_FLIGHT_WINDOW, "the read-back waited");
    assert_eq!(done.resolution, Resolution::Recovered);
    assert_eq!((posts(&rig), rig.cloud.created()), (1, 1));
}

#[tokio::test]
async fn identity_is_declared_and_checked() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let ops = ops(&rig);
    let send = |name: &str| ops.operation(name).post(rig.cvms()).json(&json!({"name": name, "app_id": "app-1"}));

    let done = send("a").identity(["id", "vm_uuid"]).expect("app_id", "app-1").send().await.unwrap();
    assert_eq!(done.identity.keys().collect::<Vec<_>>(), ["app_id", "id", "vm_uuid"]);

    let err = send("b").expect("app_id", "app-9").send().await.unwrap_err();
    match &err {
        OperationError::IdentityMismatch(m) => assert_eq!((m.field.as_str(), &m.found), ("app_id", &json!("app-1"))),
        other => panic!("{other}"),
    }
    assert!(err.may_have_been_applied());
    let err = send("c").identity(["serial"]).send().await.unwrap_err();
    assert!(matches!(err, OperationError::IdentityMismatch(_)), "{err}");
}

#[tokio::test]
async fn rejections_and_bad_options() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let ops = ops(&rig);

    let err =
        ops.operation("bad-route").post(format!("{}/nowhere", rig.proxy.uri())).body("{}").send().await.unwrap_err();
    assert!(matches!(&err, OperationError::Rejected { status, .. } if *status == StatusCode::NOT_FOUND), "{err}");
    assert_eq!(ops.store().get("bad-route").await.unwrap().unwrap().state, OpState::NotApplied);

    let key = IdempotencyKey::new("k-123").unwrap();
    let err = ops.operation("x").post(rig.cvms()).body("{}").key(key).no_key().send().await.unwrap_err();
    assert!(matches!(err, OperationError::InvalidOptions { .. }), "{err}");
    let err = ops.operation("x").body("{}").send().await.unwrap_err();
    assert!(matches!(err, OperationError::InvalidOptions { .. }), "{err}");
    assert_eq!(posts(&rig), 1, "only the rejected one was sent");
}

#[tokio::test]
async fn a_client_without_the_layer_is_reported() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let bare = reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).build();
    let ops = Operations::new(bare, MemoryStore::new());

    let err = ops.operation("x").post(rig.cvms()).json(&json!({"name": "x"})).send().await.unwrap_err();

    assert!(err.to_string().contains("no IdempotentRetry layer"), "{err}");
    assert_eq!(ops.store().get("x").await.unwrap().unwrap().state, OpState::Unknown);
    // The request options a layer would have read went nowhere: no key on the wire.
    assert_eq!(rig.proxy.records()[0].key(&rig.profile), None);
}

/// What cannot be sent is an invalid operation: nothing is journaled and nothing is sent, so
/// a keyless caller is never told it "may have been applied".
#[tokio::test]
async fn what_cannot_be_sent_is_invalid_and_not_journaled() {
    let rig = Rig::new(ServerProfile::no_keys(), Schedule::pass()).await;
    let ops = ops(&rig);
    for url in ["not a url", "http://", "http://[::1", "file:///x", "/cvms"] {
        let err = ops.operation(url).post(url).json(&json!({})).no_key().send().await.unwrap_err();
        assert!(matches!(err, OperationError::InvalidOptions { .. }), "{url}: {err}");
        assert!(!err.may_have_been_applied());
        assert!(ops.store().get(url).await.unwrap().is_none(), "{url}: nothing journaled");
    }
    let zero = fast_policy().with_deadline(Duration::ZERO);
    let err = ops.operation("zero").post(rig.cvms()).json(&json!({})).no_key().policy(zero).send().await.unwrap_err();
    assert!(matches!(err, OperationError::InvalidOptions { .. }), "{err}");
    assert!(err.to_string().contains("deadline is zero"), "{err}");
    assert!(ops.store().get("zero").await.unwrap().is_none(), "nothing journaled");
    assert_eq!(posts(&rig), 0);
}

/// Defect: the retention check ran only for resumed keys. A derived (or explicit) key that
/// succeeded was resent 49 h later, after the server had forgotten it, and created a second
/// resource. The journal knew it had succeeded: a re-run never creates a second resource.
#[tokio::test]
async fn a_succeeded_fixed_key_past_retention_is_not_resent() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let ops = ops(&rig);
    let create = || ops.operation("create-cvm/web-1").post(rig.cvms()).json(&json!({"name": "web-1"})).derived_key(1);
    let first = create().send().await.unwrap();
    assert_eq!(first.resolution, Resolution::Created);

    // Within the retention the server replays.
    rig.time.clock.advance(Duration::from_secs(20 * 3600));
    assert_eq!(create().send().await.unwrap().resolution, Resolution::Replayed);

    // 49 h after the key was first used, the server has forgotten it.
    rig.time.clock.advance(Duration::from_secs(29 * 3600));
    let sent = posts(&rig);
    let again = create().send().await.unwrap();
    assert_ne!(again.resolution, Resolution::Created, "{again:?}");
    assert_eq!(again.identity["id"], first.identity["id"], "what the journal recorded");
    assert_eq!(posts(&rig), sent, "nothing resent");
    let fresh = create().read_back(find_cvm(&rig, "web-1")).send().await.unwrap();
    assert_eq!((fresh.resolution, &fresh.identity["id"]), (Resolution::Recovered, &first.identity["id"]));
    assert_eq!(rig.cloud.created(), 1);
}

/// A store whose `finish` fails: the journal broke after the request went out.
#[derive(Debug, Default)]
struct FinishFails(MemoryStore);

#[async_trait::async_trait]
impl idempotent_retry::journal::KeyStore for FinishFails {
    async fn begin(
        &self,
        intent: &idempotent_retry::journal::store::Intent<'_>,
    ) -> Result<idempotent_retry::journal::store::Begun, idempotent_retry::journal::JournalError> {
        self.0.begin(intent).await
    }
    async fn finish(
        &self,
        _: &str,
        _: &idempotent_retry::journal::store::Finish,
    ) -> Result<bool, idempotent_retry::journal::JournalError> {
        Err(idempotent_retry::journal::JournalError::Corrupt { path: "/tmp/broken.sqlite3".into() })
    }
    async fn get(
        &self,
        operation: &str,
    ) -> Result<Option<idempotent_retry::journal::Record>, idempotent_retry::journal::JournalError> {
        self.0.get(operation).await
    }
    async fn list(&self) -> Result<Vec<idempotent_retry::journal::Record>, idempotent_retry::journal::JournalError> {
        self.0.list().await
    }
    async fn forget(&self, operation: &str) -> Result<bool, idempotent_retry::journal::JournalError> {
        self.0.forget(operation).await
    }
}

/// When the journal fails after the send, the error says the request went out (it may have
/// been applied) and what the journal said: never "nothing was sent".
#[tokio::test]
async fn a_journal_failing_after_the_send_says_it_was_sent() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let ops = Operations::new(rig.client.clone(), FinishFails::default()).clock(rig.time.clock.clone());

    let err =
        ops.operation("create-cvm/web-1").post(rig.cvms()).json(&json!({"name": "web-1"})).send().await.unwrap_err();

    assert!(matches!(err, OperationError::Unrecorded { .. }), "{err}");
    assert!(err.may_have_been_applied());
    assert!(err.idempotency_key().is_some());
    let message = err.to_string();
    assert!(message.contains("was sent") && message.contains("/tmp/broken.sqlite3"), "{message}");
    assert!(!message.contains("nothing was sent"), "{message}");
    assert_eq!(rig.cloud.created(), 1);
}

/// Found by the model test: a derived-key run that settled an earlier run by reading back left
/// nothing under its own key, and the next run with that key created a second resource. The
/// recovery is recorded under the key as never sent: the next run sends nothing.
#[tokio::test]
async fn a_recovery_is_remembered_under_the_fixed_key_of_the_run_that_found_it() {
    let rig =
        Rig::with_policy(ServerProfile::stripe(), Schedule::script([Fault::Lose]), fast_policy().with_max_attempts(1))
            .await;
    let ops = ops(&rig);
    let create = || ops.operation("create-cvm/web-1").post(rig.cvms()).json(&json!({"name": "web-1"}));
    let lost = create().random_key().send().await.unwrap_err();
    assert!(lost.may_have_been_applied(), "{lost}");

    let found = create().derived_key(1).read_back(find_cvm(&rig, "web-1")).send().await.unwrap();
    assert_eq!(found.resolution, Resolution::Recovered);
    let sent = posts(&rig);
    let again = create().derived_key(1).send().await.unwrap();

    assert_eq!(again.resolution, Resolution::Recorded, "{again:?}");
    assert_eq!(again.identity["id"], found.identity["id"]);
    assert_eq!((posts(&rig), rig.cloud.created()), (sent, 1), "nothing sent, one CVM");
}

/// Found by the model test: when the run's own key is pinned to another payload, the recovery
/// still stands (it used to be reported as a payload mismatch, "nothing was sent").
#[tokio::test]
async fn a_recovery_stands_when_the_runs_key_is_pinned_elsewhere() {
    let rig = Rig::with_policy(
        ServerProfile::stripe(),
        Schedule::script([Fault::Pass, Fault::Lose]),
        fast_policy().with_max_attempts(1),
    )
    .await;
    let ops = ops(&rig);
    let key = IdempotencyKey::new("deploy-1").unwrap();
    let send = |name: &str| ops.operation("deploy/api").post(rig.cvms()).json(&json!({"name": name}));
    send("v1").key(key.clone()).send().await.unwrap();
    assert!(send("v2").random_key().send().await.unwrap_err().may_have_been_applied());

    let done = send("v2").key(key).read_back(find_cvm(&rig, "v2")).send().await.unwrap();

    assert_eq!(done.resolution, Resolution::Recovered);
    assert_eq!((rig.cloud.created_named("v1"), rig.cloud.created_named("v2")), (1, 1));
}

/// Issue 17, defect 9: against a server that marks no replays, a create answered after the key
/// was sent before (a lost answer, or a key resumed from the journal) is told as what it may be,
/// a replay; a 429 (refused unprocessed) before it is not a send, and a first answer is a create.
#[tokio::test]
async fn an_answer_to_a_key_sent_before_may_be_a_replay() {
    use idempotent_retry::RetryOutcome;
    let rig = Rig::new(ServerProfile::bencher(), Schedule::script([Fault::Lose])).await;
    let ops = ops(&rig);
    let create = |name: &str| ops.operation(format!("report/{name}")).post(rig.cvms()).json(&json!({ "name": name }));

    let retried = create("a").send().await.unwrap();
    assert_eq!((retried.resolution, retried.may_be_replay, retried.attempts), (Resolution::Created, true, 2));

    rig.proxy.set_schedule(Schedule::script([Fault::Status { status: 429, retry_after: None }]));
    let throttled = create("b").send().await.unwrap();
    assert_eq!((throttled.attempts, throttled.may_be_replay), (2, false), "a 429 was not processed");

    rig.proxy.set_schedule(Schedule::script([Fault::Lose]));
    let lost = create("c").policy(fast_policy().with_max_attempts(1)).send().await.unwrap_err();
    assert!(lost.may_have_been_applied());
    let resumed = create("c").send().await.unwrap();
    assert_eq!((resumed.resolution, resumed.resumed, resumed.may_be_replay), (Resolution::Created, true, true));

    let first = create("d").send().await.unwrap();
    assert!(!first.may_be_replay);
    assert_eq!(rig.cloud.created(), 4, "one report each");

    // The layer says the same on the response.
    rig.proxy.set_schedule(Schedule::script([Fault::Lose]));
    let response = rig.create("e").await.unwrap();
    let outcome = RetryOutcome::of(&response).unwrap();
    assert_eq!((outcome.replayed, outcome.may_be_replay), (false, true));
}
