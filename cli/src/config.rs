//! `/etc/strata/config.toml` (or `$STRATA_CONFIG`): settings that belong to the machine
//! rather than to one command line.
//!
//! ```toml
//! insecure-registries = ["registry.lan:5000"]
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::args::Cli;

const DEFAULT_PATH: &str = "/etc/strata/config.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    /// Registries (`host:port`) reached over plain HTTP. Loopback registries always are.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
}

impl Config {
    /// Reads `$STRATA_CONFIG`, else `/etc/strata/config.toml`. Only the default file may be
    /// absent: a path the user named must exist.
    pub fn load() -> Result<Config> {
        match std::env::var_os("STRATA_CONFIG") {
            Some(p) if !p.is_empty() => Self::read(&PathBuf::from(p), false),
            _ => Self::read(Path::new(DEFAULT_PATH), true),
        }
    }

    fn read(path: &Path, may_be_missing: bool) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if may_be_missing && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default())
            }
            Err(e) => return Err(e).with_context(|| format!("read config {}", path.display())),
        };
        Self::parse(&text).with_context(|| format!("parse config {}", path.display()))
    }

    fn parse(text: &str) -> Result<Config> {
        Ok(toml::from_str(text)?)
    }
}

/// The registries to reach over plain HTTP: `--insecure-registry` flags plus the config
/// file's list.
pub fn insecure_registries(cli: &Cli) -> Result<Vec<String>> {
    let mut all = cli.insecure_registries.clone();
    for r in Config::load()?.insecure_registries {
        if !all.contains(&r) {
            all.push(r);
        }
    }
    Ok(all)
}

/// A registry client honouring the insecure-registry settings.
pub fn registry_client(cli: &Cli) -> Result<strata_registry::Client> {
    Ok(strata_registry::Client::new(
        strata_registry::ClientConfig {
            insecure: insecure_registries(cli)?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_insecure_registries_and_rejects_bad_types() {
        let c = Config::parse("insecure-registries = [\"a:5000\", \"b\"]\n").unwrap();
        assert_eq!(c.insecure_registries, ["a:5000", "b"]);
        assert!(Config::parse("").unwrap().insecure_registries.is_empty());
        let err = Config::parse("insecure-registries = \"a:5000\"").unwrap_err();
        assert!(
            format!("{err:#}").contains("insecure-registries"),
            "{err:#}"
        );
    }

    #[test]
    fn a_named_config_file_must_exist() {
        let err = Config::read(Path::new("/nonexistent/strata.toml"), false).unwrap_err();
        assert!(format!("{err:#}").contains("read config"), "{err:#}");
        assert!(Config::read(Path::new("/nonexistent/strata.toml"), true).is_ok());
    }
}
