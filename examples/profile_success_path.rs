//! A fixed number of successful POSTs through one client, for counting instructions.
//!
//! ```text
//! cargo build --release --example profile_success_path
//! for n in 2000 4000; do
//!   valgrind --tool=callgrind --callgrind-out-file=cg.ours.$n target/release/examples/profile_success_path ours $n
//! done
//! # instructions per request = (total at 4000 - total at 2000) / 2000; the same for raw and retry
//! ```
//!
//! Client and server share one current-thread runtime, so the count covers both ends of each
//! request. Clients: `raw` (reqwest), `retry` (reqwest-middleware + reqwest-retry), `ours`, and
//! `retry-keyed`: reqwest-retry with a fresh UUIDv4 `Idempotency-Key` header set on each request
//! by hand, the peer doing the one job that costs the wire something (a header to build, write
//! and parse) that plain reqwest-retry leaves out.

#[path = "../benches/common/mod.rs"]
mod common;

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "ours".into());
    let n: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let body = common::body_200();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let addr = common::serve_here().await;
        let url = format!("http://{addr}/cvms");
        let (raw, retry, ours) = (common::raw(), common::reqwest_retry(), common::ours());
        for _ in 0..n {
            let response = match which.as_str() {
                "raw" => raw.post(&url).body(body.clone()).send().await.unwrap(),
                "retry" => retry.post(&url).body(body.clone()).send().await.unwrap(),
                "ours" => ours.post(&url).body(body.clone()).send().await.unwrap(),
                "retry-keyed" => retry
                    .post(&url)
                    .header("idempotency-key", uuid::Uuid::new_v4().hyphenated().to_string())
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap(),
                other => panic!("unknown client {other}: raw, retry, retry-keyed or ours"),
            };
            assert_eq!(response.status(), 201);
            response.bytes().await.unwrap();
        }
    });
}
