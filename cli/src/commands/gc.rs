//! Garbage collection and usage of the store: `strata prune` and `strata du`, with
//! `docker buildx prune`/`du` flags and output.
//!
//! What holds what: a cache record names a result snapshot; a committed snapshot holds its
//! parent chain; an active snapshot of a live process holds itself and its chain; a
//! snapshot's `strata.io/blob*` labels hold the layer blobs made from (or pulled for) it;
//! a tagged image holds its manifest, config and layer blobs. Everything else is garbage.
//!
//! Prune runs with the store held exclusively ([`Store::open_exclusive`]): builds on the
//! store finish first and new ones wait, so nothing removed can be in use. It removes a
//! cache record before its snapshot (a crash never leaves a record naming nothing), a
//! snapshot before its parent, and a blob only after the snapshots that named it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use strata_dag::Digest;
use strata_exporter::ImageStore;
use strata_snapshotter::{Info, Kind, Snapshotter};
use strata_solver::worker::{LABEL_BLOB, LABEL_CACHE_KEY};

use crate::args::Cli;
use crate::store::{now_millis, Store};

/// What `strata prune` removes.
#[derive(Debug, Default, Clone)]
pub struct PruneOptions {
    /// All build cache, not only what nothing references.
    pub all: bool,
    /// Remove least recently used cache until the build cache takes at most this many
    /// bytes. Unlike buildx, where 0 means "no limit", an explicit 0 keeps nothing.
    pub keep_storage: Option<u64>,
    /// Only cache last used at least this long ago.
    pub until: Option<Duration>,
    pub verbose: bool,
}

impl PruneOptions {
    /// From the command line's `--keep-storage SIZE` and `--filter until=DURATION`.
    pub fn parse(
        all: bool,
        keep_storage: Option<&str>,
        filters: &[String],
        verbose: bool,
    ) -> Result<Self> {
        let keep_storage = keep_storage
            .map(|s| parse_size(s).with_context(|| format!("parse --keep-storage {s:?}")))
            .transpose()?;
        let mut until = None;
        for f in filters {
            match f.split_once('=') {
                Some(("until", v)) => {
                    until =
                        Some(parse_duration(v).with_context(|| format!("parse --filter {f:?}"))?);
                }
                _ => bail!("unsupported prune filter {f:?} (supported: until=DURATION)"),
            }
        }
        Ok(PruneOptions {
            all,
            keep_storage,
            until,
            verbose,
        })
    }
}

/// One snapshot as garbage collection sees it.
#[derive(Debug, Clone)]
struct Snap {
    info: Info,
    /// Bytes its own directory takes (hardlinks counted once).
    size: u64,
    /// Milliseconds since the epoch: the newest use of a record naming it or any of its
    /// descendants (a cached build hits only its last step, which uses the whole chain),
    /// else its (or their) creation.
    last_used: u64,
    /// Hex keys of the cache records naming it.
    keys: Vec<String>,
}

/// The store's state, read once.
struct Model {
    snaps: BTreeMap<String, Snap>,
    /// Cache records: key, value (`snapshot:<name>`, `scratch`, `local:<path>`).
    records: Vec<(Vec<u8>, String)>,
    blobs: BTreeMap<Digest, u64>,
    /// Blobs tagged images need.
    image_blobs: HashSet<Digest>,
    images: usize,
    /// False when an image's manifest could not be read: its layers are unknown, so no
    /// blob may be removed.
    images_complete: bool,
    cache_mounts: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn record_target(value: &str) -> Option<&str> {
    value.strip_prefix("snapshot:")
}

impl Model {
    fn load(store: &Store) -> Result<Model> {
        let mut infos = Vec::new();
        store
            .snapshotter
            .walk(&mut |i| infos.push(i.clone()))
            .context("list snapshots")?;
        let records = store
            .cache
            .db
            .entries()
            .map_err(|e| anyhow!("list cache records: {e}"))?;
        let usage = store.cache.usage.read();
        let mut keys_of: HashMap<&str, Vec<String>> = HashMap::new();
        for (k, v) in &records {
            if let Some(name) = record_target(v) {
                keys_of.entry(name).or_default().push(hex(k));
            }
        }
        let mut seen_inodes = HashSet::new();
        let mut snaps = BTreeMap::new();
        for info in infos {
            let size = match store.snapshotter.upper_dir(&info.name) {
                Ok(dir) => dir_usage(&dir, &mut seen_inodes),
                Err(_) => 0,
            };
            let keys = keys_of.remove(info.name.as_str()).unwrap_or_default();
            let created = u64::try_from(info.created)
                .unwrap_or(0)
                .saturating_mul(1000);
            let last_used = keys
                .iter()
                .filter_map(|k| usage.get(k).copied())
                .fold(created, u64::max);
            snaps.insert(
                info.name.clone(),
                Snap {
                    info,
                    size,
                    last_used,
                    keys,
                },
            );
        }
        // Pass each snapshot's own last use up its parent chain.
        let own: Vec<(Option<String>, u64)> = snaps
            .values()
            .map(|s: &Snap| (s.info.parent.clone(), s.last_used))
            .collect();
        let guard = snaps.len();
        for (parent, used) in own {
            let mut next = parent;
            let mut hops = 0;
            while let Some(p) = next.filter(|p| !p.is_empty()) {
                let Some(ps) = snaps.get_mut(&p) else {
                    break;
                };
                hops += 1;
                if ps.last_used >= used || hops > guard {
                    break;
                }
                ps.last_used = used;
                next = ps.info.parent.clone();
            }
        }
        let mut blobs = BTreeMap::new();
        store
            .content
            .walk(&mut |d, size| {
                blobs.insert(d.clone(), size);
            })
            .context("list blobs")?;
        let images = ImageStore::open(&store.images_dir())?.list()?;
        let mut image_blobs = HashSet::new();
        let mut images_complete = true;
        for img in &images {
            image_blobs.insert(img.record.manifest_digest.clone());
            image_blobs.insert(img.record.config_digest.clone());
            match strata_exporter::read_manifest(&store.content, &img.record) {
                Ok(m) => {
                    for l in m.layers() {
                        if let Some(d) = Digest::parse(l.digest().as_ref()) {
                            image_blobs.insert(d);
                        }
                    }
                }
                Err(e) => {
                    eprintln!(
                        "WARNING: read the manifest of {}:{}: {e}; keeping all blobs",
                        img.name, img.tag
                    );
                    images_complete = false;
                }
            }
        }
        let cache_mounts = dir_usage(&store.cache_mounts_dir(), &mut seen_inodes);
        Ok(Model {
            snaps,
            records,
            blobs,
            image_blobs,
            images: images.len(),
            images_complete,
            cache_mounts,
        })
    }

    /// Snapshots that must stay while the records naming `targets` stay: those and their
    /// parent chains, and active snapshots of live processes with theirs.
    fn live<'a>(&self, targets: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
        let mut live = HashSet::new();
        let in_use: Vec<String> = self
            .snaps
            .values()
            .filter(|s| s.info.kind != Kind::Committed && !is_stale(&s.info.name))
            .map(|s| s.info.name.clone())
            .collect();
        let roots = targets.into_iter().map(str::to_string).chain(in_use);
        for root in roots {
            let mut next = Some(root);
            while let Some(name) = next {
                let Some(s) = self.snaps.get(&name) else {
                    break;
                };
                if !live.insert(name) {
                    break;
                }
                next = s.info.parent.clone().filter(|p| !p.is_empty());
            }
        }
        live
    }

    /// Blobs the snapshots in `live` (and tagged images) keep.
    fn kept_blobs(&self, live: &HashSet<String>) -> HashSet<Digest> {
        let mut keep = self.image_blobs.clone();
        for name in live {
            if let Some(s) = self.snaps.get(name) {
                keep.extend(label_blobs(&s.info));
            }
        }
        keep
    }

    /// Bytes of build cache left if only `live` snapshots stay: them and the blobs they
    /// keep (tagged images' blobs are not build cache).
    fn storage(&self, live: &HashSet<String>) -> u64 {
        let snaps: u64 = live
            .iter()
            .filter_map(|n| self.snaps.get(n))
            .map(|s| s.size)
            .sum();
        let blobs: u64 = self
            .kept_blobs(live)
            .iter()
            .filter(|d| !self.image_blobs.contains(*d))
            .filter_map(|d| self.blobs.get(d))
            .sum();
        snaps + blobs + self.cache_mounts
    }

    /// Snapshot names that cache records name and that exist.
    fn targets(&self) -> BTreeSet<String> {
        self.records
            .iter()
            .filter_map(|(_, v)| record_target(v))
            .filter(|n| self.snaps.contains_key(*n))
            .map(str::to_string)
            .collect()
    }
}

/// The blobs a snapshot's `strata.io/blob*` labels name (pulled, exported, per
/// compression and epoch).
fn label_blobs(info: &Info) -> Vec<Digest> {
    info.labels
        .iter()
        .filter(|(k, _)| k.starts_with(LABEL_BLOB))
        .filter_map(|(_, v)| serde_json::from_str::<serde_json::Value>(v).ok())
        .filter_map(|v| {
            v.get("digest")
                .and_then(|d| d.as_str())
                .and_then(Digest::parse)
        })
        .collect()
}

/// Active snapshots and views are named `<kind>-<pid>-...` (`active-`, `pull-`, `view-`,
/// `bind-rw-`, `export-`): the first numeric part is the pid of the process using it, and
/// one whose process is gone is stale. A name without a pid is treated as stale: nothing
/// live makes such names. (Prune holds the store exclusively, so no strata process is
/// using any; the check keeps a snapshot of anything else alive that does.)
fn is_stale(name: &str) -> bool {
    match name.split('-').find_map(|p| p.parse::<u32>().ok()) {
        Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => true,
    }
}

/// Bytes a directory tree takes on disk (st_blocks), each inode counted once across
/// calls sharing `seen` (hardlinks within and between snapshots). Files vanishing
/// during the walk are skipped.
fn dir_usage(root: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if seen.insert((meta.dev(), meta.ino())) {
            total += meta.blocks() * 512;
        }
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

/// What one prune removed.
#[derive(Debug, Default)]
pub struct PruneReport {
    /// Removed snapshots: name, bytes, last used (ms).
    pub snapshots: Vec<(String, u64, u64)>,
    pub blobs: Vec<(Digest, u64)>,
    pub records: usize,
    pub cache_mounts: u64,
    /// Snapshots that could not be removed, with why.
    pub failed: Vec<(String, String)>,
}

impl PruneReport {
    pub fn total(&self) -> u64 {
        self.snapshots.iter().map(|s| s.1).sum::<u64>()
            + self.blobs.iter().map(|b| b.1).sum::<u64>()
            + self.cache_mounts
    }
}

/// Removes what `opts` selects; see the module docs for the order.
pub fn collect(store: &Store, opts: &PruneOptions) -> Result<PruneReport> {
    let model = Model::load(store)?;
    let now = now_millis();
    let cutoff = opts
        .until
        .map(|d| now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    let old_enough = |last_used: u64| cutoff.is_none_or(|c| last_used <= c);
    let everything = opts.all && opts.keep_storage.is_none() && opts.until.is_none();

    // 1. Which record targets go: all (eligible) ones with --all, the least recently used
    //    first until the rest fits with --keep-storage.
    let targets = model.targets();
    let mut doomed_targets: HashSet<String> = HashSet::new();
    if let Some(limit) = opts.keep_storage {
        // One record target at a time, least recently used first among those no other
        // kept target builds on (removing an ancestor's record would free nothing), until
        // what stays fits.
        let mut kept: BTreeSet<String> = targets.clone();
        loop {
            if model.storage(&model.live(kept.iter().map(String::as_str))) <= limit {
                break;
            }
            let mut ancestors: HashSet<&str> = HashSet::new();
            for t in &kept {
                let mut next = model.snaps.get(t).and_then(|s| s.info.parent.as_deref());
                while let Some(p) = next.filter(|p| !p.is_empty()) {
                    if !ancestors.insert(p) {
                        break;
                    }
                    next = model.snaps.get(p).and_then(|s| s.info.parent.as_deref());
                }
            }
            let victim = kept
                .iter()
                .filter(|t| !ancestors.contains(t.as_str()))
                .filter_map(|t| model.snaps.get(t))
                .filter(|s| old_enough(s.last_used))
                .min_by_key(|s| (s.last_used, s.info.name.clone()));
            let Some(victim) = victim else {
                break;
            };
            let name = victim.info.name.clone();
            kept.remove(&name);
            doomed_targets.insert(name);
        }
    } else if opts.all {
        doomed_targets.extend(
            targets
                .iter()
                .filter(|n| model.snaps.get(*n).is_some_and(|s| old_enough(s.last_used)))
                .cloned(),
        );
    }

    // 2. Records first, so a crash never leaves one naming a removed snapshot. Records of
    //    missing snapshots are always garbage; records without a snapshot (`scratch`,
    //    `local:`) hold no storage and go only with a plain --all.
    let removed_records = store
        .cache
        .db
        .retain(&|value| match record_target(value) {
            Some(name) => model.snaps.contains_key(name) && !doomed_targets.contains(name),
            None => !everything,
        })
        .map_err(|e| anyhow!("remove cache records: {e}"))?;
    // What stays is decided by what the database now holds.
    let remaining = store
        .cache
        .db
        .entries()
        .map_err(|e| anyhow!("list cache records: {e}"))?;
    let remaining_keys: HashSet<String> = remaining.iter().map(|(k, _)| hex(k)).collect();
    store
        .cache
        .usage
        .update(|times| times.retain(|k, _| remaining_keys.contains(k)))?;
    let live = model.live(remaining.iter().filter_map(|(_, v)| record_target(v)));

    // 3. Snapshots nothing holds, children before parents.
    let mut report = PruneReport {
        records: removed_records,
        ..PruneReport::default()
    };
    let mut present: BTreeMap<String, &Snap> =
        model.snaps.iter().map(|(n, s)| (n.clone(), s)).collect();
    let mut skipped: HashSet<String> = HashSet::new();
    loop {
        let parents: HashSet<&str> = present
            .values()
            .filter_map(|s| s.info.parent.as_deref())
            .collect();
        let doomed: Vec<String> = present
            .values()
            .filter(|s| !live.contains(&s.info.name) && !skipped.contains(&s.info.name))
            .filter(|s| !parents.contains(s.info.name.as_str()))
            .filter(|s| old_enough(s.last_used))
            .map(|s| s.info.name.clone())
            .collect();
        if doomed.is_empty() {
            break;
        }
        for name in doomed {
            match store.snapshotter.remove(&name) {
                Ok(()) => {
                    if let Some(s) = present.remove(&name) {
                        report.snapshots.push((name, s.size, s.last_used));
                    }
                }
                Err(e) => {
                    report.failed.push((name.clone(), e.to_string()));
                    skipped.insert(name);
                }
            }
        }
    }

    // 4. Blobs neither a tagged image nor a remaining snapshot names (all of them if an
    //    image's manifest is unreadable). With --filter until, only blobs written before
    //    the cutoff.
    if model.images_complete {
        let still: HashSet<String> = present.keys().cloned().collect();
        let keep = model.kept_blobs(&still);
        for (d, size) in &model.blobs {
            if keep.contains(d) {
                continue;
            }
            if let Some(c) = cutoff {
                let written = std::fs::metadata(store.content.path(d))
                    .map(|m| u64::try_from(m.mtime()).unwrap_or(0).saturating_mul(1000))
                    .unwrap_or(0);
                if written > c {
                    continue;
                }
            }
            if store.content.delete(d).is_ok() {
                report.blobs.push((d.clone(), *size));
            }
        }
    }

    // Where-from hints (`sources/<hex>`, for cross-repository mounts on push) of blobs
    // no longer here.
    if let Ok(entries) = std::fs::read_dir(store.content.root().join("sources")) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let gone = name
                .to_str()
                .and_then(|h| Digest::parse(&format!("sha256:{h}")))
                .is_none_or(|d| !store.content.exists(&d));
            if gone {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    // 5. The rest of the build cache, with a plain --all: RUN cache mounts, the context
    //    stat cache, and lock files of dead holders (nobody else has the store open).
    if everything {
        report.cache_mounts = model.cache_mounts;
        empty_dir(&store.cache_mounts_dir())?;
        empty_dir(&store.root.join("locks"))?;
        match std::fs::remove_file(store.root.join("statcache-v1")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).context("remove the context stat cache");
            }
            _ => {}
        }
    }
    Ok(report)
}

/// Removes everything inside `dir` (which may be missing), keeping `dir`.
fn empty_dir(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("list {}", dir.display()))?;
        let path = entry.path();
        let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

/// `strata prune`.
pub fn prune(cli: &Cli, opts: &PruneOptions) -> Result<i32> {
    let store = Store::open_exclusive(&cli.root)?;
    let report = collect(&store, opts)?;
    let mut rows: Vec<Row> = report
        .snapshots
        .iter()
        .map(|(name, size, used)| Row {
            id: name.clone(),
            reclaimable: true,
            size: *size,
            last_used: Some(*used),
        })
        .collect();
    if report.cache_mounts > 0 {
        rows.push(Row {
            id: "cache mounts".into(),
            reclaimable: true,
            size: report.cache_mounts,
            last_used: None,
        });
    }
    if !rows.is_empty() {
        print_table(&rows);
    }
    if opts.verbose {
        for (d, size) in &report.blobs {
            println!("Deleted blob {d} ({})", human_size(*size));
        }
        println!("Deleted {} cache records", report.records);
    }
    for (name, why) in &report.failed {
        eprintln!("WARNING: remove snapshot {name}: {why}");
    }
    println!("Total:\t{}", human_size(report.total()));
    Ok(0)
}

struct Row {
    id: String,
    reclaimable: bool,
    size: u64,
    last_used: Option<u64>,
}

fn print_table(rows: &[Row]) {
    let width = rows.iter().map(|r| r.id.len()).max().unwrap_or(2).max(2) + 2;
    println!(
        "{:<width$}{:<16}{:<16}LAST ACCESSED",
        "ID", "RECLAIMABLE", "SIZE"
    );
    for r in rows {
        println!(
            "{:<width$}{:<16}{:<16}{}",
            r.id,
            r.reclaimable,
            human_size(r.size),
            r.last_used.map(human_age).unwrap_or_default()
        );
    }
}

/// `strata du`.
pub fn du(cli: &Cli, verbose: bool) -> Result<i32> {
    let store = Store::open(&cli.root)?;
    let model = Model::load(&store)?;
    let live = model.live(model.targets().iter().map(String::as_str));
    let mut snaps: Vec<&Snap> = model.snaps.values().collect();
    // Largest first, as buildx does.
    snaps.sort_by(|a, b| b.size.cmp(&a.size).then(a.info.name.cmp(&b.info.name)));
    if verbose {
        for s in &snaps {
            println!("ID:\t\t{}", s.info.name);
            if let Some(p) = &s.info.parent {
                println!("Parent:\t\t{p}");
            }
            println!("Kind:\t\t{:?}", s.info.kind);
            println!(
                "Created at:\t{}",
                timestamp(s.info.created.saturating_mul(1000))
            );
            println!("Last used:\t{}", human_age(s.last_used));
            println!("Reclaimable:\t{}", !live.contains(&s.info.name));
            println!("Size:\t\t{}", human_size(s.size));
            for k in &s.keys {
                println!("Cache record:\t{k}");
            }
            if let Some(k) = s.info.labels.get(LABEL_CACHE_KEY) {
                println!("Made for key:\t{k}");
            }
            for d in label_blobs(&s.info) {
                println!("Layer blob:\t{d}");
            }
            println!();
        }
    } else if !snaps.is_empty() {
        let rows: Vec<Row> = snaps
            .iter()
            .map(|s| Row {
                id: s.info.name.clone(),
                reclaimable: !live.contains(&s.info.name),
                size: s.size,
                last_used: Some(s.last_used),
            })
            .collect();
        print_table(&rows);
        println!();
    }
    let snap_total: u64 = snaps.iter().map(|s| s.size).sum();
    let reclaimable: u64 = snaps
        .iter()
        .filter(|s| !live.contains(&s.info.name))
        .map(|s| s.size)
        .sum();
    let keep = model.kept_blobs(&live);
    let blob_total: u64 = model.blobs.values().sum();
    let image_total: u64 = model
        .blobs
        .iter()
        .filter(|(d, _)| model.image_blobs.contains(*d))
        .map(|(_, s)| s)
        .sum();
    let orphan_blobs: u64 = model
        .blobs
        .iter()
        .filter(|(d, _)| !keep.contains(*d))
        .map(|(_, s)| s)
        .sum();
    println!(
        "Snapshots:\t{} ({})",
        human_size(snap_total),
        model.snaps.len()
    );
    println!("Cache records:\t{}", model.records.len());
    println!("Cache mounts:\t{}", human_size(model.cache_mounts));
    println!(
        "Blobs:\t\t{} ({})",
        human_size(blob_total),
        model.blobs.len()
    );
    println!(
        "Images:\t\t{} ({} tagged)",
        human_size(image_total),
        model.images
    );
    println!(
        "Reclaimable:\t{}",
        human_size(
            reclaimable
                + if model.images_complete {
                    orphan_blobs
                } else {
                    0
                }
        )
    );
    println!(
        "Total:\t\t{}",
        human_size(snap_total + blob_total + model.cache_mounts)
    );
    Ok(0)
}

/// docker's `units.HumanSize`: decimal units, four significant digits.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    // %.4g: four significant digits, trailing zeros dropped.
    let decimals = match v {
        v if v >= 1000.0 => 0,
        v if v >= 100.0 => 1,
        v if v >= 10.0 => 2,
        _ => 3,
    };
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s}{}", UNITS[unit])
}

fn human_age(millis: u64) -> String {
    format!(
        "{} ago",
        human_duration(now_millis().saturating_sub(millis) / 1000)
    )
}

/// Docker's `units.HumanDuration`, the words of every CREATED and LAST USED column.
pub fn human_duration(secs: u64) -> String {
    let minutes = secs / 60;
    // Hours round to the nearest, as Docker's do.
    let hours = (secs + 1800) / 3600;
    match secs {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        2..=59 => format!("{secs} seconds"),
        _ if minutes == 1 => "About a minute".into(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", secs / 3600 / 24 / 365),
    }
}

fn timestamp(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// A size as buildx's `--keep-storage` takes it (docker's `RAMInBytes`): a number with an
/// optional binary unit, `512`, `10mb`, `1.5GB`, `2GiB`, `100k`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| anyhow!("invalid size {s:?}: expected a number and a unit"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => bail!("invalid size {s:?}: unknown unit"),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        bail!("invalid size {s:?}: out of range");
    }
    Ok(bytes as u64)
}

/// A Go duration (`24h`, `1h30m`, `90s`, `500ms`), as `--filter until=` takes it.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        bail!("invalid duration {s:?}");
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| anyhow!("invalid duration {s:?}: missing unit"))?;
        let (num, tail) = rest.split_at(split);
        let value: f64 = num.parse().map_err(|_| anyhow!("invalid duration {s:?}"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => bail!("invalid duration {s:?}: unknown unit {unit:?}"),
        };
        total += value * secs;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| anyhow!("invalid duration {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_dockers() {
        let cases = [
            (0, "Less than a second"),
            (1, "1 second"),
            (59, "59 seconds"),
            (60, "About a minute"),
            (119, "About a minute"),
            (120, "2 minutes"),
            (3599, "59 minutes"),
            (3600, "About an hour"),
            (5399, "About an hour"),
            (5400, "2 hours"),
            (47 * 3600, "47 hours"),
            (48 * 3600, "2 days"),
            (14 * 86400, "2 weeks"),
            (60 * 86400, "2 months"),
            (2 * 365 * 86400, "2 years"),
        ];
        for (secs, words) in cases {
            assert_eq!(human_duration(secs), words, "{secs} s");
        }
    }

    #[test]
    fn sizes_parse_like_docker() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("10mb").unwrap(), 10 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("100k").unwrap(), 100 << 10);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("10xb").is_err());
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("24").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn filters_other_than_until_are_refused() {
        let err = PruneOptions::parse(false, None, &["type=regular".into()], false).unwrap_err();
        assert!(
            err.to_string().contains("unsupported prune filter"),
            "{err}"
        );
        let o = PruneOptions::parse(true, Some("1GB"), &["until=2h".into()], false).unwrap();
        assert_eq!(o.keep_storage, Some(1 << 30));
        assert_eq!(o.until, Some(Duration::from_secs(7200)));
    }

    /// Commits a snapshot `name` on `parent` holding one file of `bytes` bytes.
    fn snapshot(store: &Store, name: &str, parent: &str, bytes: usize) {
        let key = format!("active-{}-{name}", std::process::id());
        store.snapshotter.prepare(&key, parent).unwrap();
        let upper = store.snapshotter.upper_dir(&key).unwrap();
        std::fs::write(upper.join(name), vec![7u8; bytes]).unwrap();
        store
            .snapshotter
            .commit(name, &key, BTreeMap::new())
            .unwrap();
    }

    fn names(store: &Store) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        store
            .snapshotter
            .walk(&mut |i| {
                out.insert(i.name.clone());
            })
            .unwrap();
        out
    }

    fn record_values(store: &Store) -> BTreeSet<String> {
        store
            .cache
            .db
            .entries()
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    #[test]
    fn keep_storage_takes_least_recently_used_leaves_and_spares_shared_parents() {
        use strata_solver::cache::CacheStore;
        use strata_solver::{CacheKey, Ref};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_exclusive(dir.path()).unwrap();
        snapshot(&store, "base", "", 200_000);
        snapshot(&store, "a", "base", 1_000_000);
        snapshot(&store, "b", "base", 1_000_000);
        snapshot(&store, "orphan", "", 50_000);
        for (k, name) in [(1u8, "base"), (2, "a"), (3, "b")] {
            store
                .cache
                .db
                .put(&CacheKey([k; 32]), &Ref::Snapshot(name.into()))
                .unwrap();
        }
        // base's own record is the oldest, but b (used last) builds on it; a is the least
        // recently used leaf.
        let now = now_millis();
        store
            .cache
            .usage
            .update(|t| {
                t.insert(hex(&[1; 32]), now - 9000);
                t.insert(hex(&[2; 32]), now - 5000);
                t.insert(hex(&[3; 32]), now - 1000);
            })
            .unwrap();

        // A plain prune takes only the orphan.
        let r = collect(&store, &PruneOptions::default()).unwrap();
        assert_eq!(
            r.snapshots.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
            ["orphan"]
        );
        assert!(r.total() >= 50_000, "{r:?}");

        let opts = PruneOptions::parse(false, Some("1.5MB"), &[], false).unwrap();
        let r = collect(&store, &opts).unwrap();
        assert_eq!(
            r.snapshots.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(r.records, 1);
        assert_eq!(names(&store), ["b", "base"].map(String::from).into());
        assert_eq!(
            record_values(&store),
            ["snapshot:b", "snapshot:base"].map(String::from).into()
        );
        // The table forgets the removed record's time.
        assert!(!store.cache.usage.read().contains_key(&hex(&[2; 32])));

        // Everything was used within the hour: --all with until=1h keeps it all.
        let opts = PruneOptions::parse(true, None, &["until=1h".into()], false).unwrap();
        let r = collect(&store, &opts).unwrap();
        assert_eq!((r.snapshots.len(), r.records), (0, 0));

        // --all removes the records first, then the chain child before parent.
        let opts = PruneOptions::parse(true, None, &[], false).unwrap();
        let r = collect(&store, &opts).unwrap();
        assert_eq!(
            r.snapshots.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
            ["b", "base"]
        );
        assert!(names(&store).is_empty());
        assert!(record_values(&store).is_empty());
    }

    #[test]
    fn active_snapshots_of_live_processes_are_not_stale() {
        let me = std::process::id();
        assert!(!is_stale(&format!("active-{me}-0-123")));
        assert!(!is_stale(&format!("bind-rw-{me}-3-99")));
        // pid 1 is alive; a pid above the kernel's maximum never is.
        assert!(!is_stale("export-1-5"));
        assert!(is_stale("active-4294967-0-1"));
        assert!(is_stale("stray"));
    }

    #[test]
    fn human_sizes_match_docker_units() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1200), "1.2kB");
        assert_eq!(human_size(1_234_567), "1.235MB");
        assert_eq!(human_size(1_200_000_000), "1.2GB");
        assert_eq!(human_size(123_450_000), "123.5MB");
    }

    #[test]
    fn dir_usage_counts_hardlinks_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 64 * 1024]).unwrap();
        let mut seen = HashSet::new();
        let one = dir_usage(dir.path(), &mut seen);
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let mut seen = HashSet::new();
        let linked = dir_usage(dir.path(), &mut seen);
        assert!(one >= 64 * 1024, "{one}");
        // The link adds a directory entry, not another 64 KiB.
        assert!(linked < one + 8192, "{one} -> {linked}");
    }
}
