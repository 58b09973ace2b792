//! Writing a cache: an OCI artifact in a registry, or an OCI layout directory.

use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use strata_dag::Digest;
use strata_registry::media_types::{OCI_INDEX, OCI_MANIFEST};
use strata_registry::{Client, Reference};
use strata_snapshotter::content::ContentStore;

use crate::describe::{CacheDescription, CONFIG_MEDIA_TYPE};
use crate::{Error, Result};

/// The manifest's `artifactType`.
pub const ARTIFACT_TYPE: &str = "application/vnd.strata.cache.v1";
/// Blobs uploaded at once, as for image pushes.
const PARALLEL_UPLOADS: usize = 3;

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportReport {
    pub records: usize,
    pub layers: usize,
    pub mounts: usize,
    /// Digest of the artifact's manifest.
    pub manifest_digest: Digest,
    /// Blobs (layers, config, manifest) whose bytes were sent or written.
    pub written_blobs: usize,
    pub written_bytes: u64,
    /// Blobs the destination had already.
    pub existing_blobs: usize,
    /// Blobs a registry linked from another repository instead of receiving them.
    pub mounted_blobs: usize,
}

/// The artifact manifest for a description whose bytes are `config`.
fn manifest(desc: &CacheDescription, config: &[u8]) -> Result<Vec<u8>> {
    let layers: Vec<serde_json::Value> = desc
        .blobs()
        .into_iter()
        .map(|l| {
            serde_json::json!({
                "mediaType": l.media_type,
                "digest": l.digest.to_string(),
                "size": l.size,
            })
        })
        .collect();
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": Digest::of(config).to_string(),
            "size": config.len(),
        },
        "layers": layers,
    });
    serde_json::to_vec(&m).map_err(|e| Error::json("encode cache manifest", e))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Pushes the cache to `reference`: layers first (skipping those the repository has, a
/// few at a time), then the description, then the manifest, so the registry never holds
/// a manifest whose blobs are missing.
pub fn push_registry(
    client: &Client,
    content: &ContentStore,
    desc: &CacheDescription,
    reference: &Reference,
) -> Result<ExportReport> {
    let config = desc.to_json()?;
    let manifest = manifest(desc, &config)?;
    let blobs = desc.blobs();
    // (blobs written, bytes written, blobs already there, blobs mounted)
    let sent: Mutex<(usize, u64, usize, usize)> = Mutex::new((0, 0, 0, 0));
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL_UPLOADS.min(blobs.len()) {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let Some(layer) = blobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let mut open = || -> std::io::Result<Box<dyn Read>> {
                    let f = content
                        .open_blob(&layer.digest)
                        .map_err(std::io::Error::other)?;
                    Ok(Box::new(BufReader::new(f)))
                };
                match send_blob(client, content, reference, layer, &mut open) {
                    Ok(how) => {
                        let mut s = lock(&sent);
                        match how {
                            Sent::Uploaded => {
                                s.0 += 1;
                                s.1 += layer.size;
                            }
                            Sent::Existing => s.2 += 1,
                            Sent::Mounted => s.3 += 1,
                        }
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        lock(&first_error).get_or_insert(Error::registry(
                            format!("push cache layer {} to {reference}", layer.digest),
                            e,
                        ));
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = lock(&first_error).take() {
        return Err(e);
    }
    let (mut written_blobs, mut written_bytes, mut existing_blobs, mounted_blobs) = *lock(&sent);

    let config_digest = Digest::of(&config);
    let mut open =
        || -> std::io::Result<Box<dyn Read>> { Ok(Box::new(std::io::Cursor::new(config.clone()))) };
    let uploaded = client
        .push_blob(reference, &config_digest, config.len() as u64, &mut open)
        .map_err(|e| Error::registry(format!("push cache description to {reference}"), e))?;
    if uploaded {
        written_blobs += 1;
        written_bytes += config.len() as u64;
    } else {
        existing_blobs += 1;
    }
    let manifest_digest = client
        .push_manifest(reference, OCI_MANIFEST, &manifest)
        .map_err(|e| Error::registry(format!("push cache manifest to {reference}"), e))?;
    written_blobs += 1;
    written_bytes += manifest.len() as u64;
    Ok(ExportReport {
        records: desc.records.len(),
        layers: desc.layers.len(),
        mounts: desc.mounts.len(),
        manifest_digest,
        written_blobs,
        written_bytes,
        existing_blobs,
        mounted_blobs,
    })
}

enum Sent {
    Uploaded,
    Existing,
    Mounted,
}

/// Puts one blob into the reference's repository: nothing when it is there, a
/// cross-repository mount when it came from another repository of the same registry (a
/// base image layer, or a layer imported from another cache), else an upload.
fn send_blob(
    client: &Client,
    content: &ContentStore,
    reference: &Reference,
    layer: &strata_exporter::LayerBlob,
    open: &mut dyn FnMut() -> std::io::Result<Box<dyn Read>>,
) -> Result<Sent, strata_registry::Error> {
    if client.blob_exists(reference, &layer.digest)? {
        return Ok(Sent::Existing);
    }
    let prefix = format!("{}/", reference.registry);
    for source in strata_exporter::blob_sources(content, &layer.digest)
        .iter()
        .rev()
    {
        let Some(repo) = source.strip_prefix(&prefix) else {
            continue;
        };
        // A failed mount is only a missed shortcut: the upload below still happens.
        if repo != reference.repository
            && client
                .mount_blob(reference, &layer.digest, repo)
                .unwrap_or(false)
        {
            return Ok(Sent::Mounted);
        }
    }
    client
        .push_blob(reference, &layer.digest, layer.size, open)
        .map(|uploaded| {
            if uploaded {
                Sent::Uploaded
            } else {
                Sent::Existing
            }
        })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader (or a
/// crash) never sees half a blob or half an index.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no parent directory", path.display())))?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// Writes the cache as an OCI image layout in `dir`: blobs it lacks, then `index.json`
/// naming the artifact (replacing the previous one; old blobs stay, as they may be
/// shared with the new cache).
pub fn write_local(
    content: &ContentStore,
    desc: &CacheDescription,
    dir: &Path,
) -> Result<ExportReport> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)
        .map_err(|e| Error::io(format!("create cache directory {}", dir.display()), e))?;
    write_atomic(&dir.join("oci-layout"), |f| {
        f.write_all(br#"{"imageLayoutVersion":"1.0.0"}"#)
    })?;
    let mut report = ExportReport {
        records: desc.records.len(),
        layers: desc.layers.len(),
        mounts: desc.mounts.len(),
        manifest_digest: Digest::of(b""),
        written_blobs: 0,
        written_bytes: 0,
        existing_blobs: 0,
        mounted_blobs: 0,
    };
    let mut note = |written: bool, size: u64| {
        if written {
            report.written_blobs += 1;
            report.written_bytes += size;
        } else {
            report.existing_blobs += 1;
        }
    };
    for layer in desc.blobs() {
        let path = blobs.join(layer.digest.hex());
        if path.is_file() {
            note(false, layer.size);
            continue;
        }
        let mut src = content
            .open_blob(&layer.digest)
            .map_err(|e| Error::content(format!("open cache layer {}", layer.digest), e))?;
        write_atomic(&path, |f| std::io::copy(&mut src, f).map(|_| ()))?;
        note(true, layer.size);
    }
    let config = desc.to_json()?;
    let manifest = manifest(desc, &config)?;
    let manifest_digest = Digest::of(&manifest);
    for bytes in [&config, &manifest] {
        let path = blobs.join(Digest::of(bytes).hex());
        if path.is_file() {
            note(false, bytes.len() as u64);
        } else {
            write_atomic(&path, |f| f.write_all(bytes))?;
            note(true, bytes.len() as u64);
        }
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "digest": manifest_digest.to_string(),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    let index = serde_json::to_vec(&index).map_err(|e| Error::json("encode index.json", e))?;
    write_atomic(&dir.join("index.json"), |f| f.write_all(&index))?;
    report.manifest_digest = manifest_digest;
    Ok(report)
}
