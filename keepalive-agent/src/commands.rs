//! One function per subcommand: turns parsed arguments into library calls and prints results.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use comfy_table::{Table, presets};

use crate::{
    cgroup::Cgroup2,
    check,
    cli::{Cli, Command, PolicyCommand, StatusArgs},
    control::{PolicyRow, Request, Response},
    daemon::{self, Globals},
    detach, install,
    pin::StateDir,
    policy::Selector,
    status,
};

/// Writes to stdout; a closed pipe (`keepalive-agent status | head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("failed to write to stdout"),
    }
}

/// Whether writing failed because the reader went away (`status --json | head`).
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .map(io::Error::kind)
            .or_else(|| {
                cause
                    .downcast_ref::<serde_json::Error>()
                    .and_then(serde_json::Error::io_error_kind)
            })
            == Some(io::ErrorKind::BrokenPipe)
    })
}

fn json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    print(&format!("{}\n", serde_json::to_string_pretty(value)?))
}

/// `--state-dir`, else `state_dir` from the config, else the default: the same directory `run`
/// would use. The config is `--config FILE`, else the default file when it exists. An error in
/// the default file is a warning for a command that only reads (the state may still be where
/// it looks), and an error for one that removes: it might remove another directory's state.
fn state_dir(
    cli_state: Option<PathBuf>,
    config: Option<&Path>,
    removes: bool,
) -> anyhow::Result<StateDir> {
    if cli_state.is_some() {
        return Ok(StateDir::resolve(cli_state, || None));
    }
    let configured = match config {
        Some(path) => crate::config::load(Some(path), &Cgroup2::find()?)?.state_dir,
        // Without cgroup2 the command itself says so.
        None => match Cgroup2::find().map(|cgroup2| crate::config::load(None, &cgroup2)) {
            Ok(Ok(config)) => config.state_dir,
            Ok(Err(err)) if removes => {
                return Err(err.context(
                    "cannot tell which state directory the config names; correct it, or name \
                     the directory with --state-dir",
                ));
            }
            Ok(Err(err)) => {
                log::warn!(
                    "ignoring the config: {err:#}; looking for keepalive's state in {}",
                    StateDir::resolve(None, || None).root().display()
                );
                None
            }
            Err(_) => None,
        },
    };
    Ok(StateDir::resolve(None, || configured))
}

/// Runs the command.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        state_dir: cli_state,
        runtime_dir,
        command,
    } = cli;
    match command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("failed to start the async runtime")?;
            runtime.block_on(daemon::run(
                Globals {
                    state_dir: cli_state,
                    runtime_dir,
                },
                args,
            ))
        }
        Command::Status(args) => status_cmd(cli_state, &args),
        Command::Policy(cmd) => policy_cmd(&runtime_dir, cli_state.as_deref(), cmd),
        Command::Detach(args) => {
            let state = state_dir(cli_state, args.config.config.as_deref(), true)?;
            let removed = detach::detach(&state, &runtime_dir, args.cgroup.as_deref())?;
            if removed.is_empty() {
                print(&format!(
                    "nothing to detach: no keepalive state in {}\n",
                    state.root().display()
                ))
            } else {
                let mut text = removed.join("\n");
                text.push_str(
                    "\nkeepalive is detached; open connections keep the keepalive settings \
                     they have\n",
                );
                print(&text)
            }
        }
        Command::Check(args) => {
            let report = check::run(
                check::Target {
                    state_dir: cli_state,
                    config: args.config.as_deref(),
                    cgroup: args.cgroup.as_deref(),
                    metrics: args.metrics,
                },
                &runtime_dir,
            );
            if args.json {
                json(&report)?;
            } else {
                print(&check::render(&report))?;
            }
            if report.ready {
                Ok(())
            } else {
                Err(crate::error::Error::NotReady.into())
            }
        }
        Command::Install(args) => {
            install::refuse_directories(cli_state.as_deref(), &runtime_dir)?;
            // Output that cannot be written (stdout on a full disk) does not stop the install
            // halfway; its error comes after.
            let mut unprinted = None;
            install::install(&args, &mut |line| {
                if unprinted.is_none()
                    && let Err(err) = print(&format!("{line}\n"))
                {
                    unprinted = Some(err);
                }
            })?;
            unprinted.map_or(Ok(()), Err)
        }
        Command::Completions(args) => print(&String::from_utf8_lossy(&install::completion_script(
            args.shell,
        ))),
        Command::Man(args) => {
            // A file there is a mistyped argument, not a directory to make (EEXIST).
            if args.dir.exists() && !args.dir.is_dir() {
                return Err(crate::error::usage(format!(
                    "{} is not a directory; give the directory to write the man pages into",
                    args.dir.display()
                )));
            }
            std::fs::create_dir_all(&args.dir)
                .with_context(|| format!("failed to create {}", args.dir.display()))?;
            install::write_man_pages(&args.dir)?;
            print(&format!("wrote man pages to {}\n", args.dir.display()))
        }
    }
}

/// A writer that notes whether anything went through it.
struct Noting<W> {
    inner: W,
    wrote: bool,
}

impl<W: io::Write> io::Write for Noting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wrote |= !buf.is_empty();
        self.inner.write(buf)
    }

    // The JSON writer's pieces are a few bytes each: the buffered writer's own `write_all`
    // copies them in place, where the trait's default would loop over `write` for each.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.wrote |= !buf.is_empty();
        self.inner.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The document for a command line the parser rejects when it asks for `--json` (`args` as
/// the process got them): `ok` (false), `error` and `code` (2), as for a refusal after
/// parsing, so a script that asked for JSON gets it whichever check refused the line. The
/// message goes to stderr as well. Help and version are no failures, and get none.
pub fn cli_error_document(
    err: &clap::Error,
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Option<String> {
    let json = args
        .into_iter()
        .skip(1)
        .take_while(|arg| arg != "--")
        .any(|arg| arg == "--json");
    if !json || !err.use_stderr() {
        return None;
    }
    // The message without clap's "error: " and the advice to try --help that follows it.
    let text = err.render().to_string();
    let message = text.split("\n\n").next().unwrap_or_default().trim_end();
    let message = message.strip_prefix("error: ").unwrap_or(message);
    serde_json::to_string(&Response::failure(&crate::error::usage(message))).ok()
}

/// `status`. With `--json`, a failure before the document began is a document too, as the
/// `policy` commands' are: `ok`, `error` and `code`; the message also goes to stderr, and the
/// exit code says the same.
fn status_cmd(cli_state: Option<PathBuf>, args: &StatusArgs) -> anyhow::Result<()> {
    let stdout = io::stdout().lock();
    let mut out = Noting {
        inner: io::BufWriter::with_capacity(1 << 16, stdout),
        wrote: false,
    };
    let written = state_dir(cli_state, args.config.config.as_deref(), false)
        .and_then(|state| write_status(&state, args, &mut out));
    let written = match written {
        Err(err) if args.json && !out.wrote => {
            // What counts is the error, and the exit code it gives, also if stdout is gone.
            if let Ok(document) = serde_json::to_string(&Response::failure(&err)) {
                let _ = writeln!(out, "{document}").and_then(|()| out.flush());
            }
            return Err(err);
        }
        other => other,
    };
    match written.and_then(|()| out.flush().map_err(Into::into)) {
        Err(err) if is_broken_pipe(&err) => Ok(()),
        other => other,
    }
}

/// The status document or table, into `out`.
fn write_status(
    state: &StateDir,
    args: &StatusArgs,
    out: &mut impl io::Write,
) -> anyhow::Result<()> {
    status::check_state_dir(state)?;
    let cgroup2 = Cgroup2::find()?;
    let filter = status::Filter {
        cgroup: args
            .cgroup
            .as_deref()
            .map(|c| Selector::parse_filter(&cgroup2, c))
            .transpose()?,
        port: args.port,
    };
    if args.json {
        status::write_json(state, &cgroup2, &filter, out)
    } else {
        status::write_table(state, &cgroup2, &filter, out)
    }
}

fn policy_table(rows: &[PolicyRow]) -> String {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header([
        "CGROUP",
        "ID",
        "IDLE",
        "INTVL",
        "CNT",
        "USER-TIMEOUT",
        "MODE",
        "MATCHED BY",
        "SOURCE",
    ]);
    for row in rows {
        let secs = |secs: u32| status::duration_cell(std::time::Duration::from_secs(secs.into()));
        // An `off` policy sets nothing: values it keeps (for a later mode) would read as set.
        let values = if row.mode == "off" {
            [
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
            ]
        } else {
            [
                secs(row.idle),
                secs(row.interval),
                row.count.to_string(),
                row.user_timeout.map_or("-".into(), |ms| {
                    status::duration_cell(std::time::Duration::from_millis(ms.into()))
                }),
            ]
        };
        let [idle, interval, count, user_timeout] = values;
        table.add_row([
            status::printable(&row.cgroup).into_owned(),
            row.cgroup_id.to_string(),
            idle,
            interval,
            count,
            user_timeout,
            row.mode.clone(),
            status::printable(&row.selector).into_owned(),
            row.source.clone(),
        ]);
    }
    status::table_text(&table)
}

fn print_response(response: &Response, list: bool) -> anyhow::Result<()> {
    let mut text = String::new();
    if let Some(message) = &response.message {
        text.push_str(&status::printable_lines(message));
        text.push('\n');
    }
    if let Some(applied) = &response.applied {
        text.push_str(&crate::apply::describe(applied));
        text.push('\n');
    }
    if list {
        text.push_str(&policy_table(
            response.policies.as_deref().unwrap_or_default(),
        ));
        for pending in response.pending.iter().flatten() {
            text.push_str(&format!("pending: {}\n", status::printable(pending)));
        }
        for masked in response.masked.iter().flatten() {
            text.push_str(&format!("masked: {}\n", status::printable(masked)));
        }
    }
    print(&text)
}

fn policy_cmd(
    runtime_dir: &std::path::Path,
    state_dir: Option<&std::path::Path>,
    cmd: PolicyCommand,
) -> anyhow::Result<()> {
    let (request, as_json, list) = match cmd {
        PolicyCommand::List { json } => (Request::List, json, true),
        PolicyCommand::Reload { json } => (Request::Reload, json, false),
        PolicyCommand::Set {
            cgroup,
            values,
            mode,
            json,
        } => (
            Request::Set {
                cgroup,
                idle: values.idle,
                interval: values.interval,
                count: values.count,
                user_timeout_ms: values.user_timeout,
                mode: mode.map(|m| m.to_string()),
            },
            json,
            false,
        ),
        PolicyCommand::Unset { cgroup, json } => (Request::Unset { cgroup }, json, false),
    };
    if as_json {
        // The answer goes to stdout whatever it says, so scripts always get JSON; a refusal,
        // or no agent to answer, still goes to stderr and sets the exit code.
        let response = match crate::control::call(runtime_dir, state_dir, &request) {
            Ok(response) => response,
            Err(err) => {
                json(&Response::failure(&err))?;
                return Err(err);
            }
        };
        json(&response)?;
        return crate::control::carried_out(response).map(drop);
    }
    let response = crate::control::call_agent(runtime_dir, state_dir, &request)?;
    print_response(&response, list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_durations_read_as_status_shows_them() {
        let row = PolicyRow {
            cgroup: "/app".into(),
            cgroup_id: 7,
            idle: 120,
            interval: 10,
            count: 5,
            user_timeout: Some(90_500),
            mode: "enforce".into(),
            selector: "/app".into(),
            source: "runtime".into(),
        };
        let off = PolicyRow {
            mode: "off".into(),
            ..row.clone()
        };
        let table = policy_table(&[row, off]);
        let cells =
            |n: usize| -> Vec<&str> { table.lines().nth(n).unwrap().split_whitespace().collect() };
        assert_eq!(cells(1)[2..6], ["2m", "10s", "5", "1m30s500ms"], "{table}");
        assert_eq!(cells(2)[2..7], ["-", "-", "-", "-", "off"], "{table}");
        // No padding left at line ends, and one line break at the end.
        assert!(
            table.lines().all(|line| line == line.trim_end())
                && table.ends_with('\n')
                && !table.ends_with("\n\n"),
            "{table:?}"
        );
    }

    #[test]
    fn a_rejected_command_line_asking_for_json_gets_a_document() {
        let document = |args: &[&str]| {
            let args: Vec<std::ffi::OsString> = std::iter::once("keepalive-agent")
                .chain(args.iter().copied())
                .map(Into::into)
                .collect();
            let err = crate::cli::finish(<Cli as clap::CommandFactory>::command())
                .try_get_matches_from(&args)
                .expect_err("rejected");
            cli_error_document(&err, args)
        };
        let got = document(&["status", "--json", "--port", "0"]).expect("a document");
        let got: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(
            (&got["ok"], &got["code"]),
            (&false.into(), &2.into()),
            "{got}"
        );
        let error = got["error"].as_str().unwrap();
        assert!(
            error.starts_with("invalid value '0' for '--port <N>'"),
            "{error}"
        );
        assert!(!error.contains("--help"), "{error}");
        assert!(document(&["policy", "set", "/x", "--idle", "0", "--json"]).is_some());
        // Without --json, or only after `--`, or for help, there is none.
        assert!(document(&["status", "--port", "0"]).is_none());
        assert!(document(&["policy", "set", "--idle", "0", "--", "--json"]).is_none());
        assert!(document(&["status", "--json", "--help"]).is_none());
    }
}
