//! Policy lookup: one table swap away from any change, resolved by walking the socket's cgroup
//! ancestors up to the attach cgroup.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{ArrayOfMaps, HashMap, PerCpuArray},
    macros::btf_map,
};
use keepalive_common::{
    DEFAULT_POLICY_KEY, MAX_CGROUP_DEPTH, MAX_POLICIES, POLICY_GENERATION_KEY, Policy,
    RESOLVED_SLOTS, ResolvedSlot, entry_generation, policy_flags, resolved_slot,
};

use crate::kernel::{self, SockCgroup, copy_words, off};

type PolicyTable = HashMap<u64, Policy, { MAX_POLICIES as usize }, { BPF_F_NO_PREALLOC as usize }>;

/// Slot 0 holds the active policy table. The agent builds a new table and swaps it in whole,
/// so a lookup sees either the old table or the new one, never a mix.
#[btf_map]
static KA_POLICY: ArrayOfMaps<PolicyTable, 1> = ArrayOfMaps::new();

/// See [`keepalive_common::MAP_RESOLVED`].
#[btf_map]
static KA_RESOLVED: PerCpuArray<ResolvedSlot, { RESOLVED_SLOTS as usize }> = PerCpuArray::new();

/// The policy that applies to one socket.
#[derive(Clone, Copy)]
pub(crate) struct Resolved {
    pub(crate) policy: Policy,
    /// The cgroup whose policy matched, or [`DEFAULT_POLICY_KEY`].
    pub(crate) policy_cgroup: u64,
    /// Whether the walk reached the attach cgroup.
    pub(crate) in_scope: bool,
}

/// [`resolve`] for the sock_ops program, which only sees sockets inside the subtree: the
/// socket's own policy, else a resolution cached under the installed table's generation, else
/// the walk, whose result is then cached.
#[inline(always)]
pub(crate) fn resolve_in_scope(cgroup: SockCgroup) -> Option<Resolved> {
    if !cgroup.is_known() {
        return resolve(cgroup, false);
    }
    let table = KA_POLICY.get(0)?;
    // SAFETY: as in `resolve`.
    if let Some(policy) = unsafe { table.get(cgroup.id) } {
        return Some(found(*policy, cgroup.id));
    }
    // SAFETY: as in `resolve`.
    let Some(generation) = unsafe { table.get(POLICY_GENERATION_KEY) }.map(entry_generation) else {
        return walk(table, cgroup, false);
    };
    let Some(slot) = KA_RESOLVED.get_ptr_mut(resolved_slot(cgroup.id)) else {
        return walk(table, cgroup, false);
    };
    if let Some(resolved) = cached(slot, cgroup.id, generation) {
        return Some(resolved);
    }
    // The same table as the generation: what is cached under it was found in it.
    let resolved = walk(table, cgroup, false)?;
    cache(slot, cgroup.id, generation, &resolved);
    Some(resolved)
}

/// The resolution in `slot` if it is for `cgroup` under `generation` and was not being
/// written while it was copied.
#[inline(always)]
fn cached(slot: *mut ResolvedSlot, cgroup: u64, generation: u64) -> Option<Resolved> {
    // SAFETY: `slot` is this CPU's copy of an array slot, valid for the program's run. Every
    // read is volatile so the copy stays between the two reads of `seq`.
    unsafe {
        let seq = read_volatile(&raw const (*slot).seq);
        if seq & 1 != 0
            || read_volatile(&raw const (*slot).cgroup) != cgroup
            || read_volatile(&raw const (*slot).generation) != generation
        {
            return None;
        }
        let policy_cgroup = read_volatile(&raw const (*slot).policy_cgroup);
        let mut policy = [0u64; 3];
        copy_words((&raw const (*slot).policy).cast(), &raw mut policy);
        if read_volatile(&raw const (*slot).seq) != seq {
            return None;
        }
        Some(Resolved {
            policy: core::mem::transmute::<[u64; 3], Policy>(policy),
            policy_cgroup,
            in_scope: true,
        })
    }
}

/// Stores `resolved` for `cgroup` under `generation`, unless another program on this CPU is
/// writing the slot (then this one just stays uncached).
#[inline(always)]
fn cache(slot: *mut ResolvedSlot, cgroup: u64, generation: u64, resolved: &Resolved) {
    // SAFETY: as in `cached`. The compare-and-swap makes this the only writer of the slot
    // until `seq` is even again; a program that interrupted a reader makes the reader's two
    // reads of `seq` differ.
    unsafe {
        let seq_ptr = &raw mut (*slot).seq;
        let seq = read_volatile(seq_ptr);
        if seq & 1 != 0
            || !atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                seq_ptr,
                seq,
                seq + 1,
            )
            .1
        {
            return;
        }
        write_volatile(&raw mut (*slot).cgroup, cgroup);
        write_volatile(&raw mut (*slot).generation, generation);
        write_volatile(&raw mut (*slot).policy_cgroup, resolved.policy_cgroup);
        let words = core::mem::transmute::<Policy, [u64; 3]>(resolved.policy);
        copy_words(&raw const words, (&raw mut (*slot).policy).cast());
        write_volatile(seq_ptr, seq + 2);
    }
}

/// A resolution from the table entry `policy` stored under `key`: the default, also stored
/// under the attach cgroup, is reported as such.
#[inline(always)]
fn found(policy: Policy, key: u64) -> Resolved {
    Resolved {
        policy,
        policy_cgroup: if policy.flags & policy_flags::DEFAULT != 0 {
            DEFAULT_POLICY_KEY
        } else {
            key
        },
        in_scope: true,
    }
}

/// Finds the policy of the nearest cgroup, starting at the socket's own, that has one; the
/// `[default]` entry applies when none has. Returns `None` when no table has been pushed.
///
/// With `need_scope`, the walk continues past a match up to the attach cgroup so the caller
/// learns whether the socket is inside the enforced subtree at all (iterators see every socket
/// of a network namespace; sock_ops only ever sees sockets inside the subtree).
#[inline(always)]
pub(crate) fn resolve(cgroup: SockCgroup, need_scope: bool) -> Option<Resolved> {
    walk(KA_POLICY.get(0)?, cgroup, need_scope)
}

/// [`resolve`] in `table`.
#[inline(always)]
fn walk(table: &PolicyTable, cgroup: SockCgroup, need_scope: bool) -> Option<Resolved> {
    let attach = kernel::attach_cgroup_id();
    let mut matched: Option<Resolved> = None;
    let mut in_scope = false;
    if cgroup.is_known() {
        let SockCgroup { mut id, mut kn } = cgroup;
        for _ in 0..MAX_CGROUP_DEPTH {
            if matched.is_none() {
                // SAFETY: the value is copied out at once; tables are never modified while
                // installed (the agent swaps in a new one), so no writer can race the copy.
                if let Some(policy) = unsafe { table.get(id) } {
                    matched = Some(found(*policy, id));
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
    let mut resolved = match matched {
        Some(matched) => matched,
        // SAFETY: as above.
        None => found(
            *unsafe { table.get(DEFAULT_POLICY_KEY) }?,
            DEFAULT_POLICY_KEY,
        ),
    };
    resolved.in_scope = in_scope || !need_scope;
    Some(resolved)
}
