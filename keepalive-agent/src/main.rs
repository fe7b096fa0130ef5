//! `keepalive-agent`: parses the command line, runs the command, maps failure to an exit code.

use std::{io::Write as _, process::ExitCode};

use keepalive_agent::{cli, commands, error, logging};

fn main() -> ExitCode {
    let cli = cli::parse().unwrap_or_else(|err| {
        if let Some(document) = commands::cli_error_document(&err, std::env::args_os()) {
            // The exit code and stderr say it too, also if stdout is gone.
            let _ = writeln!(std::io::stdout(), "{document}");
        }
        logging::cli_error(&err)
    });
    logging::init();
    match commands::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            logging::fatal(&err);
            error::exit_code_for(&err)
        }
    }
}
