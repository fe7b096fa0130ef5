//! One agent per runtime directory: an flock on `<runtime>/agent.lock` that names the holder's
//! pid, and the check `detach` uses to refuse while an agent runs. (The state directory on
//! bpffs has a lock of its own, see `pin::StateDir::lock`.)

use std::{
    fs::{self, File},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::Context as _;

use crate::{error::Error, sys};

/// The lock file that keeps two agents off the same runtime directory.
pub const LOCK_NAME: &str = "agent.lock";

/// Holds an exclusive flock on the runtime directory's lock file for the agent's lifetime.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

/// Takes the instance lock, or says which process holds it.
pub fn lock(runtime_dir: &Path) -> anyhow::Result<InstanceLock> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(runtime_dir)
        .with_context(|| format!("failed to create {}", runtime_dir.display()))?;
    fs::set_permissions(runtime_dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("failed to restrict {} to root", runtime_dir.display()))?;
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
    fs::write(&path, format!("{}\n", std::process::id()))
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(InstanceLock { _file: file })
}

/// The pid of a running agent holding `runtime_dir`, if any.
pub fn running_agent(runtime_dir: &Path) -> Option<String> {
    let path = runtime_dir.join(LOCK_NAME);
    let file = File::open(&path).ok()?;
    // A shared lock fails only while an agent holds it.
    let free = sys::flock(&file, libc::LOCK_SH | libc::LOCK_NB);
    (!free).then(|| {
        fs::read_to_string(&path)
            .unwrap_or_default()
            .trim()
            .to_owned()
    })
}
