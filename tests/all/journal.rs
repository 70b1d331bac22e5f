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

/// Stores written before the move name the store vocabulary at `journal::`; it moved to
/// `journal::store`, and the old paths still name the same types.
#[test]
fn the_store_vocabulary_keeps_its_old_paths() {
    use idempotent_retry::journal::{self, store};
    use std::any::TypeId;
    fn same<A: 'static, B: 'static>() -> bool {
        TypeId::of::<A>() == TypeId::of::<B>()
    }
    assert!(same::<journal::Begun, store::Begun>());
    assert!(same::<journal::Claim, store::Claim>());
    assert!(same::<journal::Finish, store::Finish>());
    assert!(same::<journal::Intent<'static>, store::Intent<'static>>());
    assert!(same::<journal::KeyPlan, store::KeyPlan>());
    assert!(same::<journal::Planned, store::Planned>());
}
