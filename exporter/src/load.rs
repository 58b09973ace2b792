//! Images in: `docker load` tars (`strata load`) and registry pulls (`strata pull`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use strata_dag::{Digest, Platform};
use strata_registry::{Client, Reference};
use strata_snapshotter::content::ContentStore;

use crate::image::{write_manifest_for_config, ImageRecord};
use crate::layer::{decompressor, detect, Detected, LayerBlob};
use crate::{dag_digest, Error, Result};

/// `manifest.json` and image configs are read into memory; larger ones are refused.
const MAX_JSON_BYTES: u64 = 32 << 20;
/// Blobs fetched at once by a pull.
const PARALLEL_FETCHES: usize = 3;

/// One image found in a `docker load` archive.
#[derive(Clone, Debug)]
pub struct LoadedImage {
    /// `RepoTags` of the archive's manifest entry (`name:tag`), possibly none.
    pub tags: Vec<String>,
    pub record: ImageRecord,
}

#[derive(Deserialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// `./a/../b/c` -> `b/c`: archive paths compared the way `docker load` resolves them.
/// Paths climbing out of the archive are refused (None).
fn normalize(path: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

fn open_archive(path: &Path) -> Result<tar::Archive<BufReader<File>>> {
    let f = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    Ok(tar::Archive::new(BufReader::new(f)))
}

fn read_limited(r: impl Read, what: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(format!("read {what}"), e))?;
    if buf.len() as u64 > MAX_JSON_BYTES {
        return Err(Error::InvalidData(format!(
            "{what} is larger than {MAX_JSON_BYTES} bytes"
        )));
    }
    Ok(buf)
}

/// Reads a `docker save` / `strata save` tar into the content store: configs as they are
/// (image IDs do not change), layers as stored (plain tars stay uncompressed), each layer
/// checked against the config's diff ID. The archive is read twice (`manifest.json` may
/// come last), never held in memory.
pub fn load_docker_archive(store: &ContentStore, path: &Path) -> Result<Vec<LoadedImage>> {
    let shown = path.display().to_string();
    // Pass 1: manifest.json and the symlinks older `docker save` uses for shared layers.
    let mut manifest: Option<Vec<ManifestEntry>> = None;
    let mut links: HashMap<String, String> = HashMap::new();
    let mut archive = open_archive(path)?;
    for entry in archive
        .entries()
        .map_err(|e| Error::io(format!("read {shown}"), e))?
    {
        let entry = entry.map_err(|e| Error::io(format!("read {shown}"), e))?;
        let entry_path = entry
            .path()
            .map_err(|e| Error::io(format!("read {shown}"), e))?
            .into_owned();
        let Some(name) = normalize(&entry_path) else {
            continue;
        };
        if entry.header().entry_type().is_symlink() {
            if let Ok(Some(target)) = entry.link_name() {
                let base = entry_path.parent().unwrap_or(Path::new(""));
                if let Some(t) = normalize(&base.join(target)) {
                    links.insert(name, t);
                }
            }
        } else if name == "manifest.json" {
            let bytes = read_limited(entry, "manifest.json")?;
            manifest = Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| Error::json(format!("parse manifest.json of {shown}"), e))?,
            );
        }
    }
    let manifest = manifest.ok_or_else(|| {
        Error::InvalidData(format!(
            "{shown} has no manifest.json (not a docker image archive)"
        ))
    })?;
    let resolve = |p: &str| -> String {
        let mut cur = normalize(Path::new(p)).unwrap_or_default();
        // Bounded: a link cycle ends here instead of looping.
        for _ in 0..16 {
            match links.get(&cur) {
                Some(t) => cur = t.clone(),
                None => break,
            }
        }
        cur
    };
    let mut configs: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    let mut layers: BTreeMap<String, Option<LayerBlob>> = BTreeMap::new();
    for m in &manifest {
        configs.insert(resolve(&m.config), None);
        for l in &m.layers {
            layers.insert(resolve(l), None);
        }
    }

    // Pass 2: configs into memory, layers streamed into the content store.
    let mut archive = open_archive(path)?;
    for entry in archive
        .entries()
        .map_err(|e| Error::io(format!("read {shown}"), e))?
    {
        let entry = entry.map_err(|e| Error::io(format!("read {shown}"), e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let Some(name) = entry.path().ok().and_then(|p| normalize(&p)) else {
            continue;
        };
        if let Some(slot) = configs.get_mut(&name) {
            *slot = Some(read_limited(entry, &format!("config {name}"))?);
        } else if let Some(slot) = layers.get_mut(&name) {
            *slot = Some(store_layer(store, entry, &name)?);
        }
    }

    let mut out = Vec::new();
    for m in &manifest {
        let config_path = resolve(&m.config);
        let config_bytes = configs
            .get(&config_path)
            .cloned()
            .flatten()
            .ok_or_else(|| Error::InvalidData(format!("{shown}: {config_path} is missing")))?;
        let config: serde_json::Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| Error::json(format!("parse image config {config_path}"), e))?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != m.layers.len() {
            return Err(Error::InvalidData(format!(
                "{shown}: {config_path} lists {} diff ids for {} layers",
                diff_ids.len(),
                m.layers.len()
            )));
        }
        let mut blobs = Vec::new();
        for (l, want) in m.layers.iter().zip(&diff_ids) {
            let p = resolve(l);
            let blob = layers
                .get(&p)
                .cloned()
                .flatten()
                .ok_or_else(|| Error::InvalidData(format!("{shown}: layer {p} is missing")))?;
            if blob.diff_id.as_str() != want {
                return Err(Error::InvalidData(format!(
                    "{shown}: layer {p} hashes to {}, the config says {want}",
                    blob.diff_id
                )));
            }
            blobs.push(blob);
        }
        let record = write_manifest_for_config(store, &blobs, &config_bytes, true)?;
        out.push(LoadedImage {
            tags: m.repo_tags.clone().unwrap_or_default(),
            record,
        });
    }
    Ok(out)
}

/// A reader of the uncompressed bytes of a stored layer blob (gzip, zstd or plain).
pub fn layer_reader(store: &ContentStore, digest: &Digest) -> Result<Box<dyn Read + 'static>> {
    let f = store
        .open_blob(digest)
        .map_err(|e| Error::content(format!("open layer {digest}"), e))?;
    let mut r = BufReader::new(f);
    let kind = detect(
        r.fill_buf()
            .map_err(|e| Error::io(format!("read layer {digest}"), e))?,
    );
    decompressor(kind, r).map_err(|e| Error::io(format!("decompress layer {digest}"), e))
}

/// Sha256 of what passes through, for diff IDs of plain layers.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    n: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn sha256_digest(h: Sha256) -> Result<Digest> {
    Digest::parse(&format!("sha256:{}", hex::encode(h.finalize())))
        .ok_or_else(|| Error::InvalidData("sha256 produced a malformed digest".into()))
}

/// Stores one layer of an archive as it is; a compressed one is decompressed once more
/// afterwards to learn its diff ID.
fn store_layer(store: &ContentStore, entry: impl Read, name: &str) -> Result<LayerBlob> {
    let mut r = BufReader::with_capacity(256 * 1024, entry);
    let kind = detect(
        r.fill_buf()
            .map_err(|e| Error::io(format!("read layer {name}"), e))?,
    );
    let writer = store
        .writer()
        .map_err(|e| Error::content(format!("store layer {name}"), e))?;
    let mut w = HashingWriter {
        inner: writer,
        hasher: Sha256::new(),
        n: 0,
    };
    io::copy(&mut r, &mut w).map_err(|e| Error::io(format!("store layer {name}"), e))?;
    let plain_id = sha256_digest(w.hasher)?;
    let plain_size = w.n;
    let (digest, size) = w
        .inner
        .commit(None)
        .map_err(|e| Error::content(format!("commit layer {name}"), e))?;
    let (diff_id, uncompressed_size, media_type) = match kind {
        Detected::Plain => (
            plain_id,
            plain_size,
            "application/vnd.oci.image.layer.v1.tar",
        ),
        Detected::Gzip | Detected::Zstd => {
            let f = store
                .open_blob(&digest)
                .map_err(|e| Error::content(format!("open layer {name}"), e))?;
            let mut d = decompressor(kind, BufReader::new(f))
                .map_err(|e| Error::io(format!("decompress layer {name}"), e))?;
            let mut h = HashingWriter {
                inner: io::sink(),
                hasher: Sha256::new(),
                n: 0,
            };
            io::copy(&mut d, &mut h)
                .map_err(|e| Error::io(format!("decompress layer {name}"), e))?;
            let mt = if kind == Detected::Gzip {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            } else {
                "application/vnd.oci.image.layer.v1.tar+zstd"
            };
            (sha256_digest(h.hasher)?, h.n, mt)
        }
    };
    Ok(LayerBlob {
        digest,
        size,
        media_type: media_type.to_string(),
        diff_id,
        uncompressed_size,
    })
}

/// Pulls the platform's image of `reference` into the content store: manifest, config
/// and layer blobs (a few at once; blobs already present are not fetched). Layers are not
/// unpacked: a build that uses the image does that.
pub fn pull_image(
    client: &Client,
    store: &ContentStore,
    reference: &Reference,
    platform: &Platform,
) -> Result<ImageRecord> {
    let resolved = client
        .resolve(reference, platform)
        .map_err(|e| Error::registry(format!("resolve {reference}"), e))?;
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    for d in resolved.manifest.layers() {
        let digest = dag_digest(d.digest())?;
        if !blobs.iter().any(|(have, _)| *have == digest) {
            blobs.push((digest, d.size()));
        }
    }
    let missing: Vec<&(Digest, u64)> = blobs.iter().filter(|(d, _)| !store.exists(d)).collect();
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL_FETCHES.min(missing.len()) {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((digest, _)) = missing.get(i) else {
                        return;
                    };
                    if let Err(e) = fetch_into(client, store, reference, digest) {
                        failed.store(true, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    for (digest, _) in &blobs {
        // Only a hint for cross-repository mounts: failing to note it costs nothing else.
        let _ = crate::push::record_blob_source(
            store,
            digest,
            &reference.registry,
            &reference.repository,
        );
    }
    let config_digest = Digest::of(&resolved.config_bytes);
    store
        .put(&resolved.config_bytes, Some(&config_digest))
        .map_err(|e| Error::content("store pulled image config", e))?;
    let (_, manifest_size) = store
        .put(&resolved.manifest_bytes, Some(&resolved.manifest_digest))
        .map_err(|e| Error::content("store pulled manifest", e))?;
    Ok(ImageRecord {
        manifest_digest: resolved.manifest_digest,
        manifest_size,
        media_type: resolved.manifest_media_type,
        config_digest,
        size: blobs.iter().map(|(_, s)| s).sum::<u64>() + resolved.config_bytes.len() as u64,
    })
}

fn fetch_into(
    client: &Client,
    store: &ContentStore,
    reference: &Reference,
    digest: &Digest,
) -> Result<()> {
    let mut writer = store
        .writer()
        .map_err(|e| Error::content(format!("store blob {digest}"), e))?;
    client
        .fetch_blob(reference, digest, &mut writer)
        .map_err(|e| Error::registry(format!("fetch blob {digest} of {reference}"), e))?;
    writer
        .commit(Some(digest))
        .map_err(|e| Error::content(format!("commit blob {digest}"), e))?;
    Ok(())
}

#[cfg(test)]
fn normalized(p: &str) -> Option<String> {
    normalize(Path::new(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_normalise_and_never_escape() {
        assert_eq!(
            normalized("./a/b/layer.tar").as_deref(),
            Some("a/b/layer.tar")
        );
        assert_eq!(
            normalized("a/../b/layer.tar").as_deref(),
            Some("b/layer.tar")
        );
        assert_eq!(normalized("../x"), None);
    }
}
