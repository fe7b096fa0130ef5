//! Tracking state: per-socket records in socket-local storage, bounded per-cgroup counters and
//! per-CPU event counters.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr,
};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::{HashMap, PerCpuArray, SkStorage},
    helpers::generated::bpf_sk_storage_get,
    macros::btf_map,
};
use keepalive_common::{CgroupStats, Counter, DEFAULT_MAX_TRACKED_CGROUPS, SockRecord};

#[btf_map]
static KA_SOCKS: SkStorage<SockRecord> = SkStorage::new();

#[btf_map]
static KA_CGSTATS: HashMap<u64, CgroupStats, { DEFAULT_MAX_TRACKED_CGROUPS as usize }> =
    HashMap::new();

#[btf_map]
static KA_COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
fn atomic_add(ptr: *mut u64, delta: u64) {
    // `AtomicU64::fetch_add` is not offered on the BPF target; the intrinsic lowers to the
    // BPF atomic add instruction.
    // SAFETY: `ptr` points into a map value, 8-byte aligned, valid for the program's run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, delta) };
}

/// Counts one event.
#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = KA_COUNTERS.get_ptr_mut(counter as u32) {
        atomic_add(slot, 1);
    }
}

/// Returns the socket's tracking record, creating a zeroed one when `create` is set.
/// `sk` is any socket pointer the calling program type may pass to bpf_sk_storage_get.
#[inline(always)]
pub(crate) fn record(sk: *mut c_void, create: bool) -> Option<&'static mut SockRecord> {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    let map = ptr::from_ref(&KA_SOCKS).cast_mut().cast::<c_void>();
    // SAFETY: the helper returns either null or a pointer to this socket's storage, which
    // lives as long as the socket and so outlasts the program run.
    let rec = unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), flags) }.cast::<SockRecord>();
    // SAFETY: non-null storage pointers are valid, aligned SockRecords.
    unsafe { rec.as_mut() }
}

/// Adds to a cgroup's counters. Returns false, and counts the overflow, when the map is full.
#[inline(always)]
pub(crate) fn cgroup_add(cgroup: u64, open: u64, enforced: u64, dead: u64) -> bool {
    let stats = match KA_CGSTATS.get_ptr_mut(cgroup) {
        Some(stats) => stats,
        None => {
            // Another CPU may insert the same key first; EEXIST is fine, E2BIG means full.
            let _ = KA_CGSTATS.insert(cgroup, CgroupStats::default(), u64::from(BPF_NOEXIST));
            match KA_CGSTATS.get_ptr_mut(cgroup) {
                Some(stats) => stats,
                None => {
                    count(Counter::CgroupStatsFull);
                    return false;
                }
            }
        }
    };
    // SAFETY: `stats` points at a live map value; fields are updated atomically.
    unsafe {
        if open != 0 {
            atomic_add(&raw mut (*stats).open, open);
        }
        if enforced != 0 {
            atomic_add(&raw mut (*stats).enforced_total, enforced);
        }
        if dead != 0 {
            atomic_add(&raw mut (*stats).dead_peers, dead);
        }
    }
    true
}
