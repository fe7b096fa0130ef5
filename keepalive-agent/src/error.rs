//! The failures an operator can act on, each with its own documented exit code.
//!
//! Library code returns `anyhow::Result` with context; where a failure falls into one of these
//! classes the innermost cause is an [`Error`], and `main` walks the chain to pick the exit code.

use std::{fmt, path::PathBuf, process::ExitCode};

/// Exit codes. [`exit::MEANINGS`] is what `keepalive-agent --help` prints; the README's table
/// says the same.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other failure.
    pub const FAILURE: u8 = 1;
    /// Invalid input ([`super::Error::Usage`], [`super::Error::Config`]).
    pub const USAGE: u8 = 2;
    /// Missing privileges ([`super::Error::Permission`]).
    pub const PERMISSION: u8 = 3;
    /// A cgroup is missing ([`super::Error::CgroupNotFound`]); it may appear later.
    pub const CGROUP: u8 = 4;
    /// bpffs is not available ([`super::Error::Bpffs`]).
    pub const BPFFS: u8 = 5;
    /// The kernel cannot run the agent ([`super::Error::Kernel`]).
    pub const KERNEL: u8 = 6;
    /// No agent, another agent, or the pinned state is in the way ([`super::Error::Agent`]).
    pub const AGENT: u8 = 7;
    /// `check` found problems ([`super::Error::NotReady`]).
    pub const NOT_READY: u8 = 8;
    /// No cgroup v2 is mounted ([`super::Error::NoCgroup2`]); apart from 4 so that service
    /// managers can retry a missing cgroup without retrying a host that cannot run keepalive.
    pub const NO_CGROUP2: u8 = 9;

    /// Every exit code and what it means to an operator.
    pub const MEANINGS: &[(u8, &str)] = &[
        (OK, "success"),
        (
            FAILURE,
            "failure not listed below, including a config path that is a symbolic link to \
             nothing (not 2: the unit retries it, and the target may yet appear)",
        ),
        (
            USAGE,
            "bad command line or configuration (`file:line: reason`), or a max_tracked_* \
             capacity the kernel has no memory for (named with what to lower); nothing was \
             attached or changed",
        ),
        (
            PERMISSION,
            "permission denied: not root, or missing CAP_BPF, CAP_NET_ADMIN or CAP_PERFMON (or \
             CAP_NET_BIND_SERVICE for a metrics port below ip_unprivileged_port_start, 1024 \
             unless changed), or a metrics port something else refuses to bind (SELinux, say), \
             or the attach cgroup's parent may not be read to watch it, or a directory on the \
             way to the attach cgroup may not be searched (both without CAP_DAC_READ_SEARCH); \
             `status` and `policy` commands: keepalive's state or control socket is root-only \
             (`check` says so in its report, exit 8)",
        ),
        (
            CGROUP,
            "the named cgroup does not exist (yet), or the attach cgroup was removed (while the \
             agent ran, or while it started: also when one of the same name replaced it)",
        ),
        (
            BPFFS,
            "bpffs is not mounted and cannot be mounted (or a mount would end with this mount \
             namespace), or the state directory is not on bpffs, or on one this process may only \
             read (under the systemd unit, anywhere but /sys/fs/bpf)",
        ),
        (
            KERNEL,
            "the kernel cannot run keepalive (no BTF, an unsupported layout, or it rejected a \
             program or the attachment; not when it had no memory for them, which is 1 and \
             retried, or 2 for a map a max_tracked_* capacity sizes)",
        ),
        (
            AGENT,
            "no agent is running (or it stopped before it answered a policy command, or sent no \
             byte of an answer, nor a sign of progress, for 120 s, or what serves its control socket is not the agent), or the one \
             on --runtime-dir keeps its state elsewhere than \
             --state-dir (policy commands); nothing is pinned, or no status iterator is (status); \
             another agent holds the state (run, detach); enforcement is pinned on another cgroup, or \
             another state directory's is on this one, or a pinned map keepalive did not make is \
             in the way (run), or not on the one named (detach --cgroup)",
        ),
        (NOT_READY, "`check`: this host is not ready"),
        (NO_CGROUP2, "no cgroup v2 filesystem is mounted"),
    ];
}

/// A failure with a specific exit code.
#[derive(Debug)]
pub enum Error {
    /// Invalid input: a flag value, a config file, a policy. The message names the value and
    /// what is accepted.
    Usage(String),
    /// A config file was rejected.
    Config {
        /// The file.
        file: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// The process lacks privileges.
    Permission(String),
    /// cgroup v2 is not mounted.
    NoCgroup2,
    /// A cgroup path does not exist.
    CgroupNotFound(PathBuf),
    /// bpffs is not available.
    Bpffs(String),
    /// The kernel cannot run the agent.
    Kernel(String),
    /// The agent is not running, or another instance holds the state.
    Agent(String),
    /// `check` found problems (already printed).
    NotReady,
    /// The running agent refused a request; its message and exit code.
    Refused {
        /// The agent's message.
        message: String,
        /// The exit code the agent chose.
        code: u8,
    },
}

impl Error {
    /// The process exit code for this failure.
    pub const fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::Config { .. } => exit::USAGE,
            Self::Permission(_) => exit::PERMISSION,
            Self::CgroupNotFound(_) => exit::CGROUP,
            Self::NoCgroup2 => exit::NO_CGROUP2,
            Self::Bpffs(_) => exit::BPFFS,
            Self::Kernel(_) => exit::KERNEL,
            Self::Agent(_) => exit::AGENT,
            Self::NotReady => exit::NOT_READY,
            Self::Refused { code, .. } => *code,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usage(msg)
            | Self::Permission(msg)
            | Self::Bpffs(msg)
            | Self::Kernel(msg)
            | Self::Agent(msg) => f.write_str(msg),
            Self::Config { file, line, reason } => match line {
                Some(line) => write!(f, "{}:{line}: {reason}", file.display()),
                None => write!(f, "{}: {reason}", file.display()),
            },
            Self::NoCgroup2 => f.write_str(
                "no cgroup v2 filesystem is mounted (looked for type cgroup2 in /proc/self/mounts); \
                 mount one with `mount -t cgroup2 none /sys/fs/cgroup` or boot with \
                 systemd.unified_cgroup_hierarchy=1",
            ),
            Self::CgroupNotFound(path) => write!(f, "cgroup {} does not exist", path.display()),
            Self::NotReady => f.write_str("this host is not ready to run keepalive-agent"),
            Self::Refused { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}

/// The exit code an error chain asks for: the first [`Error`] in it decides; `None` when the
/// chain has none.
pub fn code_of(err: &anyhow::Error) -> Option<u8> {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<Error>())
        .map(Error::exit_code)
}

/// Picks the process exit code for an error chain: [`code_of`], else [`exit::FAILURE`].
pub fn exit_code_for(err: &anyhow::Error) -> ExitCode {
    ExitCode::from(code_of(err).unwrap_or(exit::FAILURE))
}

/// Shorthand for a usage error.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Error::Usage(msg.into()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exit_code_is_explained_once_in_order_and_in_the_readme() {
        let codes: Vec<u8> = exit::MEANINGS.iter().map(|(code, _)| *code).collect();
        assert_eq!(codes, (exit::OK..=exit::NO_CGROUP2).collect::<Vec<_>>());
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        for (code, meaning) in exit::MEANINGS {
            let row = format!("| {code} | {meaning} |");
            assert!(readme.contains(&row), "README lacks the row {row}");
        }
    }

    #[test]
    fn the_first_error_in_the_chain_picks_the_code() {
        use anyhow::Context as _;
        let plain = anyhow::anyhow!("boom");
        assert_eq!(code_of(&plain), None);
        let wrapped = Err::<(), _>(Error::Agent("not running".into()))
            .context("outer")
            .unwrap_err();
        assert_eq!(code_of(&wrapped), Some(exit::AGENT));
        assert_eq!(exit_code_for(&wrapped), ExitCode::from(exit::AGENT));
        assert_eq!(exit_code_for(&plain), ExitCode::from(exit::FAILURE));
    }
}
