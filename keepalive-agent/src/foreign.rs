//! keepalive enforcement that belongs to another state directory: a second agent, or the pins
//! an agent with another `state_dir` left behind. Two keepalive programs on one cgroup would
//! both set keepalive on every socket there, each from its own policy table, and the one the
//! kernel runs last would win; `run` refuses that, and warns when one sits on an ancestor.
//!
//! The kernel says which programs are attached. keepalive's are those that a keepalive link
//! pin under the bpffs mounts runs, which also names their state directory, or, where this
//! process may look programs up by id, those with keepalive's program name.

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
};

use keepalive_common::{PIN_LINK_SOCKOPS, PROG_SOCKOPS};

use crate::{
    cgroup::{Cgroup2, CgroupPath},
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
    /// Why `run` refuses to attach to `attach` beside this program, and what to do instead.
    /// `searched` is where its state directory was looked for.
    pub fn refusal(&self, attach: &CgroupPath, searched: &[PathBuf]) -> String {
        let dir = self
            .state_dir
            .as_ref()
            .map_or_else(|| "DIR".to_owned(), |dir| dir.display().to_string());
        format!(
            "keepalive enforcement from {} (program id {}) is already attached to {attach}; two \
             would both set keepalive on every socket there. Stop the agent that uses it and run \
             `keepalive-agent --state-dir {dir} detach`, or start this one with --state-dir {dir}",
            self.describe_state_dir(searched),
            self.prog_id
        )
    }

    /// The warning about this program on an ancestor of `attach`.
    pub fn overlap(&self, attach: &CgroupPath, cgroup2: &Cgroup2, searched: &[PathBuf]) -> String {
        let cgroup = self
            .cgroup_id
            .and_then(|id| cgroup2.name_of(id))
            .map_or_else(|| "an ancestor cgroup".to_owned(), |path| path.to_string());
        format!(
            "keepalive enforcement from {} (program id {}) is attached to {cgroup}, above \
             {attach}: it also sets keepalive on sockets here, after this agent, so its policy \
             wins where both apply",
            self.describe_state_dir(searched),
            self.prog_id
        )
    }

    /// The state directory, or where it was looked for.
    fn describe_state_dir(&self, searched: &[PathBuf]) -> String {
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
    // keepalive's link pins name their state directory, and opening a pin takes no capability
    // beyond access to the file.
    let mut pins = Vec::new();
    for root in roots {
        find_link_pins(root, SEARCH_DEPTH, &mut pins);
    }
    // A program no pin holds (an agent running without pins, a bpffs mounted elsewhere) is
    // known by its name, where the kernel lets this process look programs up by id (that
    // takes CAP_SYS_ADMIN).
    let unpinned: Vec<u32> = candidates
        .iter()
        .copied()
        .filter(|id| !pins.iter().any(|(_, info)| info.prog_id == *id))
        .collect();
    let name = &PROG_SOCKOPS.as_bytes()[..PROG_SOCKOPS.len().min(KERNEL_NAME_LEN)];
    let named: HashSet<u32> = if unpinned.is_empty() {
        HashSet::new()
    } else {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|info| unpinned.contains(&info.id()) && info.name() == name)
            .map(|info| info.id())
            .collect()
    };
    Ok(candidates
        .into_iter()
        .filter_map(|prog_id| {
            let pin = pins.iter().find(|(_, info)| info.prog_id == prog_id);
            (pin.is_some() || named.contains(&prog_id)).then(|| Foreign {
                prog_id,
                direct: direct.contains(&prog_id),
                state_dir: pin.map(|(dir, _)| dir.clone()),
                cgroup_id: pin.map(|(_, info)| info.cgroup_id),
            })
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
