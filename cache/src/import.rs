//! Reading a cache: the description up front, a step's layers only when the solve hits it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use strata_dag::{Digest, ExecMountKind, Node, NodeMeta, Op, Platform};
use strata_exporter::LayerBlob;
use strata_registry::{media_types, Client, Reference};
use strata_snapshotter::content::ContentStore;
use strata_solver::cache::KeyLock;
use strata_solver::progress::{Progress, ProgressEvent};
use strata_solver::worker::RealWorker;
use strata_solver::{CacheKey, CacheStore, Ref, StepActivity, Worker};

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
            // The descriptor's size is the registry's word; the limit holds whatever it says.
            let mut out = LimitedVec(Vec::new());
            client
                .fetch_blob(reference, &digest, &mut out)
                .map_err(|e| {
                    Error::registry(format!("fetch cache description of {reference}"), e)
                })?;
            return CacheDescription::from_json(&out.0).map(Some);
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

/// A `Vec` writer that refuses to grow past [`MAX_DESCRIPTION_BYTES`].
struct LimitedVec(Vec<u8>);

impl std::io::Write for LimitedVec {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if (self.0.len() + buf.len()) as u64 > MAX_DESCRIPTION_BYTES {
            return Err(std::io::Error::other(format!(
                "cache description larger than {MAX_DESCRIPTION_BYTES} bytes"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
    /// Keys whose import failed: the solver asks again before running the step, and the
    /// answer (and the warning) would be the same.
    failed: Mutex<std::collections::HashSet<CacheKey>>,
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
            failed: Mutex::new(std::collections::HashSet::new()),
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
                        match fetch_blob(self.client, import, content, l) {
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
}

/// Fetches one blob of an imported cache into the content store, verified.
fn fetch_blob(
    client: &Client,
    import: &ImportedCache,
    content: &ContentStore,
    l: &LayerBlob,
) -> Result<()> {
    let mut writer = content
        .writer()
        .map_err(|e| Error::content("open content writer", e))?;
    match &import.source {
        CacheFrom::Registry(r) => {
            client.fetch_blob(r, &l.digest, &mut writer).map_err(|e| {
                Error::registry(format!("fetch cache layer {} of {r}", l.digest), e)
            })?;
            // Lets a later push to this registry mount the blob instead of uploading it.
            let _ =
                strata_exporter::record_blob_source(content, &l.digest, &r.registry, &r.repository);
        }
        CacheFrom::Local(dir) => {
            let path: PathBuf = dir.join("blobs/sha256").join(l.digest.hex());
            let mut f = std::fs::File::open(&path)
                .map_err(|e| Error::io(format!("open cache layer {}", path.display()), e))?;
            std::io::copy(&mut f, &mut writer)
                .map_err(|e| Error::io(format!("copy cache layer {}", path.display()), e))?;
        }
    }
    // Committing under the expected digest verifies the bytes.
    writer
        .commit(Some(&l.digest))
        .map_err(|e| Error::content(format!("store cache layer {}", l.digest), e))?;
    Ok(())
}

/// The real worker, restoring imported `RUN --mount=type=cache` contents just before the
/// first step that uses a mount this store lacks runs (a fully cached build downloads no
/// cache mount).
pub struct MountRestoringWorker<'a> {
    inner: &'a RealWorker,
    client: &'a Client,
    imports: &'a [ImportedCache],
    /// `<store>/cache-mounts`.
    root: PathBuf,
    progress: &'a dyn Progress,
    /// Ids already looked at; the lock also keeps two steps from restoring one at once.
    done: Mutex<std::collections::HashSet<String>>,
}

impl<'a> MountRestoringWorker<'a> {
    pub fn new(
        inner: &'a RealWorker,
        client: &'a Client,
        imports: &'a [ImportedCache],
        root: PathBuf,
        progress: &'a dyn Progress,
    ) -> Self {
        MountRestoringWorker {
            inner,
            client,
            imports,
            root,
            progress,
            done: Mutex::new(std::collections::HashSet::new()),
        }
    }

    fn restore(&self, id: &str) -> Result<()> {
        let dir = crate::describe::cache_mount_dir(&self.root, id);
        if dir.exists() {
            return Ok(());
        }
        let Some((import, blob)) = self
            .imports
            .iter()
            .find_map(|i| i.description.mounts.get(id).map(|b| (i, b)))
        else {
            return Ok(());
        };
        let content: &ContentStore = &self.inner.content;
        if !content.exists(&blob.digest) {
            fetch_blob(self.client, import, content, blob)?;
        }
        let base = dir
            .parent()
            .ok_or_else(|| Error::Invalid(format!("cache mount dir {}", dir.display())))?;
        std::fs::create_dir_all(base)
            .map_err(|e| Error::io(format!("create cache mount {id}"), e))?;
        // Extracted beside it and renamed in: a step never sees half a cache.
        let tmp = base.join(format!("restore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let applied = (|| {
            std::fs::create_dir(&tmp).map_err(|e| Error::io("create restore dir", e))?;
            let file = content
                .open_blob(&blob.digest)
                .map_err(|e| Error::content(format!("open cache mount blob {}", blob.digest), e))?;
            let applied =
                strata_snapshotter::layer::apply_layer(std::io::BufReader::new(file), &tmp)
                    .map_err(|e| Error::content(format!("extract cache mount {id}"), e))?;
            if applied.diff_id != blob.diff_id {
                return Err(Error::Invalid(format!(
                    "cache mount {id}: diff id {} is not the described {}",
                    applied.diff_id, blob.diff_id
                )));
            }
            std::fs::rename(&tmp, &dir)
                .map_err(|e| Error::io(format!("restore cache mount {id}"), e))
        })();
        if applied.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        applied?;
        self.progress.event(ProgressEvent::Info {
            message: format!("#restored cache mount {id} from {}", import.name()),
        });
        Ok(())
    }
}

impl Worker for MountRestoringWorker<'_> {
    fn content_key(
        &self,
        node: &Node,
        local_inputs: &[Option<&Ref>],
    ) -> Result<Option<[u8; 32]>, String> {
        self.inner.content_key(node, local_inputs)
    }

    fn immediate(&self, node: &Node) -> Option<Ref> {
        self.inner.immediate(node)
    }

    fn exec(
        &self,
        node: &Node,
        meta: &NodeMeta,
        key: &CacheKey,
        inputs: &[Ref],
        progress: &dyn Progress,
        activity: &StepActivity,
    ) -> Result<Ref, String> {
        if let Op::Exec(exec) = &node.op {
            for m in &exec.mounts {
                let ExecMountKind::Cache { id, .. } = &m.kind else {
                    continue;
                };
                let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
                if done.insert(id.clone()) {
                    // A cache mount is only a speed-up: a failed restore is a warning.
                    if let Err(e) = self.restore(id) {
                        progress.event(ProgressEvent::Info {
                            message: format!(
                                "WARNING: restore cache mount {id}: {}",
                                strata_solver::error_chain(&e)
                            ),
                        });
                    }
                }
            }
        }
        self.inner.exec(node, meta, key, inputs, progress, activity)
    }

    fn exists(&self, r: &Ref) -> bool {
        self.inner.exists(r)
    }
}

impl CacheStore for ImportingCache<'_> {
    fn get(&self, key: &CacheKey) -> Result<Option<Ref>, String> {
        if let Some(r) = self.local.get(key)? {
            if self.worker.exists(&r) {
                return Ok(Some(r));
            }
        }
        if self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
        {
            return Ok(None);
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
                        strata_solver::error_chain(&e)
                    );
                    self.progress.event(ProgressEvent::Info {
                        message: message.clone(),
                    });
                    self.note(|rep| rep.failures.push(message));
                }
            }
        }
        if self
            .imports
            .iter()
            .any(|i| i.description.records.contains_key(&key.hex()))
        {
            self.failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*key);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn description(content: &ContentStore) -> CacheDescription {
        let (digest, size) = content.put(b"layer bytes", None).unwrap();
        let mut d = CacheDescription {
            schema_version: 1,
            layers: vec![LayerBlob {
                digest,
                size,
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                diff_id: Digest::of(b"tar"),
                uncompressed_size: 3,
            }],
            ..Default::default()
        };
        d.records.insert(CacheKey([5; 32]).hex(), vec![0]);
        d
    }

    #[test]
    fn a_local_layout_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let content = ContentStore::open(&dir.path().join("content")).unwrap();
        let desc = description(&content);
        let layout = dir.path().join("cache");
        assert_eq!(read_local(&layout).unwrap(), None, "no cache yet");
        let first = crate::write_local(&content, &desc, &layout).unwrap();
        assert_eq!(first.written_blobs, 3, "layer, description, manifest");
        let again = crate::write_local(&content, &desc, &layout).unwrap();
        assert_eq!((again.written_blobs, again.existing_blobs), (0, 3));
        assert_eq!(read_local(&layout).unwrap(), Some(desc.clone()));

        // A description blob with other bytes than its digest is refused.
        let config = desc.to_json().unwrap();
        let path = layout.join("blobs/sha256").join(Digest::of(&config).hex());
        std::fs::write(&path, b"{}").unwrap();
        let e = read_local(&layout).unwrap_err().to_string();
        assert!(e.contains("digest mismatch"), "{e}");
    }

    #[test]
    fn inline_descriptions_come_from_the_config_field() {
        let dir = tempfile::tempdir().unwrap();
        let content = ContentStore::open(dir.path()).unwrap();
        let desc = description(&content);
        let config = serde_json::json!({
            "architecture": "amd64",
            INLINE_CONFIG_FIELD: serde_json::to_value(&desc).unwrap(),
        });
        let got = inline_description(&serde_json::to_vec(&config).unwrap()).unwrap();
        assert_eq!(got, desc);
        let e = inline_description(br#"{"architecture":"amd64"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no strata.cache.v1"), "{e}");
    }
}
