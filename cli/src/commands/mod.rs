//! One module per command.

mod build;
mod build_cache;
mod debug;
mod gc;
mod image;
mod images;
mod outputs;
mod tempfile;

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
        Command::Prune {
            all,
            keep_storage,
            filters,
            verbose,
            force: _,
        } => {
            let opts = gc::PruneOptions::parse(*all, keep_storage.as_deref(), filters, *verbose)?;
            gc::prune(&cli, &opts)
        }
        Command::Du { verbose } => gc::du(&cli, *verbose),
        Command::Tag { source, target } => image::tag(&cli, source, target),
        Command::Inspect { name } => image::inspect(&cli, name),
        Command::History { name, no_trunc } => image::history(&cli, name, *no_trunc),
        Command::Save { output, names } => image::save(&cli, output.as_deref(), names),
        Command::Load { input, quiet } => image::load(&cli, input.as_deref(), *quiet),
        Command::Push { name } => image::push(&cli, name),
        Command::Pull { name, platform } => image::pull(&cli, name, platform.as_deref()),
        Command::Debug { what } => debug::run(what),
    }
}
