//! The second hostile round (issue 17), through the `idem` binary: redirects of writes, what a
//! run says when its answer may be a replay, one JSON object whatever happens, keys the user
//! gives twice or in the body, derived keys, servers that show no sign of reading the key,
//! paginated lists and counts too large to plan.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use idempotent_retry::testing::{ChaosProxy, FakeCloud, Fault, PageStyle, Schedule, ServerProfile, replicas};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::{Scratch, cloud};

/// A server whose `POST /cvms` creates `c-N` and answers `303 See Other` to `/cvms/c-N`, whose
/// `GET` of it lags: 404 for ever (the item is made; its read is not there yet). A key it has
/// seen is answered with the same 303, creating nothing.
struct SeeOther {
    created: Arc<Mutex<Vec<Option<String>>>>,
}

impl Respond for SeeOther {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let key = request.headers.get("idempotency-key").map(|v| v.to_str().unwrap().to_owned());
        let mut created = self.created.lock().unwrap();
        let n = match created.iter().position(|k| key.is_some() && *k == key) {
            Some(earlier) => earlier + 1,
            None => {
                created.push(key);
                created.len()
            }
        };
        ResponseTemplate::new(303).insert_header("location", format!("/cvms/c-{n}"))
    }
}

async fn see_other_server() -> (MockServer, Arc<Mutex<Vec<Option<String>>>>) {
    let server = MockServer::start().await;
    let created = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .and(path("/cvms"))
        .respond_with(SeeOther { created: created.clone() })
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path_regex("^/cvms/c-[0-9]+$"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    (server, created)
}

/// Defect 1: reqwest followed the `303` with a `GET`, the layer took the GET's 404 for the
/// POST's answer, and the journal said `not_applied`: a re-run was free to send again. A 303
/// is the write's own answer (applied, see there): created, and journaled as succeeded; a key
/// that must not be sent twice is not.
#[tokio::test]
async fn a_303_after_commit_is_a_create_never_not_applied() {
    let (server, created) = see_other_server().await;
    let url = format!("{}/cvms", server.uri());
    for flags in [&["--no-idempotency-key"][..], &[][..], &["--derive-key", "web-1"][..]] {
        let scratch =
            Scratch::new(&format!("see-other-{}", flags.first().unwrap_or(&"random").trim_start_matches('-')));
        let journal = scratch.journal();
        let args =
            [&["post", &url, "--json", r#"{"name":"web-1"}"#, "--output", "json", "--journal", &journal][..], flags]
                .concat();
        let before = created.lock().unwrap().len();

        let run = scratch.run(&args).await;

        assert_eq!(run.code(), 0, "{flags:?}: {run:?}");
        let out = run.json();
        assert_eq!((out["outcome"].as_str(), out["status"].as_u64()), (Some("created"), Some(303)), "{flags:?}: {out}");
        assert_eq!(created.lock().unwrap().len(), before + 1, "{flags:?}: one POST");
        let list = scratch.run(&["journal", "list", "--output", "json", "--journal", &journal]).await.json();
        assert_eq!(list[0]["state"], "succeeded", "{flags:?}: {list}");
        assert_eq!(list[0]["status"], 303, "{flags:?}: {list}");
        if flags.contains(&"--derive-key") {
            let again = scratch.run(&args).await;
            assert_eq!(again.code(), 0, "{again:?}");
            assert_eq!(created.lock().unwrap().len(), before + 1, "a derived key that succeeded is not created again");
        }
    }
}

/// A server that answers every write with `status` and `Location: location`, counting them.
async fn redirecting(status: u16, location: String) -> (MockServer, Arc<AtomicUsize>) {
    struct Redirect(u16, String, Arc<AtomicUsize>);
    impl Respond for Redirect {
        fn respond(&self, _: &Request) -> ResponseTemplate {
            self.2.fetch_add(1, Ordering::SeqCst);
            ResponseTemplate::new(self.0).insert_header("location", self.1.as_str())
        }
    }
    let server = MockServer::start().await;
    let seen = Arc::new(AtomicUsize::new(0));
    Mock::given(method("POST"))
        .and(path("/old"))
        .respond_with(Redirect(status, location, seen.clone()))
        .mount(&server)
        .await;
    (server, seen)
}

/// Defect 5: a 307 to another origin took the POST there, key and body included, and idem said
/// `created`, exit 0, with origin A journaled. A write never goes to an origin other than the
/// journaled one; a same-origin 307 or 308 is sent again with the same key and body.
#[tokio::test]
async fn a_write_is_never_sent_to_another_origin_and_a_same_origin_redirect_keeps_its_key() {
    let other = FakeCloud::start(ServerProfile::stripe()).await;
    for status in [307, 308, 301, 302] {
        let (a, seen) = redirecting(status, format!("{}/cvms", other.uri())).await;
        let scratch = Scratch::new(&format!("cross-origin-{status}"));
        let url = format!("{}/old", a.uri());

        let run = scratch
            .run(&["post", &url, "--json", r#"{"name":"x"}"#, "--output", "json", "--journal", &scratch.journal()])
            .await;

        assert_eq!(run.code(), 3, "{status}: {run:?}");
        assert_eq!(other.requests().len(), 0, "{status}: the other origin received nothing");
        assert_eq!(seen.load(Ordering::SeqCst), 1, "{status}: not sent again to A either");
        assert_eq!(run.json()["outcome"], "unknown", "{status}: never `created`, never `not applied`: {run:?}");
        assert!(run.stderr().contains("another origin"), "{status}: {run:?}");
        let list = scratch.run(&["journal", "list", "--output", "json", "--journal", &scratch.journal()]).await.json();
        assert_ne!(list[0]["state"], "not_applied", "{status}: {list}");
    }

    // Same origin: sent again, with the same key and body, as a second attempt.
    let (a, seen) = redirecting(307, "/cvms".into()).await;
    let received = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST")).and(path("/cvms")).respond_with(Echo(received.clone())).mount(&a).await;
    let scratch = Scratch::new("same-origin");
    let run = scratch
        .run(&["post", &format!("{}/old", a.uri()), "--json", r#"{"name":"y"}"#, "--output", "json", "--no-journal"])
        .await;
    assert_eq!(run.code(), 0, "{run:?}");
    let out = run.json();
    assert_eq!((out["outcome"].as_str(), out["attempts"].as_u64()), (Some("created"), Some(2)), "{out}");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    let received = received.lock().unwrap();
    assert_eq!(received.len(), 1, "one create");
    assert_eq!(received[0].0.as_deref(), out["idempotency_key"].as_str(), "the same key, on the redirected attempt");
    assert_eq!(received[0].1, r#"{"name":"y"}"#, "and the same body");
}

/// The key and the body of each create a server received.
type Received = Arc<Mutex<Vec<(Option<String>, String)>>>;

/// Answers a create with 201 and its body, keeping the key and body it received.
struct Echo(Received);

impl Respond for Echo {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let key = request.headers.get("idempotency-key").map(|v| v.to_str().unwrap().to_owned());
        let body = String::from_utf8_lossy(&request.body).into_owned();
        self.0.lock().unwrap().push((key, body.clone()));
        ResponseTemplate::new(201).set_body_raw(body, "application/json")
    }
}

/// Defect 7: a keyless run of unknown outcome said, on one line, that re-running it resumes its
/// key, and on the next that re-running is NOT safe. Only a keyed run resumes.
#[tokio::test]
async fn a_keyless_unknown_outcome_never_says_it_resumes_a_key() {
    let (url, _) = super::stalling_server(201).await;
    let scratch = Scratch::new("keyless-gave-up");

    let run = scratch
        .run(&[
            "post",
            &url,
            "--json",
            "{}",
            "--no-idempotency-key",
            "--attempt-timeout",
            "0.1",
            "--journal",
            &scratch.journal(),
        ])
        .await;

    assert_eq!(run.code(), 3, "{run:?}");
    assert!(!run.stderr().contains("resumes its key"), "{run:?}");
    assert!(run.stderr().contains("NOT safe"), "{run:?}");
}

/// Defect 8: two key headers sent the first and dropped the second without a word; a key the
/// body already carries (bencher's field) was refused with a message about `RequestOptions`.
#[tokio::test]
async fn keys_given_twice_are_refused_and_a_key_in_the_body_is_the_users() {
    let cloud = cloud(ServerProfile::bencher()).await;
    let url = format!("{}/cvms", cloud.uri());
    let scratch = Scratch::new("two-keys");
    let two = scratch
        .run(&["post", &url, "--json", "{}", "-H", "Idempotency-Key: a", "-H", "Idempotency-Key: b", "--no-journal"])
        .await;
    assert_eq!(two.code(), 2, "{two:?}");
    let said = two.stderr().to_lowercase();
    assert!(said.contains("idempotency-key") && said.contains("twice"), "{two:?}");
    assert!(cloud.requests().is_empty(), "nothing sent");

    let key = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
    let body = format!(r#"{{"name":"run-1","idempotency_key":"{key}"}}"#);
    let args =
        ["post", &url, "--server", "bencher", "--json", &body, "--output", "json", "--journal", &scratch.journal()];
    let run = scratch.run(&args).await;
    assert_eq!(run.code(), 0, "{run:?}");
    assert!(!run.stderr().contains("RequestOptions"), "{run:?}");
    assert_eq!(run.json()["idempotency_key"], key, "the body's key is the key");
    assert_eq!(cloud.keys_seen(), [Some(key.to_owned())]);

    let twice = format!(r#"{{"idempotency_key":"{key}","idempotency_key":"{key}"}}"#);
    let run = scratch.run(&["post", &url, "--server", "bencher", "--json", &twice, "--no-journal"]).await;
    assert_eq!(run.code(), 2, "{run:?}");
    let other = scratch
        .run(&[
            "post",
            &url,
            "--server",
            "bencher",
            "--json",
            &body,
            "--idempotency-key",
            "0d1c5c6a-6f7c-4a8e-9f1e-2b3c4d5e6f70",
            "--no-journal",
        ])
        .await;
    assert_eq!(other.code(), 2, "the body's key and --idempotency-key differ: {other:?}");
    assert_eq!(cloud.requests().len(), 1, "nothing more was sent");
}

/// Defect 9: a run that resumed a journaled key, or sent it again after a lost answer, said
/// `"outcome":"created"` against a server that marks no replay. It says `resumed`: the answer
/// may be a replay of the first send.
#[tokio::test]
async fn an_answer_to_a_key_sent_before_may_be_a_replay_and_says_so() {
    let cloud = cloud(ServerProfile::bencher()).await;
    let proxy = ChaosProxy::start(cloud.address(), Schedule::script([Fault::Lose])).await;
    let url = format!("{}/cvms", proxy.uri());
    let scratch = Scratch::new("may-be-replay");
    let journal = scratch.journal();

    // A lost answer, then the same key again in the same run.
    let run = scratch
        .run(&[
            "post",
            &url,
            "--server",
            "bencher",
            "--json",
            r#"{"name":"a"}"#,
            "--output",
            "json",
            "--journal",
            &journal,
        ])
        .await;
    assert_eq!(run.code(), 0, "{run:?}");
    assert_eq!(
        (run.json()["outcome"].as_str(), run.json()["may_be_replay"].as_bool()),
        (Some("resumed"), Some(true)),
        "{run:?}"
    );
    assert!(run.stderr().contains("may be a replay of the first send"), "{run:?}");

    // A lost answer and no attempts left; the re-run resumes the journaled key.
    proxy.set_schedule(Schedule::script([Fault::Lose]));
    let args = [
        "post",
        &url,
        "--server",
        "bencher",
        "--json",
        r#"{"name":"b"}"#,
        "--max-attempts",
        "1",
        "--output",
        "json",
        "--journal",
        &journal,
    ];
    assert_eq!(scratch.run(&args).await.code(), 3);
    let again = scratch.run(&args).await;
    assert_eq!(again.code(), 0, "{again:?}");
    assert_eq!(again.json()["outcome"], "resumed", "{again:?}");
    assert!(again.stderr().contains("may be a replay of the first send"), "{again:?}");
    assert_eq!(cloud.created(), 2, "one report each");

    // A first send answered at once is a create.
    let fresh = scratch
        .run(&[
            "post",
            &url,
            "--server",
            "bencher",
            "--json",
            r#"{"name":"c"}"#,
            "--output",
            "json",
            "--journal",
            &journal,
        ])
        .await;
    assert_eq!(
        (fresh.json()["outcome"].as_str(), fresh.json()["may_be_replay"].as_bool()),
        (Some("created"), Some(false)),
        "{fresh:?}"
    );
}

/// Defect 10: with `--output json`, a key-reuse refusal (and every other usage error) printed
/// nothing on stdout. JSON mode prints one object, always.
#[tokio::test]
async fn json_mode_prints_one_object_whatever_happens() {
    let cloud = cloud(ServerProfile::stripe()).await;
    let url = format!("{}/cvms", cloud.uri());
    let scratch = Scratch::new("json-always");
    let journal = scratch.journal();
    let post = |body: &'static str| {
        ["post", &url, "--json", body, "--idempotency-key", "k-1", "--output", "json", "--journal", &journal]
    };
    assert_eq!(scratch.run(&post(r#"{"name":"a"}"#)).await.code(), 0);

    let refused = scratch.run(&post(r#"{"name":"b"}"#)).await;

    assert_eq!(refused.code(), 2, "{refused:?}");
    let out = refused.json();
    assert_eq!(out["outcome"], "not_sent", "{out}");
    assert!(out["error"].as_str().is_some_and(|e| e.contains("different payload")), "{out}");
    for args in [
        vec!["post", &url, "--json", "{not json", "--output", "json", "--no-journal"],
        vec!["post", "not a url", "--json", "{}", "--output", "json", "--no-journal"],
        vec!["post", &url, "-H", "no colon", "--output", "json", "--no-journal"],
        vec!["ensure-count", &url, "--count", "1", "--json", "[]", "--output", "json", "--no-journal"],
        vec!["journal", "list", "--output", "json", "--journal", "/nonexistent/journal.sqlite3"],
    ] {
        let run = scratch.run(&args).await;
        assert_eq!(run.code(), 2, "{args:?}: {run:?}");
        let out = run.json();
        assert!(out.is_object() && out["error"].is_string(), "{args:?}: {out}");
        assert_eq!(run.stdout().trim().lines().count(), 1, "{args:?}: one object: {run:?}");
    }
    assert_eq!(cloud.created(), 1);
}

/// Defect 11: `post` offered `--scope` and could not derive a key, so a CI re-run of the same
/// upload on another machine minted a new one. `--derive-key NAME` derives a UUID from the
/// scope and the name (the library's `derived_key`): the same on every machine.
#[tokio::test]
async fn a_derived_key_is_the_same_on_every_machine_and_is_a_uuid() {
    let cloud = cloud(ServerProfile::bencher()).await;
    let url = format!("{}/cvms", cloud.uri());
    let run_on = |machine: &'static str| {
        let url = url.clone();
        async move {
            let scratch = Scratch::new(machine);
            let args = [
                "post",
                &url,
                "--server",
                "bencher",
                "--json",
                r#"{"name":"main-abc123-x86"}"#,
                "--derive-key",
                "report/main/abc123/x86",
                "--scope",
                "project-7",
                "--output",
                "json",
                "--journal",
                &scratch.journal(),
            ];
            scratch.run(&args).await
        }
    };

    let first = run_on("machine-1").await;
    let second = run_on("machine-2").await;

    assert_eq!((first.code(), second.code()), (0, 0), "{first:?}\n{second:?}");
    let key = first.json()["idempotency_key"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&key).is_ok(), "{key}");
    assert_eq!(second.json()["idempotency_key"], key.as_str(), "the same key on both machines");
    assert_eq!(cloud.created(), 1, "the second machine's upload is the first's report");
    let ops = idempotent_retry::Operations::new(
        reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).build(),
        idempotent_retry::journal::MemoryStore::new(),
    )
    .scope("project-7");
    assert_eq!(key, ops.derived_key("report/main/abc123/x86", 1).as_str(), "the library's derived key");
    let help = Scratch::new("derive-help").run(&["post", "--help"]).await;
    assert!(help.stdout().contains("--derive-key") && help.stdout().contains("--scope"), "{help:?}");
}

/// Defect 12: with the key in a header the server ignores (bencher takes it in the body), every
/// create said `created` and nothing hinted that the key protected nothing. An answer with no
/// sign that the server read the key (no echo, no replay marker) is told once on stderr, unless
/// the user named the convention.
#[tokio::test]
async fn an_answer_with_no_sign_of_the_key_is_told_once() {
    let bencher = cloud(ServerProfile::bencher()).await;
    let scratch = Scratch::new("no-sign");
    let url = format!("{}/cvms", bencher.uri());
    let forgot = scratch.run(&["post", &url, "--json", r#"{"name":"a"}"#, "--no-journal"]).await;
    assert_eq!(forgot.code(), 0, "{forgot:?}");
    assert_eq!(forgot.stderr().matches("no sign").count(), 1, "{forgot:?}");
    assert!(forgot.stderr().contains("--server"), "says what to do: {forgot:?}");

    let told = scratch.run(&["post", &url, "--server", "bencher", "--json", r#"{"name":"b"}"#, "--no-journal"]).await;
    assert!(!told.stderr().contains("no sign"), "the user named the convention: {told:?}");
    // Stripe marks its replays: after a lost answer the replay is the sign.
    let stripe = cloud(ServerProfile::stripe()).await;
    let proxy = ChaosProxy::start(stripe.address(), Schedule::script([Fault::Lose])).await;
    let replayed = scratch.run(&["post", &format!("{}/cvms", proxy.uri()), "--json", "{}", "--no-journal"]).await;
    assert!(replayed.stderr().contains("replayed"), "{replayed:?}");
    assert!(!replayed.stderr().contains("no sign"), "a marked replay is a sign: {replayed:?}");
    // A server that echoes the key's header shows it read it.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201).insert_header("idempotency-key", "echo").set_body_string("{}"))
        .mount(&server)
        .await;
    let echoed = scratch.run(&["post", &server.uri(), "--json", "{}", "--no-journal"]).await;
    assert_eq!(echoed.code(), 0, "{echoed:?}");
    assert!(!echoed.stderr().contains("no sign"), "{echoed:?}");
}

/// Defect 2: `ensure-count` read only the first page of a paginated list: it never converged,
/// and each re-run created one more. Every page is read: `Link` headers, `next` URLs and
/// `next_page_token` cursors; a list that says there is more but cannot be followed is an
/// error, never a short count.
#[tokio::test]
async fn ensure_count_reads_every_page_and_reruns_create_nothing() {
    for style in [PageStyle::LinkHeader, PageStyle::NextUrl, PageStyle::PageToken] {
        let cloud = FakeCloud::builder(ServerProfile::stripe()).pagination(style, 2).start().await;
        let url = format!("{}/{}", cloud.uri(), replicas("app-1", "vm-1"));
        let scratch = Scratch::new(&format!("pages-{style:?}"));
        let args = [
            "ensure-count",
            &url,
            "--count",
            "5",
            "--deadline",
            "20",
            "--output",
            "json",
            "--journal",
            &scratch.journal(),
        ];

        let run = scratch.run(&args).await;
        assert_eq!(run.code(), 0, "{style:?}: {run:?}");
        assert_eq!(run.json()["after"], 5, "{style:?}");
        let again = scratch.run(&args).await;
        assert_eq!(again.code(), 0, "{style:?}: {again:?}");
        assert_eq!(cloud.created(), 5, "{style:?}: the re-run created nothing");
    }

    // A cursor under a field of the server's own naming, on a collection that holds 3 already.
    let cloud = FakeCloud::builder(ServerProfile::stripe())
        .pagination(PageStyle::Cursor { field: "continuation", param: "from" }, 2)
        .start()
        .await;
    let collection = replicas("app-1", "vm-1");
    for name in ["a", "b", "c"] {
        cloud.add_foreign(&collection, name, std::time::SystemTime::UNIX_EPOCH);
    }
    let url = format!("{}/{collection}", cloud.uri());
    let scratch = Scratch::new("pages-custom");
    let base =
        ["ensure-count", &url, "--count", "5", "--deadline", "20", "--output", "json", "--journal", &scratch.journal()];
    let blind = scratch.run(&base).await;
    assert_eq!(blind.code(), 3, "a list that may have more pages is never a short count: {blind:?}");
    assert!(blind.stderr().contains("continuation"), "names the field: {blind:?}");
    assert_eq!(cloud.created(), 0, "nothing was created from a short count");
    let told = scratch.run(&[&base[..], &["--next-field", "continuation=from"]].concat()).await;
    assert_eq!(told.code(), 0, "{told:?}");
    assert_eq!((cloud.created(), cloud.resources(&collection).len()), (2, 5));
}

/// Defect 6: `--count 1000000000` materialised every create up front and grew to gigabytes; a
/// count past `u32` wrapped its slot indices. A count above the documented maximum is a usage
/// error (exit 2), with nothing sent.
#[tokio::test]
async fn a_count_above_the_maximum_is_refused_before_anything_is_sent() {
    let cloud = cloud(ServerProfile::stripe()).await;
    let url = format!("{}/{}", cloud.uri(), replicas("app-1", "vm-1"));
    let scratch = Scratch::new("huge-count");
    for count in ["1000000000", "18446744073709551615", "4294967297"] {
        let run = scratch.run(&["ensure-count", &url, "--count", count, "--output", "json", "--no-journal"]).await;
        assert_eq!(run.code(), 2, "{count}: {run:?}");
        assert!(run.json()["error"].as_str().is_some_and(|e| e.contains("at most")), "{count}: {run:?}");
    }
    assert!(cloud.requests().is_empty(), "nothing sent");
}

/// The same command is one operation: once it succeeded, running it again (here, or with a
/// journal of the same machine) answers from the journal and sends nothing, keyless included.
#[tokio::test]
async fn the_same_command_after_a_success_sends_nothing() {
    let cloud = cloud(ServerProfile::stripe()).await;
    let url = format!("{}/cvms", cloud.uri());
    let scratch = Scratch::new("once");
    let journal = scratch.journal();
    for flags in [&[][..], &["--no-idempotency-key"][..]] {
        let body = format!(r#"{{"name":"once-{}"}}"#, flags.len());
        let args = [&["post", &url, "--json", &body, "--output", "json", "--journal", &journal][..], flags].concat();
        let first = scratch.run(&args).await;
        let again = scratch.run(&args).await;
        assert_eq!((first.code(), again.code()), (0, 0), "{first:?}\n{again:?}");
        assert_eq!(again.json()["outcome"], "recorded", "{again:?}");
        assert_eq!(again.json()["body"]["id"], first.json()["body"]["id"], "the journal's record of it");
        assert_eq!(cloud.created_named(&format!("once-{}", flags.len())), 1, "{flags:?}");
    }
}
