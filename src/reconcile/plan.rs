//! The pure planner: desired state, what the server shows, what is still expected → actions.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

/// What the collection should hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// This many items, interchangeable (replicas).
    Count(usize),
    /// One item with each of these names (named slots, e.g. `web-1 … web-k`).
    Names(Vec<String>),
}

impl Desired {
    /// The most items a desired state may ask for: 1,000,000. A larger count is refused before
    /// anything is sent ([`StopReason::TooMany`](super::StopReason::TooMany); `idem ensure-count`
    /// exits 2): it is far beyond any collection a reconcile could fill, and a typo (`--count
    /// 1000000000`) must not become a billion creates.
    pub const MAX: usize = 1_000_000;

    /// How many items that is.
    pub fn len(&self) -> usize {
        match self {
            Desired::Count(n) => *n,
            Desired::Names(names) => names.len(),
        }
    }

    /// Whether it is nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A create's place: an index in a counted collection, or a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// The `n`th create of a generation.
    Index(u32),
    /// The item named so.
    Name(String),
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slot::Index(i) => write!(f, "slot-{i}"),
            Slot::Name(name) => write!(f, "name-{name}"),
        }
    }
}

impl Slot {
    /// Parses [`Display`](fmt::Display)'s form.
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(i) = s.strip_prefix("slot-") {
            return i.parse().ok().map(Slot::Index);
        }
        s.strip_prefix("name-").map(|n| Slot::Name(n.to_owned()))
    }
}

/// An item as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Member {
    /// Its id.
    pub id: String,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// Its creation time as the server wrote it (RFC 3339 sorts as text), for "newest first".
    pub created_at: Option<String>,
    /// This operation created it (any generation).
    pub ours: bool,
    /// It must never be deleted (the caller said so, or it fills a named slot).
    pub protected: bool,
}

impl Member {
    /// A member this operation created.
    pub fn ours(id: impl Into<String>) -> Self {
        Self { id: id.into(), name: None, created_at: None, ours: true, protected: false }
    }

    /// A member this operation did not create, or cannot prove it did.
    pub fn foreign(id: impl Into<String>) -> Self {
        Self { ours: false, ..Self::ours(id) }
    }

    /// With its name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// With its creation time as the server wrote it.
    pub fn created_at(mut self, created_at: impl Into<String>) -> Self {
        self.created_at = Some(created_at.into());
        self
    }

    /// Never to be deleted.
    pub fn protected(mut self) -> Self {
        self.protected = true;
        self
    }
}

/// Whether and what surplus may be deleted. Never a protected member or a named slot's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Prune {
    /// Report surplus, delete nothing (the default).
    #[default]
    Never,
    /// Delete surplus this operation created.
    Ours,
    /// Delete any unprotected surplus: this operation's, other writers', and items nothing
    /// proves are this operation's (a lost keyless create's, presumed).
    Any,
}

impl Prune {
    /// Whether surplus may be deleted at all.
    pub fn allowed(self) -> bool {
        self != Prune::Never
    }

    /// Whether `member` may be deleted as surplus.
    pub fn may_delete(self, member: &Member) -> bool {
        !member.protected
            && match self {
                Prune::Never => false,
                Prune::Ours => member.ours,
                Prune::Any => true,
            }
    }
}

/// What the planner is given.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// The desired state.
    pub desired: &'a Desired,
    /// What the last list showed (items being deleted already left out).
    pub observed: &'a [Member],
    /// Creates sent (or possibly applied) and not yet seen in a list.
    pub expected_creates: usize,
    /// Deletes sent and not yet gone from the list.
    pub expected_deletes: usize,
    /// Slots not to use for a new create: filled, expected, or retired (filled, then deleted).
    pub used_slots: &'a BTreeSet<Slot>,
    /// Pruning rules.
    pub prune: Prune,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the item for this slot.
    Create(Slot),
    /// Delete this item.
    Delete(String),
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Plan {
    /// What to do now.
    pub actions: Vec<Action>,
    /// Ids beyond the desired state (newest first), whether or not they may be deleted.
    pub overshoot: Vec<String>,
    /// Items that fill a named slot without being created now.
    pub adopted: Vec<String>,
    /// Expected creates or deletes are not yet visible: wait, do nothing else.
    pub waiting: bool,
    /// The collection is as desired.
    pub converged: bool,
}

fn newest_first(members: &mut [&Member]) {
    members.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
}

/// The most creates, and the most deletes, one round plans: 1,024. The rest come in later
/// rounds, so a round's plan (and memory) does not grow with the desired count.
pub const MAX_ACTIONS_PER_ROUND: usize = 1024;

/// Plans one round.
///
/// At most [`MAX_ACTIONS_PER_ROUND`] creates and as many deletes are planned; a later round
/// plans the rest.
///
/// While any create or delete is still expected (sent, not yet seen in a list), nothing new is
/// planned: the list may simply lag, and acting on it would overshoot (or delete twice). Surplus
/// is always reported; it is deleted only when pruning is allowed, newest first, never a
/// protected member, and only members this operation created unless foreign pruning is on.
///
/// ```
/// use std::collections::BTreeSet;
/// use idempotent_retry::reconcile::{Action, Desired, Member, Plan, PlanInput, Prune, Slot, plan};
///
/// let observed = [Member::ours("a").created_at("2026-01-01T00:00:00Z")];
/// let used = BTreeSet::from([Slot::Index(0)]);
/// let input = PlanInput {
///     desired: &Desired::Count(3),
///     observed: &observed,
///     expected_creates: 0,
///     expected_deletes: 0,
///     used_slots: &used,
///     prune: Prune::default(),
/// };
/// assert_eq!(plan(&input).actions, [Action::Create(Slot::Index(1)), Action::Create(Slot::Index(2))]);
/// ```
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let mut plan = Plan { waiting: input.expected_creates > 0 || input.expected_deletes > 0, ..Plan::default() };
    match input.desired {
        Desired::Count(want) => {
            let have = input.observed.len();
            if have > *want {
                let mut all: Vec<&Member> = input.observed.iter().collect();
                newest_first(&mut all);
                plan.overshoot = all.iter().take(have - want).map(|m| m.id.clone()).collect();
                if input.prune.allowed() && !plan.waiting {
                    let mut eligible: Vec<&Member> =
                        input.observed.iter().filter(|m| input.prune.may_delete(m)).collect();
                    newest_first(&mut eligible);
                    let surplus = (have - want).min(MAX_ACTIONS_PER_ROUND);
                    plan.actions = eligible.iter().take(surplus).map(|m| Action::Delete(m.id.clone())).collect();
                }
            } else if have + input.expected_creates < *want && !plan.waiting {
                let free = (0u32..).map(Slot::Index).filter(|s| !input.used_slots.contains(s));
                plan.actions = free.take((want - have).min(MAX_ACTIONS_PER_ROUND)).map(Action::Create).collect();
            }
            plan.converged = have == *want && !plan.waiting;
        }
        Desired::Names(names) => {
            let wanted: BTreeSet<&str> = names.iter().map(String::as_str).collect();
            let mut creates = 0;
            for name in names {
                let mut holders: Vec<&Member> =
                    input.observed.iter().filter(|m| m.name.as_deref() == Some(name)).collect();
                holders.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
                match holders.split_first() {
                    Some((first, rest)) => {
                        plan.adopted.push(first.id.clone());
                        // A second item with a slot's name is surplus, but named: never deleted.
                        plan.overshoot.extend(rest.iter().map(|m| m.id.clone()));
                    }
                    None if !plan.waiting
                        && creates < MAX_ACTIONS_PER_ROUND
                        && !input.used_slots.contains(&Slot::Name(name.clone())) =>
                    {
                        creates += 1;
                        plan.actions.push(Action::Create(Slot::Name(name.clone())));
                    }
                    None => {}
                }
            }
            let mut others: Vec<&Member> =
                input.observed.iter().filter(|m| m.name.as_deref().is_none_or(|n| !wanted.contains(n))).collect();
            newest_first(&mut others);
            plan.overshoot.extend(others.iter().map(|m| m.id.clone()));
            if input.prune.allowed() && !plan.waiting {
                let deletes = others.iter().filter(|m| input.prune.may_delete(m)).take(MAX_ACTIONS_PER_ROUND);
                plan.actions.extend(deletes.map(|m| Action::Delete(m.id.clone())));
            }
            plan.converged = plan.overshoot.is_empty() && plan.adopted.len() == names.len() && !plan.waiting;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, name: Option<&str>, at: u32, ours: bool) -> Member {
        let member = if ours { Member::ours(id) } else { Member::foreign(id) };
        let member = member.created_at(format!("2026-11-22T00:00:{at:02}Z"));
        match name {
            Some(name) => member.name(name),
            None => member,
        }
    }

    fn run(desired: Desired, observed: &[Member], expected: usize, used: &[Slot], prune: Prune) -> Plan {
        let used: BTreeSet<Slot> = used.iter().cloned().collect();
        plan(&PlanInput {
            desired: &desired,
            observed,
            expected_creates: expected,
            expected_deletes: 0,
            used_slots: &used,
            prune,
        })
    }

    const PRUNE: Prune = Prune::Ours;

    #[test]
    fn scale_up_from_zero_uses_the_first_free_slots() {
        let p = run(Desired::Count(3), &[], 0, &[Slot::Index(1)], Prune::default());
        assert_eq!(
            p.actions,
            [Action::Create(Slot::Index(0)), Action::Create(Slot::Index(2)), Action::Create(Slot::Index(3))]
        );
        assert!(!p.converged && !p.waiting);
    }

    #[test]
    fn unmet_expectations_block_new_creates() {
        // The list lags: one create is expected, nothing shows yet. No second create.
        let p = run(Desired::Count(1), &[], 1, &[Slot::Index(0)], Prune::default());
        assert_eq!(p.actions, []);
        assert!(p.waiting && !p.converged);
    }

    #[test]
    fn converged_when_the_count_matches_and_nothing_is_expected() {
        let observed = [member("a", None, 1, true), member("b", None, 2, true)];
        let p = run(Desired::Count(2), &observed, 0, &[], Prune::default());
        assert!(p.converged);
        assert_eq!(p.actions, []);
    }

    #[test]
    fn surplus_is_reported_and_pruned_newest_first_only_when_allowed() {
        let observed = [member("a", None, 1, true), member("b", None, 3, true), member("c", None, 2, true)];
        let p = run(Desired::Count(1), &observed, 0, &[], Prune::default());
        assert_eq!(p.overshoot, ["b", "c"]);
        assert_eq!(p.actions, [], "report only");
        let p = run(Desired::Count(1), &observed, 0, &[], PRUNE);
        assert_eq!(p.actions, [Action::Delete("b".into()), Action::Delete("c".into())]);
    }

    #[test]
    fn foreign_and_protected_members_are_spared() {
        let named = member("n", Some("gpu-slot"), 9, true).protected();
        let observed = [member("ours", None, 1, true), member("foreign", None, 5, false), named];
        let p = run(Desired::Count(1), &observed, 0, &[], PRUNE);
        assert_eq!(p.overshoot, ["n", "foreign"]);
        assert_eq!(p.actions, [Action::Delete("ours".into())], "only ours, never the protected one");
        let p = run(Desired::Count(1), &observed, 0, &[], Prune::Any);
        assert_eq!(p.actions, [Action::Delete("foreign".into()), Action::Delete("ours".into())]);
    }

    #[test]
    fn named_slots_adopt_create_and_never_prune_a_named_member() {
        let desired = Desired::Names(vec!["web-1".into(), "web-2".into(), "web-3".into()]);
        let observed = [
            member("w1", Some("web-1"), 1, false),
            member("w1b", Some("web-1"), 4, true),
            member("old", Some("web-9"), 2, true),
        ];
        let p = run(desired.clone(), &observed, 0, &[], PRUNE);
        assert_eq!(p.adopted, ["w1"]);
        assert_eq!(
            p.actions,
            [
                Action::Create(Slot::Name("web-2".into())),
                Action::Create(Slot::Name("web-3".into())),
                Action::Delete("old".into())
            ]
        );
        assert_eq!(p.overshoot, ["w1b", "old"], "the duplicate web-1 is reported, not deleted");
        let p = run(desired, &observed, 0, &[Slot::Name("web-2".into())], Prune::default());
        assert_eq!(p.actions, [Action::Create(Slot::Name("web-3".into()))], "an expected name is not created again");
    }

    #[test]
    fn a_round_plans_a_bounded_batch_whatever_the_count() {
        let p = run(Desired::Count(Desired::MAX), &[], 0, &[], Prune::default());
        assert_eq!(p.actions.len(), MAX_ACTIONS_PER_ROUND);
        assert_eq!(p.actions.last(), Some(&Action::Create(Slot::Index(MAX_ACTIONS_PER_ROUND as u32 - 1))));
        let observed: Vec<Member> = (0..3000).map(|i| member(&format!("m{i}"), None, 0, true)).collect();
        assert_eq!(run(Desired::Count(0), &observed, 0, &[], PRUNE).actions.len(), MAX_ACTIONS_PER_ROUND);
        let names = Desired::Names((0..2000).map(|i| format!("web-{i}")).collect());
        assert_eq!(run(names, &[], 0, &[], Prune::default()).actions.len(), MAX_ACTIONS_PER_ROUND);
    }

    #[test]
    fn slots_round_trip_through_text() {
        for slot in [Slot::Index(7), Slot::Name("web-1".into())] {
            assert_eq!(Slot::parse(&slot.to_string()), Some(slot));
        }
        assert_eq!(Slot::parse("other"), None);
    }
}
