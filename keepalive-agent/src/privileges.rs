//! Which capabilities the process has, and a clear refusal when it lacks the ones it needs.

use crate::error::Error;

/// Capabilities keepalive cares about, by number (linux/capability.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// Listen on ports below `net.ipv4.ip_unprivileged_port_start` (metrics only).
    NetBindService = 10,
    /// Attach to cgroups.
    NetAdmin = 12,
    /// Open other users' `/proc/<pid>/ns/net`.
    SysPtrace = 19,
    /// Mount bpffs, enter other network namespaces; also stands in for BPF and PERFMON.
    SysAdmin = 21,
    /// bpf_probe_read_kernel and the skc_to helpers.
    Perfmon = 38,
    /// Load programs and create maps.
    Bpf = 39,
}

impl Cap {
    /// The kernel's name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NetBindService => "CAP_NET_BIND_SERVICE",
            Self::NetAdmin => "CAP_NET_ADMIN",
            Self::SysPtrace => "CAP_SYS_PTRACE",
            Self::SysAdmin => "CAP_SYS_ADMIN",
            Self::Perfmon => "CAP_PERFMON",
            Self::Bpf => "CAP_BPF",
        }
    }
}

/// The effective capability set of this process.
#[derive(Debug, Clone, Copy)]
pub struct Caps(u64);

impl Caps {
    /// Reads `CapEff` from /proc/self/status.
    pub fn current() -> Self {
        Self::of("self")
    }

    /// Reads `CapEff` of process `pid` ("self", or a number) from /proc; none when it cannot
    /// be read.
    pub fn of(pid: &str) -> Self {
        let effective = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("CapEff:"))
                    .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            })
            .unwrap_or(0);
        Self(effective)
    }

    /// Whether the capability is effective.
    pub const fn has(self, cap: Cap) -> bool {
        self.0 & (1 << cap as u32) != 0
    }

    /// Whether a process with these capabilities could run the agent: load programs
    /// (CAP_BPF, or CAP_SYS_ADMIN) and attach them (CAP_NET_ADMIN).
    pub fn could_run_agent(self) -> bool {
        (self.has(Cap::Bpf) || self.has(Cap::SysAdmin)) && self.has(Cap::NetAdmin)
    }

    /// The capabilities `run` needs that are missing. CAP_SYS_ADMIN covers CAP_BPF and
    /// CAP_PERFMON on every kernel.
    pub fn missing_for_run(self) -> Vec<Cap> {
        let admin = self.has(Cap::SysAdmin);
        let mut missing = Vec::new();
        if !self.has(Cap::Bpf) && !admin {
            missing.push(Cap::Bpf);
        }
        if !self.has(Cap::NetAdmin) {
            missing.push(Cap::NetAdmin);
        }
        if !self.has(Cap::Perfmon) && !admin {
            missing.push(Cap::Perfmon);
        }
        missing
    }
}

/// Refuses with [`Error::Permission`] unless the process can load and attach the programs.
pub fn require_for(command: &str) -> anyhow::Result<()> {
    let missing = Caps::current().missing_for_run();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
    Err(Error::Permission(format!(
        "permission denied: `keepalive-agent {command}` must run as root (or with CAP_BPF, \
         CAP_NET_ADMIN and CAP_PERFMON); missing {}",
        names.join(", ")
    ))
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon() {
        let root = Caps(u64::MAX);
        assert!(root.missing_for_run().is_empty());
        let admin_net = Caps((1 << Cap::SysAdmin as u32) | (1 << Cap::NetAdmin as u32));
        assert!(admin_net.missing_for_run().is_empty());
        let none = Caps(0);
        assert_eq!(
            none.missing_for_run(),
            [Cap::Bpf, Cap::NetAdmin, Cap::Perfmon]
        );
        let bpf_only = Caps(1 << Cap::Bpf as u32);
        assert_eq!(bpf_only.missing_for_run(), [Cap::NetAdmin, Cap::Perfmon]);
    }
}
