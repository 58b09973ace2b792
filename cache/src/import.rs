//! Reading a cache: the description up front, a step's layers only when the solve hits it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use strata_dag::{Digest, Platform};
use strata_exporter::LayerBlob;
use strata_registry::{media_types, Client, Reference};
use strata_snapshotter::content::ContentStore;
use strata_solver::cache::KeyLock;
use strata_solver::progress::{Progress, ProgressEvent};
use strata_solver::worker::RealWorker;
use strata_solver::{CacheKey, CacheStore, Ref, Worker};

use crate::describe::{CacheDescription, CONFIG_MEDIA_TYPE, INLINE_CONFIG_FIELD};
use crate::spec::CacheFrom;
use crate::{Error, Result};

/// Descriptions (and image configs holding one) larger than this are refused.
const MAX_DESCRIPTION_BYTES: u64 = 64 << 20;
/// Blobs of one hit fetched at once.
const PARALLEL_FETCHES: usize = 4;

/// A cache whose description has been read; its blobs are fetched on demand.
#[derive(Clone, Debug)]
pub struct ImportedCache {
    pub source: CacheFrom,
    pub description: CacheDescription,
}

impl ImportedCache {
    fn name(&self) -> String {
        match &self.source {
            CacheFrom::Registry(r) => r.to_string(),
            CacheFrom::Local(p) => p.display().to_string(),
        }
    }
}

/// Reads the cache description `from` names: `Ok(None)` when there is no cache there
/// yet (the first run of a pipeline), an error when what is there is not a cache.
pub fn fetch_description(client: &Client, from: &CacheFrom) -> Result<Option<ImportedCache>> {
    let description = match from {
        CacheFrom::Registry(r) => fetch_registry(client, r)?,
        CacheFrom::Local(dir) => read_local(dir)?,
    };
    Ok(description.map(|description| ImportedCache {
        source: from.clone(),
        description,
    }))
}

fn fetch_registry(client: &Client, reference: &Reference) -> Result<Option<CacheDescription>> {
    let (bytes, media_type, _) = match client.fetch_manifest(reference) {
        Ok(m) => m,
        Err(strata_registry::Error::NotFound { .. }) => return Ok(None),
        Err(e) => {
            return Err(Error::registry(
                format!("fetch cache manifest {reference}"),
                e,
            ))
        }
    };
    if media_types::is_manifest(&media_type) {
        let manifest: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::json(format!("parse cache manifest {reference}"), e))?;
        let config = &manifest["config"];
        if config["mediaType"].as_str() == Some(CONFIG_MEDIA_TYPE) {
            let digest = config["digest"]
                .as_str()
                .and_then(Digest::parse)
                .ok_or_else(|| {
                    Error::Invalid(format!("{reference}: config has no sha256 digest"))
                })?;
            let size = config["size"].as_u64().unwrap_or(0);
            if size > MAX_DESCRIPTION_BYTES {
                return Err(Error::Invalid(format!(
                    "{reference}: cache description of {size} bytes is over the limit"
                )));
            }
            let mut out = Vec::new();
            client
                .fetch_blob(reference, &digest, &mut out)
                .map_err(|e| {
                    Error::registry(format!("fetch cache description of {reference}"), e)
                })?;
            return CacheDescription::from_json(&out).map(Some);
        }
    }
    // Not a cache artifact: an image (or index of them) that may carry an inline cache.
    let resolved = client
        .resolve(reference, &Platform::default())
        .map_err(|e| Error::registry(format!("resolve cache image {reference}"), e))?;
    inline_description(&resolved.config_bytes)
        .map_err(|e| Error::Invalid(format!("{reference}: {e}")))
        .map(Some)
}

/// The inline description in an image config.
pub(crate) fn inline_description(config: &[u8]) -> Result<CacheDescription> {
    let value: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| Error::json("parse image config", e))?;
    let field = value.get(INLINE_CONFIG_FIELD).ok_or_else(|| {
        Error::Invalid(format!(
            "neither a build cache nor an image with an inline cache (no {INLINE_CONFIG_FIELD})"
        ))
    })?;
    let d: CacheDescription = serde_json::from_value(field.clone())
        .map_err(|e| Error::json("parse inline cache description", e))?;
    d.validate()?;
    Ok(d)
}

fn read_verified(path: &Path, digest: &Digest) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    if meta.len() > MAX_DESCRIPTION_BYTES {
        return Err(Error::Invalid(format!(
            "{} is over the size limit",
            path.display()
        )));
    }
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let actual = Digest::of(&bytes);
    if actual != *digest {
        return Err(Error::Invalid(format!(
            "{}: digest mismatch: expected {digest}, got {actual}",
            path.display()
        )));
    }
    Ok(bytes)
}

fn read_local(dir: &Path) -> Result<Option<CacheDescription>> {
    let index_path = dir.join("index.json");
    let index = match std::fs::read(&index_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("read {}", index_path.display()), e)),
    };
    let index: serde_json::Value = serde_json::from_slice(&index)
        .map_err(|e| Error::json(format!("parse {}", index_path.display()), e))?;
    let entry = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|d| d["artifactType"].as_str() == Some(crate::ARTIFACT_TYPE))
        })
        .ok_or_else(|| Error::Invalid(format!("{} names no strata cache", index_path.display())))?;
    let blob = |d: &serde_json::Value, what: &str| -> Result<Vec<u8>> {
        let digest = d["digest"]
            .as_str()
            .and_then(Digest::parse)
            .ok_or_else(|| {
                Error::Invalid(format!("{what} in {} has no sha256 digest", dir.display()))
            })?;
        read_verified(&dir.join("blobs/sha256").join(digest.hex()), &digest)
    };
    let manifest: serde_json::Value = serde_json::from_slice(&blob(entry, "cache manifest")?)
        .map_err(|e| Error::json("parse cache manifest", e))?;
    if manifest["config"]["mediaType"].as_str() != Some(CONFIG_MEDIA_TYPE) {
        return Err(Error::Invalid(format!(
            "{}: the manifest's config is not a strata cache description",
            dir.display()
        )));
    }
    CacheDescription::from_json(&blob(&manifest["config"], "cache description")?).map(Some)
}

/// What importing did during a solve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Keys answered from an imported cache.
    pub hits: usize,
    pub blobs_fetched: usize,
    pub bytes_fetched: u64,
    /// Imported hits that could not be materialised (the step then runs).
    pub failures: Vec<String>,
}

/// The local cache first, then the imported descriptions, materialising a hit's layers
/// into snapshots on demand.
pub struct ImportingCache<'a> {
    local: &'a dyn CacheStore,
    worker: &'a RealWorker,
    client: &'a Client,
    progress: &'a dyn Progress,
    imports: Vec<ImportedCache>,
    report: Mutex<ImportReport>,
}

impl<'a> ImportingCache<'a> {
    pub fn new(
        local: &'a dyn CacheStore,
        worker: &'a RealWorker,
        client: &'a Client,
        progress: &'a dyn Progress,
        imports: Vec<ImportedCache>,
    ) -> Self {
        ImportingCache {
            local,
            worker,
            client,
            progress,
            imports,
            report: Mutex::new(ImportReport::default()),
        }
    }

    /// The caches this one imports (for re-export: see [`CacheDescription::carry_over`]).
    pub fn imported(&self) -> &[ImportedCache] {
        &self.imports
    }

    pub fn report(&self) -> ImportReport {
        self.report
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn note(&self, f: impl FnOnce(&mut ImportReport)) {
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut r);
    }

    /// Fetches the chain's blobs the content store lacks (a few at a time, each verified
    /// against its digest), then applies the chain into `layer-<chainid>` snapshots.
    fn materialize(&self, import: &ImportedCache, chain: &[LayerBlob]) -> Result<Ref> {
        let content: &ContentStore = &self.worker.content;
        let mut missing: Vec<&LayerBlob> = Vec::new();
        for l in chain {
            if !content.exists(&l.digest) && !missing.iter().any(|m| m.digest == l.digest) {
                missing.push(l);
            }
        }
        let errors: Mutex<Vec<Error>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let per = missing.len().div_ceil(PARALLEL_FETCHES).max(1);
            for chunk in missing.chunks(per) {
                let errors = &errors;
                s.spawn(move || {
                    for l in chunk {
                        match self.fetch(import, content, l) {
                            Ok(()) => self.note(|r| {
                                r.blobs_fetched += 1;
                                r.bytes_fetched += l.size;
                            }),
                            Err(e) => {
                                errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                                return;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = errors
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .next()
        {
            return Err(e);
        }
        self.worker
            .apply_layers(
                chain,
                self.progress,
                &format!("importing cache from {}", import.name()),
            )
            .map_err(Error::Store)
    }

    fn fetch(&self, import: &ImportedCache, content: &ContentStore, l: &LayerBlob) -> Result<()> {
        let mut writer = content
            .writer()
            .map_err(|e| Error::content("open content writer", e))?;
        match &import.source {
            CacheFrom::Registry(r) => {
                self.client
                    .fetch_blob(r, &l.digest, &mut writer)
                    .map_err(|e| {
                        Error::registry(format!("fetch cache layer {} of {r}", l.digest), e)
                    })?;
            }
            CacheFrom::Local(dir) => {
                let path: PathBuf = dir.join("blobs/sha256").join(l.digest.hex());
                let mut f = std::fs::File::open(&path)
                    .map_err(|e| Error::io(format!("open cache layer {}", path.display()), e))?;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = f.read(&mut buf).map_err(|e| {
                        Error::io(format!("read cache layer {}", path.display()), e)
                    })?;
                    if n == 0 {
                        break;
                    }
                    std::io::Write::write_all(&mut writer, &buf[..n])
                        .map_err(|e| Error::io("write cache layer into the content store", e))?;
                }
            }
        }
        // Committing under the expected digest verifies the bytes.
        writer
            .commit(Some(&l.digest))
            .map_err(|e| Error::content(format!("store cache layer {}", l.digest), e))?;
        Ok(())
    }
}

impl CacheStore for ImportingCache<'_> {
    fn get(&self, key: &CacheKey) -> Result<Option<Ref>, String> {
        if let Some(r) = self.local.get(key)? {
            if self.worker.exists(&r) {
                return Ok(Some(r));
            }
        }
        for import in &self.imports {
            let Some(chain) = import.description.chain(key) else {
                continue;
            };
            match self.materialize(import, &chain) {
                Ok(r) => {
                    self.note(|rep| rep.hits += 1);
                    // Later builds on this runner hit locally.
                    self.local.put(key, &r)?;
                    return Ok(Some(r));
                }
                Err(e) => {
                    let message = format!(
                        "WARNING: import cache record {} from {}: {}",
                        key.hex(),
                        import.name(),
                        crate::error_chain(&e)
                    );
                    self.progress.event(ProgressEvent::Info {
                        message: message.clone(),
                    });
                    self.note(|rep| rep.failures.push(message));
                }
            }
        }
        Ok(None)
    }

    fn put(&self, key: &CacheKey, result: &Ref) -> Result<(), String> {
        self.local.put(key, result)
    }

    // Builds sharing the store still run a key once between them.
    fn lock(&self, key: &CacheKey) -> Result<Option<KeyLock>, String> {
        self.local.lock(key)
    }
}
