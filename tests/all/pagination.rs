//! Lists that come in pages (issue 17, defect 2). A reconcile that reads only the first page
//! never converges and overshoots on every run; a read-back that reads only the first page says
//! "not found" for what is on the second, and a keyless write is sent again. Every page is read,
//! under faults too; what cannot be followed is an error, never a short count.

use idempotent_retry::testing::{
    ChaosProxy, FakeCloud, Fault, FaultMix, PageStyle, RetryAfter, Schedule, ServerProfile, replicas,
};
use idempotent_retry::{
    Operations, Reconciler,
    journal::MemoryStore,
    operation::{ReadBack, Resolution},
    pagination::Pagination,
    reconcile::{Desired, StopReason},
};
use serde_json::json;

use crate::support::*;

const STYLES: [PageStyle; 4] = [
    PageStyle::LinkHeader,
    PageStyle::NextUrl,
    PageStyle::PageToken,
    PageStyle::Cursor { field: "next_cursor", param: "cursor" },
];

/// A rig whose cloud pages its lists 2 items a page, `style`, with `schedule` on every request.
async fn paged(style: PageStyle, schedule: Schedule) -> Rig {
    let time = Time::new();
    let profile = ServerProfile::stripe();
    let cloud = FakeCloud::builder(profile.clone()).clock(time.clock.clone()).pagination(style, 2).start().await;
    let proxy = ChaosProxy::builder(cloud.address()).schedule(schedule).time_travel(time.clock.clone()).start().await;
    let client = client(profile.configure(time.layer().policy(fast_policy().with_max_attempts(8))));
    Rig { profile, cloud, proxy, client, time }
}

fn reconciler(rig: &Rig, store: std::sync::Arc<MemoryStore>) -> Reconciler {
    let ops = Operations::with_store(rig.client.clone(), store).clock(rig.time.clock.clone());
    Reconciler::new(ops, format!("{}/{}", rig.proxy.uri(), replicas("a", "v")), "replicas/a/v")
        .clock(rig.time.clock.clone())
        .sleeper(rig.time.sleeper.clone())
}

#[tokio::test]
async fn every_page_is_read_under_faults_and_a_rerun_creates_nothing() {
    for style in STYLES {
        let mix = FaultMix::chaos().with_retry_after(Some(RetryAfter::Seconds(0))).scaled_to(0.3);
        let rig = paged(style, Schedule::random(7, mix)).await;
        let store = std::sync::Arc::new(MemoryStore::new());

        let report = reconciler(&rig, store.clone()).reconcile(&Desired::Count(7)).await.unwrap();
        assert!(report.converged, "{style:?}: {report}");
        let again = reconciler(&rig, store.clone()).reconcile(&Desired::Count(7)).await.unwrap();

        assert!(again.converged && again.created.is_empty(), "{style:?}: {again}");
        assert_eq!((rig.cloud.resources(&replicas("a", "v")).len(), rig.cloud.created()), (7, 7), "{style:?}");
    }
}

#[tokio::test]
async fn more_pages_that_cannot_be_followed_stop_the_run_before_any_create() {
    let rig = paged(PageStyle::Cursor { field: "continuation", param: "from" }, Schedule::pass()).await;
    for name in ["a", "b", "c"] {
        rig.cloud.add_foreign(&replicas("a", "v"), name, t0());
    }
    let store = std::sync::Arc::new(MemoryStore::new());

    let err = reconciler(&rig, store.clone()).reconcile(&Desired::Count(5)).await.unwrap_err();

    assert!(matches!(&err.failure, StopReason::List(why) if why.contains("continuation")), "{err}");
    assert_eq!(rig.cloud.created(), 0, "nothing created from a short count");
    let taught = Pagination::standard().cursor("continuation", "from");
    let report =
        reconciler(&rig, store.clone()).pagination(taught.clone()).reconcile(&Desired::Count(5)).await.unwrap();
    assert_eq!((report.created.len(), rig.cloud.resources(&replicas("a", "v")).len()), (2, 5));

    // A bound on pages is a bound, not a short count.
    let err = reconciler(&rig, store).pagination(taught.max_pages(2)).reconcile(&Desired::Count(5)).await.unwrap_err();
    assert!(matches!(&err.failure, StopReason::List(why) if why.contains("more than 2 pages")), "{err}");
}

/// A keyless create whose answer was lost is settled by reading back; the item is on the
/// second page. Reading only the first said "not found", and the write went out again.
#[tokio::test]
async fn a_read_back_finds_what_is_on_a_later_page() {
    let time = Time::new();
    let profile = ServerProfile::no_keys();
    let cloud = FakeCloud::builder(profile.clone())
        .clock(time.clock.clone())
        .pagination(PageStyle::LinkHeader, 2)
        .start()
        .await;
    for name in ["a", "b", "c"] {
        cloud.add_foreign("cvms", name, t0());
    }
    let proxy = ChaosProxy::builder(cloud.address())
        .schedule(Schedule::script([Fault::Lose]))
        .time_travel(time.clock.clone())
        .start()
        .await;
    let client = client(profile.configure(time.layer().policy(fast_policy())));
    let ops = Operations::new(client, MemoryStore::new()).clock(time.clock.clone()).sleeper(time.sleeper.clone());
    let cvms = format!("{}/cvms", proxy.uri());

    let done = ops
        .operation("create-cvm/web-1")
        .post(&cvms)
        .json(&json!({"name": "web-1"}))
        .no_key()
        .read_back(ReadBack::find_in_list(&cvms, "name", "web-1"))
        .send()
        .await
        .unwrap();

    assert_eq!(done.resolution, Resolution::Recovered, "{done:?}");
    assert_eq!(cloud.created_named("web-1"), 1, "never sent again");
}
