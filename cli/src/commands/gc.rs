//! Garbage collection of the store (`strata prune`).

use std::collections::{BTreeMap, HashSet};

use anyhow::{anyhow, Result};
use strata_dag::Digest;
use strata_exporter::ImageStore;
use strata_snapshotter::{Info, Kind, Snapshotter};
use strata_solver::worker::LABEL_BLOB;

use crate::store::Store;

/// Removes cache records (all of them with `all`, else those whose snapshot is gone),
/// snapshots nothing refers to, and blobs neither an image nor a snapshot refers to.
/// Returns (snapshots, blobs, records) removed.
pub fn collect(store: &Store, all: bool) -> Result<(usize, usize, usize)> {
    let mut infos: BTreeMap<String, Info> = BTreeMap::new();
    store.snapshotter.walk(&mut |i| {
        infos.insert(i.name.clone(), i.clone());
    })?;
    let records = store.cache.retain(&|value| {
        if all {
            return false;
        }
        match value.strip_prefix("snapshot:") {
            Some(name) => infos.contains_key(name),
            None => true,
        }
    });
    let records = records.map_err(|e| anyhow!(e))?;

    // Snapshots still reachable from a cache record (and their parents).
    let mut live: HashSet<String> = HashSet::new();
    for (_, value) in store.cache.entries().map_err(|e| anyhow!(e))? {
        let mut next = value.strip_prefix("snapshot:").map(str::to_string);
        while let Some(name) = next {
            if !live.insert(name.clone()) {
                break;
            }
            next = infos
                .get(&name)
                .and_then(|i| i.parent.clone())
                .filter(|p| !p.is_empty());
        }
    }
    // Remove children before parents: repeat until nothing more can go.
    let mut removed_snapshots = 0;
    loop {
        let parents: HashSet<String> = infos.values().filter_map(|i| i.parent.clone()).collect();
        let doomed: Vec<String> = infos
            .values()
            .filter(|i| !live.contains(&i.name) && !parents.contains(&i.name))
            .filter(|i| i.kind != Kind::Active || all || is_stale(&i.name))
            .map(|i| i.name.clone())
            .collect();
        if doomed.is_empty() {
            break;
        }
        for name in doomed {
            if store.snapshotter.remove(&name).is_ok() {
                removed_snapshots += 1;
            }
            infos.remove(&name);
        }
    }

    // Blobs referenced by images or by the remaining snapshots' labels.
    let mut keep: HashSet<Digest> = HashSet::new();
    let images = ImageStore::open(&store.images_dir())?;
    for img in images.list()? {
        keep.insert(img.record.manifest_digest.clone());
        keep.insert(img.record.config_digest.clone());
        if let Ok(m) = strata_exporter::read_manifest(&store.content, &img.record) {
            for l in m.layers() {
                if let Some(d) = Digest::parse(l.digest().as_ref()) {
                    keep.insert(d);
                }
            }
        }
    }
    for info in infos.values() {
        if let Some(b) = info.labels.get(LABEL_BLOB) {
            if let Some(d) = serde_json::from_str::<serde_json::Value>(b)
                .ok()
                .and_then(|v| {
                    v.get("digest")
                        .and_then(|d| d.as_str())
                        .and_then(Digest::parse)
                })
            {
                keep.insert(d);
            }
        }
    }
    let mut doomed_blobs = Vec::new();
    store.content.walk(&mut |d, _| {
        if !keep.contains(d) {
            doomed_blobs.push(d.clone());
        }
    })?;
    let mut removed_blobs = 0;
    for d in doomed_blobs {
        if store.content.delete(&d).is_ok() {
            removed_blobs += 1;
        }
    }
    Ok((removed_snapshots, removed_blobs, records))
}

/// Active snapshots are named `<kind>-<pid>-...`; one whose process is gone is stale.
fn is_stale(name: &str) -> bool {
    let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
    match pid {
        Some(pid) => {
            pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        }
        None => true,
    }
}
