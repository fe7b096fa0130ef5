//! One agent per runtime directory: an flock on `<runtime>/agent.lock` that names the holder's
//! pid, and the check `detach` uses to refuse while an agent runs. (The state directory on
//! bpffs has a lock of its own, see `pin::StateDir::lock`.)

use std::{
    fs::{self, File},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
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
/// `/run` root-only would lock other services out of it.
fn prepare(runtime_dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(runtime_dir)
        .with_context(|| format!("failed to create {}", runtime_dir.display()))?;
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
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    if !sys::flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
        let holder = fs::read_to_string(&path).unwrap_or_default();
        return Err(Error::Agent(format!(
            "another keepalive agent (pid {}) is running with runtime directory {}",
            holder.trim(),
            runtime_dir.display()
        ))
        .into());
    }
    fs::write(
        &path,
        format!("{}\n{}\n", std::process::id(), state_dir.display()),
    )
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
}
