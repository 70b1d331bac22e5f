//! Acting: creates in slow-start batches, deletes, and what their answers mean.

use std::time::Duration;

use serde_json::Value;
use url::Url;

use super::settle::{ExpectedCreate, ExpectedDelete, Sent};
use super::{Action, ReconcileReport, Reconciler, Slot, StopReason, field_text, journal_failure};
use crate::error::Error;
use crate::journal::Record;
use crate::operation::{Completed, OperationError};
use crate::options::RequestOptions;
use crate::outcome::RetryOutcome;

/// How one create ended, for the batch.
enum Created {
    /// Answered, or its outcome is settled another way.
    Done,
    /// Failed transiently: the batch stops, a later round tries again.
    Transient,
}

impl Reconciler {
    /// Creates, then deletes. Whether everything went through (no transient failure).
    pub(super) async fn act(
        &mut self,
        collection: &Url,
        actions: Vec<Action>,
        ledger: &[(u64, Slot, Record)],
        remaining: Duration,
        report: &mut ReconcileReport,
    ) -> Result<bool, StopReason> {
        let mut creates = Vec::new();
        let mut deletes = Vec::new();
        for action in actions {
            match action {
                Action::Create(slot) => creates.push(slot),
                Action::Delete(id) => deletes.push(id),
            }
        }
        let created = self.create_all(creates, ledger, remaining, report).await?;
        let deleted = self.delete_all(collection, deletes, remaining, report).await?;
        Ok(created && deleted)
    }

    /// Creates the slots in slow-start batches (1, 2, 4, …), stopping at the first failure.
    async fn create_all(
        &mut self,
        slots: Vec<Slot>,
        ledger: &[(u64, Slot, Record)],
        remaining: Duration,
        report: &mut ReconcileReport,
    ) -> Result<bool, StopReason> {
        let mut next = 0;
        let mut batch = 1;
        while next < slots.len() {
            let chunk = &slots[next..(next + batch).min(slots.len())];
            let mut all_done = true;
            for group in chunk.chunks(self.settings.concurrency) {
                let mut tasks = tokio::task::JoinSet::new();
                for (order, slot) in group.iter().enumerate() {
                    let request = self.create_request(slot, remaining);
                    tasks.spawn(async move { (order, request.await) });
                }
                let mut results = tasks.join_all().await;
                results.sort_by_key(|(order, _)| *order);
                // Record every answer of the group before stopping on the first fatal one.
                let mut fatal = None;
                for ((_, result), slot) in results.into_iter().zip(group) {
                    match self.created(slot, result, ledger, report).await {
                        Ok(Created::Done) => {}
                        Ok(Created::Transient) => all_done = false,
                        Err(e) => fatal = fatal.or(Some(e)),
                    }
                }
                if let Some(e) = fatal {
                    return Err(e);
                }
            }
            if !all_done {
                return Ok(false);
            }
            next += chunk.len();
            batch *= 2;
        }
        Ok(true)
    }

    fn create_request(
        &self,
        slot: &Slot,
        remaining: Duration,
    ) -> impl Future<Output = Result<Completed, OperationError>> + Send + 'static {
        let s = &self.settings;
        let mut body = s.body.clone();
        if let (Slot::Name(name), Value::Object(map)) = (slot, &mut body) {
            map.insert(s.name_field.clone(), Value::String(name.clone()));
        }
        let ops = s.ops.clone();
        let (name, url, generation, keyed) =
            (self.slot_operation(s.generation, slot), s.collection.clone(), s.generation, s.keyed);
        let expect = s.expect.clone();
        let id_field = s.id_field.clone();
        async move {
            let mut op = ops.operation(name).post(url).json(&body).identity([id_field]).deadline(remaining);
            op = if keyed { op.derived_key(generation) } else { op.no_key() };
            for (field, value) in expect {
                op = op.expect(field, value);
            }
            op.send().await
        }
    }

    /// Takes in one create's result.
    async fn created(
        &mut self,
        slot: &Slot,
        result: Result<Completed, OperationError>,
        ledger: &[(u64, Slot, Record)],
        report: &mut ReconcileReport,
    ) -> Result<Created, StopReason> {
        match result {
            Ok(done) => {
                report.requests += u64::from(done.attempts);
                let id = self.usable_id(slot, &done.resource, ledger)?;
                self.answered(slot, id, report);
                Ok(Created::Done)
            }
            Err(OperationError::IdentityMismatch(mismatch)) => {
                report.requests += 1;
                // What the server made is this operation's, whatever it is: reported, and
                // journaled by the operation, so no later run creates it again.
                if let Ok(id) = self.usable_id(slot, &mismatch.resource, ledger) {
                    self.answered(slot, id, report);
                }
                Err(StopReason::Identity(mismatch))
            }
            Err(OperationError::Rejected { status, body, attempts, .. }) => {
                report.requests += u64::from(attempts);
                Err(StopReason::Rejected {
                    slot: slot.to_string(),
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                })
            }
            Err(
                e @ (OperationError::Journal(_)
                | OperationError::PayloadMismatch(_)
                | OperationError::InvalidOptions { .. }
                | OperationError::Gone { .. }),
            ) => Err(StopReason::Operation(e)),
            Err(e) => self.create_failed(slot, e, report).await,
        }
    }

    /// A create answered with item `id`: created, and expected until a list shows it.
    fn answered(&mut self, slot: &Slot, id: String, report: &mut ReconcileReport) {
        if !report.created.contains(&id) {
            report.created.push(id.clone());
        }
        self.memory.creates.retain(|c| c.slot != *slot);
        self.memory.creates.push(ExpectedCreate {
            slot: slot.clone(),
            id: Some(id),
            since: self.settings.clock.now(),
            claim: None,
            sent: Sent::AfterList(self.memory.lists),
        });
    }

    /// A create that failed after its retries: unknown when it may have been applied.
    async fn create_failed(
        &mut self,
        slot: &Slot,
        e: OperationError,
        report: &mut ReconcileReport,
    ) -> Result<Created, StopReason> {
        let now = self.settings.clock.now();
        let typed = match &e {
            OperationError::GaveUp { source, .. } => Error::find(source),
            _ => None,
        };
        report.requests += match &e {
            OperationError::GaveUp { .. } => typed.map_or(1, |t| u64::from(t.attempts())),
            _ => 0,
        };
        if e.may_have_been_applied() {
            report.unknown += 1;
            if !self.settings.keyed {
                // No key to resend with: expect it, and let the list settle it.
                let claim = self.slot_claim(slot).await?;
                self.memory.creates.push(ExpectedCreate {
                    slot: slot.clone(),
                    id: None,
                    since: now,
                    claim,
                    sent: Sent::AfterList(self.memory.lists),
                });
            }
            // A keyed slot stays free: its key is resent when an item is needed.
        }
        if matches!(typed, Some(Error::BudgetExhausted(_))) {
            return Err(StopReason::BudgetExhausted);
        }
        tracing::info!(operation = %self.settings.operation, %slot, "create failed: {e}");
        Ok(Created::Transient)
    }

    /// The id of a create's answer, if it can name an item and is not another slot's.
    fn usable_id(&self, slot: &Slot, resource: &Value, ledger: &[(u64, Slot, Record)]) -> Result<String, StopReason> {
        let s = &self.settings;
        let id = field_text(resource, &s.id_field).unwrap_or_default();
        if let Err(why) = crate::target::check_id(&id) {
            return Err(StopReason::BadId { slot: slot.to_string(), id, why });
        }
        let in_memory = self.memory.creates.iter().any(|c| c.slot != *slot && c.id.as_deref() == Some(&id));
        let journaled = ledger.iter().any(|(g, other, r)| {
            *g == s.generation
                && other != slot
                && r.identity.as_ref().and_then(|i| field_text(i, &s.id_field)).as_deref() == Some(id.as_str())
        });
        if in_memory || journaled {
            return Err(StopReason::BadId { slot: slot.to_string(), id, why: "which belongs to another slot".into() });
        }
        Ok(id)
    }

    /// The claim of the run that holds a slot's record now.
    async fn slot_claim(&self, slot: &Slot) -> Result<Option<crate::journal::store::Claim>, StopReason> {
        let name = self.slot_operation(self.settings.generation, slot);
        let record = self.settings.ops.store().get(&name).await.map_err(journal_failure)?;
        Ok(record.map(|r| r.claim()))
    }

    /// Deletes in slow-start batches; a 404 counts as done. Whether all went through.
    async fn delete_all(
        &mut self,
        collection: &Url,
        ids: Vec<String>,
        remaining: Duration,
        report: &mut ReconcileReport,
    ) -> Result<bool, StopReason> {
        let mut next = 0;
        let mut batch = 1;
        while next < ids.len() {
            let chunk = &ids[next..(next + batch).min(ids.len())];
            for group in chunk.chunks(self.settings.concurrency) {
                let mut tasks = tokio::task::JoinSet::new();
                for id in group {
                    let url = crate::target::item_url(collection, id)
                        .map_err(|why| StopReason::Delete { id: id.clone(), reason: why })?;
                    let (client, id) = (self.settings.ops.client().clone(), id.clone());
                    tasks.spawn(async move {
                        let result =
                            client.delete(url).with_extension(RequestOptions::new().deadline(remaining)).send().await;
                        (id, result)
                    });
                }
                for (id, result) in tasks.join_all().await {
                    report.requests += RetryOutcome::requests(&result);
                    match result {
                        Ok(r) if r.status().is_success() || r.status() == http::StatusCode::NOT_FOUND => {
                            report.deleted.push(id.clone());
                            self.memory.deletes.push(ExpectedDelete { id, since: self.settings.clock.now() });
                        }
                        Ok(r) => return Err(StopReason::Delete { id, reason: r.status().to_string() }),
                        Err(e) if matches!(Error::find(&e), Some(Error::BudgetExhausted(_))) => {
                            return Err(StopReason::BudgetExhausted);
                        }
                        Err(e) => {
                            report.unknown += 1;
                            tracing::info!(operation = %self.settings.operation, %id, "delete failed: {e}");
                            return Ok(false);
                        }
                    }
                }
            }
            next += chunk.len();
            batch *= 2;
        }
        Ok(true)
    }
}
