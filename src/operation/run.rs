//! Running one operation: ask the journal, settle what stands in the way, send, settle what
//! came back.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;

use super::git::key_from_git;
use super::{
    Completed, IdentityMismatch, KeySource, OperationBuilder, OperationError, ReadBack, Resolution, WaitFailed,
};
use crate::error::Error;
use crate::journal::store::{Begun, Claim, Finish, Intent, KeyPlan};
use crate::journal::{JournalError, OpState, Record, fingerprint};
use crate::key::IdempotencyKey;
use crate::options::RequestOptions;
use crate::outcome::RetryOutcome;
use crate::wait::{Answered, Handle, WaitError};
/// One run of an operation, in three steps: begin (ask the journal, and settle what stands in
/// the way: an earlier run that may have taken effect, another machine's run, a key past the
/// server's retention), send (until the answer settles it), answer (what came back, or what a
/// read-back found). Why a key source found no key rides with the run, into its result.
pub(super) struct OperationRun<'r, 'o> {
    op: &'r OperationBuilder<'o>,
    no_key_reason: Option<String>,
}

impl OperationBuilder<'_> {
    /// Runs the operation up to the create's answer; when it is to wait, the run's claim and
    /// what binds a fixed key to the result once ready.
    pub(super) async fn run(&self) -> Result<Ran, OperationError> {
        let url = self.checked_url()?;
        let (plan, no_key_reason) = self.key_plan().await?;
        OperationRun { op: self, no_key_reason }.run(url, plan).await
    }

    /// The URL, the options and the operation's own policy, checked before anything else.
    fn checked_url(&self) -> Result<String, OperationError> {
        if let Some(reason) = &self.invalid {
            return Err(self.invalid(reason.clone()));
        }
        let Some(url) = self.url.clone() else {
            return Err(self.invalid("no URL: call post(), patch(), put() or request()"));
        };
        crate::target::http_url(&url).map_err(|why| self.invalid(why))?;
        if let Some(policy) = &self.policy {
            policy.check().map_err(|why| self.invalid(why))?;
        }
        if self.sources.len() > 1 {
            return Err(self.invalid(format!("conflicting key sources: {:?}", self.sources)));
        }
        Ok(url)
    }

    /// How the key is chosen, and why there is none when a source found none. Git runs off the
    /// async thread.
    async fn key_plan(&self) -> Result<(KeyPlan, Option<String>), OperationError> {
        Ok(match self.sources.first().cloned().unwrap_or(KeySource::Random) {
            KeySource::Random => (KeyPlan::Random, None),
            KeySource::Derived { generation } => (KeyPlan::Fixed(self.ops.derived_key(&self.name, generation)), None),
            KeySource::Explicit(key) => (KeyPlan::Fixed(key), None),
            KeySource::Git { dir, mode } => {
                let found = tokio::task::spawn_blocking(move || key_from_git(&dir, mode))
                    .await
                    .map_err(|e| self.invalid(format!("reading the git key failed: {e}")))?;
                match found {
                    Ok(key) => (KeyPlan::Fixed(key), None),
                    Err(why) => {
                        tracing::warn!(operation = %self.name, "no idempotency key from git: {why}");
                        (KeyPlan::None, Some(why.to_string()))
                    }
                }
            }
            KeySource::None => (KeyPlan::None, None),
        })
    }

    /// Records `done` (found by reading back, for a previous run) as the outcome of this run's
    /// fixed key, without a status: the key itself was never sent. Nothing to do while `done`'s
    /// record waits: the wait binds the key when it ends.
    ///
    /// A key pinned to another payload stays as it is (it is refused for this payload anyway):
    /// the previous run's outcome, found and recorded, is this run's answer either way.
    pub(super) async fn bind_recovery(
        &self,
        url: &str,
        fp: &str,
        plan: &KeyPlan,
        done: &Completed,
    ) -> Result<(), OperationError> {
        let claim = match self.begin(url, fp, plan.clone(), None).await {
            Ok(Begun::Send { claim, .. }) => claim,
            Ok(_) | Err(OperationError::PayloadMismatch(_)) => return Ok(()),
            Err(OperationError::Journal(source)) => {
                return Err(OperationError::Unrecorded { operation: self.name.clone(), key: done.key.clone(), source });
            }
            Err(other) => return Err(other),
        };
        let identity = Some(self.identity_record(&done.resource));
        let finish = Finish::new(claim.clone(), OpState::Succeeded, self.ops.clock.now()).identity(identity);
        self.record(finish).await.map_err(OperationError::journal)
    }

    /// A `303 See Other` answering the write: it was done, and the result is at `Location`.
    /// Read there (a `GET` within the write's origin), or `Null` when it cannot be read yet
    /// (a read that lags the write) or is elsewhere.
    async fn see_other(&self, headers: &http::HeaderMap, resource: Value) -> Value {
        let base = self.url.as_deref().and_then(|u| url::Url::parse(u).ok());
        let location = headers.get(http::header::LOCATION).and_then(|v| v.to_str().ok());
        let Some(target) = base.as_ref().zip(location).and_then(|(base, at)| base.join(at).ok()) else {
            return resource;
        };
        if base.is_some_and(|base| base.origin() != target.origin()) {
            tracing::info!(operation = %self.name, "a 303 points to another origin: not read there");
            return resource;
        }
        let read = self.ops.client.get(target).with_extension(RequestOptions::new().buffer_body()).send().await;
        match read {
            Ok(response) if response.status().is_success() => match response.bytes().await {
                Ok(body) => serde_json::from_slice(&body).unwrap_or(resource),
                Err(_) => resource,
            },
            Ok(response) => {
                tracing::info!(operation = %self.name, status = %response.status(), "the 303's result cannot be read yet");
                resource
            }
            Err(e) => {
                tracing::info!(operation = %self.name, "the 303's result cannot be read: {e}");
                resource
            }
        }
    }

    /// Waits until the in-flight window since `sent` has passed.
    async fn wait_in_flight(&self, sent: SystemTime) {
        let until = sent + self.ops.in_flight_window;
        if let Ok(left) = until.duration_since(self.ops.clock.now())
            && !left.is_zero()
        {
            tracing::info!(operation = %self.name, "waiting {left:?} for a request that may still be on its way before reading back");
            self.ops.sleeper.sleep(left).await;
        }
    }

    /// The server refused the key as used with another payload: a final refusal, with its body.
    async fn key_refusal(
        &self,
        error: &reqwest_middleware::Error,
        claim: &Claim,
    ) -> Result<Option<OperationError>, OperationError> {
        let Some(Error::KeyReuse(failure)) = Error::find(error) else { return Ok(None) };
        let crate::error::LastAttempt::Status { status, body, .. } = &failure.last else { return Ok(None) };
        let finish =
            Finish::new(claim.clone(), OpState::NotApplied, self.ops.clock.now()).status(Some(status.as_u16()));
        self.finish(claim, finish).await?;
        Ok(Some(OperationError::Rejected {
            operation: self.name.clone(),
            status: *status,
            body: body.clone(),
            attempts: failure.attempts,
            key: claim.key.clone(),
            key_reuse: true,
        }))
    }

    /// Whether the key's age is past the server's retention, less the margin. A key recorded
    /// in this clock's future (by a machine whose clock was ahead, or while this one was) has
    /// an unknown age: it counts as past, so it is read back, never resent blind.
    fn past_retention(&self, claim: &Claim) -> bool {
        let (retention, margin) = self.retention_and_margin();
        self.key_age(claim).is_none_or(|age| age >= retention.saturating_sub(margin))
    }

    fn retention_and_margin(&self) -> (Duration, Duration) {
        let retention = self.retention.unwrap_or(self.ops.retention);
        (retention, self.ops.margin.unwrap_or(retention / 10))
    }

    /// How long ago the key was first recorded, by this clock; `None` for a time in its future.
    fn key_age(&self, claim: &Claim) -> Option<Duration> {
        self.ops.clock.now().duration_since(claim.created_at).ok()
    }

    fn retention_reason(&self, claim: &Claim) -> String {
        let retention = self.retention_and_margin().0.as_secs();
        match self.key_age(claim) {
            Some(age) => format!(
                "the key was recorded {}s ago, past the server's retention ({retention}s) less the margin; the server may have forgotten it, so it is not resent. Attach a read-back",
                age.as_secs()
            ),
            None => format!(
                "the key was recorded at {}, in this clock's future (a clock that was or is wrong): its age is unknown, so it counts as past the server's retention ({retention}s) and is not resent. Attach a read-back",
                crate::time::rfc3339(claim.created_at)
            ),
        }
    }

    async fn begin(
        &self,
        url: &str,
        fp: &str,
        plan: KeyPlan,
        waited_for: Option<Claim>,
    ) -> Result<Begun, OperationError> {
        let intent = Intent::new(&self.name, self.method.as_str(), url, fp, plan, self.ops.clock.now())
            .after(waited_for)
            .happening_once(self.once);
        self.ops.store().begin(&intent).await.map_err(OperationError::journal)
    }

    /// How long this run waits for another machine's run to settle: its deadline, else its
    /// policy's, else 5 minutes.
    fn holder_wait(&self) -> Duration {
        self.deadline.or_else(|| self.policy.as_ref().and_then(|p| p.deadline())).unwrap_or(Duration::from_secs(300))
    }

    /// Waits a little (250 ms doubling to 5 s) for `held`'s run, live on another machine, to
    /// settle or its lease to expire; never past [`holder_wait`](Self::holder_wait) since
    /// `since`. Nothing is sent meanwhile.
    async fn wait_for_holder(&self, held: &Record, since: SystemTime, polls: u32) -> Result<(), OperationError> {
        let limit = self.holder_wait();
        let waited = self.ops.clock.now().duration_since(since).unwrap_or_default();
        if waited >= limit {
            return Err(self.unknown(
                held.key.clone(),
                format!(
                    "another run holds the operation (its lease in the journal is live) and did not settle within {}s; nothing was sent. Run again later: its outcome, or its expired lease, decides what this run does",
                    limit.as_secs()
                ),
            ));
        }
        let pause = Duration::from_millis(250).saturating_mul(1 << polls.min(5)).min(Duration::from_secs(5));
        tracing::info!(operation = %self.name, "another run holds the operation: waiting {pause:?} for it to settle");
        self.ops.sleeper.sleep(pause.min(limit - waited)).await;
        Ok(())
    }

    /// Records how the run ended, once its request was sent.
    pub(super) async fn finish(&self, claim: &Claim, finish: Finish) -> Result<(), OperationError> {
        self.record(finish).await.map_err(|source| OperationError::Unrecorded {
            operation: self.name.clone(),
            key: claim.key.clone(),
            source,
        })
    }

    /// Records that a run took no effect, before anything of this run was sent.
    async fn settle_as_failed(&self, claim: &Claim) -> Result<(), OperationError> {
        let finish = Finish::new(claim.clone(), OpState::NotApplied, self.ops.clock.now());
        self.record(finish).await.map_err(OperationError::journal)
    }

    /// `finish` as a compare-and-set: a newer run's record is left alone.
    async fn record(&self, finish: Finish) -> Result<(), JournalError> {
        let applied = self.ops.store().finish(&self.name, &finish).await?;
        if !applied {
            tracing::info!(operation = %self.name, "the journal's record moved on to a newer run: this run's outcome is not recorded over it");
        }
        Ok(())
    }

    fn unknown(&self, key: Option<IdempotencyKey>, reason: String) -> OperationError {
        OperationError::Unknown { operation: self.name.clone(), key, reason }
    }

    async fn send_once(
        &self,
        url: &str,
        key: Option<&IdempotencyKey>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        // The answer is read within the attempt: a body that stalls or is cut short is a lost
        // answer (retried with the key), and its size is bounded.
        let options = RequestOptions::new().buffer_body();
        let mut options = match key {
            Some(key) => options.key(key.clone()),
            None => options.no_key(),
        };
        if let Some(policy) = &self.policy {
            options = options.policy(policy.clone());
        }
        if let Some(deadline) = self.deadline {
            options = options.deadline(deadline);
        }
        self.ops
            .client
            .request(self.method.clone(), url)
            .headers(self.headers.clone())
            .body(self.body.clone())
            .with_extension(options)
            .send()
            .await
    }

    async fn lookup(&self, read_back: &ReadBack) -> Result<Option<Value>, OperationError> {
        read_back
            .lookup(&self.ops.client)
            .await
            .map_err(|source| OperationError::ReadBack { operation: self.name.clone(), source })
    }

    /// Gave up on a request that may have been applied.
    fn gave_up(&self, source: reqwest_middleware::Error, claim: &Claim) -> OperationError {
        OperationError::GaveUp {
            operation: self.name.clone(),
            key: claim.key.clone(),
            may_have_been_applied: true,
            source,
        }
    }

    /// Gave up on a request that was not applied.
    fn not_applied(&self, source: reqwest_middleware::Error, claim: &Claim) -> OperationError {
        OperationError::GaveUp {
            operation: self.name.clone(),
            key: claim.key.clone(),
            may_have_been_applied: false,
            source,
        }
    }

    /// The identity fields of `resource` as the journal keeps them: `id` and the declared and
    /// expected fields, as found (`null` where missing), whether or not they match.
    pub(super) fn identity_record(&self, resource: &Value) -> Value {
        let mut identity = serde_json::Map::new();
        let fields = std::iter::once("id").chain(self.identity.iter().map(String::as_str));
        for field in fields.chain(self.expect.iter().map(|(f, _)| f.as_str())) {
            if let Some(value) = resource.get(field) {
                identity.insert(field.to_owned(), value.clone());
            } else if field != "id" {
                identity.insert(field.to_owned(), Value::Null);
            }
        }
        Value::Object(identity)
    }

    /// Identity fields of `resource`, checked against the expectations.
    pub(super) fn identity_of(&self, resource: &Value) -> Result<BTreeMap<String, Value>, OperationError> {
        let mut identity = BTreeMap::new();
        if let Some(id) = resource.get("id") {
            identity.insert("id".to_owned(), id.clone());
        }
        for field in &self.identity {
            let Some(value) = resource.get(field) else {
                let expected = Value::String("a value".into());
                return Err(IdentityMismatch::error(&self.name, field, expected, Value::Null, resource.clone()));
            };
            identity.insert(field.clone(), value.clone());
        }
        for (field, expected) in &self.expect {
            let found = resource.get(field).cloned().unwrap_or(Value::Null);
            if found != *expected {
                return Err(IdentityMismatch::error(&self.name, field, expected.clone(), found, resource.clone()));
            }
            identity.insert(field.clone(), found);
        }
        Ok(identity)
    }

    /// Records how a run whose answer came back ended, unless it was a resend of a success
    /// the journal already knows.
    async fn ended(
        &self,
        run: &Run,
        state: OpState,
        status: StatusCode,
        now: SystemTime,
    ) -> Result<(), OperationError> {
        if run.resending_success {
            return Ok(());
        }
        self.finish(&run.claim, Finish::new(run.claim.clone(), state, now).status(Some(status.as_u16()))).await
    }

    /// Records that the run created `resource`, with its identity as found.
    async fn succeeded(
        &self,
        claim: &Claim,
        status: StatusCode,
        resource: &Value,
        now: SystemTime,
    ) -> Result<(), OperationError> {
        let finish = Finish::new(claim.clone(), OpState::Succeeded, now)
            .status(Some(status.as_u16()))
            .identity(Some(self.identity_record(resource)));
        self.finish(claim, finish).await
    }

    /// Where to wait for what the answer created, when the operation waits. When the answer
    /// names nowhere that can be polled, what was created is recorded as it is, then the
    /// error says why there is no wait.
    /// `status` is `None` for a resource found by reading back: none is recorded, since this
    /// key may never have reached the server.
    async fn handle_or_record(
        &self,
        claim: &Claim,
        status: Option<StatusCode>,
        headers: &http::HeaderMap,
        resource: &Value,
        now: SystemTime,
    ) -> Result<Option<Handle>, OperationError> {
        match self.handle_for(status.unwrap_or(StatusCode::OK), headers, resource, claim) {
            Ok(handle) => Ok(handle),
            Err(e) => {
                let finish = Finish::new(claim.clone(), OpState::Succeeded, now)
                    .status(status.map(|s| s.as_u16()))
                    .identity(Some(self.identity_record(resource)));
                self.finish(claim, finish).await?;
                Err(e)
            }
        }
    }

    /// Where to wait for what the answer created, when the operation waits.
    fn handle_for(
        &self,
        status: StatusCode,
        headers: &http::HeaderMap,
        resource: &Value,
        claim: &Claim,
    ) -> Result<Option<Handle>, OperationError> {
        let Some(spec) = &self.wait else { return Ok(None) };
        let create_url =
            url::Url::parse(self.url.as_deref().unwrap_or_default()).map_err(|e| self.invalid(e.to_string()))?;
        let answered = Answered { status, headers, resource, create_url: &create_url, id_field: "id" };
        Handle::detect(&answered, spec).map_err(|why| {
            OperationError::Wait(Box::new(WaitFailed {
                operation: self.name.clone(),
                key: claim.key.clone(),
                handle: None,
                source: WaitError::Poll(why.into()),
            }))
        })
    }

    /// Records that the run created `resource` and waits for it at `handle`.
    async fn waiting(
        &self,
        claim: &Claim,
        status: Option<StatusCode>,
        resource: &Value,
        handle: &Handle,
        now: SystemTime,
    ) -> Result<(), OperationError> {
        let finish = Finish::new(claim.clone(), OpState::Waiting, now)
            .status(status.map(|s| s.as_u16()))
            .identity(Some(self.identity_record(resource)))
            .handle(Some(handle));
        self.finish(claim, finish).await
    }

    /// The identity fields `resource` has, unchecked: what is known before a wait.
    fn identity_seen(&self, resource: &Value) -> BTreeMap<String, Value> {
        let fields = std::iter::once("id").chain(self.identity.iter().map(String::as_str));
        fields
            .chain(self.expect.iter().map(|(f, _)| f.as_str()))
            .filter_map(|field| resource.get(field).filter(|v| !v.is_null()).map(|v| (field.to_owned(), v.clone())))
            .collect()
    }
}

impl OperationRun<'_, '_> {
    /// Begin, send, answer.
    async fn run(&self, url: String, plan: KeyPlan) -> Result<Ran, OperationError> {
        let fp = fingerprint(self.op.method.as_str(), &url, &self.op.body);
        let stored_url = crate::target::redact_str(&url);
        let (done, claim) = match self.begin_run(&stored_url, &fp, &plan).await? {
            Start::Done(done, claim) => (*done, claim),
            Start::Resume(record) => self.resume(*record),
            Start::Send(run) => {
                tracing::Span::current().record("key", run.claim.key.as_ref().map(IdempotencyKey::fingerprint));
                (self.send_until_settled(&url, &run).await?, run.claim)
            }
        };
        let waiting = done.handle.is_some();
        // A wait that ends with a fixed key not yet on record binds the key to what it found
        // (see `bind_recovery`): a recovery, or a resumed wait of another run's.
        let binding = (waiting && matches!(plan, KeyPlan::Fixed(_))).then(|| Binding { url: stored_url, fp, plan });
        Ok(Ran { done, claim: waiting.then_some(claim), binding })
    }

    /// An earlier run's create, waiting: its record, to resume the wait from. Nothing is sent.
    fn resume(&self, record: Record) -> (Completed, Claim) {
        let claim = record.claim();
        tracing::Span::current().record("key", record.key.as_ref().map(IdempotencyKey::fingerprint));
        let resource = record.identity.clone().unwrap_or(Value::Null);
        let done = Completed {
            resolution: Resolution::Resumed,
            status: record.status.and_then(|s| StatusCode::from_u16(s).ok()),
            identity: self.op.identity_seen(&resource),
            resource,
            body: Bytes::new(),
            key: record.key,
            resumed: true,
            attempts: 0,
            may_be_replay: false,
            key_acknowledged: false,
            no_key_reason: self.no_key_reason.clone(),
            handle: record.handle,
        };
        (done, claim)
    }

    /// Asks the journal what this run does, settling what stands in the way first: a previous
    /// run that may have taken effect, a key the server may have forgotten.
    async fn begin_run(&self, url: &str, fp: &str, plan: &KeyPlan) -> Result<Start, OperationError> {
        // Another process may change the record between two looks; a few rounds settle that.
        // A run on another machine holding the record is waited for, without counting.
        let mut waited_for = None;
        let mut rounds = 0;
        let waiting_since = self.op.ops.clock.now();
        let mut polls = 0;
        while rounds < 4 {
            rounds += 1;
            match self.op.begin(url, fp, plan.clone(), waited_for.clone()).await? {
                Begun::Running(held) => {
                    rounds -= 1;
                    polls += 1;
                    self.op.wait_for_holder(&held, waiting_since, polls).await?;
                    waited_for = Some(held.claim());
                }
                // The run waited for succeeded, or the operation happens once and did: that
                // result is this run's. Nothing is sent.
                Begun::Succeeded(record)
                    if self.op.once || waited_for.as_ref().is_some_and(|c| record.is_claimed_by(c)) =>
                {
                    let claim = record.claim();
                    return self.succeeded_earlier(record).await.map(|done| Start::done(done, claim));
                }
                Begun::Send { claim, resumed } => {
                    if !resumed || !self.op.past_retention(&claim) {
                        return Ok(Start::Send(Run { claim, resumed, resending_success: false }));
                    }
                    // The server may have forgotten the key: it is not resent blind.
                    let Some(read_back) = &self.op.read_back else {
                        self.op
                            .finish(&claim, Finish::new(claim.clone(), OpState::Unknown, self.op.ops.clock.now()))
                            .await?;
                        return Err(self.op.unknown(claim.key.clone(), self.op.retention_reason(&claim)));
                    };
                    if let Some(found) = self.op.lookup(read_back).await? {
                        let done = self.recovered(found, &claim).await?;
                        return Ok(Start::done(done, claim));
                    }
                    // Not there: nothing was created. A random key is renewed; a fixed one is
                    // sent again (the server no longer knows it).
                    if *plan != KeyPlan::Random {
                        return Ok(Start::Send(Run { claim, resumed, resending_success: false }));
                    }
                    self.op.settle_as_failed(&claim).await?;
                }
                Begun::Waiting(record) => return Ok(Start::Resume(Box::new(record))),
                Begun::Succeeded(record) => {
                    let claim = record.claim();
                    // A success the server answered under this key, which it still holds: it
                    // replays. One found by reading back (no status) may never have reached the
                    // server under this key: never sent blind.
                    if record.status.is_some() && !self.op.past_retention(&claim) {
                        return Ok(Start::Send(Run { claim, resumed: false, resending_success: true }));
                    }
                    return self.succeeded_earlier(record).await.map(|done| Start::done(done, claim));
                }
                Begun::Unsettled(previous) => {
                    let claim = previous.claim();
                    let Some(read_back) = &self.op.read_back else {
                        return Err(self.op.unknown(
                            previous.key.clone(),
                            format!(
                                "a previous run ({}, {}, {}) may have taken effect, and this run cannot resume it; attach a read-back, or check the server and then forget the operation (`idem journal forget`, KeyStore::forget)",
                                previous.state,
                                previous.key.as_ref().map_or_else(|| "no key".to_owned(), |k| format!("key sha256:{}", k.fingerprint())),
                                crate::time::rfc3339(previous.updated_at)
                            ),
                        ));
                    };
                    // The previous run's request may still be on its way.
                    self.op.wait_in_flight(previous.updated_at).await;
                    if let Some(found) = self.op.lookup(read_back).await? {
                        let done = self.recovered(found, &claim).await?;
                        // The previous run did this run's work: a fixed key remembers it, as a
                        // success it never sent (so it is never sent blind after).
                        if let KeyPlan::Fixed(_) = plan {
                            self.op.bind_recovery(url, fp, plan, &done).await?;
                        }
                        return Ok(Start::done(done, claim));
                    }
                    // Not there: the previous run did not take effect. Settle it, then plan again.
                    self.op.settle_as_failed(&claim).await?;
                }
            }
        }
        Err(self
            .op
            .unknown(None, "the journal's record kept changing under this run (another process is running it?)".into()))
    }

    /// Sends; if the outcome is unknown, reads back; if not found, sends once more.
    async fn send_until_settled(&self, url: &str, run: &Run) -> Result<Completed, OperationError> {
        let mut read_back_done = false;
        loop {
            let error = match self.op.send_once(url, run.claim.key.as_ref()).await {
                Ok(response) if is_unfollowed_redirect(response.status()) => {
                    return self.redirect_unfollowed(response.status(), run).await;
                }
                Ok(response) => return self.answered(response, run).await,
                Err(error) => error,
            };
            if run.resending_success {
                // The journal already knows it succeeded; a failed replay changes nothing there.
                return Err(self.op.gave_up(error, &run.claim));
            }
            if let Some(why) = never_sent(&error) {
                // It could not be sent at all: nothing to settle.
                self.op.settle_as_failed(&run.claim).await?;
                return Err(self.op.invalid(why));
            }
            if let Some(refusal) = self.op.key_refusal(&error, &run.claim).await? {
                return Err(refusal);
            }
            let may_have_been_applied = Error::find(&error).is_none_or(Error::may_have_been_applied);
            if !may_have_been_applied {
                let status = error.status().map(|s| s.as_u16());
                self.op
                    .finish(
                        &run.claim,
                        Finish::new(run.claim.clone(), OpState::NotApplied, self.op.ops.clock.now()).status(status),
                    )
                    .await?;
                return Err(self.op.not_applied(error, &run.claim));
            }
            let failed_at = self.op.ops.clock.now();
            let Some(read_back) = self.op.read_back.as_ref().filter(|_| !read_back_done) else {
                self.op.finish(&run.claim, Finish::new(run.claim.clone(), OpState::Unknown, failed_at)).await?;
                return Err(self.op.gave_up(error, &run.claim));
            };
            if run.claim.key.is_none() {
                // Without a key, "not found" must also mean "not on its way": wait that out.
                self.op.wait_in_flight(failed_at).await;
            }
            if let Some(found) = self.op.lookup(read_back).await? {
                return self.recovered(found, &run.claim).await;
            }
            read_back_done = true;
            tracing::info!(operation = %self.op.name, "not found by reading back: sending again");
        }
    }

    /// A write answered with a redirect the layer could not follow (no usable `Location`, a
    /// 300 or a 304): neither done nor refused. Settled by the read-back if there is one, else
    /// unknown; never "not applied".
    async fn redirect_unfollowed(&self, status: StatusCode, run: &Run) -> Result<Completed, OperationError> {
        if let Some(read_back) = &self.op.read_back
            && let Some(found) = self.op.lookup(read_back).await?
        {
            return self.recovered(found, &run.claim).await;
        }
        let finish =
            Finish::new(run.claim.clone(), OpState::Unknown, self.op.ops.clock.now()).status(Some(status.as_u16()));
        if !run.resending_success {
            self.op.finish(&run.claim, finish).await?;
        }
        Err(self.op.unknown(
            run.claim.key.clone(),
            format!("the server answered the write with {status}, a redirect with nowhere to follow it to; whether it was applied is unknown"),
        ))
    }

    /// A fixed key that succeeded, past the server's retention: the journal's record, refreshed
    /// by the read-back when there is one. Nothing is sent.
    async fn succeeded_earlier(&self, record: Record) -> Result<Completed, OperationError> {
        let claim = record.claim();
        if let Some(read_back) = &self.op.read_back {
            return match self.op.lookup(read_back).await? {
                Some(found) => self.recovered(found, &claim).await,
                None => Err(OperationError::Gone {
                    operation: self.op.name.clone(),
                    identity: record.identity.unwrap_or(Value::Null),
                }),
            };
        }
        let identity: BTreeMap<String, Value> = match &record.identity {
            Some(Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            _ => BTreeMap::new(),
        };
        let status = record.status.and_then(|s| StatusCode::from_u16(s).ok());
        let resource = record.identity.clone().unwrap_or(Value::Null);
        // Asked to be ready: wait at the resource the journal names.
        let handle = match &self.op.wait {
            Some(spec) if spec.has_state() => {
                let handle = self
                    .op
                    .handle_or_record(&claim, status, &http::HeaderMap::new(), &resource, self.op.ops.clock.now())
                    .await?;
                if let Some(handle) = &handle {
                    self.op.waiting(&claim, status, &resource, handle, self.op.ops.clock.now()).await?;
                }
                handle
            }
            _ => None,
        };
        Ok(Completed {
            resolution: Resolution::Recorded,
            status,
            resource,
            body: Bytes::new(),
            identity,
            key: record.key,
            resumed: false,
            attempts: 0,
            may_be_replay: false,
            key_acknowledged: false,
            no_key_reason: self.no_key_reason.clone(),
            handle,
        })
    }

    async fn answered(&self, response: reqwest::Response, run: &Run) -> Result<Completed, OperationError> {
        let claim = &run.claim;
        let now = self.op.ops.clock.now();
        let Some(record) = RetryOutcome::of(&response).cloned() else {
            self.op.ended(run, OpState::Unknown, response.status(), now).await?;
            return Err(self.op.invalid(
                "the client has no IdempotentRetry layer, so the request went out without its key; build it with Operations::with_layer",
            ));
        };
        let status = response.status();
        let headers = response.headers().clone();
        // In memory already: the layer read it within the attempt (`buffer_body`).
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => {
                self.op.ended(run, OpState::Unknown, status, now).await?;
                return Err(self.op.gave_up(e.into(), claim));
            }
        };
        if !record.succeeded {
            self.op.ended(run, OpState::NotApplied, status, now).await?;
            return Err(OperationError::Rejected {
                operation: self.op.name.clone(),
                status,
                body,
                attempts: record.attempts,
                key: claim.key.clone(),
                key_reuse: false,
            });
        }
        let mut resource = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status == StatusCode::SEE_OTHER {
            resource = self.op.see_other(&headers, resource).await;
        }
        let resolution = if record.replayed { Resolution::Replayed } else { Resolution::Created };
        // A replay carries the state of its time: trust its identity, re-read the state.
        if resolution == Resolution::Replayed
            && let Some(read_back) = &self.op.read_back
            && let Some(fresh) = self.op.lookup(read_back).await?
        {
            if fresh.get("id").is_some() && fresh.get("id") != resource.get("id") {
                let expected = resource.get("id").cloned().unwrap_or(Value::Null);
                self.op.succeeded(claim, status, &resource, now).await?;
                let found = fresh.get("id").cloned().unwrap_or(Value::Null);
                return Err(IdentityMismatch::error(&self.op.name, "id", expected, found, fresh));
            }
            resource = fresh;
        }
        // A replay of a success the journal knows is waited for too: the caller asked for it
        // ready, and the record says waiting until it is.
        let handle = self.op.handle_or_record(claim, Some(status), &headers, &resource, now).await?;
        let identity = match &handle {
            // Journaled before the wait, with the identity known so far; checked once ready.
            Some(handle) => {
                self.op.waiting(claim, Some(status), &resource, handle, now).await?;
                self.op.identity_seen(&resource)
            }
            // What was created is recorded, whether or not its identity is the one expected:
            // it is this operation's, and a re-run must not create another.
            None => {
                self.op.succeeded(claim, status, &resource, now).await?;
                self.op.identity_of(&resource)?
            }
        };
        Ok(Completed {
            resolution,
            status: Some(status),
            resource,
            body,
            identity,
            key: claim.key.clone(),
            resumed: run.resumed,
            attempts: record.attempts,
            may_be_replay: record.may_be_replay || run.resumed || run.resending_success,
            key_acknowledged: record.key_acknowledged,
            no_key_reason: self.no_key_reason.clone(),
            handle,
        })
    }

    async fn recovered(&self, found: Value, claim: &Claim) -> Result<Completed, OperationError> {
        let now = self.op.ops.clock.now();
        let handle = self.op.handle_or_record(claim, None, &http::HeaderMap::new(), &found, now).await?;
        let identity = match &handle {
            Some(handle) => {
                self.op.waiting(claim, None, &found, handle, now).await?;
                self.op.identity_seen(&found)
            }
            None => {
                let finish = Finish::new(claim.clone(), OpState::Succeeded, self.op.ops.clock.now())
                    .identity(Some(self.op.identity_record(&found)));
                self.op.finish(claim, finish).await?;
                self.op.identity_of(&found)?
            }
        };
        Ok(Completed {
            resolution: Resolution::Recovered,
            status: None,
            resource: found,
            body: Bytes::new(),
            identity,
            key: claim.key.clone(),
            resumed: false,
            attempts: 0,
            may_be_replay: false,
            key_acknowledged: false,
            no_key_reason: self.no_key_reason.clone(),
            handle,
        })
    }
}

/// What a run does once the journal has been asked.
enum Start {
    /// Nothing to send: settled by reading back, or by the journal's record, whose claim it is.
    Done(Box<Completed>, Claim),
    /// Nothing to send: an earlier run's create is waiting; resume the wait.
    Resume(Box<Record>),
    /// Send, as this run.
    Send(Run),
}

impl Start {
    fn done(completed: Completed, claim: Claim) -> Self {
        Start::Done(Box::new(completed), claim)
    }
}

/// How far a run went before any wait.
#[derive(Debug)]
pub(super) struct Ran {
    pub done: Completed,
    /// The claim the wait reports to, when there is a wait.
    pub claim: Option<Claim>,
    pub binding: Option<Binding>,
}

/// A fixed key to bind to what a wait finds, once ready.
#[derive(Debug)]
pub(super) struct Binding {
    pub url: String,
    pub fp: String,
    pub plan: KeyPlan,
}

/// The run about to send.
struct Run {
    /// Its key and when that key was first recorded.
    claim: Claim,
    /// The key is a previous run's.
    resumed: bool,
    /// The key already succeeded (within the server's retention): the server replays, and the
    /// journal's record is refreshed only by a success.
    resending_success: bool,
}

/// A redirect the layer handed back without following it: not a 303 (the write's answer), and
/// not one it follows or refuses (those never come back as responses).
fn is_unfollowed_redirect(status: StatusCode) -> bool {
    status.is_redirection() && status != StatusCode::SEE_OTHER
}

/// Why a request could not be sent at all, if that is how it failed: the request could not be
/// built, or the layer refused it before the first attempt.
fn never_sent(error: &reqwest_middleware::Error) -> Option<String> {
    match error {
        reqwest_middleware::Error::Reqwest(e) if e.is_builder() => Some(e.to_string()),
        _ => match Error::find(error) {
            Some(e @ (Error::InvalidKey(_) | Error::InvalidRequest(_))) => Some(crate::error::chain(e)),
            _ => None,
        },
    }
}
