//! The journal's rules as one check any [`KeyStore`] must pass: the crate's two stores run it,
//! and so can a store of your own.

use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::journal::{Begun, Claim, Finish, Intent, JournalError, KeyPlan, KeyStore, OpState, fingerprint};
use crate::key::IdempotencyKey;
use crate::wait::Handle;

const URL: &str = "https://api.test/cvms";
const T0: SystemTime = SystemTime::UNIX_EPOCH;

/// Runs the journal's rules (the table on [`KeyStore`]) against stores from `make`, one fresh
/// store per rule, and panics with the rule's name at the first one broken.
///
/// The rules include the sequences that once broke a store: a key index losing a key another
/// operation still held, a late `finish` overwriting a newer run's record, a re-run with another
/// key source replacing an unsettled record.
///
/// # Examples
///
/// ```
/// use idempotent_retry::journal::MemoryStore;
/// use idempotent_retry::testing::check_key_store;
///
/// check_key_store(MemoryStore::new);
/// ```
///
/// # Panics
///
/// When the store breaks a rule, or fails.
pub fn check_key_store<S: KeyStore>(mut make: impl FnMut() -> S) {
    let rules: &[(&str, Rule)] = &[
        ("a random key is resumed while unsettled and renewed after success", random_keys_resume_then_renew),
        ("a pending random operation with another payload is refused", random_key_pinned_to_payload),
        ("a fixed key is pinned to one payload across operations", fixed_keys_pinned_across_operations),
        ("a key stays pinned while any operation holds it", pinning_survives_another_holder_moving_on),
        ("an unsettled record survives other key sources", unsettled_records_survive_other_key_sources),
        ("a late finish never overwrites a newer run", late_finish_is_refused),
        ("a fixed key that succeeded is reported, not rewritten", succeeded_fixed_key_is_reported),
        ("a failed fixed key is sent again, same payload only", failed_fixed_key_is_sent_again),
        ("a fixed key's run is remembered after other runs of the operation", fixed_keys_are_remembered),
        ("keyless runs after a settled one get claims of their own", keyless_runs_get_distinct_claims),
        ("forgetting settles an unsettled record", forget_settles),
        ("a waiting record is resumed by any re-run and never sent again", waiting_records_are_resumed),
    ];
    for (name, rule) in rules {
        let store = make();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rule(&store)));
        if let Err(panic) = outcome {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("the key store breaks the rule \"{name}\": {why}");
        }
    }
}

/// One rule, checked against one fresh store.
type Rule = fn(&dyn KeyStore);

fn fp(body: &str) -> String {
    fingerprint("POST", URL, body.as_bytes())
}

fn begin(store: &dyn KeyStore, op: &str, body: &str, key: KeyPlan, now: SystemTime) -> Result<Begun, JournalError> {
    let fingerprint = fp(body);
    store.begin(&Intent { operation: op, method: "POST", url: URL, fingerprint: &fingerprint, key, now })
}

/// Begins, expecting a send; returns the claim and whether it resumed.
fn send(store: &dyn KeyStore, op: &str, body: &str, key: KeyPlan, now: SystemTime) -> (Claim, bool) {
    match begin(store, op, body, key, now).expect("the store works") {
        Begun::Send { claim, resumed } => (claim, resumed),
        other => panic!("{op}: expected a send, got {other:?}"),
    }
}

fn finish(store: &dyn KeyStore, op: &str, claim: &Claim, state: OpState) -> bool {
    let finish = Finish::new(claim.clone(), state, T0).status(Some(201)).identity(Some(json!({"id": op})));
    store.finish(op, &finish).expect("the store works")
}

fn fixed(key: &str) -> KeyPlan {
    KeyPlan::Fixed(IdempotencyKey::new(key).expect("a valid key"))
}

fn is_mismatch(result: Result<Begun, JournalError>) -> bool {
    matches!(result, Err(JournalError::PayloadMismatch(_)))
}

fn random_keys_resume_then_renew(store: &dyn KeyStore) {
    let (first, resumed) = send(store, "op", "{}", KeyPlan::Random, T0);
    assert!(!resumed && first.key.is_some());
    assert_eq!(send(store, "op", "{}", KeyPlan::Random, T0), (first.clone(), true), "resumed");
    assert!(finish(store, "op", &first, OpState::Succeeded));
    let (next, resumed) = send(store, "op", "{}", KeyPlan::Random, T0);
    assert!(next.key != first.key && !resumed, "a succeeded operation run again is a new run");
}

fn random_key_pinned_to_payload(store: &dyn KeyStore) {
    send(store, "op", "{}", KeyPlan::Random, T0);
    assert!(is_mismatch(begin(store, "op", r#"{"a":1}"#, KeyPlan::Random, T0)));
}

fn fixed_keys_pinned_across_operations(store: &dyn KeyStore) {
    let (claim, _) = send(store, "deploy/a", "{}", fixed("deploy-abc"), T0);
    finish(store, "deploy/a", &claim, OpState::Succeeded);
    match begin(store, "deploy/b", r#"{"b":1}"#, fixed("deploy-abc"), T0) {
        Err(JournalError::PayloadMismatch(m)) => {
            let message = m.to_string();
            assert!(message.contains("`deploy/b`") && message.contains("`deploy/a`"), "names both: {message}");
            assert!(!message.contains("deploy-abc"), "the key is fingerprinted: {message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The same payload under another name shares the key.
    send(store, "deploy/c", "{}", fixed("deploy-abc"), T0);
}

fn pinning_survives_another_holder_moving_on(store: &dyn KeyStore) {
    // A and B hold the key with one payload; B moves on to another key; the key is still A's.
    send(store, "a", "{}", fixed("k"), T0);
    let (b, _) = send(store, "b", "{}", fixed("k"), T0);
    finish(store, "b", &b, OpState::Succeeded);
    send(store, "b", "{}", fixed("k2"), T0);
    assert!(is_mismatch(begin(store, "c", r#"{"other":1}"#, fixed("k"), T0)), "A still holds k");
    // A forgotten, B still remembers it used k; both forgotten, k is free.
    store.forget("a").expect("the store works");
    assert!(is_mismatch(begin(store, "c", r#"{"other":1}"#, fixed("k"), T0)), "B's settled run with k");
    store.forget("b").expect("the store works");
    send(store, "c", r#"{"other":1}"#, fixed("k"), T0);
}

fn unsettled_records_survive_other_key_sources(store: &dyn KeyStore) {
    let (keyless, _) = send(store, "op", "{}", KeyPlan::None, T0);
    finish(store, "op", &keyless, OpState::Unknown);
    for plan in [KeyPlan::Random, fixed("mine"), KeyPlan::None] {
        match begin(store, "op", "{}", plan.clone(), T0).expect("the store works") {
            Begun::Unsettled(r) => assert_eq!((r.key, r.state), (None, OpState::Unknown), "{plan:?}"),
            other => panic!("{plan:?}: expected unsettled, got {other:?}"),
        }
    }
    let record = store.get("op").expect("the store works").expect("kept");
    assert_eq!((record.key, record.state), (None, OpState::Unknown), "nothing was written over it");
    // A keyed pending record meets another fixed key, or none: unsettled as well.
    let (keyed, _) = send(store, "keyed", "{}", fixed("k1"), T0);
    for plan in [fixed("k2"), KeyPlan::None] {
        assert!(matches!(begin(store, "keyed", "{}", plan, T0), Ok(Begun::Unsettled(_))));
    }
    // Settled by a read-back that found nothing: the next run goes ahead.
    assert!(finish(store, "op", &keyless, OpState::NotApplied));
    send(store, "op", "{}", KeyPlan::Random, T0);
    assert!(finish(store, "keyed", &keyed, OpState::NotApplied));
    assert_eq!(send(store, "keyed", "{}", fixed("k2"), T0).0.key.map(|k| k.to_string()).as_deref(), Some("k2"));
}

fn late_finish_is_refused(store: &dyn KeyStore) {
    // Run 1 sends k1 and is slow; the operation is forgotten and run 2 starts with k2.
    let (old, _) = send(store, "op", "{}", KeyPlan::Random, T0);
    store.forget("op").expect("the store works");
    let (new, _) = send(store, "op", "{}", KeyPlan::Random, T0);
    assert!(!finish(store, "op", &old, OpState::Succeeded), "run 1 reports late: refused");
    let record = store.get("op").expect("the store works").expect("kept");
    assert_eq!((record.key, record.state, record.identity), (new.key.clone(), OpState::Pending, None));
    // The same with fixed keys: a new key after success, and the old run's late report.
    let (k1, _) = send(store, "fixed", "{}", fixed("k1"), T0);
    finish(store, "fixed", &k1, OpState::Succeeded);
    let (k2, _) = send(store, "fixed", "{}", fixed("k2"), T0);
    assert!(!finish(store, "fixed", &k1, OpState::NotApplied));
    assert!(finish(store, "fixed", &k2, OpState::Succeeded));
}

fn succeeded_fixed_key_is_reported(store: &dyn KeyStore) {
    let (claim, _) = send(store, "op", "{}", fixed("k"), T0);
    finish(store, "op", &claim, OpState::Succeeded);
    let later = T0 + Duration::from_secs(7 * 24 * 3600);
    match begin(store, "op", "{}", fixed("k"), later).expect("the store works") {
        Begun::Succeeded(r) => {
            assert_eq!((r.claim(), r.state, r.identity), (claim.clone(), OpState::Succeeded, Some(json!({"id": "op"}))))
        }
        other => panic!("expected succeeded, got {other:?}"),
    }
    let record = store.get("op").expect("the store works").expect("kept");
    assert_eq!((record.state, record.updated_at), (OpState::Succeeded, T0), "nothing was written");
    assert!(is_mismatch(begin(store, "op", r#"{"a":1}"#, fixed("k"), later)), "still pinned");
}

fn failed_fixed_key_is_sent_again(store: &dyn KeyStore) {
    let (claim, _) = send(store, "op", "{}", fixed("k"), T0);
    finish(store, "op", &claim, OpState::NotApplied);
    let later = T0 + Duration::from_secs(60);
    assert_eq!(send(store, "op", "{}", fixed("k"), later), (claim, false), "the key's age counts from its first use");
    assert!(is_mismatch(begin(store, "op", r#"{"a":1}"#, fixed("k"), later)));
}

fn fixed_keys_are_remembered(store: &dyn KeyStore) {
    // A fixed key succeeds; later runs of the operation use other keys (random, none, another
    // fixed one) and replace its record; the fixed key named again is still the run it was.
    let (claim, _) = send(store, "op", "{}", fixed("k"), T0);
    finish(store, "op", &claim, OpState::Succeeded);
    for plan in [KeyPlan::Random, KeyPlan::None, fixed("k2")] {
        let (other, _) = send(store, "op", "{}", plan, T0);
        finish(store, "op", &other, OpState::Succeeded);
    }
    match begin(store, "op", "{}", fixed("k"), T0).expect("the store works") {
        Begun::Succeeded(r) => assert_eq!((r.claim(), r.identity), (claim, Some(json!({"id": "op"})))),
        other => panic!("expected the remembered success, got {other:?}"),
    }
    assert!(is_mismatch(begin(store, "op", r#"{"a":1}"#, fixed("k"), T0)), "still pinned to its payload");
    assert!(is_mismatch(begin(store, "other", r#"{"a":1}"#, fixed("k"), T0)), "for other operations too");
    // A random key is not remembered: it never comes back.
    assert!(store.get("op").expect("the store works").is_some_and(|r| r.fixed_key));
    // Forgetting lets all of it go.
    store.forget("op").expect("the store works");
    send(store, "other", r#"{"a":1}"#, fixed("k"), T0);
}

fn keyless_runs_get_distinct_claims(store: &dyn KeyStore) {
    let (first, _) = send(store, "op", "{}", KeyPlan::None, T0);
    finish(store, "op", &first, OpState::Succeeded);
    let (second, _) = send(store, "op", "{}", KeyPlan::None, T0);
    assert_ne!(first, second, "two keyless runs at the same instant");
    assert!(!finish(store, "op", &first, OpState::NotApplied), "the first run's report is not the second's");
}

fn forget_settles(store: &dyn KeyStore) {
    let (claim, _) = send(store, "op", "{}", KeyPlan::None, T0);
    finish(store, "op", &claim, OpState::Unknown);
    assert!(store.forget("op").expect("the store works"));
    assert!(!store.forget("op").expect("the store works"));
    assert!(store.get("op").expect("the store works").is_none());
    send(store, "op", "{}", KeyPlan::Random, T0);
}

fn waiting_records_are_resumed(store: &dyn KeyStore) {
    let handle = Handle::Resource { url: "https://ci:s3cret@api.test/cvms/c1?token=t&view=full".into() };
    let (claim, _) = send(store, "op", "{}", KeyPlan::Random, T0);
    let waiting = Finish::new(claim.clone(), OpState::Waiting, T0)
        .status(Some(201))
        .identity(Some(json!({"id": "c1"})))
        .handle(Some(&handle));
    assert!(store.finish("op", &waiting).expect("the store works"));
    let stored = Handle::Resource { url: "https://api.test/cvms/c1?token=***&view=full".into() };
    for plan in [KeyPlan::Random, fixed("another-key"), KeyPlan::None] {
        match begin(store, "op", "{}", plan.clone(), T0).expect("the store works") {
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
    assert!(is_mismatch(begin(store, "op", r#"{"other":1}"#, KeyPlan::Random, T0)), "another payload is refused");
    let record = store.get("op").expect("the store works").expect("kept");
    assert_eq!((record.state, record.identity), (OpState::Waiting, Some(json!({"id": "c1"}))), "nothing was written");
    assert!(finish(store, "op", &claim, OpState::Succeeded), "the wait ends");
    let record = store.get("op").expect("the store works").expect("kept");
    assert_eq!((record.state, record.handle), (OpState::Succeeded, None));
}
