//! Reads of kernel memory at the offsets the agent found in `/sys/kernel/btf/vmlinux`.
//!
//! Rust has no CO-RE field relocations, so the agent resolves every field this program touches
//! and hands the offsets over as a read-only global. All reads go through
//! `bpf_probe_read_kernel`, which cannot fault: a bad pointer yields `None`, never a crash.

use aya_ebpf::{Global, helpers::bpf_probe_read_kernel};
use keepalive_common::{KernelOffsets, Settings};

#[unsafe(no_mangle)]
static KA_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
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
    icsk_probes_out: 0,
});

#[unsafe(no_mangle)]
static KA_SETTINGS: Global<Settings> = Global::new(Settings {
    attach_cgroup_id: 0,
});

#[inline(always)]
pub(crate) fn offsets() -> KernelOffsets {
    KA_OFFSETS.load()
}

#[inline(always)]
pub(crate) fn attach_cgroup_id() -> u64 {
    KA_SETTINGS.load().attach_cgroup_id
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
pub(crate) fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-safe accessor; an invalid
    // address makes it return an error rather than fault.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.ok()
}

/// Reads a non-null kernel pointer at `base + offset`.
#[inline(always)]
pub(crate) fn read_ptr(base: *const u8, offset: u32) -> Option<*const u8> {
    match read::<*const u8>(base, offset) {
        Some(ptr) if !ptr.is_null() => Some(ptr),
        _ => None,
    }
}

/// A socket's own cgroup: the one it was created in, recorded by the kernel in
/// `sk->sk_cgrp_data`. Unlike the current task's cgroup, this is right in softirq too.
#[derive(Clone, Copy)]
pub(crate) struct SockCgroup {
    /// cgroup id (the kernfs node id, equal to the cgroup directory's inode number).
    pub(crate) id: u64,
    /// The cgroup's `struct kernfs_node *`, the start of the ancestor walk.
    pub(crate) kn: *const u8,
}

/// Reads the cgroup of the full socket `sk` (a `struct sock *` or `struct tcp_sock *`).
#[inline(always)]
pub(crate) fn sock_cgroup(sk: *const u8, off: &KernelOffsets) -> Option<SockCgroup> {
    let cgroup = read_ptr(sk, off.sock_cgroup)?;
    let kn = read_ptr(cgroup, off.cgroup_kn)?;
    let id = read::<u64>(kn, off.kn_id)?;
    Some(SockCgroup { id, kn })
}
