//! Following cgroups as they are created and removed, with inotify on every cgroup directory
//! below the attach cgroup. The agent sleeps in the kernel until something changes; there is
//! no polling while inotify can be had (see [`Follower`] for when it cannot).

use std::{
    collections::HashMap,
    io,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::io::{Interest, unix::AsyncFd};

use crate::cgroup::{Cgroup2, CgroupPath};

/// What changed since the last call.
#[derive(Debug, Default)]
pub struct Changes {
    /// Whether cgroups appeared (including ones below a new cgroup).
    pub created: bool,
    /// Ids of the cgroups that disappeared.
    pub removed: Vec<u64>,
    /// The watched root itself was removed.
    pub root_removed: bool,
    /// Changes may have gone unseen: inotify ran short, and a try to watch what it could not
    /// was made (whether or not it worked). Anything may have changed since, and `removed`
    /// does not say what went.
    pub unseen: bool,
}

impl Changes {
    /// Whether anything changed.
    pub fn is_empty(&self) -> bool {
        !self.created && self.removed.is_empty() && !self.root_removed && !self.unseen
    }

    /// What a try to watch, after inotify ran short, reports: anything may have changed.
    fn unseen() -> Self {
        Self {
            created: true,
            unseen: true,
            ..Self::default()
        }
    }
}

/// How much of a subtree is followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Following {
    /// Every cgroup is watched.
    All,
    /// Some cgroups could not be watched for a shortage (inotify watches, memory): cgroups
    /// created below them are seen only at the next try to watch them.
    Partly,
    /// Not even the root could be watched (no inotify instance, or no watch for the root).
    Nothing,
}

/// Follows a cgroup subtree with a [`CgroupWatcher`], and goes on without one while inotify
/// cannot be had ([`is_shortage`]): at start, when every inotify instance or watch the user may
/// have is taken (root's 128 instances by default, shared by every root process and container
/// on the host) or memory is short. Enforcement does not need inotify, only following cgroups
/// as they come and go does, so the agent enforces what it resolved and tries again, waiting
/// longer after each failure. Each try reports [`Changes::unseen`], for the agent to catch up
/// with what it could not see, so a cgroup created meanwhile gets its policy at the next try.
/// Each try also looks for the root, whose removal nothing
/// else reports meanwhile. Cgroups below the root that a shortage left unwatched (at the watch
/// limit, `fs.inotify.max_user_watches`) are tried again the same way.
pub struct Follower {
    cgroup2: Cgroup2,
    root: CgroupPath,
    /// The root's id when following began: another id later means the root was removed and
    /// created again while nothing watched it.
    root_id: u64,
    watcher: Option<CgroupWatcher>,
    /// Whether the watcher left cgroups unwatched and a try to watch them is scheduled.
    partly: bool,
    /// Failed tries in a row, and when the next is due.
    failures: u32,
    retry_at: Instant,
    wait: fn(u32) -> Duration,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("watcher", &self.watcher)
            .field("partly", &self.partly)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// Starts following `root`, whose id is `root_id`. Without inotify, the warning says why
    /// and what it means; `wait(n)` is the wait after n + 1 failed tries in a row. Fails on
    /// what is no shortage (the root's parent cannot be watched, say), also when a shortage
    /// came first and the parent or the root may not be read, which a watch would need.
    pub fn new(
        cgroup2: &Cgroup2,
        root: &CgroupPath,
        root_id: u64,
        wait: fn(u32) -> Duration,
    ) -> io::Result<Self> {
        let mut follower = Self {
            cgroup2: cgroup2.clone(),
            root: root.clone(),
            root_id,
            watcher: None,
            partly: false,
            failures: 0,
            retry_at: Instant::now(),
            wait,
        };
        match CgroupWatcher::new(cgroup2, root) {
            Ok(watcher) => follower.adopt(watcher),
            Err(err) if !is_shortage(&err) => return Err(err),
            Err(err) => {
                let parent = root.split_last().map(|(parent, _)| parent);
                for cgroup in parent.iter().chain([root]) {
                    if let Some(denied) = unreadable(&cgroup2.abs(cgroup)) {
                        return Err(denied);
                    }
                }
                let wait = follower.failed();
                log::warn!(
                    "cannot watch cgroups below {root} with inotify: {err}{}; enforcing the \
                     policy as resolved now, but cgroups created or removed from here on are \
                     seen only at each try to watch them (the next in {}, then less often, up \
                     to every {})",
                    limit_hint(&err),
                    humantime::format_duration(wait),
                    humantime::format_duration((follower.wait)(u32::MAX))
                );
            }
        }
        Ok(follower)
    }

    /// How much of the subtree is watched now.
    pub fn following(&self) -> Following {
        match &self.watcher {
            None => Following::Nothing,
            Some(watcher) if watcher.missed.is_some() => Following::Partly,
            Some(_) => Following::All,
        }
    }

    /// Number of directories watched.
    pub fn len(&self) -> usize {
        self.watcher.as_ref().map_or(0, CgroupWatcher::len)
    }

    /// Whether nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Schedules the next try after a failed one; returns the wait.
    fn failed(&mut self) -> Duration {
        let wait = (self.wait)(self.failures);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Instant::now() + wait;
        wait
    }

    /// Takes `watcher` on, and schedules a try for the cgroups it left unwatched.
    fn adopt(&mut self, watcher: CgroupWatcher) {
        self.watcher = Some(watcher);
        self.failures = 0;
        self.note_missed();
    }

    /// After a walk of the watcher: when it newly left cgroups unwatched, warns and schedules
    /// the first try to watch them.
    fn note_missed(&mut self) {
        let Some((path, err)) = self.watcher.as_ref().and_then(|w| w.missed.as_ref()) else {
            return;
        };
        if self.partly {
            return;
        }
        let reason = format!(
            "cannot watch cgroup {path} with inotify: {err}{}",
            limit_hint(err)
        );
        self.partly = true;
        self.failures = 0;
        let wait = self.failed();
        log::warn!(
            "{reason}; cgroups created or removed below it, or below any other cgroup left \
             unwatched, are seen only at each try to watch them (the next in {}, then less \
             often, up to every {})",
            humantime::format_duration(wait),
            humantime::format_duration((self.wait)(u32::MAX))
        );
    }

    /// Waits for the next batch of changes; while inotify runs short, for the next try to
    /// watch what it could not, which reports [`Changes::unseen`] whatever it got. Cancel-safe:
    /// nothing awaited holds state of its own.
    pub async fn changes(&mut self) -> io::Result<Changes> {
        let Some(watcher) = &mut self.watcher else {
            return self.watch_again().await;
        };
        if !self.partly {
            let changes = watcher.changes().await;
            self.note_missed();
            return changes;
        }
        tokio::select! {
            changes = watcher.changes() => return changes,
            () = tokio::time::sleep_until(self.retry_at.into()) => {}
        }
        Ok(self.watch_missed())
    }

    /// Waits for the next try to get a watcher, and makes it.
    async fn watch_again(&mut self) -> io::Result<Changes> {
        tokio::time::sleep_until(self.retry_at.into()).await;
        let tried = CgroupWatcher::new(&self.cgroup2, &self.root);
        // Whatever the try gave: a watch of another cgroup by the root's name is no
        // resumption, and a root that is gone is no reason to keep trying.
        if self.cgroup2.id(&self.root).ok() != Some(self.root_id) {
            return Ok(Changes {
                root_removed: true,
                ..Changes::default()
            });
        }
        match tried {
            Ok(watcher) => {
                log::info!(
                    "watching cgroups below {} with inotify again, after {}",
                    self.root,
                    failed_tries(self.failures)
                );
                self.adopt(watcher);
            }
            Err(err) if !is_shortage(&err) => return Err(err),
            Err(err) => {
                let wait = self.failed();
                log::debug!(
                    "still cannot watch cgroups below {} with inotify: {err}; catching up with \
                     the cgroups created and removed meanwhile, and trying again in {}",
                    self.root,
                    humantime::format_duration(wait)
                );
            }
        }
        Ok(Changes::unseen())
    }

    /// Tries again to watch the cgroups a shortage left unwatched.
    fn watch_missed(&mut self) -> Changes {
        let Some(watcher) = self.watcher.as_mut() else {
            return Changes::unseen();
        };
        watcher.watch_missed();
        match &watcher.missed {
            Some((path, err)) => {
                let message = format!("still cannot watch cgroup {path} with inotify: {err}");
                // Less often even when the try got some: at the limit for good, watches that
                // removed cgroups free are taken at each try, and the catch-up each try brings
                // walks every cgroup.
                let wait = self.failed();
                log::debug!(
                    "{message}; catching up with the cgroups created and removed meanwhile, and \
                     trying again in {}",
                    humantime::format_duration(wait)
                );
            }
            None => {
                log::info!(
                    "watching every cgroup below {} with inotify again, after {}",
                    self.root,
                    failed_tries(self.failures)
                );
                self.partly = false;
                self.failures = 0;
            }
        }
        Changes::unseen()
    }
}

/// EACCES when this process may not read `dir` (its effective ids and capabilities, as an
/// inotify watch checks).
fn unreadable(dir: &std::path::Path) -> Option<io::Error> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a NUL-terminated path and plain flags.
    let ret =
        unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), libc::R_OK, libc::AT_EACCESS) };
    let err = io::Error::last_os_error();
    (ret != 0 && err.kind() == io::ErrorKind::PermissionDenied).then_some(err)
}

/// "1 failed try", "2 failed tries": for the log line that ends a shortage.
pub fn failed_tries(n: u32) -> String {
    if n == 1 {
        "1 failed try".to_owned()
    } else {
        format!("{n} failed tries")
    }
}

/// Whether `err` is a resource running out, which passes, rather than a fault: inotify
/// instances or descriptors (EMFILE, ENFILE), watches (ENOSPC) or memory (ENOMEM).
pub fn is_shortage(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOSPC | libc::ENOMEM)
    )
}

/// What to raise when `err` is an inotify limit.
pub fn limit_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EMFILE) => {
            " (every inotify instance this user may have is taken, by any of its processes: \
             raise fs.inotify.max_user_instances; or this process has every file descriptor \
             it may)"
        }
        Some(libc::ENOSPC) => {
            " (the inotify watches this user may have are all taken: raise \
             fs.inotify.max_user_watches)"
        }
        _ => "",
    }
}

/// The inotify watches that processes of user `uid` hold, but for process `except` (a running
/// agent's, which its restart gives back): the user has `fs.inotify.max_user_watches` less
/// these left. The watches of processes in user namespaces below this one count for the
/// namespaces' owners, as the kernel charges them. An instance that processes share (a
/// descriptor inherited across fork, which is rare) counts for each: nothing here tells a
/// shared one from two that watch the same. Returns the watches and how many of the user's
/// processes could not be read (they may hold more). Reads every process's descriptors: for
/// `check`, not for the agent's own use.
pub fn watches_held(uid: u32, except: Option<u32>) -> (usize, usize) {
    let (Ok(procs), Ok(own_ns)) = (
        std::fs::read_dir("/proc"),
        std::fs::metadata("/proc/self/ns/user"),
    ) else {
        return (0, 0);
    };
    let own_ns = own_ns.ino();
    let readable = |err: &io::Error| err.kind() == io::ErrorKind::NotFound;
    let (mut held, mut unread) = (0, 0);
    for proc in procs.filter_map(Result::ok) {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if Some(pid) == except {
            continue;
        }
        match charged_uid(pid, own_ns) {
            Ok(charged) if charged == Some(uid) => {}
            Ok(_) => continue,
            // Gone meanwhile.
            Err(err) if readable(&err) => continue,
            // Not this process's to follow (no ptrace access): unread, when it runs as the user.
            Err(_) => {
                unread += usize::from(effective_uid(pid) == Some(uid));
                continue;
            }
        }
        let fds = match std::fs::read_dir(proc.path().join("fd")) {
            Ok(fds) => fds,
            Err(err) => {
                unread += usize::from(!readable(&err));
                continue;
            }
        };
        let mut unreadable = false;
        for fd in fds.filter_map(Result::ok) {
            match std::fs::read_link(fd.path()) {
                Ok(target) if target.as_os_str() == "anon_inode:inotify" => {}
                Ok(_) => continue,
                Err(err) => {
                    unreadable |= !readable(&err);
                    continue;
                }
            }
            match std::fs::read_to_string(proc.path().join("fdinfo").join(fd.file_name())) {
                Ok(info) => {
                    held += info
                        .lines()
                        .filter(|line| line.starts_with("inotify wd:"))
                        .count();
                }
                Err(err) => unreadable |= !readable(&err),
            }
        }
        unread += usize::from(unreadable);
    }
    (held, unread)
}

/// The effective user id of process `pid` (`/proc/PID/status`, which anyone may read).
fn effective_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    ids.split_whitespace().nth(1)?.parse().ok()
}

/// The inotify instances process `pid` holds that count against user `uid`'s
/// `max_user_instances` (0 when it cannot be read): for `check`, of the running agent, whose
/// instances a restart gives back.
pub fn instances_held(pid: u32, uid: u32) -> usize {
    let Ok(own_ns) = std::fs::metadata("/proc/self/ns/user") else {
        return 0;
    };
    if !matches!(charged_uid(pid, own_ns.ino()), Ok(Some(charged)) if charged == uid) {
        return 0;
    }
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |fds| {
        fds.filter_map(Result::ok)
            .filter(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| target.as_os_str() == "anon_inode:inotify")
            })
            .count()
    })
}

/// The user of this user namespace (whose inode is `own_ns`) that the inotify watches of
/// process `pid` count for: its effective user (as when it made its instances; processes
/// rarely change it since), or for a process in a user namespace below this one, the owner of
/// the namespace on its way up whose parent this one is (`None` for a namespace elsewhere).
/// The kernel charges a namespace's watches to its owner in the parent namespace too, up to
/// the initial one. An error when the process's namespace cannot be looked at.
fn charged_uid(pid: u32, own_ns: u64) -> io::Result<Option<u32>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};

    let path = format!("/proc/{pid}/ns/user");
    if std::fs::metadata(&path)?.ino() == own_ns {
        return Ok(effective_uid(pid));
    }
    let mut ns = std::fs::File::open(&path)?;
    loop {
        // SAFETY: NS_GET_PARENT takes no argument and returns a new descriptor, or fails
        // (EPERM above the caller's own namespace: not below this one).
        let parent = unsafe { libc::ioctl(ns.as_raw_fd(), libc::NS_GET_PARENT) };
        if parent < 0 {
            return Ok(None);
        }
        // SAFETY: the descriptor is new and owned by nothing else.
        let parent = unsafe { std::fs::File::from_raw_fd(parent) };
        if parent.metadata()?.ino() == own_ns {
            let mut owner: libc::uid_t = 0;
            // SAFETY: NS_GET_OWNER_UID writes one uid_t.
            let ret =
                unsafe { libc::ioctl(ns.as_raw_fd(), libc::NS_GET_OWNER_UID, &raw mut owner) };
            return Ok((ret == 0).then_some(owner));
        }
        ns = parent;
    }
}

/// Watches a cgroup subtree.
pub struct CgroupWatcher {
    cgroup2: Cgroup2,
    root: CgroupPath,
    inotify: AsyncFd<Inotify>,
    by_wd: HashMap<WatchDescriptor, (CgroupPath, u64)>,
    by_path: HashMap<CgroupPath, WatchDescriptor>,
    /// The watch on the root's parent, which alone reports the root's removal (the agent holds
    /// the root open, so the root's own watch hears nothing of it), and the root's name there.
    parent: Option<(WatchDescriptor, String)>,
    /// The first cgroup a walk could not watch for a shortage, and why, since the last try
    /// to watch them all (`watch_missed`).
    missed: Option<(CgroupPath, io::Error)>,
}

impl std::fmt::Debug for CgroupWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CgroupWatcher")
            .field("root", &self.root)
            .field("watches", &self.by_wd.len())
            .finish_non_exhaustive()
    }
}

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ONLYDIR);

impl CgroupWatcher {
    /// Starts watching `root` and every cgroup below it.
    pub fn new(cgroup2: &Cgroup2, root: &CgroupPath) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        let mut watcher = Self {
            cgroup2: cgroup2.clone(),
            root: root.clone(),
            // SAFETY: the inotify instance owns its fd, which stays open until the AsyncFd is
            // dropped.
            inotify: unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
                .map_err(|err| err.into_parts().1)?,
            by_wd: HashMap::new(),
            by_path: HashMap::new(),
            parent: None,
            missed: None,
        };
        if let Some((parent, name)) = root.split_last() {
            let wd = watcher.inotify.get_mut().watches().add(
                cgroup2.abs(&parent),
                WatchMask::DELETE
                    .union(WatchMask::MOVED_FROM)
                    .union(WatchMask::ONLYDIR),
            )?;
            watcher.parent = Some((wd, name.to_owned()));
        }
        // The root's own watch must hold: without it nothing would be followed. Those below
        // it may fail one by one (see `add_tree`).
        let id = cgroup2.id(root)?;
        let wd = watcher
            .inotify
            .get_mut()
            .watches()
            .add(cgroup2.abs(root), MASK)?;
        watcher.by_wd.insert(wd.clone(), (root.clone(), id));
        watcher.by_path.insert(root.clone(), wd);
        watcher.add_tree(root);
        Ok(watcher)
    }

    /// Number of directories watched.
    pub fn len(&self) -> usize {
        self.by_wd.len()
    }

    /// Whether nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.by_wd.is_empty()
    }

    /// Watches `top` and everything below it; returns whether any cgroup was new. Each
    /// directory is watched before it is listed, so a child created in between is either in
    /// the listing or reported by the watch. A cgroup that cannot be watched (at the watch
    /// limit, or one root may not read) is new all the same: its own policy must go in, only
    /// what is created below it later goes unseen; a shortage is noted in `missed`, for a
    /// later try.
    fn add_tree(&mut self, top: &CgroupPath) -> bool {
        let mut created = false;
        let mut stack = vec![top.clone()];
        while let Some(path) = stack.pop() {
            if !self.by_path.contains_key(&path) {
                let Ok(id) = self.cgroup2.id(&path) else {
                    continue;
                };
                match self
                    .inotify
                    .get_mut()
                    .watches()
                    .add(self.cgroup2.abs(&path), MASK)
                {
                    Ok(wd) => {
                        self.by_wd.insert(wd.clone(), (path.clone(), id));
                        self.by_path.insert(path.clone(), wd);
                        created = true;
                    }
                    Err(err) if is_shortage(&err) => {
                        created = true;
                        self.missed.get_or_insert((path, err));
                        continue;
                    }
                    Err(err) => {
                        log::debug!("cannot watch cgroup {path}: {err}");
                        created = true;
                        continue;
                    }
                }
            }
            for child in self.cgroup2.children(&path) {
                stack.push(path.join(&child));
            }
        }
        created
    }

    /// Tries again to watch the cgroups that walks left unwatched for a shortage, and whatever
    /// is below them now. `missed` then says whether some are still left.
    fn watch_missed(&mut self) {
        self.missed = None;
        let root = self.root.clone();
        self.add_tree(&root);
    }

    /// After lost events: forgets cgroups that are gone, also those created again under the
    /// same name meanwhile (a restarted unit's), and watches new ones.
    fn rescan(&mut self, changes: &mut Changes) {
        let gone: Vec<CgroupPath> = self
            .by_path
            .iter()
            .filter(|(path, wd)| {
                let known = self.by_wd.get(*wd).map(|(_, id)| *id);
                self.cgroup2.id(path).ok() != known
            })
            .map(|(path, _)| path.clone())
            .collect();
        // The root created again is another cgroup, without the agent's attachment.
        changes.root_removed |= gone.contains(&self.root);
        for path in gone {
            self.forget_tree(&path, &mut changes.removed);
        }
        let root = self.root.clone();
        changes.created |= self.add_tree(&root);
    }

    /// Whether the cgroup watched at `path` is the one there now. A cgroup removed and created
    /// again under its name within one read of events is watched as the new one when its first
    /// creation is handled, so the removal that follows is an older one's, not the watched
    /// cgroup's.
    fn watches_current(&self, path: &CgroupPath) -> bool {
        let watched = self
            .by_path
            .get(path)
            .and_then(|wd| self.by_wd.get(wd))
            .map(|(_, id)| *id);
        watched.is_some() && self.cgroup2.id(path).ok() == watched
    }

    fn forget_tree(&mut self, top: &CgroupPath, removed: &mut Vec<u64>) {
        let gone: Vec<CgroupPath> = self
            .by_path
            .keys()
            .filter(|p| p.is_within(top))
            .cloned()
            .collect();
        for path in gone {
            if let Some(wd) = self.by_path.remove(&path)
                && let Some((_, id)) = self.by_wd.remove(&wd)
            {
                // The kernel drops the watch of a removed directory by itself.
                let _ = self.inotify.get_mut().watches().remove(wd);
                removed.push(id);
            }
        }
    }

    /// Waits for the next batch of changes.
    pub async fn changes(&mut self) -> io::Result<Changes> {
        let mut buffer = [0u8; 8192];
        loop {
            let mut guard = self.inotify.readable_mut().await?;
            let mut raw = Vec::new();
            let read = guard.try_io(|inner| {
                let events = inner.get_mut().read_events(&mut buffer)?;
                for event in events {
                    raw.push((
                        event.wd.clone(),
                        event.mask,
                        event.name.and_then(|n| n.to_str().map(str::to_owned)),
                    ));
                }
                Ok(())
            });
            match read {
                Ok(Ok(())) => {}
                Ok(Err(err)) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
            let mut changes = Changes::default();
            for (wd, mask, name) in raw {
                if mask.contains(EventMask::Q_OVERFLOW) {
                    // Events were lost: compare with what is there now.
                    self.rescan(&mut changes);
                    continue;
                }
                if let Some((parent, root)) = &self.parent
                    && *parent == wd
                {
                    // Siblings of the root come and go here too; only the root matters.
                    changes.root_removed |= name.as_ref() == Some(root);
                    continue;
                }
                let Some((parent, _)) = self.by_wd.get(&wd).cloned() else {
                    continue;
                };
                let Some(name) = name else {
                    continue;
                };
                if !mask.contains(EventMask::ISDIR) {
                    continue;
                }
                let child = parent.join(&name);
                if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                    changes.created |= self.add_tree(&child);
                } else if mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM)
                    && !self.watches_current(&child)
                {
                    self.forget_tree(&child, &mut changes.removed);
                }
            }
            if !self.cgroup2.abs(&self.root).exists() {
                changes.root_removed = true;
            }
            if !changes.is_empty() {
                return Ok(changes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn the_end_of_a_shortage_counts_its_failed_tries_in_words() {
        assert_eq!(failed_tries(1), "1 failed try");
        assert_eq!(failed_tries(3), "3 failed tries");
    }

    #[tokio::test]
    async fn a_rescan_follows_a_cgroup_created_again_under_the_same_name() {
        // tmpfs, whose inode numbers are not reused at once, as cgroup ids never are.
        let dir = std::path::Path::new("/dev/shm").join(format!("ka-watch-{}", std::process::id()));
        fs::create_dir_all(dir.join("root/a")).unwrap();
        let cgroup2 = Cgroup2::at(&dir);
        let root = cgroup2.parse("root").unwrap();
        let a = cgroup2.parse("root/a").unwrap();
        let mut watcher = CgroupWatcher::new(&cgroup2, &root).unwrap();
        let old = cgroup2.id(&a).unwrap();
        // Removed and created again while the events were lost (IN_Q_OVERFLOW).
        fs::remove_dir(dir.join("root/a")).unwrap();
        fs::create_dir(dir.join("root/a")).unwrap();
        let new = cgroup2.id(&a).unwrap();
        let mut changes = Changes::default();
        watcher.rescan(&mut changes);
        let watched = watcher
            .by_path
            .get(&a)
            .and_then(|wd| watcher.by_wd.get(wd))
            .map(|(_, id)| *id);
        fs::remove_dir_all(&dir).unwrap();
        assert_ne!(old, new, "a new directory, a new inode");
        assert_eq!(changes.removed, vec![old]);
        assert!(changes.created);
        assert_eq!(watched, Some(new), "the new directory is the one watched");
    }

    /// A scratch tree under /dev/shm with `root/a`, watched from `root`.
    fn scratch(name: &str) -> (std::path::PathBuf, Cgroup2, CgroupPath, CgroupWatcher) {
        let dir = std::path::Path::new("/dev/shm")
            .join(format!("ka-watch-{name}-{}", std::process::id()));
        fs::create_dir_all(dir.join("root/a")).unwrap();
        let cgroup2 = Cgroup2::at(&dir);
        let root = cgroup2.parse("root").unwrap();
        let watcher = CgroupWatcher::new(&cgroup2, &root).unwrap();
        (dir, cgroup2, root, watcher)
    }

    #[tokio::test]
    async fn a_cgroup_created_removed_and_created_again_in_one_read_stays_followed() {
        let (dir, cgroup2, _, mut watcher) = scratch("again");
        let b = cgroup2.parse("root/b").unwrap();
        // Three events that one read returns: the first creation is handled when the second
        // directory is already there.
        fs::create_dir(dir.join("root/b")).unwrap();
        fs::remove_dir(dir.join("root/b")).unwrap();
        fs::create_dir(dir.join("root/b")).unwrap();
        let live = cgroup2.id(&b).unwrap();
        let changes = watcher.changes().await.unwrap();
        let watched = watcher.watches_current(&b);
        fs::remove_dir_all(&dir).unwrap();
        assert!(changes.created);
        assert!(
            !changes.removed.contains(&live),
            "the live cgroup is not removed: {changes:?}"
        );
        assert!(watched, "and it is watched");
    }

    #[tokio::test]
    async fn a_root_created_again_while_events_were_lost_is_removed() {
        let (dir, _, _, mut watcher) = scratch("root");
        fs::remove_dir_all(dir.join("root")).unwrap();
        fs::create_dir(dir.join("root")).unwrap();
        let mut changes = Changes::default();
        watcher.rescan(&mut changes);
        fs::remove_dir_all(&dir).unwrap();
        assert!(changes.root_removed, "{changes:?}");
    }
}
