//! Project tasks: `cargo xtask <setup|build|run|test|lint|bench|install>`.
//!
//! Every task first makes sure the machine has what it needs (`setup`), idempotently and
//! quickly when nothing is missing: the nightly toolchain's rust-src, a bpf-linker built against
//! that nightly's own LLVM, and (as root) a mounted bpffs.

mod bench;
mod setup;

use std::{
    env,
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
  bench [--quick]    measure overhead, per-program cost, retroactive apply, status at scale
                     and agent footprint; prints a table and writes target/bench/results.md
  install            build in release mode and run `keepalive-agent install` as root";

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
    match task {
        "setup" => setup::setup().map(drop),
        "build" => {
            let env = setup::setup()?;
            build(&env, rest.iter().any(|a| a == "--release"))
        }
        "run" => {
            let env = setup::setup()?;
            build(&env, false)?;
            let agent = workspace_root().join("target/debug/keepalive-agent");
            let mut agent_args: Vec<String> =
                rest.iter().skip_while(|a| *a == "--").cloned().collect();
            if agent_args.first().is_none_or(|a| a.starts_with('-')) {
                agent_args.insert(0, "run".to_owned());
            }
            let status = as_root(&agent, &agent_args).status()?;
            if !status.success() {
                bail!("keepalive-agent exited with {status}");
            }
            Ok(())
        }
        "test" => {
            let env = setup::setup()?;
            test(&env)
        }
        "lint" => {
            let env = setup::setup()?;
            lint(&env)
        }
        "bench" => {
            let env = setup::setup()?;
            build(&env, true)?;
            bench::run(&workspace_root(), rest.iter().any(|a| a == "--quick"))
        }
        "install" => {
            let env = setup::setup()?;
            build(&env, true)?;
            let agent = workspace_root().join("target/release/keepalive-agent");
            let status = as_root(&agent, &["install".to_owned()]).status()?;
            if !status.success() {
                bail!("keepalive-agent install exited with {status}");
            }
            Ok(())
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task `{other}`\n\n{USAGE}"),
    }
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

fn build(env: &setup::Env, release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo(env);
    cmd.args(["build", "--package", "keepalive-agent"]);
    if release {
        cmd.arg("--release");
    }
    check(&mut cmd)
}

fn test(env: &setup::Env) -> anyhow::Result<()> {
    // One build of the agent, and with it one build of the BPF object, for every test.
    check(cargo(env).args([
        "build",
        "--package",
        "keepalive-agent",
        "--package",
        "keepalive-tests",
        "--bins",
    ]))?;
    let agent = workspace_root().join("target/debug/keepalive-agent");
    let runner = if is_root() { None } else { Some("sudo -E") };
    let mut cmd = cargo(env);
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "keepalive-ebpf",
        "--no-fail-fast",
    ])
    .env("KEEPALIVE_AGENT_BIN", &agent)
    .env("HADOLINT", &env.hadolint);
    if let Some(runner) = runner {
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", runner);
    }
    check(&mut cmd)?;
    // Timing-sensitive checks run alone, after everything else, so parallel tests cannot skew
    // them.
    let mut cmd = cargo(env);
    cmd.args([
        "test",
        "--package",
        "keepalive-tests",
        "--test",
        "perf",
        "--",
        "--ignored",
        "--test-threads=1",
    ])
    .env("KEEPALIVE_AGENT_BIN", &agent);
    if let Some(runner) = runner {
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", runner);
    }
    check(&mut cmd)
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
                "nightly",
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
