//! Overlayfs snapshotter: metadata in `metadata.redb`, data in `snapshots/<id>/{fs,work}`.
//!
//! Concurrency: the database is a [`SharedDb`]: a process keeps it open between
//! operations and hands it over when another process waits for it (redb locks its file
//! while open, and opening and closing it costs fdatasyncs). Threads of a process take
//! turns at it. The records of the last read or write are kept beside the open database
//! and answer reads without a transaction; they are dropped whenever the database is
//! handed over and taken back, since another process may have written meanwhile. The
//! snapshot data itself needs no lock (each snapshot has its own directory).
//!
//! Crash safety follows containerd: a snapshot directory is made as `snapshots/new-*` and
//! renamed to its id inside the metadata transaction; removal renames it to `rm-<id>` in
//! the transaction and deletes it afterwards. A crash can leave a stray `new-*` or `rm-*`
//! directory, never a record without its data.
//!
//! Deep chains: mount(2) takes at most one page of options, which absolute `lowerdir`
//! paths overflow at roughly 100 layers. Beyond that (or when the root path contains `,` `:`
//! or `\`) the overlay mount names `snapshots/<id>/fs` relative to the root and carries
//! [`CHDIR_OPTION`]`<root>`, which [`crate::mount::mount_all`] honours.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::mount::CHDIR_OPTION;
use crate::shared_db::SharedDb;
use crate::{Error, Info, Kind, Mount, Result, Snapshotter};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// mount(2) takes its options in one page (including the final NUL).
const MAX_MOUNT_DATA: usize = 4095;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    parent: Option<String>,
    labels: BTreeMap<String, String>,
    created: i64,
}

impl Record {
    fn info(&self, name: &str) -> Info {
        Info {
            kind: self.kind,
            name: name.to_string(),
            parent: self.parent.clone(),
            labels: self.labels.clone(),
            created: self.created,
        }
    }
}

/// Every record as of the last read or write of this process, kept while it holds the
/// database (see the module doc).
type Records = BTreeMap<String, Record>;

impl Reader for Records {
    fn record(&self, key: &str) -> Result<Option<Record>> {
        Ok(self.get(key).cloned())
    }
    fn records(&self) -> Result<Vec<(String, Record)>> {
        Ok(self.iter().map(|(k, r)| (k.clone(), r.clone())).collect())
    }
}

pub struct OverlaySnapshotter {
    root: PathBuf,
    /// The metadata database, and the records last read or written while holding it.
    db: SharedDb<Option<Records>>,
}

fn db_err<E: Into<redb::Error>>(action: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Db {
        action: action.to_string(),
        source: Box::new(e.into()),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Metadata(format!("decode record of snapshot {key:?}: {e}")))
}

fn encode(rec: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(rec).map_err(|e| Error::Metadata(format!("encode snapshot record: {e}")))
}

/// Record lookups shared by read and write transactions.
trait Reader {
    fn record(&self, key: &str) -> Result<Option<Record>>;
    fn records(&self) -> Result<Vec<(String, Record)>>;
}

fn lookup(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>> {
    match table.get(key).map_err(db_err("read snapshot record"))? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

fn list(table: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Vec<(String, Record)>> {
    let mut out = Vec::new();
    for item in table.iter().map_err(db_err("list snapshots"))? {
        let (k, v) = item.map_err(db_err("list snapshots"))?;
        let key = k.value().to_string();
        let rec = decode(&key, v.value())?;
        out.push((key, rec));
    }
    Ok(out)
}

// Read and write transactions open the table as different types with the same methods.
macro_rules! impl_reader {
    ($($txn:ty),*) => {$(
        impl Reader for $txn {
            fn record(&self, key: &str) -> Result<Option<Record>> {
                lookup(&self.open_table(SNAPSHOTS).map_err(db_err("open snapshots table"))?, key)
            }
            fn records(&self) -> Result<Vec<(String, Record)>> {
                list(&self.open_table(SNAPSHOTS).map_err(db_err("open snapshots table"))?)
            }
        }
    )*};
}

impl_reader!(WriteTransaction, ReadTransaction);

fn put_record(tx: &WriteTransaction, key: &str, rec: &Record) -> Result<()> {
    let bytes = encode(rec)?;
    let mut table = tx
        .open_table(SNAPSHOTS)
        .map_err(db_err("open snapshots table"))?;
    table
        .insert(key, bytes.as_slice())
        .map_err(db_err("write snapshot record"))?;
    Ok(())
}

fn require(tx: &impl Reader, key: &str) -> Result<Record> {
    tx.record(key)?
        .ok_or_else(|| Error::NotFound(key.to_string()))
}

/// Ids of the committed ancestors of `rec`, nearest first.
fn parent_ids(tx: &impl Reader, rec: &Record) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut next = rec.parent.clone();
    while let Some(p) = next {
        let prec = tx
            .record(&p)?
            .ok_or_else(|| Error::Metadata(format!("parent {p:?} of a snapshot is missing")))?;
        ids.push(prec.id);
        next = prec.parent;
        if ids.len() > 10_000 {
            return Err(Error::Metadata("snapshot parent chain has a cycle".into()));
        }
    }
    Ok(ids)
}

/// Options turning off overlayfs features this kernel enables by default that would make
/// an upper dir unfit to be a layer on its own: metacopy (data left in the lower layer),
/// redirect_dir (renamed dirs point into the lower layer), index (ties lowers to uppers).
/// Empty on kernels where all are off already, as is the stock default.
fn feature_overrides() -> &'static [String] {
    static OVERRIDES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    OVERRIDES.get_or_init(|| {
        ["metacopy", "redirect_dir", "index"]
            .iter()
            .filter(|name| {
                fs::read_to_string(format!("/sys/module/overlay/parameters/{name}"))
                    .map(|v| matches!(v.trim(), "Y" | "on" | "follow" | "nofollow"))
                    .unwrap_or(false)
            })
            .map(|name| format!("{name}=off"))
            .collect()
    })
}

impl OverlaySnapshotter {
    /// Opens (creating if needed) a snapshotter rooted at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root.join("snapshots"))
            .map_err(|e| Error::io(format!("create snapshotter root {}", root.display()), e))?;
        let root = fs::canonicalize(root)
            .map_err(|e| Error::io(format!("resolve snapshotter root {}", root.display()), e))?;
        let db = SharedDb::new(&root.join("metadata.redb"), &root.join("metadata.lock"));
        let s = OverlaySnapshotter { root, db };
        // Creates the database and its tables up front so read paths never see a blank file.
        // A read finds them in every store but a new one, and costs no commit (a write
        // transaction's commit is the dearest part of opening a store on a warm build).
        let ready = s.with_db(|db, _| {
            let tx = db.begin_read().map_err(db_err("begin transaction"))?;
            Ok(tx.open_table(SNAPSHOTS).is_ok() && tx.open_table(COUNTERS).is_ok())
        })?;
        if ready {
            return Ok(s);
        }
        s.write(|tx| {
            tx.open_table(SNAPSHOTS)
                .map_err(db_err("create snapshots table"))?;
            tx.open_table(COUNTERS)
                .map_err(db_err("create counters table"))?;
            Ok(())
        })?;
        Ok(s)
    }

    /// The directory this snapshotter lives in (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database, &mut Option<Records>) -> Result<T>,
    ) -> Result<T> {
        self.db
            .with(f)
            .map_err(|e| Error::Metadata(format!("metadata database: {e}")))?
    }

    /// Runs `f` on the metadata database, held by this process, for the tables of other
    /// components (the build cache keeps its records here, so a build opens one database,
    /// not two). `f` must not touch this snapshotter's own tables.
    pub fn with_shared_db<T>(
        &self,
        f: impl FnOnce(&Database) -> std::result::Result<T, String>,
    ) -> std::result::Result<T, String> {
        self.db
            .with(|db, _| f(db))
            .map_err(|e| format!("metadata database: {e}"))?
    }

    /// Closes the metadata database now if this process holds it, so other processes on
    /// the store need not wait for it to idle out (see [`SharedDb`]).
    pub fn release(&self) {
        self.db.release();
    }

    /// Runs `f` in one write transaction: every change commits together or not at all.
    fn write<T>(&self, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        self.with_db(|db, kept| {
            // Whatever happens below, the kept records may no longer be the database's.
            *kept = None;
            let tx = db.begin_write().map_err(db_err("begin transaction"))?;
            let value = f(&tx)?;
            // The state this commit leaves, read inside it, so the reads after a write (a
            // RUN step's mounts and stat after its prepare) need no transaction.
            let records: Records = tx.records()?.into_iter().collect();
            tx.commit().map_err(db_err("commit transaction"))?;
            *kept = Some(records);
            Ok(value)
        })
    }

    /// Runs `f` on the records as the last commit left them: the kept ones while this
    /// process has held the database since reading them, else read again.
    fn read<T>(&self, f: impl FnOnce(&Records) -> Result<T>) -> Result<T> {
        self.with_db(|db, kept| {
            if let Some(records) = kept.as_ref() {
                return f(records);
            }
            let tx = db.begin_read().map_err(db_err("begin transaction"))?;
            let records: Records = tx.records()?.into_iter().collect();
            drop(tx);
            f(kept.insert(records))
        })
    }

    fn create(&self, kind: Kind, key: &str, parent: &str) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("snapshot key is empty".into()));
        }
        let snapshots = self.root.join("snapshots");
        let tmp = tempfile::Builder::new()
            .prefix("new-")
            .tempdir_in(&snapshots)
            .map_err(|e| Error::io("create snapshot directory", e))?;
        fs::create_dir(tmp.path().join("fs"))
            .map_err(|e| Error::io("create snapshot fs directory", e))?;
        if kind == Kind::Active {
            fs::create_dir(tmp.path().join("work"))
                .map_err(|e| Error::io("create snapshot work directory", e))?;
        }
        let mut placed: Option<PathBuf> = None;
        let result = self.write(|tx| {
            if tx.record(key)?.is_some() {
                return Err(Error::AlreadyExists(key.to_string()));
            }
            let parent = if parent.is_empty() {
                None
            } else {
                let prec = require(tx, parent)?;
                if prec.kind != Kind::Committed {
                    return Err(Error::FailedPrecondition(format!(
                        "parent {parent:?} is not committed"
                    )));
                }
                Some(parent.to_string())
            };
            let id = {
                let mut counters = tx
                    .open_table(COUNTERS)
                    .map_err(db_err("open counters table"))?;
                let current = counters
                    .get(NEXT_ID)
                    .map_err(db_err("read id counter"))?
                    .map_or(0, |v| v.value());
                let id = current + 1;
                counters
                    .insert(NEXT_ID, id)
                    .map_err(db_err("write id counter"))?;
                id
            };
            let rec = Record {
                id,
                kind,
                parent,
                labels: BTreeMap::new(),
                created: now(),
            };
            put_record(tx, key, &rec)?;
            let mounts = self.mounts_of(tx, &rec)?;
            let target = self.snapshot_dir(id);
            // A crash between this rename and the commit leaves a directory whose id was
            // never recorded; it is stale and safe to replace.
            if target.exists() {
                fs::remove_dir_all(&target)
                    .map_err(|e| Error::io("remove stale snapshot directory", e))?;
            }
            fs::rename(tmp.path(), &target)
                .map_err(|e| Error::io("move snapshot directory into place", e))?;
            placed = Some(target);
            Ok(mounts)
        });
        if result.is_err() {
            if let Some(p) = placed {
                let _ = fs::remove_dir_all(p);
            }
        }
        result
    }

    fn mounts_of(&self, tx: &impl Reader, rec: &Record) -> Result<Vec<Mount>> {
        let parents = parent_ids(tx, rec)?;
        Ok(self.build_mounts(rec, &parents))
    }

    fn build_mounts(&self, rec: &Record, parents: &[u64]) -> Vec<Mount> {
        let bind = |id: u64, ro: bool| Mount {
            kind: "bind".into(),
            source: self
                .snapshot_dir(id)
                .join("fs")
                .to_string_lossy()
                .into_owned(),
            options: vec!["rbind".into(), if ro { "ro".into() } else { "rw".into() }],
        };
        // A committed snapshot is read like a view of itself.
        let lowers: Vec<u64> = if rec.kind == Kind::Committed {
            std::iter::once(rec.id)
                .chain(parents.iter().copied())
                .collect()
        } else {
            parents.to_vec()
        };
        match (rec.kind, lowers.as_slice()) {
            (Kind::Active, []) => return vec![bind(rec.id, false)],
            (Kind::View | Kind::Committed, []) => return vec![bind(rec.id, true)],
            (Kind::View | Kind::Committed, [p]) => return vec![bind(*p, true)],
            _ => {}
        }
        let options = |prefix: &str| {
            let lower: Vec<String> = lowers
                .iter()
                .map(|id| format!("{prefix}snapshots/{id}/fs"))
                .collect();
            let mut opts = vec![format!("lowerdir={}", lower.join(":"))];
            if rec.kind == Kind::Active {
                opts.push(format!("upperdir={prefix}snapshots/{}/fs", rec.id));
                opts.push(format!("workdir={prefix}snapshots/{}/work", rec.id));
                opts.extend(feature_overrides().iter().cloned());
            }
            opts
        };
        let root = format!("{}/", self.root.to_string_lossy());
        let absolute = options(&root);
        // overlayfs splits its options at ',' and lowerdir at ':'; a root containing them
        // (or the '\\' escape) can only be named through the working directory.
        let plain_root = !root.contains([',', ':', '\\']);
        let mut options = if plain_root && absolute.join(",").len() <= MAX_MOUNT_DATA {
            absolute
        } else {
            // Too long for one page (or unsafe to spell out): paths relative to the root,
            // mounted from there.
            let mut rel = options("");
            rel.push(format!("{CHDIR_OPTION}{}", self.root.to_string_lossy()));
            rel
        };
        if rec.kind != Kind::Active {
            options.push("ro".into());
        }
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options,
        }]
    }
}

impl Snapshotter for OverlaySnapshotter {
    fn prepare(&self, key: &str, parent: &str) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent)
    }

    fn view(&self, key: &str, parent: &str) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.read(|tx| {
            let rec = require(tx, key)?;
            self.mounts_of(tx, &rec)
        })
    }

    fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("snapshot name is empty".into()));
        }
        self.write(|tx| {
            let mut rec = require(tx, key)?;
            if rec.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            if tx.record(name)?.is_some() {
                return Err(Error::AlreadyExists(name.to_string()));
            }
            rec.kind = Kind::Committed;
            rec.labels = labels;
            rec.created = now();
            tx.open_table(SNAPSHOTS)
                .map_err(db_err("open snapshots table"))?
                .remove(key)
                .map_err(db_err("remove snapshot record"))?;
            put_record(tx, name, &rec)
        })
    }

    fn remove(&self, key: &str) -> Result<()> {
        let doomed = self.write(|tx| {
            let rec = require(tx, key)?;
            if rec.kind == Kind::Committed
                && tx
                    .records()?
                    .iter()
                    .any(|(_, r)| r.parent.as_deref() == Some(key))
            {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} has children"
                )));
            }
            tx.open_table(SNAPSHOTS)
                .map_err(db_err("open snapshots table"))?
                .remove(key)
                .map_err(db_err("remove snapshot record"))?;
            let dir = self.snapshot_dir(rec.id);
            let doomed = self.root.join("snapshots").join(format!("rm-{}", rec.id));
            match fs::rename(&dir, &doomed) {
                Ok(()) => Ok(Some(doomed)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("move snapshot directory aside", e)),
            }
        })?;
        if let Some(d) = doomed {
            fs::remove_dir_all(&d).map_err(|e| Error::io("delete snapshot directory", e))?;
        }
        Ok(())
    }

    fn stat(&self, key: &str) -> Result<Info> {
        self.read(|tx| Ok(require(tx, key)?.info(key)))
    }

    fn update_labels(&self, key: &str, labels: BTreeMap<String, String>) -> Result<Info> {
        self.write(|tx| {
            let mut rec = require(tx, key)?;
            for (k, v) in labels {
                if v.is_empty() {
                    rec.labels.remove(&k);
                } else {
                    rec.labels.insert(k, v);
                }
            }
            put_record(tx, key, &rec)?;
            Ok(rec.info(key))
        })
    }

    fn walk(&self, f: &mut dyn FnMut(&Info)) -> Result<()> {
        // Collected first so `f` may call back into the snapshotter without deadlocking.
        let infos: Vec<Info> =
            self.read(|tx| Ok(tx.records()?.iter().map(|(k, r)| r.info(k)).collect()))?;
        for info in &infos {
            f(info);
        }
        Ok(())
    }

    fn upper_dir(&self, key: &str) -> Result<PathBuf> {
        let id = self.read(|tx| Ok(require(tx, key)?.id))?;
        Ok(self.snapshot_dir(id).join("fs"))
    }
}
