//! One agent per runtime directory: an flock on `<runtime>/agent.lock` that names the holder's
//! pid, and the check `detach` uses to refuse while an agent runs. (The state directory on
//! bpffs has a lock of its own, see `pin::StateDir::lock`.)

use std::{
    fs::{self, File},
    io::{Read as _, Seek as _, Write as _},
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::{control, error::Error, sys};

/// The lock file that keeps two agents off the same runtime directory.
pub const LOCK_NAME: &str = "agent.lock";

/// Holds an exclusive flock on the runtime directory's lock file for the agent's lifetime.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

/// Creates the runtime directory root-only, or makes an existing one so. A directory holding
/// anything but keepalive's own files is refused instead: making a shared directory such as
/// `/run` root-only would lock other services out of it. So is one another user could change
/// (see [`untrusted`]), before anything is created in it.
fn prepare(runtime_dir: &Path) -> anyhow::Result<()> {
    if let Some(file) = not_a_directory(runtime_dir) {
        return Err(Error::Usage(format!(
            "runtime directory {}: {} is not a directory; give the agent a directory of its \
             own (default /run/keepalive-agent)",
            runtime_dir.display(),
            file.display()
        ))
        .into());
    }
    let why = untrusted(runtime_dir, Leaf::MadeRootOnly)
        .with_context(|| format!("failed to read {}", runtime_dir.display()))?;
    if let Some(why) = why {
        return Err(Error::Usage(format!(
            "runtime directory {}: {why}, so another user could replace the agent's control \
             socket or lock file; give the agent a directory only root can change (default \
             /run/keepalive-agent)",
            runtime_dir.display(),
        ))
        .into());
    }
    // No other user can change what is above it.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(runtime_dir)
        .with_context(|| format!("failed to create {}", runtime_dir.display()))?;
    // In a sticky directory such as /tmp, another user may have made it in between.
    if let Some(why) = untrusted(runtime_dir, Leaf::MadeRootOnly)
        .with_context(|| format!("failed to read {}", runtime_dir.display()))?
    {
        return Err(Error::Usage(format!(
            "runtime directory {}: {why}, made by another user while this one checked it; \
             give the agent a directory only root can change (default /run/keepalive-agent)",
            runtime_dir.display(),
        ))
        .into());
    }
    let other = foreign_entry(runtime_dir)
        .with_context(|| format!("failed to read {}", runtime_dir.display()))?;
    if let Some(other) = other {
        return Err(Error::Usage(format!(
            "runtime directory {} holds {other} and is not keepalive's own; give the agent a \
             directory of its own (default /run/keepalive-agent), which it makes root-only",
            runtime_dir.display(),
        ))
        .into());
    }
    fs::set_permissions(runtime_dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("failed to restrict {} to root", runtime_dir.display()))
}

/// What on the way to `runtime_dir`, itself included, exists and is not a directory, if anything
/// does: no directory can be made there.
pub fn not_a_directory(runtime_dir: &Path) -> Option<&Path> {
    runtime_dir
        .ancestors()
        .find(|path| path.exists())
        .filter(|path| !path.is_dir())
}

/// How [`untrusted`] takes the runtime directory's own mode.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// As `run` leaves it: only its owner may write to it.
    AsIs,
    /// About to be made root-only by `run`, so its mode does not matter yet.
    MadeRootOnly,
}

/// Why `runtime_dir` cannot be trusted with the agent's lock file and control socket, if it
/// cannot: it or a directory above it belongs to another user than root and this process's,
/// or other users may write to one of them (a sticky one above it, such as `/tmp`, excepted),
/// and could then replace what it holds. A directory that does not exist yet is judged by
/// those above it.
pub fn untrusted(runtime_dir: &Path, leaf: Leaf) -> std::io::Result<Option<String>> {
    // The nearest directory that exists, and how many levels below it `runtime_dir` is.
    let mut missing = 0;
    let mut existing = runtime_dir;
    let dir = loop {
        match fs::canonicalize(existing) {
            Ok(dir) => break dir,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                existing = existing.parent().ok_or(err)?;
                missing += 1;
            }
            Err(err) => return Err(err),
        }
    };
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    for (depth, path) in dir.ancestors().enumerate() {
        let depth = depth + missing;
        let meta = fs::metadata(path)?;
        if meta.uid() != 0 && meta.uid() != euid {
            return Ok(Some(format!(
                "{} belongs to uid {}",
                path.display(),
                meta.uid()
            )));
        }
        let mode = meta.mode();
        let checked = depth > 0 || leaf == Leaf::AsIs;
        let sticky = depth > 0 && mode & libc::S_ISVTX != 0;
        if checked && mode & 0o022 != 0 && !sticky {
            return Ok(Some(format!(
                "users other than its owner may write to {} (mode {:04o})",
                path.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(None)
}

/// The name of an entry in `runtime_dir` that is not keepalive's, if it holds one.
pub fn foreign_entry(runtime_dir: &Path) -> std::io::Result<Option<String>> {
    Ok(fs::read_dir(runtime_dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name())
        .find(|name| name != LOCK_NAME && name != control::SOCKET_NAME)
        .map(|name| name.to_string_lossy().into_owned()))
}

/// Takes the instance lock for an agent keeping its state in `state_dir`, or says which process
/// holds it. The lock file names the holder's pid and state directory.
pub fn lock(runtime_dir: &Path, state_dir: &Path) -> anyhow::Result<InstanceLock> {
    prepare(runtime_dir)?;
    let path = runtime_dir.join(LOCK_NAME);
    // Never through a symbolic link: the file is truncated and written.
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    // `check`, `status` and `detach` take it shared for a moment to see whether an agent
    // runs: a start in that moment waits them out, as it waits for the state directory's lock,
    // rather than exit 7, which the unit does not retry.
    let deadline = std::time::Instant::now() + crate::pin::LOCK_WAIT;
    let mut told = false;
    let mut locked = sys::flock(&file, libc::LOCK_EX | libc::LOCK_NB);
    while !locked && std::time::Instant::now() < deadline {
        if !told {
            log::info!(
                "{} is locked by another process (an agent, or a command looking for one); \
                 waiting up to {} for it",
                path.display(),
                humantime::format_duration(crate::pin::LOCK_WAIT)
            );
            told = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        locked = sys::flock(&file, libc::LOCK_EX | libc::LOCK_NB);
    }
    if !locked {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let pid = holder.lines().next().unwrap_or_default().trim();
        return Err(Error::Agent(if pid.is_empty() {
            format!(
                "another process holds {} and names no agent in it; the runtime directory {} \
                 is in use",
                path.display(),
                runtime_dir.display()
            )
        } else {
            format!(
                "another keepalive agent (pid {pid}) is running with runtime directory {}",
                runtime_dir.display()
            )
        })
        .into());
    }
    let holder = format!("{}\n{}\n", std::process::id(), state_dir.display());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(holder.as_bytes()))
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(InstanceLock { _file: file })
}

/// A running agent, as its runtime directory's lock file names it.
#[derive(Debug)]
pub struct Holder {
    /// Its pid.
    pub pid: String,
    /// Its state directory; `None` from builds that did not write it.
    pub state_dir: Option<PathBuf>,
}

impl Holder {
    /// Whether the agent may keep its state in `state_dir` (unknown counts as yes).
    pub fn may_use(&self, state_dir: &Path) -> bool {
        self.state_dir.as_deref().is_none_or(|own| {
            own == state_dir
                || fs::canonicalize(own)
                    .is_ok_and(|own| fs::canonicalize(state_dir).is_ok_and(|dir| dir == own))
        })
    }
}

/// The running agent holding `runtime_dir`, if any.
pub fn running_agent(runtime_dir: &Path) -> Option<Holder> {
    let path = runtime_dir.join(LOCK_NAME);
    let file = File::open(&path).ok()?;
    // A shared lock fails only while an agent holds it.
    if sys::flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
        return None;
    }
    let text = fs::read_to_string(&path).unwrap_or_default();
    let mut lines = text.lines();
    Some(Holder {
        pid: lines.next().unwrap_or_default().trim().to_owned(),
        state_dir: lines.next().filter(|l| !l.is_empty()).map(PathBuf::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn only_a_directory_of_keepalives_own_is_made_root_only() {
        let base = std::env::temp_dir().join(format!("ka-instance-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        // Missing: created root-only. Existing with keepalive's files only: made root-only.
        let own = base.join("own");
        prepare(&own).unwrap();
        assert_eq!(mode(&own), 0o700);
        fs::set_permissions(&own, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(own.join(LOCK_NAME), "1\n/sys/fs/bpf/keepalive\n").unwrap();
        prepare(&own).unwrap();
        assert_eq!(mode(&own), 0o700);
        // Shared, like /run: refused and left as it was.
        let shared = base.join("shared");
        fs::create_dir_all(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(shared.join("utmp"), "").unwrap();
        let err = lock(&shared, Path::new("/sys/fs/bpf/keepalive")).unwrap_err();
        assert!(
            matches!(err.downcast_ref::<Error>(), Some(Error::Usage(msg)) if msg.contains("utmp")),
            "{err:#}"
        );
        assert_eq!(mode(&shared), 0o755);
        assert!(!shared.join(LOCK_NAME).exists());
        fs::remove_dir_all(&base).unwrap();
    }

    /// The refusal `lock` gives for `dir`, whose reason must hold `needle`.
    fn refused(dir: &Path, needle: &str) {
        let err = lock(dir, Path::new("/sys/fs/bpf/keepalive")).unwrap_err();
        assert!(
            matches!(err.downcast_ref::<Error>(), Some(Error::Usage(msg)) if msg.contains(needle)),
            "{err:#}"
        );
        assert!(!dir.join(LOCK_NAME).exists(), "{err:#}");
    }

    #[test]
    fn a_runtime_directory_another_user_could_change_is_refused() {
        use std::os::unix::fs::chown;
        let base = std::env::temp_dir().join(format!("ka-trust-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir(&base).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        // Another user's directory, even made root-only, stays theirs to change.
        let theirs = base.join("theirs");
        fs::create_dir(&theirs).unwrap();
        chown(&theirs, Some(65534), None).expect("the tests run as root");
        refused(&theirs, "belongs to uid 65534");
        // Below a directory anyone may write to, the runtime directory can be swapped.
        let open = base.join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        refused(&open.join("run"), "may write to");
        assert_eq!(
            untrusted(&open.join("run"), Leaf::MadeRootOnly).unwrap(),
            Some(format!(
                "users other than its owner may write to {} (mode 0777)",
                open.display()
            ))
        );
        // Unless it is sticky, as /tmp is: then only the owner may rename or remove.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        let held = lock(&open.join("run"), Path::new("/sys/fs/bpf/keepalive")).unwrap();
        drop(held);
        // Not there yet: judged by what is above it.
        assert_eq!(
            untrusted(&open.join("run/below"), Leaf::AsIs).unwrap(),
            None
        );
        // As `run` leaves it, it is trusted; loosened, a client would refuse it.
        assert_eq!(untrusted(&open.join("run"), Leaf::AsIs).unwrap(), None);
        fs::set_permissions(open.join("run"), fs::Permissions::from_mode(0o733)).unwrap();
        assert!(
            untrusted(&open.join("run"), Leaf::AsIs)
                .unwrap()
                .is_some_and(|why| why.contains("mode 0733")),
        );
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_lock_file_is_never_written_through_a_symbolic_link() {
        let base = std::env::temp_dir().join(format!("ka-nofollow-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("run")).unwrap();
        // Whatever the umask: a group-writable parent would be refused before the lock.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(base.join("run"), fs::Permissions::from_mode(0o755)).unwrap();
        let target = base.join("precious");
        fs::write(&target, "kept\n").unwrap();
        std::os::unix::fs::symlink(&target, base.join("run").join(LOCK_NAME)).unwrap();
        let err = lock(&base.join("run"), Path::new("/sys/fs/bpf/keepalive")).unwrap_err();
        assert_eq!(
            err.root_cause()
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error),
            Some(libc::ELOOP),
            "{err:#}"
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "kept\n");
        fs::remove_dir_all(&base).unwrap();
    }
}
