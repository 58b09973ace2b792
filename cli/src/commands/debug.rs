//! `strata debug ast|dag`.

use anyhow::{Context, Result};
use strata_dag::Platform;
use strata_frontend::convert::{
    convert, ConvertError, ConvertOptions, ErrorKind, ImageResolver, ResolvedImage,
};
use strata_frontend::instructions::Location;

use crate::args::DebugCommand;
use crate::diagnostics;

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
            let parsed = match strata_frontend::parser::parse(&text) {
                Ok(p) => p,
                Err(e) => {
                    let err = ConvertError {
                        message: e.message,
                        location: Some(Location {
                            start_line: e.line,
                            end_line: e.end_line,
                        }),
                        kind: ErrorKind::Parse,
                    };
                    let name = file.display().to_string();
                    eprintln!("{}", diagnostics::render_convert_error(&name, &text, &err));
                    return Ok(1);
                }
            };
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
                // The same parsing as `build`, so both lower the same graph.
                build_args: super::build::parse_build_args(build_args),
                target: target.clone(),
                dockerfile_name: file.display().to_string(),
                ..Default::default()
            };
            let plan = match convert(&text, &opts, &OfflineResolver) {
                Ok(p) => p,
                Err(e) => {
                    let name = file.display().to_string();
                    eprintln!("{}", diagnostics::render_convert_error(&name, &text, &e));
                    return Ok(1);
                }
            };
            if !plan.warnings.is_empty() {
                eprintln!("{}", diagnostics::render_warnings(&plan.warnings));
            }
            if let Some(e) = &plan.lint_error {
                eprintln!("ERROR: {e}");
                return Ok(1);
            }
            print!("{}", plan.definition.dump());
            Ok(0)
        }
    }
}
