//! Logging to stderr: one line per event, `RUST_LOG` picks the level (default `info`), colors
//! only on a terminal. Under systemd (stderr connected to the journal) each line carries a
//! `<N>` priority prefix instead of a timestamp, which journald turns into the entry's priority.

use std::{io::Write as _, os::unix::fs::MetadataExt as _};

/// Whether stderr is the journal stream systemd set up (`JOURNAL_STREAM=dev:ino`).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Sets up the logger.
pub fn init() {
    let env = env_logger::Env::default().default_filter_or("info");
    let mut builder = env_logger::Builder::from_env(env);
    let journal = stderr_is_journal();
    builder.format(move |buf, record| {
        let message = record.args().to_string();
        if journal {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            buf.write_all(journal_lines(priority, &message).as_bytes())
        } else {
            let level = record.level();
            let style = buf.default_level_style(level);
            let message = crate::status::printable_lines(&message);
            writeln!(
                buf,
                "[{} {style}{level:<5}{style:#}] {message}",
                buf.timestamp()
            )
        }
    });
    builder.init();
}

/// `message` for the journal stream: each line at `priority` (journald reads a `<N>` prefix on
/// every line, and takes a line without one at the unit's default), and with no control
/// characters. Cgroup paths, which a delegated user names, thus cannot set a line's priority
/// or drive the terminal of whoever reads the journal.
fn journal_lines(priority: u8, message: &str) -> String {
    crate::status::printable_lines(message)
        .split('\n')
        .map(|line| format!("<{priority}>{line}\n"))
        .collect()
}

/// Reports the error that ends the process on stderr: under systemd at error priority, so
/// `journalctl -p err` shows why the agent stopped.
pub fn fatal(err: &anyhow::Error) {
    eprint!("{}", fatal_line(err, stderr_is_journal()));
}

/// Reports a command line clap did not take, or the help or version it asked for, and exits
/// with clap's code (2 for an error). Under systemd an error goes to the journal at error
/// priority, as [`fatal`]'s do (a typo in `ExecStart=` is a start the unit does not retry),
/// without clap's blank line.
pub fn cli_error(err: &clap::Error) -> ! {
    if err.use_stderr() && stderr_is_journal() {
        let text = err.render().to_string();
        let text: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .collect();
        let text = text.join("\n");
        let text = text.strip_prefix("error: ").unwrap_or(&text);
        eprint!("{}", journal_lines(3, &format!("keepalive-agent: {text}")));
        std::process::exit(err.exit_code());
    }
    err.exit()
}

/// The error as `keepalive-agent: …` lines: paths and names in it come from the command line,
/// the config or the file system, and none of them may drive the terminal.
fn fatal_line(err: &anyhow::Error, journal: bool) -> String {
    let message = format!("keepalive-agent: {err:#}");
    if journal {
        journal_lines(3, &message)
    } else {
        format!("{}\n", crate::status::printable_lines(&message))
    }
}

/// `n` and the noun that goes with it: "1 policy", "2 policies".
pub fn counted(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_takes_the_singular_only_for_one() {
        assert_eq!(counted(1u32, "policy", "policies"), "1 policy");
        assert_eq!(counted(0u32, "policy", "policies"), "0 policies");
        assert_eq!(counted(2u64, "namespace", "namespaces"), "2 namespaces");
    }

    #[test]
    fn a_fatal_error_has_error_priority_only_in_the_journal() {
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(fatal_line(&err, true), "<3>keepalive-agent: outer: inner\n");
        assert_eq!(fatal_line(&err, false), "keepalive-agent: outer: inner\n");
    }

    #[test]
    fn a_fatal_error_keeps_its_lines_but_not_terminal_controls() {
        let err = anyhow::anyhow!("no policy is set for /a\u{1b}[2Jb\nwarning: x\ty");
        assert_eq!(
            fatal_line(&err, false),
            "keepalive-agent: no policy is set for /a\\u{1b}[2Jb\nwarning: x\\ty\n"
        );
    }

    #[test]
    fn every_line_for_the_journal_carries_the_priority() {
        // A cgroup named to forge an emergency entry gets the agent's priority all the same.
        assert_eq!(
            journal_lines(6, "cgroup /x\n<0>forged\u{7} appeared"),
            "<6>cgroup /x\n<6><0>forged\\u{7} appeared\n"
        );
        let err = anyhow::anyhow!("set /a: idle 5s\nwarning: /a does not exist yet");
        assert_eq!(
            fatal_line(&err, true),
            "<3>keepalive-agent: set /a: idle 5s\n<3>warning: /a does not exist yet\n"
        );
    }
}
