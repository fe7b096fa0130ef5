//! `keepalive-agent`: parses the command line, runs the command, maps failure to an exit code.

use std::process::ExitCode;

use keepalive_agent::{cli, commands, error, logging};

fn main() -> ExitCode {
    let cli = cli::parse().unwrap_or_else(|err| logging::cli_error(&err));
    logging::init();
    match commands::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            logging::fatal(&err);
            error::exit_code_for(&err)
        }
    }
}
