//! Observing: listing the collection, reading what the journal says about this operation.

use std::collections::{BTreeSet, HashSet};
use std::ops::ControlFlow;
use std::time::Duration;

use serde_json::Value;
use url::Url;

use super::settle::{ExpectedCreate, Listed, Sent};
use super::{ReconcileReport, Reconciler, Slot, StopReason, field_text};
use crate::error::Error;
use crate::journal::{OpState, Record};
use crate::options::RequestOptions;
use crate::pagination::ListFailure;

impl Reconciler {
    /// Lists the collection, every page of it. `None` when the list failed transiently (worth
    /// another round).
    pub(super) async fn observe(
        &mut self,
        collection: &Url,
        remaining: Duration,
        report: &mut ReconcileReport,
    ) -> Result<Option<Vec<Listed>>, StopReason> {
        let s = &self.settings;
        let shown = crate::target::redact(collection);
        let started = s.clock.now();
        let clock = s.clock.clone();
        // Each page within what is left of the round's time.
        let options = || {
            let spent = clock.now().duration_since(started).unwrap_or_default();
            RequestOptions::new().deadline(remaining.saturating_sub(spent).max(Duration::from_millis(1)))
        };
        let mut entries = Vec::new();
        let (requests, result) = s
            .pagination
            .each_page(s.ops.client(), collection, s.items_field.as_deref(), &s.id_field, options, |page| {
                entries.extend(page);
                ControlFlow::Continue(())
            })
            .await;
        report.requests += requests;
        match result {
            Ok(()) => {}
            Err(ListFailure::Request(e)) if matches!(Error::find(&e), Some(Error::BudgetExhausted(_))) => {
                return Err(StopReason::BudgetExhausted);
            }
            Err(ListFailure::Request(e)) if Error::find(&e).is_some_and(Error::is_retryable) => {
                tracing::info!(operation = %s.operation, "listing failed, trying again: {e}");
                return Ok(None);
            }
            Err(ListFailure::Request(e)) => return Err(StopReason::List(e.to_string())),
            Err(ListFailure::Status(status))
                if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS =>
            {
                tracing::info!(operation = %s.operation, "GET {shown} answered {status}, trying again");
                return Ok(None);
            }
            Err(ListFailure::Status(status)) => return Err(StopReason::List(format!("GET {shown} answered {status}"))),
            Err(ListFailure::Invalid(why)) => return Err(StopReason::List(why)),
        }
        let listed = self.parse(collection, entries)?;
        self.memory.lists += 1;
        for item in &listed {
            self.memory.first_seen.entry(item.id.clone()).or_insert(self.memory.lists);
        }
        Ok(Some(listed))
    }

    /// The items of the list, each with a usable id, no id twice.
    fn parse(&self, collection: &Url, entries: Vec<Value>) -> Result<Vec<Listed>, StopReason> {
        let s = &self.settings;
        let fatal = |why: String| StopReason::List(why);
        let mut listed = Vec::with_capacity(entries.len());
        let mut ids = HashSet::new();
        for item in entries {
            let id = field_text(&item, &s.id_field)
                .ok_or_else(|| fatal(format!("an item has no `{}`: {item}", s.id_field)))?;
            crate::target::item_url(collection, &id)
                .map_err(|why| fatal(format!("an item's `{}` {why}: {item}", s.id_field)))?;
            if !ids.insert(id.clone()) {
                return Err(fatal(format!("id {id} is listed twice")));
            }
            let created_at = item.get(&s.created_at_field).and_then(Value::as_str).and_then(crate::time::parse_rfc3339);
            listed.push(Listed { id, created_at, item });
        }
        Ok(listed)
    }
}

/// Expectations a previous process left: its keyless creates of unknown outcome in this
/// generation (a keyed one is settled by resending its key, when an item is needed).
pub(super) fn inherit(
    ledger: &[(u64, Slot, Record)],
    generation: u64,
    already: &[ExpectedCreate],
) -> Vec<ExpectedCreate> {
    ledger
        .iter()
        .filter(|(g, slot, r)| {
            *g == generation && r.state.is_unsettled() && r.key.is_none() && !already.iter().any(|c| c.slot == *slot)
        })
        .map(|(_, slot, r)| ExpectedCreate {
            slot: slot.clone(),
            id: None,
            since: r.created_at,
            claim: Some(r.claim()),
            sent: Sent::Earlier,
        })
        .collect()
}

/// Slots not to create in: expected, filled, or retired (filled and since deleted, or refused).
pub(super) fn used_slots(
    ledger: &[(u64, Slot, Record)],
    generation: u64,
    id_field: &str,
    live: &HashSet<&str>,
    creates: &[ExpectedCreate],
) -> BTreeSet<Slot> {
    let mut used: BTreeSet<Slot> = creates.iter().map(|c| c.slot.clone()).collect();
    for (g, slot, record) in ledger {
        if *g != generation {
            continue;
        }
        // A refused slot is retired too: its key may replay the refusal (Stripe caches 4xx).
        let filled = matches!(record.state, OpState::Succeeded | OpState::NotApplied);
        // A named slot whose item is gone may be filled again; an index slot is retired.
        let named_and_gone = matches!(slot, Slot::Name(_))
            && record
                .identity
                .as_ref()
                .and_then(|i| field_text(i, id_field))
                .is_none_or(|id| !live.contains(id.as_str()));
        if filled && !named_and_gone {
            used.insert(slot.clone());
        }
    }
    used
}
