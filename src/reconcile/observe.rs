//! Observing: listing the collection, reading what the journal says about this operation.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use serde_json::Value;
use url::Url;

use super::settle::{ExpectedCreate, Listed, Sent};
use super::{ReconcileReport, Reconciler, Slot, StopReason, field_text};
use crate::error::Error;
use crate::journal::{OpState, Record};
use crate::operation::items;
use crate::options::RequestOptions;

impl Reconciler {
    /// Lists the collection. `None` when the list failed transiently (worth another round).
    pub(super) async fn observe(
        &mut self,
        collection: &Url,
        remaining: Duration,
        report: &mut ReconcileReport,
    ) -> Result<Option<Vec<Listed>>, StopReason> {
        let shown = crate::target::redact(collection);
        let options = RequestOptions::new().buffer_body().deadline(remaining);
        let result = self.settings.ops.client().get(collection.clone()).with_extension(options).send().await;
        report.requests += super::act::attempts(&result);
        let response = match result {
            Ok(response) => response,
            Err(e) if matches!(Error::find(&e), Some(Error::BudgetExhausted(_))) => {
                return Err(StopReason::BudgetExhausted);
            }
            Err(e) if Error::find(&e).is_some_and(Error::is_retryable) => {
                tracing::info!(operation = %self.settings.operation, "listing failed, trying again: {e}");
                return Ok(None);
            }
            Err(e) => return Err(StopReason::List(e.to_string())),
        };
        let status = response.status();
        if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            tracing::info!(operation = %self.settings.operation, "GET {shown} answered {status}, trying again");
            return Ok(None);
        }
        if !status.is_success() {
            return Err(StopReason::List(format!("GET {shown} answered {status}")));
        }
        // In memory already: the layer read it within the attempt (`buffer_body`).
        let body = response.bytes().await.map_err(|e| StopReason::List(e.to_string()))?;
        let listed = self.parse(collection, &body)?;
        self.memory.lists += 1;
        for item in &listed {
            self.memory.first_seen.entry(item.id.clone()).or_insert(self.memory.lists);
        }
        Ok(Some(listed))
    }

    /// The items of a list response, each with a usable id, no id twice.
    fn parse(&self, collection: &Url, body: &[u8]) -> Result<Vec<Listed>, StopReason> {
        let s = &self.settings;
        let fatal = |why: String| StopReason::List(why);
        let list: Value = serde_json::from_slice(body).map_err(|e| fatal(format!("not JSON: {e}")))?;
        let entries = match &s.items_field {
            Some(field) => {
                list.get(field).and_then(Value::as_array).ok_or_else(|| fatal(format!("no array under `{field}`")))?
            }
            None => items(&list).ok_or_else(|| fatal("no array at the top, under `items` or under `data`".into()))?,
        };
        let mut listed = Vec::with_capacity(entries.len());
        let mut ids = HashSet::new();
        for item in entries {
            let id = field_text(item, &s.id_field)
                .ok_or_else(|| fatal(format!("an item has no `{}`: {item}", s.id_field)))?;
            crate::target::item_url(collection, &id)
                .map_err(|why| fatal(format!("an item's `{}` {why}: {item}", s.id_field)))?;
            if !ids.insert(id.clone()) {
                return Err(fatal(format!("id {id} is listed twice")));
            }
            let created_at = item.get(&s.created_at_field).and_then(Value::as_str).and_then(crate::time::parse_rfc3339);
            listed.push(Listed { id, created_at, item: item.clone() });
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
