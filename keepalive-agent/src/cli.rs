//! The command line: every subcommand, flag and value parser. `--help`, the man page and the
//! shell completions are all generated from these definitions.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{
    config,
    error::exit,
    pin,
    policy::{self, Mode, limits},
};

/// Where `run` keeps its control socket and lock file unless told otherwise; the shipped unit's
/// `RuntimeDirectory=`.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/keepalive-agent";

/// The heading of the global directory flags in every command's help: without one they
/// interleave with the command's own options (clap numbers each command's from 0).
const GLOBAL_HEADING: &str = "Global options";

/// The exit codes of [`exit::MEANINGS`], shown at the end of `--help`.
pub fn exit_codes_help() -> String {
    let mut text = String::from("Exit codes:");
    for (code, meaning) in exit::MEANINGS {
        text.push_str(&format!("\n  {code}  {meaning}"));
    }
    text
}

/// Enforces TCP keepalive on every connection of a host or cgroup, from the kernel.
///
/// A cgroup sock_ops BPF program sets SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT and
/// optionally TCP_USER_TIMEOUT when a TCP connection is established, on both the connecting and
/// the accepting side, with a policy per cgroup.
#[derive(Debug, Parser)]
#[command(name = "keepalive-agent", version, after_long_help = exit_codes_help())]
pub struct Cli {
    /// Directory on bpffs holding keepalive's pinned programs, maps and links; one of its own,
    /// not the bpffs mount itself. [default: the config's state_dir, else /sys/fs/bpf/keepalive]
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL_HEADING,
        value_name = "DIR",
        env = "KEEPALIVE_STATE_DIR",
        value_parser = pin::parse_dir
    )]
    pub state_dir: Option<PathBuf>,

    /// Directory for the control socket and the agent's lock file; one of its own, which `run`
    /// makes root-only (a directory holding other files is refused, and so is one another user
    /// could change). At most 94 bytes, so that the control socket's path fits a Unix socket.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL_HEADING,
        value_name = "DIR",
        env = "KEEPALIVE_RUNTIME_DIR",
        default_value = DEFAULT_RUNTIME_DIR,
        value_parser = crate::control::parse_runtime_dir
    )]
    pub runtime_dir: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load, attach and enforce; stays in the foreground, follows cgroup changes, and reads the
    /// config again on SIGHUP or `policy reload`.
    ///
    /// Enforcement is pinned in the state directory and stays in place when the agent exits,
    /// is killed or crashes; a restarted agent takes it over without a gap. Remove it with
    /// `keepalive-agent detach`.
    Run(RunArgs),
    /// Show enforced sockets and per-cgroup counters (reads pinned state; root only).
    Status(StatusArgs),
    /// Show or change the running agent's policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Remove keepalive's programs, links and pins, ending enforcement.
    Detach(DetachArgs),
    /// Check whether this host can run the agent, and say what to fix if not; also checks the
    /// config `run` would read.
    Check(CheckArgs),
    /// Install the binary, the systemd unit, a default config file, the man pages and bash
    /// completions.
    Install(InstallArgs),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
    /// Write the man pages (keepalive-agent.1 and one per subcommand) into a directory.
    Man(ManArgs),
}

/// Hides the global directory flags of `cmd` (the derived [`Cli`] command, perhaps adjusted)
/// from the help, man page and completions of the subcommands where they do nothing
/// (`completions`, `man`) or are refused (`install`, see `install::refuse_directories`): there
/// they would read as options. Those subcommands get hidden copies before clap propagates the
/// global flags, which it then leaves out there; they still parse, and their values still
/// reach [`Cli`], so that `install` can name them.
pub fn finish(cmd: clap::Command) -> clap::Command {
    let hidden: Vec<clap::Arg> = directory_flags(&cmd).map(|arg| arg.hide(true)).collect();
    let policy_state = hidden
        .iter()
        .find(|arg| arg.get_id() == "state_dir")
        .map(|arg| policy_state_dir(arg.clone().hide(false)));
    cmd.mut_subcommands(|sub| match sub.get_name() {
        "install" | "completions" | "man" => sub.args(hidden.iter().cloned()),
        "policy" => sub.args(policy_state.clone()),
        _ => sub,
    })
}

/// The global directory flags of `cmd`.
fn directory_flags(cmd: &clap::Command) -> impl Iterator<Item = clap::Arg> {
    cmd.get_arguments()
        .filter(|arg| matches!(arg.get_id().as_str(), "state_dir" | "runtime_dir"))
        .cloned()
        .collect::<Vec<_>>()
        .into_iter()
}

/// `--state-dir` as `policy` takes it. It has no default state directory there: it talks to
/// the agent on the runtime directory, and with the flag refuses one that keeps its state
/// elsewhere.
fn policy_state_dir(arg: clap::Arg) -> clap::Arg {
    arg.help(
        "Only carry out the request if the agent keeps its state in this directory (by \
         default, whichever agent runs on --runtime-dir)",
    )
}

/// `cmd` (the derived [`Cli`] command) as the completion scripts describe it: clap_complete
/// offers hidden flags too, so [`finish`]'s hidden copies would not keep the directory flags
/// out of `install`, `completions` and `man`. Here they are not global: the top level and the
/// subcommands that take them get copies of their own, and those three get none.
pub fn for_completions(cmd: clap::Command) -> clap::Command {
    let local: Vec<clap::Arg> = directory_flags(&cmd).map(|arg| arg.global(false)).collect();
    // `policy` passes them on to its own subcommands (`policy set … --runtime-dir DIR`).
    let policy: Vec<clap::Arg> = directory_flags(&cmd)
        .map(|arg| {
            if arg.get_id() == "state_dir" {
                policy_state_dir(arg)
            } else {
                arg
            }
        })
        .collect();
    cmd.mut_arg("state_dir", |arg| arg.global(false))
        .mut_arg("runtime_dir", |arg| arg.global(false))
        .mut_subcommands(|sub| match sub.get_name() {
            "install" | "completions" | "man" | "help" => sub,
            "policy" => sub.args(policy.iter().cloned()),
            _ => sub.args(local.iter().cloned()),
        })
}

/// Parses the process's command line (see [`finish`]).
pub fn parse() -> Result<Cli, clap::Error> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = finish(Cli::command())
        .try_get_matches()
        .map_err(|err| from_environment(err, std::env::args_os(), |name| std::env::var_os(name)))?;
    Cli::from_arg_matches(&matches).map_err(|err| err.format(&mut finish(Cli::command())))
}

/// A bad value that came from an environment variable (`KEEPALIVE_STATE_DIR=relative`) is
/// named by the variable, not by the flag the command line does not have: clap names the flag.
fn from_environment(
    mut err: clap::Error,
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> clap::Error {
    use clap::{
        CommandFactory as _,
        error::{ContextKind, ContextValue, ErrorKind},
    };
    if err.kind() != ErrorKind::ValueValidation {
        return err;
    }
    let Some(ContextValue::String(invalid)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    let Some(long) = invalid
        .strip_prefix("--")
        .and_then(|rest| rest.split(' ').next())
    else {
        return err;
    };
    let cmd = Cli::command();
    let Some(name) = cmd
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .and_then(|arg| arg.get_env())
        .and_then(|name| name.to_str())
    else {
        return err;
    };
    let flag = format!("--{long}");
    let on_command_line = args
        .into_iter()
        .skip(1)
        .take_while(|arg| arg != "--")
        .any(|arg| {
            let arg = arg.to_string_lossy();
            arg == flag || arg.starts_with(&format!("{flag}="))
        });
    if !on_command_line && env(name).is_some() {
        err.insert(
            ContextKind::InvalidArg,
            ContextValue::String(name.to_owned()),
        );
    }
    err
}

/// Parses a whole-seconds duration within `range`.
fn secs_parser(
    what: &'static str,
    range: std::ops::RangeInclusive<u32>,
) -> impl Fn(&str) -> Result<u32, String> + Clone + Send + Sync + 'static {
    move |text| policy::check_secs(what, policy::parse_duration(text)?, range.clone())
}

fn parse_count(text: &str) -> Result<u32, String> {
    let value: i64 = text
        .trim()
        .parse()
        .map_err(|_| format!("\"{text}\" is not a whole number"))?;
    policy::check_count("count", value)
}

fn parse_user_timeout(text: &str) -> Result<u32, String> {
    // 0 passes on as 0: "none", which overrides a user timeout of the config.
    policy::check_user_timeout("user-timeout", policy::parse_duration(text)?)
        .map(Option::unwrap_or_default)
}

/// `install --root`: an empty one would install relative to the current directory.
fn parse_root(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err(
            "an empty root would install below the current directory; name a \
                    directory (/ for this host)"
                .to_owned(),
        );
    }
    Ok(PathBuf::from(text))
}

fn parse_mode(text: &str) -> Result<Mode, String> {
    text.parse()
}

/// Keepalive values, shared by `run` (over `[default]`) and `policy set`.
#[derive(Debug, Clone, Default, Args)]
pub struct ValueArgs {
    /// Idle time before the first probe (TCP_KEEPIDLE): seconds or a duration such as 90s or
    /// 2m; 1 to 32767 seconds.
    #[arg(long, value_name = "DURATION", value_parser = secs_parser("idle", limits::IDLE), allow_negative_numbers = true)]
    pub idle: Option<u32>,

    /// Time between probes (TCP_KEEPINTVL): seconds or a duration; 1 to 32767 seconds.
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = secs_parser("interval", limits::INTERVAL),
        allow_negative_numbers = true
    )]
    pub interval: Option<u32>,

    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT): 1 to 127.
    #[arg(long, value_name = "N", value_parser = parse_count, allow_negative_numbers = true)]
    pub count: Option<u32>,

    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the connection is
    /// dropped (seconds or a duration such as 45s or 1500ms). Keepalive alone does not cover
    /// connections with unacknowledged data; idle + interval × count is a good value. 0: none
    /// (the kernel's behaviour), also over a value the config sets.
    #[arg(long, value_name = "DURATION", value_parser = parse_user_timeout, allow_negative_numbers = true)]
    pub user_timeout: Option<u32>,
}

/// `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Config file [default: /etc/keepalive-agent/config.toml if it exists, else built-in
    /// defaults: attach at the cgroup2 root, enforce idle 60s, interval 10s, count 5].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// cgroup to attach to: relative to the cgroup2 mount, absolute under it, or as status
    /// prints it (/system.slice/a.service; / is the root). Covers
    /// every socket created in it and below it. Overrides the config's `attach`.
    /// [default: the config's `attach`, else the cgroup2 root]
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,

    /// Values of the default policy; override `[default]` in the config.
    #[command(flatten)]
    pub values: ValueArgs,

    /// Serve Prometheus metrics at this address (for example 127.0.0.1:9977 or [::1]:9977; an
    /// IPv4 address may be in brackets too). Off by default.
    #[arg(long, value_name = "ADDR", value_parser = config::parse_listen)]
    pub metrics: Option<SocketAddr>,

    /// Capacity of the per-cgroup counter map, used when the maps are first created; 1 to
    /// 16777216. [default: 65536]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16_777_216), allow_negative_numbers = true)]
    pub max_tracked_cgroups: Option<u32>,

    /// Sockets `status` can list, at least, used when the maps are first created: the
    /// capacity of the tracking hash, plus a preallocated slot table of up to 65536 (136 bytes
    /// a slot). Sockets beyond it are still enforced, and counted as socket_tracking_full. 1 to
    /// 16777216. [default: 524288]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16_777_216), allow_negative_numbers = true)]
    pub max_tracked_sockets: Option<u32>,
}

/// `status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Print one JSON document instead of tables; a failure before it began prints one with
    /// `ok` (false), `error` and `code` instead.
    #[arg(long)]
    pub json: bool,

    /// Only sockets and counters of this cgroup and the cgroups below it; a glob (`*`, `?`,
    /// `[…]` within one path component, as in the config) selects every cgroup it matches.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,

    /// Only sockets with this local or remote port (1-65535).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..), allow_negative_numbers = true)]
    pub port: Option<u16>,

    /// Where the agent's state is.
    #[command(flatten)]
    pub config: ConfigArg,
}

/// `--config` of the commands that find the agent's state.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArg {
    /// The config file the agent runs with, for its `state_dir` when --state-dir is not given;
    /// an error in it is an error (exit 2; 1 for a symbolic link to nothing). [default: /etc/keepalive-agent/config.toml if it
    /// exists; `status` warns about an error in it and looks in /sys/fs/bpf/keepalive,
    /// `detach` refuses (exit 2; 1 for a symbolic link to nothing)]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `policy …`.
#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// List the effective policies: cgroup, id, values, mode and where each came from.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a cgroup's policy at runtime (until the next reload or restart). Values and mode
    /// not given are kept from the path's or glob's own policy (runtime, else the config's);
    /// for a path without one, from the policy it gets now (a glob's or an ancestor's); else
    /// they are taken from the default policy.
    Set {
        /// cgroup path or glob: relative to the cgroup2 mount, absolute under it, or as status
        /// prints it (/system.slice/a.service). One that selects no cgroup yet is accepted
        /// with a warning and applies when the cgroup appears.
        cgroup: String,
        /// Values.
        #[command(flatten)]
        values: ValueArgs,
        /// enforce, fill, off or lock; required with values when the mode they would get is
        /// off. [default: the current policy's mode, else the default policy's]
        #[arg(long, value_name = "MODE", value_parser = parse_mode)]
        mode: Option<Mode>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a cgroup's runtime policy, after which the config's policy for it, if any,
    /// applies again; or, with no runtime policy, mask the config's policy for it, so that it
    /// inherits from its nearest ancestor with a policy, until the next reload or restart
    /// brings the config's back.
    Unset {
        /// cgroup path or glob, as given to `set` or in the config.
        cgroup: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the config file and apply the difference (same as SIGHUP).
    Reload {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `detach`.
#[derive(Debug, Clone, Args)]
pub struct DetachArgs {
    /// Only detach if enforcement is attached to this cgroup, and refuse (exit 7) if it is
    /// attached to another (a safety check). With none attached, or one on a removed cgroup
    /// when this cgroup does not exist (it may have been the one), what is left is removed as
    /// without it.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,

    /// Where the agent's state is.
    #[command(flatten)]
    pub config: ConfigArg,
}

/// `check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,

    /// The config to check as `run --config` would read it (also for its `state_dir`).
    /// [default: /etc/keepalive-agent/config.toml if it exists, else the built-in default]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The attach cgroup to check, as `run --cgroup` takes it; overrides the config's `attach`.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,

    /// The metrics address to check, as `run --metrics` takes it (the DaemonSet passes it so);
    /// overrides the config's `metrics`.
    #[arg(long, value_name = "ADDR", value_parser = config::parse_listen)]
    pub metrics: Option<SocketAddr>,
}

/// `install`.
#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// Install below this root (for packaging); the unit still refers to the final paths.
    #[arg(long, value_name = "DIR", default_value = "/", value_parser = parse_root)]
    pub root: PathBuf,
    /// Directory for the binary, an absolute path as the installed system sees it (written
    /// below --root); the unit's ExecStart names it, and systemd takes only absolute paths.
    #[arg(long, value_name = "DIR", default_value = "/usr/local/sbin", value_parser = pin::parse_dir)]
    pub bindir: PathBuf,
    /// Replace an existing config file (by default an existing one is kept); the one
    /// replaced is kept as config.toml.bak beside it, replacing an earlier copy.
    #[arg(long)]
    pub force_config: bool,
}

/// `completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

/// `man`.
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Directory to write the pages into.
    pub dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_bad_value_from_the_environment_is_named_by_its_variable() {
        let parse = |args: &[&str], state_dir: Option<&str>| {
            let env = |name: &str| match name {
                "KEEPALIVE_STATE_DIR" => state_dir.map(Into::into),
                _ => None,
            };
            let argv = std::iter::once("keepalive-agent")
                .chain(args.iter().copied())
                .map(std::ffi::OsString::from);
            let mut cmd = finish(Cli::command());
            let err = cmd
                .try_get_matches_from_mut(argv.clone())
                .expect_err("a relative directory is refused");
            from_environment(err, argv, env).render().to_string()
        };
        // Given on the command line, the flag is named, with the variable set or not.
        for args in [
            &["status", "--state-dir", "rel"][..],
            &["--state-dir=rel", "status"],
        ] {
            for state_dir in [None, Some("/sys/fs/bpf/x")] {
                let text = parse(args, state_dir);
                assert!(text.contains("for '--state-dir <DIR>'"), "{args:?}: {text}");
            }
        }
        // clap reads the variable itself, so an error it found there is built here.
        let mut err = clap::Error::new(clap::error::ErrorKind::ValueValidation);
        for (kind, value) in [
            (clap::error::ContextKind::InvalidArg, "--state-dir <DIR>"),
            (clap::error::ContextKind::InvalidValue, "rel"),
        ] {
            err.insert(kind, clap::error::ContextValue::String(value.into()));
        }
        let argv = ["keepalive-agent", "status", "--", "--state-dir"].map(Into::into);
        let text = from_environment(err, argv, |_| Some("rel".into()))
            .render()
            .to_string();
        assert!(
            text.contains("invalid value 'rel' for 'KEEPALIVE_STATE_DIR'"),
            "{text}"
        );
    }

    #[test]
    fn directory_flags_are_hidden_only_where_they_do_nothing_or_are_refused() {
        let mut cmd = finish(Cli::command());
        cmd.build();
        for sub in cmd.get_subcommands().filter(|sub| sub.get_name() != "help") {
            let hidden = ["state_dir", "runtime_dir"].map(|id| {
                sub.get_arguments()
                    .find(|arg| arg.get_id() == id)
                    .unwrap_or_else(|| panic!("{} has no {id}", sub.get_name()))
                    .is_hide_set()
            });
            let expect = matches!(sub.get_name(), "install" | "completions" | "man");
            assert_eq!(hidden, [expect; 2], "{}", sub.get_name());
        }
        // `policy`'s has no default, and its subcommands say so too.
        let policy = cmd.find_subcommand("policy").unwrap();
        for sub in std::iter::once(policy).chain(policy.get_subcommands()) {
            if sub.get_name() == "help" {
                continue;
            }
            let help = sub
                .get_arguments()
                .find(|arg| arg.get_id() == "state_dir")
                .and_then(|arg| arg.get_help())
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(
                help.starts_with("Only carry out"),
                "{}: {help}",
                sub.get_name()
            );
        }
        for args in [
            &["policy", "list", "--state-dir", "/sys/fs/bpf/x"][..],
            &["--state-dir", "/sys/fs/bpf/x", "policy", "list"],
        ] {
            let matches = finish(Cli::command())
                .try_get_matches_from(
                    std::iter::once("keepalive-agent").chain(args.iter().copied()),
                )
                .unwrap();
            let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
            assert_eq!(
                cli.state_dir,
                Some(PathBuf::from("/sys/fs/bpf/x")),
                "{args:?}"
            );
        }
        // Still parsed, so that install can refuse them by name.
        let matches = finish(Cli::command())
            .try_get_matches_from(["keepalive-agent", "install", "--state-dir", "/sys/fs/bpf/x"])
            .unwrap();
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        assert_eq!(cli.state_dir, Some(PathBuf::from("/sys/fs/bpf/x")));
    }

    #[test]
    fn directory_flags_are_apart_from_each_command_s_own_options_in_its_help() {
        let mut cmd = finish(Cli::command());
        cmd.build();
        let mut commands = vec![cmd];
        let mut checked = 0;
        while let Some(mut cmd) = commands.pop() {
            let help = cmd.render_long_help().to_string();
            commands.extend(cmd.get_subcommands().cloned());
            // The options are listed one per line, each starting with its flag.
            let flags = |text: &str| -> Vec<String> {
                text.lines()
                    .filter_map(|line| line.trim_start().split([' ', ',', '=']).next())
                    .filter(|flag| flag.starts_with('-'))
                    .map(str::to_owned)
                    .collect()
            };
            let Some((own, global)) = help.split_once(&format!("\n{GLOBAL_HEADING}:\n")) else {
                assert!(!help.contains("-dir"), "{}: {help}", cmd.get_name());
                continue;
            };
            let name = cmd.get_name();
            assert_eq!(
                flags(global),
                ["--state-dir", "--runtime-dir"],
                "{name}: {help}"
            );
            assert!(
                !flags(own).iter().any(|flag| flag.ends_with("-dir")),
                "{name}: {help}"
            );
            checked += 1;
        }
        assert!(
            checked >= 8,
            "only {checked} commands list the directory flags"
        );
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keepalive-agent").chain(args.iter().copied()))
    }

    #[test]
    fn negative_numbers_get_the_range_they_are_outside() {
        for (args, range) in [
            (&["run", "--max-tracked-cgroups", "-1"][..], "1..=16777216"),
            (&["run", "--max-tracked-sockets", "-5"], "1..=16777216"),
            (&["status", "--port", "-1"], "1..=65535"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(
                err.contains(&format!("is not in {range}")),
                "{args:?}: {err}"
            );
        }
    }

    #[test]
    fn install_refuses_an_empty_root() {
        let err = parse(&["install", "--root="]).unwrap_err();
        assert!(err.to_string().contains("an empty root"), "{err}");
        assert!(parse(&["install", "--root", "pkg"]).is_ok());
    }

    #[test]
    fn run_accepts_seconds_and_units() {
        let cli = parse(&["run", "--idle", "90s", "--interval", "2m", "--count", "3"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("run");
        };
        assert_eq!(run.values.idle, Some(90));
        assert_eq!(run.values.interval, Some(120));
        assert_eq!(run.values.count, Some(3));
        let cli = parse(&["run", "--user-timeout", "1500ms"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("run");
        };
        assert_eq!(run.values.user_timeout, Some(1500));
        // 0 is "none", which overrides the config's user timeout.
        let Command::Run(run) = parse(&["run", "--user-timeout", "0"]).unwrap().command else {
            panic!("run");
        };
        assert_eq!(run.values.user_timeout, Some(0));
    }

    #[test]
    fn bad_values_name_flag_value_and_range() {
        for (args, needles) in [
            (
                &["run", "--idle", "0"][..],
                &["--idle", "0", "1 to 32767"][..],
            ),
            (
                &["run", "--interval", "40000"],
                &["--interval", "40000", "32767"],
            ),
            (&["run", "--count", "128"], &["--count", "128", "1 to 127"]),
            (&["run", "--count", "-1"], &["--count", "-1"]),
            (
                &["run", "--idle", "soon"],
                &["--idle", "soon", "not a duration"],
            ),
            (
                &["run", "--user-timeout", "0.5ms"],
                &["--user-timeout", "0.5ms", "milliseconds"],
            ),
            (
                &["run", "--user-timeout", "30d"],
                &["--user-timeout", "30days", "0 (none) or 1ms"],
            ),
            (
                &["policy", "set", "x", "--mode", "strict"],
                &["--mode", "strict", "enforce, fill, off, lock"],
            ),
            (
                &["run", "--user-timeout", "-1"],
                &["--user-timeout", "-1", "not a duration"],
            ),
            (&["install", "--bindir", "bin"], &["--bindir", "absolute"]),
            (
                &["--state-dir", "/sys/fs/bpf/../../tmp", "status"],
                &["--state-dir", "`..`"],
            ),
            (
                &["--runtime-dir", "run", "status"],
                &["--runtime-dir", "absolute"],
            ),
            (
                &["--runtime-dir", &format!("/run/{}", "k".repeat(90)), "run"],
                &["--runtime-dir", "control.sock", "108 bytes", "at most 107"],
            ),
        ] {
            let err = parse(args).unwrap_err().to_string();
            for needle in needles {
                assert!(err.contains(needle), "{args:?}: {err} lacks {needle}");
            }
        }
    }

    #[test]
    fn status_and_detach_flags() {
        let cli = parse(&[
            "--state-dir",
            "/sys/fs/bpf/x",
            "status",
            "--json",
            "--port",
            "80",
        ])
        .unwrap();
        assert_eq!(
            cli.state_dir.as_deref(),
            Some(std::path::Path::new("/sys/fs/bpf/x"))
        );
        let Command::Status(status) = cli.command else {
            panic!("status");
        };
        assert!(status.json);
        assert_eq!(status.port, Some(80));
        // No connection has port 0: a filter for it would only ever list nothing.
        assert!(parse(&["status", "--port", "0"]).is_err());
        assert!(parse(&["detach", "--cgroup", "/a"]).is_ok());
        // The longest runtime directory whose control socket fits a Unix socket address.
        let longest = format!("/run/{}", "k".repeat(89));
        let cli = parse(&["--runtime-dir", &longest, "status"]).unwrap();
        assert_eq!(cli.runtime_dir.as_os_str().len(), 94);
    }
}
