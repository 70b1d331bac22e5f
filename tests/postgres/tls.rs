//! TLS to a real server whose certificate the test made: `sslmode` and `sslrootcert` as libpq
//! reads them. A journal that checks a certificate connects only to the server that holds
//! it; one told not to check still encrypts; `disable` never does.

use std::time::{Duration, SystemTime};

use idempotent_retry::journal::store::{Begun, Finish, Intent, KeyPlan};
use idempotent_retry::journal::{JournalError, KeyStore, OpState, PostgresJournal};
use idempotent_retry::time::{Sleeper, TokioSleeper};

use crate::support;

/// A CA, a server certificate it signed for `localhost` only, and a CA that signed nothing.
struct Certificates {
    dir: std::path::PathBuf,
    server_pem: String,
    server_key_pem: String,
}

impl Certificates {
    fn new() -> Certificates {
        let dir = std::env::temp_dir().join(format!("idem-pg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            let cert = params.self_signed(&key).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            rcgen::Issuer::new(params, key)
        };
        let ours = ca("ca");
        ca("stranger");
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&server_key, &ours).unwrap();
        Certificates { dir, server_pem: server.pem(), server_key_pem: server_key.serialize_pem() }
    }

    fn root(&self, name: &str) -> String {
        self.dir.join(format!("{name}.pem")).display().to_string()
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain connection of the test's own, as the cluster's superuser.
async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// Writes `pem` into the server's data directory (it is on this machine: the server is at
/// `localhost`), owned by the server's user with mode 0600, as it wants a key; the file's path.
/// The test must be able to write there (root, as in CI, or the server's own user).
async fn server_file(admin: &tokio_postgres::Client, name: &str, pem: &str) -> String {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir: String = admin.query_one("SHOW data_directory", &[]).await.unwrap().get(0);
    let path = format!("{dir}/{name}");
    let owner = std::fs::metadata(&dir).unwrap_or_else(|e| panic!("the server's data directory {dir}: {e}"));
    std::fs::write(&path, pem).unwrap_or_else(|e| panic!("writing {path} (run as root or the server's user): {e}"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
    path
}

/// Sets `ssl_cert_file` and `ssl_key_file` (`None`: back to the cluster's own), and waits for
/// new connections to get them.
async fn serve_with(admin: &tokio_postgres::Client, url: &str, files: Option<(&str, &str)>) {
    // One message each: ALTER SYSTEM refuses to run inside a transaction, implicit or not.
    let statements = match files {
        Some((cert, key)) => {
            [format!("ALTER SYSTEM SET ssl_cert_file = '{cert}'"), format!("ALTER SYSTEM SET ssl_key_file = '{key}'")]
        }
        None => ["ALTER SYSTEM RESET ssl_cert_file".to_owned(), "ALTER SYSTEM RESET ssl_key_file".to_owned()],
    };
    for sql in statements.iter().map(String::as_str).chain(["SELECT pg_reload_conf()"]) {
        admin.batch_execute(sql).await.unwrap();
    }
    let want = files.map(|(cert, _)| cert.to_owned());
    for _ in 0..100 {
        let fresh = self::admin(url).await;
        let shown: String = fresh.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
        let on: String = fresh.query_one("SHOW ssl", &[]).await.unwrap().get(0);
        if want.as_deref().is_none_or(|cert| shown == cert) {
            assert_eq!(on, "on", "the test server has TLS turned off");
            return;
        }
        TokioSleeper.sleep(Duration::from_millis(50)).await;
    }
    panic!("the server did not reload its TLS files");
}

/// `url` with its host replaced.
fn at_host(url: &str, host: &str) -> String {
    let mut url = url::Url::parse(url).unwrap();
    url.set_host(Some(host)).unwrap();
    url.to_string()
}

fn with_query(url: &str, query: &str) -> String {
    format!("{url}{}{query}", if url.contains('?') { '&' } else { '?' })
}

/// Opens the journal at `url` and records one operation through it, start to end.
async fn records(url: &str, schema: &str) -> Result<PostgresJournal, JournalError> {
    let journal = support::builder(url, schema).timeout(Duration::from_secs(3)).open().await?;
    let intent = Intent::new("tls-op", "POST", "https://api.test/cvms", "fp", KeyPlan::Random, SystemTime::UNIX_EPOCH);
    let Begun::Send { claim, .. } = journal.begin(&intent).await? else { panic!("tls-op: not sent") };
    journal.finish("tls-op", &Finish::new(claim, OpState::Succeeded, SystemTime::UNIX_EPOCH)).await?;
    Ok(journal)
}

/// The server's clock, to tell connections made from now on from older ones.
async fn server_now(admin: &tokio_postgres::Client) -> String {
    admin.query_one("SELECT clock_timestamp()::text", &[]).await.unwrap().get(0)
}

/// How many journal connections (its `application_name`) made since `since` are encrypted,
/// and how many are not, as the server sees them.
async fn connections(admin: &tokio_postgres::Client, since: &str) -> (i64, i64) {
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'idempotent-retry' AND a.backend_start >= $1::text::timestamptz",
            &[&since],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn the_journal_checks_the_server_certificate_as_libpq_does() {
    let Some((url, _alone)) = support::server_alone().await else { return };
    let host = url::Url::parse(&url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
    if host != "localhost" {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(!ci, "CI=true: the TLS test needs the server at localhost over TCP, not {host:?}");
        eprintln!("SKIPPING the TLS test: it needs PGHOST=localhost (TCP), not {host:?}");
        return;
    }
    let certificates = Certificates::new();
    let admin = admin(&url).await;
    let cert = server_file(&admin, "idem-tls-test.crt", &certificates.server_pem).await;
    let key = server_file(&admin, "idem-tls-test.key", &certificates.server_key_pem).await;
    serve_with(&admin, &url, Some((&cert, &key))).await;
    let schema = support::schema("tls");
    let by_ip = at_host(&url, "127.0.0.1");
    let (ca, stranger) = (certificates.root("ca"), certificates.root("stranger"));

    // Checked, and it is the server's: records.
    let full = with_query(&url, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let since = server_now(&admin).await;
    let journal = records(&full, &schema).await.expect("verify-full against the CA that signed the server");
    let (encrypted, plain) = connections(&admin, &since).await;
    assert!(encrypted >= 1 && plain == 0, "{encrypted} encrypted, {plain} plain");
    drop(journal);

    // The certificate names `localhost`, not 127.0.0.1: verify-full refuses, verify-ca (the
    // chain only) connects.
    let wrong_name = with_query(&by_ip, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let refused = records(&wrong_name, &schema).await.expect_err("a certificate for another name");
    assert!(matches!(refused, JournalError::Unavailable { .. }), "{refused}");
    assert!(refused.to_string().contains("certificate"), "{refused}");
    records(&with_query(&by_ip, &format!("sslmode=verify-ca&sslrootcert={ca}")), &schema)
        .await
        .expect("verify-ca checks the chain, not the name");

    // Signed by a CA the journal was not told to trust: refused, whatever the mode.
    for mode in ["verify-full", "verify-ca", "require"] {
        let untrusted = with_query(&url, &format!("sslmode={mode}&sslrootcert={stranger}"));
        let refused = records(&untrusted, &schema).await.err().unwrap_or_else(|| panic!("{mode}: an unknown issuer"));
        assert!(refused.to_string().contains("certificate"), "{mode}: {refused}");
        assert!(!refused.to_string().contains(&std::env::var("PGPASSWORD").unwrap_or("\u{0}".into())), "{refused}");
    }
    // The machine's roots never signed a test CA.
    let system = with_query(&url, "sslmode=verify-full&sslrootcert=system");
    assert!(records(&system, &schema).await.is_err(), "sslrootcert=system took a test CA");

    // Not checked: encrypted all the same (`require` fails on a server without TLS).
    for mode in ["require", "prefer"] {
        let since = server_now(&admin).await;
        let journal = records(&with_query(&url, &format!("sslmode={mode}")), &schema).await.expect(mode);
        let (encrypted, plain) = connections(&admin, &since).await;
        assert!(encrypted >= 1 && plain == 0, "{mode}: {encrypted} encrypted, {plain} plain");
        drop(journal);
    }
    let since = server_now(&admin).await;
    let journal = records(&with_query(&url, "sslmode=disable"), &schema).await.expect("disable");
    let (encrypted, plain) = connections(&admin, &since).await;
    assert!(encrypted == 0 && plain >= 1, "sslmode=disable: {encrypted} encrypted, {plain} plain");
    drop(journal);

    // On the server's Unix socket sslmode does not apply, as with libpq: `require` connects,
    // unencrypted (tokio-postgres alone asks for TLS there and fails on the server's no).
    // Sockets authenticate by peer here: a role named like this process's user, for the test.
    let me = String::from_utf8(std::process::Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let me = me.trim();
    let exists = admin.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&me]).await.unwrap().is_some();
    if !exists {
        admin.batch_execute(&format!("CREATE ROLE \"{me}\" LOGIN SUPERUSER")).await.unwrap();
    }
    let dirs: String = admin.query_one("SHOW unix_socket_directories", &[]).await.unwrap().get(0);
    let dir = dirs.split(',').next().unwrap().trim();
    let port = url::Url::parse(&url).unwrap().port().unwrap_or(5432);
    let encoded: String = url::form_urlencoded::byte_serialize(dir.as_bytes()).collect();
    let socket = format!("postgres://{me}@{encoded}:{port}/postgres?sslmode=require");
    let since = server_now(&admin).await;
    let (over_socket, encrypted, plain) = match records(&socket, &support::schema("tls-socket")).await {
        Ok(journal) => {
            let (encrypted, plain) = connections(&admin, &since).await;
            drop(journal);
            (Ok(()), encrypted, plain)
        }
        Err(e) => (Err(e.to_string()), 0, 0),
    };
    if !exists {
        // The journal's connections close as its pool goes.
        TokioSleeper.sleep(Duration::from_millis(200)).await;
        admin.batch_execute(&format!("DROP OWNED BY \"{me}\"")).await.unwrap();
        admin.batch_execute(&format!("DROP ROLE \"{me}\"")).await.unwrap();
    }
    serve_with(&admin, &url, None).await;
    over_socket.expect("sslmode=require over the Unix socket");
    assert!(encrypted == 0 && plain >= 1, "over the socket: {encrypted} encrypted, {plain} plain");
}

/// A "database" at `127.0.0.1` that takes the connection, says yes to TLS, and then `answer`s
/// every handshake with the given bytes (nothing, for a host that froze there).
async fn says_yes_to_tls_then(answer: &'static [u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 8];
            if socket.read_exact(&mut request).await.is_ok() && socket.write_all(b"S").await.is_ok() {
                let _ = socket.write_all(answer).await;
            }
            held.push(socket); // never closed, never answered further
        }
    });
    port
}

/// A server that stalls in the middle of the TLS handshake, or answers it with something that
/// is not TLS: opening the journal fails as unavailable, by itself, and says why.
#[tokio::test]
async fn a_tls_handshake_that_stalls_or_is_not_tls_fails_within_the_bound() {
    const GUARD: Duration = Duration::from_secs(30);
    for (answer, says) in
        [(&b""[..], "no answer within 300 ms while connecting"), (&b"HTTP/1.1 400 Bad Request\r\n\r\n"[..], "TLS")]
    {
        let port = says_yes_to_tls_then(answer).await;
        let url = format!("postgres://ci:s3cret@127.0.0.1:{port}/db?sslmode=require");
        let open = PostgresJournal::builder(url).timeout(Duration::from_millis(300)).open();
        let err = tokio::time::timeout(GUARD, open).await.expect("the open ends by itself").expect_err("no database");
        assert!(matches!(err, JournalError::Unavailable { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(says), "{says}: {text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
