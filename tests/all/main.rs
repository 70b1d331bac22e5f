//! One integration test binary (fast to link), one module per concern.

mod budget;
mod chaos;
mod durability;
mod faults;
mod fixtures;
mod journal;
mod keys;
mod operations;
mod properties;
mod reconcile;
mod retries;
mod retry_after;
mod scenarios;
mod stream;
mod support;
