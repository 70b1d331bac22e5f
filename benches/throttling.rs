//! A fleet against a throttling server, with and without adaptive rate limiting: 32 workers
//! sharing one client send creates as fast as they are let, to a server on a real socket that
//! allows `RATE` requests in each second of the real clock and answers 429 above that.
//!
//! ```text
//! cargo bench --bench throttling
//! ```
//!
//! Reports, per mode, the share of requests answered 429 after the first 2 s and the goodput
//! (successes a second) as a share of `RATE`; prints a Markdown table and writes
//! `target/throttling-bench.json`. The issue's goals: with adaptive mode, ≤ 5% throttled after
//! 2 s and goodput ≥ 0.9 × `RATE`.

// A benchmark measures wall time (see `clippy.toml`).
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use idempotent_retry::{IdempotentRetry, RetryPolicy};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const RATE: u64 = 200;
const WORKERS: usize = 32;
const RUN: Duration = Duration::from_secs(12);
const WARM_UP: Duration = Duration::from_secs(2);

/// What the server saw, after the warm-up.
#[derive(Default)]
struct Tally {
    second: AtomicU64,
    in_second: AtomicU64,
    ok_after: AtomicU64,
    throttled_after: AtomicU64,
}

/// A minimal HTTP/1.1 server: each request counted into its wall-clock second; above `RATE` in
/// that second, a 429 with no `Retry-After` (many APIs send none), else a 201.
async fn serve(listener: TcpListener, tally: Arc<Tally>, started: Instant) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { return };
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut have = 0;
            loop {
                let Ok(n) = stream.read(&mut buf[have..]).await else { return };
                if n == 0 {
                    return;
                }
                have += n;
                // Requests are small, with a Content-Length body: find each one's end.
                while let Some(end) = request_end(&buf[..have]) {
                    let second = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
                    if tally.second.swap(second, Ordering::SeqCst) != second {
                        tally.in_second.store(0, Ordering::SeqCst);
                    }
                    let throttled = tally.in_second.fetch_add(1, Ordering::SeqCst) >= RATE;
                    if started.elapsed() >= WARM_UP {
                        let counter = if throttled { &tally.throttled_after } else { &tally.ok_after };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    let answer: &[u8] = if throttled {
                        b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"
                    };
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    buf.copy_within(end..have, 0);
                    have -= end;
                }
            }
        });
    }
}

fn request_end(buf: &[u8]) -> Option<usize> {
    let head = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = std::str::from_utf8(&buf[..head]).ok()?;
    let len = text
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
        .and_then(Result::ok)
        .unwrap_or(0);
    (buf.len() >= head + len).then_some(head + len)
}

struct Figures {
    throttled_share: f64,
    goodput_share: f64,
    failed: u64,
}

async fn run(adaptive: bool) -> Figures {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cvms", listener.local_addr().unwrap());
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    tokio::spawn(serve(listener, tally.clone(), started));
    let policy = RetryPolicy::standard().with_max_attempts(10).with_deadline(Duration::from_secs(60));
    let mut layer = IdempotentRetry::builder().policy(policy).no_budget();
    if adaptive {
        layer = layer.adaptive();
    }
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).with(layer.build()).build();
    let failed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (client, url, failed) = (client.clone(), url.clone(), failed.clone());
            tokio::spawn(async move {
                while started.elapsed() < RUN {
                    if client.post(&url).body("{}").send().await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let (ok, throttled) = (tally.ok_after.load(Ordering::Relaxed), tally.throttled_after.load(Ordering::Relaxed));
    let measured = (started.elapsed() - WARM_UP).as_secs_f64();
    Figures {
        throttled_share: throttled as f64 / (ok + throttled).max(1) as f64,
        goodput_share: ok as f64 / measured / RATE as f64,
        failed: failed.load(Ordering::Relaxed),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (with, without) = rt.block_on(async { (run(true).await, run(false).await) });
    println!(
        "\n{WORKERS} workers, one client, a server allowing {RATE} requests a second, {} s each:\n",
        RUN.as_secs()
    );
    println!(
        "| mode | throttled after 2 s (goal ≤ 5%) | goodput ÷ allowed rate (goal ≥ 0.90) | requests that failed |"
    );
    println!("|---|---|---|---|");
    for (name, f) in [("adaptive", &with), ("backoff only", &without)] {
        println!("| {name} | {:.1}% | {:.3} | {} |", 100.0 * f.throttled_share, f.goodput_share, f.failed);
    }
    let report = json!({
        "rate": RATE, "workers": WORKERS, "seconds": RUN.as_secs(),
        "adaptive": { "throttled_share": with.throttled_share, "goodput_share": with.goodput_share, "failed": with.failed },
        "backoff_only": { "throttled_share": without.throttled_share, "goodput_share": without.goodput_share, "failed": without.failed },
    });
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
    let _ = std::fs::create_dir_all(&target);
    std::fs::write(format!("{target}/throttling-bench.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
}
