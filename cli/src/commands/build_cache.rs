//! `--cache-to` / `--cache-from` for `strata build`: the CLI side of `strata_cache`.

use anyhow::{anyhow, Context, Result};
use std::collections::HashSet;
use strata_cache::{CacheFrom, CacheTo, ExportTarget, ImportedCache, Mode};
use strata_registry::Client;
use strata_solver::progress::{Progress, ProgressEvent};

use strata_dag::image::ImageConfig;
use strata_exporter::Compression;
use strata_solver::{CacheKey, CacheStore, Ref, SolveReport, Worker};

use crate::store::Store;

/// Parsed cache options, checked before anything is built.
pub struct CacheOptions {
    pub to: Vec<CacheTo>,
    pub from: Vec<CacheFrom>,
}

impl CacheOptions {
    pub fn parse(to: &[String], from: &[String]) -> Result<Self> {
        Ok(CacheOptions {
            to: to
                .iter()
                .map(|s| strata_cache::parse_cache_to(s).with_context(|| format!("--cache-to {s}")))
                .collect::<Result<_>>()?,
            from: from
                .iter()
                .map(|s| {
                    strata_cache::parse_cache_from(s).with_context(|| format!("--cache-from {s}"))
                })
                .collect::<Result<_>>()?,
        })
    }
}

fn source_name(from: &CacheFrom) -> String {
    match from {
        CacheFrom::Registry(r) => r.to_string(),
        CacheFrom::Local(p) => p.display().to_string(),
    }
}

/// Reads every `--cache-from` description. A missing or unreadable cache is a warning,
/// not an error, as with buildx: the first run of a pipeline has no cache yet, and a
/// broken cache must not stop a build that can do the work itself.
pub fn import_descriptions(
    client: &Client,
    from: &[CacheFrom],
    progress: &dyn Progress,
) -> Vec<ImportedCache> {
    let mut imports = Vec::new();
    for f in from {
        let name = source_name(f);
        match strata_cache::fetch_description(client, f) {
            Ok(Some(imported)) => {
                progress.event(ProgressEvent::Info {
                    message: format!(
                        "#importing cache manifest from {name}: {} records, {} layers",
                        imported.description.records.len(),
                        imported.description.layers.len()
                    ),
                });
                imports.push(imported);
            }
            Ok(None) => progress.event(ProgressEvent::Info {
                message: format!("WARNING: no build cache at {name} (nothing imported)"),
            }),
            Err(e) => progress.event(ProgressEvent::Info {
                message: format!(
                    "WARNING: import build cache from {name}: {}",
                    strata_solver::error_chain(&e)
                ),
            }),
        }
    }
    imports
}

/// What a cache export can hold: every step this solve resolved, and the steps of the plan
/// it did not need to visit (below a hit) whose results this store still has, so that a
/// fully cached rebuild exports as full a cache as the cold build did. Imported records
/// that were never materialised here are not re-exported.
pub fn exportable_records(
    store: &Store,
    worker: &dyn Worker,
    report: &SolveReport,
) -> Vec<(CacheKey, Ref)> {
    let mut out = report.resolved.clone();
    let have: HashSet<CacheKey> = out.iter().map(|(k, _)| *k).collect();
    for key in report.planned.iter().filter(|k| !have.contains(*k)) {
        if let Ok(Some(r)) = store.cache.get(key) {
            if worker.exists(&r) {
                out.push((*key, r));
            }
        }
    }
    out
}

/// What a solve leaves for cache export.
pub struct Solved<'a> {
    pub store: &'a Store,
    /// The descriptions imported with `--cache-from`.
    pub imported: &'a [ImportedCache],
    /// See [`exportable_records`].
    pub records: Vec<(CacheKey, Ref)>,
    pub result: &'a Ref,
    pub source_date_epoch: Option<i64>,
    /// The `RUN --mount=type=cache` ids of the build (for `cache-mounts=true`).
    pub cache_mount_ids: Vec<String>,
}

/// Writes every `--cache-to` but `inline` (which the image export embeds).
pub fn export_caches(
    solved: &Solved<'_>,
    client: &Client,
    to: &[CacheTo],
    progress: &dyn Progress,
) -> Result<()> {
    let content = &solved.store.content;
    for spec in to {
        let (report, name) = match &spec.target {
            ExportTarget::Inline => continue,
            ExportTarget::Registry(reference) => {
                let desc = describe(solved, spec)?;
                let report = strata_cache::push_registry(client, content, &desc, reference)
                    .with_context(|| format!("export build cache to {reference}"))?;
                (report, reference.to_string())
            }
            ExportTarget::Local(dir) => {
                let desc = describe(solved, spec)?;
                let report = strata_cache::write_local(content, &desc, dir)
                    .with_context(|| format!("export build cache to {}", dir.display()))?;
                (report, dir.display().to_string())
            }
        };
        progress.event(ProgressEvent::Info {
            message: format!(
                "#exporting cache to {name}: {} records, {} layers, {} cache mounts, wrote {} blobs ({} bytes), {} already there, {} mounted, manifest {}",
                report.records,
                report.layers,
                report.mounts,
                report.written_blobs,
                report.written_bytes,
                report.existing_blobs,
                report.mounted_blobs,
                report.manifest_digest
            ),
        });
    }
    Ok(())
}

/// The image config, with the description of the final image's steps in it when
/// `--cache-to type=inline` asks. Its blobs are the image's own layers (same compression
/// and SOURCE_DATE_EPOCH labels as the image export, which then reuses them).
pub fn with_inline_cache(
    mut image: ImageConfig,
    opts: &CacheOptions,
    solved: &Solved<'_>,
    compression: Option<&Compression>,
) -> Result<ImageConfig> {
    let Some(spec) = opts.to.iter().find(|c| c.target == ExportTarget::Inline) else {
        return Ok(image);
    };
    let spec = CacheTo {
        compression: compression.cloned().unwrap_or_default(),
        ..spec.clone()
    };
    let desc = describe(solved, &spec)?;
    image.inline_cache = Some(serde_json::to_value(&desc).context("encode inline cache")?);
    Ok(image)
}

/// The description of the records `spec.mode` selects, with the imported records this
/// store can serve carried over.
pub fn describe(solved: &Solved<'_>, spec: &CacheTo) -> Result<strata_cache::CacheDescription> {
    let store = solved.store;
    let epoch = solved.source_date_epoch;
    let records = strata_cache::select(
        store.snapshotter.as_ref(),
        &solved.records,
        spec.mode,
        solved.result,
    )
    .map_err(|e| anyhow!(e))
    .context("select cache records")?;
    let mut desc = strata_cache::describe(
        store.snapshotter.as_ref(),
        &store.content,
        &records,
        &spec.compression,
        epoch,
        &super::outputs::blob_label(&spec.compression, epoch),
    )
    .context("describe build cache")?;
    let within = match spec.mode {
        Mode::Min => Some(desc.longest_chain()),
        Mode::Max => None,
    };
    let others: Vec<&strata_cache::CacheDescription> =
        solved.imported.iter().map(|i| &i.description).collect();
    desc.carry_over(&others, &store.content, within.as_deref());
    if spec.cache_mounts {
        desc.add_cache_mounts(
            &store.cache_mounts_dir(),
            &solved.cache_mount_ids,
            &store.content,
            &spec.compression,
            epoch,
        )
        .context("export cache mounts")?;
    }
    Ok(desc)
}
