//! The SQLite journal (feature `journal`): one file, WAL mode, safe across processes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};

use super::store::{Begun, Finish, Intent, KeyPlan};
use super::{JournalError, KeyStore, OpState, Record, from_millis, to_millis};
use crate::key::IdempotencyKey;
use crate::time::lock;

/// The schema's version, in `PRAGMA user_version`. 0 is a journal from before versions (1 in
/// all but name); 2 added `fixed_key` and the retired records; 3 the handles of waiting runs.
const SCHEMA_VERSION: i64 = 3;

/// Version 1: the operations' current records.
const SCHEMA_1: &str = "
CREATE TABLE IF NOT EXISTS operations (
    operation   TEXT PRIMARY KEY NOT NULL,
    key         TEXT,
    method      TEXT NOT NULL,
    url         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    status      INTEGER,
    identity    TEXT
);
CREATE INDEX IF NOT EXISTS operations_by_key ON operations (key);
";

/// Version 2: whether a key was the caller's (records from before say yes: the careful
/// answer), and the settled runs with such keys that later runs replaced.
const SCHEMA_2: &str = "
ALTER TABLE operations ADD COLUMN fixed_key INTEGER NOT NULL DEFAULT 1;
CREATE TABLE IF NOT EXISTS retired (
    operation   TEXT NOT NULL,
    key         TEXT NOT NULL,
    method      TEXT NOT NULL,
    url         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    status      INTEGER,
    identity    TEXT,
    fixed_key   INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (operation, key)
);
CREATE INDEX IF NOT EXISTS retired_by_key ON retired (key);
";

/// Version 3: where a waiting run polls (a `wait::Handle`, as JSON).
const SCHEMA_3: &str = "
ALTER TABLE operations ADD COLUMN handle TEXT;
ALTER TABLE retired ADD COLUMN handle TEXT;
";

const COLUMNS: &str =
    "operation, key, method, url, fingerprint, state, created_at, updated_at, status, identity, fixed_key, handle";

/// A journal in a SQLite file.
///
/// - The key of an operation is committed (WAL, `synchronous = FULL`: one fsync) before the
///   first request is sent. Its outcome is committed without an fsync: losing it to a power cut
///   leaves the record pending, and the next run resumes the key and gets a replay.
/// - Two processes running the same operation at once serialise on the file's write lock and
///   use one key: the second finds the first's pending record and resumes it.
/// - A corrupt file, a lock held longer than the lock timeout, or a path that cannot be written
///   is an error ([`JournalError`]); there is never a silent fallback to keys in memory.
///
/// The default location is `$XDG_STATE_HOME/idempotent-retry/journal.sqlite3`, or
/// `~/.local/state/idempotent-retry/journal.sqlite3` without `XDG_STATE_HOME`.
///
/// # Examples
///
/// ```
/// use idempotent_retry::journal::{KeyStore, SqliteJournal};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let dir = std::env::temp_dir().join(format!("idem-doc-{}", std::process::id()));
/// let journal = SqliteJournal::open(dir.join("journal.sqlite3")).unwrap();
/// for record in journal.list().await.unwrap() {
///     println!("{} {} {}", record.operation, record.state, record.url);
/// }
/// # std::fs::remove_dir_all(dir).ok();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteJournal {
    inner: Arc<Sqlite>,
}

/// The file and its connection; the store's work, done on a blocking thread.
#[derive(Debug)]
struct Sqlite {
    path: PathBuf,
    lock_timeout: Duration,
    connection: Mutex<Connection>,
}

impl SqliteJournal {
    /// How long to wait for another process's lock before giving up (default 5 s).
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

    /// The default journal path (see the type's docs), or `None` when neither `XDG_STATE_HOME`
    /// nor `HOME` is set.
    pub fn default_path() -> Option<PathBuf> {
        state_path(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"))
    }

    /// Opens (creating if needed) the journal at the default path.
    ///
    /// # Errors
    ///
    /// [`JournalError`] if there is no home directory, or the journal cannot be opened.
    pub fn open_default() -> Result<Self, JournalError> {
        let path = Self::default_path().ok_or_else(|| JournalError::Other {
            path: "(default)".into(),
            reason: "neither XDG_STATE_HOME nor HOME is set; give the journal a path".into(),
        })?;
        Self::open(path)
    }

    /// Opens (creating if needed) the journal at `path`.
    ///
    /// # Errors
    ///
    /// [`JournalError::ReadOnly`] if the file or its directory cannot be written,
    /// [`JournalError::Corrupt`] if the file is not a journal, [`JournalError::Locked`] if
    /// another process holds it past the lock timeout.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, JournalError> {
        Self::open_with_lock_timeout(path, Self::DEFAULT_LOCK_TIMEOUT)
    }

    /// Opens the journal at `path` only if there is one: to inspect or clear it, where creating
    /// a file (and its directories) for a mistyped path would only hide the mistake.
    ///
    /// # Errors
    ///
    /// [`JournalError::Missing`] if there is no file at `path`; otherwise as [`open`](Self::open).
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self, JournalError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(JournalError::Missing { path: path.display().to_string() });
        }
        Self::open(path)
    }

    /// Like [`open`](Self::open), with another lock timeout.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open).
    pub fn open_with_lock_timeout(path: impl AsRef<Path>, lock_timeout: Duration) -> Result<Self, JournalError> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| JournalError::ReadOnly {
                path: shown.clone(),
                reason: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let fail = |e: rusqlite::Error| classify(&shown, lock_timeout, e);
        let mut connection = Connection::open(&path).map_err(|e| match classify(&shown, lock_timeout, e) {
            JournalError::Other { reason, .. } => JournalError::ReadOnly { path: shown.clone(), reason },
            other => other,
        })?;
        connection.busy_timeout(lock_timeout).map_err(fail)?;
        // Switching a new file to WAL takes its exclusive lock, and SQLite answers a second
        // connection doing the same with SQLITE_BUSY at once, without its busy handler (waiting
        // could deadlock). Once one of them has switched, the other finds WAL already on.
        let mode: String =
            while_busy(lock_timeout, || connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)))
                .map_err(fail)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(JournalError::Other { path: shown, reason: format!("cannot switch to WAL mode (got {mode})") });
        }
        connection.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
        // The schema under the write lock from the start: a read that upgrades to a write after
        // another connection wrote fails at once (SQLITE_BUSY_SNAPSHOT), where IMMEDIATE waits.
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(fail)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(fail)?;
        if version > SCHEMA_VERSION {
            return Err(JournalError::Other {
                path: shown,
                reason: format!("its schema (version {version}) is newer than this program knows ({SCHEMA_VERSION})"),
            });
        }
        if version < SCHEMA_VERSION {
            tx.execute_batch(SCHEMA_1).map_err(fail)?;
            // Each step once, by the column it adds (a journal from before versions has none).
            for (column, step) in [("fixed_key", SCHEMA_2), ("handle", SCHEMA_3)] {
                let has: bool = tx
                    .query_row(
                        "SELECT COUNT(*) FROM pragma_table_info('operations') WHERE name = ?1",
                        [column],
                        |row| row.get::<_, i64>(0),
                    )
                    .map(|n| n > 0)
                    .map_err(fail)?;
                if !has {
                    tx.execute_batch(step).map_err(fail)?;
                }
            }
            tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(fail)?;
        }
        tx.commit().map_err(fail)?;
        Ok(Self { inner: Arc::new(Sqlite { path, lock_timeout, connection: Mutex::new(connection) }) })
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Removes settled records (succeeded or not applied) last changed before `before`, and
    /// the retired records of the same age, so the file does not grow forever. Choose `before`
    /// past the server's retention. A fixed key's success is kept whatever its age: it is what
    /// keeps that key from being sent again after the server forgot it. How many records went.
    ///
    /// # Errors
    ///
    /// When the journal cannot be written.
    pub async fn gc(&self, before: std::time::SystemTime) -> Result<u64, JournalError> {
        let cutoff = to_millis(before);
        self.blocking(move |sqlite| {
            let mut connection = lock(&sqlite.connection);
            let tx =
                connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| sqlite.fail(e))?;
            let settled = "state IN ('succeeded', 'not_applied', 'failed') AND updated_at < ?1 \
                           AND NOT (fixed_key = 1 AND state = 'succeeded')";
            let mut removed = 0;
            for table in ["operations", "retired"] {
                removed += tx
                    .execute(&format!("DELETE FROM {table} WHERE {settled}"), [cutoff])
                    .map_err(|e| sqlite.fail(e))?;
            }
            tx.commit().map_err(|e| sqlite.fail(e))?;
            Ok(removed as u64)
        })
        .await
    }

    /// Runs `work` on tokio's blocking pool: SQLite waits on the disk (and on other processes'
    /// locks), which must not hold up the runtime's threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Sqlite) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner)).await.map_err(|e| JournalError::Other {
            path: self.inner.path.display().to_string(),
            reason: format!("the journal call failed: {e}"),
        })?
    }
}

impl Sqlite {
    fn fail(&self, e: rusqlite::Error) -> JournalError {
        classify(&self.path.display().to_string(), self.lock_timeout, e)
    }
}

/// Runs `op` again while SQLite answers SQLITE_BUSY without having waited, for up to `timeout`
/// in all: the waiting SQLite's busy handler would have done.
fn while_busy<T>(timeout: Duration, mut op: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let mut waited = Duration::ZERO;
    let mut pause = Duration::from_millis(1);
    loop {
        match op() {
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) && waited < timeout => {
                crate::time::pause_thread(pause);
                waited += pause;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

/// The XDG rule: `$XDG_STATE_HOME`, else `$HOME/.local/state`; empty values count as unset.
fn state_path(xdg_state_home: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let state = match xdg_state_home.filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(home.filter(|v| !v.is_empty())?).join(".local/state"),
    };
    Some(state.join("idempotent-retry").join("journal.sqlite3"))
}

fn classify(path: &str, waited: Duration, e: rusqlite::Error) -> JournalError {
    let path = path.to_owned();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => JournalError::Corrupt { path },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => JournalError::Locked { path, waited },
        Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => {
            JournalError::ReadOnly { path, reason: e.to_string() }
        }
        _ => JournalError::Other { path, reason: e.to_string() },
    }
}

fn record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let key: Option<String> = row.get(1)?;
    let state: String = row.get(5)?;
    let identity: Option<String> = row.get(9)?;
    let handle: Option<String> = row.get(11)?;
    let bad = |column: usize, what: &str| {
        let why = format!(
            "the journal's `{what}` of operation {:?} cannot be read",
            row.get::<_, String>(0).unwrap_or_default()
        );
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, why.into())
    };
    // A time before 1970 or a status outside 100..=599 was never written by this crate: the
    // row is damaged, and saying so beats reading it as something it is not.
    let time = |column: usize, name: &str| {
        row.get::<_, i64>(column).and_then(|ms| if ms >= 0 { Ok(from_millis(ms)) } else { Err(bad(column, name)) })
    };
    let status = match row.get::<_, Option<i64>>(8)? {
        Some(s) => Some(u16::try_from(s).ok().filter(|s| (100..=599).contains(s)).ok_or_else(|| bad(8, "status"))?),
        None => None,
    };
    Ok(Record {
        operation: row.get(0)?,
        key: key.map(IdempotencyKey::new).transpose().map_err(|_| bad(1, "key"))?,
        method: row.get(2)?,
        url: row.get(3)?,
        fingerprint: row.get(4)?,
        state: OpState::parse(&state).ok_or_else(|| bad(5, "state"))?,
        created_at: time(6, "created_at")?,
        updated_at: time(7, "updated_at")?,
        status,
        identity: identity.map(|s| serde_json::from_str(&s)).transpose().map_err(|_| bad(9, "identity"))?,
        fixed_key: row.get::<_, i64>(10)? != 0,
        handle: handle.map(|s| serde_json::from_str(&s)).transpose().map_err(|_| bad(11, "handle"))?,
    })
}

fn handle_json(handle: &crate::wait::Handle) -> String {
    serde_json::to_string(handle).expect("a handle serializes")
}

#[async_trait::async_trait]
impl KeyStore for SqliteJournal {
    async fn begin(&self, intent: &Intent<'_>) -> Result<Begun, JournalError> {
        let intent = intent.to_owned_parts();
        self.blocking(move |sqlite| sqlite.begin(&intent.intent())).await
    }

    async fn finish(&self, operation: &str, finish: &Finish) -> Result<bool, JournalError> {
        let (operation, finish) = (operation.to_owned(), finish.clone());
        self.blocking(move |sqlite| sqlite.finish(&operation, &finish)).await
    }

    async fn get(&self, operation: &str) -> Result<Option<Record>, JournalError> {
        let operation = operation.to_owned();
        self.blocking(move |sqlite| sqlite.get(&operation)).await
    }

    async fn list(&self) -> Result<Vec<Record>, JournalError> {
        self.blocking(Sqlite::list).await
    }

    async fn forget(&self, operation: &str) -> Result<bool, JournalError> {
        let operation = operation.to_owned();
        self.blocking(move |sqlite| sqlite.forget(&operation)).await
    }
}

impl Sqlite {
    fn begin(&self, intent: &Intent<'_>) -> Result<Begun, JournalError> {
        let mut connection = lock(&self.connection);
        // IMMEDIATE takes the write lock now: a second process running the same operation waits
        // here, then sees this one's pending record.
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.fail(e))?;
        let planned = {
            let one = |sql: &str, args: &[&dyn rusqlite::ToSql]| {
                tx.prepare_cached(sql).and_then(|mut select| select.query_row(args, record).optional())
            };
            let existing = one(&format!("SELECT {COLUMNS} FROM operations WHERE operation = ?1"), &[&intent.operation])
                .map_err(|e| self.fail(e))?;
            let (earlier, conflict) = match &intent.key {
                KeyPlan::Fixed(key) => {
                    let earlier = one(
                        &format!("SELECT {COLUMNS} FROM retired WHERE operation = ?1 AND key = ?2"),
                        &[&intent.operation, &key.as_str()],
                    )
                    .map_err(|e| self.fail(e))?;
                    let conflict = one(
                        &format!(
                            "SELECT {COLUMNS} FROM operations WHERE key = ?1 AND operation <> ?2 AND fingerprint <> ?3 \
                             UNION ALL SELECT {COLUMNS} FROM retired WHERE key = ?1 AND operation <> ?2 AND fingerprint <> ?3 \
                             LIMIT 1"
                        ),
                        &[&key.as_str(), &intent.operation, &intent.fingerprint],
                    )
                    .map_err(|e| self.fail(e))?;
                    (earlier, conflict)
                }
                _ => (None, None),
            };
            intent
                .plan(existing.as_ref(), earlier.as_ref(), conflict.as_ref())
                .map_err(JournalError::PayloadMismatch)?
        };
        let Some(write) = planned.write else { return Ok(planned.begun) };
        let insert = |table: &str, r: &Record| {
            tx.prepare_cached(&format!(
                "INSERT OR REPLACE INTO {table} ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ))
            .and_then(|mut insert| {
                insert.execute(params![
                    r.operation,
                    r.key.as_ref().map(IdempotencyKey::as_str),
                    r.method,
                    r.url,
                    r.fingerprint,
                    r.state.as_str(),
                    to_millis(r.created_at),
                    to_millis(r.updated_at),
                    r.status.map(i64::from),
                    r.identity.as_ref().map(serde_json::Value::to_string),
                    i64::from(r.fixed_key),
                    r.handle.as_ref().map(handle_json),
                ])
            })
        };
        if let Some(retired) = &planned.retire {
            insert("retired", retired).map_err(|e| self.fail(e))?;
        }
        insert("operations", &write).map_err(|e| self.fail(e))?;
        tx.commit().map_err(|e| self.fail(e))?;
        Ok(planned.begun)
    }

    fn finish(&self, operation: &str, finish: &Finish) -> Result<bool, JournalError> {
        let connection = lock(&self.connection);
        let identity = finish.identity.as_ref().map(serde_json::Value::to_string);
        let handle = finish.handle.as_ref().map(handle_json);
        // The outcome need not survive a power cut: if it is lost, the record stays pending, the
        // next run resumes its key, and the server replays. So this commit skips the fsync
        // (WAL with synchronous = NORMAL is still safe against a crash of the process); the key,
        // written by `begin` before the send, keeps its fsync.
        connection.pragma_update(None, "synchronous", "NORMAL").map_err(|e| self.fail(e))?;
        // Compare-and-set: only the run that holds the record (its key, its first time) ends it.
        let updated = connection
            .prepare_cached(
                "UPDATE operations SET state = ?2, status = ?3, identity = ?4, updated_at = ?5, handle = ?8 \
                 WHERE operation = ?1 AND key IS ?6 AND created_at = ?7",
            )
            .and_then(|mut update| {
                update.execute(params![
                    operation,
                    finish.state.as_str(),
                    finish.status.map(i64::from),
                    identity,
                    to_millis(finish.now),
                    finish.claim.key.as_ref().map(IdempotencyKey::as_str),
                    to_millis(finish.claim.created_at),
                    handle,
                ])
            })
            .map(|rows| rows > 0)
            .map_err(|e| self.fail(e));
        connection.pragma_update(None, "synchronous", "FULL").map_err(|e| self.fail(e))?;
        updated
    }

    fn get(&self, operation: &str) -> Result<Option<Record>, JournalError> {
        let connection = lock(&self.connection);
        connection
            .prepare_cached(&format!("SELECT {COLUMNS} FROM operations WHERE operation = ?1"))
            .and_then(|mut select| select.query_row([operation], record).optional())
            .map_err(|e| self.fail(e))
    }

    fn list(&self) -> Result<Vec<Record>, JournalError> {
        let connection = lock(&self.connection);
        let mut select = connection
            .prepare_cached(&format!("SELECT {COLUMNS} FROM operations ORDER BY created_at, operation"))
            .map_err(|e| self.fail(e))?;
        let rows = select.query_map([], record).map_err(|e| self.fail(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.fail(e))
    }

    fn forget(&self, operation: &str) -> Result<bool, JournalError> {
        let mut connection = lock(&self.connection);
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.fail(e))?;
        tx.execute("DELETE FROM retired WHERE operation = ?1", [operation]).map_err(|e| self.fail(e))?;
        let forgot =
            tx.execute("DELETE FROM operations WHERE operation = ?1", [operation]).map_err(|e| self.fail(e))?;
        tx.commit().map_err(|e| self.fail(e))?;
        Ok(forgot > 0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::journal::fingerprint;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("idem-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("journal.sqlite3")
    }

    #[tokio::test]
    async fn survives_reopening() {
        let path = temp("reopen");
        let fp = fingerprint("POST", "u", b"{}");
        let intent = Intent::new("op", "POST", "u", &fp, KeyPlan::Random, UNIX_EPOCH);
        let Begun::Send { claim: first, .. } = SqliteJournal::open(&path).unwrap().begin(&intent).await.unwrap() else {
            panic!("a first run sends")
        };
        let journal = SqliteJournal::open(&path).unwrap();
        let again = journal.begin(&intent).await.unwrap();
        assert_eq!(again, Begun::Send { claim: first.clone(), resumed: true });
        let done = Finish::new(first, OpState::Succeeded, UNIX_EPOCH)
            .status(Some(201))
            .identity(Some(serde_json::json!({"id": "x"})));
        assert!(journal.finish("op", &done).await.unwrap());
        let record = journal.get("op").await.unwrap().unwrap();
        assert_eq!((record.state, record.status), (OpState::Succeeded, Some(201)));
        assert_eq!(record.identity, Some(serde_json::json!({"id": "x"})));
        assert!(journal.forget("op").await.unwrap());
        assert!(journal.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_journal_from_before_schema_versions_is_upgraded() {
        let path = temp("upgrade");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA_1).unwrap();
        old.execute(
            "INSERT INTO operations VALUES ('deploy', 'k-1', 'POST', 'u', 'fp', 'succeeded', 0, 0, 201, '{\"id\":\"d1\"}')",
            [],
        )
        .unwrap();
        drop(old);

        let journal = SqliteJournal::open(&path).unwrap();

        let record = journal.get("deploy").await.unwrap().unwrap();
        assert_eq!((record.state, record.fixed_key), (OpState::Succeeded, true), "kept, and taken for a fixed key");
        let version: i64 = lock(&journal.inner.connection).query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(journal);
        assert!(SqliteJournal::open(&path).is_ok(), "opening it again changes nothing");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = SqliteJournal::open(&path).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[tokio::test]
    async fn a_version_2_journal_gains_handles() {
        let path = temp("upgrade-2");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA_1).unwrap();
        old.execute_batch(SCHEMA_2).unwrap();
        old.pragma_update(None, "user_version", 2).unwrap();
        old.execute(
            "INSERT INTO operations VALUES ('deploy', 'k-1', 'POST', 'u', 'fp', 'pending', 0, 0, NULL, NULL, 0)",
            [],
        )
        .unwrap();
        drop(old);

        let journal = SqliteJournal::open(&path).unwrap();

        let record = journal.get("deploy").await.unwrap().unwrap();
        assert_eq!((record.state, record.fixed_key, record.handle.clone()), (OpState::Pending, false, None));
        let waiting = Finish::new(record.claim(), OpState::Waiting, UNIX_EPOCH)
            .handle(Some(&crate::wait::Handle::Location { url: "https://api.test/ops/1".into() }));
        assert!(journal.finish("deploy", &waiting).await.unwrap());
        let record = journal.get("deploy").await.unwrap().unwrap();
        assert_eq!(record.handle, Some(crate::wait::Handle::Location { url: "https://api.test/ops/1".into() }));
        let version: i64 = lock(&journal.inner.connection).query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 3);
    }

    /// Found by the `journal_records` fuzz target: a negative time read as 1970, and a status
    /// of 70000 read as 4464. A damaged row is a clear error naming the column; a key it cannot
    /// read is never a record without one.
    #[tokio::test]
    async fn a_damaged_row_is_an_error_never_another_record() {
        let path = temp("damaged");
        let journal = SqliteJournal::open(&path).unwrap();
        let raw = Connection::open(&path).unwrap();
        for (column, value) in [
            ("created_at", rusqlite::types::Value::Integer(-5)),
            ("status", rusqlite::types::Value::Integer(70_000)),
            ("key", rusqlite::types::Value::Blob(vec![0, 1])),
            ("key", rusqlite::types::Value::Text("has space".into())),
        ] {
            raw.execute("DELETE FROM operations", []).unwrap();
            raw.execute(
                "INSERT INTO operations (operation, key, method, url, fingerprint, state, created_at, updated_at) \
                 VALUES ('op', 'k-1', 'POST', 'u', 'fp', 'pending', 0, 0)",
                [],
            )
            .unwrap();
            raw.execute(&format!("UPDATE operations SET {column} = ?1"), [&value]).unwrap();

            let err = journal.get("op").await.unwrap_err();

            assert!(err.to_string().contains(column) || column == "key", "{column}: {err}");
            assert!(journal.list().await.is_err(), "{column}");
            let fp = "fp";
            let intent = Intent::new("op", "POST", "u", fp, KeyPlan::Random, UNIX_EPOCH);
            assert!(journal.begin(&intent).await.is_err(), "{column}: no new key over a record it cannot read");
        }
    }

    #[test]
    fn default_path_follows_xdg() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(state_path(os("/xdg"), os("/home/u")), Some(PathBuf::from("/xdg/idempotent-retry/journal.sqlite3")));
        assert_eq!(
            state_path(None, os("/home/u")),
            Some(PathBuf::from("/home/u/.local/state/idempotent-retry/journal.sqlite3"))
        );
        assert_eq!(
            state_path(os(""), os("/home/u")),
            Some(PathBuf::from("/home/u/.local/state/idempotent-retry/journal.sqlite3"))
        );
        assert_eq!(state_path(None, None), None);
    }
}
