//! The store under `--root`: where each part lives, the store lock, last-use records for
//! the build cache, and crash recovery at open.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use strata_snapshotter::content::ContentStore;
use strata_snapshotter::sys::flock;
use strata_snapshotter::OverlaySnapshotter;
use strata_solver::cache::{CacheStore, DbCache, KeyLock};
use strata_solver::{CacheKey, Ref};

/// Crash leftovers younger than this may belong to a live process of another build on
/// the store (a snapshot directory between its creation and its metadata transaction, a
/// blob being downloaded), so a shared open leaves them alone.
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// An open store. Layout: `content/` (OCI blobs), `snapshots/` (overlay snapshotter),
/// `usage-v1.json` (when each cache record was last used; the records themselves are a
/// table of the snapshotter's metadata database),
/// `images/` (local image store), `statcache-v1`, `cache-mounts/` (RUN cache mounts),
/// `locks/` (per cache key), `mounts/<pid>/` (this process's temporary mount points),
/// `store.lock` (shared by every command, exclusive for `prune`).
pub struct Store {
    pub root: PathBuf,
    pub snapshotter: Arc<OverlaySnapshotter>,
    pub content: Arc<ContentStore>,
    pub cache: TrackedCache,
    pub mounts_dir: PathBuf,
    // Held for the store's lifetime; closing it releases the flock.
    _lock: File,
}

impl Store {
    /// Opens the store for a command that reads or adds to it: any number of these run at
    /// once, and they wait while a `prune` runs.
    pub fn open(root: &Path) -> Result<Store> {
        Store::open_with(root, false)
    }

    /// Opens the store for garbage collection: waits until no other command has it open,
    /// and keeps them out until dropped, so nothing it removes can be in use (a cache hit
    /// between a build's lookup and its use of the snapshot, an active snapshot, a blob
    /// being written, a cache mount).
    pub fn open_exclusive(root: &Path) -> Result<Store> {
        Store::open_with(root, true)
    }

    fn open_with(root: &Path, exclusive: bool) -> Result<Store> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("create store {}", root.display()))?;
        let lock = lock_store(root, exclusive)?;
        let mounts_root = root.join("mounts");
        std::fs::create_dir_all(&mounts_root)?;
        clean_stale_mounts(&mounts_root);
        let mounts_dir = mounts_root.join(std::process::id().to_string());
        std::fs::create_dir_all(&mounts_dir)?;
        let snapshotter = Arc::new(
            OverlaySnapshotter::open(&root.join("snapshots")).context("open snapshotter")?,
        );
        let content = ContentStore::open(&root.join("content")).context("open content store")?;
        let cache = DbCache::in_snapshotter(snapshotter.clone(), root.join("locks"));
        // The cache had a database of its own before it moved into the snapshotter's; its
        // records are not looked up there any more (the first build after the move makes
        // them again, and prune reaps the results they named).
        for old in ["cache-v1.redb", "cache-v1.lock", "cache-v1.lock.want"] {
            let _ = std::fs::remove_file(root.join(old));
        }
        // With the store to ourselves every leftover is one; otherwise only old ones are.
        let min_age = if exclusive {
            Duration::ZERO
        } else {
            LEFTOVER_AGE
        };
        clean_crash_leftovers(snapshotter.root(), content.root(), min_age);
        Ok(Store {
            root: root.to_path_buf(),
            snapshotter,
            content: Arc::new(content),
            cache: TrackedCache {
                db: cache,
                usage: UsageTable::new(root),
                touched: Mutex::new(HashMap::new()),
            },
            mounts_dir,
            _lock: lock,
        })
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Persistent `RUN --mount=type=cache` directories, one per cache id.
    pub fn cache_mounts_dir(&self) -> PathBuf {
        self.root.join("cache-mounts")
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Last-use times are an ordering hint for `prune --keep-storage`; losing them
        // (a failed write, a killed build) only makes the records look older.
        let _ = self.cache.flush();
        // The metadata database (the build cache is one of its tables) is closed now
        // rather than by a watcher thread that process exit would cut short (redb then
        // has to repair the file on its next open).
        self.snapshotter.release();
        let _ = strata_snapshotter::mount::unmount_all_under(&self.mounts_dir);
        remove_empty_dirs(&self.mounts_dir);
    }
}

/// Takes `<root>/store.lock`, shared or exclusive, saying so when it has to wait.
fn lock_store(root: &Path, exclusive: bool) -> Result<File> {
    let path = root.join("store.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let mode = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    if flock(&file, mode | libc::LOCK_NB).is_ok() {
        return Ok(file);
    }
    if exclusive {
        eprintln!("waiting for the other strata commands on this store to finish");
    } else {
        eprintln!("waiting for a prune of this store to finish");
    }
    flock(&file, mode).with_context(|| format!("lock {}", path.display()))?;
    Ok(file)
}

/// Milliseconds since the epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The cache as builds see it: [`DbCache`], noting when each record is written or hit so
/// that `prune --keep-storage` can remove the least recently used first. The times are
/// kept in memory and written once, when the store closes.
pub struct TrackedCache {
    pub db: DbCache,
    pub usage: UsageTable,
    touched: Mutex<HashMap<[u8; 32], u64>>,
}

impl TrackedCache {
    fn touch(&self, key: &CacheKey) {
        if let Ok(mut t) = self.touched.lock() {
            t.insert(key.0, now_millis());
        }
    }

    /// Writes the noted last-use times.
    pub fn flush(&self) -> Result<()> {
        let touched: Vec<([u8; 32], u64)> = match self.touched.lock() {
            Ok(mut t) => t.drain().collect(),
            Err(_) => return Ok(()),
        };
        if touched.is_empty() {
            return Ok(());
        }
        self.usage.update(|times| {
            for (key, at) in touched {
                let e = times.entry(hex(&key)).or_insert(0);
                *e = (*e).max(at);
            }
        })
    }
}

impl CacheStore for TrackedCache {
    fn get(&self, key: &CacheKey) -> Result<Option<Ref>, String> {
        let found = self.db.get(key)?;
        if found.is_some() {
            self.touch(key);
        }
        Ok(found)
    }

    fn put(&self, key: &CacheKey, result: &Ref) -> Result<(), String> {
        self.db.put(key, result)?;
        self.touch(key);
        Ok(())
    }

    fn lock(&self, key: &CacheKey) -> Result<Option<KeyLock>, String> {
        self.db.lock(key)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// When each cache record (by key hex) was last written or hit, in milliseconds since
/// the epoch: `<root>/usage-v1.json`, replaced whole (temp file, rename) under an
/// exclusive flock on `<root>/usage-v1.lock`, so a crash leaves the old or the new table
/// and concurrent builds never lose each other's times. Keys without a record are
/// harmless (prune drops them); a record without a time counts from its snapshot's
/// creation.
pub struct UsageTable {
    root: PathBuf,
}

impl UsageTable {
    fn new(root: &Path) -> Self {
        UsageTable {
            root: root.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.root.join("usage-v1.json")
    }

    /// Every recorded time. A missing or unreadable table is empty: it only orders pruning.
    pub fn read(&self) -> HashMap<String, u64> {
        std::fs::read(self.path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Read-modify-write under the lock.
    pub fn update(&self, f: impl FnOnce(&mut HashMap<String, u64>)) -> Result<()> {
        let lock_path = self.root.join("usage-v1.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("open {}", lock_path.display()))?;
        flock(&lock, libc::LOCK_EX).with_context(|| format!("lock {}", lock_path.display()))?;
        let mut times = self.read();
        f(&mut times);
        let bytes = serde_json::to_vec(&times).context("encode cache usage table")?;
        let path = self.path();
        let tmp = self
            .root
            .join(format!("usage-v1.json.tmp-{}", std::process::id()));
        // No fsync: the times are only a hint for pruning order, and a table a crash
        // leaves empty or old reads as "older" (see `read`), which is all losing them
        // costs. The rename still keeps concurrent readers from seeing half a table.
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(&bytes)?;
            std::fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("write {}", path.display()))
    }
}

/// Removes `dir` and its subdirectories only while they are empty, so that a mount that
/// could not be undone never has its content deleted.
fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Unmounts and removes the mount dirs of strata processes that are gone (a SIGKILL'd
/// build); live processes' dirs are left alone.
fn clean_stale_mounts(mounts_root: &Path) {
    let Ok(entries) = std::fs::read_dir(mounts_root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        let _ = strata_snapshotter::mount::unmount_all_under(&dir);
        remove_empty_dirs(&dir);
    }
}

/// Whether `path` was last changed (ctime: a rename counts) at least `min_age` ago.
fn older_than(path: &Path, min_age: Duration) -> bool {
    if min_age.is_zero() {
        return true;
    }
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let changed = u64::try_from(meta.ctime().max(meta.mtime())).unwrap_or(u64::MAX);
    now.saturating_sub(changed) >= min_age.as_secs()
}

/// Removes what crashed processes left: snapshot directories the snapshotter made
/// (`new-*`) or moved aside for deletion (`rm-*`) but never finished with, and blob
/// temp files in `ingest/`. The snapshotter cannot do this itself: another process may
/// be between making `new-*` and recording it, or deleting its `rm-*`. Only leftovers at
/// least `min_age` old are touched (zero when the store is held exclusively).
fn clean_crash_leftovers(snapshots_root: &Path, content_root: &Path, min_age: Duration) {
    if let Ok(entries) = std::fs::read_dir(snapshots_root.join("snapshots")) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if (name.starts_with("new-") || name.starts_with("rm-"))
                && older_than(&entry.path(), min_age)
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(content_root.join("ingest")) {
        for entry in entries.flatten() {
            if older_than(&entry.path(), min_age) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_go_by_age_and_live_snapshots_stay() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = dir.path().join("snapshots");
        let content = dir.path().join("content");
        for d in [
            "snapshots/new-abc/fs",
            "snapshots/rm-7/fs/x",
            "snapshots/3/fs",
        ] {
            std::fs::create_dir_all(snaps.join(d)).unwrap();
        }
        std::fs::create_dir_all(content.join("ingest")).unwrap();
        std::fs::write(content.join("ingest/ingest-1"), b"partial").unwrap();
        // Fresh leftovers may belong to a live process: kept.
        clean_crash_leftovers(&snaps, &content, LEFTOVER_AGE);
        assert!(snaps.join("snapshots/new-abc").exists());
        assert!(content.join("ingest/ingest-1").exists());
        clean_crash_leftovers(&snaps, &content, Duration::ZERO);
        let left: Vec<_> = std::fs::read_dir(snaps.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["3"]);
        assert!(!content.join("ingest/ingest-1").exists());
    }

    #[test]
    fn usage_times_merge_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = CacheKey([9; 32]);
        store.cache.put(&key, &Ref::Scratch).unwrap();
        assert_eq!(store.cache.get(&key).unwrap(), Some(Ref::Scratch));
        // A miss is not a use.
        assert_eq!(store.cache.get(&CacheKey([1; 32])).unwrap(), None);
        let before = now_millis();
        drop(store);
        let times = UsageTable::new(dir.path()).read();
        assert_eq!(times.len(), 1, "{times:?}");
        let t = times[&key.hex()];
        assert!(t <= before && t + 60_000 > before, "{t} vs {before}");
        // An older time never replaces a newer one.
        UsageTable::new(dir.path())
            .update(|m| {
                m.insert(key.hex(), 5);
            })
            .unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.cache.get(&key).unwrap();
        drop(store);
        assert!(UsageTable::new(dir.path()).read()[&key.hex()] >= before);
    }

    #[test]
    fn exclusive_open_waits_for_shared_holders() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Store::open(dir.path()).unwrap();
        let also_shared = Store::open(dir.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let root = dir.path().to_path_buf();
        let gc = std::thread::spawn(move || {
            let s = Store::open_exclusive(&root).unwrap();
            tx.send(()).unwrap();
            drop(s);
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(shared);
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(also_shared);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the exclusive open got the store once the others closed it");
        gc.join().unwrap();
    }
}
