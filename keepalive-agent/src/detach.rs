//! `detach`: the explicit end of enforcement. Removes keepalive's links (which detaches the
//! programs), its pinned maps and its state directory, and says what it removed.

use std::{fs, io, path::Path};

use crate::{
    cgroup::Cgroup2,
    error::Error,
    instance, loader,
    pin::{Lock, StateDir, unpin},
    privileges,
};

fn describe(state: &StateDir, pin: &Path, attach: Option<&str>) -> String {
    let on = attach.map(|a| format!(" on {a}")).unwrap_or_default();
    if pin == state.sockops_link() {
        format!("sock_ops program link{on} (new connections are no longer enforced)")
    } else if pin == state.lock_link() {
        format!("setsockopt program link{on} (lock mode)")
    } else if pin == state.status_link() || pin == state.status_slots_link() {
        "status iterator link".to_owned()
    } else if pin.parent() == Some(state.root()) {
        "link left at its temporary name by a start that did not finish".to_owned()
    } else {
        let name = pin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("map {name}")
    }
}

/// How to stop the agent whose `/proc/PID/cgroup` reads `cgroup`: the unit's, a pod's (which
/// its DaemonSet would start again, so killing it is no way), or one started by hand (or by
/// another service manager).
fn how_to_stop(cgroup: &str, pid: &str) -> String {
    let mut paths = cgroup.lines().filter_map(|line| line.splitn(3, ':').nth(2));
    if paths
        .clone()
        .any(|path| path.ends_with("/keepalive-agent.service"))
    {
        return "stop it first (`systemctl stop keepalive-agent`)".to_owned();
    }
    // kubelet's cgroups: kubepods/… (cgroupfs driver) or kubepods.slice/… (systemd driver).
    if paths.any(|path| path.split('/').any(|part| part.starts_with("kubepods"))) {
        return "it runs in a Kubernetes pod, which its DaemonSet would start again: delete \
                the DaemonSet first (`kubectl delete -n keepalive daemonset/keepalive-agent`)"
            .to_owned();
    }
    format!("stop it first (`kill {pid}`)")
}

/// `/proc/PID/cgroup` of process `pid`, empty if it cannot be read.
fn cgroup_of(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

/// Removes everything pinned in `state`. Refuses while an agent runs with it: one named by
/// `runtime_dir`'s lock file, or any other, which holds the state directory's own lock.
pub fn detach(
    state: &StateDir,
    runtime_dir: &Path,
    cgroup: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    privileges::require_for("detach")?;
    // The command line first: `--cgroup` names one cgroup, as `run`'s does (exit 2).
    let wanted = match cgroup {
        Some(spec) => Some(crate::config::parse_attach(&Cgroup2::find()?, spec)?),
        None => None,
    };
    state.check_own_to_detach()?;
    // Off bpffs nothing is pinned, and files named like pins are someone else's (exit 5, as
    // for `run`).
    crate::pin::bpffs_state(state.root())?;
    if let Some(agent) =
        instance::running_agent(runtime_dir).filter(|agent| agent.may_use(state.root()))
    {
        return Err(Error::Agent(format!(
            "the keepalive agent (pid {}) is running and would re-attach; {}, then detach",
            agent.pid,
            how_to_stop(&cgroup_of(&agent.pid), &agent.pid)
        ))
        .into());
    }
    // Held until the directory is gone, so an agent starting meanwhile waits for it and then
    // makes the directory anew, instead of pinning into one being emptied.
    let lock = match state.try_lock()? {
        Lock::Held(lock) => Some(lock),
        Lock::Busy => {
            // Its own runtime directory names it nowhere this command knows of.
            let root = state.root().display();
            return Err(Error::Agent(match crate::sys::flock_holder(state.root()) {
                Some(pid) if pid != 0 => {
                    let pid = pid.to_string();
                    format!(
                        "the keepalive agent (pid {pid}) is running with state directory \
                         {root} and would re-attach; {}, then detach",
                        how_to_stop(&cgroup_of(&pid), &pid)
                    )
                }
                _ => format!(
                    "a keepalive agent is running with state directory {root} (possibly in a \
                     container) and would re-attach; stop it first, then detach"
                ),
            })
            .into());
        }
        Lock::Absent => None,
    };
    let cgroup2 = Cgroup2::find()?;
    let pinned = loader::pinned_attach_id(state)?;
    let located = pinned.map(|id| (id, cgroup2.locate(id)));
    let attach = located.as_ref().map(|(id, at)| match at {
        Ok(Some(path)) => path.to_string(),
        Ok(None) => format!("cgroup id {id} (removed)"),
        Err(err) => format!("cgroup id {id} ({err})"),
    });
    // `--cgroup` guards enforcement elsewhere; with none attached there is none to guard, and
    // what is left (or nothing) goes as without it, so a cleanup can run twice, also after it
    // removed the cgroup. A cgroup that no longer exists may have been the one of enforcement
    // on a removed cgroup, which covers nothing; enforcement on one that exists is elsewhere.
    if let Some(wanted) = wanted {
        let wanted_id = match cgroup2.existing_id(&wanted) {
            Ok(id) => Some(id),
            Err(err) if matches!(err.downcast_ref(), Some(Error::CgroupNotFound(_))) => None,
            Err(err) => return Err(err),
        };
        let elsewhere = match (&located, wanted_id) {
            (None, _) | (Some((_, Ok(None))), None) => false,
            (Some((id, _)), Some(wanted_id)) => *id != wanted_id,
            (Some(_), None) => true,
        };
        if elsewhere {
            let gone = if wanted_id.is_none() {
                ", which does not exist"
            } else {
                ""
            };
            return Err(Error::Agent(format!(
                "enforcement in {} is attached to {}, not on {wanted}{gone}; nothing was \
                 detached",
                state.root().display(),
                attach.as_deref().unwrap_or_default(),
            ))
            .into());
        }
    }
    // No directory, nothing to remove; and one an agent makes meanwhile is its own.
    if lock.is_none() {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for pin in state.existing_pins() {
        if unpin(&pin)? {
            removed.push(format!(
                "removed {}: {}",
                pin.display(),
                describe(state, &pin, attach.as_deref())
            ));
        }
    }
    // Empty map directories (maps-v*), then the state directory itself if it is empty.
    for dir in state.map_dirs() {
        let _ = fs::remove_dir(dir);
    }
    match fs::remove_dir(state.root()) {
        Ok(()) => removed.push(format!("removed {}", state.root().display())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => log::warn!("left {} in place: {err}", state.root().display()),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::how_to_stop;

    #[test]
    fn the_way_to_stop_the_agent_follows_what_started_it() {
        let unit = "0::/system.slice/keepalive-agent.service\n";
        assert!(how_to_stop(unit, "7").contains("`systemctl stop keepalive-agent`"));
        // A hybrid layout: the v1 hierarchies name the unit too.
        let hybrid = "1:name=systemd:/system.slice/keepalive-agent.service\n0::/\n";
        assert!(how_to_stop(hybrid, "7").contains("systemctl stop"));
        for pod in [
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-2.scope\n",
            "0::/kubepods/besteffort/pod1/2\n",
        ] {
            let how = how_to_stop(pod, "7");
            assert!(how.contains("kubectl delete"), "{how}");
            assert!(!how.contains("kill"), "{how}");
        }
        assert_eq!(
            how_to_stop("0::/user.slice/session-1.scope\n", "7"),
            "stop it first (`kill 7`)"
        );
        // A name that only contains the word is not kubelet's.
        assert!(how_to_stop("0::/my-kubepods-test\n", "7").contains("kill 7"));
        assert!(how_to_stop("", "7").contains("kill 7"));
    }
}
