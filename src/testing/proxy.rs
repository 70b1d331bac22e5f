//! A chaos proxy on real sockets: it sits in front of a server and, per request, passes, loses
//! the response after the server committed, resets, answers with a status of its own, or
//! delays.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::cloud::json_field;
use super::fault::{Fault, RetryAfter, Schedule};
use super::http1::{Message, read_request, read_response};
use super::profile::ServerProfile;
use super::store::{KeyRead, read_key};
use crate::time::{Clock, ManualClock, Sleeper, SystemClock, TokioSleeper, lock};

/// A request as the proxy received it from the client, and the fault it met.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxyRecord {
    /// Method.
    pub method: String,
    /// Request target.
    pub path: String,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body (de-chunked).
    pub body: Bytes,
    /// What the proxy did with it.
    pub fault: Fault,
}

impl ProxyRecord {
    /// The idempotency key the request carried, read as `profile`'s server would read it.
    pub fn key(&self, profile: &ServerProfile) -> Option<String> {
        match read_key(profile, &self.headers, &self.body) {
            KeyRead::Key(key) => Some(key),
            KeyRead::Absent | KeyRead::Malformed(_) => None,
        }
    }

    /// A top-level field of the JSON body, e.g. `"name"`, to tell operations apart.
    pub fn json_field(&self, field: &str) -> Option<String> {
        json_field(&self.body, field)
    }
}

struct Shared {
    upstream: SocketAddr,
    schedule: Mutex<Schedule>,
    only: Option<Method>,
    clock: Arc<dyn Clock>,
    /// Time-travel mode: faults that take time move this clock instead of waiting.
    travel: Option<ManualClock>,
    log: Mutex<Vec<ProxyRecord>>,
    /// Requests held or being forwarded right now.
    pending: AtomicUsize,
    /// Told whenever the last pending request is done.
    idle: tokio::sync::Notify,
    /// The gate, while one is closed.
    gate: Mutex<Option<GateState>>,
    /// Told whenever a request stops at the gate.
    gate_news: tokio::sync::Notify,
}

struct GateState {
    /// The method it stops (`None`: every request).
    method: Option<Method>,
    /// The requests stopped, oldest first.
    held: std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>,
}

/// A gate in front of the server: matching requests stop at it, after they are recorded and
/// before their fault, until the test lets them through. For tests about concurrency that must
/// not depend on how tasks happen to interleave: wait until `n` requests are held, look, let
/// them go.
///
/// ```
/// # use idempotent_retry::testing::{ChaosProxy, FakeCloud, ServerProfile};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// # let cloud = FakeCloud::start(ServerProfile::stripe()).await;
/// let proxy = ChaosProxy::builder(cloud.address()).start().await;
/// let gate = proxy.gate(Some(http::Method::POST));
/// let url = format!("{}/cvms", proxy.uri());
/// let two = tokio::spawn(async move {
///     let client = reqwest::Client::new();
///     let (a, b) = tokio::join!(client.post(&url).body("{}").send(), client.post(&url).body("{}").send());
///     (a.unwrap().status(), b.unwrap().status())
/// });
/// gate.until_held(2).await; // both are at the gate: neither reached the server
/// assert_eq!(cloud.created(), 0);
/// gate.release();
/// assert_eq!(two.await.unwrap(), (http::StatusCode::CREATED, http::StatusCode::CREATED));
/// # }
/// ```
#[derive(Clone)]
pub struct Gate {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("held", &self.held()).finish()
    }
}

impl Gate {
    /// Requests stopped at the gate now.
    pub fn held(&self) -> usize {
        lock(&self.shared.gate).as_ref().map_or(0, |g| g.held.len())
    }

    /// Waits until at least `n` requests are stopped at the gate.
    pub async fn until_held(&self, n: usize) {
        loop {
            // Created before the look, so a request stopping in between is not missed.
            let news = self.shared.gate_news.notified();
            if self.held() >= n {
                return;
            }
            news.await;
        }
    }

    /// Lets the requests stopped now through; later ones stop as before. How many went.
    pub fn release(&self) -> usize {
        let held: Vec<_> = lock(&self.shared.gate).as_mut().map(|g| g.held.drain(..).collect()).unwrap_or_default();
        let n = held.len();
        for request in held {
            let _ = request.send(());
        }
        n
    }

    /// Lets the oldest request stopped now through; whether there was one.
    pub fn release_oldest(&self) -> bool {
        let oldest = lock(&self.shared.gate).as_mut().and_then(|g| g.held.pop_front());
        oldest.is_some_and(|request| request.send(()).is_ok())
    }

    /// Drops the requests stopped now without forwarding them: their clients see the connection
    /// close, and the server never hears of them. Later ones stop as before. How many.
    pub fn discard(&self) -> usize {
        let held: Vec<_> = lock(&self.shared.gate).as_mut().map(|g| g.held.drain(..).collect()).unwrap_or_default();
        held.len()
    }

    /// Opens the gate for good: everything held goes, and nothing stops any more.
    pub fn open(&self) {
        self.release();
        *lock(&self.shared.gate) = None;
    }
}

/// A TCP proxy that injects faults, one decision per HTTP request.
///
/// Resets are real: the client's socket is closed with `SO_LINGER 0`, so the client sees a
/// `ECONNRESET`, as it would from a crashed load balancer. A [`Fault::Lose`] reset comes only
/// after the server has answered, so the server has committed whatever the request did.
///
/// # Examples
///
/// ```
/// use idempotent_retry::IdempotentRetry;
/// use idempotent_retry::testing::{ChaosProxy, FakeCloud, Fault, Schedule, ServerProfile};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cloud = FakeCloud::start(ServerProfile::stripe()).await;
/// // The first response is lost after the server created the CVM.
/// let proxy = ChaosProxy::start(cloud.address(), Schedule::script([Fault::Lose])).await;
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(IdempotentRetry::new())
///     .build();
///
/// let response = client.post(format!("{}/cvms", proxy.uri())).body(r#"{"name":"web-1"}"#).send().await.unwrap();
/// assert_eq!(response.status(), 201);
/// assert_eq!(cloud.created(), 1, "the retry was answered from the idempotency store");
/// assert_eq!(proxy.faults_injected(), 1);
/// # }
/// ```
pub struct ChaosProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for ChaosProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosProxy")
            .field("address", &self.address)
            .field("upstream", &self.shared.upstream)
            .field("requests", &self.requests())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ChaosProxyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosProxyBuilder")
            .field("upstream", &self.upstream)
            .field("schedule", &self.schedule)
            .field("only", &self.only)
            .field("time_travel", &self.travel.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds a [`ChaosProxy`].
pub struct ChaosProxyBuilder {
    upstream: SocketAddr,
    listen: Option<SocketAddr>,
    schedule: Schedule,
    only: Option<Method>,
    clock: Option<Arc<dyn Clock>>,
    travel: Option<ManualClock>,
}

impl ChaosProxyBuilder {
    /// The fault schedule (default: every request passes).
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Listens on `address` (default: a free loopback port): for a standalone proxy that other
    /// processes are told about.
    pub fn listen(mut self, address: SocketAddr) -> Self {
        self.listen = Some(address);
        self
    }

    /// Only requests with this method consult the schedule; others always pass.
    pub fn only(mut self, method: Method) -> Self {
        self.only = Some(method);
        self
    }

    /// The clock HTTP-dates in `Retry-After` are computed from (default: the system clock).
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Time-travel mode: faults that take time ([`Delay`](Fault::Delay),
    /// [`HoldResponse`](Fault::HoldResponse), [`StallBody`](Fault::StallBody)) move `clock`
    /// forward by their duration instead of waiting in real time, and `Retry-After` dates are
    /// computed from it. A delayed request is forwarded first and the clock moved after, so what
    /// the server does happens before the client's limit fires (real forwarding cannot be
    /// ordered against moves of a manual clock); to have a request land after its client moved
    /// on, hold it at a [`gate`](ChaosProxy::gate).
    ///
    /// With a client whose sleeper is a [`RecordingSleeper::advancing`] the same clock, an
    /// attempt whose time limit such a fault passes times out at once, deterministically: no
    /// real timer races a slow machine.
    ///
    /// [`RecordingSleeper::advancing`]: crate::time::RecordingSleeper::advancing
    pub fn time_travel(mut self, clock: ManualClock) -> Self {
        self.clock = Some(Arc::new(clock.clone()));
        self.travel = Some(clock);
        self
    }

    /// Starts listening (on a loopback port, unless told where).
    ///
    /// # Panics
    ///
    /// When the address cannot be bound.
    pub async fn start(self) -> ChaosProxy {
        let at = self.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(at).await.unwrap_or_else(|e| panic!("cannot listen on {at}: {e}"));
        let address = listener.local_addr().expect("a bound address");
        let shared = Arc::new(Shared {
            upstream: self.upstream,
            schedule: Mutex::new(self.schedule),
            only: self.only,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            travel: self.travel,
            log: Mutex::default(),
            pending: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            gate: Mutex::new(None),
            gate_news: tokio::sync::Notify::new(),
        });
        let accept = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, accept.clone()));
            }
        });
        ChaosProxy { address, shared, task }
    }
}

impl ChaosProxy {
    /// A proxy in front of `upstream` with `schedule`.
    pub async fn start(upstream: SocketAddr, schedule: Schedule) -> Self {
        Self::builder(upstream).schedule(schedule).start().await
    }

    /// A builder for a proxy in front of `upstream`.
    pub fn builder(upstream: SocketAddr) -> ChaosProxyBuilder {
        ChaosProxyBuilder { upstream, listen: None, schedule: Schedule::pass(), only: None, clock: None, travel: None }
    }

    /// `http://127.0.0.1:port`: send requests here instead of to the server.
    pub fn uri(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Replaces the schedule for the requests still to come.
    pub fn set_schedule(&self, schedule: Schedule) {
        *lock(&self.shared.schedule) = schedule;
    }

    /// Every request received, in order.
    pub fn records(&self) -> Vec<ProxyRecord> {
        lock(&self.shared.log).clone()
    }

    /// How many requests clients sent.
    pub fn requests(&self) -> usize {
        lock(&self.shared.log).len()
    }

    /// How many requests met a fault.
    pub fn faults_injected(&self) -> usize {
        lock(&self.shared.log).iter().filter(|r| r.fault.is_fault()).count()
    }

    /// Closes a [`Gate`] in front of the server for requests with `method` (`None`: all).
    pub fn gate(&self, method: Option<Method>) -> Gate {
        let mut gate = lock(&self.shared.gate);
        let held = gate.take().map(|g| g.held).unwrap_or_default();
        *gate = Some(GateState { method, held });
        Gate { shared: self.shared.clone() }
    }

    /// Waits until no request is held or being forwarded: a [delayed](Fault::Delay) request whose
    /// client gave up still reaches the server, and a test should count resources after it has.
    pub async fn settle(&self) {
        loop {
            let idle = self.shared.idle.notified();
            if self.shared.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut client: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    while let Ok(Some(request)) = read_request(&mut client, &mut buf).await {
        let applies = shared.only.as_ref().is_none_or(|m| m.as_str() == request.method);
        let fault = if applies { lock(&shared.schedule).next_fault() } else { Fault::Pass };
        // Counted from before the record is visible, so `settle` never misses a request.
        let _pending = Pending::new(&shared);
        lock(&shared.log).push(ProxyRecord {
            method: request.method.clone(),
            path: request.path.clone(),
            headers: request.headers.clone(),
            body: request.body.clone(),
            fault,
        });
        if let Some(wait) = shared.hold_at_gate(&request) {
            shared.gate_news.notify_waiters();
            if wait.await.is_err() {
                // Discarded: the client's connection is reset, the server never hears of it.
                reset(client);
                return;
            }
        }
        if !inject(fault, &mut client, &shared, &request).await {
            if matches!(fault, Fault::Lose | Fault::Reset) {
                reset(client);
            }
            return;
        }
    }
}

/// Carries `request` through `fault`. Whether the client's connection stays open.
async fn inject(fault: Fault, client: &mut TcpStream, shared: &Shared, request: &Message) -> bool {
    match fault {
        Fault::Pass => pass(client, shared, request, Duration::ZERO).await,
        Fault::Delay(hold) if shared.travel.is_some() => {
            // In time-travel mode the request lands, then the time passes: a client whose
            // limit is shorter times out after the server acted, never racing it in real time.
            match forward(shared, request).await {
                Ok(response) => {
                    shared.pass_time(hold).await;
                    client.write_all(&response.raw).await.is_ok() && !response.close && !request.close
                }
                Err(_) => false,
            }
        }
        Fault::Delay(hold) => {
            shared.pass_time(hold).await;
            pass(client, shared, request, Duration::ZERO).await
        }
        Fault::HoldResponse(hold) => pass(client, shared, request, hold).await,
        Fault::StallBody(stall) => {
            if let Ok(response) = forward(shared, request).await {
                let head = response.raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |i| i + 4);
                let half = head + (response.raw.len() - head) / 2;
                if client.write_all(&response.raw[..half]).await.is_ok() {
                    shared.pass_time(stall).await;
                    let wait = if shared.travel.is_some() { SAFETY } else { stall };
                    hang_up_or(client, wait).await;
                }
            }
            false
        }
        Fault::HugeBody { status, len } => {
            let _ = huge(client, status, len).await;
            false
        }
        Fault::Lose => {
            // Let the server answer (and commit), then throw the answer away.
            let _ = forward(shared, request).await;
            false
        }
        Fault::Reset => false,
        Fault::Status { status, retry_after } => {
            let answer = injected(status, retry_after, &*shared.clock);
            client.write_all(answer.as_bytes()).await.is_ok() && !request.close
        }
    }
}

/// Counts a request as pending for as long as it lives.
struct Pending<'a>(&'a Shared);

impl<'a> Pending<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.pending.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Shared {
    /// Holds `request` at the gate, if one is shut for its method: the receiver hears when it
    /// may go on, or fails when it is discarded.
    fn hold_at_gate(&self, request: &Message) -> Option<tokio::sync::oneshot::Receiver<()>> {
        lock(&self.gate).as_mut().and_then(|gate| {
            gate.method.as_ref().is_none_or(|m| m.as_str() == request.method).then(|| {
                let (go, wait) = tokio::sync::oneshot::channel();
                gate.held.push_back(go);
                wait
            })
        })
    }

    /// Lets `duration` pass: moves the time-travel clock, or waits in real time.
    async fn pass_time(&self, duration: Duration) {
        match &self.travel {
            Some(clock) => {
                clock.advance(duration);
                // Let whoever the move woke (an attempt timing out) run before going on.
                tokio::task::yield_now().await;
            }
            None if duration.is_zero() => {}
            None => TokioSleeper.sleep(duration).await,
        }
    }
}

/// How long a time-travelling proxy waits, in real time, for a client to hang up after the
/// clock passed its limit: only a client with a longer limit (or none) waits this long.
const SAFETY: Duration = Duration::from_secs(5);

/// Waits until the client closes its side of the connection, or `at_most` passes.
async fn hang_up_or(client: &mut TcpStream, at_most: Duration) {
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(at_most, async {
        while let Ok(n) = client.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Answers with `status` and a chunked body of `len` bytes, made as it is sent.
async fn huge(client: &mut TcpStream, status: u16, len: u64) -> std::io::Result<()> {
    let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Huge");
    let head = format!("HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n");
    client.write_all(head.as_bytes()).await?;
    const CHUNK: usize = 64 * 1024;
    let block = vec![b'x'; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        client.write_all(format!("{n:x}\r\n").as_bytes()).await?;
        client.write_all(&block[..n]).await?;
        client.write_all(b"\r\n").await?;
        left -= n as u64;
    }
    client.write_all(b"0\r\n\r\n").await
}

/// Forwards and relays the answer, `hold` after it arrived; whether the client connection stays
/// open.
async fn pass(client: &mut TcpStream, shared: &Shared, request: &Message, hold: Duration) -> bool {
    match forward(shared, request).await {
        Ok(response) => {
            shared.pass_time(hold).await;
            client.write_all(&response.raw).await.is_ok() && !response.close && !request.close
        }
        Err(_) => {
            let bad_gateway = "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
            let _ = client.write_all(bad_gateway.as_bytes()).await;
            false
        }
    }
}

async fn forward(shared: &Shared, request: &Message) -> std::io::Result<Message> {
    let mut upstream = TcpStream::connect(shared.upstream).await?;
    upstream.write_all(&request.raw).await?;
    read_response(&mut upstream, &request.method).await
}

fn reset(stream: TcpStream) {
    // SO_LINGER 0: close sends RST, not FIN.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

fn injected(status: u16, retry_after: Option<RetryAfter>, clock: &dyn Clock) -> String {
    let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Injected");
    let body = format!("{{\"error\":\"injected {status}\"}}");
    let retry_after = match retry_after {
        None => String::new(),
        Some(RetryAfter::Seconds(s)) => format!("retry-after: {s}\r\n"),
        Some(RetryAfter::DateIn(d)) => format!("retry-after: {}\r\n", httpdate::fmt_http_date(clock.now() + d)),
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry_after}\r\n{body}",
        body.len()
    )
}
