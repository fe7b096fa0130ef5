//! Observability: `status` lists enforced sockets with both ends, their cgroup and values,
//! drops them when they close, counts dead peers per cgroup, leaks nothing, and the metrics
//! endpoint serves the same counts.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, SystemTime},
};

use keepalive_tests::{
    Agent, AgentDirs, Proc, TempDir, TestCgroup, VethPair, agent_bin, assert_stamped_between,
    cgroup_row, code, eventually, free_port, idle_of, sock_bin, sockets_of, stderr,
    stderr_as_journal, stdout, write_config,
};
use serde_json::Value;

/// With `--json`, the failure is a document of its own, as the `policy` commands' are.
#[test]
fn status_without_an_agent_exits_7_with_one_line_and_a_json_failure() {
    let dirs = AgentDirs::new();
    for args in [&["status"][..], &["status", "--json"]] {
        let out = dirs.cli(args);
        let err = stderr(&out);
        assert_eq!(code(&out), 7, "{args:?}: {err}");
        if args.len() == 1 {
            assert!(out.stdout.is_empty(), "{args:?}: partial output on stdout");
        } else {
            let document: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
            assert_eq!(document["ok"], false, "{document}");
            assert_eq!(document["code"], 7, "{document}");
            let error = document["error"].as_str().unwrap();
            assert!(
                err.trim_end().ends_with(error),
                "the message on stderr: {document} / {err}"
            );
        }
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with(&format!(
                "keepalive-agent: nothing is pinned at {}: the directory does not exist",
                dirs.state_dir.display()
            )) && err.contains("keepalive-agent run"),
            "{args:?}: {err}"
        );
    }
    // So is a command line the parser rejects, whichever check refused it.
    let out = dirs.cli(&["status", "--json", "--port", "0"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let document: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(
        (&document["ok"], &document["code"]),
        (&false.into(), &2.into())
    );
    assert!(
        document["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("invalid value '0' for '--port <N>'")),
        "{document}"
    );
    assert!(
        stderr(&out).contains("invalid value '0'"),
        "{}",
        stderr(&out)
    );
    // A directory keepalive can never have pinned anything in is not "not attached".
    for (state_dir, want, says) in [
        ("/tmp", 5, "state directory /tmp is not on a bpf filesystem"),
        (
            "/sys/fs/bpf",
            2,
            "state directory /sys/fs/bpf is a mount point",
        ),
    ] {
        let out = AgentDirs {
            state_dir: state_dir.into(),
            runtime_dir: dirs.runtime_dir.clone(),
            bin: None,
        }
        .cli(&["status"]);
        assert_eq!(code(&out), want, "{}", stderr(&out));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }
    // Named by a config, the message names its line too.
    let config = write_config("\nstate_dir = \"/tmp\"\n");
    let mut cmd = std::process::Command::new(agent_bin());
    cmd.arg("--runtime-dir")
        .arg(&dirs.runtime_dir)
        .args(["status", "--config"])
        .arg(&*config);
    let out = dirs.output(cmd);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "state directory /tmp (state_dir at {}:2) is not on a bpf filesystem",
            config.display()
        )),
        "{}",
        stderr(&out)
    );
}

/// A pin given for the state directory, or the control socket for the runtime directory, is a
/// bad command line (exit 2) that says so, not a failure of the agent's (exit 1).
#[test]
fn a_state_or_runtime_directory_that_is_a_file_is_refused_with_exit_2() {
    let cg = TestCgroup::new("notadir");
    let agent = Agent::start(&cg, &[]);
    let dirs = agent.dirs();
    let pin = std::fs::read_dir(&dirs.state_dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .find(|entry| entry.file_type().unwrap().is_file())
        .expect("a pin in the state directory")
        .path();
    for (state_dir, says) in [
        (pin.clone(), "is not a directory"),
        (pin.join("below"), "is below a file, not a directory"),
    ] {
        for command in [&["status"][..], &["detach"]] {
            let out = AgentDirs {
                state_dir: state_dir.clone(),
                runtime_dir: dirs.runtime_dir.clone(),
                bin: None,
            }
            .cli(command);
            assert_eq!(code(&out), 2, "{command:?}: {}", stderr(&out));
            assert!(
                stderr(&out).contains(&format!("state directory {} {says}", state_dir.display())),
                "{}",
                stderr(&out)
            );
        }
    }
    let socket = dirs.runtime_dir.join("control.sock");
    for runtime_dir in [socket.clone(), socket.join("below")] {
        let out = AgentDirs {
            state_dir: dirs.state_dir.clone(),
            runtime_dir: runtime_dir.clone(),
            bin: None,
        }
        .cli(&["policy", "list"]);
        assert_eq!(code(&out), 2, "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "runtime directory {} is, or is below, a file, not a directory",
                runtime_dir.display()
            )),
            "{}",
            stderr(&out)
        );
    }
    // Refused, nothing was detached.
    assert_eq!(agent.policies().len(), 1);
    assert!(pin.exists());
}

/// An agent that died between attaching and pinning the status iterators left enforcement
/// that `status` cannot list: it says so, and does not call keepalive "not attached".
#[test]
fn status_without_its_iterators_says_the_enforcement_is_pinned() {
    let cg = TestCgroup::new("noiter");
    let mut agent = Agent::start(&cg, &[]);
    let dirs = agent.dirs();
    agent.stop_with(libc::SIGKILL);
    for pin in [
        keepalive_common::PIN_LINK_STATUS,
        keepalive_common::PIN_LINK_STATUS_SLOTS,
    ] {
        std::fs::remove_file(dirs.state_dir.join(pin)).expect("unpin a status iterator");
    }
    for args in [&["status"][..], &["status", "--json"]] {
        let out = dirs.cli(args);
        let err = stderr(&out);
        assert_eq!(code(&out), 7, "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "keepalive's enforcement is pinned at {}/link_sockops, but its status iterator \
                 at {}/link_status",
                dirs.state_dir.display(),
                dirs.state_dir.display()
            )) && !err.contains("not attached"),
            "{args:?}: {err}"
        );
    }
    // A start pins them again.
    let again = Agent::start_in(&dirs, &cg, &[]);
    assert_eq!(again.status()["attach_cgroup"], cg.display());
}

#[test]
fn a_socket_connected_to_itself_is_listed_as_outbound_with_its_process() {
    // A connecting socket that meets a SYN instead of a SYN-ACK (a simultaneous open; here a
    // connect to its own address) reaches ESTABLISHED through the kernel's passive callback,
    // the one of accepted connections, which were never connected by a process.
    let parent = TestCgroup::new("selfopen");
    let cg = parent.child("app");
    let agent = Agent::start(&parent, &["--idle", "77"]);
    let mut client = Proc::sock(&["connect", "127.0.0.1:0", "--self"], &cg);
    let out = client.read();
    assert_eq!(out["connected"]["idle"], 77, "{out}");
    let status = agent.status();
    let socks = sockets_of(&status, &cg);
    assert_eq!(socks.len(), 1, "{status:#}");
    let sock = &socks[0];
    assert_eq!(
        (&sock["local"], &sock["remote"]),
        (&out["local"], &out["local"])
    );
    assert_eq!(sock["direction"], "outbound", "{sock}");
    assert_eq!(sock["pid"], client.pid(), "{sock}");
    assert_eq!(sock["comm"], "ka-sock");
    assert_eq!(
        sock["inherited"], false,
        "the policy's values were set: {sock}"
    );
}

#[test]
fn an_open_connection_is_listed_with_both_ends_and_leaves_when_closed() {
    let start = SystemTime::now();
    let parent = TestCgroup::new("status");
    let cg = parent.child("app");
    let agent = Agent::start(
        &parent,
        &[
            "--idle",
            "77",
            "--interval",
            "4",
            "--count",
            "3",
            "--user-timeout",
            "90500ms",
        ],
    );
    let mut pair = Proc::sock(&["pair", "6"], &cg);
    let out = pair.read();
    let client = out["client_local"].as_str().unwrap().to_owned();
    let server = out["server_local"].as_str().unwrap().to_owned();

    let status = agent.status();
    assert_eq!(status["attach_cgroup"], parent.display());
    let socks = sockets_of(&status, &cg);
    assert_eq!(socks.len(), 2, "{status:#}");
    let outbound = socks
        .iter()
        .find(|s| s["direction"] == "outbound")
        .expect("outbound");
    let inbound = socks
        .iter()
        .find(|s| s["direction"] == "inbound")
        .expect("inbound");
    assert_eq!(outbound["local"], client);
    assert_eq!(outbound["remote"], server);
    assert_eq!(inbound["local"], server);
    assert_eq!(inbound["remote"], client);
    for s in [outbound, inbound] {
        assert_eq!(s["family"], "ipv6");
        assert_eq!(
            (
                s["idle"].as_u64(),
                s["interval"].as_u64(),
                s["count"].as_u64()
            ),
            (Some(77), Some(4), Some(3))
        );
        assert_eq!(s["user_timeout"], 90_500);
        assert_eq!(s["mode"], "enforce");
        assert_eq!(s["state"], "established");
        assert_eq!(s["policy_cgroup"], "default");
        assert_stamped_between(&s["established_at"], start, "established_at");
        assert_stamped_between(&s["enforced_at"], start, "enforced_at");
    }
    assert_eq!(
        outbound["pid"],
        pair.pid(),
        "outbound sockets know their process"
    );
    assert_eq!(outbound["comm"], "ka-sock");
    // The accepted end got the policy from its listener, the connecting end by setsockopt.
    assert_eq!(
        (
            inbound["inherited"].as_bool(),
            outbound["inherited"].as_bool()
        ),
        (Some(true), Some(false))
    );
    assert!(
        inbound["pid"].is_null() && inbound["comm"].is_null(),
        "never guess: {inbound}"
    );
    let row = cgroup_row(&status, &cg);
    assert_eq!(
        (row["open"].as_u64(), row["enforced_total"].as_u64()),
        (Some(2), Some(2))
    );

    // Filters.
    let port = client.rsplit(':').next().unwrap();
    let filtered: Value =
        serde_json::from_slice(&agent.cli(&["status", "--json", "--port", port]).stdout).unwrap();
    assert_eq!(filtered["sockets"].as_array().unwrap().len(), 2);
    let other = parent.child("other");
    let filtered: Value = serde_json::from_slice(
        &agent
            .cli(&[
                "status",
                "--json",
                "--cgroup",
                other.path().to_str().unwrap(),
            ])
            .stdout,
    )
    .unwrap();
    assert!(
        filtered["sockets"].as_array().unwrap().is_empty(),
        "{filtered}"
    );
    // A glob selects the cgroups it matches, as in the config.
    let by_glob = |pattern: &str| -> Value {
        let glob = format!("{}/{pattern}", parent.path().display());
        serde_json::from_slice(&agent.cli(&["status", "--json", "--cgroup", &glob]).stdout).unwrap()
    };
    let matched = by_glob("a*");
    assert_eq!(sockets_of(&matched, &cg).len(), 2, "{matched:#}");
    assert_eq!(
        matched["cgroups"].as_array().unwrap().len(),
        1,
        "{matched:#}"
    );
    let unmatched = by_glob("o*");
    assert!(
        unmatched["sockets"].as_array().unwrap().is_empty(),
        "{unmatched}"
    );
    // A filter that names no cgroup says so (a typo would otherwise read as "no sockets").
    for (filter, warned) in [
        (format!("{}/nope*", parent.path().display()), true),
        (format!("{}/o*", parent.path().display()), false),
    ] {
        let out = agent.cli(&["status", "--cgroup", &filter]);
        assert!(out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.contains(&format!("no cgroup matches {}/", parent.display())),
            warned,
            "{filter}: {stderr}"
        );
    }

    // The human view has the columns.
    let human = String::from_utf8(agent.cli(&["status"]).stdout).unwrap();
    assert!(
        human.contains("DEAD-PEERS") && human.contains(&client) && human.contains("ka-sock"),
        "{human}"
    );
    // Durations are one word each, so the row splits into its columns at whitespace.
    let row: Vec<&str> = human
        .lines()
        .find(|line| line.trim_start().starts_with(&client))
        .unwrap_or_else(|| panic!("no row for {client}:\n{human}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        row[4..9],
        ["1m17s", "4s", "3", "1m30s500ms", "enforce"],
        "{human}"
    );

    pair.finish();
    let status = eventually(
        Duration::from_secs(30),
        "the closed sockets to leave",
        || {
            let status = agent.status();
            sockets_of(&status, &cg).is_empty().then_some(status)
        },
    );
    let row = cgroup_row(&status, &cg);
    assert_eq!(
        (row["open"].as_u64(), row["enforced_total"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(row["dead_peers"], 0, "a normal close is not a dead peer");
}

/// A listener on the far side of `veth` accepting `accepts` connections; and its address.
fn server_behind(veth: &VethPair, accepts: &str) -> (Proc, String) {
    let mut server = Proc::spawn(
        &sock_bin(),
        &["listen", &format!("{}:0", veth.b_addr), accepts],
        None,
        Some(&veth.b),
    );
    let port = server.read()["port"].as_u64().unwrap();
    let target = format!("{}:{port}", veth.b_addr);
    (server, target)
}

#[test]
fn a_dead_peer_is_counted_for_its_cgroup_and_a_normal_close_is_not() {
    let veth = VethPair::new();
    let parent = TestCgroup::new("deadcount");
    let cg = parent.child("client");
    let agent = Agent::start(&parent, &["--idle", "1", "--interval", "1", "--count", "2"]);
    let (mut server, target) = server_behind(&veth, "2");
    // One connection that closes normally first.
    let mut normal = Proc::spawn(
        &sock_bin(),
        &["connect", &target],
        Some(cg.path()),
        Some(&veth.a),
    );
    normal.read();
    server.read();
    normal.finish();
    // The client's socket closes once the server acknowledges its FIN; cutting the link
    // before that would leave it open (retransmitting the FIN), so wait for it.
    eventually(
        Duration::from_secs(30),
        "the normal close to finish",
        || (cgroup_row(&agent.status(), &cg)["open"] == 0).then_some(()),
    );
    let mut doomed = Proc::spawn(
        &sock_bin(),
        &["connect", &target, "--read"],
        Some(cg.path()),
        Some(&veth.a),
    );
    doomed.read();
    server.read();
    veth.cut();
    let outcome = doomed.next(Duration::from_secs(15));
    assert_eq!(outcome["errno"], libc::ETIMEDOUT, "{outcome}");
    let status = one_dead_peer(&agent, &cg);
    let row = cgroup_row(&status, &cg);
    assert_eq!(row["enforced_total"], 2, "{row}");
    assert_eq!(row["open"], 0, "{row}");
    assert_eq!(status["counters"]["dead_peers"], 1);
}

/// A peer behind a network that answers with ICMP errors: the kernel gives up with that error
/// (the soft error it kept) instead of ETIMEDOUT, and it is a dead peer all the same.
#[test]
fn a_dead_peer_behind_an_unreachable_network_is_counted() {
    let veth = VethPair::new();
    let cg = TestCgroup::new("unreach");
    let agent = Agent::start(&cg, &["--idle", "600", "--user-timeout", "2s"]);
    let (mut server, target) = server_behind(&veth, "1");
    let mut client = Proc::spawn(
        &sock_bin(),
        &["connect", &target, "--send", "--read"],
        Some(cg.path()),
        Some(&veth.a),
    );
    client.read();
    server.read();
    veth.unreachable();
    client.close_stdin();
    let outcome = client.next(Duration::from_secs(15));
    assert_eq!(outcome["errno"], libc::ENETUNREACH, "{outcome}");
    let status = one_dead_peer(&agent, &cg);
    assert_eq!(status["counters"]["dead_peers"], 1, "{status:#}");
}

#[test]
fn a_dead_peer_in_an_off_cgroup_is_not_counted_when_another_program_watches_its_socket() {
    // Another tool's sock_ops program sets keepalive in a cgroup whose policy is `off` and
    // asks for state callbacks, which every program on the socket's cgroups then gets, the
    // agent's too. That socket was never keepalive's, and neither is its dead peer.
    let veth = VethPair::new();
    let parent = TestCgroup::new("foreigndead");
    let off = parent.child("off");
    let agent = Agent::start(&parent, &["--idle", "600"]);
    agent.cli_ok(&["policy", "set", off.rel(), "--mode", "off"]);
    let mut foreign = Proc::spawn(
        &sock_bin(),
        &["foreign-sockops", off.path().to_str().unwrap()],
        None,
        None,
    );
    assert_eq!(foreign.read()["attached"], true);
    let (mut server, target) = server_behind(&veth, "1");
    let mut doomed = Proc::spawn(
        &sock_bin(),
        &["connect", &target, "--read"],
        Some(off.path()),
        Some(&veth.a),
    );
    let connected = doomed.read();
    assert_eq!(
        connected["connected"]["idle"], 1,
        "the other program's: {connected}"
    );
    server.read();
    veth.cut();
    let outcome = doomed.next(Duration::from_secs(15));
    assert_eq!(outcome["errno"], libc::ETIMEDOUT, "{outcome}");
    // The application can read the error just before the kernel's close callback runs (on
    // another CPU): give that a while, long past what it takes, before counting.
    std::thread::sleep(Duration::from_secs(1));
    let status = agent.status();
    assert_eq!(status["counters"]["dead_peers"], 0, "{status:#}");
    assert_eq!(status["counters"]["skipped_off"], 1, "{status:#}");
}

/// `status` once `cg` has counted one dead peer.
fn one_dead_peer(agent: &Agent, cg: &TestCgroup) -> Value {
    eventually(
        Duration::from_secs(30),
        "the dead peer to be counted",
        || {
            let status = agent.status();
            (cgroup_row(&status, cg)["dead_peers"] == 1).then_some(status)
        },
    )
}

#[test]
fn records_of_closes_another_program_hid_are_freed_by_the_next_status() {
    // An RTT monitor after keepalive's program replaces the callback flags, so keepalive never
    // sees these sockets close. `status` finds their records stale, says so once and frees
    // them; an open socket under the same monitor stays listed. 800 records take more than
    // the kernel's 32 KiB of iterator output at a time: a chunk of slots whose output did not
    // fit is shown again at the next read, and must be freed only then.
    let cg = TestCgroup::new("hidden");
    let port = free_port();
    let agent = Agent::start(&cg, &["--metrics", &format!("127.0.0.1:{port}")]);
    let mut monitor = Proc::spawn(
        &sock_bin(),
        &["rtt-sockops", cg.path().to_str().unwrap()],
        None,
        None,
    );
    assert_eq!(monitor.read()["attached"], true);
    let mut open = Proc::sock(&["pair", "4"], &cg);
    open.read();
    let storm = |n: u32| {
        let out = Proc::sock(&["storm", &n.to_string()], &cg).next(Duration::from_secs(60));
        assert_eq!(out["connections"], n);
    };
    storm(400);
    let first = agent.status();
    assert_eq!(first["tracked_entries"], 802, "{first:#}");
    assert_eq!(first["stale_entries"], 800, "{first:#}");
    assert_eq!(
        cgroup_row(&first, &cg)["open"],
        2,
        "the pair alone: {first:#}"
    );
    let second = agent.status();
    assert_eq!(second["tracked_entries"], 2, "{second:#}");
    assert_eq!(second["stale_entries"], 0, "{second:#}");
    assert_eq!(second["sockets"].as_array().unwrap().len(), 2, "{second:#}");
    assert_eq!(
        cgroup_row(&second, &cg)["enforced_total"],
        802,
        "{second:#}"
    );
    // A scrape frees them too, and counts them, as `status` then finds none.
    storm(50);
    let stale = |text: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix("keepalive_stale_entries_total "))
            .unwrap_or_else(|| panic!("no stale count in:\n{text}"))
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(stale(&scrape(port)), 100);
    assert_eq!(stale(&scrape(port)), 100, "counted once");
    let third = agent.status();
    assert_eq!(third["tracked_entries"], 2, "{third:#}");
    assert_eq!(third["stale_entries"], 0, "{third:#}");
}

/// A record whose socket closes while `status` reads it was freed by its close callback: it is
/// no stale entry, which would send an operator looking for a program that breaks keepalive's
/// close callbacks (see the README) on any host with connections coming and going.
#[test]
fn status_while_connections_close_finds_no_stale_entries() {
    let cg = TestCgroup::new("churnstatus");
    let agent = Agent::start(&cg, &[]);
    let mut storm = Proc::sock(&["storm", "200000"], &cg);
    let (mut runs, mut stale) = (0, 0);
    while storm.try_next(Duration::ZERO).is_none() {
        stale += agent.status()["stale_entries"].as_u64().unwrap();
        runs += 1;
    }
    assert!(runs >= 20, "only {runs} runs of status during the storm");
    assert_eq!(
        stale, 0,
        "stale entries over {runs} runs of status during the storm"
    );
}

#[test]
fn ten_thousand_connections_leave_no_stale_entries() {
    let cg = TestCgroup::new("churn");
    let agent = Agent::start(&cg, &[]);
    let mut storm = Proc::sock(&["storm", "10000"], &cg);
    let out = storm.next(Duration::from_secs(120));
    assert_eq!(out["connections"], 10_000);
    let status = agent.status();
    assert_eq!(
        status["tracked_entries"], 0,
        "every record leaves with its socket: {}",
        status["tracked_entries"]
    );
    assert_eq!(status["stale_entries"], 0);
    assert!(status["sockets"].as_array().unwrap().is_empty());
    let row = cgroup_row(&status, &cg);
    assert_eq!(
        row["enforced_total"], 20_000,
        "both ends of every connection: {row}"
    );
    assert_eq!(row["open"], 0, "{row}");
}

/// The metrics endpoint's answer to a GET, whatever its status.
fn get_metrics(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn scrape(port: u16) -> String {
    let response = get_metrics(port);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

fn metric(text: &str, name: &str, cgroup: &TestCgroup) -> u64 {
    let prefix = format!("{name}{{cgroup=\"{}\"", cgroup.display());
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

/// A scrape the agent has no thread for (a pids limit, as pods have) gets a 503 saying so, and
/// the next one, with a thread, its metrics; before, the connection's task panicked and the
/// scrape got no answer.
#[test]
fn a_scrape_the_agent_has_no_thread_for_gets_a_503() {
    let cg = TestCgroup::new("metricsthread");
    let port = free_port();
    // Made before the agent, so that it is removed after the agent is gone, also when the test
    // fails with the agent in it. A limit below what the agent has: no new thread at all.
    let limited = TestCgroup::pids_limited("metricsthread-agent", 1);
    let agent = Agent::start(&cg, &["--metrics", &format!("127.0.0.1:{port}")]);
    std::fs::write(limited.path().join("cgroup.procs"), agent.pid().to_string())
        .expect("move the agent");
    let response = get_metrics(port);
    let root = limited.path().parent().expect("hierarchy root");
    std::fs::write(root.join("cgroup.procs"), agent.pid().to_string())
        .expect("move the agent back");
    assert!(
        response.starts_with("HTTP/1.1 503") && response.contains("failed to start a thread"),
        "{response}\n{}",
        agent.log()
    );
    scrape(port);
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

#[test]
fn the_metrics_endpoint_serves_the_same_counts() {
    let cg = TestCgroup::new("metrics");
    let port = free_port();
    let agent = Agent::start(&cg, &["--metrics", &format!("127.0.0.1:{port}")]);
    let mut open = Proc::sock(&["pair", "4"], &cg);
    open.read();
    let mut closed = Proc::sock(&["pair", "4"], &cg);
    closed.read();
    closed.finish();
    let status = eventually(
        Duration::from_secs(30),
        "the closed pair to be counted",
        || {
            let status = agent.status();
            (cgroup_row(&status, &cg)["open"] == 2).then_some(status)
        },
    );
    let row = cgroup_row(&status, &cg);
    let text = scrape(port);
    assert!(
        text.contains("# TYPE keepalive_enforced_total counter"),
        "{text}"
    );
    assert_eq!(
        metric(&text, "keepalive_enforced_open", &cg),
        row["open"].as_u64().unwrap()
    );
    assert_eq!(
        metric(&text, "keepalive_enforced_total", &cg),
        row["enforced_total"].as_u64().unwrap()
    );
    assert_eq!(metric(&text, "keepalive_dead_peers_total", &cg), 0);
    assert_eq!(row["enforced_total"], 4);
    assert!(
        text.contains("keepalive_setsockopt_failures_total{option=\"TCP_KEEPIDLE\"} 0"),
        "{text}"
    );
}

/// Sends `request` to the metrics endpoint, leaving the connection open, and returns the
/// whole answer, which must come within 5 s (the agent gives a client 10).
fn ask(port: u16, request: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    stream.write_all(request.as_bytes()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|err| panic!("no answer to {request:?}: {err}"));
    response
}

/// HEAD gets a GET's headers without the body, other methods 405 with the methods served,
/// anything that is not a request line 400, and heads too long to read 414 or 431.
#[test]
fn the_metrics_endpoint_answers_head_and_refuses_other_methods() {
    let cg = TestCgroup::new("metricsmethods");
    let port = free_port();
    let _agent = Agent::start(&cg, &["--metrics", &format!("127.0.0.1:{port}")]);
    let get = scrape(port);
    let head = ask(port, "HEAD /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let (headers, body) = head.split_once("\r\n\r\n").expect("a header block");
    assert!(headers.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, "", "HEAD answered with a body");
    let length = |headers: &str| -> usize {
        headers
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no Content-Length in {headers}"))
    };
    let (get_headers, get_body) = get.split_once("\r\n\r\n").unwrap();
    assert_eq!(length(get_headers), get_body.len());
    // The same document, give or take a counter's digits between the two scrapes.
    assert!(length(headers).abs_diff(get_body.len()) < 64, "{head}");
    let post = ask(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(
        post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{post}"
    );
    assert!(post.contains("\r\nAllow: GET, HEAD\r\n"), "{post}");
    let other = ask(port, "GET /stats HTTP/1.1\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
    let garbage = ask(port, "hello\r\n\r\n");
    assert!(
        garbage.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{garbage}"
    );
    // Lines may end in a bare LF (RFC 9112, 2.2), as `printf … | nc` sends them.
    let bare = ask(port, "GET /metrics HTTP/1.0\nHost: localhost\n\n");
    assert!(bare.starts_with("HTTP/1.1 200 OK\r\n"), "{bare}");
    // The absolute form, as a proxy sends it (RFC 9112, 3.2.2).
    let absolute = ask(
        port,
        &format!("GET http://127.0.0.1:{port}/metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
    );
    assert!(absolute.starts_with("HTTP/1.1 200 OK\r\n"), "{absolute}");
    // Heads past the 16 KiB the agent reads: the request line, or the headers.
    let long = "x".repeat(17 * 1024);
    let uri = ask(port, &format!("GET /{long} HTTP/1.1\r\n\r\n"));
    assert!(uri.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{uri}");
    let headers = ask(port, &format!("GET /metrics HTTP/1.1\r\nX: {long}\r\n\r\n"));
    assert!(
        headers.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{headers}"
    );
    // A probe's path, answered without reading the maps.
    let health = ask(port, "GET /healthz HTTP/1.1\r\n\r\n");
    assert!(
        health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("\r\n\r\nok\n"),
        "{health}"
    );
    // A request sent a byte at a time, the end of its head split over reads.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.set_nodelay(true).unwrap();
    // Empty lines before it, which are ignored, in reads of their own.
    for byte in b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" {
        std::io::Write::write_all(&mut slow, &[*byte]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut slow, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
}

/// A TCP connection to 127.0.0.1:`port` whose receive window is as small as the kernel allows,
/// so an answer of a few KiB is still in flight when the agent closes.
fn connect_with_small_window(port: u16) -> TcpStream {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket calls on a descriptor owned here, handed to the TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let size: libc::c_int = 1024;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const size).cast(),
            std::mem::size_of_val(&size) as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of_val(&addr) as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

/// A request with more than its header block (a body, or headers past what the agent reads,
/// which get 431) gets its whole answer: closing with input unread makes the kernel send a
/// reset, which throws away what of the answer is still in flight.
#[test]
fn a_scrape_that_sends_more_than_its_head_gets_the_whole_answer() {
    let cg = TestCgroup::new("metricsbody");
    let port = free_port();
    let _agent = Agent::start(&cg, &["--metrics", &format!("127.0.0.1:{port}")]);
    let whole = scrape(port);
    let too_large = ask(
        port,
        &format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "b".repeat(17 * 1024)
        ),
    );
    assert!(too_large.starts_with("HTTP/1.1 431 "), "{too_large}");
    // The metrics, give or take a counter's digits between scrapes; the 431 answer exactly.
    for (extra, whole, slack) in [
        (
            format!("Content-Length: 65536\r\n\r\n{}", "a".repeat(65536)),
            &whole,
            64,
        ),
        (
            format!("X-Big: {}\r\n\r\n", "b".repeat(40 * 1024)),
            &too_large,
            0,
        ),
    ] {
        let mut stream = connect_with_small_window(port);
        let request = format!("GET /metrics HTTP/1.1\r\nHost: localhost\r\n{extra}");
        stream.write_all(request.as_bytes()).unwrap();
        // The agent answers and closes while the answer waits for this window to open.
        std::thread::sleep(Duration::from_millis(300));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut response = Vec::new();
        let read = stream.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response);
        assert!(
            read.is_ok() && response.len().abs_diff(whole.len()) <= slack,
            "{read:?}: {} of about {} bytes",
            response.len(),
            whole.len()
        );
    }
}

#[test]
fn metrics_clients_that_send_nothing_hold_few_of_the_agents_descriptors() {
    let cg = TestCgroup::new("metricsidle");
    let port = free_port();
    let agent = Agent::start(&cg, &["--metrics", &format!("127.0.0.1:{port}")]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
            .expect("agent fds")
            .count()
    };
    let before = fds();
    let idle: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics"))
        .collect();
    // Once it took as many as it has slots, a while for any it should not.
    eventually(Duration::from_secs(10), "8 clients accepted", || {
        (keepalive_tests::tcp_accept_queue(port) <= 50 - 8).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let held = fds().saturating_sub(before);
    // At most 8 at once (MAX_CLIENTS in keepalive-agent/src/metrics.rs), and one accepted to
    // take the slot of the one that waited longest; the others wait in the listen queue,
    // where they cost the agent nothing.
    assert!(
        held <= 9,
        "50 idle clients hold {held} of the agent's descriptors"
    );
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));

    // With slots to spare, one that sends nothing is closed after 10 s (CLIENT_TIMEOUT)...
    let connected = std::time::Instant::now();
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics"))
        .collect();
    // ...and two that send part of a request, and no more, get 408.
    for (mut client, part) in idle[1..3]
        .iter()
        .zip(["GET /metrics HTTP/1.1\r\n", "HEAD /"])
    {
        std::io::Write::write_all(&mut client, part.as_bytes()).unwrap();
    }
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // A read with a timeout fails with EINTR when this process is stopped and continued (or
    // frozen and thawed) meanwhile, which says nothing about the agent: read again.
    let read = loop {
        match std::io::Read::read(&mut first, &mut [0u8; 1]) {
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            read => break read,
        }
    };
    let waited = connected.elapsed();
    assert!(
        matches!(read, Ok(0)),
        "an idle client got {read:?} after {waited:?}"
    );
    assert!(
        (Duration::from_millis(9500)..Duration::from_secs(20)).contains(&waited),
        "an idle client was closed after {waited:?}"
    );
    // Those with part of a request got 408 (without a body for HEAD) at the same time.
    let answer = |mut client: &TcpStream| {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut client, &mut text).unwrap();
        text
    };
    let (get, head) = (answer(&idle[1]), answer(&idle[2]));
    assert!(
        get.starts_with("HTTP/1.1 408 Request Timeout\r\n")
            && get.ends_with("\r\n\r\nthe request did not come within 10s\n"),
        "{get}"
    );
    assert!(
        head.starts_with("HTTP/1.1 408 Request Timeout\r\n") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    drop(idle);
    // Their slots come back as they go: a scrape is answered.
    let text = scrape(port);
    assert!(
        text.contains("# TYPE keepalive_enforced_total counter"),
        "{text}"
    );
}

/// Clients that hold every slot without sending a request do not keep scrapes and health
/// probes out for their 10 s: a new connection takes the slot of the one that waited longest,
/// which gets a 503 if it sent part of a request, and is closed if it sent nothing.
#[test]
fn metrics_clients_that_hold_every_slot_give_way_to_a_scrape() {
    let cg = TestCgroup::new("metricsfull");
    let port = free_port();
    let _agent = Agent::start(&cg, &["--metrics", &format!("127.0.0.1:{port}")]);
    let connect = || TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    let accepted = || {
        eventually(Duration::from_secs(10), "the clients accepted", || {
            (keepalive_tests::tcp_accept_queue(port) == 0).then_some(())
        });
    };
    let mut partial = connect();
    partial.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    accepted();
    let idle: Vec<TcpStream> = (0..7).map(|_| connect()).collect();
    accepted();
    // Every slot (MAX_CLIENTS, 8) is taken by a client that sent no whole request. Without
    // giving way, a scrape would wait until the first of them timed out, about 10 s.
    for _ in 0..2 {
        let asked = std::time::Instant::now();
        let text = scrape(port);
        assert!(text.contains("keepalive_enforced_total"), "{text}");
        assert!(
            asked.elapsed() < Duration::from_secs(6),
            "a scrape waited {:?} for a slot",
            asked.elapsed()
        );
    }
    // The first gave way to the first scrape, the next to the second.
    partial
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    partial.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
            && answer.ends_with(
                "\r\n\r\nthe request had not come when more than 8 clients were connected, \
                 and this one had waited longest\n"
            ),
        "{answer}"
    );
    let mut next = &idle[0];
    next.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(
        matches!(next.read(&mut [0u8; 1]), Ok(0)),
        "closed without an answer"
    );
    // The others still wait for their requests.
    let mut last = &idle[6];
    last.set_nonblocking(true).unwrap();
    assert_eq!(
        last.read(&mut [0u8; 1]).map_err(|err| err.kind()),
        Err(std::io::ErrorKind::WouldBlock)
    );
}

/// `status` without `--json` sorts its rows, so it holds them, but as one compact line each:
/// at 18000 sockets it peaked at about 80 MiB when it kept them as table cells (some 4 KiB each),
/// against 9 MiB for `status --json`, which streams them.
#[test]
fn the_status_table_keeps_little_per_socket() {
    let cg = TestCgroup::new("statustable");
    let agent = Agent::start(&cg, &[]);
    let mut held = Proc::sock(&["hold", "9000"], &cg);
    held.next(Duration::from_secs(60));
    let dir = TempDir::new("statustable");
    let file = dir.path().join("status.txt");
    // Its own peak, measured by a small process that runs it: spawned from this test binary,
    // it would count this binary's peak, which other tests' data raise (to 67 MiB once).
    let status = agent.dirs().command(&["status"]);
    let measured = std::process::Command::new(sock_bin())
        .args(["peak-rss", file.to_str().unwrap()])
        .arg(status.get_program())
        .args(status.get_args())
        .output()
        .expect("run status");
    let report: serde_json::Value = serde_json::from_slice(&measured.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", stderr(&measured)));
    assert_eq!(report["code"], 0, "status: {report}");
    let text = std::fs::read_to_string(&file).unwrap();
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&cg.display()) && l.contains("ka-sock"))
        .collect();
    assert_eq!(rows.len(), 9000, "one row for each outbound socket");
    let peak_kib = report["maxrss_kib"].as_i64().unwrap();
    assert!(
        peak_kib < 32 * 1024,
        "status peaked at {peak_kib} KiB for 18000 sockets"
    );
    drop(held);
}

/// `status --json` opens everything it reads before it writes: a `detach` while it streams the
/// sockets (here while it waits on a full pipe) leaves a whole document, not a truncated one
/// and exit 7.
#[test]
fn status_json_stays_whole_when_detach_runs_while_it_writes() {
    let cg = TestCgroup::new("statusdetach");
    let mut agent = Agent::start(&cg, &[]);
    // 2000 sockets, some 400 bytes each: far more than a pipe holds.
    let mut held = Proc::sock(&["hold", "1000"], &cg);
    held.next(Duration::from_secs(60));
    assert!(agent.stop_with(libc::SIGTERM).success());
    let mut status = agent
        .dirs()
        .command(&["status", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn status");
    let mut stdout = status.stdout.take().expect("piped");
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("status writes");
    // It now waits for the pipe to drain, in the middle of the sockets.
    std::thread::sleep(Duration::from_millis(200));
    agent.cli_ok(&["detach"]);
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("read status");
    let out = status.wait_with_output().expect("status exits");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = [&first[..], &rest].concat();
    let doc: Value = serde_json::from_slice(&text).unwrap_or_else(|err| {
        panic!(
            "not one document ({err}): ...{}",
            String::from_utf8_lossy(&text[text.len().saturating_sub(300)..])
        )
    });
    assert!(sockets_of(&doc, &cg).len() >= 2000, "{}", doc["counters"]);
    assert!(doc["counters"]["enforced"].as_u64() > Some(0), "{doc:#}");
    drop(held);
}

/// What `cmd` writes to a terminal `cols` columns wide, without the carriage returns the
/// terminal adds.
fn on_terminal(mut cmd: std::process::Command, cols: u16) -> String {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 50,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty fills both descriptors, which are then owned here.
    let rc = unsafe {
        libc::openpty(
            &raw mut master,
            &raw mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &raw const size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = cmd
        .stdout(slave.try_clone().unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(cmd);
    drop(slave);
    let mut text = Vec::new();
    // EIO once the child has closed the terminal.
    let _ = std::fs::File::from(master).read_to_end(&mut text);
    assert!(child.wait().unwrap().success());
    String::from_utf8(text).unwrap().replace('\r', "")
}

#[test]
fn the_table_is_not_wrapped_to_a_narrow_terminal() {
    let parent = TestCgroup::new("narrow");
    // As deep as a Kubernetes container's cgroup.
    let mut chain = vec![parent.child("kubepods-burstable.slice")];
    for level in 0..12 {
        let next = chain[level].child(&format!("level-{level}-of-a-long-path"));
        chain.push(next);
    }
    let deep = &chain[12];
    let agent = Agent::start(&parent, &[]);
    let mut pair = Proc::sock(&["pair", "6"], deep);
    pair.read();
    let text = on_terminal(agent.dirs().command(&["status"]), 60);
    let name = deep.display();
    assert!(name.len() > 300, "{name}");
    // Each socket row and the cgroup's counter row: every one whole on its line.
    let rows: Vec<&str> = text.lines().filter(|l| l.contains(&name)).collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(
        text.lines()
            .all(|l| l.contains(&name) || !l.contains("long-pa")),
        "a line is a piece of a path: {text}"
    );
    let counters: Vec<&str> = rows[2].split_whitespace().collect();
    assert_eq!(counters, [name.as_str(), "2", "2", "0"], "{text}");
}

#[test]
fn control_characters_in_names_are_escaped_in_the_table() {
    let parent = TestCgroup::new("ctrlname");
    // A name a delegated user could give a cgroup, and one any process can take (a process
    // is named after the file it runs).
    let cg = parent.child("a\u{1b}[2Jb");
    let dir = TempDir::new("ctrlname");
    let bin = dir.path().join("ka\nFAKE\u{1b}[31m");
    std::os::unix::fs::symlink(sock_bin(), &bin).unwrap();
    let agent = Agent::start(&parent, &[]);
    let mut pair = Proc::spawn(&bin, &["pair", "6"], Some(cg.path()), None);
    pair.read();
    let table = stdout(&agent.cli_ok(&["status"]));
    assert!(!table.contains('\u{1b}'), "{table:?}");
    let process = format!("{}/ka\\nFAKE\\u{{1b}}[31m", pair.pid());
    assert!(table.contains(&process), "{table}");
    assert!(
        table
            .lines()
            .filter(|line| line.contains("FAKE"))
            .all(|line| line.contains(&process)),
        "a name breaks no row: {table}"
    );
    let rows = table.lines().filter(|line| line.contains("a\\u{1b}[2Jb"));
    // Both ends, and the cgroup's counters.
    assert_eq!(rows.count(), 3, "{table}");

    // A log line names the path as it is given, escaped on a terminal...
    let filter = format!("{}/nope\u{1b}c", parent.path().display());
    let err = stderr(&agent.cli_ok(&["status", "--cgroup", &filter]));
    assert!(
        err.contains(&format!(
            "no cgroup matches {}/nope\\u{{1b}}c",
            parent.display()
        )) && !err.contains('\u{1b}'),
        "{err:?}"
    );
    // ...and in the journal on one line: a line break, which no cgroup name can hold, is
    // refused, escaped, so it cannot start an entry at a priority of its own.
    let filter = format!("{}/nope\n<0>forged", parent.path().display());
    let (code, journal) = stderr_as_journal(agent.dirs().command(&["status", "--cgroup", &filter]));
    assert_eq!(code, Some(2));
    assert_eq!(
        journal,
        format!(
            "<3>keepalive-agent: cgroup \"{}/nope\\n<0>forged\" contains a line break, which \
             the kernel refuses in cgroup names\n",
            parent.path().display()
        )
    );
}

#[test]
fn cgroups_whose_names_are_not_utf8_are_named_and_filtered_as_live_cgroups() {
    let parent = TestCgroup::new("notutf8");
    let odd = parent.child_bytes(b"bad\xff");
    let child = odd.child("child");
    let agent = Agent::start(&parent, &[]);
    let mut pair = Proc::sock(&["pair", "6"], &child);
    pair.read();
    assert!(
        child.display().contains("bad\u{fffd}/child"),
        "{}",
        child.display()
    );
    for filter in [None, Some(parent.rel()), Some("/")] {
        let mut args = vec!["status", "--json"];
        args.extend(filter.iter().flat_map(|f| ["--cgroup", f]));
        let status: Value = serde_json::from_slice(&agent.cli_ok(&args).stdout).unwrap();
        // Both ends, named by their path rather than as a removed cgroup.
        assert_eq!(
            sockets_of(&status, &child).len(),
            2,
            "{filter:?}: {status:#}"
        );
        assert_eq!(cgroup_row(&status, &child)["open"], 2, "{filter:?}");
    }
    // No config can name it, and no glob matches it: it, and what is below it, get their
    // nearest named ancestor's policy (here the attach cgroup's, the default).
    let glob = format!("{}/*", parent.rel());
    agent.cli_ok(&["policy", "set", &glob, "--idle", "77"]);
    let named = parent.child("named");
    assert_eq!(
        (idle_of(&named), idle_of(&odd), idle_of(&child)),
        (77, 60, 60)
    );
}

#[test]
fn sockets_of_a_removed_cgroup_are_listed_also_under_the_root_filter() {
    use std::os::unix::fs::MetadataExt as _;
    let parent = TestCgroup::new("removedcg");
    let gone = parent.child("gone");
    let id = std::fs::metadata(gone.path()).unwrap().ino();
    let agent = Agent::start(&parent, &[]);
    let mut pair = Proc::sock(&["pair", "6"], &gone);
    pair.read();
    // The process moves out; its sockets keep their cgroup, which can then be removed.
    std::fs::write(parent.path().join("cgroup.procs"), pair.pid().to_string()).unwrap();
    std::fs::remove_dir(gone.path()).unwrap();
    let of_gone = |args: &[&str]| -> Vec<String> {
        let out = agent.cli_ok(&[&["status", "--json"], args].concat());
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        status["sockets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["cgroup_id"] == id)
            .map(|s| s["cgroup"].as_str().unwrap().to_owned())
            .collect()
    };
    let removed = vec![format!("#{id} (removed)"); 2];
    assert_eq!(of_gone(&[]), removed);
    // `/` covers every cgroup, removed ones too; a subtree cannot tell where they were.
    assert_eq!(of_gone(&["--cgroup", "/"]), removed);
    assert_eq!(
        of_gone(&["--cgroup", &parent.display()]),
        Vec::<String>::new()
    );
}

/// A cgroup whose name holds glob characters (`x[1]`) is selected by the path `status` prints
/// for it, as `--cgroup` takes back what the table shows; policies, whose meaning must not
/// change as cgroups come and go, keep reading it as a glob, and say how to name it instead.
#[test]
fn a_cgroup_named_with_glob_characters_is_selected_by_its_path() {
    let parent = TestCgroup::new("globname");
    let odd = parent.child("x[1]");
    let broken = parent.child("y[");
    let agent = Agent::start(&parent, &[]);
    let mut pair = Proc::sock(&["pair", "6"], &odd);
    pair.read();
    let filtered = |cg: &TestCgroup| -> Value {
        let out = agent.cli(&["status", "--json", "--cgroup", &cg.display()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let status = filtered(&odd);
    assert_eq!(sockets_of(&status, &odd).len(), 2, "{status:#}");
    // Not a glob at all, were it read as one.
    assert!(filtered(&broken)["sockets"].as_array().unwrap().is_empty());

    let out = agent.cli_ok(&["policy", "set", odd.rel(), "--idle", "33"]);
    let escaped = format!("/{}/x[[]1]", parent.rel());
    assert!(
        stdout(&out).contains(&format!(
            "matches no cgroup yet (a cgroup named {} exists: `*`, `?` and `[` are glob \
             characters, so select it as {escaped})",
            odd.display()
        )),
        "{}",
        stdout(&out)
    );
    assert_eq!(idle_of(&odd), 60);
    agent.cli_ok(&["policy", "set", &escaped, "--idle", "34"]);
    assert_eq!(idle_of(&odd), 34);
    let out = agent.cli(&["policy", "set", broken.rel(), "--idle", "35"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "is not a valid glob: in `y[`, Pattern syntax error near position 1: invalid range \
             pattern (a cgroup named {} exists: `*`, `?` and `[` are glob characters, so \
             select it as /{}/y[[])",
            broken.display(),
            parent.rel()
        )),
        "{}",
        stderr(&out)
    );
    pair.finish();
}
