use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::json;

use super::*;
use crate::time::{ManualClock, RecordingSleeper};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A waiter on a manual clock whose sleeps are recorded, and a poll schedule of 1 s doubling to
/// 30 s without jitter.
fn rig() -> (Waiter, RecordingSleeper) {
    let clock = ManualClock::new(std::time::UNIX_EPOCH + secs(1_795_305_600));
    let sleeper = RecordingSleeper::advancing(&clock);
    (Waiter::new().clock(clock).sleeper(sleeper.clone()), sleeper)
}

fn exact(spec: WaitFor) -> WaitFor {
    spec.poll(ExponentialBackoff::new(secs(1), secs(30)).jitter(Jitter::None))
}

/// Answers the observations in order.
fn script(
    observations: impl IntoIterator<Item = Observation>,
) -> impl FnMut() -> std::future::Ready<Result<Observation, BoxError>> {
    let queue = Mutex::new(observations.into_iter().collect::<VecDeque<_>>());
    move || std::future::ready(Ok(queue.lock().unwrap().pop_front().expect("polled past the script")))
}

fn status(state: &str) -> Observation {
    Observation::resource(json!({"id": "c1", "status": state}))
}

fn running() -> WaitFor {
    exact(WaitFor::field("status").target(["running"]).failure(["error"]))
}

#[tokio::test]
async fn polls_back_off_until_the_target() {
    let (waiter, sleeper) = rig();
    let ready =
        waiter.wait(&running(), script([status("starting"), status("starting"), status("running")])).await.unwrap();
    assert_eq!((ready.polls, ready.waited, ready.state.clone()), (3, secs(3), json!("running")));
    assert_eq!(sleeper.delays(), [secs(1), secs(2)]);
}

#[tokio::test]
async fn retry_after_is_a_floor_under_the_next_poll() {
    let (waiter, sleeper) = rig();
    let polls = [
        status("starting").retry_after(Some(secs(7))),
        status("starting").retry_after(Some(secs(1))),
        status("running"),
    ];
    waiter.wait(&running(), script(polls)).await.unwrap();
    assert_eq!(sleeper.delays(), [secs(7), secs(2)]);
}

#[tokio::test]
async fn the_wait_is_clipped_to_its_timeout() {
    let (waiter, sleeper) = rig();
    let err =
        waiter.wait(&running().timeout(secs(4)), script(std::iter::repeat_n(status("starting"), 5))).await.unwrap_err();
    assert!(
        matches!(&err, WaitError::TimedOut { waited, state, .. } if *waited == secs(4) && *state == json!("starting")),
        "{err}"
    );
    assert_eq!(sleeper.delays(), [secs(1), secs(2), secs(1)], "the last wait ends at the timeout, then one last poll");
}

#[tokio::test]
async fn a_last_poll_at_the_timeout_can_still_succeed() {
    let (waiter, _) = rig();
    let ready = waiter
        .wait(&running().timeout(secs(2)), script([status("starting"), status("starting"), status("running")]))
        .await;
    assert_eq!(ready.unwrap().waited, secs(2));
}

#[tokio::test]
async fn not_found_is_tolerated_so_many_times_in_a_row() {
    let (waiter, _) = rig();
    let spec = running().not_found_checks(2);
    let lagging = [
        Observation::not_found(),
        Observation::not_found(),
        status("starting"),
        Observation::not_found(),
        Observation::not_found(),
        status("running"),
    ];
    assert_eq!(waiter.wait(&spec, script(lagging)).await.unwrap().polls, 6, "the count restarts after a find");
    let (waiter, _) = rig();
    let err = waiter.wait(&spec, script(std::iter::repeat_n(Observation::not_found(), 3))).await.unwrap_err();
    assert!(matches!(err, WaitError::NotFound { checks: 3 }), "{err}");
}

#[tokio::test]
async fn the_target_must_be_seen_so_many_times_in_a_row() {
    let (waiter, sleeper) = rig();
    let spec = running().target_occurrences(2);
    let flapping = [status("running"), status("starting"), status("running"), status("running")];
    assert_eq!(waiter.wait(&spec, script(flapping)).await.unwrap().polls, 4);
    assert_eq!(sleeper.delays(), [secs(1), secs(2), secs(4)]);
}

#[tokio::test]
async fn a_failure_state_ends_the_wait_with_the_resource() {
    let (waiter, _) = rig();
    let err = waiter.wait(&running(), script([status("starting"), status("ERROR")])).await.unwrap_err();
    match err {
        WaitError::Failed { state, resource } => assert_eq!((state, &resource["id"]), (json!("ERROR"), &json!("c1"))),
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn with_pending_states_any_other_state_is_unexpected() {
    let (waiter, _) = rig();
    let spec = running().pending(["starting", "provisioning"]);
    let err = waiter.wait(&spec, script([status("provisioning"), status("deleted")])).await.unwrap_err();
    assert!(matches!(err, WaitError::UnexpectedState { ref state, .. } if *state == json!("deleted")), "{err}");
}

#[tokio::test]
async fn states_are_read_at_paths_and_compared_without_case() {
    let (waiter, _) = rig();
    let spec = exact(WaitFor::field("/action/status").target(["Success"]));
    let polls = [
        Observation::resource(json!({"action": {"status": "running"}})),
        Observation::resource(json!({"action": {"status": "success"}})),
    ];
    assert_eq!(waiter.wait(&spec, script(polls)).await.unwrap().state, json!("success"));
    let (waiter, _) = rig();
    let spec = exact(WaitFor::field("metadata.ready").target([true]));
    let polls = [
        Observation::resource(json!({"metadata": {"ready": false}})),
        Observation::resource(json!({"metadata": {"ready": true}})),
    ];
    assert_eq!(waiter.wait(&spec, script(polls)).await.unwrap().polls, 2);
}

#[tokio::test]
async fn in_progress_and_finished_need_no_state() {
    let (waiter, sleeper) = rig();
    let spec = exact(WaitFor::done());
    let polls = [
        Observation::in_progress().retry_after(Some(secs(3))),
        Observation::in_progress(),
        Observation::finished(json!({"id": "c1"})),
    ];
    let ready = waiter.wait(&spec, script(polls)).await.unwrap();
    assert_eq!((ready.resource, ready.polls), (json!({"id": "c1"}), 3));
    assert_eq!(sleeper.delays(), [secs(3), secs(2)]);
}

#[tokio::test]
async fn the_hook_hears_every_poll() {
    let (waiter, _) = rig();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let log = heard.clone();
    let spec = running().on_poll(move |e| log.lock().unwrap().push((e.poll, e.state.clone(), e.next)));
    waiter.wait(&spec, script([status("starting"), status("running")])).await.unwrap();
    assert_eq!(*heard.lock().unwrap(), [(1, json!("starting"), secs(1)), (2, json!("running"), Duration::ZERO)]);
}

#[tokio::test]
async fn a_failed_poll_ends_the_wait() {
    let (waiter, _) = rig();
    let err = waiter.wait(&running(), || async { Err::<Observation, BoxError>("boom".into()) }).await.unwrap_err();
    assert!(matches!(err, WaitError::Poll(_)) && err.to_string().contains("boom"), "{err}");
}

#[test]
fn google_operations_are_done_or_failed() {
    let spec = WaitFor::done().with_rule(StateRule::Done, vec!["done".into()], vec!["failed".into()]);
    assert_eq!(spec.state_of(&json!({"name": "op", "done": false})), json!("running"));
    assert_eq!(spec.state_of(&json!({"name": "op", "done": true, "response": {}})), json!("done"));
    assert_eq!(spec.state_of(&json!({"name": "op", "done": true, "error": {"code": 3}})), json!("failed"));
}

#[tokio::test]
async fn a_last_poll_that_fails_at_the_timeout_is_a_timeout() {
    let (waiter, _) = rig();
    let mut polls = 0;
    let err = waiter
        .wait(&running().timeout(secs(2)), || {
            polls += 1;
            let answer =
                if polls < 3 { Ok(status("starting")) } else { Err::<Observation, BoxError>("deadline".into()) };
            std::future::ready(answer)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WaitError::TimedOut { state, resource: Some(_), .. } if *state == json!("starting")),
        "{err}"
    );
}
