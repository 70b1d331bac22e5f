//! Clocks that disagree (issue 17, defect 3). A record whose `created_at` is ahead of the
//! reader's clock has an unknown age: it counts as past the server's retention (read back,
//! never resent), whichever machine's clock was wrong. Every journal is on disk, shared by two
//! "machines" with clocks of their own; the server keeps keys 24 h by its own clock.

use std::time::Duration;

use idempotent_retry::testing::{Schedule, ServerProfile};
use idempotent_retry::{
    Operations,
    journal::SqliteJournal,
    operation::{OperationError, ReadBack, Resolution},
    time::ManualClock,
};
use serde_json::json;

use crate::support::*;

const HOUR: Duration = Duration::from_secs(3600);

/// A machine: operations on the shared journal at `path`, with a clock `offset` from the
/// server's (ahead when `ahead`).
fn machine(rig: &Rig, path: &std::path::Path, offset: Duration, ahead: bool) -> (Operations, ManualClock) {
    let server_now = idempotent_retry::time::Clock::now(&rig.time.clock);
    let clock = ManualClock::new(if ahead { server_now + offset } else { server_now - offset });
    let ops = Operations::new(rig.client.clone(), SqliteJournal::open(path).unwrap())
        .clock(clock.clone())
        .sleeper(rig.time.sleeper.clone())
        .scope("tenant-42");
    (ops, clock)
}

fn journal_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("idem-skew-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("journal.sqlite3")
}

/// Both directions of the defect: the writer's clock was ahead (its record is in the reader's
/// future), or the reader's clock is behind. Either way the server has forgotten the key when
/// the second run comes, and a resend would create a second CVM.
#[tokio::test]
async fn a_success_recorded_in_the_future_is_never_resent() {
    for (case, writer_ahead, reader_behind) in [("writer ahead", 48, 0), ("reader behind", 0, 48)] {
        let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
        let path = journal_path(case.split(' ').next().unwrap());
        let (writer, _) = machine(&rig, &path, HOUR * writer_ahead, true);
        fn create<'a>(ops: &'a Operations, rig: &Rig) -> idempotent_retry::operation::OperationBuilder<'a> {
            ops.operation("create-cvm/web-1").post(rig.cvms()).json(&json!({"name": "web-1"})).derived_key(1)
        }
        let first = create(&writer, &rig).send().await.unwrap();
        assert_eq!(first.resolution, Resolution::Created, "{case}");

        // 30 h later by the server's clock: it no longer knows the key.
        rig.time.clock.advance(HOUR * 30);
        let (reader, _) = machine(&rig, &path, HOUR * reader_behind, false);
        let sent = rig.attempts();
        let again = create(&reader, &rig).send().await.unwrap();

        assert_eq!(again.resolution, Resolution::Recorded, "{case}: {again:?}");
        assert_eq!(again.identity["id"], first.identity["id"], "{case}");
        assert_eq!(rig.attempts(), sent, "{case}: nothing resent");
        let found =
            create(&reader, &rig).read_back(ReadBack::find_in_list(rig.cvms(), "name", "web-1")).send().await.unwrap();
        assert_eq!(found.resolution, Resolution::Recovered, "{case}");
        assert_eq!(rig.cloud.created(), 1, "{case}: one CVM");
    }
}

/// A pending key recorded in the reader's future is not resumed blind either: without a
/// read-back the outcome is unknown, with one the read-back settles it.
#[tokio::test]
async fn a_pending_key_from_the_future_is_read_back_not_resent() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::script([idempotent_retry::testing::Fault::Lose])).await;
    let path = journal_path("pending");
    let (writer, _) = machine(&rig, &path, HOUR * 48, true);
    fn create<'a>(ops: &'a Operations, rig: &Rig) -> idempotent_retry::operation::OperationBuilder<'a> {
        let op = ops.operation("create-cvm/web-1").post(rig.cvms()).json(&json!({"name": "web-1"}));
        op.policy(fast_policy().with_max_attempts(1))
    }
    let lost = create(&writer, &rig).send().await.unwrap_err();
    assert!(lost.may_have_been_applied(), "{lost}");

    rig.time.clock.advance(HOUR * 30);
    let (reader, _) = machine(&rig, &path, Duration::ZERO, false);
    let sent = rig.attempts();
    let unknown = create(&reader, &rig).send().await.unwrap_err();
    assert!(matches!(unknown, OperationError::Unknown { .. }), "{unknown}");
    assert!(unknown.to_string().contains("future"), "says why: {unknown}");
    assert_eq!(rig.attempts(), sent, "nothing resent");
    let found =
        create(&reader, &rig).read_back(ReadBack::find_in_list(rig.cvms(), "name", "web-1")).send().await.unwrap();
    assert_eq!(found.resolution, Resolution::Recovered);
    assert_eq!(rig.cloud.created(), 1);
}

/// The other direction is safe already and stays so: a reader whose clock is ahead sees the
/// record older than it is, past the retention sooner, and reads back instead of resending.
#[tokio::test]
async fn a_reader_ahead_of_the_writer_reads_back_sooner() {
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    let path = journal_path("reader-ahead");
    let (writer, _) = machine(&rig, &path, Duration::ZERO, false);
    fn create<'a>(ops: &'a Operations, rig: &Rig) -> idempotent_retry::operation::OperationBuilder<'a> {
        ops.operation("create-cvm/web-1").post(rig.cvms()).json(&json!({"name": "web-1"})).derived_key(1)
    }
    create(&writer, &rig).send().await.unwrap();
    rig.time.clock.advance(HOUR);
    let (reader, _) = machine(&rig, &path, HOUR * 30, true);
    let sent = rig.attempts();

    let again = create(&reader, &rig).send().await.unwrap();

    assert_eq!(again.resolution, Resolution::Recorded);
    assert_eq!(rig.attempts(), sent, "nothing resent");
    assert_eq!(rig.cloud.created(), 1);
}
