//! Every value a record holds reaches the database and comes back exactly as given. The hot
//! paths (`begin` of a new operation, `finish`) send each transaction as one message without
//! parameters, so every operation name, URL, key and identity passes through an escape on its
//! way into the SQL: these tests try to break it, with `MemoryStore` as the oracle.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idempotent_retry::IdempotencyKey;
use idempotent_retry::journal::store::{Begun, Finish, Intent, KeyPlan};
use idempotent_retry::journal::{JournalError, KeyStore, MemoryStore, OpState, Record};
use idempotent_retry::wait::Handle;
use proptest::prop_assert_eq;
use serde_json::json;

use crate::support;

/// Strings that end a literal, escape its end, start another, comment out the rest or
/// leave the ASCII range; and one longer than any buffer of the protocol.
fn hostile() -> Vec<String> {
    let mut values: Vec<String> = [
        "'",
        "''",
        "\\",
        "\\'",
        "'\\",
        "\\\\'",
        "E'\\x41'",
        "'); DROP TABLE operations; --",
        "x' OR '1'='1",
        "$1",
        "$$; SELECT 1; $$",
        "$tag$ $tag$",
        ";",
        "/* unclosed",
        "-- comment",
        "\"quoted\"",
        "naïve ✓ 🦀 中文",
        "line\nbreak\ttab\rreturn",
        "\u{feff}\u{200b}",
        "%s %d {0}",
        "NULL",
        "",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    values.push("'\\".repeat(20_000));
    values
}

/// A key of printable ASCII (what a key may hold) with the characters an escape must handle.
fn hostile_key(n: usize) -> IdempotencyKey {
    IdempotencyKey::new(format!("k'{n}\\'\"$1;--")).expect("printable ASCII is a valid key")
}

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_790_000_000_000 + ms)
}

/// Runs the same operations, named and addressed by `value`, on `store`: a random key, a fixed
/// key that another operation then claims with another payload (the fast path's check that
/// the key is free must see it), and no key. Every record, as read back.
async fn exercise(store: &dyn KeyStore, n: usize, value: &str) -> Vec<(String, Option<Record>, String)> {
    let url = format!("https://api.test/{value}");
    let fp = format!("fp-{value}");
    let mut seen = Vec::new();
    for (plan, tag) in [(KeyPlan::Random, "random"), (KeyPlan::Fixed(hostile_key(n)), "fixed"), (KeyPlan::None, "none")]
    {
        let op = format!("{n}/{tag}/{value}");
        let intent = Intent::new(&op, "POST", &url, &fp, plan.clone(), at(1));
        let Begun::Send { claim, resumed: false } = store.begin(&intent).await.expect("begin") else {
            panic!("{op}: a new operation sends")
        };
        let (state, handle) = match tag {
            "random" => (OpState::Succeeded, None),
            "fixed" => (OpState::Waiting, Some(Handle::Location { url: format!("{url}/poll?q={value}") })),
            _ => (OpState::NotApplied, None),
        };
        let finish = Finish::new(claim, state, at(2))
            .status(Some(201))
            .identity(Some(json!({ "id": value, "nested": [value, { value: value }] })))
            .handle(handle.as_ref());
        assert!(store.finish(&op, &finish).await.expect("finish"), "{op}: the run's own record");
        // Another operation, the same fixed key, another payload: refused, by either path.
        let refused = if tag == "fixed" {
            let other = format!("{n}/other/{value}");
            let taken = Intent::new(&other, "POST", &url, "another payload", plan, at(3));
            match store.begin(&taken).await {
                Err(JournalError::PayloadMismatch(_)) => "refused".to_owned(),
                other => format!("{other:?}"),
            }
        } else {
            String::new()
        };
        let mut record = store.get(&op).await.expect("get");
        if tag == "random" {
            // Each store mints its own key; everything else must agree.
            record.as_mut().expect("recorded").key = None;
        }
        seen.push((op, record, refused));
    }
    seen
}

async fn round_trips_exactly(url: &str, label: &str) {
    let schema = support::schema(label);
    let journal = support::builder(url, &schema).open().await.expect("the journal opens");
    let oracle = MemoryStore::new();
    let values = hostile();
    for (n, value) in values.iter().enumerate() {
        let ours = exercise(&journal, n, value).await;
        let theirs = exercise(&oracle, n, value).await;
        assert_eq!(ours, theirs, "{label}: {value:?}");
        for (op, record, refused) in &ours {
            assert!(record.is_some(), "{label}: {op:?} recorded");
            assert!(refused.is_empty() || refused == "refused", "{label}: {op:?}: the fixed key is held: {refused}");
        }
    }
    // Nothing ran that was not asked for: every record is there, and only those.
    let listed = journal.list().await.expect("list");
    assert_eq!(listed.len(), values.len() * 3, "{label}");
    let reopened = support::builder(url, &schema).open().await.expect("the schema is intact");
    assert_eq!(reopened.list().await.expect("list").len(), values.len() * 3);
}

/// Quotes, backslashes, dollar quotes, comments and non-ASCII, in every column a record holds,
/// come back as `MemoryStore` gives them back; a fixed key held by another operation is seen
/// as held. Under the server's default settings.
#[tokio::test]
async fn hostile_values_come_back_exactly() {
    let Some((url, _server)) = support::server().await else { return };
    round_trips_exactly(&url, "hostile").await;
}

/// The same with `standard_conforming_strings = off`, where a backslash in a plain literal
/// escapes the quote after it (a database or role may be set so): the escape must not rely on
/// the setting.
#[tokio::test]
async fn hostile_values_come_back_exactly_without_standard_conforming_strings() {
    let Some((url, _server)) = support::server().await else { return };
    let url = format!("{url}?options=-c%20standard_conforming_strings%3Doff");
    // The setting is in force on the journal's connections (it comes with the URL).
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let row = client.query_one("SHOW standard_conforming_strings", &[]).await.expect("show");
    assert_eq!(row.get::<_, String>(0), "off");
    round_trips_exactly(&url, "nonconforming").await;
}

/// A NUL byte cannot be stored in PostgreSQL text: `begin` fails with a clear error, records
/// nothing (so nothing is sent), and the journal's connections stay usable.
#[tokio::test]
async fn a_nul_in_a_name_is_refused_and_leaves_the_journal_usable() {
    let Some((url, _server)) = support::server().await else { return };
    let journal = support::builder(&url, &support::schema("nul")).open().await.unwrap();
    for plan in [KeyPlan::Random, KeyPlan::Fixed(hostile_key(0)), KeyPlan::None] {
        let intent = Intent::new("op\0name", "POST", "https://api.test/cvms", "fp", plan, at(1));
        let err = journal.begin(&intent).await.expect_err("a NUL cannot be stored");
        assert!(matches!(err, JournalError::Other { .. }) && err.to_string().contains("NUL"), "{err:?}");
        assert!(journal.list().await.unwrap().is_empty());
    }
    let intent = Intent::new("op", "POST", "https://api.test/cvms", "fp", KeyPlan::Random, at(1));
    assert!(matches!(journal.begin(&intent).await, Ok(Begun::Send { .. })));
    let scoped = support::builder(&url, &support::schema("nul")).scope("a\0b").open().await;
    assert!(matches!(&scoped, Err(JournalError::Other { reason, .. }) if reason.contains("NUL")), "{scoped:?}");
}

/// Any text but NUL, in the name, the URL and the identity, comes back exactly: 64 cases,
/// each against a `MemoryStore` of its own.
#[test]
fn any_text_comes_back_exactly() {
    use proptest::test_runner::{Config, TestRunner};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let Some((url, _server)) = rt.block_on(support::server()) else { return };
    let journal = rt.block_on(support::builder(&url, &support::schema("any")).open()).unwrap();
    let case = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config { cases: 64, failure_persistence: None, ..Config::default() });
    runner
        .run(&"[^\u{0}]{0,64}", |value| {
            let n = case.fetch_add(1, Ordering::SeqCst);
            let (ours, theirs) = rt.block_on(async {
                (exercise(&journal, n, &value).await, exercise(&MemoryStore::new(), n, &value).await)
            });
            prop_assert_eq!(ours, theirs, "{:?}", value);
            Ok(())
        })
        .unwrap();
}
