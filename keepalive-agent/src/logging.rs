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
