//! The record of how a response was obtained, attached to every response the layer returns.

use std::time::Duration;

use crate::key::IdempotencyKey;

/// How a response was obtained: attempts, key, replay, time waited. Found in the response's
/// extensions, for successes and final answers alike (so telemetry can count retries that
/// ended well).
///
/// # Examples
///
/// ```
/// # async fn run(client: reqwest_middleware::ClientWithMiddleware) -> Result<(), reqwest_middleware::Error> {
/// use idempotent_retry::RetryOutcome;
///
/// let response = client.post("http://127.0.0.1:9/cvms").body("{}").send().await?;
/// if let Some(outcome) = RetryOutcome::of(&response) {
///     println!("{} attempt(s), replayed: {}", outcome.attempts, outcome.replayed);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryOutcome {
    /// Attempts made, the successful one included.
    pub attempts: u32,
    /// The key sent on every attempt, if the request had one.
    pub key: Option<IdempotencyKey>,
    /// Whether the server marked the final response as a replay of an earlier one.
    pub replayed: bool,
    /// Whether the server says the request succeeded: a 2xx, or a replay of a success under
    /// the server's own replay status (django's 409, see
    /// [`ReplayDetector::replay_status`](crate::ReplayDetector::replay_status)). A replayed 4xx
    /// is a replayed *refusal*, not a success.
    pub succeeded: bool,
    /// Time spent waiting between attempts.
    pub total_delay: Duration,
    /// The answer may be the server's replay of an earlier attempt with this key: the server
    /// marked it so (`replayed`), or an earlier attempt may have reached the server (its answer
    /// was lost, it timed out, a gateway failed) and this one carried the same key. A server
    /// that marks no replays (bencher's, the IETF draft's) answers such a retry as it answered
    /// the first, so `succeeded` alone does not tell a create from a replay.
    pub may_be_replay: bool,
    /// The answer shows the server read the key: it marked a replay, carried a replay marker
    /// header at all, or echoed the key's header. Many servers that honour keys show nothing
    /// on a first answer (the IETF draft asks for nothing); a server that ignores the header the
    /// key went in never shows anything. `false` for a request sent without a key.
    pub key_acknowledged: bool,
}

impl RetryOutcome {
    /// The record attached to `response`, if it went through the layer.
    pub fn of(response: &reqwest::Response) -> Option<&RetryOutcome> {
        response.extensions().get::<RetryOutcome>()
    }

    /// The requests a send took, retries included (1 when the layer did not report).
    pub(crate) fn requests(result: &reqwest_middleware::Result<reqwest::Response>) -> u64 {
        match result {
            Ok(r) => RetryOutcome::of(r).map_or(1, |o| u64::from(o.attempts)),
            Err(e) => crate::Error::find(e).map_or(1, |e| u64::from(e.attempts())),
        }
    }
}

/// One retry about to happen, as reported to [`IdempotentRetryBuilder::on_retry`](crate::IdempotentRetryBuilder::on_retry).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryEvent {
    /// The attempt that just failed (1 for the first).
    pub attempt: u32,
    /// The most attempts the policy allows.
    pub max_attempts: u32,
    /// Why: the status (`503`) or the transport failure (`reset`, `timeout`, …).
    pub cause: String,
    /// How long the engine waits before the next attempt.
    pub delay: Duration,
    /// The key's [fingerprint](crate::IdempotencyKey::fingerprint), never the key.
    pub key_fingerprint: Option<String>,
    /// The method and URL of the request (without its query string).
    pub target: String,
}
