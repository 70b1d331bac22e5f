//! Assertions about what a user cares about: one key per operation, resources created.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

/// Checks that every attempt of an operation carried one and the same key.
///
/// `attempts` pairs an operation (e.g. the `name` in the body) with the key an attempt carried
/// (`None` for none). Returns each operation's key.
///
/// # Errors
///
/// Names each operation whose attempts carried more than one key, or a key on some attempts and
/// none on others.
///
/// ```
/// use idempotent_retry::testing::one_key_per_operation;
///
/// let ok = one_key_per_operation([("web-1", Some("k1")), ("web-1", Some("k1")), ("web-2", Some("k2"))]).unwrap();
/// assert_eq!(ok["web-1"], Some("k1"));
/// assert!(one_key_per_operation([("web-1", Some("k1")), ("web-1", Some("k9"))]).is_err());
/// ```
pub fn one_key_per_operation<O, K, I>(attempts: I) -> Result<BTreeMap<O, Option<K>>, String>
where
    O: Ord + Debug,
    K: Ord + Debug,
    I: IntoIterator<Item = (O, Option<K>)>,
{
    let mut keys = BTreeMap::<O, BTreeSet<Option<K>>>::new();
    for (operation, key) in attempts {
        keys.entry(operation).or_default().insert(key);
    }
    let bad: Vec<String> =
        keys.iter().filter(|(_, ks)| ks.len() > 1).map(|(op, ks)| format!("{op:?} carried {ks:?}")).collect();
    if !bad.is_empty() {
        return Err(format!("operations whose attempts did not carry one key: {}", bad.join("; ")));
    }
    Ok(keys.into_iter().map(|(op, ks)| (op, ks.into_iter().next().flatten())).collect())
}

/// Panics unless every attempt of an operation carried one and the same key (see
/// [`one_key_per_operation`]).
#[track_caller]
pub fn assert_one_key_per_operation<O, K, I>(attempts: I) -> BTreeMap<O, Option<K>>
where
    O: Ord + Debug,
    K: Ord + Debug,
    I: IntoIterator<Item = (O, Option<K>)>,
{
    match one_key_per_operation(attempts) {
        Ok(keys) => keys,
        Err(why) => panic!("{why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_present_on_some_attempts_only_is_an_error() {
        let err = one_key_per_operation([("op", Some("k")), ("op", None)]).unwrap_err();
        assert!(err.contains("\"op\""), "{err}");
        assert_eq!(one_key_per_operation([("op", None::<&str>), ("op", None)]).unwrap()["op"], None);
    }
}
