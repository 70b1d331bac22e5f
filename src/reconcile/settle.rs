//! Settling what was expected against what a list shows. Pure: the round's facts come in, the
//! decisions come out, and the caller records them.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::plan::Slot;
use crate::journal::Record;
use crate::journal::store::Claim;

/// The identity field that marks an item as taken for a lost keyless create's, from its
/// appearance alone: it is never pruned as ours.
pub(crate) const PRESUMED: &str = "presumed";

/// A create sent and not yet seen in a list.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExpectedCreate {
    pub slot: Slot,
    /// The id the server answered with; `None` when the answer was lost (a keyless create of
    /// unknown outcome: any item that is new since it was sent may be it).
    pub id: Option<String>,
    /// When it was sent.
    pub since: SystemTime,
    /// The slot record's run, to settle it in the journal.
    pub claim: Option<Claim>,
    /// Where it stands against this process's lists.
    pub sent: Sent,
}

/// When a create was sent, as this process's lists can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// After list number `n` of this process: items that list (or an earlier one) showed were
    /// there before, and cannot be its.
    AfterList(u64),
    /// By a previous process: only the server's `created_at` can tell what came after.
    Earlier,
}

/// A delete sent and not yet gone from the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExpectedDelete {
    pub id: String,
    pub since: SystemTime,
}

/// An item a list showed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Listed {
    pub id: String,
    /// The server's `created_at`, parsed.
    pub created_at: Option<SystemTime>,
    pub item: Value,
}

/// What a round knows before it settles.
pub(crate) struct Round<'a> {
    pub now: SystemTime,
    pub listed: &'a [Listed],
    /// This operation's slot records, every generation.
    pub ledger: &'a [(u64, Slot, Record)],
    pub id_field: &'a str,
    pub creates: &'a [ExpectedCreate],
    pub deletes: &'a [ExpectedDelete],
    /// The number of the list each id was first seen in, by this process.
    pub first_seen: &'a HashMap<String, u64>,
    pub ttl: Duration,
}

/// What settling decided.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Settled {
    /// Ids this operation created, by the server's own answer (now or in the journal).
    pub ours: HashSet<String>,
    /// Ids taken for a lost keyless create's from their appearance: counted, never pruned as ours.
    pub presumed: HashSet<String>,
    /// Lost creates now matched to a new item: record them as presumed.
    pub attributed: Vec<(ExpectedCreate, String)>,
    /// Expectations no list fulfilled in time. A lost create among them is presumed not to have
    /// taken effect, and its slot is free again.
    pub expired: Vec<ExpectedCreate>,
    /// Still expected.
    pub creates: Vec<ExpectedCreate>,
    pub deletes: Vec<ExpectedDelete>,
}

/// Settles a round: which items are ours, which lost creates new items account for, which
/// expectations are met or expired.
///
/// A lost create is matched only to an item that was not there before it was sent: one no list
/// of this process showed before the send, and, for a create a previous process sent, one the
/// server says it made after the send (`created_at` strictly later). Where the clocks cannot
/// tell (the same second, no `created_at`), nothing is matched: an unmatched item of ours is
/// only left unclaimed, while a foreign one taken for ours would be wrong.
pub(crate) fn settle(round: &Round<'_>) -> Settled {
    let mut settled = Settled::default();
    for (_, _, record) in round.ledger {
        let Some(identity) = &record.identity else { continue };
        let Some(id) = super::field_text(identity, round.id_field) else { continue };
        if identity.get(PRESUMED).and_then(Value::as_bool) == Some(true) {
            settled.presumed.insert(id);
        } else {
            settled.ours.insert(id);
        }
    }
    settled.ours.extend(round.creates.iter().filter_map(|c| c.id.clone()));

    let live: HashSet<&str> = round.listed.iter().map(|l| l.id.as_str()).collect();
    let mut claimed: HashSet<String> = settled.ours.union(&settled.presumed).cloned().collect();
    let mut pending = Vec::new();
    for create in round.creates {
        match &create.id {
            // Answered: expected until a list shows it.
            Some(id) if live.contains(id.as_str()) => {}
            Some(_) => pending.push(create.clone()),
            None => match round.listed.iter().find(|l| !claimed.contains(&l.id) && is_after(l, create, round)) {
                Some(item) => {
                    claimed.insert(item.id.clone());
                    settled.presumed.insert(item.id.clone());
                    settled.attributed.push((create.clone(), item.id.clone()));
                }
                None => pending.push(create.clone()),
            },
        }
    }
    // An expectation dated in this clock's future (a previous process on a machine whose clock
    // was ahead) has an unknown age: it is not taken for fresh, or it would block the slot (and
    // the count) for as long as the clocks disagree.
    let fresh = |since: SystemTime| round.now.duration_since(since).is_ok_and(|age| age < round.ttl);
    let (creates, expired): (Vec<_>, Vec<_>) = pending.into_iter().partition(|c| fresh(c.since));
    settled.creates = creates;
    settled.expired = expired;
    settled.deletes =
        round.deletes.iter().filter(|d| live.contains(d.id.as_str()) && fresh(d.since)).cloned().collect();
    settled
}

/// Whether `item` came after `create` was sent.
fn is_after(item: &Listed, create: &ExpectedCreate, round: &Round<'_>) -> bool {
    match create.sent {
        Sent::AfterList(list) => round.first_seen.get(&item.id).is_none_or(|seen| *seen > list),
        Sent::Earlier => item.created_at.is_some_and(|at| at > create.since),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::OpState;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        T0 + Duration::from_secs(secs)
    }

    fn listed(id: &str, created: Option<u64>) -> Listed {
        Listed { id: id.into(), created_at: created.map(at), item: Value::Null }
    }

    fn lost(slot: u32, since: u64, sent: Sent) -> ExpectedCreate {
        ExpectedCreate { slot: Slot::Index(slot), id: None, since: at(since), claim: None, sent }
    }

    fn record(slot: u32, identity: Option<Value>) -> (u64, Slot, Record) {
        let record = Record {
            operation: format!("op/g1/slot-{slot}"),
            key: None,
            method: "POST".into(),
            url: "u".into(),
            fingerprint: "f".into(),
            state: OpState::Succeeded,
            created_at: T0,
            updated_at: T0,
            status: None,
            identity,
            fixed_key: true,
            handle: None,
        };
        (1, Slot::Index(slot), record)
    }

    struct Facts {
        listed: Vec<Listed>,
        ledger: Vec<(u64, Slot, Record)>,
        creates: Vec<ExpectedCreate>,
        first_seen: HashMap<String, u64>,
        now: u64,
    }

    fn run(f: &Facts) -> Settled {
        settle(&Round {
            now: at(f.now),
            listed: &f.listed,
            ledger: &f.ledger,
            id_field: "id",
            creates: &f.creates,
            deletes: &[],
            first_seen: &f.first_seen,
            ttl: Duration::from_secs(300),
        })
    }

    #[test]
    fn a_lost_create_is_matched_only_to_an_item_new_since_it_was_sent() {
        // List 3 showed "old"; the create was sent after it; list 4 shows "old" and "new".
        let facts = Facts {
            listed: vec![listed("old", Some(0)), listed("new", Some(9))],
            ledger: vec![],
            creates: vec![lost(0, 8, Sent::AfterList(3))],
            first_seen: HashMap::from([("old".into(), 3), ("new".into(), 4)]),
            now: 9,
        };
        let s = run(&facts);
        assert_eq!(s.attributed.len(), 1);
        assert_eq!(s.attributed[0].1, "new");
        assert_eq!(s.presumed, HashSet::from(["new".into()]));
        assert!(s.ours.is_empty() && s.creates.is_empty());
    }

    #[test]
    fn nothing_new_keeps_the_expectation_until_it_expires() {
        let mut facts = Facts {
            listed: vec![listed("old", Some(0))],
            ledger: vec![],
            creates: vec![lost(0, 8, Sent::AfterList(3))],
            first_seen: HashMap::from([("old".into(), 1)]),
            now: 20,
        };
        let s = run(&facts);
        assert!(s.attributed.is_empty());
        assert_eq!(s.creates.len(), 1);
        facts.now = 8 + 300;
        let s = run(&facts);
        assert_eq!((s.creates.len(), s.expired.len()), (0, 1));
    }

    #[test]
    fn a_previous_process_s_create_is_matched_by_created_at_never_to_an_older_item() {
        let year = 365 * 24 * 3600;
        let create = lost(0, year, Sent::Earlier);
        let facts = |created: Option<u64>| Facts {
            listed: vec![listed("x", created)],
            ledger: vec![],
            creates: vec![create.clone()],
            first_seen: HashMap::new(),
            now: year + 10,
        };
        assert!(run(&facts(Some(0))).attributed.is_empty(), "a year older");
        assert!(run(&facts(None)).attributed.is_empty(), "no created_at: cannot tell");
        assert!(run(&facts(Some(year))).attributed.is_empty(), "the same instant: cannot tell");
        assert!(run(&facts(Some(year - 10))).attributed.is_empty(), "before the send");
        assert_eq!(run(&facts(Some(year + 5))).attributed.len(), 1, "created after the send");
    }

    #[test]
    fn journaled_items_are_ours_or_presumed_and_never_matched_again() {
        let facts = Facts {
            listed: vec![listed("a", Some(5)), listed("p", Some(5)), listed("n", Some(9))],
            ledger: vec![
                record(0, Some(serde_json::json!({"id": "a"}))),
                record(1, Some(serde_json::json!({"id": "p", "presumed": true}))),
            ],
            creates: vec![lost(2, 1, Sent::AfterList(0))],
            first_seen: HashMap::new(),
            now: 9,
        };
        let s = run(&facts);
        assert_eq!(s.ours, HashSet::from(["a".into()]));
        assert_eq!(s.presumed, HashSet::from(["p".into(), "n".into()]));
        assert_eq!(s.attributed[0].1, "n", "only the unclaimed item");
    }

    #[test]
    fn an_expectation_from_the_future_has_an_unknown_age_and_expires() {
        let day = 24 * 3600;
        let facts = Facts {
            listed: vec![],
            ledger: vec![],
            creates: vec![lost(0, 2 * day, Sent::Earlier)],
            first_seen: HashMap::new(),
            now: day,
        };
        let s = run(&facts);
        assert_eq!((s.creates.len(), s.expired.len()), (0, 1), "not fresh for the day the clocks disagree");
    }

    #[test]
    fn answered_creates_wait_for_the_list() {
        let answered = ExpectedCreate { id: Some("a".into()), ..lost(0, 1, Sent::AfterList(0)) };
        let facts =
            Facts { listed: vec![], ledger: vec![], creates: vec![answered], first_seen: HashMap::new(), now: 2 };
        let s = run(&facts);
        assert_eq!(s.creates.len(), 1, "the list lags");
        assert!(s.ours.contains("a"));
        let facts = Facts { listed: vec![listed("a", None)], ..facts };
        assert!(run(&facts).creates.is_empty(), "seen: no longer expected");
    }
}
