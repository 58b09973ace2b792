//! One module per command.

mod build;
mod debug;
mod gc;
mod images;

use anyhow::Result;

use crate::args::{Cli, Command};

pub fn dispatch(cli: Cli) -> Result<i32> {
    match &cli.command {
        Command::Build(args) => build::run(&cli, args),
        Command::Images => images::list(&cli),
        Command::Rmi { names } => images::remove(&cli, names),
        Command::Login {
            registry,
            username,
            password,
            password_stdin,
        } => images::login(registry, username, password.as_deref(), *password_stdin),
        Command::Logout { registry } => images::logout(registry),
        Command::Prune { all } => images::prune(&cli, *all),
        Command::Debug { what } => debug::run(what),
    }
}
