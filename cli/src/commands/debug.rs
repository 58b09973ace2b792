//! `strata debug ast|dag`.

use anyhow::{anyhow, Context, Result};
use strata_dag::Platform;
use strata_frontend::convert::{convert, ConvertOptions, ImageResolver, ResolvedImage};

use crate::args::DebugCommand;

/// Resolves every image to a fixed fake digest so `debug dag` needs no registry.
struct OfflineResolver;

impl ImageResolver for OfflineResolver {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<ResolvedImage, String> {
        let digest = strata_dag::Digest::of(reference.as_bytes());
        Ok(ResolvedImage {
            pinned: format!("{reference}@{digest}"),
            config: Default::default(),
        })
    }
}

pub fn run(what: &DebugCommand) -> Result<i32> {
    match what {
        DebugCommand::Ast { file } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("read {}", file.display()))?;
            let parsed = strata_frontend::parser::parse(&text)
                .map_err(|e| anyhow!("{}:{}: {}", file.display(), e.line, e.message))?;
            println!("{}", parsed.root.dump());
            Ok(0)
        }
        DebugCommand::Dag {
            file,
            build_args,
            target,
        } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("read {}", file.display()))?;
            let opts = ConvertOptions {
                build_args: build_args
                    .iter()
                    .filter_map(|a| {
                        a.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                    })
                    .collect(),
                target: target.clone(),
                dockerfile_name: file.display().to_string(),
                ..Default::default()
            };
            let plan = convert(&text, &opts, &OfflineResolver).map_err(|e| {
                let line = e.location.map(|l| l.start_line).unwrap_or(0);
                anyhow!("{}:{line}: {}", file.display(), e.message)
            })?;
            print!("{}", plan.definition.dump());
            Ok(0)
        }
    }
}
