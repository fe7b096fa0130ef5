//! Setting and reading keepalive options with bpf_setsockopt / bpf_getsockopt.
//!
//! `target` is whatever the program type passes as the helpers' first argument: the sock_ops
//! context, or a socket pointer in a TCP iterator.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_getsockopt, bpf_setsockopt};
use keepalive_common::{Counter, Policy, policy_flags, uapi::*};

use crate::track::count;

#[inline(always)]
fn set_int(target: *mut c_void, level: i32, name: i32, value: u32, fail: Counter) -> bool {
    let mut value = value as i32;
    // SAFETY: the helper reads 4 bytes from `value`, which lives on this stack frame.
    let ret = unsafe { bpf_setsockopt(target, level, name, (&raw mut value).cast(), 4) };
    if ret != 0 {
        count(fail);
    }
    ret == 0
}

#[inline(always)]
fn get_int(target: *mut c_void, level: i32, name: i32) -> Option<u32> {
    let mut value = 0i32;
    // SAFETY: the helper writes at most 4 bytes into `value`.
    let ret = unsafe { bpf_getsockopt(target, level, name, (&raw mut value).cast(), 4) };
    (ret == 0).then_some(value as u32)
}

/// Sets the policy's values and then SO_KEEPALIVE. Every failure is counted; returns whether all
/// calls succeeded.
#[inline(always)]
pub(crate) fn apply(target: *mut c_void, policy: &Policy) -> bool {
    let mut ok = set_int(
        target,
        IPPROTO_TCP,
        TCP_KEEPIDLE,
        policy.idle,
        Counter::FailIdle,
    );
    ok &= set_int(
        target,
        IPPROTO_TCP,
        TCP_KEEPINTVL,
        policy.interval,
        Counter::FailInterval,
    );
    ok &= set_int(
        target,
        IPPROTO_TCP,
        TCP_KEEPCNT,
        policy.count,
        Counter::FailCount,
    );
    if policy.flags & policy_flags::USER_TIMEOUT != 0 {
        ok &= set_int(
            target,
            IPPROTO_TCP,
            TCP_USER_TIMEOUT,
            policy.user_timeout_ms,
            Counter::FailUserTimeout,
        );
    }
    ok &= set_int(target, SOL_SOCKET, SO_KEEPALIVE, 1, Counter::FailKeepalive);
    ok
}

/// Whether the application enabled SO_KEEPALIVE on the socket itself.
#[inline(always)]
pub(crate) fn app_enabled_keepalive(target: *mut c_void) -> bool {
    matches!(get_int(target, SOL_SOCKET, SO_KEEPALIVE), Some(v) if v != 0)
}

/// The keepalive values the application set, for `fill` sockets that keep them.
#[inline(always)]
pub(crate) fn read_values(target: *mut c_void, mode: u32) -> Policy {
    let user_timeout = get_int(target, IPPROTO_TCP, TCP_USER_TIMEOUT).unwrap_or(0);
    Policy {
        idle: get_int(target, IPPROTO_TCP, TCP_KEEPIDLE).unwrap_or(0),
        interval: get_int(target, IPPROTO_TCP, TCP_KEEPINTVL).unwrap_or(0),
        count: get_int(target, IPPROTO_TCP, TCP_KEEPCNT).unwrap_or(0),
        user_timeout_ms: user_timeout,
        mode,
        flags: if user_timeout != 0 {
            policy_flags::USER_TIMEOUT
        } else {
            0
        },
    }
}

/// Asks for state-change callbacks on a socket outside sock_ops (kernel 6.10+).
#[inline(always)]
pub(crate) fn request_state_callbacks(target: *mut c_void) -> bool {
    let mut flags = SOCK_OPS_STATE_CB_FLAG as i32;
    // SAFETY: the helper reads 4 bytes from `flags`.
    let ret = unsafe {
        bpf_setsockopt(
            target,
            IPPROTO_TCP,
            TCP_BPF_SOCK_OPS_CB_FLAGS,
            (&raw mut flags).cast(),
            4,
        )
    };
    ret == 0
}
