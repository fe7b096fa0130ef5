//! Iterator programs. aya-ebpf has no `#[iter]` macro, so these are declared by hand with the
//! context layouts from `include/linux/bpf.h` (`struct bpf_iter__tcp`,
//! `struct bpf_iter__bpf_map_elem`).

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xchg},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    btf_maps::{Array, PerCpuArray},
    helpers::generated::{bpf_get_socket_cookie, bpf_seq_write, bpf_skc_to_tcp_sock},
    macros::btf_map,
};
use keepalive_common::{
    MAX_SOCK_SLOTS, SLOT_BUSY, SLOT_FREE, STATUS_CHUNK, SockRecord, SockSlot, StatusRecord, uapi,
};

use crate::{
    enforce,
    kernel::{self, copy_words, off, read},
    policy,
    socket::{self, Origin, Socket},
    track,
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
pub struct IterMapElem {
    meta: *mut IterMeta,
    map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
}

/// Writes `value` to the iterator's output; whether it fit. When one does not, the kernel
/// drops all this element's output and shows the element again at the next read.
#[inline(always)]
fn seq_write<T>(meta: *mut IterMeta, value: &T) -> bool {
    // SAFETY: `meta` comes from the iterator context; the callers only write while they have
    // an object, when the kernel guarantees a live seq_file.
    let seq = unsafe { (*meta).seq };
    // SAFETY: the helper copies `size_of::<T>()` bytes from `value` into the seq buffer.
    unsafe {
        bpf_seq_write(
            seq.cast(),
            core::ptr::from_ref(value).cast(),
            size_of::<T>() as u32,
        ) == 0
    }
}

/// Applies policy to one existing TCP socket of the iterating network namespace: listeners
/// (so the connections they accept inherit it) and connections, for which it writes one
/// [`keepalive_common::apply_result`] byte: established ones, and those whose peer closed its
/// side (CLOSE_WAIT), which the application still holds and keepalive still serves. A socket
/// the application closed or shut down itself is left alone: once orphaned, the kernel times
/// its FIN_WAIT2 with the keepalive timer, which a keepalive setting would restart.
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
    let state: u8 = kernel::load(sk.cast(), off!(skc_state));
    if state != uapi::TCP_ESTABLISHED && state != uapi::TCP_CLOSE_WAIT && state != uapi::TCP_LISTEN
    {
        return 0;
    }
    let cgroup = kernel::sock_cgroup(tp.cast());
    if !cgroup.is_known() {
        return 0;
    }
    let Some(resolved) = policy::resolve(cgroup, true) else {
        return 0;
    };
    if !resolved.in_scope {
        return 0;
    }
    if state == uapi::TCP_LISTEN {
        enforce::configure_listener(tp, tp, tp.cast(), cgroup.id, &resolved.policy);
        return 0;
    }
    let sock = Socket {
        target: tp,
        tp: tp.cast(),
        sk: tp,
        // SAFETY: `tp` is a socket pointer this program type may pass.
        cookie: unsafe { bpf_get_socket_cookie(tp) },
        cgroup,
    };
    let result = socket::enforce_socket(
        &sock,
        &resolved,
        Origin::Existing,
        |rec| describe(rec, sk.cast()),
        || enforce::request_state_callbacks(tp),
    );
    seq_write(ctx.meta, &result);
    0
}

/// Fills a record's addresses from the socket itself (a connection: listeners are configured,
/// not recorded).
#[inline(always)]
fn describe(rec: &mut SockRecord, sk: *const u8) {
    let family: u16 = kernel::load(sk, off!(skc_family));
    rec.sk = sk as u64;
    rec.state = uapi::TCP_ESTABLISHED;
    rec.family = family;
    rec.local_port = kernel::load(sk, off!(skc_num));
    rec.remote_port = u16::from_be(kernel::load(sk, off!(skc_dport)));
    if family == uapi::AF_INET6 {
        rec.local_addr = read::<[u8; 16]>(sk, off!(skc_v6_rcv_saddr)).unwrap_or([0; 16]);
        rec.remote_addr = read::<[u8; 16]>(sk, off!(skc_v6_daddr)).unwrap_or([0; 16]);
    } else {
        let local = read::<[u8; 4]>(sk, off!(skc_rcv_saddr)).unwrap_or([0; 4]);
        let remote = read::<[u8; 4]>(sk, off!(skc_daddr)).unwrap_or([0; 4]);
        rec.local_addr[..4].copy_from_slice(&local);
        rec.remote_addr[..4].copy_from_slice(&remote);
    }
}

/// Writes one [`StatusRecord`] per `KA_SOCKS` entry, with live state read from the socket
/// (see [`write_status`]).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_map_elem")]
pub fn keepalive_status(ctx: *mut IterMapElem) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let ctx = unsafe { &*ctx };
    let key = ctx.key.cast::<u64>().cast_const();
    let value = ctx.value.cast::<SockRecord>().cast_const();
    if key.is_null() || value.is_null() {
        return 0;
    }
    // SAFETY: key and value point at this map's key and value.
    let mut out = unsafe { status_record(*key, value) };
    add_live(&mut out);
    // A socket that closed while it was read is no stale entry: its close callback deleted
    // the entry before the kernel stored TCP_CLOSE, which this read found.
    if out.live_state == 0 && track::listed_sk(out.cookie).is_none() {
        return 0;
    }
    // Deleting the element the walk stands on: the kernel's walk goes on from its link, and
    // resumes a read by position in the bucket, so if an insert reuses it before the next
    // step, or a deletion shifts the bucket between two reads, this one walk may list some
    // entries twice or miss some (not delete them: a later walk finds them). Only entries of
    // sockets that closed unseen are deleted, and only while the slot table is full do
    // records land here.
    if emit(ctx.meta, &out) == Shown::Gone
        && let Some(sk) = track::listed_sk(out.cookie)
        && open_state(sk as *const u8, out.cookie) == 0
    {
        track::drop_listed(out.cookie);
    }
    0
}

// [`keepalive_status_slots`] marks a chunk's slots in one word.
const _: () = assert!(STATUS_CHUNK <= u64::BITS);

/// See [`keepalive_common::MAP_SLOT_CHUNKS`]; sized by the loader.
#[btf_map]
static KA_SLOT_CHUNKS: Array<u32, { (MAX_SOCK_SLOTS / STATUS_CHUNK) as usize }> = Array::new();

/// [`keepalive_status`] for the occupied slots of `KA_SOCK_SLOTS`, [`STATUS_CHUNK`] of them
/// per element of `KA_SLOT_CHUNKS`. A slot can be claimed or freed while it is read, so the
/// record counts only if the cookie is the same before and after the copy (see
/// `track::claim_slot`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_map_elem")]
pub fn keepalive_status_slots(ctx: *mut IterMapElem) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let ctx = unsafe { &*ctx };
    let key = ctx.key.cast::<u32>().cast_const();
    if key.is_null() {
        return 0;
    }
    let Some(sweep) = KA_SWEEP.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the key of an array map element is its u32 index.
    let first = unsafe { *key }.wrapping_mul(STATUS_CHUNK);
    // The chunk's slots whose socket has closed, and whether any output did not fit: only if
    // all did is the chunk reported, and only what was reported is freed (the kernel shows a
    // chunk whose output did not fit again at the next read, which reports and frees it then).
    // Kept in map memory, whose contents the verifier does not follow: in registers, every
    // combination of the 64 slots' outcomes would be a state of its own to verify. Iterator
    // programs run with migration disabled but, on a preemptible kernel, can be preempted, so
    // another reader's run on this CPU may come between: the run that claims the scratch
    // (with its session, never 0) frees; one that finds it taken only reports, and the next
    // `status` reports (and frees) what it left, rather than anything being freed unreported.
    // SAFETY: `meta` comes from the iterator context; `sweep` points at this CPU's value.
    let owned = unsafe {
        let session = (*ctx.meta).session_id;
        session != 0
            && atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                &raw mut (*sweep).owner,
                0,
                session,
            )
            .1
    };
    if owned {
        // SAFETY: as above; this run holds the scratch.
        unsafe {
            write_volatile(&raw mut (*sweep).gone, 0);
            write_volatile(&raw mut (*sweep).lost, 0);
        }
    }
    for i in 0..STATUS_CHUNK {
        let Some(slot) = track::slot_at(first.wrapping_add(i)) else {
            break;
        };
        let shown = status_slot(ctx.meta, slot);
        if owned {
            // SAFETY: as above.
            unsafe {
                match shown {
                    Some(Shown::Gone) => (*sweep).gone |= 1 << i,
                    Some(Shown::DidNotFit) => (*sweep).lost = 1,
                    Some(Shown::Open) | None => {}
                }
            }
        }
    }
    if !owned {
        return 0;
    }
    // SAFETY: as above.
    if unsafe { read_volatile(&raw const (*sweep).lost) } == 0 {
        for i in 0..STATUS_CHUNK {
            // SAFETY: as above.
            let gone = unsafe { read_volatile(&raw const (*sweep).gone) };
            if gone & (1 << i) != 0
                && let Some(slot) = track::slot_at(first.wrapping_add(i))
            {
                free_if_gone(slot);
            }
        }
    }
    // SAFETY: as above.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&raw mut (*sweep).owner, 0) };
    0
}

/// What [`keepalive_status_slots`] notes of one chunk.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Sweep {
    /// The session of the run that holds it; 0 when none does.
    owner: u64,
    /// Bit `i`: slot `i` of the chunk was reported as holding the record of a closed socket.
    gone: u64,
    /// Not 0: some of the chunk's output did not fit.
    lost: u64,
}

/// Per-CPU scratch of [`keepalive_status_slots`]; not pinned, as it holds nothing past a run.
#[btf_map]
static KA_SWEEP: PerCpuArray<Sweep, 1> = PerCpuArray::new();

/// Writes the record of one slot, if it holds one that stayed put while it was copied and
/// its socket's state was read; what writing it showed (see [`emit`]), `None` for an empty or
/// changing slot.
///
/// The second read of the slot's cookie comes after the socket's state (a helper call, which
/// nothing is moved across): a record found next to TCP_CLOSE and still in its slot then is one
/// no close callback freed, since the callback frees it before the kernel stores TCP_CLOSE,
/// and not one whose socket closed while it was read, which is no stale entry.
#[inline(always)]
fn status_slot(meta: *mut IterMeta, slot: *mut SockSlot) -> Option<Shown> {
    // SAFETY: `slot` points at a slot of the table. Every read is volatile, so the copy stays
    // between the two cookie reads (BPF has no fence instruction).
    let mut out = unsafe {
        let cookie = read_volatile(&raw const (*slot).cookie);
        if cookie == SLOT_FREE || cookie == SLOT_BUSY {
            return None;
        }
        let mut out = status_record(cookie, &SockRecord::default());
        copy_words(&raw const (*slot).sock, &raw mut out.sock);
        out
    };
    add_live(&mut out);
    // SAFETY: as above.
    let again = unsafe { read_volatile(&raw const (*slot).cookie) };
    (out.cookie == again).then(|| emit(meta, &out))
}

/// Frees a slot reported as holding the record of a socket that closed unseen, if it still
/// holds such a record. Read again as [`status_slot`] reads it: only a concurrent `status`
/// frees such a slot, and another socket may have claimed it since.
#[inline(always)]
fn free_if_gone(slot: *mut SockSlot) {
    // SAFETY: as in `status_slot`.
    let (cookie, sk, again) = unsafe {
        (
            read_volatile(&raw const (*slot).cookie),
            read_volatile(&raw const (*slot).sock.sk),
            read_volatile(&raw const (*slot).cookie),
        )
    };
    if cookie == again
        && cookie != SLOT_FREE
        && cookie != SLOT_BUSY
        && open_state(sk as *const u8, cookie) == 0
    {
        track::free_slot_of(slot, cookie);
    }
}

/// # Safety
/// `sock` points at a readable record.
#[inline(always)]
unsafe fn status_record(cookie: u64, sock: *const SockRecord) -> StatusRecord {
    StatusRecord {
        cookie,
        // SAFETY: see above.
        sock: unsafe { *sock },
        live_state: 0,
        probes_out: 0,
        _pad: [0; 6],
    }
}

/// What writing one record out showed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shown {
    /// Its socket is open.
    Open,
    /// Its socket has closed (see [`open_state`]).
    Gone,
    /// The output was full; the kernel shows the element again at the next read.
    DidNotFit,
}

/// Adds live state read from the socket while it is open (`live_state` stays 0 otherwise, see
/// [`open_state`]).
#[inline(always)]
fn add_live(out: &mut StatusRecord) {
    let sk = out.sock.sk as *const u8;
    out.live_state = open_state(sk, out.cookie);
    if out.live_state != 0 {
        out.probes_out = read::<u8>(sk, off!(icsk_probes_out)).unwrap_or(0);
    }
}

/// Writes the record out, with its live state (see [`add_live`]).
///
/// A record whose socket has closed is one whose close callback never ran: another program
/// replaced the socket's callback flags after keepalive's asked for it (see the README), or a
/// build that looks elsewhere for records ran meanwhile. The callers leave out one whose
/// socket closed while it was read, and free the others once they are reported (as stale), so
/// their slots are free for the next sockets.
#[inline(always)]
fn emit(meta: *mut IterMeta, out: &StatusRecord) -> Shown {
    if !seq_write(meta, out) {
        Shown::DidNotFit
    } else if out.live_state != 0 {
        Shown::Open
    } else {
        Shown::Gone
    }
}

/// The state of the socket at `sk` if it is `cookie`'s and not closed; 0 if it has closed.
///
/// A socket's memory is reused only for other sockets, whose cookie starts at 0 and is new
/// when made, so another cookie there means this socket was freed. One freed and not yet
/// reused reads as closed: every close passes through TCP_CLOSE, which the kernel stores
/// after the close callback has run (and freed the record), so a record found next to a
/// closed state is one no callback will free. A socket that closed and connected again, with
/// a new record under the same cookie, between this read and the caller's free would lose
/// that record (not its enforcement); the window is a few instructions of this run.
#[inline(always)]
fn open_state(sk: *const u8, cookie: u64) -> u8 {
    if read::<u64>(sk, off!(skc_cookie)) != Some(cookie) {
        return 0;
    }
    match read::<u8>(sk, off!(skc_state)) {
        Some(state) if state != uapi::TCP_CLOSE => state,
        _ => 0,
    }
}
