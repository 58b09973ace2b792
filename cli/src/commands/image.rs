//! Commands on one image of the local store: `tag`, `inspect`, `history`, `save`, `load`,
//! `push`, `pull`.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use strata_dag::{Digest, Platform};
use strata_exporter::{ImageRecord, ImageStore, StoredImage};
use strata_registry::Reference;

use super::gc::human_size;
use crate::args::Cli;
use crate::store::Store;

fn image_store(cli: &Cli) -> Result<ImageStore> {
    Ok(ImageStore::open(&cli.root.join("images"))?)
}

fn lookup(images: &ImageStore, name: &str) -> Result<StoredImage> {
    images
        .get(name)?
        .ok_or_else(|| anyhow!("no such image: {name}"))
}

/// `strata tag SRC DST`: DST names the image SRC names.
pub fn tag(cli: &Cli, source: &str, target: &str) -> Result<i32> {
    let images = image_store(cli)?;
    let src = lookup(&images, source)?;
    images
        .tag(target, &src.record, src.created)
        .with_context(|| format!("tag {source} as {target}"))?;
    Ok(0)
}

/// `strata inspect NAME`: the image config JSON, byte for byte as stored.
pub fn inspect(cli: &Cli, name: &str) -> Result<i32> {
    let images = image_store(cli)?;
    let img = lookup(&images, name)?;
    let store = Store::open(&cli.root)?;
    let bytes = store
        .content
        .read(&img.record.config_digest)
        .with_context(|| format!("read the config of {name}"))?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)?;
    out.write_all(b"\n")?;
    Ok(0)
}

fn human_age(created: Option<&str>) -> String {
    let Some(t) = created.and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok()) else {
        return "N/A".into();
    };
    let secs = (chrono::Utc::now().timestamp() - t.timestamp()).max(0);
    format!("{} ago", super::gc::human_duration(secs.unsigned_abs()))
}

/// Docker's truncation: 45 characters, the last one an ellipsis.
fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

/// The uncompressed size of each layer (what `docker history` shows), by streaming it.
fn layer_sizes(store: &Store, record: &ImageRecord) -> Result<Vec<u64>> {
    let manifest = strata_exporter::read_manifest(&store.content, record)?;
    let mut sizes = Vec::new();
    for l in manifest.layers() {
        let digest = Digest::parse(l.digest().as_ref())
            .ok_or_else(|| anyhow!("layer digest {} is not sha256", l.digest()))?;
        let mut plain = strata_exporter::layer_reader(&store.content, &digest)?;
        let n = std::io::copy(&mut plain, &mut std::io::sink())
            .with_context(|| format!("decompress layer {digest}"))?;
        sizes.push(n);
    }
    Ok(sizes)
}

/// `strata history NAME`: one line per history entry, newest first, as `docker history`.
pub fn history(cli: &Cli, name: &str, no_trunc: bool) -> Result<i32> {
    let images = image_store(cli)?;
    let img = lookup(&images, name)?;
    let store = Store::open(&cli.root)?;
    let bytes = store.content.read(&img.record.config_digest)?;
    let config: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("parse the config of {name}"))?;
    let history = config["history"].as_array().cloned().unwrap_or_default();
    let sizes = layer_sizes(&store, &img.record)?;
    // Non-empty entries take the layers in order.
    let mut layer = 0usize;
    let mut rows = Vec::new();
    for h in &history {
        let empty = h["empty_layer"].as_bool().unwrap_or(false);
        let size = if empty {
            0
        } else {
            let s = sizes.get(layer).copied().unwrap_or(0);
            layer += 1;
            s
        };
        rows.push((
            h["created"].as_str().map(str::to_string),
            h["created_by"].as_str().unwrap_or("").to_string(),
            size,
            h["comment"].as_str().unwrap_or("").to_string(),
        ));
    }
    let id = if no_trunc {
        img.record.config_digest.to_string()
    } else {
        img.record.config_digest.hex().chars().take(12).collect()
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<14} {:<24} {:<46} {:<10} COMMENT",
        "IMAGE", "CREATED", "CREATED BY", "SIZE"
    )?;
    for (i, (created, by, size, comment)) in rows.iter().rev().enumerate() {
        let shown_id = if i == 0 { id.as_str() } else { "<missing>" };
        let by = if no_trunc {
            by.clone()
        } else {
            truncate(by, 45)
        };
        writeln!(
            out,
            "{:<14} {:<24} {:<46} {:<10} {}",
            shown_id,
            human_age(created.as_deref()),
            by,
            human_size(*size),
            comment
        )?;
    }
    Ok(0)
}

/// `strata save [-o FILE] NAME...`: a `docker load` tar of the images (stdout without -o).
pub fn save(cli: &Cli, output: Option<&Path>, names: &[String]) -> Result<i32> {
    let images = image_store(cli)?;
    let mut selected: Vec<(ImageRecord, Vec<String>)> = Vec::new();
    for n in names {
        let img = lookup(&images, n)?;
        let tag = format!("{}:{}", img.name, img.tag);
        match selected.iter_mut().find(|(r, _)| *r == img.record) {
            Some((_, tags)) => {
                if !tags.contains(&tag) {
                    tags.push(tag)
                }
            }
            None => selected.push((img.record, vec![tag])),
        }
    }
    let store = Store::open(&cli.root)?;
    match output {
        Some(p) if p != Path::new("-") => {
            strata_exporter::write_docker_archive_multi(&store.content, &selected, p)
                .with_context(|| format!("save to {}", p.display()))?
        }
        _ => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            strata_exporter::write_docker_archive_multi_to(&store.content, &selected, &mut out)
                .context("save to stdout")?;
            out.flush()?;
        }
    }
    Ok(0)
}

/// `strata load [-i FILE]`: images from a `docker save` tar (stdin without -i).
pub fn load(cli: &Cli, input: Option<&Path>, quiet: bool) -> Result<i32> {
    let store = Store::open(&cli.root)?;
    // The archive is read twice (its manifest may come last), so stdin is spooled first.
    let spooled;
    let path = match input {
        Some(p) if p != Path::new("-") => p,
        _ => {
            let mut tmp = super::tempfile::tempfile_in(&store.root, "load")?;
            std::io::copy(&mut std::io::stdin().lock(), &mut tmp.1).context("read stdin")?;
            spooled = TempPath(tmp.0);
            spooled.0.as_path()
        }
    };
    let loaded = strata_exporter::load_docker_archive(&store.content, path)
        .with_context(|| format!("load {}", path.display()))?;
    let images = image_store(cli)?;
    let now = chrono::Utc::now().timestamp();
    for l in &loaded {
        if l.tags.is_empty() {
            if !quiet {
                println!("Loaded image ID: {}", l.record.config_digest);
            }
            continue;
        }
        for t in &l.tags {
            images.tag(t, &l.record, now)?;
            if !quiet {
                println!("Loaded image: {t}");
            }
        }
    }
    Ok(0)
}

/// Removed on drop.
struct TempPath(std::path::PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `strata push NAME`: the local image NAME to the registry NAME names.
pub fn push(cli: &Cli, name: &str) -> Result<i32> {
    let images = image_store(cli)?;
    let img = lookup(&images, name)?;
    let reference = Reference::parse(name).map_err(|e| anyhow!("{e}"))?;
    let store = Store::open(&cli.root)?;
    let client = crate::config::registry_client(cli)?;
    let record = strata_exporter::compressed_for_push(
        &store.content,
        &img.record,
        &strata_exporter::Compression::default(),
    )
    .with_context(|| format!("compress the layers of {name}"))?;
    let report = strata_exporter::push_image_report(&client, &store.content, &record, &reference)
        .with_context(|| format!("push {name}"))?;
    eprintln!(
        "{} blobs uploaded, {} mounted, {} already present",
        report.uploaded.len(),
        report.mounted.len(),
        report.existing.len()
    );
    println!(
        "{}: digest: {} size: {}",
        img.tag, report.manifest_digest, record.manifest_size
    );
    Ok(0)
}

/// `strata pull NAME`: manifest, config and layer blobs into the content store, and NAME
/// into the image store. Layers are unpacked only when a build uses them.
pub fn pull(cli: &Cli, name: &str, platform: Option<&str>) -> Result<i32> {
    if let Some(p) = platform {
        if p != "linux/amd64" {
            bail!("platform {p} is not supported yet (only linux/amd64)");
        }
    }
    let reference = Reference::parse(name).map_err(|e| anyhow!("{e}"))?;
    let store = Store::open(&cli.root)?;
    let client = crate::config::registry_client(cli)?;
    let record =
        strata_exporter::pull_image(&client, &store.content, &reference, &Platform::default())
            .with_context(|| format!("pull {name}"))?;
    // The local name is what the user typed; a digest reference keeps only its name part.
    let local = match name.split_once('@') {
        Some((n, _)) => n,
        None => name,
    };
    let images = image_store(cli)?;
    images.tag(local, &record, chrono::Utc::now().timestamp())?;
    println!("Digest: {}", record.manifest_digest);
    println!("Status: Downloaded image for {name}");
    println!("{reference}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_formatting_matches_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(4_261_550), "4.262MB");
        assert_eq!(human_size(12_000), "12kB");
        assert_eq!(truncate("abc", 45), "abc");
        let long = "x".repeat(60);
        let t = truncate(&long, 45);
        assert_eq!(t.chars().count(), 45);
        assert!(t.ends_with('…'));
        assert_eq!(human_age(None), "N/A");
        assert!(human_age(Some("2001-01-01T00:00:00Z")).contains("years"));
    }
}
