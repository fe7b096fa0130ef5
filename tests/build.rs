//! Compiles `static/static_client.rs` into a statically linked binary with the same rustc that
//! builds the tests, and hands its path to the tests as `KA_STATIC_CLIENT`.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("static/static_client.rs");
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
}
