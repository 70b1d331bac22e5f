//! The smallest complete use: a local server that fails twice with 503, then creates.
//!
//! ```text
//! cargo run --example basic
//! ```
//!
//! Prints each attempt as it reaches the server (with the key it carried), then the outcome.

use std::time::Duration;

use http::Extensions;
use idempotent_retry::{IdempotentRetry, RetryOutcome, RetryPolicy, backoff::ExponentialBackoff};
use reqwest::{Request, Response};
use reqwest_middleware::{ClientBuilder, Middleware, Next};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Prints every attempt that goes out, below the retry layer.
struct PrintAttempts;

#[async_trait::async_trait]
impl Middleware for PrintAttempts {
    async fn handle(&self, req: Request, ext: &mut Extensions, next: Next<'_>) -> reqwest_middleware::Result<Response> {
        let key = req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
        let line = format!("  {} {}  Idempotency-Key: {key}", req.method(), req.url().path());
        let result = next.run(req, ext).await;
        match &result {
            Ok(response) => println!("{line}  ->  {}", response.status()),
            Err(err) => println!("{line}  ->  {err}"),
        }
        result
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A server that answers 503 twice, then creates the CVM.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/cvms"))
        .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", "0"))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cvms"))
        .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({"id": "cvm-7f3a", "name": "web-1"})))
        .mount(&server)
        .await;

    // Short delays so the demo is quick; the defaults start at 200 ms.
    let policy = RetryPolicy::standard()
        .with_backoff(ExponentialBackoff::new(Duration::from_millis(50), Duration::from_secs(1)));
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(IdempotentRetry::builder().policy(policy).build())
        .with(PrintAttempts)
        .build();

    println!("POST {}/cvms", server.uri());
    let response =
        client.post(format!("{}/cvms", server.uri())).json(&serde_json::json!({"name": "web-1"})).send().await?;

    let outcome = RetryOutcome::of(&response).cloned().expect("the layer attaches an outcome");
    let status = response.status();
    let body = response.text().await?;
    println!();
    println!("outcome:  {status} {body}");
    println!("attempts: {}", outcome.attempts);
    println!("key:      {}", outcome.key.map(|k| k.to_string()).unwrap_or_default());
    println!("replayed: {}", outcome.replayed);
    println!("waited:   {:?}", outcome.total_delay);
    Ok(())
}
