//! Long-running creates: each pattern waited for through faults on the polls (a lost answer, a
//! 503 with `Retry-After`, a 404 while the read lags), with every delay asserted on injected
//! time; the identity and the handle journaled before the wait; failure states; a wait resumed
//! by a re-run that never creates again.

use std::time::Duration;

use http::Method;
use idempotent_retry::backoff::{ExponentialBackoff, Jitter};
use idempotent_retry::journal::{KeyStore, MemoryStore, OpState};
use idempotent_retry::operation::{OperationError, Resolution};
use idempotent_retry::testing::{ChaosProxy, FakeCloud, Fault, LongRunning, RetryAfter, Schedule, ServerProfile};
use idempotent_retry::time::SeededRng;
use idempotent_retry::wait::{Handle, WaitError, WaitFor};
use idempotent_retry::{IdempotentRetry, Operations};
use serde_json::json;

use crate::support::*;

const PROVISIONING: Duration = Duration::from_secs(10);

struct Rig {
    time: Time,
    cloud: FakeCloud,
    proxy: ChaosProxy,
    store: std::sync::Arc<MemoryStore>,
}

impl Rig {
    /// A cloud whose creates go on as `style` says, behind a proxy that meets the polls (the
    /// GETs) with `faults`.
    async fn new(style: LongRunning, faults: impl IntoIterator<Item = Fault>) -> Self {
        Self::with(FakeCloud::builder(ServerProfile::stripe()).long_running(style, PROVISIONING), faults).await
    }

    async fn with(cloud: idempotent_retry::testing::FakeCloudBuilder, faults: impl IntoIterator<Item = Fault>) -> Self {
        let time = Time::new();
        let cloud = cloud.clock(time.clock.clone()).start().await;
        let proxy =
            ChaosProxy::builder(cloud.address()).schedule(Schedule::script(faults)).only(Method::GET).start().await;
        Self { time, cloud, proxy, store: std::sync::Arc::new(MemoryStore::new()) }
    }

    fn ops(&self) -> Operations {
        let layer: IdempotentRetry = self.time.layer().policy(fast_policy()).build();
        let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).with(layer).build();
        Operations::with_store(client, self.store.clone())
            .clock(self.time.clock.clone())
            .sleeper(self.time.sleeper.clone())
            .rng(SeededRng::new(SEED))
    }

    fn url(&self) -> String {
        format!("{}/cvms", self.proxy.uri())
    }

    /// Creates web-1 and waits as `spec` says.
    async fn create(&self, spec: WaitFor) -> Result<idempotent_retry::operation::Completed, OperationError> {
        self.ops()
            .operation("create-cvm/web-1")
            .post(self.url())
            .json(&json!({"name": "web-1"}))
            .wait(spec)
            .send()
            .await
    }

    async fn record(&self) -> idempotent_retry::journal::Record {
        self.store.get("create-cvm/web-1").await.unwrap().expect("journaled")
    }
}

/// Polls 1 s doubling to 30 s, without jitter: exact delays.
fn exact(spec: WaitFor) -> WaitFor {
    spec.poll(ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(30)).jitter(Jitter::None))
}

fn running() -> WaitFor {
    exact(WaitFor::field("status").target(["running"]).failure(["error"]))
}

/// The faults every pattern's first poll meets: the answer lost after the server answered
/// (the layer resends the GET after 100 ms), a 503 asking for 2 s, a 404 as from a read that
/// lags (the waiter's to tolerate).
fn poll_faults() -> [Fault; 3] {
    [Fault::Lose, Fault::unavailable(RetryAfter::Seconds(2)), Fault::Status { status: 404, retry_after: None }]
}

/// The first poll's retries, then polls 1, 2, 4 s apart until the resource, ready at 10 s,
/// is seen at 2.1 + 1 + 2 + 4 + 8 = 17.1 s.
fn polls_until_ready() -> Vec<Duration> {
    vec![ms(100), ms(2000), ms(1000), ms(2000), ms(4000), ms(8000)]
}

#[tokio::test]
async fn a_status_that_moves_is_waited_for_through_faults() {
    let rig = Rig::new(LongRunning::Status, poll_faults()).await;
    let ops = rig.ops();

    let started = ops
        .operation("create-cvm/web-1")
        .post(rig.url())
        .json(&json!({"name": "web-1"}))
        .wait(running())
        .start()
        .await
        .unwrap();

    // The identity and the handle are on record before the wait begins.
    let id = started.created().identity["id"].as_str().unwrap().to_owned();
    let handle = Handle::Resource { url: format!("{}/cvms/{id}", rig.proxy.uri()) };
    assert_eq!(started.created().handle.as_ref(), Some(&handle));
    let record = rig.record().await;
    assert_eq!(
        (record.state, record.handle.as_ref(), record.identity.clone()),
        (OpState::Waiting, Some(&handle), Some(json!({"id": id})))
    );
    assert!(rig.time.delays().is_empty(), "nothing waited yet");

    let done = started.wait().await.unwrap();

    assert_eq!(
        (done.resolution, done.resource["status"].clone(), done.handle.clone()),
        (Resolution::Created, json!("running"), None)
    );
    assert_eq!(rig.time.delays(), polls_until_ready());
    assert_eq!((rig.record().await.state, rig.record().await.handle), (OpState::Succeeded, None));
    assert_eq!(rig.cloud.created(), 1);
}

#[tokio::test]
async fn a_202_with_location_is_polled_until_it_answers_the_resource() {
    let rig = Rig::new(LongRunning::Location, poll_faults()).await;

    let done = rig.create(exact(WaitFor::done())).await.unwrap();

    assert_eq!(done.status.map(|s| s.as_u16()), Some(202));
    assert_eq!((done.resource["name"].clone(), done.resource["status"].clone()), (json!("web-1"), json!("running")));
    assert!(done.identity["id"].is_string(), "{done:?}");
    assert_eq!(rig.time.delays(), polls_until_ready());
    assert_eq!(rig.cloud.created(), 1);
}

#[tokio::test]
async fn retry_after_on_a_202_paces_the_polls() {
    let cloud = FakeCloud::builder(ServerProfile::stripe())
        .long_running(LongRunning::Location, PROVISIONING)
        .poll_retry_after(3);
    let rig = Rig::with(cloud, []).await;

    rig.ops()
        .operation("create-cvm/web-1")
        .post(rig.url())
        .json(&json!({}))
        .wait(exact(WaitFor::done()))
        .send()
        .await
        .unwrap();

    // max(schedule, Retry-After 3 s): 3, 3, 4, then ready at 10 s.
    assert_eq!(rig.time.delays(), [ms(3000), ms(3000), ms(4000)]);
}

#[tokio::test]
async fn an_operation_location_is_followed_then_the_resource_is_read_where_it_is() {
    let rig = Rig::new(LongRunning::OperationLocation, poll_faults()).await;

    let done = rig.create(exact(WaitFor::done())).await.unwrap();

    assert_eq!((done.resource["name"].clone(), done.resource["status"].clone()), (json!("web-1"), json!("running")));
    assert_eq!(rig.time.delays(), polls_until_ready());
    let resource_reads =
        rig.cloud.requests().iter().filter(|r| r.method == "GET" && r.path.starts_with("/cvms/")).count();
    assert_eq!(resource_reads, 1, "the monitor first, then one read of the resource");
}

#[tokio::test]
async fn an_operation_location_then_a_resource_state_is_two_stages_each_journaled() {
    let rig = Rig::new(LongRunning::OperationLocation, []).await;
    let ops = rig.ops();
    let started = ops
        .operation("create-cvm/web-1")
        .post(rig.url())
        .json(&json!({"name": "web-1"}))
        .wait(running())
        .start()
        .await
        .unwrap();
    assert!(matches!(started.created().handle, Some(Handle::StatusMonitor { .. })));
    assert!(matches!(rig.record().await.handle, Some(Handle::StatusMonitor { .. })));

    let done = started.wait().await.unwrap();

    assert_eq!(done.resource["status"], "running");
    assert_eq!(rig.time.delays(), [ms(1000), ms(2000), ms(4000), ms(8000)]);
    assert_eq!(rig.record().await.state, OpState::Succeeded);
}

#[tokio::test]
async fn a_google_operation_is_polled_until_done_and_its_response_is_the_resource() {
    let rig = Rig::new(LongRunning::Operation, poll_faults()).await;

    let done = rig.create(exact(WaitFor::done())).await.unwrap();

    assert_eq!(done.status.map(|s| s.as_u16()), Some(200));
    assert_eq!((done.resource["name"].clone(), done.resource["status"].clone()), (json!("web-1"), json!("running")));
    assert_eq!(rig.time.delays(), polls_until_ready());
    assert!(matches!(rig.record().await.state, OpState::Succeeded));
}

#[tokio::test]
async fn a_hetzner_action_is_polled_until_success_then_the_resource_is_read() {
    let rig = Rig::new(LongRunning::Action, poll_faults()).await;

    let done = rig.create(exact(WaitFor::done())).await.unwrap();

    assert_eq!(done.resource["status"], "running");
    assert!(done.resource.get("action").is_none(), "the resource as read, not the create's answer: {}", done.resource);
    assert_eq!(rig.time.delays(), polls_until_ready());
}

#[tokio::test]
async fn failure_states_end_the_wait_and_leave_the_resource_tracked() {
    for style in [
        LongRunning::Status,
        LongRunning::OperationLocation,
        LongRunning::Operation,
        LongRunning::Action,
        LongRunning::Location,
    ] {
        let cloud =
            FakeCloud::builder(ServerProfile::stripe()).long_running(style, PROVISIONING).failing_provisioning(1);
        let rig = Rig::with(cloud, []).await;
        let spec = if style == LongRunning::Status { running() } else { exact(WaitFor::done()) };

        let err = rig
            .ops()
            .operation("create-cvm/web-1")
            .post(rig.url())
            .json(&json!({}))
            .wait(spec.clone())
            .send()
            .await
            .unwrap_err();

        let OperationError::Wait(failed) = &err else { panic!("{style:?}: {err}") };
        match (&failed.source, style) {
            (
                WaitError::Failed { .. },
                LongRunning::Status | LongRunning::OperationLocation | LongRunning::Operation | LongRunning::Action,
            ) => {}
            (WaitError::Poll(why), LongRunning::Location) => assert!(why.to_string().contains("400"), "{why}"),
            (other, _) => panic!("{style:?}: {other}"),
        }
        assert!(err.may_have_been_applied(), "it was created");
        assert_eq!(rig.record().await.state, OpState::Waiting, "{style:?}: tracked");
        // A re-run resumes the wait; it sends nothing.
        let again = rig
            .ops()
            .operation("create-cvm/web-1")
            .post(rig.url())
            .json(&json!({}))
            .wait(spec)
            .send()
            .await
            .unwrap_err();
        assert!(matches!(again, OperationError::Wait(_)), "{style:?}: {again}");
        assert_eq!((rig.cloud.created(), rig.cloud.keys_seen().len()), (1, 1), "{style:?}: one create, one POST");
    }
}

#[tokio::test]
async fn the_wait_ends_at_its_timeout_and_a_re_run_resumes_it() {
    let rig = Rig::new(LongRunning::Status, []).await;
    let ops = rig.ops();
    let create = || ops.operation("create-cvm/web-1").post(rig.url()).json(&json!({"name": "web-1"}));

    let err = create().wait(running().timeout(Duration::from_secs(5))).send().await.unwrap_err();
    let OperationError::Wait(failed) = &err else { panic!("{err}") };
    assert!(matches!(failed.source, WaitError::TimedOut { waited, .. } if waited == Duration::from_secs(5)), "{err}");
    assert_eq!(rig.time.delays(), [ms(1000), ms(2000), ms(2000)], "clipped to the timeout");

    let done = create().wait(running()).send().await.unwrap();

    assert_eq!((done.resolution, done.resource["status"].clone()), (Resolution::Resumed, json!("running")));
    assert_eq!((rig.cloud.created(), rig.cloud.keys_seen().len()), (1, 1), "resumed, never sent again");
    assert_eq!(rig.record().await.state, OpState::Succeeded);
}

#[tokio::test]
async fn a_run_dropped_during_the_wait_is_resumed_by_the_next() {
    let rig = Rig::new(LongRunning::OperationLocation, []).await;
    let ops = rig.ops();
    let create = || {
        ops.operation("create-cvm/web-1").post(rig.url()).json(&json!({"name": "web-1"})).wait(exact(WaitFor::done()))
    };

    // The process "dies" once the create has answered, before it waits.
    let started = create().start().await.unwrap();
    let key = started.created().key.clone();
    drop(started);

    let done = create().send().await.unwrap();

    assert_eq!(
        (done.resolution, done.key.clone(), done.resource["status"].clone()),
        (Resolution::Resumed, key, json!("running"))
    );
    assert_eq!((rig.cloud.created(), rig.cloud.keys_seen().len()), (1, 1));
}

#[tokio::test]
async fn a_poll_url_on_another_origin_is_not_followed() {
    // The proxy's origin differs from the cloud's: a create sent to the cloud that answers with
    // a Location on the proxy stands in for a hostile answer.
    let rig = Rig::new(LongRunning::Immediate, []).await;
    let hostile = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(
            wiremock::ResponseTemplate::new(202).insert_header("location", format!("{}/steal", rig.proxy.uri())),
        )
        .mount(&hostile)
        .await;

    let err = rig
        .ops()
        .operation("create-cvm/web-1")
        .post(format!("{}/cvms", hostile.uri()))
        .json(&json!({}))
        .wait(WaitFor::done())
        .send()
        .await
        .unwrap_err();

    let OperationError::Wait(failed) = &err else { panic!("{err}") };
    assert!(failed.source.to_string().contains("another origin"), "{err}");
    assert_eq!(rig.cloud.requests().len(), 0, "nothing was sent there");
    assert_eq!(rig.record().await.state, OpState::Succeeded, "what was created is on record");
}

#[tokio::test]
async fn a_resource_recovered_by_reading_back_is_waited_for_and_recorded_without_a_status() {
    // Every answer to the create is lost; the read-back finds what it made.
    let time = Time::new();
    let cloud = FakeCloud::builder(ServerProfile::stripe())
        .clock(time.clock.clone())
        .long_running(LongRunning::Status, PROVISIONING)
        .start()
        .await;
    let proxy =
        ChaosProxy::builder(cloud.address()).schedule(Schedule::always(Fault::Lose)).only(Method::POST).start().await;
    let store = std::sync::Arc::new(MemoryStore::new());
    let layer: IdempotentRetry = time.layer().policy(fast_policy()).build();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).with(layer).build();
    let ops = Operations::with_store(client, store.clone())
        .clock(time.clock.clone())
        .sleeper(time.sleeper.clone())
        .rng(SeededRng::new(SEED));
    let create = || {
        ops.operation("create-cvm/web-1")
            .post(format!("{}/cvms", proxy.uri()))
            .json(&json!({"name": "web-1"}))
            .derived_key(1)
            .read_back(idempotent_retry::operation::ReadBack::find_in_list(
                format!("{}/cvms", proxy.uri()),
                "name",
                "web-1",
            ))
            .wait(running())
    };

    // Recovered, then the process dies before the wait; the next run resumes it.
    let started = create().start().await.unwrap();
    assert_eq!(started.created().resolution, Resolution::Recovered);
    drop(started);
    let waiting = store.get("create-cvm/web-1").await.unwrap().unwrap();
    assert_eq!((waiting.state, waiting.status), (OpState::Waiting, None), "found by reading back: no status");
    let done = create().send().await.unwrap();

    assert_eq!((done.resolution, done.resource["status"].clone()), (Resolution::Resumed, json!("running")));
    let record = store.get("create-cvm/web-1").await.unwrap().unwrap();
    assert_eq!((record.state, record.status), (OpState::Succeeded, None), "still no status: never resent blind");
    let posts = cloud.keys_seen().len();
    let again = create().send().await.unwrap();
    assert_eq!(again.resolution, Resolution::Recovered, "the journal's success, refreshed by the read-back");
    assert_eq!((cloud.keys_seen().len(), cloud.created()), (posts, 1), "nothing sent again");
}

/// Found by the model test: a fixed key that had succeeded (without a wait) was resent, the
/// server replayed, and the run returned at once although it was asked to wait.
#[tokio::test]
async fn a_success_run_again_with_a_wait_waits() {
    let rig = Rig::new(LongRunning::Status, []).await;
    let ops = rig.ops();
    let create = || ops.operation("create-cvm/web-1").post(rig.url()).json(&json!({"name": "web-1"})).derived_key(1);
    create().send().await.unwrap();

    let done = create().wait(running()).send().await.unwrap();

    assert_eq!((done.resolution, done.resource["status"].clone()), (Resolution::Replayed, json!("running")));
    assert_eq!(rig.record().await.state, OpState::Succeeded);
    assert_eq!(rig.cloud.created(), 1);
}

/// Found by the model test: a previous run's create, found by reading back and waited for by a
/// run with a fixed key that was never sent, left that key unbound once the wait ended (the
/// binding was skipped while the record waited), so a later run with the key sent it: a
/// second resource.
#[tokio::test]
async fn a_recovery_waited_for_binds_the_fixed_key_when_the_wait_ends() {
    let time = Time::new();
    let cloud = FakeCloud::builder(ServerProfile::stripe())
        .clock(time.clock.clone())
        .long_running(LongRunning::Status, PROVISIONING)
        .start()
        .await;
    let proxy =
        ChaosProxy::builder(cloud.address()).schedule(Schedule::script([Fault::Lose])).only(Method::POST).start().await;
    let store = std::sync::Arc::new(MemoryStore::new());
    let layer: IdempotentRetry = time.layer().policy(fast_policy()).build();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).with(layer).build();
    let ops = Operations::with_store(client, store.clone())
        .clock(time.clock.clone())
        .sleeper(time.sleeper.clone())
        .rng(SeededRng::new(SEED));
    let url = format!("{}/cvms", proxy.uri());
    let create = || ops.operation("create-cvm/web-1").post(&url).json(&json!({"name": "web-1"}));
    let find = || idempotent_retry::operation::ReadBack::find_in_list(&url, "name", "web-1");
    // A keyless run whose answer is lost: unknown.
    assert!(create().no_key().send().await.unwrap_err().may_have_been_applied());
    // A run with a fixed key finds it by reading back, and dies before its wait.
    let started = create().derived_key(1).read_back(find()).wait(running()).start().await.unwrap();
    assert_eq!(started.created().resolution, Resolution::Recovered);
    drop(started);
    // The next resumes the wait to its end.
    let done = create().derived_key(1).read_back(find()).wait(running()).send().await.unwrap();
    assert_eq!(done.resolution, Resolution::Resumed);
    let posts = cloud.keys_seen().len();

    // The fixed key is on record: a later run with it sends nothing.
    let again = create().derived_key(1).wait(running()).send().await.unwrap();

    assert_eq!((again.resolution, again.resource["status"].clone()), (Resolution::Recorded, json!("running")));
    assert_eq!((cloud.keys_seen().len(), cloud.created()), (posts, 1), "nothing sent, one resource");
}
