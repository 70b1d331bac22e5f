//! What the protocols promise about a failed request, against real servers: an HTTP/2 stream
//! the server refused, or left above a GOAWAY's last stream id, was not processed (RFC 9113
//! §8.7) and is sent again even without a key; a TLS certificate the client does not trust is
//! final.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::StatusCode;
use idempotent_retry::classify::{MAX_REFUSALS, TransportCause};
use idempotent_retry::error::LastAttempt;
use idempotent_retry::{Error, RequestOptions, RetryOutcome};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// What the server does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H2Answer {
    /// `RST_STREAM` with `REFUSED_STREAM`.
    Refuse,
    /// `GOAWAY` with last stream id 0 (below every request's) and `ENHANCE_YOUR_CALM`, then
    /// close: the connection's requests were not processed.
    GoAwayBelow,
    /// 201: a resource is created.
    Create,
}

/// A cleartext HTTP/2 server (prior knowledge) that answers requests from a script, then
/// creates.
struct H2Server {
    addr: SocketAddr,
    script: Arc<Mutex<VecDeque<H2Answer>>>,
    created: Arc<AtomicUsize>,
    /// Requests that reached the server, processed or not.
    seen: Arc<AtomicUsize>,
}

impl H2Server {
    async fn start(script: impl IntoIterator<Item = H2Answer>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            script: Arc::new(Mutex::new(script.into_iter().collect())),
            created: Arc::default(),
            seen: Arc::default(),
        };
        let (script, created, seen) = (server.script.clone(), server.created.clone(), server.seen.clone());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let next = || script.lock().unwrap().pop_front().unwrap_or(H2Answer::Create);
                if script.lock().unwrap().front() == Some(&H2Answer::GoAwayBelow) {
                    next();
                    tokio::spawn(go_away_below(socket, seen.clone()));
                    continue;
                }
                let (script, created, seen) = (script.clone(), created.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut connection = h2::server::handshake(socket).await.unwrap();
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        seen.fetch_add(1, Ordering::SeqCst);
                        let answer = script.lock().unwrap().pop_front().unwrap_or(H2Answer::Create);
                        let created = created.clone();
                        tokio::spawn(async move {
                            if answer == H2Answer::Refuse {
                                respond.send_reset(h2::Reason::REFUSED_STREAM);
                                return;
                            }
                            let mut body = request.into_body();
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                            }
                            created.fetch_add(1, Ordering::SeqCst);
                            let response = http::Response::builder().status(StatusCode::CREATED).body(()).unwrap();
                            let mut stream = respond.send_response(response, false).unwrap();
                            stream.send_data(Bytes::from_static(br#"{"id":"cvm-1"}"#), true).unwrap();
                        });
                    }
                });
            }
        });
        server
    }

    fn url(&self) -> String {
        format!("http://{}/cvms", self.addr)
    }
}

/// Speaks just enough HTTP/2 by hand to send a GOAWAY whose last stream id (0) is below the
/// request's: h2's own server names the last stream it received, never one below it.
async fn go_away_below(mut socket: TcpStream, seen: Arc<AtomicUsize>) {
    let mut preface = [0u8; 24];
    socket.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    // An empty SETTINGS frame.
    socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    loop {
        let mut head = [0u8; 9];
        if socket.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        socket.read_exact(&mut payload).await.unwrap();
        if head[3] == 1 {
            // HEADERS: the request is here. GOAWAY, last stream id 0, ENHANCE_YOUR_CALM (0xb).
            seen.fetch_add(1, Ordering::SeqCst);
            socket.write_all(&[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xb]).await.unwrap();
            socket.flush().await.unwrap();
            // Let the client read it before the connection closes.
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
            return;
        }
    }
}

/// Our layer over a reqwest client that speaks HTTP/2 and retries nothing itself (reqwest's
/// default policy would retry refused streams twice before our layer saw them).
fn h2_client(time: &Time) -> ClientWithMiddleware {
    let http = reqwest::Client::builder().http2_prior_knowledge().retry(reqwest::retry::never()).build().unwrap();
    ClientBuilder::new(http).with(time.layer().policy(fast_policy()).build()).build()
}

/// A keyless POST to `server` through [`h2_client`].
async fn post_keyless(time: &Time, server: &H2Server) -> reqwest_middleware::Result<reqwest::Response> {
    h2_client(time)
        .post(server.url())
        .body(r#"{"name":"web-1"}"#)
        .with_extension(RequestOptions::new().no_key())
        .send()
        .await
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_without_a_key_and_creates_once() {
    let server = H2Server::start([H2Answer::Refuse]).await;
    let time = Time::new();

    let response = post_keyless(&time, &server).await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    let outcome = RetryOutcome::of(&response).unwrap();
    assert_eq!((outcome.attempts, outcome.key.clone()), (2, None), "retried once, keyless");
    assert_eq!((server.seen.load(Ordering::SeqCst), server.created.load(Ordering::SeqCst)), (2, 1));
    assert_eq!(time.delays(), [ms(100)]);
}

#[tokio::test]
async fn refusals_are_retried_at_most_three_times() {
    let server = H2Server::start([H2Answer::Refuse; 10]).await;
    let time = Time::new();

    let err = post_keyless(&time, &server).await.unwrap_err();

    let err = Error::find(&err).unwrap_or_else(|| panic!("{err:?}"));
    assert!(matches!(err, Error::AttemptsExhausted(_)), "{err}");
    assert_eq!(err.attempts(), 1 + MAX_REFUSALS);
    assert!(!err.may_have_been_applied(), "refused streams were not processed: {err}");
    assert!(matches!(
        err.failure().map(|f| &f.last),
        Some(LastAttempt::Transport { cause: TransportCause::Refused, .. })
    ));
    assert_eq!((server.seen.load(Ordering::SeqCst), server.created.load(Ordering::SeqCst)), (4, 0));
}

#[tokio::test]
async fn a_goaway_below_the_request_is_sent_again_without_a_key_and_creates_once() {
    let server = H2Server::start([H2Answer::GoAwayBelow]).await;
    let time = Time::new();

    let response = post_keyless(&time, &server).await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(RetryOutcome::of(&response).unwrap().attempts, 2);
    assert_eq!((server.seen.load(Ordering::SeqCst), server.created.load(Ordering::SeqCst)), (2, 1));
}

/// A TLS server whose certificate (self-signed, made now) no client trusts. Counts the
/// connections it accepts.
async fn untrusted_tls_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // The client gives up on the certificate: the handshake fails here too.
                let _ = acceptor.accept(socket).await;
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn an_untrusted_certificate_is_final() {
    let (addr, connections) = untrusted_tls_server().await;
    let time = Time::new();
    let http = reqwest::Client::builder().resolve("localhost", addr).build().unwrap();
    let client = ClientBuilder::new(http).with(time.layer().policy(fast_policy()).build()).build();

    let err = client.post(format!("https://localhost:{}/cvms", addr.port())).body("{}").send().await.unwrap_err();

    let err = Error::find(&err).unwrap_or_else(|| panic!("{err:?}"));
    assert!(matches!(err, Error::Transport(_)), "final, not retried: {err}");
    assert_eq!(err.attempts(), 1);
    assert!(!err.may_have_been_applied(), "{err}");
    assert!(
        matches!(
            err.failure().map(|f| &f.last),
            Some(LastAttempt::Transport { cause: TransportCause::Certificate, .. })
        ),
        "{err:?}"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    assert!(time.delays().is_empty());
}
