//! The fleet's rules: what holds across machines on one journal. Each "machine" is a journal
//! of its own (its own pool, its own lease owner) on the one database.

use std::sync::Arc;
use std::time::Duration;

use idempotent_retry::journal::store::{Begun, Intent, KeyPlan};
use idempotent_retry::journal::{KeyStore, OpState, PostgresJournal, fingerprint};
use idempotent_retry::testing::{ChaosProxy, FakeCloud, Schedule, ServerProfile};
use idempotent_retry::time::{Clock, SystemClock, TokioSleeper};
use idempotent_retry::{IdempotentRetry, Operations, operation::Resolution};
use serde_json::json;

use crate::support;

async fn machine(url: &str, schema: &str, scope: &str) -> PostgresJournal {
    support::builder(url, schema).scope(scope).open().await.expect("the journal opens")
}

fn intent<'a>(op: &'a str, fp: &'a str) -> Intent<'a> {
    Intent::new(op, "POST", "https://api.test/cvms", fp, KeyPlan::Random, SystemClock.now())
}

/// Two machines beginning the same operation at the same instant: exactly one sends; the
/// other finds the first's live run (it neither sends nor mints a key). 200 operations.
#[tokio::test]
async fn two_machines_beginning_at_once_never_both_send() {
    let Some((url, _server)) = support::server().await else { return };
    let schema = support::schema("at-once");
    let (a, b) = (machine(&url, &schema, "s").await, machine(&url, &schema, "s").await);
    let fp = fingerprint("POST", "https://api.test/cvms", b"{}");
    for n in 0..200 {
        let op = format!("create/{n}");
        let (ia, ib) = (intent(&op, &fp), intent(&op, &fp));
        let (x, y) = tokio::join!(a.begin(&ia), b.begin(&ib));
        let sends = [&x, &y].iter().filter(|r| matches!(r, Ok(Begun::Send { .. }))).count();
        let running = [&x, &y].iter().filter(|r| matches!(r, Ok(Begun::Running(_)))).count();
        assert_eq!((sends, running), (1, 1), "{op}: {x:?} {y:?}");
    }
}

/// A live run's lease is waited for, and its result is the waiting run's; when its holder dies,
/// the lease expires and the next run resumes the same key.
#[tokio::test]
async fn a_live_lease_is_waited_for_and_a_dead_one_expires_into_the_same_key() {
    let Some((url, _server)) = support::server().await else { return };
    let schema = support::schema("lease");
    let fp = fingerprint("POST", "https://api.test/cvms", b"{}");

    // A dead holder: its lease (1 ms here) runs out, and the key is resumed.
    let dead = support::builder(&url, &schema).scope("s").lease(Duration::from_millis(1)).open().await.unwrap();
    let Begun::Send { claim, resumed: false } = dead.begin(&intent("op", &fp)).await.unwrap() else { panic!() };
    drop(dead); // killed: it never finishes
    let heir = machine(&url, &schema, "s").await;
    match heir.begin(&intent("op", &fp)).await.unwrap() {
        Begun::Send { claim: resumed_claim, resumed: true } => {
            assert_eq!(resumed_claim.key, claim.key, "the same key");
            let apart = resumed_claim.created_at.duration_since(claim.created_at).unwrap_or_else(|e| e.duration());
            assert!(apart < Duration::from_millis(1), "first recorded when the dead run recorded it");
        }
        other => panic!("expected the dead run's key resumed, got {other:?}"),
    }

    // A live holder: the other machine is told, and, once it finished, gets its success.
    let live = machine(&url, &schema, "s").await;
    let Begun::Send { claim, .. } = live.begin(&intent("live", &fp)).await.unwrap() else { panic!() };
    let other = machine(&url, &schema, "s").await;
    let Ok(Begun::Running(held)) = other.begin(&intent("live", &fp)).await else { panic!("a live lease") };
    assert_eq!(held.claim().key, claim.key);
    let done = idempotent_retry::journal::store::Finish::new(claim.clone(), OpState::Succeeded, SystemClock.now())
        .status(Some(201))
        .identity(Some(json!({"id": "c-1"})));
    assert!(live.finish("live", &done).await.unwrap());
    match other.begin(&intent("live", &fp).after(Some(held.claim()))).await.unwrap() {
        Begun::Succeeded(r) => assert_eq!((r.claim().key, r.identity), (claim.key, Some(json!({"id": "c-1"})))),
        other => panic!("expected the run waited for, got {other:?}"),
    }
}

/// A machine's journal that tells when a `begin` found another machine's live run.
#[derive(Debug)]
struct Watched {
    journal: PostgresJournal,
    found_running: Arc<tokio::sync::Notify>,
}

#[async_trait::async_trait]
impl KeyStore for Watched {
    async fn begin(&self, intent: &Intent<'_>) -> Result<Begun, idempotent_retry::journal::JournalError> {
        let begun = self.journal.begin(intent).await;
        if matches!(begun, Ok(Begun::Running(_))) {
            self.found_running.notify_one();
        }
        begun
    }
    async fn finish(
        &self,
        op: &str,
        f: &idempotent_retry::journal::store::Finish,
    ) -> Result<bool, idempotent_retry::journal::JournalError> {
        self.journal.finish(op, f).await
    }
    async fn get(
        &self,
        op: &str,
    ) -> Result<Option<idempotent_retry::journal::Record>, idempotent_retry::journal::JournalError> {
        self.journal.get(op).await
    }
    async fn list(&self) -> Result<Vec<idempotent_retry::journal::Record>, idempotent_retry::journal::JournalError> {
        self.journal.list().await
    }
    async fn forget(&self, op: &str) -> Result<bool, idempotent_retry::journal::JournalError> {
        self.journal.forget(op).await
    }
}

/// Through `Operations`, on two machines: the second starts while the first's create is held
/// at the proxy. It waits, sends nothing, and answers with the first's CVM.
#[tokio::test]
async fn a_second_machine_waits_for_the_first_and_returns_its_result() {
    let Some((url, _server)) = support::server().await else { return };
    let schema = support::schema("ops-wait");
    let cloud = FakeCloud::start(ServerProfile::stripe()).await;
    let proxy = ChaosProxy::start(cloud.address(), Schedule::pass()).await;
    let gate = proxy.gate(Some(http::Method::POST));
    let ops = |store: Arc<dyn KeyStore>| {
        let client =
            reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).with(IdempotentRetry::new()).build();
        Operations::with_store(client, store).sleeper(TokioSleeper)
    };
    let found_running = Arc::new(tokio::sync::Notify::new());
    let first = ops(Arc::new(machine(&url, &schema, "s").await));
    let watched = Watched { journal: machine(&url, &schema, "s").await, found_running: found_running.clone() };
    let second = ops(Arc::new(watched));
    let cvms = format!("{}/cvms", proxy.uri());
    let create = |ops: &Operations| {
        let (ops, cvms) = (ops.clone(), cvms.clone());
        async move { ops.operation("create-cvm/web-1").post(cvms).json(&json!({"name": "web-1"})).send().await }
    };
    let one = tokio::spawn(create(&first));
    gate.until_held(1).await; // the first's key is on record, its create on its way
    let two = tokio::spawn(create(&second));
    found_running.notified().await; // the second found the first's run, and waits
    gate.open();
    let (one, two) = (one.await.unwrap().unwrap(), two.await.unwrap().unwrap());

    assert_eq!(one.resolution, Resolution::Created);
    assert_eq!(two.resolution, Resolution::Recorded, "nothing sent: the first run's result");
    assert_eq!(two.identity["id"], one.identity["id"]);
    assert_eq!((cloud.created(), proxy.requests()), (1, 1), "one create, one POST");
}

/// Two tenants on one database: the same operation names, keys of their own, and neither sees
/// the other's records.
#[tokio::test]
async fn scopes_never_see_each_other() {
    let Some((url, _server)) = support::server().await else { return };
    let schema = support::schema("scopes");
    let (a, b) = (machine(&url, &schema, "tenant-a").await, machine(&url, &schema, "tenant-b").await);
    let fp = fingerprint("POST", "https://api.test/cvms", b"{}");
    let fixed = |k: &str| KeyPlan::Fixed(idempotent_retry::IdempotencyKey::new(k).unwrap());
    let Begun::Send { claim: ca, .. } = a.begin(&intent("op", &fp)).await.unwrap() else { panic!() };
    let Begun::Send { claim: cb, resumed: false } = b.begin(&intent("op", &fp)).await.unwrap() else {
        panic!("tenant b's run is its own")
    };
    assert_ne!(ca.key, cb.key);
    assert_eq!(a.list().await.unwrap().len(), 1);
    assert!(b.list().await.unwrap().iter().all(|r| r.key == cb.key));
    // A fixed key pinned in one scope is free in the other.
    let other_fp = fingerprint("POST", "https://api.test/cvms", b"{\"x\":1}");
    let mut pinned = intent("deploy", &fp);
    pinned.key = fixed("k-1");
    a.begin(&pinned).await.unwrap();
    let mut elsewhere = intent("deploy-2", &other_fp);
    elsewhere.key = fixed("k-1");
    assert!(b.begin(&elsewhere).await.is_ok(), "another tenant's pin is not this one's");
    assert!(a.begin(&elsewhere).await.is_err(), "but it is in its own scope");
}

/// Many machines opening a new database at once: none fails, the schema is made once, and a
/// schema newer than the program is refused.
#[tokio::test]
async fn many_openers_of_a_new_database_never_fail() {
    let Some((url, _server)) = support::server().await else { return };
    for round in 0..5 {
        let schema = support::schema(&format!("open-{round}"));
        let opens = (0..16).map(|_| support::builder(&url, &schema).open());
        for opened in futures_util::future::join_all(opens).await {
            opened.expect("every opener succeeds");
        }
    }
    let schema = support::schema("newer");
    support::builder(&url, &schema).open().await.unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.execute(&format!("INSERT INTO \"{schema}\".migrations (version) VALUES (99)"), &[]).await.unwrap();
    let err = support::builder(&url, &schema).open().await.unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
}

/// The connection string's password never shows: not in errors, not in the journal's
/// description, not in records.
#[tokio::test]
async fn the_password_never_shows() {
    let Some((url, _server)) = support::server().await else { return };
    let secret = "s3cret-pw-9f8e";
    let refused = PostgresJournal::builder(format!("postgres://postgres:{secret}@127.0.0.1:1/x"))
        .timeout(Duration::from_secs(2))
        .open()
        .await
        .unwrap_err();
    assert!(matches!(refused, idempotent_retry::journal::JournalError::Unavailable { .. }), "{refused:?}");
    assert!(!refused.to_string().contains(secret) && !format!("{refused:?}").contains(secret), "{refused}");
    let journal = machine(&url, &support::schema("secret"), "s").await;
    let password = std::env::var("PGPASSWORD").unwrap_or_default();
    if !password.is_empty() {
        assert!(!format!("{journal:?}").contains(&password) && !journal.location().contains(&password));
    }
}

/// A database that refuses the connection says why, in the server's words, not "db error".
#[tokio::test]
async fn a_refusal_says_the_servers_reason() {
    let Some((url, _server)) = support::server().await else { return };
    let elsewhere = match url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/no_such_database_here"),
        None => return,
    };
    let refused = PostgresJournal::open(elsewhere).await.unwrap_err();
    let text = refused.to_string();
    assert!(text.contains("\"no_such_database_here\" does not exist") && text.contains("3D000"), "{text}");
}

/// `gc` removes settled records older than the cutoff, keeps a fixed key's success (it keeps
/// the key from being sent again), and never touches what may have taken effect.
#[tokio::test]
async fn gc_removes_settled_records_and_keeps_what_must_stay() {
    let Some((url, _server)) = support::server().await else { return };
    let journal = machine(&url, &support::schema("gc"), "s").await;
    let fp = fingerprint("POST", "https://api.test/cvms", b"{}");
    let old = SystemClock.now() - Duration::from_secs(90 * 86_400);
    for (op, plan, state) in [
        ("random-done", KeyPlan::Random, Some(OpState::Succeeded)),
        ("refused", KeyPlan::Random, Some(OpState::NotApplied)),
        (
            "fixed-done",
            KeyPlan::Fixed(idempotent_retry::IdempotencyKey::new("k-gc").unwrap()),
            Some(OpState::Succeeded),
        ),
        ("unknown", KeyPlan::Random, Some(OpState::Unknown)),
        ("pending", KeyPlan::Random, None),
    ] {
        let i = Intent::new(op, "POST", "https://api.test/cvms", &fp, plan, old);
        let Begun::Send { claim, .. } = journal.begin(&i).await.unwrap() else { panic!() };
        if let Some(state) = state {
            journal.finish(op, &idempotent_retry::journal::store::Finish::new(claim, state, old)).await.unwrap();
        }
    }
    let removed = journal.gc(SystemClock.now() - Duration::from_secs(30 * 86_400)).await.unwrap();
    let left: Vec<String> = journal.list().await.unwrap().into_iter().map(|r| r.operation).collect();
    assert_eq!(removed, 2, "{left:?}");
    assert_eq!(left.len(), 3);
    for kept in ["fixed-done", "unknown", "pending"] {
        assert!(left.iter().any(|o| o == kept), "{kept} kept: {left:?}");
    }
}
