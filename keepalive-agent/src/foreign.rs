//! keepalive enforcement that belongs to another state directory: a second agent, or the pins
//! an agent with another `state_dir` left behind. Two keepalive programs on one cgroup would
//! both set keepalive on every socket there, each from its own policy table, and the one the
//! kernel runs last would win; `run` refuses that, and warns when one sits on an ancestor.
//!
//! The kernel says which programs are attached and their names; the state directory that pins
//! one is found by looking for keepalive's link pin under the bpffs mounts, best effort.

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
};

use keepalive_common::{PIN_LINK_SOCKOPS, PROG_SOCKOPS};

use crate::{
    pin::{BPFFS_MOUNT, StateDir},
    sys,
};

/// How many bytes of a program's name the kernel keeps (`BPF_OBJ_NAME_LEN` less the NUL).
const KERNEL_NAME_LEN: usize = 15;

/// How deep below a bpffs mount to look for a state directory's link pin.
const SEARCH_DEPTH: usize = 4;

/// Another state directory's keepalive sock_ops program that runs for sockets in a cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    /// The program's id.
    pub prog_id: u32,
    /// Attached to the cgroup itself, rather than to an ancestor.
    pub direct: bool,
    /// The state directory whose link pin runs it, when found.
    pub state_dir: Option<PathBuf>,
    /// The cgroup its link is attached to, when the pin was found.
    pub cgroup_id: Option<u64>,
}

impl Foreign {
    /// The state directory, or where it was looked for.
    pub fn describe_state_dir(&self, searched: &[PathBuf]) -> String {
        self.state_dir.as_ref().map_or_else(
            || {
                let searched: Vec<String> =
                    searched.iter().map(|p| p.display().to_string()).collect();
                format!("a state directory outside {}", searched.join(" and "))
            },
            |dir| dir.display().to_string(),
        )
    }
}

/// Where to look for other state directories: the conventional bpffs mount, and the directory
/// that holds `own` when it is elsewhere.
pub fn search_roots(own: &StateDir) -> Vec<PathBuf> {
    let mut roots = vec![PathBuf::from(BPFFS_MOUNT)];
    if let Some(parent) = own.root().parent()
        && !parent.starts_with(BPFFS_MOUNT)
    {
        roots.push(parent.to_owned());
    }
    roots
}

/// keepalive sock_ops programs other than `ours` (the program of this state directory's own
/// link) that run for sockets in `cgroup`: attached to it or to one of its ancestors.
pub fn enforcement(
    cgroup: &fs::File,
    ours: Option<u32>,
    roots: &[PathBuf],
) -> io::Result<Vec<Foreign>> {
    let direct: HashSet<u32> = sys::cgroup_query(cgroup, sys::ATTACH_CGROUP_SOCK_OPS, false)?
        .into_iter()
        .collect();
    let candidates: Vec<u32> = sys::cgroup_query(cgroup, sys::ATTACH_CGROUP_SOCK_OPS, true)?
        .into_iter()
        .filter(|id| Some(*id) != ours)
        .collect();
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let name = &PROG_SOCKOPS.as_bytes()[..PROG_SOCKOPS.len().min(KERNEL_NAME_LEN)];
    let keepalive: HashSet<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| candidates.contains(&info.id()) && info.name() == name)
        .map(|info| info.id())
        .collect();
    if keepalive.is_empty() {
        return Ok(Vec::new());
    }
    let mut pins = Vec::new();
    for root in roots {
        find_link_pins(root, SEARCH_DEPTH, &mut pins);
    }
    Ok(candidates
        .into_iter()
        .filter(|id| keepalive.contains(id))
        .map(|prog_id| {
            let pin = pins.iter().find(|(_, info)| info.prog_id == prog_id);
            Foreign {
                prog_id,
                direct: direct.contains(&prog_id),
                state_dir: pin.map(|(dir, _)| dir.clone()),
                cgroup_id: pin.map(|(_, info)| info.cgroup_id),
            }
        })
        .collect())
}

/// Collects the sock_ops link pins under `dir`, down to `depth` levels, with their directory.
fn find_link_pins(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, sys::LinkInfo)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() {
            if depth > 1 {
                find_link_pins(&path, depth - 1, out);
            }
        } else if entry.file_name() == PIN_LINK_SOCKOPS
            && let Ok(fd) = sys::obj_get(&path)
            && let Ok(info) = sys::link_info(std::os::fd::AsFd::as_fd(&fd))
        {
            out.push((dir.to_owned(), info));
        }
    }
}
