//! List pages as servers send them: any `Link` header and any body.

use std::time::Duration;

use http::HeaderValue;
use idempotent_retry::{
    IdempotentRetry, Operations, Reconciler,
    journal::MemoryStore,
    pagination::Pagination,
    reconcile::Desired,
    time::{ManualClock, RecordingSleeper, SeededRng},
};

use super::{ITERATIONS, canned, response, runtime, split, t0};

/// The first line is a `Link` header, the rest a page's body; every page of the list is that
/// page. The reconciler reads every page it can follow, within its page bound, never outside
/// the collection's origin, and ends (converged, stopped, or at its deadline) without a panic.
#[test]
fn list_pages() {
    let rt = runtime();
    bolero::check!().with_iterations(ITERATIONS).for_each(|input: &[u8]| {
        let (link, body) = split(input);
        let link = HeaderValue::from_str(&link).ok();
        let body = body.to_vec();
        let clock = ManualClock::new(t0());
        let sleeper = RecordingSleeper::advancing(&clock);
        let layer = IdempotentRetry::builder()
            .clock(clock.clone())
            .sleeper(sleeper.clone())
            .rng(SeededRng::new(5))
            .no_budget()
            .build();
        let (client, seen) = canned(layer, move |_| {
            let headers: Vec<(&str, HeaderValue)> = link.iter().map(|l| ("link", l.clone())).collect();
            response(200, &headers, &body)
        });
        let ops = Operations::new(client, MemoryStore::new()).clock(clock.clone()).sleeper(sleeper.clone());
        let mut reconciler = Reconciler::new(ops, "http://api.test/items", "items")
            .pagination(Pagination::standard().max_pages(5))
            .deadline(Duration::from_secs(60))
            .clock(clock.clone())
            .sleeper(sleeper)
            .rng(SeededRng::new(6));
        let _ = rt.block_on(reconciler.reconcile(&Desired::Count(0)));
        for (method, url, _, _) in seen.lock().unwrap().iter() {
            assert_eq!(*method, http::Method::GET, "a count of 0 with no pruning only lists");
            assert_eq!(url.origin(), reqwest::Url::parse("http://api.test/").unwrap().origin(), "{url}");
        }
    });
}
