//! Pushing an image from the content store to a registry.

use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use strata_dag::Digest;
use strata_registry::{Client, Reference};
use strata_snapshotter::content::ContentStore;

use crate::image::{read_manifest_bytes, ImageRecord};
use crate::{dag_digest, Error, Result};

/// Layers uploaded at once: enough to hide per-request latency without flooding a
/// registry or the uplink.
const PARALLEL_UPLOADS: usize = 3;

/// What a push did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushReport {
    /// The digest the registry stored the manifest under.
    pub manifest_digest: Digest,
    /// Blobs (layers, config) whose bytes were sent.
    pub uploaded: Vec<Digest>,
    /// Blobs the repository had already.
    pub existing: Vec<Digest>,
    /// Blobs linked from another repository of the same registry (cross-repository
    /// mount) instead of uploaded.
    pub mounted: Vec<Digest>,
}

/// Remembers that blob `digest` came from `registry/repository`, so that a later push to
/// another repository of that registry can mount it instead of uploading it. Kept beside
/// the blobs as `<content root>/sources/<hex>`, one `registry/repository` per line.
pub fn record_blob_source(
    store: &ContentStore,
    digest: &Digest,
    registry: &str,
    repository: &str,
) -> Result<()> {
    use std::io::Write;
    let line = format!("{registry}/{repository}");
    if blob_sources(store, digest).contains(&line) {
        return Ok(());
    }
    let dir = store.root().join("sources");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let path = dir.join(digest.hex());
    // Appends of one short line are atomic enough: a torn line only loses a hint.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()))
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// Where blob `digest` was pulled from (`registry/repository` each), newest last.
pub fn blob_sources(store: &ContentStore, digest: &Digest) -> Vec<String> {
    std::fs::read_to_string(store.root().join("sources").join(digest.hex()))
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Tries to mount `digest` into the reference's repository from a repository of the same
/// registry it was pulled from. Whether it is now there (mounted or already present).
fn try_mount(
    client: &Client,
    store: &ContentStore,
    reference: &Reference,
    digest: &Digest,
) -> Result<Option<bool>> {
    let prefix = format!("{}/", reference.registry);
    let from: Vec<String> = blob_sources(store, digest)
        .into_iter()
        .rev()
        .filter_map(|s| s.strip_prefix(&prefix).map(str::to_string))
        .filter(|repo| *repo != reference.repository)
        .collect();
    if from.is_empty() {
        return Ok(None);
    }
    let exists = client
        .blob_exists(reference, digest)
        .map_err(|e| Error::registry(format!("check blob {digest} in {reference}"), e))?;
    if exists {
        return Ok(Some(false));
    }
    for repo in from {
        // A refused mount (permissions, blob gone) only means uploading it after all.
        if let Ok(true) = client.mount_blob(reference, digest, &repo) {
            return Ok(Some(true));
        }
    }
    Ok(None)
}

/// Pushes the image to `reference` (its tag, or its digest when it has no tag) and
/// returns the manifest digest the registry reports.
pub fn push_image(
    client: &Client,
    store: &ContentStore,
    image: &ImageRecord,
    reference: &Reference,
) -> Result<Digest> {
    push_image_report(client, store, image, reference).map(|r| r.manifest_digest)
}

/// [`push_image`], also telling which blobs were uploaded and which existed. Layers go
/// first, a few at a time; then the config; the manifest last, so the registry never
/// holds a manifest whose blobs are missing.
pub fn push_image_report(
    client: &Client,
    store: &ContentStore,
    image: &ImageRecord,
    reference: &Reference,
) -> Result<PushReport> {
    let (manifest_bytes, manifest) = read_manifest_bytes(store, image)?;
    let mut layers: Vec<(Digest, u64)> = Vec::new();
    for d in manifest.layers() {
        let digest = dag_digest(d.digest())?;
        if !layers.iter().any(|(have, _)| *have == digest) {
            layers.push((digest, d.size()));
        }
    }

    let results: Mutex<Vec<(Digest, Outcome)>> = Mutex::new(Vec::new());
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL_UPLOADS.min(layers.len()) {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((digest, size)) = layers.get(i) else {
                    return;
                };
                let outcome = match try_mount(client, store, reference, digest) {
                    Ok(Some(true)) => Ok(Outcome::Mounted),
                    Ok(Some(false)) => Ok(Outcome::Existing),
                    Ok(None) => {
                        push_blob(client, store, reference, digest, *size, "layer").map(|sent| {
                            if sent {
                                Outcome::Uploaded
                            } else {
                                Outcome::Existing
                            }
                        })
                    }
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(o) => lock(&results).push((digest.clone(), o)),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        lock(&first_error).get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = lock(&first_error).take() {
        return Err(e);
    }

    let config = manifest.config();
    let config_digest = dag_digest(config.digest())?;
    let config_sent = push_blob(
        client,
        store,
        reference,
        &config_digest,
        config.size(),
        "config",
    )?;

    let manifest_digest = client
        .push_manifest(reference, &image.media_type, &manifest_bytes)
        .map_err(|e| Error::registry(format!("push manifest to {reference}"), e))?;

    let mut report = PushReport {
        manifest_digest,
        uploaded: Vec::new(),
        existing: Vec::new(),
        mounted: Vec::new(),
    };
    // Report in manifest order, whatever order the threads finished in.
    let results = lock(&results).clone();
    for (digest, _) in &layers {
        match results.iter().find(|(d, _)| d == digest).map(|(_, o)| *o) {
            Some(Outcome::Uploaded) => report.uploaded.push(digest.clone()),
            Some(Outcome::Mounted) => report.mounted.push(digest.clone()),
            _ => report.existing.push(digest.clone()),
        }
    }
    if config_sent {
        report.uploaded.push(config_digest);
    } else {
        report.existing.push(config_digest);
    }
    Ok(report)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Uploaded,
    Mounted,
    Existing,
}

/// A poisoned lock only means another upload thread panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn push_blob(
    client: &Client,
    store: &ContentStore,
    reference: &Reference,
    digest: &Digest,
    size: u64,
    what: &str,
) -> Result<bool> {
    let mut open = || -> std::io::Result<Box<dyn Read>> {
        let f = store.open_blob(digest).map_err(std::io::Error::other)?;
        Ok(Box::new(BufReader::new(f)))
    };
    client
        .push_blob(reference, digest, size, &mut open)
        .map_err(|e| Error::registry(format!("push {what} {digest} to {reference}"), e))
}
