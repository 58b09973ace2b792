//! The local image store: names -> image records, one JSON file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use strata_dag::Digest;

use crate::image::ImageRecord;
use crate::names::parse_image_name;
use crate::{Error, Result};

const INDEX: &str = "images.json";
const LOCK: &str = "images.lock";

/// One tagged image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredImage {
    /// As the user typed it, without the tag (`app`, `localhost:5000/app`).
    pub name: String,
    pub tag: String,
    pub record: ImageRecord,
    /// Seconds since the epoch when it was tagged.
    pub created: i64,
    /// Compressed layers plus config, in bytes.
    pub size: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct Index {
    /// Keyed by `name:tag`.
    images: BTreeMap<String, StoredImage>,
}

/// Names of built images, kept in `<root>/images.json`.
///
/// Every change takes an exclusive `flock` on `<root>/images.lock`, reads the file,
/// and replaces it through a temp file and rename, so concurrent builds (threads or
/// processes) never lose each other's entries and a crash leaves the old or the new file.
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root)
            .map_err(|e| Error::io(format!("create image store {}", root.display()), e))?;
        Ok(ImageStore {
            root: root.to_path_buf(),
        })
    }

    /// Points `name` (`app`, `app:v1`) at `record`, replacing what it named before.
    pub fn tag(&self, name: &str, record: &ImageRecord, created: i64) -> Result<StoredImage> {
        let (name, tag) = parse_image_name(name)?;
        let image = StoredImage {
            name,
            tag,
            record: record.clone(),
            created,
            size: record.size,
        };
        let key = format!("{}:{}", image.name, image.tag);
        let mut stored = image.clone();
        self.update(|index| match index.images.get(&key) {
            // Tagging the image a name already points at (a cached rebuild) changes
            // nothing, not even the time it was tagged.
            Some(old) if old.record == image.record => {
                stored = old.clone();
                false
            }
            _ => {
                index.images.insert(key.clone(), image.clone());
                true
            }
        })?;
        Ok(stored)
    }

    pub fn get(&self, name: &str) -> Result<Option<StoredImage>> {
        let (name, tag) = parse_image_name(name)?;
        let index = self.read()?;
        Ok(index.images.get(&format!("{name}:{tag}")).cloned())
    }

    /// All images, ordered by name then tag.
    pub fn list(&self) -> Result<Vec<StoredImage>> {
        Ok(self.read()?.images.into_values().collect())
    }

    /// Removes a name; whether it existed.
    pub fn remove(&self, name: &str) -> Result<bool> {
        let (name, tag) = parse_image_name(name)?;
        let key = format!("{name}:{tag}");
        self.update(|index| index.images.remove(&key).is_some())
    }

    /// Manifest digests that some name points at: roots for garbage collection.
    pub fn references(&self) -> Result<BTreeSet<Digest>> {
        Ok(self
            .read()?
            .images
            .into_values()
            .map(|i| i.record.manifest_digest)
            .collect())
    }

    fn lock_exclusive(&self) -> Result<Flock<File>> {
        let path = self.root.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            Error::io(
                format!("lock {}", path.display()),
                std::io::Error::from(errno),
            )
        })
    }

    /// Readers need no lock: the file is only ever replaced whole, by rename.
    fn read(&self) -> Result<Index> {
        let path = self.root.join(INDEX);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::json(format!("parse {}", path.display()), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
        }
    }

    /// Read-modify-write under the exclusive lock; `f` says whether anything changed.
    fn update(&self, f: impl FnOnce(&mut Index) -> bool) -> Result<bool> {
        let _lock = self.lock_exclusive()?;
        let mut index = self.read()?;
        if !f(&mut index) {
            return Ok(false);
        }
        let path = self.root.join(INDEX);
        let bytes = serde_json::to_vec_pretty(&index)
            .map_err(|e| Error::json("encode image store index", e))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.root)
            .map_err(|e| Error::io(format!("create temp file in {}", self.root.display()), e))?;
        tmp.write_all(&bytes)
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(|e| Error::io(format!("write {}", tmp.path().display()), e))?;
        tmp.persist(&path)
            .map_err(|e| Error::io(format!("replace {}", path.display()), e.error))?;
        // The rename is durable only once the directory is synced.
        File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("sync {}", self.root.display()), e))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8) -> ImageRecord {
        ImageRecord {
            manifest_digest: Digest::of(&[n]),
            manifest_size: 100,
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            config_digest: Digest::of(&[n, n]),
            size: 1000 + u64::from(n),
        }
    }

    #[test]
    fn tag_get_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        assert!(store.get("app").unwrap().is_none());
        let a = store.tag("app", &record(1), 10).unwrap();
        assert_eq!(
            (a.name.as_str(), a.tag.as_str(), a.size),
            ("app", "latest", 1001)
        );
        store.tag("app:v2", &record(2), 11).unwrap();
        store.tag("app:latest", &record(3), 12).unwrap(); // retag replaces
        assert_eq!(store.get("app").unwrap().unwrap().record, record(3));
        assert_eq!(store.get("app:v2").unwrap().unwrap().created, 11);
        let names: Vec<_> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|i| format!("{}:{}", i.name, i.tag))
            .collect();
        assert_eq!(names, ["app:latest", "app:v2"]);
        assert_eq!(
            store.references().unwrap(),
            [record(2).manifest_digest, record(3).manifest_digest]
                .into_iter()
                .collect()
        );
        assert!(store.remove("app:v2").unwrap());
        assert!(!store.remove("app:v2").unwrap());
        assert!(store.tag("Bad Name", &record(1), 0).is_err());
        // Survives reopening.
        let again = ImageStore::open(dir.path()).unwrap();
        assert_eq!(again.list().unwrap().len(), 1);
    }

    #[test]
    fn concurrent_tagging_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            for t in 0..2u8 {
                let root = dir.path();
                s.spawn(move || {
                    // Separate handles, as two builds would have.
                    let store = ImageStore::open(root).unwrap();
                    for i in 0..50u8 {
                        store
                            .tag(&format!("img{t}-{i}"), &record(i), i64::from(i))
                            .unwrap();
                    }
                });
            }
        });
        let store = ImageStore::open(dir.path()).unwrap();
        assert_eq!(store.list().unwrap().len(), 100);
    }

    #[test]
    fn corrupt_index_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(INDEX), b"{not json").unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let err = store.list().unwrap_err();
        assert!(err.to_string().contains("images.json"), "{err}");
    }
}
