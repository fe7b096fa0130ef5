//! The per-socket decision shared by the sock_ops program (new connections) and the apply
//! iterator (connections that already existed): apply, keep what the socket has, or skip, and
//! record what was done.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::helpers::generated::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use keepalive_common::{Counter, Policy, SockRecord, apply_result, mode, policy_flags, sock_flags};

use crate::{
    enforce,
    kernel::{self, SockCgroup},
    policy::Resolved,
    track::{self, PolicyStore, count},
};

/// Where the socket came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A new connection; `direction` is [`sock_flags::OUTBOUND`] or [`sock_flags::INBOUND`].
    Established { direction: u32 },
    /// A connection that existed before the policy (apply iterator).
    Existing,
}

impl Origin {
    /// Now on CLOCK_MONOTONIC, to stamp a record with. New connections take the coarse clock,
    /// which reads no clock source: in a profile of the storm benchmark the precise read took
    /// about 5 % of the program's time, and a timer tick is resolution enough here. Tracing
    /// programs, such as the apply iterator, may not read the coarse clock.
    #[inline(always)]
    fn now(self) -> u64 {
        // SAFETY: the helpers have no preconditions.
        unsafe {
            match self {
                Self::Established { .. } => bpf_ktime_get_coarse_ns(),
                Self::Existing => bpf_ktime_get_ns(),
            }
        }
    }
}

/// The socket being enforced.
pub(crate) struct Socket {
    /// First argument for bpf_setsockopt/bpf_getsockopt in this program type.
    pub(crate) target: *mut c_void,
    /// The `struct tcp_sock *`, for cheap reads of its current values.
    pub(crate) tp: *const u8,
    /// The socket as bpf_sk_storage_get takes it in this program type.
    pub(crate) sk: *mut c_void,
    /// Its cookie, the tracking key.
    pub(crate) cookie: u64,
    /// Its own cgroup.
    pub(crate) cgroup: SockCgroup,
}

/// The policy the program last set on the listener `sock` was accepted from, if it noted one.
#[inline(always)]
fn listened_on(sock: &Socket) -> Option<Policy> {
    track::listened_policy(track::listen_key(sock.cgroup.id, sock.tp))
}

/// Whether `sock` still carries the keepalive values the program set on its listener with
/// `listened`, rather than ones the application set there since.
#[inline(always)]
fn carries_listened_values(sock: &Socket, listened: &Policy) -> bool {
    match kernel::has_values(sock.tp, listened) {
        Some(same) => same,
        None => enforce::still_set(sock.target, sock.tp, listened),
    }
}

/// Applies `resolved` to one socket and records it. `describe` fills in the record's
/// addresses and state; `enable_state_cb` asks the kernel for the socket's state-change
/// callbacks, which dead-peer detection and record removal rely on, and returns the record
/// flags that say how it went ([`sock_flags::STATE_CB`], [`sock_flags::STATE_CB_HELD`]).
#[inline(always)]
pub(crate) fn enforce_socket(
    sock: &Socket,
    resolved: &Resolved,
    origin: Origin,
    describe: impl FnOnce(&mut SockRecord),
    enable_state_cb: impl FnOnce() -> u32,
) -> u8 {
    let policy = resolved.policy;
    // A just-established socket cannot have a record yet; skip the lookups. One the tracking
    // maps had no room for keeps its record in its own storage (`stored`). Without either, it
    // may still be one the program enforced and locked while the maps were full, before such
    // records were stored: its lock storage says so, and holds what it set.
    let (existing, stored, untracked_lock) = match origin {
        Origin::Existing => match track::record(sock.cookie) {
            Some(rec) => (Some(rec), false, None),
            None => match track::stored_record(sock.sk) {
                Some(rec) => (Some(rec), true, None),
                None => (None, false, PolicyStore::Locks.get(sock.sk)),
            },
        },
        Origin::Established { .. } => (None, false, None),
    };
    let before = match existing.as_deref() {
        Some(rec) => rec.flags,
        None if untracked_lock.is_some() => sock_flags::ENFORCED | sock_flags::LOCKED,
        None => 0,
    };
    if policy.mode == mode::OFF {
        count(Counter::SkippedOff);
        // Left alone from now on: values stay, but a lock the program held is released.
        if before & sock_flags::LOCKED != 0 {
            PolicyStore::Locks.set(sock.sk, None);
        }
        // A connection just accepted from a listener the change to `off` has not reached (or
        // cannot) carries what the program set there: as under every other mode, that goes
        // with the policy that set it. A user timeout the application set on the listener
        // since is its own, and keeps none of the program's keepalive on; `release` leaves it.
        // Keepalive values the application set there since are its own too, and keep
        // keepalive on; the user timeout the program set there still goes, also where the
        // application switched keepalive off there since (`release` then only looks at the
        // user timeout).
        if origin
            == (Origin::Established {
                direction: sock_flags::INBOUND,
            })
            && (kernel::keepalive_on(sock.tp) || kernel::user_timeout_ms(sock.tp) != 0)
            && let Some(listened) = listened_on(sock)
        {
            let app_keepalive = listened.flags & policy_flags::APP_KEEPALIVE != 0
                || !carries_listened_values(sock, &listened);
            enforce::release(sock.target, sock.tp, &listened, app_keepalive);
        }
        let Some(rec) = existing else {
            return apply_result::SKIPPED_OFF;
        };
        rec.flags &= !sock_flags::LOCKED;
        // Except in a cgroup the agent had not seen yet when the program covered the socket
        // under an ancestor's policy: as if the cgroup had been `off` from the start, the
        // program takes back what it set and stops tracking the socket. Where `fill` left
        // keepalive to the application, that is at most a user timeout (the record says so).
        if policy.flags & policy_flags::NEW_CGROUP != 0
            && rec.flags & (sock_flags::ENFORCED | sock_flags::APP_OWNED) != 0
            && rec.policy_cgroup_id != resolved.policy_cgroup
        {
            if rec.flags & sock_flags::ENFORCED != 0 {
                let app_keepalive = rec.flags & sock_flags::APP_KEEPALIVE != 0;
                enforce::release(sock.target, sock.tp, &rec.policy, app_keepalive);
            } else if rec.flags & sock_flags::OWN_USER_TIMEOUT != 0 {
                enforce::release(sock.target, sock.tp, &rec.policy, true);
            }
            track::cgroup_uncount(rec.cgroup_id);
            if stored {
                track::drop_stored_record(sock.sk);
            } else {
                let _ = track::remove_record(sock.cookie);
            }
            // Only what the program switched on itself: not where its request failed, nor
            // where they were on before it asked.
            if rec.flags & (sock_flags::STATE_CB | sock_flags::STATE_CB_HELD)
                == sock_flags::STATE_CB
            {
                enforce::drop_state_callbacks(sock.target);
            }
            return apply_result::RELEASED;
        }
        // The record says so from now on (`status` shows `off`), and no longer matches the
        // policy that held before: when that returns, it is applied again, to values the
        // application may have changed meanwhile, and a `lock` holds the socket again. A user
        // timeout a `lock` bound the socket to stays the program's for the policy after: the
        // record names it, as the mode no longer does.
        enforce::name_lock_bound(sock.tp, &mut rec.policy);
        rec.policy.mode = mode::OFF;
        rec.policy_cgroup_id = resolved.policy_cgroup;
        return apply_result::SKIPPED_OFF;
    }
    if let Some(rec) = existing.as_deref()
        && rec.policy == policy
        && rec.policy_cgroup_id == resolved.policy_cgroup
    {
        if stored {
            list_if_room(sock, rec);
        }
        // Shown again by the iterator after its first output did not fit: report what this
        // pass did to it, not "unchanged". A connection established since the pass began was
        // stamped by the program at establishment, with the new table: this pass did nothing.
        let pass_start = track::apply_pass_start();
        return if pass_start != 0
            && rec.applied_ns >= pass_start
            && rec.applied_ns != rec.established_ns
        {
            if before & sock_flags::APP_OWNED != 0 {
                apply_result::KEPT_APP
            } else {
                apply_result::APPLIED
            }
        } else {
            apply_result::UNCHANGED
        };
    }
    let enforced_before = before & sock_flags::ENFORCED != 0;
    // Keepalive that was on before the program set anything is taken as the application's, so
    // a release never switches it off. On an accepted socket it may be the program's,
    // inherited from the listener, whose storage is not reachable from here.
    let mut app_keepalive = !enforced_before && kernel::keepalive_on(sock.tp);
    // Read once: the socket's fields are loaded anew at each look.
    let carried = enforce::carries(sock.target, sock.tp, &policy);
    // A connection just accepted with other values than the policy's, or with a user timeout
    // the policy does not have, got them from its listener. They are the program's when they
    // are the ones it last set on that listener: a policy change had not reached the listener
    // yet (or cannot: in a network namespace the agent may not enter). Then the policy
    // replaces them, also under `fill`, which otherwise keeps them as the application's, and
    // the user timeout goes with the policy that set it. Values the application set on the
    // listener since are its own, but the user timeout the program set there is still the
    // program's (see `own_user_timeout` below), also on a connection accepted without
    // keepalive because the application switched it off on the listener since: as any socket
    // without keepalive, that one gets the policy, and one without a user timeout takes the
    // program's away. (On a just established socket, `app_keepalive` is whether keepalive is
    // on.)
    let unasked_user_timeout =
        policy.flags & policy_flags::USER_TIMEOUT == 0 && kernel::user_timeout_ms(sock.tp) != 0;
    let listened = if origin
        == (Origin::Established {
            direction: sock_flags::INBOUND,
        })
        && ((app_keepalive && !carried) || unasked_user_timeout)
    {
        listened_on(sock)
    } else {
        None
    };
    // Its keepalive values are the program's when they are those. A user timeout the
    // application set on the listener since is still its own: `apply`, told that the program
    // set `listened`, leaves it.
    let from_listener = listened.filter(|listened| carries_listened_values(sock, listened));
    // Whether the keepalive switch itself is the application's: it may have switched it on
    // on the listener before the program configured it (which the listener's policy says).
    let mut flags = if app_keepalive
        && from_listener.is_none_or(|listened| listened.flags & policy_flags::APP_KEEPALIVE != 0)
    {
        sock_flags::APP_KEEPALIVE
    } else {
        0
    };
    if from_listener.is_some() {
        app_keepalive = false;
    }
    let mut values = policy;
    // What the program itself set on the socket before (a `fill` record holds the
    // application's values, which are not the program's to undo).
    let previous = existing
        .as_deref()
        .filter(|rec| rec.flags & sock_flags::ENFORCED != 0)
        .map(|rec| rec.policy)
        .or(untracked_lock)
        .or(from_listener);
    // Where the program's user timeout came from: `previous`, or, on a socket whose keepalive
    // `fill` left to the application, the record's user timeout if the program set it. A
    // connection just accepted with the application's values (set on its listener after the
    // program configured it, as nginx does) carries the user timeout the program last set on
    // that listener, if any, which is the program's too: it follows the policy.
    let own_user_timeout = previous
        .or_else(|| {
            existing
                .as_deref()
                .filter(|rec| rec.flags & sock_flags::OWN_USER_TIMEOUT != 0)
                .map(|rec| rec.policy)
        })
        .or(listened);
    // Under `fill`, keepalive off on a socket the program covered with it on: the application
    // switched it off since (keepalive the program set, or its own that `fill` kept). That is
    // its choice too, which `fill` keeps, as it keeps values the application sets. Not after
    // `off`, from which a socket gets its policy anew as a new one would, nor where the
    // program's own calls failed.
    let switched_off = policy.mode == mode::FILL
        && existing.as_deref().is_some_and(|rec| {
            rec.flags & (sock_flags::ENFORCED | sock_flags::APP_OWNED) != 0
                && rec.flags & sock_flags::SETSOCKOPT_FAILED == 0
                && rec.policy.mode != mode::OFF
        })
        && !kernel::keepalive_on(sock.tp);
    // A socket that carries the policy's values can still hold the user timeout of the policy
    // the program set before, which this one drops.
    let resets_user_timeout =
        own_user_timeout.is_some_and(|own| enforce::resets_user_timeout(sock.tp, &own, &policy));
    // Under `fill`, keepalive on before the program set anything is the application's even
    // with the policy's values, so that later policies leave it too. Except on a connection
    // just accepted: a listener the program configured passes the same values on, and that
    // listener's storage is not reachable from here.
    let app_owns = policy.mode == mode::FILL
        && app_keepalive
        && !matches!(origin, Origin::Established { direction } if direction == sock_flags::INBOUND);
    // Nothing happened to the socket: no event to count, no new time to stamp.
    let mut untouched = false;
    let result = if !resets_user_timeout && !app_owns && carried {
        // Usually an accepted socket that inherited the options the program set on its
        // listener: nothing to do. Inherited only if so when the program first saw it: on
        // a socket it covered before, they can be the ones it set itself.
        if before == 0 {
            count(Counter::Inherited);
            flags |= sock_flags::INHERITED;
        } else {
            flags |= before & sock_flags::INHERITED;
        }
        flags |= sock_flags::ENFORCED;
        // A pass that finds the values in place (a cgroup moved to a policy of its own
        // with the same values, say) reports the socket current, unless it locks or
        // unlocks it.
        let lock_changes = (policy.mode == mode::LOCK) != (before & sock_flags::LOCKED != 0);
        if origin == Origin::Existing && !lock_changes {
            untouched = existing.is_some();
            apply_result::UNCHANGED
        } else {
            apply_result::APPLIED
        }
    } else if policy.mode == mode::FILL
        && (app_keepalive
            || switched_off
            || previous
                .is_some_and(|previous| enforce::set_by_app_since(sock.target, sock.tp, &previous)))
    {
        // The application's own keepalive, from before the program set anything or since (Go,
        // for one, sets its own right after connect and accept, after the ESTABLISHED callback).
        // A user timeout the program set is still the program's: it follows the policy, before
        // the application's values are read, and the record says whose it is.
        if enforce::follow_own_user_timeout(
            sock.target,
            sock.tp,
            own_user_timeout.as_ref(),
            &policy,
        ) {
            flags |= sock_flags::OWN_USER_TIMEOUT;
        }
        values = enforce::read_values(sock.target, mode::FILL);
        flags |= sock_flags::APP_OWNED;
        // Kept before with the same values (under this policy or another).
        untouched = existing.as_deref().is_some_and(|rec| {
            rec.flags & (sock_flags::APP_OWNED | sock_flags::OWN_USER_TIMEOUT)
                == flags & (sock_flags::APP_OWNED | sock_flags::OWN_USER_TIMEOUT)
                && rec.policy == values
        });
        if !untouched {
            count(Counter::KeptApp);
        }
        apply_result::KEPT_APP
    } else {
        // Under `fill`, a user timeout the application set since the program filled the
        // socket in is its own, as keepalive values it set would be: the policy's keepalive
        // values go in, its user timeout does not, and the record names none as the program's.
        let ok = enforce::apply(sock.target, sock.tp, &values, own_user_timeout.as_ref());
        count(Counter::Enforced);
        flags |= sock_flags::ENFORCED;
        if ok {
            apply_result::APPLIED
        } else {
            flags |= sock_flags::SETSOCKOPT_FAILED;
            apply_result::FAILED
        }
    };
    if policy.mode == mode::LOCK && flags & sock_flags::ENFORCED != 0 {
        flags |= sock_flags::LOCKED;
        PolicyStore::Locks.set(sock.sk, Some(&values));
    } else if before & sock_flags::LOCKED != 0 {
        PolicyStore::Locks.set(sock.sk, None);
    }
    let own = sock.cgroup.id;
    // Every record carries ENFORCED or APP_OWNED (`off` sockets get none), so a socket
    // without one is covered for the first time.
    let first = existing.is_none();
    flags |= before
        & (sock_flags::HAS_TASK
            | sock_flags::OUTBOUND
            | sock_flags::INBOUND
            | sock_flags::STATE_CB
            | sock_flags::STATE_CB_HELD
            | sock_flags::RETROACTIVE
            | sock_flags::APP_KEEPALIVE);
    match origin {
        Origin::Established { direction } => flags |= direction,
        Origin::Existing if first => flags |= sock_flags::RETROACTIVE,
        Origin::Existing => {}
    }
    if first {
        flags |= enable_state_cb();
        track::cgroup_add(own, 1, 0, true);
    } else if stored && flags & sock_flags::STATE_CB == 0 {
        flags |= enable_state_cb();
    }
    let now = origin.now();
    match existing {
        Some(rec) => {
            rec.cgroup_id = own;
            rec.policy_cgroup_id = resolved.policy_cgroup;
            rec.policy = values;
            if !untouched {
                rec.applied_ns = now;
            }
            rec.flags = flags;
            describe(rec);
            if stored {
                list_if_room(sock, rec);
            }
        }
        None => {
            let mut uninit = MaybeUninit::<SockRecord>::uninit();
            // SAFETY: all zeroes is a valid record, and its size is a multiple of 8.
            let rec = unsafe { kernel::zero(&mut uninit) };
            rec.cgroup_id = own;
            rec.policy_cgroup_id = resolved.policy_cgroup;
            rec.applied_ns = now;
            rec.established_ns = if origin == Origin::Existing { 0 } else { now };
            rec.policy = values;
            rec.flags = flags;
            describe(rec);
            // Without state callbacks a record in the maps would outlive its socket.
            if flags & sock_flags::STATE_CB == 0 || !track::insert_record(sock.cookie, rec) {
                count(Counter::TrackingFull);
                track::store_record(sock.sk, rec);
            }
        }
    }
    result
}

/// Moves the record of a socket the tracking maps left out into them, if they have room
/// again, so `status` lists it from now on. Only with state callbacks, without which a record
/// in the maps would outlive its socket.
#[inline(always)]
fn list_if_room(sock: &Socket, rec: &SockRecord) {
    if rec.flags & sock_flags::STATE_CB != 0 && track::insert_record(sock.cookie, rec) {
        track::drop_stored_record(sock.sk);
    }
}
