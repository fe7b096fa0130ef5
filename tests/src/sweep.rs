//! What a killed test run left behind, removed by the next one.
//!
//! The guards in this crate undo everything a test made when they drop, also when the test
//! panics. A test binary killed outright (by a CI timeout, a Ctrl-C on `cargo`, the OOM killer)
//! runs no drops: its agents' pinned programs stay attached to its cgroups, and its cgroups,
//! network namespaces and temporary files stay too. Every name this crate makes carries the pid
//! of the process that made it ([`crate::unique`]), so the next run as root removes the names
//! whose process is gone. A name whose pid is alive (this run's, or another run's still going)
//! is left alone; so is a dead pid that has been reused, until the next sweep.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::remove_cgroup_tree;

/// The pid in a name made by [`crate::unique`]: `ka-<label>-<pid>-<n>`, with any extension.
pub fn maker_pid(name: &str) -> Option<u32> {
    let stem = name.strip_prefix("ka-")?.split('.').next()?;
    let mut parts = stem.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let label = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (!label.is_empty() && digits(n) && digits(pid))
        .then(|| pid.parse().ok())
        .flatten()
}

fn stale(name: &str) -> bool {
    maker_pid(name).is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

/// The stale entries of `dir`, one level deep.
fn stale_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(stale))
        .map(|e| e.path())
        .collect()
}

/// The mount points of every cgroup hierarchy, v1 and v2.
fn cgroup_mounts() -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split(' ').nth(4)?;
            matches!(fs.split(' ').next()?, "cgroup" | "cgroup2").then(|| PathBuf::from(point))
        })
        .collect()
}

/// Kills the processes whose command line names one of `paths` (an agent the killed run
/// started, still running on its state) and waits for them to go.
fn kill_users(paths: &[PathBuf]) {
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    let needles: Vec<&[u8]> = paths
        .iter()
        .map(|p| p.as_os_str().as_encoded_bytes())
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
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if needles
            .iter()
            .any(|n| cmdline.windows(n.len()).any(|w| w == *n))
        {
            // SAFETY: kill with plain integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(entry.path());
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

/// Removes what test processes that no longer exist left: their agents (killed), pinned
/// state in /sys/fs/bpf (which detaches its programs), cgroups in every hierarchy (killing
/// what still runs in them), network namespaces and files in the temporary directory.
/// Returns what it removed; what it could not remove stays, for the next sweep.
pub fn sweep_stale() -> Vec<PathBuf> {
    let pins = stale_in(Path::new("/sys/fs/bpf"));
    let temp = stale_in(&std::env::temp_dir());
    let cgroups: Vec<PathBuf> = cgroup_mounts().iter().flat_map(|m| stale_in(m)).collect();
    let netns = stale_in(Path::new("/run/netns"));
    kill_users(&[&pins[..], &temp[..]].concat());
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
    use super::maker_pid;

    #[test]
    fn names_made_by_unique_give_their_maker() {
        assert_eq!(maker_pid("ka-agent-20656-59"), Some(20656));
        assert_eq!(maker_pid("ka-agent-log-20656-61.log"), Some(20656));
        assert_eq!(maker_pid("ka-n-7-0.notify"), Some(7));
        for other in [
            "ka-test.target",
            "ka-20656-59",
            "ka--20656-59",
            "keepalive-agent",
            "ka-agent-x-59",
            "ka-agent-20656-",
            "maps.debug",
        ] {
            assert_eq!(maker_pid(other), None, "{other}");
        }
    }
}
