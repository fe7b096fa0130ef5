//! Deployment on a real host: `check` reports readiness truthfully, the agent pings the systemd
//! watchdog, it runs with exactly the capabilities the unit and the DaemonSet grant, and the
//! shipped unit starts, reloads and stops it under a real systemd.

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    process::Command,
    time::Duration,
};

use keepalive_tests::{
    Agent, AgentDirs, DetachOnDrop, GRANTED, Netns, Proc, Reaped, TestCgroup, agent_bin,
    agent_in_private_mounts, cgroup2_mount, check_item, code, count_between, drop_caps_except,
    eventually, free_port, hide_with_tmpfs, in_private_mounts, mount_new, require_root, sock_bin,
    sockops_attachments, stderr, stdout, umount, values, write_config,
};
use serde_json::Value;

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
        "config",
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

/// The agent binary with `args` and the runtime directory of `dirs`, but no --state-dir: the
/// state directory must come from a config.
fn without_state_dir(dirs: &AgentDirs, args: &[&str]) -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("--runtime-dir").arg(&dirs.runtime_dir).args(args);
    cmd
}

#[test]
fn status_detach_and_check_find_the_state_of_the_config_they_are_given() {
    let cg = TestCgroup::new("otherconfig");
    let dirs = AgentDirs::new();
    let good = write_config(&format!(
        "state_dir = \"{}\"\nattach = \"{}\"\n[default]\nidle = 41\n",
        dirs.state_dir.display(),
        cg.path().display()
    ));
    let bad = write_config("[default]\nidle = 5\nidel = 6\n");
    let agent = Agent::start_raw(&dirs, &["run", "--config", good.to_str().unwrap()]);
    let run = |args: &[&str]| dirs.output(without_state_dir(&dirs, args));

    let out = run(&["status", "--json", "--config", good.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["attach_cgroup"], cg.display(), "{status}");

    // `check` with `config`: its exit code, its config item's status and what the item names.
    let check = |config: &Path, want: (i32, &str), names: &str| -> Value {
        let out = run(&["check", "--json", "--config", config.to_str().unwrap()]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let item = check_item(&report, "config");
        assert_eq!(
            (code(&out), item["status"].as_str().unwrap()),
            want,
            "{report:#}"
        );
        assert!(item["detail"].as_str().unwrap().contains(names), "{item}");
        report
    };
    let report = check(&good, (0, "ok"), &cg.display());
    let keepalive = check_item(&report, "keepalive")["detail"].as_str().unwrap();
    assert!(
        keepalive.contains(&format!("attached to {}", cg.display()))
            && keepalive.contains(&format!("pid {}", agent.pid())),
        "{keepalive}"
    );

    // A config given by name must be valid.
    let at_line = format!("{}:3", bad.display());
    for args in [&["status"][..], &["detach"]] {
        let mut args = args.to_vec();
        args.extend(["--config", bad.to_str().unwrap()]);
        let out = run(&args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(&at_line), "{}", stderr(&out));
    }
    assert_eq!(sockops_attachments(cg.path()), 1, "detach refused");
    let report = check(&bad, (8, "fail"), &at_line);
    // What it says of the state is of the default directory, not the config's.
    let directories = check_item(&report, "directories")["detail"]
        .as_str()
        .unwrap();
    assert!(
        directories.contains("the default state directory: the config, which may name another"),
        "{directories}"
    );
    // An attach cgroup that does not exist yet: `run` waits for it (exit 4, retried).
    let missing = cg.path().join("not-yet");
    let later = write_config(&format!("attach = \"{}\"\n", missing.display()));
    check(&later, (0, "warn"), "does not exist (yet)");
    // Another attach cgroup than the pinned one: `run` refuses to move enforcement.
    let other = TestCgroup::new("otherattach");
    let moved = write_config(&format!(
        "state_dir = \"{}\"\nattach = \"{}\"\n",
        dirs.state_dir.display(),
        other.path().display()
    ));
    let report = check(&moved, (8, "ok"), &other.display());
    let keepalive = check_item(&report, "keepalive");
    assert_eq!(keepalive["status"], "fail", "{keepalive}");
    assert!(
        keepalive["fix"].as_str().unwrap().contains(&format!(
            "`keepalive-agent --state-dir {} detach`",
            dirs.state_dir.display()
        )),
        "{keepalive}"
    );
    // `--cgroup` overrides the config's attach, as it does for `run`.
    let out = run(&[
        "check",
        "--json",
        "--config",
        good.to_str().unwrap(),
        "--cgroup",
        other.path().to_str().unwrap(),
    ]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(code(&out), 8, "{report:#}");
    assert_eq!(
        check_item(&report, "keepalive")["status"],
        "fail",
        "{report:#}"
    );

    // The default config is read only when it exists. An error in it is a warning for
    // `status`, and an error for `detach`, which could otherwise remove another directory.
    let with_broken_default = |args: &[&str]| {
        let config_dir = CString::new("/etc/keepalive-agent").unwrap();
        let config_file = CString::new("/etc/keepalive-agent/config.toml").unwrap();
        in_private_mounts(&dirs, without_state_dir(&dirs, args), move || {
            hide_with_tmpfs(c"/etc")?;
            // SAFETY: mkdir, open, write and close with valid C strings and buffers.
            unsafe {
                libc::mkdir(config_dir.as_ptr(), 0o755);
                let fd = libc::open(config_file.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o644);
                let text = b"[default]\nidel = 6\n";
                libc::write(fd, text.as_ptr().cast(), text.len());
                libc::close(fd);
            }
            Ok(())
        })
    };
    let err = stderr(&with_broken_default(&["status"]));
    assert!(
        err.contains("ignoring the config: /etc/keepalive-agent/config.toml:2")
            && err.contains("looking for keepalive's state in /sys/fs/bpf/keepalive"),
        "{err}"
    );
    let out = with_broken_default(&["detach"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot tell which state directory the config names"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_names_what_to_fix_when_the_host_is_not_ready() {
    require_root();
    let dirs = AgentDirs::new();
    let mut cmd = dirs.command(&["check", "--json"]);
    cmd.uid(65534).gid(65534);
    let out = dirs.output(cmd);
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
fn a_state_directory_the_agent_may_only_read_exits_5_and_check_warns_off_sys_fs_bpf() {
    // As under the systemd unit, where ProtectSystem=strict leaves only /sys/fs/bpf writable:
    // a bpffs elsewhere, read-only in the agent's mount namespace.
    let cg = TestCgroup::new("robpf");
    let bpffs = std::env::temp_dir().join(keepalive_tests::unique("robpf"));
    std::fs::create_dir(&bpffs).unwrap();
    let dirs = AgentDirs {
        state_dir: bpffs.join("keepalive"),
        ..AgentDirs::new()
    };
    let target = CString::new(bpffs.to_str().unwrap()).unwrap();
    let read_only_bpffs = move || mount_new(c"bpf", &target, libc::MS_RDONLY);
    let check = agent_in_private_mounts(
        &dirs,
        &["check", "--json", "--cgroup", cg.path().to_str().unwrap()],
        read_only_bpffs.clone(),
    );
    let run = agent_in_private_mounts(
        &dirs,
        &["run", "--cgroup", cg.path().to_str().unwrap()],
        read_only_bpffs,
    );
    std::fs::remove_dir(&bpffs).unwrap();
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    let item = check_item(&report, "directories");
    assert_eq!(item["status"], "warn", "{report:#}");
    assert!(
        item["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("ReadWritePaths={}", dirs.state_dir.display())),
        "{item}"
    );
    // Exit 5, which the unit does not retry, with the way out; not 1, retried every 2 s.
    assert_eq!(code(&run), 5, "{}", stderr(&run));
    assert!(
        stderr(&run).contains("may only read") && stderr(&run).contains("ReadWritePaths="),
        "{}",
        stderr(&run)
    );
    assert_eq!(sockops_attachments(cg.path()), 0, "nothing attached");
    // Below /sys/fs/bpf, made read-only (as ProtectKernelTunables= does): no advice to move
    // to where it already is.
    let read_only_sys_fs_bpf = || {
        // SAFETY: mount with a valid C string; a read-only remount of an existing mount.
        if unsafe {
            libc::mount(
                std::ptr::null(),
                c"/sys/fs/bpf".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let run = agent_in_private_mounts(
        &AgentDirs::new(),
        &["run", "--cgroup", cg.path().to_str().unwrap()],
        read_only_sys_fs_bpf,
    );
    assert_eq!(code(&run), 5, "{}", stderr(&run));
    assert!(
        stderr(&run).contains("/sys/fs/bpf is mounted read-only here")
            && !stderr(&run).contains("ReadWritePaths="),
        "{}",
        stderr(&run)
    );
}

/// `status`, `detach` and `check` without --state-dir (or --cgroup) look where the config
/// says, so `run` given another warns, at start and at each reload: a file that names another
/// one is taken up without its `attach` or `state_dir` applying.
#[test]
fn run_warns_when_its_state_dir_or_cgroup_overrides_the_configs() {
    let cg = TestCgroup::new("statedirflag");
    let dirs = AgentDirs::new();
    let elsewhere = AgentDirs::new().state_dir;
    let metrics = format!("127.0.0.1:{}", free_port());
    let file = |state_dir: &std::path::Path, attach: &str, metrics: &str| {
        format!(
            "state_dir = \"{}\"\nattach = \"{attach}\"\nmetrics = \"{metrics}\"\n",
            state_dir.display()
        )
    };
    let config = write_config(&file(&elsewhere, "/ka-nowhere", "127.0.0.1:1"));
    let agent = Agent::start_in(
        &dirs,
        &cg,
        &["--config", config.to_str().unwrap(), "--metrics", &metrics],
    );
    let warnings = |state_dir: &std::path::Path, attach: &str| {
        [
            format!(
                "--state-dir {} given to `run` takes the place of state_dir = \"{}\" at {}:1; \
                 `status`, `detach` and `check` find this agent's state only when given the \
                 same --state-dir",
                dirs.state_dir.display(),
                state_dir.display(),
                config.display()
            ),
            format!(
                "--cgroup {} given to `run` takes the place of attach = \"{attach}\" at {}:2",
                cg.display(),
                config.display()
            ),
            format!(
                "--metrics {metrics} given to `run` takes the place of metrics = \
                 \"127.0.0.1:1\" at {}",
                config.display()
            ),
        ]
    };
    for warning in warnings(&elsewhere, "/ka-nowhere") {
        assert!(agent.log().contains(&warning), "{warning}\n{}", agent.log());
    }
    assert!(dirs.state_dir.exists() && !elsewhere.exists());
    // A reload says so again, also for values the file did not have before.
    let other = AgentDirs::new().state_dir;
    std::fs::write(&config, file(&other, "/ka-elsewhere", "127.0.0.1:1")).unwrap();
    let out = agent.cli_ok(&["policy", "reload"]);
    for warning in warnings(&other, "/ka-elsewhere") {
        assert!(
            stdout(&out).contains(&format!("warning: {warning}")),
            "{warning}\n{}",
            stdout(&out)
        );
    }
    // The same directory and cgroup named twice, spelt otherwise, are no override.
    drop(agent);
    let same = write_config(&file(&dirs.state_dir, &format!("{}/", cg.rel()), &metrics));
    let agent = Agent::start_in(
        &dirs,
        &cg,
        &["--config", same.to_str().unwrap(), "--metrics", &metrics],
    );
    assert!(!agent.log().contains("takes the place"), "{}", agent.log());
}

#[test]
fn check_through_another_runtime_directory_says_an_agent_holds_the_state() {
    let cg = TestCgroup::new("otherruntime");
    let agent = Agent::start(&cg, &["--idle", "41"]);
    let other = AgentDirs {
        runtime_dir: AgentDirs::new().runtime_dir,
        ..agent.dirs()
    };
    let out = other.cli(&["check", "--json", "--cgroup", cg.path().to_str().unwrap()]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let item = check_item(&report, "keepalive");
    let detail = item["detail"].as_str().unwrap();
    assert_eq!(item["status"], "warn", "{report:#}");
    assert!(
        detail.contains(&format!(
            "an agent holds {} but does not serve {}",
            other.state_dir.display(),
            other.runtime_dir.display()
        )) && !detail.contains("no agent is running"),
        "{item}"
    );
    assert!(item["fix"].as_str().unwrap().contains("exit 7"), "{item}");
    // What the warning says `run` does.
    let run = other.cli(&["run", "--cgroup", cg.path().to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&other.runtime_dir);
    assert_eq!(code(&run), 7, "{}", stderr(&run));
    // Through the agent's own runtime directory, all is well.
    let out = agent.cli(&["check", "--json", "--cgroup", cg.path().to_str().unwrap()]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let item = check_item(&report, "keepalive");
    assert_eq!(item["status"], "ok", "{report:#}");
    assert!(
        item["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {}", agent.pid())),
        "{item}"
    );
    // Unless its control socket was removed: it runs on, out of reach of `policy` commands.
    let socket = agent.dirs().runtime_dir.join("control.sock");
    std::fs::remove_file(&socket).unwrap();
    let out = agent.cli(&["check", "--json", "--cgroup", cg.path().to_str().unwrap()]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let item = check_item(&report, "keepalive");
    assert_eq!(
        (code(&out), &item["status"]),
        (0, &"warn".into()),
        "{report:#}"
    );
    assert!(
        item["detail"].as_str().unwrap().contains(&format!(
            "but its control socket {} is missing",
            socket.display()
        )),
        "{item}"
    );
}

#[test]
fn check_fails_on_what_run_would_refuse_about_its_directories_and_attach_cgroup() {
    let cg = TestCgroup::new("checkdirs");
    let check = |dirs: &AgentDirs, attach: &Path, name: &str| {
        let out = dirs.cli(&["check", "--json", "--cgroup", attach.to_str().unwrap()]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let item = check_item(&report, name).clone();
        (
            code(&out),
            item["status"].as_str().unwrap().to_owned(),
            item,
        )
    };
    let dirs = AgentDirs::new();
    let (rc, status, item) = check(&dirs, cg.path(), "directories");
    assert_eq!((rc, status.as_str()), (0, "ok"), "{item}");
    // The bpffs mount itself, which `run` refuses (exit 2), and a directory off bpffs (exit 5).
    for (state_dir, says) in [("/sys/fs/bpf", "mount point"), ("/tmp", "not on a bpf")] {
        let dirs = AgentDirs {
            state_dir: state_dir.into(),
            ..AgentDirs::new()
        };
        let (rc, status, item) = check(&dirs, cg.path(), "directories");
        assert_eq!((rc, status.as_str()), (8, "fail"), "{item}");
        assert!(item["detail"].as_str().unwrap().contains(says), "{item}");
    }
    // A runtime directory holding another service's files, which `run` refuses (exit 2).
    let shared = std::env::temp_dir().join(keepalive_tests::unique("shared-run"));
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("other.pid"), "1\n").unwrap();
    let dirs = AgentDirs {
        runtime_dir: shared.clone(),
        ..AgentDirs::new()
    };
    let (rc, status, item) = check(&dirs, cg.path(), "directories");
    std::fs::remove_dir_all(&shared).unwrap();
    assert_eq!((rc, status.as_str()), (8, "fail"), "{item}");
    assert!(
        item["detail"].as_str().unwrap().contains("other.pid"),
        "{item}"
    );
    // A runtime directory that is a file, or below one: refused (exit 2), not left to fail as
    // it is made.
    let file = std::env::temp_dir().join(keepalive_tests::unique("file-run"));
    std::fs::write(&file, "").unwrap();
    for runtime_dir in [file.clone(), file.join("run")] {
        let dirs = AgentDirs {
            runtime_dir,
            ..AgentDirs::new()
        };
        let (rc, status, item) = check(&dirs, cg.path(), "directories");
        let refused = dirs.cli(&["run", "--cgroup", cg.path().to_str().unwrap()]);
        let says = format!("{} is not a directory", file.display());
        assert_eq!((rc, status.as_str()), (8, "fail"), "{item}");
        assert!(item["detail"].as_str().unwrap().contains(&says), "{item}");
        assert_eq!(code(&refused), 2, "{}", stderr(&refused));
        assert!(stderr(&refused).contains(&says), "{}", stderr(&refused));
        assert!(!dirs.state_dir.exists());
    }
    std::fs::remove_file(&file).unwrap();
    // A runtime directory to be made below one that every user may write to, which `run`
    // refuses (exit 2): another user could swap it, and the agent's socket with it.
    let open = std::env::temp_dir().join(keepalive_tests::unique("open-run"));
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let dirs = AgentDirs {
        runtime_dir: open.join("run"),
        ..AgentDirs::new()
    };
    let (rc, status, item) = check(&dirs, cg.path(), "directories");
    assert_eq!((rc, status.as_str()), (8, "fail"), "{item}");
    assert!(
        item["detail"].as_str().unwrap().contains("(mode 0777)"),
        "{item}"
    );
    let refused = dirs.cli(&["run", "--cgroup", cg.path().to_str().unwrap()]);
    let made = open.join("run").exists();
    std::fs::remove_dir_all(&open).unwrap();
    assert!(!made, "refused before anything was created");
    assert_eq!(code(&refused), 2, "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("may write to"),
        "{}",
        stderr(&refused)
    );
    // An attach "cgroup" that is a file: `run` refuses it (exit 2), it will never appear.
    let (rc, status, item) = check(&AgentDirs::new(), &cg.path().join("cgroup.procs"), "config");
    assert_eq!((rc, status.as_str()), (8, "fail"), "{item}");
    assert!(
        item["detail"]
            .as_str()
            .unwrap()
            .contains("not a cgroup directory"),
        "{item}"
    );
    // A pattern given as --cgroup: the fix is the flag, not a file the operator never wrote.
    let (rc, status, item) = check(&AgentDirs::new(), &cg.path().join("svc-*"), "config");
    assert_eq!((rc, status.as_str()), (8, "fail"), "{item}");
    assert!(
        item["detail"].as_str().unwrap().contains("is a pattern")
            && item["fix"]
                .as_str()
                .unwrap()
                .starts_with("correct --cgroup"),
        "{item}"
    );
    assert_eq!(sockops_attachments(cg.path()), 0);
}

/// `n` network namespaces, each with a listener (so an apply pass walks its TCP hash).
fn namespaces_with_listeners(n: usize) -> Vec<(Netns, Proc)> {
    (0..n)
        .map(|_| {
            let ns = Netns::new("shared");
            let mut listener =
                Proc::spawn(&sock_bin(), &["listen", "127.0.0.1:0"], None, Some(&ns));
            listener.read();
            (ns, listener)
        })
        .collect()
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
    let _namespaces = namespaces_with_listeners(10);
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
        &[("WATCHDOG_USEC", "2000000")],
        None,
    );
    // systemd kills a service that lets its 2 s go by without a ping; the agent pings every
    // half of it, so that a busy moment does not.
    agent.wait_notify("WATCHDOG=1", Duration::from_secs(2));
    let mut last = std::time::Instant::now();
    let mut gaps: Vec<Duration> = (0..5)
        .map(|_| {
            agent.wait_notify("WATCHDOG=1", Duration::from_secs(2));
            let gap = last.elapsed();
            last = std::time::Instant::now();
            gap
        })
        .collect();
    gaps.sort();
    assert!(
        gaps[2] < Duration::from_millis(1500),
        "pings about every second, not {gaps:?}"
    );
}

#[test]
fn a_watchdog_timeout_of_0_is_no_watchdog() {
    // Not what systemd sets, but what an environment set by hand can hold.
    let cg = TestCgroup::new("watchdog0");
    let mut agent = Agent::start_with(
        &AgentDirs::new(),
        &["run", "--cgroup", cg.path().to_str().unwrap()],
        &[("WATCHDOG_USEC", "0")],
        None,
    );
    assert_eq!(
        agent.notified("WATCHDOG=1", Duration::from_secs(1)),
        Ok(None),
        "{}",
        agent.log()
    );
    agent.cli_ok(&["policy", "list"]);
}

/// The DaemonSet's liveness probe runs `policy list`, which the agent answers from its event
/// loop: a running agent answers at once, and an agent whose loop does not run (stopped here)
/// leaves it unanswered past the probe's 10 s timeout, so the kubelet restarts the agent. The
/// probe's command and timeout are checked against the manifest in
/// `keepalive-agent/tests/deploy.rs`.
#[test]
fn the_liveness_probe_goes_unanswered_while_the_agents_loop_does_not_run() {
    const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
    let cg = TestCgroup::new("liveness");
    let agent = Agent::start(&cg, &[]);
    let started = std::time::Instant::now();
    assert_eq!(code(&agent.cli(&["policy", "list"])), 0);
    assert!(started.elapsed() < Duration::from_secs(2));
    agent.pause();
    let mut probe = agent
        .dirs()
        .command(&["policy", "list"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run the probe's command");
    std::thread::sleep(PROBE_TIMEOUT);
    let after_timeout = probe.try_wait().expect("wait for the probe");
    let _ = probe.kill();
    let _ = probe.wait();
    agent.signal(libc::SIGCONT);
    assert!(
        after_timeout.is_none_or(|status| !status.success()),
        "a stopped agent passed the probe: {after_timeout:?}"
    );
    agent.cli_ok(&["policy", "list"]);
}

/// The agent's last log line about a pass over existing connections, and how long it took.
fn last_pass(log: &str) -> (String, f64) {
    let pass = log
        .lines()
        .rfind(|line| line.contains("network namespace"))
        .unwrap_or_else(|| panic!("no apply line in {log}"));
    let pass_ms: f64 = pass
        .rsplit_once(" in ")
        .and_then(|(_, took)| took.strip_suffix(" ms")?.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {pass}"));
    (pass.to_owned(), pass_ms)
}

#[test]
fn a_scrape_is_answered_while_an_apply_pass_holds_the_agent() {
    // A hundred namespaces with sockets: a pass walks a TCP hash a hundred and one times.
    let _namespaces = namespaces_with_listeners(100);
    let cg = TestCgroup::new("scrapepass");
    let port = free_port();
    let agent = Agent::start(&cg, &["--metrics", &format!("127.0.0.1:{port}")]);
    let (_, first_ms) = last_pass(&agent.log());
    let dirs = agent.dirs();
    let rel = cg.rel().to_owned();
    let pid = agent.pid();
    let first = keepalive_tests::bpf::apply_pass_started(pid);
    // A change of policy runs a pass like the first one on the agent's loop.
    let set = std::thread::spawn(move || dirs.cli_ok(&["policy", "set", &rel, "--idle", "41"]));
    eventually(
        Duration::from_secs(60),
        "the change's pass to start",
        || (keepalive_tests::bpf::apply_pass_started(pid) != first).then_some(()),
    );
    let started = std::time::Instant::now();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let scrape_ms = started.elapsed().as_secs_f64() * 1000.0;
    // The change answers once its pass is done.
    let during = !set.is_finished();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    set.join().unwrap();
    let (pass, pass_ms) = last_pass(&agent.log());
    assert!(
        first_ms >= 100.0 && pass_ms >= 100.0,
        "the passes took {first_ms} and {pass_ms} ms, too short to tell; this test needs more \
         namespaces"
    );
    // Started as the pass did, and served before it ended: not kept until it was done.
    assert!(
        during,
        "the change had its answer before the scrape did ({scrape_ms:.0} ms, {pass})"
    );
    assert!(
        scrape_ms < pass_ms / 2.0,
        "the scrape took {scrape_ms:.0} ms during a pass of {pass_ms} ms ({pass})"
    );
}

#[test]
fn the_watchdog_is_pinged_while_an_apply_pass_holds_the_agent() {
    // Thirty namespaces with sockets: a pass walks a TCP hash thirty-one times, far longer
    // than the 10 ms between pings.
    let _namespaces = namespaces_with_listeners(30);
    let cg = TestCgroup::new("watchdogpass");
    let config = write_config("[default]\nidle = 50\n");
    let mut agent = Agent::start_with(
        &AgentDirs::new(),
        &[
            "run",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[("WATCHDOG_USEC", "20000")],
        None,
    );
    // The first pass, before READY=1, pushes systemd's start timeout out, so that one over
    // thousands of namespaces does not outlast TimeoutStartSec=; once ready, it does not.
    assert!(
        agent
            .ready_lines()
            .iter()
            .any(|line| line == "EXTEND_TIMEOUT_USEC=30000000"),
        "{:?}",
        agent.ready_lines()
    );
    // A reload that changes the table runs a pass between RELOADING=1 and READY=1, with the
    // loop held.
    std::fs::write(&*config, "[default]\nidle = 51\n").unwrap();
    agent.signal(libc::SIGHUP);
    let lines = agent.wait_notify("READY=1", Duration::from_secs(60));
    let reloading = lines
        .iter()
        .position(|line| line == "RELOADING=1")
        .unwrap_or_else(|| panic!("no RELOADING=1 in {lines:?}"));
    let pings = lines[reloading..]
        .iter()
        .filter(|line| *line == "WATCHDOG=1")
        .count();
    let (pass, pass_ms) = last_pass(&agent.log());
    // A ping is due every 10 ms and the pass offers thirty moments for it: one at least must
    // come in a pass of twice that. Without pings from the pass there are none, however long.
    assert!(
        pass_ms >= 20.0,
        "the pass took {pass_ms} ms, too short to tell; this test needs more namespaces"
    );
    assert!(pings >= 1, "no ping during the pass ({pass}): {lines:?}");
    // systemd times a reload with TimeoutStartSec= too: its pass pushes that out as well.
    assert!(
        lines[reloading..]
            .iter()
            .any(|line| line == "EXTEND_TIMEOUT_USEC=30000000"),
        "no extension during the reload's pass ({pass}): {lines:?}"
    );
}

#[test]
fn a_change_shows_progress_to_systemd_and_to_its_client_while_its_pass_runs() {
    // Thirty namespaces with sockets: the pass has thirty moments between them to show
    // progress at, and shows it at the first.
    let _namespaces = namespaces_with_listeners(30);
    let cg = TestCgroup::new("progress");
    let config = write_config("[default]\nidle = 50\n");
    let dirs = AgentDirs::new();
    // No watchdog: the only notifications after ready are the extensions.
    let mut agent = Agent::start_with(
        &dirs,
        &[
            "run",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
        None,
    );
    let ready = agent.ready_lines().len();
    // `policy reload` as `systemctl reload` runs it, read byte for byte.
    std::fs::write(&*config, "[default]\nidle = 51\n").unwrap();
    let client =
        std::os::unix::net::UnixStream::connect(dirs.runtime_dir.join("control.sock")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    (&client).write_all(b"{\"cmd\":\"reload\"}\n").unwrap();
    let mut answer = Vec::new();
    (&client).read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (pass, _) = last_pass(&agent.log());
    assert!(
        count_between(&pass, "failed; ", " network namespace") >= 30,
        "the reload's pass did not walk the namespaces: {pass}"
    );
    // A space before the answer, which JSON allows: `policy` waits 120 s for each byte.
    assert!(answer.starts_with(' '), "no sign of progress: {answer:?}");
    let response: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(response["ok"], true, "{answer}");
    assert_eq!(keepalive_tests::idle_of(&cg), 51);
    // And systemd's reload timeout pushed out, after ready.
    let lines = agent
        .notified("EXTEND_TIMEOUT_USEC=30000000", Duration::from_secs(5))
        .unwrap_or_else(|status| panic!("the agent exited with {status}"))
        .unwrap_or_else(|| panic!("no extension during the pass ({pass}) after {ready} lines"));
    assert!(!lines.iter().any(|line| line == "READY=1"), "{lines:?}");
}

/// A request queued behind another's pass is shown progress too: requests are carried out one
/// at a time, and `policy` waits 120 s for each byte, so one behind a long pass gave up while
/// the agent was busy for it. Here a `list`, which makes no pass of its own, waits behind a
/// reload's.
#[test]
fn a_request_waiting_behind_another_requests_pass_is_shown_progress_too() {
    let _namespaces = namespaces_with_listeners(30);
    let cg = TestCgroup::new("queued");
    let config = write_config("[default]\nidle = 50\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    std::fs::write(&*config, "[default]\nidle = 51\n").unwrap();
    // Both requests are in before the agent takes either, the reload first.
    agent.pause();
    let reload = ask(&agent, b"{\"cmd\":\"reload\"}\n");
    let list = ask(&agent, b"{\"cmd\":\"list\"}\n");
    agent.signal(libc::SIGCONT);
    let (reloaded, listed) = (answer(reload), answer(list));
    assert_walked_30_namespaces(&agent);
    assert!(reloaded.starts_with(' '), "{reloaded:?}");
    assert!(listed.starts_with(' '), "no sign of progress: {listed:?}");
    assert_eq!(keepalive_tests::idle_of(&cg), 51);
}

/// A client that connects while a pass holds the agent is taken in during the pass and shown
/// progress as those before it are; before, it waited in the socket's backlog until the pass
/// ended, and `policy` gave up after 120 s of a long one.
#[test]
fn a_client_that_connects_during_a_pass_is_shown_progress_too() {
    let _namespaces = namespaces_with_listeners(30);
    let cg = TestCgroup::new("midpass");
    let config = write_config("[default]\nidle = 50\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    std::fs::write(&*config, "[default]\nidle = 51\n").unwrap();
    let reload = ask(&agent, b"{\"cmd\":\"reload\"}\n");
    // Its first space: the reload's pass has begun, at the first of its thirty moments to
    // show progress at, and holds the agent's loop. The agent stays there while the client
    // connects.
    let mut first = [0u8; 1];
    (&reload).read_exact(&mut first).unwrap();
    assert_eq!(&first, b" ");
    agent.pause();
    let list = ask(&agent, b"{\"cmd\":\"list\"}\n");
    agent.signal(libc::SIGCONT);
    let (_, listed) = (answer(reload), answer(list));
    assert_walked_30_namespaces(&agent);
    assert!(listed.starts_with(' '), "no sign of progress: {listed:?}");
    // Served after the reload.
    assert!(listed.contains("\"idle\":51"), "{listed}");
}

/// A client taken in during one pass is shown progress during the next, which can start before
/// the client's own task first runs: it is listed as it is taken in, not when its request is
/// read. Here the reload `a` runs with `b`, another reload, queued behind it, and `c`, a `list`,
/// connects during `a`'s pass; `c` gets a space as it is taken in and another at the start of
/// `b`'s pass.
#[test]
fn a_client_taken_in_during_a_pass_is_shown_progress_during_the_next() {
    let _namespaces = namespaces_with_listeners(30);
    let cg = TestCgroup::new("nextpass");
    let config = write_config("[default]\nidle = 50\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    std::fs::write(&*config, "[default]\nidle = 51\n").unwrap();
    agent.pause();
    let a = ask(&agent, b"{\"cmd\":\"reload\"}\n");
    let b = ask(&agent, b"{\"cmd\":\"reload\"}\n");
    agent.signal(libc::SIGCONT);
    let mut first = [0u8; 1];
    (&a).read_exact(&mut first).unwrap();
    assert_eq!(&first, b" ");
    // `a` read the file before its pass: `b` finds another change, and makes a pass too.
    agent.pause();
    std::fs::write(&*config, "[default]\nidle = 52\n").unwrap();
    let c = ask(&agent, b"{\"cmd\":\"list\"}\n");
    agent.signal(libc::SIGCONT);
    let (_, _, listed) = (answer(a), answer(b), answer(c));
    assert_walked_30_namespaces(&agent);
    assert!(
        listed.starts_with("  "),
        "one sign of progress at most: {listed:?}"
    );
    assert!(listed.contains("\"idle\":52"), "served after b: {listed}");
}

/// A raw control client of `agent` that sent `request`.
fn ask(agent: &Agent, request: &[u8]) -> std::os::unix::net::UnixStream {
    let client =
        std::os::unix::net::UnixStream::connect(agent.runtime_dir.join("control.sock")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    (&client).write_all(request).unwrap();
    client
}

/// All `client` read until the agent closed the connection: a successful answer.
fn answer(client: std::os::unix::net::UnixStream) -> String {
    let mut answer = String::new();
    (&client).read_to_string(&mut answer).unwrap();
    let response: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(response["ok"], true, "{answer}");
    answer
}

/// Checks that the agent's last pass walked the thirty namespaces of
/// `namespaces_with_listeners(30)`: that many moments to show progress at.
fn assert_walked_30_namespaces(agent: &Agent) {
    let (pass, _) = last_pass(&agent.log());
    assert!(
        count_between(&pass, "failed; ", " network namespace") >= 30,
        "the pass did not walk the namespaces: {pass}"
    );
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
        serde_json::from_slice(&dirs.output(cmd).stdout).expect("check --json is JSON")
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

/// Kills and reaps a child when dropped.
#[test]
fn a_network_namespace_the_agent_may_not_open_is_reported_as_not_entered() {
    let cg = TestCgroup::new("nsdenied");
    // Another user's process in a network namespace of its own: without CAP_SYS_PTRACE root
    // may not open its /proc/<pid>/ns/net.
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    // SAFETY: plain system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _other = Reaped(
        cmd.spawn()
            .expect("spawn sleep as nobody in a new namespace"),
    );
    let keep: Vec<u32> = GRANTED.into_iter().filter(|&c| c != 19).collect();
    let agent = Agent::start_with(
        &AgentDirs::new(),
        &["run", "--cgroup", cg.path().to_str().unwrap()],
        &[],
        Some(&keep),
    );
    // Not passed over in silence: the pass's line counts it.
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("existing connections:"))
        .unwrap_or_else(|| panic!("no pass in {log}"));
    assert!(line.contains("could not be entered"), "{line}");
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

/// A systemd service manager of the test's own: PID 1 of a new PID and mount namespace, with a
/// private /run for its units, and its cgroups under one of the test's in every hierarchy.
/// It starts only the units asked of it. Killed, and its cgroups removed, on drop.
struct Systemd {
    manager: std::process::Child,
    pid: u32,
    cgroups: Vec<std::path::PathBuf>,
}

impl Systemd {
    fn boot() -> Self {
        require_root();
        let name = keepalive_tests::unique("systemd");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let cgroups: Vec<std::path::PathBuf> = mountinfo
            .lines()
            .filter_map(|line| {
                let (mount, fs) = line.split_once(" - ")?;
                let fstype = fs.split(' ').next()?;
                let point = mount.split(' ').nth(4)?;
                matches!(fstype, "cgroup" | "cgroup2").then(|| Path::new(point).join(&name))
            })
            .collect();
        let procs: Vec<CString> = cgroups
            .iter()
            .filter(|dir| std::fs::create_dir(dir).is_ok())
            .map(|dir| CString::new(dir.join("cgroup.procs").to_str().unwrap()).unwrap())
            .collect();
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--mount", "--fork", "--kill-child", "sh", "-c"])
            .arg(
                "mount --make-rprivate / && mount -t proc proc /proc && mount -t tmpfs tmpfs /run \
                 && mkdir -p /run/systemd/system && printf '[Unit]\\nDefaultDependencies=no\\n' \
                 > /run/systemd/system/ka-test.target && exec env container=keepalive-test \
                 /lib/systemd/systemd --system --unit=ka-test.target --log-target=null",
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        // SAFETY: only system calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // Where a hierarchy refuses (an empty v1 cpuset), the manager stays where it is;
                // it makes its own cgroups only under its place in the name=systemd one.
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
        let manager = cmd
            .spawn()
            .expect("unshare is part of util-linux, which every Debian host has");
        let children = format!("/proc/{0}/task/{0}/children", manager.id());
        let pid = keepalive_tests::eventually(Duration::from_secs(10), "the manager", || {
            std::fs::read_to_string(&children)
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        });
        let systemd = Self {
            manager,
            pid,
            cgroups,
        };
        keepalive_tests::eventually(Duration::from_secs(60), "the manager running", || {
            let out = systemd.ctl(&["is-system-running"]);
            let state = String::from_utf8_lossy(&out.stdout);
            matches!(state.trim(), "running" | "degraded").then_some(())
        });
        systemd
    }

    /// `systemctl` against this manager.
    fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .args([
                "-t",
                &self.pid.to_string(),
                "-m",
                "-p",
                "timeout",
                "60",
                "systemctl",
            ])
            .args(args)
            .output()
            .unwrap()
    }

    /// A path as the manager and its services see it.
    fn path(&self, path: &str) -> std::path::PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid)).join(path.trim_start_matches('/'))
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // The end of PID 1 ends every process of its namespace; unshare reaps it and exits.
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        let _ = self.manager.wait();
        for dir in &self.cgroups {
            keepalive_tests::remove_cgroup_tree(dir);
        }
    }
}

/// Asserts that `out` succeeded, showing the unit's status and `log` when it did not.
fn ok_or_show(systemd: &Systemd, out: &std::process::Output, what: &str, log: &Path) {
    let status = || {
        systemd
            .ctl(&["status", "--no-pager", "keepalive-agent"])
            .stdout
    };
    assert!(
        out.status.success(),
        "{what}: {}{}\n--- status ---\n{}\n--- agent log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&status()),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn the_shipped_unit_starts_reloads_and_stops_the_agent_under_systemd() {
    let cg = TestCgroup::new("unit");
    // Dropped after the manager, which stops the agent.
    let dirs = DetachOnDrop(AgentDirs::new());
    let systemd = Systemd::boot();
    // The unit as shipped, with the binary under test, and a drop-in for what differs in a
    // test: no boot ordering, the output in a file, and the test's cgroup and directories.
    // The binary goes where the unit's sandbox can see it: a build under /tmp or /home would
    // be hidden by PrivateTmp= and ProtectHome=.
    let bin = Path::new("/run/keepalive-test/keepalive-agent");
    std::fs::create_dir(systemd.path("/run/keepalive-test")).unwrap();
    std::fs::copy(agent_bin(), systemd.path(bin.to_str().unwrap())).unwrap();
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/keepalive-agent.service"),
    )
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/sbin/keepalive-agent run\n"));
    let unit = unit.replace("/usr/local/sbin/keepalive-agent", bin.to_str().unwrap());
    let units = systemd.path("/run/systemd/system");
    std::fs::write(units.join("keepalive-agent.service"), unit).unwrap();
    std::fs::create_dir(units.join("keepalive-agent.service.d")).unwrap();
    std::fs::write(
        units.join("keepalive-agent.service.d/test.conf"),
        format!(
            "[Unit]\nDefaultDependencies=no\n[Service]\nStandardOutput=file:/run/agent.log\n\
             StandardError=file:/run/agent.log\nExecStart=\nExecStart={} run --cgroup {} \
             --state-dir {} --idle 37\n",
            bin.display(),
            cg.path().display(),
            dirs.state_dir.display()
        ),
    )
    .unwrap();
    let log = systemd.path("/run/agent.log");
    ok_or_show(
        &systemd,
        &systemd.ctl(&["daemon-reload"]),
        "daemon-reload",
        &log,
    );
    ok_or_show(
        &systemd,
        &systemd.ctl(&["start", "keepalive-agent"]),
        "systemctl start (Type=notify: returns once the agent is ready)",
        &log,
    );
    assert_eq!(sockops_attachments(cg.path()), 1);
    assert_eq!(keepalive_tests::idle_of(&cg), 37);
    // ExecReload runs `policy reload` in the same sandbox, against the agent's control socket.
    ok_or_show(
        &systemd,
        &systemd.ctl(&["reload", "keepalive-agent"]),
        "systemctl reload",
        &log,
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("reloaded the config"), "{text}");
    // Stopping leaves enforcement in place.
    ok_or_show(
        &systemd,
        &systemd.ctl(&["stop", "keepalive-agent"]),
        "systemctl stop",
        &log,
    );
    let out = systemd.ctl(&["show", "-p", "Result", "--value", "keepalive-agent"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "success");
    assert_eq!(keepalive_tests::idle_of(&cg), 37);
    drop(systemd);
    assert!(dirs.detach().status.success());
}

/// A port on 127.0.0.1 that nothing listens on now and that takes CAP_NET_BIND_SERVICE.
fn free_privileged_port() -> u16 {
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .expect("ip_unprivileged_port_start")
        .trim()
        .parse()
        .unwrap();
    (1..start)
        .rev()
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .unwrap_or_else(|| {
            panic!("no free port below net.ipv4.ip_unprivileged_port_start ({start}) to test with")
        })
}

#[test]
fn check_and_run_refuse_a_metrics_address_they_cannot_listen_on() {
    require_root();
    let cg = TestCgroup::new("metrics");
    let dirs = AgentDirs::new();
    let attach = cg.path().to_str().unwrap();
    // `command --cgroup … --config FILE` as root, or with only the unit's capabilities.
    let cli = |command: &[&str], file: &Path, keep: Option<&'static [u32]>| {
        let config = ["--cgroup", attach, "--config", file.to_str().unwrap()];
        let mut cmd = dirs.command(&[command, &config[..]].concat());
        if let Some(keep) = keep {
            // SAFETY: prctl calls only.
            unsafe {
                cmd.pre_exec(move || drop_caps_except(keep));
            }
        }
        dirs.output(cmd)
    };
    // `check`'s exit code and metrics item.
    let check = |file: &Path, keep: Option<&'static [u32]>| -> (i32, Value) {
        let out = cli(&["check", "--json"], file, keep);
        let report: Value = serde_json::from_slice(&out.stdout).expect("check --json is JSON");
        (code(&out), check_item(&report, "metrics").clone())
    };
    let run = |file: &Path, keep: Option<&'static [u32]>| cli(&["run"], file, keep);
    let detail = |item: &Value| item["detail"].as_str().unwrap_or_default().to_owned();

    // A port another process holds: `run` exits 1 (the unit retries), and check says so first.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = other.local_addr().unwrap();
    let config = write_config(&format!("metrics = \"{taken}\"\n"));
    let (rc, item) = check(&config, None);
    assert_eq!((rc, item["status"].as_str()), (8, Some("fail")), "{item}");
    assert!(
        detail(&item).contains("in use by another process"),
        "{item}"
    );
    let out = run(&config, None);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("failed to listen for metrics on {taken}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(sockops_attachments(cg.path()), 0);
    assert!(
        !dirs.state_dir.exists(),
        "the refused start left the state directory it made"
    );
    // The same address given as `run` takes it from the DaemonSet, as a flag: `check
    // --metrics` tries it over the config's, and a config without one.
    let free = format!("127.0.0.1:{}", free_port());
    for file in [
        write_config("[default]\nidle = 60\n"),
        write_config(&format!("metrics = \"{free}\"\n")),
    ] {
        let flag = taken.to_string();
        let out = cli(&["check", "--json", "--metrics", &flag], &file, None);
        let report: Value = serde_json::from_slice(&out.stdout).expect("check --json is JSON");
        let item = check_item(&report, "metrics");
        assert_eq!(code(&out), 8, "{item}");
        assert!(detail(item).contains(&flag), "{item}");
        assert!(detail(item).contains("in use by another process"), "{item}");
    }
    drop(other);

    // An address this host does not have (TEST-NET-1).
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind").unwrap(),
        "0\n",
        "with net.ipv4.ip_nonlocal_bind on, any address can be bound: this part cannot run"
    );
    let config = write_config("metrics = \"192.0.2.1:9977\"\n");
    let (rc, item) = check(&config, None);
    assert_eq!((rc, item["status"].as_str()), (8, Some("fail")), "{item}");
    assert!(
        detail(&item).contains("not an address of this host"),
        "{item}"
    );

    // A port below 1024: root may listen there, the systemd unit's capabilities may not, and
    // `run` under them exits 3, which the unit does not retry, naming the capability.
    let low = free_privileged_port();
    let config = write_config(&format!("metrics = \"127.0.0.1:{low}\"\n"));
    let (rc, item) = check(&config, None);
    assert_eq!((rc, item["status"].as_str()), (0, Some("warn")), "{item}");
    assert!(detail(&item).contains("CAP_NET_BIND_SERVICE"), "{item}");
    let (rc, item) = check(&config, Some(&GRANTED));
    assert_eq!((rc, item["status"].as_str()), (8, Some("fail")), "{item}");
    let out = run(&config, Some(&GRANTED));
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("CAP_NET_BIND_SERVICE"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sockops_attachments(cg.path()), 0);

    // The running agent's own address is not "in use by another process".
    let port = free_port();
    let config = write_config(&format!("metrics = \"127.0.0.1:{port}\"\n"));
    let (rc, item) = check(&config, None);
    assert_eq!((rc, item["status"].as_str()), (0, Some("ok")), "{item}");
    assert!(detail(&item).contains("free"), "{item}");
    let agent = Agent::start_raw(
        &dirs,
        &[
            "run",
            "--cgroup",
            attach,
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let (rc, item) = check(&config, None);
    assert_eq!((rc, item["status"].as_str()), (0, Some("ok")), "{item}");
    assert!(
        detail(&item).contains(&format!("running agent (pid {})", agent.pid())),
        "{item}"
    );
    // The same port on another address, held by another process: the agent's listener does
    // not make that one free for `run`.
    let other = std::net::TcpListener::bind(("127.0.0.2", port)).unwrap();
    let config = write_config(&format!("metrics = \"127.0.0.2:{port}\"\n"));
    let (rc, item) = check(&config, None);
    assert_eq!((rc, item["status"].as_str()), (8, Some("fail")), "{item}");
    assert!(
        detail(&item).contains("in use by another process"),
        "{item}"
    );
    drop(other);
}

/// `keepalive-agent install --root DIR` with DIR as `/`.
fn install(root: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(agent_bin())
        .args(["install", "--root"])
        .arg(root)
        .args(extra)
        .output()
        .expect("run install")
}

/// `install` says what it wrote, kept or left unchanged, and on an upgrade how to run the new
/// binary; it keeps an existing config, also one behind a symbolic link whose target is gone
/// (the agent refuses to start on that, so replacing it would drop the operator's policies),
/// and refuses `--force-config` through a directory link that leads nowhere before it writes
/// anything.
#[test]
fn install_keeps_the_operators_config_and_says_what_it_changed() {
    let root = keepalive_tests::TempDir::new("install");
    let root = root.path();
    let config = root.join("etc/keepalive-agent/config.toml");
    let unit = root.join("etc/systemd/system/keepalive-agent.service");
    let binary = root.join("usr/local/sbin/keepalive-agent");
    let lines = |out: &std::process::Output| {
        assert!(out.status.success(), "{}", stderr(out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = lines(&install(root, &[]));
    for path in [&binary, &unit, &config] {
        assert!(
            first.contains(&format!("installed {}", path.display())),
            "{first}"
        );
    }
    assert!(first.contains("enable --now"), "{first}");

    std::fs::write(&config, "[default]\nidle = 61\n").unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o644)).unwrap();
    let again = lines(&install(root, &[]));
    assert_eq!(
        std::fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
        0o755,
        "an unchanged binary is executable again"
    );
    assert!(
        again.contains(&format!("unchanged {}", unit.display()))
            && again.contains(&format!("unchanged {}", binary.display()))
            && again.contains(&format!("kept existing {}", config.display()))
            && again.contains("next, on the system this tree is for: nothing to restart")
            && !again.contains("try-restart"),
        "{again}"
    );
    std::fs::write(&unit, "[Service]\nExecStart=/bin/true\n").unwrap();
    let edited = lines(&install(root, &[]));
    assert!(
        edited.contains(&format!("replaced {}", unit.display()))
            && edited.contains("systemctl daemon-reload && systemctl try-restart keepalive-agent"),
        "{edited}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "[default]\nidle = 61\n"
    );

    // The config file is a link to a file system that is not there yet.
    std::fs::remove_file(&config).unwrap();
    std::os::unix::fs::symlink("/ka-not-mounted/config.toml", &config).unwrap();
    let dangling = lines(&install(root, &[]));
    assert!(
        dangling.contains(&format!("kept existing {}", config.display()))
            && dangling.contains("/ka-not-mounted/config.toml, which does not exist"),
        "{dangling}"
    );
    assert_eq!(
        std::fs::read_link(&config).unwrap(),
        Path::new("/ka-not-mounted/config.toml"),
        "the link stays"
    );
    // A fresh config forced over the link would cut it: refused, and nothing is written.
    std::fs::remove_file(&binary).unwrap();
    let forced = install(root, &["--force-config"]);
    assert_eq!(forced.status.code(), Some(2), "{}", stderr(&forced));
    assert!(
        stderr(&forced).contains(&format!(
            "{} is a symbolic link to /ka-not-mounted/config.toml: --force-config would replace \
             the link",
            config.display()
        )),
        "{}",
        stderr(&forced)
    );
    assert!(!binary.exists(), "nothing is written");
    assert!(std::fs::read_link(&config).is_ok(), "the link stays");

    // So is the config directory, and the operator forces a fresh config: nothing is written.
    let dir = config.parent().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    std::os::unix::fs::symlink("/ka-not-mounted/keepalive-agent", dir).unwrap();
    let forced = install(root, &["--force-config"]);
    assert_eq!(forced.status.code(), Some(2), "{}", stderr(&forced));
    assert!(
        stderr(&forced).contains("/ka-not-mounted/keepalive-agent, which does not exist"),
        "{}",
        stderr(&forced)
    );
    assert!(!binary.exists(), "nothing is written");
    assert!(std::fs::read_link(dir).is_ok());
}
