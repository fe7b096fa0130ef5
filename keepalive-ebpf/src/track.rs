//! Tracking state: the records of enforced sockets, bounded per-cgroup counters, and per-CPU
//! event counters.
//!
//! A socket's record goes into the first free of its [`SOCK_SLOT_PROBES`] slots in
//! `KA_SOCK_SLOTS`, claimed with one compare-and-swap: no lock, no allocation, no hashing
//! beyond one multiply. Only when all are taken does it go to the `KA_SOCKS` hash, whose insert
//! and delete (bucket lock, allocation, RCU free) cost about 1.2 µs per loopback connection.
//! What a slot costs is mostly the cache line it lives on, hence the sequential first probe
//! (`keepalive_common::sock_slot`). The close callback frees the slot or deletes the entry.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg},
    ptr,
};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SkStorage},
    helpers::generated::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_sk_storage_delete, bpf_sk_storage_get,
    },
    macros::btf_map,
};
use keepalive_common::{
    AGENT_SLOTS, CONNECT_SLOTS, CgroupStats, ConnectSlot, Counter, DEFAULT_MAX_TRACKED_CGROUPS,
    DEFAULT_MAX_TRACKED_SOCKETS, LISTEN_PORTS, ListenPort, MAX_SOCK_SLOTS, Policy, SLOT_BUSY,
    SLOT_FREE, SOCK_SLOT_PROBES, SockRecord, SockSlot, sock_flags, sock_slot,
};

use crate::kernel;

/// Sized by the loader (`Settings::sock_slot_mask` + 1 slots).
#[btf_map]
static KA_SOCK_SLOTS: Array<SockSlot, { MAX_SOCK_SLOTS as usize }> = Array::new();

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

/// Written and read by the agent alone (`keepalive_common::MAP_AGENT`); declared here so it is
/// created and pinned with the others.
#[btf_map]
static KA_AGENT: Array<u64, { AGENT_SLOTS as usize }> = Array::new();

#[btf_map]
static KA_LOCKS: SkStorage<Policy> = SkStorage::new();

#[btf_map]
static KA_LISTENERS: SkStorage<Policy> = SkStorage::new();

#[btf_map]
static KA_UNTRACKED: SkStorage<SockRecord> = SkStorage::new();

/// See [`keepalive_common::MAP_LISTEN_PORTS`].
#[btf_map]
static KA_LISTEN_PORTS: LruHashMap<ListenPort, Policy, { LISTEN_PORTS as usize }> =
    LruHashMap::new();

/// The key of listener `sk` of cgroup `cgroup_id` in [`KA_LISTEN_PORTS`], and of the
/// connections it accepts, which share its port and namespace.
#[inline(always)]
pub(crate) fn listen_key(cgroup_id: u64, sk: *const u8) -> ListenPort {
    ListenPort {
        cgroup_id,
        port: kernel::local_port(sk),
        netns: kernel::netns_inum(sk),
    }
}

/// Notes `policy` as what the program set on the listener whose key is `key` (Some), or that
/// it set nothing there (None). See [`listened_policy`].
#[inline(always)]
pub(crate) fn note_listener(key: ListenPort, policy: Option<&Policy>) {
    // An unknown cgroup would share its key with every other.
    if key.cgroup_id == 0 {
        return;
    }
    match policy {
        // Passes find most listeners as they were: no new node for those.
        Some(policy) if listened_policy(key) == Some(*policy) => {}
        Some(policy) => {
            // Only a full LRU map fails an update, and it evicts instead.
            let _ = KA_LISTEN_PORTS.insert(key, policy, 0);
        }
        None => {
            let _ = KA_LISTEN_PORTS.remove(key);
        }
    }
}

/// What the program last set on the listener whose key is `key` (see [`listen_key`]), which
/// the connections it accepts inherit.
#[inline(always)]
pub(crate) fn listened_policy(key: ListenPort) -> Option<Policy> {
    if key.cgroup_id == 0 {
        return None;
    }
    let p = KA_LISTEN_PORTS.get_ptr(key)?;
    // SAFETY: a map value pointer stays valid for this run.
    Some(unsafe { *p })
}

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

/// Whether `cookie` can key a slot: not one of the two values that mark a free slot and one
/// being written. The kernel never makes cookie 0, but the first cookie it makes in a nested
/// context (an interrupt during another one) is `u64::MAX`, counting down from there; that
/// socket goes without a slot (its record to the hash, its connect unrecorded).
#[inline(always)]
fn slot_key(cookie: u64) -> bool {
    cookie != SLOT_FREE && cookie != SLOT_BUSY
}

/// Probe `probe` of `cookie` in the slot table.
#[inline(always)]
fn slot(cookie: u64, probe: u32) -> Option<*mut SockSlot> {
    if !slot_key(cookie) {
        return None;
    }
    KA_SOCK_SLOTS.get_ptr_mut(sock_slot(cookie, probe, kernel::sock_slot_mask()))
}

/// Slot `index` of the table, for `status`; `None` past its end.
#[inline(always)]
pub(crate) fn slot_at(index: u32) -> Option<*mut SockSlot> {
    if index > kernel::sock_slot_mask() {
        return None;
    }
    KA_SOCK_SLOTS.get_ptr_mut(index)
}

/// Frees `slot` if it still holds `cookie`'s record, for `status`, which found its socket
/// closed without a close callback (see `iter::open_state`). The compare-and-swap leaves a slot
/// that another socket claimed meanwhile alone.
#[inline(always)]
pub(crate) fn free_slot_of(slot: *mut SockSlot, cookie: u64) {
    // SAFETY: array slots are always valid.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*slot).cookie,
            cookie,
            SLOT_FREE,
        );
    }
}

/// The socket address `cookie`'s `KA_SOCKS` entry records, looked up afresh: the element a
/// map iterator hands over can be freed and reused while it is read.
#[inline(always)]
pub(crate) fn listed_sk(cookie: u64) -> Option<u64> {
    // SAFETY: as in `record`.
    unsafe { KA_SOCKS.get(cookie) }.map(|rec| rec.sk)
}

/// Drops `cookie`'s `KA_SOCKS` entry, for `status` (see [`free_slot_of`]).
#[inline(always)]
pub(crate) fn drop_listed(cookie: u64) {
    let _ = KA_SOCKS.remove(cookie);
}

/// The slot holding `cookie`'s record, if one does.
#[inline(always)]
fn find_slot(cookie: u64) -> Option<*mut SockSlot> {
    for probe in 0..SOCK_SLOT_PROBES {
        if let Some(slot) = slot(cookie, probe)
            // SAFETY: array slots are always valid.
            && unsafe { ptr::read_volatile(&raw const (*slot).cookie) } == cookie
        {
            return Some(slot);
        }
    }
    None
}

/// The tracking record of a socket, if it has one.
///
/// Only the socket's own callbacks and the apply iterator (which holds the socket's lock, so
/// the socket cannot close meanwhile) write a record, so the reference stays this socket's.
#[inline(always)]
pub(crate) fn record(cookie: u64) -> Option<&'static mut SockRecord> {
    if let Some(slot) = find_slot(cookie) {
        // SAFETY: see above; the slot is freed only by this socket's close.
        return Some(unsafe { &mut (*slot).sock });
    }
    // SAFETY: entries are only freed after an RCU grace period, so the pointer stays valid for
    // this program run; the program is the only writer of a given socket's entry.
    KA_SOCKS
        .get_ptr_mut(cookie)
        .and_then(|ptr| unsafe { ptr.as_mut() })
}

#[inline(always)]
fn connect_slot(cookie: u64) -> Option<*mut ConnectSlot> {
    if !slot_key(cookie) {
        return None;
    }
    KA_CONNECTS.get_ptr_mut(keepalive_common::connect_slot(cookie))
}

/// Remembers the current task as the one connecting `cookie`.
#[inline(always)]
pub(crate) fn remember_connect(cookie: u64) {
    let Some(slot) = connect_slot(cookie) else {
        return;
    };
    // SAFETY: the helper has no preconditions.
    let pid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    // SAFETY: array slots are always valid. One writer at a time: the slot is claimed with a
    // compare-and-swap from what it held to SLOT_BUSY, which matches no cookie, and published
    // with a fully ordered exchange, so a reader checking the cookie before and after never
    // takes a half-written slot, nor one two connects wrote at once. A connect that finds the
    // slot claimed leaves its process unknown. The helper writes the name straight into the
    // slot, 16 bytes NUL padded (zeroes when it fails): no copy, and no buffer on the stack.
    unsafe {
        let key = &raw mut (*slot).cookie;
        let held = ptr::read_volatile(key);
        if held == SLOT_BUSY
            || !atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                key, held, SLOT_BUSY,
            )
            .1
        {
            return;
        }
        ptr::write_volatile(&raw mut (*slot).pid, pid);
        bpf_get_current_comm((&raw mut (*slot).comm).cast(), 16);
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(key, cookie);
    }
}

/// Whether the connect callback remembered `cookie` (and its slot still holds it).
#[inline(always)]
pub(crate) fn connected(cookie: u64) -> bool {
    // SAFETY: array slots are always valid.
    connect_slot(cookie)
        .is_some_and(|slot| unsafe { ptr::read_volatile(&raw const (*slot).cookie) } == cookie)
}

/// Copies who connected `cookie` into `rec`, if the slot still holds it; whether it did.
#[inline(always)]
pub(crate) fn connect_task(cookie: u64, rec: &mut SockRecord) -> bool {
    let Some(slot) = connect_slot(cookie) else {
        return false;
    };
    // SAFETY: as in `remember_connect`. Both names are 8-byte aligned (checked in
    // keepalive-common), so they are copied a word at a time.
    unsafe {
        if ptr::read_volatile(&raw const (*slot).cookie) != cookie {
            return false;
        }
        rec.pid = ptr::read_volatile(&raw const (*slot).pid);
        kernel::copy_words(&raw const (*slot).comm, &raw mut rec.comm);
        if ptr::read_volatile(&raw const (*slot).cookie) == cookie {
            return true;
        }
        rec.pid = 0;
        rec.comm = [0; 16];
    }
    false
}

/// Puts `rec` into a free slot of `cookie`; whether one was free.
#[inline(always)]
fn claim_slot(cookie: u64, rec: &SockRecord) -> bool {
    for probe in 0..SOCK_SLOT_PROBES {
        let Some(slot) = slot(cookie, probe) else {
            continue;
        };
        // SAFETY: array slots are always valid. The compare-and-swap gives the slot to one
        // socket; the record is written while the slot reads BUSY, which matches no cookie,
        // and published with a fully ordered exchange, so readers that check the cookie
        // before and after copying never take a half-written record.
        unsafe {
            let key = &raw mut (*slot).cookie;
            if ptr::read_volatile(key) == SLOT_FREE
                && atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    key, SLOT_FREE, SLOT_BUSY,
                )
                .1
            {
                (*slot).sock = *rec;
                atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(key, cookie);
                return true;
            }
        }
    }
    false
}

/// Adds a tracking record for a socket that has none; whether there was room.
#[inline(always)]
pub(crate) fn insert_record(cookie: u64, rec: &SockRecord) -> bool {
    claim_slot(cookie, rec) || KA_SOCKS.insert(cookie, rec, 0).is_ok()
}

fn untracked_map() -> *mut c_void {
    ptr::from_ref(&KA_UNTRACKED).cast_mut().cast()
}

/// The record of a socket the program enforced but could not track (`KA_UNTRACKED`), if it
/// has one. `sk` is a socket pointer the calling program type may pass to bpf_sk_storage_get.
#[inline(always)]
pub(crate) fn stored_record(sk: *mut c_void) -> Option<&'static mut SockRecord> {
    // SAFETY: the helper returns null or this socket's storage, which lives as long as the
    // socket, so past this run; only this socket's callbacks and the iterator (holding the
    // socket's lock) write it.
    let p = unsafe { bpf_sk_storage_get(untracked_map(), sk, ptr::null_mut(), 0) };
    // SAFETY: non-null storage pointers point at a SockRecord.
    unsafe { p.cast::<SockRecord>().as_mut() }
}

/// Keeps `rec` in the socket's own storage, for a socket the tracking maps have no room for.
#[inline(always)]
pub(crate) fn store_record(sk: *mut c_void, rec: &SockRecord) {
    let flags = u64::from(BPF_SK_STORAGE_GET_F_CREATE);
    // SAFETY: as in `stored_record`; nothing is copied from the null init value.
    let p = unsafe { bpf_sk_storage_get(untracked_map(), sk, ptr::null_mut(), flags) };
    let slot = p.cast::<SockRecord>();
    if !slot.is_null() {
        // SAFETY: non-null storage pointers point at a SockRecord owned by this socket, 8-byte
        // aligned. Word by word: a plain copy compiles to a byte loop the verifier rejects.
        unsafe { kernel::copy_words(rec, slot) };
    }
}

/// Drops the socket's stored record (it is tracked now, or released).
#[inline(always)]
pub(crate) fn drop_stored_record(sk: *mut c_void) {
    // SAFETY: deleting absent storage is a no-op returning -ENOENT.
    let _ = unsafe { bpf_sk_storage_delete(untracked_map(), sk) };
}

/// What [`remove_record`] found.
pub(crate) enum Removed {
    /// A record in the maps, now dropped; whether it said the socket was locked.
    Listed { locked: bool },
    /// No record in the maps: the socket may keep one in its own storage, and may be locked
    /// (neither is worth a lookup on this rare path).
    NotListed,
}

/// Drops a socket's tracking record from the maps.
#[inline(always)]
pub(crate) fn remove_record(cookie: u64) -> Removed {
    let locked = |flags: u32| Removed::Listed {
        locked: flags & sock_flags::LOCKED != 0,
    };
    if let Some(slot) = find_slot(cookie) {
        // SAFETY: the slot holds this socket's record; freeing it is one store.
        return unsafe {
            let flags = ptr::read_volatile(&raw const (*slot).sock.flags);
            ptr::write_volatile(&raw mut (*slot).cookie, SLOT_FREE);
            locked(flags)
        };
    }
    // SAFETY: as in `record`.
    match unsafe { KA_SOCKS.get(cookie) }.map(|rec| rec.flags) {
        Some(flags) => {
            let _ = KA_SOCKS.remove(cookie);
            locked(flags)
        }
        None => Removed::NotListed,
    }
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

    /// The storage of `sk`, made if it has none (zeroed); `None` if the kernel has no room.
    #[inline(always)]
    fn slot<'a>(self, sk: *mut c_void) -> Option<&'a mut Policy> {
        let flags = u64::from(BPF_SK_STORAGE_GET_F_CREATE);
        // SAFETY: as in `get`; nothing is copied from the null init value.
        let p =
            unsafe { bpf_sk_storage_get(self.map(), sk, ptr::null_mut(), flags) }.cast::<Policy>();
        // SAFETY: non-null storage pointers point at a Policy owned by this socket, which
        // outlives the run.
        unsafe { p.as_mut() }
    }

    /// Stores for `sk` a policy of nothing but `flags`, written in place (the programs'
    /// stacks are tight).
    #[inline(always)]
    pub(crate) fn mark(self, sk: *mut c_void, flags: u32) {
        if let Some(slot) = self.slot(sk) {
            *slot = Policy {
                flags,
                ..Policy::default()
            };
        }
    }

    /// Stores `policy` for `sk` (Some) or drops it (None).
    #[inline(always)]
    pub(crate) fn set(self, sk: *mut c_void, policy: Option<&Policy>) {
        match policy {
            Some(policy) => {
                if let Some(slot) = self.slot(sk) {
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

/// Takes a socket back out of its cgroup's `enforced_total`: one released as if its cgroup had
/// been `off` from the start was never covered, and is counted again if it is covered later.
#[inline(always)]
pub(crate) fn cgroup_uncount(cgroup: u64) {
    let Some(stats) = KA_CGSTATS.get_ptr_mut(cgroup) else {
        return;
    };
    // SAFETY: `stats` points at a live map value. The check only keeps an entry made after
    // the socket's count was lost (the map was full then) from wrapping around.
    unsafe {
        if core::ptr::read_volatile(&raw const (*stats).enforced_total) != 0 {
            // Adding 2^64 - 1 subtracts one.
            atomic_add(&raw mut (*stats).enforced_total, u64::MAX);
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
