//! The journal's cost, store beside store, in one run: `begin` + `finish` of one operation on
//! `MemoryStore`, `SqliteJournal` (a file, fsynced before the send) and `PostgresJournal` (a
//! local server, committed before the send), and the throughput of 8 runners, each a machine
//! with a journal of its own on one PostgreSQL database, 500 operations each, beside one.
//! `PostgresJournal` is measured over TCP (as a fleet reaches its database) and, when the
//! server has one, over its Unix socket (as a client on the database's own machine would).
//!
//! The throughput is measured twice: against the local server, where client and server share
//! the machine's cores (the bench prints how busy they were), and through a proxy that delays
//! every byte by [`LINK_DELAY`] each way, as the network between a fleet and its database
//! does. There a runner waits on the link more than it works, and eight scale as far as
//! nothing serialises them.
//!
//! ```text
//! pg_virtualenv cargo bench --bench journal
//! ```
//!
//! The PostgreSQL rows need the server libpq's environment names (`pg_virtualenv` exports it);
//! without one the bench says so and measures the other two. Prints a Markdown table (the one
//! in docs/postgres.md) and writes `journal-bench.json` in the target directory.

// A benchmark measures wall time (see `clippy.toml`).
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use idempotent_retry::journal::store::{Begun, Finish, Intent, KeyPlan};
use idempotent_retry::journal::{KeyStore, MemoryStore, OpState, PostgresJournal, SqliteJournal, fingerprint};
use serde_json::json;

const OPS: usize = 2000;
const RUNNERS: usize = 8;
const PER_RUNNER: usize = 500;
/// The one-way delay of the simulated link (tokio's timer rounds it up to its 1 ms tick).
const LINK_DELAY: Duration = Duration::from_micros(500);

/// One operation: `begin` (random key, a new name), then `finish` as succeeded.
async fn one(store: &dyn KeyStore, name: &str, fp: &str) {
    let intent = Intent::new(name, "POST", "https://api.test/cvms", fp, KeyPlan::Random, SystemTime::now());
    let Begun::Send { claim, .. } = store.begin(&intent).await.expect("begin") else { panic!("a new operation sends") };
    let finish = Finish::new(claim, OpState::Succeeded, SystemTime::now()).status(Some(201));
    assert!(store.finish(name, &finish).await.expect("finish"));
}

/// Median and mean of `OPS` operations, one after another, in microseconds.
async fn latency(store: &dyn KeyStore, tag: &str) -> (f64, f64) {
    let fp = fingerprint("POST", "https://api.test/cvms", b"{}");
    for n in 0..50 {
        one(store, &format!("{tag}/warm/{n}"), &fp).await;
    }
    let mut times = Vec::with_capacity(OPS);
    for n in 0..OPS {
        let started = Instant::now();
        one(store, &format!("{tag}/op/{n}"), &fp).await;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    (times[OPS / 2], times.iter().sum::<f64>() / OPS as f64)
}

/// Operations a second: `runners` machines (a journal each, on `url`) running `PER_RUNNER`
/// operations each at once, every one its own operation; and how busy the machine's cores
/// were meanwhile, from 0 to 1 (`None` where `/proc/stat` cannot be read).
async fn throughput(url: &str, schema: &str, runners: usize) -> (f64, Option<f64>) {
    let mut journals = Vec::new();
    for _ in 0..runners {
        journals.push(Arc::new(PostgresJournal::builder(url).schema(schema).pool_size(2).open().await.expect("open")));
    }
    let fp = fingerprint("POST", "https://api.test/cvms", b"{}");
    let before = cpu_jiffies();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (r, journal) in journals.into_iter().enumerate() {
        let fp = fp.clone();
        let tag = format!("{url}/{runners}/{r}");
        tasks.spawn(async move {
            for n in 0..PER_RUNNER {
                one(&*journal, &format!("{tag}/op{n}"), &fp).await;
            }
        });
    }
    tasks.join_all().await;
    let rate = (runners * PER_RUNNER) as f64 / started.elapsed().as_secs_f64();
    let busy = before.zip(cpu_jiffies()).map(|((b0, i0), (b1, i1))| (b1 - b0) as f64 / ((b1 - b0) + (i1 - i0)) as f64);
    (rate, busy)
}

/// The URL of the same server through its Unix socket, when it has one: `url` with the host
/// replaced by the socket's directory, which the server names itself (percent-encoded, as
/// tokio-postgres reads it).
async fn over_socket(url: &str) -> Option<String> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(connection);
    let row = client.query_one("SHOW unix_socket_directories", &[]).await.ok()?;
    let dirs: String = row.get(0);
    let dir = dirs.split(',').map(str::trim).find(|d| d.starts_with('/'))?;
    let encoded: String = url::form_urlencoded::byte_serialize(dir.as_bytes()).collect();
    Some(with_host(url, &encoded, None))
}

/// `url` with `pair` added to its query (a later `sslmode` overrides an earlier one).
fn with_query(url: &str, pair: &str) -> String {
    format!("{url}{}{pair}", if url.contains('?') { '&' } else { '?' })
}

/// `url` with another host, and another port when given.
fn with_host(url: &str, host: &str, port: Option<u16>) -> String {
    let mut url = url::Url::parse(url).expect("a URL from url_from_env");
    url.set_host(Some(host)).expect("a host a postgres:// URL can hold");
    if port.is_some() {
        url.set_port(port).expect("a URL with a host takes a port");
    }
    url.into()
}

/// The machine's busy and idle clock ticks so far, all cores (Linux's `/proc/stat`).
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let idle = ticks.get(3)? + ticks.get(4)?; // idle, iowait
    Some((ticks.iter().sum::<u64>() - idle, idle))
}

/// A TCP proxy to the server libpq's environment names that holds every chunk for `delay`
/// in each direction, in order (a link's latency, not its bandwidth); the URL through it.
async fn slow_link(url: &str, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = std::env::var("PGHOST").expect("PGHOST");
    let port: u16 = std::env::var("PGPORT").ok().and_then(|p| p.parse().ok()).unwrap_or(5432);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap().port();
    async fn carry(
        mut from: impl tokio::io::AsyncRead + Unpin + Send + 'static,
        mut to: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
        delay: Duration,
    ) {
        let (chunks, mut held) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((due, chunk)) = held.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if chunks.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    }
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let _ = client.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            if host.starts_with('/') {
                let path = format!("{host}/.s.PGSQL.{port}");
                let (up_read, up_write) = tokio::net::UnixStream::connect(path).await.unwrap().into_split();
                tokio::spawn(carry(client_read, up_write, delay));
                tokio::spawn(carry(up_read, client_write, delay));
            } else {
                let upstream = tokio::net::TcpStream::connect((host.as_str(), port)).await.unwrap();
                let _ = upstream.set_nodelay(true);
                let (up_read, up_write) = upstream.into_split();
                tokio::spawn(carry(client_read, up_write, delay));
                tokio::spawn(carry(up_read, client_write, delay));
            }
        }
    });
    // The same URL, its host and port the proxy's.
    with_host(url, "127.0.0.1", Some(local))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no arguments: then
    // it only checks that it starts.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut rows = Vec::new();
        let memory = latency(&MemoryStore::new(), "memory").await;
        rows.push(("MemoryStore", memory));
        let dir = std::env::temp_dir().join(format!("idem-journal-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sqlite = latency(&SqliteJournal::open(dir.join("journal.sqlite3")).unwrap(), "sqlite").await;
        rows.push(("SqliteJournal", sqlite));
        let _ = std::fs::remove_dir_all(&dir);
        let pg = match PostgresJournal::url_from_env() {
            Some(url) => {
                // Plain text, as every row before TLS came (and as a database on the runner's own
                // network may be reached); TLS has a row of its own.
                let url = with_query(&url, "sslmode=disable");
                let schema = format!("idem_bench_{}", std::process::id());
                let journal = PostgresJournal::builder(&url).schema(&schema).open().await.expect("open");
                let pg = latency(&journal, "postgres").await;
                rows.push(("PostgresJournal (TCP)", pg));
                match PostgresJournal::builder(with_query(&url, "sslmode=require")).schema(&schema).open().await {
                    Ok(journal) => rows.push(("PostgresJournal (TCP, TLS)", latency(&journal, "postgres-tls").await)),
                    Err(e) => eprintln!("the server does not take TLS ({e}): no row for it"),
                }
                // A local server's other door: what a client on the database's own machine uses.
                let mut socket = None;
                if let Some(socket_url) = over_socket(&url).await.filter(|u| *u != url) {
                    match PostgresJournal::builder(&socket_url).schema(&schema).open().await {
                        Ok(journal) => socket = Some(latency(&journal, "postgres-socket").await),
                        Err(e) => eprintln!("the server's Unix socket is not usable from here ({e}): no row for it"),
                    }
                }
                if let Some(socket) = socket {
                    rows.push(("PostgresJournal (Unix socket)", socket));
                }
                let local = (throughput(&url, &schema, 1).await, throughput(&url, &schema, RUNNERS).await);
                let slow = slow_link(&url, LINK_DELAY).await;
                let linked = (throughput(&slow, &schema, 1).await, throughput(&slow, &schema, RUNNERS).await);
                Some((pg, socket, local, linked))
            }
            None => {
                eprintln!("no PostgreSQL (PGHOST unset): run `pg_virtualenv cargo bench --bench journal` for its rows");
                None
            }
        };
        println!("| store | begin + finish, median | mean |\n|---|---|---|");
        for (name, (median, mean)) in &rows {
            println!("| {name} | {median:.0} µs | {mean:.0} µs |");
        }
        let mut figures = json!({
            "memory_us": memory,
            "sqlite_us": sqlite,
        });
        if let Some((pg, socket, ((one, busy_one), (many, busy_many)), ((one_linked, _), (many_linked, _)))) = pg {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            // How busy the machine's cores were, client and server together: eight runners that
            // keep every core busy are bound by the cores, not by a lock.
            let busy = |b: Option<f64>| b.map_or_else(String::new, |b| format!("; cores {:.0}% busy", b * 100.0));
            for (name, (median, _)) in rows.iter().filter(|(name, _)| name.starts_with("PostgresJournal")) {
                println!("\n{name} ÷ SqliteJournal, median: {:.2}× (goal ≤ 2×)", median / sqlite.0);
            }
            println!(
                "\n\
                 | runners (a journal each, one database) | local server ({cores} cores shared with the client), operations/s | through a {} ms link each way, operations/s |\n\
                 |---|---|---|\n\
                 | 1 × {PER_RUNNER} | {one:.0}{} | {one_linked:.0} |\n\
                 | {RUNNERS} × {PER_RUNNER} | {many:.0}: {:.1}× one runner{} | {many_linked:.0}: {:.1}× one runner |\n\
                 \n(goal: {RUNNERS} runners ≥ 4× one runner's)",
                LINK_DELAY.as_secs_f64() * 1e3,
                busy(busy_one),
                many / one,
                busy(busy_many),
                many_linked / one_linked,
            );
            figures["postgres_us"] = json!(pg);
            if let Some((_, tls)) = rows.iter().find(|(name, _)| name.ends_with("TLS)")) {
                figures["postgres_tls_us"] = json!(tls);
            }
            if let Some(socket) = socket {
                figures["postgres_socket_us"] = json!(socket);
            }
            figures["throughput_1"] = json!(one);
            figures["throughput_8"] = json!(many);
            figures["busy_1"] = json!(busy_one);
            figures["busy_8"] = json!(busy_many);
            figures["linked_throughput_1"] = json!(one_linked);
            figures["linked_throughput_8"] = json!(many_linked);
        }
        // Where cargo builds (`CARGO_TARGET_DIR`, or `target/` here), as the other benches write.
        let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
        let _ = std::fs::create_dir_all(&target);
        if let Err(e) = std::fs::write(format!("{target}/journal-bench.json"), figures.to_string()) {
            eprintln!("{target}/journal-bench.json: {e}");
        }
    });
}
