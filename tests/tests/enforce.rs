//! Foundation: the agent enforces keepalive on new connections in its cgroup, on both ends,
//! for IPv4, IPv6 and v4-mapped sockets, for static binaries too, and a dead peer is cut.

use std::time::Duration;

use keepalive_tests::{
    Agent, AgentDirs, Proc, TestCgroup, VethPair, bpf, code, kernel_defaults, shim_lib, sock_bin,
    sockets_of, sockops_attachments, static_client, stderr, stderr_as_journal, unix_seconds,
    values, write_config,
};

#[test]
fn both_ends_get_the_values_over_ipv4_ipv6_and_v4_mapped() {
    let cg = TestCgroup::new("families");
    let _agent = Agent::start(&cg, &["--idle", "11", "--interval", "7", "--count", "3"]);
    for family in ["4", "6", "mapped"] {
        let mut pair = Proc::sock(&["pair", family], &cg);
        let out = pair.read();
        assert_eq!(
            values(&out["client"]),
            (1, 11, 7, 3),
            "client, family {family}: {out}"
        );
        assert_eq!(
            values(&out["server"]),
            (1, 11, 7, 3),
            "server, family {family}: {out}"
        );
        if family == "mapped" {
            assert!(
                out["client_local"]
                    .as_str()
                    .unwrap()
                    .contains("::ffff:127.0.0.1"),
                "{out}"
            );
        }
        pair.finish();
    }
}

#[test]
fn without_value_flags_the_builtin_default_applies() {
    let cg = TestCgroup::new("default");
    let _agent = Agent::start(&cg, &[]);
    let mut pair = Proc::sock(&["pair", "4"], &cg);
    let out = pair.read();
    assert_eq!(values(&out["client"]), (1, 60, 10, 5), "{out}");
    assert_eq!(values(&out["server"]), (1, 60, 10, 5), "{out}");
    assert_eq!(
        out["client"]["user_timeout"], 0,
        "user timeout left to the kernel: {out}"
    );
}

#[test]
fn user_timeout_is_set_when_given() {
    let cg = TestCgroup::new("usertimeout");
    let _agent = Agent::start(&cg, &["--user-timeout", "1500ms"]);
    let mut pair = Proc::sock(&["pair", "6"], &cg);
    let out = pair.read();
    assert_eq!(out["client"]["user_timeout"], 1500, "{out}");
    assert_eq!(out["server"]["user_timeout"], 1500, "{out}");
}

/// Whether an ELF executable has no program interpreter, i.e. is statically linked.
fn is_static_elf(path: &std::path::Path) -> bool {
    let data = std::fs::read(path).expect("read binary");
    assert_eq!(&data[..4], b"\x7fELF", "not an ELF file");
    let u16_at = |o: usize| u16::from_le_bytes(data[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let ty = u32::from_le_bytes(data[phoff + i * phentsize..][..4].try_into().unwrap());
        ty != 3 // PT_INTERP
    })
}

#[test]
fn a_statically_linked_client_gets_the_values() {
    let client = static_client();
    assert!(
        is_static_elf(client),
        "{} must be statically linked",
        client.display()
    );
    let cg = TestCgroup::new("static");
    let _agent = Agent::start(&cg, &["--idle", "13", "--interval", "4", "--count", "6"]);
    let mut server = Proc::sock(&["listen", "127.0.0.1:0"], &cg);
    let port = server.read()["port"].as_u64().expect("port");
    let mut static_client = Proc::spawn(
        client,
        &[&format!("127.0.0.1:{port}")],
        Some(cg.path()),
        None,
    );
    let out = static_client.read();
    assert_eq!(values(&out), (1, 13, 4, 6), "{out}");
    let accepted = server.read();
    assert_eq!(values(&accepted["accepted"]), (1, 13, 4, 6), "{accepted}");
}

/// The comparison in the README: an LD_PRELOAD shim (the libkeepalive technique) reaches a
/// dynamically linked program but not a statically linked one; the agent reaches both (see
/// `a_statically_linked_client_gets_the_values`).
#[test]
fn an_ld_preload_shim_misses_static_binaries() {
    let shim = shim_lib();
    let cg = TestCgroup::new("shim");
    let preload = [("LD_PRELOAD", shim)];
    let mut dynamic =
        Proc::spawn_with_env(&sock_bin(), &["pair", "4"], Some(cg.path()), None, &preload);
    let out = dynamic.read();
    assert_eq!(
        values(&out["client"]),
        (1, 60, 10, 5),
        "the shim works on a dynamic binary: {out}"
    );
    let mut server = Proc::sock(&["listen", "127.0.0.1:0"], &cg);
    let port = server.read()["port"].as_u64().expect("port");
    let mut static_client = Proc::spawn_with_env(
        static_client(),
        &[&format!("127.0.0.1:{port}")],
        Some(cg.path()),
        None,
        &preload,
    );
    let out = static_client.read();
    assert_eq!(
        values(&out),
        kernel_defaults(),
        "LD_PRELOAD cannot reach a static binary: {out}"
    );
}

#[test]
fn sockets_outside_the_attached_cgroup_are_untouched() {
    let parent = TestCgroup::new("outside");
    let attached = parent.child("attached");
    let sibling = parent.child("sibling");
    let agent = Agent::start(&attached, &["--idle", "11"]);
    // A policy on the attach cgroup's parent could never apply: refused, not accepted idle.
    let refused = agent.cli(&["policy", "set", parent.rel(), "--idle", "12"]);
    assert_eq!(code(&refused), 2, "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("outside the attach cgroup"),
        "{}",
        stderr(&refused)
    );
    let mut inside = Proc::sock(&["pair", "4"], &attached);
    assert_eq!(values(&inside.read()["client"]).1, 11);
    let mut outside = Proc::sock(&["pair", "4"], &sibling);
    let out = outside.read();
    assert_eq!(values(&out["client"]), kernel_defaults(), "{out}");
    assert_eq!(values(&out["server"]), kernel_defaults(), "{out}");
}

/// The reason the product exists: a peer that vanishes without FIN or RST is detected.
#[test]
fn a_dead_peer_is_cut_and_without_the_agent_the_read_blocks() {
    let veth = VethPair::new();
    let parent = TestCgroup::new("deadpeer");
    let enforced = parent.child("enforced");
    let control = parent.child("control");
    let _agent = Agent::start(
        &enforced,
        &["--idle", "1", "--interval", "1", "--count", "2"],
    );
    let mut server = Proc::spawn(
        &sock_bin(),
        &["listen", &format!("{}:0", veth.b_addr), "2"],
        None,
        Some(&veth.b),
    );
    let port = server.read()["port"].as_u64().expect("port");
    let target = format!("{}:{port}", veth.b_addr);
    let mut client = Proc::spawn(
        &sock_bin(),
        &["connect", &target, "--read"],
        Some(enforced.path()),
        Some(&veth.a),
    );
    let mut unprotected = Proc::spawn(
        &sock_bin(),
        &["connect", &target, "--read"],
        Some(control.path()),
        Some(&veth.a),
    );
    assert_eq!(values(&client.read()["connected"]), (1, 1, 1, 2));
    assert_eq!(values(&unprotected.read()["connected"]).0, 0);
    server.read();
    server.read();

    veth.cut();
    let outcome = client.next(Duration::from_secs(15));
    assert_eq!(outcome["read"], "error", "{outcome}");
    assert_eq!(outcome["errno"], libc::ETIMEDOUT, "{outcome}");
    let elapsed = outcome["elapsed_ms"].as_u64().unwrap();
    assert!(
        elapsed < 10_000,
        "cut after {elapsed} ms, expected about 3 s"
    );
    // Same network, same cut, no keepalive: still blocked well after the enforced one ended.
    assert!(
        unprotected.try_next(Duration::from_secs(5)).is_none(),
        "the control connection should still be blocked in read()"
    );
}

fn run_rejected(dirs: &AgentDirs, args: &[&str]) -> std::process::Output {
    let out = dirs.cli(args);
    assert!(!out.status.success(), "{args:?} should fail");
    out
}

#[test]
fn bad_values_and_missing_cgroups_are_rejected_and_nothing_is_attached() {
    let cg = TestCgroup::new("badflags");
    let path = cg.path().to_str().unwrap().to_owned();
    let dirs = AgentDirs::new();
    for (flag, value, range) in [
        ("--idle", "0", "1 to 32767"),
        ("--idle", "32768", "1 to 32767"),
        ("--interval", "40000", "1 to 32767"),
        ("--count", "0", "1 to 127"),
        ("--count", "128", "1 to 127"),
        ("--user-timeout", "30d", "0 (none) or 1ms"),
    ] {
        let out = run_rejected(&dirs, &["run", "--cgroup", &path, flag, value]);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains(value) && err.contains(range),
            "{err}"
        );
    }
    // Under systemd, in the journal at error priority, as the agent's own errors are.
    let journal = stderr_as_journal(dirs.command(&["run", "--cgroup", &path, "--idle", "0"]));
    assert_eq!(
        journal,
        (
            Some(2),
            "<3>keepalive-agent: invalid value '0' for '--idle <DURATION>': idle = 0 is out of \
         range; accepted: 1 to 32767 seconds\n<3>For more information, try '--help'.\n"
                .to_owned()
        )
    );
    let missing = format!("{path}/does-not-exist");
    let out = run_rejected(&dirs, &["run", "--cgroup", &missing]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("does-not-exist") && stderr(&out).contains("does not exist"));
    assert_eq!(sockops_attachments(cg.path()), 0, "nothing may be attached");
    assert!(!dirs.state_dir.exists(), "nothing may be pinned");
}

#[test]
fn an_unprivileged_user_gets_a_clear_message() {
    use std::os::unix::process::CommandExt as _;
    let cg = TestCgroup::new("unpriv");
    let dirs = AgentDirs::new();
    let mut cmd = dirs.command(&["run", "--cgroup", cg.path().to_str().unwrap()]);
    cmd.uid(65534).gid(65534);
    let out = dirs.output(cmd);
    let err = stderr(&out);
    assert_eq!(code(&out), 3, "{err}");
    assert!(
        err.contains("must run as root") && err.contains("CAP_BPF"),
        "{err}"
    );
    // The error printer joins a chain on one line with ": "; this is one message, whole.
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(
            "keepalive-agent: permission denied: `keepalive-agent run` must run as root"
        ),
        "one clear message, not an error chain: {err}"
    );
    assert_eq!(sockops_attachments(cg.path()), 0);
}

/// The `status --json` row of the socket whose local address is `local`.
fn socket_row(agent: &Agent, cg: &TestCgroup, local: &serde_json::Value) -> serde_json::Value {
    let status = agent.status();
    sockets_of(&status, cg)
        .into_iter()
        .find(|s| s["local"] == *local)
        .unwrap_or_else(|| panic!("no socket {local} in {status}"))
}

/// `lock` -> `off` -> `lock`: while `off` the socket is listed as such and not locked; when
/// the cgroup leaves `off`, the lock holds it again.
#[test]
fn a_socket_is_locked_again_when_its_cgroup_leaves_off() {
    let cg = TestCgroup::new("relock");
    let config = write_config("[default]\nidle = 21\ninterval = 7\ncount = 4\nmode = \"lock\"\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    // The client tries to switch keepalive off and loosen it just before the first report.
    let mut pair = Proc::sock(&["pair", "4", "--loosen-at-report", "1"], &cg);
    let out = pair.read();
    assert_eq!(values(&out["client"]), (1, 21, 7, 4), "{out}");
    let local = &out["client_local"];
    let row = socket_row(&agent, &cg, local);
    assert_eq!(
        (&row["mode"], &row["locked"]),
        (&"lock".into(), &true.into()),
        "{row}"
    );

    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "off"]);
    let row = socket_row(&agent, &cg, local);
    assert_eq!(
        (&row["mode"], &row["locked"]),
        (&"off".into(), &false.into()),
        "{row}"
    );

    agent.cli_ok(&["policy", "unset", cg.rel()]);
    let client = pair.report().swap_remove(0);
    assert_eq!(values(&client), (1, 21, 7, 4), "held again: {client}");
    let row = socket_row(&agent, &cg, local);
    assert_eq!(
        (&row["mode"], &row["locked"]),
        (&"lock".into(), &true.into()),
        "{row}"
    );
}

/// A socket that disconnects (connect to AF_UNSPEC) and connects again is a new connection:
/// the lock of the first does not hold it when its cgroup's policy no longer locks.
#[test]
fn a_lock_ends_with_its_connection_also_when_the_socket_connects_again() {
    let cg = TestCgroup::new("reconnect");
    // The default keeps the lock program attached after the cgroup's own policy changes.
    let config = write_config("[default]\nidle = 21\ninterval = 7\ncount = 4\nmode = \"lock\"\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let mut pair = Proc::sock(
        &[
            "pair",
            "4",
            "--disconnect-at-report",
            "1",
            "--reconnect-at-report",
            "2",
            "--loosen-at-report",
            "3",
        ],
        &cg,
    );
    assert_eq!(values(&pair.read()["client"]), (1, 21, 7, 4));
    pair.report();
    agent.cli_ok(&[
        "policy",
        "set",
        cg.rel(),
        "--mode",
        "enforce",
        "--idle",
        "22",
    ]);
    let client = pair.report().swap_remove(0);
    assert_eq!(values(&client), (1, 22, 7, 4), "connected again: {client}");
    let client = pair.report().swap_remove(0);
    assert_eq!(
        values(&client),
        (0, 9999, 999, 100),
        "not held under enforce: {client}"
    );
}

/// `enforce` -> `off` -> `enforce`: values the application changed while `off` are enforced
/// again when the policy returns, as on new sockets.
#[test]
fn values_changed_under_off_are_enforced_again_when_the_policy_returns() {
    let cg = TestCgroup::new("reenforce");
    let agent = Agent::start(&cg, &["--idle", "21", "--interval", "7", "--count", "4"]);
    let mut pair = Proc::sock(&["pair", "4", "--loosen-at-report", "1"], &cg);
    assert_eq!(values(&pair.read()["client"]), (1, 21, 7, 4));
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "off"]);
    let client = pair.report().swap_remove(0);
    assert_eq!(
        values(&client),
        (0, 9999, 999, 100),
        "free under off: {client}"
    );
    agent.cli_ok(&["policy", "unset", cg.rel()]);
    let client = pair.report().swap_remove(0);
    assert_eq!(values(&client), (1, 21, 7, 4), "enforced again: {client}");
}

/// A value larger than a page, of which the setsockopt program sees only the first page, is
/// held like any other: the kernel reads only its first int.
#[test]
fn lock_holds_against_a_value_larger_than_a_page() {
    let cg = TestCgroup::new("locklarge");
    let config = write_config("[default]\nidle = 21\ninterval = 7\ncount = 4\nmode = \"lock\"\n");
    let _agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let mut server = Proc::sock(&["listen", "127.0.0.1:0"], &cg);
    let port = server.read()["port"].as_u64().unwrap();
    let target = format!("127.0.0.1:{port}");
    let mut client = Proc::sock(&["connect", &target, "--loosen-large"], &cg);
    assert_eq!(values(&client.read()["connected"]), (1, 21, 7, 4));
    let out = client.read();
    for (call, result) in out["loosen_large"].as_object().unwrap() {
        assert_eq!(result, 0, "{call} succeeds (held silently): {out}");
    }
    assert_eq!(values(&out["after"]), (1, 21, 7, 4), "{out}");
}

/// A policy that drops the user timeout puts the program's back to the kernel's default, and
/// leaves one the application set itself after the program's.
#[test]
fn dropping_the_user_timeout_keeps_one_the_application_set_since() {
    let cg = TestCgroup::new("utown");
    let agent = Agent::start(&cg, &["--user-timeout", "30s"]);
    let mut pair = Proc::sock(&["pair", "4", "--user-timeout-after", "7000"], &cg);
    let out = pair.read();
    assert_eq!(
        (
            &out["client"]["user_timeout"],
            &out["server"]["user_timeout"]
        ),
        (&7000.into(), &30_000.into()),
        "{out}"
    );
    agent.cli_ok(&[
        "policy",
        "set",
        cg.rel(),
        "--idle",
        "45",
        "--user-timeout",
        "0",
    ]);
    let report = pair.report();
    let (client, server) = (&report[0], &report[1]);
    assert_eq!(
        (&client["idle"], &server["idle"]),
        (&45.into(), &45.into()),
        "{report:?}"
    );
    assert_eq!(
        client["user_timeout"], 7000,
        "the application's stays: {client}"
    );
    assert_eq!(
        server["user_timeout"], 0,
        "the program's is reset: {server}"
    );
}

/// The program learns the kernel's HZ from the first idle time it sets (the socket keeps it in
/// jiffies), which it needs to see that a socket already carries the policy. A call that failed
/// leaves another idle time in the socket, which must not be taken for the policy's.
#[test]
fn hz_is_learned_only_from_an_idle_time_that_was_set() {
    let cg = TestCgroup::new("hz");
    let agent = Agent::start(&cg, &["--idle", "11"]);
    // An idle time over the kernel's limit, which the agent refuses and bpf_setsockopt too.
    bpf::change_policy(&agent.state_dir, cg.id(), |policy| policy.idle = 64_000);
    // The application's own idle time, in jiffies, is then a multiple of 64000 at any even HZ:
    // taken for the policy's, it would make HZ half of what it is.
    let mut refused = Proc::sock(&["pair", "4", "--keepalive", "32000"], &cg);
    let out = refused.read();
    assert_eq!(values(&out["client"]).1, 32_000, "{out}");
    agent.cli_ok(&["policy", "set", cg.rel(), "--idle", "11"]);
    // The accepted end inherits the values the program set on its listener, and the program
    // sees that it does, comparing jiffies with the policy's seconds times HZ.
    let mut pair = Proc::sock(&["pair", "4"], &cg);
    let out = pair.read();
    assert_eq!(values(&out["server"]).1, 11, "{out}");
    let row = socket_row(&agent, &cg, &out["server_local"]);
    assert_eq!(row["inherited"], true, "{row}");
}

/// `inherited` says the program found the policy's values on a socket the first time it saw
/// it. A pass that re-checks a socket the program set itself (a mode change that leaves the
/// values, enforce to lock) neither marks it inherited nor counts it as inherited from a listener.
#[test]
fn a_recheck_that_finds_the_programs_own_values_is_not_inherited() {
    let cg = TestCgroup::new("recheck");
    let agent = Agent::start(&cg, &["--idle", "23"]);
    let mut pair = Proc::sock(&["pair", "4"], &cg);
    let out = pair.read();
    let rows = |agent: &Agent| {
        let status = agent.status();
        let row = |local: &serde_json::Value| {
            let s = sockets_of(&status, &cg)
                .into_iter()
                .find(|s| s["local"] == *local)
                .unwrap_or_else(|| panic!("no socket {local} in {status}"));
            (s["mode"].clone(), s["inherited"].clone())
        };
        (
            row(&out["client_local"]),
            row(&out["server_local"]),
            status["counters"]["inherited_from_listener"].clone(),
        )
    };
    let (client, server, inherited) = rows(&agent);
    assert_eq!(
        client,
        ("enforce".into(), false.into()),
        "set by the program"
    );
    assert_eq!(server, ("enforce".into(), true.into()), "from the listener");
    assert_eq!(inherited, 1);
    agent.cli_ok(&["policy", "set", cg.rel(), "--idle", "23", "--mode", "lock"]);
    assert_eq!(values(&pair.report()[0]), values(&out["client"]));
    assert_eq!(
        rows(&agent),
        (
            ("lock".into(), false.into()),
            ("lock".into(), true.into()),
            1.into()
        )
    );
}

/// A pass that finds a socket's values already in place (its cgroup moved from `[default]` to a
/// policy of its own with the same values) reports it already current, not updated, and leaves
/// its time; one that locks it with the same values updates it.
#[test]
fn a_pass_that_finds_the_values_in_place_reports_the_sockets_current() {
    let cg = TestCgroup::new("current");
    let agent = Agent::start(&cg, &["--idle", "23"]);
    let mut pair = Proc::sock(&["pair", "4"], &cg);
    pair.read();
    // The latest `enforced_at` in seconds. Each `status` converts the stamps from the
    // monotonic clock anew, so the same stamp can read a second apart: a restamp after 3 s
    // still shows.
    let stamp = |agent: &Agent| -> i64 {
        let status = agent.status();
        let socks = sockets_of(&status, &cg);
        assert_eq!(socks.len(), 2, "{status}");
        socks
            .iter()
            .map(|s| unix_seconds(&s["enforced_at"]))
            .max()
            .unwrap()
    };
    let before = stamp(&agent);
    std::thread::sleep(Duration::from_millis(3100));
    let out = agent.cli_ok(&["policy", "set", cg.rel(), "--idle", "23"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("existing connections: 0 updated, 2 already current,"),
        "{text}"
    );
    assert!(stamp(&agent).abs_diff(before) <= 1, "restamped");
    let out = agent.cli_ok(&["policy", "set", cg.rel(), "--idle", "23", "--mode", "lock"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("existing connections: 2 updated, 0 already current,"),
        "{text}"
    );
    assert!(stamp(&agent) >= before + 2, "not restamped");
}

/// `fill` keeps the keepalive an application enables after the connection was established
/// (and the program had filled in the policy), as Go does right after connect.
#[test]
fn fill_keeps_keepalive_the_application_set_after_establishment() {
    let cg = TestCgroup::new("filllate");
    let agent = Agent::start(&cg, &[]);
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "fill", "--idle", "28"]);
    let mut pair = Proc::sock(&["pair", "4", "--keepalive-after", "15"], &cg);
    let out = pair.read();
    assert_eq!(values(&out["client"]).1, 15, "{out}");
    assert_eq!(values(&out["server"]).1, 28, "{out}");
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "fill", "--idle", "27"]);
    let report = pair.report();
    assert_eq!(values(&report[0]).1, 15, "the application's: {report:?}");
    assert_eq!(
        values(&report[1]).1,
        27,
        "the program's, updated: {report:?}"
    );
    let row = socket_row(&agent, &cg, &out["client_local"]);
    assert_eq!(
        (&row["mode"], &row["app_owned"], &row["idle"]),
        (&"fill".into(), &true.into(), &15.into()),
        "{row}"
    );
}
