//! The `strata` command line: clap-derive arguments and one module per command.

mod args;
mod commands;
mod config;
mod diagnostics;
mod runopts;
mod store;

use clap::Parser;

pub use args::Cli;

/// Runs the command line and returns the process exit code.
pub fn run() -> i32 {
    let cli = Cli::parse();
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ERROR: {e:#}");
            1
        }
    }
}
