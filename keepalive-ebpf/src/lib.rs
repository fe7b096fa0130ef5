//! Library target of the BPF crate. It exists so that `keepalive-agent` can name this crate as a
//! build dependency (cargo then rebuilds the agent when the BPF code changes); the programs
//! themselves are the `keepalive` binary in `main.rs`, built for `bpfel-unknown-none` by aya-build.
#![no_std]
