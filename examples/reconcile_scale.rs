//! Scale 0 → 1000 replicas through 30% faults and count what it cost.
//!
//! ```text
//! cargo run --release --example reconcile_scale
//! cargo run --release --example reconcile_scale -- --replicas 2000 --fault-rate 0.5 --seed 3
//! ```
//!
//! Prints the final count, the requests sent (creates, their retries, lists), and their ratio to
//! the ideal: one create per replica and one list. A fault costs a retry, so the expected ratio
//! is about 1/(1−p); the goal is at most 1.1 × 1/(1−p). The last line is JSON.

use std::time::{Duration, Instant};

use idempotent_retry::testing::{ChaosProxy, FakeCloud, FaultMix, RetryAfter, Schedule, ServerProfile, replicas};
use idempotent_retry::{
    IdempotentRetry, Operations, Reconciler, RetryPolicy, backoff::ExponentialBackoff, journal::MemoryStore,
    reconcile::Desired,
};

#[tokio::main]
async fn main() {
    let mut target = 1000usize;
    let mut p = 0.3f64;
    let mut seed = 42u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--replicas" => target = value.parse().expect("--replicas N"),
            "--fault-rate" => p = value.parse().expect("--fault-rate 0..1"),
            "--seed" => seed = value.parse().expect("--seed N"),
            _ => {
                eprintln!("usage: reconcile_scale [--replicas N] [--fault-rate 0..1] [--seed N]");
                std::process::exit(2);
            }
        }
    }
    let (app, vm) = ("app-1", "vm-1");
    let cloud = FakeCloud::start(ServerProfile::stripe()).await;
    let mix = FaultMix::chaos().with_retry_after(Some(RetryAfter::Seconds(0))).scaled_to(p);
    let proxy = ChaosProxy::start(cloud.address(), Schedule::random(seed, mix)).await;
    let policy = RetryPolicy::standard()
        .with_max_attempts(8)
        .with_backoff(ExponentialBackoff::new(Duration::from_millis(10), Duration::from_millis(500)));
    let ops = Operations::with_layer(
        reqwest::Client::new(),
        IdempotentRetry::builder().policy(policy).build(),
        MemoryStore::new(),
    );
    let mut reconciler = Reconciler::new(ops, format!("{}/{}", proxy.uri(), replicas(app, vm)), "replicas/scale")
        .expect_field("vm_uuid", vm)
        .concurrency(32)
        .poll_interval(Duration::from_millis(50));

    // The run goes through a real proxy on the real clock: the example reports how long it took.
    #[allow(clippy::disallowed_methods)]
    let started = Instant::now();
    let report = match reconciler.reconcile(&Desired::Count(target)).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("{e}");
            *e.report
        }
    };
    let elapsed = started.elapsed();

    let live = cloud.resources(&replicas(app, vm)).len();
    let sent = proxy.requests();
    let ideal = target + 1;
    let ratio = sent as f64 / ideal as f64;
    let bound = 1.1 / (1.0 - p);
    println!("scaled 0 -> {target} at {:.0}% faults (seed {seed}) in {:.2}s", p * 100.0, elapsed.as_secs_f64());
    println!("final count        {live} (created {}, duplicates {})", cloud.created(), cloud.duplicates());
    println!("requests sent      {sent} ({} faults injected; {} rounds)", proxy.faults_injected(), report.rounds);
    println!("ideal requests     {ideal} (one create per replica, one list)");
    println!(
        "ratio              {ratio:.3}   1/(1-p) = {:.3}   goal <= 1.1/(1-p) = {bound:.3}   {}",
        1.0 / (1.0 - p),
        if ratio <= bound { "met" } else { "MISSED" }
    );
    println!(
        "{}",
        serde_json::json!({
            "replicas": target, "fault_rate": p, "final": live, "created": cloud.created(), "duplicates": cloud.duplicates(),
            "requests": sent, "ideal": ideal, "ratio": ratio, "goal": bound, "rounds": report.rounds,
            "converged": report.converged, "seconds": elapsed.as_secs_f64(),
        })
    );
}
