//! Where the server is, and journals in schemas of their own.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idempotent_retry::journal::{PostgresJournal, PostgresJournalBuilder};

/// The server, shared by the tests that use it and taken whole by the tests that stop and
/// start it (they run in the same process).
static SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The server's URL, held for the test's duration (a fault test cannot restart it meanwhile),
/// or `None` when there is none (see [`url`]).
pub async fn server() -> Option<(String, tokio::sync::RwLockReadGuard<'static, ()>)> {
    let url = url()?;
    Some((url, SERVER.read().await))
}

/// The server's URL, taken whole: no other test uses it until the guard is dropped.
pub async fn server_alone() -> Option<(String, tokio::sync::RwLockWriteGuard<'static, ()>)> {
    let url = url()?;
    Some((url, SERVER.write().await))
}

/// The server's URL from libpq's environment, or `None` (with a loud message) when there is
/// none; under `CI=true` a missing server fails the test.
fn url() -> Option<String> {
    if let Ok(url) = std::env::var("IDEM_PG_URL") {
        return Some(url);
    }
    let Some(url) = PostgresJournal::url_from_env() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and no PostgreSQL: run the suite inside pg_virtualenv (see .ci/run)");
        }
        eprintln!(
            "\n!!!!! SKIPPING the PostgreSQL tests: no server (PGHOST unset). Run them with: pg_virtualenv cargo test --all-features --test postgres !!!!!\n"
        );
        return None;
    };
    Some(url)
}

/// A schema of this test process's own: runs of the suite never see each other.
pub fn schema(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("idem_test_{}_{}_{name}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// A builder for a journal in `schema`, with a short lease (tests wait for it to expire).
pub fn builder(url: &str, schema: &str) -> PostgresJournalBuilder {
    PostgresJournal::builder(url).schema(schema).lease(Duration::from_secs(2))
}

/// `pg_ctlcluster VERSION NAME action` for the test server, when `IDEM_PG_CLUSTER` names it.
pub fn cluster(action: &str) -> bool {
    let Ok(cluster) = std::env::var("IDEM_PG_CLUSTER") else { return false };
    let mut parts = cluster.split_whitespace();
    let (Some(version), Some(name)) = (parts.next(), parts.next()) else { return false };
    let status = std::process::Command::new("pg_ctlcluster").args([version, name, action]).status();
    assert!(status.is_ok_and(|s| s.success()), "pg_ctlcluster {version} {name} {action} failed");
    true
}

/// A TCP proxy in front of the server that can freeze: while frozen, no byte moves either way
/// on any connection, old or new, and every socket stays open, as with a hung host or a stalled
/// PgBouncer. The server's own timeouts cannot fire then: it never hears the statements.
pub struct Freezer {
    port: u16,
    frozen: tokio::sync::watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Freezer {
    /// A proxy to the server libpq's environment names (`PGHOST`, a directory for a Unix
    /// socket or a host name, and `PGPORT`), or `None` when there is none.
    pub async fn start() -> Option<Freezer> {
        let host = std::env::var("PGHOST").ok()?;
        let port: u16 = std::env::var("PGPORT").ok().and_then(|p| p.parse().ok()).unwrap_or(5432);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap().port();
        let (frozen, watch) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (host, watch) = (host.clone(), watch.clone());
                tokio::spawn(async move {
                    let (client_read, client_write) = client.into_split();
                    if host.starts_with('/') {
                        let path = format!("{host}/.s.PGSQL.{port}");
                        let (up_read, up_write) = tokio::net::UnixStream::connect(path).await.unwrap().into_split();
                        pump_both(client_read, client_write, up_read, up_write, watch).await;
                    } else {
                        let upstream = tokio::net::TcpStream::connect((host.as_str(), port)).await.unwrap();
                        let (up_read, up_write) = upstream.into_split();
                        pump_both(client_read, client_write, up_read, up_write, watch).await;
                    }
                });
            }
        });
        Some(Freezer { port: local, frozen, accept })
    }

    /// The server's URL through this proxy.
    pub fn url(&self) -> String {
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            var("PGUSER", "postgres"),
            var("PGPASSWORD", ""),
            self.port,
            var("PGDATABASE", "postgres")
        )
    }

    /// Stops (`true`) or resumes (`false`) every byte on every connection.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies both ways until either side closes, holding every chunk while frozen.
async fn pump_both(
    client_read: impl tokio::io::AsyncRead + Unpin,
    client_write: impl tokio::io::AsyncWrite + Unpin,
    up_read: impl tokio::io::AsyncRead + Unpin,
    up_write: impl tokio::io::AsyncWrite + Unpin,
    frozen: tokio::sync::watch::Receiver<bool>,
) {
    tokio::select! {
        () = pump(client_read, up_write, frozen.clone()) => {}
        () = pump(up_read, client_write, frozen) => {}
    }
}

async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.wait_for(|frozen| !frozen).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// PgBouncer (Debian's `pgbouncer`) in front of the server, in transaction pooling mode with a
/// few server connections for many clients: what fleets put between their runners and the
/// database. Run as the `postgres` user when the tests run as root (PgBouncer refuses root).
pub struct Bouncer {
    port: u16,
    child: std::process::Child,
    _dir: TempDir,
}

impl Bouncer {
    /// Starts PgBouncer for the server libpq's environment names, or `None` (loudly) when
    /// either is missing; under `CI=true` a missing `pgbouncer` fails the test.
    #[allow(clippy::disallowed_methods)] // a real process, started on the real clock
    pub fn start(pool_size: usize) -> Option<Bouncer> {
        let host = std::env::var("PGHOST").ok()?;
        let Some(binary) =
            ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"].into_iter().find(|p| std::path::Path::new(p).exists())
        else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and no pgbouncer: install Debian's pgbouncer (.ci/run does)"
            );
            eprintln!("!!!!! SKIPPING a PgBouncer test: no pgbouncer (apt-get install pgbouncer) !!!!!");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = TempDir::new("bouncer");
        let user = std::env::var("PGUSER").unwrap_or_else(|_| "postgres".to_owned());
        let upstream_port = std::env::var("PGPORT").unwrap_or_else(|_| "5432".to_owned());
        // PgBouncer logs in to the server with the password its auth file holds for the user
        // (plain text, `"` doubled), so a server that asks for one (pg_virtualenv's does) lets
        // it in; clients reach PgBouncer itself on trust.
        let password = std::env::var("PGPASSWORD").unwrap_or_default().replace('"', "\"\"");
        std::fs::write(dir.path.join("users.txt"), format!("\"{user}\" \"{password}\"\n")).unwrap();
        let config = dir.path.join("pgbouncer.ini");
        std::fs::write(
            &config,
            format!(
                "[databases]\n* = host={host} port={upstream_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
                 pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 1000\n\
                 logfile = {log}\npidfile = {pid}\n",
                users = dir.path.join("users.txt").display(),
                log = dir.path.join("pgbouncer.log").display(),
                pid = dir.path.join("pgbouncer.pid").display(),
            ),
        )
        .unwrap();
        let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let mut command = if root {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", binary]);
            c
        } else {
            std::process::Command::new(binary)
        };
        let child = command
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("pgbouncer starts");
        let bouncer = Bouncer { port, child, _dir: dir };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(bouncer);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "pgbouncer did not listen on {port}: {:?}",
            std::fs::read_to_string(bouncer._dir.path.join("pgbouncer.log"))
        );
    }

    /// The server's URL through PgBouncer.
    pub fn url(&self) -> String {
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        format!("postgres://{}@127.0.0.1:{}/{}", var("PGUSER", "postgres"), self.port, var("PGDATABASE", "postgres"))
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed when dropped, that another user (PgBouncer's) may read and write.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "idem-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
