//! The state directory on bpffs: what is pinned where, mounting bpffs when it is missing, and
//! keeping it root-only.
//!
//! Layout under the state directory (default [`DEFAULT_STATE_DIR`]):
//!
//! ```text
//! maps-v<ABI>/KA_POLICY    policy table slot (array of maps)
//! maps-v<ABI>/KA_SOCK_SLOTS per-socket records (array addressed by the cookie and its hashes)
//! maps-v<ABI>/KA_SOCKS     per-socket records that found no free slot (hash keyed by cookie)
//! maps-v<ABI>/KA_LOCKS     policies of `lock` sockets (socket storage)
//! maps-v<ABI>/KA_LISTENERS policies set on listeners (socket storage)
//! maps-v<ABI>/KA_LISTEN_PORTS the same, by the listener's cgroup, port and network namespace
//!                              (LRU hash)
//! maps-v<ABI>/KA_UNTRACKED records of sockets the full tracking maps left out (socket storage)
//! maps-v<ABI>/KA_CGSTATS   per-cgroup counters
//! maps-v<ABI>/KA_COUNTERS  per-CPU event counters
//! maps-v<ABI>/KA_AGENT     what the agent keeps for its next start (the newest cgroup seen)
//! link_sockops             sock_ops program on the attach cgroup
//! link_lock                setsockopt program on the attach cgroup (only with `lock` policies)
//! link_status_slots        iterator over KA_SOCK_SLOTS (through its chunk map), read by `status`
//! link_status              iterator over KA_SOCKS, read by `status`
//! ```
//!
//! The links keep the programs attached with no process holding them, so enforcement outlives
//! the agent; `detach` removes them.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
pub use keepalive_common::DEFAULT_STATE_DIR;
use keepalive_common::{
    ABI_VERSION, PIN_LINK_LOCK, PIN_LINK_SOCKOPS, PIN_LINK_STATUS, PIN_LINK_STATUS_SLOTS,
};

use crate::{error::Error, sys};

/// How long a start waits for the state directory's lock, or the runtime directory's, while
/// another process holds it: a `detach` holds one for as long as it takes to unpin
/// (milliseconds), `check` the other for as long as it takes to see it is free, an agent for
/// good.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The links pinned at the top of a state directory, in the order `detach` removes them.
const LINK_PINS: [&str; 4] = [
    PIN_LINK_SOCKOPS,
    PIN_LINK_LOCK,
    PIN_LINK_STATUS_SLOTS,
    PIN_LINK_STATUS,
];

/// What a link pin is called while it is made, before it is renamed into place (bpffs refuses
/// names with a dot). An agent killed in between leaves it: it is keepalive's own.
pub const TMP_PIN_SUFFIX: &str = "_new";

/// Whether `name` belongs in a state directory: a link pin, one left at its temporary name
/// ([`TMP_PIN_SUFFIX`]), or a map directory.
fn is_own_entry(name: &std::ffi::OsStr) -> bool {
    let bytes = name.as_bytes();
    let link = bytes
        .strip_suffix(TMP_PIN_SUFFIX.as_bytes())
        .unwrap_or(bytes);
    LINK_PINS.iter().any(|pin| pin.as_bytes() == link) || is_maps_dir(name)
}

/// Whether `name` is that of a map directory, of this or any other ABI version (`maps-v*`).
fn is_maps_dir(name: &std::ffi::OsStr) -> bool {
    name.as_bytes().starts_with(b"maps-v")
}

/// What [`StateDir::try_lock`] found.
#[derive(Debug)]
pub enum Lock {
    /// The exclusive lock on the directory at the path, held for as long as the file lives.
    Held(fs::File),
    /// Another process holds the lock.
    Busy,
    /// There is no directory at the path.
    Absent,
}

/// A file's device and inode.
fn inode(meta: &fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// One agent instance's pins.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
    /// The config file and line that named it, for the refusals of [`StateDir::check_own`].
    origin: Option<(PathBuf, usize)>,
}

/// Removes the pin at `path`; whether there was one.
pub fn unpin(path: &Path) -> anyhow::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err).with_context(|| format!("failed to unpin {}", path.display())),
    }
}

impl StateDir {
    /// A state directory at `root` (not created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            origin: None,
        }
    }

    /// A state directory at `root`, as `state_dir` on `line` of the config `file` names it.
    pub fn configured(root: PathBuf, file: PathBuf, line: usize) -> Self {
        Self {
            root,
            origin: Some((file, line)),
        }
    }

    /// The state directory to use: `--state-dir` (`cli`), else `state_dir` from the config,
    /// else [`DEFAULT_STATE_DIR`]. The config is only consulted without `cli`.
    pub fn resolve(cli: Option<PathBuf>, config: impl FnOnce() -> Option<Self>) -> Self {
        cli.map(Self::new)
            .or_else(config)
            .unwrap_or_else(|| Self::new(DEFAULT_STATE_DIR))
    }

    /// A refusal of this directory: the config's error at its `state_dir` line when the config
    /// named it, else a command line's.
    fn refused(&self, reason: String) -> anyhow::Error {
        match &self.origin {
            Some((file, line)) => Error::Config {
                file: file.clone(),
                line: Some(*line),
                reason: format!("state_dir: {reason}"),
            },
            None => Error::Usage(reason),
        }
        .into()
    }

    /// Where the config named it, for messages about it: ` (state_dir at FILE:LINE)`, or
    /// nothing when a command line or the default did.
    pub fn named_at(&self) -> String {
        self.origin
            .as_ref()
            .map_or_else(String::new, |(file, line)| {
                format!(" (state_dir at {}:{line})", file.display())
            })
    }

    /// The line of the config file that named it, if one did.
    pub fn line(&self) -> Option<usize> {
        self.origin.as_ref().map(|(_, line)| *line)
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The command that removes this state, as hints name it: with `--state-dir` unless it is
    /// the default, so that a hint copied as it stands detaches this state and no other.
    pub fn detach_command(&self) -> String {
        if self.root == Path::new(DEFAULT_STATE_DIR) {
            "keepalive-agent detach".to_owned()
        } else {
            format!("keepalive-agent --state-dir {} detach", self.root.display())
        }
    }

    /// Where pinned maps live; versioned so an agent never reuses maps whose layout differs.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(format!("maps-v{ABI_VERSION}"))
    }

    /// Pin path of a map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Pin path of the sock_ops link.
    pub fn sockops_link(&self) -> PathBuf {
        self.root.join(PIN_LINK_SOCKOPS)
    }

    /// Pin path of the lock link.
    pub fn lock_link(&self) -> PathBuf {
        self.root.join(PIN_LINK_LOCK)
    }

    /// Pin path of the status iterator link over the hash of records.
    pub fn status_link(&self) -> PathBuf {
        self.root.join(PIN_LINK_STATUS)
    }

    /// Pin path of the status iterator link over the slot table of records.
    pub fn status_slots_link(&self) -> PathBuf {
        self.root.join(PIN_LINK_STATUS_SLOTS)
    }

    /// Refuses a state directory that is a mount point, such as the bpffs root
    /// `/sys/fs/bpf` itself, or that holds anything but keepalive's pins: keepalive makes its
    /// state directory root-only and `detach` empties it, which must never happen to a
    /// directory other tools share. A directory that does not exist yet is fine.
    pub fn check_own(&self) -> anyhow::Result<()> {
        self.check_own_then(&format!(
            "give a directory of its own (default {DEFAULT_STATE_DIR}), which it makes root-only"
        ))
    }

    /// [`StateDir::check_own`] for `detach`, whose refusal of a directory holding another
    /// entry says how to get on with detaching: the pins may well be keepalive's, next to
    /// something put there since.
    pub fn check_own_to_detach(&self) -> anyhow::Result<()> {
        self.check_own_then(
            "detach removes nothing from a directory that is not keepalive's alone: move that \
             entry out of it (it is not keepalive's) and run detach again",
        )
    }

    /// [`StateDir::check_own`], refusing a directory with another entry with `advice`.
    fn check_own_then(&self, advice: &str) -> anyhow::Result<()> {
        let own = format!("give a directory of its own (default {DEFAULT_STATE_DIR})");
        let dir = match fs::canonicalize(&self.root) {
            Ok(dir) => dir,
            // A pin given for the directory, or a path below one: nothing can be there.
            Err(err) if err.kind() == io::ErrorKind::NotADirectory => {
                return Err(self.refused(format!(
                    "state directory {} is below a file, not a directory; {own}",
                    self.root.display()
                )));
            }
            Err(_) => return Ok(()),
        };
        if !dir.is_dir() {
            return Err(self.refused(format!(
                "state directory {} is not a directory; {own}",
                self.root.display()
            )));
        }
        let is_mount = match (dir.parent(), fs::metadata(&dir)) {
            (Some(parent), Ok(meta)) => fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev()),
            _ => true,
        };
        if is_mount {
            return Err(self.refused(format!(
                "state directory {} is a mount point that other tools may share; give a \
                 directory of keepalive's own below it, such as {}",
                self.root.display(),
                dir.join("keepalive").display()
            )));
        }
        // Off bpffs, the bpffs check that follows says what is wrong.
        if !on_bpffs(&dir) {
            return Ok(());
        }
        let foreign = fs::read_dir(&dir)
            .with_context(|| format!("failed to read {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|entry| entry.file_name())
            .find(|name| !is_own_entry(name));
        if let Some(name) = foreign {
            return Err(self.refused(format!(
                "state directory {} holds {} and is not keepalive's own; {advice}",
                self.root.display(),
                name.to_string_lossy()
            )));
        }
        Ok(())
    }

    /// Makes sure bpffs is mounted under the state directory and creates it, root-only.
    /// Whether the directory was new.
    pub fn create(&self) -> anyhow::Result<bool> {
        ensure_bpffs(&self.root)?;
        self.check_own()?;
        let mut created = false;
        for dir in [self.root.clone(), self.maps_dir()] {
            if !dir.is_dir() {
                // With its parents, root-only too: bpffs starts empty after every boot.
                fs::DirBuilder::new()
                    .mode(0o700)
                    .recursive(true)
                    .create(&dir)
                    .map_err(|err| self.read_only(err))
                    .with_context(|| {
                        format!("failed to create state directory {}", dir.display())
                    })?;
                created |= dir == self.root;
            }
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(|err| self.read_only(err))
                .with_context(|| format!("failed to restrict {} to root", dir.display()))?;
        }
        Ok(created)
    }

    /// Makes the state directory itself (root-only, with its parents) if it is not there, as
    /// [`StateDir::create`] does; whether it was made.
    pub fn create_root(&self) -> anyhow::Result<bool> {
        if self.root.is_dir() {
            return Ok(false);
        }
        ensure_bpffs(&self.root)?;
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&self.root)
            .map_err(|err| self.read_only(err))
            .with_context(|| format!("failed to create state directory {}", self.root.display()))?;
        Ok(true)
    }

    /// `err`, or for a read-only file system the reason this state directory cannot be written
    /// though it is on bpffs (exit 5, which the unit does not retry): under the systemd unit
    /// (`ProtectSystem=strict`) everything but [`BPFFS_MOUNT`] is read-only.
    fn read_only(&self, err: std::io::Error) -> anyhow::Error {
        if err.raw_os_error() != Some(libc::EROFS) {
            return err.into();
        }
        if self.root.starts_with(BPFFS_MOUNT) {
            return Error::Bpffs(format!(
                "state directory {} is on a file system this process may only read: \
                 {BPFFS_MOUNT} is mounted read-only here (by a `ProtectKernelTunables=` \
                 drop-in, a read-only bind mount, or `readOnly:` on a pod's volume, say); the \
                 agent must be able to write it",
                self.root.display()
            ))
            .into();
        }
        Error::Bpffs(format!(
            "state directory {} is on a file system this process may only read; the systemd \
             unit (ProtectSystem=strict) leaves only {BPFFS_MOUNT} writable: choose a state \
             directory below it, or add `ReadWritePaths={}` in a drop-in (`systemctl edit \
             keepalive-agent`)",
            self.root.display(),
            self.root.display()
        ))
        .into()
    }

    /// Removes a state directory [`StateDir::create`] made, with the maps a start that failed
    /// before attaching anything pinned in it (a load that failed at its third map, say). Only
    /// for a directory this process made: what is in it is this process's.
    pub fn remove_unused(&self) {
        for pin in self.existing_pins() {
            let _ = unpin(&pin);
        }
        for dir in self.map_dirs() {
            let _ = fs::remove_dir(dir);
        }
        let _ = fs::remove_dir(&self.root);
    }

    /// Creates the state directory if need be ([`StateDir::create`]) and takes its exclusive
    /// lock for as long as the returned file lives; whether this process made the directory and
    /// found nothing pinned in it once it held the lock (what a start that fails may remove),
    /// and the lock. The lock lives on bpffs, so it also covers agents in other mount
    /// namespaces (a pod) that share the host's pins. While another process holds it, nothing
    /// is touched: it waits up to [`LOCK_WAIT`] and then fails (another agent). The holder may
    /// be a `detach`, which removes the directory before it lets go; the directory is then made
    /// and locked anew.
    pub fn create_locked(&self) -> anyhow::Result<(bool, fs::File)> {
        let deadline = Instant::now() + LOCK_WAIT;
        let mut told = false;
        // The directory this process made, by device and inode.
        let mut made = None;
        loop {
            match self.try_lock()? {
                Lock::Held(dir) => {
                    // The maps directory and the modes, now under the lock.
                    self.create()?;
                    // Made here, but another process may have locked it first, pinned, and
                    // died (an agent with another runtime directory): its pins are not this
                    // process's to remove.
                    let created = made.is_some()
                        && made == dir.metadata().ok().map(|m| inode(&m))
                        && self.existing_pins().is_empty();
                    return Ok((created, dir));
                }
                Lock::Absent => {
                    if self.create()? {
                        made = fs::metadata(&self.root).ok().map(|m| inode(&m));
                    }
                }
                Lock::Busy => {
                    if !told {
                        log::info!(
                            "state directory {} is locked by another process (a keepalive \
                             agent, or a detach removing it); waiting up to {} for it",
                            self.root.display(),
                            humantime::format_duration(LOCK_WAIT)
                        );
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if Instant::now() >= deadline {
                return Err(self.held_elsewhere());
            }
        }
    }

    /// Keeps `held`, a lock [`StateDir::create_locked`] took, on the directory at the path: when
    /// the locked one was removed and another made in its place, that one is locked instead.
    pub fn relock(&self, held: &mut fs::File) -> anyhow::Result<()> {
        if self.is_at_path(held)? {
            return Ok(());
        }
        match self.try_lock()? {
            Lock::Held(dir) => {
                *held = dir;
                Ok(())
            }
            Lock::Busy => Err(self.held_elsewhere()),
            Lock::Absent => Err(anyhow::anyhow!(
                "state directory {} was removed",
                self.root.display()
            )),
        }
    }

    /// Takes the exclusive lock on the directory at the state directory's path, unless another
    /// process holds it or there is none.
    pub fn try_lock(&self) -> anyhow::Result<Lock> {
        // A directory removed or replaced between its opening and its lock is looked up again.
        for _ in 0..10 {
            let dir = match fs::File::open(&self.root) {
                Ok(dir) => dir,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Lock::Absent),
                Err(err) => {
                    return Err(err)
                        .with_context(|| format!("failed to open {}", self.root.display()));
                }
            };
            if !sys::flock(&dir, libc::LOCK_EX | libc::LOCK_NB) {
                return Ok(Lock::Busy);
            }
            if self.is_at_path(&dir)? {
                return Ok(Lock::Held(dir));
            }
        }
        Ok(Lock::Busy)
    }

    /// Whether `dir`, opened at the state directory's path, is still the directory there.
    fn is_at_path(&self, dir: &fs::File) -> anyhow::Result<bool> {
        let held = dir
            .metadata()
            .with_context(|| format!("failed to stat {}", self.root.display()))?;
        Ok(match fs::metadata(&self.root) {
            Ok(now) => inode(&now) == inode(&held),
            Err(err) if err.kind() == io::ErrorKind::NotFound => false,
            Err(err) => {
                return Err(err).with_context(|| format!("failed to stat {}", self.root.display()));
            }
        })
    }

    /// The refusal of a start or `detach` that finds another agent holding the directory.
    pub fn held_elsewhere(&self) -> anyhow::Error {
        let who = match sys::flock_holder(&self.root) {
            Some(pid) if pid != 0 => format!(" (pid {pid})"),
            Some(_) => " (in a container: its pid is not visible here)".to_owned(),
            None => String::new(),
        };
        Error::Agent(format!(
            "another keepalive agent{who} is running with state directory {}; stop it first",
            self.root.display()
        ))
        .into()
    }

    /// Whether an agent holds the state directory now.
    pub fn is_locked(&self) -> bool {
        fs::File::open(&self.root).is_ok_and(|dir| !sys::flock(&dir, libc::LOCK_SH | libc::LOCK_NB))
    }

    /// The map directories of this and any other ABI version (`maps-v*`), sorted.
    pub fn map_dirs(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir() && p.file_name().is_some_and(is_maps_dir))
            .collect();
        dirs.sort();
        dirs
    }

    /// Every pin that exists, in the order `detach` removes them (links first).
    pub fn existing_pins(&self) -> Vec<PathBuf> {
        let mut pins: Vec<PathBuf> = LINK_PINS
            .iter()
            .flat_map(|link| [link.to_string(), format!("{link}{TMP_PIN_SUFFIX}")])
            .map(|link| self.root.join(link))
            .filter(|p| p.exists())
            .collect();
        for dir in self.map_dirs() {
            if let Ok(maps) = fs::read_dir(&dir) {
                let mut maps: Vec<PathBuf> =
                    maps.filter_map(Result::ok).map(|e| e.path()).collect();
                maps.sort();
                pins.extend(maps);
            }
        }
        pins
    }
}

/// Parses a directory the agent owns (`state_dir`, `--state-dir`, `--runtime-dir`): absolute,
/// without `..`, which could lead the bpffs checks astray, and spelled the way it is compared
/// and shown (no `.` or trailing `/`).
pub fn parse_dir(text: &str) -> Result<PathBuf, String> {
    let path = Path::new(text);
    if text.contains('\0') {
        return Err(format!(
            "{text:?} contains a NUL character, which no path can hold"
        ));
    }
    if !path.is_absolute() {
        return Err(format!("{text} is not an absolute path"));
    }
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!("{text} must not contain `..`"));
    }
    Ok(path.components().collect())
}

fn fs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statfs fills the zeroed struct; `c` is a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type)
}

/// Whether `path` (or its nearest existing ancestor) is on bpffs.
pub fn on_bpffs(path: &Path) -> bool {
    path.ancestors()
        .find(|p| p.exists())
        .and_then(|p| fs_type(p).ok())
        == Some(BPF_FS_MAGIC)
}

/// Whether `dir` is on bpffs already (`true`) or below [`BPFFS_MOUNT`], where
/// [`ensure_bpffs`] mounts it (`false`); anywhere else is an error.
pub fn bpffs_state(dir: &Path) -> Result<bool, Error> {
    if on_bpffs(dir) {
        return Ok(true);
    }
    if !dir.starts_with(BPFFS_MOUNT) {
        return Err(Error::Bpffs(format!(
            "state directory {} is not on a bpf filesystem; choose one below {BPFFS_MOUNT} or \
             mount bpffs there (`mount -t bpf bpf <dir>`)",
            dir.display()
        )));
    }
    Ok(false)
}

/// Makes sure `dir` is on bpffs, mounting bpffs at [`BPFFS_MOUNT`] when the directory is
/// below it and nothing is mounted there yet, unless that mount would stay in this mount
/// namespace (see [`stays_in_namespace`]).
pub fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    if bpffs_state(dir)? {
        return Ok(());
    }
    if let Some(mount) = mount_stays_in_namespace() {
        return Err(Error::Bpffs(format!(
            "bpffs is not mounted at {BPFFS_MOUNT}, and a bpffs mounted there now would stay in \
             this mount namespace ({mount} receives mounts from another one but passes none \
             back, as in a container): the pins, and enforcement with \
             them, would end with it. Mount it where the host has it (`mount -t bpf bpf \
             {BPFFS_MOUNT}` on the host) and give this one the host's {BPFFS_MOUNT}"
        ))
        .into());
    }
    let target = CString::new(BPFFS_MOUNT).expect("no NUL");
    let fstype = CString::new("bpf").expect("no NUL");
    let options = CString::new("mode=0700").expect("no NUL");
    // SAFETY: all pointers are valid C strings for the duration of the call.
    let ret = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if ret != 0 {
        let err = io::Error::last_os_error();
        return Err(Error::Bpffs(format!(
            "bpffs is not mounted at {BPFFS_MOUNT} and mounting it failed: {err}; mount it with \
             `mount -t bpf bpf {BPFFS_MOUNT}` (in a container, bind-mount the host's \
             {BPFFS_MOUNT})"
        ))
        .into());
    }
    log::info!("mounted bpffs at {BPFFS_MOUNT}");
    Ok(())
}

/// [`stays_in_namespace`] for [`BPFFS_MOUNT`] in this process's mount namespace.
pub fn mount_stays_in_namespace() -> Option<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    stays_in_namespace(&mountinfo, Path::new(BPFFS_MOUNT))
}

/// The mount point of the mount `path` is on, if a mount made at `path` would stay in this
/// mount namespace: that mount is a slave (`master:` in `/proc/self/mountinfo`), which receives
/// the mounts of its master's namespace but passes none back, and not shared as well (no
/// `shared:`). That is a container's view of the host's directory with `HostToContainer`
/// propagation. A mount both shared and a slave (a systemd service's sandbox, or the root of
/// some container hosts) passes mounts on to its peers, and is not refused; the shipped unit
/// may not mount anything anyway. A private mount (neither) can be the host's
/// own: nothing tells it from a container's with this file alone, so it is not refused.
fn stays_in_namespace(mountinfo: &str, path: &Path) -> Option<String> {
    // The deepest mount point at or above `path`; of several there, the last mounted.
    let mut on: Option<(usize, &str, Vec<&str>)> = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional fields...] - type ...
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(point) = fields.get(4).copied() else {
            continue;
        };
        if !path.starts_with(point) {
            continue;
        }
        let depth = Path::new(point).components().count();
        if on.as_ref().is_some_and(|(deepest, ..)| *deepest > depth) {
            continue;
        }
        let tags = fields
            .iter()
            .skip(6)
            .take_while(|field| **field != "-")
            .copied()
            .collect();
        on = Some((depth, point, tags));
    }
    let (_, point, tags) = on?;
    let tagged = |prefix: &str| tags.iter().any(|tag| tag.starts_with(prefix));
    (tagged("master:") && !tagged("shared:")).then(|| point.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_on_a_slave_stays_in_the_namespace() {
        let bpf = Path::new(BPFFS_MOUNT);
        let host = "23 27 0:22 / /sys rw,relatime shared:7 - sysfs sysfs rw\n";
        let slave = "23 27 0:22 / /sys rw,relatime master:7 - sysfs sysfs rw\n";
        let both = "23 27 0:22 / /sys rw,relatime shared:9 master:7 - sysfs sysfs rw\n";
        let private = "23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n";
        assert_eq!(stays_in_namespace(host, bpf), None);
        assert_eq!(stays_in_namespace(slave, bpf), Some("/sys".to_owned()));
        assert_eq!(stays_in_namespace(both, bpf), None);
        assert_eq!(stays_in_namespace(private, bpf), None);
        // The deepest mount decides, and of two at one point the later.
        let deeper = format!("{slave}42 23 0:39 / /sys/fs rw - tmpfs tmpfs rw\n");
        assert_eq!(stays_in_namespace(&deeper, bpf), None);
        let over = format!("{host}44 23 0:40 / /sys rw master:3 - sysfs sysfs rw\n");
        assert_eq!(stays_in_namespace(&over, bpf), Some("/sys".to_owned()));
        // `/sys/fs/bpfx` is not above `/sys/fs/bpf`.
        let sibling = format!("{host}45 23 0:41 / /sys/fs/bpfx rw master:3 - tmpfs t rw\n");
        assert_eq!(stays_in_namespace(&sibling, bpf), None);
    }

    #[test]
    fn directories_are_absolute_without_dot_dot_and_spelled_one_way() {
        assert_eq!(
            parse_dir("/sys/fs/bpf/./keepalive/").unwrap(),
            PathBuf::from("/sys/fs/bpf/keepalive")
        );
        assert!(parse_dir("keepalive").unwrap_err().contains("absolute"));
        assert!(parse_dir("/sys/fs/bpf/a\0b").unwrap_err().contains("NUL"));
    }

    #[test]
    fn hints_detach_this_state() {
        assert_eq!(
            StateDir::new(DEFAULT_STATE_DIR).detach_command(),
            "keepalive-agent detach"
        );
        assert_eq!(
            StateDir::new("/sys/fs/bpf/other").detach_command(),
            "keepalive-agent --state-dir /sys/fs/bpf/other detach"
        );
        assert!(
            parse_dir("/sys/fs/bpf/../../tmp/ka")
                .unwrap_err()
                .contains("`..`")
        );
    }
}
