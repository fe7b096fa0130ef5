//! Reading the agent's unpinned maps from a test, with the bpf(2) syscall: the only way to see
//! state the program keeps for itself, such as its resolution cache.

use std::{fs, io, os::fd::AsRawFd as _, os::fd::FromRawFd as _, os::fd::OwnedFd};

use keepalive_common::{RESOLVED_SLOTS, ResolvedSlot};

const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_GET_FD_BY_ID: i64 = 14;
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
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = bpf(BPF_MAP_GET_FD_BY_ID, &mut attr).expect("BPF_MAP_GET_FD_BY_ID");
    // SAFETY: the kernel just returned this descriptor to us.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let cpus = possible_cpus();
    let mut slots = Vec::new();
    for key in 0..RESOLVED_SLOTS {
        let mut values = vec![ResolvedSlot::default(); cpus];
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = (&raw const key) as u64;
        attr[2] = values.as_mut_ptr() as u64;
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).expect("BPF_MAP_LOOKUP_ELEM");
        slots.extend(values);
    }
    slots
}
