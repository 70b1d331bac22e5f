//! Journal records as they are on disk: any values in a SQLite row.

use std::time::Duration;

use idempotent_retry::journal::store::{Begun, Intent, KeyPlan};
use idempotent_retry::journal::{KeyStore, OpState, SqliteJournal};
use rusqlite::types::Value as Sql;

use super::{ITERATIONS, runtime, t0};

/// A column's value from a line of the input: `NULL`, `i:<integer>`, `f:<real>`, `b:<bytes>`
/// (a blob), or text.
fn column(line: Option<&[u8]>, default: Sql) -> Sql {
    let Some(line) = line else { return default };
    let text = String::from_utf8_lossy(line);
    if text == "NULL" {
        return Sql::Null;
    }
    if let Some(n) = text.strip_prefix("i:").and_then(|n| n.parse().ok()) {
        return Sql::Integer(n);
    }
    if let Some(x) = text.strip_prefix("f:").and_then(|x| x.parse().ok()) {
        return Sql::Real(x);
    }
    if line.starts_with(b"b:") {
        return Sql::Blob(line[2..].to_vec());
    }
    Sql::Text(text.into_owned())
}

/// A row of any values, one a line (key, state, created_at, updated_at, status, identity,
/// fixed_key, handle; a missing line keeps a valid value): reading it is a record or a clear
/// error, never a panic; a record never drops the key the row holds; `begin` never mints a new
/// key over a pending record it could not read.
#[test]
fn journal_records() {
    let dir = std::env::temp_dir().join(format!("idem-fuzz-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("journal.sqlite3");
    let journal = SqliteJournal::open_with_lock_timeout(&path, Duration::from_secs(5)).unwrap();
    // Touched only from the target's thread; a panic ends the test.
    let raw = std::panic::AssertUnwindSafe(rusqlite::Connection::open(&path).unwrap());
    let fingerprint = idempotent_retry::journal::fingerprint("POST", "u", b"{}");
    let rt = runtime();
    bolero::check!().with_iterations(ITERATIONS).for_each(|input: &[u8]| {
        let mut lines = input.split(|b| *b == b'\n');
        let mut next = |default: Sql| column(lines.next(), default);
        let row = [
            next(Sql::Text("k-1".into())),
            next(Sql::Text("pending".into())),
            next(Sql::Integer(0)),
            next(Sql::Integer(0)),
            next(Sql::Null),
            next(Sql::Null),
            next(Sql::Integer(0)),
            next(Sql::Null),
        ];
        raw.execute("DELETE FROM operations", []).unwrap();
        raw.execute("DELETE FROM retired", []).unwrap();
        let inserted = raw.execute(
            "INSERT INTO operations (operation, key, method, url, fingerprint, state, created_at, updated_at, status, identity, fixed_key, handle) \
             VALUES ('op', ?1, 'POST', 'u', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            rusqlite::params![row[0], fingerprint, row[1], row[2], row[3], row[4], row[5], row[6], row[7]],
        );
        if inserted.is_err() {
            return; // the schema refuses it (a NULL where NOT NULL): no such row is ever on disk
        }
        // What SQLite holds, after its column affinities.
        let (stored_key, stored_status, stored_created): (Sql, Sql, Sql) =
            raw.query_row("SELECT key, status, created_at FROM operations", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();

        let got = rt.block_on(journal.get("op"));
        let listed = rt.block_on(journal.list());
        assert_eq!(got.is_ok(), listed.is_ok(), "get and list agree: {got:?} {listed:?}");
        if let Err(e) = &got {
            assert!(!e.to_string().is_empty());
        }
        if let Ok(Some(record)) = &got {
            match &stored_key {
                Sql::Null => assert_eq!(record.key, None),
                Sql::Text(text) => assert_eq!(record.key.as_ref().map(|k| k.as_str()), Some(text.as_str()), "the key as stored"),
                other => panic!("a record from a key stored as {other:?}: {record:?}"),
            }
            match stored_status {
                Sql::Null => assert_eq!(record.status, None),
                Sql::Integer(n) => assert_eq!(record.status.map(i64::from), Some(n), "the status as stored, or an error"),
                other => panic!("a record from a status stored as {other:?}: {record:?}"),
            }
            match stored_created {
                Sql::Integer(ms) => assert_eq!(
                    record.created_at,
                    std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).expect("a time before 1970 is an error")),
                    "the key's first record time, as stored"
                ),
                other => panic!("a record from a time stored as {other:?}: {record:?}"),
            }
            assert_eq!(listed.as_ref().unwrap().first(), Some(record));
        }
        let intent = Intent::new("op", "POST", "u", &fingerprint, KeyPlan::Random, t0());
        let begun = rt.block_on(journal.begin(&intent));
        match (&got, &begun) {
            (Err(_), Ok(begun)) => panic!("began {begun:?} over a record it cannot read"),
            (Ok(Some(record)), Ok(Begun::Send { claim, resumed })) if record.state.is_unsettled() && record.key.is_some() => {
                assert!(*resumed && claim.key == record.key, "the pending key is resumed: {record:?} {claim:?}");
            }
            (Ok(Some(record)), Ok(Begun::Send { .. })) => {
                assert!(!record.state.is_unsettled() || record.key.is_none(), "{record:?}");
                assert_ne!(record.state, OpState::Waiting);
            }
            _ => {}
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
