//! Builds the BPF object with aya-build and leaves it in `OUT_DIR/keepalive` for
//! `include_bytes!`.
//!
//! When bpf-linker is missing (a plain `cargo check` or `cargo clippy` on a machine that never
//! ran `cargo xtask setup`), an empty stub is written instead so host-only work still builds;
//! a binary built that way refuses to run with a message naming the setup command.

use std::{env, fs, path::PathBuf};

/// Where `cargo xtask setup` installs bpf-linker, relative to `CARGO_HOME`.
const XTASK_LINKER_DIR: &str = "keepalive-bpf-linker/bin";

fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
}

fn find_bpf_linker() -> Option<PathBuf> {
    let in_path = env::var_os("PATH").and_then(|path| {
        env::split_paths(&path)
            .map(|dir| dir.join("bpf-linker"))
            .find(|candidate| candidate.is_file())
    });
    in_path.or_else(|| {
        let candidate = cargo_home()?.join(XTASK_LINKER_DIR).join("bpf-linker");
        candidate.is_file().then_some(candidate)
    })
}

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("keepalive");
    println!("cargo:rerun-if-env-changed=PATH");
    // The toolchain for the BPF object (`cargo xtask` reads it too); `nightly` when unset.
    println!("cargo:rerun-if-env-changed=KEEPALIVE_BPF_TOOLCHAIN");
    let toolchain = env::var("KEEPALIVE_BPF_TOOLCHAIN")
        .ok()
        .filter(|name| !name.is_empty());
    let linker = find_bpf_linker();
    match linker {
        Some(linker) => {
            println!("cargo:rerun-if-changed={}", linker.display());
            let dir = linker.parent().expect("a file has a parent").to_owned();
            let path = env::var_os("PATH").unwrap_or_default();
            let path = env::join_paths(std::iter::once(dir).chain(env::split_paths(&path)))?;
            // SAFETY: build scripts are single-threaded at this point; the nested cargo that
            // aya-build spawns inherits PATH and must find bpf-linker on it.
            unsafe { env::set_var("PATH", path) };
            let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
                .join("../keepalive-ebpf");
            let root = root.to_str().expect("UTF-8 source path");
            let package = aya_build::Package {
                name: "keepalive-ebpf",
                root_dir: root,
                ..Default::default()
            };
            let toolchain = toolchain
                .as_deref()
                .map_or(aya_build::Toolchain::Nightly, aya_build::Toolchain::Custom);
            aya_build::build_ebpf([package], toolchain)?;
        }
        _ => {
            // A path that does not exist makes cargo run this script at every build, so the
            // first build after `cargo xtask setup` installs the linker there makes the real
            // object; a stub kept until something else changed would refuse to run.
            if let Some(home) = cargo_home() {
                let expected = home.join(XTASK_LINKER_DIR).join("bpf-linker");
                println!("cargo:rerun-if-changed={}", expected.display());
            }
            println!(
                "cargo:warning=bpf-linker not found: building keepalive-agent with an empty BPF \
                 object stub. Run `cargo xtask setup` for a working binary."
            );
            fs::write(&object, [])?;
        }
    }
    Ok(())
}
