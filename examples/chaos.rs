//! The difference in one command: the same faults, two retry layers, count the duplicates.
//!
//! ```text
//! cargo run --example chaos
//! cargo run --example chaos -- --ops 500 --seed 7 --fault-rate 0.5 --retry-after 0 --concurrency 32
//! ```
//!
//! A fake cloud (Stripe-like idempotency: `Idempotency-Key`, stored responses) sits behind a
//! chaos proxy on real sockets. A seeded share of the `POST /cvms` requests meet a fault: by
//! default 20% have their response lost after the server created the CVM (the connection is
//! reset), 10% are reset before reaching it, and 10% get a 503 or 429 with `Retry-After: 1`.
//! Each logical operation creates one named CVM, so a second CVM with the same name is a
//! duplicate.
//!
//! Two clients run the same operations against fresh copies of that setup:
//! (a) reqwest-middleware with reqwest-retry's `RetryTransientMiddleware` and its documented
//!     default policy (exponential backoff, 3 retries), and
//! (b) this crate's `IdempotentRetry` with its defaults.

// Both clients run on the real clock against a real proxy, and the example reports the wall time
// each spends waiting (see `clippy.toml`).
#![allow(clippy::disallowed_methods)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::{Extensions, Method};
use idempotent_retry::testing::{ChaosProxy, FakeCloud, FaultMix, RetryAfter, Schedule, ServerProfile};
use idempotent_retry::{Error, IdempotentRetry};
use reqwest::{Request, Response};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use reqwest_retry::RetryTransientMiddleware;
use reqwest_retry::policies::ExponentialBackoff;

struct Options {
    ops: usize,
    seed: u64,
    fault_rate: f64,
    retry_after: u64,
    concurrency: usize,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let mut options = Options { ops: 200, seed: 42, fault_rate: 0.4, retry_after: 1, concurrency: 16 };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            if flag == "--help" || flag == "-h" {
                return Err(String::new());
            }
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
            match flag.as_str() {
                "--ops" => options.ops = value.parse().map_err(|e| bad(&e))?,
                "--seed" => options.seed = value.parse().map_err(|e| bad(&e))?,
                "--fault-rate" => options.fault_rate = value.parse().map_err(|e| bad(&e))?,
                "--retry-after" => options.retry_after = value.parse().map_err(|e| bad(&e))?,
                "--concurrency" => options.concurrency = value.parse().map_err(|e| bad(&e))?,
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        if !(0.0..=1.0).contains(&options.fault_rate) {
            return Err("--fault-rate must be between 0 and 1".into());
        }
        if options.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        Ok(options)
    }
}

const USAGE: &str = "usage: chaos [--ops N (200)] [--seed N (42)] [--fault-rate 0..1 (0.4)] [--retry-after SECS (1)] [--concurrency N (16)]";

/// What one client's run amounted to.
#[derive(Debug, Default)]
struct Figures {
    requests: usize,
    faults: usize,
    created: usize,
    duplicates: usize,
    unknown: usize,
    succeeded: usize,
    wait: Duration,
}

/// Sums the time spent inside attempts, so the time spent between them can be told apart.
#[derive(Clone, Default)]
struct AttemptTime(Arc<Mutex<Duration>>);

#[async_trait::async_trait]
impl Middleware for AttemptTime {
    async fn handle(&self, req: Request, ext: &mut Extensions, next: Next<'_>) -> reqwest_middleware::Result<Response> {
        let started = Instant::now();
        let result = next.run(req, ext).await;
        *self.0.lock().unwrap() += started.elapsed();
        result
    }
}

#[derive(Clone, Copy)]
enum Contender {
    ReqwestRetry,
    IdempotentRetry,
}

impl Contender {
    fn client(self, attempts: AttemptTime) -> ClientWithMiddleware {
        let builder = ClientBuilder::new(reqwest::Client::new());
        let builder = match self {
            // reqwest-retry's documented default: `ExponentialBackoff::builder().build_with_max_retries(3)`.
            Contender::ReqwestRetry => builder.with(RetryTransientMiddleware::new_with_policy(
                ExponentialBackoff::builder().build_with_max_retries(3),
            )),
            Contender::IdempotentRetry => builder.with(IdempotentRetry::new()),
        };
        builder.with(attempts).build()
    }

    /// Whether a failed operation left its outcome unknown (it may have been applied).
    fn unknown(self, err: &reqwest_middleware::Error) -> bool {
        match self {
            // reqwest-retry cannot tell: any failure may have been applied.
            Contender::ReqwestRetry => true,
            Contender::IdempotentRetry => Error::find(err).is_none_or(Error::may_have_been_applied),
        }
    }
}

async fn run(contender: Contender, options: &Options) -> Figures {
    let cloud = FakeCloud::start(ServerProfile::stripe()).await;
    let mix = FaultMix::chaos()
        .with_retry_after(Some(RetryAfter::Seconds(options.retry_after)))
        .scaled_to(options.fault_rate);
    let proxy = ChaosProxy::builder(cloud.address())
        .schedule(Schedule::random(options.seed, mix))
        .only(Method::POST)
        .start()
        .await;
    let attempts = AttemptTime::default();
    let client = contender.client(attempts.clone());
    let url = format!("{}/cvms", proxy.uri());

    let results: Vec<(bool, bool, Duration)> = futures_util::stream::iter(0..options.ops)
        .map(|i| {
            let (client, url) = (&client, &url);
            async move {
                let op_started = Instant::now();
                let body = serde_json::json!({ "name": format!("cvm-{i:04}") });
                let result = client.post(url).json(&body).send().await;
                let (ok, unknown) = match result {
                    Ok(response) if response.status().is_success() => (true, false),
                    // A final error status: not created, and known not to be.
                    Ok(response) => (false, response.status().is_server_error()),
                    Err(err) => (false, contender.unknown(&err)),
                };
                (ok, unknown, op_started.elapsed())
            }
        })
        .buffer_unordered(options.concurrency)
        .collect()
        .await;
    proxy.settle().await;

    let in_ops: Duration = results.iter().map(|r| r.2).sum();
    let in_attempts = *attempts.0.lock().unwrap();
    Figures {
        requests: proxy.requests(),
        faults: proxy.faults_injected(),
        created: cloud.created(),
        duplicates: cloud.duplicates(),
        unknown: results.iter().filter(|r| r.1).count(),
        succeeded: results.iter().filter(|r| r.0).count(),
        wait: in_ops.saturating_sub(in_attempts),
    }
}

fn row(name: &str, ops: usize, f: &Figures) -> String {
    format!(
        "{name:<18} {ops:>5} {:>9} {:>7} {:>8} {:>11} {:>8} {:>10} {:>11.1}s",
        f.requests,
        f.faults,
        f.created,
        f.duplicates,
        f.unknown,
        f.succeeded,
        f.wait.as_secs_f64()
    )
}

fn json(f: &Figures) -> serde_json::Value {
    serde_json::json!({
        "requests": f.requests,
        "created": f.created,
        "duplicates": f.duplicates,
        "unknown": f.unknown,
        "succeeded": f.succeeded,
        "faults": f.faults,
        "wait_ms": f.wait.as_millis() as u64,
    })
}

#[tokio::main]
async fn main() {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("chaos: {why}");
            }
            eprintln!("{USAGE}");
            std::process::exit(if why.is_empty() { 0 } else { 2 });
        }
    };
    let mix = FaultMix::chaos().scaled_to(options.fault_rate);
    println!(
        "{} POST /cvms operations, concurrency {}, seed {}: {:.0}% lost after commit, {:.0}% reset, {:.0}% 503/429 with Retry-After: {}",
        options.ops,
        options.concurrency,
        options.seed,
        mix.lose * 100.0,
        mix.reset * 100.0,
        mix.status * 100.0,
        options.retry_after
    );
    println!();

    let started = Instant::now();
    let theirs = run(Contender::ReqwestRetry, &options).await;
    let ours = run(Contender::IdempotentRetry, &options).await;

    println!(
        "{:<18} {:>5} {:>9} {:>7} {:>8} {:>11} {:>8} {:>10} {:>12}",
        "client", "ops", "requests", "faults", "created", "duplicates", "unknown", "succeeded", "total wait"
    );
    println!("{}", row("reqwest-retry", options.ops, &theirs));
    println!("{}", row("idempotent-retry", options.ops, &ours));
    println!();
    println!(
        "duplicates: resources created beyond one per operation. unknown: operations that failed and may have been applied. total wait: time between attempts, summed over operations. ({:.1}s in all)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        serde_json::json!({ "ops": options.ops, "reqwest_retry": json(&theirs), "idempotent_retry": json(&ours) })
    );
}
