//! Applying policy to connections that already exist, with the TCP iterator program.
//!
//! A TCP iterator walks the sockets of the network namespace of the thread that creates it, so
//! this visits every network namespace on the host: its own, those of running processes
//! (`/proc/*/ns/net`) and the named ones in `/run/netns`. Each foreign namespace is entered on a
//! short-lived thread with setns(2), which touches no application memory.

use std::{
    collections::HashSet,
    fs::{self, File},
    io::Read,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::Mutex,
    time::Instant,
};

use anyhow::Context as _;
use keepalive_common::apply_result;
use serde::{Deserialize, Serialize};

use crate::sys;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Sockets that got the policy's values.
    pub applied: u64,
    /// Sockets that already carried their policy.
    pub unchanged: u64,
    /// Sockets in `off` cgroups.
    pub skipped_off: u64,
    /// Of those, sockets the program had enforced under an ancestor's policy before the agent
    /// saw their new `off` cgroup, and switched keepalive off on again.
    #[serde(default)]
    pub released: u64,
    /// `fill` sockets where the application enabled keepalive itself.
    pub kept_app: u64,
    /// Sockets where a bpf_setsockopt call failed.
    pub failed: u64,
    /// Network namespaces visited.
    pub namespaces: u64,
    /// Network namespaces that were found but could not be entered.
    pub namespaces_skipped: u64,
    /// Of the namespaces visited, those without TCP sockets, which were not walked.
    #[serde(default)]
    pub namespaces_empty: u64,
    /// Wall time of the pass in microseconds.
    pub elapsed_us: u64,
}

impl ApplyReport {
    fn add_bytes(&mut self, bytes: &[u8]) {
        for byte in bytes {
            match *byte {
                apply_result::APPLIED => self.applied += 1,
                apply_result::UNCHANGED => self.unchanged += 1,
                apply_result::SKIPPED_OFF => self.skipped_off += 1,
                apply_result::RELEASED => {
                    self.skipped_off += 1;
                    self.released += 1;
                }
                apply_result::KEPT_APP => self.kept_app += 1,
                _ => self.failed += 1,
            }
        }
    }

    fn merge(&mut self, other: &Self) {
        self.applied += other.applied;
        self.unchanged += other.unchanged;
        self.skipped_off += other.skipped_off;
        self.released += other.released;
        self.kept_app += other.kept_app;
        self.failed += other.failed;
        self.namespaces_empty += other.namespaces_empty;
    }

    /// Sockets inside the attach cgroup that the pass looked at.
    pub const fn visited(&self) -> u64 {
        self.applied + self.unchanged + self.skipped_off + self.kept_app + self.failed
    }
}

fn run_iterator(link: BorrowedFd<'_>) -> anyhow::Result<ApplyReport> {
    let mut file = sys::iter_create(link).context("failed to start the TCP iterator")?;
    let mut out = Vec::new();
    read_all(&mut file, &mut out).context("failed to read the TCP iterator")?;
    let mut report = ApplyReport::default();
    report.add_bytes(&out);
    Ok(report)
}

/// Reads an iterator to its end. The kernel fails a read with EAGAIN after a million objects
/// that printed nothing (sockets outside the attach cgroup, listeners, TIME_WAIT), to bound
/// the time it spends in one call; reading again carries on from there.
fn read_all(file: &mut impl Read, out: &mut Vec<u8>) -> std::io::Result<()> {
    loop {
        match file.read_to_end(out) {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            result => return result.map(drop),
        }
    }
}

/// One network namespace, held open: it stays enterable while this lives, even after the
/// process it was found through has exited.
#[derive(Debug)]
pub struct Namespace {
    file: File,
    /// Where it was found, for messages.
    pub path: PathBuf,
}

/// A namespace [`foreign_namespaces`] found and could not open: the agent lacks
/// CAP_SYS_PTRACE for another user's process, say.
#[derive(Debug)]
pub struct Unopened {
    /// Where it was found.
    pub path: PathBuf,
    /// Why it could not be opened.
    pub err: std::io::Error,
}

/// Every network namespace other than our own, once each: the named ones in `/run/netns`, then
/// those of running processes. Each is opened as it is found, so a process that exits between
/// being listed and its namespace being entered cannot make a pass miss the namespace (or,
/// with its pid reused, enter another one in its place). One that cannot be opened is an
/// [`Unopened`] item (a process that exited meanwhile is none); when `/proc` itself cannot be
/// read (too many files open, say), there is no list to go by, which is an error.
///
/// A file of `/run/netns` that is not on nsfs, where every namespace file is, is none either:
/// `ip netns add` (and a CNI plugin) makes the file before it mounts the namespace on it, and
/// `ip netns delete` unmounts before it removes the file. Entering one would fail the pass
/// (EINVAL); the processes in such a namespace, if any, are found in `/proc`.
pub fn foreign_namespaces() -> std::io::Result<impl Iterator<Item = Result<Namespace, Unopened>>> {
    let own = fs::metadata("/proc/self/ns/net").map(|m| netns_id(&m)).ok();
    let nsfs = own.map(|(dev, _)| dev);
    let mut seen: HashSet<(u64, u64)> = own.into_iter().collect();
    let named = match fs::read_dir("/run/netns") {
        Ok(dir) => Some(dir),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(with_path(err, "/run/netns")),
    };
    let proc = fs::read_dir("/proc").map_err(|err| with_path(err, "/proc"))?;
    let named = named
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path());
    let processes = proc
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|entry| entry.path().join("ns/net"));
    Ok(named.chain(processes).filter_map(move |path| {
        let opened = File::open(&path).and_then(|file| Ok((file.metadata()?, file)));
        match opened {
            Ok((meta, _)) if nsfs.is_some_and(|nsfs| meta.dev() != nsfs) => None,
            Ok((meta, file)) => seen
                .insert(netns_id(&meta))
                .then_some(Ok(Namespace { file, path })),
            // The process exited (ESRCH when it is a zombie).
            Err(err)
                if err.kind() == std::io::ErrorKind::NotFound
                    || err.raw_os_error() == Some(libc::ESRCH) =>
            {
                None
            }
            Err(err) => Some(Err(Unopened { path, err })),
        }
    }))
}

/// `err`, naming the directory it came from.
fn with_path(err: std::io::Error, dir: &str) -> std::io::Error {
    std::io::Error::new(err.kind(), format!("failed to list {dir}: {err}"))
}

/// What identifies a network namespace: the device and inode of its nsfs file.
fn netns_id(meta: &fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// `inuse` of the `TCP:` or `TCP6:` line (`label`) of a sockstat file.
fn tcp_inuse(sockstat: &str, label: &str) -> Option<u64> {
    let line = sockstat.lines().find_map(|l| l.strip_prefix(label))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "inuse" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Whether the calling thread's network namespace has TCP sockets that a pass could update:
/// sockstat's `inuse` counts listening and connected sockets (IPv4 in `sockstat`, IPv6 and
/// v4-mapped in `sockstat6`, which is absent without IPv6). A walk of a namespace costs a walk
/// of its whole TCP hash, which namespaces share with the host's unless
/// `net.ipv4.tcp_child_ehash_entries` was set; this read costs microseconds. Unknown counts
/// as yes.
///
/// The kernel sums per-CPU counters without a lock, so a namespace with one socket can read 0
/// while a short connection is counted on one CPU and uncounted on another; it takes two reads
/// of 0 to skip a namespace.
pub fn has_tcp_sockets() -> bool {
    let inuse = || -> Option<u64> {
        let v4 = fs::read_to_string("/proc/thread-self/net/sockstat").ok()?;
        let v6 = match fs::read_to_string("/proc/thread-self/net/sockstat6") {
            Ok(text) => tcp_inuse(&text, "TCP6: ")?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => 0,
            Err(_) => return None,
        };
        Some(tcp_inuse(&v4, "TCP: ")? + v6)
    };
    inuse() != Some(0) || inuse() != Some(0)
}

/// Runs `f` on a short-lived thread inside the network namespace `ns`. A thread the kernel
/// will not make (a pids limit, say) is an error, as a namespace that cannot be entered is.
pub fn in_namespace<T: Send>(ns: &Namespace, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .spawn_scoped(scope, || {
                // SAFETY: setns on this short-lived thread only changes its own namespace.
                if unsafe { libc::setns(ns.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("failed to enter {}", ns.path.display()));
                }
                Ok(f())
            })
            .with_context(|| format!("failed to start a thread to enter {}", ns.path.display()))?
            .join()
            .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    })
}

/// The pass in one foreign namespace.
fn apply_in(ns: &Namespace, link: BorrowedFd<'_>) -> anyhow::Result<ApplyReport> {
    in_namespace(ns, || {
        // Sockets established after this read got the new table from the start.
        if has_tcp_sockets() {
            run_iterator(link)
        } else {
            log::debug!(
                "network namespace {} has no TCP sockets; not walked",
                ns.path.display()
            );
            Ok(ApplyReport {
                namespaces_empty: 1,
                ..ApplyReport::default()
            })
        }
    })?
}

/// Whether `err`, from opening or entering a namespace, says that this process may not: a
/// namespace no later pass could enter either, which passes skip.
fn denied(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

/// Runs the apply iterator in every network namespace, calling `between` before each one
/// after the first. A namespace this process may not open or enter is skipped (see
/// [`note_skipped`]); one it failed to walk for another reason (no thread, no descriptor or
/// no memory to spare, a failed iterator) fails the pass, after it went on with the others,
/// so that it is tried again.
pub fn apply_existing(link: &impl AsFd, mut between: impl FnMut()) -> anyhow::Result<ApplyReport> {
    let start = Instant::now();
    let link = link.as_fd();
    let mut report = run_iterator(link)?;
    report.namespaces = 1;
    let mut failed = 0u64;
    let mut first_failure = None;
    for ns in foreign_namespaces()? {
        let ns = match ns {
            Ok(ns) => ns,
            Err(Unopened { path, err }) if denied(&err) => {
                note_skipped(&path, &err);
                report.namespaces_skipped += 1;
                continue;
            }
            Err(Unopened { path, err }) => {
                failed += 1;
                first_failure.get_or_insert_with(|| {
                    anyhow::Error::new(err).context(format!("failed to open {}", path.display()))
                });
                continue;
            }
        };
        between();
        match apply_in(&ns, link) {
            Ok(one) => {
                report.merge(&one);
                report.namespaces += 1;
            }
            Err(err)
                if err
                    .root_cause()
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(denied) =>
            {
                note_skipped(&ns.path, &format_args!("{err:#}"));
                report.namespaces_skipped += 1;
            }
            Err(err) => {
                failed += 1;
                first_failure.get_or_insert(err);
            }
        }
    }
    if let Some(err) = first_failure {
        let what = if failed == 1 {
            "1 network namespace could not be walked".to_owned()
        } else {
            format!("{failed} network namespaces could not be walked, the first")
        };
        return Err(err.context(what));
    }
    report.elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    Ok(report)
}

/// How many namespaces that could not be entered [`note_skipped`] names at warning level.
const NAMED_SKIPS: usize = 64;

/// Says that the namespace at `path` could not be entered: at warning level the first time
/// (for the first [`NAMED_SKIPS`] of them), so an operator learns which one, and why, without
/// every pass (one at each cgroup change) saying it again; at debug level after that.
fn note_skipped(path: &Path, err: &dyn std::fmt::Display) {
    static NAMED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut named = NAMED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if named.len() < NAMED_SKIPS && !named.iter().any(|p| p == path) {
        named.push(path.to_owned());
        log::warn!(
            "cannot enter network namespace {}: {err}; passes leave its existing connections \
             as they are (new ones are enforced all the same); said once for each namespace, of \
             the first {NAMED_SKIPS}",
            path.display()
        );
    } else {
        log::debug!("skipping network namespace {}: {err}", path.display());
    }
}

/// Formats a report for the log.
pub fn describe(report: &ApplyReport) -> String {
    let released = if report.released == 0 {
        String::new()
    } else {
        format!(
            " ({} released: enforced before the agent saw their new cgroup)",
            report.released
        )
    };
    let mut about = Vec::new();
    if report.namespaces_empty != 0 {
        about.push(format!("{} without TCP sockets", report.namespaces_empty));
    }
    if report.namespaces_skipped != 0 {
        about.push(format!(
            "{} more could not be entered",
            report.namespaces_skipped
        ));
    }
    let empty = if about.is_empty() {
        String::new()
    } else {
        format!(" ({})", about.join(", "))
    };
    format!(
        "existing connections: {} updated, {} already current, {} in off cgroups{released}, {} \
         keep their own keepalive (fill), {} failed; {}{empty} in {:.1} ms",
        report.applied,
        report.unchanged,
        report.skipped_off,
        report.kept_app,
        report.failed,
        crate::logging::counted(report.namespaces, "network namespace", "network namespaces"),
        report.elapsed_us as f64 / 1000.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads like an iterator that found a million silent objects before each chunk.
    struct Throttled(Vec<&'static [u8]>, bool);

    impl Read for Throttled {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.1 = !self.1;
            if self.1 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let Some(chunk) = self.0.pop() else {
                return Ok(0);
            };
            buf[..chunk.len()].copy_from_slice(chunk);
            Ok(chunk.len())
        }
    }

    #[test]
    fn an_iterator_read_that_would_block_carries_on() {
        let mut out = Vec::new();
        read_all(&mut Throttled(vec![b"cd", b"ab"], false), &mut out).unwrap();
        assert_eq!(out, b"abcd");
    }

    #[test]
    fn reads_tcp_inuse_from_sockstat() {
        let v4 =
            "sockets: used 8\nTCP: inuse 3 orphan 0 tw 16000 alloc 5 mem 0\nUDP: inuse 0 mem 0\n";
        assert_eq!(tcp_inuse(v4, "TCP: "), Some(3));
        let v6 = "TCP6: inuse 0\nUDP6: inuse 2\n";
        assert_eq!(tcp_inuse(v6, "TCP6: "), Some(0));
        assert_eq!(tcp_inuse(v6, "TCP: "), None);
    }

    #[test]
    fn a_namespace_stays_enterable_after_the_process_it_was_found_through_exits() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test creates a network namespace: run it as root (cargo xtask test)"
        );
        let mut child = std::process::Command::new("sleep");
        child.arg("60");
        // SAFETY: unshare is async-signal-safe; the child only execs afterwards.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut child, || {
                if libc::unshare(libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = child
            .spawn()
            .expect("spawn sleep in a new network namespace");
        let path = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
        let id = netns_id(&fs::metadata(&path).expect("the child's namespace"));
        let found = foreign_namespaces()
            .expect("/proc")
            .filter_map(Result::ok)
            .find(|ns| ns.path == path);
        // The only process in the namespace exits before the namespace is entered.
        child.kill().expect("kill the child");
        child.wait().expect("reap the child");
        let ns = found.expect("the child's namespace is listed");
        let entered = in_namespace(&ns, || {
            fs::metadata("/proc/thread-self/ns/net").map(|m| netns_id(&m))
        })
        .expect("enter the namespace")
        .expect("read the namespace entered");
        assert_eq!(entered, id);
    }
}
