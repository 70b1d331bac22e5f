//! The figures that are counts, not times: attempts per operation under faults, duplicates,
//! wait efficiency, amplification in an outage, throughput and memory at concurrency 512, and
//! the reconcile scale-up. This crate beside raw reqwest and reqwest-retry, in one run.
//!
//! ```text
//! cargo bench --bench figures
//! ```
//!
//! Prints a Markdown table (docs/performance.md's), writes `figures.json` in the target
//! directory, and draws `docs/attempts-per-operation.svg`.

// A benchmark measures wall time, and its servers run on the real clock (see `clippy.toml`).
#![allow(clippy::disallowed_methods)]

#[path = "common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::{Extensions, Method};
use idempotent_retry::testing::{
    ChaosProxy, FakeCloud, Fault, FaultMix, RetryAfter, Schedule, ServerProfile, replicas,
};
use idempotent_retry::{
    IdempotentRetry, Operations, Reconciler, RetryPolicy,
    backoff::ExponentialBackoff,
    journal::MemoryStore,
    reconcile::Desired,
    time::{ManualClock, RecordingSleeper},
};
use reqwest::{Request, Response};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use serde_json::{Value, json};

const CHILD: &str = "IDEM_FIGURES_CHILD";

/// Our layer with injected time: waits are recorded, not slept (and advance a manual clock).
/// The delays our layer requested, recorded by its `on_retry` hook.
type Delays = Arc<Mutex<Vec<Duration>>>;

fn ours_fast(budget: bool, delays: Option<Delays>) -> ClientWithMiddleware {
    let clock = ManualClock::new(std::time::SystemTime::now());
    let mut layer = IdempotentRetry::builder()
        .clock(clock.clone())
        .sleeper(RecordingSleeper::advancing(&clock))
        // No attempt timeout: the manual clock is shared by every concurrent operation and moved
        // by each one's sleeps, so a 10 s attempt limit on it would fire for requests that took
        // milliseconds of real time, and count retries no real client makes.
        .policy(RetryPolicy::standard().without_deadline().without_attempt_timeout());
    if !budget {
        layer = layer.no_budget();
    }
    if let Some(delays) = delays {
        layer = layer.on_retry(move |e| delays.lock().unwrap().push(e.delay));
    }
    ClientBuilder::new(common::raw()).with(layer.build()).build()
}

/// reqwest-retry's default strategy, with delays shortened to 1–10 ms: attempts and duplicates do
/// not depend on how long it waits.
fn reqwest_retry_fast() -> ClientWithMiddleware {
    use reqwest_retry::RetryTransientMiddleware;
    use reqwest_retry::policies::ExponentialBackoff;
    let policy = ExponentialBackoff::builder()
        .retry_bounds(Duration::from_millis(1), Duration::from_millis(10))
        .build_with_max_retries(3);
    ClientBuilder::new(common::raw()).with(RetryTransientMiddleware::new_with_policy(policy)).build()
}

/// Runs `ops` creates through `client` at `concurrency`; the number of 2xx answers.
async fn creates(client: &ClientWithMiddleware, url: &str, ops: usize, concurrency: usize) -> usize {
    futures_util::stream::iter(0..ops)
        .map(|i| async move {
            let body = json!({ "name": format!("cvm-{i:05}") });
            client.post(url).json(&body).send().await.is_ok_and(|r| r.status().is_success())
        })
        .buffer_unordered(concurrency)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await
}

struct FaultRun {
    attempts_per_op: f64,
    duplicates: usize,
    succeeded: usize,
}

async fn faults(p: f64, ours: bool, ops: usize, seed: u64) -> FaultRun {
    let cloud = FakeCloud::start(ServerProfile::stripe()).await;
    let mix = FaultMix::chaos().with_retry_after(Some(RetryAfter::Seconds(1))).scaled_to(p);
    let proxy =
        ChaosProxy::builder(cloud.address()).schedule(Schedule::random(seed, mix)).only(Method::POST).start().await;
    let client = if ours { ours_fast(false, None) } else { reqwest_retry_fast() };
    let succeeded = creates(&client, &format!("{}/cvms", proxy.uri()), ops, 32).await;
    proxy.settle().await;
    FaultRun { attempts_per_op: proxy.requests() as f64 / ops as f64, duplicates: cloud.duplicates(), succeeded }
}

/// Records when each attempt of each operation started and ended (below the retry layer).
#[derive(Clone, Default)]
struct Timeline(Arc<Mutex<Vec<(String, Instant, Instant)>>>);

#[async_trait::async_trait]
impl Middleware for Timeline {
    async fn handle(&self, req: Request, ext: &mut Extensions, next: Next<'_>) -> reqwest_middleware::Result<Response> {
        let op = req.headers().get("x-op").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let started = Instant::now();
        let result = next.run(req, ext).await;
        self.0.lock().unwrap().push((op, started, Instant::now()));
        result
    }
}

/// Total wait requested after a 503/429 with `Retry-After: 1`, over the sum of those Retry-Afters.
async fn wait_efficiency(ours: bool, ops: usize) -> (f64, usize) {
    let cloud = FakeCloud::start(ServerProfile::stripe()).await;
    let mix = FaultMix::none().with_status(0.3).with_retry_after(Some(RetryAfter::Seconds(1)));
    let proxy =
        ChaosProxy::builder(cloud.address()).schedule(Schedule::random(5, mix)).only(Method::POST).start().await;
    let url = format!("{}/cvms", proxy.uri());
    if ours {
        let delays = Arc::new(Mutex::new(Vec::new()));
        let client = ours_fast(false, Some(delays.clone()));
        creates(&client, &url, ops, 32).await;
        let delays = delays.lock().unwrap();
        let waited: Duration = delays.iter().sum();
        (waited.as_secs_f64() / delays.len() as f64, delays.len())
    } else {
        use reqwest_retry::RetryTransientMiddleware;
        use reqwest_retry::policies::ExponentialBackoff;
        let timeline = Timeline::default();
        let client = ClientBuilder::new(common::raw())
            .with(RetryTransientMiddleware::new_with_policy(ExponentialBackoff::builder().build_with_max_retries(3)))
            .with(timeline.clone())
            .build();
        futures_util::stream::iter(0..ops)
            .map(|i| {
                let (client, url) = (&client, &url);
                async move { client.post(url).header("x-op", i.to_string()).body("{}").send().await }
            })
            .buffer_unordered(ops)
            .count()
            .await;
        let mut attempts = timeline.0.lock().unwrap().clone();
        attempts.sort_by_key(|(op, started, _)| (op.clone(), *started));
        let waits: Vec<Duration> = attempts.windows(2).filter(|w| w[0].0 == w[1].0).map(|w| w[1].1 - w[0].2).collect();
        let waited: Duration = waits.iter().sum();
        (waited.as_secs_f64() / waits.len() as f64, waits.len())
    }
}

/// Requests per operation when every request gets a 503.
async fn outage(client: ClientWithMiddleware, ops: usize, concurrency: usize) -> f64 {
    let outage = ChaosProxy::start(
        "127.0.0.1:9".parse().unwrap(),
        Schedule::always(Fault::Status { status: 503, retry_after: None }),
    )
    .await;
    let url = format!("{}/cvms", outage.uri());
    creates(&client, &url, ops, concurrency).await;
    outage.requests() as f64 / ops as f64
}

fn rss_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

/// In a child process: 10,000 POSTs at concurrency 512 to the parent's server.
fn concurrency_child(which: &str, url: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let result = runtime.block_on(async {
        let client = match which {
            "raw" => ClientBuilder::new(common::raw()).build(),
            "retry" => common::reqwest_retry(),
            _ => common::ours(),
        };
        // Warm up the connection pool, then measure from a settled baseline.
        creates(&client, url, 1024, 512).await;
        let base = rss_kb("VmRSS:");
        let started = Instant::now();
        let ok = creates(&client, url, 10_000, 512).await;
        let seconds = started.elapsed().as_secs_f64();
        json!({ "ok": ok, "ops_per_s": 10_000.0 / seconds, "base_rss_kb": base, "peak_rss_kb": rss_kb("VmHWM:") })
    });
    println!("FIGURES_CHILD {result}");
}

fn run_child(which: &str, url: &str) -> Value {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env(CHILD, format!("{which} {url}"))
        .output()
        .expect("the bench binary runs as a child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line =
        stdout.lines().find_map(|l| l.strip_prefix("FIGURES_CHILD ")).unwrap_or_else(|| panic!("no result: {stdout}"));
    serde_json::from_str(line).unwrap()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

async fn reconcile_scale() -> Value {
    let cloud = FakeCloud::start(ServerProfile::stripe()).await;
    let p = 0.3;
    let mix = FaultMix::chaos().with_retry_after(Some(RetryAfter::Seconds(0))).scaled_to(p);
    let proxy = ChaosProxy::start(cloud.address(), Schedule::random(42, mix)).await;
    let policy = RetryPolicy::standard()
        .with_max_attempts(8)
        .with_backoff(ExponentialBackoff::new(Duration::from_millis(10), Duration::from_millis(500)));
    let ops =
        Operations::with_layer(common::raw(), IdempotentRetry::builder().policy(policy).build(), MemoryStore::new());
    let mut reconciler =
        Reconciler::new(ops, format!("{}/{}", proxy.uri(), replicas("app-1", "vm-1")), "replicas/scale")
            .concurrency(32)
            .poll_interval(Duration::from_millis(50));
    let report = reconciler.reconcile(&Desired::Count(1000)).await.expect("converges");
    let sent = proxy.requests();
    json!({ "final": cloud.resources(&replicas("app-1", "vm-1")).len(), "requests": sent, "ideal": 1001,
            "ratio": sent as f64 / 1001.0, "goal": 1.1 / (1.0 - p), "rounds": report.rounds })
}

fn chart(points: &[(f64, f64, f64)], path: &str) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Requests per logical operation under faults", ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0f64..0.6f64, 0.9f64..2.4f64)?;
    chart.configure_mesh().x_desc("fault rate p").y_desc("requests per operation").draw()?;
    chart
        .draw_series(LineSeries::new(
            (0..=55).map(|i| i as f64 / 100.0).map(|p| (p, 1.0 / (1.0 - p))),
            BLACK.stroke_width(1),
        ))?
        .label("1/(1-p): one retry per fault")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK));
    let ours = RGBColor(0, 114, 178);
    let theirs = RGBColor(213, 94, 0);
    chart
        .draw_series(LineSeries::new(points.iter().map(|(p, o, _)| (*p, *o)), ours.stroke_width(2)))?
        .label("idempotent-retry")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], ours.stroke_width(2)));
    chart.draw_series(points.iter().map(|(p, o, _)| Circle::new((*p, *o), 4, ours.filled())))?;
    chart
        .draw_series(LineSeries::new(points.iter().map(|(p, _, t)| (*p, *t)), theirs.stroke_width(2)))?
        .label("reqwest-retry (3 retries)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], theirs.stroke_width(2)));
    chart.draw_series(points.iter().map(|(p, _, t)| TriangleMarker::new((*p, *t), 5, theirs.filled())))?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        let (which, url) = spec.split_once(' ').expect("which url");
        return concurrency_child(which, url);
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and friends: nothing to list.
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("figures on {cores} cores\n");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut table = Vec::new();
    let mut out = json!({ "cores": cores });

    // Attempts per operation, and duplicates.
    let mut points = Vec::new();
    for (i, p) in [0.1, 0.3, 0.5].into_iter().enumerate() {
        let ours = runtime.block_on(faults(p, true, 1000, 100 + i as u64));
        let theirs = runtime.block_on(faults(p, false, 1000, 100 + i as u64));
        let ideal = 1.0 / (1.0 - p);
        println!(
            "p = {p}: requests per operation: ours {:.3}, reqwest-retry {:.3}, 1/(1-p) = {ideal:.3}; duplicates: ours {}, reqwest-retry {}; succeeded: ours {}, reqwest-retry {}",
            ours.attempts_per_op,
            theirs.attempts_per_op,
            ours.duplicates,
            theirs.duplicates,
            ours.succeeded,
            theirs.succeeded
        );
        table.push(format!(
            "| requests per operation at p = {p} (ideal 1/(1−p) = {ideal:.3}) | ≤ 1.05 × ideal = {:.3} | **{:.3}** ({}) | {:.3} |",
            1.05 * ideal,
            ours.attempts_per_op,
            if ours.attempts_per_op <= 1.05 * ideal { "met" } else { "missed" },
            theirs.attempts_per_op
        ));
        table.push(format!(
            "| duplicates at p = {p}, 1000 creates | 0 | **{}** | {} |",
            ours.duplicates, theirs.duplicates
        ));
        out[format!("p{p}")] = json!({ "ours": ours.attempts_per_op, "reqwest_retry": theirs.attempts_per_op, "ideal": ideal,
            "ours_duplicates": ours.duplicates, "reqwest_retry_duplicates": theirs.duplicates });
        points.push((p, ours.attempts_per_op, theirs.attempts_per_op));
    }

    // Wait efficiency.
    let (ours_eff, ours_n) = runtime.block_on(wait_efficiency(true, 1000));
    let (theirs_eff, theirs_n) = runtime.block_on(wait_efficiency(false, 200));
    println!(
        "wait after Retry-After: 1 — ours {ours_eff:.3}x over {ours_n} retries; reqwest-retry {theirs_eff:.3}x over {theirs_n} retries"
    );
    table.push(format!(
        "| wait requested ÷ server's `Retry-After` | within [1.0, 1.1] | **{ours_eff:.3}** ({}) | {theirs_eff:.3} (ignores it) |",
        if (1.0..=1.1).contains(&ours_eff) { "met" } else { "missed" }
    ));
    out["wait_efficiency"] = json!({ "ours": ours_eff, "reqwest_retry": theirs_eff });

    // Sustained outage.
    let with_budget = runtime.block_on(outage(ours_fast(true, None), 10_000, 64));
    let without_budget = runtime.block_on(outage(ours_fast(false, None), 2_000, 64));
    let theirs_outage = runtime.block_on(outage(common::reqwest_retry(), 1_000, 500));
    println!(
        "outage amplification: ours with budget {with_budget:.3}, without {without_budget:.3}, reqwest-retry {theirs_outage:.3}"
    );
    table.push(format!(
        "| requests per operation, every request 503 | ≤ 1.05 with the budget | **{with_budget:.3}** with the budget ({}), {without_budget:.3} without | {theirs_outage:.3} |",
        if with_budget <= 1.05 { "met" } else { "missed" }
    ));
    out["outage"] =
        json!({ "ours_budget": with_budget, "ours_no_budget": without_budget, "reqwest_retry": theirs_outage });

    // Concurrency, each client in a child process of its own (its own peak RSS).
    let addr = common::serve();
    let url = format!("http://{addr}/cvms");
    let (mut raw_runs, mut ours_runs, mut retry_runs) = (Vec::new(), Vec::new(), Vec::new());
    // Alternating runs, medians: this kind of figure swings by several percent on a shared machine.
    for _ in 0..5 {
        raw_runs.push(run_child("raw", &url));
        ours_runs.push(run_child("ours", &url));
        retry_runs.push(run_child("retry", &url));
    }
    let throughput = |runs: &[Value]| median(runs.iter().map(|r| r["ops_per_s"].as_f64().unwrap()).collect());
    let peak = |runs: &[Value]| median(runs.iter().map(|r| r["peak_rss_kb"].as_f64().unwrap()).collect());
    let per_op = |runs: &[Value]| {
        median(
            runs.iter()
                .map(|r| (r["peak_rss_kb"].as_f64().unwrap() - r["base_rss_kb"].as_f64().unwrap()) * 1024.0 / 512.0)
                .collect(),
        )
    };
    let (raw_tp, ours_tp, retry_tp) = (throughput(&raw_runs), throughput(&ours_runs), throughput(&retry_runs));
    println!(
        "concurrency 512: raw {raw_tp:.0} ops/s, ours {ours_tp:.0} ops/s ({:.3}x), reqwest-retry {retry_tp:.0} ops/s; peak RSS raw {:.1} MiB, ours {:.1} MiB; per in-flight operation raw {:.0} B, ours {:.0} B",
        ours_tp / raw_tp,
        peak(&raw_runs) / 1024.0,
        peak(&ours_runs) / 1024.0,
        per_op(&raw_runs),
        per_op(&ours_runs)
    );
    table.push(format!(
        "| throughput at concurrency 512, relative to raw reqwest ({raw_tp:.0} ops/s) | ≥ 0.95 | **{:.3}** ({}) | {:.3} |",
        ours_tp / raw_tp,
        if ours_tp / raw_tp >= 0.95 { "met" } else { "missed" },
        retry_tp / raw_tp
    ));
    table.push(format!(
        "| peak RSS at concurrency 512 / memory per in-flight operation | reported | {:.1} MiB / {:.1} KiB (raw reqwest: {:.1} MiB / {:.1} KiB) | – |",
        peak(&ours_runs) / 1024.0,
        per_op(&ours_runs) / 1024.0,
        peak(&raw_runs) / 1024.0,
        per_op(&raw_runs) / 1024.0
    ));
    out["concurrency"] = json!({ "raw_ops_per_s": raw_tp, "ours_ops_per_s": ours_tp, "reqwest_retry_ops_per_s": retry_tp, "ratio": ours_tp / raw_tp,
        "raw_peak_rss_kb": peak(&raw_runs), "ours_peak_rss_kb": peak(&ours_runs),
        "raw_bytes_per_inflight": per_op(&raw_runs), "ours_bytes_per_inflight": per_op(&ours_runs) });

    // Reconcile.
    let reconcile = runtime.block_on(reconcile_scale());
    println!("reconcile 0 -> 1000 at 30% faults: {reconcile}");
    table.push(format!(
        "| reconcile 0 → 1000 replicas at p = 0.3: final count; requests ÷ ideal | exactly 1000; ≤ 1.1/(1−p) = 1.571 | **{}**; **{:.3}** | – |",
        reconcile["final"], reconcile["ratio"].as_f64().unwrap()
    ));
    out["reconcile"] = reconcile;

    let _ = std::fs::create_dir_all("docs");
    if let Err(e) = chart(&points, "docs/attempts-per-operation.svg") {
        eprintln!("chart: {e}");
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
    let _ = std::fs::create_dir_all(&target);
    if let Err(e) = std::fs::write(format!("{target}/figures.json"), serde_json::to_string_pretty(&out).unwrap()) {
        eprintln!("{target}/figures.json: {e}");
    }
    println!("\n| figure | goal | idempotent-retry | reqwest-retry |\n|---|---|---|---|");
    for row in table {
        println!("{row}");
    }
}
