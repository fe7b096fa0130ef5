//! Reliability: enforcement outlives the agent, restarts take it over without a gap or a second
//! attachment, existing connections get the policy, lock mode holds, removal is explicit, and
//! every fault gets one clear message and its exit code.

use std::{
    ffi::CString,
    io::Write as _,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    process::Output,
    time::{Duration, Instant, SystemTime},
};

use keepalive_tests::{
    Agent, AgentDirs, GRANTED, InotifyHolder, Listener, Netns, Proc, TempDir, TestCgroup,
    agent_in_private_mounts, assert_stamped_between, become_user, bind_mount, cgroup_ids,
    cgroup_row, cgroup2_mount, check_item, code, count_between, drop_caps_except, eventually,
    free_port, hide_with_tmpfs, hold_inotify_instances, hold_inotify_watches, idle_of,
    json_refusal, keepalive_programs_at, kernel_defaults, pair_values, private_mounts,
    setsockopt_attachments, sock_bin, sockets_of, sockops_attachments, stderr, stdout, symlink,
    umount, unix_seconds, values, write_config,
};

#[test]
fn sigkill_and_sigterm_leave_enforcement_in_place_and_a_restart_attaches_once() {
    let cg = TestCgroup::new("survive");
    let mut agent = Agent::start(&cg, &["--idle", "23"]);
    let dirs = agent.dirs();
    assert_eq!(idle_of(&cg), 23);
    assert_eq!(cgroup_row(&agent.status(), &cg)["enforced_total"], 2);

    agent.stop_with(libc::SIGKILL);
    assert_eq!(idle_of(&cg), 23, "enforced while no agent runs");
    assert_eq!(sockops_attachments(cg.path()), 1);
    assert_eq!(
        cgroup_row(&dirs.status(), &cg)["enforced_total"],
        4,
        "status works from pins alone"
    );
    // No agent to answer: scripts still get JSON, with the exit code in it.
    let answer = json_refusal(&dirs.cli(&["policy", "list", "--json"]), 7);
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("no keepalive agent is running")),
        "{answer}"
    );

    let mut agent = Agent::start_in(&dirs, &cg, &["--idle", "24"]);
    assert_eq!(
        sockops_attachments(cg.path()),
        1,
        "a restart must not attach a second program"
    );
    assert!(
        agent.log().contains("took over pinned enforcement"),
        "{}",
        agent.log()
    );
    assert_eq!(idle_of(&cg), 24);
    assert_eq!(
        cgroup_row(&agent.status(), &cg)["enforced_total"],
        6,
        "counters survive restarts"
    );
    // Not while it runs: the refusal says how to stop this one, started by hand.
    let out = dirs.cli(&["detach"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("stop it first (`kill {}`)", agent.pid())),
        "{}",
        stderr(&out)
    );

    let status = agent.stop_with(libc::SIGTERM);
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    assert!(
        agent.log().contains("enforcement stays attached"),
        "{}",
        agent.log()
    );
    assert_eq!(idle_of(&cg), 24);
    assert_eq!(sockops_attachments(cg.path()), 1);

    let out = dirs.cli_ok(&["detach"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("link_sockops") && text.contains("KA_POLICY"),
        "{text}"
    );
    assert_eq!(sockops_attachments(cg.path()), 0);
    assert!(!dirs.state_dir.exists());
    let (client, server) = pair_values(&cg);
    assert_eq!(client, kernel_defaults(), "detached: no longer enforced");
    assert_eq!(server, kernel_defaults(), "detached: no longer enforced");
}

#[test]
fn detach_names_the_daemonset_to_delete_for_an_agent_in_a_pod() {
    let cg = TestCgroup::new("podstop");
    // Where kubelet's cgroupfs driver puts a pod's containers.
    let host = TestCgroup::new("podhost");
    let kubepods = TestCgroup::at(host.path().join("kubepods"));
    let pod = TestCgroup::at(kubepods.path().join("podx"));
    let dirs = AgentDirs::new();
    let agent = Agent::start_in(&dirs, &cg, &[]);
    std::fs::write(pod.path().join("cgroup.procs"), agent.pid().to_string()).unwrap();
    // Killing it would have the DaemonSet start another, which attaches again.
    let out = dirs.cli(&["detach"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("delete the DaemonSet first (`kubectl delete -n keepalive daemonset/keepalive-agent`), then detach")
            && !stderr(&out).contains("kill"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sockops_attachments(cg.path()), 1, "nothing detached");
}

#[test]
fn pins_removed_while_the_agent_runs_are_pinned_again_and_enforcement_outlives_it() {
    let cg = TestCgroup::new("repin");
    let config = write_config("[default]\nidle = 31\nmode = \"lock\"\n");
    let mut agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let dirs = agent.dirs();
    assert_eq!(idle_of(&cg), 31);
    // What an operator cleaning up bpffs by hand does, with the agent stopped meanwhile so
    // that it cannot race the removal: it sees it all when it goes on.
    agent.pause();
    let removed = std::fs::remove_dir_all(&dirs.state_dir);
    agent.signal(libc::SIGCONT);
    removed.unwrap();
    let maps = dirs
        .state_dir
        .join(format!("maps-v{}", keepalive_common::ABI_VERSION));
    let pins: Vec<std::path::PathBuf> = [
        "link_sockops",
        "link_lock",
        "link_status",
        "link_status_slots",
    ]
    .iter()
    .map(|pin| dirs.state_dir.join(pin))
    .chain(
        keepalive_common::PINNED_MAPS
            .iter()
            .map(|map| maps.join(map)),
    )
    .collect();
    // All of them, and the warning, which comes once they are.
    eventually(Duration::from_secs(10), "the pins to be made again", || {
        (pins.iter().all(|pin| pin.exists())
            && agent
                .log()
                .contains("while the agent ran: made and pinned again"))
        .then_some(())
    });
    assert_eq!(idle_of(&cg), 31, "enforced while the agent runs");
    // The directory made again is the agent's: another is refused.
    let other = AgentDirs {
        runtime_dir: AgentDirs::new().runtime_dir,
        ..dirs.clone()
    };
    let out = other.cli(&run_args(&cg));
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    // It took its own lock before it refused.
    std::fs::remove_dir_all(&other.runtime_dir).expect("its runtime dir");

    let status = agent.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}: {}", agent.log());
    assert!(
        agent.log().contains("enforcement stays attached"),
        "{}",
        agent.log()
    );
    assert_eq!(idle_of(&cg), 31, "enforced once the agent has stopped");
    assert_eq!(sockops_attachments(cg.path()), 1);
    assert_eq!(setsockopt_attachments(cg.path()), 1);
    assert_eq!(
        cgroup_row(&dirs.status(), &cg)["enforced_total"],
        6,
        "status reads the pins made again, with the counts from before"
    );

    let agent = Agent::start_in(&dirs, &cg, &["--config", config.to_str().unwrap()]);
    assert!(
        agent.log().contains("took over pinned enforcement"),
        "{}",
        agent.log()
    );
    assert_eq!(sockops_attachments(cg.path()), 1);
    assert_eq!(setsockopt_attachments(cg.path()), 1);
}

#[test]
fn a_restart_under_load_leaves_no_connection_without_keepalive() {
    let cg = TestCgroup::new("restartload");
    let mut agent = Agent::start(&cg, &[]);
    let dirs = agent.dirs();
    let mut churn = Proc::sock(&["churn"], &cg);
    churn.read();
    std::thread::sleep(Duration::from_millis(300));
    agent.stop_with(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let mut agent = Agent::start_in(&dirs, &cg, &["--idle", "31"]);
    std::thread::sleep(Duration::from_millis(300));
    agent.stop_with(libc::SIGKILL);
    let _agent = Agent::start_in(&dirs, &cg, &[]);
    std::thread::sleep(Duration::from_millis(300));
    churn.close_stdin();
    let out = churn.next(Duration::from_secs(10));
    let total = out["connections"].as_u64().unwrap();
    assert!(
        total > 200,
        "the load must actually run across the restarts: {out}"
    );
    assert_eq!(out["without_keepalive"], 0, "{out}");
}

/// A fresh start that fails once it has loaded (here the kernel refuses a 65th sock_ops
/// program on the attach cgroup: E2BIG) leaves nothing behind: before, it left its maps
/// pinned, whose sizes the next start keeps whatever the config says by then. Once there is
/// room, a start attaches.
#[test]
fn a_fresh_start_that_fails_to_attach_leaves_nothing_pinned() {
    let cg = TestCgroup::new("fullprogs");
    let mut full = Proc::spawn(
        &sock_bin(),
        &["empty-sockops", cg.path().to_str().unwrap(), "64"],
        None,
        None,
    );
    full.next(Duration::from_secs(10));
    assert_eq!(sockops_attachments(cg.path()), 64);
    let dirs = AgentDirs::new();
    let out = dirs.cli(&[
        "run",
        "--cgroup",
        cg.path().to_str().unwrap(),
        "--idle",
        "27",
    ]);
    let _ = std::fs::remove_dir_all(&dirs.runtime_dir);
    let err = stderr(&out);
    assert_eq!(code(&out), 6, "{err}");
    assert!(
        err.contains("failed to attach to the cgroup") && err.contains("Argument list too long"),
        "{err}"
    );
    assert!(!dirs.state_dir.exists(), "left behind: {err}");
    assert_eq!(sockops_attachments(cg.path()), 64);
    drop(full);
    let agent = Agent::start_in(&dirs, &cg, &["--idle", "27"]);
    assert_eq!(idle_of(&cg), 27, "{}", agent.log());
}

#[test]
fn a_different_attach_cgroup_is_refused_with_a_message_naming_detach() {
    let a = TestCgroup::new("attach-a");
    let b = TestCgroup::new("attach-b");
    let mut agent = Agent::start(&a, &[]);
    let dirs = agent.dirs();
    agent.stop_with(libc::SIGTERM);
    let out = dirs.cli(&["run", "--cgroup", b.path().to_str().unwrap()]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("detach") && err.contains(&a.display()),
        "{err}"
    );
    assert_eq!(sockops_attachments(b.path()), 0);
    assert_eq!(sockops_attachments(a.path()), 1);
    // Also a cgroup that does not exist yet, for which `run` waits (exit 4) only to refuse it
    // once it does: `check` fails it, not only warns that it is missing.
    let later = b.path().join("later");
    let out = dirs.cli(&["check", "--json", "--cgroup", later.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let item = check_item(&report, "keepalive");
    assert_eq!(
        (code(&out), item["status"].as_str()),
        (8, Some("fail")),
        "{item}"
    );
    assert!(
        item["detail"].as_str().unwrap().contains(&format!(
            "but the config attaches to {}/later, which does not exist (yet)",
            b.display()
        )),
        "{item}"
    );
    // `check` fails it as `run` does, also where another state directory's agent runs
    // above the cgroup named, which alone is a warning.
    let parent = TestCgroup::new("attach-above");
    let below = parent.child("below");
    let _above = Agent::start(&parent, &[]);
    let (code, item) = keepalive_check(&dirs, &below);
    assert_eq!((code, item["status"].as_str()), (8, Some("fail")), "{item}");
    assert!(
        item["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("but the config attaches to {}", below.display())),
        "{item}"
    );
}

/// `check --json --cgroup CGROUP` with `dirs`: its exit code and its `keepalive` item.
fn keepalive_check(dirs: &AgentDirs, cgroup: &TestCgroup) -> (i32, serde_json::Value) {
    let out = dirs.cli(&[
        "check",
        "--json",
        "--cgroup",
        cgroup.path().to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (code(&out), check_item(&report, "keepalive").clone())
}

#[test]
fn enforcement_from_another_state_directory_is_refused_on_its_cgroup_and_warned_about_below() {
    let cg = TestCgroup::new("foreign");
    let below = cg.child("below");
    let mut first = Agent::start(&cg, &[]);
    let first_state = first.state_dir.display().to_string();
    let other = AgentDirs::new();
    // Refused while the first agent runs, and once it has stopped and left its pins behind.
    for running in [true, false] {
        if !running {
            first.stop_with(libc::SIGTERM);
        }
        let out = other.cli(&run_args(&cg));
        let err = stderr(&out);
        assert_eq!(code(&out), 7, "running {running}: {err}");
        assert!(
            err.contains(&format!("from {first_state} "))
                && err.contains(&format!("--state-dir {first_state} detach")),
            "running {running}: {err}"
        );
        assert_eq!(sockops_attachments(cg.path()), 1, "running {running}");
        assert!(
            !other.state_dir.exists(),
            "a refused start leaves no state directory behind"
        );
    }
    // Without CAP_SYS_ADMIN the agent cannot look programs up by id; the pin still tells.
    let mut cmd = other.command(&run_args(&cg));
    // SAFETY: prctl calls only. CAP_NET_ADMIN, CAP_PERFMON and CAP_BPF: what `run` requires.
    unsafe {
        cmd.pre_exec(|| drop_caps_except(&[12, 38, 39]));
    }
    let out = other.output(cmd);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("--state-dir {first_state} detach")),
        "{}",
        stderr(&out)
    );
    let check = |cgroup: &TestCgroup| {
        let (code, item) = keepalive_check(&other, cgroup);
        assert!(
            item["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("from {first_state} ")),
            "{item}"
        );
        (code, item["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        check(&cg),
        (8, "fail".to_owned()),
        "check sees what run refuses"
    );
    // Below it, a subtree of its own is allowed, with a warning that the first one also runs.
    let second = Agent::start_in(&other, &below, &[]);
    assert_eq!(sockops_attachments(below.path()), 1);
    let log = second.log();
    assert!(
        log.lines().any(|line| line.contains("WARN")
            && line.contains(&format!("from {first_state} "))
            && line.contains(&format!(
                "attached to {}, above {}",
                cg.display(),
                below.display()
            ))),
        "{log}"
    );
    assert_eq!(check(&below).1, "warn");
}

#[test]
fn enforcement_from_another_state_directory_below_is_warned_about_and_elsewhere_is_not() {
    let cg = TestCgroup::new("foreign-above");
    let inner = cg.child("inner");
    let elsewhere = TestCgroup::new("foreign-aside");
    let below = Agent::start(&inner, &[]);
    let aside = Agent::start(&elsewhere, &[]);
    let other = AgentDirs::new();
    let agent = Agent::start_in(&other, &cg, &[]);
    assert_eq!(sockops_attachments(cg.path()), 1);
    let log = agent.log();
    let below_state = below.state_dir.display().to_string();
    assert!(
        log.lines().any(|line| line.contains("WARN")
            && line.contains(&format!("from {below_state} "))
            && line.contains(&format!(
                "attached to {}, below {}: both set keepalive on sockets there and it runs \
                 before this agent, so this agent's policy wins",
                inner.display(),
                cg.display()
            ))),
        "{log}"
    );
    let aside_state = aside.state_dir.display().to_string();
    assert!(
        !log.contains(&aside_state),
        "a subtree beside this one is no concern: {log}"
    );
    let (_, item) = keepalive_check(&other, &cg);
    assert_eq!(item["status"], "warn", "{item}");
    assert!(
        item["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("from {below_state} ")),
        "{item}"
    );
}

#[test]
fn the_apply_pass_does_not_walk_network_namespaces_without_tcp_sockets() {
    // A walk costs one pass over the namespace's whole TCP hash (the host's, unless
    // tcp_child_ehash_entries was set), sockets or not.
    let empty_namespaces = [Netns::new("empty"), Netns::new("empty")];
    let cg = TestCgroup::new("emptyns");
    // A namespace whose only TCP socket is a listener is walked: the pass configures it.
    let listening = Netns::new("listening");
    let mut server = Proc::spawn(
        &sock_bin(),
        &["listen", "127.0.0.1:0"],
        Some(cg.path()),
        Some(&listening),
    );
    let port = server.read()["port"].as_u64().unwrap();
    let agent = Agent::start_with(
        &AgentDirs::new(),
        &["run", "--cgroup", cg.path().to_str().unwrap()],
        &[("RUST_LOG", "keepalive_agent=debug")],
        None,
    );
    let log = agent.log();
    let empty = count_between(&log, "network namespaces (", " without TCP sockets");
    assert!(empty >= 2, "{log}");
    // Those two among them, and not the listener's.
    let not_walked = |ns: &Netns| {
        log.contains(&format!(
            "network namespace {} has no TCP sockets; not walked",
            ns.handle().display()
        ))
    };
    assert!(empty_namespaces.iter().all(not_walked), "{log}");
    assert!(!not_walked(&listening), "{log}");
    let target = format!("127.0.0.1:{port}");
    let _client = Proc::spawn(
        &sock_bin(),
        &["connect", &target],
        Some(cg.path()),
        Some(&listening),
    );
    server.read();
    let status = agent.status();
    let accepted = sockets_of(&status, &cg)
        .into_iter()
        .find(|s| s["direction"] == "inbound")
        .unwrap_or_else(|| panic!("no accepted socket in {status}"));
    assert_eq!(
        accepted["inherited"], true,
        "the listener was configured: {accepted}"
    );
}

#[test]
fn existing_connections_get_the_policy_except_off_and_app_owned_fill() {
    let parent = TestCgroup::new("existing");
    let enforce = parent.child("enforce");
    let off = parent.child("off");
    let fill = parent.child("fill");
    let ns = Netns::new("existing");
    // Connections made before the agent runs.
    let mut plain = Proc::sock(&["pair", "4"], &enforce);
    plain.read();
    let mut in_netns = Proc::spawn(&sock_bin(), &["pair", "6"], Some(enforce.path()), Some(&ns));
    in_netns.read();
    let mut exempt = Proc::sock(&["pair", "4"], &off);
    exempt.read();
    let mut app_owned = Proc::sock(&["pair", "4", "--keepalive", "99"], &fill);
    app_owned.read();
    let mut fill_plain = Proc::sock(&["pair", "4"], &fill);
    fill_plain.read();

    let config = write_config(&format!(
        "[default]\nidle = 29\n[[policy]]\ncgroup = \"{}\"\nmode = \"off\"\n[[policy]]\ncgroup = \"{}\"\nmode = \"fill\"\nidle = 28\n",
        off.rel(),
        fill.rel()
    ));
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    // Both ends of: the plain pair, the pair in another netns, the fill pair without app
    // keepalive; and the accepted end of the app-owned pair (its client keeps its own).
    assert!(
        agent.log().contains(
            "existing connections: 7 updated, 0 already current, 2 in off cgroups, 1 keep their \
             own keepalive (fill), 0 failed;"
        ),
        "{}",
        agent.log()
    );
    for sock in plain.report().iter().chain(in_netns.report().iter()) {
        assert_eq!(values(sock), (1, 29, 10, 5), "{sock}");
    }
    for sock in exempt.report() {
        assert_eq!(
            values(&sock),
            kernel_defaults(),
            "off keeps its settings: {sock}"
        );
    }
    let owned = app_owned.report();
    assert_eq!(
        values(&owned[0]).1,
        99,
        "fill keeps the app's own keepalive: {owned:?}"
    );
    for sock in fill_plain.report() {
        assert_eq!(values(&sock), (1, 28, 10, 5), "{sock}");
    }
    let status = agent.status();
    let retro = status["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["retroactive"] == true)
        .count();
    assert!(
        retro >= 5,
        "pre-existing connections are listed as retroactive: {status:#}"
    );

    // A policy change reaches existing connections too.
    let out = agent.cli_ok(&["policy", "set", enforce.rel(), "--idle", "37"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("4 updated"), "{text}");
    for sock in plain.report() {
        assert_eq!(values(&sock).1, 37, "{sock}");
    }
}

#[test]
fn lock_mode_holds_the_policy_against_later_setsockopt() {
    let cg = TestCgroup::new("lock");
    let config = write_config(
        "[default]\nidle = 21\ninterval = 7\ncount = 4\nuser_timeout = \"40s\"\nmode = \"lock\"\n",
    );
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let mut server = Proc::sock(&["listen", "127.0.0.1:0"], &cg);
    let port = server.read()["port"].as_u64().unwrap();
    let mut client = Proc::sock(&["connect", &format!("127.0.0.1:{port}"), "--loosen"], &cg);
    client.read();
    let loosen = client.read();
    for (call, result) in loosen["loosen"].as_object().unwrap() {
        assert_eq!(result, 0, "{call} succeeds (held silently): {loosen}");
    }
    let after = &loosen["after"];
    assert_eq!(
        values(after),
        (1, 21, 7, 4),
        "getsockopt still shows the policy: {loosen}"
    );
    assert_eq!(after["user_timeout"], 40_000, "{loosen}");
    let tighten = client.read();
    assert_eq!(
        tighten["after"]["idle"], 1,
        "stricter values are allowed: {tighten}"
    );
    // Values the kernel refuses it still refuses, and they change nothing.
    let invalid = client.read();
    for (call, result) in invalid["invalid"].as_object().unwrap() {
        assert_eq!(
            result,
            libc::EINVAL,
            "{call} fails as without the lock: {invalid}"
        );
    }
    assert_eq!(values(&invalid["after"]), (1, 1, 7, 4), "{invalid}");
    assert_eq!(invalid["after"]["user_timeout"], 40_000, "{invalid}");
    // Options the lock does not hold pass untouched, also when their value is over a page.
    let large = client.read();
    assert_eq!(large["large_value"], 0, "{large}");
    assert_eq!(large["congestion"], "reno", "{large}");

    // Under a policy without a user timeout, one longer than keepalive takes to give up
    // (21 + 7 × 4 s) would loosen it: the kernel then drops an idle connection only once the
    // user timeout has passed, whatever the count. It is held at 49 s, whether set after
    // connecting or before; none, or a shorter one, is the application's to set.
    agent.cli_ok(&["policy", "set", cg.rel(), "--user-timeout", "0"]);
    let user_timeouts = |args: &[&str]| {
        let pair = Proc::sock(&[&["pair", "4"], args].concat(), &cg).read();
        (
            pair["client"]["user_timeout"].clone(),
            pair["client"]["keepalive"].clone(),
        )
    };
    for (args, want) in [
        (&["--user-timeout-after", "600000"][..], 49_000),
        (&["--user-timeout", "600000"], 49_000),
        (&["--user-timeout-after", "49000"], 49_000),
        (&["--user-timeout-after", "5000"], 5_000),
        (&["--user-timeout", "5000"], 5_000),
        (&[], 0),
    ] {
        assert_eq!(user_timeouts(args), (want.into(), 1.into()), "{args:?}");
    }
    // A listener's, which its connections inherit, likewise.
    let mut listener = Proc::sock(
        &[
            "listen",
            "127.0.0.1:0",
            "1",
            "--user-timeout-after",
            "600000",
        ],
        &cg,
    );
    let port = listener.read()["port"].as_u64().unwrap();
    let _client = Proc::sock(&["connect", &format!("127.0.0.1:{port}")], &cg);
    assert_eq!(listener.read()["accepted"]["user_timeout"], 49_000);
    // The 49 s is the program's: a policy change takes it back, as it does a user timeout
    // the policy set, while one the application set below it stays.
    let mut held = Proc::sock(&["pair", "4", "--user-timeout", "600000"], &cg);
    let mut own = Proc::sock(&["pair", "4", "--user-timeout", "5000"], &cg);
    assert_eq!(held.read()["client"]["user_timeout"], 49_000);
    assert_eq!(own.read()["client"]["user_timeout"], 5_000);
    agent.cli_ok(&[
        "policy",
        "set",
        cg.rel(),
        "--idle",
        "300",
        "--interval",
        "30",
        "--user-timeout",
        "0",
    ]);
    let client = held.report().swap_remove(0);
    assert_eq!(
        (client["idle"].clone(), client["user_timeout"].clone()),
        (300.into(), 0.into()),
        "{client}"
    );
    assert_eq!(own.report()[0]["user_timeout"], 5_000);
    // Also with the cgroup `off` in between: `off` leaves the 49 s, and the policy after
    // takes it back.
    agent.cli_ok(&[
        "policy",
        "set",
        cg.rel(),
        "--idle",
        "21",
        "--interval",
        "7",
        "--user-timeout",
        "0",
    ]);
    let mut via_off = Proc::sock(&["pair", "4", "--user-timeout", "600000"], &cg);
    assert_eq!(via_off.read()["client"]["user_timeout"], 49_000);
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "off"]);
    assert_eq!(via_off.report()[0]["user_timeout"], 49_000, "off leaves it");
    agent.cli_ok(&[
        "policy",
        "set",
        cg.rel(),
        "--mode",
        "enforce",
        "--user-timeout",
        "0",
    ]);
    let client = via_off.report().swap_remove(0);
    assert_eq!(
        (values(&client), client["user_timeout"].clone()),
        ((1, 21, 7, 4), 0.into()),
        "{client}"
    );
}

#[test]
fn a_removed_cgroup_is_cleaned_up_and_a_glob_applies_again_when_it_returns() {
    let parent = TestCgroup::new("removed");
    let config = write_config(&format!(
        "[[policy]]\ncgroup = \"{}/job-*\"\nidle = 26\n",
        parent.rel()
    ));
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    let job = parent.child("job-1");
    let id = job.id();
    let listed = |id: u64| agent.policies().iter().any(|p| p["cgroup_id"] == id);
    eventually(Duration::from_secs(10), "the glob to match job-1", || {
        listed(id).then_some(())
    });
    {
        let mut pair = Proc::sock(&["pair", "4"], &job);
        assert_eq!(values(&pair.read()["client"]).1, 26);
    }
    // Dropping the cgroup removes it.
    drop(job);
    eventually(
        Duration::from_secs(10),
        "the removed cgroup's entry to go",
        || (!listed(id)).then_some(()),
    );
    let status = agent.status();
    assert!(
        !status["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["cgroup_id"] == id),
        "its counters are dropped too: {status:#}"
    );
    let job = parent.child("job-1");
    let new_id = job.id();
    eventually(
        Duration::from_secs(10),
        "the glob to match job-1 again",
        || listed(new_id).then_some(()),
    );
    let mut pair = Proc::sock(&["pair", "4"], &job);
    assert_eq!(values(&pair.read()["client"]).1, 26);
    drop(pair);
    drop(job);
    let log = agent.log();
    assert!(!log.contains("ERROR"), "no error loop: {log}");
}

#[test]
fn counters_of_cgroups_removed_while_no_agent_ran_are_dropped_at_start() {
    let parent = TestCgroup::new("gone");
    let mut agent = Agent::start(&parent, &[]);
    let dirs = agent.dirs();
    let job = parent.child("job");
    let id = job.id();
    Proc::sock(&["pair", "4"], &job).read();
    let counted = |status: &serde_json::Value| {
        status["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["cgroup_id"] == id)
    };
    assert!(counted(&agent.status()), "{:#}", agent.status());
    assert!(agent.stop_with(libc::SIGTERM).success());
    drop(job);
    assert!(
        counted(&dirs.status()),
        "nothing pruned them while no agent ran"
    );
    let mut agent = Agent::start_in(&dirs, &parent, &[]);
    let status = agent.status();
    assert!(!counted(&status), "{status:#}");
    assert!(
        agent.log().contains("dropped the counters of 1 cgroup(s)"),
        "{}",
        agent.log()
    );
    // A cgroup below a directory the agent may not read is not a removed one: an agent with
    // only the unit's capabilities cannot tell, and keeps every counter.
    let hidden = parent.child("hidden");
    let kept = hidden.child("kept");
    Proc::sock(&["pair", "4"], &kept).read();
    assert_eq!(cgroup_row(&agent.status(), &kept)["enforced_total"], 2);
    assert!(agent.stop_with(libc::SIGTERM).success());
    std::os::unix::fs::chown(hidden.path(), Some(65534), Some(65534)).expect("chown");
    std::fs::set_permissions(hidden.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let agent = Agent::start_with(
        &dirs,
        &["run", "--cgroup", parent.path().to_str().unwrap()],
        &[],
        Some(&GRANTED),
    );
    assert_eq!(cgroup_row(&agent.status(), &kept)["enforced_total"], 2);
    assert!(
        agent.log().contains("kept the counters of every cgroup"),
        "{}",
        agent.log()
    );
}

#[test]
fn full_tracking_maps_are_counted_and_enforcement_continues() {
    let parent = TestCgroup::new("full");
    let cgs: Vec<TestCgroup> = (0..3).map(|i| parent.child(&format!("c{i}"))).collect();
    let agent = Agent::start(
        &parent,
        &[
            "--idle",
            "22",
            "--max-tracked-sockets",
            "3",
            "--max-tracked-cgroups",
            "2",
        ],
    );
    let mut pairs = Vec::new();
    for cg in &cgs {
        for _ in 0..2 {
            let mut pair = Proc::sock(&["pair", "4"], cg);
            let out = pair.read();
            assert_eq!(values(&out["client"]).1, 22, "enforced despite full maps");
            assert_eq!(values(&out["server"]).1, 22, "enforced despite full maps");
            pairs.push(pair);
        }
    }
    // Three sockets fit in the hash, and up to two more in the slot table (the largest power
    // of two not above 3), depending on where the cookies land.
    let status = agent.status();
    let counters = &status["counters"];
    let listed = status["sockets"].as_array().unwrap().len() as u64;
    assert!((3..=5).contains(&listed), "as many as fit: {listed}");
    assert_eq!(
        counters["socket_tracking_full"].as_u64().unwrap(),
        12 - listed,
        "{counters}"
    );
    assert!(
        counters["cgroup_stats_full"].as_u64().unwrap() >= 1,
        "{counters}"
    );
    let human = String::from_utf8(agent.cli(&["status"]).stdout).unwrap();
    assert!(
        human.contains("raise max_tracked_sockets") && human.contains("raise max_tracked_cgroups"),
        "{human}"
    );
    drop(pairs);
    // Room again once sockets close.
    eventually(Duration::from_secs(30), "the tracking map to drain", || {
        (agent.status()["tracked_entries"] == 0).then_some(())
    });
}

/// `lock` sockets that the full tracking maps left out are released like the others when their
/// cgroup leaves `lock`, for `enforce` as for `off`.
#[test]
fn untracked_locked_sockets_are_released_when_the_lock_goes() {
    let parent = TestCgroup::new("untrackedlock");
    let config = write_config("[default]\nidle = 21\nmode = \"lock\"\n");
    let agent = Agent::start(
        &parent,
        &[
            "--config",
            config.to_str().unwrap(),
            "--max-tracked-sockets",
            "1",
        ],
    );
    // Room for two records (one slot, one hash entry), so at least one client in each cgroup
    // goes untracked.
    let cgs = ["enforce", "off"].map(|mode| (mode, parent.child(mode)));
    let mut pairs = Vec::new();
    for (mode, cg) in &cgs {
        for _ in 0..3 {
            // The client tries to switch keepalive off just before the first report.
            let mut pair = Proc::sock(&["pair", "4", "--loosen-at-report", "1"], cg);
            assert_eq!(values(&pair.read()["client"]).1, 21);
            pairs.push((mode, pair));
        }
        agent.cli_ok(&["policy", "set", cg.rel(), "--mode", mode]);
    }
    let full = agent.status()["counters"]["socket_tracking_full"].clone();
    assert!(full.as_u64().unwrap() >= 10, "{full}");
    for (mode, pair) in &mut pairs {
        let client = pair.report().swap_remove(0);
        assert_eq!(values(&client).0, 0, "{mode}: not held any more: {client}");
    }
}

/// Sockets the full tracking maps leave out are treated as the listed ones on later passes:
/// values the application set after the program are kept (`enforce`), a policy change
/// reaches them (`fill`), and they are counted once.
#[test]
fn untracked_sockets_are_left_alone_when_unchanged_and_updated_when_changed() {
    let parent = TestCgroup::new("untracked");
    let agent = Agent::start(&parent, &["--idle", "21", "--max-tracked-sockets", "1"]);
    let own = parent.child("own");
    let fill = parent.child("fill");
    let set_fill = |idle: &str| {
        agent.cli_ok(&[
            "policy",
            "set",
            fill.rel(),
            "--mode",
            "fill",
            "--idle",
            idle,
        ]);
    };
    set_fill("31");
    let mut pairs = Vec::new();
    for _ in 0..3 {
        // The application sets keepalive of its own after the program (as Go does).
        let mut pair = Proc::sock(&["pair", "4", "--keepalive-after", "99"], &own);
        assert_eq!(values(&pair.read()["client"]).1, 99);
        let mut filled = Proc::sock(&["pair", "4"], &fill);
        assert_eq!(values(&filled.read()["client"]).1, 31);
        pairs.extend([pair, filled]);
    }
    let status = agent.status();
    let listed = status["sockets"].as_array().unwrap().len() as u64;
    assert!(listed <= 2, "room for two records: {listed}");
    let full = || agent.status()["counters"]["socket_tracking_full"].clone();
    assert_eq!(full(), 12 - listed);

    // A pass over every socket.
    set_fill("32");
    for (i, pair) in pairs.iter_mut().enumerate() {
        let client = pair.report().swap_remove(0);
        let want = if i % 2 == 0 { 99 } else { 32 };
        assert_eq!(values(&client).1, want, "pair {i}: {client}");
    }
    assert_eq!(full(), 12 - listed, "counted once, not once per pass");

    // The first pair took the two records; the last one was left out. With the others closed
    // there is room, and a pass that changes nothing for it lists it.
    let last = pairs.swap_remove(4);
    drop(pairs);
    let mut idle = 40;
    eventually(
        Duration::from_secs(10),
        "the left-out pair to be listed",
        || {
            idle += 1;
            set_fill(&idle.to_string());
            (agent.status()["sockets"].as_array().unwrap().len() == 2).then_some(())
        },
    );
    drop(last);
}

/// A socket the full tracking maps left out keeps its record in its own storage. When it
/// disconnects and connects again, the record ends with the first connection: the next one,
/// made under `off`, is new to a later pass and counted as such.
#[test]
fn a_left_out_socket_that_connects_again_is_a_new_connection() {
    let parent = TestCgroup::new("untrackedagain");
    let agent = Agent::start(&parent, &["--idle", "21", "--max-tracked-sockets", "1"]);
    // Two records fill the maps (one slot, one hash entry).
    let mut filler = Proc::sock(&["pair", "4"], &parent);
    filler.read();
    let cg = parent.child("app");
    let mut pair = Proc::sock(
        &[
            "pair",
            "4",
            "--disconnect-at-report",
            "1",
            "--reconnect-at-report",
            "2",
        ],
        &cg,
    );
    assert_eq!(values(&pair.read()["client"]).1, 21);
    let total = || cgroup_row(&agent.status(), &cg)["enforced_total"].clone();
    assert_eq!(total(), 2, "both ends, left out of the maps");
    assert_eq!(
        agent.status()["counters"]["socket_tracking_full"],
        2,
        "{}",
        agent.log()
    );
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "off"]);
    pair.report();
    // Connected again under `off`: the client, and the listener's new connection (never
    // accepted) are left alone until the policy returns.
    let client = pair.report().swap_remove(0);
    assert_eq!(
        values(&client).1,
        21,
        "off leaves values as they were: {client}"
    );
    agent.cli_ok(&[
        "policy",
        "set",
        cg.rel(),
        "--mode",
        "enforce",
        "--idle",
        "33",
    ]);
    let client = pair.report().swap_remove(0);
    assert_eq!(values(&client).1, 33, "{client}");
    assert_eq!(
        total(),
        4,
        "the second connection's two ends are new, the client's too"
    );
}

/// A new program does not know HZ until it first sets an idle time. A connection accepted in
/// that window from a listener the previous program configured under `fill` carries the
/// policy's values: the program's, not the application's.
#[test]
fn fill_connections_accepted_before_the_new_program_learns_hz_are_the_programs() {
    let parent = TestCgroup::new("hzrestart");
    let svc = parent.child("svc");
    let outside = TestCgroup::new("hzclient");
    let ns = Netns::new("hz");
    let config = write_config("[default]\nmode = \"fill\"\nidle = 31\n");
    let run = [
        "run",
        "--cgroup",
        parent.path().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let mut agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    let dirs = agent.dirs();
    let mut server = Proc::spawn(
        &sock_bin(),
        &["listen", "127.0.0.1:0"],
        Some(svc.path()),
        Some(&ns),
    );
    let port = server.read()["port"].as_u64().unwrap();
    agent.stop_with(libc::SIGTERM);
    // Without CAP_SYS_ADMIN the new agent cannot enter the listener's namespace: its first
    // pass leaves the listener alone, so nothing teaches the new program HZ before the
    // connection arrives.
    let agent = Agent::start_with(&dirs, &run, &[], Some(&[12, 19, 38, 39]));
    // The client is outside the attach cgroup: only the accepted end is the program's.
    let mut client = Proc::spawn(
        &sock_bin(),
        &["connect", &format!("127.0.0.1:{port}")],
        Some(outside.path()),
        Some(&ns),
    );
    client.read();
    assert_eq!(values(&server.read()["accepted"]).1, 31);
    let status = agent.status();
    let row = status["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["direction"] == "inbound")
        .unwrap_or_else(|| panic!("{status:#}"));
    assert_eq!(
        (&row["app_owned"], &row["inherited"]),
        (&false.into(), &true.into()),
        "{row}"
    );
}

#[test]
fn a_restart_with_another_socket_capacity_keeps_finding_the_pinned_records() {
    let cg = TestCgroup::new("slots");
    let mut agent = Agent::start(&cg, &["--max-tracked-sockets", "4"]);
    let dirs = agent.dirs();
    let pairs: Vec<Proc> = (0..2)
        .map(|_| {
            let mut pair = Proc::sock(&["pair", "4"], &cg);
            pair.read();
            pair
        })
        .collect();
    assert_eq!(agent.status()["sockets"].as_array().unwrap().len(), 4);
    agent.stop_with(libc::SIGTERM);
    // The default capacity asks for a larger slot table; the pinned one, with its records,
    // must stay in use, or the records could no longer be found when their sockets close.
    let agent = Agent::start_in(&dirs, &cg, &[]);
    assert_eq!(agent.status()["sockets"].as_array().unwrap().len(), 4);
    drop(pairs);
    eventually(Duration::from_secs(30), "the records to be removed", || {
        (agent.status()["tracked_entries"] == 0).then_some(())
    });
    assert!(
        agent.log().contains(
            "keeping the 4 tracking slots of the pinned KA_SOCK_SLOTS (this max_tracked_sockets \
             asks for 65536)"
        ),
        "{}",
        agent.log()
    );
}

/// `run --cgroup <cgroup>`.
#[test]
fn a_removed_attach_cgroup_ends_the_agent_with_exit_4_and_the_next_start_attaches_anew() {
    let parent = TestCgroup::new("rmattach");
    let cg = parent.child("attach");
    let dirs = AgentDirs::new();
    let mut agent = Agent::start_in(&dirs, &cg, &["--idle", "23"]);
    // A sibling coming and going is no concern of the agent's.
    let sibling = parent.child("sibling");
    drop(sibling);
    std::fs::remove_dir(cg.path()).unwrap();
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the agent kept running:\n{}", agent.log()));
    assert_eq!(status.code(), Some(4), "{}", agent.log());
    assert!(
        agent.log().contains(&format!(
            "the attach cgroup {} was removed; enforcement ended with it",
            cg.display()
        )),
        "{}",
        agent.log()
    );
    assert!(
        !dirs.runtime_dir.join("control.sock").exists(),
        "the control socket outlived the agent"
    );
    // What is pinned enforces nothing, and `status` says so rather than "attached".
    let out = dirs.cli(&["status"]);
    let (text, err) = (String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        out.status.success() && text.starts_with("not attached") && err.contains("removed"),
        "{text}{err}"
    );
    // A start exits 4 while the cgroup is gone, so the hint does not say to start alone.
    assert!(
        err.contains("start the agent again once that cgroup exists again"),
        "{err}"
    );
    assert_eq!(dirs.status()["attach_cgroup"], serde_json::Value::Null);

    // Recreated (a slice that systemd or kubelet makes again): the pinned link of the removed
    // cgroup enforces nothing and is replaced, instead of refusing with exit 7.
    std::fs::create_dir(cg.path()).unwrap();
    let (code, item) = keepalive_check(&dirs, &cg);
    assert!(
        item["status"] == "ok"
            && item["detail"]
                .as_str()
                .is_some_and(|d| d.contains("was on a cgroup that has been removed")),
        "{code}: {item}"
    );
    let again = Agent::start_in(&dirs, &cg, &["--idle", "24"]);
    assert!(again.log().contains("attaching anew"), "{}", again.log());
    assert_eq!(idle_of(&cg), 24);
}

#[test]
fn a_removed_control_socket_is_told_apart_from_no_agent() {
    let cg = TestCgroup::new("nosocket");
    let agent = Agent::start(&cg, &["--idle", "31"]);
    std::fs::remove_file(agent.runtime_dir.join("control.sock")).unwrap();
    let out = agent.cli(&["policy", "list"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 7, "{err}");
    assert!(
        err.contains(&format!("the keepalive agent (pid {}) holds ", agent.pid()))
            && err.contains("or its control socket was removed; restart it")
            && !err.contains("start it with"),
        "{err}"
    );
    // Enforcement goes on.
    assert_eq!(idle_of(&cg), 31);
}

#[test]
fn a_control_client_that_sends_nothing_holds_up_neither_requests_nor_a_stop() {
    let cg = TestCgroup::new("silentclient");
    let mut agent = Agent::start(&cg, &["--idle", "31"]);
    let socket = agent.runtime_dir.join("control.sock");
    // Connected and silent (a `policy` command suspended with Ctrl-Z, say): the agent gives up
    // on it after 5 s, and must not wait for that.
    let _silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let started = Instant::now();
    agent.cli_ok(&["policy", "set", cg.rel(), "--idle", "32"]);
    let took = started.elapsed();
    // Against the 5 s the agent gives a silent client, with room for a loaded machine.
    assert!(took < Duration::from_secs(4), "policy set took {took:?}");
    assert_eq!(idle_of(&cg), 32);
    // One that connects and closes at once (a probe of the socket) is no failed request.
    drop(std::os::unix::net::UnixStream::connect(&socket).unwrap());
    agent.cli_ok(&["policy", "list"]);
    assert!(
        !agent.log().contains("control request failed"),
        "{}",
        agent.log()
    );

    let _silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let status = agent.stop_with(libc::SIGTERM);
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(4), "SIGTERM took {took:?}");
}

fn run_args(cgroup: &TestCgroup) -> [&str; 3] {
    ["run", "--cgroup", cgroup.path().to_str().unwrap()]
}

/// Whether process `pid` has a handler for `signal` (its SigCgt mask).
fn catches(pid: u32, signal: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

#[test]
fn sighup_while_starting_becomes_a_reload_instead_of_ending_the_agent() {
    let cg = TestCgroup::new("hupstart");
    let mut agent = Agent::spawn(&AgentDirs::new(), &run_args(&cg), &[], None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !catches(agent.pid(), libc::SIGHUP) {
        assert!(
            Instant::now() < deadline,
            "the agent never caught SIGHUP:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        sockops_attachments(cg.path()),
        0,
        "SIGHUP is caught only after the program is attached"
    );
    agent.signal(libc::SIGHUP);
    agent.wait_ready();
    agent.wait_notify("RELOADING=1", Duration::from_secs(10));
    agent.wait_notify("READY=1", Duration::from_secs(10));
    // Without --config: the default file, or its absence, is named.
    let default = "/etc/keepalive-agent/config.toml";
    let (started, said) = if std::path::Path::new(default).exists() {
        (
            format!(" from {default}\n"),
            format!("reloaded the config {default}\n"),
        )
    } else {
        (
            format!(
                " (there is no config file: {default} does not exist, so the built-in default \
                 applies)\n"
            ),
            format!("reloaded the config: there is none ({default} does not exist)"),
        )
    };
    assert!(agent.log().contains(&started), "{}", agent.log());
    assert!(agent.log().contains(&said), "{}", agent.log());
    assert_eq!(sockops_attachments(cg.path()), 1);
}

/// Asserts that `out` is a refusal with exit code `want` and one line on stderr, and that
/// nothing was attached to `cg`; returns the line.
fn refused(out: &Output, want: i32, cg: &TestCgroup) -> String {
    let err = stderr(out);
    assert_eq!(code(out), want, "{err}");
    assert_eq!(err.lines().count(), 1, "one message: {err}");
    assert_eq!(sockops_attachments(cg.path()), 0);
    err
}

#[test]
fn the_bpffs_root_is_refused_as_state_directory_and_left_as_it_was() {
    let cg = TestCgroup::new("bpffsroot");
    let root = std::path::Path::new("/sys/fs/bpf");
    let mode = || std::fs::metadata(root).unwrap().permissions().mode();
    let before = mode();
    // Another tool's empty directory, which `detach` must not take for its own.
    let other = root.join(keepalive_tests::unique("other-tool"));
    std::fs::create_dir(&other).unwrap();
    let dirs = AgentDirs {
        state_dir: root.to_owned(),
        runtime_dir: std::env::temp_dir().join(keepalive_tests::unique("bpffsroot")),
        bin: None,
    };
    for args in [&run_args(&cg)[..], &["detach"]] {
        let err = refused(&dirs.cli(args), 2, &cg);
        assert!(
            err.contains("is a mount point") && err.contains("/sys/fs/bpf/keepalive"),
            "{args:?}: {err}"
        );
    }
    // Named by a config, it is the config's error, at its line.
    let config = write_config("# the host's\nstate_dir = \"/sys/fs/bpf\"\n");
    let config = config.to_str().unwrap();
    for args in [
        &[&run_args(&cg)[..], &["--config", config]].concat()[..],
        &["detach", "--config", config],
    ] {
        let mut cmd = std::process::Command::new(keepalive_tests::agent_bin());
        cmd.arg("--runtime-dir")
            .arg(&dirs.runtime_dir)
            .args(args)
            .env_remove("KEEPALIVE_STATE_DIR");
        let err = refused(&dirs.output(cmd), 2, &cg);
        assert!(
            err.starts_with(&format!(
                "keepalive-agent: {config}:2: state_dir: state directory /sys/fs/bpf is a mount \
                 point"
            )),
            "{args:?}: {err}"
        );
    }
    assert!(
        !dirs.runtime_dir.exists(),
        "the refused start made its runtime directory"
    );
    assert!(other.exists(), "detach removed another tool's directory");
    std::fs::remove_dir(&other).unwrap();
    assert_eq!(mode(), before, "the bpffs root's mode changed");
    assert!(!root.join("link_sockops").exists());
}

/// A directory of another tool's is refused as state directory, and left as it was; one that
/// does not exist yet is made with its parents.
#[test]
fn another_tools_directory_is_refused_as_state_directory_and_left_as_it_was() {
    let cg = TestCgroup::new("foreignstate");
    let dirs = AgentDirs::new();
    let tool = dirs.state_dir.join("othertool");
    std::fs::create_dir_all(&tool).unwrap();
    std::fs::set_permissions(&dirs.state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Each says what to do next: `run` needs another directory, `detach` this one cleared.
    for (args, advice) in [
        (&run_args(&cg)[..], "give a directory of its own"),
        (
            &["detach"],
            "detach removes nothing from a directory that is not keepalive's alone: move that \
             entry out of it (it is not keepalive's) and run detach again",
        ),
    ] {
        let err = refused(&dirs.cli(args), 2, &cg);
        assert!(
            err.contains(&format!(
                "holds othertool and is not keepalive's own; {advice}"
            )),
            "{args:?}: {err}"
        );
    }
    let mode = std::fs::metadata(&dirs.state_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o755, "made root-only");
    assert!(tool.exists(), "detach removed another tool's directory");
    assert!(
        !dirs.runtime_dir.exists(),
        "the refused start made its runtime directory"
    );
    std::fs::remove_dir(&tool).unwrap();
    std::fs::remove_dir(&dirs.state_dir).unwrap();

    let nested = AgentDirs {
        state_dir: dirs.state_dir.join("a/b"),
        ..AgentDirs::new()
    };
    let agent = Agent::start_in(&nested, &cg, &[]);
    assert!(
        nested
            .state_dir
            .join(keepalive_common::PIN_LINK_SOCKOPS)
            .exists()
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dirs.state_dir);
}

#[test]
fn no_cgroup2_gets_one_clear_message_and_exit_9() {
    let cg = TestCgroup::new("nocg2");
    let mount = CString::new(cgroup2_mount().to_str().unwrap()).unwrap();
    let out = agent_in_private_mounts(&AgentDirs::new(), &run_args(&cg), move || umount(&mount));
    // Not 4: the unit retries a missing cgroup, not a host without cgroup2.
    let err = refused(&out, 9, &cg);
    assert!(err.contains("no cgroup v2 filesystem is mounted"), "{err}");
}

#[test]
fn missing_btf_gets_one_clear_message_and_exit_6() {
    let cg = TestCgroup::new("nobtf");
    let out = agent_in_private_mounts(&AgentDirs::new(), &run_args(&cg), || {
        hide_with_tmpfs(c"/sys/kernel/btf")
    });
    let err = refused(&out, 6, &cg);
    assert!(
        err.contains("/sys/kernel/btf/vmlinux") && err.contains("CONFIG_DEBUG_INFO_BTF"),
        "{err}"
    );
}

#[test]
fn bpffs_that_cannot_be_mounted_gets_one_clear_message_and_exit_5() {
    let cg = TestCgroup::new("nobpffs");
    let out = agent_in_private_mounts(&AgentDirs::new(), &run_args(&cg), || {
        // Unmount bpffs here, and drop CAP_SYS_ADMIN so the agent cannot mount it again.
        let _ = umount(c"/sys/fs/bpf");
        // SAFETY: prctl with constant arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, 21, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    });
    let err = refused(&out, 5, &cg);
    assert!(
        err.contains("bpffs is not mounted") && err.contains("mount -t bpf"),
        "{err}"
    );
}

/// In a container that sees the host's /sys with mounts propagating only into it (a slave
/// mount, as Kubernetes' `HostToContainer` gives), a bpffs the agent mounted itself would go
/// with the container, and the pinned enforcement with it: with no bpffs there, `run` refuses
/// instead of mounting one.
#[test]
fn bpffs_mounted_only_for_a_container_is_refused_with_exit_5() {
    let cg = TestCgroup::new("slavebpffs");
    let peer = keepalive_tests::TempDir::new("sysmaster");
    let peer = CString::new(peer.path().to_str().unwrap()).unwrap();
    let as_container = move || {
        let _ = umount(c"/sys/fs/bpf");
        // /sys becomes a slave of a peer group, as a container's view of the host's is.
        let propagate = |path: &std::ffi::CStr, flag| {
            // SAFETY: mount with a valid C string, changing only propagation.
            let ret = unsafe {
                libc::mount(
                    std::ptr::null(),
                    path.as_ptr(),
                    std::ptr::null(),
                    flag,
                    std::ptr::null(),
                )
            };
            if ret != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        propagate(c"/sys", libc::MS_SHARED)?;
        bind_mount(c"/sys", &peer)?;
        propagate(c"/sys", libc::MS_SLAVE)
    };
    let out = agent_in_private_mounts(&AgentDirs::new(), &run_args(&cg), as_container.clone());
    let err = refused(&out, 5, &cg);
    assert!(
        err.contains("bpffs is not mounted at /sys/fs/bpf")
            && err.contains("would stay in this mount namespace")
            && err.contains("on the host"),
        "{err}"
    );
    // `check` fails on it too, as on everything `run` refuses.
    fn check_bpffs(
        dirs: &AgentDirs,
        setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
    ) -> serde_json::Value {
        let out = agent_in_private_mounts(dirs, &["check", "--json"], setup);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|err| panic!("{err}: {}", stderr(&out)));
        check_item(&report, "bpffs").clone()
    }
    let bpffs = check_bpffs(&AgentDirs::new(), as_container.clone());
    assert_eq!(bpffs["status"], "fail", "{bpffs}");
    assert!(
        bpffs["fix"].as_str().unwrap().contains("on the host"),
        "{bpffs}"
    );
    // Except with a state directory on a bpffs the container has elsewhere, which `run` uses
    // as it is.
    let elsewhere = keepalive_tests::TempDir::new("otherbpffs");
    let mut dirs = AgentDirs::new();
    dirs.state_dir = elsewhere.path().join("state");
    let mount_at = CString::new(elsewhere.path().to_str().unwrap()).unwrap();
    let bpffs = check_bpffs(&dirs, move || {
        as_container()?;
        // SAFETY: mount with valid C strings.
        if unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                mount_at.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    });
    // It is the only bpffs `run` needs: nothing to mount, nothing to warn of.
    assert_eq!(bpffs["status"], "ok", "{bpffs}");
    assert!(
        bpffs["detail"].as_str().unwrap().contains(&format!(
            "the state directory {} is on bpffs",
            dirs.state_dir.display()
        )),
        "{bpffs}"
    );
    // A state directory on no bpffs at all: `run` mounts none for it, and exits 5.
    let mut dirs = AgentDirs::new();
    dirs.state_dir = elsewhere.path().join("plain");
    let bpffs = check_bpffs(&dirs, || {
        let _ = umount(c"/sys/fs/bpf");
        Ok(())
    });
    assert_eq!(bpffs["status"], "fail", "{bpffs}");
}

#[test]
fn an_unprivileged_user_can_neither_change_policy_nor_detach() {
    use std::os::unix::process::CommandExt as _;
    let cg = TestCgroup::new("security");
    let agent = Agent::start(&cg, &["--idle", "18"]);
    let dirs = agent.dirs();
    let as_nobody = |args: &[&str]| {
        let mut cmd = dirs.command(args);
        cmd.uid(65534).gid(65534);
        dirs.output(cmd)
    };
    for args in [
        &["policy", "set", cg.rel(), "--idle", "99"][..],
        &["policy", "reload"],
        &["detach"],
        &["status"],
    ] {
        let out = as_nobody(args);
        let err = stderr(&out);
        assert_eq!(code(&out), 3, "{args:?}: {err}");
        assert!(err.contains("permission denied"), "{args:?}: {err}");
    }
    assert_eq!(idle_of(&cg), 18, "nothing changed");
    assert_eq!(sockops_attachments(cg.path()), 1, "still attached");
    // A state directory below one it may not look into (as below a bpffs that systemd, or
    // the agent, mounted with mode 0700) is no missing one: not "nothing is pinned" (exit 7).
    let hidden = dirs.state_dir.join("maps");
    let mut cmd = std::process::Command::new(keepalive_tests::agent_bin());
    cmd.arg("--state-dir").arg(&hidden).arg("status");
    cmd.uid(65534).gid(65534);
    let out = dirs.output(cmd);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
    // `check` cannot tell whether keepalive is attached, and does not say it is not.
    let out = as_nobody(&["check", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json");
    let item = check_item(&report, "keepalive");
    assert_eq!(item["status"], "warn", "{item}");
    assert!(
        item["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("cannot tell whether keepalive is attached")),
        "{item}"
    );
    // Root-only on disk.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dirs.state_dir), 0o700);
    assert_eq!(mode(&dirs.runtime_dir), 0o700);
    assert_eq!(mode(&dirs.runtime_dir.join("control.sock")), 0o600);
    // Every pin, the maps' directory and what it holds included.
    let mut pending = vec![dirs.state_dir.clone()];
    let mut pins = 0;
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                assert_eq!(mode(&path), 0o700, "{}", path.display());
                pending.push(path);
            } else {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
                pins += 1;
            }
        }
    }
    assert!(pins >= keepalive_common::PINNED_MAPS.len(), "{pins} pins");
}

#[test]
fn switching_a_locked_cgroup_to_off_releases_the_lock() {
    let cg = TestCgroup::new("unlock");
    let config = write_config("[default]\nidle = 21\nmode = \"lock\"\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let mut server = Proc::sock(&["listen", "127.0.0.1:0"], &cg);
    let port = server.read()["port"].as_u64().unwrap();
    let mut held = Proc::sock(&["connect", &format!("127.0.0.1:{port}")], &cg);
    assert_eq!(values(&held.read()["connected"]).1, 21);
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "off"]);
    drop(held);
    // A new connection in an off cgroup, then an application change on it, both untouched.
    let mut free = Proc::sock(&["connect", &format!("127.0.0.1:{port}"), "--loosen"], &cg);
    free.read();
    let loosen = free.read();
    assert_eq!(
        loosen["after"]["keepalive"], 0,
        "not held any more: {loosen}"
    );
}

#[test]
fn established_at_survives_a_policy_change() {
    let cg = TestCgroup::new("established");
    let agent = Agent::start(&cg, &[]);
    let mut pair = Proc::sock(&["pair", "4"], &cg);
    pair.read();
    let before = agent.status()["sockets"][0].clone();
    // Longer than the second the stamps may read apart, so a restamp would show.
    std::thread::sleep(Duration::from_millis(3100));
    let change = SystemTime::now();
    agent.cli_ok(&["policy", "set", cg.rel(), "--idle", "42"]);
    let after = agent.status()["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["local"] == before["local"])
        .cloned()
        .expect("still listed");
    assert_eq!(after["idle"], 42);
    // Each `status` converts the stamps anew, so the same one can read a second apart.
    assert!(
        unix_seconds(&after["established_at"]).abs_diff(unix_seconds(&before["established_at"]))
            <= 1,
        "{before} vs {after}"
    );
    // Restamped by the apply pass, on another clock read than new connections get.
    assert_stamped_between(
        &after["enforced_at"],
        change,
        "enforced_at after the change",
    );
}

/// `detach` of one state directory goes ahead while an agent with another one holds the
/// runtime directory (the host's service, say), and is refused for that agent's own.
#[test]
fn detach_beside_a_running_agent_with_another_state_directory_goes_ahead() {
    let other_cg = TestCgroup::new("detachother");
    let mut other = Agent::start(&other_cg, &[]);
    let other_state = other.state_dir.clone();
    other.stop_with(libc::SIGTERM);
    let cg = TestCgroup::new("detachbeside");
    let agent = Agent::start(&cg, &[]);
    let beside = AgentDirs {
        state_dir: other_state.clone(),
        runtime_dir: agent.runtime_dir.clone(),
        bin: None,
    };
    let out = beside.detach();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!other_state.exists());
    assert_eq!(sockops_attachments(other_cg.path()), 0);
    let out = agent.dirs().detach();
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("(pid {})", agent.pid())),
        "{}",
        stderr(&out)
    );
    assert_eq!(sockops_attachments(cg.path()), 1, "still attached");
}

#[test]
fn detach_refuses_while_an_agent_holds_the_state_from_another_runtime_dir() {
    let cg = TestCgroup::new("statelock");
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let agent = Agent::start(&cg, &["--metrics", &metrics]);
    // Same pins, different runtime directory: an agent in a container looks like this.
    let other = AgentDirs {
        state_dir: agent.state_dir.clone(),
        runtime_dir: std::env::temp_dir().join(keepalive_tests::unique("other-run")),
        bin: None,
    };
    // Both refusals name the agent: the state directory's lock holds no pid, /proc/locks does.
    let names_it = format!(
        "another keepalive agent (pid {}) is running with state directory {}; stop it first",
        agent.pid(),
        agent.state_dir.display()
    );
    let out = other.detach();
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "the keepalive agent (pid {}) is running with state directory {} and would \
             re-attach; stop it first (`kill {0}`), then detach",
            agent.pid(),
            agent.state_dir.display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(sockops_attachments(cg.path()), 1, "still attached");
    // A policy command that names the state directory finds the agent holding it, so it does
    // not claim none runs.
    let out = other.cli(&["policy", "list"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "but the keepalive agent with pid {} holds the state directory {}: it runs with \
             another --runtime-dir; give the one it runs with",
            agent.pid(),
            agent.state_dir.display()
        )),
        "{}",
        stderr(&out)
    );
    // With the same metrics address too, whose port the first agent holds: still refused as
    // a second agent (7, which the unit does not retry), not as a taken port (1).
    let out = other.cli(&[
        "run",
        "--cgroup",
        cg.path().to_str().unwrap(),
        "--metrics",
        &metrics,
    ]);
    assert_eq!(
        code(&out),
        7,
        "a second agent on the same pins: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(&names_it), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&other.runtime_dir);
}

/// A lock (flock `how`: `LOCK_EX` or `LOCK_SH`) on the file or directory at `path`, held
/// until dropped: the state directory's, which `detach` and a running agent hold, or the
/// runtime directory's.
fn hold_lock(path: &std::path::Path, how: i32) -> std::fs::File {
    let held = std::fs::File::open(path).expect("open what to lock");
    // SAFETY: flock on a descriptor this test owns.
    let locked =
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), how | libc::LOCK_NB) };
    assert_eq!(locked, 0, "lock {}", path.display());
    held
}

/// Waits until a starting agent says it waits for the lock on `locked`.
fn wait_for_the_lock(agent: &mut Agent, locked: &std::path::Path) {
    eventually(
        Duration::from_secs(30),
        "the agent waiting for the lock",
        || {
            if let Some(status) = agent.wait_exit(Duration::ZERO) {
                panic!("the agent exited with {status}:\n{}", agent.log());
            }
            agent
                .log()
                .contains(&format!(
                    "{} is locked by another process",
                    locked.display()
                ))
                .then_some(())
        },
    );
}

/// `detach` holds the state directory's lock until it has removed the directory. An agent
/// starting meanwhile waits for the lock, instead of being refused as a second agent (exit 7,
/// which the unit does not retry) or pinning into a directory being emptied, and then makes the
/// directory anew: it ends up ready, attached and pinned.
#[test]
fn a_start_during_a_detach_waits_for_it_and_pins_anew() {
    let cg = TestCgroup::new("detachwait");
    let dirs = AgentDirs::new();
    // Dropped after the lock, so a failing test's agent detaches what it pinned.
    let mut agent = None;
    // What `detach` holds: the state directory's lock.
    std::fs::create_dir(&dirs.state_dir).expect("state dir");
    let held = hold_lock(&dirs.state_dir, libc::LOCK_EX);
    let agent = agent.insert(Agent::spawn(
        &dirs,
        &[
            "run",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--idle",
            "23",
        ],
        &[],
        None,
    ));
    wait_for_the_lock(agent, &dirs.state_dir);
    // A waiting agent leaves the directory alone, so the holder's removal cannot fail.
    let made: Vec<_> = std::fs::read_dir(&dirs.state_dir)
        .expect("read state dir")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert!(made.is_empty(), "made while the lock was held: {made:?}");
    // As `detach` ends: the directory removed, then the lock let go.
    std::fs::remove_dir(&dirs.state_dir).expect("remove state dir");
    drop(held);
    agent.wait_ready();
    assert_eq!(sockops_attachments(cg.path()), 1, "{}", agent.log());
    assert!(
        dirs.state_dir
            .join(keepalive_common::PIN_LINK_SOCKOPS)
            .exists(),
        "pinned anew: {}",
        agent.log()
    );
    assert_eq!(idle_of(&cg), 23, "enforced");
}

/// A fresh start that failed after it attached the lock program, before the sock_ops one,
/// leaves the lock link alone in the state directory. A start on another cgroup moves it
/// there: swapped in place, lock would hold on the first cgroup and not where this agent
/// enforces.
#[test]
fn a_lock_link_a_failed_start_left_on_another_cgroup_moves_to_the_attach_cgroup() {
    let first = TestCgroup::new("lockleft");
    let second = TestCgroup::new("lockmoved");
    let config = write_config("[default]\nidle = 21\ninterval = 7\ncount = 4\nmode = \"lock\"\n");
    let config = config.to_str().unwrap();
    let mut before = Agent::start(&first, &["--config", config]);
    let dirs = before.dirs();
    before.stop_with(libc::SIGKILL);
    // What such a start leaves: the lock link without the sock_ops link.
    std::fs::remove_file(dirs.state_dir.join(keepalive_common::PIN_LINK_SOCKOPS))
        .expect("unpin the sock_ops link");
    // The kernel lets go of an unpinned link once an RCU grace period has passed.
    eventually(
        Duration::from_secs(10),
        "the sock_ops link released",
        || (sockops_attachments(first.path()) == 0).then_some(()),
    );
    assert_eq!(setsockopt_attachments(first.path()), 1);

    let agent = Agent::start_in(&dirs, &second, &["--config", config]);
    eventually(Duration::from_secs(10), "the lock link released", || {
        (setsockopt_attachments(first.path()) == 0).then_some(())
    });
    assert_eq!(setsockopt_attachments(second.path()), 1, "{}", agent.log());
    assert!(
        agent.log().contains(&format!(
            "is attached to {}, not {}; detached it from there",
            first.display(),
            second.display()
        )),
        "{}",
        agent.log()
    );
    let mut server = Proc::sock(&["listen", "127.0.0.1:0"], &second);
    let port = server.read()["port"].as_u64().unwrap();
    let mut client = Proc::sock(
        &["connect", &format!("127.0.0.1:{port}"), "--loosen"],
        &second,
    );
    client.read();
    let loosen = client.read();
    assert_eq!(values(&loosen["after"]), (1, 21, 7, 4), "held: {loosen}");
}

/// A capacity the kernel has no memory for (here under a memory limit like the DaemonSet's) is
/// the config's to fix: exit 2 naming the setting, not 6 (the kernel cannot run keepalive),
/// with the kernel's reason, and no maps left pinned to keep the size at the next start.
#[test]
fn maps_the_kernel_has_no_memory_for_are_a_config_error_and_leave_nothing_pinned() {
    let cg = TestCgroup::new("nomem");
    let limited = TestCgroup::memory_limited("nomem-agent", 256 << 20);
    let dirs = AgentDirs::new();
    let run = |capacity: u32| {
        let config = write_config(&format!("max_tracked_cgroups = {capacity}\n"));
        let mut cmd = dirs.command(&[
            "run",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]);
        limited.run_in(&mut cmd);
        (cmd, config)
    };
    // 16777216 entries of about 88 bytes: 1.4 GiB, preallocated. The loader makes the maps
    // in an order that changes from run to run, so which were pinned before this one failed
    // does too: five starts leave some behind nearly always, without the clean-up.
    for _ in 0..5 {
        let (cmd, _config) = run(16_777_216);
        let out = dirs.output(cmd);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{err}");
        assert!(
            err.contains("no memory for map KA_CGSTATS, sized by max_tracked_cgroups = 16777216")
                && err.contains("Cannot allocate memory")
                && err.contains("lower max_tracked_cgroups"),
            "{err}"
        );
        assert_eq!(sockops_attachments(cg.path()), 0);
        assert!(
            !dirs.state_dir.exists(),
            "the failed start left its state directory, with the maps it had made"
        );
    }
    // `check` in the same cgroup says so first, loading the programs with the config's sizes.
    let check = |capacity: u32| {
        let config = write_config(&format!("max_tracked_cgroups = {capacity}\n"));
        let mut cmd = dirs.command(&[
            "check",
            "--json",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]);
        limited.run_in(&mut cmd);
        let out = dirs.output(cmd);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|err| panic!("{err}: {}", stderr(&out)));
        check_item(&report, "sock_ops").clone()
    };
    let sockops = check(16_777_216);
    assert_eq!(sockops["status"], "fail", "{sockops}");
    assert!(
        sockops["detail"]
            .as_str()
            .is_some_and(|d| d.contains("sized by max_tracked_cgroups = 16777216")),
        "{sockops}"
    );
    assert_eq!(check(4096)["status"], "ok");
    // The limit leaves room for an agent with a smaller capacity.
    let (cmd, _config) = run(4096);
    let agent = Agent::start_command(&dirs, cmd);
    assert_eq!(sockops_attachments(cg.path()), 1);
    drop(agent);
}

#[test]
fn detach_cgroup_checks_where_enforcement_is() {
    let a = TestCgroup::new("detach-a");
    let b = TestCgroup::new("detach-b");
    let mut agent = Agent::start(&a, &[]);
    // `--cgroup` names one cgroup, as `run`'s does: a pattern or nothing is a bad command
    // line (exit 2), which comes before the agent that runs (exit 7).
    let pattern = format!("{}/*", b.display());
    for (wanted, says) in [(pattern.as_str(), "is a pattern"), ("", "")] {
        let out = agent.dirs().cli(&["detach", "--cgroup", wanted]);
        assert_eq!(code(&out), 2, "{wanted:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }
    agent.stop_with(libc::SIGTERM);
    let dirs = agent.dirs();
    let out = dirs.cli(&["detach", "--cgroup", &pattern]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert_eq!(sockops_attachments(a.path()), 1, "nothing detached");
    let out = dirs.cli(&["detach", "--cgroup", b.path().to_str().unwrap()]);
    assert_eq!(code(&out), 7, "attached elsewhere: {}", stderr(&out));
    // A cgroup that does not exist was not the one of enforcement on one that does.
    let missing = format!("{}/nope", b.path().display());
    let out = dirs.cli(&["detach", "--cgroup", &missing]);
    assert_eq!(code(&out), 7, "attached elsewhere: {}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "attached to {}, not on {}/nope, which does not exist",
            a.display(),
            b.display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(sockops_attachments(a.path()), 1, "nothing detached");
    dirs.cli_ok(&["detach", "--cgroup", a.path().to_str().unwrap()]);
    assert_eq!(sockops_attachments(a.path()), 0);
    // Nothing attached: nothing to guard, so a second run succeeds, as a plain detach does,
    // also for a cgroup the cleanup removed after its first run.
    for cgroup in [a.path(), b.path(), std::path::Path::new(&missing)] {
        let out = dirs.cli_ok(&["detach", "--cgroup", cgroup.to_str().unwrap()]);
        assert!(stdout(&out).contains("nothing to detach"), "{out:?}");
    }
    // Enforcement on a cgroup removed since covers nothing, and may have been on the one
    // named: a cleanup that removed the cgroup before detaching still detaches.
    let c = TestCgroup::new("detach-c");
    let mut agent = Agent::start(&c, &[]);
    agent.stop_with(libc::SIGTERM);
    let dirs = agent.dirs();
    let gone = c.path().to_owned();
    drop(c);
    assert!(!gone.exists());
    let out = dirs.cli_ok(&["detach", "--cgroup", gone.to_str().unwrap()]);
    assert!(
        stdout(&out).contains("sock_ops program link on cgroup id"),
        "{out:?}"
    );
    assert!(!dirs.state_dir.exists(), "{out:?}");
    // A cgroup that exists was not the one of enforcement on a removed cgroup: refused.
    let d = TestCgroup::new("detach-d");
    let mut agent = Agent::start(&d, &[]);
    agent.stop_with(libc::SIGTERM);
    let dirs = agent.dirs();
    drop(d);
    let out = dirs.cli(&["detach", "--cgroup", b.path().to_str().unwrap()]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("(removed), not on"),
        "{}",
        stderr(&out)
    );
    dirs.cli_ok(&["detach"]);
}

/// Sets the soft limit on open files of process `pid` to `soft`; returns the old limits.
fn set_nofile(pid: u32, soft: libc::rlim_t, hard: Option<libc::rlim_t>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the current limits into `old`.
    let got = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(got, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard.unwrap_or(old.rlim_max),
    };
    // SAFETY: `new` is a valid rlimit.
    let set = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// Makes the lowest free descriptor number `pid`'s limit, so it can open nothing; returns the
/// limits it had. Lowered again until it holds still, in case a descriptor the process held for
/// a moment was closed since.
/// Waits until the agent accepted every connection made to its control socket at `socket`.
fn accepted(socket: &std::path::Path) {
    eventually(Duration::from_secs(10), "the agent to accept", || {
        (keepalive_tests::unix_accept_queue(socket) == 0).then_some(())
    });
}

fn starve_of_descriptors(pid: u32) -> libc::rlimit {
    let lowest_free = || {
        let fds: std::collections::HashSet<libc::rlim_t> =
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("agent fds")
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
        (0..).find(|fd| !fds.contains(fd)).unwrap()
    };
    let mut limit = lowest_free();
    let old = set_nofile(pid, limit, None);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let free = lowest_free();
        if free >= limit {
            return old;
        }
        limit = free;
        set_nofile(pid, limit, None);
    }
}

/// CPU time `pid` has used, in clock ticks (user plus system, /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name, which may hold spaces: state is field 3, utime 14.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn clients_the_agent_has_no_descriptor_for_wait_without_a_busy_loop() {
    let cg = TestCgroup::new("ctlfd");
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let agent = Agent::start(&cg, &["--idle", "43", "--metrics", &metrics]);
    let old = starve_of_descriptors(agent.pid());
    // A client of each listener waits in its listen queue; every accept() fails with EMFILE
    // until a descriptor is free.
    let socket = agent.dirs().runtime_dir.join("control.sock");
    let _waiting = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let mut scraper = std::net::TcpStream::connect(&metrics).expect("connect to metrics");
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(agent.pid());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(agent.pid()) - before;
    // A loop retrying accept() takes a whole CPU: 300 ticks in these 3 s at USER_HZ 100.
    assert!(used < 30, "the agent used {used} ticks in 3 s");
    // Each logged once, not at every retry (about one a second).
    for listener in ["control socket", "metrics"] {
        assert_eq!(
            agent
                .log()
                .matches(&format!("{listener}: accept failed"))
                .count(),
            1,
            "{}",
            agent.log()
        );
    }
    set_nofile(agent.pid(), old.rlim_cur, Some(old.rlim_max));
    // Clients are served again once there is room, the waiting ones too.
    let listed = agent.policies();
    assert!(listed.iter().any(|p| p["idle"] == 43), "{listed:?}");
    scraper
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut scraper, &mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    for listener in ["control socket", "metrics"] {
        eventually(Duration::from_secs(30), "the recovery in the log", || {
            agent
                .log()
                .contains(&format!("{listener}: accepting clients again"))
                .then_some(())
        });
    }
}

#[test]
fn a_cgroup_change_that_fails_is_tried_again_until_it_goes_through() {
    let parent = TestCgroup::new("retry");
    let config = write_config(&format!(
        "[default]\nidle = 41\n[[policy]]\ncgroup = \"{}/svc-*\"\nidle = 31\n",
        parent.rel()
    ));
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    // The agent can neither list cgroups nor create the next policy table.
    let old = starve_of_descriptors(agent.pid());
    let svc = parent.child("svc-1");
    eventually(Duration::from_secs(10), "the failure in the log", || {
        agent
            .log()
            .contains("failed to follow cgroup changes")
            .then_some(())
    });
    let mut held = Proc::sock(&["pair", "4"], &svc);
    let out = held.read();
    assert_eq!(values(&out["client"]).1, 41, "no table with svc-1 yet");
    set_nofile(agent.pid(), old.rlim_cur, Some(old.rlim_max));
    // Nothing else changes: only a try of the agent's own brings svc-1 its policy.
    // The tries so far came 1, 2 and 4 s apart; the next is at most 16 s away.
    eventually(
        Duration::from_secs(35),
        "the held connection's policy",
        || {
            let now: Vec<_> = held.report().iter().map(values).collect();
            now.iter().all(|v| v.1 == 31).then_some(())
        },
    );
    assert!(
        agent.log().contains("trying again in 1s"),
        "{}",
        agent.log()
    );
    assert_eq!(idle_of(&svc), 31, "new connections too");
}

/// An agent killed between pinning a link at its temporary name and renaming it leaves
/// `link_status_new` behind: the next start and `detach` take it for keepalive's own, where
/// both refused the directory as not keepalive's (exit 2, which the unit does not retry).
#[test]
fn a_link_pin_a_killed_start_left_at_its_temporary_name_is_keepalives_own() {
    let cg = TestCgroup::new("tmppin");
    let dirs = AgentDirs::new();
    let leave = || {
        keepalive_tests::bpf::pin_again(
            &dirs.state_dir.join("link_status"),
            &dirs.state_dir.join("link_status_new"),
        );
    };
    let mut agent = Agent::start_in(&dirs, &cg, &[]);
    assert!(agent.stop_with(libc::SIGTERM).success());
    leave();
    let mut agent = Agent::start_in(&dirs, &cg, &[]);
    assert!(
        !dirs.state_dir.join("link_status_new").exists(),
        "the start replaced it"
    );
    assert!(agent.stop_with(libc::SIGTERM).success());
    leave();
    let out = dirs.cli(&["detach"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("link_status_new: link left at its temporary name"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !dirs.state_dir.exists(),
        "detach left {}",
        dirs.state_dir.display()
    );
}

/// `detach` with a state directory off bpffs refuses (exit 5), and removes none of the files in
/// it that are named like pins.
#[test]
fn detach_off_bpffs_removes_nothing() {
    let dir = keepalive_tests::TempDir::new("detachoff");
    std::fs::write(dir.path().join("link_sockops"), "not a pin").unwrap();
    std::fs::create_dir(dir.path().join("maps-v2")).unwrap();
    std::fs::write(dir.path().join("maps-v2/KA_POLICY"), "not a map").unwrap();
    let dirs = AgentDirs {
        state_dir: dir.path().to_owned(),
        ..AgentDirs::new()
    };
    let out = dirs.cli(&["detach"]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not on a bpf filesystem"),
        "{}",
        stderr(&out)
    );
    assert!(dir.path().join("link_sockops").exists());
    assert!(dir.path().join("maps-v2/KA_POLICY").exists());
}

/// An agent on `cg` with idle 42 whose passes over existing connections fail: `/run/netns` is a
/// file in its mount namespace, which it cannot list (removing it there ends the failures).
fn agent_whose_passes_fail(cg: &TestCgroup) -> Agent {
    agent_with_own_run(cg, "42", || symlink(c"/proc/self/status", c"/run/netns"))
}

/// An agent on `cg` with idle `idle` and a `/run` of its own, an empty tmpfs that `setup`
/// then fills.
fn agent_with_own_run(
    cg: &TestCgroup,
    idle: &str,
    setup: impl Fn() -> std::io::Result<()> + Send + Sync + 'static,
) -> Agent {
    let dirs = AgentDirs::new();
    let mut cmd = dirs.command(&[
        "run",
        "--cgroup",
        cg.path().to_str().unwrap(),
        "--idle",
        idle,
    ]);
    private_mounts(&mut cmd, move || {
        hide_with_tmpfs(c"/run")?;
        setup()
    });
    Agent::start_command(&dirs, cmd)
}

/// A pass that fails at start (here `/run/netns` cannot be listed) does not end the start: new
/// connections are enforced, requests are served, and the pass is tried again.
#[test]
fn a_pass_that_fails_at_start_is_tried_again_and_the_agent_runs() {
    let cg = TestCgroup::new("startpass");
    let agent = agent_whose_passes_fail(&cg);
    assert_eq!(idle_of(&cg), 42);
    agent.cli_ok(&["policy", "list"]);
    let tries = || {
        agent
            .log()
            .matches("failed to apply the policy to existing connections")
            .count()
    };
    assert!(
        agent.log().contains(
            "failed to apply the policy to existing connections at start: failed to list \
             /run/netns"
        ),
        "{}",
        agent.log()
    );
    eventually(Duration::from_secs(10), "the pass tried again", || {
        (tries() >= 2).then_some(())
    });
}

/// While passes over existing connections fail, a policy change still goes in: its table is in
/// force for new connections, the answer warns that the pass failed and is tried again, and it
/// is, until it goes through. Before, the change was rejected whole (exit 1), and so was every
/// later one while the cause lasted, an emergency `--mode off` among them.
#[test]
fn a_policy_change_whose_pass_fails_stands_and_its_pass_is_tried_again() {
    let cg = TestCgroup::new("changepass");
    let agent = agent_whose_passes_fail(&cg);
    // In a network namespace of its own, which the pass finds after the listing that fails
    // (one in the agent's own namespace is updated before it).
    let ns = Netns::new("changepass");
    let mut held = Proc::spawn(&sock_bin(), &["pair", "4"], Some(cg.path()), Some(&ns));
    held.read();
    let warning = "warning: the policy is in force for new connections, but the pass over \
                   existing ones failed: failed to list /run/netns";
    let set = |args: &[&str]| {
        let out = agent.cli(&[&["policy", "set", cg.path().to_str().unwrap()], args].concat());
        let text = stdout(&out);
        assert_eq!(code(&out), 0, "{args:?}: {text}{}", stderr(&out));
        assert!(
            text.contains(warning) && text.contains("trying again in"),
            "{args:?}: {text}"
        );
    };
    set(&["--idle", "43"]);
    assert_eq!(idle_of(&cg), 43, "in force for new connections");
    set(&["--mode", "off"]);
    assert_eq!(pair_values(&cg).0, kernel_defaults(), "off for new ones");
    let out = agent.cli(&[
        "policy",
        "set",
        cg.path().to_str().unwrap(),
        "--mode",
        "enforce",
        "--idle",
        "44",
        "--json",
    ]);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (code(&out), &answer["ok"]),
        (0, &serde_json::Value::Bool(true)),
        "{answer}"
    );
    assert!(
        answer["message"].as_str().unwrap().contains(warning),
        "{answer}"
    );
    for sock in held.report() {
        assert_eq!(values(&sock).1, 42, "not reached yet: {sock}");
    }
    // The cause goes (the link in the agent's own mount namespace): the pass tried again
    // reaches the connection that was there before the changes.
    std::fs::remove_file(format!("/proc/{}/root/run/netns", agent.pid())).unwrap();
    eventually(Duration::from_secs(40), "the pass tried again", || {
        held.report()
            .iter()
            .all(|sock| values(sock).1 == 44)
            .then_some(())
    });
}

/// Under `fill`, the user timeout the program set on a listener the application switched
/// keepalive off on stays the program's where a pass failed to move it: the next pass moves it
/// again, rather than taking it for the application's. The listener is in the agent's own
/// network namespace, which each pass updates before it fails on `/run/netns`, so passes tried
/// again run while the table holds a user timeout the kernel refuses.
#[test]
fn fill_moves_a_listeners_user_timeout_again_after_the_call_failed() {
    let cg = TestCgroup::new("fillutfail");
    let agent = agent_whose_passes_fail(&cg);
    let set = |user_timeout: &str| {
        let args = [
            "--mode",
            "fill",
            "--idle",
            "31",
            "--user-timeout",
            user_timeout,
        ];
        let out = agent.cli(&[&["policy", "set", cg.path().to_str().unwrap()], &args[..]].concat());
        assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    };
    set("7s");
    let mut server = Listener::start(&cg, "4", &["--keepalive-off-after"]);
    // The listener's keepalive and user timeout, and the accepted connection's user timeout.
    let mut accept = || {
        let line = server.accept(&cg, None);
        let user_timeout = |socket: &serde_json::Value| socket["user_timeout"].as_u64().unwrap();
        (
            values(&line["listener"]).0,
            user_timeout(&line["listener"]),
            user_timeout(&line["accepted"]),
        )
    };
    assert_eq!(accept(), (0, 7000, 7000));
    set("9s");
    // A user timeout bpf_setsockopt refuses (negative as an int), which the agent would too.
    keepalive_tests::bpf::change_policy(&agent.dirs().state_dir, cg.id(), |policy| {
        policy.user_timeout_ms = 1 << 31;
    });
    let tries = || {
        agent
            .log()
            .matches("failed to apply the policy to existing connections")
            .count()
    };
    let before = tries();
    eventually(Duration::from_secs(40), "a pass tried again", || {
        (tries() > before).then_some(())
    });
    set("11s");
    assert_eq!(accept(), (0, 11_000, 11_000), "moved by the next pass");
}

#[test]
fn a_refused_policy_request_leaves_the_running_policy_alone_even_when_pushes_fail() {
    let cg = TestCgroup::new("refusedreq");
    let agent = Agent::start(&cg, &["--idle", "44"]);
    let socket = agent.dirs().runtime_dir.join("control.sock");
    // Connected (and accepted) before the agent runs out of descriptors, so the requests
    // still get through; a read that waits longer than any answer takes fails the test.
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let client = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
            client
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            client
        })
        .collect();
    accepted(&socket);
    let old = starve_of_descriptors(agent.pid());
    let ask = |mut client: &std::os::unix::net::UnixStream, request: String| {
        writeln!(client, "{request}").unwrap();
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(client), &mut answer).unwrap();
        serde_json::from_str::<serde_json::Value>(&answer).expect(&answer)
    };
    // A policy outside the attach cgroup: refused before anything changes, so there is no
    // previous policy to restore, and nothing to push (which would fail now).
    let refused = ask(
        &clients[0],
        format!(
            r#"{{"cmd":"set","cgroup":"/ka-elsewhere-{}","idle":30}}"#,
            std::process::id()
        ),
    );
    let log = agent.log();
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("outside the attach cgroup")),
        "{refused}"
    );
    assert_eq!(refused["code"], 2, "{refused}");
    assert!(!log.contains("restore"), "{log}");
    assert!(!log.contains("trying again"), "{log}");
    // A valid policy whose table goes in (with the descriptor the refused request's closed
    // connection freed) and whose pass then fails: it stands, the answer says that the pass
    // failed and is tried again, and it is once the agent can open files again. (One whose
    // push fails: `a_change_that_failed_before_its_push_says_the_previous_policy_stays`.)
    let answered = ask(
        &clients[1],
        format!(r#"{{"cmd":"set","cgroup":"{}","idle":30}}"#, cg.rel()),
    );
    assert_eq!(answered["ok"], true, "{answered}");
    assert!(
        answered["message"].as_str().is_some_and(|m| m.contains(
            "warning: the policy is in force for new connections, but the pass over existing \
             ones failed"
        ) && m.contains("Too many open files")),
        "{answered}"
    );
    let passes = || agent.log().matches("existing connections: ").count();
    let before = passes();
    set_nofile(agent.pid(), old.rlim_cur, Some(old.rlim_max));
    eventually(Duration::from_secs(10), "the pass tried again", || {
        (passes() > before).then_some(())
    });
    assert_eq!(idle_of(&cg), 30);
}

/// A test binary killed outright (a CI timeout, Ctrl-C) runs none of its guards. What it left
/// (an agent still running on its pinned state, the programs attached to its cgroup, a process
/// in a child cgroup, a network namespace, temporary files) goes when the next run, as root,
/// makes its first name. What live processes made stays.
#[test]
fn the_next_run_removes_what_a_killed_run_left_and_nothing_of_a_live_one() {
    let kept = TestCgroup::new("kept");
    let kept_dir = keepalive_tests::TempDir::new("kept");
    // A pid that no longer exists stands for the killed run.
    let mut gone = std::process::Command::new("true").spawn().expect("true");
    let dead = gone.id();
    gone.wait().expect("wait");
    let namespace = keepalive_tests::sweep::pid_namespace();
    let name = |label: &str, n: u32| format!("ka-{label}-{namespace}-{dead}-{n}");

    let cgroup = cgroup2_mount().join(name("swept", 0));
    std::fs::create_dir_all(cgroup.join("inner")).expect("mkdir");
    // Killed on drop should the test fail before the sweep does.
    let mut sleeper = keepalive_tests::Reaped(
        std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("sleep"),
    );
    std::fs::write(
        cgroup.join("inner/cgroup.procs"),
        sleeper.0.id().to_string(),
    )
    .expect("move into the cgroup");
    let dirs = AgentDirs {
        state_dir: std::path::Path::new("/sys/fs/bpf").join(name("agent", 1)),
        runtime_dir: std::env::temp_dir().join(name("agent", 1)),
        bin: None,
    };
    let mut run = dirs.command(&["run", "--cgroup", cgroup.to_str().expect("utf-8")]);
    run.args(["--idle", "31"]);
    let mut agent = Agent::start_command(&dirs, run);
    let table = keepalive_tests::bpf::policy_table_id(&dirs.state_dir);
    assert_eq!(sockops_attachments(&cgroup), 1);
    let netns = std::path::PathBuf::from("/run/netns").join(name("n", 2));
    keepalive_tests::sh("ip", &["netns", "add", &name("n", 2)]);
    let mut in_netns = keepalive_tests::Reaped(
        std::process::Command::new("ip")
            .args(["netns", "exec", &name("n", 2), "sleep", "600"])
            .spawn()
            .expect("ip netns exec"),
    );
    let inode = |path: &std::path::Path| {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).expect("stat"))
    };
    let net = std::path::PathBuf::from(format!("/proc/{}/ns/net", in_netns.0.id()));
    eventually(Duration::from_secs(10), "sleep in the namespace", || {
        (inode(&net) == inode(&netns)).then_some(())
    });
    // The same names made in another pid namespace are another run's.
    let elsewhere =
        TestCgroup::at(cgroup2_mount().join(format!("ka-swept-{}-{dead}-0", namespace + 1)));
    let log = std::env::temp_dir().join(format!("{}.log", name("agent-log", 3)));
    std::fs::write(&log, "left\n").expect("write");

    let removed = keepalive_tests::sweep::sweep_stale();
    assert!(
        elsewhere.path().is_dir(),
        "another pid namespace's name was removed"
    );
    for path in [&dirs.state_dir, &dirs.runtime_dir, &cgroup, &netns, &log] {
        assert!(
            removed.contains(path),
            "{} not in {removed:?}",
            path.display()
        );
        assert!(!path.exists(), "{} still there", path.display());
    }
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .expect("the agent the dead run started was killed");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    for (child, what) in [
        (&mut sleeper.0, "cgroup"),
        (&mut in_netns.0, "network namespace"),
    ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the process in the dead run's {what} still runs");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "the process in the dead run's {what} was killed"
        );
    }
    eventually(
        Duration::from_secs(10),
        "its programs and maps freed",
        || (!keepalive_tests::bpf::map_exists(table)).then_some(()),
    );
    assert!(kept.path().is_dir() && kept_dir.path().is_dir());
}

/// A pass reports as updated only the connections it changed. Those established while it runs
/// got the new table from the program, and the iterator can still come across them: they are
/// already current, not updated.
#[test]
fn a_pass_does_not_count_connections_established_while_it_runs_as_updated() {
    let parent = TestCgroup::new("passcount");
    let changed = parent.child("changed");
    let busy = parent.child("busy");
    let agent = Agent::start(&parent, &["--idle", "30"]);
    let mut held = Proc::sock(&["hold", "9000"], &changed);
    held.next(Duration::from_secs(120));
    // A host that keeps connecting: 9000 connections opened over 10 s. The pass runs while it
    // does (it takes a few hundred milliseconds here), from once the first are open.
    let started = Instant::now();
    let mut opening = Proc::sock(&["hold", "9000", "--over-ms", "10000"], &busy);
    eventually(Duration::from_secs(30), "the first connections", || {
        let status = agent.status();
        let open = status["cgroups"]
            .as_array()
            .expect("cgroups array")
            .iter()
            .find(|row| row["cgroup"] == busy.display())
            .and_then(|row| row["open"].as_u64());
        open.is_some_and(|open| open > 0).then_some(())
    });
    let out = agent.cli_ok(&["policy", "set", changed.rel(), "--idle", "31"]);
    let answered = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let opened = opening.next(Duration::from_secs(120))["elapsed_us"]
        .as_u64()
        .expect("elapsed_us");
    // It began before the request, so it was still opening when the pass ended.
    assert!(
        answered < Duration::from_micros(opened),
        "the pass ({answered:?} after the start) did not run while connections were opened \
         ({opened} µs)"
    );
    assert!(text.contains(" 18000 updated,"), "{text}");
    assert!(text.contains(" 0 failed;"), "{text}");
}

#[test]
fn an_agent_without_inotify_enforces_catches_up_at_each_try_and_follows_new_cgroups_once_it_has_it()
{
    // On a busy host every inotify instance root may have (128 by default, shared by all its
    // processes and containers) can be taken. The agent then cannot follow cgroups, but it can
    // enforce; before, it exited 1 and the unit retried without enforcement. It catches up with
    // the cgroups created and removed meanwhile at each try to watch. Here the agent runs as
    // another user with root's capabilities, whose instances another process holds.
    const USER: u32 = 64_917;
    let as_user = |dirs: &AgentDirs, args: &[&str]| as_user(USER, dirs, args);
    let cg = TestCgroup::new("noinotify");
    let config = write_config(&format!(
        "[default]\nidle = 41\n[[policy]]\ncgroup = \"{0}/later\"\nidle = 35\n\
         [[policy]]\ncgroup = \"{0}/next\"\nidle = 29\n",
        cg.rel()
    ));
    let holder = hold_inotify_instances(USER, 0);
    let dirs = AgentDirs::new();
    let check = dirs.output(as_user(&dirs, &["check", "--json"]));
    let report: serde_json::Value =
        serde_json::from_slice(&check.stdout).expect("check --json is JSON");
    assert_eq!(code(&check), 0, "a warning: {report:#}");
    let inotify = check_item(&report, "inotify");
    assert_eq!(inotify["status"], "warn", "{inotify}");
    assert!(
        inotify["detail"]
            .as_str()
            .unwrap()
            .contains("raise fs.inotify.max_user_instances"),
        "{inotify}"
    );

    // An attach cgroup removed while nothing watches it, with its parent, ends the agent at its
    // next try to watch, as one removed while watched does (exit 4).
    let doomed_parent = TestCgroup::new("noinotify-gone");
    let doomed = doomed_parent.child("attach");
    let other = AgentDirs::new();
    let mut gone = Agent::start_command(
        &other,
        as_user(
            &other,
            &["run", "--cgroup", doomed.path().to_str().unwrap()],
        ),
    );
    let doomed_name = doomed.display();
    drop(doomed);
    drop(doomed_parent);
    let status = gone
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("still running:\n{}", gone.log()));
    assert_eq!(status.code(), Some(4), "{}", gone.log());
    assert!(
        gone.log()
            .contains(&format!("the attach cgroup {doomed_name} was removed")),
        "{}",
        gone.log()
    );

    let mut agent = Agent::start_command(
        &dirs,
        as_user(
            &dirs,
            &[
                "run",
                "--cgroup",
                cg.path().to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
        ),
    );
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "cannot watch cgroups below {} with inotify: ",
            cg.display()
        )) && log.contains("raise fs.inotify.max_user_instances"),
        "{log}"
    );
    let degraded = format!(
        "STATUS=enforcing on {}; new cgroups seen late: inotify unavailable",
        cg.display()
    );
    assert!(
        agent.ready_lines().contains(&degraded),
        "{:?}",
        agent.ready_lines()
    );
    assert_eq!(idle_of(&cg), 41, "enforced without inotify");
    catches_up_while_short_and_follows_once_released(
        &mut agent,
        holder,
        &cg,
        "watching cgroups below",
        &cg,
    );
}

/// The agent command `args` as user `uid` with root's capabilities: a process whose per-user
/// limits (inotify instances and watches) are `uid`'s.
fn as_user(uid: u32, dirs: &AgentDirs, args: &[&str]) -> std::process::Command {
    let mut cmd = dirs.command(args);
    // SAFETY: become_user makes system calls only.
    unsafe {
        cmd.pre_exec(move || become_user(uid, true));
    }
    cmd
}

/// `check --json` for the attach cgroup `cg`, as user `uid` with root's capabilities: its
/// report, which has warnings at most.
fn check_as(uid: u32, dirs: &AgentDirs, cg: &TestCgroup) -> serde_json::Value {
    let check = dirs.output(as_user(
        uid,
        dirs,
        &["check", "--json", "--cgroup", cg.path().to_str().unwrap()],
    ));
    let report: serde_json::Value =
        serde_json::from_slice(&check.stdout).expect("check --json is JSON");
    assert_eq!(code(&check), 0, "warnings at most: {report:#}");
    report
}

/// Whether `check --json` as `uid` for `cg` (with `dirs`) warns about inotify, and the warning.
fn inotify_warning_as(uid: u32, dirs: &AgentDirs, cg: &TestCgroup) -> Option<String> {
    check_as(uid, dirs, cg)["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["name"] == "inotify")
        .map(|item| item.to_string())
}

#[test]
fn check_counts_the_running_agents_inotify_instances_and_watches_as_free() {
    // A restart gives back what the running agent holds: `check` for it warned that `run`
    // could not have the inotify instances it holds itself. Here the agent runs as another user
    // with root's capabilities, and another process holds the rest of that user's inotify
    // instances, then of its watches. A `check` without an agent (other directories, another
    // cgroup) shows the same host warns otherwise.
    const USER: u32 = 64_925;
    let cg = TestCgroup::new("checkback");
    let unused = TestCgroup::new("checkback-none");
    let dirs = AgentDirs::new();
    let elsewhere = AgentDirs::new();
    let _agent = Agent::start_command(
        &dirs,
        as_user(
            USER,
            &dirs,
            &[
                "run",
                "--cgroup",
                cg.path().to_str().unwrap(),
                "--idle",
                "31",
            ],
        ),
    );
    let holder = hold_inotify_instances(USER, 2);
    assert_eq!(inotify_warning_as(USER, &dirs, &cg), None);
    let without = inotify_warning_as(USER, &elsewhere, &unused).expect("a warning");
    assert!(
        without.contains("cannot create an inotify instance"),
        "{without}"
    );
    drop(holder);
    // The attach cgroup, its parent, the state directory and its maps directory.
    let _holder = hold_inotify_watches(USER, 4);
    assert_eq!(inotify_warning_as(USER, &dirs, &cg), None);
    let without = inotify_warning_as(USER, &elsewhere, &unused).expect("a warning");
    assert!(
        without.contains("`run` would take 4 inotify watches")
            && without.contains("this user has 0 of its"),
        "{without}"
    );
}

/// For the agents that inotify ran short for, while `holder` holds: a cgroup created below
/// `parent` unseen gets its own policy (idle 35) at a try to watch, and the per-cgroup counters
/// of one removed unseen are dropped. Once the holder is dropped, the unit's status is back to
/// enforcing on `cg`, the log says `resumed` (followed by " `cg` with inotify again"), and a
/// cgroup created below `parent` from then on gets its own policy (idle 29) as it appears.
fn catches_up_while_short_and_follows_once_released(
    agent: &mut Agent,
    holder: InotifyHolder,
    cg: &TestCgroup,
    resumed: &str,
    parent: &TestCgroup,
) {
    let rows = |agent: &Agent| cgroup_ids(&agent.status());
    let later = parent.child("later");
    let gone = parent.child("gone");
    assert_eq!(idle_of(&gone), 41);
    let gone_id = std::fs::metadata(gone.path()).unwrap().ino();
    assert!(rows(agent).contains(&gone_id), "{:?}", rows(agent));
    drop(gone);
    eventually(
        Duration::from_secs(45),
        "the new cgroup's own policy and the removed one's counters dropped, while short",
        || (idle_of(&later) == 35 && !rows(agent).contains(&gone_id)).then_some(()),
    );
    let again = format!("{resumed} {} with inotify again", cg.display());
    assert!(!agent.log().contains(&again), "{}", agent.log());

    drop(holder);
    agent.wait_notify(
        &format!("STATUS=enforcing on {}", cg.display()),
        Duration::from_secs(45),
    );
    assert!(agent.log().contains(&again), "{}", agent.log());
    // Followed again: a cgroup created from now on gets its policy as it appears.
    let next = parent.child("next");
    eventually(Duration::from_secs(30), "next's own policy", || {
        (idle_of(&next) == 29).then_some(())
    });
}

#[test]
fn cgroups_left_unwatched_at_the_inotify_watch_limit_are_caught_up_with_and_watched_once_watches_free_up()
 {
    // At fs.inotify.max_user_watches, some cgroups cannot be watched, and cgroups created below
    // them go unseen. Before, that lasted until the agent was restarted; now the agent tries
    // again, less often each time up to every 30 s, and catches up with what it could not see
    // at each try; once a try works it follows them as they change. Here the agent runs as
    // another user with root's capabilities, whose watches another process holds but for the
    // two the agent needs for the attach cgroup and its parent.
    const USER: u32 = 64_918;
    let cg = TestCgroup::new("watchlimit");
    let a = cg.child("a");
    let config = write_config(&format!(
        "[default]\nidle = 41\n[[policy]]\ncgroup = \"{0}/a/later\"\nidle = 35\n\
         [[policy]]\ncgroup = \"{0}/a/next\"\nidle = 29\n",
        cg.rel()
    ));
    let holder = hold_inotify_watches(USER, 2);
    let dirs = AgentDirs::new();
    // `check` tells beforehand: the attach cgroup, `a` and the parent take three watches, the
    // state directory two.
    let report = check_as(USER, &dirs, &cg);
    let inotify = check_item(&report, "inotify");
    assert_eq!(inotify["status"], "warn", "{inotify}");
    let detail = inotify["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("`run` would take 5 inotify watches")
            && detail.contains("this user has 2 of its"),
        "{inotify}"
    );
    let cmd = as_user(
        USER,
        &dirs,
        &[
            "run",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let mut agent = Agent::start_command(&dirs, cmd);
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "cannot watch cgroup {} with inotify: ",
            a.display()
        )) && log.contains("raise fs.inotify.max_user_watches"),
        "{log}"
    );
    let partly = format!(
        "STATUS=enforcing on {}; some new cgroups seen late: inotify watches ran short",
        cg.display()
    );
    assert!(
        agent.ready_lines().contains(&partly),
        "{:?}",
        agent.ready_lines()
    );
    assert_eq!(idle_of(&a), 41, "enforced below the unwatched cgroup");
    catches_up_while_short_and_follows_once_released(
        &mut agent,
        holder,
        &cg,
        "watching every cgroup below",
        &a,
    );
}

#[test]
fn an_agent_that_cannot_watch_its_attach_cgroup_at_the_watch_limit_enforces_and_watches_later() {
    // The other shortage of a start without inotify: an instance, but no watch left for the
    // attach cgroup itself (one is left for its parent's). The agent enforces and tries again.
    const USER: u32 = 64_919;
    let cg = TestCgroup::new("rootwatch");
    let holder = hold_inotify_watches(USER, 1);
    let dirs = AgentDirs::new();
    let cmd = as_user(
        USER,
        &dirs,
        &[
            "run",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--idle",
            "41",
        ],
    );
    let mut agent = Agent::start_command(&dirs, cmd);
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "cannot watch cgroups below {} with inotify: No space left on device",
            cg.display()
        )) && log.contains("raise fs.inotify.max_user_watches"),
        "{log}"
    );
    let degraded = format!(
        "STATUS=enforcing on {}; new cgroups seen late: inotify unavailable",
        cg.display()
    );
    assert!(
        agent.ready_lines().contains(&degraded),
        "{:?}",
        agent.ready_lines()
    );
    assert_eq!(idle_of(&cg), 41, "enforced without a watch");
    drop(holder);
    agent.wait_notify(
        &format!("STATUS=enforcing on {}", cg.display()),
        Duration::from_secs(45),
    );
    assert!(
        agent.log().contains(&format!(
            "watching cgroups below {} with inotify again",
            cg.display()
        )),
        "{}",
        agent.log()
    );
}

#[test]
fn check_counts_the_inotify_watches_of_a_user_namespace_for_its_owner() {
    // The kernel charges the inotify watches of a user namespace (a container's) to its owner,
    // though its processes show another user from here: `check` counts them for the owner.
    const USER: u32 = 64_920;
    let cg = TestCgroup::new("usernswatch");
    let _a = cg.child("a");
    let _b = cg.child("b");
    let watched = TempDir::new("usernswatch");
    for dir in std::iter::once(watched.path().to_owned())
        .chain((0..10).map(|n| watched.path().join(n.to_string())))
    {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let holder = hold_inotify_watches(USER, 12);
    let mut contained = Proc::spawn(
        &sock_bin(),
        &[
            "userns-watch",
            watched.path().to_str().unwrap(),
            &USER.to_string(),
            "64921",
        ],
        None,
        None,
    );
    let pid = contained.read()["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t64921\t64921")),
        "another user from here: {status}"
    );
    let dirs = AgentDirs::new();
    let inotify = || {
        check_as(USER, &dirs, &cg)["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|item| item["name"] == "inotify")
            .cloned()
    };
    // The attach cgroup, `a`, `b`, the parent and the state directory: 6 watches; 12 left but
    // the 10 contained.
    let item = inotify().expect("an inotify warning");
    assert_eq!(item["status"], "warn", "{item}");
    let detail = item["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("`run` would take 6 inotify watches")
            && detail.contains("this user has 2 of its"),
        "{item}"
    );
    drop(contained);
    eventually(
        Duration::from_secs(10),
        "no warning once the namespace's watches are gone",
        || inotify().is_none().then_some(()),
    );
    drop(holder);
}

/// The suite's guard against a host whose cgroup2 root keepalive enforces (which would set its
/// policy over every test agent's) knows keepalive's programs, lock mode's included, and
/// leaves other programs alone.
#[test]
fn the_suite_tells_keepalive_programs_from_others_on_a_cgroup() {
    let parent = TestCgroup::new("ours");
    let foreign = parent.child("foreign");
    let _empty = keepalive_tests::perf::reference_program("empty-sockops", &foreign);
    assert_eq!(sockops_attachments(foreign.path()), 1);
    assert_eq!(keepalive_programs_at(foreign.path()), Vec::<String>::new());
    let config = write_config("[default]\nmode = \"lock\"\n");
    let mut agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    let found = keepalive_programs_at(parent.path());
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].starts_with("keepalive_socko (id "), "{found:?}");
    assert!(found[1].starts_with("keepalive_lock (id "), "{found:?}");
    agent.stop_with(libc::SIGTERM);
    agent.dirs().cli_ok(&["detach"]);
    assert_eq!(keepalive_programs_at(parent.path()), Vec::<String>::new());
}

/// Enforcement pinned on a cgroup below a directory the agent may not read (delegated to a
/// user, mode 0700: without CAP_DAC_OVERRIDE, which the unit does not grant, root cannot list
/// it) may still enforce there. `run` elsewhere refuses to move it (exit 7), as for a cgroup
/// it can name, instead of taking it for removed and ending it.
#[test]
fn enforcement_on_a_cgroup_the_agent_cannot_find_is_not_taken_for_removed() {
    use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
    let parent = TestCgroup::new("unlisted");
    let inner = parent.child("inner");
    let elsewhere = TestCgroup::new("unlistedmove");
    let mut agent = Agent::start(&inner, &["--idle", "26"]);
    assert!(agent.stop_with(libc::SIGTERM).success());
    let dirs = agent.dirs();
    std::os::unix::fs::chown(parent.path(), Some(65534), Some(65534)).expect("chown");
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let limited = |args: &[&str]| {
        let mut cmd = dirs.command(args);
        // SAFETY: prctl calls only.
        unsafe {
            cmd.pre_exec(|| drop_caps_except(&GRANTED));
        }
        dirs.output(cmd)
    };
    let out = limited(&["run", "--cgroup", elsewhere.path().to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(code(&out), 7, "{err}");
    assert!(
        err.contains("could not be located")
            && err.contains(&format!(
                "`keepalive-agent --state-dir {} detach`",
                dirs.state_dir.display()
            )),
        "{err}"
    );
    assert_eq!(sockops_attachments(inner.path()), 1, "still enforced there");
    assert_eq!(sockops_attachments(elsewhere.path()), 0);
    assert_eq!(idle_of(&inner), 26);
    // `check` fails it too, as `run` would.
    let out = limited(&[
        "check",
        "--json",
        "--cgroup",
        elsewhere.path().to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json");
    let item = check_item(&report, "keepalive");
    assert!(
        item["status"] == "fail"
            && item["detail"]
                .as_str()
                .is_some_and(|d| d.contains("could not be located")),
        "{item}"
    );
    // `detach` says the same rather than "removed".
    let out = limited(&["detach", "--cgroup", elsewhere.path().to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(code(&out), 7, "{err}");
    assert!(err.contains("failed to list the cgroups in"), "{err}");
    assert_eq!(sockops_attachments(inner.path()), 1);
    dirs.cli_ok(&["detach"]);
}

/// An agent with idle `idle` attached to a new cgroup named `name`, run as user `uid` with
/// root's capabilities, every inotify instance of whom the holder holds.
fn start_short_of_inotify(
    uid: u32,
    name: &str,
    idle: u32,
) -> (TestCgroup, AgentDirs, InotifyHolder, Agent) {
    let cg = TestCgroup::new(name);
    let holder = hold_inotify_instances(uid, 0);
    let dirs = AgentDirs::new();
    let idle = idle.to_string();
    let run = [
        "run",
        "--cgroup",
        cg.path().to_str().unwrap(),
        "--idle",
        &idle,
    ];
    let agent = Agent::start_command(&dirs, as_user(uid, &dirs, &run));
    (cg, dirs, holder, agent)
}

/// Without inotify the agent does not see pins removed while it runs: it looks at each try to
/// watch its state directory, which it makes until it can (before, it never tried again), and
/// when it stops, so enforcement outlives it all the same.
#[test]
fn pins_removed_while_inotify_is_short_are_pinned_again_at_a_try_to_watch_and_when_the_agent_stops()
{
    let (cg, dirs, holder, mut agent) = start_short_of_inotify(64_922, "repintry", 33);
    let unwatched = format!("cannot watch {} with inotify", dirs.state_dir.display());
    assert!(agent.log().contains(&unwatched), "{}", agent.log());
    assert_eq!(idle_of(&cg), 33);
    let link = dirs.state_dir.join(keepalive_common::PIN_LINK_SOCKOPS);
    let repinned = "while the agent ran: made and pinned again";
    // Stopped meanwhile, so that a try cannot race the removal.
    let remove = |agent: &mut Agent| {
        agent.pause();
        let removed = std::fs::remove_dir_all(&dirs.state_dir);
        agent.signal(libc::SIGCONT);
        removed.expect("remove the state directory");
    };
    // At a try to watch, inotify still short.
    remove(&mut agent);
    assert_eq!(idle_of(&cg), 33, "the agent holds its links");
    eventually(Duration::from_secs(20), "a try to pin again", || {
        (link.exists() && agent.log().contains(repinned)).then_some(())
    });
    // Once inotify can be had, at once.
    drop(holder);
    let watching = format!("watching {} with inotify again", dirs.state_dir.display());
    eventually(
        Duration::from_secs(40),
        "a watch of the state directory",
        || agent.log().contains(&watching).then_some(()),
    );
    let before = agent.log().matches(repinned).count();
    remove(&mut agent);
    eventually(Duration::from_secs(30), "the pins to be made again", || {
        (link.exists() && agent.log().matches(repinned).count() > before).then_some(())
    });
    assert!(agent.stop_with(libc::SIGTERM).success(), "{}", agent.log());
    assert!(
        agent.log().contains("enforcement stays attached"),
        "{}",
        agent.log()
    );
    assert_eq!(idle_of(&cg), 33, "enforced once the agent has stopped");
    assert_eq!(sockops_attachments(cg.path()), 1);
    dirs.cli_ok(&["detach"]);
}

/// The state directory removed while inotify is short, and the agent stopped before its next
/// try to watch: it looks once more as it stops, so enforcement outlives it.
#[test]
fn pins_removed_while_inotify_is_short_are_pinned_again_when_the_agent_stops() {
    let (cg, dirs, holder, mut agent) = start_short_of_inotify(64_924, "repinstop", 34);
    // Stopped before the first try can come (1 s after the agent began to watch, just before
    // it was ready), and ended while stopped: a stopped process takes no signal until it goes
    // on, and the try is not due yet then. Should it be on a slow host, the restore is made at
    // the try, and the message below, which only the stop gives, fails the test.
    agent.pause();
    let removed = std::fs::remove_dir_all(&dirs.state_dir);
    agent.signal(libc::SIGTERM);
    agent.signal(libc::SIGCONT);
    removed.expect("remove the state directory");
    assert!(agent.stop_with(libc::SIGTERM).success(), "{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains("while the agent ran: made and pinned again as it exits")
            && log.contains("enforcement stays attached"),
        "{log}"
    );
    drop(holder);
    assert_eq!(idle_of(&cg), 34, "enforced once the agent has stopped");
    assert_eq!(sockops_attachments(cg.path()), 1);
    dirs.cli_ok(&["detach"]);
}

/// A pinned slot table keepalive did not make (its size is no power of two) is pinned state in
/// the way: exit 7, which the unit does not retry, naming `detach`; before, exit 6 said the
/// kernel could not run keepalive.
#[test]
fn a_pinned_slot_table_keepalive_did_not_make_is_refused_with_exit_7() {
    let cg = TestCgroup::new("badslots");
    let dirs = AgentDirs::new();
    let mut agent = Agent::start_in(
        &dirs,
        &cg,
        &["--max-tracked-cgroups", "1000", "--idle", "27"],
    );
    assert!(agent.stop_with(libc::SIGTERM).success());
    let maps = dirs
        .state_dir
        .join(format!("maps-v{}", keepalive_common::ABI_VERSION));
    std::fs::remove_file(maps.join("KA_SOCK_SLOTS")).unwrap();
    keepalive_tests::bpf::pin_again(&maps.join("KA_CGSTATS"), &maps.join("KA_SOCK_SLOTS"));
    let out = dirs.cli(&run_args(&cg));
    let err = stderr(&out);
    assert_eq!(code(&out), 7, "{err}");
    assert!(
        err.contains("1000 slots, not a power of two")
            && err.contains(&format!(
                "`keepalive-agent --state-dir {} detach`",
                dirs.state_dir.display()
            )),
        "{err}"
    );
    assert_eq!(idle_of(&cg), 27, "the pinned enforcement goes on");
    dirs.cli_ok(&["detach"]);
}

/// A pinned map of another layout than this build's (another build's, whose maps changed
/// without a new ABI version) is refused with exit 7, naming the map and `detach`, and the
/// pinned enforcement goes on; before, the kernel rejected the program over it and exit 6 said
/// the kernel could not run keepalive.
#[test]
fn a_pinned_map_of_another_layout_is_refused_with_exit_7() {
    let cg = TestCgroup::new("badlayout");
    let dirs = AgentDirs::new();
    let mut agent = Agent::start_in(&dirs, &cg, &["--idle", "26"]);
    assert!(agent.stop_with(libc::SIGTERM).success());
    let maps = dirs
        .state_dir
        .join(format!("maps-v{}", keepalive_common::ABI_VERSION));
    // The per-cgroup counters' place taken by an array of one u64.
    std::fs::remove_file(maps.join("KA_CGSTATS")).unwrap();
    keepalive_tests::bpf::pin_again(&maps.join("KA_AGENT"), &maps.join("KA_CGSTATS"));
    let out = dirs.cli(&run_args(&cg));
    let err = stderr(&out);
    assert_eq!(code(&out), 7, "{err}");
    assert!(
        err.contains(&format!(
            "{} is not this build's KA_CGSTATS map (type 2, 4-byte keys, 8-byte values; this \
             build's has type 1, 8-byte keys,",
            maps.join("KA_CGSTATS").display()
        )) && err.contains(&format!(
            "`keepalive-agent --state-dir {} detach`",
            dirs.state_dir.display()
        )),
        "{err}"
    );
    assert_eq!(idle_of(&cg), 26, "the pinned enforcement goes on");
    dirs.cli_ok(&["detach"]);
}

/// A start that made the state directory but found it locked, by an agent with another runtime
/// directory that pinned its enforcement there and died, and then failed before it attached
/// (exit 7 here, over a pinned map of another layout), leaves those pins: they are not what its
/// failed start made. Before, it removed them as its own, and the enforcement with them.
#[test]
fn a_start_that_fails_leaves_the_pins_another_agent_made_while_it_waited_for_the_lock() {
    let cg = TestCgroup::new("lockrace");
    // The other agent's enforcement, pinned at first in a directory of its own.
    let other = AgentDirs::new();
    let mut agent = Agent::start_in(&other, &cg, &["--idle", "26"]);
    assert!(agent.stop_with(libc::SIGTERM).success());
    let dirs = AgentDirs::new();
    // strace holds up each directory the agent makes, so the test can lock the state directory
    // between its making and the agent's first try to lock it.
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=mkdir,mkdirat"])
        .args(["-e", "inject=mkdir,mkdirat:delay_exit=300000"])
        .arg(keepalive_tests::agent_bin())
        .arg("--state-dir")
        .arg(&dirs.state_dir)
        .arg("--runtime-dir")
        .arg(&dirs.runtime_dir)
        .args(run_args(&cg));
    let mut starting = Agent::spawn_command(&dirs, cmd);
    eventually(Duration::from_secs(30), "the state directory", || {
        dirs.state_dir.exists().then_some(())
    });
    let lock = hold_lock(&dirs.state_dir, libc::LOCK_EX);
    wait_for_the_lock(&mut starting, &dirs.state_dir);
    // Under the lock, the other agent's pins move in, with a map of another layout in place of
    // the per-cgroup counters, which the waiting start refuses.
    let maps = format!("maps-v{}", keepalive_common::ABI_VERSION);
    std::fs::create_dir_all(dirs.state_dir.join(&maps)).expect("maps dir");
    let mut moved = Vec::new();
    for dir in [other.state_dir.clone(), other.state_dir.join(&maps)] {
        for entry in std::fs::read_dir(&dir).expect("other state dir").flatten() {
            if entry.path().is_dir() {
                continue;
            }
            let name = entry
                .path()
                .strip_prefix(&other.state_dir)
                .unwrap()
                .to_owned();
            let from = if name.ends_with("KA_CGSTATS") {
                other.state_dir.join(&maps).join("KA_AGENT")
            } else {
                entry.path()
            };
            keepalive_tests::bpf::pin_again(&from, &dirs.state_dir.join(&name));
            moved.push(name);
        }
    }
    assert!(
        moved.iter().any(|name| name.ends_with("link_sockops")),
        "{moved:?}"
    );
    std::fs::remove_dir_all(&other.state_dir).expect("unpin the other directory");
    assert_eq!(idle_of(&cg), 26, "enforced from the moved pins");
    drop(lock);
    let status = starting
        .wait_exit(Duration::from_secs(60))
        .expect("the start ends");
    assert_eq!(status.code(), Some(7), "{}", starting.log());
    for name in &moved {
        assert!(dirs.state_dir.join(name).exists(), "{name:?} left in place");
    }
    assert_eq!(idle_of(&cg), 26, "the other agent's enforcement goes on");
    assert_eq!(sockops_attachments(cg.path()), 1);
    dirs.cli_ok(&["detach"]);
}

/// An attach cgroup whose parent the agent may pass through but not read (a delegated
/// subtree's, mode 0711; the unit grants no CAP_DAC_READ_SEARCH): the agent cannot watch the
/// parent, which alone tells it of the attach cgroup's removal. It refuses with exit 3, which
/// the unit does not retry, naming what to change, and leaves nothing behind; before, it exited
/// 1 after loading everything, and the unit loaded it all again every few seconds. `check`
/// fails it beforehand, and as root, which may read the parent, warns that the unit may not.
#[test]
fn an_attach_cgroup_whose_parent_cannot_be_watched_is_refused_with_exit_3() {
    use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
    let parent = TestCgroup::new("unwatchable");
    let inner = parent.child("inner");
    std::os::unix::fs::chown(parent.path(), Some(65534), Some(65534)).expect("chown");
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let dirs = AgentDirs::new();
    let mut cmd = dirs.command(&["run", "--cgroup", inner.path().to_str().unwrap()]);
    // SAFETY: prctl calls only.
    unsafe {
        cmd.pre_exec(|| drop_caps_except(&GRANTED));
    }
    let out = dirs.output(cmd);
    let err = stderr(&out);
    assert_eq!(code(&out), 3, "{err}");
    assert!(
        err.contains(&format!("cannot watch {}", parent.display()))
            && err.contains("CAP_DAC_READ_SEARCH"),
        "{err}"
    );
    assert_eq!(sockops_attachments(inner.path()), 0);
    assert!(!dirs.state_dir.exists(), "nothing left pinned");
    // `check` fails it beforehand.
    let mut cmd = dirs.command(&[
        "check",
        "--json",
        "--cgroup",
        inner.path().to_str().unwrap(),
    ]);
    // SAFETY: prctl calls only.
    unsafe {
        cmd.pre_exec(|| drop_caps_except(&GRANTED));
    }
    let out = dirs.output(cmd);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json");
    assert_eq!(code(&out), 8, "{report:#}");
    let item = check_item(&report, "inotify");
    assert!(
        item["status"] == "fail"
            && item["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("cannot watch {}", parent.display()))),
        "{item}"
    );
    let out = dirs.cli(&[
        "check",
        "--json",
        "--cgroup",
        inner.path().to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json");
    let item = check_item(&report, "inotify");
    assert!(
        item["status"] == "warn"
            && item["detail"].as_str().is_some_and(|d| {
                d.contains(&format!("can watch {}", parent.display()))
                    && d.contains("under those `run` exits 3")
            }),
        "{item}"
    );
    assert_eq!(code(&out), 0, "{report:#}");
    // `run` took its lock there before it refused.
    std::fs::remove_dir_all(&dirs.runtime_dir).expect("runtime dir");
    // A parent it may not even search (0700): the attach cgroup cannot be looked up. Exit 3
    // too, naming what to change, not exit 1 with the bare error, which the unit retries.
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut cmd = dirs.command(&["run", "--cgroup", inner.path().to_str().unwrap()]);
    // SAFETY: prctl calls only.
    unsafe {
        cmd.pre_exec(|| drop_caps_except(&GRANTED));
    }
    let out = dirs.output(cmd);
    let err = stderr(&out);
    assert_eq!(code(&out), 3, "{err}");
    assert!(
        err.contains(&format!(
            "cannot look up the cgroup {}",
            inner.path().display()
        )) && err.contains("chmod o+x")
            && err.contains("CAP_DAC_READ_SEARCH"),
        "{err}"
    );
    assert!(!dirs.state_dir.exists(), "nothing left pinned");
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let _ = std::fs::remove_dir_all(&dirs.runtime_dir);
}

/// The same parent while inotify is short at start, which hides the watch's EACCES: the
/// agent reads the parent's permissions instead and refuses the same way (exit 3, nothing
/// left behind); before, it enforced, and exited 1 once inotify could be had. A parent made
/// unreadable after the start is found at that try: exit 3, after which the pinned
/// enforcement stays.
#[test]
fn an_unwatchable_parent_hidden_by_an_inotify_shortage_ends_the_agent_with_exit_3() {
    use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
    const USER: u32 = 64_923;
    // The agent runs as another user, who may not look into a /sys/fs/bpf mounted with mode
    // 0700 (as systemd, and the agent itself, mount it): its state goes on a bpffs of its own,
    // which a new mount makes open to all, as xtask's mount of /sys/fs/bpf is.
    let bpffs = BpffsAt::new("unwatchshort");
    let parent = TestCgroup::new("unwatchshort");
    let inner = parent.child("inner");
    let chmod = |mode| {
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(mode))
            .expect("chmod");
    };
    std::os::unix::fs::chown(parent.path(), Some(65534), Some(65534)).expect("chown");
    chmod(0o711);
    let holder = hold_inotify_instances(USER, 0);
    let mut dirs = AgentDirs::new();
    dirs.state_dir = bpffs.path().join("state");
    std::fs::create_dir(&dirs.runtime_dir).expect("runtime dir");
    std::os::unix::fs::chown(&dirs.runtime_dir, Some(USER), Some(USER)).expect("chown");
    let run = || {
        let mut cmd = as_user(
            USER,
            &dirs,
            &[
                "run",
                "--cgroup",
                inner.path().to_str().unwrap(),
                "--idle",
                "31",
            ],
        );
        // SAFETY: prctl calls only. The user keeps root's capabilities as ambient ones but
        // those that read past file permissions, as under the unit (which runs the agent as
        // root, whose inotify instances this test may not take).
        unsafe {
            cmd.pre_exec(|| {
                // CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH.
                for cap in [1, 2] {
                    let lower = libc::PR_CAP_AMBIENT_LOWER as libc::c_ulong;
                    if libc::prctl(libc::PR_CAP_AMBIENT, lower, cap, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    };
    let named = |log: &str| {
        log.contains(&format!("cannot watch {}", parent.display()))
            && log.contains("CAP_DAC_READ_SEARCH")
    };
    let out = dirs.output(run());
    let err = stderr(&out);
    assert_eq!(code(&out), 3, "{err}");
    assert!(named(&err), "{err}");
    assert_eq!(sockops_attachments(inner.path()), 0);
    assert!(!dirs.state_dir.exists(), "nothing left pinned");

    chmod(0o755);
    let mut agent = Agent::start_command(&dirs, run());
    assert_eq!(idle_of(&inner), 31);
    chmod(0o711);
    drop(holder);
    let status = agent.wait_exit(Duration::from_secs(60));
    let log = agent.log();
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{log}");
    assert!(
        named(&log) && log.contains("enforcement stays attached"),
        "{log}"
    );
    assert_eq!(idle_of(&inner), 31, "the pinned enforcement stays");
    dirs.cli_ok(&["detach"]);
}

/// A new bpffs mounted at a temporary directory, unmounted when dropped.
struct BpffsAt(TempDir);

impl BpffsAt {
    fn new(label: &str) -> Self {
        let dir = TempDir::new(label);
        let path = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
        keepalive_tests::mount_new(c"bpf", &path, 0).expect("mount bpffs");
        Self(dir)
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for BpffsAt {
    fn drop(&mut self) {
        let path = std::ffi::CString::new(self.0.path().to_str().unwrap()).unwrap();
        let _ = umount(&path);
    }
}

/// The attach cgroup removed and made again under its name while an agent starts (a service
/// restarted at boot beside it): the agent found it by name before it waited for the state
/// directory's lock and loaded its programs. It exits 4, as for a removal later on, rather
/// than attach with the removed cgroup's id (its passes then reach no connection), or try to
/// take over the removed cgroup's pinned link (exit 1, or, while the cgroup lingers, a program
/// on a cgroup that holds nothing); started again, it attaches to the new one.
#[test]
fn an_attach_cgroup_made_anew_while_the_agent_starts_ends_the_start_with_exit_4() {
    let cg = TestCgroup::new("remade");
    for pinned_before in [false, true] {
        let dirs = AgentDirs::new();
        let mut earlier = None;
        if pinned_before {
            let mut agent = Agent::start_in(&dirs, &cg, &["--idle", "23"]);
            assert!(agent.stop_with(libc::SIGTERM).success());
            earlier = Some(agent);
        } else {
            std::fs::create_dir(&dirs.state_dir).expect("state dir");
        }
        // Held as `detach` or another agent holds it, so the start waits there.
        let held = hold_lock(&dirs.state_dir, libc::LOCK_EX);
        let mut agent = Agent::spawn(
            &dirs,
            &[
                "run",
                "--cgroup",
                cg.path().to_str().unwrap(),
                "--idle",
                "24",
            ],
            &[],
            None,
        );
        wait_for_the_lock(&mut agent, &dirs.state_dir);
        std::fs::remove_dir(cg.path()).expect("remove the attach cgroup");
        std::fs::create_dir(cg.path()).expect("make it again");
        drop(held);
        let status = agent.wait_exit(Duration::from_secs(30));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(4),
            "pinned before: {pinned_before}\n{}",
            agent.log()
        );
        assert!(
            agent.log().contains(&format!(
                "the attach cgroup /{} was removed while the agent started",
                cg.rel()
            )),
            "{}",
            agent.log()
        );
        assert_eq!(sockops_attachments(cg.path()), 0);
        if !pinned_before {
            let link = dirs.state_dir.join(keepalive_common::PIN_LINK_SOCKOPS);
            assert!(!link.exists(), "nothing attached");
        }
        // As the unit restarts it.
        let again = Agent::start_in(&dirs, &cg, &["--idle", "25"]);
        assert_eq!(idle_of(&cg), 25, "{}", again.log());
        drop(again);
        drop(earlier);
        dirs.cli_ok(&["detach"]);
    }
}

/// A change that fails before its table goes in (the agent cannot list the cgroups, out of
/// descriptors) leaves the kernel with the previous policy, and says so, even when putting
/// the previous rules back fails the same way: not that the kernel may hold the rejected one.
#[test]
fn a_change_that_failed_before_its_push_says_the_previous_policy_stays() {
    let cg = TestCgroup::new("nopush");
    let agent = Agent::start(&cg, &["--idle", "44"]);
    let socket = agent.dirs().runtime_dir.join("control.sock");
    let mut client = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    accepted(&socket);
    let old = starve_of_descriptors(agent.pid());
    writeln!(
        client,
        r#"{{"cmd":"set","cgroup":"{}","idle":30}}"#,
        cg.rel()
    )
    .unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&client), &mut answer).unwrap();
    set_nofile(agent.pid(), old.rlim_cur, Some(old.rlim_max));
    let log = agent.log();
    assert!(
        !log.contains("policy table: "),
        "nothing was pushed:\n{log}"
    );
    assert!(answer.contains("Too many open files"), "{answer}");
    assert!(!answer.contains("could not be put back"), "{answer}");
    assert!(
        log.contains("the previous policies stay: failed to list the cgroups in"),
        "{log}"
    );
    assert_eq!(idle_of(&cg), 44);
}

/// `check`, `status` and `detach` take the runtime directory's lock shared for a moment to see
/// whether an agent runs. An agent starting in that moment waits it out instead of exiting 7
/// as a second agent, which the unit does not retry.
#[test]
fn a_start_while_a_command_looks_for_an_agent_waits_for_it() {
    use std::os::unix::fs::DirBuilderExt as _;
    let cg = TestCgroup::new("lookwait");
    let dirs = AgentDirs::new();
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dirs.runtime_dir)
        .expect("runtime dir");
    let lock = dirs.runtime_dir.join("agent.lock");
    std::fs::File::create(&lock).expect("lock file");
    let held = hold_lock(&lock, libc::LOCK_SH);
    let mut agent = Agent::spawn(
        &dirs,
        &[
            "run",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--idle",
            "27",
        ],
        &[],
        None,
    );
    wait_for_the_lock(&mut agent, &lock);
    drop(held);
    agent.wait_ready();
    assert_eq!(idle_of(&cg), 27);
}

/// The pass enters each other network namespace on a thread of its own. A thread the kernel
/// will not make (a pids limit, as a pod may have) does not end the agent, nor is that
/// namespace passed over as one the agent may not enter: the change stands, its answer says
/// that the pass failed, and the pass is tried again until it gets through.
#[test]
fn a_namespace_whose_thread_cannot_be_made_fails_the_pass_which_is_tried_again() {
    let cg = TestCgroup::new("nothread");
    let ns = Netns::new("nothread");
    let mut in_netns = Proc::spawn(&sock_bin(), &["pair", "6"], Some(cg.path()), Some(&ns));
    in_netns.read();
    let idles = |helper: &mut Proc| {
        let report = helper.report();
        report.iter().map(|sock| values(sock).1).collect::<Vec<_>>()
    };
    // Made before the agent, so that it is removed after the agent is gone, also when the test
    // fails with the agent in it. A limit below what the agent has: no new thread at all.
    let limited = TestCgroup::pids_limited("nothread-agent", 1);
    let agent = Agent::start(&cg, &["--idle", "31"]);
    std::fs::write(limited.path().join("cgroup.procs"), agent.pid().to_string())
        .expect("move the agent");
    let out = agent.cli(&["policy", "set", cg.rel(), "--idle", "32"]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}\n{}",
        stderr(&out),
        agent.log()
    );
    let failed = format!(
        "the pass over existing ones failed: 1 network namespace could not be walked: failed \
         to start a thread to enter {}",
        ns.handle().display()
    );
    assert!(
        text.contains(&failed) && text.contains("trying again in"),
        "{text}"
    );
    assert_eq!(idle_of(&cg), 32, "new connections have the change");
    assert_eq!(
        idles(&mut in_netns),
        [31, 31],
        "the namespace was not walked"
    );
    let log = agent.log();
    let skipped = format!("cannot enter network namespace {}", ns.handle().display());
    assert!(!log.contains(&skipped), "{log}");
    // Moved back (to the hierarchy's root), the pass tried again gets through, with no change
    // to make it.
    let root = limited.path().parent().expect("hierarchy root");
    std::fs::write(root.join("cgroup.procs"), agent.pid().to_string())
        .expect("move the agent back");
    eventually(Duration::from_secs(40), "the pass tried again", || {
        (idles(&mut in_netns) == [32, 32]).then_some(())
    });
    assert!(
        agent.log().contains(
            "failed to apply the policy to existing connections after the change: 1 network \
             namespace could not be walked"
        ),
        "{}",
        agent.log()
    );
}

/// A file in `/run/netns` with no namespace mounted on it, as `ip netns add` (or a CNI plugin)
/// leaves it for a moment before the mount and `ip netns delete` after the unmount, is passed
/// over: it failed passes (setns: EINVAL) on a host where pods come and go. The file is made
/// in the agent's own mount namespace, so no other test's agent meets it.
#[test]
fn a_named_namespace_file_without_a_namespace_does_not_fail_the_pass() {
    let cg = TestCgroup::new("halfnetns");
    let mut pair = Proc::sock(&["pair", "6"], &cg);
    pair.read();
    let agent = agent_with_own_run(&cg, "41", || {
        keepalive_tests::mkdir(c"/run/netns")?;
        keepalive_tests::create_file(c"/run/netns/being-made")
    });
    let out = agent.cli(&["policy", "set", cg.rel(), "--idle", "43"]);
    let text = stdout(&out);
    assert!(
        out.status.success() && text.contains("existing connections: 2 updated"),
        "{text}{}\n{}",
        stderr(&out),
        agent.log()
    );
    let log = agent.log();
    assert!(!log.contains("could not be walked"), "{log}");
    let idles: Vec<i64> = pair.report().iter().map(|sock| values(sock).1).collect();
    assert_eq!(idles, [43, 43]);
}

/// A SIGTERM while a fresh start loads its programs, its maps already pinned, ends the start
/// with nothing left behind: no maps pinned without the program that uses them, which `status`
/// would call nothing pinned, and exit 0. A signal that comes only after the attachment (this
/// test's thread not run in time on a loaded host) is a stop, which leaves enforcement pinned;
/// the start is tried again until one is stopped before it.
#[test]
fn a_sigterm_while_a_fresh_start_loads_leaves_nothing_pinned() {
    let cg = TestCgroup::new("earlyterm");
    for _ in 0..5 {
        let dirs = AgentDirs::new();
        let maps = dirs.state_dir.join("maps-v2");
        let mut agent = Agent::spawn(
            &dirs,
            &["run", "--cgroup", cg.path().to_str().unwrap()],
            &[],
            None,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read_dir(&maps).map_or(true, |mut dir| dir.next().is_none()) {
            assert!(Instant::now() < deadline, "no map pinned:\n{}", agent.log());
            std::thread::sleep(Duration::from_micros(200));
        }
        agent.signal(libc::SIGTERM);
        let status = agent
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("still running:\n{}", agent.log()));
        let log = agent.log();
        assert!(status.success(), "{status}:\n{log}");
        if log.contains("stopping; enforcement stays attached") {
            assert_eq!(sockops_attachments(cg.path()), 1, "{log}");
            assert!(dirs.detach().status.success());
            continue;
        }
        assert!(
            log.contains("stopped by SIGTERM while starting; nothing was attached"),
            "{log}"
        );
        assert_eq!(sockops_attachments(cg.path()), 0, "{log}");
        assert!(
            !dirs.state_dir.exists(),
            "{} stays: {:?}",
            dirs.state_dir.display(),
            std::fs::read_dir(&maps)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
        return;
    }
    panic!("no SIGTERM came before the attachment in 5 starts");
}
