//! A pooled connection goes back to the pool outside any transaction, whatever happened to the
//! call that used it: dropped after its first message went out (a caller's timeout), or
//! failed in the database (a lock held by someone else). Otherwise the connection's next user
//! would write inside a transaction nobody commits, and a key "on record" would not be.
//! Each journal here has one connection, so the next call gets the same one.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime};

use idempotent_retry::journal::store::{Begun, Claim, Finish, Intent, KeyPlan};
use idempotent_retry::journal::{JournalError, KeyStore, OpState, PostgresJournal};

use crate::support;

fn intent(op: &str) -> Intent<'_> {
    Intent::new(op, "POST", "https://api.test/cvms", "fp", KeyPlan::Random, SystemTime::UNIX_EPOCH)
}

async fn one_connection(url: &str, schema: &str) -> PostgresJournal {
    support::builder(url, schema).pool_size(1).timeout(Duration::from_millis(300)).open().await.unwrap()
}

async fn send(journal: &PostgresJournal, op: &str) -> Claim {
    match journal.begin(&intent(op)).await.unwrap() {
        Begun::Send { claim, .. } => claim,
        other => panic!("{op}: {other:?}"),
    }
}

/// Polls `call` once, which hands it the pool's idle connection and puts its first message
/// on it, then drops it before it could read any answer, as a caller's timeout would.
fn drop_midway<F: Future>(call: F) {
    let mut call = pin!(call);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(call.as_mut().poll(&mut cx).is_pending(), "the call was to be dropped before it answered");
}

/// What another machine sees of `op`.
async fn seen(url: &str, schema: &str, op: &str) -> Option<OpState> {
    let other = support::builder(url, schema).open().await.unwrap();
    other.get(op).await.unwrap().map(|r| r.state)
}

/// A `finish` dropped after its statement went out and before its `COMMIT`: the outcome is
/// not recorded (the record stays pending, the next run resumes the key), and the next call
/// on the same connection commits on its own.
#[tokio::test]
async fn a_finish_dropped_midway_leaves_no_transaction_for_the_next_call() {
    let Some((url, _server)) = support::server().await else { return };
    let schema = support::schema("dropped-finish");
    let journal = one_connection(&url, &schema).await;
    let claim = send(&journal, "first").await;
    let finish = Finish::new(claim, OpState::Succeeded, SystemTime::UNIX_EPOCH).status(Some(201));
    drop_midway(journal.finish("first", &finish));

    send(&journal, "second").await;

    assert_eq!(seen(&url, &schema, "second").await, Some(OpState::Pending), "the next begin is on record");
    assert_eq!(seen(&url, &schema, "first").await, Some(OpState::Pending), "the dropped finish is not");
}

/// A `begin` dropped midway either claimed the operation or did not; the next call on the
/// connection commits on its own either way.
#[tokio::test]
async fn a_begin_dropped_midway_leaves_no_transaction_for_the_next_call() {
    let Some((url, _server)) = support::server().await else { return };
    let schema = support::schema("dropped-begin");
    let journal = one_connection(&url, &schema).await;
    drop_midway(journal.begin(&intent("first")));

    let claim = send(&journal, "second").await;
    let finish = Finish::new(claim, OpState::Succeeded, SystemTime::UNIX_EPOCH).status(Some(201));
    assert!(journal.finish("second", &finish).await.unwrap());

    assert_eq!(seen(&url, &schema, "second").await, Some(OpState::Succeeded));
}

/// A `finish` that fails in the database (the record locked by another session past the
/// journal's lock timeout): a clear error, nothing recorded, and the connection clean for the
/// next call (not stuck in an aborted transaction).
#[tokio::test]
async fn a_finish_that_fails_in_the_database_leaves_the_connection_clean() {
    let Some((url, _server)) = support::server().await else { return };
    let schema = support::schema("failed-finish");
    let journal = one_connection(&url, &schema).await;
    let claim = send(&journal, "first").await;

    let (mut holder, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let tx = holder.transaction().await.unwrap();
    tx.execute(&format!("SELECT 1 FROM \"{schema}\".operations WHERE operation = 'first' FOR UPDATE"), &[])
        .await
        .unwrap();
    let finish = Finish::new(claim.clone(), OpState::Succeeded, SystemTime::UNIX_EPOCH).status(Some(201));
    let err = journal.finish("first", &finish).await.expect_err("the record is locked");
    assert!(matches!(err, JournalError::Locked { .. }), "{err:?}");
    tx.rollback().await.unwrap();

    send(&journal, "second").await;
    assert_eq!(seen(&url, &schema, "second").await, Some(OpState::Pending), "the next begin is on record");
    assert!(journal.finish("first", &finish).await.unwrap(), "and the finish goes through once the lock is gone");
    assert_eq!(seen(&url, &schema, "first").await, Some(OpState::Succeeded));
}
