//! Setting and reading keepalive options with bpf_setsockopt / bpf_getsockopt.
//!
//! `target` is whatever the program type passes as the helpers' first argument: the sock_ops
//! context, or a socket pointer in a TCP iterator.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_getsockopt, bpf_setsockopt};
use keepalive_common::{Counter, Policy, mode, policy_flags, sock_flags, uapi::*};

use crate::{
    kernel,
    track::{self, PolicyStore, count},
};

/// bpf_setsockopt with an int value; whether it succeeded.
#[inline(always)]
fn setsockopt_int(target: *mut c_void, level: i32, name: i32, value: u32) -> bool {
    let mut value = value as i32;
    // SAFETY: the helper reads 4 bytes from `value`, which lives on this stack frame.
    unsafe { bpf_setsockopt(target, level, name, (&raw mut value).cast(), 4) == 0 }
}

/// As [`setsockopt_int`], counting a failure under `fail`.
#[inline(always)]
fn set_int(target: *mut c_void, level: i32, name: i32, value: u32, fail: Counter) -> bool {
    let ok = setsockopt_int(target, level, name, value);
    if !ok {
        count(fail);
    }
    ok
}

#[inline(always)]
fn get_int(target: *mut c_void, level: i32, name: i32) -> Option<u32> {
    let mut value = 0i32;
    // SAFETY: the helper writes at most 4 bytes into `value`.
    let ret = unsafe { bpf_getsockopt(target, level, name, (&raw mut value).cast(), 4) };
    (ret == 0).then_some(value as u32)
}

/// Sets the policy's values and then SO_KEEPALIVE, on a socket that carried `previous` (the
/// policy whose user timeout the program set on it before, if any): a policy without one puts
/// TCP_USER_TIMEOUT back to 0 (the kernel's default) when `previous` had one and the socket
/// still has it (see [`resets_user_timeout`]). Learns HZ from the idle time set. Every failure
/// is counted; returns whether all calls succeeded.
#[inline(always)]
pub(crate) fn apply(
    target: *mut c_void,
    tp: *const u8,
    policy: &Policy,
    previous: Option<&Policy>,
) -> bool {
    let idle_set = set_int(
        target,
        IPPROTO_TCP,
        TCP_KEEPIDLE,
        policy.idle,
        Counter::FailIdle,
    );
    let mut ok = idle_set;
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
    // The policy's user timeout; without one, the kernel's default in place of the one the
    // program set before, and under `lock` at most the time keepalive takes to give up, in
    // place of a longer one the application set before connecting (or on its listener).
    let user_timeout = if policy.flags & policy_flags::USER_TIMEOUT != 0 {
        // Under `fill`, one the application set since the program last set its own is the
        // application's, as keepalive values it set would be.
        if policy.mode == mode::FILL
            && previous.is_some_and(|previous| user_timeout_set_by_app_since(tp, previous))
        {
            None
        } else {
            Some(policy.user_timeout_ms)
        }
    } else if previous.is_some_and(|previous| resets_user_timeout(tp, previous, policy)) {
        Some(0)
    } else if !policy.user_timeout_held(kernel::user_timeout_ms(tp)) {
        Some(policy.keepalive_span_ms())
    } else {
        None
    };
    if let Some(ms) = user_timeout {
        ok &= set_user_timeout(target, ms);
    }
    ok &= set_int(target, SOL_SOCKET, SO_KEEPALIVE, 1, Counter::FailKeepalive);
    // Only from an idle time that was set: otherwise the field holds another one.
    if idle_set {
        kernel::learn_hz(tp, policy.idle);
    }
    ok
}

/// Undoes what the program set with `previous`, where it is still as the program set it (the
/// application may have set its own values since, as Go does right after connect and
/// accept): SO_KEEPALIVE off unless it was the application's own before (`app_keepalive`), and
/// TCP_USER_TIMEOUT back to the kernel's default. The idle, interval and count values stay;
/// the kernel has no way back to "unset", and they only matter while keepalive is on.
#[inline(always)]
pub(crate) fn release(target: *mut c_void, tp: *const u8, previous: &Policy, app_keepalive: bool) {
    if !app_keepalive && kernel::keepalive_on(tp) && still_set(target, tp, previous) {
        set_int(target, SOL_SOCKET, SO_KEEPALIVE, 0, Counter::FailKeepalive);
    }
    if has_user_timeout_of(tp, previous) {
        set_user_timeout(target, 0);
    }
}

/// Sets TCP_USER_TIMEOUT to `ms` (0: the kernel's default), counting a failure.
#[inline(always)]
fn set_user_timeout(target: *mut c_void, ms: u32) -> bool {
    set_int(
        target,
        IPPROTO_TCP,
        TCP_USER_TIMEOUT,
        ms,
        Counter::FailUserTimeout,
    )
}

/// Whether the socket's idle, interval and count are `policy`'s. Read with getsockopt, which
/// converts from jiffies itself; before Linux 6.1 bpf_getsockopt cannot read these, and the
/// fields are compared once the program knows HZ (`None` until then: not known either way).
#[inline(always)]
fn has_values(target: *mut c_void, tp: *const u8, policy: &Policy) -> Option<bool> {
    match (
        get_int(target, IPPROTO_TCP, TCP_KEEPIDLE),
        get_int(target, IPPROTO_TCP, TCP_KEEPINTVL),
        get_int(target, IPPROTO_TCP, TCP_KEEPCNT),
    ) {
        (Some(idle), Some(interval), Some(count)) => {
            Some((idle, interval, count) == (policy.idle, policy.interval, policy.count))
        }
        _ => kernel::has_values(tp, policy),
    }
}

/// Whether the socket already carries exactly `policy` (see [`kernel::carries`]). The program
/// knows HZ only once it has set an idle time, which after each load it has not: until then it
/// learns HZ from the idle time getsockopt reads, if one was set. Otherwise a connection that
/// inherited the policy from a listener the previous program configured would look like one
/// the application configured.
#[inline(always)]
pub(crate) fn carries(target: *mut c_void, tp: *const u8, policy: &Policy) -> bool {
    if !kernel::hz_known()
        && let Some(idle) = get_int(target, IPPROTO_TCP, TCP_KEEPIDLE)
    {
        kernel::learn_hz(tp, idle);
    }
    kernel::carries(tp, policy)
}

/// Whether the socket's idle, interval and count are still `previous`'s, the values the program
/// set (not known to be: left on by a release).
#[inline(always)]
pub(crate) fn still_set(target: *mut c_void, tp: *const u8, previous: &Policy) -> bool {
    has_values(target, tp, previous) == Some(true)
}

/// Whether the application has set keepalive values of its own since the program set
/// `previous`: keepalive is on, and idle, interval or count are known to be others.
#[inline(always)]
pub(crate) fn set_by_app_since(target: *mut c_void, tp: *const u8, previous: &Policy) -> bool {
    kernel::keepalive_on(tp) && has_values(target, tp, previous) == Some(false)
}

/// Whether the socket has a user timeout that `previous` (what the program set on it) did
/// not make the program set: one the application set since.
#[inline(always)]
pub(crate) fn user_timeout_set_by_app_since(tp: *const u8, previous: &Policy) -> bool {
    kernel::user_timeout_ms(tp) != 0 && !has_user_timeout_of(tp, previous)
}

/// Under `fill`, on a socket whose keepalive values are the application's: moves the user
/// timeout the program set with `own` (if the socket still has it; the application may have
/// set its own since) to `policy`'s, or back to the kernel's default when `policy` has none.
/// Returns whether the socket still has a user timeout of the program's: also where the call
/// that would have put the kernel's default back failed, so that a later pass tries again
/// rather than taking it for the application's.
#[inline(always)]
pub(crate) fn follow_own_user_timeout(
    target: *mut c_void,
    tp: *const u8,
    own: Option<&Policy>,
    policy: &Policy,
) -> bool {
    if !own.is_some_and(|own| has_user_timeout_of(tp, own)) {
        return false;
    }
    if policy.flags & policy_flags::USER_TIMEOUT == 0 {
        return !set_user_timeout(target, 0);
    }
    if kernel::user_timeout_ms(tp) != policy.user_timeout_ms {
        set_user_timeout(target, policy.user_timeout_ms);
    }
    true
}

/// Whether the socket still has the user timeout `policy` made the program set (the
/// application may have set its own since, which is not the program's to undo): the policy's
/// own, or under a `lock` policy without one, keepalive's span, which the program sets in
/// place of a longer one (see [`Policy::keepalive_span_ms`]; one the application set to
/// exactly that counts as the program's).
#[inline(always)]
fn has_user_timeout_of(tp: *const u8, policy: &Policy) -> bool {
    let ms = kernel::user_timeout_ms(tp);
    if policy.flags & policy_flags::USER_TIMEOUT != 0 {
        ms == policy.user_timeout_ms
    } else {
        policy.mode == mode::LOCK && ms != 0 && ms == policy.keepalive_span_ms()
    }
}

/// Names in `policy` the user timeout its `lock` bound the socket to (keepalive's span, in
/// place of a longer one the application set), for a record that stops saying `lock`: the
/// program set it, and a later policy without one puts it back to the kernel's default.
#[inline(always)]
pub(crate) fn name_lock_bound(tp: *const u8, policy: &mut Policy) {
    if policy.flags & policy_flags::USER_TIMEOUT == 0 && has_user_timeout_of(tp, policy) {
        policy.user_timeout_ms = policy.keepalive_span_ms();
        policy.flags |= policy_flags::USER_TIMEOUT;
    }
}

/// Whether moving from `old` to `new` puts the socket's user timeout back to the kernel's
/// default: `new` has none, the socket still has the one `old` made the program set, and
/// `new` would not set the same.
#[inline(always)]
pub(crate) fn resets_user_timeout(tp: *const u8, old: &Policy, new: &Policy) -> bool {
    new.flags & policy_flags::USER_TIMEOUT == 0
        && has_user_timeout_of(tp, old)
        && !has_user_timeout_of(tp, new)
}

/// Sets, updates or withdraws the policy on a listener, so the connections it accepts inherit
/// it from the kernel's socket clone instead of needing setsockopt calls one by one. `sk` is
/// the listener as bpf_sk_storage_get takes it in this program type, `tp` its tcp_sock.
///
/// The program remembers what it set (`KA_LISTENERS`), and whether keepalive was already on
/// (the application's) when it first did, so it can tell its own keepalive from the
/// application's: `off` switches the program's keepalive off again and leaves the
/// application's on, `fill` keeps only the application's (switched on before the program
/// configured the listener, or with values set since).
#[inline(always)]
pub(crate) fn configure_listener(
    target: *mut c_void,
    sk: *mut c_void,
    tp: *const u8,
    cgroup_id: u64,
    policy: &Policy,
) {
    let ours = PolicyStore::Listeners.get(sk);
    // What the connections it accepts inherit from the program, where they can look it up.
    let key = track::listen_key(cgroup_id, tp);
    if policy.mode == mode::OFF {
        if let Some(previous) = ours {
            let app_keepalive = previous.flags & policy_flags::APP_KEEPALIVE != 0;
            release(target, tp, &previous, app_keepalive);
            PolicyStore::Listeners.set(sk, None);
        }
        // Also without storage: a note an earlier listener on the same port left (one closed
        // before the change to `off`, say) is not what the program set on this one.
        track::note_listener(key, None);
        return;
    }
    // A `fill` marker says the keepalive was the application's when `fill` looked, not that
    // it still is: the application may have switched it off since.
    let app_keepalive = match ours {
        Some(previous) if previous.flags & policy_flags::APP_OWNED == 0 => {
            previous.flags & policy_flags::APP_KEEPALIVE
        }
        _ if kernel::keepalive_on(tp) => policy_flags::APP_KEEPALIVE,
        _ => 0,
    };
    // Under `fill`, keepalive the application switched on before the program configured the
    // listener is its own, and so is what it does with it later (switch it off, say): the
    // program sets nothing there, and marks the listener so that later passes know.
    if policy.mode == mode::FILL
        && ((ours.is_none() && app_keepalive != 0)
            || ours.is_some_and(|ours| ours.flags & policy_flags::APP_OWNED != 0))
    {
        if ours.is_none() {
            // With no user timeout named, a release undoes nothing.
            PolicyStore::Listeners.mark(sk, policy_flags::APP_KEEPALIVE | policy_flags::APP_OWNED);
        }
        track::note_listener(key, None);
        return;
    }
    // Values the application has set on the listener since the program configured it (nginx
    // sets its own after listen()) are the application's too, which `fill` keeps, and so is
    // keepalive it switched off there since (the connections the listener accepts are then
    // filled in at establishment, as any without keepalive are); not where the program's own
    // calls failed. A user timeout the program set is still the program's, and follows the
    // policy; what the program set is remembered with it.
    if policy.mode == mode::FILL
        && let Some(previous) = ours
        && previous.flags & policy_flags::SET_FAILED == 0
        && (!kernel::keepalive_on(tp) || set_by_app_since(target, tp, &previous))
    {
        // What the listener holds: the policy's, or the one before where the call failed, which
        // the next pass then finds still the program's and moves again.
        let (user_timeout_ms, flags) =
            if follow_own_user_timeout(target, tp, Some(&previous), policy) {
                (
                    kernel::user_timeout_ms(tp),
                    previous.flags | policy_flags::USER_TIMEOUT,
                )
            } else {
                (0, previous.flags & !policy_flags::USER_TIMEOUT)
            };
        let stored = Policy {
            user_timeout_ms,
            flags,
            ..previous
        };
        if stored != previous {
            PolicyStore::Listeners.set(sk, Some(&stored));
        }
        // The connections it accepts carry this user timeout, and find it there as the
        // program's (their values are the application's, which no listened policy matches).
        track::note_listener(key, Some(&stored));
        return;
    }
    let mut stored = Policy {
        flags: policy.flags | app_keepalive,
        ..*policy
    };
    if ours == Some(stored) && carries(target, tp, policy) {
        // Also noted after a takeover from a program that did not note listeners.
        track::note_listener(key, Some(&stored));
        return;
    }
    // A failure is remembered, so that the next pass, finding another policy stored, tries
    // again.
    if !apply(target, tp, policy, ours.as_ref()) {
        stored.flags |= policy_flags::SET_FAILED;
    }
    PolicyStore::Listeners.set(sk, Some(&stored));
    track::note_listener(key, Some(&stored));
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

/// Stops the state-change callbacks of a socket the program no longer tracks, outside sock_ops
/// (kernel 6.12+; before, they stay and find no record), keeping other programs' flags. Not
/// where they were on before the program asked ([`sock_flags::STATE_CB_HELD`]): the kernel
/// keeps one switch for every program on the socket.
#[inline(always)]
pub(crate) fn drop_state_callbacks(target: *mut c_void) {
    if let Some(current) = get_int(target, IPPROTO_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS) {
        setsockopt_int(
            target,
            IPPROTO_TCP,
            TCP_BPF_SOCK_OPS_CB_FLAGS,
            current & !SOCK_OPS_STATE_CB_FLAG,
        );
    }
}

/// Asks for state-change callbacks on a socket outside sock_ops (kernel 6.12+), keeping the
/// callback flags other programs set on it; the record flags that say how it went.
#[inline(always)]
pub(crate) fn request_state_callbacks(target: *mut c_void) -> u32 {
    let Some(current) = get_int(target, IPPROTO_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS) else {
        return 0;
    };
    if current & SOCK_OPS_STATE_CB_FLAG != 0 {
        sock_flags::STATE_CB | sock_flags::STATE_CB_HELD
    } else if setsockopt_int(
        target,
        IPPROTO_TCP,
        TCP_BPF_SOCK_OPS_CB_FLAGS,
        current | SOCK_OPS_STATE_CB_FLAG,
    ) {
        sock_flags::STATE_CB
    } else {
        0
    }
}
