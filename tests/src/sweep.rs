//! What a killed test run left behind, removed by the next one.
//!
//! The guards in this crate undo everything a test made when they drop, also when the test
//! panics. A test binary killed outright (by a CI timeout, a Ctrl-C on `cargo`, the OOM killer)
//! runs no drops: its agents' pinned programs stay attached to its cgroups, and its cgroups,
//! network namespaces and temporary files stay too. Every name this crate makes carries the pid
//! namespace and pid of the process that made it ([`crate::unique`]), so the next run as root
//! removes the names made in its own pid namespace by a process that is gone. A name whose pid
//! is alive (this run's, or another run's still going) is left alone, and so is every name made
//! in another pid namespace (a run in a container that shares the host's bpffs or cgroups): its
//! pids mean nothing here. A dead pid that has been reused is left until the next sweep.

use std::{
    collections::HashSet,
    fs,
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::remove_cgroup_tree;

/// The inode number of this process's pid namespace.
pub fn pid_namespace() -> u64 {
    fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino())
}

/// The pid namespace and pid in a name made by [`crate::unique`]:
/// `ka-<label>-<pid namespace>-<pid>-<n>`, with any extension.
pub fn maker(name: &str) -> Option<(u64, u32)> {
    let stem = name.strip_prefix("ka-")?.split('.').next()?;
    let mut parts = stem.rsplitn(4, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let namespace = parts.next()?;
    let label = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if label.is_empty() || !digits(n) {
        return None;
    }
    Some((namespace.parse().ok()?, pid.parse().ok()?))
}

/// Whether `name` was made in this pid namespace by a process that is gone.
fn stale(name: &str, namespace: u64) -> bool {
    maker(name).is_some_and(|(ns, pid)| {
        ns == namespace && !Path::new("/proc").join(pid.to_string()).exists()
    })
}

/// The stale entries of `dir`, one level deep.
fn stale_in(dir: &Path, namespace: u64) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| stale(n, namespace)))
        .map(|e| e.path())
        .collect()
}

/// The mount points of every cgroup hierarchy, cgroup2 first: its `cgroup.kill` empties a
/// tree in every hierarchy at once, which v1 hierarchies cannot.
fn cgroup_mounts() -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<(bool, PathBuf)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split(' ').nth(4)?;
            match fs.split(' ').next()? {
                "cgroup2" => Some((false, PathBuf::from(point))),
                "cgroup" => Some((true, PathBuf::from(point))),
                _ => None,
            }
        })
        .collect();
    mounts.sort_by_key(|(v1, _)| *v1);
    mounts.into_iter().map(|(_, point)| point).collect()
}

/// Kills the processes still using what a dead run left: its agents (whose command line names
/// one of `paths`) and whatever runs in one of the network namespaces `netns`. Reads the
/// command line only of processes named `keepalive-agent`: reading it takes the process's
/// memory lock, which a process stuck in a page fault holds forever. Waits for them to go.
fn kill_users(paths: &[PathBuf], netns: &[PathBuf]) {
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    let needles: Vec<&[u8]> = paths
        .iter()
        .map(|p| p.as_os_str().as_encoded_bytes())
        .collect();
    let namespaces: HashSet<u64> = netns
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.ino())
        .collect();
    let mut killed = Vec::new();
    for entry in procs.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let proc = entry.path();
        let in_netns =
            fs::metadata(proc.join("ns/net")).is_ok_and(|m| namespaces.contains(&m.ino()));
        let agent = !in_netns
            && fs::read_to_string(proc.join("comm")).is_ok_and(|c| c.trim() == "keepalive-agent")
            && fs::read(proc.join("cmdline")).is_ok_and(|cmdline| {
                needles
                    .iter()
                    .any(|n| cmdline.windows(n.len()).any(|w| w == *n))
            });
        if in_netns || agent {
            // SAFETY: kill with plain integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(proc);
        }
    }
    // Gone once it is a zombie: its parent, if still there, reaps it.
    let running = |proc: &PathBuf| {
        fs::read_to_string(proc.join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while killed.iter().any(running) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes what test processes of this pid namespace that no longer exist left: their agents
/// and the processes in their network namespaces (killed), pinned state in /sys/fs/bpf (which
/// detaches its programs), cgroups in every hierarchy (killing what still runs in them),
/// network namespaces and files in the temporary directory. Returns what it removed; what it
/// could not remove stays, for the next sweep.
pub fn sweep_stale() -> Vec<PathBuf> {
    let namespace = pid_namespace();
    let pins = stale_in(Path::new("/sys/fs/bpf"), namespace);
    let temp = stale_in(&std::env::temp_dir(), namespace);
    let cgroups: Vec<PathBuf> = cgroup_mounts()
        .iter()
        .flat_map(|m| stale_in(m, namespace))
        .collect();
    let netns = stale_in(Path::new("/run/netns"), namespace);
    kill_users(&[&pins[..], &temp[..]].concat(), &netns);
    let mut removed = Vec::new();
    for path in pins.into_iter().chain(temp) {
        let gone = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    for path in cgroups {
        remove_cgroup_tree(&path);
        if !path.exists() {
            removed.push(path);
        }
    }
    for path in netns {
        let name = path.file_name().unwrap_or_default();
        let _ = Command::new("ip")
            .arg("netns")
            .arg("del")
            .arg(name)
            .output();
        if !path.exists() {
            removed.push(path);
        }
    }
    removed
}

/// [`sweep_stale`], once per process and only as root, saying on stderr what it removed.
pub(crate) fn sweep_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let removed = sweep_stale();
        if removed.is_empty() {
            return;
        }
        // Straight to stderr, past the test harness's capture: this belongs to no one test.
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "keepalive-tests: removed what killed test runs left:");
        for path in removed {
            let _ = writeln!(err, "  {}", path.display());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::maker;

    #[test]
    fn names_made_by_unique_give_their_maker() {
        assert_eq!(
            maker("ka-agent-4026531836-20656-59"),
            Some((4026531836, 20656))
        );
        assert_eq!(
            maker("ka-agent-log-4026531836-20656-61.log"),
            Some((4026531836, 20656))
        );
        assert_eq!(maker("ka-n-9-7-0.notify"), Some((9, 7)));
        assert_eq!(
            maker(&crate::unique("x")),
            Some((super::pid_namespace(), std::process::id()))
        );
        for other in [
            "ka-test.target",
            "ka-20656-59",
            "ka-agent-20656-59",
            "ka--4026531836-20656-59",
            "keepalive-agent",
            "ka-agent-4026531836-x-59",
            "ka-agent-4026531836-20656-",
            "maps.debug",
        ] {
            assert_eq!(maker(other), None, "{other}");
        }
    }
}
