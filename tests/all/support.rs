//! Shared test plumbing: a client with injected time, key extraction, and a raw TCP server that
//! resets connections for real.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use idempotent_retry::{
    IdempotentRetry, IdempotentRetryBuilder, RetryPolicy,
    time::{ManualClock, RecordingSleeper, SeededRng},
};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The property tests' configuration: `cases` cases drawn from a fixed seed, so every run, CI's
/// included, tries the same cases and a failure comes back when the test is run again.
/// `PROPTEST_RNG_SEED=N` draws other cases.
pub fn seeded(cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, RngSeed};
    let config = Config::default();
    let rng_seed = match config.rng_seed {
        RngSeed::Random => RngSeed::Fixed(PROPERTY_SEED),
        chosen => chosen,
    };
    Config { cases, failure_persistence: None, rng_seed, ..config }
}

/// Where the property tests' cases come from unless `PROPTEST_RNG_SEED` says otherwise.
pub const PROPERTY_SEED: u64 = 0x1de5_2026;

/// Sun, 22 Nov 2026 00:00:00 GMT: where every test's clock starts.
pub const T0: u64 = 1_795_305_600;

pub fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0)
}

/// A manual clock and a sleeper that records delays and advances it: no test really sleeps.
#[derive(Clone)]
pub struct Time {
    pub clock: ManualClock,
    pub sleeper: RecordingSleeper,
}

impl Time {
    pub fn new() -> Self {
        let clock = ManualClock::new(t0());
        let sleeper = RecordingSleeper::advancing(&clock);
        Self { clock, sleeper }
    }

    /// A layer builder using this time and a seeded jitter source.
    pub fn layer(&self) -> IdempotentRetryBuilder {
        IdempotentRetry::builder().clock(self.clock.clone()).sleeper(self.sleeper.clone()).rng(SeededRng::new(SEED))
    }

    pub fn delays(&self) -> Vec<Duration> {
        self.sleeper.delays()
    }
}

pub const SEED: u64 = 0x5eed;

pub fn client(layer: IdempotentRetryBuilder) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new()).with(layer.build()).build()
}

/// The standard policy with short, deterministic delays: 100 ms doubling, no jitter.
pub fn fast_policy() -> RetryPolicy {
    use idempotent_retry::backoff::{ExponentialBackoff, Jitter};
    RetryPolicy::standard()
        .with_backoff(ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(5)).jitter(Jitter::None))
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The retry budget's host label for a wiremock server: `host:port` as its URL spells it.
pub fn budget_host(server: &wiremock::MockServer) -> String {
    format!("127.0.0.1:{}", server.address().port())
}

/// The `Idempotency-Key` header of every request a wiremock server received, in order
/// (`None` where a request had none).
pub async fn keys_seen(server: &wiremock::MockServer, header: &str) -> Vec<Option<String>> {
    server
        .received_requests()
        .await
        .expect("request recording is on")
        .iter()
        .map(|r| r.headers.get(header).map(|v| v.to_str().unwrap().to_owned()))
        .collect()
}

pub async fn requests_seen(server: &wiremock::MockServer) -> usize {
    server.received_requests().await.expect("request recording is on").len()
}

/// Asserts every request carried the same key and returns it.
pub fn one_key(keys: &[Option<String>]) -> String {
    let first = keys.first().cloned().flatten().expect("the first request carried a key");
    assert!(keys.iter().all(|k| k.as_deref() == Some(first.as_str())), "keys differ between attempts: {keys:?}");
    first
}

/// A request as the raw server read it.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub head: String,
    pub body: Vec<u8>,
}

impl RawRequest {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// A raw HTTP/1.1 server on a real socket. It reads each request in full, and on the first
/// `resets` connections then resets the connection (SO_LINGER 0: an RST, not a FIN) instead of
/// answering — the server "committed", the client never hears. Later connections get a 201.
pub struct ResetServer {
    pub url: String,
    seen: Arc<Mutex<Vec<RawRequest>>>,
}

impl ResetServer {
    pub async fn start(resets: usize) -> Self {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), resets)
    }

    /// Serves on an existing listener.
    pub fn serve(listener: TcpListener, resets: usize) -> Self {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let mut connections = 0usize;
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                connections += 1;
                let reset = connections <= resets;
                let log = log.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut stream).await else { return };
                    log.lock().unwrap().push(request);
                    if reset {
                        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).unwrap();
                        drop(stream);
                    } else {
                        let body = r#"{"id":"cvm-1"}"#;
                        let response = format!(
                            "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = stream.write_all(response.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    }
                });
            }
        });
        Self { url, seen }
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads one HTTP/1.1 request with a `content-length` body.
pub async fn read_request(stream: &mut TcpStream) -> Option<RawRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = RawRequest { head: head.clone(), body: vec![] }
        .header("content-length")
        .map_or(0, |v| v.parse::<usize>().unwrap());
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(RawRequest { head, body: buf[head_end..head_end + length].to_vec() })
}

/// A loopback port with nothing listening on it (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A fake cloud with `profile` behind a chaos proxy, and a client configured for that server,
/// all on one manual clock.
pub struct Rig {
    pub profile: idempotent_retry::testing::ServerProfile,
    pub cloud: idempotent_retry::testing::FakeCloud,
    pub proxy: idempotent_retry::testing::ChaosProxy,
    pub client: ClientWithMiddleware,
    pub time: Time,
}

impl Rig {
    pub async fn new(
        profile: idempotent_retry::testing::ServerProfile,
        schedule: idempotent_retry::testing::Schedule,
    ) -> Self {
        Self::with_policy(profile, schedule, fast_policy()).await
    }

    pub async fn with_policy(
        profile: idempotent_retry::testing::ServerProfile,
        schedule: idempotent_retry::testing::Schedule,
        policy: RetryPolicy,
    ) -> Self {
        use idempotent_retry::testing::{ChaosProxy, FakeCloud};
        let time = Time::new();
        let cloud = FakeCloud::builder(profile.clone()).clock(time.clock.clone()).start().await;
        let proxy =
            ChaosProxy::builder(cloud.address()).schedule(schedule).time_travel(time.clock.clone()).start().await;
        let client = client(profile.configure(time.layer().policy(policy)));
        Self { profile, cloud, proxy, client, time }
    }

    pub fn cvms(&self) -> String {
        format!("{}/cvms", self.proxy.uri())
    }

    /// `POST /cvms {"name": name}` through the proxy.
    pub async fn create(&self, name: &str) -> reqwest_middleware::Result<reqwest::Response> {
        self.client.post(self.cvms()).json(&serde_json::json!({ "name": name })).send().await
    }

    /// The same, without a key.
    pub async fn create_keyless(&self, name: &str) -> reqwest_middleware::Result<reqwest::Response> {
        self.client
            .post(self.cvms())
            .json(&serde_json::json!({ "name": name }))
            .with_extension(idempotent_retry::RequestOptions::new().no_key())
            .send()
            .await
    }

    /// Each operation's (told by its `name`) key, as the client sent it on every attempt,
    /// asserting there was one per operation.
    pub fn one_key_per_name(&self) -> std::collections::BTreeMap<String, Option<String>> {
        let attempts = self
            .proxy
            .records()
            .into_iter()
            .filter(|r| r.method == "POST")
            .map(|r| (r.json_field("name").unwrap_or_default(), r.key(&self.profile)));
        idempotent_retry::testing::assert_one_key_per_operation(attempts)
    }

    /// POST attempts the client made (as the proxy saw them).
    pub fn attempts(&self) -> usize {
        self.proxy.records().iter().filter(|r| r.method == "POST").count()
    }
}

/// A raw HTTP server that answers every request with `status` and a chunked body of `len`
/// bytes, made as it is sent, and counts the body bytes the client let it write.
pub struct HugeBodyServer {
    pub url: String,
    written: Arc<std::sync::atomic::AtomicU64>,
}

impl HugeBodyServer {
    pub async fn start(status: u16, len: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = written.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let count = count.clone();
                tokio::spawn(async move {
                    if read_request(&mut stream).await.is_none() {
                        return;
                    }
                    let head = format!("HTTP/1.1 {status} X\r\ntransfer-encoding: chunked\r\n\r\n");
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let block = vec![b'x'; 64 * 1024];
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(block.len() as u64) as usize;
                        let chunk = [format!("{n:x}\r\n").as_bytes(), &block[..n], b"\r\n"].concat();
                        if stream.write_all(&chunk).await.is_err() {
                            return;
                        }
                        count.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                        left -= n as u64;
                    }
                    let _ = stream.write_all(b"0\r\n\r\n").await;
                });
            }
        });
        Self { url, written }
    }

    /// Body bytes written to clients so far.
    pub fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::SeqCst)
    }
}
