//! What a start that takes over from a previous agent changes: the policies of the table it
//! left installed that the new one replaces, which the start names in a warning.

use std::collections::{BTreeSet, HashMap};

use keepalive_common::{Policy, mode, policy_flags};

use crate::{cgroup::CgroupPath, logging::counted};

/// The cgroups (ids; [`keepalive_common::DEFAULT_POLICY_KEY`] for `[default]`) whose policy
/// `table` changes from `previous`, the table a previous agent left installed: `[default]`,
/// and each cgroup with an entry in either table, by the policy the program finds for it in
/// each (its own entry, else the nearest ancestor's by `parents`, else `[default]`), so a
/// cgroup a runtime `unset` had masked counts too. Cgroups with no entry in `previous` that
/// the previous agent had not seen (ids over `seen`) are new, not replaced; one that takes `[default]` in both tables counts
/// as `[default]`; two `off` policies are the same whatever values they carry.
pub fn replaced(
    previous: &[(u64, Policy)],
    table: &[(u64, Policy)],
    parents: &HashMap<u64, u64>,
    seen: u64,
) -> Vec<u64> {
    use keepalive_common::{DEFAULT_POLICY_KEY, POLICY_GENERATION_KEY};
    let entries = |table: &[(u64, Policy)]| -> HashMap<u64, Policy> {
        table
            .iter()
            .filter(|(id, _)| *id != POLICY_GENERATION_KEY)
            .copied()
            .collect()
    };
    let (before, after) = (entries(previous), entries(table));
    // The entry the program finds for `id`, `None` where that is `[default]` (or its copy
    // under the attach cgroup).
    let find = |table: &HashMap<u64, Policy>, mut id: u64| -> Option<Policy> {
        loop {
            if let Some(policy) = table.get(&id) {
                return (policy.flags & policy_flags::DEFAULT == 0).then_some(*policy);
            }
            id = *parents.get(&id)?;
        }
    };
    let same = |a: Option<&Policy>, b: Option<&Policy>| match (a, b) {
        (Some(a), Some(b)) if a.mode == mode::OFF && b.mode == mode::OFF => true,
        (Some(a), Some(b)) => {
            let marks = policy_flags::NEW_CGROUP | policy_flags::DEFAULT;
            Policy {
                flags: a.flags & !marks,
                ..*a
            } == Policy {
                flags: b.flags & !marks,
                ..*b
            }
        }
        (a, b) => a == b,
    };
    let (default_before, default_after) = (
        before.get(&DEFAULT_POLICY_KEY),
        after.get(&DEFAULT_POLICY_KEY),
    );
    let mut ids: Vec<u64> = before
        .keys()
        .chain(after.keys())
        .copied()
        // A cgroup with an entry in the previous table was known to it, whatever `seen` says
        // (which stays below new `off` cgroups still waiting for their pass).
        .filter(|id| *id != DEFAULT_POLICY_KEY && (before.contains_key(id) || *id <= seen))
        .collect::<BTreeSet<u64>>()
        .into_iter()
        .filter(|id| match (find(&before, *id), find(&after, *id)) {
            (None, None) => false,
            (was, is) => !same(
                was.as_ref().or(default_before),
                is.as_ref().or(default_after),
            ),
        })
        .collect();
    if !same(default_before, default_after) {
        ids.insert(0, DEFAULT_POLICY_KEY);
    }
    ids
}

/// Says which policies of the previous agent's table a start replaced: a `policy set` rule
/// (an emergency `--mode off`, say) ends with the agent that set it, also at an automatic
/// restart after a crash, and a reload says so for each one it drops. `names` are the
/// cgroups within the attach cgroup.
pub fn warn_replaced(names: &HashMap<u64, CgroupPath>, ids: &[u64]) {
    const SHOWN: usize = 5;
    // Those of cgroups removed since matter no more.
    let ids: Vec<String> = ids
        .iter()
        .filter_map(|id| match names.get(id) {
            _ if *id == keepalive_common::DEFAULT_POLICY_KEY => Some("[default]".to_owned()),
            name => name.map(ToString::to_string),
        })
        .collect();
    if ids.is_empty() {
        return;
    }
    let mut shown = ids[..ids.len().min(SHOWN)].to_vec();
    if ids.len() > SHOWN {
        shown.push(format!("and {} more", ids.len() - SHOWN));
    }
    log::warn!(
        "replaced {} the previous agent left: {}; runtime changes (`policy set` and `unset`) \
         end with the agent that made them (make them again if they are still wanted), and a \
         config or `run` flags changed since take effect now",
        counted(ids.len() as u64, "policy", "policies"),
        shown.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_names_the_policies_of_the_previous_table_it_changed_or_dropped() {
        let policy = |idle, mode, flags| Policy {
            idle,
            interval: 10,
            count: 5,
            user_timeout_ms: 0,
            mode,
            flags,
        };
        let previous = [
            (0, policy(60, mode::ENFORCE, policy_flags::DEFAULT)),
            // The attach cgroup's copy of `[default]`, which a new default changes too.
            (3, policy(60, mode::ENFORCE, policy_flags::DEFAULT)),
            (5, policy(60, mode::OFF, 0)),
            (6, policy(30, mode::ENFORCE, 0)),
            (7, policy(60, mode::OFF, policy_flags::NEW_CGROUP)),
            (8, policy(40, mode::FILL, 0)),
            (keepalive_common::POLICY_GENERATION_KEY, policy(1, 0, 0)),
        ];
        let table = [
            (0, policy(60, mode::ENFORCE, policy_flags::DEFAULT)),
            (3, policy(60, mode::ENFORCE, policy_flags::DEFAULT)),
            // 5, a runtime `off`, is gone; 6 changed; 7 lost only its mark; 8 is the same.
            (6, policy(31, mode::ENFORCE, 0)),
            (7, policy(60, mode::OFF, 0)),
            (8, policy(40, mode::FILL, 0)),
            // 11 had its policy masked by a runtime `unset`: it took 8's, its parent's.
            (11, policy(20, mode::LOCK, 0)),
            // A cgroup the previous agent had not seen gets its policy: nothing replaced.
            (12, policy(50, mode::ENFORCE, 0)),
        ];
        // Everything below the attach cgroup, 3; 10 and 11 below 8.
        let parents: HashMap<u64, u64> =
            [(5, 3), (6, 3), (7, 3), (8, 3), (10, 8), (11, 8), (12, 3)].into();
        let seen = 11;
        assert_eq!(replaced(&previous, &table, &parents, seen), [5, 6, 11]);
        // A new `[default]` counts once, not for the cgroups that take it, nor for the `off`
        // entries that carry its values.
        let mut new_default = table.to_vec();
        for (id, policy) in &mut new_default {
            if [0, 3, 7].contains(id) {
                policy.idle = 61;
            }
        }
        assert_eq!(
            replaced(&previous, &new_default, &parents, seen),
            [0, 5, 6, 11]
        );
        assert!(replaced(&table, &table, &parents, seen).is_empty());
        // An entry of the previous table is the previous agent's, whatever `seen` says (it
        // stays below new `off` cgroups still waiting for their pass).
        assert_eq!(replaced(&previous, &table, &parents, 4), [5, 6]);
        // 8 changed: its own entry counts, not 10 and 11 below it; 11 keeps its own.
        let mut fill_changed = table.to_vec();
        fill_changed[4].1.idle = 41;
        assert_eq!(replaced(&table, &fill_changed, &parents, seen), [8]);
    }
}
