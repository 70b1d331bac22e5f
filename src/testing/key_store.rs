//! The journal's rules as one check any [`KeyStore`] must pass: the crate's two stores run it,
//! and so can a store of your own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::journal::store::{Begun, Claim, Finish, Intent, KeyPlan};
use crate::journal::{JournalError, KeyStore, OpState, fingerprint};
use crate::key::IdempotencyKey;
use crate::wait::Handle;

const URL: &str = "https://api.test/cvms";
const T0: SystemTime = SystemTime::UNIX_EPOCH;

/// Runs the journal's rules (the table on [`KeyStore`]) against stores from `make`, one fresh
/// store per rule, and panics with the rule's name at the first one broken.
///
/// The rules include the sequences that once broke a store: a key index losing a key another
/// operation still held, a late `finish` overwriting a newer run's record, a re-run with another
/// key source replacing an unsettled record. Each rule runs as a task of the current tokio
/// runtime.
///
/// # Examples
///
/// ```
/// use idempotent_retry::journal::MemoryStore;
/// use idempotent_retry::testing::check_key_store;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// check_key_store(|| async { MemoryStore::new() }).await;
/// # }
/// ```
///
/// # Panics
///
/// When the store breaks a rule, or fails.
pub async fn check_key_store<S, F, Fut>(mut make: F)
where
    S: KeyStore + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    macro_rules! rules {
        ($($name:literal => $rule:ident),* $(,)?) => {
            [$(($name, (|store: Arc<dyn KeyStore>| Box::pin(async move { $rule(&*store).await })) as Rule)),*]
        };
    }
    let rules = rules![
        "a random key is resumed while unsettled and renewed after success" => random_keys_resume_then_renew,
        "a pending random operation with another payload is refused" => random_key_pinned_to_payload,
        "a fixed key is pinned to one payload across operations" => fixed_keys_pinned_across_operations,
        "a key stays pinned while any operation holds it" => pinning_survives_another_holder_moving_on,
        "an unsettled record survives other key sources" => unsettled_records_survive_other_key_sources,
        "a late finish never overwrites a newer run" => late_finish_is_refused,
        "a fixed key that succeeded is reported, not rewritten" => succeeded_fixed_key_is_reported,
        "a failed fixed key is sent again, same payload only" => failed_fixed_key_is_sent_again,
        "a fixed key's run is remembered after other runs of the operation" => fixed_keys_are_remembered,
        "keyless runs after a settled one get claims of their own" => keyless_runs_get_distinct_claims,
        "forgetting settles an unsettled record" => forget_settles,
        "a waiting record is resumed by any re-run and never sent again" => waiting_records_are_resumed,
        "an operation that happens once is answered from its success" => once_is_answered_from_success,
        "a run that waited for another is answered with its success" => waited_for_run_is_the_answer,
    ];
    for (name, rule) in rules {
        let store: Arc<dyn KeyStore> = Arc::new(make().await);
        if let Err(failed) = tokio::spawn(rule(store)).await {
            let why = match failed.try_into_panic() {
                Ok(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            panic!("the key store breaks the rule \"{name}\": {why}");
        }
    }
}

/// One rule, checked against one fresh store.
type Rule = fn(Arc<dyn KeyStore>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

fn fp(body: &str) -> String {
    fingerprint("POST", URL, body.as_bytes())
}

async fn begin(
    store: &dyn KeyStore,
    op: &str,
    body: &str,
    key: KeyPlan,
    now: SystemTime,
) -> Result<Begun, JournalError> {
    let fingerprint = fp(body);
    store.begin(&Intent::new(op, "POST", URL, &fingerprint, key, now)).await
}

/// Begins, expecting a send; returns the claim and whether it resumed.
async fn send(store: &dyn KeyStore, op: &str, body: &str, key: KeyPlan, now: SystemTime) -> (Claim, bool) {
    match begin(store, op, body, key, now).await.expect("the store works") {
        Begun::Send { claim, resumed } => (claim, resumed),
        other => panic!("{op}: expected a send, got {other:?}"),
    }
}

async fn finish(store: &dyn KeyStore, op: &str, claim: &Claim, state: OpState) -> bool {
    let finish = Finish::new(claim.clone(), state, T0).status(Some(201)).identity(Some(json!({"id": op})));
    store.finish(op, &finish).await.expect("the store works")
}

fn fixed(key: &str) -> KeyPlan {
    KeyPlan::Fixed(IdempotencyKey::new(key).expect("a valid key"))
}

fn is_mismatch(result: Result<Begun, JournalError>) -> bool {
    matches!(result, Err(JournalError::PayloadMismatch(_)))
}

async fn random_keys_resume_then_renew(store: &dyn KeyStore) {
    let (first, resumed) = send(store, "op", "{}", KeyPlan::Random, T0).await;
    assert!(!resumed && first.key.is_some());
    assert_eq!(send(store, "op", "{}", KeyPlan::Random, T0).await, (first.clone(), true), "resumed");
    assert!(finish(store, "op", &first, OpState::Succeeded).await);
    let (next, resumed) = send(store, "op", "{}", KeyPlan::Random, T0).await;
    assert!(next.key != first.key && !resumed, "a succeeded operation run again is a new run");
}

async fn random_key_pinned_to_payload(store: &dyn KeyStore) {
    send(store, "op", "{}", KeyPlan::Random, T0).await;
    assert!(is_mismatch(begin(store, "op", r#"{"a":1}"#, KeyPlan::Random, T0).await));
}

async fn fixed_keys_pinned_across_operations(store: &dyn KeyStore) {
    let (claim, _) = send(store, "deploy/a", "{}", fixed("deploy-abc"), T0).await;
    finish(store, "deploy/a", &claim, OpState::Succeeded).await;
    match begin(store, "deploy/b", r#"{"b":1}"#, fixed("deploy-abc"), T0).await {
        Err(JournalError::PayloadMismatch(m)) => {
            let message = m.to_string();
            assert!(message.contains("`deploy/b`") && message.contains("`deploy/a`"), "names both: {message}");
            assert!(!message.contains("deploy-abc"), "the key is fingerprinted: {message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The same payload under another name shares the key.
    send(store, "deploy/c", "{}", fixed("deploy-abc"), T0).await;
}

async fn pinning_survives_another_holder_moving_on(store: &dyn KeyStore) {
    // A and B hold the key with one payload; B moves on to another key; the key is still A's.
    send(store, "a", "{}", fixed("k"), T0).await;
    let (b, _) = send(store, "b", "{}", fixed("k"), T0).await;
    finish(store, "b", &b, OpState::Succeeded).await;
    send(store, "b", "{}", fixed("k2"), T0).await;
    assert!(is_mismatch(begin(store, "c", r#"{"other":1}"#, fixed("k"), T0).await), "A still holds k");
    // A forgotten, B still remembers it used k; both forgotten, k is free.
    store.forget("a").await.expect("the store works");
    assert!(is_mismatch(begin(store, "c", r#"{"other":1}"#, fixed("k"), T0).await), "B's settled run with k");
    store.forget("b").await.expect("the store works");
    send(store, "c", r#"{"other":1}"#, fixed("k"), T0).await;
}

async fn unsettled_records_survive_other_key_sources(store: &dyn KeyStore) {
    let (keyless, _) = send(store, "op", "{}", KeyPlan::None, T0).await;
    finish(store, "op", &keyless, OpState::Unknown).await;
    for plan in [KeyPlan::Random, fixed("mine"), KeyPlan::None] {
        match begin(store, "op", "{}", plan.clone(), T0).await.expect("the store works") {
            Begun::Unsettled(r) => assert_eq!((r.key, r.state), (None, OpState::Unknown), "{plan:?}"),
            other => panic!("{plan:?}: expected unsettled, got {other:?}"),
        }
    }
    let record = store.get("op").await.expect("the store works").expect("kept");
    assert_eq!((record.key, record.state), (None, OpState::Unknown), "nothing was written over it");
    // A keyed pending record meets another fixed key, or none: unsettled as well.
    let (keyed, _) = send(store, "keyed", "{}", fixed("k1"), T0).await;
    for plan in [fixed("k2"), KeyPlan::None] {
        assert!(matches!(begin(store, "keyed", "{}", plan, T0).await, Ok(Begun::Unsettled(_))));
    }
    // Settled by a read-back that found nothing: the next run goes ahead.
    assert!(finish(store, "op", &keyless, OpState::NotApplied).await);
    send(store, "op", "{}", KeyPlan::Random, T0).await;
    assert!(finish(store, "keyed", &keyed, OpState::NotApplied).await);
    assert_eq!(send(store, "keyed", "{}", fixed("k2"), T0).await.0.key.map(|k| k.to_string()).as_deref(), Some("k2"));
}

async fn late_finish_is_refused(store: &dyn KeyStore) {
    // Run 1 sends k1 and is slow; the operation is forgotten and run 2 starts with k2.
    let (old, _) = send(store, "op", "{}", KeyPlan::Random, T0).await;
    store.forget("op").await.expect("the store works");
    let (new, _) = send(store, "op", "{}", KeyPlan::Random, T0).await;
    assert!(!finish(store, "op", &old, OpState::Succeeded).await, "run 1 reports late: refused");
    let record = store.get("op").await.expect("the store works").expect("kept");
    assert_eq!((record.key, record.state, record.identity), (new.key.clone(), OpState::Pending, None));
    // The same with fixed keys: a new key after success, and the old run's late report.
    let (k1, _) = send(store, "fixed", "{}", fixed("k1"), T0).await;
    finish(store, "fixed", &k1, OpState::Succeeded).await;
    let (k2, _) = send(store, "fixed", "{}", fixed("k2"), T0).await;
    assert!(!finish(store, "fixed", &k1, OpState::NotApplied).await);
    assert!(finish(store, "fixed", &k2, OpState::Succeeded).await);
}

async fn succeeded_fixed_key_is_reported(store: &dyn KeyStore) {
    let (claim, _) = send(store, "op", "{}", fixed("k"), T0).await;
    finish(store, "op", &claim, OpState::Succeeded).await;
    let later = T0 + Duration::from_secs(7 * 24 * 3600);
    match begin(store, "op", "{}", fixed("k"), later).await.expect("the store works") {
        Begun::Succeeded(r) => {
            assert_eq!((r.claim(), r.state, r.identity), (claim.clone(), OpState::Succeeded, Some(json!({"id": "op"}))))
        }
        other => panic!("expected succeeded, got {other:?}"),
    }
    let record = store.get("op").await.expect("the store works").expect("kept");
    assert_eq!((record.state, record.updated_at), (OpState::Succeeded, T0), "nothing was written");
    assert!(is_mismatch(begin(store, "op", r#"{"a":1}"#, fixed("k"), later).await), "still pinned");
}

async fn failed_fixed_key_is_sent_again(store: &dyn KeyStore) {
    let (claim, _) = send(store, "op", "{}", fixed("k"), T0).await;
    finish(store, "op", &claim, OpState::NotApplied).await;
    let later = T0 + Duration::from_secs(60);
    assert_eq!(
        send(store, "op", "{}", fixed("k"), later).await,
        (claim, false),
        "the key's age counts from its first use"
    );
    assert!(is_mismatch(begin(store, "op", r#"{"a":1}"#, fixed("k"), later).await));
}

async fn fixed_keys_are_remembered(store: &dyn KeyStore) {
    // A fixed key succeeds; later runs of the operation use other keys (random, none, another
    // fixed one) and replace its record; the fixed key named again is still the run it was.
    let (claim, _) = send(store, "op", "{}", fixed("k"), T0).await;
    finish(store, "op", &claim, OpState::Succeeded).await;
    for plan in [KeyPlan::Random, KeyPlan::None, fixed("k2")] {
        let (other, _) = send(store, "op", "{}", plan, T0).await;
        finish(store, "op", &other, OpState::Succeeded).await;
    }
    match begin(store, "op", "{}", fixed("k"), T0).await.expect("the store works") {
        Begun::Succeeded(r) => assert_eq!((r.claim(), r.identity), (claim, Some(json!({"id": "op"})))),
        other => panic!("expected the remembered success, got {other:?}"),
    }
    assert!(is_mismatch(begin(store, "op", r#"{"a":1}"#, fixed("k"), T0).await), "still pinned to its payload");
    assert!(is_mismatch(begin(store, "other", r#"{"a":1}"#, fixed("k"), T0).await), "for other operations too");
    // A random key is not remembered: it never comes back.
    assert!(store.get("op").await.expect("the store works").is_some_and(|r| r.fixed_key));
    // Forgetting lets all of it go.
    store.forget("op").await.expect("the store works");
    send(store, "other", r#"{"a":1}"#, fixed("k"), T0).await;
}

async fn keyless_runs_get_distinct_claims(store: &dyn KeyStore) {
    let (first, _) = send(store, "op", "{}", KeyPlan::None, T0).await;
    finish(store, "op", &first, OpState::Succeeded).await;
    let (second, _) = send(store, "op", "{}", KeyPlan::None, T0).await;
    assert_ne!(first, second, "two keyless runs at the same instant");
    assert!(!finish(store, "op", &first, OpState::NotApplied).await, "the first run's report is not the second's");
}

async fn forget_settles(store: &dyn KeyStore) {
    let (claim, _) = send(store, "op", "{}", KeyPlan::None, T0).await;
    finish(store, "op", &claim, OpState::Unknown).await;
    assert!(store.forget("op").await.expect("the store works"));
    assert!(!store.forget("op").await.expect("the store works"));
    assert!(store.get("op").await.expect("the store works").is_none());
    send(store, "op", "{}", KeyPlan::Random, T0).await;
}

async fn waiting_records_are_resumed(store: &dyn KeyStore) {
    let handle = Handle::Resource { url: "https://ci:s3cret@api.test/cvms/c1?token=t&view=full".into() };
    let (claim, _) = send(store, "op", "{}", KeyPlan::Random, T0).await;
    let waiting = Finish::new(claim.clone(), OpState::Waiting, T0)
        .status(Some(201))
        .identity(Some(json!({"id": "c1"})))
        .handle(Some(&handle));
    assert!(store.finish("op", &waiting).await.expect("the store works"));
    let stored = Handle::Resource { url: "https://api.test/cvms/c1?token=***&view=full".into() };
    for plan in [KeyPlan::Random, fixed("another-key"), KeyPlan::None] {
        match begin(store, "op", "{}", plan.clone(), T0).await.expect("the store works") {
            Begun::Waiting(r) => {
                assert_eq!(
                    (r.claim(), r.state, r.handle),
                    (claim.clone(), OpState::Waiting, Some(stored.clone())),
                    "{plan:?}"
                )
            }
            other => panic!("{plan:?}: expected to resume the wait, got {other:?}"),
        }
    }
    assert!(is_mismatch(begin(store, "op", r#"{"other":1}"#, KeyPlan::Random, T0).await), "another payload is refused");
    let record = store.get("op").await.expect("the store works").expect("kept");
    assert_eq!((record.state, record.identity), (OpState::Waiting, Some(json!({"id": "c1"}))), "nothing was written");
    assert!(finish(store, "op", &claim, OpState::Succeeded).await, "the wait ends");
    let record = store.get("op").await.expect("the store works").expect("kept");
    assert_eq!((record.state, record.handle), (OpState::Succeeded, None));
}

async fn once_is_answered_from_success(store: &dyn KeyStore) {
    for plan in [KeyPlan::Random, fixed("k"), KeyPlan::None] {
        let op = format!("once-{plan:?}");
        let once = |plan: KeyPlan| {
            let fingerprint = fp("{}");
            let op = op.clone();
            async move { store.begin(&Intent::new(&op, "POST", URL, &fingerprint, plan, T0).happening_once(true)).await }
        };
        let Begun::Send { claim, .. } = once(plan.clone()).await.expect("the store works") else {
            panic!("a first send")
        };
        finish(store, &op, &claim, OpState::Succeeded).await;
        for again in [KeyPlan::Random, KeyPlan::None, fixed("k-other")] {
            match once(again.clone()).await.expect("the store works") {
                Begun::Succeeded(r) => assert_eq!(r.claim(), claim, "{plan:?} then {again:?}"),
                other => panic!("{plan:?} then {again:?}: expected the success, got {other:?}"),
            }
        }
        let fingerprint = fp(r#"{"a":1}"#);
        let other =
            store.begin(&Intent::new(&op, "POST", URL, &fingerprint, KeyPlan::Random, T0).happening_once(true)).await;
        assert!(is_mismatch(other), "{plan:?}: pinned to its payload");
    }
}

async fn waited_for_run_is_the_answer(store: &dyn KeyStore) {
    let (claim, _) = send(store, "op", "{}", KeyPlan::Random, T0).await;
    finish(store, "op", &claim, OpState::Succeeded).await;
    let fingerprint = fp("{}");
    let after = Intent::new("op", "POST", URL, &fingerprint, KeyPlan::Random, T0).after(Some(claim.clone()));
    match store.begin(&after).await.expect("the store works") {
        Begun::Succeeded(r) => assert_eq!(r.claim(), claim),
        other => panic!("expected the run waited for, got {other:?}"),
    }
    // Not waited for: a succeeded random run run again is a new run, as always.
    let (next, resumed) = send(store, "op", "{}", KeyPlan::Random, T0).await;
    assert!(next.key != claim.key && !resumed);
}
