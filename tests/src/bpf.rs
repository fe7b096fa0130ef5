//! Reading the agent's unpinned maps from a test, with the bpf(2) syscall: the only way to see
//! state the program keeps for itself, such as its resolution cache. Also changing a pinned
//! policy table behind the agent's back, to give the program values the agent would refuse.

use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

use keepalive_common::{ABI_VERSION, MAP_APPLY, MAP_POLICY, Policy, RESOLVED_SLOTS, ResolvedSlot};

const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_OBJ_PIN: i64 = 6;
const BPF_OBJ_GET: i64 = 7;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_MAP_GET_FD_BY_ID: i64 = 14;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_MAP_TYPE_PERCPU_ARRAY: u64 = 6;

fn bpf(cmd: i64, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-padded union bpf_attr of 128 bytes; every pointer in it refers
    // to a buffer that outlives the call and is as large as the command expects.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The `/proc/PID/fdinfo` text of one open file.
pub struct Fdinfo(String);

impl Fdinfo {
    /// The numeric value of `name` (`name:\tvalue`), if the file has it.
    pub fn field(&self, name: &str) -> Option<u64> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(":\t"))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// The fdinfo of every file process `pid` holds open.
pub fn fdinfos(pid: u32) -> Vec<Fdinfo> {
    fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .map(|fd| Fdinfo(fs::read_to_string(fd.expect("entry").path()).unwrap_or_default()))
        .collect()
}

/// The ids of the BPF maps process `pid` holds whose fdinfo has every `field: value` given.
fn map_ids(pid: u32, fields: &[(&str, u64)]) -> Vec<u32> {
    let mut ids: Vec<u32> = fdinfos(pid)
        .iter()
        .filter(|info| {
            fields
                .iter()
                .all(|&(name, value)| info.field(name) == Some(value))
        })
        .filter_map(|info| info.field("map_id"))
        .map(|id| id as u32)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Possible CPUs, the number of values a per-CPU map returns per key.
fn possible_cpus() -> usize {
    let list = fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible cpus");
    list.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// Every CPU's copy of every slot of the sock_ops program's resolution cache
/// (`keepalive_common::MAP_RESOLVED`) in the agent `pid`.
pub fn resolution_cache(pid: u32) -> Vec<ResolvedSlot> {
    let ids = map_ids(
        pid,
        &[
            ("map_type", BPF_MAP_TYPE_PERCPU_ARRAY),
            ("value_size", size_of::<ResolvedSlot>() as u64),
            ("max_entries", u64::from(RESOLVED_SLOTS)),
        ],
    );
    let [id] = ids[..] else {
        panic!("agent {pid} should hold one resolution cache map, holds {ids:?}");
    };
    let map = map_by_id(id);
    let cpus = possible_cpus();
    let mut slots = Vec::new();
    for key in 0..RESOLVED_SLOTS {
        let mut values = vec![ResolvedSlot::default(); cpus];
        // SAFETY: a per-CPU map returns one value per possible CPU, as many as `values` holds.
        unsafe { lookup(&map, &key, values.as_mut_ptr()) };
        slots.extend(values);
    }
    slots
}

/// A descriptor of the map with id `id`, if it still exists.
fn try_map_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = bpf(BPF_MAP_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The name of the program with id `id` (the kernel keeps its first 15 bytes), or `None` when
/// it no longer exists.
pub fn prog_name(id: u32) -> Option<String> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = match bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) {
        Ok(fd) => fd,
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return None,
        Err(err) => panic!("BPF_PROG_GET_FD_BY_ID {id}: {err}"),
    };
    // SAFETY: the kernel just returned this descriptor to us.
    let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_prog_info up to its name: type, id, tag[8], jited_prog_len, xlated_prog_len,
    // jited_prog_insns, xlated_prog_insns, load_time, created_by_uid, nr_map_ids, map_ids,
    // name[16] at byte 64.
    let mut info = [0u8; 80];
    let mut attr = [0u64; 16];
    // info: bpf_fd (u32), info_len (u32), info (u64).
    attr[0] = prog.as_raw_fd() as u64 | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).expect("BPF_OBJ_GET_INFO_BY_FD");
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// A descriptor of the map with id `id`.
fn map_by_id(id: u32) -> OwnedFd {
    try_map_by_id(id).expect("BPF_MAP_GET_FD_BY_ID")
}

/// Whether a map with id `id` exists (the kernel frees a map some time after its last
/// reference goes).
pub fn map_exists(id: u32) -> bool {
    match try_map_by_id(id) {
        Ok(_) => true,
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => false,
        Err(err) => panic!("BPF_MAP_GET_FD_BY_ID {id}: {err}"),
    }
}

/// Whether process `pid` holds a descriptor of the map with id `id`.
pub fn holds_map(pid: u32, id: u32) -> bool {
    !map_ids(pid, &[("map_id", u64::from(id))]).is_empty()
}

/// The id of the policy table installed in the state directory `state_dir`.
pub fn policy_table_id(state_dir: &Path) -> u32 {
    let path = state_dir
        .join(format!("maps-v{ABI_VERSION}"))
        .join(MAP_POLICY);
    let name = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)
        .unwrap_or_else(|e| panic!("BPF_OBJ_GET {}: {e}", path.display()));
    // SAFETY: the kernel just returned this descriptor to us.
    let outer = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut table_id = 0u32;
    // SAFETY: the outer map's key is a u32 slot; a lookup returns the inner map's u32 id.
    unsafe { lookup(&outer, &0u32, &raw mut table_id) };
    table_id
}

/// The name of map `map` (the kernel keeps its first 15 bytes).
fn map_name(map: &OwnedFd) -> String {
    // struct bpf_map_info up to its name: type, id, key_size, value_size, max_entries,
    // map_flags, name[16] at byte 24.
    let mut info = [0u8; 40];
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64 | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).expect("BPF_OBJ_GET_INFO_BY_FD");
    let name = &info[24..40];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// When the agent `pid` started its last apply pass (its CLOCK_MONOTONIC nanoseconds,
/// `KA_APPLY`, which it writes as a pass starts).
pub fn apply_pass_started(pid: u32) -> u64 {
    let maps: Vec<OwnedFd> = map_ids(pid, &[])
        .into_iter()
        .filter_map(|id| try_map_by_id(id).ok())
        .filter(|map| map_name(map) == MAP_APPLY)
        .collect();
    let [map] = &maps[..] else {
        panic!(
            "agent {pid} should hold one {MAP_APPLY} map, holds {}",
            maps.len()
        );
    };
    let mut started = 0u64;
    // SAFETY: an array of one u64 under key 0.
    unsafe { lookup(map, &0u32, &raw mut started) };
    started
}

/// Pins what is pinned at `from` at `to` as well.
pub fn pin_again(from: &Path, to: &Path) {
    let path = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("no NUL");
    let (from_c, to_c) = (path(from), path(to));
    let mut attr = [0u64; 16];
    attr[0] = from_c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)
        .unwrap_or_else(|e| panic!("BPF_OBJ_GET {}: {e}", from.display()));
    // SAFETY: the kernel just returned this descriptor to us.
    let object = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = [0u64; 16];
    attr[0] = to_c.as_ptr() as u64;
    attr[1] = object.as_raw_fd() as u64;
    bpf(BPF_OBJ_PIN, &mut attr).unwrap_or_else(|e| panic!("BPF_OBJ_PIN {}: {e}", to.display()));
}

/// Looks `key` up in `map` into `value`.
///
/// # Safety
/// `K` is the map's key type and `value` has room for what a lookup in `map` writes.
unsafe fn lookup<K, V>(map: &OwnedFd, key: &K, value: *mut V) {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = std::ptr::from_ref(key) as u64;
    attr[2] = value as u64;
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).expect("BPF_MAP_LOOKUP_ELEM");
}

/// Changes the policy stored under `key` (a cgroup id) in the active policy table of the state
/// directory `state_dir`, bypassing the agent's checks, until the agent installs its next
/// table.
pub fn change_policy(state_dir: &Path, key: u64, change: impl FnOnce(&mut Policy)) {
    let table = map_by_id(policy_table_id(state_dir));
    let mut policy = Policy::default();
    // SAFETY: the table maps u64 cgroup ids to policies.
    unsafe { lookup(&table, &key, &raw mut policy) };
    change(&mut policy);
    let mut attr = [0u64; 16];
    attr[0] = table.as_raw_fd() as u64;
    attr[1] = (&raw const key) as u64;
    attr[2] = (&raw const policy) as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).expect("BPF_MAP_UPDATE_ELEM");
}
