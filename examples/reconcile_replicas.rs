//! Scale a CVM's replicas 0 → 5 → 2 → 7 through 30% faults and a lagging list.
//!
//! ```text
//! cargo run --example reconcile_replicas                      # a server that honours keys (Stripe-like)
//! cargo run --example reconcile_replicas -- --profile no_keys  # Phala's replica endpoint: no keys at all
//! cargo run --example reconcile_replicas -- --seed 7 --fault-rate 0.5 --lag 3
//! ```
//!
//! Each step prints its report; the last line is JSON: `{"profile":…,"steps":[{"desired":5,"after":5,"overshoot":0,…},…]}`.
//! With keys, every create has a stable per-slot key and a retry after a lost response is a
//! replay. Without keys, a lost create is settled by watching the list (the expectation stays
//! until an item that is new since the send shows, and that item is then *presumed* ours),
//! never by a blind resend.

use std::time::Duration;

use idempotent_retry::testing::{ChaosProxy, FakeCloud, FaultMix, RetryAfter, Schedule, ServerProfile, replicas};
use idempotent_retry::{
    IdempotentRetry, Operations, Reconciler, RetryPolicy,
    backoff::ExponentialBackoff,
    journal::MemoryStore,
    reconcile::{Desired, Prune},
};

struct Options {
    profile: String,
    seed: u64,
    fault_rate: f64,
    lag: u32,
}

fn options() -> Result<Options, String> {
    let mut o = Options { profile: "stripe".into(), seed: 42, fault_rate: 0.3, lag: 2 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--profile" => o.profile = value,
            "--seed" => o.seed = value.parse().map_err(|e| format!("--seed: {e}"))?,
            "--fault-rate" => o.fault_rate = value.parse().map_err(|e| format!("--fault-rate: {e}"))?,
            "--lag" => o.lag = value.parse().map_err(|e| format!("--lag: {e}"))?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(o)
}

fn profile(name: &str) -> Result<ServerProfile, String> {
    Ok(match name {
        "ietf" => ServerProfile::ietf(),
        "stripe" => ServerProfile::stripe(),
        "brandur" => ServerProfile::brandur(),
        "django" => ServerProfile::django(),
        "express" => ServerProfile::express(),
        "bencher" => ServerProfile::bencher(),
        "tower" => ServerProfile::tower(),
        "no_keys" => ServerProfile::no_keys(),
        other => return Err(format!("unknown profile {other}")),
    })
}

#[tokio::main]
async fn main() {
    let (options, profile) = match options().and_then(|o| profile(&o.profile).map(|p| (o, p))) {
        Ok(ok) => ok,
        Err(why) => {
            eprintln!(
                "reconcile_replicas: {why}\nusage: reconcile_replicas [--profile stripe|ietf|…|no_keys] [--seed N] [--fault-rate 0..1] [--lag LISTS]"
            );
            std::process::exit(2);
        }
    };
    let (app, vm) = ("app-7f3a", "vm-0b1c");
    let cloud = FakeCloud::builder(profile.clone()).list_lag(options.lag).start().await;
    // 30% of all requests (lists and deletes too) meet a fault; injected statuses say Retry-After: 0.
    let mix = FaultMix::chaos().with_retry_after(Some(RetryAfter::Seconds(0))).scaled_to(options.fault_rate);
    let proxy = ChaosProxy::start(cloud.address(), Schedule::random(options.seed, mix)).await;

    let policy = RetryPolicy::standard()
        .with_backoff(ExponentialBackoff::new(Duration::from_millis(20), Duration::from_secs(1)));
    let layer = profile.configure(IdempotentRetry::builder().policy(policy)).build();
    let ops = Operations::with_layer(reqwest::Client::new(), layer, MemoryStore::new()).scope("tenant-42");
    let url = format!("{}/{}", proxy.uri(), replicas(app, vm));
    let mut reconciler = Reconciler::new(ops, url, format!("replicas/{app}/{vm}"))
        .expect_field("app_id", app)
        .expect_field("vm_uuid", vm)
        .prune(Prune::Ours)
        .poll_interval(Duration::from_millis(100))
        .expectation_ttl(Duration::from_secs(5));
    if !profile.takes_keys() {
        // No other writer uses this collection: an item only presumed this run's (it appeared
        // after a create whose answer was lost) may be deleted too when scaling down.
        reconciler = reconciler.keyless().prune(Prune::Any);
    }

    println!(
        "replicas of {vm} on a {} server, {:.0}% faults, lists lag by {}\n",
        profile.name,
        options.fault_rate * 100.0,
        options.lag
    );
    let mut steps = Vec::new();
    for (desired, generation) in [(5, 1), (2, 1), (7, 2)] {
        reconciler = reconciler.generation(generation);
        match reconciler.reconcile(&Desired::Count(desired)).await {
            Ok(report) => {
                println!("scale to {desired} (generation {generation}): {report}");
                steps.push(report);
            }
            Err(e) => {
                println!("scale to {desired}: {e}\n  {}", e.report);
                steps.push(*e.report);
                break;
            }
        }
    }
    let live = cloud.resources(&replicas(app, vm)).len();
    println!(
        "\nthe server holds {live} replicas; {} created in all, {} requests through the proxy, {} faults injected",
        cloud.created(),
        proxy.requests(),
        proxy.faults_injected()
    );
    println!("{}", serde_json::json!({ "profile": profile.name, "steps": steps }));
}
