//! The kernel side of keepalive.
//!
//! * `keepalive_sockops` (sock_ops): when a TCP socket in the attach cgroup reaches ESTABLISHED,
//!   on either the connecting or the accepting side, look up its cgroup's policy and set
//!   SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT and optionally TCP_USER_TIMEOUT.
//!   It also records the connecting task, and counts closes and dead peers.
//! * `keepalive_lock` (cgroup/setsockopt): holds `lock`-mode sockets at their policy.
//! * `keepalive_apply` (iter/tcp) and `keepalive_status` (iter/bpf_sk_storage_map): see `iter`.
//!
//! Nothing here can panic or loop without bound; every failure is counted in `KA_COUNTERS`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only atomic add the BPF target offers"
)]

mod enforce;
mod iter;
mod kernel;
mod policy;
mod socket;
mod track;

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        bpf_sockopt,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_skc_to_tcp_sock},
    macros::{cgroup_sockopt, sock_ops},
    programs::{SockOpsContext, SockoptContext},
};
use aya_log_ebpf::debug;
use keepalive_common::{Counter, SockRecord, policy_flags, sock_flags, uapi};

use crate::{
    kernel::off,
    socket::{Origin, Socket},
    track::{Removed, count},
};

#[sock_ops]
pub fn keepalive_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx, sock_flags::OUTBOUND),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx, sock_flags::INBOUND),
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        _ => {}
    }
    // 1 = let the operation proceed; `reply` stays 0, i.e. "kernel default" for every op.
    1
}

#[inline(always)]
fn sock_of(ctx: &SockOpsContext) -> *mut c_void {
    // SAFETY: `ops` is the context the kernel passed in.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk }.cast()
}

#[inline(always)]
fn cookie_of(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the sock_ops variant of the helper takes the context.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// Asks for the socket's state-change callbacks; the record flags that say how it went.
#[inline(always)]
fn enable_state_cb(ctx: &SockOpsContext) -> u32 {
    let current = ctx.cb_flags();
    if current & uapi::SOCK_OPS_STATE_CB_FLAG != 0 {
        sock_flags::STATE_CB | sock_flags::STATE_CB_HELD
    } else if ctx
        .set_cb_flags((current | uapi::SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_ok()
    {
        sock_flags::STATE_CB
    } else {
        0
    }
}

/// The socket of a sock_ops callback, with its own cgroup, and the cookie it held before this
/// callback (0 when this callback made it).
#[inline(always)]
fn socket(ctx: &SockOpsContext) -> Option<(Socket, u64)> {
    let sk = sock_of(ctx);
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is the full socket of this callback; the helper checks its type.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) }.cast::<u8>().cast_const();
    let cgroup = kernel::sock_cgroup(tp);
    if !cgroup.is_known() {
        count(Counter::CgroupUnknown);
    }
    // The cookie the socket holds, one load instead of a helper call; only the first call
    // makes one (the connect callback did on the connecting end).
    let held = kernel::stored_cookie(tp);
    let cookie = match held {
        0 => cookie_of(ctx),
        cookie => cookie,
    };
    Some((
        Socket {
            target: ctx.ops.cast(),
            tp,
            sk,
            cookie,
            cgroup,
        },
        held,
    ))
}

/// Remembers the connecting task: connect() runs in the caller's context, the later
/// ESTABLISHED callback usually does not.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    track::remember_connect(cookie_of(ctx));
}

/// Sets the policy on a new listener, so the connections it accepts inherit it from the
/// kernel's socket clone instead of paying for setsockopt calls one by one.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let Some((sock, _)) = socket(ctx) else {
        return;
    };
    let Some(resolved) = policy::resolve_in_scope(sock.cgroup) else {
        return;
    };
    enforce::configure_listener(
        sock.target,
        sock.sk,
        sock.tp,
        sock.cgroup.id,
        &resolved.policy,
    );
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext, direction: u32) {
    let Some((sock, held)) = socket(ctx) else {
        return;
    };
    // A connecting socket that met a SYN instead of a SYN-ACK (a simultaneous open, or a
    // connect to its own address) gets there through the passive callback. It is no accepted
    // connection: that one is a new socket, whose cookie no connect callback took.
    let direction = if direction == sock_flags::INBOUND && held != 0 && track::connected(held) {
        sock_flags::OUTBOUND
    } else {
        direction
    };
    let Some(resolved) = policy::resolve_in_scope(sock.cgroup) else {
        count(Counter::NoPolicyTable);
        return;
    };
    let result = socket::enforce_socket(
        &sock,
        &resolved,
        Origin::Established { direction },
        |rec| describe(ctx, rec, sock.cookie, direction),
        || enable_state_cb(ctx),
    );
    // Compiled out by the verifier unless the agent loads with debug logging (AYA_LOG_LEVEL).
    debug!(
        ctx,
        "socket in cgroup {} got policy of cgroup {} (mode {}, result {})",
        sock.cgroup.id,
        resolved.policy_cgroup,
        resolved.policy.mode,
        result
    );
}

/// Fills a record's addresses from the sock_ops context.
#[inline(always)]
fn describe(ctx: &SockOpsContext, rec: &mut SockRecord, cookie: u64, direction: u32) {
    if direction == sock_flags::OUTBOUND && track::connect_task(cookie, rec) {
        rec.flags |= sock_flags::HAS_TASK;
    }
    let family = ctx.family() as u16;
    rec.sk = sock_of(ctx) as u64;
    rec.family = family;
    rec.state = uapi::TCP_ESTABLISHED;
    rec.local_port = ctx.local_port() as u16;
    // remote_port holds the network-order port in its upper 16 bits.
    rec.remote_port = u16::from_be((ctx.remote_port() >> 16) as u16);
    // Word stores: the addresses are 8-byte aligned (checked in keepalive-common), and byte
    // copies would take a dozen instructions per word on every connection.
    let local = (&raw mut rec.local_addr).cast::<u32>();
    let remote = (&raw mut rec.remote_addr).cast::<u32>();
    if family == uapi::AF_INET6 {
        for i in 0..4 {
            // One 4-byte load per word: the verifier rejects wider context loads, which the
            // compiler would otherwise merge these into.
            // SAFETY: in-bounds reads of the context the kernel passed, and in-bounds aligned
            // writes of the record.
            unsafe {
                local
                    .add(i)
                    .write(core::ptr::read_volatile(&raw const (*ctx.ops).local_ip6[i]));
                remote.add(i).write(core::ptr::read_volatile(
                    &raw const (*ctx.ops).remote_ip6[i],
                ));
            }
        }
    } else {
        // SAFETY: as above.
        unsafe {
            local.write(ctx.local_ip4());
            remote.write(ctx.remote_ip4());
        }
    }
}

/// Follows the socket's state. On close: count a dead peer when the kernel gave up on it
/// (keepalive, user timeout or retransmissions expired, see [`gave_up`]), and drop its record.
#[inline(always)]
fn on_state_change(ctx: &SockOpsContext) {
    // Only the close matters; `status` reads the live state from the socket itself.
    if ctx.arg(1) != u32::from(uapi::TCP_CLOSE) {
        return;
    }
    let sk = sock_of(ctx);
    let tp = if sk.is_null() {
        core::ptr::null()
    } else {
        // SAFETY: as in `socket`.
        unsafe { bpf_skc_to_tcp_sock(sk) }.cast::<u8>().cast_const()
    };
    // The cookie as the socket holds it. The program took it (so the kernel made it) before
    // it asked for these callbacks and before it recorded or locked anything, so a socket
    // without one has neither, and is not one the program covered: another program asked
    // for its state callbacks.
    let cookie = if tp.is_null() {
        cookie_of(ctx)
    } else {
        kernel::stored_cookie(tp)
    };
    if cookie == 0 {
        return;
    }
    // A socket can connect again after a disconnect (connect with AF_UNSPEC). Its next
    // connection must not take this one's lock into a policy without one, nor this one's
    // record: a later pass would take it for its own, not count it as a new connection, and
    // read what the program set from it.
    let covered = match track::remove_record(cookie) {
        Removed::Listed { .. } if sk.is_null() => true,
        _ if sk.is_null() => false,
        Removed::Listed { locked: false } => true,
        Removed::Listed { locked: true } => {
            track::PolicyStore::Locks.set(sk, None);
            true
        }
        // Off the maps: one they had no room for keeps its record in its own storage. Without
        // one, another program asked for the callbacks (of a socket in an `off` cgroup, say),
        // and its dead peer is not one of keepalive's.
        Removed::NotListed => {
            let stored = track::stored_record(sk).is_some();
            track::PolicyStore::Locks.set(sk, None);
            if stored {
                track::drop_stored_record(sk);
            }
            stored
        }
    };
    if covered && !tp.is_null() && gave_up(tp) {
        count(Counter::DeadPeers);
        // Never re-create the entry of a removed cgroup just to count this.
        track::cgroup_add(kernel::sock_cgroup(tp).id, 0, 1, false);
    }
}

/// Whether the kernel closed the socket because its peer stopped answering: it then reports
/// the last ICMP error it kept (`sk_err_soft`, "network unreachable", say) or else ETIMEDOUT
/// (`tcp_write_err`). A reset or an abort sets other errors, never the soft one.
#[inline(always)]
fn gave_up(tp: *const u8) -> bool {
    let err = kernel::load::<i32>(tp, off!(sock_err));
    err == uapi::ETIMEDOUT || (err != 0 && err == kernel::load::<i32>(tp, off!(sock_err_soft)))
}

/// Holds `lock`-mode sockets at their policy: SO_KEEPALIVE cannot be switched off, and idle,
/// interval, count and user timeout cannot be raised above the policy (a user timeout, under a
/// policy without one, above `idle + interval × count`). Looser values are rewritten to the
/// policy's and the call succeeds; stricter values, and ones the kernel refuses, pass
/// unchanged.
#[cgroup_sockopt(setsockopt)]
pub fn keepalive_lock(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let so = unsafe { &mut *ctx.sockopt };
    let watched = match so.level {
        uapi::SOL_SOCKET => so.optname == uapi::SO_KEEPALIVE,
        uapi::IPPROTO_TCP => matches!(
            so.optname,
            uapi::TCP_KEEPIDLE | uapi::TCP_KEEPINTVL | uapi::TCP_KEEPCNT | uapi::TCP_USER_TIMEOUT
        ),
        _ => false,
    };
    if watched {
        hold(so);
    }
    if so.optlen > PAGE_SIZE {
        // The program sees only the first page of a larger value; before 6.5 the kernel fails
        // the call with EFAULT unless the program sets optlen within that page. 0 means "use
        // the caller's value", right for options this program does not hold. The kernel reads
        // only the first int of the ones it holds, so those get 4: the kernel takes the value
        // as checked (and rewritten) here, not the caller's again.
        so.optlen = if watched { 4 } else { 0 };
    }
    1
}

/// Rewrites a watched option's value (the first int of `so`'s buffer) to the policy's if the
/// socket is locked and the value is looser.
#[inline(always)]
fn hold(so: &mut bpf_sockopt) {
    if so.optlen < 4 {
        return;
    }
    // SAFETY: reading the union member the kernel set for this program type.
    let sk = unsafe { so.__bindgen_anon_1.sk }.cast::<c_void>();
    if sk.is_null() {
        return;
    }
    let Some(policy) = track::PolicyStore::Locks.get(sk) else {
        return;
    };
    // SAFETY: union members set by the kernel for setsockopt programs.
    let (start, end) = unsafe { (so.__bindgen_anon_2.optval, so.__bindgen_anon_3.optval_end) };
    let optval = start.cast::<i32>();
    if start.wrapping_byte_add(4) > end {
        return;
    }
    // SAFETY: bounds checked against optval_end above.
    let value = unsafe { *optval };
    let held = if so.level == uapi::SOL_SOCKET {
        (value == 0).then_some(1)
    } else if so.optname == uapi::TCP_USER_TIMEOUT && policy.flags & policy_flags::USER_TIMEOUT == 0
    {
        // No user timeout in the policy: none (0) is the policy's, and so is one up to the time
        // keepalive takes to give up. A longer one would replace `count` for idle connections
        // and let a dead peer stay longer. A negative one the kernel refuses itself.
        let span = policy.keepalive_span_ms();
        (value > 0 && value as u32 > span).then_some(span)
    } else if so.optname == uapi::TCP_USER_TIMEOUT {
        // None (0) is looser than the policy's; a negative one the kernel refuses itself.
        let limit = policy.user_timeout_ms;
        (value == 0 || (value > 0 && value as u32 > limit)).then_some(limit)
    } else {
        let (limit, max) = match so.optname {
            uapi::TCP_KEEPIDLE => (policy.idle, uapi::MAX_KEEPIDLE),
            uapi::TCP_KEEPINTVL => (policy.interval, uapi::MAX_KEEPINTVL),
            _ => (policy.count, uapi::MAX_KEEPCNT),
        };
        // A value the kernel refuses (below 1 or above its limit) passes unchanged, so the
        // call fails with EINVAL as it would without the lock, and changes nothing.
        (value >= 1 && value as u32 <= max && value as u32 > limit).then_some(limit)
    };
    if let Some(held) = held {
        // SAFETY: bounds checked against optval_end above.
        unsafe { *optval = held as i32 };
        count(Counter::LockClamped);
    }
}

/// The smallest page size Linux runs with. On larger pages, values between this and the page
/// size are treated the same way, which is still right: the program's buffer holds the first
/// int of a held option, and the caller's value is the one to use for any other.
const PAGE_SIZE: i32 = 4096;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
