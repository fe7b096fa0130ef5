//! keepalive-agent: the userspace side of keepalive.
//!
//! The binary is a thin shell over this library: `main` parses the command line with [`cli`],
//! runs a command from [`commands`] and turns the result into an exit code ([`error`]).

pub mod accept;
pub mod apply;
pub mod btf;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod detach;
pub mod error;
pub mod foreign;
pub mod install;
pub mod instance;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod pin;
pub mod pinwatch;
pub mod policy;
pub mod privileges;
pub mod status;
pub mod sys;
pub mod takeover;
pub mod watch;
pub mod watchdog;
