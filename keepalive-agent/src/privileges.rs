//! Which capabilities the process has, and a clear refusal when it lacks the ones it needs.

use crate::error::Error;

/// Capabilities keepalive cares about, by number (linux/capability.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// Bypass file permission checks.
    DacOverride = 1,
    /// Read and search any directory.
    DacReadSearch = 2,
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
            Self::DacOverride => "CAP_DAC_OVERRIDE",
            Self::DacReadSearch => "CAP_DAC_READ_SEARCH",
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

/// Runs `f` on a thread of its own whose effective capabilities lack CAP_DAC_OVERRIDE and
/// CAP_DAC_READ_SEARCH (capabilities are per thread), as the systemd unit runs the agent: for
/// `check` as root to tell what file permissions the agent would meet there. Fails when the
/// thread cannot be made (a pids limit) or its capabilities cannot be changed.
pub fn without_dac<T: Send>(f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    /// `struct __user_cap_header_struct` and `struct __user_cap_data_struct`, version 3.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("without-dac".to_owned())
            .spawn_scoped(scope, || {
                let mut header = Header {
                    version: VERSION_3,
                    pid: 0,
                };
                let mut data = [Data::default(); 2];
                // SAFETY: capget fills the two data structs of version 3; capset reads them.
                // Both act on the calling thread only (pid 0).
                unsafe {
                    if libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    data[0].effective &=
                        !((1 << Cap::DacOverride as u32) | (1 << Cap::DacReadSearch as u32));
                    if libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(f())
            })?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
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

    #[test]
    fn a_thread_without_dac_capabilities_meets_file_permissions() {
        use std::os::unix::fs::PermissionsExt as _;
        if !Caps::current().has(Cap::DacOverride) {
            // Nothing to drop: the other half of the test needs it.
            assert!(without_dac(|| 7).is_ok_and(|n| n == 7));
            return;
        }
        let dir = std::env::temp_dir().join(format!("ka-nodac-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("unreadable");
        std::fs::write(&file, "x").unwrap();
        std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let read = || std::fs::read(&file).map_err(|err| err.kind());
        let without = without_dac(read).unwrap();
        let with = read();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(without, Err(std::io::ErrorKind::PermissionDenied));
        assert_eq!(
            with,
            Ok(b"x".to_vec()),
            "the process keeps its capabilities"
        );
    }
}
