//! Project tasks: `cargo xtask <setup|build|run|test|lint|bench|install>`.
//!
//! Every task first makes sure the machine has what it needs (`setup`), idempotently and
//! quickly when nothing is missing: the nightly toolchain's rust-src, a bpf-linker built against
//! that nightly's own LLVM, and (as root) a mounted bpffs. `test` (and the `setup` task) also
//! install the tools the tests run, `bench` the one the benchmarks run.

mod bench;
mod setup;

use std::{
    env, fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  setup              install what building and testing need (idempotent)
  build [--release]  set up and build the agent
  run [-- ARGS]      set up, build and run the agent as root (sudo when not root);
                     ARGS go to `keepalive-agent` (default: `run`, enforcing the built-in
                     default on the whole host). Options without a subcommand go to `run`.
  test               set up, build and run every test (unit and real-kernel integration)
  lint               cargo fmt --check and clippy -D warnings on host and BPF crates
  bench [--quick] [--baseline AGENT]
                     measure overhead, per-program cost, retroactive apply, status at scale
                     and agent footprint; prints a table and writes target/bench/results.md.
                     --baseline also runs this build and another keepalive-agent binary side
                     by side (the before and after of a change)
  install [-- ARGS]  build in release mode and run `keepalive-agent install ARGS` as root
                     (through sudo when not root), or, staging with --root DIR, as the
                     caller (ARGS: --root DIR, --bindir DIR, --force-config; see
                     `keepalive-agent install --help`)

environment:
  KEEPALIVE_BPF_TOOLCHAIN  the rustup toolchain that builds the BPF object (default: nightly)";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let (task, rest) = match args.split_first() {
        Some((task, rest)) => (task.as_str(), rest),
        None => {
            println!("{USAGE}");
            return Ok(());
        }
    };
    // The other tasks parse their own arguments; these take none (or only `--release`), and a
    // typo must not pass silently.
    let accepted: &[&str] = if task == "build" { &["--release"] } else { &[] };
    if !matches!(task, "run" | "bench" | "install")
        && let Some(extra) = rest.iter().find(|a| !accepted.contains(&a.as_str()))
    {
        bail!("`{task}` does not take `{extra}`\n\n{USAGE}");
    }
    match task {
        "setup" => {
            setup::setup()?;
            setup::ensure_bpffs()?;
            setup::test_tools().map(drop)
        }
        "build" => {
            let env = setup::setup()?;
            build(&env, rest.iter().any(|a| a == "--release"), false)
        }
        "run" => {
            let env = setup::setup()?;
            build(&env, false, false)?;
            let agent = workspace_root().join("target/debug/keepalive-agent");
            let agent_args = agent_args(rest);
            exit_like(run_as_root(&agent, &agent_args)?)
        }
        "test" => {
            let env = setup::setup()?;
            setup::ensure_bpffs()?;
            let hadolint = setup::test_tools()?;
            test(&env, &hadolint)
        }
        "lint" => {
            let env = setup::setup()?;
            setup::lint_tools()?;
            lint(&env)
        }
        "bench" => bench(rest),
        "install" => {
            let env = setup::setup()?;
            build(&env, true, false)?;
            let agent = workspace_root().join("target/release/keepalive-agent");
            let mut agent_args = vec!["install".to_owned()];
            agent_args.extend(rest.iter().skip_while(|a| *a == "--").cloned());
            let status = if stages(&agent_args) {
                Command::new(&agent)
                    .args(&agent_args)
                    .status()
                    .with_context(|| format!("failed to run {}", agent.display()))?
            } else {
                run_as_root(&agent, &agent_args)?
            };
            exit_like(status)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task `{other}`\n\n{USAGE}"),
    }
}

/// Whether `keepalive-agent` arguments stage the install below a directory (`--root DIR`, for
/// a package, say), which needs no root; `--root /` is the host itself.
fn stages(args: &[String]) -> bool {
    let root = args.iter().enumerate().find_map(|(i, arg)| {
        if arg == "--root" {
            args.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix("--root=")
        }
    });
    // A path that leads to `/` (`/tmp/..`, a link to it) is the host too.
    root.is_some_and(|root| {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| PathBuf::from(root));
        root.components().ne(Path::new("/").components())
    })
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_owned()
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command that runs `program` as root: directly when we are root, else through `sudo -E`.
pub fn as_root(program: &Path, args: &[String]) -> Command {
    if is_root() {
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(program).args(args);
        cmd
    }
}

/// Runs `program` as root (see [`as_root`]) and waits for it.
fn run_as_root(program: &Path, args: &[String]) -> anyhow::Result<std::process::ExitStatus> {
    as_root(program, args).status().with_context(|| {
        if is_root() {
            format!("failed to run {}", program.display())
        } else {
            format!(
                "failed to run {} as root through sudo; run this task as root",
                program.display()
            )
        }
    })
}

/// Ends xtask with the exit code of the agent it ran, which the README documents, or returns
/// when it succeeded.
fn exit_like(status: std::process::ExitStatus) -> anyhow::Result<()> {
    if status.success() {
        return Ok(());
    }
    eprintln!("xtask: keepalive-agent exited with {status}");
    // Killed by a signal: as a shell reports it, 128 + the signal's number.
    let code = status
        .code()
        .or_else(|| std::os::unix::process::ExitStatusExt::signal(&status).map(|sig| 128 + sig))
        .unwrap_or(1);
    std::process::exit(code);
}

/// A cargo command with the environment `setup` prepared.
fn cargo(env: &setup::Env) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).env("PATH", &env.path);
    cmd
}

fn check(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds the agent, and with `helpers` also the test crate's helper binaries (`ka-sock`).
fn build(env: &setup::Env, release: bool, helpers: bool) -> anyhow::Result<()> {
    let mut cmd = cargo(env);
    // The versions in Cargo.lock, which CI and the README's numbers were built with: a lock
    // file that no longer matches Cargo.toml fails here rather than being rewritten.
    cmd.args(["build", "--locked", "--package", "keepalive-agent"]);
    if helpers {
        cmd.args(["--package", "keepalive-tests", "--bins"]);
    }
    if release {
        cmd.arg("--release");
    }
    check(&mut cmd)
}

fn test(env: &setup::Env, hadolint: &Path) -> anyhow::Result<()> {
    // Said once here rather than by every test that makes a cgroup (through sudo, the tests
    // check for themselves).
    if is_root()
        && let Some(why) = keepalive_tests::host_enforcement()
    {
        bail!("{why}");
    }
    // One build of the agent, and with it one build of the BPF object, for every test.
    build(env, false, true)?;
    let agent = workspace_root().join("target/debug/keepalive-agent");
    // Cargo's runner for the host's test binaries, when they need sudo to run as root.
    let runner = if is_root() {
        None
    } else {
        let host = setup::host_triple()?;
        Some(format!(
            "CARGO_TARGET_{}_RUNNER",
            host.to_uppercase().replace(['-', '.'], "_")
        ))
    };
    // `cargo test` against the agent built above, running the test binaries as root.
    let cargo_test = || {
        let mut cmd = cargo(env);
        cmd.args(["test", "--locked"])
            .env("KEEPALIVE_AGENT_BIN", &agent);
        if let Some(runner) = &runner {
            cmd.env(runner, "sudo -E");
        }
        cmd
    };
    check(
        cargo_test()
            .args([
                "--workspace",
                "--exclude",
                "keepalive-ebpf",
                "--no-fail-fast",
            ])
            .env("HADOLINT", hadolint),
    )?;
    // Timing-sensitive checks run alone, after everything else, so parallel tests cannot skew
    // them. What they measured goes to the log also when they pass.
    check(cargo_test().args([
        "--package",
        "keepalive-tests",
        "--test",
        "perf",
        "--",
        "--ignored",
        "--test-threads=1",
        "--nocapture",
    ]))
}

/// Marks the re-run of `bench` under sudo, after the build.
const BENCH_BUILT: &str = "--built";

/// `bench`'s arguments.
struct BenchArgs {
    quick: bool,
    built: bool,
    baseline: Option<PathBuf>,
}

impl BenchArgs {
    fn parse(rest: &[String]) -> anyhow::Result<Self> {
        let mut args = Self {
            quick: false,
            built: false,
            baseline: None,
        };
        let mut rest = rest.iter();
        while let Some(arg) = rest.next() {
            match arg.as_str() {
                "--quick" => args.quick = true,
                BENCH_BUILT => args.built = true,
                "--baseline" => {
                    let path = rest.next().ok_or_else(|| {
                        anyhow::anyhow!("--baseline needs a keepalive-agent binary")
                    })?;
                    let path = fs::canonicalize(path)
                        .with_context(|| format!("--baseline {path}: no such file"))?;
                    if !path.is_file() {
                        bail!("--baseline {}: not a file", path.display());
                    }
                    args.baseline = Some(path);
                }
                other => bail!("unknown bench argument {other:?}\n\n{USAGE}"),
            }
        }
        Ok(args)
    }
}

/// `bench [--quick] [--baseline AGENT]`: one release build as the invoking user (so `target/`
/// stays theirs and cargo needs no root environment), then the measurements as root, through
/// sudo when not root.
fn bench(rest: &[String]) -> anyhow::Result<()> {
    let BenchArgs {
        quick,
        built,
        baseline,
    } = BenchArgs::parse(rest)?;
    if built {
        if !is_root() {
            bail!("`bench {BENCH_BUILT}` is the re-run under sudo and must run as root");
        }
    } else {
        let env = setup::setup()?;
        build(&env, true, true)?;
        if !is_root() {
            let mut args = vec!["bench".to_owned()];
            args.extend(quick.then(|| "--quick".to_owned()));
            if let Some(baseline) = &baseline {
                args.push("--baseline".to_owned());
                args.push(baseline.display().to_string());
            }
            args.push(BENCH_BUILT.to_owned());
            let err = as_root(&env::current_exe()?, &args).exec();
            bail!("failed to re-run under sudo: {err}");
        }
    }
    setup::ensure_bpffs()?;
    setup::bench_tools()?;
    bench::run(&workspace_root(), quick, baseline.as_deref())
}

fn lint(env: &setup::Env) -> anyhow::Result<()> {
    check(cargo(env).args(["fmt", "--all", "--check"]))?;
    check(cargo(env).args([
        "clippy",
        "--workspace",
        "--exclude",
        "keepalive-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The BPF crate only builds for the BPF target, with the nightly toolchain.
    check(
        Command::new("rustup")
            .current_dir(workspace_root().join("keepalive-ebpf"))
            .env("PATH", &env.path)
            .args([
                "run",
                &setup::nightly(),
                "cargo",
                "clippy",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
                "--",
                "-D",
                "warnings",
            ]),
    )
}

/// The arguments `cargo xtask run` passes to the agent: `run` first unless a subcommand comes
/// first, after any of the agent's global options (`--state-dir DIR`, `--runtime-dir DIR`).
fn agent_args(rest: &[String]) -> Vec<String> {
    let mut args: Vec<String> = rest.iter().skip_while(|a| *a == "--").cloned().collect();
    let mut words = args.iter();
    let first = loop {
        match words.next() {
            Some(arg) if matches!(arg.as_str(), "--state-dir" | "--runtime-dir") => {
                words.next();
            }
            Some(arg) if arg.starts_with("--state-dir=") || arg.starts_with("--runtime-dir=") => {}
            other => break other,
        }
    };
    if first.is_none_or(|arg| arg.starts_with('-')) {
        args.insert(0, "run".to_owned());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::BenchArgs;

    #[test]
    fn install_stages_as_the_caller_only_below_a_directory() {
        let stages = |args: &[&str]| {
            super::stages(&args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
        };
        assert!(stages(&["install", "--root", "/tmp/pkg"]));
        assert!(stages(&["install", "--bindir", "/usr/bin", "--root=pkg"]));
        for host in [
            &["install"][..],
            &["install", "--root", "/"],
            &["install", "--root=//"],
            &["install", "--root", "/tmp/.."],
            &["install", "--bindir", "/opt/root"],
        ] {
            assert!(!stages(host), "{host:?}");
        }
    }

    #[test]
    fn run_is_the_agent_subcommand_unless_one_is_named() {
        let args = |args: &[&str]| -> Vec<String> {
            super::agent_args(&args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
        };
        assert_eq!(args(&[]), ["run"]);
        assert_eq!(args(&["--", "--idle", "30s"]), ["run", "--idle", "30s"]);
        assert_eq!(args(&["--", "status", "--json"]), ["status", "--json"]);
        assert_eq!(
            args(&["--", "--state-dir", "/sys/fs/bpf/x", "status"]),
            ["--state-dir", "/sys/fs/bpf/x", "status"]
        );
        assert_eq!(
            args(&["--runtime-dir", "/run/x", "--idle", "30s"]),
            ["run", "--runtime-dir", "/run/x", "--idle", "30s"]
        );
        assert_eq!(
            args(&["--state-dir=/sys/fs/bpf/x", "policy", "list"]),
            ["--state-dir=/sys/fs/bpf/x", "policy", "list"]
        );
        assert_eq!(
            args(&["--state-dir", "/sys/fs/bpf/x"]),
            ["run", "--state-dir", "/sys/fs/bpf/x"]
        );
    }

    #[test]
    fn tasks_without_arguments_refuse_them_before_doing_anything() {
        for args in [
            &["lint", "--fix"][..],
            &["test", "enforce"],
            &["build", "--relase"],
        ] {
            let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            let err = format!("{:#}", super::run(&args).expect_err("refused"));
            assert!(
                err.contains(&format!("does not take `{}`", args[1])),
                "{err}"
            );
        }
    }

    fn parse(args: &[&str]) -> anyhow::Result<BenchArgs> {
        BenchArgs::parse(&args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn bench_arguments_are_checked() {
        let args = parse(&["--quick", "--baseline", "/bin/sh"]).unwrap();
        assert!(args.quick && !args.built);
        assert!(args.baseline.unwrap().is_absolute());
        for (bad, why) in [
            (&["--baseline"][..], "needs a keepalive-agent binary"),
            (&["--baseline", "/nonexistent/agent"], "no such file"),
            (&["--baseline", "/"], "not a file"),
            (&["--fast"], "unknown bench argument"),
        ] {
            let err = format!("{:#}", parse(bad).err().expect("refused"));
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
