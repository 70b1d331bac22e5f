//! Fixtures for testing code that writes through this crate against the servers it will meet
//! (feature `test-util`).
//!
//! - [`ServerProfile`]: how a server treats idempotency keys, with presets named after the
//!   systems they emulate: [`ietf`](ServerProfile::ietf), [`stripe`](ServerProfile::stripe),
//!   [`brandur`](ServerProfile::brandur), [`django`](ServerProfile::django),
//!   [`express`](ServerProfile::express), [`bencher`](ServerProfile::bencher),
//!   [`tower`](ServerProfile::tower) and [`no_keys`](ServerProfile::no_keys) (Phala Cloud's
//!   endpoints, which take no key).
//! - [`FakeCloud`]: a stateful fake API on a real socket (wiremock) with CVM and replica
//!   collections, list lag, injected handler failures, and counters.
//! - [`ChaosProxy`]: a TCP proxy that injects [`Fault`]s by [`Schedule`]: lost responses after
//!   commit, resets (real RSTs), statuses with `Retry-After`, delays.
//! - [`assert_one_key_per_operation`] and the counters on [`FakeCloud`] for assertions about what
//!   matters: one key per operation, resources created.
//! - [`check_key_store`]: the journal's rules, for a [`KeyStore`](crate::journal::KeyStore) of your own.
//!
//! ```
//! use idempotent_retry::IdempotentRetry;
//! use idempotent_retry::testing::{ChaosProxy, FakeCloud, Fault, RetryAfter, Schedule, ServerProfile};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let profile = ServerProfile::ietf();
//! let cloud = FakeCloud::start(profile.clone()).await;
//! let proxy = ChaosProxy::start(cloud.address(), Schedule::script([Fault::Lose, Fault::Reset])).await;
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(profile.configure(IdempotentRetry::builder()).build())
//!     .build();
//!
//! client.post(format!("{}/cvms", proxy.uri())).body(r#"{"name":"web-1"}"#).send().await.unwrap();
//!
//! assert_eq!(cloud.created_named("web-1"), 1);
//! assert_eq!(proxy.requests(), 3);
//! # }
//! ```

mod check;
mod cloud;
mod fault;
mod http1;
mod key_store;
mod long_running;
mod profile;
mod proxy;
mod resource;
mod store;

pub use check::{assert_one_key_per_operation, one_key_per_operation};
pub use cloud::{CreateAnswer, FakeCloud, FakeCloudBuilder, PageStyle, SeenRequest, replicas};
pub use fault::{Fault, FaultMix, RetryAfter, Schedule};
pub use key_store::check_key_store;
pub use long_running::LongRunning;
pub use profile::{CacheErrors, InFlight, KeyFormat, KeyLocation, Mismatch, Replay, Scope, ServerProfile};
pub use proxy::{ChaosProxy, ChaosProxyBuilder, Gate, ProxyRecord};
pub use resource::Resource;
