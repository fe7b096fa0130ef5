//! Deployment on a real host: `check` reports readiness truthfully, the agent pings the systemd
//! watchdog, and it runs with exactly the capabilities the unit and the DaemonSet grant.

use std::{ffi::CString, os::unix::process::CommandExt as _, time::Duration};

use keepalive_tests::{
    Agent, AgentDirs, Netns, Proc, TestCgroup, agent_in_private_mounts, cgroup2_mount, code,
    count_between, drop_caps_except, require_root, sock_bin, sockops_attachments, stderr, umount,
    values,
};
use serde_json::Value;

/// The capabilities the systemd unit and the DaemonSet grant (linux/capability.h numbers):
/// CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF.
const GRANTED: [u32; 5] = [12, 19, 21, 38, 39];

fn check_item<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

#[test]
fn check_reports_a_ready_host_and_probes_every_program() {
    require_root();
    let dirs = AgentDirs::new();
    let out = dirs.cli(&["check", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("check --json is JSON");
    assert_eq!(code(&out), 0, "{report:#}");
    assert_eq!(report["ready"], true);
    for name in [
        "kernel",
        "btf",
        "cgroup2",
        "bpffs",
        "privileges",
        "sock_ops",
        "cgroup/setsockopt",
        "iter/tcp",
        "iter/bpf_map_elem",
    ] {
        assert_eq!(
            check_item(&report, name)["status"],
            "ok",
            "{name}: {report:#}"
        );
    }
    let human = String::from_utf8(dirs.cli(&["check"]).stdout).unwrap();
    assert!(
        human.contains("ready: this host can run keepalive-agent"),
        "{human}"
    );
}

#[test]
fn check_names_what_to_fix_when_the_host_is_not_ready() {
    require_root();
    let dirs = AgentDirs::new();
    let out = dirs
        .command(&["check", "--json"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let privileges = check_item(&report, "privileges");
    assert_eq!(privileges["status"], "fail");
    assert!(
        privileges["fix"].as_str().unwrap().contains("root"),
        "{privileges}"
    );

    let mount = CString::new(cgroup2_mount().to_str().unwrap()).unwrap();
    let out = agent_in_private_mounts(&dirs, &["check", "--json"], move || umount(&mount));
    assert_eq!(code(&out), 8);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cgroup2 = check_item(&report, "cgroup2");
    assert_eq!(cgroup2["status"], "fail", "{report:#}");
    assert!(
        cgroup2["fix"]
            .as_str()
            .unwrap()
            .contains("mount -t cgroup2"),
        "{cgroup2}"
    );
}

#[test]
fn check_warns_when_many_namespaces_with_sockets_share_the_host_tcp_hash() {
    require_root();
    let child_hash = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_child_ehash_entries")
        .expect("Linux 6.1+ has net.ipv4.tcp_child_ehash_entries");
    assert_eq!(
        child_hash.trim(),
        "0",
        "this test needs the default net.ipv4.tcp_child_ehash_entries = 0, so new namespaces \
         share the host's TCP hash"
    );
    // Ten namespaces, each with one listener: every apply pass walks the host's hash ten
    // more times. Other tests' namespaces can only raise the count.
    let namespaces: Vec<Netns> = (0..10).map(|_| Netns::new("shared")).collect();
    let _listeners: Vec<Proc> = namespaces
        .iter()
        .map(|ns| {
            let mut listener = Proc::spawn(&sock_bin(), &["listen", "127.0.0.1:0"], None, Some(ns));
            listener.read();
            listener
        })
        .collect();
    let out = AgentDirs::new().cli(&["check", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("check --json is JSON");
    let item = check_item(&report, "network namespaces");
    assert_eq!(item["status"], "warn", "{item}");
    let shared = count_between(item["detail"].as_str().unwrap(), "; ", " with TCP sockets");
    assert!(shared >= 10, "{item}");
    assert!(
        item["fix"]
            .as_str()
            .is_some_and(|fix| fix.contains("tcp_child_ehash_entries")),
        "{item}"
    );
}

#[test]
fn the_agent_pings_the_systemd_watchdog() {
    let cg = TestCgroup::new("watchdog");
    let mut agent = Agent::start_with(
        &AgentDirs::new(),
        &["run", "--cgroup", cg.path().to_str().unwrap()],
        &[("WATCHDOG_USEC", "400000")],
        None,
    );
    agent.wait_notify("WATCHDOG=1", Duration::from_secs(2));
    agent.wait_notify("WATCHDOG=1", Duration::from_secs(2));
}

#[test]
fn the_agent_runs_with_only_the_granted_capabilities() {
    let cg = TestCgroup::new("caps");
    let _agent = Agent::start_with(
        &AgentDirs::new(),
        &[
            "run",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--idle",
            "14",
        ],
        &[],
        Some(&GRANTED),
    );
    let mut pair = Proc::sock(&["pair", "4"], &cg);
    let out = pair.read();
    assert_eq!(values(&out["client"]).1, 14);
    assert_eq!(values(&out["server"]).1, 14);
}

#[test]
fn check_warns_which_capability_other_namespaces_need() {
    require_root();
    let dirs = AgentDirs::new();
    let check_with = |keep: Vec<u32>| -> Value {
        let mut cmd = dirs.command(&["check", "--json"]);
        // SAFETY: prctl calls only.
        unsafe {
            cmd.pre_exec(move || drop_caps_except(&keep));
        }
        serde_json::from_slice(&cmd.output().unwrap().stdout).expect("check --json is JSON")
    };
    let granted = check_with(GRANTED.to_vec());
    assert!(
        granted["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["name"] != "namespaces"),
        "{granted:#}"
    );
    // Without CAP_SYS_PTRACE other users' /proc/<pid>/ns/net cannot be opened.
    let report = check_with(GRANTED.into_iter().filter(|&c| c != 19).collect());
    let item = check_item(&report, "namespaces");
    assert_eq!(item["status"], "warn", "{item}");
    assert!(
        item["detail"].as_str().unwrap().contains("CAP_SYS_PTRACE"),
        "{item}"
    );
    assert_eq!(report["ready"], true, "new connections are still enforced");
}

#[test]
fn without_cap_net_admin_the_agent_refuses_clearly() {
    let cg = TestCgroup::new("nocap");
    let dirs = AgentDirs::new();
    let keep: Vec<u32> = GRANTED.into_iter().filter(|&c| c != 12).collect();
    let mut cmd = dirs.command(&["run", "--cgroup", cg.path().to_str().unwrap()]);
    // SAFETY: prctl calls only.
    unsafe {
        cmd.pre_exec(move || drop_caps_except(&keep));
    }
    let out = dirs.output(cmd);
    let err = stderr(&out);
    assert_eq!(code(&out), 3, "{err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert_eq!(sockops_attachments(cg.path()), 0);
}
