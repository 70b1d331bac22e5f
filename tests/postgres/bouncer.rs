//! Through PgBouncer in transaction pooling mode, as fleets run PostgreSQL: a few server
//! connections shared by every client, a client's session never its own between transactions.
//! The journal's locks and bounds live inside its transactions, so they hold there too.

use std::sync::Arc;

use idempotent_retry::journal::store::{Begun, Intent, KeyPlan};
use idempotent_retry::journal::{KeyStore, OpState, fingerprint};
use idempotent_retry::testing::{FakeCloud, ServerProfile};
use idempotent_retry::time::{Clock, SystemClock, TokioSleeper};
use idempotent_retry::{IdempotentRetry, Operations};
use serde_json::json;

use crate::support;

/// Two machines beginning the same operation at once, through PgBouncer with two server
/// connections: exactly one sends. 200 operations.
#[tokio::test]
async fn begins_through_pgbouncer_never_both_send() {
    let Some((_url, _server)) = support::server().await else { return };
    let Some(bouncer) = support::Bouncer::start(2) else { return };
    let schema = support::schema("bouncer-at-once");
    let open = || support::builder(&bouncer.url(), &schema).pool_size(4).open();
    let (a, b) = (open().await.expect("opens through PgBouncer"), open().await.unwrap());
    let fp = fingerprint("POST", "https://api.test/cvms", b"{}");
    for n in 0..200 {
        let op = format!("create/{n}");
        let intent = || Intent::new(&op, "POST", "https://api.test/cvms", &fp, KeyPlan::Random, SystemClock.now());
        let (ia, ib) = (intent(), intent());
        let (x, y) = tokio::join!(a.begin(&ia), b.begin(&ib));
        let sends = [&x, &y].iter().filter(|r| matches!(r, Ok(Begun::Send { .. }))).count();
        let running = [&x, &y].iter().filter(|r| matches!(r, Ok(Begun::Running(_)))).count();
        assert_eq!((sends, running), (1, 1), "{op}: {x:?} {y:?}");
    }
}

/// Eight machines running the same twenty creates (each to happen once) at once through PgBouncer with two server
/// connections: one resource per operation, every run answers with it, and every record ends
/// settled (no lease stranded on a pooled server connection).
#[tokio::test]
async fn a_fleet_through_pgbouncer_makes_one_resource_per_operation() {
    let Some((_url, _server)) = support::server().await else { return };
    let Some(bouncer) = support::Bouncer::start(2) else { return };
    fleet(&bouncer.url()).await;
}

/// The same fleet straight to the server.
#[tokio::test]
async fn a_fleet_straight_to_the_server_makes_one_resource_per_operation() {
    let Some((url, _server)) = support::server().await else { return };
    fleet(&url).await;
}

async fn fleet(url: &str) {
    let schema = support::schema("fleet");
    let cloud = FakeCloud::start(ServerProfile::stripe()).await;
    let mut machines = Vec::new();
    for _ in 0..8 {
        let journal = support::builder(url, &schema).pool_size(2).open().await.unwrap();
        let client =
            reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).with(IdempotentRetry::new()).build();
        machines.push(Operations::with_store(client, Arc::new(journal)).sleeper(TokioSleeper));
    }
    let mut runs = tokio::task::JoinSet::new();
    for ops in &machines {
        for n in 0..20 {
            let (ops, cvms) = (ops.clone(), format!("{}/cvms", cloud.uri()));
            runs.spawn(async move {
                let name = format!("web-{n}");
                let done = ops
                    .operation(format!("create-cvm/{name}"))
                    .once()
                    .post(cvms)
                    .json(&json!({"name": name}))
                    .send()
                    .await;
                (n, done)
            });
        }
    }
    let mut ids = vec![std::collections::BTreeSet::new(); 20];
    while let Some(run) = runs.join_next().await {
        let (n, done) = run.unwrap();
        let done = done.unwrap_or_else(|e| panic!("web-{n}: {e}"));
        ids[n].insert(done.resource["id"].to_string());
    }

    assert_eq!(cloud.created(), 20, "one CVM per operation");
    assert!(ids.iter().all(|set| set.len() == 1), "every run answers with the one resource: {ids:?}");
    let records = machines[0].store().list().await.unwrap();
    assert_eq!(records.len(), 20);
    assert!(records.iter().all(|r| r.state == OpState::Succeeded), "{records:?}");
}
