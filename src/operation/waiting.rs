//! Waiting for what an operation created: stage by stage, each stage's handle journaled before
//! it is polled.

use std::time::SystemTime;

use super::run::Binding;
use super::{Completed, OperationBuilder, OperationError, WaitFailed};
use crate::journal::OpState;
use crate::journal::store::{Claim, Finish};
use crate::wait::{Handle, Poller, Stage, WaitError};

impl OperationBuilder<'_> {
    /// Polls `done`'s handle until the resource is ready, then records it as succeeded. The
    /// record stays waiting if the wait ends otherwise, so a re-run resumes it.
    pub(super) async fn wait_until_ready(
        &self,
        mut done: Completed,
        claim: Option<Claim>,
        binding: Option<Binding>,
    ) -> Result<Completed, OperationError> {
        // An earlier run's wait, resumed by a run that does not wait itself: the caller sees the
        // handle, the record stays as it is.
        let (Some(mut handle), Some(claim), Some(spec)) = (done.handle.clone(), claim, self.wait.as_ref()) else {
            return Ok(done);
        };
        let create_url =
            url::Url::parse(self.url.as_deref().unwrap_or_default()).map_err(|e| self.invalid(e.to_string()))?;
        let waiter = self.ops.waiter();
        let started = waiter.now();
        let poller = Poller {
            client: &self.ops.client,
            waiter: waiter.clone(),
            spec,
            create_url: &create_url,
            id_field: "id",
            until: started + spec.timeout_limit(),
        };
        loop {
            let stage = poller.stage(&handle).await;
            let waited = waiter.now().duration_since(started).unwrap_or_default();
            match stage {
                Ok(Stage::Ready(ready)) => {
                    crate::telemetry::resource_wait("ready", waited);
                    if !ready.resource.is_null() {
                        done.resource = ready.resource;
                    }
                    self.ready(&claim, &done, waiter.now()).await?;
                    done.handle = None;
                    if let Some(Binding { url, fp, plan }) = &binding {
                        self.bind_recovery(url, fp, plan, &done).await?;
                    }
                    done.identity = self.identity_of(&done.resource)?;
                    return Ok(done);
                }
                Ok(Stage::Then(next)) => {
                    self.next_stage(&claim, &done, &next, waiter.now()).await?;
                    done.handle = Some(next.clone());
                    handle = next;
                }
                Err(source) => {
                    let outcome = match source {
                        WaitError::Failed { .. } => "failed",
                        WaitError::TimedOut { .. } => "timed_out",
                        _ => "error",
                    };
                    crate::telemetry::resource_wait(outcome, waited);
                    return Err(OperationError::Wait(Box::new(WaitFailed {
                        operation: self.name.clone(),
                        key: claim.key.clone(),
                        handle: Some(handle),
                        source,
                    })));
                }
            }
        }
    }

    /// Records the resource as ready: the operation succeeded.
    async fn ready(&self, claim: &Claim, done: &Completed, now: SystemTime) -> Result<(), OperationError> {
        let finish = Finish::new(claim.clone(), OpState::Succeeded, now)
            .status(done.status.map(|s| s.as_u16()))
            .identity(Some(self.identity_record(&done.resource)));
        self.finish(claim, finish).await
    }

    /// Records the next stage's handle before it is polled.
    async fn next_stage(
        &self,
        claim: &Claim,
        done: &Completed,
        next: &Handle,
        now: SystemTime,
    ) -> Result<(), OperationError> {
        let finish = Finish::new(claim.clone(), OpState::Waiting, now)
            .status(done.status.map(|s| s.as_u16()))
            .identity(Some(self.identity_record(&done.resource)))
            .handle(Some(next));
        self.finish(claim, finish).await
    }
}
