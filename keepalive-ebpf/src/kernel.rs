//! Reads of kernel memory at the offsets the agent found in `/sys/kernel/btf/vmlinux`.
//!
//! Rust has no CO-RE field relocations, so the agent resolves every field this program touches
//! and hands the offsets over as a read-only global. All reads go through
//! `bpf_probe_read_kernel`, which cannot fault: a bad pointer yields `None`, never a crash.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use keepalive_common::{KernelOffsets, Policy, Settings};

/// Patched by the loader (read-only, so the verifier sees the values as constants).
#[unsafe(no_mangle)]
pub(crate) static KA_OFFSETS: KernelOffsets = KernelOffsets {
    sock_cgroup: 0,
    sock_err: 0,
    cgroup_kn: 0,
    kn_id: 0,
    kn_parent: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_family: 0,
    skc_state: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_cookie: 0,
    sk_flags: 0,
    sock_keepopen_bit: 0,
    tcp_keepalive_time: 0,
    tcp_keepalive_intvl: 0,
    tcp_keepalive_probes: 0,
    icsk_user_timeout: 0,
    icsk_probes_out: 0,
    sock_err_soft: 0,
    skc_net: 0,
    net_inum: 0,
};

/// Patched by the loader.
#[unsafe(no_mangle)]
static KA_SETTINGS: Settings = Settings {
    attach_cgroup_id: 0,
    sock_slot_mask: 0,
    _pad: 0,
};

/// Reads one field of [`KA_OFFSETS`]. Volatile, so the compiler cannot fold in the zeros the
/// loader replaces; one field at a time, so each use costs one load.
macro_rules! off {
    ($field:ident) => {
        // SAFETY: an aligned read of a field of a static.
        unsafe { core::ptr::read_volatile(&raw const $crate::kernel::KA_OFFSETS.$field) }
    };
}
pub(crate) use off;

/// The kernel's HZ, learned from the first TCP_KEEPIDLE this program sets (the kernel stores
/// it in jiffies). 0 until then.
#[unsafe(no_mangle)]
static mut KA_HZ: u64 = 0;

#[inline(always)]
pub(crate) fn attach_cgroup_id() -> u64 {
    // SAFETY: an aligned read of a field of a static.
    unsafe { core::ptr::read_volatile(&raw const KA_SETTINGS.attach_cgroup_id) }
}

/// [`Settings::sock_slot_mask`].
#[inline(always)]
pub(crate) fn sock_slot_mask() -> u32 {
    // SAFETY: an aligned read of a field of a static.
    unsafe { core::ptr::read_volatile(&raw const KA_SETTINGS.sock_slot_mask) }
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
pub(crate) fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-safe accessor; an invalid
    // address makes it return an error rather than fault.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.ok()
}

/// Loads a `T` at `base + offset` where `base` is a BTF-typed kernel pointer (from
/// bpf_skc_to_tcp_sock, an iterator context, or a field loaded through one). The verifier
/// checks the field against the kernel's BTF and turns the load into a fault-safe probe load:
/// no helper call, which matters on every connection.
#[inline(always)]
pub(crate) fn load<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: see above; the verifier rejects the program if `base + offset` is not a field
    // of the pointed-to type, and a fault reads as zero instead of crashing.
    unsafe { core::ptr::read_volatile(base.wrapping_add(offset as usize).cast::<T>()) }
}

/// Copies a `T` 8 bytes at a time, every read and write volatile: a copy out of a slot that
/// other programs may rewrite stays between the reads of the slot's guard word around it (BPF
/// has no fence), and is never turned into a `memcpy` of the whole value on the small BPF stack.
///
/// # Safety
/// `from` and `to` are valid for a `T`, 8-byte aligned, and `T`'s size is a multiple of 8.
#[inline(always)]
pub(crate) unsafe fn copy_words<T>(from: *const T, to: *mut T) {
    let (from, to) = (from.cast::<u64>(), to.cast::<u64>());
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: see above.
        unsafe { core::ptr::write_volatile(to.add(i), core::ptr::read_volatile(from.add(i))) };
    }
}

/// Fills `value` with zeroes 8 bytes at a time, in place: a `Default` or struct update of a
/// record compiles to a call to a byte-by-byte `memset`, on every connection (and so does a
/// zeroed value returned and copied).
///
/// # Safety
/// All zeroes is a valid `T`, and `T`'s size is a multiple of 8.
#[inline(always)]
pub(crate) unsafe fn zero<T>(value: &mut core::mem::MaybeUninit<T>) -> &mut T {
    let words = value.as_mut_ptr().cast::<u64>();
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: in bounds; volatile, so the stores are not merged back into a `memset`.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte was written, and all zeroes is a valid `T` (the caller's promise).
    unsafe { value.assume_init_mut() }
}

/// A socket's own cgroup: the one it was created in, recorded by the kernel in
/// `sk->sk_cgrp_data`. Unlike the current task's cgroup, this is right in softirq too.
///
/// A plain struct rather than an `Option`: the verifier rejects the uninitialized payload
/// registers the compiler moves around for `None`.
#[derive(Clone, Copy)]
pub(crate) struct SockCgroup {
    /// cgroup id (the kernfs node id, equal to the cgroup directory's inode number); 0 when
    /// the cgroup could not be read.
    pub(crate) id: u64,
    /// The cgroup's `struct kernfs_node *`, the start of the ancestor walk; null when unknown.
    pub(crate) kn: *const u8,
}

impl SockCgroup {
    /// The cgroup could not be read.
    pub(crate) const UNKNOWN: Self = Self {
        id: 0,
        kn: core::ptr::null(),
    };

    /// Whether the cgroup is known.
    #[inline(always)]
    pub(crate) fn is_known(&self) -> bool {
        !self.kn.is_null()
    }
}

/// Reads the cgroup of the full socket `sk` (a `struct sock *` or `struct tcp_sock *`).
#[inline(always)]
pub(crate) fn sock_cgroup(sk: *const u8) -> SockCgroup {
    if sk.is_null() {
        return SockCgroup::UNKNOWN;
    }
    let cgroup: *const u8 = load(sk, off!(sock_cgroup));
    if cgroup.is_null() {
        return SockCgroup::UNKNOWN;
    }
    let kn: *const u8 = load(cgroup, off!(cgroup_kn));
    if kn.is_null() {
        return SockCgroup::UNKNOWN;
    }
    SockCgroup {
        id: load(kn, off!(kn_id)),
        kn,
    }
}

/// The socket's cookie as the socket holds it, read with one load instead of a helper call; 0
/// until something asks the kernel for it (`bpf_get_socket_cookie` makes it on the first call).
#[inline(always)]
pub(crate) fn stored_cookie(tp: *const u8) -> u64 {
    if tp.is_null() {
        return 0;
    }
    load(tp, off!(skc_cookie))
}

/// Whether SO_KEEPALIVE is on, read from the socket's flags (what getsockopt reports, without
/// a helper call, and on kernels whose bpf_getsockopt cannot read it).
#[inline(always)]
pub(crate) fn keepalive_on(tp: *const u8) -> bool {
    if tp.is_null() {
        return false;
    }
    let flags: u64 = load(tp, off!(sk_flags));
    flags & (1 << off!(sock_keepopen_bit)) != 0
}

/// The inode number of the socket's network namespace; 0 when the kernel has none.
#[inline(always)]
pub(crate) fn netns_inum(sk: *const u8) -> u32 {
    if sk.is_null() || off!(skc_net) == 0 || off!(net_inum) == 0 {
        return 0;
    }
    let net: *const u8 = load(sk, off!(skc_net));
    if net.is_null() {
        return 0;
    }
    load(net, off!(net_inum))
}

/// The socket's local port, in host byte order.
#[inline(always)]
pub(crate) fn local_port(sk: *const u8) -> u32 {
    if sk.is_null() {
        return 0;
    }
    u32::from(load::<u16>(sk, off!(skc_num)))
}

/// Whether the program knows HZ yet: not after a load until it first sets an idle time.
#[inline(always)]
pub(crate) fn hz_known() -> bool {
    hz() != 0
}

#[inline(always)]
fn hz() -> u64 {
    // SAFETY: a plain aligned read of a global; racing writers store the same value.
    unsafe { core::ptr::read_volatile(&raw const KA_HZ) }
}

/// Learns HZ from a socket on which TCP_KEEPIDLE was just set to `idle` seconds.
#[inline(always)]
pub(crate) fn learn_hz(tp: *const u8, idle: u32) {
    if hz() != 0 || idle == 0 || tp.is_null() {
        return;
    }
    let jiffies: u32 = load(tp, off!(tcp_keepalive_time));
    if jiffies != 0 && jiffies.is_multiple_of(idle) {
        // SAFETY: as in `hz`.
        unsafe { core::ptr::write_volatile(&raw mut KA_HZ, u64::from(jiffies / idle)) };
    }
}

/// Whether the socket already carries exactly `policy`, e.g. inherited from its listener.
/// Costs a few memory reads instead of five setsockopt calls; false while HZ is unknown (see
/// `enforce::carries`).
#[inline(always)]
pub(crate) fn carries(tp: *const u8, policy: &Policy) -> bool {
    keepalive_on(tp)
        && has_values(tp, policy) == Some(true)
        && policy.user_timeout_held(user_timeout_ms(tp))
}

/// Whether the socket's idle, interval and count are `policy`'s; `None` while HZ is unknown.
#[inline(always)]
pub(crate) fn has_values(tp: *const u8, policy: &Policy) -> Option<bool> {
    let hz = hz();
    if hz == 0 || tp.is_null() {
        return None;
    }
    let time = u64::from(load::<u32>(tp, off!(tcp_keepalive_time)));
    let intvl = u64::from(load::<u32>(tp, off!(tcp_keepalive_intvl)));
    let probes = u32::from(load::<u8>(tp, off!(tcp_keepalive_probes)));
    Some(
        time == u64::from(policy.idle) * hz
            && intvl == u64::from(policy.interval) * hz
            && probes == policy.count,
    )
}

/// The socket's TCP_USER_TIMEOUT in milliseconds (0: the kernel's default).
#[inline(always)]
pub(crate) fn user_timeout_ms(tp: *const u8) -> u32 {
    if tp.is_null() {
        return 0;
    }
    load::<u32>(tp, off!(icsk_user_timeout))
}
