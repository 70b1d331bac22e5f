//! Success-path overhead: the same keep-alive POST of a 200-byte JSON body to a minimal
//! loopback server, through (a) raw reqwest, (b) reqwest-middleware with reqwest-retry,
//! (c) this crate's layer (keys on, no journal), and (c+j) an operation journaled in SQLite.
//!
//! Client and server share one thread (a current-thread runtime): a request's time is then the
//! CPU work of both ends, without the cross-thread wake-ups that dominate loopback latency on a
//! virtual machine and blur a few-percent difference into noise.
//!
//! ```text
//! cargo bench --bench overhead
//! ```
//!
//! After criterion's report it prints each median and the ratios c/a and c/b, and writes them
//! to `target/criterion/overhead-summary.json`.

// A benchmark measures wall time (see `clippy.toml`).
#![allow(clippy::disallowed_methods)]

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use criterion::Criterion;
use idempotent_retry::{Operations, journal::SqliteJournal};

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr = runtime.block_on(common::serve_here());
    let url = &format!("http://{addr}/cvms");
    let body = common::body_200();
    let mut group = c.benchmark_group("overhead");
    group.measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(2)).sample_size(100);

    let raw = common::raw();
    group.bench_function("a_raw_reqwest", |b| {
        b.to_async(&runtime).iter(|| async {
            let response =
                raw.post(url).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
            assert_eq!(response.status(), 201);
            response.bytes().await.unwrap()
        })
    });

    let retry = common::reqwest_retry();
    group.bench_function("b_reqwest_retry", |b| {
        b.to_async(&runtime).iter(|| async {
            let response =
                retry.post(url).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
            assert_eq!(response.status(), 201);
            response.bytes().await.unwrap()
        })
    });

    let ours = common::ours();
    group.bench_function("c_idempotent_retry", |b| {
        b.to_async(&runtime).iter(|| async {
            let response =
                ours.post(url).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
            assert_eq!(response.status(), 201);
            response.bytes().await.unwrap()
        })
    });

    let in_memory = Operations::new(common::ours(), idempotent_retry::journal::MemoryStore::new());
    let mut m = 0u64;
    group.bench_function("c_idempotent_retry_operation_memory", |b| {
        b.to_async(&runtime).iter(|| {
            m += 1;
            let op = in_memory
                .operation(format!("bench/{m}"))
                .post(url)
                .body(body.clone())
                .header("content-type", "application/json");
            async move { op.send().await.unwrap() }
        })
    });

    let dir = std::env::temp_dir().join(format!("idem-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ops = Operations::new(common::ours(), SqliteJournal::open(dir.join("journal.sqlite3")).unwrap());
    let mut n = 0u64;
    group.bench_function("c_idempotent_retry_journal", |b| {
        b.to_async(&runtime).iter(|| {
            n += 1;
            let op = ops
                .operation(format!("bench/{n}"))
                .post(url)
                .body(body.clone())
                .header("content-type", "application/json");
            async move { op.send().await.unwrap() }
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ratios, measured paired: rounds of requests alternate between the clients, so drift on a
/// shared machine (which criterion's one-after-another runs absorb into the figures) cancels.
/// Returns each client's median round mean, in µs per request.
fn interleaved(rounds: usize, per_round: usize) -> [f64; 3] {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let addr = common::serve_here().await;
        let url = format!("http://{addr}/cvms");
        let body = common::body_200();
        let (raw, retry, ours) = (common::raw(), common::reqwest_retry(), common::ours());
        let mut means: [Vec<f64>; 3] = Default::default();
        for _ in 0..rounds {
            for (i, mean) in means.iter_mut().enumerate() {
                let started = std::time::Instant::now();
                for _ in 0..per_round {
                    let request =
                        |client: &reqwest_middleware::ClientWithMiddleware| client.post(&url).body(body.clone()).send();
                    let response = match i {
                        0 => raw.post(&url).body(body.clone()).send().await.unwrap(),
                        1 => request(&retry).await.unwrap(),
                        _ => request(&ours).await.unwrap(),
                    };
                    response.bytes().await.unwrap();
                }
                mean.push(started.elapsed().as_secs_f64() * 1e6 / per_round as f64);
            }
        }
        means.map(|mut m| {
            m.sort_by(f64::total_cmp);
            m[m.len() / 2]
        })
    })
}

fn median_ns(name: &str) -> Option<f64> {
    let path = format!("target/criterion/overhead/{name}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["median"]["point_estimate"].as_f64()
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();

    let names = [
        "a_raw_reqwest",
        "b_reqwest_retry",
        "c_idempotent_retry",
        "c_idempotent_retry_operation_memory",
        "c_idempotent_retry_journal",
    ];
    let medians: Vec<Option<f64>> = names.iter().map(|n| median_ns(n)).collect();
    let [a, b, c] = interleaved(30, 1000);
    println!("\nsuccess path, paired (median of 30 interleaved rounds of 1000 requests, µs per request):");
    println!("  a raw reqwest {a:.2}   b reqwest-retry {b:.2}   c idempotent-retry {c:.2}");
    println!("  c/a = {:.3} (goal <= 1.03)   c/b = {:.3} (goal <= 1.00)", c / a, c / b);
    if let [Some(_), Some(_), Some(cc), Some(op), Some(j)] = medians[..] {
        println!(
            "  criterion medians: operation with MemoryStore {:.1} µs, with SqliteJournal {:.1} µs: the journal costs {:.1} µs per operation",
            op / 1000.0,
            j / 1000.0,
            (j - op) / 1000.0
        );
        let summary = serde_json::json!({
            "paired_us": { "raw": a, "reqwest_retry": b, "idempotent_retry": c },
            "c_over_a": c / a, "c_over_b": c / b,
            "criterion_median_us": {
                "raw": medians[0].unwrap() / 1000.0, "reqwest_retry": medians[1].unwrap() / 1000.0, "idempotent_retry": cc / 1000.0,
                "operation_memory": op / 1000.0, "operation_journal": j / 1000.0,
            },
            "journal_cost_us": (j - op) / 1000.0,
        });
        let _ = std::fs::create_dir_all("target/criterion");
        let _ = std::fs::write("target/criterion/overhead-summary.json", summary.to_string());
    }
}
