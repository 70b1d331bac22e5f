//! Where the server is, and journals in schemas of their own.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotent_retry::journal::{PostgresJournal, PostgresJournalBuilder};

/// The server, shared by the tests that use it and taken whole by the tests that stop and
/// start it (they run in the same process).
static SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The server's URL, held for the test's duration (a fault test cannot restart it meanwhile),
/// or `None` when there is none (see [`url`]).
pub async fn server() -> Option<(String, tokio::sync::RwLockReadGuard<'static, ()>)> {
    let url = url()?;
    Some((url, SERVER.read().await))
}

/// The server's URL, taken whole: no other test uses it until the guard is dropped.
pub async fn server_alone() -> Option<(String, tokio::sync::RwLockWriteGuard<'static, ()>)> {
    let url = url()?;
    Some((url, SERVER.write().await))
}

/// The server's URL from libpq's environment, or `None` (with a loud message) when there is
/// none; under `CI=true` a missing server fails the test.
fn url() -> Option<String> {
    if let Ok(url) = std::env::var("IDEM_PG_URL") {
        return Some(url);
    }
    let Ok(host) = std::env::var("PGHOST") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and no PostgreSQL: run the suite inside pg_virtualenv (see .ci/run)");
        }
        eprintln!(
            "\n!!!!! SKIPPING the PostgreSQL tests: no server (PGHOST unset). Run them with: pg_virtualenv cargo test --all-features --test postgres !!!!!\n"
        );
        return None;
    };
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    Some(format!(
        "postgres://{}:{}@{host}:{}/{}",
        var("PGUSER", "postgres"),
        var("PGPASSWORD", ""),
        var("PGPORT", "5432"),
        var("PGDATABASE", "postgres")
    ))
}

/// A schema of this test process's own: runs of the suite never see each other.
pub fn schema(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("idem_test_{}_{}_{name}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// A builder for a journal in `schema`, with a short lease (tests wait for it to expire).
pub fn builder(url: &str, schema: &str) -> PostgresJournalBuilder {
    PostgresJournal::builder(url).schema(schema).lease(Duration::from_secs(2))
}

/// `pg_ctlcluster VERSION NAME action` for the test server, when `IDEM_PG_CLUSTER` names it.
pub fn cluster(action: &str) -> bool {
    let Ok(cluster) = std::env::var("IDEM_PG_CLUSTER") else { return false };
    let mut parts = cluster.split_whitespace();
    let (Some(version), Some(name)) = (parts.next(), parts.next()) else { return false };
    let status = std::process::Command::new("pg_ctlcluster").args([version, name, action]).status();
    assert!(status.is_ok_and(|s| s.success()), "pg_ctlcluster {version} {name} {action} failed");
    true
}
