//! Tracking state: a bounded hash of enforced sockets keyed by socket cookie, bounded
//! per-cgroup counters, and per-CPU event counters.
//!
//! A hash entry costs a fraction of a socket-local storage allocation, which matters at tens of
//! thousands of connections per second; entries are removed by the close callback.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr,
};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::{Array, HashMap, PerCpuArray, SkStorage},
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    macros::btf_map,
};
use keepalive_common::{
    CONNECT_SLOTS, CgroupStats, ConnectSlot, Counter, DEFAULT_MAX_TRACKED_CGROUPS,
    DEFAULT_MAX_TRACKED_SOCKETS, Policy, SockRecord,
};

#[btf_map]
static KA_SOCKS: HashMap<
    u64,
    SockRecord,
    { DEFAULT_MAX_TRACKED_SOCKETS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map]
static KA_CONNECTS: Array<ConnectSlot, { CONNECT_SLOTS as usize }> = Array::new();

#[btf_map]
static KA_APPLY: Array<u64, 1> = Array::new();

/// When the current apply pass started (see `keepalive_common::MAP_APPLY`).
#[inline(always)]
pub(crate) fn apply_pass_start() -> u64 {
    KA_APPLY.get(0).copied().unwrap_or(0)
}

#[btf_map]
static KA_LOCKS: SkStorage<Policy> = SkStorage::new();

#[btf_map]
static KA_LISTENERS: SkStorage<Policy> = SkStorage::new();

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

/// The tracking record of a socket, if it has one.
#[inline(always)]
pub(crate) fn record(cookie: u64) -> Option<&'static mut SockRecord> {
    // SAFETY: entries are only freed after an RCU grace period, so the pointer stays valid for
    // this program run; the program is the only writer of a given socket's entry.
    KA_SOCKS
        .get_ptr_mut(cookie)
        .and_then(|ptr| unsafe { ptr.as_mut() })
}

#[inline(always)]
fn connect_slot(cookie: u64) -> Option<*mut ConnectSlot> {
    KA_CONNECTS.get_ptr_mut((cookie % u64::from(CONNECT_SLOTS)) as u32)
}

/// Remembers who connects `cookie`.
#[inline(always)]
pub(crate) fn remember_connect(cookie: u64, pid: u32, comm: [u8; 16]) {
    if let Some(slot) = connect_slot(cookie) {
        // SAFETY: array slots are always valid; the cookie is cleared first and set last so a
        // concurrent reader (checking it before and after) never accepts a half-written slot.
        unsafe {
            ptr::write_volatile(&raw mut (*slot).cookie, 0);
            (*slot).pid = pid;
            (*slot).comm = comm;
            ptr::write_volatile(&raw mut (*slot).cookie, cookie);
        }
    }
}

/// Who connected `cookie`, if the slot still holds it.
#[inline(always)]
pub(crate) fn connect_task(cookie: u64) -> Option<(u32, [u8; 16])> {
    let slot = connect_slot(cookie)?;
    // SAFETY: as in `remember_connect`.
    unsafe {
        if ptr::read_volatile(&raw const (*slot).cookie) != cookie {
            return None;
        }
        let task = ((*slot).pid, (*slot).comm);
        (ptr::read_volatile(&raw const (*slot).cookie) == cookie).then_some(task)
    }
}

/// Adds a tracking record; counts the overflow when the map is full.
#[inline(always)]
pub(crate) fn insert_record(cookie: u64, rec: &SockRecord) {
    if KA_SOCKS.insert(cookie, rec, 0).is_err() {
        count(Counter::TrackingFull);
    }
}

/// Drops a socket's tracking record.
#[inline(always)]
pub(crate) fn remove_record(cookie: u64) {
    let _ = KA_SOCKS.remove(cookie);
}

/// A [`Policy`] kept in socket-local storage (`KA_LOCKS`, `KA_LISTENERS`).
#[derive(Clone, Copy)]
pub(crate) enum PolicyStore {
    /// Policies of `lock`-mode sockets.
    Locks,
    /// Policies the program set on listeners.
    Listeners,
}

impl PolicyStore {
    fn map(self) -> *mut c_void {
        match self {
            Self::Locks => ptr::from_ref(&KA_LOCKS).cast_mut().cast(),
            Self::Listeners => ptr::from_ref(&KA_LISTENERS).cast_mut().cast(),
        }
    }

    /// The policy stored for `sk`, a socket pointer the calling program type may pass to
    /// bpf_sk_storage_get.
    #[inline(always)]
    pub(crate) fn get(self, sk: *mut c_void) -> Option<Policy> {
        // SAFETY: the helper returns null or this socket's storage, which outlives the run.
        let p = unsafe { bpf_sk_storage_get(self.map(), sk, ptr::null_mut(), 0) }.cast::<Policy>();
        // SAFETY: non-null storage pointers point at a Policy.
        unsafe { p.as_ref() }.copied()
    }

    /// Stores `policy` for `sk` (Some) or drops it (None).
    #[inline(always)]
    pub(crate) fn set(self, sk: *mut c_void, policy: Option<&Policy>) {
        match policy {
            Some(policy) => {
                let flags = u64::from(BPF_SK_STORAGE_GET_F_CREATE);
                // SAFETY: as in `get`; nothing is copied from the null init value.
                let p = unsafe { bpf_sk_storage_get(self.map(), sk, ptr::null_mut(), flags) }
                    .cast::<Policy>();
                // SAFETY: non-null storage pointers point at a Policy owned by this socket.
                if let Some(slot) = unsafe { p.as_mut() } {
                    *slot = *policy;
                }
            }
            None => {
                // SAFETY: deleting absent storage is a no-op returning -ENOENT.
                let _ = unsafe { bpf_sk_storage_delete(self.map(), sk) };
            }
        }
    }
}

/// Adds to a cgroup's counters, creating its entry when `create` is set; counts the overflow
/// when the map is full.
#[inline(always)]
pub(crate) fn cgroup_add(cgroup: u64, enforced: u64, dead: u64, create: bool) {
    let stats = match KA_CGSTATS.get_ptr_mut(cgroup) {
        Some(stats) => stats,
        None if create => {
            // Another CPU may insert the same key first; EEXIST is fine, E2BIG means full.
            let _ = KA_CGSTATS.insert(cgroup, CgroupStats::default(), u64::from(BPF_NOEXIST));
            match KA_CGSTATS.get_ptr_mut(cgroup) {
                Some(stats) => stats,
                None => {
                    count(Counter::CgroupStatsFull);
                    return;
                }
            }
        }
        None => return,
    };
    // SAFETY: `stats` points at a live map value; fields are updated atomically.
    unsafe {
        if enforced != 0 {
            atomic_add(&raw mut (*stats).enforced_total, enforced);
        }
        if dead != 0 {
            atomic_add(&raw mut (*stats).dead_peers, dead);
        }
    }
}
