//! The fleet, black-box: `idem` processes, each a "machine" with a HOME and a temporary
//! directory of its own, running one command at once against the fake cloud behind the chaos
//! proxy, sharing one PostgreSQL journal; some `kill -9`ed at random moments. The same fleet
//! with a SQLite journal per machine shows what the shared journal prevents.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use idempotent_retry::testing::{ChaosProxy, FakeCloud, FaultMix, RetryAfter, Schedule, ServerProfile, replicas};
use serde_json::Value;

use crate::support;

/// A machine: a directory that is its HOME, its state and its temporary directory.
struct Machine {
    dir: PathBuf,
}

impl Machine {
    fn new(test: &str, n: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("idem-fleet-{}-{test}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        Self { dir }
    }

    fn idem(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_idem"));
        command
            .args(args)
            .env("HOME", &self.dir)
            .env("XDG_STATE_HOME", self.dir.join("state"))
            .env("TMPDIR", self.dir.join("tmp"))
            .env_remove("IDEM_JOURNAL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Its own SQLite journal.
    fn sqlite(&self) -> String {
        self.dir.join("journal.sqlite3").display().to_string()
    }
}

/// Seeded moments and choices, the same every run.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const MACHINES: usize = 8;

/// The fake cloud behind the chaos proxy: 30% of requests meet a fault (a lost answer after
/// the commit, a reset, a 503 or 429 with `Retry-After: 0`), creates take 150 ms.
async fn faulty_cloud(seed: u64) -> (FakeCloud, ChaosProxy) {
    let cloud = FakeCloud::start(ServerProfile::stripe().with_processing(Duration::from_millis(150))).await;
    let mix = FaultMix::chaos().with_retry_after(Some(RetryAfter::Seconds(0))).scaled_to(0.3);
    let proxy = ChaosProxy::start(cloud.address(), Schedule::random(seed, mix)).await;
    (cloud, proxy)
}

/// `idem post` of one command on every machine at once, each with `journal(machine)`; their
/// exit codes. Killing at moments is on the real clock: the processes are real.
#[allow(clippy::disallowed_methods)]
async fn post_everywhere(
    test: &str,
    url: &str,
    name: &str,
    scope: &str,
    journal: impl Fn(&Machine) -> String,
    kill: Option<&mut Dice>,
) -> Vec<Option<i32>> {
    let body = format!(r#"{{"name":"{name}"}}"#);
    let machines: Vec<Machine> = (0..MACHINES).map(|n| Machine::new(test, n)).collect();
    let mut children = Vec::new();
    for machine in &machines {
        let journal = journal(machine);
        let args =
            ["post", url, "--json", &body, "--journal", &journal, "--scope", scope, "--lease", "3", "--output", "json"];
        children.push(machine.idem(&args).spawn().unwrap());
    }
    if let Some(dice) = kill {
        // kill -9 of about half the machines, each at a moment in its first 1.5 s.
        let mut doomed = Vec::new();
        for n in 0..MACHINES {
            if dice.next() % 2 == 0 {
                doomed.push((n, dice.next() % 1500));
            }
        }
        doomed.sort_by_key(|(_, at)| *at);
        let started = tokio::time::Instant::now();
        for (n, at) in doomed {
            tokio::time::sleep_until(started + Duration::from_millis(at)).await;
            let _ = children[n].start_kill();
        }
    }
    let mut codes = Vec::new();
    for child in children {
        codes.push(child.wait_with_output().await.unwrap().status.code());
    }
    codes
}

/// Eight machines, one command, one shared journal, under 30% faults: one CVM. With a journal
/// of its own on each machine, the same fleet makes one each.
#[allow(clippy::disallowed_methods)] // real processes on the real clock
#[tokio::test]
async fn a_fleet_running_one_command_at_once_makes_one_resource() {
    let Some((url, _server)) = support::server().await else { return };
    let name = format!("web-{}", std::process::id());
    let (cloud, proxy) = faulty_cloud(11).await;
    let api = format!("{}/cvms", proxy.uri());
    let scope = support::schema("fleet-once"); // a scope of this run's own
    let codes = post_everywhere("shared", &api, &name, &scope, |_| url.clone(), None).await;

    assert_eq!(cloud.created_named(&name), 1, "one resource for one command: {codes:?}");
    assert!(codes.iter().all(|c| *c == Some(0)), "every machine answers with it: {codes:?}");

    let (cloud, proxy) = faulty_cloud(12).await;
    let api = format!("{}/cvms", proxy.uri());
    let codes = post_everywhere("own", &api, "web-own", "fleet-once", |m| m.sqlite(), None).await;
    let made = cloud.created_named("web-own");
    assert!(made >= 2, "journals of their own: each machine mints its key and creates ({made}): {codes:?}");
    println!("shared PostgreSQL journal: 1 resource; a SQLite journal per machine: {made} resources for one command");
}

/// Rounds of the fleet with `kill -9` of about half the machines at random moments, then one
/// more plain run: still one resource per command, and the journal settled.
#[allow(clippy::disallowed_methods)] // real processes on the real clock
#[tokio::test]
async fn a_fleet_killed_at_random_still_makes_one_resource() {
    let Some((url, _server)) = support::server().await else { return };
    let (cloud, proxy) = faulty_cloud(21).await;
    let api = format!("{}/cvms", proxy.uri());
    let mut dice = Dice(0x5eed_2026);
    let tag = std::process::id();
    let scope = support::schema("fleet-kill"); // a scope of this run's own: its records only
    for round in 0..5 {
        let name = format!("web-{tag}-{round}");
        let pg = |_: &Machine| url.clone();
        let codes = post_everywhere(&format!("kill-{round}"), &api, &name, &scope, pg, Some(&mut dice)).await;
        let after = Machine::new(&format!("after-{round}"), 0);
        let body = format!(r#"{{"name":"{name}"}}"#);
        let args =
            ["post", &api, "--json", &body, "--journal", &url, "--scope", &scope, "--lease", "3", "--output", "json"];
        let plain = after.idem(&args).output().await.unwrap();

        assert_eq!(plain.status.code(), Some(0), "round {round}: {codes:?} {}", String::from_utf8_lossy(&plain.stderr));
        assert_eq!(cloud.created_named(&name), 1, "round {round}: one resource: {codes:?}");
        let list = ["journal", "list", "--journal", &url, "--scope", &scope, "--output", "json"];
        let records: Value = serde_json::from_slice(&after.idem(&list).output().await.unwrap().stdout).unwrap();
        let records = records.as_array().expect("a list");
        assert_eq!(records.len(), round + 1, "one operation a round: {records:?}");
        assert!(records.iter().all(|r| r["state"] == "succeeded"), "round {round}: the journal settled: {records:?}");
    }
}

/// `ensure-count` from three machines at once on one journal: the exact count, no overshoot,
/// and another writer's item is never deleted (scaling down with --prune included).
#[allow(clippy::disallowed_methods)] // real processes on the real clock
#[tokio::test]
async fn ensure_count_from_three_machines_at_once_is_exact() {
    let Some((url, _server)) = support::server().await else { return };
    let (cloud, proxy) = faulty_cloud(31).await;
    let collection = replicas("app-fleet", &format!("vm-{}", std::process::id()));
    let foreign = cloud.add_foreign(&collection, "foreign", std::time::SystemTime::UNIX_EPOCH);
    let target = format!("{}/{collection}", proxy.uri());
    for (round, count) in [(0, "7"), (1, "4"), (2, "9")] {
        let machines: Vec<Machine> = (0..3).map(|n| Machine::new(&format!("ensure-{round}"), n)).collect();
        let mut children = Vec::new();
        for machine in &machines {
            let args = [
                "ensure-count",
                &target,
                "--count",
                count,
                "--prune",
                "--generation",
                "1",
                "--journal",
                &url,
                "--scope",
                "fleet-ensure",
                "--lease",
                "3",
                "--operation",
                "replicas/fleet",
                "--output",
                "json",
            ];
            children.push(machine.idem(&args).spawn().unwrap());
        }
        let mut outputs = Vec::new();
        for child in children {
            outputs.push(child.wait_with_output().await.unwrap());
        }
        let live = cloud.resources(&collection);
        let codes: Vec<_> = outputs.iter().map(|o| o.status.code()).collect();
        let said: Vec<String> = outputs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
        assert_eq!(live.len(), count.parse::<usize>().unwrap(), "round {round}: the exact count: {codes:?} {said:?}");
        assert!(live.iter().any(|r| r.id == foreign.id), "round {round}: the other writer's item stays");
        assert!(!cloud.deleted_through_api(&foreign.id), "round {round}");
        assert!(codes.iter().all(|c| *c == Some(0)), "round {round}: {codes:?} {said:?}");
    }
}
