//! Harness for the real-kernel integration tests.
//!
//! Every test makes its own cgroups, network namespaces, agent state directory and runtime
//! directory, and the guards here undo all of it on drop, also when the test panics. Tests
//! that cannot run (not root, no cgroup2) panic with a message: they never pass silently.

use std::{
    ffi::CString,
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::{AsRawFd as _, IntoRawFd as _},
        unix::{
            fs::{MetadataExt as _, PermissionsExt as _},
            net::UnixDatagram,
            process::CommandExt as _,
        },
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod bpf;
pub mod perf;
pub mod sweep;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `ka-<label>-<pid namespace>-<pid>-<n>`, the pid
/// namespace by its inode number. The first call, as root, removes what killed runs left under
/// such names ([`sweep`]).
pub fn unique(label: &str) -> String {
    sweep::sweep_once();
    format!(
        "ka-{label}-{}-{}-{}",
        sweep::pid_namespace(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The capabilities the systemd unit and the DaemonSet grant (linux/capability.h numbers):
/// CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF.
pub const GRANTED: [u32; 5] = [12, 19, 21, 38, 39];

/// Panics unless running as root: these tests load BPF programs and make cgroups.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test loads BPF programs and creates cgroups and network namespaces: it must \
             run as root. Use `cargo xtask test`, which runs the tests through sudo when needed."
        );
    }
}

/// The cgroup2 mount point, from /proc/self/mounts.
pub fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect();
    found.sort_by_key(|p| p != Path::new("/sys/fs/cgroup"));
    found
        .into_iter()
        .next()
        .expect("no cgroup2 filesystem is mounted; these tests need cgroup v2")
}

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    let path = std::env::var_os("KEEPALIVE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("keepalive-agent"));
    assert!(
        path.is_file(),
        "keepalive-agent binary not found at {}; build it first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// target/<profile>, found from the test executable (target/<profile>/deps/test-…).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_owned()
}

/// The LD_PRELOAD shim (the libkeepalive technique) that `build.rs` compiles.
pub fn shim_lib() -> &'static str {
    env!("KA_SHIM")
}

/// The statically linked TCP client that `build.rs` compiles.
pub fn static_client() -> &'static Path {
    Path::new(env!("KA_STATIC_CLIENT"))
}

/// The socket helper binary (`KA_SOCK_BIN` overrides where it is looked for).
pub fn sock_bin() -> PathBuf {
    let path = std::env::var_os("KA_SOCK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("ka-sock"));
    assert!(path.is_file(), "ka-sock not built at {}", path.display());
    path
}

/// A cgroup made for one test, removed (with anything still running in it) on drop.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    rel: String,
}

impl TestCgroup {
    /// Creates a new top-level cgroup.
    pub fn new(label: &str) -> Self {
        require_root();
        refuse_host_enforcement();
        let name = unique(label);
        let path = cgroup2_mount().join(&name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path, rel: name }
    }

    /// Creates a cgroup whose processes may use at most `bytes` of memory, kernel memory such
    /// as BPF maps included: in the cgroup v1 memory hierarchy where there is one (a hybrid
    /// layout, as on this project's CI host), else in cgroup2, whose root must then delegate
    /// the memory controller.
    pub fn memory_limited(label: &str, bytes: u64) -> Self {
        Self::limited(
            label,
            "memory",
            "memory.limit_in_bytes",
            "memory.max",
            bytes,
        )
    }

    /// Creates a cgroup whose processes may have at most `tasks` processes and threads, in the
    /// cgroup v1 pids hierarchy or in cgroup2, as [`TestCgroup::memory_limited`].
    pub fn pids_limited(label: &str, tasks: u64) -> Self {
        Self::limited(label, "pids", "pids.max", "pids.max", tasks)
    }

    /// A cgroup with `v1_limit` (in cgroup v1's `controller` hierarchy, where there is one)
    /// or `v2_limit` set to `value`.
    fn limited(label: &str, controller: &str, v1_limit: &str, v2_limit: &str, value: u64) -> Self {
        require_root();
        let name = unique(label);
        let v1 = Path::new("/sys/fs/cgroup").join(controller);
        // The v1 hierarchy's root has no limit of its own (pids has none there).
        let (root, limit) = if v1.join("tasks").exists() {
            (v1, v1_limit)
        } else {
            let root = cgroup2_mount();
            let delegated =
                fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
            assert!(
                delegated.split_whitespace().any(|c| c == controller),
                "no {controller} controller: neither cgroup v1 {controller} nor {controller} in \
                 {}'s cgroup.subtree_control",
                root.display()
            );
            (root, v2_limit)
        };
        let path = root.join(&name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let cgroup = Self { path, rel: name };
        fs::write(cgroup.path.join(limit), value.to_string())
            .unwrap_or_else(|e| panic!("{limit} of {}: {e}", cgroup.path.display()));
        cgroup
    }

    /// Makes `cmd` run in this cgroup, from before it executes.
    pub fn run_in(&self, cmd: &mut Command) {
        let procs = std::ffi::CString::new(
            self.path
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: the closure only makes system calls.
        unsafe {
            cmd.pre_exec(move || join_cgroup(&procs));
        }
    }

    /// Creates a child cgroup; it is removed when dropped, or with this one.
    pub fn child(&self, name: &str) -> Self {
        let path = self.path.join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self {
            path,
            rel: format!("{}/{name}", self.rel),
        }
    }

    /// Creates a child cgroup whose name is `name`'s bytes, which need not be UTF-8; its
    /// [`TestCgroup::rel`] has U+FFFD for what is not, as `status` shows it.
    pub fn child_bytes(&self, name: &[u8]) -> Self {
        use std::os::unix::ffi::OsStrExt as _;
        let name = std::ffi::OsStr::from_bytes(name);
        let path = self.path.join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self {
            path,
            rel: format!("{}/{}", self.rel, name.to_string_lossy()),
        }
    }

    /// Creates a child cgroup as user and group `uid` with `mode`, the way the owner of a
    /// delegated subtree would (the directory never exists as root's).
    pub fn child_made_by(&self, name: &str, uid: u32, mode: u32) -> Self {
        let path = self.path.join(name);
        let made = Command::new("mkdir")
            .arg("-m")
            .arg(format!("{mode:o}"))
            .arg(&path)
            .uid(uid)
            .gid(uid)
            .status()
            .expect("run mkdir");
        assert!(made.success(), "mkdir {} as {uid}", path.display());
        Self {
            path,
            rel: format!("{}/{name}", self.rel),
        }
    }

    /// Absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path relative to the cgroup2 mount.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// The cgroup id (inode number).
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path).expect("stat cgroup").ino()
    }

    /// The path as `status` prints it.
    pub fn display(&self) -> String {
        format!("/{}", self.rel)
    }
}

/// The item `name` of a `check --json` report.
pub fn check_item<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

/// Kills everything in a cgroup tree and removes it, deepest first.
pub fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut dirs = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        dirs.push(dir);
    }
    for dir in dirs.iter().rev() {
        while fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs` (writing 0 moves
/// the writer). Only system calls: for `pre_exec`.
fn join_cgroup(procs: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: open, write and close with a valid C string and buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ok = libc::write(fd, b"0\n".as_ptr().cast(), 2) == 2;
        libc::close(fd);
        if !ok {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl TestCgroup {
    /// Creates the cgroup at `path`, a name of the test's choosing below the cgroup2 mount.
    pub fn at(path: PathBuf) -> Self {
        require_root();
        refuse_host_enforcement();
        let rel = path
            .strip_prefix(cgroup2_mount())
            .unwrap_or_else(|_| panic!("{} is not below the cgroup2 mount", path.display()))
            .to_str()
            .expect("utf-8")
            .to_owned();
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path, rel }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// A network namespace made with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// Runs a command that must succeed.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Creates a namespace with loopback up.
    pub fn new(label: &str) -> Self {
        require_root();
        let name = unique(label);
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of its handle.
    pub fn handle(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two namespaces joined by a veth pair: `a` at 10.231.<n>.1, `b` at 10.231.<n>.2.
#[derive(Debug)]
pub struct VethPair {
    /// Client side.
    pub a: Netns,
    /// Server side.
    pub b: Netns,
    /// Address of `b`.
    pub b_addr: String,
    /// Interface name in `b`.
    pub b_if: String,
}

impl VethPair {
    /// Creates both namespaces and the link between them.
    pub fn new() -> Self {
        let a = Netns::new("a");
        let b = Netns::new("b");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) % 250 + 1;
        let (a_if, b_if) = (format!("kaa{}", n), format!("kab{}", n));
        sh(
            "ip",
            &[
                "link",
                "add",
                &a_if,
                "netns",
                a.name(),
                "type",
                "veth",
                "peer",
                "name",
                &b_if,
                "netns",
                b.name(),
            ],
        );
        let subnet = format!("10.231.{n}");
        sh(
            "ip",
            &[
                "-n",
                a.name(),
                "addr",
                "add",
                &format!("{subnet}.1/24"),
                "dev",
                &a_if,
            ],
        );
        sh(
            "ip",
            &[
                "-n",
                b.name(),
                "addr",
                "add",
                &format!("{subnet}.2/24"),
                "dev",
                &b_if,
            ],
        );
        sh("ip", &["-n", a.name(), "link", "set", &a_if, "up"]);
        sh("ip", &["-n", b.name(), "link", "set", &b_if, "up"]);
        Self {
            a,
            b,
            b_addr: format!("{subnet}.2"),
            b_if,
        }
    }

    /// Makes the server side answer what comes from the client with ICMP "network
    /// unreachable", as a router that lost its route does, instead of delivering it.
    pub fn unreachable(&self) {
        let b = self.b.name();
        // Forwarding on, or the kernel drops such packets without an ICMP error; the local
        // table's rule moved behind the one that refuses what arrives on the link.
        sh(
            "ip",
            &[
                "netns",
                "exec",
                b,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/conf/all/forwarding",
            ],
        );
        sh(
            "ip",
            &["-n", b, "rule", "add", "pref", "100", "lookup", "local"],
        );
        sh(
            "ip",
            &["-n", b, "rule", "del", "pref", "0", "lookup", "local"],
        );
        sh(
            "ip",
            &[
                "-n",
                b,
                "rule",
                "add",
                "pref",
                "10",
                "iif",
                &self.b_if,
                "unreachable",
            ],
        );
    }

    /// Takes the server side's link down: its packets vanish, with no FIN or RST.
    pub fn cut(&self) {
        sh(
            "ip",
            &["-n", self.b.name(), "link", "set", &self.b_if, "down"],
        );
    }
}

impl Default for VethPair {
    fn default() -> Self {
        Self::new()
    }
}

/// A child process placed in a cgroup and/or network namespace before it execs, reporting
/// JSON lines on stdout.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Spawns `program` inside `cgroup` and `netns`.
    pub fn spawn(
        program: &Path,
        args: &[&str],
        cgroup: Option<&Path>,
        netns: Option<&Netns>,
    ) -> Self {
        Self::spawn_with_env(program, args, cgroup, netns, &[])
    }

    /// Like [`Proc::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        program: &Path,
        args: &[&str],
        cgroup: Option<&Path>,
        netns: Option<&Netns>,
        env: &[(&str, &str)],
    ) -> Self {
        let procs = cgroup.map(|c| {
            CString::new(c.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .expect("no NUL")
        });
        let ns_fd = netns.map(|n| File::open(n.handle()).expect("open netns").into_raw_fd());
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: the closure only makes async-signal-safe system calls (open, write, close,
        // setns) on data prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = ns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                match &procs {
                    Some(procs) => join_cgroup(procs),
                    None => Ok(()),
                }
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        if let Some(fd) = ns_fd {
            // SAFETY: we own this fd; the child has its own copy.
            unsafe { libc::close(fd) };
        }
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            lines: rx,
        }
    }

    /// The socket helper in a cgroup.
    pub fn sock(args: &[&str], cgroup: &TestCgroup) -> Self {
        Self::spawn(&sock_bin(), args, Some(cgroup.path()), None)
    }

    /// The next JSON line, waiting up to `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Value {
        let line = self
            .lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no output from helper within {timeout:?}: {e}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad helper output {line:?}: {e}"))
    }

    /// The next JSON line within 10 s.
    pub fn read(&mut self) -> Value {
        self.next(Duration::from_secs(10))
    }

    /// Whether a line arrives within `timeout` (None if not). A helper that exited without
    /// one is no "not yet": it fails the test.
    pub fn try_next(&mut self, timeout: Duration) -> Option<Value> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Some(serde_json::from_str(&line).expect("helper output is JSON")),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the helper exited without another line")
            }
        }
    }

    /// Closes the helper's stdin (it then finishes what it does and exits).
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// Writes `line` and a newline to the helper's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to helper");
        stdin.flush().expect("flush");
    }

    /// Asks a holding helper for the current options of its sockets.
    pub fn report(&mut self) -> Vec<Value> {
        self.send("report");
        let out = self.read();
        out["report"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("not a report: {out}"))
    }

    /// Closes stdin, letting the helper close its sockets and exit, and waits for it.
    pub fn finish(mut self) -> ExitStatus {
        drop(self.stdin.take());
        self.child.wait().expect("wait helper")
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `keepalive-agent run` with its own state and runtime directories. Dropping it
/// stops it and detaches everything it pinned.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    /// bpffs state directory.
    pub state_dir: PathBuf,
    /// Runtime directory (control socket, lock).
    pub runtime_dir: PathBuf,
    bin: Option<PathBuf>,
    log: PathBuf,
    notify: UnixDatagram,
    notify_path: PathBuf,
    /// The notify lines read until READY=1 came.
    ready_lines: Vec<String>,
}

/// An agent's state and runtime directories, before and between runs.
#[derive(Debug, Clone)]
pub struct AgentDirs {
    /// bpffs state directory.
    pub state_dir: PathBuf,
    /// Runtime directory.
    pub runtime_dir: PathBuf,
    /// The agent binary, when not the one under test ([`agent_bin`]).
    pub bin: Option<PathBuf>,
}

/// How long a CLI call of the agent may take before the test fails.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);

impl AgentDirs {
    /// Fresh, unique directories.
    pub fn new() -> Self {
        let name = unique("agent");
        Self {
            state_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            runtime_dir: std::env::temp_dir().join(&name),
            bin: None,
        }
    }

    /// These directories, run by another agent binary (another build, for comparisons).
    pub fn with_bin(self, bin: &Path) -> Self {
        Self {
            bin: Some(bin.to_owned()),
            ..self
        }
    }

    /// The agent binary with these directories and then `args`, for callers that need more
    /// than its output (another user, fewer capabilities, a different environment).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin.clone().unwrap_or_else(agent_bin));
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .args(args);
        cmd
    }

    /// Runs the agent binary with these directories and `args`; returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.output(self.command(args))
    }

    /// Runs `cmd`, one of [`AgentDirs::command`]'s, and returns its output. A command still
    /// running after [`CLI_TIMEOUT`] (a `run` that was meant to be refused but started, say)
    /// is killed, whatever it pinned is detached, and the test fails.
    pub fn output(&self, mut cmd: Command) -> Output {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run keepalive-agent");
        let read = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        };
        let stdout = read(Box::new(child.stdout.take().expect("stdout")));
        let stderr = read(Box::new(child.stderr.take().expect("stderr")));
        let deadline = Instant::now() + CLI_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for keepalive-agent") {
                break status;
            }
            if Instant::now() >= deadline {
                // Not reaped yet, so the pid is still this child's.
                let _ = child.kill();
                let _ = child.wait();
                let mut detach = self.command(&["detach"]);
                detach.stdout(Stdio::null()).stderr(Stdio::null());
                let _ = detach.status();
                panic!("{cmd:?} still ran after {CLI_TIMEOUT:?}; killed it and detached");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
        }
    }

    /// Like [`AgentDirs::cli`], and panics with the agent's stderr unless it succeeds.
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "keepalive-agent {} failed ({}): {}",
            args.join(" "),
            out.status,
            stderr(&out)
        );
        out
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.cli_ok(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// `policy list --json`: the `policies` array.
    pub fn policies(&self) -> Vec<Value> {
        let out = self.cli_ok(&["policy", "list", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).expect("policy list --json is JSON");
        list["policies"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("no policies array in {list}"))
    }

    /// Removes everything pinned (as `keepalive-agent detach` does).
    pub fn detach(&self) -> Output {
        self.cli(&["detach"])
    }
}

/// Directories whose pins are detached on drop, for agents the test does not start itself (under
/// a service manager, say), so a failing test leaves nothing attached.
#[derive(Debug)]
pub struct DetachOnDrop(pub AgentDirs);

impl std::ops::Deref for DetachOnDrop {
    type Target = AgentDirs;

    fn deref(&self) -> &AgentDirs {
        &self.0
    }
}

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        let _ = self.0.detach();
    }
}

impl Default for AgentDirs {
    fn default() -> Self {
        Self::new()
    }
}

impl Agent {
    /// Starts `keepalive-agent run --cgroup <cgroup> <args>` and waits until it reports ready.
    pub fn start(cgroup: &TestCgroup, args: &[&str]) -> Self {
        Self::start_in(&AgentDirs::new(), cgroup, args)
    }

    /// Like [`Agent::start`] with given directories (to restart over the same state).
    pub fn start_in(dirs: &AgentDirs, cgroup: &TestCgroup, args: &[&str]) -> Self {
        let mut full = vec!["run", "--cgroup", cgroup.path().to_str().expect("utf-8")];
        full.extend_from_slice(args);
        Self::start_raw(dirs, &full)
    }

    /// Starts the agent with exactly `args` after the directory flags.
    pub fn start_raw(dirs: &AgentDirs, args: &[&str]) -> Self {
        Self::start_with(dirs, args, &[], None)
    }

    /// Like [`Agent::start_raw`], with extra environment variables and, when `keep_caps` is
    /// given, a capability bounding set reduced to those capabilities (so the root agent runs
    /// with exactly them).
    pub fn start_with(
        dirs: &AgentDirs,
        args: &[&str],
        env: &[(&str, &str)],
        keep_caps: Option<&[u32]>,
    ) -> Self {
        let mut agent = Self::spawn(dirs, args, env, keep_caps);
        agent.wait_ready();
        agent
    }

    /// [`Agent::start_with`] without waiting: the agent may still be starting.
    pub fn spawn(
        dirs: &AgentDirs,
        args: &[&str],
        env: &[(&str, &str)],
        keep_caps: Option<&[u32]>,
    ) -> Self {
        let mut child = dirs.command(args);
        child.envs(env.iter().copied());
        if let Some(keep) = keep_caps {
            let keep = keep.to_vec();
            // SAFETY: prctl calls only.
            unsafe {
                child.pre_exec(move || drop_caps_except(&keep));
            }
        }
        Self::spawn_command(dirs, child)
    }

    /// Starts `cmd`, one of [`AgentDirs::command`]'s running `run`, and waits until it reports
    /// ready.
    pub fn start_command(dirs: &AgentDirs, cmd: Command) -> Self {
        let mut agent = Self::spawn_command(dirs, cmd);
        agent.wait_ready();
        agent
    }

    /// [`Agent::start_command`] without waiting.
    pub fn spawn_command(dirs: &AgentDirs, mut child: Command) -> Self {
        require_root();
        fs::create_dir_all(&dirs.runtime_dir).expect("runtime dir");
        let notify_path = std::env::temp_dir().join(format!("{}.notify", unique("n")));
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        // For agents run as another user without CAP_DAC_OVERRIDE.
        fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o777)).expect("chmod");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let log = std::env::temp_dir().join(format!("{}.log", unique("agent-log")));
        let log_file = File::create(&log).expect("log file");
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        // Unless the caller set them.
        for (key, value) in [
            ("NOTIFY_SOCKET", notify_path.as_os_str()),
            ("RUST_LOG", rust_log.as_ref()),
        ] {
            if !child.get_envs().any(|(set, _)| set == key) {
                child.env(key, value);
            }
        }
        child
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = child.spawn().expect("spawn keepalive-agent");
        Self {
            child: Some(child),
            state_dir: dirs.state_dir.clone(),
            runtime_dir: dirs.runtime_dir.clone(),
            bin: dirs.bin.clone(),
            log,
            notify,
            notify_path,
            ready_lines: Vec::new(),
        }
    }

    /// Waits until the agent reports ready; panics with its log when it does not.
    pub fn wait_ready(&mut self) {
        match self.notified("READY=1", Duration::from_secs(60)) {
            Ok(Some(lines)) => self.ready_lines = lines,
            Ok(None) => panic!("agent not ready within 60 s:\n{}", self.log()),
            Err(status) => panic!(
                "agent exited with {status} before it was ready:\n{}",
                self.log()
            ),
        }
    }

    /// The notify lines the agent sent until it was ready (READY=1 and STATUS=, say).
    pub fn ready_lines(&self) -> &[String] {
        &self.ready_lines
    }

    /// Waits for the next notify line `what` (READY=1 after a reload, WATCHDOG=1); returns
    /// every line read up to it, in order.
    pub fn wait_notify(&mut self, what: &str, timeout: Duration) -> Vec<String> {
        match self.notified(what, timeout) {
            Ok(Some(lines)) => lines,
            Ok(None) => panic!("agent sent no {what} within {timeout:?}:\n{}", self.log()),
            Err(status) => panic!(
                "agent exited with {status} before it sent {what}:\n{}",
                self.log()
            ),
        }
    }

    /// Waits up to `timeout` for the line `what` on the notify socket: `Ok(Some)` with every
    /// line read up to it when it came, `Ok(None)` when it did not, `Err` with the exit status
    /// when the agent exited.
    pub fn notified(
        &mut self,
        what: &str,
        timeout: Duration,
    ) -> Result<Option<Vec<String>>, ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        let mut lines = Vec::new();
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                lines.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .map(str::to_owned),
                );
                if lines.iter().any(|l| l == what) {
                    return Ok(Some(lines));
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(status);
            }
        }
        Ok(None)
    }

    /// The agent's stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The directories, for restarts and CLI calls.
    pub fn dirs(&self) -> AgentDirs {
        AgentDirs {
            state_dir: self.state_dir.clone(),
            runtime_dir: self.runtime_dir.clone(),
            bin: self.bin.clone(),
        }
    }

    /// Runs the agent binary with this agent's directories.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.dirs().cli(args)
    }

    /// [`AgentDirs::cli_ok`] with this agent's directories.
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        self.dirs().cli_ok(args)
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        self.dirs().status()
    }

    /// `policy list --json`: the `policies` array.
    pub fn policies(&self) -> Vec<Value> {
        self.dirs().policies()
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Stops the agent with SIGSTOP, and waits until each of its threads has (a SIGCONT sent
    /// before then would leave some running).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.pid());
        eventually(Duration::from_secs(5), "the agent to stop", || {
            fs::read_dir(&tasks)
                .ok()?
                .flatten()
                .all(|task| {
                    fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                        stat.rsplit_once(") ")
                            .is_some_and(|(_, rest)| rest.starts_with('T'))
                    })
                })
                .then_some(())
        });
    }

    /// Waits up to `timeout` for the agent to exit by itself; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` and waits for the process to exit; returns its status.
    pub fn stop_with(&mut self, signal: i32) -> ExitStatus {
        self.try_stop(signal).unwrap_or_else(|status| {
            // A second panic, from a drop during a failed test, would abort the test
            // binary before the guards of namespaces and cgroups ran.
            assert!(
                std::thread::panicking(),
                "agent did not exit after signal {signal}; killed it"
            );
            status
        })
    }

    /// Sends `signal` and waits up to 10 s for the process to exit: its status, or, when it
    /// had to be killed then, the status of that as the error.
    fn try_stop(&mut self, signal: i32) -> Result<ExitStatus, ExitStatus> {
        self.signal(signal);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(10);
        // An agent blocked on a full notify queue could not act on the signal.
        let _ = self.notify.set_nonblocking(true);
        let mut buf = [0u8; 4096];
        loop {
            while self.notify.recv(&mut buf).is_ok() {}
            if let Some(status) = child.try_wait().expect("wait") {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return Err(child.wait().expect("wait"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // An agent that ignores SIGTERM fails a test that passed otherwise, once what it
        // leaves is cleaned up and its log shown.
        let hung = self.child.is_some() && self.try_stop(libc::SIGTERM).is_err();
        let _ = self.dirs().detach();
        let _ = fs::remove_dir_all(&self.runtime_dir);
        let _ = fs::remove_file(&self.notify_path);
        let failed = std::thread::panicking();
        if failed || hung {
            eprintln!("--- agent log ---\n{}", self.log());
        }
        let _ = fs::remove_file(&self.log);
        assert!(
            failed || !hung,
            "agent did not exit after SIGTERM; killed it"
        );
    }
}

/// Drops every capability but `keep` from the bounding set (between fork and exec).
pub fn drop_caps_except(keep: &[u32]) -> std::io::Result<()> {
    for cap in 0..64u32 {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with plain integers; EINVAL past the last capability ends the loop.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err);
        }
    }
    Ok(())
}

/// Returns the last OS error when `ret`, a system call's result, is negative (for calls
/// between fork and exec).
fn os_check(ret: libc::c_long) -> std::io::Result<()> {
    if ret >= 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Becomes user and group `uid`, without supplementary groups (between fork and exec).
/// With `keep_caps`, every capability stays, raised as ambient ones that survive exec: a
/// process with root's powers whose per-user limits (inotify instances, say) are `uid`'s.
pub fn become_user(uid: u32, keep_caps: bool) -> std::io::Result<()> {
    /// `struct __user_cap_header_struct` and `struct __user_cap_data_struct`, version 3.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // SAFETY: prctl, setgroups, setgid and setuid with plain integers and no groups.
    unsafe {
        os_check(
            libc::prctl(
                libc::PR_SET_KEEPCAPS,
                libc::c_ulong::from(keep_caps),
                0,
                0,
                0,
            )
            .into(),
        )?;
        os_check(libc::setgroups(0, std::ptr::null()).into())?;
        os_check(libc::setgid(uid).into())?;
        os_check(libc::setuid(uid).into())?;
    }
    if !keep_caps {
        return Ok(());
    }
    // setuid kept the permitted set and cleared the effective one.
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget and capset read the header and two data structs, which capget fills.
    unsafe {
        os_check(libc::syscall(
            libc::SYS_capget,
            &raw const header,
            data.as_mut_ptr(),
        ))?;
        for set in &mut data {
            set.effective = set.permitted;
            set.inheritable = set.permitted;
        }
        os_check(libc::syscall(
            libc::SYS_capset,
            &raw const header,
            data.as_ptr(),
        ))?;
    }
    let permitted = u64::from(data[0].permitted) | u64::from(data[1].permitted) << 32;
    for cap in (0..64u32).filter(|cap| permitted & 1 << cap != 0) {
        // SAFETY: prctl with plain integers.
        let raised = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        os_check(raised.into())?;
    }
    Ok(())
}

/// Makes this process (a child between fork and exec) end with the test's thread, also when
/// the test run is killed. Call it after `setuid`, which clears it.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    os_check(ret.into())
}

/// A per-user inotify limit: `max_user_instances` or `max_user_watches`.
fn inotify_limit(name: &str) -> usize {
    fs::read_to_string(format!("/proc/sys/fs/inotify/{name}"))
        .unwrap_or_else(|err| panic!("fs.inotify.{name}: {err}"))
        .trim()
        .parse()
        .expect("a number")
}

/// The descriptor numbers of the inotify instances process `pid` holds.
fn inotify_fds_of(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's descriptors")
        .filter_map(Result::ok)
        .filter(|fd| {
            fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == "anon_inode:inotify")
        })
        .map(|fd| fd.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The inotify watches process `pid` holds, over all its instances.
fn inotify_watches_of(pid: u32) -> usize {
    inotify_fds_of(pid)
        .iter()
        .map(|fd| {
            fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
                .expect("the instance's fdinfo")
                .lines()
                .filter(|line| line.starts_with("inotify wd:"))
                .count()
        })
        .sum()
}

/// A process of user `uid` holding the inotify instances or watches the user may have, as the
/// many root processes and containers of a busy host can: whatever else that user starts
/// meanwhile cannot have them. Dropping it ends the process and gives them back (and removes
/// the directories it watched).
#[derive(Debug)]
pub struct InotifyHolder {
    child: Child,
    /// The directories it watches.
    _watched: Option<TempDir>,
}

impl Drop for InotifyHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an [`InotifyHolder`] and checks it holds every instance the user may have but the
/// `others` its other processes hold.
pub fn hold_inotify_instances(uid: u32, others: usize) -> InotifyHolder {
    let limit = inotify_limit("max_user_instances") - others;
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    // The child starts with every descriptor this process has open (those closed on exec
    // close only then), so the new ones are numbered above the highest of them.
    let highest = fs::read_dir("/proc/self/fd")
        .expect("this process's descriptors")
        .filter_map(|fd| fd.ok()?.file_name().to_str()?.parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    let files = (highest + limit + 64) as libc::rlim_t;
    // SAFETY: setrlimit, the calls of become_user, die_with_parent and inotify_init, none of
    // which allocate.
    unsafe {
        cmd.pre_exec(move || {
            // Enough descriptors for every instance, so the user's limit is the one reached.
            let rlimit = libc::rlimit {
                rlim_cur: files,
                rlim_max: files,
            };
            os_check(libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit).into())?;
            become_user(uid, false)?;
            die_with_parent()?;
            // Not close-on-exec: `sleep` holds them.
            while libc::inotify_init() >= 0 {}
            Ok(())
        });
    }
    let holder = InotifyHolder {
        child: cmd.spawn().expect("spawn the inotify holder"),
        _watched: None,
    };
    let held = inotify_fds_of(holder.child.id()).len();
    if held != limit {
        panic!(
            "the holder as user {uid} took {held} inotify instances, not the {limit} left to it"
        );
    }
    holder
}

/// Starts an [`InotifyHolder`] that holds all but `free` of the inotify watches user `uid` may
/// have, in a few instances, and checks it does. The user must hold none before.
pub fn hold_inotify_watches(uid: u32, free: usize) -> InotifyHolder {
    let held = inotify_limit("max_user_watches")
        .checked_sub(free)
        .expect("more watches to leave free than a user may have");
    // An instance watches an inode once: with this many directories, a quarter of the
    // instances the user may have hold them all, and the rest stay for the agent.
    let instances = (inotify_limit("max_user_instances") / 4).max(1);
    let dirs = TempDir::new("watches");
    fs::set_permissions(dirs.path(), fs::Permissions::from_mode(0o755))
        .expect("chmod the directory");
    let paths: Vec<CString> = (0..held.div_ceil(instances))
        .map(|n| {
            let path = dirs.path().join(n.to_string());
            fs::create_dir(&path).expect("a directory to watch");
            // Readable by the user whatever the umask: inotify needs read permission.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                .expect("chmod the directory");
            CString::new(path.into_os_string().into_encoded_bytes()).expect("no NUL")
        })
        .collect();
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    // SAFETY: the calls of become_user, die_with_parent, inotify_init and inotify_add_watch,
    // none of which allocate.
    unsafe {
        cmd.pre_exec(move || {
            become_user(uid, false)?;
            die_with_parent()?;
            let mut left = held;
            while left > 0 {
                // Not close-on-exec: `sleep` holds them.
                let fd = libc::inotify_init();
                os_check(fd.into())?;
                for path in paths.iter().take(left) {
                    os_check(libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_ATTRIB).into())?;
                }
                left -= paths.len().min(left);
            }
            Ok(())
        });
    }
    let holder = InotifyHolder {
        child: cmd.spawn().expect("spawn the inotify holder"),
        _watched: Some(dirs),
    };
    let holds = inotify_watches_of(holder.child.id());
    assert_eq!(
        holds, held,
        "the holder as user {uid} holds {holds} inotify watches, not {held}"
    );
    holder
}

/// A child process killed and reaped on drop, also when the test fails.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `check` returns `Some`, or panics after `timeout` with `what`.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many connections to the Unix socket at `path` (in this network namespace) wait to be
/// accepted: the kernel lists each with its listener's path, and without an inode until then.
pub fn unix_accept_queue(path: &Path) -> usize {
    let path = path.to_str().expect("a UTF-8 path");
    fs::read_to_string("/proc/net/unix")
        .expect("/proc/net/unix")
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(7) == Some(&path) && fields.get(6) == Some(&"0")
        })
        .count()
}

/// How many connections wait to be accepted by the listener on 127.0.0.1:`port`: its receive
/// queue in /proc/net/tcp. Panics if nothing listens there.
pub fn tcp_accept_queue(port: u16) -> u64 {
    let local = format!("0100007F:{port:04X}");
    let table = fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let listener = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
        .unwrap_or_else(|| panic!("nothing listens on 127.0.0.1:{port}"));
    let queues = listener.get(4).expect("tx_queue:rx_queue");
    let rx = queues.split_once(':').expect("tx_queue:rx_queue").1;
    u64::from_str_radix(rx, 16).expect("a hex queue length")
}

/// Seconds since the Unix epoch of a `status` timestamp (`YYYY-MM-DDTHH:MM:SSZ`, UTC).
pub fn unix_seconds(stamp: &Value) -> i64 {
    let text = stamp
        .as_str()
        .unwrap_or_else(|| panic!("a timestamp: {stamp}"));
    let field = |range: std::ops::Range<usize>| -> i64 {
        text.get(range)
            .and_then(|digits| digits.parse().ok())
            .unwrap_or_else(|| panic!("RFC 3339 in seconds: {text}"))
    };
    assert!(
        text.len() == 20 && text.ends_with('Z'),
        "RFC 3339 in seconds: {text}"
    );
    let (year, month, day) = (field(0..4), field(5..7), field(8..10));
    // Days from 1970-01-01 to the date (the proleptic Gregorian calendar, years from March).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    days * 86_400 + field(11..13) * 3600 + field(14..16) * 60 + field(17..19)
}

/// Asserts that a `status` timestamp lies between `since` and now (whole seconds, so one
/// second of slack each way): the program's clock and the agent's conversion agree.
pub fn assert_stamped_between(stamp: &Value, since: std::time::SystemTime, what: &str) {
    let secs = |time: std::time::SystemTime| {
        time.duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as i64
    };
    let (from, to) = (secs(since) - 1, secs(std::time::SystemTime::now()) + 1);
    let at = unix_seconds(stamp);
    assert!(
        (from..=to).contains(&at),
        "{what}: {stamp} is not between {from} and {to} (Unix seconds)"
    );
}

/// keepalive, idle, interval, count.
pub type Values = (i64, i64, i64, i64);

/// The keepalive values a helper reported, as (keepalive, idle, interval, count).
pub fn values(opts: &Value) -> Values {
    let get = |k: &str| {
        opts[k]
            .as_i64()
            .unwrap_or_else(|| panic!("no {k} in {opts}"))
    };
    (get("keepalive"), get("idle"), get("interval"), get("count"))
}

/// Kernel defaults for a socket nobody touched (Linux: keepalive off, 7200/75/9).
pub fn kernel_defaults() -> Values {
    let read = |name: &str| -> i64 {
        fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .expect("sysctl")
            .trim()
            .parse()
            .expect("number")
    };
    (
        0,
        read("tcp_keepalive_time"),
        read("tcp_keepalive_intvl"),
        read("tcp_keepalive_probes"),
    )
}

/// A `ka-sock listen` on loopback, and the clients connected to it, which stay connected while
/// it lives.
pub struct Listener {
    server: Proc,
    addr: String,
    clients: Vec<Proc>,
}

impl Listener {
    /// `ka-sock listen ADDR N EXTRA…` (127.0.0.1, at the port of `addr`) inside `cgroup` and,
    /// with one, `netns`: it accepts `n` connections.
    pub fn at(
        cgroup: &TestCgroup,
        netns: Option<&Netns>,
        addr: &str,
        n: &str,
        extra: &[&str],
    ) -> Self {
        let args = [&["listen", addr, n], extra].concat();
        let mut server = Proc::spawn(&sock_bin(), &args, Some(cgroup.path()), netns);
        let port = server.read()["port"].as_u64().expect("the listener's port");
        Self {
            server,
            addr: format!("127.0.0.1:{port}"),
            clients: Vec::new(),
        }
    }

    /// [`Listener::at`] a port the kernel picks, in the test's network namespace.
    pub fn start(cgroup: &TestCgroup, n: &str, extra: &[&str]) -> Self {
        Self::at(cgroup, None, "127.0.0.1:0", n, extra)
    }

    /// Connects a client from `cgroup` (and `netns`) and returns what the listener printed for
    /// the connection it accepted: the `listener`'s options and the `accepted` socket's.
    pub fn accept(&mut self, cgroup: &TestCgroup, netns: Option<&Netns>) -> Value {
        let mut client = Proc::spawn(
            &sock_bin(),
            &["connect", &self.addr],
            Some(cgroup.path()),
            netns,
        );
        client.read();
        self.clients.push(client);
        self.server.read()
    }

    /// The options of the connection [`Listener::accept`] accepted.
    pub fn accepted(&mut self, cgroup: &TestCgroup, netns: Option<&Netns>) -> Value {
        self.accept(cgroup, netns)["accepted"].take()
    }
}

/// Opens a loopback pair inside `cgroup` and returns the client's and server's values.
pub fn pair_values(cgroup: &TestCgroup) -> (Values, Values) {
    let mut pair = Proc::sock(&["pair", "4"], cgroup);
    let out = pair.read();
    (values(&out["client"]), values(&out["server"]))
}

/// The idle time a new connection's client end gets inside `cgroup`.
pub fn idle_of(cgroup: &TestCgroup) -> i64 {
    pair_values(cgroup).0.1
}

/// The sockets of `status --json` whose own cgroup is `cgroup`.
pub fn sockets_of(status: &Value, cgroup: &TestCgroup) -> Vec<Value> {
    status["sockets"]
        .as_array()
        .expect("sockets array")
        .iter()
        .filter(|s| s["cgroup"] == cgroup.display())
        .cloned()
        .collect()
}

/// The per-cgroup row of `status --json` for `cgroup`; panics if there is none.
pub fn cgroup_row(status: &Value, cgroup: &TestCgroup) -> Value {
    status["cgroups"]
        .as_array()
        .expect("cgroups array")
        .iter()
        .find(|c| c["cgroup"] == cgroup.display())
        .cloned()
        .unwrap_or_else(|| panic!("no row for {} in {status}", cgroup.display()))
}

/// The cgroup ids of the per-cgroup rows of `status --json`, removed cgroups' included.
pub fn cgroup_ids(status: &Value) -> Vec<u64> {
    status["cgroups"]
        .as_array()
        .expect("cgroups array")
        .iter()
        .map(|row| row["cgroup_id"].as_u64().expect("a cgroup id"))
        .collect()
}

/// A config file in a fresh temporary path, removed when dropped.
#[derive(Debug)]
pub struct TempConfig(PathBuf);

impl std::ops::Deref for TempConfig {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempConfig {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A loopback port free at the time of the call, below the ephemeral range: the storms that
/// tests run side by side take every port of that range in turn as connections' local ports,
/// and one of those at the moment an agent binds its metrics port would make it fail.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("net.ipv4.ip_local_port_range");
    let low: u32 = range
        .split_whitespace()
        .next()
        .and_then(|low| low.parse().ok())
        .expect("the range's low end");
    let (first, span) = (1024, low.saturating_sub(1024).max(1));
    // Spread by process, so that test binaries running at once start apart.
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = first + start.wrapping_add(n.wrapping_mul(101)) % span;
        let port = u16::try_from(port).expect("below the ephemeral range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {low}");
}

/// Writes a config file into a fresh temporary path.
pub fn write_config(text: &str) -> TempConfig {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("config")));
    let mut file = File::create(&path).expect("config file");
    file.write_all(text.as_bytes()).expect("write config");
    TempConfig(path)
}

/// A fresh directory below the temporary directory, removed with what it holds on drop (also
/// when the test fails).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(unique(label));
        fs::create_dir(&path).expect("create temporary directory");
        Self(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` with its stderr in a file that it takes for the journal (`JOURNAL_STREAM`, as
/// systemd sets it up); its exit code and what it wrote there.
pub fn stderr_as_journal(mut cmd: Command) -> (Option<i32>, String) {
    use std::os::unix::fs::MetadataExt as _;
    let dir = TempDir::new("journal");
    let path = dir.path().join("stderr");
    let file = File::create(&path).expect("journal file");
    let meta = file.metadata().expect("journal file");
    cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdout(Stdio::null())
        .stderr(file);
    let code = cmd.status().expect("run").code();
    (code, fs::read_to_string(&path).expect("journal file"))
}

/// Runs the agent binary with `dirs` and `args` in a private mount namespace prepared by
/// `setup`, which runs in the child between fork and exec (so it may only make system calls).
/// Mounts are made private first, so nothing `setup` unmounts leaves the namespace.
pub fn agent_in_private_mounts(
    dirs: &AgentDirs,
    args: &[&str],
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> Output {
    in_private_mounts(dirs, dirs.command(args), setup)
}

/// [`agent_in_private_mounts`] for any command of the agent binary that uses `dirs`.
pub fn in_private_mounts(
    dirs: &AgentDirs,
    mut cmd: Command,
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> Output {
    private_mounts(&mut cmd, setup);
    let out = dirs.output(cmd);
    // The agent takes its lock before it fails on what `setup` broke.
    let _ = fs::remove_dir_all(&dirs.runtime_dir);
    out
}

/// Makes `cmd` run in a private mount namespace prepared by `setup`, which runs in the child
/// between fork and exec (so it may only make system calls). Mounts are made private first, so
/// nothing `setup` changes leaves the namespace.
pub fn private_mounts(
    cmd: &mut Command,
    mut setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) {
    // SAFETY: the closure only makes system calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let root = c"/";
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            setup()
        });
    }
}

/// Unmounts `path` (lazily) inside a private mount namespace; for `agent_in_private_mounts`.
pub fn umount(path: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts an empty tmpfs over `path`; for `agent_in_private_mounts`.
pub fn hide_with_tmpfs(path: &std::ffi::CStr) -> std::io::Result<()> {
    mount_new(c"tmpfs", path, 0)
}

/// Mounts a new file system of type `fstype` at `path` with mount `flags` (`MS_RDONLY`, say);
/// for `private_mounts` set-ups.
pub fn mount_new(
    fstype: &std::ffi::CStr,
    path: &std::ffi::CStr,
    flags: libc::c_ulong,
) -> std::io::Result<()> {
    // SAFETY: mount with valid C strings.
    if unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `path` a symbolic link to `target`; for `private_mounts` set-ups.
pub fn symlink(target: &std::ffi::CStr, path: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: symlink with valid C strings.
    if unsafe { libc::symlink(target.as_ptr(), path.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes an empty file at `path`; for `private_mounts` set-ups.
pub fn create_file(path: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: open with a valid C string; the descriptor is closed at once.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened here.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Makes directory `path`; for `private_mounts` set-ups.
pub fn mkdir(path: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: mkdir with a valid C string.
    if unsafe { libc::mkdir(path.as_ptr(), 0o755) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bind-mounts `from` over `to`; for `private_mounts` set-ups.
pub fn bind_mount(from: &std::ffi::CStr, to: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: mount with valid C strings.
    if unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Exit code of a finished command.
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON refusal a `policy … --json` command printed: exit `expected`, `ok` false, the same
/// code in the document, and its `error` also on stderr.
pub fn json_refusal(out: &Output, expected: i32) -> Value {
    assert_eq!(code(out), expected, "{}", stderr(out));
    let answer: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(
        (&answer["ok"], &answer["code"]),
        (&false.into(), &expected.into())
    );
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty() && stderr(out).contains(e)),
        "{answer}"
    );
    answer
}

/// Queries the sock_ops programs attached directly to a cgroup (via bpftool-free syscall).
pub fn sockops_attachments(cgroup: &Path) -> usize {
    attachments(cgroup, 3) // BPF_CGROUP_SOCK_OPS
}

/// Queries the setsockopt programs (lock mode's) attached directly to a cgroup.
pub fn setsockopt_attachments(cgroup: &Path) -> usize {
    attachments(cgroup, 22) // BPF_CGROUP_SETSOCKOPT
}

/// How many programs of `attach_type` are attached directly to a cgroup.
fn attachments(cgroup: &Path, attach_type: u32) -> usize {
    attached_ids(cgroup, attach_type).len()
}

/// The ids of the programs of `attach_type` attached directly to a cgroup.
fn attached_ids(cgroup: &Path, attach_type: u32) -> Vec<u32> {
    let dir = File::open(cgroup).expect("open cgroup");
    let mut ids = [0u32; 64];
    // union bpf_attr for BPF_PROG_QUERY: target_fd, attach_type, query_flags, attach_flags,
    // prog_ids (u64), prog_cnt.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(dir.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    // SAFETY: BPF_PROG_QUERY (16) reads and writes within `attr` and `ids`.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, 16, attr.as_mut_ptr(), attr.len()) };
    assert_eq!(
        ret,
        0,
        "BPF_PROG_QUERY: {}",
        std::io::Error::last_os_error()
    );
    let count = u32::from_ne_bytes(attr[24..28].try_into().expect("4 bytes")) as usize;
    ids[..count.min(ids.len())].to_vec()
}

/// The keepalive programs (sock_ops and lock mode's setsockopt) attached directly to a cgroup,
/// as `name (id N)`: every agent's, whatever its build or state directory.
pub fn keepalive_programs_at(cgroup: &Path) -> Vec<String> {
    // The kernel keeps the first 15 bytes of a program's name.
    let ours = |name: &str| {
        [keepalive_common::PROG_SOCKOPS, keepalive_common::PROG_LOCK]
            .iter()
            .any(|prog| !name.is_empty() && prog.starts_with(name))
    };
    [3, 22] // BPF_CGROUP_SOCK_OPS, BPF_CGROUP_SETSOCKOPT
        .into_iter()
        .flat_map(|attach_type| attached_ids(cgroup, attach_type))
        .filter_map(|id| Some((id, bpf::prog_name(id)?)))
        .filter(|(_, name)| ours(name))
        .map(|(id, name)| format!("{name} (id {id})"))
        .collect()
}

/// Why the tests cannot run on this host, if keepalive enforcement is attached at the cgroup2
/// root: every test cgroup lies below it, and that program, running after the test agents'
/// own, would set its policy over theirs, failing tests for no fault of theirs. Needs root.
pub fn host_enforcement() -> Option<String> {
    let root = cgroup2_mount();
    let found = keepalive_programs_at(&root);
    (!found.is_empty()).then(|| {
        format!(
            "keepalive enforcement is attached at the cgroup2 root {} ({}), left by an agent \
             run on this host: enforcement stays after the agent stops, by design. It would set \
             its policy over every test agent's. Remove it with `cargo xtask run -- detach` \
             (add `--state-dir DIR` for another state directory than the default) and run the \
             tests again",
            root.display(),
            found.join(", ")
        )
    })
}

/// Panics, in every test that makes a cgroup, with [`host_enforcement`]'s reason.
fn refuse_host_enforcement() {
    static FOUND: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if let Some(why) = FOUND.get_or_init(host_enforcement) {
        panic!("{why}");
    }
}

/// The number in `text` between `before` and `after` (a count in a log line or a `check`
/// detail); panics naming the text if there is none.
pub fn count_between(text: &str, before: &str, after: &str) -> u64 {
    text.split_once(before)
        .and_then(|(_, rest)| rest.split_once(after))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no count between {before:?} and {after:?} in {text}"))
}
