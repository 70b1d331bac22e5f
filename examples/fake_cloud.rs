//! The fake cloud as a server other processes talk to: `FakeCloud` behind `ChaosProxy`, with an
//! admin endpoint that reports what the server holds, for tests to assert on.
//!
//! ```text
//! cargo run --example fake_cloud -- --listen 127.0.0.1:8080 --admin 127.0.0.1:8081 \
//!     --profile stripe --fault-rate 0.3 --seed 7 --provisioning 2 --processing 0.3
//! ```
//!
//! On start it prints one JSON line, `{"api": "http://…", "admin": "http://…"}` (ports 0 pick free
//! ones), then serves until killed.
//!
//! - The API (through the proxy): `POST /cvms`, `GET /cvms/{id}`, `DELETE /cvms/{id}`, the
//!   replicas of `/apps/{app}/cvms/{vm}/replicas`, … (see `testing::FakeCloud`). Creates take
//!   `--processing` seconds to answer (the window a kill lands in) and provision for
//!   `--provisioning` seconds (`starting`, then `running`).
//! - Faults: a share `--fault-rate` of all requests meets the chaos mix (a lost answer after the
//!   server committed, a reset before it, a 503 or 429 with `Retry-After: --retry-after`), seeded.
//! - Admin: `GET /state` (every resource, live or deleted, handler runs, duplicates, requests and
//!   faults seen by the proxy); `POST /faults` with `{"rate": 0.3, "seed": 7}` changes the faults.
//! - `--upstream HOST:PORT`: no fake cloud; the chaos proxy stands in front of that server (a
//!   third-party one), and `GET /state` reports only what the proxy saw.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use idempotent_retry::testing::{ChaosProxy, FakeCloud, FaultMix, LongRunning, RetryAfter, Schedule, ServerProfile};
use serde_json::{Value, json};

struct Options {
    listen: SocketAddr,
    upstream: Option<SocketAddr>,
    admin: SocketAddr,
    profile: ServerProfile,
    fault_rate: f64,
    seed: u64,
    retry_after: u64,
    provisioning: Duration,
    /// How long the first request of a key takes to be processed (`--processing`).
    processing: Duration,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let mut options = Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            upstream: None,
            admin: SocketAddr::from(([127, 0, 0, 1], 8081)),
            profile: ServerProfile::stripe(),
            fault_rate: 0.0,
            seed: 1,
            retry_after: 1,
            provisioning: Duration::from_secs(2),
            processing: Duration::ZERO,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
            match flag.as_str() {
                "--listen" => options.listen = value.parse().map_err(|e| bad(&e))?,
                "--upstream" => options.upstream = Some(value.parse().map_err(|e| bad(&e))?),
                "--admin" => options.admin = value.parse().map_err(|e| bad(&e))?,
                "--profile" => {
                    options.profile = ServerProfile::named(&value).ok_or_else(|| bad(&"no such profile"))?;
                }
                "--fault-rate" => options.fault_rate = value.parse().map_err(|e| bad(&e))?,
                "--seed" => options.seed = value.parse().map_err(|e| bad(&e))?,
                "--retry-after" => options.retry_after = value.parse().map_err(|e| bad(&e))?,
                "--processing" => {
                    options.processing =
                        Duration::try_from_secs_f64(value.parse().map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
                }
                "--provisioning" => {
                    options.provisioning =
                        Duration::try_from_secs_f64(value.parse().map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
                }
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        Ok(options)
    }
}

/// The chaos mix at `rate`, seeded.
fn faults(rate: f64, seed: u64, retry_after: u64) -> Schedule {
    if rate <= 0.0 {
        return Schedule::pass();
    }
    let mix = FaultMix::chaos().with_retry_after(Some(RetryAfter::Seconds(retry_after))).scaled_to(rate);
    Schedule::random(seed, mix)
}

struct Server {
    /// `None` in front of an upstream of someone else's.
    cloud: Option<FakeCloud>,
    proxy: ChaosProxy,
    retry_after: u64,
}

impl Server {
    fn state(&self) -> Value {
        let proxy = json!({"requests": self.proxy.requests(), "faults": self.proxy.faults_injected()});
        let Some(cloud) = &self.cloud else { return proxy };
        let mut resources = Vec::new();
        for collection in cloud.collections() {
            for (resource, foreign, live) in cloud.history(&collection) {
                let mut item = json!(resource);
                item["collection"] = json!(collection);
                item["live"] = json!(live);
                item["foreign"] = json!(foreign);
                resources.push(item);
            }
        }
        json!({
            "profile": cloud.profile().name,
            "created": cloud.created(),
            "handler_runs": cloud.handler_runs(),
            "duplicates": cloud.duplicates(),
            "requests": proxy["requests"],
            "faults": proxy["faults"],
            "resources": resources,
        })
    }

    async fn admin(self: Arc<Self>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let answer = match (method.as_str(), path.as_str()) {
            ("GET", "/state") => (200, self.state()),
            ("POST", "/faults") => {
                let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) if v["rate"].is_number() => {
                        let (rate, seed) = (v["rate"].as_f64().unwrap_or(0.0), v["seed"].as_u64().unwrap_or(1));
                        self.proxy.set_schedule(faults(rate, seed, self.retry_after));
                        (200, json!({"rate": rate, "seed": seed}))
                    }
                    _ => (400, json!({"error": "expected {\"rate\": 0.3, \"seed\": 7}"})),
                }
            }
            _ => (404, json!({"error": "GET /state or POST /faults"})),
        };
        let response = Response::builder()
            .status(answer.0)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(answer.1.to_string())))
            .expect("a response");
        Ok(response)
    }
}

#[tokio::main]
async fn main() {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("fake_cloud: {e}");
            std::process::exit(2);
        }
    };
    let cloud = match options.upstream {
        Some(_) => None,
        None => Some(
            FakeCloud::builder(options.profile.with_processing(options.processing))
                .long_running(LongRunning::Status, options.provisioning)
                .start()
                .await,
        ),
    };
    let upstream = options.upstream.unwrap_or_else(|| cloud.as_ref().expect("a cloud").address());
    let proxy = ChaosProxy::builder(upstream)
        .listen(options.listen)
        .schedule(faults(options.fault_rate, options.seed, options.retry_after))
        .start()
        .await;
    let admin = tokio::net::TcpListener::bind(options.admin).await.unwrap_or_else(|e| {
        eprintln!("fake_cloud: cannot listen on {}: {e}", options.admin);
        std::process::exit(2);
    });
    let admin_uri = format!("http://{}", admin.local_addr().expect("bound"));
    println!("{}", json!({"api": proxy.uri(), "admin": admin_uri}));
    let server = Arc::new(Server { cloud, proxy, retry_after: options.retry_after });
    loop {
        let Ok((stream, _)) = admin.accept().await else { continue };
        let server = server.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| server.clone().admin(request));
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}
