//! The fault scenarios of `shared/docs/scenarios.md` (1, 2, 3, 6, 7, 8, 11, 15, 16), each against
//! several server profiles, through the chaos proxy on real sockets. Every test asserts on what a
//! user cares about: resources created, keys sent, what the caller was told, delays requested.

use std::time::Duration;

use http::StatusCode;
use idempotent_retry::testing::{FakeCloud, Fault, InFlight, RetryAfter, Schedule, ServerProfile};
use idempotent_retry::{Error, IdempotencyKey, KeyError, RequestOptions, RetryOutcome};

use crate::support::*;

fn resource_id(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body).unwrap()["id"].as_str().unwrap().to_owned()
}

/// 1. Lost response after commit: the retry with the same key yields exactly one resource; the
/// outcome says "replayed" where the server marks it (Stripe's header, django's 409).
#[tokio::test]
async fn s01_lost_response_after_commit() {
    for profile in ServerProfile::keyed() {
        let rig = Rig::new(profile.clone(), Schedule::script([Fault::Lose])).await;

        let response = rig.create("web-1").await.unwrap_or_else(|e| panic!("{}: {e}", profile.name));

        let outcome = RetryOutcome::of(&response).unwrap().clone();
        let marked = matches!(profile.name, "stripe" | "django");
        assert_eq!(outcome.replayed, marked, "{}", profile.name);
        let want_status = if profile.name == "django" { StatusCode::CONFLICT } else { StatusCode::CREATED };
        assert_eq!(response.status(), want_status, "{}", profile.name);
        let body = response.bytes().await.unwrap();
        assert_eq!(rig.cloud.created_named("web-1"), 1, "{}", profile.name);
        assert_eq!(resource_id(&body), rig.cloud.resources("cvms")[0].id, "{}: the original resource", profile.name);
        assert_eq!(rig.attempts(), 2, "{}", profile.name);
        let keys = rig.one_key_per_name();
        assert!(keys["web-1"].is_some(), "{}", profile.name);
        assert_eq!(rig.cloud.handler_runs(), 1, "{}: the retry did not run the handler again", profile.name);
    }
}

/// 2. First request still running: retries meet 409, 423, 429 or 503 until it finishes; same
/// key throughout, backoff between, the original result, one resource.
#[tokio::test]
async fn s02_first_request_still_running() {
    let processing = Duration::from_secs(1);
    let brandur_429 = {
        let mut p = ServerProfile::brandur();
        p.in_flight = InFlight::Status429;
        p
    };
    let bencher_busy = {
        let mut p = ServerProfile::bencher();
        p.in_flight = InFlight::Status503;
        p
    };
    // django has no in-flight guard; its 423 is what it answers when its store lookup's lock
    // times out, which this variant makes of every request during the first one.
    let django_locked = {
        let mut p = ServerProfile::django();
        p.in_flight = InFlight::Status423;
        p
    };
    let profiles = [
        ServerProfile::ietf(),
        ServerProfile::stripe(),
        django_locked,
        ServerProfile::express(),
        brandur_429,
        bencher_busy,
    ];
    for profile in profiles {
        let policy = fast_policy().with_max_attempts(10);
        let rig =
            Rig::with_policy(profile.clone().with_processing(processing), Schedule::script([Fault::Lose]), policy)
                .await;

        let response = rig.create("web-1").await.unwrap_or_else(|e| panic!("{}: {e}", profile.name));

        let name = profile.name;
        // The original result: 201, or django's replay of it under 409.
        let want = if name == "django" { StatusCode::CONFLICT } else { StatusCode::CREATED };
        assert_eq!(response.status(), want, "{name}");
        let body = response.bytes().await.unwrap();
        assert_eq!(resource_id(&body), rig.cloud.resources("cvms")[0].id, "{name}: the original result");
        assert_eq!(rig.cloud.created(), 1, "{name}");
        rig.one_key_per_name();
        let in_flight: Vec<u16> =
            rig.cloud.requests().iter().map(|r| r.status).filter(|s| !matches!(s, 200..=299)).collect();
        let want = match profile.in_flight {
            InFlight::Status409 => 409,
            InFlight::Status423 => 423,
            InFlight::Status429 => 429,
            InFlight::Status503 => 503,
            _ => unreachable!(),
        };
        // django's final replay is a 409 too; the in-flight answers come before it.
        assert!(in_flight.iter().filter(|s| **s == want).count() >= 2, "{name}: {in_flight:?}");
        let delays = rig.time.delays();
        assert!(delays.windows(2).all(|w| w[1] > w[0]), "{name}: backoff grows: {delays:?}");
        assert!(rig.time.sleeper.total() >= processing, "{name}: waited the processing out");
    }
}

/// django-idempotency-key runs a request that arrives while the first one with its key is still
/// running (its lock covers only the store lookup): a retry inside that window makes a second
/// resource, whatever the client does. This pins the hazard the `django` presets document: its
/// endpoints want attempt timeouts longer than they take.
#[tokio::test]
async fn s02_django_runs_a_retry_during_the_first_request_again() {
    let profile = ServerProfile::django().with_processing(Duration::from_secs(1));
    let rig = Rig::new(profile, Schedule::script([Fault::Lose])).await;

    let response = rig.create("web-1").await.unwrap();

    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(rig.cloud.created_named("web-1"), 2, "the server ran the retry again");
    rig.one_key_per_name();
}

/// 3. An endpoint that takes no key + a lost response: no blind resend; the outcome is unknown
/// until a read-back settles it, and with read-back the count never exceeds the desired one.
#[tokio::test]
async fn s03_keyless_endpoint_lost_response() {
    for (profile, keyless_client) in [
        (ServerProfile::no_keys(), false),
        (ServerProfile::ietf(), true),
        (ServerProfile::stripe(), true),
        (ServerProfile::express(), true),
    ] {
        let name = profile.name;
        for (fault, applied) in [(Fault::Lose, true), (Fault::Reset, false)] {
            let rig = Rig::new(profile.clone(), Schedule::script([fault])).await;

            let result = if keyless_client { rig.create_keyless("web-1").await } else { rig.create("web-1").await };

            let err = result.expect_err(name);
            let err = Error::find(&err).expect("typed error");
            assert!(err.is_outcome_unknown(), "{name}: {err}");
            assert!(err.may_have_been_applied(), "{name}");
            assert_eq!(rig.attempts(), 1, "{name}: never resent blind");
            assert!(
                rig.proxy.records().iter().all(|r| r.headers.get("idempotency-key").is_none()),
                "{name}: no key sent"
            );
            assert_eq!(rig.cloud.created(), usize::from(applied), "{name} {fault:?}");

            // Read back: list and look for the name, then create only if it is missing.
            let list: serde_json::Value = rig.client.get(rig.cvms()).send().await.unwrap().json().await.unwrap();
            let found = list["items"].as_array().unwrap().iter().any(|i| i["name"] == "web-1");
            assert_eq!(found, applied, "{name} {fault:?}");
            if !found {
                rig.create_keyless("web-1").await.unwrap();
            }
            assert_eq!(rig.cloud.created_named("web-1"), 1, "{name} {fault:?}: settled, never more than desired");
        }
    }
}

/// 3, the hazard: a key sent to an endpoint that ignores keys protects nothing. A client told
/// the endpoint is keyed resends after a lost response and the server creates twice. This is why
/// `ServerProfile::configure` (and any real configuration) must send no key to such endpoints.
#[tokio::test]
async fn s03_a_key_the_server_ignores_does_not_protect() {
    let time = Time::new();
    let cloud = FakeCloud::builder(ServerProfile::no_keys()).clock(time.clock.clone()).start().await;
    let proxy = idempotent_retry::testing::ChaosProxy::start(cloud.address(), Schedule::script([Fault::Lose])).await;
    let misconfigured = client(time.layer().policy(fast_policy()));

    let response = misconfigured
        .post(format!("{}/cvms", proxy.uri()))
        .json(&serde_json::json!({"name": "web-1"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(cloud.created_named("web-1"), 2, "the duplicate a keyless endpoint makes of a keyed retry");
    let keys: Vec<_> = proxy.records().iter().map(|r| r.headers.get("idempotency-key").cloned()).collect();
    assert!(keys.len() == 2 && keys[0].is_some() && keys[0] == keys[1], "one key, sent twice, ignored: {keys:?}");
}

/// 6. Same key, another payload: the server's refusal (422, 417, 409 with mismatch text, 400
/// `idempotency_error`) is a typed error, not a retry.
#[tokio::test]
async fn s06_same_key_other_payload_is_refused() {
    let key = IdempotencyKey::new("deploy-2f6c9a1b3d5e7f90").unwrap();
    for (profile, status) in [
        (ServerProfile::ietf(), 422),
        (ServerProfile::express(), 417),
        (ServerProfile::brandur(), 409),
        (ServerProfile::stripe(), 400),
    ] {
        let rig = Rig::new(profile.clone(), Schedule::pass()).await;
        let send = |name: &'static str| {
            rig.client
                .post(rig.cvms())
                .json(&serde_json::json!({ "name": name }))
                .with_extension(RequestOptions::new().key(key.clone()))
                .send()
        };
        send("web-1").await.unwrap();

        let err = send("web-2").await.expect_err(profile.name);

        let err = Error::find(&err).unwrap();
        assert!(err.is_key_reuse(), "{}: {err}", profile.name);
        assert_eq!(err.status().map(|s| s.as_u16()), Some(status), "{}", profile.name);
        assert_eq!(err.attempts(), 1, "{}: not retried", profile.name);
        assert_eq!(rig.attempts(), 2, "{}", profile.name);
        assert_eq!(rig.cloud.created(), 1, "{}", profile.name);
        assert_eq!(rig.cloud.created_named("web-2"), 0, "{}", profile.name);
        let keys = rig.one_key_per_name();
        assert!(keys.values().all(|k| k.as_deref() == Some(key.as_str())), "{}: {keys:?}", profile.name);
    }
}

/// 6, continued: what servers that do not check the payload do, so provider authors know. The
/// client cannot tell; pinning the payload per key (the journal) is the defence.
#[tokio::test]
async fn s06_servers_that_do_not_check_the_payload() {
    let key = IdempotencyKey::new("8d3c1f0e-6a3b-4c53-9f5e-2a1b3c4d5e6f").unwrap();
    for (profile, created_web2) in
        [(ServerProfile::django(), 1), (ServerProfile::bencher(), 0), (ServerProfile::tower(), 0)]
    {
        let rig = Rig::new(profile.clone(), Schedule::pass()).await;
        for name in ["web-1", "web-2"] {
            let options = RequestOptions::new().key(key.clone());
            rig.client
                .post(rig.cvms())
                .json(&serde_json::json!({ "name": name }))
                .with_extension(options)
                .send()
                .await
                .unwrap();
        }
        // django hashes the body into its key: another payload is another request. bencher and
        // tower hand back the first object under the second request's name.
        assert_eq!(rig.cloud.created_named("web-2"), created_web2, "{}", profile.name);
        assert_eq!(rig.cloud.created_named("web-1"), 1, "{}", profile.name);
        assert!(rig.cloud.keys_seen().iter().all(|k| k.as_deref() == Some(key.as_str())), "{}", profile.name);
    }
}

/// 7. A cached 5xx replayed: once the server marks it, stop. Uncached: the retry re-executes and
/// still yields one resource.
#[tokio::test]
async fn s07_cached_and_uncached_server_errors() {
    // Stripe caches the 500 and marks the replay: the client stops on the second answer.
    let rig = Rig::new(ServerProfile::stripe(), Schedule::pass()).await;
    rig.cloud.fail_next_creates(1, StatusCode::INTERNAL_SERVER_ERROR);
    let err = rig.create("web-1").await.unwrap_err();
    let err = Error::find(&err).unwrap();
    assert!(matches!(err, Error::ReplayedFailure(_)), "{err}");
    assert!(err.may_have_been_applied());
    assert_eq!(rig.attempts(), 2);
    assert_eq!(rig.cloud.handler_runs(), 1);
    assert_eq!(rig.cloud.created(), 0);
    assert_eq!(rig.one_key_per_name()["web-1"].as_ref(), err.idempotency_key().map(|k| k.to_string()).as_ref());

    // The IETF draft caches it without a marker: the client cannot know, retries run out, and
    // the handler never runs twice.
    let rig = Rig::new(ServerProfile::ietf(), Schedule::pass()).await;
    rig.cloud.fail_next_creates(1, StatusCode::INTERNAL_SERVER_ERROR);
    let err = rig.create("web-1").await.unwrap_err();
    assert!(matches!(Error::find(&err), Some(Error::AttemptsExhausted(_))), "{err}");
    assert_eq!(rig.cloud.handler_runs(), 1);
    assert_eq!(rig.cloud.created(), 0);
    rig.one_key_per_name();

    // Servers that keep only successes run the retry again: one resource.
    for profile in
        [ServerProfile::express(), ServerProfile::django(), ServerProfile::bencher(), ServerProfile::brandur()]
    {
        let rig = Rig::new(profile.clone(), Schedule::pass()).await;
        rig.cloud.fail_next_creates(1, StatusCode::INTERNAL_SERVER_ERROR);

        let response = rig.create("web-1").await.unwrap_or_else(|e| panic!("{}: {e}", profile.name));

        assert_eq!(response.status(), StatusCode::CREATED, "{}", profile.name);
        assert_eq!(rig.cloud.handler_runs(), 2, "{}", profile.name);
        assert_eq!(rig.cloud.created(), 1, "{}", profile.name);
        rig.one_key_per_name();
    }
}

/// 8. The ambiguous 409, told apart by body and headers: in flight (retry), mismatch (key
/// reuse), replay (django: success, replayed), domain conflict (final).
#[tokio::test]
async fn s08_ambiguous_conflict() {
    // In flight: retried until the first request finishes.
    for profile in [ServerProfile::ietf(), ServerProfile::stripe(), ServerProfile::brandur(), ServerProfile::express()]
    {
        let rig = Rig::with_policy(
            profile.clone().with_processing(Duration::from_millis(500)),
            Schedule::script([Fault::Lose]),
            fast_policy().with_max_attempts(10),
        )
        .await;
        let response = rig.create("web-1").await.unwrap_or_else(|e| panic!("{}: {e}", profile.name));
        assert_eq!(response.status(), StatusCode::CREATED, "{}", profile.name);
        assert!(rig.cloud.requests().iter().any(|r| r.status == 409), "{}", profile.name);
        assert_eq!(rig.cloud.created(), 1, "{}", profile.name);
        rig.one_key_per_name();
    }

    // Mismatch: brandur's 409 says so.
    let rig = Rig::new(ServerProfile::brandur(), Schedule::pass()).await;
    let key = IdempotencyKey::new("a-key-of-twenty-or-more-chars").unwrap();
    for (name, reused) in [("web-1", false), ("web-2", true)] {
        let options = RequestOptions::new().key(key.clone());
        let result =
            rig.client.post(rig.cvms()).json(&serde_json::json!({ "name": name })).with_extension(options).send().await;
        assert_eq!(result.as_ref().err().and_then(Error::find).is_some_and(Error::is_key_reuse), reused, "{name}");
    }
    assert_eq!((rig.attempts(), rig.cloud.created()), (2, 1));
    assert!(rig.cloud.keys_seen().iter().all(|k| k.as_deref() == Some(key.as_str())));

    // Replay: django's 409 carries the original object.
    let rig = Rig::new(ServerProfile::django(), Schedule::script([Fault::Lose])).await;
    let response = rig.create("web-1").await.unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert!(RetryOutcome::of(&response).unwrap().replayed);
    assert_eq!(resource_id(&response.bytes().await.unwrap()), rig.cloud.resources("cvms")[0].id);
    assert_eq!(rig.cloud.created(), 1);
    assert!(rig.one_key_per_name()["web-1"].is_some());

    // Domain conflict: the name is taken. Final at once, on every profile.
    for profile in [ServerProfile::ietf(), ServerProfile::stripe(), ServerProfile::express(), ServerProfile::tower()] {
        let time = Time::new();
        let cloud = FakeCloud::builder(profile.clone()).clock(time.clock.clone()).unique_names().start().await;
        let client = client(profile.configure(time.layer().policy(fast_policy())));
        let url = format!("{}/cvms", cloud.uri());
        client.post(&url).json(&serde_json::json!({"name": "web-1"})).send().await.unwrap();

        let response = client.post(&url).json(&serde_json::json!({"name": "web-1"})).send().await.unwrap();

        assert_eq!(response.status(), StatusCode::CONFLICT, "{}", profile.name);
        assert_eq!(RetryOutcome::of(&response).unwrap().attempts, 1, "{}: not retried", profile.name);
        assert!(response.text().await.unwrap().contains("already exists"));
        assert_eq!(cloud.created(), 1, "{}", profile.name);
        let keys = cloud.keys_seen();
        assert!(
            keys.len() == 2 && keys[0].is_some() && keys[1].is_some() && keys[0] != keys[1],
            "{}: two operations, two keys",
            profile.name
        );
    }
}

/// 11. 429 and 503 with `Retry-After` in seconds and as an HTTP-date: waits at least that long,
/// never past the deadline; one that cannot fit fails at once with the hint.
#[tokio::test]
async fn s11_retry_after_is_honoured_within_the_deadline() {
    for profile in [ServerProfile::ietf(), ServerProfile::stripe(), ServerProfile::django(), ServerProfile::bencher()] {
        let name = profile.name;
        let schedule = Schedule::script([
            Fault::unavailable(RetryAfter::Seconds(3)),
            Fault::throttled(RetryAfter::DateIn(Duration::from_secs(5))),
        ]);
        let deadline = Duration::from_secs(20);
        let rig = Rig::with_policy(profile.clone(), schedule, fast_policy().with_deadline(deadline)).await;

        let response = rig.create("web-1").await.unwrap_or_else(|e| panic!("{name}: {e}"));

        assert_eq!(response.status(), StatusCode::CREATED, "{name}");
        assert_eq!(rig.time.delays(), [Duration::from_secs(3), Duration::from_secs(5)], "{name}");
        assert!(rig.time.sleeper.total() < deadline);
        assert_eq!(rig.cloud.created(), 1, "{name}");
        rig.one_key_per_name();

        // A wait that cannot fit: fail now, with the server's hint, having slept not at all.
        let schedule = Schedule::script([Fault::unavailable(RetryAfter::DateIn(Duration::from_secs(120)))]);
        let policy =
            fast_policy().with_deadline(Duration::from_secs(60)).with_max_retry_after(Duration::from_secs(300));
        let rig = Rig::with_policy(profile.clone(), schedule, policy).await;

        let err = rig.create("web-1").await.unwrap_err();

        let err = Error::find(&err).unwrap();
        assert!(matches!(err, Error::DeadlineExceeded(_)), "{name}: {err}");
        assert_eq!(err.retry_after(), Some(Duration::from_secs(120)), "{name}");
        assert!(rig.time.delays().is_empty(), "{name}");
        assert_eq!((rig.attempts(), rig.cloud.created()), (1, 0), "{name}");
    }
}

/// 15. Bad keys (CR/LF, non-ASCII, too long for the profile, empty) are refused before anything
/// is sent.
#[tokio::test]
async fn s15_bad_keys_are_refused_before_sending() {
    assert_eq!(
        IdempotencyKey::new("ab\r\nInjected: 1").unwrap_err(),
        KeyError::InvalidByte { position: 2, byte: b'\r' }
    );
    for profile in [
        ServerProfile::ietf(),
        ServerProfile::stripe(),
        ServerProfile::brandur(),
        ServerProfile::bencher(),
        ServerProfile::tower(),
    ] {
        let name = profile.name;
        let rig = Rig::new(profile.clone(), Schedule::pass()).await;
        let too_long = IdempotencyKey::with_max_len("k".repeat(profile.format.max_len + 1), usize::MAX).unwrap();

        let err = rig
            .client
            .post(rig.cvms())
            .json(&serde_json::json!({"name": "web-1"}))
            .with_extension(RequestOptions::new().key(too_long))
            .send()
            .await
            .unwrap_err();
        assert!(matches!(Error::find(&err), Some(Error::InvalidKey(KeyError::TooLong { .. }))), "{name}: {err}");

        // Set by hand where the server looks for it: non-ASCII, empty, CR/LF (a body field can
        // hold CR/LF; a header cannot).
        let bad_values: [&str; 3] = ["clé", "", "a\r\nb"];
        for bad in bad_values {
            let request = rig.client.post(rig.cvms());
            let request = match profile.carrier().unwrap().header_name() {
                Some(header) if !bad.contains('\r') => {
                    request.header(header, reqwest::header::HeaderValue::from_bytes(bad.as_bytes()).unwrap()).body("{}")
                }
                Some(_) => continue,
                None => request.json(&serde_json::json!({"name": "web-1", "idempotency_key": bad})),
            };
            let err = request.send().await.unwrap_err();
            assert!(matches!(Error::find(&err), Some(Error::InvalidKey(_))), "{name} {bad:?}: {err}");
        }
        assert_eq!(rig.proxy.requests(), 0, "{name}: nothing was sent");
        assert_eq!(rig.cloud.created(), 0, "{name}");
    }
}

/// 16. A sustained outage (every request 503): the retry budget stops the amplification, and
/// callers get a clear error.
#[tokio::test]
async fn s16_sustained_outage_is_not_amplified() {
    const OPS: usize = 150;
    for profile in [ServerProfile::ietf(), ServerProfile::stripe(), ServerProfile::django(), ServerProfile::bencher()] {
        let name = profile.name;
        let outage = Schedule::always(Fault::Status { status: 503, retry_after: None });
        let rig = Rig::with_policy(profile.clone(), outage, fast_policy().without_deadline()).await;

        let mut last = None;
        for i in 0..OPS {
            let err = rig.create(&format!("web-{i}")).await.unwrap_err();
            last = Some(Error::from_middleware(err).unwrap());
        }

        let bound = OPS + 500 / 5;
        assert!(rig.attempts() <= bound, "{name}: {} requests for {OPS} operations", rig.attempts());
        let last = last.unwrap();
        assert!(matches!(last, Error::BudgetExhausted(_)), "{name}: {last}");
        assert!(last.to_string().contains("retry budget exhausted"), "{last}");
        assert!(last.is_retryable() && last.may_have_been_applied());
        assert_eq!(rig.cloud.created(), 0, "{name}");
        rig.one_key_per_name();
    }
}
