//! The journal's rules, one check for both stores (`testing::check_key_store`).
//!
//! Among them, two sequences that broke a store: `MemoryStore` lost a key from its index while
//! another operation still held it (pinning bypassed, where `SqliteJournal` refused), and a late
//! `finish` of an older run overwrote a newer run's record in both.

use idempotent_retry::journal::{MemoryStore, SqliteJournal};
use idempotent_retry::testing::check_key_store;

#[tokio::test]
async fn memory_store_follows_the_rules() {
    check_key_store(|| async { MemoryStore::new() }).await;
}

#[tokio::test]
async fn sqlite_journal_follows_the_rules() {
    let dir = std::env::temp_dir().join(format!("idem-it-{}-rules", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut n = 0;
    check_key_store(|| {
        n += 1;
        let path = dir.join(format!("journal-{n}.sqlite3"));
        async move { SqliteJournal::open(path).unwrap() }
    })
    .await;
}
