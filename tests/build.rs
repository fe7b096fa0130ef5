//! Compiles `static/static_client.rs` into a statically linked binary with the same rustc that
//! builds the tests (`KA_STATIC_CLIENT`), and `shim/keepalive_shim.c`, the LD_PRELOAD technique
//! keepalive is compared with, into a shared library (`KA_SHIM`).

use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let src = manifest_dir.join("static/static_client.rs");
    let bin = out.join("ka-static-client");
    println!("cargo:rerun-if-changed={}", src.display());
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("failed to run rustc");
    assert!(status.success(), "building the static client failed");
    println!("cargo:rustc-env=KA_STATIC_CLIENT={}", bin.display());

    let shim_src = manifest_dir.join("shim/keepalive_shim.c");
    let shim = out.join("libkeepalive_shim.so");
    println!("cargo:rerun-if-changed={}", shim_src.display());
    let cc = env::var_os("CC").unwrap_or_else(|| "cc".into());
    let status = Command::new(cc)
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&shim_src)
        .arg("-ldl")
        .status()
        .expect("failed to run the C compiler");
    assert!(status.success(), "building the LD_PRELOAD shim failed");
    println!("cargo:rustc-env=KA_SHIM={}", shim.display());
}
