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
    if stderr_is_journal() {
        builder.format(|buf, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{priority}>{}", record.args())
        });
    } else {
        builder.format_target(false);
    }
    builder.init();
}

/// Reports the error that ends the process on stderr: under systemd at error priority, so
/// `journalctl -p err` shows why the agent stopped.
pub fn fatal(err: &anyhow::Error) {
    eprintln!("{}", fatal_line(err, stderr_is_journal()));
}

fn fatal_line(err: &anyhow::Error, journal: bool) -> String {
    let prefix = if journal { "<3>" } else { "" };
    // Paths and names in the message come from the command line, the config or the file
    // system; none of them may drive the terminal.
    let message = crate::status::printable_lines(&format!("{err:#}"));
    format!("{prefix}keepalive-agent: {message}")
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
        assert_eq!(fatal_line(&err, true), "<3>keepalive-agent: outer: inner");
        assert_eq!(fatal_line(&err, false), "keepalive-agent: outer: inner");
    }

    #[test]
    fn a_fatal_error_keeps_its_lines_but_not_terminal_controls() {
        let err = anyhow::anyhow!("no policy is set for /a\u{1b}[2Jb\nwarning: x\ty");
        assert_eq!(
            fatal_line(&err, false),
            "keepalive-agent: no policy is set for /a\\u{1b}[2Jb\nwarning: x\\ty"
        );
    }
}
