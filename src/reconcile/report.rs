//! What a reconcile did.

use std::fmt;

use serde::Serialize;

/// What one reconcile call did. Serializable, for logs, CI output and the CLI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Items desired.
    pub desired: usize,
    /// Items the first list showed.
    pub before: usize,
    /// Items the last list showed.
    pub after: usize,
    /// The most items any list showed.
    pub max_observed: usize,
    /// Ids of items this call created (or whose creation it settled).
    pub created: Vec<String>,
    /// Ids of items taken for the work of creates whose answers were lost (keyless endpoints):
    /// each appeared after such a create was sent. Counted, never pruned as this operation's,
    /// since nothing proves they are.
    pub presumed: Vec<String>,
    /// Ids of items that filled a named slot without being created.
    pub adopted: Vec<String>,
    /// Ids of items this call deleted.
    pub deleted: Vec<String>,
    /// The largest surplus over the desired state any list showed.
    pub overshoot: usize,
    /// Every id reported as surplus, in the order first reported (newest first per list).
    pub overshoot_ids: Vec<String>,
    /// Creates or deletes whose outcome was unknown when they returned.
    pub unknown: usize,
    /// Expected creates that no list showed before the expectation expired. Each may still
    /// appear late, as a surplus a later reconcile finds.
    pub expired: usize,
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// Lists made.
    pub rounds: u32,
    /// Wall time spent, by the reconciler's clock.
    pub elapsed_ms: u64,
    /// Items the last list showed ready, when the reconcile [waits for
    /// readiness](super::Reconciler::wait_for) (`None` otherwise).
    pub ready: Option<usize>,
    /// The collection ended as desired (and, when waiting for readiness, every item ready).
    pub converged: bool,
}

impl fmt::Display for ReconcileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "desired {}: {} -> {}{} ({}), created {}, presumed {}, adopted {}, deleted {}, overshoot {}, unknown {}, expired {}, {} requests in {} rounds, {} ms",
            self.desired,
            self.before,
            self.after,
            self.ready.map(|r| format!(", {r} ready")).unwrap_or_default(),
            if self.converged { "converged" } else { "not converged" },
            self.created.len(),
            self.presumed.len(),
            self.adopted.len(),
            self.deleted.len(),
            self.overshoot,
            self.unknown,
            self.expired,
            self.requests,
            self.rounds,
            self.elapsed_ms
        )
    }
}
