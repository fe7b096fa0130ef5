//! Policy lookup: one table swap away from any change, resolved by walking the socket's cgroup
//! ancestors up to the attach cgroup.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{ArrayOfMaps, HashMap},
    macros::btf_map,
};
use keepalive_common::{DEFAULT_POLICY_KEY, MAX_CGROUP_DEPTH, MAX_POLICIES, Policy, policy_flags};

use crate::kernel::{self, SockCgroup, off};

type PolicyTable = HashMap<u64, Policy, { MAX_POLICIES as usize }, { BPF_F_NO_PREALLOC as usize }>;

/// Slot 0 holds the active policy table. The agent builds a new table and swaps it in whole,
/// so a lookup sees either the old table or the new one, never a mix.
#[btf_map]
static KA_POLICY: ArrayOfMaps<PolicyTable, 1> = ArrayOfMaps::new();

/// The policy that applies to one socket.
#[derive(Clone, Copy)]
pub(crate) struct Resolved {
    pub(crate) policy: Policy,
    /// The cgroup whose policy matched, or [`DEFAULT_POLICY_KEY`].
    pub(crate) policy_cgroup: u64,
    /// Whether the walk reached the attach cgroup.
    pub(crate) in_scope: bool,
}

/// Finds the policy of the nearest cgroup, starting at the socket's own, that has one; the
/// `[default]` entry applies when none has. Returns `None` when no table has been pushed.
///
/// With `need_scope`, the walk continues past a match up to the attach cgroup so the caller
/// learns whether the socket is inside the enforced subtree at all (iterators see every socket
/// of a network namespace; sock_ops only ever sees sockets inside the subtree).
#[inline(always)]
pub(crate) fn resolve(cgroup: SockCgroup, need_scope: bool) -> Option<Resolved> {
    let table = KA_POLICY.get(0)?;
    let attach = kernel::attach_cgroup_id();
    let mut found: Option<(Policy, u64)> = None;
    let mut in_scope = false;
    if cgroup.is_known() {
        let SockCgroup { mut id, mut kn } = cgroup;
        for _ in 0..MAX_CGROUP_DEPTH {
            if found.is_none() {
                // SAFETY: the value is copied out at once; tables are never modified while
                // installed (the agent swaps in a new one), so no writer can race the copy.
                if let Some(policy) = unsafe { table.get(id) } {
                    // The default, also stored under the attach cgroup, is reported as such.
                    let key = if policy.flags & policy_flags::DEFAULT != 0 {
                        DEFAULT_POLICY_KEY
                    } else {
                        id
                    };
                    found = Some((*policy, key));
                    if !need_scope {
                        break;
                    }
                }
            }
            if id == attach {
                in_scope = true;
                break;
            }
            let parent: *const u8 = kernel::load(kn, off!(kn_parent));
            if parent.is_null() {
                break;
            }
            kn = parent;
            id = kernel::load(kn, off!(kn_id));
        }
    }
    let (policy, policy_cgroup) = match found {
        Some(found) => found,
        // SAFETY: as above.
        None => (
            *unsafe { table.get(DEFAULT_POLICY_KEY) }?,
            DEFAULT_POLICY_KEY,
        ),
    };
    Some(Resolved {
        policy,
        policy_cgroup,
        in_scope: in_scope || !need_scope,
    })
}
