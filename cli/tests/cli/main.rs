//! The `idem` binary, run as a child process against the crate's fixtures and chaos proxy.
//!
//! Every exit code, resume after SIGKILL, the key-reuse refusal, keys from git, a keyless lost
//! response, Retry-After, ensure-count under faults, and the journal subcommands.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use idempotent_retry::testing::{
    ChaosProxy, FakeCloud, Fault, FaultMix, LongRunning, RetryAfter, Schedule, ServerProfile, replicas,
};
use serde_json::Value;

mod hostile;

/// A scratch directory with its own journal and XDG state dir, so nothing touches the real home.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("idem-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn journal(&self) -> String {
        self.dir.join("journal.sqlite3").display().to_string()
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_idem"));
        command
            .args(args)
            .env("XDG_STATE_HOME", self.dir.join("state"))
            .env_remove("HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    async fn run(&self, args: &[&str]) -> Run {
        Run(self.command(args).output().await.unwrap())
    }
}

struct Run(Output);

impl Run {
    fn code(&self) -> i32 {
        self.0.status.code().expect("exited")
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout().trim()).unwrap_or_else(|e| panic!("{e}: {}", self.stdout()))
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\nstdout: {}\nstderr: {}", self.code(), self.stdout(), self.stderr())
    }
}

async fn cloud(profile: ServerProfile) -> FakeCloud {
    FakeCloud::start(profile).await
}

#[tokio::test]
async fn post_creates_prints_the_body_and_journals_the_key() {
    let scratch = Scratch::new("created");
    let cloud = cloud(ServerProfile::stripe()).await;
    let url = format!("{}/cvms", cloud.uri());

    let run = scratch.run(&["post", &url, "--json", r#"{"name":"web-1"}"#, "--journal", &scratch.journal()]).await;

    assert_eq!(run.code(), 0, "{run:?}");
    let body: Value = serde_json::from_str(&run.stdout()).unwrap();
    assert_eq!(body["name"], "web-1");
    assert_eq!(body["id"], cloud.resources("cvms")[0].id.as_str(), "the body byte for byte");
    assert_eq!(cloud.created(), 1);
    assert!(cloud.keys_seen()[0].is_some());

    let run = scratch
        .run(&["post", &url, "--json", r#"{"name":"web-2"}"#, "--output", "json", "--journal", &scratch.journal()])
        .await;
    let out = run.json();
    assert_eq!(
        (out["outcome"].as_str(), out["status"].as_u64(), out["replayed"].as_bool()),
        (Some("created"), Some(201), Some(false))
    );
    assert_eq!(out["attempts"], 1);
    assert_eq!(out["body"]["name"], "web-2");
    assert_eq!(Some(out["idempotency_key"].as_str().unwrap().to_owned()), cloud.keys_seen()[1]);
}

#[tokio::test]
async fn exit_1_for_a_final_refusal_with_the_body_on_stdout() {
    let scratch = Scratch::new("refused");
    let cloud = cloud(ServerProfile::stripe()).await;

    let run = scratch
        .run(&["post", &format!("{}/nowhere", cloud.uri()), "--json", "{}", "--journal", &scratch.journal()])
        .await;

    assert_eq!(run.code(), 1, "{run:?}");
    assert!(run.stdout().contains("no such route"), "{run:?}");
    assert_eq!(cloud.requests().len(), 1, "a 404 is not retried");

    // With --output json the refusal names the key it was sent with.
    let url = format!("{}/nowhere", cloud.uri());
    let run = scratch.run(&["post", &url, "--json", "{}", "--output", "json", "--journal", &scratch.journal()]).await;
    assert_eq!(run.code(), 1, "{run:?}");
    let out = run.json();
    assert_eq!(
        (out["outcome"].as_str(), out["status"].as_u64(), out["attempts"].as_u64()),
        (Some("rejected"), Some(404), Some(1))
    );
    assert_eq!(out["idempotency_key"].as_str().map(str::to_owned), cloud.requests()[1].key, "the key that was sent");
    assert!(out["idempotency_key"].is_string());
}

#[tokio::test]
async fn exit_2_for_bad_input_and_nothing_is_sent() {
    let scratch = Scratch::new("usage");
    let cloud = cloud(ServerProfile::stripe()).await;
    let url = format!("{}/cvms", cloud.uri());
    let journal = scratch.journal();
    let cases: Vec<Vec<&str>> = vec![
        vec!["post", &url, "--json", "{not json", "--journal", &journal],
        vec!["post", &url, "--json", "{}", "--idempotency-key", "has space", "--journal", &journal],
        vec!["post", &url, "--json", "{}", "--idempotency-key", "k1", "--no-idempotency-key"],
        vec!["post", &url, "--json", "{}", "--max-attempts", "0"],
        vec!["post", &url, "--json", "@/nonexistent/body.json"],
        vec!["post", &url, "--json", "[1,2]", "--key-field", "idempotency_key", "--journal", &journal],
        vec!["post", &url, "-H", "no colon here"],
        vec!["ensure-count", &url],
    ];
    for args in cases {
        let run = scratch.run(&args).await;
        assert_eq!(run.code(), 2, "{args:?}: {run:?}");
        assert!(!run.stderr().is_empty(), "{args:?}: says why");
    }
    assert!(cloud.requests().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn exit_3_for_a_keyless_lost_response_with_one_resource() {
    let scratch = Scratch::new("keyless");
    let cloud = cloud(ServerProfile::no_keys()).await;
    let proxy = ChaosProxy::start(cloud.address(), Schedule::script([Fault::Lose])).await;

    let run = scratch
        .run(&[
            "post",
            &format!("{}/cvms", proxy.uri()),
            "--json",
            r#"{"name":"web-1"}"#,
            "--no-idempotency-key",
            "--output",
            "json",
            "--journal",
            &scratch.journal(),
        ])
        .await;

    assert_eq!(run.code(), 3, "{run:?}");
    assert_eq!(run.json()["outcome"], "unknown");
    assert!(run.stderr().contains("NOT safe"), "{run:?}");
    assert_eq!(cloud.created(), 1);
    assert_eq!(proxy.requests(), 1, "never resent blind");
}

#[tokio::test]
async fn exit_3_when_retries_run_out_and_the_rerun_resumes_the_key() {
    let scratch = Scratch::new("exhausted");
    let cloud = cloud(ServerProfile::stripe()).await;
    let proxy = ChaosProxy::start(cloud.address(), Schedule::script([Fault::Lose, Fault::Lose])).await;
    let url = format!("{}/cvms", proxy.uri());
    let args = ["post", &url, "--json", r#"{"name":"web-1"}"#, "--max-attempts", "2", "--journal", &scratch.journal()];

    let first = scratch.run(&args).await;
    assert_eq!(first.code(), 3, "{first:?}");
    assert!(first.stderr().contains("re-running the same command is safe"), "{first:?}");
    assert!(first.stderr().contains("attempt 1/2 failed"), "one line per retry: {first:?}");

    let again = scratch.run(&args).await;
    assert_eq!(again.code(), 0, "{again:?}");
    assert!(again.stderr().contains("replayed"), "{again:?}");
    assert_eq!(cloud.created(), 1);
    let keys = cloud.keys_seen();
    assert!(keys.iter().all(|k| *k == keys[0]), "one key across both runs: {keys:?}");
}

// The CLI is a real process on the real clock: the test waits, in real time, for its request
// to land before killing it.
#[allow(clippy::disallowed_methods)]
#[tokio::test]
async fn resume_after_sigkill() {
    let scratch = Scratch::new("sigkill");
    let cloud = cloud(ServerProfile::stripe()).await;
    let proxy =
        ChaosProxy::start(cloud.address(), Schedule::script([Fault::HoldResponse(Duration::from_secs(60))])).await;
    let url = format!("{}/cvms", proxy.uri());
    let args = ["post", &url, "--json", r#"{"name":"web-1"}"#, "--journal", &scratch.journal()];

    let mut child = scratch.command(&args).spawn().unwrap();
    let started = Instant::now();
    while cloud.created() == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "the server never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await.unwrap(); // SIGKILL
    assert!(!child.wait().await.unwrap().success());

    let again = scratch.run(&args).await;

    assert_eq!(again.code(), 0, "{again:?}");
    assert!(again.stderr().contains("replayed"), "{again:?}");
    assert_eq!(cloud.created(), 1);
    let keys = cloud.keys_seen();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1], "the re-run took the key from the journal");
}

#[tokio::test]
async fn an_explicit_key_journaled_with_another_body_is_refused() {
    let scratch = Scratch::new("reuse");
    let cloud = cloud(ServerProfile::stripe()).await;
    let url = format!("{}/cvms", cloud.uri());
    let scratch = &scratch;
    let post = |body: &'static str| {
        let (url, journal) = (url.clone(), scratch.journal());
        async move {
            scratch
                .run(&["post", &url, "--json", body, "--idempotency-key", "deploy-2f6c9a1", "--journal", &journal])
                .await
        }
    };

    assert_eq!(post(r#"{"name":"api"}"#).await.code(), 0);
    let refused = post(r#"{"name":"web"}"#).await;

    assert_eq!(refused.code(), 2, "{refused:?}");
    assert!(refused.stderr().contains(&format!("POST {url} #")), "names the earlier request: {refused:?}");
    assert_eq!(cloud.requests().len(), 1, "nothing sent the second time");
    // The same body again is fine: the server replays.
    assert_eq!(post(r#"{"name":"api"}"#).await.code(), 0);
    assert_eq!(cloud.created(), 1);
}

#[path = "../../../tests/common/git.rs"]
mod git_support;
use git_support::git;

#[tokio::test]
async fn key_from_git_clean_dirty_and_no_repo() {
    if !git_support::available() {
        eprintln!("git is not installed: the no-repository case below still runs");
    }
    let scratch = Scratch::new("git");
    let cloud = cloud(ServerProfile::tower()).await;
    let url = format!("{}/cvms", cloud.uri());
    let repo = scratch.dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let plain = scratch.dir.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let scratch = &scratch;
    let deploy = |dir: PathBuf, body: &'static str| {
        let (url, journal) = (url.clone(), scratch.journal());
        async move {
            let git_flag = format!("--key-from-git={}", dir.display());
            scratch
                .run(&[
                    "post",
                    &url,
                    "--json",
                    body,
                    &git_flag,
                    "--key-header",
                    "X-Tower-Idempotency-Key",
                    "--journal",
                    &journal,
                ])
                .await
        }
    };

    // No repository (or no git at all): no key, and why.
    let run = deploy(plain, r#"{"name":"a"}"#).await;
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(run.stderr().contains("no idempotency key from git"), "{run:?}");
    if !git_support::available() {
        assert_eq!(cloud.keys_seen(), [None]);
        return;
    }

    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("app.toml"), "replicas = 3\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    let head = git_support::head(&repo);

    // Clean: the HEAD SHA is the key.
    let run = deploy(repo.clone(), r#"{"name":"b"}"#).await;
    assert_eq!(run.code(), 0, "{run:?}");

    // Dirty: no key, and why.
    std::fs::write(repo.join("app.toml"), "replicas = 5\n").unwrap();
    let run = deploy(repo.clone(), r#"{"name":"c"}"#).await;
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(run.stderr().contains("uncommitted"), "{run:?}");

    let keys = cloud.keys_seen();
    assert_eq!(keys, [None, Some(head), None]);
}

// The CLI is a real process on the real clock: the test checks it waited out `Retry-After`.
#[allow(clippy::disallowed_methods)]
#[tokio::test]
async fn retry_after_is_honoured() {
    let scratch = Scratch::new("retry-after");
    let cloud = cloud(ServerProfile::stripe()).await;
    let proxy =
        ChaosProxy::start(cloud.address(), Schedule::script([Fault::unavailable(RetryAfter::Seconds(1))])).await;

    let started = Instant::now();
    let run =
        scratch.run(&["post", &format!("{}/cvms", proxy.uri()), "--json", "{}", "--journal", &scratch.journal()]).await;
    let elapsed = started.elapsed();

    assert_eq!(run.code(), 0, "{run:?}");
    assert!(elapsed >= Duration::from_secs(1), "waited {elapsed:?}");
    assert!(run.stderr().contains("attempt 1/5 failed (503), retrying in 1.0s"), "{run:?}");
    assert_eq!(cloud.created(), 1);
}

#[tokio::test]
async fn adaptive_paces_the_retry_after_a_throttle() {
    let cloud = cloud(ServerProfile::stripe()).await;
    for adaptive in [true, false] {
        let scratch = Scratch::new(&format!("adaptive-{adaptive}"));
        let throttle = Fault::Status { status: 429, retry_after: None };
        let proxy = ChaosProxy::start(cloud.address(), Schedule::script([throttle])).await;
        let mut args = vec!["post", "--json", "{}", "--journal"];
        let (url, journal) = (format!("{}/cvms", proxy.uri()), scratch.journal());
        args.extend([journal.as_str(), url.as_str()]);
        if adaptive {
            args.push("--adaptive");
        }
        let run = scratch.run(&args).await;
        assert_eq!(run.code(), 0, "{run:?}");
        // Once the host throttled, its rate is 0.7 of what was sent (one request in the first
        // half second: 1.4 a second, a turn every 714 ms), so the retry waits at least that;
        // without adaptive mode only the throttled backoff (full jitter under 1 s the first
        // time) spaces it. The exact pacing is pinned on injected time in tests/all/throttling.rs;
        // this checks that `--adaptive` reaches the layer.
        let stderr = run.stderr();
        let delay = stderr
            .split("attempt 1/5 failed (429), retrying in ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|wait| match wait.strip_suffix("ms") {
                Some(ms) => ms.parse::<f64>().ok(),
                None => wait.strip_suffix('s').and_then(|s| s.parse::<f64>().ok()).map(|s| s * 1000.0),
            })
            .unwrap_or_else(|| panic!("one retry: {run:?}"));
        if adaptive {
            assert!(delay >= 700.0, "{delay} ms: {run:?}");
        } else {
            assert!(delay <= 1000.0, "{delay} ms: {run:?}");
        }
    }
    assert_eq!(cloud.created(), 2);
}

#[tokio::test]
async fn ensure_count_0_to_3_to_7_under_faults_and_surplus_rules() {
    let scratch = Scratch::new("ensure");
    let cloud = cloud(ServerProfile::stripe()).await;
    let mix = FaultMix::chaos().with_retry_after(Some(RetryAfter::Seconds(0))).scaled_to(0.3);
    let proxy = ChaosProxy::start(cloud.address(), Schedule::random(11, mix)).await;
    let collection = replicas("app-9", "vm-1");
    let url = format!("{}/{collection}", proxy.uri());
    let journal = scratch.journal();
    let scratch = &scratch;
    let ensure = |count: &'static str, extra: &'static [&'static str]| {
        let (url, journal) = (url.clone(), journal.clone());
        async move {
            let mut args = vec![
                "ensure-count",
                &url,
                "--count",
                count,
                "--expect",
                "vm_uuid=vm-1",
                "--output",
                "json",
                "--journal",
                &journal,
            ];
            args.extend_from_slice(extra);
            scratch.run(&args).await
        }
    };

    let three = ensure("3", &[]).await;
    assert_eq!(three.code(), 0, "{three:?}");
    assert_eq!((three.json()["desired"].as_u64(), three.json()["after"].as_u64()), (Some(3), Some(3)));
    let seven = ensure("7", &["--generation", "2"]).await;
    assert_eq!(seven.code(), 0, "{seven:?}");
    assert_eq!(seven.json()["after"], 7);
    assert_eq!(seven.json()["created"].as_array().unwrap().len(), 4);
    assert_eq!(cloud.resources(&collection).len(), 7);
    assert_eq!(cloud.created(), 7, "nothing created twice");

    // Down to 2 without --prune: the surplus is reported and the exit is 1.
    let two = ensure("2", &[]).await;
    assert_eq!(two.code(), 1, "{two:?}");
    assert_eq!(two.json()["overshoot"], 5);
    assert!(two.stderr().contains("--prune"), "{two:?}");
    assert_eq!(cloud.resources(&collection).len(), 7);
    // With --prune.
    let pruned = ensure("2", &["--prune"]).await;
    assert_eq!(pruned.code(), 0, "{pruned:?}");
    assert_eq!(pruned.json()["deleted"].as_array().unwrap().len(), 5);
    assert_eq!(cloud.resources(&collection).len(), 2);

    // An identity that does not match: exit 1.
    let wrong =
        scratch.run(&["ensure-count", &url, "--count", "3", "--expect", "vm_uuid=vm-9", "--journal", &journal]).await;
    assert_eq!(wrong.code(), 1, "{wrong:?}");
}

#[tokio::test]
async fn journal_list_and_forget() {
    let scratch = Scratch::new("journal");
    let cloud = cloud(ServerProfile::stripe()).await;
    let url = format!("{}/cvms", cloud.uri());
    let journal = scratch.journal();
    scratch.run(&["post", &url, "--json", r#"{"name":"web-1"}"#, "--journal", &journal]).await;

    let list = scratch.run(&["journal", "list", "--output", "json", "--journal", &journal]).await;
    assert_eq!(list.code(), 0, "{list:?}");
    let records = list.json();
    let record = &records.as_array().unwrap()[0];
    assert_eq!(record["state"], "succeeded");
    assert_eq!(record["status"], 201);
    assert_eq!(Some(record["key"].as_str().unwrap().to_owned()), cloud.keys_seen()[0]);
    let operation = record["operation"].as_str().unwrap().to_owned();

    let table = scratch.run(&["journal", "list", "--journal", &journal]).await;
    assert!(table.stdout().contains(&operation) && table.stdout().contains("succeeded"), "{table:?}");
    assert!(
        !table.stdout().contains(cloud.keys_seen()[0].as_deref().unwrap()),
        "the table shows a fingerprint, not the key"
    );
    let pending = scratch.run(&["journal", "list", "--pending", "--output", "json", "--journal", &journal]).await;
    assert_eq!(pending.json(), serde_json::json!([]));

    assert_eq!(scratch.run(&["journal", "forget", &operation, "--journal", &journal]).await.code(), 0);
    assert_eq!(scratch.run(&["journal", "forget", &operation, "--journal", &journal]).await.code(), 1);
    assert_eq!(
        scratch.run(&["journal", "list", "--output", "json", "--journal", &journal]).await.json(),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn help_shows_examples_and_exit_codes() {
    let scratch = Scratch::new("help");
    for args in
        [vec!["--help"], vec!["post", "--help"], vec!["ensure-count", "--help"], vec!["journal", "list", "--help"]]
    {
        let run = scratch.run(&args).await;
        assert_eq!(run.code(), 0);
        assert!(run.stdout().contains("Examples:"), "{args:?}: {run:?}");
    }
    let run = scratch.run(&["post", "--help"]).await;
    assert!(run.stdout().contains("Exit codes:") && run.stdout().contains("3  the outcome is unknown"));
}

/// A raw HTTP server that answers every request with `status`, a `content-length` of 1000 and
/// only the first 10 bytes of the body, then holds the connection open.
async fn stalling_server(status: u16) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let head =
                    format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n");
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(br#"{"id":"cv"#).await;
                // Hold the connection until the client hangs up.
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    (url, requests)
}

/// Defect: a body that stalls after the headers hung `idem post` forever, whatever its deadline.
/// The attempt timeout covers the body, and the deadline ends the run.
#[tokio::test]
async fn a_stalled_body_ends_at_the_deadline_instead_of_hanging() {
    for status in [503, 201] {
        let scratch = Scratch::new(&format!("stall-{status}"));
        let (url, requests) = stalling_server(status).await;
        let args = ["post", &url, "--json", "{}", "--deadline", "3", "--attempt-timeout", "1", "--no-journal"];

        let mut child = scratch.command(&args).spawn().unwrap();
        let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        let Ok(status_code) = exited else {
            child.kill().await.unwrap();
            panic!("{status}: idem post was still running after 30 s against a stalled body");
        };

        assert_eq!(status_code.unwrap().code(), Some(3), "{status}: outcome unknown, not a hang");
        assert!(requests.load(std::sync::atomic::Ordering::SeqCst) >= 2, "{status}: retried with its key");
    }
}

/// Defect: inputs that can never be sent (a bad URL, a zero time budget) exited 3, left the
/// journal `unknown` and told keyless callers that re-running was NOT safe, while the server saw
/// nothing. They are usage errors: exit 2, nothing journaled, nothing sent.
#[tokio::test]
async fn what_cannot_be_sent_is_a_usage_error_and_leaves_no_record() {
    let scratch = Scratch::new("not-sent");
    let cloud = cloud(ServerProfile::stripe()).await;
    let url = format!("{}/cvms", cloud.uri());
    let journal = scratch.journal();
    let cases: Vec<Vec<&str>> = vec![
        vec!["post", "not a url", "--json", "{}"],
        vec!["post", "http://", "--json", "{}"],
        vec!["post", "http://[::1", "--json", "{}"],
        vec!["post", "file:///x", "--json", "{}"],
        vec!["post", "file:///x", "--json", "{}", "--no-idempotency-key"],
        vec!["post", &url, "--json", "{}", "--deadline", "0"],
        vec!["post", &url, "--json", "{}", "--attempt-timeout", "0"],
        vec!["post", &url, "--json", "{}", "--deadline", "0", "--no-idempotency-key"],
        vec!["post", &url, "--json", "{}", "--deadline", "1e30"],
        vec!["ensure-count", "not a url", "--count", "1"],
    ];
    for mut args in cases {
        args.extend(["--journal", &journal]);
        let run = scratch.run(&args).await;
        assert_eq!(run.code(), 2, "{args:?}: {run:?}");
        assert!(
            !run.stderr().contains("NOT safe") && !run.stderr().contains("may have been applied"),
            "{args:?}: {run:?}"
        );
    }
    let run = scratch.run(&["post", &url, "--json", "{}", "--deadline", "1e30", "--journal", &journal]).await;
    assert!(run.stderr().contains("too large"), "says what is wrong with it: {run:?}");
    assert!(!run.stderr().contains("non-negative"), "{run:?}");
    assert!(cloud.requests().is_empty(), "nothing was sent");
    if std::path::Path::new(&journal).exists() {
        let list = scratch.run(&["journal", "list", "--output", "json", "--journal", &journal]).await;
        assert_eq!(list.json(), serde_json::json!([]), "nothing journaled: {list:?}");
    }
}

/// A server that creates a resource for every request it has not seen the key of, and answers
/// the first create with 503 after committing it (a proxy that lost the answer). Keys it has
/// seen are answered with the stored 201.
struct CommitThen503 {
    created: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl wiremock::Respond for CommitThen503 {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let key = request.headers.get("idempotency-key").map(|v| v.to_str().unwrap().to_owned());
        let mut created = self.created.lock().unwrap();
        if key.is_some() && created.contains(&key) {
            return wiremock::ResponseTemplate::new(201).set_body_string(r#"{"id":"replayed"}"#);
        }
        created.push(key);
        let status = if created.len() == 1 { 503 } else { 201 };
        wiremock::ResponseTemplate::new(status).set_body_string(format!(r#"{{"id":"r{}"}}"#, created.len()))
    }
}

/// Defect: `begin` wrote the new record before the "previous run unsettled" check. A keyless run
/// the server committed (answered 503) left an unknown record; the same command with a key then
/// replaced it with a pending key it never sent, and a third run resumed that key and created a
/// second resource. An unsettled record survives any re-run until a read-back or
/// `journal forget` settles it.
#[tokio::test]
async fn an_unsettled_keyless_run_survives_reruns_with_other_key_flags() {
    let scratch = Scratch::new("rerun-flags");
    let server = wiremock::MockServer::start().await;
    let created = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(CommitThen503 { created: created.clone() })
        .mount(&server)
        .await;
    let url = format!("{}/cvms", server.uri());
    let journal = scratch.journal();
    let post = |extra: &'static [&'static str]| {
        let (url, journal) = (url.clone(), journal.clone());
        let scratch = &scratch;
        async move {
            let mut args = vec!["post", &url, "--json", r#"{"name":"web-1"}"#, "--journal", &journal];
            args.extend_from_slice(extra);
            scratch.run(&args).await
        }
    };

    let first = post(&["--no-idempotency-key"]).await;
    assert_eq!(first.code(), 3, "{first:?}");
    for _ in 0..2 {
        let again = post(&[]).await;
        assert_eq!(again.code(), 3, "still unsettled: {again:?}");
        assert!(again.stderr().contains("journal forget"), "says how to settle it: {again:?}");
    }
    let list = scratch.run(&["journal", "list", "--output", "json", "--journal", &journal]).await.json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!((list[0]["state"].as_str(), list[0]["key"].as_str()), (Some("unknown"), None), "the keyless record");
    assert_eq!(created.lock().unwrap().len(), 1, "one resource");

    // Checked by hand and forgotten: the next run is a new operation.
    let operation = list[0]["operation"].as_str().unwrap().to_owned();
    assert_eq!(scratch.run(&["journal", "forget", &operation, "--journal", &journal]).await.code(), 0);
    assert_eq!(post(&[]).await.code(), 0);
    assert_eq!(created.lock().unwrap().len(), 2);
}

/// Defect: `ensure-count` ignored `--deadline`: against creates that keep failing it looped
/// until killed. The run ends at its deadline, with its report and exit 3.
#[tokio::test]
async fn ensure_count_ends_at_its_deadline_against_failing_creates() {
    let scratch = Scratch::new("ensure-deadline");
    let cloud = cloud(ServerProfile::stripe()).await;
    let proxy = ChaosProxy::builder(cloud.address())
        .schedule(Schedule::always(Fault::Status { status: 503, retry_after: None }))
        .only(http::Method::POST)
        .start()
        .await;
    let url = format!("{}/{}", proxy.uri(), replicas("app-9", "vm-1"));
    let args =
        ["ensure-count", &url, "--count", "3", "--deadline", "4", "--output", "json", "--journal", &scratch.journal()];

    let mut child = scratch.command(&args).spawn().unwrap();
    let Ok(status) = tokio::time::timeout(Duration::from_secs(60), child.wait()).await else {
        child.kill().await.unwrap();
        panic!("ensure-count --deadline 4 was still running after 60 s");
    };
    let output = child.wait_with_output().await.unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);

    assert_eq!(status.unwrap().code(), Some(3), "{report}");
    assert_eq!(report["converged"], false, "the report is printed: {report}");
    assert!(proxy.requests() < 100, "{} requests in 4 s", proxy.requests());
}

/// Defect: URL credentials and query values were journaled and printed by `journal list`, a
/// malformed `-H 'Authorization: …'` echoed the token, `-H 'Idempotency-Key: mine'` was
/// replaced by a minted key, `journal list` on a mistyped path created directories and an empty
/// journal, and a journal corrupted mid-post was reported as "journal error" alone.
#[tokio::test]
async fn secrets_stay_out_and_what_the_user_says_holds() {
    let scratch = Scratch::new("secrets");
    let cloud = cloud(ServerProfile::stripe()).await;
    let journal = scratch.journal();
    let secret_url = cloud.uri().replace("http://", "http://user:s3cret@") + "/cvms?token=abc123";

    let run = scratch.run(&["post", &secret_url, "--json", r#"{"name":"a"}"#, "--journal", &journal]).await;
    assert_eq!(run.code(), 0, "{run:?}");
    for output in ["text", "json"] {
        let list = scratch.run(&["journal", "list", "--output", output, "--journal", &journal]).await;
        assert_eq!(list.code(), 0, "{list:?}");
        assert!(!list.stdout().contains("s3cret") && !list.stdout().contains("abc123"), "{output}: {list:?}");
    }
    let failing = scratch
        .run(&[
            "post",
            &secret_url.replace(&cloud.uri()[7..], "127.0.0.1:1"),
            "--json",
            "{}",
            "--max-attempts",
            "1",
            "--no-journal",
        ])
        .await;
    assert!(!failing.stderr().contains("s3cret") && !failing.stderr().contains("abc123"), "{failing:?}");

    let bad_header = scratch.run(&["post", &secret_url, "-H", "Authorization Bearer tok-9f8e7d", "--no-journal"]).await;
    assert_eq!(bad_header.code(), 2, "{bad_header:?}");
    assert!(!bad_header.stderr().contains("tok-9f8e7d"), "{bad_header:?}");
    let bad_value =
        scratch.run(&["post", &secret_url, "-H", "Authorization: Bearer tok-9f8e7d\u{1}", "--no-journal"]).await;
    assert_eq!(bad_value.code(), 2, "{bad_value:?}");
    assert!(!bad_value.stderr().contains("tok-9f8e7d"), "{bad_value:?}");

    let url = format!("{}/cvms", cloud.uri());
    let mine = scratch
        .run(&["post", &url, "--json", r#"{"name":"b"}"#, "-H", "Idempotency-Key: mine-1", "--journal", &journal])
        .await;
    assert_eq!(mine.code(), 0, "{mine:?}");
    assert_eq!(cloud.keys_seen().last().unwrap().as_deref(), Some("mine-1"), "the key the user gave is the key sent");
    let both = scratch.run(&["post", &url, "--json", "{}", "-H", "Idempotency-Key: a", "--idempotency-key", "b"]).await;
    assert_eq!(both.code(), 2, "two keys: {both:?}");

    let typo = scratch.dir.join("typo/dir/j.sqlite3");
    let list = scratch.run(&["journal", "list", "--journal", typo.to_str().unwrap()]).await;
    assert_eq!(list.code(), 2, "{list:?}");
    assert!(!scratch.dir.join("typo").exists(), "nothing created");
}

/// A journal whose operations table is damaged opens (its first page is fine) and fails when the
/// post consults it: the message says what is wrong and where, not "journal error" alone.
#[tokio::test]
async fn a_journal_found_corrupt_mid_post_is_named() {
    use std::io::{Seek, SeekFrom, Write};
    let scratch = Scratch::new("corrupt-mid-post");
    let cloud = cloud(ServerProfile::stripe()).await;
    let journal = scratch.journal();
    let url = format!("{}/cvms", cloud.uri());
    for name in ["a", "b", "c"] {
        let body = format!(r#"{{"name":"{name}"}}"#);
        assert_eq!(scratch.run(&["post", &url, "--json", &body, "--journal", &journal]).await.code(), 0);
    }
    // Page 2 holds the operations table: overwrite it.
    let mut file = std::fs::OpenOptions::new().write(true).open(&journal).unwrap();
    file.seek(SeekFrom::Start(4096)).unwrap();
    file.write_all(&[0xA5; 4096]).unwrap();
    drop(file);

    let run = scratch.run(&["post", &url, "--json", r#"{"name":"d"}"#, "--journal", &journal]).await;

    assert_eq!(run.code(), 2, "{run:?}");
    assert!(
        run.stderr().contains("not a valid SQLite database") || run.stderr().contains("malformed"),
        "says what: {run:?}"
    );
    assert!(run.stderr().contains(&journal), "and where: {run:?}");
    assert_eq!(cloud.created(), 3, "nothing was sent");
}

/// Defect: a server's "key reused with another payload" refusal (417, 422) came out as
/// `"outcome":"unknown"`, exit 3, with the body dropped and a note that re-running with the key
/// was safe. It is a final refusal: exit 1, with its body.
#[tokio::test]
async fn a_key_reuse_refusal_is_a_refusal_with_its_body() {
    for (profile, server, status) in [(ServerProfile::express(), "express", 417), (ServerProfile::ietf(), "ietf", 422)]
    {
        let scratch = Scratch::new(&format!("reuse-{server}"));
        let cloud = cloud(profile).await;
        let url = format!("{}/cvms", cloud.uri());
        let post = |body: &'static str| {
            let url = url.clone();
            let scratch = &scratch;
            async move {
                let args =
                    ["post", &url, "--json", body, "--idempotency-key", "k-1", "--server", server, "--no-journal"];
                scratch.run(&[&args[..], &["--output", "json"]].concat()).await
            }
        };
        assert_eq!(post(r#"{"name":"a"}"#).await.code(), 0);

        let refused = post(r#"{"name":"b"}"#).await;

        assert_eq!(refused.code(), 1, "{server}: {refused:?}");
        let out = refused.json();
        assert_eq!((out["outcome"].as_str(), out["status"].as_u64()), (Some("rejected"), Some(status)), "{server}");
        assert!(!out["body"].is_null(), "{server}: the refusal's body: {out}");
        assert!(refused.stderr().contains("another payload"), "{server}: {refused:?}");
        assert!(!refused.stderr().contains("safe"), "{server}: {refused:?}");
        assert_eq!(cloud.created(), 1);
    }
}

/// Defect: `idem` had no way to be told how a server replays. django-idempotency-key replays the
/// stored body under 409 with no marker, so after a lost response every retry met a 409 and the
/// run ended "gave up … may have been applied". `--server django` (or `--replay-status 409`)
/// recognises the replay.
#[tokio::test]
async fn a_django_replay_is_recognised_when_the_cli_is_told() {
    let cloud = cloud(ServerProfile::django()).await;
    for (flags, want) in [(&[][..], 3), (&["--server", "django"][..], 0), (&["--replay-status", "409"][..], 0)] {
        let scratch = Scratch::new(&format!("django-{}", flags.len() + usize::from(flags.contains(&"django"))));
        let proxy = ChaosProxy::start(cloud.address(), Schedule::script([Fault::Lose])).await;
        let url = format!("{}/cvms", proxy.uri());
        let name = format!(r#"{{"name":"web-{}"}}"#, flags.join("-"));
        let args = [&["post", &url, "--json", &name, "--max-attempts", "3", "--no-journal"][..], flags].concat();

        let run = scratch.run(&args).await;

        assert_eq!(run.code(), want, "{flags:?}: {run:?}");
        if want == 0 {
            assert!(run.stderr().contains("replayed"), "{flags:?}: {run:?}");
        }
    }
    assert_eq!(cloud.duplicates(), 0);
}

/// A cloud whose creates provision for `provisioning` (real time: the CLI is a real process),
/// in `style`; `failing` of them fail.
async fn provisioning_cloud(style: LongRunning, provisioning: Duration, failing: u32) -> FakeCloud {
    FakeCloud::builder(ServerProfile::stripe())
        .long_running(style, provisioning)
        .failing_provisioning(failing)
        .start()
        .await
}

#[tokio::test]
async fn post_waits_for_a_state_and_prints_the_resource_as_it_ended() {
    let scratch = Scratch::new("wait-for");
    let cloud = provisioning_cloud(LongRunning::Status, Duration::from_millis(1500), 0).await;
    let url = format!("{}/cvms", cloud.uri());

    let run = scratch
        .run(&[
            "post",
            &url,
            "--json",
            r#"{"name":"web-1"}"#,
            "--wait-for",
            "status=running",
            "--output",
            "json",
            "--journal",
            &scratch.journal(),
        ])
        .await;

    assert_eq!(run.code(), 0, "{run:?}");
    let out = run.json();
    assert_eq!((out["outcome"].as_str(), out["body"]["status"].as_str()), (Some("created"), Some("running")), "{out}");
    assert!(run.stderr().contains("waiting at resource"), "the id is told before the wait: {run:?}");
    assert_eq!(cloud.created(), 1);
}

#[tokio::test]
async fn a_202_is_followed_unless_told_not_to() {
    let scratch = Scratch::new("follow-202");
    let cloud = provisioning_cloud(LongRunning::OperationLocation, Duration::from_millis(1000), 0).await;
    let url = format!("{}/cvms", cloud.uri());
    let post = |name: &'static str, extra: &'static [&'static str]| {
        let body = format!(r#"{{"name":"{name}"}}"#);
        let args: Vec<String> = ["post", &url, "--json", &body, "--output", "json", "--no-journal"]
            .iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect();
        let scratch = &scratch;
        async move { scratch.run(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };

    let followed = post("web-1", &[]).await;
    let not_followed = post("web-2", &["--no-follow"]).await;

    assert_eq!(followed.code(), 0, "{followed:?}");
    assert_eq!(
        (followed.json()["status"].as_u64(), followed.json()["body"]["status"].as_str()),
        (Some(202), Some("running"))
    );
    assert_eq!(not_followed.code(), 0, "{not_followed:?}");
    assert_eq!(
        (not_followed.json()["status"].as_u64(), not_followed.json()["body"].clone()),
        (Some(202), Value::from(""))
    );
}

#[tokio::test]
async fn a_failure_state_exits_1_and_a_rerun_resumes_the_wait() {
    let scratch = Scratch::new("fail-on");
    let cloud = provisioning_cloud(LongRunning::Status, Duration::from_millis(500), 1).await;
    let url = format!("{}/cvms", cloud.uri());
    let args = [
        "post",
        &url,
        "--json",
        r#"{"name":"web-1"}"#,
        "--wait-for",
        "status=running",
        "--fail-on",
        "status=error,failed",
        "--journal",
        &scratch.journal(),
    ];

    let run = scratch.run(&args).await;

    assert_eq!(run.code(), 1, "{run:?}");
    assert!(run.stderr().contains("failure state \"error\""), "{run:?}");
    assert!(run.stderr().contains("resumes the wait"), "{run:?}");
    assert!(run.stdout().contains(r#""status":"error""#), "the resource as it ended: {run:?}");
    let again = scratch.run(&args).await;
    assert_eq!(again.code(), 1, "{again:?}");
    assert_eq!((cloud.created(), cloud.keys_seen().len()), (1, 1), "never created again");
}

#[tokio::test]
async fn a_wait_that_times_out_exits_3_and_the_journal_lists_it_waiting() {
    let scratch = Scratch::new("wait-timeout");
    let cloud = provisioning_cloud(LongRunning::Status, Duration::from_secs(3600), 0).await;
    let url = format!("{}/cvms", cloud.uri());

    let run = scratch
        .run(&[
            "post",
            &url,
            "--json",
            "{}",
            "--wait-for",
            "status=running",
            "--wait-timeout",
            "1.5",
            "--journal",
            &scratch.journal(),
        ])
        .await;

    assert_eq!(run.code(), 3, "{run:?}");
    assert!(run.stderr().contains("not ready after"), "{run:?}");
    let id = &cloud.resources("cvms")[0].id;
    for pending in [false, true] {
        let flags: &[&str] = if pending { &["--pending"] } else { &[] };
        let list = scratch.run(&[&["journal", "list", "--journal", &scratch.journal()][..], flags].concat()).await;
        assert_eq!(list.code(), 0, "{list:?}");
        let line = list.stdout().lines().find(|l| l.starts_with("waiting")).map(str::to_owned);
        assert!(line.is_some_and(|l| l.contains(&format!("(waiting at resource {url}/{id})"))), "{list:?}");
    }
}

/// The issue's test: SIGKILL while the run waits for its resource, re-run: one resource, and the
/// wait completes.
#[allow(clippy::disallowed_methods)] // the CLI is a real process on the real clock
#[tokio::test]
async fn a_run_killed_during_its_wait_is_resumed_and_creates_nothing_more() {
    let scratch = Scratch::new("kill-wait");
    let cloud = provisioning_cloud(LongRunning::Status, Duration::from_secs(3), 0).await;
    let url = format!("{}/cvms", cloud.uri());
    let args = [
        "post",
        &url,
        "--json",
        r#"{"name":"web-1"}"#,
        "--wait-for",
        "status=running",
        "--journal",
        &scratch.journal(),
    ];

    let mut child = scratch.command(&args).spawn().unwrap();
    // Killed once it waits: the create answered, and a poll of the resource went out.
    let started = Instant::now();
    while !cloud.requests().iter().any(|r| r.method == "GET") {
        assert!(started.elapsed() < Duration::from_secs(30), "it never polled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().await.unwrap(); // SIGKILL
    assert!(!child.wait().await.unwrap().success());
    assert_eq!(cloud.resources("cvms")[0].status, "starting", "killed before the resource was ready");

    let again = scratch.run(&args).await;

    assert_eq!(again.code(), 0, "{again:?}");
    assert!(again.stderr().contains("resuming its wait"), "{again:?}");
    let body: Value = serde_json::from_str(&again.stdout()).unwrap();
    assert_eq!(body["status"], "running", "{again:?}");
    assert_eq!((cloud.created(), cloud.keys_seen().len()), (1, 1), "one resource, one POST");
}

#[tokio::test]
async fn ensure_count_waits_until_every_item_is_ready() {
    let scratch = Scratch::new("ensure-wait");
    let cloud = provisioning_cloud(LongRunning::Status, Duration::from_millis(1500), 0).await;
    let url = format!("{}/{}", cloud.uri(), replicas("app-1", "vm-1"));

    let run = scratch
        .run(&[
            "ensure-count",
            &url,
            "--count",
            "3",
            "--wait-for",
            "status=running",
            "--output",
            "json",
            "--journal",
            &scratch.journal(),
        ])
        .await;

    assert_eq!(run.code(), 0, "{run:?}");
    let report = run.json();
    assert_eq!((report["ready"].as_u64(), report["converged"].as_bool()), (Some(3), Some(true)), "{report}");
    assert_eq!(cloud.created(), 3);
}

/// The exit codes are told twice, in `idem --help` and in docs/cli.md's table: the two say the
/// same, word for word, so they cannot drift apart.
#[tokio::test]
async fn the_exit_codes_in_the_help_are_the_docs_table() {
    let normal = |text: &str| text.replace('`', "").split_whitespace().collect::<Vec<_>>().join(" ");
    let scratch = Scratch::new("help-exit-codes");
    let help = scratch.run(&["--help"]).await.stdout();
    let listed = help.split("Exit codes:").nth(1).unwrap_or_else(|| panic!("no exit codes in the help: {help}"));
    let mut in_help = std::collections::BTreeMap::new();
    let mut current = None;
    for line in listed.lines() {
        let trimmed = line.trim_start();
        match trimmed.split_once("  ") {
            Some((code, text)) if code.len() == 1 && code.chars().all(|c| c.is_ascii_digit()) => {
                current = Some(code.to_owned());
                in_help.insert(code.to_owned(), text.to_owned());
            }
            _ if !trimmed.is_empty() && line.starts_with("     ") => {
                let code = current.clone().expect("a continuation follows a code");
                let text = in_help.get_mut(&code).unwrap();
                text.push(' ');
                text.push_str(trimmed);
            }
            _ => current = None,
        }
    }
    let docs = include_str!("../../../docs/cli.md");
    let in_docs: std::collections::BTreeMap<String, String> = docs
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.strip_prefix("| ")?.strip_suffix(" |")?.split(" | ").collect();
            match cells.as_slice() {
                [code, text] if code.len() == 1 && code.chars().all(|c| c.is_ascii_digit()) => {
                    Some((code.to_string(), text.to_string()))
                }
                _ => None,
            }
        })
        .collect();
    assert_eq!(in_help.keys().collect::<Vec<_>>(), ["0", "1", "2", "3"], "{help}");
    for (code, text) in &in_help {
        assert_eq!(normal(text), normal(&in_docs[code]), "exit {code}");
    }
}

/// A PostgreSQL journal URL asking for a check it cannot make (`verify-full` without roots,
/// roots that are not there) is refused before anything connects or is sent: exit 2, saying
/// what to add, and never the password.
#[tokio::test]
async fn a_journal_url_with_tls_it_cannot_check_is_a_usage_error() {
    let scratch = Scratch::new("pg-tls");
    let cloud = cloud(ServerProfile::stripe()).await;
    let url = format!("{}/cvms", cloud.uri());
    for (journal, says) in [
        ("postgres://ci:s3cret@127.0.0.1:9/db?sslmode=verify-full", "sslrootcert"),
        (
            "postgres://ci:s3cret@127.0.0.1:9/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
            "/nonexistent/ca.pem",
        ),
        ("postgres://ci:s3cret@127.0.0.1:9/db?sslcert=/c.pem", "client certificates"),
    ] {
        let run = scratch.run(&["post", &url, "--json", "{}", "--journal", journal]).await;
        assert_eq!(run.code(), 2, "{journal}: {run:?}");
        assert!(run.stderr().contains(says), "{journal}: {run:?}");
        assert!(!run.stderr().contains("s3cret") && !run.stdout().contains("s3cret"), "{journal}: {run:?}");
    }
    assert!(cloud.requests().is_empty(), "nothing was sent");
}
