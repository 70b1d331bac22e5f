//! The journal's rules, the shared table (`testing::check_key_store`), unchanged.

use idempotent_retry::testing::check_key_store;

use crate::support;

#[tokio::test]
async fn postgres_journal_follows_the_rules() {
    let Some((url, _server)) = support::server().await else { return };
    let schema = support::schema("rules");
    let mut n = 0;
    check_key_store(|| {
        n += 1;
        let builder = support::builder(&url, &schema).scope(format!("rule-{n}"));
        async move { builder.open().await.expect("the journal opens") }
    })
    .await;
}
