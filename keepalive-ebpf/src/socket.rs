//! The per-socket decision shared by the sock_ops program (new connections) and the apply
//! iterator (connections that already existed): apply, keep the application's values, or skip,
//! and record what was done.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns;
use keepalive_common::{Counter, apply_result, mode, sock_flags};

use crate::{
    enforce,
    kernel::SockCgroup,
    policy::Resolved,
    track::{self, count},
};

/// Where the socket came from.
pub(crate) enum Origin {
    /// A new connection; `direction` is [`sock_flags::OUTBOUND`] or [`sock_flags::INBOUND`].
    Established { direction: u32 },
    /// A connection that existed before the policy (apply iterator).
    Existing,
}

/// Applies `resolved` to one socket. `target` is the setsockopt target for this program type,
/// `sk` the socket for bpf_sk_storage_get. `enable_state_cb` asks the kernel for the socket's
/// state-change callbacks, which close accounting and dead-peer detection rely on.
#[inline(always)]
pub(crate) fn enforce_socket(
    target: *mut c_void,
    sk: *mut c_void,
    cgroup: Option<SockCgroup>,
    resolved: &Resolved,
    origin: Origin,
    enable_state_cb: impl FnOnce() -> bool,
) -> u8 {
    let policy = resolved.policy;
    if policy.mode == mode::OFF {
        count(Counter::SkippedOff);
        return apply_result::SKIPPED_OFF;
    }
    let existing = matches!(origin, Origin::Existing);
    let mut rec = track::record(sk, true);
    let covered = sock_flags::ENFORCED | sock_flags::APP_OWNED;
    if existing
        && let Some(rec) = rec.as_deref()
        && rec.flags & covered != 0
        && rec.policy == policy
        && rec.policy_cgroup_id == resolved.policy_cgroup
    {
        return apply_result::UNCHANGED;
    }
    let enforced_before = rec
        .as_deref()
        .is_some_and(|rec| rec.flags & sock_flags::ENFORCED != 0);

    let (values, mut flags, result) = if policy.mode == mode::FILL
        && !enforced_before
        && enforce::app_enabled_keepalive(target)
    {
        count(Counter::KeptApp);
        (
            enforce::read_values(target, mode::FILL),
            sock_flags::APP_OWNED,
            apply_result::KEPT_APP,
        )
    } else {
        let ok = enforce::apply(target, &policy);
        count(Counter::Enforced);
        let mut flags = sock_flags::ENFORCED;
        if !ok {
            flags |= sock_flags::SETSOCKOPT_FAILED;
        }
        if policy.mode == mode::LOCK {
            flags |= sock_flags::LOCKED;
        }
        let result = if ok {
            apply_result::APPLIED
        } else {
            apply_result::FAILED
        };
        (policy, flags, result)
    };

    let Some(rec) = rec.as_deref_mut() else {
        count(Counter::StorageFull);
        return result;
    };
    let first = rec.flags & covered == 0;
    let own = cgroup.map_or(0, |cgroup| cgroup.id);
    let kept = sock_flags::HAS_TASK
        | sock_flags::OUTBOUND
        | sock_flags::INBOUND
        | sock_flags::COUNTED_OPEN
        | sock_flags::RETROACTIVE;
    flags |= rec.flags & kept;
    match origin {
        Origin::Established { direction } => flags |= direction,
        Origin::Existing if first => flags |= sock_flags::RETROACTIVE,
        Origin::Existing => {}
    }
    rec.cgroup_id = own;
    rec.policy_cgroup_id = resolved.policy_cgroup;
    rec.policy = values;
    // SAFETY: the helper has no preconditions.
    rec.applied_ns = unsafe { bpf_ktime_get_boot_ns() };
    if first {
        if enable_state_cb() && track::cgroup_add(own, 1, 1, 0) {
            flags |= sock_flags::COUNTED_OPEN;
        } else {
            track::cgroup_add(own, 0, 1, 0);
        }
    }
    rec.flags = flags;
    result
}
