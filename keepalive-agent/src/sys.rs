//! The few bpf(2) commands aya 0.14 does not expose: opening pins as raw fds, replacing a
//! link's program (`BPF_LINK_UPDATE`), creating map-element iterator links, instantiating
//! iterators from a pinned link, link info and attachment queries; flock(2) for the agent's
//! lock files; and what the control socket learns of its peer.
//!
//! Each command has a small `#[repr(C)]` attribute struct mirroring `union bpf_attr` in
//! `include/uapi/linux/bpf.h`, zero-padded to the size the kernel reads. The structs spell out
//! their padding: implicit padding bytes are uninitialized, and the kernel reads them (a stray
//! `expected_revision` makes cgroup attachment fail with ESTALE).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_PIN: i64 = 6;
const BPF_OBJ_GET: i64 = 7;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_PROG_QUERY: i64 = 16;
const BPF_LINK_CREATE: i64 = 28;
const BPF_LINK_UPDATE: i64 = 29;
const BPF_ITER_CREATE: i64 = 33;

/// `BPF_CGROUP_SOCK_OPS`.
pub const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
/// `BPF_CGROUP_SETSOCKOPT`.
pub const ATTACH_CGROUP_SETSOCKOPT: u32 = 22;
/// `BPF_TRACE_ITER`.
const ATTACH_TRACE_ITER: u32 = 28;

/// Size of the zero-padded attribute buffer; larger than any command used here.
const ATTR_SIZE: usize = 128;

/// Copies an attribute struct into a zero-padded buffer.
fn attr_buf<T>(attr: &T) -> [u8; ATTR_SIZE] {
    assert!(size_of::<T>() <= ATTR_SIZE);
    let mut buf = [0u8; ATTR_SIZE];
    // SAFETY: `attr` is a plain #[repr(C)] struct of at most ATTR_SIZE bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            std::ptr::from_ref(attr).cast::<u8>(),
            buf.as_mut_ptr(),
            size_of::<T>(),
        );
    }
    buf
}

/// Runs one bpf(2) command on an attribute buffer the kernel may write back into.
fn bpf_raw(cmd: i64, buf: &mut [u8; ATTR_SIZE], size: usize) -> io::Result<i64> {
    // SAFETY: bpf(2) reads and writes at most `size` bytes of `buf`, which outlives the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, buf.as_mut_ptr(), size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn bpf<T>(cmd: i64, attr: &T) -> io::Result<i64> {
    bpf_raw(cmd, &mut attr_buf(attr), size_of::<T>())
}

fn fd_result(ret: i64) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens a pinned BPF object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    bpf(BPF_OBJ_GET, &attr).map(fd_result)
}

/// Pins a BPF object at `path` (the file is created 0600).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &attr).map(drop)
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    /// Explicit: padding bytes would be copied to the kernel uninitialized.
    _pad: u32,
}

/// Creates an iterator link. With `map`, the iterator walks that map's elements
/// (`bpf_iter_link_info.map.map_fd`).
pub fn iter_link_create(prog: BorrowedFd<'_>, map: Option<BorrowedFd<'_>>) -> io::Result<OwnedFd> {
    let map_fd: u32 = map.map_or(0, |fd| fd.as_raw_fd() as u32);
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: 0,
        attach_type: ATTACH_TRACE_ITER,
        flags: 0,
        iter_info: if map.is_some() {
            std::ptr::from_ref(&map_fd) as u64
        } else {
            0
        },
        iter_info_len: if map.is_some() { 4 } else { 0 },
        _pad: 0,
    };
    bpf(BPF_LINK_CREATE, &attr).map(fd_result)
}

/// Creates a cgroup link (the kernel treats every cgroup link as multi-attach).
pub fn cgroup_link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
        iter_info: 0,
        iter_info_len: 0,
        _pad: 0,
    };
    bpf(BPF_LINK_CREATE, &attr).map(fd_result)
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Atomically replaces the program behind a link: there is no moment without one.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}

#[repr(C)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

/// Instantiates an iterator; reading the returned file runs the program once per object.
/// TCP iterators see the network namespace of the calling thread.
pub fn iter_create(link: BorrowedFd<'_>) -> io::Result<std::fs::File> {
    let attr = IterCreateAttr {
        link_fd: link.as_raw_fd() as u32,
        flags: 0,
    };
    bpf(BPF_ITER_CREATE, &attr).map(|ret| std::fs::File::from(fd_result(ret)))
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says about a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    /// Id of the program it runs.
    pub prog_id: u32,
    /// For cgroup links: the cgroup id. 0 for others.
    pub cgroup_id: u64,
}

/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;

/// Reads a link's info.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then a union at offset 16 whose cgroup member
    // is { u64 cgroup_id; u32 attach_type; }.
    let mut raw = [0u8; 64];
    let attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: raw.len() as u32,
        info: raw.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    let u32_at = |off: usize| u32::from_ne_bytes(raw[off..off + 4].try_into().expect("4 bytes"));
    Ok(LinkInfo {
        prog_id: u32_at(8),
        cgroup_id: if u32_at(0) == LINK_TYPE_CGROUP {
            u64::from_ne_bytes(raw[16..24].try_into().expect("8 bytes"))
        } else {
            0
        },
    })
}

#[repr(C)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// `BPF_F_QUERY_EFFECTIVE`.
const QUERY_EFFECTIVE: u32 = 1;

/// Ids of the programs attached to a cgroup for one attach type: directly, or with `effective`
/// every program that runs for its sockets, its own first and then its ancestors' (the order
/// the kernel runs them in).
pub fn cgroup_query(cgroup: &impl AsFd, attach_type: u32, effective: bool) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let attr = QueryAttr {
        target_fd: cgroup.as_fd().as_raw_fd() as u32,
        attach_type,
        query_flags: if effective { QUERY_EFFECTIVE } else { 0 },
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // The kernel writes the number of programs back into prog_cnt.
    let mut buf = attr_buf(&attr);
    bpf_raw(BPF_PROG_QUERY, &mut buf, size_of::<QueryAttr>())?;
    let count = u32::from_ne_bytes(buf[24..28].try_into().expect("4 bytes")) as usize;
    ids.truncate(count.min(ids.len()));
    Ok(ids)
}

/// Tries flock(2) with `how` (`LOCK_*`) on `file`; whether it succeeded.
pub fn flock(file: &std::fs::File, how: i32) -> bool {
    // SAFETY: flock on a descriptor the caller owns.
    unsafe { libc::flock(file.as_raw_fd(), how) == 0 }
}

/// The process holding an exclusive flock(2) on the file at `path`, as `/proc/locks` names it:
/// `Some(0)` where it runs in a pid namespace this process cannot see (a container's), `None`
/// where no such lock shows.
pub fn flock_holder(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    let file = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    locks_holder(&std::fs::read_to_string("/proc/locks").ok()?, &file)
}

/// The pid of `/proc/locks` text's exclusive flock on `file` (`MAJOR:MINOR:INODE`). Waiters'
/// lines (`-> FLOCK …`) do not count.
fn locks_holder(locks: &str, file: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let (kind, _, access, pid, at) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        (kind == "FLOCK" && access == "WRITE" && at == file)
            .then(|| pid.parse().ok())
            .flatten()
    })
}

/// The poll(2) events of `fd` now, without waiting: those of `events` that are pending, and
/// POLLHUP and POLLERR, which are always reported.
fn pending_events(fd: BorrowedFd<'_>, events: i16) -> i16 {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a timeout of 0 returns at once.
    let ready = unsafe { libc::poll(&raw mut poll, 1, 0) };
    if ready == 1 { poll.revents } else { 0 }
}

/// Whether the peer of a connected socket has closed it (POLLHUP or POLLERR). On a Unix
/// socket, a peer that only shut down its sending side has not.
pub fn hung_up(socket: BorrowedFd<'_>) -> bool {
    pending_events(socket, 0) & (libc::POLLHUP | libc::POLLERR) != 0
}

/// Sends one space on a connected socket, without waiting and without SIGPIPE: a sign of
/// progress to a control client waiting on its answer (JSON allows whitespace before a value).
/// Best effort: a client that reads nothing, or has gone, is left as it is.
pub fn nudge(socket: BorrowedFd<'_>) {
    // SAFETY: one byte from a live buffer on a descriptor the caller holds.
    let _ = unsafe {
        libc::send(
            socket.as_raw_fd(),
            b" ".as_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// A pidfd of the process at the other end of a connected Unix socket (SO_PEERPIDFD), which
/// stays that process's when its pid is reused; `None` on kernels before 6.5, which have no
/// such option. ESRCH or EINVAL: that process is gone.
pub fn peer_pidfd(socket: &impl AsFd) -> io::Result<Option<OwnedFd>> {
    match socket_option::<libc::c_int>(socket, libc::SO_PEERPIDFD, -1) {
        // SAFETY: the kernel handed over a new descriptor, which nothing else owns.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
        Err(err) if err.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// The `SOL_SOCKET` option `name` of `socket`, read into a `T` that starts as `init`.
fn socket_option<T>(socket: &impl AsFd, name: libc::c_int, init: T) -> io::Result<T> {
    let mut value = init;
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a valid buffer of `len` bytes, the size the caller's option has.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Whether the process of `pidfd` has exited (a pidfd turns readable then): from that
/// moment its pid may be given to another process.
pub fn exited(pidfd: BorrowedFd<'_>) -> bool {
    pending_events(pidfd, libc::POLLIN) & libc::POLLIN != 0
}

/// The pid and uid of the process at the other end of a connected Unix socket (SO_PEERCRED).
pub fn peer_cred(socket: &impl AsFd) -> io::Result<(libc::pid_t, libc::uid_t)> {
    let cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let cred = socket_option(socket, libc::SO_PEERCRED, cred)?;
    Ok((cred.pid, cred.uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exclusive_flock_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:2d:99 0 EOF\n\
                     2: FLOCK  ADVISORY  READ 88 00:2d:99 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 66 00:2d:99 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 12 00:2d:990 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 4242 00:2d:99 0 EOF\n";
        assert_eq!(locks_holder(locks, "00:2d:99"), Some(4242));
        assert_eq!(locks_holder(locks, "00:2e:99"), None);
        assert_eq!(
            locks_holder("1: FLOCK  ADVISORY  WRITE 0 fe:00:5 0 EOF\n", "fe:00:5"),
            Some(0)
        );
    }

    #[test]
    fn a_lock_this_process_holds_names_its_pid() {
        let dir = std::env::temp_dir().join(format!("ka-flock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = std::fs::File::open(&dir).unwrap();
        assert_eq!(flock_holder(&dir), None);
        assert!(flock(&file, libc::LOCK_EX | libc::LOCK_NB));
        assert_eq!(flock_holder(&dir), Some(std::process::id()));
        drop(file);
        std::fs::remove_dir(&dir).unwrap();
    }
}
