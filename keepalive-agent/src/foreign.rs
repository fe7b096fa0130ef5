//! keepalive enforcement that belongs to another state directory: a second agent, or the pins
//! an agent with another `state_dir` left behind. Two keepalive programs on one cgroup would
//! both set keepalive on every socket there, each from its own policy table, and the one the
//! kernel runs last would win; `run` refuses that, and warns when one sits on an ancestor or
//! on a cgroup below.
//!
//! The kernel says which programs run for a cgroup's sockets. keepalive's are those that a
//! keepalive link pin under the bpffs mounts runs, which also names their state directory and
//! cgroup, or, where this process may look programs up by id, those with keepalive's program
//! name. Those below the cgroup are known by their pins only: the kernel would have to be asked
//! about every cgroup below.

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

/// Where another state directory's program is attached, relative to a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// On the cgroup itself.
    Here,
    /// On an ancestor: it runs after the cgroup's own programs, so its policy wins.
    Above,
    /// On a cgroup below: it runs before the cgroup's own programs there, which win.
    Below,
}

/// Another state directory's keepalive sock_ops program on, above or below a cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    /// The program's id.
    pub prog_id: u32,
    /// Where it is attached, relative to the cgroup asked about.
    pub place: Place,
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

    /// The warning about this program on an ancestor of `attach`, or below it.
    pub fn overlap(&self, attach: &CgroupPath, cgroup2: &Cgroup2, searched: &[PathBuf]) -> String {
        let cgroup = self
            .cgroup_id
            .and_then(|id| cgroup2.name_of(id))
            .map_or_else(|| "an ancestor cgroup".to_owned(), |path| path.to_string());
        let (relation, order, winner) = match self.place {
            Place::Below => ("below", "before", "this agent's"),
            Place::Here | Place::Above => ("above", "after", "its"),
        };
        format!(
            "keepalive enforcement from {} (program id {}) is attached to {cgroup}, {relation} \
             {attach}: both set keepalive on sockets there and it runs {order} this agent, so \
             {winner} policy wins where both apply",
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
/// link) attached to `attach` (opened as `cgroup`), to one of its ancestors, or (where a pin
/// shows them) to a cgroup below it.
pub fn enforcement(
    cgroup2: &Cgroup2,
    attach: &CgroupPath,
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
    // keepalive's link pins name their state directory, and opening a pin takes no capability
    // beyond access to the file.
    let mut pins = Vec::new();
    for root in roots {
        find_link_pins(root, SEARCH_DEPTH, &mut pins);
    }
    pins.retain(|(_, info)| Some(info.prog_id) != ours);
    let mut found = on_or_above(&candidates, &direct, &pins);
    // Pins of links that do not run here: those on a cgroup below are found in one walk of the
    // subtree, and only when there are such pins at all.
    let elsewhere: Vec<&(PathBuf, sys::LinkInfo)> = pins
        .iter()
        .filter(|(_, info)| info.cgroup_id != 0 && !candidates.contains(&info.prog_id))
        .collect();
    if !elsewhere.is_empty() {
        let own = cgroup2.id(attach).ok();
        let below = cgroup2.readable_ids(attach)?;
        found.extend(
            elsewhere
                .into_iter()
                .filter(|(_, info)| below.contains(&info.cgroup_id) && Some(info.cgroup_id) != own)
                .map(|(dir, info)| Foreign {
                    prog_id: info.prog_id,
                    place: Place::Below,
                    state_dir: Some(dir.clone()),
                    cgroup_id: Some(info.cgroup_id),
                }),
        );
    }
    Ok(found)
}

/// Which of `candidates` (the programs that run for the cgroup's sockets, `direct` those on
/// the cgroup itself) are keepalive's: run by one of `pins`, or named as keepalive's program.
fn on_or_above(
    candidates: &[u32],
    direct: &HashSet<u32>,
    pins: &[(PathBuf, sys::LinkInfo)],
) -> Vec<Foreign> {
    if candidates.is_empty() {
        return Vec::new();
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
    candidates
        .iter()
        .filter_map(|&prog_id| {
            let pin = pins.iter().find(|(_, info)| info.prog_id == prog_id);
            (pin.is_some() || named.contains(&prog_id)).then(|| Foreign {
                prog_id,
                place: if direct.contains(&prog_id) {
                    Place::Here
                } else {
                    Place::Above
                },
                state_dir: pin.map(|(dir, _)| dir.clone()),
                cgroup_id: pin.map(|(_, info)| info.cgroup_id),
            })
        })
        .collect()
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
