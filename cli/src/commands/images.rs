//! Local image commands: `images`, `rmi`, `login`, `logout`, `prune`.

use std::io::Read;

use anyhow::{anyhow, bail, Result};
use strata_exporter::ImageStore;

use super::gc::{human_duration, human_size};
use crate::args::Cli;

fn human_age(created: i64) -> String {
    let secs = (chrono::Utc::now().timestamp() - created).max(0);
    format!("{} ago", human_duration(secs.unsigned_abs()))
}

pub fn list(cli: &Cli) -> Result<i32> {
    let images = ImageStore::open(&cli.root.join("images"))?;
    println!(
        "{:<40} {:<20} {:<14} {:<24} SIZE",
        "NAME", "TAG", "ID", "CREATED"
    );
    for img in images.list()? {
        let id = img
            .record
            .config_digest
            .hex()
            .chars()
            .take(12)
            .collect::<String>();
        println!(
            "{:<40} {:<20} {:<14} {:<24} {}",
            img.name,
            img.tag,
            id,
            human_age(img.created),
            human_size(img.size)
        );
    }
    Ok(0)
}

pub fn remove(cli: &Cli, names: &[String]) -> Result<i32> {
    let images = ImageStore::open(&cli.root.join("images"))?;
    let mut code = 0;
    for n in names {
        if images.remove(n)? {
            println!("Untagged: {n}");
        } else {
            eprintln!("Error: No such image: {n}");
            code = 1;
        }
    }
    Ok(code)
}

pub fn login(registry: &str, username: &str, password: Option<&str>, stdin: bool) -> Result<i32> {
    let password = match (password, stdin) {
        (Some(p), false) => p.to_string(),
        (None, true) => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s.trim_end_matches(['\n', '\r']).to_string()
        }
        (Some(_), true) => bail!("--password and --password-stdin are mutually exclusive"),
        (None, false) => bail!("a password is required (--password or --password-stdin)"),
    };
    strata_registry::login(registry, username, &password).map_err(|e| anyhow!("{e}"))?;
    println!("Login Succeeded");
    Ok(0)
}

pub fn logout(registry: &str) -> Result<i32> {
    strata_registry::logout(registry).map_err(|e| anyhow!("{e}"))?;
    println!("Removing login credentials for {registry}");
    Ok(0)
}
