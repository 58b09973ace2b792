//! The persistent cache: cache key -> result, in a redb database.
//!
//! A record is written only after the result's snapshot is committed, and a hit is used only
//! if the snapshot still exists, so a crash at any moment leaves a cache that has the step
//! or not, never one pointing at missing data. Several `strata` processes share the database
//! through [`SharedDb`] (redb locks the file while it is open).
//!
//! Per-key locks ([`KeyLock`], `flock` on `locks/<key hex>` beside the database) let builds
//! on one store agree on who runs a step: the holder runs it and records it, the others
//! wait and then find the record.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use strata_snapshotter::shared_db::SharedDb;
use strata_snapshotter::sys::flock;
use strata_snapshotter::OverlaySnapshotter;

use crate::{CacheKey, Ref};

const RESULTS: TableDefinition<&[u8], &str> = TableDefinition::new("results-v1");

/// Where cache records live.
pub trait CacheStore: Sync {
    fn get(&self, key: &CacheKey) -> Result<Option<Ref>, String>;
    fn put(&self, key: &CacheKey, result: &Ref) -> Result<(), String>;
    /// Takes the store-wide exclusive lock of `key`, waiting for other holders; `None`
    /// when the store is private to this process (nobody else can run the key).
    fn lock(&self, _key: &CacheKey) -> Result<Option<KeyLock>, String> {
        Ok(None)
    }
}

/// An exclusive lock on one cache key, shared by every process on the store; released
/// (and its file removed) when dropped.
#[derive(Debug)]
pub struct KeyLock {
    path: PathBuf,
    // Held for the lock: closing it releases the flock.
    _file: File,
}

impl KeyLock {
    /// Locks `dir/<key hex>`, waiting while another process or thread holds it.
    pub fn acquire(dir: &Path, key: &CacheKey) -> Result<KeyLock, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let path = dir.join(key.hex());
        loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            flock(&file, libc::LOCK_EX).map_err(|e| format!("lock {}: {e}", path.display()))?;
            // The previous holder removes the file when it is done. If it did so between
            // our open and our flock, we locked an orphan while a newcomer may lock a new
            // file at the path: only a lock on the file the path names now counts.
            let ours = file
                .metadata()
                .map_err(|e| format!("stat {}: {e}", path.display()))?;
            match std::fs::metadata(&path) {
                Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {
                    return Ok(KeyLock { path, _file: file })
                }
                _ => continue,
            }
        }
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        // Unlink while still holding the lock (see `acquire`), then the close unlocks.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// redb-backed [`CacheStore`].
pub struct DbCache {
    /// Where [`KeyLock`]s live.
    locks: PathBuf,
    db: Backing,
}

enum Backing {
    /// A database file of its own, kept open between operations and handed to other
    /// processes when they wait for it.
    Own(SharedDb<()>),
    /// A table of the snapshotter's metadata database (see [`DbCache::in_snapshotter`]).
    Snapshotter(Arc<OverlaySnapshotter>),
}

impl DbCache {
    /// The cache in a database file of its own at `path`; key locks beside it.
    pub fn open(path: &Path) -> Result<Self, String> {
        // Nothing is opened here: the first `put` makes the table, and reads before it
        // find none.
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
        Ok(DbCache {
            locks: parent.join("locks"),
            db: Backing::Own(SharedDb::new(path, &path.with_extension("lock"))),
        })
    }

    /// The cache as a table of the snapshotter's metadata database, key locks in
    /// `locks`. A build then opens one database instead of two (each open and close of
    /// redb costs three fdatasyncs, a third of a warm rebuild's time on a busy disk), and
    /// a record lives in the same file as the snapshot it names.
    pub fn in_snapshotter(snapshotter: Arc<OverlaySnapshotter>, locks: PathBuf) -> Self {
        DbCache {
            locks,
            db: Backing::Snapshotter(snapshotter),
        }
    }

    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, String>) -> Result<T, String> {
        match &self.db {
            Backing::Own(db) => db.with(|db, _| f(db)).map_err(|e| e.to_string())?,
            Backing::Snapshotter(s) => s.with_shared_db(f),
        }
    }

    /// Closes the database now if this process holds it (see [`SharedDb`]).
    pub fn release(&self) {
        match &self.db {
            Backing::Own(db) => db.release(),
            Backing::Snapshotter(s) => s.release(),
        }
    }

    /// Every record, for garbage collection.
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, String)>, String> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| e.to_string())?;
            let Some(table) = read_table(&tx)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for item in table.iter().map_err(|e| e.to_string())? {
                let (k, v) = item.map_err(|e| e.to_string())?;
                out.push((k.value().to_vec(), v.value().to_string()));
            }
            Ok(out)
        })
    }

    /// Removes the records whose snapshot `keep` rejects; returns how many went.
    pub fn retain(&self, keep: &dyn Fn(&str) -> bool) -> Result<usize, String> {
        let doomed: Vec<Vec<u8>> = self
            .entries()?
            .into_iter()
            .filter(|(_, v)| !keep(v))
            .map(|(k, _)| k)
            .collect();
        if doomed.is_empty() {
            return Ok(0);
        }
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut table = tx.open_table(RESULTS).map_err(|e| e.to_string())?;
                for k in &doomed {
                    table.remove(k.as_slice()).map_err(|e| e.to_string())?;
                }
            }
            tx.commit().map_err(|e| e.to_string())
        })?;
        Ok(doomed.len())
    }
}

/// The results table, or `None` before the first record made it.
fn read_table(
    tx: &redb::ReadTransaction,
) -> Result<Option<redb::ReadOnlyTable<&'static [u8], &'static str>>, String> {
    match tx.open_table(RESULTS) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

fn encode(r: &Ref) -> String {
    match r {
        Ref::Snapshot(n) => format!("snapshot:{n}"),
        Ref::Scratch => "scratch".into(),
        Ref::Local(p) => format!("local:{}", p.display()),
    }
}

fn decode(s: &str) -> Option<Ref> {
    if s == "scratch" {
        return Some(Ref::Scratch);
    }
    if let Some(n) = s.strip_prefix("snapshot:") {
        return Some(Ref::Snapshot(n.to_string()));
    }
    s.strip_prefix("local:")
        .map(|p| Ref::Local(PathBuf::from(p)))
}

impl CacheStore for DbCache {
    fn get(&self, key: &CacheKey) -> Result<Option<Ref>, String> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| e.to_string())?;
            let Some(table) = read_table(&tx)? else {
                return Ok(None);
            };
            let v = table.get(key.0.as_slice()).map_err(|e| e.to_string())?;
            Ok(v.and_then(|v| decode(v.value())))
        })
    }

    fn put(&self, key: &CacheKey, result: &Ref) -> Result<(), String> {
        let value = encode(result);
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut table = tx.open_table(RESULTS).map_err(|e| e.to_string())?;
                table
                    .insert(key.0.as_slice(), value.as_str())
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().map_err(|e| e.to_string())
        })
    }

    fn lock(&self, key: &CacheKey) -> Result<Option<KeyLock>, String> {
        KeyLock::acquire(&self.locks, key).map(Some)
    }
}

/// An in-memory cache for tests.
#[derive(Default)]
pub struct MemoryCache(std::sync::Mutex<std::collections::HashMap<CacheKey, Ref>>);

impl CacheStore for MemoryCache {
    fn get(&self, key: &CacheKey) -> Result<Option<Ref>, String> {
        Ok(self.0.lock().map_err(|e| e.to_string())?.get(key).cloned())
    }
    fn put(&self, key: &CacheKey, result: &Ref) -> Result<(), String> {
        self.0
            .lock()
            .map_err(|e| e.to_string())?
            .insert(*key, result.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.redb");
        let key = CacheKey([7; 32]);
        DbCache::open(&path)
            .unwrap()
            .put(&key, &Ref::Snapshot("s1".into()))
            .unwrap();
        let again = DbCache::open(&path).unwrap();
        assert_eq!(
            DbCache::open(&dir.path().join("new.redb"))
                .unwrap()
                .get(&key)
                .unwrap(),
            None
        );
        assert!(DbCache::open(&dir.path().join("new2.redb"))
            .unwrap()
            .entries()
            .unwrap()
            .is_empty());
        assert_eq!(again.get(&key).unwrap(), Some(Ref::Snapshot("s1".into())));
        assert_eq!(again.get(&CacheKey([8; 32])).unwrap(), None);
        assert_eq!(again.retain(&|name| name != "snapshot:s1").unwrap(), 1);
        assert_eq!(again.get(&key).unwrap(), None);
    }

    #[test]
    fn records_in_the_snapshotter_database_survive_reopen_beside_snapshots() {
        use strata_snapshotter::Snapshotter;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("snapshots");
        let open = || Arc::new(OverlaySnapshotter::open(&root).unwrap());
        let sn = open();
        let cache = DbCache::in_snapshotter(sn.clone(), dir.path().join("locks"));
        sn.prepare("active", "").unwrap();
        sn.commit("s1", "active", Default::default()).unwrap();
        let key = CacheKey([9; 32]);
        cache.put(&key, &Ref::Snapshot("s1".into())).unwrap();
        // The snapshotter's own records are untouched by the cache's table.
        assert_eq!(sn.stat("s1").unwrap().name, "s1");
        cache.release();
        drop((cache, sn));

        let sn = open();
        let cache = DbCache::in_snapshotter(sn.clone(), dir.path().join("locks"));
        assert_eq!(cache.get(&key).unwrap(), Some(Ref::Snapshot("s1".into())));
        assert_eq!(cache.entries().unwrap().len(), 1);
        assert!(sn.stat("s1").is_ok());
        // One database file holds both.
        let files: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".redb"))
            .collect();
        assert_eq!(files, ["metadata.redb"]);
        let _lock = cache.lock(&key).unwrap().unwrap();
        assert!(dir.path().join("locks").join(key.hex()).exists());
    }

    #[test]
    fn key_lock_excludes_other_holders_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let key = CacheKey([3; 32]);
        let first = KeyLock::acquire(dir.path(), &key).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let lock = KeyLock::acquire(&path, &key).unwrap();
            tx.send(()).unwrap();
            drop(lock);
        });
        // The second holder is still waiting while the first holds the lock.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(first);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the waiter got the lock once it was free");
        waiter.join().unwrap();
        // The last holder removed the lock file.
        assert!(!dir.path().join(key.hex()).exists());
        // A different key never waits.
        let _a = KeyLock::acquire(dir.path(), &CacheKey([4; 32])).unwrap();
        let _b = KeyLock::acquire(dir.path(), &CacheKey([5; 32])).unwrap();
    }
}
