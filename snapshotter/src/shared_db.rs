//! A redb database shared by several processes, kept open between operations.
//!
//! redb takes an exclusive lock on its file for as long as a `Database` is open, and each
//! open and close costs fdatasyncs of its own (the recovery flag on open, the allocator
//! state on close): opening it per operation made the metadata the dearest part of a RUN
//! step, about 30 fdatasyncs each. So a process keeps the database open between
//! operations while nobody else wants it, and hands it over when someone does:
//!
//! - the holder has an exclusive `flock` on `<lock>`, taken before opening the database
//!   and released after closing it;
//! - a process that wants the database holds a shared `flock` on `<lock>.want` while it
//!   waits for `<lock>`;
//! - a watcher thread of the holder probes `<lock>.want` every [`PROBE`] and closes the
//!   database as soon as someone waits, or once it has been idle for [`IDLE`].
//!
//! Commits keep redb's default (immediate) durability, so a crash loses nothing that was
//! committed; the handover only saves the open and close.
//!
//! Each holder also keeps a state `S` beside the database (the snapshotter keeps its
//! records there). It is reset to `S::default()` whenever the database is (re)acquired,
//! because another process may have written in between; while held, nobody else can write,
//! so the state stays true as long as the holder updates it with its own writes.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use redb::Database;

use crate::sys::flock;

/// How often the holder looks for waiters.
pub const PROBE: Duration = Duration::from_millis(5);
/// How long an unused database stays open.
pub const IDLE: Duration = Duration::from_secs(2);

/// How long to wait for a database that another program (not following this protocol)
/// keeps open before giving up.
const FOREIGN_OPEN_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SharedDbError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open {path}: {source}")]
    Open {
        path: PathBuf,
        source: Box<redb::DatabaseError>,
    },
}

pub struct SharedDb<S: Default + Send + 'static> {
    inner: Arc<Inner<S>>,
}

struct Inner<S> {
    db_path: PathBuf,
    lock_path: PathBuf,
    want_path: PathBuf,
    slot: Mutex<Slot<S>>,
}

struct Slot<S> {
    held: Option<Held>,
    state: S,
    last_used: Instant,
    watching: bool,
}

/// The open database and the locks it is held under. Field order matters: the database
/// closes before the lock file does (closing it releases the flock).
struct Held {
    db: Database,
    _lock: File,
    want: File,
}

fn open_rw(path: &Path) -> Result<File, SharedDbError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| SharedDbError::Io {
            action: "open",
            path: path.to_path_buf(),
            source,
        })
}

impl<S> Inner<S> {
    fn lock_slot(&self) -> MutexGuard<'_, Slot<S>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the database (announcing it on the want file) and opens it.
    fn acquire(&self) -> Result<Held, SharedDbError> {
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| SharedDbError::Io {
                action,
                path,
                source,
            }
        };
        let want = open_rw(&self.want_path)?;
        flock(&want, libc::LOCK_SH).map_err(io("lock", &self.want_path))?;
        let lock = open_rw(&self.lock_path)?;
        flock(&lock, libc::LOCK_EX).map_err(io("lock", &self.lock_path))?;
        flock(&want, libc::LOCK_UN).map_err(io("unlock", &self.want_path))?;
        let deadline = Instant::now() + FOREIGN_OPEN_DEADLINE;
        let mut pause = Duration::from_millis(2);
        loop {
            match Database::create(&self.db_path) {
                Ok(db) => {
                    return Ok(Held {
                        db,
                        _lock: lock,
                        want,
                    })
                }
                // Only a program that ignores the lock file can hold it now.
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(SharedDbError::Open {
                        path: self.db_path.clone(),
                        source: Box::new(source),
                    })
                }
            }
        }
    }
}

/// Whether another process waits for the database (holds a shared lock on the want file).
fn wanted(want: &File) -> bool {
    if flock(want, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
        let _ = flock(want, libc::LOCK_UN);
        return false;
    }
    // EWOULDBLOCK: a waiter. Any other error: give the database up rather than starve one.
    true
}

fn watch<S>(inner: Weak<Inner<S>>) {
    loop {
        std::thread::sleep(PROBE);
        let Some(inner) = inner.upgrade() else { return };
        let mut slot = inner.lock_slot();
        let release = match &slot.held {
            None => true,
            Some(held) => slot.last_used.elapsed() >= IDLE || wanted(&held.want),
        };
        if release {
            slot.held = None;
            slot.watching = false;
            return;
        }
    }
}

impl<S: Default + Send + 'static> SharedDb<S> {
    /// A handle on the database at `db_path`, coordinated through `lock_path` and
    /// `lock_path` + `.want`. Nothing is opened until the first use.
    pub fn new(db_path: &Path, lock_path: &Path) -> Self {
        let mut want = lock_path.as_os_str().to_owned();
        want.push(".want");
        SharedDb {
            inner: Arc::new(Inner {
                db_path: db_path.to_path_buf(),
                lock_path: lock_path.to_path_buf(),
                want_path: PathBuf::from(want),
                slot: Mutex::new(Slot {
                    held: None,
                    state: S::default(),
                    last_used: Instant::now(),
                    watching: false,
                }),
            }),
        }
    }

    /// Runs `f` with the database open and no other process using it. Threads of this
    /// process take turns.
    pub fn with<T>(&self, f: impl FnOnce(&Database, &mut S) -> T) -> Result<T, SharedDbError> {
        let mut slot = self.inner.lock_slot();
        let slot = &mut *slot;
        let held = match &mut slot.held {
            Some(held) => held,
            empty => {
                let held = self.inner.acquire()?;
                slot.state = S::default();
                if !slot.watching {
                    let weak = Arc::downgrade(&self.inner);
                    std::thread::Builder::new()
                        .name("strata-db-watch".into())
                        .spawn(move || watch(weak))
                        .map_err(|source| SharedDbError::Io {
                            action: "start the watcher of",
                            path: self.inner.db_path.clone(),
                            source,
                        })?;
                    slot.watching = true;
                }
                empty.insert(held)
            }
        };
        let out = f(&held.db, &mut slot.state);
        slot.last_used = Instant::now();
        Ok(out)
    }

    /// Closes the database now (if this process holds it), so other processes need not
    /// wait for the watcher.
    pub fn release(&self) {
        self.inner.lock_slot().held = None;
    }

    pub fn path(&self) -> &Path {
        &self.inner.db_path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::TableDefinition;

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    fn put(db: &SharedDb<u32>, key: &str, value: u64) {
        db.with(|db, _| {
            let tx = db.begin_write().unwrap();
            tx.open_table(T).unwrap().insert(key, value).unwrap();
            tx.commit().unwrap();
        })
        .unwrap();
    }

    fn get(db: &SharedDb<u32>, key: &str) -> Option<u64> {
        db.with(|db, _| {
            let tx = db.begin_read().unwrap();
            let t = tx.open_table(T).ok()?;
            let v = t.get(key).unwrap().map(|v| v.value());
            v
        })
        .unwrap()
    }

    #[test]
    fn two_handles_on_one_file_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let a = SharedDb::<u32>::new(&dir.path().join("x.redb"), &dir.path().join("x.lock"));
        let b = SharedDb::<u32>::new(&dir.path().join("x.redb"), &dir.path().join("x.lock"));
        put(&a, "one", 1);
        // `a` still holds the database: `b` must get it handed over, not fail.
        assert_eq!(get(&b, "one"), Some(1));
        put(&b, "two", 2);
        assert_eq!(get(&a, "two"), Some(2));
        assert_eq!(get(&a, "one"), Some(1));
    }

    #[test]
    fn state_is_reset_when_another_handle_had_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let a = SharedDb::<u32>::new(&dir.path().join("x.redb"), &dir.path().join("x.lock"));
        let b = SharedDb::<u32>::new(&dir.path().join("x.redb"), &dir.path().join("x.lock"));
        a.with(|_, s| *s = 7).unwrap();
        assert_eq!(a.with(|_, s| *s).unwrap(), 7, "kept while held");
        b.with(|_, _| ()).unwrap();
        assert_eq!(a.with(|_, s| *s).unwrap(), 0, "reset after a handover");
    }

    #[test]
    fn an_idle_database_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        let a = SharedDb::<u32>::new(&path, &dir.path().join("x.lock"));
        put(&a, "k", 1);
        std::thread::sleep(IDLE + Duration::from_millis(200));
        // redb's own lock is gone: a plain open succeeds.
        drop(Database::create(&path).expect("closed after being idle"));
        assert_eq!(get(&a, "k"), Some(1));
        a.release();
        drop(Database::create(&path).expect("closed by release"));
    }
}
