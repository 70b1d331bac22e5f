//! Make non-idempotent HTTP writes safe to retry.
//!
//! `POST /cvms` whose response is lost: was the machine created? Retrying blindly creates a
//! duplicate; not retrying turns every transient fault into a failed apply. This crate's
//! [`IdempotentRetry`] layer for [`reqwest_middleware`] gives every POST and PATCH one
//! [`IdempotencyKey`], minted once and sent unchanged on every attempt, retries what is
//! transient within a deadline and a [retry budget](budget::RetryBudget), and knows, for every failure,
//! whether the request [may have been applied](Error::may_have_been_applied). A keyless write that
//! may have been applied is never resent: the caller is told the outcome is unknown.
//!
//! ```
//! use idempotent_retry::IdempotentRetry;
//!
//! // A write's redirect is its answer: the layer follows it within the origin, or stops.
//! let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
//! let client = reqwest_middleware::ClientBuilder::new(http).with(IdempotentRetry::new()).build();
//! # let _ = client;
//! # Ok::<(), reqwest::Error>(())
//! ```
//!
//! # The path of a request
//!
//! 1. **Key** ([`key`](IdempotencyKey), [`KeyCarrier`]): a key the caller set is kept; otherwise
//!    one is taken from [`RequestOptions`] or minted. It is validated for this server (a bad key
//!    is an error and nothing is sent) and put in a header or a JSON body field. The body bytes
//!    are pinned: every attempt sends the same bytes and the same key.
//! 2. **Attempt**: sent down the chain within the per-attempt timeout, clipped to the deadline.
//!    Error responses (status ≥ 400) are read so they can be classified, within that timeout and
//!    up to the [body limit](IdempotentRetryBuilder::max_body) (8 MiB); the caller still gets the
//!    whole response. [`RequestOptions::buffer_body`] has every body read that way.
//!    A redirect answering a write is the write's answer: a 303 is done, a 301/302/307/308
//!    within the origin is sent again with the same key and body, another origin never
//!    receives it ([`Error::Redirected`]); build the client with `redirect::Policy::none()`.
//! 3. **Classify** ([`classify`]): done, retry (and whether it may have been applied), or key
//!    reuse. Replays are recognised by [`ReplayDetector`].
//! 4. **Decide**: attempts left, `Retry-After` as a floor under the [`backoff`] and capped, the
//!    wait must fit the deadline, the [`budget`] must pay.
//! 5. **Sleep** through the injected [`Sleeper`](time::Sleeper).
//! 6. **Outcome**: the response carries a [`RetryOutcome`]; a failure is an [`Error`] that says
//!    how many attempts were made, with which key, how the last ended, and whether the request
//!    may have been applied.
//!
//! # Operations and durable keys
//!
//! [`Operations`] names a write (`create-cvm/web-1`) and keeps its key in a
//! [`KeyStore`](journal::KeyStore) — the [`SqliteJournal`](journal::SqliteJournal) on disk —
//! *before* the first send, so a crash or a re-run resumes with the same key instead of creating
//! a duplicate. Keys are random, [derived](operation::KeySource::Derived) from the caller's scope
//! and the operation, user-given, or [from git](operation::key_from_git). A key is pinned to its
//! payload. An unknown outcome is settled by a [`ReadBack`](operation::ReadBack), never by a
//! blind resend. A create that goes on after it answers (a 202, an operation to poll, a status
//! that moves) is [waited for](operation::OperationBuilder::wait), its handle journaled before
//! the wait, so a re-run resumes the wait instead of creating again. A [`Reconciler`] makes a
//! collection hold a desired count without overshoot.
//!
//! # Where things are
//!
//! The root holds the everyday names. Extension points live in modules named for their concern:
//!
//! | module | what |
//! |---|---|
//! | [`classify`] | the [`Classifier`](classify::Classifier) trait, what it sees, what it says |
//! | [`backoff`] | delay schedules, `Retry-After` parsing |
//! | [`budget`] | the retry budget |
//! | [`time`] | clocks, sleepers, random numbers, and their test doubles |
//! | [`error`] | the details of an [`Error`] |
//! | [`operation`] | read-backs, outcomes, errors and key sources of [`Operations`] |
//! | [`journal`] | where keys are kept: the store trait, the SQLite journal, the records |
//! | [`reconcile`] | the desired state, the pure planner, the report |
//! | [`pagination`] | how a list's pages lead to one another |
//! | [`wait`] | waiting for a create to be done: states, long-running patterns, the waiter |
//! | [`testing`] | fake servers and a chaos proxy (feature `test-util`) |
//!
//! # Features
//!
//! - `journal` (default): [`SqliteJournal`](journal::SqliteJournal), through rusqlite with
//!   SQLite bundled.
//! - `postgres`: [`PostgresJournal`](journal::PostgresJournal), a journal on PostgreSQL shared by
//!   every machine of a fleet (tokio-postgres, deadpool-postgres): atomic begins across
//!   machines, leases, scopes.
//! - `test-util`: the [`testing`] module: fake servers that enforce idempotency as real ones do
//!   (IETF draft, Stripe, brandur's design, django, express, bencher, tower, and endpoints with no
//!   key at all), a chaos proxy that injects real socket faults, and assertion helpers. Pulls in
//!   wiremock.
//! - `metrics`: counters, gauges and histograms through the `metrics` facade (see
//!   `docs/observability.md`): attempts per request, retries by cause, operation outcomes, budget tokens, waits.
//! - `backoff`: [`FromBackoff`](backoff::FromBackoff) adapts a `backoff::backoff::Backoff` (from the unmaintained
//!   `backoff` crate, RUSTSEC-2025-0012) as a delay schedule, for callers migrating from it.
//!   Off by default.
//!
//! # Tracing and metrics
//!
//! Spans per operation, per request and per attempt (the attempt's with OpenTelemetry's HTTP
//! client attributes), and with feature `metrics` counters and histograms. Their names, fields
//! and labels are listed once, in `docs/observability.md`. The `key` field is a
//! [fingerprint](IdempotencyKey::fingerprint), never the key; headers, `Authorization`
//! included, are never recorded, and URLs lose their user info and query values.

#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod attempt;
pub mod backoff;
pub mod budget;
mod carrier;
pub mod classify;
mod convention;
mod decide;
mod engine;
pub mod error;
pub mod journal;
mod key;
mod middleware;
pub mod operation;
mod options;
mod outcome;
pub mod pagination;
mod policy;
pub mod rate_limit;
pub mod reconcile;
mod redirect;
mod replay;
mod target;
mod telemetry;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;
pub mod time;
pub mod wait;

pub use crate::carrier::KeyCarrier;
pub use crate::convention::ServerConvention;
pub use crate::error::Error;
pub use crate::key::{IdempotencyKey, KeyError};
pub use crate::middleware::{IdempotentRetry, IdempotentRetryBuilder};
pub use crate::operation::Operations;
pub use crate::options::RequestOptions;
pub use crate::outcome::{RetryEvent, RetryOutcome};
pub use crate::policy::RetryPolicy;
pub use crate::reconcile::Reconciler;
pub use crate::replay::ReplayDetector;

/// The README's and the guides' examples, run as doctests.
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../docs/retries.md")]
    struct Retries;
    #[doc = include_str!("../docs/operations.md")]
    struct Operations;
    #[doc = include_str!("../docs/postgres.md")]
    struct Postgres;
    #[doc = include_str!("../docs/reconcile.md")]
    struct Reconcile;
    #[doc = include_str!("../docs/long-running.md")]
    struct LongRunning;
    #[doc = include_str!("../docs/cli.md")]
    struct Cli;
    #[doc = include_str!("../docs/terraform.md")]
    struct Terraform;
    #[doc = include_str!("../docs/testing.md")]
    struct Testing;
    #[doc = include_str!("../docs/performance.md")]
    struct Performance;
    #[doc = include_str!("../docs/observability.md")]
    struct Observability;
}
