//! Iterator programs. aya-ebpf has no `#[iter]` macro, so these are declared by hand with the
//! context layouts from `include/linux/bpf.h` (`struct bpf_iter__tcp`,
//! `struct bpf_iter__bpf_sk_storage_map`).

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_seq_write, bpf_skc_to_tcp_sock};
use keepalive_common::{SockRecord, StatusRecord, sock_flags, uapi};

use crate::{
    kernel::{self, read},
    policy,
    socket::{self, Origin},
};

#[repr(C)]
pub struct IterMeta {
    seq: *mut c_void,
    session_id: u64,
    seq_num: u64,
}

#[repr(C)]
pub struct IterTcp {
    meta: *mut IterMeta,
    sk_common: *mut c_void,
    uid: u32,
}

#[repr(C)]
pub struct IterSkStorage {
    meta: *mut IterMeta,
    map: *mut c_void,
    sk: *mut c_void,
    value: *mut c_void,
}

#[inline(always)]
fn seq_write<T>(meta: *mut IterMeta, value: &T) {
    // SAFETY: `meta` comes from the iterator context and is non-null for every call but the
    // final one, which the callers filter out by checking their object pointer first.
    let seq = unsafe { (*meta).seq };
    // SAFETY: the helper copies `size_of::<T>()` bytes from `value` into the seq buffer.
    let _ = unsafe {
        bpf_seq_write(
            seq.cast(),
            core::ptr::from_ref(value).cast(),
            size_of::<T>() as u32,
        )
    };
}

/// Applies policy to one existing TCP socket of the iterating network namespace and writes
/// one [`keepalive_common::apply_result`] byte for each socket inside the attach cgroup.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn keepalive_apply(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let ctx = unsafe { &*ctx };
    let sk = ctx.sk_common;
    if sk.is_null() {
        return 0;
    }
    // SAFETY: `sk` is a sock_common from the iterator; the helper checks its type.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) }.cast::<c_void>();
    if tp.is_null() {
        return 0;
    }
    let off = kernel::offsets();
    if read::<u8>(sk.cast(), off.skc_state) != Some(uapi::TCP_ESTABLISHED) {
        return 0;
    }
    let cgroup = kernel::sock_cgroup(tp.cast(), &off);
    if cgroup.is_none() {
        return 0;
    }
    let Some(resolved) = policy::resolve(cgroup, true) else {
        return 0;
    };
    if !resolved.in_scope {
        return 0;
    }
    let result = socket::enforce_socket(tp, tp, cgroup, &resolved, Origin::Existing, || {
        crate::enforce::request_state_callbacks(tp)
    });
    seq_write(ctx.meta, &result);
    0
}

/// Writes one [`StatusRecord`] for each open socket that has a tracking record.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_sk_storage_map")]
pub fn keepalive_status(ctx: *mut IterSkStorage) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let ctx = unsafe { &*ctx };
    let sk = ctx.sk.cast::<u8>().cast_const();
    let value = ctx.value.cast::<SockRecord>().cast_const();
    if sk.is_null() || value.is_null() {
        return 0;
    }
    // SAFETY: `value` points at this map's value, which is a SockRecord.
    let sock = unsafe { *value };
    if sock.flags & (sock_flags::ENFORCED | sock_flags::APP_OWNED) == 0 {
        return 0;
    }
    let off = kernel::offsets();
    let state = read::<u8>(sk, off.skc_state).unwrap_or(0);
    if state == uapi::TCP_CLOSE || state == 0 {
        return 0;
    }
    let family = read::<u16>(sk, off.skc_family).unwrap_or(0);
    let mut out = StatusRecord {
        sock,
        local_addr: [0; 16],
        remote_addr: [0; 16],
        local_port: read::<u16>(sk, off.skc_num).unwrap_or(0),
        remote_port: u16::from_be(read::<u16>(sk, off.skc_dport).unwrap_or(0)),
        family,
        state,
        probes_out: read::<u8>(sk, off.icsk_probes_out).unwrap_or(0),
    };
    if family == uapi::AF_INET6 {
        out.local_addr = read::<[u8; 16]>(sk, off.skc_v6_rcv_saddr).unwrap_or([0; 16]);
        out.remote_addr = read::<[u8; 16]>(sk, off.skc_v6_daddr).unwrap_or([0; 16]);
    } else {
        let local = read::<[u8; 4]>(sk, off.skc_rcv_saddr).unwrap_or([0; 4]);
        let remote = read::<[u8; 4]>(sk, off.skc_daddr).unwrap_or([0; 4]);
        out.local_addr[..4].copy_from_slice(&local);
        out.remote_addr[..4].copy_from_slice(&remote);
    }
    seq_write(ctx.meta, &out);
    0
}
