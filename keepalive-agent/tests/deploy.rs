//! Deployment artifacts: the systemd unit passes `systemd-analyze verify`, `install` puts
//! everything in place, the Kubernetes manifests are complete and agree with the CLI and the
//! config parser, the Containerfile passes hadolint, and man pages and completions generate.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser as _;
use keepalive_agent::{
    cgroup::Cgroup2,
    cli::{Cli, Command as Sub},
    config, install,
};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_keepalive-agent");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh directory below the temporary directory, removed on drop, also when the test
/// fails. Its name has the form the root tests' sweeper (`tests/src/sweep.rs`) removes when its
/// maker is gone, `ka-<label>-<pid namespace>-<pid>-<n>`, so a run killed outright leaves
/// nothing behind for long either.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(label: &str) -> TempDir {
    use std::os::unix::fs::MetadataExt as _;
    static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let namespace = std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino());
    let dir = std::env::temp_dir().join(format!(
        "ka-deploy-{label}-{namespace}-{}-{}",
        std::process::id(),
        MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

#[test]
fn systemd_accepts_the_unit() {
    let dir = tempdir("unit");
    let unit = dir.join("keepalive-agent.service");
    // The unit as `install` writes it, pointing at the binary under test.
    std::fs::write(&unit, install::unit_for(Path::new(AGENT))).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze is part of systemd; `cargo xtask setup` installs it");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains(&format!("ExecReload={AGENT} policy reload")),
        "reload must report a rejected config: {text}"
    );
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "RestartPreventExitStatus=2 3 5 6 7 9\n",
        "StartLimitIntervalSec=0",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/sys/fs/bpf",
        // What ProtectKernelTunables= would protect, which the unit cannot use.
        "-/proc/mtrr -/proc/scsi",
        "InaccessiblePaths=-/proc/kallsyms -/proc/kcore\n",
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_ADMIN CAP_SYS_PTRACE",
    ] {
        assert!(text.contains(line), "unit lacks {line}");
    }
    assert!(
        !text.contains("ExecStop"),
        "stopping must not detach: enforcement outlives the service"
    );
}

#[test]
fn a_fatal_error_reaches_the_journal_at_error_priority() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempdir("journal");
    let path = dir.join("stderr");
    let stderr = std::fs::File::create(&path).unwrap();
    let meta = stderr.metadata().unwrap();
    // What systemd sets when stderr is the journal stream.
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    // A path in the message that tries to start an entry of its own, at emergency priority,
    // and to clear the screen of whoever reads the journal.
    let status = Command::new(AGENT)
        .args(["--runtime-dir"])
        .arg(dir.join("none\n<0>forged\u{1b}[2J"))
        .args(["policy", "list"])
        .env("JOURNAL_STREAM", stream)
        .stderr(stderr)
        .status()
        .unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("<3>keepalive-agent: "), "{text}");
    assert!(lines[1].starts_with("<3><0>forged\\u{1b}[2J"), "{text}");
}

/// A unit's `Environment=KEEPALIVE_STATE_DIR=…` with a bad value is named as the variable, also
/// in `--json`'s document; a flag on the command line wins over the variable and is named.
#[test]
fn a_bad_directory_from_the_environment_names_the_variable() {
    for (var, value) in [
        ("KEEPALIVE_STATE_DIR", "relative"),
        ("KEEPALIVE_RUNTIME_DIR", ""),
    ] {
        let out = Command::new(AGENT)
            .env_remove("KEEPALIVE_STATE_DIR")
            .env_remove("KEEPALIVE_RUNTIME_DIR")
            .env(var, value)
            .args(["status", "--json"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        let needle = format!("invalid value '{value}' for '{var}'");
        assert!(err.contains(&needle), "{err}");
        let document: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            document["error"].as_str().unwrap().contains(&needle),
            "{document}"
        );
    }
    let out = Command::new(AGENT)
        .env("KEEPALIVE_STATE_DIR", "/sys/fs/bpf/keepalive")
        .args(["status", "--state-dir=relative"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("for '--state-dir <DIR>'"), "{err}");
}

#[test]
fn install_puts_binary_unit_config_man_pages_and_completions_in_place() {
    let root = tempdir("install");
    let out = Command::new(AGENT)
        .args(["install", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &str| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(root.join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("usr/local/sbin/keepalive-agent"), 0o755);
    assert_eq!(mode("etc/systemd/system/keepalive-agent.service"), 0o644);
    assert_eq!(mode("etc/keepalive-agent/config.toml"), 0o644);
    assert_eq!(
        mode("usr/local/share/bash-completion/completions/keepalive-agent"),
        0o644
    );
    let page = std::fs::read_to_string(root.join("usr/local/share/man/man1/keepalive-agent-run.1"))
        .unwrap();
    assert!(page.contains(".TH") && page.contains("idle"), "{page}");
    // A second install keeps an edited config. Below a staging root, whose owners the package
    // sets, it is not judged by its owner (here another user's, as a staging run by a user
    // leaves it), nor by the directories' (the user's own, on the way to the root).
    let config = root.join("etc/keepalive-agent/config.toml");
    std::fs::write(&config, "# mine\n").unwrap();
    // Run by a user, the file is theirs already.
    let _ = std::os::unix::fs::chown(&config, Some(65534), None);
    assert_ne!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&config).unwrap()),
        0
    );
    let out = Command::new(AGENT)
        .args(["install", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|line| line == format!("kept existing {}", config.display())),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/keepalive-agent/config.toml")).unwrap(),
        "# mine\n"
    );
    // One the agent would refuse is kept, and the install says so; a page an older install
    // left unreadable is readable again.
    use std::os::unix::fs::PermissionsExt as _;
    let chmod = |p: &str, mode| {
        std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod("etc/keepalive-agent/config.toml", 0o666);
    chmod("usr/local/share/man/man1/keepalive-agent-run.1", 0o600);
    let out = Command::new(AGENT)
        .args(["install", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "kept existing {}, which the agent refuses as it is: writable by users other than \
             root (mode 0666); fix with `chmod go-w {0}`",
            root.join("etc/keepalive-agent/config.toml").display()
        )),
        "{text}"
    );
    assert_eq!(mode("etc/keepalive-agent/config.toml"), 0o666);
    assert_eq!(
        mode("usr/local/share/man/man1/keepalive-agent-run.1"),
        0o644
    );
}

fn manifest(name: &str) -> Value {
    let path = repo().join("deploy/kubernetes").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn kubectl_apply_of_the_directory_creates_the_namespace_first() {
    // `kubectl apply -f DIR` sends the files in the order of their names, and a resource in a
    // namespace that does not exist yet is refused.
    let dir = repo().join("deploy/kubernetes");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    names.sort();
    let mut created = Vec::new();
    for name in &names {
        let resource = manifest(name);
        if let Some(namespace) = resource["metadata"]["namespace"].as_str() {
            assert!(
                created.iter().any(|n| n == namespace),
                "{name} goes into namespace {namespace}, not created before it in {names:?}"
            );
        }
        if resource["kind"] == "Namespace" {
            created.push(resource["metadata"]["name"].as_str().unwrap().to_owned());
        }
    }
    assert!(!created.is_empty(), "{names:?}");
}

#[test]
fn kubernetes_manifests_are_complete_and_agree_with_the_agent() {
    let ns = manifest("00-namespace.yaml");
    assert_eq!(ns["kind"], "Namespace");
    let name = ns["metadata"]["name"].as_str().unwrap();
    let sa = manifest("01-serviceaccount.yaml");
    assert_eq!(
        (sa["kind"].as_str(), sa["metadata"]["namespace"].as_str()),
        (Some("ServiceAccount"), Some(name))
    );
    let cm = manifest("02-configmap.yaml");
    assert_eq!(cm["kind"], "ConfigMap");
    let ds = manifest("03-daemonset.yaml");
    assert_eq!(
        (ds["kind"].as_str(), ds["apiVersion"].as_str()),
        (Some("DaemonSet"), Some("apps/v1"))
    );
    assert_eq!(ds["metadata"]["namespace"], name);
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(
        pod["tolerations"][0]["operator"], "Exists",
        "runs on every node"
    );
    assert_eq!(pod["hostPID"], true);
    assert_eq!(
        pod["hostNetwork"], true,
        "metrics on the node's own address"
    );
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(
        security["privileged"], false,
        "capabilities, not privileged"
    );
    let caps: Vec<&str> = security["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        caps,
        ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]
    );
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_eq!(
        security["seLinuxOptions"]["type"], "spc_t",
        "container_t may not load BPF programs on SELinux nodes"
    );
    for key in ["requests", "limits"] {
        assert!(
            container["resources"][key]["cpu"].is_string()
                && container["resources"][key]["memory"].is_string()
        );
    }
    // Mounts: bpffs with propagation, the cgroup2 tree, the config.
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    // The container's mount at a path and the pod volume it mounts.
    let mount_at = |mount_path: &str| {
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"] == mount_path)
            .unwrap_or_else(|| panic!("no mount at {mount_path}"));
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume for the mount at {mount_path}"));
        (mount, volume)
    };
    let (bpf_mount, bpf) = mount_at("/sys/fs/bpf");
    assert_eq!(bpf["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(bpf_mount["mountPropagation"], "HostToContainer");
    let (cgroup_mount, cgroup) = mount_at("/sys/fs/cgroup");
    assert_eq!(cgroup["hostPath"]["path"], "/sys/fs/cgroup");
    assert_eq!(
        cgroup_mount["readOnly"], true,
        "the agent only reads cgroups"
    );
    let (_, config_volume) = mount_at("/etc/keepalive-agent");
    assert_eq!(config_volume["configMap"]["name"], cm["metadata"]["name"]);
    // Where `policy` commands find the control socket by default, which the liveness probe's
    // command relies on.
    let (_, run_volume) = mount_at("/run/keepalive-agent");
    assert!(run_volume["emptyDir"].is_object(), "{run_volume}");

    // The liveness probe goes through the agent's event loop (the readiness probe's /healthz
    // does not): `policy list` with the binary where the image puts it, and a timeout that
    // `tests/tests/deploy.rs` holds a stopped agent to.
    let liveness = &container["livenessProbe"];
    let probe: Vec<&str> = liveness["exec"]["command"]
        .as_array()
        .expect("an exec liveness probe")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(probe[0], "/usr/local/sbin/keepalive-agent");
    let containerfile = std::fs::read_to_string(repo().join("Containerfile")).unwrap();
    assert!(
        containerfile.contains(&format!("ENTRYPOINT [\"{}\"]", probe[0])),
        "the image's binary"
    );
    let cli = Cli::try_parse_from(probe.iter().copied()).expect("the probe's command parses");
    assert!(
        matches!(
            cli.command,
            Sub::Policy(keepalive_agent::cli::PolicyCommand::List { .. })
        ),
        "{probe:?}"
    );
    assert_eq!(liveness["timeoutSeconds"], 10);
    assert!(
        liveness["periodSeconds"].as_u64().unwrap()
            * liveness["failureThreshold"].as_u64().unwrap()
            >= 60,
        "a pass over many connections is no reason to restart: {liveness}"
    );
    // Readiness is /healthz, which the agent serves once attached and ready, without the walk
    // over the maps a scrape of /metrics takes (and waits for). A rolling update
    // waits for each node's pod to be ready, and the kubelet probes again only after a period
    // once the first try (right at start, before the agent is up) failed: a long one delays
    // the rollout by as much per node.
    let readiness = &container["readinessProbe"];
    assert_eq!(readiness["httpGet"]["path"], "/healthz", "{readiness}");
    assert_eq!(readiness["httpGet"]["port"], "metrics", "{readiness}");
    assert!(
        readiness["periodSeconds"].as_u64().unwrap() <= 5,
        "a rollout waits up to a period per node: {readiness}"
    );

    // The container's arguments are a valid command line for this agent, with the node's
    // address of either family where Kubernetes substitutes it.
    let env = container["env"].as_array().unwrap();
    let host_ip = env
        .iter()
        .find(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP")
        .expect("the node's address from the downward API");
    let reference = format!("$({})", host_ip["name"].as_str().unwrap());
    let run_with = |node: &str| {
        let args = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().replace(&reference, node));
        let cli = Cli::try_parse_from(std::iter::once("keepalive-agent".to_owned()).chain(args))
            .expect("args parse");
        let Sub::Run(run) = cli.command else {
            panic!("the DaemonSet runs `run`");
        };
        run
    };
    let mut port = None;
    for node in ["10.0.0.7", "fd00::7"] {
        let metrics = run_with(node).metrics.expect("--metrics");
        assert_eq!(metrics.ip(), node.parse::<std::net::IpAddr>().unwrap());
        port = Some(metrics.port());
    }
    let port = port.unwrap();
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(container["ports"][0]["containerPort"], port);

    // The ConfigMap's config parses.
    let config_path = run_with("10.0.0.7").config.expect("--config");
    assert!(config_path.starts_with("/etc/keepalive-agent"));
    let file = config_path.file_name().unwrap().to_str().unwrap();
    let text = cm["data"][file]
        .as_str()
        .expect("the ConfigMap holds the file --config names");
    for mount in LAYOUTS {
        let parsed = config::parse(text, &config_path, &Cgroup2::at(mount))
            .unwrap_or_else(|e| panic!("ConfigMap config with cgroup2 at {mount}: {e:#}"));
        assert!(
            parsed
                .policies
                .rules
                .iter()
                .any(|r| r.selector.text().starts_with("/kubepods.slice/"))
        );
    }
}

/// The removal DaemonSet runs `detach` on every node with what the agent's pods have: its
/// image, its config (for state_dir), its privileges and its view of bpffs and cgroups; and
/// its pods are not the agent's.
#[test]
fn the_removal_daemonset_detaches_with_the_agent_s_image_config_and_privileges() {
    let agent = manifest("03-daemonset.yaml");
    let removal = manifest("removal/detach.yaml");
    assert_eq!(removal["kind"], "DaemonSet");
    assert_eq!(removal["apiVersion"], agent["apiVersion"]);
    assert_eq!(
        removal["metadata"]["namespace"],
        agent["metadata"]["namespace"]
    );
    let labels = &removal["spec"]["template"]["metadata"]["labels"];
    assert_eq!(removal["spec"]["selector"]["matchLabels"], *labels);
    assert_ne!(
        agent["spec"]["selector"]["matchLabels"], *labels,
        "the agent's DaemonSet must not own the removal's pods"
    );
    let (pod, agent_pod) = (
        &removal["spec"]["template"]["spec"],
        &agent["spec"]["template"]["spec"],
    );
    for key in ["serviceAccountName", "hostPID", "tolerations"] {
        assert_eq!(pod[key], agent_pod[key], "{key}");
    }
    let agent_container = &agent_pod["containers"][0];
    let detach = &pod["initContainers"][0];
    assert_eq!(detach["image"], agent_container["image"]);
    assert_eq!(
        detach["securityContext"],
        agent_container["securityContext"]
    );
    let args: Vec<&str> = detach["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let cli = Cli::try_parse_from(std::iter::once("keepalive-agent").chain(args.iter().copied()))
        .expect("the detach container's args parse");
    let Sub::Detach(detach_args) = cli.command else {
        panic!("the init container runs `detach`: {args:?}");
    };
    let agent_args: Vec<&str> = agent_container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let agent_config = agent_args
        .iter()
        .position(|a| *a == "--config")
        .map(|i| agent_args[i + 1]);
    assert_eq!(
        detach_args.config.config.as_deref(),
        agent_config.map(Path::new),
        "the agent's config, which names its state_dir"
    );
    // Every mount detach has is the agent's, of the same volume.
    let volume = |pod: &Value, name: &Value| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == *name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    let mounts = detach["volumeMounts"].as_array().unwrap();
    for mount in mounts {
        let agent_mount = agent_container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == mount["mountPath"])
            .unwrap_or_else(|| panic!("the agent has no mount at {}", mount["mountPath"]));
        assert_eq!(mount, agent_mount);
        assert_eq!(
            volume(pod, &mount["name"]),
            volume(agent_pod, &mount["name"])
        );
    }
    let paths: Vec<&str> = mounts
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["/sys/fs/bpf", "/sys/fs/cgroup", "/etc/keepalive-agent"]
    );
    // The pod's one container only keeps it, without privileges.
    let done = &pod["containers"][0];
    assert_eq!(done["securityContext"]["runAsNonRoot"], true);
    assert_eq!(done["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert!(done["volumeMounts"].is_null());
}

/// Where cgroup2 is mounted on unified and on hybrid hosts.
const LAYOUTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

#[test]
fn documented_configs_are_valid_on_unified_and_hybrid_hosts() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut examples: Vec<(String, String)> = readme
        .split("```toml\n")
        .skip(1)
        .enumerate()
        .map(|(i, block)| {
            let text = block.split("```").next().unwrap();
            (format!("README example {}", i + 1), text.to_owned())
        })
        .collect();
    assert_eq!(examples.len(), 2, "the README's TOML examples");
    // The shipped file with every commented-out setting switched on.
    let all_on = install::DEFAULT_CONFIG_TEXT
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest == "[[policy]]"
                    || rest.split_once(" = ").is_some_and(|(key, _)| {
                        key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
            {
                rest
            }
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all_on.contains("\nattach = "), "{all_on}");
    examples.push(("deploy/config.toml, all settings on".to_owned(), all_on));
    for (name, text) in &examples {
        for mount in LAYOUTS {
            if let Err(err) = config::parse(text, Path::new(name), &Cgroup2::at(mount)) {
                panic!("{name} with cgroup2 at {mount}: {err:#}\n{text}");
            }
        }
    }
}

fn hadolint() -> PathBuf {
    if let Some(path) = std::env::var_os("HADOLINT") {
        return PathBuf::from(path);
    }
    // Where `cargo xtask setup` installs it, then PATH.
    let installed = std::fs::read_dir(repo().join("target/tools"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("bin"));
    installed
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ))
        .map(|d| d.join("hadolint"))
        .find(|p| p.is_file())
        .expect("hadolint not found; `cargo xtask setup` installs it into target/tools/")
}

#[test]
fn the_containerfile_passes_hadolint() {
    let out = Command::new(hadolint())
        .arg(repo().join("Containerfile"))
        .output()
        .expect("run hadolint");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// COPY keeps a file's mode from the build context, 0664 in a checkout made under a umask of
/// 002, and `run` refuses a config that others may write: the image's default `run` would fail.
#[test]
fn the_image_copies_its_config_with_a_mode_the_agent_accepts() {
    let text = std::fs::read_to_string(repo().join("Containerfile")).unwrap();
    let copies: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("COPY ") && line.contains(" /etc/keepalive-agent/"))
        .collect();
    assert!(!copies.is_empty(), "the image carries a default config");
    for line in copies {
        let mode = line
            .split_whitespace()
            .find_map(|word| word.strip_prefix("--chmod="))
            .unwrap_or_else(|| panic!("no --chmod, so the checkout's mode: {line}"));
        let mode = u32::from_str_radix(mode, 8).unwrap_or_else(|_| panic!("mode: {line}"));
        assert_eq!(mode & 0o022, 0, "writable by others: {line}");
    }
}

#[test]
fn man_pages_and_completions_generate() {
    let dir = tempdir("man");
    let out = Command::new(AGENT).arg("man").arg(&dir).output().unwrap();
    assert!(out.status.success());
    for page in [
        "keepalive-agent.1",
        "keepalive-agent-run.1",
        "keepalive-agent-status.1",
        "keepalive-agent-policy-set.1",
        "keepalive-agent-detach.1",
        "keepalive-agent-check.1",
    ] {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
    // A file given for the directory is a bad argument (exit 2), named as one.
    let page = dir.join("keepalive-agent.1");
    let out = Command::new(AGENT).arg("man").arg(&page).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{} is not a directory", page.display())),
        "{err}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(AGENT)
            .args(["completions", shell])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("detach") && text.contains("max-tracked-sockets"),
            "{shell}"
        );
    }
    let help = Command::new(AGENT).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for word in [
        "run",
        "status",
        "policy",
        "detach",
        "check",
        "install",
        "Exit codes",
    ] {
        assert!(help.contains(word), "--help lacks {word}");
    }
}

/// `keepalive-agent GLOBAL… install --root ROOT ARGS…`, without the directory variables an
/// operator's shell would not have.
fn install_with(root: &Path, global: &[&str], args: &[&str]) -> std::process::Output {
    Command::new(AGENT)
        .env_remove("KEEPALIVE_STATE_DIR")
        .env_remove("KEEPALIVE_RUNTIME_DIR")
        .args(global)
        .arg("install")
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn install_leaves_a_masked_or_linked_unit_and_a_bindir_the_unit_cannot_run_alone() {
    let root = tempdir("install-masked");
    let units = root.join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    let unit = units.join("keepalive-agent.service");
    let packaged = root.join("packaged.service");
    std::fs::write(&packaged, "[Service]\n").unwrap();
    // `systemctl mask` links the unit to /dev/null; a link to a packaged unit is the package's.
    for (target, needle) in [
        (Path::new("/dev/null"), "systemctl unmask keepalive-agent"),
        (packaged.as_path(), "remove the link"),
    ] {
        let _ = std::fs::remove_file(&unit);
        std::os::unix::fs::symlink(target, &unit).unwrap();
        let out = install_with(&root, &[], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(needle) && err.contains("nothing was installed"),
            "{err}"
        );
        assert_eq!(std::fs::read_link(&unit).unwrap(), target);
        assert!(!root.join("usr").exists(), "nothing was installed: {err}");
        assert!(!root.join("etc/keepalive-agent").exists(), "{err}");
    }
    assert_eq!(std::fs::read_to_string(&packaged).unwrap(), "[Service]\n");
    std::fs::remove_file(&unit).unwrap();
    // A binary the sandbox hides (ProtectHome=, PrivateTmp=, PrivateDevices=), one on a kernel
    // filesystem, or a path ExecStart= would split.
    for (bindir, needle) in [
        ("/home/ops/bin", "ProtectHome="),
        ("/tmp/bin", "PrivateTmp="),
        ("/dev/shm/bin", "PrivateDevices="),
        ("/sys/fs/bpf/bin", "a kernel filesystem"),
        ("/opt/my tools", "holds white space"),
        ("/opt/100%", "holds `%`"),
    ] {
        let out = install_with(&root, &[], &["--bindir", bindir]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bindir}: {err}");
        assert!(err.contains(needle), "{bindir}: {err}");
        assert!(
            !root.join("usr").exists() && !unit.exists(),
            "{bindir}: {err}"
        );
    }
}

#[test]
fn install_that_fails_midway_has_said_what_it_did_before() {
    // The man pages' directory cannot be made (a file is in the way): the binary, the unit
    // and the config are in place by then, and their lines are out before the error.
    let root = tempdir("install-midway");
    std::fs::create_dir_all(root.join("usr/local/share")).unwrap();
    std::fs::write(root.join("usr/local/share/man"), "").unwrap();
    let out = install_with(&root, &[], &[]);
    let (stdout, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_ne!(out.status.code(), Some(0), "{stdout}{err}");
    assert!(err.contains("usr/local/share/man"), "{err}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (line, path) in lines.iter().zip([
        "usr/local/sbin/keepalive-agent",
        "etc/systemd/system/keepalive-agent.service",
        "etc/keepalive-agent/config.toml",
    ]) {
        assert!(line.contains(path), "{line}");
        assert!(root.join(path).is_file(), "{path}");
    }
}

#[test]
fn install_finishes_when_its_output_cannot_be_written() {
    // Stdout on a full disk: every file still goes in place, and the exit code says the output
    // failed.
    let root = tempdir("install-full");
    let out = Command::new(AGENT)
        .env_remove("KEEPALIVE_STATE_DIR")
        .env_remove("KEEPALIVE_RUNTIME_DIR")
        .arg("install")
        .arg("--root")
        .arg(&root)
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("failed to write to stdout"), "{err}");
    for path in [
        "usr/local/sbin/keepalive-agent",
        "etc/systemd/system/keepalive-agent.service",
        "etc/keepalive-agent/config.toml",
        "usr/local/share/man/man1/keepalive-agent.1",
        "usr/local/share/bash-completion/completions/keepalive-agent",
    ] {
        assert!(root.join(path).is_file(), "{path}: {err}");
    }
}

#[test]
fn install_makes_its_files_readable_by_everyone_under_a_tight_umask() {
    use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
    let root = tempdir("install-umask");
    let mut cmd = Command::new(AGENT);
    cmd.env_remove("KEEPALIVE_STATE_DIR")
        .env_remove("KEEPALIVE_RUNTIME_DIR")
        .args(["install", "--root"])
        .arg(&root);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |path: &str| {
        std::fs::metadata(root.join(path))
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("usr/local/share/man/man1"), 0o755);
    assert_eq!(mode("usr/local/share/man/man1/keepalive-agent.1"), 0o644);
    assert_eq!(
        mode("usr/local/share/bash-completion/completions/keepalive-agent"),
        0o644
    );
    assert_eq!(mode("usr/local/share/bash-completion/completions"), 0o755);
    assert_eq!(mode("usr/local/sbin/keepalive-agent"), 0o755);
}

#[test]
fn install_refuses_directories_the_unit_would_drop_and_honours_bindir() {
    use std::os::unix::fs::PermissionsExt as _;
    let root = tempdir("install-dirs");
    // The unit runs the agent with neither directory flag, so install takes neither: it says
    // where to set them instead (exit 2), and writes nothing.
    for (global, needle) in [
        (&["--state-dir", "/sys/fs/bpf/elsewhere"][..], "state_dir"),
        (
            &["--runtime-dir", "/run/elsewhere"][..],
            "RuntimeDirectory=",
        ),
    ] {
        let out = install_with(&root, global, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{global:?}: {err}");
        assert!(
            err.contains(needle) && err.contains(global[1]),
            "{global:?}: {err}"
        );
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "{global:?}");
    }
    let out = Command::new(AGENT)
        .env("KEEPALIVE_STATE_DIR", "/sys/fs/bpf/elsewhere")
        .args(["install", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("KEEPALIVE_STATE_DIR"), "{err}");
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);

    // The default runtime directory, spelled out, is the unit's; --bindir moves the binary and
    // the unit's commands with it.
    let out = install_with(
        &root,
        &["--runtime-dir", "/run/keepalive-agent"],
        &["--bindir", "/opt/ka/bin"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(root.join("opt/ka/bin/keepalive-agent")).unwrap(),
        std::fs::read(AGENT).unwrap()
    );
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/keepalive-agent.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/ka/bin/keepalive-agent run"),
        "{unit}"
    );
    assert!(
        unit.contains("ExecReload=/opt/ka/bin/keepalive-agent policy reload"),
        "{unit}"
    );
    // --force-config replaces an edited config, and keeps it beside the new one, the latest
    // only: a later edit's copy replaces the earlier one's, and the default is not kept.
    let config = root.join("etc/keepalive-agent/config.toml");
    let saved = root.join("etc/keepalive-agent/config.toml.bak");
    let force = || {
        let out = install_with(&root, &[], &["--bindir", "/opt/ka/bin", "--force-config"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(&config).unwrap(),
            install::DEFAULT_CONFIG_TEXT
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for mine in ["# mine\n", "# mine, later\n"] {
        std::fs::write(&config, mine).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = force();
        assert!(
            out.contains(&format!(
                "kept the config it replaced as {}",
                saved.display()
            )),
            "{out}"
        );
        assert_eq!(std::fs::read_to_string(&saved).unwrap(), mine);
        let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the copy keeps the file's mode");
    }
    let out = force();
    assert!(!out.contains("kept the config"), "{out}");
    assert_eq!(std::fs::read_to_string(&saved).unwrap(), "# mine, later\n");
    // A directory in the config's place is kept with the reason the agent refuses it, and
    // --force-config refuses it before writing anything.
    std::fs::remove_file(&config).unwrap();
    std::fs::create_dir(&config).unwrap();
    let out = install_with(&root, &[], &["--bindir", "/opt/ka/bin"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "kept existing {}, which the agent refuses as it is: it is a directory, not a \
             regular file",
            config.display()
        )),
        "{text}"
    );
    let binary = root.join("opt/ka/bin/keepalive-agent");
    std::fs::remove_file(&binary).unwrap();
    let out = install_with(&root, &[], &["--bindir", "/opt/ka/bin", "--force-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "it is a directory, not a regular file; --force-config replaces a config file only"
        ),
        "{err}"
    );
    assert!(!binary.exists(), "nothing was installed");
    assert!(config.is_dir());
}
