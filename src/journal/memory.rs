//! Keys in memory: the journal's rules, for one process.

use std::collections::{BTreeSet, HashMap};

use super::store::{Begun, Finish, Intent, KeyPlan};
use super::{JournalError, KeyStore, Record};
use crate::key::IdempotencyKey;
use crate::time::lock;

/// Keys in memory, for one process. Useful in tests and where durability is not wanted; it
/// protects retries within the process, not re-runs.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: std::sync::Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    /// Records by operation name.
    records: HashMap<String, Record>,
    /// Retired records (settled runs with fixed keys that later runs replaced), by operation and
    /// key.
    retired: HashMap<(String, IdempotencyKey), Record>,
    /// The operations holding each key, current or retired, for the pinning check. Several
    /// operations may hold a key (with the same payload); each keeps it until it lets go.
    by_key: HashMap<IdempotencyKey, BTreeSet<String>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Memory {
    /// Whether `operation` still holds `key`, in its current record or a retired one.
    fn holds(&self, operation: &str, key: &IdempotencyKey) -> bool {
        self.records.get(operation).is_some_and(|r| r.key.as_ref() == Some(key))
            || self.retired.contains_key(&(operation.to_owned(), key.clone()))
    }

    fn index(&mut self, operation: &str, key: Option<&IdempotencyKey>) {
        if let Some(key) = key {
            self.by_key.entry(key.clone()).or_default().insert(operation.to_owned());
        }
    }

    fn unindex(&mut self, operation: &str, key: Option<&IdempotencyKey>) {
        if let Some(key) = key
            && !self.holds(operation, key)
            && let Some(holders) = self.by_key.get_mut(key)
        {
            holders.remove(operation);
            if holders.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    /// Another operation's record, current or retired, holding `key` with another payload.
    fn conflict(&self, intent: &Intent<'_>, key: &IdempotencyKey) -> Option<&Record> {
        let holders = self.by_key.get(key)?;
        holders.iter().filter(|op| op.as_str() != intent.operation).find_map(|op| {
            let current = self.records.get(op).filter(|r| r.key.as_ref() == Some(key));
            let retired = self.retired.get(&(op.clone(), key.clone()));
            current.into_iter().chain(retired).find(|r| r.fingerprint != intent.fingerprint)
        })
    }
}

#[async_trait::async_trait]
impl KeyStore for MemoryStore {
    async fn begin(&self, intent: &Intent<'_>) -> Result<Begun, JournalError> {
        let mut memory = lock(&self.inner);
        let (conflict, earlier) = match &intent.key {
            KeyPlan::Fixed(key) => {
                (memory.conflict(intent, key), memory.retired.get(&(intent.operation.to_owned(), key.clone())))
            }
            _ => (None, None),
        };
        let planned = intent
            .plan(memory.records.get(intent.operation), earlier, conflict)
            .map_err(JournalError::PayloadMismatch)?;
        if let Some(record) = planned.write {
            if let Some(retired) = planned.retire {
                let key = retired.key.clone().expect("only keyed records retire");
                memory.retired.insert((retired.operation.clone(), key), retired);
            }
            let old = memory.records.insert(record.operation.clone(), record.clone());
            memory.index(&record.operation, record.key.as_ref());
            if let Some(old) = old {
                memory.unindex(&old.operation, old.key.as_ref());
            }
        }
        Ok(planned.begun)
    }

    async fn finish(&self, operation: &str, finish: &Finish) -> Result<bool, JournalError> {
        Ok(lock(&self.inner).records.get_mut(operation).is_some_and(|r| finish.apply(r)))
    }

    async fn get(&self, operation: &str) -> Result<Option<Record>, JournalError> {
        Ok(lock(&self.inner).records.get(operation).cloned())
    }

    async fn list(&self) -> Result<Vec<Record>, JournalError> {
        let mut records: Vec<Record> = lock(&self.inner).records.values().cloned().collect();
        records.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.operation.cmp(&b.operation)));
        Ok(records)
    }

    async fn forget(&self, operation: &str) -> Result<bool, JournalError> {
        let mut memory = lock(&self.inner);
        let retired: Vec<(String, IdempotencyKey)> =
            memory.retired.keys().filter(|(op, _)| op == operation).cloned().collect();
        for id in &retired {
            memory.retired.remove(id);
        }
        let record = memory.records.remove(operation);
        let keys = retired.into_iter().map(|(_, key)| Some(key)).chain(record.as_ref().map(|r| r.key.clone()));
        for key in keys.collect::<Vec<_>>() {
            memory.unindex(operation, key.as_ref());
        }
        Ok(record.is_some())
    }
}
