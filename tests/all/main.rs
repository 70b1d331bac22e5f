//! One integration test binary (fast to link), one module per concern.

mod budget;
mod chaos;
mod durability;
mod faults;
mod fixtures;
#[path = "../common/git.rs"]
mod git_support;
mod journal;
mod keys;
mod metrics;
mod model;
mod operations;
mod pagination;
mod properties;
mod protocols;
mod reconcile;
mod redirects;
mod retries;
mod retry_after;
mod scenarios;
mod skew;
mod stream;
mod support;
mod throttling;
mod waits;
