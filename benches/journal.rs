//! The journal's cost, store beside store, in one run: `begin` + `finish` of one operation on
//! `MemoryStore`, `SqliteJournal` (a file, fsynced before the send) and `PostgresJournal` (a
//! local server, committed before the send), and the throughput of 8 runners, each a machine
//! with a journal of its own on one PostgreSQL database, 500 operations each, beside one.
//!
//! ```text
//! pg_virtualenv cargo bench --bench journal
//! ```
//!
//! The PostgreSQL rows need the server libpq's environment names (`pg_virtualenv` exports it);
//! without one the bench says so and measures the other two. Prints a Markdown table (the one
//! in docs/postgres.md) and writes `target/journal-bench.json`.

// A benchmark measures wall time (see `clippy.toml`).
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use idempotent_retry::journal::{
    Begun, Finish, Intent, KeyPlan, KeyStore, MemoryStore, OpState, PostgresJournal, SqliteJournal, fingerprint,
};
use serde_json::json;

const OPS: usize = 2000;
const RUNNERS: usize = 8;
const PER_RUNNER: usize = 500;

/// One operation: `begin` (random key, a new name), then `finish` as succeeded.
async fn one(store: &dyn KeyStore, name: &str, fp: &str) {
    let intent = Intent::new(name, "POST", "https://api.test/cvms", fp, KeyPlan::Random, SystemTime::now());
    let Begun::Send { claim, .. } = store.begin(&intent).await.expect("begin") else { panic!("a new operation sends") };
    let finish = Finish::new(claim, OpState::Succeeded, SystemTime::now()).status(Some(201));
    assert!(store.finish(name, &finish).await.expect("finish"));
}

/// Median and mean of `OPS` operations, one after another, in microseconds.
async fn latency(store: &dyn KeyStore, tag: &str) -> (f64, f64) {
    let fp = fingerprint("POST", "https://api.test/cvms", b"{}");
    for n in 0..50 {
        one(store, &format!("{tag}/warm/{n}"), &fp).await;
    }
    let mut times = Vec::with_capacity(OPS);
    for n in 0..OPS {
        let started = Instant::now();
        one(store, &format!("{tag}/op/{n}"), &fp).await;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    (times[OPS / 2], times.iter().sum::<f64>() / OPS as f64)
}

/// Operations a second: `runners` machines (a journal each, on `url`) running `PER_RUNNER`
/// operations each at once, every one its own operation.
async fn throughput(url: &str, schema: &str, runners: usize) -> f64 {
    let mut journals = Vec::new();
    for _ in 0..runners {
        journals.push(Arc::new(PostgresJournal::builder(url).schema(schema).pool_size(2).open().await.expect("open")));
    }
    let fp = fingerprint("POST", "https://api.test/cvms", b"{}");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (r, journal) in journals.into_iter().enumerate() {
        let fp = fp.clone();
        tasks.spawn(async move {
            for n in 0..PER_RUNNER {
                one(&*journal, &format!("runners-{runners}/r{r}/op{n}"), &fp).await;
            }
        });
    }
    tasks.join_all().await;
    (runners * PER_RUNNER) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no arguments: then
    // it only checks that it starts.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut rows = Vec::new();
        let memory = latency(&MemoryStore::new(), "memory").await;
        rows.push(("MemoryStore", memory));
        let dir = std::env::temp_dir().join(format!("idem-journal-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sqlite = latency(&SqliteJournal::open(dir.join("journal.sqlite3")).unwrap(), "sqlite").await;
        rows.push(("SqliteJournal", sqlite));
        let _ = std::fs::remove_dir_all(&dir);
        let pg = match PostgresJournal::url_from_env() {
            Some(url) => {
                let schema = format!("idem_bench_{}", std::process::id());
                let journal = PostgresJournal::builder(&url).schema(&schema).open().await.expect("open");
                let pg = latency(&journal, "postgres").await;
                rows.push(("PostgresJournal", pg));
                let one = throughput(&url, &schema, 1).await;
                let many = throughput(&url, &schema, RUNNERS).await;
                Some((pg, one, many))
            }
            None => {
                eprintln!("no PostgreSQL (PGHOST unset): run `pg_virtualenv cargo bench --bench journal` for its rows");
                None
            }
        };
        println!("| store | begin + finish, median | mean |\n|---|---|---|");
        for (name, (median, mean)) in &rows {
            println!("| {name} | {median:.0} µs | {mean:.0} µs |");
        }
        let mut figures = json!({
            "memory_us": memory,
            "sqlite_us": sqlite,
        });
        if let Some((pg, one, many)) = pg {
            println!(
                "\nPostgreSQL ÷ SQLite, median: {:.2}× (goal ≤ 2×)\n\n| runners (a journal each, one database) | operations/s |\n|---|---|\n| 1 × {PER_RUNNER} | {one:.0} |\n| {RUNNERS} × {PER_RUNNER} | {many:.0} ({:.1}× one runner; goal ≥ 4×) |",
                pg.0 / sqlite.0,
                many / one
            );
            figures["postgres_us"] = json!(pg);
            figures["throughput_1"] = json!(one);
            figures["throughput_8"] = json!(many);
        }
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/journal-bench.json");
        let _ = std::fs::write(target, figures.to_string());
    });
}
