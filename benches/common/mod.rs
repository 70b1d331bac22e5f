//! Shared by the benches: a minimal hyper server on loopback, and the clients under comparison.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// The answer: 201 and a small JSON body.
pub const ANSWER: &[u8] = br#"{"id":"cvm-7f3a9c1d","name":"web-1","status":"starting"}"#;

/// A 200-byte JSON body.
pub fn body_200() -> Bytes {
    let padding = "x".repeat(200 - r#"{"name":"web-1","image":"api:1.4.2","pad":""}"#.len());
    let body = format!(r#"{{"name":"web-1","image":"api:1.4.2","pad":"{padding}"}}"#);
    assert_eq!(body.len(), 200);
    Bytes::from(body)
}

/// Starts a minimal HTTP/1.1 server (keep-alive) on its own thread and runtime. Reads each
/// request body in full, answers 201.
pub fn serve() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            accept(listener).await;
        });
    });
    rx.recv().unwrap()
}

/// Starts the same server as a task on the current runtime: with a current-thread runtime,
/// client and server then share one thread, and a request's time is the CPU work of both sides,
/// without the cross-thread wake-ups that dominate (and blur) loopback latency on a VM.
pub async fn serve_here() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(accept(listener));
    addr
}

async fn accept(listener: tokio::net::TcpListener) {
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        tokio::spawn(async move {
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                let _ = request.into_body().collect().await;
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(201)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(ANSWER)))
                        .unwrap(),
                )
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A raw reqwest client (keep-alive by default).
pub fn raw() -> reqwest::Client {
    reqwest::Client::builder().tcp_nodelay(true).build().unwrap()
}

/// reqwest-middleware with reqwest-retry's documented default policy.
pub fn reqwest_retry() -> reqwest_middleware::ClientWithMiddleware {
    use reqwest_retry::RetryTransientMiddleware;
    use reqwest_retry::policies::ExponentialBackoff;
    reqwest_middleware::ClientBuilder::new(raw())
        .with(RetryTransientMiddleware::new_with_policy(ExponentialBackoff::builder().build_with_max_retries(3)))
        .build()
}

/// This crate's layer with every default: keys on, no journal.
pub fn ours() -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(raw()).with(idempotent_retry::IdempotentRetry::new()).build()
}
