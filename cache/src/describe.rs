//! The cache description: cache key -> the layer chain of the step's result.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use strata_exporter::{Compression, LayerBlob};
use strata_snapshotter::content::ContentStore;
use strata_snapshotter::layer::DiffOptions;
use strata_snapshotter::Snapshotter;
use strata_solver::worker::{snapshot_chain, LABEL_BLOB, LABEL_CACHE_KEY};
use strata_solver::{CacheKey, Ref};

use crate::spec::Mode;
use crate::{Error, Result};

/// Media type of the artifact's config blob, the description itself.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.strata.cache.config.v1+json";
/// The image config field that holds an inline description (like BuildKit's
/// `moby.buildkit.cache.v0`, a field of its own so that images built `FROM` this one do
/// not inherit it the way they would a label).
pub const INLINE_CONFIG_FIELD: &str = "strata.cache.v1";

const SCHEMA_VERSION: u32 = 1;

/// What a cache holds. Layers are listed once and records point into the list, so a
/// `mode=max` cache of many steps that share a base stays small.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheDescription {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Every blob the records use (the artifact's layers, in this order).
    pub layers: Vec<LayerBlob>,
    /// Cache key (hex) -> indices into `layers`, bottom of the chain first. An empty chain
    /// is an empty filesystem.
    pub records: BTreeMap<String, Vec<usize>>,
    /// `RUN --mount=type=cache` id -> a blob of the mount's contents
    /// (`cache-mounts=true`), restored on a runner that lacks the mount when a step that
    /// uses it runs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mounts: BTreeMap<String, LayerBlob>,
}

impl CacheDescription {
    /// Parses and checks a description: known version, every index in range.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let d: CacheDescription =
            serde_json::from_slice(bytes).map_err(|e| Error::json("parse cache description", e))?;
        d.validate()?;
        Ok(d)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(Error::Invalid(format!(
                "cache description version {} (this strata reads {SCHEMA_VERSION})",
                self.schema_version
            )));
        }
        for (key, chain) in &self.records {
            if let Some(i) = chain.iter().find(|i| **i >= self.layers.len()) {
                return Err(Error::Invalid(format!(
                    "record {key} uses layer {i} of {}",
                    self.layers.len()
                )));
            }
        }
        Ok(())
    }

    /// Deterministic bytes (struct fields in order, records sorted).
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::json("encode cache description", e))
    }

    /// Adds the records of imported caches that this one lacks and can serve: every blob
    /// of the chain is in `content` (so it can be pushed or written), and, when `within`
    /// is given (`mode=min`), the chain is a prefix of it. A runner that imported a cache
    /// and hit it so early that the steps below were never visited still exports them,
    /// so the cache does not shrink from run to run.
    pub fn carry_over(
        &mut self,
        imported: &[&CacheDescription],
        content: &ContentStore,
        within: Option<&[LayerBlob]>,
    ) {
        for other in imported {
            for (key, indices) in &other.records {
                if self.records.contains_key(key) {
                    continue;
                }
                let chain: Vec<&LayerBlob> = indices
                    .iter()
                    .filter_map(|i| other.layers.get(*i))
                    .collect();
                let servable = chain.iter().all(|l| content.exists(&l.digest));
                let fits = within.is_none_or(|w| {
                    chain.len() <= w.len() && chain.iter().zip(w).all(|(a, b)| a.digest == b.digest)
                });
                if !servable || !fits {
                    continue;
                }
                let mut mine = Vec::with_capacity(chain.len());
                for l in chain {
                    let i = match self.layers.iter().position(|have| have.digest == l.digest) {
                        Some(i) => i,
                        None => {
                            self.layers.push(l.clone());
                            self.layers.len() - 1
                        }
                    };
                    mine.push(i);
                }
                self.records.insert(key.clone(), mine);
            }
        }
        self.normalize();
    }

    /// Lists layers in the order the (sorted) records first use them, dropping unused
    /// ones, so equal record sets give equal bytes however they were put together.
    fn normalize(&mut self) {
        let mut order: Vec<usize> = Vec::with_capacity(self.layers.len());
        let mut new_index: HashMap<usize, usize> = HashMap::new();
        for chain in self.records.values() {
            for i in chain {
                new_index.entry(*i).or_insert_with(|| {
                    order.push(*i);
                    order.len() - 1
                });
            }
        }
        for chain in self.records.values_mut() {
            for i in chain.iter_mut() {
                *i = new_index[i];
            }
        }
        self.layers = order
            .iter()
            .filter_map(|i| self.layers.get(*i).cloned())
            .collect();
    }

    /// The longest recorded chain (in `mode=min`, the final image's).
    pub fn longest_chain(&self) -> Vec<LayerBlob> {
        self.records
            .values()
            .max_by_key(|c| c.len())
            .map(|c| {
                c.iter()
                    .filter_map(|i| self.layers.get(*i).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every blob the cache holds (record layers, then cache mounts), each once: the
    /// artifact's layers.
    pub fn blobs(&self) -> Vec<&LayerBlob> {
        let mut out: Vec<&LayerBlob> = Vec::new();
        for b in self.layers.iter().chain(self.mounts.values()) {
            if !out.iter().any(|have| have.digest == b.digest) {
                out.push(b);
            }
        }
        out
    }

    /// Adds a blob of each cache mount's contents (`<root>/<sha256(id) hex>/data`, the
    /// solver's layout) for the ids this build uses and this store has.
    pub fn add_cache_mounts(
        &mut self,
        root: &std::path::Path,
        ids: &[String],
        content: &ContentStore,
        compression: &Compression,
        source_date_epoch: Option<i64>,
    ) -> Result<()> {
        for id in ids {
            let dir = cache_mount_dir(root, id);
            if !dir.is_dir() {
                continue;
            }
            let blob = strata_exporter::export_layer(
                &dir,
                content,
                compression,
                &DiffOptions { source_date_epoch },
            )
            .map_err(|source| Error::Exporter {
                action: format!("export cache mount {id}"),
                source,
            })?;
            self.mounts.insert(id.clone(), blob);
        }
        Ok(())
    }

    /// The layer chain recorded for `key`, bottom first.
    pub fn chain(&self, key: &CacheKey) -> Option<Vec<LayerBlob>> {
        self.records.get(&key.hex()).map(|c| {
            c.iter()
                .filter_map(|i| self.layers.get(*i).cloned())
                .collect()
        })
    }
}

/// Where the solver keeps cache mount `id`'s shared directory under `root`.
pub fn cache_mount_dir(root: &std::path::Path, id: &str) -> std::path::PathBuf {
    root.join(strata_dag::Digest::of(id.as_bytes()).hex())
        .join("data")
}

/// The ids of the `RUN --mount=type=cache` mounts of a definition.
pub fn cache_mount_ids(def: &strata_dag::Definition) -> Vec<String> {
    let mut ids: Vec<String> = def
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            strata_dag::Op::Exec(e) => Some(e.mounts.iter()),
            _ => None,
        })
        .flatten()
        .filter_map(|m| match &m.kind {
            strata_dag::ExecMountKind::Cache { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The records a `mode` exports out of everything the solve resolved: all of them for
/// `max`; for `min`, those whose result is a layer of the final image (`result`'s chain).
pub fn select(
    snapshotter: &dyn Snapshotter,
    resolved: &[(CacheKey, Ref)],
    mode: Mode,
    result: &Ref,
) -> Result<Vec<(CacheKey, Ref)>> {
    // Sorted and unique by key, so equal builds describe their cache in equal bytes.
    let mut keep: Vec<(CacheKey, Ref)> = resolved
        .iter()
        .filter(|(_, r)| !matches!(r, Ref::Local(_)))
        .cloned()
        .collect();
    keep.sort_by_key(|(k, _)| k.0);
    keep.dedup_by_key(|(k, _)| k.0);
    if mode == Mode::Max {
        return Ok(keep);
    }
    let chain: HashSet<String> = snapshot_chain(snapshotter, result)
        .map_err(Error::Store)?
        .into_iter()
        .collect();
    Ok(keep
        .into_iter()
        .filter(|(_, r)| matches!(r, Ref::Snapshot(n) if chain.contains(n)))
        .collect())
}

/// Builds the description of `records`.
///
/// Each snapshot's blob is the one image export uses, so that a runner importing the
/// cache rebuilds the very same image: a pulled or imported layer (`strata.io/blob`
/// without a cache key label) keeps its blob; a built layer uses the blob remembered
/// under `blob_label` (the image export's label for this compression and
/// SOURCE_DATE_EPOCH). Built snapshots without one (intermediate steps: only the final
/// image's layers were exported) are diffed and compressed now, a few at a time, and
/// remember the blob under `blob_label`, so a later export reuses the bytes.
pub fn describe(
    snapshotter: &dyn Snapshotter,
    content: &ContentStore,
    records: &[(CacheKey, Ref)],
    compression: &Compression,
    source_date_epoch: Option<i64>,
    blob_label: &str,
) -> Result<CacheDescription> {
    let mut chains: Vec<(CacheKey, Vec<String>)> = Vec::new();
    let mut blobs: HashMap<String, Option<LayerBlob>> = HashMap::new();
    for (key, r) in records {
        let chain = match r {
            Ref::Snapshot(_) => snapshot_chain(snapshotter, r).map_err(Error::Store)?,
            Ref::Scratch => Vec::new(),
            Ref::Local(_) => continue,
        };
        for name in &chain {
            if !blobs.contains_key(name) {
                blobs.insert(
                    name.clone(),
                    existing_blob(snapshotter, content, name, blob_label)?,
                );
            }
        }
        chains.push((*key, chain));
    }

    let mut missing: Vec<String> = blobs
        .iter()
        .filter(|(_, b)| b.is_none())
        .map(|(n, _)| n.clone())
        .collect();
    missing.sort();
    if !missing.is_empty() {
        let uppers = missing
            .iter()
            .map(|n| {
                snapshotter
                    .upper_dir(n)
                    .map_err(|e| Error::content(format!("find the upper dir of {n}"), e))
            })
            .collect::<Result<Vec<_>>>()?;
        let upper_refs: Vec<&std::path::Path> = uppers.iter().map(|p| p.as_path()).collect();
        let exported = strata_exporter::export_layers(
            &upper_refs,
            content,
            compression,
            &DiffOptions { source_date_epoch },
        )
        .map_err(|source| Error::Exporter {
            action: "export cache layers".into(),
            source,
        })?;
        for (name, blob) in missing.iter().zip(exported) {
            let label =
                serde_json::to_string(&blob).map_err(|e| Error::json("encode blob label", e))?;
            let mut labels = BTreeMap::new();
            labels.insert(blob_label.to_string(), label);
            snapshotter
                .update_labels(name, labels)
                .map_err(|e| Error::content(format!("label snapshot {name}"), e))?;
            blobs.insert(name.clone(), Some(blob));
        }
    }

    let mut desc = CacheDescription {
        schema_version: SCHEMA_VERSION,
        ..CacheDescription::default()
    };
    // Blobs are listed once by digest, in the order records first use them.
    let mut index: HashMap<String, usize> = HashMap::new();
    for (key, chain) in chains {
        let mut indices = Vec::with_capacity(chain.len());
        for name in &chain {
            let blob = blobs
                .get(name)
                .cloned()
                .flatten()
                .ok_or_else(|| Error::Store(format!("snapshot {name} has no layer blob")))?;
            let i = *index.entry(blob.digest.to_string()).or_insert_with(|| {
                desc.layers.push(blob);
                desc.layers.len() - 1
            });
            indices.push(i);
        }
        desc.records.insert(key.hex(), indices);
    }
    desc.normalize();
    Ok(desc)
}

/// The blob a snapshot's labels record (see [`describe`]), if it is still in the content
/// store.
fn existing_blob(
    snapshotter: &dyn Snapshotter,
    content: &ContentStore,
    name: &str,
    blob_label: &str,
) -> Result<Option<LayerBlob>> {
    let info = snapshotter
        .stat(name)
        .map_err(|e| Error::content(format!("stat snapshot {name}"), e))?;
    let label = if info.labels.contains_key(LABEL_CACHE_KEY) {
        blob_label
    } else {
        LABEL_BLOB
    };
    Ok(info
        .labels
        .get(label)
        .and_then(|s| serde_json::from_str::<LayerBlob>(s).ok())
        .filter(|b| content.exists(&b.digest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_dag::Digest;

    fn blob(n: u8) -> LayerBlob {
        LayerBlob {
            digest: Digest::of(&[n]),
            size: u64::from(n),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: Digest::of(&[n, n]),
            uncompressed_size: 0,
        }
    }

    #[test]
    fn description_round_trips_and_resolves_chains() {
        let mut d = CacheDescription {
            schema_version: SCHEMA_VERSION,
            layers: vec![blob(1), blob(2)],
            ..Default::default()
        };
        d.records.insert(CacheKey([1; 32]).hex(), vec![0]);
        d.records.insert(CacheKey([2; 32]).hex(), vec![0, 1]);
        d.records.insert(CacheKey([3; 32]).hex(), vec![]);
        let back = CacheDescription::from_json(&d.to_json().unwrap()).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.chain(&CacheKey([2; 32])), Some(vec![blob(1), blob(2)]));
        assert_eq!(back.chain(&CacheKey([3; 32])), Some(vec![]));
        assert_eq!(back.chain(&CacheKey([4; 32])), None);
    }

    #[test]
    fn carried_records_keep_the_description_canonical() {
        let dir = tempfile::tempdir().unwrap();
        let content = ContentStore::open(dir.path()).unwrap();
        // Blobs 1 and 2 are here, 3 is not.
        let mut here = Vec::new();
        for n in [1u8, 2] {
            let (digest, size) = content.put(&[n; 4], None).unwrap();
            here.push(LayerBlob {
                digest,
                size,
                ..blob(n)
            });
        }
        let mut theirs = CacheDescription {
            schema_version: SCHEMA_VERSION,
            layers: vec![here[0].clone(), here[1].clone(), blob(3)],
            ..Default::default()
        };
        theirs.records.insert(CacheKey([1; 32]).hex(), vec![0]);
        theirs.records.insert(CacheKey([2; 32]).hex(), vec![0, 1]);
        theirs.records.insert(CacheKey([3; 32]).hex(), vec![0, 2]);
        theirs.normalize();

        // Ours has only the longest servable record; carrying theirs over gives back the
        // servable ones, and byte-equal to a description made with all of them at once.
        let mut ours = CacheDescription {
            schema_version: SCHEMA_VERSION,
            layers: vec![here[0].clone(), here[1].clone()],
            ..Default::default()
        };
        ours.records.insert(CacheKey([2; 32]).hex(), vec![0, 1]);
        let within = ours.longest_chain();
        ours.carry_over(&[&theirs], &content, Some(&within));
        let mut want = theirs.clone();
        want.records.remove(&CacheKey([3; 32]).hex());
        want.normalize();
        assert_eq!(ours.to_json().unwrap(), want.to_json().unwrap());
        assert_eq!(ours.chain(&CacheKey([3; 32])), None, "blob 3 is not here");

        // `within` keeps chains that are not a prefix of the final image's out.
        let mut min = CacheDescription {
            schema_version: SCHEMA_VERSION,
            layers: vec![here[1].clone()],
            ..Default::default()
        };
        min.records.insert(CacheKey([9; 32]).hex(), vec![0]);
        let within = min.longest_chain();
        min.carry_over(&[&theirs], &content, Some(&within));
        assert_eq!(min.records.len(), 1, "{:?}", min.records);
    }

    #[test]
    fn descriptions_with_bad_indices_or_versions_are_refused() {
        let mut d = CacheDescription {
            schema_version: SCHEMA_VERSION,
            layers: vec![blob(1)],
            ..Default::default()
        };
        d.records.insert(CacheKey([1; 32]).hex(), vec![0, 1]);
        let e = CacheDescription::from_json(&d.to_json().unwrap()).unwrap_err();
        assert!(e.to_string().contains("uses layer 1 of 1"), "{e}");
        d.records.clear();
        d.schema_version = 9;
        let e = CacheDescription::from_json(&d.to_json().unwrap()).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
    }
}
