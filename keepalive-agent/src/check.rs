//! `check`: can this host run the agent, and what to fix if not. Every check is a real probe:
//! the programs are loaded into the kernel (and dropped), mounts are read from the kernel.

use std::{
    io::ErrorKind,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    btf::{Btf, VMLINUX_BTF},
    cgroup::{Cgroup2, CgroupPath},
    config::{self, Config, DEFAULT_CONFIG},
    error::Error,
    foreign, instance, loader,
    logging::counted,
    metrics,
    pin::{self, BPFFS_MOUNT, StateDir},
    privileges::{self, Cap, Caps},
    sys, watch,
};

/// Result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Fine.
    Ok,
    /// Works, with a caveat.
    Warn,
    /// The agent cannot run until this is fixed.
    Fail,
}

/// One line of the checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// What was checked.
    pub name: &'static str,
    /// The result.
    pub status: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The whole checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// No check failed.
    pub ready: bool,
    /// The checks, in order.
    pub checks: Vec<Item>,
}

fn item(name: &'static str, status: Outcome, detail: impl Into<String>, fix: Option<&str>) -> Item {
    Item {
        name,
        status,
        detail: detail.into(),
        fix: fix.map(str::to_owned),
    }
}

/// The inotify watches `run` takes for its state directory (see `PinWatch`).
const STATE_WATCHES: usize = 2;

/// What `run` without inotify watches for its state directory misses.
const UNWATCHED_PINS: &str = "would notice pins removed from its state directory only at each \
                              try to watch it (up to every 30s) until it can, and when it stops";

/// See [`inotify_item`].
fn inotify_watches_item(
    cgroup2: &Cgroup2,
    attach: &CgroupPath,
    agent: Option<u32>,
) -> Option<Item> {
    // `run` exits 4 before it would watch anything.
    cgroup2.id(attach).ok()?;
    let limit = usize::try_from(read_sysctl("fs/inotify/max_user_watches")?).ok()?;
    // One for each cgroup from the attach cgroup down, and one for its parent; then two for
    // the state directory and its maps directory (`PinWatch`), which come after them.
    let below = cgroup2.walk(attach).count();
    let parent = usize::from(attach.split_last().is_some());
    let needed = below + parent + STATE_WATCHES;
    // SAFETY: geteuid has no preconditions.
    let (held, unread) = watch::watches_held(unsafe { libc::geteuid() }, agent);
    let free = limit.saturating_sub(held);
    if needed <= free {
        return None;
    }
    let cgroups = if below == 1 { "cgroup" } else { "cgroups" };
    let what = if parent == 1 {
        format!(
            "one for each of the {below} {cgroups} from {attach} down, one for its parent, and \
             two for the state directory"
        )
    } else {
        format!("one for each of the {below} {cgroups}, and two for the state directory")
    };
    let outcome = if free <= parent {
        "could not watch the attach cgroup at all, and would see cgroups come and go only at \
         each try to watch (up to every 30s)"
    } else if free < below + parent {
        "would see cgroups come and go below those it could not watch only at each try to \
         watch them (up to every 30s)"
    } else {
        UNWATCHED_PINS
    };
    let unread = match unread {
        0 => String::new(),
        n => format!("; {n} of its processes could not be read, and may hold more"),
    };
    let running = if agent.is_some() {
        ", not counting the running agent's, which a restart gives back"
    } else {
        ""
    };
    Some(item(
        "inotify",
        Outcome::Warn,
        format!(
            "`run` would take {needed} inotify watches ({what}), and this user has {free} of \
             its {limit} left ({held} held by its processes{running}{unread}): `run` would \
             enforce, but {outcome}"
        ),
        Some(&format!(
            "raise fs.inotify.max_user_watches to at least {} (`sysctl \
             fs.inotify.max_user_watches={}` leaves room for more cgroups); `find /proc/*/fd \
             -lname anon_inode:inotify` lists what holds them",
            held + needed,
            (held + needed).saturating_mul(2)
        )),
    ))
}

fn read_sysctl(name: &str) -> Option<i64> {
    std::fs::read_to_string(Path::new("/proc/sys").join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// From this many network namespaces walked on the host's TCP hash, `check` warns.
const SHARED_HASH_NAMESPACES: usize = 10;

/// Foreign network namespaces, and how many of them the apply pass walks on the host's TCP
/// hash: those with TCP sockets whose own `tcp_ehash_entries` is negative (shared), or absent
/// (before Linux 6.1 every namespace shares it). Namespaces that cannot be entered are left
/// out of the second count.
struct Namespaces {
    foreign: usize,
    walked_on_host_hash: usize,
}

fn shared_hash_namespaces() -> Namespaces {
    let mut counts = Namespaces {
        foreign: 0,
        walked_on_host_hash: 0,
    };
    let found = crate::apply::foreign_namespaces().into_iter().flatten();
    for ns in found {
        counts.foreign += 1;
        // One the agent cannot open is not walked either.
        let Ok(ns) = ns else {
            continue;
        };
        let shared = crate::apply::in_namespace(&ns, || {
            crate::apply::has_tcp_sockets()
                && read_sysctl("net/ipv4/tcp_ehash_entries").is_none_or(|n| n < 0)
        });
        counts.walked_on_host_hash += usize::from(shared.unwrap_or(false));
    }
    counts
}

/// The cost of the apply pass in many network namespaces. A TCP iterator walks the whole hash
/// of its namespace; namespaces share the host's unless `tcp_child_ehash_entries` (Linux 6.1+)
/// was set before they were created, so each one with sockets costs a walk of every host
/// bucket.
fn namespaces_item(ns: &Namespaces, child_buckets: Option<i64>, host_buckets: Option<i64>) -> Item {
    const NAME: &str = "network namespaces";
    let host = host_buckets.map_or_else(|| "?".to_owned(), |b| b.abs().to_string());
    let Namespaces {
        foreign,
        walked_on_host_hash: shared,
    } = *ns;
    let detail = format!(
        "{foreign} besides this one; {shared} with TCP sockets share the host's TCP hash of \
         {host} buckets"
    );
    if shared < SHARED_HASH_NAMESPACES {
        return item(NAME, Outcome::Ok, detail, None);
    }
    let (detail, fix) = match child_buckets {
        // Before Linux 6.1 there is nothing to set.
        None => (
            format!("{detail}; this kernel has no per-namespace TCP hash"),
            None,
        ),
        Some(0) => (
            format!(
                "{detail}: every change of the policy table (also a new cgroup that a glob \
                 matches) walks it once for each (README \"Existing connections\")"
            ),
            Some(
                "set net.ipv4.tcp_child_ehash_entries (in /etc/sysctl.d/) before containers \
                 start, sized to the connections of the busiest one: namespaces created after \
                 that get a hash of their own",
            ),
        ),
        Some(child) => (
            format!(
                "{detail}, created before net.ipv4.tcp_child_ehash_entries was set to {child}: \
                 every change of the policy table walks it once for each"
            ),
            Some(
                "namespaces created from now on get a hash of their own; restarting the containers moves them",
            ),
        ),
    };
    item(NAME, Outcome::Warn, detail, fix)
}

/// A warning when existing connections in other network namespaces cannot be updated: entering
/// them takes CAP_SYS_ADMIN, and opening other users' `/proc/<pid>/ns/net` CAP_SYS_PTRACE.
fn namespaces_privileges_item(caps: Caps) -> Option<Item> {
    let missing: Vec<&str> = [Cap::SysAdmin, Cap::SysPtrace]
        .into_iter()
        .filter(|cap| !caps.has(*cap))
        .map(Cap::name)
        .collect();
    (!missing.is_empty()).then(|| {
        item(
            "namespaces",
            Outcome::Warn,
            format!(
                "no {}: existing connections in other network namespaces are not updated",
                missing.join(" or ")
            ),
            Some("grant CAP_SYS_ADMIN and CAP_SYS_PTRACE (see the systemd unit)"),
        )
    })
}

/// A warning when this process cannot have the inotify instances `run` takes now, as `run`
/// could not, or when its user has fewer inotify watches left than `run` would take to watch
/// `attach` (in both, without those of the running agent `agent`, which a restart gives back):
/// it would enforce, but see cgroups come and go only at each try to watch until it can.
fn inotify_item(attach: Option<(&Cgroup2, &CgroupPath)>, agent: Option<u32>) -> Option<Item> {
    // `run` takes two: one for cgroups, then one for the state directory.
    let mut instances = Vec::new();
    let mut failed = None;
    while instances.len() < 2 {
        match inotify::Inotify::init() {
            Ok(inotify) => instances.push(inotify),
            Err(err) => {
                failed = Some(err);
                break;
            }
        }
    }
    if let Some(err) = failed {
        // SAFETY: geteuid has no preconditions.
        let back = agent.map_or(0, |pid| {
            watch::instances_held(pid, unsafe { libc::geteuid() })
        });
        // EMFILE is the user's instances running out (this process has descriptors to spare).
        if err.raw_os_error() != Some(libc::EMFILE) || instances.len() + back < 2 {
            return Some(instances_item(&err, instances.len()));
        }
    }
    let (cgroup2, attach) = attach?;
    // Without an instance to try, the running agent's watch is the proof.
    let parent = instances
        .pop()
        .and_then(|inotify| unwatchable_parent_item(inotify, cgroup2, attach));
    if parent
        .as_ref()
        .is_some_and(|item| item.status == Outcome::Fail)
    {
        return parent;
    }
    // Two warnings, one item.
    let watches = inotify_watches_item(cgroup2, attach, agent);
    match (parent, watches) {
        (Some(parent), Some(watches)) => Some(Item {
            detail: format!("{}; also, {}", parent.detail, watches.detail),
            fix: Some(format!(
                "{}; {}",
                parent.fix.unwrap_or_default(),
                watches.fix.unwrap_or_default()
            )),
            ..parent
        }),
        (parent, watches) => parent.or(watches),
    }
}

/// The warning for an inotify instance `run` could not have, after `got` it could.
fn instances_item(err: &std::io::Error, got: usize) -> Item {
    let outcome = if got == 0 {
        "see cgroups created and removed only at each try to watch them (up to every 30s) \
         until it can, and pins removed from its state directory only at each try to watch it \
         and when it stops"
    } else {
        UNWATCHED_PINS
    };
    item(
        "inotify",
        Outcome::Warn,
        format!(
            "cannot create an inotify instance: {err}{}; `run` would enforce, but {outcome}",
            watch::limit_hint(err)
        ),
        Some(
            "raise fs.inotify.max_user_instances (`sysctl fs.inotify.max_user_instances=1024`); \
             `find /proc/*/fd -lname anon_inode:inotify` lists what holds them",
        ),
    )
}

/// A failure when the attach cgroup's parent may not be read to watch it, which `run` refuses
/// (exit 3): that watch alone tells it of the attach cgroup's removal. A warning when only
/// CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH, which the systemd unit does not grant, let this
/// process read it.
fn unwatchable_parent_item(
    inotify: inotify::Inotify,
    cgroup2: &Cgroup2,
    attach: &CgroupPath,
) -> Option<Item> {
    let (parent, _) = attach.split_last()?;
    let watch = || {
        let mask = inotify::WatchMask::DELETE.union(inotify::WatchMask::ONLYDIR);
        inotify.watches().add(cgroup2.abs(&parent), mask).err()
    };
    let denied = |err: &std::io::Error| err.kind() == ErrorKind::PermissionDenied;
    let why =
        format!("cannot watch {parent}, the parent of the attach cgroup {attach}, with inotify");
    let fix = "give the agent CAP_DAC_READ_SEARCH, or make the directory readable by it";
    if let Some(err) = watch() {
        return denied(&err).then(|| {
            item(
                "inotify",
                Outcome::Fail,
                format!(
                    "{why}: {err}; `run` would refuse (exit 3), as that watch alone tells it \
                     of {attach}'s removal"
                ),
                Some(fix),
            )
        });
    }
    let caps = Caps::current();
    if !caps.has(Cap::DacOverride) && !caps.has(Cap::DacReadSearch) {
        return None;
    }
    let err = match privileges::without_dac(watch) {
        Ok(err) => err?,
        Err(err) => {
            return Some(item(
                "inotify",
                Outcome::Warn,
                format!(
                    "cannot tell whether `run` could watch {parent}, the parent of the attach \
                     cgroup {attach}, without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, which \
                     the systemd unit and the DaemonSet do not grant: {err}"
                ),
                Some("run check again; or give the agent CAP_DAC_READ_SEARCH"),
            ));
        }
    };
    denied(&err).then(|| {
        item(
            "inotify",
            Outcome::Warn,
            format!(
                "this process can watch {parent}, the parent of the attach cgroup {attach}, \
                 with CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH, which the systemd unit and the \
                 DaemonSet do not grant; without them: {err}: under those `run` exits 3 \
                 (unless CAP_DAC_READ_SEARCH is added)"
            ),
            Some(fix),
        )
    })
}

/// Whether `run` could listen for metrics on `addr` as this process, and under the systemd
/// unit, which does not grant CAP_NET_BIND_SERVICE. `agent` is the running agent's pid, which
/// holds the address itself.
fn metrics_item(addr: SocketAddr, caps: Caps, agent: Option<&str>) -> Item {
    let port = addr.port();
    let privileged = metrics::needs_bind_capability(port);
    let unit_fix = metrics::privileged_port_fix(port);
    if privileged && !caps.has(Cap::NetBindService) {
        return item(
            "metrics",
            Outcome::Fail,
            format!(
                "{addr}: port {port} needs CAP_NET_BIND_SERVICE, which this process lacks; \
                 `run` exits 3"
            ),
            Some(&unit_fix),
        );
    }
    match std::net::TcpListener::bind(addr) {
        Ok(_) if privileged => item(
            "metrics",
            Outcome::Warn,
            format!(
                "{addr} is free, but port {port} needs CAP_NET_BIND_SERVICE, which the systemd \
                 unit does not grant: under it `run` exits 3 (unless a drop-in grants it)"
            ),
            Some(&unit_fix),
        ),
        Ok(_) => item(
            "metrics",
            Outcome::Ok,
            format!("{addr} is free to listen on"),
            None,
        ),
        Err(err) if err.kind() == ErrorKind::AddrInUse => {
            match agent.map_or(metrics::Holder::Unknown, |pid| metrics::holder(pid, addr)) {
                metrics::Holder::Agent => item(
                    "metrics",
                    Outcome::Ok,
                    format!(
                        "{addr}: the running agent (pid {}) listens there",
                        agent.unwrap_or_default()
                    ),
                    None,
                ),
                metrics::Holder::Unknown if !Caps::current().has(Cap::SysPtrace) => item(
                    "metrics",
                    Outcome::Warn,
                    format!(
                        "{addr} is in use, by the running agent or by another process: this check \
                     cannot tell without root"
                    ),
                    Some("run check as root"),
                ),
                _ => item(
                    "metrics",
                    Outcome::Fail,
                    format!(
                        "{addr} is in use by another process; `run` exits 1 (the systemd unit \
                     retries every 2 s)"
                    ),
                    Some(&format!(
                        "choose another port, or stop what listens there (ss -ltnp 'sport = :{port}')"
                    )),
                ),
            }
        }
        Err(err) if err.kind() == ErrorKind::AddrNotAvailable => item(
            "metrics",
            Outcome::Fail,
            format!(
                "{addr} is not an address of this host; `run` exits 1 (the systemd unit \
                 retries every 2 s, until the address appears)"
            ),
            Some("use an address this host has, such as 127.0.0.1"),
        ),
        Err(err) if err.kind() == ErrorKind::PermissionDenied => item(
            "metrics",
            Outcome::Fail,
            format!(
                "cannot listen on {addr}: {err}, not for want of CAP_NET_BIND_SERVICE; `run` \
                 exits 3"
            ),
            Some(
                "look for a security module (SELinux, AppArmor) or a cgroup bind program refusing it",
            ),
        ),
        Err(err) => item(
            "metrics",
            Outcome::Fail,
            format!("cannot listen on {addr}: {err}; `run` fails the same way"),
            None,
        ),
    }
}

/// What `check` is to check: the config and attach cgroup `run` would use.
#[derive(Debug, Default)]
pub struct Target<'a> {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--config`.
    pub config: Option<&'a Path>,
    /// `--cgroup`, over the config's `attach`.
    pub cgroup: Option<&'a str>,
    /// `--metrics`, over the config's `metrics`.
    pub metrics: Option<SocketAddr>,
}

/// The config `run` would read (`path`, else the default file if it exists): that it is valid
/// and that every policy lies within its attach cgroup, which should exist. With the config
/// and its attach cgroup when it is valid.
fn config_item(cgroup2: &Cgroup2, target: &Target<'_>) -> (Item, Option<(Config, CgroupPath)>) {
    let (loaded, owner) = config::load_apart(target.config, cgroup2);
    let (mut item, config) = config_content_item(cgroup2, target, loaded);
    // `run` refuses a file others could write whatever it says; what it says is reported too,
    // so one run of `check` shows everything to fix before a deploy.
    if let Some(owner) = owner {
        let content = match item.status {
            Outcome::Fail => format!("also: {}", item.detail),
            _ => format!("otherwise {}", item.detail),
        };
        item.detail = format!("{owner:#}; {content}");
        item.fix = Some(match item.fix {
            Some(fix) => format!("fix the owner or mode as it says, and: {fix}"),
            None => "fix the owner or mode as it says: `run` refuses the file (exit 2)".to_owned(),
        });
        item.status = Outcome::Fail;
    }
    (item, config)
}

/// [`config_item`] for what the file says.
fn config_content_item(
    cgroup2: &Cgroup2,
    target: &Target<'_>,
    loaded: anyhow::Result<Config>,
) -> (Item, Option<(Config, CgroupPath)>) {
    const NAME: &str = "config";
    const FIX_FILE: &str =
        "correct the file: `run` refuses it (exit 2) and a reload keeps the running policy";
    let fix_scope = if target.cgroup.is_some() {
        "correct the file or --cgroup: `run` refuses them (exit 2)"
    } else {
        FIX_FILE
    };
    let checked = loaded
        .map_err(|err| {
            let fix = if err.is::<config::DanglingLink>() {
                "restore the link's target (or mount its file system): `run` exits 1 until it \
                 can read the file, and the systemd unit retries every 2 s"
            } else {
                FIX_FILE
            };
            (err, fix)
        })
        .and_then(|config| {
            // The file's own `attach` was checked as it was read: an error here is --cgroup's.
            let attach = config
                .attach_cgroup(target.cgroup, cgroup2)
                .map_err(|err| (err, "correct --cgroup: `run` refuses it (exit 2)"))?;
            config
                .check_scope(&attach)
                .map_err(|err| (err, fix_scope))?;
            // As `run` looks the attach cgroup up.
            let exists = cgroup2.existing_id(&attach);
            Ok((config, attach, exists))
        });
    match checked {
        // `run` exits 4 and the systemd unit retries until the cgroup appears (kubelet, say,
        // creates kubepods.slice after boot), so the file itself is fine.
        Ok((config, attach, Err(err)))
            if matches!(err.downcast_ref(), Some(Error::CgroupNotFound(_))) =>
        {
            (
                item(
                    NAME,
                    Outcome::Warn,
                    format!("valid, but the attach cgroup {attach} does not exist (yet)"),
                    Some("`run` exits 4 until it exists; the systemd unit retries every 2 s"),
                ),
                Some((config, attach)),
            )
        }
        // A file rather than a cgroup, say: `run` refuses it.
        Ok((_, _, Err(err))) => (
            item(
                NAME,
                Outcome::Fail,
                format!("{err:#}"),
                Some("attach to a cgroup directory: `run` refuses this one"),
            ),
            None,
        ),
        Ok((config, attach, Ok(_))) => {
            let detail = match &config.file {
                Some(file) => {
                    let rules = counted(
                        config.policies.rules.len() as u64,
                        "cgroup policy",
                        "cgroup policies",
                    );
                    format!("{} is valid: {rules}, attach at {attach}", file.display())
                }
                None => {
                    format!("no {DEFAULT_CONFIG}: the built-in default applies, attach at {attach}")
                }
            };
            let pending = config.pending(cgroup2, &attach);
            let item = if pending.is_empty() {
                item(NAME, Outcome::Ok, detail, None)
            } else {
                item(
                    NAME,
                    Outcome::Warn,
                    format!("{detail}; but {}", pending.join("; ")),
                    Some(
                        "correct a misspelt cgroup path; a cgroup made later (a service not \
                          started yet, a pod) gets its policy when it appears",
                    ),
                )
            };
            (item, Some((config, attach)))
        }
        Err((err, fix)) => (
            item(NAME, Outcome::Fail, format!("{err:#}"), Some(fix)),
            None,
        ),
    }
}

/// The state and runtime directories `run` would use: a state directory it would refuse (the
/// bpffs mount itself, or one not on bpffs and not below where it mounts bpffs), or a runtime
/// directory holding files that are not keepalive's.
fn directories_item(state: &StateDir, runtime_dir: &Path) -> Item {
    const NAME: &str = "directories";
    let root = state.root();
    if let Err(err) = state.check_own() {
        return item(
            NAME,
            Outcome::Fail,
            format!("{err:#}"),
            Some(
                "set state_dir (or --state-dir) to a directory of keepalive's own below /sys/fs/bpf",
            ),
        );
    }
    if let Err(err) = pin::bpffs_state(root) {
        return item(
            NAME,
            Outcome::Fail,
            format!("{err}; `run` exits 5"),
            Some("choose a state directory below /sys/fs/bpf"),
        );
    }
    if let Some(file) = instance::not_a_directory(runtime_dir) {
        return item(
            NAME,
            Outcome::Fail,
            format!(
                "runtime directory {}: {} is not a directory; `run` refuses it (exit 2)",
                runtime_dir.display(),
                file.display()
            ),
            Some("give the agent a runtime directory of its own (default /run/keepalive-agent)"),
        );
    }
    if let Ok(Some(why)) = instance::untrusted(runtime_dir, instance::Leaf::MadeRootOnly) {
        return item(
            NAME,
            Outcome::Fail,
            format!(
                "runtime directory {}: {why}; `run` as this user refuses it (exit 2), as \
                 another user could replace its control socket",
                runtime_dir.display()
            ),
            Some(
                "give the agent a runtime directory only root can change (default \
                 /run/keepalive-agent)",
            ),
        );
    }
    // A runtime directory that does not exist yet is created by `run`.
    if let Ok(Some(other)) = instance::foreign_entry(runtime_dir) {
        return item(
            NAME,
            Outcome::Fail,
            format!(
                "runtime directory {} holds {other}, which is not keepalive's; `run` refuses it \
                 (exit 2) rather than make it root-only",
                runtime_dir.display()
            ),
            Some("give the agent a runtime directory of its own (default /run/keepalive-agent)"),
        );
    }
    if !root.starts_with(BPFFS_MOUNT) {
        // Fine here, but `check` runs outside the unit's sandbox.
        return item(
            NAME,
            Outcome::Warn,
            format!(
                "state {} is on bpffs but not below {BPFFS_MOUNT}, the only path the systemd \
                 unit (ProtectSystem=strict) leaves writable: under it, `run` exits 5",
                root.display()
            ),
            Some(&format!(
                "choose a state directory below {BPFFS_MOUNT}, or add `ReadWritePaths={}` in a \
                 drop-in (`systemctl edit keepalive-agent`)",
                root.display()
            )),
        );
    }
    item(
        NAME,
        Outcome::Ok,
        format!(
            "state {}, runtime {}",
            root.display(),
            runtime_dir.display()
        ),
        None,
    )
}

/// Runs every check. The state directory is `--state-dir`, else the config's.
pub fn run(target: Target<'_>, runtime_dir: &Path) -> Report {
    let mut checks = Vec::new();
    match loader::kernel_version() {
        Some((major, minor, release)) if (major, minor) >= loader::MIN_KERNEL => {
            checks.push(item(
                "kernel",
                Outcome::Ok,
                format!("Linux {release}"),
                None,
            ));
        }
        Some((_, _, release)) => checks.push(item(
            "kernel",
            Outcome::Fail,
            format!("Linux {release}; keepalive needs 5.15 or newer"),
            Some("upgrade the kernel"),
        )),
        None => checks.push(item("kernel", Outcome::Warn, "version unknown", None)),
    }

    let btf = Btf::from_sys_fs();
    match &btf {
        Ok(btf) => match btf.kernel_offsets() {
            Ok(_) => checks.push(item(
                "btf",
                Outcome::Ok,
                format!("{VMLINUX_BTF} describes every field used"),
                None,
            )),
            Err(err) => checks.push(item(
                "btf",
                Outcome::Fail,
                err.to_string(),
                Some("use a kernel of 5.15 or newer"),
            )),
        },
        Err(err) => checks.push(item(
            "btf",
            Outcome::Fail,
            err.to_string(),
            Some("use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distributions ship one)"),
        )),
    }

    let cgroup2 = Cgroup2::find();
    match &cgroup2 {
        Ok(cg) => {
            let hybrid = cg.mount() != Path::new("/sys/fs/cgroup");
            checks.push(item(
                "cgroup2",
                Outcome::Ok,
                if hybrid {
                    format!("mounted at {} (hybrid layout: cgroup v1 controllers at /sys/fs/cgroup; fine)", cg.mount().display())
                } else {
                    format!("mounted at {}", cg.mount().display())
                },
                None,
            ));
        }
        Err(err) => checks.push(item(
            "cgroup2",
            Outcome::Fail,
            format!("{err:#}"),
            Some("mount -t cgroup2 none /sys/fs/cgroup, or boot with systemd.unified_cgroup_hierarchy=1"),
        )),
    }
    let config = cgroup2.as_ref().ok().and_then(|cgroup2| {
        let (item, config) = config_item(cgroup2, &target);
        checks.push(item);
        config
    });
    let state = StateDir::resolve(target.state_dir.clone(), || {
        config.as_ref().and_then(|(c, _)| c.state_dir.clone())
    });

    let state_on_bpffs = pin::bpffs_state(state.root());
    if pin::on_bpffs(Path::new(BPFFS_MOUNT)) {
        checks.push(item(
            "bpffs",
            Outcome::Ok,
            format!("mounted at {BPFFS_MOUNT}"),
            None,
        ));
    } else if matches!(state_on_bpffs, Ok(true)) {
        // `run` uses the state directory's bpffs as it is, and needs no other.
        checks.push(item(
            "bpffs",
            Outcome::Ok,
            format!(
                "not mounted at {BPFFS_MOUNT}, but the state directory {} is on bpffs",
                state.root().display()
            ),
            None,
        ));
    } else if state_on_bpffs.is_err() {
        // Nor would `run` mount one for it: the directories item says why.
        checks.push(item(
            "bpffs",
            Outcome::Fail,
            format!(
                "not mounted at {BPFFS_MOUNT}, nor at the state directory {}, and `run` \
                 mounts bpffs only at {BPFFS_MOUNT}",
                state.root().display()
            ),
            Some("mount -t bpf bpf /sys/fs/bpf, and choose a state directory below it"),
        ));
    } else if let Some(mount) = pin::mount_stays_in_namespace() {
        // `run` would have to mount bpffs for this state directory, and refuses to.
        checks.push(item(
            "bpffs",
            Outcome::Fail,
            format!(
                "not mounted at {BPFFS_MOUNT}, and `run` refuses to mount one that would stay \
                 in this mount namespace ({mount} receives mounts but passes none back, as in \
                 a container): the pins would end with it"
            ),
            Some("mount -t bpf bpf /sys/fs/bpf on the host, and give this one the host's"),
        ));
    } else {
        checks.push(item(
            "bpffs",
            Outcome::Warn,
            format!(
                "not mounted at {BPFFS_MOUNT}; `run` started by hand mounts it, the systemd \
                 unit cannot (its sandbox allows no mount)"
            ),
            Some("mount -t bpf bpf /sys/fs/bpf (systemd does this at boot)"),
        ));
    }
    let mut directories = directories_item(&state, runtime_dir);
    if target.state_dir.is_none() && config.is_none() {
        // Everything below that reads the state reads this directory's.
        directories.detail.push_str(
            "; the default state directory: the config, which may name another, could not be \
             read",
        );
    }
    checks.push(directories);

    let caps = Caps::current();
    let missing = caps.missing_for_run();
    if missing.is_empty() {
        checks.push(item(
            "privileges",
            Outcome::Ok,
            "can load and attach BPF programs",
            None,
        ));
        if let Some(item) = namespaces_privileges_item(caps) {
            checks.push(item);
        }
        let agent = instance::running_agent(runtime_dir).and_then(|agent| agent.pid.parse().ok());
        checks.extend(inotify_item(
            cgroup2
                .as_ref()
                .ok()
                .zip(config.as_ref().map(|(_, attach)| attach)),
            agent,
        ));
    } else {
        let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
        checks.push(item(
            "privileges",
            Outcome::Fail,
            format!("missing {}", names.join(", ")),
            Some(
                "run as root, or grant CAP_BPF CAP_PERFMON CAP_NET_ADMIN (and CAP_SYS_ADMIN \
                 CAP_SYS_PTRACE for connections in other network namespaces, as the systemd \
                 unit does)",
            ),
        ));
    }

    if let Some(addr) = target
        .metrics
        .or_else(|| config.as_ref().and_then(|(config, _)| config.metrics))
    {
        let agent = instance::running_agent(runtime_dir);
        checks.push(metrics_item(
            addr,
            caps,
            agent.as_ref().map(|a| a.pid.as_str()),
        ));
    }

    if missing.is_empty()
        && let Ok(btf) = &btf
    {
        // Sized as `run` would make them, unless it would find them pinned.
        let (cgroups, sockets) = match &config {
            Some((config, _)) if state.existing_pins().is_empty() => {
                (config.max_tracked_cgroups, config.max_tracked_sockets)
            }
            _ => (None, None),
        };
        for (program, result) in loader::probe(btf, cgroups, sockets) {
            let (name, what) = match program {
                keepalive_common::PROG_SOCKOPS => ("sock_ops", "enforcing new connections"),
                keepalive_common::PROG_LOCK => ("cgroup/setsockopt", "lock mode"),
                keepalive_common::PROG_APPLY => ("iter/tcp", "updating existing connections"),
                _ => ("iter/bpf_map_elem", "status"),
            };
            checks.push(match result {
                Ok(()) => item(name, Outcome::Ok, format!("loads; {what} works"), None),
                // `run` loads the lock program whatever the policy, so only the TCP iterator
                // is optional, and only on a kernel that lacks what it needs.
                Err(err) if err.no_memory => item(
                    name,
                    Outcome::Fail,
                    format!("cannot be loaded: {err}"),
                    Some("`run` exits 2 on it: lower the setting named, or raise the memory limit"),
                ),
                Err(err) if program == keepalive_common::PROG_APPLY && err.unsupported => item(
                    name,
                    Outcome::Warn,
                    format!("rejected ({err}); no {what}"),
                    Some("use Linux 5.15 or newer"),
                ),
                Err(err) if program == keepalive_common::PROG_APPLY => item(
                    name,
                    Outcome::Fail,
                    format!("rejected by a kernel that supports it: {err}"),
                    Some("report this with the output above: this build's program is faulty"),
                ),
                Err(err) => item(
                    name,
                    Outcome::Fail,
                    format!("rejected: {err}"),
                    Some("use Linux 5.15 or newer with BTF"),
                ),
            });
        }
    }

    checks.push(namespaces_item(
        &shared_hash_namespaces(),
        read_sysctl("net/ipv4/tcp_child_ehash_entries"),
        read_sysctl("net/ipv4/tcp_ehash_entries"),
    ));

    if let Ok(cg) = &cgroup2 {
        let pinned = loader::pinned_sockops_link(&state);
        // Not "not attached" when the pin could not be read (not root, say): unknown.
        let unreadable = pinned.as_ref().err().map(|err| format!("{err:#}"));
        let ours = pinned.ok().flatten();
        // Where it is attached; `None` for a removed cgroup, whose link `run` replaces: it is
        // in nobody's way.
        let attached = ours.map(|info| {
            loader::link_cgroup(&info, cg).map_err(|err| (info.cgroup_id, err.to_string()))
        });
        let pinned_id = ours
            .filter(|_| !matches!(attached, Some(Ok(None))))
            .map(|info| info.cgroup_id);
        if let Ok(root) = std::fs::File::open(cg.abs(&CgroupPath::root())) {
            match sys::cgroup_query(&root, sys::ATTACH_CGROUP_SOCK_OPS, false) {
                Ok(ids) => {
                    let ours_prog = ours.map(|info| info.prog_id);
                    let others: Vec<u32> = ids
                        .into_iter()
                        .filter(|id| Some(*id) != ours_prog)
                        .collect();
                    if others.is_empty() {
                        checks.push(item(
                            "other sock_ops programs",
                            Outcome::Ok,
                            "none on the cgroup2 root",
                            None,
                        ));
                    } else {
                        checks.push(item(
                            "other sock_ops programs",
                            Outcome::Warn,
                            format!("program ids {others:?} are attached to the cgroup2 root; they run alongside keepalive and may set keepalive options too"),
                            Some("see README \"Other eBPF users\"; attach keepalive to a subtree to avoid overlap"),
                        ));
                    }
                }
                Err(err) => checks.push(item(
                    "other sock_ops programs",
                    Outcome::Warn,
                    format!("cannot query: {err}"),
                    None,
                )),
            }
        }
        let agent =
            instance::running_agent(runtime_dir).filter(|agent| agent.may_use(state.root()));
        // An agent on this state directory that serves another runtime directory: `run` with
        // this one would be refused (exit 7), and the policy commands would not reach it.
        let elsewhere = agent.is_none() && state.is_locked();
        // An agent whose control socket was removed runs on, out of reach of `policy`
        // commands, reloads and the DaemonSet's liveness probe.
        let socket = crate::control::socket_path(runtime_dir);
        let unserved = agent.is_some() && {
            use std::os::unix::fs::FileTypeExt as _;
            !std::fs::symlink_metadata(&socket).is_ok_and(|meta| meta.file_type().is_socket())
        };
        let detail = match (attached, agent) {
            (Some(Ok(None)), _) => format!(
                "the enforcement pinned in {} was on a cgroup that has been removed, so it no \
                 longer covers new connections; `run` attaches anew",
                state.root().display()
            ),
            (Some(Err((id, err))), _) => format!(
                "attached to cgroup id {id}, which could not be located ({err}); `run` \
                 elsewhere refuses to move it"
            ),
            (Some(Ok(Some(cgroup))), Some(agent)) => {
                format!(
                    "attached to {cgroup} and the agent (pid {}) is running",
                    agent.pid
                )
            }
            (Some(Ok(Some(cgroup))), None) if elsewhere => format!(
                "attached to {cgroup}, and an agent holds {} but does not serve {}: it runs \
                 with another --runtime-dir",
                state.root().display(),
                runtime_dir.display()
            ),
            (Some(Ok(Some(cgroup))), None) => format!(
                "attached to {cgroup}; no agent is running (new connections are still enforced)"
            ),
            (None, _) if elsewhere => format!(
                "not attached ({}), and an agent holds it but does not serve {}: it is \
                 starting, or runs with another --runtime-dir",
                state.root().display(),
                runtime_dir.display()
            ),
            (None, _) => format!("not attached ({})", state.root().display()),
        };
        // `run` refuses to move pinned enforcement to another cgroup: also to one that does not
        // exist yet, which it waits for (exit 4) and then refuses (exit 7).
        let wanted = config.as_ref().and_then(|(_, attach)| match cg.id(attach) {
            Ok(id) => Some((Some(id), attach)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Some((None, attach)),
            // Unreadable: the config item says why; nothing to compare with here.
            Err(_) => None,
        });
        // `run` also refuses to attach beside another state directory's enforcement.
        let roots = foreign::search_roots(&state);
        let others = wanted
            .and_then(|(_, attach)| {
                let dir = std::fs::File::open(cg.abs(attach)).ok()?;
                foreign::enforcement(cg, attach, &dir, ours.map(|info| info.prog_id), &roots).ok()
            })
            .unwrap_or_default();
        let direct = others
            .iter()
            .find(|other| other.place == foreign::Place::Here);
        checks.push(match (pinned_id, wanted, direct, others.first()) {
            _ if let Some(err) = &unreadable => item(
                "keepalive",
                Outcome::Warn,
                format!("cannot tell whether keepalive is attached: {err}"),
                Some("run `check` as root, which reads keepalive's pinned state"),
            ),
            (_, Some((_, attach)), Some(other), _) => item(
                "keepalive",
                Outcome::Fail,
                format!("{detail}; but {}", other.refusal(attach, &roots)),
                Some("`run` refuses to attach beside it (exit 7); see the detail"),
            ),
            // Before the warning below: `run` refuses this whatever runs above or below.
            (Some(pinned), Some((id, attach)), ..) if Some(pinned) != id => item(
                "keepalive",
                Outcome::Fail,
                format!(
                    "{detail}, but the config attaches to {attach}{}",
                    if id.is_none() {
                        ", which does not exist (yet)"
                    } else {
                        ""
                    }
                ),
                Some(&format!(
                    "`run` refuses to move pinned enforcement (exit 7): `{}` first, or attach \
                     where it is",
                    state.detach_command()
                )),
            ),
            (_, Some((_, attach)), None, Some(other)) => item(
                "keepalive",
                Outcome::Warn,
                format!("{detail}; {}", other.overlap(attach, cg, &roots)),
                Some("scope the agents to subtrees that do not nest, or use one agent"),
            ),
            _ if unserved => item(
                "keepalive",
                Outcome::Warn,
                format!(
                    "{detail}, but its control socket {} is missing: it is still starting, or \
                     the socket was removed",
                    socket.display()
                ),
                Some(
                    "if it was removed, restart the agent: `policy` commands and reloads do not \
                     reach it, and the DaemonSet's liveness probe fails",
                ),
            ),
            _ if elsewhere => item(
                "keepalive",
                Outcome::Warn,
                detail,
                Some(
                    "give the agent's own --runtime-dir: with this one `run` is refused (exit 7) \
                     while it runs, and `policy` commands do not reach it",
                ),
            ),
            _ => item("keepalive", Outcome::Ok, detail, None),
        });
    }
    Report {
        ready: checks.iter().all(|c| c.status != Outcome::Fail),
        checks,
    }
}

/// The checklist for people, with control characters in what it names (a config path, a
/// cgroup name) as escapes.
pub fn render(report: &Report) -> String {
    use crate::status::printable_lines;
    let mut out = String::new();
    for check in &report.checks {
        let mark = match check.status {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        let detail = printable_lines(&check.detail);
        out.push_str(&format!("[{mark}] {}: {detail}\n", check.name));
        if let Some(fix) = &check.fix
            && check.status != Outcome::Ok
        {
            out.push_str(&format!("       fix: {}\n", printable_lines(fix)));
        }
    }
    out.push_str(if report.ready {
        "\nready: this host can run keepalive-agent\n"
    } else {
        "\nnot ready: fix the FAIL items above\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checklist_escapes_control_characters_in_what_it_names() {
        let report = Report {
            ready: false,
            checks: vec![item(
                "config",
                Outcome::Fail,
                "/etc/k\u{1b}c.toml:2: no cgroup /a\u{7}b",
                Some("edit /etc/k\u{1b}c.toml"),
            )],
        };
        let text = render(&report);
        assert!(
            text.contains("[FAIL] config: /etc/k\\u{1b}c.toml:2: no cgroup /a\\u{7}b\n")
                && text.contains("fix: edit /etc/k\\u{1b}c.toml\n")
                && !text.contains(['\u{1b}', '\u{7}']),
            "{text}"
        );
    }

    #[test]
    fn many_namespaces_walked_on_the_host_tcp_hash_get_a_warning_with_the_sysctl() {
        let ns = |walked_on_host_hash| Namespaces {
            foreign: 40,
            walked_on_host_hash,
        };
        let warn = namespaces_item(&ns(SHARED_HASH_NAMESPACES), Some(0), Some(262_144));
        assert_eq!(warn.status, Outcome::Warn);
        assert!(warn.detail.contains("262144 buckets"), "{}", warn.detail);
        assert!(warn.fix.unwrap().contains("tcp_child_ehash_entries"));
        // Set after the namespaces were made: still shared.
        let late = namespaces_item(&ns(SHARED_HASH_NAMESPACES), Some(1024), Some(262_144));
        assert_eq!(late.status, Outcome::Warn);
        let few = namespaces_item(&ns(SHARED_HASH_NAMESPACES - 1), Some(0), Some(-262_144));
        assert_eq!(few.status, Outcome::Ok);
        assert!(few.detail.contains("262144 buckets"), "{}", few.detail);
        let old_kernel = namespaces_item(&ns(SHARED_HASH_NAMESPACES), None, None);
        assert_eq!((old_kernel.status, old_kernel.fix), (Outcome::Warn, None));
    }
}
