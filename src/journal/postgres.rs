//! The PostgreSQL journal (feature `postgres`): one database shared by every machine of a fleet.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, SimpleQueryMessage};

use super::store::{Begun, Finish, Intent, KeyPlan};
use super::{JournalError, KeyStore, OpState, Record, from_millis, to_millis};
use crate::key::IdempotencyKey;

/// Runs `$work` (an expression using `$client`, a pooled connection) bounded as a whole: a
/// database that accepts a connection and then never answers (a frozen host, a stalled proxy)
/// fails the call as [`JournalError::Unavailable`] after [`Inner::stall_bound`], and that
/// connection is closed rather than pooled again. With `again`, a connection that turns out
/// dropped (a database restart) is replaced once: safe, since a transaction that did not commit
/// wrote nothing, and one that did is this journal's own, which the second try finds.
///
/// A macro, not a function taking an async closure: the futures must stay `Send` for
/// `async_trait`, which higher-ranked async closures are not yet.
macro_rules! call {
    ($inner:expr, again: $again:expr, |$client:ident| $work:expr) => {{
        let inner: &Inner = $inner;
        let bound = inner.stall_bound();
        let mut tries = 0;
        loop {
            tries += 1;
            #[allow(unused_mut)]
            let mut $client = inner.client().await?;
            let result = match crate::time::io_bound(bound, async { $work }).await {
                Ok(result) => result,
                Err(()) => {
                    drop(deadpool_postgres::Object::take($client));
                    break Err(JournalError::Unavailable {
                        path: inner.shown.clone(),
                        reason: format!("no answer within {} ms", bound.as_millis()),
                    });
                }
            };
            match result {
                Err(JournalError::Unavailable { .. }) if $again && tries == 1 => continue,
                result => break result,
            }
        }
    }};
}

/// The schema's version, in the `migrations` table. Version 1 is the first.
const SCHEMA_VERSION: i32 = 1;

/// The advisory lock every opener takes while it creates or migrates the schema.
const MIGRATION_LOCK: i64 = 0x1de5_0001;

/// The columns of a record, in the order [`decode`] reads them.
const COLUMNS: &str =
    "operation, key, method, url, fingerprint, state, created_at, updated_at, status, identity, fixed_key, handle";

/// A journal in a PostgreSQL database, shared by every machine that runs the same operations:
/// CI runners, ephemeral Terraform agents, a fleet retrying one pipeline step at once. The
/// rules are [`SqliteJournal`](super::SqliteJournal)'s (the table on [`KeyStore`]), and these
/// hold across machines:
///
/// - **Atomic begin.** Each `begin` is one transaction that takes a transaction-scoped advisory
///   lock on the operation (`pg_advisory_xact_lock`; none survives the transaction, so
///   PgBouncer's transaction pooling cannot strand one). A new operation is claimed by one
///   `INSERT … ON CONFLICT DO NOTHING`, all of it one message and one round trip; one with a
///   record reads it `FOR UPDATE` and applies the rules. Two machines beginning the same
///   operation at the same instant never both send.
/// - **Leases.** A run that sends holds its record as a lease (its owner and an expiry by the
///   database's clock, 90 s by default), released when it finishes. Another machine that finds
///   a live lease gets [`Begun::Running`]: it waits for that run to settle and answers with its
///   result, never with a create of its own and never with a new key. A lease whose holder
///   died (kill -9, a lost machine) expires, and the next run resumes the same key.
/// - **Scopes.** Records are keyed by (scope, operation): two accounts or tenants sharing one
///   database never see each other's records ([`PostgresJournalBuilder::scope`]).
/// - **Schema.** Versioned, created (or migrated) by the first opener under an advisory lock,
///   in a schema of its own (`idempotent_retry` unless [told otherwise](PostgresJournalBuilder::schema));
///   any number of machines may open a new database at once. [`gc`](Self::gc) removes settled
///   records past the server's retention.
/// - **Bounded.** Connecting, each statement and each lock wait are bounded
///   ([`PostgresJournalBuilder::timeout`], 5 s, set per transaction with `SET LOCAL`), and
///   each call as a whole by three times that: a database that takes the connection and then
///   never answers fails the call as [`JournalError::Unavailable`], and a `begin` that fails
///   sends nothing. The password of the connection string never appears in errors, logs or
///   records.
/// - **PgBouncer.** Nothing lives in the session: no startup options, no session settings, no
///   session locks. Transaction pooling (`pool_mode = transaction`) works as a direct
///   connection does.
///
/// The key of a run is committed before the run sends. Its outcome is written, and committed
/// only once the write has answered: an outcome that reaches the database after the call gave
/// up on it (a host that froze and woke) is rolled back, so a run that reported its outcome
/// unrecorded leaves the record pending, as it said. The commit is `synchronous_commit = off`
/// (losing it to a crash of the database leaves the record pending too: the next run resumes
/// the key, and the server replays).
///
/// # TLS
///
/// The URL's `sslmode` and `sslrootcert` mean what they mean to libpq (`psql`, PgBouncer,
/// Terraform's `pg` backend), on rustls:
///
/// | `sslmode` | TLS | the server's certificate |
/// |---|---|---|
/// | `disable` | never | – |
/// | `prefer` (the default) | when the server offers it | not checked (chained to `sslrootcert` when one is given) |
/// | `require` | always | the same |
/// | `verify-ca` | always | chained to a root of `sslrootcert` |
/// | `verify-full` | always | that, and naming the host connected to |
///
/// `sslrootcert` is a PEM file (a cloud's CA bundle, say), or `system` for the machine's own
/// roots. Across a network, use `verify-full`: without a checked certificate, anyone on the
/// path can read the journal's traffic (keys and all) or stand in for the database.
/// `sslmode=verify-*` without `sslrootcert`, and client certificates (`sslcert`), are refused
/// before anything connects. These two parameters are read from a `postgres://` URL; the
/// `key=value` form takes `sslmode` up to `require`. On a Unix socket `sslmode` does not
/// apply, as with libpq: it is never encrypted, and `require` connects.
///
/// ```no_run
/// # async fn run() -> Result<(), idempotent_retry::journal::JournalError> {
/// use idempotent_retry::journal::PostgresJournal;
///
/// let url = "postgres://ci@db.internal/deploys?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem";
/// let journal = PostgresJournal::open(url).await?;
/// # let _ = journal; Ok(()) }
/// ```
///
/// # Examples
///
/// ```no_run
/// # async fn run() -> Result<(), idempotent_retry::journal::JournalError> {
/// use idempotent_retry::journal::{KeyStore, PostgresJournal};
///
/// let journal = PostgresJournal::builder("postgres://ci@db.internal/deploys")
///     .scope("tenant-42")
///     .open()
///     .await?;
/// for record in journal.list().await? {
///     println!("{} {} {}", record.operation, record.state, record.url);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresJournal {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// The connection string without its password, for messages.
    shown: String,
    /// The schema, quoted as an identifier.
    schema: String,
    scope: String,
    owner: String,
    lease: Duration,
    timeout: Duration,
}

impl fmt::Debug for PostgresJournal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresJournal")
            .field("at", &self.inner.shown)
            .field("schema", &self.inner.schema)
            .field("scope", &self.inner.scope)
            .field("owner", &self.inner.owner)
            .field("lease", &self.inner.lease)
            .finish()
    }
}

/// Builds a [`PostgresJournal`]. Every setting has a default; see each method.
#[derive(Clone)]
pub struct PostgresJournalBuilder {
    url: String,
    schema: String,
    scope: String,
    owner: Option<String>,
    lease: Duration,
    timeout: Duration,
    pool_size: usize,
}

impl fmt::Debug for PostgresJournalBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresJournalBuilder")
            .field("at", &redact_conninfo(&self.url))
            .field("schema", &self.schema)
            .field("scope", &self.scope)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl PostgresJournal {
    /// How long a run holds its record unless told otherwise: 90 s (brandur's Stripe-style
    /// keys use the same).
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(90);
    /// The schema the journal's tables live in unless told otherwise.
    pub const DEFAULT_SCHEMA: &'static str = "idempotent_retry";
    /// The bound on connecting, on each statement and on each lock wait: 5 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A builder for the journal in the database at `url`: a `postgres://` or `postgresql://`
    /// URL, or libpq's `key=value` form.
    pub fn builder(url: impl Into<String>) -> PostgresJournalBuilder {
        PostgresJournalBuilder {
            url: url.into(),
            schema: Self::DEFAULT_SCHEMA.to_owned(),
            scope: String::new(),
            owner: None,
            lease: Self::DEFAULT_LEASE,
            timeout: Self::DEFAULT_TIMEOUT,
            pool_size: 8,
        }
    }

    /// The server libpq's environment names, as a URL for [`builder`](Self::builder): `PGHOST`
    /// (required: `None` without it; a directory is a Unix socket; a comma-separated list is
    /// tried in order), `PGPORT` (5432; one for every host, or a list of one each), `PGUSER`
    /// (`postgres`), `PGPASSWORD` (none) and `PGDATABASE` (`postgres`), each percent-encoded,
    /// and `PGSSLMODE` and `PGSSLROOTCERT` when set (see [TLS](PostgresJournal#tls)). What
    /// `pg_virtualenv` and most CI services export.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use idempotent_retry::journal::PostgresJournal;
    ///
    /// let url = PostgresJournal::url_from_env().ok_or("set PGHOST")?;
    /// let journal = PostgresJournal::builder(url).scope("ci").open().await?;
    /// # let _ = journal; Ok(()) }
    /// ```
    pub fn url_from_env() -> Option<String> {
        url_from_vars(|name| std::env::var(name).ok())
    }

    /// Opens the journal at `url` with every default.
    ///
    /// # Errors
    ///
    /// As [`PostgresJournalBuilder::open`].
    pub async fn open(url: impl Into<String>) -> Result<Self, JournalError> {
        Self::builder(url).open().await
    }

    /// Where the journal is, without the password.
    pub fn location(&self) -> &str {
        &self.inner.shown
    }

    /// The scope whose records this journal reads and writes.
    pub fn scope(&self) -> &str {
        &self.inner.scope
    }

    /// Removes this scope's settled records (succeeded or not applied) last changed before
    /// `before`, and the retired records of the same age: so the tables do not grow forever.
    /// Choose `before` past the server's retention. A fixed key's success is kept whatever its
    /// age: it is what keeps that key from being sent again after the server forgot it (and
    /// from creating a second resource). How many records went.
    ///
    /// # Errors
    ///
    /// When the database cannot be used.
    pub async fn gc(&self, before: SystemTime) -> Result<u64, JournalError> {
        let inner = &*self.inner;
        let cutoff = to_millis(before);
        let settled = "state IN ('succeeded', 'not_applied', 'failed') AND updated_at < $2 \
                       AND NOT (fixed_key AND state = 'succeeded')";
        let current = format!("DELETE FROM {}.operations WHERE scope = $1 AND {settled}", inner.schema);
        let retired = format!("DELETE FROM {}.retired WHERE scope = $1 AND {settled}", inner.schema);
        call!(inner, again: true, |client| {
                let tx = inner.transaction(&mut client, "").await?;
                let gone = tx.execute(&current, &[&inner.scope, &cutoff]).await.map_err(|e| inner.fail(e))?;
                let old = tx.execute(&retired, &[&inner.scope, &cutoff]).await.map_err(|e| inner.fail(e))?;
                tx.commit().await.map_err(|e| inner.fail(e))?;
                Ok(gone + old)
        })
    }
}

/// [`PostgresJournal::url_from_env`] over `vars` (libpq's variables by name; empty is unset).
fn url_from_vars(vars: impl Fn(&str) -> Option<String>) -> Option<String> {
    let var = |name: &str| vars(name).filter(|v| !v.is_empty());
    let mut url = url_from_parts(
        &var("PGHOST")?,
        var("PGPORT").as_deref(),
        var("PGUSER").as_deref(),
        var("PGPASSWORD").as_deref(),
        var("PGDATABASE").as_deref(),
    );
    let tls = [("sslmode", var("PGSSLMODE")), ("sslrootcert", var("PGSSLROOTCERT"))];
    let query: Vec<String> =
        tls.iter().filter_map(|(key, value)| Some(format!("{key}={}", encode(value.as_deref()?)))).collect();
    if !query.is_empty() {
        url.push('?');
        url.push_str(&query.join("&"));
    }
    Some(url)
}

/// A `postgres://` URL from libpq's parts, each percent-encoded. `host` may be a list
/// (`h1,h2`, tried in order); `port` is one port for every host, or a list of one each.
fn url_from_parts(
    host: &str,
    port: Option<&str>,
    user: Option<&str>,
    password: Option<&str>,
    db: Option<&str>,
) -> String {
    let user = encode(user.unwrap_or("postgres"));
    let password = password.map(|p| format!(":{}", encode(p))).unwrap_or_default();
    let ports: Vec<&str> = port.unwrap_or("5432").split(',').map(|p| p.trim()).collect();
    let hosts: Vec<String> = host
        .split(',')
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first().filter(|_| ports.len() == 1)).copied();
            let port = port.filter(|p| !p.is_empty()).unwrap_or("5432");
            format!("{}:{port}", encode(host.trim()))
        })
        .collect();
    let db = encode(db.unwrap_or("postgres"));
    format!("postgres://{user}{password}@{}/{db}", hosts.join(","))
}

/// Percent-encodes every byte but RFC 3986's unreserved ones.
fn encode(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for byte in part.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte as char),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

impl PostgresJournalBuilder {
    /// The schema (PostgreSQL namespace) the tables live in (default
    /// [`DEFAULT_SCHEMA`](PostgresJournal::DEFAULT_SCHEMA)): one database can hold several
    /// journals side by side.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The scope (account, tenant) whose records the journal reads and writes (default: the
    /// empty scope). Records of other scopes are never seen: not by `begin`'s pinning checks,
    /// not by `list`.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }

    /// Who this journal's runs are, in the leases they hold (default: the host's name, the
    /// process id and a random part, new for every journal opened).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// How long a run holds its record before another machine may take it over (default
    /// [`DEFAULT_LEASE`](PostgresJournal::DEFAULT_LEASE), 90 s, by the database's clock). A run
    /// that lasts longer is not stopped: another machine then resumes the same key, and the
    /// server's in-flight answer (409) or replay keeps it to one resource.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The bound on connecting, on each statement and on each lock wait (default
    /// [`DEFAULT_TIMEOUT`](PostgresJournal::DEFAULT_TIMEOUT)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The most connections the journal holds open (default 8).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Connects, and creates or migrates the schema if it must (under an advisory lock: any
    /// number of machines may do this at once).
    ///
    /// # Errors
    ///
    /// [`JournalError::Unavailable`] when the database cannot be reached or refuses the
    /// connection; [`JournalError::Other`] when the URL cannot be read or the schema is newer
    /// than this program knows.
    pub async fn open(self) -> Result<PostgresJournal, JournalError> {
        let shown = redact_conninfo(&self.url);
        let tls = super::postgres_tls::configure(&self.url)
            .map_err(|reason| JournalError::Other { path: shown.clone(), reason })?;
        let mut config = tls.config;
        // The statement and lock bounds are set per transaction (`SET LOCAL`), not as startup
        // options: PgBouncer refuses the `options` startup parameter, and the URL's own
        // `options` stay the user's.
        config.connect_timeout(self.timeout);
        config.application_name("idempotent-retry");
        let manager =
            Manager::from_config(config, tls.connector, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .wait_timeout(Some(self.timeout))
            .create_timeout(Some(self.timeout))
            .recycle_timeout(Some(self.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| JournalError::Other { path: shown.clone(), reason: e.to_string() })?;
        let owner = self.owner.unwrap_or_else(default_owner);
        let inner = Inner {
            pool,
            shown,
            schema: quote_ident(&self.schema),
            scope: self.scope,
            owner,
            lease: self.lease,
            timeout: self.timeout,
        };
        inner.storable(&[("scope", &inner.scope), ("lease owner", &inner.owner), ("schema", &self.schema)])?;
        call!(&inner, again: true, |client| inner.migrate(&mut client).await)?;
        Ok(PostgresJournal { inner: Arc::new(inner) })
    }
}

/// `host/pid/random`: who holds a lease, told apart from every other journal instance.
fn default_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!("{host}/{}/{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// `"name"`, with inner quotes doubled: a schema name used as an identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A connection string as it may be shown: a URL without its password (and query values), or
/// libpq's `key=value` form with `password` masked.
pub(crate) fn redact_conninfo(conninfo: &str) -> String {
    if conninfo.contains("://") {
        return crate::target::redact_str(conninfo);
    }
    conninfo
        .split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.trim().eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An error's text with whatever it quotes of the connection string left out.
pub(super) fn clean(e: &tokio_postgres::Error) -> String {
    // The server's own words (a refused startup parameter, a missing role), with its code.
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let text = e.to_string();
    // tokio-postgres names the parameter it could not read, never its value; keep it short.
    let mut text = text.lines().next().unwrap_or_default().to_owned();
    // What went wrong underneath (a certificate, a refused socket): tokio-postgres's own
    // words ("error performing TLS handshake") do not say.
    if let Some(cause) = std::error::Error::source(e) {
        let cause = cause.to_string();
        text = format!("{text}: {}", cause.lines().next().unwrap_or_default());
    }
    text
}

/// The advisory lock of `what` (an operation or a key) in `scope`: 64 bits of a SHA-256.
fn lock_id(class: &str, scope: &str, what: &str) -> i64 {
    let mut hash = Sha256::new();
    for part in [class, scope, what] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

impl Inner {
    async fn client(&self) -> Result<deadpool_postgres::Object, JournalError> {
        self.pool
            .get()
            .await
            .map_err(|e| JournalError::Unavailable { path: self.shown.clone(), reason: pool_error(&e, self.timeout) })
    }

    /// How long one call may take once connected: each of its statements and lock waits is
    /// bounded by the timeout in the database, and the whole by three of them here.
    fn stall_bound(&self) -> Duration {
        self.timeout.saturating_mul(3)
    }

    /// A transaction whose statements and lock waits are bounded by the journal's timeout,
    /// with `extra` settings (`SET LOCAL …;`) in the same round trip.
    async fn transaction<'c>(
        &self,
        client: &'c mut deadpool_postgres::Object,
        extra: &str,
    ) -> Result<deadpool_postgres::Transaction<'c>, JournalError> {
        let tx = client.transaction().await.map_err(|e| self.fail(e))?;
        tx.batch_execute(&self.bounds(extra)).await.map_err(|e| self.fail(e))?;
        Ok(tx)
    }

    /// The `SET LOCAL`s that bound a transaction's statements and lock waits, and `extra`.
    /// The hot paths (`begin`, `finish`) send them in the same message as their statements:
    /// the server runs them in order, so those statements are bounded too.
    fn bounds(&self, extra: &str) -> String {
        let ms = self.timeout.as_millis().max(1);
        format!(
            "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}; \
             SET LOCAL idle_in_transaction_session_timeout = {}; {extra}",
            ms * 4
        )
    }

    /// Runs `statement` as a transaction of its own in one round trip, and how many rows it
    /// touched: the bounds, the advisory `locks` (taken in order) and the statement go out as
    /// one simple-query message, which the server runs as one implicit transaction (committed
    /// at its end, rolled back whole if any part fails).
    ///
    /// One message and one answer, where the same transaction as separate statements (`BEGIN`,
    /// the locks, the statement, `COMMIT`), even pipelined, is four answers to wait for and
    /// costs about 100 µs more per operation (`benches/journal.rs`). And a call dropped midway
    /// (a stall bound, a caller's timeout) has sent all of it or nothing: no connection goes
    /// back to the pool inside a transaction. The message carries no parameters, so every
    /// value in `statement` is a [`literal`].
    ///
    /// A message that reaches the database after the call gave up on it (a frozen host, a
    /// stalled proxy) still commits. For `begin` that is harmless: a claim nobody sent on,
    /// held by a lease that expires. What must not commit late goes through
    /// [`commit_after`](Self::commit_after).
    async fn in_one_trip(
        &self,
        client: &tokio_postgres::Client,
        locks: &[i64],
        statement: &str,
    ) -> Result<u64, JournalError> {
        let mut sql = self.bounds("");
        if !locks.is_empty() {
            let locks = locks.iter().map(|id| format!("pg_advisory_xact_lock({id})")).collect::<Vec<_>>();
            sql.push_str(&format!(" SELECT {};", locks.join(", ")));
        }
        sql.push(' ');
        sql.push_str(statement);
        let answers = client.simple_query(&sql).await.map_err(|e| self.fail(e))?;
        Ok(last_count(&answers))
    }

    /// Runs `statement` in a transaction (with the bounds and `extra`) in one round trip, and
    /// commits it in a second, sent only once the statement has answered: a statement that
    /// reaches the database after the call gave up on it (a frozen host that wakes up, a
    /// stalled proxy that lets it through) is rolled back with its connection, never committed
    /// behind the caller's back. What is left is the `COMMIT` itself: its answer lost, the
    /// call cannot know.
    ///
    /// `finish` needs this: its error says the record stays pending, and the next run resumes
    /// the key on that word. An outcome committed after the run reported it unrecorded would
    /// make that next run a new one, and a second resource. (In one round trip it does:
    /// `a_database_that_stops_answering_before_finish_leaves_the_key_to_the_next_run`.)
    async fn commit_after(
        &self,
        client: &tokio_postgres::Client,
        extra: &str,
        statement: &str,
    ) -> Result<u64, JournalError> {
        let sql = format!("BEGIN; {} {statement}", self.bounds(extra));
        let transaction = OpenTransaction { client };
        let answers = client.simple_query(&sql).await.map_err(|e| self.fail(e))?;
        // From here the transaction ends with the `COMMIT`, which its future's first poll
        // queues: there is no await in between.
        std::mem::forget(transaction);
        client.batch_execute("COMMIT").await.map_err(|e| self.fail(e))?;
        Ok(last_count(&answers))
    }

    /// Refuses text PostgreSQL cannot hold (a NUL byte), before anything is sent: a clear
    /// error, where the database would only say the message could not be encoded.
    fn storable(&self, fields: &[(&str, &str)]) -> Result<(), JournalError> {
        match fields.iter().find(|(_, value)| value.contains('\0')) {
            Some((what, value)) => Err(JournalError::Other {
                path: self.shown.clone(),
                reason: format!("PostgreSQL text cannot hold a NUL byte, and the {what} {value:?} has one"),
            }),
            None => Ok(()),
        }
    }

    fn fail(&self, e: tokio_postgres::Error) -> JournalError {
        let path = self.shown.clone();
        match e.code() {
            Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::QUERY_CANCELED => {
                JournalError::Locked { path, waited: self.timeout }
            }
            // Connection exceptions (08…) and a server going away (57P01-03: shutdown, crash,
            // not accepting connections yet).
            Some(c) if c.code().starts_with("08") || c.code().starts_with("57P") => {
                JournalError::Unavailable { path, reason: clean(&e) }
            }
            _ if e.is_closed() || e.as_db_error().is_none() => JournalError::Unavailable { path, reason: clean(&e) },
            _ => JournalError::Other { path, reason: clean(&e) },
        }
    }

    /// Creates or migrates the schema, under the migration lock: many openers of a new database
    /// at once wait for the first, then find the schema there.
    async fn migrate(&self, client: &mut deadpool_postgres::Object) -> Result<(), JournalError> {
        let tx = self.transaction(client, "").await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(|e| self.fail(e))?;
        let s = &self.schema;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());"
        ))
        .await
        .map_err(|e| self.fail(e))?;
        let version: Option<i32> = tx
            .query_one(&format!("SELECT max(version) FROM {s}.migrations"), &[])
            .await
            .map_err(|e| self.fail(e))?
            .get(0);
        let version = version.unwrap_or(0);
        if version > SCHEMA_VERSION {
            return Err(JournalError::Other {
                path: self.shown.clone(),
                reason: format!("its schema (version {version}) is newer than this program knows ({SCHEMA_VERSION})"),
            });
        }
        if version < 1 {
            tx.batch_execute(&format!(
                "CREATE TABLE {s}.operations (
                    scope       TEXT NOT NULL,
                    operation   TEXT NOT NULL,
                    key         TEXT,
                    method      TEXT NOT NULL,
                    url         TEXT NOT NULL,
                    fingerprint TEXT NOT NULL,
                    state       TEXT NOT NULL,
                    created_at  BIGINT NOT NULL,
                    updated_at  BIGINT NOT NULL,
                    status      INTEGER,
                    identity    TEXT,
                    fixed_key   BOOLEAN NOT NULL,
                    handle      TEXT,
                    lease_owner TEXT,
                    lease_until TIMESTAMPTZ,
                    PRIMARY KEY (scope, operation)
                );
                CREATE INDEX operations_by_key ON {s}.operations (scope, key);
                CREATE TABLE {s}.retired (
                    scope       TEXT NOT NULL,
                    operation   TEXT NOT NULL,
                    key         TEXT NOT NULL,
                    method      TEXT NOT NULL,
                    url         TEXT NOT NULL,
                    fingerprint TEXT NOT NULL,
                    state       TEXT NOT NULL,
                    created_at  BIGINT NOT NULL,
                    updated_at  BIGINT NOT NULL,
                    status      INTEGER,
                    identity    TEXT,
                    fixed_key   BOOLEAN NOT NULL,
                    handle      TEXT,
                    PRIMARY KEY (scope, operation, key)
                );
                CREATE INDEX retired_by_key ON {s}.retired (scope, key);
                INSERT INTO {s}.migrations (version) VALUES (1);"
            ))
            .await
            .map_err(|e| self.fail(e))?;
        }
        tx.commit().await.map_err(|e| self.fail(e))
    }

    async fn begin(&self, client: &mut deadpool_postgres::Object, intent: &Intent<'_>) -> Result<Begun, JournalError> {
        match self.claim_new(client, intent).await? {
            Some(begun) => Ok(begun),
            None => self.begin_over(client, intent).await,
        }
    }

    /// The common case in one round trip: an operation with no record yet (and, for a fixed
    /// key, a key no other record holds) is claimed by one `INSERT … ON CONFLICT DO NOTHING`
    /// under the same advisory locks [`begin_over`](Self::begin_over) takes, so the two never
    /// race. `None` when a record is in the way: nothing was written, and the caller reads it.
    async fn claim_new(
        &self,
        client: &tokio_postgres::Client,
        intent: &Intent<'_>,
    ) -> Result<Option<Begun>, JournalError> {
        let s = &self.schema;
        let planned = intent.plan(None, None, None).map_err(JournalError::PayloadMismatch)?;
        let (Some(write), None) = (&planned.write, &planned.retire) else { return Ok(None) };
        let op_lock = lock_id("operation", &self.scope, intent.operation);
        // A fixed key held by any other record (this operation's retired runs, another
        // operation) takes the full path, which reads that record and applies the rule table.
        let (locks, free_key) = match &intent.key {
            KeyPlan::Fixed(key) => (
                vec![op_lock, lock_id("key", &self.scope, key.as_str())],
                format!(
                    " WHERE NOT EXISTS (SELECT 1 FROM {s}.operations WHERE scope = {scope} AND key = {key}) \
                     AND NOT EXISTS (SELECT 1 FROM {s}.retired WHERE scope = {scope} AND key = {key})",
                    scope = literal(&self.scope),
                    key = literal(key.as_str()),
                ),
            ),
            _ => (vec![op_lock], String::new()),
        };
        let sql = format!(
            "INSERT INTO {s}.operations (scope, {COLUMNS}, lease_owner, lease_until) \
             SELECT {}, {}, now() + {} * interval '1 millisecond'{free_key} \
             ON CONFLICT (scope, operation) DO NOTHING",
            self.params(write).literals(),
            literal(&self.owner),
            self.lease.as_millis()
        );
        let inserted = self.in_one_trip(client, &locks, &sql).await?;
        Ok((inserted == 1).then_some(planned.begun))
    }

    /// A begin over what the store holds: the operation's record, and for a fixed key the
    /// records that hold it, read under the advisory locks, then the rule table.
    async fn begin_over(
        &self,
        client: &mut deadpool_postgres::Object,
        intent: &Intent<'_>,
    ) -> Result<Begun, JournalError> {
        let s = &self.schema;
        let tx = client.transaction().await.map_err(|e| self.fail(e))?;
        // The operation's lock first, then the key's: two begins never wait on each other in
        // a circle. Bounds, locks and the read go out together; the server runs them in order.
        let op_lock = lock_id("operation", &self.scope, intent.operation);
        let key_lock = match &intent.key {
            KeyPlan::Fixed(key) => lock_id("key", &self.scope, key.as_str()),
            _ => op_lock,
        };
        let select = format!(
            "SELECT {COLUMNS}, lease_owner, (lease_until > now()) AS leased FROM {s}.operations \
             WHERE scope = $1 AND operation = $2 FOR UPDATE"
        );
        let lock = "SELECT pg_advisory_xact_lock($1)";
        let bounds = self.bounds("");
        let op_lock: [(&(dyn ToSql + Sync), Type); 1] = [(&op_lock, Type::INT8)];
        let key_lock: [(&(dyn ToSql + Sync), Type); 1] = [(&key_lock, Type::INT8)];
        let which: [(&(dyn ToSql + Sync), Type); 2] = [(&self.scope, Type::TEXT), (&intent.operation, Type::TEXT)];
        let (_, _, _, row) = tokio::try_join!(
            tx.batch_execute(&bounds),
            tx.execute_typed(lock, &op_lock),
            // A second lock of the same id, held by this transaction already, returns at once.
            tx.execute_typed(lock, &key_lock),
            tx.query_typed_opt(&select, &which),
        )
        .map_err(|e| self.fail(e))?;
        let existing = row.as_ref().map(|r| self.decode(r)).transpose()?;
        if let (Some(row), Some(record)) = (&row, &existing) {
            let owner: Option<String> = row.get("lease_owner");
            let leased: Option<bool> = row.get("leased");
            if record.state == OpState::Pending && leased == Some(true) && owner.as_deref() != Some(self.owner.as_str())
            {
                // Another machine's live run: nothing is written, and nothing may be sent.
                return Ok(Begun::Running(record.clone()));
            }
        }
        let (earlier, conflict) = match &intent.key {
            KeyPlan::Fixed(key) => {
                let earlier = tx
                    .query_opt(
                        &format!("SELECT {COLUMNS} FROM {s}.retired WHERE scope = $1 AND operation = $2 AND key = $3"),
                        &[&self.scope, &intent.operation, &key.as_str()],
                    )
                    .await
                    .map_err(|e| self.fail(e))?;
                let conflict = tx
                    .query_opt(
                        &format!(
                            "SELECT {COLUMNS} FROM {s}.operations WHERE scope = $1 AND key = $2 AND operation <> $3 AND fingerprint <> $4 \
                             UNION ALL SELECT {COLUMNS} FROM {s}.retired WHERE scope = $1 AND key = $2 AND operation <> $3 AND fingerprint <> $4 \
                             LIMIT 1"
                        ),
                        &[&self.scope, &key.as_str(), &intent.operation, &intent.fingerprint],
                    )
                    .await
                    .map_err(|e| self.fail(e))?;
                (earlier.map(|r| self.decode(&r)).transpose()?, conflict.map(|r| self.decode(&r)).transpose()?)
            }
            _ => (None, None),
        };
        let planned = intent
            .plan(existing.as_ref(), earlier.as_ref(), conflict.as_ref())
            .map_err(JournalError::PayloadMismatch)?;
        let Some(write) = planned.write else { return Ok(planned.begun) };
        if let Some(retired) = &planned.retire {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.retired (scope, {COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                     ON CONFLICT (scope, operation, key) DO UPDATE SET method = excluded.method, url = excluded.url, \
                     fingerprint = excluded.fingerprint, state = excluded.state, created_at = excluded.created_at, \
                     updated_at = excluded.updated_at, status = excluded.status, identity = excluded.identity, \
                     fixed_key = excluded.fixed_key, handle = excluded.handle"
                ),
                &self.params(retired).as_refs(),
            )
            .await
            .map_err(|e| self.fail(e))?;
        }
        let mut params = self.params(&write);
        let lease = self.lease.as_secs_f64();
        params.lease = Some((self.owner.clone(), lease));
        tx.execute_typed(
            &format!(
                "INSERT INTO {s}.operations (scope, {COLUMNS}, lease_owner, lease_until) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, now() + make_interval(secs => $15)) \
                 ON CONFLICT (scope, operation) DO UPDATE SET key = excluded.key, method = excluded.method, \
                 url = excluded.url, fingerprint = excluded.fingerprint, state = excluded.state, \
                 created_at = excluded.created_at, updated_at = excluded.updated_at, status = excluded.status, \
                 identity = excluded.identity, fixed_key = excluded.fixed_key, handle = excluded.handle, \
                 lease_owner = excluded.lease_owner, lease_until = excluded.lease_until"
            ),
            &params.typed(),
        )
        .await
        .map_err(|e| self.fail(e))?;
        tx.commit().await.map_err(|e| self.fail(e))?;
        Ok(planned.begun)
    }

    async fn finish(
        &self,
        client: &mut deadpool_postgres::Object,
        operation: &str,
        finish: &Finish,
    ) -> Result<bool, JournalError> {
        let s = &self.schema;
        // Losing the outcome to a crash of the database leaves the record pending, which is
        // safe: the next run resumes the key. The key itself was committed durably by `begin`.
        let identity = finish.identity.as_ref().map(serde_json::Value::to_string);
        let handle = finish.handle.as_ref().map(|h| serde_json::to_string(h).expect("a handle serializes"));
        let sql = format!(
            "UPDATE {s}.operations SET state = {}, status = {}, identity = {}, updated_at = {}, handle = {}, \
             lease_owner = NULL, lease_until = NULL \
             WHERE scope = {} AND operation = {} AND key IS NOT DISTINCT FROM {} AND created_at = {}",
            literal(finish.state.as_str()),
            literal(&finish.status.map(i32::from)),
            literal(&identity),
            literal(&to_millis(finish.now)),
            literal(&handle),
            literal(&self.scope),
            literal(operation),
            literal(&finish.claim.key.as_ref().map(IdempotencyKey::as_str)),
            literal(&to_millis(finish.claim.created_at)),
        );
        let updated = self.commit_after(client, "SET LOCAL synchronous_commit = off;", &sql).await?;
        Ok(updated > 0)
    }

    async fn get(
        &self,
        client: &mut deadpool_postgres::Object,
        operation: &str,
    ) -> Result<Option<Record>, JournalError> {
        let tx = self.transaction(client, "").await?;
        let query = format!("SELECT {COLUMNS} FROM {}.operations WHERE scope = $1 AND operation = $2", self.schema);
        let row = tx.query_opt(&query, &[&self.scope, &operation]).await.map_err(|e| self.fail(e))?;
        tx.commit().await.map_err(|e| self.fail(e))?;
        row.map(|r| self.decode(&r)).transpose()
    }

    async fn list(&self, client: &mut deadpool_postgres::Object) -> Result<Vec<Record>, JournalError> {
        let tx = self.transaction(client, "").await?;
        let query =
            format!("SELECT {COLUMNS} FROM {}.operations WHERE scope = $1 ORDER BY created_at, operation", self.schema);
        let rows = tx.query(&query, &[&self.scope]).await.map_err(|e| self.fail(e))?;
        tx.commit().await.map_err(|e| self.fail(e))?;
        rows.iter().map(|r| self.decode(r)).collect()
    }

    async fn forget(&self, client: &mut deadpool_postgres::Object, operation: &str) -> Result<bool, JournalError> {
        let s = &self.schema;
        let tx = self.transaction(client, "").await?;
        let op_lock = lock_id("operation", &self.scope, operation);
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&op_lock]).await.map_err(|e| self.fail(e))?;
        tx.execute(&format!("DELETE FROM {s}.retired WHERE scope = $1 AND operation = $2"), &[&self.scope, &operation])
            .await
            .map_err(|e| self.fail(e))?;
        let forgot = tx
            .execute(
                &format!("DELETE FROM {s}.operations WHERE scope = $1 AND operation = $2"),
                &[&self.scope, &operation],
            )
            .await
            .map_err(|e| self.fail(e))?;
        tx.commit().await.map_err(|e| self.fail(e))?;
        Ok(forgot > 0)
    }

    /// A record from a row whose first columns are [`COLUMNS`]: exactly what was stored, or an
    /// error naming the column that is damaged (as the SQLite journal reads its rows).
    fn decode(&self, row: &Row) -> Result<Record, JournalError> {
        let bad = |what: &str| JournalError::Other {
            path: self.shown.clone(),
            reason: format!("the journal's `{what}` of operation {:?} cannot be read", row.get::<_, String>(0)),
        };
        let key: Option<String> = row.try_get(1).map_err(|_| bad("key"))?;
        let state: String = row.try_get(5).map_err(|_| bad("state"))?;
        let time = |column: usize, name: &str| {
            let ms: i64 = row.try_get(column).map_err(|_| bad(name))?;
            if ms < 0 { Err(bad(name)) } else { Ok(from_millis(ms)) }
        };
        let status = match row.try_get::<_, Option<i32>>(8).map_err(|_| bad("status"))? {
            Some(s) => Some(u16::try_from(s).ok().filter(|s| (100..=599).contains(s)).ok_or_else(|| bad("status"))?),
            None => None,
        };
        let identity: Option<String> = row.try_get(9).map_err(|_| bad("identity"))?;
        let handle: Option<String> = row.try_get(11).map_err(|_| bad("handle"))?;
        Ok(Record {
            operation: row.try_get(0).map_err(|_| bad("operation"))?,
            key: key.map(IdempotencyKey::new).transpose().map_err(|_| bad("key"))?,
            method: row.try_get(2).map_err(|_| bad("method"))?,
            url: row.try_get(3).map_err(|_| bad("url"))?,
            fingerprint: row.try_get(4).map_err(|_| bad("fingerprint"))?,
            state: OpState::parse(&state).ok_or_else(|| bad("state"))?,
            created_at: time(6, "created_at")?,
            updated_at: time(7, "updated_at")?,
            status,
            identity: identity.map(|s| serde_json::from_str(&s)).transpose().map_err(|_| bad("identity"))?,
            fixed_key: row.try_get(10).map_err(|_| bad("fixed_key"))?,
            handle: handle.map(|s| serde_json::from_str(&s)).transpose().map_err(|_| bad("handle"))?,
        })
    }

    fn params(&self, r: &Record) -> Params {
        Params {
            scope: self.scope.clone(),
            operation: r.operation.clone(),
            key: r.key.as_ref().map(|k| k.as_str().to_owned()),
            method: r.method.clone(),
            url: r.url.clone(),
            fingerprint: r.fingerprint.clone(),
            state: r.state.as_str(),
            created_at: to_millis(r.created_at),
            updated_at: to_millis(r.updated_at),
            status: r.status.map(i32::from),
            identity: r.identity.as_ref().map(serde_json::Value::to_string),
            fixed_key: r.fixed_key,
            handle: r.handle.as_ref().map(|h| serde_json::to_string(h).expect("a handle serializes")),
            lease: None,
        }
    }
}

/// A record's columns as statement parameters, in [`COLUMNS`]' order after the scope.
struct Params {
    scope: String,
    operation: String,
    key: Option<String>,
    method: String,
    url: String,
    fingerprint: String,
    state: &'static str,
    created_at: i64,
    updated_at: i64,
    status: Option<i32>,
    identity: Option<String>,
    fixed_key: bool,
    handle: Option<String>,
    /// The lease's owner and length in seconds, for the operations table.
    lease: Option<(String, f64)>,
}

impl Params {
    fn as_refs(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        let mut refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &self.scope,
            &self.operation,
            &self.key,
            &self.method,
            &self.url,
            &self.fingerprint,
            &self.state,
            &self.created_at,
            &self.updated_at,
            &self.status,
            &self.identity,
            &self.fixed_key,
            &self.handle,
        ];
        if let Some((owner, secs)) = &self.lease {
            refs.push(owner);
            refs.push(secs);
        }
        refs
    }

    /// The same as SQL literals, comma-separated, for a statement sent without parameters.
    fn literals(&self) -> String {
        [
            literal(&self.scope),
            literal(&self.operation),
            literal(&self.key),
            literal(&self.method),
            literal(&self.url),
            literal(&self.fingerprint),
            literal(self.state),
            literal(&self.created_at),
            literal(&self.updated_at),
            literal(&self.status),
            literal(&self.identity),
            literal(&self.fixed_key),
            literal(&self.handle),
        ]
        .join(", ")
    }

    /// The same, each with its type: statements sent without a prepare round trip.
    fn typed(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        let types = [
            Type::TEXT,   // scope
            Type::TEXT,   // operation
            Type::TEXT,   // key
            Type::TEXT,   // method
            Type::TEXT,   // url
            Type::TEXT,   // fingerprint
            Type::TEXT,   // state
            Type::INT8,   // created_at
            Type::INT8,   // updated_at
            Type::INT4,   // status
            Type::TEXT,   // identity
            Type::BOOL,   // fixed_key
            Type::TEXT,   // handle
            Type::TEXT,   // lease owner
            Type::FLOAT8, // lease seconds
        ];
        self.as_refs().into_iter().zip(types).collect()
    }
}

/// The row count of the last statement of a simple query: the bounds and the locks come
/// before it.
fn last_count(answers: &[SimpleQueryMessage]) -> u64 {
    answers
        .iter()
        .rev()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(rows) => Some(*rows),
            _ => None,
        })
        .unwrap_or(0)
}

/// A transaction [`Inner::commit_after`] opened and has not yet ended. Dropped so (its first
/// statement failed, or the call was dropped while it ran), it queues a `ROLLBACK` on the
/// connection: the server runs it before anything the connection's next user sends, so no
/// one's statements land in a transaction left open, or aborted, by another.
struct OpenTransaction<'c> {
    client: &'c tokio_postgres::Client,
}

impl Drop for OpenTransaction<'_> {
    fn drop(&mut self) {
        // tokio-postgres queues a request on the first poll of its future (its pipelining);
        // the answer is not awaited.
        let rollback = std::pin::pin!(self.client.batch_execute("ROLLBACK"));
        let _ = rollback.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    }
}

/// A value as an SQL literal of its column's type, for a statement sent without parameters
/// ([`Inner::in_one_trip`]). Text goes through `postgres-protocol`'s `escape_literal`, the port
/// of libpq's `PQescapeLiteral` by tokio-postgres' authors: quotes doubled, and `E'…'` with
/// backslashes doubled when the text holds one, so it reads the same whatever the server's
/// `standard_conforming_strings`. The connection's encoding is always UTF-8 (tokio-postgres
/// sets it), so no multi-byte character can hide a quote. Numbers are formatted by Rust, and
/// a `NULL` carries its type. `tests/postgres/values.rs` sends hostile text through every
/// column, under both settings, against `MemoryStore` as the oracle.
trait Literal {
    /// The type a `NULL` of this kind is cast to.
    const TYPE: &'static str;
    fn literal(&self) -> String;
}

impl Literal for str {
    const TYPE: &'static str = "text";
    fn literal(&self) -> String {
        postgres_protocol::escape::escape_literal(self)
    }
}

impl Literal for &str {
    const TYPE: &'static str = "text";
    fn literal(&self) -> String {
        str::literal(self)
    }
}

impl Literal for String {
    const TYPE: &'static str = "text";
    fn literal(&self) -> String {
        str::literal(self)
    }
}

impl Literal for i64 {
    const TYPE: &'static str = "bigint";
    fn literal(&self) -> String {
        format!("{self}::bigint")
    }
}

impl Literal for i32 {
    const TYPE: &'static str = "integer";
    fn literal(&self) -> String {
        format!("{self}::integer")
    }
}

impl Literal for bool {
    const TYPE: &'static str = "boolean";
    fn literal(&self) -> String {
        if *self { "TRUE" } else { "FALSE" }.to_owned()
    }
}

impl<T: Literal> Literal for Option<T> {
    const TYPE: &'static str = T::TYPE;
    fn literal(&self) -> String {
        match self {
            Some(value) => value.literal(),
            None => format!("NULL::{}", T::TYPE),
        }
    }
}

fn literal<T: Literal + ?Sized>(value: &T) -> String {
    value.literal()
}

fn pool_error(e: &deadpool_postgres::PoolError, timeout: Duration) -> String {
    use deadpool_postgres::{PoolError, TimeoutType};
    let ms = timeout.as_millis();
    match e {
        PoolError::Backend(e) => clean(e),
        // The pool's own words ("Timeout occurred while creating a new object") say what it
        // was doing, not what the user waited for.
        PoolError::Timeout(TimeoutType::Create) => {
            format!("no answer within {ms} ms while connecting (the socket, TLS and signing in)")
        }
        PoolError::Timeout(TimeoutType::Wait) => format!("every connection of the pool was busy for {ms} ms"),
        PoolError::Timeout(TimeoutType::Recycle) => format!("a pooled connection gave no answer within {ms} ms"),
        other => other.to_string(),
    }
}

#[async_trait::async_trait]
impl KeyStore for PostgresJournal {
    async fn begin(&self, intent: &Intent<'_>) -> Result<Begun, JournalError> {
        let inner = &*self.inner;
        inner.storable(&[
            ("operation name", intent.operation),
            ("method", intent.method),
            ("URL", intent.url),
            ("fingerprint", intent.fingerprint),
        ])?;
        call!(inner, again: true, |client| inner.begin(&mut client, intent).await)
    }

    async fn finish(&self, operation: &str, finish: &Finish) -> Result<bool, JournalError> {
        let inner = &*self.inner;
        inner.storable(&[("operation name", operation)])?;
        call!(inner, again: true, |client| inner.finish(&mut client, operation, finish).await)
    }

    async fn get(&self, operation: &str) -> Result<Option<Record>, JournalError> {
        let inner = &*self.inner;
        call!(inner, again: true, |client| inner.get(&mut client, operation).await)
    }

    async fn list(&self) -> Result<Vec<Record>, JournalError> {
        let inner = &*self.inner;
        call!(inner, again: true, |client| inner.list(&mut client).await)
    }

    async fn forget(&self, operation: &str) -> Result<bool, JournalError> {
        let inner = &*self.inner;
        call!(inner, again: false, |client| inner.forget(&mut client, operation).await)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_url_from_libpq_parts_keeps_every_character_of_them() {
        use std::str::FromStr;
        let url = super::url_from_parts(
            "/var/run/postgresql",
            Some("5433"),
            Some("ci user"),
            Some("p@ss:w/rd%"),
            Some("db/1"),
        );
        assert_eq!(url, "postgres://ci%20user:p%40ss%3Aw%2Frd%25@%2Fvar%2Frun%2Fpostgresql:5433/db%2F1");
        let config = tokio_postgres::Config::from_str(&url).expect("tokio-postgres reads it");
        assert_eq!(config.get_user(), Some("ci user"));
        assert_eq!(config.get_password(), Some(&b"p@ss:w/rd%"[..]));
        assert_eq!(config.get_dbname(), Some("db/1"));
        assert_eq!(config.get_ports(), [5433]);
        assert!(
            matches!(config.get_hosts(), [tokio_postgres::config::Host::Unix(p)] if p == std::path::Path::new("/var/run/postgresql")),
            "{:?}",
            config.get_hosts()
        );
        let plain = super::url_from_parts("127.0.0.1", None, None, None, None);
        assert_eq!(plain, "postgres://postgres@127.0.0.1:5432/postgres");
    }

    #[test]
    fn a_list_of_hosts_in_pghost_is_a_list_in_the_url() {
        use std::str::FromStr;
        use tokio_postgres::config::Host;
        let hosts = |url: &str| {
            let config = tokio_postgres::Config::from_str(url).expect("tokio-postgres reads it");
            let hosts = config.get_hosts().iter().map(|h| match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            });
            hosts.zip(config.get_ports().iter().copied()).collect::<Vec<_>>()
        };
        let both = super::url_from_parts("db1, db2", Some("5433"), None, None, None);
        assert_eq!(both, "postgres://postgres@db1:5433,db2:5433/postgres");
        assert_eq!(hosts(&both), [("db1".to_owned(), 5433), ("db2".to_owned(), 5433)]);
        let each = super::url_from_parts("db1,/run/pg", Some("5433,5434"), None, None, None);
        assert_eq!(hosts(&each), [("db1".to_owned(), 5433), ("/run/pg".to_owned(), 5434)]);
        let fewer = super::url_from_parts("db1,db2,db3", Some("5433,5434"), None, None, None);
        // libpq refuses 2 ports for 3 hosts; a URL cannot carry the mismatch, so the host
        // without a port of its own gets the default port.
        assert_eq!(hosts(&fewer)[2], ("db3".to_owned(), 5432));
    }

    #[test]
    fn a_url_from_libpq_variables_carries_their_tls_settings() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        assert_eq!(super::url_from_vars(vars(&[("PGPORT", "5433")])), None, "no PGHOST, no URL");
        assert_eq!(
            super::url_from_vars(vars(&[("PGHOST", "db"), ("PGSSLMODE", "")])).as_deref(),
            Some("postgres://postgres@db:5432/postgres")
        );
        let url = super::url_from_vars(vars(&[
            ("PGHOST", "db"),
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", "/etc/ssl/my ca.pem"),
        ]))
        .unwrap();
        assert_eq!(
            url,
            "postgres://postgres@db:5432/postgres?sslmode=verify-full&sslrootcert=%2Fetc%2Fssl%2Fmy%20ca.pem"
        );
        let tls = crate::journal::postgres_tls::configure(&url).err().expect("the file does not exist");
        assert!(tls.contains("/etc/ssl/my ca.pem"), "{tls}");
    }

    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(redact_conninfo("postgres://ci:s3cret@db:5432/deploys"), "postgres://ci:***@db:5432/deploys");
        assert_eq!(
            redact_conninfo("host=db user=ci password=s3cret dbname=x"),
            "host=db user=ci password=*** dbname=x"
        );
        let builder = PostgresJournal::builder("postgresql://ci:s3cret@db/x?sslmode=disable&password=p2");
        let shown = format!("{builder:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("p2"), "{shown}");
    }

    #[test]
    fn locks_are_per_scope_and_class() {
        assert_ne!(lock_id("operation", "a", "op"), lock_id("operation", "b", "op"));
        assert_ne!(lock_id("operation", "a", "op"), lock_id("key", "a", "op"));
        assert_eq!(lock_id("key", "a", "k"), lock_id("key", "a", "k"));
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
    }
}
