//! The fixtures themselves: routes, list lag, deletes, counters, and the proxy's faults as a
//! client sees them.

use http::StatusCode;
use idempotent_retry::testing::{ChaosProxy, FakeCloud, Fault, RetryAfter, Schedule, ServerProfile, replicas};
use idempotent_retry::time::{Clock, ManualClock};
use serde_json::{Value, json};

async fn list(client: &reqwest::Client, url: &str) -> Vec<String> {
    let body: Value = client.get(url).send().await.unwrap().json().await.unwrap();
    body["items"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn cvms_and_replicas_with_list_lag_and_deletes() {
    let cloud = FakeCloud::builder(ServerProfile::no_keys()).list_lag(2).start().await;
    let http = reqwest::Client::new();
    let base = cloud.uri();

    let cvm: Value = http
        .post(format!("{base}/cvms"))
        .json(&json!({"name": "web-1", "app_id": "app-9"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for field in ["id", "app_id", "vm_uuid", "name", "created_at"] {
        assert!(cvm[field].is_string(), "{field} in {cvm}");
    }
    assert_eq!(cvm["app_id"], "app-9");

    // Hidden from the next two lists, then visible.
    assert!(list(&http, &format!("{base}/cvms")).await.is_empty());
    assert!(list(&http, &format!("{base}/cvms")).await.is_empty());
    assert_eq!(list(&http, &format!("{base}/cvms")).await, ["web-1"]);
    // A direct read is not lagged.
    let by_id = http.get(format!("{base}/cvms/{}", cvm["id"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(by_id.status(), StatusCode::OK);

    let (app, vm) = (cvm["app_id"].as_str().unwrap(), cvm["vm_uuid"].as_str().unwrap());
    cloud.set_list_lag(0);
    let collection = format!("{base}/{}", replicas(app, vm));
    let replica: Value = http.post(&collection).json(&json!({})).send().await.unwrap().json().await.unwrap();
    assert_eq!((replica["app_id"].as_str(), replica["vm_uuid"].as_str()), (Some(app), Some(vm)));
    assert_eq!(list(&http, &collection).await, ["replica-1"]);

    let item = format!("{collection}/{}", replica["id"].as_str().unwrap());
    assert_eq!(http.delete(&item).send().await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(http.delete(&item).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert!(list(&http, &collection).await.is_empty());
    assert!(cloud.resources(&replicas(app, vm)).is_empty());

    assert_eq!((cloud.created(), cloud.handler_runs()), (2, 2));
    assert_eq!(cloud.requests().len(), 10);
}

#[tokio::test]
async fn proxy_faults_as_a_plain_client_sees_them() {
    let cloud = FakeCloud::start(ServerProfile::no_keys()).await;
    let schedule = Schedule::script([
        Fault::Lose,
        Fault::Reset,
        Fault::unavailable(RetryAfter::Seconds(7)),
        Fault::throttled(RetryAfter::DateIn(std::time::Duration::from_secs(30))),
        Fault::Pass,
    ]);
    let clock = ManualClock::new(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_305_607));
    let proxy = ChaosProxy::builder(cloud.address()).schedule(schedule).clock(clock.clone()).start().await;
    let http = reqwest::Client::new();
    let url = format!("{}/cvms", proxy.uri());
    let post = || http.post(&url).json(&json!({"name": "web-1"})).send();

    let lost = post().await.unwrap_err();
    assert!(!lost.is_connect(), "a reset after sending, not a refused connection: {lost:?}");
    assert_eq!(cloud.created(), 1, "lost after the server committed");
    post().await.unwrap_err();
    assert_eq!(cloud.created(), 1, "reset before forwarding");
    let unavailable = post().await.unwrap();
    assert_eq!(
        (unavailable.status(), unavailable.headers()["retry-after"].to_str().unwrap()),
        (StatusCode::SERVICE_UNAVAILABLE, "7")
    );
    let throttled = post().await.unwrap();
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    let date = httpdate::parse_http_date(throttled.headers()["retry-after"].to_str().unwrap()).unwrap();
    assert_eq!(date, clock.now() + std::time::Duration::from_secs(30), "30 s from the proxy's clock");
    assert_eq!(post().await.unwrap().status(), StatusCode::CREATED);

    assert_eq!(cloud.created(), 2);
    assert_eq!((proxy.requests(), proxy.faults_injected()), (5, 4));
    assert_eq!(cloud.requests().len(), 2, "only lose and pass reached the server");
    let forwarded = proxy.records().iter().filter(|r| r.fault.forwards()).count();
    assert_eq!(forwarded, cloud.requests().len(), "Fault::forwards says which faults reach the server");
}

/// The hostile server a user can ask of `FakeCloud`: ids that are not path segments, answers
/// that are not JSON, items that were there before, a server that forgets its keys.
#[tokio::test]
async fn hostile_ids_plain_answers_foreign_items_and_forgetting() {
    let cloud = FakeCloud::builder(ServerProfile::stripe())
        .ids(|n| format!("../../admin/users/{n}"))
        .create_answer(idempotent_retry::testing::CreateAnswer::PlainText)
        .start()
        .await;
    let http = reqwest::Client::new();
    let url = format!("{}/cvms", cloud.uri());
    let old = cloud.add_foreign("cvms", "theirs", std::time::SystemTime::UNIX_EPOCH);
    assert_eq!(old.created_at, "1970-01-01T00:00:00Z");

    let created = http.post(&url).header("idempotency-key", "k1").body(r#"{"name":"a"}"#).send().await.unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["content-type"], "text/plain");
    assert_eq!(created.text().await.unwrap(), "Created");
    assert_eq!((cloud.created(), cloud.resources("cvms").len()), (1, 2), "the foreign item is not counted as created");
    let ours = cloud.resources("cvms").into_iter().find(|r| r.name == "a").unwrap();
    assert_eq!(ours.id, "../../admin/users/2");

    // The id as one encoded segment names the item; as raw text it leaves the collection.
    let encoded = format!("{url}/{}", ours.id.replace('/', "%2F"));
    assert_eq!(http.delete(&encoded).send().await.unwrap().status(), 204);
    assert!(cloud.deleted_through_api(&ours.id));
    assert_eq!(http.delete(format!("{url}/{}", old.id)).send().await.unwrap().status(), 404, "normalized away");
    assert!(cloud.remove("cvms", &old.id) && !cloud.remove("cvms", &old.id));

    // A key sent again after the server forgot it creates anew.
    cloud.forget_keys();
    http.post(&url).header("idempotency-key", "k1").body(r#"{"name":"a"}"#).send().await.unwrap();
    assert_eq!(cloud.created_named("a"), 2);
}
