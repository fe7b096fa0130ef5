//! Per-cgroup policy: each socket gets its own cgroup's policy (also in softirq), nearest
//! ancestor wins, `off` and `fill` behave, globs follow new cgroups, and runtime changes and
//! reloads take effect for the next connection.

use std::{
    ffi::CString,
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use keepalive_tests::{
    Agent, AgentDirs, GRANTED, Listener, Netns, Proc, TempConfig, TempDir, TestCgroup, agent_bin,
    agent_in_private_mounts, bind_mount,
    bpf::{self, resolution_cache},
    cgroup_row, check_item, code, eventually, free_port, hide_with_tmpfs, idle_of,
    in_private_mounts, json_refusal, kernel_defaults, mkdir, pair_values,
    perf::storm,
    private_mounts, setsockopt_attachments, sock_bin, sockets_of, sockops_attachments, stderr,
    stdout, symlink, unique, unix_seconds, values, write_config,
};

/// A runtime directory every user may write to (sticky, as /tmp is), and agent directories
/// with it.
fn shared_runtime_dir(label: &str) -> (TempDir, AgentDirs) {
    let dir = TempDir::new(label);
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let dirs = AgentDirs {
        runtime_dir: dir.path().to_owned(),
        ..AgentDirs::new()
    };
    (dir, dirs)
}

#[test]
fn policy_commands_send_nothing_to_a_control_socket_that_is_not_the_agents() {
    use std::{io::BufRead as _, os::unix::process::CommandExt as _, process::Stdio};
    // Another user put a socket of their own in a shared runtime directory, which says yes
    // to everything.
    let (dir, dirs) = shared_runtime_dir("fake-run");
    let socket = dir.path().join("control.sock");
    let mut fake = Command::new(sock_bin())
        .args(["unix-answer", socket.to_str().unwrap(), r#"{"ok":true}"#])
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(fake.stdout.take().unwrap()).lines();
    let listening = said.next().unwrap().unwrap();
    assert!(listening.contains("listening"), "{listening}");
    let out = dirs.cli(&["policy", "set", "/x", "--mode", "off"]);
    // A client that never connected leaves the stand-in waiting: release it.
    let _ = std::os::unix::net::UnixStream::connect(&socket);
    let received = said.next().unwrap().unwrap();
    let _ = fake.wait();
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("(uid 65534), which is neither root nor able to run the agent"),
        "{}",
        stderr(&out)
    );
    assert_eq!(received, r#"{"received":""}"#, "nothing was sent");
}

#[test]
fn a_control_socket_is_not_trusted_for_the_process_that_took_its_servers_pid() {
    // In a pid namespace of its own, where nothing else takes pids: another user listens,
    // hands the socket to a child and exits; its pid then goes to a root process, whose
    // capabilities /proc shows under that pid.
    let (dir, dirs) = shared_runtime_dir("reused-run");
    let socket = dir.path().join("control.sock");
    let received = dir.path().join("received");
    let script = r#"
        setpriv --reuid 65534 --regid 65534 --clear-groups "$1" unix-answer --handed-on "$2" \
            '{"ok":true}' > "$3" &
        listened=$!
        wait $listened
        echo $((listened - 1)) > /proc/sys/kernel/ns_last_pid
        sleep 60 &
        root=$!
        if [ "$root" != "$listened" ]; then echo "pid $listened went to $root" >&2; exit 99; fi
        received="$3"
        shift 3
        "$@"
        code=$?
        # The served child is no job of this shell's, and dies with it (the namespace's init):
        # let it say what it received first.
        for _ in $(seq 100); do grep -q received "$received" && break; sleep 0.05; done
        kill $root
        wait
        exit $code
    "#;
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c", script, "sh"])
        .arg(sock_bin())
        .arg(&socket)
        .arg(&received)
        .arg(agent_bin())
        .arg("--state-dir")
        .arg(&dirs.state_dir)
        .arg("--runtime-dir")
        .arg(&dirs.runtime_dir)
        .args(["policy", "set", "/x", "--mode", "off"])
        .output()
        .unwrap();
    let received = fs::read_to_string(&received).unwrap_or_default();
    assert_ne!(code(&out), 99, "{}", stderr(&out));
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("(uid 65534), which has exited, so it is not the agent"),
        "{}",
        stderr(&out)
    );
    assert!(
        received.contains(r#"{"received":""}"#),
        "nothing was sent: {received}"
    );
}

/// A runtime rule that replaces the config's only `lock` policy leaves nothing using lock: the
/// setsockopt program goes, and comes back when the runtime rule does.
#[test]
fn a_runtime_rule_over_the_only_lock_policy_removes_the_lock_program() {
    let cg = TestCgroup::new("lockshadow");
    let svc = cg.child("svc");
    let config = write_config(&format!(
        "[[policy]]\ncgroup = \"{}\"\nmode = \"lock\"\n",
        svc.rel()
    ));
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    assert_eq!(setsockopt_attachments(cg.path()), 1);
    agent.cli_ok(&["policy", "set", svc.rel(), "--mode", "enforce"]);
    assert_eq!(setsockopt_attachments(cg.path()), 0, "{}", agent.log());
    assert!(
        agent.log().contains("removed the setsockopt program"),
        "{}",
        agent.log()
    );
    agent.cli_ok(&["policy", "unset", svc.rel()]);
    assert_eq!(setsockopt_attachments(cg.path()), 1, "{}", agent.log());
    assert!(!stdout(&agent.cli_ok(&["policy", "list"])).contains("masked:"));
    // A mask of it is no lock either.
    agent.cli_ok(&["policy", "unset", svc.rel()]);
    assert_eq!(setsockopt_attachments(cg.path()), 0, "{}", agent.log());
    // The cgroup's row is gone; the list says why.
    let list = stdout(&agent.cli_ok(&["policy", "list"]));
    assert!(
        list.contains(&format!(
            "masked: {} (unset at runtime until the next reload: the config's policy for it \
             does not apply)\n",
            svc.display()
        )),
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&agent.cli_ok(&["policy", "list", "--json"]).stdout).unwrap();
    assert_eq!(json["masked"].as_array().map(Vec::len), Some(1), "{json}");
    // Each list appears when it has something to say.
    assert!(json.get("pending").is_none(), "{json}");
}

/// A lock program that cannot be taken out (its link's pin cannot be removed: here the state
/// directory is read-only in the agent's mount namespace, as a unit without `ReadWritePaths=`
/// for it would make it) does not undo the change that stopped using lock: the change stands,
/// and the removal is tried again until it goes through.
#[test]
fn a_lock_program_that_cannot_be_taken_out_leaves_the_change_standing() {
    let cg = TestCgroup::new("lockstuck");
    let svc = cg.child("svc");
    let config = write_config(&format!(
        "[[policy]]\ncgroup = \"{}\"\nmode = \"lock\"\n",
        svc.rel()
    ));
    let dirs = AgentDirs::new();
    fs::create_dir_all(&dirs.state_dir).unwrap();
    let state = CString::new(dirs.state_dir.to_str().unwrap()).unwrap();
    let mut cmd = dirs.command(&[
        "run",
        "--cgroup",
        cg.path().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    // A mount of its own, which can be made read-only for the agent alone.
    private_mounts(&mut cmd, move || bind_mount(&state, &state));
    let agent = Agent::start_command(&dirs, cmd);
    assert_eq!(setsockopt_attachments(cg.path()), 1);
    let remount = |mode: &str| {
        let out = Command::new("nsenter")
            .args(["-t", &agent.pid().to_string(), "-m", "mount", "-o"])
            .arg(format!("remount,bind,{mode}"))
            .arg(&dirs.state_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    remount("ro");
    let out = agent.cli(&["policy", "set", svc.rel(), "--mode", "enforce"]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(
        agent
            .policies()
            .iter()
            .any(|p| p["cgroup"] == format!("/{}", svc.rel()) && p["mode"] == "enforce"),
        "{:?}",
        agent.policies()
    );
    assert!(
        agent
            .log()
            .contains("the setsockopt program could not be taken out"),
        "{}",
        agent.log()
    );
    assert_eq!(setsockopt_attachments(cg.path()), 1, "still pinned");
    remount("rw");
    eventually(
        Duration::from_secs(20),
        "the lock program taken out",
        || (setsockopt_attachments(cg.path()) == 0).then_some(()),
    );
}

#[test]
fn each_end_of_one_loopback_connection_gets_its_own_cgroups_policy() {
    let parent = TestCgroup::new("ownpolicy");
    let a = parent.child("server");
    let b = parent.child("client");
    let config = write_config(&format!(
        "[default]\nidle = 40\n[[policy]]\ncgroup = \"{}\"\nidle = 21\ncount = 4\n\
         [[policy]]\ncgroup = \"{}\"\nidle = 22\ncount = 6\n",
        a.rel(),
        b.rel()
    ));
    let _agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    for family in ["127.0.0.1:0", "[::1]:0"] {
        let mut server = Proc::sock(&["listen", family], &a);
        let port = server.read()["port"].as_u64().unwrap();
        let target = if family.starts_with('[') {
            format!("[::1]:{port}")
        } else {
            format!("127.0.0.1:{port}")
        };
        let mut client = Proc::sock(&["connect", &target], &b);
        // On loopback the server's PASSIVE_ESTABLISHED runs in the client's context: a policy
        // looked up by the current task would give the server the client's values.
        assert_eq!(values(&client.read()["connected"]), (1, 22, 10, 6));
        assert_eq!(values(&server.read()["accepted"]), (1, 21, 10, 4));
    }
}

#[test]
fn nearest_ancestor_default_and_off() {
    let parent = TestCgroup::new("nearest");
    let x = parent.child("x");
    let xy = x.child("y");
    let xyz = xy.child("z");
    let exempt = x.child("exempt");
    let other = parent.child("other");
    let config = write_config(&format!(
        "[default]\nidle = 41\n\
         [[policy]]\ncgroup = \"{}\"\nidle = 31\n\
         [[policy]]\ncgroup = \"{}\"\nmode = \"off\"\n",
        x.rel(),
        exempt.rel()
    ));
    let _agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    assert_eq!(idle_of(&x), 31, "own policy");
    assert_eq!(idle_of(&xy), 31, "child inherits from its parent");
    assert_eq!(
        idle_of(&xyz),
        31,
        "grandchild inherits from its nearest ancestor"
    );
    assert_eq!(idle_of(&other), 41, "no policy on the way up: [default]");
    assert_eq!(
        idle_of(&parent),
        41,
        "the attach cgroup itself gets [default]"
    );
    let (client, server) = pair_values(&exempt);
    assert_eq!(
        client,
        kernel_defaults(),
        "off inside an enforced subtree is untouched"
    );
    assert_eq!(server, kernel_defaults());
}

/// Where runtime globs overlap, the one set last decides, also when an older one is set again.
#[test]
fn the_latest_runtime_glob_decides_where_globs_overlap() {
    let parent = TestCgroup::new("globorder");
    let pods = parent.child("pods");
    let best = pods.child("best");
    let pod = best.child("p1");
    let agent = Agent::start(&parent, &["--idle", "41"]);
    let wide = format!("{}/*/*", pods.rel());
    let narrow = format!("{}/*", best.rel());
    agent.cli_ok(&["policy", "set", &wide, "--idle", "30"]);
    assert_eq!(idle_of(&pod), 30);
    agent.cli_ok(&["policy", "set", &narrow, "--idle", "31"]);
    assert_eq!(idle_of(&pod), 31, "the glob set last");
    agent.cli_ok(&["policy", "set", &wide, "--idle", "32"]);
    assert_eq!(idle_of(&pod), 32, "the wide glob, set again");
    agent.cli_ok(&["policy", "unset", &wide]);
    assert_eq!(idle_of(&pod), 31, "the other runtime glob once it is gone");
    agent.cli_ok(&["policy", "unset", &narrow]);
    assert_eq!(idle_of(&pod), 41);
}

/// Runs `each` once on every CPU this thread may use, pinned there: processes it starts run
/// there too, and so do the loopback callbacks of their connections.
fn on_each_cpu(mut each: impl FnMut(usize)) {
    // SAFETY: sched_{get,set}affinity on this thread with a cpu_set_t they fill and read.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed),
            0
        );
        for cpu in (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &allowed)) {
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            assert_eq!(
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one),
                0
            );
            each(cpu);
        }
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &allowed),
            0
        );
    }
}

#[test]
fn a_new_policy_on_an_ancestor_reaches_descendants_the_program_resolved_before() {
    // The program caches what it resolved for a cgroup without a policy of its own (per CPU,
    // under the table's generation). A new table must invalidate that on every CPU.
    let parent = TestCgroup::new("ancestor");
    let a = parent.child("a");
    let b = a.child("b");
    let leaf = b.child("c");
    let config = write_config("[default]\nidle = 50\n");
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    // Both ends: the client's values come from the program, the server's from its listener,
    // which the program configured when it started listening.
    let expect = |values: (i64, i64, i64, i64), what: &str| {
        on_each_cpu(|cpu| {
            let (client, server) = pair_values(&leaf);
            assert_eq!(client, values, "cpu {cpu}, client: {what}");
            assert_eq!(server, values, "cpu {cpu}, server: {what}");
        });
    };
    expect((1, 50, 10, 5), "[default]");
    let a_path = a.path().to_str().unwrap();
    agent.cli_ok(&[
        "policy",
        "set",
        a_path,
        "--idle",
        "70",
        "--interval",
        "7",
        "--count",
        "3",
    ]);
    expect((1, 70, 7, 3), "the new ancestor policy");
    expect((1, 70, 7, 3), "again, now cached");
    agent.cli_ok(&["policy", "unset", a_path]);
    expect((1, 50, 10, 5), "back to [default]");
}

#[test]
fn the_program_walks_up_from_a_cgroup_once_per_cpu_not_once_per_connection() {
    // A cgroup without a policy of its own takes its nearest ancestor's, found by a walk up the
    // tree that the program caches per CPU under the table's generation. Every cache write
    // advances its slot's `seq` by 2, so the sum of `seq / 2` counts the walks that missed.
    let parent = TestCgroup::new("walks");
    let a = parent.child("a");
    let leaf = a.child("b");
    let config = write_config("[default]\nidle = 50\n");
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    // One listener and two established sockets per connection resolve the leaf's policy.
    let connections = 200;
    storm(&leaf, connections, &[]);
    let cache = resolution_cache(agent.pid());
    let walks: u64 = cache.iter().map(|slot| slot.seq / 2).sum();
    let cpus = cache.len() as u64 / u64::from(keepalive_common::RESOLVED_SLOTS);
    // At most one per CPU, or two if the agent happened to push a new table meanwhile.
    assert!(
        (1..=2 * cpus).contains(&walks),
        "{walks} walks for {} resolutions on {cpus} CPUs",
        2 * connections + 1
    );
    let leaf_id = fs::metadata(leaf.path()).expect("leaf cgroup").ino();
    assert!(
        cache
            .iter()
            .any(|slot| slot.cgroup == leaf_id && slot.policy.idle == 50),
        "no cached resolution for the leaf cgroup {leaf_id}"
    );
}

/// Stops a process while it lives (SIGSTOP), and lets it go on drop (SIGCONT), also when the
/// test fails meanwhile.
struct Held(u32);

impl Held {
    fn new(pid: u32) -> Self {
        // SAFETY: kill(2) with a pid and a signal number has no memory-safety preconditions.
        assert_eq!(
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) },
            0,
            "SIGSTOP"
        );
        let held = Self(pid);
        eventually(Duration::from_secs(30), "the process stopped", || {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            (state == 'T').then_some(())
        });
        held
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// Lets a [`held_over_new_off`] agent go, and waits for its pass to release `n` sockets.
fn release(agent: &Agent, held: Held, n: usize) {
    drop(held);
    let line = format!(
        "{n} in off cgroups ({n} released: enforced before the agent saw their new cgroup)"
    );
    eventually(Duration::from_secs(10), "the pass's log line", || {
        agent.log().contains(&line).then_some(())
    });
}

/// An agent over a new cgroup `name` whose `off-*` children its config makes `off`, with
/// `default` as its `[default]`, held, and the child `off-1`, made meanwhile: until the agent
/// is released, the program gives that child's sockets the ancestor's policy.
fn held_over_new_off(
    name: &str,
    default: &str,
) -> (TestCgroup, TempConfig, Agent, Held, TestCgroup) {
    let parent = TestCgroup::new(name);
    let config = write_config(&format!(
        "[default]\n{default}\n[[policy]]\ncgroup = \"{}/off-*\"\nmode = \"off\"\n",
        parent.rel()
    ));
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    let held = Held::new(agent.pid());
    let off = parent.child("off-1");
    (parent, config, agent, held, off)
}

#[test]
fn sockets_enforced_before_the_agent_saw_their_new_off_cgroup_are_released() {
    // Until the agent has seen a new cgroup, the program gives its sockets an ancestor's
    // policy. Holding the agent makes that window as long as the test needs.
    let (_parent, _config, agent, held, off) = held_over_new_off("newoff", "idle = 41");
    let mut plain = Proc::sock(&["pair", "4"], &off);
    // The application's own keepalive: before connecting, and after (as Go sets it).
    let mut before = Proc::sock(&["pair", "4", "--keepalive", "77"], &off);
    let mut after = Proc::sock(&["pair", "4", "--keepalive-after", "15"], &off);
    let ancestors = (1, 41, 10, 5);
    let both = |p: &mut Proc| {
        let out = p.read();
        (values(&out["client"]), values(&out["server"]))
    };
    assert_eq!(
        both(&mut plain),
        (ancestors, ancestors),
        "while the agent is held"
    );
    // `enforce` replaced the idle time the application set before connecting.
    assert_eq!(
        both(&mut before),
        (ancestors, ancestors),
        "while the agent is held"
    );
    assert_eq!(both(&mut after), ((1, 15, 10, 5), ancestors));
    release(&agent, held, 6);
    let now = |p: &mut Proc| p.report().iter().map(values).collect::<Vec<_>>();
    // Keepalive goes off where it was the program's alone. Accepted sockets keep theirs: it
    // came from the listener, and whose it was there cannot be told from the socket.
    assert_eq!(now(&mut plain), [(0, 41, 10, 5), ancestors]);
    assert_eq!(now(&mut before), [ancestors, ancestors]);
    assert_eq!(now(&mut after), [(1, 15, 10, 5), ancestors]);
    let status = agent.status();
    assert!(
        sockets_of(&status, &off).is_empty(),
        "released sockets are not listed: {status}"
    );
    // A connection made now is left alone from the start.
    assert_eq!(pair_values(&off), (kernel_defaults(), kernel_defaults()));
    // Released as if never covered, they are not counted; covered later, once each.
    assert_eq!(cgroup_row(&status, &off)["enforced_total"], 0, "{status}");
    agent.cli_ok(&[
        "policy",
        "set",
        off.path().to_str().unwrap(),
        "--mode",
        "enforce",
        "--idle",
        "33",
    ]);
    assert_eq!(now(&mut plain), [(1, 33, 10, 5), (1, 33, 10, 5)]);
    let status = agent.status();
    assert_eq!(cgroup_row(&status, &off)["enforced_total"], 6, "{status}");
}

#[test]
fn a_release_leaves_the_state_callbacks_another_program_asked_for() {
    // The kernel keeps one switch for the state-change callbacks of a socket, shared by every
    // program on it. Another tool's, in the new cgroup, switched it on before the agent's
    // program asked: releasing the socket must leave it on. One attached beside the agent's,
    // which runs after it, cannot be told apart from the agent's own request: there the
    // release switches them off, which shows that releases do.
    let (parent, _config, agent, held, off) = held_over_new_off("newoffcb", "idle = 41");
    let other = parent.child("off-2");
    let watch = |cgroup: &TestCgroup| {
        let mut watcher = Proc::spawn(
            &sock_bin(),
            &["state-sockops", cgroup.path().to_str().unwrap()],
            None,
            None,
        );
        assert_eq!(watcher.read()["attached"], true);
        watcher
    };
    let _before = watch(&off);
    let _after = watch(&parent);
    let ancestors = (1, 41, 10, 5);
    let mut pairs = [&off, &other].map(|cgroup| {
        let mut pair = Proc::sock(&["pair", "4", "--half-close-at-report", "1"], cgroup);
        let out = pair.read();
        assert_eq!(
            (values(&out["client"]), values(&out["server"])),
            (ancestors, ancestors),
            "while the agent is held"
        );
        pair
    });
    release(&agent, held, 4);
    // The client shuts its side down, the server reads the end: both ends change state, and
    // the other tool's callbacks mark them. (The client's keepalive was the program's alone,
    // and went with the release; the server's came from its listener.)
    let [before, after] = &mut pairs;
    assert_eq!(
        before.report().iter().map(values).collect::<Vec<_>>(),
        [(0, 4242, 10, 5), (1, 4242, 10, 5)]
    );
    assert_eq!(
        after.report().iter().map(values).collect::<Vec<_>>(),
        [(0, 41, 10, 5), ancestors],
        "released: no more state callbacks"
    );
}

#[test]
fn sockets_fill_left_to_their_application_before_the_agent_saw_their_new_off_cgroup_are_released() {
    // As above, under a `fill` default: a client that switched keepalive on before connecting
    // keeps its own values, and is listed as the application's. Its record went before only
    // when the program had set the values, so this one stayed listed (and counted) under `off`.
    let (_parent, _config, agent, held, off) =
        held_over_new_off("newofffill", "mode = \"fill\"\nidle = 41");
    let mut own = Proc::sock(&["pair", "4", "--keepalive", "77"], &off);
    let ancestors = (1, 41, 10, 5);
    let (_, _, interval, count) = kernel_defaults();
    let apps = (1, 77, interval, count);
    let out = own.read();
    assert_eq!(
        (values(&out["client"]), values(&out["server"])),
        (apps, ancestors),
        "while the agent is held"
    );
    let status = agent.status();
    assert_eq!(sockets_of(&status, &off).len(), 2, "{status}");
    release(&agent, held, 2);
    let now: Vec<_> = own.report().iter().map(values).collect();
    assert_eq!(now, [apps, ancestors]);
    let status = agent.status();
    assert!(
        sockets_of(&status, &off).is_empty(),
        "released sockets are not listed: {status}"
    );
    assert_eq!(cgroup_row(&status, &off)["enforced_total"], 0, "{status}");
}

#[test]
fn a_user_timeout_fill_left_with_the_program_goes_when_its_new_cgroup_turns_out_off() {
    // A listener whose application set its own keepalive after listen() (as nginx does) passes
    // on the application's values and the user timeout the program set at listen(), which
    // `fill` keeps as the program's on the connections it accepts. When their new cgroup turns
    // out `off`, the release takes that user timeout back and leaves the application's values.
    let (parent, _config, agent, held, off) = held_over_new_off(
        "newoffut",
        "mode = \"fill\"\nidle = 41\nuser_timeout = \"20s\"",
    );
    let mut server = Proc::sock(
        &["listen", "127.0.0.1:0", "1", "--keepalive-after", "77"],
        &off,
    );
    let port = server.read()["port"].as_u64().unwrap();
    let mut client = Proc::sock(&["connect", &format!("127.0.0.1:{port}")], &parent);
    client.read();
    let accepted = server.read()["accepted"].clone();
    assert_eq!(
        (values(&accepted).1, &accepted["user_timeout"]),
        (77, &serde_json::json!(20_000)),
        "while the agent is held: {accepted}"
    );
    let status = agent.status();
    let listed = sockets_of(&status, &off);
    assert_eq!(listed.len(), 1, "{status}");
    assert_eq!(listed[0]["mode"], "fill", "{status}");
    drop(held);
    eventually(Duration::from_secs(10), "the pass's log line", || {
        agent
            .log()
            .contains("(1 released: enforced before the agent saw their new cgroup)")
            .then_some(())
    });
    let now = &server.report()[0];
    assert_eq!(values(now), values(&accepted), "the application's: {now}");
    assert_eq!(now["user_timeout"], 0, "the program's went: {now}");
    let status = agent.status();
    assert!(sockets_of(&status, &off).is_empty(), "{status}");
}

#[test]
fn sockets_of_an_off_cgroup_created_while_no_agent_ran_are_released_at_the_next_start() {
    // A stopped agent leaves the program attached, with the last table: a cgroup created
    // meanwhile gets an ancestor's policy until the next start. That start must tell it from a
    // cgroup that was there before and became `off` by a config change meanwhile, whose
    // sockets keep their values, as after a reload.
    let parent = TestCgroup::new("stoppedoff");
    let seen = parent.child("seen");
    let rules = |extra: &str| {
        format!(
            "[default]\nidle = 41\n[[policy]]\ncgroup = \"{}/off-*\"\nmode = \"off\"\n{extra}",
            parent.rel()
        )
    };
    let first = write_config(&rules(""));
    let mut agent = Agent::start(&parent, &["--config", first.to_str().unwrap()]);
    let dirs = agent.dirs();
    assert!(agent.stop_with(libc::SIGTERM).success());
    let ancestors = (1, 41, 10, 5);
    let both = |p: &mut Proc| {
        let out = p.read();
        (values(&out["client"]), values(&out["server"]))
    };
    let mut in_seen = Proc::sock(&["pair", "4"], &seen);
    let created = parent.child("off-1");
    let mut in_created = Proc::sock(&["pair", "4"], &created);
    assert_eq!(both(&mut in_seen), (ancestors, ancestors), "no agent runs");
    assert_eq!(
        both(&mut in_created),
        (ancestors, ancestors),
        "no agent runs"
    );
    let second = write_config(&rules(&format!(
        "[[policy]]\ncgroup = \"{}\"\nmode = \"off\"\n",
        seen.rel()
    )));
    let agent = Agent::start_in(&dirs, &parent, &["--config", second.to_str().unwrap()]);
    eventually(Duration::from_secs(10), "the pass's log line", || {
        agent
            .log()
            .contains(
                "4 in off cgroups (2 released: enforced before the agent saw their new cgroup)",
            )
            .then_some(())
    });
    let now = |p: &mut Proc| p.report().iter().map(values).collect::<Vec<_>>();
    // As in the test above: the accepted socket keeps what it inherited from its listener.
    assert_eq!(now(&mut in_created), [(0, 41, 10, 5), ancestors]);
    assert_eq!(now(&mut in_seen), [ancestors, ancestors]);
    let status = agent.status();
    assert!(
        sockets_of(&status, &created).is_empty(),
        "released sockets are not listed: {status}"
    );
    assert_eq!(sockets_of(&status, &seen).len(), 2, "{status}");
}

/// An agent on `cg` with `config`, exactly the capabilities the unit grants and the
/// environment `env`.
fn start_granted(cg: &TestCgroup, config: &Path, env: &[(&str, &str)]) -> Agent {
    start_with_caps(cg, config, env, &GRANTED)
}

/// An agent on `cg` with `config`, exactly the capabilities `caps` and the environment `env`.
fn start_with_caps(cg: &TestCgroup, config: &Path, env: &[(&str, &str)], caps: &[u32]) -> Agent {
    Agent::start_with(
        &AgentDirs::new(),
        &[
            "run",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        env,
        Some(caps),
    )
}

#[test]
fn a_cgroup_the_agent_may_not_read_is_named_in_the_log_and_read_once_it_may() {
    // The unit and the DaemonSet grant no CAP_DAC_READ_SEARCH: a directory root may not read
    // hides the cgroups below it from the agent's globs. Before, it did so silently.
    let parent = TestCgroup::new("unreadable");
    let locked = parent.child("locked");
    let svc = locked.child("svc-1");
    let api = locked.child("api");
    // A second such directory, made readable later and found by a `policy set` instead.
    let other = parent.child("other");
    let web = other.child("web-1");
    let config = write_config(&format!(
        "[default]\nidle = 41\n[[policy]]\ncgroup = \"{0}/svc-*\"\nidle = 31\n\
         [[policy]]\ncgroup = \"{0}/api\"\nidle = 32\n\
         [[policy]]\ncgroup = \"{1}/web-*\"\nidle = 36\n",
        locked.rel(),
        other.rel()
    ));
    for dir in [&locked, &other] {
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).expect("chown");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    let agent = start_granted(&parent, &config, &[]);
    let warning = format!(
        "cannot read cgroup {} (Permission denied (os error 13)): policies for cgroups below it \
         do not apply",
        locked.display()
    );
    assert!(agent.log().contains(&warning), "{}", agent.log());
    assert_eq!(
        pair_values(&svc).0.1,
        41,
        "the nearest policy the agent could read"
    );
    assert_eq!(
        pair_values(&api).0.1,
        41,
        "the nearest policy the agent could read"
    );
    // A policy set there now says why it selects nothing.
    let out = agent.cli_ok(&[
        "policy",
        "set",
        &format!("{}/web", locked.path().display()),
        "--idle",
        "33",
    ]);
    let why = format!(
        "is below {}, which the agent cannot read (Permission denied",
        locked.display()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&why),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Once root may read it, the next look (here a reload) finds the glob's cgroups.
    fs::set_permissions(locked.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    agent.signal(libc::SIGHUP);
    eventually(Duration::from_secs(10), "the glob's policy", || {
        (pair_values(&svc).0.1 == 31).then_some(())
    });
    assert_eq!(pair_values(&api).0.1, 32);
    assert_eq!(
        agent.log().matches("cannot read cgroup").count(),
        2,
        "warned once for each directory: {}",
        agent.log()
    );
    // Any `policy set` looks again too, here one for another cgroup.
    assert_eq!(pair_values(&web).0.1, 41);
    fs::set_permissions(other.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    agent.cli_ok(&["policy", "set", api.rel(), "--idle", "34"]);
    assert_eq!(pair_values(&web).0.1, 36);
    assert_eq!(pair_values(&api).0.1, 34);
}

#[test]
fn a_new_cgroup_the_agent_may_not_watch_still_gets_its_policy() {
    // A delegated subtree: its owner creates a cgroup root may not read, and inotify refuses
    // to watch it for the agent, which runs without CAP_DAC_READ_SEARCH. Cgroups created below
    // it later go unseen until a restart; its own policy must not.
    let parent = TestCgroup::new("unwatched");
    let user = parent.child("user");
    std::os::unix::fs::chown(user.path(), Some(65534), Some(65534)).expect("chown");
    let config = write_config(&format!(
        "[default]\nidle = 41\n[[policy]]\ncgroup = \"{}/svc\"\nidle = 35\n",
        user.rel()
    ));
    let agent = start_granted(&parent, &config, &[("RUST_LOG", "keepalive_agent=debug")]);
    let svc = user.child_made_by("svc", 65534, 0o700);
    eventually(Duration::from_secs(10), "svc's own policy", || {
        (pair_values(&svc).0.1 == 35).then_some(())
    });
    let refused = format!("cannot watch cgroup {}: ", svc.display());
    assert!(
        agent.log().contains(&refused),
        "not watched: {}",
        agent.log()
    );
}

/// Under `off` the program sets nothing on a new listener, so what it noted for an earlier one
/// on the same port does not describe it: a user timeout the application set there, equal to
/// the one the program set on the earlier listener, stays on the connections it accepts.
#[test]
fn off_leaves_what_the_application_set_on_a_listener_that_replaced_one_the_program_set() {
    let cg = TestCgroup::new("offnote");
    let config = write_config("[default]\nidle = 41\nuser_timeout = \"7s\"\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let addr = format!("127.0.0.1:{}", free_port());
    let accept = |server: &mut Proc| {
        server.read();
        let _client = Proc::sock(&["connect", &addr], &cg);
        let accepted = server.read()["accepted"].clone();
        (values(&accepted).1, accepted["user_timeout"].as_u64())
    };
    let mut first = Proc::sock(&["listen", &addr, "1"], &cg);
    assert_eq!(accept(&mut first), (41, Some(7000)));
    assert!(first.finish().success());
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "off"]);
    let mut second = Proc::sock(
        &[
            "listen",
            &addr,
            "1",
            "--keepalive-after",
            "77",
            "--user-timeout-after",
            "7000",
        ],
        &cg,
    );
    assert_eq!(accept(&mut second), (77, Some(7000)), "the application's");
}

#[test]
fn off_leaves_a_listeners_own_keepalive_on() {
    // The application switched keepalive on for its listener; `enforce` set the policy's
    // values on it. When the cgroup becomes `off`, the program takes back what it set, which
    // is not the keepalive itself: accepted connections still get it.
    let cg = TestCgroup::new("offlistener");
    let config = write_config("[default]\nidle = 41\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let listen = |extra: &[&str]| {
        let args = [&["listen", "127.0.0.1:0", "2"], extra].concat();
        let mut server = Proc::sock(&args, &cg);
        let port = server.read()["port"].as_u64().unwrap();
        (server, format!("127.0.0.1:{port}"))
    };
    let accept = |(server, addr): &mut (Proc, String)| {
        let _client = Proc::sock(&["connect", addr], &cg);
        values(&server.read()["accepted"])
    };
    let mut own = listen(&["--keepalive", "77"]);
    let mut plain = listen(&[]);
    assert_eq!(accept(&mut own), (1, 41, 10, 5));
    assert_eq!(accept(&mut plain), (1, 41, 10, 5));
    agent.cli_ok(&[
        "policy",
        "set",
        cg.path().to_str().unwrap(),
        "--mode",
        "off",
    ]);
    assert_eq!(
        accept(&mut own).0,
        1,
        "the application's keepalive stays on"
    );
    assert_eq!(accept(&mut plain).0, 0, "the program's is taken back");
}

#[test]
fn fill_keeps_an_applications_own_keepalive() {
    let cg = TestCgroup::new("fill");
    let config = write_config("[default]\nidle = 33\ninterval = 3\ncount = 3\nmode = \"fill\"\n");
    let _agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let mut own = Proc::sock(&["pair", "4", "--keepalive", "77"], &cg);
    let out = own.read();
    assert_eq!(values(&out["client"]).0, 1);
    assert_eq!(
        values(&out["client"]).1,
        77,
        "the app's own idle stays: {out}"
    );
    let mut plain = Proc::sock(&["pair", "4"], &cg);
    let out = plain.read();
    assert_eq!(values(&out["client"]), (1, 33, 3, 3), "{out}");
    assert_eq!(values(&out["server"]), (1, 33, 3, 3), "{out}");
}

/// An application's own keepalive stays its own under `fill` also when its values are the
/// policy's: a later policy leaves them, on connections made before the agent started and
/// since, and `status` says whose they are. (Not on the accepting end, which cannot tell them
/// from the values a listener the program configured passes on.)
#[test]
fn fill_keeps_an_applications_own_keepalive_with_the_policys_values() {
    let cg = TestCgroup::new("fillsame");
    let own = [
        "pair",
        "4",
        "--keepalive",
        "77",
        "--keepalive-interval",
        "7",
        "--keepalive-count",
        "4",
    ];
    let mut before = Proc::sock(&own, &cg);
    before.read();
    let config = write_config("[default]\nidle = 77\ninterval = 7\ncount = 4\nmode = \"fill\"\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let mut since = Proc::sock(&own, &cg);
    since.read();
    let owned = |agent: &Agent| {
        sockets_of(&agent.status(), &cg)
            .iter()
            .filter(|s| s["app_owned"] == true)
            .count()
    };
    assert_eq!(owned(&agent), 2, "both clients are the application's");
    // What a pass that leaves the application's keepalive alone must not touch: the count of
    // kept keepalives (an event per socket, not per pass) and when the values were applied.
    // Those are shown to the second, through a conversion between clocks that can move a
    // second either way, hence the pause of three.
    let kept = |agent: &Agent| {
        let status = agent.status();
        let mut stamps: Vec<i64> = sockets_of(&status, &cg)
            .iter()
            .filter(|s| s["app_owned"] == true)
            .map(|s| unix_seconds(&s["enforced_at"]))
            .collect();
        stamps.sort_unstable();
        (status["counters"]["kept_app_keepalive"].clone(), stamps)
    };
    let kept_first = kept(&agent);
    assert_eq!(kept_first.0, 2, "{kept_first:?}");
    std::thread::sleep(Duration::from_millis(3100));
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "fill", "--idle", "44"]);
    for pair in [&mut before, &mut since] {
        let socks = pair.report();
        assert_eq!(
            values(&socks[0]),
            (1, 77, 7, 4),
            "the application's, left alone: {socks:?}"
        );
        assert_eq!(values(&socks[1]).1, 44, "the program's, moved: {socks:?}");
    }
    assert_eq!(owned(&agent), 2);
    let kept_after = kept(&agent);
    assert_eq!(kept_after.0, kept_first.0, "the pass counted them again");
    assert_eq!(kept_after.1.len(), 2);
    for (after, first) in kept_after.1.iter().zip(&kept_first.1) {
        assert!(
            (after - first).abs() <= 1,
            "the pass stamped them again: {kept_first:?} -> {kept_after:?}"
        );
    }
}

/// An agent with a `fill` default (idle 31) over cgroup `name`, which has a child `other`
/// without sockets, and a `ka-sock listen` there for `n` connections with `extra` arguments;
/// with the listener's port.
fn fill_listener(name: &str, n: &str, extra: &[&str]) -> (TestCgroup, TestCgroup, Agent, Listener) {
    let cg = TestCgroup::new(name);
    let other = cg.child("other");
    let config = write_config("[default]\nidle = 31\nmode = \"fill\"\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let server = Listener::start(&cg, n, extra);
    (cg, other, agent, server)
}

/// Values an application sets on its listener after listen() (as nginx does), over the ones the
/// program set at listen(), are the application's: under `fill`, an apply pass keeps them.
#[test]
fn fill_keeps_values_the_application_set_on_its_listener_after_listen() {
    let (cg, other, agent, mut server) =
        fill_listener("filllistener", "2", &["--keepalive-after", "77"]);
    assert_eq!(
        values(&server.accepted(&cg, None)).1,
        77,
        "the application's"
    );
    // Any table change runs a pass over existing sockets, listeners included.
    agent.cli_ok(&["policy", "set", other.rel(), "--mode", "enforce"]);
    assert_eq!(
        values(&server.accepted(&cg, None)).1,
        77,
        "still the application's after the pass"
    );
}

/// Keepalive an application switches off on its listener after listen(), over the keepalive
/// the program set there or its own, is the application's choice: under `fill`, an apply pass
/// keeps it off (the connections it accepts are filled in at establishment, as any are).
/// Under `enforce`, a pass switches it on again.
#[test]
fn fill_keeps_keepalive_off_where_the_application_switched_it_off_on_its_listener() {
    let (cg, other, agent, mut server) =
        fill_listener("filllistenoff", "4", &["--keepalive-off-after"]);
    // Its own keepalive at listen(), which `fill` leaves to it, switched off after.
    let mut own = Listener::start(&cg, "4", &["--keepalive", "77", "--keepalive-off-after"]);
    let accept = |listener: &mut Listener| {
        let line = listener.accept(&cg, None);
        (values(&line["listener"]).0, values(&line["accepted"]))
    };
    assert_eq!(accept(&mut server), (0, (1, 31, 10, 5)), "switched off");
    assert_eq!(
        accept(&mut own),
        (0, (1, 31, 10, 5)),
        "its own, switched off"
    );
    // Any table change runs a pass over existing sockets, listeners included.
    agent.cli_ok(&["policy", "set", other.rel(), "--mode", "enforce"]);
    assert_eq!(
        accept(&mut server),
        (0, (1, 31, 10, 5)),
        "still off after the pass"
    );
    assert_eq!(
        accept(&mut own),
        (0, (1, 31, 10, 5)),
        "its own, still off after the pass"
    );
    agent.cli_ok(&[
        "policy",
        "set",
        cg.rel(),
        "--mode",
        "enforce",
        "--idle",
        "32",
    ]);
    assert_eq!(
        accept(&mut server),
        (1, (1, 32, 10, 5)),
        "enforce switches it on"
    );
    assert_eq!(
        accept(&mut own),
        (1, (1, 32, 10, 5)),
        "enforce switches its own on"
    );
    // That keepalive is the program's now, on both, and `off` takes it away again.
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "off"]);
    assert_eq!(
        accept(&mut server),
        (0, (0, 32, 10, 5)),
        "off switches it off"
    );
    assert_eq!(
        accept(&mut own),
        (0, (0, 32, 10, 5)),
        "off switches the one that was its own off"
    );
}

/// Under `fill`, the user timeout the program set on a listener whose keepalive the application
/// switched off is still the program's: it follows later policies, changed or dropped, while
/// the listener stays off. After `off`, a `fill` policy configures the listener anew.
#[test]
fn fill_moves_its_user_timeout_on_a_listener_the_application_switched_off() {
    let cg = TestCgroup::new("filloffut");
    let config = write_config("[default]\nidle = 31\nmode = \"fill\"\nuser_timeout = \"7s\"\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let mut server = Listener::start(&cg, "4", &["--keepalive-off-after"]);
    // The listener's keepalive and user timeout, and the accepted connection's values and
    // user timeout.
    let mut accept = || {
        let line = server.accept(&cg, None);
        let (listener, accepted) = (&line["listener"], &line["accepted"]);
        (
            values(listener).0,
            listener["user_timeout"].as_u64().unwrap(),
            values(accepted),
            accepted["user_timeout"].as_u64().unwrap(),
        )
    };
    assert_eq!(accept(), (0, 7000, (1, 31, 10, 5), 7000));
    let set = |args: &[&str]| agent.cli_ok(&[&["policy", "set", cg.rel()], args].concat());
    set(&["--mode", "fill", "--idle", "31", "--user-timeout", "9s"]);
    assert_eq!(accept(), (0, 9000, (1, 31, 10, 5), 9000), "changed");
    set(&["--mode", "fill", "--idle", "31", "--user-timeout", "0"]);
    assert_eq!(accept(), (0, 0, (1, 31, 10, 5), 0), "dropped");
    set(&["--mode", "off"]);
    // Its runtime policy gone, the user timeout not given comes from `[default]` again.
    agent.cli_ok(&["policy", "unset", cg.rel()]);
    set(&["--mode", "fill", "--idle", "33"]);
    assert_eq!(accept(), (1, 7000, (1, 33, 10, 5), 7000), "configured anew");
}

/// A listener where the program's own calls failed holds values the program did not set, not
/// values the application chose: a later `fill` policy configures it, rather than keeping them
/// as the application's.
#[test]
fn fill_configures_a_listener_where_the_programs_calls_failed() {
    let cg = TestCgroup::new("fillfailed");
    let agent = Agent::start(&cg, &["--idle", "31"]);
    // An idle time over the kernel's limit, which the agent refuses and bpf_setsockopt too.
    bpf::change_policy(&agent.state_dir, cg.id(), |policy| policy.idle = 64_000);
    let mut server = Listener::start(&cg, "4", &[]);
    let mut accept = || {
        let line = server.accept(&cg, None);
        (values(&line["listener"]), values(&line["accepted"]))
    };
    // The program switched keepalive on; its idle time did not go in.
    let (listener, _) = accept();
    assert_eq!(
        listener,
        (1, kernel_defaults().1, 10, 5),
        "the failed listener"
    );
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "fill", "--idle", "32"]);
    assert_eq!(
        accept(),
        ((1, 32, 10, 5), (1, 32, 10, 5)),
        "configured by fill"
    );
}

/// The user timeout the program set at listen() stays the program's when the application sets
/// its own keepalive values on the listener: it follows the policy, and the connections the
/// listener accepts from then on inherit the current one. On those it accepted before, it
/// follows the policy too.
#[test]
fn fill_moves_its_own_user_timeout_on_a_listener_the_application_configured() {
    let cg = TestCgroup::new("utlistener");
    let config = write_config("[default]\nidle = 31\nmode = \"fill\"\nuser_timeout = \"20s\"\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let mut server = Proc::sock(
        &["listen", "127.0.0.1:0", "3", "--keepalive-after", "77"],
        &cg,
    );
    let port = server.read()["port"].as_u64().unwrap().to_string();
    let target = format!("127.0.0.1:{port}");
    let mut clients = Vec::new();
    let mut accept = |server: &mut Proc| {
        let mut client = Proc::sock(&["connect", &target], &cg);
        client.read();
        clients.push(client);
        let accepted = server.read()["accepted"].clone();
        (accepted["idle"].as_u64(), accepted["user_timeout"].as_u64())
    };
    assert_eq!(accept(&mut server), (Some(77), Some(20_000)));
    let fill = ["policy", "set", cg.rel(), "--mode", "fill", "--idle", "32"];
    agent.cli_ok(&[&fill[..], &["--user-timeout", "30s"]].concat());
    assert_eq!(accept(&mut server), (Some(77), Some(30_000)));
    agent.cli_ok(&[&fill[..], &["--user-timeout", "0"]].concat());
    assert_eq!(accept(&mut server), (Some(77), Some(0)));
    // The connections accepted before each change followed it too: the user timeout they
    // inherited from the listener was the program's, their values the application's.
    let now: Vec<_> = server
        .report()
        .iter()
        .map(|s| (s["idle"].as_u64(), s["user_timeout"].as_u64()))
        .collect();
    assert_eq!(now, [(Some(77), Some(0)); 3]);
}

#[test]
fn enforce_replaces_an_applications_own_keepalive() {
    let cg = TestCgroup::new("enforce");
    let _agent = Agent::start(&cg, &["--idle", "33"]);
    let mut own = Proc::sock(&["pair", "4", "--keepalive", "77"], &cg);
    assert_eq!(values(&own.read()["client"]).1, 33);
}

/// A runtime glob (an emergency `--mode off` for all pods, say) does not reach cgroups with a
/// policy by path, which comes first: its answer names them, and `policy list` names a glob
/// that every cgroup it matches passes over.
#[test]
fn a_runtime_glob_names_the_cgroups_whose_policy_by_path_comes_first() {
    let parent = TestCgroup::new("passedover");
    let (app, web, _db) = (parent.child("app"), parent.child("web"), parent.child("db"));
    let deep = web.child("deep");
    let config = write_config(&format!(
        "[[policy]]\ncgroup = \"{}\"\nidle = 27\nmode = \"lock\"\n\
         [[policy]]\ncgroup = \"{}\"\nidle = 28\n",
        app.rel(),
        deep.rel()
    ));
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    let all = format!("{}/*", parent.rel());
    let out = stdout(&agent.cli_ok(&["policy", "set", &all, "--mode", "off"]));
    // Also one below a cgroup it matches, whose own policy is the nearest.
    assert!(
        out.contains(&format!(
            "\nwarning: 2 cgroups it matches, or below one it matches, keep a policy of their \
             own (a path comes before a glob, and below a cgroup the nearest policy applies): \
             /{}, /{}; change them by path with `policy set` or `policy unset`",
            app.rel(),
            deep.rel()
        )),
        "{out}"
    );
    assert_eq!(
        (idle_of(&app), idle_of(&deep)),
        (27, 28),
        "their policies stay"
    );
    let only_app = format!("{}/ap*", parent.rel());
    let out = stdout(&agent.cli_ok(&["policy", "set", &only_app, "--idle", "19"]));
    assert!(out.contains("warning: 1 cgroup it matches"), "{out}");
    let list = stdout(&agent.cli_ok(&["policy", "list"]));
    assert!(
        list.contains(&format!(
            "pending: /{only_app} (runtime; every cgroup it matches gets another rule's policy"
        )),
        "{list}"
    );
    // A glob with nothing passed over says nothing of the kind.
    let out = stdout(&agent.cli_ok(&["policy", "set", &format!("{}/d*", parent.rel())]));
    assert!(!out.contains("warning"), "{out}");
    // A cgroup whose config policy an unset masks by path has no policy of its own, and no
    // glob reaches it either: named apart, as what it gets is its ancestor's.
    agent.cli_ok(&["policy", "unset", app.rel()]);
    let out = stdout(&agent.cli_ok(&["policy", "set", &all, "--mode", "enforce", "--idle", "33"]));
    assert!(
        out.contains(&format!(
            "\nwarning: 1 cgroup it matches is unset by path until the next reload, so it \
             inherits from its nearest ancestor with a policy instead (a path comes before a \
             glob): /{}; change it by path with `policy set`",
            app.rel()
        )),
        "{out}"
    );
    assert!(
        out.contains("warning: 1 cgroup it matches, or below"),
        "{out}"
    );
    assert_eq!((idle_of(&app), idle_of(&web)), (60, 33));
    let list = stdout(&agent.cli_ok(&["policy", "list"]));
    assert!(
        list.contains(&format!(
            "pending: /{only_app} (runtime; every cgroup it matches gets another rule's policy, \
             or is unset by path"
        )),
        "{list}"
    );
}

#[test]
fn a_glob_policy_applies_to_a_cgroup_created_after_start() {
    let parent = TestCgroup::new("glob");
    let config = write_config(&format!(
        "[[policy]]\ncgroup = \"{}/svc-*\"\nidle = 27\n",
        parent.rel()
    ));
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    let late = parent.child("svc-late");
    eventually(
        Duration::from_secs(10),
        "the glob to cover the new cgroup",
        || {
            agent
                .policies()
                .iter()
                .any(|p| p["cgroup_id"] == late.id() && p["idle"] == 27)
                .then_some(())
        },
    );
    assert_eq!(idle_of(&late), 27);
    // The log names it, and the rule it got its policy from.
    let named = format!(
        "cgroup {} got the policy for {}/svc-* ({}:1): enforce idle 27s",
        late.display(),
        parent.display(),
        config.display()
    );
    assert!(agent.log().contains(&named), "{}", agent.log());
    let nomatch = parent.child("web-late");
    assert_eq!(
        idle_of(&nomatch),
        60,
        "a cgroup the glob does not match keeps the default"
    );
}

/// Cgroups that come and go fast (containers) each change the table, which goes in at once for
/// new connections. The passes over existing connections that the changes call for wait nine
/// times as long as the last pass took, so they take at most a tenth of one CPU.
#[test]
fn passes_for_cgroup_changes_are_spaced_by_their_own_duration() {
    let parent = TestCgroup::new("churn");
    let config = write_config(&format!(
        "[[policy]]\ncgroup = \"{}/pod-*\"\nidle = 27\n",
        parent.rel()
    ));
    // 36000 sockets make a pass take about 50 ms here: unpaced, nearly every change ran one
    // (31 and 33 passes); paced, about one per half second (4). The bound below holds on
    // machines up to about four times as fast.
    let held_cg = parent.child("held");
    let mut held: Vec<Proc> = (0..2)
        .map(|_| Proc::sock(&["hold", "9000"], &held_cg))
        .collect();
    for proc in &mut held {
        proc.next(Duration::from_secs(120));
    }
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    let passes = |log: &str| log.matches("existing connections:").count();
    let before = passes(&agent.log());
    // One cgroup every 80 ms, each a change of its own.
    let pods: Vec<TestCgroup> = (0..40)
        .map(|i| {
            let pod = parent.child(&format!("pod-{i}"));
            std::thread::sleep(Duration::from_millis(80));
            pod
        })
        .collect();
    let last = pods.last().unwrap();
    eventually(Duration::from_secs(10), "the last pod's policy", || {
        (idle_of(last) == 27).then_some(())
    });
    // The pass after the last change still runs.
    let log = eventually(
        Duration::from_secs(10),
        "a pass after the last change",
        || {
            let log = agent.log();
            let table = log.rfind("plus 40 cgroup policies")?;
            (log.rfind("existing connections:")? > table).then_some(log)
        },
    );
    let ran = passes(&log) - before;
    assert!(ran <= 20, "{ran} passes for 40 changes over 3.2 s: {log}");
}

#[test]
fn a_policy_for_a_cgroup_that_does_not_exist_yet_takes_effect_when_it_appears() {
    let parent = TestCgroup::new("pending");
    let config = write_config(&format!(
        "[[policy]]\ncgroup = \"{}/later/inner\"\nidle = 19\n",
        parent.rel()
    ));
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    let list = agent.cli(&["policy", "list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("does not exist yet"),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    let later = parent.child("later");
    let inner = later.child("inner");
    eventually(
        Duration::from_secs(10),
        "the pending policy to apply",
        || (idle_of(&inner) == 19).then_some(()),
    );
}

/// A restart, also one after a crash, ends `policy set` and `unset` rules, as documented. The
/// new agent names the policies of the previous one's table it replaced, so that an emergency
/// `--mode off` (or `unset` of a config's `lock`) does not end unnoticed; a restart that
/// changes nothing says nothing.
/// A flag given to `run` takes the place of the file's `[default]` value: a change to that
/// value in the file is read by a reload and cannot apply, which the reload says, as the start
/// does.
#[test]
fn a_value_a_flag_takes_the_place_of_is_named_at_start_and_reload() {
    let cg = TestCgroup::new("flagover");
    let config = write_config("[default]\nidle = 30\n");
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap(), "--idle", "45"]);
    assert_eq!(idle_of(&cg), 45);
    let note = |file_idle: &str| {
        format!(
            "--idle 45s given to `run` takes the place of idle {file_idle} of [default] at {}:1",
            config.display()
        )
    };
    assert!(agent.log().contains(&note("30s")), "{}", agent.log());
    std::fs::write(&config, "[default]\nidle = 20\n").unwrap();
    let out = agent.cli_ok(&["policy", "reload"]);
    assert!(
        stdout(&out).contains(&format!("warning: {}", note("20s"))),
        "{}",
        stdout(&out)
    );
    assert_eq!(idle_of(&cg), 45, "the flag's value stays");
    // A file that agrees with the flag: nothing to say.
    std::fs::write(&config, "[default]\nidle = 45\n").unwrap();
    let out = agent.cli_ok(&["policy", "reload"]);
    assert!(
        !stdout(&out).contains("takes the place of"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_restart_names_the_runtime_policies_it_ended() {
    let cg = TestCgroup::new("restartrules");
    let (app, _other) = (cg.child("app"), cg.child("other"));
    let config = write_config(&format!(
        "[default]\nidle = 41\n[[policy]]\ncgroup = \"{}\"\nidle = 42\nmode = \"lock\"\n",
        app.rel()
    ));
    let args = ["--config", config.to_str().unwrap()];
    let mut agent = Agent::start(&cg, &args);
    let dirs = agent.dirs();
    let replaced = format!(
        "replaced 1 policy the previous agent left: {}; runtime changes (`policy set` and \
         `unset`) end with the agent that made them",
        app.display()
    );
    let mut killed = Vec::new();
    for (change, during) in [
        (
            &["set", app.rel(), "--mode", "off"][..],
            kernel_defaults().1,
        ),
        (&["unset", app.rel()], 41),
    ] {
        agent.cli_ok(&[&["policy"], change].concat());
        assert_eq!(pair_values(&app).0.1, during, "{change:?}");
        agent.stop_with(libc::SIGKILL);
        // Kept until the end: dropping one cleans up the directories the next one uses.
        killed.push(std::mem::replace(
            &mut agent,
            Agent::start_in(&dirs, &cg, &args),
        ));
        assert!(
            agent.log().contains(&replaced),
            "{change:?}: {}",
            agent.log()
        );
        assert_eq!(idle_of(&app), 42);
    }
    assert!(agent.stop_with(libc::SIGTERM).success());
    let agent = Agent::start_in(&dirs, &cg, &args);
    assert!(
        !agent.log().contains("the previous agent left:"),
        "{}",
        agent.log()
    );
}

#[test]
fn runtime_set_unset_and_reload_take_effect_for_the_next_connection() {
    let parent = TestCgroup::new("runtime");
    let svc = parent.child("svc");
    let config = write_config("[default]\nidle = 50\n");
    let mut agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    assert_eq!(idle_of(&svc), 50);

    agent.cli_ok(&[
        "policy",
        "set",
        svc.path().to_str().unwrap(),
        "--idle",
        "2m",
        "--count",
        "2",
    ]);
    assert_eq!(pair_values(&svc).0, (1, 120, 10, 2), "set applies at once");

    // The cgroup as `status` and systemd print it.
    agent.cli_ok(&["policy", "unset", &svc.display()]);
    assert_eq!(idle_of(&svc), 50, "unset falls back to the default");

    let out = agent.cli(&["policy", "unset", svc.rel()]);
    assert_eq!(code(&out), 2, "nothing left to unset: {}", stderr(&out));
    // With --json the refusal is JSON on stdout too.
    json_refusal(&agent.cli(&["policy", "unset", svc.rel(), "--json"]), 2);

    // Unset by a path a runtime glob governs names the glob; outside the attach cgroup, a
    // mask would do nothing, and is refused.
    agent.cli_ok(&[
        "policy",
        "set",
        &format!("{}/*", parent.rel()),
        "--idle",
        "31",
    ]);
    let out = agent.cli(&["policy", "unset", svc.rel()]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("`policy unset {}/*`", parent.display())),
        "{}",
        stderr(&out)
    );
    agent.cli_ok(&["policy", "unset", &format!("{}/*", parent.rel())]);
    let out = agent.cli(&["policy", "unset", "/elsewhere"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("outside the attach cgroup"),
        "{}",
        stderr(&out)
    );

    // A reload ends runtime changes, and says which.
    agent.cli_ok(&["policy", "set", svc.rel(), "--idle", "33"]);
    assert_eq!(idle_of(&svc), 33);
    let out = agent.cli_ok(&["policy", "reload"]);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        said.contains(&format!(
            "warning: dropped the runtime policy for {} (enforce idle 33s",
            svc.display()
        )),
        "{said}"
    );
    assert_eq!(idle_of(&svc), 50, "the reload ended it");

    std::fs::write(
        &config,
        format!(
            "[default]\nidle = 50\n[[policy]]\ncgroup = \"{}\"\nidle = 44\n",
            svc.rel()
        ),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_notify("READY=1", Duration::from_secs(10));
    assert_eq!(idle_of(&svc), 44, "SIGHUP reload");
    assert!(
        agent.log().contains(" plus 1 cgroup policy\n"),
        "one policy, one noun: {}",
        agent.log()
    );

    // A bad file is rejected whole, with file and line, and the running policy stays.
    std::fs::write(
        &config,
        format!(
            "[default]\nidle = 50\n[[policy]]\ncgroup = \"{}\"\nidle = 0\n",
            svc.rel()
        ),
    )
    .unwrap();
    let out = agent.cli(&["policy", "reload"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:5", config.display()))
            && err.contains("1 to 32767")
            && err.ends_with(" (rejected, the previous policies stay)\n"),
        "{err}"
    );
    // The journal names the command, not the request's internals, at error priority as for
    // SIGHUP: the file on disk is not the one in force.
    assert!(
        agent.log().contains(&format!(
            "ERROR] rejected `policy reload`, the previous policies stay: {}:5",
            config.display()
        )),
        "{}",
        agent.log()
    );
    agent.signal(libc::SIGHUP);
    agent.wait_notify("READY=1", Duration::from_secs(10));
    assert!(
        agent.log().contains(&format!(
            "ERROR] rejected the reload on SIGHUP, the previous policies stay: {}:5",
            config.display()
        )),
        "{}",
        agent.log()
    );
    assert_eq!(idle_of(&svc), 44, "the old policy stays in force");
}

#[test]
fn policy_set_changes_only_the_values_it_gives() {
    let parent = TestCgroup::new("setkeep");
    let svc = parent.child("svc");
    let below = svc.child("below");
    let other = parent.child("other");
    let exempt = parent.child("ex-a");
    let config = write_config(&format!(
        "[default]\nidle = 50\n[[policy]]\ncgroup = \"{}\"\nidle = 44\ncount = 3\nmode = \"fill\"\n\
         [[policy]]\ncgroup = \"{}/ex-*\"\nmode = \"off\"\n",
        svc.rel(),
        parent.rel()
    ));
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);

    // Over the config's policy: its idle, count and mode stay.
    let out = agent.cli_ok(&["policy", "set", svc.rel(), "--interval", "7"]);
    let said = stdout(&out);
    assert!(
        said.contains("fill idle 44s interval 7s count 3")
            && said.contains(&format!(
                "(what was not given is kept from its policy at {}:3)",
                config.display()
            )),
        "{said}"
    );
    assert_eq!(pair_values(&svc).0, (1, 44, 7, 3));

    // Over its own runtime policy: the interval just set stays too.
    let out = agent.cli_ok(&["policy", "set", svc.rel(), "--count", "4"]);
    assert!(
        stdout(&out).contains("kept from its runtime policy"),
        "{}",
        stdout(&out)
    );
    assert_eq!(pair_values(&svc).0, (1, 44, 7, 4));
    // The same again changes nothing, and says so.
    let out = agent.cli_ok(&["policy", "set", svc.rel(), "--count", "4"]);
    assert!(
        stdout(&out).contains(
            "fill idle 44s interval 7s count 4 (unchanged: its runtime policy was this already)"
        ),
        "{}",
        stdout(&out)
    );

    // A cgroup without a policy of its own starts from the one it gets now: its nearest
    // ancestor's, all of whose values it keeps...
    let out = agent.cli_ok(&["policy", "set", below.rel(), "--count", "6"]);
    assert!(
        stdout(&out).contains(&format!(
            "fill idle 44s interval 7s count 6 (what was not given is kept from the policy it \
             gets now from {0}, for {0} (runtime))",
            svc.display()
        )),
        "{}",
        stdout(&out)
    );
    assert_eq!(pair_values(&below).0, (1, 44, 7, 6));
    // ...a glob's, whose `off` wants a mode with values, as its own would...
    let out = agent.cli(&["policy", "set", exempt.rel(), "--idle", "20"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the mode its current policy has is off"),
        "{}",
        stderr(&out)
    );
    assert_eq!(pair_values(&exempt).0.0, 0, "still off");
    // ...or, where nothing above it has one, `[default]`.
    let out = agent.cli_ok(&["policy", "set", other.rel(), "--count", "2"]);
    assert!(
        stdout(&out).contains("(what was not given is taken from [default])"),
        "{}",
        stdout(&out)
    );
    assert_eq!(pair_values(&other).0, (1, 50, 10, 2));

    // An `off` policy of its own wants a mode with values, as an `off` default does.
    let out = agent.cli_ok(&[
        "policy",
        "set",
        other.rel(),
        "--mode",
        "off",
        "--count",
        "3",
    ]);
    assert!(
        stdout(&out).contains("warning: an off policy sets nothing: the values given are kept"),
        "{}",
        stdout(&out)
    );
    let out = agent.cli(&["policy", "set", other.rel(), "--idle", "9"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the mode its current policy has is off"),
        "{}",
        stderr(&out)
    );
    let out = agent.cli_ok(&["policy", "set", other.rel(), "--mode", "enforce"]);
    assert!(
        stdout(&out).contains("enforce idle 50s interval 10s count 3"),
        "the values an `off` kept come back: {}",
        stdout(&out)
    );
}

#[test]
fn a_request_whose_client_left_before_its_turn_is_not_carried_out() {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        net::Shutdown,
        os::unix::net::UnixStream,
    };
    let parent = TestCgroup::new("clientleft");
    let left = parent.child("left");
    let stays = parent.child("stays");
    let agent = Agent::start(&parent, &["--idle", "50"]);
    let socket = agent.dirs().runtime_dir.join("control.sock");
    let request = |cgroup: &TestCgroup, idle: u32| {
        let mut stream = UnixStream::connect(&socket).expect("connect to the control socket");
        let line = serde_json::json!({"cmd": "set", "cgroup": cgroup.rel(), "idle": idle});
        stream
            .write_all(format!("{line}\n").as_bytes())
            .expect("send the request");
        stream
    };
    // While the agent is stopped, both requests wait in its queue: one client leaves, as
    // Ctrl-C on `policy set` does; the other only shuts down its sending side, as `socat`
    // does, and waits for its answer.
    agent.pause();
    drop(request(&left, 33));
    let waiting = request(&stays, 34);
    waiting.shutdown(Shutdown::Write).expect("shutdown");
    agent.signal(libc::SIGCONT);

    waiting
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut answer = String::new();
    BufReader::new(&waiting).read_line(&mut answer).unwrap();
    assert!(answer.contains("\"ok\":true"), "{answer}");
    assert_eq!(idle_of(&stays), 34);
    eventually(
        Duration::from_secs(10),
        "the skipped request's log line",
        || {
            agent
                .log()
                .contains(&format!(
                    "skipped `policy set {}`: its client left",
                    left.rel()
                ))
                .then_some(())
        },
    );
    assert_eq!(idle_of(&left), 50, "the request of the client that left");
    let policies = agent.policies();
    let listed = |cgroup: &TestCgroup| {
        policies
            .iter()
            .any(|p| p["selector"] == cgroup.display().as_str())
    };
    assert!(listed(&stays) && !listed(&left), "{policies:?}");
}

#[test]
fn runtime_policies_stop_where_a_config_would() {
    let max = keepalive_common::MAX_POLICIES as usize;
    let parent = TestCgroup::new("rtcap");
    let svc = parent.child("svc");
    let other = parent.child("other");
    // One short of the limit in the file, for cgroups that do not exist.
    let text: String = (1..max)
        .map(|i| format!("[[policy]]\ncgroup = \"{}/p{i}\"\nidle = 5\n", parent.rel()))
        .collect();
    let config = write_config(&format!("[default]\nidle = 50\n{text}"));
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);

    agent.cli_ok(&["policy", "set", svc.rel(), "--idle", "31"]);
    assert_eq!(idle_of(&svc), 31);
    let out = agent.cli(&["policy", "set", other.rel(), "--idle", "32"]);
    assert_eq!(code(&out), 2, "one beyond the limit: {}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "already select {max} cgroups and globs besides the attach cgroup, and at most {max}"
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(idle_of(&other), 50, "the refused rule set nothing");

    // Replacing a runtime rule needs no room; removing one makes room.
    agent.cli_ok(&["policy", "set", svc.rel(), "--idle", "33"]);
    assert_eq!(idle_of(&svc), 33);
    agent.cli_ok(&["policy", "unset", svc.rel()]);
    agent.cli_ok(&["policy", "set", other.rel(), "--idle", "32"]);
    assert_eq!(idle_of(&other), 32);
    let out = agent.cli(&["policy", "set", svc.rel(), "--idle", "34"]);
    assert_eq!(code(&out), 2, "full again: {}", stderr(&out));

    // Nor does replacing or masking a config policy, or a rule for the attach cgroup itself:
    // a full config can still be overridden (`--mode off`, say).
    let p1 = format!("{}/p1", parent.rel());
    agent.cli_ok(&["policy", "set", &p1, "--idle", "6"]);
    agent.cli_ok(&["policy", "unset", &p1]);
    agent.cli_ok(&["policy", "unset", &p1]);
    agent.cli_ok(&["policy", "set", parent.rel(), "--mode", "off"]);
    agent.cli_ok(&[
        "policy",
        "set",
        parent.rel(),
        "--mode",
        "enforce",
        "--idle",
        "44",
    ]);
    assert_eq!(idle_of(&parent), 44);
    let out = agent.cli(&["policy", "set", svc.rel(), "--idle", "34"]);
    assert_eq!(code(&out), 2, "still no room for another: {}", stderr(&out));
    // The overrides take no room, so the refusal does not count them either.
    assert!(
        stderr(&out).contains(&format!("already select {max} cgroups and globs")),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("`policy unset` a runtime policy"));
    // A config full on its own leaves no runtime policy to unset: room is made in the file.
    std::fs::write(
        &config,
        format!(
            "[default]\nidle = 50\n{text}[[policy]]\ncgroup = \"{}/p{max}\"\nidle = 5\n",
            parent.rel()
        ),
    )
    .unwrap();
    agent.cli_ok(&["policy", "reload"]);
    let out = agent.cli(&["policy", "set", svc.rel(), "--idle", "34"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("make room in the config file and `reload`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn policy_set_with_values_under_an_off_default_needs_a_mode() {
    let parent = TestCgroup::new("setoff");
    let svc = parent.child("svc");
    let config = write_config("[default]\nmode = \"off\"\n");
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    let out = agent.cli(&["policy", "set", svc.rel(), "--idle", "33"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("add --mode enforce"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        pair_values(&svc).0.0,
        0,
        "the refused change set nothing, and the default stays off"
    );
    agent.cli_ok(&[
        "policy",
        "set",
        svc.rel(),
        "--idle",
        "33",
        "--mode",
        "enforce",
    ]);
    assert_eq!(idle_of(&svc), 33);
}

#[test]
fn policy_set_warns_when_it_selects_no_cgroup_yet_and_refuses_a_file() {
    let parent = TestCgroup::new("settypo");
    let svc = parent.child("svc");
    let agent = Agent::start(&parent, &["--idle", "50"]);
    let stdout = |out: &Output| String::from_utf8_lossy(&out.stdout).into_owned();

    let out = agent.cli_ok(&["policy", "set", svc.rel(), "--idle", "33"]);
    assert!(!stdout(&out).contains("warning"), "{}", stdout(&out));

    let typo = format!("{}/scv", parent.rel());
    let out = agent.cli_ok(&["policy", "set", &typo, "--idle", "34"]);
    assert!(
        stdout(&out).contains(&format!("warning: /{typo} does not exist yet")),
        "{}",
        stdout(&out)
    );
    let pattern = format!("{}/web-*", parent.rel());
    let out = agent.cli_ok(&["policy", "set", &pattern, "--idle", "35"]);
    assert!(
        stdout(&out).contains(&format!("warning: /{pattern} matches no cgroup yet")),
        "{}",
        stdout(&out)
    );
    let list = stdout(&agent.cli_ok(&["policy", "list"]));
    for pending in [
        format!("pending: /{typo} (runtime; does not exist yet)"),
        format!("pending: /{pattern} (runtime; matches no cgroup yet)"),
    ] {
        assert!(list.contains(&pending), "{pending}: {list}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&agent.cli_ok(&["policy", "list", "--json"]).stdout).unwrap();
    assert_eq!(json["pending"].as_array().map(Vec::len), Some(2), "{json}");
    assert!(json.get("masked").is_none(), "{json}");
    let _web = parent.child("web-1");
    eventually(
        Duration::from_secs(10),
        "the pattern to leave the pending list once it matches",
        || {
            let list = stdout(&agent.cli_ok(&["policy", "list"]));
            (!list.contains(&format!("pending: /{pattern}"))).then_some(())
        },
    );

    // A file can never become a cgroup: refused, as `run --cgroup` refuses it.
    let before = agent.policies();
    let file = format!("{}/cgroup.procs", svc.rel());
    for path in [file.clone(), format!("{file}/x")] {
        let out = agent.cli(&["policy", "set", &path, "--idle", "36"]);
        assert_eq!(code(&out), 2, "{path}: {}", stderr(&out));
        assert!(stderr(&out).contains("is a file"), "{}", stderr(&out));
    }
    assert_eq!(agent.policies(), before, "the refused set changed nothing");
    assert_eq!(idle_of(&svc), 33);
}

#[test]
fn control_characters_in_cgroup_paths_are_escaped_by_policy_commands() {
    let parent = TestCgroup::new("ctrlpolicy");
    // A name a delegated user could give a cgroup: raw, it would reset the terminal.
    let odd = parent.child("a\u{1b}cb");
    let agent = Agent::start(&parent, &[]);
    let escaped = |rel: &str| format!("/{rel}").replace('\u{1b}', "\\u{1b}");
    let shown = |out: &Output| {
        let text = format!("{}{}", stdout(out), stderr(out));
        assert!(!text.contains('\u{1b}'), "{text:?}");
        text
    };

    let out = shown(&agent.cli_ok(&["policy", "set", odd.rel(), "--idle", "33"]));
    assert!(
        out.contains(&format!("set {}: ", escaped(odd.rel()))),
        "{out}"
    );
    assert_eq!(idle_of(&odd), 33);
    // Not there yet: the warning and the pending line name it too.
    let later = format!("{}/later\u{1b}c", parent.rel());
    let out = shown(&agent.cli_ok(&["policy", "set", &later, "--idle", "34"]));
    assert!(
        out.contains(&format!("warning: {} does not exist yet", escaped(&later))),
        "{out}"
    );
    let list = shown(&agent.cli_ok(&["policy", "list"]));
    assert!(
        list.lines()
            .any(|line| line.contains(&escaped(odd.rel())) && line.contains("33s")),
        "{list}"
    );
    assert!(
        list.contains(&format!("pending: {} (runtime; ", escaped(&later))),
        "{list}"
    );
    // An error names it the same way.
    let never = format!("{}/never\u{1b}c", parent.rel());
    let out = agent.cli(&["policy", "unset", &never]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        shown(&out).contains(&format!("no policy is set for {}", escaped(&never))),
        "{}",
        stderr(&out)
    );
}

#[test]
fn policy_commands_naming_another_state_directory_are_refused_and_change_nothing() {
    let cg = TestCgroup::new("otherstate");
    let agent = Agent::start(&cg, &["--idle", "41"]);
    // The agent's control socket, but the state directory of a second agent.
    let other = AgentDirs {
        state_dir: agent.state_dir.with_file_name(unique("other")),
        ..agent.dirs()
    };
    let out = other.cli(&["policy", "set", cg.rel(), "--idle", "12"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "keeps its state in {}, not {}",
            agent.state_dir.display(),
            other.state_dir.display()
        )) && err.contains("--runtime-dir"),
        "{err}"
    );
    assert_eq!(idle_of(&cg), 41, "nothing changed");
    // Without --state-dir, or with its own, the agent takes it.
    let own = agent
        .dirs()
        .command(&["policy", "set", cg.rel(), "--idle", "12"]);
    assert!(agent.dirs().output(own).status.success());
    assert_eq!(idle_of(&cg), 12);
    let mut plain = std::process::Command::new(keepalive_tests::agent_bin());
    plain
        .arg("--runtime-dir")
        .arg(&agent.runtime_dir)
        .args(["policy", "set", cg.rel(), "--idle", "13"])
        .env_remove("KEEPALIVE_STATE_DIR");
    assert!(agent.dirs().output(plain).status.success());
    assert_eq!(idle_of(&cg), 13);
}

#[test]
fn a_reload_without_the_default_config_file_read_at_start_keeps_the_running_policy() {
    let cg = TestCgroup::new("gone");
    // The agent's own /etc holds only keepalive-agent/, a directory of this test's.
    let temp = TempDir::new("etc");
    let etc = temp.path();
    let file = etc.join("config.toml");
    fs::write(&file, "[default]\nidle = 33\n").unwrap();
    let source = CString::new(etc.as_os_str().as_encoded_bytes()).unwrap();
    let dirs = AgentDirs::new();
    let mut cmd = dirs.command(&["run", "--cgroup", cg.path().to_str().unwrap()]);
    private_mounts(&mut cmd, move || {
        hide_with_tmpfs(c"/etc")?;
        mkdir(c"/etc/keepalive-agent")?;
        bind_mount(&source, c"/etc/keepalive-agent")
    });
    let agent = Agent::start_command(&dirs, cmd);
    assert_eq!(idle_of(&cg), 33);

    // Moved aside during a redeploy, say: a reload must not fall back to the built-in default.
    fs::remove_file(&file).unwrap();
    let out = agent.cli(&["policy", "reload"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("/etc/keepalive-agent/config.toml: cannot read")
            && err.contains("it was read at start: restore it, or write one with only its attach and state_dir lines")
            && err.ends_with("(rejected, the previous policies stay)\n"),
        "{err}"
    );
    assert_eq!(idle_of(&cg), 33, "the running policy stays");

    // An empty file asks for the built-in default (here, where `--cgroup` sets the attach
    // cgroup and the file set no state_dir).
    fs::write(&file, "").unwrap();
    agent.cli_ok(&["policy", "reload"]);
    assert_eq!(idle_of(&cg), 60);
}

/// A default config path that leads through a symbolic link to nothing (config management's,
/// with its target missing or not mounted yet) is refused, not taken for "no file": the
/// built-in default would silently drop the file's policies. `run` exits 1, which the unit
/// retries, so the agent starts once the target appears.
#[test]
fn a_default_config_behind_a_dangling_symbolic_link_is_refused() {
    let cg = TestCgroup::new("dangling");
    let dirs = AgentDirs::new();
    let run = ["run", "--cgroup", cg.path().to_str().unwrap()];
    let check = ["check", "--cgroup", cg.path().to_str().unwrap()];
    // No file at all: the built-in default, as documented.
    let out = in_private_mounts(&dirs, dirs.command(&check), || hide_with_tmpfs(c"/etc"));
    assert!(
        stdout(&out).contains("no /etc/keepalive-agent/config.toml: the built-in default"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // The file, or its directory, is a link to what is not there.
    let file_link = || {
        hide_with_tmpfs(c"/etc")?;
        mkdir(c"/etc/keepalive-agent")?;
        symlink(c"/srv/ka/config.toml", c"/etc/keepalive-agent/config.toml")
    };
    let dir_link = || {
        hide_with_tmpfs(c"/etc")?;
        symlink(c"/srv/ka", c"/etc/keepalive-agent")
    };
    // `run` refuses (1); `check` reports it and is not ready (8); `detach` without
    // `--state-dir`, which reads the file for `state_dir`, refuses as `run` does (1).
    let mut detach_by_config = Command::new(agent_bin());
    detach_by_config
        .arg("--runtime-dir")
        .arg(&dirs.runtime_dir)
        .arg("detach");
    for (out, link, want) in [
        (
            agent_in_private_mounts(&dirs, &run, file_link),
            "/etc/keepalive-agent/config.toml",
            1,
        ),
        (
            agent_in_private_mounts(&dirs, &run, dir_link),
            "/etc/keepalive-agent",
            1,
        ),
        (
            in_private_mounts(&dirs, dirs.command(&check), file_link),
            "/etc/keepalive-agent/config.toml",
            8,
        ),
        (
            in_private_mounts(&dirs, detach_by_config, dir_link),
            "/etc/keepalive-agent",
            1,
        ),
    ] {
        let text = stdout(&out) + &stderr(&out);
        assert_eq!(code(&out), want, "{text}");
        assert!(
            text.contains(&format!(
                "/etc/keepalive-agent/config.toml: cannot read: {link} is a symbolic link to \
                 /srv/ka"
            )) && text.contains("which does not exist"),
            "{text}"
        );
        if want == 8 {
            assert!(text.contains("restore the link's target"), "{text}");
        }
        assert_eq!(sockops_attachments(cg.path()), 0);
    }
}

#[test]
fn a_reload_applies_the_policy_and_warns_about_settings_it_cannot_change() {
    let cg = TestCgroup::new("reloadwarn");
    let config = write_config("max_tracked_sockets = 4096\n[default]\nidle = 50\n");
    let agent = Agent::start(
        &cg,
        &[
            "--config",
            config.to_str().unwrap(),
            "--max-tracked-cgroups",
            "100",
        ],
    );
    // The flags (--cgroup, --max-tracked-cgroups) win over the file, so the file's attach and
    // max_tracked_cgroups change nothing: each is named as taken the place of, not as a change.
    fs::write(
        &*config,
        "attach = \"/\"\nmax_tracked_sockets = 8192\nmax_tracked_cgroups = 200\n\
         metrics = \"127.0.0.1:9\"\n[default]\nidle = 51\n",
    )
    .unwrap();
    let out = agent.cli_ok(&["policy", "reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    for warning in [
        "warning: metrics changed in the config (off -> 127.0.0.1:9); it takes effect at the \
         next restart"
            .to_owned(),
        // A hint to copy as it stands: this agent's state, not the default.
        format!(
            "warning: max_tracked_sockets changed in the config (4096 -> 8192); the pinned maps \
             keep their size until `keepalive-agent --state-dir {} detach` and a restart",
            agent.dirs().state_dir.display()
        ),
        format!(
            "warning: --cgroup {} given to `run` takes the place of attach = \"/\" at {}:1",
            cg.display(),
            config.display()
        ),
        format!(
            "warning: --max-tracked-cgroups 100 given to `run` takes the place of \
             max_tracked_cgroups = 200 at {}",
            config.display()
        ),
    ] {
        assert!(said.contains(&warning), "{warning} in:\n{said}");
    }
    assert_eq!(said.matches("warning: ").count(), 4, "{said}");
    assert_eq!(idle_of(&cg), 51, "the policy itself is reloaded");
    let log = agent.log();
    let warned = log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("changed in the config"))
        .count();
    assert_eq!(warned, 2, "{log}");
}

/// A reload that moves `attach` and its policies with it is rejected (the policies fall outside
/// the running attach cgroup), and says that the move is why and what it takes.
#[test]
fn a_reload_that_moves_attach_with_its_policies_says_what_moving_takes() {
    let cg = TestCgroup::new("reloadattach");
    let (a, b) = (cg.child("a"), cg.child("b"));
    let file = |attach: &TestCgroup, idle: u32| {
        format!(
            "attach = \"{0}\"\n[default]\nidle = 50\n[[policy]]\ncgroup = \"{0}/svc\"\nidle = {idle}\n",
            attach.rel()
        )
    };
    let config = write_config(&file(&a, 60));
    let agent = Agent::start_raw(
        &AgentDirs::new(),
        &["run", "--config", config.to_str().unwrap()],
    );
    fs::write(&*config, file(&b, 61)).unwrap();
    let out = agent.cli(&["policy", "reload"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let said = stderr(&out);
    for part in [
        format!(
            "attach changed in the config ({} -> {})",
            a.display(),
            b.display()
        ),
        format!(
            "moving enforcement takes stopping the agent, `keepalive-agent --state-dir {} \
             detach` and a start",
            agent.dirs().state_dir.display()
        ),
        format!("until then the policies must stay within {}", a.display()),
        format!("{}:4:", config.display()),
    ] {
        assert!(said.contains(&part), "{part} in:\n{said}");
    }
    // Nothing of it applied: the running policy stays.
    let policies = agent.cli_ok(&["policy", "list", "--json"]);
    let text = String::from_utf8_lossy(&policies.stdout);
    assert!(text.contains(&format!("{}/svc", a.rel())), "{text}");
    assert!(!text.contains(&format!("{}/svc", b.rel())), "{text}");
    assert_eq!(idle_of(&a), 50);
}

/// A reload that changes `attach` or `state_dir` is rejected whole: a start with that file
/// would be refused, and taking up its policies alone would hide that until then.
#[test]
fn a_reload_that_changes_attach_or_state_dir_is_rejected_whole() {
    let cg = TestCgroup::new("reloadmove");
    let inner = cg.child("inner");
    let dirs = AgentDirs::new();
    let file = |attach: &TestCgroup, state: &Path, idle: u32| {
        format!(
            "attach = \"{}\"\nstate_dir = \"{}\"\n[default]\nidle = {idle}\n",
            attach.rel(),
            state.display()
        )
    };
    let config = write_config(&file(&inner, &dirs.state_dir, 50));
    // The state directory from the file alone: a --state-dir flag would win over it.
    let mut cmd = std::process::Command::new(agent_bin());
    cmd.arg("--runtime-dir")
        .arg(&dirs.runtime_dir)
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("KEEPALIVE_STATE_DIR");
    let agent = Agent::start_command(&dirs, cmd);
    assert_eq!(idle_of(&inner), 50);
    let rejected = |text: &str, part: &str| {
        fs::write(&*config, text).unwrap();
        let out = agent.cli(&["policy", "reload"]);
        let said = stderr(&out);
        assert_eq!(code(&out), 2, "{said}");
        for part in [
            part,
            "the reload is rejected, as a start with this file would be",
        ] {
            assert!(said.contains(part), "{part} in:\n{said}");
        }
        assert_eq!(idle_of(&inner), 50, "nothing of it applied");
    };
    // Its policies stay within the running attach cgroup: only the move is in the way.
    rejected(
        &file(&cg, &dirs.state_dir, 51),
        &format!(
            "{}:1: attach changed in the config ({} -> {})",
            config.display(),
            inner.display(),
            cg.display()
        ),
    );
    let elsewhere = Path::new("/sys/fs/bpf/ka-elsewhere");
    rejected(
        &file(&inner, elsewhere, 51),
        &format!(
            "{}:2: state_dir changed in the config ({} -> {})",
            config.display(),
            dirs.state_dir.display(),
            elsewhere.display()
        ),
    );
    // Both: both are named, at the first one's line.
    rejected(
        &file(&cg, elsewhere, 51),
        &format!(
            "{}:1: attach changed in the config ({} -> {}); moving enforcement takes stopping \
             the agent, `keepalive-agent --state-dir {} detach` and a start (a start alone is \
             refused, exit 7); state_dir changed in the config ({} -> {})",
            config.display(),
            inner.display(),
            cg.display(),
            dirs.state_dir.display(),
            dirs.state_dir.display(),
            elsewhere.display()
        ),
    );
    assert!(!elsewhere.exists());
    // Back to the running ones, the reload goes through.
    fs::write(&*config, file(&inner, &dirs.state_dir, 52)).unwrap();
    agent.cli_ok(&["policy", "reload"]);
    assert_eq!(idle_of(&inner), 52);
}

#[test]
fn user_timeout_from_the_config_is_visible_with_getsockopt_and_0_drops_it() {
    let cg = TestCgroup::new("ut");
    let none = cg.child("none");
    let config = write_config(&format!(
        "[default]\nuser_timeout = \"45s\"\n[[policy]]\ncgroup = \"{}\"\nuser_timeout = 0\n",
        none.rel()
    ));
    let agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let mut pair = Proc::sock(&["pair", "6"], &cg);
    let out = pair.read();
    assert_eq!(out["client"]["user_timeout"], 45_000, "{out}");
    assert_eq!(out["server"]["user_timeout"], 45_000, "{out}");
    // A policy's 0 is "none": the kernel's behaviour, not the default's 45 s.
    let out = Proc::sock(&["pair", "6"], &none).read();
    assert_eq!(out["client"]["user_timeout"], 0, "{out}");
    assert_eq!(values(&out["client"]).0, 1, "keepalive itself stays: {out}");
    // So is `policy set --user-timeout 0`, on existing connections too.
    agent.cli_ok(&["policy", "set", cg.rel(), "--user-timeout", "0"]);
    for sock in pair.report() {
        assert_eq!(sock["user_timeout"], 0, "{sock}");
    }
}

/// `run --cgroup <cg> --config <config>` in the foreground, for configs the agent refuses.
fn run_with_config(dirs: &AgentDirs, cg: &TestCgroup, config: &Path) -> Output {
    dirs.cli(&[
        "run",
        "--cgroup",
        cg.path().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])
}

#[test]
fn a_bad_config_is_rejected_with_file_line_and_reason_and_nothing_is_attached() {
    let cg = TestCgroup::new("badconfig");
    let dirs = AgentDirs::new();
    let file = format!(
        "[[policy]]\ncgroup = \"{}\"\n[[policy]]\ncgroup = \"{}/cgroup.procs\"\n",
        cg.rel(),
        cg.rel()
    );
    let attach = format!("\nattach = \"{}/cgroup.procs\"\n", cg.rel());
    for (text, line, reason) in [
        (file.as_str(), 4, "is a file"),
        (attach.as_str(), 2, "attach: cgroup"),
        ("[default]\nidle = 5\nidel = 6\n", 3, "idel"),
        ("[default]\ncount = \"five\"\n", 2, "integer"),
        ("[default]\n\ninterval = 99999\n", 3, "1 to 32767"),
        (
            "[[policy]]\ncgroup = \"a\"\n[[policy]]\ncgroup = \"a\"\n",
            4,
            "duplicate",
        ),
        (
            "[default]\nmode = \"lockdown\"\n",
            2,
            "enforce, fill, off, lock",
        ),
        (
            "[default]\nmode = \"off\"\n[[policy]]\ncgroup = \"a\"\nidle = 30\n",
            3,
            "would enforce nothing",
        ),
    ] {
        let config = write_config(text);
        let out = run_with_config(&dirs, &cg, &config);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{text:?}: {err}");
        assert!(
            err.contains(&format!("{}:{line}:", config.display())),
            "{text:?}: {err}"
        );
        assert!(err.contains(reason), "{text:?}: {err}");
    }
    assert_eq!(sockops_attachments(cg.path()), 0);
    assert!(!dirs.state_dir.exists());
}

/// At boot the attach cgroup may not exist yet (kubelet creates `kubepods.slice`), and the unit
/// retries exit 4 every 2 s; a config error must not hide behind that until it appears.
#[test]
fn a_config_error_is_reported_before_a_missing_attach_cgroup() {
    let cg = TestCgroup::new("notyet");
    let dirs = AgentDirs::new();
    let missing = cg.path().join("later");
    let config = write_config(&format!(
        "[default]\nidle = 33\n\n[[policy]]\ncgroup = \"{}/other\"\nidle = 34\n",
        cg.rel()
    ));
    let run = || {
        dirs.cli(&[
            "run",
            "--cgroup",
            missing.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
    };
    let out = run();
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(
        err.contains(&format!("{}:4:", config.display())) && err.contains("outside the attach"),
        "{err}"
    );
    std::fs::write(&config, "[default]\nidle = 33\n").unwrap();
    let out = run();
    assert_eq!(code(&out), 4, "then the missing cgroup: {}", stderr(&out));
    assert!(!dirs.state_dir.exists());
}

#[test]
fn a_config_file_others_could_write_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let cg = TestCgroup::new("configmode");
    let dirs = AgentDirs::new();
    let config = write_config("[default]\nidle = 33\n");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run_with_config(&dirs, &cg, &config);
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(
        err.contains("writable by users other than root") && err.contains("chmod go-w"),
        "{err}"
    );
    assert_eq!(sockops_attachments(cg.path()), 0);
}

/// Only a regular file is read as the config, and only so much of it: a FIFO without a writer
/// held `run` forever, `/dev/null` read as an empty file (the built-in default, every policy
/// gone), and `/dev/zero` filled memory (not tried here: a regression would take the host's).
#[test]
fn a_config_path_to_anything_but_a_regular_file_is_refused_at_once() {
    let cg = TestCgroup::new("configkind");
    let dirs = AgentDirs::new();
    let dir = TempDir::new("configkind");
    let fifo = dir.path().join("fifo.toml");
    let name = CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
    let big = dir.path().join("big.toml");
    fs::File::create(&big)
        .and_then(|file| file.set_len(17 << 20))
        .expect("a sparse file of 17 MiB");
    for (path, kind) in [
        (fifo.as_path(), "it is a FIFO, not a regular file"),
        (Path::new("/dev/null"), "it is a character device"),
        (dir.path(), "it is a directory"),
        (big.as_path(), "larger than 16 MiB"),
    ] {
        let out = run_with_config(&dirs, &cg, path);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{}: {err}", path.display());
        assert!(
            err.contains(&format!("{}: cannot read: {kind}", path.display())),
            "{err}"
        );
    }
    assert_eq!(sockops_attachments(cg.path()), 0);
    assert!(!dirs.state_dir.exists());
}

/// `run` refuses a config file root does not own. `check` says so and still validates what the
/// file says, so one run shows everything to fix before a deploy.
#[test]
fn a_config_file_root_does_not_own_is_refused_and_check_still_validates_it() {
    let cg = TestCgroup::new("configowner");
    let dirs = AgentDirs::new();
    let good = write_config("[default]\nidle = 33\n");
    let bad = write_config("[default]\nidle = 5\nidel = 6\n");
    for config in [&good, &bad] {
        std::os::unix::fs::chown(config, Some(65534), None).unwrap();
    }
    let out = run_with_config(&dirs, &cg, &good);
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(
        err.contains("owned by uid 65534, not root") && err.contains("chown root"),
        "{err}"
    );
    assert_eq!(sockops_attachments(cg.path()), 0);
    for (config, content) in [
        (&good, "otherwise".to_owned()),
        (&bad, format!("also: {}:3:", bad.display())),
    ] {
        let (rc, item) = check_config(&dirs, &cg, config);
        let detail = item["detail"].as_str().unwrap();
        assert_eq!((rc, &item["status"]), (8, &"fail".into()), "{item}");
        assert!(
            detail.contains("owned by uid 65534, not root") && detail.contains(&content),
            "{item}"
        );
    }
}

/// A directory that holds the config, or a symbolic link to it, or that such a link leads
/// through, and belongs to another user lets that user replace the file: refused as a file
/// root does not own is, by `run` and by `check`.
#[test]
fn a_config_in_a_directory_another_user_owns_is_refused() {
    use std::os::unix::fs::{PermissionsExt as _, chown, symlink};
    let cg = TestCgroup::new("configdir");
    let dirs = AgentDirs::new();
    let owned = TempDir::new("configdir");
    let file = owned.path().join("config.toml");
    fs::write(&file, "[default]\nidle = 33\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    chown(owned.path(), Some(65534), None).unwrap();
    // A link to it from a root-owned directory, and a link in it to a root-owned file.
    let linked = TempDir::new("configlink");
    let to_file = linked.path().join("config.toml");
    symlink(&file, &to_file).unwrap();
    let elsewhere = write_config("[default]\nidle = 33\n");
    let in_owned = owned.path().join("link.toml");
    symlink(&elsewhere, &in_owned).unwrap();
    let says = format!(
        "the directory {} on the way to it belongs to uid 65534",
        owned.path().display()
    );
    for config in [&file, &to_file, &in_owned] {
        let out = run_with_config(&dirs, &cg, config);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{err}");
        assert!(err.contains(&says) && err.contains("chown root"), "{err}");
    }
    assert_eq!(sockops_attachments(cg.path()), 0);
    assert!(!dirs.state_dir.exists());
    let (rc, item) = check_config(&dirs, &cg, &to_file);
    assert_eq!((rc, &item["status"]), (8, &"fail".into()), "{item}");
    assert!(item["detail"].as_str().unwrap().contains(&says), "{item}");
    // Root's again: nothing else was wrong.
    chown(owned.path(), Some(0), None).unwrap();
    for config in [&file, &to_file, &in_owned] {
        let (_, item) = check_config(&dirs, &cg, config);
        assert_eq!(item["status"], "ok", "{item}");
    }
}

/// `check --json --config <config> --cgroup <cg>`: its exit code and its config item.
fn check_config(dirs: &AgentDirs, cg: &TestCgroup, config: &Path) -> (i32, serde_json::Value) {
    let out = dirs.cli(&[
        "check",
        "--json",
        "--config",
        config.to_str().unwrap(),
        "--cgroup",
        cg.path().to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (code(&out), check_item(&report, "config").clone())
}

/// Listeners carry the program's keepalive so accepted sockets inherit it; a policy change
/// must reach connections accepted later on a listener that already exists.
#[test]
fn a_policy_change_reaches_connections_accepted_on_an_existing_listener() {
    let parent = TestCgroup::new("listener");
    let svc = parent.child("svc");
    let client_cg = parent.child("client");
    let config = write_config("[default]\nidle = 50\n");
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    let mut server = Proc::sock(&["listen", "127.0.0.1:0", "4"], &svc);
    let port = server.read()["port"].as_u64().unwrap();
    let target = format!("127.0.0.1:{port}");
    let mut accept = |agent_args: Option<&[&str]>| {
        if let Some(args) = agent_args {
            agent.cli_ok(args);
        }
        let mut client = Proc::sock(&["connect", &target], &client_cg);
        client.read();
        let accepted = server.read();
        values(&accepted["accepted"])
    };
    assert_eq!(accept(None), (1, 50, 10, 5));
    // enforce -> fill with other values: the program's own keepalive on the listener is not
    // the application's, so the new values apply.
    let fill = ["policy", "set", svc.rel(), "--mode", "fill", "--idle", "31"];
    assert_eq!(accept(Some(&fill)).1, 31);
    // -> off: the program takes its keepalive off the listener again. (The timer values it
    // set stay on the listener; they matter only if the application enables keepalive.)
    let off = ["policy", "set", svc.rel(), "--mode", "off"];
    assert_eq!(accept(Some(&off)).0, 0);
    // -> back to the default.
    assert_eq!(
        accept(Some(&["policy", "unset", svc.rel()])),
        (1, 50, 10, 5)
    );
}

#[test]
fn dropping_the_user_timeout_resets_it_on_sockets_the_program_set() {
    let cg = TestCgroup::new("utdrop");
    let config = write_config("[default]\nuser_timeout = \"30s\"\n");
    let mut agent = Agent::start(&cg, &["--config", config.to_str().unwrap()]);
    let mut pair = Proc::sock(&["pair", "4"], &cg);
    assert_eq!(pair.read()["client"]["user_timeout"], 30_000);
    std::fs::write(&config, "[default]\nidle = 45\n").unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_notify("READY=1", Duration::from_secs(10));
    for sock in pair.report() {
        assert_eq!(sock["user_timeout"], 0, "{sock}");
        assert_eq!(sock["idle"], 45, "{sock}");
    }
}

#[test]
fn enforce_after_fill_leaves_the_applications_own_user_timeout() {
    let cg = TestCgroup::new("utapp");
    let agent = Agent::start(&cg, &[]);
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "fill", "--idle", "50"]);
    // An application with its own keepalive and user timeout: `fill` keeps both.
    let mut pair = Proc::sock(
        &[
            "pair",
            "4",
            "--keepalive",
            "99",
            "--user-timeout-after",
            "7000",
        ],
        &cg,
    );
    let client = |pair: &mut Proc| pair.report().swap_remove(0);
    pair.read();
    agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "fill", "--idle", "51"]);
    let kept = client(&mut pair);
    assert_eq!(
        (kept["idle"].as_u64(), kept["user_timeout"].as_u64()),
        (Some(99), Some(7000))
    );
    // `enforce` without a user timeout takes over keepalive; the user timeout was never the
    // program's, so it stays the application's.
    agent.cli_ok(&[
        "policy",
        "set",
        cg.rel(),
        "--mode",
        "enforce",
        "--idle",
        "52",
    ]);
    let enforced = client(&mut pair);
    assert_eq!(enforced["idle"], 52, "{enforced}");
    assert_eq!(enforced["user_timeout"], 7000, "{enforced}");
}

#[test]
fn fill_drops_its_own_user_timeout_under_keepalive_the_application_set_later() {
    let cg = TestCgroup::new("utkept");
    let agent = Agent::start(&cg, &[]);
    let fill = ["policy", "set", cg.rel(), "--mode", "fill", "--idle", "50"];
    let with_timeout = [&fill[..], &["--user-timeout", "20s"]].concat();
    agent.cli_ok(&with_timeout);
    // The program sets its values and user timeout at ESTABLISHED; then the application
    // switches on keepalive of its own (as Go does), which `fill` keeps from then on.
    let mut pair = Proc::sock(&["pair", "4", "--keepalive-after", "99"], &cg);
    let client = |pair: &mut Proc| pair.report().swap_remove(0);
    pair.read();
    let before = client(&mut pair);
    assert_eq!(
        (before["idle"].as_u64(), before["user_timeout"].as_u64()),
        (Some(99), Some(20_000))
    );
    // The user timeout was never the application's: a policy without one takes it back.
    agent.cli_ok(&[&fill[..], &["--user-timeout", "0"]].concat());
    let after = client(&mut pair);
    assert_eq!(
        (after["idle"].as_u64(), after["user_timeout"].as_u64()),
        (Some(99), Some(0)),
        "{after}"
    );
    let row = &agent.status()["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["direction"] == "outbound")
        .cloned()
        .unwrap();
    assert_eq!(
        (&row["app_owned"], &row["user_timeout"]),
        (&true.into(), &serde_json::Value::Null),
        "{row}"
    );
}

/// `policy set CG --mode fill --idle IDLE`, with `--user-timeout` when given.
fn set_fill(agent: &Agent, cg: &TestCgroup, idle: &str, user_timeout: Option<&str>) {
    let mut args = vec!["policy", "set", cg.rel(), "--mode", "fill", "--idle", idle];
    // None: no user timeout, also where the policy before had one.
    args.extend(["--user-timeout", user_timeout.unwrap_or("0")]);
    agent.cli_ok(&args);
}

#[test]
fn fill_moves_its_own_user_timeout_with_the_policy_under_keepalive_the_application_set_later() {
    let cg = TestCgroup::new("utmoved");
    let agent = Agent::start(&cg, &[]);
    let fill = |idle: &str, user_timeout: Option<&str>| set_fill(&agent, &cg, idle, user_timeout);
    fill("50", Some("20s"));
    let mut pair = Proc::sock(&["pair", "4", "--keepalive-after", "99"], &cg);
    pair.read();
    let mut client = || {
        let client = pair.report().swap_remove(0);
        (client["idle"].as_u64(), client["user_timeout"].as_u64())
    };
    assert_eq!(client(), (Some(99), Some(20_000)));
    // The application's keepalive values stay; the user timeout is still the program's, so it
    // follows each policy: another value, the same value again, then none.
    fill("51", Some("30s"));
    assert_eq!(client(), (Some(99), Some(30_000)));
    fill("52", Some("30s"));
    assert_eq!(client(), (Some(99), Some(30_000)));
    fill("53", None);
    assert_eq!(client(), (Some(99), Some(0)));
    // From then on the socket has no user timeout of the program's to follow.
    fill("54", Some("40s"));
    assert_eq!(client(), (Some(99), Some(0)));
}

#[test]
fn exact_paths_outrank_globs_also_across_runtime_and_config() {
    let parent = TestCgroup::new("precedence");
    let db = parent.child("db-main");
    let web = parent.child("web");
    let config = write_config(&format!(
        "[[policy]]\ncgroup = \"{}\"\nidle = 44\n[[policy]]\ncgroup = \"{}/*\"\nidle = 55\n",
        db.rel(),
        parent.rel()
    ));
    let agent = Agent::start(&parent, &["--config", config.to_str().unwrap()]);
    assert_eq!((idle_of(&db), idle_of(&web)), (44, 55));
    // Unset of a runtime policy says which comes back: the config's for the path, or its glob's.
    for (cgroup, idle, selector, line) in [
        (&db, 44, db.display(), 1),
        (&web, 55, format!("{}/*", parent.display()), 4),
    ] {
        agent.cli_ok(&["policy", "set", cgroup.rel(), "--idle", "77"]);
        assert_eq!(idle_of(cgroup), 77);
        let out = agent.cli_ok(&["policy", "unset", cgroup.rel()]);
        assert!(
            stdout(&out).contains(&format!(
                "removed the runtime policy for {}; the policy for {selector} ({}:{line}) \
                 applies to it now",
                cgroup.display(),
                config.display()
            )),
            "{}",
            stdout(&out)
        );
        assert_eq!(idle_of(cgroup), idle);
    }
    // A runtime glob neither overrides nor masks the config's exact path.
    let glob = format!("{}/*", parent.rel());
    agent.cli_ok(&["policy", "set", &glob, "--idle", "66"]);
    assert_eq!((idle_of(&db), idle_of(&web)), (44, 66));
    agent.cli_ok(&["policy", "unset", &glob]);
    let out = agent.cli(&["policy", "unset", &glob]);
    assert!(
        out.status.success(),
        "mask the config glob: {}",
        stderr(&out)
    );
    assert!(
        stdout(&out).starts_with(&format!(
            "the config's policy for /{glob} is unset until the next reload; the cgroups it \
             matched inherit"
        )),
        "{}",
        stdout(&out)
    );
    assert_eq!((idle_of(&db), idle_of(&web)), (44, 60));
    // Once masked, a retried unset changes nothing.
    let out = agent.cli(&["policy", "unset", &glob]);
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(err.contains("already unset"), "{err}");
    assert_eq!((idle_of(&db), idle_of(&web)), (44, 60));
    // Nor can a path the masked glob decided be masked again on its own.
    let out = agent.cli(&["policy", "unset", web.rel()]);
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(
        err.contains(&format!(
            "{} has no policy to unset: the config's policy for /{glob} that selected it is \
             unset already",
            web.display()
        )),
        "{err}"
    );
    // `policy list` names the masked glob as masked, not as a rule that selects nothing, also
    // beside a path of its that is masked as well.
    agent.cli_ok(&["policy", "unset", db.rel()]);
    let out = agent.cli_ok(&["policy", "list"]);
    let list = stdout(&out);
    assert!(!list.contains("pending"), "{list}");
    for masked in [format!("/{glob}"), db.display()] {
        assert!(
            list.contains(&format!("{masked} (unset at runtime until the next reload")),
            "{list}"
        );
    }
    assert_eq!((idle_of(&db), idle_of(&web)), (60, 60));
    // A path the config's glob selects can be masked on its own, by name, also before it
    // exists; one the glob does not select (it matches only its own depth) cannot.
    agent.cli_ok(&["policy", "reload"]);
    assert_eq!((idle_of(&db), idle_of(&web)), (44, 55));
    agent.cli_ok(&["policy", "unset", web.rel()]);
    assert_eq!((idle_of(&db), idle_of(&web)), (44, 60));
    let later = format!("{}/later", parent.rel());
    agent.cli_ok(&["policy", "unset", &later]);
    // Until it exists, the mask waits, and says it is one.
    let out = agent.cli_ok(&["policy", "list"]);
    assert!(
        stdout(&out).contains(&format!(
            "pending: {}/later (unset at runtime until the next reload; ",
            parent.display()
        )),
        "{}",
        stdout(&out)
    );
    assert_eq!(idle_of(&parent.child("later")), 60);
    let out = agent.cli(&["policy", "unset", &format!("{}/x", web.rel())]);
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(err.contains("no policy is set"), "{err}");
}

#[test]
fn config_policies_for_cgroups_that_do_not_exist_are_warned_about_by_check_run_and_reload() {
    let cg = TestCgroup::new("typo");
    let svc = cg.child("svc");
    let text = format!(
        "[[policy]]\ncgroup = \"{0}/svc\"\nidle = 31\n\n[[policy]]\ncgroup = \"{0}/scv\"\n\
         idle = 32\n",
        cg.rel()
    );
    let config = write_config(&text);
    let path = config.to_str().unwrap();
    let typo = format!("/{}/scv (policy at {path}:5) does not exist yet", cg.rel());
    // `check` passes the file, with a warning for the misspelt path alone.
    let out = AgentDirs::new().cli(&[
        "check",
        "--json",
        "--config",
        path,
        "--cgroup",
        cg.path().to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let item = check_item(&report, "config");
    let detail = item["detail"].as_str().unwrap();
    assert_eq!(item["status"], "warn", "{item}");
    assert!(detail.contains(&typo), "{detail}");
    assert!(!detail.contains("/svc ("), "{detail}");
    // `run` logs it at start.
    let agent = Agent::start(&cg, &["--config", path]);
    let warned = |log: &str, what: &str| {
        log.lines()
            .filter(|line| line.contains("WARN") && line.contains(what))
            .count()
    };
    assert_eq!(warned(&agent.log(), &typo), 1, "{}", agent.log());
    assert_eq!(idle_of(&svc), 31);
    // `policy reload` prints one for each such policy of the new file: the typo is fixed, and
    // a glob matches nothing.
    fs::write(
        &*config,
        format!(
            "{}[[policy]]\ncgroup = \"{}/web-*\"\nidle = 33\n",
            text.replace("/scv", "/svc2"),
            cg.rel()
        ),
    )
    .unwrap();
    let _svc2 = cg.child("svc2");
    let out = agent.cli_ok(&["policy", "reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    let glob = format!(
        "/{}/web-* (policy at {path}:8) matches no cgroup yet",
        cg.rel()
    );
    assert!(said.contains(&format!("warning: {glob}")), "{said}");
    assert_eq!(said.matches("warning: ").count(), 1, "{said}");
    assert_eq!(warned(&agent.log(), &glob), 1, "{}", agent.log());
}

#[test]
fn a_config_glob_that_decides_no_cgroup_it_matches_is_warned_about_at_run_and_reload() {
    let cg = TestCgroup::new("shadow");
    let (a, b) = (cg.child("a"), cg.child("b"));
    // `[ab]` comes after `*`, which decides b; a has a policy by path.
    let rules = |globs: [(&str, u32); 2]| {
        let mut text = format!("[[policy]]\ncgroup = \"{}/a\"\nidle = 20\n", cg.rel());
        for (glob, idle) in globs {
            text.push_str(&format!(
                "\n[[policy]]\ncgroup = \"{}/{glob}\"\nidle = {idle}\n",
                cg.rel()
            ));
        }
        text
    };
    let config = write_config(&rules([("*", 30), ("[ab]", 40)]));
    let path = config.to_str().unwrap();
    let agent = Agent::start(&cg, &["--config", path]);
    assert_eq!((idle_of(&a), idle_of(&b)), (20, 30));
    let warning = |glob: &str, line: u32| {
        format!(
            "/{}/{glob} (policy at {path}:{line}) decides no cgroup: each it matches gets the \
             policy of its own path, or of a glob earlier in the file, as the first rule that \
             selects a cgroup decides and a path comes before a glob: /{}, /{}",
            cg.rel(),
            a.rel(),
            b.rel()
        )
    };
    let log = agent.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("decides no cgroup"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains(&warning("[ab]", 9)), "{log}");
    // Reordered, the other glob is the one that decides nothing; the reload's answer says so.
    fs::write(&*config, rules([("[ab]", 40), ("*", 30)])).unwrap();
    let out = stdout(&agent.cli_ok(&["policy", "reload"]));
    assert_eq!((idle_of(&a), idle_of(&b)), (20, 40));
    assert!(
        out.contains(&format!("\nwarning: {}", warning("*", 9))),
        "{out}"
    );
    assert_eq!(out.matches("decides no cgroup").count(), 1, "{out}");
    // One that decides a cgroup is not warned about, even where others pass it over.
    let c = cg.child("c");
    let out = stdout(&agent.cli_ok(&["policy", "reload"]));
    assert_eq!(idle_of(&c), 30);
    assert!(!out.contains("decides no cgroup"), "{out}");
}

#[test]
fn the_agent_holds_the_policy_table_it_replaced_until_the_next_swap() {
    // Kernels without the fix for CVE-2023-52447 free an inner map the moment its last
    // reference goes, while a program that looked it up may still read it. The agent keeps the
    // table it swapped out open until it swaps again, including one an earlier agent left.
    // Without CAP_SYS_ADMIN, which opening a map by id takes, it holds the ones it made.
    let cg = TestCgroup::new("swap");
    let dirs = AgentDirs::new();
    let keep: Vec<u32> = GRANTED.into_iter().filter(|&cap| cap != 21).collect();
    let mut agent = Agent::start_with(
        &dirs,
        &[
            "run",
            "--cgroup",
            cg.path().to_str().unwrap(),
            "--idle",
            "20",
        ],
        &[],
        Some(&keep),
    );
    let first = bpf::policy_table_id(&dirs.state_dir);
    agent.cli_ok(&["policy", "set", cg.rel(), "--idle", "21"]);
    let second = bpf::policy_table_id(&dirs.state_dir);
    assert_ne!(first, second, "a policy change installs a new table");
    assert!(
        bpf::holds_map(agent.pid(), first),
        "the agent let go of table {first} when it swapped in {second}"
    );
    agent.cli_ok(&["policy", "set", cg.rel(), "--idle", "22"]);
    let third = bpf::policy_table_id(&dirs.state_dir);
    assert!(bpf::holds_map(agent.pid(), second));
    assert!(!bpf::holds_map(agent.pid(), first));
    // Nothing else holds it: the kernel frees it (after its grace periods).
    eventually(Duration::from_secs(10), "the first table freed", || {
        (!bpf::map_exists(first)).then_some(())
    });

    // A new agent over the same state swaps in its own table and holds the pinned one.
    assert!(agent.stop_with(libc::SIGTERM).success());
    let agent = Agent::start_in(&dirs, &cg, &["--idle", "23"]);
    assert_ne!(bpf::policy_table_id(&dirs.state_dir), third);
    assert!(
        bpf::holds_map(agent.pid(), third),
        "the new agent let go of the table the previous one left"
    );
    assert_eq!(idle_of(&cg), 23);
}

#[test]
fn fill_replaces_the_values_an_accepted_connection_inherited_from_a_listener_the_pass_missed() {
    // Under `fill`, a listener the program configured passes its values on to the connections
    // it accepts. After a policy change, the pass updates listeners; one it cannot reach (here
    // in a network namespace the agent may not enter, without CAP_SYS_ADMIN; elsewhere the
    // moments before the pass reaches it) still passes the old values on, which are the
    // program's, not the application's, and give way to the new policy.
    let cg = TestCgroup::new("fillwindow");
    let config = write_config("[default]\nidle = 41\nmode = \"fill\"\n");
    // CAP_NET_ADMIN, CAP_PERFMON and CAP_BPF: no CAP_SYS_ADMIN to enter namespaces with.
    let agent = start_with_caps(&cg, &config, &[], &[12, 38, 39]);
    let ns = Netns::new("fillwindow");
    let listen = |extra: &[&str]| Listener::at(&cg, Some(&ns), "127.0.0.1:0", "8", extra);
    let accept = |listener: &mut Listener| values(&listener.accepted(&cg, Some(&ns)));
    let set_fill = |extra: &[&str]| {
        let cgroup = cg.path().to_str().unwrap();
        let args = [
            &["policy", "set", cgroup, "--mode", "fill", "--idle", "35"],
            extra,
        ]
        .concat();
        agent.cli_ok(&args);
    };
    let mut server = listen(&[]);
    // The application's own keepalive on its listener, which `fill` keeps throughout.
    let mut own = listen(&["--keepalive", "77"]);
    assert_eq!(accept(&mut server), (1, 41, 10, 5));
    assert_eq!(accept(&mut own).1, 77);
    set_fill(&[]);
    assert_eq!(
        accept(&mut server),
        (1, 35, 10, 5),
        "the new policy's values"
    );
    assert_eq!(accept(&mut own).1, 77, "the application's own stays");

    // A change of the user timeout alone: the values are the new policy's, the user timeout
    // the listener passed on is not. And values an application set on its listener after the
    // program configured it are its own, here too.
    let mut server = listen(&[]);
    let mut after = listen(&["--keepalive-after", "77"]);
    assert_eq!(accept(&mut server), (1, 35, 10, 5));
    assert_eq!(accept(&mut after).1, 77);
    set_fill(&["--user-timeout", "7s"]);
    let accepted = &server.accepted(&cg, Some(&ns));
    assert_eq!(values(accepted), (1, 35, 10, 5), "{accepted}");
    assert_eq!(
        accepted["user_timeout"], 7000,
        "the new user timeout: {accepted}"
    );
    assert_eq!(accept(&mut after).1, 77, "the application's own stays");
}

#[test]
fn enforce_drops_the_user_timeout_an_accepted_connection_inherited_from_a_listener_the_pass_missed()
{
    // A listener the pass cannot reach (in a network namespace the agent may not enter) still
    // passes on the user timeout of the policy before a change. The connections it accepts
    // get the new policy's values, and the user timeout the program set there goes with the
    // old policy, as on every other socket. Before, it stayed.
    let cg = TestCgroup::new("enforcewindow");
    let config = write_config("[default]\nidle = 41\nuser_timeout = \"7s\"\n");
    // CAP_NET_ADMIN, CAP_PERFMON and CAP_BPF: no CAP_SYS_ADMIN to enter namespaces with.
    let agent = start_with_caps(&cg, &config, &[], &[12, 38, 39]);
    let ns = Netns::new("enforcewindow");
    let mut server = Listener::at(&cg, Some(&ns), "127.0.0.1:0", "8", &[]);
    let mut own = Listener::at(
        &cg,
        Some(&ns),
        "127.0.0.1:0",
        "8",
        &["--user-timeout-after", "9000"],
    );
    // Keepalive values the application set on its listener (as nginx does), over the program's
    // user timeout; `enforce` replaces them on the connections it accepts.
    let mut own_values = Listener::at(
        &cg,
        Some(&ns),
        "127.0.0.1:0",
        "8",
        &["--keepalive-after", "77"],
    );
    // Keepalive the application switched off on its listener, over the program's user timeout:
    // the connections it accepts come without keepalive, and still carry that user timeout.
    let mut off_after = Listener::at(
        &cg,
        Some(&ns),
        "127.0.0.1:0",
        "8",
        &["--keepalive-off-after"],
    );
    // And its own user timeout there too.
    let mut own_off = Listener::at(
        &cg,
        Some(&ns),
        "127.0.0.1:0",
        "8",
        &["--keepalive-off-after", "--user-timeout-after", "9000"],
    );
    let accepted = server.accepted(&cg, Some(&ns));
    assert_eq!(values(&accepted), (1, 41, 10, 5), "{accepted}");
    assert_eq!(accepted["user_timeout"], 7000, "{accepted}");
    let accepted = off_after.accepted(&cg, Some(&ns));
    assert_eq!(values(&accepted), (1, 41, 10, 5), "{accepted}");
    assert_eq!(accepted["user_timeout"], 7000, "{accepted}");
    let accepted = own_values.accepted(&cg, Some(&ns));
    assert_eq!(values(&accepted), (1, 41, 10, 5), "{accepted}");
    assert_eq!(accepted["user_timeout"], 7000, "{accepted}");
    agent.cli_ok(&[
        "policy",
        "set",
        cg.path().to_str().unwrap(),
        "--idle",
        "35",
        "--user-timeout",
        "0",
    ]);
    let accepted = server.accepted(&cg, Some(&ns));
    assert_eq!(values(&accepted), (1, 35, 10, 5), "{accepted}");
    assert_eq!(
        accepted["user_timeout"], 0,
        "the old policy's user timeout is gone: {accepted}"
    );
    // A user timeout the application set on its listener is its own, and stays.
    let accepted = own.accepted(&cg, Some(&ns));
    assert_eq!(values(&accepted), (1, 35, 10, 5), "{accepted}");
    assert_eq!(accepted["user_timeout"], 9000, "{accepted}");
    // Keepalive values the application set there do not make the program's user timeout its.
    let accepted = own_values.accepted(&cg, Some(&ns));
    assert_eq!(values(&accepted), (1, 35, 10, 5), "{accepted}");
    assert_eq!(accepted["user_timeout"], 0, "{accepted}");
    // Nor does keepalive the application switched off there.
    let accepted = off_after.accepted(&cg, Some(&ns));
    assert_eq!(values(&accepted), (1, 35, 10, 5), "{accepted}");
    assert_eq!(accepted["user_timeout"], 0, "{accepted}");
    // The earlier values again: the connection carries them, and only the user timeout is
    // left over from the policy the listener was configured with. So too under `lock`,
    // whose bound (idle + interval × count) the left-over user timeout is within, and under
    // `fill`, where values the program set are not the application's.
    for mode in ["enforce", "lock", "fill"] {
        agent.cli_ok(&[
            "policy",
            "set",
            cg.path().to_str().unwrap(),
            "--idle",
            "41",
            "--user-timeout",
            "0",
            "--mode",
            mode,
        ]);
        let accepted = server.accepted(&cg, Some(&ns));
        assert_eq!(values(&accepted), (1, 41, 10, 5), "{mode}: {accepted}");
        assert_eq!(
            accepted["user_timeout"], 0,
            "{mode}: the old policy's user timeout is gone: {accepted}"
        );
        let accepted = own.accepted(&cg, Some(&ns));
        assert_eq!(accepted["user_timeout"], 9000, "{mode}: {accepted}");
        // Under `fill`, the application's values stay, and the program's user timeout goes.
        let accepted = own_values.accepted(&cg, Some(&ns));
        let idle = if mode == "fill" { 77 } else { 41 };
        assert_eq!(
            (values(&accepted).1, accepted["user_timeout"].as_u64()),
            (idle, Some(0)),
            "{mode}: {accepted}"
        );
        let accepted = off_after.accepted(&cg, Some(&ns));
        assert_eq!(
            accepted["user_timeout"], 0,
            "{mode}: the old policy's user timeout is gone: {accepted}"
        );
    }
    // Under `fill` with other values: those the program set on the listener are replaced, also
    // where the application set its own user timeout there, which stays. A connection accepted
    // without keepalive gets the whole policy, as any socket without keepalive does.
    agent.cli_ok(&[
        "policy",
        "set",
        cg.path().to_str().unwrap(),
        "--idle",
        "36",
        "--user-timeout",
        "5s",
        "--mode",
        "fill",
    ]);
    let accepted = own.accepted(&cg, Some(&ns));
    assert_eq!(
        (values(&accepted), accepted["user_timeout"].as_u64()),
        ((1, 36, 10, 5), Some(9000)),
        "fill: {accepted}"
    );
    let accepted = own_off.accepted(&cg, Some(&ns));
    assert_eq!(
        (values(&accepted), accepted["user_timeout"].as_u64()),
        ((1, 36, 10, 5), Some(5000)),
        "fill: {accepted}"
    );
    // And under `off`: what the program set on the listener goes, keepalive with it; an
    // emergency `off` against a user timeout that cuts connections must not keep passing it on.
    agent.cli_ok(&[
        "policy",
        "set",
        cg.path().to_str().unwrap(),
        "--mode",
        "off",
    ]);
    let accepted = server.accepted(&cg, Some(&ns));
    assert_eq!(
        (values(&accepted).0, accepted["user_timeout"].as_u64()),
        (0, Some(0)),
        "off: {accepted}"
    );
    // A user timeout the application set on its listener keeps neither the program's
    // keepalive on nor goes itself.
    let accepted = own.accepted(&cg, Some(&ns));
    assert_eq!(
        (values(&accepted).0, accepted["user_timeout"].as_u64()),
        (0, Some(9000)),
        "off: {accepted}"
    );
    // Keepalive values the application set on its listener keep keepalive on, and the
    // program's user timeout goes.
    let accepted = own_values.accepted(&cg, Some(&ns));
    assert_eq!(
        (values(&accepted), accepted["user_timeout"].as_u64()),
        ((1, 77, 10, 5), Some(0)),
        "off: {accepted}"
    );
    // Keepalive the application switched off on its listener does not keep the program's user
    // timeout either, and a user timeout it set there stays.
    let accepted = off_after.accepted(&cg, Some(&ns));
    assert_eq!(
        (values(&accepted).0, accepted["user_timeout"].as_u64()),
        (0, Some(0)),
        "off: {accepted}"
    );
    let accepted = own_off.accepted(&cg, Some(&ns));
    assert_eq!(
        (values(&accepted).0, accepted["user_timeout"].as_u64()),
        (0, Some(9000)),
        "off: {accepted}"
    );
}

#[test]
fn listeners_on_one_port_in_one_cgroup_but_other_network_namespaces_are_told_apart() {
    // Under `fill`, the program notes what it set on each listener, so that a connection
    // accepted from one a policy change has not reached gets the new policy. The note was
    // keyed by cgroup and port only: an application's own listener on the same port in
    // another namespace (a port space of its own) wiped it, and the connection kept the old
    // values as the application's.
    let cg = TestCgroup::new("netnskey");
    let config = write_config("[default]\nidle = 41\nmode = \"fill\"\n");
    // CAP_NET_ADMIN, CAP_PERFMON and CAP_BPF: no CAP_SYS_ADMIN to enter namespaces with.
    let agent = start_with_caps(&cg, &config, &[], &[12, 38, 39]);
    let (ns1, ns2) = (Netns::new("netnskey1"), Netns::new("netnskey2"));
    let addr = "127.0.0.1:47123";
    let mut program = Listener::at(&cg, Some(&ns1), addr, "8", &[]);
    assert_eq!(values(&program.accepted(&cg, Some(&ns1))), (1, 41, 10, 5));
    let mut own = Listener::at(&cg, Some(&ns2), addr, "8", &["--keepalive", "77"]);
    assert_eq!(values(&own.accepted(&cg, Some(&ns2))).1, 77);
    agent.cli_ok(&[
        "policy",
        "set",
        cg.path().to_str().unwrap(),
        "--mode",
        "fill",
        "--idle",
        "35",
    ]);
    assert_eq!(
        values(&program.accepted(&cg, Some(&ns1))),
        (1, 35, 10, 5),
        "the new policy's values, not the ones the program set before"
    );
    assert_eq!(
        values(&own.accepted(&cg, Some(&ns2))).1,
        77,
        "the application's own stays"
    );
}

#[test]
fn a_policy_change_reaches_connections_whose_peer_closed_its_side() {
    let cg = TestCgroup::new("closewait");
    let agent = Agent::start(&cg, &["--idle", "50"]);
    let mut pair = Proc::sock(&["pair", "4", "--half-close-at-report", "1"], &cg);
    pair.read();
    let idles = |report: Vec<serde_json::Value>| {
        report
            .iter()
            .map(|end| end["idle"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(idles(pair.report()), [50, 50], "client, then server");
    agent.cli_ok(&["policy", "set", cg.rel(), "--idle", "33"]);
    // The server's end, in CLOSE_WAIT, is still the application's to read and keepalive's to
    // watch; the client's end, which shut its side down, is left as it was.
    assert_eq!(idles(pair.report()), [50, 33]);
    let status = agent.status();
    let server = sockets_of(&status, &cg)
        .into_iter()
        .find(|s| s["direction"] == "inbound")
        .expect("the server's end is listed");
    assert_eq!(
        (server["idle"].as_u64(), server["state"].as_str()),
        (Some(33), Some("close-wait"))
    );
}

/// `fill` keeps keepalive off where the application switched it off after establishment, as
/// it keeps values the application sets then: on a socket the program filled in, through a
/// change of the cgroup's policy, and on one whose keepalive was the application's from the
/// start, through a pass for another cgroup.
#[test]
fn fill_keeps_keepalive_off_where_the_application_switched_it_off_later() {
    let parent = TestCgroup::new("filloff");
    let filled = parent.child("filled");
    let own = parent.child("own");
    let other = parent.child("other");
    let agent = Agent::start(&parent, &[]);
    for cg in [&filled, &own] {
        agent.cli_ok(&["policy", "set", cg.rel(), "--mode", "fill", "--idle", "28"]);
    }
    let mut program = Proc::sock(&["pair", "4", "--keepalive-off-at-report", "1"], &filled);
    let mut app = Proc::sock(
        &[
            "pair",
            "4",
            "--keepalive",
            "100",
            "--keepalive-off-at-report",
            "1",
        ],
        &own,
    );
    let first = (program.read(), app.read());
    assert_eq!(values(&first.0["client"]).0, 1, "filled in: {}", first.0);
    assert_eq!(
        values(&first.1["client"]).1,
        100,
        "the application's: {}",
        first.1
    );
    // Each client switches its keepalive off.
    for pair in [&mut program, &mut app] {
        let report = pair.report();
        assert_eq!(values(&report[0]).0, 0, "{report:?}");
    }
    agent.cli_ok(&[
        "policy",
        "set",
        filled.rel(),
        "--mode",
        "fill",
        "--idle",
        "27",
    ]);
    let report = program.report();
    assert_eq!(
        values(&report[0]).0,
        0,
        "the application's choice: {report:?}"
    );
    assert_eq!(
        values(&report[1]).1,
        27,
        "the program's, updated: {report:?}"
    );
    agent.cli_ok(&["policy", "set", other.rel(), "--idle", "44"]);
    let report = app.report();
    assert_eq!(
        values(&report[0]).0,
        0,
        "the application's choice: {report:?}"
    );
    // A policy of another mode takes over as it would on any socket.
    agent.cli_ok(&[
        "policy",
        "set",
        filled.rel(),
        "--mode",
        "enforce",
        "--idle",
        "26",
    ]);
    let report = program.report();
    assert_eq!(values(&report[0]).0, 1, "enforce: {report:?}");
    assert_eq!(values(&report[0]).1, 26, "enforce: {report:?}");
}

/// `fill` keeps a user timeout the application set after establishment on a socket the
/// program filled in, as it keeps keepalive values the application sets then: a policy that
/// brings a user timeout moves the socket's keepalive values, not its user timeout.
#[test]
fn fill_keeps_a_user_timeout_the_application_set_later() {
    let cg = TestCgroup::new("fillut");
    let agent = Agent::start(&cg, &[]);
    let fill = |idle: &str, user_timeout: Option<&str>| set_fill(&agent, &cg, idle, user_timeout);
    fill("45", None);
    let mut pair = Proc::sock(&["pair", "4", "--user-timeout-after", "4321"], &cg);
    let out = pair.read();
    assert_eq!(out["client"]["user_timeout"], 4321, "{out}");
    let ends = |pair: &mut Proc| {
        let report = pair.report();
        let get = |i: usize, key: &str| report[i][key].as_i64().unwrap();
        (
            (get(0, "idle"), get(0, "user_timeout")),
            (get(1, "idle"), get(1, "user_timeout")),
        )
    };
    fill("46", Some("9s"));
    assert_eq!(ends(&mut pair), ((46, 4321), (46, 9000)));
    fill("47", Some("8s"));
    assert_eq!(ends(&mut pair), ((47, 4321), (47, 8000)));
    fill("48", None);
    assert_eq!(ends(&mut pair), ((48, 4321), (48, 0)));
    let status = agent.status();
    let client = sockets_of(&status, &cg)
        .into_iter()
        .find(|s| s["local"] == out["client_local"])
        .unwrap_or_else(|| panic!("no client in {status}"));
    assert_eq!(
        (
            &client["idle"],
            &client["user_timeout"],
            &client["app_owned"]
        ),
        (&48.into(), &serde_json::Value::Null, &false.into()),
        "{client}"
    );
}
